//! A small, synchronous rtnetlink client: just the requests the plugin makes.
//!
//! Messages are `netlink-packet-route` types sent over a blocking `netlink-sys` socket; no
//! async runtime, as the plugin lives for one request. Each request gets its own sequence
//! number and only replies carrying it are taken as its answer. A socket lives in the network
//! namespace of the thread that created it, so a socket made on a short-lived thread that
//! entered a pod's namespace keeps talking to that namespace (see `netns.rs`).

use std::io;
use std::net::IpAddr;
use std::os::fd::RawFd;

use flannel_subnet_env::mac::MacDisplay;
use netlink_packet_core::{
    DefaultNla, NetlinkBuffer, NetlinkMessage, NetlinkPayload, NlasIterator, NLM_F_ACK,
    NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo as LinkInfoAttr, LinkMessage,
    LinkProtoInfoBridge,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use thiserror::Error;

/// `IFLA_BRPORT_MODE` (hairpin) inside `IFLA_PROTINFO` of an `AF_BRIDGE` link request: the
/// library types only the bridge port's other attributes there.
const IFLA_BRPORT_MODE: u16 = 4;
/// `NLMSGERR_ATTR_MSG`: the text of an extended ACK.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// The size of a netlink message header, which an error echoes before its TLVs.
const NLMSG_HDRLEN: usize = 16;
/// Room for one datagram of a dump (the kernel fills up to 32 KiB per datagram).
const RECV_BUFFER: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("{op}: {err}{}", ext.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        op: String,
        err: io::Error,
        ext: Option<String>,
    },
    #[error("netlink: malformed reply to {0}")]
    Malformed(String),
}

impl NetlinkError {
    /// The errno the kernel answered with, if the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { err, .. } => err.raw_os_error(),
            _ => None,
        }
    }
    pub fn is_not_found(&self) -> bool {
        matches!(self.errno(), Some(libc::ENODEV) | Some(libc::ENOENT))
    }
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }
}

pub type Result<T> = std::result::Result<T, NetlinkError>;

/// What we read back about a link.
#[derive(Debug, Clone, Default)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub up: bool,
    pub mtu: u32,
    pub mac: Vec<u8>,
    pub master: Option<u32>,
    pub kind: Option<String>,
}

impl LinkInfo {
    pub fn is_up(&self) -> bool {
        self.up
    }
    pub fn mac_string(&self) -> String {
        MacDisplay(&self.mac).to_string()
    }
}

/// An address on a link, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrInfo {
    pub index: u32,
    pub addr: IpAddr,
    pub prefix: u8,
}

/// A route in the main table, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    pub dst: IpAddr,
    pub dst_len: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
}

fn family_of(ip: &IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Requests: pure builders, one per kind of change the plugin makes.

/// `ip link show NAME` / `ip link del NAME`: a link message naming the device.
fn link_named(name: &str) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    msg
}

/// A new link, administratively up.
fn new_link_up(name: &str, mtu: u32) -> LinkMessage {
    let mut msg = link_named(name);
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    if mtu > 0 {
        msg.attributes.push(LinkAttribute::Mtu(mtu));
    }
    msg
}

/// `ip link add NAME mtu MTU up type bridge`.
fn bridge_message(name: &str, mtu: u32) -> LinkMessage {
    let mut msg = new_link_up(name, mtu);
    msg.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfoAttr::Kind(
            InfoKind::Bridge,
        )]));
    msg
}

/// A veth pair: `host` up (enslaved to `master`) here, `peer` down in namespace `peer_ns`.
fn veth_message(
    host: &str,
    peer: &str,
    peer_ns: RawFd,
    mtu: u32,
    master: Option<u32>,
) -> LinkMessage {
    // One queue each way: a pod's veth needs no more (the kernel's default is one per CPU),
    // and every queue is a sysfs object the kernel must create and later remove.
    let one_queue = [LinkAttribute::NumTxQueues(1), LinkAttribute::NumRxQueues(1)];
    let mut msg = new_link_up(host, mtu);
    if let Some(master) = master {
        msg.attributes.push(LinkAttribute::Controller(master));
    }
    msg.attributes.extend(one_queue.clone());
    // The peer cannot be brought up here: veth_open() fails with ENOTCONN until the pair is
    // linked, which happens after the peer is configured.
    let mut peer_msg = link_named(peer);
    if mtu > 0 {
        peer_msg.attributes.push(LinkAttribute::Mtu(mtu));
    }
    peer_msg.attributes.push(LinkAttribute::NetNsFd(peer_ns));
    peer_msg.attributes.extend(one_queue);
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfoAttr::Kind(InfoKind::Veth),
        LinkInfoAttr::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
    ]));
    msg
}

