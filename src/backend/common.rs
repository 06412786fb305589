//! Pieces the backends share: option lookup in the `Backend` object, what one IP family means
//! for a lease and the config ([`LeaseFamily`]), which peers a backend programs
//! ([`candidates`]) and the log of those it skips, the plan of one reconciliation pass and its
//! tally, the address and the route diff.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use ipnetwork::{Ipv4Network, Ipv6Network};
use netlink_packet_route::route::RouteProtocol;
use rtnetlink::Handle;
use serde_json::{Map, Value};

use super::{BackendError, FailedChange, KernelChange, ReconcileReport};
use crate::config::NetworkConfig;
use crate::iface::ExternalInterface;
use crate::netlink::{self, Batch, Net, Netlink, NetlinkError, Op, Route, RT_TABLE_MAIN};
use crate::subnet::{Lease, LeaseAttrs, PeerSet, SubnetKey};

/// Looks `key` up the way flannel (Go's `encoding/json`) does: an exact match first, then
/// case-insensitively.
pub(super) fn lookup<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// An unsigned integer option no larger than `max`; `None` when absent or `null`.
pub(super) fn uint_option(
    backend: &'static str,
    map: &Map<String, Value>,
    option: &'static str,
    max: u64,
) -> Result<Option<u64>, BackendError> {
    match lookup(map, option) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            Some(_) => Err(BackendError::BadOption {
                backend,
                option,
                value: v.to_string(),
                why: format!("must be at most {max}"),
            }),
            None => Err(BackendError::BadOption {
                backend,
                option,
                value: v.to_string(),
                why: "must be a non-negative integer".into(),
            }),
        },
    }
}

/// A boolean option; `false` when absent or `null`.
pub(super) fn bool_option(
    backend: &'static str,
    map: &Map<String, Value>,
    option: &'static str,
) -> Result<bool, BackendError> {
    match lookup(map, option) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(BackendError::BadOption {
            backend,
            option,
            value: v.to_string(),
            why: "must be true or false".into(),
        }),
    }
}

/// Whether `inner` lies inside `outer` (same or longer prefix).
pub(super) fn within<N: Net>(inner: &N, outer: &N) -> bool {
    inner.within(outer)
}

/// What an IP family means for leases, the config and the external interface.
pub(super) trait LeaseFamily: Net {
    /// The subnet of this family in a lease key.
    fn subnet(key: &SubnetKey) -> Option<Self>;
    /// The overlay network of this family, when the config enables it.
    fn of_config(cfg: &NetworkConfig) -> Option<Self>;
    /// `PublicIP` / `PublicIPv6` of a lease.
    fn public_ip(attrs: &LeaseAttrs) -> Option<Self::Addr>;
    /// `BackendData` / `BackendV6Data` of a lease (`Null` when absent).
    fn backend_data(attrs: &LeaseAttrs) -> Value;
    /// The public address of this host in this family.
    fn ext_public(ext: &ExternalInterface) -> Option<Self::Addr>;
    /// The external interface's own address in this family.
    fn ext_iface(ext: &ExternalInterface) -> Option<Self::Addr>;
    /// The lease field naming the public address, for messages.
    const PUBLIC_FIELD: &'static str;
    /// The lease field holding the backend data, for messages.
    const DATA_FIELD: &'static str;
}

impl LeaseFamily for Ipv4Network {
    fn subnet(key: &SubnetKey) -> Option<Self> {
        key.ipv4
    }
    fn of_config(cfg: &NetworkConfig) -> Option<Self> {
        cfg.v4.map(|f| f.network)
    }
    fn public_ip(attrs: &LeaseAttrs) -> Option<Self::Addr> {
        attrs.public_ip
    }
    fn backend_data(attrs: &LeaseAttrs) -> Value {
        attrs.backend_data_value()
    }
    fn ext_public(ext: &ExternalInterface) -> Option<Self::Addr> {
        ext.public_ip
    }
    fn ext_iface(ext: &ExternalInterface) -> Option<Self::Addr> {
        ext.iface_addr
    }
    const PUBLIC_FIELD: &'static str = "PublicIP";
    const DATA_FIELD: &'static str = "BackendData";
}

