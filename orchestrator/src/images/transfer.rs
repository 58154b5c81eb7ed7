//! Files moved by content: SHA-256 of a file, and a streamed HTTP download that takes its final
//! name only once its length and SHA-256 are the ones expected (moved disks between workers,
//! images from the control plane's store).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::{header, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Why a download did not give the file.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("fetching {url}: {why}")]
    Fetch { url: String, why: String },
    #[error("{url} arrived damaged: {why}")]
    Damaged { url: String, why: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The hex SHA-256 and length of a file.
pub fn checksum(path: &Path) -> std::io::Result<(String, u64)> {
    checksum_with(path, |_, _| {})
}

/// [`checksum`], telling `progress` (bytes done, bytes in all) as it goes.
pub fn checksum_with(
    path: &Path,
    mut progress: impl FnMut(u64, u64),
) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let total = f.metadata()?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
        progress(len, total);
    }
    Ok((hex(&hasher.finalize()), len))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a stream, computed on a thread of its own: hashing a large file on the async
/// runtime's threads would starve what else runs there (a worker's heartbeat, a control plane's
/// leader leases). Chunks queue boundedly, so a fast network waits for the hash, not memory.
pub struct StreamHash {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    thread: std::thread::JoinHandle<String>,
}

impl StreamHash {
    pub fn start() -> std::io::Result<StreamHash> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
        let thread = std::thread::Builder::new()
            .name("sha256".into())
            .spawn(move || {
                let mut h = Sha256::new();
                while let Some(b) = rx.blocking_recv() {
                    h.update(&b);
                }
                hex(&h.finalize())
            })?;
        Ok(StreamHash { tx, thread })
    }

    /// Adds `chunk` (waits while the hashing thread is behind).
    pub async fn update(&self, chunk: bytes::Bytes) {
        // The thread only stops when the sender is dropped.
        let _ = self.tx.send(chunk).await;
    }

    /// The hex SHA-256 of everything added.
    pub async fn finish(self) -> String {
        drop(self.tx);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join().unwrap_or_default())
            .await
            .unwrap_or_default()
    }
}

/// What a download must turn out to be.
#[derive(Debug, Clone)]
pub struct Expected {
    /// Hex SHA-256.
    pub sha256: String,
    /// Length, when known in advance (more bytes stop the download at once).
    pub size: Option<u64>,
}

/// Streams `url` (with `bearer` as its Authorization when given) into `file`, through
/// `file.part`, fsynced; it takes its final name (durably) only when its length and SHA-256
/// are `want`'s. A damaged or short download leaves nothing behind.
pub async fn download(
    url: &str,
    bearer: Option<&str>,
    want: &Expected,
    file: &Path,
    timeout: Duration,
) -> Result<u64, FetchError> {
    let fetch_err = |why: String| FetchError::Fetch {
        url: url.to_string(),
        why,
    };
    let damaged = |why: String| FetchError::Damaged {
        url: url.to_string(),
        why,
    };
    let part = file.with_extension("part");
    // A move's own token, else this process's (a worker pulling an image).
    let mut req = hyper::Request::get(url);
    if let Some(token) = bearer.or(crate::auth::own_token()) {
        req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req
        .body(Full::new(bytes::Bytes::new()))
        .map_err(|e| fetch_err(e.to_string()))?;
    let copy = async {
        let resp = crate::http::client()
            .request(req)
            .await
            .map_err(|e| fetch_err(e.to_string()))?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
            let text = body
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            return Err(fetch_err(format!("{status}: {}", text.trim())));
        }
        let mut out = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&part)
            .await
            .map_err(io_err(&part))?;
        let hasher = StreamHash::start().map_err(io_err(&part))?;
        let mut len = 0u64;
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| fetch_err(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                len += data.len() as u64;
                if want.size.is_some_and(|s| len > s) {
                    return Err(damaged(format!(
                        "more than the {} bytes announced",
                        want.size.unwrap_or_default()
                    )));
                }
                out.write_all(&data).await.map_err(io_err(&part))?;
                hasher.update(data).await;
            }
        }
        out.sync_all().await.map_err(io_err(&part))?;
        Ok((hasher.finish().await, len))
    };
    let result = tokio::time::timeout(timeout, copy)
        .await
        .map_err(|_| fetch_err(format!("not done within {timeout:?}")))
        .and_then(|r| r);
    let (sha, len) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    if want.size.is_some_and(|s| s != len) || sha != want.sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(damaged(format!(
            "{len} bytes with SHA-256 {sha}, expected {} with {}",
            want.size
                .map_or_else(|| "any length".to_string(), |s| format!("{s} bytes")),
            want.sha256
        )));
    }
    crate::worker::durable::rename(&part, file).map_err(io_err(file))?;
    Ok(len)
}
