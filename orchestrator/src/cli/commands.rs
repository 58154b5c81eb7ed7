//! What each subcommand does.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::table::Table;
use super::{
    AgentRequest, Cli, Command, ImageCommand, Output, PkiCommand, ServerArgs, TokenCommand,
    VmCommand, VolumeCommand, WaitFor, WorkerArgs, WorkerCommand,
};
use orchestrator::api::StartRequest;
use orchestrator::client::{ApiClient, DEFAULT_SERVER};
use orchestrator::controllers::ControllerConfig;
use orchestrator::model::{
    ByteSize, Image, ImageSpec, Object, Spec, Vm, VmSpec, VmState, Volume, VolumeSpec, Worker,
    WorkerSpec,
};
use orchestrator::server::{ControlPlane, ServerConfig};

/// Client requests give up after this: the server itself answers within a few seconds even
/// when etcd is down.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(cli: Cli) -> Result<()> {
    let output = cli.output;
    // Making certificates and tokens reaches no server: no credentials of its own (the ones
    // named in the environment may not exist yet, as when a cluster is being set up).
    let local_only = matches!(cli.command, Command::Pki(_) | Command::Token(_));
    let tls = if local_only {
        None
    } else {
        own_token(cli.token_file.as_deref())?;
        own_tls(&cli)?
    };
    let client = || -> Result<ApiClient> {
        let url = cli
            .server
            .clone()
            .or_else(|| std::env::var("LIGHTBYTE_SERVER").ok())
            .unwrap_or_else(|| DEFAULT_SERVER.to_string());
        Ok(ApiClient::new(&url, CLIENT_TIMEOUT)?)
    };
    match cli.command {
        Command::Server(args) => server(args, tls).await,
        Command::Vm(cmd) => vm(&client()?, cmd, output).await,
        Command::Image(cmd) => image(&client()?, cmd, output).await,
        Command::Volume(cmd) => volume(&client()?, cmd, output).await,
        Command::Worker(WorkerArgs {
            command: Some(cmd), ..
        }) => worker(&client()?, cmd, output).await,
        Command::Worker(WorkerArgs {
            command: None,
            agent,
        }) => super::agent::run(*agent, tls).await,
        Command::ScaleGroup(cmd) => super::groups::run(&client()?, cmd, output).await,
        Command::Lb(cmd) => super::lbs::run(&client()?, cmd, output).await,
        Command::Proxy { args } => proxy(args),
        command @ (Command::Pki(_) | Command::Token(_)) => local(command),
    }
}

/// The commands that make files here and reach no server.
fn local(command: Command) -> Result<()> {
    match command {
        Command::Pki(PkiCommand::Init { dir, name }) => {
            let crt = orchestrator::pki::init(&dir, &name)?;
            println!("{}", crt.display());
            Ok(())
        }
        Command::Pki(PkiCommand::Issue { dir, name, sans }) => {
            let (crt, key) = orchestrator::pki::issue(&dir, &name, &sans)?;
            println!("{}\n{}", crt.display(), key.display());
            Ok(())
        }
        Command::Token(TokenCommand::New { role, name, file }) => {
            let role = role.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            let token = orchestrator::auth::tokens::add(&file, role, &name)?;
            println!("{token}");
            Ok(())
        }
        other => bail!("{other:?} is not a local command"),
    }
}

/// This process's TLS files, from the flags or the environment (set for its clients too).
fn own_tls(cli: &Cli) -> Result<Option<orchestrator::tls::TlsFiles>> {
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(Into::into)
    };
    let tls = orchestrator::tls::TlsFiles::from_flags(
        cli.ca.clone().or_else(|| env("LIGHTBYTE_CA")),
        cli.cert.clone().or_else(|| env("LIGHTBYTE_CERT")),
        cli.key.clone().or_else(|| env("LIGHTBYTE_KEY")),
    )?;
    if let Some(files) = &tls {
        orchestrator::tls::set_own(files.clone())?;
    }
    Ok(tls)
}

/// Takes the token this process presents from `--token-file`, else $LIGHTBYTE_TOKEN, else
/// $LIGHTBYTE_TOKEN_FILE.
fn own_token(flag: Option<&std::path::Path>) -> Result<()> {
    let from_env = std::env::var("LIGHTBYTE_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    if let (None, Some(t)) = (flag, from_env) {
        orchestrator::auth::set_own_token(t);
        return Ok(());
    }
    let path = flag
        .map(std::path::Path::to_path_buf)
        .or_else(|| std::env::var_os("LIGHTBYTE_TOKEN_FILE").map(Into::into));
    if let Some(path) = path {
        orchestrator::auth::set_own_token(orchestrator::auth::tokens::read_own(&path)?);
    }
    Ok(())
}

