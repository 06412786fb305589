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

use flannel_cni::{bridge, conf, delegate, ipam, masq, spec, subnet_env};

use std::collections::HashMap;
use std::io::{Read, Write};

use conf::{BridgeOpts, NetConf};
use spec::{code, CniError, CniResult, Command, Env};
use subnet_env::SubnetEnv;

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
        Command::Gc => cmd_gc(&conf).map(|()| None),
        Command::Version => unreachable!("handled before reading stdin"),
    }
}

fn cmd_add(conf: &NetConf, env: &Env) -> CniResult<Vec<u8>> {
    let senv = SubnetEnv::load(&conf.subnet_file)?;
    if let Some(plugin) = conf.delegate_plugin() {
        return delegate::add(conf, env, &senv, &plugin);
    }
    let result = bridge::add(conf, env, &senv)?;
    Ok(serde_json::to_vec(&result.to_json(&conf.cni_version)).expect("serializable"))
}

fn cmd_del(conf: &NetConf, env: &Env) -> CniResult<()> {
    // A conf saved at ADD (by us on the delegate path, or by flannel's own plugin before
    // this one was installed) says exactly how to undo it.
    if delegate::load_saved(conf, env)?.is_some() {
        return delegate::del(conf, env);
    }
    if conf.delegate_plugin().is_some() {
        return Ok(()); // nothing saved: nothing was set up
    }
    let senv = SubnetEnv::load(&conf.subnet_file).ok();
    bridge::del(conf, env, senv.as_ref())
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

fn cmd_gc(conf: &NetConf) -> CniResult<()> {
    let valid = conf
        .valid_attachments
        .clone()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "GC needs cni.dev/valid-attachments"))?;
    let ids: Vec<&str> = valid.iter().map(|(id, _)| id.as_str()).collect();
    delegate::gc_saved(conf, &ids)?;
    let host_local = conf
        .ipam
        .as_ref()
        .and_then(|i| i.get("type"))
        .and_then(|t| t.as_str())
        .is_none_or(|t| t == "host-local");
    if !host_local {
        return Ok(());
    }
    let released = ipam::Store::lock(&conf.ipam_data_dir(), &conf.name)?.gc(&valid)?;
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
    Ok(())
}
