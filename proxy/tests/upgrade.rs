//! The `lightbyte-proxy` binary: pushes from the command line, a binary upgrade under load with
//! no refused connection, and SIGTERM draining requests in flight.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_addr, get, load, Backend, Outcome};

const BIN: &str = env!("CARGO_BIN_EXE_lightbyte-proxy");

/// A proxy process that is killed when the test ends, however it ends: one left running by a
/// failed test holds the test runner's output open, and the whole suite waits on it.
struct Proc(Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn start(control: &Path, takeover: bool) -> Proc {
    let mut c = Command::new(BIN);
    c.arg("run")
        .arg("--control")
        .arg(control)
        .args(["--threads", "2"]);
    if takeover {
        c.arg("--takeover");
    }
    Proc(c.stdout(Stdio::null()).spawn().unwrap())
}

async fn wait_socket(control: &Path) {
    let t = Instant::now();
    while ctl(control, &["status"]).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the proxy did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `lightbyte-proxy SUBCOMMAND --control ...`: its stdout, or its stderr as the error.
fn ctl(control: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(BIN)
        .arg(args[0])
        .arg("--control")
        .arg(control)
        .args(&args[1..])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

fn write_config(
    dir: &Path,
    revision: u64,
    listen: std::net::SocketAddr,
    backends: &[&Backend],
) -> String {
    let path = dir.join(format!("config-{revision}.json"));
    let list: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    std::fs::write(
        &path,
        format!(
            r#"{{"revision": {revision}, "balancers": [{{"name": "web", "listen": "{listen}",
               "backends": [{}], "drain_grace_secs": 5,
               "health": {{"kind": "http", "path": "/", "interval_ms": 300}}}}]}}"#,
            list.join(",")
        ),
    )
    .unwrap();
    path.to_string_lossy().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_load_refuses_no_connection() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("proxy.sock");
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let listen = free_addr();
    let mut old = start(&control, false);
    wait_socket(&control).await;
    let file = write_config(dir.path(), 1, listen, &[&b1, &b2]);
    assert_eq!(
        ctl(&control, &["apply", &file]).unwrap().trim(),
        "applied revision 1"
    );
    // A refused push from the command line: stale, and not JSON.
    let stale = ctl(&control, &["apply", &file]).unwrap_err();
    assert!(stale.contains("Stale"), "{stale}");
    std::fs::write(
        dir.path().join("bad.json"),
        "{\"revision\": 2, \"balancers\": [{\"name\": 1}]}",
    )
    .unwrap();
    let bad = dir.path().join("bad.json");
    assert!(ctl(&control, &["apply", bad.to_str().unwrap()]).is_err());

    let stop = Arc::new(AtomicBool::new(false));
    let client = load(listen, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut new = start(&control, true);
    // The old binary drains and exits on its own.
    let t = Instant::now();
    let status = loop {
        if let Some(s) = old.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the old binary did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let outcomes = client.await.unwrap();
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|(_, o)| !matches!(o, Outcome::Ok(_)))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(outcomes.len() > 20, "only {} requests", outcomes.len());
    // The new binary has the configuration and serves.
    let s = ctl(&control, &["status"]).unwrap();
    assert!(s.contains("\"revision\":1"), "{s}");
    assert!(matches!(get(listen, "/").await, Outcome::Ok(_)));
    // It refuses the stale push as the old one did, and takes a newer one.
    assert!(ctl(&control, &["apply", &file]).is_err());
    let file2 = write_config(dir.path(), 2, listen, &[&b2]);
    assert_eq!(
        ctl(&control, &["apply", &file2]).unwrap().trim(),
        "applied revision 2"
    );
    assert_eq!(get(listen, "/").await, Outcome::Ok("b2".into()));
    let _ = ctl(&control, &["stop"]);
    let _ = new.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("proxy.sock");
    let b1 = Backend::start("b1").await;
    let listen = free_addr();
    let mut proxy = start(&control, false);
    wait_socket(&control).await;
    let file = write_config(dir.path(), 1, listen, &[&b1]);
    ctl(&control, &["apply", &file]).unwrap();
    let slow = tokio::spawn(async move { get(listen, "/slow").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(proxy.id() as i32, libc::SIGTERM) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(listen, "/").await, Outcome::Refused);
    assert_eq!(slow.await.unwrap(), Outcome::Ok("b1".into()));
    let status = proxy.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
