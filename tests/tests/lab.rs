//! End-to-end proof of the lab with plain kernel routing (no mwan): every
//! ISP carries traffic and every impairment does what it says.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables). Tests run in parallel,
//! each with its own lab.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use lab::*;

fn build(isps: usize) -> Lab {
    Lab::builder()
        .lan_hosts(1)
        .isps(isps)
        .build()
        .expect("lab builds")
}

fn out(ns: &Netns, argv: &[&str]) -> String {
    String::from_utf8_lossy(&ns.exec(argv).expect("command runs").stdout).into_owned()
}

/// The ISP a TCP whoami from `host` went through.
fn tcp_isp(lab: &Lab, host: &Netns) -> anyhow::Result<usize> {
    let seen = host.tcp_whoami(TCP_WHOAMI)?;
    lab.wan_of(*seen.ip())
        .ok_or_else(|| anyhow::anyhow!("{seen} is no ISP's address"))
}

/// Whether a TCP whoami from `host` fails (within a second).
fn fails(host: &Netns) -> bool {
    host.tcp_whoami_within(TCP_WHOAMI, Duration::from_secs(1))
        .is_err()
}

fn quick_ping(ns: &Netns, addr: impl Into<std::net::IpAddr>, count: u32) -> PingStats {
    ping(
        ns,
        addr,
        count,
        Duration::from_millis(50),
        Duration::from_secs(1),
    )
    .expect("ping runs")
}

#[test]
fn build_and_teardown_are_quick_and_leave_nothing() {
    let start = Instant::now();
    let lab = Lab::builder().isps(2).build().expect("lab builds");
    let built = start.elapsed();
    let name = lab.name().to_string();
    let dir = lab.dir();
    assert!(lab.pin_dir().starts_with(&dir) && lab.state_dir().is_dir());
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        mounts.contains(&format!("{} bpf", dir.join("bpf").display())),
        "private bpffs mounted"
    );
    assert_eq!(
        namespaces_of(&name).len(),
        2 + 3 + 2,
        "router, inet, 3 hosts, 2 ISPs"
    );
    // A process still running when the lab goes.
    let sleeper = lab.router().spawn("sleep", &["60"], &[]).unwrap();

    let start = Instant::now();
    drop(lab);
    let torn_down = start.elapsed();
    println!("lab with 2 ISPs: built in {built:?}, torn down in {torn_down:?}");
    assert!(built < Duration::from_secs(10) && torn_down < Duration::from_secs(10));

    assert!(!sleeper.is_running(), "process ended with the lab");
    assert_eq!(
        namespaces_of(&name),
        Vec::<String>::new(),
        "no namespace left"
    );
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts
        .lines()
        .any(|m| m.contains(&format!("{} ", dir.display()))
            || m.contains(&format!("{}/", dir.display()))));
    assert!(!dir.exists(), "lab directory removed");
}

/// Names of the namespaces of lab `name`: the lab name followed by a
/// letter (`mwl1x1` is not a namespace of lab `mwl1x`…`1`).
fn namespaces_of(name: &str) -> Vec<String> {
    all_namespaces()
        .into_iter()
        .filter(|ns| {
            ns.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_alphabetic()))
        })
        .collect()
}

