//! `host-gw`: no encapsulation; each peer subnet is routed via the peer's public IP on the
//! external interface (IPv4 subnets via `PublicIP`, IPv6 subnets via `PublicIPv6`). Needs every
//! host on one L2 segment and no NAT.

use std::collections::BTreeMap;

use async_trait::async_trait;
use ipnetwork::{Ipv4Network, Ipv6Network};

use super::common::{self, EventPlanner, LeaseEvent, LeaseFamily, Plan, ReconcileTally};
use super::{Backend, BackendContext, BackendError, Publish, ReconcileReport};
use crate::iface::ExternalInterface;
use crate::netlink::{Netlink, Route};
use crate::subnet::{Lease, PeerSet, SubnetKey};

const BACKEND: &str = "host-gw";

/// The routes of one IP family.
struct Routes<N: LeaseFamily> {
    network: N,
    own: Option<N>,
    /// Peers not programmed, with the reason; logged when it changes.
    skipped: BTreeMap<SubnetKey, String>,
    /// The routes the last pass programmed, for [`Routes::plan_update`].
    programmed: common::Programmed<Wanted<N>>,
}

type Wanted<N> = BTreeMap<N, (Route<N>, SubnetKey)>;

impl<N: LeaseFamily> Routes<N> {
    fn new(network: N) -> Self {
        Routes {
            network,
            own: None,
            skipped: BTreeMap::new(),
            programmed: common::Programmed::default(),
        }
    }

    /// Peers route to our public IP directly, so it must be the interface's own address.
    fn check_no_nat(ext: &ExternalInterface) -> Result<N::Addr, BackendError> {
        match (N::ext_public(ext), N::ext_iface(ext)) {
            (Some(public), Some(iface)) if public == iface => Ok(public),
            (Some(public), Some(iface)) => Err(BackendError::Setup {
                backend: BACKEND,
                why: format!(
                    "the public IP {public} differs from {iface}, the address of interface {}: \
                     this host is behind NAT, and host-gw needs peers to reach it directly on the \
                     same L2 network; use the vxlan backend, or set --public-ip{} to {iface}",
                    ext.name,
                    if N::HOST_PREFIX == 128 { "v6" } else { "" }
                ),
            }),
            (None, _) => Err(BackendError::Setup {
                backend: BACKEND,
                why: format!("interface {} has no {} public IP", ext.name, N::NAME),
            }),
            (_, None) => Err(BackendError::Setup {
                backend: BACKEND,
                why: format!("interface {} has no {} address", ext.name, N::NAME),
            }),
        }
    }

    async fn plan(
        &mut self,
        nl: &Netlink,
        ext: &ExternalInterface,
        peers: &PeerSet,
        plan: &mut Plan,
    ) -> Result<(), BackendError> {
        // Unknown until this pass has applied everything.
        self.programmed.forget();
        Self::check_no_nat(ext)?;
        let want = self.wanted(ext, peers);
        let (network, own, ext_index) = (self.network, self.own, ext.index);
        common::plan_routes(
            &nl.h,
            BACKEND,
            &want,
            &[ext_index],
            |r| common::owned_route(r, &network, own.as_ref(), None, ext_index),
            plan,
        )
        .await?;
        self.programmed.stage(want);
        Ok(())
    }

    fn wanted(&mut self, ext: &ExternalInterface, peers: &PeerSet) -> Wanted<N> {
        let mut skipped = BTreeMap::new();
        let want = common::candidates(peers, BACKEND, &mut skipped)
            .into_iter()
            .map(|c| {
                let route = Route::new(c.subnet, Some(c.public_ip), ext.index, false);
                (c.subnet, (route, c.key))
            })
            .collect();
        common::log_skipped(BACKEND, "", &mut self.skipped, skipped);
        want
    }

    /// Plans what changed in the peers since the last pass, from the routes that pass
    /// programmed (the kernel is not read). `false` when what the kernel holds is unknown.
    fn plan_update(&mut self, ext: &ExternalInterface, peers: &PeerSet, plan: &mut Plan) -> bool {
        if self.programmed.known().is_none() {
            return false;
        }
        let want = self.wanted(ext, peers);
        let Some(had) = self.programmed.known() else {
            return false;
        };
        common::plan_route_changes(had, &want, plan);
        common::plan_route_removals(had, &want, plan);
        self.programmed.stage(want);
        true
    }
}

