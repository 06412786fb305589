//! Thin helpers over rtnetlink shared by the backends: dump links, addresses, routes,
//! neighbours and FDB entries, and replace or delete them.
//!
//! Every helper turns the kernel's answer into a small plain struct and every error into a
//! [`NetlinkError`] that names the operation and the object, so a backend can add its own
//! context (device name, peer) and hand a person something actionable.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};

/// The main routing table.
pub const RT_TABLE_MAIN: u32 = RouteHeader::RT_TABLE_MAIN as u32;

/// A MAC address.
pub type Mac = [u8; 6];

/// Formats a MAC address the way `ip` and flannel do (`aa:bb:cc:dd:ee:ff`).
pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case); `None` when it is not exactly six hex octets.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// `NUD_PERMANENT` is a bit: tools add entries as `PERMANENT|NOARP` too.
fn is_permanent(state: NeighbourState) -> bool {
    u16::from(state) & u16::from(NeighbourState::Permanent) != 0
}

fn mac_from_bytes(bytes: &[u8]) -> Option<Mac> {
    bytes.try_into().ok()
}

/// A failed netlink request: what was asked, and the kernel's (or the library's) answer.
#[derive(Debug, Clone)]
pub struct NetlinkError {
    /// The operation, e.g. `replace route 10.5.2.0/24 via 10.5.2.0 ifindex 7 onlink`.
    pub op: String,
    /// The positive errno the kernel answered with, when it did.
    pub errno: Option<i32>,
    detail: String,
}

impl NetlinkError {
    fn new(op: impl Into<String>, err: rtnetlink::Error) -> Self {
        let (errno, detail) = match &err {
            rtnetlink::Error::NetlinkError(msg) => {
                let code = -msg.raw_code();
                (
                    Some(code),
                    std::io::Error::from_raw_os_error(code).to_string(),
                )
            }
            other => (None, other.to_string()),
        };
        NetlinkError {
            op: op.into(),
            errno,
            detail,
        }
    }

    /// The object the operation was about does not exist (any more).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno,
            Some(libc::ENOENT | libc::ENODEV | libc::ESRCH | libc::EADDRNOTAVAIL | libc::ENXIO)
        )
    }
}

impl fmt::Display for NetlinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.detail)
    }
}

impl std::error::Error for NetlinkError {}

/// Opens an rtnetlink socket in the calling thread's network namespace and spawns its
/// connection task on the current tokio runtime.
///
/// Must be called from within a tokio runtime.
pub fn connect() -> Result<Handle, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| NetlinkError {
        op: "open rtnetlink socket".into(),
        errno: e.raw_os_error(),
        detail: e.to_string(),
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

// ---------------------------------------------------------------------------------------------
// Links

/// The attributes of a VXLAN device that matter to a backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanAttrs {
    pub vni: Option<u32>,
    pub local: Option<Ipv4Addr>,
    /// Index of the underlay device (`dev` in `ip link add … type vxlan`).
    pub link: Option<u32>,
    pub port: Option<u16>,
    pub learning: Option<bool>,
    pub gbp: bool,
}

/// One network device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<Mac>,
    pub mtu: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// `IFLA_INFO_KIND`, e.g. `vxlan`, `veth`; `None` for devices without one.
    pub kind: Option<String>,
    /// Present for VXLAN devices.
    pub vxlan: Option<VxlanAttrs>,
}

