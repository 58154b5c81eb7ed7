//! The worker agent (`lightbyte worker`): registers the host with the control plane and runs
//! the VMs placed on it, one `vmm` process per VM driven through its API socket.
//!
//! Level-triggered like the controllers: each pass compares the VMs etcd places here with what
//! runs here (the records under the state directory, see [`record`]) and acts on the difference
//! — start what is missing, stop and clean up what is no longer placed here, restart or report
//! what died, write observed status back. A pass may stop at any line: records are written
//! before the resources they name exist and removed after those are gone, and `vmm` processes
//! outlive the agent, so a restarted agent re-adopts them.

mod agent;
pub mod api;
pub mod disks;
pub mod durable;
pub mod firewall;
mod forgotten;
pub mod guest;
pub mod host_proxy;
pub mod ipam;
pub mod jail;
mod launch;
mod local;
pub mod moves;
pub mod netdev;
pub mod probe;
pub mod process;
pub mod record;
mod tasks;
pub mod want;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub use agent::run;
pub use ipam::Subnet;

use crate::model::Capacity;
use crate::store::StoreError;

/// How a worker agent runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub etcd: Vec<String>,
    pub name: String,
    pub capacity: Capacity,
    pub labels: BTreeMap<String, String>,
    /// Records, disks, sockets and logs of the VMs (see [`record::Layout`]).
    pub state_dir: PathBuf,
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// The `lightbyte-proxy` binary, run for host-placed load balancers.
    pub proxy: PathBuf,
    /// The control plane to pull images from.
    pub server: Option<String>,
    /// Cached images no VM here uses are removed after this long.
    pub image_gc_grace: Duration,
    /// Kernel, initramfs and command line for images that name none.
    pub kernel: Option<PathBuf>,
    /// UEFI firmware for images that boot through UEFI.
    pub firmware: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    /// The network this worker serves (VMs name it in `spec.network`), its bridge and subnet.
    pub network: String,
    pub bridge: String,
    pub subnet: Subnet,
    /// Heartbeat lease TTL.
    pub lease_ttl: Duration,
    /// etcd request timeout.
    pub etcd_timeout: Duration,
    /// List every VM at least this often, even when the watch says nothing changed.
    pub resync: Duration,
    /// How long a deleted VM's guest gets to power off after the power button, before it is
    /// killed.
    pub stop_timeout: Duration,
    /// The TCP port probed to see that a guest is up on its address.
    pub probe_port: u16,
    /// Restarts of a VM whose `vmm` died, within ten minutes, before it is marked Failed.
    pub max_restarts: u32,
    /// Where to serve requests for the VMs' guest agents (the control plane forwards
    /// `lightbyte vm agent` here); none: not served.
    pub listen: Option<std::net::SocketAddr>,
    /// Who may call what it serves at `listen`.
    pub auth: crate::auth::Auth,
    /// Mutual TLS for what it serves at `listen` (none: plain HTTP).
    pub tls: Option<crate::tls::TlsFiles>,
    /// The guests' firewall (none: guests may send anything and reach anything).
    pub firewall: Option<firewall::Guard>,
    /// How `vmm`s are jailed (none: they run as root, unconfined).
    pub jail: Option<jail::JailSettings>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker setup: {0}")]
    Setup(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Net(#[from] netdev::NetError),
}

/// The kernel's `ip=` parameter configuring the guest's first interface statically:
/// `ip=<client>::<gateway>:<netmask>:<hostname>:eth0:off`.
pub fn ip_param(ip: std::net::Ipv4Addr, subnet: &Subnet, hostname: &str) -> String {
    format!(
        "ip={ip}::{}:{}:{hostname}:eth0:off",
        subnet.gateway(),
        subnet.netmask()
    )
}

/// FNV-1a: a stable hash of a VM's uid for its TAP name and MAC address (the standard
/// library's hashers are not stable across releases, and these names outlive the agent).
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The VM's TAP device: `lbt` and 12 hex digits, within the 15 characters Linux allows.
/// The TAP of VM `uid` on `worker`: distinct per worker, so a VM moving between two workers on
/// one host (test namespaces, the dev cluster) never meets its own TAP.
pub fn tap_name(uid: &str, worker: &str) -> String {
    let key = format!("{uid}@{worker}");
    format!("lbt{:012x}", fnv1a(key.as_bytes()) & 0xffff_ffff_ffff)
}

/// A locally administered unicast MAC derived from the uid, stable across restarts.
pub fn mac_address(uid: &str) -> String {
    let h = fnv1a(format!("mac:{uid}").as_bytes()).to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        h[0], h[1], h[2], h[3], h[4]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_valid() {
        let t = tap_name("3f1c0a7e-5d1b-4a52-9d8e-2b7a1c0f9e11", "w1");
        assert_eq!(t.len(), 15);
        assert!(netdev::check_name(&t).is_ok());
        assert_eq!(t, tap_name("3f1c0a7e-5d1b-4a52-9d8e-2b7a1c0f9e11", "w1"));
        assert_ne!(t, tap_name("3f1c0a7e-5d1b-4a52-9d8e-2b7a1c0f9e12", "w1"));
        assert_ne!(t, tap_name("3f1c0a7e-5d1b-4a52-9d8e-2b7a1c0f9e11", "w2"));
        let m = mac_address("u");
        assert!(m.starts_with("02:"));
        assert_eq!(m.len(), 17);
        let subnet: Subnet = "10.124.1.0/24".parse().unwrap();
        assert_eq!(
            ip_param("10.124.1.5".parse().unwrap(), &subnet, "web-1"),
            "ip=10.124.1.5::10.124.1.1:255.255.255.0:web-1:eth0:off"
        );
    }
}
