//! The delegate path: what flannel's own plugin does. Build the delegate conf, save it in
//! `dataDir/<containerID>` before ADD, exec the plugin from `CNI_PATH`, use the saved conf for
//! DEL (and CHECK).

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Map, Value};

use crate::bridge;
use crate::conf::{NetConf, DEFAULT_BRIDGE};
use crate::ipam::Range;
use crate::spec::{code, CniError, CniResult, Env};
use flannel_subnet_env::SubnetEnv;

fn io_error(what: &str, path: &Path, e: io::Error) -> CniError {
    CniError::new(code::IO_FAILURE, format!("{what} {}: {e}", path.display()))
}

/// flannel's delegate conf.
pub fn build_conf(conf: &NetConf, senv: &SubnetEnv, plugin: &str) -> Map<String, Value> {
    let mut d = conf.delegate.clone();
    d.insert("name".into(), json!(conf.name));
    d.insert("type".into(), json!(plugin));
    d.entry("ipMasq").or_insert(json!(!senv.ipmasq));
    d.entry("mtu").or_insert(json!(senv.mtu));
    if plugin == "bridge" {
        d.entry("isGateway").or_insert(json!(true));
    }
    d.insert("cniVersion".into(), json!(conf.cni_version));
    let mut ipam = conf.ipam.clone().unwrap_or_default();
    ipam.entry("type").or_insert(json!("host-local"));
    let ranges: Vec<Value> = senv
        .lease_networks()
        .iter()
        .map(|n| json!([{ "subnet": n.to_string() }]))
        .collect();
    ipam.insert("ranges".into(), Value::Array(ranges));
    let mut routes: Vec<Value> = ipam
        .get("routes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for n in senv.networks() {
        routes.push(json!({ "dst": n.to_string() }));
    }
    ipam.insert("routes".into(), Value::Array(routes));
    d.insert("ipam".into(), Value::Object(ipam));
    if let Some(rc) = &conf.runtime_config {
        d.insert("runtimeConfig".into(), rc.clone());
    }
    d
}

fn saved_path(conf: &NetConf, env: &Env) -> PathBuf {
    conf.data_dir.join(&env.container_id)
}

/// Where the conf is written before it is renamed into place. One name per container: a
/// leftover from a crash is replaced by the next save and removed by DEL.
fn temp_path(saved: &Path) -> PathBuf {
    let name = saved.file_name().unwrap_or_default().to_string_lossy();
    saved.with_file_name(format!(".{name}.tmp"))
}

/// What `dataDir/<containerID>` holds.
#[derive(Debug)]
pub enum Saved {
    Missing,
    Conf(Map<String, Value>),
    /// Unreadable as a conf (why, in words): written by a plugin that crashed mid-write.
    Corrupt(String),
}

/// The saved delegate conf of this container.
pub fn load_saved(conf: &NetConf, env: &Env) -> CniResult<Saved> {
    let path = saved_path(conf, env);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Saved::Missing),
        Err(e) => return Err(io_error("read saved delegate conf", &path, e)),
    };
    Ok(match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Saved::Conf(m),
        Ok(_) => Saved::Corrupt(format!(
            "saved delegate conf {} is not a JSON object",
            path.display()
        )),
        Err(e) => Saved::Corrupt(format!(
            "saved delegate conf {} is not valid JSON: {e}",
            path.display()
        )),
    })
}

/// Forget this container's saved conf (and any half-written temp file).
pub fn remove_saved(conf: &NetConf, env: &Env) -> CniResult<()> {
    let path = saved_path(conf, env);
    for p in [temp_path(&path), path] {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove saved delegate conf", &p, e)),
        }
    }
    Ok(())
}

/// Replace `path` with `bytes` so that readers, and whoever comes after a crash, find the old
/// content or the new one, never a part: temp file in the same directory, fsync, rename over
/// `path`, fsync the directory. rename(2) replaces a symlink planted at `path` rather than
/// writing through it, and O_EXCL never follows one at the temp path.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_replacing(path, bytes, true)
}

