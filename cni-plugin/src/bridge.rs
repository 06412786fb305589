//! The native path: bridge + veth + host-local-compatible IPAM, all in-process over netlink.

use std::io::Read;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::conf::{BridgeOpts, NetConf};
use crate::ipam::{Range, Store};
use crate::masq;
use crate::netlink::{Netlink, NetlinkError};
use crate::netns::{Netns, NetnsError};
use crate::spec::{code, AddResult, CniError, CniResult, Env, Interface, IpConfig, Route};
use crate::teardown::Teardown;
use flannel_subnet_env::SubnetEnv;

impl From<NetlinkError> for CniError {
    fn from(e: NetlinkError) -> CniError {
        CniError::new(code::INTERNAL, e.to_string())
    }
}

impl From<NetnsError> for CniError {
    fn from(e: NetnsError) -> CniError {
        let c = match e {
            NetnsError::Open { .. } => code::INVALID_ENV,
            _ => code::INTERNAL,
        };
        CniError::new(c, e.to_string())
    }
}

fn internal(msg: impl Into<String>) -> CniError {
    CniError::new(code::INTERNAL, msg)
}

/// One address the pod gets, with its range.
struct Assigned {
    range: Range,
    ip: IpAddr,
}

impl Assigned {
    fn cidr(&self) -> IpNetwork {
        IpNetwork::new(self.ip, self.range.subnet.prefix()).expect("prefix of the range")
    }
}

fn random_veth_name() -> String {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    if b == [0; 4] {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.subsec_nanos() ^ std::process::id().rotate_left(16)).to_ne_bytes();
    }
    format!("veth{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

/// Make sure the bridge exists and is up; returns its index.
fn ensure_bridge(nl: &mut Netlink, opts: &BridgeOpts) -> CniResult<u32> {
    for _ in 0..3 {
        if let Some(link) = nl.link_by_name(&opts.bridge)? {
            if link.kind.as_deref() != Some("bridge") {
                return Err(internal(format!(
                    "{} already exists but is not a bridge (kind {})",
                    opts.bridge,
                    link.kind.as_deref().unwrap_or("unknown")
                )));
            }
            if !link.is_up() {
                nl.set_up(link.index)?;
            }
            return Ok(link.index);
        }
        match nl.create_bridge(&opts.bridge, opts.mtu) {
            Ok(()) => {}
            Err(e) if e.is_exists() => {} // created concurrently: look again
            Err(e) => return Err(e.into()),
        }
    }
    Err(internal(format!(
        "bridge {} vanished while creating it",
        opts.bridge
    )))
}

/// Remove from the bridge every address of the gateways' families other than the gateways
/// themselves (IPv6 link-local addresses stay). After flanneld took another subnet, the old
/// gateway and its connected route would otherwise stay on the bridge and swallow the traffic
/// meant for whichever host leases that subnet next. (The reference `bridge` plugin refuses
/// to go on instead: "already has an IP address different from".)
pub fn retire_stale_gateways(
    nl: &mut Netlink,
    br_index: u32,
    gateways: &[(IpAddr, u8)],
) -> CniResult<()> {
    let families: Vec<bool> = gateways.iter().map(|(gw, _)| gw.is_ipv6()).collect();
    let stale: Vec<_> = nl
        .addresses(0)?
        .into_iter()
        .filter(|a| a.index == br_index && families.contains(&a.addr.is_ipv6()))
        .filter(|a| !gateways.contains(&(a.addr, a.prefix)))
        .filter(|a| !is_ipv6_link_local(a.addr))
        .collect();
    for a in stale {
        nl.delete_address(br_index, a.addr, a.prefix)?;
    }
    Ok(())
}

/// The same for the bridge called `bridge`, if it exists: the delegate path runs this before
/// the reference `bridge` plugin, which would fail on the old address.
pub fn retire_stale_gateways_of(bridge: &str, gateways: &[(IpAddr, u8)]) -> CniResult<()> {
    let mut nl = Netlink::new()?;
    match nl.link_by_name(bridge)? {
        Some(link) if link.kind.as_deref() == Some("bridge") => {
            retire_stale_gateways(&mut nl, link.index, gateways)
        }
        _ => Ok(()),
    }
}

fn is_ipv6_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80)
}

fn enable_forwarding(v6: bool) {
    let path = if v6 {
        "/proc/sys/net/ipv6/conf/all/forwarding"
    } else {
        "/proc/sys/net/ipv4/ip_forward"
    };
    if !std::fs::read_to_string(path).is_ok_and(|s| s.trim() == "1") {
        let _ = std::fs::write(path, "1");
    }
}