impl LeaseFamily for Ipv6Network {
    fn subnet(key: &SubnetKey) -> Option<Self> {
        key.ipv6
    }
    fn of_config(cfg: &NetworkConfig) -> Option<Self> {
        cfg.v6.map(|f| f.network)
    }
    fn public_ip(attrs: &LeaseAttrs) -> Option<Self::Addr> {
        attrs.public_ipv6
    }
    fn backend_data(attrs: &LeaseAttrs) -> Value {
        attrs
            .backend_v6_data
            .as_deref()
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .unwrap_or(Value::Null)
    }
    fn ext_public(ext: &ExternalInterface) -> Option<Self::Addr> {
        ext.public_ipv6
    }
    fn ext_iface(ext: &ExternalInterface) -> Option<Self::Addr> {
        ext.iface_v6_addr
    }
    const PUBLIC_FIELD: &'static str = "PublicIPv6";
    const DATA_FIELD: &'static str = "BackendV6Data";
}

/// A peer lease a backend programs in family `N`.
pub(super) struct Candidate<'a, N: LeaseFamily> {
    pub key: SubnetKey,
    pub subnet: N,
    pub lease: &'a Lease,
    pub public_ip: N::Addr,
}

/// Why peers were not programmed, by key; logged by [`log_skipped`] when it changes.
pub(super) type Skipped = BTreeMap<SubnetKey, String>;

/// The per-backend part of choosing peers: of the `peers` the peer filter accepted
/// (`crate::subnet::peers::filter`), those of backend type `backend` (flannel's untyped leases
/// count as udp) with a subnet of family `N` and a public IP of that family. Every other peer
/// with a subnet of this family goes into `skipped` with the reason.
///
/// The filter has already refused every lease outside the Network or of the wrong prefix
/// length, overlapping our own subnet, or carrying our own public IP; the backends rely on it
/// (see [`owned_route`]) and do not check again.
pub(super) fn candidates<'a, N: LeaseFamily>(
    peers: &'a PeerSet,
    backend: &str,
    skipped: &mut Skipped,
) -> Vec<Candidate<'a, N>> {
    let mut out = Vec::new();
    for (key, lease) in peers {
        let Some(subnet) = N::subnet(key) else {
            continue; // No subnet of this family: nothing to program here.
        };
        let kind = lease.attrs.effective_backend_type();
        if kind != backend {
            skipped.insert(*key, format!("backend type {kind:?} is not {backend}"));
            continue;
        }
        match N::public_ip(&lease.attrs) {
            None => {
                skipped.insert(*key, format!("lease has no {}", N::PUBLIC_FIELD));
            }
            Some(public_ip) => out.push(Candidate {
                key: *key,
                subnet,
                lease,
                public_ip,
            }),
        }
    }
    out
}

/// Logs the peers skipped now for a reason they were not skipped for last time, then remembers
/// the new set: one line per change, not one per reconciliation pass.
pub(super) fn log_skipped(backend: &str, on: &str, last: &mut Skipped, now: Skipped) {
    for (key, why) in &now {
        if last.get(key) != Some(why) {
            tracing::info!("{backend}: ignoring peer {key}{on}: {why}");
        }
    }
    *last = now;
}

/// What a planned change does when it succeeds: the kernel lacked the entry (`Added`), had it
/// otherwise (`Repaired`), or had one no peer wants (`Removed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Added,
    Repaired,
    Removed,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::Added => "added",
            Effect::Repaired => "corrected",
            Effect::Removed => "stale, removed",
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Planned {
    effect: Effect,
    /// The peer the change is for (`None` for stale entries and a device's own route).
    peer: Option<SubnetKey>,
}

/// The kernel changes of one reconciliation pass, in the order the kernel must apply them,
/// sent in one go by [`ReconcileTally::apply`].
#[derive(Default)]
pub(super) struct Plan {
    batch: Batch,
    planned: Vec<Planned>,
}

impl Plan {
    /// Plans a change: `f` adds exactly one message to the batch.
    pub fn change(
        &mut self,
        effect: Effect,
        peer: Option<SubnetKey>,
        f: impl FnOnce(&mut Batch) -> usize,
    ) {
        f(&mut self.batch);
        debug_assert_eq!(self.batch.len(), self.planned.len() + 1);
        self.planned.push(Planned { effect, peer });
    }

    pub fn is_empty(&self) -> bool {
        self.planned.is_empty()
    }
}

/// Changes in one pass up to which each is logged on its own line at info level; beyond (a
/// start with thousands of peers), one summary line, and the details at debug level.
const LOG_EACH: usize = 32;

