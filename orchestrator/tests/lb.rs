//! Load balancers against a real etcd and control plane, with a fake worker (its VMs get
//! loopback addresses, on which this test serves HTTP as them) whose worker API runs the real
//! `lightbyte-proxy` (host placement). Guest-placed proxies in real VMs are checked by the
//! cluster scenario in the test host.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{control_plane, eventually, Etcd, TTL};
use orchestrator::client::ApiClient;
use orchestrator::model::{
    Capacity, HealthCheck, ImageSpec, Listener, LoadBalancer, LoadBalancerSpec, Placement,
    PlacementKind, ScaleGroupSpec, Seconds, Selection, Target, UpdateStrategy, Vm, VmSpec, VmState,
    VmTemplate,
};
use orchestrator::sim::FakeWorker;
use orchestrator::store::Store;
use orchestrator::worker::api::{self as worker_api, ApiState};
use orchestrator::worker::host_proxy::HostProxy;
use orchestrator::worker::record::Layout;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(60);
const BACKEND_PORT: u16 = 8080;

fn proxy_bin() -> std::path::PathBuf {
    let bin =
        std::path::Path::new(env!("CARGO_BIN_EXE_lightbyte")).with_file_name("lightbyte-proxy");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace's binaries first (cargo build --bins)",
        bin.display()
    );
    bin
}

/// Serves HTTP as every Running member of a group, on its address: answers with the VM's
/// name and counts what each received.
#[derive(Clone, Default)]
struct Members {
    hits: Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>,
    tasks: Arc<Mutex<BTreeMap<String, tokio::task::JoinHandle<()>>>>,
}

impl Members {
    fn spawn(&self, store: Store, stop: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok((vms, _)) = store.list::<VmSpec>().await {
                    for vm in vms.iter().filter(|v| v.status.state == VmState::Running) {
                        me.serve(vm).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    async fn serve(&self, vm: &Vm) {
        let name = vm.name().to_string();
        if self.tasks.lock().unwrap().contains_key(&name) {
            return;
        }
        let Some(ip) = vm.status.ip.as_deref().and_then(|i| i.parse().ok()) else {
            return;
        };
        let Ok(listener) = TcpListener::bind(SocketAddr::new(ip, BACKEND_PORT)).await else {
            return;
        };
        let hits = Arc::new(AtomicU64::new(0));
        self.hits.lock().unwrap().insert(name.clone(), hits.clone());
        let n = name.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(answer(conn, n.clone(), hits.clone()));
            }
        });
        self.tasks.lock().unwrap().insert(name, task);
    }

    fn hits(&self, vm: &str) -> u64 {
        self.hits
            .lock()
            .unwrap()
            .get(vm)
            .map_or(0, |h| h.load(Ordering::SeqCst))
    }

    /// The member stops answering (its port closes), as a crashed server would.
    fn kill(&self, vm: &str) {
        if let Some(t) = self.tasks.lock().unwrap().get(vm) {
            t.abort();
        }
    }
}

async fn answer(mut conn: TcpStream, name: String, hits: Arc<AtomicU64>) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 2048];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..end);
        hits.fetch_add(1, Ordering::SeqCst);
        let body = format!("{name}\n");
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if conn.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// One GET on a new connection: the backend that answered, or what went wrong.
async fn get(addr: SocketAddr) -> Result<String, String> {
    let go = async {
        let mut c = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        c.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out).to_string();
        match text.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.trim().to_string()),
            _ => Err(text.lines().next().unwrap_or("empty answer").to_string()),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), go)
        .await
        .unwrap_or_else(|_| Err("timeout".into()))
}

/// Requests back to back until `stop`: (when, outcome).
fn load(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Instant, Result<String, String>)>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            out.push((Instant::now(), get(addr).await));
        }
        out
    })
}

fn failures(outcomes: &[(Instant, Result<String, String>)]) -> Vec<String> {
    outcomes
        .iter()
        .filter_map(|(_, o)| o.as_ref().err().cloned())
        .collect()
}

async fn lb_status(api: &ApiClient, name: &str) -> LoadBalancer {
    api.get::<LoadBalancerSpec>(name).await.unwrap()
}

fn backend_vms(lb: &LoadBalancer) -> BTreeSet<String> {
    lb.status.backends.iter().map(|b| b.vm.clone()).collect()
}

