//! `vxlan`: the kernel's VXLAN devices, programmed over rtnetlink.
//!
//! One device per IP family carries the overlay: `flannel.<VNI>` for IPv4 (underlay and
//! overlay IPv4) and `flannel-v6.<VNI>` for IPv6 (underlay and overlay IPv6); a dual-stack
//! network has both, an IPv6-only one (`EnableIPv4: false`) only the second. For each peer
//! lease of type `vxlan` and each family it has, the kernel gets three entries, as flannel
//! programs them:
//! 1. a permanent neighbour entry on the device: peer subnet's network address → peer VtepMAC
//!    (`BackendData` / `BackendV6Data`);
//! 2. a permanent FDB entry (`self`): peer VtepMAC → peer `PublicIP` / `PublicIPv6`;
//! 3. a route: peer subnet via the peer subnet's network address, dev the device, onlink.
//!
//! With `DirectRouting`, a peer whose public IP is on the external interface's own L2 subnet
//! gets a plain route via its public IP on the external interface instead.
//!
//! Reconciliation is level-triggered: every full pass reads each device, its neighbours and FDB
//! entries and the routes we own (dumps filtered by device), and changes only what differs
//! from the PeerSet — all changes of a pass in one netlink batch. A lease event only applies
//! the difference to what the last pass programmed (`Backend::update`), in one batch too. A
//! restart adopts what the last run left; a deleted device is re-created with the same MAC.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use async_trait::async_trait;
use ipnetwork::{Ipv4Network, Ipv6Network};
use serde_json::json;

use super::common::{
    self, fatal, Effect, EventPlanner, LeaseEvent, LeaseFamily, Plan, ReconcileTally,
};
use super::{Backend, BackendContext, BackendError, Publish, ReconcileReport};
use crate::iface::ExternalInterface;
use crate::netlink::{self, format_mac, parse_mac, Link, Mac, Netlink, Route, VxlanSpec};
use crate::subnet::{Lease, PeerSet, SubnetKey};

const BACKEND: &str = "vxlan";
/// The kernel's (and flannel's) VXLAN port when `Port` is 0 or absent; set explicitly.
pub const DEFAULT_PORT: u16 = 8472;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
pub const ENCAP_OVERHEAD: u32 = 50;
/// Outer IPv6 (40) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
pub const ENCAP_OVERHEAD_V6: u32 = 70;
const MAX_VNI: u64 = (1 << 24) - 1;

/// The vxlan options of the `Backend` object, with flannel's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanOptions {
    pub vni: u32,
    /// The UDP port; 0 in the config means [`DEFAULT_PORT`].
    pub port: u16,
    pub gbp: bool,
    pub learning: bool,
    /// `MTU` of the underlay to assume; `None` means the external interface's MTU.
    pub mtu: Option<u32>,
    pub direct_routing: bool,
}

