//! The `Backend` object of a `wireguard` network, read as flannel reads it.

use serde_json::{Map, Value};

use super::super::common::{lookup, uint_option};
use super::super::BackendError;
use super::BACKEND;

pub const DEFAULT_PORT: u16 = 51820;
pub const DEFAULT_PORT_V6: u16 = 51821;
/// flannel's constant encapsulation overhead: device MTU = MTU − 80 (the IPv6 worst case).
pub const OVERHEAD: u32 = 80;

/// Which devices carry which family (flannel's `Mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `flannel-wg` for IPv4 and `flannel-wg-v6` for IPv6.
    Separate,
    /// One device; the underlay family chosen per peer.
    Auto,
    /// One device, IPv4 underlay.
    Ipv4,
    /// One device, IPv6 underlay.
    Ipv6,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        match s {
            "separate" => Some(Mode::Separate),
            "auto" => Some(Mode::Auto),
            "ipv4" => Some(Mode::Ipv4),
            "ipv6" => Some(Mode::Ipv6),
            _ => None,
        }
    }
}

/// The parsed options.
#[derive(Clone, PartialEq, Eq)]
pub struct WgConfig {
    pub listen_port: u16,
    pub listen_port_v6: u16,
    pub psk: Option<[u8; 32]>,
    /// Seconds; `None` for 0 (off).
    pub keepalive: Option<u16>,
    pub mode: Mode,
    /// `MTU` from the config; the external interface's when absent.
    pub mtu: Option<u32>,
}

/// The PSK is a secret: never shown, not even in debug output.
impl std::fmt::Debug for WgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgConfig")
            .field("listen_port", &self.listen_port)
            .field("listen_port_v6", &self.listen_port_v6)
            .field("psk", &self.psk.map(|_| "<redacted>"))
            .field("keepalive", &self.keepalive)
            .field("mode", &self.mode)
            .field("mtu", &self.mtu)
            .finish()
    }
}

fn bad(option: &'static str, value: String, why: &str) -> BackendError {
    BackendError::BadOption {
        backend: BACKEND,
        option,
        value,
        why: why.into(),
    }
}

fn port(
    opts: &Map<String, Value>,
    option: &'static str,
    default: u16,
) -> Result<u16, BackendError> {
    Ok(uint_option(BACKEND, opts, option, 65535)?
        .filter(|p| *p != 0)
        .map_or(default, |p| p as u16))
}

/// Decodes a base64 WireGuard key (32 bytes), surrounding whitespace ignored.
pub fn decode_key(text: &str) -> Result<[u8; 32], String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("decodes to {} bytes, a key is 32", bytes.len()))
}

pub fn encode_key(key: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(key)
}

impl WgConfig {
    pub fn parse(opts: &Map<String, Value>) -> Result<WgConfig, BackendError> {
        let listen_port = port(opts, "ListenPort", DEFAULT_PORT)?;
        let listen_port_v6 = port(opts, "ListenPortV6", DEFAULT_PORT_V6)?;
        let psk = match lookup(opts, "PSK") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            // The value is a secret: the error names the field, never its content.
            Some(Value::String(s)) => {
                Some(decode_key(s).map_err(|why| bad("PSK", "<redacted>".into(), &why))?)
            }
            Some(_) => {
                return Err(bad(
                    "PSK",
                    "<redacted>".into(),
                    "must be a base64 string of 32 bytes",
                ))
            }
        };
        // flannel reads it as a Go time.Duration of whole seconds: a JSON integer.
        let keepalive = uint_option(BACKEND, opts, "PersistentKeepaliveInterval", 65535)?
            .filter(|s| *s != 0)
            .map(|s| s as u16);
        let mode = match lookup(opts, "Mode") {
            None | Some(Value::Null) => Mode::Separate,
            Some(Value::String(s)) if s.is_empty() => Mode::Separate,
            Some(Value::String(s)) => Mode::parse(s).ok_or_else(|| {
                bad(
                    "Mode",
                    format!("{s:?}"),
                    "must be one of separate, auto, ipv4, ipv6",
                )
            })?,
            Some(v) => return Err(bad("Mode", v.to_string(), "must be a string")),
        };
        let mtu = uint_option(BACKEND, opts, "MTU", 65535)?
            .filter(|m| *m != 0)
            .map(|m| m as u32);
        Ok(WgConfig {
            listen_port,
            listen_port_v6,
            psk,
            keepalive,
            mode,
            mtu,
        })
    }

    /// The port advertised in `BackendV6Data`: in the single-device modes the one device
    /// listens on `ListenPort`, so that is the port (flannel advertises `ListenPortV6`, where
    /// nothing listens).
    pub fn advertised_v6_port(&self) -> u16 {
        match self.mode {
            Mode::Separate => self.listen_port_v6,
            _ => self.listen_port,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<WgConfig, BackendError> {
        let v: Value = serde_json::from_str(json).unwrap();
        WgConfig::parse(v.as_object().unwrap())
    }

    const PSK: &str = "uIA/c5rKo8bMAjNXHbN1mBRZd7r0GDVZ3/zv4sNz5GY=";

    #[test]
    fn defaults_are_flannels() {
        let c = parse("{}").unwrap();
        assert_eq!(c.listen_port, 51820);
        assert_eq!(c.listen_port_v6, 51821);
        assert_eq!(c.psk, None);
        assert_eq!(c.keepalive, None);
        assert_eq!(c.mode, Mode::Separate);
        assert_eq!(c.mtu, None);
    }

    #[test]
    fn options_are_read_case_insensitively() {
        let c = parse(&format!(
            r#"{{"listenport":5000,"ListenPortV6":5001,"PSK":" {PSK}\n","PersistentKeepaliveInterval":25,"Mode":"auto","MTU":1400}}"#
        ))
        .unwrap();
        assert_eq!(c.listen_port, 5000);
        assert_eq!(c.listen_port_v6, 5001);
        assert_eq!(c.psk, Some(decode_key(PSK).unwrap()));
        assert_eq!(c.keepalive, Some(25));
        assert_eq!(c.mode, Mode::Auto);
        assert_eq!(c.mtu, Some(1400));
    }

    #[test]
    fn bad_options_name_the_field_and_value_but_never_the_psk() {
        let e = parse(r#"{"Mode":"both"}"#).unwrap_err().to_string();
        assert!(e.contains("Mode") && e.contains("\"both\""), "{e}");
        let e = parse(r#"{"PersistentKeepaliveInterval":"25s"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("PersistentKeepaliveInterval") && e.contains("25s"),
            "{e}"
        );
        let e = parse(r#"{"ListenPort":70000}"#).unwrap_err().to_string();
        assert!(e.contains("ListenPort") && e.contains("70000"), "{e}");
        let short = "c2VjcmV0LXNob3J0";
        let e = parse(&format!(r#"{{"PSK":"{short}"}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("PSK") && !e.contains(short), "{e}");
        assert!(!format!("{:?}", parse(&format!(r#"{{"PSK":"{PSK}"}}"#)).unwrap()).contains(PSK));
    }

    #[test]
    fn the_v6_port_is_where_a_device_listens() {
        let port = |mode: &str| {
            parse(&format!(
                r#"{{"Mode":"{mode}","ListenPort":1,"ListenPortV6":2}}"#
            ))
            .unwrap()
            .advertised_v6_port()
        };
        assert_eq!(port("separate"), 2);
        // flannel's bug: it advertises ListenPortV6 although its one device listens on 1.
        assert_eq!(port("auto"), 1);
        assert_eq!(port("ipv6"), 1);
    }
}
