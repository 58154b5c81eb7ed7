//! The guests' firewall on real interfaces: a bridge in a network namespace standing for the
//! worker, veth pairs standing for guests' TAPs (their far ends in namespaces of their own, so
//! "the guest" can change its addresses), and a namespace behind the worker standing for etcd.
//! Needs root and nftables.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use orchestrator::worker::firewall::{self, Guard};

/// The namespaces and links of one test, deleted however it ends.
struct Net {
    ns: Vec<String>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn sh(ns: &str, cmd: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn must(ns: &str, cmd: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{ns}: {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `f` on a thread inside namespace `ns` (the processes it spawns and the sockets it
/// opens live there too).
fn ns_thread<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace file we opened; it changes this new thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

/// Runs `f` on a thread inside namespace `ns` and waits for it.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    ns_thread(ns, f).join().unwrap()
}

/// A TCP listener on `addr` in namespace `ns` that accepts and closes, for the rest of the
/// test process.
fn listen(ns: &str, addr: &'static str) {
    let (tx, rx) = std::sync::mpsc::channel();
    ns_thread(ns, move || {
        let l = std::net::TcpListener::bind(addr).unwrap();
        tx.send(()).unwrap();
        for conn in l.incoming() {
            drop(conn);
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("listener");
}

fn reachable(from: &str, to: &str) -> bool {
    sh(from, &format!("ping -c 1 -W 2 {to}"))
}

fn tcp_open(from: &str, addr: &str, port: u16) -> bool {
    sh(
        from,
        &format!("timeout 3 bash -c 'echo > /dev/tcp/{addr}/{port}'"),
    )
}

#[test]
fn guests_send_only_as_themselves_and_reach_no_service_of_the_cluster() {
    let tag = format!("{:x}", std::process::id() & 0xffff);
    let (w, g1, g2, e) = (
        format!("lbfw-w-{tag}"),
        format!("lbfw-g1-{tag}"),
        format!("lbfw-g2-{tag}"),
        format!("lbfw-e-{tag}"),
    );
    let _net = Net {
        ns: vec![w.clone(), g1.clone(), g2.clone(), e.clone()],
    };
    for ns in [&w, &g1, &g2, &e] {
        assert!(Command::new("ip")
            .args(["netns", "add", ns])
            .status()
            .unwrap()
            .success());
        must(ns, "ip link set lo up");
    }
    // The worker: bridge 10.99.0.1/24 for the guests, 10.98.0.1 towards "etcd", forwarding.
    must(&w, "ip link add lbfwbr type bridge && ip addr add 10.99.0.1/24 dev lbfwbr && ip link set lbfwbr up");
    must(&w, "sysctl -qw net.ipv4.ip_forward=1");
    must(
        &w,
        &format!("ip link add eth-e type veth peer name eth0 netns {e}"),
    );
    must(
        &w,
        "ip addr add 10.98.0.1/24 dev eth-e && ip link set eth-e up",
    );
    must(&e, "ip addr add 10.98.0.2/24 dev eth0 && ip link set eth0 up && ip route add default via 10.98.0.1");
    // Two guests: TAP-like ports lbt… on the bridge.
    let guests = [
        (
            &g1,
            "lbtfw1",
            "02:00:0a:63:00:02",
            Ipv4Addr::new(10, 99, 0, 2),
        ),
        (
            &g2,
            "lbtfw2",
            "02:00:0a:63:00:03",
            Ipv4Addr::new(10, 99, 0, 3),
        ),
    ];
    for (ns, port, mac, ip) in &guests {
        must(
            &w,
            &format!("ip link add {port} type veth peer name eth0 netns {ns}"),
        );
        must(&w, &format!("ip link set {port} master lbfwbr up"));
        must(ns, &format!("ip link set eth0 address {mac} && ip addr add {ip}/24 dev eth0 && ip link set eth0 up && ip route add default via 10.99.0.1"));
    }
    // Services: the worker's API on the bridge address, etcd and an ordinary service behind.
    listen(&w, "10.99.0.1:7071");
    listen(&e, "10.98.0.2:2379");
    listen(&e, "10.98.0.2:8080");
    // Without the firewall everything is reachable (the test can tell).
    assert!(
        tcp_open(&g1, "10.99.0.1", 7071),
        "no listener on the worker's port"
    );
    assert!(tcp_open(&g1, "10.98.0.2", 2379), "no route to etcd");

    let guard = Guard {
        bridge: "lbfwbr".into(),
        deny: vec!["10.98.0.2:2379".parse().unwrap()],
    };
    let rules: Vec<_> = guests
        .iter()
        .map(|(_, port, mac, ip)| (port.to_string(), mac.to_string(), *ip))
        .collect();
    in_ns(&w, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            guard.install().await.unwrap();
            for (port, mac, ip) in &rules {
                firewall::allow_vm("lbfwbr", port, mac, *ip).await.unwrap();
            }
            // Idempotent: installing a VM's rules again is fine.
            let (port, mac, ip) = &rules[0];
            firewall::allow_vm("lbfwbr", port, mac, *ip).await.unwrap();
        });
    });

    // As themselves, guests reach each other, the gateway (ICMP) and ordinary services.
    assert!(reachable(&g1, "10.99.0.3"), "guest to guest");
    assert!(reachable(&g1, "10.99.0.1"), "guest to gateway");
    assert!(
        tcp_open(&g1, "10.98.0.2", 8080),
        "guest to a service through the gateway"
    );
    // Not the worker's own services, not etcd.
    assert!(
        !tcp_open(&g1, "10.99.0.1", 7071),
        "guest reached the worker's API"
    );
    assert!(!tcp_open(&g2, "10.98.0.2", 2379), "guest reached etcd");

    // Another IP: nothing gets through (ARP for it is refused too).
    must(&g1, "ip addr flush dev eth0 && ip addr add 10.99.0.66/24 dev eth0 && ip route add default via 10.99.0.1");
    assert!(
        !reachable(&g1, "10.99.0.3"),
        "spoofed IP reached the other guest"
    );
    assert!(
        !reachable(&g1, "10.99.0.1"),
        "spoofed IP reached the gateway"
    );
    // Its own IP again, but another MAC.
    must(&g1, "ip addr flush dev eth0 && ip link set eth0 address 02:00:0a:63:00:99 && ip addr add 10.99.0.2/24 dev eth0 && ip route add default via 10.99.0.1");
    assert!(
        !reachable(&g1, "10.99.0.3"),
        "spoofed MAC reached the other guest"
    );
    // Back to itself: it works again.
    must(&g1, "ip link set eth0 address 02:00:0a:63:00:02");
    assert!(reachable(&g1, "10.99.0.3"), "guest restored");

    // A port with no rules (a TAP whose VM has none yet) drops everything.
    in_ns(&w, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(firewall::remove_vm("lbfwbr", "lbtfw2"))
            .unwrap();
    });
    assert!(!reachable(&g2, "10.99.0.2"), "a port without rules sent");
}
