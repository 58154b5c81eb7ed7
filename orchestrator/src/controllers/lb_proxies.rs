//! Talking to the proxies of load balancers, wherever they run: a proxy VM's guest agent (over
//! vsock, through its worker's API) or a worker's host proxy. Both get the same configuration
//! document with the same revision rules.

use std::time::Duration;

use agent_proto::{Request, Response, ServiceState};
use lb_config::{ProxyConfig, ProxyStatus};

/// The name of the document a proxy VM's guest agent keeps, and of the service it reloads.
pub const GUEST_DOCUMENT: &str = "lb.json";
pub const GUEST_SERVICE: &str = "proxy";

/// One exchange with a proxy, including a guest's service run.
const TIMEOUT: Duration = Duration::from_secs(15);

/// Where a proxy is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyAt {
    /// In VM `vm`, placed on the worker serving at `endpoint`.
    Guest { vm: String, endpoint: String },
    /// Beside the worker agent serving at `endpoint`.
    Host { worker: String, endpoint: String },
}

/// What a push came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Applied,
    /// The proxy has a newer revision: someone who read newer state pushed it.
    Stale,
    /// It refused or failed, and said why.
    Failed(String),
}

impl ProxyAt {
    pub fn name(&self) -> String {
        match self {
            ProxyAt::Guest { vm, .. } => vm.clone(),
            ProxyAt::Host { worker, .. } => format!("worker/{worker}"),
        }
    }

    /// The proxy's status (None when it cannot be asked: its worker or guest does not answer).
    pub async fn status(&self) -> Result<ProxyStatus, String> {
        match self {
            ProxyAt::Host { endpoint, .. } => {
                let url = format!("{}://{endpoint}/api/v1/proxy/status", crate::tls::scheme());
                let (code, body) =
                    crate::http::exchange(hyper::Method::GET, &url, None, TIMEOUT).await?;
                if !code.is_success() {
                    return Err(format!("{code}: {}", String::from_utf8_lossy(&body)));
                }
                serde_json::from_slice(&body).map_err(|e| e.to_string())
            }
            ProxyAt::Guest { .. } => {
                let r = self
                    .agent(Request::Status {
                        services: vec![GUEST_SERVICE.into()],
                    })
                    .await?;
                let Response::Status { services } = r else {
                    return Err(format!("unexpected answer {r:?}"));
                };
                let Some(s) = services.into_iter().next() else {
                    return Err("no service in the answer".into());
                };
                match s.state {
                    ServiceState::Running => {}
                    // Not started yet, or it died: nothing applied.
                    ServiceState::Stopped | ServiceState::Failed => return Ok(ProxyStatus::default()),
                    ServiceState::Unknown => {
                        return Err("the guest has no proxy service (is the image's init started with lbproxy=1?)".into())
                    }
                }
                let out = s.output.unwrap_or_default();
                // The status line is the last the script printed.
                let line = out.lines().last().unwrap_or_default();
                serde_json::from_str(line).map_err(|e| format!("proxy status {line:?}: {e}"))
            }
        }
    }

    pub async fn push(&self, config: &ProxyConfig) -> Pushed {
        match self {
            ProxyAt::Host { endpoint, .. } => {
                let url = format!("{}://{endpoint}/api/v1/proxy/apply", crate::tls::scheme());
                let body = serde_json::to_vec(config).expect("a configuration serializes");
                match crate::http::exchange(hyper::Method::POST, &url, Some(body), TIMEOUT).await {
                    Ok((code, _)) if code.is_success() => Pushed::Applied,
                    Ok((hyper::StatusCode::CONFLICT, _)) => Pushed::Stale,
                    Ok((code, body)) => {
                        Pushed::Failed(format!("{code}: {}", String::from_utf8_lossy(&body)))
                    }
                    Err(e) => Pushed::Failed(e),
                }
            }
            ProxyAt::Guest { .. } => {
                let request = Request::ApplyConfig {
                    name: GUEST_DOCUMENT.into(),
                    revision: config.revision,
                    content: serde_json::to_string(config).expect("a configuration serializes"),
                    service: Some(GUEST_SERVICE.into()),
                };
                match self.agent(request).await {
                    Ok(Response::Applied {
                        reload: Some(run), ..
                    }) if run.exit_code == 0 => Pushed::Applied,
                    Ok(Response::Applied { reload, .. }) => Pushed::Failed(format!(
                        "the proxy refused it: {}",
                        reload.map(|r| r.output).unwrap_or_default().trim()
                    )),
                    Ok(Response::Error {
                        kind: agent_proto::ErrorKind::StaleRevision,
                        ..
                    }) => Pushed::Stale,
                    Ok(Response::Error { message, .. }) => Pushed::Failed(message),
                    Ok(other) => Pushed::Failed(format!("{other:?}")),
                    Err(e) => Pushed::Failed(e),
                }
            }
        }
    }

    async fn agent(&self, request: Request) -> Result<Response, String> {
        let ProxyAt::Guest { vm, endpoint } = self else {
            return Err("not a guest".into());
        };
        let url = format!(
            "{}://{endpoint}/api/v1/vms/{vm}/agent",
            crate::tls::scheme()
        );
        let body = serde_json::to_vec(&request).expect("a request serializes");
        let (code, body) =
            crate::http::exchange(hyper::Method::POST, &url, Some(body), TIMEOUT).await?;
        if !code.is_success() {
            return Err(format!("{code}: {}", String::from_utf8_lossy(&body)));
        }
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    }
}
