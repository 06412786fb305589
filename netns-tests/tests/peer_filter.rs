//! Leases written by hand into etcd cannot hijack traffic (root only): a lease for half of a
//! host's subnet, one for the whole network, a catch-all and a second lease for a host's subnet
//! are refused on every host, counted in `/metrics`, and traffic keeps flowing; of two leases
//! for one subnet the older wins on every host, and the newer takes over once the older is gone.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use netns_tests::{wait_until, Backend, Cluster, Host, LeaseInfo};
use serde_json::json;

use common::CONVERGE;

/// Public addresses no host has, on the test underlay (198.18.0.0/24 inside the test's own
/// namespaces): what a hand-written lease points at.
fn fake_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 200 + n)
}

fn vxlan_value(n: u8) -> String {
    json!({
        "PublicIP": fake_ip(n).to_string(),
        "PublicIPv6": null,
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": format!("02:00:5e:00:00:{n:02x}")},
    })
    .to_string()
}

/// Writes a lease and returns it as the test bed reads leases.
fn put_lease(c: &Cluster, subnet_key: &str, value: &str) -> LeaseInfo {
    let key = format!("{}{subnet_key}", c.subnets_prefix());
    c.etcd().put(&key, value).expect("etcd put");
    LeaseInfo::parse(&key, value).expect("lease parses")
}

