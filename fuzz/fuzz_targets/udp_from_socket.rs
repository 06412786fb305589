//! Datagrams as the udp backend receives them from its socket (one, or several back to back
//! as UDP GRO returns them), through the receive path up to the TUN write.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flannel::backend::udp::fuzzing::from_socket(data);
});
