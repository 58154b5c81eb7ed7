//! `lightbyte scale-group ...` and the waits with progress that `--wait` adds to it and to
//! `worker drain`.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::commands::{done, show, show_one};
use super::table::Table;
use super::{Output, ScaleGroupCommand, TemplateArgs, WaitArgs};
use orchestrator::api::ScaleRequest;
use orchestrator::client::{ApiClient, ClientError};
use orchestrator::model::{
    ScaleGroup, ScaleGroupSpec, UpdateStrategy, VmSpec, VmTemplate, VolumeTemplate, WorkerSpec,
    WorkerState,
};

const POLL: Duration = Duration::from_millis(500);

pub async fn run(client: &ApiClient, cmd: ScaleGroupCommand, output: Output) -> Result<()> {
    match cmd {
        ScaleGroupCommand::Create {
            name,
            replicas,
            template,
            max_surge,
            max_unavailable,
            replace_lost_after,
            wait,
        } => {
            let spec = ScaleGroupSpec {
                replicas,
                template: template_of(template),
                update: UpdateStrategy {
                    max_surge,
                    max_unavailable,
                },
                replace_lost_after,
            };
            let g = client.create(&name, &spec).await?;
            done(output, &g, "created")?;
            settle(client, &name, wait).await
        }
        ScaleGroupCommand::List => show(output, &client.list::<ScaleGroupSpec>().await?, table),
        ScaleGroupCommand::Get { name } => {
            show_one(output, client.get::<ScaleGroupSpec>(&name).await?, table)
        }
        ScaleGroupCommand::Scale {
            name,
            replicas,
            wait,
        } => {
            let g: ScaleGroup = client
                .action(&name, "scale", &ScaleRequest { replicas })
                .await?;
            done(output, &g, &format!("scaled to {replicas}"))?;
            settle(client, &name, wait).await
        }
        ScaleGroupCommand::Update {
            name,
            image,
            cpus,
            memory,
            cmdline,
            labels,
            wait,
        } => {
            let mut g = client.get::<ScaleGroupSpec>(&name).await?;
            let t = &mut g.spec.template;
            if let Some(v) = image {
                t.image = v;
            }
            if let Some(v) = cpus {
                t.cpus = v;
            }
            if let Some(v) = memory {
                t.memory = v;
            }
            if let Some(v) = cmdline {
                t.cmdline = (!v.is_empty()).then_some(v);
            }
            t.labels.extend(labels);
            let g = client.replace(&g).await?;
            done(output, &g, "updated")?;
            settle(client, &name, wait).await
        }
        ScaleGroupCommand::Delete { name, wait } => {
            let g: ScaleGroup = client.delete(&name).await?;
            done(output, &g, "deleted")?;
            if wait.wait {
                members_gone(client, &g, wait.timeout).await?;
            }
            Ok(())
        }
    }
}

fn template_of(t: TemplateArgs) -> VmTemplate {
    VmTemplate {
        cpus: t.cpus,
        memory: t.memory,
        image: t.image,
        volumes: t
            .volumes
            .into_iter()
            .map(|(name, size)| VolumeTemplate {
                name,
                size,
                image: None,
            })
            .collect(),
        network: t.network,
        labels: t.labels.into_iter().collect(),
        cmdline: t.cmdline,
    }
}

/// Whether the group has exactly what its spec asks for, as its controller last counted.
fn settled(g: &ScaleGroup) -> bool {
    let s = &g.status;
    s.observed_generation == g.metadata.generation
        && s.desired == g.spec.replicas
        && s.members == g.spec.replicas
        && s.ready == g.spec.replicas
        && s.updated == g.spec.replicas
}

fn progress(g: &ScaleGroup) -> String {
    let s = &g.status;
    let mut line = format!(
        "{}: {} of {} ready, {} from the current template, {} members",
        g.name(),
        s.ready,
        g.spec.replicas,
        s.updated,
        s.members
    );
    if let Some(c) = s.conditions.iter().find(|c| c.kind == "Degraded") {
        line.push_str(&format!(" ({})", c.message));
    }
    line
}

