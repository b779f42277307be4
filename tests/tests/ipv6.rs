//! End-to-end proof of dual stack (issue 11) in the dual-stack lab: IPv6
//! balanced by weight, connections pinned through reloads, failovers and
//! restarts, per-family health (a silent IPv6 blackhole), per-host
//! stickiness across a host's addresses and both families, NPT, rules by
//! IPv6 destination, renumbering, and the router's own IPv6 traffic.
//!
//! The internet's whoami servers report the source they saw; its prefix
//! names the ISP ([`Lab::wan_of`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddrV6};
use std::thread;
use std::time::{Duration, Instant};

use lab::mwan::{config_with, npt_prefix, shares, wan6, Mwan};
use lab::*;

const UP: Duration = Duration::from_secs(5);
/// New flows avoid a failed WAN this long after the failure, at most.
const FAILOVER: Duration = Duration::from_secs(1);

fn build(hosts: usize) -> Lab {
    Lab::builder()
        .lan_hosts(hosts)
        .isps(2)
        .dual_stack()
        .build()
        .expect("dual-stack lab builds")
}

/// A config with every WAN's IPv6 side in `mode` (`nat`, `npt`), `top`
/// at the top level, `per_wan(i)` added to WAN `i` and `extra` appended.
fn cfg(lab: &Lab, mode: &str, top: &str, per_wan: &dyn Fn(usize) -> String, extra: &str) -> String {
    config_with(
        lab,
        top,
        &|i| format!("{}{}", wan6(lab, i, mode), per_wan(i)),
        extra,
    )
}

fn none(_: usize) -> String {
    String::new()
}

/// Starts mwan and waits until both families work: every WAN up and an
/// IPv6 connection from host 0 through mwan succeeds.
fn start<'l>(lab: &'l Lab, text: &str) -> Mwan<'l> {
    let mwan = Mwan::start(lab, text).expect("mwan starts");
    mwan.wait_all_up(UP).expect("WANs up");
    let ok = wait_until(UP, || {
        lab.host(0)
            .tcp_whoami_within(TCP_WHOAMI6, Duration::from_millis(500))
            .is_ok()
    });
    assert!(ok, "no IPv6 through mwan:\n{}", mwan.log());
    mwan
}

/// The ISP an IPv6 source seen by a server belongs to.
fn isp6(lab: &Lab, seen: SocketAddrV6) -> usize {
    lab.wan_of(*seen.ip())
        .unwrap_or_else(|| panic!("{seen} is no ISP's IPv6 address"))
}

