//! Typed get/list/create/update/delete over the raw transactions.

use std::time::SystemTime;

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, TxnOp, TxnOpResponse};

use super::{got, keys, Store, StoreError};
use crate::model::{Object, Spec};

fn decode<S: Spec>(kv: &KeyValue) -> Result<Object<S>, StoreError> {
    decode_value(
        &String::from_utf8_lossy(kv.key()),
        kv.value(),
        kv.mod_revision(),
    )
}

/// Parses a stored document; `revision` is the key's mod revision, its resource version.
pub(crate) fn decode_value<S: Spec>(
    key: &str,
    value: &[u8],
    revision: i64,
) -> Result<Object<S>, StoreError> {
    let mut obj: Object<S> =
        serde_json::from_slice(value).map_err(|source| StoreError::Corrupt {
            key: key.to_string(),
            source,
        })?;
    obj.metadata.resource_version = revision;
    Ok(obj)
}

fn encode<S: Spec>(obj: &Object<S>) -> Vec<u8> {
    let mut stored = obj.clone();
    // The revision is a property of the key, not of the document.
    stored.metadata.resource_version = 0;
    serde_json::to_vec(&stored).expect("resources always serialize")
}

/// Objects per etcd read when listing a whole kind.
pub const LIST_PAGE: usize = 500;

/// One page of a kind.
pub struct Page<S: Spec> {
    pub objects: Vec<Object<S>>,
    /// The revision the page was read at.
    pub revision: i64,
    /// Whether more objects follow.
    pub more: bool,
}

fn not_found<S: Spec>(name: &str) -> StoreError {
    StoreError::NotFound {
        kind: S::KIND,
        name: name.to_string(),
    }
}

