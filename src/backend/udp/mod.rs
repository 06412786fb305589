//! `udp`: flannel's userspace encapsulation. Pods' packets leave through the TUN device
//! `flannel0`; each one travels as the bare payload of one UDP datagram to the peer's public
//! IP on `Port` (8285), and is written into the peer's `flannel0`.
//!
//! Wire-compatible with flannel's udp backend (whose leases carry no `BackendType`), on a
//! faster data path: dedicated threads, TUN offloads (virtio-net header, TSO/USO), UDP GSO/GRO,
//! batched system calls, coalescing before the TUN write. Whatever the kernel lacks is turned
//! off at start. `FLANNEL_UDP_PLAIN=1` in the environment (or `"Plain": true` in the Backend
//! object) forces the plain path: one packet per system call, no offloads, like flannel.
//!
//! Modules: [`wire`] and [`offload`] are pure packet code, [`pipeline`] what the threads do
//! per packet, [`peers`] the lock-free peer table, [`device`] and [`socket`] the system
//! calls, [`fastpath`] the threads, [`counters`] the metrics.

pub mod counters;
pub mod device;
pub mod fastpath;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod kernel;
pub mod offload;
pub mod peers;
pub mod pipeline;
pub mod socket;
pub mod wire;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use ipnetwork::Ipv4Network;

use super::common::{self, fatal, ReconcileTally, Skipped};
use super::{Backend, BackendContext, BackendError, Publish, ReconcileReport};
use crate::netlink::{self, Netlink};
use crate::subnet::{Lease, PeerSet};
use counters::Counters;
use device::Tun;
use fastpath::{Features, Shared};
use peers::PeerTable;
use socket::UdpSock;

const BACKEND: &str = "udp";
/// The TUN device's name, as flannel names it.
pub const DEVICE: &str = "flannel0";
pub const DEFAULT_PORT: u16 = 8285;
/// Environment variable that forces the plain path when `1`, `true` or `yes`.
pub const PLAIN_ENV: &str = "FLANNEL_UDP_PLAIN";
/// IPv4 + UDP headers: the device MTU is the external MTU less this.
pub const OVERHEAD: u32 = 28;
/// Frames (datagrams) per batch on the fast path.
const BATCH: usize = 64;

/// The data path while it runs.
struct Running {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    index: u32,
    features: Features,
}

impl Running {
    fn alive(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }

