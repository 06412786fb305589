//! Thin helpers over rtnetlink shared by the backends: dump links, addresses, routes,
//! neighbours and FDB entries, and replace or delete them — for IPv4 and IPv6 alike.
//!
//! Every helper turns the kernel's answer into a small plain struct and every error into a
//! [`NetlinkError`] that names the operation and the object, so a backend can add its own
//! context (device name, peer) and hand a person something actionable.
//!
//! Two kinds of traffic, two sockets ([`Netlink`]):
//! - single requests and dumps go through an rtnetlink [`Handle`] whose socket has strict
//!   checking on (`NETLINK_GET_STRICT_CHK`), so the kernel filters route dumps by device and
//!   FDB dumps by port instead of sending the whole table;
//! - bulk changes go through [`Netlink::apply`]: many messages per datagram (one `sendmsg` for
//!   up to [`BATCH_MESSAGES`] changes), several datagrams in flight, one ack per message matched
//!   back to its change. This is what makes programming thousands of peers as fast as
//!   `ip -batch`, which pays one `sendmsg` and one wait per change.
//!
//! IP-family generic code is written against [`Net`], implemented for [`Ipv4Network`] and
//! [`Ipv6Network`].

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use ipnetwork::{Ipv4Network, Ipv6Network};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
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
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{
    NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan};

/// The main routing table.
pub const RT_TABLE_MAIN: u32 = RouteHeader::RT_TABLE_MAIN as u32;

/// The routing protocol number (`rtm_protocol`, `ip route … proto N`) of every route flanneld
/// installs. It marks them as ours: a route outside our own devices is removed or corrected only
/// when it carries this number, so routes an operator or another daemon made are left alone.
/// 102 (ASCII `f`) is in neither the kernel's list (`RTPROT_*` in `linux/rtnetlink.h`) nor
/// iproute2's `rt_protos`, nor in the range FRR uses (186–198). `ip route show proto 102`
/// lists our routes.
pub const FLANNEL_ROUTE_PROTOCOL: u8 = 102;
/// [`FLANNEL_ROUTE_PROTOCOL`] as the route header holds it.
pub const ROUTE_PROTOCOL: RouteProtocol = RouteProtocol::Other(FLANNEL_ROUTE_PROTOCOL);

/// Changes per datagram in [`Netlink::apply`].
pub const BATCH_MESSAGES: usize = 128;
/// How long [`Netlink::apply`] waits for the kernel's answers to one datagram.
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);
/// The receive buffer asked for on the batch socket: room for the acks of every datagram in
/// flight (an ack takes well under 1 KiB of buffer, counted generously below).
const BATCH_RCVBUF: usize = 4 << 20;
const ACK_TRUESIZE: usize = 1024;

use flannel_subnet_env::mac::MacDisplay as MacFmt;
pub use flannel_subnet_env::mac::{format_mac, parse_mac, Mac};

/// `NUD_PERMANENT` is a bit: tools add entries as `PERMANENT|NOARP` too.
fn is_permanent(state: NeighbourState) -> bool {
    u16::from(state) & u16::from(NeighbourState::Permanent) != 0
}

fn mac_from_bytes(bytes: &[u8]) -> Option<Mac> {
    bytes.try_into().ok()
}

// ---------------------------------------------------------------------------------------------
// IP families

/// An IP network type of one family: what family-generic code needs to know about it.
pub trait Net: Copy + Ord + Eq + Hash + fmt::Display + fmt::Debug + Send + Sync + 'static {
    /// The address type of the family.
    type Addr: Copy
        + Ord
        + Eq
        + Hash
        + fmt::Display
        + fmt::Debug
        + Send
        + Sync
        + Into<IpAddr>
        + 'static;
    const FAMILY: AddressFamily;
    /// `IPv4` or `IPv6`, for messages.
    const NAME: &'static str;
    /// The prefix length of a single address (32 or 128).
    const HOST_PREFIX: u8;
    /// The metric the kernel gives a route added without one (IPv4 0, IPv6 1024): the metric
    /// of the routes the backends install.
    const DEFAULT_METRIC: u32;

    fn with_prefix(addr: Self::Addr, prefix: u8) -> Option<Self>;
    /// The network address (the first address of the network).
    fn net_addr(&self) -> Self::Addr;
    /// The address as written, host bits kept (`10.5.1.1` of `10.5.1.1/24`).
    fn ip_addr(&self) -> Self::Addr;
    fn prefix_len(&self) -> u8;
    fn has(&self, addr: Self::Addr) -> bool;
    /// The address when `ip` is of this family.
    fn addr_of(ip: IpAddr) -> Option<Self::Addr>;
    /// Whether the address is link-local (never managed, IPv6 devices get one of their own).
    fn is_link_local(addr: Self::Addr) -> bool;

    /// The network `addr`/[`Self::HOST_PREFIX`].
    fn host(addr: Self::Addr) -> Self {
        Self::with_prefix(addr, Self::HOST_PREFIX).expect("a host prefix is valid")
    }

    /// Whether `self` lies inside `outer` (same or longer prefix).
    fn within(&self, outer: &Self) -> bool {
        self.prefix_len() >= outer.prefix_len() && outer.has(self.net_addr())
    }
}

/// The [`Net`] methods that `ipnetwork` has under the same names for both families.
macro_rules! same_for_both_families {
    ($net:ty, $addr:ty) => {
        fn with_prefix(addr: $addr, prefix: u8) -> Option<Self> {
            <$net>::new(addr, prefix).ok()
        }
        fn net_addr(&self) -> $addr {
            self.network()
        }
        fn ip_addr(&self) -> $addr {
            self.ip()
        }
        fn prefix_len(&self) -> u8 {
            self.prefix()
        }
        fn has(&self, addr: $addr) -> bool {
            self.contains(addr)
        }
    };
}

