use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use super::*;

fn v4_env() -> SubnetEnv {
    SubnetEnv {
        network: Some("10.5.0.0/16".parse().unwrap()),
        subnet: Some("10.5.72.1/24".parse().unwrap()),
        ipv6_network: None,
        ipv6_subnet: None,
        mtu: 1450,
        ipmasq: true,
    }
}

fn dual_env() -> SubnetEnv {
    SubnetEnv {
        ipv6_network: Some("fc00::/48".parse().unwrap()),
        ipv6_subnet: Some("fc00:0:0:7::1/64".parse().unwrap()),
        ipmasq: false,
        ..v4_env()
    }
}

fn v6_env() -> SubnetEnv {
    SubnetEnv {
        network: None,
        subnet: None,
        ..dual_env()
    }
}

type Parser = fn(&str) -> Result<SubnetEnv, EnvError>;
const BOTH: [(&str, Parser); 2] = [
    ("plugin", SubnetEnv::parse),
    ("flanneld", SubnetEnv::parse_lenient),
];

fn problem(r: Result<SubnetEnv, EnvError>) -> EnvProblem {
    match r {
        Err(EnvError::Invalid { problem, .. }) => problem,
        other => panic!("expected an invalid-file error, got {other:?}"),
    }
}

fn bad_value(r: Result<SubnetEnv, EnvError>) -> (&'static str, String) {
    match problem(r) {
        EnvProblem::BadValue { key, value, .. } => (key, value),
        other => panic!("expected a bad value, got {other:?}"),
    }
}

#[test]
fn renders_v4_exactly() {
    assert_eq!(
        v4_env().render(),
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
    );
}

#[test]
fn renders_dual_stack_exactly() {
    assert_eq!(
        dual_env().render(),
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n\
         FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:7::1/64\n\
         FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
    );
    assert_eq!(
        v6_env().render(),
        "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:7::1/64\n\
         FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
    );
}

#[test]
fn both_readers_invert_render() {
    for (who, parse) in BOTH {
        for env in [v4_env(), dual_env(), v6_env()] {
            assert_eq!(parse(&env.render()).unwrap(), env, "{who}");
        }
    }
}