/// New TCP connections to `server` from every LAN host in parallel,
/// `per_host` each; the sources the server saw.
fn connections<A: Endpoint>(lab: &Lab, server: A, per_host: usize) -> Vec<A> {
    thread::scope(|s| {
        let handles: Vec<_> = lab
            .hosts()
            .iter()
            .map(|h| s.spawn(move || many_tcp_whoami(h, server, per_host, 16)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client thread"))
            .map(|r| r.expect("connection through mwan"))
            .collect()
    })
}

/// Asserts each ISP's share of `seen` is within `bound` of its weight
/// share; returns the shares.
fn assert_shares<A: Endpoint>(
    lab: &Lab,
    seen: &[A],
    weights: &[u32],
    bound: f64,
) -> BTreeMap<usize, f64> {
    let got = shares(lab, seen);
    let total: u32 = weights.iter().sum();
    for (i, w) in weights.iter().enumerate() {
        let want = f64::from(*w) / f64::from(total);
        let have = got.get(&(i + 1)).copied().unwrap_or(0.0);
        assert!(
            (have - want).abs() <= bound,
            "ISP {}: {have:.4} of {} connections vs weight share {want:.4} ± {bound:.4} ({got:?})",
            i + 1,
            seen.len()
        );
    }
    assert_eq!(got.get(&0), None, "unknown sources: {got:?}");
    got
}

/// `k` sigma of a binomial share `p` over `n` trials.
fn sigmas(k: f64, p: f64, n: usize) -> f64 {
    k * (p * (1.0 - p) / n as f64).sqrt()
}

/// Asserts the stream is healthy and grows by 256 KiB within 5 s.
fn flowing<A: Endpoint>(stream: &Stream<A>, what: &str) {
    let before = stream.bytes();
    let ok = wait_until(Duration::from_secs(5), || {
        stream.bytes() > before + 256 * 1024
    });
    assert_eq!(stream.end(), None, "stream ended {what}");
    assert!(ok, "stream stalled {what}");
}

/// Opens IPv6 streams from `host` until one is on each ISP (at most 16).
fn streams_on_both(lab: &Lab, host: &Netns) -> (Stream<SocketAddrV6>, Stream<SocketAddrV6>) {
    let (mut on1, mut on2) = (None, None);
    for _ in 0..16 {
        let s = host.open_stream(STREAM6).expect("IPv6 stream");
        match isp6(lab, s.source()) {
            1 if on1.is_none() => on1 = Some(s),
            2 if on2.is_none() => on2 = Some(s),
            _ => {}
        }
        if let (Some(_), Some(_)) = (&on1, &on2) {
            break;
        }
    }
    (
        on1.expect("no IPv6 stream on ISP 1 in 16"),
        on2.expect("no IPv6 stream on ISP 2 in 16"),
    )
}

/// One new connection attempt after an impairment.
#[derive(Debug)]
struct Attempt {
    started: Duration,
    /// The source the server saw, or the error.
    result: Result<IpAddr, String>,
}

/// New TCP connections from `ns` to `server`, one every 10 ms (each
/// bounded by 300 ms), until `window` after `t0`, at most 300.
fn attempts<A: Endpoint>(ns: &Netns, server: A, t0: Instant, window: Duration) -> Vec<Attempt> {
    paced_attempts(t0, window, || {
        ns.tcp_whoami_within(server, Duration::from_millis(300))
            .map(|seen| Into::<std::net::SocketAddr>::into(seen).ip())
            .map_err(|e| format!("{e:#}"))
    })
    .into_iter()
    .map(|(started, _, result)| Attempt { started, result })
    .collect()
}

/// Asserts that every attempt started after `FAILOVER` is `good`, and
/// that there were at least 20 of them; returns them. `what` and `log`
/// (the daemon's) explain a failure.
fn assert_late<'a>(
    attempts: &'a [Attempt],
    good: impl Fn(&Result<IpAddr, String>) -> bool,
    what: &str,
    log: &str,
) -> Vec<&'a Attempt> {
    let late: Vec<&Attempt> = attempts.iter().filter(|a| a.started > FAILOVER).collect();
    let bad: Vec<&&Attempt> = late.iter().filter(|a| !good(&a.result)).collect();
    assert!(
        bad.is_empty(),
        "{} of {} connections started over {FAILOVER:?} after {what} went wrong, e.g. {:#?}\n{log}",
        bad.len(),
        late.len(),
        &bad[..bad.len().min(5)]
    );
    assert!(
        late.len() >= 20,
        "too few attempts after {FAILOVER:?} ({what}): {attempts:#?}"
    );
    late
}

/// IPv6 connections follow the weights within 3 points. 7,000 connections
/// at 3:1: the bound is 5.8 sigma of the binomial noise.
#[test]
fn ipv6_shares_follow_the_weights() {
    let lab = build(4);
    let weights = [3, 1];
    let _mwan = start(
        &lab,
        &cfg(
            &lab,
            "nat",
            "",
            &|i| format!("weight = {}\n", weights[i - 1]),
            "",
        ),
    );
    let seen = connections(&lab, TCP_WHOAMI6, 1750);
    assert!(seen.len() >= 1000);
    assert!(
        0.03 >= sigmas(5.0, 0.75, seen.len()),
        "too few connections for 3 points"
    );
    let got = assert_shares(&lab, &seen, &weights, 0.03);
    println!("IPv6, weights 3:1, {} connections: {got:?}", seen.len());
    // Every source is the WAN's own address (NAT66).
    for s in &seen {
        let isp = isp6(&lab, *s);
        assert_eq!(*s.ip(), lab.isp(isp).router_addr6(), "NAT66 source");
    }
}

