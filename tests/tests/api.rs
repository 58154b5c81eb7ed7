//! The HTTP API end to end over real Unix sockets, without a guest: the server against mock
//! VMMs (every route, state errors, malformed requests, oversized and slow clients, concurrency,
//! random bodies), and the `vmm` binary's `--api-socket` (socket file rules, signals, the API
//! before a VM exists).

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use lightbyte_tests::paths::binary;
use vmm::api::{ApiServer, ServerOptions};
use vmm::control::{ControlError, VmControl};
use vmm_api::client::blocking::Client;
use vmm_api::client::ClientError;
use vmm_api::config::{SerialConfig, VmConfig, DEFAULT_CMDLINE};
use vmm_api::routes::ROUTES;
use vmm_api::types::{DiskCounters, SnapshotType, VmInfo, VmState};

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lb-api-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A file standing in for a kernel: exists, so create's file checks pass.
    fn kernel(&self) -> PathBuf {
        let k = self.path("vmlinux");
        std::fs::write(&k, "not really a kernel\n").unwrap();
        k
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An API server on a fresh socket.
struct Served {
    scratch: Scratch,
    sock: PathBuf,
    server: Option<ApiServer>,
}

impl Served {
    fn new(control: Arc<dyn VmControl>, options: ServerOptions) -> Served {
        let scratch = Scratch::new("srv");
        let sock = scratch.path("api.sock");
        let server = ApiServer::start(&sock, control, options).unwrap();
        Served {
            scratch,
            sock,
            server: Some(server),
        }
    }

    fn client(&self) -> Client {
        Client::new(&self.sock).with_timeout(Duration::from_secs(30))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }
}

fn config(kernel: &Path) -> VmConfig {
    VmConfig {
        kernel: kernel.to_path_buf(),
        firmware: None,
        initramfs: None,
        cmdline: DEFAULT_CMDLINE.into(),
        cpus: 2,
        memory: 256 << 20,
        serial: SerialConfig::Off,
        disks: Vec::new(),
        nets: Vec::new(),
        vsock: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Mock VMMs

/// A VMM that follows the lifecycle state machine and records what it was asked.
#[derive(Default)]
struct Mock {
    inner: Mutex<MockState>,
}

struct MockState {
    state: VmState,
    config: Option<VmConfig>,
    shutdown_timeouts: Vec<u64>,
    snapshots: Vec<(PathBuf, SnapshotType)>,
    restores: Vec<(PathBuf, bool)>,
}

impl Default for MockState {
    fn default() -> Self {
        MockState {
            state: VmState::NotCreated,
            config: None,
            shutdown_timeouts: Vec::new(),
            snapshots: Vec::new(),
            restores: Vec::new(),
        }
    }
}

impl Mock {
    fn transition(
        &self,
        what: &str,
        from: &[VmState],
        to: VmState,
    ) -> Result<std::sync::MutexGuard<'_, MockState>, ControlError> {
        let mut g = self.inner.lock().unwrap();
        if !from.contains(&g.state) {
            return Err(ControlError::Conflict(format!(
                "cannot {what}: the VM is {:?}",
                g.state
            )));
        }
        g.state = to;
        Ok(g)
    }
}

impl VmControl for Mock {
    fn create(&self, config: VmConfig) -> Result<(), ControlError> {
        let mut g = self.transition(
            "create",
            &[VmState::NotCreated, VmState::Created],
            VmState::Created,
        )?;
        g.config = Some(config);
        Ok(())
    }
    fn boot(&self) -> Result<(), ControlError> {
        self.transition("boot", &[VmState::Created], VmState::Running)
            .map(drop)
    }
    fn shutdown(&self, timeout_ms: u64) -> Result<(), ControlError> {
        let mut g = self.transition(
            "shut down",
            &[VmState::Running, VmState::Paused],
            VmState::Shutdown,
        )?;
        g.shutdown_timeouts.push(timeout_ms);
        Ok(())
    }
    fn reboot(&self) -> Result<(), ControlError> {
        self.transition(
            "reboot",
            &[VmState::Running, VmState::Paused],
            VmState::Running,
        )
        .map(drop)
    }
    fn pause(&self) -> Result<(), ControlError> {
        self.transition("pause", &[VmState::Running], VmState::Paused)
            .map(drop)
    }
    fn resume(&self) -> Result<(), ControlError> {
        self.transition("resume", &[VmState::Paused], VmState::Running)
            .map(drop)
    }
    fn info(&self) -> VmInfo {
        let g = self.inner.lock().unwrap();
        let booted = matches!(g.state, VmState::Running | VmState::Paused);
        VmInfo {
            state: g.state,
            config: g.config.clone(),
            disks: if booted {
                vec![DiskCounters {
                    path: "/img/root.raw".into(),
                    read_ops: 3,
                    read_bytes: 12288,
                    ..DiskCounters::default()
                }]
            } else {
                Vec::new()
            },
            nets: Vec::new(),
            exit_reason: (g.state == VmState::Shutdown).then(|| "guest powered off".into()),
            pause_reason: None,
        }
    }
    fn snapshot(&self, dir: PathBuf, kind: SnapshotType) -> Result<(), ControlError> {
        let mut g = self.transition("snapshot", &[VmState::Paused], VmState::Paused)?;
        g.snapshots.push((dir, kind));
        Ok(())
    }
    fn restore(&self, dir: PathBuf, resume: bool) -> Result<(), ControlError> {
        let to = if resume {
            VmState::Running
        } else {
            VmState::Paused
        };
        let mut g = self.transition("restore", &[VmState::NotCreated], to)?;
        g.restores.push((dir, resume));
        Ok(())
    }
}

/// A VMM that accepts everything: any error status is the API layer's own doing.
struct AlwaysOk;

impl VmControl for AlwaysOk {
    fn create(&self, _: VmConfig) -> Result<(), ControlError> {
        Ok(())
    }
    fn boot(&self) -> Result<(), ControlError> {
        Ok(())
    }
    fn shutdown(&self, _: u64) -> Result<(), ControlError> {
        Ok(())
    }
    fn reboot(&self) -> Result<(), ControlError> {
        Ok(())
    }
    fn pause(&self) -> Result<(), ControlError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), ControlError> {
        Ok(())
    }
    fn info(&self) -> VmInfo {
        VmInfo {
            state: VmState::NotCreated,
            config: None,
            disks: Vec::new(),
            nets: Vec::new(),
            exit_reason: None,
            pause_reason: None,
        }
    }
    fn snapshot(&self, _: PathBuf, _: SnapshotType) -> Result<(), ControlError> {
        Ok(())
    }
    fn restore(&self, _: PathBuf, _: bool) -> Result<(), ControlError> {
        Ok(())
    }
}

/// A VMM whose host fails (500), or that panics in `boot`.
struct Broken;

impl VmControl for Broken {
    fn create(&self, _: VmConfig) -> Result<(), ControlError> {
        Err(ControlError::Internal(
            "KVM_CREATE_VM: out of memory".into(),
        ))
    }
    fn boot(&self) -> Result<(), ControlError> {
        panic!("the mock VMM panics in boot");
    }
    fn shutdown(&self, _: u64) -> Result<(), ControlError> {
        Err(ControlError::BadRequest("bad timeout".into()))
    }
    fn reboot(&self) -> Result<(), ControlError> {
        Err(ControlError::Internal("reboot failed".into()))
    }
    fn pause(&self) -> Result<(), ControlError> {
        Err(ControlError::Conflict("not running".into()))
    }
    fn resume(&self) -> Result<(), ControlError> {
        Ok(())
    }
    fn info(&self) -> VmInfo {
        AlwaysOk.info()
    }
    fn snapshot(&self, _: PathBuf, _: SnapshotType) -> Result<(), ControlError> {
        Ok(())
    }
    fn restore(&self, _: PathBuf, _: bool) -> Result<(), ControlError> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP, for requests the typed client would never send

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Reply {
    fn error(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {:?}", self.body));
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error member: {}", self.body))
            .to_string()
    }
}

/// Parses one response from the start of `bytes`; None while incomplete.
fn parse_reply(bytes: &[u8]) -> Option<Reply> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let body = bytes.get(end + 4..end + 4 + len)?;
    Some(Reply {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
        headers,
    })
}

/// Reads one response (or None at EOF before a complete one) within `limit`.
fn read_reply(stream: &mut UnixStream, limit: Duration) -> Option<Reply> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(r) = parse_reply(&buf) {
            return Some(r);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("reading the response: {e} (after {} bytes)", buf.len()),
        }
    }
}