impl VxlanOptions {
    /// Reads the options from the `Backend` object (keys case-insensitive, as in flannel).
    pub fn from_backend(
        backend: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, BackendError> {
        let vni = common::uint_option(BACKEND, backend, "VNI", MAX_VNI)?.unwrap_or(1) as u32;
        let port = match common::uint_option(BACKEND, backend, "Port", u64::from(u16::MAX))? {
            None | Some(0) => DEFAULT_PORT,
            Some(p) => p as u16,
        };
        let mtu = match common::uint_option(BACKEND, backend, "MTU", u64::from(u32::MAX))? {
            None | Some(0) => None,
            Some(m) => Some(m as u32),
        };
        Ok(VxlanOptions {
            vni,
            port,
            gbp: common::bool_option(BACKEND, backend, "GBP")?,
            learning: common::bool_option(BACKEND, backend, "Learning")?,
            mtu,
            direct_routing: common::bool_option(BACKEND, backend, "DirectRouting")?,
        })
    }
}

/// Sets `net.ipv6.conf.<dev>.accept_ra` to 0, as flannel does for its vxlan devices: a router
/// advertisement that reaches the overlay must not give the host an IPv6 address or default
/// route through it. Best effort, like flannel's: the file is missing when the kernel has no
/// IPv6, and the device works without it.
fn ignore_router_advertisements(dev: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{dev}/accept_ra");
    if let Err(e) = std::fs::write(&path, "0") {
        tracing::debug!("{BACKEND}: writing 0 to {path}: {e}");
    }
}

/// The VTEP MAC of this host for `vni`: derived from the public IP (IPv4 for `flannel.<VNI>`,
/// IPv6 for `flannel-v6.<VNI>`) and the VNI, so it is the same after a restart, a reboot or a
/// re-created device.
///
/// Why: flannel lets the kernel pick a random MAC whenever the device is created. Peers keep
/// the old MAC in their neighbour and FDB entries until they see the new lease, so traffic to
/// this host is black-holed in between (and stale entries pile up). A deterministic MAC makes
/// re-creation invisible to peers. The hash is FNV-1a (stable across Rust versions, unlike
/// `DefaultHasher`); the first octet gets the locally-administered bit set and the multicast
/// bit cleared.
pub fn stable_vtep_mac(public_ip: impl Into<IpAddr>, vni: u32) -> Mac {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let ip = match public_ip.into() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    let input = b"flannel-vtep"
        .iter()
        .copied()
        .chain(ip)
        .chain(vni.to_be_bytes());
    for b in input {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let bytes = hash.to_be_bytes();
    let mut mac = [bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5]];
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// What `ensure_device` had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceChange {
    Unchanged,
    /// MTU or up state corrected in place.
    Fixed,
    Created,
    Recreated,
}

/// What every family's device shares: options, the external interface, the sockets.
struct Shared<'a> {
    opts: &'a VxlanOptions,
    ext: &'a ExternalInterface,
    nl: &'a Netlink,
}

/// The VXLAN device of one IP family and the peers programmed on it.
struct Vtep<N: LeaseFamily> {
    name: String,
    network: N,
    /// The address advertised to peers (lease `PublicIP` / `PublicIPv6`).
    public_ip: N::Addr,
    /// The VXLAN `local` address: the interface address (what packets can leave with), which
    /// equals the public IP unless the host is behind NAT.
    local: N::Addr,
    /// The device MTU.
    mtu: u32,
    /// The MAC of the device, as published; kept when the device is re-created.
    mac: Option<Mac>,
    /// The MAC this host published before (Kubernetes mode: its Node's annotation), used for
    /// a new device so that peers keep a MAC they know.
    stored_mac: Option<Mac>,
    own: Option<N>,
    /// Peers not programmed, with the reason; logged when it changes.
    skipped: BTreeMap<SubnetKey, String>,
    /// What the last pass programmed on the device, for [`Vtep::plan_update`].
    programmed: common::Programmed<Applied<N>>,
    /// The external interface's networks the last full pass read (`DirectRouting`): a change
    /// to them removes a kernel route of the interface, which wakes a full pass.
    ext_nets: Vec<N>,
}

/// The kernel state a pass programmed, and on which device.
struct Applied<N: LeaseFamily> {
    dev_index: u32,
    want: Desired<N>,
}

/// The kernel state wanted for the peers of one family.
struct Desired<N: LeaseFamily> {
    /// Neighbour entries on the device: VTEP address → MAC, with the peer.
    neigh: BTreeMap<N::Addr, (Mac, SubnetKey)>,
    /// FDB entries on the device: MAC → remote (peer public IP), with the peer.
    fdb: BTreeMap<Mac, (N::Addr, SubnetKey)>,
    routes: BTreeMap<N, (Route<N>, SubnetKey)>,
}

impl<N: LeaseFamily> Vtep<N> {
    fn new(
        name: String,
        network: N,
        opts: &VxlanOptions,
        ext: &ExternalInterface,
        overhead: u32,
    ) -> Result<Self, BackendError> {
        let public_ip = N::ext_public(ext).ok_or_else(|| BackendError::Setup {
            backend: BACKEND,
            why: format!(
                "interface {} has no {} public IP (the network config enables {})",
                ext.name,
                N::NAME,
                N::NAME
            ),
        })?;
        let local = N::ext_iface(ext).unwrap_or(public_ip);
        let underlay = opts.mtu.unwrap_or(ext.mtu);
        if underlay < 68 + overhead {
            return Err(BackendError::BadOption {
                backend: BACKEND,
                option: "MTU",
                value: underlay.to_string(),
                why: format!(
                    "leaves less than 68 bytes after the {overhead} bytes of VXLAN overhead \
                     over {}",
                    N::NAME
                ),
            });
        }
        Ok(Vtep {
            name,
            network,
            public_ip,
            local,
            mtu: underlay - overhead,
            mac: None,
            stored_mac: None,
            own: None,
            skipped: BTreeMap::new(),
            programmed: common::Programmed::default(),
            ext_nets: Vec::new(),
        })
    }