/// [`write_atomically`]; the directory is fsynced only when `sync_dir`. The file's own fsync
/// always comes before the rename: without it a power cut can leave the new name on an empty
/// or partial file (ext4 and xfs commit the rename before delayed data). Without the
/// directory's fsync the file may be missing after a power cut, never corrupt.
fn write_replacing(path: &Path, bytes: &[u8], sync_dir: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_path(path);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if !sync_dir {
        return Ok(());
    }
    // The rename itself must survive a power cut, or the next boot finds the old conf.
    fs::File::open(dir)?.sync_all()
}

fn find_plugin(env: &Env, plugin: &str) -> CniResult<PathBuf> {
    if plugin.contains('/') || plugin.is_empty() || plugin == "." || plugin == ".." {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("invalid delegate plugin name {plugin:?}"),
        ));
    }
    env.path
        .iter()
        .map(|dir| Path::new(dir).join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                code::INTERNAL,
                format!("failed to find plugin {plugin:?} in path {:?}", env.path),
            )
        })
}

/// Run a plugin with `conf` on stdin; its stdout on success, its error otherwise.
pub fn exec(env: &Env, command: &str, conf: &Map<String, Value>) -> CniResult<Vec<u8>> {
    let plugin = conf.get("type").and_then(Value::as_str).unwrap_or("bridge");
    let bin = find_plugin(env, plugin)?;
    let input = serde_json::to_vec(conf).expect("serializable");
    let mut cmd = Command::new(&bin);
    // From `env`, not inherited: GC runs DEL for containers other than the caller's.
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &env.container_id)
        .env("CNI_IFNAME", &env.ifname);
    match &env.netns {
        Some(ns) => cmd.env("CNI_NETNS", ns),
        None => cmd.env_remove("CNI_NETNS"),
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CniError::new(code::INTERNAL, format!("exec {}: {e}", bin.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&input);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::new(code::INTERNAL, format!("wait {}: {e}", bin.display())))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
        if let Some(c) = v.get("code").and_then(Value::as_u64) {
            return Err(CniError {
                code: c as u32,
                msg: format!(
                    "delegate {plugin} {command}: {}",
                    v.get("msg").and_then(Value::as_str).unwrap_or_default()
                ),
                details: v
                    .get("details")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            });
        }
    }
    Err(CniError::new(
        code::DELEGATE_FAILED,
        format!("delegate {plugin} {command} failed ({})", out.status),
    )
    .with_details(String::from_utf8_lossy(&out.stderr).trim()))
}

/// The gateways the reference `bridge` plugin will put on its bridge for this conf, when we
/// can know them: `isGateway` with host-local ranges, whose gateway is the subnet's first
/// address.
fn bridge_gateways(d: &Map<String, Value>, senv: &SubnetEnv) -> Vec<(IpAddr, u8)> {
    let flag = |k: &str| d.get(k).and_then(Value::as_bool).unwrap_or(false);
    let host_local = d
        .get("ipam")
        .and_then(|i| i.get("type"))
        .and_then(Value::as_str)
        == Some("host-local");
    if !(flag("isGateway") || flag("isDefaultGateway")) || !host_local {
        return Vec::new();
    }
    senv.lease_networks()
        .into_iter()
        .filter_map(|n| Range::for_subnet(n).ok().map(|r| (r.gateway, n.prefix())))
        .collect()
}

/// Set in the conf the native path saves. flannel's own plugin, reading the same `dataDir`
/// after a rollback, DELs such a pod with the `bridge` conf it finds, as if it had ADDed it;
/// we undo it natively. (`bridge` and `host-local` ignore keys they do not know.)
pub const NATIVE_MARK: &str = "flannelRsNative";

/// Whether the native path saved this conf (see [`NATIVE_MARK`]).
pub fn is_native(saved: &Map<String, Value>) -> bool {
    saved.get(NATIVE_MARK).and_then(Value::as_bool) == Some(true)
}

