//! Bearer tokens and their roles, read from a tokens file: one `TOKEN ROLE NAME` per line,
//! `#` comments and blank lines ignored. The file is read again when it changes (at most every
//! [`RELOAD_EVERY`]), so tokens are added, rotated and revoked without a restart; a file that
//! no longer parses keeps the last good set and is logged.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use super::Role;

/// How often a request may look at the tokens file's modification time.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Shortest token accepted: 128 bits of hex.
pub const MIN_TOKEN_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    // The cause is in the message, not a source: printed as a chain it would repeat.
    #[error("tokens file {}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("tokens file {}:{line}: {reason}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error(
        "tokens file {} is readable by group or others (mode {mode:o}); chmod 600 it",
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
}

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
}

/// Tokens by their SHA-256: a lookup by digest compares digests, so the time it takes tells
/// nothing useful about the secret.
type Table = HashMap<[u8; 32], Identity>;

/// The tokens of one file, reloaded when it changes.
pub struct TokenFile {
    path: PathBuf,
    state: Mutex<Loaded>,
}

struct Loaded {
    table: Table,
    stamp: Option<(SystemTime, u64, u64)>,
    checked: Instant,
}

impl TokenFile {
    /// Reads `path`; an unreadable, exposed or malformed file is an error here (at start-up).
    pub fn open(path: &Path) -> Result<TokenFile, TokenError> {
        let (table, stamp) = read(path)?;
        tracing::info!(path = %path.display(), tokens = table.len(), "tokens loaded");
        Ok(TokenFile {
            path: path.to_path_buf(),
            state: Mutex::new(Loaded {
                table,
                stamp: Some(stamp),
                checked: Instant::now(),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The identity `token` belongs to, if any.
    pub fn identify(&self, token: &str) -> Option<Identity> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= RELOAD_EVERY {
            state.checked = Instant::now();
            self.reload(&mut state);
        }
        state.table.get(&digest(token)).cloned()
    }

    fn reload(&self, state: &mut Loaded) {
        let now = std::fs::metadata(&self.path).ok().map(|m| stamp_of(&m));
        if now.is_some() && now == state.stamp {
            return;
        }
        match read(&self.path) {
            Ok((table, stamp)) => {
                tracing::info!(path = %self.path.display(), tokens = table.len(), "tokens file changed; reloaded");
                state.table = table;
                state.stamp = Some(stamp);
            }
            Err(e) => {
                // Keep serving with the last good set rather than locking everyone out.
                tracing::error!(error = %e, "tokens file not reloaded; the previous tokens stay in force");
                state.stamp = now;
            }
        }
    }
}

fn stamp_of(m: &std::fs::Metadata) -> (SystemTime, u64, u64) {
    (
        m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        m.len(),
        m.ino(),
    )
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn read(path: &Path) -> Result<(Table, (SystemTime, u64, u64)), TokenError> {
    let io = |source| TokenError::Io {
        path: path.to_path_buf(),
        error: source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    let table = parse(&text).map_err(|(line, reason)| TokenError::Parse {
        path: path.to_path_buf(),
        line,
        reason,
    })?;
    Ok((table, stamp_of(&meta)))
}

/// Parses a tokens file; an error names the line (1-based).
fn parse(text: &str) -> Result<Table, (usize, String)> {
    let mut table = Table::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [token, role, name] = fields[..] else {
            return Err((n, "expected TOKEN ROLE NAME".into()));
        };
        check_token(token).map_err(|r| (n, r))?;
        let role: Role = role.parse().map_err(|r| (n, r))?;
        let identity = Identity {
            name: name.to_string(),
            role,
        };
        if table.insert(digest(token), identity).is_some() {
            return Err((n, "this token is already on an earlier line".into()));
        }
    }
    Ok(table)
}

fn check_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "token too short ({} characters; at least {MIN_TOKEN_LEN})",
            token.len()
        ));
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
    {
        return Err("a token is letters, digits and - . _ ~ only".into());
    }
    Ok(())
}

/// A new random token: 256 bits from the kernel, as hex.
pub fn generate() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Appends a new token for `name` with `role` to the tokens file at `path` (created 0600 if
/// missing) and returns it.
pub fn add(path: &Path, role: Role, name: &str) -> Result<String, TokenError> {
    let io = |source| TokenError::Io {
        path: path.to_path_buf(),
        error: source,
    };
    if name.is_empty() || name.chars().any(char::is_whitespace) {
        return Err(TokenError::Parse {
            path: path.to_path_buf(),
            line: 0,
            reason: format!("name {name:?} must be one word"),
        });
    }
    if path.exists() {
        // Refuse to add to a file the server would refuse.
        read(path)?;
    }
    let token = generate().map_err(io)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    use std::io::Write;
    writeln!(f, "{token} {role} {name}").map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(token)
}

/// Reads a token from a file of its own (its first line), as clients and components keep
/// theirs.
pub fn read_own(path: &Path) -> Result<String, TokenError> {
    let io = |source| TokenError::Io {
        path: path.to_path_buf(),
        error: source,
    };
    let text = std::fs::read_to_string(path).map_err(io)?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    check_token(&token).map_err(|reason| TokenError::Parse {
        path: path.to_path_buf(),
        line: 1,
        reason,
    })?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";

    #[test]
    fn parses_roles_and_names_and_names_bad_lines() {
        let t = parse(&format!("# ops\n\n{A} admin alice\n{B} viewer bob\n")).unwrap();
        assert_eq!(t[&digest(A)].role, Role::Admin);
        assert_eq!(t[&digest(B)].name, "bob");
        assert_eq!(parse(&format!("{A} admin\n")).unwrap_err().0, 1);
        assert!(parse(&format!("{A} root alice"))
            .unwrap_err()
            .1
            .contains("role"));
        assert!(parse("short admin alice")
            .unwrap_err()
            .1
            .contains("too short"));
        assert!(parse(&format!("{A}\" admin alice")).is_err());
        let dup = parse(&format!("{A} admin a\n{A} viewer b\n")).unwrap_err();
        assert_eq!(dup.0, 2);
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_last_good_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let a = add(&path, Role::Admin, "alice").unwrap();
        assert_eq!(a.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let file = TokenFile::open(&path).unwrap();
        assert_eq!(file.identify(&a).unwrap().name, "alice");
        assert!(file.identify(B).is_none());
        // Rotation: alice's token replaced by a new one.
        std::fs::write(&path, format!("{B} viewer alice\n")).unwrap();
        file.state.lock().unwrap().checked -= RELOAD_EVERY;
        assert!(file.identify(&a).is_none());
        assert_eq!(file.identify(B).unwrap().role, Role::Viewer);
        // Broken: the last good set stays.
        std::fs::write(&path, "garbage\n").unwrap();
        file.state.lock().unwrap().checked -= RELOAD_EVERY;
        assert_eq!(file.identify(B).unwrap().role, Role::Viewer);
    }

    #[test]
    fn an_exposed_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("{A} admin alice\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            TokenFile::open(&path),
            Err(TokenError::Exposed { .. })
        ));
        assert!(add(&path, Role::Viewer, "bob").is_err());
    }
}
