//! A small-packet generator and sink for packets-per-second figures, run inside the pod
//! namespaces by `flannel-bench udp` (`ip netns exec … flannel-bench blast-send|blast-recv`).
//!
//! iperf3 sends one datagram per system call and timestamps each one, so with 64-byte
//! datagrams the sender and receiver themselves are the bottleneck on a small machine and
//! every data path measures alike. These two batch 64 datagrams per `sendmmsg`/`recvmmsg`,
//! so what is measured is the path between them.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Datagrams per system call.
const BATCH: usize = 64;

fn arg<'a>(args: &'a [String], name: &str) -> Result<&'a str, String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .ok_or(format!("{name} is required"))
}

fn parse<T: std::str::FromStr>(args: &[String], name: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let v = arg(args, name)?;
    v.parse().map_err(|e| format!("{name} {v:?}: {e}"))
}

fn report(r: Result<String, String>, what: &str) -> i32 {
    match r {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(e) => {
            eprintln!("flannel-bench {what}: {e}");
            1
        }
    }
}

/// `blast-send --to IP:PORT --secs N --len BYTES`: sends for N seconds; prints the count.
pub fn send_main(args: &[String]) -> i32 {
    report(send(args), "blast-send")
}

/// `blast-recv --bind IP:PORT --secs N`: counts datagrams until 0.5 s pass without one (or
/// N seconds after the first); prints the count.
pub fn recv_main(args: &[String]) -> i32 {
    report(recv(args), "blast-recv")
}

/// One message header per I/O vector, each over that one vector.
fn messages_over(iovs: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iovs.iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain old data; all zeroes is a valid value.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect()
}

fn send(args: &[String]) -> Result<String, String> {
    let to: SocketAddrV4 = parse(args, "--to")?;
    let secs: f64 = parse(args, "--secs")?;
    let len: usize = parse(args, "--len")?;
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
    sock.connect(SocketAddr::V4(to))
        .map_err(|e| format!("connect {to}: {e}"))?;
    let payload = vec![0x5au8; len];
    let mut iovs: Vec<libc::iovec> = (0..BATCH)
        .map(|_| libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: len,
        })
        .collect();
    let mut msgs = messages_over(&mut iovs);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut sent: u64 = 0;
    while Instant::now() < deadline {
        // SAFETY: every message points at one iovec over `payload`; all outlive the call.
        let r = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                0,
            )
        };
        if r > 0 {
            sent += r as u64;
        } else {
            let e = std::io::Error::last_os_error();
            // A full device queue on the way out; the count of what arrives is the figure.
            if !matches!(
                e.raw_os_error(),
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR | libc::ECONNREFUSED)
            ) {
                return Err(format!("sendmmsg to {to}: {e}"));
            }
        }
    }
    Ok(format!("sent {sent}"))
}

fn recv(args: &[String]) -> Result<String, String> {
    let bind: SocketAddrV4 = parse(args, "--bind")?;
    let secs: f64 = parse(args, "--secs")?;
    let sock = UdpSocket::bind(SocketAddr::V4(bind)).map_err(|e| format!("bind {bind}: {e}"))?;
    // Best effort: a smaller buffer only means more drops at the receiver, which the caller
    // also counts.
    let _ =
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &(16 << 20));
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let mut bufs = vec![[0u8; 2048]; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut msgs = messages_over(&mut iovs);
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    let mut got: u64 = 0;
    loop {
        // SAFETY: every message points at one iovec over a live buffer of `bufs`.
        let r = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if r > 0 {
            got += r as u64;
            let t = *first.get_or_insert_with(Instant::now);
            if t.elapsed().as_secs_f64() > secs {
                break;
            }
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) if first.is_some() => break,
            Some(libc::EAGAIN) if start.elapsed().as_secs_f64() < secs + 10.0 => continue,
            _ => return Err(format!("recvmmsg on {bind}: {e}")),
        }
    }
    Ok(format!("received {got}"))
}
