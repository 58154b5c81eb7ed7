//! `POST /api/v1/vms/NAME/agent` through a real control plane (real etcd) and a worker's agent
//! endpoint, to a VM whose vsock socket is served by a stand-in VMM with a stand-in guest
//! agent: the request reaches the guest and its answer comes back; every way it can fail says
//! so with its own status.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use agent_proto::frame;
use agent_proto::{Request, RequestFrame, Response};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use common::{control_plane, eventually, http_async, worker_spec, Etcd};
use orchestrator::model::{VmSpec, WorkerSpec};
use orchestrator::registration::Registration;
use orchestrator::worker::record::Layout;

/// A VMM's vsock socket at `path` whose guest agent answers every ping with `hostname`.
fn fake_vmm(path: std::path::PathBuf, hostname: &'static str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut line = [0u8; 13];
            if s.read_exact(&mut line).is_err() || &line != b"CONNECT 1024\n" {
                continue;
            }
            s.write_all(b"OK 1073741824\n").unwrap();
            while let Ok(req) = frame::read::<_, RequestFrame>(&mut s) {
                let resp = match req.request {
                    Request::Ping => Response::Pong {
                        agent_version: "test".into(),
                        protocol: 1,
                        uptime_secs: 1.0,
                        hostname: hostname.into(),
                        addresses: vec![],
                    },
                    _ => Response::error(agent_proto::ErrorKind::Failed, "only ping"),
                };
                frame::write(&mut s, &resp).unwrap();
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_requests_reach_the_guest_through_the_worker() {
    let etcd = Etcd::start();
    let plane = control_plane(&etcd, "cp").await;
    let addr = plane.addr();
    let store = etcd.store().await;

    // A worker serving agent requests, its endpoint registered.
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    layout.create_dirs().unwrap();
    let (listener, bound) = orchestrator::worker::api::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let state = orchestrator::worker::api::ApiState {
        layout: layout.clone(),
        proxy: std::sync::Arc::new(orchestrator::worker::host_proxy::HostProxy::new(
            "lightbyte-proxy".into(),
            dir.path().join("proxy"),
        )),
    };
    tokio::spawn(orchestrator::worker::api::serve(
        listener,
        state,
        common::auth(),
        Some(common::tls_files().server_config().unwrap()),
        stop.clone(),
    ));
    let spec = WorkerSpec {
        endpoint: Some(bound.to_string()),
        ..worker_spec(4, "4G")
    };
    let _w1 = Registration::register(&store, "w1", spec, Duration::from_secs(5))
        .await
        .unwrap();

    let post = |path: String, body: serde_json::Value| async move {
        http_async(addr, "POST", &path, Some(&body.to_string())).await
    };
    let (s, _) = post(
        "/api/v1/images".into(),
        json!({"metadata": {"name": "base"}, "spec": {"path": "/img/base.qcow2"}}),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _) = post(
        "/api/v1/vms".into(),
        json!({"metadata": {"name": "web-1"}, "spec": {"cpus": 1, "memory": "128M", "image": "base"}}),
    )
    .await;
    assert_eq!(s, 201);
    eventually("web-1 placed", Duration::from_secs(20), || {
        let store = store.clone();
        async move {
            let vm = store.get::<VmSpec>("web-1").await.ok()?;
            vm.status.placement.filter(|w| w == "w1")
        }
    })
    .await;

    // Placed, but not running on the worker yet: the worker says so.
    let ping = json!({"type": "ping"});
    let (s, body) = post("/api/v1/vms/web-1/agent".into(), ping.clone()).await;
    assert_eq!(s, 404, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("does not run on this worker"));

    // Running there, its agent answering.
    std::fs::create_dir_all(layout.vm_dir("web-1")).unwrap();
    std::fs::write(layout.record("web-1"), b"{}").unwrap();
    fake_vmm(layout.vsock("web-1"), "web-1");
    let (s, body) = post("/api/v1/vms/web-1/agent".into(), ping.clone()).await;
    assert_eq!((s, body["type"].as_str()), (200, Some("pong")), "{body}");
    assert_eq!(body["hostname"], "web-1");
    // The agent's own refusals come back as answers.
    let (s, body) = post(
        "/api/v1/vms/web-1/agent".into(),
        json!({"type": "shutdown"}),
    )
    .await;
    assert_eq!((s, body["type"].as_str()), (200, Some("error")), "{body}");

    // Bad input never reaches a worker; unknown VMs are 404.
    let (s, body) = post("/api/v1/vms/web-1/agent".into(), json!({"type": "reboot"})).await;
    assert_eq!(s, 400, "{body}");
    let (s, _) = post("/api/v1/vms/nope/agent".into(), ping.clone()).await;
    assert_eq!(s, 404);

    // The VMM gone: 502, naming the guest agent.
    std::fs::remove_file(layout.vsock("web-1")).unwrap();
    let (s, body) = post("/api/v1/vms/web-1/agent".into(), ping.clone()).await;
    assert_eq!(s, 502, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("guest agent"),
        "{body}"
    );

    // A worker that serves no agent requests: 503.
    store
        .update::<WorkerSpec, _>("w1", |w| {
            w.spec.endpoint = None;
            Ok(())
        })
        .await
        .unwrap();
    let (s, body) = post("/api/v1/vms/web-1/agent".into(), ping).await;
    assert_eq!(s, 503, "{body}");
    stop.cancel();
}
