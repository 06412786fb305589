//! End-to-end tests of the `flannel` binary: real namespaces, real links, and Debian's
//! containernetworking-plugins (`bridge`, `host-local`) as the reference.
//! Root only: they fail under CI without root, and skip otherwise.

mod common;

use std::collections::HashSet;

use common::*;
use serde_json::{json, Value};

#[test]
fn add_check_del_in_a_pod() {
    netns_tests::require_all!(common::PRIVILEGED);
    let host = Host::new("1.0.0");
    let pod = Netns::new("fcp");
    let res = host.add("c0ffee01", &pod).expect_ok();

    // Result: 1.0.0 shape, three interfaces, the pod's in its sandbox.
    assert_eq!(res["cniVersion"], "1.0.0");
    let ifs = res["interfaces"].as_array().unwrap();
    assert_eq!(ifs.len(), 3, "{res}");
    assert_eq!(ifs[0]["name"], host.bridge.as_str());
    assert_eq!(ifs[2]["name"], "eth0");
    assert_eq!(ifs[2]["sandbox"], pod.path());
    assert!(res["ips"][0].get("version").is_none());
    assert_eq!(res["ips"][0]["interface"], 2);
    assert_eq!(res["ips"][0]["gateway"], "10.5.72.1");
    let addr = result_address(&res);
    assert!(
        addr.starts_with("10.5.72.") && addr.ends_with("/24"),
        "{addr}"
    );
    let routes: Vec<&Value> = res["routes"].as_array().unwrap().iter().collect();
    assert!(routes.iter().any(|r| r["dst"] == "10.5.0.0/16"));
    assert!(routes
        .iter()
        .any(|r| r["dst"] == "0.0.0.0/0" && r["gw"] == "10.5.72.1"));

    // What a user checks.
    let shown = pod.addr_show("eth0");
    assert!(shown.contains(&format!("inet {addr}")), "{shown}");
    assert!(
        shown.contains("mtu 1450"),
        "MTU from the subnet file: {shown}"
    );
    assert!(pod.ping("10.5.72.1"), "gateway unreachable from the pod");
    let route = sh_ok(&["ip", "-n", &pod.name, "route", "show"]);
    assert!(route.contains("default via 10.5.72.1"), "{route}");
    assert!(route.contains("10.5.0.0/16 via 10.5.72.1"), "{route}");
    let br = host.ns.addr_show(&host.bridge);
    assert!(br.contains("inet 10.5.72.1/24"), "{br}");
    let veth = ifs[1]["name"].as_str().unwrap();
    let detail = sh_ok(&["ip", "-n", &host.ns.name, "-d", "link", "show", veth]);
    assert!(
        detail.contains(&format!("master {}", host.bridge)),
        "{detail}"
    );
    assert!(detail.contains("hairpin on"), "{detail}");

    // The store, in host-local's format.
    let entries = host.store_entries();
    assert_eq!(
        entries,
        vec![(
            strip_prefix(&addr).to_string(),
            "c0ffee01\r\neth0".to_string()
        )]
    );

    // CHECK with the result as prevResult.
    let mut check = host.conf.clone();
    check["prevResult"] = res.clone();
    host.cni("CHECK", "c0ffee01", &pod.path(), "eth0", &check)
        .expect_ok();
    // CHECK notices a missing address.
    sh_ok(&["ip", "-n", &pod.name, "addr", "flush", "dev", "eth0"]);
    let r = host.cni("CHECK", "c0ffee01", &pod.path(), "eth0", &check);
    assert!(!r.ok, "CHECK passed without the address");

    // DEL removes the veth and releases the address; a second DEL succeeds too.
    host.del("c0ffee01", &pod).expect_ok();
    assert!(host.veths().is_empty(), "{:?}", host.veths());
    assert!(!pod.links().contains(&"eth0".to_string()));
    assert!(host.store_entries().is_empty());
    host.del("c0ffee01", &pod).expect_ok();
    // DEL of a container nobody knows, in a namespace that is gone.
    host.cni(
        "DEL",
        "unknown1",
        "/var/run/netns/nope-gone",
        "eth0",
        &host.conf,
    )
    .expect_ok();
}

