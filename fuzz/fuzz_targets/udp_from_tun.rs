//! Frames as the udp backend reads them from the TUN device (with or without the virtio-net
//! header), through the send path: checks, TTL, checksum completion, GSO split, ICMP replies.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flannel::backend::udp::fuzzing::from_tun(data);
});
