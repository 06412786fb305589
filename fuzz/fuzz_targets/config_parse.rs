//! The network config as read from etcd: any bytes parse or fail cleanly, and a config that
//! parses answers every question the daemon asks of it.
#![no_main]

use flannel::config::NetworkConfig;
use flannel::subnet::SubnetKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = NetworkConfig::parse(data) {
        let _ = cfg.v4_subnet_count();
        let _ = cfg.v6_subnet_count();
        let key = SubnetKey {
            ipv4: cfg.network,
            ipv6: cfg.ipv6_network,
        };
        let _ = cfg.fits(&key);
        if let Some(n) = cfg.network {
            assert!(cfg.subnet_len >= n.prefix() && cfg.subnet_len <= 32);
        }
    }
});