impl Net for Ipv4Network {
    type Addr = Ipv4Addr;
    const FAMILY: AddressFamily = AddressFamily::Inet;
    const NAME: &'static str = "IPv4";
    const HOST_PREFIX: u8 = 32;
    const DEFAULT_METRIC: u32 = 0;

    same_for_both_families!(Ipv4Network, Ipv4Addr);

    fn addr_of(ip: IpAddr) -> Option<Ipv4Addr> {
        match ip {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        }
    }
    fn is_link_local(addr: Ipv4Addr) -> bool {
        addr.is_link_local()
    }
}

impl Net for Ipv6Network {
    type Addr = Ipv6Addr;
    const FAMILY: AddressFamily = AddressFamily::Inet6;
    const NAME: &'static str = "IPv6";
    const HOST_PREFIX: u8 = 128;
    const DEFAULT_METRIC: u32 = 1024;

    same_for_both_families!(Ipv6Network, Ipv6Addr);

    fn addr_of(ip: IpAddr) -> Option<Ipv6Addr> {
        match ip {
            IpAddr::V6(ip) => Some(ip),
            IpAddr::V4(_) => None,
        }
    }
    fn is_link_local(addr: Ipv6Addr) -> bool {
        addr.segments()[0] & 0xffc0 == 0xfe80
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and the connection

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
    pub(crate) fn new(op: impl Into<String>, err: rtnetlink::Error) -> Self {
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

    fn errno(op: impl Into<String>, code: i32) -> Self {
        NetlinkError {
            op: op.into(),
            errno: Some(code),
            detail: std::io::Error::from_raw_os_error(code).to_string(),
        }
    }

    fn other(op: impl Into<String>, detail: impl Into<String>) -> Self {
        NetlinkError {
            op: op.into(),
            errno: None,
            detail: detail.into(),
        }
    }

    /// Something holds the place already (`EEXIST`).
    pub fn is_exists(&self) -> bool {
        self.errno == Some(libc::EEXIST)
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

/// Two rtnetlink sockets of the namespace they were opened in: [`Netlink::h`] for dumps and
/// single requests, and one for [`Netlink::apply`]'s batches. Cheap to clone.
#[derive(Clone)]
pub struct Netlink {
    /// Dumps and single requests (strict checking on when the kernel has it).
    pub h: Handle,
    /// One batch at a time: the acks of a batch are read from this socket by its sender.
    batch: Arc<tokio::sync::Mutex<BatchSocket>>,
    /// Datagrams of [`BATCH_MESSAGES`] in flight at once, so that their acks fit the buffer.
    window: usize,
}

impl fmt::Debug for Netlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netlink")
            .field("window", &self.window)
            .finish()
    }
}

fn io_error(op: &str, e: std::io::Error) -> NetlinkError {
    NetlinkError {
        op: op.into(),
        errno: e.raw_os_error(),
        detail: e.to_string(),
    }
}

/// Opens one plain rtnetlink socket in the calling thread's network namespace and spawns its
/// connection task on the current tokio runtime: for single requests and unfiltered dumps.
/// Backends that program many entries use [`open`].
///
/// Must be called from within a tokio runtime.
pub fn connect() -> Result<Handle, NetlinkError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| io_error("open rtnetlink socket", e))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Like [`connect`], with strict checking on when the kernel has it, so that it honours dump
/// filters.
pub fn connect_strict() -> Result<Handle, NetlinkError> {
    let (conn, handle, _) = match rtnetlink::new_connection_with_strict_check() {
        Ok(c) => c,
        Err(_) => rtnetlink::new_connection().map_err(|e| io_error("open rtnetlink socket", e))?,
    };
    tokio::spawn(conn);
    Ok(handle)
}

/// Opens the rtnetlink sockets of a [`Netlink`] in the calling thread's network namespace and
/// spawns their connection tasks on the current tokio runtime.
///
/// Must be called from within a tokio runtime.
pub fn open() -> Result<Netlink, NetlinkError> {
    // Strict checking makes the kernel honour dump filters (device, table); kernels without it
    // (< 4.20) refuse the option, and the helpers filter in user space anyway.
    let (conn, h, _) = match rtnetlink::new_connection_with_strict_check() {
        Ok(c) => c,
        Err(_) => rtnetlink::new_connection().map_err(|e| io_error("open rtnetlink socket", e))?,
    };
    tokio::spawn(conn);

    let batch = BatchSocket::open()?;
    let window = batch.window;
    let batch = Arc::new(tokio::sync::Mutex::new(batch));
    Ok(Netlink { h, batch, window })
}

// ---------------------------------------------------------------------------------------------
// Batched changes

/// One change, as it reads in messages (`replace route 10.5.2.0/24 via 10.5.2.0 ifindex 7
/// onlink`). Holds no heap data: formatting happens only when a message is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Route {
        replace: bool,
        dst: (IpAddr, u8),
        gateway: Option<IpAddr>,
        oif: Option<u32>,
        onlink: bool,
    },
    Neighbour {
        replace: bool,
        ifindex: u32,
        dst: IpAddr,
        mac: Option<Mac>,
    },
    Fdb {
        replace: bool,
        ifindex: u32,
        mac: Mac,
        dst: Option<IpAddr>,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = |replace: bool| if replace { "replace" } else { "delete" };
        match *self {
            Op::Route {
                replace,
                dst,
                gateway,
                oif,
                onlink,
            } => {
                write!(f, "{} route {}/{}", verb(replace), dst.0, dst.1)?;
                if let Some(gw) = gateway {
                    write!(f, " via {gw}")?;
                }
                if let Some(oif) = oif {
                    write!(f, " ifindex {oif}")?;
                }
                if onlink {
                    write!(f, " onlink")?;
                }
                Ok(())
            }
            Op::Neighbour {
                replace,
                ifindex,
                dst,
                mac,
            } => {
                write!(f, "{} neighbour {dst}", verb(replace))?;
                if let Some(mac) = &mac {
                    write!(f, " lladdr {}", MacFmt(mac))?;
                }
                write!(f, " on ifindex {ifindex}")
            }
            Op::Fdb {
                replace,
                ifindex,
                mac,
                dst,
            } => {
                write!(f, "{} FDB entry {}", verb(replace), MacFmt(&mac))?;
                if let Some(dst) = dst {
                    write!(f, " dst {dst}")?;
                }
                write!(f, " on ifindex {ifindex}")
            }
        }
    }
}

