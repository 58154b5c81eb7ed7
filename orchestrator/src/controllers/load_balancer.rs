//! The load-balancer controller: for each `LoadBalancer`, keeps its proxies (a scale group of
//! proxy VMs of its own, or every worker's host proxy) running the backends it should have,
//! and reports addresses, backend health and the revision each proxy runs.
//!
//! Backends are the target group's members (and named VMs) that are Running and not retiring
//! (a member the group let go is taken out here first, and deleted by the group only after the
//! drain grace). A configuration is stamped with the etcd revision its inputs were read at:
//! a controller that read older state (a deposed leader, a slow pass) pushes a lower revision,
//! which the proxy refuses, so a stale push never overwrites a newer one. Each pass asks every
//! proxy what it runs, so a proxy VM that restarted (revision 0) gets the configuration at once.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lb_config::{BalancerConfig, ProxyConfig, ProxyStatus};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use super::lb_proxies::{ProxyAt, Pushed};
use super::Controller;
use crate::model::{
    BackendStatus, Condition, LoadBalancer, LoadBalancerSpec, LoadBalancerStatus, Metadata, Object,
    OwnerRef, PlacementKind, Power, ProxyState, ScaleGroup, ScaleGroupSpec, Seconds,
    UpdateStrategy, Vm, VmSpec, VmState, VmTemplate, WorkerSpec, WorkerState,
};
use crate::store::{keys, Store, StoreError};

/// How often proxies are asked for backend health while load balancers exist.
const POLL: Duration = Duration::from_secs(3);
/// The label proxy VMs carry: the load balancer they serve.
pub const PROXY_LABEL: &str = "lightbyte.io/load-balancer";

/// What this leader pushed to each proxy (by name) and it applied: the revision and the
/// balancers.
type PushedMap = Mutex<HashMap<String, (u64, Vec<BalancerConfig>)>>;

#[derive(Default)]
pub struct LoadBalancers {
    pushed: Arc<PushedMap>,
    active: AtomicBool,
}

impl Controller for LoadBalancers {
    const NAME: &'static str = "load-balancers";

    fn watches(&self) -> Vec<String> {
        vec![
            keys::kind_prefix("loadbalancer"),
            keys::kind_prefix("vm"),
            keys::kind_prefix("scalegroup"),
            keys::kind_prefix("worker"),
        ]
    }

    fn wake_after(&self) -> Option<Duration> {
        self.active.load(Ordering::Relaxed).then_some(POLL)
    }

