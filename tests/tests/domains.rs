//! End-to-end proof of rules by domain name (issue 12): a real resolver
//! (dnsmasq) in the internet namespace, LAN hosts asking it through the
//! router, and connections made the moment the answer arrives. mwan's relay
//! must have written the answer's addresses into the datapath before the
//! client got them: every connection to a name of the rule leaves through
//! the rule's WAN, none through another.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::{Duration, Instant};

use lab::mwan::{config_with, shares, wan6, Mwan};
use lab::*;

const UP: Duration = Duration::from_secs(5);
/// dnsmasq's address in the internet namespace.
const RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 54);
/// What `*.gov.example` resolves to.
const GOV: [Ipv4Addr; 4] = [
    Ipv4Addr::new(203, 0, 113, 100),
    Ipv4Addr::new(203, 0, 113, 101),
    Ipv4Addr::new(203, 0, 113, 102),
    Ipv4Addr::new(203, 0, 113, 103),
];
/// What `*.tcponly.example` resolves to (asked over TCP only).
const GOV_TCP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 104);
/// What `*.other.example` resolves to (no rule lists it).
const OTHER: [Ipv4Addr; 2] = [
    Ipv4Addr::new(203, 0, 113, 110),
    Ipv4Addr::new(203, 0, 113, 111),
];
/// `portal.example` is a CNAME of `edge.cdn.example`, which has this address.
const CDN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 120);

/// dnsmasq's IPv6 address (dual-stack labs).
const RESOLVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x54);
/// What `*.gov.example` resolves to over AAAA (dual-stack labs).
const GOV6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x100),
    Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x101),
];
/// What `*.other.example` resolves to over AAAA.
const OTHER6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x110),
    Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x111),
];
/// The AAAA record of `edge.cdn.example`.
const CDN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x120);

/// The zone asked of resolver `k` of [`SERVERS`] (dual-stack labs): its
/// names have addresses of their own (see [`zone_addrs`]), so each
/// resolver's path is proven by its own first connection, not by
/// addresses another one taught.
fn zone(k: usize) -> String {
    format!("s{k}.gov.example")
}

/// The A and AAAA records of [`zone`]`(k)`, and the A record of
/// `s{k}.tcponly.example` (asked over TCP only).
fn zone_addrs(k: usize) -> (Ipv4Addr, Ipv6Addr, Ipv4Addr) {
    let k = k as u8;
    (
        Ipv4Addr::new(203, 0, 113, 130 + k),
        Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x130 + u16::from(k)),
        Ipv4Addr::new(203, 0, 113, 140 + k),
    )
}

const RULES: &str = r#"
[[rule]]
name = "gov"
domains = ["gov.example", "cdn.example", "tcponly.example"]
wans = ["isp2", "isp1"]
"#;

