//! The HTTP API and the CLI against a real etcd: CRUD for every kind, validation, optimistic
//! concurrency, and etcd outages.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{control_plane, http, http_async, Etcd};

/// Keys of resources in etcd (the control plane's `_` bookkeeping left out).
async fn resource_keys(etcd: &Etcd) -> Vec<String> {
    let mut raw = etcd.client().await;
    let opts = etcd_client::GetOptions::new()
        .with_prefix()
        .with_keys_only();
    let resp = raw.get("/lightbyte/", Some(opts)).await.unwrap();
    resp.kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .filter(|k| !k.starts_with("/lightbyte/_"))
        .collect()
}

fn rv(obj: &Value) -> i64 {
    obj["metadata"]["resource_version"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_for_every_kind() {
    let etcd = Etcd::start();
    let plane = control_plane(&etcd, "cp").await;
    let addr = plane.addr();
    let call = |method: &'static str, path: String, body: Option<Value>| async move {
        let body = body.map(|b| b.to_string());
        http_async(addr, method, &path, body.as_deref()).await
    };

    // Image: create, get, list, update with the current version, refuse a stale one.
    let (s, image) = call(
        "POST",
        "/api/v1/images".into(),
        Some(json!({"metadata": {"name": "base"}, "spec": {"path": "/img/base.qcow2"}})),
    )
    .await;
    assert_eq!(s, 201, "{image}");
    assert_eq!(image["metadata"]["generation"], 1);
    assert_eq!(image["spec"]["format"], "qcow2");
    assert!(!image["metadata"]["uid"].as_str().unwrap().is_empty());
    let (s, got) = call("GET", "/api/v1/images/base".into(), None).await;
    assert_eq!((s, &got), (200, &image));
    let (s, list) = call("GET", "/api/v1/images".into(), None).await;
    assert_eq!(s, 200);
    assert_eq!(list["items"], json!([image]));

    let mut edited = image.clone();
    edited["spec"]["size"] = json!("2G");
    let (s, updated) = call("PUT", "/api/v1/images/base".into(), Some(edited.clone())).await;
    assert_eq!(s, 200, "{updated}");
    assert_eq!(updated["metadata"]["generation"], 2);
    assert_eq!(updated["spec"]["size"], "2G");
    assert!(rv(&updated) > rv(&image));
    // The same edit again, from the version it was based on: someone (we) changed it since.
    edited["spec"]["size"] = json!("3G");
    let (s, err) = call("PUT", "/api/v1/images/base".into(), Some(edited.clone())).await;
    assert_eq!(s, 409, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("was modified"),
        "{err}"
    );
    let (_, now) = call("GET", "/api/v1/images/base".into(), None).await;
    assert_eq!(now, updated);

    // Volume and VM, which name other objects.
    let (s, vol) = call(
        "POST",
        "/api/v1/volumes".into(),
        Some(json!({"metadata": {"name": "data"}, "spec": {"image": "base", "size": "10G"}})),
    )
    .await;
    assert_eq!(s, 201, "{vol}");
    let (s, vm) = call(
        "POST",
        "/api/v1/vms".into(),
        Some(json!({
            "metadata": {"name": "web-1"},
            "spec": {"cpus": 2, "memory": "512M", "image": "base", "volumes": ["data"]},
            // Clients cannot write status: it is ignored.
            "status": {"state": "Running", "placement": "w9"}
        })),
    )
    .await;
    assert_eq!(s, 201, "{vm}");
    assert_eq!(vm["spec"]["memory"], "512M");
    assert_eq!(vm["spec"]["network"], "default");
    assert_eq!(vm["status"], json!({"state": "Pending"}));

    let (s, err) = call("DELETE", "/api/v1/images/base".into(), None).await;
    assert_eq!(s, 409, "{err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("in use by vm \"web-1\""),
        "{err}"
    );
    let (s, err) = call("DELETE", "/api/v1/volumes/data".into(), None).await;
    assert_eq!(s, 409, "{err}");

    // Worker: an operator drains it with a PUT; the status stays the controllers'.
    let (s, w) = call(
        "POST",
        "/api/v1/workers".into(),
        Some(json!({"metadata": {"name": "w1"},
                    "spec": {"capacity": {"cpus": 8, "memory": "16G"}, "labels": {"zone": "a"}}})),
    )
    .await;
    assert_eq!(s, 201, "{w}");
    // Status writes move the resource version too: read after worker-health has judged it
    // (no heartbeat: NotReady), or the PUT below would rightly conflict.
    let w = settled(addr, "/api/v1/workers/w1").await;
    let mut drained = w.clone();
    drained["spec"]["drain"] = json!(true);
    drained["status"] = json!({"state": "Ready"});
    let (s, w2) = call("PUT", "/api/v1/workers/w1".into(), Some(drained)).await;
    assert_eq!(s, 200, "{w2}");
    assert_eq!(w2["spec"]["drain"], true);
    assert_eq!(w2["status"], w["status"]);

    // Delete: a stale version conflicts, the current one deletes, then it is gone. (The
    // scheduler has said why it cannot place the VM first.)
    let vm = settled(addr, "/api/v1/vms/web-1").await;
    let stale = rv(&vm) - 1;
    let (s, _) = call(
        "DELETE",
        format!("/api/v1/vms/web-1?resource_version={stale}"),
        None,
    )
    .await;
    assert_eq!(s, 409);
    let (s, deleted) = call(
        "DELETE",
        format!("/api/v1/vms/web-1?resource_version={}", rv(&vm)),
        None,
    )
    .await;
    assert_eq!(s, 200, "{deleted}");
    assert_eq!(deleted["metadata"]["name"], "web-1");
    let (s, err) = call("GET", "/api/v1/vms/web-1".into(), None).await;
    assert_eq!(s, 404);
    assert_eq!(err["error"], "vm \"web-1\" not found");
    let (s, _) = call("DELETE", "/api/v1/vms/web-1".into(), None).await;
    assert_eq!(s, 404);
    for path in [
        "/api/v1/volumes/data",
        "/api/v1/images/base",
        "/api/v1/workers/w1",
    ] {
        let (s, body) = call("DELETE", path.into(), None).await;
        assert_eq!(s, 200, "{path}: {body}");
    }
    assert_eq!(resource_keys(&etcd).await, Vec::<String>::new());
}