    fn stop(self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

pub struct UdpBackend {
    ctx: BackendContext,
    network: Ipv4Network,
    port: u16,
    plain: bool,
    mtu: u32,
    nl: Option<Netlink>,
    run: Option<Running>,
    own: Option<Ipv4Network>,
    table: Arc<PeerTable>,
    skipped: Skipped,
    counters: Arc<Counters>,
}

fn setup(why: String) -> BackendError {
    BackendError::Setup {
        backend: BACKEND,
        why,
    }
}

fn io_failed(context: String) -> impl FnOnce(std::io::Error) -> BackendError {
    move |source| BackendError::Io {
        backend: BACKEND,
        context,
        source,
    }
}

/// Whether the environment forces the plain path.
pub fn plain_from_env() -> bool {
    std::env::var(PLAIN_ENV)
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
        .unwrap_or(false)
}

impl UdpBackend {
    pub fn new(ctx: BackendContext) -> Result<Self, BackendError> {
        let network = ctx.config.v4.map(|f| f.network).ok_or_else(|| {
            setup("needs an IPv4 Network (IPv6-only networks are not supported)".into())
        })?;
        let opts = &ctx.config.backend;
        let port = common::uint_option(BACKEND, opts, "Port", 65535)?
            .filter(|p| *p != 0)
            .map_or(DEFAULT_PORT, |p| p as u16);
        let plain = plain_from_env() || common::bool_option(BACKEND, opts, "Plain")?;
        let mtu = ctx
            .ext
            .mtu
            .checked_sub(OVERHEAD)
            .filter(|m| *m >= 68)
            .ok_or_else(|| {
                setup(format!(
                    "interface {} has MTU {}, too small for {} bytes of encapsulation",
                    ctx.ext.name, ctx.ext.mtu, OVERHEAD
                ))
            })?;
        let counters = Arc::new(Counters::default());
        ctx.metrics.udp.store(Some(counters.clone()));
        Ok(UdpBackend {
            ctx,
            network,
            port,
            plain,
            mtu,
            nl: None,
            run: None,
            own: None,
            table: Arc::new(PeerTable::default()),
            skipped: Skipped::new(),
            counters,
        })
    }

    /// The counters of this backend's data path.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The data-path features in use, once started.
    pub fn features(&self) -> Option<Features> {
        self.run.as_ref().map(|r| r.features)
    }

    fn bind_socket(&self) -> Result<UdpSock, BackendError> {
        let ext = &self.ctx.ext;
        let candidates: Vec<Ipv4Addr> = ext
            .public_ip
            .into_iter()
            .chain(ext.iface_addr.filter(|a| Some(*a) != ext.public_ip))
            .collect();
        if candidates.is_empty() {
            return Err(setup(format!("interface {} has no IPv4 address", ext.name)));
        }
        let mut errors = Vec::new();
        for ip in candidates {
            let addr = SocketAddrV4::new(ip, self.port);
            match UdpSock::bind(addr, !self.plain) {
                Ok(s) => return Ok(s),
                Err(e) => errors.push(format!("binding UDP socket to {addr}: {e}")),
            }
        }
        Err(setup(errors.join("; ")))
    }

    /// Opens the device and the socket and starts the threads.
    async fn start(&mut self) -> Result<(), BackendError> {
        if let Some(old) = self.run.take() {
            old.stop();
        }
        let tun = Tun::open(DEVICE, !self.plain)
            .map_err(io_failed(format!("opening TUN device {DEVICE}")))?;
        let index = nix::net::if_::if_nametoindex(DEVICE)
            .map_err(|e| io_failed(format!("index of {DEVICE}"))(e.into()))?;
        // The device carries IPv4 only: no IPv6 link-local address, router or multicast
        // listener messages for the data path to count as malformed.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{DEVICE}/disable_ipv6"),
            "1",
        );
        let nl = common::connect(BACKEND, &mut self.nl)?;
        kernel::set_up(&nl.h, DEVICE, index, self.mtu)
            .await
            .map_err(fatal(BACKEND, "setting the device up"))?;
        let sock = self.bind_socket()?;
        let features = if self.plain {
            Features::PLAIN
        } else {
            Features {
                vnet: tun.offloads.vnet,
                tso: tun.offloads.tso,
                uso: tun.offloads.uso,
                udp_gso: sock.gso,
                udp_gro: sock.gro,
                batch: BATCH,
            }
        };
        let why = if self.plain {
            format!(" (forced by {PLAIN_ENV} or the Plain option)")
        } else {
            String::new()
        };
        tracing::info!(
            "udp: {DEVICE} (MTU {}) ↔ {}: {}{why}",
            self.mtu,
            sock.local,
            features.describe()
        );
        let shared = Arc::new(Shared::new(self.counters.clone()));
        shared.peers.store(self.table.clone());
        let threads = fastpath::spawn(Arc::new(tun), Arc::new(sock), shared.clone(), features)
            .map_err(io_failed("starting the data-path threads".into()))?;
        self.run = Some(Running {
            shared,
            threads,
            index,
            features,
        });
        Ok(())
    }

    /// Gives the device our address and the route for the Network; removes stale ones.
    async fn program_device(&mut self, tally: &mut ReconcileTally) -> Result<(), BackendError> {
        let (Some(own), Some(index)) = (self.own, self.run.as_ref().map(|r| r.index)) else {
            return Ok(());
        };
        let nl = common::connect(BACKEND, &mut self.nl)?;
        let ext_index = self.ctx.ext.index;
        common::program_network_device(&nl, DEVICE, index, own, self.network, ext_index, tally)
            .await
    }

    /// Brings the device and threads back when the device was deleted or a thread ended, and
    /// the device up with the right MTU when someone changed it.
    async fn repair_device(&mut self, tally: &mut ReconcileTally) -> Result<(), BackendError> {
        let nl = common::connect(BACKEND, &mut self.nl)?;
        let link = netlink::link_by_name(&nl.h, DEVICE)
            .await
            .map_err(fatal(BACKEND, "reading the device"))?;
        let healthy = self
            .run
            .as_ref()
            .is_some_and(|r| r.alive() && link.as_ref().is_some_and(|l| l.index == r.index));
        if !healthy {
            tracing::warn!("udp: {DEVICE} or its data-path threads are gone; starting again");
            self.start().await?;
            tally.report.repaired += 1;
            return Ok(());
        }
        let link = link.expect("healthy implies present");
        if !link.up || link.mtu != Some(self.mtu) {
            kernel::set_up(&nl.h, DEVICE, link.index, self.mtu)
                .await
                .map_err(fatal(BACKEND, "setting the device up"))?;
            tracing::info!("udp: {DEVICE} set up again with MTU {}", self.mtu);
            tally.report.repaired += 1;
        }
        Ok(())
    }

    fn publish_table(&mut self, peers: &PeerSet, tally: &mut ReconcileTally) {
        let mut skipped = Skipped::new();
        let table = peer_table(peers, self.port, self.own, &mut skipped);
        let old: BTreeSet<_> = self.table.entries().iter().copied().collect();
        let new: BTreeSet<_> = table.entries().iter().copied().collect();
        for e in new.difference(&old) {
            tracing::info!("udp: peer {} via {}", fmt_route(e), e.2);
            tally.report.added += 1;
        }
        for e in old.difference(&new) {
            tracing::info!("udp: peer {} via {} removed", fmt_route(e), e.2);
            tally.report.removed += 1;
        }
        common::log_skipped(BACKEND, "", &mut self.skipped, skipped);
        // Also when only our own subnet changed: the table rejects inner sources inside it.
        if *self.table != table {
            self.table = Arc::new(table);
            if let Some(run) = &self.run {
                run.shared.peers.store(self.table.clone());
            }
        }
    }
}

/// The peer table of the udp peers among `peers` (the ones the peer filter accepted): flannel's
/// untyped leases and those of type udp with an IPv4 `PublicIP`. The others go into `skipped`.
fn peer_table(
    peers: &PeerSet,
    port: u16,
    own: Option<Ipv4Network>,
    skipped: &mut Skipped,
) -> PeerTable {
    let candidates = common::candidates::<Ipv4Network>(peers, BACKEND, skipped);
    PeerTable::new(
        candidates.iter().map(|c| (c.subnet, c.public_ip)),
        port,
        own,
    )
}

fn fmt_route(e: &(u32, u32, SocketAddrV4)) -> String {
    format!("{}/{}", Ipv4Addr::from(e.0), e.1.count_ones())
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            run.stop();
        }
    }
}