#[test]
fn result_shape_follows_conf_version() {
    netns_tests::require_all!(common::PRIVILEGED);
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.1.0"] {
        let host = Host::new(version);
        let pod = Netns::new("fcp");
        let res = host.add("verscheck", &pod).expect_ok();
        assert_eq!(res["cniVersion"], version);
        let ip = &res["ips"][0];
        if version.starts_with("0.") {
            assert_eq!(ip["version"], "4", "{version}: {res}");
        } else {
            assert!(ip.get("version").is_none(), "{version}: {res}");
            assert_eq!(res["interfaces"][2]["mtu"], 1450);
        }
        if version != "0.3.0" && version != "0.3.1" {
            let mut check = host.conf.clone();
            check["prevResult"] = res.clone();
            host.cni("CHECK", "verscheck", &pod.path(), "eth0", &check)
                .expect_ok();
        } else {
            // CHECK does not exist before 0.4.0.
            host.cni("CHECK", "verscheck", &pod.path(), "eth0", &host.conf)
                .expect_err(1);
        }
        host.del("verscheck", &pod).expect_ok();
    }
}

#[test]
fn sixty_four_parallel_adds_get_distinct_addresses() {
    netns_tests::require_all!(common::PRIVILEGED);
    let host = Host::new("1.0.0");
    let pods: Vec<Netns> = (0..64).map(|_| Netns::new("fcp")).collect();
    let results: Vec<Run> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let host = &host;
                s.spawn(move || host.add(&format!("par{i}"), pod))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let addrs: HashSet<String> = results
        .iter()
        .map(|r| result_address(&r.expect_ok()))
        .collect();
    assert_eq!(addrs.len(), 64, "{addrs:?}");
    assert_eq!(host.store_entries().len(), 64);
    assert_eq!(host.veths().len(), 64);
    std::thread::scope(|s| {
        for (i, pod) in pods.iter().enumerate() {
            let host = &host;
            s.spawn(move || host.del(&format!("par{i}"), pod).expect_ok());
        }
    });
    assert!(
        host.store_entries().is_empty(),
        "{:?}",
        host.store_entries()
    );
    assert!(host.veths().is_empty());
}

/// host-local run directly as an IPAM plugin on the same store.
fn host_local(host: &Host, cmd: &str, id: &str, subnet: &str) -> Run {
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "ipam": {
            "type": "host-local",
            "dataDir": host.dir.path().join("networks"),
            "ranges": [[{ "subnet": subnet }]],
        },
    });
    host.run_bin(
        &format!("{CNI_DIR}/host-local"),
        &[
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", "/var/run/netns/unused"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", CNI_DIR),
        ],
        &serde_json::to_vec(&conf).unwrap(),
    )
}

#[test]
fn shares_the_store_with_reference_host_local() {
    netns_tests::require_all!(common::PRIVILEGED);
    // A /28: .2 … .14 are usable (13 addresses), so both allocators must interleave.
    let env = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/28\nFLANNEL_MTU=1450\n\
               FLANNEL_IPMASQ=true\n";
    let host = Host::with_subnet_env("1.0.0", env);
    let mut taken: HashSet<String> = HashSet::new();
    let mut pods = Vec::new();
    let mut take = |a: String, who: &str| {
        assert!(
            taken.insert(a.clone()),
            "{a} handed out twice (second by {who})"
        );
    };
    for round in 0..3 {
        for i in 0..2 {
            let r = host_local(&host, "ADD", &format!("hl{round}{i}"), "10.5.72.0/28").expect_ok();
            take(strip_prefix(&result_address(&r)).to_string(), "host-local");
        }
        for i in 0..2 {
            let pod = Netns::new("fcp");
            let r = host.add(&format!("ours{round}{i}"), &pod).expect_ok();
            take(strip_prefix(&result_address(&r)).to_string(), "flannel");
            pods.push((format!("ours{round}{i}"), pod));
        }
    }
    // 12 taken; one address left: ours gets it, then both run dry.
    let pod = Netns::new("fcp");
    let r = host.add("ourslast", &pod).expect_ok();
    take(strip_prefix(&result_address(&r)).to_string(), "flannel");
    pods.push(("ourslast".to_string(), pod));
    assert_eq!(taken.len(), 13);
    let veths_before = host.veths().len();
    let pod = Netns::new("fcp");
    let msg = host.add("oursfull", &pod).expect_err(100);
    assert!(msg.contains("no IP addresses available"), "{msg}");
    // Exhaustion leaves nothing behind.
    assert_eq!(host.veths().len(), veths_before);
    assert!(!pod.links().contains(&"eth0".to_string()));
    assert_eq!(host.store_entries().len(), 13);
    assert!(!host_local(&host, "ADD", "hlfull", "10.5.72.0/28").ok);

    // Each releases its own; the other's entries stay.
    for round in 0..3 {
        for i in 0..2 {
            host_local(&host, "DEL", &format!("hl{round}{i}"), "10.5.72.0/28").expect_ok();
        }
    }
    assert_eq!(host.store_entries().len(), 7);
    assert!(host
        .store_entries()
        .iter()
        .all(|(_, owner)| owner.starts_with("ours")));
    // host-local now fills the freed addresses without touching ours.
    for i in 0..6 {
        let r = host_local(&host, "ADD", &format!("hlb{i}"), "10.5.72.0/28").expect_ok();
        let a = strip_prefix(&result_address(&r)).to_string();
        assert!(
            !host
                .store_entries()
                .iter()
                .any(|(ip, o)| *ip == a && o.starts_with("ours")),
            "host-local took {a}, which is ours"
        );
    }
    for (id, pod) in &pods {
        host.del(id, pod).expect_ok();
    }
    assert_eq!(host.store_entries().len(), 6);
    assert!(host
        .store_entries()
        .iter()
        .all(|(_, owner)| owner.starts_with("hlb")));
}

