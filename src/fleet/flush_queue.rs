//! The tokens whose spend waits to be flushed to etcd, in the order they were marked, each once.
//!
//! A flush takes a batch from the front. First in, first out is what keeps every token's turn:
//! taken in id order instead, tokens busy enough to be marked again before every flush would keep
//! the ones after them (by id) from ever being flushed, and with them their spend in etcd, their
//! fleet-wide alerts and their rate counts.

use std::collections::{HashSet, VecDeque};

#[derive(Debug, Default)]
pub struct FlushQueue {
    order: VecDeque<String>,
    queued: HashSet<String>,
}

impl FlushQueue {
    /// Marks `id` at the back; a token already waiting keeps its place.
    pub fn push(&mut self, id: String) {
        if self.queued.insert(id.clone()) {
            self.order.push_back(id);
        }
    }

    /// Up to `n` tokens from the front.
    pub fn take(&mut self, n: usize) -> Vec<String> {
        let mut batch = Vec::with_capacity(n.min(self.order.len()));
        while batch.len() < n {
            let Some(id) = self.order.pop_front() else {
                break;
            };
            self.queued.remove(&id);
            batch.push(id);
        }
        batch
    }

    /// A batch that could not be flushed goes back to the front, ahead of what was marked since.
    pub fn put_back(&mut self, batch: Vec<String>) {
        for id in batch.into_iter().rev() {
            if self.queued.insert(id.clone()) {
                self.order.push_front(id);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_busy_token_marked_again_waits_behind_the_others() {
        let mut q = FlushQueue::default();
        for id in ["a", "b", "z"] {
            q.push(id.into());
        }
        assert_eq!(q.take(2), ids(&["a", "b"]));
        // "a" and "b" are busy: marked again before the next flush, they queue behind "z".
        q.push("b".into());
        q.push("a".into());
        q.push("z".into());
        assert_eq!(q.take(2), ids(&["z", "b"]));
        assert_eq!(q.take(2), ids(&["a"]));
        assert!(q.is_empty());
    }

    #[test]
    fn a_failed_batch_goes_back_to_the_front_once() {
        let mut q = FlushQueue::default();
        for id in ["a", "b", "c"] {
            q.push(id.into());
        }
        let batch = q.take(2);
        q.push("d".into());
        q.push("a".into()); // marked again while its flush was in flight
        q.put_back(batch);
        assert_eq!(q.len(), 4);
        assert_eq!(q.take(10), ids(&["b", "c", "d", "a"]));
    }
}
