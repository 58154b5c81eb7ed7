//! The one HTTP client the control plane and workers use to talk to workers (agent requests,
//! disk copies): HTTP/1 over mutual TLS (plain TCP for an --insecure cluster) with a connect
//! timeout; callers bound whole exchanges.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<crate::tls::Connector, Full<Bytes>>;

pub fn client() -> &'static HttpClient {
    static CLIENT: OnceLock<HttpClient> = OnceLock::new();
    CLIENT.get_or_init(|| {
        Client::builder(TokioExecutor::new()).build(crate::tls::connector(Duration::from_secs(5)))
    })
}

/// One JSON exchange with a worker: the status and the body, within `timeout`.
pub async fn exchange(
    method: hyper::Method,
    url: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(hyper::StatusCode, Bytes), String> {
    use http_body_util::BodyExt;
    let req = crate::auth::authorize(hyper::Request::builder())
        .method(method)
        .uri(url)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    let go = async {
        let resp = client().request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, bytes))
    };
    tokio::time::timeout(timeout, go)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}
