//! The tunnel's UDP socket: large buffers, UDP GSO (`UDP_SEGMENT`) and GRO (`UDP_GRO`) when the
//! kernel has them, and batched `sendmmsg`/`recvmmsg` over preallocated message arrays. IPv4,
//! IPv6, or both on one IPv6 socket (IPv4 peers then appear as themselves, not as mapped
//! addresses).

use std::io;
use std::marker::PhantomData;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use bytes::BytesMut;
use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};

use super::device::poll_one;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Socket buffer size asked for (the kernel doubles it for bookkeeping).
const SOCK_BUF: usize = 16 << 20;
/// Largest UDP payload over IPv4.
pub const MAX_UDP_PAYLOAD: usize = 65507;
/// Most segments in one UDP GSO send (the kernel's `UDP_MAX_SEGMENTS` is 64 or more).
pub const MAX_GSO_SEGS: usize = 64;

/// The tunnel socket.
#[derive(Debug)]
pub struct UdpSock {
    sock: Socket,
    /// `UDP_SEGMENT` works: one send may carry many equal-sized datagrams.
    pub gso: bool,
    /// `UDP_GRO` is on: one receive may return many datagrams of one sender, back to back.
    pub gro: bool,
    pub local: SocketAddr,
    /// An `AF_INET6` socket: addresses are `sockaddr_in6`, IPv4 ones mapped.
    v6: bool,
}

impl UdpSock {
    /// Binds the tunnel socket to `addr` (an IPv6 address: IPv6 only); with `offload`, turns
    /// on UDP GSO/GRO where possible.
    pub fn bind(addr: impl Into<SocketAddr>, offload: bool) -> io::Result<UdpSock> {
        Self::bind_with(addr.into(), true, offload)
    }

