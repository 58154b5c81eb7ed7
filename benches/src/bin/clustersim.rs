//! `clustersim`: the control plane at a scale these machines cannot host for real. A real etcd
//! and a real control plane (in this process), with W in-process fake workers
//! (`orchestrator::sim`: they report every VM placed on them Running at once) and G scale groups
//! of R members each. Measures the time to converge after the groups are created, after every
//! template changes (a rolling update of every member), and after D workers are drained; and the
//! control plane's etcd requests and bytes in each phase, per controller pass. Prints a table.
//!
//! Times here are wall-clock on a shared 2-core machine with the fake workers in the same
//! process: compare phases and sizes within one run, not absolute figures across runs.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use orchestrator::client::ApiClient;
use orchestrator::controllers::{passes, ControllerConfig};
use orchestrator::model::{
    ByteSize, Capacity, ImageSpec, ScaleGroupSpec, Seconds, UpdateStrategy, VmSpec, VmState,
    VmTemplate, WorkerSpec, WorkerState,
};
use orchestrator::server::{ControlPlane, ServerConfig};
use orchestrator::sim::FakeWorker;
use orchestrator::store::{StatsSnapshot, Store};

#[derive(Parser)]
#[command(
    version,
    about = "Control-plane convergence with fake workers at scale"
)]
struct Cli {
    /// Fake workers.
    #[arg(long, default_value_t = 100)]
    workers: usize,
    /// Scale groups.
    #[arg(long, default_value_t = 50)]
    groups: usize,
    /// Members per group.
    #[arg(long, default_value_t = 100)]
    replicas: u32,
    /// Workers drained in the last phase.
    #[arg(long, default_value_t = 10)]
    drain: usize,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Phase {
    name: String,
    took: Duration,
    etcd: StatsSnapshot,
    passes: BTreeMap<&'static str, (u64, Duration)>,
}

fn diff(
    after: &BTreeMap<&'static str, (u64, Duration)>,
    before: &BTreeMap<&'static str, (u64, Duration)>,
) -> BTreeMap<&'static str, (u64, Duration)> {
    after
        .iter()
        .map(|(k, (n, t))| {
            let (n0, t0) = before.get(k).copied().unwrap_or_default();
            (*k, (n - n0, *t - t0))
        })
        .collect()
}

/// Every group has exactly `replicas` Running members made from its current template, nothing
/// is left on drained workers, and every group's status says so.
async fn converged(store: &Store, replicas: u32, cmdline: Option<&str>) -> Result<bool> {
    let (groups, _) = store.list::<ScaleGroupSpec>().await?;
    let (vms, _) = store.list::<VmSpec>().await?;
    let (workers, _) = store.list::<WorkerSpec>().await?;
    let drained = |w: &str| {
        workers
            .iter()
            .any(|x| x.name() == w && x.spec.drain && x.status.state != WorkerState::Drained)
    };
    if workers
        .iter()
        .any(|w| w.spec.drain && w.status.state != WorkerState::Drained)
    {
        return Ok(false);
    }
    let mut per_group: BTreeMap<&str, u32> = BTreeMap::new();
    for vm in &vms {
        let ok = vm.status.state == VmState::Running
            && vm.spec.cmdline.as_deref() == cmdline
            && !vm.status.placement.as_deref().is_some_and(drained);
        if !ok {
            return Ok(false);
        }
        *per_group
            .entry(vm.spec.group.as_deref().unwrap_or(""))
            .or_default() += 1;
    }
    Ok(groups.iter().all(|g| {
        let s = &g.status;
        per_group.get(g.name()).copied() == Some(replicas)
            && s.observed_generation == g.metadata.generation
            && (s.members, s.ready, s.updated) == (replicas, replicas, replicas)
    }))
}

