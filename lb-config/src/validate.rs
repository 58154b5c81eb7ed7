//! What a configuration must satisfy before a proxy applies any of it.

use std::collections::BTreeSet;

use thiserror::Error;

use super::{BalancerConfig, HealthKind, ProxyConfig, MAX_BACKENDS, MAX_BALANCERS};

/// Shortest health-check interval: faster would be a load of its own on small backends.
const MIN_INTERVAL_MS: u64 = 100;
/// Longest health-check interval or timeout, and longest drain grace.
const MAX_MS: u64 = 3_600_000;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("not a proxy configuration: {0}")]
    Json(serde_json::Error),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl ProxyConfig {
    /// Checks every balancer; the first problem names its field (`balancers[1].listen`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.revision == 0 {
            return Err(invalid("revision", "must be at least 1"));
        }
        if self.balancers.len() > MAX_BALANCERS {
            return Err(invalid(
                "balancers",
                format!(
                    "{} balancers: at most {MAX_BALANCERS}",
                    self.balancers.len()
                ),
            ));
        }
        let mut names = BTreeSet::new();
        let mut listens = BTreeSet::new();
        for (i, b) in self.balancers.iter().enumerate() {
            let at = |f: &str| format!("balancers[{i}].{f}");
            b.validate().map_err(|e| match e {
                ConfigError::Invalid { field, message } => invalid(at(&field), message),
                e => e,
            })?;
            if !names.insert(&b.name) {
                return Err(invalid(at("name"), format!("{:?} is used twice", b.name)));
            }
            if !listens.insert(b.listen) {
                return Err(invalid(at("listen"), format!("{} is used twice", b.listen)));
            }
        }
        Ok(())
    }
}

impl BalancerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let label_ok = !self.name.is_empty()
            && self.name.len() <= 63
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !self.name.starts_with('-')
            && !self.name.ends_with('-');
        if !label_ok {
            return Err(invalid(
                "name",
                format!(
                    "{:?} is not a DNS label (a-z, 0-9, '-', 1 to 63)",
                    self.name
                ),
            ));
        }
        if self.listen.port() == 0 {
            return Err(invalid("listen", "port 0: a balancer needs a fixed port"));
        }
        if self.backends.len() > MAX_BACKENDS {
            return Err(invalid(
                "backends",
                format!("{} backends: at most {MAX_BACKENDS}", self.backends.len()),
            ));
        }
        let mut seen = BTreeSet::new();
        for (j, b) in self.backends.iter().enumerate() {
            if b.port() == 0 || b.ip().is_unspecified() {
                return Err(invalid(
                    format!("backends[{j}]"),
                    format!("{b} is not an address requests can be sent to"),
                ));
            }
            if !seen.insert(b) {
                return Err(invalid(
                    format!("backends[{j}]"),
                    format!("{b} is listed twice"),
                ));
            }
        }
        let h = &self.health;
        if !(MIN_INTERVAL_MS..=MAX_MS).contains(&h.interval_ms) {
            return Err(invalid(
                "health.interval_ms",
                format!("{} ms: from {MIN_INTERVAL_MS} to {MAX_MS}", h.interval_ms),
            ));
        }
        if h.timeout_ms == 0 || h.timeout_ms > MAX_MS {
            return Err(invalid(
                "health.timeout_ms",
                format!("{} ms: from 1 to {MAX_MS}", h.timeout_ms),
            ));
        }
        if h.kind == HealthKind::Http
            && (!h.path.starts_with('/')
                || h.path.len() > 1024
                || h.path.contains(char::is_whitespace))
        {
            return Err(invalid(
                "health.path",
                format!("{:?} is not an absolute request path", h.path),
            ));
        }
        if self.drain_grace_secs * 1000 > MAX_MS {
            return Err(invalid(
                "drain_grace_secs",
                format!("{} s: at most {} s", self.drain_grace_secs, MAX_MS / 1000),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;

    fn good() -> ProxyConfig {
        ProxyConfig {
            revision: 3,
            balancers: vec![BalancerConfig::new(
                "web",
                "0.0.0.0:8080".parse().unwrap(),
                vec![
                    "10.0.0.2:80".parse().unwrap(),
                    "10.0.0.3:80".parse().unwrap(),
                ],
            )],
        }
    }

    #[test]
    fn a_good_config_round_trips() {
        let c = good();
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(ProxyConfig::parse(&text).unwrap(), c);
        // Defaults fill what a minimal document leaves out.
        let min = ProxyConfig::parse(
            r#"{"revision":1,"balancers":[{"name":"a","listen":"127.0.0.1:81"}]}"#,
        )
        .unwrap();
        assert_eq!(min.balancers[0].health, HealthCheck::default());
        assert_eq!(min.balancers[0].drain_grace_secs, 10);
    }

    #[test]
    fn bad_configs_name_the_field() {
        type Edit = Box<dyn Fn(&mut ProxyConfig)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|c| c.revision = 0), "revision"),
            (
                Box::new(|c| c.balancers[0].name = "Web".into()),
                "balancers[0].name",
            ),
            (
                Box::new(|c| c.balancers[0].listen.set_port(0)),
                "balancers[0].listen",
            ),
            (
                Box::new(|c| c.balancers[0].backends.push("10.0.0.2:80".parse().unwrap())),
                "balancers[0].backends[2]",
            ),
            (
                Box::new(|c| c.balancers[0].backends[0] = "0.0.0.0:80".parse().unwrap()),
                "balancers[0].backends[0]",
            ),
            (
                Box::new(|c| c.balancers[0].health.interval_ms = 5),
                "balancers[0].health.interval_ms",
            ),
            (
                Box::new(|c| {
                    c.balancers[0].health.kind = HealthKind::Http;
                    c.balancers[0].health.path = "healthz".into();
                }),
                "balancers[0].health.path",
            ),
            (
                Box::new(|c| {
                    let mut b = c.balancers[0].clone();
                    b.name = "other".into();
                    c.balancers.push(b);
                }),
                "balancers[1].listen",
            ),
        ];
        for (edit, field) in cases {
            let mut c = good();
            edit(&mut c);
            match c.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        for text in [
            "",
            "{",
            r#"{"revision":1,"balancers":[{"name":"a"}]}"#,
            r#"{"revision":1,"x":1}"#,
        ] {
            assert!(
                matches!(ProxyConfig::parse(text), Err(ConfigError::Json(_))),
                "{text}"
            );
        }
    }
}
