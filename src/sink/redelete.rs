//! The delayed second delete: keys scheduled to be deleted again after a delay,
//! coalesced (a key scheduled twice is deleted once, at the later time) and bounded.
//!
//! Pure bookkeeping; the sink task owns the timer and the Redis call.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

/// Most keys waiting for their second delete; beyond it new ones are dropped (and
/// counted), since the first delete already happened.
pub const MAX_SCHEDULED: usize = 100_000;

/// Keys waiting for their second delete.
#[derive(Debug, Default)]
pub struct Redelete {
    due: HashMap<String, Instant>,
    queue: BTreeMap<Instant, Vec<String>>,
    /// Keys not scheduled because the schedule was full.
    pub dropped: u64,
}

impl Redelete {
    /// Schedules `key` for deletion `delay` after `now`, or moves its existing
    /// schedule later.
    pub fn schedule(&mut self, now: Instant, key: &str, delay: Duration) {
        let at = now + delay;
        let full = self.due.len() >= MAX_SCHEDULED;
        match self.due.get_mut(key) {
            Some(existing) if *existing >= at => {}
            Some(existing) => {
                *existing = at;
                self.queue.entry(at).or_default().push(key.to_owned());
            }
            None if full => self.dropped += 1,
            None => {
                self.due.insert(key.to_owned(), at);
                self.queue.entry(at).or_default().push(key.to_owned());
            }
        }
    }

    /// When the next key is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.queue.keys().next().copied()
    }

    /// Removes and returns the keys due at `now`.
    pub fn take_due(&mut self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(entry) = self.queue.first_entry() {
            if *entry.key() > now {
                break;
            }
            let (at, keys) = entry.remove_entry();
            for key in keys {
                // A key moved later has a newer entry; only its latest one fires.
                if self.due.get(&key) == Some(&at) {
                    self.due.remove(&key);
                    out.push(key);
                }
            }
        }
        out
    }

    /// Keys waiting.
    pub fn len(&self) -> usize {
        self.due.len()
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_scheduled_twice_fires_once_at_the_later_time() {
        let t0 = Instant::now();
        let mut r = Redelete::default();
        r.schedule(t0, "k", Duration::from_millis(100));
        r.schedule(
            t0 + Duration::from_millis(50),
            "k",
            Duration::from_millis(100),
        );
        assert_eq!(r.len(), 1);
        assert!(r.take_due(t0 + Duration::from_millis(120)).is_empty());
        assert_eq!(r.take_due(t0 + Duration::from_millis(150)), vec!["k"]);
        assert!(r.is_empty());
        assert_eq!(r.next_due(), None);
    }

    #[test]
    fn the_schedule_is_bounded() {
        let t0 = Instant::now();
        let mut r = Redelete::default();
        for i in 0..MAX_SCHEDULED + 10 {
            r.schedule(t0, &i.to_string(), Duration::from_millis(1));
        }
        assert_eq!(r.len(), MAX_SCHEDULED);
        assert_eq!(r.dropped, 10);
    }
}