/// The server's or worker's authentication from its flags: tokens and mutual TLS, or
/// `--insecure`.
pub(super) fn auth(
    args: &super::AuthArgs,
    tls: &Option<orchestrator::tls::TlsFiles>,
    what: &str,
) -> Result<orchestrator::auth::Auth> {
    if tls.is_none() && !args.insecure {
        bail!(
            "the {what} serves over mutual TLS: give --ca, --cert and --key (`lightbyte pki init` \
             and `lightbyte pki issue` make them), or serve plain HTTP with --insecure"
        );
    }
    if tls.is_none() {
        tracing::warn!("--insecure: the {what} serves plain HTTP; anyone on the path can read and change its traffic");
    }
    Ok(orchestrator::auth::Auth::from_flags(
        args.tokens.as_deref(),
        args.insecure,
        what,
    )?)
}

/// Hands over to `lightbyte-proxy`: the proxy is its own binary (Pingora stays out of the
/// control plane's), this is the way to it under the one command users know.
fn proxy(args: Vec<std::ffi::OsString>) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let bin = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("lightbyte-proxy")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "lightbyte-proxy".into());
    let err = std::process::Command::new(&bin).args(args).exec();
    Err(anyhow::anyhow!("cannot run {}: {err}", bin.display()))
}

async fn server(args: ServerArgs, tls: Option<orchestrator::tls::TlsFiles>) -> Result<()> {
    let id = match args.id {
        Some(id) => id,
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_else(|_| "lightbyte".into());
            format!("{}-{}", host.trim(), std::process::id())
        }
    };
    // A random suffix keeps two instances started with the same --id from taking each other's
    // leader keys for their own.
    let holder = format!("{id}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let config = ServerConfig {
        etcd: args.etcd,
        listen: args.listen[0],
        also_listen: args.listen[1..].to_vec(),
        etcd_timeout: args.etcd_timeout,
        controllers: ControllerConfig {
            holder,
            lease_ttl: args.lease_ttl,
            resync: args.resync,
        },
        image_dir: args.image_dir,
        allow_host_path: args.allow_host_path,
        limits: orchestrator::serve::Limits {
            max_connections: args.max_connections as usize,
            header_timeout: args.header_timeout,
            allowed_hosts: args.allowed_host,
        },
        auth: auth(&args.auth, &tls, "control plane")?,
        tls: tls.clone(),
    };
    let plane = ControlPlane::start(config).await?;
    // Scripts and tests read the address from this line when they pass port 0.
    eprintln!(
        "lightbyte server listening on {}://{}",
        if tls.is_some() { "https" } else { "http" },
        plane.addr()
    );
    wait_for_signal().await?;
    eprintln!("lightbyte server stopping");
    plane.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