#[test]
fn delegate_path_with_reference_bridge() {
    netns_tests::require_all!(common::PRIVILEGED);
    let mut host = Host::new("1.0.0");
    host.conf["delegate"]["type"] = json!("bridge");
    let pod = Netns::new("fcp");
    let res = host.add("deleg01", &pod).expect_ok();
    let addr = result_address(&res);
    assert!(addr.starts_with("10.5.72."), "{res}");
    assert!(pod.addr_show("eth0").contains(&format!("inet {addr}")));
    assert!(pod.addr_show("eth0").contains("mtu 1450"));
    assert!(pod.ping("10.5.72.1"));
    // The saved delegate conf, as flannel writes it.
    let saved: Value = serde_json::from_slice(
        &std::fs::read(host.dir.path().join("flannel").join("deleg01")).expect("saved conf"),
    )
    .unwrap();
    assert_eq!(saved["type"], "bridge");
    assert_eq!(saved["name"], "cbr0");
    assert_eq!(saved["isGateway"], true);
    assert_eq!(saved["ipMasq"], false);
    assert_eq!(saved["mtu"], 1450);
    assert_eq!(
        saved["ipam"]["ranges"],
        json!([[{ "subnet": "10.5.72.0/24" }]])
    );
    assert_eq!(saved["ipam"]["routes"], json!([{ "dst": "10.5.0.0/16" }]));
    // CHECK goes to the delegate with the saved conf and the prevResult. (bridge 1.1.1's
    // own CHECK rejects its IPAM routes, which carry no gw: its answer is passed through.)
    let mut check = host.conf.clone();
    check["prevResult"] = res.clone();
    let r = host.cni("CHECK", "deleg01", &pod.path(), "eth0", &check);
    if !r.ok {
        let msg = r.expect_err(999);
        assert!(
            msg.starts_with("delegate bridge CHECK: Expected Route"),
            "{msg}"
        );
    }

    host.del("deleg01", &pod).expect_ok();
    assert!(!host.dir.path().join("flannel").join("deleg01").exists());
    assert!(!pod.links().contains(&"eth0".to_string()));
    assert!(host.veths().is_empty());
    assert!(host.store_entries().is_empty());
    host.del("deleg01", &pod).expect_ok();
}

#[test]
fn native_del_undoes_a_delegate_add() {
    // A pod made by flannel's own plugin (saved conf) is torn down after switching to native.
    netns_tests::require_all!(common::PRIVILEGED);
    let mut host = Host::new("1.0.0");
    let native_conf = host.conf.clone();
    host.conf["delegate"]["type"] = json!("bridge");
    let pod = Netns::new("fcp");
    host.add("upgrade1", &pod).expect_ok();
    host.cni("DEL", "upgrade1", &pod.path(), "eth0", &native_conf)
        .expect_ok();
    assert!(!pod.links().contains(&"eth0".to_string()));
    assert!(host.store_entries().is_empty());
    assert!(!host.dir.path().join("flannel").join("upgrade1").exists());
}

/// Nothing of the plugin's is left: no veth, no pod interface, no store entry.
fn assert_clean(host: &Host, pod: &Netns) {
    assert!(host.veths().is_empty(), "veths left: {:?}", host.veths());
    assert!(
        !pod.links().contains(&"eth0".to_string()),
        "eth0 left in the pod"
    );
    assert!(
        host.store_entries().is_empty(),
        "{:?}",
        host.store_entries()
    );
    let saved = host.dir.path().join("flannel");
    assert!(
        std::fs::read_dir(&saved).map(|d| d.count()).unwrap_or(0) == 0,
        "saved confs left"
    );
}

