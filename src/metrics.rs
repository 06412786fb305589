//! Counters and gauges the daemon exposes at `/metrics` in Prometheus text format, encoded by
//! `prometheus-client` from the atomics the daemon counts into.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::backend::udp::counters::{Counters as UdpCounters, DirStats};
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
    /// The wireguard backend's userspace engine counters, likewise.
    pub wireguard: ArcSwapOption<crate::backend::wireguard::counters::Counters>,
    /// What `/v1/status` shows beyond counters.
    pub status: crate::status::Board,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The answer of `/v1/status`: the board plus what only the counters know.
    pub fn status(&self) -> crate::status::Status {
        let expiry = self.lease_expiry_seconds.load(Ordering::Relaxed);
        let udp = self.udp.load_full().map(|u| {
            let (tx, rx) = (u.tx.snapshot(), u.rx.snapshot());
            let dropped = |d: &DirStats| {
                d.no_route
                    + d.unknown_source
                    + d.spoofed_source
                    + d.malformed
                    + d.ttl_expired
                    + d.io_errors
            };
            crate::status::UdpStatus {
                tx_packets: tx.packets,
                tx_bytes: tx.bytes,
                tx_dropped: dropped(&tx),
                rx_packets: rx.packets,
                rx_bytes: rx.bytes,
                rx_dropped: dropped(&rx),
            }
        });
        self.status.snapshot(
            self.etcd_up.load(Ordering::Relaxed),
            u64::try_from(expiry).ok().filter(|&e| e > 0),
            udp,
        )
    }
}

/// The registry the health server encodes `/metrics` from: it reads [`Metrics`] on each
/// scrape, so the daemon keeps counting into plain atomics.
pub fn registry(metrics: Arc<Metrics>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exporter(metrics)));
    registry
}

/// `/metrics` in the Prometheus text format 0.0.4 (what flannel's Go client serves).
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut out, registry);
    out
}

#[derive(Debug)]
struct Exporter(Arc<Metrics>);

/// Counter names are given without `_total`: the encoder appends it.
impl Collector for Exporter {
    fn encode(&self, mut out: DescriptorEncoder) -> fmt::Result {
        let m = &self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let flag = |a: &AtomicBool| i64::from(a.load(Ordering::Relaxed));
        let gauges = [
            (
                "flannel_ready",
                "1 once the lease is held and the subnet file written.",
                flag(&m.ready),
            ),
            (
                "flannel_lease_expiry_timestamp_seconds",
                "Unix time at which the own subnet lease expires unless renewed.",
                m.lease_expiry_seconds.load(Ordering::Relaxed),
            ),
            (
                "flannel_peers",
                "Peer leases the backends program (leases under the prefix other than our own, less the rejected ones).",
                i64::try_from(get(&m.peers)).unwrap_or(i64::MAX),
            ),
            (
                "flannel_etcd_up",
                "1 when the last etcd request succeeded (with --kube-subnet-mgr: the last Kubernetes API server request).",
                flag(&m.etcd_up),
            ),
        ];
        for (name, help, value) in gauges {
            let sample = out.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(sample)?;
        }
        let counters = [
            (
                "flannel_etcd_errors",
                "Failed etcd requests and broken watch streams (with --kube-subnet-mgr: Kubernetes API server requests and Node watches).",
                &m.etcd_errors,
            ),
            (
                "flannel_watch_relists",
                "Full re-lists of the subnet prefix (start, compaction, reconnect).",
                &m.watch_relists,
            ),
            (
                "flannel_lease_renewals",
                "Successful renewals of the own lease.",
                &m.renewals,
            ),
            (
                "flannel_lease_acquisitions",
                "Times the own lease was acquired or re-acquired.",
                &m.acquisitions,
            ),
            (
                "flannel_malformed_leases",
                "Peer leases skipped because their key or value could not be parsed.",
                &m.malformed_leases,
            ),
            (
                "flannel_reconciles",
                "Data-plane reconciliation passes.",
                &m.reconciles,
            ),
            (
                "flannel_reconcile_errors",
                "Data-plane reconciliation passes that failed.",
                &m.reconcile_errors,
            ),
            (
                "flannel_kernel_events",
                "Kernel notifications about flanneld's devices, routes or entries (each wakes the data plane for a repair pass).",
                &m.kernel_events,
            ),
            (
                "flannel_dataplane_entries_added",
                "Kernel entries added by reconciliation.",
                &m.dataplane_added,
            ),
            (
                "flannel_dataplane_entries_removed",
                "Stale kernel entries removed by reconciliation.",
                &m.dataplane_removed,
            ),
            (
                "flannel_dataplane_repairs",
                "Devices or entries re-created after they were changed or deleted.",
                &m.dataplane_repaired,
            ),
            (
                "flannel_firewall_restores",
                "Times the masquerade/forward rules were found missing and restored.",
                &m.firewall_restores,
            ),
        ];
        for (name, help, value) in counters {
            counter(&mut out, name, help, get(value))?;
        }
        counter_family(
            &mut out,
            "flannel_rejected_leases",
            "Leases refused as peers, by reason; each key counts once per reason it is rejected for.",
            Reason::ALL.map(|r| ([("reason", r.label())], get(&m.rejected_leases[r.index()]))),
        )?;
        if let Some(udp) = m.udp.load_full() {
            encode_udp(&mut out, &udp)?;
        }
        if let Some(wg) = m.wireguard.load_full() {
            encode_wireguard(&mut out, &wg)?;
        }
        Ok(())
    }
}

