//! The userspace engine's counters, shown at `/metrics` as `flannel_wireguard_*`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a packet was dropped. tx = from the TUN device towards peers, rx = from the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// tx: no peer's allowed IPs hold the destination.
    NoRoute,
    /// Not an IP packet (tx) or not a WireGuard message (rx).
    Malformed,
    /// rx: a message for a session or key we do not know.
    UnknownPeer,
    /// rx: authentication failed (bad MAC, AEAD tag, handshake).
    Invalid,
    /// rx: a counter seen before, or past the replay window.
    Replay,
    /// rx: the decrypted packet's source is not in the sender's allowed IPs.
    SpoofedSource,
    /// rx: a handshake refused because of load (a cookie reply was sent instead).
    UnderLoad,
    /// The system refused to send or write.
    IoError,
}

impl Drop {
    pub const ALL: [Drop; 8] = [
        Drop::NoRoute,
        Drop::Malformed,
        Drop::UnknownPeer,
        Drop::Invalid,
        Drop::Replay,
        Drop::SpoofedSource,
        Drop::UnderLoad,
        Drop::IoError,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Drop::NoRoute => "no_route",
            Drop::Malformed => "malformed",
            Drop::UnknownPeer => "unknown_peer",
            Drop::Invalid => "invalid",
            Drop::Replay => "replay",
            Drop::SpoofedSource => "spoofed_source",
            Drop::UnderLoad => "under_load",
            Drop::IoError => "io_error",
        }
    }
}

/// One direction's counters.
#[derive(Debug, Default)]
pub struct DirCounters {
    /// Inner packets moved.
    pub packets: AtomicU64,
    /// Inner IP bytes moved.
    pub bytes: AtomicU64,
    drops: [AtomicU64; 8],
}

impl DirCounters {
    pub fn count(&self, packets: u64, bytes: u64) {
        if packets > 0 {
            self.packets.fetch_add(packets, Ordering::Relaxed);
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub fn drop(&self, why: Drop) {
        self.drops[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self, why: Drop) -> u64 {
        self.drops[why as usize].load(Ordering::Relaxed)
    }
}

/// Handshake messages, by kind and direction.
#[derive(Debug, Default)]
pub struct Handshakes {
    pub initiations_sent: AtomicU64,
    pub initiations_received: AtomicU64,
    pub responses_sent: AtomicU64,
    pub responses_received: AtomicU64,
    pub cookie_replies_sent: AtomicU64,
    pub cookie_replies_received: AtomicU64,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub tx: DirCounters,
    pub rx: DirCounters,
    pub handshakes: Handshakes,
}

pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}
