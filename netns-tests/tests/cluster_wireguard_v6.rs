//! IPv6 with the wireguard backend (root only), in dual-stack clusters whose hosts have an
//! IPv6 underlay address beside the IPv4 one (see `common::start_dual_stack`):
//! - `Mode: separate` (flannel's default): `flannel-wg` carries IPv4 over the IPv4 underlay
//!   and `flannel-wg-v6` IPv6 over the IPv6 underlay, on `ListenPortV6`;
//! - `Mode: ipv6`: one `flannel-wg` carries both families over the IPv6 underlay;
//! - `Mode: auto`: one `flannel-wg` for both families, the underlay chosen per peer as
//!   flannel's `selectMode` (here IPv4: the test bed's 198.18/15 is not RFC 1918, and its
//!   IPv6 underlay is in fc00::/7).
//!
//! In each, pods of both families reach each other (ping, checksummed TCP), and a capture
//! on a host's underlay link shows WireGuard transport messages (type 4) on the expected
//! family and port, no inner addresses in the clear.

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use netns_tests::capture::udp_payloads;
use netns_tests::traffic::{fill_pseudo_random, tcp_transfer};
use netns_tests::{wait_until, Cluster, Netns, Pod, PodMode};
use serde_json::{json, Value};

mod common;

const CONVERGE: Duration = Duration::from_secs(30);
const PORT: u16 = 51820;
const PORT_V6: u16 = 51821;
const TRANSFER: u64 = 2 << 20;

/// A dual-stack cluster of `hosts` with the wireguard backend in `mode` (flannel's default
/// when `None`), flanneld started once every host has its IPv6 underlay address.
fn cluster(hosts: usize, mode: Option<&str>) -> Cluster {
    let mut backend = json!({"Type": "wireguard", "PersistentKeepaliveInterval": 25});
    if let Some(m) = mode {
        backend["Mode"] = json!(m);
    }
    let config = json!({
        "Network": "10.5.0.0/16",
        "EnableIPv6": true,
        "IPv6Network": "fc00::/48",
        "Backend": backend,
    });
    let c = Cluster::builder()
        .hosts(hosts)
        .config_json(&config.to_string())
        .pod_mode(PodMode::Static)
        .no_start()
        .build()
        .expect("cluster");
    common::start_dual_stack(&c, CONVERGE);
    c
}

/// One pod per host, each with an IPv4 and an IPv6 address.
fn pods(c: &Cluster) -> Vec<(Pod, Ipv6Addr)> {
    (0..c.hosts().len())
        .map(|i| {
            let p = c.add_pod(i).expect("pod");
            let n = u16::from(p.ip().octets()[3]);
            let v6 = common::give_v6(c.host(i), p.netns(), n, false);
            (p, v6)
        })
        .collect()
}

fn ping6(from: &Netns, dst: Ipv6Addr) -> Result<String, String> {
    from.exec("ping", &["-6", "-c", "1", "-W", "1", &dst.to_string()])
        .map_err(|e| e.to_string())
}

/// Every pod reaches every other over IPv4 and IPv6 (pings until the first passes).
fn all_reach(c: &Cluster, pods: &[(Pod, Ipv6Addr)]) {
    for (a, _) in pods {
        for (b, b6) in pods {
            if a.ip() == b.ip() {
                continue;
            }
            a.wait_reaches(b.ip(), CONVERGE)
                .unwrap_or_else(|e| panic!("{} → {}: {e}\n{}", a.ip(), b.ip(), logs(c)));
            wait_until(CONVERGE, &format!("{} to reach {b6}", a.name()), || {
                ping6(a.netns(), *b6)
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(c)));
        }
    }
}