/// The udp backend's data path, per direction: tx = TUN → peers, rx = peers → TUN.
fn encode_udp(out: &mut DescriptorEncoder, udp: &UdpCounters) -> fmt::Result {
    let dirs = [("tx", udp.tx.snapshot()), ("rx", udp.rx.snapshot())];
    let per_direction = |value: fn(&DirStats) -> u64| {
        dirs.map(|(dir, stats)| ([("direction", dir)], value(&stats)))
    };
    counter_family(
        out,
        "flannel_udp_packets",
        "Inner packets the udp backend forwarded, by direction (tx: TUN to peers, rx: peers to TUN).",
        per_direction(|d| d.packets),
    )?;
    counter_family(
        out,
        "flannel_udp_bytes",
        "Inner IP bytes the udp backend forwarded, by direction.",
        per_direction(|d| d.bytes),
    )?;
    let drops = dirs.iter().flat_map(|(dir, d)| {
        [
            ("no_route", d.no_route),
            ("unknown_source", d.unknown_source),
            ("spoofed_source", d.spoofed_source),
            ("malformed", d.malformed),
            ("ttl_expired", d.ttl_expired),
            ("io_error", d.io_errors),
        ]
        .map(|(reason, v)| ([("direction", *dir), ("reason", reason)], v))
    });
    counter_family(
        out,
        "flannel_udp_drops",
        "Inner packets the udp backend dropped, by direction and reason.",
        drops,
    )?;
    counter(
        out,
        "flannel_udp_icmp_unreachable",
        "ICMP net unreachable replies sent for packets with no peer.",
        udp.icmp_unreachable.load(Ordering::Relaxed),
    )
}

