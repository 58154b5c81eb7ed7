//! Jailed `vmm`s (the worker's default) on this machine, with the tiny PVH kernels its KVM can
//! run: each VM's vmm runs as a uid of its own, with no capabilities, `no_new_privs` and a
//! seccomp filter on every thread; its root is a private tmpfs holding its own files and device
//! nodes only; everything the worker and the vmm create for it is owner-only and the VM's; its
//! TAP belongs to its uid. A guest that makes its VMM call a forbidden system call (through the
//! test-only probe port) kills it with SIGSYS, and the worker reports the VM Failed saying why,
//! without restarting it. cgroup limits need cgroup v2, which this machine lacks (v1 hybrid):
//! they are checked in the test host (tests/scenarios/cluster.sh), and here only when present.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use common::agents::{
    enter_own_netns, log_on_panic, pvh_elf, record, Agent, AgentOpts, VmmReaper, SECCOMP_PROBE,
    SPIN,
};
use common::{control_plane, eventually, Etcd};
use orchestrator::client::ApiClient;
use orchestrator::model::{ByteSize, DiskFormat, ImageSpec, Vm, VmSpec, VmState};

const LIMIT: Duration = Duration::from_secs(30);

fn vm(image: &str, cpus: u32) -> VmSpec {
    VmSpec {
        cpus,
        memory: ByteSize::mib(64),
        image: image.into(),
        volumes: vec![],
        network: "default".into(),
        group: None,
        labels: Default::default(),
        cmdline: None,
        power: Default::default(),
    }
}

/// `key:` lines of a /proc status file.
fn status_fields(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Owner uid and permission bits of `path`.
fn owner_mode(path: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.uid(), m.mode() & 0o7777)
}

