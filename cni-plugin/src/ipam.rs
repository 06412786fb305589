//! Address allocation with the on-disk store of the reference `host-local` IPAM plugin, so that
//! both can share one store without ever handing out an address twice.
//!
//! Layout of `<dataDir>/<network>/` (as host-local 1.1.1 writes it):
//! - `<ip>`: one file per allocated address, content `<containerID>\r\n<ifname>`;
//! - `last_reserved_ip.<range index>`: the last address handed out (allocation is round-robin);
//! - `lock`: flock(LOCK_EX) around every change.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, DirEntryExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::spec::{code, CniError};

const LINE_BREAK: &str = "\r\n";
const LAST_RESERVED: &str = "last_reserved_ip.";

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("IPAM store {path}: {err}")]
    Io { path: String, err: io::Error },
    #[error("no IP addresses available in range {range} (store {store})")]
    Exhausted { range: String, store: String },
    #[error("range {0} is too small to hand out addresses")]
    TooSmall(String),
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> CniError {
        let c = match e {
            IpamError::Io { .. } => code::IO_FAILURE,
            IpamError::Exhausted { .. } => code::NO_ADDRESSES,
            IpamError::TooSmall(_) => code::INVALID_CONFIG,
        };
        CniError::new(c, e.to_string())
    }
}

type Result<T> = std::result::Result<T, IpamError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> IpamError + '_ {
    move |err| IpamError::Io {
        path: path.display().to_string(),
        err,
    }
}

/// The store directory must be a directory of its own: a symlink planted in its place would send
/// our writes wherever it points.
fn refuse_symlink(dir: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(dir).map_err(io_err(dir))?;
    if meta.file_type().is_symlink() {
        return Err(io_err(dir)(io::Error::other(
            "is a symbolic link; refusing to use it as the address store",
        )));
    }
    Ok(())
}

/// One range of a subnet: every address between `start` and `end` except the gateway.
#[derive(Debug, Clone)]
pub struct Range {
    pub subnet: IpNetwork,
    pub gateway: IpAddr,
    start: u128,
    end: u128,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(v.into())
    } else {
        IpAddr::V4((v as u32).into())
    }
}

impl Range {
    /// host-local's defaults: start = network + 1, end = broadcast − 1 (IPv4) or the last
    /// address (IPv6), gateway = network + 1.
    pub fn for_subnet(subnet: IpNetwork) -> Result<Range> {
        let net = to_u128(subnet.network());
        let bits = if subnet.is_ipv4() { 32 } else { 128 };
        let host_bits = bits - subnet.prefix() as u32;
        if host_bits < 2 {
            return Err(IpamError::TooSmall(subnet.to_string()));
        }
        let last = if host_bits == 128 {
            u128::MAX
        } else {
            net | ((1u128 << host_bits) - 1)
        };
        let end = if subnet.is_ipv4() { last - 1 } else { last };
        let start = net + 1;
        let range = Range {
            subnet,
            gateway: from_u128(start, subnet.is_ipv6()),
            start,
            end,
        };
        if range.end <= range.start {
            return Err(IpamError::TooSmall(subnet.to_string()));
        }
        Ok(range)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv6() == self.subnet.is_ipv6() && (self.start..=self.end).contains(&to_u128(ip))
    }

    /// Candidates in host-local's order: from `last + 1` round to `last`, else from `start`.
    fn candidates(&self, last: Option<IpAddr>) -> impl Iterator<Item = IpAddr> + '_ {
        let first = match last {
            Some(l) if self.contains(l) => {
                let l = to_u128(l);
                if l >= self.end {
                    self.start
                } else {
                    l + 1
                }
            }
            _ => self.start,
        };
        let size = self.end - self.start + 1;
        let v6 = self.subnet.is_ipv6();
        let gw = to_u128(self.gateway);
        (0..size)
            .map(move |i| self.start + (first - self.start + i) % size)
            .filter(move |&v| v != gw)
            .map(move |v| from_u128(v, v6))
    }
}

/// The store directory of one network, locked for as long as this value lives.
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

/// An entry in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: IpAddr,
    pub container_id: String,
    pub ifname: String,
}

