//! Scale groups, moves, lost and forgotten workers with two real worker agents on this machine:
//! real `vmm` processes booting a tiny PVH kernel that spins forever, TAPs on two bridges,
//! qcow2 overlays on disk, all in a network namespace of the test's own. (These guests never
//! answer on the network, so they stay Starting; readiness-driven behaviour is tested with fake
//! workers in tests/groups.rs, and a real guest moving between workers in the cluster scenario.)
//!
//! One test, in phases: a group scaled 0 → 3 → 5 → 2 (deleted members' processes, TAPs and
//! overlays gone); a stopped VM with data in its root overlay and a volume moved off a drained
//! worker (bytes checked on the target, the source emptied); an agent killed while its VMs run
//! (members replaced after the grace, the VM with a volume Lost, then re-adopted with the same
//! process); a worker killed outright and forgotten (the VM with a volume waits, starts on fresh
//! disks only when asked; the old agent, back, archives its copies and runs none of them).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::agents::{
    alive, enter_own_netns, kill9, log_on_panic, pvh_elf, record, Agent, AgentOpts, VmmReaper, SPIN,
};
use common::{control_plane, eventually, Etcd};
use orchestrator::client::ApiClient;
use orchestrator::model::{
    ByteSize, DiskFormat, ImageSpec, ScaleGroupSpec, Seconds, UpdateStrategy, Vm, VmSpec, VmState,
    VmTemplate, VolumeSpec, WorkerSpec, WorkerState,
};
use orchestrator::store::Store;
use orchestrator::worker::netdev;
use orchestrator::worker::record::Layout;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(40);

fn opts(name: &str) -> AgentOpts<'_> {
    let (subnet, bridge) = match name {
        "w1" => ("10.77.1.0/24", "lbbr1"),
        _ => ("10.77.2.0/24", "lbbr2"),
    };
    AgentOpts {
        name,
        subnet,
        bridge,
        listen: true,
    }
}

/// Members of group `g` with their records, once each has a running vmm.
async fn members(store: &Store, g: &str) -> Vec<Vm> {
    let (vms, _) = store.list::<VmSpec>().await.unwrap();
    vms.into_iter()
        .filter(|vm| vm.metadata.owner.as_ref().is_some_and(|o| o.name == g))
        .collect()
}

/// Every VM the agents run, by name, with its vmm pid: (worker, pid).
fn local_vms(states: &[(&str, &Path)]) -> Vec<(String, String, Option<u32>, String)> {
    let mut out = Vec::new();
    for (w, dir) in states {
        let (records, _) = Layout::new(*dir).load_all().unwrap_or_default();
        for r in records {
            out.push((w.to_string(), r.name, r.pid.filter(|p| alive(*p)), r.tap));
        }
    }
    out
}

async fn state_of(store: &Store, name: &str, want: VmState) -> Vm {
    eventually(&format!("{name} {want}"), LIMIT, || async {
        let v = store.get::<VmSpec>(name).await.ok()?;
        (v.status.state == want).then_some(v)
    })
    .await
}