    /// Why an existing device cannot be adopted, or `None` when it can.
    fn incompatible(&self, link: &Link, s: &Shared<'_>) -> Option<String> {
        let Some(v) = &link.vxlan else {
            return Some(format!(
                "it is a {} device, not vxlan",
                link.kind.as_deref().unwrap_or("plain")
            ));
        };
        let mut why = Vec::new();
        if v.vni != Some(s.opts.vni) {
            why.push(format!("vni {:?} ≠ {}", v.vni, s.opts.vni));
        }
        let local: IpAddr = self.local.into();
        if v.local != Some(local) {
            why.push(format!("local {:?} ≠ {local}", v.local));
        }
        if v.port != Some(s.opts.port) {
            why.push(format!("dstport {:?} ≠ {}", v.port, s.opts.port));
        }
        if v.link.is_some_and(|l| l != s.ext.index) {
            why.push(format!(
                "dev ifindex {:?} ≠ {} ({})",
                v.link, s.ext.index, s.ext.name
            ));
        }
        if v.gbp != s.opts.gbp {
            why.push(format!("gbp {} ≠ {}", v.gbp, s.opts.gbp));
        }
        if v.learning.is_some_and(|l| l != s.opts.learning) {
            why.push(format!("learning {:?} ≠ {}", v.learning, s.opts.learning));
        }
        if let (Some(published), Some(mac)) = (self.mac, link.mac) {
            if published != mac {
                why.push(format!(
                    "address {} ≠ published VtepMAC {}",
                    format_mac(&mac),
                    format_mac(&published)
                ));
            }
        }
        (!why.is_empty()).then(|| why.join(", "))
    }

    /// Adopts the device when it is compatible, fixes its MTU and up state, and otherwise
    /// (re-)creates it.
    async fn ensure_device(
        &mut self,
        s: &Shared<'_>,
    ) -> Result<(Link, DeviceChange), BackendError> {
        let h = &s.nl.h;
        let name = self.name.clone();
        let existing = netlink::link_by_name(h, &name)
            .await
            .map_err(fatal(BACKEND, &format!("looking up device {name}")))?;
        let mut old_mac = None;
        let mut change = DeviceChange::Created;
        if let Some(mut link) = existing {
            match self.incompatible(&link, s) {
                None => {
                    let want_mtu = self.mtu;
                    let mut change = DeviceChange::Unchanged;
                    if link.mtu != Some(want_mtu) || !link.up {
                        tracing::info!(
                            "{BACKEND}: device {name}: setting mtu {want_mtu} (was {:?}) and up (was {})",
                            link.mtu,
                            if link.up { "up" } else { "down" }
                        );
                        netlink::set_link_up(h, link.index, Some(want_mtu))
                            .await
                            .map_err(fatal(BACKEND, &format!("device {name}")))?;
                        link.mtu = Some(want_mtu);
                        link.up = true;
                        change = DeviceChange::Fixed;
                    }
                    if self.mac.is_none() {
                        self.mac = link.mac;
                        if let Some(mac) = link.mac {
                            tracing::info!(
                                "{BACKEND}: adopted existing device {name} (ifindex {}, VtepMAC {})",
                                link.index,
                                format_mac(&mac)
                            );
                        }
                    }
                    ignore_router_advertisements(&name);
                    return Ok((link, change));
                }
                Some(why) => {
                    tracing::warn!(
                        "{BACKEND}: device {name} exists with an incompatible configuration ({why}); re-creating it"
                    );
                    if link.vxlan.is_some() {
                        old_mac = link.mac;
                    }
                    netlink::delete_link(h, link.index)
                        .await
                        .map_err(fatal(BACKEND, &format!("deleting device {name}")))?;
                    change = DeviceChange::Recreated;
                }
            }
        }

        // A MAC once published stays: ours, else the old device's (peers know it), else the
        // derived one.
        let mac = self
            .mac
            .or(old_mac)
            .or(self.stored_mac)
            .unwrap_or_else(|| stable_vtep_mac(self.public_ip, s.opts.vni));
        let spec = VxlanSpec {
            name: name.clone(),
            vni: s.opts.vni,
            local: self.local.into(),
            link: s.ext.index,
            port: s.opts.port,
            learning: s.opts.learning,
            gbp: s.opts.gbp,
            mtu: self.mtu,
            mac,
        };
        netlink::add_vxlan(h, &spec)
            .await
            .map_err(fatal(BACKEND, &format!("creating device {name}")))?;
        let link = netlink::link_by_name(h, &name)
            .await
            .map_err(fatal(BACKEND, &format!("looking up device {name}")))?
            .ok_or_else(|| BackendError::Setup {
                backend: BACKEND,
                why: format!("device {name} vanished right after it was created"),
            })?;
        self.mac = Some(link.mac.unwrap_or(mac));
        ignore_router_advertisements(&name);
        tracing::info!(
            "{BACKEND}: created device {name} (ifindex {}, vni {}, local {}, dev {}, dstport {}, mtu {}, VtepMAC {})",
            link.index,
            spec.vni,
            spec.local,
            s.ext.name,
            spec.port,
            spec.mtu,
            format_mac(&self.mac.expect("set above"))
        );
        Ok((link, change))
    }