fn link_from_message(msg: LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: None,
        mtu: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        kind: None,
        vxlan: None,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::Address(bytes) => link.mac = mac_from_bytes(&bytes),
            LinkAttribute::Mtu(mtu) => link.mtu = Some(mtu),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(kind) => {
                            link.kind = Some(kind.to_string());
                        }
                        LinkInfo::Data(InfoData::Vxlan(data)) => {
                            let mut v = VxlanAttrs::default();
                            for d in data {
                                match d {
                                    InfoVxlan::Id(id) => v.vni = Some(id),
                                    InfoVxlan::Local(ip) => v.local = Some(ip),
                                    InfoVxlan::Link(i) => v.link = Some(i),
                                    InfoVxlan::Port(p) => v.port = Some(p),
                                    InfoVxlan::Learning(l) => v.learning = Some(l),
                                    InfoVxlan::Gbp => v.gbp = true,
                                    _ => {}
                                }
                            }
                            link.vxlan = Some(v);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if link.kind.as_deref() == Some("vxlan") && link.vxlan.is_none() {
        link.vxlan = Some(VxlanAttrs::default());
    }
    link
}

/// The device named `name`, or `None` when there is none.
pub async fn link_by_name(h: &Handle, name: &str) -> Result<Option<Link>, NetlinkError> {
    let res = h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await;
    match res {
        Ok(Some(msg)) => Ok(Some(link_from_message(msg))),
        Ok(None) => Ok(None),
        Err(e) => {
            let e = NetlinkError::new(format!("get link {name}"), e);
            if e.is_not_found() {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

/// The device with index `index`, or `None` when there is none.
pub async fn link_by_index(h: &Handle, index: u32) -> Result<Option<Link>, NetlinkError> {
    let res = h.link().get().match_index(index).execute().try_next().await;
    match res {
        Ok(Some(msg)) => Ok(Some(link_from_message(msg))),
        Ok(None) => Ok(None),
        Err(e) => {
            let e = NetlinkError::new(format!("get link ifindex {index}"), e);
            if e.is_not_found() {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

/// What a new VXLAN device looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub local: Ipv4Addr,
    /// Index of the underlay device.
    pub link: u32,
    pub port: u16,
    pub learning: bool,
    pub gbp: bool,
    pub mtu: u32,
    pub mac: Mac,
}

/// Creates a VXLAN device and sets it up (`ip link add NAME address MAC mtu MTU type vxlan
/// id VNI local IP dev LINK dstport PORT [no]learning [gbp]; ip link set NAME up`).
/// Fails with `EEXIST` when a device of that name exists.
pub async fn add_vxlan(h: &Handle, spec: &VxlanSpec) -> Result<(), NetlinkError> {
    let mut builder = LinkVxlan::new(&spec.name, spec.vni)
        .dev(spec.link)
        .local(spec.local)
        .port(spec.port)
        .learning(spec.learning)
        .mtu(spec.mtu)
        .address(spec.mac.to_vec())
        .up();
    if spec.gbp {
        builder = builder.gbp();
    }
    h.link().add(builder.build()).execute().await.map_err(|e| {
        NetlinkError::new(
            format!(
                "add vxlan device {} (vni {} local {} dev ifindex {} dstport {} mac {})",
                spec.name,
                spec.vni,
                spec.local,
                spec.link,
                spec.port,
                format_mac(&spec.mac)
            ),
            e,
        )
    })
}

/// Deletes a device.
pub async fn delete_link(h: &Handle, index: u32) -> Result<(), NetlinkError> {
    h.link()
        .del(index)
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("delete link ifindex {index}"), e))
}

/// Sets a device's MTU (when given) and brings it up.
pub async fn set_link_up(h: &Handle, index: u32, mtu: Option<u32>) -> Result<(), NetlinkError> {
    let mut builder = LinkUnspec::new_with_index(index).up();
    if let Some(mtu) = mtu {
        builder = builder.mtu(mtu);
    }
    h.link()
        .change(builder.build())
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("set link ifindex {index} up mtu {mtu:?}"), e))
}

// ---------------------------------------------------------------------------------------------
// Addresses

/// The IPv4 addresses on device `index`, with their prefix lengths.
pub async fn addresses_v4(h: &Handle, index: u32) -> Result<Vec<Ipv4Network>, NetlinkError> {
    let op = || format!("dump IPv4 addresses of ifindex {index}");
    let mut req = h.address().get().set_link_index_filter(index);
    req.message_mut().header.family = AddressFamily::Inet;
    let msgs: Vec<AddressMessage> = req
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetlinkError::new(op(), e))?;
    let mut out = Vec::new();
    for msg in msgs {
        if msg.header.index != index {
            continue;
        }
        let local = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let addr = local.or_else(|| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            })
        });
        if let Some(ip) = addr {
            if let Ok(net) = Ipv4Network::new(ip, msg.header.prefix_len) {
                out.push(net);
            }
        }
    }
    Ok(out)
}

