//! `flanneld mk-docker-opts`: Docker daemon options from the subnet file, for hosts where
//! Docker, not a CNI runtime, connects the containers (the classic flannel set-up). It takes
//! the options of flannel's `dist/mk-docker-opts.sh` (`-f -d -i -c -k -m`) and writes the same
//! file, byte for byte; where that script accepts broken input silently, this refuses it (see
//! README, "Docker hosts").

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use flannel_subnet_env::{SubnetEnv, IPMASQ, MTU, SUBNET};
use ipnetwork::Ipv4Network;

const DEFAULT_FLANNEL_ENV: &str = "/run/flannel/subnet.env";
const DEFAULT_DOCKER_ENV: &str = "/run/docker_opts.env";
const DEFAULT_KEY: &str = "DOCKER_OPTS";
/// Variables of this prefix, from the environment or made here, are the individual options.
const OPT_PREFIX: &str = "DOCKER_OPT_";

const USAGE: &str = "\
usage: flanneld mk-docker-opts [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k KEY]

Writes Docker daemon options for this host's flannel subnet to a file Docker's unit can read.
  -f FILE  the subnet file flanneld writes (default /run/flannel/subnet.env)
  -d FILE  the file to write (default /run/docker_opts.env)
  -i       one variable per option, e.g. DOCKER_OPT_MTU=\"--mtu=1450\"
  -c       all options in one variable (DOCKER_OPTS unless -k)
  -k KEY   the name of that variable; its value in the environment comes first
  -m       leave out --ip-masq (for old Docker versions)
Without -i and -c, both are written. DOCKER_OPT_* variables in the environment are added.";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub flannel_env: PathBuf,
    pub docker_env: PathBuf,
    pub individual: bool,
    pub combined: bool,
    /// `false` with `-m`.
    pub ip_masq: bool,
    pub key: String,
}

/// Why the command failed; `Usage` also prints the usage text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    Usage(String),
    Failed(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(s) | Error::Failed(s) => f.write_str(s),
        }
    }
}

/// Runs the subcommand with the arguments after `mk-docker-opts`.
pub fn main(args: &[String]) -> ExitCode {
    let env: Vec<(String, String)> = std::env::vars().collect();
    match run(args, &env) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Usage(why)) => {
            eprintln!("flanneld mk-docker-opts: {why}\n{USAGE}");
            ExitCode::FAILURE
        }
        Err(Error::Failed(why)) => {
            eprintln!("flanneld mk-docker-opts: {why}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String], env: &[(String, String)]) -> Result<(), Error> {
    let opts = parse_args(args)?;
    let path = &opts.flannel_env;
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Failed(format!(
            "cannot read the subnet file {}: {e}",
            path.display()
        ))
    })?;
    let out = render(&opts, &text, env).map_err(|why| {
        Error::Failed(format!("subnet file {}: {why}", opts.flannel_env.display()))
    })?;
    std::fs::write(&opts.docker_env, out)
        .map_err(|e| Error::Failed(format!("cannot write {}: {e}", opts.docker_env.display())))?;
    // Checked after writing, as flannel's script does: the options are right, the host is not.
    if let Some(subnet) = SubnetEnv::parse_lenient(&text)
        .ok()
        .and_then(|e| e.lease_v4())
    {
        if let Some(gw) = gateway_route_to(subnet) {
            return Err(Error::Failed(format!(
                "the routing table already has a route to this host's subnet {subnet} via {gw}: \
                 Docker's bridge would not get the traffic"
            )));
        }
    }
    Ok(())
}

