//! Cold moves between workers, the agents' half (the mover controller starts and ends them).
//!
//! Source: once the VM is off, it checksums the VM's disk files (the root overlay and its named
//! volumes; backing images exist on every worker and do not travel), keeps the list in the VM's
//! record, publishes a random token under `/lightbyte/_moves/NAME` (a key the API never shows)
//! and reports the move's phase Copying with the checksums. It then hands out each file over its
//! `--listen` endpoint, `GET /api/v1/moves/NAME/disks/I`, to requests bearing the token.
//!
//! Target: fetches each file into `incoming/NAME/`, checks size and SHA-256 against what the
//! source reported, marks the volumes as living here and takes the placement (phase Starting).
//! The files are put in place just before the VM starts. The source deletes its copy only when
//! the mover ends the move, once the VM runs here.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::local::Ctx;
use super::record::{Layout, Outgoing, OutgoingDisk, Record};
use crate::images::transfer::{self, checksum, Expected, FetchError};
use crate::model::{MovePhase, MovedDisk, Power, Vm, VmSpec, VmState, VolumeSpec, WorkerSpec};
use crate::store::{keys, StoreError};

/// How long one disk file may take to arrive.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no move token for this VM yet")]
    NoToken,
    #[error("worker {0} serves no disks (no --listen endpoint)")]
    NoEndpoint(String),
    #[error("fetching disk {index} from {url}: {why}")]
    Fetch {
        index: usize,
        url: String,
        why: String,
    },
    #[error("disk {index} arrived damaged: {why}")]
    Damaged { index: usize, why: String },
    #[error("the move changed while it was copied")]
    Superseded,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MoveError + '_ {
    move |source| MoveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The value of a move's token key.
#[derive(Debug, Serialize, Deserialize)]
struct TokenRecord {
    uid: String,
    token: String,
}

/// What a target keeps with fetched files until it installs them.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    uid: String,
    disks: Vec<MovedDisk>,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Source: the VM is off. Checksums its disks, publishes the token and reports Copying.
pub(super) async fn prepare_outgoing(
    ctx: &Ctx,
    rec: &mut Record,
    obj: &Vm,
) -> Result<(), MoveError> {
    let me = ctx.cfg.name.clone();
    let Some(m) = obj.status.moving.clone().filter(|m| m.from == me) else {
        return Err(MoveError::Superseded);
    };
    let name = rec.name.clone();
    let mut files: Vec<(Option<String>, PathBuf)> = vec![(None, ctx.layout.root_disk(&name))];
    files.extend(
        obj.spec
            .volumes
            .iter()
            .map(|v| (Some(v.clone()), ctx.layout.volume(v))),
    );
    // A VM never started here has no files yet: what does not exist starts fresh there too.
    let files: Vec<_> = files.into_iter().filter(|(_, p)| p.exists()).collect();
    let hashed = tokio::task::spawn_blocking(move || {
        files
            .into_iter()
            .map(|(volume, path)| {
                let (sha256, size) = checksum(&path).map_err(io_err(&path))?;
                Ok((volume, path, size, sha256))
            })
            .collect::<Result<Vec<_>, MoveError>>()
    })
    .await
    .map_err(|e| MoveError::Io {
        path: PathBuf::from(&name),
        source: std::io::Error::other(e),
    })??;
    let token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    rec.outgoing = Some(Outgoing {
        to: m.to.clone(),
        token: token.clone(),
        disks: hashed
            .iter()
            .map(|(_, path, size, sha256)| OutgoingDisk {
                path: path.clone(),
                size: *size,
                sha256: sha256.clone(),
            })
            .collect(),
    });
    let path = ctx.layout.record(&name);
    ctx.layout.save(rec).map_err(io_err(&path))?;
    let value = serde_json::to_vec(&TokenRecord {
        uid: rec.uid.clone(),
        token,
    })
    .expect("token records serialize");
    ctx.store.put_key(&keys::move_token(&name), value).await?;
    let disks: Vec<MovedDisk> = hashed
        .into_iter()
        .map(|(volume, _, size, sha256)| MovedDisk {
            volume,
            size,
            sha256,
        })
        .collect();
    let uid = rec.uid.clone();
    let mut done = false;
    ctx.store
        .update::<VmSpec, _>(&name, |o| {
            done = false;
            let ours = o.metadata.uid == uid && o.status.placement.as_deref() == Some(&me);
            if let Some(mv) = o.status.moving.as_mut().filter(|mv| {
                ours && mv.from == me && mv.to == m.to && mv.phase == MovePhase::Stopping
            }) {
                mv.phase = MovePhase::Copying;
                mv.since = now_rfc3339();
                mv.disks = disks.clone();
                o.status.state = VmState::Stopped;
                o.status.ip = None;
                o.status.agent = None;
                o.status.message = Some(format!("off for its move to {}; disks ready", m.to));
                done = true;
            }
            Ok(())
        })
        .await?;
    if done {
        tracing::info!(vm = %name, to = %m.to, "disks checksummed; ready to be copied");
        Ok(())
    } else {
        Err(MoveError::Superseded)
    }
}