async fn worker_state(store: &Store, name: &str, want: WorkerState) {
    eventually(&format!("{name} {want}"), LIMIT, || async {
        let w = store.get::<WorkerSpec>(name).await.ok()?;
        (w.status.state == want).then_some(())
    })
    .await
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..64 * 1024)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn write_disk(path: &Path, offset: u64, data: &[u8]) {
    let img = qcow::Image::open(
        path,
        &qcow::OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    img.write_at(offset, data).unwrap();
    img.flush().unwrap();
}

fn read_disk(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let img = qcow::Image::open(path, &qcow::OpenOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    img.read_at(offset, &mut buf).unwrap();
    buf
}

#[test]
fn two_real_workers_scale_move_lose_and_forget() {
    enter_own_netns();
    let vmm = Path::new(env!("CARGO_BIN_EXE_lightbyte")).with_file_name("vmm");
    assert!(
        vmm.is_file(),
        "{} is missing: cargo build --bins",
        vmm.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let s1: PathBuf = dir.path().join("w1");
    let s2: PathBuf = dir.path().join("w2");
    let _reap1 = VmmReaper(s1.clone());
    let _reap2 = VmmReaper(s2.clone());
    let etcd = Etcd::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = etcd.store().await;
        let plane = control_plane(&etcd, "cp").await;
        let api = ApiClient::new(&plane.url(), LIMIT).unwrap();
        let none = json!({});
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 4 << 20]).unwrap();
        let kernel = dir.path().join("spin.elf");
        std::fs::write(&kernel, pvh_elf(SPIN)).unwrap();
        api.create(
            "spin",
            &ImageSpec {
                digest: None,
                path: Some(base.display().to_string()),
                format: DiskFormat::Raw,
                size: None,
                kernel: Some(kernel.display().to_string()),
                initramfs: None,
                cmdline: None,
                boot: Default::default(),
            },
        )
        .await
        .unwrap();
        let mut a1 = Agent::start_with(&etcd.url(), &s1, &vmm, &opts("w1"));
        let mut a2 = Agent::start_with(&etcd.url(), &s2, &vmm, &opts("w2"));
        let _l1 = log_on_panic(&a1.log);
        let _l2 = log_on_panic(&a2.log);
        worker_state(&store, "w1", WorkerState::Ready).await;
        worker_state(&store, "w2", WorkerState::Ready).await;
        let states = [("w1", s1.as_path()), ("w2", s2.as_path())];

        // -- A stopped VM with data moves off a drained worker.
        // w2 is cordoned while "keep" is placed, so it lands on w1.
        api.action::<WorkerSpec, _>("w2", "drain", &none)
            .await
            .unwrap();
        worker_state(&store, "w2", WorkerState::Drained).await;
        api.create(
            "keep-data",
            &VolumeSpec {
                image: "spin".into(),
                size: ByteSize::mib(8),
            },
        )
        .await
        .unwrap();
        let keep = VmSpec {
            cpus: 1,
            memory: ByteSize::mib(64),
            image: "spin".into(),
            volumes: vec!["keep-data".into()],
            network: "default".into(),
            group: None,
            labels: Default::default(),
            cmdline: None,
            power: Default::default(),
        };
        api.create("keep", &keep).await.unwrap();
        let first = state_of(&store, "keep", VmState::Starting).await;
        assert_eq!(first.status.placement.as_deref(), Some("w1"));
        api.action::<WorkerSpec, _>("w2", "uncordon", &none)
            .await
            .unwrap();
        // Off (disks kept), data written into both disks.
        api.action::<VmSpec, _>("keep", "stop", &none)
            .await
            .unwrap();
        state_of(&store, "keep", VmState::Stopped).await;
        let rec = record(&s1, "keep").unwrap();
        assert!(rec.pid.is_none_or(|p| !alive(p)), "keep is off");
        write_disk(&s1.join("vms/keep/root.qcow2"), 1 << 20, &pattern(1));
        write_disk(&s1.join("volumes/keep-data.qcow2"), 2 << 20, &pattern(2));
        assert_eq!(
            store
                .get::<VolumeSpec>("keep-data")
                .await
                .unwrap()
                .status
                .worker
                .as_deref(),
            Some("w1")
        );

        api.action::<WorkerSpec, _>("w1", "drain", &none)
            .await
            .unwrap();
        worker_state(&store, "w1", WorkerState::Drained).await;
        let moved = state_of(&store, "keep", VmState::Stopped).await;
        assert_eq!(moved.status.placement.as_deref(), Some("w2"));
        assert_eq!(moved.status.moving, None);
        assert_eq!(
            read_disk(&s2.join("vms/keep/root.qcow2"), 1 << 20, 65536),
            pattern(1)
        );
        assert_eq!(
            read_disk(&s2.join("volumes/keep-data.qcow2"), 2 << 20, 65536),
            pattern(2)
        );
        assert_eq!(
            store
                .get::<VolumeSpec>("keep-data")
                .await
                .unwrap()
                .status
                .worker
                .as_deref(),
            Some("w2")
        );
        eventually("the source's copy gone", LIMIT, || async {
            (!s1.join("vms/keep").exists() && !s1.join("volumes/keep-data.qcow2").exists())
                .then_some(())
        })
        .await;
        assert!(
            store
                .get_raw(&orchestrator::store::keys::move_token("keep"))
                .await
                .unwrap()
                .is_none(),
            "the move's token is gone with the move"
        );
        // Started again on w2, from the moved disks.
        api.action::<VmSpec, _>("keep", "start", &none)
            .await
            .unwrap();
        state_of(&store, "keep", VmState::Starting).await;
        let keep_pid = eventually("keep's vmm on w2", LIMIT, || async {
            record(&s2, "keep")?.pid.filter(|p| alive(*p))
        })
        .await;
        api.action::<WorkerSpec, _>("w1", "uncordon", &none)
            .await
            .unwrap();
        worker_state(&store, "w1", WorkerState::Ready).await;

        // -- A scale group: 0 -> 3 -> 5 -> 2, spread, and what is deleted is gone.
        let group = ScaleGroupSpec {
            replicas: 0,
            template: VmTemplate {
                cpus: 1,
                memory: ByteSize::mib(64),
                image: "spin".into(),
                volumes: vec![],
                network: "default".into(),
                labels: Default::default(),
                cmdline: None,
            },
            update: UpdateStrategy::default(),
            replace_lost_after: Seconds(4),
        };
        api.create("app", &group).await.unwrap();
        let mut seen = BTreeSet::new();
        for n in [3usize, 5, 2] {
            api.action::<ScaleGroupSpec, _>("app", "scale", &json!({ "replicas": n }))
                .await
                .unwrap();
            let running = eventually(&format!("{n} members with a vmm each"), LIMIT, || async {
                let m = members(&store, "app").await;
                let names: BTreeSet<String> = m.iter().map(|v| v.name().to_string()).collect();
                let local: Vec<_> = local_vms(&states)
                    .into_iter()
                    .filter(|(_, name, _, _)| name.starts_with("app-"))
                    .collect();
                let ok = m.len() == n
                    && local.len() == n
                    && local
                        .iter()
                        .all(|(_, name, pid, _)| pid.is_some() && names.contains(name));
                ok.then_some(local)
            })
            .await;
            let workers: BTreeSet<&str> = running.iter().map(|(w, ..)| w.as_str()).collect();
            assert_eq!(workers.len(), 2, "spread over both workers: {running:?}");
            for (w, name, pid, tap) in running {
                seen.insert((w, name, pid.unwrap(), tap));
            }
        }
        let now: BTreeSet<String> = members(&store, "app")
            .await
            .iter()
            .map(|v| v.name().to_string())
            .collect();
        for (w, name, pid, tap) in seen.iter().filter(|(_, n, ..)| !now.contains(n)) {
            let state = if w == "w1" { &s1 } else { &s2 };
            eventually(
                &format!("deleted member {name} cleaned up"),
                LIMIT,
                || async {
                    (!alive(*pid) && !netdev::exists(tap) && !state.join("vms").join(name).exists())
                        .then_some(())
                },
            )
            .await;
        }

        // -- w2's agent dies; its VMs keep running.
        let app_on_w2: Vec<String> = members(&store, "app")
            .await
            .iter()
            .filter(|v| v.status.placement.as_deref() == Some("w2"))
            .map(|v| v.name().to_string())
            .collect();
        assert_eq!(app_on_w2.len(), 1);
        a2.kill();
        state_of(&store, "keep", VmState::Lost).await;
        assert!(alive(keep_pid), "the VM runs on without its agent");
        // Within the grace period nothing of w2's starts on w1.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(members(&store, "app")
            .await
            .iter()
            .any(|v| v.name() == app_on_w2[0]));
        // After it the member (no volumes) is replaced on w1; keep (a volume) stays Lost.
        eventually("the lost member replaced on w1", LIMIT, || async {
            let m = members(&store, "app").await;
            let ok = m.len() == 2
                && !m.iter().any(|v| v.name() == app_on_w2[0])
                && m.iter()
                    .all(|v| v.status.placement.as_deref() == Some("w1"));
            ok.then_some(())
        })
        .await;
        let lost = store.get::<VmSpec>("keep").await.unwrap();
        assert_eq!(
            (lost.status.state, lost.status.placement.as_deref()),
            (VmState::Lost, Some("w2"))
        );
        assert!(local_vms(&[("w1", &s1)])
            .iter()
            .all(|(_, n, ..)| n != "keep"));
        // The agent comes back: keep re-adopted (same vmm), the replaced member stopped.
        a2.spawn();
        state_of(&store, "keep", VmState::Starting).await;
        assert_eq!(record(&s2, "keep").unwrap().pid, Some(keep_pid));
        assert!(alive(keep_pid));
        eventually("the replaced member gone from w2", LIMIT, || async {
            (!s2.join("vms").join(&app_on_w2[0]).exists()).then_some(())
        })
        .await;

        // -- w2 dies outright (agent and VMs) and is forgotten.
        a2.kill();
        for (_, _, pid, _) in local_vms(&[("w2", &s2)]) {
            if let Some(p) = pid {
                kill9(p);
            }
        }
        state_of(&store, "keep", VmState::Lost).await;
        api.action::<WorkerSpec, _>("w2", "forget", &none)
            .await
            .unwrap();
        let given_up = eventually("keep given up", LIMIT, || async {
            let v = store.get::<VmSpec>("keep").await.ok()?;
            v.status.placement.is_none().then_some(v)
        })
        .await;
        assert_eq!(given_up.status.state, VmState::Lost);
        let why = given_up.status.message.unwrap();
        assert!(
            why.contains("disks lived only on worker w2") && why.contains("--fresh-disks"),
            "{why}"
        );
        // Nothing starts it by itself.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(store
            .get::<VmSpec>("keep")
            .await
            .unwrap()
            .status
            .placement
            .is_none());
        // The old agent comes back: it archives its copies and runs none of them.
        a2.spawn();
        eventually("w2 serving again", LIMIT, || async {
            let w = store.get::<WorkerSpec>("w2").await.ok()?;
            (w.status.state == WorkerState::Ready && !w.spec.forgotten).then_some(())
        })
        .await;
        assert!(
            Layout::new(&s2).load_all().unwrap().0.is_empty(),
            "no old VM left to run"
        );
        let archived: Vec<_> = std::fs::read_dir(s2.join("archive"))
            .unwrap()
            .flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            archived.iter().any(|n| n.starts_with("keep-")),
            "{archived:?}"
        );
        assert!(archived.iter().any(|n| n == "volumes"), "{archived:?}");
        assert!(a2.log().contains("archiving its old VMs"));
        // The operator accepts the loss: keep starts again on empty disks.
        api.action::<VmSpec, _>("keep", "start", &json!({"fresh_disks": true}))
            .await
            .unwrap();
        let fresh = state_of(&store, "keep", VmState::Starting).await;
        let w = fresh.status.placement.clone().unwrap();
        let state = if w == "w1" { &s1 } else { &s2 };
        let root = eventually("keep's fresh root", LIMIT, || async {
            let r = record(state, "keep")?;
            r.pid
                .filter(|p| alive(*p))
                .map(|_| state.join("vms/keep/root.qcow2"))
        })
        .await;
        assert!(root.exists());
        a1.kill();
        a2.kill();
        plane.shutdown(Duration::from_secs(2)).await;
    });
}
