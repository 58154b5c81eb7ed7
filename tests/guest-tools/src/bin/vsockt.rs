//! `vsockt`: the guest side of the vsock tests. Each connection starts with its id (4 bytes,
//! little-endian, from the side that connects); then both sides exchange checked streams
//! (see the `guest_tools` library). Prints one `VSOCKT ...` line per connection.

use std::io::{Read, Write};
use std::process::ExitCode;

use agent_proto::vsock::{Listener, Stream, HOST_CID};
use clap::{Parser, Subcommand};
use guest_tools::{exchange, TO_HOST};

/// Guest side of lightbyte's vsock tests.
#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accepts COUNT connections on PORT and exchanges BYTES each way on each, at once.
    Listen {
        port: u32,
        count: u32,
        bytes: u64,
        /// Send only this much, then close (a guest going away mid-stream).
        #[arg(long)]
        close_after: Option<u64>,
    },
    /// Opens COUNT connections to host port PORT and exchanges BYTES each way on each, at once.
    Dial {
        port: u32,
        count: u32,
        bytes: u64,
        /// Send only this much, then close.
        #[arg(long)]
        close_after: Option<u64>,
    },
    /// Opens one connection to host port PORT and keeps it until it ends; says how it ended.
    Hold { port: u32 },
    /// Serves the throughput benchmark on vsock and TCP alike, forever: on PORT a sink (reads
    /// to the end, then closes), on PORT+1 a source (writes BYTES, then closes), on PORT+2
    /// connections closed as soon as accepted (setup rate), on PORT+3 an echo (request/response
    /// round trips).
    BenchServe {
        port: u16,
        bytes: u64,
        /// TCP only (a guest without a vsock device: the network benchmark's peers).
        #[arg(long)]
        tcp_only: bool,
    },
}

mod bench {
    //! The guest end of `vsockbench`: the same three services on vsock and on TCP.

    use std::io::{Read, Write};
    use std::net::TcpListener;

    use agent_proto::vsock::{Listener, Stream};

    /// A connection of either transport.
    trait Conn: Read + Write + Send + 'static {}
    impl Conn for Stream {}
    impl Conn for std::net::TcpStream {}

    fn sink(mut c: impl Conn) {
        let mut buf = vec![0u8; 256 << 10];
        while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
    }

    fn source(mut c: impl Conn, bytes: u64) {
        let buf = vec![0x5au8; 64 << 10];
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(buf.len() as u64) as usize;
            if c.write_all(&buf[..n]).is_err() {
                return;
            }
            sent += n as u64;
        }
    }

    /// Sends back whatever arrives, as it arrives (each read answered before the next).
    fn echo(mut c: impl Conn) {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 || c.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    }

    fn each<C: Conn>(
        accept: impl Fn() -> std::io::Result<C> + Send + 'static,
        serve: fn(C, u64),
        bytes: u64,
    ) {
        std::thread::spawn(move || loop {
            match accept() {
                Ok(c) => {
                    std::thread::spawn(move || serve(c, bytes));
                }
                Err(e) => {
                    eprintln!("vsockt bench: accept: {e}");
                    return;
                }
            }
        });
    }

    /// A port and what it does for a connection over vsock and over TCP.
    type Service = (u16, fn(Stream, u64), fn(std::net::TcpStream, u64));

    /// Runs the services (on vsock too when `vsock`) until the process is killed.
    pub fn serve(port: u16, bytes: u64, vsock: bool) -> bool {
        let services: [Service; 4] = [
            (port, |c, _| sink(c), |c, _| sink(c)),
            (port + 1, source, source),
            (port + 2, |c, _| drop(c), |c, _| drop(c)),
            (
                port + 3,
                |c, _| echo(c),
                |c, _| {
                    // Round trips of small messages: no coalescing delay.
                    let _ = c.set_nodelay(true);
                    echo(c)
                },
            ),
        ];
        for (p, on_vsock, on_tcp) in services {
            let t = match TcpListener::bind(("0.0.0.0", p)) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("vsockt bench: TCP port {p}: {e}");
                    return false;
                }
            };
            if vsock {
                match Listener::bind(u32::from(p)) {
                    Ok(v) => each(move || v.accept(), on_vsock, bytes),
                    Err(e) => {
                        eprintln!("vsockt bench: vsock port {p}: {e}");
                        return false;
                    }
                }
            }
            each(move || t.accept().map(|(c, _)| c), on_tcp, bytes);
        }
        println!("VSOCKT-BENCH-READY");
        loop {
            std::thread::park();
        }
    }
}

fn report(role: &str, port: u32, id: u32, line: &str) {
    println!("VSOCKT {role} {port} {id} {line}");
}

fn main() -> ExitCode {
    let args = Args::parse();
    let ok = match args.command {
        Command::Listen {
            port,
            count,
            bytes,
            close_after,
        } => listen(port, count, bytes, close_after),
        Command::Dial {
            port,
            count,
            bytes,
            close_after,
        } => dial(port, count, bytes, close_after),
        Command::Hold { port } => hold(port),
        Command::BenchServe {
            port,
            bytes,
            tcp_only,
        } => bench::serve(port, bytes, !tcp_only),
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn listen(port: u32, count: u32, bytes: u64, close_after: Option<u64>) -> bool {
    let listener = match Listener::bind(port) {
        Ok(l) => l,
        Err(e) => {
            report("listen", port, 0, &format!("FAIL bind: {e}"));
            return false;
        }
    };
    println!("VSOCKT listening {port}");
    let mut threads = Vec::new();
    for _ in 0..count {
        let mut s = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                report("listen", port, 0, &format!("FAIL accept: {e}"));
                return false;
            }
        };
        threads.push(std::thread::spawn(move || {
            let mut id = [0u8; 4];
            if let Err(e) = s.read_exact(&mut id) {
                report("listen", port, 0, &format!("FAIL id: {e}"));
                return false;
            }
            let id = u32::from_le_bytes(id);
            let o = exchange(s, id, TO_HOST, bytes, close_after);
            report("listen", port, id, &o.line());
            o.error.is_none()
        }));
    }
    threads.into_iter().all(|t| t.join().unwrap_or(false))
}

fn dial(port: u32, count: u32, bytes: u64, close_after: Option<u64>) -> bool {
    let threads: Vec<_> = (0..count)
        .map(|id| {
            std::thread::spawn(move || {
                let mut s = match Stream::connect(HOST_CID, port) {
                    Ok(s) => s,
                    Err(e) => {
                        report("dial", port, id, &format!("FAIL connect: {e}"));
                        return false;
                    }
                };
                if let Err(e) = s.write_all(&id.to_le_bytes()) {
                    report("dial", port, id, &format!("FAIL id: {e}"));
                    return false;
                }
                let o = exchange(s, id, TO_HOST, bytes, close_after);
                report("dial", port, id, &o.line());
                o.error.is_none()
            })
        })
        .collect();
    threads.into_iter().all(|t| t.join().unwrap_or(false))
}

fn hold(port: u32) -> bool {
    let mut s = match Stream::connect(HOST_CID, port) {
        Ok(s) => s,
        Err(e) => {
            report("hold", port, 0, &format!("FAIL connect: {e}"));
            return false;
        }
    };
    let _ = s.write_all(&0u32.to_le_bytes());
    println!("VSOCKT hold {port} 0 CONNECTED");
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => {
                report("hold", port, 0, "ENDED eof");
                return true;
            }
            Ok(_) => {}
            Err(e) => {
                report("hold", port, 0, &format!("ENDED {e}"));
                return true;
            }
        }
    }
}
