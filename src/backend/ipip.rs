//! `ipip`: the kernel's IP-in-IP tunnel, IPv4 only, as flannel programs it. One device,
//! `flannel.ipip` (`local` our interface address, no `remote`, MTU the interface's minus the
//! 20-byte outer header, the address `<own subnet network>/32`), and per peer lease of type
//! `ipip` a route: peer subnet via the peer's `PublicIP`, dev `flannel.ipip`, onlink. With
//! `DirectRouting`, a peer whose public IP is on the external interface's own subnet is routed
//! via its public IP on that interface instead, as host-gw does.
//!
//! A kernel without the ipip module cannot make the device: `prepare` fails with a message
//! saying so, before any lease is taken, and the daemon exits.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use async_trait::async_trait;
use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::link::{InfoData, InfoIpTunnel, LinkAttribute, LinkInfo};
use rtnetlink::{Handle, LinkIpIp};

use super::common::{self, fatal, LeaseFamily, Plan, ReconcileTally};
use super::{Backend, BackendContext, BackendError, Publish, ReconcileReport};
use crate::netlink::{self, Link, Net, Netlink, NetlinkError, Route};
use crate::subnet::{Lease, PeerSet, SubnetKey};

const BACKEND: &str = "ipip";
/// flannel's device name.
pub const DEVICE: &str = "flannel.ipip";
/// The outer IPv4 header.
const ENCAP_OVERHEAD: u32 = 20;

pub struct IpipBackend {
    ctx: BackendContext,
    direct_routing: bool,
    network: Ipv4Network,
    /// `local` of the device: the external interface's own address.
    local: Ipv4Addr,
    mtu: u32,
    nl: Option<Netlink>,
    own: Option<Ipv4Network>,
    /// Peers not programmed, with the reason; logged when it changes.
    skipped: common::Skipped,
}

impl IpipBackend {
    pub fn new(ctx: BackendContext) -> Result<Self, BackendError> {
        let direct_routing = common::bool_option(BACKEND, &ctx.config.backend, "DirectRouting")?;
        if ctx.config.v6.is_some() {
            return Err(BackendError::Setup {
                backend: BACKEND,
                why: "ipip tunnels carry IPv4 only, and the network config enables an \
                      IPv6Network; use vxlan or host-gw for IPv6"
                    .into(),
            });
        }
        let network = Ipv4Network::of_config(&ctx.config).ok_or_else(|| BackendError::Setup {
            backend: BACKEND,
            why: "the network config enables no IPv4 Network".into(),
        })?;
        let ext = &ctx.ext;
        let local = ext
            .iface_addr
            .or(ext.public_ip)
            .ok_or_else(|| BackendError::Setup {
                backend: BACKEND,
                why: format!("interface {} has no IPv4 address", ext.name),
            })?;
        let mtu = ext
            .mtu
            .checked_sub(ENCAP_OVERHEAD)
            .filter(|m| *m > 0)
            .ok_or_else(|| BackendError::Setup {
                backend: BACKEND,
                why: format!(
                    "MTU {} of interface {} is too small for ipip (it needs more than {ENCAP_OVERHEAD})",
                    ext.mtu, ext.name
                ),
            })?;
        tracing::info!("{BACKEND}: DirectRouting={direct_routing}");
        Ok(IpipBackend {
            ctx,
            direct_routing,
            network,
            local,
            mtu,
            nl: None,
            own: None,
            skipped: common::Skipped::new(),
        })
    }

    /// Adopts `flannel.ipip` when it is an ipip device with our `local` and no `remote`,
    /// re-creates it when it is one with others, refuses a device of another kind (it is not
    /// ours to delete); sets MTU and up.
    async fn ensure_device(&self, h: &Handle) -> Result<Link, BackendError> {
        let lookup = || fatal(BACKEND, &format!("looking up device {DEVICE}"));
        if let Some(link) = netlink::link_by_name(h, DEVICE).await.map_err(lookup())? {
            if link.kind.as_deref() != Some("ipip") {
                return Err(BackendError::Setup {
                    backend: BACKEND,
                    why: format!(
                        "device {DEVICE} exists and is a {} device, not ipip: remove it and \
                         start again",
                        link.kind.as_deref().unwrap_or("plain")
                    ),
                });
            }
            let (local, remote) = tunnel_ends(h, link.index).await.map_err(lookup())?;
            let unset = |a: Option<Ipv4Addr>| a.is_none_or(|a| a.is_unspecified());
            if local == Some(self.local) && unset(remote) {
                return self.set_up(h, link).await;
            }
            tracing::warn!(
                "{BACKEND}: device {DEVICE} has local {local:?} remote {remote:?}, not local {} \
                 and no remote; re-creating it",
                self.local
            );
            netlink::delete_link(h, link.index)
                .await
                .map_err(fatal(BACKEND, &format!("deleting device {DEVICE}")))?;
        }
        let add = LinkIpIp::new(DEVICE).local(self.local).build();
        if let Err(e) = h.link().add(add).execute().await {
            let e = NetlinkError::new(format!("add ipip device {DEVICE} local {}", self.local), e);
            return Err(refusal(e));
        }
        let link = netlink::link_by_name(h, DEVICE)
            .await
            .map_err(lookup())?
            .ok_or_else(|| BackendError::Setup {
                backend: BACKEND,
                why: format!("device {DEVICE} vanished right after it was created"),
            })?;
        tracing::info!(
            "{BACKEND}: created device {DEVICE} (ifindex {}, local {})",
            link.index,
            self.local
        );
        self.set_up(h, link).await
    }