/// A host and a pod for feeding the plugin bad input; each test of one kind of bad input
/// starts from its own, and ends with [`assert_clean`].
struct BadInput {
    host: Host,
    pod: Netns,
    conf: Vec<u8>,
}

impl BadInput {
    fn new() -> BadInput {
        let host = Host::new("1.0.0");
        let pod = Netns::new("fcp");
        let conf = serde_json::to_vec(&host.conf).unwrap();
        BadInput { host, pod, conf }
    }

    /// Every variable the plugin needs, for `cmd`.
    fn env(&self, cmd: &str) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", cmd.to_string()),
            ("CNI_CONTAINERID", "badinput".to_string()),
            ("CNI_NETNS", self.pod.path()),
            ("CNI_IFNAME", "eth0".to_string()),
            ("CNI_PATH", CNI_DIR.to_string()),
        ]
    }

    fn run(&self, env: &[(&'static str, String)], stdin: &[u8]) -> Run {
        let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.host.run_bin(PLUGIN, &e, stdin)
    }

    /// ADD with every variable set and `conf` on stdin.
    fn add(&self, conf: &serde_json::Value) -> Run {
        self.run(&self.env("ADD"), &serde_json::to_vec(conf).unwrap())
    }

    fn assert_clean(&self) {
        assert_clean(&self.host, &self.pod);
    }
}

#[test]
fn bad_request_gets_its_code_and_leaves_nothing() {
    netns_tests::require_all!(common::PRIVILEGED);
    let t = BadInput::new();
    // Malformed JSON → 6.
    t.run(&t.env("ADD"), b"{\"cniVersion\": \"1.0.0\", ")
        .expect_err(6);
    // Missing variables → 4, naming them.
    for missing in [
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_PATH",
        "CNI_COMMAND",
    ] {
        let env: Vec<_> = t
            .env("ADD")
            .into_iter()
            .filter(|(k, _)| *k != missing)
            .collect();
        let msg = t.run(&env, &t.conf).expect_err(4);
        assert!(msg.contains(missing), "{msg}");
    }
    // Unknown command → 4.
    t.run(&t.env("FROB"), &t.conf).expect_err(4);
    // Unsupported version → 1.
    for v in ["0.2.0", "2.0.0"] {
        let mut c = t.host.conf.clone();
        c["cniVersion"] = json!(v);
        t.add(&c).expect_err(1);
    }
    // A bad interface name → 4.
    let mut env = t.env("ADD");
    env[3].1 = "eth0/../x".to_string();
    t.run(&env, &t.conf).expect_err(4);
    // A netns that does not exist → 4.
    let mut env = t.env("ADD");
    env[2].1 = "/var/run/netns/does-not-exist".to_string();
    t.run(&env, &t.conf).expect_err(4);
    t.assert_clean();
}

#[test]
fn bad_conf_gets_its_code_and_leaves_nothing() {
    netns_tests::require_all!(common::PRIVILEGED);
    let t = BadInput::new();
    // Invalid conf → 7.
    for patch in [
        json!({"name": null}),
        json!({"delegate": {"name": "x"}}),
        json!({"delegate": {"ipam": {}}}),
        json!({"delegate": {"mtu": "big"}}),
        json!({"subnetFile": 7}),
    ] {
        let mut c = t.host.conf.clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else if v.is_object() && k == "delegate" {
                for (dk, dv) in v.as_object().unwrap() {
                    c["delegate"][dk] = dv.clone();
                }
            } else {
                c[k] = v.clone();
            }
        }
        t.add(&c).expect_err(7);
    }
    // Escaping the store: a container ID (→ 4) or a network name (→ 7) with a path in it.
    let mut env = t.env("ADD");
    env[1].1 = "../../../tmp/escape".to_string();
    t.run(&env, &t.conf).expect_err(4);
    let mut c = t.host.conf.clone();
    c["name"] = json!("../escape");
    t.add(&c).expect_err(7);
    assert!(!t.host.dir.path().join("escape").exists());
    t.assert_clean();
}