/// `ip link set dev INDEX up`.
fn set_up_message(index: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg
}

/// `bridge link set dev INDEX hairpin on|off`.
fn hairpin_message(index: u32, on: bool) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.interface_family = AddressFamily::Bridge;
    msg.header.index = index;
    msg.attributes.push(LinkAttribute::ProtoInfoBridge(vec![
        LinkProtoInfoBridge::Other(DefaultNla::new(IFLA_BRPORT_MODE, vec![u8::from(on)])),
    ]));
    msg
}

/// Address `addr`/`prefix` of link `index`, as a deletion names it.
fn address_message(index: u32, addr: IpAddr, prefix: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = family_of(&addr);
    msg.header.prefix_len = prefix;
    msg.header.scope = AddressScope::Universe;
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Local(addr));
    msg.attributes.push(AddressAttribute::Address(addr));
    msg
}

/// `ip addr add ADDR/PREFIX broadcast + dev INDEX`; IPv6 addresses skip duplicate address
/// detection (`nodad`), so that the pod can use them at once.
fn new_address_message(index: u32, addr: IpAddr, prefix: u8) -> AddressMessage {
    let mut msg = address_message(index, addr, prefix);
    match addr {
        IpAddr::V6(_) => msg.header.flags = AddressHeaderFlags::Nodad,
        // /31 and /32 have no broadcast address.
        IpAddr::V4(a) if prefix < 31 => {
            let host_bits = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
            msg.attributes.push(AddressAttribute::Broadcast(
                (u32::from(a) | host_bits).into(),
            ));
        }
        IpAddr::V4(_) => {}
    }
    msg
}

/// `ip route replace DST/LEN [via GW] dev OIF` in the main table, protocol `boot` as `ip`
/// gives it; a route without a gateway has link scope.
fn route_message(dst: IpAddr, dst_len: u8, gateway: Option<IpAddr>, oif: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    let h = &mut msg.header;
    h.address_family = family_of(&dst);
    h.destination_prefix_length = dst_len;
    h.table = RouteHeader::RT_TABLE_MAIN;
    h.protocol = RouteProtocol::Boot;
    h.scope = if gateway.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    h.kind = RouteType::Unicast;
    if dst_len > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    }
    if let Some(gw) = gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
    }
    msg.attributes.push(RouteAttribute::Oif(oif));
    msg
}

// ---------------------------------------------------------------------------------------------
// Replies

fn link_from_message(msg: LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        up: msg.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => info.name = name,
            LinkAttribute::Mtu(mtu) => info.mtu = mtu,
            LinkAttribute::Address(mac) => info.mac = mac,
            LinkAttribute::Controller(master) => info.master = Some(master),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfoAttr::Kind(kind) = i {
                        info.kind = Some(kind.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    info
}

fn address_from_message(msg: &AddressMessage) -> Option<AddrInfo> {
    let find = |local: bool| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) if local => Some(*ip),
            AddressAttribute::Address(ip) if !local => Some(*ip),
            _ => None,
        })
    };
    Some(AddrInfo {
        index: msg.header.index,
        addr: find(true).or_else(|| find(false))?,
        prefix: msg.header.prefix_len,
    })
}

/// The route when it is in the main table.
fn main_table_route(msg: &RouteMessage) -> Option<RouteInfo> {
    let mut table = u32::from(msg.header.table);
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst = route_ip(a),
            RouteAttribute::Gateway(a) => gateway = route_ip(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    // The default route carries no destination.
    let dst = dst.unwrap_or(match msg.header.address_family {
        AddressFamily::Inet6 => IpAddr::from([0u8; 16]),
        _ => IpAddr::from([0u8; 4]),
    });
    Some(RouteInfo {
        dst,
        dst_len: msg.header.destination_prefix_length,
        gateway,
        oif,
    })
}

/// The extended-ACK message of an error, when the kernel sent one. `echoed` is what follows
/// the errno: the failed request's header (its payload too, unless capped), then the TLVs.
fn ext_ack_message(echoed: &[u8], flags: u16) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let skip = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        let request = NetlinkBuffer::new_checked(echoed).ok()?;
        (request.length() as usize).next_multiple_of(4)
    };
    NlasIterator::new(echoed.get(skip..)?)
        .filter_map(|nla| nla.ok())
        .find(|nla| nla.kind() == NLMSGERR_ATTR_MSG)
        .map(|nla| {
            let text = nla.value();
            let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
            String::from_utf8_lossy(&text[..end]).into_owned()
        })
        .filter(|s| !s.is_empty())
}

