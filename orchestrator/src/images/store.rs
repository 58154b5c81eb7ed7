//! The control plane's blob store: files named by their SHA-256 under a directory
//! (`sha256/<hex>`, read-only), written only by an upload whose content hashes to its name.
//! Uploads go to `tmp/` first and are renamed into place once verified and synced, so a broken
//! or lying upload never becomes a blob, and an interrupted one is simply started again.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

use super::transfer::StreamHash;
use super::Digest;

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// The content does not hash to the name it was uploaded under.
    #[error("the upload's SHA-256 is {got}, not the digest it was sent to ({want})")]
    Mismatch { want: String, got: String },
    /// The client went away or the stream broke.
    #[error("the upload broke off after {received} bytes: {why}")]
    Broken { received: u64, why: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A directory of blobs.
#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    /// Blob downloads served, for tests and operators (how often workers pulled).
    served: AtomicU64,
}

impl BlobStore {
    /// The store in `dir`, created (0700) when missing.
    pub fn open(dir: &Path) -> std::io::Result<BlobStore> {
        for d in [dir.to_path_buf(), dir.join("sha256"), dir.join("tmp")] {
            std::fs::create_dir_all(&d)?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
        }
        // Uploads that never finished (a crash of the server) are of no use.
        if let Ok(entries) = std::fs::read_dir(dir.join("tmp")) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(BlobStore {
            dir: dir.to_path_buf(),
            served: AtomicU64::new(0),
        })
    }

    /// Where blob `d` lives (whether or not it is there).
    pub fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join("sha256").join(d.hex())
    }

    /// The size of blob `d`, when the store has it.
    pub fn size(&self, d: &Digest) -> Option<u64> {
        std::fs::metadata(self.path(d))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }

    /// The first `n` bytes of blob `d` (fewer when it is shorter).
    pub fn head(&self, d: &Digest, n: usize) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let mut buf = Vec::with_capacity(n);
        std::fs::File::open(self.path(d))?
            .take(n as u64)
            .read_to_end(&mut buf)?;
        Ok(buf)
    }

    /// Counts a download served.
    pub fn count_served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    /// Downloads served so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Stores `body` as blob `d`, unless its content hashes to something else. Returns the
    /// size. A blob stored already is kept (the upload is read and checked all the same).
    pub async fn put<S, E>(&self, d: &Digest, mut body: S) -> Result<u64, PutError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{}.{}", d.hex(), uuid::Uuid::new_v4()));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PutError::Io { path, source }
        };
        let result = async {
            let mut out = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
            let hasher = StreamHash::start().map_err(io(&tmp))?;
            let mut received = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| PutError::Broken {
                    received,
                    why: e.to_string(),
                })?;
                received += chunk.len() as u64;
                out.write_all(&chunk).await.map_err(io(&tmp))?;
                hasher.update(chunk).await;
            }
            let got = hasher.finish().await;
            if got != d.hex() {
                return Err(PutError::Mismatch {
                    want: d.to_string(),
                    got: format!("sha256:{got}"),
                });
            }
            out.sync_all().await.map_err(io(&tmp))?;
            drop(out);
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o400))
                .map_err(io(&tmp))?;
            let to = self.path(d);
            crate::worker::durable::rename(&tmp, &to).map_err(io(&to))?;
            Ok(received)
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    fn chunks(
        parts: Vec<Result<&'static [u8], String>>,
    ) -> impl Stream<Item = Result<Bytes, String>> + Unpin {
        futures_util::stream::iter(parts.into_iter().map(|p| p.map(Bytes::from_static)))
    }

    #[tokio::test]
    async fn only_content_that_hashes_to_its_name_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = b"hello, image";
        let d = Digest::sha256(&super::super::transfer::hex(&sha2::Sha256::digest(data))).unwrap();
        let n = store
            .put(&d, chunks(vec![Ok(&data[..5]), Ok(&data[5..])]))
            .await
            .unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(store.size(&d), Some(data.len() as u64));
        assert_eq!(std::fs::read(store.path(&d)).unwrap(), data);
        let mode = std::fs::metadata(store.path(&d))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);

        // Bytes flipped in transit: refused, nothing stored.
        let other = Digest::sha256(&"0".repeat(64)).unwrap();
        let e = store
            .put(&other, chunks(vec![Ok(b"hello, imagf")]))
            .await
            .unwrap_err();
        assert!(matches!(e, PutError::Mismatch { .. }), "{e}");
        assert_eq!(store.size(&other), None);
        // A stream that breaks off: refused, nothing stored, no temporary file left.
        let e = store
            .put(
                &other,
                chunks(vec![Ok(b"hel"), Err("connection reset".into())]),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, PutError::Broken { received: 3, .. }), "{e}");
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
