//! Backends and a client for the proxy's tests: plain HTTP/1.1 over tokio on loopback.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A backend answering every request with its name; `GET /slow` answers after a second.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    /// Requests it received.
    pub hits: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let (n, h) = (name.to_string(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (n, h) = (n.clone(), h.clone());
                tokio::spawn(serve(conn, n, h));
            }
        });
        Backend {
            name: name.to_string(),
            addr,
            hits,
            task,
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops listening and closes the port (connections are refused from now on).
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut conn: TcpStream, name: String, hits: Arc<AtomicU64>) {
    let mut buf = Vec::new();
    loop {
        // One request: headers only (the tests send no bodies).
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end);
        hits.fetch_add(1, Ordering::SeqCst);
        if head.starts_with("GET /slow") {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let body = format!("{name}\n");
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
            body.len()
        );
        if conn.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 200 with this body (a backend's name).
    Ok(String),
    /// Another status.
    Status(u16),
    /// The connection was refused.
    Refused,
    /// Anything else (reset, timeout, garbage).
    Broken(String),
}

/// One request on a new connection.
pub async fn get(addr: SocketAddr, path: &str) -> Outcome {
    let attempt = async {
        match TcpStream::connect(addr).await {
            Ok(conn) => get_on(conn, path).await,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
            Err(e) => Outcome::Broken(e.to_string()),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| Outcome::Broken("timeout".into()))
}

/// One request on `conn`, an open connection.
pub async fn get_on(mut conn: TcpStream, path: &str) -> Outcome {
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    if let Err(e) = conn.write_all(req.as_bytes()).await {
        return Outcome::Broken(e.to_string());
    }
    let mut resp = Vec::new();
    if let Err(e) = conn.read_to_end(&mut resp).await {
        return Outcome::Broken(e.to_string());
    }
    parse(&resp)
}

fn parse(resp: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(resp);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Outcome::Broken(format!("no response: {text:?}"));
    };
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status == 200 {
        Outcome::Ok(body.trim().to_string())
    } else {
        Outcome::Status(status)
    }
}

/// A free loopback port (bound and released: the tests run one proxy per port).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Sends requests back to back until `stop`, recording each outcome with when it started.
pub fn load(
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> JoinHandle<Vec<(std::time::Instant, Outcome)>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let t = std::time::Instant::now();
            out.push((t, get(addr, "/").await));
        }
        out
    })
}
