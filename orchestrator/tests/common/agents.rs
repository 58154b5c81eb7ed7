//! Real worker agents for tests on this machine: the `lightbyte worker` binary driving real `vmm`
//! processes that boot tiny hand-made PVH kernels (this machine's KVM runs those, not Linux), in
//! a network namespace the test thread enters first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use orchestrator::worker::record::{Layout, Record};

/// An ELF with a PVH entry note whose code runs `code` at 1 MiB in 32-bit protected mode.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
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
pub const SPIN: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb0, b'K', 0xee, 0xb0, b'\n', 0xee, 0xfa, 0xf4, 0xeb, 0xfd,
];
/// Counts down from 2^18 (about a quarter of a second on these machines' KVM, so the boot request
/// is answered first), then writes S5|SLP_EN to the ACPI sleep register: the guest powers off.
pub const POWEROFF: &[u8] = &[
    0xb9, 0x00, 0x00, 0x04, 0x00, 0xe2, 0xfe, 0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4,
];

/// Counts down from 2^18 (as [`POWEROFF`], so the boot request is answered first), then writes
/// 1 to the test-only seccomp probe port (0x5eb), which makes a VMM started with
/// LIGHTBYTE_TEST_SECCOMP_PROBE=1 call a system call no filter allows; then `cli; hlt`.
pub const SECCOMP_PROBE: &[u8] = &[
    0xb9, 0x00, 0x00, 0x04, 0x00, 0xe2, 0xfe, 0x66, 0xba, 0xeb, 0x05, 0xb0, 0x01, 0xee, 0xfa, 0xf4,
    0xeb, 0xfd,
];

/// Puts this thread (and every thread and process it starts from now on) into a new network
/// namespace with loopback up.
pub fn enter_own_netns() {
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

pub struct Agent {
    child: Option<Child>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pub log: PathBuf,
}

/// Where a test agent lives: its name, VM subnet and bridge, and whether it serves other
/// workers (`--listen`, needed to move VMs off it).
pub struct AgentOpts<'a> {
    pub name: &'a str,
    pub subnet: &'a str,
    pub bridge: &'a str,
    pub listen: bool,
}

impl Agent {
    /// Agent "w1" on 10.77.0.0/24.
    pub fn start(etcd: &str, state: &Path, vmm: &Path) -> Agent {
        Agent::start_with(
            etcd,
            state,
            vmm,
            &AgentOpts {
                name: "w1",
                subnet: "10.77.0.0/24",
                bridge: "lbbr0",
                listen: false,
            },
        )
    }

    pub fn start_with(etcd: &str, state: &Path, vmm: &Path, o: &AgentOpts) -> Agent {
        Agent::start_with_env(etcd, state, vmm, o, &[])
    }

    /// An agent whose environment (inherited by its vmm processes) also holds `env`.
    pub fn start_with_env(
        etcd: &str,
        state: &Path,
        vmm: &Path,
        o: &AgentOpts,
        env: &[(&str, &str)],
    ) -> Agent {
        let mut args = [
            "worker",
            "--etcd",
            etcd,
            "--name",
            o.name,
            "--bridge",
            o.bridge,
            "--cpus",
            "8",
            "--memory",
            "2G",
            "--state-dir",
            &state.display().to_string(),
            "--vmm",
            &vmm.display().to_string(),
            "--subnet",
            o.subnet,
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
        if o.listen {
            args.extend(["--listen".to_string(), "127.0.0.1:0".to_string()]);
            args.extend([
                "--tokens".to_string(),
                super::tokens_file().display().to_string(),
            ]);
        }
        let mut a = Agent {
            child: None,
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: state.with_extension("log"),
        };
        a.spawn();
        a
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lightbyte"));
        let child = super::client_env(&mut cmd)
            .args(&self.args)
            // What a worker presents to the control plane (image pulls) and to other workers.
            .env("LIGHTBYTE_TOKEN", super::NODE_TOKEN)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills every vmm the agent left (they run in their own process groups, and outlive it).
pub struct VmmReaper(pub PathBuf);

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

pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

pub fn kill9(pid: u32) {
    // SAFETY: kill(2) on a vmm pid this test read from the agent's record.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

pub fn record(state: &Path, name: &str) -> Option<Record> {
    let (records, _) = Layout::new(state).load_all().ok()?;
    records.into_iter().find(|r| r.name == name)
}

/// Prints the agent's log if the test fails while it is alive.
pub struct LogOnPanic(PathBuf);

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            eprintln!("agent log:\n{log}");
        }
    }
}

pub fn log_on_panic(path: &Path) -> LogOnPanic {
    LogOnPanic(path.to_path_buf())
}