    async fn reconcile(&self, store: &Store) -> Result<(), StoreError> {
        let (lbs, _) = store.list::<LoadBalancerSpec>().await?;
        let (groups, _) = store.list::<ScaleGroupSpec>().await?;
        let (workers, _) = store.list::<WorkerSpec>().await?;
        // Read last: the revision configurations are stamped with covers every input.
        let (vms, revision) = store.list::<VmSpec>().await?;
        let revision = u64::try_from(revision).unwrap_or(0);
        self.active.store(!lbs.is_empty(), Ordering::Relaxed);
        let mut problems: BTreeMap<String, Vec<String>> = BTreeMap::new();
        proxy_groups(store, &lbs, &groups, &mut problems).await?;

        let endpoints: BTreeMap<&str, &str> = workers
            .iter()
            .filter(|w| {
                !matches!(
                    w.status.state,
                    WorkerState::Forgotten | WorkerState::NotReady
                )
            })
            .filter_map(|w| Some((w.name(), w.spec.endpoint.as_deref()?)))
            .collect();
        // Per proxy: where it is, the balancers it should run, the load balancers they serve.
        let mut plans: BTreeMap<String, Plan> = BTreeMap::new();
        let mut addresses: Vec<Vec<String>> = vec![Vec::new(); lbs.len()];
        let mut backends: Vec<Vec<(String, SocketAddr)>> = Vec::with_capacity(lbs.len());
        for (i, lb) in lbs.iter().enumerate() {
            let mine = backends_of(lb, &groups, &vms);
            let balancers = balancers_of(lb, &mine);
            backends.push(mine);
            match lb.spec.placement.kind {
                PlacementKind::Guest => {
                    for vm in proxy_vms(lb, &groups, &vms) {
                        let (Some(ip), Some(w)) = (vm_ip(vm), vm.status.placement.as_deref())
                        else {
                            continue;
                        };
                        let Some(endpoint) = endpoints.get(w) else {
                            continue;
                        };
                        for l in &lb.spec.listeners {
                            addresses[i].push(SocketAddr::new(ip, l.port).to_string());
                        }
                        let at = ProxyAt::Guest {
                            vm: vm.name().to_string(),
                            endpoint: endpoint.to_string(),
                        };
                        plans.insert(at.name(), Plan::new(at, balancers.clone(), i));
                    }
                }
                PlacementKind::Host => {
                    for (w, endpoint) in &endpoints {
                        let at = ProxyAt::Host {
                            worker: w.to_string(),
                            endpoint: endpoint.to_string(),
                        };
                        let plan = plans
                            .entry(at.name())
                            .or_insert_with(|| Plan::new(at, Vec::new(), i));
                        // One host proxy serves every host-placed load balancer: a port taken
                        // by another one is a conflict for this one.
                        let taken = balancers
                            .iter()
                            .find(|b| plan.balancers.iter().any(|x| x.listen == b.listen));
                        if let Some(b) = taken {
                            problems
                                .entry(lb.name().to_string())
                                .or_default()
                                .push(format!(
                                    "port {} is used by another host-placed load balancer",
                                    b.listen.port()
                                ));
                            continue;
                        }
                        plan.balancers.extend(balancers.iter().cloned());
                        if !plan.lbs.contains(&i) {
                            plan.lbs.push(i);
                        }
                        let host = endpoint.rsplit_once(':').map_or(*endpoint, |(h, _)| h);
                        for l in &lb.spec.listeners {
                            addresses[i].push(format!("{host}:{}", l.port));
                        }
                    }
                }
            }
        }

        // A host proxy that was given balancers of load balancers since deleted (or moved into
        // guests) gets an empty configuration.
        {
            let pushed = self.pushed.lock().await;
            for (w, endpoint) in &endpoints {
                let at = ProxyAt::Host {
                    worker: w.to_string(),
                    endpoint: endpoint.to_string(),
                };
                let had = pushed.get(&at.name()).is_some_and(|(_, b)| !b.is_empty());
                if had && !plans.contains_key(&at.name()) {
                    plans.insert(
                        at.name(),
                        Plan {
                            at,
                            balancers: Vec::new(),
                            lbs: Vec::new(),
                        },
                    );
                }
            }
        }
        // Ask every proxy, and push where it runs something else, all at once.
        let mut talks = JoinSet::new();
        for (name, plan) in plans {
            let pushed = self.pushed.clone();
            talks.spawn(async move {
                let outcome = converge(&name, &plan, revision, &pushed).await;
                (plan, outcome)
            });
        }
        let mut reports: Vec<Vec<(String, Outcome)>> = vec![Vec::new(); lbs.len()];
        let mut live = Vec::new();
        while let Some(joined) = talks.join_next().await {
            let Ok((plan, outcome)) = joined else {
                continue;
            };
            live.push(plan.at.name());
            for &i in &plan.lbs {
                reports[i].push((plan.at.name(), outcome.clone()));
            }
        }
        // Forget proxies that are gone, so that one coming back under the same name is asked
        // afresh.
        self.pushed.lock().await.retain(|n, _| live.contains(n));
        for (i, lb) in lbs.iter().enumerate() {
            let mut p = problems.remove(lb.name()).unwrap_or_default();
            let status = status_of(lb, &addresses[i], &backends[i], &reports[i], &mut p);
            write_status(store, lb, status).await?;
        }
        Ok(())
    }
}

struct Plan {
    at: ProxyAt,
    balancers: Vec<BalancerConfig>,
    lbs: Vec<usize>,
}

impl Plan {
    fn new(at: ProxyAt, balancers: Vec<BalancerConfig>, lb: usize) -> Plan {
        Plan {
            at,
            balancers,
            lbs: vec![lb],
        }
    }
}

/// What one proxy said and what was done with it.
#[derive(Clone, Debug)]
struct Outcome {
    /// Its status before any push (None: it could not be asked).
    status: Option<ProxyStatus>,
    /// The revision it runs now.
    revision: u64,
    /// Whether it runs what it should.
    current: bool,
    problem: Option<String>,
}

async fn converge(name: &str, plan: &Plan, revision: u64, pushed: &PushedMap) -> Outcome {
    let status = match plan.at.status().await {
        Ok(s) => s,
        Err(e) => {
            return Outcome {
                status: None,
                revision: 0,
                current: false,
                problem: Some(format!("proxy {name}: {e}")),
            }
        }
    };
    let known = pushed.lock().await.get(name).cloned();
    let current = known
        .as_ref()
        .is_some_and(|(r, b)| *r == status.revision && *b == plan.balancers);
    if current || status.revision >= revision {
        // It runs what this leader pushed, or what one that read newer state pushed.
        return Outcome {
            revision: status.revision,
            status: Some(status),
            current: true,
            problem: None,
        };
    }
    let config = ProxyConfig {
        revision,
        balancers: plan.balancers.clone(),
    };
    match plan.at.push(&config).await {
        Pushed::Applied => {
            tracing::info!(
                proxy = name,
                revision,
                balancers = config.balancers.len(),
                "configuration pushed"
            );
            pushed
                .lock()
                .await
                .insert(name.to_string(), (revision, config.balancers));
            Outcome {
                status: Some(status),
                revision,
                current: true,
                problem: None,
            }
        }
        Pushed::Stale => Outcome {
            revision: status.revision,
            status: Some(status),
            current: true,
            problem: None,
        },
        Pushed::Failed(why) => {
            tracing::warn!(proxy = name, revision, %why, "push refused or failed");
            Outcome {
                revision: status.revision,
                status: Some(status),
                current: false,
                problem: Some(format!("proxy {name}: {why}")),
            }
        }
    }
}

