//! Wakes the data plane when someone changes the kernel state it owns: a deleted device, route
//! or neighbour entry of ours is repaired within a moment instead of at the next periodic pass.
//!
//! Only notifications about our state wake it: a busy node deletes pods' veths, ages out ARP
//! entries and has other daemons changing routes all the time, and each of those would
//! otherwise cost a full reconciliation pass.

use std::collections::HashSet;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::netlink::ROUTE_PROTOCOL;

/// Every device a backend makes is named so: `flannel.<VNI>`, `flannel-v6.<VNI>`, `flannel0`.
pub const DEVICE_PREFIX: &str = "flannel";

/// Subscribes to link, route and neighbour notifications of this network namespace; `notify`
/// gets a permit for every one about our state (see [`Filter`]), counted in
/// `metrics.kernel_events`. `ext_index` is the external interface.
pub fn watch(notify: Arc<Notify>, ext_index: u32, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
        MulticastGroup::Neigh,
    ];
    let (conn, _, mut messages) = rtnetlink::new_multicast_connection(&groups)?;
    tokio::spawn(conn);
    // The devices are listed over a socket of their own: on the subscribed one, notifications
    // carry the sequence number of whatever request caused them and can pass for its answer.
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    tokio::spawn(async move {
        // Subscribed first, then the devices that exist are read: notifications that arrive
        // meanwhile wait in the channel and are judged knowing them.
        let mut filter = Filter::new(ext_index);
        let listed = our_devices(&handle).await;
        drop(handle);
        match listed {
            Ok(devices) => filter.ours.extend(devices),
            Err(e) => tracing::warn!(
                "kernel events: listing devices failed ({e}); ours are learnt from notifications"
            ),
        }
        while let Some((msg, _)) = messages.next().await {
            if let NetlinkPayload::InnerMessage(m) = msg.payload {
                if filter.wants(&m) {
                    Metrics::inc(&metrics.kernel_events);
                    notify.notify_one();
                }
            }
        }
    });
    Ok(())
}

/// The indexes of the devices named [`DEVICE_PREFIX`]….
async fn our_devices(h: &Handle) -> Result<Vec<u32>, rtnetlink::Error> {
    let links: Vec<LinkMessage> = h.link().get().execute().try_collect().await?;
    Ok(links
        .iter()
        .filter(|l| is_our_name(l))
        .map(|l| l.header.index)
        .collect())
}

fn is_our_name(link: &LinkMessage) -> bool {
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::IfName(n) if n.starts_with(DEVICE_PREFIX)))
}

/// Decides which notifications concern our state, keeping track of our devices' indexes from
/// the link notifications themselves (a re-created device gets a new index).
///
/// - links: ours (by name) and the external interface (going down, gone, its MTU);
/// - route deletions: routes carrying our protocol number anywhere, anything on our devices,
///   and the kernel's own routes of the external interface (they go with its address);
/// - neighbour and FDB deletions: on our devices.
///
/// Additions are what we (or the kernel's own bookkeeping) do and never wake it.
#[derive(Debug)]
pub struct Filter {
    ext_index: u32,
    ours: HashSet<u32>,
}

impl Filter {
    pub fn new(ext_index: u32) -> Self {
        Filter {
            ext_index,
            ours: HashSet::new(),
        }
    }

    /// Whether `m` is about our state; learns our devices from link notifications.
    pub fn wants(&mut self, m: &RouteNetlinkMessage) -> bool {
        match m {
            RouteNetlinkMessage::NewLink(link) => {
                let index = link.header.index;
                // A device renamed away from our prefix is not ours any more (and the backend
                // must know: it finds its devices by name).
                let was_ours = if is_our_name(link) {
                    !self.ours.insert(index)
                } else {
                    self.ours.remove(&index)
                };
                was_ours || self.ours.contains(&index) || index == self.ext_index
            }
            RouteNetlinkMessage::DelLink(link) => {
                let index = link.header.index;
                let ours = self.ours.remove(&index) || is_our_name(link);
                ours || index == self.ext_index
            }
            RouteNetlinkMessage::DelRoute(route) => self.route_is_ours(route),
            RouteNetlinkMessage::DelNeighbour(n) => self.ours.contains(&n.header.ifindex),
            _ => false,
        }
    }