    async fn set_up(&self, h: &Handle, mut link: Link) -> Result<Link, BackendError> {
        if link.mtu != Some(self.mtu) || !link.up {
            tracing::info!(
                "{BACKEND}: device {DEVICE}: mtu {} (was {:?}), up",
                self.mtu,
                link.mtu
            );
            netlink::set_link_up(h, link.index, Some(self.mtu))
                .await
                .map_err(fatal(BACKEND, &format!("device {DEVICE}")))?;
            link.mtu = Some(self.mtu);
            link.up = true;
        }
        Ok(link)
    }

    /// The route each `ipip` peer wants.
    fn wanted(
        &mut self,
        peers: &PeerSet,
        dev: u32,
        ext_nets: &[Ipv4Network],
    ) -> BTreeMap<Ipv4Network, (Route<Ipv4Network>, SubnetKey)> {
        let mut skipped = common::Skipped::new();
        let ext = self.ctx.ext.index;
        let want = common::candidates::<Ipv4Network>(peers, BACKEND, &mut skipped)
            .into_iter()
            .map(|c| {
                let direct = ext_nets.iter().any(|n| n.has(c.public_ip));
                let oif = if direct { ext } else { dev };
                let route = Route::new(c.subnet, Some(c.public_ip), oif, true);
                (c.subnet, (route, c.key))
            })
            .collect();
        common::log_skipped(BACKEND, "", &mut self.skipped, skipped);
        want
    }
}

/// The error for a device the kernel would not make; the usual cause named plainly.
fn refusal(e: NetlinkError) -> BackendError {
    if e.errno == Some(libc::EOPNOTSUPP) {
        return BackendError::Setup {
            backend: BACKEND,
            why: format!(
                "this kernel cannot make ipip devices ({e}): the ipip module is not built in \
                 and could not be loaded; load it (modprobe ipip) or choose another backend, \
                 such as vxlan"
            ),
        };
    }
    fatal(BACKEND, &format!("creating device {DEVICE}"))(e)
}

/// `local` and `remote` of the ipip device `index`.
async fn tunnel_ends(
    h: &Handle,
    index: u32,
) -> Result<(Option<Ipv4Addr>, Option<Ipv4Addr>), NetlinkError> {
    let msg = h
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .map_err(|e| NetlinkError::new(format!("get link ifindex {index}"), e))?;
    let (mut local, mut remote) = (None, None);
    let infos = msg
        .into_iter()
        .flat_map(|m| m.attributes)
        .filter_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => Some(infos),
            _ => None,
        });
    for info in infos.flatten() {
        if let LinkInfo::Data(InfoData::IpTunnel(data)) = info {
            for d in data {
                match d {
                    InfoIpTunnel::Local(IpAddr::V4(a)) => local = Some(a),
                    InfoIpTunnel::Remote(IpAddr::V4(a)) => remote = Some(a),
                    _ => {}
                }
            }
        }
    }
    Ok((local, remote))
}

#[async_trait]
impl Backend for IpipBackend {
    async fn prepare(&mut self) -> Result<Publish, BackendError> {
        let nl = common::connect(BACKEND, &mut self.nl)?;
        let link = self.ensure_device(&nl.h).await?;
        Ok(Publish {
            backend_type: BACKEND.into(),
            backend_data: None,
            backend_v6_data: None,
            mtu: link.mtu.unwrap_or(self.mtu),
        })
    }

    async fn lease_acquired(&mut self, own: &Lease) -> Result<(), BackendError> {
        let subnet = own.key.ipv4.ok_or_else(|| BackendError::Setup {
            backend: BACKEND,
            why: format!("our lease {} has no IPv4 subnet", own.key),
        })?;
        self.own = Some(subnet);
        let nl = common::connect(BACKEND, &mut self.nl)?;
        let link = self.ensure_device(&nl.h).await?;
        let mut tally = ReconcileTally::new(BACKEND);
        let want = Ipv4Network::host(subnet.net_addr());
        common::ensure_address(&nl.h, DEVICE, link.index, want, &mut tally).await?;
        tally.finish().map(|_| ())
    }

    /// Device, address, then the routes, in one batch.
    async fn reconcile(&mut self, peers: &PeerSet) -> Result<ReconcileReport, BackendError> {
        let nl = common::connect(BACKEND, &mut self.nl)?;
        let h = &nl.h;
        let link = self.ensure_device(h).await?;
        let mut tally = ReconcileTally::new(BACKEND);
        if let Some(own) = self.own {
            let want = Ipv4Network::host(own.net_addr());
            if common::ensure_address(h, DEVICE, link.index, want, &mut tally)
                .await?
                .any()
            {
                tally.report.repaired += 1;
            }
        }
        let ext = self.ctx.ext.index;
        let ext_nets = if self.direct_routing {
            netlink::addresses::<Ipv4Network>(h, ext)
                .await
                .map_err(fatal(
                    BACKEND,
                    &format!("addresses of {}", self.ctx.ext.name),
                ))?
        } else {
            Vec::new()
        };
        let want = self.wanted(peers, link.index, &ext_nets);
        let (network, own) = (self.network, self.own);
        let mut plan = Plan::default();
        common::plan_routes(
            h,
            BACKEND,
            &want,
            &[link.index, ext],
            |r| common::owned_route(r, &network, own.as_ref(), Some(link.index), ext),
            &mut plan,
        )
        .await?;
        tally.apply(&nl, plan).await;
        tally.finish()
    }
}
