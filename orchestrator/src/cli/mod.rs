//! The `lightbyte` command line: `server`, and client verbs over the HTTP API.

mod commands;
mod table;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use commands::run;

use orchestrator::model::{ByteSize, DiskFormat};

#[derive(Debug, Parser)]
#[command(name = "lightbyte", version, about = "lightbyte control plane and CLI")]
pub struct Cli {
    /// Control-plane URL [default: $LIGHTBYTE_SERVER, else http://127.0.0.1:7070]
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
    /// Output format
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a control-plane instance: the HTTP API and the leader-elected controllers
    Server(ServerArgs),
    /// Virtual machines
    #[command(subcommand)]
    Vm(VmCommand),
    /// Base disk images
    #[command(subcommand)]
    Image(ImageCommand),
    /// Volumes (overlays of images)
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Worker hosts
    #[command(subcommand)]
    Worker(WorkerCommand),
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// etcd endpoints, comma-separated
    #[arg(
        long,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        required = true
    )]
    pub etcd: Vec<String>,
    /// Address the HTTP API listens on (port 0 picks a free one; the address is logged)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Controller leader lease TTL: a crashed leader is replaced within this time
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration)]
    pub lease_ttl: Duration,
    /// How long an etcd request may take before the API answers 503
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration)]
    pub etcd_timeout: Duration,
    /// Reconcile this often even when nothing changed
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
    pub resync: Duration,
    /// This instance's identity in leader keys [default: HOSTNAME-PID]
    #[arg(long, value_name = "NAME")]
    pub id: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM; the scheduler places it on a worker
    Create {
        name: String,
        /// Image its root volume overlays
        #[arg(long)]
        image: String,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        #[arg(long, default_value = "256M", value_parser = size)]
        memory: ByteSize,
        /// Extra volume (repeatable)
        #[arg(long = "volume", value_name = "VOLUME")]
        volumes: Vec<String>,
        #[arg(long, default_value = "default")]
        network: String,
        /// Scale group to spread across workers [default: the name without "-N"]
        #[arg(long)]
        group: Option<String>,
    },
    List,
    Get {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Register a base image that every worker has at PATH
    Add {
        name: String,
        #[arg(long)]
        path: String,
        #[arg(long, value_enum, default_value_t = FormatArg::Qcow2)]
        format: FormatArg,
        /// Virtual size, when known
        #[arg(long, value_parser = size)]
        size: Option<ByteSize>,
    },
    List,
    Get {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume: an overlay of IMAGE with its own size
    Create {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long, value_parser = size)]
        size: ByteSize,
    },
    List,
    Get {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    List,
    Get { name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Qcow2,
    Raw,
}

impl From<FormatArg> for DiskFormat {
    fn from(f: FormatArg) -> DiskFormat {
        match f {
            FormatArg::Qcow2 => DiskFormat::Qcow2,
            FormatArg::Raw => DiskFormat::Raw,
        }
    }
}

fn size(s: &str) -> Result<ByteSize, String> {
    s.parse()
        .map_err(|e: orchestrator::model::SizeError| e.to_string())
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}