// ---------------------------------------------------------------------------------------------
// The socket

pub struct Netlink {
    sock: Socket,
    /// The sequence number of the last request; replies to others are ignored.
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// A NETLINK_ROUTE socket in the calling thread's network namespace.
    pub fn new() -> Result<Netlink> {
        let sock = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        // Errors echo only the failed request's header, with the kernel's explanation.
        // Older kernels refuse the options: their errors just lack the explanation.
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_ext_ack(true);
        Ok(Netlink {
            sock,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUFFER),
        })
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | flags;
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut data = vec![0u8; req.buffer_len()];
        req.serialize(&mut data);
        let kernel = SocketAddr::new(0, 0);
        self.sock
            .send_to(&data, &kernel, 0)
            .map_err(NetlinkError::Socket)?;
        Ok(self.seq)
    }

    fn recv(&mut self) -> Result<()> {
        loop {
            self.buf.clear();
            match self.sock.recv(&mut self.buf, 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NetlinkError::Socket(e)),
            }
        }
    }

    /// Sends a request and collects the messages answering it, until the ACK (requests with
    /// NLM_F_ACK) or DONE (dumps). Replies are matched to the request by sequence number.
    fn request(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send(msg, flags)?;
        // What could not be decoded is kept: it names the attribute a newer kernel sent.
        let malformed =
            |e: netlink_packet_core::DecodeError| NetlinkError::Malformed(format!("{op} ({e})"));
        let mut out = Vec::new();
        loop {
            self.recv()?;
            let mut rest = &self.buf[..];
            while !rest.is_empty() {
                let header = NetlinkBuffer::new_checked(rest).map_err(malformed)?;
                let len = header.length() as usize;
                let (this, mseq) = (&rest[..len], header.sequence_number());
                rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
                if mseq != seq {
                    continue; // a stale reply
                }
                let reply =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(this).map_err(malformed)?;
                match reply.payload {
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(out),
                        Some(code) => {
                            return Err(NetlinkError::Kernel {
                                op: op.to_string(),
                                err: io::Error::from_raw_os_error(-code.get()),
                                ext: ext_ack_message(&e.header, reply.header.flags),
                            })
                        }
                    },
                    NetlinkPayload::Done(_) => return Ok(out),
                    // A single answer (GETLINK by name) is followed by the ACK.
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    /// Sends a change and waits for its ACK.
    fn change(&mut self, op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<()> {
        self.request(op, msg, NLM_F_ACK | flags).map(|_| ())
    }

    /// Look a link up by name. `Ok(None)` when there is none.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<LinkInfo>> {
        let msg = RouteNetlinkMessage::GetLink(link_named(name));
        match self.request(&format!("get link {name}"), msg, NLM_F_ACK) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(link_from_message(link)),
                _ => None,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Create a bridge (up, with this MTU). EEXIST is reported as an error to the caller.
    pub fn create_bridge(&mut self, name: &str, mtu: u32) -> Result<()> {
        let msg = RouteNetlinkMessage::NewLink(bridge_message(name, mtu));
        self.change(
            &format!("create bridge {name}"),
            msg,
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Create a veth pair in one request: `host` (up, enslaved to `master`) in this socket's
    /// namespace and `peer` (down) in the namespace `peer_ns`.
    pub fn create_veth(
        &mut self,
        host: &str,
        peer: &str,
        peer_ns: RawFd,
        mtu: u32,
        master: Option<u32>,
    ) -> Result<()> {
        let msg = RouteNetlinkMessage::NewLink(veth_message(host, peer, peer_ns, mtu, master));
        self.change(
            &format!("create veth {host}/{peer}"),
            msg,
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Set a link up.
    pub fn set_up(&mut self, index: u32) -> Result<()> {
        let msg = RouteNetlinkMessage::NewLink(set_up_message(index));
        self.change("set link up", msg, 0)
    }

    /// Enable hairpin mode on a bridge port.
    pub fn set_hairpin(&mut self, index: u32, on: bool) -> Result<()> {
        let msg = RouteNetlinkMessage::SetLink(hairpin_message(index, on));
        self.change("set hairpin mode", msg, 0)
    }

    /// Delete a link by name. `Ok(false)` when there was none.
    pub fn delete_link_by_name(&mut self, name: &str) -> Result<bool> {
        let msg = RouteNetlinkMessage::DelLink(link_named(name));
        match self.change(&format!("delete link {name}"), msg, 0) {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Add (or replace) an address on a link.
    pub fn add_address(&mut self, index: u32, addr: IpAddr, prefix: u8) -> Result<()> {
        let msg = RouteNetlinkMessage::NewAddress(new_address_message(index, addr, prefix));
        self.change(
            &format!("add address {addr}/{prefix}"),
            msg,
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Remove an address from a link (its connected route goes with it). `Ok(false)` when
    /// the link does not have it.
    pub fn delete_address(&mut self, index: u32, addr: IpAddr, prefix: u8) -> Result<bool> {
        let msg = RouteNetlinkMessage::DelAddress(address_message(index, addr, prefix));
        match self.change(&format!("delete address {addr}/{prefix}"), msg, 0) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) || e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// All addresses of one family (0 = all) in this namespace.
    pub fn addresses(&mut self, family: u8) -> Result<Vec<AddrInfo>> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::from(family);
        let replies = self.request(
            "list addresses",
            RouteNetlinkMessage::GetAddress(msg),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => address_from_message(a),
                _ => None,
            })
            .collect())
    }

    /// Add (or replace) a route in the main table via `gateway` on link `oif`.
    pub fn add_route(
        &mut self,
        dst: IpAddr,
        dst_len: u8,
        gateway: Option<IpAddr>,
        oif: u32,
    ) -> Result<()> {
        let msg = RouteNetlinkMessage::NewRoute(route_message(dst, dst_len, gateway, oif));
        let gw = gateway.map(|g| format!(" via {g}")).unwrap_or_default();
        self.change(
            &format!("add route {dst}/{dst_len}{gw}"),
            msg,
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Routes of the main table for one family.
    pub fn routes(&mut self, family: u8) -> Result<Vec<RouteInfo>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::from(family);
        let replies = self.request(
            "list routes",
            RouteNetlinkMessage::GetRoute(msg),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => main_table_route(r),
                _ => None,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, NlaBuffer};

    /// The message as the kernel reads it, decoded back by the same library.
    fn round_trip(msg: RouteNetlinkMessage) -> RouteNetlinkMessage {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST;
        req.finalize();
        let mut bytes = vec![0u8; req.buffer_len()];
        req.serialize(&mut bytes);
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes)
            .expect("decodes")
            .payload
        {
            NetlinkPayload::InnerMessage(m) => m,
            other => panic!("not a route message: {other:?}"),
        }
    }

    #[test]
    fn veth_request_puts_the_peer_in_the_pod_namespace_with_one_queue_each_way() {
        let msg = veth_message("veth0a1b2c3d", "eth0", 42, 1450, Some(7));
        assert!(msg.header.flags.contains(LinkFlags::Up));
        assert!(msg.attributes.contains(&LinkAttribute::Controller(7)));
        assert!(msg.attributes.contains(&LinkAttribute::NumTxQueues(1)));
        let infos = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(i) => Some(i.clone()),
            _ => None,
        });
        let infos = infos.expect("link info");
        assert_eq!(infos[0], LinkInfoAttr::Kind(InfoKind::Veth));
        let LinkInfoAttr::Data(InfoData::Veth(InfoVeth::Peer(peer))) = &infos[1] else {
            panic!("no veth peer in {infos:?}");
        };
        // Down: veth_open() refuses to bring up a half-made pair.
        assert!(!peer.header.flags.contains(LinkFlags::Up));
        for want in [
            LinkAttribute::IfName("eth0".into()),
            LinkAttribute::Mtu(1450),
            LinkAttribute::NetNsFd(42),
            LinkAttribute::NumTxQueues(1),
            LinkAttribute::NumRxQueues(1),
        ] {
            assert!(peer.attributes.contains(&want), "peer lacks {want:?}");
        }
    }

    #[test]
    fn bridge_request_decodes_as_an_up_bridge() {
        let RouteNetlinkMessage::NewLink(msg) =
            round_trip(RouteNetlinkMessage::NewLink(bridge_message("cni0", 1450)))
        else {
            panic!("not a link message");
        };
        let link = link_from_message(msg);
        assert_eq!(
            (link.name.as_str(), link.up, link.mtu, link.kind.as_deref()),
            ("cni0", true, 1450, Some("bridge"))
        );
    }

    #[test]
    fn hairpin_request_is_a_nested_bridge_port_mode() {
        let msg = hairpin_message(9, true);
        assert_eq!(msg.header.interface_family, AddressFamily::Bridge);
        let mut bytes = vec![0u8; msg.buffer_len()];
        msg.emit(&mut bytes);
        // After the 16-byte ifinfomsg: IFLA_PROTINFO (12), nested, holding mode = 1.
        let protinfo = NlaBuffer::new_checked(&bytes[16..]).expect("an attribute");
        assert_eq!(protinfo.kind(), 12);
        assert!(protinfo.nested_flag());
        let mode = NlaBuffer::new_checked(protinfo.value()).expect("a nested attribute");
        assert_eq!((mode.kind(), mode.value()), (IFLA_BRPORT_MODE, &[1u8][..]));
    }

    #[test]
    fn new_addresses_get_a_broadcast_or_nodad_as_ip_gives_them() {
        let v4 = new_address_message(3, "10.5.1.1".parse().unwrap(), 24);
        assert!(v4
            .attributes
            .contains(&AddressAttribute::Broadcast("10.5.1.255".parse().unwrap())));
        let p2p = new_address_message(3, "10.5.1.1".parse().unwrap(), 31);
        assert!(!p2p
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Broadcast(_))));
        let v6 = new_address_message(3, "fd00::1".parse().unwrap(), 64);
        assert_eq!(v6.header.flags, AddressHeaderFlags::Nodad);
        let RouteNetlinkMessage::NewAddress(parsed) =
            round_trip(RouteNetlinkMessage::NewAddress(v4))
        else {
            panic!("not an address message");
        };
        assert_eq!(
            address_from_message(&parsed),
            Some(AddrInfo {
                index: 3,
                addr: "10.5.1.1".parse().unwrap(),
                prefix: 24
            })
        );
    }

    #[test]
    fn routes_without_gateway_are_link_scope_and_default_routes_have_no_destination() {
        let direct = route_message("10.5.0.0".parse().unwrap(), 16, None, 2);
        assert_eq!(direct.header.scope, RouteScope::Link);
        assert_eq!(direct.header.protocol, RouteProtocol::Boot);
        let gw: IpAddr = "10.5.1.1".parse().unwrap();
        let default = route_message("0.0.0.0".parse().unwrap(), 0, Some(gw), 2);
        assert_eq!(default.header.scope, RouteScope::Universe);
        assert!(!default
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Destination(_))));
        assert_eq!(
            main_table_route(&default),
            Some(RouteInfo {
                dst: "0.0.0.0".parse().unwrap(),
                dst_len: 0,
                gateway: Some(gw),
                oif: Some(2)
            })
        );
        let mut other_table = default.clone();
        other_table.attributes.push(RouteAttribute::Table(100));
        assert_eq!(main_table_route(&other_table), None);
    }

    /// A reply to an earlier request still queued on the socket is not taken for the answer
    /// to the next one. (Read-only requests in the test's own namespace: no root needed.)
    #[test]
    fn stale_replies_are_skipped_by_sequence_number() {
        let mut nl = Netlink::new().expect("netlink socket");
        // The answer about `lo` (the link, then the ACK) is left unread.
        nl.send(RouteNetlinkMessage::GetLink(link_named("lo")), NLM_F_ACK)
            .expect("send");
        let missing = nl.link_by_name("no-such-link0").expect("lookup");
        assert!(missing.is_none(), "took the stale answer {missing:?}");
        let lo = nl.link_by_name("lo").expect("get lo").expect("lo exists");
        assert_eq!((lo.name.as_str(), lo.index), ("lo", 1));
    }

    #[test]
    fn kernel_refusals_name_the_operation_and_the_errno() {
        let mut nl = Netlink::new().expect("netlink socket");
        // Deleting an address from a link that does not exist: refused by every kernel
        // (ENODEV as root, EPERM otherwise).
        let err = nl
            .change(
                "delete address",
                RouteNetlinkMessage::DelAddress(address_message(
                    u32::MAX,
                    "192.0.2.1".parse().unwrap(),
                    24,
                )),
                0,
            )
            .expect_err("no such link");
        assert!(err.errno().is_some(), "{err}");
        assert!(err.to_string().starts_with("delete address: "), "{err}");
    }
}