impl Store {
    /// Open `<data_dir>/<network>` (created if missing) and take its lock.
    pub fn lock(data_dir: &Path, network: &str) -> Result<Store> {
        let dir = data_dir.join(network);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(io_err(&dir))?;
        refuse_symlink(&dir)?;
        let lock_path = dir.join("lock");
        // host-local opens it O_RDONLY|O_CREAT, 0750; the same file, so the same flock.
        let lock = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o750)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        let mut lock = lock;
        let lock = loop {
            match Flock::lock(lock, FlockArg::LockExclusive) {
                Ok(locked) => break locked,
                Err((unlocked, Errno::EINTR)) => lock = unlocked,
                Err((_, errno)) => return Err(io_err(&lock_path)(errno.into())),
            }
        };
        Ok(Store { dir, _lock: lock })
    }

    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every allocation in the store.
    pub fn allocations(&self) -> Result<Vec<Allocation>> {
        Ok(self.entries()?.into_iter().map(|(a, _)| a).collect())
    }

    /// Every allocation with the inode of its file.
    fn entries(&self) -> Result<Vec<(Allocation, u64)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name();
            let Some(ip) = name.to_str().and_then(|n| n.parse::<IpAddr>().ok()) else {
                continue; // lock, last_reserved_ip.N, anything else
            };
            let path = entry.path();
            let data = match fs::read_to_string(&path) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            let data = data.trim();
            let (id, ifname) = match data.split_once(LINE_BREAK) {
                Some((id, ifname)) => (id.trim(), ifname.trim()),
                None => (data, ""), // the older format: the container ID alone
            };
            let a = Allocation {
                ip,
                container_id: id.to_string(),
                ifname: ifname.to_string(),
            };
            out.push((a, entry.ino()));
        }
        out.sort_by_key(|(a, _)| to_u128(a.ip));
        Ok(out)
    }

    /// Addresses held by this container and interface.
    pub fn find(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        Ok(self
            .allocations()?
            .into_iter()
            .filter(|a| a.container_id == id && (a.ifname == ifname || a.ifname.is_empty()))
            .map(|a| a.ip)
            .collect())
    }

    fn last_reserved(&self, range_idx: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("{LAST_RESERVED}{range_idx}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Reserve `ip` for the container: false when someone has it already.
    fn reserve(&self, ip: IpAddr, id: &str, ifname: &str, range_idx: usize) -> Result<bool> {
        let path = self.dir.join(ip.to_string());
        let mut f = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_err(&path)(e)),
        };
        if let Err(e) = f.write_all(format!("{id}{LINE_BREAK}{ifname}").as_bytes()) {
            let _ = fs::remove_file(&path);
            return Err(io_err(&path)(e));
        }
        self.write_last_reserved(range_idx, ip)?;
        Ok(true)
    }

    /// Overwrite `last_reserved_ip.N` in place. Not with O_TRUNC: on ext4, closing a file that
    /// was truncated to zero forces its blocks out (auto_da_alloc), which costs more than the
    /// whole rest of an allocation. Readers trim the content, as host-local does.
    fn write_last_reserved(&self, range_idx: usize, ip: IpAddr) -> Result<()> {
        let path = self.dir.join(format!("{LAST_RESERVED}{range_idx}"));
        let text = ip.to_string();
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err(&path))?;
        f.write_all(text.as_bytes()).map_err(io_err(&path))?;
        f.set_len(text.len() as u64).map_err(io_err(&path))?;
        Ok(())
    }

    /// Take the next free address of `range` (index `range_idx` in the range set).
    pub fn allocate(
        &self,
        range: &Range,
        range_idx: usize,
        id: &str,
        ifname: &str,
    ) -> Result<IpAddr> {
        let last = self.last_reserved(range_idx);
        for ip in range.candidates(last) {
            if self.reserve(ip, id, ifname, range_idx)? {
                return Ok(ip);
            }
        }
        Err(IpamError::Exhausted {
            range: range.subnet.to_string(),
            store: self.dir.display().to_string(),
        })
    }

    /// Remove one address file.
    pub fn release_ip(&self, ip: IpAddr) -> Result<()> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Release everything this container and interface hold; returns what was released.
    pub fn release(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        let ips = self.find(id, ifname)?;
        for ip in &ips {
            self.release_ip(*ip)?;
        }
        Ok(ips)
    }

    /// What the store holds as a GC begins: only these allocations may be freed by it.
    pub fn gc_snapshot(&self) -> Result<GcSnapshot> {
        Ok(GcSnapshot {
            entries: self
                .entries()?
                .into_iter()
                .map(|(a, ino)| (a.ip, (a, ino)))
                .collect(),
        })
    }

    /// Release every allocation whose (container, interface) is not in `valid` and that was
    /// already there when the GC began (`began`). The runtime listed the valid attachments
    /// before the GC started, and the GC gives up the lock while the delegate DELs run: an
    /// ADD that allocates meanwhile is not in the list, yet its pod is alive.
    pub fn gc(
        &self,
        valid: &HashSet<(String, String)>,
        began: &GcSnapshot,
    ) -> Result<Vec<Allocation>> {
        let mut released = Vec::new();
        for (a, ino) in self.entries()? {
            let keep = valid.contains(&(a.container_id.clone(), a.ifname.clone()))
                || (a.ifname.is_empty() && valid.iter().any(|(id, _)| *id == a.container_id));
            if !keep && began.had(&a, ino) {
                self.release_ip(a.ip)?;
                released.push(a);
            }
        }
        Ok(released)
    }
}