#[test]
fn parses_flanneld_output() {
    let env = SubnetEnv::parse(
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\nFLANNEL_IPV6_NETWORK=\n\
         FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .unwrap();
    assert_eq!(env, v4_env());
    assert_eq!(env.lease_networks()[0].to_string(), "10.5.72.0/24");
    assert_eq!(env.networks().len(), 1);
}

#[test]
fn dual_stack_lease_and_networks() {
    let env = SubnetEnv::parse(
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n\
         FLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_IPV6_SUBNET=fd00:0:0:48::1/64\n\
         FLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    let nets: Vec<String> = env.lease_networks().iter().map(|n| n.to_string()).collect();
    assert_eq!(nets, vec!["10.5.72.0/24", "fd00:0:0:48::/64"]);
    let nets: Vec<String> = env.networks().iter().map(|n| n.to_string()).collect();
    assert_eq!(nets, vec!["10.5.0.0/16", "fd00::/56"]);
    assert_eq!(env.lease_v4(), Some("10.5.72.0/24".parse().unwrap()));
    assert_eq!(env.lease_v6(), Some("fd00:0:0:48::/64".parse().unwrap()));
    assert!(!env.ipmasq);
}

#[test]
fn both_readers_skip_what_other_tools_add() {
    let text = "# written by hand\n\n  FLANNEL_NETWORK = 10.5.0.0/16\r\nOTHER=thing\n\
                FLANNEL_SUBNET=10.5.1.1/24\nFLANNEL_MTU=1400\nFLANNEL_MTU=1450\n\
                FLANNEL_IPV6_SUBNET=\nFLANNEL_IPMASQ=true\n";
    for (who, parse) in BOTH {
        let env = parse(text).unwrap();
        let want = SubnetEnv {
            subnet: Some("10.5.1.1/24".parse().unwrap()),
            ..v4_env()
        };
        assert_eq!(env, want, "{who}");
    }
}

/// Disagreement pinned: quotes. flanneld reads its old file with godotenv (flannel main.go
/// `ReadCIDRsFromSubnetFile` → `godotenv.Read`), which unquotes; flannel's plugin
/// (`loadFlannelSubnetEnv`: `strings.SplitN(line, "=", 2)` then `net.ParseCIDR`) does not, so a
/// quoted value is an error there.
#[test]
fn quotes_are_removed_for_flanneld_only() {
    let text = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=\"10.5.1.1/24\"\n\
                FLANNEL_MTU='1450'\nFLANNEL_IPMASQ=true\n";
    let env = SubnetEnv::parse_lenient(text).unwrap();
    assert_eq!(env.subnet, Some("10.5.1.1/24".parse().unwrap()));
    assert_eq!(env.mtu, 1450);
    let err = SubnetEnv::parse(text).unwrap_err();
    assert!(
        err.to_string().contains("FLANNEL_SUBNET=\"10.5.1.1/24\""),
        "{err}"
    );
    assert_eq!(
        bad_value(Err(err)),
        ("FLANNEL_SUBNET", "\"10.5.1.1/24\"".to_string())
    );
}

/// Disagreement pinned: FLANNEL_IPMASQ spellings (flanneld read Go `ParseBool` spellings, the
/// plugin `true|1` and refused others). flannel's plugin: `ipmasq := parts[1] == "true"`.
#[test]
fn ipmasq_is_true_only_when_exactly_true() {
    let base = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.1.1/24\nFLANNEL_MTU=1450\n";
    for (who, parse) in BOTH {
        let read = |v: &str| parse(&format!("{base}FLANNEL_IPMASQ={v}\n")).map(|e| e.ipmasq);
        assert!(read("true").unwrap(), "{who}");
        for v in ["false", "1", "TRUE", "True", "t", "yes", "maybe"] {
            assert!(!read(v).unwrap(), "{who}: {v} read as true");
        }
    }
}

/// Disagreement pinned: FLANNEL_IPMASQ required. flannel's plugin lists it as missing
/// (`subnetEnv.missing`); flanneld never reads it back, so an old file without it still
/// gives flanneld its old subnet.
#[test]
fn ipmasq_is_required_by_the_plugin_only() {
    let text = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.1.1/24\nFLANNEL_MTU=1450\n";
    assert_eq!(
        problem(SubnetEnv::parse(text)),
        EnvProblem::Missing {
            keys: vec!["FLANNEL_IPMASQ"]
        }
    );
    let env = SubnetEnv::parse_lenient(text).unwrap();
    assert!(!env.ipmasq, "absent means no masquerade");
    assert_eq!(env.subnet, Some("10.5.1.1/24".parse().unwrap()));
}

/// Disagreement pinned: what must be there. flannel's plugin wants some network, some subnet,
/// the MTU and FLANNEL_IPMASQ, and lists alternatives together; it does not pair each family's
/// network with that family's subnet (our plugin did, flanneld's copy did not).
#[test]
fn the_plugin_names_every_missing_key_as_flannel_does() {
    let err = SubnetEnv::parse("OTHER=1\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "subnet file: missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_SUBNET, \
         FLANNEL_IPV6_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ"
    );
    let no_subnet = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_MTU=1450\n";
    assert_eq!(
        problem(SubnetEnv::parse(no_subnet)),
        EnvProblem::Missing {
            keys: vec!["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET", "FLANNEL_IPMASQ"]
        }
    );
    let v4_network_v6_lease = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_IPV6_NETWORK=fc00::/48\n\
                               FLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1450\n\
                               FLANNEL_IPMASQ=false\n";
    let env = SubnetEnv::parse(v4_network_v6_lease).unwrap();
    assert_eq!(env.subnet, None);
    assert_eq!(env.lease_networks().len(), 1);
}

/// flannel reads back only the subnets of its old file (`ReadCIDRsFromSubnetFile`): a missing
/// or odd `FLANNEL_MTU` must not cost flanneld its old subnet.
#[test]
fn flanneld_needs_only_a_subnet() {
    for mtu in ["", "FLANNEL_MTU=big\n", "FLANNEL_MTU=9\n"] {
        let env = SubnetEnv::parse_lenient(&format!("FLANNEL_SUBNET=10.5.1.1/24\n{mtu}")).unwrap();
        assert_eq!(env.subnet, Some("10.5.1.1/24".parse().unwrap()), "{mtu:?}");
        assert_eq!(env.network, None);
    }
    let no_subnet = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_MTU=1450\n";
    let err = SubnetEnv::parse_lenient(no_subnet).unwrap_err();
    assert!(err.to_string().contains("FLANNEL_SUBNET"), "{err}");
    assert!(SubnetEnv::parse_lenient("").is_err());
}

#[test]
fn malformed_values_name_the_key_and_value() {
    let cases = [
        ("FLANNEL_SUBNET=banana", "FLANNEL_SUBNET", "banana"),
        ("FLANNEL_SUBNET=fc00::1/64", "FLANNEL_SUBNET", "fc00::1/64"),
        (
            "FLANNEL_IPV6_SUBNET=10.5.1.1/24",
            "FLANNEL_IPV6_SUBNET",
            "10.5.1.1/24",
        ),
        (
            "FLANNEL_NETWORK=10.5.0.0/40",
            "FLANNEL_NETWORK",
            "10.5.0.0/40",
        ),
    ];
    for (who, parse) in BOTH {
        for (line, key, value) in cases {
            let text = format!("{}{line}\n", v4_env().render());
            let err = parse(&text).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&format!("{key}={value}")), "{who}: {msg}");
            assert_eq!(bad_value(Err(err)), (key, value.to_string()), "{who}");
        }
    }
}

