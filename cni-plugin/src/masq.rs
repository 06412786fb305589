//! `ipMasq`: masquerade traffic from the pod to anywhere outside its subnet, like the `bridge`
//! plugin does: a chain per container in table `nat`, jumped to from POSTROUTING for the pod's
//! source address. Rules go in with one `iptables-restore --noflush` call.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use ipnetwork::IpNetwork;

use crate::spec::{code, CniError, CniResult};

/// Chain name, as the reference `bridge` plugin names it (`utils.FormatChainName`): `CNI-` and
/// the first 24 hex digits of SHA-512 of network name and container ID. The same name and
/// comment make flannel's own plugin (through `bridge`) able to remove what we set up.
pub fn chain_name(network: &str, container_id: &str) -> String {
    use sha2::{Digest, Sha512};
    let digest = Sha512::new()
        .chain_update(network)
        .chain_update(container_id)
        .finalize();
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("CNI-{hex}")
}

/// `bridge`'s rule comment (`utils.FormatComment`: Go's `%q` of both).
pub fn comment(network: &str, container_id: &str) -> String {
    format!("name: {} id: {}", go_quote(network), go_quote(container_id))
}

/// Go's `%q` of the names a runtime passes (CNI allows printable ASCII in them): quoted,
/// with `"` and `\` escaped.
fn go_quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// The chain and comment this plugin used before it named them as `bridge` does: pods set
/// up by such a version are still torn down.
fn legacy_chain_name(network: &str, container_id: &str) -> String {
    // FNV-1a, 64 bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in network.bytes().chain([0u8]).chain(container_id.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("CNI-FL-{h:016x}")
}

fn legacy_comment(network: &str, container_id: &str) -> String {
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
    // Inside the double quotes of an iptables-restore line, a quote is escaped.
    let comment = comment(network, container_id).replace('"', "\\\"");
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

/// Remove what `setup` made (or an older version of this plugin); missing rules are not an
/// error.
pub fn teardown(network: &str, container_id: &str, ips: &[IpAddr], v6: bool) {
    let bin = tool(v6, false);
    let run = |args: &[&str]| {
        Command::new(bin)
            .args(["-w", "5", "-t", "nat"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let current = (
        chain_name(network, container_id),
        comment(network, container_id),
    );
    let legacy = (
        legacy_chain_name(network, container_id),
        legacy_comment(network, container_id),
    );
    for (i, (chain, comment)) in [current, legacy].iter().enumerate() {
        let mut jumped = false;
        for ip in ips.iter().filter(|ip| ip.is_ipv6() == v6) {
            let src = ip.to_string();
            jumped |= run(&[
                "-D",
                "POSTROUTING",
                "-s",
                &src,
                "-m",
                "comment",
                "--comment",
                comment,
                "-j",
                chain,
            ]);
        }
        // The legacy chain only when a jump to it was there: one call, not three, per DEL.
        if i == 0 || jumped {
            run(&["-F", chain]);
            run(&["-X", chain]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_and_comment_are_bridges() {
        // As the reference plugin names them (utils.FormatChainName / FormatComment), e.g.
        // in `iptables -t nat -S` after `bridge` ADDed container pod-1 to network n.
        assert_eq!(chain_name("n", "pod-1"), {
            use sha2::{Digest, Sha512};
            let d = Sha512::digest(b"npod-1");
            let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
            format!("CNI-{}", &hex[..24])
        });
        assert_eq!(
            chain_name("nt22267x1-node", "pod-1"),
            "CNI-c57275748d203cc3d0aad7e2"
        );
        assert_eq!(comment("cbr0", "c1"), r#"name: "cbr0" id: "c1""#);
        assert_eq!(comment("a\"b", "c"), r#"name: "a\"b" id: "c""#);
    }

    #[test]
    fn chain_names_fit_iptables() {
        let c = chain_name("cbr0", "0123456789abcdef0123456789abcdef");
        assert!(c.len() <= 28, "{c}");
        assert_eq!(c, chain_name("cbr0", "0123456789abcdef0123456789abcdef"));
        assert_ne!(c, chain_name("cbr1", "0123456789abcdef0123456789abcdef"));
    }
}
