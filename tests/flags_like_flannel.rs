//! Our flags against flannel's own: every flag `flanneld --help` of the pinned Go release lists
//! is one of ours, but for the few the README names as not accepted.

use std::collections::BTreeSet;
use std::process::Command;

/// flannel's flags that flanneld does not take, as the README's "Running flanneld" says: none.
const NOT_ACCEPTED: &[&str] = &[];

/// Kubernetes mode's flags, which were the exceptions until it existed.
const KUBE_FLAGS: &[&str] = &[
    "kube-annotation-prefix",
    "kube-api-url",
    "kube-subnet-mgr",
    "kubeconfig-file",
    "net-config-path",
    "set-node-network-unavailable",
];

/// The flag names a `--help` text lists: lines that start with `-x` or `--x` after spaces.
fn flags_in_help(help: &str) -> BTreeSet<String> {
    help.lines()
        .flat_map(|l| l.trim_start().split(", "))
        .filter_map(|w| {
            let name = w.strip_prefix("--").or_else(|| w.strip_prefix('-'))?;
            let name = name.split([' ', '=']).next()?;
            (name.len() > 1).then(|| name.to_string())
        })
        .collect()
}

fn help_of(bin: &std::path::Path) -> String {
    let out = Command::new(bin).arg("--help").output().unwrap();
    // Go's flag package prints usage to stderr; clap to stdout.
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn every_flag_of_flannels_flanneld_is_ours_but_the_named_few() {
    let go = netns_tests::require_go_peers!();
    let theirs = flags_in_help(&help_of(&go.flanneld));
    assert!(
        theirs.contains("etcd-endpoints") && theirs.contains("ip-masq"),
        "flannel's --help was not read: {theirs:?}"
    );
    let ours = flags_in_help(&help_of(env!("CARGO_BIN_EXE_flanneld").as_ref()));
    let missing: Vec<&String> = theirs
        .iter()
        .filter(|f| !ours.contains(*f) && !NOT_ACCEPTED.contains(&f.as_str()))
        .collect();
    assert!(missing.is_empty(), "flannel's flags we lack: {missing:?}");
    for f in KUBE_FLAGS {
        assert!(
            theirs.contains(*f) && ours.contains(*f),
            "{f}: flannel's {}, ours {}",
            theirs.contains(*f),
            ours.contains(*f)
        );
    }
    // The exceptions are real: each is flannel's and not ours (else the README is stale).
    for f in NOT_ACCEPTED {
        assert!(theirs.contains(*f), "{f} is no flag of flannel's any more");
        assert!(!ours.contains(*f), "{f} is accepted now: update the README");
    }
}

#[test]
fn help_texts_of_both_styles_are_read() {
    let go = "  -etcd-cafile string\n    \tSSL CA\n  -ip-masq\n  -v value\n";
    let clap = "      --etcd-endpoints <E>\n  -h, --help\n  -V, --version\n";
    assert_eq!(
        flags_in_help(go),
        ["etcd-cafile", "ip-masq"].map(String::from).into()
    );
    assert_eq!(
        flags_in_help(clap),
        ["etcd-endpoints", "help", "version"]
            .map(String::from)
            .into()
    );
}