/// Adds an IPv4 address to a device, or refreshes it when present (`ip addr replace`).
pub async fn replace_address_v4(
    h: &Handle,
    index: u32,
    addr: Ipv4Network,
) -> Result<(), NetlinkError> {
    h.address()
        .add(index, IpAddr::V4(addr.ip()), addr.prefix())
        .replace()
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("replace address {addr} on ifindex {index}"), e))
}

/// Removes an IPv4 address from a device.
pub async fn delete_address_v4(
    h: &Handle,
    index: u32,
    addr: Ipv4Network,
) -> Result<(), NetlinkError> {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.prefix_len = addr.prefix();
    msg.header.index = index;
    msg.attributes
        .push(AddressAttribute::Local(IpAddr::V4(addr.ip())));
    h.address()
        .del(msg)
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("delete address {addr} from ifindex {index}"), e))
}

// ---------------------------------------------------------------------------------------------
// Routes

/// One IPv4 unicast route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route4 {
    pub dst: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
    /// Output device; `None` for multipath routes.
    pub oif: Option<u32>,
    pub onlink: bool,
    /// The metric; routes are identified by (table, dst, metric).
    pub priority: u32,
    pub table: u32,
    pub protocol: RouteProtocol,
}

impl Route4 {
    /// A route in the main table with metric 0, as the backends install them.
    pub fn new(dst: Ipv4Network, gateway: Option<Ipv4Addr>, oif: u32, onlink: bool) -> Self {
        Route4 {
            dst,
            gateway,
            oif: Some(oif),
            onlink,
            priority: 0,
            table: RT_TABLE_MAIN,
            protocol: RouteProtocol::Static,
        }
    }

    /// Same destination, next hop, device and flags (ignores the protocol).
    pub fn same_path(&self, other: &Route4) -> bool {
        self.dst == other.dst
            && self.gateway == other.gateway
            && self.oif == other.oif
            && self.onlink == other.onlink
            && self.priority == other.priority
            && self.table == other.table
    }

    fn message(&self) -> RouteMessage {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(self.dst.network(), self.dst.prefix())
            .table_id(self.table)
            .protocol(self.protocol)
            .scope(RouteScope::Universe)
            .kind(RouteType::Unicast);
        if let Some(gw) = self.gateway {
            b = b.gateway(gw);
        }
        if let Some(oif) = self.oif {
            b = b.output_interface(oif);
        }
        if self.priority != 0 {
            b = b.priority(self.priority);
        }
        if self.onlink {
            b = b.onlink();
        }
        b.build()
    }
}

impl fmt::Display for Route4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(oif) = self.oif {
            write!(f, " ifindex {oif}")?;
        }
        if self.onlink {
            write!(f, " onlink")?;
        }
        if self.priority != 0 {
            write!(f, " metric {}", self.priority)?;
        }
        if self.table != RT_TABLE_MAIN {
            write!(f, " table {}", self.table)?;
        }
        Ok(())
    }
}

fn route_from_message(msg: &RouteMessage) -> Option<Route4> {
    if msg.header.address_family != AddressFamily::Inet || msg.header.kind != RouteType::Unicast {
        return None;
    }
    let mut dst_ip = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    let mut priority = 0;
    let mut table = u32::from(msg.header.table);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst_ip = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => priority = *p,
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    let dst = Ipv4Network::new(dst_ip, msg.header.destination_prefix_length).ok()?;
    Some(Route4 {
        dst,
        gateway,
        oif,
        onlink: msg.header.flags.contains(RouteFlags::Onlink),
        priority,
        table,
        protocol: msg.header.protocol,
    })
}

