//! A worker's images: blobs pulled from the control plane on first use into
//! `<state>/images/sha256/<hex>` (read-only), shared by every overlay on the worker. A blob is
//! downloaded once however many VMs want it at the same moment, verified (SHA-256) before it
//! takes its name, and verified again before use whenever the file changed since it was last
//! verified (its size, modification time or inode), so a file damaged or replaced on the
//! worker's disk is fetched again rather than used. Blobs nothing here uses are removed after
//! a grace period.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::transfer::{self, Expected, FetchError};
use super::Digest;

/// How long one blob may take to arrive.
const PULL_TIMEOUT: Duration = Duration::from_secs(3600);

/// Why an image could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("image {digest} is not cached here and this worker has no --server to pull it from")]
    NoServer { digest: String },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The cache of one worker.
pub struct ImageCache {
    dir: PathBuf,
    /// Base URL of the control plane (`http://host:port`), where blobs come from.
    server: Option<String>,
    /// One lock per blob being pulled: concurrent first uses wait for the one download.
    pulling: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// When each blob was last asked for (since this process started).
    used: Mutex<HashMap<Digest, SystemTime>>,
    /// The file each blob was last verified as (size, modification time, inode).
    verified: Mutex<HashMap<Digest, Stamp>>,
    /// Downloads done, for tests and logs.
    pulls: std::sync::atomic::AtomicU64,
}

impl ImageCache {
    /// The cache under `dir` (created 0700), pulling from `server`.
    pub fn open(dir: &Path, server: Option<String>) -> std::io::Result<ImageCache> {
        let blobs = dir.join("sha256");
        std::fs::create_dir_all(&blobs)?;
        for d in [dir, blobs.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(ImageCache {
            dir: dir.to_path_buf(),
            server: server.map(|s| s.trim_end_matches('/').to_string()),
            pulling: Mutex::default(),
            used: Mutex::default(),
            verified: Mutex::default(),
            pulls: Default::default(),
        })
    }

    /// Where blob `d` lives here (whether or not it is there yet).
    pub fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join("sha256").join(d.hex())
    }

