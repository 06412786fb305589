//! The subnet file, read by flanneld at start and by the CNI plugin for every pod: parse or
//! fail cleanly; what either reader accepts renders and reads back to the same values.
#![no_main]

use flannel_subnet_env::SubnetEnv;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(env) = SubnetEnv::parse_lenient(text) {
        let again = SubnetEnv::parse_lenient(&env.render()).expect("ours parses");
        assert_eq!(again, env);
    }
    if let Ok(env) = SubnetEnv::parse(text) {
        let again = SubnetEnv::parse(&env.render()).expect("ours parses");
        assert_eq!(again, env);
        let _ = env.lease_networks();
    }
});