/// Saves `d` as this container's conf (`dataDir/<containerID>`), as flannel does before ADD.
pub fn save(conf: &NetConf, env: &Env, d: &Map<String, Value>) -> CniResult<PathBuf> {
    save_with(conf, env, d, true)
}

/// [`save`] without the directory's fsync, for the native path: after a power cut the conf is
/// whole or missing, never empty or partial (flannel's plugin fails DEL on a conf it cannot
/// parse, and treats a missing one as nothing to undo; our DEL does without it). The second
/// fsync would cost more on every ADD than a conf missing after a power cut.
pub fn save_native(conf: &NetConf, env: &Env, senv: &SubnetEnv) -> CniResult<PathBuf> {
    save_with(conf, env, &native_conf(conf, senv), false)
}

fn save_with(
    conf: &NetConf,
    env: &Env,
    d: &Map<String, Value>,
    sync_dir: bool,
) -> CniResult<PathBuf> {
    let path = saved_path(conf, env);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&conf.data_dir)
        .map_err(|e| io_error("create data dir", &conf.data_dir, e))?;
    let bytes = serde_json::to_vec(d).expect("serializable");
    write_replacing(&path, &bytes, sync_dir)
        .map_err(|e| io_error("save delegate conf", &path, e))?;
    Ok(path)
}

/// The conf the native path saves before ADD: what flannel's plugin would have saved for the
/// reference `bridge` (whose result the native path gives), marked as ours.
pub fn native_conf(conf: &NetConf, senv: &SubnetEnv) -> Map<String, Value> {
    let mut d = build_conf(conf, senv, "bridge");
    d.insert(NATIVE_MARK.into(), json!(true));
    d
}

pub fn add(conf: &NetConf, env: &Env, senv: &SubnetEnv, plugin: &str) -> CniResult<Vec<u8>> {
    let d = build_conf(conf, senv, plugin);
    let path = save(conf, env, &d)?;
    if plugin == "bridge" {
        // The reference plugin fails on a bridge that still has the gateway of a subnet
        // flanneld no longer holds; retire it first.
        let gateways = bridge_gateways(&d, senv);
        if !gateways.is_empty() {
            let name = d
                .get("bridge")
                .and_then(Value::as_str)
                .filter(|b| !b.is_empty())
                .unwrap_or(DEFAULT_BRIDGE);
            if let Err(e) = bridge::retire_stale_gateways_of(name, &gateways) {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
        }
    }
    match exec(env, "ADD", &d) {
        Ok(out) => Ok(out),
        Err(e) => {
            // Undo what the delegate may have done halfway, and forget the conf.
            let _ = exec(env, "DEL", &d);
            let _ = fs::remove_file(&path);
            Err(e)
        }
    }
}

/// DEL with the saved conf, then forget it.
pub fn del(conf: &NetConf, env: &Env, saved: &Map<String, Value>) -> CniResult<()> {
    exec(env, "DEL", saved)?;
    remove_saved(conf, env)
}

pub fn check(conf: &NetConf, env: &Env) -> CniResult<()> {
    let mut saved = match load_saved(conf, env)? {
        Saved::Conf(saved) => saved,
        Saved::Corrupt(why) => return Err(CniError::new(code::DECODE, format!("CHECK: {why}"))),
        Saved::Missing => {
            return Err(CniError::new(
                code::UNKNOWN_CONTAINER,
                format!(
                    "CHECK: no saved delegate conf for container {}",
                    env.container_id
                ),
            ))
        }
    };
    if let Some(prev) = &conf.prev_result {
        saved.insert("prevResult".into(), prev.clone());
    }
    exec(env, "CHECK", &saved).map(|_| ())
}

/// The interface a stale attachment is deleted with. flannel's saved conf does not record
/// it, and GC is not given it; runtimes attach a pod's network as eth0.
const GC_IFNAME: &str = "eth0";

/// The containers with a saved conf, as a GC begins: only these may be deleted by it. A conf
/// saved later belongs to an ADD the runtime's list of valid attachments predates.
pub fn list_saved(conf: &NetConf) -> CniResult<Vec<String>> {
    let entries = match fs::read_dir(&conf.data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("read data dir", &conf.data_dir, e)),
    };
    Ok(entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        // Files named after a container, not temp files.
        .filter(|id| crate::spec::validate_container_id(id).is_ok())
        .collect())
}

