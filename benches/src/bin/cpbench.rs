//! `cpbench`: control-plane API throughput. Starts etcd and a `lightbyte server` (the real
//! binaries, on free loopback ports), creates an image and N volumes through the API, then
//! drives GET of single objects and LIST of the whole collection with concurrent keep-alive
//! clients for a fixed time each, next to the same reads made directly against etcd (the limit
//! the API sits on). Prints a table; only ratios within one run mean much on a shared machine.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Control-plane API throughput: GET and LIST on N objects, through the API and straight from
/// etcd.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Objects (volumes) in the collection.
    #[arg(long, default_value_t = 1000)]
    objects: usize,
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
}

type Http = Client<HttpConnector, Full<Bytes>>;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().context("no bin dir")?.to_path_buf())
}

async fn wait_http(http: &Http, url: &str) -> Result<()> {
    for _ in 0..300 {
        if let Ok(r) = http.get(url.parse()?).await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{url} did not answer")
}

async fn request(
    http: &Http,
    method: Method,
    url: &str,
    body: Option<String>,
) -> Result<(StatusCode, Bytes)> {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = http.request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Runs `op` from `clients` tasks for `secs` seconds; returns (requests/s, p50 ms, p99 ms).
async fn drive<F, Fut>(clients: usize, secs: u64, op: F) -> Result<(f64, f64, f64)>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let counter = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (op, counter) = (op.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                op(i).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let start = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok((all.len() as f64 / elapsed, pct(0.5), pct(0.99)))
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let dir = tempfile::tempdir()?;
    let (cport, pport, aport) = (free_port()?, free_port()?, free_port()?);
    let etcd_url = format!("http://127.0.0.1:{cport}");
    let _etcd = Proc(
        Command::new("etcd")
            .args(["--data-dir", &dir.path().join("etcd").display().to_string()])
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{pport}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{pport}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{pport}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting etcd (installed by scripts/install-deps.sh)")?,
    );
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    wait_http(&http, &format!("{etcd_url}/health")).await?;
    let api = format!("http://127.0.0.1:{aport}");
    let _server = Proc(
        Command::new(bin_dir()?.join("lightbyte"))
            .args([
                "server",
                "--etcd",
                &etcd_url,
                "--listen",
                &format!("127.0.0.1:{aport}"),
                // What is measured is the API over etcd, on loopback in one process tree.
                "--insecure",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting lightbyte server (cargo build --release --bins)")?,
    );
    wait_http(&http, &format!("{api}/healthz")).await?;

    let (s, b) = request(
        &http,
        Method::POST,
        &format!("{api}/api/v1/images"),
        Some(r#"{"metadata":{"name":"base"},"spec":{"path":"/img/base.qcow2"}}"#.into()),
    )
    .await?;
    if s != StatusCode::CREATED {
        bail!("creating the image: {s} {}", String::from_utf8_lossy(&b));
    }
    eprintln!("creating {} volumes ...", cli.objects);
    let n = cli.objects as u64;
    let created = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..cli.clients {
        let (http, api, created) = (http.clone(), api.clone(), created.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = created.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                let body = format!(
                    r#"{{"metadata":{{"name":"vol-{i}"}},"spec":{{"image":"base","size":"20G"}}}}"#
                );
                let (s, b) = request(
                    &http,
                    Method::POST,
                    &format!("{api}/api/v1/volumes"),
                    Some(body),
                )
                .await?;
                if s != StatusCode::CREATED {
                    bail!("creating vol-{i}: {s} {}", String::from_utf8_lossy(&b));
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let create_rate = n as f64 / t.elapsed().as_secs_f64();

    let (c, secs) = (cli.clients, cli.seconds);
    let get = {
        let (http, api) = (http.clone(), api.clone());
        drive(c, secs, move |i| {
            let (http, url) = (http.clone(), format!("{api}/api/v1/volumes/vol-{}", i % n));
            async move {
                let (s, _) = request(&http, Method::GET, &url, None).await?;
                if s != StatusCode::OK {
                    bail!("GET: {s}");
                }
                Ok(())
            }
        })
        .await?
    };
    let list_clients = c.min(4);
    let mut list_size = 0;
    let list = {
        let (http, url) = (http.clone(), format!("{api}/api/v1/volumes"));
        let (s, b) = request(&http, Method::GET, &url, None).await?;
        if s != StatusCode::OK {
            bail!("LIST: {s}");
        }
        list_size = b.len().max(list_size);
        drive(list_clients, secs, move |_| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let (s, _) = request(&http, Method::GET, &url, None).await?;
                if s != StatusCode::OK {
                    bail!("LIST: {s}");
                }
                Ok(())
            }
        })
        .await?
    };
    let etcd = etcd_client::Client::connect([etcd_url.as_str()], None).await?;
    let etcd_get = {
        let etcd = etcd.clone();
        drive(c, secs, move |i| {
            let mut kv = etcd.kv_client();
            async move {
                let r = kv
                    .get(format!("/lightbyte/volume/vol-{}", i % n), None)
                    .await?;
                if r.kvs().is_empty() {
                    bail!("etcd get: missing");
                }
                Ok(())
            }
        })
        .await?
    };
    let etcd_list = {
        let etcd = etcd.clone();
        drive(list_clients, secs, move |_| {
            let mut kv = etcd.kv_client();
            async move {
                let opts = etcd_client::GetOptions::new().with_prefix();
                let r = kv.get("/lightbyte/volume/", Some(opts)).await?;
                if r.kvs().len() as u64 != n {
                    bail!("etcd list: {} keys", r.kvs().len());
                }
                Ok(())
            }
        })
        .await?
    };

    println!("control-plane API, {n} volumes, {secs} s per row (one run, same machine)\n");
    println!(
        "| operation | clients | API req/s | API p50 / p99 ms | etcd direct req/s | API / etcd |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| GET one object | {c} | {:.0} | {:.2} / {:.2} | {:.0} | {:.2} |",
        get.0,
        get.1,
        get.2,
        etcd_get.0,
        get.0 / etcd_get.0
    );
    println!(
        "| LIST {n} objects ({} KiB) | {list_clients} | {:.1} | {:.1} / {:.1} | {:.1} | {:.2} |",
        list_size / 1024,
        list.0,
        list.1,
        list.2,
        etcd_list.0,
        list.0 / etcd_list.0
    );
    println!(
        "\ncreate (POST, validated, transactional): {create_rate:.0} objects/s with {c} clients"
    );
    Ok(())
}
