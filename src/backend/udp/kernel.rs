//! The few rtnetlink requests the udp backend needs for `flannel0`: its state, its address,
//! and the one route for the whole Network. Every error names the device and the request.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

pub use crate::netlink::{connect, NetlinkError as KernelError};

/// What matters of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub up: bool,
    pub mtu: Option<u32>,
}

/// The device `name`, or `None`.
pub async fn link(h: &Handle, name: &str) -> Result<Option<LinkState>, KernelError> {
    let res = h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await;
    match res {
        Ok(Some(msg)) => Ok(Some(LinkState {
            index: msg.header.index,
            up: msg.header.flags.contains(LinkFlags::Up),
            mtu: msg.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            }),
        })),
        Ok(None) => Ok(None),
        Err(e) => {
            let e = KernelError::new(format!("get link {name}"), e);
            if e.is_not_found() {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

/// Packets the TUN device queues for the data path: more than the kernel's 500, so that a
/// reader thread kept off the CPU for a millisecond does not cost drops at small packet sizes.
pub const TUN_QUEUE_LEN: u32 = 2000;

/// Sets the MTU and queue length of device `index` and brings it up.
pub async fn set_up(h: &Handle, name: &str, index: u32, mtu: u32) -> Result<(), KernelError> {
    let mut msg = LinkUnspec::new_with_index(index).up().mtu(mtu).build();
    msg.attributes
        .push(LinkAttribute::TxQueueLen(TUN_QUEUE_LEN));
    h.link()
        .change(msg)
        .execute()
        .await
        .map_err(|e| KernelError::new(format!("set {name} up with MTU {mtu}"), e))
}

/// The IPv4 addresses of device `index`.
pub async fn addresses(
    h: &Handle,
    name: &str,
    index: u32,
) -> Result<Vec<Ipv4Network>, KernelError> {
    let mut req = h.address().get().set_link_index_filter(index);
    req.message_mut().header.family = AddressFamily::Inet;
    let msgs: Vec<AddressMessage> = req
        .execute()
        .try_collect()
        .await
        .map_err(|e| KernelError::new(format!("list addresses of {name}"), e))?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.index == index && m.header.family == AddressFamily::Inet)
        .filter_map(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            })?;
            Ipv4Network::new(ip, m.header.prefix_len).ok()
        })
        .collect())
}

pub async fn add_address(
    h: &Handle,
    name: &str,
    index: u32,
    a: Ipv4Network,
) -> Result<(), KernelError> {
    h.address()
        .add(index, IpAddr::V4(a.ip()), a.prefix())
        .replace()
        .execute()
        .await
        .map_err(|e| KernelError::new(format!("add address {a} to {name}"), e))
}

pub async fn delete_address(
    h: &Handle,
    name: &str,
    index: u32,
    a: Ipv4Network,
) -> Result<(), KernelError> {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.prefix_len = a.prefix();
    msg.header.index = index;
    msg.attributes
        .push(AddressAttribute::Local(IpAddr::V4(a.ip())));
    h.address()
        .del(msg)
        .execute()
        .await
        .map_err(|e| KernelError::new(format!("delete address {a} from {name}"), e))
}

/// Destinations of the main table's IPv4 unicast routes through device `index` that were not
/// made by the kernel (connected routes), with their metric.
pub async fn routes_via(
    h: &Handle,
    name: &str,
    index: u32,
) -> Result<Vec<(Ipv4Network, u32)>, KernelError> {
    let msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let msgs: Vec<RouteMessage> = h
        .route()
        .get(msg)
        .execute()
        .try_collect()
        .await
        .map_err(|e| KernelError::new(format!("list routes via {name}"), e))?;
    let main = u32::from(RouteHeader::RT_TABLE_MAIN);
    Ok(msgs
        .iter()
        .filter(|m| {
            m.header.address_family == AddressFamily::Inet
                && m.header.kind == RouteType::Unicast
                && m.header.protocol != RouteProtocol::Kernel
        })
        .filter_map(|m| {
            let mut dst = Ipv4Addr::UNSPECIFIED;
            let (mut oif, mut table, mut metric) = (None, u32::from(m.header.table), 0);
            let mut gateway = false;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Priority(p) => metric = *p,
                    RouteAttribute::Gateway(_) => gateway = true,
                    _ => {}
                }
            }
            (oif == Some(index) && table == main && !gateway)
                .then(|| Ipv4Network::new(dst, m.header.destination_prefix_length).ok())
                .flatten()
                .map(|n| (n, metric))
        })
        .collect())
}

fn route_message(dst: Ipv4Network, index: u32, metric: u32) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix())
        .table_id(u32::from(RouteHeader::RT_TABLE_MAIN))
        .protocol(RouteProtocol::Static)
        .scope(RouteScope::Universe)
        .kind(RouteType::Unicast)
        .output_interface(index);
    if metric != 0 {
        b = b.priority(metric);
    }
    b.build()
}

/// `ip route replace <dst> dev <name>`.
pub async fn replace_route(
    h: &Handle,
    name: &str,
    index: u32,
    dst: Ipv4Network,
) -> Result<(), KernelError> {
    h.route()
        .add(route_message(dst, index, 0))
        .replace()
        .execute()
        .await
        .map_err(|e| KernelError::new(format!("replace route {dst} dev {name}"), e))
}

pub async fn delete_route(
    h: &Handle,
    name: &str,
    index: u32,
    dst: Ipv4Network,
    metric: u32,
) -> Result<(), KernelError> {
    let mut msg = route_message(dst, index, metric);
    msg.header.protocol = RouteProtocol::Unspec;
    msg.header.scope = RouteScope::NoWhere;
    h.route()
        .del(msg)
        .execute()
        .await
        .map_err(|e| KernelError::new(format!("delete route {dst} dev {name}"), e))
}
