//! The subnet file (`/run/flannel/subnet.env`): written atomically, read back at start.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::config::NetworkConfig;
use crate::subnet::SubnetKey;

const NETWORK: &str = "FLANNEL_NETWORK";
const SUBNET: &str = "FLANNEL_SUBNET";
const IPV6_NETWORK: &str = "FLANNEL_IPV6_NETWORK";
const IPV6_SUBNET: &str = "FLANNEL_IPV6_SUBNET";
const MTU: &str = "FLANNEL_MTU";
const IPMASQ: &str = "FLANNEL_IPMASQ";

/// Consumers (the CNI plugin, scripts) read the file as another user, so it is world-readable.
const FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("subnet file {}: cannot {op}: {error}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        error: io::Error,
    },
    /// `path` is `None` when the text did not come from a file.
    #[error("subnet file{}: {problem}", at(.path))]
    Invalid {
        path: Option<PathBuf>,
        problem: EnvProblem,
    },
}

/// What is wrong with the text of a subnet file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvProblem {
    #[error("line {line}: {text:?} is not KEY=VALUE")]
    NotKeyValue { line: usize, text: String },
    #[error("{key}={value}: {why}")]
    BadValue {
        key: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("{key} missing")]
    Missing { key: &'static str },
}

fn at(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" {}", p.display()))
        .unwrap_or_default()
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> EnvError {
    let path = path.to_path_buf();
    move |error| EnvError::Io { path, op, error }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Option<Ipv4Network>,
    /// First usable address with the lease prefix, e.g. 10.5.72.1/24.
    pub subnet: Option<Ipv4Network>,
    pub ipv6_network: Option<Ipv6Network>,
    /// First usable address with the lease prefix, e.g. fc00:0:0:1::1/64.
    pub ipv6_subnet: Option<Ipv6Network>,
    pub mtu: u32,
    pub ipmasq: bool,
}

impl SubnetEnv {
    /// The file for a lease under a config: each enabled family's network and the lease's
    /// first usable address in it.
    pub fn from_lease(cfg: &NetworkConfig, key: &SubnetKey, mtu: u32, ipmasq: bool) -> Self {
        let network = cfg.network.filter(|_| cfg.enable_ipv4);
        let ipv6_network = cfg.ipv6_network.filter(|_| cfg.enable_ipv6);
        SubnetEnv {
            network,
            subnet: key.ipv4.filter(|_| network.is_some()).map(first_usable_v4),
            ipv6_network,
            ipv6_subnet: key
                .ipv6
                .filter(|_| ipv6_network.is_some())
                .map(first_usable_v6),
            mtu,
            ipmasq,
        }
    }

    /// `KEY=VALUE` lines in flannel's order; the IPv4 and IPv6 lines only when present.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |key: &str, value: &dyn std::fmt::Display| {
            out.push_str(&format!("{key}={value}\n"));
        };
        if let Some(n) = &self.network {
            line(NETWORK, n);
        }
        if let Some(n) = &self.subnet {
            line(SUBNET, n);
        }
        if let Some(n) = &self.ipv6_network {
            line(IPV6_NETWORK, n);
        }
        if let Some(n) = &self.ipv6_subnet {
            line(IPV6_SUBNET, n);
        }
        line(MTU, &self.mtu);
        line(IPMASQ, &self.ipmasq);
        out
    }

    /// Reads what [`render`](Self::render) writes, tolerating what a person or another tool
    /// might add: blank lines, `#` comments, unknown keys, quoted values, spaces around `=`.
    /// A later line for the same key wins, as when a shell sources the file.
    pub fn parse(text: &str) -> Result<Self, EnvError> {
        parse_text(text).map_err(|problem| EnvError::Invalid {
            path: None,
            problem,
        })
    }

    /// Replaces the file at `path` in one step, so a reader sees the old or the new content,
    /// never a torn one. `path` itself is never opened: a symlink planted there is replaced,
    /// not followed.
    pub fn write_atomic(&self, path: &Path) -> Result<(), EnvError> {
        let name = path.file_name().ok_or_else(|| EnvError::Io {
            path: path.to_path_buf(),
            op: "choose a temporary file",
            error: io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
        })?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(io_err(dir, "create the directory"))?;
        let (tmp, file) = create_temp(dir, &name.to_string_lossy())?;
        let written = fill(file, &tmp, self.render().as_bytes()).and_then(|()| {
            fs::rename(&tmp, path).map_err(io_err(path, "rename the new file into place"))
        });
        if written.is_err() {
            // Best effort: the error being returned matters more than a stray temp file.
            let _ = fs::remove_file(&tmp);
        }
        written?;
        sync_dir(dir);
        Ok(())
    }

    /// `Ok(None)` when the file does not exist.
    pub fn read(path: &Path) -> Result<Option<Self>, EnvError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(path, "read")(e)),
        };
        parse_text(&text)
            .map(Some)
            .map_err(|problem| EnvError::Invalid {
                path: Some(path.to_path_buf()),
                problem,
            })
    }

    /// The lease subnet this file names (FLANNEL_SUBNET's network), for "prefer my old subnet".
    pub fn lease_key(&self) -> Option<SubnetKey> {
        let ipv4 = self
            .subnet
            .and_then(|s| Ipv4Network::new(s.network(), s.prefix()).ok());
        let ipv6 = self
            .ipv6_subnet
            .and_then(|s| Ipv6Network::new(s.network(), s.prefix()).ok());
        (ipv4.is_some() || ipv6.is_some()).then_some(SubnetKey { ipv4, ipv6 })
    }
}

