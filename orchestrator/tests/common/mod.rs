//! Test harness: a real etcd on free loopback ports with its own data directory (killed when
//! the handle drops, also when a test fails, and with the test process through PDEATHSIG),
//! control planes in the test process, and a plain HTTP client that shares no code with ours.

#![allow(dead_code)] // Each test file uses a different part of the harness.

pub mod agents;

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use orchestrator::controllers::ControllerConfig;
use orchestrator::model::{ByteSize, Capacity, WorkerSpec};
use orchestrator::registration::Registration;
use orchestrator::server::{ControlPlane, ServerConfig};
use orchestrator::store::Store;

/// Leader lease TTL in tests: etcd's minimum.
pub const TTL: Duration = Duration::from_secs(2);

/// The tokens of [`tokens_file`], by role.
pub const ADMIN_TOKEN: &str = "test-admin-000000000000000000000000000";
pub const VIEWER_TOKEN: &str = "test-viewer-00000000000000000000000000";
pub const NODE_TOKEN: &str = "test-node-0000000000000000000000000000";

/// The tokens file every server in the tests authenticates with (written once per test
/// process, 0600).
pub fn tokens_file() -> PathBuf {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let path = dir.join("tokens");
        let part = dir.join(format!("tokens.{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&part)
            .expect("tokens file");
        write!(
            f,
            "{ADMIN_TOKEN} admin tester\n{VIEWER_TOKEN} viewer watcher\n{NODE_TOKEN} node workers\n"
        )
        .expect("tokens file");
        std::fs::rename(&part, &path).expect("tokens file");
        path
    })
    .clone()
}

/// Token authentication for a server in this process; this process's own requests (the
/// API client, the control plane's calls to workers) bear the admin token and go over TLS with
/// the tests' certificate.
pub fn auth() -> orchestrator::auth::Auth {
    orchestrator::auth::set_own_token(ADMIN_TOKEN.to_string());
    orchestrator::tls::set_own(tls_files()).expect("TLS files");
    let file = orchestrator::auth::TokenFile::open(&tokens_file()).expect("tokens file");
    orchestrator::auth::Auth::Tokens(std::sync::Arc::new(file))
}

pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// Clients must come over TLS with a certificate of the tests' CA.
    tls: bool,
}

impl Etcd {
    /// Starts etcd and waits until it answers. Call it from the test's own thread: PDEATHSIG
    /// fires when the thread that spawned the child ends.
    pub fn start() -> Etcd {
        Etcd::start_with(false)
    }

    /// [`Etcd::start`] serving TLS only, to clients with a certificate of the tests' CA.
    pub fn start_tls() -> Etcd {
        Etcd::start_with(true)
    }

    fn start_with(tls: bool) -> Etcd {
        let mut etcd = Etcd {
            child: None,
            dir: tempfile::tempdir().expect("temp dir for etcd"),
            client_port: 0,
            peer_port: 0,
            tls,
        };
        for _ in 0..5 {
            (etcd.client_port, etcd.peer_port) = free_ports();
            if etcd.spawn() {
                return etcd;
            }
            // Most likely another process took a port between our probe and etcd's bind.
            etcd.kill();
            let _ = std::fs::remove_dir_all(etcd.dir.path().join("data"));
        }
        panic!("etcd did not start in five attempts:\n{}", etcd.log_tail());
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (SIGKILL: as if its host died) and waits for it to exit.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts etcd again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "etcd did not restart:\n{}", self.log_tail());
    }

    /// A raw etcd client, to check what is really stored.
    pub async fn client(&self) -> etcd_client::Client {
        let options = self.tls.then(|| {
            etcd_client::ConnectOptions::new()
                .with_tls(tls_files().etcd_options().expect("TLS options"))
        });
        etcd_client::Client::connect([self.url()], options)
            .await
            .expect("etcd client")
    }

    pub async fn store(&self) -> Store {
        if self.tls {
            orchestrator::tls::set_own(tls_files()).expect("TLS files");
        }
        Store::connect(&[self.url()], Duration::from_secs(2))
            .await
            .expect("store")
    }

    fn spawn(&mut self) -> bool {
        let data = self.dir.path().join("data");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        if self.tls {
            let files = tls_files();
            cmd.arg(format!("--cert-file={}", files.cert.display()))
                .arg(format!("--key-file={}", files.key.display()))
                .arg(format!("--trusted-ca-file={}", files.ca.display()))
                .arg("--client-cert-auth");
        }
        cmd.arg("--name=test")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it only sets
        // this child's parent-death signal, so etcd dies with the test process even on SIGKILL.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("cannot run etcd (is etcd-server installed?): {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            if healthy(self.client_port, self.tls) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Two distinct free ports (both held open while probing so they differ).
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind");
    (
        a.local_addr().expect("addr").port(),
        b.local_addr().expect("addr").port(),
    )
}

fn healthy(port: u16, tls: bool) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let got = if tls {
        http(addr, "GET", "/health", None)
    } else {
        http_plain(addr, "GET", "/health")
    };
    matches!(got, Ok((200, body)) if body.contains("\"health\":\"true\""))
}

