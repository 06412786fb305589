//! Counters and gauges the daemon exposes at `/metrics` in Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use arc_swap::ArcSwapOption;

use crate::backend::udp::counters::Counters as UdpCounters;
use crate::subnet::peers::Reason;

/// Shared, lock-free daemon state for the health server.
#[derive(Debug, Default)]
pub struct Metrics {
    pub ready: AtomicBool,
    pub lease_expiry_seconds: AtomicI64,
    pub peers: AtomicU64,
    pub etcd_errors: AtomicU64,
    pub etcd_up: AtomicBool,
    pub watch_relists: AtomicU64,
    pub renewals: AtomicU64,
    pub acquisitions: AtomicU64,
    pub malformed_leases: AtomicU64,
    pub reconciles: AtomicU64,
    pub reconcile_errors: AtomicU64,
    pub kernel_events: AtomicU64,
    pub dataplane_added: AtomicU64,
    pub dataplane_removed: AtomicU64,
    pub dataplane_repaired: AtomicU64,
    pub firewall_restores: AtomicU64,
    /// By [`Reason::index`].
    pub rejected_leases: [AtomicU64; Reason::ALL.len()],
    /// The udp backend's data-path counters, set by the backend built with this `Metrics` in
    /// its context; none for the other backends.
    pub udp: ArcSwapOption<UdpCounters>,
}