/// The lease's first address is its network address; hosts start one above it.
fn first_usable_v4(n: Ipv4Network) -> Ipv4Network {
    let ip = u32::from(n.network())
        .checked_add(1)
        .map_or(n.network(), Ipv4Addr::from);
    Ipv4Network::new(ip, n.prefix()).unwrap_or(n)
}

fn first_usable_v6(n: Ipv6Network) -> Ipv6Network {
    let ip = u128::from(n.network())
        .checked_add(1)
        .map_or(n.network(), Ipv6Addr::from);
    Ipv6Network::new(ip, n.prefix()).unwrap_or(n)
}

/// A fresh file next to the target (so the rename stays on one filesystem), created with
/// O_EXCL so that nothing already there, a symlink included, is ever opened.
fn create_temp(dir: &Path, name: &str) -> Result<(PathBuf, File), EnvError> {
    let mut last = None;
    for _ in 0..16 {
        let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(io_err(&tmp, "create a temporary file")(e)),
        }
    }
    let error = last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists));
    Err(io_err(dir, "create a temporary file")(error))
}

fn fill(mut file: File, tmp: &Path, bytes: &[u8]) -> Result<(), EnvError> {
    file.write_all(bytes).map_err(io_err(tmp, "write"))?;
    // The creation mode was narrowed by the umask; consumers need exactly 0644.
    file.set_permissions(Permissions::from_mode(FILE_MODE))
        .map_err(io_err(tmp, "set the mode of"))?;
    file.sync_all().map_err(io_err(tmp, "sync"))
}

/// Makes the rename durable. Best effort: some filesystems refuse fsync on a directory, and the
/// file is already complete and in place either way.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn parse_text(text: &str) -> Result<SubnetEnv, EnvProblem> {
    let mut env = SubnetEnv {
        network: None,
        subnet: None,
        ipv6_network: None,
        ipv6_subnet: None,
        mtu: 0,
        ipmasq: false,
    };
    let mut mtu = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(EnvProblem::NotKeyValue {
                line: i + 1,
                text: raw.to_string(),
            });
        };
        let value = unquote(value.trim());
        // An empty value reads as "not set", as it would in a shell.
        let empty = value.is_empty();
        match key.trim() {
            NETWORK => env.network = (!empty).then(|| cidr(NETWORK, value)).transpose()?,
            SUBNET => env.subnet = (!empty).then(|| cidr(SUBNET, value)).transpose()?,
            IPV6_NETWORK => {
                env.ipv6_network = (!empty).then(|| cidr(IPV6_NETWORK, value)).transpose()?
            }
            IPV6_SUBNET => {
                env.ipv6_subnet = (!empty).then(|| cidr(IPV6_SUBNET, value)).transpose()?
            }
            MTU => mtu = (!empty).then(|| parse_mtu(value)).transpose()?,
            IPMASQ => env.ipmasq = !empty && parse_bool(value)?,
            _ => {}
        }
    }
    env.mtu = mtu.ok_or(EnvProblem::Missing { key: MTU })?;
    if env.subnet.is_none() && env.ipv6_subnet.is_none() {
        return Err(EnvProblem::Missing {
            key: "FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET",
        });
    }
    Ok(env)
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

fn bad(key: &'static str, value: &str, why: &'static str) -> EnvProblem {
    EnvProblem::BadValue {
        key,
        value: value.to_string(),
        why,
    }
}

/// `<address>/<length>`; a bare address is refused rather than read as a host route.
fn cidr<N: FromStr>(key: &'static str, value: &str) -> Result<N, EnvProblem> {
    let why = "expected <address>/<prefix length> of the right family";
    if !value.contains('/') {
        return Err(bad(key, value, why));
    }
    value.parse().map_err(|_| bad(key, value, why))
}

fn parse_mtu(value: &str) -> Result<u32, EnvProblem> {
    match value.parse::<u32>() {
        Ok(mtu) if mtu > 0 => Ok(mtu),
        _ => Err(bad(MTU, value, "expected a positive whole number of bytes")),
    }
}

