//! virtio-net end to end: guests (in the test host on machines without VMX/SVM) on a TAP
//! bridged to the host side of a network namespace made for the test. Each guest configures
//! eth0 with the MAC it was given, pings the host, downloads 8 MiB from an HTTP server on the
//! host and uploads 8 MiB of random bytes to a TCP sink there, with sha256 compared both ways,
//! on the minimal kernel and on Debian's. Then a guest pinging in a loop, with a disk it writes
//! and reads on every round, is rebooted (the TAP is let go and attached again), paused,
//! snapshotted, stopped, and restored in a new process on the same TAP and disk: its pings go
//! on, it reads the host's data through the restored disk, and its synced writes land.

use std::fs;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use serde_json::json;

use lightbyte_tests::artifacts;
use lightbyte_tests::data::{pattern, sha256_hex};
use lightbyte_tests::guest::{jail_words, sh_quote, Boot, Scenario, JAIL_ID};
use lightbyte_tests::paths;
use lightbyte_tests::testhost;

const MIB: usize = 1 << 20;
const NETNS: &str = "lbnet-test";
const HOST_IP: &str = "10.99.0.1";
/// Distance between the disk blocks the pinger reads, wider than the guest's readahead, so that
/// every read reaches the device.
const READ_STRIDE: u64 = 256 << 10;
/// Rounds whose blocks the host fills.
const ROUNDS: u64 = 400;

/// What each guest does once eth0 is up; every result is a line the test reads back.
const GUEST_CMD: &str = "\
echo \"MAC $(cat /sys/class/net/eth0/address)\"
ping -c 3 -W 10 10.99.0.1 | grep 'packets transmitted'
t0=$(cut -d' ' -f1 /proc/uptime)
echo \"DOWN-SHA $(wget -q -O - http://10.99.0.1:8080/down.bin | sha256sum | cut -c1-64)\"
t1=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/urandom of=/tmp/up.bin bs=1M count=8 2>/dev/null
echo \"UP-SHA $(sha256sum /tmp/up.bin | cut -c1-64)\"
t2=$(cut -d' ' -f1 /proc/uptime)
nc 10.99.0.1 9000 < /tmp/up.bin; echo \"UP-NC-EXIT $?\"
t3=$(cut -d' ' -f1 /proc/uptime)
echo \"SECONDS down=$(awk \"BEGIN{print $t1-$t0}\") up=$(awk \"BEGIN{print $t3-$t2}\")\"
grep eth0 /proc/net/dev";

/// The value after `prefix` on the first line that has it.
fn value<'a>(output: &'a str, prefix: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .map(str::trim)
}

/// The pinger's lines of a serial log: (iteration, whether the host answered).
fn pings(log: &str) -> Vec<(u64, bool)> {
    log.lines()
        .filter_map(|l| {
            let l = l.trim();
            let (rest, ok) = match l.strip_prefix("PONG ") {
                Some(r) => (r, true),
                None => (l.strip_prefix("NOPONG ")?, false),
            };
            Some((rest.trim().parse().ok()?, ok))
        })
        .collect()
}

