//! `vxlan`: the kernel's VXLAN device, programmed over rtnetlink.
//!
//! One device `flannel.<VNI>` carries the overlay. For each peer lease of type `vxlan` the
//! kernel gets three entries, as flannel programs them:
//! 1. a permanent neighbour entry on the device: peer subnet's network address → peer VtepMAC;
//! 2. a permanent FDB entry (`self`): peer VtepMAC → peer PublicIP;
//! 3. a route: peer subnet via the peer subnet's network address, dev `flannel.<VNI>`, onlink.
//!
//! With `DirectRouting`, a peer whose PublicIP is on the external interface's own L2 subnet
//! gets a plain route via its PublicIP on the external interface instead.
//!
//! Reconciliation is level-triggered: every pass reads the device, its neighbours and FDB
//! entries and the routes we own, and changes only what differs from the PeerSet. A restart
//! adopts what the last run left; a deleted device is re-created with the same MAC.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use async_trait::async_trait;
use ipnetwork::Ipv4Network;
use rtnetlink::Handle;
use serde_json::json;

use super::common::{self, fatal, Tally};
use super::{Backend, BackendContext, BackendError, Publish, ReconcileReport};
use crate::netlink::{self, format_mac, parse_mac, Link, Mac, Route4, VxlanSpec};
use crate::subnet::{Lease, PeerSet, SubnetKey};

const BACKEND: &str = "vxlan";
/// The kernel's (and flannel's) VXLAN port when `Port` is 0 or absent; set explicitly.
pub const DEFAULT_PORT: u16 = 8472;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
pub const ENCAP_OVERHEAD: u32 = 50;
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