/// A long IPv6 download keeps its WAN and source address through a weight
/// change, the other WAN's failure, a reload and a daemon restart.
#[test]
fn a_long_ipv6_download_keeps_its_wan_through_changes_failover_reload_and_restart() {
    let lab = build(2);
    let text = |w1: u32, w2: u32| {
        cfg(
            &lab,
            "nat",
            "",
            &|i| format!("weight = {}\n", if i == 1 { w1 } else { w2 }),
            "",
        )
    };
    let mut mwan = start(&lab, &text(1, 1));
    let (stream, other) = streams_on_both(&lab, lab.host(0));
    let source = stream.source();
    assert_eq!(*source.ip(), lab.isp(1).router_addr6());
    flowing(&stream, "at first");
    stream.reset_max_gap();

    // Weight change by reload.
    std::fs::write(&mwan.config, text(1, 5)).unwrap();
    mwan.cli_ok(&["reload"]).unwrap();
    flowing(&stream, "after the weight change");
    flowing(&other, "after the weight change");

    // The other WAN fails and comes back.
    lab.isp(2).set_carrier(false).unwrap();
    mwan.wait_state("isp2", "down", UP).unwrap();
    flowing(&stream, "while ISP 2 was down");
    let seen = lab.host(1).tcp_whoami(TCP_WHOAMI6).unwrap();
    assert_eq!(
        isp6(&lab, seen),
        1,
        "new IPv6 connections avoid the dead WAN"
    );
    lab.isp(2).set_carrier(true).unwrap();
    mwan.wait_state("isp2", "up", Duration::from_secs(15))
        .unwrap();
    flowing(&stream, "after ISP 2 came back");

    // A reload with the first weights again.
    std::fs::write(&mwan.config, text(1, 1)).unwrap();
    mwan.cli_ok(&["reload"]).unwrap();
    flowing(&stream, "after the reload");

    // Restart: the daemon stops without teardown, the next takes over.
    mwan.cli_ok(&["stop"]).unwrap();
    let proc = mwan.forget().expect("daemon process");
    assert!(
        proc.wait_timeout(Duration::from_secs(10))
            .is_some_and(|s| s.success()),
        "{}",
        proc.output_so_far()
    );
    flowing(&stream, "while the daemon was away");
    mwan.launch(&[]).unwrap();
    mwan.wait_all_up(UP).unwrap();
    flowing(&stream, "after the restart");

    let report = stream.close();
    println!(
        "IPv6 download: {} bytes, longest gap {:?}",
        report.bytes, report.max_gap
    );
    assert_eq!(
        (report.source, report.end),
        (source, None),
        "the download moved or ended"
    );
    assert!(
        report.max_gap < Duration::from_secs(1),
        "gap {:?}",
        report.max_gap
    );
}

/// ISP 1's IPv6 dies silently while its IPv4 works: new IPv6 connections
/// go through ISP 2 within a second, IPv4 keeps balancing over both.
#[test]
fn a_silent_ipv6_blackhole_moves_new_ipv6_flows_and_leaves_ipv4_balanced() {
    let lab = build(2);
    let mwan = start(&lab, &cfg(&lab, "nat", "", &none, ""));
    let before = connections(&lab, TCP_WHOAMI6, 50);
    assert_eq!(shares(&lab, &before).len(), 2, "IPv6 on both WANs before");

    lab.isp(1).set_blackhole6(true).unwrap();
    let t0 = Instant::now();
    let tries = attempts(lab.host(1), TCP_WHOAMI6, t0, FAILOVER * 3);
    let wan2 = IpAddr::from(lab.isp(2).router_addr6());
    assert_late(
        &tries,
        |r| r.as_ref() == Ok(&wan2),
        "ISP 1's IPv6 blackhole (want ISP 2)",
        &mwan.log(),
    );
    // IPv4 of ISP 1 is fine and still takes its share.
    assert_eq!(mwan.wan("isp1").state, "up", "ISP 1's IPv4 is up");
    let seen = connections(&lab, TCP_WHOAMI, 500);
    let got = assert_shares(&lab, &seen, &[1, 1], sigmas(5.0, 0.5, seen.len()));
    println!("IPv4 during ISP 1's IPv6 blackhole: {got:?}");
}

