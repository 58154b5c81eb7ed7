//! virtio-vsock and the guest agent end to end, in one boot per guest kernel (the minimal one,
//! and Debian's with its own vsock modules). Host programs (`vsockpeer`, `vmm agent`) use the
//! VM's vsock Unix sockets as any host program would; the guest runs `vsockt` and the agent
//! from the test initramfs. Checked:
//! - 16 concurrent connections each way (host→guest and guest→host), each moving 4 MiB both
//!   ways, every byte checked on the receiving side;
//! - a side closing mid-stream: the other side sees the end of the stream after exactly what was
//!   sent, and the VMM keeps serving;
//! - the agent: `ping`, `apply-config` read back through a service's reload, a stale revision
//!   refused, service states, `shutdown` powering the guest off (vmm exits 0);
//! - (minimal kernel) snapshot/restore with a connection open: the guest sees the transport
//!   reset, and new connections and the agent work after the restore.

use std::fs;
use std::time::Duration;

use serde_json::{json, Value};

use lightbyte_tests::artifacts;
use lightbyte_tests::guest::{jail_words, sh_quote, Boot, Scenario};
use lightbyte_tests::paths;
use lightbyte_tests::testhost;

const MIB4: u64 = 4 << 20;

/// What the guest runs: listeners for the host's connections, then its own connections to the
/// host's listeners, then (with `hold`) a connection it holds open until the transport ends it.
fn guest_cmd(hold: bool) -> String {
    let hold = if hold { "vsockt hold 6003 &" } else { "" };
    format!(
        r#"S=/etc/lightbyte/services
printf '#!/bin/sh\ncase "$1" in reload) cat /run/lightbyte/config/app.conf;; status) exit 0;; esac\n' > $S/show
printf '#!/bin/sh\nexit 3\n' > $S/idle
chmod 755 $S/show $S/idle
vsockt listen 5000 16 {MIB4} > /tmp/l5000 2>&1 &
vsockt listen 5001 1 {MIB4} --close-after 65536 > /tmp/l5001 2>&1 &
vsockt listen 5002 1 1048576 > /tmp/l5002 2>&1 &
for f in l5000 l5001 l5002; do
  for _ in $(seq 100); do grep -q listening /tmp/$f 2>/dev/null && break; sleep 0.1; done
done
echo VSOCK-GUEST-READY
vsockt dial 6000 16 {MIB4}
vsockt dial 6001 1 {MIB4} --close-after 65536
vsockt dial 6002 1 {MIB4}
echo VSOCK-GUEST-DIALS-DONE
{hold}
wait
cat /tmp/l5000 /tmp/l5001 /tmp/l5002
echo VSOCK-GUEST-DONE
sleep 600"#
    )
}

/// Where a boot's Unix sockets live inside the test host (its /tmp: Unix sockets do not cross
/// the shared work directory).
fn socket_dir(label: &str) -> String {
    format!("/tmp/lbvsock-{label}")
}