/// The spellings Go's `strconv.ParseBool` accepts, since other tools may write this file.
fn parse_bool(value: &str) -> Result<bool, EnvProblem> {
    match value {
        "true" | "TRUE" | "True" | "t" | "T" | "1" => Ok(true),
        "false" | "FALSE" | "False" | "f" | "F" | "0" => Ok(false),
        _ => Err(bad(IPMASQ, value, "expected true or false")),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

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

    fn problem(r: Result<SubnetEnv, EnvError>) -> EnvProblem {
        match r {
            Err(EnvError::Invalid { problem, .. }) => problem,
            other => panic!("expected an invalid-file error, got {other:?}"),
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
    fn parse_inverts_render() {
        for env in [v4_env(), dual_env(), v6_env()] {
            assert_eq!(SubnetEnv::parse(&env.render()).unwrap(), env);
        }
    }

    #[test]
    fn parse_is_tolerant() {
        let text = "# written by hand\n\n  FLANNEL_NETWORK = 10.5.0.0/16\r\nOTHER=thing\n\
                    FLANNEL_SUBNET=\"10.5.1.1/24\"\nFLANNEL_MTU='1400'\nFLANNEL_MTU=1450\n\
                    FLANNEL_IPV6_SUBNET=\nFLANNEL_IPMASQ=1\n";
        let env = SubnetEnv::parse(text).unwrap();
        assert_eq!(
            env,
            SubnetEnv {
                subnet: Some("10.5.1.1/24".parse().unwrap()),
                ..v4_env()
            }
        );
        // FLANNEL_IPMASQ absent means no masquerade.
        let env = SubnetEnv::parse("FLANNEL_SUBNET=10.5.1.1/24\nFLANNEL_MTU=1450\n").unwrap();
        assert!(!env.ipmasq);
        assert_eq!(env.network, None);
    }

    #[test]
    fn malformed_values_name_the_key_and_value() {
        let cases = [
            ("FLANNEL_MTU=big", "FLANNEL_MTU", "big"),
            ("FLANNEL_MTU=0", "FLANNEL_MTU", "0"),
            ("FLANNEL_SUBNET=10.5.1.1", "FLANNEL_SUBNET", "10.5.1.1"),
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
            ("FLANNEL_IPMASQ=maybe", "FLANNEL_IPMASQ", "maybe"),
        ];
        for (line, key, value) in cases {
            let text = format!("{}{line}\n", v4_env().render());
            let err = SubnetEnv::parse(&text).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&format!("{key}={value}")), "{msg}");
            assert!(matches!(
                problem(Err(err)),
                EnvProblem::BadValue { key: k, .. } if k == key
            ));
        }
    }

    #[test]
    fn missing_required_keys_are_errors() {
        let no_mtu = "FLANNEL_SUBNET=10.5.1.1/24\n";
        assert_eq!(
            problem(SubnetEnv::parse(no_mtu)),
            EnvProblem::Missing { key: "FLANNEL_MTU" }
        );
        let no_subnet = "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_MTU=1450\n";
        let err = SubnetEnv::parse(no_subnet).unwrap_err();
        assert!(err.to_string().contains("FLANNEL_SUBNET"), "{err}");
        assert!(SubnetEnv::parse("").is_err());
    }

    #[test]
    fn garbage_is_an_error() {
        let err = SubnetEnv::parse("\x00\x01 not an env file\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        let err =
            SubnetEnv::parse("FLANNEL_MTU=\u{1F600}\nFLANNEL_SUBNET=10.5.1.1/24").unwrap_err();
        assert!(err.to_string().contains("FLANNEL_MTU"), "{err}");
    }

    #[test]
    fn write_then_read_with_mode_0644() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        v4_env().write_atomic(&path).unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap(), Some(v4_env()));
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o644);
        let dir_mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o700, 0o700);

        // Overwrite, and leave no temporary file behind.
        dual_env().write_atomic(&path).unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap(), Some(dual_env()));
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
        assert_eq!(SubnetEnv::read(&path).unwrap(), Some(v4_env()));
    }

    #[test]
    fn missing_file_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SubnetEnv::read(&dir.path().join("nope.env")).unwrap(), None);
    }

    #[test]
    fn read_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        fs::write(&path, "FLANNEL_MTU=big\n").unwrap();
        let msg = SubnetEnv::read(&path).unwrap_err().to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("FLANNEL_MTU=big"), "{msg}");
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

    #[test]
    fn lease_key_is_the_subnets_network() {
        assert_eq!(v4_env().lease_key(), Some("10.5.72.0-24".parse().unwrap()));
        assert_eq!(
            dual_env().lease_key(),
            Some("10.5.72.0-24&fc00:0:0:7::-64".parse().unwrap())
        );
        assert_eq!(
            v6_env().lease_key(),
            Some("fc00:0:0:7::-64".parse().unwrap())
        );
    }

    #[test]
    fn from_lease_uses_first_usable_addresses() {
        let cfg = NetworkConfig::parse(
            br#"{"EnableIPv6":true,"Network":"10.5.0.0/16","IPv6Network":"fc00::/48"}"#,
        )
        .unwrap();
        let key: SubnetKey = "10.5.72.0-24&fc00:0:0:7::-64".parse().unwrap();
        let env = SubnetEnv::from_lease(&cfg, &key, 1450, false);
        assert_eq!(env, dual_env());
        assert_eq!(env.lease_key(), Some(key));
        let cfg = NetworkConfig::parse(br#"{"Network":"10.5.0.0/16"}"#).unwrap();
        let env = SubnetEnv::from_lease(&cfg, &key, 1450, true);
        assert_eq!(env, v4_env(), "a disabled family is not written");
    }
}