/// An uplink with only IPv6 (no `gateway`, as with DS-Lite or 464XLAT):
/// it takes IPv6 flows and no IPv4 ones, is judged by its IPv6 probes
/// alone, and fails over like any other.
#[test]
fn an_uplink_with_only_ipv6_carries_ipv6_and_no_ipv4() {
    let lab = build(2);
    let text = cfg(&lab, "nat", "", &none, "");
    let isp2_v4 = format!("gateway = \"{}\"\n", lab.isp(2).gateway());
    assert_eq!(text.matches(&isp2_v4).count(), 1, "{text}");
    let mwan = start(&lab, &text.replace(&isp2_v4, ""));
    let isp2 = mwan.wan("isp2");
    assert!(!isp2.alive, "no IPv4 pins to ISP 2");
    assert_eq!(isp2.ipv6.as_ref().map(|v6| v6.state.as_str()), Some("up"));
    let v4 = connections(&lab, TCP_WHOAMI, 100);
    assert_eq!(
        shares(&lab, &v4),
        BTreeMap::from([(1, 1.0)]),
        "IPv4 only via ISP 1"
    );
    let v6 = connections(&lab, TCP_WHOAMI6, 100);
    assert_eq!(shares(&lab, &v6).len(), 2, "IPv6 over both");

    // ISP 2's IPv6 dies: its IPv6 flows move to ISP 1 within a second.
    lab.isp(2).set_blackhole6(true).unwrap();
    let t0 = Instant::now();
    let tries = attempts(lab.host(1), TCP_WHOAMI6, t0, FAILOVER * 3);
    let wan1 = IpAddr::from(lab.isp(1).router_addr6());
    assert_late(
        &tries,
        |r| r.as_ref() == Ok(&wan1),
        "the IPv6-only uplink's failure (want ISP 1)",
        &mwan.log(),
    );
}

/// An IPv6 download on a WAN whose IPv6 dies is reset at once (its
/// conntrack entry deleted, the client nudged in the server's name), not
/// left hanging; the WAN's IPv4 stays up, and `mwan status` shows its IPv6
/// down on its own.
#[test]
fn an_ipv6_download_on_a_dead_wan_is_reset_at_once_and_its_ipv4_stays_up() {
    let lab = build(1);
    let mwan = start(&lab, &cfg(&lab, "nat", "", &none, ""));
    mwan.cli_ok(&["drain", "isp2"]).unwrap();
    let download = lab.host(0).open_stream(STREAM6).unwrap();
    assert_eq!(isp6(&lab, download.source()), 1);
    mwan.cli_ok(&["enable", "isp2"]).unwrap();
    flowing(&download, "the download before the failure");

    lab.isp(1).set_blackhole6(true).unwrap();
    let t0 = Instant::now();
    if let Err(e) = download.wait_reset(Duration::from_secs(4)) {
        panic!(
            "the IPv6 download after its WAN's IPv6 died: {e:#}\n{}",
            mwan.log()
        );
    }
    println!("IPv6 download reset {:?} after the blackhole", t0.elapsed());
    assert!(
        wait_until(Duration::from_secs(2), || mwan
            .wan("isp1")
            .connections
            .nudged
            > 0),
        "no TCP client nudged: {:?}\n{}",
        mwan.wan("isp1").connections,
        mwan.log()
    );
    let isp1 = mwan.wan("isp1");
    assert_eq!(isp1.state, "up", "ISP 1's IPv4 is untouched");
    assert_eq!(
        isp1.ipv6.as_ref().map(|v6| v6.state.as_str()),
        Some("down"),
        "ISP 1's IPv6 is down on its own"
    );
    // The application reconnects at once, through ISP 2.
    let again = lab.host(0).open_stream(STREAM6).unwrap();
    assert_eq!(isp6(&lab, again.source()), 2);
}

