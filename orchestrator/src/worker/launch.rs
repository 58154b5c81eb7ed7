//! Launching one VM: its disks, its TAP, a `vmm` process, and the VM created and booted through
//! that process's API. Failures are typed so that the agent decides by kind whether a start is
//! retried as it is (etcd unreachable) or the VM has a problem to report.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use vmm_api::client::{Client, ClientError};
use vmm_api::config::{
    DiskConfig, DiskFormat, NetConfig, OnError, SerialConfig, VmConfig, VsockConfig,
};
use vmm_api::mac::MacError;
use vmm_api::MacAddr;

use super::disks::{ensure_overlay, Base, OverlayError};
use super::ip_param;
use super::jail::{pick_uid, JailSettings};
use super::local::{write_status, Ctx, LocalVm};
use super::netdev::{self, NetError};
use super::process::{log_tail, ApiWaitError, VmmProcess};
use crate::images::Digest;
use crate::model::{ImageBoot, ImageSpec, Vm, VmState, VolumeSpec};
use crate::store::StoreError;

/// How long a new `vmm` has to answer on its API socket.
const API_READY: Duration = Duration::from_secs(10);
/// Every guest's vsock context ID: the device is the VMM's own, so IDs need not differ.
const GUEST_CID: u32 = 3;

/// Why a VM did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The VM wants a network this worker does not serve.
    #[error("worker {worker} serves network {served:?}, not {wanted:?}")]
    WrongNetwork {
        worker: String,
        served: String,
        wanted: String,
    },
    /// An object the VM names is not there.
    #[error("{kind} {name} does not exist")]
    Missing { kind: &'static str, name: String },
    #[error("volume {volume} lives on worker {worker}, not here")]
    VolumeElsewhere { volume: String, worker: String },
    /// etcd failed answering (unreachable: see [`StartError::is_transient`]).
    #[error(transparent)]
    Store(StoreError),
    /// An image (or its kernel or initramfs) could not be pulled.
    #[error("image {image}: {source}")]
    Pull {
        image: String,
        source: crate::images::cache::PullError,
    },
    /// An image names a digest that is not one.
    #[error("image {image}: {why}")]
    BadImage { image: String, why: String },
    /// A UEFI image on a worker without firmware.
    #[error("image {image} boots through UEFI and worker {worker} has no --firmware")]
    NoFirmware { image: String, worker: String },
    /// Neither the image nor the worker says which kernel to boot.
    #[error("image {image} names no kernel and worker {worker} has no --kernel")]
    NoKernel { image: String, worker: String },
    /// More vCPUs than a `vmm` takes.
    #[error("{0} vCPUs is too many")]
    TooManyCpus(u32),
    /// A disk could not be made.
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    /// The task making the disks failed.
    #[error("creating disks: {0}")]
    DiskTask(#[from] tokio::task::JoinError),
    /// The TAP could not be made.
    #[error(transparent)]
    Tap(#[from] NetError),
    /// The guest's firewall rules could not be set.
    #[error("guest firewall: {0}")]
    Firewall(#[from] super::firewall::FirewallError),
    /// No uid is left for another jailed VM.
    #[error("no free jail uid in {base}..{} (raise --jail-uids)", base.saturating_add(*count))]
    NoUid { base: u32, count: u32 },
    /// The jail could not be set up.
    #[error("jail: {0}")]
    Jail(String),
    /// The `vmm` could not be started.
    #[error("cannot start {vmm}: {source}")]
    Spawn { vmm: String, source: std::io::Error },
    /// The VM's record could not be written.
    #[error("writing the VM record: {0}")]
    Record(std::io::Error),
    /// The `vmm` never answered on its socket.
    #[error("{source}; vmm log: {log}")]
    Api { source: ApiWaitError, log: String },
    /// The record's MAC address is not one.
    #[error("MAC {mac}: {source}")]
    Mac { mac: String, source: MacError },
    /// The `vmm` refused the configuration.
    #[error("vmm refused the VM: {0}")]
    Refused(ClientError),
    /// The `vmm` could not boot it.
    #[error("vmm could not boot the VM: {0}")]
    Boot(ClientError),
}

impl StartError {
    /// True when nothing is wrong with the VM (etcd could not be reached): the start is tried
    /// again as it is, not reported as a failure.
    pub fn is_transient(&self) -> bool {
        matches!(self, StartError::Store(e) if e.is_unavailable())
    }
}

/// Starts the VM `obj` as `vm` (its record made): disks, TAP, `vmm` process, create and boot
/// through its API. The caller cleans up after a failure.
pub(super) async fn launch(ctx: &Ctx, vm: &mut LocalVm, obj: &Vm) -> Result<(), StartError> {
    let cfg = &ctx.cfg;
    let name = vm.rec.name.clone();
    if obj.spec.network != cfg.network {
        return Err(StartError::WrongNetwork {
            worker: cfg.name.clone(),
            served: cfg.network.clone(),
            wanted: obj.spec.network.clone(),
        });
    }
    let _ = write_status(ctx, &name, &vm.rec.uid, |s| {
        s.state = VmState::Starting;
        s.message = None;
        s.ip = None;
    })
    .await;
    let image = get::<ImageSpec>(ctx, &obj.spec.image).await?;
    let base = resolve_base(ctx, &obj.spec.image, &image).await?;
    let firmware = match image.boot {
        ImageBoot::Uefi => Some(cfg.firmware.clone().ok_or_else(|| StartError::NoFirmware {
            image: obj.spec.image.clone(),
            worker: cfg.name.clone(),
        })?),
        ImageBoot::Direct => None,
    };
    let (kernel, initramfs) = match &image.kernel {
        _ if firmware.is_some() => (PathBuf::new(), None),
        Some(k) => (
            resolve_file(ctx, &obj.spec.image, k).await?,
            match &image.initramfs {
                Some(i) => Some(resolve_file(ctx, &obj.spec.image, i).await?),
                None => None,
            },
        ),
        None => match &cfg.kernel {
            Some(k) => (k.clone(), cfg.initramfs.clone()),
            None => {
                return Err(StartError::NoKernel {
                    image: obj.spec.image.clone(),
                    worker: cfg.name.clone(),
                })
            }
        },
    };
    // A UEFI guest's loader has its own command line; ours are only its load options.
    let default_cmdline = match firmware {
        Some(_) => String::new(),
        None => cfg.cmdline.clone(),
    };
    let mut cmdline = image.cmdline.clone().unwrap_or(default_cmdline);
    if let Some(extra) = &obj.spec.cmdline {
        cmdline = format!("{cmdline} {extra}");
    }
    // The network configuration goes on a kernel command line; a UEFI guest's boot loader owns
    // its kernel's, so it configures its network itself (its address is in the VM's status).
    let cmdline = match firmware {
        Some(_) => cmdline.trim().to_string(),
        None => format!("{cmdline} {}", ip_param(vm.rec.ip, &cfg.subnet, &name)),
    };
    let cpus = u8::try_from(obj.spec.cpus).map_err(|_| StartError::TooManyCpus(obj.spec.cpus))?;

    // Disks: the root overlay, then the named volumes in order.
    let root = ctx.layout.root_disk(&name);
    let mut disks = vec![(root, base, None)];
    for v in &obj.spec.volumes {
        claim_volume(ctx, v).await?;
        let vol = get::<VolumeSpec>(ctx, v).await?;
        let vimg = get::<ImageSpec>(ctx, &vol.image).await?;
        let vbase = resolve_base(ctx, &vol.image, &vimg).await?;
        disks.push((ctx.layout.volume(v), vbase, Some(vol.size.bytes())));
    }
    let disk_paths: Vec<_> = disks.iter().map(|(p, _, _)| p.clone()).collect();
    let base_paths: Vec<_> = disks.iter().map(|(_, b, _)| b.file.clone()).collect();
    tokio::task::spawn_blocking(move || {
        disks
            .iter()
            .try_for_each(|(path, img, size)| ensure_overlay(path, img, *size))
    })
    .await??;

    let jail = match &cfg.jail {
        Some(settings) => Some(jail_vmm(ctx, vm, settings, obj, &disk_paths).await?),
        None => None,
    };
    netdev::create_tap(
        &vm.rec.tap,
        &cfg.bridge,
        vm.rec.jail_uid.filter(|_| jail.is_some()),
    )
    .await?;
    if let Some(guard) = &cfg.firewall {
        super::firewall::allow_vm(&guard.bridge, &vm.rec.tap, &vm.rec.mac, vm.rec.ip).await?;
    }

    let socket = ctx.layout.socket(&name);
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(ctx.layout.vsock(&name));
    let log = ctx.layout.vmm_log(&name);
    let extra = match jail {
        Some((uid, cgroup)) => {
            let mut ro = vec![firmware.clone().unwrap_or_else(|| kernel.clone())];
            ro.extend(initramfs.iter().cloned());
            ro.extend(base_paths);
            let mut rw = vec![ctx.layout.jail_dir(&name)];
            rw.extend(disk_paths.iter().cloned());
            super::jail::vmm_args(uid, cgroup.as_deref(), &rw, &ro)
        }
        None => {
            super::record::create_private_dir(&ctx.layout.jail_dir(&name))
                .map_err(StartError::Record)?;
            Vec::new()
        }
    };
    let mut process =
        VmmProcess::spawn(&cfg.vmm, &socket, &extra, &log).map_err(|source| StartError::Spawn {
            vmm: cfg.vmm.display().to_string(),
            source,
        })?;
    vm.rec.pid = Some(process.pid);
    vm.rec.pid_start = Some(process.start);
    ctx.layout.save(&vm.rec).map_err(StartError::Record)?;
    let client = Client::new(&socket).with_timeout(Duration::from_secs(30));
    let ready = process.wait_api(&client, API_READY).await;
    vm.process = Some(process);
    ready.map_err(|source| StartError::Api {
        source,
        log: log_tail(&log, 300),
    })?;

    let mac: MacAddr = vm.rec.mac.parse().map_err(|source| StartError::Mac {
        mac: vm.rec.mac.clone(),
        source,
    })?;
    let config = VmConfig {
        kernel,
        firmware,
        initramfs,
        cmdline,
        cpus,
        memory: obj.spec.memory.bytes(),
        serial: SerialConfig::File(ctx.layout.console(&name)),
        disks: disk_paths
            .into_iter()
            .map(|path| DiskConfig {
                path,
                format: Some(DiskFormat::Qcow2),
                read_only: false,
                serial: None,
                direct: false,
                // A full host disk pauses the VM (the worker reports it Paused) rather than
                // failing the guest's writes.
                on_error: OnError::Pause,
            })
            .collect(),
        nets: vec![NetConfig {
            tap: vm.rec.tap.clone(),
            mac,
        }],
        // The guest agent, when the image has one, answers through this.
        vsock: Some(VsockConfig {
            cid: GUEST_CID,
            socket: ctx.layout.vsock(&name),
        }),
    };
    client.create(&config).await.map_err(StartError::Refused)?;
    client.boot().await.map_err(StartError::Boot)?;
    vm.rec.boot_time = Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
    vm.up = false;
    vm.agent = None;
    vm.agent_misses = 0;
    ctx.layout.save(&vm.rec).map_err(StartError::Record)?;
    Ok(())
}

/// Gets a jail ready for the VM's `vmm`: its uid (kept in the record), its jail directory and
/// disks handed to that uid, its cgroup with limits from the VM's size. Returns the uid and
/// the cgroup (none when cgroup v2 is not mounted here).
async fn jail_vmm(
    ctx: &Ctx,
    vm: &mut LocalVm,
    settings: &JailSettings,
    obj: &Vm,
    disks: &[PathBuf],
) -> Result<(u32, Option<PathBuf>), StartError> {
    let name = vm.rec.name.clone();
    let uid = {
        // One pick at a time: two VMs starting together must not take the same uid.
        let _one = ctx.jail_uids.lock().await;
        let (others, _) = ctx.layout.load_all().map_err(StartError::Record)?;
        let uid = pick_uid(settings, &vm.rec, &others).ok_or(StartError::NoUid {
            base: settings.uid_base,
            count: settings.uid_count,
        })?;
        if vm.rec.jail_uid != Some(uid) {
            vm.rec.jail_uid = Some(uid);
            ctx.layout.save(&vm.rec).map_err(StartError::Record)?;
        }
        uid
    };
    let jail_err = |source: std::io::Error| StartError::Jail(source.to_string());
    super::jail::prepare_dir(&ctx.layout, &name, uid).map_err(jail_err)?;
    for d in disks {
        super::jail::give(d, uid, 0o600).map_err(jail_err)?;
    }
    let cgroup = match &settings.cgroup_root {
        Some(root) => {
            let limits = super::jail::limits(obj.spec.memory.bytes(), obj.spec.cpus);
            let (root, worker) = (root.clone(), ctx.cfg.name.clone());
            let dir = tokio::task::spawn_blocking(move || {
                super::jail::prepare_cgroup(&root, &worker, &name, limits)
            })
            .await?
            .map_err(|e| StartError::Jail(format!("cgroup: {e}")))?;
            Some(dir)
        }
        None => None,
    };
    Ok((uid, cgroup))
}

/// Reads an object the VM needs.
/// Records that volume `name` lives here before its file is made (or used): a VM using it can
/// then only be placed here, and a volume living elsewhere is never made again empty here.
async fn claim_volume(ctx: &Ctx, name: &str) -> Result<(), StartError> {
    let me = ctx.cfg.name.as_str();
    let vol = ctx
        .store
        .update::<VolumeSpec, _>(name, |o| {
            if o.status.worker.is_none() && o.status.lost.is_none() {
                o.status.worker = Some(me.to_string());
            }
            Ok(())
        })
        .await
        .map_err(|e| match e {
            StoreError::NotFound { .. } => StartError::Missing {
                kind: "volume",
                name: name.to_string(),
            },
            e => StartError::Store(e),
        })?;
    match vol.status.worker {
        Some(w) if w == me => Ok(()),
        Some(w) => Err(StartError::VolumeElsewhere {
            volume: name.to_string(),
            worker: w,
        }),
        None => Err(StartError::VolumeElsewhere {
            volume: name.to_string(),
            worker: vol.status.lost.unwrap_or_else(|| "no worker".into()),
        }),
    }
}

async fn get<S: crate::model::Spec>(ctx: &Ctx, name: &str) -> Result<S, StartError> {
    ctx.store
        .get::<S>(name)
        .await
        .map(|o| o.spec)
        .map_err(|e| match e {
            StoreError::NotFound { .. } => StartError::Missing {
                kind: S::KIND,
                name: name.to_string(),
            },
            e => StartError::Store(e),
        })
}

/// A file an image names: pulled into the cache (verified) when it is a digest, as it is when
/// it is a host path.
async fn resolve_file(ctx: &Ctx, image: &str, file: &str) -> Result<PathBuf, StartError> {
    if !Digest::looks_like(file) {
        return Ok(PathBuf::from(file));
    }
    let d: Digest = file.parse().map_err(|why| StartError::BadImage {
        image: image.to_string(),
        why,
    })?;
    ctx.images.get(&d).await.map_err(|source| StartError::Pull {
        image: image.to_string(),
        source,
    })
}

/// The base of overlays of `image` here.
async fn resolve_base(ctx: &Ctx, name: &str, image: &ImageSpec) -> Result<Base, StartError> {
    let (file, cached) = match (&image.digest, &image.path) {
        (Some(d), _) => (resolve_file(ctx, name, d).await?, true),
        (None, Some(p)) => (PathBuf::from(p), false),
        (None, None) => {
            return Err(StartError::BadImage {
                image: name.to_string(),
                why: "names neither a digest nor a path".into(),
            })
        }
    };
    Ok(Base {
        file,
        format: image.format,
        size: image.size.map(|s| s.bytes()),
        cached,
    })
}
