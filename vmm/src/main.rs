//! `vmm`: boots a Linux guest directly from a kernel image, or as the API asks; `vmm img`
//! manages disk images.

mod agent_cli;
mod img;
mod no_libm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use vmm::api::{ApiServer, ServerOptions};
use vmm::control::ControlError;
use vmm::jail::{seccomp, JailConfig, JailError, Visible};
use vmm::running::VmExit;
use vmm::vmm::Vmm;
use vmm::vstate::vcpu::TRIPLE_FAULT;
use vmm_api::config::{
    DiskConfig, NetConfig, SerialConfig, VmConfig, VsockConfig, DEFAULT_CMDLINE,
};
use vmm_api::parse::{parse_disk, parse_net, parse_serial, parse_size, parse_vsock};

/// Exit status for invalid input (bad flags, missing or invalid files, impossible sizes).
const EXIT_BAD_INPUT: u8 = 2;
/// Exit status when the VM failed (a KVM internal error, a failed entry, a VMM error).
const EXIT_VM_FAILED: u8 = 1;
/// Exit status when the guest asked for a reboot (i8042, ACPI reset register, reset vector):
/// the VM ends, and whoever runs it decides whether to start it again.
const EXIT_REBOOT: u8 = 3;
/// Exit status when a vCPU triple-faulted (a guest crash the guest could not report).
const EXIT_TRIPLE_FAULT: u8 = 4;
/// Exit status when the guest kernel panicked (reported through pvpanic).
const EXIT_GUEST_PANIC: u8 = 5;

/// lightbyte VMM: boots a Linux kernel (ELF vmlinux through PVH, or bzImage), or a disk's own
/// boot loader through UEFI firmware, in a KVM virtual machine with a serial console. The process exits 0 when the guest powers off, 1 when the
/// VM fails, 2 on invalid input, 3 when the guest asks for a reboot, 4 on a triple fault and 5
/// when the guest kernel panics.
///
/// With --api-socket, an HTTP API on that Unix socket controls the VM (docs/api/openapi.yaml):
/// alone, the VMM waits for the VM to be created and booted through it; with --kernel, the VM
/// boots from the flags and the API serves too.
///
/// `vmm img` creates, inspects, resizes, converts and checks raw and qcow2 disk images;
/// `vmm agent` talks to a guest agent over a VM's vsock socket.
#[derive(Parser, Debug)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    group(clap::ArgGroup::new("boot").args(["kernel", "firmware"]))
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Kernel image: an uncompressed ELF vmlinux (booted through its PVH entry when it has one)
    /// or a bzImage. Required unless --firmware or --api-socket is given.
    // An Option so that `vmm img ...` and `vmm --api-socket PATH` parse; clap requires it
    // otherwise.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present_any = ["api_socket", "firmware"],
        conflicts_with = "firmware"
    )]
    kernel: Option<PathBuf>,
    /// UEFI firmware to start instead of a kernel (lightbyte's own: target/release/
    /// lightbyte-firmware). It boots the first boot loader it finds on the disks' EFI system
    /// partitions (\EFI\BOOT\BOOTX64.EFI, or a Boot Loader Specification entry) and passes
    /// --cmdline to it as its load options when one is given.
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,
    /// Serve the HTTP API on this Unix socket (refused when another process serves there; a
    /// stale socket file is replaced; removed on exit).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Initial ramdisk (cpio archive, optionally compressed) loaded with the kernel.
    #[arg(
        long,
        value_name = "PATH",
        requires = "kernel",
        conflicts_with = "firmware"
    )]
    initramfs: Option<PathBuf>,
    /// Kernel command line (default: "console=ttyS0 reboot=k panic=1 ..."); with --firmware,
    /// the boot loader's load options (default: none).
    #[arg(long, value_name = "STR", requires = "boot")]
    cmdline: Option<String>,
    /// Number of vCPUs the guest sees.
    #[arg(long, value_name = "N", default_value_t = 1, requires = "boot")]
    cpus: u8,
    /// Guest RAM: bytes, or a number with K/M/G suffix.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "512M",
        value_parser = parse_size,
        requires = "boot"
    )]
    memory: u64,
    /// Serial console destination: stdout (interactive when stdin is a terminal; Ctrl-A x
    /// quits), off, or file:PATH.
    #[arg(
        long,
        value_name = "DEST",
        default_value = "stdout",
        value_parser = parse_serial,
        requires = "boot"
    )]
    serial: SerialConfig,
    /// A virtio-blk disk backed by a raw or qcow2 image; repeat for more (the first is
    /// /dev/vda). Options: format=raw|qcow2 (default: qcow2 when the file has a qcow2 header,
    /// else raw; format=raw serves even a qcow2 file's bytes as they are), readonly=on,
    /// serial=ID (up to 20 bytes), direct=on (O_DIRECT). A qcow2 image's backing chain is opened
    /// read-only; a malformed image or a missing backing file is invalid input.
    #[arg(
        long,
        value_name = "path=FILE[,format=raw|qcow2][,readonly=on][,serial=ID][,direct=on]",
        value_parser = parse_disk,
        requires = "boot"
    )]
    disk: Vec<DiskConfig>,
    /// A virtio-net device on an existing host TAP interface; repeat for more (the first is
    /// eth0 in the guest). mac=52:54:00:12:34:56 sets the guest's MAC address (unicast); without
    /// it a random locally administered one is drawn. Checksum offload and TSO pass through the
    /// TAP in both directions as the guest's driver accepts them.
    #[arg(
        long,
        value_name = "tap=NAME[,mac=MAC]",
        value_parser = parse_net,
        requires = "boot"
    )]
    net: Vec<NetConfig>,
    /// A virtio-vsock device (guest context ID N, 3 or more) whose host side is Unix sockets:
    /// host processes connect to PATH and write `CONNECT <port>\n` to reach a guest listener
    /// (they read `OK <hostport>\n` back); a guest connecting to host port P reaches the Unix
    /// socket listening at PATH_P.
    #[arg(
        long,
        value_name = "cid=N,socket=PATH",
        value_parser = parse_vsock,
        requires = "boot"
    )]
    vsock: Option<VsockConfig>,
    /// Run jailed: join the cgroup v2 directory DIR (whose limits the caller set), enter a
    /// mount namespace whose root holds only the paths the VM needs (at their own paths, with
    /// its own /dev/kvm and /dev/net/tun), drop to uid/gid N with no capabilities and
    /// no_new_privs, and run every thread under a seccomp filter (a forbidden call kills the
    /// VMM with SIGSYS, after a line in its log naming it). Needs root. With --kernel, the
    /// kernel, initramfs, disks (with backing chains) and the directories of the console file,
    /// vsock socket and API socket are visible; paths given later through the API must be
    /// under --jail-ro/--jail-rw paths. Read-write paths are handed to uid/gid (chown, as
    /// libvirt's dynamic ownership does); read-only ones must be readable by them.
    #[arg(long, value_name = "uid=N,gid=N[,cgroup=DIR]", value_parser = vmm::jail::parse_jail)]
    jail: Option<JailConfig>,
    /// A file or directory visible read-only inside the jail, at the same path; repeat.
    #[arg(long, value_name = "PATH", requires = "jail")]
    jail_ro: Vec<PathBuf>,
    /// A file or directory visible read-write inside the jail, at the same path; repeat.
    #[arg(long, value_name = "PATH", requires = "jail")]
    jail_rw: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Disk image tools: create, info, resize, overlay, convert, check (raw and qcow2).
    Img {
        #[command(subcommand)]
        command: img::ImgCommand,
    },
    /// Talks to the guest agent of a running VM over its vsock socket: ping, apply, status,
    /// shutdown.
    Agent {
        #[command(subcommand)]
        command: agent_cli::AgentCommand,
    },
}

