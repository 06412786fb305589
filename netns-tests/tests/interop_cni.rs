//! Our `flannel` CNI plugin beside flannel's own (the Go plugin, built into the Go peers folder
//! by scripts/go-peers.sh; it delegates to Debian's `bridge` and `host-local` in /usr/lib/cni):
//! each works with the other side's flanneld, both give the same ADD result for the same
//! input, and each DELs what the other ADDed. As root, in namespaces this test makes.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ipnetwork::Ipv4Network;
use netns_tests::privileges::{Need, TEST_BED};
use netns_tests::{
    cni_plugin_bin, require_all, unique_prefix, wait_until, Etcd, Host, HostOptions, Netns,
    PodMode, Underlay,
};
use serde_json::{json, Value};

/// Where the delegates flannel's plugin execs (`bridge`, `host-local`) are.
const CNI_PATH: &str = "/usr/lib/cni";

/// What every test here needs: the test bed, the reference delegates, both plugins.
const NEEDS: &[Need<'static>] = &[
    Need::File("/usr/lib/cni/bridge"),
    Need::File("/usr/lib/cni/host-local"),
];

macro_rules! plugins {
    ($test:literal) => {{
        require_all!(TEST_BED);
        require_all!(NEEDS);
        let Some(go) = netns_tests::go_peers::require($test) else {
            return;
        };
        Plugins {
            ours: cni_plugin_bin().expect("our CNI plugin"),
            go: go.cni_plugin.clone(),
            go_flanneld: go.flanneld.clone(),
        }
    }};
}

struct Plugins {
    ours: PathBuf,
    go: PathBuf,
    go_flanneld: PathBuf,
}

/// A node for the plugins: a namespace (where `cni0` and the host ends of the veths go) and a
/// directory with the subnet file, flannel's `dataDir` and host-local's store.
struct Node {
    ns: Netns,
    dir: PathBuf,
    subnet_file: PathBuf,
    name: String,
}

impl Node {
    /// The conf a runtime would pass, the same for both plugins.
    fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": self.name,
            "type": "flannel",
            "subnetFile": self.subnet_file,
            "dataDir": self.dir.join("flannel"),
            "delegate": {"hairpinMode": true, "isDefaultGateway": true},
            "ipam": {"type": "host-local", "dataDir": self.dir.join("ipam")},
        })
    }

    /// host-local's store of this network: the files named after an address.
    fn allocated(&self) -> Vec<IpAddr> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("ipam").join(&self.name)) else {
            return Vec::new();
        };
        let mut ips: Vec<IpAddr> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        ips.sort();
        ips
    }

    /// The veths on `cni0` (the pods' host ends).
    fn bridge_ports(&self) -> Vec<String> {
        let Ok(v) = self.ns.ip_json(&["link", "show", "master", "cni0"]) else {
            return Vec::new();
        };
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str().map(String::from))
            .collect()
    }

    /// The masquerade chains of the pods (`CNI-...` in the nat table), as `bridge` names them.
    fn masq_chains(&self) -> Vec<String> {
        let rules = self.ns.exec("iptables", &["-t", "nat", "-S"]).unwrap();
        rules
            .lines()
            .filter_map(|l| l.strip_prefix("-N "))
            .filter(|c| c.starts_with("CNI-"))
            .map(String::from)
            .collect()
    }
}

/// A node namespace with a subnet file written by the test (the input both plugins read).
/// Our plugin and a node with an IPv4 subnet file, for the tests of ours alone: (plugin,
/// name prefix, the folder the node keeps its files in, the node).
fn our_node() -> (PathBuf, String, tempfile::TempDir, Node) {
    let ours = cni_plugin_bin().expect("our CNI plugin");
    let prefix = unique_prefix();
    let dir = tempfile::tempdir().unwrap();
    let n = node(&prefix, dir.path(), V4_SUBNET_ENV);
    (ours, prefix, dir, n)
}

fn node(prefix: &str, dir: &Path, subnet_env: &str) -> Node {
    let ns = Netns::create(&format!("{prefix}-node")).unwrap();
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    let subnet_file = dir.join("subnet.env");
    std::fs::write(&subnet_file, subnet_env).unwrap();
    Node {
        name: ns.name().to_string(),
        ns,
        dir: dir.to_path_buf(),
        subnet_file,
    }
}