#[test]
fn malformed_mtu_names_the_key_and_value_in_the_plugin() {
    for (line, value) in [("FLANNEL_MTU=big", "big"), ("FLANNEL_MTU=0", "0")] {
        let text = format!("{}{line}\n", v4_env().render());
        let err = SubnetEnv::parse(&text).unwrap_err();
        assert!(err.to_string().contains(line), "{err}");
        assert_eq!(bad_value(Err(err)), ("FLANNEL_MTU", value.to_string()));
    }
}

/// Disagreement pinned: a bare address. Our plugin read `FLANNEL_SUBNET=10.5.1.1` as a /32;
/// flannel reads every CIDR key with `net.ParseCIDR`, which needs the prefix length.
#[test]
fn a_bare_address_is_not_a_cidr() {
    for (who, parse) in BOTH {
        let text = format!("{}FLANNEL_SUBNET=10.5.1.1\n", v4_env().render());
        let (key, value) = bad_value(parse(&text));
        assert_eq!(
            (key, value.as_str()),
            ("FLANNEL_SUBNET", "10.5.1.1"),
            "{who}"
        );
    }
}

/// Disagreement pinned: the MTU (flanneld took any positive number, the plugin 68-65535; now
/// flanneld does not read it, as flannel does not). flannel's plugin parses it with
/// `strconv.ParseUint(v, 10, 32)`: digits only, no sign. The range is the plugin's: outside it
/// the veth and bridge would refuse it later anyway.
#[test]
fn mtu_is_decimal_digits_in_link_range() {
    let who = "plugin";
    {
        let parse = SubnetEnv::parse;
        let read = |v: &str| parse(&format!("{}FLANNEL_MTU={v}\n", v4_env().render()));
        assert_eq!(read("68").unwrap().mtu, 68, "{who}");
        assert_eq!(read("65535").unwrap().mtu, 65535, "{who}");
        for v in [
            "+1450",
            "-1",
            "1450.0",
            "0x5aa",
            "67",
            "9",
            "65536",
            "4294967296",
        ] {
            let (key, value) = bad_value(read(v));
            assert_eq!((key, value.as_str()), ("FLANNEL_MTU", v), "{who}");
        }
    }
}

#[test]
fn garbage_is_an_error() {
    for (who, parse) in BOTH {
        let err = parse("\x00\x01 not an env file\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{who}: {err}");
        assert!(parse("just words\n").is_err(), "{who}");
        assert!(parse("FLANNEL_MTU=9\n").is_err(), "{who}");
    }
    let err = SubnetEnv::parse("FLANNEL_MTU=\u{1F600}\nFLANNEL_SUBNET=10.5.1.1/24").unwrap_err();
    assert!(err.to_string().contains("FLANNEL_MTU"), "{err}");
}

#[test]
fn write_then_read_with_mode_0644() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/flannel/subnet.env");
    v4_env().write_atomic(&path).unwrap();
    assert_eq!(SubnetEnv::read_lenient(&path).unwrap(), Some(v4_env()));
    assert_eq!(SubnetEnv::load(&path).unwrap(), v4_env());
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o644);
    let dir_mode = fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o700, 0o700);

    // Overwrite, and leave no temporary file behind.
    dual_env().write_atomic(&path).unwrap();
    assert_eq!(SubnetEnv::read_lenient(&path).unwrap(), Some(dual_env()));
    let names: Vec<_> = fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["subnet.env"]);
}

#[test]
fn a_planted_symlink_is_replaced_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, "precious").unwrap();
    let path = dir.path().join("subnet.env");
    symlink(&victim, &path).unwrap();
    v4_env().write_atomic(&path).unwrap();
    assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file());
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    assert_eq!(SubnetEnv::read_lenient(&path).unwrap(), Some(v4_env()));
}

#[test]
fn a_missing_file_is_none_for_flanneld_and_an_error_for_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.env");
    assert_eq!(SubnetEnv::read_lenient(&path).unwrap(), None);
    let err = SubnetEnv::load(&path).unwrap_err();
    assert!(
        matches!(&err, EnvError::Io { error, .. } if error.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    let err = SubnetEnv::load(Path::new("/nonexistent/subnet.env")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/subnet.env"), "{err}");
}

#[test]
fn read_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("subnet.env");
    fs::write(&path, "FLANNEL_SUBNET=banana\n").unwrap();
    for msg in [
        SubnetEnv::read_lenient(&path).unwrap_err().to_string(),
        SubnetEnv::load(&path).unwrap_err().to_string(),
    ] {
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("FLANNEL_SUBNET=banana"), "{msg}");
    }
}

#[test]
fn write_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    fs::write(&file, "").unwrap();
    let err = v4_env().write_atomic(&file.join("subnet.env")).unwrap_err();
    assert!(matches!(err, EnvError::Io { .. }), "{err}");
    assert!(err.to_string().contains("plain"), "{err}");
}
