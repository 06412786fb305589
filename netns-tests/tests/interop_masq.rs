//! `--ip-masq` on a Go host and a Rust host (root only, flannel's Go peers from
//! `scripts/go-peers.sh`): both leave exactly the same chains and rules in the `nat` and
//! `filter` tables (the host's own subnet aside), no rule twice, also after each host switched
//! to the other daemon; pod traffic to an address outside the Network leaves with the host's
//! address on both, and a connection from outside forwarded to a pod on another host is
//! masqueraded by both. With `EnableNFTables` the same, except for the two rules where
//! flannel's nftables rules mean something else than its iptables rules (README, "What it does
//! differently from flannel"): flannel's let the forwarded connection through unmasqueraded.

mod interop;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use netns_tests::{wait_until, Backend, Cluster, Host, Netns, Pod};

/// A machine on the underlay, outside the Network.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);
const PORT: u16 = 7412;

/// `iptables-save` of the `nat` and `filter` tables as a user compares them: no comments, no
/// counters, the host's own subnet written `<own subnet>`.
fn rules(h: &Host) -> Result<Vec<String>, String> {
    let own = h.subnet().map_err(|e| e.to_string())?.to_string();
    let mut lines = Vec::new();
    for table in ["nat", "filter"] {
        let out = h
            .netns()
            .exec("iptables-save", &["-t", table])
            .map_err(|e| e.to_string())?;
        for l in out.lines().filter(|l| !l.starts_with('#')) {
            let l = match l.split_once(" [") {
                Some((chain, _)) if l.starts_with(':') => chain.to_string(),
                _ => l.to_string(),
            };
            lines.push(l.replace(&own, "<own subnet>"));
        }
    }
    Ok(lines)
}

/// The rules that appear more than once.
fn twice(rules: &[String]) -> Vec<String> {
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for r in rules.iter().filter(|r| r.starts_with("-A ")) {
        *seen.entry(r).or_default() += 1;
    }
    seen.into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(r, n)| format!("{r} ×{n}"))
        .collect()
}

/// How long the rules are watched once in place: two resync periods of `--iptables-resync=1`,
/// so a daemon that re-adds what it finds would be caught doing it.
const WATCH: Duration = Duration::from_millis(2500);

/// Both hosts have flannel's whole set (the last rule of each chain is there), the same rules
/// in the same order (own subnet aside) and none twice; watched for [`WATCH`].
fn assert_same_rules(c: &Cluster, when: &str) {
    let (a, b) = (c.host(0), c.host(1));
    let complete = |r: &[String]| {
        r.iter()
            .any(|l| l.starts_with("-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16"))
            && r.iter()
                .any(|l| l.starts_with("-A FLANNEL-FWD -d 10.5.0.0/16"))
    };
    wait_until(
        interop::CONVERGE,
        &format!("{when}: the rules on both hosts"),
        || {
            let (ra, rb) = (rules(a)?, rules(b)?);
            if complete(&ra) && complete(&rb) {
                Ok(())
            } else {
                Err(format!(
                    "{}:\n{}\n{}:\n{}",
                    a.name(),
                    ra.join("\n"),
                    b.name(),
                    rb.join("\n")
                ))
            }
        },
    )
    .unwrap();
    let until = std::time::Instant::now() + WATCH;
    let mut looks = 0;
    while std::time::Instant::now() < until {
        let (ra, rb) = (rules(a).unwrap(), rules(b).unwrap());
        assert_eq!(
            ra,
            rb,
            "{when}: {} ({}) and {} ({}) differ",
            a.name(),
            interop::daemon(a),
            b.name(),
            interop::daemon(b)
        );
        for (h, r) in [(a, &ra), (b, &rb)] {
            let dup = twice(r);
            assert!(
                dup.is_empty(),
                "{when}: {} ({}) has rules twice: {dup:?}",
                h.name(),
                interop::daemon(h)
            );
        }
        looks += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "{when}: {} ({}) and {} ({}) have the same {} lines of nat and filter in each of {looks} looks:\n{}",
        a.name(),
        interop::daemon(a),
        b.name(),
        interop::daemon(b),
        rules(a).unwrap().len(),
        rules(a).unwrap().join("\n")
    );
}

/// Connects from `from` to `to:PORT` (listening in `listen`); the source address seen there.
fn observed_source(listen: &Netns, to: Ipv4Addr, from: &Netns) -> Result<Ipv4Addr, String> {
    match netns_tests::traffic::observed_source(listen, SocketAddr::from((to, PORT)), from)? {
        std::net::IpAddr::V4(ip) => Ok(ip),
        other => Err(format!("an IPv6 source {other}")),
    }
}

