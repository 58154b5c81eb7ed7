//! The worker agent on this machine, without a Linux guest: the real `lightbyte worker` and real
//! `vmm` processes, booting tiny hand-made PVH kernels that this machine's KVM can run (one
//! prints a line and halts forever, one powers the VM off at once). The whole test runs in a
//! network namespace of its own (unshared by the test thread before anything starts, so etcd,
//! the agent, its bridge, the TAPs and the VMMs all live and die there).
//!
//! It checks what does not need a guest network: a placed VM is started (overlay, TAP, vmm,
//! boot) and reported Starting with its boot time; a killed vmm is restarted with the same
//! address and disk, until too many crashes mark it Failed; a guest that powers off is Stopped
//! and not restarted; a VM on a network the worker does not serve is Failed with the reason; a
//! killed agent leaves its VMs running and its successor re-adopts them (same pid) and cleans
//! up a VM deleted while it was down; a delete stops the VM and removes process, TAP and disk.
//! Reaching Running with the guest's IP needs a real guest: tests/tests/cluster.rs.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::agents::{
    alive, enter_own_netns, kill9, log_on_panic, pvh_elf, record, Agent, VmmReaper, POWEROFF, SPIN,
};
use common::{control_plane, eventually, Etcd};
use orchestrator::client::ApiClient;
use orchestrator::model::{ByteSize, DiskFormat, ImageSpec, Vm, VmSpec, VmState};

const LIMIT: Duration = Duration::from_secs(30);

fn vm(image: &str, network: &str) -> VmSpec {
    VmSpec {
        cpus: 1,
        memory: ByteSize::mib(64),
        image: image.into(),
        volumes: vec![],
        network: network.into(),
        group: None,
        labels: Default::default(),
        cmdline: None,
        power: Default::default(),
    }
}

async fn state_of(api: &ApiClient, name: &str, want: VmState) -> Vm {
    eventually(&format!("{name} to be {want}"), LIMIT, || async {
        let v: Vm = api.get::<VmSpec>(name).await.ok()?;
        (v.status.state == want).then_some(v)
    })
    .await
}