fn all_namespaces() -> Vec<String> {
    let o = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

#[test]
fn a_panicking_test_still_tears_its_lab_down() {
    let (tx, rx) = std::sync::mpsc::channel();
    let failed = thread::spawn(move || {
        let lab = build(1);
        let _proc = lab.isp(1).ns().spawn("sleep", &["60"], &[]).unwrap();
        lab.isp(1).set_delay(Duration::from_millis(5)).unwrap();
        tx.send((lab.name().to_string(), lab.dir())).unwrap();
        panic!("test failure inside a lab");
    })
    .join();
    assert!(failed.is_err());
    let (name, dir) = rx.recv().unwrap();
    assert_eq!(namespaces_of(&name), Vec::<String>::new());
    assert!(!dir.exists());
}

#[test]
fn leftovers_of_killed_tests_are_swept() {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let leftover = format!("mwl{dead}x0r");
    let leftover_dir = Path::new("/run/mwan-lab").join(format!("mwl{dead}x0"));
    // Best effort: a lab being built concurrently (here or in another test
    // process) may sweep them away while they are being made.
    let _ = std::process::Command::new("ip")
        .args(["netns", "add", &leftover])
        .status();
    let _ = fs::create_dir_all(leftover_dir.join("state"));

    let _lab = build(1);
    assert!(!all_namespaces().contains(&leftover));
    assert!(!leftover_dir.exists());
}

#[test]
fn topology_addresses_and_routes() {
    let lab = Lab::builder()
        .lan_hosts(4)
        .second_lan(2)
        .isp(IspSpec::default().rate_mbit(50))
        .isp(IspSpec::default().delay(Duration::from_millis(20)))
        .isp(IspSpec::default().loss(100))
        .build()
        .expect("lab builds");
    assert_eq!(lab.hosts().len(), 4);
    assert_eq!(lab.host(3).addr(), Ipv4Addr::new(192, 0, 2, 13));
    assert_eq!(lab.lan1_host(1).addr(), Ipv4Addr::new(192, 0, 2, 139));
    assert!(out(
        lab.lan1_host(1),
        &["ip", "-br", "addr", "show", "dev", "eth0"]
    )
    .contains("192.0.2.139/25"));
    assert_eq!(quick_ping(lab.lan1_host(1), LAN1_ROUTER, 2).received, 2);
    assert_eq!(quick_ping(lab.host(0), LAN0_ROUTER, 2).received, 2);

    let routes = out(lab.router(), &["ip", "route", "show", "default"]);
    for i in 1..=3 {
        let isp = lab.isp(i);
        assert_eq!(isp.router_addr().to_string(), format!("100.64.{i}.2/24"));
        assert_eq!(isp.gateway(), Ipv4Addr::new(100, 64, i as u8, 1));
        let want = format!(
            "default via 100.64.{i}.1 dev wan{i} proto dhcp metric {}",
            100 + i
        );
        assert!(routes.contains(&want), "{want:?} in\n{routes}");
        assert_eq!(
            quick_ping(lab.router(), isp.gateway(), 2).received,
            2,
            "router reaches gateway {i}"
        );
    }
    let rp = lab
        .router()
        .sh("cat /proc/sys/net/ipv4/conf/wan1/rp_filter /proc/sys/net/ipv4/conf/all/rp_filter");
    assert_eq!(
        rp.unwrap().split_whitespace().collect::<Vec<_>>(),
        ["2", "0"]
    );
    assert!(out(lab.isp(1).ns(), &["tc", "qdisc", "show", "dev", "down"]).contains("tbf"));
    // No NAT of the lab's own: the internet cannot answer the LAN yet.
    assert!(fails(lab.host(0)));
    // The specs' delay and loss are in place.
    lab.plain_routing_via(2).unwrap();
    let rtt = quick_ping(lab.host(0), PROBE_TARGETS[0], 3).median_rtt();
    assert!(
        rtt.is_some_and(|rtt| rtt >= Duration::from_millis(36)),
        "{rtt:?}"
    );
    lab.plain_routing_via(3).unwrap();
    assert_eq!(quick_ping(lab.host(0), PROBE_TARGETS[0], 3).received, 0);
}

#[test]
fn plain_routing_through_each_isp() {
    let lab = Lab::builder()
        .lan_hosts(1)
        .second_lan(1)
        .isps(2)
        .build()
        .expect("lab builds");
    for isp in 1..=2 {
        lab.plain_routing_via(isp).unwrap();
        let wan_addr = SocketAddrV4::new(lab.isp(isp).router_addr().addr(), 0);
        for host in [lab.host(0), lab.lan1_host(0)] {
            let seen = host.tcp_whoami(TCP_WHOAMI).unwrap();
            assert_eq!(
                (seen.ip(), lab.wan_of(*seen.ip())),
                (wan_addr.ip(), Some(isp))
            );
            let seen = host.tcp_whoami(TCP_WHOAMI2).unwrap();
            assert_eq!(seen.ip(), wan_addr.ip());
            let seen = host.udp_whoami(UDP_WHOAMI).unwrap();
            assert_eq!(seen.ip(), wan_addr.ip());
            let reply = host.dns_query(DNS, "probe.example").unwrap();
            assert_eq!((reply.rcode, reply.name.as_str()), (0, "probe.example"));
            for target in PROBE_TARGETS {
                assert_eq!(
                    quick_ping(host, target, 2).received,
                    2,
                    "{target} via ISP {isp}"
                );
            }
        }
        let stream = lab.host(0).open_stream(STREAM).unwrap();
        assert_eq!(stream.source().ip(), wan_addr.ip());
        assert!(
            wait_until(Duration::from_secs(10), || stream.bytes() > 256 * 1024),
            "stream flows"
        );
        let report = stream.close();
        assert_eq!(report.end, None, "no EOF or reset while open");
        println!(
            "ISP {isp}: stream {} bytes, longest gap {:?}",
            report.bytes, report.max_gap
        );
    }
    lab.clear_plain_routing().unwrap();
    assert!(fails(lab.host(0)), "no NAT without plain routing");
}

/// A host behind a point-to-point tun link (no Ethernet, no ARP) reaches
/// the internet through the router like any LAN host; dropping the lab
/// takes its namespace and link with it.
#[test]
fn a_tunnel_host_reaches_the_internet_point_to_point() {
    let lab = Lab::builder()
        .lan_hosts(1)
        .tunnel_host()
        .isps(2)
        .build()
        .expect("lab builds");
    let host = lab.tunnel_host().expect("the tunnel host");
    assert_eq!(host.addr(), TUNNEL_HOST);
    let link = lab
        .router()
        .sh(&format!("ip -o link show dev {TUNNEL_IFACE}"))
        .unwrap();
    assert!(
        link.contains("POINTOPOINT") && link.contains("link/none"),
        "{link}"
    );
    assert_eq!(quick_ping(host, TUNNEL_ROUTER, 2).received, 2);
    lab.plain_routing_via(2).unwrap();
    let seen = host.tcp_whoami(TCP_WHOAMI).unwrap();
    assert_eq!(lab.wan_of(*seen.ip()), Some(2));
    let stream = host.open_stream(STREAM).unwrap();
    assert!(wait_until(Duration::from_secs(10), || stream.bytes() > 256 * 1024));
    assert_eq!(stream.close().end, None);
    let name = lab.name().to_string();
    drop(lab);
    assert!(namespaces_of(&name).is_empty());
}

#[test]
fn many_short_connections() {
    let lab = build(1);
    lab.plain_routing_via(1).unwrap();
    let start = Instant::now();
    let results = many_tcp_whoami(lab.host(0), TCP_WHOAMI, 1000, 32);
    println!("1000 TCP whoami through NAT in {:?}", start.elapsed());
    let mut ports = std::collections::BTreeSet::new();
    for result in results {
        let seen = result.unwrap();
        assert_eq!(lab.wan_of(*seen.ip()), Some(1));
        ports.insert(seen.port());
    }
    assert_eq!(ports.len(), 1000, "1000 distinct connections");
}

#[test]
fn loss_is_near_the_set_value() {
    let lab = build(1);
    lab.plain_routing_via(1).unwrap();
    lab.isp(1).set_loss(30).unwrap();
    let stats = ping(
        lab.host(0),
        PROBE_TARGETS[0],
        200,
        Duration::from_millis(5),
        Duration::from_secs(1),
    )
    .unwrap();
    println!(
        "30% loss set: {}/{} answered, {:.1}% lost",
        stats.received,
        stats.sent,
        stats.loss_pct()
    );
    assert_eq!(stats.sent, 200);
    assert!(
        (15.0..=45.0).contains(&stats.loss_pct()),
        "loss {:.1}%",
        stats.loss_pct()
    );
    lab.isp(1).set_loss(0).unwrap();
    assert_eq!(quick_ping(lab.host(0), PROBE_TARGETS[0], 20).received, 20);
}

#[test]
fn delay_adds_to_the_round_trip() {
    let lab = build(1);
    lab.plain_routing_via(1).unwrap();
    let rtt = |lab: &Lab| {
        let stats = ping(
            lab.host(0),
            PROBE_TARGETS[0],
            10,
            Duration::from_millis(20),
            Duration::from_secs(2),
        )
        .unwrap();
        stats.median_rtt().expect("some replies")
    };
    let base = rtt(&lab);
    lab.isp(1).set_delay(Duration::from_millis(50)).unwrap();
    let delayed = rtt(&lab);
    let added = delayed.saturating_sub(base);
    println!("50 ms one-way delay: RTT {base:?} -> {delayed:?} (+{added:?})");
    assert!(
        added >= Duration::from_millis(90) && added < Duration::from_millis(400),
        "added {added:?}"
    );
    assert_eq!(
        tcp_isp(&lab, lab.host(0)).unwrap(),
        1,
        "TCP through the relay"
    );
    assert!(
        lab.host(0).dns_query(DNS, "x.example").is_ok(),
        "UDP through the relay"
    );
    lab.isp(1).set_delay(Duration::ZERO).unwrap();
    let after = rtt(&lab);
    assert!(
        after < base + Duration::from_millis(40),
        "delay removed: {after:?}"
    );
}

#[test]
fn blackhole_drops_forwarded_traffic_but_gateway_answers() {
    let lab = build(1);
    lab.plain_routing_via(1).unwrap();
    assert_eq!(tcp_isp(&lab, lab.host(0)).unwrap(), 1);
    lab.isp(1).set_blackhole(true).unwrap();
    assert!(fails(lab.host(0)));
    assert_eq!(quick_ping(lab.host(0), PROBE_TARGETS[0], 3).received, 0);
    let gateway = lab.isp(1).gateway();
    assert_eq!(
        quick_ping(lab.router(), gateway, 3).received,
        3,
        "gateway pings from the router"
    );
    assert_eq!(
        quick_ping(lab.host(0), gateway, 3).received,
        3,
        "gateway pings from the LAN"
    );
    lab.isp(1).set_blackhole(false).unwrap();
    assert_eq!(tcp_isp(&lab, lab.host(0)).unwrap(), 1);
}

#[test]
fn carrier_down_kills_the_link_and_up_restores_it() {
    let lab = build(1);
    lab.plain_routing_via(1).unwrap();
    let link = || out(lab.router(), &["ip", "link", "show", "dev", "wan1"]);
    lab.isp(1).set_carrier(false).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || link().contains("NO-CARRIER")),
        "{}",
        link()
    );
    assert!(fails(lab.host(0)));
    lab.isp(1).set_carrier(true).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || !link().contains("NO-CARRIER")),
        "{}",
        link()
    );
    assert!(wait_until(Duration::from_secs(10), || tcp_isp(
        &lab,
        lab.host(0)
    )
    .is_ok_and(|i| i == 1)));
}

