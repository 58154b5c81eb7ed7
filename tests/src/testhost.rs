//! The test host: where scenarios that boot guests run.
//!
//! On a machine without VMX/SVM (our build and CI machines: their `/dev/kvm` is a PVM backend
//! that cannot run Linux guests) this is a QEMU-TCG VM emulating an AMD EPYC with SVM and NPT,
//! running Debian's kernel with `kvm_amd`. The outer root is shared read-only over 9p and a work
//! directory read-write, both at their outer paths, so a scenario script uses outer paths as is.
//! An agent inside (`tests/testhost/agent.sh`) runs the scripts queued in the work directory.
//! On a machine with VMX/SVM, scenarios run directly with `sh`, through the same [`Host::run`].
//!
//! One test host serves every scenario of a test process, one scenario at a time; it is killed
//! with the process (parent-death signal) and restarted when a scenario times out.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::artifacts;
use crate::paths::{profile_dir, repo_root};

/// Size of the test host's scratch disk (sparse on the outer machine).
const SCRATCH_SIZE: u64 = 8 << 30;
/// Where scenarios find the scratch filesystem inside the test host.
const SCRATCH_MOUNT: &str = "/run/lightbyte-scratch";

/// Time the test host gets to boot and start its agent.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(50);

/// How scenarios are run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Inside the QEMU-TCG test host.
    Qemu,
    /// Directly on this machine (its CPU has VMX or SVM).
    Local,
}

impl Mode {
    /// `LIGHTBYTE_TESTHOST=qemu|local` forces a mode; otherwise local exactly when this CPU shows
    /// `vmx` or `svm`.
    pub fn detect() -> Mode {
        match std::env::var("LIGHTBYTE_TESTHOST").as_deref() {
            Ok("qemu") => return Mode::Qemu,
            Ok("local") => return Mode::Local,
            _ => {}
        }
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw_virt = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if hw_virt {
            Mode::Local
        } else {
            Mode::Qemu
        }
    }
}

/// What a scenario printed and how it ended.
#[derive(Clone, Debug)]
pub struct ScriptOutput {
    /// Exit status of the script.
    pub status: i32,
    /// Its standard output and error, interleaved.
    pub output: String,
}

struct Qemu {
    child: Child,
    queue: PathBuf,
}

struct Inner {
    qemu: Option<Qemu>,
    seq: u32,
}

/// A place to run scenarios.
pub struct Host {
    mode: Mode,
    work: PathBuf,
    inner: Mutex<Inner>,
}

