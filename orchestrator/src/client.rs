//! A typed client for the control plane's HTTP API (what the CLI uses).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::model::{Metadata, Object, Spec};

/// The default server when neither `--server` nor `LIGHTBYTE_SERVER` says otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7070";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot reach {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("no answer from {url} within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    /// The server answered with an error; displays as "503 Service Unavailable: etcd ...".
    #[error("{status}: {message}")]
    Api { status: StatusCode, message: String },
    #[error("unexpected answer from {url}: {reason}")]
    Decode { url: String, reason: String },
}

impl ClientError {
    /// Worth retrying: the control plane (or etcd behind it) is unavailable or slow for now.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Timeout { .. } => true,
            ClientError::Api { status, .. } => matches!(
                *status,
                StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::BAD_GATEWAY
                    | StatusCode::GATEWAY_TIMEOUT
            ),
            _ => false,
        }
    }

    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct ApiClient {
    base: String,
    http: Client<crate::tls::Connector, Full<Bytes>>,
    timeout: Duration,
}

#[derive(Deserialize)]
#[serde(bound = "")]
struct ListBody<S: Spec> {
    items: Vec<Object<S>>,
    #[serde(rename = "continue", default)]
    next: Option<String>,
}

/// Objects per page when the client lists.
const LIST_PAGE: usize = 500;

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

#[derive(Serialize)]
#[serde(bound = "")]
struct NewObject<'a, S: Spec> {
    metadata: NewMetadata<'a>,
    spec: &'a S,
}

#[derive(Serialize)]
struct NewMetadata<'a> {
    name: &'a str,
}

impl ApiClient {
    /// A client for the server at `url` (`http://HOST:PORT`); every request, connection
    /// included, must finish within `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<ApiClient, ClientError> {
        let base = url.trim_end_matches('/').to_string();
        let uri: hyper::Uri =
            base.parse()
                .map_err(|e: hyper::http::uri::InvalidUri| ClientError::Url {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(ClientError::Url {
                url: url.to_string(),
                reason: "expected https://HOST[:PORT] (or http:// for an --insecure server)".into(),
            });
        }
        let http = Client::builder(TokioExecutor::new()).build(crate::tls::connector(timeout));
        Ok(ApiClient {
            base,
            http,
            timeout,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Every object of a kind, read in pages of one snapshot.
    pub async fn list<S: Spec>(&self) -> Result<Vec<Object<S>>, ClientError> {
        let mut items = Vec::new();
        let mut path = format!("/api/v1/{}?limit={LIST_PAGE}", S::PLURAL);
        loop {
            let body: ListBody<S> = self.request(Method::GET, &path, None).await?;
            items.extend(body.items);
            match body.next {
                Some(token) => {
                    path = format!("/api/v1/{}?limit={LIST_PAGE}&continue={token}", S::PLURAL)
                }
                None => return Ok(items),
            }
        }
    }

    pub async fn get<S: Spec>(&self, name: &str) -> Result<Object<S>, ClientError> {
        self.request(Method::GET, &item_path::<S>(name), None).await
    }

    pub async fn create<S: Spec>(&self, name: &str, spec: &S) -> Result<Object<S>, ClientError> {
        let body = NewObject {
            metadata: NewMetadata { name },
            spec,
        };
        let body = serde_json::to_vec(&body).expect("specs always serialize");
        self.request(Method::POST, &format!("/api/v1/{}", S::PLURAL), Some(body))
            .await
    }

    /// Replaces the spec, if the object is still at `obj.metadata.resource_version`.
    pub async fn replace<S: Spec>(&self, obj: &Object<S>) -> Result<Object<S>, ClientError> {
        #[derive(Serialize)]
        #[serde(bound = "")]
        struct Replace<'a, S: Spec> {
            metadata: &'a Metadata,
            spec: &'a S,
        }
        let body = Replace {
            metadata: &obj.metadata,
            spec: &obj.spec,
        };
        let body = serde_json::to_vec(&body).expect("specs always serialize");
        self.request(Method::PUT, &item_path::<S>(obj.name()), Some(body))
            .await
    }

    /// Sends `request` to the guest agent of VM `name` (through the worker it runs on).
    pub async fn agent(
        &self,
        name: &str,
        request: &agent_proto::Request,
    ) -> Result<agent_proto::Response, ClientError> {
        let body = serde_json::to_vec(request).expect("requests always serialize");
        let path = format!("{}/agent", item_path::<crate::model::VmSpec>(name));
        self.request(Method::POST, &path, Some(body)).await
    }

    /// `POST /api/v1/<kind>/<name>/<action>` with `body` (an operator action: drain, start,
    /// scale...): the object as the action left it.
    pub async fn action<S: Spec, B: Serialize>(
        &self,
        name: &str,
        action: &str,
        body: &B,
    ) -> Result<Object<S>, ClientError> {
        let body = serde_json::to_vec(body).expect("action bodies always serialize");
        let path = format!("{}/{action}", item_path::<S>(name));
        self.request(Method::POST, &path, Some(body)).await
    }

    pub async fn delete<S: Spec>(&self, name: &str) -> Result<Object<S>, ClientError> {
        self.request(Method::DELETE, &item_path::<S>(name), None)
            .await
    }

    async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let req = crate::auth::authorize(Request::builder())
            .method(method)
            .uri(&url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Url {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| ClientError::Connect {
                    url: url.clone(),
                    reason: error_chain(&e),
                })?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Connect {
                    url: url.clone(),
                    reason: error_chain(&e),
                })?
                .to_bytes();
            Ok::<_, ClientError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                url: url.clone(),
                timeout: self.timeout,
            })??;
        if !status.is_success() {
            let message = error_message(&bytes);
            return Err(ClientError::Api { status, message });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            url,
            reason: e.to_string(),
        })
    }
}

/// The message of an error answer: its `error` field, or the body as text.
pub fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => b.error,
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    }
}

fn item_path<S: Spec>(name: &str) -> String {
    // Names are DNS labels; anything else is escaped so it reaches the server's validation
    // (400) instead of turning into another path.
    let escaped: String = name
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("/api/v1/{}/{escaped}", S::PLURAL)
}

/// An error and its causes on one line ("client error (Connect): tcp connect error:
/// Connection refused (os error 111)").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