/// `sticky = "host"` keyed by MAC: a host's IPv4 connections, its static
/// IPv6 address and two temporary ones all leave through one WAN.
#[test]
fn a_sticky_host_uses_one_wan_for_every_address_and_both_families() {
    let lab = build(8);
    let _mwan = start(
        &lab,
        &cfg(
            &lab,
            "nat",
            "sticky = \"host\"\nsticky_key = \"mac\"\nhost_ttl = \"1m\"",
            &none,
            "",
        ),
    );
    let mut hosts_per_isp: BTreeMap<usize, usize> = BTreeMap::new();
    for (i, h) in lab.hosts().iter().enumerate() {
        let temps: Vec<Ipv6Addr> = (1..=2)
            .map(|k| in_net(LAN0_6, 0xa1b2_c3d4_0000_0000 | (i as u128) << 8 | k))
            .collect();
        for t in &temps {
            lab.add_host_addr6(i, *t).unwrap();
        }
        let mut isps: Vec<usize> = many_tcp_whoami(h, TCP_WHOAMI, 10, 4)
            .into_iter()
            .map(|r| lab.wan_of(*r.expect("IPv4 connection").ip()).unwrap())
            .collect();
        isps.extend(
            many_tcp_whoami(h, TCP_WHOAMI6, 10, 4)
                .into_iter()
                .map(|r| isp6(&lab, r.expect("IPv6 connection"))),
        );
        for t in &temps {
            for _ in 0..5 {
                let seen = h.tcp_whoami_from(TCP_WHOAMI6, (*t).into()).unwrap();
                isps.push(isp6(&lab, seen));
            }
            isps.push(isp6(
                &lab,
                h.udp_whoami_from(UDP_WHOAMI6, (*t).into()).unwrap(),
            ));
        }
        isps.sort();
        isps.dedup();
        assert_eq!(isps.len(), 1, "host {i} used several WANs: {isps:?}");
        *hosts_per_isp.entry(isps[0]).or_default() += 1;
    }
    // Eight hosts at 1:1 all on one WAN: p = 1/128.
    assert_eq!(hosts_per_isp.len(), 2, "hosts per ISP: {hosts_per_isp:?}");
}

/// NPT: a LAN host appears under each WAN's prefix with its own interface
/// identifier, and inbound connections to those addresses reach it.
#[test]
fn npt_keeps_the_interface_identifier_under_each_wan_and_lets_inbound_in() {
    let lab = build(1);
    let _mwan = start(&lab, &cfg(&lab, "npt", "", &none, ""));
    let host = lab.host(0);
    let mapped = |i: usize| in_net(npt_prefix(&lab, i), u128::from(iid(host.addr6())));
    let mut seen_isps = BTreeMap::new();
    for r in many_tcp_whoami(host, TCP_WHOAMI6, 40, 4) {
        let seen = r.expect("IPv6 connection");
        let isp = isp6(&lab, seen);
        assert_eq!(*seen.ip(), mapped(isp), "NPT source via ISP {isp}");
        *seen_isps.entry(isp).or_insert(0) += 1;
    }
    assert_eq!(seen_isps.len(), 2, "{seen_isps:?}");
    let _server = host
        .tcp_whoami_server(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 9000, 0, 0))
        .unwrap();
    for i in 1..=2 {
        let to = SocketAddrV6::new(mapped(i), 9000, 0, 0);
        let seen = lab
            .inet()
            .tcp_whoami(to)
            .unwrap_or_else(|e| panic!("inbound to {to} via ISP {i}: {e:#}"));
        assert!(
            !LAN0_6.contains(seen.ip()),
            "the host sees the internet's address: {seen}"
        );
    }
}

/// A rule with an IPv6 destination sends that traffic through its WAN;
/// other IPv6 and all IPv4 traffic stays balanced.
#[test]
fn a_rule_with_an_ipv6_dst_sends_that_traffic_through_its_wan() {
    let lab = build(2);
    let rules =
        format!("\n[[rule]]\nname = \"v6net\"\ndst = [\"{SERVER6_NET2}\"]\nwans = [\"isp2\"]\n");
    let _mwan = start(&lab, &cfg(&lab, "nat", "", &none, &rules));
    let to_net2 = SocketAddrV6::new(SERVER6_2, TCP_WHOAMI_PORT, 0, 0);
    let seen = connections(&lab, to_net2, 50);
    assert_eq!(
        shares(&lab, &seen),
        BTreeMap::from([(2, 1.0)]),
        "rule v6net"
    );
    let seen = connections(&lab, TCP_WHOAMI6, 100);
    assert_eq!(shares(&lab, &seen).len(), 2, "other IPv6 is balanced");
    let seen = connections(&lab, TCP_WHOAMI, 100);
    assert_eq!(shares(&lab, &seen).len(), 2, "IPv4 is balanced");
}