/// The tests' CA and the one certificate (for 127.0.0.1 and localhost) every server and client
/// of a test process serves and presents, made once per process.
pub fn tls_files() -> orchestrator::tls::TlsFiles {
    static FILES: std::sync::OnceLock<orchestrator::tls::TlsFiles> = std::sync::OnceLock::new();
    FILES
        .get_or_init(|| {
            let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
            // Those of test processes that have ended.
            for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if let Some(pid) = name.strip_prefix("pki-") {
                    if !std::path::Path::new("/proc").join(pid).exists() {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
            let dir = root.join(format!("pki-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            orchestrator::pki::init(&dir, "tests CA").expect("CA");
            let (cert, key) =
                orchestrator::pki::issue(&dir, "node", &["127.0.0.1".into(), "localhost".into()])
                    .expect("certificate");
            orchestrator::tls::TlsFiles {
                ca: dir.join("ca.crt"),
                cert,
                key,
            }
        })
        .clone()
}

/// Sets what a child `lightbyte` process needs to be a client of the tests' servers: TLS files
/// and the admin token (callers may override the token).
pub fn client_env(cmd: &mut Command) -> &mut Command {
    let files = tls_files();
    cmd.env("LIGHTBYTE_CA", &files.ca)
        .env("LIGHTBYTE_CERT", &files.cert)
        .env("LIGHTBYTE_KEY", &files.key)
        .env("LIGHTBYTE_TOKEN", ADMIN_TOKEN)
}

/// A plain-HTTP GET (etcd without TLS).
fn http_plain(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    exchange(s, &addr, None, method, path, None)
}

/// One HTTP/1.1 request over a fresh connection, as the admin: (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    http_as(Some(ADMIN_TOKEN), addr, method, path, body)
}

/// [`http`] bearing `token`, or no credentials.
pub fn http_as(
    token: Option<&str>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    exchange(tls_stream(s, addr)?, &addr, token, method, path, body)
}

/// `s` (connected to `addr`) under TLS with the tests' certificate.
pub fn tls_stream(
    s: TcpStream,
    addr: SocketAddr,
) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let config = tls_files().client_config().map_err(std::io::Error::other)?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    Ok(rustls::StreamOwned::new(conn, s))
}

/// A connection whose answer can be read after the request could not be sent whole.
trait Answer: Read + Write {
    /// Reads what the server sent until it closed, once writing failed.
    fn answer_after_refusal(&mut self, out: &mut String) -> std::io::Result<()> {
        self.read_to_string(out).map(drop)
    }
}

impl Answer for TcpStream {}

impl Answer for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn answer_after_refusal(&mut self, out: &mut String) -> std::io::Result<()> {
        // The request's unsent rest stays queued in the TLS session, and each read of the
        // stream tries to send it first, failing again (EPIPE): read the server's records
        // from the socket directly.
        let mut plain = Vec::new();
        loop {
            match self.conn.read_tls(&mut self.sock) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => return Err(e),
            }
            self.conn
                .process_new_packets()
                .map_err(std::io::Error::other)?;
            match self.conn.reader().read_to_end(&mut plain) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
        }
        out.push_str(&String::from_utf8_lossy(&plain));
        Ok(())
    }
}

fn exchange(
    mut s: impl Answer,
    addr: &SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let sent = write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut resp = String::new();
    let read = match sent {
        Ok(()) => s.read_to_string(&mut resp).map(drop),
        // A server that refuses a request early (a body over its limit: 413) answers and closes
        // while the body is still being written; the answer is in the socket, read it.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            s.answer_after_refusal(&mut resp)
        }
        Err(e) => return Err(e),
    };
    match read {
        Ok(_) => {}
        // A TLS peer that closes without close_notify after answering (or resets the connection,
        // having not read all of the request): the answer stands.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) && !resp.is_empty() => {}
        Err(e) => return Err(e),
    }
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {resp:?}")))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// `http` from async code.
pub async fn http_async(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let (method, path, body) = (
        method.to_string(),
        path.to_string(),
        body.map(str::to_string),
    );
    let (status, text) =
        tokio::task::spawn_blocking(move || http(addr, &method, &path, body.as_deref()))
            .await
            .expect("http task")
            .expect("http request");
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, json)
}

pub fn controller_config(holder: &str) -> ControllerConfig {
    ControllerConfig {
        holder: holder.to_string(),
        lease_ttl: TTL,
        resync: Duration::from_secs(5),
    }
}

/// A control plane in this process on a free port. Its images may name host paths (the tests
/// of other things register images by path); `tests/images.rs` starts its own without.
pub async fn control_plane(etcd: &Etcd, holder: &str) -> ControlPlane {
    ControlPlane::start(ServerConfig {
        etcd: vec![etcd.url()],
        listen: "127.0.0.1:0".parse().expect("addr"),
        also_listen: Vec::new(),
        etcd_timeout: Duration::from_secs(2),
        controllers: controller_config(holder),
        image_dir: None,
        allow_host_path: true,
        limits: Default::default(),
        auth: auth(),
        tls: Some(tls_files()),
    })
    .await
    .expect("control plane")
}

pub fn worker_spec(cpus: u32, memory: &str) -> WorkerSpec {
    WorkerSpec {
        capacity: Capacity {
            cpus,
            memory: memory.parse::<ByteSize>().expect("size"),
        },
        labels: Default::default(),
        drain: false,
        forgotten: false,
        endpoint: None,
    }
}

pub async fn register(store: &Store, name: &str, cpus: u32, memory: &str) -> Registration {
    Registration::register(store, name, worker_spec(cpus, memory), TTL)
        .await
        .expect("register worker")
}

/// Polls `check` until it returns `Some`, failing the test after `limit`. The limit only
/// bounds a hang; nothing is asserted about how fast the condition came.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
