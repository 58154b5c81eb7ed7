//! Frames: a 4-byte big-endian length, then that many bytes of JSON.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest frame body.
pub const MAX_FRAME: usize = 1 << 20;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended mid-frame.
    #[error("reading a frame: {0}")]
    Io(#[from] io::Error),
    /// The stream ended between frames.
    #[error("the peer closed the connection")]
    Closed,
    /// A length over [`MAX_FRAME`]: the stream cannot be followed any more.
    #[error("a frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    /// The body is not the JSON expected.
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Writes `msg` as one frame.
pub fn write<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if body.len() > MAX_FRAME {
        return Err(io::Error::other(format!(
            "a message of {} bytes is over the frame limit of {MAX_FRAME}",
            body.len()
        )));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()
}

/// Reads one frame's body.
pub fn read_body<R: Read>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Reads one frame as a `T`.
pub fn read<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(&read_body(r)?)?)
}

/// Splits frames out of bytes received so far: for a reader that gets its bytes in pieces (and
/// for fuzzing the framing without a stream). `Ok(None)`: the frame is not complete yet.
pub fn decode(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(buf.get(4..4 + len).map(|body| (body, 4 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, RequestFrame, PROTOCOL_VERSION};

    #[test]
    fn frames_round_trip_and_bad_ones_are_errors() {
        let mut buf = Vec::new();
        let msg = RequestFrame {
            version: PROTOCOL_VERSION,
            request: Request::Ping,
        };
        write(&mut buf, &msg).unwrap();
        write(&mut buf, &msg).unwrap();
        let mut r = &buf[..];
        assert_eq!(read::<_, RequestFrame>(&mut r).unwrap(), msg);
        assert_eq!(read::<_, RequestFrame>(&mut r).unwrap(), msg);
        assert!(matches!(
            read::<_, RequestFrame>(&mut r),
            Err(FrameError::Closed)
        ));

        let mut huge = &((MAX_FRAME as u32) + 1).to_be_bytes()[..];
        assert!(matches!(read_body(&mut huge), Err(FrameError::TooLarge(_))));
        let mut cut = &[0u8, 0, 0, 10, b'{'][..];
        assert!(matches!(read_body(&mut cut), Err(FrameError::Io(_))));
        let mut junk = &[0u8, 0, 0, 3, b'a', b'b', b'c'][..];
        assert!(matches!(
            read::<_, RequestFrame>(&mut junk),
            Err(FrameError::Json(_))
        ));
    }

    /// A deterministic stand-in for a fuzzer: random and mutated inputs through the decoder
    /// and the message parser, which must answer (never panic, never read past the input).
    #[test]
    fn the_decoder_survives_arbitrary_bytes() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut valid = Vec::new();
        write(
            &mut valid,
            &RequestFrame {
                version: 1,
                request: Request::ApplyConfig {
                    name: "a".into(),
                    revision: 1,
                    content: "x".into(),
                    service: None,
                },
            },
        )
        .unwrap();
        for round in 0..20_000 {
            let mut input = if round % 2 == 0 {
                valid.clone()
            } else {
                (0..(next() % 64)).map(|_| next() as u8).collect()
            };
            for _ in 0..(next() % 4) {
                if !input.is_empty() {
                    let i = (next() as usize) % input.len();
                    input[i] = next() as u8;
                }
            }
            if let Ok(Some((body, used))) = decode(&input) {
                assert!(used <= input.len());
                let _ = serde_json::from_slice::<RequestFrame>(body);
            }
            let _ = read::<_, RequestFrame>(&mut &input[..]);
        }
    }
}