/// dnsmasq answering from its own records only, in the foreground (the lab
/// kills it with the namespace), plus TCP whoami servers on every address
/// it gives. In a dual-stack lab it also listens on [`RESOLVER6`] and has
/// AAAA records ([`GOV6`], [`OTHER6`], [`CDN6`]).
fn resolver(lab: &Lab, ttl: u32) -> (Proc, Vec<ServerHandle>) {
    let v4 = [RESOLVER]
        .iter()
        .chain(&GOV)
        .chain(&[GOV_TCP])
        .chain(&OTHER)
        .chain(&[CDN])
        .map(|a| IpAddr::from(*a));
    let v6: Vec<IpAddr> = if lab.is_dual_stack() {
        [RESOLVER6]
            .iter()
            .chain(&GOV6)
            .chain(&OTHER6)
            .chain(&[CDN6])
            .map(|a| IpAddr::from(*a))
            .chain((0..SERVERS.len()).flat_map(|k| {
                let (a, aaaa, tcp) = zone_addrs(k);
                [a.into(), aaaa.into(), tcp.into()]
            }))
            .collect()
    } else {
        vec![]
    };
    let resolvers = [IpAddr::from(RESOLVER), RESOLVER6.into()];
    let all: Vec<IpAddr> = v4.chain(v6.iter().copied()).collect();
    let cmds: String = all
        .iter()
        .map(|a| format!("addr add {a}/32 dev lo\n"))
        .collect();
    lab.inet().ip(&cmds).unwrap();
    let servers = all
        .iter()
        .filter(|a| !resolvers.contains(a))
        .map(|a| {
            lab.inet()
                .tcp_whoami_server(SocketAddr::new(*a, TCP_WHOAMI_PORT))
                .unwrap()
        })
        .collect();
    let mut args: Vec<String> = [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--port=53",
        "--pid-file=",
        "--cache-size=0",
        "--cname=portal.example,edge.cdn.example",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if v6.is_empty() {
        args.push(format!("--host-record=edge.cdn.example,{CDN}"));
    } else {
        args.push(format!("--host-record=edge.cdn.example,{CDN},{CDN6}"));
        args.push(format!("--listen-address={RESOLVER6}"));
        args.extend(GOV6.iter().map(|a| format!("--address=/gov.example/{a}")));
        args.extend(
            OTHER6
                .iter()
                .map(|a| format!("--address=/other.example/{a}")),
        );
        for k in 0..SERVERS.len() {
            let (a, aaaa, tcp) = zone_addrs(k);
            args.push(format!("--address=/{}/{a}", zone(k)));
            args.push(format!("--address=/{}/{aaaa}", zone(k)));
            args.push(format!("--address=/s{k}.tcponly.example/{tcp}"));
        }
    }
    args.push(format!("--listen-address={RESOLVER}"));
    args.push(format!("--local-ttl={ttl}"));
    args.extend(GOV.iter().map(|a| format!("--address=/gov.example/{a}")));
    args.push(format!("--address=/tcponly.example/{GOV_TCP}"));
    args.extend(
        OTHER
            .iter()
            .map(|a| format!("--address=/other.example/{a}")),
    );
    let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let proc = lab.inet().spawn("dnsmasq", &argv, &[]).unwrap();
    // Ready when it answers (asked from its own namespace).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match lab
            .inet()
            .dns_lookup(SocketAddrV4::new(RESOLVER, 53), "ready.gov.example")
        {
            Ok(a) => {
                assert_eq!(a.len(), GOV.len(), "{a:?}");
                break;
            }
            Err(e) if Instant::now() > deadline => {
                panic!("dnsmasq does not answer: {e:#}\n{}", proc.output_so_far())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    if !v6.is_empty() {
        let ready = wait_until(Duration::from_secs(5), || {
            lab.inet()
                .dns_lookup6(SocketAddrV6::new(RESOLVER6, 53, 0, 0), "ready.gov.example")
                .is_ok_and(|a| a.len() == GOV6.len())
        });
        assert!(
            ready,
            "dnsmasq does not answer AAAA over IPv6\n{}",
            proc.output_so_far()
        );
    }
    (proc, servers)
}

/// A resolver on the router, as on most home and office routers: dnsmasq
/// on the LAN interface, forwarding to [`resolver`] (with its cache, as
/// configured in the field), in the foreground.
fn router_resolver(lab: &Lab) -> Proc {
    let server = format!("--server={RESOLVER}");
    let proc = lab
        .router()
        .spawn(
            "dnsmasq",
            &[
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--port=53",
                "--pid-file=",
                // As a router's resolver is usually set up: the LAN
                // interface only, queries from local subnets only (the
                // relay asks from the router's LAN address, over `lo`).
                "--interface=lan0",
                "--local-service",
                &server,
                // Its readiness is asked of it alone: a router with static
                // WANs has no route to the internet's resolver before mwan.
                "--address=/ready.router.example/192.0.2.53",
            ],
            &[],
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = lab
        .router()
        .dns_lookup(SocketAddrV4::new(LAN0_ROUTER, 53), "ready.router.example")
    {
        assert!(
            Instant::now() < deadline,
            "the router's dnsmasq does not answer: {e:#}\n{}",
            proc.output_so_far()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    proc
}

/// Resolves `name` from LAN host 0 through the router, connects at once to
/// the `pick`-th address of the answer, and returns the ISP it left by.
fn lookup_and_connect(lab: &Lab, name: &str, pick: usize) -> (Ipv4Addr, usize) {
    lookup_and_connect_via(lab, RESOLVER, name, pick)
}

/// [`lookup_and_connect`], asking the resolver at `server` (over IPv4 or
/// IPv6).
fn lookup_and_connect_via(
    lab: &Lab,
    server: impl Into<IpAddr>,
    name: &str,
    pick: usize,
) -> (Ipv4Addr, usize) {
    let server = server.into();
    let addrs = lab
        .host(0)
        .dns_lookup(SocketAddr::new(server, 53), name)
        .unwrap_or_else(|e| panic!("looking up {name} at {server}: {e:#}"));
    let addr = addrs[pick % addrs.len()];
    let seen = lab
        .host(0)
        .tcp_whoami(SocketAddrV4::new(addr, TCP_WHOAMI_PORT))
        .unwrap_or_else(|e| panic!("connecting to {addr} ({name}): {e:#}"));
    let isp = lab
        .wan_of(*seen.ip())
        .unwrap_or_else(|| panic!("{addr} saw {seen}, not a WAN address"));
    (addr, isp)
}

/// Resolves `name` (AAAA) from LAN host 0 at `server` (over IPv4 or IPv6),
/// connects over IPv6 at once to the `pick`-th address of the answer, and
/// returns it with the source the server saw.
fn lookup6_and_connect(
    lab: &Lab,
    server: impl Into<IpAddr>,
    name: &str,
    pick: usize,
) -> (Ipv6Addr, SocketAddrV6) {
    let server = SocketAddr::new(server.into(), 53);
    let addrs = lab
        .host(0)
        .dns_lookup6(server, name)
        .unwrap_or_else(|e| panic!("looking up AAAA {name} at {server}: {e:#}"));
    let addr = addrs[pick % addrs.len()];
    let seen = lab
        .host(0)
        .tcp_whoami(SocketAddrV6::new(addr, TCP_WHOAMI_PORT, 0, 0))
        .unwrap_or_else(|e| panic!("connecting to {addr} ({name}): {e:#}"));
    (addr, seen)
}

/// A 2-ISP dual-stack lab, both WANs with NAT66, the internet's resolver
/// and the router's; mwan running with [`RULES`], both families up.
fn dual_stack_lab() -> Lab {
    Lab::builder()
        .lan_hosts(1)
        .isps(2)
        .dual_stack()
        .build()
        .expect("dual-stack lab builds")
}

fn dual_stack_config(lab: &Lab) -> String {
    config_with(lab, "", &|i| wan6(lab, i, "nat"), RULES)
}

/// Every resolver a LAN client of the dual-stack lab may ask: the
/// internet's and the router's, each over IPv4 and IPv6.
const SERVERS: [IpAddr; 4] = [
    IpAddr::V4(RESOLVER),
    IpAddr::V4(LAN0_ROUTER),
    IpAddr::V6(RESOLVER6),
    IpAddr::V6(LAN0_ROUTER6),
];

/// `count` names `{prefix}{i}.tcponly.example`, looked up over TCP at
/// `resolver` (only a TCP answer gives their address, [`GOV_TCP`]), each
/// followed by a connection: every one leaves through ISP 2.
fn tcp_lookups_steer(lab: &Lab, resolver: Ipv4Addr, prefix: &str, count: usize) {
    for i in 0..count {
        let name = format!("{prefix}{i}.tcponly.example");
        let addrs = lab
            .host(0)
            .dns_lookup_tcp(SocketAddrV4::new(resolver, 53), &name)
            .unwrap_or_else(|e| panic!("looking up {name} over TCP: {e:#}"));
        assert_eq!(addrs, [GOV_TCP]);
        let seen = lab
            .host(0)
            .tcp_whoami(SocketAddrV4::new(GOV_TCP, TCP_WHOAMI_PORT))
            .unwrap();
        assert_eq!(lab.wan_of(*seen.ip()), Some(2), "{name} over TCP");
    }
}

#[test]
fn names_of_a_rule_leave_through_its_wan_from_the_first_connection() {
    let lab = Lab::builder().lan_hosts(1).isps(2).build().unwrap();
    let (_dnsmasq, _servers) = resolver(&lab, 300);
    let mut mwan = Mwan::start(&lab, &config_with(&lab, "", &|_| String::new(), RULES)).unwrap();
    mwan.wait_all_up(UP).unwrap();
    assert!(mwan.status().relay.is_some(), "no relay:\n{}", mwan.log());

    // 1000 distinct names of the rule, each connection made the moment its
    // answer arrived: all through ISP 2.
    let t = Instant::now();
    let mut wrong = Vec::new();
    for i in 0..1000 {
        let (addr, isp) = lookup_and_connect(&lab, &format!("h{i}.gov.example"), i);
        if isp != 2 {
            wrong.push((i, addr, isp));
        }
    }
    println!(
        "1000 lookups + connections under gov.example in {:?}",
        t.elapsed()
    );
    assert!(
        wrong.is_empty(),
        "{} left by another ISP: {wrong:?}",
        wrong.len()
    );

    // Over TCP: 100 names whose address no UDP answer gave.
    tcp_lookups_steer(&lab, RESOLVER, "t", 100);

    // 1000 names no rule lists: balanced.
    let seen: Vec<SocketAddrV4> = (0..1000)
        .map(|i| {
            let (_, isp) = lookup_and_connect(&lab, &format!("h{i}.other.example"), i);
            SocketAddrV4::new(lab.isp(isp).router_addr().addr(), 0)
        })
        .collect();
    let s = shares(&lab, &seen);
    println!("other.example shares: {s:?}");
    assert!(
        s.len() == 2 && s.values().all(|v| (0.3..0.7).contains(v)),
        "{s:?}"
    );

    // A CNAME chain: portal.example (not listed) -> edge.cdn.example.
    let (addr, isp) = lookup_and_connect(&lab, "portal.example", 0);
    assert_eq!((addr, isp), (CDN, 2));

    // `mwan domains`: what was learned, by name, with the time left (the
    // answers' TTL is 300 s, plus 30 s of grace).
    let json = mwan
        .cli_ok(&["domains", "--json", "--name", "gov.example"])
        .unwrap();
    let entries: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(entries.len(), GOV.len(), "{json}");
    for e in &entries {
        let addr: Ipv4Addr = e["address"].as_str().unwrap().parse().unwrap();
        assert!(GOV.contains(&addr), "{e}");
        assert!(e["name"].as_str().unwrap().ends_with(".gov.example"), "{e}");
        assert_eq!(e["rules"][0]["rule"], "gov", "{e}");
        let left = e["rules"][0]["expires_in_secs"].as_f64().unwrap();
        assert!((300.0..=330.0).contains(&left), "{e}");
    }
    let text = mwan.cli_ok(&["domains"]).unwrap();
    assert!(
        text.starts_with("NAME")
            && text.contains("portal.example")
            && text.contains("203.0.113.120"),
        "{text}"
    );
    assert!(
        !text.contains("other.example") && text.contains("tcponly.example"),
        "{text}"
    );

    // A reload that changes the rule's names starts learning afresh: what
    // was learned for the old names is forgotten, the new names steer.
    std::fs::write(
        &mwan.config,
        config_with(
            &lab,
            "",
            &|_| String::new(),
            &RULES.replace("\"tcponly.example\"", "\"other.example\""),
        ),
    )
    .unwrap();
    let msg = mwan.cli_ok(&["reload"]).unwrap();
    assert!(msg.contains("rules changed"), "{msg}");
    let json = mwan.cli_ok(&["domains", "--json"]).unwrap();
    assert_eq!(json.trim(), "[]", "learned before the reload: {json}");
    for i in 0..50 {
        let (addr, isp) = lookup_and_connect(&lab, &format!("r{i}.other.example"), i);
        assert_eq!(isp, 2, "{addr} after the reload");
    }

    // The rule's WAN dies: the next WAN of its list takes its names.
    lab.isp(2).set_blackhole(true).unwrap();
    mwan.wait_state("isp2", "down", Duration::from_secs(3))
        .unwrap();
    for i in 0..20 {
        let (addr, isp) = lookup_and_connect(&lab, &format!("after{i}.gov.example"), i);
        assert_eq!(isp, 1, "{addr} after ISP 2 died");
    }
    lab.isp(2).set_blackhole(false).unwrap();

    // `mwan stop` leaves the datapath forwarding, but not the DNS divert:
    // with no relay, the LAN's queries must still be answered.
    mwan.cli_ok(&["stop"]).unwrap();
    let proc = mwan.forget().expect("daemon process");
    assert!(
        proc.wait_timeout(Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "{}",
        proc.output_so_far()
    );
    let nft = lab
        .router()
        .exec(&["nft", "list", "table", "inet", "mwan"])
        .unwrap();
    let nft = String::from_utf8_lossy(&nft.stdout);
    assert!(
        !nft.contains("dns_divert") && nft.contains("postrouting"),
        "{nft}"
    );
    lab.host(0)
        .dns_lookup(SocketAddrV4::new(RESOLVER, 53), "stopped.gov.example")
        .unwrap();
}

/// An address lives for the answer's TTL, at least `domain_ttl_floor`,
/// plus `domain_ttl_grace` (here 1 s each, TTL 1 s): then new connections
/// to it are balanced again, while `mwan domains` shows it no more.
#[test]
fn a_learned_address_expires_after_its_ttl_and_grace() {
    let lab = Lab::builder().lan_hosts(1).isps(2).build().unwrap();
    let (_dnsmasq, _servers) = resolver(&lab, 1);
    let top = "domain_ttl_floor = \"1s\"\ndomain_ttl_grace = \"1s\"";
    let mwan = Mwan::start(&lab, &config_with(&lab, top, &|_| String::new(), RULES)).unwrap();
    mwan.wait_all_up(UP).unwrap();
    let (addr, isp) = lookup_and_connect(&lab, "soon.gov.example", 0);
    assert_eq!(isp, 2);
    let learned_at = Instant::now();
    let json = mwan.cli_ok(&["domains", "--json"]).unwrap();
    assert!(json.contains(&addr.to_string()), "{json}");
    // Gone from the table within the 2 s life and the 1 s expiry tick.
    let deadline = learned_at + Duration::from_secs(5);
    loop {
        let json = mwan.cli_ok(&["domains", "--json"]).unwrap();
        if json.trim() == "[]" {
            break;
        }
        assert!(Instant::now() < deadline, "still learned after 5 s: {json}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        learned_at.elapsed() >= Duration::from_secs(2),
        "expired before TTL + grace"
    );
    // New connections to it (no new lookup) are balanced.
    let seen: Vec<SocketAddrV4> =
        many_tcp_whoami(lab.host(0), SocketAddrV4::new(addr, TCP_WHOAMI_PORT), 60, 4)
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
    let s = shares(&lab, &seen);
    assert_eq!(s.len(), 2, "{s:?}");
}

/// The LAN asks the router's own resolver (dnsmasq on the router's LAN
/// address, forwarding to the internet's): the relay is between the client
/// and it, so every name of the rule is steered from its first connection,
/// over UDP and TCP, and other names are balanced.
#[test]
fn names_asked_of_the_routers_own_resolver_are_steered() {
    let lab = Lab::builder().lan_hosts(1).isps(2).build().unwrap();
    let (_dnsmasq, _servers) = resolver(&lab, 300);
    let _local = router_resolver(&lab);
    let mwan = Mwan::start(&lab, &config_with(&lab, "", &|_| String::new(), RULES)).unwrap();
    mwan.wait_all_up(UP).unwrap();

    let t = Instant::now();
    let wrong: Vec<_> = (0..1000)
        .map(|i| lookup_and_connect_via(&lab, LAN0_ROUTER, &format!("l{i}.gov.example"), i))
        .filter(|(_, isp)| *isp != 2)
        .collect();
    println!(
        "1000 lookups at the router's resolver + connections in {:?}",
        t.elapsed()
    );
    assert!(
        wrong.is_empty(),
        "{} left by another ISP: {wrong:?}",
        wrong.len()
    );

    // Over TCP, names whose address no UDP answer gave.
    tcp_lookups_steer(&lab, LAN0_ROUTER, "lt", 20);

    // A CNAME chain through the router's cache.
    let (addr, isp) = lookup_and_connect_via(&lab, LAN0_ROUTER, "portal.example", 0);
    assert_eq!((addr, isp), (CDN, 2));

    let seen: Vec<SocketAddrV4> = (0..400)
        .map(|i| {
            let (_, isp) =
                lookup_and_connect_via(&lab, LAN0_ROUTER, &format!("l{i}.other.example"), i);
            SocketAddrV4::new(lab.isp(isp).router_addr().addr(), 0)
        })
        .collect();
    let s = shares(&lab, &seen);
    println!("other.example shares (router's resolver): {s:?}");
    assert!(
        s.len() == 2 && s.values().all(|v| (0.3..0.7).contains(v)),
        "{s:?}"
    );
}

/// AAAA answers steer IPv6 (dual stack, NAT66 on both WANs): names of the
/// rule answered with AAAA records, asked over IPv4 or IPv6, of the
/// internet's resolver or the router's, each followed at once by an IPv6
/// connection, all leave through ISP 2 from the first connection; so does
/// an IPv6 address at the end of a CNAME chain, and an A answer asked over
/// IPv6 TCP. Names no rule lists are balanced.
#[test]
fn aaaa_answers_and_dns_over_ipv6_steer_from_the_first_connection() {
    let lab = dual_stack_lab();
    let (_dnsmasq, _servers) = resolver(&lab, 300);
    let _local = router_resolver(&lab);
    let mwan = Mwan::start(&lab, &dual_stack_config(&lab)).unwrap();
    mwan.wait_all_up(UP).unwrap();
    mwan.wait_all_up6(UP).unwrap();

    // Per resolver and transport, 200 distinct names, AAAA, each IPv6
    // connection made the moment its answer arrived; then 50 A lookups,
    // each IPv4 connection at once: all through ISP 2.
    let t = Instant::now();
    let mut wrong = Vec::new();
    for (k, server) in SERVERS.into_iter().enumerate() {
        let (a, aaaa, _) = zone_addrs(k);
        for i in 0..200 {
            let name = format!("v6-{i}.{}", zone(k));
            let (addr, seen) = lookup6_and_connect(&lab, server, &name, i);
            assert_eq!(addr, aaaa);
            let isp = lab.wan_of(*seen.ip()).unwrap_or(0);
            if isp != 2 {
                wrong.push((server, name, IpAddr::from(addr), isp));
            }
        }
        for i in 0..50 {
            let name = format!("v4-{i}.{}", zone(k));
            let (addr, isp) = lookup_and_connect_via(&lab, server, &name, i);
            assert_eq!(addr, a);
            if isp != 2 {
                wrong.push((server, name, addr.into(), isp));
            }
        }
    }
    println!(
        "4 x (200 AAAA + 50 A) lookups + connections in {:?}",
        t.elapsed()
    );
    assert!(
        wrong.is_empty(),
        "{} left by another ISP: {wrong:?}",
        wrong.len()
    );

    // A CNAME chain: portal.example (not listed) -> edge.cdn.example.
    let (addr, seen) = lookup6_and_connect(&lab, RESOLVER6, "portal.example", 0);
    assert_eq!((addr, lab.wan_of(*seen.ip())), (CDN6, Some(2)));

    // Over TCP on IPv6, names whose address no UDP answer gave.
    for (k, server) in SERVERS.into_iter().enumerate().filter(|(_, s)| s.is_ipv6()) {
        let (_, _, tcp) = zone_addrs(k);
        for i in 0..20 {
            let name = format!("t{i}.s{k}.tcponly.example");
            let addrs = lab
                .host(0)
                .dns_lookup_tcp(SocketAddr::new(server, 53), &name)
                .unwrap_or_else(|e| panic!("looking up {name} over TCP at {server}: {e:#}"));
            assert_eq!(addrs, [tcp]);
            let seen = lab
                .host(0)
                .tcp_whoami(SocketAddrV4::new(tcp, TCP_WHOAMI_PORT))
                .unwrap();
            assert_eq!(
                lab.wan_of(*seen.ip()),
                Some(2),
                "{name} over TCP at {server}"
            );
        }
    }

    // `mwan domains` lists the IPv6 addresses learned.
    let json = mwan
        .cli_ok(&["domains", "--json", "--name", "gov.example"])
        .unwrap();
    let entries: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let learned: Vec<IpAddr> = entries
        .iter()
        .map(|e| e["address"].as_str().unwrap().parse().unwrap())
        .collect();
    for k in 0..SERVERS.len() {
        let aaaa = zone_addrs(k).1;
        assert!(learned.contains(&aaaa.into()), "{aaaa} not in {json}");
    }

    // 400 names no rule lists, AAAA over IPv6: balanced.
    let seen: Vec<SocketAddrV6> = (0..400)
        .map(|i| {
            let server = [RESOLVER6, LAN0_ROUTER6][i % 2];
            lookup6_and_connect(&lab, server, &format!("v6-{i}.other.example"), i).1
        })
        .collect();
    let s = shares(&lab, &seen);
    println!("other.example IPv6 shares: {s:?}");
    assert!(
        s.len() == 2 && s.values().all(|v| (0.3..0.7).contains(v)),
        "{s:?}"
    );
}

/// The divert fails open: with the daemon killed (SIGKILL, no cleanup; its
/// nftables table stays), the LAN's lookups (A and AAAA) are answered at
/// once, by the internet's resolver and by the router's, over IPv4 and
/// IPv6, UDP and TCP: the divert's
/// `tproxy` finds no relay socket and lets them pass. Once a daemon runs
/// again, names are steered again, also for a client whose query flow the
/// dead relay had diverted (its conntrack entry is forgotten at the start).
#[test]
fn dns_keeps_working_while_the_daemon_is_dead() {
    let lab = dual_stack_lab();
    let (_dnsmasq, _servers) = resolver(&lab, 300);
    let _local = router_resolver(&lab);
    let mut mwan = Mwan::start(&lab, &dual_stack_config(&lab)).unwrap();
    mwan.wait_all_up(UP).unwrap();
    mwan.wait_all_up6(UP).unwrap();
    for (k, server) in SERVERS.into_iter().enumerate() {
        let name = format!("before.{}", zone(k));
        let (_, isp) = lookup_and_connect_via(&lab, server, &name, 0);
        assert_eq!(isp, 2, "steered before the kill ({server})");
    }
    // A client that always asks from the same source port: its conntrack
    // entry, diverted to the relay that is about to die, must not outlive
    // the next daemon's start.
    let fixed = lab
        .host(0)
        .udp_flow(SocketAddrV4::new(RESOLVER, 53))
        .unwrap();
    fixed.dns_lookup("fixed-before.gov.example").unwrap();
    let fixed6 = lab
        .host(0)
        .udp_flow(SocketAddrV6::new(RESOLVER6, 53, 0, 0))
        .unwrap();
    fixed6.dns_lookup("fixed6-before.gov.example").unwrap();

    let proc = mwan.forget().expect("daemon process");
    proc.signal(libc::SIGKILL).unwrap();
    assert!(
        proc.wait_timeout(Duration::from_secs(5)).is_some(),
        "mwan survived SIGKILL"
    );
    let nft = lab
        .router()
        .exec(&["nft", "list", "chain", "inet", "mwan", "dns_divert"])
        .unwrap();
    let divert = String::from_utf8_lossy(&nft.stdout);
    assert!(
        divert.contains("tproxy ip to") && divert.contains("tproxy ip6 to"),
        "the divert is gone, nothing to test: {nft:?}"
    );
    // The fixed-port clients' next queries share their 5-tuples with the
    // diverted ones just answered: they must not meet those conntrack
    // entries, which still point at the dead relay.
    fixed
        .dns_lookup("fixed-dead.gov.example")
        .expect("the fixed-port client with mwan dead");
    fixed6
        .dns_lookup("fixed6-dead.gov.example")
        .expect("the fixed-port IPv6 client with mwan dead");
    // Answered on the first try: a lost query would be retried by the
    // client only after a third of its 3 s timeout.
    for i in 0..50 {
        for server in SERVERS {
            let name = format!("dead{i}.gov.example");
            let server = SocketAddr::new(server, 53);
            let t = Instant::now();
            let addrs = lab
                .host(0)
                .dns_lookup(server, &name)
                .unwrap_or_else(|e| panic!("{name} at {server} with mwan dead: {e:#}"));
            assert!(GOV.contains(&addrs[0]), "{addrs:?}");
            let addrs = lab
                .host(0)
                .dns_lookup6(server, &name)
                .unwrap_or_else(|e| panic!("AAAA {name} at {server} with mwan dead: {e:#}"));
            assert!(GOV6.contains(&addrs[0]), "{addrs:?}");
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "{name} (A and AAAA) at {server} took {:?}",
                t.elapsed()
            );
        }
    }
    for server in SERVERS {
        let addrs = lab
            .host(0)
            .dns_lookup_tcp(SocketAddr::new(server, 53), "dead.tcponly.example")
            .unwrap_or_else(|e| panic!("TCP lookup at {server} with mwan dead: {e:#}"));
        assert_eq!(addrs, [GOV_TCP]);
    }

    mwan.launch(&[]).unwrap();
    mwan.wait_all_up(UP).unwrap();
    mwan.wait_all_up6(UP).unwrap();
    let addrs = fixed
        .dns_lookup("fixed-after.gov.example")
        .expect("the fixed-port client after the restart");
    let seen = lab
        .host(0)
        .tcp_whoami(SocketAddrV4::new(addrs[0], TCP_WHOAMI_PORT))
        .unwrap();
    assert_eq!(lab.wan_of(*seen.ip()), Some(2), "the fixed-port client");
    // Each resolver's own zone: its first connection proves its path.
    for i in 0..50 {
        for (k, server) in SERVERS.into_iter().enumerate() {
            let name = format!("again{i}.{}", zone(k));
            let (addr, isp) = lookup_and_connect_via(&lab, server, &name, i);
            assert_eq!(isp, 2, "{name} ({addr}) at {server} after the restart");
            let (addr, seen) = lookup6_and_connect(&lab, server, &name, i);
            assert_eq!(
                lab.wan_of(*seen.ip()),
                Some(2),
                "AAAA {name} ({addr}) at {server} after the restart"
            );
        }
    }
}

/// One LAN host floods the relay with dnsperf (as fast as answers come,
/// far more queries in flight than the relay holds for one client) while
/// another does paced lookups with dnsperf: the relay refuses the flood's
/// excess at the door, and the other host's lookups keep being answered.
#[test]
fn a_flooding_host_does_not_starve_the_others_lookups() {
    use lab::dnsperf::{self, Load, PERF_RESOLVER};
    dnsperf::check_dnsperf().unwrap();
    let lab = Lab::builder().lan_hosts(2).isps(2).build().unwrap();
    let zones = [("gov.example", GOV[0]), ("other.example", OTHER[0])];
    let _dnsmasq = dnsperf::start_resolver(&lab, &zones).unwrap();
    let names = lab.dir().join("names.txt");
    dnsperf::names_file(&names, 1000, "gov.example", "other.example", 10).unwrap();
    let mwan = Mwan::start(&lab, &config_with(&lab, "", &|_| String::new(), RULES)).unwrap();
    mwan.wait_all_up(UP).unwrap();
    let server = SocketAddrV4::new(PERF_RESOLVER, 53);
    let flood = Load {
        rate: None,
        outstanding: 10_000,
        clients: 32,
        duration: Duration::from_secs(6),
        timeout: Duration::from_secs(1),
    };
    let paced = Load {
        rate: Some(50),
        outstanding: 10,
        clients: 1,
        duration: Duration::from_secs(4),
        timeout: Duration::from_secs(1),
    };
    let flooding = dnsperf::start(lab.host(0), server, &names, &flood).unwrap();
    // The flood is under way (the relay refuses its excess) before the
    // paced lookups start.
    let refusing = wait_until(Duration::from_secs(5), || {
        mwan.log().contains("DNS relay: a client holds")
    });
    assert!(refusing, "the flood was never bounded\n{}", mwan.log());
    let other = dnsperf::start(lab.host(1), server, &names, &paced)
        .unwrap()
        .finish()
        .unwrap();
    let flood = flooding.finish().unwrap();
    println!(
        "flood: {} sent, {:.0} answers/s; paced host: {}/{} answered, median {:.2} ms, p99 {:.2} ms",
        flood.sent,
        flood.qps,
        other.completed,
        other.sent,
        other.latency_percentile(50.0) * 1e3,
        other.latency_percentile(99.0) * 1e3
    );
    assert!(
        flood.sent > 10 * other.sent,
        "no flood: {} sent",
        flood.sent
    );
    // 200 lookups; without the per-client bound the flood holds every
    // place the relay has and most of them are refused.
    assert!(other.sent >= 150, "{} paced lookups sent", other.sent);
    assert!(
        other.success() >= 0.95,
        "{}/{} of the paced lookups answered during the flood",
        other.completed,
        other.sent
    );
}
