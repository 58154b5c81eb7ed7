//! The client side of the image store: hashing a file, asking whether the server has a blob,
//! and streaming a file up (what `lightbyte image push` does), with progress on stderr.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::transfer::checksum_with;
use super::Digest;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Prints "what: N% (x MiB of y MiB)" lines, at most every two seconds.
struct Progress {
    what: String,
    total: u64,
    last: std::sync::Mutex<Instant>,
}

impl Progress {
    fn new(what: String, total: u64) -> Progress {
        Progress {
            what,
            total,
            last: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn at(&self, done: u64, force: bool) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if !force && last.elapsed() < Duration::from_secs(2) {
            return;
        }
        *last = Instant::now();
        let pct = (done * 100).checked_div(self.total).unwrap_or(100);
        eprintln!(
            "{}: {pct}% ({} of {} MiB)",
            self.what,
            done >> 20,
            self.total >> 20
        );
    }
}

/// The SHA-256 digest of the file at `path`, with progress.
pub async fn digest_of(path: &Path) -> std::io::Result<Digest> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let total = std::fs::metadata(&path)?.len();
        let progress = Progress::new(format!("hashing {}", path.display()), total);
        let (sha, _) = checksum_with(&path, |done, _| progress.at(done, false))?;
        Digest::sha256(&sha).map_err(std::io::Error::other)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Why an upload failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{url}: {why}")]
    Http { url: String, why: String },
    #[error("{url}: {status}: {message}")]
    Refused {
        url: String,
        status: StatusCode,
        message: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// One client (and its connection pool) for every blob request of the process.
fn client() -> &'static Client<crate::tls::Connector, Body> {
    static CLIENT: std::sync::OnceLock<Client<crate::tls::Connector, Body>> =
        std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        Client::builder(TokioExecutor::new()).build(crate::tls::connector(Duration::from_secs(10)))
    })
}

/// The size of blob `d` on the server at `base`, when it has it.
pub async fn remote_size(base: &str, d: &Digest) -> Result<Option<u64>, UploadError> {
    let url = format!("{}/api/v1/blobs/{d}", base.trim_end_matches('/'));
    let http_err = |why: String| UploadError::Http {
        url: url.clone(),
        why,
    };
    let req = crate::auth::authorize(Request::builder())
        .method(Method::HEAD)
        .uri(&url)
        .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
        .map_err(|e| http_err(e.to_string()))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client().request(req))
        .await
        .map_err(|_| http_err("no answer within 30s".into()))?
        .map_err(|e| http_err(e.to_string()))?;
    match resp.status() {
        StatusCode::OK => Ok(resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())),
        StatusCode::NOT_FOUND => Ok(None),
        status => Err(UploadError::Refused {
            url,
            status,
            message: "unexpected answer to HEAD".into(),
        }),
    }
}

/// Streams the file at `path` to the server at `base` as blob `d`. The server stores it only
/// when the bytes it received hash to `d`.
pub async fn upload(base: &str, d: &Digest, path: &Path) -> Result<u64, UploadError> {
    let url = format!("{}/api/v1/blobs/{d}", base.trim_end_matches('/'));
    let io = |source| UploadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(io)?;
    let total = file.metadata().await.map_err(io)?.len();
    let progress = Arc::new(Progress::new(
        format!("uploading {}", path.display()),
        total,
    ));
    let sent = Arc::new(AtomicU64::new(0));
    let (p, s) = (progress.clone(), sent.clone());
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map(move |chunk| {
        chunk.map(|b| {
            let done = s.fetch_add(b.len() as u64, Ordering::Relaxed) + b.len() as u64;
            p.at(done, false);
            Frame::data(b)
        })
    });
    let req = crate::auth::authorize(Request::builder())
        .method(Method::PUT)
        .uri(&url)
        .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
        .header(hyper::header::CONTENT_LENGTH, total)
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .map_err(|e| UploadError::Http {
            url: url.clone(),
            why: e.to_string(),
        })?;
    let resp = client().request(req).await.map_err(|e| UploadError::Http {
        url: url.clone(),
        why: e.to_string(),
    })?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if !status.is_success() {
        let message = crate::client::error_message(&body);
        return Err(UploadError::Refused {
            url,
            status,
            message,
        });
    }
    progress.at(sent.load(Ordering::Relaxed), true);
    Ok(total)
}
