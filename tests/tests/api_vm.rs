//! The VMM API end to end with a real guest, through the Unix socket (curl in the test host):
//! create and boot, a second boot refused, pause (the guest's tick counter stops) and resume,
//! info with disk counters, reboot, snapshot of a paused VM, graceful shutdown through the ACPI
//! power button, and restore in a new process: the guest continues its tick count with the
//! random token it drew before the snapshot, its uptime continues, and its disk still works.
//! Diff snapshots in the same run: refused without a base, a diff on the full snapshot (much
//! smaller) restored in a second process, a diff of that restored VM restored in a third (a
//! chain of three), each continuing the count where it was taken. The third process first
//! refuses a snapshot whose device state does not fit, and gives back the memory it had made.

use std::fs;
use std::time::Duration;

use serde_json::json;

use lightbyte_tests::artifacts;
use lightbyte_tests::data::pattern;
use lightbyte_tests::guest::{jail_words, sh_quote, Boot, Scenario};
use lightbyte_tests::paths;
use lightbyte_tests::testhost;

/// The part of a serial log before the guest started powering off: `poweroff -f` resets the
/// disk under a read in flight, and that read failing is the guest's doing.
fn before_poweroff(log: &str) -> &str {
    &log[..log.find("LIGHTBYTE-POWER-BUTTON").unwrap_or(log.len())]
}

