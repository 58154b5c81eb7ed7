//! Decompression of compressed clusters: raw deflate ("zlib" in QEMU's terms) and zstd. The
//! output is always exactly one cluster; anything else is a corrupt cluster.

use std::io::Read;

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use crate::header::Compression;

/// Decompresses `input` into `out` (one cluster). Trailing bytes after the compressed stream
/// are allowed: compressed clusters are stored in whole sectors.
pub fn decompress_cluster(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        Compression::Zlib => {
            let mut state = DecompressorOxide::new();
            let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
            let (status, _, written) = decompress(&mut state, input, out, 0, flags);
            let full = written == out.len();
            match status {
                TINFLStatus::Done if full => Ok(()),
                // The output buffer is full before the end-of-stream marker: QEMU accepts this.
                TINFLStatus::HasMoreOutput if full => Ok(()),
                s => Err(format!(
                    "deflate stream ended after {written} of {} bytes ({s:?})",
                    out.len()
                )),
            }
        }
        Compression::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| format!("zstd: {e}"))?
                .single_frame();
            dec.read_exact(out).map_err(|e| format!("zstd: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_methods_round_trip_and_reject_short_streams() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i / 7) as u8).collect();
        let deflated = miniz_oxide::deflate::compress_to_vec(&data, 6);
        let mut out = vec![0u8; 4096];
        let mut padded = deflated.clone();
        padded.resize(deflated.len().next_multiple_of(512), 0xee);
        decompress_cluster(Compression::Zlib, &padded, &mut out).unwrap();
        assert_eq!(out, data);
        let zst = zstd::bulk::compress(&data, 3).unwrap();
        decompress_cluster(Compression::Zstd, &zst, &mut out).unwrap();
        assert_eq!(out, data);
        let mut big = vec![0u8; 8192];
        assert!(decompress_cluster(Compression::Zlib, &deflated, &mut big).is_err());
        assert!(decompress_cluster(Compression::Zstd, &zst, &mut big).is_err());
        assert!(decompress_cluster(Compression::Zstd, b"garbage", &mut out).is_err());
        assert!(decompress_cluster(Compression::Zlib, &[0xff; 64], &mut out).is_err());
    }
}