impl Store {
    pub async fn get<S: Spec>(&self, name: &str) -> Result<Object<S>, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self.call(kv.get(keys::object(S::KIND, name), None)).await?;
        self.count_read(resp.kvs());
        match resp.kvs().first() {
            Some(kv) => decode(kv),
            None => Err(not_found::<S>(name)),
        }
    }

    /// Every object of a kind, sorted by name, and the revision they were read at (a watch
    /// from the next revision sees every later change). Read in pages of [`LIST_PAGE`] at one
    /// revision: one etcd answer is limited to 4 MiB, a few thousand VMs.
    pub async fn list<S: Spec>(&self) -> Result<(Vec<Object<S>>, i64), StoreError> {
        let mut all = Vec::new();
        let mut revision = 0;
        let mut after: Option<String> = None;
        loop {
            let page = self
                .list_page::<S>(after.as_deref(), LIST_PAGE, revision)
                .await?;
            revision = page.revision;
            after = page.objects.last().map(|o| o.name().to_string());
            all.extend(page.objects);
            if !page.more || after.is_none() {
                return Ok((all, revision));
            }
        }
    }

    /// Up to `limit` objects of a kind named after `after` (sorted by name), read at
    /// `revision` (0: now). A revision etcd has compacted away is [`StoreError::Expired`].
    pub async fn list_page<S: Spec>(
        &self,
        after: Option<&str>,
        limit: usize,
        revision: i64,
    ) -> Result<Page<S>, StoreError> {
        let prefix = keys::kind_prefix(S::KIND);
        let start = match after {
            // The first key after that object's.
            Some(name) => format!("{}\0", keys::object(S::KIND, name)),
            None => prefix.clone(),
        };
        let mut opts = GetOptions::new()
            .with_range(keys::prefix_end(&prefix))
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let mut kv = self.client.kv_client();
        let resp = self.call(kv.get(start, Some(opts))).await?;
        // The header carries the store's current revision; a page read at an earlier one
        // belongs to that one.
        let current = resp.header().map_or(0, |h| h.revision());
        self.count_read(resp.kvs());
        let objects = resp.kvs().iter().map(decode).collect::<Result<_, _>>()?;
        Ok(Page {
            objects,
            revision: if revision > 0 { revision } else { current },
            more: resp.more(),
        })
    }

    /// Creates `obj` if no object of its kind has its name. The store sets the uid, the
    /// generation (1), the creation time and the resource version; the spec must validate.
    pub async fn create<S: Spec>(&self, obj: Object<S>) -> Result<Object<S>, StoreError> {
        obj.validate()?;
        let mut obj = obj;
        obj.metadata.uid = uuid::Uuid::new_v4().to_string();
        obj.metadata.generation = 1;
        obj.metadata.creation_timestamp =
            humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        obj.metadata.resource_version = 0;
        let key = keys::object(S::KIND, obj.name());
        let value = encode(&obj);
        self.count_written(value.len());
        let result = self
            .txn(
                vec![Compare::create_revision(key.as_str(), CompareOp::Equal, 0)],
                vec![TxnOp::put(key.as_str(), value, None)],
                vec![],
                || format!("create {}/{}", S::KIND, obj.name()),
            )
            .await?;
        if !result.succeeded {
            return Err(StoreError::AlreadyExists {
                kind: S::KIND,
                name: obj.metadata.name,
            });
        }
        obj.metadata.resource_version = result.revision;
        Ok(obj)
    }

    /// Read-modify-write: reads the object, applies `change` and writes it back if the key was
    /// not modified in between, retrying from a fresh read when it was. `change` may run several
    /// times and must compute the new state from the object it is given. When it changes
    /// nothing, nothing is written. Metadata is the store's: the generation goes up by one when
    /// the spec changed.
    pub async fn update<S, F>(&self, name: &str, change: F) -> Result<Object<S>, StoreError>
    where
        S: Spec,
        F: FnMut(&mut Object<S>) -> Result<(), StoreError>,
    {
        self.update_inner(name, None, change).await
    }

    /// Like [`Store::update`], but the first attempt starts from `current` (an object the caller
    /// just read, with its resource version) instead of reading it again: one request instead of
    /// two when nobody wrote in between, the same retries when someone did.
    pub async fn update_from<S, F>(
        &self,
        current: &Object<S>,
        change: F,
    ) -> Result<Object<S>, StoreError>
    where
        S: Spec,
        F: FnMut(&mut Object<S>) -> Result<(), StoreError>,
    {
        self.update_loop(current.name(), current.clone(), None, change)
            .await
    }

    /// Like [`Store::update`], but only from resource version `expected`: `Conflict` instead of
    /// a retry when the object changed since (optimistic concurrency for API clients).
    pub async fn update_at<S, F>(
        &self,
        name: &str,
        expected: i64,
        change: F,
    ) -> Result<Object<S>, StoreError>
    where
        S: Spec,
        F: FnMut(&mut Object<S>) -> Result<(), StoreError>,
    {
        self.update_inner(name, Some(expected), change).await
    }

    async fn update_inner<S, F>(
        &self,
        name: &str,
        expected: Option<i64>,
        change: F,
    ) -> Result<Object<S>, StoreError>
    where
        S: Spec,
        F: FnMut(&mut Object<S>) -> Result<(), StoreError>,
    {
        let current = self.get::<S>(name).await?;
        self.update_loop(name, current, expected, change).await
    }

    async fn update_loop<S, F>(
        &self,
        name: &str,
        mut current: Object<S>,
        expected: Option<i64>,
        mut change: F,
    ) -> Result<Object<S>, StoreError>
    where
        S: Spec,
        F: FnMut(&mut Object<S>) -> Result<(), StoreError>,
    {
        let key = keys::object(S::KIND, name);
        loop {
            let rev = current.metadata.resource_version;
            if let Some(expected) = expected.filter(|e| *e != rev) {
                return Err(StoreError::Conflict {
                    kind: S::KIND,
                    name: name.to_string(),
                    expected,
                    actual: rev,
                });
            }
            let mut next = current.clone();
            change(&mut next)?;
            next.metadata = current.metadata.clone();
            if next.spec != current.spec {
                next.spec.validate()?;
                next.metadata.generation += 1;
            }
            if next == current {
                return Ok(current);
            }
            let value = encode(&next);
            self.count_written(value.len());
            let result = self
                .txn(
                    vec![Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)],
                    vec![TxnOp::put(key.as_str(), value, None)],
                    vec![TxnOp::get(key.as_str(), None)],
                    || format!("update {}/{name}", S::KIND),
                )
                .await?;
            if result.succeeded {
                next.metadata.resource_version = result.revision;
                return Ok(next);
            }
            // Someone wrote in between: start over from what they wrote (the transaction's
            // failure branch read it, saving a round trip).
            current = match got(&result.responses, 0) {
                Some(kv) => decode(kv)?,
                None => return Err(not_found::<S>(name)),
            };
        }
    }

    /// Deletes the object (only at resource version `expected`, when given) and returns what
    /// was deleted.
    pub async fn delete<S: Spec>(
        &self,
        name: &str,
        expected: Option<i64>,
    ) -> Result<Object<S>, StoreError> {
        let key = keys::object(S::KIND, name);
        let compares = expected
            .map(|rev| Compare::mod_revision(key.as_str(), CompareOp::Equal, rev))
            .into_iter()
            .collect();
        let result = self
            .txn(
                compares,
                vec![TxnOp::delete(
                    key.as_str(),
                    Some(DeleteOptions::new().with_prev_key()),
                )],
                vec![TxnOp::get(key.as_str(), None)],
                || format!("delete {}/{name}", S::KIND),
            )
            .await?;
        if !result.succeeded {
            return match (got(&result.responses, 0), expected) {
                (Some(kv), Some(expected)) => Err(StoreError::Conflict {
                    kind: S::KIND,
                    name: name.to_string(),
                    expected,
                    actual: kv.mod_revision(),
                }),
                _ => Err(not_found::<S>(name)),
            };
        }
        match result.responses.first() {
            Some(TxnOpResponse::Delete(d)) => match d.prev_kvs().first() {
                Some(kv) => decode(kv),
                None => Err(not_found::<S>(name)),
            },
            _ => Err(StoreError::Etcd(
                "delete returned no delete response".into(),
            )),
        }
    }
}