/// Each pod's connection to the outside arrives from its host's address; pod to pod keeps the
/// pod's address.
fn assert_masquerade(c: &Cluster, outside: &Netns, pods: &[Pod], when: &str) {
    for p in pods {
        let h = c.host(p.host_index());
        let what = format!(
            "{when}: {} on {} ({}) → {OUTSIDE}",
            p.ip(),
            h.name(),
            interop::daemon(h)
        );
        wait_until(interop::CONVERGE, &what, || {
            match observed_source(outside, OUTSIDE, p.netns())? {
                src if src == h.public_ip() => Ok(()),
                src => Err(format!("arrived from {src}, not {}", h.public_ip())),
            }
        })
        .unwrap();
        eprintln!("{what}: arrives from {}", h.public_ip());
    }
    let (p0, p1) = (&pods[0], &pods[1]);
    for (a, b) in [(p0, p1), (p1, p0)] {
        let src = observed_source(b.netns(), b.ip(), a.netns()).unwrap();
        assert_eq!(src, a.ip(), "{when}: pod to pod keeps the pod's address");
    }
}

#[test]
fn ip_masq_go_and_ours_leave_the_same_rules_and_masquerade() {
    netns_tests::require_test_bed!();
    let peers = netns_tests::require_go_peers!();
    let c = interop::mixed_cluster(
        peers,
        Backend::Vxlan,
        2,
        |i| i == 0,
        &["--ip-masq", "--iptables-resync=1"],
    );
    for h in c.hosts() {
        assert_eq!(
            h.subnet_env().unwrap()["FLANNEL_IPMASQ"],
            "true",
            "{}",
            interop::daemon(h)
        );
    }
    let outside = Netns::create(&format!("{}-out", c.name())).expect("outside namespace");
    c.underlay()
        .attach(&outside, "out0", OUTSIDE)
        .expect("attach the outside namespace");
    let pods = c.add_pods(&[0, 1]).expect("one pod per host");

    assert_same_rules(&c, "Go on h0, ours on h1");
    assert_masquerade(&c, &outside, &pods, "Go on h0, ours on h1");
    assert_forwarded_source(&c, &outside, &pods, true, "Go on h0, ours on h1");

    interop::swap_daemon(&c, peers, 0);
    interop::swap_daemon(&c, peers, 1);
    c.wait_all_ready(0..2).expect("both ready after the switch");
    c.wait_converged(interop::CONVERGE)
        .expect("converged after the switch");
    assert_same_rules(&c, "ours on h0, Go on h1");
    assert_masquerade(&c, &outside, &pods, "ours on h0, Go on h1");
    assert_forwarded_source(&c, &outside, &pods, true, "ours on h0, Go on h1");
}