#[test]
fn bad_subnet_file_gets_code_11_naming_what_is_wrong_and_leaves_nothing() {
    netns_tests::require_all!(common::PRIVILEGED);
    let t = BadInput::new();
    let (host, conf) = (&t.host, &t.host.conf);
    // Missing subnet file → 11 naming the file.
    std::fs::remove_file(host.subnet_file()).unwrap();
    let msg = t.add(conf).expect_err(11);
    assert!(
        msg.contains(&host.subnet_file().display().to_string()),
        "{msg}"
    );
    // Incomplete subnet file → 11 naming what is missing.
    std::fs::write(
        host.subnet_file(),
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_MTU=1450\n",
    )
    .unwrap();
    let msg = t.add(conf).expect_err(11);
    assert!(msg.contains("FLANNEL_SUBNET"), "{msg}");
    // A malformed value → 11 naming the key and the value as written: flannel's plugin takes
    // values verbatim, so a quoted CIDR is malformed.
    std::fs::write(
        host.subnet_file(),
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=\"10.5.1.1/24\"\nFLANNEL_MTU=1450\n\
         FLANNEL_IPMASQ=true\n",
    )
    .unwrap();
    let msg = t.add(conf).expect_err(11);
    assert!(msg.contains("FLANNEL_SUBNET=\"10.5.1.1/24\""), "{msg}");
    t.assert_clean();
}

#[test]
fn failing_delegate_or_taken_interface_leaves_nothing() {
    netns_tests::require_all!(common::PRIVILEGED);
    let t = BadInput::new();
    // The delegate path: a plugin that does not exist.
    let mut c = t.host.conf.clone();
    c["delegate"]["type"] = json!("no-such-plugin");
    let msg = t.add(&c).expect_err(999);
    assert!(msg.contains("no-such-plugin"), "{msg}");
    // An interface name the pod already has: ADD fails, the existing one stays.
    sh_ok(&[
        "ip",
        "-n",
        &t.pod.name,
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "x0",
    ]);
    let r = t.add(&t.host.conf);
    assert!(!r.ok);
    sh_ok(&["ip", "-n", &t.pod.name, "link", "del", "eth0"]);
    t.assert_clean();
}

#[test]
fn version_status_and_gc() {
    netns_tests::require_all!(common::PRIVILEGED);
    let host = Host::new("1.1.0");
    let v = host.run_bin(
        PLUGIN,
        &[("CNI_COMMAND", "VERSION")],
        b"{\"cniVersion\":\"1.1.0\"}",
    );
    let v = v.expect_ok();
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    let conf = serde_json::to_vec(&host.conf).unwrap();
    host.run_bin(PLUGIN, &[("CNI_COMMAND", "STATUS")], &conf)
        .expect_ok();
    std::fs::rename(host.subnet_file(), host.dir.path().join("away")).unwrap();
    let msg = host
        .run_bin(PLUGIN, &[("CNI_COMMAND", "STATUS")], &conf)
        .expect_err(50);
    assert!(msg.contains("subnet.env"), "{msg}");
    std::fs::rename(host.dir.path().join("away"), host.subnet_file()).unwrap();

    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("fcp")).collect();
    for (i, pod) in pods.iter().enumerate() {
        host.add(&format!("gc{i}"), pod).expect_ok();
    }
    assert_eq!(host.store_entries().len(), 3);
    let mut gc = host.conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{ "containerID": "gc1", "ifname": "eth0" }]);
    host.run_bin(
        PLUGIN,
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", CNI_DIR)],
        &serde_json::to_vec(&gc).unwrap(),
    )
    .expect_ok();
    let left = host.store_entries();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].1, "gc1\r\neth0");
    // GC before 1.1.0 does not exist.
    let mut old = gc.clone();
    old["cniVersion"] = json!("1.0.0");
    host.run_bin(
        PLUGIN,
        &[("CNI_COMMAND", "GC")],
        &serde_json::to_vec(&old).unwrap(),
    )
    .expect_err(1);
    for (i, pod) in pods.iter().enumerate() {
        host.del(&format!("gc{i}"), pod).expect_ok();
    }
}