/// The command line, read as the shell's `getopts "f:d:icmk:"` reads it: options may be
/// grouped (`-ic`), an argument may be attached (`-fFILE`) or follow, `--` or the first word
/// that is not an option ends them, and the last of a repeated option wins.
pub fn parse_args(args: &[String]) -> Result<Options, Error> {
    let mut o = Options {
        flannel_env: DEFAULT_FLANNEL_ENV.into(),
        docker_env: DEFAULT_DOCKER_ENV.into(),
        individual: false,
        combined: false,
        ip_masq: true,
        key: DEFAULT_KEY.into(),
    };
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if word == "--" {
            break;
        }
        let Some(flags) = word.strip_prefix('-').filter(|f| !f.is_empty()) else {
            break;
        };
        for (at, flag) in flags.char_indices() {
            let attached = &flags[at + flag.len_utf8()..];
            let mut value = || {
                if !attached.is_empty() {
                    return Ok(attached.to_string());
                }
                words
                    .next()
                    .cloned()
                    .ok_or_else(|| Error::Usage(format!("option -{flag} needs an argument")))
            };
            match flag {
                'f' => o.flannel_env = value()?.into(),
                'd' => o.docker_env = value()?.into(),
                'k' => o.key = value()?,
                'i' => o.individual = true,
                'c' => o.combined = true,
                'm' => o.ip_masq = false,
                'h' => return Err(Error::Usage("help".into())),
                other => return Err(Error::Usage(format!("unknown option -{other}"))),
            }
            if matches!(flag, 'f' | 'd' | 'k') {
                break; // the rest of the word was its argument
            }
        }
    }
    if !o.individual && !o.combined {
        o.individual = true;
        o.combined = true;
    }
    if !is_variable_name(&o.key) {
        return Err(Error::Usage(format!(
            "-k {:?}: not a shell variable name ([A-Za-z_][A-Za-z0-9_]*)",
            o.key
        )));
    }
    Ok(o)
}

