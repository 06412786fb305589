//! Remembers which malformed entries under the subnets prefix were already reported, so that a
//! re-list does not count and log them again, in bounded memory; and rate-limits the warnings,
//! since anyone with write access to the prefix can put as many bad entries as they like.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use super::lease::LeaseError;
use crate::metrics::Metrics;

/// Entries remembered at most; past this, new ones are still counted and (rate-limited) logged,
/// just possibly again after a re-list.
pub const MAX_REMEMBERED: usize = 4096;
/// Warnings logged per window; the rest are summed up in the next warning.
const WARNINGS_PER_WINDOW: u32 = 5;
const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct MalformedTracker {
    /// Hash of the key → the mod revision reported. Keys can be megabytes long: keep a hash.
    reported: HashMap<u64, i64>,
    window_start: Option<Instant>,
    logged_in_window: u32,
    suppressed: u64,
}

impl Default for MalformedTracker {
    fn default() -> Self {
        Self::new()
    }
}

fn key_hash(key: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

impl MalformedTracker {
    pub fn new() -> Self {
        MalformedTracker {
            reported: HashMap::new(),
            window_start: None,
            logged_in_window: 0,
            suppressed: 0,
        }
    }

    /// Number of entries remembered (for tests).
    pub fn remembered(&self) -> usize {
        self.reported.len()
    }

    /// A malformed entry at `key`, written at `revision`: counted and logged once per write.
    pub fn note(&mut self, key: &[u8], revision: i64, err: &LeaseError, metrics: &Metrics) {
        let h = key_hash(key);
        if self.reported.get(&h) == Some(&revision) {
            return;
        }
        if self.reported.len() < MAX_REMEMBERED || self.reported.contains_key(&h) {
            self.reported.insert(h, revision);
        }
        Metrics::inc(&metrics.malformed_leases);
        self.warn(err);
    }

    /// The key was deleted or now holds a valid lease.
    pub fn forget(&mut self, key: &[u8]) {
        self.reported.remove(&key_hash(key));
    }

    /// After a full listing: only the malformed entries it found are still there.
    pub fn retain_listed<'a>(&mut self, keys: impl IntoIterator<Item = &'a [u8]>) {
        let listed: std::collections::HashSet<u64> = keys.into_iter().map(key_hash).collect();
        self.reported.retain(|h, _| listed.contains(h));
    }

    fn warn(&mut self, err: &LeaseError) {
        let now = Instant::now();
        let window_over = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW);
        if window_over {
            self.window_start = Some(now);
            self.logged_in_window = 0;
        }
        if self.logged_in_window >= WARNINGS_PER_WINDOW {
            self.suppressed += 1;
            return;
        }
        self.logged_in_window += 1;
        match std::mem::take(&mut self.suppressed) {
            0 => tracing::warn!("skipping malformed lease: {err}"),
            n => tracing::warn!(
                "skipping malformed lease: {err} ({n} more malformed leases not logged; \
                 see flannel_malformed_leases_total)"
            ),
        }
    }

    /// Warnings held back in the current window (for tests).
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(key: &str) -> LeaseError {
        LeaseError::BadValue {
            key: key.into(),
            why: "bad".into(),
        }
    }

    #[test]
    fn each_write_is_counted_once() {
        let m = Metrics::default();
        let mut t = MalformedTracker::new();
        t.note(b"/p/subnets/a", 5, &err("a"), &m);
        t.note(b"/p/subnets/a", 5, &err("a"), &m);
        assert_eq!(
            m.malformed_leases
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        t.note(b"/p/subnets/a", 6, &err("a"), &m);
        assert_eq!(
            m.malformed_leases
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        assert_eq!(t.remembered(), 1);
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_bad_puts() {
        let m = Metrics::default();
        let mut t = MalformedTracker::new();
        for i in 0..(3 * MAX_REMEMBERED) {
            let key = format!("/p/subnets/junk-{i}");
            t.note(key.as_bytes(), i as i64, &err(&key), &m);
        }
        assert!(t.remembered() <= MAX_REMEMBERED, "{}", t.remembered());
        assert_eq!(
            m.malformed_leases
                .load(std::sync::atomic::Ordering::Relaxed),
            3 * MAX_REMEMBERED as u64
        );
        // All but the first few warnings of the window were held back.
        assert_eq!(
            t.suppressed(),
            3 * MAX_REMEMBERED as u64 - u64::from(WARNINGS_PER_WINDOW)
        );
    }

    #[test]
    fn deleted_and_relisted_entries_are_forgotten() {
        let m = Metrics::default();
        let mut t = MalformedTracker::new();
        t.note(b"k1", 1, &err("k1"), &m);
        t.note(b"k2", 2, &err("k2"), &m);
        t.note(b"k3", 3, &err("k3"), &m);
        t.forget(b"k1");
        assert_eq!(t.remembered(), 2);
        t.retain_listed([b"k3".as_slice()]);
        assert_eq!(t.remembered(), 1);
        // Still remembered: not counted again.
        t.note(b"k3", 3, &err("k3"), &m);
        assert_eq!(
            m.malformed_leases
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
    }
}