async fn wait_converged(
    store: &Store,
    replicas: u32,
    cmdline: Option<&str>,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_report = Instant::now();
    loop {
        if converged(store, replicas, cmdline).await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not converged within {timeout:?}");
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            let (vms, _) = store.list::<VmSpec>().await?;
            let running = vms
                .iter()
                .filter(|v| v.status.state == VmState::Running)
                .count();
            eprintln!("  ... {} VMs, {running} Running", vms.len());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let dir = tempfile::tempdir()?;
    let (cport, pport) = (free_port()?, free_port()?);
    let etcd_url = format!("http://127.0.0.1:{cport}");
    let peer = format!("http://127.0.0.1:{pport}");
    let _etcd = Proc(
        Command::new("etcd")
            .args(["--data-dir", &dir.path().join("etcd").display().to_string()])
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("default={peer}")])
            .args(["--quota-backend-bytes", &(8u64 << 30).to_string()])
            .args(["--logger=zap", "--log-level=error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting etcd (installed by scripts/install-deps.sh)")?,
    );
    let store = loop {
        if let Ok(s) =
            Store::connect(std::slice::from_ref(&etcd_url), Duration::from_secs(10)).await
        {
            if s.revision().await.is_ok() {
                break s;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let plane = ControlPlane::start(ServerConfig {
        etcd: vec![etcd_url.clone()],
        listen: "127.0.0.1:0".parse()?,
        also_listen: Vec::new(),
        etcd_timeout: Duration::from_secs(10),
        controllers: ControllerConfig {
            holder: "sim".into(),
            lease_ttl: Duration::from_secs(5),
            resync: Duration::from_secs(300),
        },
        // The simulated workers start nothing: a path names the image.
        image_dir: None,
        allow_host_path: true,
        limits: Default::default(),
        // A simulation on loopback in this process: what it measures is the controllers.
        auth: orchestrator::auth::Auth::Insecure,
        tls: None,
    })
    .await?;
    let api = ApiClient::new(&format!("http://{}", plane.addr()), Duration::from_secs(60))?;
    api.create(
        "base",
        &ImageSpec {
            digest: None,
            path: Some("/img/base.qcow2".into()),
            format: Default::default(),
            size: None,
            kernel: None,
            initramfs: None,
            cmdline: None,
            boot: Default::default(),
        },
    )
    .await?;
    let per_worker = (cli.groups as u32 * cli.replicas).div_ceil(cli.workers as u32) * 2 + 8;
    eprintln!(
        "starting {} fake workers ({per_worker} CPUs each)",
        cli.workers
    );
    let mut workers = Vec::new();
    for i in 0..cli.workers {
        let capacity = Capacity {
            cpus: per_worker,
            memory: ByteSize::mib(u64::from(per_worker) * 128),
        };
        let fake = FakeWorker::start(
            &store,
            &format!("w{i:03}"),
            capacity,
            Duration::from_secs(10),
        )
        .await?;
        workers.push(fake);
    }
    let timeout = Duration::from_secs(cli.timeout);
    let mut phases = Vec::new();
    let mut end_phase = |name: String, mark: &mut (Instant, StatsSnapshot, _)| {
        let now = (Instant::now(), plane.store_stats(), passes());
        phases.push(Phase {
            name,
            took: now.0 - mark.0,
            etcd: now.1 - mark.1,
            passes: diff(&now.2, &mark.2),
        });
        *mark = now;
    };
    // Workers Ready before the clock starts.
    loop {
        let (ws, _) = store.list::<WorkerSpec>().await?;
        if ws.len() == cli.workers && ws.iter().all(|w| w.status.state == WorkerState::Ready) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut mark = (Instant::now(), plane.store_stats(), passes());

    let total = cli.groups * cli.replicas as usize;
    eprintln!(
        "phase 1: {} groups x {} members ({total} VMs)",
        cli.groups, cli.replicas
    );
    for g in 0..cli.groups {
        let spec = ScaleGroupSpec {
            replicas: cli.replicas,
            template: VmTemplate {
                cpus: 1,
                memory: ByteSize::mib(64),
                image: "base".into(),
                volumes: vec![],
                network: "default".into(),
                labels: Default::default(),
                cmdline: None,
            },
            update: UpdateStrategy::default(),
            replace_lost_after: Seconds(60),
        };
        api.create(&format!("g{g:02}"), &spec).await?;
    }
    wait_converged(&store, cli.replicas, None, timeout).await?;
    end_phase(
        format!("create {} groups, {total} VMs", cli.groups),
        &mut mark,
    );

    eprintln!("phase 2: template change in every group");
    for g in 0..cli.groups {
        let mut obj = api.get::<ScaleGroupSpec>(&format!("g{g:02}")).await?;
        obj.spec.template.cmdline = Some("v=2".into());
        api.replace(&obj).await?;
    }
    wait_converged(&store, cli.replicas, Some("v=2"), timeout).await?;
    end_phase(
        format!("rolling update of {total} VMs (surge 1)"),
        &mut mark,
    );

    eprintln!("phase 3: drain {} workers", cli.drain);
    for w in workers.iter().take(cli.drain) {
        api.action::<WorkerSpec, _>(w.name(), "drain", &serde_json::json!({}))
            .await?;
    }
    wait_converged(&store, cli.replicas, Some("v=2"), timeout).await?;
    end_phase(
        format!("drain {} of {} workers", cli.drain, cli.workers),
        &mut mark,
    );

    println!(
        "\n{} fake workers, {} groups x {} members = {total} VMs (real etcd, control plane in process)\n",
        cli.workers, cli.groups, cli.replicas
    );
    println!("| phase | time | etcd requests | read | written | passes (sched / groups / health / mover) | requests per pass | read per pass |");
    println!("|---|---|---|---|---|---|---|---|");
    for p in &phases {
        let n = |c: &str| p.passes.get(c).map_or(0, |v| v.0);
        let all: u64 = p.passes.values().map(|v| v.0).sum::<u64>().max(1);
        println!(
            "| {} | {:.1} s | {} | {} | {} | {} / {} / {} / {} | {} | {} |",
            p.name,
            p.took.as_secs_f64(),
            p.etcd.requests,
            mib(p.etcd.bytes_read),
            mib(p.etcd.bytes_written),
            n("scheduler"),
            n("scale-groups"),
            n("worker-health"),
            n("mover"),
            p.etcd.requests / all,
            mib(p.etcd.bytes_read / all),
        );
    }
    println!("\nTime inside passes per controller:");
    for p in &phases {
        let parts: Vec<String> = p
            .passes
            .iter()
            .map(|(k, (n, t))| format!("{k} {:.1} s in {n}", t.as_secs_f64()))
            .collect();
        println!("- {}: {}", p.name, parts.join(", "));
    }
    drop(workers);
    plane.shutdown(Duration::from_secs(2)).await;
    Ok(())
}