    /// Gives the device exactly the address `<own subnet network>/32` (`/128`), besides
    /// link-local ones. Returns whether anything changed.
    async fn ensure_address(
        &mut self,
        s: &Shared<'_>,
        dev: &Link,
        tally: &mut ReconcileTally,
    ) -> Result<bool, BackendError> {
        let Some(own) = self.own else {
            return Ok(false);
        };
        let want = N::host(own.net_addr());
        let change = common::ensure_address(&s.nl.h, &self.name, dev.index, want, tally).await?;
        Ok(change.any())
    }

    /// What the peers want on this device.
    fn desired(
        &mut self,
        peers: &PeerSet,
        dev_index: u32,
        ext: &ExternalInterface,
        ext_nets: &[N],
    ) -> Desired<N> {
        let mut want = Desired {
            neigh: BTreeMap::new(),
            fdb: BTreeMap::new(),
            routes: BTreeMap::new(),
        };
        let mut skipped = BTreeMap::new();
        let peers = common::candidates::<N>(peers, BACKEND, &mut skipped);
        for common::Candidate {
            key,
            subnet,
            lease,
            public_ip,
        } in peers
        {
            if ext_nets.iter().any(|n| n.has(public_ip)) {
                want.routes.insert(
                    subnet,
                    (Route::new(subnet, Some(public_ip), ext.index, false), key),
                );
                continue;
            }
            let data = N::backend_data(&lease.attrs);
            let mac = data
                .as_object()
                .and_then(|m| common::lookup(m, "VtepMAC"))
                .and_then(|v| v.as_str())
                .and_then(parse_mac);
            let Some(mac) = mac else {
                skipped.insert(
                    key,
                    format!("{} {data} has no valid VtepMAC", N::DATA_FIELD),
                );
                continue;
            };
            if let Some((_, other)) = want.fdb.get(&mac) {
                skipped.insert(
                    key,
                    format!("VtepMAC {} is also used by peer {other}", format_mac(&mac)),
                );
                continue;
            }
            let vtep = subnet.net_addr();
            want.neigh.insert(vtep, (mac, key));
            want.fdb.insert(mac, (public_ip, key));
            want.routes.insert(
                subnet,
                (Route::new(subnet, Some(vtep), dev_index, true), key),
            );
        }
        let on = format!(" on {}", self.name);
        common::log_skipped(BACKEND, &on, &mut self.skipped, skipped);
        want
    }