fn all_healthy(lb: &LoadBalancer, n: usize) -> bool {
    lb.status.backends.len() == n && lb.status.backends.iter().all(|b| b.healthy == Some(true))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_load_balancer_follows_its_group() {
    let proxy_bin = proxy_bin();
    let etcd = Etcd::start();
    let cp = control_plane(&etcd, "cp-1").await;
    let store = Store::connect(&[etcd.url()], Duration::from_secs(2))
        .await
        .unwrap();
    let api = ApiClient::new(&cp.url(), LIMIT).unwrap();

    // The worker API with a real host proxy.
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let (listener, bound) = worker_api::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let state = ApiState {
        layout: Layout::new(dir.path()),
        proxy: Arc::new(HostProxy::new(proxy_bin, dir.path().join("proxy"))),
    };
    tokio::spawn(worker_api::serve(
        listener,
        state,
        common::auth(),
        Some(common::tls_files().server_config().unwrap()),
        stop.clone(),
    ));
    // The worker API asks for a token too; a viewer only reads.
    for (token, method, path, want) in [
        (None, "GET", "/api/v1/proxy/status", 401),
        (
            Some(common::VIEWER_TOKEN),
            "POST",
            "/api/v1/proxy/apply",
            403,
        ),
        (
            Some(common::VIEWER_TOKEN),
            "POST",
            "/api/v1/vms/x/agent",
            403,
        ),
    ] {
        let got = tokio::task::spawn_blocking(move || {
            common::http_as(token, bound, method, path, Some("{}")).unwrap()
        })
        .await
        .unwrap();
        assert_eq!(got.0, want, "{token:?} {method} {path}: {}", got.1);
    }
    let _w = FakeWorker::start_serving(
        &store,
        "w1",
        Capacity {
            cpus: 64,
            memory: "64G".parse().unwrap(),
        },
        TTL,
        Some(bound.to_string()),
    )
    .await
    .unwrap();
    let members = Members::default();
    members.spawn(store.clone(), stop.clone());

    let image = ImageSpec {
        digest: None,
        path: Some("/img/base.qcow2".into()),
        format: Default::default(),
        size: None,
        kernel: None,
        initramfs: None,
        cmdline: None,
        boot: Default::default(),
    };
    api.create("base", &image).await.unwrap();
    let group = ScaleGroupSpec {
        replicas: 3,
        template: VmTemplate {
            cpus: 1,
            memory: "128M".parse().unwrap(),
            image: "base".into(),
            volumes: vec![],
            network: "default".into(),
            labels: Default::default(),
            cmdline: None,
        },
        update: UpdateStrategy::default(),
        replace_lost_after: Seconds(60),
    };
    api.create("web", &group).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec = LoadBalancerSpec {
        listeners: vec![Listener { port }],
        target: Target {
            group: Some("web".into()),
            vms: vec![],
            port: BACKEND_PORT,
        },
        health: HealthCheck {
            interval_ms: 300,
            ..HealthCheck::default()
        },
        selection: Selection::RoundRobin,
        drain_grace: Seconds(3),
        placement: Placement {
            kind: PlacementKind::Host,
            ..Placement::default()
        },
    };
    api.create("front", &spec).await.unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // Three healthy backends, the address reported, 300 requests spread over all three.
    let lb = eventually("three healthy backends", LIMIT, || async {
        let lb = lb_status(&api, "front").await;
        all_healthy(&lb, 3).then_some(lb)
    })
    .await;
    assert_eq!(lb.status.addresses, [format!("127.0.0.1:{port}")]);
    assert_eq!(lb.status.proxies.len(), 1);
    assert!(lb.status.proxies[0].current, "{:?}", lb.status.proxies);
    assert!(lb.status.revision > 0);
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..300 {
        *count.entry(get(addr).await.unwrap()).or_default() += 1;
    }
    assert_eq!(count.len(), 3, "{count:?}");
    assert!(count.values().all(|n| (90..=110).contains(n)), "{count:?}");

    // Scale up under load: nothing fails, the new member gets requests.
    let before = backend_vms(&lb);
    let run = Arc::new(AtomicBool::new(false));
    let client = load(addr, run.clone());
    let _: orchestrator::model::ScaleGroup = api
        .action(
            "web",
            "scale",
            &orchestrator::api::ScaleRequest { replicas: 4 },
        )
        .await
        .unwrap();
    let lb = eventually("four healthy backends", LIMIT, || async {
        let lb = lb_status(&api, "front").await;
        all_healthy(&lb, 4).then_some(lb)
    })
    .await;
    let added: Vec<String> = backend_vms(&lb).difference(&before).cloned().collect();
    assert_eq!(added.len(), 1);
    eventually("the new member serves", LIMIT, || async {
        (members.hits(&added[0]) > 0).then_some(())
    })
    .await;

    // Scale down under load: members retire (out of the proxy first), are deleted after the
    // grace, no request fails, and none reaches a member after its removal.
    let _: orchestrator::model::ScaleGroup = api
        .action(
            "web",
            "scale",
            &orchestrator::api::ScaleRequest { replicas: 2 },
        )
        .await
        .unwrap();
    let lb = eventually("two backends", LIMIT, || async {
        let lb = lb_status(&api, "front").await;
        (lb.status.backends.len() == 2).then_some(lb)
    })
    .await;
    let removed: Vec<String> = before
        .union(&added.iter().cloned().collect())
        .filter(|v| !backend_vms(&lb).contains(*v))
        .cloned()
        .collect();
    assert_eq!(removed.len(), 2, "{removed:?}");
    let at_removal: Vec<u64> = removed.iter().map(|v| members.hits(v)).collect();
    // Retiring, still there within the grace.
    let (vms, _) = store.list::<VmSpec>().await.unwrap();
    for v in &removed {
        let vm = vms.iter().find(|x| x.name() == v);
        assert!(
            vm.is_some_and(|vm| vm.status.retiring_since.is_some()),
            "{v} should be retiring: {vm:?}"
        );
    }
    eventually("retired members deleted after the grace", LIMIT, || async {
        let (vms, _) = store.list::<VmSpec>().await.ok()?;
        (!vms.iter().any(|vm| removed.contains(&vm.metadata.name))).then_some(())
    })
    .await;
    let after: Vec<u64> = removed.iter().map(|v| members.hits(v)).collect();
    assert_eq!(
        at_removal, after,
        "requests reached members after their removal"
    );
    run.store(true, Ordering::SeqCst);
    let outcomes = client.await.unwrap();
    assert!(outcomes.len() > 50, "{} requests", outcomes.len());
    assert_eq!(failures(&outcomes), Vec::<String>::new());

    // A backend dies: marked unhealthy within a few intervals, requests keep succeeding.
    let run = Arc::new(AtomicBool::new(false));
    let client = load(addr, run.clone());
    let victim = backend_vms(&lb).into_iter().next().unwrap();
    members.kill(&victim);
    eventually("the dead backend reported unhealthy", LIMIT, || async {
        let lb = lb_status(&api, "front").await;
        lb.status
            .backends
            .iter()
            .any(|b| b.vm == victim && b.healthy == Some(false))
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.store(true, Ordering::SeqCst);
    assert_eq!(failures(&client.await.unwrap()), Vec::<String>::new());

    // Stale and malformed pushes to the worker's proxy are refused; it keeps what it runs.
    let lb = lb_status(&api, "front").await;
    let url = |p: &str| format!("https://{bound}/api/v1/proxy/{p}");
    let stale = serde_json::json!({"revision": 1, "balancers": []}).to_string();
    let (code, _) = orchestrator::http::exchange(
        hyper::Method::POST,
        &url("apply"),
        Some(stale.into_bytes()),
        LIMIT,
    )
    .await
    .unwrap();
    assert_eq!(code.as_u16(), 409);
    let (code, _) = orchestrator::http::exchange(
        hyper::Method::POST,
        &url("apply"),
        Some(b"{\"revision\":".to_vec()),
        LIMIT,
    )
    .await
    .unwrap();
    assert_eq!(code.as_u16(), 400);
    let bad = serde_json::json!({"revision": u64::MAX, "balancers": [{"name": "X", "listen": "0.0.0.0:1"}]}).to_string();
    let (code, _) = orchestrator::http::exchange(
        hyper::Method::POST,
        &url("apply"),
        Some(bad.into_bytes()),
        LIMIT,
    )
    .await
    .unwrap();
    assert_eq!(code.as_u16(), 422);
    let (code, body) =
        orchestrator::http::exchange(hyper::Method::GET, &url("status"), None, LIMIT)
            .await
            .unwrap();
    assert!(code.is_success());
    let s: lb_config::ProxyStatus = serde_json::from_slice(&body).unwrap();
    assert_eq!(s.revision, lb.status.revision);
    assert!(get(addr).await.is_ok());

    // The group cannot be deleted from under its load balancer.
    let (code, body) =
        common::http_async(cp.addr(), "DELETE", "/api/v1/scalegroups/web", None).await;
    assert_eq!(code, 409, "{body}");
    assert!(body.to_string().contains("load balancer"), "{body}");

    // Deleted: the proxy is given an empty configuration and the port closes.
    let _: LoadBalancer = api.delete::<LoadBalancerSpec>("front").await.unwrap();
    eventually("the listener closes", LIMIT, || async {
        TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
    let proxy_sock = dir.path().join("proxy/proxy.sock");
    let _ = lb_config::control::call(
        &proxy_sock,
        &lb_config::control::Request::Stop,
        Duration::from_secs(5),
    );
    stop.cancel();
}