    /// One socket on `port` of every address of both families (IPv6 with `IPV6_V6ONLY` off).
    pub fn bind_dual_stack(port: u16, offload: bool) -> io::Result<UdpSock> {
        let any = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0);
        Self::bind_with(any.into(), false, offload)
    }

    fn bind_with(addr: SocketAddr, v6_only: bool, offload: bool) -> io::Result<UdpSock> {
        let v6 = addr.is_ipv6();
        let sock = Socket::new(
            if v6 { Domain::IPV6 } else { Domain::IPV4 },
            Type::DGRAM.nonblocking().cloexec(),
            Some(Protocol::UDP),
        )?;
        if v6 {
            sock.set_only_v6(v6_only)?;
        }
        sock.bind(&addr.into())?;
        // Forced sizes (root) go past net.core.[rw]mem_max; fall back to the capped ones.
        if setsockopt(&sock, sockopt::RcvBufForce, &SOCK_BUF).is_err() {
            let _ = sock.set_recv_buffer_size(SOCK_BUF);
        }
        if setsockopt(&sock, sockopt::SndBufForce, &SOCK_BUF).is_err() {
            let _ = sock.set_send_buffer_size(SOCK_BUF);
        }
        let (gso, gro) = if offload {
            (
                // A segment size of 0 only probes that the kernel has UDP_SEGMENT.
                setsockopt(&sock, sockopt::UdpGsoSegment, &0).is_ok(),
                setsockopt(&sock, sockopt::UdpGroSegment, &true).is_ok(),
            )
        } else {
            (false, false)
        };
        let local = sock
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("socket has no IP address"))?;
        Ok(UdpSock {
            sock,
            gso,
            gro,
            local,
            v6,
        })
    }

    /// Sends one datagram (ICMP-free control paths, tests).
    pub fn send_to(&self, buf: &[u8], to: impl Into<SocketAddr>) -> io::Result<usize> {
        let (addr, len) = sockaddr(to.into(), self.v6);
        // SAFETY: `addr` holds a valid socket address of `len` bytes; `buf` is readable.
        let r = unsafe {
            libc::sendto(
                self.sock.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&addr as *const SockAddr).cast(),
                len,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    pub fn wait(&self, events: libc::c_short, timeout_ms: i32) -> io::Result<bool> {
        poll_one(self.sock.as_raw_fd(), events, timeout_ms)
    }

    /// Receives up to `batch.capacity()` datagrams; `WouldBlock` when none is queued.
    pub fn recv_batch<B: RecvBuf>(&self, batch: &mut RecvBatch<B>) -> io::Result<usize> {
        let n = batch.bufs.len();
        let size = batch.buf_size;
        for i in 0..n {
            batch.iovs[i] = libc::iovec {
                iov_base: batch.bufs[i].target(size).cast(),
                iov_len: size,
            };
            // SAFETY: mmsghdr is plain old data; all zeroes is a valid value.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (&mut batch.addrs[i] as *mut SockAddr).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<SockAddr>() as libc::socklen_t;
            m.msg_hdr.msg_iov = &mut batch.iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = batch.cmsgs[i].0.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = batch.cmsgs[i].0.len() as _;
            batch.msgs[i] = m;
        }
        // SAFETY: every mmsghdr points at live buffers, addresses and control buffers owned
        // by `batch`, which outlives the call.
        let r = unsafe {
            libc::recvmmsg(
                self.sock.as_raw_fd(),
                batch.msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = r as usize;
        for i in 0..r {
            let m = &batch.msgs[i];
            let a = &batch.addrs[i];
            batch.meta[i] = RecvMeta {
                len: m.msg_len as usize,
                from: from_sockaddr(a),
                seg_size: gro_segment_size(&m.msg_hdr).unwrap_or(0),
                truncated: m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            };
        }
        Ok(r)
    }
}

/// The `UDP_GRO` control message of a received message: the size of its segments.
fn gro_segment_size(hdr: &libc::msghdr) -> Option<usize> {
    // SAFETY: `hdr` was filled by recvmmsg; CMSG_* walk its control buffer within
    // `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                return usize::try_from(data.read_unaligned()).ok();
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    None
}

/// What one received message was.
#[derive(Debug, Clone, Copy)]
pub struct RecvMeta {
    pub len: usize,
    pub from: SocketAddr,
    /// Size of the coalesced segments (GRO); 0 for a single datagram.
    pub seg_size: usize,
    pub truncated: bool,
}

#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct CmsgBuf([u8; 64]);

/// A buffer `recvmmsg` writes one message into.
pub trait RecvBuf {
    /// A fresh buffer for messages of up to `size` bytes.
    fn with_size(size: usize) -> Self;
    /// Where the next message goes: `size` writable bytes.
    fn target(&mut self, size: usize) -> *mut u8;
}

/// A buffer reused in place: the message is read where it landed and overwritten by the next.
impl RecvBuf for Vec<u8> {
    fn with_size(size: usize) -> Self {
        vec![0u8; size]
    }

    fn target(&mut self, size: usize) -> *mut u8 {
        self.resize(size, 0);
        self.as_mut_ptr()
    }
}

/// A buffer whose messages are taken away whole (`RecvBatch::take`) and cut into owned
/// datagrams without a copy; the space is reused once every piece of it is dropped.
impl RecvBuf for BytesMut {
    fn with_size(size: usize) -> Self {
        BytesMut::with_capacity(size)
    }

    fn target(&mut self, size: usize) -> *mut u8 {
        self.clear();
        // Reclaims the allocation when the datagrams cut from it are gone; a new one otherwise.
        self.reserve(size);
        self.spare_capacity_mut().as_mut_ptr().cast()
    }
}

/// Preallocated receive state for `recvmmsg`.
pub struct RecvBatch<B: RecvBuf = Vec<u8>> {
    pub bufs: Vec<B>,
    pub meta: Vec<RecvMeta>,
    buf_size: usize,
    msgs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<SockAddr>,
    cmsgs: Vec<CmsgBuf>,
}

impl RecvBatch<BytesMut> {
    /// Message `i` of the last receive, taken out of its buffer (which keeps the rest of
    /// its space for the next receive).
    pub fn take(&mut self, i: usize) -> BytesMut {
        let len = self.meta[i].len.min(self.buf_size);
        let buf = &mut self.bufs[i];
        // SAFETY: `target` reserved `buf_size` bytes past the (cleared) start of `buf` and
        // recvmmsg wrote the message's `len` bytes there; `len` is capped at that size.
        unsafe { buf.set_len(len) };
        buf.split()
    }
}

impl<B: RecvBuf> RecvBatch<B> {
    pub fn new(count: usize, buf_size: usize) -> Self {
        // SAFETY: these libc structs are plain old data; all zeroes is a valid value.
        let (msg, iov, addr) = unsafe {
            (
                std::mem::zeroed::<libc::mmsghdr>(),
                std::mem::zeroed::<libc::iovec>(),
                std::mem::zeroed::<SockAddr>(),
            )
        };
        RecvBatch {
            bufs: (0..count).map(|_| B::with_size(buf_size)).collect(),
            buf_size,
            meta: vec![
                RecvMeta {
                    len: 0,
                    from: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0).into(),
                    seg_size: 0,
                    truncated: false,
                };
                count
            ],
            msgs: vec![msg; count],
            iovs: vec![iov; count],
            addrs: vec![addr; count],
            cmsgs: vec![CmsgBuf([0; 64]); count],
        }
    }
}

/// Counts of one send batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendStats {
    pub packets: u64,
    pub bytes: u64,
    pub failed: u64,
    pub syscalls: u64,
    /// A UDP GSO send failed for want of support on the route: stop using GSO.
    pub gso_refused: bool,
}

#[derive(Debug, Clone, Copy)]
struct MsgMeta {
    to: SocketAddr,
    /// First iovec; each packet takes two (header part, rest).
    iov_start: usize,
    packets: usize,
    bytes: usize,
    /// Size of the first packet: every packet but the last of a GSO message has it.
    seg_size: usize,
    /// A shorter packet ended the message.
    closed: bool,
}

/// Preallocated send state, reused from batch to batch.
pub struct SendStorage {
    msgs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<SockAddr>,
    cmsgs: Vec<CmsgBuf>,
    meta: Vec<MsgMeta>,
    max_msgs: usize,
    max_iovs: usize,
}

impl SendStorage {
    pub fn new(max_msgs: usize, max_iovs: usize) -> Self {
        // SAFETY: these libc structs are plain old data; all zeroes is a valid value.
        let (msg, addr) = unsafe {
            (
                std::mem::zeroed::<libc::mmsghdr>(),
                std::mem::zeroed::<SockAddr>(),
            )
        };
        SendStorage {
            msgs: vec![msg; max_msgs],
            iovs: Vec::with_capacity(max_iovs),
            addrs: vec![addr; max_msgs],
            cmsgs: vec![CmsgBuf([0; 64]); max_msgs],
            meta: Vec::with_capacity(max_msgs),
            max_msgs,
            max_iovs: max_iovs.max(2),
        }
    }

    /// Starts a batch of packets whose bytes live for `'a`.
    pub fn batch<'a, 's>(&'s mut self, sock: &'s UdpSock, gso: bool) -> SendBatch<'a, 's> {
        self.iovs.clear();
        self.meta.clear();
        SendBatch {
            st: self,
            sock,
            gso,
            stats: SendStats::default(),
            _bytes: PhantomData,
        }
    }
}

/// One batch of datagrams being gathered; consecutive equal-sized packets to the same peer
/// share one UDP GSO message. Sent when full and by [`SendBatch::finish`].
pub struct SendBatch<'a, 's> {
    st: &'s mut SendStorage,
    sock: &'s UdpSock,
    gso: bool,
    stats: SendStats,
    _bytes: PhantomData<&'a [u8]>,
}

impl<'a> SendBatch<'a, '_> {
    /// Queues one datagram made of `head` followed by `rest`.
    pub fn push(&mut self, to: impl Into<SocketAddr>, head: &'a [u8], rest: &'a [u8]) {
        let to = to.into();
        let len = head.len() + rest.len();
        let joins = self.gso
            && self.st.meta.last().is_some_and(|m| {
                m.to == to
                    && !m.closed
                    && len <= m.seg_size
                    && m.packets < MAX_GSO_SEGS
                    && m.bytes + len <= MAX_UDP_PAYLOAD
            });
        if !joins && self.st.meta.len() == self.st.max_msgs {
            self.flush();
        }
        if self.st.iovs.len() + 2 > self.st.max_iovs {
            self.flush();
            return self.push(to, head, rest);
        }
        self.st.iovs.push(libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        });
        self.st.iovs.push(libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        });
        if joins {
            let m = self.st.meta.last_mut().expect("checked above");
            m.packets += 1;
            m.bytes += len;
            m.closed = len < m.seg_size;
        } else {
            self.st.meta.push(MsgMeta {
                to,
                iov_start: self.st.iovs.len() - 2,
                packets: 1,
                bytes: len,
                seg_size: len,
                closed: false,
            });
        }
    }

    /// Sends everything queued; returns the batch's counts.
    pub fn finish(mut self) -> SendStats {
        self.flush();
        self.stats
    }

    fn flush(&mut self) {
        let n = self.st.meta.len();
        if n == 0 {
            return;
        }
        for i in 0..n {
            let m = self.st.meta[i];
            let (addr, len) = sockaddr(m.to, self.sock.v6);
            self.st.addrs[i] = addr;
            // SAFETY: mmsghdr is plain old data; all zeroes is a valid value.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&mut self.st.addrs[i] as *mut SockAddr).cast();
            h.msg_hdr.msg_namelen = len;
            h.msg_hdr.msg_iov = self.st.iovs[m.iov_start..].as_mut_ptr();
            h.msg_hdr.msg_iovlen = m.packets * 2;
            if m.packets > 1 {
                set_segment_cmsg(&mut h.msg_hdr, &mut self.st.cmsgs[i], m.seg_size as u16);
            }
            self.st.msgs[i] = h;
        }
        let mut done = 0;
        while done < n {
            // SAFETY: messages `done..n` point at iovecs, addresses and control buffers in
            // `self.st`, and the iovecs at bytes borrowed for `'a`; all outlive the call.
            let r = unsafe {
                libc::sendmmsg(
                    self.sock.sock.as_raw_fd(),
                    self.st.msgs[done..].as_mut_ptr(),
                    (n - done) as libc::c_uint,
                    0,
                )
            };
            self.stats.syscalls += 1;
            if r > 0 {
                for m in &self.st.meta[done..done + r as usize] {
                    self.stats.packets += m.packets as u64;
                    self.stats.bytes += m.bytes as u64;
                }
                done += r as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    // Socket buffer full: wait for room rather than drop.
                    let _ = self.sock.wait(libc::POLLOUT, 100);
                }
                _ => {
                    let m = self.st.meta[done];
                    if m.packets > 1 && matches!(err.raw_os_error(), Some(libc::EIO | libc::EINVAL))
                    {
                        // The route cannot do UDP GSO: send this message's packets one by one.
                        if self.gso {
                            tracing::warn!(
                                "udp: UDP GSO send to {} failed ({err}); sending datagrams singly",
                                m.to
                            );
                        }
                        self.gso = false;
                        self.stats.gso_refused = true;
                        self.send_singly(done);
                    } else {
                        self.stats.failed += m.packets as u64;
                    }
                    done += 1;
                }
            }
        }
        self.st.iovs.clear();
        self.st.meta.clear();
    }

    fn send_singly(&mut self, msg: usize) {
        let m = self.st.meta[msg];
        let (addr, len) = sockaddr(m.to, self.sock.v6);
        for p in 0..m.packets {
            let iov = &self.st.iovs[m.iov_start + 2 * p..m.iov_start + 2 * p + 2];
            // SAFETY: msghdr is plain old data; all zeroes is a valid value.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_name = (&addr as *const SockAddr as *mut SockAddr).cast();
            h.msg_namelen = len;
            h.msg_iov = iov.as_ptr() as *mut libc::iovec;
            h.msg_iovlen = 2;
            // SAFETY: the header points at two live iovecs and an address on the stack.
            let r = unsafe { libc::sendmsg(self.sock.sock.as_raw_fd(), &h, 0) };
            self.stats.syscalls += 1;
            if r < 0 {
                self.stats.failed += 1;
            } else {
                self.stats.packets += 1;
                self.stats.bytes += r as u64;
            }
        }
    }
}