    /// Reads the device's state and plans the changes that make it match the peers: neighbour
    /// and FDB entries first (so new routes work at once), then routes, then stale entries.
    async fn plan(
        &mut self,
        s: &Shared<'_>,
        dev: &Link,
        peers: &PeerSet,
        plan: &mut Plan,
    ) -> Result<(), BackendError> {
        let h = &s.nl.h;
        let ext = s.ext;
        let ext_nets = if s.opts.direct_routing {
            netlink::addresses::<N>(h, ext.index)
                .await
                .map_err(fatal(BACKEND, &format!("addresses of {}", ext.name)))?
        } else {
            Vec::new()
        };
        let want = self.desired(peers, dev.index, ext, &ext_nets);

        // What the kernel has.
        let name = &self.name;
        let (neigh_have, fdb_have) = futures::try_join!(
            netlink::neighbours::<N>(h, dev.index),
            netlink::fdb_entries(h, dev.index)
        )
        .map_err(fatal(BACKEND, &format!("neighbours and FDB of {name}")))?;
        let neigh_have: HashMap<N::Addr, Option<Mac>> = neigh_have
            .into_iter()
            .filter(|n| n.permanent)
            .map(|n| (n.dst, n.mac))
            .collect();
        // The kernel keeps a list of remotes per MAC; ours have exactly one.
        let mut remotes: BTreeMap<Mac, Vec<Option<IpAddr>>> = BTreeMap::new();
        for e in fdb_have.into_iter().filter(|e| e.permanent) {
            remotes.entry(e.mac).or_default().push(e.dst);
        }

        // 1. Neighbour and FDB entries.
        for (ip, (mac, key)) in &want.neigh {
            let have = neigh_have.get(ip);
            if have.is_some_and(|m| *m == Some(*mac)) {
                continue;
            }
            let effect = if have.is_some() {
                Effect::Repaired
            } else {
                Effect::Added
            };
            let ip: IpAddr = (*ip).into();
            plan.change(effect, Some(*key), |b| {
                b.replace_neighbour(dev.index, ip, *mac)
            });
        }
        for (mac, (ip, key)) in &want.fdb {
            let want_dst = Some((*ip).into());
            let have = remotes.get(mac).map(Vec::as_slice).unwrap_or_default();
            if have.contains(&want_dst) {
                // Right remote; drop extra ones (deleting an absent remote "succeeds", so
                // only ever delete what the dump showed).
                for extra in have.iter().filter(|d| **d != want_dst) {
                    plan.change(Effect::Removed, None, |b| {
                        b.delete_fdb(dev.index, *mac, *extra)
                    });
                }
                continue;
            }
            if have.len() > 1 {
                // Several wrong remotes: replace only rewrites the first one.
                plan.change(Effect::Removed, None, |b| {
                    b.delete_fdb(dev.index, *mac, None)
                });
            }
            let effect = if have.is_empty() {
                Effect::Added
            } else {
                Effect::Repaired
            };
            plan.change(effect, Some(*key), |b| {
                b.replace_fdb(dev.index, *mac, (*ip).into())
            });
        }

        // 2. Routes.
        let (own, network) = (self.own, self.network);
        common::plan_routes(
            h,
            BACKEND,
            &want.routes,
            &[dev.index, ext.index],
            |r| common::owned_route(r, &network, own.as_ref(), Some(dev.index), ext.index),
            plan,
        )
        .await?;

        // 3. Stale neighbour and FDB entries.
        for ip in neigh_have.keys() {
            if !want.neigh.contains_key(ip) {
                let ip: IpAddr = (*ip).into();
                plan.change(Effect::Removed, None, |b| b.delete_neighbour(dev.index, ip));
            }
        }
        for mac in remotes.keys() {
            if !want.fdb.contains_key(mac) {
                plan.change(Effect::Removed, None, |b| {
                    b.delete_fdb(dev.index, *mac, None)
                });
            }
        }
        self.ext_nets = ext_nets;
        self.programmed.stage(Applied {
            dev_index: dev.index,
            want,
        });
        Ok(())
    }

