//! The TUN device `flannel0`: opening it (with the virtio-net header and TSO/USO offloads when
//! the kernel allows), and blocking-style reads and writes on its non-blocking descriptor.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// What the device was opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TunOffloads {
    /// `IFF_VNET_HDR`: every frame starts with a virtio-net header.
    pub vnet: bool,
    /// TSO over IPv4 (`TUN_F_TSO4`, with `TUN_F_CSUM`).
    pub tso: bool,
    /// UDP segmentation offload (`TUN_F_USO4`, kernel ≥ 6.2).
    pub uso: bool,
}

/// An open TUN device.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    pub name: String,
    pub offloads: TunOffloads,
}

fn ifreq_for(name: &str, flags: libc::c_int) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("device name {name:?} must be 1 to 15 bytes"),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    Ok(req)
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Tun {
    /// Opens (creating or adopting) the TUN device `name`. With `offload`, asks for the
    /// virtio-net header and checksum/TSO/USO offloads, falling back to fewer features and
    /// finally to a plain device when the kernel refuses.
    pub fn open(name: &str, offload: bool) -> io::Result<Tun> {
        if offload {
            match Self::open_with(name, true) {
                Ok(tun) => return Ok(tun),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Err(e),
                Err(e) => {
                    // Both the udp and the wireguard backend open their device here: the
                    // device name (flannel0, flannel-wg, flannel-wg-v6) says whose it is.
                    tracing::warn!("{name}: TUN offloads unavailable ({e}); plain device")
                }
            }
        }
        Self::open_with(name, false)
    }

    fn open_with(name: &str, offload: bool) -> io::Result<Tun> {
        // std opens with O_CLOEXEC.
        let fd = OwnedFd::from(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open("/dev/net/tun")?,
        );
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if offload {
            flags |= libc::IFF_VNET_HDR;
        }
        let mut req = ifreq_for(name, flags)?;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) })?;
        let mut offloads = TunOffloads::default();
        if offload {
            let size: libc::c_int = super::offload::VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
            check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) })?;
            let base = libc::TUN_F_CSUM | libc::TUN_F_TSO4;
            let set = |f: libc::c_uint| {
                // SAFETY: TUNSETOFFLOAD takes the flags as the integer argument.
                check(unsafe {
                    libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, f as libc::c_ulong)
                })
            };
            if set(base | libc::TUN_F_USO4 | libc::TUN_F_USO6).is_ok() {
                offloads.uso = true;
            } else {
                set(base)?;
            }
            offloads.vnet = true;
            offloads.tso = true;
        }
        Ok(Tun {
            fd,
            name: name.to_string(),
            offloads,
        })
    }

    /// Reads one frame; `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // The system call itself, not libc's `read`: this is once per packet, and the
        // wrapper's thread-cancellation bookkeeping is a measurable share of that.
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe {
            libc::syscall(
                libc::SYS_read,
                self.fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame given as pieces.
    pub fn writev(&self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: IoSlice is ABI-compatible with iovec; every slice is valid for reads.
        let n = unsafe {
            libc::writev(
                self.fd.as_raw_fd(),
                iov.as_ptr().cast(),
                iov.len() as libc::c_int,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Waits up to `timeout_ms` for a frame to read.
    pub fn wait_readable(&self, timeout_ms: i32) -> io::Result<bool> {
        poll_one(self.fd.as_raw_fd(), libc::POLLIN, timeout_ms)
    }
}

/// Waits for `events` on one descriptor; `Ok(true)` when ready, `Ok(false)` on timeout.
pub fn poll_one(fd: RawFd, events: libc::c_short, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    match n {
        n if n < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ if p.revents & (libc::POLLERR | libc::POLLNVAL) != 0 && p.revents & events == 0 => Err(
            io::Error::new(io::ErrorKind::BrokenPipe, "descriptor reports an error"),
        ),
        _ => Ok(true),
    }
}
