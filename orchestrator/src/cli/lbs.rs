//! `lightbyte lb create|list|get|delete`.

use std::time::Duration;

use anyhow::Result;

use super::commands::{done, show};
use super::table::Table;
use super::{LbCommand, Output};
use orchestrator::client::ApiClient;
use orchestrator::model::{
    HealthCheck, HealthKind, Listener, LoadBalancer, LoadBalancerSpec, Placement, PlacementKind,
    Selection, Target,
};

pub async fn run(client: &ApiClient, cmd: LbCommand, output: Output) -> Result<()> {
    match cmd {
        LbCommand::Create {
            name,
            ports,
            group,
            vms,
            target_port,
            health,
            health_path,
            health_interval,
            health_timeout,
            selection,
            drain_grace,
            placement,
            image,
            proxies,
            proxy_memory,
            wait,
            timeout,
        } => {
            let spec = LoadBalancerSpec {
                listeners: ports.into_iter().map(|port| Listener { port }).collect(),
                target: Target {
                    group,
                    vms,
                    port: target_port,
                },
                health: HealthCheck {
                    kind: if health == "http" {
                        HealthKind::Http
                    } else {
                        HealthKind::Tcp
                    },
                    path: health_path,
                    interval_ms: health_interval.as_millis() as u64,
                    timeout_ms: health_timeout.as_millis() as u64,
                },
                selection: if selection == "consistent" {
                    Selection::Consistent
                } else {
                    Selection::RoundRobin
                },
                drain_grace,
                placement: Placement {
                    kind: if placement == "host" {
                        PlacementKind::Host
                    } else {
                        PlacementKind::Guest
                    },
                    image,
                    replicas: proxies,
                    memory: proxy_memory,
                    ..Placement::default()
                },
            };
            let lb = client.create(&name, &spec).await?;
            done(output, &lb, "created")?;
            if wait {
                serving(client, &name, timeout).await?;
            }
            Ok(())
        }
        LbCommand::List => show(output, &client.list::<LoadBalancerSpec>().await?, table),
        LbCommand::Get { name } => {
            let lb = client.get::<LoadBalancerSpec>(&name).await?;
            match output {
                Output::Json => show(output, std::slice::from_ref(&lb), table),
                Output::Table => {
                    print!("{}", table(std::slice::from_ref(&lb)).render());
                    println!();
                    print!("{}", backends(&lb).render());
                    if !lb.status.proxies.is_empty() {
                        println!();
                        let mut t = Table::new(&["PROXY", "REVISION", "CURRENT"]);
                        for p in &lb.status.proxies {
                            t.row(vec![
                                p.name.clone(),
                                p.revision.to_string(),
                                if p.current { "yes" } else { "no" }.into(),
                            ]);
                        }
                        print!("{}", t.render());
                    }
                    for c in lb.status.conditions.iter().filter(|c| c.kind == "Degraded") {
                        println!("\nDegraded: {}", c.message);
                    }
                    Ok(())
                }
            }
        }
        LbCommand::Delete { name } => {
            let lb: LoadBalancer = client.delete(&name).await?;
            done(output, &lb, "deleted")
        }
    }
}

/// Serving: every proxy there (all proxy VMs of a guest-placed one) and running the backends
/// it should, every backend healthy in them, nothing degraded.
fn ready(lb: &LoadBalancer) -> bool {
    let s = &lb.status;
    let proxies_there = match lb.spec.placement.kind {
        PlacementKind::Guest => s.proxies.len() as u32 >= lb.spec.placement.replicas,
        PlacementKind::Host => !s.proxies.is_empty(),
    };
    proxies_there
        && s.proxies.iter().all(|p| p.current)
        && !s.addresses.is_empty()
        && !s.backends.is_empty()
        && s.backends.iter().all(|b| b.healthy == Some(true))
        && s.conditions
            .iter()
            .any(|c| c.kind == "Available" && c.status)
        && !s
            .conditions
            .iter()
            .any(|c| c.kind == "Degraded" && c.status)
}

fn progress(lb: &LoadBalancer) -> String {
    let s = &lb.status;
    let healthy = s
        .backends
        .iter()
        .filter(|b| b.healthy == Some(true))
        .count();
    let mut line = format!(
        "{}: {} addresses, {healthy} of {} backends healthy, revision {}",
        lb.name(),
        s.addresses.len(),
        s.backends.len(),
        s.revision
    );
    for c in s.conditions.iter().filter(|c| c.status) {
        line.push_str(&format!("; {}: {}", c.kind, c.message));
    }
    line
}

async fn serving(client: &ApiClient, name: &str, timeout: Duration) -> Result<()> {
    super::groups::poll(timeout, || async {
        let lb = client.get::<LoadBalancerSpec>(name).await?;
        Ok((progress(&lb), ready(&lb)))
    })
    .await
}

fn table(lbs: &[LoadBalancer]) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "PLACEMENT",
        "TARGET",
        "ADDRESSES",
        "HEALTHY",
        "REVISION",
        "CONDITIONS",
    ]);
    for lb in lbs {
        let s = &lb.status;
        let target = match (&lb.spec.target.group, lb.spec.target.vms.len()) {
            (Some(g), 0) => format!("{g}:{}", lb.spec.target.port),
            (Some(g), n) => format!("{g}+{n} vms:{}", lb.spec.target.port),
            (None, n) => format!("{n} vms:{}", lb.spec.target.port),
        };
        t.row(vec![
            lb.name().to_string(),
            format!("{:?}", lb.spec.placement.kind).to_lowercase(),
            target,
            if s.addresses.is_empty() {
                "-".into()
            } else {
                s.addresses.join(",")
            },
            format!(
                "{}/{}",
                s.backends
                    .iter()
                    .filter(|b| b.healthy == Some(true))
                    .count(),
                s.backends.len()
            ),
            s.revision.to_string(),
            super::commands::held(&s.conditions),
        ]);
    }
    t
}

fn backends(lb: &LoadBalancer) -> Table {
    let mut t = Table::new(&["BACKEND", "ADDRESS", "HEALTH"]);
    for b in &lb.status.backends {
        t.row(vec![
            b.vm.clone(),
            b.address.clone(),
            match b.healthy {
                Some(true) => "healthy".into(),
                Some(false) => "unhealthy".into(),
                None => "unknown".into(),
            },
        ]);
    }
    t
}
