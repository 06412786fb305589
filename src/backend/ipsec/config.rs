//! The `Backend` options of `ipsec`, with flannel's names, defaults and rules.

use serde_json::{Map, Value};

use super::BACKEND;
use crate::backend::common;
use crate::backend::BackendError;

/// flannel's default ESP proposal.
pub const DEFAULT_ESP_PROPOSAL: &str = "aes128gcm16-sha256-prfsha256-ecp256";
/// flannel refuses a shorter PSK (counted in bytes, as Go's `len`).
pub const MIN_PSK_LEN: usize = 96;

#[derive(Clone, PartialEq, Eq)]
pub struct IpsecOptions {
    pub psk: String,
    pub udp_encap: bool,
    pub esp_proposal: String,
}

/// Never prints the key.
impl std::fmt::Debug for IpsecOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpsecOptions")
            .field("psk", &format_args!("<{} bytes>", self.psk.len()))
            .field("udp_encap", &self.udp_encap)
            .field("esp_proposal", &self.esp_proposal)
            .finish()
    }
}

impl IpsecOptions {
    pub fn parse(backend: &Map<String, Value>) -> Result<Self, BackendError> {
        let psk = match common::lookup(backend, "PSK") {
            Some(Value::String(s)) if s.len() >= MIN_PSK_LEN => s.clone(),
            Some(Value::String(s)) => {
                return Err(BackendError::BadOption {
                    backend: BACKEND,
                    option: "PSK",
                    // The value is a secret: say how long it is, not what it is.
                    value: format!("of {} characters", s.len()),
                    why: format!("must be at least {MIN_PSK_LEN} characters long"),
                });
            }
            None | Some(Value::Null) => {
                return Err(BackendError::BadOption {
                    backend: BACKEND,
                    option: "PSK",
                    value: "(missing)".into(),
                    why: format!(
                        "is required: a pre-shared key of at least {MIN_PSK_LEN} characters"
                    ),
                })
            }
            Some(v) => {
                return Err(BackendError::BadOption {
                    backend: BACKEND,
                    option: "PSK",
                    value: type_name(v).into(),
                    why: "must be a string".into(),
                })
            }
        };
        let udp_encap = common::bool_option(BACKEND, backend, "UDPEncap")?;
        let esp_proposal = match common::lookup(backend, "ESPProposal") {
            None | Some(Value::Null) => DEFAULT_ESP_PROPOSAL.to_string(),
            Some(Value::String(s)) if valid_proposal(s) => s.clone(),
            Some(v) => {
                return Err(BackendError::BadOption {
                    backend: BACKEND,
                    option: "ESPProposal",
                    value: v.to_string(),
                    why: "must be a strongSwan proposal such as \
                          aes128gcm16-sha256-prfsha256-ecp256"
                        .into(),
                })
            }
        };
        Ok(IpsecOptions {
            psk,
            udp_encap,
            esp_proposal,
        })
    }
}

/// A proposal is algorithm names joined by `-`; anything else charon would refuse later with
/// a less clear message.
fn valid_proposal(s: &str) -> bool {
    !s.is_empty()
        && s.split('-').all(|part| {
            !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<IpsecOptions, String> {
        IpsecOptions::parse(v.as_object().unwrap()).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_flannels() {
        let o = parse(json!({"Type": "ipsec", "PSK": "a".repeat(96)})).unwrap();
        assert!(!o.udp_encap);
        assert_eq!(o.esp_proposal, DEFAULT_ESP_PROPOSAL);
        let o =
            parse(json!({"psk": "a".repeat(96), "udpencap": true, "espproposal": "aes256-sha256"}))
                .unwrap();
        assert!(o.udp_encap);
        assert_eq!(o.esp_proposal, "aes256-sha256");
    }

    #[test]
    fn the_psk_is_required_and_at_least_96_characters() {
        let e = parse(json!({"Type": "ipsec"})).unwrap_err();
        assert!(e.contains("PSK") && e.contains("required"), "{e}");
        let e = parse(json!({"PSK": "a".repeat(95)})).unwrap_err();
        assert!(
            e.contains("PSK") && e.contains("95") && e.contains("96"),
            "{e}"
        );
        assert!(
            !e.contains(&"a".repeat(95)),
            "the key must not be shown: {e}"
        );
        let e = parse(json!({"PSK": 12})).unwrap_err();
        assert!(e.contains("PSK") && e.contains("string"), "{e}");
    }

    #[test]
    fn bad_options_name_the_option_and_value() {
        let psk = "a".repeat(96);
        let e = parse(json!({"PSK": psk, "UDPEncap": "yes"})).unwrap_err();
        assert!(e.contains("UDPEncap") && e.contains("\"yes\""), "{e}");
        let e = parse(json!({"PSK": psk, "ESPProposal": "aes 128; rm"})).unwrap_err();
        assert!(
            e.contains("ESPProposal") && e.contains("aes 128; rm"),
            "{e}"
        );
    }

    #[test]
    fn debug_output_hides_the_key() {
        let o = parse(json!({"PSK": "s".repeat(100)})).unwrap();
        let shown = format!("{o:?}");
        assert!(
            !shown.contains("ssss") && shown.contains("100 bytes"),
            "{shown}"
        );
    }
}
