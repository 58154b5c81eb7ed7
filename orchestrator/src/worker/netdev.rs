//! The worker's network devices: one bridge per worker carrying its VMs' subnet, and a TAP per
//! VM enslaved to it. Set up through iproute2's `ip`, which every Linux host has: the handful of
//! operations here do not justify a netlink implementation, and `ip`'s error messages are the
//! ones operators know.

use std::net::Ipv4Addr;

use tokio::process::Command;
use vmm_api::ifname::{self, IfNameError};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot run `ip {args}`: {source} (is iproute2 installed?)")]
    Spawn {
        args: String,
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error(transparent)]
    BadName(#[from] IfNameError),
}

/// Checks an interface name the way the kernel does (shared with `vmm --net tap=`).
pub fn check_name(name: &str) -> Result<(), NetError> {
    Ok(ifname::check(name)?)
}

async fn ip(args: &[&str]) -> Result<(), NetError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|source| NetError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Failed {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Whether the interface exists in this process's network namespace.
pub use vmm_api::ifname::exists;

/// Creates the bridge if needed, gives it `gateway/prefix` and brings it up. Idempotent.
pub async fn ensure_bridge(name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
    check_name(name)?;
    if !exists(name) {
        ip(&["link", "add", name, "type", "bridge"]).await?;
    }
    ip(&[
        "addr",
        "replace",
        &format!("{gateway}/{prefix}"),
        "dev",
        name,
    ])
    .await?;
    ip(&["link", "set", name, "up"]).await
}

/// Creates the TAP `name` on `bridge`, up. With `owner`, that uid (and gid) may attach to it
/// without privileges (a jailed `vmm`). An existing TAP of that name (left by an earlier
/// attempt) is made again, so its owner is the one asked for.
pub async fn create_tap(name: &str, bridge: &str, owner: Option<u32>) -> Result<(), NetError> {
    check_name(name)?;
    if exists(name) {
        ip(&["link", "del", name]).await?;
    }
    let owner = owner.map(|u| u.to_string());
    let mut args = vec!["tuntap", "add", "dev", name, "mode", "tap"];
    if let Some(u) = &owner {
        args.extend(["user", u, "group", u]);
    }
    ip(&args).await?;
    ip(&["link", "set", name, "master", bridge, "up"]).await
}

/// Removes the TAP `name`; nothing to do when it is gone already.
pub async fn delete_tap(name: &str) -> Result<(), NetError> {
    check_name(name)?;
    if !exists(name) {
        return Ok(());
    }
    match ip(&["link", "del", name]).await {
        Err(_) if !exists(name) => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("lbt-0123456789").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a-name-that-is-too-long").is_err());
        assert!(check_name("tap0; rm").is_err());
    }
}