/// Logs to stderr at the levels `VMM_LOG` asks for (warn by default), each callsite
/// rate-limited at info and above (guests trigger many warnings).
///
/// `VMM_LOG` is a list of `target=level` pairs and an optional bare default level
/// (`info`, `warn,vmm::devices=debug`). The filter is `Targets`, not `EnvFilter`: `EnvFilter`'s
/// span and field matching brought a regex engine into every VMM process, for filters nobody
/// gives a VMM (without it the binary's code is 800 KB smaller, and every start relocates
/// 120 KiB less data).
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let level = log_filter(std::env::var("VMM_LOG").ok().as_deref()).unwrap_or_else(|e| {
        eprintln!("vmm: {e}: logging warnings");
        warnings_only()
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .with_filter(vmm::log_limit::RateLimit::default())
                .with_filter(level),
        )
        .init();
}

/// The log filter `VMM_LOG` (`spec`) asks for: warnings when unset or blank.
fn log_filter(spec: Option<&str>) -> Result<tracing_subscriber::filter::Targets, String> {
    use tracing_subscriber::filter::Targets;
    match spec.map(str::trim) {
        None | Some("") => Ok(warnings_only()),
        Some(spec) => spec
            .parse::<Targets>()
            .map_err(|e| format!("VMM_LOG={spec:?} is not a list of target=level pairs ({e})")),
    }
}

