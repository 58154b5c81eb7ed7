//! `LoadBalancer`: an HTTP load balancer in front of a scale group (or a list of VMs), run by
//! `lightbyte-proxy` either in a small scale group of proxy VMs of its own (`guest`, the
//! default: configured over vsock through the guest agent) or beside every worker agent
//! (`host`). The load-balancer controller computes the backends and pushes them.

use serde::{Deserialize, Serialize};

use super::validate::{dns_label, FieldError};
use super::{ByteSize, Condition, Reference, Seconds, Spec};

pub use lb_config::{HealthCheck, HealthKind, Selection};

/// Most listeners of one load balancer.
pub const MAX_LISTENERS: usize = 16;
/// Most proxy VMs of a guest-placed load balancer.
pub const MAX_PROXIES: u32 = 16;
/// The proxy group of load balancer `lb` is `<lb>-proxy`.
pub const PROXY_GROUP_SUFFIX: &str = "-proxy";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancerSpec {
    /// The ports it accepts HTTP on.
    pub listeners: Vec<Listener>,
    pub target: Target,
    #[serde(default)]
    pub health: HealthCheck,
    #[serde(default)]
    pub selection: Selection,
    /// How long requests a removed backend is serving may take to finish: a member leaving the
    /// target group is taken out of the proxies first and stopped this long after.
    #[serde(default = "default_drain_grace")]
    pub drain_grace: Seconds,
    #[serde(default)]
    pub placement: Placement,
}

fn default_drain_grace() -> Seconds {
    Seconds(10)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub port: u16,
}

/// Where requests go: the Running members of a scale group and/or named VMs, on `port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<String>,
    pub port: u16,
}

/// Where the proxy runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default)]
    pub kind: PlacementKind,
    /// `guest`: the image of the proxy VMs (its init starts `lightbyte-proxy` when the kernel
    /// command line says `lbproxy=1`, and the guest agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `guest`: how many proxy VMs (spread across workers like any scale group).
    #[serde(default = "default_proxies")]
    pub replicas: u32,
    #[serde(default = "default_proxy_cpus")]
    pub cpus: u32,
    #[serde(default = "default_proxy_memory")]
    pub memory: ByteSize,
}

impl Default for Placement {
    fn default() -> Placement {
        Placement {
            kind: PlacementKind::default(),
            image: None,
            replicas: default_proxies(),
            cpus: default_proxy_cpus(),
            memory: default_proxy_memory(),
        }
    }
}

fn default_proxies() -> u32 {
    2
}

fn default_proxy_cpus() -> u32 {
    1
}

