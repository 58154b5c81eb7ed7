//! `vmm`: boots a Linux guest directly from a kernel image; `vmm img` manages disk images.

mod img;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::builder::{self, VmExit};
use vmm::config::{
    parse_disk, parse_serial, parse_size, DiskConfig, SerialConfig, VmConfig, DEFAULT_CMDLINE,
};

/// Exit status for invalid input (bad flags, missing or invalid files, impossible sizes).
const EXIT_BAD_INPUT: u8 = 2;
/// Exit status when the guest panicked or the VM failed.
const EXIT_VM_FAILED: u8 = 1;

/// lightbyte VMM: boots a Linux kernel (ELF vmlinux through PVH, or bzImage) in a KVM virtual
/// machine with a serial console. The process exits 0 when the guest powers off or reboots,
/// 1 when the guest panics or the VM fails, and 2 on invalid input.
///
/// `vmm img` creates, inspects, resizes, converts and checks raw and qcow2 disk images.
#[derive(Parser, Debug)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Kernel image: an uncompressed ELF vmlinux (booted through its PVH entry when it has one)
    /// or a bzImage.
    // An Option only so that `vmm img ...` parses: clap still requires it without a subcommand.
    #[arg(long, value_name = "PATH", required = true)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio archive, optionally compressed) loaded with the kernel.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs the guest sees.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u8,
    /// Guest RAM: bytes, or a number with K/M/G suffix.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_size)]
    memory: u64,
    /// Serial console destination: stdout (interactive when stdin is a terminal; Ctrl-A x
    /// quits), off, or file:PATH.
    #[arg(long, value_name = "DEST", default_value = "stdout", value_parser = parse_serial)]
    serial: SerialConfig,
    /// A virtio-blk disk backed by a raw or qcow2 image; repeat for more (the first is
    /// /dev/vda). Options: format=raw|qcow2 (default: qcow2 when the file has a qcow2 header,
    /// else raw; format=raw serves even a qcow2 file's bytes as they are), readonly=on,
    /// serial=ID (up to 20 bytes), direct=on (O_DIRECT). A qcow2 image's backing chain is opened
    /// read-only; a malformed image or a missing backing file is invalid input.
    #[arg(
        long,
        value_name = "path=FILE[,format=raw|qcow2][,readonly=on][,serial=ID][,direct=on]",
        value_parser = parse_disk
    )]
    disk: Vec<DiskConfig>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Disk image tools: create, info, resize, overlay, convert, check (raw and qcow2).
    Img {
        #[command(subcommand)]
        command: img::ImgCommand,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_BAD_INPUT } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    if let Some(Command::Img { command }) = cli.command {
        return img::run(command);
    }
    let Some(kernel) = cli.kernel else {
        // clap already refuses a command line with neither --kernel nor a subcommand.
        eprintln!("vmm: --kernel is required");
        return ExitCode::from(EXIT_BAD_INPUT);
    };
    let config = VmConfig {
        kernel,
        initramfs: cli.initramfs,
        cmdline: cli.cmdline,
        cpus: cli.cpus,
        memory: cli.memory,
        serial: cli.serial,
        disks: cli.disk,
    };
    let vm = match builder::start(&config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(if e.is_bad_input() {
                EXIT_BAD_INPUT
            } else {
                EXIT_VM_FAILED
            });
        }
    };
    match vm.wait() {
        VmExit::PowerOff => ExitCode::SUCCESS,
        VmExit::Reset(why) => {
            tracing::info!("guest reset ({why}): ending the VM");
            ExitCode::SUCCESS
        }
        VmExit::Panic => {
            eprintln!("vmm: guest kernel panicked (reported through pvpanic)");
            ExitCode::from(EXIT_VM_FAILED)
        }
        VmExit::Error(msg) => {
            eprintln!("vmm: {msg}");
            ExitCode::from(EXIT_VM_FAILED)
        }
    }
}