#[test]
fn ip_masq_rules_come_and_go() {
    netns_tests::require_all!(common::PRIVILEGED);
    let mut host = Host::new("1.0.0");
    host.conf["delegate"]["ipMasq"] = json!(true);
    let pod = Netns::new("fcp");
    let res = host.add("masq0001", &pod).expect_ok();
    let ip = strip_prefix(&result_address(&res)).to_string();
    let rules = || {
        String::from_utf8_lossy(&host.ns.exec(&["iptables", "-w", "-t", "nat", "-S"]).stdout)
            .into_owned()
    };
    let r = rules();
    assert!(r.contains(&format!("-A POSTROUTING -s {ip}/32")), "{r}");
    assert!(r.contains("-j MASQUERADE"), "{r}");
    assert!(r.contains("-d 10.5.72.0/24"), "{r}");
    assert!(r.contains(r#"id: \"masq0001\""#), "{r}");
    host.del("masq0001", &pod).expect_ok();
    let r = rules();
    assert!(!r.contains("masq0001") && !r.contains("MASQUERADE"), "{r}");
}

#[test]
fn del_runs_every_step_when_one_fails() {
    netns_tests::require_all!(common::PRIVILEGED);
    let mut host = Host::new("1.0.0");
    host.conf["delegate"]["ipMasq"] = json!(true);
    let pod = Netns::new("fcp");
    let res = host.add("brok0001", &pod).expect_ok();
    let ip = strip_prefix(&result_address(&res)).to_string();
    let rules = || {
        String::from_utf8_lossy(&host.ns.exec(&["iptables", "-w", "-t", "nat", "-S"]).stdout)
            .into_owned()
    };
    assert!(rules().contains(r#"id: \"brok0001\""#), "{}", rules());

    // A netns path that opens but is no namespace: removing the pod's interface fails.
    let not_a_netns = host.dir.path().join("not-a-netns");
    std::fs::write(&not_a_netns, b"").unwrap();
    let not_a_netns = not_a_netns.to_str().unwrap();
    let run = host.cni("DEL", "brok0001", not_a_netns, "eth0", &host.conf);
    let msg = run.expect_err(999);
    assert!(
        msg.contains(&format!("remove eth0 in {not_a_netns}")),
        "{msg}"
    );
    assert!(msg.contains("1 step failed"), "{msg}");

    // The other steps ran: the address is free in the store, the masquerade rules are gone.
    assert!(
        host.store_entries().is_empty(),
        "{:?}",
        host.store_entries()
    );
    let r = rules();
    assert!(!r.contains("brok0001") && !r.contains(&ip), "{r}");

    // The runtime's retry with the real namespace finishes the job.
    host.del("brok0001", &pod).expect_ok();
    assert!(!pod.links().contains(&"eth0".to_string()));
    assert!(host.veths().is_empty(), "{:?}", host.veths());
}

#[test]
fn dual_stack_lease() {
    netns_tests::require_all!(common::PRIVILEGED);
    let env = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n\
               FLANNEL_IPV6_NETWORK=fd00:5::/56\nFLANNEL_IPV6_SUBNET=fd00:5:0:48::1/64\n\
               FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
    let host = Host::with_subnet_env("1.0.0", env);
    let pod = Netns::new("fcp");
    let res = host.add("dual0001", &pod).expect_ok();
    let ips: Vec<&str> = res["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap())
        .collect();
    assert_eq!(ips, vec!["10.5.72.2/24", "fd00:5:0:48::2/64"], "{res}");
    let shown = pod.addr_show("eth0");
    assert!(shown.contains("inet6 fd00:5:0:48::2/64"), "{shown}");
    assert!(pod.ping("10.5.72.1"));
    assert!(pod.ping("fd00:5:0:48::1"));
    let r6 = sh_ok(&["ip", "-n", &pod.name, "-6", "route", "show"]);
    assert!(r6.contains("default via fd00:5:0:48::1"), "{r6}");
    assert!(r6.contains("fd00:5::/56 via fd00:5:0:48::1"), "{r6}");
    assert_eq!(host.store_entries().len(), 2);
    assert!(host.store().join("last_reserved_ip.1").exists());
    host.del("dual0001", &pod).expect_ok();
    assert!(host.store_entries().is_empty());
}

/// The bridge's addresses and the routes through it, as `ip` shows them in the host.
fn bridge_state(host: &Host) -> (String, String) {
    let addrs = host.ns.addr_show(&host.bridge);
    let routes = sh_ok(&[
        "ip",
        "-n",
        &host.ns.name,
        "route",
        "show",
        "dev",
        &host.bridge,
    ]);
    (addrs, routes)
}

#[test]
fn a_new_lease_subnet_replaces_the_bridge_gateway() {
    // flanneld restarted and leased other subnets: the next pod must get a working gateway,
    // and the old subnets must not stay routed to the bridge (they are someone else's now).
    netns_tests::require_all!(common::PRIVILEGED);
    let lease_a = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n\
                   FLANNEL_IPV6_NETWORK=fd00:5::/56\nFLANNEL_IPV6_SUBNET=fd00:5:0:48::1/64\n\
                   FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
    let lease_b = lease_a
        .replace("10.5.72.1/24", "10.5.9.1/24")
        .replace("fd00:5:0:48::1/64", "fd00:5:0:9::1/64");
    for delegate in [false, true] {
        let mut host = Host::with_subnet_env("1.0.0", lease_a);
        if delegate {
            host.conf["delegate"]["type"] = json!("bridge");
        }
        let old_pod = Netns::new("fcp");
        host.add("oldlease", &old_pod).expect_ok();
        let (addrs, _) = bridge_state(&host);
        assert!(addrs.contains("inet 10.5.72.1/24"), "{addrs}");
        assert!(addrs.contains("inet6 fd00:5:0:48::1/64"), "{addrs}");
        let link_local = addrs.contains("inet6 fe80::");

        std::fs::write(host.subnet_file(), &lease_b).unwrap();
        let pod = Netns::new("fcp");
        let res = host.add("newlease", &pod).expect_ok();
        let addr = result_address(&res);
        assert!(addr.starts_with("10.5.9."), "delegate={delegate}: {res}");
        let (addrs, routes) = bridge_state(&host);
        let routes6 = sh_ok(&[
            "ip",
            "-n",
            &host.ns.name,
            "-6",
            "route",
            "show",
            "dev",
            &host.bridge,
        ]);
        assert!(
            addrs.contains("inet 10.5.9.1/24"),
            "delegate={delegate}: {addrs}"
        );
        assert!(
            addrs.contains("inet6 fd00:5:0:9::1/64"),
            "delegate={delegate}: {addrs}"
        );
        assert!(
            !addrs.contains("10.5.72.") && !addrs.contains("fd00:5:0:48:"),
            "delegate={delegate}: old gateway kept: {addrs}"
        );
        assert!(
            !routes.contains("10.5.72.0/24") && !routes6.contains("fd00:5:0:48::/64"),
            "delegate={delegate}: old subnet still routed to the bridge: {routes}{routes6}"
        );
        assert!(
            routes.contains("10.5.9.0/24"),
            "delegate={delegate}: {routes}"
        );
        // Nothing else of the bridge was disturbed.
        assert!(addrs.contains(",UP"), "{addrs}");
        assert_eq!(addrs.contains("inet6 fe80::"), link_local, "{addrs}");
        assert!(
            pod.ping("10.5.9.1"),
            "delegate={delegate}: gateway unreachable"
        );
        // The reference bridge leaves duplicate address detection on: poll until it is over.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !pod.ping("fd00:5:0:9::1") {
            assert!(
                std::time::Instant::now() < deadline,
                "delegate={delegate}: IPv6 gateway unreachable: {}",
                pod.addr_show("eth0")
            );
        }

        host.del("newlease", &pod).expect_ok();
        host.del("oldlease", &old_pod).expect_ok();
        assert!(
            host.store_entries().is_empty(),
            "{:?}",
            host.store_entries()
        );
    }
}

#[test]
fn del_survives_a_saved_conf_left_half_written() {
    // A crash while the conf was written in place left a truncated file: DEL must still
    // undo the pod, or the runtime retries it for ever.
    netns_tests::require_all!(common::PRIVILEGED);
    let mut host = Host::new("1.0.0");
    host.conf["delegate"]["type"] = json!("bridge");
    let pod = Netns::new("fcp");
    host.add("torn0001", &pod).expect_ok();
    let saved = host.dir.path().join("flannel").join("torn0001");
    let whole = std::fs::read(&saved).unwrap();
    std::fs::write(&saved, &whole[..whole.len() / 2]).unwrap();

    host.del("torn0001", &pod).expect_ok();
    assert_clean(&host, &pod);
    host.del("torn0001", &pod).expect_ok();
}

/// The host's data dir of saved delegate confs: the container IDs in it.
fn saved_ids(host: &Host) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(host.dir.path().join("flannel"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

fn gc_conf(host: &Host, valid: &[&str]) -> Vec<u8> {
    let mut gc = host.conf.clone();
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = valid
        .iter()
        .map(|id| json!({ "containerID": id, "ifname": "eth0" }))
        .collect();
    serde_json::to_vec(&gc).unwrap()
}

#[test]
fn gc_runs_the_delegate_del_of_stale_containers() {
    // The delegate's IPAM is not host-local as far as we know (here: the real host-local
    // under another name, as a third-party IPAM would be): only its own DEL frees what it
    // holds, so GC must run the delegate's DEL with each stale saved conf.
    netns_tests::require_all!(common::PRIVILEGED);
    let mut host = Host::new("1.0.0");
    let bins = host.dir.path().join("bin");
    std::fs::create_dir(&bins).unwrap();
    std::os::unix::fs::symlink(format!("{CNI_DIR}/bridge"), bins.join("bridge")).unwrap();
    std::os::unix::fs::symlink(format!("{CNI_DIR}/host-local"), bins.join("other-ipam")).unwrap();
    let cni_path = bins.display().to_string();
    host.conf["ipam"]["type"] = json!("other-ipam");
    let run = |cmd: &str, id: &str, pod: &Netns, conf: &[u8]| {
        host.run_bin(
            PLUGIN,
            &[
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", &pod.path()),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", &cni_path),
            ],
            conf,
        )
    };
    let conf = serde_json::to_vec(&host.conf).unwrap();
    let pods: Vec<Netns> = (0..2).map(|_| Netns::new("fcp")).collect();
    let mut addr = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let res = run("ADD", &format!("gcdel{i}"), pod, &conf).expect_ok();
        addr.push(strip_prefix(&result_address(&res)).to_string());
    }
    assert_eq!(host.store_entries().len(), 2);

    host.run_bin(
        PLUGIN,
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", &cni_path)],
        &gc_conf(&host, &["gcdel1"]),
    )
    .expect_ok();
    assert_eq!(saved_ids(&host), vec!["gcdel1".to_string()]);
    let left = host.store_entries();
    assert_eq!(
        left,
        vec![(addr[1].clone(), "gcdel1\r\neth0".to_string())],
        "the stale container's address must be freed by its DEL"
    );
    run("DEL", "gcdel1", &pods[1], &conf).expect_ok();
    run("DEL", "gcdel0", &pods[0], &conf).expect_ok();
    assert!(host.store_entries().is_empty());
}

/// A plugin run in the background (killed and reaped if the test fails first).
struct Background(std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn gc_keeps_a_pod_added_while_it_runs() {
    // The runtime listed the valid attachments before calling GC; a pod added while the GC
    // runs its delegates' DELs is not in that list, yet alive: GC must leave it alone.
    netns_tests::require_all!(common::PRIVILEGED);
    use std::io::Write;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let mut host = Host::new("1.0.0");
    host.conf["delegate"]["type"] = json!("bridge");
    let pod = Netns::new("fcp");
    host.add("gcvalid", &pod).expect_ok();
    // Many stale containers keep the GC busy with DELs for a while.
    const STALE: usize = 200;
    let data = host.dir.path().join("flannel");
    let template = std::fs::read(data.join("gcvalid")).unwrap();
    for i in 0..STALE {
        std::fs::write(data.join(format!("stale{i:03}")), &template).unwrap();
    }

    let mut gc = Command::new("ip");
    gc.args(["netns", "exec", &host.ns.name, PLUGIN])
        .env("CNI_COMMAND", "GC")
        .env("CNI_PATH", CNI_DIR)
        .env_remove("CNI_CONTAINERID")
        .env_remove("CNI_NETNS")
        .env_remove("CNI_IFNAME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut gc = Background(gc.spawn().expect("spawn GC"));
    gc.0.stdin
        .take()
        .unwrap()
        .write_all(&gc_conf(&host, &["gcvalid"]))
        .unwrap();
    // The GC has begun once it has deleted a stale container.
    let deadline = Instant::now() + Duration::from_secs(30);
    while saved_ids(&host).len() > STALE {
        assert!(Instant::now() < deadline, "GC deleted nothing");
        assert!(gc.0.try_wait().unwrap().is_none(), "GC ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    let late = Netns::new("fcp");
    let res = host.add("gclate", &late).expect_ok();
    let addr = strip_prefix(&result_address(&res)).to_string();
    assert!(
        gc.0.try_wait().unwrap().is_none(),
        "the GC finished before the late ADD did: the test did not interleave them"
    );
    let Background(child) = &mut gc;
    let status = child.wait().unwrap();
    assert!(status.success(), "GC failed");

    assert!(
        host.store_entries()
            .contains(&(addr.clone(), "gclate\r\neth0".to_string())),
        "GC freed {addr}, allocated after it began: {:?}",
        host.store_entries()
    );
    assert_eq!(
        saved_ids(&host),
        vec!["gclate".to_string(), "gcvalid".to_string()]
    );
    assert!(late.ping("10.5.72.1"), "the late pod lost its network");
    host.del("gclate", &late).expect_ok();
    host.del("gcvalid", &pod).expect_ok();
    assert!(
        host.store_entries().is_empty(),
        "{:?}",
        host.store_entries()
    );
}
