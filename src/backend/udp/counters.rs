//! Per-direction counters of the udp data path, shown at `/metrics` through the
//! [`Metrics`](crate::metrics::Metrics) of the backend's context.
//!
//! The data-path threads count into a plain [`DirStats`] per batch and add it to the atomics
//! once per batch, so counting costs nothing per packet.

use std::sync::atomic::{AtomicU64, Ordering};

use super::wire::Drop;

/// Counts of one direction, gathered over one batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirStats {
    pub packets: u64,
    pub bytes: u64,
    pub no_route: u64,
    pub unknown_source: u64,
    pub spoofed_source: u64,
    pub malformed: u64,
    pub ttl_expired: u64,
    /// Packets the socket or the device refused.
    pub io_errors: u64,
}

impl DirStats {
    pub fn dropped(&mut self, why: Drop) {
        match why {
            Drop::NoRoute => self.no_route += 1,
            Drop::UnknownSource => self.unknown_source += 1,
            Drop::SpoofedSource => self.spoofed_source += 1,
            Drop::Malformed => self.malformed += 1,
            Drop::TtlExpired => self.ttl_expired += 1,
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == DirStats::default()
    }
}

/// The atomics of one direction, on their own cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct DirCounters {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub no_route: AtomicU64,
    pub unknown_source: AtomicU64,
    pub spoofed_source: AtomicU64,
    pub malformed: AtomicU64,
    pub ttl_expired: AtomicU64,
    pub io_errors: AtomicU64,
}

impl DirCounters {
    pub fn add(&self, s: &DirStats) {
        if s.is_zero() {
            return;
        }
        let add = |a: &AtomicU64, v: u64| {
            if v != 0 {
                a.fetch_add(v, Ordering::Relaxed);
            }
        };
        add(&self.packets, s.packets);
        add(&self.bytes, s.bytes);
        add(&self.no_route, s.no_route);
        add(&self.unknown_source, s.unknown_source);
        add(&self.spoofed_source, s.spoofed_source);
        add(&self.malformed, s.malformed);
        add(&self.ttl_expired, s.ttl_expired);
        add(&self.io_errors, s.io_errors);
    }

    pub fn snapshot(&self) -> DirStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DirStats {
            packets: get(&self.packets),
            bytes: get(&self.bytes),
            no_route: get(&self.no_route),
            unknown_source: get(&self.unknown_source),
            spoofed_source: get(&self.spoofed_source),
            malformed: get(&self.malformed),
            ttl_expired: get(&self.ttl_expired),
            io_errors: get(&self.io_errors),
        }
    }
}

/// Counters of one udp backend.
#[derive(Debug, Default)]
pub struct Counters {
    /// TUN → socket: packets our pods send to peers.
    pub tx: DirCounters,
    /// Socket → TUN: packets peers send to our pods.
    pub rx: DirCounters,
    /// ICMP "net unreachable" replies written into the TUN device.
    pub icmp_unreachable: AtomicU64,
}