fn logs(c: &Cluster) -> String {
    c.hosts()
        .iter()
        .map(|h| format!("--- {}:\n{}", h.name(), h.log_tail(25)))
        .collect()
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv(mut h: u64, data: &[u8]) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Sends `bytes` pseudo-random bytes over TCP from pod `from` to `[to6]` in pod `to`; the
/// receiver sends back the count and hash of what it got, which must match what was sent.
fn tcp_transfer6(from: &Pod, to: &Pod, to6: Ipv6Addr, bytes: u64) {
    let timeout = Duration::from_secs(15);
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<u16>();
        let server = s.spawn(move || {
            to.netns()
                .run_in(|| {
                    let l = TcpListener::bind((to6, 0)).expect("listen");
                    tx.send(l.local_addr().unwrap().port()).unwrap();
                    let (mut st, _) = l.accept().expect("accept");
                    st.set_read_timeout(Some(timeout)).unwrap();
                    let (mut n, mut h) = (0u64, FNV_OFFSET);
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let r = st.read(&mut buf).expect("receiving");
                        if r == 0 {
                            break;
                        }
                        n += r as u64;
                        h = fnv(h, &buf[..r]);
                    }
                    st.write_all(&[n.to_be_bytes(), h.to_be_bytes()].concat())
                        .expect("receipt");
                })
                .expect("server in the pod")
        });
        let port = rx.recv_timeout(timeout).expect("the server listens");
        from.netns()
            .run_in(|| {
                let addr = SocketAddr::from((to6, port));
                let mut st = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
                st.set_write_timeout(Some(timeout)).unwrap();
                st.set_read_timeout(Some(timeout)).unwrap();
                let (mut h, mut x) = (FNV_OFFSET, 0x9e37_79b9_7f4a_7c15u64 ^ bytes);
                let mut buf = vec![0u8; 64 << 10];
                let mut left = bytes;
                while left > 0 {
                    let k = (buf.len() as u64).min(left) as usize;
                    fill_pseudo_random(&mut x, &mut buf[..k]);
                    st.write_all(&buf[..k]).expect("sending");
                    h = fnv(h, &buf[..k]);
                    left -= k as u64;
                }
                st.shutdown(std::net::Shutdown::Write).unwrap();
                let mut receipt = [0u8; 16];
                st.read_exact(&mut receipt).expect("the receipt");
                let n = u64::from_be_bytes(receipt[..8].try_into().unwrap());
                let rh = u64::from_be_bytes(receipt[8..].try_into().unwrap());
                assert_eq!((n, rh), (bytes, h), "received (bytes, hash) over IPv6");
            })
            .expect("client in the pod");
        server.join().unwrap();
    });
}

/// Runs `traffic` while capturing on host `host`'s underlay: the UDP payloads on `port`
/// over IPv4 and over IPv6.
fn captured(
    c: &Cluster,
    host: usize,
    port: u16,
    traffic: impl FnOnce(),
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (ready, started) = mpsc::channel();
        let caps: Vec<_> = [false, true]
            .into_iter()
            .map(|v6| {
                let (ready, stop) = (ready.clone(), &stop);
                s.spawn(move || {
                    c.host(host)
                        .netns()
                        .run_in(|| udp_payloads("eth0", port, v6, ready, stop))
                        .expect("capture runs in the host")
                })
            })
            .collect();
        for _ in 0..2 {
            started
                .recv_timeout(Duration::from_secs(10))
                .expect("captures started");
        }
        traffic();
        stop.store(true, Ordering::Relaxed);
        let mut caps = caps.into_iter().map(|h| h.join().unwrap());
        (caps.next().unwrap(), caps.next().unwrap())
    })
}

/// The datagrams carry the transfer in WireGuard transport messages (veth hands UDP GSO
/// runs over whole, so one captured frame may hold many: bytes are counted), nothing but
/// WireGuard messages, and no inner address pair in the clear.
fn assert_wireguard_only(seen: &[Vec<u8>], what: &str, inner: &[Vec<u8>]) {
    let transport: usize = seen
        .iter()
        .filter(|d| d.first() == Some(&4))
        .map(Vec::len)
        .sum();
    assert!(
        transport as u64 >= TRANSFER / 2,
        "{what}: type-4 bytes {transport} in {} datagrams",
        seen.len()
    );
    let odd: Vec<u8> = seen
        .iter()
        .map(|d| d.first().copied().unwrap_or(0))
        .filter(|t| !(1..=4).contains(t))
        .collect();
    assert!(odd.is_empty(), "{what}: not WireGuard: types {odd:?}");
    for d in seen {
        for pair in inner {
            assert!(
                !d.windows(pair.len()).any(|w| w == pair.as_slice()),
                "{what}: an inner IP header is visible on the underlay"
            );
        }
    }
}

fn v6_pair(a: Ipv6Addr, b: Ipv6Addr) -> Vec<Vec<u8>> {
    vec![
        [a.octets(), b.octets()].concat(),
        [b.octets(), a.octets()].concat(),
    ]
}

fn lease_values(c: &Cluster) -> Vec<Value> {
    (0..c.hosts().len())
        .map(|i| c.lease_of(i).unwrap().expect("host has a lease").value)
        .collect()
}

fn has_link(c: &Cluster, i: usize, dev: &str) -> bool {
    c.host(i).netns().exec("ip", &["link", "show", dev]).is_ok()
}

/// Whether `dev` on host `i` holds `addr` and the route for `fc00::/48`.
fn v6_device_programmed(c: &Cluster, i: usize, dev: &str) -> Result<(), String> {
    let ns = c.host(i).netns();
    let own = c.host(i).subnet_v6().map_err(|e| e.to_string())?;
    let addrs = ns
        .exec("ip", &["-6", "addr", "show", "dev", dev])
        .map_err(|e| e.to_string())?;
    let want = format!("{}/128", own.network());
    if !addrs.contains(&want) {
        return Err(format!("{dev} lacks {want}: {addrs}"));
    }
    let routes = ns
        .exec("ip", &["-6", "route", "show", "fc00::/48"])
        .map_err(|e| e.to_string())?;
    if !routes.contains(&format!("dev {dev}")) {
        return Err(format!("no route fc00::/48 dev {dev}: {routes}"));
    }
    Ok(())
}