/// The wireguard engine: inner packets and bytes, drops by reason, handshake messages; per
/// direction (tx = TUN to peers, rx = peers to TUN).
fn encode_wireguard(
    out: &mut DescriptorEncoder,
    wg: &crate::backend::wireguard::counters::Counters,
) -> fmt::Result {
    use crate::backend::wireguard::counters::Drop;
    let dirs = [("tx", &wg.tx), ("rx", &wg.rx)];
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    counter_family(
        out,
        "flannel_wireguard_packets",
        "Inner packets the wireguard engine forwarded, by direction (tx: TUN to peers, rx: peers to TUN).",
        dirs.map(|(dir, d)| ([("direction", dir)], get(&d.packets))),
    )?;
    counter_family(
        out,
        "flannel_wireguard_bytes",
        "Inner IP bytes the wireguard engine forwarded, by direction.",
        dirs.map(|(dir, d)| ([("direction", dir)], get(&d.bytes))),
    )?;
    let drops = dirs.iter().flat_map(|(dir, d)| {
        Drop::ALL.map(|why| {
            (
                [("direction", *dir), ("reason", why.label())],
                d.dropped(why),
            )
        })
    });
    counter_family(
        out,
        "flannel_wireguard_drops",
        "Packets the wireguard engine dropped, by direction and reason.",
        drops,
    )?;
    let h = &wg.handshakes;
    let handshakes = [
        ("initiation", "tx", &h.initiations_sent),
        ("initiation", "rx", &h.initiations_received),
        ("response", "tx", &h.responses_sent),
        ("response", "rx", &h.responses_received),
        ("cookie_reply", "tx", &h.cookie_replies_sent),
        ("cookie_reply", "rx", &h.cookie_replies_received),
    ]
    .map(|(msg, dir, c)| ([("message", msg), ("direction", dir)], get(c)));
    counter_family(
        out,
        "flannel_wireguard_handshake_messages",
        "WireGuard handshake messages sent (tx) and received (rx), by message type.",
        handshakes,
    )
}

/// One counter (`name` + `_total`) without labels.
fn counter(out: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let sample = out.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(sample)
}

/// One counter (`name` + `_total`) with a sample per label set.
fn counter_family<L: EncodeLabelSet>(
    out: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut family = out.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
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
        let m = Arc::new(Metrics::default());
        Metrics::inc(&m.malformed_leases);
        m.peers.store(3, Ordering::Relaxed);
        m.lease_rejected(Reason::OverlapsOwn);
        let text = render(&registry(m));
        assert!(
            text.starts_with("# HELP flannel_ready 1 once the lease is held"),
            "{text}"
        );
        assert!(
            text.contains("\nflannel_malformed_leases_total 1\n"),
            "{text}"
        );
        assert!(text.contains("\nflannel_peers 3\n"));
        assert!(text.contains("\n# HELP flannel_watch_relists_total Full re-lists"));
        assert!(text.contains("# TYPE flannel_watch_relists_total counter\n"));
        assert!(
            text.contains("\nflannel_rejected_leases_total{reason=\"overlaps_own\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("\nflannel_rejected_leases_total{reason=\"outside_network\"} 0\n"));
        assert!(
            !text.contains("flannel_udp_"),
            "no udp backend, no udp counters"
        );
        // Prometheus text 0.0.4, as flannel serves: no OpenMetrics `# EOF`.
        assert!(!text.contains("# EOF"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.split_once(' ').unwrap();
            assert!(name.starts_with("flannel_"));
            value.parse::<f64>().unwrap();
        }
    }

    #[test]
    fn renders_the_udp_data_path_per_direction() {
        let m = Arc::new(Metrics::default());
        let udp = Arc::new(UdpCounters::default());
        udp.rx.add(&DirStats {
            packets: 7,
            bytes: 700,
            spoofed_source: 2,
            ..Default::default()
        });
        m.udp.store(Some(udp));
        let text = render(&registry(m));
        for line in [
            "# TYPE flannel_udp_packets_total counter",
            "flannel_udp_packets_total{direction=\"tx\"} 0",
            "flannel_udp_packets_total{direction=\"rx\"} 7",
            "flannel_udp_bytes_total{direction=\"rx\"} 700",
            "flannel_udp_drops_total{direction=\"rx\",reason=\"spoofed_source\"} 2",
            "flannel_udp_drops_total{direction=\"tx\",reason=\"io_error\"} 0",
            "flannel_udp_icmp_unreachable_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
    }
}
