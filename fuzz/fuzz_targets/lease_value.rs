//! Peer lease keys and values as another host (or an attacker with etcd access) wrote them:
//! parse or fail cleanly; what parses writes back and parses to the same lease.
#![no_main]

use flannel::subnet::{LeaseAttrs, SubnetKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(attrs) = LeaseAttrs::from_json("/coreos.com/network/subnets/fuzz", data) {
        let _ = attrs.effective_backend_type();
        let _ = attrs.backend_data_value();
        let again = LeaseAttrs::from_json("again", attrs.to_json().as_bytes())
            .expect("our own JSON parses");
        assert_eq!(again, attrs);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(key) = text.parse::<SubnetKey>() {
            assert_eq!(key.to_string().parse::<SubnetKey>().unwrap(), key);
        }
    }
});
