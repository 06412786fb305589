//! etcd (v3) in its own namespace on the underlay, with etcdctl helpers.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{cmd, wait_until, Error, EtcdSpec, Netns, Result, Underlay};

/// One etcd member in its own namespace on the underlay. A single-member cluster ([`Etcd::start_on`])
/// lives in `<prefix>-etcd` with client URL `http://198.18.0.2:2379`; member `i` of a
/// multi-member cluster ([`Etcd::start_cluster`]) lives in `<prefix>-etcd` (i = 0) or
/// `<prefix>-etcd<i>`, at `198.18.0.(2 + i)`, with its peer URL on the underlay too. Data lives
/// in a directory kept across [`Etcd::stop`] / [`Etcd::kill9`] / [`Etcd::start`]. Dropping it
/// kills etcd.
#[derive(Debug)]
pub struct Etcd {
    child: Mutex<Option<Child>>,
    ns: Netns,
    ip: Ipv4Addr,
    member: Member,
    data_dir: PathBuf,
    log: PathBuf,
}

/// How a member joins its cluster.
#[derive(Debug, Clone)]
struct Member {
    name: String,
    peer_url: String,
    initial_cluster: String,
    token: String,
}

impl Etcd {
    pub const CLIENT_PORT: u16 = 2379;
    pub const PEER_PORT: u16 = 2380;
    /// At most this many members fit below the hosts' addresses (`.2` .. `.9`).
    pub const MAX_MEMBERS: usize = 8;

    /// Makes the namespace, plugs it into the underlay as port `etcd`, starts etcd with its data
    /// under `dir`, and waits until it answers.
    pub fn start_on(underlay: &Underlay, prefix: &str, dir: &Path) -> Result<Etcd> {
        let ns = Netns::create(&format!("{prefix}-etcd"))?;
        underlay.attach(&ns, "etcd", Underlay::ETCD_IP)?;
        let etcd = Etcd::prepare(
            ns,
            Underlay::ETCD_IP,
            Member {
                name: "n0".into(),
                peer_url: format!("http://127.0.0.1:{}", Self::PEER_PORT),
                initial_cluster: format!("n0=http://127.0.0.1:{}", Self::PEER_PORT),
                token: "etcd-cluster".into(),
            },
            dir,
        )?;
        etcd.start()?;
        Ok(etcd)
    }

