//! A small, synchronous rtnetlink client: just the requests the plugin makes.
//!
//! Messages are built by hand (header + fixed part + attributes). A socket lives in the network
//! namespace of the thread that created it, so a socket made on a short-lived thread that entered
//! a pod's namespace keeps talking to that namespace (see `netns.rs`).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use flannel_subnet_env::mac::MacDisplay;
use thiserror::Error;

// Message types.
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

// Flags.
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLM_F_CAPPED: u16 = 0x100;
const NLA_F_NESTED: u16 = 0x8000;

// Link attributes.
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_MASTER: u16 = 10;
const IFLA_PROTINFO: u16 = 12;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_NUM_TX_QUEUES: u16 = 31;
const IFLA_NUM_RX_QUEUES: u16 = 32;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFLA_BRPORT_MODE: u16 = 4;

// Address attributes.
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const IFA_F_NODAD: u8 = 0x02;

// Route attributes.
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

const IFF_UP: u32 = 0x1;
const AF_BRIDGE: u8 = 7;

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;
const NLMSGERR_ATTR_MSG: u16 = 1;

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
    pub flags: u32,
    pub mtu: u32,
    pub mac: Vec<u8>,
    pub master: Option<u32>,
    pub kind: Option<String>,
}

impl LinkInfo {
    pub fn is_up(&self) -> bool {
        self.flags & IFF_UP != 0
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

/// Builder for one request: header, fixed part, attributes (with nesting).
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(ty: u16, flags: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // len, patched in finish
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // seq, set on send
        buf.extend_from_slice(&0u32.to_ne_bytes()); // pid
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn ifinfo(mut self, family: u8, index: u32, flags: u32, change: u32) -> Msg {
        push_ifinfo(&mut self.buf, family, index, flags, change);
        self
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Msg {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    fn attr_u32(&mut self, ty: u16, v: u32) -> &mut Msg {
        self.attr(ty, &v.to_ne_bytes())
    }

    fn attr_str(&mut self, ty: u16, s: &str) -> &mut Msg {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v)
    }

    fn begin_nest(&mut self, ty: u16) -> &mut Msg {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn end_nest(&mut self) -> &mut Msg {
        let start = self.nests.pop().expect("unbalanced nest");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        self.pad();
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

fn push_ifinfo(buf: &mut Vec<u8>, family: u8, index: u32, flags: u32, change: u32) {
    buf.push(family);
    buf.push(0);
    buf.extend_from_slice(&0u16.to_ne_bytes()); // type
    buf.extend_from_slice(&index.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&change.to_ne_bytes());
}

fn family_of(ip: &IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// Iterate the attributes in `data`: (type without flags, payload).
fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let ty = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            return None;
        }
        let payload = &data[4..len];
        let adv = (len + 3) & !3;
        data = if adv >= data.len() { &[] } else { &data[adv..] };
        Some((ty, payload))
    })
}

fn cstr(payload: &[u8]) -> String {
    let end = payload
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

fn u32_of(payload: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?))
}

pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// A NETLINK_ROUTE socket in the calling thread's network namespace.
    pub fn new() -> Result<Netlink> {
        // SAFETY: plain socket(2) call with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        for opt in [NETLINK_CAP_ACK, NETLINK_EXT_ACK] {
            // SAFETY: `one` outlives the call and the length matches its type. Failure is
            // harmless (older kernels): errors then just lack the extended message.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    SOL_NETLINK,
                    opt,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        Ok(Netlink {
            fd,
            seq: 0,
            buf: vec![0u8; 64 * 1024],
        })
    }

    fn send(&mut self, msg: Msg) -> Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let data = msg.finish(seq);
        // SAFETY: `addr` is a zeroed sockaddr_nl with the family set (pid 0 = the kernel);
        // `data` is a valid buffer of the given length.
        let rc = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::sendto(
                self.fd.as_raw_fd(),
                data.as_ptr() as *const libc::c_void,
                data.len(),
                0,
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        Ok(seq)
    }

    fn recv(&mut self) -> Result<usize> {
        loop {
            // SAFETY: `self.buf` is a valid writable buffer of the given length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr() as *mut libc::c_void,
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NetlinkError::Socket(e));
            }
            return Ok(n as usize);
        }
    }

    /// Send a request and collect the payloads of the replies (type, body after the header),
    /// until the ACK (requests with NLM_F_ACK) or DONE (dumps).
    fn request(&mut self, op: &str, msg: Msg) -> Result<Vec<(u16, Vec<u8>)>> {
        let seq = self.send(msg)?;
        let mut out = Vec::new();
        loop {
            let n = self.recv()?;
            let mut off = 0;
            while off + 16 <= n {
                let b = &self.buf[off..n];
                let len = u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize;
                let ty = u16::from_ne_bytes(b[4..6].try_into().unwrap());
                let flags = u16::from_ne_bytes(b[6..8].try_into().unwrap());
                let mseq = u32::from_ne_bytes(b[8..12].try_into().unwrap());
                if len < 16 || len > b.len() {
                    return Err(NetlinkError::Malformed(op.to_string()));
                }
                let body = &b[16..len];
                off += (len + 3) & !3;
                if mseq != seq {
                    continue; // a stale reply
                }
                match ty {
                    NLMSG_ERROR => {
                        if body.len() < 4 {
                            return Err(NetlinkError::Malformed(op.to_string()));
                        }
                        let code = i32::from_ne_bytes(body[0..4].try_into().unwrap());
                        if code == 0 {
                            return Ok(out);
                        }
                        return Err(NetlinkError::Kernel {
                            op: op.to_string(),
                            err: io::Error::from_raw_os_error(-code),
                            ext: ext_ack_msg(body, flags),
                        });
                    }
                    NLMSG_DONE => return Ok(out),
                    // A single answer (GETLINK by name) is followed by the ACK.
                    _ => out.push((ty, body.to_vec())),
                }
            }
        }
    }

    /// Look a link up by name. `Ok(None)` when there is none.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<LinkInfo>> {
        let mut m = Msg::new(RTM_GETLINK, NLM_F_ACK).ifinfo(0, 0, 0, 0);
        m.attr_str(IFLA_IFNAME, name);
        match self.request(&format!("get link {name}"), m) {
            Ok(replies) => Ok(replies
                .iter()
                .find(|(ty, _)| *ty == RTM_NEWLINK)
                .and_then(|(_, body)| parse_link(body))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Create a bridge (up, with this MTU). EEXIST is reported as an error to the caller.
    pub fn create_bridge(&mut self, name: &str, mtu: u32) -> Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
            .ifinfo(0, 0, IFF_UP, IFF_UP);
        m.attr_str(IFLA_IFNAME, name);
        if mtu > 0 {
            m.attr_u32(IFLA_MTU, mtu);
        }
        m.begin_nest(IFLA_LINKINFO)
            .attr_str(IFLA_INFO_KIND, "bridge")
            .end_nest();
        self.request(&format!("create bridge {name}"), m)
            .map(|_| ())
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
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
            .ifinfo(0, 0, IFF_UP, IFF_UP);
        m.attr_str(IFLA_IFNAME, host);
        if mtu > 0 {
            m.attr_u32(IFLA_MTU, mtu);
        }
        if let Some(master) = master {
            m.attr_u32(IFLA_MASTER, master);
        }
        // One queue each way: a pod's veth needs no more (the kernel's default is one per
        // CPU), and every queue is a sysfs object the kernel must create and later remove.
        m.attr_u32(IFLA_NUM_TX_QUEUES, 1)
            .attr_u32(IFLA_NUM_RX_QUEUES, 1);
        m.begin_nest(IFLA_LINKINFO)
            .attr_str(IFLA_INFO_KIND, "veth")
            .begin_nest(IFLA_INFO_DATA)
            .begin_nest(VETH_INFO_PEER);
        // The peer cannot be brought up here: veth_open() fails with ENOTCONN until the pair
        // is linked, which happens after the peer is configured.
        push_ifinfo(&mut m.buf, 0, 0, 0, 0);
        m.attr_str(IFLA_IFNAME, peer);
        if mtu > 0 {
            m.attr_u32(IFLA_MTU, mtu);
        }
        m.attr_u32(IFLA_NET_NS_FD, peer_ns as u32);
        m.attr_u32(IFLA_NUM_TX_QUEUES, 1)
            .attr_u32(IFLA_NUM_RX_QUEUES, 1);
        m.end_nest().end_nest().end_nest();
        self.request(&format!("create veth {host}/{peer}"), m)
            .map(|_| ())
    }

    /// Set a link up.
    pub fn set_up(&mut self, index: u32) -> Result<()> {
        let m = Msg::new(RTM_NEWLINK, NLM_F_ACK).ifinfo(0, index, IFF_UP, IFF_UP);
        self.request("set link up", m).map(|_| ())
    }

    /// Enable hairpin mode on a bridge port.
    pub fn set_hairpin(&mut self, index: u32, on: bool) -> Result<()> {
        let mut m = Msg::new(RTM_SETLINK, NLM_F_ACK).ifinfo(AF_BRIDGE, index, 0, 0);
        m.begin_nest(IFLA_PROTINFO)
            .attr(IFLA_BRPORT_MODE, &[on as u8])
            .end_nest();
        self.request("set hairpin mode", m).map(|_| ())
    }

    /// Delete a link by name. `Ok(false)` when there was none.
    pub fn delete_link_by_name(&mut self, name: &str) -> Result<bool> {
        let mut m = Msg::new(RTM_DELLINK, NLM_F_ACK).ifinfo(0, 0, 0, 0);
        m.attr_str(IFLA_IFNAME, name);
        match self.request(&format!("delete link {name}"), m) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Add (or replace) an address on a link.
    pub fn add_address(&mut self, index: u32, addr: IpAddr, prefix: u8) -> Result<()> {
        let mut m = Msg::new(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE);
        let nodad = if addr.is_ipv6() { IFA_F_NODAD } else { 0 };
        m.buf
            .extend_from_slice(&[family_of(&addr), prefix, nodad, RT_SCOPE_UNIVERSE]);
        m.buf.extend_from_slice(&index.to_ne_bytes());
        let bytes = ip_bytes(&addr);
        m.attr(IFA_LOCAL, &bytes).attr(IFA_ADDRESS, &bytes);
        if let IpAddr::V4(a) = addr {
            if prefix < 31 {
                let mask = u32::MAX.checked_shr(prefix as u32).unwrap_or(0);
                let brd = u32::from(a) | mask;
                m.attr(IFA_BROADCAST, &brd.to_be_bytes());
            }
        }
        self.request(&format!("add address {addr}/{prefix}"), m)
            .map(|_| ())
    }

    /// Remove an address from a link (its connected route goes with it). `Ok(false)` when
    /// the link does not have it.
    pub fn delete_address(&mut self, index: u32, addr: IpAddr, prefix: u8) -> Result<bool> {
        let mut m = Msg::new(RTM_DELADDR, NLM_F_ACK);
        m.buf
            .extend_from_slice(&[family_of(&addr), prefix, 0, RT_SCOPE_UNIVERSE]);
        m.buf.extend_from_slice(&index.to_ne_bytes());
        let bytes = ip_bytes(&addr);
        m.attr(IFA_LOCAL, &bytes).attr(IFA_ADDRESS, &bytes);
        match self.request(&format!("delete address {addr}/{prefix}"), m) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) || e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// All addresses of one family (0 = all) in this namespace.
    pub fn addresses(&mut self, family: u8) -> Result<Vec<AddrInfo>> {
        let mut m = Msg::new(RTM_GETADDR, NLM_F_DUMP);
        m.buf.extend_from_slice(&[family, 0, 0, 0]);
        m.buf.extend_from_slice(&0u32.to_ne_bytes());
        let replies = self.request("list addresses", m)?;
        let mut out = Vec::new();
        for (ty, body) in replies {
            if ty != RTM_NEWADDR || body.len() < 8 {
                continue;
            }
            let prefix = body[1];
            let index = u32::from_ne_bytes(body[4..8].try_into().unwrap());
            let mut local = None;
            let mut address = None;
            for (aty, p) in attrs(&body[8..]) {
                match aty {
                    IFA_LOCAL => local = ip_from(p),
                    IFA_ADDRESS => address = ip_from(p),
                    _ => {}
                }
            }
            if let Some(addr) = local.or(address) {
                out.push(AddrInfo {
                    index,
                    addr,
                    prefix,
                });
            }
        }
        Ok(out)
    }

    /// Add (or replace) a route in the main table via `gateway` on link `oif`.
    pub fn add_route(
        &mut self,
        dst: IpAddr,
        dst_len: u8,
        gateway: Option<IpAddr>,
        oif: u32,
    ) -> Result<()> {
        let mut m = Msg::new(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE);
        let scope = if gateway.is_some() {
            RT_SCOPE_UNIVERSE
        } else {
            253 // RT_SCOPE_LINK
        };
        m.buf.extend_from_slice(&[
            family_of(&dst),
            dst_len,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            scope,
            RTN_UNICAST,
        ]);
        m.buf.extend_from_slice(&0u32.to_ne_bytes());
        if dst_len > 0 {
            m.attr(RTA_DST, &ip_bytes(&dst));
        }
        if let Some(gw) = gateway {
            m.attr(RTA_GATEWAY, &ip_bytes(&gw));
        }
        m.attr_u32(RTA_OIF, oif);
        let gw = gateway.map(|g| format!(" via {g}")).unwrap_or_default();
        self.request(&format!("add route {dst}/{dst_len}{gw}"), m)
            .map(|_| ())
    }

    /// Routes of the main table for one family.
    pub fn routes(&mut self, family: u8) -> Result<Vec<RouteInfo>> {
        let mut m = Msg::new(RTM_GETROUTE, NLM_F_DUMP);
        m.buf.extend_from_slice(&[family, 0, 0, 0, 0, 0, 0, 0]);
        m.buf.extend_from_slice(&0u32.to_ne_bytes());
        let replies = self.request("list routes", m)?;
        let mut out = Vec::new();
        for (ty, body) in replies {
            if ty != RTM_NEWROUTE || body.len() < 12 {
                continue;
            }
            let fam = body[0];
            let dst_len = body[1];
            let mut table = body[4] as u32;
            let mut dst = None;
            let mut gateway = None;
            let mut oif = None;
            for (aty, p) in attrs(&body[12..]) {
                match aty {
                    RTA_DST => dst = ip_from(p),
                    RTA_GATEWAY => gateway = ip_from(p),
                    RTA_OIF => oif = u32_of(p),
                    RTA_TABLE => table = u32_of(p).unwrap_or(table),
                    _ => {}
                }
            }
            if table != RT_TABLE_MAIN as u32 {
                continue;
            }
            let dst = dst.unwrap_or(if fam == libc::AF_INET6 as u8 {
                IpAddr::from([0u8; 16])
            } else {
                IpAddr::from([0u8; 4])
            });
            out.push(RouteInfo {
                dst,
                dst_len,
                gateway,
                oif,
            });
        }
        Ok(out)
    }
}

fn parse_link(body: &[u8]) -> Option<LinkInfo> {
    if body.len() < 16 {
        return None;
    }
    let index = u32::from_ne_bytes(body[4..8].try_into().ok()?);
    let flags = u32::from_ne_bytes(body[8..12].try_into().ok()?);
    let mut info = LinkInfo {
        index,
        flags,
        ..Default::default()
    };
    for (ty, p) in attrs(&body[16..]) {
        match ty {
            IFLA_IFNAME => info.name = cstr(p),
            IFLA_MTU => info.mtu = u32_of(p).unwrap_or(0),
            IFLA_ADDRESS => info.mac = p.to_vec(),
            IFLA_MASTER => info.master = u32_of(p),
            IFLA_LINKINFO => {
                for (ity, ip) in attrs(p) {
                    if ity == IFLA_INFO_KIND {
                        info.kind = Some(cstr(ip));
                    }
                }
            }
            _ => {}
        }
    }
    Some(info)
}

/// The extended-ACK message, when the kernel sent one.
fn ext_ack_msg(body: &[u8], flags: u16) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    // errno (4) + the original header (16), plus its payload unless capped.
    let skip = if flags & NLM_F_CAPPED != 0 {
        20
    } else {
        let orig_len = u32::from_ne_bytes(body.get(4..8)?.try_into().ok()?) as usize;
        4 + ((orig_len + 3) & !3)
    };
    attrs(body.get(skip..)?)
        .find(|(ty, _)| *ty == NLMSGERR_ATTR_MSG)
        .map(|(_, p)| cstr(p))
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_attributes_have_lengths_and_flag() {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_ACK).ifinfo(0, 0, 0, 0);
        m.begin_nest(IFLA_LINKINFO)
            .attr_str(IFLA_INFO_KIND, "veth")
            .end_nest();
        let b = m.finish(7);
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 7);
        let nest = &b[32..];
        let len = u16::from_ne_bytes([nest[0], nest[1]]);
        let ty = u16::from_ne_bytes([nest[2], nest[3]]);
        assert_eq!(ty, IFLA_LINKINFO | NLA_F_NESTED);
        assert_eq!(len as usize, 4 + 4 + 5 + 3); // header + kind attr "veth\0" padded
        let inner: Vec<_> = attrs(&nest[4..len as usize]).collect();
        assert_eq!(inner, vec![(IFLA_INFO_KIND, &b"veth\0"[..])]);
    }
}
