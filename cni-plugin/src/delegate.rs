//! The delegate path: what flannel's own plugin does. Build the delegate conf, save it in
//! `dataDir/<containerID>` before ADD, exec the plugin from `CNI_PATH`, use the saved conf for
//! DEL (and CHECK).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Map, Value};

use crate::conf::NetConf;
use crate::spec::{code, CniError, CniResult, Env};
use crate::subnet_env::SubnetEnv;

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

/// The saved delegate conf of this container, if any.
pub fn load_saved(conf: &NetConf, env: &Env) -> CniResult<Option<Map<String, Value>>> {
    let path = saved_path(conf, env);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("read saved delegate conf", &path, e)),
    };
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        _ => Err(CniError::new(
            code::DECODE,
            format!(
                "saved delegate conf {} is not a JSON object",
                path.display()
            ),
        )),
    }
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
    let mut child = Command::new(&bin)
        .env("CNI_COMMAND", command)
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

pub fn add(conf: &NetConf, env: &Env, senv: &SubnetEnv, plugin: &str) -> CniResult<Vec<u8>> {
    let d = build_conf(conf, senv, plugin);
    let path = saved_path(conf, env);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&conf.data_dir)
        .map_err(|e| io_error("create data dir", &conf.data_dir, e))?;
    let bytes = serde_json::to_vec(&d).expect("serializable");
    // A symlink planted at the path is replaced, never written through.
    match fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_symlink() => {
            fs::remove_file(&path).map_err(|e| io_error("remove planted symlink", &path, e))?
        }
        _ => {}
    }
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .and_then(|mut f| f.write_all(&bytes))
        .map_err(|e| io_error("save delegate conf", &path, e))?;
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

/// DEL with the saved conf; an unknown container is not an error.
pub fn del(conf: &NetConf, env: &Env) -> CniResult<()> {
    let Some(saved) = load_saved(conf, env)? else {
        return Ok(());
    };
    exec(env, "DEL", &saved)?;
    let path = saved_path(conf, env);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove saved delegate conf", &path, e)),
    }
}

pub fn check(conf: &NetConf, env: &Env) -> CniResult<()> {
    let Some(mut saved) = load_saved(conf, env)? else {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "CHECK: no saved delegate conf for container {}",
                env.container_id
            ),
        ));
    };
    if let Some(prev) = &conf.prev_result {
        saved.insert("prevResult".into(), prev.clone());
    }
    exec(env, "CHECK", &saved).map(|_| ())
}

/// GC: forget the saved confs of containers that are not among the valid attachments.
pub fn gc_saved(conf: &NetConf, valid_ids: &[&str]) -> CniResult<()> {
    let entries = match fs::read_dir(&conf.data_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error("read data dir", &conf.data_dir, e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if valid_ids.contains(&name) {
            continue;
        }
        // Only files that are delegate confs of this network.
        let Ok(bytes) = fs::read(entry.path()) else {
            continue;
        };
        let ours = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.get("name")
                    .and_then(Value::as_str)
                    .map(|n| n == conf.name)
            })
            .unwrap_or(false);
        if ours {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
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
            "x",
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
}
