//! `imagebench`: the image store's throughput on loopback, side by side in one run with the
//! limits of the same machine: `cp` of the file, and `curl` from a plain HTTP file server
//! (python's http.server). Push is `lightbyte image push`'s work (hash, then stream up to the
//! control plane, which hashes again and syncs); pull is a worker's first use (stream down,
//! hash, sync, then verify). Prints a table.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use orchestrator::images::cache::ImageCache;
use orchestrator::images::upload::{digest_of, upload};

/// Image push/pull vs cp vs curl, one run.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Image size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Where to put the files (the same file system for every row).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Drops the page cache's copy of `path`'s data so each row reads from the same state.
fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)?.sync_all()?;
    Ok(())
}

fn mibps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let dir = tempfile::Builder::new()
        .prefix("imagebench-")
        .tempdir_in(&cli.dir)?;
    let file = dir.path().join("image.raw");
    let bytes = cli.size_mib << 20;
    eprintln!("writing a {} MiB image of random bytes", cli.size_mib);
    let st = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "status=none", "conv=fsync"])
        .arg(format!("of={}", file.display()))
        .arg(format!("count={}", cli.size_mib))
        .status()?;
    if !st.success() {
        bail!("dd failed");
    }

    // cp: the file system's limit.
    let copy = dir.path().join("copy.raw");
    let t = Instant::now();
    std::fs::copy(&file, &copy)?;
    sync_file(&copy)?;
    let cp = t.elapsed();
    std::fs::remove_file(&copy)?;

    // curl from a plain HTTP file server: the network path's limit.
    let port = free_port()?;
    let _http = Child(
        Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("python3 -m http.server")?,
    );
    wait_port(port)?;
    let got = dir.path().join("curl.raw");
    let t = Instant::now();
    let st = Command::new("curl")
        .args(["-sf", "-o"])
        .arg(&got)
        .arg(format!("http://127.0.0.1:{port}/image.raw"))
        .status()?;
    sync_file(&got)?;
    let curl = t.elapsed();
    if !st.success() {
        bail!("curl failed");
    }
    std::fs::remove_file(&got)?;

    // The control plane's image store (its blob routes need no etcd).
    let api = free_port()?;
    let lightbyte = lightbyte_tests::paths::binary("lightbyte")?;
    let _server = Child(
        Command::new(&lightbyte)
            // Blob throughput on loopback: one token check per request would not show.
            .args([
                "server",
                "--insecure",
                "--etcd",
                "http://127.0.0.1:1",
                "--listen",
            ])
            .arg(format!("127.0.0.1:{api}"))
            .arg("--image-dir")
            .arg(dir.path().join("store"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("lightbyte server")?,
    );
    wait_port(api)?;
    let base = format!("http://127.0.0.1:{api}");
    let t = Instant::now();
    let d = digest_of(&file).await?;
    let hashed = t.elapsed();
    upload(&base, &d, &file).await?;
    let push = t.elapsed();

    let cache = ImageCache::open(&dir.path().join("worker"), Some(base))?;
    let t = Instant::now();
    let path = cache.get(&d).await?;
    let pull = t.elapsed();
    if std::fs::metadata(&path)?.len() != bytes {
        bail!("the pulled image has the wrong size");
    }

    println!(
        "image store on loopback, {} MiB of random bytes, files in {}, one run",
        cli.size_mib,
        cli.dir.display()
    );
    println!("| path | time | MiB/s | vs cp | vs curl |");
    println!("|---|---|---|---|---|");
    for (name, d) in [
        ("cp (limit: the file system)", cp),
        (
            "curl from python http.server (limit: HTTP on loopback)",
            curl,
        ),
        ("push: hash", hashed),
        ("push: hash + upload (server hashes and syncs)", push),
        ("pull: download + hash + sync (first use on a worker)", pull),
    ] {
        println!(
            "| {name} | {:.2} s | {:.0} | {:.2} | {:.2} |",
            d.as_secs_f64(),
            mibps(bytes, d),
            mibps(bytes, d) / mibps(bytes, cp),
            mibps(bytes, d) / mibps(bytes, curl),
        );
    }
    Ok(())
}
