//! `ScaleGroup`: N identical VMs made from one template, spread across workers, replaced when
//! they fail or when the template changes (rolling, surge first).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::validate::{dns_label, label, FieldError, MAX_NAME_LEN};
use super::vm::check_cmdline;
use super::{ByteSize, Power, Reference, Seconds, Spec, VmSpec, VolumeSpec};

/// More members than this in one group is a typo (and would not fit the workers we plan for).
pub const MAX_REPLICAS: u32 = 10_000;
/// Members are `<group>-<SUFFIX_LEN random characters>`.
pub const SUFFIX_LEN: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleGroupSpec {
    pub replicas: u32,
    pub template: VmTemplate,
    #[serde(default)]
    pub update: UpdateStrategy,
    /// How long a member may stay Lost (its worker stopped heartbeating) before it is replaced
    /// elsewhere. Only members without volumes are replaced: a volume's data is on that worker.
    #[serde(default = "default_replace_lost_after")]
    pub replace_lost_after: Seconds,
}

fn default_replace_lost_after() -> Seconds {
    Seconds(60)
}

/// What every member is made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmTemplate {
    pub cpus: u32,
    pub memory: ByteSize,
    pub image: String,
    /// Volumes every member gets its own of, named `<member>-<name>`, deleted with the member.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeTemplate>,
    #[serde(default = "default_network")]
    pub network: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