    /// Plans what changed in the peers since the last pass, from what that pass programmed
    /// (the kernel is not read): entries of new and changed peers first, then stale ones, in
    /// the full pass's order. `false` when what the kernel holds is unknown.
    fn plan_update(&mut self, ext: &ExternalInterface, peers: &PeerSet, plan: &mut Plan) -> bool {
        let Some(dev) = self.programmed.known().map(|a| a.dev_index) else {
            return false;
        };
        let ext_nets = std::mem::take(&mut self.ext_nets);
        let want = self.desired(peers, dev, ext, &ext_nets);
        self.ext_nets = ext_nets;
        let Some(Applied { want: had, .. }) = self.programmed.known() else {
            return false;
        };
        let effect = |known: bool| {
            if known {
                Effect::Repaired
            } else {
                Effect::Added
            }
        };
        for (ip, (mac, key)) in &want.neigh {
            let old = had.neigh.get(ip).map(|(m, _)| m);
            if old != Some(mac) {
                let ip: IpAddr = (*ip).into();
                plan.change(effect(old.is_some()), Some(*key), |b| {
                    b.replace_neighbour(dev, ip, *mac)
                });
            }
        }
        for (mac, (ip, key)) in &want.fdb {
            let old = had.fdb.get(mac).map(|(i, _)| i);
            if old != Some(ip) {
                // Ours have exactly one remote, which replace rewrites.
                plan.change(effect(old.is_some()), Some(*key), |b| {
                    b.replace_fdb(dev, *mac, (*ip).into())
                });
            }
        }
        common::plan_route_changes(&had.routes, &want.routes, plan);
        common::plan_route_removals(&had.routes, &want.routes, plan);
        for ip in had.neigh.keys().filter(|ip| !want.neigh.contains_key(*ip)) {
            let ip: IpAddr = (*ip).into();
            plan.change(Effect::Removed, None, |b| b.delete_neighbour(dev, ip));
        }
        for mac in had.fdb.keys().filter(|m| !want.fdb.contains_key(*m)) {
            plan.change(Effect::Removed, None, |b| b.delete_fdb(dev, *mac, None));
        }
        self.programmed.stage(Applied {
            dev_index: dev,
            want,
        });
        true
    }

    fn set_own(&mut self, own: &Lease) -> Result<(), BackendError> {
        let subnet = N::subnet(&own.key).ok_or_else(|| BackendError::Setup {
            backend: BACKEND,
            why: format!("our lease {} has no {} subnet", own.key, N::NAME),
        })?;
        self.own = Some(subnet);
        self.programmed.forget();
        Ok(())
    }

    /// The published `BackendData` / `BackendV6Data`.
    fn backend_data(&self, vni: u32) -> Result<serde_json::Value, BackendError> {
        let mac = self.mac.ok_or_else(|| BackendError::Setup {
            backend: BACKEND,
            why: format!("device {} has no MAC address", self.name),
        })?;
        Ok(json!({"VNI": vni, "VtepMAC": format_mac(&mac)}))
    }

    /// One pass over this device: device, address, then the plan for the peers.
    async fn reconcile(
        &mut self,
        s: &Shared<'_>,
        peers: &PeerSet,
        plan: &mut Plan,
        tally: &mut ReconcileTally,
    ) -> Result<(), BackendError> {
        // Unknown until this pass has applied everything.
        self.programmed.forget();
        let (dev, change) = self.ensure_device(s).await?;
        if change != DeviceChange::Unchanged {
            tally.report.repaired += 1;
        }
        if self.ensure_address(s, &dev, tally).await? {
            tally.report.repaired += 1;
        }
        self.plan(s, &dev, peers, plan).await
    }
}

/// [`Shared`] and each family's device, borrowed at once.
type Parts<'a> = (
    Shared<'a>,
    &'a mut Option<Vtep<Ipv4Network>>,
    &'a mut Option<Vtep<Ipv6Network>>,
);

pub struct VxlanBackend {
    opts: VxlanOptions,
    ext: ExternalInterface,
    nl: Option<Netlink>,
    v4: Option<Vtep<Ipv4Network>>,
    v6: Option<Vtep<Ipv6Network>>,
}

