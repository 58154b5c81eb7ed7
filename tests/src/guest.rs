//! Guest boots inside scenarios: composing `vmm` invocations and reading back what each guest
//! printed. One scenario (one script run in the test host) boots many guests, so the test host's
//! start-up cost is paid once.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;

use crate::artifacts;
use crate::paths::binary;
use crate::testhost::Host;

/// Kernel command line for test guests: quiet (a console byte costs ~100 µs in the test host),
/// reboot through the i8042 (ends the VM), no NMI watchdog (perf MSRs are not emulated there).
pub const GUEST_CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=1 nmi_watchdog=0";
/// Printed by the test initramfs's init once userspace is up.
pub const MARKER: &str = "LIGHTBYTE-GUEST-UP";
/// Prefix of the line carrying the guest command's exit status.
pub const CMD_EXIT: &str = "LIGHTBYTE-CMD-EXIT=";

/// The uid and gid jailed test VMMs run as (`vmm --jail`): every boot a scenario composes runs
/// jailed unless it says otherwise, so every device path is exercised under the seccomp
/// filters, without root and inside the private mount namespace.
pub const JAIL_ID: u32 = 4242;

/// `vmm` arguments jailing it as [`JAIL_ID`].
pub fn jail_args() -> [String; 2] {
    ["--jail".into(), format!("uid={JAIL_ID},gid={JAIL_ID}")]
}

/// `--jail` arguments for a `vmm` whose VM comes through its API: the jail's ids and the paths
/// the API will name, as shell words (unquoted, so they may name shell variables such as
/// `$T`; test paths hold no spaces).
pub fn jail_words(rw: &[&str], ro: &[&str]) -> String {
    let mut words = jail_args().join(" ");
    for p in rw {
        words.push_str(&format!(" --jail-rw {p}"));
    }
    for p in ro {
        words.push_str(&format!(" --jail-ro {p}"));
    }
    words
}

/// Quotes `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// One `vmm` run.
#[derive(Clone, Debug)]
pub struct Boot {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs (the test initramfs by default).
    pub initramfs: Option<PathBuf>,
    /// vCPUs.
    pub cpus: u8,
    /// Memory size argument.
    pub memory: String,
    /// Kernel command line before the guest command.
    pub cmdline: String,
    /// Shell command the guest's init runs (passed base64-encoded as `lbcmd64`).
    pub guest_cmd: Option<String>,
    /// Further `vmm` arguments.
    pub extra_args: Vec<String>,
    /// Seconds before the run is killed.
    pub timeout_secs: u32,
    /// Run `vmm` jailed (the default).
    pub jailed: bool,
}

impl Boot {
    /// A boot of `kernel` with the test initramfs, 1 vCPU and 512 MiB.
    pub fn new(kernel: &Path) -> Result<Self> {
        Ok(Self {
            kernel: kernel.to_path_buf(),
            initramfs: Some(artifacts::get()?.initramfs.clone()),
            cpus: 1,
            memory: "512M".into(),
            cmdline: GUEST_CMDLINE.into(),
            guest_cmd: None,
            extra_args: Vec::new(),
            timeout_secs: 120,
            jailed: true,
        })
    }

    /// Sets the number of vCPUs.
    pub fn cpus(mut self, n: u8) -> Self {
        self.cpus = n;
        self
    }

    /// Sets the memory size argument.
    pub fn memory(mut self, m: &str) -> Self {
        self.memory = m.into();
        self
    }

    /// Appends `param` to the kernel command line.
    pub fn param(mut self, param: &str) -> Self {
        self.cmdline.push(' ');
        self.cmdline.push_str(param);
        self
    }

    /// Adds `vmm` arguments.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Runs `vmm` without its jail.
    pub fn unjailed(mut self) -> Self {
        self.jailed = false;
        self
    }

    /// Sets the command the guest runs before powering off.
    pub fn run(mut self, cmd: &str) -> Self {
        self.guest_cmd = Some(cmd.into());
        self
    }

    /// The full kernel command line.
    pub fn full_cmdline(&self) -> String {
        match &self.guest_cmd {
            Some(cmd) => format!(
                "{} lbcmd64={}",
                self.cmdline,
                base64::engine::general_purpose::STANDARD.encode(cmd)
            ),
            None => self.cmdline.clone(),
        }
    }

    /// The `vmm` argument list.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["--kernel".into(), self.kernel.display().to_string()];
        if let Some(i) = &self.initramfs {
            args.extend(["--initramfs".into(), i.display().to_string()]);
        }
        args.extend([
            "--cpus".into(),
            self.cpus.to_string(),
            "--memory".into(),
            self.memory.clone(),
            "--cmdline".into(),
            self.full_cmdline(),
        ]);
        args.extend(self.extra_args.iter().cloned());
        if self.jailed {
            args.extend(jail_args());
        }
        args
    }
}

/// How one boot of a scenario ended.
#[derive(Clone, Debug)]
pub struct BootResult {
    /// The `vmm` process's exit status (124 when the timeout killed it).
    pub status: i32,
    /// Serial console and `vmm` diagnostics.
    pub output: String,
}

impl BootResult {
    /// True when the guest's init reached userspace.
    pub fn reached_marker(&self) -> bool {
        self.output.contains(MARKER)
    }