/// The IPv4 unicast routes of table `table`.
///
/// The kernel ignores dump filters without strict checking, so this filters here.
pub async fn routes_v4(h: &Handle, table: u32) -> Result<Vec<Route4>, NetlinkError> {
    let msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let msgs: Vec<RouteMessage> = h
        .route()
        .get(msg)
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetlinkError::new("dump IPv4 routes", e))?;
    Ok(msgs
        .iter()
        .filter_map(route_from_message)
        .filter(|r| r.table == table)
        .collect())
}

/// Adds a route, or replaces the one with the same table, destination and metric
/// (`ip route replace`).
pub async fn replace_route_v4(h: &Handle, route: &Route4) -> Result<(), NetlinkError> {
    h.route()
        .add(route.message())
        .replace()
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("replace route {route}"), e))
}

/// Deletes a route.
pub async fn delete_route_v4(h: &Handle, route: &Route4) -> Result<(), NetlinkError> {
    let mut msg = route.message();
    // Match any protocol and scope, so routes someone else added are found too.
    msg.header.protocol = RouteProtocol::Unspec;
    msg.header.scope = RouteScope::NoWhere;
    msg.header.flags = RouteFlags::empty();
    h.route()
        .del(msg)
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("delete route {route}"), e))
}

// ---------------------------------------------------------------------------------------------
// Neighbours (ARP) and FDB entries

/// One IPv4 neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neigh4 {
    pub ifindex: u32,
    pub dst: Ipv4Addr,
    pub mac: Option<Mac>,
    pub permanent: bool,
}

/// The IPv4 neighbour entries of device `ifindex` (filtered by the kernel via `NDA_IFINDEX`).
pub async fn neighbours_v4(h: &Handle, ifindex: u32) -> Result<Vec<Neigh4>, NetlinkError> {
    let mut req = h.neighbours().get().set_address_family(AddressFamily::Inet);
    req.message_mut()
        .attributes
        .push(NeighbourAttribute::IfIndex(ifindex));
    let msgs: Vec<NeighbourMessage> = req
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetlinkError::new(format!("dump neighbours of ifindex {ifindex}"), e))?;
    let mut out = Vec::new();
    for msg in msgs {
        if msg.header.ifindex != ifindex || msg.header.family != AddressFamily::Inet {
            continue;
        }
        let mut dst = None;
        let mut mac = None;
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
                NeighbourAttribute::LinkLayerAddress(b) => mac = mac_from_bytes(b),
                _ => {}
            }
        }
        if let Some(dst) = dst {
            out.push(Neigh4 {
                ifindex,
                dst,
                mac,
                permanent: is_permanent(msg.header.state),
            });
        }
    }
    Ok(out)
}

/// Adds or replaces a permanent neighbour entry (`ip neigh replace DST lladdr MAC nud
/// permanent dev IFINDEX`).
pub async fn replace_neighbour_v4(
    h: &Handle,
    ifindex: u32,
    dst: Ipv4Addr,
    mac: Mac,
) -> Result<(), NetlinkError> {
    h.neighbours()
        .add(ifindex, IpAddr::V4(dst))
        .link_layer_address(&mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(|e| {
            NetlinkError::new(
                format!(
                    "replace neighbour {dst} lladdr {} on ifindex {ifindex}",
                    format_mac(&mac)
                ),
                e,
            )
        })
}

/// Deletes a neighbour entry.
pub async fn delete_neighbour_v4(
    h: &Handle,
    ifindex: u32,
    dst: Ipv4Addr,
) -> Result<(), NetlinkError> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.ifindex = ifindex;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
    h.neighbours()
        .del(msg)
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("delete neighbour {dst} on ifindex {ifindex}"), e))
}