pub(super) async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Polls the VMs (one process, every 100 ms) until each is in the state asked for.
async fn wait_vms(
    client: &ApiClient,
    names: &[String],
    until: WaitFor,
    timeout: Duration,
    output: Output,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut pending = Vec::new();
        let mut found = Vec::new();
        for name in names {
            match client.get::<VmSpec>(name).await {
                Ok(vm) => {
                    let state = vm.status.state;
                    let done = match until {
                        WaitFor::Running => state == VmState::Running,
                        WaitFor::Stopped => state == VmState::Stopped,
                        WaitFor::Deleted => false,
                    };
                    if state == VmState::Failed && until != WaitFor::Deleted {
                        bail!(
                            "vm {name} failed: {}",
                            vm.status.message.as_deref().unwrap_or("no reason given")
                        );
                    }
                    if !done {
                        pending.push(format!("{name} ({state})"));
                    }
                    found.push(vm);
                }
                Err(e) if e.status() == Some(hyper::StatusCode::NOT_FOUND) => {
                    if until != WaitFor::Deleted {
                        bail!("vm {name} does not exist");
                    }
                }
                Err(e) => {
                    if super::groups::retry_transient::<()>(Err(e.into()), deadline)?.is_none() {
                        pending.push(format!("{name} (unknown for now)"));
                    }
                }
            }
        }
        if pending.is_empty() {
            if until != WaitFor::Deleted {
                show(output, &found, vm_table)?;
            }
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for: {}",
                pending.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn vm(client: &ApiClient, cmd: VmCommand, output: Output) -> Result<()> {
    match cmd {
        VmCommand::Create {
            name,
            image,
            cpus,
            memory,
            volumes,
            network,
            group,
            labels,
            cmdline,
        } => {
            let spec = VmSpec {
                cpus,
                memory,
                image,
                volumes,
                network,
                group,
                labels: labels.into_iter().collect(),
                cmdline,
                power: Default::default(),
            };
            let vm = client.create(&name, &spec).await?;
            done(output, &vm, "created")
        }
        VmCommand::Stop { name } => {
            let vm: Vm = client.action(&name, "stop", &serde_json::json!({})).await?;
            done(output, &vm, "stopping")
        }
        VmCommand::Start { name, fresh_disks } => {
            let vm: Vm = client
                .action(&name, "start", &StartRequest { fresh_disks })
                .await?;
            done(
                output,
                &vm,
                if fresh_disks {
                    "starting on fresh disks"
                } else {
                    "starting"
                },
            )
        }
        VmCommand::List => show(output, &client.list::<VmSpec>().await?, vm_table),
        VmCommand::Wait {
            names,
            until,
            timeout,
        } => wait_vms(client, &names, until, timeout, output).await,
        VmCommand::Get { name } => show_one(output, client.get::<VmSpec>(&name).await?, vm_table),
        VmCommand::Delete { name } => {
            done(output, &client.delete::<VmSpec>(&name).await?, "deleted")
        }
        VmCommand::Agent { name, request } => vm_agent(client, &name, request).await,
    }
}

async fn vm_agent(client: &ApiClient, name: &str, request: AgentRequest) -> Result<()> {
    use agent_proto::Request;
    let request = match request {
        AgentRequest::Ping => Request::Ping,
        AgentRequest::Apply {
            document,
            revision,
            file,
            service,
        } => Request::ApplyConfig {
            name: document,
            revision,
            content: std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?,
            service,
        },
        AgentRequest::Status { services } => Request::Status { services },
        AgentRequest::Shutdown => Request::Shutdown,
    };
    let response = client.agent(name, &request).await?;
    println!("{}", serde_json::to_string_pretty(&response)?);
    if let agent_proto::Response::Error { message, .. } = &response {
        bail!("the guest agent refused: {message}");
    }
    Ok(())
}

async fn image(client: &ApiClient, cmd: ImageCommand, output: Output) -> Result<()> {
    match cmd {
        ImageCommand::Add {
            name,
            path,
            format,
            size,
            kernel,
            initramfs,
            cmdline,
            uefi,
        } => {
            let spec = ImageSpec {
                digest: None,
                path: Some(path),
                format: format.into(),
                size,
                kernel,
                initramfs,
                cmdline,
                boot: boot_of(uefi),
            };
            done(output, &client.create(&name, &spec).await?, "added")
        }
        ImageCommand::Push {
            name,
            file,
            format,
            kernel,
            initramfs,
            cmdline,
            uefi,
        } => {
            let spec = super::push::push(
                client.base(),
                &super::push::Files {
                    disk: file,
                    format: format.into(),
                    kernel,
                    initramfs,
                    cmdline,
                    boot: boot_of(uefi),
                },
            )
            .await?;
            done(output, &client.create(&name, &spec).await?, "pushed")
        }
        ImageCommand::List => show(output, &client.list::<ImageSpec>().await?, image_table),
        ImageCommand::Get { name } => {
            show_one(output, client.get::<ImageSpec>(&name).await?, image_table)
        }
        ImageCommand::Delete { name } => {
            done(output, &client.delete::<ImageSpec>(&name).await?, "deleted")
        }
    }
}

fn boot_of(uefi: bool) -> orchestrator::model::ImageBoot {
    if uefi {
        orchestrator::model::ImageBoot::Uefi
    } else {
        orchestrator::model::ImageBoot::Direct
    }
}

async fn volume(client: &ApiClient, cmd: VolumeCommand, output: Output) -> Result<()> {
    match cmd {
        VolumeCommand::Create { name, image, size } => {
            let spec = VolumeSpec { image, size };
            done(output, &client.create(&name, &spec).await?, "created")
        }
        VolumeCommand::List => show(output, &client.list::<VolumeSpec>().await?, volume_table),
        VolumeCommand::Get { name } => {
            show_one(output, client.get::<VolumeSpec>(&name).await?, volume_table)
        }
        VolumeCommand::Delete { name } => done(
            output,
            &client.delete::<VolumeSpec>(&name).await?,
            "deleted",
        ),
    }
}

async fn worker(client: &ApiClient, cmd: WorkerCommand, output: Output) -> Result<()> {
    let none = serde_json::json!({});
    let workers = match cmd {
        WorkerCommand::List => client.list::<WorkerSpec>().await?,
        WorkerCommand::Get { name } => vec![client.get::<WorkerSpec>(&name).await?],
        WorkerCommand::Drain {
            name,
            wait,
            timeout,
        } => {
            let w: Worker = client.action(&name, "drain", &none).await?;
            done(output, &w, "draining")?;
            if wait {
                super::groups::drained(client, &name, timeout).await?;
            }
            return Ok(());
        }
        WorkerCommand::Uncordon { name } => {
            let w: Worker = client.action(&name, "uncordon", &none).await?;
            return done(output, &w, "uncordoned");
        }
        WorkerCommand::Forget { name } => {
            let w: Worker = client.action(&name, "forget", &none).await?;
            return done(output, &w, "forgotten");
        }
    };
    if output == Output::Json {
        return print_json_list(&workers);
    }
    // What is allocated on each worker comes from the VMs placed on it.
    let vms = client.list::<VmSpec>().await?;
    print!("{}", worker_table(&workers, &vms).render());
    Ok(())
}

pub(super) fn done<S: Spec>(output: Output, obj: &Object<S>, what: &str) -> Result<()> {
    match output {
        Output::Json => print_json(obj),
        Output::Table => {
            println!("{}/{} {what}", S::KIND, obj.name());
            Ok(())
        }
    }
}

pub(super) fn show<S: Spec>(
    output: Output,
    items: &[Object<S>],
    table: fn(&[Object<S>]) -> Table,
) -> Result<()> {
    match output {
        Output::Json => print_json_list(items),
        Output::Table => {
            print!("{}", table(items).render());
            Ok(())
        }
    }
}

pub(super) fn show_one<S: Spec>(
    output: Output,
    obj: Object<S>,
    table: fn(&[Object<S>]) -> Table,
) -> Result<()> {
    match output {
        Output::Json => print_json(&obj),
        Output::Table => show(output, &[obj], table),
    }
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_json_list<T: Serialize>(items: &[T]) -> Result<()> {
    print_json(&items)
}

fn or_dash(v: Option<&str>) -> String {
    v.unwrap_or("-").to_string()
}

fn vm_table(vms: &[Vm]) -> Table {
    let mut t = Table::new(&[
        "NAME", "STATE", "WORKER", "CPUS", "MEMORY", "IMAGE", "IP", "MESSAGE",
    ]);
    for vm in vms {
        t.row(vec![
            vm.name().to_string(),
            vm.status.state.to_string(),
            or_dash(vm.status.placement.as_deref()),
            vm.spec.cpus.to_string(),
            vm.spec.memory.to_string(),
            vm.spec.image.clone(),
            or_dash(vm.status.ip.as_deref()),
            vm.status.message.clone().unwrap_or_default(),
        ]);
    }
    t
}

fn image_table(images: &[Image]) -> Table {
    let mut t = Table::new(&["NAME", "FORMAT", "SIZE", "SOURCE"]);
    for i in images {
        let source = match &i.spec.digest {
            // The first 12 hex digits say which, as container tools show them.
            Some(d) => d.chars().take("sha256:".len() + 12).collect(),
            None => i.spec.source().to_string(),
        };
        t.row(vec![
            i.name().to_string(),
            i.spec.format.as_str().to_string(),
            i.spec.size.map_or("-".to_string(), |s| s.to_string()),
            source,
        ]);
    }
    t
}

fn volume_table(volumes: &[Volume]) -> Table {
    let mut t = Table::new(&["NAME", "IMAGE", "SIZE"]);
    for v in volumes {
        t.row(vec![
            v.name().to_string(),
            v.spec.image.clone(),
            v.spec.size.to_string(),
        ]);
    }
    t
}

fn worker_table(workers: &[Worker], vms: &[Vm]) -> Table {
    #[derive(Default)]
    struct Used {
        vms: usize,
        cpus: u64,
        memory: u64,
    }
    let mut used: BTreeMap<&str, Used> = BTreeMap::new();
    for vm in vms {
        if let Some(w) = vm.status.placement.as_deref() {
            let u = used.entry(w).or_default();
            u.vms += 1;
            u.cpus += u64::from(vm.spec.cpus);
            u.memory += vm.spec.memory.bytes();
        }
    }
    let mut t = Table::new(&["NAME", "STATE", "VMS", "CPUS", "MEMORY", "LABELS"]);
    for w in workers {
        let u = used.get(w.name());
        let labels: Vec<String> = w
            .spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        t.row(vec![
            w.name().to_string(),
            w.status.state.to_string(),
            u.map_or(0, |u| u.vms).to_string(),
            format!("{}/{}", u.map_or(0, |u| u.cpus), w.spec.capacity.cpus),
            format!(
                "{}/{}",
                ByteSize(u.map_or(0, |u| u.memory)),
                w.spec.capacity.memory
            ),
            labels.join(","),
        ]);
    }
    t
}

/// The kinds of the conditions that hold, for a table column (`Available,Degraded`).
pub(super) fn held(conditions: &[orchestrator::model::Condition]) -> String {
    conditions
        .iter()
        .filter(|c| c.status)
        .map(|c| c.kind.as_str())
        .collect::<Vec<_>>()
        .join(",")
}
