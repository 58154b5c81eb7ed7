//! `vsockpeer`: the host side of the vsock tests, speaking to a `vmm`'s vsock Unix sockets the
//! way any host program does (`CONNECT <port>` on the device's socket; a listener at
//! `<socket>_<port>` for the guest's connections). Each connection carries checked streams both
//! ways (see `guest_tools`). Prints one `VSOCKPEER ...` line per connection; exits 1 when one
//! failed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use guest_tools::{exchange, TO_GUEST};

/// Host side of lightbyte's vsock tests.
#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Opens COUNT connections to guest port PORT through the device's SOCKET and exchanges
    /// BYTES each way on each, at once.
    Dial {
        socket: PathBuf,
        port: u32,
        count: u32,
        bytes: u64,
        /// Send only this much, then close.
        #[arg(long)]
        close_after: Option<u64>,
    },
    /// Listens at PATH (the device's socket followed by `_<port>`), takes COUNT guest
    /// connections and exchanges BYTES each way on each.
    Listen {
        path: PathBuf,
        count: u32,
        bytes: u64,
        /// Send only this much, then close.
        #[arg(long)]
        close_after: Option<u64>,
    },
}

fn main() -> ExitCode {
    let ok = match Args::parse().command {
        Command::Dial {
            socket,
            port,
            count,
            bytes,
            close_after,
        } => dial(&socket, port, count, bytes, close_after),
        Command::Listen {
            path,
            count,
            bytes,
            close_after,
        } => listen(&path, count, bytes, close_after),
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn report(role: &str, port: u32, id: u32, line: &str) {
    println!("VSOCKPEER {role} {port} {id} {line}");
}

/// Connects through the device's socket; the stream once the guest accepted.
fn connect(socket: &Path, port: u32) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("CONNECT: {e}"))?;
    let mut line = Vec::new();
    BufReader::with_capacity(1, &mut s)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("reading OK: {e}"))?;
    if !line.starts_with(b"OK ") {
        return Err(format!(
            "refused: {:?}",
            String::from_utf8_lossy(&line).trim_end()
        ));
    }
    Ok(s)
}

fn dial(socket: &Path, port: u32, count: u32, bytes: u64, close_after: Option<u64>) -> bool {
    let threads: Vec<_> = (0..count)
        .map(|id| {
            let socket = socket.to_path_buf();
            std::thread::spawn(move || {
                let mut s = match connect(&socket, port) {
                    Ok(s) => s,
                    Err(e) => {
                        report("dial", port, id, &format!("FAIL {e}"));
                        return false;
                    }
                };
                if let Err(e) = s.write_all(&id.to_le_bytes()) {
                    report("dial", port, id, &format!("FAIL id: {e}"));
                    return false;
                }
                let o = exchange(s, id, TO_GUEST, bytes, close_after);
                report("dial", port, id, &o.line());
                o.error.is_none()
            })
        })
        .collect();
    threads.into_iter().all(|t| t.join().unwrap_or(false))
}

fn listen(path: &Path, count: u32, bytes: u64, close_after: Option<u64>) -> bool {
    let _ = std::fs::remove_file(path);
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            report(
                "listen",
                0,
                0,
                &format!("FAIL bind {}: {e}", path.display()),
            );
            return false;
        }
    };
    let mut threads = Vec::new();
    for _ in 0..count {
        let (mut s, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                report("listen", 0, 0, &format!("FAIL accept: {e}"));
                return false;
            }
        };
        threads.push(std::thread::spawn(move || {
            let mut id = [0u8; 4];
            if let Err(e) = s.read_exact(&mut id) {
                report("listen", 0, 0, &format!("FAIL id: {e}"));
                return false;
            }
            let id = u32::from_le_bytes(id);
            let o = exchange(s, id, TO_GUEST, bytes, close_after);
            report("listen", 0, id, &o.line());
            o.error.is_none()
        }));
    }
    threads.into_iter().all(|t| t.join().unwrap_or(false))
}