/// Ticks of one serial log: (count, token, uptime seconds).
fn ticks(log: &str) -> Vec<(u64, String, f64)> {
    log.lines()
        .filter_map(|l| {
            let mut w = l.trim().strip_prefix("TICK ")?.split_whitespace();
            Some((
                w.next()?.parse().ok()?,
                w.next()?.to_string(),
                w.next()?.parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn api_lifecycle_snapshot_and_restore() {
    let host = testhost::shared().unwrap();
    let a = artifacts::get().unwrap();
    let mut s = Scenario::new(host, "api").unwrap();
    let dir = s.dir().to_path_buf();
    let vmm = paths::binary("vmm").unwrap().display().to_string();
    let disk = dir.join("data.raw");
    fs::write(&disk, pattern(7, 1 << 20)).unwrap();
    let serial = dir.join("vm.serial");
    let snap = dir.join("snap");

    // A guest that counts, with a token only this boot knows, reading its disk every tick.
    let guest = "tok=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \\n'); i=0; \
                 while :; do echo \"TICK $i $tok $(cut -d' ' -f1 /proc/uptime)\"; \
                 dd if=/dev/vda of=/dev/null bs=4k count=1 skip=$((i % 256)) iflag=direct 2>/dev/null || echo DISK-ERROR; \
                 i=$((i+1)); sleep 1; done";
    let boot = Boot::new(&a.minimal_vmlinux)
        .unwrap()
        .cpus(2)
        .param("lbacpid=1")
        .run(guest);
    let q = |p: &std::path::Path| sh_quote(&p.display().to_string());
    let create = json!({
        "kernel": a.minimal_vmlinux,
        "initramfs": a.initramfs,
        "cmdline": boot.full_cmdline(),
        "cpus": 2,
        "memory": "512M",
        "serial": format!("file:{}", serial.display()),
        "disks": [{"path": disk, "format": "raw"}],
    });
    s.shell(&format!(
        r#"{{ cd {dir}; SOCKS=$(mktemp -d); VMM="{vmm} {jail}"; SER={ser}; SNAP={snap}; API=$SOCKS/api-1.sock; API2=$SOCKS/api-2.sock; API3=$SOCKS/api-3.sock
c() {{ sock=$1; shift; m=$1; p=$2; shift 2
      curl -s -S --max-time 60 --unix-socket "$sock" -X "$m" -H 'Content-Type: application/json' "$@" \
        -w ' HTTP%{{http_code}}\n' "http://localhost/api/v1/$p"; }}
ticks() {{ n=$(grep -c '^TICK' "$SER" 2>/dev/null); echo "${{n:-0}}"; }}
wait_ticks() {{ for _ in $(seq 1 600); do [ "$(ticks)" -ge "$1" ] && return 0; sleep 0.2; done; echo "TIMEOUT waiting for $1 ticks"; }}
wait_sock() {{ for _ in $(seq 1 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "NO SOCKET $1"; }}
$VMM --api-socket "$API" > vmm-1.log 2>&1 & pid=$!
wait_sock "$API"
echo "== ping"; c "$API" GET vmm/ping
echo "== pause-before-create"; c "$API" PUT vm/pause
echo "== create"; c "$API" PUT vm/create -d {create}
echo "== boot"; c "$API" PUT vm/boot
echo "== boot-again"; c "$API" PUT vm/boot
wait_ticks 3
echo "== pause"; c "$API" PUT vm/pause
n1=$(ticks); sleep 4; n2=$(ticks); echo "PAUSED-TICKS $n1 $n2"
echo "== pause-again"; c "$API" PUT vm/pause
echo "== info"; c "$API" GET vm/info
echo "== resume"; c "$API" PUT vm/resume
wait_ticks $((n2 + 2)); echo "RESUMED-TICKS $(ticks)"
echo "== reboot"; c "$API" PUT vm/reboot
for _ in $(seq 1 600); do [ "$(grep -c '^TICK 1 ' "$SER")" -ge 2 ] && break; sleep 0.2; done
echo "== pause-for-snapshot"; c "$API" PUT vm/pause
echo "== snapshot-running"; c "$API" PUT vm/resume; c "$API" PUT vm/snapshot -d "{{\"destination_dir\":\"$SNAP-x\"}}"; c "$API" PUT vm/pause
echo "== diff-without-base"; c "$API" PUT vm/snapshot -d "{{\"destination_dir\":\"$SNAP-x\",\"snapshot_type\":\"diff\"}}"
echo "== snapshot"; c "$API" PUT vm/snapshot -d "{{\"destination_dir\":\"$SNAP\"}}"
echo "SNAPSHOT-SIZE $(du -k --apparent-size "$SNAP/memory" | cut -f1) $(du -k "$SNAP/memory" | cut -f1)"
echo "== resume-after-snapshot"; c "$API" PUT vm/resume
n=$(ticks); wait_ticks $((n + 2))
echo "== pause-for-diff"; c "$API" PUT vm/pause
echo "== diff"; c "$API" PUT vm/snapshot -d "{{\"destination_dir\":\"$SNAP-d\",\"snapshot_type\":\"diff\"}}"
grep '^TICK' "$SER" | tail -1 | sed 's/^/LAST-BEFORE-SNAPSHOT /'
echo "DIFF-SIZE $(du -k --apparent-size "$SNAP-d/memory" | cut -f1) $(du -k "$SNAP-d/memory" | cut -f1)"
echo "== resume-after-snapshot"; c "$API" PUT vm/resume
echo "== shutdown"; c "$API" PUT vm/shutdown -d '{{"timeout_ms": 30000}}'
wait $pid; echo "VMM-1-EXIT $?"
mv "$SER" "$SER.first"
VMM_LOG=info $VMM --api-socket "$API2" > vmm-2.log 2>&1 & pid2=$!
wait_sock "$API2"
t0=$(date +%s%N)
echo "== restore"; c "$API2" PUT vm/restore -d "{{\"source_dir\":\"$SNAP-d\",\"resume\":true}}"
t1=$(date +%s%N); echo "RESTORE-MS $(( (t1 - t0) / 1000000 ))"
wait_ticks 1; t2=$(date +%s%N); echo "RESTORE-FIRST-TICK-MS $(( (t2 - t0) / 1000000 ))"
echo "== restore-again"; c "$API2" PUT vm/restore -d "{{\"source_dir\":\"$SNAP\"}}"
wait_ticks 4
echo "== info-2"; c "$API2" GET vm/info
echo "== pause-2"; c "$API2" PUT vm/pause
echo "== diff-after-restore"; c "$API2" PUT vm/snapshot -d "{{\"destination_dir\":\"$SNAP-d2\",\"snapshot_type\":\"diff\"}}"
grep '^TICK' "$SER" | tail -1 | sed 's/^/LAST-BEFORE-SECOND-DIFF /'
echo "DIFF2-SIZE $(du -k --apparent-size "$SNAP-d2/memory" | cut -f1) $(du -k "$SNAP-d2/memory" | cut -f1)"
echo "== shutdown-2"; c "$API2" PUT vm/shutdown -d '{{"timeout_ms": 30000}}'
wait $pid2; echo "VMM-2-EXIT $?"
mv "$SER" "$SER.second"
VMM_LOG=info $VMM --api-socket "$API3" > vmm-3.log 2>&1 & pid3=$!
wait_sock "$API3"
mkdir "$SNAP-bad"; ln "$SNAP/memory" "$SNAP-bad/memory"
sed 's/"config":\[[0-9,]*\]/"config":[1]/' "$SNAP/state.json" > "$SNAP-bad/state.json"
vm_kib() {{ awk -v k="$1:" '$1 == k {{ print $2 }}' /proc/$pid3/status; }}
echo "BAD-BEFORE $(vm_kib VmSize) $(vm_kib VmRSS)"
echo "== restore-bad"; c "$API3" PUT vm/restore -d "{{\"source_dir\":\"$SNAP-bad\",\"resume\":true}}"
echo "BAD-AFTER $(vm_kib VmSize) $(vm_kib VmRSS)"
echo "== restore-chain"; c "$API3" PUT vm/restore -d "{{\"source_dir\":\"$SNAP-d2\",\"resume\":true}}"
wait_ticks 2
echo "== shutdown-3"; c "$API3" PUT vm/shutdown -d '{{"timeout_ms": 30000}}'
wait $pid3; echo "VMM-3-EXIT $?"
}} > {dir}/script.log 2>&1
"#,
        dir = q(&dir),
        vmm = vmm,
        jail = jail_words(
            &[&dir.display().to_string(), &disk.display().to_string(), "$SOCKS"],
            &[
                &a.minimal_vmlinux.display().to_string(),
                &a.initramfs.display().to_string(),
            ],
        ),
        ser = q(&serial),
        snap = q(&snap),
        create = sh_quote(&create.to_string()),
    ));
    let out = s.run(host, Duration::from_secs(900)).unwrap();
    let log = out
        .values()
        .map(|b| b.output.clone())
        .collect::<Vec<_>>()
        .join("\n");
    let script = fs::read_to_string(dir.join("script.log")).unwrap_or_default();
    let all = format!("{log}\n{script}");
    let section = |name: &str| -> String {
        let start = all
            .find(&format!("== {name}\n"))
            .unwrap_or_else(|| panic!("no section {name}:\n{all}"));
        let rest = &all[start + name.len() + 4..];
        rest[..rest.find("\n== ").unwrap_or(rest.len())].to_string()
    };
    let status = |name: &str| -> u16 {
        let sec = section(name);
        let i = sec
            .rfind("HTTP")
            .unwrap_or_else(|| panic!("{name}: no status\n{sec}"));
        sec[i + 4..i + 7].parse().unwrap()
    };
    assert_eq!(status("ping"), 200, "{}", section("ping"));
    assert!(section("ping").contains("version"), "{}", section("ping"));
    assert_eq!(status("pause-before-create"), 409, "{all}");
    assert_eq!(status("create"), 204, "{}", section("create"));
    assert_eq!(status("boot"), 204, "{}", section("boot"));
    assert_eq!(status("boot-again"), 409, "{}", section("boot-again"));
    assert_eq!(status("pause"), 204, "{}", section("pause"));
    let paused = all
        .lines()
        .find_map(|l| l.strip_prefix("PAUSED-TICKS "))
        .unwrap_or_else(|| panic!("{all}"));
    let n: Vec<u64> = paused
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(n[0], n[1], "ticks moved while paused: {paused}");
    assert_eq!(status("pause-again"), 409);
    let info = section("info");
    assert!(info.contains("\"paused\""), "{info}");
    assert!(info.contains("read_ops"), "{info}");
    assert_eq!(status("resume"), 204);
    assert_eq!(status("reboot"), 204, "{}", section("reboot"));
    let first = fs::read_to_string(dir.join("vm.serial.first")).unwrap();
    let t = ticks(&first);
    let tokens: std::collections::BTreeSet<&String> = t.iter().map(|x| &x.1).collect();
    assert_eq!(tokens.len(), 2, "one token per boot (reboot):\n{first}");
    assert_eq!(
        status("snapshot-running"),
        204,
        "resume before the refused snapshot"
    );
    assert!(
        section("snapshot-running").contains("HTTP409"),
        "{}",
        section("snapshot-running")
    );
    // A diff needs a base: this boot was never snapshotted.
    assert_eq!(status("diff-without-base"), 409, "{all}");
    assert!(section("diff-without-base").contains("no base"), "{all}");
    assert_eq!(status("snapshot"), 204, "{}", section("snapshot"));
    assert_eq!(status("diff"), 204, "{}", section("diff"));
    // The diff holds a few seconds' writes of an idle guest, far less than the full snapshot.
    // The numbers on the line that starts with `key`.
    let numbers = |key: &str| -> Vec<u64> {
        all.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_else(|| panic!("no {key}:\n{all}"))
    };
    // A SIZE line's second number: KiB on disk.
    let sizes = |key: &str| -> u64 {
        numbers(key)
            .get(1)
            .copied()
            .unwrap_or_else(|| panic!("no size on disk in {key}:\n{all}"))
    };
    // Its pages are compared with the base's: the 2 MiB huge pages a tick dirties hold only a
    // few changed 4 KiB pages.
    let (full_kib, diff_kib) = (sizes("SNAPSHOT-SIZE "), sizes("DIFF-SIZE "));
    assert!(
        diff_kib * 8 < full_kib,
        "diff {diff_kib} KiB, full {full_kib} KiB"
    );
    assert_eq!(status("shutdown"), 204, "{}", section("shutdown"));
    assert!(
        all.contains("VMM-1-EXIT 0"),
        "graceful shutdown exits 0:\n{all}"
    );
    assert!(
        first.contains("LIGHTBYTE-POWER-BUTTON"),
        "power button seen by the guest:\n{first}"
    );
    assert!(!before_poweroff(&first).contains("DISK-ERROR"), "{first}");

    assert_eq!(status("restore"), 204, "{}", section("restore"));
    assert_eq!(status("restore-again"), 409, "{}", section("restore-again"));
    let last: Vec<&str> = all
        .lines()
        .find_map(|l| l.strip_prefix("LAST-BEFORE-SNAPSHOT TICK "))
        .unwrap_or_else(|| panic!("{all}"))
        .split_whitespace()
        .collect();
    let (last_n, last_tok, last_up): (u64, &str, f64) =
        (last[0].parse().unwrap(), last[1], last[2].parse().unwrap());
    let second = fs::read_to_string(dir.join("vm.serial.second")).unwrap();
    let after = ticks(&second);
    assert!(after.len() >= 3, "restored guest ticks:\n{second}");
    assert_eq!(after[0].0, last_n + 1, "the count continues:\n{second}");
    assert!(
        after.iter().all(|t| t.1 == last_tok),
        "same token after restore:\n{second}"
    );
    assert!(
        after[0].2 >= last_up && after[0].2 < last_up + 30.0,
        "uptime continues ({last_up} then {}):\n{second}",
        after[0].2
    );
    assert!(
        !before_poweroff(&second).contains("DISK-ERROR"),
        "disk after restore:\n{second}"
    );
    assert!(
        section("info-2").contains("\"running\""),
        "{}",
        section("info-2")
    );
    assert_eq!(status("diff-after-restore"), 204, "{all}");
    // Memory loaded behind a restored guest is all marked written; compared with its chain,
    // the diff still holds only what the guest changed.
    let diff2_kib = sizes("DIFF2-SIZE ");
    assert!(
        diff2_kib * 8 < full_kib,
        "diff after restore {diff2_kib} KiB, full {full_kib} KiB"
    );
    assert_eq!(status("shutdown-2"), 204, "{}", section("shutdown-2"));
    assert!(all.contains("VMM-2-EXIT 0"), "{all}");
    // Jailed, it made its userfaultfd before dropping privileges: memory came in behind the
    // running guest (and the diff above waited for all of it).
    let vmm2 = fs::read_to_string(dir.join("vmm-2.log")).unwrap_or_default();
    assert!(
        vmm2.contains("guest memory loaded") && !vmm2.contains("guest memory read"),
        "restore loads memory in the background:\n{vmm2}"
    );
    // The second diff (on the first, on the full snapshot) restores where it was taken.
    let last2: u64 = all
        .lines()
        .find_map(|l| l.strip_prefix("LAST-BEFORE-SECOND-DIFF TICK "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{all}"));
    // A snapshot whose device state does not fit is refused as bad input once guest memory was
    // made and loading had begun; the process gives that memory back and restores the next
    // snapshot, memory again loaded in the background: the userfaultfd it made before its jail
    // was handed back.
    assert_eq!(status("restore-bad"), 400, "{}", section("restore-bad"));
    assert!(
        section("restore-bad").contains("PCI devices"),
        "{}",
        section("restore-bad")
    );
    let (before, after) = (numbers("BAD-BEFORE "), numbers("BAD-AFTER "));
    assert!(before.len() == 2 && after.len() == 2, "{all}");
    // Address space may grow by the allocator's arenas of the threads the restore started (64
    // MiB each, reserved, not used); guest RAM left behind is 512 MiB.
    assert!(
        after[0] < before[0] + (256 << 10) && after[1] < before[1] + (16 << 10),
        "a failed restore left its memory behind: VmSize {} -> {} KiB, VmRSS {} -> {} KiB",
        before[0],
        after[0],
        before[1],
        after[1]
    );
    let vmm3 = fs::read_to_string(dir.join("vmm-3.log")).unwrap_or_default();
    assert!(
        vmm3.contains("loading cancelled") && vmm3.contains("failed to build unmapped"),
        "{vmm3}"
    );
    assert!(
        vmm3.contains("guest memory loaded") && !vmm3.contains("guest memory read"),
        "the restore after a failed one loads memory in the background:\n{vmm3}"
    );
    assert_eq!(status("restore-chain"), 204, "{all}");
    let third = fs::read_to_string(&serial).unwrap();
    let chain = ticks(&third);
    assert!(!chain.is_empty(), "{third}");
    assert_eq!(chain[0].0, last2 + 1, "the count continues:\n{third}");
    assert!(chain.iter().all(|t| t.1 == last_tok), "{third}");
    assert!(!before_poweroff(&third).contains("DISK-ERROR"), "{third}");
    assert!(all.contains("VMM-3-EXIT 0"), "{all}");
    for l in all.lines().filter(|l| {
        [
            "RESTORE-MS",
            "RESTORE-FIRST-TICK-MS",
            "SNAPSHOT-SIZE",
            "DIFF-SIZE",
            "DIFF2-SIZE",
        ]
        .iter()
        .any(|k| l.starts_with(k))
    }) {
        println!("{l}");
    }
}