/// The host side of one boot, inside the test host: `label`'s files go to `dir`.
fn host_script(label: &str, dir: &str, create: &Value, snapshot: bool) -> String {
    let vmm = paths::binary("vmm").unwrap().display().to_string();
    let peer = paths::binary("vsockpeer").unwrap().display().to_string();
    let restore = if snapshot {
        r#"echo "== snapshot"; c "$API" PUT vm/pause; c "$API" PUT vm/snapshot -d "{\"destination_dir\":\"$T/snap\"}"
c "$API" PUT vm/shutdown -d '{"timeout_ms": 100}'; reap
echo "== restore"
$VMMJ --api-socket "$API2" > "$D/vmm-2.log" 2>&1 & P1=$!
wait_sock "$API2"; API=$API2
c "$API" PUT vm/restore -d "{\"source_dir\":\"$T/snap\",\"resume\":true}"
wait_line 'VSOCKT hold 6003 0 ENDED'
"#
    } else {
        ""
    };
    format!(
        r#"D={dir}
{{ VMM={vmm}; PEER={peer}
T={sockets}; rm -rf "$T"; mkdir -p "$T"; SOCK=$T/v.sock; API=$T/api.sock; API2=$T/api2.sock; SER=$D/serial.log
# The VMM runs jailed; the host's listeners are made connectable by its uid (umask 0).
VMMJ="$VMM {jail}"
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$T"' EXIT
c() {{ sock=$1; shift; m=$1; p=$2; shift 2
      curl -s -S --max-time 120 --unix-socket "$sock" -X "$m" -H 'Content-Type: application/json' "$@" \
        -w ' HTTP%{{http_code}}\n' "http://localhost/api/v1/$p"; }}
wait_sock() {{ for _ in $(seq 1 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "TIMEOUT socket $1"; }}
# What each vmm thread is blocked on: a stalled guest shows its vCPUs in kvm_vcpu_block.
threads() {{ for t in /proc/$P1/task/*; do echo "  $(cat $t/comm): $(cat $t/wchan 2>/dev/null)"; done; }}
seen() {{ for _ in $(seq 1 $(($2 * 5))); do grep -q "$1" "$SER" 2>/dev/null && return 0; sleep 0.2; done; return 1; }}
# Waits for a guest line. A guest silent for 180 s is reported with its threads' states and
# then paused and resumed once (its vCPUs leave KVM_RUN and re-enter it, which re-checks
# pending events): nested KVM in the TCG test host has been seen to leave both halted vCPUs
# of a 2-vCPU guest waiting for a wakeup that never came. A guest that goes on after that
# kick is reported as KICKED (the test prints it); one that does not is a TIMEOUT.
wait_line() {{ seen "$1" 180 && return 0
  echo "STALL waiting for $1"; threads
  c "$API" PUT vm/pause; c "$API" PUT vm/resume
  if seen "$1" 120; then echo "KICKED: the guest went on after a pause/resume ($1)"; else echo "TIMEOUT waiting for $1"; threads; fi; }}
# Every host step is bounded: a stalled connection must fail the test, not hang it.
agent() {{ timeout -k 5 300 $VMM agent "$@" --socket "$SOCK"; }}
PEER="timeout -k 5 600 $PEER"
# The vmm's exit, waited for at most 60 s (then its threads are shown and it is killed).
reap() {{ for _ in $(seq 1 300); do kill -0 $P1 2>/dev/null || break; sleep 0.2; done
  if kill -0 $P1 2>/dev/null; then echo "TIMEOUT the vmm did not exit"; threads; kill -9 $P1; fi
  wait $P1; RC=$?; }}
(umask 0; $PEER listen "${{SOCK}}_6000" 16 {MIB4}) > "$D/p6000.log" 2>&1 &
(umask 0; $PEER listen "${{SOCK}}_6001" 1 {MIB4}) > "$D/p6001.log" 2>&1 &
(umask 0; $PEER listen "${{SOCK}}_6002" 1 {MIB4} --close-after 65536) > "$D/p6002.log" 2>&1 &
{hold_peer}$VMMJ --api-socket "$API" > "$D/vmm-1.log" 2>&1 & P1=$!
wait_sock "$API"
echo "== create"; c "$API" PUT vm/create -d {create_body}
echo "== boot"; c "$API" PUT vm/boot
wait_line VSOCK-GUEST-READY
echo "== dial 5000"; $PEER dial "$SOCK" 5000 16 {MIB4} > "$D/d5000.log" 2>&1; echo "RC $?"
echo "== dial 5001"; $PEER dial "$SOCK" 5001 1 {MIB4} > "$D/d5001.log" 2>&1; echo "RC $?"
echo "== ping"; for _ in $(seq 1 60); do agent ping > "$D/ping.json" 2>&1 && break; sleep 0.5; done; echo "RC $?"
echo "== apply"; agent apply app.conf --revision 2 --content "token-{label}-$$" --service show > "$D/apply.json" 2>&1; echo "RC $?"
echo "token-{label}-$$" > "$D/token"
echo "== stale"; agent apply app.conf --revision 2 --content stale > "$D/stale.json" 2>&1; echo "RC $?"
echo "== status"; agent status show idle nope > "$D/status.json" 2>&1; echo "RC $?"
wait_line VSOCK-GUEST-DIALS-DONE
{restore}echo "== dial 5002"; $PEER dial "$SOCK" 5002 1 1048576 > "$D/d5002.log" 2>&1; echo "RC $?"
echo "== ping-2"; agent ping > "$D/ping2.json" 2>&1; echo "RC $?"
wait_line VSOCK-GUEST-DONE
echo "== shutdown"; agent shutdown > "$D/shutdown.json" 2>&1; echo "RC $?"
reap; echo "VMM-EXIT $RC"
}} > "$D/script.log" 2>&1"#,
        create_body = sh_quote(&create.to_string()),
        sockets = socket_dir(label),
        jail = jail_words(
            &["$D", "$T"],
            &[
                create["kernel"].as_str().unwrap_or_default(),
                create["initramfs"].as_str().unwrap_or_default(),
            ],
        ),
        hold_peer = if snapshot {
            "(umask 0; $PEER listen \"${SOCK}_6003\" 1 0) > \"$D/p6003.log\" 2>&1 &\n"
        } else {
            ""
        },
    )
}

/// Lines of `text` starting with `prefix`.
fn lines_with<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with(prefix))
        .collect()
}

/// The section of the script log after `== name`.
fn section(script: &str, name: &str) -> String {
    let start = script
        .find(&format!("== {name}\n"))
        .unwrap_or_else(|| panic!("no section {name}:\n{script}"));
    let rest = &script[start + name.len() + 4..];
    rest[..rest.find("\n== ").unwrap_or(rest.len())].to_string()
}

fn read(dir: &std::path::Path, f: &str) -> String {
    fs::read_to_string(dir.join(f)).unwrap_or_default()
}

fn json_file(dir: &std::path::Path, f: &str) -> Value {
    let text = read(dir, f);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{f}: {e}: {text}"))
}

fn check_boot(dir: &std::path::Path, label: &str, snapshot: bool) {
    let script = read(dir, "script.log");
    let serial = read(dir, "serial.log");
    let ctx = format!("{label}:\nscript:\n{script}\nserial:\n{serial}");
    assert!(!script.contains("TIMEOUT"), "{ctx}");
    // Bulk: 16 connections each way, 4 MiB both ways on each, checked on both sides.
    for (peer_log, guest_role, port) in [("d5000.log", "listen", 5000), ("p6000.log", "dial", 6000)]
    {
        let peer = read(dir, peer_log);
        let ok = lines_with(&peer, "VSOCKPEER")
            .iter()
            .filter(|l| l.contains(&format!("OK sent={MIB4} received={MIB4}")))
            .count();
        assert_eq!(ok, 16, "{label} host side of port {port}:\n{peer}\n{ctx}");
        let guest_ok = lines_with(&serial, &format!("VSOCKT {guest_role} {port} "))
            .iter()
            .filter(|l| l.contains(&format!("OK sent={MIB4} received={MIB4}")))
            .count();
        assert_eq!(guest_ok, 16, "{label} guest side of port {port}\n{ctx}");
    }
    // The guest closes mid-stream (5001 host→guest, 6001 guest→host): the host sees the end of
    // the stream after exactly what the guest sent.
    for f in ["d5001.log", "p6001.log"] {
        let peer = read(dir, f);
        assert!(
            peer.contains("received=65536")
                && (peer.contains("end of stream after 65536") || peer.contains("read:")),
            "{label} {f}:\n{peer}\n{ctx}"
        );
    }
    // The host closes mid-stream (6002): the guest sees it after 64 KiB.
    let g6002 = lines_with(&serial, "VSOCKT dial 6002 ");
    assert!(
        g6002.iter().any(|l| l.contains("received=65536")),
        "{label} 6002: {g6002:?}\n{ctx}"
    );
    // The VMM kept serving: the connection after all that works.
    assert!(
        read(dir, "d5002.log").contains("OK sent=1048576 received=1048576"),
        "{label} 5002\n{ctx}"
    );
    assert!(section(&script, "dial 5002").contains("RC 0"), "{ctx}");
    // The agent.
    for name in ["ping", "apply", "status", "ping-2", "shutdown"] {
        assert!(
            section(&script, name).contains("RC 0"),
            "{label} {name}\n{ctx}"
        );
    }
    let ping = json_file(dir, "ping.json");
    assert_eq!(ping["type"], "pong", "{ping}");
    assert_eq!(ping["protocol"], 1);
    assert!(ping["uptime_secs"].as_f64().unwrap_or(0.0) > 0.0, "{ping}");
    let token = read(dir, "token").trim().to_string();
    let apply = json_file(dir, "apply.json");
    assert_eq!(apply["type"], "applied", "{apply}");
    assert_eq!(apply["revision"], 2);
    assert_eq!(apply["reload"]["exit_code"], 0, "{apply}");
    assert_eq!(
        apply["reload"]["output"].as_str().unwrap_or_default(),
        token,
        "the document read back from the guest"
    );
    assert!(section(&script, "stale").contains("RC 1"), "{ctx}");
    let stale = json_file(dir, "stale.json");
    assert_eq!(stale["kind"], "stale-revision", "{stale}");
    assert_eq!(stale["current_revision"], 2);
    let status = json_file(dir, "status.json");
    let states: Vec<_> = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(states, ["running", "stopped", "unknown"], "{status}");
    assert_eq!(json_file(dir, "shutdown.json")["type"], "shutting-down");
    assert!(
        script.contains("VMM-EXIT 0"),
        "the guest powered off\n{ctx}"
    );
    if snapshot {
        assert!(section(&script, "restore").contains("HTTP204"), "{ctx}");
        let held = lines_with(&serial, "VSOCKT hold 6003 0 ENDED");
        assert_eq!(held.len(), 1, "the open connection was reset\n{ctx}");
        println!("{label}: held connection after restore: {}", held[0]);
    }
}

#[test]
fn vsock_connections_and_the_guest_agent() {
    let host = testhost::shared().unwrap();
    let a = artifacts::get().unwrap();
    let mut s = Scenario::new(host, "vsock").unwrap();
    let dir = s.dir().to_path_buf();
    let boots = [
        ("pvh", &a.minimal_vmlinux, true),
        ("debian", &a.debian_bzimage, false),
    ];
    for (label, kernel, snapshot) in boots {
        let d = dir.join(label);
        fs::create_dir_all(&d).unwrap();
        let boot = Boot::new(kernel)
            .unwrap()
            .cpus(2)
            .param("lbagent=1")
            .run(&guest_cmd(snapshot));
        let create = json!({
            "kernel": kernel,
            "initramfs": a.initramfs,
            "cmdline": boot.full_cmdline(),
            "cpus": 2,
            "memory": "512M",
            "serial": format!("file:{}", d.join("serial.log").display()),
            "vsock": {"cid": 3, "socket": format!("{}/v.sock", socket_dir(label))},
        });
        s.shell(&host_script(
            label,
            &d.display().to_string(),
            &create,
            snapshot,
        ));
    }
    if let Err(e) = s.run(host, Duration::from_secs(1200)) {
        // The scenario's own output is empty (each boot logs to its directory): show where
        // each boot stopped.
        for (label, _, _) in boots {
            let serial = read(&dir.join(label), "serial.log");
            let tail: Vec<&str> = serial.lines().rev().take(40).collect();
            eprintln!(
                "{label} script:\n{}\n{label} serial (last 40 lines, newest first):\n{}",
                read(&dir.join(label), "script.log"),
                tail.join("\n")
            );
        }
        panic!("{e:#}");
    }
    for (label, _, snapshot) in boots {
        let script = read(&dir.join(label), "script.log");
        for line in lines_with(&script, "KICKED")
            .into_iter()
            .chain(lines_with(&script, "STALL"))
        {
            println!("{label}: {line}");
        }
        check_boot(&dir.join(label), label, snapshot);
    }
}