/// The rules of table `ip flannel-ipv4` per chain (`postrtg: <rule>`), comments left out and
/// the host's own subnet written `<own subnet>`; empty when there is no such table.
fn nft_rules(h: &Host) -> Result<Vec<String>, String> {
    let own = h.subnet().map_err(|e| e.to_string())?.to_string();
    let out = match h
        .netns()
        .exec("nft", &["list", "table", "ip", "flannel-ipv4"])
    {
        Ok(out) => out,
        Err(netns_tests::Error::Command { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e.to_string()),
    };
    let mut chain = "";
    let mut rules = Vec::new();
    for l in out.lines().map(str::trim) {
        if let Some(name) = l.strip_prefix("chain ") {
            chain = name.trim_end_matches(" {");
        } else if l.is_empty()
            || l == "}"
            || l.starts_with("table ")
            || l.starts_with("type ")
            || l.starts_with("comment ")
        {
            continue;
        } else {
            let rule = l.split(" comment \"").next().unwrap_or(l);
            rules.push(format!("{chain}: {}", rule.replace(&own, "<own subnet>")));
        }
    }
    Ok(rules)
}

/// flannel's nftables rules that mean something else than its iptables rules, and ours in
/// their place (see README, "What it does differently from flannel").
const GO_ONLY: [&str; 2] = [
    "postrtg: meta mark 0x00004000 return",
    "postrtg: ip saddr != <own subnet> ip daddr 10.5.0.0/16 return",
];
const OURS_ONLY: [&str; 2] = [
    "postrtg: meta mark & 0x00004000 == 0x00004000 return",
    "postrtg: ip saddr != 10.5.0.0/16 ip daddr <own subnet> return",
];

/// Both hosts have their 6 + 2 rules, none twice, and differ in exactly the documented two;
/// watched for [`WATCH`].
fn assert_nft_rules(c: &Cluster, when: &str) {
    let complete = |r: &[String]| {
        r.iter().filter(|l| l.starts_with("postrtg: ")).count() >= 6
            && r.iter().filter(|l| l.starts_with("forward: ")).count() >= 2
    };
    for h in c.hosts() {
        wait_until(
            interop::CONVERGE,
            &format!("{when}: nftables rules on {}", h.name()),
            || {
                let r = nft_rules(h)?;
                if complete(&r) {
                    Ok(())
                } else {
                    Err(r.join("\n"))
                }
            },
        )
        .unwrap();
    }
    let until = std::time::Instant::now() + WATCH;
    while std::time::Instant::now() < until {
        for h in c.hosts() {
            let r = nft_rules(h).unwrap();
            let mut unique = r.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(
                unique.len(),
                r.len(),
                "{when}: {} ({}) has a rule twice: {r:#?}",
                h.name(),
                interop::daemon(h)
            );
            assert_eq!(
                r.len(),
                8,
                "{when}: {} ({}): {r:#?}",
                h.name(),
                interop::daemon(h)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let (go, ours) = interop::go_and_ours(c);
    let (g, o) = (nft_rules(go).unwrap(), nft_rules(ours).unwrap());
    let only = |a: &[String], b: &[String]| -> Vec<String> {
        a.iter().filter(|l| !b.contains(l)).cloned().collect()
    };
    assert_eq!(
        only(&g, &o),
        GO_ONLY,
        "{when}: flannel's rules beside ours: {g:#?}\n{o:#?}"
    );
    assert_eq!(
        only(&o, &g),
        OURS_ONLY,
        "{when}: our rules beside flannel's: {o:#?}\n{g:#?}"
    );
    eprintln!(
        "{when}: nftables, ours:\n{}\nflannel's differ in:\n{}",
        o.join("\n"),
        GO_ONLY.join("\n")
    );
}

/// A connection from outside the Network to a pod, forwarded by the other pod's host (as a
/// NodePort connection to a pod elsewhere is): our rules masquerade it on the forwarding host
/// (it reaches the pod from that host's `flannel.1` address, so the reply comes back the same
/// way); so do flannel's iptables rules, but its nftables rules (`go_masquerades` false) let it
/// through with the outside address.
fn assert_forwarded_source(
    c: &Cluster,
    outside: &Netns,
    pods: &[Pod],
    go_masquerades: bool,
    when: &str,
) {
    for (p, via) in [(&pods[1], c.host(0)), (&pods[0], c.host(1))] {
        let route = [
            "route",
            "replace",
            &p.subnet().to_string(),
            "via",
            &via.public_ip().to_string(),
        ];
        outside.ip(&route).unwrap();
        let want = if via.runs_go() && !go_masquerades {
            OUTSIDE
        } else {
            via.subnet().unwrap().network()
        };
        let what = format!(
            "{when}: {OUTSIDE} → {} forwarded by {} ({})",
            p.ip(),
            via.name(),
            interop::daemon(via)
        );
        wait_until(interop::CONVERGE, &what, || {
            match observed_source(p.netns(), p.ip(), outside)? {
                src if src == want => Ok(()),
                src => Err(format!("arrived from {src}, not {want}")),
            }
        })
        .unwrap();
        eprintln!("{what}: arrives from {want}");
    }
}

#[test]
fn ip_masq_nftables_go_and_ours_switch_without_duplicates_and_masquerade() {
    netns_tests::require_test_bed!();
    netns_tests::require!(netns_tests::Need::Tool("nft"));
    let peers = netns_tests::require_go_peers!();
    let c = Cluster::builder()
        .hosts(2)
        .config_json(
            r#"{"Network":"10.5.0.0/16","SubnetLen":24,"EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#,
        )
        .flanneld_arg("--ip-masq")
        .flanneld_arg("--iptables-resync=1")
        .no_start()
        .build()
        .expect("cluster");
    c.host(0).set_go_flanneld(Some(&peers.flanneld));
    for h in c.hosts() {
        h.start().expect("start flanneld");
    }
    c.wait_all_ready(0..2).expect("both ready");
    c.wait_converged(interop::CONVERGE).expect("converged");
    let outside = Netns::create(&format!("{}-out", c.name())).expect("outside namespace");
    c.underlay()
        .attach(&outside, "out0", OUTSIDE)
        .expect("attach the outside namespace");
    let pods = c.add_pods(&[0, 1]).expect("one pod per host");

    assert_nft_rules(&c, "Go on h0, ours on h1");
    assert_masquerade(&c, &outside, &pods, "nftables, Go on h0, ours on h1");
    assert_forwarded_source(&c, &outside, &pods, false, "nftables, Go on h0, ours on h1");

    interop::swap_daemon(&c, peers, 0);
    interop::swap_daemon(&c, peers, 1);
    c.wait_all_ready(0..2).expect("both ready after the switch");
    c.wait_converged(interop::CONVERGE)
        .expect("converged after the switch");
    assert_nft_rules(&c, "ours on h0, Go on h1");
    assert_masquerade(&c, &outside, &pods, "nftables, ours on h0, Go on h1");
    assert_forwarded_source(&c, &outside, &pods, false, "nftables, ours on h0, Go on h1");
}
