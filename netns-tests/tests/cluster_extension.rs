//! The `extension` backend on 3 hosts (root only): the commands, a script this test writes,
//! program host-gw-like routes; peers' routes appear and vanish with their leases; the
//! PreStartupCommand's output is the published BackendData and reaches peers' commands on
//! stdin; a failing and a hanging command are logged (exit status, output, the deadline) and
//! the daemon keeps handling other leases and stays healthy meanwhile.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use netns_tests::{wait_until, Cluster, Host};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);
/// `CommandTimeout` of the config: long enough that a lease handled while a command hangs is
/// clearly handled before the hanging one is killed.
const COMMAND_TIMEOUT_S: u64 = 12;

/// The commands' script: `pre` prints this host's BackendData, `post` records its variables,
/// `add`/`del` program the route via the peer's public IP. A peer whose BackendData (stdin) is
/// `fail` or `hang` makes `add` fail or hang. Files go to `dir`, named after the host's
/// namespace (`ip netns identify`), since every host runs the same config.
fn write_script(dir: &Path) -> String {
    let path = dir.join("extension.sh");
    let d = dir.display();
    let body = format!(
        r#"#!/bin/sh
me=$(ip netns identify)
case "$1" in
pre) echo "data of $me" ;;
post) echo "$NETWORK|$SUBNET|$IPV6SUBNET|$PUBLIC_IP|$PUBLIC_IPV6" > "{d}/post-$me"; echo posted ;;
add)
    read -r data
    case "$data" in
    fail) echo "refusing $2 on purpose"; exit 3 ;;
    hang) echo "hanging on $2"; touch "{d}/hanging-$me"; exec sleep 600 ;;
    esac
    ip route replace "$2" via "$3" || exit 1
    echo "$2|$3|$data" >> "{d}/added-$me" ;;
del) ip route del "$2" ;;
esac
"#
    );
    std::fs::write(&path, body).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path.display().to_string()
}

/// The gateway of `h`'s route to `subnet`, if it has one.
fn route_via(h: &Host, subnet: &str) -> Option<String> {
    h.routes()
        .expect("ip route")
        .into_iter()
        .find(|r| r["dst"] == subnet)
        .map(|r| r["gateway"].as_str().unwrap_or("none").to_string())
}