/// Changes to send together with [`Netlink::apply`]; the kernel applies them in order.
#[derive(Default)]
pub struct Batch {
    ops: Vec<Op>,
    msgs: Vec<NetlinkMessage<RouteNetlinkMessage>>,
}

fn request(msg: RouteNetlinkMessage, replace: bool) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    if replace {
        req.header.flags |= NLM_F_CREATE | NLM_F_REPLACE;
    }
    req
}

impl Batch {
    pub fn new() -> Self {
        Batch::default()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The changes, in order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    fn push(&mut self, op: Op, msg: RouteNetlinkMessage, replace: bool) -> usize {
        self.ops.push(op);
        self.msgs.push(request(msg, replace));
        self.ops.len() - 1
    }

    /// `ip route replace`; returns the change's index.
    pub fn replace_route<N: Net>(&mut self, route: &Route<N>) -> usize {
        self.push(
            route.op(true),
            RouteNetlinkMessage::NewRoute(route.message()),
            true,
        )
    }

    /// `ip route del`; matches any protocol and scope.
    pub fn delete_route<N: Net>(&mut self, route: &Route<N>) -> usize {
        self.push(
            route.op(false),
            RouteNetlinkMessage::DelRoute(route.delete_message()),
            false,
        )
    }

    /// `ip neigh replace DST lladdr MAC nud permanent dev IFINDEX`.
    pub fn replace_neighbour(&mut self, ifindex: u32, dst: IpAddr, mac: Mac) -> usize {
        self.push(
            Op::Neighbour {
                replace: true,
                ifindex,
                dst,
                mac: Some(mac),
            },
            RouteNetlinkMessage::NewNeighbour(neighbour_message(ifindex, dst, Some(mac))),
            true,
        )
    }

    /// `ip neigh del DST dev IFINDEX`.
    pub fn delete_neighbour(&mut self, ifindex: u32, dst: IpAddr) -> usize {
        self.push(
            Op::Neighbour {
                replace: false,
                ifindex,
                dst,
                mac: None,
            },
            RouteNetlinkMessage::DelNeighbour(neighbour_message(ifindex, dst, None)),
            false,
        )
    }

    /// `bridge fdb replace MAC dev IFINDEX dst DST self permanent`.
    pub fn replace_fdb(&mut self, ifindex: u32, mac: Mac, dst: IpAddr) -> usize {
        self.push(
            Op::Fdb {
                replace: true,
                ifindex,
                mac,
                dst: Some(dst),
            },
            RouteNetlinkMessage::NewNeighbour(fdb_message(ifindex, mac, Some(dst), true)),
            true,
        )
    }

    /// `bridge fdb del MAC dev IFINDEX [dst DST] self`: with `dst`, only that remote.
    pub fn delete_fdb(&mut self, ifindex: u32, mac: Mac, dst: Option<IpAddr>) -> usize {
        self.push(
            Op::Fdb {
                replace: false,
                ifindex,
                mac,
                dst,
            },
            RouteNetlinkMessage::DelNeighbour(fdb_message(ifindex, mac, dst, false)),
            false,
        )
    }
}

impl Netlink {
    /// Sends the changes, [`BATCH_MESSAGES`] per datagram with a few datagrams in flight, and
    /// returns one result per change, in order. A failed change does not stop the others.
    pub async fn apply(&self, batch: Batch) -> Vec<Result<(), NetlinkError>> {
        let Batch { ops, msgs } = batch;
        let answers = self.batch.lock().await.send(msgs).await;
        ops.iter()
            .zip(answers)
            .map(|(op, answer)| match answer {
                Some(0) => Ok(()),
                Some(code) => Err(NetlinkError::errno(op.to_string(), code)),
                None => Err(NetlinkError::other(
                    op.to_string(),
                    "no answer from the kernel (netlink socket overrun or closed)",
                )),
            })
            .collect()
    }
}

/// The rtnetlink socket of [`Netlink::apply`]. It is ours alone (not a library connection's),
/// so that each message's sequence number is chosen here when it is sent, recorded, and every
/// ack is matched to its change by that number.
struct BatchSocket {
    sock: TokioSocket,
    /// The sequence number of the next message sent; never reset, so that a late ack of an
    /// earlier batch (one that timed out) cannot pass for an ack of the current one.
    next_seq: u32,
    /// Datagrams of [`BATCH_MESSAGES`] in flight at once, so that their acks fit the buffer.
    window: usize,
}

impl BatchSocket {
    fn open() -> Result<Self, NetlinkError> {
        let op = "open rtnetlink socket";
        let mut sock = TokioSocket::new(rtnetlink::sys::constants::NETLINK_ROUTE)
            .map_err(|e| io_error(op, e))?;
        let raw = sock.socket_mut();
        raw.bind_auto().map_err(|e| io_error(op, e))?;
        raw.connect(&SocketAddr::new(0, 0))
            .map_err(|e| io_error(op, e))?;
        // Errors echo only the header of the failed message, not all of it.
        let _ = raw.set_cap_ack(true);
        let fd = raw.as_fd();
        use nix::sys::socket::{getsockopt, setsockopt, sockopt};
        // Over rmem_max needs CAP_NET_ADMIN; without it, ask for what is allowed.
        if setsockopt(&fd, sockopt::RcvBufForce, &BATCH_RCVBUF).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &BATCH_RCVBUF);
        }
        let rcvbuf = getsockopt(&fd, sockopt::RcvBuf).unwrap_or(212_992);
        let window = (rcvbuf / (ACK_TRUESIZE * BATCH_MESSAGES)).max(1);
        Ok(BatchSocket {
            sock,
            next_seq: 1,
            window,
        })
    }

    /// Sends `msgs` in order, [`BATCH_MESSAGES`] per datagram and at most `window` datagrams
    /// unanswered, and returns each message's answer: `Some(0)` for success, `Some(errno)` for
    /// failure, `None` when none came (not sent, socket overrun, or [`BATCH_TIMEOUT`] without
    /// any answer).
    async fn send(&mut self, msgs: Vec<NetlinkMessage<RouteNetlinkMessage>>) -> Vec<Option<i32>> {
        let chunks: Vec<&[NetlinkMessage<RouteNetlinkMessage>]> =
            msgs.chunks(BATCH_MESSAGES).collect();
        let mut acks = Acks::new(msgs.len());
        // Unanswered messages per datagram; a datagram is in flight while it has some.
        let mut unanswered: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        let (mut next_chunk, mut in_flight) = (0, 0);
        let mut buf = Vec::new();
        loop {
            while in_flight < self.window && next_chunk < chunks.len() {
                let first = next_chunk * BATCH_MESSAGES;
                buf.clear();
                for (i, msg) in chunks[next_chunk].iter().enumerate() {
                    let seq = self.next_seq;
                    self.next_seq = self.next_seq.wrapping_add(1).max(1);
                    append_message(&mut buf, msg, seq);
                    acks.sent(first + i, seq);
                }
                next_chunk += 1;
                match self.sock.send(&buf).await {
                    Ok(_) => in_flight += 1,
                    Err(e) => {
                        tracing::warn!(
                            "netlink: sending {} changes failed: {e}",
                            unanswered[next_chunk - 1]
                        );
                    }
                }
            }
            if in_flight == 0 {
                break;
            }
            let datagram =
                match tokio::time::timeout(BATCH_TIMEOUT, self.sock.recv_from_full()).await {
                    Ok(Ok((datagram, _))) => datagram,
                    Ok(Err(e)) => {
                        // An overrun loses acks we cannot name; what was not answered stays `None`.
                        tracing::warn!("netlink: reading acks failed: {e}");
                        break;
                    }
                    Err(_) => break,
                };
            for (seq, code) in acks_in(&datagram) {
                if let Some(index) = acks.answer(seq, code) {
                    let chunk = &mut unanswered[index / BATCH_MESSAGES];
                    *chunk -= 1;
                    if *chunk == 0 {
                        in_flight -= 1;
                    }
                }
            }
        }
        acks.into_answers()
    }
}

