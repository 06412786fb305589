//! `flanneld mk-docker-opts` against flannel's own `dist/mk-docker-opts.sh` (from its Go
//! module, built into the Go peers folder by scripts/go-peers.sh): for the same subnet file,
//! options and environment, both must write the same file byte for byte and exit alike.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use netns_tests::{require_root, Netns};

const FLANNELD: &str = env!("CARGO_BIN_EXE_flanneld");
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What one run left: exit code and the output file (`None`: not written).
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    code: Option<i32>,
    file: Option<String>,
}

struct Runner {
    script: PathBuf,
    dir: tempfile::TempDir,
    netns: Option<String>,
    runs: usize,
}

impl Runner {
    fn new(script: &Path) -> Runner {
        Runner {
            script: script.to_path_buf(),
            dir: tempfile::tempdir().unwrap(),
            netns: None,
            runs: 0,
        }
    }

    fn subnet_file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Runs `program` with `args` (`{out}` replaced by a fresh output path) in a clean
    /// environment plus `env`.
    fn run(&mut self, program: &[OsString], args: &[&str], env: &[(&str, &str)]) -> Outcome {
        self.runs += 1;
        let out = self.dir.path().join(format!("out{}", self.runs));
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(ns) = &self.netns {
            argv.extend(["ip", "netns", "exec", ns].map(OsString::from));
        }
        argv.extend(program.iter().cloned());
        argv.extend(
            args.iter()
                .map(|a| OsString::from(a.replace("{out}", &out.to_string_lossy()))),
        );
        let status = Command::new(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .env("PATH", PATH)
            .envs(env.iter().copied())
            .output()
            .unwrap_or_else(|e| panic!("running {argv:?}: {e}"));
        Outcome {
            code: status.status.code(),
            file: std::fs::read_to_string(&out).ok(),
        }
    }

    fn theirs(&mut self, args: &[&str], env: &[(&str, &str)]) -> Outcome {
        let program = [OsString::from("sh"), self.script.clone().into()];
        self.run(&program, args, env)
    }

    fn ours(&mut self, args: &[&str], env: &[(&str, &str)]) -> Outcome {
        let program = [FLANNELD, "mk-docker-opts"].map(OsString::from);
        self.run(&program, args, env)
    }

    /// Both with the same input; their outcome, asserted equal.
    fn same(&mut self, args: &[&str], env: &[(&str, &str)]) -> Outcome {
        let theirs = self.theirs(args, env);
        let ours = self.ours(args, env);
        assert_eq!(
            ours, theirs,
            "args {args:?}, env {env:?}: ours (left) vs flannel's"
        );
        theirs
    }
}

const V4: &str =
    "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";
const V4_MASQ: &str =
    "FLANNEL_NETWORK=10.6.0.0/16\nFLANNEL_SUBNET=10.6.44.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n";
const DUAL: &str = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.3.1/24\n\
    FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:3::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
const V6_ONLY: &str = "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:3::1/64\n\
    FLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n";
/// A hand-written file: only the subnet.
const SUBNET_ONLY: &str = "FLANNEL_SUBNET=10.7.0.1/20\n";

/// Every combination of `-i -c -m -k`, each alone as flannel's usage shows them.
fn option_sets() -> Vec<Vec<&'static str>> {
    let mut sets = Vec::new();
    for bits in 0..16u8 {
        let mut s = Vec::new();
        for (bit, opt) in [(1, "-i"), (2, "-c"), (4, "-m")] {
            if bits & bit != 0 {
                s.push(opt);
            }
        }
        if bits & 8 != 0 {
            s.extend(["-k", "MY_OPTS"]);
        }
        sets.push(s);
    }
    // The same options grouped and attached, as getopts reads them too.
    sets.push(vec!["-icm"]);
    sets.push(vec!["-ckMY_OPTS", "-m"]);
    sets
}

#[test]
fn same_file_as_flannels_script_for_every_option_combination() {
    let go = netns_tests::require_go_peers!();
    let mut r = Runner::new(&go.mk_docker_opts);
    let envs: [&[(&str, &str)]; 2] = [
        &[],
        // The combined key's value in the environment comes first; DOCKER_OPT_* are added.
        &[
            ("DOCKER_OPTS", "--debug"),
            ("MY_OPTS", "--log-level=warn"),
            ("DOCKER_OPT_DNS", "--dns=10.5.0.10"),
        ],
    ];
    let mut compared = 0;
    for (name, text) in [
        ("v4", V4),
        ("v4-masq", V4_MASQ),
        ("dual", DUAL),
        ("v6-only", V6_ONLY),
        ("subnet-only", SUBNET_ONLY),
    ] {
        let file = r.subnet_file(name, text);
        let file = file.to_str().unwrap();
        for opts in option_sets() {
            for env in envs {
                let mut args = vec!["-f", file, "-d", "{out}"];
                args.extend(&opts);
                let outcome = r.same(&args, env);
                assert_eq!(outcome.code, Some(0), "{name} {opts:?}: {outcome:?}");
                assert!(outcome.file.is_some(), "{name} {opts:?}: nothing written");
                compared += 1;
            }
        }
    }
    // The default shape, spelled out, so that a change in both cannot pass unseen.
    let file = r.subnet_file("v4-again", V4);
    let out = r.same(&["-f", file.to_str().unwrap(), "-d", "{out}"], &[]);
    assert_eq!(
        out.file.as_deref(),
        Some(
            "DOCKER_OPT_BIP=\"--bip=10.5.3.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\n\
             DOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_OPTS=\" --bip=10.5.3.1/24 --ip-masq=true --mtu=1450\"\n"
        )
    );
    eprintln!("{compared} runs compared byte for byte");
}

