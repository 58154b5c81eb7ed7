//! One connection: frames in, answers out, until the host closes. Nothing a host sends makes the
//! agent stop serving: bad frames get error answers.

use std::io::{Read, Write};

use agent_proto::frame::{self, FrameError};
use agent_proto::{ErrorKind, RequestFrame, Response, PROTOCOL_VERSION};

use crate::agent::{Agent, Then};

/// Serves `stream` until it closes or breaks.
pub fn connection<S: Read + Write>(agent: &Agent, mut stream: S) {
    loop {
        let body = match frame::read_body(&mut stream) {
            Ok(b) => b,
            Err(FrameError::Closed) => return,
            Err(e @ FrameError::TooLarge(_)) => {
                // The next frame cannot be found: answer and hang up.
                let _ = frame::write(
                    &mut stream,
                    &Response::error(ErrorKind::BadRequest, e.to_string()),
                );
                return;
            }
            Err(e) => {
                tracing::debug!("connection ended: {e}");
                return;
            }
        };
        let (response, then) = answer(agent, &body);
        if let Err(e) = frame::write(&mut stream, &response) {
            tracing::debug!("writing an answer: {e}");
            return;
        }
        if then == Then::PowerOff {
            crate::sysinfo::power_off();
        }
    }
}

/// The answer to one frame's body.
pub fn answer(agent: &Agent, body: &[u8]) -> (Response, Then) {
    // The version first, so that a newer client learns why its request is not understood.
    let version = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("version").and_then(serde_json::Value::as_u64));
    if let Some(v) = version.filter(|v| *v != u64::from(PROTOCOL_VERSION)) {
        return (
            Response::error(
                ErrorKind::UnsupportedVersion,
                format!(
                    "protocol version {v} is not supported: this agent speaks {PROTOCOL_VERSION}"
                ),
            ),
            Then::Continue,
        );
    }
    match serde_json::from_slice::<RequestFrame>(body) {
        Ok(f) => agent.handle(f.request),
        Err(e) => (
            Response::error(ErrorKind::BadRequest, format!("malformed request: {e}")),
            Then::Continue,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_proto::Request;
    use std::os::unix::net::UnixStream;

    #[test]
    fn bad_frames_get_answers_and_the_connection_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::new(dir.path().join("c"), dir.path().join("s"));
        let (mut host, guest) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || connection(&agent, guest));
        let send = |h: &mut UnixStream, body: &[u8]| {
            h.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
            h.write_all(body).unwrap();
        };
        let kind = |r: Response| match r {
            Response::Error { kind, .. } => Some(kind),
            _ => None,
        };
        for (body, want) in [
            (&b"not json"[..], ErrorKind::BadRequest),
            (br#"{"version":1,"request":{"type":"fly"}}"#, ErrorKind::BadRequest),
            (br#"{"version":9,"request":{"type":"ping"}}"#, ErrorKind::UnsupportedVersion),
            (br#"{"version":1,"request":{"type":"apply-config","name":"../x","revision":1,"content":""}}"#, ErrorKind::BadRequest),
        ] {
            send(&mut host, body);
            let r: Response = frame::read(&mut host).unwrap();
            assert_eq!(kind(r), Some(want), "{}", String::from_utf8_lossy(body));
        }
        // Still serving.
        frame::write(
            &mut host,
            &RequestFrame {
                version: 1,
                request: Request::Ping,
            },
        )
        .unwrap();
        assert!(matches!(
            frame::read(&mut host).unwrap(),
            Response::Pong { .. }
        ));
        // A frame too large to skip: answered, then the connection ends.
        host.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let r: Response = frame::read(&mut host).unwrap();
        assert_eq!(kind(r), Some(ErrorKind::BadRequest));
        server.join().unwrap();
    }
}
