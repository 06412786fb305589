//! Masquerade and forward rules, installed by a real flanneld inside a network namespace (with
//! its own etcd there), restored after someone flushes them.

mod common;

use std::time::Duration;

use common::{poll, Etcd, Flanneld, LocalEtcd, Netns};

const WAIT: Duration = Duration::from_secs(20);

fn start(ns: &Netns, config: &str) -> (Etcd, Flanneld, String) {
    let etcd = Etcd::start_local(LocalEtcd {
        netns: Some(ns.name.clone()),
        ..Default::default()
    })
    .unwrap();
    common::config(&etcd, config);
    let f = Flanneld::start_in(
        Some(&ns.name),
        &etcd.endpoint(),
        "198.18.7.1",
        &[
            "--ip-masq",
            "--iptables-resync=1",
            "--iptables-forward-rules=true",
        ],
    );
    let subnet = poll("the subnet file", WAIT, || f.subnet());
    (etcd, f, common::key_of_subnet(&subnet).replace('-', "/"))
}

#[test]
fn iptables_rules_are_installed_and_restored() {
    netns_tests::require!(netns_tests::Need::Root, netns_tests::Need::Etcd);
    let ns = Netns::new("fw");
    let (_etcd, f, subnet) = start(
        &ns,
        r#"{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"alloc"}}"#,
    );
    let nat_rules = || {
        ns.run(&["iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG"])
            .unwrap_or_default()
    };
    let masq = "-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully".to_string();
    let own = format!("-A FLANNEL-POSTRTG -s {subnet} -d 10.5.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN");
    poll("the masquerade rules", WAIT, || {
        let r = nat_rules();
        (r.contains(&masq) && r.contains(&own)).then_some(())
    });
    assert_eq!(
        nat_rules().lines().filter(|l| l.starts_with("-A")).count(),
        6
    );
    let postrouting = ns
        .run(&["iptables", "-t", "nat", "-S", "POSTROUTING"])
        .unwrap();
    assert_eq!(
        postrouting.matches("-j FLANNEL-POSTRTG").count(),
        1,
        "{postrouting}"
    );
    let fwd = ns.run(&["iptables", "-S", "FLANNEL-FWD"]).unwrap();
    assert!(
        fwd.contains(
            "-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT"
        ),
        "{fwd}"
    );
    assert!(ns
        .run(&["iptables", "-S", "FORWARD"])
        .unwrap()
        .contains("-j FLANNEL-FWD"));

    // Someone flushes the chain: back within the resync period (1 s here).
    ns.run(&["iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG"])
        .unwrap();
    assert!(!nat_rules().contains(&masq));
    poll("the flushed rules to come back", WAIT, || {
        nat_rules().contains(&masq).then_some(())
    });
    // The jump from POSTROUTING removed: restored too, once.
    ns.run(&[
        "iptables",
        "-t",
        "nat",
        "-D",
        "POSTROUTING",
        "-m",
        "comment",
        "--comment",
        "flanneld masq",
        "-j",
        "FLANNEL-POSTRTG",
    ])
    .unwrap();
    poll("the jump to come back", WAIT, || {
        let p = ns
            .run(&["iptables", "-t", "nat", "-S", "POSTROUTING"])
            .unwrap();
        (p.matches("-j FLANNEL-POSTRTG").count() == 1).then_some(())
    });
    poll("the restores to be counted in the log", WAIT, || {
        f.log().contains("restored").then_some(())
    });
}

#[test]
fn nftables_rules_are_installed_and_restored() {
    netns_tests::require!(netns_tests::Need::Root, netns_tests::Need::Etcd);
    let ns = Netns::new("nf");
    let (_etcd, _f, subnet) = start(
        &ns,
        r#"{"Network":"10.6.0.0/16","SubnetLen":24,"EnableNFTables":true,"Backend":{"Type":"alloc"}}"#,
    );
    let table = || {
        ns.run(&["nft", "list", "table", "ip", "flannel-ipv4"])
            .unwrap_or_default()
    };
    let masq = "ip saddr 10.6.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random comment \"flanneld masq\"";
    let own = format!("ip saddr {subnet} ip daddr 10.6.0.0/16 return");
    poll("the nftables table", WAIT, || {
        let t = table();
        (t.contains(masq) && t.contains(&own)).then_some(())
    });
    // No iptables rules in this mode.
    assert!(ns
        .run(&["iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG"])
        .is_err());

    ns.run(&["nft", "flush", "chain", "ip", "flannel-ipv4", "postrtg"])
        .unwrap();
    assert!(!table().contains(masq));
    poll("the flushed chain to come back", WAIT, || {
        table().contains(masq).then_some(())
    });
    ns.run(&["nft", "delete", "table", "ip", "flannel-ipv4"])
        .unwrap();
    poll("the deleted table to come back", WAIT, || {
        table().contains(masq).then_some(())
    });
}
