//! `flannel-bench`: benchmarks of the project's hot paths, one subcommand each.
//!
//! - `flannel-bench cni [--json FILE] [--plugin PATH] [-n N] [--rounds R]`: CNI ADD/DEL
//!   latency of the native `flannel` plugin versus the reference chain (`bridge` + `host-local`).
//! - `flannel-bench scale [--peers N] [--joins N] [--hosts N] [--rounds R] [--json FILE]`:
//!   flanneld start-up with thousands of peers vs `ip -batch`, its RSS, and join latency.
//! - `flannel-bench udp [--json FILE] [--secs N] [--repeat N] [--modes ...]`: the udp
//!   backend (fast and plain path) against kernel VXLAN and a raw veth, iperf3 pod to pod.
//! - `flannel-bench wireguard [--json FILE] [--secs N] [--repeat N] [--modes ...]`: our
//!   wireguard backend against Debian's wireguard-go and our plaintext udp path, in one run.
//! - `flannel-bench mesh50 [--hosts N] [--rounds R] [--json FILE]`: N hosts started at once
//!   against a 3-member etcd: time until the whole mesh is programmed, flanneld RSS and CPU.
//! - `flannel-bench kube [--nodes N] [--rounds R] [--json FILE]`: Kubernetes mode against a real
//!   kube-apiserver with N Nodes: start to the N-th route vs `ip -batch`, RSS, apiserver requests.
//!
//! `scale` and `mesh50` run flannel's own Go flanneld beside ours in the same run
//! (`--daemons flanneld,go-flanneld`, the default), `udp` has a `go-udp` mode; each prints the
//! Rust/Go ratios (`side_by_side.rs`).

mod blast;
mod cni;
mod common;
mod kube;
mod mesh50;
mod scale;
mod side_by_side;
mod udp;
mod wireguard;

fn usage() -> ! {
    eprintln!(
        "usage: flannel-bench <subcommand> [options]\n\n\
         subcommands:\n  \
         cni [--json FILE] [--plugin PATH] [-n N] [--rounds R]\n      \
         ADD/DEL latency: native flannel CNI plugin vs bridge + host-local\n  \
         scale [--peers N] [--joins N] [--hosts N] [--rounds R] [--json FILE] [--flanneld PATH]\n        \
         [--daemons flanneld,go-flanneld] [--go-flanneld PATH]\n      \
         start-up with N peers vs ip -batch, RSS, join latency on watching hosts; ours vs Go flanneld\n  \
         udp [--json FILE] [--secs N] [--repeat N] [--flanneld PATH] [--go-flanneld PATH]\n        \
         [--modes veth,vxlan,flannel-vxlan,udp,udp-plain,go-udp]\n      \
         udp backend and flanneld's vxlan vs hand-made kernel VXLAN vs raw veth vs Go flanneld's udp: 1 and 4 TCP streams, 64-byte UDP pps, CPU\n  \
         mesh50 [--hosts N] [--rounds R] [--backend vxlan|host-gw] [--json FILE] [--flanneld PATH]\n        \
         [--daemons flanneld,go-flanneld] [--go-flanneld PATH] [--idle-secs N]\n      \
         N hosts at once on a 3-member etcd: time to the full mesh, flanneld RSS, CPU to converge and idle; ours vs Go flanneld\n  \
         kube [--nodes N] [--rounds R] [--json FILE] [--flanneld PATH] [--daemons flanneld,go-flanneld]\n        \
         [--go-flanneld PATH]\n      \
         Kubernetes mode, N Nodes in a real kube-apiserver: start to the N-th route vs ip -batch, RSS, apiserver requests; ours vs Go flanneld\n  \
         wireguard [--json FILE] [--secs N] [--repeat N] [--flanneld PATH] [--modes wireguard-go,wireguard,udp]\n      \
         our wireguard backend vs Debian's wireguard-go vs our plaintext udp: 1 and 4 TCP streams, 64-byte pps, daemon CPU"
    );
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(sub) = args.next() else { usage() };
    let rest: Vec<String> = args.collect();
    let code = match sub.as_str() {
        "cni" => cni::main(&rest),
        "scale" => scale::main(&rest),
        "udp" => udp::main(&rest),
        "mesh50" => mesh50::main(&rest),
        "kube" => kube::main(&rest),
        "wireguard" => wireguard::main(&rest),
        "blast-send" => blast::send_main(&rest),
        "blast-recv" => blast::recv_main(&rest),
        "-h" | "--help" | "help" => usage(),
        other => {
            eprintln!("unknown subcommand {other:?}");
            usage()
        }
    };
    std::process::exit(code)
}