#[test]
fn rate_limit_caps_throughput() {
    const MBIT: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(2);
    // Twice the configured rate over the window: generous for tbf's burst.
    let ceiling = 2 * u64::from(MBIT) * 1_000_000 / 8 * WINDOW.as_secs();
    let lab = build(1);
    lab.plain_routing_via(1).unwrap();
    lab.isp(1).set_rate(Some(MBIT)).unwrap();
    let stream = lab.host(0).open_stream(BULK).unwrap();
    assert!(wait_until(Duration::from_secs(5), || stream.bytes() > 0));
    let before = stream.bytes();
    thread::sleep(WINDOW); // the measurement window
    let limited = stream.bytes() - before;
    println!("{MBIT} mbit limit: {limited} bytes in {WINDOW:?} (ceiling {ceiling})");
    assert!(
        limited < ceiling,
        "{limited} bytes in {WINDOW:?} through {MBIT} mbit"
    );

    lab.isp(1).set_rate(None).unwrap();
    let before = stream.bytes();
    let start = Instant::now();
    assert!(
        wait_until(Duration::from_secs(20), || stream.bytes() - before
            > ceiling),
        "without the limit the ceiling is passed"
    );
    println!("unlimited: {ceiling} bytes in {:?}", start.elapsed());
    assert_eq!(stream.close().end, None);
}

