//! `flannel-bench`: benchmarks of the project's hot paths, one subcommand each.
//!
//! - `flannel-bench cni [--json FILE] [--plugin PATH] [-n N] [--rounds R]`: CNI ADD/DEL
//!   latency of the native `flannel` plugin versus the reference chain (`bridge` + `host-local`).
//! - `flannel-bench scale [--peers N] [--joins N] [--hosts N] [--rounds R] [--json FILE]`:
//!   flanneld start-up with thousands of peers vs `ip -batch`, its RSS, and join latency.

mod cni;
mod scale;

fn usage() -> ! {
    eprintln!(
        "usage: flannel-bench <subcommand> [options]\n\n\
         subcommands:\n  \
         cni [--json FILE] [--plugin PATH] [-n N] [--rounds R]\n      \
         ADD/DEL latency: native flannel CNI plugin vs bridge + host-local\n  \
         scale [--peers N] [--joins N] [--hosts N] [--rounds R] [--json FILE] [--flanneld PATH]\n      \
         start-up with N peers vs ip -batch, RSS, join latency on watching hosts"
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
        "-h" | "--help" | "help" => usage(),
        other => {
            eprintln!("unknown subcommand {other:?}");
            usage()
        }
    };
    std::process::exit(code)
}