/// The default log filter: warnings and errors from every target.
fn warnings_only() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new().with_default(tracing::Level::WARN)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_BAD_INPUT } else { 0 });
        }
    };
    init_logging();

    match cli.command {
        Some(Command::Img { command }) => return img::run(command),
        Some(Command::Agent { command }) => return agent_cli::run(command),
        None => {}
    }
    let boot = match (cli.kernel, cli.firmware) {
        (Some(kernel), _) => Some((kernel, None)),
        (None, Some(firmware)) => Some((PathBuf::new(), Some(firmware))),
        (None, None) => None,
    };
    let config = boot.map(|(kernel, firmware)| VmConfig {
        cmdline: cli.cmdline.unwrap_or_else(|| match firmware {
            Some(_) => String::new(),
            None => DEFAULT_CMDLINE.to_string(),
        }),
        kernel,
        firmware,
        initramfs: cli.initramfs,
        cpus: cli.cpus,
        memory: cli.memory,
        serial: cli.serial,
        disks: cli.disk,
        nets: cli.net,
        vsock: cli.vsock,
    });
    if let Some(jail) = &cli.jail {
        let mut visible: Vec<Visible> = cli.jail_ro.iter().map(Visible::ro).collect();
        visible.extend(cli.jail_rw.iter().map(Visible::rw));
        // Disks named by path come with their backing chains.
        for p in cli
            .jail_ro
            .iter()
            .chain(&cli.jail_rw)
            .filter(|p| p.is_file())
        {
            visible.extend(vmm::jail::backing_chain(p).into_iter().map(Visible::ro));
        }
        if let Some(api) = &cli.api_socket {
            visible.push(Visible::rw(vmm::jail::parent_dir(api)));
        }
        if let Some(config) = &config {
            visible.extend(vmm::jail::paths_for(config));
        }
        if let Err(e) = vmm::jail::enter(jail, &visible) {
            eprintln!("vmm: jail: {e}");
            return ExitCode::from(match e {
                JailError::Missing { .. } | JailError::NotRoot(_) => EXIT_BAD_INPUT,
                _ => EXIT_VM_FAILED,
            });
        }
        block::set_thread_hook(|| seccomp::enter_thread(seccomp::Kind::Device));
    }
    // Serving the API with no VM yet, the process waits for its request: the KVM VM is made
    // meanwhile (it needs nothing from the configuration). A boot from the flags needs its VM
    // at once, so a thread would only compete with it.
    if config.is_none() {
        vmm::vstate::prepared::start();
    }
    let vmm = Vmm::new();
    // Started before the VM so that a socket already in use fails fast, and so that the API
    // sees the VM from its first moment.
    let api = match &cli.api_socket {
        Some(path) => {
            let options = ServerOptions {
                exit_on_signal: true,
                ..ServerOptions::default()
            };
            match ApiServer::start(path, Arc::clone(&vmm) as _, options) {
                Ok(server) => Some(server),
                Err(e) => {
                    eprintln!("vmm: {e}");
                    return ExitCode::from(if e.is_bad_input() {
                        EXIT_BAD_INPUT
                    } else {
                        EXIT_VM_FAILED
                    });
                }
            }
        }
        None => None,
    };
    if let Some(config) = config {
        if let Err(e) = vmm.boot_from_config(config) {
            eprintln!("vmm: {e}");
            return ExitCode::from(match e {
                ControlError::BadRequest(_) => EXIT_BAD_INPUT,
                ControlError::Conflict(_) | ControlError::Internal(_) => EXIT_VM_FAILED,
            });
        }
    }
    let exit = vmm.wait_exit();
    // Stops the API (letting a request that ended the VM get its answer) and removes the socket.
    drop(api);
    match exit {
        VmExit::PowerOff => ExitCode::SUCCESS,
        VmExit::Reset(TRIPLE_FAULT) => {
            eprintln!("vmm: a vCPU triple-faulted: the guest crashed");
            ExitCode::from(EXIT_TRIPLE_FAULT)
        }
        VmExit::Reset(why) => {
            tracing::info!("guest reset ({why}): ending the VM");
            ExitCode::from(EXIT_REBOOT)
        }
        VmExit::Panic => {
            eprintln!("vmm: guest kernel panicked (reported through pvpanic)");
            ExitCode::from(EXIT_GUEST_PANIC)
        }
        VmExit::Error(msg) => {
            eprintln!("vmm: {msg}");
            ExitCode::from(EXIT_VM_FAILED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    #[test]
    fn vmm_log_sets_levels_per_target_and_refuses_what_it_cannot_read() {
        let unset = log_filter(None).unwrap();
        assert!(unset.would_enable("vmm::devices", &Level::WARN));
        assert!(!unset.would_enable("vmm::devices", &Level::INFO));
        assert!(!log_filter(Some("  "))
            .unwrap()
            .would_enable("vmm", &Level::INFO));

        let info = log_filter(Some("info")).unwrap();
        assert!(info.would_enable("block::pool", &Level::INFO));
        assert!(!info.would_enable("block::pool", &Level::DEBUG));

        let mixed = log_filter(Some("warn,vmm::devices=debug")).unwrap();
        assert!(mixed.would_enable("vmm::devices::virtio", &Level::DEBUG));
        assert!(!mixed.would_enable("vmm::builder", &Level::INFO));

        let e = log_filter(Some("vmm=loud")).unwrap_err();
        assert!(e.contains("VMM_LOG=\"vmm=loud\""), "{e}");
    }
}