    /// A cluster of `n` members (`1..=8`), member `i` in namespace `<prefix>-etcd` (i = 0) or
    /// `<prefix>-etcd<i>` on underlay port `etcd`/`etcd<i>` at [`Underlay::etcd_ip`]`(i)`, peer
    /// and client URLs on the underlay, data under `dir/e<i>`. Starts all and waits until every
    /// member reports healthy (which needs a quorum).
    pub fn start_cluster(
        underlay: &Underlay,
        prefix: &str,
        dir: &Path,
        n: usize,
    ) -> Result<Vec<Etcd>> {
        if n == 0 || n > Self::MAX_MEMBERS {
            return Err(Error::Other(format!(
                "an etcd cluster of {n} members: the test bed makes 1 to {}",
                Self::MAX_MEMBERS
            )));
        }
        let suffix = |i: usize| if i == 0 { String::new() } else { i.to_string() };
        let peer = |i: usize| format!("http://{}:{}", Underlay::etcd_ip(i), Self::PEER_PORT);
        let initial_cluster = (0..n)
            .map(|i| format!("e{i}={}", peer(i)))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let ns = Netns::create(&format!("{prefix}-etcd{}", suffix(i)))?;
            underlay.attach(&ns, &format!("etcd{}", suffix(i)), Underlay::etcd_ip(i))?;
            members.push(Etcd::prepare(
                ns,
                Underlay::etcd_ip(i),
                Member {
                    name: format!("e{i}"),
                    peer_url: peer(i),
                    initial_cluster: initial_cluster.clone(),
                    token: prefix.to_string(),
                },
                &dir.join(format!("e{i}")),
            )?);
        }
        for m in &members {
            m.spawn()?;
        }
        for m in &members {
            m.wait_healthy(Duration::from_secs(60))?;
        }
        Ok(members)
    }

    fn prepare(ns: Netns, ip: Ipv4Addr, member: Member, dir: &Path) -> Result<Etcd> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
        Ok(Etcd {
            child: Mutex::new(None),
            ns,
            ip,
            member,
            data_dir: dir.join("data"),
            log: dir.join("etcd.log"),
        })
    }

    /// `http://<ip>:2379`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.ip, Self::CLIENT_PORT)
    }

    /// The member's underlay address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The member name (`n0` alone, `e<i>` in a cluster).
    pub fn member_name(&self) -> &str {
        &self.member.name
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Starts etcd (no-op when running) and waits until it reports healthy (in a cluster that
    /// needs a quorum of members running).
    pub fn start(&self) -> Result<()> {
        self.spawn()?;
        self.wait_healthy(Duration::from_secs(30))
    }

    /// Starts the process (no-op when running) without waiting.
    fn spawn(&self) -> Result<()> {
        let mut child = self.child.lock().unwrap();
        if let Some(c) = child.as_mut() {
            if c.try_wait().ok().flatten().is_none() {
                return Ok(());
            }
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| Error::io(format!("opening {}", self.log.display()), e))?;
        let log2 = log.try_clone().map_err(|e| Error::io("dup log fd", e))?;
        let client = self.endpoint();
        let m = &self.member;
        let mut spec = EtcdSpec::single(&m.name, &self.data_dir, &client, &m.peer_url);
        spec.listen_client_urls.push("http://127.0.0.1:2379".into());
        spec.initial_cluster = m.initial_cluster.clone();
        spec.cluster_token = Some(m.token.clone());
        spec.extra_args = vec!["--logger=zap".into(), "--log-outputs=stderr".into()];
        let mut c = spec.command(Some(self.ns.name()));
        c.stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD") {
                c.env_remove(k);
            }
        }
        let spawned = c
            .spawn()
            .map_err(|e| Error::io(format!("starting `{}`", cmd::show(&c)), e))?;
        *child = Some(spawned);
        Ok(())
    }

    /// Polls `etcdctl endpoint health` on this member until it answers healthy.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let what = format!("etcd member {} to become healthy", self.member.name);
        wait_until(timeout, &what, || {
            if let Some(c) = self.child.lock().unwrap().as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(format!(
                        "etcd exited ({st}); log tail:\n{}",
                        cmd::tail(&self.log, 20)
                    ));
                }
            }
            self.etcdctl(&["endpoint", "health"])
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }

    /// `kill -9` the member and reap it; the data directory stays for [`Etcd::start`].
    pub fn kill9(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The etcd process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(Child::id)
    }

    /// Stops etcd (SIGTERM, SIGKILL after 5 s); the data directory stays for [`Etcd::start`].
    pub fn stop(&self) -> Result<()> {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            stop_child(&mut c, Duration::from_secs(5));
        }
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        match self.child.lock().unwrap().as_mut() {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// `etcdctl --endpoints=<endpoint> args...` run in etcd's namespace (ETCDCTL_API=3).
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let mut c: Command = self.ns.command("etcdctl");
        c.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .arg("--dial-timeout=2s")
            .arg("--command-timeout=5s")
            .args(args);
        cmd::check(&mut c)
    }

    /// The store's current revision.
    pub fn revision(&self) -> Result<i64> {
        let out = self.etcdctl(&["get", "/netns-tests/revision-probe", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| Error::Other(format!("etcdctl get: bad JSON ({e}): {out}")))?;
        v["header"]["revision"]
            .as_i64()
            .ok_or_else(|| Error::Other(format!("etcdctl get: no header revision: {out}")))
    }

    /// Records every change under `prefix` from now on (`etcdctl watch --prefix --rev=<now+1>`
    /// in the background, JSON lines into `path`) until the [`WatchLog`] is dropped.
    pub fn watch_log(&self, prefix: &str, path: &Path) -> Result<WatchLog> {
        let from = self.revision()? + 1;
        let out =
            File::create(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        let mut c: Command = self.ns.command("etcdctl");
        c.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args([
                "watch",
                "--prefix",
                &format!("--rev={from}"),
                "-w",
                "json",
                prefix,
            ])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .process_group(0);
        let child = c
            .spawn()
            .map_err(|e| Error::io(format!("starting `{}`", cmd::show(&c)), e))?;
        Ok(WatchLog {
            child: Some(child),
            path: path.to_path_buf(),
        })
    }

    /// Writes `key` = `value`.
    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        self.etcdctl(&["put", key, value]).map(drop)
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Result<Option<String>> {
        Ok(self.range(key, false)?.into_iter().next().map(|(_, v)| v))
    }

    /// All `(key, value)` pairs under `prefix`, sorted by key.
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        self.range(prefix, true)
    }

    /// Deletes `key`; returns how many keys were deleted (0 or 1).
    pub fn del(&self, key: &str) -> Result<u64> {
        let out = self.etcdctl(&["del", key])?;
        out.trim()
            .parse()
            .map_err(|_| Error::Other(format!("etcdctl del {key}: unexpected output {out:?}")))
    }

    fn range(&self, key: &str, prefix: bool) -> Result<Vec<(String, String)>> {
        let mut args = vec!["get", key, "-w", "json"];
        if prefix {
            args.push("--prefix");
        }
        let out = self.etcdctl(&args)?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| Error::Other(format!("etcdctl get {key}: bad JSON ({e}): {out}")))?;
        let mut kvs = Vec::new();
        for kv in v["kvs"].as_array().into_iter().flatten() {
            let k = base64_decode(kv["key"].as_str().unwrap_or_default())?;
            let val = base64_decode(kv["value"].as_str().unwrap_or_default())?;
            kvs.push((
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&val).into_owned(),
            ));
        }
        kvs.sort();
        Ok(kvs)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- etcd log tail ({}) ----\n{}",
                self.log.display(),
                cmd::tail(&self.log, 15)
            );
        }
        if let Some(mut c) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A background `etcdctl watch` (see [`Etcd::watch_log`]); dropping it stops the watch.
