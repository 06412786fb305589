//! Traffic between namespaces: ping runs, TCP transfers with a checksum, tiny HTTP GET.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::hash::{fnv1a as fnv, FNV_OFFSET};
use crate::{cmd, Error, Pod, Result};

/// What a ping run counted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingStats {
    pub transmitted: u32,
    pub received: u32,
    /// Average round trip in milliseconds, when any reply came back.
    pub avg_rtt_ms: Option<f64>,
}

impl PingStats {
    pub fn lost(&self) -> u32 {
        self.transmitted.saturating_sub(self.received)
    }

    /// Lost share in percent (100 when nothing was sent).
    pub fn loss_percent(&self) -> f64 {
        if self.transmitted == 0 {
            100.0
        } else {
            100.0 * f64::from(self.lost()) / f64::from(self.transmitted)
        }
    }

    pub fn all_received(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }
}

impl std::fmt::Display for PingStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} sent, {} received, {} lost ({:.2}%)",
            self.transmitted,
            self.received,
            self.lost(),
            self.loss_percent()
        )
    }
}

/// Parses iputils ping's summary line `N packets transmitted, M received, ...`.
pub fn parse_ping(out: &str) -> Option<PingStats> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(',')
        .map(|part| part.split_whitespace().next().and_then(|n| n.parse().ok()));
    let avg_rtt_ms = out
        .lines()
        .find(|l| l.starts_with("rtt ") || l.starts_with("round-trip"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok());
    Some(PingStats {
        transmitted: nums.next()??,
        received: nums.next()??,
        avg_rtt_ms,
    })
}

/// A `ping` running in the background (`-q`, so only the summary is printed).
#[derive(Debug)]
pub struct PingRun {
    child: Option<Child>,
    started: Instant,
    what: String,
}

