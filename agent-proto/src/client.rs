//! A client of the guest agent: over any stream, or through a VMM's vsock Unix socket.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::frame::{self, FrameError};
use crate::{Request, RequestFrame, Response, PROTOCOL_VERSION};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The VMM's vsock socket could not be reached.
    #[error("connecting to {}: {source}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The VMM closed the connection instead of answering `OK`: nothing listens on the port
    /// in the guest (or the guest did not answer in time).
    #[error("the guest refused the connection to vsock port {0} (is the agent running?)")]
    Refused(u32),
    /// The VMM's answer to `CONNECT` was not `OK <port>`.
    #[error("unexpected answer to CONNECT: {0:?}")]
    Handshake(String),
    /// Sending the request failed.
    #[error("sending the request: {0}")]
    Send(io::Error),
    /// Receiving the answer failed.
    #[error(transparent)]
    Receive(#[from] FrameError),
}

/// A connection to a guest agent.
pub struct Client<S> {
    stream: S,
}

impl<S: Read + Write> Client<S> {
    /// A client on an established stream.
    pub fn new(stream: S) -> Client<S> {
        Client { stream }
    }

    /// Sends `request` and waits for its answer.
    pub fn call(&mut self, request: Request) -> Result<Response, ClientError> {
        let frame = RequestFrame {
            version: PROTOCOL_VERSION,
            request,
        };
        frame::write(&mut self.stream, &frame).map_err(ClientError::Send)?;
        Ok(frame::read(&mut self.stream)?)
    }
}

/// Connects to vsock `port` in the guest through the VMM's vsock Unix socket at `socket`, with
/// `timeout` for every read and write.
pub fn connect(
    socket: &Path,
    port: u32,
    timeout: Duration,
) -> Result<Client<UnixStream>, ClientError> {
    let at = |source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(at)?;
    stream.set_read_timeout(Some(timeout)).map_err(at)?;
    stream.set_write_timeout(Some(timeout)).map_err(at)?;
    // The VMM closes the stream when the guest refuses: depending on timing that shows as a
    // failed write, a reset, or an end of stream.
    let refused = |e: io::Error| match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ClientError::Refused(port),
        _ => ClientError::Receive(e.into()),
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(refused)?;
    // Byte by byte: what follows the line is the agent's, not ours to buffer away.
    let mut line = Vec::new();
    let mut reader = BufReader::with_capacity(1, &mut stream);
    let n = reader.read_until(b'\n', &mut line).map_err(refused)?;
    if n == 0 {
        return Err(ClientError::Refused(port));
    }
    let text = String::from_utf8_lossy(&line).trim_end().to_string();
    let ok = text
        .strip_prefix("OK ")
        .is_some_and(|p| p.parse::<u32>().is_ok());
    if !ok {
        return Err(ClientError::Handshake(text));
    }
    Ok(Client::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn the_handshake_then_one_call() {
        let dir = std::env::temp_dir().join(format!("agent-proto-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("v.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        let vmm = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = [0u8; 13];
            s.read_exact(&mut line).unwrap();
            assert_eq!(&line, b"CONNECT 1024\n");
            s.write_all(b"OK 1073741824\n").unwrap();
            let req: RequestFrame = frame::read(&mut s).unwrap();
            assert_eq!(req.request, Request::Shutdown);
            frame::write(&mut s, &Response::ShuttingDown).unwrap();
            // A second connection is refused (the VMM closes it).
            let (s, _) = listener.accept().unwrap();
            drop(s);
        });
        let mut c = connect(&sock, 1024, Duration::from_secs(5)).unwrap();
        assert_eq!(c.call(Request::Shutdown).unwrap(), Response::ShuttingDown);
        assert!(matches!(
            connect(&sock, 1024, Duration::from_secs(5)),
            Err(ClientError::Refused(1024))
        ));
        vmm.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
