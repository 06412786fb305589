//! `flannel`: the CNI plugin that gives pods addresses from the host's flannel lease.
//!
//! Native path (default): bridge, veth pair, host-local-compatible IPAM and routes, in-process
//! over netlink. Delegate path (`delegate.type` set, or options only the real `bridge` plugin
//! has): what flannel's own plugin does — build a delegate conf, save it, exec the plugin.
//!
//! `no_main`: a runtime calls the plugin once per pod and waits for it, so start-up counts.
//! The C `main` below skips what Rust's own start-up does for long-running programs (stack
//! guard discovery via /proc/self/maps, signal-stack handlers, SIGPIPE and stdio checks).

#![cfg_attr(not(test), no_main)]
// Unit-test builds use the test harness's main, which leaves the plugin's entry point unused.
#![cfg_attr(test, allow(dead_code))]

use flannel_cni::{bridge, conf, delegate, ipam, masq, spec};

use std::collections::HashMap;
use std::io::{Read, Write};

use conf::{BridgeOpts, NetConf};
use flannel_subnet_env::SubnetEnv;
use spec::{code, CniError, CniResult, Command, Env};

#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    plugin_main();
    0
}

fn plugin_main() {
    let vars: HashMap<String, String> = std::env::vars().collect();
    let (version, outcome) = run(&vars);
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(bytes)) => {
            let _ = out.write_all(&bytes);
            let _ = out.flush();
        }
        Ok(None) => {}
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&version));
            let _ = out.flush();
            eprintln!("flannel: {e}");
            std::process::exit(1);
        }
    }
}

/// Returns the version errors are reported in, and what to print.
fn run(vars: &HashMap<String, String>) -> (String, CniResult<Option<Vec<u8>>>) {
    let mut version = spec::CURRENT_VERSION.to_string();
    let cmd = match vars.get("CNI_COMMAND").filter(|c| !c.is_empty()) {
        Some(c) => Command::parse(c),
        None => Err(CniError::new(
            code::INVALID_ENV,
            "required environment variables missing: CNI_COMMAND",
        )),
    };
    if let Ok(Command::Version) = cmd {
        let v = serde_json::to_vec(&spec::version_info()).expect("serializable");
        return (version, Ok(Some(v)));
    }
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        return (
            version,
            Err(CniError::new(code::IO_FAILURE, format!("read stdin: {e}"))),
        );
    }
    if let Some(v) =
        conf::sniff_version(&stdin).filter(|v| spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
    {
        version = v;
    }
    let outcome = cmd.and_then(|cmd| dispatch(cmd, vars, &stdin));
    (version, outcome)
}

fn dispatch(
    cmd: Command,
    vars: &HashMap<String, String>,
    stdin: &[u8],
) -> CniResult<Option<Vec<u8>>> {
    let env = Env::from_vars(cmd, vars)?;
    let conf = NetConf::parse(stdin)?;
    spec::check_version(&conf.cni_version, cmd)?;
    match cmd {
        Command::Add => cmd_add(&conf, &env).map(Some),
        Command::Del => cmd_del(&conf, &env).map(|()| None),
        Command::Check => cmd_check(&conf, &env).map(|()| None),
        Command::Status => cmd_status(&conf).map(|()| None),
        Command::Gc => cmd_gc(&conf, &env).map(|()| None),
        Command::Version => unreachable!("handled before reading stdin"),
    }
}

fn cmd_add(conf: &NetConf, env: &Env) -> CniResult<Vec<u8>> {
    let senv = SubnetEnv::load(&conf.subnet_file)?;
    if let Some(plugin) = conf.delegate_plugin() {
        return delegate::add(conf, env, &senv, &plugin);
    }
    // Saved like flannel's delegate conf, so that flannel's own plugin can DEL this pod too
    // (after a rollback to it, or with both installed on one node).
    delegate::save_native(conf, env, &senv)?;
    let result = match bridge::add(conf, env, &senv) {
        Ok(r) => r,
        Err(e) => {
            let _ = delegate::remove_saved(conf, env);
            return Err(e);
        }
    };
    Ok(serde_json::to_vec(&result.to_json(&conf.cni_version)).expect("serializable"))
}