impl PingRun {
    /// `base` is a command that runs `ping` (e.g. inside a namespace).
    pub fn start(mut base: Command, dst: Ipv4Addr, interval: Duration) -> Result<PingRun> {
        let interval = format!("{:.3}", interval.as_secs_f64());
        base.args(["-n", "-q", "-i", &interval, "-W", "1", &dst.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = cmd::show(&base);
        let child = base.spawn().map_err(|e| Error::io(what.clone(), e))?;
        Ok(PingRun {
            child: Some(child),
            started: Instant::now(),
            what,
        })
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// SIGINT, then the summary.
    pub fn stop(mut self) -> Result<PingStats> {
        let child = self.child.take().expect("running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
        let out = child
            .wait_with_output()
            .map_err(|e| Error::io(self.what.clone(), e))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        parse_ping(&stdout).ok_or_else(|| Error::Command {
            cmd: self.what.clone(),
            status: out.status.to_string(),
            stderr: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
        })
    }
}

impl Drop for PingRun {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Result of [`tcp_transfer`].
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub bytes: u64,
    pub checksum: u64,
    pub elapsed: Duration,
}

impl Transfer {
    pub fn mbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64().max(1e-9) / 1e6
    }
}

/// Fills `buf` from the xorshift64 generator whose state is `x` (not zero): bytes that do not
/// compress and are cheap to make.
pub fn fill_pseudo_random(x: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// Accepts one connection on `l` within `timeout` (polling: the listener is made
/// non-blocking); the stream it returns blocks.
fn accept_within(l: &TcpListener, timeout: Duration) -> Result<TcpStream> {
    l.set_nonblocking(true)
        .map_err(|e| Error::io("nonblocking", e))?;
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((st, _)) => {
                st.set_nonblocking(false)
                    .map_err(|e| Error::io("socket options", e))?;
                return Ok(st);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let at = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    return Err(Error::Other(format!(
                        "no connection to {at} within {timeout:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(Error::io("accept", e)),
        }
    }
}

/// The receiving side of a transfer: reads `st` to its end, counting and hashing, then sends
/// the receipt (count and hash) back. Also returns the longest wait between two reads.
fn receive_and_acknowledge(
    st: &mut TcpStream,
    at: impl Into<IpAddr>,
) -> Result<(u64, u64, Duration)> {
    let at = at.into();
    let mut buf = vec![0u8; 64 * 1024];
    let (mut n, mut h) = (0u64, FNV_OFFSET);
    let mut last = Instant::now();
    let mut stall = Duration::ZERO;
    loop {
        let r = st
            .read(&mut buf)
            .map_err(|e| Error::io(format!("receiving at {at} after {n} bytes"), e))?;
        stall = stall.max(last.elapsed());
        last = Instant::now();
        if r == 0 {
            break;
        }
        n += r as u64;
        h = fnv(h, &buf[..r]);
    }
    let mut reply = [0u8; 16];
    reply[..8].copy_from_slice(&n.to_be_bytes());
    reply[8..].copy_from_slice(&h.to_be_bytes());
    st.write_all(&reply)
        .map_err(|e| Error::io("sending the receipt", e))?;
    Ok((n, h, stall))
}

/// Ends the sending side of a transfer and checks the receiver's receipt (bytes and hash)
/// against what was sent.
fn finish_and_check(st: &mut TcpStream, addr: SocketAddr, sent: u64, h: u64) -> Result<(u64, u64)> {
    st.shutdown(Shutdown::Write)
        .map_err(|e| Error::io("shutdown", e))?;
    let mut reply = [0u8; 16];
    st.read_exact(&mut reply)
        .map_err(|e| Error::io(format!("reading the receipt from {addr}"), e))?;
    let n = u64::from_be_bytes(reply[..8].try_into().expect("8 bytes"));
    let rh = u64::from_be_bytes(reply[8..].try_into().expect("8 bytes"));
    if n != sent || rh != h {
        return Err(Error::Other(format!(
            "{addr} received {n} bytes (hash {rh:016x}); sent {sent} (hash {h:016x})"
        )));
    }
    Ok((n, h))
}

/// Sends `bytes` pseudo-random bytes over TCP from pod `from` to a listener in pod `to` (both on
/// threads that entered the pods' namespaces). The receiver counts and hashes what it got and
/// sends both back; they must match what was sent.
pub fn tcp_transfer(from: &Pod, to: &Pod, bytes: u64) -> Result<Transfer> {
    tcp_transfer_to(from, to, to.ip().into(), bytes)
}

/// [`tcp_transfer`] to address `dst_ip` of pod `to` (e.g. the IPv6 address a dual-stack test
/// gave it).
pub fn tcp_transfer_to(from: &Pod, to: &Pod, dst_ip: IpAddr, bytes: u64) -> Result<Transfer> {
    let io_timeout = Duration::from_secs(15);
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<u16>();
        let server = s.spawn(move || -> Result<()> {
            to.netns().enter_current_thread()?;
            let l = TcpListener::bind((dst_ip, 0))
                .map_err(|e| Error::io(format!("listen on {dst_ip}"), e))?;
            let port = l
                .local_addr()
                .map_err(|e| Error::io("local_addr", e))?
                .port();
            let _ = tx.send(port);
            let mut stream = accept_within(&l, io_timeout)?;
            stream
                .set_read_timeout(Some(io_timeout))
                .map_err(|e| Error::io("socket options", e))?;
            receive_and_acknowledge(&mut stream, dst_ip).map(drop)
        });
        let port = match rx.recv_timeout(io_timeout) {
            Ok(p) => p,
            Err(_) => {
                return Err(match server.join() {
                    Ok(Err(e)) => e,
                    _ => Error::Other("receiver thread did not start".into()),
                })
            }
        };
        let started = Instant::now();
        let client = s.spawn(move || -> Result<(u64, u64)> {
            from.netns().enter_current_thread()?;
            let addr = SocketAddr::from((dst_ip, port));
            let mut st = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map_err(|e| Error::io(format!("connect {addr} from {}", from.ip()), e))?;
            st.set_write_timeout(Some(io_timeout))
                .and_then(|()| st.set_read_timeout(Some(io_timeout)))
                .map_err(|e| Error::io("socket options", e))?;
            let mut h = FNV_OFFSET;
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ bytes;
            let mut buf = vec![0u8; 64 * 1024];
            let mut left = bytes;
            while left > 0 {
                let k = (buf.len() as u64).min(left) as usize;
                fill_pseudo_random(&mut x, &mut buf[..k]);
                st.write_all(&buf[..k]).map_err(|e| {
                    Error::io(format!("sending to {addr}, {} bytes sent", bytes - left), e)
                })?;
                h = fnv(h, &buf[..k]);
                left -= k as u64;
            }
            finish_and_check(&mut st, addr, bytes, h)
        });
        let sent = client
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        let received = server
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        let (n, h) = sent?;
        received?;
        Ok(Transfer {
            bytes: n,
            checksum: h,
            elapsed: started.elapsed(),
        })
    })
}

/// What a [`PacedTransfer`] moved.
#[derive(Debug, Clone, Copy)]
pub struct PacedReport {
    pub bytes: u64,
    pub checksum: u64,
    pub elapsed: Duration,
    /// The longest time the receiver waited between two reads.
    pub longest_stall: Duration,
}

/// One TCP connection from one pod to another carrying `chunk` bytes every `every` in the
/// background, for as long as it runs: a connection that spans an event. [`PacedTransfer::stop`]
/// closes it and checks that the receiver got every byte (count and FNV hash). Any error of
/// the connection (reset, a write or read stalled beyond 30 s) fails the stop.
#[derive(Debug)]
pub struct PacedTransfer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    client: Option<std::thread::JoinHandle<Result<(u64, u64)>>>,
    server: Option<std::thread::JoinHandle<Result<(u64, u64, Duration)>>>,
    started: Instant,
    what: String,
}

fn open_netns(ns: &crate::Netns) -> Result<std::fs::File> {
    crate::netns::open(ns.name())
}

impl PacedTransfer {
    pub fn start(from: &Pod, to: &Pod, chunk: usize, every: Duration) -> Result<PacedTransfer> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let io_timeout = Duration::from_secs(30);
        let (from_ns, to_ns) = (open_netns(from.netns())?, open_netns(to.netns())?);
        let (from_name, to_name) = (from.name().to_string(), to.name().to_string());
        let dst_ip = to.ip();
        let what = format!("TCP {} → {}", from.ip(), to.ip());
        let (tx, rx) = mpsc::channel::<Result<u16>>();
        let server = std::thread::spawn(move || -> Result<(u64, u64, Duration)> {
            let listen = || -> Result<TcpListener> {
                crate::netns::enter_file(&to_ns, &to_name)?;
                TcpListener::bind((dst_ip, 0))
                    .map_err(|e| Error::io(format!("listen on {dst_ip}"), e))
            };
            let l = match listen() {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(Error::Other(e.to_string())));
                    return Err(e);
                }
            };
            let port = l
                .local_addr()
                .map_err(|e| Error::io("local_addr", e))?
                .port();
            let _ = tx.send(Ok(port));
            let mut st = accept_within(&l, Duration::from_secs(15))?;
            st.set_read_timeout(Some(io_timeout))
                .map_err(|e| Error::io("socket options", e))?;
            receive_and_acknowledge(&mut st, dst_ip)
        });
        let port = rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| Error::Other(format!("{what}: the receiver did not start")))??;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let client = std::thread::spawn(move || -> Result<(u64, u64)> {
            crate::netns::enter_file(&from_ns, &from_name)?;
            let addr = SocketAddr::from((dst_ip, port));
            let mut st = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map_err(|e| Error::io(format!("connect {addr}"), e))?;
            st.set_write_timeout(Some(io_timeout))
                .and_then(|()| st.set_read_timeout(Some(io_timeout)))
                .map_err(|e| Error::io("socket options", e))?;
            let mut x: u64 = 0x2545_f491_4f6c_dd1d;
            let mut buf = vec![0u8; chunk.max(8)];
            let (mut sent, mut h) = (0u64, FNV_OFFSET);
            while !stop2.load(Ordering::Relaxed) {
                fill_pseudo_random(&mut x, &mut buf);
                st.write_all(&buf)
                    .map_err(|e| Error::io(format!("sending to {addr} after {sent} bytes"), e))?;
                sent += buf.len() as u64;
                h = fnv(h, &buf);
                std::thread::sleep(every);
            }
            finish_and_check(&mut st, addr, sent, h)
        });
        Ok(PacedTransfer {
            stop,
            client: Some(client),
            server: Some(server),
            started: Instant::now(),
            what,
        })
    }

    /// Closes the connection and checks the receipt.
    pub fn stop(mut self) -> Result<PacedReport> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = self
            .client
            .take()
            .expect("running")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        let elapsed = self.started.elapsed();
        let received = self
            .server
            .take()
            .expect("running")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        let what = &self.what;
        let (bytes, checksum) = sent.map_err(|e| Error::Other(format!("{what}: {e}")))?;
        let (_, _, longest_stall) = received.map_err(|e| Error::Other(format!("{what}: {e}")))?;
        Ok(PacedReport {
            bytes,
            checksum,
            elapsed,
            longest_stall,
        })
    }
}