/// The ISP renumbers its link (RA with a new prefix, the old one
/// deprecated): once the router has its new address, new connections
/// through that WAN use it within a second.
#[test]
fn a_renumbered_ipv6_uplink_is_followed_within_a_second() {
    let lab = Lab::builder()
        .lan_hosts(1)
        .isps(2)
        .dual_stack()
        .router_kind(RouterKind::Dhcp)
        .build()
        .unwrap();
    let mwan = start(&lab, &cfg(&lab, "nat", "", &none, ""));
    lab.isp(1).renumber_link6(other_link6(1)).unwrap();
    let t0 = Instant::now();
    let new = IpAddr::from(lab.isp(1).router_addr6());
    let wan2 = IpAddr::from(lab.isp(2).router_addr6());
    let tries = attempts(lab.host(0), TCP_WHOAMI6, t0, FAILOVER * 3);
    let late = assert_late(
        &tries,
        |r| *r == Ok(new) || *r == Ok(wan2),
        "the renumbering (want ISP 1's new address or ISP 2)",
        &mwan.log(),
    );
    assert!(
        late.iter().any(|a| a.result == Ok(new)),
        "nothing via ISP 1's new address {new}: {late:?}\n{}",
        mwan.log()
    );
}

/// NPT onto a delegated prefix the ISP replaces: after the reload with the
/// new prefix, new connections through that WAN use it at once.
#[test]
fn npt_follows_a_new_delegated_prefix() {
    let lab = build(1);
    let mwan = start(&lab, &cfg(&lab, "npt", "", &none, ""));
    lab.isp(1)
        .renumber_delegation6(other_delegation6(1))
        .unwrap();
    std::fs::write(&mwan.config, cfg(&lab, "npt", "", &none, "")).unwrap();
    mwan.cli_ok(&["reload"]).unwrap();
    let t0 = Instant::now();
    let host = lab.host(0);
    let new = IpAddr::from(in_net(npt_prefix(&lab, 1), u128::from(iid(host.addr6()))));
    let tries = attempts(host, TCP_WHOAMI6, t0, FAILOVER * 3);
    // Through ISP 1 only the new prefix; nothing fails.
    let late = assert_late(
        &tries,
        |r| {
            r.as_ref()
                .is_ok_and(|ip| *ip == new || lab.wan_of(*ip) == Some(2))
        },
        "the new delegation (want the new prefix or ISP 2)",
        &mwan.log(),
    );
    assert!(
        late.iter().any(|a| a.result == Ok(new)),
        "nothing via ISP 1: {late:#?}"
    );
}

/// The router's own IPv6 connections are balanced and fail over.
#[test]
fn the_routers_own_ipv6_traffic_is_balanced_and_fails_over() {
    let lab = build(1);
    let mwan = start(&lab, &cfg(&lab, "nat", "", &none, ""));
    let seen: Vec<SocketAddrV6> = many_tcp_whoami(lab.router(), TCP_WHOAMI6, 400, 8)
        .into_iter()
        .map(|r| r.expect("router's IPv6 connection"))
        .collect();
    let got = assert_shares(&lab, &seen, &[1, 1], sigmas(5.0, 0.5, seen.len()));
    println!("router's own IPv6: {got:?}");
    lab.isp(1).set_blackhole6(true).unwrap();
    let t0 = Instant::now();
    let tries = attempts(lab.router(), TCP_WHOAMI6, t0, FAILOVER * 3);
    let wan2 = IpAddr::from(lab.isp(2).router_addr6());
    assert_late(
        &tries,
        |r| r.as_ref() == Ok(&wan2),
        "ISP 1's IPv6 blackhole, router's own (want ISP 2)",
        &mwan.log(),
    );
}
