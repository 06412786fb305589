//! The allocator setting the userspace engine needs. Every batch allocates a buffer per
//! packet (the plaintext segment, gotatun's ciphertext, each received datagram) and frees
//! them all once the batch is sent: hundreds of KiB at a time. glibc returns a thread
//! arena's free top to the kernel (`madvise(MADV_DONTNEED)`) as soon as it exceeds the trim
//! threshold (128 KiB), so the next batch faults the same pages in again, zeroed: a fifth of
//! the TUN → peers thread's time went to that in a profile of one TCP stream.

/// Free memory glibc keeps in an arena instead of returning it: more than the largest
/// batch frees at once (64 GRO runs of up to 64 KiB each, decrypted).
const KEEP_FREED: libc::c_int = 8 << 20;

/// Makes freed batches stay in the process for the next one. Process-wide; called when the
/// userspace engine starts. Setting it fixes glibc's mmap threshold at its 128 KiB default
/// (no dynamic growth), which suits buffers that are freed every batch.
pub fn keep_freed_batches() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes the allocator's tuning parameters; any value is
        // accepted (or refused with 0) without touching allocated memory.
        let ok = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_FREED) };
        if ok == 0 {
            tracing::debug!("wireguard: mallopt(M_TRIM_THRESHOLD) refused");
        }
    }
}

#[cfg(all(test, target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    fn thread_minor_faults() -> i64 {
        // SAFETY: getrusage writes one rusage struct, which lives on this stack frame.
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above; RUSAGE_THREAD is valid on Linux.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut r) };
        assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
        r.ru_minflt
    }

    /// A batch's worth of packet buffers allocated and freed over and over (what the
    /// engine's threads do) costs no page faults once the first batch warmed the arena.
    #[test]
    fn a_freed_batch_is_reused_without_page_faults() {
        keep_freed_batches();
        let faults = std::thread::spawn(|| {
            // Two buffers per datagram of a few super-packets: ~500 KiB per batch.
            let batch = |n: usize| {
                let bufs: Vec<Vec<u8>> = (0..n)
                    .map(|i| {
                        let mut b = vec![0u8; 1452 + (i % 3)];
                        b[0] = 4;
                        b
                    })
                    .collect();
                std::hint::black_box(&bufs);
            };
            batch(350);
            let before = thread_minor_faults();
            for _ in 0..200 {
                batch(350);
            }
            thread_minor_faults() - before
        })
        .join()
        .unwrap();
        assert!(
            faults < 100,
            "{faults} page faults in 200 batches reusing freed memory"
        );
    }
}