fn default_network() -> String {
    "default".to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeTemplate {
    pub name: String,
    pub size: ByteSize,
    /// The image the volume overlays [default: the template's image].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// How a template change rolls out: members are replaced one by one, keeping at most
/// `replicas + max_surge` members and at least `replicas - max_unavailable` ready ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateStrategy {
    #[serde(default = "one")]
    pub max_surge: u32,
    #[serde(default)]
    pub max_unavailable: u32,
}

fn one() -> u32 {
    1
}

impl Default for UpdateStrategy {
    fn default() -> UpdateStrategy {
        UpdateStrategy {
            max_surge: 1,
            max_unavailable: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleGroupStatus {
    /// The generation of the spec these counts were made against.
    #[serde(default)]
    pub observed_generation: i64,
    /// `spec.replicas` as last seen.
    #[serde(default)]
    pub desired: u32,
    /// Members that exist (any state).
    #[serde(default)]
    pub members: u32,
    /// Members Running.
    #[serde(default)]
    pub ready: u32,
    /// Members made from the current template and not on a draining worker.
    #[serde(default)]
    pub updated: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One observation about the group: `Available` (ready ≥ desired), `Progressing` (members are
/// being made, replaced or removed), `Degraded` (something needs an operator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub kind: String,
    pub status: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl VmTemplate {
    /// The spec of member `member` of group `group`.
    pub fn member_spec(&self, group: &str, member: &str) -> VmSpec {
        VmSpec {
            cpus: self.cpus,
            memory: self.memory,
            image: self.image.clone(),
            volumes: self
                .volumes
                .iter()
                .map(|v| member_volume(member, &v.name))
                .collect(),
            network: self.network.clone(),
            group: Some(group.to_string()),
            labels: self.labels.clone(),
            cmdline: self.cmdline.clone(),
            power: Power::Running,
        }
    }
}

fn member_volume(member: &str, volume: &str) -> String {
    format!("{member}-{volume}")
}

/// The volumes member `member` gets from `template`, by name.
pub fn member_volumes(template: &VmTemplate, member: &str) -> Vec<(String, VolumeSpec)> {
    template
        .volumes
        .iter()
        .map(|v| {
            let spec = VolumeSpec {
                image: v.image.clone().unwrap_or_else(|| template.image.clone()),
                size: v.size,
            };
            (member_volume(member, &v.name), spec)
        })
        .collect()
}

impl Spec for ScaleGroupSpec {
    type Status = ScaleGroupStatus;
    const KIND: &'static str = "scalegroup";
    const PLURAL: &'static str = "scalegroups";

    fn validate(&self) -> Result<(), FieldError> {
        if self.replicas > MAX_REPLICAS {
            return Err(FieldError::new(
                "spec.replicas",
                format!("{} is out of range 0..={MAX_REPLICAS}", self.replicas),
            ));
        }
        if self.update.max_surge == 0 && self.update.max_unavailable == 0 {
            return Err(FieldError::new(
                "spec.update",
                "max_surge and max_unavailable cannot both be 0: no member could be replaced",
            ));
        }
        let t = &self.template;
        let mut seen = BTreeSet::new();
        for (i, v) in t.volumes.iter().enumerate() {
            let field = format!("spec.template.volumes[{i}]");
            dns_label(&format!("{field}.name"), &v.name)?;
            if !seen.insert(&v.name) {
                return Err(FieldError::new(
                    format!("{field}.name"),
                    format!("{:?} is listed twice", v.name),
                ));
            }
            if let Some(img) = &v.image {
                dns_label(&format!("{field}.image"), img)?;
            }
            let spec = VolumeSpec {
                image: v.image.clone().unwrap_or_else(|| t.image.clone()),
                size: v.size,
            };
            spec.validate().map_err(|e| {
                FieldError::new(e.field.replace("spec.", &format!("{field}.")), e.message)
            })?;
        }
        for (k, v) in &t.labels {
            label(&format!("spec.template.labels.{k}"), k, true)?;
            label(&format!("spec.template.labels.{k}"), v, false)?;
        }
        if let Some(c) = &t.cmdline {
            check_cmdline("spec.template.cmdline", c)?;
        }
        // A member made from the template must itself be valid: same checks, template paths.
        t.member_spec("g", "g-aaaaa")
            .validate()
            .map_err(|e| FieldError::new(e.field.replacen("spec.", "spec.template.", 1), e.message))
    }

    fn validate_name(&self, name: &str) -> Result<(), FieldError> {
        check_group_name(name, self)
    }

    fn references(&self) -> Vec<Reference> {
        let t = &self.template;
        let image = Reference {
            field: "spec.template.image".into(),
            kind: "image",
            name: t.image.clone(),
        };
        let volume_images = t.volumes.iter().enumerate().filter_map(|(i, v)| {
            Some(Reference {
                field: format!("spec.template.volumes[{i}].image"),
                kind: "image",
                name: v.image.clone()?,
            })
        });
        std::iter::once(image).chain(volume_images).collect()
    }
}

/// Checks that a group's name leaves room for its members' and their volumes' names.
fn check_group_name(name: &str, spec: &ScaleGroupSpec) -> Result<(), FieldError> {
    let member = name.len() + 1 + SUFFIX_LEN;
    if member > MAX_NAME_LEN {
        return Err(FieldError::new(
            "metadata.name",
            format!(
                "{name:?} is too long for a scale group: members are named <group>-<{SUFFIX_LEN} characters>, at most {MAX_NAME_LEN} in all"
            ),
        ));
    }
    for (i, v) in spec.template.volumes.iter().enumerate() {
        if member + 1 + v.name.len() > MAX_NAME_LEN {
            return Err(FieldError::new(
                format!("spec.template.volumes[{i}].name"),
                format!(
                    "{:?} is too long: member volumes are named <member>-<name>, at most {MAX_NAME_LEN} characters",
                    v.name
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ScaleGroupSpec {
        serde_json::from_str(
            r#"{"replicas":3,"template":{"cpus":1,"memory":"128M","image":"base",
                "volumes":[{"name":"data","size":"1G"}],"labels":{"app":"web"}}}"#,
        )
        .unwrap()
    }

    #[test]
    fn defaults_and_member_specs() {
        let s = spec();
        assert_eq!(s.update, UpdateStrategy::default());
        assert_eq!(s.replace_lost_after, Seconds(60));
        assert_eq!(s.validate(), Ok(()));
        let m = s.template.member_spec("web", "web-x1y2z");
        assert_eq!(m.volumes, ["web-x1y2z-data"]);
        assert_eq!(m.group.as_deref(), Some("web"));
        assert_eq!(m.labels["app"], "web");
        let vols = member_volumes(&s.template, "web-x1y2z");
        assert_eq!(vols[0].0, "web-x1y2z-data");
        assert_eq!(vols[0].1.image, "base");
    }

    #[test]
    fn bad_specs_name_the_field() {
        let mut s = spec();
        s.replicas = MAX_REPLICAS + 1;
        assert_eq!(s.validate().unwrap_err().field, "spec.replicas");
        let mut s = spec();
        s.template.cpus = 0;
        assert_eq!(s.validate().unwrap_err().field, "spec.template.cpus");
        let mut s = spec();
        s.template.volumes[0].size = ByteSize(1);
        assert_eq!(
            s.validate().unwrap_err().field,
            "spec.template.volumes[0].size"
        );
        let mut s = spec();
        s.update.max_surge = 0;
        assert_eq!(s.validate().unwrap_err().field, "spec.update");
        let r: Result<ScaleGroupSpec, _> = serde_json::from_str(
            r#"{"replicas":-1,"template":{"cpus":1,"memory":"128M","image":"base"}}"#,
        );
        assert!(r.is_err());
        let s = spec();
        assert!(check_group_name(
            &"a".repeat(57),
            &ScaleGroupSpec {
                template: VmTemplate {
                    volumes: vec![],
                    ..s.template.clone()
                },
                ..s.clone()
            }
        )
        .is_ok());
        assert!(check_group_name(&"a".repeat(58), &s).is_err());
        assert_eq!(
            check_group_name(&"a".repeat(53), &s).unwrap_err().field,
            "spec.template.volumes[0].name"
        );
    }
}
