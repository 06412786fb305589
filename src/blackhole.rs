//! `--ip-blackhole-route`: a blackhole route for our own subnet (and our IPv6 subnet), so that
//! traffic to an address of it that no pod holds is dropped on this host instead of leaving by
//! the default route (flannel's `AddBlackholeV4Route`, meant for set-ups without a bridge,
//! where each pod has a /32 route of its own, e.g. Canal).
//!
//! Ours carry our protocol number (`blackhole 10.5.1.0/24 proto 102`). A blackhole route of
//! ours inside the Network to any other destination is one of an old subnet and is removed;
//! one someone else made is never touched. The backends never see blackhole routes (their
//! route dumps read unicast routes only), so no reconciliation removes ours.

use std::collections::HashSet;

use ipnetwork::{Ipv4Network, Ipv6Network};
use rtnetlink::Handle;

use crate::config::NetworkConfig;
use crate::error_chain::Chain;
use crate::netlink::{self, Blackhole, Net, NetlinkError, ROUTE_PROTOCOL};
use crate::subnet::SubnetKey;

/// What one family needs: the blackhole routes of ours to delete, the one to add.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan<N: Net> {
    pub delete: Vec<Blackhole<N>>,
    pub add: Option<Blackhole<N>>,
}

/// Compares the blackhole routes the kernel has with the one we want for `own` (`None`: none,
/// the flag is off or the family has no subnet). As flannel: nothing is added when a blackhole
/// route to `own` exists, whoever made it.
pub fn plan<N: Net>(have: &[Blackhole<N>], network: N, own: Option<N>) -> Plan<N> {
    let delete = have
        .iter()
        .filter(|r| r.protocol == ROUTE_PROTOCOL && r.dst.within(&network) && Some(r.dst) != own)
        .copied()
        .collect();
    let add = own
        .filter(|own| !have.iter().any(|r| r.dst == *own))
        .map(Blackhole::ours);
    Plan { delete, add }
}

/// Keeps the kernel's blackhole routes for our subnets as [`plan`] says.
pub struct OwnBlackholes {
    h: Handle,
    /// Whether `--ip-blackhole-route` is on; when off, ours left by an earlier run are removed
    /// once.
    enabled: bool,
    swept: bool,
    /// Failures already logged (a route of another type at our destination stays until
    /// someone removes it: warn once, not every pass).
    warned: HashSet<String>,
}

impl OwnBlackholes {
    /// Opens its own netlink socket (strict checking: the kernel sends only blackhole routes).
    pub fn new(enabled: bool) -> Result<Self, NetlinkError> {
        Ok(OwnBlackholes {
            h: netlink::connect_strict()?,
            enabled,
            swept: false,
            warned: HashSet::new(),
        })
    }

    /// Adds the missing route for each of our subnets and removes ours of old subnets.
    pub async fn sync(&mut self, config: &NetworkConfig, own: &SubnetKey) {
        if !self.enabled && std::mem::replace(&mut self.swept, true) {
            return;
        }
        let enabled = self.enabled;
        let mut failures = Vec::new();
        if let Some(v4) = &config.v4 {
            let want: Option<Ipv4Network> = own.ipv4.filter(|_| enabled);
            if let Err(e) = sync_family(&self.h, v4.network, want).await {
                failures.push(e);
            }
        }
        if let Some(v6) = &config.v6 {
            let want: Option<Ipv6Network> = own.ipv6.filter(|_| enabled);
            if let Err(e) = sync_family(&self.h, v6.network, want).await {
                failures.push(e);
            }
        }
        for e in failures {
            let text = Chain(&e).to_string();
            if self.warned.insert(text.clone()) {
                tracing::warn!("blackhole route for our subnet: {text}");
            }
        }
    }
}

async fn sync_family<N: Net>(h: &Handle, network: N, own: Option<N>) -> Result<(), NetlinkError> {
    let have = netlink::blackhole_routes::<N>(h).await?;
    let plan = plan(&have, network, own);
    for old in &plan.delete {
        match netlink::delete_blackhole_route(h, old).await {
            Ok(()) => tracing::info!("removed the blackhole route of an old subnet: {}", old.dst),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    if let Some(new) = &plan.add {
        netlink::add_blackhole_route(h, new).await?;
        tracing::info!("added blackhole route {} proto 102", new.dst);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteProtocol;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn theirs(dst: &str) -> Blackhole<Ipv4Network> {
        Blackhole {
            dst: net(dst),
            priority: 0,
            protocol: RouteProtocol::Boot,
        }
    }

    const NETWORK: &str = "10.5.0.0/16";

    #[test]
    fn adds_ours_when_no_blackhole_route_to_the_subnet_exists() {
        let own = || Some(net("10.5.1.0/24"));
        let p = plan(&[], net(NETWORK), own());
        assert_eq!(p.add, Some(Blackhole::ours(net("10.5.1.0/24"))));
        assert!(p.delete.is_empty());
        // flannel's (proto boot) is enough, as flannel itself would see it; ours is too.
        for have in [theirs("10.5.1.0/24"), Blackhole::ours(net("10.5.1.0/24"))] {
            let nothing = Plan {
                delete: vec![],
                add: None,
            };
            assert_eq!(plan(&[have], net(NETWORK), own()), nothing, "{have:?}");
        }
    }

    #[test]
    fn ours_of_an_old_subnet_go_and_others_stay() {
        let old = Blackhole::ours(net("10.5.1.0/24"));
        let outside = Blackhole::ours(net("192.168.9.0/24"));
        let have = [old, outside, theirs("10.5.7.0/24")];
        let p = plan(&have, net(NETWORK), Some(net("10.5.2.0/24")));
        assert_eq!(p.delete, vec![old]);
        assert_eq!(p.add, Some(Blackhole::ours(net("10.5.2.0/24"))));
        // Flag off: ours go, nothing is added.
        let p = plan(&have, net(NETWORK), None);
        assert_eq!(
            p,
            Plan {
                delete: vec![old],
                add: None
            }
        );
    }
}
