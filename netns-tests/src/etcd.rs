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

use crate::{cmd, wait_until, Error, Netns, Result, Underlay};

/// etcd in namespace `<prefix>-etcd`, client URL `http://198.18.0.2:2379`. Data lives in a
/// directory kept across [`Etcd::stop`] / [`Etcd::start`]. Dropping it kills etcd.
#[derive(Debug)]
pub struct Etcd {
    child: Mutex<Option<Child>>,
    ns: Netns,
    ip: Ipv4Addr,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Etcd {
    pub const CLIENT_PORT: u16 = 2379;

    /// Makes the namespace, plugs it into the underlay as port `etcd`, starts etcd with its data
    /// under `dir`, and waits until it answers.
    pub fn start_on(underlay: &Underlay, prefix: &str, dir: &Path) -> Result<Etcd> {
        let ns = Netns::create(&format!("{prefix}-etcd"))?;
        underlay.attach(&ns, "etcd", Underlay::ETCD_IP)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
        let etcd = Etcd {
            child: Mutex::new(None),
            ns,
            ip: Underlay::ETCD_IP,
            data_dir: dir.join("data"),
            log: dir.join("etcd.log"),
        };
        etcd.start()?;
        Ok(etcd)
    }

    /// `http://198.18.0.2:2379`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.ip, Self::CLIENT_PORT)
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Starts etcd (no-op when running) and waits until it reports healthy.
    pub fn start(&self) -> Result<()> {
        {
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
            let mut c = self.ns.command("etcd");
            c.args([
                "--name=n0",
                &format!("--data-dir={}", self.data_dir.display()),
                &format!("--listen-client-urls={client},http://127.0.0.1:2379"),
                &format!("--advertise-client-urls={client}"),
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=n0=http://127.0.0.1:2380",
                "--initial-cluster-state=new",
                "--logger=zap",
                "--log-outputs=stderr",
            ])
            .stdin(Stdio::null())
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
        }
        wait_until(Duration::from_secs(30), "etcd to become healthy", || {
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

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps.
pub(crate) fn stop_child(c: &mut Child, grace: Duration) {
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
