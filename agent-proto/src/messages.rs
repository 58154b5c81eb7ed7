//! The messages, as JSON.

use serde::{Deserialize, Serialize};

/// Longest configuration or service name.
pub const MAX_NAME: usize = 64;
/// Largest configuration document.
pub const MAX_CONTENT: usize = 512 << 10;

/// What a client sends: a request and the protocol version it speaks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFrame {
    /// The client's protocol version.
    pub version: u32,
    /// The request.
    pub request: Request,
}

/// A request to the guest agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Is the agent there, and what guest is it in.
    Ping,
    /// Writes a named document into the guest.
    ApplyConfig {
        /// The document's name (a file name: letters, digits, `.`, `-`, `_`).
        name: String,
        /// Its revision: must be above the one applied.
        revision: u64,
        /// Its contents.
        content: String,
        /// A local service to reload once it is written. When the reload fails (the service
        /// refuses the document), the previous document and revision are put back and the
        /// answer is a `failed` error naming why.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service: Option<String>,
    },
    /// The state of local services.
    Status {
        /// Their names.
        services: Vec<String>,
    },
    /// Powers the guest off (after the answer).
    Shutdown,
}

/// The agent's answer to one request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Response {
    /// Answer to `ping`.
    Pong {
        /// The agent's version.
        agent_version: String,
        /// The protocol version it speaks.
        protocol: u32,
        /// Seconds since the guest booted.
        uptime_secs: f64,
        /// The guest's host name.
        hostname: String,
        /// Its addresses (loopback excluded), as `address/prefix`.
        addresses: Vec<String>,
    },
    /// Answer to `apply-config`.
    Applied {
        /// The document's name.
        name: String,
        /// The revision now applied.
        revision: u64,
        /// What the reload of the service did, when one was named.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reload: Option<ServiceRun>,
    },
    /// Answer to `status`.
    Status {
        /// Each service asked about, in order.
        services: Vec<ServiceStatus>,
    },
    /// Answer to `shutdown`: the guest powers off now.
    ShuttingDown,
    /// The request failed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// What happened, naming the value at fault.
        message: String,
        /// For `stale-revision`: the revision applied.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        current_revision: Option<u64>,
    },
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Not JSON, not a known request, or a value out of range.
    BadRequest,
    /// A protocol version the agent does not speak.
    UnsupportedVersion,
    /// An `apply-config` revision not above the one applied.
    StaleRevision,
    /// The guest could not do it (disk full, service missing).
    Failed,
}

/// What running a service did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRun {
    /// Its exit code (-1 when it was killed or could not start).
    pub exit_code: i32,
    /// The end of what it printed.
    pub output: String,
}

/// The state of one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceState {
    /// `status` exited 0.
    Running,
    /// `status` exited 3.
    Stopped,
    /// `status` exited with anything else, or did not finish.
    Failed,
    /// There is no such service.
    Unknown,
}

/// One service in a `status` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceStatus {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: ServiceState,
    /// What `status` printed (its end), when it printed anything: a service's own report,
    /// such as the proxy's backend health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// Checks a configuration or service name: 1 to [`MAX_NAME`] letters, digits, `.`, `-`, `_`,
/// not starting with a dot (names become file names in the guest).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name: 1 to {MAX_NAME} letters, digits, '.', '-', '_', not starting with '.'"
        ))
    }
}

impl Response {
    /// An error response.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response::Error {
            kind,
            message: message.into(),
            current_revision: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_documented() {
        let f: RequestFrame =
            serde_json::from_str(r#"{"version":1,"request":{"type":"ping"}}"#).unwrap();
        assert_eq!(f.request, Request::Ping);
        let f: RequestFrame = serde_json::from_str(
            r#"{"version":1,"request":{"type":"apply-config","name":"lb.json","revision":3,
                "content":"{}","service":"proxy"}}"#,
        )
        .unwrap();
        assert_eq!(
            f.request,
            Request::ApplyConfig {
                name: "lb.json".into(),
                revision: 3,
                content: "{}".into(),
                service: Some("proxy".into()),
            }
        );
        for bad in [
            r#"{"version":1,"request":{"type":"reboot"}}"#,
            r#"{"version":1,"request":{"type":"status","services":[],"x":1}}"#,
            r#"{"version":1}"#,
            r#"{"version":1,"request":{"type":"status"}}"#,
        ] {
            assert!(serde_json::from_str::<RequestFrame>(bad).is_err(), "{bad}");
        }
        let e = serde_json::to_string(&Response::error(ErrorKind::StaleRevision, "x")).unwrap();
        assert_eq!(
            e,
            r#"{"type":"error","kind":"stale-revision","message":"x"}"#
        );
    }

    #[test]
    fn names_are_file_names() {
        assert!(check_name("lb-backends.json").is_ok());
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
