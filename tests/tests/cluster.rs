//! The orchestrator end to end with real guests: etcd, a control plane and two worker agents
//! (each in its own network namespace) inside the test host, driven through the `lightbyte`
//! CLI by `tests/scenarios/cluster.sh`, every connection mutual TLS: the API refuses a client
//! without a certificate or a token, etcd one without a certificate; a VM reaches Running with the guest's IP (the guest
//! configured it and answers pings), survives a `kill -9` of its worker agent and is re-adopted
//! without a reboot, bad specs are refused with nothing written, etcd going away gives 503 within
//! seconds and the controllers recover, replicas spread, and deleting VMs removes their
//! processes, TAP devices and volumes; drains move VMs; a load balancer of proxy VMs spreads
//! requests over a scale group and keeps answering while it scales, loses a backend and has a
//! proxy's worker drained.

use std::io::Write;
use std::time::Duration;

use lightbyte_tests::guest::sh_quote;
use lightbyte_tests::{artifacts, paths, testhost};

/// Every check the scenario makes; each must report "ok".
const CHECKS: &[&str] = &[
    "api-no-token",
    "api-no-certificate",
    "api-no-plain-http",
    "etcd-no-certificate",
    "etcd-with-certificate",
    "guest-tcp-test-works",
    "guest-as-itself-reaches-peer",
    "guest-as-itself-reaches-gateway",
    "guest-no-etcd",
    "guest-no-control-plane",
    "guest-no-worker-api",
    "spoofed-ip-dropped",
    "spoofed-mac-dropped",
    "running",
    "console-net",
    "ping-guest",
    "vmm-process",
    "tap-present",
    "root-overlay",
    "jail-threads",
    "jail-root",
    "jail-files",
    "jail-cgroup-member",
    "jail-cgroup-limits",
    "overlay-backing",
    "running-via-agent",
    "agent-through-worker",
    "vmm-survives-agent",
    "readopt-running",
    "readopt-same-process",
    "readopt-same-boot",
    "readopt-no-reboot",
    "readopt-logged",
    "ping-after-readopt",
    "bad-cpus-rejected",
    "agent-unknown-vm",
    "bad-image-rejected",
    "nothing-written",
    "bad-name-rejected",
    "app-1-running",
    "app-2-running",
    "app-spread",
    "ping-app-2",
    "image-pulled-once",
    "image-host-path-refused",
    "recipe-image-running",
    "recipe-image-agent",
    "recipe-image-debian",
    "etcd-down-503",
    "etcd-down-fast",
    "vms-survive-etcd-outage",
    "api-recovers",
    "nothing-lost",
    "controllers-recover",
    "web-1-still-running",
    "delete-process-gone",
    "delete-tap-gone",
    "delete-cgroup-gone",
    "delete-volume-gone",
    "graceful-stop",
    "note-running",
    "note-wrote",
    "group-ready",
    "drain-drained",
    "note-moved",
    "note-running-after-move",
    "note-same-file",
    "note-source-gone",
    "drained-no-vmm",
    "group-never-below",
    "group-moved-off",
    "uncordoned",
    "drain-cleanup",
    "no-vmm-left",
    "lb-created",
    "lb-three-healthy",
    "lb-two-addresses",
    "lb-even-60",
    "lb-four-backends",
    "lb-up-no-failures",
    "lb-up-new-member-serves",
    "lb-down-members-retire",
    "lb-down-deleted-after-grace",
    "lb-down-no-failures",
    "lb-down-none-after-removal",
    "lb-kill-marked-unhealthy",
    "lb-kill-no-failures",
    "lb-stale-push-refused",
    "lb-bad-push-refused",
    "lb-keeps-revision",
    "lb-still-answers",
    "lb-drain-new-proxy",
    "lb-drain-keeps-answering",
    "lb-delete-proxies-gone",
];

#[test]
fn cluster_runs_vms_end_to_end() {
    let host = testhost::shared().unwrap();
    let a = artifacts::get().unwrap();
    let bin = paths::binary("lightbyte").unwrap();
    // A Debian image from its recipe (debootstrap, cached like the guest kernel).
    let recipe_file = paths::repo_root().join("images/recipes/debian-agent.recipe");
    let recipe = artifacts::run_script(
        "scripts/build-image.sh",
        &[recipe_file.to_str().expect("utf-8 path")],
    )
    .unwrap()
    .last()
    .cloned()
    .expect("image directory");
    paths::binary("vmm").unwrap();
    let work = host.work_dir().join("cluster");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let q = |p: &std::path::Path| sh_quote(&p.display().to_string());
    let script = format!(
        "LIGHTBYTE_BIN={} KERNEL={} INITRAMFS={} WORK={} RECIPE_IMAGE={} EFI_DISK={} FIRMWARE={} bash {}\n",
        q(bin.parent().unwrap()),
        q(&a.minimal_vmlinux),
        q(&a.initramfs),
        q(&work),
        q(std::path::Path::new(&recipe)),
        q(&a.efi_disks.join("upgrade.img")),
        q(&a.firmware),
        q(&paths::repo_root().join("tests/scenarios/cluster.sh")),
    );
    let out = host
        .run("cluster", &script, Duration::from_secs(2100))
        .unwrap();
    let text = out.output;
    let failed: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("CHECK ") && !l.ends_with(" ok"))
        .collect();
    println!("{text}");
    // The failed checks go straight to stderr (past the test harness's capture), so they land
    // just above the "FAILED" line, beside the streamed scenario: a CI log cut in the middle of
    // the captured output still shows them. What the scenario found out about a failure (its
    // `DIAG` lines) comes first and the failed checks last, right above that line: an excerpt
    // of the log's end shows the checks even when the DIAG lines are many.
    let mut summary = String::from("cluster scenario:\n");
    let diag = text.lines().filter(|l| l.starts_with("DIAG "));
    for line in diag.chain(failed.iter().copied()) {
        summary.push_str(&format!("  {line}\n"));
    }
    summary.push_str(&format!(
        "cluster scenario: {} failed checks\n",
        failed.len()
    ));
    let _ = std::io::stderr().write_all(summary.as_bytes());
    assert!(failed.is_empty(), "failed checks:\n{}", failed.join("\n"));
    for check in CHECKS {
        assert!(
            text.lines().any(|l| l == format!("CHECK {check} ok")),
            "check {check} did not run"
        );
    }
    assert_eq!(out.status, 0, "scenario exited with {}", out.status);
}