impl<N: LeaseFamily> EventPlanner for Vtep<N> {
    fn plan_update(&mut self, ext: &ExternalInterface, peers: &PeerSet, plan: &mut Plan) -> bool {
        Vtep::plan_update(self, ext, peers, plan)
    }

    fn settle(&mut self, all_applied: bool) {
        self.programmed.settle(all_applied);
    }
}

impl VxlanBackend {
    pub fn new(ctx: BackendContext) -> Result<Self, BackendError> {
        let opts = VxlanOptions::from_backend(&ctx.config.backend)?;
        let ext = ctx.ext;
        let v4 = Ipv4Network::of_config(&ctx.config)
            .map(|net| {
                Vtep::new(
                    format!("flannel.{}", opts.vni),
                    net,
                    &opts,
                    &ext,
                    ENCAP_OVERHEAD,
                )
            })
            .transpose()?;
        let v6 = Ipv6Network::of_config(&ctx.config)
            .map(|net| {
                Vtep::new(
                    format!("flannel-v6.{}", opts.vni),
                    net,
                    &opts,
                    &ext,
                    ENCAP_OVERHEAD_V6,
                )
            })
            .transpose()?;
        let (mut v4, mut v6) = common::some_family(BACKEND, v4, v6)?;
        if let Some(v) = v4.as_mut() {
            v.stored_mac = ctx.stored_vtep_macs.0;
        }
        if let Some(v) = v6.as_mut() {
            v.stored_mac = ctx.stored_vtep_macs.1;
        }
        Ok(VxlanBackend {
            opts,
            ext,
            nl: None,
            v4,
            v6,
        })
    }

    /// What each family's device shares (the netlink sockets opened once) beside the devices.
    fn parts(&mut self) -> Result<Parts<'_>, BackendError> {
        common::connect(BACKEND, &mut self.nl)?;
        let nl = self.nl.as_ref().expect("connected above");
        let shared = Shared {
            opts: &self.opts,
            ext: &self.ext,
            nl,
        };
        Ok((shared, &mut self.v4, &mut self.v6))
    }
}

#[async_trait]
impl Backend for VxlanBackend {
    async fn prepare(&mut self) -> Result<Publish, BackendError> {
        let (s, v4, v6) = self.parts()?;
        let mut publish = Publish {
            backend_type: BACKEND.into(),
            backend_data: None,
            backend_v6_data: None,
            mtu: u32::MAX,
        };
        // Pods get the smaller MTU of the two devices, so both families fit without
        // fragmentation.
        if let Some(v4) = v4 {
            let (link, _) = v4.ensure_device(&s).await?;
            publish.backend_data = Some(v4.backend_data(s.opts.vni)?);
            publish.mtu = publish.mtu.min(link.mtu.unwrap_or(v4.mtu));
        }
        if let Some(v6) = v6 {
            let (link, _) = v6.ensure_device(&s).await?;
            publish.backend_v6_data = Some(v6.backend_data(s.opts.vni)?);
            publish.mtu = publish.mtu.min(link.mtu.unwrap_or(v6.mtu));
        }
        Ok(publish)
    }

    async fn lease_acquired(&mut self, own: &Lease) -> Result<(), BackendError> {
        let (s, v4, v6) = self.parts()?;
        let mut tally = ReconcileTally::new(BACKEND);
        if let Some(v4) = v4 {
            v4.set_own(own)?;
            let (link, _) = v4.ensure_device(&s).await?;
            v4.ensure_address(&s, &link, &mut tally).await?;
        }
        if let Some(v6) = v6 {
            v6.set_own(own)?;
            let (link, _) = v6.ensure_device(&s).await?;
            v6.ensure_address(&s, &link, &mut tally).await?;
        }
        tally.finish().map(|_| ())
    }

    async fn reconcile(&mut self, peers: &PeerSet) -> Result<ReconcileReport, BackendError> {
        let (s, v4, v6) = self.parts()?;
        let mut tally = ReconcileTally::new(BACKEND);
        let mut plan = Plan::default();
        if let Some(v4) = v4 {
            v4.reconcile(&s, peers, &mut plan, &mut tally).await?;
        }
        if let Some(v6) = v6 {
            v6.reconcile(&s, peers, &mut plan, &mut tally).await?;
        }
        tally.apply(s.nl, plan).await;
        self.settle(tally.failed.is_empty());
        tally.finish()
    }

