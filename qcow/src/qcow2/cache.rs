//! A small least-recently-used cache of metadata tables (L2 tables, refcount blocks), keyed by
//! host offset. Changed tables are marked dirty and stay cached until their owner writes them
//! back and marks them clean: eviction only ever drops clean tables, so it never loses a change
//! and never writes. (A cache whose tables are all dirty grows past its capacity; the owner
//! writes back before that matters, see `Qcow2::l2_table`.)

use std::collections::HashMap;

struct Slot<T> {
    table: T,
    used: u64,
    /// 0: clean; otherwise the stamp of the last change.
    dirty: u64,
}

/// Cached tables of type `T`.
pub struct TableCache<T> {
    tables: HashMap<u64, Slot<T>>,
    capacity: usize,
    clock: u64,
}

impl<T> TableCache<T> {
    /// A cache holding at most `capacity` clean tables.
    pub fn new(capacity: usize) -> Self {
        Self {
            tables: HashMap::new(),
            capacity: capacity.max(2),
            clock: 0,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The table at `offset`, if cached.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut T> {
        let now = self.tick();
        self.tables.get_mut(&offset).map(|s| {
            s.used = now;
            &mut s.table
        })
    }

    /// The table at `offset`, if cached, without counting a use.
    pub fn peek(&self, offset: u64) -> Option<&T> {
        self.tables.get(&offset).map(|s| &s.table)
    }

    /// Caches `table` (clean) for `offset`, evicting the least recently used clean table when
    /// full. A table already cached for `offset` is kept.
    pub fn insert(&mut self, offset: u64, table: T) -> &mut T {
        if self.tables.len() >= self.capacity && !self.tables.contains_key(&offset) {
            if let Some(victim) = self
                .tables
                .iter()
                .filter(|(_, s)| s.dirty == 0)
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| *k)
            {
                self.tables.remove(&victim);
            }
        }
        let now = self.tick();
        let slot = self.tables.entry(offset).or_insert(Slot {
            table,
            used: now,
            dirty: 0,
        });
        slot.used = now;
        &mut slot.table
    }

    /// Whether caching one more table would have to exceed the capacity (every table is dirty).
    pub fn full_of_dirty(&self) -> bool {
        self.tables.len() >= self.capacity && self.tables.values().all(|s| s.dirty != 0)
    }

    /// Records a change to the (cached) table at `offset`.
    pub fn mark_dirty(&mut self, offset: u64) {
        let now = self.tick();
        if let Some(s) = self.tables.get_mut(&offset) {
            s.dirty = now;
        }
    }

    /// The dirty tables, by offset, each with the stamp of its last change.
    pub fn dirty(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .tables
            .iter()
            .filter(|(_, s)| s.dirty != 0)
            .map(|(k, s)| (*k, s.dirty))
            .collect();
        v.sort_unstable();
        v
    }

    /// Marks the table at `offset` clean, unless it changed after `stamp` (when it was written).
    pub fn clean_if(&mut self, offset: u64, stamp: u64) {
        if let Some(s) = self.tables.get_mut(&offset) {
            if s.dirty == stamp {
                s.dirty = 0;
            }
        }
    }

    /// Forgets the table at `offset` (its cluster was freed), dirty or not.
    pub fn remove(&mut self, offset: u64) {
        self.tables.remove(&offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used() {
        let mut c = TableCache::new(2);
        c.insert(1, "a");
        c.insert(2, "b");
        assert!(c.get_mut(1).is_some());
        c.insert(3, "c");
        assert!(c.get_mut(2).is_none());
        assert!(c.get_mut(1).is_some());
        assert!(c.get_mut(3).is_some());
    }

    #[test]
    fn dirty_tables_are_never_evicted_until_cleaned() {
        let mut c = TableCache::new(2);
        c.insert(1, "a");
        c.mark_dirty(1);
        c.insert(2, "b");
        c.insert(3, "c");
        assert!(c.peek(1).is_some(), "dirty table evicted");
        assert!(c.peek(2).is_none());
        c.mark_dirty(3);
        assert!(c.full_of_dirty());
        c.insert(4, "d");
        assert_eq!(
            c.dirty().len(),
            2,
            "the cache grew rather than drop a change"
        );
        let stamp = c.dirty()[0].1;
        c.mark_dirty(1);
        c.clean_if(1, stamp);
        assert_eq!(
            c.dirty().len(),
            2,
            "a change after the write keeps it dirty"
        );
        let stamp = c.dirty()[0].1;
        c.clean_if(1, stamp);
        assert_eq!(c.dirty(), vec![(3, c.dirty()[0].1)]);
    }
}
