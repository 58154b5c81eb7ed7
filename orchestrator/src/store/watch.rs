//! Watches: every change under a prefix from a given revision on, in revision order, with no
//! gaps (etcd's guarantee while the history is not compacted).

use std::collections::VecDeque;
use std::marker::PhantomData;

use etcd_client::{EventType, WatchOptions, WatchStream};

use super::objects::decode_value;
use super::{keys, Store, StoreError};
use crate::model::{Object, Spec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Put,
    Delete,
}

/// One change of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub kind: ChangeKind,
    /// The revision of this change.
    pub revision: i64,
    /// The new value (empty for a delete).
    pub value: Vec<u8>,
    /// The key's create revision (0 for a delete).
    pub create_revision: i64,
}

pub struct Watch {
    stream: WatchStream,
    pending: VecDeque<Change>,
    from: i64,
}

impl Store {
    /// Watches every key under `prefix`, starting at revision `from` (earlier changes that
    /// etcd still has are delivered first). Opening is bounded by the store's timeout; waiting
    /// for changes is not, so callers decide how long to wait.
    pub async fn watch(&self, prefix: &str, from: i64) -> Result<Watch, StoreError> {
        let mut client = self.client.watch_client();
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        let stream = self.call(client.watch(prefix, Some(opts))).await?;
        Ok(Watch {
            stream,
            pending: VecDeque::new(),
            from,
        })
    }

    /// Watches every object of a kind from revision `from`.
    pub async fn watch_kind<S: Spec>(&self, from: i64) -> Result<TypedWatch<S>, StoreError> {
        let prefix = keys::kind_prefix(S::KIND);
        Ok(TypedWatch {
            inner: self.watch(&prefix, from).await?,
            prefix,
            kind: PhantomData,
        })
    }
}

impl Watch {
    /// The next change. Fails when the stream breaks (etcd went away) or the history from the
    /// starting revision is gone; the caller then lists again and watches from there.
    pub async fn next(&mut self) -> Result<Change, StoreError> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Ok(change);
            }
            let resp = self
                .stream
                .message()
                .await?
                .ok_or_else(|| StoreError::Unavailable("watch stream ended".into()))?;
            if resp.compact_revision() > 0 {
                return Err(StoreError::Compacted {
                    requested: self.from,
                    compacted: resp.compact_revision(),
                });
            }
            if resp.canceled() {
                return Err(StoreError::Unavailable(format!(
                    "watch canceled: {}",
                    resp.cancel_reason()
                )));
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let kind = match event.event_type() {
                    EventType::Put => ChangeKind::Put,
                    EventType::Delete => ChangeKind::Delete,
                };
                self.pending.push_back(Change {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    kind,
                    revision: kv.mod_revision(),
                    value: kv.value().to_vec(),
                    create_revision: kv.create_revision(),
                });
            }
        }
    }
}

/// A change of one object.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<S: Spec> {
    Put(Object<S>),
    Delete { name: String, revision: i64 },
}

pub struct TypedWatch<S: Spec> {
    inner: Watch,
    prefix: String,
    kind: PhantomData<S>,
}

impl<S: Spec> TypedWatch<S> {
    pub async fn next(&mut self) -> Result<Event<S>, StoreError> {
        let change = self.inner.next().await?;
        let name = keys::name_of(&change.key, &self.prefix)
            .unwrap_or(&change.key)
            .to_string();
        match change.kind {
            ChangeKind::Put => {
                decode_value(&change.key, &change.value, change.revision).map(Event::Put)
            }
            ChangeKind::Delete => Ok(Event::Delete {
                name,
                revision: change.revision,
            }),
        }
    }
}