#[async_trait]
impl Backend for UdpBackend {
    async fn prepare(&mut self) -> Result<Publish, BackendError> {
        if self.run.is_none() {
            self.start().await?;
        }
        Ok(Publish {
            // flannel's udp backend leaves BackendType out of its leases; so do we.
            backend_type: String::new(),
            backend_data: None,
            backend_v6_data: None,
            mtu: self.mtu,
        })
    }

    async fn lease_acquired(&mut self, own: &Lease) -> Result<(), BackendError> {
        let subnet = own
            .key
            .ipv4
            .ok_or_else(|| setup(format!("our lease {} has no IPv4 subnet", own.key)))?;
        self.own = Some(subnet);
        if self.run.is_none() {
            self.start().await?;
        }
        let mut tally = ReconcileTally::new(BACKEND);
        self.program_device(&mut tally).await?;
        tally.finish().map(|_| ())
    }

    async fn reconcile(&mut self, peers: &PeerSet) -> Result<ReconcileReport, BackendError> {
        let mut tally = ReconcileTally::new(BACKEND);
        self.repair_device(&mut tally).await?;
        self.program_device(&mut tally).await?;
        self.publish_table(peers, &mut tally);
        tally.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetworkConfig;
    use crate::iface::ExternalInterface;
    use crate::metrics;

    fn context() -> BackendContext {
        let config =
            NetworkConfig::parse(br#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#).unwrap();
        let public = Some("198.18.0.1".parse().unwrap());
        let ext = ExternalInterface {
            name: "eth0".into(),
            index: 2,
            iface_addr: public,
            iface_v6_addr: None,
            public_ip: public,
            public_ipv6: None,
            mtu: 1500,
        };
        BackendContext::new(config, ext)
    }

    fn lease(key: &str, json: &str) -> (crate::subnet::SubnetKey, Lease) {
        let key: crate::subnet::SubnetKey = key.parse().unwrap();
        let attrs = crate::subnet::LeaseAttrs::from_json("k", json.as_bytes()).unwrap();
        let lease = Lease {
            key,
            attrs,
            etcd_lease: Some(1),
            revision: 1,
            create_revision: 1,
        };
        (key, lease)
    }

    #[test]
    fn udp_and_untyped_leases_are_peers_others_are_not() {
        let peers: PeerSet = [
            lease("10.5.2.0-24", r#"{"PublicIP":"198.18.0.2"}"#),
            lease(
                "10.5.3.0-24",
                r#"{"PublicIP":"198.18.0.3","BackendType":"udp"}"#,
            ),
            lease(
                "10.5.4.0-24",
                r#"{"PublicIP":"198.18.0.4","BackendType":"vxlan"}"#,
            ),
            lease("10.5.5.0-24", r#"{"PublicIP":null}"#),
        ]
        .into_iter()
        .collect();
        let own: Ipv4Network = "10.5.1.0/24".parse().unwrap();
        let mut skipped = Skipped::new();
        let t = peer_table(&peers, 8285, Some(own), &mut skipped);
        assert_eq!(t.len(), 2);
        let why = |k: &str| skipped[&k.parse().unwrap()].clone();
        assert_eq!(why("10.5.4.0-24"), r#"backend type "vxlan" is not udp"#);
        assert_eq!(why("10.5.5.0-24"), "lease has no PublicIP");
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            t.lookup(ip("10.5.2.77")),
            Some("198.18.0.2:8285".parse().unwrap())
        );
        assert_eq!(
            t.lookup(ip("10.5.3.1")),
            Some("198.18.0.3:8285".parse().unwrap())
        );
        assert_eq!(t.lookup(ip("10.5.4.1")), None);
        assert!(t.is_peer(ip("198.18.0.2")) && t.is_peer(ip("198.18.0.3")));
        assert!(!t.is_peer(ip("198.18.0.4")) && !t.is_peer(ip("198.18.0.9")));
        // Our own subnet stays ours for the reverse path check.
        assert!(!t.sent_by("198.18.0.2:8285".parse().unwrap(), ip("10.5.1.7")));
    }

    #[test]
    fn counters_reach_the_metrics_of_their_own_context() {
        let (a, b) = (context(), context());
        let backend_a = UdpBackend::new(a.clone()).unwrap();
        let _backend_b = UdpBackend::new(b.clone()).unwrap();
        backend_a
            .counters()
            .tx
            .packets
            .fetch_add(5, Ordering::Relaxed);
        let tx = |ctx: &BackendContext| {
            let text = metrics::render(&metrics::registry(ctx.metrics.clone()));
            text.lines()
                .find_map(|l| l.strip_prefix(r#"flannel_udp_packets_total{direction="tx"} "#))
                .map(str::to_string)
        };
        assert_eq!(
            tx(&a).as_deref(),
            Some("5"),
            "backend A's counters at A's /metrics"
        );
        assert_eq!(
            tx(&b).as_deref(),
            Some("0"),
            "backend B's counters at B's /metrics"
        );
        // Other backends have no udp data path: no udp lines.
        assert_eq!(
            tx(&BackendContext::new(a.config.clone(), a.ext.clone())),
            None
        );
    }
}
