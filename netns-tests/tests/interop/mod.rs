//! Mixed clusters of flannel's Go flanneld and ours, shared by the `interop_*` test files.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use netns_tests::{Backend, Cluster, GoPeers, Host};

pub const CONVERGE: Duration = Duration::from_secs(30);

/// Which daemon a host runs.
pub fn daemon(h: &Host) -> &'static str {
    if h.runs_go() {
        "Go flanneld"
    } else {
        "our flanneld"
    }
}

/// The first host running Go flanneld and the first running ours.
pub fn go_and_ours(c: &Cluster) -> (&Host, &Host) {
    let go = c.hosts().iter().find(|h| h.runs_go()).expect("a Go host");
    let ours = c.hosts().iter().find(|h| !h.runs_go());
    (go, ours.expect("a Rust host"))
}

/// `n` hosts with `backend`; host `i` runs Go flanneld when `go(i)`, ours otherwise. Every
/// host gets `flags`. Returns once every daemon is ready and every host has what the backend
/// needs for every other lease.
pub fn mixed_cluster(
    peers: &GoPeers,
    backend: Backend,
    n: usize,
    go: impl Fn(usize) -> bool,
    flags: &[&str],
) -> Cluster {
    let mut b = Cluster::builder().hosts(n).backend(backend).no_start();
    for f in flags {
        b = b.flanneld_arg(f);
    }
    let c = b.build().expect("cluster");
    for (i, h) in c.hosts().iter().enumerate() {
        if go(i) {
            h.set_go_flanneld(Some(&peers.flanneld));
        }
        h.start().expect("start flanneld");
    }
    c.wait_all_ready(0..n).expect("every flanneld ready");
    let took = c.wait_converged(CONVERGE).expect("converged");
    eprintln!("{backend:?}: converged in {took:?}\n{}", table(&c));
    c
}

/// The bed's table with the daemon of each host.
pub fn table(c: &Cluster) -> String {
    let daemons: Vec<String> = c
        .hosts()
        .iter()
        .map(|h| format!("{}: {}", h.name(), daemon(h)))
        .collect();
    format!("{}{}", c.table().unwrap_or_default(), daemons.join("\n"))
}

/// Swaps the daemon on host `i` (Go ↔ ours): SIGTERM, then the other daemon with the same
/// namespace, subnet file and etcd.
pub fn swap_daemon(c: &Cluster, peers: &GoPeers, i: usize) {
    let h = c.host(i);
    let was_go = h.runs_go();
    h.stop();
    h.set_go_flanneld(if was_go { None } else { Some(&peers.flanneld) });
    h.start().expect("start the other flanneld");
}

/// Entries that appear more than once on a host: routes (main table) by destination, and on
/// `dev` (the vxlan device, if any) neighbours by address and FDB entries by MAC and by remote.
pub fn duplicates(h: &Host, dev: Option<&str>) -> Vec<String> {
    let mut found = Vec::new();
    let mut dup = |what: &str, keys: Vec<String>| {
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        for k in keys {
            *count.entry(k).or_default() += 1;
        }
        for (k, n) in count.into_iter().filter(|(_, n)| *n > 1) {
            found.push(format!("{}: {what} {k} ×{n}", h.name()));
        }
    };
    let routes = h.routes().expect("ip route");
    dup(
        "route to",
        routes
            .iter()
            .map(|r| r["dst"].as_str().unwrap_or("?").to_string())
            .collect(),
    );
    if let Some(dev) = dev {
        let neigh = h.neighbours(dev).expect("ip neigh");
        dup(
            "neighbour",
            neigh
                .iter()
                .map(|n| n["dst"].as_str().unwrap_or("?").to_string())
                .collect(),
        );
        let fdb = h.fdb(dev).expect("bridge fdb");
        dup(
            "fdb MAC",
            fdb.iter()
                .map(|f| f["mac"].as_str().unwrap_or("?").to_lowercase())
                .collect(),
        );
        dup(
            "fdb remote",
            fdb.iter()
                .map(|f| f["dst"].as_str().unwrap_or("?").to_string())
                .collect(),
        );
    }
    found
}