#[test]
fn readdress_renumbers_the_link() {
    let lab = build(2);
    lab.plain_routing_via(2).unwrap();
    let new: Ipv4Net = "100.64.102.2/24".parse().unwrap();
    lab.isp(2)
        .readdress(new, Ipv4Addr::new(100, 64, 102, 1))
        .unwrap();
    let seen = lab.host(0).tcp_whoami(TCP_WHOAMI).unwrap();
    assert_eq!((*seen.ip(), lab.wan_of(*seen.ip())), (new.addr(), Some(2)));
    let routes = out(lab.router(), &["ip", "route", "show", "default"]);
    assert!(
        routes.contains("default via 100.64.102.1 dev wan2 proto dhcp metric 102"),
        "{routes}"
    );
    assert!(!routes.contains("100.64.2.1"), "{routes}");
    let addrs = out(lab.router(), &["ip", "-br", "addr", "show", "dev", "wan2"]);
    assert!(
        addrs.contains("100.64.102.2/24") && !addrs.contains("100.64.2.2"),
        "{addrs}"
    );
    let gw = out(
        lab.isp(2).ns(),
        &["ip", "-br", "addr", "show", "dev", "down"],
    );
    assert!(
        gw.contains("100.64.102.1/24") && !gw.contains("100.64.2.1"),
        "{gw}"
    );
    // ISP 1 is untouched, and ISP 2 can go back.
    lab.plain_routing_via(1).unwrap();
    assert_eq!(tcp_isp(&lab, lab.host(0)).unwrap(), 1);
    lab.isp(2)
        .readdress(
            "100.64.2.2/24".parse().unwrap(),
            Ipv4Addr::new(100, 64, 2, 1),
        )
        .unwrap();
    lab.plain_routing_via(2).unwrap();
    let seen = lab.host(0).tcp_whoami(TCP_WHOAMI).unwrap();
    assert_eq!(*seen.ip(), Ipv4Addr::new(100, 64, 2, 2));
}

#[test]
fn blocked_target_stops_answering() {
    let lab = build(1);
    lab.plain_routing_via(1).unwrap();
    let [alive, dead, _] = PROBE_TARGETS;
    assert_eq!(quick_ping(lab.host(0), dead, 3).received, 3);
    lab.set_target_blocked(dead, true).unwrap();
    assert_eq!(quick_ping(lab.host(0), dead, 3).received, 0);
    assert_eq!(quick_ping(lab.host(0), alive, 3).received, 3);
    lab.set_target_blocked(SERVER, true).unwrap();
    assert!(fails(lab.host(0)), "blocked server refuses TCP");
    lab.set_target_blocked(SERVER, false).unwrap();
    lab.set_target_blocked(dead, false).unwrap();
    assert_eq!(quick_ping(lab.host(0), dead, 3).received, 3);
    assert_eq!(tcp_isp(&lab, lab.host(0)).unwrap(), 1);
}

