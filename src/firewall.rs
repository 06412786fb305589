//! Masquerade and forward rules (§6 of the reference): iptables by default, nftables when the
//! network config asks for it. Rules are compared with what the kernel has and re-installed
//! only when they differ, so a resync every few seconds costs one read.

use std::fmt;
use std::io::Write;
use std::process::{Command, Stdio};

use ipnetwork::{Ipv4Network, Ipv6Network};

const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
const FWD_CHAIN: &str = "FLANNEL-FWD";
const MASQ_COMMENT: &str = "flanneld masq";
const FWD_COMMENT: &str = "flanneld forward";

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("running {cmd}: {err}")]
    Spawn { cmd: String, err: std::io::Error },
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: String, stderr: String },
}

/// Which IP version a set of rules is for: it picks the tool (`iptables` or `ip6tables`), the
/// nftables table and the multicast range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

/// What the rules of one address family are written for: the overlay network and our own
/// subnet, as CIDR text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyNetworks {
    pub family: IpFamily,
    pub network: String,
    pub subnet: String,
}

impl FamilyNetworks {
    pub fn new(family: IpFamily, network: impl fmt::Display, subnet: impl fmt::Display) -> Self {
        FamilyNetworks {
            family,
            network: network.to_string(),
            subnet: subnet.to_string(),
        }
    }
}

/// Everything the daemon wants installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub families: Vec<FamilyNetworks>,
    pub masquerade: bool,
    pub forward: bool,
    pub fully_random: bool,
}

