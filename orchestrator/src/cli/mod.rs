//! The `lightbyte` command line: `server`, and client verbs over the HTTP API.

mod agent;
mod commands;
mod groups;
mod lbs;
mod push;
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
    /// A file whose first line is the bearer token this command presents (to the control
    /// plane; a server or worker presents it to the other components) [default:
    /// $LIGHTBYTE_TOKEN_FILE; $LIGHTBYTE_TOKEN holds the token itself]
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// The cluster's CA certificate: the only issuer trusted for servers (and, by a server, for
    /// clients) [default: $LIGHTBYTE_CA]
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// This process's certificate (from `lightbyte pki issue`): presented to servers, and served
    /// by `server` and `worker --listen` [default: $LIGHTBYTE_CERT]
    #[arg(long, global = true, value_name = "FILE")]
    pub cert: Option<std::path::PathBuf>,
    /// The key of --cert [default: $LIGHTBYTE_KEY]
    #[arg(long, global = true, value_name = "FILE")]
    pub key: Option<std::path::PathBuf>,
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
    /// Run the worker agent on this host (with --etcd and --name), or list, drain, uncordon and
    /// forget workers
    Worker(WorkerArgs),
    /// Scale groups: N identical VMs from one template, spread across workers, replaced when
    /// they fail, rolled over when the template changes
    #[command(subcommand, name = "scale-group")]
    ScaleGroup(ScaleGroupCommand),
    /// HTTP load balancers in front of scale groups or VMs (Pingora proxies in VMs of their own
    /// or beside the worker agents), showing addresses and backend health
    #[command(subcommand, name = "lb")]
    Lb(LbCommand),
    /// The cluster's certificate authority: `pki init --dir D` makes it, `pki issue --dir D
    /// NAME --san ADDR...` a certificate for a component or user (mutual TLS everywhere)
    #[command(subcommand)]
    Pki(PkiCommand),
    /// API tokens: `lightbyte token new --role admin --name alice --file TOKENS` adds one to a
    /// tokens file (a server's or worker's --tokens) and prints it
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run or control the load-balancing proxy itself (`lightbyte-proxy`, next to this binary
    /// or on PATH): `lightbyte proxy run --control SOCK`, `apply`, `status`, `stop`
    #[command(disable_help_flag = true)]
    Proxy {
        /// Passed to lightbyte-proxy as they are (`lightbyte proxy --help` shows its help)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

// Parsed once per run: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum LbCommand {
    /// Create a load balancer
    Create {
        name: String,
        /// A port it accepts HTTP on (repeatable)
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
        /// The scale group whose Running members are the backends
        #[arg(long)]
        group: Option<String>,
        /// A VM that is a backend too (repeatable)
        #[arg(long = "vm")]
        vms: Vec<String>,
        /// The backends' port
        #[arg(long)]
        target_port: u16,
        /// Backend health check: tcp (a connection is accepted) or http (GET answers 200)
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "http"])]
        health: String,
        /// The path an http health check asks for
        #[arg(long, default_value = "/")]
        health_path: String,
        /// How often backends are checked
        #[arg(long, default_value = "2s", value_parser = duration)]
        health_interval: Duration,
        /// How long one check may take
        #[arg(long, default_value = "1s", value_parser = duration)]
        health_timeout: Duration,
        /// round-robin, or consistent (hash of the client's address)
        #[arg(long, default_value = "round-robin", value_parser = ["round-robin", "consistent"])]
        selection: String,
        /// How long requests a removed backend serves may take to finish
        #[arg(long, value_name = "DURATION", default_value = "10s")]
        drain_grace: orchestrator::model::Seconds,
        /// guest: proxy VMs of its own; host: the proxy beside every worker agent
        #[arg(long, default_value = "guest", value_parser = ["guest", "host"])]
        placement: String,
        /// guest: the image of the proxy VMs
        #[arg(long)]
        image: Option<String>,
        /// guest: how many proxy VMs
        #[arg(long, default_value_t = 2)]
        proxies: u32,
        /// guest: memory of each proxy VM
        #[arg(long, default_value = "128M", value_parser = size)]
        proxy_memory: ByteSize,
        /// Wait until a proxy runs the current backends and every backend is healthy
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long
        #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = duration)]
        timeout: Duration,
    },
    List,
    /// A load balancer with its addresses, proxies and each backend's health
    Get {
        name: String,
    },
    /// Delete it (and its proxy VMs)
    Delete {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Make a new CA in DIR (ca.crt, ca.key 0600; DIR 0700); never overwrites one
    Init {
        #[arg(long, value_name = "DIR")]
        dir: std::path::PathBuf,
        /// The CA's common name
        #[arg(long, default_value = "lightbyte cluster CA")]
        name: String,
    },
    /// Issue DIR/NAME.crt and DIR/NAME.key (0600), signed by DIR's CA, good for serving and
    /// as a client; issuing a name again renews it
    Issue {
        #[arg(long, value_name = "DIR")]
        dir: std::path::PathBuf,
        /// The certificate's name (its subject)
        name: String,
        /// A DNS name or IP address it is reached by (repeatable; servers need theirs)
        #[arg(long = "san", value_name = "NAME|IP")]
        sans: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Add a new random token to a tokens file (created 0600 if missing) and print it; the
    /// servers using the file take it within a second, no restart
    New {
        /// admin (everything), viewer (reads only) or node (components: the control plane
        /// calling workers, workers pulling images)
        #[arg(long, value_parser = ["admin", "viewer", "node"])]
        role: String,
        /// Who holds it (shown in the servers' logs)
        #[arg(long)]
        name: String,
        /// The tokens file
        #[arg(long, value_name = "FILE")]
        file: std::path::PathBuf,
    },
}

/// Who may call a server: mutual TLS (the global --ca, --cert, --key) and its tokens file, or
/// nobody is asked.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// Tokens file: one `TOKEN ROLE NAME` per line (mode 0600; `lightbyte token new` writes
    /// it); every request must bear one of them. Changes apply within a second
    #[arg(long, value_name = "FILE")]
    pub tokens: Option<std::path::PathBuf>,
    /// Serve without authentication, over plain HTTP unless --cert is given: anyone who can
    /// reach the port can do anything
    #[arg(long, conflicts_with = "tokens")]
    pub insecure: bool,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub auth: AuthArgs,
    /// etcd endpoints, comma-separated
    #[arg(
        long,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        required = true
    )]
    pub etcd: Vec<String>,
    /// Address the HTTP API listens on (port 0 picks a free one; the address is logged);
    /// repeat it to serve on more (e.g. where workers in another network pull images)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    pub listen: Vec<SocketAddr>,
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
    /// Where images pushed with `lightbyte image push` are kept, by SHA-256 (several servers
    /// of one cluster share it, e.g. on NFS) [default: no image store]
    #[arg(long, value_name = "DIR")]
    pub image_dir: Option<std::path::PathBuf>,
    /// Let images name files on the workers by path (`image add --path`): any file of every
    /// worker can then become a guest's disk, so only for trusted operators
    #[arg(long)]
    pub allow_host_path: bool,
    /// Connections served at once; more wait until one closes
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// Time a client has to send a request's headers; idle keep-alive connections are closed
    /// after it too
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = duration)]
    pub header_timeout: Duration,
    /// A host name clients may use to reach this server (repeatable). Requests whose Host is
    /// not an IP address, localhost or such a name are refused (421): a web page must not
    /// reach the API through a name that resolves to this host (DNS rebinding)
    #[arg(long, value_name = "NAME")]
    pub allowed_host: Vec<String>,
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
        /// A label, KEY=VALUE (repeatable)
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = key_value)]
        labels: Vec<(String, String)>,
        /// Appended to the image's kernel command line
        #[arg(long)]
        cmdline: Option<String>,
    },
    /// Power a VM off (its disks are kept on its worker); it stays off until started
    Stop {
        name: String,
    },
    /// Power a stopped or failed VM on again
    Start {
        name: String,
        /// For a VM whose worker was forgotten with its disks: accept that they are lost and
        /// start it elsewhere on empty ones
        #[arg(long)]
        fresh_disks: bool,
    },
    List,
    Get {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Talk to a VM's guest agent (over vsock, through the worker it runs on); prints its
    /// answer as JSON, exits 1 when the agent answers with an error
    Agent {
        name: String,
        #[command(subcommand)]
        request: AgentRequest,
    },
    /// Wait until every named VM is Running (or Stopped, or deleted); exits 1 on timeout or when
    /// a VM fails while waited for
    Wait {
        #[arg(required = true)]
        names: Vec<String>,
        /// What to wait for
        #[arg(long = "for", value_enum, default_value_t = WaitFor::Running)]
        until: WaitFor,
        /// Give up after this long
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WaitFor {
    Running,
    Stopped,
    Deleted,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Upload FILE (and its boot files) to the control plane's image store and register it as
    /// image NAME; workers pull it by its SHA-256 on first use and verify it
    Push {
        name: String,
        file: std::path::PathBuf,
        /// The file's format, checked against its content (never guessed)
        #[arg(long, value_enum, default_value_t = FormatArg::Qcow2)]
        format: FormatArg,
        /// Kernel its VMs boot, uploaded too [default: the worker's --kernel]
        #[arg(long, value_name = "FILE")]
        kernel: Option<std::path::PathBuf>,
        /// Initramfs loaded with --kernel, uploaded too
        #[arg(long, value_name = "FILE", requires = "kernel")]
        initramfs: Option<std::path::PathBuf>,
        /// Kernel command line; workers append the VM's network configuration (ip=...)
        #[arg(long, value_name = "STR")]
        cmdline: Option<String>,
        /// The disk boots itself through UEFI (an EFI system partition with a boot loader):
        /// workers start its VMs with their firmware, and --cmdline becomes the loader's
        /// load options
        #[arg(long, conflicts_with_all = ["kernel", "initramfs"])]
        uefi: bool,
    },
    /// Register a base image that every worker has at PATH (refused unless the server runs
    /// with --allow-host-path)
    Add {
        name: String,
        #[arg(long)]
        path: String,
        #[arg(long, value_enum, default_value_t = FormatArg::Qcow2)]
        format: FormatArg,
        /// Virtual size, when known
        #[arg(long, value_parser = size)]
        size: Option<ByteSize>,
        /// Kernel its VMs boot (absolute path on every worker) [default: the worker's --kernel]
        #[arg(long, value_name = "PATH")]
        kernel: Option<String>,
        /// Initramfs loaded with --kernel
        #[arg(long, value_name = "PATH")]
        initramfs: Option<String>,
        /// Kernel command line; workers append the VM's network configuration (ip=...)
        #[arg(long, value_name = "STR")]
        cmdline: Option<String>,
        /// The disk boots itself through UEFI (see `image push --uefi`)
        #[arg(long, conflicts_with_all = ["kernel", "initramfs"])]
        uefi: bool,
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

/// `lightbyte worker --etcd URL --name NAME [...]` runs the agent; `lightbyte worker list|get`
/// are client verbs.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct WorkerArgs {
    #[command(subcommand)]
    pub command: Option<WorkerCommand>,
    #[command(flatten)]
    pub agent: Box<AgentArgs>,
}

#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// List the workers with what is allocated on them
    List,
    /// Show one worker
    Get { name: String },
    /// Vacate a worker for maintenance: nothing new is placed there, scale-group members are
    /// replaced elsewhere (the new one running before the old one stops), standalone VMs are
    /// moved with their disks. It ends Drained.
    Drain {
        name: String,
        /// Wait until it is Drained, showing progress
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long
        #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = duration)]
        timeout: Duration,
    },
    /// Return a drained (or draining) worker to service
    Uncordon { name: String },
    /// Give up a worker that is gone for good: its VMs lose their placement (members without
    /// volumes are replaced; the others wait for `vm start --fresh-disks`). If its agent ever
    /// comes back it archives its old copies instead of running them. Refused while it
    /// heartbeats.
    Forget { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ScaleGroupCommand {
    /// Create a scale group
    Create {
        name: String,
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        #[command(flatten)]
        template: TemplateArgs,
        /// Extra members made during a rolling update
        #[arg(long, default_value_t = 1)]
        max_surge: u32,
        /// Members that may be missing during a rolling update
        #[arg(long, default_value_t = 0)]
        max_unavailable: u32,
        /// How long a member of a worker that stopped heartbeating may be Lost before it is
        /// replaced (members without volumes only)
        #[arg(long, value_name = "DURATION", default_value = "60s")]
        replace_lost_after: orchestrator::model::Seconds,
        #[command(flatten)]
        wait: WaitArgs,
    },
    List,
    Get {
        name: String,
    },
    /// Change the number of members
    Scale {
        name: String,
        replicas: u32,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Change the template: members are replaced one by one (rolling, surge first)
    Update {
        name: String,
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        cpus: Option<u32>,
        #[arg(long, value_parser = size)]
        memory: Option<ByteSize>,
        /// Replace the kernel command line addition ("" removes it)
        #[arg(long)]
        cmdline: Option<String>,
        /// Set a label, KEY=VALUE (repeatable)
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = key_value)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Delete the group and its members
    Delete {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// What every member of a new scale group is made from.
#[derive(Debug, Args)]
pub struct TemplateArgs {
    #[arg(long)]
    pub image: String,
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    #[arg(long, default_value = "256M", value_parser = size)]
    pub memory: ByteSize,
    /// A volume every member gets its own of, NAME=SIZE (repeatable)
    #[arg(long = "volume", value_name = "NAME=SIZE", value_parser = volume_template)]
    pub volumes: Vec<(String, ByteSize)>,
    #[arg(long, default_value = "default")]
    pub network: String,
    /// A label, KEY=VALUE (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = key_value)]
    pub labels: Vec<(String, String)>,
    /// Appended to the image's kernel command line
    #[arg(long)]
    pub cmdline: Option<String>,
}

#[derive(Debug, Clone, Copy, Args)]
pub struct WaitArgs {
    /// Wait until the group has what was asked for, showing progress
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = duration)]
    pub timeout: Duration,
}

/// The worker agent: registers this host and runs the VMs placed on it, one `vmm` process per
/// VM. Needs root (TAP devices, the bridge). VMs keep running when the agent stops; an agent
/// started again on the same --state-dir re-adopts them.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// etcd endpoints, comma-separated
    #[arg(
        long,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        required = true
    )]
    pub etcd: Vec<String>,
    /// This worker's name (a DNS label)
    #[arg(long, required = true)]
    pub name: Option<String>,
    /// vCPUs offered to VMs [default: the host's CPUs]
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory offered to VMs [default: the host's memory minus 256 MiB]
    #[arg(long, value_parser = size)]
    pub memory: Option<ByteSize>,
    /// A label for placement, KEY=VALUE (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = key_value)]
    pub labels: Vec<(String, String)>,
    /// Where VM records, disks, sockets and logs live [default: /var/lib/lightbyte/worker-NAME]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    /// The vmm binary [default: `vmm` next to this binary, else on PATH]
    #[arg(long, value_name = "PATH")]
    pub vmm: Option<std::path::PathBuf>,
    /// The load-balancing proxy run for host-placed load balancers (needs --listen)
    /// [default: `lightbyte-proxy` next to this binary, else on PATH]
    #[arg(long, value_name = "PATH")]
    pub proxy: Option<std::path::PathBuf>,
    /// The control plane images are pulled from (`lightbyte image push` stores them there);
    /// without it only images by host path can be started here
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// Cached images no VM here uses are removed after this long
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = duration)]
    pub image_gc_grace: Duration,
    /// Kernel for images that name none
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<std::path::PathBuf>,
    /// UEFI firmware for images that boot through UEFI [default: lightbyte-firmware next to
    /// the vmm binary, when there is one]
    #[arg(long, value_name = "PATH")]
    pub firmware: Option<std::path::PathBuf>,
    /// Initramfs loaded with --kernel
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub initramfs: Option<std::path::PathBuf>,
    /// Kernel command line for images that name none (the VM's ip= is appended).
    /// random.trust_cpu=on seeds the guest's random pool from RDRAND at boot: without it a
    /// small guest can wait a long time for entropy, and programs that read it block
    #[arg(
        long,
        value_name = "STR",
        default_value = "console=ttyS0 reboot=k panic=1 random.trust_cpu=on"
    )]
    pub cmdline: String,
    /// The network VMs name in spec.network that this worker serves
    #[arg(long, default_value = "default")]
    pub network: String,
    /// Bridge the VMs' TAP devices join (created if missing)
    #[arg(long, default_value = "lbbr0")]
    pub bridge: String,
    /// The VMs' subnet; the bridge takes its first address, the VMs' gateway
    #[arg(long, value_name = "CIDR", default_value = "10.124.0.0/24")]
    pub subnet: orchestrator::worker::Subnet,
    /// Heartbeat lease TTL: the worker goes NotReady this long after the agent dies
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    pub lease_ttl: Duration,
    /// How long an etcd request may take
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration)]
    pub etcd_timeout: Duration,
    /// List the VMs this often even when nothing changed
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
    pub resync: Duration,
    /// How long a deleted VM gets to power off after the ACPI power button before it is killed
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    pub stop_timeout: Duration,
    /// TCP port probed to see that a guest is up on its address (open or closed both count)
    #[arg(long, default_value_t = 22)]
    pub probe_port: u16,
    /// Restarts of a VM whose vmm died within ten minutes before it is marked Failed
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// Serve requests for the VMs' guest agents here (HOST:PORT; port 0 picks one): the control
    /// plane forwards `lightbyte vm agent` to it. It must be reachable from the control plane.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Who may call it at --listen
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Let guests send from any address and reach anything (no nftables rules). By default a
    /// guest may only send from its own MAC and IP, reaches none of this host's services, and
    /// is not forwarded to etcd or the control plane
    #[arg(long)]
    pub no_guest_firewall: bool,
    /// Another ADDR:PORT guests may not reach (repeatable; etcd's and --server's are denied
    /// already)
    #[arg(long = "guest-deny", value_name = "ADDR:PORT")]
    pub guest_deny: Vec<std::net::SocketAddrV4>,
    /// Run vmm processes as root, unconfined. By default each VM's vmm runs as a uid of its own
    /// (from --jail-uids), in a mount namespace holding only its files, under seccomp filters,
    /// in a cgroup v2 with memory, CPU and task limits from the VM's size
    #[arg(long)]
    pub no_jail: bool,
    /// The uids (and gids) jailed VMs take, one each: FIRST-LAST
    #[arg(long, value_name = "FIRST-LAST", default_value = "400000-465535", value_parser = uid_range)]
    pub jail_uids: (u32, u32),
    /// Where the VMs' cgroups go (DIR/lightbyte-<worker>-<vm>, side by side so that each VM
    /// weighs on the CPU as its vCPUs did), under a cgroup v2 mount; on a systemd host, a
    /// delegated cgroup. Without cgroup v2 at /sys/fs/cgroup (a v1 or hybrid host), VMs run
    /// without these limits and the worker says so at start
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: std::path::PathBuf,
}

/// Parses `FIRST-LAST` uids (not 0, FIRST <= LAST).
fn uid_range(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s}: expected FIRST-LAST"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("{v}: not a uid"))
    };
    let (a, b) = (parse(a)?, parse(b)?);
    if a == 0 || a > b || b == u32::MAX {
        return Err(format!("{s}: needs 0 < FIRST <= LAST < 4294967295"));
    }
    Ok((a, b))
}

#[derive(Debug, Subcommand)]
pub enum AgentRequest {
    /// The agent's version, the guest's uptime, hostname and addresses
    Ping,
    /// Write a named document into the guest (refused unless REVISION is above the applied
    /// one), optionally reloading a local service
    Apply {
        /// The document's name in the guest
        document: String,
        #[arg(long)]
        revision: u64,
        /// A file holding the document
        #[arg(long, value_name = "FILE")]
        file: std::path::PathBuf,
        /// A service to reload once it is written
        #[arg(long)]
        service: Option<String>,
    },
    /// The state of local services
    Status {
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Power the guest off
    Shutdown,
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

fn volume_template(s: &str) -> Result<(String, ByteSize), String> {
    let (name, size_text) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=SIZE"))?;
    Ok((name.to_string(), size(size_text)?))
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}
