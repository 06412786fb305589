//! The tunnel's UDP socket: large buffers, UDP GSO (`UDP_SEGMENT`) and GRO (`UDP_GRO`) when the
//! kernel has them, and batched `sendmmsg`/`recvmmsg` over preallocated message arrays.

use std::io;
use std::marker::PhantomData;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;

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
    pub local: SocketAddrV4,
}

impl UdpSock {
    /// Binds the tunnel socket to `addr`; with `offload`, turns on UDP GSO/GRO where possible.
    pub fn bind(addr: SocketAddrV4, offload: bool) -> io::Result<UdpSock> {
        let sock = Socket::new(
            Domain::IPV4,
            Type::DGRAM.nonblocking().cloexec(),
            Some(Protocol::UDP),
        )?;
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
            .as_socket_ipv4()
            .ok_or_else(|| io::Error::other("socket has no IPv4 address"))?;
        Ok(UdpSock {
            sock,
            gso,
            gro,
            local,
        })
    }

    /// Sends one datagram (ICMP-free control paths, tests).
    pub fn send_to(&self, buf: &[u8], to: SocketAddrV4) -> io::Result<usize> {
        self.sock.send_to(buf, &to.into())
    }

    pub fn wait(&self, events: libc::c_short, timeout_ms: i32) -> io::Result<bool> {
        poll_one(self.sock.as_raw_fd(), events, timeout_ms)
    }

    /// Receives up to `batch.capacity()` datagrams; `WouldBlock` when none is queued.
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        let n = batch.bufs.len();
        for i in 0..n {
            batch.iovs[i] = libc::iovec {
                iov_base: batch.bufs[i].as_mut_ptr().cast(),
                iov_len: batch.bufs[i].len(),
            };
            // SAFETY: mmsghdr is plain old data; all zeroes is a valid value.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (&mut batch.addrs[i] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
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
                from: SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                ),
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
    pub from: SocketAddrV4,
    /// Size of the coalesced segments (GRO); 0 for a single datagram.
    pub seg_size: usize,
    pub truncated: bool,
}

#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct CmsgBuf([u8; 64]);

/// Preallocated receive state for `recvmmsg`.
pub struct RecvBatch {
    pub bufs: Vec<Vec<u8>>,
    pub meta: Vec<RecvMeta>,
    msgs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in>,
    cmsgs: Vec<CmsgBuf>,
}

impl RecvBatch {
    pub fn new(count: usize, buf_size: usize) -> Self {
        // SAFETY: these libc structs are plain old data; all zeroes is a valid value.
        let (msg, iov, addr) = unsafe {
            (
                std::mem::zeroed::<libc::mmsghdr>(),
                std::mem::zeroed::<libc::iovec>(),
                std::mem::zeroed::<libc::sockaddr_in>(),
            )
        };
        RecvBatch {
            bufs: (0..count).map(|_| vec![0u8; buf_size]).collect(),
            meta: vec![
                RecvMeta {
                    len: 0,
                    from: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
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
    to: SocketAddrV4,
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
    addrs: Vec<libc::sockaddr_in>,
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
                std::mem::zeroed::<libc::sockaddr_in>(),
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
    pub fn push(&mut self, to: SocketAddrV4, head: &'a [u8], rest: &'a [u8]) {
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
            self.st.addrs[i] = sockaddr(m.to);
            // SAFETY: mmsghdr is plain old data; all zeroes is a valid value.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&mut self.st.addrs[i] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
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
        let addr = sockaddr(m.to);
        for p in 0..m.packets {
            let iov = &self.st.iovs[m.iov_start + 2 * p..m.iov_start + 2 * p + 2];
            // SAFETY: msghdr is plain old data; all zeroes is a valid value.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_name = (&addr as *const libc::sockaddr_in as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
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

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all zeroes is a valid value.
    let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    s
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
}