/// What one reconciliation pass did, and which changes failed.
#[derive(Debug)]
pub(super) struct ReconcileTally {
    pub backend: &'static str,
    pub report: ReconcileReport,
    pub failed: Vec<FailedChange>,
}

impl ReconcileTally {
    pub fn new(backend: &'static str) -> Self {
        ReconcileTally {
            backend,
            report: ReconcileReport::default(),
            failed: Vec::new(),
        }
    }

    /// Records a failed change; the pass goes on with the others.
    pub fn failed(&mut self, context: &str, err: NetlinkError) {
        tracing::warn!("{}: {context}: {err}", self.backend);
        self.failed.push(FailedChange {
            context: context.to_string(),
            error: err,
        });
    }

    /// Sends the plan's changes and counts what they did. Deleting something that is already
    /// gone counts as nothing, not as a failure.
    pub async fn apply(&mut self, nl: &Netlink, plan: Plan) {
        if plan.is_empty() {
            return;
        }
        let Plan { batch, planned } = plan;
        let ops: Vec<Op> = batch.ops().to_vec();
        let results = nl.apply(batch).await;
        let each = planned.len() <= LOG_EACH;
        let before = self.report.clone();
        for ((op, p), result) in ops.iter().zip(&planned).zip(results) {
            let error = match &result {
                Err(e) if !(p.effect == Effect::Removed && e.is_not_found()) => Some(e.to_string()),
                _ => None,
            };
            self.report.changes.push(KernelChange {
                peer: p.peer,
                effect: p.effect,
                what: op.to_string(),
                error,
            });
            match result {
                Ok(()) => {
                    match p.effect {
                        Effect::Added => self.report.added += 1,
                        Effect::Repaired => self.report.repaired += 1,
                        Effect::Removed => self.report.removed += 1,
                    }
                    let peer = p.peer.map(|k| format!("peer {k}: ")).unwrap_or_default();
                    if each {
                        tracing::info!("{}: {peer}{}: {op}", self.backend, p.effect);
                    } else {
                        tracing::debug!("{}: {peer}{}: {op}", self.backend, p.effect);
                    }
                }
                Err(e) if p.effect == Effect::Removed && e.is_not_found() => {}
                Err(e) => {
                    let context = match p.peer {
                        Some(k) => format!("peer {k}"),
                        None if p.effect == Effect::Removed => "stale entry".to_string(),
                        None => op.to_string(),
                    };
                    self.failed(&context, e);
                }
            }
        }
        if !each {
            tracing::info!(
                "{}: {} kernel changes: {} added, {} corrected, {} stale removed",
                self.backend,
                planned.len(),
                self.report.added - before.added,
                self.report.repaired - before.repaired,
                self.report.removed - before.removed,
            );
        }
    }

    /// The report, or an error listing every change that failed.
    pub fn finish(self) -> Result<ReconcileReport, BackendError> {
        if self.failed.is_empty() {
            Ok(self.report)
        } else {
            Err(BackendError::Changes {
                backend: self.backend,
                failed: self.failed,
                report: self.report,
            })
        }
    }
}

/// Wraps a netlink error of a step the pass cannot go on without.
pub(super) fn fatal(backend: &'static str, context: &str) -> impl Fn(NetlinkError) -> BackendError {
    let context = context.to_string();
    move |source| BackendError::Netlink {
        backend,
        context: context.clone(),
        source,
    }
}

/// A backend's parts for each family the config enables; an error when it enables neither.
pub(super) fn some_family<A, B>(
    backend: &'static str,
    v4: Option<A>,
    v6: Option<B>,
) -> Result<(Option<A>, Option<B>), BackendError> {
    if v4.is_none() && v6.is_none() {
        return Err(BackendError::Setup {
            backend,
            why: "the network config enables neither an IPv4 Network nor an IPv6Network".into(),
        });
    }
    Ok((v4, v6))
}

/// Opens the backend's netlink sockets once.
pub(super) fn connect(
    backend: &'static str,
    nl: &mut Option<Netlink>,
) -> Result<Netlink, BackendError> {
    if nl.is_none() {
        *nl = Some(netlink::open().map_err(fatal(backend, "netlink"))?);
    }
    Ok(nl.clone().expect("set above"))
}