#[test]
fn separate_mode_carries_ipv6_on_flannel_wg_v6_over_the_ipv6_underlay() {
    netns_tests::require_test_bed!();
    let c = cluster(3, None);
    for (i, v) in lease_values(&c).iter().enumerate() {
        assert_eq!(v["BackendData"]["Port"], json!(PORT), "{v}");
        assert_eq!(v["BackendV6Data"]["Port"], json!(PORT_V6), "{v}");
        assert_eq!(
            v["BackendData"]["PublicKey"], v["BackendV6Data"]["PublicKey"],
            "one key for both devices: {v}"
        );
        assert_eq!(v["PublicIPv6"], common::host_v6(i).to_string(), "{v}");
        assert!(has_link(&c, i, "flannel-wg"), "the IPv4 device");
        wait_until(CONVERGE, "flannel-wg-v6 programmed", || {
            v6_device_programmed(&c, i, "flannel-wg-v6")
        })
        .unwrap();
    }
    let pods = pods(&c);
    all_reach(&c, &pods);
    // Both families, checksummed; the IPv6 one watched on host 1's underlay.
    let ((a, a6), (b, b6)) = (&pods[0], &pods[1]);
    tcp_transfer(a, b, TRANSFER).expect("checksummed transfer over IPv4");
    let (v4_seen, v6_seen) = captured(&c, 1, PORT_V6, || {
        tcp_transfer6(a, b, *b6, TRANSFER);
        tcp_transfer6(b, a, *a6, TRANSFER);
    });
    assert_wireguard_only(&v6_seen, "IPv6 underlay, port 51821", &v6_pair(*a6, *b6));
    assert!(
        v4_seen.is_empty(),
        "nothing on port {PORT_V6} over IPv4: {} datagrams",
        v4_seen.len()
    );
    // Every pod pair, IPv6, checksummed.
    for (p, _) in &pods {
        for (q, q6) in &pods {
            if p.ip() != q.ip() {
                tcp_transfer6(p, q, *q6, 256 << 10);
            }
        }
    }
}

#[test]
fn ipv6_mode_carries_both_families_on_one_device_over_the_ipv6_underlay() {
    netns_tests::require_test_bed!();
    let c = cluster(2, Some("ipv6"));
    for (i, v) in lease_values(&c).iter().enumerate() {
        // The one device listens on ListenPort, and that is what both halves say.
        assert_eq!(v["BackendData"]["Port"], json!(PORT), "{v}");
        assert_eq!(v["BackendV6Data"]["Port"], json!(PORT), "{v}");
        assert!(
            !has_link(&c, i, "flannel-wg-v6"),
            "no second device in this mode"
        );
        wait_until(CONVERGE, "flannel-wg carries IPv6", || {
            v6_device_programmed(&c, i, "flannel-wg")
        })
        .unwrap();
    }
    let pods = pods(&c);
    all_reach(&c, &pods);
    let ((a, a6), (b, b6)) = (&pods[0], &pods[1]);
    let (v4_seen, v6_seen) = captured(&c, 1, PORT, || {
        tcp_transfer(a, b, TRANSFER).expect("checksummed transfer over IPv4");
        tcp_transfer6(a, b, *b6, TRANSFER);
    });
    let mut inner = v6_pair(*a6, *b6);
    inner.push([a.ip().octets(), b.ip().octets()].concat());
    assert_wireguard_only(&v6_seen, "IPv6 underlay, port 51820", &inner);
    assert!(
        v4_seen.is_empty(),
        "the IPv4 underlay carries nothing in this mode: {} datagrams",
        v4_seen.len()
    );
}

#[test]
fn auto_mode_carries_both_families_on_one_device_over_the_underlay_it_selects() {
    netns_tests::require_test_bed!();
    let c = cluster(2, Some("auto"));
    for i in 0..2 {
        wait_until(CONVERGE, "flannel-wg carries IPv6", || {
            v6_device_programmed(&c, i, "flannel-wg")
        })
        .unwrap();
    }
    let pods = pods(&c);
    all_reach(&c, &pods);
    let ((a, a6), (b, b6)) = (&pods[0], &pods[1]);
    // 198.18/15 is not RFC 1918 and we have IPv4: flannel's selectMode takes IPv4.
    let (v4_seen, v6_seen) = captured(&c, 1, PORT, || {
        tcp_transfer6(a, b, *b6, TRANSFER);
        tcp_transfer6(b, a, *a6, TRANSFER);
    });
    assert_wireguard_only(&v4_seen, "IPv4 underlay, port 51820", &v6_pair(*a6, *b6));
    assert!(
        v6_seen.is_empty(),
        "the IPv6 underlay carries nothing here: {} datagrams",
        v6_seen.len()
    );
}
