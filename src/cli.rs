//! flanneld's command line: flannel's flags, defaults and `FLANNELD_*` environment variables.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::subnet::etcd::Password;

/// Overlay network daemon, compatible with flannel.
#[derive(Debug, Clone, Parser)]
#[command(name = "flanneld", version, about, args_override_self = true)]
pub struct Opts {
    /// Comma-separated etcd v3 endpoints.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: String,

    /// Key prefix of the network in etcd.
    #[arg(
        long,
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,

    /// CA file used to verify the etcd server's certificate.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,

    /// Client certificate for etcd.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,

    /// Client key for etcd.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,

    /// etcd user name.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,

    /// etcd password (needs https://, or --etcd-insecure-password over plain http://).
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<Password>,

    /// Allow --etcd-password over plain http:// endpoints, where it travels in the clear.
    #[arg(long, env = "FLANNELD_ETCD_INSECURE_PASSWORD", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub etcd_insecure_password: bool,

    /// Interface (name or IP) for inter-host traffic; repeat to try several in order.
    #[arg(long, env = "FLANNELD_IFACE")]
    pub iface: Vec<String>,

    /// Regex over interface names or IPs, tried after --iface; repeatable.
    #[arg(long, env = "FLANNELD_IFACE_REGEX")]
    pub iface_regex: Vec<String>,

    /// Use the interface the kernel would route to this IP through.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<IpAddr>,

    /// IPv4 address advertised to peers (default: the interface's address).
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// IPv6 address advertised to peers (default: the interface's address).
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<Ipv6Addr>,

    /// File written for the CNI plugin and other consumers.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,

    /// Minutes before expiry to renew the lease (1..1439).
    #[arg(
        long,
        env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN",
        default_value_t = 60,
        value_parser = clap::value_parser!(u32).range(1..=1439)
    )]
    pub subnet_lease_renew_margin: u32,

    /// Time to live of the subnet lease (e.g. 24h, 30m, 90s).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_TTL", default_value = "24h", value_parser = parse_duration)]
    pub subnet_lease_ttl: Duration,

    /// Install masquerade rules for traffic leaving the overlay.
    #[arg(long, env = "FLANNELD_IP_MASQ", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub ip_masq: bool,

    /// Do not use --random-fully on masquerade rules.
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", num_args = 0..=1,
          default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub ip_masq_fully_random_disable: bool,

    /// Seconds between checks that the rules are still in place.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub iptables_resync: u32,

    /// Add FORWARD accept rules for the overlay network.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", num_args = 0..=1, default_value_t = true,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub iptables_forward_rules: bool,

    /// Add a blackhole route for our own subnet (and IPv6 subnet), as flannel's.
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub ip_blackhole_route: bool,

    /// Address the health server listens on.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,

    /// Port of the health server (0: off).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,

    /// Kubernetes mode: the lease is this Node's podCIDR, peers are the other flannel Nodes.
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub kube_subnet_mgr: bool,

    /// Kubernetes API server URL (replaces the kubeconfig's server; alone: no credentials).
    #[arg(long, env = "FLANNELD_KUBE_API_URL", default_value = "")]
    pub kube_api_url: String,

    /// kubeconfig file (with --kube-api-url empty too: the in-cluster config).
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE", default_value = "")]
    pub kubeconfig_file: String,

    /// Prefix of the Node annotations flannel reads and writes.
    #[arg(long, env = "FLANNELD_KUBE_ANNOTATION_PREFIX",
          default_value = crate::subnet::kube::annotations::DEFAULT_PREFIX,
          value_parser = parse_annotation_prefix)]
    pub kube_annotation_prefix: String,

    /// The network config in Kubernetes mode (a file, not etcd).
    #[arg(
        long,
        env = "FLANNELD_NET_CONFIG_PATH",
        default_value = "/etc/kube-flannel/net-conf.json"
    )]
    pub net_config_path: PathBuf,

    /// Set the Node's NetworkUnavailable condition to False once the subnet file is written.
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", num_args = 0..=1,
          default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub set_node_network_unavailable: bool,

    /// Log verbosity, as flannel's -v (0: info, 1+: debug, 5+: trace).
    #[arg(long = "v", env = "FLANNELD_V", default_value_t = 0)]
    pub verbosity: u8,

    /// glog's per-file verbosity: accepted for flannel's unit files, ignored (use RUST_LOG).
    #[arg(long = "vmodule", env = "FLANNELD_VMODULE")]
    pub vmodule: Option<String>,

    /// glog's stack trace at a log line: accepted for flannel's unit files, ignored.
    #[arg(long = "log_backtrace_at", env = "FLANNELD_LOG_BACKTRACE_AT")]
    pub log_backtrace_at: Option<String>,
}

