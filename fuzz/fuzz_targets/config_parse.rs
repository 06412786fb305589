//! The network config as read from etcd: any bytes parse or fail cleanly, and a config that
//! parses answers every question the daemon asks of it.
#![no_main]

use flannel::config::NetworkConfig;
use flannel::subnet::SubnetKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = NetworkConfig::parse(data) {
        let _ = cfg.v4.map(|f| f.subnet_count());
        let _ = cfg.v6.map(|f| f.subnet_count());
        let key = SubnetKey {
            ipv4: cfg.v4.map(|f| f.network),
            ipv6: cfg.v6.map(|f| f.network),
        };
        let _ = key.fits(&cfg);
        if let Some(f) = cfg.v4 {
            assert!(f.subnet_len >= f.network.prefix() && f.subnet_len <= 32);
        }
    }
});