/// The VTEP MAC of this host for `vni`: derived from the public IP and the VNI, so it is the
/// same after a restart, a reboot or a re-created device.
///
/// Why: flannel lets the kernel pick a random MAC whenever the device is created. Peers keep
/// the old MAC in their neighbour and FDB entries until they see the new lease, so traffic to
/// this host is black-holed in between (and stale entries pile up). A deterministic MAC makes
/// re-creation invisible to peers. The hash is FNV-1a (stable across Rust versions, unlike
/// `DefaultHasher`); the first octet gets the locally-administered bit set and the multicast
/// bit cleared.
pub fn stable_vtep_mac(public_ip: Ipv4Addr, vni: u32) -> Mac {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let input = b"flannel-vtep"
        .iter()
        .copied()
        .chain(public_ip.octets())
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

pub struct VxlanBackend {
    ctx: BackendContext,
    opts: VxlanOptions,
    name: String,
    network: Ipv4Network,
    /// The address advertised to peers (lease `PublicIP`).
    public_ip: Ipv4Addr,
    /// The VXLAN `local` address: the interface address (what packets can leave with), which
    /// equals the public IP unless the host is behind NAT.
    local: Ipv4Addr,
    nl: Option<Handle>,
    /// The MAC of our device, as published; kept when the device is re-created.
    mac: Option<Mac>,
    own: Option<Ipv4Network>,
    /// Peers not programmed, with the reason; logged when it changes.
    skipped: BTreeMap<SubnetKey, String>,
}

impl VxlanBackend {
    pub fn new(ctx: BackendContext) -> Result<Self, BackendError> {
        let opts = VxlanOptions::from_backend(&ctx.config.backend)?;
        let network = ctx.config.network.ok_or_else(|| BackendError::Setup {
            backend: BACKEND,
            why: "needs an IPv4 Network (IPv6-only networks are not supported yet)".into(),
        })?;
        let public_ip = ctx.ext.public_ip.ok_or_else(|| BackendError::Setup {
            backend: BACKEND,
            why: format!("interface {} has no IPv4 public IP", ctx.ext.name),
        })?;
        let local = ctx.ext.iface_addr.unwrap_or(public_ip);
        let mtu = opts.mtu.unwrap_or(ctx.ext.mtu);
        if mtu < 68 + ENCAP_OVERHEAD {
            return Err(BackendError::BadOption {
                backend: BACKEND,
                option: "MTU",
                value: mtu.to_string(),
                why: format!(
                    "leaves less than 68 bytes after the {ENCAP_OVERHEAD} bytes of VXLAN overhead"
                ),
            });
        }
        Ok(VxlanBackend {
            name: format!("flannel.{}", opts.vni),
            opts,
            network,
            public_ip,
            local,
            nl: None,
            mac: None,
            own: None,
            skipped: BTreeMap::new(),
            ctx,
        })
    }

    fn device_mtu(&self) -> u32 {
        self.opts.mtu.unwrap_or(self.ctx.ext.mtu) - ENCAP_OVERHEAD
    }

    fn handle(&mut self) -> Result<Handle, BackendError> {
        if self.nl.is_none() {
            self.nl = Some(netlink::connect().map_err(fatal(BACKEND, "netlink"))?);
        }
        Ok(self.nl.clone().expect("set above"))
    }

    /// Why an existing device cannot be adopted, or `None` when it can.
    fn incompatible(&self, link: &Link) -> Option<String> {
        let Some(v) = &link.vxlan else {
            return Some(format!(
                "it is a {} device, not vxlan",
                link.kind.as_deref().unwrap_or("plain")
            ));
        };
        let mut why = Vec::new();
        if v.vni != Some(self.opts.vni) {
            why.push(format!("vni {:?} ≠ {}", v.vni, self.opts.vni));
        }
        if v.local != Some(self.local) {
            why.push(format!("local {:?} ≠ {}", v.local, self.local));
        }
        if v.port != Some(self.opts.port) {
            why.push(format!("dstport {:?} ≠ {}", v.port, self.opts.port));
        }
        if v.link.is_some_and(|l| l != self.ctx.ext.index) {
            why.push(format!(
                "dev ifindex {:?} ≠ {} ({})",
                v.link, self.ctx.ext.index, self.ctx.ext.name
            ));
        }
        if v.gbp != self.opts.gbp {
            why.push(format!("gbp {} ≠ {}", v.gbp, self.opts.gbp));
        }
        if v.learning.is_some_and(|l| l != self.opts.learning) {
            why.push(format!(
                "learning {:?} ≠ {}",
                v.learning, self.opts.learning
            ));
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
    async fn ensure_device(&mut self) -> Result<(Link, DeviceChange), BackendError> {
        let h = self.handle()?;
        let name = self.name.clone();
        let existing = netlink::link_by_name(&h, &name)
            .await
            .map_err(fatal(BACKEND, &format!("looking up device {name}")))?;
        let mut old_mac = None;
        let mut change = DeviceChange::Created;
        if let Some(link) = existing {
            match self.incompatible(&link) {
                None => {
                    let want_mtu = self.device_mtu();
                    let mut change = DeviceChange::Unchanged;
                    let mut link = link;
                    if link.mtu != Some(want_mtu) || !link.up {
                        tracing::info!(
                            "{BACKEND}: device {name}: setting mtu {want_mtu} (was {:?}) and up (was {})",
                            link.mtu,
                            if link.up { "up" } else { "down" }
                        );
                        netlink::set_link_up(&h, link.index, Some(want_mtu))
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
                    return Ok((link, change));
                }
                Some(why) => {
                    tracing::warn!(
                        "{BACKEND}: device {name} exists with an incompatible configuration ({why}); re-creating it"
                    );
                    if link.vxlan.is_some() {
                        old_mac = link.mac;
                    }
                    netlink::delete_link(&h, link.index)
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
            .unwrap_or_else(|| stable_vtep_mac(self.public_ip, self.opts.vni));
        let spec = VxlanSpec {
            name: name.clone(),
            vni: self.opts.vni,
            local: self.local,
            link: self.ctx.ext.index,
            port: self.opts.port,
            learning: self.opts.learning,
            gbp: self.opts.gbp,
            mtu: self.device_mtu(),
            mac,
        };
        netlink::add_vxlan(&h, &spec)
            .await
            .map_err(fatal(BACKEND, &format!("creating device {name}")))?;
        let link = netlink::link_by_name(&h, &name)
            .await
            .map_err(fatal(BACKEND, &format!("looking up device {name}")))?
            .ok_or_else(|| BackendError::Setup {
                backend: BACKEND,
                why: format!("device {name} vanished right after it was created"),
            })?;
        self.mac = Some(link.mac.unwrap_or(mac));
        tracing::info!(
            "{BACKEND}: created device {name} (ifindex {}, vni {}, local {}, dev {}, dstport {}, mtu {}, VtepMAC {})",
            link.index,
            spec.vni,
            spec.local,
            self.ctx.ext.name,
            spec.port,
            spec.mtu,
            format_mac(&self.mac.expect("set above"))
        );
        Ok((link, change))
    }

    /// Gives the device exactly the address `<own subnet network>/32`. Returns whether
    /// anything changed.
    async fn ensure_address(&mut self, dev: &Link) -> Result<bool, BackendError> {
        let Some(own) = self.own else {
            return Ok(false);
        };
        let h = self.handle()?;
        let want = Ipv4Network::new(own.network(), 32).expect("/32 is valid");
        let ctx = format!("address {want} on device {}", self.name);
        let have = netlink::addresses_v4(&h, dev.index)
            .await
            .map_err(fatal(BACKEND, &ctx))?;
        let mut changed = false;
        if !have.contains(&want) {
            netlink::replace_address_v4(&h, dev.index, want)
                .await
                .map_err(fatal(BACKEND, &ctx))?;
            tracing::info!("{BACKEND}: {ctx} set");
            changed = true;
        }
        for other in have.into_iter().filter(|a| *a != want) {
            match netlink::delete_address_v4(&h, dev.index, other).await {
                Ok(()) => {
                    tracing::info!(
                        "{BACKEND}: removed old address {other} from device {}",
                        self.name
                    );
                    changed = true;
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(fatal(BACKEND, "removing an old address")(e)),
            }
        }
        Ok(changed)
    }

    /// Deletes one remote of an FDB entry, or (with `dst` `None`) the whole entry.
    async fn delete_fdb(
        &self,
        h: &Handle,
        index: u32,
        mac: Mac,
        dst: Option<IpAddr>,
        tally: &mut Tally,
    ) {
        let what = match dst {
            Some(d) => format!("FDB entry {} dst {d}", format_mac(&mac)),
            None => format!("FDB entry {}", format_mac(&mac)),
        };
        match netlink::delete_fdb(h, index, mac, dst).await {
            Ok(()) => {
                tracing::info!("{BACKEND}: stale {what} dev {} removed", self.name);
                tally.report.removed += 1;
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => tally.failed(&format!("stale {what}"), e),
        }
    }

    fn log_skipped(&mut self, skipped: BTreeMap<SubnetKey, String>) {
        for (key, why) in &skipped {
            if self.skipped.get(key) != Some(why) {
                tracing::info!("{BACKEND}: ignoring peer {key}: {why}");
            }
        }
        self.skipped = skipped;
    }
}

/// The kernel state wanted for the peers.
#[derive(Default)]
struct Desired {
    /// Neighbour entries on the device: VTEP address → MAC.
    neigh: BTreeMap<Ipv4Addr, Mac>,
    /// FDB entries on the device: MAC → remote (peer PublicIP), with the peer for messages.
    fdb: BTreeMap<Mac, (Ipv4Addr, SubnetKey)>,
    routes: BTreeMap<Ipv4Network, Route4>,
}

#[async_trait]
impl Backend for VxlanBackend {
    async fn prepare(&mut self) -> Result<Publish, BackendError> {
        let (link, _) = self.ensure_device().await?;
        let mac = self.mac.ok_or_else(|| BackendError::Setup {
            backend: BACKEND,
            why: format!("device {} has no MAC address", self.name),
        })?;
        Ok(Publish {
            backend_type: BACKEND.into(),
            backend_data: Some(json!({"VNI": self.opts.vni, "VtepMAC": format_mac(&mac)})),
            backend_v6_data: None,
            mtu: link.mtu.unwrap_or_else(|| self.device_mtu()),
        })
    }

    async fn lease_acquired(&mut self, own: &Lease) -> Result<(), BackendError> {
        let subnet = own.key.ipv4.ok_or_else(|| BackendError::Setup {
            backend: BACKEND,
            why: format!("our lease {} has no IPv4 subnet", own.key),
        })?;
        self.own = Some(subnet);
        let (link, _) = self.ensure_device().await?;
        self.ensure_address(&link).await?;
        Ok(())
    }

    async fn reconcile(&mut self, peers: &PeerSet) -> Result<ReconcileReport, BackendError> {
        let h = self.handle()?;
        let mut tally = Tally::new(BACKEND);

        let (dev, change) = self.ensure_device().await?;
        if change != DeviceChange::Unchanged {
            tally.report.repaired += 1;
        }
        if self.ensure_address(&dev).await? {
            tally.report.repaired += 1;
        }

        let ext = self.ctx.ext.clone();
        let ext_nets = if self.opts.direct_routing {
            netlink::addresses_v4(&h, ext.index)
                .await
                .map_err(fatal(BACKEND, &format!("addresses of {}", ext.name)))?
        } else {
            Vec::new()
        };

        // What the peers want.
        let mut want = Desired::default();
        let mut skipped = BTreeMap::new();
        for (key, lease) in peers {
            let Some(subnet) = key.ipv4 else {
                continue; // IPv6-only peer: nothing to program over IPv4.
            };
            if self.own == Some(subnet) {
                continue;
            }
            if !common::within(&subnet, &self.network) {
                skipped.insert(*key, format!("subnet outside Network {}", self.network));
                continue;
            }
            let kind = lease.attrs.effective_backend_type();
            if kind != BACKEND {
                skipped.insert(*key, format!("backend type {kind:?} is not vxlan"));
                continue;
            }
            let Some(public_ip) = lease.attrs.public_ip else {
                skipped.insert(*key, "lease has no IPv4 PublicIP".into());
                continue;
            };
            if public_ip == self.public_ip {
                skipped.insert(*key, format!("lease has our own PublicIP {public_ip}"));
                continue;
            }
            if ext_nets.iter().any(|n| n.contains(public_ip)) {
                want.routes.insert(
                    subnet,
                    Route4::new(subnet, Some(public_ip), ext.index, false),
                );
                continue;
            }
            let data = lease.attrs.backend_data_value();
            let mac = data
                .as_object()
                .and_then(|m| common::lookup(m, "VtepMAC"))
                .and_then(|v| v.as_str())
                .and_then(parse_mac);
            let Some(mac) = mac else {
                skipped.insert(*key, format!("BackendData {data} has no valid VtepMAC"));
                continue;
            };
            if let Some((_, other)) = want.fdb.get(&mac) {
                skipped.insert(
                    *key,
                    format!("VtepMAC {} is also used by peer {other}", format_mac(&mac)),
                );
                continue;
            }
            want.neigh.insert(subnet.network(), mac);
            want.fdb.insert(mac, (public_ip, *key));
            want.routes.insert(
                subnet,
                Route4::new(subnet, Some(subnet.network()), dev.index, true),
            );
        }
        self.log_skipped(skipped);

        // What the kernel has.
        let name = self.name.clone();
        let neigh_have: Vec<_> = netlink::neighbours_v4(&h, dev.index)
            .await
            .map_err(fatal(BACKEND, &format!("neighbours of {name}")))?
            .into_iter()
            .filter(|n| n.permanent)
            .collect();
        let fdb_have: Vec<_> = netlink::fdb_entries(&h, dev.index)
            .await
            .map_err(fatal(BACKEND, &format!("FDB of {name}")))?
            .into_iter()
            .filter(|e| e.permanent)
            .collect();

        // 1. Neighbour and FDB entries first, so that new routes work at once.
        for (ip, mac) in &want.neigh {
            let have = neigh_have.iter().find(|n| n.dst == *ip);
            if have.is_some_and(|n| n.mac == Some(*mac)) {
                continue;
            }
            match netlink::replace_neighbour_v4(&h, dev.index, *ip, *mac).await {
                Ok(()) => {
                    tracing::info!(
                        "{BACKEND}: neighbour {ip} lladdr {} dev {name} {}",
                        format_mac(mac),
                        if have.is_some() { "corrected" } else { "added" }
                    );
                    if have.is_some() {
                        tally.report.repaired += 1;
                    } else {
                        tally.report.added += 1;
                    }
                }
                Err(e) => tally.failed(&format!("peer VTEP {ip}"), e),
            }
        }
        // The kernel keeps a list of remotes per MAC; ours have exactly one.
        let mut remotes: BTreeMap<Mac, Vec<Option<IpAddr>>> = BTreeMap::new();
        for e in &fdb_have {
            remotes.entry(e.mac).or_default().push(e.dst);
        }
        for (mac, (ip, key)) in &want.fdb {
            let want_dst = Some(IpAddr::V4(*ip));
            let have = remotes.get(mac).map(Vec::as_slice).unwrap_or_default();
            if have.contains(&want_dst) {
                // Right remote; drop extra ones (deleting an absent remote "succeeds", so
                // only ever delete what the dump showed).
                for extra in have.iter().filter(|d| **d != want_dst) {
                    self.delete_fdb(&h, dev.index, *mac, *extra, &mut tally)
                        .await;
                }
                continue;
            }
            if have.len() > 1 {
                // Several wrong remotes: replace only rewrites the first one.
                self.delete_fdb(&h, dev.index, *mac, None, &mut tally).await;
            }
            match netlink::replace_fdb(&h, dev.index, *mac, *ip).await {
                Ok(()) => {
                    let what = if have.is_empty() {
                        "added"
                    } else {
                        "corrected"
                    };
                    tracing::info!(
                        "{BACKEND}: FDB entry {} dst {ip} dev {name} {what}",
                        format_mac(mac)
                    );
                    if have.is_empty() {
                        tally.report.added += 1;
                    } else {
                        tally.report.repaired += 1;
                    }
                }
                Err(e) => tally.failed(&format!("peer {key}"), e),
            }
        }

        // 2. Routes.
        let own = self.own;
        let network = self.network;
        common::sync_routes(
            &h,
            &want.routes,
            |r| common::owned_route(r, &network, own.as_ref(), Some(dev.index), ext.index),
            &mut tally,
        )
        .await?;

        // 3. Stale neighbour and FDB entries.
        for n in &neigh_have {
            if want.neigh.contains_key(&n.dst) {
                continue;
            }
            match netlink::delete_neighbour_v4(&h, dev.index, n.dst).await {
                Ok(()) => {
                    tracing::info!("{BACKEND}: stale neighbour {} dev {name} removed", n.dst);
                    tally.report.removed += 1;
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => tally.failed(&format!("stale neighbour {}", n.dst), e),
            }
        }
        for mac in remotes.keys() {
            if !want.fdb.contains_key(mac) {
                self.delete_fdb(&h, dev.index, *mac, None, &mut tally).await;
            }
        }

        tally.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

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
}
