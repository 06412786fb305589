//! `host-gw`: no encapsulation; each peer subnet is routed via the peer's public IP on the
//! external interface. Needs every host on one L2 segment and no NAT.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use async_trait::async_trait;
use ipnetwork::Ipv4Network;
use rtnetlink::Handle;

use super::common::{self, fatal, Tally};
use super::{Backend, BackendContext, BackendError, Publish, ReconcileReport};
use crate::netlink::{self, Route4};
use crate::subnet::{Lease, PeerSet, SubnetKey};

const BACKEND: &str = "host-gw";

pub struct HostGwBackend {
    ctx: BackendContext,
    network: Ipv4Network,
    nl: Option<Handle>,
    own: Option<Ipv4Network>,
    /// Peers not programmed, with the reason; logged when it changes.
    skipped: BTreeMap<SubnetKey, String>,
}

impl HostGwBackend {
    pub fn new(ctx: BackendContext) -> Result<Self, BackendError> {
        let network = ctx.config.network.ok_or_else(|| BackendError::Setup {
            backend: BACKEND,
            why: "needs an IPv4 Network (IPv6-only networks are not supported yet)".into(),
        })?;
        Ok(HostGwBackend {
            ctx,
            network,
            nl: None,
            own: None,
            skipped: BTreeMap::new(),
        })
    }

    fn handle(&mut self) -> Result<Handle, BackendError> {
        if self.nl.is_none() {
            self.nl = Some(netlink::connect().map_err(fatal(BACKEND, "netlink"))?);
        }
        Ok(self.nl.clone().expect("set above"))
    }

    /// Peers route to our public IP directly, so it must be the interface's own address.
    fn check_no_nat(&self) -> Result<Ipv4Addr, BackendError> {
        let ext = &self.ctx.ext;
        match (ext.public_ip, ext.iface_addr) {
            (Some(public), Some(iface)) if public == iface => Ok(public),
            (Some(public), Some(iface)) => Err(BackendError::Setup {
                backend: BACKEND,
                why: format!(
                    "the public IP {public} differs from {iface}, the address of interface {}: \
                     this host is behind NAT, and host-gw needs peers to reach it directly on the \
                     same L2 network; use the vxlan backend, or set --public-ip to {iface}",
                    ext.name
                ),
            }),
            (None, _) => Err(BackendError::Setup {
                backend: BACKEND,
                why: format!("interface {} has no IPv4 public IP", ext.name),
            }),
            (_, None) => Err(BackendError::Setup {
                backend: BACKEND,
                why: format!("interface {} has no IPv4 address", ext.name),
            }),
        }
    }
}

#[async_trait]
impl Backend for HostGwBackend {
    async fn prepare(&mut self) -> Result<Publish, BackendError> {
        self.check_no_nat()?;
        self.handle()?;
        Ok(Publish {
            backend_type: BACKEND.into(),
            backend_data: None,
            backend_v6_data: None,
            mtu: self.ctx.ext.mtu,
        })
    }

    async fn lease_acquired(&mut self, own: &Lease) -> Result<(), BackendError> {
        let subnet = own.key.ipv4.ok_or_else(|| BackendError::Setup {
            backend: BACKEND,
            why: format!("our lease {} has no IPv4 subnet", own.key),
        })?;
        self.own = Some(subnet);
        Ok(())
    }

    async fn reconcile(&mut self, peers: &PeerSet) -> Result<ReconcileReport, BackendError> {
        let h = self.handle()?;
        let public_ip = self.check_no_nat()?;
        let ext_index = self.ctx.ext.index;
        let mut tally = Tally::new(BACKEND);

        let mut want = BTreeMap::new();
        let mut skipped = BTreeMap::new();
        for (key, lease) in peers {
            let Some(subnet) = key.ipv4 else {
                continue;
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
                skipped.insert(*key, format!("backend type {kind:?} is not host-gw"));
                continue;
            }
            match lease.attrs.public_ip {
                None => {
                    skipped.insert(*key, "lease has no IPv4 PublicIP".into());
                }
                Some(ip) if ip == public_ip => {
                    skipped.insert(*key, format!("lease has our own PublicIP {ip}"));
                }
                Some(ip) => {
                    want.insert(subnet, Route4::new(subnet, Some(ip), ext_index, false));
                }
            }
        }
        for (key, why) in &skipped {
            if self.skipped.get(key) != Some(why) {
                tracing::info!("{BACKEND}: ignoring peer {key}: {why}");
            }
        }
        self.skipped = skipped;

        let (network, own) = (self.network, self.own);
        common::sync_routes(
            &h,
            &want,
            |r| common::owned_route(r, &network, own.as_ref(), None, ext_index),
            &mut tally,
        )
        .await?;
        tally.finish()
    }
}