#[test]
fn jailed_vmms_run_unprivileged_filtered_and_alone() {
    enter_own_netns();
    let vmm = Path::new(env!("CARGO_BIN_EXE_lightbyte")).with_file_name("vmm");
    assert!(
        vmm.is_file(),
        "{} is missing: cargo build --bins",
        vmm.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("w1");
    let _reaper = VmmReaper(state.clone());
    let etcd = Etcd::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let plane = control_plane(&etcd, "cp").await;
        let api = ApiClient::new(&plane.url(), LIMIT).unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 4 << 20]).unwrap();
        for (name, code) in [("spin", SPIN), ("probe", SECCOMP_PROBE)] {
            let kernel = dir.path().join(format!("{name}.elf"));
            std::fs::write(&kernel, pvh_elf(code)).unwrap();
            let image = ImageSpec {
                digest: None,
                path: Some(base.display().to_string()),
                format: DiskFormat::Raw,
                size: None,
                kernel: Some(kernel.display().to_string()),
                initramfs: None,
                cmdline: None,
                boot: Default::default(),
            };
            api.create(name, &image).await.unwrap();
        }
        let agent = Agent::start_with_env(
            &etcd.url(),
            &state,
            &vmm,
            &AgentOpts {
                name: "w1",
                subnet: "10.77.0.0/24",
                bridge: "lbbr0",
                listen: false,
            },
            &[("LIGHTBYTE_TEST_SECCOMP_PROBE", "1")],
        );
        let _log = log_on_panic(&agent.log);

        api.create("a", &vm("spin", 2)).await.unwrap();
        api.create("b", &vm("spin", 1)).await.unwrap();
        let mut uids = Vec::new();
        for name in ["a", "b"] {
            let rec = eventually(&format!("{name}'s vmm"), LIMIT, || async {
                record(&state, name).filter(|r| r.pid.is_some() && r.boot_time.is_some())
            })
            .await;
            let pid = rec.pid.unwrap();
            let uid = rec.jail_uid.expect("a jailed VM's record names its uid");
            assert!(
                uid >= 400_000,
                "{name}: uid {uid} outside the default range"
            );
            uids.push(uid);

            // Every thread: the VM's uid and gid, no capabilities, no_new_privs, seccomp on
            // (vCPU threads with a second filter of their own).
            let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            assert!(tasks.len() >= 3, "{name}: threads {tasks:?}");
            let mut vcpus = 0;
            for t in &tasks {
                let s = status_fields(&t.join("status"));
                let who = format!("{name} thread {} ({:?})", t.display(), s.get("Name"));
                let ids = format!("{uid}\t{uid}\t{uid}\t{uid}");
                assert_eq!(s.get("Uid"), Some(&ids), "{who}");
                assert_eq!(s.get("Gid"), Some(&ids), "{who}");
                assert_eq!(
                    s.get("CapEff").map(String::as_str),
                    Some("0000000000000000"),
                    "{who}"
                );
                assert_eq!(s.get("NoNewPrivs").map(String::as_str), Some("1"), "{who}");
                assert_eq!(s.get("Seccomp").map(String::as_str), Some("2"), "{who}");
                if s.get("Name").is_some_and(|n| n.starts_with("vcpu")) {
                    vcpus += 1;
                    assert_eq!(
                        s.get("Seccomp_filters").map(String::as_str),
                        Some("2"),
                        "{who}"
                    );
                }
            }
            assert_eq!(
                vcpus,
                if name == "a" { 2 } else { 1 },
                "{name}: vCPU threads"
            );

            // Its root: a tmpfs with its own device nodes and the paths of its own files.
            let root = Path::new("/proc").join(pid.to_string()).join("root");
            let mut top: Vec<String> = std::fs::read_dir(&root)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            top.sort();
            let first = state
                .components()
                .nth(1)
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .into_owned();
            assert_eq!(top, ["dev".to_string(), first], "{name}: / of the jail");
            assert!(!root.join("etc/passwd").exists() && !root.join("proc/1").exists());
            let kvm = root.join("dev/kvm");
            let meta = std::fs::metadata(&kvm).unwrap();
            assert!(meta.file_type().is_char_device());
            assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o600));
            let inside = root.join(state.strip_prefix("/").unwrap());
            let mut seen: Vec<String> = std::fs::read_dir(inside.join("vms").join(name))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            seen.sort();
            assert_eq!(
                seen,
                ["jail", "root.qcow2"],
                "{name}: its VM directory in the jail"
            );
            assert!(
                !inside
                    .join("vms")
                    .join(if name == "a" { "b" } else { "a" })
                    .exists(),
                "{name} sees the other VM"
            );

            // Files: owner-only; the VM's where its vmm writes, root's otherwise.
            let vm_dir = state.join("vms").join(name);
            assert_eq!(owner_mode(&vm_dir), (0, 0o700));
            assert_eq!(owner_mode(&vm_dir.join("vm.json")), (0, 0o600));
            assert_eq!(owner_mode(&vm_dir.join("vmm.log")), (0, 0o600));
            assert_eq!(owner_mode(&vm_dir.join("root.qcow2")), (uid, 0o600));
            assert_eq!(owner_mode(&vm_dir.join("jail")), (uid, 0o700));
            for f in ["api.sock", "vsock.sock", "console.log"] {
                assert_eq!(
                    owner_mode(&vm_dir.join("jail").join(f)),
                    (uid, 0o600),
                    "{f}"
                );
            }
            // (/sys shows the host's namespace, not this test's: ask ip.)
            let link = std::process::Command::new("ip")
                .args(["-details", "link", "show", &rec.tap])
                .output()
                .unwrap();
            let link = String::from_utf8_lossy(&link.stdout);
            assert!(
                link.contains(&format!("user {uid} group {uid}")),
                "{name}: TAP owner: {link}"
            );
            if orchestrator::worker::jail::cgroup2_mounted() {
                let cg = Path::new("/sys/fs/cgroup").join(format!("lightbyte-w1-{name}"));
                let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
                assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
            }
        }
        assert_ne!(uids[0], uids[1], "each VM has a uid of its own");

        // A guest that makes its VMM call a forbidden system call: killed by SIGSYS, reported
        // Failed with the reason, not restarted.
        api.create("p", &vm("probe", 1)).await.unwrap();
        let p = eventually("p Failed", LIMIT, || async {
            let v: Vm = api.get::<VmSpec>("p").await.ok()?;
            (v.status.state == VmState::Failed).then_some(v)
        })
        .await;
        let why = p.status.message.unwrap_or_default();
        assert!(why.contains("killed by SIGSYS"), "{why}");
        assert!(
            why.contains("forbidden system call 110 on a vcpu thread"),
            "the reason quotes the VMM's own report: {why}"
        );
        let rec = record(&state, "p").unwrap();
        assert_eq!(
            rec.restarts, 0,
            "a VM whose vmm broke its filter is not restarted"
        );
        assert!(rec.failed.is_some_and(|f| f.contains("SIGSYS")));
    });
}