impl Rules {
    pub fn new(
        v4: Option<(Ipv4Network, Ipv4Network)>,
        v6: Option<(Ipv6Network, Ipv6Network)>,
        masquerade: bool,
        forward: bool,
        fully_random: bool,
    ) -> Rules {
        let v4 = v4.map(|(network, subnet)| FamilyNetworks::new(IpFamily::V4, network, subnet));
        let v6 = v6.map(|(network, subnet)| FamilyNetworks::new(IpFamily::V6, network, subnet));
        Rules {
            families: v4.into_iter().chain(v6).collect(),
            masquerade,
            forward,
            fully_random,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.families.is_empty() || !(self.masquerade || self.forward)
    }
}

/// A rule backend. `ensure` is idempotent and cheap when nothing changed.
pub trait Firewall: Send {
    /// Makes the kernel hold `want`; returns true when rules had to be (re)installed.
    fn ensure(&mut self, want: &Rules) -> Result<bool, FirewallError>;
}

pub fn create(nftables: bool) -> Box<dyn Firewall> {
    if nftables {
        Box::new(Nftables)
    } else {
        Box::new(Iptables)
    }
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    let shown = format!("{cmd} {}", args.join(" "));
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| FirewallError::Spawn {
            cmd: shown.clone(),
            err,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|err| FirewallError::Spawn {
                cmd: shown.clone(),
                err,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|err| FirewallError::Spawn {
            cmd: shown.clone(),
            err,
        })?;
    if !out.status.success() {
        return Err(FirewallError::Failed {
            cmd: shown,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// iptables / ip6tables through `*-restore --noflush` batches.
pub struct Iptables;

struct ChainSpec {
    table: &'static str,
    chain: &'static str,
    parent: &'static str,
    comment: &'static str,
    rules: Vec<String>,
}

impl ChainSpec {
    fn jump(&self) -> String {
        format!(
            "-A {} -m comment --comment \"{}\" -j {}",
            self.parent, self.comment, self.chain
        )
    }
}

/// Rule lines exactly as `iptables-save` prints them, so that a comparison is a string match.
fn iptables_chains(f: &FamilyNetworks, rules: &Rules) -> Vec<ChainSpec> {
    let (net, sub) = (&f.network, &f.subnet);
    let multicast = match f.family {
        IpFamily::V4 => "224.0.0.0/4",
        IpFamily::V6 => "ff00::/8",
    };
    let random = if rules.fully_random {
        " --random-fully"
    } else {
        ""
    };
    let masq = |m: &str, target: &str| {
        format!("-A {MASQ_CHAIN} {m} -m comment --comment \"{MASQ_COMMENT}\" -j {target}")
    };
    let mut chains = Vec::new();
    if rules.masquerade {
        chains.push(ChainSpec {
            table: "nat",
            chain: MASQ_CHAIN,
            parent: "POSTROUTING",
            comment: MASQ_COMMENT,
            rules: vec![
                masq("-m mark --mark 0x4000/0x4000", "RETURN"),
                masq(&format!("-s {sub} -d {net}"), "RETURN"),
                masq(&format!("-s {net} -d {sub}"), "RETURN"),
                masq(&format!("! -s {net} -d {sub}"), "RETURN"),
                masq(
                    &format!("-s {net} ! -d {multicast}"),
                    &format!("MASQUERADE{random}"),
                ),
                masq(
                    &format!("! -s {net} -d {net}"),
                    &format!("MASQUERADE{random}"),
                ),
            ],
        });
    }
    if rules.forward {
        let fwd = |m: String| {
            format!("-A {FWD_CHAIN} {m} -m comment --comment \"{FWD_COMMENT}\" -j ACCEPT")
        };
        chains.push(ChainSpec {
            table: "filter",
            chain: FWD_CHAIN,
            parent: "FORWARD",
            comment: FWD_COMMENT,
            rules: vec![fwd(format!("-s {net}")), fwd(format!("-d {net}"))],
        });
    }
    chains
}

impl Iptables {
    fn ensure_family(&self, f: &FamilyNetworks, rules: &Rules) -> Result<bool, FirewallError> {
        let (save, restore) = match f.family {
            IpFamily::V4 => ("iptables-save", "iptables-restore"),
            IpFamily::V6 => ("ip6tables-save", "ip6tables-restore"),
        };
        let mut batch = String::new();
        for spec in iptables_chains(f, rules) {
            let current = run(save, &["-t", spec.table], None)?;
            let prefix = format!("-A {} ", spec.chain);
            let have: Vec<&str> = current.lines().filter(|l| l.starts_with(&prefix)).collect();
            let jump = spec.jump();
            let jumps = current.lines().filter(|l| *l == jump).count();
            if have == spec.rules && jumps == 1 {
                continue;
            }
            batch.push_str(&format!("*{}\n:{} - [0:0]\n", spec.table, spec.chain));
            for r in &spec.rules {
                batch.push_str(r);
                batch.push('\n');
            }
            if jumps == 0 {
                batch.push_str(&jump.replacen(
                    &format!("-A {}", spec.parent),
                    &format!("-I {} 1", spec.parent),
                    1,
                ));
                batch.push('\n');
            }
            for _ in 1..jumps {
                batch.push_str(&jump.replacen("-A ", "-D ", 1));
                batch.push('\n');
            }
            batch.push_str("COMMIT\n");
        }
        if batch.is_empty() {
            return Ok(false);
        }
        run(restore, &["--noflush"], Some(&batch))?;
        Ok(true)
    }
}

impl Firewall for Iptables {
    fn ensure(&mut self, want: &Rules) -> Result<bool, FirewallError> {
        let mut changed = false;
        for f in &want.families {
            changed |= self.ensure_family(f, want)?;
        }
        Ok(changed)
    }
}

/// nftables: one table per family (`flannel-ipv4`, `flannel-ipv6`), replaced atomically.
pub struct Nftables;

fn nft_table(f: &FamilyNetworks) -> (&'static str, &'static str) {
    match f.family {
        IpFamily::V4 => ("ip", "flannel-ipv4"),
        IpFamily::V6 => ("ip6", "flannel-ipv6"),
    }
}

/// The table's rules as `nft list table` prints them, one per line, without handles.
fn nft_rules(f: &FamilyNetworks, rules: &Rules) -> Vec<String> {
    let (net, sub) = (&f.network, &f.subnet);
    let (ip, multicast) = match f.family {
        IpFamily::V4 => ("ip", "224.0.0.0/4"),
        IpFamily::V6 => ("ip6", "ff00::/8"),
    };
    let masq = if rules.fully_random {
        "masquerade fully-random"
    } else {
        "masquerade"
    };
    let mut out = Vec::new();
    if rules.masquerade {
        out.extend([
            format!("meta mark & 0x00004000 == 0x00004000 return comment \"{MASQ_COMMENT}\""),
            format!("{ip} saddr {sub} {ip} daddr {net} return comment \"{MASQ_COMMENT}\""),
            format!("{ip} saddr {net} {ip} daddr {sub} return comment \"{MASQ_COMMENT}\""),
            format!("{ip} saddr != {net} {ip} daddr {sub} return comment \"{MASQ_COMMENT}\""),
            format!("{ip} saddr {net} {ip} daddr != {multicast} {masq} comment \"{MASQ_COMMENT}\""),
            format!("{ip} saddr != {net} {ip} daddr {net} {masq} comment \"{MASQ_COMMENT}\""),
        ]);
    }
    if rules.forward {
        out.extend([
            format!("{ip} saddr {net} accept comment \"{FWD_COMMENT}\""),
            format!("{ip} daddr {net} accept comment \"{FWD_COMMENT}\""),
        ]);
    }
    out
}

fn nft_script(f: &FamilyNetworks, rules: &Rules) -> String {
    let (fam, table) = nft_table(f);
    let all = nft_rules(f, rules);
    let masq_count = if rules.masquerade { 6 } else { 0 };
    let (masq, fwd) = all.split_at(masq_count);
    let body = |rules: &[String]| {
        rules
            .iter()
            .map(|r| format!("\t\t{r}\n"))
            .collect::<String>()
    };
    format!(
        "table {fam} {table}\ndelete table {fam} {table}\ntable {fam} {table} {{\n\
         \tchain postrtg {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n{}\t}}\n\
         \tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n{}\t}}\n}}\n",
        body(masq),
        body(fwd)
    )
}

impl Nftables {
    fn current_rules(f: &FamilyNetworks) -> Option<Vec<String>> {
        let (fam, table) = nft_table(f);
        let listing = run("nft", &["list", "table", fam, table], None).ok()?;
        Some(
            listing
                .lines()
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("table ")
                        && !l.starts_with("chain ")
                        && !l.starts_with("type ")
                        && *l != "}"
                })
                .map(String::from)
                .collect(),
        )
    }
}

impl Firewall for Nftables {
    fn ensure(&mut self, want: &Rules) -> Result<bool, FirewallError> {
        let mut changed = false;
        for f in &want.families {
            if Self::current_rules(f).as_deref() == Some(&nft_rules(f, want)[..]) {
                continue;
            }
            run("nft", &["-f", "-"], Some(&nft_script(f, want)))?;
            changed = true;
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rules for the IPv4 network 10.5.0.0/16 and our subnet 10.5.3.0/24.
    fn v4_rules(masquerade: bool, forward: bool, fully_random: bool) -> Rules {
        let networks = (
            "10.5.0.0/16".parse().unwrap(),
            "10.5.3.0/24".parse().unwrap(),
        );
        Rules::new(Some(networks), None, masquerade, forward, fully_random)
    }

    #[test]
    fn iptables_rules_follow_flannel() {
        let r = v4_rules(true, true, true);
        let chains = iptables_chains(&r.families[0], &r);
        assert_eq!(
            chains[0].rules,
            [
                "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN",
                "-A FLANNEL-POSTRTG -s 10.5.3.0/24 -d 10.5.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN",
                "-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.3.0/24 -m comment --comment \"flanneld masq\" -j RETURN",
                "-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.3.0/24 -m comment --comment \"flanneld masq\" -j RETURN",
                "-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully",
                "-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully",
            ]
        );
        assert_eq!(
            chains[1].rules,
            [
                "-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
                "-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
            ]
        );
    }

    #[test]
    fn fully_random_can_be_disabled_and_ipv6_exempts_multicast() {
        let r = Rules::new(
            None,
            Some((
                "fc00::/48".parse().unwrap(),
                "fc00:0:0:3::/64".parse().unwrap(),
            )),
            true,
            false,
            false,
        );
        let chains = iptables_chains(&r.families[0], &r);
        assert_eq!(chains.len(), 1);
        assert!(chains[0].rules[4].contains("! -d ff00::/8"));
        assert!(chains[0].rules[4].ends_with("-j MASQUERADE"));
        assert!(nft_script(&r.families[0], &r).contains("table ip6 flannel-ipv6"));
    }

    #[test]
    fn nothing_to_do_without_masq_or_forward() {
        assert!(v4_rules(false, false, true).is_empty());
    }
}