#[test]
fn wan_interface_can_be_removed_and_restored() {
    let lab = build(2);
    lab.plain_routing_via(1).unwrap();
    lab.isp(1).set_rate(Some(100)).unwrap();
    lab.isp(1).remove_wan_interface().unwrap();
    assert!(lab
        .router()
        .exec(&["ip", "link", "show", "dev", "wan1"])
        .is_err());
    // The kernel falls back to the other DHCP default route.
    assert_eq!(tcp_isp(&lab, lab.host(0)).unwrap(), 2);
    lab.isp(1).restore_wan_interface().unwrap();
    assert_eq!(tcp_isp(&lab, lab.host(0)).unwrap(), 1);
    assert!(out(lab.isp(1).ns(), &["tc", "qdisc", "show", "dev", "down"]).contains("tbf"));
}

#[test]
fn servers_and_processes_in_any_namespace() {
    let lab = build(1);
    let server = lab
        .host(0)
        .tcp_whoami_server(SocketAddrV4::new(lab.host(0).addr(), 0))
        .unwrap();
    let seen = lab.router().tcp_whoami(server.addr()).unwrap();
    assert_eq!(seen.ip(), LAN0_ROUTER);
    drop(server);

    let state = lab.state_dir().join("hello");
    let script = format!(
        "echo started; ip -br link; echo hi > {}; exec sleep 60",
        state.display()
    );
    let proc = lab
        .router()
        .spawn("sh", &["-c", &script], &[("LAB_TEST", "1")])
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || proc
        .output_so_far()
        .stdout
        .contains("wan1")));
    assert!(wait_until(Duration::from_secs(5), || state.exists()));
    proc.signal(libc::SIGTERM).unwrap();
    assert!(
        proc.wait_timeout(Duration::from_secs(5)).is_some(),
        "{}",
        proc.output_so_far()
    );
}

#[test]
fn isps_drop_packets_with_another_isps_source() {
    // Like real ISPs (BCP 38): a reply leaving through the wrong WAN must
    // fail, not silently work, or tests could not tell.
    let lab = build(2);
    let router = lab.router();
    let wan1 = lab.isp(1).router_addr().addr();
    let wan2 = lab.isp(2).router_addr().addr();
    let via2 = |src: Ipv4Addr| {
        router
            .ip(&format!(
                "route replace {SERVER}/32 via {} dev wan2 src {src}",
                lab.isp(2).gateway()
            ))
            .unwrap();
    };
    via2(wan2);
    let seen = router.tcp_whoami(TCP_WHOAMI).expect("own source passes");
    assert_eq!(*seen.ip(), wan2);
    via2(wan1);
    assert!(
        router
            .tcp_whoami_within(TCP_WHOAMI, Duration::from_millis(500))
            .is_err(),
        "ISP 2 forwarded a packet from ISP 1's address"
    );
}

