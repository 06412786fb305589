//! Datagrams from the wireguard backend's socket: any bytes are handled (dropped and counted,
//! or answered) without a panic, also when they name a live session's receiver index.
#![no_main]

use std::sync::OnceLock;

use flannel::backend::wireguard::fuzzing::Harness;
use libfuzzer_sys::fuzz_target;

// Built once: every input meets the same live session.
static HARNESS: OnceLock<std::sync::Mutex<Harness>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let h = HARNESS.get_or_init(|| std::sync::Mutex::new(Harness::new()));
    h.lock().unwrap_or_else(|e| e.into_inner()).datagram(data);
});
