//! `vmm agent`: talks to the guest agent of a running VM through its vsock Unix socket
//! (`--vsock ...,socket=PATH`), the way the worker does. Prints the agent's answer as JSON;
//! exits 0 when it answered with success, 1 when it answered with an error (or could not be
//! reached), 2 on bad input.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agent_proto::{Request, Response};
use clap::{Args as ClapArgs, Subcommand};

use crate::EXIT_BAD_INPUT;

/// Where the agent is.
#[derive(ClapArgs, Debug)]
pub struct Target {
    /// The VM's vsock Unix socket (the `socket=` of `--vsock`).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The agent's vsock port in the guest.
    #[arg(long, value_name = "N", default_value_t = agent_proto::DEFAULT_PORT)]
    port: u32,
    /// How long to wait for the agent's answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    timeout: u64,
}

/// The agent subcommands.
#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Asks the agent for its version, the guest's uptime, hostname and addresses.
    Ping {
        #[command(flatten)]
        target: Target,
    },
    /// Writes a named document into the guest (atomically; refused when REVISION is not above
    /// the one applied), and optionally reloads a local service.
    Apply {
        #[command(flatten)]
        target: Target,
        /// The document's name in the guest (letters, digits, '.', '-', '_').
        name: String,
        /// Its revision.
        #[arg(long)]
        revision: u64,
        /// A file holding the document.
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "content",
            required_unless_present = "content"
        )]
        file: Option<PathBuf>,
        /// The document itself.
        #[arg(long, value_name = "TEXT")]
        content: Option<String>,
        /// A service to reload once it is written.
        #[arg(long, value_name = "NAME")]
        service: Option<String>,
    },
    /// Asks for the state of local services.
    Status {
        #[command(flatten)]
        target: Target,
        /// The services.
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Powers the guest off.
    Shutdown {
        #[command(flatten)]
        target: Target,
    },
}

/// Runs an agent subcommand.
pub fn run(command: AgentCommand) -> ExitCode {
    let (target, request) = match command {
        AgentCommand::Ping { target } => (target, Request::Ping),
        AgentCommand::Apply {
            target,
            name,
            revision,
            file,
            content,
            service,
        } => {
            let content = match (file, content) {
                (Some(f), _) => match std::fs::read_to_string(&f) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("vmm agent: {}: {e}", f.display());
                        return ExitCode::from(EXIT_BAD_INPUT);
                    }
                },
                (None, Some(c)) => c,
                (None, None) => unreachable!("clap requires one of --file and --content"),
            };
            (
                target,
                Request::ApplyConfig {
                    name,
                    revision,
                    content,
                    service,
                },
            )
        }
        AgentCommand::Status { target, services } => (target, Request::Status { services }),
        AgentCommand::Shutdown { target } => (target, Request::Shutdown),
    };
    let timeout = Duration::from_secs(target.timeout.max(1));
    let answer = agent_proto::client::connect(&target.socket, target.port, timeout)
        .and_then(|mut c| c.call(request));
    match answer {
        Ok(response) => {
            let failed = matches!(response, Response::Error { .. });
            match serde_json::to_string_pretty(&response) {
                Ok(json) => println!("{json}"),
                Err(e) => eprintln!("vmm agent: {e}"),
            }
            ExitCode::from(u8::from(failed))
        }
        Err(e) => {
            eprintln!("vmm agent: {e}");
            ExitCode::from(1)
        }
    }
}