/// Allocate the pod's addresses, one per lease subnet.
fn assign(conf: &NetConf, env: &Env, senv: &SubnetEnv) -> CniResult<Vec<Assigned>> {
    let mut ranges = Vec::new();
    for net in senv.lease_networks() {
        ranges.push(Range::for_subnet(net)?);
    }
    // No scan for addresses this attachment may already hold: ADD has already made sure the
    // pod has no such interface, a failed ADD releases what it took, and DEL releases every
    // address of the attachment. Reading every entry on each ADD would cost O(pods).
    let store = Store::lock(&conf.ipam_data_dir(), &conf.name)?;
    let mut out: Vec<Assigned> = Vec::new();
    for (idx, range) in ranges.into_iter().enumerate() {
        match store.allocate(&range, idx, &env.container_id, &env.ifname) {
            Ok(ip) => out.push(Assigned { ip, range }),
            Err(e) => {
                for a in &out {
                    let _ = store.release_ip(a.ip);
                }
                return Err(e.into());
            }
        }
    }
    Ok(out)
}

fn release(conf: &NetConf, assigned: &[Assigned]) {
    if let Ok(store) = Store::lock(&conf.ipam_data_dir(), &conf.name) {
        for a in assigned {
            let _ = store.release_ip(a.ip);
        }
    }
}

/// The routes the pod gets: the overlay network(s) and `ipam.routes` via the gateway, and a
/// default route when `isDefaultGateway`. In the result, like `bridge` + `host-local`, the
/// IPAM routes carry no `gw` and the default route does.
fn pod_routes(
    conf: &NetConf,
    senv: &SubnetEnv,
    opts: &BridgeOpts,
    assigned: &[Assigned],
) -> CniResult<Vec<Route>> {
    let mut routes: Vec<Route> = Vec::new();
    let mut push = |dst: IpNetwork, gw: Option<IpAddr>| {
        if !routes.iter().any(|r| r.dst == dst) {
            routes.push(Route { dst, gw });
        }
    };
    for n in senv.networks().into_iter().chain(conf.ipam_routes()?) {
        if assigned.iter().any(|a| a.ip.is_ipv4() == n.is_ipv4()) {
            push(n, None);
        }
    }
    if opts.is_default_gateway {
        for a in assigned {
            let any: IpNetwork = if a.ip.is_ipv4() {
                "0.0.0.0/0".parse().unwrap()
            } else {
                "::/0".parse().unwrap()
            };
            push(any, Some(a.range.gateway));
        }
    }
    Ok(routes)
}