/// Appends `msg` with sequence number `seq` to a datagram being built.
fn append_message(buf: &mut Vec<u8>, msg: &NetlinkMessage<RouteNetlinkMessage>, seq: u32) {
    let mut msg = msg.clone();
    msg.header.sequence_number = seq;
    msg.finalize();
    let start = buf.len();
    buf.resize(start + msg.buffer_len(), 0);
    msg.serialize(&mut buf[start..]);
    // Messages in a datagram start on 4-byte boundaries.
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// The (sequence number, errno) of each ack or error in a datagram from the kernel: errno 0 is
/// success.
fn acks_in(datagram: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while let Ok(header) = NetlinkBuffer::new_checked(rest) {
        let len = header.length() as usize;
        if header.message_type() == NLMSG_ERROR {
            if let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len]) {
                if let NetlinkPayload::Error(e) = msg.payload {
                    out.push((msg.header.sequence_number, -e.raw_code()));
                }
            }
        }
        let next = len.next_multiple_of(4);
        if next == 0 || next >= rest.len() {
            break;
        }
        rest = &rest[next..];
    }
    out
}

/// The answers of one batch, matched to its messages by the sequence number each was sent
/// with. Acks of other requests (a late one of an earlier batch) and repeats are ignored, and a
/// lost ack leaves only its own message unanswered.
struct Acks {
    index_of: HashMap<u32, usize>,
    answers: Vec<Option<i32>>,
}

impl Acks {
    fn new(n: usize) -> Self {
        Acks {
            index_of: HashMap::with_capacity(n),
            answers: vec![None; n],
        }
    }

    /// Message `index` went out with sequence number `seq`.
    fn sent(&mut self, index: usize, seq: u32) {
        self.index_of.insert(seq, index);
    }