fn is_variable_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The file's content for a subnet file's `text`, with `env` the process environment.
///
/// Individual options are the `DOCKER_OPT_*` variables (the environment's, then ours, which
/// win), sorted by name the way a shell's `set` lists them (name and `=` compared byte by
/// byte); the combined line is the key's value in the environment, then every option, each
/// after a space.
pub fn render(opts: &Options, text: &str, env: &[(String, String)]) -> Result<String, String> {
    // Validates every value flanneld writes, naming the field and value when one is wrong.
    SubnetEnv::parse_lenient(text).map_err(|e| e.to_string())?;
    let raw = |key| SubnetEnv::raw_value_lenient(text, key).map_err(|e| e.to_string());
    let mut options: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut add = |name: &str, value: String| {
        options.insert(format!("{name}="), (name.to_string(), value));
    };
    for (name, value) in env.iter().filter(|(n, _)| n.starts_with(OPT_PREFIX)) {
        add(name, value.clone());
    }
    if let Some(subnet) = raw(SUBNET)? {
        add("DOCKER_OPT_BIP", format!("--bip={subnet}"));
    }
    if let Some(mtu) = raw(MTU)? {
        add("DOCKER_OPT_MTU", format!("--mtu={mtu}"));
    }
    if let Some(masq) = raw(IPMASQ)?.filter(|_| opts.ip_masq) {
        // flanneld masquerades (true): Docker must not do it a second time.
        let docker_masq = match masq {
            "true" => "false",
            "false" => "true",
            other => return Err(format!("{IPMASQ}={other}: expected true or false")),
        };
        add("DOCKER_OPT_IPMASQ", format!("--ip-masq={docker_masq}"));
    }
    let mut out = String::new();
    let mut combined = env
        .iter()
        .rev() // the last definition of a variable is the one a shell sees
        .find(|(n, _)| *n == opts.key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
        .map(|v| format!("{v} "))
        .unwrap_or_default();
    for (name, value) in options.values() {
        if opts.individual {
            out.push_str(&format!("{name}=\"{value}\"\n"));
        }
        combined.push(' ');
        combined.push_str(value);
    }
    if opts.combined {
        out.push_str(&format!("{}=\"{combined}\"\n", opts.key));
    }
    Ok(out)
}

/// A route in the main IPv4 table to exactly `subnet` through a gateway, if there is one: its
/// gateway. (flannel's script greps `ip route show` for the subnet and `via`.)
fn gateway_route_to(subnet: Ipv4Network) -> Option<Ipv4Addr> {
    let table = std::fs::read_to_string(Path::new("/proc/net/route")).ok()?;
    gateway_route_in(&table, subnet)
}

/// `/proc/net/route` holds one route a line: interface, destination, gateway, flags, ..., mask,
/// addresses as the hex of the in-memory (network order) word.
fn gateway_route_in(table: &str, subnet: Ipv4Network) -> Option<Ipv4Addr> {
    const RTF_GATEWAY: u32 = 0x2;
    let addr = |hex: &str| {
        u32::from_str_radix(hex, 16)
            .ok()
            .map(|w| Ipv4Addr::from(w.to_ne_bytes()))
    };
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dst, gw, flags, mask) = (
            addr(f.get(1)?)?,
            addr(f.get(2)?)?,
            f.get(3)?,
            addr(f.get(7)?)?,
        );
        let flags = u32::from_str_radix(flags, 16).ok()?;
        let is_subnet = dst == subnet.network() && mask == subnet.mask();
        (is_subnet && flags & RTF_GATEWAY != 0).then_some(gw)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    const V4: &str = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";

    #[test]
    fn options_group_attach_and_stop_like_getopts() {
        let o = parse_args(&args("-ic -f/a -d /b -kKEY -- -x")).unwrap();
        assert_eq!(
            o,
            Options {
                flannel_env: "/a".into(),
                docker_env: "/b".into(),
                individual: true,
                combined: true,
                ip_masq: true,
                key: "KEY".into(),
            }
        );
        let o = parse_args(&args("-m stop -i")).unwrap();
        assert!(!o.ip_masq && o.individual && o.combined, "{o:?}");
        let o = parse_args(&args("-f -d")).unwrap();
        assert_eq!(o.flannel_env, Path::new("-d"));
    }

    #[test]
    fn bad_command_lines_are_usage_errors_naming_the_option() {
        assert_eq!(
            parse_args(&args("-i -x")),
            Err(Error::Usage("unknown option -x".into()))
        );
        assert_eq!(
            parse_args(&args("-d /b -f")),
            Err(Error::Usage("option -f needs an argument".into()))
        );
        assert!(matches!(parse_args(&args("-k A-B")), Err(Error::Usage(m)) if m.contains("A-B")));
    }

    #[test]
    fn renders_individual_then_combined_sorted_by_name() {
        let o = parse_args(&[]).unwrap();
        let env = [
            ("DOCKER_OPTS".to_string(), "--debug".to_string()),
            ("DOCKER_OPT_A1".to_string(), "--a1".to_string()),
            ("DOCKER_OPT_A".to_string(), "--a".to_string()),
        ];
        assert_eq!(
            render(&o, V4, &env).unwrap(),
            "DOCKER_OPT_A1=\"--a1\"\nDOCKER_OPT_A=\"--a\"\nDOCKER_OPT_BIP=\"--bip=10.5.3.1/24\"\n\
             DOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\n\
             DOCKER_OPTS=\"--debug  --a1 --a --bip=10.5.3.1/24 --ip-masq=true --mtu=1450\"\n"
        );
    }

    #[test]
    fn ipmasq_other_than_true_or_false_is_refused_unless_m() {
        let text = V4.replace("IPMASQ=false", "IPMASQ=yes");
        let err = render(&parse_args(&[]).unwrap(), &text, &[]).unwrap_err();
        assert_eq!(err, "FLANNEL_IPMASQ=yes: expected true or false");
        let out = render(&parse_args(&args("-m -c")).unwrap(), &text, &[]).unwrap();
        assert_eq!(out, "DOCKER_OPTS=\" --bip=10.5.3.1/24 --mtu=1450\"\n");
    }

    #[test]
    fn a_malformed_subnet_names_the_field_and_value() {
        let text = V4.replace("10.5.3.1/24", "10.5.3.1");
        let err = render(&parse_args(&[]).unwrap(), &text, &[]).unwrap_err();
        assert!(err.contains("FLANNEL_SUBNET=10.5.3.1"), "{err}");
    }

    #[test]
    fn finds_only_a_gateway_route_to_exactly_the_subnet() {
        let subnet: Ipv4Network = "10.5.3.0/24".parse().unwrap();
        let hex = |ip: &str| {
            format!(
                "{:08X}",
                u32::from_ne_bytes(ip.parse::<Ipv4Addr>().unwrap().octets())
            )
        };
        let line = |dst: &str, gw: &str, flags: &str, mask: &str| {
            format!(
                "eth0\t{}\t{}\t{flags}\t0\t0\t0\t{}\t0\t0\t0\n",
                hex(dst),
                hex(gw),
                hex(mask)
            )
        };
        let head =
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n";
        let connected = line("10.5.3.0", "0.0.0.0", "0001", "255.255.255.0");
        let wider = line("10.5.0.0", "192.168.1.1", "0003", "255.255.0.0");
        assert_eq!(
            gateway_route_in(&format!("{head}{connected}{wider}"), subnet),
            None
        );
        let via = line("10.5.3.0", "192.168.1.9", "0003", "255.255.255.0");
        assert_eq!(
            gateway_route_in(&format!("{head}{connected}{via}"), subnet),
            Some("192.168.1.9".parse().unwrap())
        );
    }
}