#[test]
fn guests_talk_to_the_host_through_a_tap() {
    let host = testhost::shared().unwrap();
    let a = artifacts::get().unwrap();
    let mut s = Scenario::new(host, "net").unwrap();
    let dir = s.dir().to_path_buf();
    let q = |p: &std::path::Path| sh_quote(&p.display().to_string());
    let www = dir.join("www");
    fs::create_dir_all(&www).unwrap();
    let down = www.join("down.bin");
    fs::write(&down, pattern(9, 8 * MIB)).unwrap();
    let down_sha = sha256_hex(&down);
    let host_log = dir.join("host.txt");

    // The namespace, its bridge with the host's address, and the TAP on the bridge; removed on
    // the way out whatever happens. Servers: HTTP for downloads, a TCP sink for uploads (its
    // stdin a FIFO nobody writes, so it never closes its side before the guest is done), both
    // on the test host's tmpfs rather than the 9p work directory, which would be the bottleneck.
    s.shell(&format!(
        r#"NS={NETNS}; D={dir}; HTTPD=; NC=; TMPD=$(mktemp -d /tmp/lbnet.XXXXXX)
cleanup() {{ kill $HTTPD $NC 2>/dev/null; ip netns del $NS 2>/dev/null; rm -rf "$TMPD"; }}
trap cleanup EXIT
ip netns del $NS 2>/dev/null
ip netns add $NS && ip -n $NS link set lo up &&
ip -n $NS link add br0 type bridge && ip -n $NS addr add {HOST_IP}/24 dev br0 &&
ip -n $NS link set br0 up && ip -n $NS tuntap add dev tap0 mode tap user {jail_id} group {jail_id} &&
ip -n $NS link set tap0 master br0 && ip -n $NS link set tap0 up || {{ echo "NETNS SETUP FAILED"; exit 1; }}
mkfifo "$TMPD/idle"; mkdir "$TMPD/www"; cp {www}/down.bin "$TMPD/www/"
ip netns exec $NS busybox httpd -f -p {HOST_IP}:8080 -h "$TMPD/www" & HTTPD=$!
sink() {{ ip netns exec $NS busybox nc -l -p 9000 0<>"$TMPD/idle" > "$TMPD/up-$1.bin" & NC=$!; }}
sink_done() {{ kill $NC 2>/dev/null; wait $NC 2>/dev/null
  echo "HOST-UP-SHA-$1 $(sha256sum "$TMPD/up-$1.bin" | cut -c1-64)" >> {log}
  echo "HOST-UP-SIZE-$1 $(stat -c %s "$TMPD/up-$1.bin")" >> {log}; }}"#,
        dir = q(&dir),
        www = q(&www),
        log = q(&host_log),
        jail_id = JAIL_ID,
    ));
    let wrapper = format!("ip netns exec {NETNS}");
    let guests = [
        ("pvh", &a.minimal_vmlinux, "52:54:00:4c:42:01"),
        ("debian", &a.debian_bzimage, "52:54:00:4c:42:02"),
    ];
    for (label, kernel, mac) in guests {
        let boot = Boot::new(kernel)
            .unwrap()
            .param(&format!("ip=10.99.0.2::{HOST_IP}:255.255.255.0::eth0:off"))
            .arg("--net")
            .arg(&format!("tap=tap0,mac={mac}"))
            .run(GUEST_CMD);
        s.shell(&format!("sink {label}"));
        s.boot_wrapped(label, &wrapper, &boot).unwrap();
        s.shell(&format!("sink_done {label}"));
    }

    // Snapshot and restore with the network and a disk in use, through the API. Each round the
    // guest pings the host, writes "ITER i" into sector i of its disk and syncs it, then reads
    // the block the host filled for round i + 1 (a block it never read before, so the read
    // reaches the device).
    let vmm = paths::binary("vmm").unwrap().display().to_string();
    let serial = dir.join("snap.serial");
    let snap = dir.join("snap");
    let disk = dir.join("snap-disk.raw");
    let f = fs::File::create(&disk).unwrap();
    f.set_len((ROUNDS + 2) * READ_STRIDE).unwrap();
    for k in 1..=ROUNDS {
        f.write_all_at(format!("HOST {k}\n").as_bytes(), k * READ_STRIDE)
            .unwrap();
    }
    drop(f);
    let pinger = format!(
        "i=0; while :; do if ping -c 1 -W 3 10.99.0.1 >/dev/null; then echo \"PONG $i\"; \
         else echo \"NOPONG $i\"; fi; \
         echo \"ITER $i\" | dd of=/dev/vda bs=512 seek=$i conv=sync,fsync 2>/dev/null; \
         echo \"READ $i $(dd if=/dev/vda bs={READ_STRIDE} skip=$((i+1)) count=1 2>/dev/null | head -n 1)\"; \
         i=$((i+1)); sleep 1; done"
    );
    let boot = Boot::new(&a.minimal_vmlinux)
        .unwrap()
        .param("ip=10.99.0.3:::255.255.255.0::eth0:off")
        .run(&pinger);
    let create = json!({
        "kernel": a.minimal_vmlinux,
        "initramfs": a.initramfs,
        "cmdline": boot.full_cmdline(),
        "memory": "512M",
        "serial": format!("file:{}", serial.display()),
        "disks": [{"path": disk, "format": "raw"}],
        "nets": [{"tap": "tap0", "mac": "52:54:00:4c:42:03"}],
    });
    s.shell(&format!(
        r#"{{ VMM="{vmm} {jail}"; SER={ser}; SNAP={snap}; API=$TMPD/api-1.sock; API2=$TMPD/api-2.sock
c() {{ sock=$1; shift; m=$1; p=$2; shift 2
      curl -s -S --max-time 60 --unix-socket "$sock" -X "$m" -H 'Content-Type: application/json' "$@" \
        -w ' HTTP%{{http_code}}\n' "http://localhost/api/v1/$p"; }}
npongs() {{ n=$(grep -c '^PONG' "$SER" 2>/dev/null); echo "${{n:-0}}"; }}
wait_pongs() {{ for _ in $(seq 1 900); do [ "$(npongs)" -ge "$1" ] && return 0; sleep 0.2; done; echo "TIMEOUT waiting for $1 pongs"; }}
wait_sock() {{ for _ in $(seq 1 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "NO SOCKET $1"; }}
ip netns exec $NS $VMM --api-socket "$API" > "$D/snap-vmm-1.log" 2>&1 & P1=$!
wait_sock "$API"
echo "== create"; c "$API" PUT vm/create -d {create}
echo "== boot"; c "$API" PUT vm/boot
wait_pongs 3
echo "== reboot"; c "$API" PUT vm/reboot
for _ in $(seq 1 900); do [ "$(grep -c '^PONG 2' "$SER")" -ge 2 ] && break; sleep 0.2; done
echo "== pause"; c "$API" PUT vm/pause
echo "== snapshot"; c "$API" PUT vm/snapshot -d "{{\"destination_dir\":\"$SNAP\"}}"
grep -E '^(NO)?PONG' "$SER" | tail -1 | sed 's/^/LAST-BEFORE-SNAPSHOT /'
echo "== info"; c "$API" GET vm/info
echo "== shutdown"; c "$API" PUT vm/shutdown -d '{{"timeout_ms": 100}}'
wait $P1; echo "VMM-1-EXIT $?"
mv "$SER" "$SER.first"
ip netns exec $NS $VMM --api-socket "$API2" > "$D/snap-vmm-2.log" 2>&1 & P2=$!
wait_sock "$API2"
echo "== restore"; c "$API2" PUT vm/restore -d "{{\"source_dir\":\"$SNAP\",\"resume\":true}}"
wait_pongs 3
echo "== info-2"; c "$API2" GET vm/info
echo "== shutdown-2"; c "$API2" PUT vm/shutdown -d '{{"timeout_ms": 100}}'
wait $P2; echo "VMM-2-EXIT $?"
}} > "$D/snap-script.log" 2>&1"#,
        vmm = vmm,
        jail = jail_words(
            &["$D", &disk.display().to_string(), "$TMPD"],
            &[
                &a.minimal_vmlinux.display().to_string(),
                &a.initramfs.display().to_string(),
            ],
        ),
        ser = q(&serial),
        snap = q(&snap),
        create = sh_quote(&create.to_string()),
    ));
    let r = s.run(host, Duration::from_secs(1200)).unwrap();

    let host_out = fs::read_to_string(&host_log).unwrap_or_default();
    for (label, _, mac) in guests {
        let b = &r[label];
        b.assert_clean(label);
        let out = &b.output;
        assert!(
            out.contains("LIGHTBYTE-NET eth0 10.99.0.2"),
            "{label}:\n{out}"
        );
        assert_eq!(value(out, "MAC "), Some(mac), "{label}:\n{out}");
        assert!(
            out.contains("3 packets transmitted, 3 packets received"),
            "{label}: ping\n{out}"
        );
        assert_eq!(
            value(out, "DOWN-SHA "),
            Some(down_sha.as_str()),
            "{label}: download\n{out}"
        );
        assert_eq!(value(out, "UP-NC-EXIT "), Some("0"), "{label}:\n{out}");
        let up = value(out, "UP-SHA ").unwrap_or_else(|| panic!("{label}:\n{out}"));
        assert_eq!(
            value(&host_out, &format!("HOST-UP-SHA-{label} ")),
            Some(up),
            "{label}: upload\n{out}\nhost: {host_out}"
        );
        assert_eq!(
            value(&host_out, &format!("HOST-UP-SIZE-{label} ")),
            Some((8 * MIB).to_string().as_str()),
            "{label}: upload size\nhost: {host_out}"
        );
        if let Some(t) = value(out, "SECONDS ") {
            println!("{label}: 8 MiB each way, {t}");
        }
    }

    let script = fs::read_to_string(dir.join("snap-script.log")).unwrap_or_default();
    let section = |name: &str| -> String {
        let start = script
            .find(&format!("== {name}\n"))
            .unwrap_or_else(|| panic!("no section {name}:\n{script}"));
        let rest = &script[start + name.len() + 4..];
        rest[..rest.find("\n== ").unwrap_or(rest.len())].to_string()
    };
    for (name, code) in [
        ("create", "HTTP204"),
        ("boot", "HTTP204"),
        ("reboot", "HTTP204"),
        ("pause", "HTTP204"),
        ("snapshot", "HTTP204"),
        ("info", "HTTP200"),
        ("shutdown", "HTTP204"),
        ("restore", "HTTP204"),
        ("info-2", "HTTP200"),
        ("shutdown-2", "HTTP204"),
    ] {
        assert!(section(name).contains(code), "{name}:\n{script}");
    }
    assert!(!script.contains("TIMEOUT"), "{script}");
    // Counters of the device in info, and the configuration with its MAC.
    let info = section("info");
    let json_part = &info[..info.rfind(" HTTP").unwrap_or(info.len())];
    let v: serde_json::Value =
        serde_json::from_str(json_part.trim()).unwrap_or_else(|e| panic!("info: {e}\n{info}"));
    assert_eq!(v["config"]["nets"][0]["mac"], "52:54:00:4c:42:03", "{v}");
    assert_eq!(v["nets"][0]["tap"], "tap0", "{v}");
    for counter in ["rx_packets", "tx_packets", "rx_bytes", "tx_bytes"] {
        assert!(
            v["nets"][0][counter].as_u64().unwrap_or(0) > 0,
            "{counter}: {v}"
        );
    }
    for counter in ["read_ops", "write_ops", "flush_ops"] {
        assert!(
            v["disks"][0][counter].as_u64().unwrap_or(0) > 0,
            "{counter}: {v}"
        );
    }
    // The first process ran on for a moment after the snapshot (shutdown resumes it): what it
    // printed then is not the restored guest's past, so the snapshot's last line is read at
    // snapshot time.
    let last = value(&script, "LAST-BEFORE-SNAPSHOT ").unwrap_or_else(|| panic!("{script}"));
    let (last_n, _) = pings(last)[0];
    let first = fs::read_to_string(dir.join("snap.serial.first")).unwrap_or_default();
    let before = pings(&first);
    // A reboot lets go of the TAP and attaches again: the second boot's count starts over and
    // its pings are answered too.
    let restarts = before.windows(2).filter(|w| w[1].0 < w[0].0).count();
    assert_eq!(restarts, 1, "one reboot:\n{first}");
    assert!(
        before.iter().filter(|p| p.1 && p.0 == 2).count() >= 2,
        "PONG 2 in both boots:\n{first}"
    );
    let second = fs::read_to_string(&serial).unwrap_or_default();
    let after = pings(&second);
    // The restored guest continues its own count, and the host answers it through the new
    // process's attachment to the TAP (the ping in flight at the snapshot may go unanswered).
    assert_eq!(
        after.first().map(|p| p.0),
        Some(last_n + 1),
        "count continues after {last}:\n{second}"
    );
    assert!(
        after.iter().filter(|p| p.1).count() >= 3,
        "pongs after the restore:\n{second}"
    );
    // Through the restored disk the guest reads the blocks the host filled, and every round it
    // finished after the restore had its write synced to the image.
    let reads: Vec<(u64, &str)> = second
        .lines()
        .filter_map(|l| {
            let (n, rest) = l.trim().strip_prefix("READ ")?.split_once(' ')?;
            Some((n.parse().ok()?, rest.trim()))
        })
        .collect();
    assert!(reads.len() >= 3, "reads after the restore:\n{second}");
    let image = fs::File::open(&disk).unwrap();
    for (n, got) in &reads {
        assert!(*n > last_n, "round {n} is the restored guest's:\n{second}");
        assert_eq!(*got, format!("HOST {}", n + 1), "round {n}:\n{second}");
        let mut sector = [0u8; 512];
        image.read_exact_at(&mut sector, n * 512).unwrap();
        let text = String::from_utf8_lossy(&sector);
        assert_eq!(
            text.trim_end_matches('\0').trim(),
            format!("ITER {n}"),
            "sector {n} after the restore"
        );
    }
    println!("last ping before the snapshot {last}, after the restore {after:?}");
}