impl Drop for PacedTransfer {
    fn drop(&mut self) {
        // Stopped without `stop`: let the threads end on their own (the client sees the flag;
        // the receiver sees the close, or its read timeout when the pods are gone).
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A minimal HTTP/1.0 GET: (status code, body). Call it from a thread in the right namespace.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut st = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| Error::io(format!("connect {addr}"), e))?;
    st.set_read_timeout(Some(timeout))
        .and_then(|()| st.set_write_timeout(Some(timeout)))
        .map_err(|e| Error::io("socket options", e))?;
    // One write: a server that answers after the request line and closes must not make a
    // second write fail with EPIPE before the answer is read.
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let wrote = st.write_all(req.as_bytes());
    let mut resp = Vec::new();
    let read = st.read_to_end(&mut resp);
    if resp.is_empty() {
        wrote.map_err(|e| Error::io(format!("GET {path}"), e))?;
        read.map_err(|e| Error::io(format!("GET {path}: reading"), e))?;
    }
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Error::Other(format!("GET {path}: not an HTTP response: {head:?}")))?;
    Ok((code, body.to_string()))
}

/// Connects from the namespace `from` to `addr`, listened on in `listen`; the source address
/// the listener saw (to tell a masqueraded connection from one that kept the pod's address).
pub fn observed_source(
    listen: &crate::Netns,
    addr: SocketAddr,
    from: &crate::Netns,
) -> std::result::Result<IpAddr, String> {
    let listener = listen
        .run_in(|| TcpListener::bind(addr))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("listen on {addr} in {}: {e}", listen.name()))?;
    let conn = from
        .run_in(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{} → {addr}: {e}", from.name()))?;
    let (_, peer) = listener
        .accept()
        .map_err(|e| format!("accept on {addr}: {e}"))?;
    drop(conn);
    Ok(peer.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summary() {
        let out =
            "PING 10.5.1.2 (10.5.1.2) 56(84) bytes of data.\n\n--- 10.5.1.2 ping statistics ---\n\
                   612 packets transmitted, 610 received, 0.326797% packet loss, time 6107ms\n\
                   rtt min/avg/max/mdev = 0.041/0.085/0.210/0.020 ms\n";
        assert_eq!(
            parse_ping(out),
            Some(PingStats {
                transmitted: 612,
                received: 610,
                avg_rtt_ms: Some(0.085),
            })
        );
        let errs = "3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 2030ms";
        assert_eq!(
            parse_ping(errs),
            Some(PingStats {
                transmitted: 3,
                received: 0,
                avg_rtt_ms: None,
            })
        );
        assert_eq!(parse_ping("ping: sendmsg: Message too long"), None);
    }
}