/// GC: undo the attachments of the listed containers that are not among the valid ones — DEL
/// with the saved conf, so the delegate (and its IPAM) frees what it holds — then forget
/// their confs. A failed DEL keeps its conf for the next GC or DEL; the failures are returned.
pub fn gc_saved(conf: &NetConf, env: &Env, listed: &[String], valid_ids: &[&str]) -> Vec<CniError> {
    let mut failures = Vec::new();
    for id in listed {
        if valid_ids.contains(&id.as_str()) {
            continue;
        }
        let stale = Env {
            container_id: id.clone(),
            netns: None,
            ifname: GC_IFNAME.to_string(),
            path: env.path.clone(),
        };
        // Only delegate confs of this network: the data dir is shared by flannel networks.
        let Ok(Saved::Conf(saved)) = load_saved(conf, &stale) else {
            continue;
        };
        if saved.get("name").and_then(Value::as_str) != Some(conf.name.as_str()) {
            continue;
        }
        // The native GC frees a native pod's addresses (and rules) from the store itself.
        let undone = if is_native(&saved) {
            remove_saved(conf, &stale)
        } else {
            del(conf, &stale, &saved)
        };
        if let Err(e) = undone {
            failures.push(CniError::new(
                e.code,
                format!("GC of container {id}: {}", e.msg),
            ));
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delegate_conf_like_flannel() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel",
                 "delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#,
        )
        .unwrap();
        let senv = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\nFLANNEL_MTU=1450\n\
             FLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let d = Value::Object(build_conf(&conf, &senv, "bridge"));
        assert_eq!(
            d,
            json!({
                "cniVersion": "0.3.1", "name": "cbr0", "type": "bridge",
                "hairpinMode": true, "isDefaultGateway": true, "isGateway": true,
                "ipMasq": false, "mtu": 1450,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.5.72.0/24"}]],
                         "routes": [{"dst": "10.5.0.0/16"}]}
            })
        );
    }

    #[test]
    fn saved_conf_is_replaced_whole_never_in_place() {
        use std::io::Read;
        use std::os::unix::fs::{symlink, PermissionsExt};
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("c0ffee");
        let old = br#"{"name":"cbr0","type":"bridge","old":true}"#;
        let new = br#"{"name":"cbr0","type":"bridge"}"#;
        write_atomically(&path, old).unwrap();
        // A reader that opened the conf before the rewrite (a concurrent DEL) still reads
        // all of the old one: the new one is a new file, the old was not truncated.
        let mut reader = fs::File::open(&path).unwrap();
        // A temp file a crash left behind is no obstacle.
        fs::write(temp_path(&path), b"{\"name\":\"cb").unwrap();
        write_atomically(&path, new).unwrap();
        let mut seen = Vec::new();
        reader.read_to_end(&mut seen).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&seen),
            String::from_utf8_lossy(old),
            "a reader of the old conf saw it change under it"
        );
        assert_eq!(fs::read(&path).unwrap(), new);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("c0ffee")], "temp left");

        // A symlink planted at the path is replaced, its target untouched.
        let target = tmp.path().join("precious");
        fs::write(&target, b"precious").unwrap();
        let planted = tmp.path().join("planted");
        symlink(&target, &planted).unwrap();
        write_atomically(&planted, new).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"precious");
        assert!(!fs::symlink_metadata(&planted)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&planted).unwrap(), new);
    }
}