    async fn update(&mut self, peers: &PeerSet) -> Result<ReconcileReport, BackendError> {
        let nl = common::connect(BACKEND, &mut self.nl)?;
        let mut families = families(&mut self.v4, &mut self.v6);
        match common::apply_lease_event(BACKEND, &nl, &self.ext, peers, &mut families).await {
            LeaseEvent::Applied(report) => Ok(report),
            LeaseEvent::NeedsFullPass(done) => self.reconcile(peers).await.map(|r| done.plus(&r)),
        }
    }
}

impl VxlanBackend {
    fn settle(&mut self, all_applied: bool) {
        for f in families(&mut self.v4, &mut self.v6) {
            f.settle(all_applied);
        }
    }
}

/// The enabled families' state, for what every family does alike.
fn families<'a>(
    v4: &'a mut Option<Vtep<Ipv4Network>>,
    v6: &'a mut Option<Vtep<Ipv6Network>>,
) -> Vec<&'a mut dyn EventPlanner> {
    let v4 = v4.iter_mut().map(|f| f as &mut dyn EventPlanner);
    v4.chain(v6.iter_mut().map(|f| f as &mut dyn EventPlanner))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::net::Ipv4Addr;

    fn opts(v: Value) -> Result<VxlanOptions, BackendError> {
        VxlanOptions::from_backend(v.as_object().unwrap())
    }

    #[test]
    fn defaults_match_flannel() {
        let o = opts(json!({"Type": "vxlan"})).unwrap();
        assert_eq!(
            o,
            VxlanOptions {
                vni: 1,
                port: DEFAULT_PORT,
                gbp: false,
                learning: false,
                mtu: None,
                direct_routing: false
            }
        );
    }

    #[test]
    fn options_are_read_case_insensitively() {
        let o = opts(
            json!({"type": "vxlan", "vni": 42, "port": 4789, "gbp": true,
            "learning": true, "mtu": 9000, "directrouting": true}),
        )
        .unwrap();
        assert_eq!(
            o,
            VxlanOptions {
                vni: 42,
                port: 4789,
                gbp: true,
                learning: true,
                mtu: Some(9000),
                direct_routing: true
            }
        );
    }

    #[test]
    fn bad_options_are_errors_naming_them() {
        let e = opts(json!({"VNI": 1 << 24})).unwrap_err().to_string();
        assert!(e.contains("VNI") && e.contains("16777216"), "{e}");
        let e = opts(json!({"DirectRouting": "yes"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("DirectRouting"), "{e}");
    }

    #[test]
    fn vtep_mac_is_stable_unicast_and_local() {
        let a = stable_vtep_mac(Ipv4Addr::new(192, 0, 2, 3), 1);
        assert_eq!(a, stable_vtep_mac(Ipv4Addr::new(192, 0, 2, 3), 1));
        assert_ne!(a, stable_vtep_mac(Ipv4Addr::new(192, 0, 2, 4), 1));
        assert_ne!(a, stable_vtep_mac(Ipv4Addr::new(192, 0, 2, 3), 2));
        assert_eq!(a[0] & 0x01, 0, "unicast");
        // Pinned: changing the derivation would change every host's MAC on upgrade.
        assert_eq!(
            format_mac(&stable_vtep_mac(Ipv4Addr::new(198, 18, 0, 1), 7)),
            "ba:03:b4:ed:08:3c"
        );
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
    }

    #[test]
    fn ipv6_vtep_mac_is_stable_and_differs_from_ipv4() {
        let v6: std::net::Ipv6Addr = "fd00:18::1".parse().unwrap();
        let a = stable_vtep_mac(v6, 1);
        assert_eq!(a, stable_vtep_mac(v6, 1));
        assert_ne!(a, stable_vtep_mac(v6, 2));
        assert_ne!(a, stable_vtep_mac(Ipv4Addr::new(198, 18, 0, 1), 1));
        assert_eq!(a[0] & 0x03, 0x02, "unicast, locally administered");
    }
}