    /// Records an answer; returns the index of the message it answers, when it is the first
    /// answer to one of ours.
    fn answer(&mut self, seq: u32, code: i32) -> Option<usize> {
        let index = *self.index_of.get(&seq)?;
        let slot = &mut self.answers[index];
        if slot.is_some() {
            return None;
        }
        *slot = Some(code);
        Some(index)
    }

    fn into_answers(self) -> Vec<Option<i32>> {
        self.answers
    }
}

// ---------------------------------------------------------------------------------------------
// Links

/// The attributes of a VXLAN device that matter to a backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanAttrs {
    pub vni: Option<u32>,
    /// `local` (IPv4 or IPv6).
    pub local: Option<IpAddr>,
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
                                    InfoVxlan::Local(ip) => v.local = Some(IpAddr::V4(ip)),
                                    InfoVxlan::Local6(ip) => v.local = Some(IpAddr::V6(ip)),
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

/// What a new VXLAN device looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    /// The local (source) address of the encapsulated packets; its family is the underlay's.
    pub local: IpAddr,
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
    let mut builder = LinkVxlan::new(&spec.name, spec.vni).dev(spec.link);
    builder = match spec.local {
        IpAddr::V4(ip) => builder.local(ip),
        IpAddr::V6(ip) => builder.local6(ip),
    };
    builder = builder
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

/// The addresses of family `N` on device `index`, with their prefix lengths.
pub async fn addresses<N: Net>(h: &Handle, index: u32) -> Result<Vec<N>, NetlinkError> {
    let op = || format!("dump {} addresses of ifindex {index}", N::NAME);
    let mut req = h.address().get().set_link_index_filter(index);
    req.message_mut().header.family = N::FAMILY;
    let msgs: Vec<AddressMessage> = req
        .execute()
        .try_collect()
        .await
        .map_err(|e| NetlinkError::new(op(), e))?;
    let mut out = Vec::new();
    for msg in msgs {
        if msg.header.index != index || msg.header.family != N::FAMILY {
            continue;
        }
        let ip_of = |want_local: bool| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) if want_local => N::addr_of(*ip),
                AddressAttribute::Address(ip) if !want_local => N::addr_of(*ip),
                _ => None,
            })
        };
        if let Some(ip) = ip_of(true).or_else(|| ip_of(false)) {
            if let Some(net) = N::with_prefix(ip, msg.header.prefix_len) {
                out.push(net);
            }
        }
    }
    Ok(out)
}

/// Adds an address to a device, or refreshes it when present (`ip addr replace`). IPv6
/// addresses skip duplicate address detection (`nodad`): they are usable at once.
pub async fn replace_address<N: Net>(h: &Handle, index: u32, addr: N) -> Result<(), NetlinkError> {
    let ip: IpAddr = addr.ip_addr().into();
    let mut req = h.address().add(index, ip, addr.prefix_len()).replace();
    if N::FAMILY == AddressFamily::Inet6 {
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    req.execute()
        .await
        .map_err(|e| NetlinkError::new(format!("replace address {addr} on ifindex {index}"), e))
}

/// Removes an address from a device.
pub async fn delete_address<N: Net>(h: &Handle, index: u32, addr: N) -> Result<(), NetlinkError> {
    let ip: IpAddr = addr.ip_addr().into();
    let mut msg = AddressMessage::default();
    msg.header.family = N::FAMILY;
    msg.header.prefix_len = addr.prefix_len();
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Local(ip));
    if N::FAMILY == AddressFamily::Inet6 {
        // IPv6 addresses are identified by IFA_ADDRESS.
        msg.attributes.push(AddressAttribute::Address(ip));
    }
    h.address()
        .del(msg)
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("delete address {addr} from ifindex {index}"), e))
}

// ---------------------------------------------------------------------------------------------
// Routes

/// One unicast route of family `N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<N: Net> {
    pub dst: N,
    pub gateway: Option<N::Addr>,
    /// Output device; `None` for multipath routes.
    pub oif: Option<u32>,
    pub onlink: bool,
    /// The metric; routes are identified by (table, dst, metric).
    pub priority: u32,
    pub table: u32,
    pub protocol: RouteProtocol,
}

/// An IPv4 route.
pub type Route4 = Route<Ipv4Network>;
/// An IPv6 route.
pub type Route6 = Route<Ipv6Network>;

impl<N: Net> Route<N> {
    /// A route in the main table with the family's default metric and our protocol number,
    /// as the backends install them.
    pub fn new(dst: N, gateway: Option<N::Addr>, oif: u32, onlink: bool) -> Self {
        Route {
            dst,
            gateway,
            oif: Some(oif),
            onlink,
            priority: N::DEFAULT_METRIC,
            table: RT_TABLE_MAIN,
            protocol: ROUTE_PROTOCOL,
        }
    }

    /// Whether flanneld installed the route (it carries [`ROUTE_PROTOCOL`]).
    pub fn is_ours(&self) -> bool {
        self.protocol == ROUTE_PROTOCOL
    }

    /// Same destination, next hop, device and flags (ignores the protocol).
    pub fn same_path(&self, other: &Self) -> bool {
        self.dst == other.dst
            && self.gateway == other.gateway
            && self.oif == other.oif
            && self.onlink == other.onlink
            && self.priority == other.priority
            && self.table == other.table
    }

    fn op(&self, replace: bool) -> Op {
        Op::Route {
            replace,
            dst: (self.dst.net_addr().into(), self.dst.prefix_len()),
            gateway: self.gateway.map(Into::into),
            oif: self.oif,
            onlink: self.onlink,
        }
    }