#[test]
fn worker_starts_restarts_readopts_and_cleans_up() {
    enter_own_netns();
    let vmm = Path::new(env!("CARGO_BIN_EXE_lightbyte")).with_file_name("vmm");
    assert!(
        vmm.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --bins)",
        vmm.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("w1");
    let _reaper = VmmReaper(state.clone());
    let mut etcd = Etcd::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let plane = control_plane(&etcd, "cp").await;
        let api = ApiClient::new(&plane.url(), LIMIT).unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 4 << 20]).unwrap();
        for (name, code) in [("spin", SPIN), ("off", POWEROFF)] {
            let kernel = dir.path().join(format!("{name}.elf"));
            std::fs::write(&kernel, pvh_elf(code)).unwrap();
            let image = ImageSpec {
                digest: None,
                path: Some(base.display().to_string()),
                format: DiskFormat::Raw,
                size: None,
                kernel: Some(kernel.display().to_string()),
                initramfs: None,
                cmdline: None,
                boot: Default::default(),
            };
            api.create(name, &image).await.unwrap();
        }
        let mut agent = Agent::start(&etcd.url(), &state, &vmm);
        let _log = log_on_panic(&agent.log);

        // Start: placed, booted, Starting with a boot time (no guest network answers here).
        api.create("a", &vm("spin", "default")).await.unwrap();
        let a = state_of(&api, "a", VmState::Starting).await;
        assert_eq!(a.status.placement.as_deref(), Some("w1"));
        let rec = eventually("a's vmm", LIMIT, || async {
            record(&state, "a").filter(|r| r.pid.is_some() && r.boot_time.is_some())
        })
        .await;
        eventually("a's boot time reported", LIMIT, || async {
            let v: Vm = api.get::<VmSpec>("a").await.ok()?;
            (v.status.boot_time.is_some() && v.status.boot_time == rec.boot_time).then_some(())
        })
        .await;
        assert_eq!(a.status.ip, None, "no guest answered, so no IP is reported");
        let pid = rec.pid.unwrap();
        assert!(alive(pid));
        assert!(
            orchestrator::worker::netdev::exists(&rec.tap),
            "TAP {}",
            rec.tap
        );
        assert_eq!(rec.ip.to_string(), "10.77.0.2");
        let root = state.join("vms/a/root.qcow2");
        // The running vmm holds the image's lock: read the header as bytes.
        let head = std::fs::read(&root).unwrap();
        assert_eq!(&head[..4], b"QFI\xfb", "root volume is qcow2");
        let backing = base.display().to_string();
        assert!(
            head.windows(backing.len()).any(|w| w == backing.as_bytes()),
            "root volume names {backing} as its backing file"
        );
        // Nothing of a VM is readable by other users of the host.
        let mode = |p: &std::path::Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777
        };
        for dir in [
            state.clone(),
            state.join("vms"),
            state.join("vms/a"),
            state.join("volumes"),
        ] {
            assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        }
        for file in ["vms/a/root.qcow2", "vms/a/vm.json", "vms/a/vmm.log"] {
            assert_eq!(mode(&state.join(file)), 0o600, "{file}");
        }
        let console = state.join("vms/a/jail/console.log");
        eventually("a's console", LIMIT, || async {
            std::fs::read_to_string(&console)
                .ok()
                .filter(|c| c.contains('K'))
        })
        .await;
        // The vmm makes the console file itself (capped and rotated, see vmm's serial_log).
        assert_eq!(mode(&console), 0o600, "console.log");

        // A killed vmm is restarted with the same address, TAP and disk.
        kill9(pid);
        let rec2 = eventually("a restarted", LIMIT, || async {
            record(&state, "a").filter(|r| r.restarts == 1 && r.pid.is_some_and(|p| p != pid))
        })
        .await;
        assert_eq!(
            (rec2.ip, &rec2.tap, &rec2.mac),
            (rec.ip, &rec.tap, &rec.mac)
        );
        eventually("a's restart reported", LIMIT, || async {
            let v: Vm = api.get::<VmSpec>("a").await.ok()?;
            v.status.message.filter(|m| m.contains("restarted 1 times"))
        })
        .await;

        // A guest that powers off is Stopped and stays so.
        api.create("off-1", &vm("off", "default")).await.unwrap();
        let off = state_of(&api, "off-1", VmState::Stopped).await;
        assert_eq!(off.status.message.as_deref(), Some("the guest powered off"));
        // A network this worker does not serve.
        api.create("blue-1", &vm("spin", "blue")).await.unwrap();
        let blue = state_of(&api, "blue-1", VmState::Failed).await;
        assert!(
            blue.status
                .message
                .as_deref()
                .unwrap_or("")
                .contains("not \"blue\""),
            "{:?}",
            blue.status.message
        );
        assert!(!state.join("vms/blue-1").exists());
        // `lightbyte vm wait`, the scripts' way to wait for these states.
        let server = plane.url();
        let wait = |args: &[&str]| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_lightbyte"));
            let out = common::client_env(&mut cmd)
                .args(["--server", &server, "vm", "wait"])
                .args(args)
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        };
        assert!(wait(&["off-1", "--for", "stopped", "--timeout", "10s"]).0);
        let (ok, err) = wait(&["blue-1", "--timeout", "10s"]);
        assert!(
            !ok && err.contains("vm blue-1 failed: worker w1 serves network"),
            "{err}"
        );
        let (ok, err) = wait(&["nope", "--timeout", "10s"]);
        assert!(!ok && err.contains("vm nope does not exist"), "{err}");
        let (ok, err) = wait(&["off-1", "--timeout", "1s"]);
        assert!(
            !ok && err.contains("timed out after 1s waiting for: off-1 (Stopped)"),
            "{err}"
        );

        // Agent crash: VMs keep running; b is deleted while no agent runs.
        api.create("b", &vm("spin", "default")).await.unwrap();
        let b = eventually("b's vmm", LIMIT, || async {
            record(&state, "b").filter(|r| r.pid.is_some() && r.boot_time.is_some())
        })
        .await;
        let a_pid = rec2.pid.unwrap();
        agent.kill();
        std::thread::sleep(Duration::from_millis(500));
        assert!(alive(a_pid), "a's vmm died with the agent");
        assert!(alive(b.pid.unwrap()), "b's vmm died with the agent");
        api.delete::<VmSpec>("b").await.unwrap();
        agent.spawn();
        eventually("b cleaned up by the new agent", LIMIT, || async {
            (!alive(b.pid.unwrap())
                && !state.join("vms/b").exists()
                && !orchestrator::worker::netdev::exists(&b.tap))
            .then_some(())
        })
        .await;
        assert!(
            agent.log().contains("re-adopted running vmm"),
            "{}",
            agent.log()
        );
        assert!(alive(a_pid), "a was restarted instead of re-adopted");
        assert_eq!(record(&state, "a").unwrap().pid, Some(a_pid));

        // etcd down: a vmm that dies meanwhile is not failed for it; it comes back once etcd
        // answers.
        let booted = |log: &str| log.matches("booted vm=a ").count();
        let before = booted(&agent.log());
        etcd.stop();
        kill9(a_pid);
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            !agent.log().contains("too many restarts"),
            "{}",
            agent.log()
        );
        etcd.restart();
        eventually("a restarted after the outage", LIMIT, || async {
            (booted(&agent.log()) > before).then_some(())
        })
        .await;
        let a_pid = record(&state, "a").and_then(|r| r.pid).unwrap();

        // Crash loop: after --max-restarts (2) restarts within ten minutes (the crash during
        // the outage was the first), the next crash makes it Failed.
        let before = booted(&agent.log());
        kill9(a_pid);
        eventually("a restarted again", LIMIT, || async {
            (booted(&agent.log()) > before).then_some(())
        })
        .await;
        let last = record(&state, "a").and_then(|r| r.pid).unwrap();
        kill9(last);
        let failed = state_of(&api, "a", VmState::Failed).await;
        assert!(
            failed
                .status
                .message
                .as_deref()
                .unwrap_or("")
                .contains("not restarting"),
            "{:?}",
            failed.status.message
        );
        // The failure is kept on disk: a new agent keeps reporting Failed, not a power-off.
        let why = record(&state, "a")
            .and_then(|r| r.failed)
            .unwrap_or_default();
        assert!(why.contains("not restarting"), "{why:?}");
        let registered = |log: &str| log.matches("registered worker=w1").count();
        let before = registered(&agent.log());
        agent.kill();
        agent.spawn();
        eventually("the agent back", LIMIT, || async {
            (registered(&agent.log()) > before).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let still = api.get::<VmSpec>("a").await.unwrap();
        assert_eq!(still.status.state, VmState::Failed, "{:?}", still.status);

        // A named volume is made on first use and removed once its Volume is deleted.
        let data = orchestrator::model::VolumeSpec {
            image: "spin".into(),
            size: ByteSize::mib(8),
        };
        api.create("data", &data).await.unwrap();
        let mut with_volume = vm("spin", "default");
        with_volume.volumes = vec!["data".into()];
        api.create("c", &with_volume).await.unwrap();
        let c = eventually("c's vmm", LIMIT, || async {
            record(&state, "c").filter(|r| r.pid.is_some() && r.boot_time.is_some())
        })
        .await;
        for name in ["a", "c", "off-1", "blue-1"] {
            api.delete::<VmSpec>(name).await.unwrap();
        }
        eventually("everything removed", LIMIT, || async {
            let gone = !alive(c.pid.unwrap())
                && !orchestrator::worker::netdev::exists(&c.tap)
                && std::fs::read_dir(state.join("vms")).ok()?.next().is_none();
            gone.then_some(())
        })
        .await;
        let volume = state.join("volumes/data.qcow2");
        assert!(volume.is_file(), "the named volume outlives its VM");
        api.delete::<orchestrator::model::VolumeSpec>("data")
            .await
            .unwrap();
        eventually("the volume's file removed", LIMIT, || async {
            (!volume.exists()).then_some(())
        })
        .await;
        let log = agent.log();
        assert!(!log.contains("panicked"), "{log}");
        plane.shutdown(Duration::from_secs(2)).await;
    });
}