#[test]
fn bad_command_lines_and_values_fail_alike_and_write_nothing() {
    let go = netns_tests::require_go_peers!();
    let mut r = Runner::new(&go.mk_docker_opts);
    let file = r.subnet_file("v4", V4);
    let file = file.to_str().unwrap();
    let bad_masq = r.subnet_file("bad-masq", &V4.replace("IPMASQ=false", "IPMASQ=yes"));
    let bad_masq = bad_masq.to_str().unwrap();
    let cases: [&[&str]; 5] = [
        &["-f", file, "-d", "{out}", "-x"], // unknown option
        &["-d", "{out}", "-f"],             // an option without its argument
        &["-d", "{out}", "-h"],
        &["-f", file, "-d", "{out}", "-?"],
        &["-f", bad_masq, "-d", "{out}"], // FLANNEL_IPMASQ neither true nor false
    ];
    for args in cases {
        let outcome = r.same(args, &[]);
        assert_eq!(
            outcome,
            Outcome {
                code: Some(1),
                file: None
            },
            "{args:?}"
        );
    }
    // With -m the IPMASQ value is not looked at, by either.
    let ok = r.same(&["-f", bad_masq, "-d", "{out}", "-m"], &[]);
    assert_eq!(ok.code, Some(0));
}

/// A missing subnet file (flanneld not up yet) is where we differ on purpose: flannel's script
/// exits 0 and writes `DOCKER_OPTS=""`, so Docker starts without flannel's subnet; ours fails
/// and writes nothing.
#[test]
fn a_missing_subnet_file_is_an_error_where_flannels_script_writes_empty_options() {
    let go = netns_tests::require_go_peers!();
    let mut r = Runner::new(&go.mk_docker_opts);
    let missing = r.dir.path().join("no-such-subnet.env");
    let args = ["-f", missing.to_str().unwrap(), "-d", "{out}"];
    let theirs = r.theirs(&args, &[]);
    assert_eq!(
        theirs,
        Outcome {
            code: Some(0),
            file: Some("DOCKER_OPTS=\"\"\n".into())
        },
        "flannel's script changed: revisit README's Docker hosts section"
    );
    assert_eq!(
        r.ours(&args, &[]),
        Outcome {
            code: Some(1),
            file: None
        }
    );
}

/// A route through a gateway to the host's own subnet (left by an old peer) fails both, after
/// the file is written; the connected route of Docker's bridge does not.
#[test]
fn a_gateway_route_to_the_own_subnet_fails_both_after_writing() {
    require_root!();
    let go = netns_tests::require_go_peers!();
    let ns = Netns::create(&format!("{}-dopts", netns_tests::unique_prefix())).unwrap();
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"])
        .unwrap();
    ns.ip(&["addr", "add", "198.18.200.1/24", "dev", "d0"])
        .unwrap();
    ns.ip(&["link", "set", "d0", "up"]).unwrap();
    ns.ip(&["link", "set", "d1", "up"]).unwrap();
    ns.ip(&["addr", "add", "10.5.3.1/24", "dev", "d1"]).unwrap();
    let mut r = Runner::new(&go.mk_docker_opts);
    r.netns = Some(ns.name().to_string());
    let file = r.subnet_file("v4", V4);
    let args = ["-f", file.to_str().unwrap(), "-d", "{out}"];
    let fine = r.same(&args, &[]);
    assert_eq!(
        fine.code,
        Some(0),
        "only the connected route to 10.5.3.0/24: {fine:?}"
    );
    ns.ip(&["addr", "del", "10.5.3.1/24", "dev", "d1"]).unwrap();
    ns.ip(&["route", "add", "10.5.3.0/24", "via", "198.18.200.2"])
        .unwrap();
    let refused = r.same(&args, &[]);
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert_eq!(
        refused.file, fine.file,
        "the file is written before the check"
    );
}