    fn message(&self) -> RouteMessage {
        let mut msg = RouteMessage::default();
        let h = &mut msg.header;
        h.address_family = N::FAMILY;
        h.destination_prefix_length = self.dst.prefix_len();
        h.table = u8::try_from(self.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        h.protocol = self.protocol;
        h.scope = RouteScope::Universe;
        h.kind = RouteType::Unicast;
        if self.onlink {
            h.flags |= RouteFlags::Onlink;
        }
        let a = &mut msg.attributes;
        a.push(RouteAttribute::Table(self.table));
        a.push(RouteAttribute::Destination(RouteAddress::from(
            self.dst.net_addr().into(),
        )));
        if let Some(gw) = self.gateway {
            a.push(RouteAttribute::Gateway(RouteAddress::from(gw.into())));
        }
        if let Some(oif) = self.oif {
            a.push(RouteAttribute::Oif(oif));
        }
        if self.priority != 0 {
            a.push(RouteAttribute::Priority(self.priority));
        }
        msg
    }

    fn delete_message(&self) -> RouteMessage {
        let mut msg = self.message();
        // Match any protocol and scope, so routes someone else added are found too.
        msg.header.protocol = RouteProtocol::Unspec;
        msg.header.scope = RouteScope::NoWhere;
        msg.header.flags = RouteFlags::empty();
        msg
    }
}

impl<N: Net> fmt::Display for Route<N> {
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
        if self.priority != N::DEFAULT_METRIC {
            write!(f, " metric {}", self.priority)?;
        }
        if self.table != RT_TABLE_MAIN {
            write!(f, " table {}", self.table)?;
        }
        Ok(())
    }
}

fn route_addr<N: Net>(a: &RouteAddress) -> Option<N::Addr> {
    match a {
        RouteAddress::Inet(ip) => N::addr_of(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => N::addr_of(IpAddr::V6(*ip)),
        _ => None,
    }
}

fn route_from_message<N: Net>(msg: &RouteMessage) -> Option<Route<N>> {
    if msg.header.address_family != N::FAMILY || msg.header.kind != RouteType::Unicast {
        return None;
    }
    let mut dst_ip = None;
    let mut gateway = None;
    let mut oif = None;
    let mut priority = 0;
    let mut table = u32::from(msg.header.table);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst_ip = route_addr::<N>(a),
            RouteAttribute::Gateway(a) => gateway = route_addr::<N>(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => priority = *p,
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    let dst_ip = match dst_ip {
        Some(ip) => ip,
        // The default route carries no destination.
        None if msg.header.destination_prefix_length == 0 => N::addr_of(match N::FAMILY {
            AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        })?,
        None => return None,
    };
    let dst = N::with_prefix(dst_ip, msg.header.destination_prefix_length)?;
    Some(Route {
        dst,
        gateway,
        oif,
        onlink: msg.header.flags.contains(RouteFlags::Onlink),
        priority,
        table,
        protocol: msg.header.protocol,
    })
}

/// The unicast routes of family `N` in table `table`, only those through device `oif` when
/// given. The kernel filters by table and device when strict checking is on; this filters
/// again, for kernels that ignore the filter.
pub async fn routes<N: Net>(
    h: &Handle,
    table: u32,
    oif: Option<u32>,
) -> Result<Vec<Route<N>>, NetlinkError> {
    let mut msg = RouteMessage::default();
    msg.header.address_family = N::FAMILY;
    msg.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    msg.attributes.push(RouteAttribute::Table(table));
    if let Some(oif) = oif {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let op = || match oif {
        Some(i) => format!("dump {} routes of ifindex {i}", N::NAME),
        None => format!("dump {} routes", N::NAME),
    };
    let mut h = h.clone();
    let mut stream = h.request(req).map_err(|e| NetlinkError::new(op(), e))?;
    let mut out = Vec::new();
    while let Some(msg) = stream.next().await {
        match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(m)) => {
                if let Some(r) = route_from_message::<N>(&m) {
                    if r.table == table && (oif.is_none() || r.oif == oif) {
                        out.push(r);
                    }
                }
            }
            NetlinkPayload::Error(e) if e.code.is_some() => {
                return Err(NetlinkError::new(op(), rtnetlink::Error::NetlinkError(e)));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Adds a route, or replaces the one with the same table, destination and metric
/// (`ip route replace`).
pub async fn replace_route<N: Net>(h: &Handle, route: &Route<N>) -> Result<(), NetlinkError> {
    h.route()
        .add(route.message())
        .replace()
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("replace route {route}"), e))
}

/// Deletes a route.
pub async fn delete_route<N: Net>(h: &Handle, route: &Route<N>) -> Result<(), NetlinkError> {
    h.route()
        .del(route.delete_message())
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("delete route {route}"), e))
}

// ---------------------------------------------------------------------------------------------
// Blackhole routes

/// A blackhole route of family `N` in the main table (`ip route add blackhole DST`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blackhole<N: Net> {
    pub dst: N,
    /// With the destination, what the kernel identifies the route by.
    pub priority: u32,
    pub protocol: RouteProtocol,
}

impl<N: Net> Blackhole<N> {
    /// Ours: our protocol number, the family's default metric.
    pub fn ours(dst: N) -> Self {
        Blackhole {
            dst,
            priority: N::DEFAULT_METRIC,
            protocol: ROUTE_PROTOCOL,
        }
    }

