//! `Backend.Type` of our own network config, parsed once.
//!
//! Only our config's type is an enum: the `BackendType` a peer publishes in its lease stays a
//! string, since peers may run backends this build does not know.

use std::fmt;

/// A backend this build can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendType {
    /// Acquires the lease only; no data plane.
    Alloc,
    HostGw,
    Udp,
    Vxlan,
    Wireguard,
}

impl BackendType {
    /// Every type, in the order error messages list them.
    pub const ALL: [BackendType; 5] = [
        BackendType::Alloc,
        BackendType::HostGw,
        BackendType::Udp,
        BackendType::Vxlan,
        BackendType::Wireguard,
    ];

    /// Flannel's name for the type, as written in `Backend.Type`.
    pub fn name(self) -> &'static str {
        match self {
            BackendType::Alloc => "alloc",
            BackendType::HostGw => "host-gw",
            BackendType::Udp => "udp",
            BackendType::Vxlan => "vxlan",
            BackendType::Wireguard => "wireguard",
        }
    }

    /// Looks the name up case-insensitively, as flannel lower-cases it before its lookup.
    pub fn from_name(name: &str) -> Option<BackendType> {
        let lower = name.to_lowercase();
        Self::ALL.into_iter().find(|t| t.name() == lower)
    }

    /// The known names, comma-separated, for error messages.
    pub fn known_names() -> String {
        Self::ALL.map(BackendType::name).join(", ")
    }

    /// Whether the backend programs the kernel (routes, neighbours, devices) that the daemon
    /// must watch for outside changes.
    pub fn has_data_plane(self) -> bool {
        self != BackendType::Alloc
    }
}

impl fmt::Display for BackendType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_case_insensitively() {
        for t in BackendType::ALL {
            assert_eq!(BackendType::from_name(t.name()), Some(t));
            assert_eq!(BackendType::from_name(&t.name().to_uppercase()), Some(t));
            assert_eq!(t.to_string(), t.name());
        }
        assert_eq!(BackendType::from_name("Host-GW"), Some(BackendType::HostGw));
        assert_eq!(BackendType::from_name("hostgw"), None);
        assert_eq!(BackendType::from_name("ipip"), None);
    }
}