    /// Downloads done by this cache.
    pub fn pulls(&self) -> u64 {
        self.pulls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Blob `d`, pulled when missing or damaged, verified: its path.
    pub async fn get(&self, d: &Digest) -> Result<PathBuf, PullError> {
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(d.clone(), SystemTime::now());
        let lock = self
            .pulling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(d.clone())
            .or_default()
            .clone();
        let _one_at_a_time = lock.lock().await;
        let path = self.path(d);
        if path.exists() {
            let stamp = Stamp::of(&path);
            let known = self
                .verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(d)
                .copied();
            if stamp.is_some() && stamp == known {
                return Ok(path);
            }
            let p = path.clone();
            let have = tokio::task::spawn_blocking(move || transfer::checksum(&p))
                .await
                .map_err(|e| PullError::Io {
                    path: path.clone(),
                    source: std::io::Error::other(e),
                })?;
            match have {
                Ok((sha, _)) if sha == d.hex() => {
                    self.remember(d, &path);
                    return Ok(path);
                }
                Ok((sha, _)) => {
                    tracing::warn!(
                        image = %d,
                        found = %sha,
                        "cached image is damaged; fetching it again"
                    );
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => {
                    return Err(PullError::Io { path, source: e });
                }
            }
        }
        let server = self.server.as_deref().ok_or_else(|| PullError::NoServer {
            digest: d.to_string(),
        })?;
        let url = format!("{server}/api/v1/blobs/{d}");
        let want = Expected {
            sha256: d.hex().to_string(),
            size: None,
        };
        let started = std::time::Instant::now();
        let bytes = transfer::download(&url, None, &want, &path, PULL_TIMEOUT).await?;
        // Readable by all, writable by none: jailed VMMs (each its own uid) read images
        // through their jails, while the cache directory (0700) keeps other users out.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).map_err(|e| {
            PullError::Io {
                path: path.clone(),
                source: e,
            }
        })?;
        self.remember(d, &path);
        self.pulls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            image = %d,
            bytes,
            took = ?started.elapsed(),
            "image pulled and verified"
        );
        Ok(path)
    }

    fn remember(&self, d: &Digest, path: &Path) {
        if let Some(s) = Stamp::of(path) {
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(d.clone(), s);
        }
    }

    /// Removes cached blobs that no file in `in_use` is and that were not asked for within
    /// `grace` (since this process started, or by their file's age before). Returns what it
    /// removed.
    pub fn collect(&self, in_use: &BTreeSet<PathBuf>, grace: Duration) -> Vec<Digest> {
        let now = SystemTime::now();
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Ok(entries) = std::fs::read_dir(self.dir.join("sha256")) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let (hex, partial) = match name.strip_suffix(".part") {
                Some(hex) => (hex, true),
                None => (name, false),
            };
            let Ok(d) = Digest::sha256(hex) else { continue };
            // A pull in progress holds its lock: neither its partial file nor the blob it is
            // about to verify may go.
            if self.pulling_now(&d) {
                continue;
            }
            if partial {
                // Left by a pull that crashed.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            // `in_use` holds canonical paths: compare like with like, or a cache reached
            // through a symlink would lose the images its overlays use.
            if in_use.contains(&std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone())) {
                continue;
            }
            let last = used
                .get(&d)
                .copied()
                .or_else(|| e.metadata().ok().and_then(|m| m.modified().ok()));
            let idle = last
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or(Duration::MAX);
            if idle >= grace {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(image = %d, "unused image removed");
                        self.verified
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&d);
                        removed.push(d);
                    }
                    Err(e) => tracing::warn!(image = %d, error = %e, "cannot remove unused image"),
                }
            }
        }
        removed
    }

    /// Whether a pull (or a verification) of `d` is under way.
    fn pulling_now(&self, d: &Digest) -> bool {
        self.pulling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(d)
            .is_some_and(|l| l.try_lock().is_err())
    }
}

/// What a file was when it was verified: a write, a truncation or a replacement changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: SystemTime,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            len: m.len(),
            modified: m.modified().ok()?,
            inode: m.ino(),
        })
    }
}

/// The backing file of each qcow2 overlay among `files` (resolved as qcow2 does: relative
/// names from the overlay's directory, canonical): what a cache collection must keep. Reads
/// headers only (no lock: running VMs hold theirs). An overlay that cannot be read makes the
/// whole answer an error, so that nothing is collected on a guess.
pub fn backing_files(
    files: impl IntoIterator<Item = PathBuf>,
) -> std::io::Result<BTreeSet<PathBuf>> {
    use std::io::Read;
    let mut out = BTreeSet::new();
    for f in files {
        let mut head = Vec::with_capacity(64 << 10);
        let file = std::fs::File::open(&f)?;
        let len = file.metadata()?.len();
        file.take(2 << 20).read_to_end(&mut head)?;
        let h = qcow::header::Header::parse(&f, &head, len)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if let Some(name) = h.backing_file {
            let b = Path::new(&name);
            let b = if b.is_absolute() {
                b.to_path_buf()
            } else {
                f.parent().unwrap_or(Path::new("/")).join(b)
            };
            out.insert(std::fs::canonicalize(&b).unwrap_or(b));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pull_in_progress_keeps_its_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::open(dir.path(), None).unwrap();
        let d = Digest::sha256(&"ab".repeat(32)).unwrap();
        let part = dir.path().join("sha256").join(format!("{}.part", d.hex()));
        std::fs::write(&part, b"half an image").unwrap();
        let lock = cache
            .pulling
            .lock()
            .unwrap()
            .entry(d.clone())
            .or_default()
            .clone();
        let held = lock.lock().await;
        cache.collect(&BTreeSet::new(), Duration::ZERO);
        assert!(part.exists(), "removed while being downloaded");
        drop(held);
        cache.collect(&BTreeSet::new(), Duration::ZERO);
        assert!(!part.exists(), "a crashed pull's partial file stays");
    }
}