/// The allocations in a store when a GC began, each with its file's inode: an address
/// released and allocated again since is a different file (or a different owner).
pub struct GcSnapshot {
    entries: HashMap<IpAddr, (Allocation, u64)>,
}

impl GcSnapshot {
    fn had(&self, a: &Allocation, ino: u64) -> bool {
        self.entries
            .get(&a.ip)
            .is_some_and(|(then, then_ino)| then == a && *then_ino == ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(s: &str) -> Range {
        Range::for_subnet(s.parse().unwrap()).unwrap()
    }

    #[test]
    fn range_bounds_like_host_local() {
        let r = range("10.5.72.0/24");
        let all: Vec<IpAddr> = r.candidates(None).collect();
        assert_eq!(all.len(), 253); // .2 … .254
        assert_eq!(all[0].to_string(), "10.5.72.2");
        assert_eq!(all.last().unwrap().to_string(), "10.5.72.254");
        let after: Vec<IpAddr> = r.candidates(Some("10.5.72.9".parse().unwrap())).collect();
        assert_eq!(after[0].to_string(), "10.5.72.10");
        assert_eq!(after.last().unwrap().to_string(), "10.5.72.9");
        let wrap: Vec<IpAddr> = r.candidates(Some("10.5.72.254".parse().unwrap())).collect();
        assert_eq!(wrap[0].to_string(), "10.5.72.2");
        // Outside the range: start over.
        let out: Vec<IpAddr> = r.candidates(Some("10.9.0.1".parse().unwrap())).collect();
        assert_eq!(out[0].to_string(), "10.5.72.2");
        let v6 = range("fd00::/120");
        let c: Vec<IpAddr> = v6.candidates(None).collect();
        assert_eq!(c[0].to_string(), "fd00::2");
        assert_eq!(c.last().unwrap().to_string(), "fd00::ff");
        assert!(Range::for_subnet("10.0.0.0/31".parse().unwrap()).is_err());
    }

    /// Two plugin runs on one network take turns: the second waits until the first's
    /// `Store` is dropped (host-local's flock on the same file).
    #[test]
    fn the_store_lock_is_held_until_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Store::lock(tmp.path(), "net").unwrap();
        let (locked, second_locked) = std::sync::mpsc::channel();
        let dir = tmp.path().to_path_buf();
        let second = std::thread::spawn(move || {
            let _store = Store::lock(&dir, "net").unwrap();
            locked.send(()).unwrap();
        });
        let wait = std::time::Duration::from_millis(300);
        assert!(
            second_locked.recv_timeout(wait).is_err(),
            "the store was locked twice at once"
        );
        drop(first);
        second_locked
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the second lock was not granted after the first store was dropped");
        second.join().unwrap();
    }

    #[test]
    fn planted_symlinks_are_never_followed() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        fs::write(&target, "precious").unwrap();
        let r = range("10.1.2.0/29");

        // In place of last_reserved_ip.0: the write fails, the target is untouched.
        fs::create_dir(tmp.path().join("a")).unwrap();
        symlink(&target, tmp.path().join("a/last_reserved_ip.0")).unwrap();
        let store = Store::lock(tmp.path(), "a").unwrap();
        assert!(store.allocate(&r, 0, "c1", "eth0").is_err());
        drop(store);

        // In place of an address file: that address counts as taken, the next one is used.
        fs::create_dir(tmp.path().join("b")).unwrap();
        symlink(&target, tmp.path().join("b/10.1.2.2")).unwrap();
        let store = Store::lock(tmp.path(), "b").unwrap();
        assert_eq!(
            store.allocate(&r, 0, "c1", "eth0").unwrap().to_string(),
            "10.1.2.3"
        );
        drop(store);

        // In place of the lock file, or of the network directory itself: refused.
        fs::create_dir(tmp.path().join("c")).unwrap();
        symlink(&target, tmp.path().join("c/lock")).unwrap();
        assert!(Store::lock(tmp.path(), "c").is_err());
        let elsewhere = tmp.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        symlink(&elsewhere, tmp.path().join("d")).unwrap();
        let err = Store::lock(tmp.path(), "d")
            .err()
            .expect("symlinked store refused");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);