fn vm_ip(vm: &Vm) -> Option<IpAddr> {
    vm.status.ip.as_deref()?.parse().ok()
}

/// Serving: Running, meant to run, not let go by its group.
fn serving(vm: &Vm) -> bool {
    vm.status.state == VmState::Running
        && vm.spec.power == Power::Running
        && vm.status.retiring_since.is_none()
}

fn owned_by(vm: &Vm, kind: &str, uid: &str) -> bool {
    vm.metadata
        .owner
        .as_ref()
        .is_some_and(|o| o.kind == kind && o.uid == uid)
}

/// The backends of `lb`, by VM name.
fn backends_of(lb: &LoadBalancer, groups: &[ScaleGroup], vms: &[Vm]) -> Vec<(String, SocketAddr)> {
    let t = &lb.spec.target;
    let group_uid = t
        .group
        .as_deref()
        .and_then(|g| groups.iter().find(|x| x.name() == g))
        .map(|g| g.metadata.uid.as_str());
    let mut out: Vec<(String, SocketAddr)> = vms
        .iter()
        .filter(|vm| {
            group_uid.is_some_and(|u| owned_by(vm, "scalegroup", u))
                || t.vms.iter().any(|n| n == vm.name())
        })
        .filter(|vm| serving(vm))
        .filter_map(|vm| Some((vm.name().to_string(), SocketAddr::new(vm_ip(vm)?, t.port))))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The balancer name of `lb`'s listener on `port`.
fn balancer_name(lb: &str, port: u16) -> String {
    format!("{lb}-{port}")
}

fn balancers_of(lb: &LoadBalancer, backends: &[(String, SocketAddr)]) -> Vec<BalancerConfig> {
    lb.spec
        .listeners
        .iter()
        .map(|l| {
            let mut b = BalancerConfig::new(
                &balancer_name(lb.name(), l.port),
                SocketAddr::from(([0, 0, 0, 0], l.port)),
                backends.iter().map(|(_, a)| *a).collect(),
            );
            b.selection = lb.spec.selection;
            b.health = lb.spec.health.clone();
            b.drain_grace_secs = lb.spec.drain_grace.0;
            b
        })
        .collect()
}

/// The proxy VMs of a guest-placed `lb` that can take configuration.
fn proxy_vms<'a>(lb: &LoadBalancer, groups: &[ScaleGroup], vms: &'a [Vm]) -> Vec<&'a Vm> {
    let name = LoadBalancerSpec::proxy_group(lb.name());
    let Some(group) = groups
        .iter()
        .find(|g| g.name() == name && is_proxy_group_of(g, lb))
    else {
        return Vec::new();
    };
    vms.iter()
        .filter(|vm| owned_by(vm, "scalegroup", &group.metadata.uid) && serving(vm))
        .collect()
}

fn is_proxy_group_of(g: &ScaleGroup, lb: &LoadBalancer) -> bool {
    g.metadata
        .owner
        .as_ref()
        .is_some_and(|o| o.kind == "loadbalancer" && o.uid == lb.metadata.uid)
}

/// The proxy group a guest-placed load balancer should have.
fn proxy_group_spec(lb: &LoadBalancer) -> Option<ScaleGroupSpec> {
    let p = &lb.spec.placement;
    if p.kind != PlacementKind::Guest {
        return None;
    }
    Some(ScaleGroupSpec {
        replicas: p.replicas,
        template: VmTemplate {
            cpus: p.cpus,
            memory: p.memory,
            image: p.image.clone()?,
            volumes: Vec::new(),
            network: "default".into(),
            labels: [(PROXY_LABEL.to_string(), lb.name().to_string())].into(),
            cmdline: Some("lbproxy=1".into()),
        },
        update: UpdateStrategy::default(),
        replace_lost_after: Seconds(60),
    })
}