/// Programs a point-to-point device that carries the whole Network (udp's `flannel0`,
/// wireguard's `flannel-wg`, `flannel-wg-v6`): exactly our subnet's network address as a `/32`
/// (`/128`), and one route, the Network through the device; every other route of the family
/// inside the Network through it is stale.
pub(super) async fn program_network_device<N: Net>(
    nl: &Netlink,
    device: &str,
    index: u32,
    own: N,
    network: N,
    ext_index: u32,
    tally: &mut ReconcileTally,
) -> Result<(), BackendError> {
    let backend = tally.backend;
    let want = N::host(own.net_addr());
    let change = ensure_address(&nl.h, device, index, want, tally).await?;
    tally.report.added += usize::from(change.added);
    tally.report.removed += change.removed;
    let route = Route::<N>::new(network, None, index, false);
    let desired = [(network, (route, None))].into_iter().collect();
    let mut plan = Plan::default();
    plan_routes(
        &nl.h,
        backend,
        &desired,
        &[index],
        |r| owned_route(r, &network, None, Some(index), ext_index),
        &mut plan,
    )
    .await?;
    tally.apply(nl, plan).await;
    Ok(())
}

/// What [`ensure_address`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct AddressChange {
    pub added: bool,
    pub removed: usize,
}

impl AddressChange {
    pub fn any(&self) -> bool {
        self.added || self.removed > 0
    }
}