/// Target: fetches and verifies the disks of a VM moving here, then takes its placement.
pub(super) async fn fetch(ctx: &Ctx, obj: &Vm) -> Result<(), MoveError> {
    let me = ctx.cfg.name.as_str();
    let name = obj.name();
    let uid = obj.metadata.uid.as_str();
    let Some(m) = obj
        .status
        .moving
        .as_ref()
        .filter(|m| m.to == me && m.phase == MovePhase::Copying)
    else {
        return Err(MoveError::Superseded);
    };
    let token = match ctx.store.get_raw(&keys::move_token(name)).await? {
        Some(e) => serde_json::from_slice::<TokenRecord>(&e.value)
            .ok()
            .filter(|t| t.uid == uid)
            .ok_or(MoveError::NoToken)?,
        None => return Err(MoveError::NoToken),
    };
    let endpoint = ctx
        .store
        .get::<WorkerSpec>(&m.from)
        .await?
        .spec
        .endpoint
        .ok_or_else(|| MoveError::NoEndpoint(m.from.clone()))?;

    let dir = ctx.layout.incoming_dir(name);
    let manifest_path = dir.join("manifest.json");
    if let Ok(bytes) = std::fs::read(&manifest_path) {
        let stale = serde_json::from_slice::<Manifest>(&bytes).map_or(true, |old| old.uid != uid);
        if stale {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    for (index, disk) in m.disks.iter().enumerate() {
        let file = dir.join(format!("{index}.qcow2"));
        if file.exists() {
            let f = file.clone();
            let have = tokio::task::spawn_blocking(move || checksum(&f)).await;
            if matches!(have, Ok(Ok((ref sha, size))) if *sha == disk.sha256 && size == disk.size) {
                continue;
            }
        }
        let url = format!(
            "{}://{endpoint}/api/v1/moves/{name}/disks/{index}",
            crate::tls::scheme()
        );
        download(&url, &token.token, index, disk, &file).await?;
        tracing::info!(vm = %name, index, bytes = disk.size, from = %m.from, "disk copied and verified");
    }
    let manifest = Manifest {
        uid: uid.to_string(),
        disks: m.disks.clone(),
    };
    let tmp = dir.join("manifest.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(&manifest).expect("manifests serialize"),
    )
    .map_err(io_err(&tmp))?;
    super::durable::rename(&tmp, &manifest_path).map_err(io_err(&manifest_path))?;

    // The volumes' data lives here from now on (the source keeps its copy until the move ends).
    for v in m.disks.iter().filter_map(|d| d.volume.as_deref()) {
        let from = m.from.clone();
        let r = ctx
            .store
            .update::<VolumeSpec, _>(v, |o| {
                if o.status.worker.is_none() || o.status.worker.as_deref() == Some(from.as_str()) {
                    o.status.worker = Some(me.to_string());
                }
                Ok(())
            })
            .await;
        match r {
            Ok(_) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let expected = m.clone();
    let mut taken = false;
    ctx.store
        .update::<VmSpec, _>(name, |o| {
            taken = false;
            if o.metadata.uid != uid || o.status.moving.as_ref() != Some(&expected) {
                return Ok(());
            }
            o.status.placement = Some(me.to_string());
            o.status.state = match o.spec.power {
                Power::Running => VmState::Scheduled,
                Power::Stopped => VmState::Stopped,
            };
            o.status.ip = None;
            o.status.boot_time = None;
            o.status.agent = None;
            o.status.message = Some(format!("moved from {}; starting", expected.from));
            if let Some(mv) = &mut o.status.moving {
                mv.phase = MovePhase::Starting;
                mv.since = now_rfc3339();
                mv.message = None;
            }
            taken = true;
            Ok(())
        })
        .await?;
    if taken {
        tracing::info!(vm = %name, from = %m.from, "disks here; placement taken");
        Ok(())
    } else {
        Err(MoveError::Superseded)
    }
}

/// Streams one disk into `file`, checking length and SHA-256 before it takes the final name.
async fn download(
    url: &str,
    token: &str,
    index: usize,
    disk: &MovedDisk,
    file: &Path,
) -> Result<(), MoveError> {
    let want = Expected {
        sha256: disk.sha256.clone(),
        size: Some(disk.size),
    };
    match transfer::download(url, Some(token), &want, file, FETCH_TIMEOUT).await {
        Ok(_) => Ok(()),
        Err(FetchError::Fetch { url, why }) => Err(MoveError::Fetch { index, url, why }),
        Err(FetchError::Damaged { why, .. }) => Err(MoveError::Damaged { index, why }),
        Err(FetchError::Io { path, source }) => Err(MoveError::Io { path, source }),
    }
}

/// Puts the disks fetched for `name` (VM `uid`) in place: the root overlay in its directory,
/// volumes in the volume directory. Returns whether there was anything to install; fetched disks
/// of another VM of the same name are removed.
pub(super) fn install_incoming(layout: &Layout, name: &str, uid: &str) -> std::io::Result<bool> {
    let dir = layout.incoming_dir(name);
    let manifest: Manifest = match std::fs::read(dir.join("manifest.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if manifest.uid != uid {
        std::fs::remove_dir_all(&dir)?;
        return Ok(false);
    }
    for (index, disk) in manifest.disks.iter().enumerate() {
        let to = match &disk.volume {
            Some(v) => layout.volume(v),
            None => layout.root_disk(name),
        };
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        super::durable::rename(&dir.join(format!("{index}.qcow2")), &to)?;
    }
    std::fs::remove_dir_all(&dir)?;
    tracing::info!(vm = %name, disks = manifest.disks.len(), "moved disks installed");
    Ok(true)
}

/// `GET /api/v1/moves/NAME/disks/I` on the source: the file, to a bearer of the move's token.
pub async fn serve_disk(
    layout: &Layout,
    name: &str,
    index: usize,
    headers: &HeaderMap,
) -> Response {
    let deny = |status: StatusCode, why: &str| {
        (
            status,
            [(header::CONTENT_TYPE, "text/plain")],
            why.to_string(),
        )
            .into_response()
    };
    let rec = match std::fs::read(layout.record(name)).map(|b| serde_json::from_slice::<Record>(&b))
    {
        Ok(Ok(rec)) => rec,
        _ => return deny(StatusCode::NOT_FOUND, "no such VM here"),
    };
    let Some(out) = rec.outgoing else {
        return deny(StatusCode::NOT_FOUND, "this VM is not moving away");
    };
    let presented = crate::auth::bearer(headers).unwrap_or("");
    if !same(presented.as_bytes(), out.token.as_bytes()) {
        return deny(StatusCode::UNAUTHORIZED, "wrong or missing move token");
    }
    let Some(disk) = out.disks.get(index) else {
        return deny(StatusCode::NOT_FOUND, "no such disk");
    };
    match tokio::fs::File::open(&disk.path).await {
        Ok(f) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (header::CONTENT_LENGTH, disk.size.to_string()),
            ],
            Body::from_stream(tokio_util::io::ReaderStream::with_capacity(f, 1 << 20)),
        )
            .into_response(),
        Err(e) => deny(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// Compares secrets in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_secret_comparison() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d");
        std::fs::write(&f, b"abc").unwrap();
        let (sha, len) = checksum(&f).unwrap();
        assert_eq!(len, 3);
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(same(b"token", b"token"));
        assert!(!same(b"token", b"tokem"));
        assert!(!same(b"token", b"token2"));
    }

    #[test]
    fn incoming_disks_are_installed_for_their_vm_only() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create_dirs().unwrap();
        let inc = layout.incoming_dir("web");
        std::fs::create_dir_all(&inc).unwrap();
        std::fs::write(inc.join("0.qcow2"), b"root").unwrap();
        std::fs::write(inc.join("1.qcow2"), b"vol").unwrap();
        let disk = |volume: Option<&str>| MovedDisk {
            volume: volume.map(String::from),
            size: 0,
            sha256: String::new(),
        };
        let manifest = Manifest {
            uid: "u1".into(),
            disks: vec![disk(None), disk(Some("data"))],
        };
        std::fs::write(
            inc.join("manifest.json"),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        assert!(!layout.root_disk("web").exists());
        assert!(install_incoming(&layout, "web", "u1").unwrap());
        assert_eq!(std::fs::read(layout.root_disk("web")).unwrap(), b"root");
        assert_eq!(std::fs::read(layout.volume("data")).unwrap(), b"vol");
        assert!(!inc.exists());
        assert!(!install_incoming(&layout, "web", "u1").unwrap());
        // Another VM under the same name: its files are dropped.
        std::fs::create_dir_all(&inc).unwrap();
        std::fs::write(
            inc.join("manifest.json"),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        assert!(!install_incoming(&layout, "web", "u2").unwrap());
        assert!(!inc.exists());
    }
}