fn wait_route(h: &Host, subnet: &str, via: Ipv4Addr) {
    wait_until(
        WAIT,
        &format!("{} routes {subnet} via {via}", h.name()),
        || {
            h.check_alive()?;
            match route_via(h, subnet) {
                Some(gw) if gw == via.to_string() => Ok(()),
                other => Err(format!("route: {other:?}")),
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", h.log_tail(30)));
}

fn wait_no_route(h: &Host, subnet: &str) {
    wait_until(
        WAIT,
        &format!("{} drops its route to {subnet}", h.name()),
        || {
            h.check_alive()?;
            match route_via(h, subnet) {
                None => Ok(()),
                Some(gw) => Err(format!("still via {gw}")),
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", h.log_tail(30)));
}

fn wait_log(h: &Host, what: &str, line: impl Fn(&str) -> bool) -> String {
    wait_until(WAIT + Duration::from_secs(COMMAND_TIMEOUT_S), what, || {
        let log = std::fs::read_to_string(h.log_path()).map_err(|e| e.to_string())?;
        log.lines()
            .find(|l| line(l))
            .map(String::from)
            .ok_or_else(|| "no such line yet".to_string())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", h.log_tail(30)))
}

fn healthy(h: &Host) {
    h.check_alive().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        h.http_get("/healthz").expect("healthz").0,
        200,
        "{}",
        h.name()
    );
}

fn put_lease(c: &Cluster, subnet: &str, public_ip: &str, data: &str) -> String {
    let key = format!("{}{}", c.subnets_prefix(), subnet.replace('/', "-"));
    let value = json!({"PublicIP": public_ip, "BackendType": "extension", "BackendData": data});
    c.etcd().put(&key, &value.to_string()).expect("etcd put");
    key
}

/// Three /24s of 10.5.0.0/16 that no lease holds, as `10.5.x.0/24`.
fn free_subnets(c: &Cluster) -> [String; 3] {
    let taken: Vec<String> = c
        .leases()
        .unwrap()
        .iter()
        .map(|l| l.subnet.to_string())
        .collect();
    let free: Vec<String> = (200..=255u8)
        .rev()
        .map(|i| format!("10.5.{i}.0/24"))
        .filter(|n| !taken.contains(n))
        .take(3)
        .collect();
    free.try_into().expect("three free /24s")
}

#[test]
fn extension_commands_follow_the_leases_and_bad_commands_block_nothing() {
    netns_tests::require_test_bed!();
    let dir = tempfile::tempdir().expect("temp dir");
    let script = write_script(dir.path());
    let run = |arg: &str| format!("/bin/sh {script} {arg}");
    let c = Cluster::builder()
        .hosts(3)
        .backend_json(json!({
            "Type": "extension",
            "PreStartupCommand": run("pre"),
            "PostStartupCommand": run("post"),
            // Both spellings of a variable, as operators write them.
            "SubnetAddCommand": run("add $SUBNET ${PUBLIC_IP}"),
            "SubnetRemoveCommand": run("del ${SUBNET} $PUBLIC_IP"),
            "CommandTimeout": COMMAND_TIMEOUT_S,
        }))
        .build()
        .expect("cluster");
    let hosts = c.hosts();
    let subnet = |i: usize| c.host(i).subnet().unwrap().to_string();

    // Every host routes every other host's subnet via its public IP.
    for (i, h) in hosts.iter().enumerate() {
        for (j, peer) in hosts.iter().enumerate().filter(|(j, _)| *j != i) {
            wait_route(h, &subnet(j), peer.public_ip());
        }
    }
    for (i, h) in hosts.iter().enumerate() {
        let me = h.netns().name().to_string();
        // PreStartupCommand's output is the lease's BackendData, a JSON string.
        let lease = c.lease_of(i).unwrap().expect("lease");
        assert_eq!(lease.value["BackendType"], "extension");
        assert_eq!(
            lease.value["BackendData"],
            Value::from(format!("data of {me}"))
        );
        // PostStartupCommand saw flannel's variables.
        let post = std::fs::read_to_string(dir.path().join(format!("post-{me}"))).unwrap();
        assert_eq!(
            post.trim(),
            format!("10.5.0.0/16|{}|::/0|{}|<nil>", subnet(i), h.public_ip())
        );
    }
    // Peers' commands got the peer's BackendData string on stdin.
    let h0 = c.host(0).netns().name().to_string();
    let added = std::fs::read_to_string(dir.path().join(format!("added-{h0}"))).unwrap();
    let h1 = c.host(1).netns().name().to_string();
    let want = format!("{}|{}|data of {h1}", subnet(1), c.host(1).public_ip());
    assert!(added.lines().any(|l| l == want), "{want:?} not in\n{added}");

    // Subnets for hand-written leases, none of them host 2's, which it takes again later.
    let [hang, fail, late] = free_subnets(&c);

    // A lease that goes (host 2 stopped, its lease expired): SubnetRemoveCommand drops the route.
    let gone = c.lease_of(2).unwrap().expect("lease of host 2");
    c.host(2).stop();
    c.etcd().del(&gone.key).expect("etcd del");
    wait_no_route(c.host(0), &subnet(2));
    wait_no_route(c.host(1), &subnet(2));

    // A peer whose command hangs, one whose command fails (public IPs no host has).
    let started = Instant::now();
    put_lease(&c, &hang, "198.18.0.251", "hang");
    put_lease(&c, &fail, "198.18.0.250", "fail");
    let hanging = dir.path().join(format!("hanging-{h0}"));
    wait_until(
        WAIT,
        &format!("the command for {hang} hangs on host 0"),
        || hanging.exists().then_some(()).ok_or("not yet".to_string()),
    )
    .unwrap();
    // While it hangs, another lease is handled: host 2 comes back.
    c.host(2).start().expect("restart host 2");
    c.host(2).wait_ready(WAIT).expect("host 2 ready");
    wait_route(c.host(0), &subnet(2), c.host(2).public_ip());
    let handled_after = started.elapsed();
    assert!(
        handled_after < Duration::from_secs(COMMAND_TIMEOUT_S),
        "host 2's lease was handled only after {handled_after:?}, not while the command hung"
    );
    healthy(c.host(0));

    // Both are reported with their output; the hanging one with its deadline.
    let failed = wait_log(c.host(0), "the failed command is logged", |l| {
        l.contains(&format!(
            "peer {}: SubnetAddCommand",
            fail.replace('/', "-")
        )) && l.contains("failed")
    });
    assert!(
        failed.contains("exit status: 3")
            && failed.contains(&format!("output: \"refusing {fail} on purpose\"")),
        "{failed}"
    );
    let hung = wait_log(c.host(0), "the hanging command is logged", |l| {
        l.contains(&format!(
            "peer {}: SubnetAddCommand",
            hang.replace('/', "-")
        )) && l.contains("failed")
    });
    assert!(
        hung.contains(&format!(
            "timed out: still running after {COMMAND_TIMEOUT_S}s, killed"
        )) && hung.contains(&format!("output: \"hanging on {hang}\"")),
        "{hung}"
    );
    // The daemons go on: healthy, and a new lease still gets its route.
    put_lease(&c, &late, &c.host(1).public_ip().to_string(), "late");
    for h in [c.host(0), c.host(2)] {
        wait_route(h, &late, c.host(1).public_ip());
        healthy(h);
    }
    healthy(c.host(1));
}
