//! What the agent does for each request.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use agent_proto::{
    check_name, ErrorKind, Request, Response, ServiceRun, ServiceState, ServiceStatus, MAX_CONTENT,
    PROTOCOL_VERSION,
};

use crate::sysinfo;

/// How long a service's `reload` or `status` may run.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a service's output comes back.
const MAX_OUTPUT: usize = 4096;
/// Where the revisions of applied documents are kept, inside the config directory.
const REVISIONS: &str = ".revisions";

/// What to do after answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Serve the next request.
    Continue,
    /// Power the guest off.
    PowerOff,
}

/// The agent's state: where things go, and the lock that makes revision checks and writes of
/// one document atomic across connections.
pub struct Agent {
    config_dir: PathBuf,
    services_dir: PathBuf,
    apply_lock: Mutex<()>,
}

fn failed(message: String) -> Response {
    Response::error(ErrorKind::Failed, message)
}

impl Agent {
    /// An agent writing documents into `config_dir` and running services from `services_dir`.
    pub fn new(config_dir: PathBuf, services_dir: PathBuf) -> Agent {
        Agent {
            config_dir,
            services_dir,
            apply_lock: Mutex::new(()),
        }
    }

    /// The answer to `request`, and what to do after sending it.
    pub fn handle(&self, request: Request) -> (Response, Then) {
        match request {
            Request::Ping => (self.ping(), Then::Continue),
            Request::ApplyConfig {
                name,
                revision,
                content,
                service,
            } => (
                self.apply(&name, revision, &content, service.as_deref()),
                Then::Continue,
            ),
            Request::Status { services } => (self.status(&services), Then::Continue),
            Request::Shutdown => (Response::ShuttingDown, Then::PowerOff),
        }
    }

    fn ping(&self) -> Response {
        Response::Pong {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: PROTOCOL_VERSION,
            uptime_secs: sysinfo::uptime(),
            hostname: sysinfo::hostname(),
            addresses: sysinfo::addresses(),
        }
    }

    fn revision_path(&self, name: &str) -> PathBuf {
        self.config_dir.join(REVISIONS).join(name)
    }

