//! Remembering which clips were received whole, so that a clip delivered
//! again (after a reconnect, before the acknowledgement reached the relay)
//! is not surfaced twice.

use std::collections::{HashSet, VecDeque};

use ptt_protocol::ClipId;

/// A bounded set of completed clips, keyed by group and clip id; the oldest
/// entries are forgotten first.
#[derive(Debug)]
pub struct DedupCache {
    capacity: usize,
    set: HashSet<(String, ClipId)>,
    order: VecDeque<(String, ClipId)>,
}

impl DedupCache {
    /// A cache remembering at most `capacity` clips (at least one).
    pub fn new(capacity: usize) -> DedupCache {
        DedupCache {
            capacity: capacity.max(1),
            set: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Whether the clip was completed before.
    pub fn contains(&self, group: &str, clip_id: ClipId) -> bool {
        self.set.contains(&(group.to_owned(), clip_id))
    }

    /// Records a completed clip; returns `false` if it was known already.
    pub fn insert(&mut self, group: &str, clip_id: ClipId) -> bool {
        let key = (group.to_owned(), clip_id);
        if self.set.contains(&key) {
            return false;
        }
        if self.order.len() >= self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.set.insert(key.clone());
        self.order.push_back(key);
        true
    }

    /// How many clips are remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no clip is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ClipId {
        ClipId::from_bytes([n; 16])
    }

    #[test]
    fn a_clip_is_new_once_per_group() {
        let mut d = DedupCache::new(10);
        assert!(d.insert("g", id(1)));
        assert!(!d.insert("g", id(1)));
        assert!(d.contains("g", id(1)));
        assert!(!d.contains("h", id(1)));
        assert!(d.insert("h", id(1)));
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn the_oldest_clips_are_forgotten_at_capacity() {
        let mut d = DedupCache::new(3);
        for n in 0..5 {
            d.insert("g", id(n));
        }
        assert_eq!(d.len(), 3);
        assert!(!d.contains("g", id(0)));
        assert!(!d.contains("g", id(1)));
        assert!(d.contains("g", id(2)) && d.contains("g", id(4)));
    }
}