/// One forwarding-database entry of a device (`bridge fdb show dev …`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbEntry {
    pub ifindex: u32,
    pub mac: Mac,
    /// The remote (VXLAN `dst`), when there is one.
    pub dst: Option<IpAddr>,
    pub permanent: bool,
    /// The entry lives in the device's own table (`self`), not in a bridge's.
    pub own: bool,
}

/// The FDB entries of device `ifindex`.
///
/// The kernel cannot filter a legacy FDB dump by device, so this filters here; hosts have few
/// entries outside bridges, and bridges are not dumped per entry of ours.
pub async fn fdb_entries(h: &Handle, ifindex: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
    let msgs: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetlinkError::new("dump FDB entries", e))?;
    let mut out = Vec::new();
    for msg in msgs {
        if msg.header.ifindex != ifindex {
            continue;
        }
        let mut mac = None;
        let mut dst = None;
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::LinkLayerAddress(b) => mac = mac_from_bytes(b),
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                    dst = Some(IpAddr::V4(*ip))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                    dst = Some(IpAddr::V6(*ip))
                }
                // In AF_BRIDGE messages the remote is not typed by the family; go by length.
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                    dst = match b.len() {
                        4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                        _ => None,
                    }
                }
                _ => {}
            }
        }
        if let Some(mac) = mac {
            out.push(FdbEntry {
                ifindex,
                mac,
                dst,
                permanent: is_permanent(msg.header.state),
                own: msg.header.flags.contains(NeighbourFlags::Own),
            });
        }
    }
    Ok(out)
}

/// Adds or replaces a permanent FDB entry in the device's own table (`bridge fdb replace MAC
/// dev IFINDEX dst DST self permanent`).
pub async fn replace_fdb(
    h: &Handle,
    ifindex: u32,
    mac: Mac,
    dst: Ipv4Addr,
) -> Result<(), NetlinkError> {
    h.neighbours()
        .add_bridge(ifindex, &mac)
        .destination(IpAddr::V4(dst))
        .flags(NeighbourFlags::Own)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(|e| {
            NetlinkError::new(
                format!(
                    "replace FDB entry {} dst {dst} on ifindex {ifindex}",
                    format_mac(&mac)
                ),
                e,
            )
        })
}

/// Deletes an FDB entry from the device's own table; with `dst`, only that remote.
pub async fn delete_fdb(
    h: &Handle,
    ifindex: u32,
    mac: Mac,
    dst: Option<IpAddr>,
) -> Result<(), NetlinkError> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = ifindex;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    if let Some(dst) = dst {
        msg.attributes
            .push(NeighbourAttribute::Destination(match dst {
                IpAddr::V4(ip) => NeighbourAddress::Inet(ip),
                IpAddr::V6(ip) => NeighbourAddress::Inet6(ip),
            }));
    }
    h.neighbours().del(msg).execute().await.map_err(|e| {
        let dst = dst.map(|d| format!(" dst {d}")).unwrap_or_default();
        NetlinkError::new(
            format!(
                "delete FDB entry {}{dst} on ifindex {ifindex}",
                format_mac(&mac)
            ),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips() {
        let mac = parse_mac("C6:d2:aa:01:02:03").unwrap();
        assert_eq!(mac, [0xc6, 0xd2, 0xaa, 1, 2, 3]);
        assert_eq!(format_mac(&mac), "c6:d2:aa:01:02:03");
    }

    #[test]
    fn bad_macs_are_rejected() {
        for s in [
            "",
            "c6:d2:aa:01:02",
            "c6:d2:aa:01:02:03:04",
            "c6:d2:aa:01:02:0",
            "zz:d2:aa:01:02:03",
        ] {
            assert!(parse_mac(s).is_none(), "{s} parsed");
        }
    }
}