/// Room for a socket address of either family, as the kernel reads and writes them.
#[repr(C)]
#[derive(Clone, Copy)]
union SockAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

/// `a` as the kernel takes it on a socket of the given family (an IPv4 address on an IPv6
/// socket is mapped, `::ffff:a.b.c.d`), with its length.
fn sockaddr(a: SocketAddr, v6_socket: bool) -> (SockAddr, libc::socklen_t) {
    // SAFETY: both variants are plain old data; all zeroes is a valid value.
    let mut s: SockAddr = unsafe { std::mem::zeroed() };
    let v6 = match a {
        SocketAddr::V4(a) if !v6_socket => {
            let v4 = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            s.v4 = v4;
            return (
                s,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
        }
        SocketAddr::V4(a) => SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0),
        // An IPv6 address on an IPv4 socket: the kernel refuses it (EAFNOSUPPORT), counted
        // as a failed send.
        SocketAddr::V6(a) => a,
    };
    s.v6 = libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: v6.port().to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: v6.ip().octets(),
        },
        sin6_scope_id: v6.scope_id(),
    };
    (
        s,
        std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
    )
}

/// The sender's address as recvmmsg wrote it; a mapped IPv4 address is given as IPv4.
fn from_sockaddr(a: &SockAddr) -> SocketAddr {
    // SAFETY: the family field sits at the same place in both variants, and the kernel
    // wrote the variant that family names (zeroed storage reads as AF_UNSPEC).
    unsafe {
        if i32::from(a.v4.sin_family) == libc::AF_INET6 {
            let v6 = a.v6;
            let ip = Ipv6Addr::from(v6.sin6_addr.s6_addr);
            let port = u16::from_be(v6.sin6_port);
            match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddrV4::new(v4, port).into(),
                None => SocketAddrV6::new(ip, port, 0, v6.sin6_scope_id).into(),
            }
        } else {
            let v4 = a.v4;
            SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)),
                u16::from_be(v4.sin_port),
            )
            .into()
        }
    }
}

