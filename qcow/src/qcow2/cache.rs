//! A small least-recently-used cache of metadata tables (L2 tables, refcount blocks), keyed by
//! host offset. Tables are written through on every change, so eviction never writes.

use std::collections::HashMap;

/// Cached tables of type `T`.
pub struct TableCache<T> {
    tables: HashMap<u64, (T, u64)>,
    capacity: usize,
    clock: u64,
}

impl<T> TableCache<T> {
    /// A cache holding at most `capacity` tables.
    pub fn new(capacity: usize) -> Self {
        Self {
            tables: HashMap::new(),
            capacity: capacity.max(2),
            clock: 0,
        }
    }

    /// The table at `offset`, if cached.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut T> {
        self.clock += 1;
        let now = self.clock;
        self.tables.get_mut(&offset).map(|(t, used)| {
            *used = now;
            t
        })
    }

    /// Caches `table` for `offset`, evicting the least recently used table when full.
    pub fn insert(&mut self, offset: u64, table: T) -> &mut T {
        if self.tables.len() >= self.capacity && !self.tables.contains_key(&offset) {
            if let Some(victim) = self
                .tables
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
            {
                self.tables.remove(&victim);
            }
        }
        self.clock += 1;
        let now = self.clock;
        let slot = self.tables.entry(offset).or_insert((table, now));
        slot.1 = now;
        &mut slot.0
    }

    /// Forgets the table at `offset` (its cluster was freed).
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
}
