//! `lightbyte worker --etcd URL --name NAME`: the worker agent, until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tokio_util::sync::CancellationToken;

use orchestrator::model::{ByteSize, Capacity, FieldError};
use orchestrator::tls::TlsFiles;
use orchestrator::worker::{self, WorkerConfig};

use super::AgentArgs;

pub async fn run(args: AgentArgs, tls: Option<TlsFiles>) -> Result<()> {
    let cfg = config(args, tls)?;
    tracing::info!(
        worker = %cfg.name,
        cpus = cfg.capacity.cpus,
        memory = %cfg.capacity.memory,
        state_dir = %cfg.state_dir.display(),
        vmm = %cfg.vmm.display(),
        "worker agent starting"
    );
    let shutdown = CancellationToken::new();
    let mut agent = tokio::spawn(worker::run(cfg, shutdown.clone()));
    tokio::select! {
        r = super::commands::wait_for_signal() => {
            r?;
            eprintln!("lightbyte worker stopping (its VMs keep running)");
            shutdown.cancel();
            (&mut agent).await.context("worker agent task")??;
            Ok(())
        }
        r = &mut agent => {
            r.context("worker agent task")??;
            bail!("worker agent ended")
        }
    }
}

fn config(args: AgentArgs, tls: Option<TlsFiles>) -> Result<WorkerConfig> {
    let name = args.name.unwrap_or_default();
    orchestrator::model::validate::dns_label("--name", &name)
        .map_err(|e: FieldError| anyhow::anyhow!("{e}"))?;
    worker::netdev::check_name(&args.bridge)?;
    let cpus = match args.cpus {
        Some(c) => c,
        None => std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1),
    };
    let memory = match args.memory {
        Some(m) => m,
        None => ByteSize(host_memory()?.saturating_sub(256 << 20)),
    };
    let state_dir = args
        .state_dir
        .unwrap_or_else(|| PathBuf::from(format!("/var/lib/lightbyte/worker-{name}")));
    let vmm = match args.vmm {
        Some(p) => p,
        None => std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.join("vmm")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("vmm")),
    };
    let proxy = match args.proxy {
        Some(p) => p,
        None => std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.join("lightbyte-proxy")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("lightbyte-proxy")),
    };
    let firmware = match args.firmware {
        Some(p) => Some(p),
        None => vmm
            .parent()
            .map(|d| d.join("lightbyte-firmware"))
            .filter(|p| p.is_file()),
    };
    for (what, path) in [
        ("--kernel", &args.kernel),
        ("--initramfs", &args.initramfs),
        ("--firmware", &firmware),
    ] {
        if let Some(p) = path {
            if !p.is_file() {
                bail!("{what} {}: no such file", p.display());
            }
        }
    }
    // Serving nothing, it asks nothing: --tokens or --insecure only with --listen.
    let auth = match args.listen {
        Some(_) => super::commands::auth(&args.auth, &tls, "worker API")?,
        None => orchestrator::auth::Auth::Insecure,
    };
    let firewall = if args.no_guest_firewall {
        tracing::warn!(
            "--no-guest-firewall: guests may spoof addresses and reach this host's services"
        );
        None
    } else {
        let mut deny = args.guest_deny.clone();
        for url in args.etcd.iter().chain(args.server.iter()) {
            deny.extend(endpoint_addrs(url)?);
        }
        deny.sort();
        deny.dedup();
        Some(worker::firewall::Guard {
            bridge: args.bridge.clone(),
            deny,
        })
    };
    let jail = if args.no_jail {
        tracing::warn!("--no-jail: vmm processes run as root, unconfined");
        None
    } else {
        let cgroup_root = if worker::jail::cgroup2_mounted() {
            Some(args.cgroup_root.clone())
        } else {
            tracing::warn!(
                "cgroup v2 is not mounted at /sys/fs/cgroup: jailed VMs run without memory, \
                 CPU and task limits"
            );
            None
        };
        Some(worker::jail::JailSettings {
            uid_base: args.jail_uids.0,
            uid_count: args.jail_uids.1 - args.jail_uids.0 + 1,
            cgroup_root,
        })
    };
    Ok(WorkerConfig {
        jail,
        auth,
        tls,
        firewall,
        etcd: args.etcd,
        name,
        capacity: Capacity { cpus, memory },
        labels: args.labels.into_iter().collect(),
        state_dir,
        vmm,
        proxy,
        server: args.server,
        image_gc_grace: args.image_gc_grace,
        kernel: args.kernel,
        firmware,
        initramfs: args.initramfs,
        cmdline: args.cmdline,
        network: args.network,
        bridge: args.bridge,
        subnet: args.subnet,
        lease_ttl: args.lease_ttl,
        etcd_timeout: args.etcd_timeout,
        resync: args.resync,
        stop_timeout: args.stop_timeout,
        probe_port: args.probe_port,
        max_restarts: args.max_restarts,
        listen: args.listen,
    })
}

/// The IPv4 addresses and port an http(s) URL names (its host resolved).
fn endpoint_addrs(url: &str) -> Result<Vec<std::net::SocketAddrV4>> {
    use std::net::ToSocketAddrs;
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("invalid URL {url:?}"))?;
    let host = uri
        .host()
        .with_context(|| format!("no host in {url:?}"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let addrs = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?;
    Ok(addrs
        .filter_map(|a| match a {
            std::net::SocketAddr::V4(v4) => Some(v4),
            std::net::SocketAddr::V6(_) => None,
        })
        .collect())
}

/// MemTotal from /proc/meminfo, in bytes.
fn host_memory() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("no MemTotal in /proc/meminfo")
}
