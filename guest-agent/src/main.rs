//! `lightbyte-guest-agent`: runs inside a lightbyte guest (a static binary, no dependencies on
//! the guest's libraries) and serves the host over vsock with the protocol of the
//! `lightbyte-agent-proto` crate: `ping`, `apply-config`, `status`, `shutdown`.

mod agent;
mod serve;
mod sysinfo;

use agent_proto::vsock;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use agent::Agent;

/// The lightbyte guest agent. Listens on a vsock port and answers the host: ping (version,
/// uptime, hostname, addresses), apply-config (atomically writes a named document into
/// --config-dir, refuses revisions not above the applied one, optionally runs
/// `<services-dir>/<service> reload`), status (runs `<services-dir>/<name> status`: exit 0
/// running, 3 stopped), shutdown (powers the guest off).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// vsock port to listen on.
    #[arg(long, default_value_t = agent_proto::DEFAULT_PORT)]
    port: u32,
    /// Where applied documents are written (created if missing).
    #[arg(long, value_name = "DIR", default_value = "/run/lightbyte/config")]
    config_dir: PathBuf,
    /// Where services live: executables taking `reload` or `status`.
    #[arg(long, value_name = "DIR", default_value = "/etc/lightbyte/services")]
    services_dir: PathBuf,
    /// How long to keep trying to listen while the guest's vsock transport comes up.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    listen_timeout: u64,
}

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let listener =
        match vsock::Listener::bind_retrying(args.port, Duration::from_secs(args.listen_timeout)) {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "lightbyte-guest-agent: listening on vsock port {}: {e}",
                    args.port
                );
                return ExitCode::from(1);
            }
        };
    let agent = Arc::new(Agent::new(args.config_dir, args.services_dir));
    let active = Arc::new(AtomicUsize::new(0));
    tracing::info!(port = args.port, "listening");
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        while active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            std::thread::sleep(Duration::from_millis(10));
        }
        active.fetch_add(1, Ordering::SeqCst);
        let agent = agent.clone();
        let done = active.clone();
        let spawned = std::thread::Builder::new()
            .name("agent-conn".into())
            .spawn(move || {
                serve::connection(&agent, stream);
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot serve a connection: {e}");
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
