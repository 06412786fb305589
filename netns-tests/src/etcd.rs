//! etcd (v3) for a test: on the loopback of the caller's namespace (or of a namespace the
//! caller made), or in a namespace of its own on the underlay; with etcdctl helpers.

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{cmd, wait_until, Daemon, Error, EtcdSpec, EtcdTls, Netns, Result, Underlay};

/// One etcd member. Where it runs is chosen by its constructor:
/// - [`Etcd::start_local`]: on `127.0.0.1` at free ports (or where [`LocalEtcd`] says), in the
///   caller's namespace or a named one, data in a temporary directory it owns; TLS, extra
///   flags and authentication ([`Etcd::enable_auth`]) as the test asks.
/// - [`Etcd::start_on`]: a single-member cluster in `<prefix>-etcd` on the underlay, client URL
///   `http://198.18.0.2:2379`.
/// - [`Etcd::start_cluster`]: member `i` in `<prefix>-etcd` (i = 0) or `<prefix>-etcd<i>`, at
///   `198.18.0.(2 + i)`, with its peer URL on the underlay too.
///
/// Data lives in a directory kept across [`Etcd::stop`] / [`Etcd::kill9`] / [`Etcd::start`].
/// Dropping it kills etcd (and prints its log tail when the test panics).
#[derive(Debug)]
pub struct Etcd {
    process: Daemon,
    /// The namespace of an underlay member, deleted on drop.
    ns: Option<Netns>,
    /// The namespace etcd and etcdctl run in (`None`: the caller's).
    netns_name: Option<String>,
    ip: Ipv4Addr,
    client_port: u16,
    member: Member,
    tls: Option<ServerTls>,
    /// etcdctl's flags besides the endpoint: TLS client files, `--user` once auth is on.
    ctl_flags: Vec<String>,
    /// etcd's flags after the member's.
    extra_args: Vec<String>,
    data_dir: PathBuf,
    /// The temporary directory of a local member, removed on drop.
    _temp: Option<tempfile::TempDir>,
}

/// A certificate and its key.
#[derive(Debug, Clone)]
pub struct CertKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// TLS material for etcd: the CA, the server's certificate, and a client certificate that the
/// server requires when present.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub ca: PathBuf,
    pub server: CertKey,
    pub client: Option<CertKey>,
}

/// How to start a member on loopback (see [`Etcd::start_local`]).
#[derive(Debug, Clone, Default)]
pub struct LocalEtcd {
    /// A named namespace to run in; `None`: the caller's.
    pub netns: Option<String>,
    /// The client address (it must be on a link of that namespace); `None`: `127.0.0.1`.
    pub ip: Option<Ipv4Addr>,
    /// The client port; `None`: a free one.
    pub client_port: Option<u16>,
    pub tls: Option<ServerTls>,
    /// More etcd flags (e.g. `--auth-token-ttl=3`), kept for restarts.
    pub extra_args: Vec<String>,
}

/// How a member joins its cluster.
#[derive(Debug, Clone)]
struct Member {
    name: String,
    peer_url: String,
    initial_cluster: String,
    token: Option<String>,
}

/// A TCP port free on loopback right now.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free loopback port")
}

impl Etcd {
    pub const CLIENT_PORT: u16 = 2379;
    pub const PEER_PORT: u16 = 2380;
    /// At most this many members fit below the hosts' addresses (`.2` .. `.9`).
    pub const MAX_MEMBERS: usize = 8;

    /// Starts a one-member etcd on `127.0.0.1` (free client and peer ports, unless `opts` says
    /// otherwise) and waits until it answers.
    pub fn start_local(opts: LocalEtcd) -> Result<Etcd> {
        let temp = tempfile::tempdir().map_err(|e| Error::io("making a temporary directory", e))?;
        let peer_url = format!("http://127.0.0.1:{}", free_port());
        let ctl_flags = opts
            .tls
            .iter()
            .flat_map(|t| {
                let mut f = vec![format!("--cacert={}", t.ca.display())];
                if let Some(c) = &t.client {
                    f.push(format!("--cert={}", c.cert.display()));
                    f.push(format!("--key={}", c.key.display()));
                }
                f
            })
            .collect();
        let etcd = Etcd {
            process: Daemon::new("etcd", temp.path().join("etcd.log"), 15),
            ns: None,
            netns_name: opts.netns,
            ip: opts.ip.unwrap_or(Ipv4Addr::LOCALHOST),
            client_port: opts.client_port.unwrap_or_else(free_port),
            member: Member {
                name: "t".into(),
                initial_cluster: format!("t={peer_url}"),
                peer_url,
                token: None,
            },
            tls: opts.tls,
            ctl_flags,
            extra_args: std::iter::once("--log-level=warn".to_string())
                .chain(opts.extra_args)
                .collect(),
            data_dir: temp.path().join("data"),
            _temp: Some(temp),
        };
        etcd.start()?;
        Ok(etcd)
    }

