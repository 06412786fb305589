//! The `ipip` backend (root only). Where the kernel can make ipip devices (`ip link add type
//! ipip` works in a test namespace), 3 hosts program flannel.ipip and routes via each peer's
//! public IP, onlink, and with `DirectRouting` via the external interface; where it cannot
//! (this CI machine's kernel has no ipip module), flanneld refuses plainly: it exits with a
//! message naming the backend and the missing kernel support, without taking a lease.

use std::time::Duration;

use netns_tests::{wait_until, Cluster, Host, Netns};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// Whether this kernel makes ipip devices, tried in a namespace of our own.
fn kernel_has_ipip() -> bool {
    let ns =
        Netns::create(&format!("{}-ipip-probe", netns_tests::unique_prefix())).expect("namespace");
    ns.ip(&[
        "link",
        "add",
        "probe",
        "type",
        "ipip",
        "local",
        "198.18.0.1",
    ])
    .is_ok()
}

fn ipip_cluster(backend: Value) -> Cluster {
    Cluster::builder()
        .hosts(3)
        .backend_json(backend)
        .no_start()
        .build()
        .expect("cluster")
}

#[test]
fn ipip_programs_the_tunnel_where_the_kernel_has_it_else_refuses_plainly() {
    netns_tests::require_test_bed!();
    if kernel_has_ipip() {
        assert_programmed(false);
        assert_programmed(true);
    } else {
        assert_refused();
    }
}

fn assert_refused() {
    let c = ipip_cluster(json!({"Type": "ipip"}));
    let h = c.host(0);
    h.start().expect("start flanneld");
    wait_until(WAIT, "flanneld exits", || {
        if h.is_running() {
            Err("still running".to_string())
        } else {
            Ok(())
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", h.log_tail(20)));
    let why = h.check_alive().expect_err("flanneld exited");
    assert!(!why.contains("exit status: 0"), "{why}");
    let log = std::fs::read_to_string(h.log_path()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("backend ipip: this kernel cannot make ipip devices"))
        .unwrap_or_else(|| panic!("no refusal naming the backend in:\n{log}"));
    assert!(
        line.contains("modprobe ipip") && line.contains("add ipip device flannel.ipip"),
        "{line}"
    );
    // Refused before a lease is taken, and no half-made device is left.
    assert_eq!(c.leases().unwrap(), vec![], "no lease");
    assert!(h.netns().ip(&["link", "show", "flannel.ipip"]).is_err());
}

/// The route of `h` to `subnet`: (dev, gateway, flags).
fn route(h: &Host, subnet: &str) -> Option<(String, String, Vec<String>)> {
    h.routes()
        .ok()?
        .into_iter()
        .find(|r| r["dst"] == subnet)
        .map(|r| {
            let flags = r["flags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            (
                r["dev"].as_str().unwrap_or_default().to_string(),
                r["gateway"].as_str().unwrap_or_default().to_string(),
                flags,
            )
        })
}

fn assert_programmed(direct_routing: bool) {
    let c = ipip_cluster(json!({"Type": "ipip", "DirectRouting": direct_routing}));
    for h in c.hosts() {
        h.start().expect("start flanneld");
    }
    c.wait_all_ready(0..3).expect("ready");
    for (i, h) in c.hosts().iter().enumerate() {
        let dev = h
            .netns()
            .ip_json(&["-d", "link", "show", "flannel.ipip"])
            .unwrap();
        let dev = &dev[0];
        assert_eq!(dev["linkinfo"]["info_kind"], "ipip", "{dev}");
        assert_eq!(
            dev["linkinfo"]["info_data"]["local"],
            h.public_ip().to_string()
        );
        assert_eq!(dev["mtu"], 1480, "the underlay's 1500 minus 20");
        assert_eq!(h.subnet_env().unwrap()["FLANNEL_MTU"], "1480");
        let own = h.subnet().unwrap();
        let addrs = h
            .netns()
            .ip_json(&["-4", "addr", "show", "dev", "flannel.ipip"])
            .unwrap();
        let local: Vec<String> = addrs[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect();
        assert_eq!(local, vec![format!("{}/32", own.network())]);
        for (j, peer) in c.hosts().iter().enumerate().filter(|(j, _)| *j != i) {
            let subnet = peer.subnet().unwrap().to_string();
            // Every host is on one underlay segment: DirectRouting takes the external
            // interface for all of them.
            let dev_ok = |dev: &str| (dev == "flannel.ipip") != direct_routing;
            wait_until(
                WAIT,
                &format!("h{i} routes h{j}'s {subnet}"),
                || match route(h, &subnet) {
                    Some((dev, gw, flags))
                        if dev_ok(&dev)
                            && gw == peer.public_ip().to_string()
                            && flags.iter().any(|f| f == "onlink") =>
                    {
                        Ok(())
                    }
                    other => Err(format!("{other:?}")),
                },
            )
            .unwrap_or_else(|e| panic!("{e}\n{}", h.log_tail(20)));
        }
    }
    // A lease that goes takes its routes with it.
    let gone = c.lease_of(2).unwrap().expect("lease");
    c.host(2).stop();
    c.etcd().del(&gone.key).unwrap();
    for h in &c.hosts()[..2] {
        wait_until(WAIT, "route to the gone lease removed", || {
            match route(h, &gone.subnet.to_string()) {
                None => Ok(()),
                Some(r) => Err(format!("{r:?}")),
            }
        })
        .unwrap();
    }
}