fn default_proxy_memory() -> ByteSize {
    ByteSize(128 << 20)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementKind {
    #[default]
    Guest,
    Host,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancerStatus {
    /// Where clients connect: `IP:PORT` per proxy and listener.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The backends pushed, with what the proxies' health checks say.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendStatus>,
    /// The revision of the configuration last pushed.
    #[serde(default)]
    pub revision: u64,
    /// Each proxy and the revision it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxies: Vec<ProxyState>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendStatus {
    pub vm: String,
    pub address: String,
    /// Healthy in every proxy that reported (None: no proxy reported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyState {
    /// The proxy VM, or `worker/<name>` for host placement.
    pub name: String,
    /// The revision it reported (0: none applied).
    pub revision: u64,
    /// Whether it runs the backends it should (proxies that needed no push keep an older
    /// revision).
    #[serde(default)]
    pub current: bool,
}

impl LoadBalancerSpec {
    /// The proxy group of a guest-placed load balancer named `name`.
    pub fn proxy_group(name: &str) -> String {
        format!("{name}{PROXY_GROUP_SUFFIX}")
    }
}

impl Spec for LoadBalancerSpec {
    type Status = LoadBalancerStatus;
    const KIND: &'static str = "loadbalancer";
    const PLURAL: &'static str = "loadbalancers";

    fn validate(&self) -> Result<(), FieldError> {
        if self.listeners.is_empty() || self.listeners.len() > MAX_LISTENERS {
            return Err(FieldError::new(
                "spec.listeners",
                format!(
                    "{} listeners: from 1 to {MAX_LISTENERS}",
                    self.listeners.len()
                ),
            ));
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.port == 0 {
                return Err(FieldError::new(
                    format!("spec.listeners[{i}].port"),
                    "must not be 0",
                ));
            }
            if self.listeners[..i].contains(l) {
                return Err(FieldError::new(
                    format!("spec.listeners[{i}].port"),
                    format!("{} is listed twice", l.port),
                ));
            }
        }
        let t = &self.target;
        if t.group.is_none() && t.vms.is_empty() {
            return Err(FieldError::new(
                "spec.target",
                "names no backends: give a scale group, VMs, or both",
            ));
        }
        if let Some(g) = &t.group {
            dns_label("spec.target.group", g)?;
        }
        for (i, vm) in t.vms.iter().enumerate() {
            dns_label(&format!("spec.target.vms[{i}]"), vm)?;
        }
        if t.port == 0 {
            return Err(FieldError::new("spec.target.port", "must not be 0"));
        }
        // The proxy's own rules, on a balancer made from this spec.
        let mut b = lb_config::BalancerConfig::new(
            "lb",
            std::net::SocketAddr::from(([0, 0, 0, 0], self.listeners[0].port)),
            Vec::new(),
        );
        b.health = self.health.clone();
        b.drain_grace_secs = self.drain_grace.0;
        lb_config::ProxyConfig {
            revision: 1,
            balancers: vec![b],
        }
        .validate()
        .map_err(|e| match e {
            lb_config::ConfigError::Invalid { field, message } => FieldError::new(
                field
                    .replace("balancers[0].health", "spec.health")
                    .replace("balancers[0].drain_grace_secs", "spec.drain_grace"),
                message,
            ),
            other => FieldError::new("spec", other.to_string()),
        })?;
        let p = &self.placement;
        match p.kind {
            PlacementKind::Guest => {
                let Some(image) = &p.image else {
                    return Err(FieldError::new(
                        "spec.placement.image",
                        "guest placement needs the image of its proxy VMs",
                    ));
                };
                dns_label("spec.placement.image", image)?;
                if p.replicas == 0 || p.replicas > MAX_PROXIES {
                    return Err(FieldError::new(
                        "spec.placement.replicas",
                        format!("{} proxy VMs: from 1 to {MAX_PROXIES}", p.replicas),
                    ));
                }
            }
            PlacementKind::Host => {
                if p.image.is_some() {
                    return Err(FieldError::new(
                        "spec.placement.image",
                        "host placement runs no proxy VMs: no image",
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_name(&self, name: &str) -> Result<(), FieldError> {
        // Its proxy group's members are `<name>-proxy-<suffix>`.
        let longest = name.len() + PROXY_GROUP_SUFFIX.len() + 1 + super::SUFFIX_LEN;
        if self.placement.kind == PlacementKind::Guest && longest > super::validate::MAX_NAME_LEN {
            return Err(FieldError::new(
                "metadata.name",
                format!(
                    "{name:?} is too long: its proxy VMs are named <name>-proxy-<5 characters>"
                ),
            ));
        }
        Ok(())
    }

    fn references(&self) -> Vec<Reference> {
        let mut refs = Vec::new();
        if let Some(g) = &self.target.group {
            refs.push(Reference {
                field: "spec.target.group".into(),
                kind: "scalegroup",
                name: g.clone(),
            });
        }
        if let Some(image) = &self.placement.image {
            refs.push(Reference {
                field: "spec.placement.image".into(),
                kind: "image",
                name: image.clone(),
            });
        }
        refs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LoadBalancerSpec {
        serde_json::from_str(
            r#"{"listeners":[{"port":80}],"target":{"group":"web","port":8080},
                "placement":{"image":"proxy"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn defaults() {
        let s = spec();
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.placement.kind, PlacementKind::Guest);
        assert_eq!(s.placement.replicas, 2);
        assert_eq!(s.drain_grace, Seconds(10));
        assert_eq!(s.health, HealthCheck::default());
        assert_eq!(s.references().len(), 2);
    }

    #[test]
    fn bad_specs_name_the_field() {
        type Edit = Box<dyn Fn(&mut LoadBalancerSpec)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|s| s.listeners.clear()), "spec.listeners"),
            (
                Box::new(|s| s.listeners.push(Listener { port: 80 })),
                "spec.listeners[1].port",
            ),
            (Box::new(|s| s.target.group = None), "spec.target"),
            (Box::new(|s| s.target.port = 0), "spec.target.port"),
            (
                Box::new(|s| s.target.vms.push("Bad".into())),
                "spec.target.vms[0]",
            ),
            (
                Box::new(|s| s.health.interval_ms = 1),
                "spec.health.interval_ms",
            ),
            (
                Box::new(|s| s.placement.image = None),
                "spec.placement.image",
            ),
            (
                Box::new(|s| s.placement.replicas = 0),
                "spec.placement.replicas",
            ),
            (
                Box::new(|s| s.placement.kind = PlacementKind::Host),
                "spec.placement.image",
            ),
        ];
        for (edit, field) in cases {
            let mut s = spec();
            edit(&mut s);
            assert_eq!(s.validate().map_err(|e| e.field), Err(field.to_string()));
        }
        assert!(spec().validate_name(&"a".repeat(51)).is_ok());
        assert!(spec().validate_name(&"a".repeat(52)).is_err());
    }
}