fn cmd_del(conf: &NetConf, env: &Env) -> CniResult<()> {
    // A conf saved at ADD (by us on the delegate path, or by flannel's own plugin before
    // this one was installed) says exactly how to undo it.
    match delegate::load_saved(conf, env)? {
        delegate::Saved::Conf(saved) if delegate::is_native(&saved) => {
            let senv = SubnetEnv::load(&conf.subnet_file).ok();
            bridge::del(conf, env, senv.as_ref())?;
            return delegate::remove_saved(conf, env);
        }
        delegate::Saved::Conf(saved) => return delegate::del(conf, env, &saved),
        delegate::Saved::Corrupt(why) => return del_with_current_conf(conf, env, &why),
        delegate::Saved::Missing => {}
    }
    if conf.delegate_plugin().is_some() {
        return Ok(()); // nothing saved: nothing was set up
    }
    let senv = SubnetEnv::load(&conf.subnet_file).ok();
    bridge::del(conf, env, senv.as_ref())
}

/// A saved conf that cannot be read (left half-written by a crash, e.g. by an older plugin
/// that wrote it in place) cannot say how to undo the ADD, and must not make DEL fail for
/// ever: undo what the current config sets up, then forget the file.
fn del_with_current_conf(conf: &NetConf, env: &Env, why: &str) -> CniResult<()> {
    eprintln!("flannel: {why}; deleting with the current network config instead");
    let senv = SubnetEnv::load(&conf.subnet_file).ok();
    let undone = match (conf.delegate_plugin(), &senv) {
        (Some(plugin), Some(senv)) => {
            delegate::exec(env, "DEL", &delegate::build_conf(conf, senv, &plugin)).map(|_| ())
        }
        // Without the lease the delegate conf cannot be rebuilt: what the native path
        // removes (the pod's interface, its host-local addresses, masquerading) is what
        // `bridge` with host-local set up.
        _ => bridge::del(conf, env, senv.as_ref()),
    };
    delegate::remove_saved(conf, env)?;
    undone
}

fn cmd_check(conf: &NetConf, env: &Env) -> CniResult<()> {
    if conf.delegate_plugin().is_some() {
        return delegate::check(conf, env);
    }
    let senv = SubnetEnv::load(&conf.subnet_file)?;
    bridge::check(conf, env, &senv)
}

fn cmd_status(conf: &NetConf) -> CniResult<()> {
    SubnetEnv::load(&conf.subnet_file)
        .map(|_| ())
        .map_err(|e| CniError::new(code::NOT_AVAILABLE, format!("plugin not available: {e}")))
}

fn cmd_gc(conf: &NetConf, env: &Env) -> CniResult<()> {
    let valid = conf
        .valid_attachments
        .clone()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "GC needs cni.dev/valid-attachments"))?;
    let ids: Vec<&str> = valid.iter().map(|(id, _)| id.as_str()).collect();
    let host_local = conf
        .ipam
        .as_ref()
        .and_then(|i| i.get("type"))
        .and_then(|t| t.as_str())
        .is_none_or(|t| t == "host-local");
    // First of all, what exists as the GC begins: a pod set up from here on is not in the
    // runtime's list, and must survive this GC. Both lists under the store's lock, which
    // every allocation takes: an ADD that saves its conf after the listing allocates after
    // the snapshot, so it is in neither.
    let (listed, began) = if host_local {
        let store = ipam::Store::lock(&conf.ipam_data_dir(), &conf.name)?;
        (delegate::list_saved(conf)?, Some(store.gc_snapshot()?))
    } else {
        (delegate::list_saved(conf)?, None)
    };
    let failures = delegate::gc_saved(conf, env, &listed, &ids);
    if let Some(began) = began {
        let released = ipam::Store::lock(&conf.ipam_data_dir(), &conf.name)?.gc(&valid, &began)?;
        let senv = SubnetEnv::load(&conf.subnet_file).ok();
        if conf.delegate_plugin().is_none() {
            if let Ok(opts) = BridgeOpts::resolve(&conf.delegate, senv.as_ref()) {
                if opts.ip_masq {
                    for a in &released {
                        masq::teardown(&conf.name, &a.container_id, &[a.ip], a.ip.is_ipv6());
                    }
                }
            }
        }
    }
    match failures.len() {
        0 => Ok(()),
        n => {
            let first = &failures[0];
            Err(CniError::new(
                first.code,
                format!("{} (and {} more failed)", first.msg, n - 1),
            ))
        }
    }
}
