//! Guest network isolation with nftables (run through `nft -f -`, like `ip` in [`super::netdev`]:
//! the ruleset text is what operators read and debug with `nft list ruleset`).
//!
//! Two tables per worker bridge:
//! - `bridge lb_<bridge>`: every frame a guest sends through its TAP must carry its own MAC, and
//!   its own IP in IPv4 and ARP (it answers ARP for its own address only); anything else (other
//!   addresses, IPv6, other protocols) is dropped. A TAP with no rules yet drops everything.
//!   Per VM: a chain `vm_<tap>` and an element of the `ports` verdict map.
//! - `inet lb_<bridge>_guard`: guests reach no local service of the worker (its API, SSH,
//!   anything but ICMP and replies to connections the worker opened), and are not forwarded to
//!   etcd or the control plane (nor to any address and port the operator adds).

use std::net::{Ipv4Addr, SocketAddrV4};

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::netdev;

/// Prefix of the TAP devices the worker creates (`super::mod::tap_name`).
pub const TAP_PREFIX: &str = "lbt";

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run nft: {0} (is nftables installed?)")]
    Spawn(std::io::Error),
    #[error("nft refused the rules: {stderr}")]
    Failed { stderr: String },
    #[error(transparent)]
    Name(#[from] netdev::NetError),
    #[error("invalid MAC address {0:?}")]
    Mac(String),
}

/// The worker-wide part: what guests may not reach.
#[derive(Debug, Clone)]
pub struct Guard {
    pub bridge: String,
    /// Forwarded traffic from guests to these is dropped.
    pub deny: Vec<SocketAddrV4>,
}

fn bridge_table(bridge: &str) -> String {
    format!("lb_{}", bridge.replace(['-', '.'], "_"))
}

fn chain_of(tap: &str) -> String {
    format!("vm_{}", tap.replace(['-', '.'], "_"))
}

async fn nft(script: &str) -> Result<(), FirewallError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(FirewallError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(FirewallError::Spawn)?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(FirewallError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(FirewallError::Failed {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl Guard {
    /// The ruleset of both tables, replacing earlier ones (VM chains are added again by
    /// [`allow_vm`] for the VMs that run).
    pub fn ruleset(&self) -> String {
        let b = &self.bridge;
        let t = bridge_table(b);
        let mut deny = String::new();
        for a in &self.deny {
            deny.push_str(&format!(
                "    iifname \"{b}\" ip daddr {} tcp dport {} drop\n",
                a.ip(),
                a.port()
            ));
        }
        format!(
            "table bridge {t}\n\
             delete table bridge {t}\n\
             table bridge {t} {{\n\
             \x20 map ports {{ type ifname : verdict; }}\n\
             \x20 chain prerouting {{\n\
             \x20   type filter hook prerouting priority -200; policy accept;\n\
             \x20   iifname vmap @ports\n\
             \x20   iifname \"{TAP_PREFIX}*\" drop\n\
             \x20 }}\n\
             }}\n\
             table inet {t}_guard\n\
             delete table inet {t}_guard\n\
             table inet {t}_guard {{\n\
             \x20 chain input {{\n\
             \x20   type filter hook input priority 0; policy accept;\n\
             \x20   iifname \"{b}\" ct state established,related accept\n\
             \x20   iifname \"{b}\" meta l4proto icmp accept\n\
             \x20   iifname \"{b}\" drop\n\
             \x20 }}\n\
             \x20 chain forward {{\n\
             \x20   type filter hook forward priority 0; policy accept;\n\
             {deny}\
             \x20 }}\n\
             }}\n"
        )
    }

    /// Installs both tables (at agent start; idempotent).
    pub async fn install(&self) -> Result<(), FirewallError> {
        netdev::check_name(&self.bridge)?;
        nft(&self.ruleset()).await
    }
}

/// The rules of one VM's TAP: only its MAC, its IPv4 address, ARP for that address.
pub fn vm_rules(bridge: &str, tap: &str, mac: &str, ip: Ipv4Addr) -> Result<String, FirewallError> {
    netdev::check_name(tap)?;
    let valid_mac = mac.len() == 17
        && mac
            .split(':')
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if !valid_mac {
        return Err(FirewallError::Mac(mac.to_string()));
    }
    let t = bridge_table(bridge);
    let c = chain_of(tap);
    Ok(format!(
        "add chain bridge {t} {c}\n\
         flush chain bridge {t} {c}\n\
         add rule bridge {t} {c} ether saddr != {mac} drop\n\
         add rule bridge {t} {c} ether type arp arp saddr ether != {mac} drop\n\
         add rule bridge {t} {c} ether type arp arp saddr ip != {ip} drop\n\
         add rule bridge {t} {c} ether type arp accept\n\
         add rule bridge {t} {c} ether type ip ip saddr != {ip} drop\n\
         add rule bridge {t} {c} ether type ip accept\n\
         add rule bridge {t} {c} drop\n\
         add element bridge {t} ports {{ \"{tap}\" : jump {c} }}\n"
    ))
}

/// Lets the guest behind `tap` send as `mac`/`ip` (before its vmm starts; idempotent).
pub async fn allow_vm(
    bridge: &str,
    tap: &str,
    mac: &str,
    ip: Ipv4Addr,
) -> Result<(), FirewallError> {
    // A stale element of an earlier run would make `add element` fail: remove it first.
    let _ = remove_vm(bridge, tap).await;
    nft(&vm_rules(bridge, tap, mac, ip)?).await
}

/// Removes a VM's rules; nothing to do when they are gone.
pub async fn remove_vm(bridge: &str, tap: &str) -> Result<(), FirewallError> {
    netdev::check_name(tap)?;
    let t = bridge_table(bridge);
    let c = chain_of(tap);
    let _ = nft(&format!(
        "delete element bridge {t} ports {{ \"{tap}\" }}\n"
    ))
    .await;
    let _ = nft(&format!("delete chain bridge {t} {c}\n")).await;
    Ok(())
}

/// Removes a VM's TAP, then its rules (when `guard` is on).
pub async fn release(guard: Option<&Guard>, tap: &str) -> Result<(), netdev::NetError> {
    netdev::delete_tap(tap).await?;
    if let Some(g) = guard {
        if let Err(e) = remove_vm(&g.bridge, tap).await {
            tracing::warn!(tap, error = %e, "cannot remove the guest's firewall rules");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_name_the_vm_and_refuse_bad_input() {
        let r = vm_rules(
            "lbbr0",
            "lbt0a1b",
            "02:00:0a:7c:01:02",
            Ipv4Addr::new(10, 124, 1, 2),
        )
        .unwrap();
        assert!(r.contains("ether saddr != 02:00:0a:7c:01:02 drop"), "{r}");
        assert!(r.contains("ip saddr != 10.124.1.2 drop"), "{r}");
        assert!(r.contains("\"lbt0a1b\" : jump vm_lbt0a1b"), "{r}");
        assert!(vm_rules("lbbr0", "lbt0", "02:00:00:00:00:0g", Ipv4Addr::LOCALHOST).is_err());
        assert!(vm_rules(
            "lbbr0",
            "bad name",
            "02:00:00:00:00:01",
            Ipv4Addr::LOCALHOST
        )
        .is_err());
        let g = Guard {
            bridge: "lbbr0".into(),
            deny: vec!["10.123.0.1:2379".parse().unwrap()],
        };
        let r = g.ruleset();
        assert!(
            r.contains("iifname \"lbbr0\" ip daddr 10.123.0.1 tcp dport 2379 drop"),
            "{r}"
        );
        assert!(r.contains("table bridge lb_lbbr0 {"), "{r}");
    }
}
