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

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{control_plane, eventually, Etcd};
use orchestrator::client::ApiClient;
use orchestrator::model::{ByteSize, DiskFormat, ImageSpec, Vm, VmSpec, VmState};
use orchestrator::worker::record::{Layout, Record};

const LIMIT: Duration = Duration::from_secs(30);

/// An ELF with a PVH entry note whose code runs `code` at 1 MiB in 32-bit protected mode.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    const CODE_OFF: u64 = 0x1000;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // name size ("Xen\0")
    note.extend_from_slice(&4u32.to_le_bytes()); // descriptor size
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD as u32).to_le_bytes());
    let note_off = 64 + 2 * 56u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD.to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 2, 64, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    let mut phdr = |kind: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
        elf.extend_from_slice(&kind.to_le_bytes());
        elf.extend_from_slice(&flags.to_le_bytes());
        for v in [off, addr, addr, size, size, align] {
            elf.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(1, 5, CODE_OFF, LOAD, code.len() as u64, 0x1000); // PT_LOAD, R+X
    phdr(4, 4, note_off, 0, note.len() as u64, 4); // PT_NOTE
    elf.extend_from_slice(&note);
    elf.resize(CODE_OFF as usize, 0);
    elf.extend_from_slice(code);
    elf
}

/// Prints "K" on COM1, then `cli; hlt` forever: a VM that runs until stopped.
const SPIN: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb0, b'K', 0xee, 0xb0, b'\n', 0xee, 0xfa, 0xf4, 0xeb, 0xfd,
];
/// Counts down from 2^18 (about a quarter of a second on these machines' KVM, so the boot request
/// is answered first), then writes S5|SLP_EN to the ACPI sleep register: the guest powers off.
const POWEROFF: &[u8] = &[
    0xb9, 0x00, 0x00, 0x04, 0x00, 0xe2, 0xfe, 0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4,
];

/// Puts this thread (and every thread and process it starts from now on) into a new network
/// namespace with loopback up.
fn enter_own_netns() {
    // SAFETY: unshare(2) with CLONE_NEWNET only changes this thread's network namespace; no
    // memory is involved. Threads and children created later inherit it.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "unshare(CLONE_NEWNET): {} (the worker tests need root)",
        std::io::Error::last_os_error()
    );
    let ok = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip (iproute2)")
        .success();
    assert!(ok, "ip link set lo up");
}

struct Agent {
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

impl Agent {
    fn start(etcd: &str, state: &Path, vmm: &Path) -> Agent {
        let args = [
            "worker",
            "--etcd",
            etcd,
            "--name",
            "w1",
            "--cpus",
            "8",
            "--memory",
            "2G",
            "--state-dir",
            &state.display().to_string(),
            "--vmm",
            &vmm.display().to_string(),
            "--subnet",
            "10.77.0.0/24",
            "--lease-ttl",
            "2s",
            "--stop-timeout",
            "1s",
            "--max-restarts",
            "2",
            "--resync",
            "2s",
        ]
        .map(String::from)
        .to_vec();
        let mut a = Agent {
            child: None,
            args,
            log: state.with_extension("log"),
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_lightbyte"))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills every vmm the agent left (they run in their own process groups, and outlive it).
struct VmmReaper(PathBuf);

impl Drop for VmmReaper {
    fn drop(&mut self) {
        if let Ok((records, _)) = Layout::new(&self.0).load_all() {
            for r in records {
                if let Some(pid) = r.pid {
                    // SAFETY: kill(2) only sends a signal; a stale pid at worst hits nothing.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

fn kill9(pid: u32) {
    // SAFETY: kill(2) on a vmm pid this test read from the agent's record.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

fn record(state: &Path, name: &str) -> Option<Record> {
    let (records, _) = Layout::new(state).load_all().ok()?;
    records.into_iter().find(|r| r.name == name)
}

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
        let api = ApiClient::new(&format!("http://{}", plane.addr()), LIMIT).unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 4 << 20]).unwrap();
        for (name, code) in [("spin", SPIN), ("off", POWEROFF)] {
            let kernel = dir.path().join(format!("{name}.elf"));
            std::fs::write(&kernel, pvh_elf(code)).unwrap();
            let image = ImageSpec {
                path: base.display().to_string(),
                format: DiskFormat::Raw,
                size: None,
                kernel: Some(kernel.display().to_string()),
                initramfs: None,
                cmdline: None,
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
        let console = state.join("vms/a/console.log");
        eventually("a's console", LIMIT, || async {
            std::fs::read_to_string(&console)
                .ok()
                .filter(|c| c.contains('K'))
        })
        .await;

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
        let server = format!("http://{}", plane.addr());
        let wait = |args: &[&str]| {
            let out = Command::new(env!("CARGO_BIN_EXE_lightbyte"))
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

/// Prints the agent's log if the test fails while it is alive.
struct LogOnPanic(PathBuf);

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            eprintln!("agent log:\n{log}");
        }
    }
}

fn log_on_panic(path: &Path) -> LogOnPanic {
    LogOnPanic(path.to_path_buf())
}