/// Runs `plugin` in `node_ns` as a runtime does; its stdout parsed, or why it failed.
fn cni(
    plugin: &Path,
    command: &str,
    node_ns: &str,
    pod: &Netns,
    container_id: &str,
    conf: &Value,
) -> Result<Value, String> {
    cni_with_path(plugin, command, node_ns, pod, container_id, conf, CNI_PATH)
}

/// [`cni`] with `CNI_PATH` = `cni_path`.
fn cni_with_path(
    plugin: &Path,
    command: &str,
    node_ns: &str,
    pod: &Netns,
    container_id: &str,
    conf: &Value,
    cni_path: &str,
) -> Result<Value, String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_ns])
        .arg(plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", plugin.display()))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{command} with {} failed ({}): {stdout}{}",
            plugin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout).map_err(|e| format!("{command} printed no JSON ({e}): {stdout}"))
}

/// The pod's first IPv4 address from an ADD result.
fn v4_address(result: &Value) -> Ipv4Network {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|ip| ip["address"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no IPv4 address in {result}"))
}

fn mtu_of(ns: &Netns, dev: &str) -> u64 {
    ns.ip_json(&["link", "show", "dev", dev]).unwrap()[0]["mtu"]
        .as_u64()
        .unwrap()
}

fn wait_subnet_file(host: &Host) -> Ipv4Network {
    wait_until(
        Duration::from_secs(30),
        &format!("the subnet file of {}", host.name()),
        || {
            host.check_alive()?;
            host.subnet().map_err(|e| e.to_string())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\nlog:\n{}", host.log_tail(30)))
}

/// (a) Go flanneld with our plugin, our flanneld with flannel's plugin: two hosts on one etcd.
#[test]
fn each_plugin_works_with_the_other_sides_flanneld() {
    let p = plugins!("each_plugin_works_with_the_other_sides_flanneld");
    let prefix = unique_prefix();
    let dir = tempfile::Builder::new().prefix(&prefix).tempdir().unwrap();
    let underlay = Underlay::new(&prefix).unwrap();
    let etcd = Etcd::start_on(&underlay, &prefix, &dir.path().join("etcd")).unwrap();
    etcd.put(
        "/coreos.com/network/config",
        r#"{"Network":"10.5.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap();
    let host = |i: usize, bin: &Path| {
        Host::new(
            i,
            &underlay,
            &prefix,
            &dir.path().join(format!("h{i}")),
            &etcd.endpoint(),
            "/coreos.com/network",
            bin,
            HostOptions::default(),
            PodMode::Static,
        )
        .unwrap()
    };
    let go_host = host(0, &p.go_flanneld);
    let our_host = host(1, &netns_tests::flanneld_bin().unwrap());
    go_host.start().unwrap();
    our_host.start().unwrap();
    for (host, plugin, daemon) in [
        (&go_host, &p.ours, "Go flanneld, our plugin"),
        (&our_host, &p.go, "our flanneld, flannel's plugin"),
    ] {
        let subnet = wait_subnet_file(host);
        let mtu = host.mtu().unwrap();
        let pod = Netns::create(&format!("{}p0", host.name())).unwrap();
        let conf = json!({
            "cniVersion": "0.4.0",
            "name": host.name(),
            "type": "flannel",
            "subnetFile": host.subnet_file(),
            "dataDir": host.dir().join("flannel"),
            "delegate": {"hairpinMode": true, "isDefaultGateway": true},
            "ipam": {"type": "host-local", "dataDir": host.dir().join("ipam")},
        });
        let added = cni(plugin, "ADD", host.name(), &pod, "c0", &conf)
            .unwrap_or_else(|e| panic!("{daemon}: {e}"));
        let addr = v4_address(&added);
        assert!(
            subnet.contains(addr.ip()) && addr.prefix() == subnet.prefix(),
            "{daemon}: pod address {addr} is not in the host's subnet {subnet}"
        );
        let gateway = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        let ping = pod
            .exec("ping", &["-n", "-c", "1", "-W", "2", &gateway.to_string()])
            .map_err(|e| format!("{daemon}: the pod does not reach the bridge gateway: {e}"));
        ping.unwrap();
        assert_eq!(mtu_of(&pod, "eth0"), u64::from(mtu), "{daemon}: pod MTU");
        cni(plugin, "DEL", host.name(), &pod, "c0", &conf).unwrap();
    }
}

const V4_SUBNET_ENV: &str =
    "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";

const DUAL_SUBNET_ENV: &str = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.3.1/24\n\
    FLANNEL_IPV6_NETWORK=fc00:5::/48\nFLANNEL_IPV6_SUBNET=fc00:5:0:3::1/64\nFLANNEL_MTU=1450\n\
    FLANNEL_IPMASQ=false\n";

/// The fields of an ADD result that must differ between two pods on one bridge, replaced by
/// placeholders: each veth's MAC (random), the host end's name (random), the pod's namespace
/// (one per pod), and the address, which the second pod gets as the next one from the same
/// store (asserted by the caller). The bridge's entry (name and MAC) stays: both plugins use
/// the same `cni0`.
fn normalized(result: &Value) -> Value {
    let mut r = result.clone();
    for iface in r["interfaces"].as_array_mut().into_iter().flatten() {
        if iface["name"] == "cni0" {
            continue;
        }
        iface["mac"] = json!("<random>");
        if iface.get("sandbox").is_some() {
            iface["sandbox"] = json!("<pod netns>");
        } else {
            iface["name"] = json!("<host veth>");
        }
    }
    for ip in r["ips"].as_array_mut().into_iter().flatten() {
        ip["address"] = json!("<address>");
    }
    r
}

/// The pod's routes as the kernel has them, with its own address left out.
fn pod_routes(pod: &Netns, family: &str) -> Vec<Value> {
    let routes = pod.ip_json(&[family, "route", "show"]).unwrap();
    routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if let Some(o) = r.as_object_mut() {
                o.remove("prefsrc");
            }
            r
        })
        .collect()
}

/// The nat rules of one pod, found by `bridge`'s comment (`name: "<net>" id: "<id>"`), with
/// its chain, id and address replaced so that two pods' rules compare.
fn masq_rules(node: &Node, id: &str, ip: Ipv4Addr) -> Vec<String> {
    let rules = node.ns.exec("iptables", &["-t", "nat", "-S"]).unwrap();
    let tag = format!("id: \\\"{id}\\\"");
    let own: Vec<&str> = rules.lines().filter(|l| l.contains(&tag)).collect();
    let chain = own
        .iter()
        .find_map(|l| l.split_whitespace().find(|w| w.starts_with("CNI-")))
        .unwrap_or("<none>");
    let mut out: Vec<String> = own
        .iter()
        .map(|l| {
            l.replace(chain, "<chain>")
                .replace(&tag, "id: <id>")
                .replace(&format!("-s {ip}/32 "), "-s <address>/32 ")
        })
        .collect();
    out.sort();
    out
}

/// (b) The same conf and subnet file, one pod by flannel's plugin and one by ours on the same
/// node and host-local store: the results are equal but for what must differ.
#[test]
fn add_results_match_field_for_field() {
    let p = plugins!("add_results_match_field_for_field");
    for (version, subnet_env) in [
        ("0.3.1", V4_SUBNET_ENV),
        ("0.4.0", V4_SUBNET_ENV),
        ("0.4.0", DUAL_SUBNET_ENV),
    ] {
        let prefix = unique_prefix();
        let dir = tempfile::tempdir().unwrap();
        let n = node(&prefix, dir.path(), subnet_env);
        let conf = n.conf(version);
        let go_pod = Netns::create(&format!("{prefix}-pg")).unwrap();
        let our_pod = Netns::create(&format!("{prefix}-pr")).unwrap();
        let go = cni(&p.go, "ADD", n.ns.name(), &go_pod, "go-pod", &conf).unwrap();
        let ours = cni(&p.ours, "ADD", n.ns.name(), &our_pod, "our-pod", &conf).unwrap();
        eprintln!("cniVersion {version}\nflannel's: {go}\nours:      {ours}");
        let (go_ip, our_ip) = (v4_address(&go), v4_address(&ours));
        assert_eq!(
            u32::from(our_ip.ip()),
            u32::from(go_ip.ip()) + 1,
            "{version}: ours must take the next address of the store host-local wrote ({go_ip})"
        );
        assert_eq!(our_ip.prefix(), go_ip.prefix());
        assert_eq!(
            normalized(&ours),
            normalized(&go),
            "{version}: ADD results differ (ours left)"
        );
        assert_eq!(ours["interfaces"][2]["sandbox"], json!(our_pod.path()));
        for family in ["-4", "-6"] {
            assert_eq!(
                pod_routes(&our_pod, family),
                pod_routes(&go_pod, family),
                "{version} {family}: pod routes"
            );
        }
        assert_eq!(mtu_of(&our_pod, "eth0"), mtu_of(&go_pod, "eth0"));
        // ipMasq (flanneld does not masquerade): the same chain and rules, by bridge's names.
        let go_rules = masq_rules(&n, "go-pod", go_ip.ip());
        assert_eq!(go_rules.len(), 3, "{go_rules:?}");
        assert_eq!(
            masq_rules(&n, "our-pod", our_ip.ip()),
            go_rules,
            "{version}: masquerade rules"
        );
        for (plugin, pod, id) in [(&p.go, &go_pod, "go-pod"), (&p.ours, &our_pod, "our-pod")] {
            cni(plugin, "DEL", n.ns.name(), pod, id, &conf).unwrap();
        }
    }
}

/// (c) DEL by one plugin of a pod ADDed by the other, both ways: the address is back in the
/// store, the veth is gone, and so are its masquerade rules and the saved conf.
#[test]
fn each_plugin_deletes_what_the_other_added() {
    let p = plugins!("each_plugin_deletes_what_the_other_added");
    for (adder, deleter, what) in [
        (&p.go, &p.ours, "ADD by flannel's plugin, DEL by ours"),
        (&p.ours, &p.go, "ADD by ours, DEL by flannel's plugin"),
    ] {
        let prefix = unique_prefix();
        let dir = tempfile::tempdir().unwrap();
        let n = node(&prefix, dir.path(), V4_SUBNET_ENV);
        let conf = n.conf("0.4.0");
        let pod = Netns::create(&format!("{prefix}-p")).unwrap();
        let added = cni(adder, "ADD", n.ns.name(), &pod, "pod-1", &conf).unwrap();
        let ip = IpAddr::V4(v4_address(&added).ip());
        assert_eq!(n.allocated(), [ip], "{what}: after ADD");
        assert_eq!(n.bridge_ports().len(), 1, "{what}: after ADD");
        assert_eq!(
            n.masq_chains().len(),
            1,
            "{what}: after ADD (ipMasq: flanneld does not)"
        );
        cni(deleter, "DEL", n.ns.name(), &pod, "pod-1", &conf)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            n.allocated(),
            Vec::<IpAddr>::new(),
            "{what}: address not released"
        );
        assert_eq!(n.bridge_ports(), Vec::<String>::new(), "{what}: veth left");
        assert!(
            pod.ip(&["link", "show", "eth0"]).is_err(),
            "{what}: the pod still has eth0"
        );
        assert_eq!(
            n.masq_chains(),
            Vec::<String>::new(),
            "{what}: masquerade chain left"
        );
        let saved = dir.path().join("flannel").join("pod-1");
        assert!(
            !saved.exists(),
            "{what}: saved conf left at {}",
            saved.display()
        );
        // The address is free again: the next ADD gets one (the store is not stuck).
        let again = cni(deleter, "ADD", n.ns.name(), &pod, "pod-2", &conf).unwrap();
        assert_eq!(n.allocated(), [IpAddr::V4(v4_address(&again).ip())]);
        cni(deleter, "DEL", n.ns.name(), &pod, "pod-2", &conf).unwrap();
    }
}

/// The chain name versions of our plugin before it named chains as `bridge` does used
/// (`CNI-FL-` + FNV-1a of network name, a zero byte and container ID).
fn legacy_chain(network: &str, container_id: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in network.bytes().chain([0u8]).chain(container_id.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("CNI-FL-{h:016x}")
}

/// A pod set up by an earlier version of our plugin (its masquerade chain named the old way)
/// is cleaned up by today's DEL: upgrading the plugin leaves no rules behind.
#[test]
fn del_removes_masquerade_chains_of_the_old_naming() {
    require_all!(TEST_BED);
    let (ours, prefix, _dir, n) = our_node();
    let conf = n.conf("1.0.0");
    let pod = Netns::create(&format!("{prefix}-p")).unwrap();
    let added = cni(&ours, "ADD", n.ns.name(), &pod, "old-pod", &conf).unwrap();
    let ip = v4_address(&added);
    // Replace today's chain with the old one, as the old version left it.
    let iptables = |args: &[&str]| n.ns.exec("iptables", args).unwrap();
    let current = n.masq_chains();
    assert_eq!(current.len(), 1);
    iptables(&["-t", "nat", "-F", "POSTROUTING"]);
    iptables(&["-t", "nat", "-F", &current[0]]);
    iptables(&["-t", "nat", "-X", &current[0]]);
    let chain = legacy_chain(&n.name, "old-pod");
    let comment = format!("flannel-cni name={} id=old-pod", n.name);
    let subnet = format!("{}/{}", ip.network(), ip.prefix());
    iptables(&["-t", "nat", "-N", &chain]);
    iptables(&[
        "-t",
        "nat",
        "-A",
        &chain,
        "-d",
        &subnet,
        "-m",
        "comment",
        "--comment",
        &comment,
        "-j",
        "ACCEPT",
    ]);
    iptables(&[
        "-t",
        "nat",
        "-A",
        &chain,
        "!",
        "-d",
        "224.0.0.0/4",
        "-m",
        "comment",
        "--comment",
        &comment,
        "-j",
        "MASQUERADE",
    ]);
    iptables(&[
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        &ip.ip().to_string(),
        "-m",
        "comment",
        "--comment",
        &comment,
        "-j",
        &chain,
    ]);
    assert_eq!(n.masq_chains(), std::slice::from_ref(&chain));
    cni(&ours, "DEL", n.ns.name(), &pod, "old-pod", &conf).unwrap();
    assert_eq!(
        n.masq_chains(),
        Vec::<String>::new(),
        "old chain {chain} left"
    );
    let postrouting = iptables(&["-t", "nat", "-S", "POSTROUTING"]);
    assert!(!postrouting.contains(&chain), "{postrouting}");
}

/// The conf the native path saves (for flannel's plugin) does not make our GC exec `bridge`:
/// a stale native pod's saved conf is forgotten and its address freed with no delegate
/// plugin installed.
#[test]
fn gc_forgets_the_saved_conf_of_a_stale_native_pod_without_delegates() {
    require_all!(TEST_BED);
    let (ours, prefix, dir, n) = our_node();
    let conf = n.conf("1.1.0");
    let stale = Netns::create(&format!("{prefix}-ps")).unwrap();
    let live = Netns::create(&format!("{prefix}-pl")).unwrap();
    cni(&ours, "ADD", n.ns.name(), &stale, "stale", &conf).unwrap();
    let kept = cni(&ours, "ADD", n.ns.name(), &live, "live", &conf).unwrap();
    let saved = || {
        let mut ids: Vec<String> = std::fs::read_dir(dir.path().join("flannel"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(saved(), ["live", "stale"], "ADD saves flannel's conf");
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "live", "ifname": "eth0"}]);
    let no_delegates = dir.path().join("empty-cni-path");
    std::fs::create_dir(&no_delegates).unwrap();
    cni_with_path(
        &ours,
        "GC",
        n.ns.name(),
        &live,
        "",
        &gc,
        no_delegates.to_str().unwrap(),
    )
    .unwrap();
    assert_eq!(saved(), ["live"]);
    assert_eq!(n.allocated(), [IpAddr::V4(v4_address(&kept).ip())]);
    cni(&ours, "DEL", n.ns.name(), &live, "live", &conf).unwrap();
    assert_eq!(saved(), Vec::<String>::new());
}
