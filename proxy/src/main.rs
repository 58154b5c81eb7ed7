//! `lightbyte-proxy`: runs HTTP load balancers configured at run time over a control socket,
//! and talks to a running one (apply, status, stop). See the crate documentation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lb_config::ProxyConfig;
use lightbyte_proxy::control::{self, Request, Response, Shutdown};
use lightbyte_proxy::Proxy;

#[derive(Parser)]
#[command(
    name = "lightbyte-proxy",
    about = "HTTP load balancers on Pingora, configured at run time",
    long_about = "HTTP load balancers on Pingora, configured at run time.\n\n\
`run` starts the proxy with a control socket; `apply FILE` pushes a configuration (JSON: \
{\"revision\": N, \"balancers\": [{\"name\", \"listen\", \"backends\", \"selection\", \"health\", \
\"drain_grace_secs\"}]}) which the proxy refuses, keeping the last good one, when it is invalid \
or its revision is not above the applied one. `run --takeover` starts a new binary that takes \
the listening sockets and configuration over from the running one, which then drains and exits: \
no connection is refused during an upgrade."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the proxy until SIGTERM/SIGINT or `stop`, then stops accepting and drains.
    Run {
        /// The control socket.
        #[arg(long)]
        control: PathBuf,
        /// A configuration to start with, if the file exists (an invalid one is logged and
        /// the proxy starts empty).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Take the sockets and configuration over from the proxy serving `--control`.
        #[arg(long)]
        takeover: bool,
        /// Runtime threads (default: one per CPU).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Pushes a configuration file to a running proxy.
    Apply {
        #[arg(long)]
        control: PathBuf,
        file: PathBuf,
    },
    /// Prints a running proxy's revision, balancers and backend health as JSON (one line: the
    /// guest agent passes it on to the control plane).
    Status {
        #[arg(long)]
        control: PathBuf,
    },
    /// Asks a running proxy to stop accepting, drain and exit.
    Stop {
        #[arg(long)]
        control: PathBuf,
    },
}

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,pingora_core=warn,pingora_proxy=warn".into());
    let most = filter.max_level_hint();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // Pingora logs through `log`, bridged into tracing with every level let through: its
    // per-request debug! calls would each become an event for the filter to drop. The `log`
    // level cut-off stops them at a comparison.
    log::set_max_level(match most {
        Some(l) if l == tracing::level_filters::LevelFilter::OFF => log::LevelFilter::Off,
        Some(l) if l == tracing::level_filters::LevelFilter::ERROR => log::LevelFilter::Error,
        Some(l) if l == tracing::level_filters::LevelFilter::WARN => log::LevelFilter::Warn,
        Some(l) if l == tracing::level_filters::LevelFilter::INFO => log::LevelFilter::Info,
        Some(l) if l == tracing::level_filters::LevelFilter::DEBUG => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    });
    match Cli::parse().command {
        Command::Run {
            control,
            config,
            takeover,
            threads,
        } => run(&control, config.as_deref(), takeover, threads),
        Command::Apply { control, file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let config: ProxyConfig =
                serde_json::from_str(&text).with_context(|| format!("{}", file.display()))?;
            answer(&control, &Request::Apply { config })
        }
        Command::Status { control } => answer(&control, &Request::Status),
        Command::Stop { control } => answer(&control, &Request::Stop),
    }
}

/// Sends `request` and prints the answer; a refusal is an error (exit status 1).
fn answer(control: &Path, request: &Request) -> Result<()> {
    let r = control::call(control, request, CALL_TIMEOUT);
    match r.with_context(|| format!("control socket {}", control.display()))? {
        Response::Applied { revision } => println!("applied revision {revision}"),
        Response::Status { status } => println!("{}", serde_json::to_string(&status)?),
        Response::Stopping => println!("stopping"),
        Response::HandedOver { .. } => println!("handed over"),
        Response::Error { kind, message, .. } => bail!("refused ({kind:?}): {message}"),
    }
    Ok(())
}

fn run(
    control: &Path,
    config: Option<&Path>,
    takeover: bool,
    threads: Option<usize>,
) -> Result<()> {
    // One thread: a current-thread runtime, without the work-stealing machinery a single
    // worker cannot use.
    let mut rt = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    rt.enable_all().thread_name("lightbyte-proxy");
    let rt = rt.build().context("tokio runtime")?;
    rt.block_on(async {
        let proxy = Proxy::default();
        let old = if takeover {
            Some(take_over(control, &proxy).await?)
        } else {
            if let Some(path) = config.filter(|p| p.exists()) {
                let loaded = std::fs::read_to_string(path)
                    .map_err(anyhow::Error::from)
                    .and_then(|t| Ok(ProxyConfig::parse(&t)?));
                match loaded {
                    Ok(c) => {
                        proxy.apply(c).await?;
                    }
                    Err(e) => tracing::error!(file = %path.display(), error = %e, "starting empty"),
                }
            }
            None
        };
        // The path now names this process's socket (the old one keeps serving its open
        // connection only).
        let _ = std::fs::remove_file(control);
        let listener = tokio::net::UnixListener::bind(control)
            .with_context(|| format!("binding {}", control.display()))?;
        if let Some(old) = old {
            // Both accept on the same sockets now: the old one may stop.
            match control::call_on(&old, &Request::Stop, CALL_TIMEOUT) {
                Ok(Response::Stopping) => tracing::info!("the previous binary is draining"),
                other => tracing::warn!(?other, "the previous binary did not agree to stop"),
            }
        }
        tracing::info!(control = %control.display(), "proxy ready");
        let stop = Arc::new(Shutdown::default());
        let serving = tokio::spawn(control::serve(listener, proxy.clone(), stop.clone()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = stop.wait() => tracing::info!("stop requested"),
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
        }
        stop.trigger();
        let _ = serving.await;
        proxy.shutdown().await;
        tracing::info!("drained; exiting");
        Ok::<_, anyhow::Error>(())
    })?;
    // Pingora's tasks may still hold the runtime; nothing of theirs is left to wait for.
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

/// Receives the running proxy's sockets and configuration and starts the same balancers on
/// them. Returns the connection to the old proxy, to tell it to stop once this one serves.
async fn take_over(control: &Path, proxy: &Proxy) -> Result<std::os::unix::net::UnixStream> {
    let control_path = control.to_path_buf();
    let control = control.to_path_buf();
    let (stream, received, answer) = tokio::task::spawn_blocking(move || {
        let stream = std::os::unix::net::UnixStream::connect(&control)
            .with_context(|| format!("connecting to the running proxy at {}", control.display()))?;
        stream.set_read_timeout(Some(CALL_TIMEOUT))?;
        let mut line = serde_json::to_vec(&Request::Handover)?;
        line.push(b'\n');
        std::io::Write::write_all(&mut &stream, &line)?;
        let received = lightbyte_proxy::handover::receive(&stream).context("receiving sockets")?;
        let answer = control::read_response(&stream)?;
        Ok::<_, anyhow::Error>((stream, received, answer))
    })
    .await??;
    let n = received.len();
    proxy.listeners().adopt(received)?;
    let Response::HandedOver { config } = answer else {
        bail!("the running proxy did not hand over: {answer:?}");
    };
    if config.revision > 0 {
        proxy.apply(config).await?;
    }
    tracing::info!(sockets = n, "took over from the running proxy");
    // `stop` goes on a connection opened now, while the path still names the old proxy's
    // socket: the caller binds its own there next.
    drop(stream);
    std::os::unix::net::UnixStream::connect(&control_path).with_context(|| {
        format!(
            "reconnecting to the running proxy at {}",
            control_path.display()
        )
    })
}
