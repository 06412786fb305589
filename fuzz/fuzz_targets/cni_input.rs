//! What a container runtime hands the CNI plugin: `CNI_*` variables and the stdin conf (with
//! `prevResult` and `runtimeConfig`). Everything parses or fails with a CNI error, never panics.
//!
//! Input layout: the first byte picks the command, then `KEY=VALUE` lines up to an empty line
//! are the environment, and the rest is stdin.
#![no_main]

use std::collections::HashMap;

use flannel_cni::conf::{sniff_version, NetConf};
use flannel_cni::spec::{self, Command, Env};
use libfuzzer_sys::fuzz_target;

const COMMANDS: [Command; 6] = [
    Command::Add,
    Command::Del,
    Command::Check,
    Command::Status,
    Command::Gc,
    Command::Version,
];

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let cmd = COMMANDS[usize::from(first) % COMMANDS.len()];
    let text = String::from_utf8_lossy(rest);
    let (env_text, stdin) = text.split_once("\n\n").unwrap_or((&text, ""));
    let vars: HashMap<String, String> = env_text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Some(name) = vars.get("CNI_COMMAND") {
        let _ = Command::parse(name);
    }
    let _ = Env::from_vars(cmd, &vars);
    let version = sniff_version(stdin.as_bytes());
    if let Ok(conf) = NetConf::parse(stdin.as_bytes()) {
        let _ = conf.delegate_plugin();
        let _ = conf.ipam_data_dir();
        let _ = conf.ipam_routes();
        let _ = spec::check_version(&conf.cni_version, cmd);
    }
    let err = spec::CniError::new(7, "fuzz");
    let _ = err.to_json(version.as_deref().unwrap_or("1.1.0"));
});