pub fn add(conf: &NetConf, env: &Env, senv: &SubnetEnv) -> CniResult<AddResult> {
    let opts = BridgeOpts::resolve(&conf.delegate, Some(senv))?;
    let mut host_veth: Option<String> = None;
    let netns_path = env.netns.as_deref().unwrap_or_default();
    let netns = Netns::open(netns_path)?;
    let (assigned, result) = std::thread::scope(|s| {
        // The pod's netlink socket is made on a thread that enters the pod's namespace;
        // meanwhile this thread reserves the address.
        let pod_sock = s.spawn(|| netns.netlink_entering_this_thread());
        let assigned = match assign(conf, env, senv) {
            Ok(a) => a,
            Err(e) => return (Vec::new(), Err(e)), // the scope joins the thread
        };
        let pod = pod_sock.join().expect("netns thread panicked");
        let result = pod.map_err(CniError::from).and_then(|mut pod| {
            if pod.link_by_name(&env.ifname)?.is_some() {
                return Err(internal(format!(
                    "container interface {} already exists in {netns_path}",
                    env.ifname
                )));
            }
            add_links(
                conf,
                env,
                senv,
                &opts,
                &netns,
                &mut pod,
                &assigned,
                &mut host_veth,
            )
        });
        (assigned, result)
    });
    match result {
        Ok(r) => Ok(r),
        Err(e) => {
            // Leave nothing behind: the veth pair (deleting one end removes both), the
            // masquerade rules, the addresses this call reserved.
            if let Some(name) = &host_veth {
                if let Ok(mut host) = Netlink::new() {
                    let _ = host.delete_link_by_name(name);
                }
            }
            // (Masquerade rules come after the veth: none without it.)
            if opts.ip_masq && host_veth.is_some() {
                let ips: Vec<IpAddr> = assigned.iter().map(|a| a.ip).collect();
                for v6 in [false, true] {
                    if ips.iter().any(|ip| ip.is_ipv6() == v6) {
                        masq::teardown(&conf.name, &env.container_id, &ips, v6);
                    }
                }
            }
            release(conf, &assigned);
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn add_links(
    conf: &NetConf,
    env: &Env,
    senv: &SubnetEnv,
    opts: &BridgeOpts,
    netns: &Netns,
    pod: &mut Netlink,
    assigned: &[Assigned],
    host_veth: &mut Option<String>,
) -> CniResult<AddResult> {
    use std::os::fd::AsRawFd;

    let mut host = Netlink::new()?;
    let br_index = ensure_bridge(&mut host, opts)?;
    if opts.is_gateway {
        let gateways: Vec<(IpAddr, u8)> = assigned
            .iter()
            .map(|a| (a.range.gateway, a.range.subnet.prefix()))
            .collect();
        for &(gw, prefix) in &gateways {
            host.add_address(br_index, gw, prefix)?;
        }
        retire_stale_gateways(&mut host, br_index, &gateways)?;
        for a in assigned {
            enable_forwarding(a.ip.is_ipv6());
        }
    }

    // The veth pair, in one request: host end on the bridge, peer straight into the pod.
    let mut name = random_veth_name();
    let mut tries = 0;
    loop {
        match host.create_veth(
            &name,
            &env.ifname,
            netns.file.as_raw_fd(),
            opts.mtu,
            Some(br_index),
        ) {
            Ok(()) => break,
            Err(e) if e.is_exists() && tries < 3 => {
                // Our random host name collided, or the pod's name appeared meanwhile.
                if pod.link_by_name(&env.ifname)?.is_some() {
                    return Err(internal(format!(
                        "container interface {} already exists",
                        env.ifname
                    )));
                }
                tries += 1;
                name = random_veth_name();
            }
            Err(e) => return Err(e.into()),
        }
    }
    *host_veth = Some(name.clone());
    let hlink = host
        .link_by_name(&name)?
        .ok_or_else(|| internal(format!("host veth {name} vanished")))?;
    if opts.hairpin {
        host.set_hairpin(hlink.index, true)?;
    }

    let plink = pod
        .link_by_name(&env.ifname)?
        .ok_or_else(|| internal(format!("container veth {} vanished", env.ifname)))?;
    for a in assigned {
        pod.add_address(plink.index, a.ip, a.range.subnet.prefix())?;
    }
    pod.set_up(plink.index)?;
    let routes = pod_routes(conf, senv, opts, assigned)?;
    for r in &routes {
        let Some(a) = assigned.iter().find(|a| a.ip.is_ipv4() == r.dst.is_ipv4()) else {
            continue;
        };
        pod.add_route(
            r.dst.network(),
            r.dst.prefix(),
            Some(a.range.gateway),
            plink.index,
        )?;
    }

    if opts.ip_masq {
        for a in assigned {
            masq::setup(&conf.name, &env.container_id, a.cidr())?;
        }
    }

    let br = host
        .link_by_name(&opts.bridge)?
        .ok_or_else(|| internal(format!("bridge {} vanished", opts.bridge)))?;
    let mut result = AddResult {
        interfaces: vec![
            Interface {
                name: opts.bridge.clone(),
                mac: br.mac_string(),
                mtu: None,
                sandbox: None,
            },
            Interface {
                name: name.clone(),
                mac: hlink.mac_string(),
                mtu: None,
                sandbox: None,
            },
            Interface {
                name: env.ifname.clone(),
                mac: plink.mac_string(),
                mtu: Some(opts.mtu),
                sandbox: Some(netns.path.clone()),
            },
        ],
        ips: Vec::new(),
        routes,
    };
    for a in assigned {
        result.ips.push(IpConfig {
            interface: Some(2),
            address: a.cidr(),
            gateway: opts.is_gateway.then_some(a.range.gateway),
        });
    }
    Ok(result)
}

/// Undoes `add`: the pod's interface, its host-local addresses, its masquerade rules. Every
/// step runs even when an earlier one failed (see [`Teardown`]).
pub fn del(conf: &NetConf, env: &Env, senv: Option<&SubnetEnv>) -> CniResult<()> {
    let mut teardown = Teardown::new();
    let ip_masq = teardown
        .step(
            "read the delegate options",
            BridgeOpts::resolve(&conf.delegate, senv),
        )
        .map(|opts| opts.ip_masq);
    if let Some(path) = env.netns.as_deref() {
        teardown.step(
            format!("remove {} in {path}", env.ifname),
            remove_pod_interface(path, &env.ifname),
        );
    }
    let released = teardown
        .step(
            format!("release the addresses of {}", env.container_id),
            release_attachment(conf, env),
        )
        .unwrap_or_default();
    // Without the subnet file (or readable options) we cannot know flannel's ipMasq default:
    // clean up anyway, removing rules that are not there is harmless.
    let masq_possible =
        ip_masq.unwrap_or(true) || (senv.is_none() && conf.delegate.get("ipMasq").is_none());
    if masq_possible {
        masq::teardown(&conf.name, &env.container_id, &released, false);
        if released.iter().any(|ip| ip.is_ipv6()) {
            masq::teardown(&conf.name, &env.container_id, &released, true);
        }
    }
    teardown.finish()
}

fn remove_pod_interface(netns: &str, ifname: &str) -> CniResult<()> {
    match Netns::open(netns) {
        Ok(ns) => {
            ns.netlink()?.delete_link_by_name(ifname)?;
            Ok(())
        }
        Err(e) if e.is_not_found() => Ok(()), // the pod is gone already
        Err(e) => Err(e.into()),
    }
}

fn release_attachment(conf: &NetConf, env: &Env) -> CniResult<Vec<IpAddr>> {
    let store = Store::lock(&conf.ipam_data_dir(), &conf.name)?;
    Ok(store.release(&env.container_id, &env.ifname)?)
}

pub fn check(conf: &NetConf, env: &Env, senv: &SubnetEnv) -> CniResult<()> {
    let opts = BridgeOpts::resolve(&conf.delegate, Some(senv))?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult"))?;
    let prev = AddResult::from_json(prev)?;
    let netns = Netns::open(env.netns.as_deref().unwrap_or_default())?;
    let mut pod = netns.netlink()?;
    let plink = pod.link_by_name(&env.ifname)?.ok_or_else(|| {
        internal(format!(
            "CHECK: interface {} not found in {}",
            env.ifname, netns.path
        ))
    })?;
    if let Some(want) = prev
        .interfaces
        .iter()
        .find(|i| i.sandbox.is_some() && i.name == env.ifname)
    {
        if !want.mac.is_empty() && !want.mac.eq_ignore_ascii_case(&plink.mac_string()) {
            return Err(internal(format!(
                "CHECK: {} has MAC {}, prevResult says {}",
                env.ifname,
                plink.mac_string(),
                want.mac
            )));
        }
    }
    if !plink.is_up() {
        return Err(internal(format!("CHECK: {} is down", env.ifname)));
    }
    if plink.mtu != opts.mtu {
        return Err(internal(format!(
            "CHECK: {} has MTU {}, expected {}",
            env.ifname, plink.mtu, opts.mtu
        )));
    }
    let addrs = pod.addresses(0)?;
    let held =
        Store::lock(&conf.ipam_data_dir(), &conf.name)?.find(&env.container_id, &env.ifname)?;
    for ip in &prev.ips {
        let found = addrs.iter().any(|a| {
            a.index == plink.index && a.addr == ip.address.ip() && a.prefix == ip.address.prefix()
        });
        if !found {
            return Err(internal(format!(
                "CHECK: address {} not on {}",
                ip.address, env.ifname
            )));
        }
        if !held.contains(&ip.address.ip()) {
            return Err(internal(format!(
                "CHECK: address {} is not allocated to {}/{} in the IPAM store",
                ip.address, env.container_id, env.ifname
            )));
        }
    }
    let mut routes = pod.routes(libc::AF_INET as u8)?;
    routes.extend(pod.routes(libc::AF_INET6 as u8)?);
    for r in &prev.routes {
        let found = routes.iter().any(|k| {
            k.dst == r.dst.network()
                && k.dst_len == r.dst.prefix()
                && r.gw.is_none_or(|gw| k.gateway == Some(gw))
        });
        if !found {
            return Err(internal(format!(
                "CHECK: route to {} missing in the pod",
                r.dst
            )));
        }
    }
    let mut host = Netlink::new()?;
    let br = host
        .link_by_name(&opts.bridge)?
        .filter(|l| l.kind.as_deref() == Some("bridge"))
        .ok_or_else(|| internal(format!("CHECK: bridge {} not found", opts.bridge)))?;
    if let Some(hv) = prev
        .interfaces
        .iter()
        .find(|i| i.sandbox.is_none() && i.name != opts.bridge)
    {
        let l = host
            .link_by_name(&hv.name)?
            .ok_or_else(|| internal(format!("CHECK: host veth {} not found", hv.name)))?;
        if l.master != Some(br.index) {
            return Err(internal(format!(
                "CHECK: host veth {} is not attached to {}",
                hv.name, opts.bridge
            )));
        }
    }
    Ok(())
}
