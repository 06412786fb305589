//! `ipMasq`: masquerade traffic from the pod to anywhere outside its subnet, like the `bridge`
//! plugin does: a chain per container in table `nat`, jumped to from POSTROUTING for the pod's
//! source address. Rules go in with one `iptables-restore --noflush` call.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use ipnetwork::IpNetwork;

use crate::spec::{code, CniError, CniResult};

/// Chain name: `CNI-FL-` + 16 hex digits of a hash of network name and container ID.
pub fn chain_name(network: &str, container_id: &str) -> String {
    // FNV-1a, 64 bits: stable across versions and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in network.bytes().chain([0u8]).chain(container_id.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("CNI-FL-{h:016x}")
}

pub fn comment(network: &str, container_id: &str) -> String {
    format!("flannel-cni name={network} id={container_id}")
}

fn tool(v6: bool, restore: bool) -> &'static str {
    match (v6, restore) {
        (false, false) => "iptables",
        (false, true) => "iptables-restore",
        (true, false) => "ip6tables",
        (true, true) => "ip6tables-restore",
    }
}

/// Install masquerading for `addr` (the pod's address with its subnet's prefix).
pub fn setup(network: &str, container_id: &str, addr: IpNetwork) -> CniResult<()> {
    let chain = chain_name(network, container_id);
    let comment = comment(network, container_id);
    let subnet = IpNetwork::new(addr.network(), addr.prefix()).expect("valid prefix");
    let multicast = if addr.is_ipv4() {
        "224.0.0.0/4"
    } else {
        "ff00::/8"
    };
    let rules = format!(
        "*nat\n:{chain} - [0:0]\n\
         -A {chain} -d {subnet} -m comment --comment \"{comment}\" -j ACCEPT\n\
         -A {chain} ! -d {multicast} -m comment --comment \"{comment}\" -j MASQUERADE\n\
         -A POSTROUTING -s {ip} -m comment --comment \"{comment}\" -j {chain}\n\
         COMMIT\n",
        ip = addr.ip()
    );
    let bin = tool(addr.is_ipv6(), true);
    let mut child = Command::new(bin)
        .args(["-w", "5", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CniError::new(code::INTERNAL, format!("ipMasq: cannot run {bin}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(rules.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::new(code::INTERNAL, format!("ipMasq: {bin}: {e}")))?;
    if !out.status.success() {
        return Err(CniError::new(
            code::INTERNAL,
            format!(
                "ipMasq: {bin} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// Remove what `setup` made; missing rules are not an error.
pub fn teardown(network: &str, container_id: &str, ips: &[IpAddr], v6: bool) {
    let chain = chain_name(network, container_id);
    let comment = comment(network, container_id);
    let bin = tool(v6, false);
    let run = |args: &[&str]| {
        let _ = Command::new(bin)
            .args(["-w", "5", "-t", "nat"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    };
    for ip in ips.iter().filter(|ip| ip.is_ipv6() == v6) {
        let src = ip.to_string();
        run(&[
            "-D",
            "POSTROUTING",
            "-s",
            &src,
            "-m",
            "comment",
            "--comment",
            &comment,
            "-j",
            &chain,
        ]);
    }
    run(&["-F", &chain]);
    run(&["-X", &chain]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_fit_iptables() {
        let c = chain_name("cbr0", "0123456789abcdef0123456789abcdef");
        assert!(c.len() <= 28, "{c}");
        assert_eq!(c, chain_name("cbr0", "0123456789abcdef0123456789abcdef"));
        assert_ne!(c, chain_name("cbr1", "0123456789abcdef0123456789abcdef"));
    }
}