/// The HA pair lab: both routers on the LAN switch and on each ISP's
/// bridge, the sync link between them, and a gateway address (with the
/// public one) that works from whichever router holds it.
#[test]
fn ha_pair_topology_moves_the_gateway_between_routers() {
    let lab = Lab::builder()
        .ha_pair()
        .lan_hosts(2)
        .isps(2)
        .build()
        .expect("lab builds");
    assert!(lab.is_ha_pair());
    assert_eq!(lab.host(1).gateway(), LAN0_ROUTER);
    for k in 0..2 {
        let r = lab.ha_router(k);
        assert_eq!(quick_ping(lab.host(0), ha_lan_addr(k), 2).received, 2);
        assert_eq!(quick_ping(r, ha_sync_addr(1 - k), 2).received, 2);
        for i in 1..=2 {
            assert_eq!(
                lab.isp(i).router_addr().to_string(),
                format!("100.64.{i}.2/24")
            );
            assert_eq!(
                quick_ping(r, lab.isp(i).gateway(), 2).received,
                2,
                "router {k} reaches gateway {i}"
            );
        }
    }
    // No router holds the gateway address yet.
    assert!(fails(lab.host(0)));
    // Router k takes the gateway and ISP 2's public address, as VRRP
    // would (with gratuitous ARP replaced by flushing the neighbours).
    let take = |k: usize, add: bool| {
        let verb = if add { "add" } else { "del" };
        lab.ha_router(k)
            .ip(&format!(
                "addr {verb} {LAN0_ROUTER}/25 dev lan0\naddr {verb} 100.64.2.2/32 dev wan2\nroute {verb} default via 100.64.2.1 dev wan2 metric 10"
            ))
            .unwrap();
        if add {
            lab.ha_router(k)
                .exec(&[
                    "nft",
                    "add table ip t; add chain ip t p { type nat hook postrouting priority srcnat; }; \
                     add rule ip t p oifname \"wan2\" snat to 100.64.2.2",
                ])
                .unwrap();
        } else {
            lab.ha_router(k)
                .exec(&["nft", "delete table ip t"])
                .unwrap();
        }
        lab.host(0)
            .exec(&["ip", "neigh", "flush", "dev", "eth0"])
            .unwrap();
        lab.isp(2)
            .ns()
            .exec(&["ip", "neigh", "flush", "dev", "down"])
            .unwrap();
    };
    for k in 0..2 {
        take(k, true);
        let seen = lab
            .host(0)
            .tcp_whoami(TCP_WHOAMI)
            .expect("through the holder");
        assert_eq!(*seen.ip(), Ipv4Addr::new(100, 64, 2, 2), "via router {k}");
        take(k, false);
        assert!(fails(lab.host(0)));
    }
    // An ISP's carrier loss reaches both routers.
    lab.isp(1).set_carrier(false).unwrap();
    for k in 0..2 {
        let link = out(lab.ha_router(k), &["ip", "link", "show", "dev", "wan1"]);
        assert!(link.contains("NO-CARRIER"), "router {k}: {link}");
    }
    lab.isp(1).set_carrier(true).unwrap();
    // A power cut ends every process of a router.
    let sleeper = lab.ha_router(1).spawn("sleep", &["60"], &[]).unwrap();
    // `ip netns exec` enters the namespace after the spawn returns: wait
    // until the process is in it, or the power cut could miss it.
    let pids = |ns: &Netns| {
        let out = std::process::Command::new("ip")
            .args(["netns", "pids", ns.name()])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.split_whitespace()
            .any(|p| p == sleeper.pid().to_string())
    };
    assert!(wait_until(Duration::from_secs(5), || pids(
        lab.ha_router(1)
    )));
    lab.ha_router(1).kill_all();
    assert!(sleeper.wait_timeout(Duration::from_secs(5)).is_some());
    assert!(lab
        .isp(1)
        .readdress(
            "100.64.101.2/24".parse().unwrap(),
            Ipv4Addr::new(100, 64, 101, 1)
        )
        .is_err());
}

fn build_dual(isps: usize) -> Lab {
    Lab::builder()
        .lan_hosts(1)
        .isps(isps)
        .dual_stack()
        .build()
        .expect("dual-stack lab builds")
}

/// Whether a TCP whoami to the IPv6 server from `host` fails (within a
/// second).
fn fails6(host: &Netns) -> bool {
    host.tcp_whoami_within(TCP_WHOAMI6, Duration::from_secs(1))
        .is_err()
}