/// With `--wait`, polls the group until it is settled, printing its progress when it changes.
async fn settle(client: &ApiClient, name: &str, wait: WaitArgs) -> Result<()> {
    if !wait.wait {
        return Ok(());
    }
    poll(wait.timeout, || async {
        let g = client.get::<ScaleGroupSpec>(name).await?;
        Ok((progress(&g), settled(&g)))
    })
    .await
}

/// Calls `step` until it says done, printing its progress line when it changes; fails after
/// `timeout` with the last line.
pub(super) async fn poll<F, Fut>(timeout: Duration, mut step: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(String, bool)>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let Some((line, done)) = retry_transient(step().await, deadline)? else {
            tokio::time::sleep(POLL).await;
            continue;
        };
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        if done {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?}: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A waiting loop's step result: a transient failure of the control plane (etcd unavailable,
/// no answer in time) is said once per occurrence and gives `None` (try again) until
/// `deadline`; anything else stands.
pub(super) fn retry_transient<T>(
    step: Result<T>,
    deadline: tokio::time::Instant,
) -> Result<Option<T>> {
    match step {
        Ok(v) => Ok(Some(v)),
        Err(e)
            if tokio::time::Instant::now() < deadline
                && e.chain().any(|c| {
                    c.downcast_ref::<ClientError>()
                        .is_some_and(ClientError::is_transient)
                }) =>
        {
            eprintln!("({e:#}; retrying)");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Waits until no VM the deleted group owned is left.
async fn members_gone(client: &ApiClient, g: &ScaleGroup, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = usize::MAX;
    loop {
        let Some(vms) =
            retry_transient(client.list::<VmSpec>().await.map_err(Into::into), deadline)?
        else {
            tokio::time::sleep(POLL).await;
            continue;
        };
        let left = vms
            .into_iter()
            .filter(|vm| {
                vm.metadata
                    .owner
                    .as_ref()
                    .is_some_and(|o| o.uid == g.metadata.uid)
            })
            .count();
        if left != last {
            eprintln!("{}: {left} members left", g.name());
            last = left;
        }
        if left == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?}: {left} members of {} left",
                g.name()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `worker drain --wait`: until the worker is Drained, showing what is still on it.
pub async fn drained(client: &ApiClient, name: &str, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let step = async {
            let w = client
                .get::<WorkerSpec>(name)
                .await
                .with_context(|| format!("worker {name}"))?;
            let vms = client.list::<VmSpec>().await?;
            anyhow::Ok((w, vms))
        };
        let Some((w, vms)) = retry_transient(step.await, deadline)? else {
            tokio::time::sleep(POLL).await;
            continue;
        };
        if w.status.state == WorkerState::Drained {
            eprintln!("{name}: Drained");
            return Ok(());
        }
        if !w.spec.drain {
            bail!("worker {name} is no longer draining (uncordoned?)");
        }
        let on: Vec<String> = vms
            .iter()
            .filter(|vm| {
                vm.status.placement.as_deref() == Some(name)
                    || vm.status.moving.as_ref().is_some_and(|m| m.from == name)
            })
            .map(|vm| match &vm.status.moving {
                Some(m) => format!("{} (moving to {}: {:?})", vm.name(), m.to, m.phase),
                None => format!("{} ({})", vm.name(), vm.status.state),
            })
            .collect();
        let line = format!(
            "{name}: {}; {} VMs left: {}",
            w.status.state,
            on.len(),
            on.join(", ")
        );
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?}: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

fn table(groups: &[ScaleGroup]) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "REPLICAS",
        "READY",
        "UPDATED",
        "MEMBERS",
        "IMAGE",
        "CPUS",
        "MEMORY",
        "CONDITIONS",
    ]);
    for g in groups {
        t.row(vec![
            g.name().to_string(),
            g.spec.replicas.to_string(),
            g.status.ready.to_string(),
            g.status.updated.to_string(),
            g.status.members.to_string(),
            g.spec.template.image.clone(),
            g.spec.template.cpus.to_string(),
            g.spec.template.memory.to_string(),
            super::commands::held(&g.status.conditions),
        ]);
    }
    t
}