    /// Makes the namespace, plugs it into the underlay as port `etcd`, starts etcd with its data
    /// under `dir`, and waits until it answers.
    pub fn start_on(underlay: &Underlay, prefix: &str, dir: &Path) -> Result<Etcd> {
        let ns = Netns::create(&format!("{prefix}-etcd"))?;
        underlay.attach(&ns, "etcd", Underlay::ETCD_IP)?;
        let etcd = Etcd::on_underlay(
            ns,
            Underlay::ETCD_IP,
            Member {
                name: "n0".into(),
                peer_url: format!("http://127.0.0.1:{}", Self::PEER_PORT),
                initial_cluster: format!("n0=http://127.0.0.1:{}", Self::PEER_PORT),
                token: Some("etcd-cluster".into()),
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
            members.push(Etcd::on_underlay(
                ns,
                Underlay::etcd_ip(i),
                Member {
                    name: format!("e{i}"),
                    peer_url: peer(i),
                    initial_cluster: initial_cluster.clone(),
                    token: Some(prefix.to_string()),
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

    fn on_underlay(ns: Netns, ip: Ipv4Addr, member: Member, dir: &Path) -> Result<Etcd> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
        Ok(Etcd {
            process: Daemon::new(
                format!("etcd member {}", member.name),
                dir.join("etcd.log"),
                15,
            ),
            netns_name: Some(ns.name().to_string()),
            ns: Some(ns),
            ip,
            client_port: Self::CLIENT_PORT,
            member,
            tls: None,
            ctl_flags: Vec::new(),
            extra_args: vec!["--logger=zap".into(), "--log-outputs=stderr".into()],
            data_dir: dir.join("data"),
            _temp: None,
        })
    }

    /// `http://<ip>:<port>` (`https` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.ip, self.client_port)
    }

    /// The member's address (the underlay address, or `127.0.0.1`).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The member name (`t` on loopback, `n0` alone on the underlay, `e<i>` in a cluster).
    pub fn member_name(&self) -> &str {
        &self.member.name
    }

    /// The namespace of an underlay member.
    pub fn netns(&self) -> &Netns {
        self.ns
            .as_ref()
            .expect("a loopback etcd has no namespace of its own")
    }

    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// etcd's whole log.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Starts etcd (no-op when running) and waits until it reports healthy (in a cluster that
    /// needs a quorum of members running).
    pub fn start(&self) -> Result<()> {
        self.spawn()?;
        self.wait_healthy(Duration::from_secs(30))
    }

    /// Starts the process (no-op when running) without waiting.
    fn spawn(&self) -> Result<()> {
        let m = &self.member;
        let mut spec = EtcdSpec::single(&m.name, &self.data_dir, &self.endpoint(), &m.peer_url);
        if self.ns.is_some() {
            // etcdctl inside the member's namespace may also use loopback.
            spec.listen_client_urls.push("http://127.0.0.1:2379".into());
        }
        spec.initial_cluster = m.initial_cluster.clone();
        spec.cluster_token = m.token.clone();
        spec.tls = self.tls.as_ref().map(|tls| EtcdTls {
            cert: tls.server.cert.clone(),
            key: tls.server.key.clone(),
            client_ca: tls.client.as_ref().map(|_| tls.ca.clone()),
        });
        spec.extra_args = self.extra_args.clone();
        let mut c = spec.command(self.netns_name.as_deref());
        c.process_group(0);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD") {
                c.env_remove(k);
            }
        }
        self.process.start(c)
    }

    /// Polls `etcdctl endpoint health` on this member until it answers healthy.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let what = format!("etcd member {} to become healthy", self.member.name);
        wait_until(timeout, &what, || {
            self.process.check_alive()?;
            self.etcdctl(&["endpoint", "health"])
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }

    /// `kill -9` the member and reap it; the data directory stays for [`Etcd::start`].
    pub fn kill9(&self) {
        self.process.kill9()
    }

    /// The etcd process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Stops etcd (SIGTERM, SIGKILL after 5 s); the data directory stays for [`Etcd::start`].
    pub fn stop(&self) -> Result<()> {
        self.process.stop(Duration::from_secs(5));
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// `etcdctl --endpoints=<endpoint> args...` (ETCDCTL_API=3), run where etcd runs.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let mut c = self.etcdctl_command();
        c.arg("--dial-timeout=2s")
            .arg("--command-timeout=5s")
            .args(args);
        cmd::check(&mut c)
    }

    fn etcdctl_command(&self) -> Command {
        let mut c = crate::netns::command_in(self.netns_name.as_deref(), "etcdctl");
        c.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args(&self.ctl_flags);
        c
    }

    /// Creates `root` and a `flannel` user (password `s3cret`) that may read and write the
    /// network prefix, and turns authentication on; etcdctl then acts as root.
    pub fn enable_auth(&mut self) -> Result<()> {
        for args in [
            &["user", "add", "root:rootpw"][..],
            &["role", "add", "flannel"],
            &[
                "role",
                "grant-permission",
                "flannel",
                "--prefix=true",
                "readwrite",
                "/coreos.com/network/",
            ],
            &["user", "add", "flannel:s3cret"],
            &["user", "grant-role", "flannel", "flannel"],
            &["auth", "enable"],
        ] {
            self.etcdctl(args)?;
        }
        self.ctl_flags.push("--user=root:rootpw".into());
        Ok(())
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
        let mut c = self.etcdctl_command();
        c.args([
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

/// Standard base64 (with padding), as etcdctl's JSON output uses.
pub(crate) fn base64_decode(s: &str) -> Result<Vec<u8>> {
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