    fn message(&self) -> RouteMessage {
        let mut msg = RouteMessage::default();
        let h = &mut msg.header;
        h.address_family = N::FAMILY;
        h.destination_prefix_length = self.dst.prefix_len();
        h.table = RouteHeader::RT_TABLE_MAIN;
        h.protocol = self.protocol;
        h.scope = RouteScope::Universe;
        h.kind = RouteType::BlackHole;
        let a = &mut msg.attributes;
        a.push(RouteAttribute::Table(RT_TABLE_MAIN));
        a.push(RouteAttribute::Destination(RouteAddress::from(
            self.dst.net_addr().into(),
        )));
        if self.priority != 0 {
            a.push(RouteAttribute::Priority(self.priority));
        }
        msg
    }
}

fn blackhole_from_message<N: Net>(msg: &RouteMessage) -> Option<Blackhole<N>> {
    if msg.header.address_family != N::FAMILY || msg.header.kind != RouteType::BlackHole {
        return None;
    }
    let mut table = u32::from(msg.header.table);
    let mut dst = None;
    let mut priority = 0;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst = route_addr::<N>(a),
            RouteAttribute::Priority(p) => priority = *p,
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    if table != RT_TABLE_MAIN {
        return None;
    }
    Some(Blackhole {
        // A blackhole default route (no destination) is none of ours: skipped.
        dst: N::with_prefix(dst?, msg.header.destination_prefix_length)?,
        priority,
        protocol: msg.header.protocol,
    })
}

/// The blackhole routes of family `N` in the main table (with strict checking the kernel sends
/// only those; they are filtered again here).
pub async fn blackhole_routes<N: Net>(h: &Handle) -> Result<Vec<Blackhole<N>>, NetlinkError> {
    let mut msg = RouteMessage::default();
    msg.header.address_family = N::FAMILY;
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.kind = RouteType::BlackHole;
    msg.attributes.push(RouteAttribute::Table(RT_TABLE_MAIN));
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let op = || format!("dump {} blackhole routes", N::NAME);
    let mut h = h.clone();
    let mut stream = h.request(req).map_err(|e| NetlinkError::new(op(), e))?;
    let mut out = Vec::new();
    while let Some(msg) = stream.next().await {
        match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(m)) => {
                out.extend(blackhole_from_message::<N>(&m));
            }
            NetlinkPayload::Error(e) if e.code.is_some() => {
                return Err(NetlinkError::new(op(), rtnetlink::Error::NetlinkError(e)));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Adds a blackhole route; fails with "exists" when any route holds its destination and metric
/// (`ip route add`, never replacing).
pub async fn add_blackhole_route<N: Net>(
    h: &Handle,
    route: &Blackhole<N>,
) -> Result<(), NetlinkError> {
    h.route()
        .add(route.message())
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("add blackhole route {}", route.dst), e))
}

/// Deletes a blackhole route (of any protocol).
pub async fn delete_blackhole_route<N: Net>(
    h: &Handle,
    route: &Blackhole<N>,
) -> Result<(), NetlinkError> {
    h.route()
        .del(route.message())
        .execute()
        .await
        .map_err(|e| NetlinkError::new(format!("delete blackhole route {}", route.dst), e))
}

// ---------------------------------------------------------------------------------------------
// Neighbours (ARP / NDP) and FDB entries

/// One neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neigh<A> {
    pub ifindex: u32,
    pub dst: A,
    pub mac: Option<Mac>,
    pub permanent: bool,
}

fn neighbour_message(ifindex: u32, dst: IpAddr, mac: Option<Mac>) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = match dst {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    msg.header.ifindex = ifindex;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(dst)));
    if let Some(mac) = mac {
        msg.header.state = NeighbourState::Permanent;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    }
    msg
}

/// The neighbour entries of family `N` on device `ifindex` (filtered by the kernel via
/// `NDA_IFINDEX`).
pub async fn neighbours<N: Net>(
    h: &Handle,
    ifindex: u32,
) -> Result<Vec<Neigh<N::Addr>>, NetlinkError> {
    let mut req = h.neighbours().get().set_address_family(N::FAMILY);
    req.message_mut()
        .attributes
        .push(NeighbourAttribute::IfIndex(ifindex));
    let msgs: Vec<NeighbourMessage> = req.execute().try_collect().await.map_err(|e| {
        NetlinkError::new(
            format!("dump {} neighbours of ifindex {ifindex}", N::NAME),
            e,
        )
    })?;
    let mut out = Vec::new();
    for msg in msgs {
        if msg.header.ifindex != ifindex || msg.header.family != N::FAMILY {
            continue;
        }
        let mut dst = None;
        let mut mac = None;
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                    dst = N::addr_of(IpAddr::V4(*ip))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                    dst = N::addr_of(IpAddr::V6(*ip))
                }
                NeighbourAttribute::LinkLayerAddress(b) => mac = mac_from_bytes(b),
                _ => {}
            }
        }
        if let Some(dst) = dst {
            out.push(Neigh {
                ifindex,
                dst,
                mac,
                permanent: is_permanent(msg.header.state),
            });
        }
    }
    Ok(out)
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

fn fdb_message(ifindex: u32, mac: Mac, dst: Option<IpAddr>, add: bool) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = ifindex;
    msg.header.flags = NeighbourFlags::Own;
    if add {
        msg.header.state = NeighbourState::Permanent;
    }
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    if let Some(dst) = dst {
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(dst)));
    }
    msg
}

