//! What the agent reports about the guest, and powering it off.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// Seconds since the guest booted.
pub fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The guest's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn prefix_len(mask: &[u8]) -> u32 {
    mask.iter().map(|b| b.count_ones()).sum()
}

/// The guest's addresses, loopback excluded, as `address/prefix`.
pub fn addresses() -> Vec<String> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list and stores its head in `list`; freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return out;
    }
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & (libc::IFF_LOOPBACK as u32) != 0 {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        match family {
            libc::AF_INET => {
                // SAFETY: an AF_INET address is a sockaddr_in; the netmask, when set, too.
                let (addr, mask) = unsafe {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let m = (!ifa.ifa_netmask.is_null()).then(|| {
                        (*(ifa.ifa_netmask as *const libc::sockaddr_in))
                            .sin_addr
                            .s_addr
                    });
                    (a.sin_addr.s_addr, m)
                };
                let prefix = mask.map_or(32, |m| prefix_len(&m.to_ne_bytes()));
                out.push(format!("{}/{prefix}", Ipv4Addr::from(u32::from_be(addr))));
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address is a sockaddr_in6; the netmask, when set, too.
                let (addr, mask) = unsafe {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let m = (!ifa.ifa_netmask.is_null()).then(|| {
                        (*(ifa.ifa_netmask as *const libc::sockaddr_in6))
                            .sin6_addr
                            .s6_addr
                    });
                    (a.sin6_addr.s6_addr, m)
                };
                let prefix = mask.map_or(128, |m| prefix_len(&m));
                out.push(format!("{}/{prefix}", Ipv6Addr::from(addr)));
            }
            _ => {}
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    out
}

/// Flushes the file systems and powers the guest off, a moment after the answer went out.
pub fn power_off() {
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: sync has no arguments; reboot with RB_POWER_OFF ends the guest (the agent runs
    // as root, as it must to do this).
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    tracing::error!("powering off failed: {}", std::io::Error::last_os_error());
}