/// Attaches a `UDP_SEGMENT` control message with `size` to `hdr`, in `buf`.
fn set_segment_cmsg(hdr: &mut libc::msghdr, buf: &mut CmsgBuf, size: u16) {
    hdr.msg_control = buf.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    hdr.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as _;
    // SAFETY: the control buffer is 64 aligned bytes, more than CMSG_SPACE(2); CMSG_FIRSTHDR
    // and CMSG_DATA stay within it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(hdr);
        (*c).cmsg_level = SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        libc::CMSG_DATA(c).cast::<u16>().write_unaligned(size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::getsockopt;

    #[test]
    fn bind_turns_on_the_offloads_and_large_buffers_it_reports() {
        let loopback = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
        let offload = UdpSock::bind(loopback, true).unwrap();
        assert!(
            offload.gso && offload.gro,
            "this kernel has UDP GSO and GRO"
        );
        assert!(getsockopt(&offload.sock, sockopt::UdpGroSegment).unwrap());
        if nix::unistd::geteuid().is_root() {
            // Forced past rmem_max; the kernel reports twice what was asked.
            assert_eq!(
                getsockopt(&offload.sock, sockopt::RcvBuf).unwrap(),
                2 * SOCK_BUF
            );
        }
        let plain = UdpSock::bind(loopback, false).unwrap();
        assert!(!plain.gso && !plain.gro);
        assert!(!getsockopt(&plain.sock, sockopt::UdpGroSegment).unwrap());
    }

    /// Receives one datagram on `sock` (polling up to a second): its bytes and sender.
    fn recv_one(sock: &UdpSock) -> (Vec<u8>, SocketAddr) {
        let mut rb = RecvBatch::<Vec<u8>>::new(1, 2048);
        assert!(sock.wait(libc::POLLIN, 1000).unwrap(), "a datagram arrives");
        assert_eq!(sock.recv_batch(&mut rb).unwrap(), 1);
        (rb.bufs[0][..rb.meta[0].len].to_vec(), rb.meta[0].from)
    }

    /// Receives the one datagram `tx` sends next into `rb`, taken out whole.
    fn take_next(
        tx: &UdpSock,
        rx: &UdpSock,
        rb: &mut RecvBatch<BytesMut>,
        what: &[u8],
    ) -> BytesMut {
        tx.send_to(what, rx.local).unwrap();
        assert!(rx.wait(libc::POLLIN, 1000).unwrap(), "a datagram arrives");
        assert_eq!(rx.recv_batch(rb).unwrap(), 1);
        rb.take(0)
    }

    #[test]
    fn taken_datagrams_stay_intact_and_their_space_is_reused_once_dropped() {
        let lo = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
        let (tx, rx) = (
            UdpSock::bind(lo, false).unwrap(),
            UdpSock::bind(lo, false).unwrap(),
        );
        let mut rb = RecvBatch::<BytesMut>::new(1, 2048);
        let first = take_next(&tx, &rx, &mut rb, b"first");
        // Still held: the next receive must not land on it.
        let second = take_next(&tx, &rx, &mut rb, b"second");
        assert_eq!((&first[..], &second[..]), (&b"first"[..], &b"second"[..]));
        let second_at = second.as_ptr();
        drop((first, second));
        let third = take_next(&tx, &rx, &mut rb, b"third");
        assert_eq!(&third[..], b"third");
        assert_eq!(
            third.as_ptr(),
            second_at,
            "the buffer's space was reclaimed, not reallocated"
        );
    }

    #[test]
    fn ipv6_and_dual_stack_sockets_batch_to_and_from_either_family() {
        let v6_only = UdpSock::bind(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0, 0, 0), true).unwrap();
        let dual = UdpSock::bind_dual_stack(0, true).unwrap();
        let v4 = UdpSock::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), true).unwrap();
        let port = dual.local.port();
        let dual_v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        let dual_v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut storage = SendStorage::new(8, 16);

        let mut batch = storage.batch(&v6_only, v6_only.gso);
        batch.push(dual_v6, b"over v6", &[]);
        assert_eq!(batch.finish().packets, 1);
        let (got, from) = recv_one(&dual);
        assert_eq!((got.as_slice(), from), (&b"over v6"[..], v6_only.local));

        v4.send_to(b"over v4", dual_v4).unwrap();
        let (got, from) = recv_one(&dual);
        // Not ::ffff:127.0.0.1: an IPv4 sender is shown as one.
        assert_eq!((got.as_slice(), from), (&b"over v4"[..], v4.local));

        // The dual-stack socket answers both, the IPv4 one through a mapped address.
        let mut batch = storage.batch(&dual, dual.gso);
        batch.push(v4.local, b"back v4", &[]);
        batch.push(v6_only.local, b"back v6", &[]);
        assert_eq!(batch.finish().packets, 2);
        assert_eq!(recv_one(&v4).0, b"back v4");
        assert_eq!(recv_one(&v6_only).0, b"back v6");

        // An IPv6 destination on an IPv4 socket fails, counted, not sent elsewhere.
        let mut batch = storage.batch(&v4, v4.gso);
        batch.push(dual_v6, b"nowhere", &[]);
        assert_eq!(batch.finish().failed, 1);
    }
}