/// The FDB entries of device `ifindex`. With strict checking the kernel returns only that
/// port's entries; otherwise it sends all and this filters.
pub async fn fdb_entries(h: &Handle, ifindex: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = ifindex;
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let op = || format!("dump FDB entries of ifindex {ifindex}");
    let mut h = h.clone();
    let mut stream = h.request(req).map_err(|e| NetlinkError::new(op(), e))?;
    let mut out = Vec::new();
    while let Some(msg) = stream.next().await {
        let msg = match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)) => m,
            NetlinkPayload::Error(e) if e.code.is_some() => {
                return Err(NetlinkError::new(op(), rtnetlink::Error::NetlinkError(e)));
            }
            _ => continue,
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_know_their_networks() {
        let v4: Ipv4Network = "10.5.2.0/24".parse().unwrap();
        let v6: Ipv6Network = "fc00:0:0:2::/64".parse().unwrap();
        assert!(v4.within(&"10.5.0.0/16".parse().unwrap()));
        assert!(!"10.5.0.0/16".parse::<Ipv4Network>().unwrap().within(&v4));
        assert!(v6.within(&"fc00::/48".parse().unwrap()));
        assert_eq!(
            Ipv6Network::host(v6.net_addr()).to_string(),
            "fc00:0:0:2::/128"
        );
        assert!(Ipv6Network::is_link_local("fe80::1".parse().unwrap()));
        assert!(!Ipv6Network::is_link_local("fc00::1".parse().unwrap()));
    }

    /// An ack datagram as the kernel writes it: one `NLMSG_ERROR` per (sequence number,
    /// errno), each echoing the request's header.
    fn ack_datagram(acks: &[(u32, i32)]) -> Vec<u8> {
        let mut buf = Vec::new();
        for &(seq, errno) in acks {
            let mut err = rtnetlink::packet_core::ErrorMessage::default();
            err.code = std::num::NonZeroI32::new(-errno);
            err.header = vec![0; 16];
            let mut msg = NetlinkMessage::<RouteNetlinkMessage>::new(
                Default::default(),
                NetlinkPayload::Error(err),
            );
            msg.header.sequence_number = seq;
            msg.finalize();
            let start = buf.len();
            buf.resize(start + msg.buffer_len(), 0);
            msg.serialize(&mut buf[start..]);
        }
        buf
    }

    #[test]
    fn acks_are_matched_by_the_sequence_numbers_sent() {
        // Four changes sent with the numbers 41..=44 (the counter was not fresh). The first
        // change's ack was lost; the others come out of order, among an ack of an earlier
        // batch (7), a stray one (1000) and a repeat.
        let mut acks = Acks::new(4);
        for (index, seq) in (41..=44).enumerate() {
            acks.sent(index, seq);
        }
        let answered: Vec<_> = acks_in(&ack_datagram(&[
            (7, 0),
            (43, libc::EEXIST),
            (1000, libc::ENOENT),
            (42, 0),
        ]))
        .into_iter()
        .chain(acks_in(&ack_datagram(&[(44, 0), (42, libc::EINVAL)])))
        .filter_map(|(seq, code)| acks.answer(seq, code))
        .collect();
        assert_eq!(
            acks.into_answers(),
            vec![None, Some(0), Some(libc::EEXIST), Some(0)],
            "the lost ack leaves only the first change unanswered"
        );
        assert_eq!(answered, vec![2, 1, 3], "each of ours answered once");
    }

    #[test]
    fn sequence_numbers_wrap_without_confusing_acks() {
        let mut acks = Acks::new(3);
        for (index, seq) in [u32::MAX - 1, u32::MAX, 1].into_iter().enumerate() {
            acks.sent(index, seq);
        }
        for (seq, code) in acks_in(&ack_datagram(&[(1, libc::ENOENT), (u32::MAX - 1, 0)])) {
            acks.answer(seq, code);
        }
        assert_eq!(acks.into_answers(), vec![Some(0), None, Some(libc::ENOENT)]);
    }

    #[test]
    fn sent_messages_carry_the_recorded_numbers() {
        let route = Route4::new("10.5.2.0/24".parse().unwrap(), None, 7, false);
        let mut b = Batch::new();
        b.replace_route(&route);
        b.delete_route(&route);
        let mut datagram = Vec::new();
        for (msg, seq) in b.msgs.iter().zip([900, 901]) {
            append_message(&mut datagram, msg, seq);
        }
        let first = NetlinkBuffer::new_checked(&datagram[..]).unwrap();
        let len = first.length() as usize;
        assert_eq!(first.sequence_number(), 900);
        let second = NetlinkBuffer::new_checked(&datagram[len.next_multiple_of(4)..]).unwrap();
        assert_eq!(second.sequence_number(), 901);
    }

    #[test]
    fn ops_read_like_commands() {
        let r = Route6::new(
            "fc00:0:0:2::/64".parse().unwrap(),
            Some("fc00:0:0:2::".parse().unwrap()),
            7,
            true,
        );
        assert_eq!(
            r.op(true).to_string(),
            "replace route fc00:0:0:2::/64 via fc00:0:0:2:: ifindex 7 onlink"
        );
        let mut b = Batch::new();
        b.replace_fdb(7, [2, 0, 0, 0, 0, 1], "2001:db8::2".parse().unwrap());
        b.delete_neighbour(7, "10.5.2.0".parse().unwrap());
        assert_eq!(b.len(), 2);
        assert_eq!(
            b.ops()[0].to_string(),
            "replace FDB entry 02:00:00:00:00:01 dst 2001:db8::2 on ifindex 7"
        );
        assert_eq!(
            b.ops()[1].to_string(),
            "delete neighbour 10.5.2.0 on ifindex 7"
        );
    }
}
