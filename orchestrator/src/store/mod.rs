//! The typed store: every resource is a JSON document in etcd at `/lightbyte/<kind>/<name>`,
//! and every write is one etcd transaction (create-if-absent, compare-mod-revision update,
//! optionally fenced by a controller's leadership).

mod cache;
mod error;
mod fence;
pub mod keys;
mod objects;
mod stats;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, ConnectOptions, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse,
};

pub use cache::Cache;
pub use error::StoreError;
pub use fence::{ActionRecord, Fence};
pub use stats::{Stats, StatsSnapshot};
pub use watch::{Change, ChangeKind, Event, TypedWatch, Watch};

/// How long a single etcd request may take before the store reports etcd unavailable. Short,
/// so that the API answers 503 within seconds instead of hanging while etcd is down.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// A handle on etcd; cheap to clone (clones share one connection).
#[derive(Clone)]
pub struct Store {
    client: Client,
    timeout: Duration,
    fence: Option<Arc<Fence>>,
    stats: Arc<Stats>,
}

/// A key as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

impl From<&KeyValue> for Entry {
    fn from(kv: &KeyValue) -> Entry {
        Entry {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }
    }
}

/// What a fenced transaction did.
pub(crate) struct TxnResult {
    pub succeeded: bool,
    /// The store revision after the transaction (the mod revision of what it wrote).
    pub revision: i64,
    /// The responses of the branch that ran, without the store's own fence check.
    pub responses: Vec<TxnOpResponse>,
}

impl Store {
    /// Makes a client for `endpoints` ("http://127.0.0.1:2379" or "127.0.0.1:2379"). Connects
    /// lazily: this succeeds while etcd is down, and requests fail with `Unavailable` until it is
    /// back, so a control plane can start before its etcd.
    pub async fn connect(endpoints: &[String], timeout: Duration) -> Result<Store, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Etcd("no etcd endpoint given".into()));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            // HTTP/2 pings find a dead connection (etcd host gone without a reset), so watches
            // and keep-alive streams fail instead of waiting forever.
            .with_keep_alive(Duration::from_secs(2), timeout)
            .with_keep_alive_while_idle(true);
        // https endpoints: this process's certificate is its identity to etcd too.
        if endpoints.iter().any(|e| e.starts_with("https://")) {
            let files = crate::tls::own().ok_or_else(|| {
                StoreError::Etcd("https etcd endpoints need --ca, --cert and --key".into())
            })?;
            let tls = files
                .etcd_options()
                .map_err(|e| StoreError::Etcd(e.to_string()))?;
            options = options.with_tls(tls);
        }
        let client = tokio::time::timeout(timeout, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| StoreError::Unavailable(format!("no answer within {timeout:?}")))??;
        Ok(Store {
            client,
            timeout,
            fence: None,
            stats: Arc::new(Stats::default()),
        })
    }

    /// The same store, with every write fenced by `fence` and recorded as an action.
    pub fn fenced(&self, fence: Fence) -> Store {
        Store {
            fence: Some(Arc::new(fence)),
            ..self.clone()
        }
    }

    /// The same store without a fence (for reads and elections, which must not be fenced).
    pub fn unfenced(&self) -> Store {
        Store {
            fence: None,
            ..self.clone()
        }
    }

    pub fn fence(&self) -> Option<&Fence> {
        self.fence.as_deref()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// This connection's traffic so far (all its clones together).
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    pub(crate) fn count_read(&self, kvs: &[KeyValue]) {
        self.stats
            .read(kvs.iter().map(|kv| kv.key().len() + kv.value().len()).sum());
    }

    pub(crate) fn count_written(&self, n: usize) {
        self.stats.wrote(n);
    }

    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs one etcd request under the store's timeout.
    pub(crate) async fn call<T>(
        &self,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        self.stats.request();
        match tokio::time::timeout(self.timeout, request).await {
            Ok(result) => result.map_err(StoreError::from),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// The store's current revision.
    pub async fn revision(&self) -> Result<i64, StoreError> {
        let mut kv = self.client.kv_client();
        let opts = GetOptions::new().with_count_only();
        let resp = self.call(kv.get(keys::ROOT, Some(opts))).await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Every key under `prefix`, sorted by key, and the revision they were read at.
    pub async fn list_raw(&self, prefix: &str) -> Result<(Vec<Entry>, i64), StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self
            .call(kv.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        self.count_read(resp.kvs());
        Ok((resp.kvs().iter().map(Entry::from).collect(), revision))
    }

    /// One key, if it exists.
    pub async fn get_raw(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self.call(kv.get(key, None)).await?;
        self.count_read(resp.kvs());
        Ok(resp.kvs().first().map(Entry::from))
    }

    /// Writes one bookkeeping key (fenced like every write of a fenced store).
    pub async fn put_key(&self, key: &str, value: impl Into<Vec<u8>>) -> Result<(), StoreError> {
        let value = value.into();
        self.txn(vec![], vec![TxnOp::put(key, value, None)], vec![], || {
            format!("put {key}")
        })
        .await
        .map(drop)
    }

    /// Deletes one bookkeeping key; deleting what is not there is no error.
    pub async fn delete_key(&self, key: &str) -> Result<(), StoreError> {
        self.txn(vec![], vec![TxnOp::delete(key, None)], vec![], || {
            format!("delete {key}")
        })
        .await
        .map(drop)
    }

    /// Whether the object `kind`/`name` exists.
    pub async fn exists(&self, kind: &str, name: &str) -> Result<bool, StoreError> {
        let mut kv = self.client.kv_client();
        let opts = GetOptions::new().with_count_only();
        let resp = self
            .call(kv.get(keys::object(kind, name), Some(opts)))
            .await?;
        Ok(resp.count() > 0)
    }

    /// Runs `compares → then / otherwise` as one transaction, adding the fence (when the store
    /// is fenced): its compare, its action record on success, and a read of the leader key on
    /// failure to tell "deposed" from an ordinary failed compare.
    pub(crate) async fn txn(
        &self,
        mut compares: Vec<Compare>,
        mut then: Vec<TxnOp>,
        mut otherwise: Vec<TxnOp>,
        action: impl FnOnce() -> String,
    ) -> Result<TxnResult, StoreError> {
        if let Some(fence) = &self.fence {
            compares.push(fence.compare());
            then.push(fence.record(action()));
            otherwise.push(TxnOp::get(fence.leader_key(), None));
        }
        let txn = Txn::new().when(compares).and_then(then).or_else(otherwise);
        let mut kv = self.client.kv_client();
        let resp = self.call(kv.txn(txn)).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let succeeded = resp.succeeded();
        let mut responses = resp.op_responses();
        if let Some(fence) = &self.fence {
            if succeeded {
                responses.pop();
            } else {
                let held = match responses.pop() {
                    Some(TxnOpResponse::Get(get)) => get
                        .kvs()
                        .first()
                        .is_some_and(|kv| kv.create_revision() == fence.token),
                    _ => false,
                };
                if !held {
                    return Err(StoreError::Deposed {
                        controller: fence.controller.clone(),
                        token: fence.token,
                    });
                }
            }
        }
        Ok(TxnResult {
            succeeded,
            revision,
            responses,
        })
    }
}

/// The first key-value of a transaction's get response at `index`.
pub(crate) fn got(responses: &[TxnOpResponse], index: usize) -> Option<&KeyValue> {
    match responses.get(index) {
        Some(TxnOpResponse::Get(get)) => get.kvs().first(),
        _ => None,
    }
}