/// The dual-stack lab's IPv6 side, as each router kind has it: the WAN
/// addresses (SLAAC from the ISPs' RAs on a DHCP router, static on the
/// others), the RA-learned default routes (DHCP kind only), the LAN's ULA
/// prefix; then plain IPv6 routing with NAT66 through each ISP reaches
/// every IPv6 service and the server sees that ISP's WAN address, while
/// IPv4 works as before. Dropping the lab takes the RA daemons with it.
#[test]
fn dual_stack_routes_ipv6_through_each_isp() {
    let start = Instant::now();
    let lab = build_dual(2);
    println!("dual-stack lab built in {:?}", start.elapsed());
    let name = lab.name().to_string();
    let kind = lab.router_kind();
    let routes = out(lab.router(), &["ip", "-6", "route", "show", "default"]);
    for i in 1..=2 {
        let isp = lab.isp(i);
        let wan = format!("wan{i}");
        let addrs = out(
            lab.router(),
            &["ip", "-6", "-br", "addr", "show", "dev", &wan],
        );
        assert!(
            addrs.contains(&format!("{}/64", isp.router_addr6())),
            "{addrs}"
        );
        assert!(isp.link6().contains(&isp.router_addr6()));
        let ra = format!(
            "default via {} dev {wan} proto ra metric {}",
            isp.gateway6_link_local().unwrap(),
            100 + i
        );
        let accept_ra = lab
            .router()
            .sh(&format!("cat /proc/sys/net/ipv6/conf/{wan}/accept_ra"))
            .unwrap();
        match kind {
            RouterKind::Dhcp => {
                assert!(routes.contains(&ra), "{ra:?} in\n{routes}");
                assert_eq!(accept_ra.trim(), "2", "RAs accepted while forwarding");
            }
            _ => {
                assert!(!routes.contains("proto ra"), "{routes}");
                assert_eq!(accept_ra.trim(), "0");
            }
        }
        assert_eq!(
            quick_ping(lab.router(), isp.gateway6(), 2).received,
            2,
            "router reaches ISP {i}'s IPv6 gateway"
        );
    }
    if kind == RouterKind::Static {
        assert_eq!(
            routes.trim(),
            "",
            "no IPv6 default route on a static router"
        );
    }
    assert_eq!(
        lab.host(0).addr6(),
        "fd00:0:2::10".parse::<std::net::Ipv6Addr>().unwrap()
    );
    assert_eq!(quick_ping(lab.host(0), LAN0_ROUTER6, 2).received, 2);
    // ULA sources are not routed back: nothing works without NAT66.
    assert!(fails6(lab.host(0)));

    let host = lab.host(0);
    for isp in 1..=2 {
        lab.plain_routing_via(isp).unwrap();
        let wan6 = lab.isp(isp).router_addr6();
        let seen = host.tcp_whoami(TCP_WHOAMI6).unwrap();
        assert_eq!((*seen.ip(), lab.wan_of(*seen.ip())), (wan6, Some(isp)));
        let seen = host
            .tcp_whoami(std::net::SocketAddrV6::new(
                SERVER6_2,
                TCP_WHOAMI_PORT,
                0,
                0,
            ))
            .unwrap();
        assert_eq!(*seen.ip(), wan6);
        assert_eq!(*host.udp_whoami(UDP_WHOAMI6).unwrap().ip(), wan6);
        let reply = host.dns_query(DNS6, "probe6.example").unwrap();
        assert_eq!((reply.rcode, reply.name.as_str()), (0, "probe6.example"));
        for target in PROBE_TARGETS6 {
            assert_eq!(
                quick_ping(host, target, 2).received,
                2,
                "{target} via ISP {isp}"
            );
            let seen = host.tcp_whoami(std::net::SocketAddrV6::new(target, TCP_PROBE_PORT, 0, 0));
            // The probe port accepts and closes: connected, empty answer.
            assert!(
                seen.as_ref()
                    .is_err_and(|e| format!("{e:#}").contains("bad whoami answer")),
                "{seen:?}"
            );
        }
        // IPv4 is unchanged beside it.
        assert_eq!(tcp_isp(&lab, host).unwrap(), isp);
        let stream = host.open_stream(STREAM6).unwrap();
        assert_eq!(*stream.source().ip(), wan6);
        assert!(
            wait_until(Duration::from_secs(10), || stream.bytes() > 256 * 1024),
            "IPv6 stream flows"
        );
        assert_eq!(stream.close().end, None);
    }
    lab.clear_plain_routing().unwrap();
    assert!(fails6(lab.host(0)), "no NAT66 without plain routing");
    drop(lab);
    assert_eq!(
        namespaces_of(&name),
        Vec::<String>::new(),
        "no namespace left"
    );
    let dnsmasq = std::process::Command::new("pgrep")
        .args([
            "-f",
            &format!("isp.-dnsmasq.leases.*{name}|{name}.*isp.-dnsmasq"),
        ])
        .output()
        .unwrap();
    assert!(dnsmasq.stdout.is_empty(), "RA daemons gone");
}

/// BCP 38 for IPv6: an ISP forwards from the router only sources in its
/// link /64 or its delegated prefix.
#[test]
fn isps_drop_ipv6_packets_with_another_isps_source() {
    let lab = build_dual(2);
    let router = lab.router();
    let (isp1, isp2) = (lab.isp(1), lab.isp(2));
    // Addresses of each delegated prefix on the router (as NPT would use).
    let (del1, del2) = (
        in_net(isp1.delegation6(), 0x10),
        in_net(isp2.delegation6(), 0x10),
    );
    router
        .ip(&format!(
            "addr add {del1}/128 dev lo\naddr add {del2}/128 dev lo"
        ))
        .unwrap();
    let via2 = |src: std::net::Ipv6Addr| {
        router
            .ip(&format!(
                "route replace {SERVER6}/128 via {} dev wan2 src {src}",
                isp2.gateway6()
            ))
            .unwrap();
    };
    let from = |src: std::net::Ipv6Addr| router.tcp_whoami_from(TCP_WHOAMI6, src.into());
    via2(isp2.router_addr6());
    assert_eq!(
        *router.tcp_whoami(TCP_WHOAMI6).unwrap().ip(),
        isp2.router_addr6()
    );
    assert_eq!(
        *from(del2).unwrap().ip(),
        del2,
        "the delegated prefix passes"
    );
    for foreign in [isp1.router_addr6(), del1, LAN0_ROUTER6] {
        via2(foreign);
        assert!(
            router
                .tcp_whoami_within(TCP_WHOAMI6, Duration::from_millis(500))
                .is_err(),
            "ISP 2 forwarded a packet from {foreign}"
        );
    }
}

