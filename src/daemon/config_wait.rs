//! Waiting for a valid network config.

use super::DaemonError;
use crate::backoff::Backoff;
use crate::config::NetworkConfig;
use crate::error_chain::Chain;
use crate::subnet::registry::{ConfigRead, LeaseRegistry};

/// Reads the network config until a valid one is there, watching the key in between. An
/// invalid config is reported once per distinct problem; fixing it in the registry is enough,
/// except for a backend this build does not have, which is returned as the error to exit with.
pub(super) async fn wait_for_config<R: LeaseRegistry>(
    reg: &R,
) -> Result<NetworkConfig, DaemonError> {
    let mut last_report = String::new();
    let mut report = |msg: String, level: tracing::Level| {
        if msg != last_report {
            match level {
                tracing::Level::ERROR => tracing::error!("{msg}"),
                tracing::Level::WARN => tracing::warn!("{msg}"),
                _ => tracing::info!("{msg}"),
            }
            last_report = msg;
        }
    };
    let mut backoff = Backoff::new();
    loop {
        let ConfigRead { value, version } = match reg.read_config().await {
            Ok(r) => r,
            Err(e) => {
                report(
                    format!("reading network config failed, retrying: {e}"),
                    tracing::Level::WARN,
                );
                backoff.wait().await;
                continue;
            }
        };
        backoff.reset();
        match value.map(|v| NetworkConfig::parse(&v)) {
            None => report(
                format!(
                    "waiting for the network config at {}",
                    reg.config_location()
                ),
                tracing::Level::INFO,
            ),
            Some(Ok(config)) => return Ok(config),
            Some(Err(err)) if err.names_no_backend() => {
                return Err(DaemonError::Config {
                    location: reg.config_location(),
                    err,
                })
            }
            Some(Err(err)) => report(
                format!(
                    "invalid network config at {}: {}; waiting for a valid one",
                    reg.config_location(),
                    Chain(&err)
                ),
                tracing::Level::ERROR,
            ),
        }
        reg.config_changed(version).await;
    }
}

#[cfg(test)]
fn validate(raw: &[u8]) -> Result<NetworkConfig, String> {
    NetworkConfig::parse(raw).map_err(|e| Chain(&e).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::memory_registry::{script, MemoryRegistry, Unreachable};

    #[test]
    fn a_valid_config_is_accepted() {
        let config = validate(br#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#)
            .expect("valid config");
        assert_eq!(config.v4.unwrap().network, "10.5.0.0/16".parse().unwrap());
        assert_eq!(config.backend_type.to_string(), "host-gw");
    }

    #[test]
    fn an_unknown_backend_type_is_named() {
        let err =
            validate(br#"{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard2"}}"#).unwrap_err();
        assert!(err.contains("wireguard2"), "{err}");
    }

    #[test]
    fn a_config_that_is_not_json_is_refused() {
        let err = validate(b"Network: 10.5.0.0/16").unwrap_err();
        assert!(!err.is_empty());
    }

    #[test]
    fn a_bad_network_is_named() {
        let err = validate(br#"{"Network":"10.5.0.0/33"}"#).unwrap_err();
        assert!(err.contains("Network"), "{err}");
    }

    #[tokio::test]
    async fn waits_through_an_outage_a_missing_and_an_invalid_config_for_a_valid_one() {
        let reg = MemoryRegistry {
            configs: script([
                Err(Unreachable),
                Ok(None),
                Ok(Some("not json")),
                Ok(Some(
                    r#"{"Network":"10.7.0.0/16","Backend":{"Type":"udp"}}"#,
                )),
            ]),
            ..Default::default()
        };
        let config = tokio::time::timeout(std::time::Duration::from_secs(5), wait_for_config(&reg))
            .await
            .expect("a valid config in time")
            .expect("no fatal config");
        assert_eq!(config.v4.unwrap().network, "10.7.0.0/16".parse().unwrap());
        assert_eq!(*reg.config_reads.lock().unwrap(), 4);
    }

    #[tokio::test]
    async fn an_unknown_backend_type_ends_the_wait_with_an_error_naming_it() {
        let reg = MemoryRegistry {
            configs: script([
                Ok(Some(
                    r#"{"Network":"10.7.0.0/16","Backend":{"Type":"nosuch"}}"#,
                )),
                Ok(Some(
                    r#"{"Network":"10.7.0.0/16","Backend":{"Type":"udp"}}"#,
                )),
            ]),
            ..Default::default()
        };
        let err = tokio::time::timeout(std::time::Duration::from_secs(5), wait_for_config(&reg))
            .await
            .expect("an answer in time")
            .expect_err("an unknown backend type is fatal");
        let msg = err.to_string();
        assert!(
            msg.contains(r#"Backend.Type "nosuch": unknown backend type"#),
            "{msg}"
        );
        assert_eq!(*reg.config_reads.lock().unwrap(), 1, "no second read");
    }
}
