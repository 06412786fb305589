//! The subnet file, read by flanneld at start and by the CNI plugin for every pod: parse or
//! fail cleanly; what flanneld parses renders and parses to the same values.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(env) = flannel::subnet::env::SubnetEnv::parse(text) {
        let _ = env.lease_key();
        let again = flannel::subnet::env::SubnetEnv::parse(&env.render()).expect("ours parses");
        assert_eq!(again, env);
    }
    let _ = flannel_cni::subnet_env::SubnetEnv::parse(text, "/run/flannel/subnet.env");
});