/// Removes work directories left by test processes that no longer exist.
fn remove_stale_work_dirs(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let pid: Option<i32> = e.file_name().to_str().and_then(|n| n.parse().ok());
        if let Some(pid) = pid {
            // SAFETY: kill with signal 0 only checks whether the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0;
            if !alive {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

impl Host {
    fn new() -> Result<Self> {
        let root = profile_dir()?.join("testhost-work");
        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        remove_stale_work_dirs(&root);
        let work = root.join(std::process::id().to_string());
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work)?;
        Ok(Self {
            mode: Mode::detect(),
            work,
            inner: Mutex::new(Inner { qemu: None, seq: 0 }),
        })
    }

    /// How this host runs scenarios.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// A writable directory visible at the same path inside the test host. Scenario scripts put
    /// their files (disk images, logs) here so the outer test can read them afterwards.
    pub fn work_dir(&self) -> &Path {
        &self.work
    }

    /// A shell snippet that sets `SCRATCH` to a directory on a real disk-backed filesystem
    /// (ext4, O_DIRECT works): the test host's scratch disk, formatted on first use, or a
    /// directory under the work directory when scenarios run locally.
    pub fn scratch_setup(&self) -> String {
        match self.mode {
            Mode::Qemu => format!(
                "if ! mountpoint -q {m}; then mkfs.ext4 -q -F /dev/vda && mkdir -p {m} && \
                 mount /dev/vda {m}; fi; SCRATCH={m}\n",
                m = SCRATCH_MOUNT
            ),
            Mode::Local => format!(
                "SCRATCH={}; mkdir -p \"$SCRATCH\"\n",
                self.work.join("scratch").display()
            ),
        }
    }

    /// Runs `script` with `sh` and returns its output; fails if it does not finish in `timeout`.
    pub fn run(&self, name: &str, script: &str, timeout: Duration) -> Result<ScriptOutput> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.seq += 1;
        let id = format!("{:04}-{}", inner.seq, sanitize(name));
        match self.mode {
            Mode::Local => self.run_local(&id, script, timeout),
            Mode::Qemu => self.run_in_qemu(&mut inner, &id, script, timeout),
        }
    }

    fn run_local(&self, id: &str, script: &str, timeout: Duration) -> Result<ScriptOutput> {
        let path = self.work.join(format!("{id}.sh"));
        fs::write(&path, script)?;
        let out_path = self.work.join(format!("{id}.out"));
        let out = fs::File::create(&out_path)?;
        let mut child = Command::new("sh")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .context("starting sh")?;
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if start.elapsed() > timeout {
                // SAFETY: signals the process group we created for this script.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                let output = fs::read_to_string(&out_path).unwrap_or_default();
                bail!("scenario {id} timed out after {timeout:?}; output so far:\n{output}");
            }
            thread::sleep(POLL);
        };
        Ok(ScriptOutput {
            status: status.code().unwrap_or(-1),
            output: fs::read_to_string(&out_path)?,
        })
    }

    fn start_qemu(&self) -> Result<Qemu> {
        let a = artifacts::get()?;
        let queue = self.work.join("queue");
        let _ = fs::remove_dir_all(&queue);
        fs::create_dir_all(&queue)?;
        let log = self.work.join("testhost.log");
        // A sparse scratch disk (/dev/vda in the test host) for scenarios that need a real
        // filesystem with O_DIRECT, which tmpfs and 9p do not offer; see `scratch_setup`.
        let scratch = self.work.join("scratch.img");
        fs::File::create(&scratch)?.set_len(SCRATCH_SIZE)?;
        let agent = repo_root().join("tests/testhost/agent.sh");
        // nohz=off highres=off: the test host ticks from the LAPIC's periodic mode, which QEMU
        // re-arms by itself. With one-shot timers (the default), a test host under TCG was
        // seen frozen for good in the middle of a scenario: QEMU at 0 % CPU, its main loop
        // polling with no timer armed, the test host's vCPU halted — a one-shot expiry that
        // never came leaves nothing to wake it. A periodic tick also runs the test host's
        // timers (those of the nested guests' LAPICs included) at every tick.
        // tsc=reliable: TCG offers no invariant TSC, so the clocksource watchdog would check the
        // test host's TSC against the HPET and could call it unstable under load; KVM then
        // re-bases nested guests' TSCs at every vCPU load, which can make them stand still.
        // loglevel=5 puts the test host's warnings (KVM's TSC complaints among them) in its
        // console log, which a failed scenario prints. See also the TSC wait in its /init.
        let append = format!(
            "console=ttyS0 quiet loglevel=5 tsc=reliable panic=-1 mitigations=off nohz=off highres=off \
             lbwork={} lbagent={}",
            self.work.display(),
            agent.display()
        );
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg,thread=multi",
            "-M",
            "q35",
            "-cpu",
            "EPYC,+svm,+npt",
        ])
        .args(["-smp", "1", "-m", "2048", "-nodefaults", "-no-reboot"])
        .args(["-display", "none"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(&a.testhost_kernel)
        .arg("-initrd")
        .arg(&a.testhost_initramfs)
        .arg("-append")
        .arg(append)
        .arg("-drive")
        .arg(format!(
            "if=none,id=scratch,file={},format=raw",
            scratch.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=scratch"])
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=work,security_model=none,multidevs=remap",
            self.work.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(self.work.join("qemu.stderr"))?);
        // SAFETY: prctl is async-signal-safe; it makes the kernel kill QEMU when the thread that
        // forked it exits. We fork from a thread that lives as long as the process.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = spawn_from_keeper_thread(cmd)?;
        let mut qemu = Qemu { child, queue };
        let ready = self.work.join("queue/agent.ready");
        let start = Instant::now();
        eprintln!("lightbyte-tests: starting the test host (QEMU TCG, nested kvm_amd)");
        while !ready.exists() {
            if let Some(status) = qemu.child.try_wait()? {
                bail!(
                    "test host exited ({status}) before its agent started:\n{}\n{}",
                    tail(&log, 40),
                    tail(&self.work.join("qemu.stderr"), 10)
                );
            }
            if start.elapsed() > BOOT_TIMEOUT {
                let _ = qemu.child.kill();
                bail!(
                    "test host did not start in {BOOT_TIMEOUT:?}:\n{}",
                    tail(&log, 40)
                );
            }
            thread::sleep(POLL);
        }
        eprintln!(
            "lightbyte-tests: test host ready in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        Ok(qemu)
    }

    fn run_in_qemu(
        &self,
        inner: &mut Inner,
        id: &str,
        script: &str,
        timeout: Duration,
    ) -> Result<ScriptOutput> {
        if inner.qemu.is_none() {
            inner.qemu = Some(self.start_qemu()?);
        }
        let qemu = inner.qemu.as_mut().expect("just started");
        let tmp = qemu.queue.join(format!("{id}.tmp"));
        fs::write(&tmp, script)?;
        fs::rename(&tmp, qemu.queue.join(format!("{id}.sh")))?;
        let rc_path = qemu.queue.join(format!("{id}.rc"));
        let out_path = qemu.queue.join(format!("{id}.out"));
        let start = Instant::now();
        let mut streamed = 0u64;
        let mut progress = Progress::new(qemu.child.id());
        loop {
            streamed = stream_new_output(&out_path, streamed);
            if let Ok(rc) = fs::read_to_string(&rc_path) {
                stream_new_output(&out_path, streamed);
                return Ok(ScriptOutput {
                    status: rc.trim().parse().unwrap_or(-1),
                    output: fs::read_to_string(&out_path).unwrap_or_default(),
                });
            }
            let died = qemu.child.try_wait()?;
            let frozen = progress.frozen();
            if died.is_some() || frozen || start.elapsed() > timeout {
                let _ = qemu.child.kill();
                let _ = qemu.child.wait();
                inner.qemu = None;
                let output = fs::read_to_string(&out_path).unwrap_or_default();
                let why = match died {
                    Some(s) => format!("the test host exited ({s})"),
                    None if frozen => format!(
                        "the test host froze: QEMU used no CPU for {FROZEN_AFTER:?} (after {:?})",
                        start.elapsed()
                    ),
                    None => format!("timed out after {timeout:?}"),
                };
                bail!(
                    "scenario {id}: {why}; output so far:\n{output}\ntest host console:\n{}",
                    tail(&self.work.join("testhost.log"), 30)
                );
            }
            thread::sleep(POLL);
        }
    }
}

/// How long QEMU may use no CPU at all before the test host counts as frozen (an idle test host
/// still ticks and polls its queue, using some CPU every second).
const FROZEN_AFTER: Duration = Duration::from_secs(120);

/// Watches QEMU's CPU time: a test host whose QEMU stops using CPU has frozen (its vCPU halted
/// with nothing to wake it), and waiting out the scenario's whole timeout would tell nothing
/// more.
struct Progress {
    pid: u32,
    cpu: u64,
    since: Instant,
}

impl Progress {
    fn new(pid: u32) -> Progress {
        Progress {
            pid,
            cpu: cpu_ticks(pid).unwrap_or(0),
            since: Instant::now(),
        }
    }

    fn frozen(&mut self) -> bool {
        let Some(cpu) = cpu_ticks(self.pid) else {
            return false;
        };
        if cpu != self.cpu {
            self.cpu = cpu;
            self.since = Instant::now();
        }
        self.since.elapsed() > FROZEN_AFTER
    }
}

/// User plus system CPU time of `pid` in clock ticks, from `/proc/PID/stat`.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15: 12 and 13 after the state (field 3).
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Forks `cmd` from a thread that stays alive (waiting on nothing) for the rest of the process, so
/// that the parent-death signal fires only when the process ends.
fn spawn_from_keeper_thread(mut cmd: Command) -> Result<Child> {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::Builder::new()
        .name("testhost-keeper".into())
        .spawn(move || {
            let _ = tx.send(cmd.spawn());
            loop {
                thread::park();
            }
        })?;
    rx.recv()?
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")
}

/// Copies what a running scenario printed since `from` to stderr, so long scenarios show progress.
fn stream_new_output(path: &Path, from: u64) -> u64 {
    let Ok(mut f) = fs::File::open(path) else {
        return from;
    };
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(from)).is_err() || f.read_to_end(&mut buf).is_err() {
        return from;
    }
    let _ = std::io::stderr().write_all(&buf);
    from + buf.len() as u64
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The process-wide host.
pub fn shared() -> Result<&'static Host> {
    static HOST: OnceLock<Result<Host, String>> = OnceLock::new();
    HOST.get_or_init(|| Host::new().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("test host: {e}"))
}

#[cfg(test)]
mod progress_tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_and_grows_with_work() {
        let me = std::process::id();
        let before = cpu_ticks(me).expect("our own stat");
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(300) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(cpu_ticks(me).unwrap() > before);
        assert_eq!(cpu_ticks(u32::MAX), None);
        let mut p = Progress::new(me);
        assert!(!p.frozen());
    }
}
