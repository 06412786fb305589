//! Which subnet to take: pure arithmetic over the config, no I/O.