/// The IPv6-only blackhole drops the ISP's forwarded IPv6 and nothing
/// else; the full blackhole drops both families.
#[test]
fn ipv6_blackhole_leaves_ipv4_working() {
    let lab = build_dual(1);
    lab.plain_routing_via(1).unwrap();
    let (isp, host) = (lab.isp(1), lab.host(0));
    isp.set_blackhole6(true).unwrap();
    assert!(fails6(host));
    assert_eq!(tcp_isp(&lab, host).unwrap(), 1, "IPv4 still works");
    assert_eq!(
        quick_ping(lab.router(), isp.gateway6(), 2).received,
        2,
        "gateway answers"
    );
    isp.set_blackhole6(false).unwrap();
    assert!(host.tcp_whoami(TCP_WHOAMI6).is_ok());
    isp.set_blackhole(true).unwrap();
    assert!(fails6(host) && fails(host));
    isp.set_blackhole(false).unwrap();
    assert!(host.tcp_whoami(TCP_WHOAMI6).is_ok());
    lab.set_target_blocked(SERVER6, true).unwrap();
    assert!(fails6(host));
    assert!(tcp_isp(&lab, host).is_ok(), "IPv4 server still answers");
    lab.set_target_blocked(SERVER6, false).unwrap();
    assert!(host.tcp_whoami(TCP_WHOAMI6).is_ok());
}

/// Renumbering: a new delegated prefix is routed (and the old one not),
/// and a new link prefix reaches the router by RA (DHCP kind) so NAT66
/// uses the new WAN address at once.
#[test]
fn ipv6_delegation_and_link_renumber() {
    let lab = build_dual(1);
    let (isp, router) = (lab.isp(1), lab.router());
    let old = in_net(isp.delegation6(), 0x10);
    let new = in_net(other_delegation6(1), 0x10);
    router
        .ip(&format!("addr add {old}/128 dev lo\naddr add {new}/128 dev lo\nroute replace ::/0 via {} dev wan1 metric 1", isp.gateway6()))
        .unwrap();
    let from = |src: std::net::Ipv6Addr| router.tcp_whoami_from(TCP_WHOAMI6, src.into());
    assert_eq!(*from(old).unwrap().ip(), old);
    assert!(from(new).is_err(), "not delegated yet");
    isp.renumber_delegation6(other_delegation6(1)).unwrap();
    assert_eq!(isp.delegation6(), other_delegation6(1));
    assert_eq!(*from(new).unwrap().ip(), new);
    assert!(from(old).is_err(), "the old prefix is no longer routed");
    assert_eq!(lab.wan_of(new), Some(1));
    assert_eq!(lab.wan_of(old), Some(1), "earlier prefixes still map");

    lab.plain_routing_via(1).unwrap();
    let before = isp.router_addr6();
    isp.renumber_link6(other_link6(1)).unwrap();
    let after = isp.router_addr6();
    assert!(other_link6(1).contains(&after) && after != before);
    // The old address is gone or deprecated (RAs announce the old prefix
    // with a zero preferred lifetime): never a new connection's source.
    let wan1 = out(router, &["ip", "-6", "-o", "addr", "show", "dev", "wan1"]);
    assert!(
        wan1.lines()
            .filter(|l| l.contains(&format!("{before}/64")))
            .all(|l| l.contains("deprecated")),
        "{wan1}"
    );
    let seen = lab.host(0).tcp_whoami(TCP_WHOAMI6).unwrap();
    assert_eq!((*seen.ip(), lab.wan_of(*seen.ip())), (after, Some(1)));
    // The delegation follows the router's new address (without the
    // masquerade, which would hide the source).
    lab.clear_plain_routing().unwrap();
    assert_eq!(*from(new).unwrap().ip(), new);
}

/// Extra (temporary-like) addresses of a LAN host are usable as sources
/// and do not change its default source address.
#[test]
fn lan_hosts_get_extra_ipv6_addresses() {
    let lab = build_dual(1);
    let server = lab
        .router()
        .tcp_whoami_server(std::net::SocketAddrV6::new(LAN0_ROUTER6, 9000, 0, 0))
        .unwrap();
    let host = lab.host(0);
    let temp = in_net(LAN0_6, 0x1234_5678_9abc_def0);
    lab.add_host_addr6(0, temp).unwrap();
    let seen = host.tcp_whoami(server.addr()).unwrap();
    assert_eq!(seen.ip(), std::net::IpAddr::from(host.addr6()));
    let seen = host.tcp_whoami_from(server.addr(), temp.into()).unwrap();
    assert_eq!(seen.ip(), std::net::IpAddr::from(temp));
    assert!(
        lab.add_host_addr6(0, SERVER6).is_err(),
        "outside the LAN prefix"
    );
}