    fn applied_revision(&self, name: &str) -> Option<u64> {
        fs::read_to_string(self.revision_path(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn apply(&self, name: &str, revision: u64, content: &str, service: Option<&str>) -> Response {
        if let Err(e) = check_name(name) {
            return Response::error(ErrorKind::BadRequest, format!("name: {e}"));
        }
        if let Some(Err(e)) = service.map(check_name) {
            return Response::error(ErrorKind::BadRequest, format!("service: {e}"));
        }
        if content.len() > MAX_CONTENT {
            return Response::error(
                ErrorKind::BadRequest,
                format!(
                    "content of {} bytes is over the limit of {MAX_CONTENT}",
                    content.len()
                ),
            );
        }
        let _one_at_a_time = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.applied_revision(name);
        if let Some(current) = previous {
            if revision <= current {
                return Response::Error {
                    kind: ErrorKind::StaleRevision,
                    message: format!(
                        "{name}: revision {revision} is not above the applied revision {current}"
                    ),
                    current_revision: Some(current),
                };
            }
        }
        let old_content = fs::read(self.config_dir.join(name)).ok();
        // The document first, its revision after: a crash in between leaves the old revision
        // recorded, and the same push applies again.
        let written = fs::create_dir_all(self.config_dir.join(REVISIONS))
            .and_then(|()| write_atomically(&self.config_dir, name, content.as_bytes()))
            .and_then(|()| {
                write_atomically(
                    &self.config_dir.join(REVISIONS),
                    name,
                    revision.to_string().as_bytes(),
                )
            });
        if let Err(e) = written {
            return failed(format!(
                "writing {}: {e}",
                self.config_dir.join(name).display()
            ));
        }
        let reload = service.map(|s| self.run_service(s, "reload"));
        if let (Some(service), Some(run)) = (service, &reload) {
            if run.exit_code != 0 {
                // The service refused the document (or could not take it): it keeps running
                // the last good one, and so does what is on disk, so that a restart of the
                // service reads what it runs now and a corrected push can follow.
                self.roll_back(name, previous, &old_content);
                return Response::Error {
                    kind: ErrorKind::Failed,
                    message: format!(
                        "{service} refused {name} revision {revision} (exit {}): {}",
                        run.exit_code,
                        run.output.trim()
                    ),
                    current_revision: previous,
                };
            }
        }
        Response::Applied {
            name: name.to_string(),
            revision,
            reload,
        }
    }

    /// Puts back the document and revision that were there before a refused apply.
    fn roll_back(&self, name: &str, revision: Option<u64>, content: &Option<Vec<u8>>) {
        let doc = match content {
            Some(c) => write_atomically(&self.config_dir, name, c),
            None => fs::remove_file(self.config_dir.join(name)),
        };
        let rev = match revision {
            Some(r) => write_atomically(
                &self.config_dir.join(REVISIONS),
                name,
                r.to_string().as_bytes(),
            ),
            None => fs::remove_file(self.revision_path(name)),
        };
        if let Err(e) = doc.and(rev) {
            tracing::warn!(document = name, error = %e, "cannot roll back a refused document");
        }
    }

    fn status(&self, services: &[String]) -> Response {
        let services = services
            .iter()
            .map(|name| {
                let (state, output) =
                    if check_name(name).is_err() || !self.services_dir.join(name).is_file() {
                        (ServiceState::Unknown, None)
                    } else {
                        let run = self.run_service(name, "status");
                        let state = match run.exit_code {
                            0 => ServiceState::Running,
                            3 => ServiceState::Stopped,
                            _ => ServiceState::Failed,
                        };
                        let output = run.output.trim();
                        (state, (!output.is_empty()).then(|| output.to_string()))
                    };
                ServiceStatus {
                    name: name.clone(),
                    state,
                    output,
                }
            })
            .collect();
        Response::Status { services }
    }

    /// Runs `<services_dir>/<name> <arg>`, bounded in time, keeping the end of its output.
    fn run_service(&self, name: &str, arg: &str) -> ServiceRun {
        let path = self.services_dir.join(name);
        let mut child = match Command::new(&path)
            .arg(arg)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                return ServiceRun {
                    exit_code: -1,
                    output: format!("cannot run {}: {e}", path.display()),
                }
            }
        };
        let deadline = Instant::now() + SERVICE_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let mut output = Vec::new();
        for pipe in [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn Read>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn Read>),
        ]
        .into_iter()
        .flatten()
        {
            let _ = pipe.take(1 << 20).read_to_end(&mut output);
        }
        let start = output.len().saturating_sub(MAX_OUTPUT);
        ServiceRun {
            exit_code: status.and_then(|s| s.code()).unwrap_or(-1),
            output: String::from_utf8_lossy(&output[start..]).into_owned(),
        }
    }
}

