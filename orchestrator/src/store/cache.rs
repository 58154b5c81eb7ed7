//! A local copy of every object of one kind, kept current by a watch: one list at the start (and
//! after the watch breaks), then only the changes. Agents that look at all VMs on every change
//! would otherwise list them all each time, which grows with VMs × changes × workers.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Event, Store, StoreError, TypedWatch};
use crate::model::{Object, Spec};

pub struct Cache<S: Spec> {
    objects: BTreeMap<String, Object<S>>,
    watch: Option<TypedWatch<S>>,
    /// The revision the copy is current to.
    revision: i64,
}

impl<S: Spec> Default for Cache<S> {
    fn default() -> Self {
        Cache {
            objects: BTreeMap::new(),
            watch: None,
            revision: 0,
        }
    }
}

impl<S: Spec> Cache<S> {
    pub fn new() -> Cache<S> {
        Cache::default()
    }

    /// Whether the copy was loaded at least once.
    pub fn loaded(&self) -> bool {
        self.revision > 0
    }

    pub fn objects(&self) -> &BTreeMap<String, Object<S>> {
        &self.objects
    }

    /// Puts an object as a write of ours returned it (newer than what the watch has delivered,
    /// or the same), so the next decisions do not act on the older copy.
    pub fn note(&mut self, obj: Object<S>) {
        let newer = self
            .objects
            .get(obj.name())
            .is_none_or(|o| o.metadata.resource_version <= obj.metadata.resource_version);
        if newer {
            self.objects.insert(obj.metadata.name.clone(), obj);
        }
    }

    /// Loads the copy if there is no watch (first call, or after the watch broke). Returns
    /// whether it listed (the copy may have changed).
    pub async fn ensure(&mut self, store: &Store) -> Result<bool, StoreError> {
        if self.watch.is_some() {
            return Ok(false);
        }
        let (objects, revision) = store.list::<S>().await?;
        self.objects = objects
            .into_iter()
            .map(|o| (o.metadata.name.clone(), o))
            .collect();
        self.revision = revision;
        self.watch = Some(store.watch_kind::<S>(revision + 1).await?);
        Ok(true)
    }

    /// Waits for the next change, then applies it and every change already delivered. On an
    /// error the watch is dropped; [`Cache::ensure`] lists again. Without a watch, waits forever.
    pub async fn changed(&mut self) -> Result<(), StoreError> {
        let Some(watch) = self.watch.as_mut() else {
            return std::future::pending().await;
        };
        let first = watch.next().await;
        self.apply(first)?;
        loop {
            let Some(watch) = self.watch.as_mut() else {
                return Ok(());
            };
            // Polls once: what has arrived is applied, nothing is waited for.
            match tokio::time::timeout(Duration::ZERO, watch.next()).await {
                Ok(next) => self.apply(next)?,
                Err(_) => return Ok(()),
            }
        }
    }

    fn apply(&mut self, event: Result<Event<S>, StoreError>) -> Result<(), StoreError> {
        match event {
            Ok(Event::Put(obj)) => {
                self.revision = self.revision.max(obj.metadata.resource_version);
                self.note(obj);
                Ok(())
            }
            Ok(Event::Delete { name, revision }) => {
                self.revision = self.revision.max(revision);
                self.objects.remove(&name);
                Ok(())
            }
            Err(e) => {
                self.watch = None;
                Err(e)
            }
        }
    }
}