fn request_bytes(method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        req.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn raw(sock: &Path, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Reply {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(&request_bytes(method, path, content_type, body))
        .unwrap();
    read_reply(&mut s, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{method} {path}: connection closed without a response"))
}

fn put_json(sock: &Path, path: &str, body: &str) -> Reply {
    raw(sock, "PUT", path, Some("application/json"), body.as_bytes())
}

fn assert_error(r: &Reply, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(
        r.headers.get("content-type").map(String::as_str),
        Some("application/json"),
        "{r:?}"
    );
    let msg = r.error();
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
}

fn api_status(e: ClientError) -> u16 {
    e.status()
        .unwrap_or_else(|| panic!("not an API error: {e}"))
        .as_u16()
}

// ---------------------------------------------------------------------------------------------
// The server against mocks

#[test]
fn every_route_through_the_typed_client() {
    let mock = Arc::new(Mock::default());
    let srv = Served::new(mock.clone(), ServerOptions::default());
    let c = srv.client();
    let kernel = srv.scratch.kernel();

    let ping = c.ping().unwrap();
    assert_eq!(ping.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(ping.pid, std::process::id());
    assert_eq!(c.info().unwrap().state, VmState::NotCreated);
    assert_eq!(api_status(c.boot().unwrap_err()), 409);

    let cfg = config(&kernel);
    c.create(&cfg).unwrap();
    let info = c.info().unwrap();
    assert_eq!(info.state, VmState::Created);
    assert_eq!(info.config.as_ref(), Some(&cfg));

    c.boot().unwrap();
    let e = c.boot().unwrap_err();
    assert_eq!(api_status(e), 409, "boot twice");
    assert_eq!(api_status(c.resume().unwrap_err()), 409);
    assert_eq!(
        api_status(c.snapshot(srv.scratch.path("s")).unwrap_err()),
        409
    );
    let info = c.info().unwrap();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.disks[0].read_bytes, 12288);

    c.pause().unwrap();
    assert_eq!(api_status(c.pause().unwrap_err()), 409);
    c.snapshot(srv.scratch.path("snap")).unwrap();
    c.snapshot_of(srv.scratch.path("diff"), SnapshotType::Diff)
        .unwrap();
    c.resume().unwrap();
    c.reboot().unwrap();
    assert_eq!(api_status(c.create(&cfg).unwrap_err()), 409);
    assert_eq!(api_status(c.restore("/snap", false).unwrap_err()), 409);
    c.shutdown(Some(1234)).unwrap();
    let info = c.info().unwrap();
    assert_eq!(info.state, VmState::Shutdown);
    assert_eq!(info.exit_reason.as_deref(), Some("guest powered off"));
    assert_eq!(api_status(c.shutdown(None).unwrap_err()), 409);

    {
        let g = mock.inner.lock().unwrap();
        assert_eq!(g.shutdown_timeouts, vec![1234]);
        assert_eq!(
            g.snapshots,
            vec![
                (srv.scratch.path("snap"), SnapshotType::Full),
                (srv.scratch.path("diff"), SnapshotType::Diff)
            ]
        );
    }

    // Restore needs a process without a VM; the default shutdown timeout reaches the VMM.
    let mock2 = Arc::new(Mock::default());
    let srv2 = Served::new(mock2.clone(), ServerOptions::default());
    let c2 = srv2.client();
    c2.restore("/var/snap", true).unwrap();
    assert_eq!(c2.info().unwrap().state, VmState::Running);
    c2.shutdown(None).unwrap();
    assert_eq!(
        raw(
            &srv2.sock,
            "PUT",
            "/api/v1/vm/restore",
            None,
            br#"{"source_dir":"/x"}"#
        )
        .status,
        409
    );
    let g = mock2.inner.lock().unwrap();
    assert_eq!(g.restores, vec![(PathBuf::from("/var/snap"), true)]);
    assert_eq!(g.shutdown_timeouts, vec![10_000]);
}

#[test]
fn raw_requests_get_the_documented_answers() {
    let mock = Arc::new(Mock::default());
    let srv = Served::new(mock.clone(), ServerOptions::default());
    let s = &srv.sock;
    let kernel = srv.scratch.kernel();
    let k = kernel.to_str().unwrap();
    let create = "/api/v1/vm/create";

    let r = raw(s, "GET", "/api/v1/vmm/ping", None, b"");
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        raw(s, "GET", "/api/v1/vmm/ping?verbose=1", None, b"").status,
        200
    );

    assert_error(&put_json(s, create, "{\"kernel\": "), 400, "malformed JSON");
    assert_error(&put_json(s, create, "not json"), 400, "malformed JSON");
    assert_error(&put_json(s, create, ""), 400, "needs a JSON request body");
    assert_error(
        &put_json(s, create, &format!(r#"{{"kernel":"{k}","colour":"red"}}"#)),
        400,
        "unknown field `colour`",
    );
    assert_error(
        &put_json(
            s,
            create,
            &format!(r#"{{"kernel":"{k}","disks":[{{"path":"{k}","cache":"none"}}]}}"#),
        ),
        400,
        "disks[0]: unknown field `cache`",
    );
    assert_error(
        &put_json(s, create, &format!(r#"{{"kernel":"{k}","cpus":"two"}}"#)),
        400,
        "cpus: invalid type",
    );
    assert_error(
        &put_json(s, create, &format!(r#"{{"kernel":"{k}","memory":true}}"#)),
        400,
        "memory: invalid type",
    );
    assert_error(
        &put_json(s, create, &format!(r#"{{"kernel":"{k}","memory":"1M"}}"#)),
        400,
        "too small",
    );
    assert_error(
        &put_json(
            s,
            create,
            &format!(r#"{{"kernel":"{k}","memory":"129M0"}}"#),
        ),
        400,
        "invalid size",
    );
    assert_error(
        &put_json(
            s,
            create,
            &format!(r#"{{"kernel":"{k}","memory":134221825}}"#),
        ),
        400,
        "multiple of 4 KiB",
    );
    assert_error(
        &put_json(s, create, &format!(r#"{{"kernel":"{k}","cpus":255}}"#)),
        400,
        "cpus 255 is out of range",
    );
    assert_error(
        &put_json(s, create, r#"{"kernel":"/nonexistent/vmlinux"}"#),
        400,
        "kernel /nonexistent/vmlinux: no such file",
    );
    assert_error(
        &put_json(
            s,
            create,
            &format!(r#"{{"kernel":"{k}","initramfs":"/nonexistent/initrd"}}"#),
        ),
        400,
        "initramfs /nonexistent/initrd: no such file",
    );
    assert_error(
        &put_json(
            s,
            create,
            &format!(r#"{{"kernel":"{k}","disks":[{{"path":"/nonexistent/d.raw"}}]}}"#),
        ),
        400,
        "disk /nonexistent/d.raw: no such file",
    );
    assert_error(
        &put_json(
            s,
            create,
            &format!(r#"{{"kernel":"{k}","serial":"tcp:1"}}"#),
        ),
        400,
        "invalid serial",
    );
    assert_error(
        &put_json(
            s,
            create,
            &format!(r#"{{"kernel":"{k}","firmware":"/fw/OVMF.fd"}}"#),
        ),
        400,
        "give `kernel` or `firmware`, not both",
    );
    assert_error(
        &put_json(
            s,
            create,
            &format!(r#"{{"kernel":"{k}","nets":[{{"tap":"lb-no-such-if"}}]}}"#),
        ),
        400,
        "net lb-no-such-if: no such network interface",
    );
    assert_error(
        &put_json(
            s,
            create,
            &format!(r#"{{"kernel":"{k}","nets":[{{"tap":"lo","mac":"01:02:03:04:05:06"}}]}}"#),
        ),
        400,
        "nets[0]: invalid net \"lo\": mac=01:02:03:04:05:06: a multicast address",
    );
    assert_error(
        &put_json(
            s,
            create,
            &format!(r#"{{"kernel":"{k}","vsock":{{"cid":2,"socket":"/v.sock"}}}}"#),
        ),
        400,
        "invalid vsock \"/v.sock\": cid=2: expected a number from 3 to 4294967294 (0-2 and 4294967295 are reserved)",
    );
    assert_eq!(
        mock.inner.lock().unwrap().state,
        VmState::NotCreated,
        "a refused create must not reach the VMM"
    );

    // A create mirroring the command line, memory as a string.
    let r = put_json(
        s,
        create,
        &format!(
            r#"{{"kernel":"{k}","cmdline":"console=ttyS0","cpus":2,"memory":"512M",
                "disks":[{{"path":"{k}","format":"raw","readonly":true,"serial":"x","direct":false}}],
                "serial":"file:/tmp/console.log","nets":[{{"tap":"lo"}}]}}"#
        ),
    );
    assert_eq!(r.status, 204, "{r:?}");
    assert!(r.body.is_empty());
    let cfg = mock.inner.lock().unwrap().config.clone().unwrap();
    assert_eq!(cfg.memory, 512 << 20);
    assert_eq!(cfg.serial, SerialConfig::File("/tmp/console.log".into()));
    assert!(cfg.disks[0].read_only);
    assert_eq!(cfg.nets[0].tap, "lo");
    // What info reports is a valid create body for the same VM (the MAC drawn at create
    // included).
    let info = raw(s, "GET", "/api/v1/vm/info", None, b"");
    let v: serde_json::Value = serde_json::from_str(&info.body).unwrap();
    assert_eq!(v["state"], "created");
    let again = put_json(s, create, &v["config"].to_string());
    assert_eq!(again.status, 204, "{again:?}");
    assert_eq!(mock.inner.lock().unwrap().config.as_ref(), Some(&cfg));

    // Bodies of the other endpoints.
    assert_error(
        &put_json(s, "/api/v1/vm/boot", r#"{"force":true}"#),
        400,
        "unknown field `force`",
    );
    assert_eq!(put_json(s, "/api/v1/vm/boot", "{}").status, 204);
    assert_error(
        &put_json(s, "/api/v1/vm/shutdown", r#"{"timeout_ms":"soon"}"#),
        400,
        "timeout_ms: invalid type",
    );
    assert_error(
        &put_json(s, "/api/v1/vm/shutdown", r#"{"timeout_ms":-1}"#),
        400,
        "timeout_ms",
    );
    assert_error(
        &put_json(s, "/api/v1/vm/snapshot", r#"{}"#),
        400,
        "missing field `destination_dir`",
    );
    assert_error(
        &put_json(s, "/api/v1/vm/snapshot", r#"{"destination_dir":""}"#),
        400,
        "destination_dir: empty path",
    );
    assert_error(
        &put_json(
            s,
            "/api/v1/vm/snapshot",
            r#"{"destination_dir":"/s","snapshot_type":"partial"}"#,
        ),
        400,
        "unknown variant `partial`",
    );
    assert_error(
        &put_json(
            s,
            "/api/v1/vm/restore",
            r#"{"source_dir":"/s","resume":"yes"}"#,
        ),
        400,
        "resume: invalid type",
    );
    assert_error(
        &put_json(s, "/api/v1/vm/restore", r#"{"source":"/s"}"#),
        400,
        "unknown field `source`",
    );

    // Routing and media types.
    assert_error(
        &raw(s, "GET", "/api/v1/vm/nope", None, b""),
        404,
        "/api/v1/vm/nope",
    );
    assert_error(&raw(s, "GET", "/", None, b""), 404, "no endpoint");
    assert_error(
        &raw(s, "GET", "/api/v1/vm/info/", None, b""),
        404,
        "no endpoint",
    );
    let r = raw(s, "POST", "/api/v1/vm/boot", None, b"");
    assert_error(&r, 405, "use PUT");
    assert_eq!(r.headers.get("allow").map(String::as_str), Some("PUT"));
    let r = raw(s, "PUT", "/api/v1/vm/info", None, b"");
    assert_error(&r, 405, "use GET");
    assert_eq!(r.headers.get("allow").map(String::as_str), Some("GET"));
    assert_error(
        &raw(s, "DELETE", "/api/v1/vmm/ping", None, b""),
        405,
        "DELETE",
    );
    assert_error(
        &raw(s, "PUT", create, Some("text/plain"), b"{}"),
        415,
        "text/plain",
    );
    assert_error(
        &raw(
            s,
            "PUT",
            create,
            Some("application/x-www-form-urlencoded"),
            b"kernel=x",
        ),
        415,
        "application/json",
    );
    let r = raw(
        s,
        "PUT",
        "/api/v1/vm/pause",
        Some("application/json; charset=utf-8"),
        b"",
    );
    assert_eq!(r.status, 204, "{r:?}");

    // Still serving after all of that.
    assert_eq!(srv.client().ping().unwrap().api, "v1");
}

#[test]
fn vmm_errors_map_to_statuses_and_a_panic_is_a_500() {
    let srv = Served::new(Arc::new(Broken), ServerOptions::default());
    let c = srv.client();
    let kernel = srv.scratch.kernel();
    let e = c.create(&config(&kernel)).unwrap_err();
    assert_eq!(api_status(e), 500);
    let r = put_json(
        &srv.sock,
        "/api/v1/vm/create",
        &format!(r#"{{"kernel":"{}"}}"#, kernel.display()),
    );
    assert_error(&r, 500, "KVM_CREATE_VM: out of memory");
    assert_error(
        &raw(&srv.sock, "PUT", "/api/v1/vm/boot", None, b""),
        500,
        "panic",
    );
    assert_eq!(api_status(c.shutdown(None).unwrap_err()), 400);
    assert_eq!(api_status(c.reboot().unwrap_err()), 500);
    assert_eq!(api_status(c.pause().unwrap_err()), 409);
    c.resume().unwrap();
    c.ping().unwrap();
}

#[test]
fn client_reports_a_missing_server() {
    let scratch = Scratch::new("nosrv");
    let e = Client::new(scratch.path("none.sock")).ping().unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    assert!(e.status().is_none());
}

#[test]
fn async_client_works_inside_a_runtime() {
    let srv = Served::new(Arc::new(AlwaysOk), ServerOptions::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c = vmm_api::client::Client::new(&srv.sock);
    let (ping, info) = rt.block_on(async { tokio::join!(c.ping(), c.info()) });
    assert_eq!(ping.unwrap().api, "v1");
    assert_eq!(info.unwrap().state, VmState::NotCreated);
}

/// Sends the head of a request declaring `declared` body bytes, then writes body bytes from
/// another thread until the server stops taking them; returns the response and how many body
/// bytes got written.
fn oversized(sock: &Path, head: String, chunked: bool) -> (Option<Reply>, Duration, usize) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let chunk = vec![b' '; 64 << 10];
        let mut sent = 0usize;
        while sent < 100 << 20 {
            let ok = if chunked {
                writer
                    .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .and_then(|()| writer.write_all(&chunk))
                    .and_then(|()| writer.write_all(b"\r\n"))
            } else {
                writer.write_all(&chunk)
            };
            if ok.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let start = Instant::now();
    let reply = read_reply(&mut s, Duration::from_secs(20));
    let took = start.elapsed();
    // Closing our end too unblocks a writer that the server left waiting.
    let _ = s.shutdown(std::net::Shutdown::Both);
    let sent = sender.join().unwrap();
    (reply, took, sent)
}

#[test]
fn a_100_mb_body_is_refused_without_being_read() {
    let srv = Served::new(Arc::new(AlwaysOk), ServerOptions::default());
    let head = "PUT /api/v1/vm/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 104857600\r\n\r\n"
        .to_string();
    let (reply, took, sent) = oversized(&srv.sock, head, false);
    let reply = reply.expect("a 413 before the connection closes");
    assert_error(&reply, 413, "larger than the limit of 1048576 bytes");
    assert_eq!(
        reply.headers.get("connection").map(String::as_str),
        Some("close")
    );
    assert!(took < Duration::from_secs(5), "413 took {took:?}");
    assert!(
        sent < 50 << 20,
        "the server took {sent} bytes of a refused body"
    );

    // Without a declared length, the limit stops the read.
    let head = "PUT /api/v1/vm/snapshot HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        .to_string();
    let (reply, took, sent) = oversized(&srv.sock, head, true);
    assert_error(&reply.expect("a 413"), 413, "larger than the limit");
    assert!(took < Duration::from_secs(5), "413 took {took:?}");
    assert!(
        sent < 50 << 20,
        "the server took {sent} bytes of a refused body"
    );

    srv.client().ping().unwrap();
}

#[test]
fn slow_clients_are_cut_off_and_do_not_block_others() {
    let t = Duration::from_millis(1000);
    let options = ServerOptions {
        header_timeout: t,
        body_timeout: t,
        ..ServerOptions::default()
    };
    let srv = Served::new(Arc::new(AlwaysOk), options);
    let sock = &srv.sock;
    let start = Instant::now();

    // Connects and sends nothing.
    let mut idle = UnixStream::connect(sock).unwrap();
    // Sends half a request head.
    let mut half_head = UnixStream::connect(sock).unwrap();
    half_head
        .write_all(b"PUT /api/v1/vm/boot HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // Sends its head and 10 of 100 body bytes.
    let mut half_body = UnixStream::connect(sock).unwrap();
    half_body
        .write_all(b"PUT /api/v1/vm/shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"timeout_")
        .unwrap();

    // Meanwhile everyone else is served.
    let c = srv.client();
    for _ in 0..5 {
        c.ping().unwrap();
        c.info().unwrap();
    }
    assert!(
        start.elapsed() < t,
        "other clients waited for the slow ones ({:?})",
        start.elapsed()
    );

    // Then the slow ones are cut off: EOF, or a 408 for the one whose body is late.
    assert!(read_reply(&mut idle, Duration::from_secs(10)).is_none_or(|r| r.status == 408));
    assert!(
        start.elapsed() >= t.mul_f32(0.9),
        "closed before the timeout"
    );
    assert!(read_reply(&mut half_head, Duration::from_secs(10)).is_none_or(|r| r.status >= 400));
    let r = read_reply(&mut half_body, Duration::from_secs(10)).expect("a 408");
    assert_error(&r, 408, "did not arrive within 1000 ms");
    assert_eq!(
        r.headers.get("connection").map(String::as_str),
        Some("close")
    );
    assert!(start.elapsed() < Duration::from_secs(10));

    // A kept-alive connection that goes quiet after a request is closed too.
    let mut kept = UnixStream::connect(sock).unwrap();
    kept.write_all(b"GET /api/v1/vmm/ping HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(
        read_reply(&mut kept, Duration::from_secs(10))
            .unwrap()
            .status,
        200
    );
    let quiet = Instant::now();
    assert!(read_reply(&mut kept, Duration::from_secs(10)).is_none());
    assert!(quiet.elapsed() >= t.mul_f32(0.9));

    c.ping().unwrap();
}

#[test]
fn fifty_concurrent_clients() {
    let mock = Arc::new(Mock::default());
    let srv = Served::new(mock, ServerOptions::default());
    let kernel = srv.scratch.kernel();
    let n = 50;
    let barrier = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let barrier = Arc::clone(&barrier);
            let c = srv.client();
            let sock = srv.sock.clone();
            let cfg = config(&kernel);
            std::thread::spawn(move || {
                // Each holds a connection open while the others run.
                let mut held = UnixStream::connect(&sock).unwrap();
                barrier.wait();
                for _ in 0..5 {
                    assert_eq!(c.ping().unwrap().api, "v1");
                    c.info().unwrap();
                    c.create(&cfg).unwrap();
                    let r = put_json(&sock, "/api/v1/vm/create", "{");
                    assert_eq!(r.status, 400);
                }
                held.write_all(
                    b"GET /api/v1/vmm/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                )
                .unwrap();
                assert_eq!(
                    read_reply(&mut held, Duration::from_secs(30))
                        .unwrap()
                        .status,
                    200,
                    "client {i}"
                );
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(srv.client().info().unwrap().state, VmState::Created);
}

// ---------------------------------------------------------------------------------------------
// Random bodies

/// xorshift64*: a reproducible stream without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const FIELDS: &[&str] = &[
    "kernel",
    "initramfs",
    "cmdline",
    "cpus",
    "memory",
    "serial",
    "disks",
    "firmware",
    "nets",
    "vsock",
    "path",
    "format",
    "readonly",
    "direct",
    "timeout_ms",
    "destination_dir",
    "source_dir",
    "resume",
    "tap",
    "mac",
    "cid",
    "socket",
    "",
    "kernel ",
    "KERNEL",
    "x\u{0}y",
];

fn random_string(rng: &mut Rng, kernel: &str) -> String {
    let words = [
        kernel,
        "",
        "512M",
        "1G",
        "0",
        "-1",
        "4k",
        "stdout",
        "off",
        "file:",
        "file:/tmp/x",
        "raw",
        "qcow2",
        "vmdk",
        "/",
        "/nonexistent",
        "\u{0}",
        "é",
        "🦀",
        "99999999999999999999T",
        "path=a",
        "\\",
        "\"",
    ];
    if rng.chance(70) {
        return rng.pick(&words).to_string();
    }
    let len = rng.below(40);
    (0..len)
        .map(|_| char::from_u32(rng.below(0x3000) as u32).unwrap_or('?'))
        .collect()
}

fn random_json(rng: &mut Rng, depth: usize, kernel: &str) -> serde_json::Value {
    use serde_json::Value;
    let leaf = depth >= 3 || rng.chance(50);
    match rng.below(if leaf { 5 } else { 7 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.chance(50)),
        2 => {
            let n = [
                0i64,
                1,
                -1,
                2,
                254,
                255,
                256,
                4096,
                1 << 20,
                512 << 20,
                i64::MAX,
                i64::MIN,
            ];
            if rng.chance(80) {
                Value::from(*rng.pick(&n))
            } else {
                serde_json::Number::from_f64(rng.next() as f64 / 7.0)
                    .map_or(Value::Null, Value::Number)
            }
        }
        3 => Value::from(u64::MAX - rng.below(3) as u64),
        4 => Value::String(random_string(rng, kernel)),
        5 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_json(rng, depth + 1, kernel))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.below(5))
                .map(|_| {
                    (
                        rng.pick(FIELDS).to_string(),
                        random_json(rng, depth + 1, kernel),
                    )
                })
                .collect(),
        ),
    }
}

/// A valid body of the route, then maybe mutated.
fn near_valid(rng: &mut Rng, path: &str, kernel: &str) -> serde_json::Value {
    let mut v = match path {
        "/api/v1/vm/create" => serde_json::json!({
            "kernel": kernel, "cpus": 1, "memory": "128M", "serial": "off",
            "disks": [{"path": kernel, "format": "raw", "readonly": true}],
        }),
        "/api/v1/vm/shutdown" => serde_json::json!({"timeout_ms": 100}),
        "/api/v1/vm/snapshot" => serde_json::json!({"destination_dir": "/tmp/snap"}),
        "/api/v1/vm/restore" => serde_json::json!({"source_dir": "/tmp/snap", "resume": true}),
        _ => serde_json::json!({}),
    };
    for _ in 0..rng.below(3) {
        let key = rng.pick(FIELDS).to_string();
        let value = random_json(rng, 1, kernel);
        let obj = v.as_object_mut().unwrap();
        match rng.below(3) {
            0 => {
                obj.remove(&key);
            }
            1 => {
                obj.insert(key, value);
            }
            _ => {
                if let Some(disks) = obj.get_mut("disks").and_then(|d| d.as_array_mut()) {
                    if let Some(d) = disks.first_mut().and_then(|d| d.as_object_mut()) {
                        d.insert(key, value);
                    }
                }
            }
        }
    }
    v
}

fn random_body(rng: &mut Rng, path: &str, kernel: &str) -> Vec<u8> {
    match rng.below(6) {
        0 => Vec::new(),
        1 => (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
        2 => random_json(rng, 0, kernel).to_string().into_bytes(),
        3 => {
            let mut b = near_valid(rng, path, kernel).to_string().into_bytes();
            b.truncate(rng.below(b.len() + 1));
            b
        }
        _ => near_valid(rng, path, kernel).to_string().into_bytes(),
    }
}

#[test]
fn random_bodies_never_break_the_server() {
    let seed: u64 = std::env::var("LIGHTBYTE_API_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1b7e);
    let iterations: usize = std::env::var("LIGHTBYTE_API_FUZZ_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    let srv = Served::new(Arc::new(AlwaysOk), ServerOptions::default());
    let kernel = srv.scratch.kernel();
    let k = kernel.to_str().unwrap();
    let c = srv.client();
    let mut rng = Rng(seed | 1);
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for i in 0..iterations {
        let route = rng.pick(ROUTES);
        let method = if rng.chance(90) {
            route.method.as_str()
        } else {
            *rng.pick(&["GET", "PUT", "POST", "DELETE", "PATCH"])
        };
        let path = if rng.chance(95) {
            route.path.to_string()
        } else {
            format!(
                "{}{}",
                route.path,
                rng.pick(&["/", "x", "?a=b", "/../info"])
            )
        };
        let content_type = *rng.pick(&[
            None,
            None,
            None,
            Some("application/json"),
            Some("application/json; charset=utf-8"),
            Some("text/plain"),
        ]);
        let body = random_body(&mut rng, route.path, k);
        let r = raw(&srv.sock, method, &path, content_type, &body);
        let ctx = || {
            format!(
                "seed {seed} iteration {i}: {method} {path} {content_type:?} {:?} -> {r:?}",
                String::from_utf8_lossy(&body)
            )
        };
        assert!(
            [200, 204, 400, 404, 405, 415].contains(&r.status),
            "{}",
            ctx()
        );
        if r.status >= 400 {
            assert!(!r.error().is_empty(), "{}", ctx());
        }
        *statuses.entry(r.status).or_default() += 1;
        if i % 100 == 0 {
            c.ping().unwrap();
        }
    }
    c.ping().unwrap();
    // The generator reaches both the accepting and the refusing paths.
    for status in [200, 204, 400] {
        assert!(
            statuses.get(&status).copied().unwrap_or(0) > iterations / 50,
            "too few {status}: {statuses:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The vmm binary

/// A `vmm` process, killed when dropped.
struct Vmm {
    child: Child,
}

impl Vmm {
    fn spawn(args: &[&str]) -> Vmm {
        let child = Command::new(binary("vmm").unwrap())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Vmm { child }
    }

    /// Waits until the API at `sock` answers.
    fn wait_ready(&mut self, sock: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let c = Client::new(sock);
        while c.ping().is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("vmm exited before serving: {status}");
            }
            assert!(Instant::now() < deadline, "vmm's API did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signum: i32) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        let rc = unsafe { libc::kill(self.child.id() as i32, signum) };
        assert_eq!(rc, 0);
    }

    fn wait(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut stderr = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                return (status, stderr);
            }
            assert!(Instant::now() < deadline, "vmm did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

fn run_vmm(args: &[&str]) -> (i32, String) {
    let out = Command::new(binary("vmm").unwrap())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn vmm_binary_waits_for_the_api_and_cleans_up() {
    let scratch = Scratch::new("bin");
    let sock = scratch.path("vm.sock");
    let s = sock.to_str().unwrap();
    let kernel = scratch.kernel();
    let mut vmm = Vmm::spawn(&["--api-socket", s]);
    vmm.wait_ready(&sock);
    let c = Client::new(&sock).with_timeout(Duration::from_secs(30));

    let ping = c.ping().unwrap();
    assert_eq!(ping.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(ping.pid, vmm.child.id());
    let mode = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    assert_eq!(c.info().unwrap().state, VmState::NotCreated);
    assert_eq!(api_status(c.boot().unwrap_err()), 409);
    assert_error(
        &put_json(
            &sock,
            "/api/v1/vm/create",
            r#"{"kernel":"/nonexistent/vmlinux"}"#,
        ),
        400,
        "no such file",
    );
    c.create(&config(&kernel)).unwrap();
    let info = c.info().unwrap();
    assert_eq!(info.state, VmState::Created);
    assert_eq!(info.config.unwrap().kernel, kernel);
    // The "kernel" is a text file: refused when loaded, before any guest runs.
    let e = c.boot().unwrap_err();
    assert_eq!(api_status(e), 400);
    assert_eq!(c.info().unwrap().state, VmState::Created);

    // A second vmm on the same socket is refused and leaves it alone.
    let (code, stderr) = run_vmm(&["--api-socket", s]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("another process is serving on it"),
        "{stderr}"
    );
    c.ping().unwrap();

    vmm.signal(libc::SIGTERM);
    let (status, stderr) = vmm.wait(Duration::from_secs(10));
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!sock.exists(), "the socket file outlived the vmm");
}

#[test]
fn vmm_binary_socket_path_rules() {
    let scratch = Scratch::new("binpath");

    // Not a socket: refused, untouched.
    let file = scratch.path("plain");
    std::fs::write(&file, "keep me").unwrap();
    let (code, stderr) = run_vmm(&["--api-socket", file.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    // A stale socket (its server gone) is replaced.
    let sock = scratch.path("stale.sock");
    drop(UnixListener::bind(&sock).unwrap());
    assert!(is_socket(&sock));
    let mut vmm = Vmm::spawn(&["--api-socket", sock.to_str().unwrap()]);
    vmm.wait_ready(&sock);
    vmm.signal(libc::SIGINT);
    let (status, _) = vmm.wait(Duration::from_secs(10));
    assert_eq!(status.signal(), Some(libc::SIGINT));
    assert!(!sock.exists());

    // Boot flags and the API together: a bad kernel ends the vmm with 2, socket removed.
    let kernel = scratch.kernel();
    let sock = scratch.path("flags.sock");
    let (code, stderr) = run_vmm(&[
        "--api-socket",
        sock.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not a Linux kernel"), "{stderr}");
    assert!(!sock.exists());

    // VM flags need --kernel even with --api-socket.
    let (code, stderr) = run_vmm(&["--api-socket", sock.to_str().unwrap(), "--cpus", "2"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--kernel"), "{stderr}");
    assert!(!sock.exists());
}