/// The object at `path` once a controller has written a status message on it.
async fn settled(addr: std::net::SocketAddr, path: &str) -> Value {
    common::eventually(
        "a controller to write status",
        Duration::from_secs(30),
        || async {
            let (_, obj) = http_async(addr, "GET", path, None).await;
            obj["status"]["message"].is_string().then_some(obj)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_is_refused_and_nothing_is_written() {
    let etcd = Etcd::start();
    let plane = control_plane(&etcd, "cp").await;
    let addr = plane.addr();
    let post = |path: &'static str, body: Value| async move {
        http_async(addr, "POST", path, Some(&body.to_string())).await
    };
    let (s, _) = post(
        "/api/v1/images",
        json!({"metadata": {"name": "base"}, "spec": {"path": "/img/base.qcow2"}}),
    )
    .await;
    assert_eq!(s, 201);
    let before = resource_keys(&etcd).await;

    let vm = |spec: Value| json!({"metadata": {"name": "web-1"}, "spec": spec});
    let named = |name: &str| json!({"metadata": {"name": name}, "spec": {"cpus": 1, "memory": "64M", "image": "base"}});
    // (path, body, status, field)
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "/api/v1/vms",
            vm(json!({"cpus": "two", "memory": "64M", "image": "base"})),
            400,
            "spec.cpus",
        ),
        (
            "/api/v1/vms",
            vm(json!({"cpu": 1, "memory": "64M", "image": "base"})),
            400,
            "spec.cpu",
        ),
        (
            "/api/v1/vms",
            vm(json!({"cpus": 1, "memory": "64M"})),
            400,
            "spec",
        ),
        (
            "/api/v1/vms",
            vm(json!({"cpus": 1, "memory": "lots", "image": "base"})),
            400,
            "spec.memory",
        ),
        (
            "/api/v1/vms",
            vm(json!({"cpus": 0, "memory": "64M", "image": "base"})),
            422,
            "spec.cpus",
        ),
        (
            "/api/v1/vms",
            vm(json!({"cpus": 255, "memory": "64M", "image": "base"})),
            422,
            "spec.cpus",
        ),
        (
            "/api/v1/vms",
            vm(json!({"cpus": 1, "memory": "32M", "image": "base"})),
            422,
            "spec.memory",
        ),
        (
            "/api/v1/vms",
            vm(json!({"cpus": 1, "memory": "64M", "image": "nope"})),
            422,
            "spec.image",
        ),
        (
            "/api/v1/vms",
            vm(json!({"cpus": 1, "memory": "64M", "image": "base", "volumes": ["gone"]})),
            422,
            "spec.volumes[0]",
        ),
        ("/api/v1/vms", named("Web_1"), 422, "metadata.name"),
        ("/api/v1/vms", named(""), 422, "metadata.name"),
        ("/api/v1/vms", named(&"x".repeat(64)), 422, "metadata.name"),
        ("/api/v1/vms", named("base"), 201, ""),
        ("/api/v1/vms", named("base"), 409, ""),
        (
            "/api/v1/images",
            json!({"metadata": {"name": "i"}, "spec": {"path": "rel/x.img"}}),
            422,
            "spec.path",
        ),
        (
            "/api/v1/images",
            json!({"metadata": {"name": "i"}, "spec": {"path": "/x", "format": "vmdk"}}),
            400,
            "spec.format",
        ),
        (
            "/api/v1/volumes",
            json!({"metadata": {"name": "v"}, "spec": {"image": "base", "size": 0}}),
            422,
            "spec.size",
        ),
        (
            "/api/v1/workers",
            json!({"metadata": {"name": "w"}, "spec": {"capacity": {"cpus": 0, "memory": "1G"}}}),
            422,
            "spec.capacity.cpus",
        ),
        ("/api/v1/things", json!({}), 404, ""),
    ];
    for (path, body, status, field) in cases {
        let (s, resp) = post(path, body.clone()).await;
        assert_eq!(s, status, "POST {path} {body}: {resp}");
        if s >= 400 {
            assert!(resp["error"].is_string(), "{resp}");
        }
        if !field.is_empty() {
            assert_eq!(resp["field"], field, "POST {path} {body}: {resp}");
            assert!(resp["error"].as_str().unwrap().starts_with(field), "{resp}");
        }
    }
    // Raw bodies and URLs.
    let raw: Vec<(&str, &str, Option<String>, u16)> = vec![
        ("POST", "/api/v1/vms", Some("{not json".into()), 400),
        ("POST", "/api/v1/vms", Some("x".repeat(2 << 20)), 413),
        // Refused long before it is sent whole: the client's writes fail, the answer stands.
        ("POST", "/api/v1/vms", Some("x".repeat(32 << 20)), 413),
        ("GET", "/api/v1/vms/Bad%20Name", None, 400),
        ("GET", "/api/v1/vms/%FF", None, 400),
        ("GET", "/api/v1/vms/a%2Fb", None, 400),
        ("DELETE", "/api/v1/vms/base?resource_version=abc", None, 400),
        ("DELETE", "/api/v1/vms/base?force=1", None, 400),
        ("PATCH", "/api/v1/vms/base", Some("{}".into()), 405),
        ("PUT", "/api/v1/vms/base", Some(named("other").to_string()), 400),
        ("PUT", "/api/v1/vms/base", Some(named("base").to_string()), 400),
        ("PUT", "/api/v1/vms/nope", Some(json!({"metadata": {"name": "nope", "resource_version": 5}, "spec": {"cpus": 1, "memory": "64M", "image": "base"}}).to_string()), 404),
    ];
    for (method, path, body, status) in raw {
        let (s, resp) = http_async(addr, method, path, body.as_deref()).await;
        assert_eq!(s, status, "{method} {path}: {resp}");
        assert!(resp["error"].is_string(), "{method} {path}: {resp}");
    }
    let mut after = before.clone();
    after.push("/lightbyte/vm/base".into());
    assert_eq!(resource_keys(&etcd).await, after);
}