        assert_eq!(fs::read_to_string(&target).unwrap(), "precious");
    }

    #[test]
    fn allocate_release_gc_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let r = range("10.1.2.0/29"); // .2 … .6
        let store = Store::lock(tmp.path(), "net").unwrap();
        let a = store.allocate(&r, 0, "c1", "eth0").unwrap();
        assert_eq!(a.to_string(), "10.1.2.2");
        let file = tmp.path().join("net/10.1.2.2");
        assert_eq!(fs::read_to_string(&file).unwrap(), "c1\r\neth0");
        assert_eq!(
            fs::read_to_string(tmp.path().join("net/last_reserved_ip.0")).unwrap(),
            "10.1.2.2"
        );
        for i in 2..=5 {
            store.allocate(&r, 0, &format!("c{i}"), "eth0").unwrap();
        }
        let e = store.allocate(&r, 0, "c6", "eth0").unwrap_err();
        assert!(matches!(e, IpamError::Exhausted { .. }));
        assert_eq!(CniError::from(e).code, code::NO_ADDRESSES);
        assert_eq!(store.release("c3", "eth0").unwrap().len(), 1);
        assert!(store.release("c3", "eth0").unwrap().is_empty());
        // Round-robin resumes after the last one handed out, wrapping to the free one.
        assert_eq!(
            store.allocate(&r, 0, "c7", "eth0").unwrap().to_string(),
            "10.1.2.4"
        );
        assert_eq!(store.find("c7", "eth0").unwrap().len(), 1);
        let valid: HashSet<_> = [("c1".to_string(), "eth0".to_string())].into();
        let gone = store.gc(&valid, &store.gc_snapshot().unwrap()).unwrap();
        assert_eq!(gone.len(), 4);
        assert_eq!(store.allocations().unwrap().len(), 1);
    }

    #[test]
    fn legacy_entries_without_ifname() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::lock(tmp.path(), "net").unwrap();
        fs::write(store.dir().join("10.1.2.3"), "old-id").unwrap();
        assert_eq!(store.find("old-id", "eth0").unwrap().len(), 1);
        assert_eq!(store.release("old-id", "eth0").unwrap().len(), 1);
    }

    #[test]
    fn gc_frees_only_what_was_there_when_it_began() {
        let tmp = tempfile::tempdir().unwrap();
        let r = range("10.1.2.0/29");
        let store = Store::lock(tmp.path(), "net").unwrap();
        let kept = store.allocate(&r, 0, "alive", "eth0").unwrap();
        let stale = store.allocate(&r, 0, "gone", "eth0").unwrap();
        let reused = store.allocate(&r, 0, "gone2", "eth0").unwrap();
        let valid: HashSet<_> = [("alive".to_string(), "eth0".to_string())].into();
        let began = store.gc_snapshot().unwrap();
        // While the GC runs its delegates' DELs (without the lock), pods are added: one new
        // address, and one freed and handed to a new pod.
        let late = store.allocate(&r, 0, "late", "eth0").unwrap();
        store.release_ip(reused).unwrap();
        let path = store.dir().join(reused.to_string());
        fs::write(&path, "late2\r\neth0").unwrap();
        let gone: Vec<IpAddr> = store
            .gc(&valid, &began)
            .unwrap()
            .into_iter()
            .map(|a| a.ip)
            .collect();
        assert_eq!(gone, vec![stale]);
        let left: Vec<IpAddr> = store.allocations().unwrap().iter().map(|a| a.ip).collect();
        assert_eq!(left, vec![kept, reused, late]);
    }
}
