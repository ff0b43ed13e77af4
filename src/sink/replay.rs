//! The invalidations of the last few seconds, kept so they can be applied again after
//! a Redis failover: a delete the old primary acknowledged but had not yet replicated
//! is lost when its replica takes over, and applying it again is always safe.
//!
//! Pure bookkeeping (time is passed in); when to replay is the sink's decision.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::rules::invalidation::Work;

/// Most entries (keys, tags, patterns) the window holds; past it the oldest go.
pub const MAX_ENTRIES: usize = 200_000;

/// What was sent to Redis during the last `window`.
#[derive(Debug)]
pub struct ReplayWindow {
    window: Duration,
    max_entries: usize,
    units: VecDeque<(Instant, Work)>,
    entries: usize,
}

impl ReplayWindow {
    /// A window of `window` (zero: keep nothing) and at most `max_entries`.
    pub fn new(window: Duration, max_entries: usize) -> ReplayWindow {
        ReplayWindow {
            window,
            max_entries,
            units: VecDeque::new(),
            entries: 0,
        }
    }

    /// Keeps `work`, sent at `now`, and forgets what is older than the window. Returns
    /// how many entries had to go early because the window was full.
    pub fn record(&mut self, now: Instant, work: &Work) -> usize {
        if self.window.is_zero() {
            return 0;
        }
        let mut kept = work.clone();
        // A second delete is scheduled elsewhere; replaying the first one is enough.
        kept.redelete.clear();
        if !kept.is_empty() {
            self.entries += kept.len();
            self.units.push_back((now, kept));
        }
        while let Some((at, _)) = self.units.front() {
            if now.saturating_duration_since(*at) <= self.window {
                break;
            }
            self.pop();
        }
        let mut dropped = 0;
        while self.entries > self.max_entries && self.units.len() > 1 {
            dropped += self.pop();
        }
        dropped
    }

    /// Everything in the window, as one unit of work; `None` when it holds nothing.
    pub fn replay(&self) -> Option<Work> {
        let mut all = Work::default();
        for (_, work) in &self.units {
            all.merge(work.clone());
        }
        (!all.is_empty()).then_some(all)
    }

    fn pop(&mut self) -> usize {
        let n = self.units.pop_front().map_or(0, |(_, w)| w.len());
        self.entries -= n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> Work {
        let mut w = Work::default();
        w.keys.extend(names.iter().map(|k| k.to_string()));
        w
    }

    #[test]
    fn keeps_what_was_sent_within_the_window_and_forgets_the_rest() {
        let t0 = Instant::now();
        let mut window = ReplayWindow::new(Duration::from_secs(5), 100);
        window.record(t0, &keys(&["a"]));
        window.record(t0 + Duration::from_secs(3), &keys(&["b"]));
        assert_eq!(window.replay().unwrap().keys.len(), 2);
        window.record(t0 + Duration::from_secs(6), &keys(&["c"]));
        let replay = window.replay().unwrap();
        let mut left: Vec<&String> = replay.keys.iter().collect();
        left.sort();
        assert_eq!(left, ["b", "c"]);
    }

    #[test]
    fn nothing_ages_out_while_nothing_new_is_sent() {
        // A failing batch is recorded once: however long the outage, what was sent
        // before it stays for the replay after it.
        let t0 = Instant::now();
        let mut window = ReplayWindow::new(Duration::from_secs(5), 100);
        window.record(t0, &keys(&["before"]));
        window.record(t0 + Duration::from_secs(1), &keys(&["failing"]));
        let replay = window.replay().unwrap();
        assert!(replay.keys.contains("before") && replay.keys.contains("failing"));
    }

    #[test]
    fn a_full_window_drops_its_oldest_and_says_how_many() {
        let t0 = Instant::now();
        let mut window = ReplayWindow::new(Duration::from_secs(60), 3);
        assert_eq!(window.record(t0, &keys(&["a", "b"])), 0);
        assert_eq!(window.record(t0, &keys(&["c", "d"])), 2);
        let replay = window.replay().unwrap();
        assert!(replay.keys.contains("c") && replay.keys.contains("d"));
        assert!(!replay.keys.contains("a"));
    }

    #[test]
    fn a_zero_window_keeps_nothing() {
        let mut window = ReplayWindow::new(Duration::ZERO, 100);
        window.record(Instant::now(), &keys(&["a"]));
        assert!(window.replay().is_none());
    }

    #[test]
    fn second_deletes_are_not_kept() {
        let mut window = ReplayWindow::new(Duration::from_secs(5), 100);
        let mut w = Work::default();
        w.redelete.insert("k".into(), 50);
        window.record(Instant::now(), &w);
        assert!(window.replay().is_none());
    }
}