/// `lightbyte server` as a child process, killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(etcd: &Etcd) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lightbyte"));
        let mut child = common::client_env(&mut cmd)
            // Images by path: these tests are about the CLI and the API, not the image store.
            .args([
                "server",
                "--etcd",
                &etcd.url(),
                "--listen",
                "127.0.0.1:0",
                "--allow-host-path",
                "--tokens",
                &common::tokens_file().display().to_string(),
            ])
            .args(["--lease-ttl", "2s", "--etcd-timeout", "2s"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("lightbyte server");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .expect("server stderr");
            if let Some(url) = line.strip_prefix("lightbyte server listening on ") {
                break url.to_string();
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs the CLI with `LIGHTBYTE_SERVER` set to `server`.
fn cli(server: &str, args: &[&str]) -> Run {
    let start = Instant::now();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lightbyte"));
    let out = common::client_env(&mut cmd)
        .args(args)
        .env("LIGHTBYTE_SERVER", server)
        .stdin(Stdio::null())
        .output()
        .expect("lightbyte");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: start.elapsed(),
    }
}

#[test]
fn cli_round_trip() {
    let etcd = Etcd::start();
    let server = Server::start(&etcd);
    let ok = |args: &[&str]| {
        let r = cli(&server.url, args);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
        r.stdout
    };
    assert_eq!(
        ok(&["image", "add", "base", "--path", "/img/base.qcow2"]),
        "image/base added\n"
    );
    assert_eq!(
        ok(&[
            "image",
            "add",
            "raw1",
            "--path",
            "/img/raw.img",
            "--format",
            "raw",
            "--size",
            "1G"
        ]),
        "image/raw1 added\n"
    );
    let images = ok(&["image", "list"]);
    assert_eq!(
        images,
        "NAME   FORMAT   SIZE   SOURCE\n\
         base   qcow2    -      /img/base.qcow2\n\
         raw1   raw      1G     /img/raw.img\n"
    );
    assert_eq!(
        ok(&["vm", "create", "web-1", "--image", "base", "--cpus", "2", "--memory", "512M"]),
        "vm/web-1 created\n"
    );
    let list = ok(&["vm", "list"]);
    let mut lines = list.lines();
    assert!(lines.next().unwrap().starts_with("NAME    STATE"), "{list}");
    assert!(lines.next().unwrap().starts_with("web-1"), "{list}");
    let json: Value = serde_json::from_str(&ok(&["vm", "list", "-o", "json"])).unwrap();
    assert_eq!(json[0]["metadata"]["name"], "web-1");
    assert_eq!(json[0]["spec"]["cpus"], 2);
    assert_eq!(json[0]["spec"]["memory"], "512M");
    let one: Value = serde_json::from_str(&ok(&["-o", "json", "vm", "get", "web-1"])).unwrap();
    assert_eq!(one["metadata"]["name"], "web-1");
    assert!(ok(&["worker", "list"]).starts_with("NAME   STATE"));

    // A reader that goes away early (`| grep -q`) ends the CLI quietly by SIGPIPE, no panic.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lightbyte"));
    let mut child = common::client_env(&mut cmd)
        .args(["vm", "list", "-o", "json"])
        .env("LIGHTBYTE_SERVER", &server.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    {
        use std::os::unix::process::ExitStatusExt;
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
            "{:?} {stderr}",
            out.status
        );
    }

    // --server wins over the environment.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lightbyte"));
    let bad_env = common::client_env(&mut cmd)
        .args(["--server", &server.url, "vm", "list"])
        .env("LIGHTBYTE_SERVER", "http://127.0.0.1:1")
        .output()
        .unwrap();
    assert!(bad_env.status.success());

    // Errors: the status and the server's message, exit status 1.
    let r = cli(&server.url, &["vm", "create", "web-2", "--image", "nope"]);
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stderr.trim(),
        "error: 422 Unprocessable Entity: spec.image: image \"nope\" not found"
    );
    let r = cli(&server.url, &["vm", "create", "web-1", "--image", "base"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("409 Conflict: vm \"web-1\" already exists"),
        "{}",
        r.stderr
    );
    let r = cli(
        &server.url,
        &[
            "vm", "create", "web-3", "--image", "base", "--memory", "lots",
        ],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = cli(&server.url, &["vm", "get", "missing"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("404 Not Found"), "{}", r.stderr);
    let r = cli("http://127.0.0.1:1", &["vm", "list"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("cannot reach http://127.0.0.1:1"),
        "{}",
        r.stderr
    );

    assert_eq!(ok(&["vm", "delete", "web-1"]), "vm/web-1 deleted\n");
    assert_eq!(
        ok(&["vm", "list"]),
        "NAME   STATE   WORKER   CPUS   MEMORY   IMAGE   IP   MESSAGE\n"
    );
}

#[test]
fn etcd_down_answers_503_within_seconds() {
    let mut etcd = Etcd::start();
    let server = Server::start(&etcd);
    let r = cli(
        &server.url,
        &["image", "add", "base", "--path", "/img/base.qcow2"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let addr = server.url.trim_start_matches("https://").parse().unwrap();

    let (status, _) = http(addr, "GET", "/healthz", None).unwrap();
    assert_eq!(status, 200);

    etcd.stop();
    // A bound on waiting, not a benchmark: the server gives etcd 2 s, so ten is "seconds".
    let bound = Duration::from_secs(10);
    for args in [
        &["vm", "list"][..],
        &["vm", "create", "web-1", "--image", "base"],
        &["image", "list"],
    ] {
        let r = cli(&server.url, args);
        assert_eq!(r.code, 1, "{args:?}: {}", r.stdout);
        assert!(
            r.stderr
                .contains("503 Service Unavailable: etcd unavailable"),
            "{args:?}: {}",
            r.stderr
        );
        assert!(r.took < bound, "{args:?} took {:?}", r.took);
    }
    let start = Instant::now();
    let (status, body) = http(addr, "GET", "/api/v1/images/base", None).unwrap();
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("etcd unavailable"),
        "{body}"
    );
    assert!(start.elapsed() < bound);
    let (status, _) = http(addr, "GET", "/healthz", None).unwrap();
    assert_eq!(status, 503);

    // Back: the same server serves again and nothing was lost or half-written.
    etcd.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let r = cli(&server.url, &["image", "list", "-o", "json"]);
        if r.code == 0 {
            break r.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "server never recovered: {}",
            r.stderr
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let images: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(images.as_array().unwrap().len(), 1);
    assert_eq!(images[0]["metadata"]["name"], "base");
    let r = cli(&server.url, &["vm", "list", "-o", "json"]);
    assert_eq!(r.stdout.trim(), "[]");
}

/// One request with an explicit Content-Type: (status, body).
fn http_typed(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let s = std::net::TcpStream::connect(addr).unwrap();
    let mut s = common::tls_stream(s, addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Authorization: Bearer {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        common::ADMIN_TOKEN,
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    // A TLS peer may close without close_notify once it answered.
    let _ = s.read_to_string(&mut resp);
    let status = resp.split(' ').nth(1).unwrap().parse().unwrap();
    (status, resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_json_bodies_and_deleting_a_busy_worker_are_refused() {
    let etcd = Etcd::start();
    let plane = control_plane(&etcd, "cp").await;
    let addr = plane.addr();
    let image =
        json!({"metadata": {"name": "base"}, "spec": {"path": "/img/base.qcow2"}}).to_string();
    // What a web page can make a browser send anywhere without a preflight: refused, and
    // nothing written.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let body = image.clone();
        let (status, resp) = tokio::task::spawn_blocking(move || {
            http_typed(addr, "POST", "/api/v1/images", ct, &body)
        })
        .await
        .unwrap();
        assert_eq!(status, 415, "{ct}: {resp}");
        assert!(resp.contains("application/json"), "{resp}");
    }
    assert!(resource_keys(&etcd).await.is_empty());
    let body = image.clone();
    let (status, resp) = tokio::task::spawn_blocking(move || {
        http_typed(
            addr,
            "POST",
            "/api/v1/images",
            "application/json; charset=utf-8",
            &body,
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 201, "{resp}");

    // A worker holding a VM: its record is not deleted (its VMs would be Lost) unless forced.
    let store = etcd.store().await;
    let _w1 = common::register(&store, "w1", 4, "1G").await;
    let (s, _) = http_async(
        addr,
        "POST",
        "/api/v1/vms",
        Some(&json!({"metadata": {"name": "web-1"}, "spec": {"cpus": 1, "memory": "64M", "image": "base"}}).to_string()),
    )
    .await;
    assert_eq!(s, 201);
    store
        .update::<orchestrator::model::VmSpec, _>("web-1", |o| {
            o.status.placement = Some("w1".into());
            Ok(())
        })
        .await
        .unwrap();
    // `forgotten` only through the forget action (which checks the heartbeat): a PUT that
    // sets it on a live worker is refused and changes nothing.
    let (s, body) = put_worker_edited(addr, "w1", |w| w["spec"]["forgotten"] = json!(true)).await;
    assert_eq!(s, 422, "{body}");
    assert_eq!(body["field"], "spec.forgotten", "{body}");
    let (_, now) = http_async(addr, "GET", "/api/v1/workers/w1", None).await;
    assert_ne!(now["spec"]["forgotten"], json!(true));
    let (s, body) =
        put_worker_edited(addr, "w1", |w| w["spec"]["labels"] = json!({"rack": "a"})).await;
    assert_eq!(s, 200, "other fields still change: {body}");

    let (s, body) = http_async(addr, "DELETE", "/api/v1/workers/w1", None).await;
    assert_eq!(s, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("web-1"), "{body}");
    let (s, body) = http_async(addr, "DELETE", "/api/v1/workers/w1?force=maybe", None).await;
    assert_eq!(s, 400, "{body}");
    let (s, body) = http_async(addr, "DELETE", "/api/v1/workers/w1?force=true", None).await;
    assert_eq!(s, 200, "{body}");
}

/// PUTs worker `name` as just read with `edit` applied. The worker's heartbeat rewrites its
/// record meanwhile, and a PUT of a copy it outdated gets 409 before anything else is checked, so
/// this reads again until its copy is current.
async fn put_worker_edited(
    addr: std::net::SocketAddr,
    name: &str,
    edit: impl Fn(&mut serde_json::Value),
) -> (u16, serde_json::Value) {
    let path = format!("/api/v1/workers/{name}");
    for _ in 0..20 {
        let (_, mut w) = http_async(addr, "GET", &path, None).await;
        edit(&mut w);
        let (s, body) = http_async(addr, "PUT", &path, Some(&w.to_string())).await;
        if s != 409 {
            return (s, body);
        }
    }
    panic!("worker {name} changed under 20 PUTs in a row");
}

/// Sends `request` raw on a fresh connection and reads until the server closes it or `wait`
/// passes: (what came back, whether the server closed the connection).
fn raw(addr: std::net::SocketAddr, request: &str, wait: Duration) -> (String, bool) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_hosts_silent_clients_and_excess_connections_are_held_off() {
    use orchestrator::server::{ControlPlane, ServerConfig};
    let etcd = Etcd::start();
    let plane = ControlPlane::start(ServerConfig {
        etcd: vec![etcd.url()],
        listen: "127.0.0.1:0".parse().unwrap(),
        also_listen: Vec::new(),
        etcd_timeout: Duration::from_secs(2),
        controllers: common::controller_config("cp"),
        image_dir: None,
        allow_host_path: false,
        limits: orchestrator::serve::Limits {
            max_connections: 2,
            header_timeout: Duration::from_secs(2),
            allowed_hosts: vec!["cp.test".into()],
        },
        // Plain HTTP: these are checks on raw requests.
        auth: orchestrator::auth::Auth::Insecure,
        tls: None,
    })
    .await
    .unwrap();
    let addr = plane.addr();
    tokio::task::spawn_blocking(move || {
        // DNS rebinding: only addresses, localhost and the names the server was given.
        let port = addr.port();
        for (host, want) in [
            (format!("127.0.0.1:{port}"), "HTTP/1.1 200"),
            (format!("localhost:{port}"), "HTTP/1.1 200"),
            (format!("cp.test:{port}"), "HTTP/1.1 200"),
            (format!("evil.example:{port}"), "HTTP/1.1 421"),
            (format!("127.0.0.1.evil.example:{port}"), "HTTP/1.1 421"),
        ] {
            let req = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            let (resp, _) = raw(addr, &req, Duration::from_secs(10));
            assert!(resp.starts_with(want), "{host}: {resp}");
        }

        // Half a request, and nothing at all: both closed at the header deadline.
        for partial in ["GET /api/v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\n", ""] {
            let t = Instant::now();
            let (_, closed) = raw(addr, partial, Duration::from_secs(10));
            assert!(closed, "{partial:?}: still open after 10 s");
            assert!(
                t.elapsed() >= Duration::from_millis(1500),
                "{partial:?}: closed too early"
            );
        }

        // The cap: two silent connections take both slots; a third is not served while they
        // are open, and is served once one of them closes.
        let a = std::net::TcpStream::connect(addr).unwrap();
        let _b = std::net::TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let third = std::thread::spawn(move || {
            let t = Instant::now();
            let req = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
            let (resp, _) = raw(addr, req, Duration::from_secs(10));
            (resp, t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(1000));
        assert!(
            !third.is_finished(),
            "a third connection was served past the cap"
        );
        drop(a);
        let (resp, took) = third.join().unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(took >= Duration::from_millis(1000), "served after {took:?}");
    })
    .await
    .unwrap();
    plane.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_come_in_pages_of_one_snapshot() {
    let etcd = Etcd::start();
    let plane = control_plane(&etcd, "cp").await;
    let addr = plane.addr();
    let image = |name: &str| {
        json!({"metadata": {"name": name}, "spec": {"path": format!("/img/{name}.qcow2")}})
            .to_string()
    };
    for i in 0..7 {
        let (status, _) = http_async(
            addr,
            "POST",
            "/api/v1/images",
            Some(&image(&format!("img-{i}"))),
        )
        .await;
        assert_eq!(status, 201);
    }
    let names = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, first) = http_async(addr, "GET", "/api/v1/images?limit=3", None).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(names(&first), ["img-0", "img-1", "img-2"]);
    let token = first["continue"]
        .as_str()
        .expect("a continue token")
        .to_string();
    // Created between pages: after the snapshot, so in no page of it.
    let (status, _) = http_async(addr, "POST", "/api/v1/images", Some(&image("img-3a"))).await;
    assert_eq!(status, 201);
    let mut seen = names(&first);
    let mut token = Some(token);
    while let Some(t) = token {
        let (status, page) = http_async(
            addr,
            "GET",
            &format!("/api/v1/images?limit=3&continue={t}"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(
            page["resource_version"], first["resource_version"],
            "one snapshot"
        );
        seen.extend(names(&page));
        token = page["continue"].as_str().map(str::to_string);
    }
    assert_eq!(seen, (0..7).map(|i| format!("img-{i}")).collect::<Vec<_>>());
    // Without limit: everything now, the new one included.
    let (_, all) = http_async(addr, "GET", "/api/v1/images", None).await;
    assert_eq!(names(&all).len(), 8);
    assert!(all.get("continue").is_none());
    // Bad queries are 400; a token naming a revision from the future too.
    let future: String = format!("{}/img-1", i64::MAX / 2)
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    for q in [
        "limit=0".to_string(),
        "limit=1001".into(),
        "limit=3&continue=nonsense".into(),
        "continue=00".into(),
        format!("limit=3&continue={future}"),
        "limit=3&order=desc".into(),
    ] {
        let (status, body) = http_async(addr, "GET", &format!("/api/v1/images?{q}"), None).await;
        assert_eq!(status, 400, "{q}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_token_or_beyond_their_role_are_refused_and_change_nothing() {
    use common::{http_as, NODE_TOKEN, VIEWER_TOKEN};
    let etcd = Etcd::start();
    let plane = control_plane(&etcd, "cp").await;
    let addr = plane.addr();
    let image =
        json!({"metadata": {"name": "base"}, "spec": {"path": "/img/base.qcow2"}}).to_string();
    let call = move |token: Option<&'static str>, method: &'static str, path: &'static str| {
        let body = (method != "GET").then(|| image.clone());
        tokio::task::spawn_blocking(move || {
            http_as(token, addr, method, path, body.as_deref()).unwrap()
        })
    };
    let wrong = "not-a-token-of-this-server-000000000000";
    for (token, method, want) in [
        (None, "GET", 401),
        (None, "POST", 401),
        (Some(wrong), "POST", 401),
        (Some(VIEWER_TOKEN), "POST", 403),
        (Some(NODE_TOKEN), "POST", 403),
        (Some(VIEWER_TOKEN), "GET", 200),
        (Some(NODE_TOKEN), "GET", 200),
    ] {
        let (status, body) = call(token, method, "/api/v1/images").await.unwrap();
        assert_eq!(status, want, "{token:?} {method}: {body}");
        if want == 401 {
            assert!(body.contains("error"), "{body}");
        }
    }
    // Nothing was written by any of them.
    assert!(resource_keys(&etcd).await.is_empty());
    let (status, body) = call(Some(VIEWER_TOKEN), "DELETE", "/api/v1/images/base")
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("watcher (viewer) may not DELETE"), "{body}");
    // Liveness needs no token; the admin writes.
    assert_eq!(call(None, "GET", "/healthz").await.unwrap().0, 200);
    assert_eq!(
        call(Some(common::ADMIN_TOKEN), "POST", "/api/v1/images")
            .await
            .unwrap()
            .0,
        201
    );
    assert_eq!(resource_keys(&etcd).await, ["/lightbyte/image/base"]);
    plane.shutdown(Duration::from_secs(2)).await;
}

#[test]
fn the_cli_presents_its_token_and_a_server_needs_tokens_or_insecure() {
    let etcd = Etcd::start();
    let server = Server::start(&etcd);
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lightbyte"));
        common::client_env(&mut cmd)
            .args(args)
            .env("LIGHTBYTE_SERVER", &server.url)
            .env_remove("LIGHTBYTE_TOKEN")
            .env_remove("LIGHTBYTE_TOKEN_FILE")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let none = run(&[], &["vm", "list"]);
    assert!(!none.status.success());
    assert!(text(&none).contains("401 Unauthorized"), "{}", text(&none));
    let viewer = run(
        &[("LIGHTBYTE_TOKEN", common::VIEWER_TOKEN)],
        &["image", "add", "base", "--path", "/img/base.qcow2"],
    );
    assert!(text(&viewer).contains("403 Forbidden"), "{}", text(&viewer));
    assert!(run(
        &[("LIGHTBYTE_TOKEN", common::VIEWER_TOKEN)],
        &["vm", "list"]
    )
    .status
    .success());
    // `token new` makes a 0600 file the server takes; a token file for the CLI.
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    let t = tokens.to_str().unwrap();
    // It needs no credentials of its own, even when the environment names some not made yet
    // (a cluster being set up).
    let made = run(
        &[("LIGHTBYTE_TOKEN_FILE", "/nonexistent/admin.token")],
        &[
            "token", "new", "--role", "admin", "--name", "ops", "--file", t,
        ],
    );
    assert!(made.status.success(), "{}", text(&made));
    let token = String::from_utf8_lossy(&made.stdout).trim().to_string();
    assert_eq!(token.len(), 64);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&tokens).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let own = dir.path().join("ops.token");
    std::fs::write(&own, format!("{token}\n")).unwrap();
    let r = run(&[], &["--token-file", own.to_str().unwrap(), "vm", "list"]);
    // Not this server's token.
    assert!(text(&r).contains("401"), "{}", text(&r));
    // A server with neither --tokens nor --insecure does not start, nor one without TLS files,
    // and each says what to do.
    let server_says = |tls: bool, extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lightbyte"));
        if tls {
            common::client_env(&mut cmd);
        }
        let out = cmd
            .args(["server", "--etcd", &etcd.url(), "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        text(&out)
    };
    let said = server_says(true, &[]);
    assert!(said.contains("--tokens FILE"), "{said}");
    let tokens = common::tokens_file().display().to_string();
    let said = server_says(false, &["--tokens", &tokens]);
    assert!(said.contains("lightbyte pki"), "{said}");
}
