//! Who may call the APIs: bearer tokens bound to roles, checked on every route of the control
//! plane and of the workers' API, and the token this process presents when it calls another
//! component.
//!
//! Roles:
//! - `admin`: everything;
//! - `viewer`: reads only (GET and HEAD) on both APIs;
//! - `node`: what components ask of each other: reads on the control plane (workers pull
//!   images), everything on a worker's API (the control plane forwards agent requests and
//!   pushes load-balancer configurations).
//!
//! Without a tokens file a server runs only with `--insecure`, which says loudly that anyone
//! who can reach it can do anything.

pub mod tokens;

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

pub use tokens::{Identity, TokenError, TokenFile};

use crate::api::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Viewer,
    Node,
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "viewer" => Ok(Role::Viewer),
            "node" => Ok(Role::Node),
            other => Err(format!("unknown role {other:?} (admin, viewer or node)")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
            Role::Node => "node",
        })
    }
}

/// Which API a request reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    ControlPlane,
    Worker,
}

impl Role {
    /// Whether this role may send `method` to `surface`.
    pub fn may(self, method: &Method, surface: Surface) -> bool {
        let read = method == Method::GET || method == Method::HEAD;
        match (self, surface) {
            (Role::Admin, _) | (Role::Node, Surface::Worker) => true,
            (Role::Viewer, _) | (Role::Node, Surface::ControlPlane) => read,
        }
    }
}

/// How a server authenticates its clients.
#[derive(Clone)]
pub enum Auth {
    /// Bearer tokens from this file.
    Tokens(Arc<TokenFile>),
    /// Nobody is asked (`--insecure`).
    Insecure,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Tokens(file) => write!(f, "Tokens({})", file.path().display()),
            Auth::Insecure => f.write_str("Insecure"),
        }
    }
}

impl Auth {
    /// From a server's flags: a tokens file, or `--insecure` (which warns); neither is an
    /// error that says what to do.
    pub fn from_flags(
        tokens: Option<&std::path::Path>,
        insecure: bool,
        what: &str,
    ) -> Result<Auth, AuthSetupError> {
        match (tokens, insecure) {
            (Some(_), true) => Err(AuthSetupError::Both),
            (Some(path), false) => Ok(Auth::Tokens(Arc::new(TokenFile::open(path)?))),
            (None, true) => {
                tracing::warn!(
                    "--insecure: the {what} asks no credentials; anyone who can reach it can do \
                     anything it allows"
                );
                Ok(Auth::Insecure)
            }
            (None, false) => Err(AuthSetupError::Missing),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error(
        "no --tokens FILE: make one with `lightbyte token new --role admin --name NAME --file \
         FILE`, or run without authentication with --insecure"
    )]
    Missing,
    #[error("--tokens and --insecure together: pick one")]
    Both,
    #[error(transparent)]
    Tokens(#[from] TokenError),
}

/// Routes anyone may GET: liveness, which load balancers and scripts probe without
/// credentials and which tells nothing about the cluster's contents.
const PUBLIC: &[&str] = &["/healthz"];

/// `router` with every route behind [`check`].
pub fn guard<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
    auth: &Auth,
    surface: Surface,
) -> axum::Router<S> {
    let auth = auth.clone();
    router.route_layer(axum::middleware::from_fn(
        move |req: Request, next: Next| check(auth.clone(), surface, req, next),
    ))
}

/// The middleware: 401 without a known bearer token, 403 when its role may not do this.
pub async fn check(auth: Auth, surface: Surface, req: Request, next: Next) -> Response {
    let Auth::Tokens(file) = &auth else {
        return next.run(req).await;
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if PUBLIC.contains(&path.as_str()) && method == Method::GET {
        return next.run(req).await;
    }
    let presented = bearer(req.headers()).map(str::trim);
    let Some(token) = presented else {
        tracing::warn!(%method, path, "refused: no bearer token");
        return unauthorized("a bearer token is required (Authorization: Bearer TOKEN)");
    };
    let Some(who) = file.identify(token) else {
        tracing::warn!(%method, path, "refused: unknown bearer token");
        return unauthorized("unknown or revoked token");
    };
    if !who.role.may(&method, surface) {
        tracing::warn!(%method, path, name = %who.name, role = %who.role, "refused: role may not do this");
        return ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{} ({}) may not {method} {path}", who.name, who.role),
        )
        .into_response();
    }
    next.run(req).await
}

/// The token of an `Authorization: Bearer TOKEN` header, as sent.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

fn unauthorized(message: &str) -> Response {
    let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"lightbyte\""),
    );
    resp
}

static OWN_TOKEN: OnceLock<String> = OnceLock::new();

/// Sets the token this process presents to other components (once, at start-up).
pub fn set_own_token(token: String) {
    let _ = OWN_TOKEN.set(token);
}

/// The token this process presents, if it has one.
pub fn own_token() -> Option<&'static str> {
    OWN_TOKEN.get().map(String::as_str)
}

/// `Authorization: Bearer …` for this process's token, if it has one.
pub fn authorize(builder: hyper::http::request::Builder) -> hyper::http::request::Builder {
    match own_token() {
        Some(t) => builder.header(header::AUTHORIZATION, format!("Bearer {t}")),
        None => builder,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_allow_what_they_say() {
        let (get, post, delete) = (Method::GET, Method::POST, Method::DELETE);
        for s in [Surface::ControlPlane, Surface::Worker] {
            assert!(Role::Admin.may(&delete, s));
            assert!(Role::Viewer.may(&get, s));
            assert!(!Role::Viewer.may(&post, s));
        }
        assert!(Role::Node.may(&Method::HEAD, Surface::ControlPlane));
        assert!(!Role::Node.may(&post, Surface::ControlPlane));
        assert!(Role::Node.may(&post, Surface::Worker));
        assert_eq!("node".parse::<Role>().unwrap(), Role::Node);
        assert!("root".parse::<Role>().is_err());
    }
}
