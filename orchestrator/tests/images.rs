//! Images by content, against a real etcd and control plane: pushed blobs are stored only when
//! their bytes hash to their name, images may not name host paths unless the server allows it,
//! a stated format must match the content, two workers' caches pull an image once each however
//! many VMs want it at once, a damaged cached file is fetched again before use, and unused
//! images are collected after their grace period (never one an overlay uses).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::{http_async, Etcd};
use orchestrator::client::{ApiClient, ClientError};
use orchestrator::images::cache::{backing_files, ImageCache};
use orchestrator::images::upload::{digest_of, remote_size, upload};
use orchestrator::images::Digest;
use orchestrator::model::{DiskFormat, ImageSpec};
use orchestrator::server::{ControlPlane, ServerConfig};

async fn plane(etcd: &Etcd, dir: &std::path::Path) -> ControlPlane {
    ControlPlane::start(ServerConfig {
        etcd: vec![etcd.url()],
        listen: "127.0.0.1:0".parse().unwrap(),
        also_listen: Vec::new(),
        etcd_timeout: Duration::from_secs(2),
        controllers: common::controller_config("images-test"),
        image_dir: Some(dir.to_path_buf()),
        allow_host_path: false,
        limits: Default::default(),
        auth: common::auth(),
        tls: Some(common::tls_files()),
    })
    .await
    .expect("control plane")
}

fn spec(digest: &Digest, format: DiskFormat) -> ImageSpec {
    ImageSpec {
        digest: Some(digest.to_string()),
        path: None,
        format,
        size: None,
        kernel: None,
        initramfs: None,
        cmdline: None,
        boot: Default::default(),
    }
}

fn refused(r: Result<impl std::fmt::Debug, ClientError>, status: u16, text: &str) {
    match r {
        Err(ClientError::Api { status: s, message }) => {
            assert_eq!(s.as_u16(), status, "{message}");
            assert!(message.contains(text), "{message:?} lacks {text:?}");
        }
        other => panic!("expected {status} ({text}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_pushed_checked_pulled_once_verified_and_collected() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let cp = plane(&etcd, &dir.path().join("store")).await;
    let base = cp.url();
    let client = ApiClient::new(&base, Duration::from_secs(10)).unwrap();

    // A 3 MiB raw disk, pushed.
    let disk = dir.path().join("disk.raw");
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i * 31 / 7) as u8).collect();
    std::fs::write(&disk, &data).unwrap();
    let d = digest_of(&disk).await.unwrap();
    assert_eq!(remote_size(&base, &d).await.unwrap(), None);
    assert_eq!(upload(&base, &d, &disk).await.unwrap(), data.len() as u64);
    assert_eq!(
        remote_size(&base, &d).await.unwrap(),
        Some(data.len() as u64)
    );
    // Pushing it again stores nothing new and succeeds.
    upload(&base, &d, &disk).await.unwrap();
    client
        .create("disk", &spec(&d, DiskFormat::Raw))
        .await
        .unwrap();

    // Refused: host paths, a format the content contradicts, blobs the store does not have.
    let shadow = ImageSpec {
        digest: None,
        path: Some("/etc/shadow".into()),
        ..spec(&d, DiskFormat::Raw)
    };
    refused(
        client.create("shadow", &shadow).await,
        422,
        "host paths are refused",
    );
    let kernel_path = ImageSpec {
        kernel: Some("/boot/vmlinuz".into()),
        ..spec(&d, DiskFormat::Raw)
    };
    refused(client.create("k", &kernel_path).await, 422, "spec.kernel");
    refused(
        client.create("q", &spec(&d, DiskFormat::Qcow2)).await,
        422,
        "is not a qcow2 image",
    );
    let missing = Digest::sha256(&"7".repeat(64)).unwrap();
    refused(
        client.create("m", &spec(&missing, DiskFormat::Raw)).await,
        422,
        "push it first",
    );

    // Uploads that lie or break off leave nothing.
    let addr = cp.addr();
    let path = format!("/api/v1/blobs/{missing}");
    let (status, body) = http_async(addr, "PUT", &path, Some("not what the name says")).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("SHA-256"),
        "{body}"
    );
    let broken = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        // The server may answer and close before all of this is written (EPIPE): what
        // counts is that nothing is stored, so write errors are not the test's failure.
        let request = format!(
            "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nonly a little"
        );
        let _ = s.write_all(request.as_bytes());
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .await
    .unwrap();
    assert!(!broken.contains(" 201 "), "{broken}");
    assert_eq!(remote_size(&base, &missing).await.unwrap(), None);
    let (status, _) =
        http_async(addr, "PUT", "/api/v1/blobs/sha256:..%2F..%2Fetc", Some("x")).await;
    assert_eq!(status, 400);

    // Two workers, each asked for the image by five VMs at once: one download each.
    let workers: Vec<Arc<ImageCache>> = (0..2)
        .map(|i| {
            Arc::new(
                ImageCache::open(&dir.path().join(format!("w{i}/images")), Some(base.clone()))
                    .unwrap(),
            )
        })
        .collect();
    let mut gets = tokio::task::JoinSet::new();
    for w in &workers {
        for _ in 0..5 {
            let (w, d) = (w.clone(), d.clone());
            gets.spawn(async move { w.get(&d).await.map(|p| std::fs::read(p).unwrap()) });
        }
    }
    while let Some(r) = gets.join_next().await {
        assert_eq!(r.unwrap().unwrap(), data);
    }
    assert_eq!(
        workers.iter().map(|w| w.pulls()).collect::<Vec<_>>(),
        [1, 1]
    );

    // A cached file damaged on the worker's disk is fetched again before it is used.
    let cached = workers[0].path(&d);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cached, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&cached)
            .unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(4096)).unwrap();
        f.write_all(b"flipped").unwrap();
    }
    let again = workers[0].get(&d).await.unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), data);
    assert_eq!(workers[0].pulls(), 2);
    // A worker with nowhere to pull from says so.
    let lonely = ImageCache::open(&dir.path().join("w9/images"), None).unwrap();
    let e = lonely.get(&d).await.unwrap_err().to_string();
    assert!(e.contains("no --server"), "{e}");

    // Collection: an image an overlay uses stays; an unused one goes once its grace is over.
    let other = dir.path().join("other.raw");
    std::fs::write(&other, b"another image").unwrap();
    let d2 = digest_of(&other).await.unwrap();
    upload(&base, &d2, &other).await.unwrap();
    let w = &workers[1];
    let used = w.get(&d).await.unwrap();
    let unused = w.get(&d2).await.unwrap();
    let vm_dir = dir.path().join("w1/vms/web");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let overlay = vm_dir.join("root.qcow2");
    qcow::create(
        &overlay,
        &qcow::CreateOptions {
            backing_file: Some("../../images/sha256/".to_string() + d.hex()),
            backing_format: Some(qcow::Format::Raw),
            ..Default::default()
        },
    )
    .unwrap();
    let in_use = backing_files([overlay]).unwrap();
    assert_eq!(
        in_use,
        BTreeSet::from([std::fs::canonicalize(&used).unwrap()])
    );
    assert!(
        w.collect(&in_use, Duration::from_secs(600)).is_empty(),
        "collected within its grace"
    );
    assert_eq!(w.collect(&in_use, Duration::ZERO), vec![d2.clone()]);
    assert!(used.exists() && !unused.exists());
    cp.shutdown(Duration::from_secs(5)).await;
}