/// Writes `dir/name` so that a reader (or a crash) sees the old contents or the new, never a
/// mix: a temporary file, fsync, rename, fsync of the directory.
fn write_atomically(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn agent() -> (tempfile::TempDir, Agent) {
        let dir = tempfile::tempdir().unwrap();
        let services = dir.path().join("services");
        fs::create_dir_all(&services).unwrap();
        let script = |name: &str, body: &str| {
            let p = services.join(name);
            fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        };
        script(
            "web",
            "case $1 in reload) echo reloaded; exit 0;; status) echo '{\"up\":1}'; exit 0;; esac",
        );
        script("idle", "exit 3");
        // Takes only JSON objects.
        script(
            "picky",
            "case $1 in reload) grep -q '^{' \"$(dirname \"$0\")/../config/lb.json\" || { echo bad document; exit 1; };; esac",
        );
        script("broken", "echo oops >&2; exit 7");
        let a = Agent::new(dir.path().join("config"), services);
        (dir, a)
    }

    fn apply(a: &Agent, rev: u64, content: &str, service: Option<&str>) -> Response {
        a.handle(Request::ApplyConfig {
            name: "lb.json".into(),
            revision: rev,
            content: content.into(),
            service: service.map(Into::into),
        })
        .0
    }

    #[test]
    fn documents_are_applied_in_revision_order() {
        let (dir, a) = agent();
        let r = apply(&a, 5, "{\"v\":5}", Some("web"));
        let Response::Applied {
            revision, reload, ..
        } = r
        else {
            panic!("{r:?}")
        };
        assert_eq!(revision, 5);
        let reload = reload.unwrap();
        assert_eq!(
            (reload.exit_code, reload.output.as_str()),
            (0, "reloaded\n")
        );
        let path = dir.path().join("config/lb.json");
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\"v\":5}");
        for stale in [5, 4, 0] {
            match apply(&a, stale, "old", None) {
                Response::Error {
                    kind: ErrorKind::StaleRevision,
                    current_revision: Some(5),
                    ..
                } => {}
                other => panic!("revision {stale}: {other:?}"),
            }
        }
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\"v\":5}");
        assert!(matches!(
            apply(&a, 6, "{}", None),
            Response::Applied { revision: 6, .. }
        ));
        // A document the service refuses is rolled back: the last good one stays, with its
        // revision, and the refusal says why.
        match apply(&a, 7, "refuse me", Some("picky")) {
            Response::Error {
                kind: ErrorKind::Failed,
                message,
                current_revision: Some(6),
            } => assert!(message.contains("bad document"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(fs::read_to_string(&path).unwrap(), "{}");
        assert!(matches!(
            apply(&a, 7, "{\"v\":7}", Some("picky")),
            Response::Applied { revision: 7, .. }
        ));
        // A restarted agent remembers.
        let b = Agent::new(dir.path().join("config"), dir.path().join("services"));
        assert!(matches!(
            apply(&b, 7, "x", None),
            Response::Error {
                kind: ErrorKind::StaleRevision,
                ..
            }
        ));
    }

    #[test]
    fn bad_requests_are_refused_with_the_reason() {
        let (_dir, a) = agent();
        for (name, service) in [("../etc/passwd", None), ("ok", Some("a/b")), (".x", None)] {
            let r = a
                .handle(Request::ApplyConfig {
                    name: name.into(),
                    revision: 1,
                    content: String::new(),
                    service: service.map(Into::into),
                })
                .0;
            assert!(
                matches!(
                    r,
                    Response::Error {
                        kind: ErrorKind::BadRequest,
                        ..
                    }
                ),
                "{name}: {r:?}"
            );
        }
        let big = "x".repeat(MAX_CONTENT + 1);
        assert!(matches!(
            apply(&a, 1, &big, None),
            Response::Error {
                kind: ErrorKind::BadRequest,
                ..
            }
        ));
    }

    #[test]
    fn service_states_follow_their_status_exit_codes() {
        let (_dir, a) = agent();
        let names = ["web", "idle", "broken", "absent", "../x"].map(String::from);
        let r = a
            .handle(Request::Status {
                services: names.to_vec(),
            })
            .0;
        let Response::Status { services } = r else {
            panic!("{r:?}")
        };
        let states: Vec<_> = services.iter().map(|s| s.state).collect();
        assert_eq!(
            states,
            [
                ServiceState::Running,
                ServiceState::Stopped,
                ServiceState::Failed,
                ServiceState::Unknown,
                ServiceState::Unknown
            ]
        );
        // What `status` printed travels back: a service's own report.
        assert_eq!(services[0].output.as_deref(), Some("{\"up\":1}"));
        assert_eq!(services[1].output, None);
        assert_eq!(services[2].output.as_deref(), Some("oops"));
    }

    #[test]
    fn ping_and_shutdown() {
        let (_dir, a) = agent();
        let (r, then) = a.handle(Request::Ping);
        assert_eq!(then, Then::Continue);
        let Response::Pong {
            protocol,
            uptime_secs,
            hostname,
            ..
        } = r
        else {
            panic!("{r:?}")
        };
        assert_eq!(protocol, PROTOCOL_VERSION);
        assert!(uptime_secs > 0.0 && !hostname.is_empty());
        assert_eq!(
            a.handle(Request::Shutdown),
            (Response::ShuttingDown, Then::PowerOff)
        );
    }
}