#[derive(Debug)]
pub struct WatchLog {
    child: Option<Child>,
    path: PathBuf,
}

/// One event of a [`WatchLog`].
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    pub revision: i64,
    /// `true` for a DELETE (also a lease expiry), `false` for a PUT.
    pub delete: bool,
    pub key: String,
    /// The value written (empty for a DELETE).
    pub value: String,
    /// The etcd lease the key was written with (0: none).
    pub lease: i64,
}

impl WatchLog {
    /// Every event recorded so far, in revision order.
    pub fn events(&self) -> Result<Vec<WatchEvent>> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| Error::io(format!("reading {}", self.path.display()), e))?;
        let mut events = Vec::new();
        // The last line may be half written; only complete lines count.
        for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let v: serde_json::Value = serde_json::from_str(line.trim()).map_err(|e| {
                Error::Other(format!(
                    "watch log {}: bad JSON ({e}): {line}",
                    self.path.display()
                ))
            })?;
            for ev in v["Events"].as_array().into_iter().flatten() {
                let kv = &ev["kv"];
                let text = |f: &str| -> Result<String> {
                    Ok(
                        String::from_utf8_lossy(&base64_decode(kv[f].as_str().unwrap_or(""))?)
                            .into_owned(),
                    )
                };
                events.push(WatchEvent {
                    revision: kv["mod_revision"].as_i64().unwrap_or_default(),
                    delete: ev["type"].as_i64() == Some(1),
                    key: text("key")?,
                    value: text("value")?,
                    lease: kv["lease"].as_i64().unwrap_or_default(),
                });
            }
        }
        Ok(events)
    }
}

impl Drop for WatchLog {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps. For any child process.
pub fn stop_child(c: &mut Child, grace: Duration) {
    let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// Standard base64 (with padding), as etcdctl's JSON output uses.
fn base64_decode(s: &str) -> Result<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let v = val(c).ok_or_else(|| Error::Other(format!("bad base64 {s:?}")))?;
            acc |= v << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::base64_decode;

    #[test]
    fn base64() {
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("Zg==").unwrap(), b"f");
        assert_eq!(base64_decode("Zm8=").unwrap(), b"fo");
        assert_eq!(base64_decode("Zm9v").unwrap(), b"foo");
        assert_eq!(
            base64_decode("L2NvcmVvcy5jb20vbmV0d29yay9jb25maWc=").unwrap(),
            b"/coreos.com/network/config"
        );
    }
}