    /// Exit status of the guest command, when it ran.
    pub fn cmd_exit(&self) -> Option<i32> {
        self.output
            .lines()
            .find_map(|l| l.trim().strip_prefix(CMD_EXIT))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Asserts that the guest booted, its command succeeded and `vmm` exited 0.
    pub fn assert_clean(&self, label: &str) {
        assert!(
            self.reached_marker(),
            "{label}: marker missing:\n{}",
            self.output
        );
        assert_eq!(
            self.cmd_exit(),
            Some(0),
            "{label}: guest command failed:\n{}",
            self.output
        );
        assert_eq!(self.status, 0, "{label}: vmm exit status:\n{}", self.output);
    }
}

/// A script of boots and shell steps, run as one scenario.
pub struct Scenario {
    name: String,
    dir: PathBuf,
    script: String,
    labels: Vec<String>,
}

impl Scenario {
    /// A new scenario writing its logs under the host's work directory.
    pub fn new(host: &Host, name: &str) -> Result<Self> {
        let dir = host.work_dir().join(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(Self {
            name: name.into(),
            dir,
            script: String::from("set -u\n"),
            labels: Vec::new(),
        })
    }

    /// A writable directory for this scenario's files, visible inside the test host.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Adds a shell step.
    pub fn shell(&mut self, line: &str) -> &mut Self {
        self.script.push_str(line);
        self.script.push('\n');
        self
    }

    /// Adds a `vmm` run with `args`, labelled `label`.
    pub fn vmm(&mut self, label: &str, args: &[String], timeout_secs: u32) -> Result<&mut Self> {
        self.vmm_wrapped(label, "", args, timeout_secs)
    }

    /// Adds a `vmm` run with `args` started through `wrapper`, shell words that run the command
    /// after them (e.g. `ip netns exec NAME`).
    pub fn vmm_wrapped(
        &mut self,
        label: &str,
        wrapper: &str,
        args: &[String],
        timeout_secs: u32,
    ) -> Result<&mut Self> {
        let vmm = binary("vmm")?;
        let log = self.dir.join(format!("{label}.log"));
        let quoted: Vec<String> = args.iter().map(|a| sh_quote(a)).collect();
        self.script.push_str(&format!(
            "echo '== {label}'; timeout -k 5 {timeout_secs} {wrapper} {} {} > {} 2>&1; echo $? > {}.rc\n",
            sh_quote(&vmm.display().to_string()),
            quoted.join(" "),
            sh_quote(&log.display().to_string()),
            sh_quote(&log.display().to_string()),
        ));
        self.labels.push(label.into());
        Ok(self)
    }

    /// Adds a guest boot labelled `label`.
    pub fn boot(&mut self, label: &str, boot: &Boot) -> Result<&mut Self> {
        self.vmm(label, &boot.args(), boot.timeout_secs)
    }

    /// Adds a guest boot labelled `label` whose `vmm` runs through `wrapper` (see
    /// [`Scenario::vmm_wrapped`]).
    pub fn boot_wrapped(&mut self, label: &str, wrapper: &str, boot: &Boot) -> Result<&mut Self> {
        self.vmm_wrapped(label, wrapper, &boot.args(), boot.timeout_secs)
    }

    /// Runs the scenario and returns each boot's result by label.
    pub fn run(self, host: &Host, timeout: Duration) -> Result<BTreeMap<String, BootResult>> {
        let out = host.run(&self.name, &self.script, timeout)?;
        if out.status != 0 {
            bail!(
                "scenario {} failed ({}):\n{}",
                self.name,
                out.status,
                out.output
            );
        }
        let mut results = BTreeMap::new();
        for label in self.labels {
            let log = self.dir.join(format!("{label}.log"));
            let output = fs::read_to_string(&log)
                .with_context(|| format!("{label}: no log at {}", log.display()))?;
            let rc = fs::read_to_string(self.dir.join(format!("{label}.log.rc")))
                .with_context(|| format!("{label}: no exit status"))?;
            let status = rc.trim().parse().context("exit status")?;
            results.insert(label, BootResult { status, output });
        }
        Ok(results)
    }
}

/// The crash-writer boot: a guest with two vCPUs (two queues per disk) whose `/dev/vda` is
/// `disk` and `/dev/vdb` the raw, read-only `source`. Two background writers hammer `vda`
/// (64 KiB direct writes, 12 KiB buffered ones with periodic syncs) while the guest copies the
/// first `chunks` 256 KiB chunks of `vdb` to `vda`, each with an fsync, printing `FLUSHED i`
/// after each; then it waits to be killed. Used by the SIGKILL crash checks and the
/// lost-request loop.
pub fn crash_writer_boot(kernel: &Path, disk: &Path, source: &Path, chunks: u32) -> Result<Boot> {
    let cmd = format!(
        "(n=0; while :; do dd if=/dev/urandom of=/dev/vda bs=64k count=1 seek=$((512 + n * 37 % 512)) oflag=direct 2>/dev/null; n=$((n+1)); done) & \
         (n=0; while :; do dd if=/dev/urandom of=/dev/vda bs=4k count=3 seek=$((8192 + n * 7919 % 8000)) 2>/dev/null; n=$((n+1)); [ $((n % 16)) = 0 ] && sync; done) & \
         i=0; while [ $i -lt {chunks} ]; do dd if=/dev/vdb of=/dev/vda bs=256k count=1 skip=$i seek=$i oflag=direct conv=fsync 2>/dev/null && echo FLUSHED $i; i=$((i+1)); done; sleep 600"
    );
    Ok(Boot::new(kernel)?
        .cpus(2)
        // Kernel messages in the log: a guest that never reports a flush then shows how far
        // it got.
        .param("loglevel=7")
        .arg("--disk")
        .arg(&format!("path={}", disk.display()))
        .arg("--disk")
        .arg(&format!("path={},readonly=on,format=raw", source.display()))
        .run(&cmd))
}