/// Creates, updates and deletes the proxy groups of guest-placed load balancers.
async fn proxy_groups(
    store: &Store,
    lbs: &[LoadBalancer],
    groups: &[ScaleGroup],
    problems: &mut BTreeMap<String, Vec<String>>,
) -> Result<(), StoreError> {
    for lb in lbs {
        let Some(spec) = proxy_group_spec(lb) else {
            continue;
        };
        let name = LoadBalancerSpec::proxy_group(lb.name());
        match groups.iter().find(|g| g.name() == name) {
            None => {
                let g = Object {
                    metadata: Metadata {
                        name: name.clone(),
                        owner: Some(OwnerRef::of(lb)),
                        ..Metadata::default()
                    },
                    spec,
                    status: Default::default(),
                };
                match store.create(g).await {
                    Ok(_) => tracing::info!(lb = lb.name(), group = %name, "proxy group created"),
                    Err(StoreError::AlreadyExists { .. }) => {}
                    Err(StoreError::Invalid(e)) => problems
                        .entry(lb.name().to_string())
                        .or_default()
                        .push(format!("its proxy group cannot be made: {e}")),
                    Err(e) => return Err(e),
                }
            }
            Some(g) if is_proxy_group_of(g, lb) => {
                if g.spec != spec {
                    let uid = g.metadata.uid.clone();
                    let r = store
                        .update_from::<ScaleGroupSpec, _>(g, |o| {
                            if o.metadata.uid == uid {
                                o.spec = spec.clone();
                            }
                            Ok(())
                        })
                        .await;
                    match r {
                        Ok(_) | Err(StoreError::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Some(_) => problems
                .entry(lb.name().to_string())
                .or_default()
                .push(format!(
                    "scale group {name} exists and is not this load balancer's proxy group"
                )),
        }
    }
    for g in groups {
        let Some(owner) = g
            .metadata
            .owner
            .as_ref()
            .filter(|o| o.kind == "loadbalancer")
        else {
            continue;
        };
        let wanted = lbs.iter().any(|lb| {
            lb.metadata.uid == owner.uid && lb.spec.placement.kind == PlacementKind::Guest
        });
        if !wanted {
            tracing::info!(
                group = g.name(),
                "its load balancer is gone or runs on hosts; deleting"
            );
            match store
                .delete::<ScaleGroupSpec>(g.name(), Some(g.metadata.resource_version))
                .await
            {
                Ok(_) | Err(StoreError::NotFound { .. }) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

fn status_of(
    lb: &LoadBalancer,
    addresses: &[String],
    backends: &[(String, SocketAddr)],
    reports: &[(String, Outcome)],
    problems: &mut Vec<String>,
) -> LoadBalancerStatus {
    let prefix = format!("{}-", lb.name());
    let mut health: HashMap<SocketAddr, bool> = HashMap::new();
    for (_, o) in reports {
        let Some(s) = &o.status else { continue };
        for b in s.balancers.iter().filter(|b| b.name.starts_with(&prefix)) {
            for h in &b.backends {
                let e = health.entry(h.address).or_insert(true);
                *e = *e && h.healthy;
            }
        }
    }
    let mut proxies: Vec<ProxyState> = reports
        .iter()
        .map(|(name, o)| ProxyState {
            name: name.clone(),
            revision: o.revision,
            current: o.current,
        })
        .collect();
    proxies.sort_by(|a, b| a.name.cmp(&b.name));
    problems.extend(reports.iter().filter_map(|(_, o)| o.problem.clone()));
    let current = reports.iter().filter(|(_, o)| o.current).count();
    let mut conditions = vec![Condition {
        kind: "Available".into(),
        status: current > 0,
        message: format!(
            "{current} of {} proxies run the current backends ({} backends)",
            reports.len(),
            backends.len()
        ),
    }];
    if !problems.is_empty() {
        conditions.push(Condition {
            kind: "Degraded".into(),
            status: true,
            message: problems.join("; "),
        });
    }
    let mut addresses = addresses.to_vec();
    addresses.sort();
    LoadBalancerStatus {
        addresses,
        backends: backends
            .iter()
            .map(|(vm, a)| BackendStatus {
                vm: vm.clone(),
                address: a.to_string(),
                healthy: health.get(a).copied(),
            })
            .collect(),
        revision: reports.iter().map(|(_, o)| o.revision).max().unwrap_or(0),
        proxies,
        conditions,
    }
}

async fn write_status(
    store: &Store,
    lb: &LoadBalancer,
    want: LoadBalancerStatus,
) -> Result<(), StoreError> {
    if want == lb.status {
        return Ok(());
    }
    let uid = lb.metadata.uid.clone();
    let r = store
        .update_from::<LoadBalancerSpec, _>(lb, |o| {
            if o.metadata.uid == uid {
                o.status = want.clone();
            }
            Ok(())
        })
        .await;
    match r {
        Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}