    fn route_is_ours(&self, route: &RouteMessage) -> bool {
        if route.header.protocol == ROUTE_PROTOCOL {
            return true;
        }
        let oif = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        match oif {
            Some(i) if self.ours.contains(&i) => true,
            Some(i) if i == self.ext_index => route.header.protocol == RouteProtocol::Kernel,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::neighbour::NeighbourMessage;
    use netlink_packet_route::AddressFamily;

    const EXT: u32 = 2;

    fn link(index: u32, name: &str) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::IfName(name.into()));
        m
    }

    fn route(oif: u32, protocol: RouteProtocol) -> RouteNetlinkMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.protocol = protocol;
        m.attributes.push(RouteAttribute::Oif(oif));
        RouteNetlinkMessage::DelRoute(m)
    }

    fn neighbour(ifindex: u32, family: AddressFamily) -> RouteNetlinkMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = family;
        m.header.ifindex = ifindex;
        RouteNetlinkMessage::DelNeighbour(m)
    }

    /// A filter that has seen `flannel.1` appear with index 7.
    fn filter() -> Filter {
        let mut f = Filter::new(EXT);
        assert!(f.wants(&RouteNetlinkMessage::NewLink(link(7, "flannel.1"))));
        f
    }

    #[test]
    fn pod_churn_and_foreign_changes_are_ignored() {
        let mut f = filter();
        // A pod's veth pair comes and goes; cni0 changes with it.
        for m in [
            RouteNetlinkMessage::NewLink(link(20, "veth1a2b3c4d")),
            RouteNetlinkMessage::NewLink(link(5, "cni0")),
            RouteNetlinkMessage::DelLink(link(20, "veth1a2b3c4d")),
            // Its routes and ARP entries go with it, and the kernel's own routes elsewhere.
            route(20, RouteProtocol::Kernel),
            route(5, RouteProtocol::Boot),
            neighbour(5, AddressFamily::Inet),
            neighbour(20, AddressFamily::Bridge),
            // Someone's route on the external interface; an ARP entry there ages out.
            route(EXT, RouteProtocol::Boot),
            route(EXT, RouteProtocol::Static),
            neighbour(EXT, AddressFamily::Inet),
        ] {
            assert!(!f.wants(&m), "{m:?} woke the data plane");
        }
    }

    #[test]
    fn our_devices_routes_and_entries_wake_it() {
        let mut f = filter();
        for m in [
            // Our routes, wherever they are (host-gw's are on the external interface).
            route(EXT, ROUTE_PROTOCOL),
            route(30, ROUTE_PROTOCOL),
            // Anything on our device, also the kernel's routes that go with its address.
            route(7, RouteProtocol::Boot),
            route(7, RouteProtocol::Kernel),
            neighbour(7, AddressFamily::Inet),
            neighbour(7, AddressFamily::Inet6),
            neighbour(7, AddressFamily::Bridge),
            // The external interface changes or loses its address.
            RouteNetlinkMessage::NewLink(link(EXT, "eth0")),
            route(EXT, RouteProtocol::Kernel),
            // Our device changes.
            RouteNetlinkMessage::NewLink(link(7, "flannel.1")),
        ] {
            assert!(f.wants(&m), "{m:?} ignored");
        }
    }

    #[test]
    fn a_recreated_device_is_followed_by_its_new_index() {
        let mut f = filter();
        assert!(f.wants(&RouteNetlinkMessage::DelLink(link(7, "flannel.1"))));
        // Index 7 is reused by someone else's device: not ours any more.
        assert!(!f.wants(&neighbour(7, AddressFamily::Inet)));
        assert!(!f.wants(&RouteNetlinkMessage::NewLink(link(7, "veth0"))));
        assert!(!f.wants(&route(7, RouteProtocol::Boot)));
        assert!(f.wants(&RouteNetlinkMessage::NewLink(link(9, "flannel.1"))));
        assert!(f.wants(&neighbour(9, AddressFamily::Bridge)));
        // A device renamed away from our prefix: that wakes it, then it is not ours.
        assert!(f.wants(&RouteNetlinkMessage::NewLink(link(9, "old-vxlan"))));
        assert!(!f.wants(&neighbour(9, AddressFamily::Bridge)));
        // udp's and IPv6's devices are ours too.
        assert!(f.wants(&RouteNetlinkMessage::NewLink(link(11, "flannel0"))));
        assert!(f.wants(&RouteNetlinkMessage::NewLink(link(12, "flannel-v6.1"))));
        assert!(f.wants(&route(12, RouteProtocol::Kernel)));
    }
}
