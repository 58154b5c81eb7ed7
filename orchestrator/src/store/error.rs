//! What a store operation can fail with.

use crate::model::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// Optimistic concurrency: the object changed since the caller read it.
    #[error(
        "{kind} {name:?} was modified: its resource_version is {actual}, not {expected}; \
         read it again and retry"
    )]
    Conflict {
        kind: &'static str,
        name: String,
        expected: i64,
        actual: i64,
    },
    /// etcd did not answer (down, unreachable, no quorum) within the store's timeout.
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
    /// A fenced write found that the writer's leadership ended: another instance may be acting.
    #[error("deposed: {controller} leadership (token {token}) has ended")]
    Deposed { controller: String, token: i64 },
    #[error("stored document {key} does not parse: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// An update closure produced an object that does not validate.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("watch from revision {requested} is impossible: etcd compacted its history up to {compacted}")]
    Compacted { requested: i64, compacted: i64 },
    /// A read at a revision etcd has compacted away (a paged list that took too long).
    #[error("etcd compacted the revision this list was read at: {0}")]
    Expired(String),
    /// Anything else etcd refused (a request too large, a permission error, ...).
    #[error("etcd: {0}")]
    Etcd(String),
}

impl StoreError {
    /// Whether retrying later may succeed without anyone changing anything.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<etcd_client::Error> for StoreError {
    fn from(e: etcd_client::Error) -> StoreError {
        use etcd_client::Error as E;
        use tonic::Code;
        match e {
            E::TransportError(_) | E::IoError(_) => StoreError::Unavailable(e.to_string()),
            E::GRpcStatus(ref s)
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
                ) =>
            {
                StoreError::Unavailable(s.message().to_string())
            }
            E::GRpcStatus(ref s)
                if s.code() == Code::OutOfRange && s.message().contains("compacted") =>
            {
                StoreError::Expired(s.message().to_string())
            }
            E::WatchError(ref m) | E::LeaseKeepAliveError(ref m) => {
                StoreError::Unavailable(m.clone())
            }
            other => StoreError::Etcd(other.to_string()),
        }
    }
}