/// Gives device `index` (named `device` in messages) exactly the address `want`, besides
/// link-local ones. Reading the addresses and adding `want` are steps the pass cannot go on
/// without; a removal that fails is recorded in `tally` and the pass goes on, like every other
/// kernel change. Removing an address that is already gone counts as nothing.
pub(super) async fn ensure_address<N: Net>(
    h: &Handle,
    device: &str,
    index: u32,
    want: N,
    tally: &mut ReconcileTally,
) -> Result<AddressChange, BackendError> {
    let backend = tally.backend;
    let context = format!("address {want} on device {device}");
    let have = netlink::addresses::<N>(h, index)
        .await
        .map_err(fatal(backend, &context))?;
    let mut change = AddressChange::default();
    if !have.contains(&want) {
        netlink::replace_address(h, index, want)
            .await
            .map_err(fatal(backend, &context))?;
        tracing::info!("{backend}: {context} set");
        change.added = true;
    }
    for old in have
        .into_iter()
        .filter(|a| *a != want && !N::is_link_local(a.ip_addr()))
    {
        match netlink::delete_address(h, index, old).await {
            Ok(()) => {
                tracing::info!("{backend}: removed old address {old} from device {device}");
                change.removed += 1;
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => tally.failed(&format!("removing old address {old}"), e),
        }
    }
    Ok(change)
}

/// The routes a backend owns: in the main table, inside `network` but not inside our own
/// subnet, not the kernel's connected routes, and either on `device` (every such route on a
/// device of ours is ours) or on the external interface, installed by us (carrying our protocol
/// number) and shaped like ours (a gateway, a part of the network). A route someone else made on
/// the external interface is never ours, whatever its shape.
///
/// A route is removed when stale only if it is owned, so every route a backend installs must
/// be owned: the peer filter guarantees it by accepting only subnets inside the Network with
/// the configured prefix length, never overlapping ours (pinned by the test
/// `routes_of_accepted_peers_are_owned`).
pub(super) fn owned_route<N: Net>(
    route: &Route<N>,
    network: &N,
    own: Option<&N>,
    device: Option<u32>,
    ext_index: u32,
) -> bool {
    if route.table != RT_TABLE_MAIN
        || route.protocol == RouteProtocol::Kernel
        || !within(&route.dst, network)
        || own.is_some_and(|own| within(&route.dst, own))
    {
        return false;
    }
    match route.oif {
        Some(oif) if Some(oif) == device => true,
        Some(oif) if oif == ext_index => {
            route.is_ours()
                && route.gateway.is_some()
                && route.dst.prefix_len() > network.prefix_len()
        }
        _ => false,
    }
}

/// Plans the changes that make the owned routes equal `desired` (keyed by destination, all
/// with the family's default metric and our protocol number): replaces missing or wrong ones,
/// deletes the rest of the owned ones, leaves correct ones untouched. A route at a desired
/// destination and metric that is not ours (an older flanneld's, made by hand) is replaced:
/// the kernel identifies routes by table, destination and metric, so ours takes its place.
/// Only routes through `oifs` are read (the kernel filters the dump by device). Each desired
/// route names the peer it is for, or `None` for a device's own route.
pub(super) async fn plan_routes<N: Net, P: Into<Option<SubnetKey>> + Copy>(
    h: &Handle,
    backend: &'static str,
    desired: &BTreeMap<N, (Route<N>, P)>,
    oifs: &[u32],
    owned: impl Fn(&Route<N>) -> bool,
    plan: &mut Plan,
) -> Result<(), BackendError> {
    let mut actual: Vec<Route<N>> = Vec::new();
    let mut seen = Vec::new();
    for &oif in oifs {
        if seen.contains(&oif) {
            continue;
        }
        seen.push(oif);
        let routes = netlink::routes::<N>(h, RT_TABLE_MAIN, Some(oif))
            .await
            .map_err(fatal(backend, &format!("reading {} routes", N::NAME)))?;
        actual.extend(routes);
    }
    let mut by_dst: HashMap<N, &Route<N>> = HashMap::with_capacity(actual.len());
    for r in actual.iter().filter(|r| {
        r.priority == N::DEFAULT_METRIC
            && r.table == RT_TABLE_MAIN
            && r.protocol != RouteProtocol::Kernel
    }) {
        by_dst.insert(r.dst, r);
    }

    for (dst, (want, key)) in desired {
        let have = by_dst.get(dst);
        if have.is_some_and(|have| have.same_path(want) && have.protocol == want.protocol) {
            continue;
        }
        let effect = if have.is_some() {
            Effect::Repaired
        } else {
            Effect::Added
        };
        plan.change(effect, (*key).into(), |b| b.replace_route(want));
    }
    for have in actual.iter().filter(|r| owned(r)) {
        if have.priority == N::DEFAULT_METRIC && desired.contains_key(&have.dst) {
            continue;
        }
        plan.change(Effect::Removed, None, |b| b.delete_route(have));
    }
    Ok(())
}

/// What a backend last programmed into the kernel (its wanted state after a pass in which
/// every change succeeded), so that a lease event can be applied as the difference to it
/// instead of a pass that dumps and compares every peer's entries. Unknown (`None`) until a
/// full pass succeeded and again after any failed change: the kernel then holds something
/// unknown, and only the full pass finds out what.
pub(super) struct Programmed<T> {
    applied: Option<T>,
    staged: Option<T>,
}

impl<T> Default for Programmed<T> {
    fn default() -> Self {
        Programmed {
            applied: None,
            staged: None,
        }
    }
}

impl<T> Programmed<T> {
    /// What the kernel holds, as far as we know.
    pub fn known(&self) -> Option<&T> {
        self.applied.as_ref()
    }

    /// The state a pass is about to apply; it becomes known when the pass [`settle`]s fine.
    ///
    /// [`settle`]: Programmed::settle
    pub fn stage(&mut self, wanted: T) {
        self.staged = Some(wanted);
    }

    /// The pass is over: what it staged is known if every change succeeded, else nothing is.
    pub fn settle(&mut self, all_applied: bool) {
        let staged = self.staged.take();
        self.applied = if all_applied { staged } else { None };
    }

    pub fn forget(&mut self) {
        self.applied = None;
        self.staged = None;
    }
}

/// A backend's state for one address family that can plan a lease event from what its last
/// pass programmed.
pub(super) trait EventPlanner: Send {
    /// Adds to `plan` what changed in `peers` since the last pass, without reading the kernel.
    /// `false` when what the kernel holds is unknown (then only the full pass will do).
    fn plan_update(&mut self, ext: &ExternalInterface, peers: &PeerSet, plan: &mut Plan) -> bool;
    /// The pass is over: see [`Programmed::settle`].
    fn settle(&mut self, all_applied: bool);
}

/// What became of a lease event.
pub(super) enum LeaseEvent {
    /// Every change applied: the report.
    Applied(ReconcileReport),
    /// What the kernel holds is unknown or a change failed: the caller runs the full pass; the
    /// report says what applied before that.
    NeedsFullPass(ReconcileReport),
}

/// Applies a lease event as the difference to what `families` last programmed, in one batch.
pub(super) async fn apply_lease_event(
    backend: &'static str,
    nl: &Netlink,
    ext: &ExternalInterface,
    peers: &PeerSet,
    families: &mut [&mut dyn EventPlanner],
) -> LeaseEvent {
    let mut plan = Plan::default();
    let mut known = true;
    for f in families.iter_mut() {
        known &= f.plan_update(ext, peers, &mut plan);
    }
    if !known {
        families.iter_mut().for_each(|f| f.settle(false));
        return LeaseEvent::NeedsFullPass(ReconcileReport::default());
    }
    let mut tally = ReconcileTally::new(backend);
    tally.apply(nl, plan).await;
    let all_applied = tally.failed.is_empty();
    families.iter_mut().for_each(|f| f.settle(all_applied));
    if all_applied {
        return LeaseEvent::Applied(tally.report);
    }
    tracing::warn!("{backend}: a change failed; comparing the kernel with every peer");
    LeaseEvent::NeedsFullPass(tally.report)
}

/// Plans the route changes that turn `applied` (what the last pass programmed) into `desired`
/// without reading the kernel: new and changed routes. Stale ones: [`plan_route_removals`].
pub(super) fn plan_route_changes<N: Net, P: Into<Option<SubnetKey>> + Copy>(
    applied: &BTreeMap<N, (Route<N>, P)>,
    desired: &BTreeMap<N, (Route<N>, P)>,
    plan: &mut Plan,
) {
    for (dst, (want, key)) in desired {
        let had = applied.get(dst).map(|(r, _)| r);
        if had == Some(want) {
            continue;
        }
        let effect = if had.is_some() {
            Effect::Repaired
        } else {
            Effect::Added
        };
        plan.change(effect, (*key).into(), |b| b.replace_route(want));
    }
}

/// Plans deleting the routes of `applied` that `desired` no longer has.
pub(super) fn plan_route_removals<N: Net, P>(
    applied: &BTreeMap<N, (Route<N>, P)>,
    desired: &BTreeMap<N, (Route<N>, P)>,
    plan: &mut Plan,
) {
    for (dst, (had, _)) in applied {
        if !desired.contains_key(dst) {
            plan.change(Effect::Removed, None, |b| b.delete_route(had));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::Route4;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn options_are_case_insensitive() {
        let m = obj(json!({"Type": "vxlan", "vni": 4, "directrouting": true}));
        assert_eq!(uint_option("vxlan", &m, "VNI", 100).unwrap(), Some(4));
        assert!(bool_option("vxlan", &m, "DirectRouting").unwrap());
        assert!(!bool_option("vxlan", &m, "GBP").unwrap());
    }

    #[test]
    fn bad_option_names_option_and_value() {
        let m = obj(json!({"Port": "x"}));
        let e = uint_option("vxlan", &m, "Port", 65535)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Port") && e.contains("\"x\""), "{e}");
        let m = obj(json!({"Port": 70000}));
        let e = uint_option("vxlan", &m, "Port", 65535)
            .unwrap_err()
            .to_string();
        assert!(e.contains("70000") && e.contains("65535"), "{e}");
    }

    #[test]
    fn ownership_of_routes() {
        let net: Ipv4Network = "10.5.0.0/16".parse().unwrap();
        let own: Ipv4Network = "10.5.1.0/24".parse().unwrap();
        let r = |dst: &str, gw: Option<&str>, oif| {
            Route4::new(
                dst.parse().unwrap(),
                gw.map(|g| g.parse().unwrap()),
                oif,
                false,
            )
        };
        let owned = |route: &Route4| owned_route(route, &net, Some(&own), Some(7), 2);
        assert!(owned(&r("10.5.2.0/24", Some("10.5.2.0"), 7)));
        assert!(owned(&r("10.5.0.0/16", None, 7)));
        assert!(owned(&r("10.5.2.0/24", Some("192.0.2.2"), 2)));
        assert!(!owned(&r("10.5.0.0/16", Some("192.0.2.2"), 2)));
        assert!(!owned(&r("10.5.2.0/24", None, 2)));
        assert!(!owned(&r("10.5.1.0/24", None, 7)));
        assert!(!owned(&r("10.6.2.0/24", Some("10.6.2.0"), 7)));
        assert!(!owned(&r("10.5.2.0/24", Some("10.5.2.0"), 9)));
    }

    #[test]
    fn routes_someone_else_made_are_ours_only_on_our_device() {
        let net: Ipv4Network = "10.5.0.0/16".parse().unwrap();
        let owned = |route: &Route4| owned_route(route, &net, None, Some(7), 2);
        let by_hand = |dst: &str, gw: &str, oif, metric| Route4 {
            protocol: RouteProtocol::Boot,
            priority: metric,
            ..Route4::new(dst.parse().unwrap(), Some(gw.parse().unwrap()), oif, false)
        };
        // `ip route add 10.5.200.0/24 via 198.18.0.50 dev <external>`: an operator's.
        assert!(!owned(&by_hand("10.5.200.0/24", "198.18.0.50", 2, 0)));
        // An older flanneld's (proto static) is not claimed on the external interface either.
        let older = Route4 {
            protocol: RouteProtocol::Static,
            ..Route4::new(
                "10.5.2.0/24".parse().unwrap(),
                Some("198.18.0.2".parse().unwrap()),
                2,
                false,
            )
        };
        assert!(!owned(&older));
        // The same route with our protocol number is ours.
        let ours = Route4::new(
            "10.5.2.0/24".parse().unwrap(),
            Some("198.18.0.2".parse().unwrap()),
            2,
            false,
        );
        assert!(ours.is_ours() && owned(&ours));
        // Everything inside the Network on a device of ours is ours, any metric or protocol.
        assert!(owned(&by_hand("10.5.200.0/24", "10.5.200.0", 7, 0)));
        assert!(owned(&by_hand("10.5.200.0/24", "10.5.200.0", 7, 50)));
    }

    #[test]
    fn ownership_of_ipv6_routes() {
        let net: Ipv6Network = "fc00::/48".parse().unwrap();
        let own: Ipv6Network = "fc00:0:0:1::/64".parse().unwrap();
        let r = |dst: &str, gw: Option<&str>, oif| {
            netlink::Route6::new(
                dst.parse().unwrap(),
                gw.map(|g| g.parse().unwrap()),
                oif,
                false,
            )
        };
        let owned = |route: &netlink::Route6| owned_route(route, &net, Some(&own), Some(7), 2);
        assert!(owned(&r("fc00:0:0:2::/64", Some("fc00:0:0:2::"), 7)));
        assert!(owned(&r("fc00:0:0:2::/64", Some("2001:db8::2"), 2)));
        assert!(!owned(&r("fc00:0:0:1::/64", None, 7)));
        assert!(!owned(&r("fd00::/64", Some("fd00::"), 7)));
        assert!(!owned(&r("fc00:0:0:2::/64", None, 2)));
    }

    fn peer(key: &str, json: &str, create_revision: i64) -> (SubnetKey, Lease) {
        let key: SubnetKey = key.parse().unwrap();
        let attrs = LeaseAttrs::from_json("k", json.as_bytes()).unwrap();
        let lease = Lease {
            key,
            attrs,
            etcd_lease: Some(1),
            revision: create_revision,
            create_revision,
        };
        (key, lease)
    }

    #[test]
    fn candidates_are_peers_of_the_backend_type_with_a_public_ip() {
        let peers: PeerSet = [
            peer(
                "10.5.2.0-24",
                r#"{"PublicIP":"198.18.0.2","BackendType":"host-gw"}"#,
                1,
            ),
            peer(
                "10.5.3.0-24",
                r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan"}"#,
                1,
            ),
            peer("10.5.4.0-24", r#"{"PublicIP":"198.18.0.4"}"#, 1),
            peer(
                "10.5.5.0-24",
                r#"{"PublicIP":null,"BackendType":"host-gw"}"#,
                1,
            ),
            peer(
                "fc00:0:0:6::-64",
                r#"{"PublicIPv6":"fd00::6","BackendType":"host-gw"}"#,
                1,
            ),
        ]
        .into_iter()
        .collect();
        let mut skipped = Skipped::new();
        let got: Vec<String> = candidates::<Ipv4Network>(&peers, "host-gw", &mut skipped)
            .iter()
            .map(|c| format!("{} via {}", c.subnet, c.public_ip))
            .collect();
        assert_eq!(got, ["10.5.2.0/24 via 198.18.0.2"]);
        let why: Vec<(String, String)> = skipped
            .iter()
            .map(|(k, w)| (k.to_string(), w.clone()))
            .collect();
        assert_eq!(
            why,
            [
                (
                    "10.5.3.0-24".into(),
                    r#"backend type "vxlan" is not host-gw"#.into()
                ),
                (
                    "10.5.4.0-24".into(),
                    r#"backend type "udp" is not host-gw"#.into()
                ),
                ("10.5.5.0-24".into(), "lease has no PublicIP".into()),
            ] as [(String, String); 3]
        );
        let mut skipped = Skipped::new();
        let v6 = candidates::<Ipv6Network>(&peers, "host-gw", &mut skipped);
        assert_eq!(v6.len(), 1);
        assert!(skipped.is_empty(), "{skipped:?}");
    }

    /// The backends do not check that a peer's subnet is inside the Network: the peer filter
    /// does, and `owned_route` relies on it, since a route it does not own is never removed.
    #[test]
    fn programmed_state_is_known_only_after_a_pass_that_applied_everything() {
        let mut p = Programmed::default();
        assert_eq!(p.known(), None::<&u32>);
        p.stage(1);
        assert_eq!(p.known(), None, "staged is not applied yet");
        p.settle(true);
        assert_eq!(p.known(), Some(&1));
        p.stage(2);
        p.settle(false);
        assert_eq!(p.known(), None, "a failed change leaves the kernel unknown");
        p.settle(true);
        assert_eq!(p.known(), None, "nothing staged, nothing known");
        p.stage(3);
        p.settle(true);
        p.forget();
        assert_eq!(p.known(), None);
    }

    #[test]
    fn routes_of_accepted_peers_are_owned() {
        let config =
            NetworkConfig::parse(br#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#)
                .unwrap();
        let (own_key, own) = peer("10.5.1.0-24", r#"{"PublicIP":"198.18.0.1"}"#, 1);
        // One good peer, then leases outside the Network, too wide, or inside our subnet.
        let others = [
            "10.5.2.0-24",
            "10.6.3.0-24",
            "0.0.0.0-0",
            "10.5.0.0-16",
            "10.5.1.128-25",
        ];
        let leases: PeerSet = std::iter::once((own_key, own.clone()))
            .chain(others.iter().zip(2..).map(|(key, n)| {
                let attrs = format!(r#"{{"PublicIP":"198.18.0.{n}","BackendType":"host-gw"}}"#);
                peer(key, &attrs, n)
            }))
            .collect();
        let accepted = crate::subnet::peers::filter(&leases, &config, &own).accepted;
        let network = config.v4.unwrap().network;
        let own_subnet = own_key.ipv4;
        let (device, ext_index) = (7, 2);
        let mut skipped = Skipped::new();
        let peers = candidates::<Ipv4Network>(&accepted, "host-gw", &mut skipped);
        let subnets: Vec<String> = peers.iter().map(|c| c.subnet.to_string()).collect();
        assert_eq!(subnets, ["10.5.2.0/24"]);
        for c in &peers {
            // As host-gw installs it, and as vxlan does (through its device, onlink).
            let via_ext = Route4::new(c.subnet, Some(c.public_ip), ext_index, false);
            let via_dev = Route4::new(c.subnet, Some(c.subnet.network()), device, true);
            for route in [via_ext, via_dev] {
                assert!(
                    owned_route(
                        &route,
                        &network,
                        own_subnet.as_ref(),
                        Some(device),
                        ext_index
                    ),
                    "{route:?} installed but never removable"
                );
            }
        }
    }

    #[test]
    fn families_read_their_lease_fields() {
        let attrs = LeaseAttrs::from_json(
            "k",
            br#"{"PublicIP":"192.0.2.3","PublicIPv6":"2001:db8::3","BackendType":"vxlan","BackendData":{"VtepMAC":"02:00:00:00:00:04"},"BackendV6Data":{"VtepMAC":"02:00:00:00:00:06"}}"#,
        )
        .unwrap();
        assert_eq!(
            Ipv4Network::public_ip(&attrs),
            Some("192.0.2.3".parse().unwrap())
        );
        assert_eq!(
            Ipv6Network::public_ip(&attrs),
            Some("2001:db8::3".parse().unwrap())
        );
        assert_eq!(
            Ipv6Network::backend_data(&attrs)["VtepMAC"],
            "02:00:00:00:00:06"
        );
        let key: SubnetKey = "10.5.2.0-24&fc00:0:0:2::-64".parse().unwrap();
        assert_eq!(
            Ipv6Network::subnet(&key),
            Some("fc00:0:0:2::/64".parse().unwrap())
        );
    }
}