struct Line {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: String,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let flag = |a: &AtomicBool| u8::from(a.load(Ordering::Relaxed)).to_string();
        let lines = [
            Line {
                name: "flannel_ready",
                kind: "gauge",
                help: "1 once the lease is held and the subnet file written.",
                value: flag(&self.ready),
            },
            Line {
                name: "flannel_lease_expiry_timestamp_seconds",
                kind: "gauge",
                help: "Unix time at which the own subnet lease expires unless renewed.",
                value: self
                    .lease_expiry_seconds
                    .load(Ordering::Relaxed)
                    .to_string(),
            },
            Line {
                name: "flannel_peers",
                kind: "gauge",
                help: "Peer leases the backends program (leases under the prefix other than our own, less the rejected ones).",
                value: get(&self.peers),
            },
            Line {
                name: "flannel_etcd_up",
                kind: "gauge",
                help: "1 when the last etcd request succeeded.",
                value: flag(&self.etcd_up),
            },
            Line {
                name: "flannel_etcd_errors_total",
                kind: "counter",
                help: "Failed etcd requests and broken watch streams.",
                value: get(&self.etcd_errors),
            },
            Line {
                name: "flannel_watch_relists_total",
                kind: "counter",
                help: "Full re-lists of the subnet prefix (start, compaction, reconnect).",
                value: get(&self.watch_relists),
            },
            Line {
                name: "flannel_lease_renewals_total",
                kind: "counter",
                help: "Successful renewals of the own lease.",
                value: get(&self.renewals),
            },
            Line {
                name: "flannel_lease_acquisitions_total",
                kind: "counter",
                help: "Times the own lease was acquired or re-acquired.",
                value: get(&self.acquisitions),
            },
            Line {
                name: "flannel_malformed_leases_total",
                kind: "counter",
                help: "Peer leases skipped because their key or value could not be parsed.",
                value: get(&self.malformed_leases),
            },
            Line {
                name: "flannel_reconciles_total",
                kind: "counter",
                help: "Data-plane reconciliation passes.",
                value: get(&self.reconciles),
            },
            Line {
                name: "flannel_reconcile_errors_total",
                kind: "counter",
                help: "Data-plane reconciliation passes that failed.",
                value: get(&self.reconcile_errors),
            },
            Line {
                name: "flannel_kernel_events_total",
                kind: "counter",
                help: "Kernel notifications about flanneld's devices, routes or entries (each wakes the data plane for a repair pass).",
                value: get(&self.kernel_events),
            },
            Line {
                name: "flannel_dataplane_entries_added_total",
                kind: "counter",
                help: "Kernel entries added by reconciliation.",
                value: get(&self.dataplane_added),
            },
            Line {
                name: "flannel_dataplane_entries_removed_total",
                kind: "counter",
                help: "Stale kernel entries removed by reconciliation.",
                value: get(&self.dataplane_removed),
            },
            Line {
                name: "flannel_dataplane_repairs_total",
                kind: "counter",
                help: "Devices or entries re-created after they were changed or deleted.",
                value: get(&self.dataplane_repaired),
            },
            Line {
                name: "flannel_firewall_restores_total",
                kind: "counter",
                help: "Times the masquerade/forward rules were found missing and restored.",
                value: get(&self.firewall_restores),
            },
        ];
        let mut out = String::new();
        for l in lines {
            let _ = writeln!(out, "# HELP {} {}", l.name, l.help);
            let _ = writeln!(out, "# TYPE {} {}", l.name, l.kind);
            let _ = writeln!(out, "{} {}", l.name, l.value);
        }
        let name = "flannel_rejected_leases_total";
        let _ = writeln!(
            out,
            "# HELP {name} Leases refused as peers, by reason; each key counts once per reason it is rejected for."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        for reason in Reason::ALL {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                reason.label(),
                get(&self.rejected_leases[reason.index()])
            );
        }
        // The udp backend's data path, per direction: tx = TUN → peers, rx = peers → TUN.
        if let Some(udp) = self.udp.load_full() {
            let dirs = [("tx", udp.tx.snapshot()), ("rx", udp.rx.snapshot())];
            let header = |out: &mut String, name: &str, help: &str| {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} counter");
            };
            header(
                &mut out,
                "flannel_udp_packets_total",
                "Inner packets the udp backend forwarded, by direction (tx: TUN to peers, rx: peers to TUN).",
            );
            for (dir, d) in &dirs {
                let _ = writeln!(
                    out,
                    "flannel_udp_packets_total{{direction=\"{dir}\"}} {}",
                    d.packets
                );
            }
            header(
                &mut out,
                "flannel_udp_bytes_total",
                "Inner IP bytes the udp backend forwarded, by direction.",
            );
            for (dir, d) in &dirs {
                let _ = writeln!(
                    out,
                    "flannel_udp_bytes_total{{direction=\"{dir}\"}} {}",
                    d.bytes
                );
            }
            header(
                &mut out,
                "flannel_udp_drops_total",
                "Inner packets the udp backend dropped, by direction and reason.",
            );
            for (dir, d) in &dirs {
                for (reason, v) in [
                    ("no_route", d.no_route),
                    ("unknown_source", d.unknown_source),
                    ("spoofed_source", d.spoofed_source),
                    ("malformed", d.malformed),
                    ("ttl_expired", d.ttl_expired),
                    ("io_error", d.io_errors),
                ] {
                    let _ = writeln!(
                        out,
                        "flannel_udp_drops_total{{direction=\"{dir}\",reason=\"{reason}\"}} {v}"
                    );
                }
            }
            header(
                &mut out,
                "flannel_udp_icmp_unreachable_total",
                "ICMP net unreachable replies sent for packets with no peer.",
            );
            let _ = writeln!(
                out,
                "flannel_udp_icmp_unreachable_total {}",
                udp.icmp_unreachable.load(Ordering::Relaxed)
            );
        }
        out
    }
}

impl Metrics {
    pub fn set_etcd_up(&self, up: bool) {
        self.etcd_up.store(up, Ordering::Relaxed);
    }

    pub fn lease_rejected(&self, reason: Reason) {
        Self::inc(&self.rejected_leases[reason.index()]);
    }

    pub fn etcd_error(&self, _err: &dyn std::fmt::Display) {
        Self::inc(&self.etcd_errors);
        self.set_etcd_up(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        Metrics::inc(&m.malformed_leases);
        m.peers.store(3, Ordering::Relaxed);
        m.lease_rejected(Reason::OverlapsOwn);
        let text = m.render();
        assert!(
            text.contains("\nflannel_malformed_leases_total 1\n"),
            "{text}"
        );
        assert!(text.contains("\nflannel_peers 3\n"));
        assert!(text.contains("# TYPE flannel_watch_relists_total counter\n"));
        assert!(
            text.contains("\nflannel_rejected_leases_total{reason=\"overlaps_own\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("\nflannel_rejected_leases_total{reason=\"outside_network\"} 0\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.split_once(' ').unwrap();
            assert!(name.starts_with("flannel_"));
            value.parse::<f64>().unwrap();
        }
    }
}
