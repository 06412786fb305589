//! `--ip-blackhole-route`: a real flanneld (vxlan) in a network namespace with its own etcd
//! there adds `blackhole <own subnet> proto 102`, keeps it through full passes, puts it back
//! when deleted, moves it when the subnet changes, adds the IPv6 subnet's in dual stack, and
//! adds none without the flag.

mod common;

use std::time::Duration;

use common::{poll, Etcd, Flanneld, LocalEtcd, Netns};

const WAIT: Duration = Duration::from_secs(30);
const CONFIG: &str =
    r#"{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#;
/// A peer, so that the data plane has a route of its own to repair.
const PEER_KEY: &str = "/coreos.com/network/subnets/10.5.99.0-24";
const PEER: &str = r#"{"PublicIP":"198.18.7.99","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:99"}}"#;

struct Host {
    ns: Netns,
    etcd: Etcd,
}

impl Host {
    fn new(tag: &str) -> Host {
        let ns = Netns::new(tag);
        let etcd = Etcd::start_local(LocalEtcd {
            netns: Some(ns.name.clone()),
            ..Default::default()
        })
        .unwrap();
        common::config(&etcd, CONFIG);
        etcd.put(PEER_KEY, PEER).unwrap();
        Host { ns, etcd }
    }

    fn flanneld(&self, extra: &[&str], envs: &[(&str, &str)]) -> Flanneld {
        Flanneld::start_with_env(
            Some(&self.ns.name),
            &self.etcd.endpoint(),
            "198.18.7.1",
            extra,
            envs,
        )
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut argv = vec!["ip"];
        argv.extend_from_slice(args);
        self.ns
            .run(&argv)
            .unwrap_or_else(|e| panic!("ip {args:?}: {e}"))
    }

    /// `ip route show type blackhole`, one route a line.
    fn blackholes(&self) -> Vec<String> {
        self.ip(&["route", "show", "type", "blackhole"])
            .lines()
            .map(|l| l.trim().to_string())
            .collect()
    }

    fn peer_route(&self) -> bool {
        self.ip(&["route", "show", "10.5.99.0/24"])
            .contains("dev flannel.1")
    }

    /// Deletes the peer's route by hand and waits for the full pass that puts it back.
    fn force_full_pass(&self) {
        poll("the peer's route", WAIT, || self.peer_route().then_some(()));
        self.ip(&["route", "del", "10.5.99.0/24"]);
        poll("the peer's route to be repaired", WAIT, || {
            self.peer_route().then_some(())
        });
    }
}

fn own_subnet(f: &Flanneld) -> String {
    let subnet = poll("the subnet file", WAIT, || f.subnet());
    common::key_of_subnet(&subnet).replace('-', "/")
}

#[test]
fn with_the_flag_our_subnet_has_a_blackhole_route_kept_and_moved() {
    netns_tests::require!(netns_tests::Need::Root, netns_tests::Need::Etcd);
    let host = Host::new("bh");
    let mut f = host.flanneld(&[], &[("FLANNELD_IP_BLACKHOLE_ROUTE", "true")]);
    let subnet = own_subnet(&f);
    let ours = format!("blackhole {subnet} proto 102");
    poll("our blackhole route", WAIT, || {
        (host.blackholes() == [ours.clone()]).then_some(())
    });

    // A full pass of the backend leaves it alone.
    host.force_full_pass();
    assert_eq!(host.blackholes(), std::slice::from_ref(&ours));

    // Deleted by hand: put back.
    host.ip(&["route", "del", "blackhole", &subnet]);
    poll("our blackhole route to come back", WAIT, || {
        (host.blackholes() == [ours.clone()]).then_some(())
    });

    // Our subnet changes (here across a restart: our old subnet was given to another host):
    // the old subnet's route goes, the new one's comes.
    f.stop();
    let old_key = format!(
        "/coreos.com/network/subnets/{}",
        common::key_of_subnet(&f.subnet().unwrap())
    );
    host.etcd
        .put(&old_key, r#"{"PublicIP":"198.18.7.50","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:50"}}"#)
        .unwrap();
    std::fs::remove_file(f.subnet_file()).unwrap();
    f.resume();
    let new_subnet = poll("a new subnet", WAIT, || {
        f.subnet()
            .map(|s| common::key_of_subnet(&s).replace('-', "/"))
            .filter(|s| *s != subnet)
    });
    let new_ours = format!("blackhole {new_subnet} proto 102");
    poll(
        "the blackhole route to move to the new subnet",
        WAIT,
        || (host.blackholes() == [new_ours.clone()]).then_some(()),
    );
}

#[test]
fn without_the_flag_there_is_none_and_ours_of_an_earlier_run_go() {
    netns_tests::require!(netns_tests::Need::Root, netns_tests::Need::Etcd);
    let host = Host::new("nobh");
    // Left by an earlier run with the flag; and one someone else made (`proto boot`, which
    // `ip` does not show).
    host.ip(&["route", "add", "blackhole", "10.5.77.0/24", "proto", "102"]);
    host.ip(&["route", "add", "blackhole", "10.5.78.0/24"]);
    let f = host.flanneld(&[], &[]);
    own_subnet(&f);
    host.force_full_pass();
    poll("the earlier run's blackhole route to go", WAIT, || {
        (host.blackholes() == ["blackhole 10.5.78.0/24"]).then_some(())
    });
}

#[test]
fn dual_stack_has_one_for_each_subnet() {
    netns_tests::require!(netns_tests::Need::Root, netns_tests::Need::Etcd);
    let host = Host::new("bh6");
    common::config(
        &host.etcd,
        r#"{"Network":"10.5.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:5::/56","IPv6SubnetLen":64,"Backend":{"Type":"vxlan","VNI":1}}"#,
    );
    let f = host.flanneld(&["-ip-blackhole-route", "--public-ipv6=::1"], &[]);
    let subnet = own_subnet(&f);
    let subnet6 = poll("the IPv6 subnet", WAIT, || {
        common::read_env(&f.subnet_file(), "FLANNEL_IPV6_SUBNET")
    });
    let subnet6: ipnetwork::Ipv6Network = subnet6.parse().unwrap();
    let subnet6 = ipnetwork::Ipv6Network::new(subnet6.network(), subnet6.prefix()).unwrap();
    poll("our blackhole routes", WAIT, || {
        let v6 = host.ip(&["-6", "route", "show", "type", "blackhole"]);
        (host.blackholes() == [format!("blackhole {subnet} proto 102")]
            && v6.trim() == format!("blackhole {subnet6} dev lo proto 102 metric 1024 pref medium"))
        .then_some(())
    });
}
