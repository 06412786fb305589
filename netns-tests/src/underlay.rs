//! The underlay: one bridge namespace with `br0`, every host plugged in with a veth pair.

use std::net::Ipv4Addr;

use crate::{cmd, Netns, Result};

/// The underlay network `198.18.0.0/24` (RFC 2544 benchmarking range; exists only inside the
/// namespaces of one cluster). etcd is `.2`, host `i` is `.10 + i`.
#[derive(Debug)]
pub struct Underlay {
    ns: Netns,
}

impl Underlay {
    pub const PREFIX_LEN: u8 = 24;
    pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    /// Namespace `<prefix>-br` with bridge `br0`, up.
    pub fn new(prefix: &str) -> Result<Underlay> {
        let ns = Netns::create(&format!("{prefix}-br"))?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Underlay { ns })
    }

    /// The underlay address of etcd member `i` (`1..8` members): `198.18.0.(2 + i)`.
    pub fn etcd_ip(i: usize) -> Ipv4Addr {
        assert!(i < 8, "the underlay holds at most 8 etcd members");
        Ipv4Addr::new(198, 18, 0, 2 + i as u8)
    }

    /// The underlay address of host `i`: `198.18.0.(10 + i)`.
    pub fn host_ip(i: usize) -> Ipv4Addr {
        assert!(i < 240, "the underlay holds at most 240 hosts");
        Ipv4Addr::new(198, 18, 0, 10 + i as u8)
    }

    /// The bridge namespace.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Plugs `ns` into the underlay: veth `port` on `br0`, peer `eth0` in `ns` with `addr/24`,
    /// up, and a default route `dev eth0` (so the default-interface detection finds eth0).
    pub fn attach(&self, ns: &Netns, port: &str, addr: Ipv4Addr) -> Result<()> {
        self.ns.ip(&[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.ns.ip(&["link", "set", port, "master", "br0", "up"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{addr}/{}", Self::PREFIX_LEN),
            "dev",
            "eth0",
        ])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "dev", "eth0"])?;
        Ok(())
    }

    /// Unplugs the veth `port` (the peer in the host namespace goes with it).
    pub fn detach(&self, port: &str) -> Result<()> {
        self.ns.ip(&["link", "del", port]).map(drop)
    }

    /// Cuts `port` off the underlay without touching either end's links, addresses or routes:
    /// the bridge drops every frame from or to it (an nftables `bridge` table `cut_<port>` in the
    /// bridge namespace), like a switch that lost the host. Without `nft` on the PATH the
    /// bridge-side veth is set down instead (the host's `eth0` then loses carrier).
    pub fn cut(&self, port: &str) -> Result<()> {
        if cmd::on_path("nft") {
            let table = format!("cut_{port}");
            let rules = format!(
                "table bridge {table} {{\n\
                 \tchain forward_cut {{\n\
                 \t\ttype filter hook forward priority -200; policy accept;\n\
                 \t\tiifname \"{port}\" drop\n\
                 \t\toifname \"{port}\" drop\n\
                 \t}}\n\
                 \tchain input_cut {{\n\
                 \t\ttype filter hook input priority -200; policy accept;\n\
                 \t\tiifname \"{port}\" drop\n\
                 \t}}\n\
                 }}\n"
            );
            let path = std::env::temp_dir().join(format!("{}-{table}.nft", self.ns.name()));
            std::fs::write(&path, rules)
                .map_err(|e| crate::Error::io(format!("writing {}", path.display()), e))?;
            let r = self
                .ns
                .exec("nft", &["-f", &path.to_string_lossy()])
                .map(drop);
            let _ = std::fs::remove_file(&path);
            r
        } else {
            self.ns.ip(&["link", "set", port, "down"]).map(drop)
        }
    }

    /// Undoes [`Underlay::cut`].
    pub fn heal(&self, port: &str) -> Result<()> {
        if cmd::on_path("nft") {
            self.ns
                .exec(
                    "nft",
                    &["delete", "table", "bridge", &format!("cut_{port}")],
                )
                .map(drop)
        } else {
            self.ns.ip(&["link", "set", port, "up"]).map(drop)
        }
    }
}