fn rejected(h: &Host, reason: &str) -> f64 {
    h.metric(&format!(
        "flannel_rejected_leases_total{{reason=\"{reason}\"}}"
    ))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The route `h` picks for `dst`: (device, gateway).
fn route_get(h: &Host, dst: Ipv4Addr) -> (String, Option<String>) {
    let v = h
        .netns()
        .ip_json(&["route", "get", &dst.to_string()])
        .expect("ip route get");
    let r = &v[0];
    (
        r["dev"].as_str().unwrap_or_default().to_string(),
        r["gateway"].as_str().map(String::from),
    )
}

/// `n` /24s inside 10.5.0.0/16 that no lease holds.
fn free_subnets(c: &Cluster, n: usize) -> Vec<Ipv4Network> {
    let taken: Vec<Ipv4Network> = c.leases().unwrap().iter().map(|l| l.subnet).collect();
    let free: Vec<Ipv4Network> = (0..=255u8)
        .rev()
        .map(|i| Ipv4Network::new(Ipv4Addr::new(10, 5, i, 0), 24).unwrap())
        .filter(|n| !taken.contains(n))
        .take(n)
        .collect();
    assert_eq!(free.len(), n, "free /24s in 10.5.0.0/16");
    free
}

#[test]
fn vxlan_overlapping_and_oversized_leases_are_refused() {
    netns_tests::require_test_bed!();
    let c = Cluster::new(3, Backend::Vxlan).expect("cluster");
    c.wait_converged(CONVERGE).expect("converged");
    let pods = common::pods(&c);
    let dev = c.vxlan_dev();
    let host0 = c.lease_of(0).unwrap().expect("host 0 has a lease");
    let net0 = host0.subnet;
    let upper_half = Ipv4Addr::from(u32::from(net0.network()) + 128);
    let in_upper_half = Ipv4Addr::from(u32::from(net0.network()) + 130);
    let real: Vec<LeaseInfo> = c.leases().unwrap();

    // The attack: half of host 0's subnet, the whole network, everything, and host 0's subnet
    // again under another key (a dual-stack form; IPv6 is off, so its IPv4 half is host 0's).
    put_lease(&c, &format!("{upper_half}-25"), &vxlan_value(1));
    put_lease(&c, "10.5.0.0-16", &vxlan_value(2));
    put_lease(&c, "0.0.0.0-0", &vxlan_value(3));
    put_lease(
        &c,
        &format!("{}-24&fc00::-64", net0.network()),
        &vxlan_value(4),
    );
    // Then two leases for one free subnet: the older is a peer, the newer is refused.
    let free = free_subnets(&c, 1)[0];
    let older = put_lease(
        &c,
        &format!("{}-24&fc00:0:0:5::-64", free.network()),
        &vxlan_value(5),
    );
    let newer = put_lease(&c, &format!("{}-24", free.network()), &vxlan_value(6));

    // Every host has programmed the older lease, so it has seen all of the above.
    wait_until(CONVERGE, "every host to program the older lease", || {
        c.hosts().iter().try_for_each(|h| c.check_peer(h, &older))
    })
    .expect("older lease programmed");

    let wanted: Vec<String> = real
        .iter()
        .map(|l| l.subnet.to_string())
        .chain([free.to_string()])
        .collect();
    for (i, h) in c.hosts().iter().enumerate() {
        for r in h.routes().unwrap() {
            if r["dev"] == dev.as_str() {
                let dst = r["dst"].as_str().unwrap_or_default();
                assert!(
                    wanted.iter().any(|w| w == dst),
                    "host {i}: route {r} on {dev} is for no real peer (peers: {wanted:?})"
                );
            }
        }
        for l in real.iter().filter(|l| l.public_ip != h.public_ip()) {
            c.check_peer(h, l)
                .unwrap_or_else(|e| panic!("host {i}, the real peer {}: {e}", l.subnet));
        }
        let (via, gw) = route_get(h, in_upper_half);
        if i == 0 {
            assert_ne!(
                via, dev,
                "host 0 routes its own pod address {in_upper_half} into {dev}"
            );
        } else {
            assert_eq!(
                (via.as_str(), gw.as_deref()),
                (dev.as_str(), Some(net0.network().to_string().as_str())),
                "host {i}: {in_upper_half} must go to host 0's VTEP"
            );
        }
    }

    c.assert_connected(&pods, 1 << 20);

    let counts = |h: &Host| {
        [
            "outside_network",
            "wrong_prefix_length",
            "overlaps_own",
            "overlaps_older",
        ]
        .map(|r| rejected(h, r))
    };
    assert_eq!(counts(c.host(0)), [1.0, 2.0, 1.0, 1.0], "host 0");
    for i in 1..3 {
        // Host 0's lease is older than its copy: the copy loses everywhere else.
        assert_eq!(counts(c.host(i)), [1.0, 2.0, 0.0, 2.0], "host {i}");
    }

    // The older lease goes: the newer one is a peer on the next pass.
    assert_eq!(c.etcd().del(&older.key).unwrap(), 1);
    wait_until(CONVERGE, "every host to program the newer lease", || {
        c.hosts().iter().try_for_each(|h| c.check_peer(h, &newer))
    })
    .expect("the newer lease is a peer once the older is gone");
    // Passes after the first did not count the same leases again.
    assert_eq!(counts(c.host(0)), [1.0, 2.0, 1.0, 1.0], "host 0, later");
    for i in 1..3 {
        assert_eq!(counts(c.host(i)), [1.0, 2.0, 0.0, 2.0], "host {i}, later");
    }
}

#[test]
fn udp_catch_all_lease_is_refused() {
    netns_tests::require_test_bed!();
    let c = Cluster::builder()
        .hosts(2)
        .backend(Backend::Udp)
        .build()
        .expect("cluster");
    let a = c.add_pod(0).unwrap();
    let b = c.add_pod(1).unwrap();
    a.wait_reaches(b.ip(), CONVERGE).unwrap();

    // flannel's udp leases carry no BackendType. A catch-all, then a lease for a free subnet
    // whose arrival in host 0's peer table shows that host 0 has seen the catch-all too.
    put_lease(
        &c,
        "0.0.0.0-0",
        r#"{"PublicIP":"198.18.0.203","PublicIPv6":null}"#,
    );
    let [marker, free] = free_subnets(&c, 2)[..] else {
        unreachable!()
    };
    put_lease(
        &c,
        &format!("{}-24", marker.network()),
        r#"{"PublicIP":"198.18.0.204","PublicIPv6":null}"#,
    );
    wait_until(CONVERGE, "host 0 to take the marker lease", || {
        let log = std::fs::read_to_string(c.host(0).log_path()).unwrap_or_default();
        log.lines()
            .any(|l| l.contains(&format!("peer {marker}")) && l.contains("198.18.0.204"))
            .then_some(())
            .ok_or_else(|| c.host(0).log_tail(5))
    })
    .expect("marker lease in host 0's peer table");

    // An address in the network that no host holds is still answered with net unreachable,
    // not sent to the catch-all's address.
    let nobody = Ipv4Addr::from(u32::from(free.network()) + 1);
    let unreachable = || {
        c.host(0)
            .metric("flannel_udp_icmp_unreachable_total")
            .unwrap()
    };
    let before = unreachable();
    let ping = a
        .netns()
        .exec("ping", &["-n", "-c", "1", "-W", "1", &nobody.to_string()]);
    wait_until(
        Duration::from_secs(5),
        "an ICMP net unreachable from host 0",
        || {
            let now = unreachable();
            if now > before {
                Ok(())
            } else {
                Err(format!("{before} → {now}; ping {nobody}: {ping:?}"))
            }
        },
    )
    .expect("a packet for a subnet nobody holds is answered with net unreachable");
    assert!(a.ping(b.ip(), 3).unwrap().all_received());
    assert!(b.ping(a.ip(), 3).unwrap().all_received());

    for h in c.hosts() {
        wait_until(CONVERGE, "the catch-all lease to be counted", || {
            match h.metric("flannel_rejected_leases_total{reason=\"outside_network\"}") {
                Ok(1.0) => Ok(()),
                other => Err(format!("{}: {other:?}", h.name())),
            }
        })
        .expect("refused and counted once");
    }
}
