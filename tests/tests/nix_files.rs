//! The nix/ recipes cannot be built here (no Nix store or binary cache): every file must at
//! least parse (`nix-instantiate --parse`, Debian's nix-bin), and the cargo packages
//! `packages.nix` builds must be the workspace's.

use std::process::Command;

use lightbyte_tests::paths::repo_root;

#[test]
fn nix_files_parse_and_name_real_packages() {
    let dir = repo_root().join("nix");
    let mut files = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "nix") {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 5, "nix files: {files:?}");
    for f in &files {
        let out = Command::new("nix-instantiate")
            .arg("--parse")
            .arg(f)
            .output()
            .expect("nix-instantiate (nix-bin, installed by scripts/install-deps.sh)");
        assert!(
            out.status.success(),
            "{} does not parse:\n{}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let packages = std::fs::read_to_string(dir.join("packages.nix")).unwrap();
    let members: Vec<String> = ["vmm", "orchestrator", "proxy", "guest-agent"]
        .iter()
        .map(|m| std::fs::read_to_string(repo_root().join(m).join("Cargo.toml")).unwrap())
        .collect();
    for package in [
        "\"vmm\"",
        "\"lightbyte-orchestrator\"",
        "\"lightbyte-proxy\"",
        "\"lightbyte-guest-agent\"",
    ] {
        assert!(packages.contains(package), "packages.nix builds {package}");
        let name = format!("name = {package}");
        assert!(
            members.iter().any(|m| m.contains(&name)),
            "no workspace member is {package}"
        );
    }
    println!("{} nix files parse", files.len());
}