pub struct HostGwBackend {
    ctx: BackendContext,
    nl: Option<Netlink>,
    v4: Option<Routes<Ipv4Network>>,
    v6: Option<Routes<Ipv6Network>>,
}

impl<N: LeaseFamily> EventPlanner for Routes<N> {
    fn plan_update(&mut self, ext: &ExternalInterface, peers: &PeerSet, plan: &mut Plan) -> bool {
        Routes::plan_update(self, ext, peers, plan)
    }

    fn settle(&mut self, all_applied: bool) {
        self.programmed.settle(all_applied);
    }
}

impl HostGwBackend {
    pub fn new(ctx: BackendContext) -> Result<Self, BackendError> {
        let v4 = Ipv4Network::of_config(&ctx.config).map(Routes::new);
        let v6 = Ipv6Network::of_config(&ctx.config).map(Routes::new);
        let (v4, v6) = common::some_family(BACKEND, v4, v6)?;
        Ok(HostGwBackend {
            ctx,
            nl: None,
            v4,
            v6,
        })
    }

    fn check_no_nat(&self) -> Result<(), BackendError> {
        if self.v4.is_some() {
            Routes::<Ipv4Network>::check_no_nat(&self.ctx.ext)?;
        }
        if self.v6.is_some() {
            Routes::<Ipv6Network>::check_no_nat(&self.ctx.ext)?;
        }
        Ok(())
    }
}

fn own_subnet<N: LeaseFamily>(
    routes: &mut Option<Routes<N>>,
    own: &Lease,
) -> Result<(), BackendError> {
    if let Some(r) = routes {
        let subnet = N::subnet(&own.key).ok_or_else(|| BackendError::Setup {
            backend: BACKEND,
            why: format!("our lease {} has no {} subnet", own.key, N::NAME),
        })?;
        r.own = Some(subnet);
        r.programmed.forget();
    }
    Ok(())
}

#[async_trait]
impl Backend for HostGwBackend {
    async fn prepare(&mut self) -> Result<Publish, BackendError> {
        self.check_no_nat()?;
        common::connect(BACKEND, &mut self.nl)?;
        Ok(Publish {
            backend_type: BACKEND.into(),
            backend_data: None,
            backend_v6_data: None,
            mtu: self.ctx.ext.mtu,
        })
    }

    async fn lease_acquired(&mut self, own: &Lease) -> Result<(), BackendError> {
        own_subnet(&mut self.v4, own)?;
        own_subnet(&mut self.v6, own)?;
        Ok(())
    }

    async fn reconcile(&mut self, peers: &PeerSet) -> Result<ReconcileReport, BackendError> {
        let nl = common::connect(BACKEND, &mut self.nl)?;
        self.check_no_nat()?;
        let mut tally = ReconcileTally::new(BACKEND);
        let mut plan = Plan::default();
        let ext = &self.ctx.ext;
        if let Some(v4) = &mut self.v4 {
            v4.plan(&nl, ext, peers, &mut plan).await?;
        }
        if let Some(v6) = &mut self.v6 {
            v6.plan(&nl, ext, peers, &mut plan).await?;
        }
        tally.apply(&nl, plan).await;
        self.settle(tally.failed.is_empty());
        tally.finish()
    }

    async fn update(&mut self, peers: &PeerSet) -> Result<ReconcileReport, BackendError> {
        let nl = common::connect(BACKEND, &mut self.nl)?;
        let mut families = families(&mut self.v4, &mut self.v6);
        match common::apply_lease_event(BACKEND, &nl, &self.ctx.ext, peers, &mut families).await {
            LeaseEvent::Applied(report) => Ok(report),
            LeaseEvent::NeedsFullPass(done) => self.reconcile(peers).await.map(|r| done.plus(&r)),
        }
    }
}

impl HostGwBackend {
    fn settle(&mut self, all_applied: bool) {
        for f in families(&mut self.v4, &mut self.v6) {
            f.settle(all_applied);
        }
    }
}

/// The enabled families' state, for what every family does alike.
fn families<'a>(
    v4: &'a mut Option<Routes<Ipv4Network>>,
    v6: &'a mut Option<Routes<Ipv6Network>>,
) -> Vec<&'a mut dyn EventPlanner> {
    let v4 = v4.iter_mut().map(|f| f as &mut dyn EventPlanner);
    v4.chain(v6.iter_mut().map(|f| f as &mut dyn EventPlanner))
        .collect()
}