/// flannel's rules for the prefix, checked at parse time so that the error names the flag.
fn parse_annotation_prefix(s: &str) -> Result<String, String> {
    crate::subnet::kube::annotations::AnnotationKeys::new(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// Parses `24h`, `30m`, `90s`, `1h30m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (examples: 24h, 30m, 90s)");
    if let Ok(secs) = s.parse::<u64>() {
        return nonzero(Duration::from_secs(secs)).ok_or_else(bad);
    }
    let mut total = Duration::ZERO;
    let mut number = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let unit = if c == 'm' && chars.peek() == Some(&'s') {
            chars.next();
            0.001
        } else {
            match c {
                'h' => 3600.0,
                'm' => 60.0,
                's' => 1.0,
                _ => return Err(bad()),
            }
        };
        let n: f64 = number.parse().map_err(|_| bad())?;
        total += Duration::from_secs_f64(n * unit);
        number.clear();
    }
    if !number.is_empty() {
        return Err(bad());
    }
    nonzero(total).ok_or_else(bad)
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// Go's flag package accepts `-flag`; flannel's unit files use both forms, so rewrite single-dash
/// long flags to clap's `--flag`.
pub fn normalize_args<I: IntoIterator<Item = String>>(args: I) -> Vec<String> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let single_dash_long = i > 0
                && a.len() > 2
                && a.starts_with('-')
                && !a.starts_with("--")
                && a.as_bytes()[1].is_ascii_alphabetic();
            if single_dash_long {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

impl Opts {
    /// One warning for each of glog's flags that was given: flanneld takes them so that
    /// flannel's command lines start it, and does nothing with them.
    pub fn ignored_glog_flags(&self) -> Vec<String> {
        [
            (
                "-vmodule",
                &self.vmodule,
                "set RUST_LOG for per-module levels",
            ),
            (
                "-log_backtrace_at",
                &self.log_backtrace_at,
                "no stack traces are logged",
            ),
        ]
        .into_iter()
        .filter_map(|(flag, value, instead)| {
            let value = value.as_ref()?;
            Some(format!("{flag}={value} is glog's and ignored: {instead}"))
        })
        .collect()
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.etcd_endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect()
    }

    /// When to renew: `margin` before expiry, or at a third of the TTL when the margin is not
    /// shorter than the TTL (short TTLs in tests and small clusters).
    pub fn renew_after(&self) -> Duration {
        let margin = Duration::from_secs(u64::from(self.subnet_lease_renew_margin) * 60);
        match self.subnet_lease_ttl.checked_sub(margin) {
            Some(d) if !d.is_zero() => d,
            _ => self.subnet_lease_ttl / 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Opts, clap::Error> {
        let mut v = vec!["flanneld".to_string()];
        v.extend(args.iter().map(|s| s.to_string()));
        Opts::try_parse_from(normalize_args(v))
    }

    #[test]
    fn defaults_match_flannel() {
        let o = parse(&[]).unwrap();
        assert_eq!(
            o.endpoints(),
            ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(o.etcd_prefix, "/coreos.com/network");
        assert_eq!(o.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(o.subnet_lease_renew_margin, 60);
        assert_eq!(o.subnet_lease_ttl, Duration::from_secs(24 * 3600));
        assert!(!o.ip_masq);
        assert!(o.iptables_forward_rules);
        assert_eq!(o.iptables_resync, 5);
        assert_eq!(o.healthz_port, 0);
        assert!(!o.ip_blackhole_route);
        assert_eq!(o.renew_after(), Duration::from_secs(23 * 3600));
    }

    #[test]
    fn renew_margin_out_of_range_names_the_flag() {
        for bad in [
            "--subnet-lease-renew-margin=5000",
            "--subnet-lease-renew-margin=0",
        ] {
            let err = parse(&[bad]).unwrap_err().to_string();
            assert!(err.contains("--subnet-lease-renew-margin"), "{err}");
        }
        assert!(parse(&["--subnet-lease-renew-margin=1439"]).is_ok());
    }

    #[test]
    fn go_style_flags_and_bools() {
        let o = parse(&[
            "-iface=eth0",
            "--iface",
            "10.0.0.1",
            "--ip-masq",
            "--iptables-forward-rules=false",
        ])
        .unwrap();
        assert_eq!(o.iface, ["eth0", "10.0.0.1"]);
        assert!(o.ip_masq);
        assert!(!o.iptables_forward_rules);
    }

    #[test]
    fn ip_blackhole_route_in_every_form() {
        for on in [
            &["--ip-blackhole-route"][..],
            &["-ip-blackhole-route"],
            &["-ip-blackhole-route=true"],
            &["--ip-blackhole-route", "true"],
        ] {
            assert!(parse(on).unwrap().ip_blackhole_route, "{on:?}");
        }
        assert!(
            !parse(&["--ip-blackhole-route=false"])
                .unwrap()
                .ip_blackhole_route
        );
        let err = parse(&["--ip-blackhole-route=maybe"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--ip-blackhole-route"), "{err}");
    }

    #[test]
    fn glogs_flags_are_taken_and_named_as_ignored() {
        assert!(parse(&[]).unwrap().ignored_glog_flags().is_empty());
        let o = parse(&["-vmodule=main=3,iface=2", "-log_backtrace_at=main.go:42"]).unwrap();
        assert_eq!(
            o.ignored_glog_flags(),
            [
                "-vmodule=main=3,iface=2 is glog's and ignored: set RUST_LOG for per-module levels",
                "-log_backtrace_at=main.go:42 is glog's and ignored: no stack traces are logged",
            ]
        );
    }

    #[test]
    fn bad_values_name_the_flag() {
        let err = parse(&["--public-ip=300.1.1.1"]).unwrap_err().to_string();
        assert!(err.contains("--public-ip"), "{err}");
        let err = parse(&["--subnet-lease-ttl=soon"]).unwrap_err().to_string();
        assert!(err.contains("--subnet-lease-ttl"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("5").is_ok());
    }

    #[test]
    fn debug_output_hides_the_password() {
        let o = parse(&[
            "--etcd-username=flannel",
            "--etcd-password=s3cret-pw",
            "--etcd-insecure-password",
        ])
        .unwrap();
        assert!(o.etcd_insecure_password);
        assert_eq!(o.etcd_password, Some(Password::new("s3cret-pw")));
        let dump = format!("{o:?} {o:#?}");
        assert!(!dump.contains("s3cret-pw"), "{dump}");
        assert!(dump.contains("etcd_password"), "{dump}");
    }

    #[test]
    fn kube_flags_have_flannels_defaults() {
        let o = parse(&[]).unwrap();
        assert!(!o.kube_subnet_mgr);
        assert_eq!(o.kube_api_url, "");
        assert_eq!(o.kubeconfig_file, "");
        assert_eq!(o.kube_annotation_prefix, "flannel.alpha.coreos.com");
        assert_eq!(
            o.net_config_path,
            PathBuf::from("/etc/kube-flannel/net-conf.json")
        );
        assert!(o.set_node_network_unavailable);
        let o = parse(&[
            "-kube-subnet-mgr",
            "--set-node-network-unavailable=false",
            "--kube-annotation-prefix=example.org/net",
        ])
        .unwrap();
        assert!(o.kube_subnet_mgr && !o.set_node_network_unavailable);
        assert_eq!(o.kube_annotation_prefix, "example.org/net");
    }

    #[test]
    fn a_bad_annotation_prefix_names_the_flag_and_value() {
        for bad in ["org", "org.COM", "a.org/b/c"] {
            let err = parse(&[&format!("--kube-annotation-prefix={bad}")])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("--kube-annotation-prefix") && err.contains(bad),
                "{err}"
            );
        }
    }

    #[test]
    fn short_ttl_renews_at_a_third() {
        let o = parse(&["--subnet-lease-ttl=9s"]).unwrap();
        assert_eq!(o.renew_after(), Duration::from_secs(3));
    }
}
