//! End-to-end proof of health checking and failover (issue 4): silent
//! blackholes, repair with `up_after` and `hold_down`, random loss, a dead
//! probe target, carrier loss, primary/backup tiers, the router's own
//! traffic, a flapping uplink, the `on_change` hook and `mwan status`.
//!
//! Every test runs the real `mwan` binary in a namespace lab with real
//! packets; the internet servers report the source address they saw, which
//! names the WAN. Health settings are the defaults (interval 100 ms, timeout
//! 400 ms, down_after 4, up_after 5, hold_down 5 s) unless a test says
//! otherwise in its config.
//!
//! Times of state changes are read from the daemon's log (microsecond
//! wall-clock stamps of "wan state changed"), so they do not depend on how
//! quickly the test polls.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::mwan::conntrack::{self, CtEntry};
use lab::mwan::{config, config_with, Mwan, Status};
use lab::*;

/// Generous bound for the WANs to be up after start.
const UP: Duration = Duration::from_secs(10);
/// The default health settings (docs/CONFIG.md).
const INTERVAL: Duration = Duration::from_millis(100);
const UP_AFTER: u32 = 5;
const HOLD_DOWN: Duration = Duration::from_secs(5);
/// The failover bound the issue asks for at the defaults.
const FAILOVER: Duration = Duration::from_secs(1);
/// Slack between a transition and its log stamp (same thread, same clock).
const STAMP_SLACK: f64 = 0.05;

fn build() -> Lab {
    Lab::builder()
        .lan_hosts(2)
        .isps(2)
        .build()
        .expect("lab builds")
}

fn start<'l>(lab: &'l Lab, config_text: &str) -> Mwan<'l> {
    let mwan = Mwan::start(lab, config_text).expect("mwan starts");
    mwan.wait_all_up(UP).expect("WANs up");
    mwan
}

/// Seconds since the epoch, now.
fn wall() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// The router's address on ISP `i`'s link.
fn wan_addr(lab: &Lab, i: usize) -> Ipv4Addr {
    lab.isp(i).router_addr().addr()
}

/// The ISP a source address seen by a server belongs to (0: none).
fn isp_of(lab: &Lab, seen: SocketAddrV4) -> usize {
    lab.wan_of(*seen.ip()).unwrap_or(0)
}

/// One new TCP connection from `ns` (each bounded by `timeout`): the ISP it
/// went through.
fn connect_isp(lab: &Lab, ns: &Netns, timeout: Duration) -> anyhow::Result<usize> {
    Ok(isp_of(lab, ns.tcp_whoami_within(TCP_WHOAMI, timeout)?))
}

/// `n` new TCP connections from `host`, 8 at a time: the ISP of each.
/// Panics if one fails.
fn connection_isps(lab: &Lab, host: &Netns, n: usize) -> Vec<usize> {
    many_tcp_whoami(host, TCP_WHOAMI, n, 8)
        .into_iter()
        .map(|r| isp_of(lab, r.expect("new connection")))
        .collect()
}

fn count(isps: &[usize], isp: usize) -> usize {
    isps.iter().filter(|i| **i == isp).count()
}

/// A state change, as `mwan status` lists it.
#[derive(Debug, Clone)]
struct Change {
    /// Seconds since the epoch.
    at: f64,
    wan: String,
    from: String,
    to: String,
    reason: String,
}

/// The state changes the daemon made so far, oldest first.
fn changes(mwan: &Mwan) -> Vec<Change> {
    mwan.status()
        .events
        .into_iter()
        .filter_map(|e| {
            Some(Change {
                at: parse_rfc3339(&e.time)?,
                wan: e.wan,
                from: e.from,
                to: e.to,
                reason: e.reason,
            })
        })
        .collect()
}

/// The changes of WAN `wan` stamped at or after `since`.
fn changes_of(mwan: &Mwan, wan: &str, since: f64) -> Vec<Change> {
    changes(mwan)
        .into_iter()
        .filter(|c| c.wan == wan && c.at >= since)
        .collect()
}

/// The first change of `wan` to `to` stamped at or after `since`; waits up
/// to `timeout` for it.
fn wait_change(mwan: &Mwan, wan: &str, to: &str, since: f64, timeout: Duration) -> Change {
    let mut found = None;
    wait_until(timeout, || {
        found = changes_of(mwan, wan, since)
            .into_iter()
            .find(|c| c.to == to);
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "{wan} did not go {to} within {timeout:?}; changes: {:#?}\nlog:\n{}",
            changes_of(mwan, wan, since),
            mwan.log()
        )
    })
}

/// `2024-05-01T12:34:56.123456Z` → seconds since the epoch.
fn parse_rfc3339(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

/// The router's conntrack table (through the daemon's own ctnetlink code).
fn conntrack_table(lab: &Lab) -> Vec<CtEntry> {
    lab.router()
        .run(conntrack::dump)
        .expect("conntrack dump in the router")
}

/// TCP and UDP entries whose replies go to `addr` (connections NATed to
/// it). The probes' ICMP echoes are left out: the prober keeps probing a
/// dead WAN.
fn tcp_udp_to(table: &[CtEntry], addr: Ipv4Addr) -> Vec<&CtEntry> {
    table
        .iter()
        .filter(|e| matches!(e.orig.proto, 6 | 17) && e.reply.dst == addr)
        .collect()
}

/// The entry of the connection a server saw coming from `seen`.
fn entry_of(
    table: &[CtEntry],
    proto: u8,
    server: SocketAddrV4,
    seen: SocketAddrV4,
) -> Option<&CtEntry> {
    table.iter().find(|e| {
        e.reply.proto == proto
            && (e.reply.src, e.reply.sport) == ((*server.ip()).into(), server.port())
            && (e.reply.dst, e.reply.dport) == ((*seen.ip()).into(), seen.port())
    })
}

/// Opens streams from `host` until one goes through each ISP (the others
/// are closed); returns (ISP 1's, ISP 2's).
fn streams_on_both(lab: &Lab, host: &Netns) -> (Stream, Stream) {
    let (mut s1, mut s2) = (None, None);
    for _ in 0..32 {
        let s = host.open_stream(STREAM).expect("stream opens");
        match isp_of(lab, s.source()) {
            1 if s1.is_none() => s1 = Some(s),
            2 if s2.is_none() => s2 = Some(s),
            _ => {}
        }
        if s1.is_some() && s2.is_some() {
            break;
        }
    }
    (
        s1.expect("a stream through ISP 1 in 32"),
        s2.expect("a stream through ISP 2 in 32"),
    )
}

/// UDP exchanges from `host` (a new socket each) until each ISP carried
/// one; returns the sources the server saw, by ISP.
fn udp_flows_on_both(lab: &Lab, host: &Netns) -> (SocketAddrV4, SocketAddrV4) {
    let (mut u1, mut u2) = (None, None);
    for _ in 0..32 {
        let seen = host.udp_whoami(UDP_WHOAMI).expect("UDP whoami");
        match isp_of(lab, seen) {
            1 => u1 = u1.or(Some(seen)),
            2 => u2 = u2.or(Some(seen)),
            _ => {}
        }
        if u1.is_some() && u2.is_some() {
            break;
        }
    }
    (
        u1.expect("a UDP flow through ISP 1 in 32"),
        u2.expect("a UDP flow through ISP 2 in 32"),
    )
}

/// A UDP socket of `host` connected to the UDP whoami server whose flow
/// goes through ISP `isp` (new sockets are tried until one does).
fn udp_socket_via(lab: &Lab, host: &Netns, isp: usize) -> UdpSocket {
    for _ in 0..32 {
        let socket = host
            .run(|| -> std::io::Result<UdpSocket> {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.connect(UDP_WHOAMI)?;
                s.set_read_timeout(Some(Duration::from_millis(300)))?;
                Ok(s)
            })
            .expect("UDP socket");
        if udp_exchange(&socket).is_some_and(|seen| isp_of(lab, seen) == isp) {
            return socket;
        }
    }
    panic!("no UDP flow through ISP {isp} in 32 sockets");
}

/// The source the UDP whoami server saw for a datagram of `socket` (three
/// tries; answers left over from earlier exchanges are dropped first).
fn udp_exchange(socket: &UdpSocket) -> Option<SocketAddrV4> {
    discard_late_answers(socket).ok()?;
    let mut buf = [0u8; 256];
    (0..3).find_map(|_| {
        socket.send(b"whoami").ok()?;
        let n = socket.recv(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n]).trim().parse().ok()
    })
}

/// One new connection attempt during a failover.
#[derive(Debug)]
struct Attempt {
    /// When it started, after the impairment.
    started: Duration,
    /// When it ended, after the impairment.
    ended: Duration,
    /// The ISP it went through, or the error.
    result: Result<usize, String>,
}

/// New TCP connections from `host`, one every 10 ms (each bounded by
/// `timeout`) until `window` after `t0`, at most 300.
fn attempts_until(lab: &Lab, host: &Netns, t0: Instant, window: Duration) -> Vec<Attempt> {
    let timeout = Duration::from_millis(300);
    paced_attempts(t0, window, || {
        connect_isp(lab, host, timeout).map_err(|e| format!("{e:#}"))
    })
    .into_iter()
    .map(|(started, ended, result)| Attempt {
        started,
        ended,
        result,
    })
    .collect()
}

/// A silent blackhole beyond ISP 1's gateway: every new connection started
/// more than 1 s after the impairment goes through ISP 2; ISP 1 is `down`;
/// the conntrack entries of ISP 1's connections are deleted and ISP 2's
/// are left alone; a stream on ISP 2 never notices.
#[test]
fn silent_blackhole_moves_new_connections_within_a_second() {
    let lab = build();
    let mwan = start(&lab, &config(&lab, ""));
    let (wan1, wan2) = (wan_addr(&lab, 1), wan_addr(&lab, 2));

    // Long-lived flows through both WANs.
    let (stream1, stream2) = streams_on_both(&lab, lab.host(0));
    let (udp1, udp2) = udp_flows_on_both(&lab, lab.host(1));
    // A UDP "application" that keeps its socket through the failure.
    let app = udp_socket_via(&lab, lab.host(1), 1);
    assert!(wait_until(Duration::from_secs(5), || stream1.bytes() > 0
        && stream2.bytes() > 0));
    let before = conntrack_table(&lab);
    for (proto, server, seen) in [
        (6, STREAM, stream1.source()),
        (6, STREAM, stream2.source()),
        (17, UDP_WHOAMI, udp1),
        (17, UDP_WHOAMI, udp2),
    ] {
        assert!(
            entry_of(&before, proto, server, seen).is_some(),
            "no conntrack entry for {seen} -> {server} before the failure"
        );
    }
    assert!(!tcp_udp_to(&before, wan1).is_empty());

    stream2.reset_max_gap();
    let bytes2 = stream2.bytes();
    let issued = wall();
    lab.isp(1).set_blackhole(true).unwrap();
    let (t0, t0_wall) = (Instant::now(), wall());

    let attempts = attempts_until(&lab, lab.host(1), t0, FAILOVER * 3);
    let bad: Vec<&Attempt> = attempts.iter().filter(|a| a.result != Ok(2)).collect();
    let last_bad = bad.iter().map(|a| a.ended).max();
    let down = wait_change(&mwan, "isp1", "down", issued, Duration::from_secs(5));
    println!(
        "blackhole: isp1 down after {:.0} ms ({}); {} new connections in {:?}, {} failed or via ISP 1, the last of them ended {:?} after the impairment",
        (down.at - t0_wall) * 1000.0,
        down.reason,
        attempts.len(),
        FAILOVER * 3,
        bad.len(),
        last_bad,
    );
    let late: Vec<&Attempt> = attempts.iter().filter(|a| a.started > FAILOVER).collect();
    assert!(
        late.len() >= 20,
        "too few attempts after 1 s: {attempts:#?}"
    );
    let late_bad: Vec<&&Attempt> = late.iter().filter(|a| a.result != Ok(2)).collect();
    assert!(
        late_bad.is_empty(),
        "connections started more than {FAILOVER:?} after the blackhole did not go through ISP 2: {late_bad:#?}"
    );
    assert!(
        down.reason.contains("failed rounds"),
        "probe-based detection: {down:?}"
    );

    let status = mwan.status();
    let state = |name: &str| {
        let w = status.wans.iter().find(|w| w.name == name).unwrap();
        (w.state.as_str(), w.alive)
    };
    assert_eq!(state("isp1"), ("down", false));
    assert_eq!(state("isp2"), ("up", true));

    // ISP 1's connections are gone from conntrack, ISP 2's are untouched.
    let mut table = Vec::new();
    let gone = wait_until(Duration::from_secs(3), || {
        table = conntrack_table(&lab);
        tcp_udp_to(&table, wan1).is_empty()
    });
    assert!(
        gone,
        "conntrack entries of ISP 1 left: {:#?}",
        tcp_udp_to(&table, wan1)
    );
    for (proto, server, seen) in [(6, STREAM, stream2.source()), (17, UDP_WHOAMI, udp2)] {
        let e = entry_of(&table, proto, server, seen);
        assert!(
            e.is_some_and(|e| e.reply.dst == wan2),
            "ISP 2's entry for {seen} -> {server} is gone"
        );
    }

    // The UDP application's next datagrams get through ISP 2 at once: its
    // flow was re-pinned and its NAT binding to ISP 1's address is gone.
    let seen = udp_exchange(&app);
    assert!(
        seen.is_some_and(|seen| *seen.ip() == wan2),
        "UDP flow of ISP 1 after the failover: answered as {seen:?}"
    );

    // The stream on ISP 2 kept flowing: no reset, small gaps, more bytes.
    assert!(
        wait_until(Duration::from_secs(5), || stream2.bytes()
            > bytes2 + 2 * STREAM_PACE),
        "stream on ISP 2 stalled: {} bytes after the failure",
        stream2.bytes() - bytes2
    );
    let report = stream2.close();
    println!(
        "stream on ISP 2: {} bytes during the failover, longest gap {:?}",
        report.bytes - bytes2,
        report.max_gap
    );
    assert_eq!(report.end, None, "stream on ISP 2 ended");
    assert!(
        report.max_gap < Duration::from_millis(500),
        "stream on ISP 2 paused {:?}",
        report.max_gap
    );
    drop(stream1);
}

/// Repair: ISP 1 comes back no sooner than `hold_down` after it went down
/// and takes new connections again; once `hold_down` has passed, it needs
/// `up_after` good rounds.
#[test]
fn repaired_wan_returns_after_hold_down_and_up_after_rounds() {
    let lab = build();
    let mwan = start(&lab, &config(&lab, ""));
    let hold = HOLD_DOWN.as_secs_f64();

    // Repaired at once: hold_down decides.
    let t0 = wall();
    lab.isp(1).set_blackhole(true).unwrap();
    let down = wait_change(&mwan, "isp1", "down", t0, Duration::from_secs(5));
    lab.isp(1).set_blackhole(false).unwrap();
    let repaired = wall();
    let up = wait_change(&mwan, "isp1", "up", down.at, HOLD_DOWN * 3);
    println!(
        "repaired {:.0} ms after going down; up {:.2} s after down ({})",
        (repaired - down.at) * 1000.0,
        up.at - down.at,
        up.reason
    );
    assert!(
        up.at - down.at >= hold - STAMP_SLACK,
        "up {:.2} s after down, hold_down is {hold} s",
        up.at - down.at
    );
    assert!(
        up.at - down.at < hold + 3.0,
        "up only {:.2} s after down",
        up.at - down.at
    );
    let isps = connection_isps(&lab, lab.host(0), 40);
    assert!(
        count(&isps, 1) > 0 && count(&isps, 2) > 0,
        "new connections use both WANs again: {isps:?}"
    );

    // Repaired after hold_down has passed: up_after good rounds decide.
    let t1 = wall();
    lab.isp(1).set_blackhole(true).unwrap();
    let down = wait_change(&mwan, "isp1", "down", t1, Duration::from_secs(5));
    assert!(wait_until(HOLD_DOWN * 2, || wall() > down.at + hold + 0.2));
    // Measured from before the command: the repair cannot be earlier.
    let repaired = wall();
    lab.isp(1).set_blackhole(false).unwrap();
    let up = wait_change(&mwan, "isp1", "up", repaired, Duration::from_secs(5));
    let took = up.at - repaired;
    println!(
        "repaired {:.2} s after going down; up {:.0} ms after the repair ({})",
        repaired - down.at,
        took * 1000.0,
        up.reason
    );
    // The good streak starts with the first round sent after the repair;
    // the last of `up_after` rounds is sent (up_after - 1) intervals later.
    let min = (UP_AFTER - 1) as f64 * INTERVAL.as_secs_f64();
    assert!(
        took >= min - STAMP_SLACK,
        "up {took:.3} s after the repair: fewer than {UP_AFTER} good rounds"
    );
    assert!(took < 3.0, "up only {took:.2} s after the repair");
    assert_eq!(mwan.wan("isp1").state, "up");
    let isps = connection_isps(&lab, lab.host(0), 40);
    assert!(count(&isps, 1) > 0, "ISP 1 takes new connections: {isps:?}");
}

/// 10% random loss on every target (quorum 1) never takes the WAN down;
/// 100% loss does.
#[test]
fn random_loss_keeps_the_wan_up_total_loss_takes_it_down() {
    const WATCH: Duration = Duration::from_secs(20);
    let lab = build();
    let mwan = start(&lab, &config(&lab, ""));
    lab.isp(1).set_loss(10).unwrap();
    let t0 = wall();
    let went_down = wait_until(WATCH, || mwan.wan("isp1").state != "up");
    let isp1 = mwan.wan("isp1");
    println!(
        "10% loss for {WATCH:?}: isp1 {} with {:.1}% measured loss",
        isp1.state, isp1.loss_pct
    );
    assert!(
        !went_down && changes_of(&mwan, "isp1", t0).is_empty(),
        "isp1 changed state under 10% loss: {:#?}",
        changes_of(&mwan, "isp1", t0)
    );
    // The loss was real and measured (window of 50 rounds x 3 targets).
    assert!(
        (2.0..=25.0).contains(&isp1.loss_pct),
        "measured loss {:.1}%",
        isp1.loss_pct
    );

    lab.isp(1).set_loss(100).unwrap();
    let t1 = wall();
    let down = wait_change(&mwan, "isp1", "down", t1, Duration::from_secs(5));
    println!(
        "100% loss: isp1 down after {:.0} ms",
        (down.at - t1) * 1000.0
    );
    assert_eq!(mwan.wan("isp2").state, "up");
}

/// With two probe targets and quorum 1, one dead target keeps the WAN up;
/// when both are dead it goes down.
#[test]
fn one_dead_target_of_two_keeps_the_wan_up() {
    let lab = build();
    let targets = format!(
        "probe_targets = [\"{}\", \"{}\"]\nquorum = 1",
        PROBE_TARGETS[0], PROBE_TARGETS[1]
    );
    let mwan = start(&lab, &config_with(&lab, "", &|_| targets.clone(), ""));
    lab.set_target_blocked(PROBE_TARGETS[1], true).unwrap();
    let t0 = wall();
    // 50 rounds: a WAN that needed both targets would be down in 4.
    let went_down = wait_until(Duration::from_secs(5), || {
        mwan.status().wans.iter().any(|w| w.state != "up")
    });
    let status = mwan.status();
    for w in &status.wans {
        println!(
            "{} with {} dead: {} with {:.1}% loss",
            w.name, PROBE_TARGETS[1], w.state, w.loss_pct
        );
    }
    assert!(
        !went_down && changes(&mwan).iter().all(|c| c.at < t0),
        "a WAN changed state with one of two targets dead: {:#?}",
        changes(&mwan)
    );
    for w in &status.wans {
        // Half the probes are lost: the blocked target is one of two.
        assert!(
            w.loss_pct >= 30.0,
            "{} measured {:.1}% loss",
            w.name,
            w.loss_pct
        );
    }

    lab.set_target_blocked(PROBE_TARGETS[0], true).unwrap();
    let t1 = wall();
    for wan in ["isp1", "isp2"] {
        wait_change(&mwan, wan, "down", t1, Duration::from_secs(5));
    }
}

/// Carrier loss takes the WAN down at once (no probe wait) and new
/// connections go through the other WAN immediately.
#[test]
fn carrier_loss_moves_new_connections_at_once() {
    let lab = build();
    let mwan = start(&lab, &config(&lab, ""));
    let before = wall();
    lab.isp(1).set_carrier(false).unwrap();
    let (t0, t0_wall) = (Instant::now(), wall());
    // The daemon may well notice before `ip` has returned.
    let down = wait_change(&mwan, "isp1", "down", before, Duration::from_secs(5));
    let after = down.at - t0_wall;
    // 20 new connections, each allowed less than a SYN retransmission: a
    // SYN sent into the dead link would fail.
    let results: Vec<_> = (0..20)
        .map(|_| connect_isp(&lab, lab.host(0), Duration::from_millis(500)))
        .collect();
    println!(
        "carrier lost: isp1 down {:.1} ms after `ip` started, {:.1} ms after it returned ({}); 20 new connections done {:?} after it returned",
        (down.at - before) * 1000.0,
        after * 1000.0,
        down.reason,
        t0.elapsed()
    );
    // Probes could not notice before their 400 ms timeout (plus three
    // more rounds).
    assert!(after < 0.3, "down {after:.3} s after the carrier loss");
    assert!(down.reason.contains("carrier"), "{down:?}");
    for r in &results {
        assert!(
            matches!(r, Ok(2)),
            "new connection not through ISP 2: {results:?}"
        );
    }

    lab.isp(1).set_carrier(true).unwrap();
    let up = wait_change(&mwan, "isp1", "up", down.at, HOLD_DOWN * 3);
    println!("carrier back: isp1 up {:.2} s after down", up.at - down.at);
    assert!(up.at - down.at >= HOLD_DOWN.as_secs_f64() - STAMP_SLACK);
}

/// Tier 1 takes every new connection while it is up, tier 2 while tier 1
/// is down, and tier 1 again after the repair.
#[test]
fn backup_tier_only_while_the_primary_is_down() {
    let lab = build();
    let cfg = config_with(&lab, "hold_down = \"2s\"", &|i| format!("tier = {i}"), "");
    let mwan = start(&lab, &cfg);
    let shares: Vec<(String, f64)> = mwan
        .status()
        .wans
        .into_iter()
        .map(|w| (w.name, w.share))
        .collect();
    assert_eq!(
        shares,
        [("isp1".to_string(), 1.0), ("isp2".to_string(), 0.0)]
    );

    let phase = |want: usize, what: &str| {
        let isps = connection_isps(&lab, lab.host(0), 40);
        assert_eq!(count(&isps, want), isps.len(), "{what}: {isps:?}");
    };
    phase(1, "primary up");
    let t0 = wall();
    lab.isp(1).set_blackhole(true).unwrap();
    wait_change(&mwan, "isp1", "down", t0, Duration::from_secs(5));
    assert_eq!(mwan.wan("isp2").share, 1.0);
    phase(2, "primary down");
    lab.isp(1).set_blackhole(false).unwrap();
    wait_change(&mwan, "isp1", "up", t0, Duration::from_secs(10));
    phase(1, "primary repaired");
}

/// Connections made by the router itself use the balance route: both WANs
/// while healthy, only the healthy one after a failover, both again after
/// the repair.
#[test]
fn router_own_connections_fail_over() {
    let lab = build();
    let cfg = config_with(&lab, "hold_down = \"2s\"", &|_| String::new(), "");
    let mwan = start(&lab, &cfg);
    let router = lab.router();
    let spread = || -> BTreeSet<usize> {
        (0..40)
            .map(|_| connect_isp(&lab, router, CLIENT_TIMEOUT).expect("router's connection"))
            .collect()
    };
    let healthy = spread();
    assert_eq!(healthy, BTreeSet::from([1, 2]), "router's connections");

    let t0 = wall();
    lab.isp(1).set_blackhole(true).unwrap();
    wait_change(&mwan, "isp1", "down", t0, Duration::from_secs(5));
    let isps: Vec<_> = (0..20)
        .map(|_| connect_isp(&lab, router, Duration::from_millis(500)))
        .collect();
    assert!(
        isps.iter().all(|r| matches!(r, Ok(2))),
        "router's connections after the failover: {isps:?}"
    );
    lab.isp(1).set_blackhole(false).unwrap();
    wait_change(&mwan, "isp1", "up", t0, Duration::from_secs(10));
    assert_eq!(spread(), BTreeSet::from([1, 2]), "after the repair");
}

/// A link flapping every second for 15 s: mwan never comes back up sooner
/// than `hold_down` (3 s here) after going down.
#[test]
fn flapping_uplink_does_not_flap_mwan() {
    const HOLD: f64 = 3.0;
    let lab = build();
    let cfg = config_with(&lab, "hold_down = \"3s\"", &|_| String::new(), "");
    let mwan = start(&lab, &cfg);
    let t0 = wall();
    let start = Instant::now();
    let mut on = false;
    while start.elapsed() < Duration::from_secs(15) {
        on = !on;
        lab.isp(1).set_blackhole(on).unwrap();
        thread::sleep(Duration::from_secs(1));
    }
    lab.isp(1).set_blackhole(false).unwrap();
    let end = wall();
    // Settles up (unless it was up already).
    if mwan.wan("isp1").state != "up" {
        wait_change(&mwan, "isp1", "up", end, Duration::from_secs(10));
    }
    let seen = changes_of(&mwan, "isp1", t0);
    let summary: Vec<String> = seen
        .iter()
        .map(|c| format!("{:+.2}s {}->{}", c.at - t0, c.from, c.to))
        .collect();
    println!("flapping for 15 s: {}", summary.join(", "));
    let downs = seen.iter().filter(|c| c.to == "down").count();
    assert!(downs >= 1, "the flapping never took isp1 down: {seen:#?}");
    for (i, c) in seen.iter().enumerate() {
        if c.to != "down" {
            continue;
        }
        if let Some(up) = seen[i + 1..].iter().find(|n| n.to == "up") {
            assert!(
                up.at - c.at >= HOLD - STAMP_SLACK,
                "up {:.2} s after down (hold_down {HOLD} s): {summary:?}",
                up.at - c.at
            );
        }
    }
    // Each state change alternates (no duplicate or skipped transitions).
    for pair in seen.windows(2) {
        assert_eq!(pair[0].to, pair[1].from, "{summary:?}");
    }
    assert!(
        changes_of(&mwan, "isp2", t0).is_empty(),
        "isp2 was not touched"
    );
}

/// The `on_change` hook runs on every change with the documented
/// environment.
#[test]
fn on_change_hook_gets_the_change_in_its_environment() {
    let lab = build();
    let out = lab.dir().join("hook.out");
    let script = lab.dir().join("hook.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nprintf '%s|%s|%s|%s|%s|%s|%s|%s\\n' \"$MWAN_WAN\" \"$MWAN_INTERFACE\" \"$MWAN_OLD_STATE\" \"$MWAN_NEW_STATE\" \"$MWAN_REASON\" \"$MWAN_LOSS\" \"$MWAN_RTT_MS\" \"$MWAN_TIME\" >> {}\n",
            out.display()
        ),
    )
    .unwrap();
    let top = format!("on_change = \"sh {}\"", script.display());
    let _mwan = start(&lab, &config_with(&lab, &top, &|_| String::new(), ""));
    let lines = |min: usize| -> Vec<Vec<String>> {
        let mut lines = Vec::new();
        let ok = wait_until(Duration::from_secs(5), || {
            lines = std::fs::read_to_string(&out)
                .unwrap_or_default()
                .lines()
                .map(|l| l.split('|').map(String::from).collect())
                .collect();
            lines.len() >= min
        });
        assert!(ok, "hook ran {} times, want {min}: {lines:?}", lines.len());
        lines
    };
    // Start: both WANs unknown -> up.
    let first = lines(2);
    for (i, wan) in ["isp1", "isp2"].iter().enumerate() {
        let l = first
            .iter()
            .find(|l| l[0] == *wan)
            .unwrap_or_else(|| panic!("no hook run for {wan}: {first:?}"));
        assert_eq!(
            l[1..4],
            [format!("wan{}", i + 1), "unknown".into(), "up".into()]
        );
    }

    let t0 = wall();
    lab.isp(1).set_blackhole(true).unwrap();
    let all = lines(3);
    let l = all
        .iter()
        .find(|l| l[0] == "isp1" && l.get(3).is_some_and(|s| s == "down"))
        .unwrap_or_else(|| panic!("no hook run for isp1 going down: {all:?}"));
    println!("hook environment on failure: {l:?}");
    assert_eq!(l.len(), 8, "{l:?}");
    assert_eq!(l[..4], ["isp1", "wan1", "up", "down"]);
    assert!(l[4].contains("failed rounds"), "MWAN_REASON {:?}", l[4]);
    let loss: f64 = l[5].parse().expect("MWAN_LOSS is a number");
    assert!(loss > 0.0 && loss <= 100.0, "MWAN_LOSS {loss}");
    assert!(
        l[6].is_empty() || l[6].parse::<f64>().is_ok(),
        "MWAN_RTT_MS {:?}",
        l[6]
    );
    let at = parse_rfc3339(&l[7]).expect("MWAN_TIME is RFC 3339");
    assert!(
        at >= t0.floor() && at <= wall() + 1.0,
        "MWAN_TIME {} not between the failure and now",
        l[7]
    );
}

/// `mwan status`: exit 0 with every WAN up, 4 with one down, 5 with all
/// down; the JSON says which.
#[test]
fn status_reports_down_wans() {
    let lab = build();
    let mwan = start(&lab, &config(&lab, ""));
    let exit_code = || mwan.cli(&["status"]).unwrap().status.code();
    let json = || {
        let out = mwan.cli(&["status", "--json"]).unwrap();
        let status: Status = serde_json::from_slice(&out.stdout).expect("status JSON");
        (out.status.code(), status)
    };
    assert_eq!(exit_code(), Some(0));
    let (code, s) = json();
    assert_eq!(code, Some(0));
    assert!(!s.all_down && s.wans.iter().all(|w| w.state == "up" && w.alive));

    let t0 = wall();
    lab.isp(1).set_blackhole(true).unwrap();
    wait_change(&mwan, "isp1", "down", t0, Duration::from_secs(5));
    assert_eq!(exit_code(), Some(4));
    let (code, s) = json();
    assert_eq!(code, Some(4));
    assert!(!s.all_down);
    let w = |s: &Status, n: &str| s.wans.iter().find(|w| w.name == n).cloned().unwrap();
    let isp1 = w(&s, "isp1");
    assert_eq!(
        (isp1.state.as_str(), isp1.alive, isp1.share),
        ("down", false, 0.0)
    );
    assert!(isp1.loss_pct > 0.0);
    let isp2 = w(&s, "isp2");
    assert_eq!(
        (isp2.state.as_str(), isp2.alive, isp2.share),
        ("up", true, 1.0)
    );
    let ev = s.events.last().expect("events");
    assert_eq!(
        (ev.wan.as_str(), ev.from.as_str(), ev.to.as_str()),
        ("isp1", "up", "down")
    );
    let text = String::from_utf8_lossy(&mwan.cli(&["status"]).unwrap().stdout).into_owned();
    assert!(
        text.lines()
            .any(|l| l.contains("isp1") && l.contains("down")),
        "{text}"
    );

    lab.isp(2).set_blackhole(true).unwrap();
    wait_change(&mwan, "isp2", "down", t0, Duration::from_secs(5));
    assert_eq!(exit_code(), Some(5));
    let (code, s) = json();
    assert_eq!(code, Some(5));
    assert!(s.all_down && s.wans.iter().all(|w| w.state == "down"));
}

/// A WAN whose interface is administratively down: mwan starts anyway
/// (that WAN `down`, the other one carrying everything), and the WAN comes
/// back when the interface is brought up, also after being set down again
/// while mwan runs. The kernel deletes the WAN table's route with the
/// interface and refuses it while the interface is down; mwan must put it
/// back.
#[test]
fn wan_interface_set_down_and_up_comes_back() {
    let lab = build();
    let cfg = config_with(&lab, "hold_down = \"2s\"", &|_| String::new(), "");
    let both = |what: &str| {
        let isps = connection_isps(&lab, lab.host(0), 40);
        assert!(
            count(&isps, 1) > 0 && count(&isps, 2) > 0,
            "{what}: new connections through both WANs: {isps:?}"
        );
    };
    lab.router().ip("link set dev wan1 down").unwrap();
    let mwan = Mwan::start(&lab, &cfg).expect("mwan starts with a WAN interface down");
    mwan.wait_state("isp2", "up", UP).unwrap();
    let isp1 = mwan.wan("isp1");
    assert_eq!((isp1.state.as_str(), isp1.alive), ("down", false));
    let isps = connection_isps(&lab, lab.host(0), 20);
    assert_eq!(count(&isps, 2), 20, "{isps:?}");

    let t0 = wall();
    lab.router().ip("link set dev wan1 up").unwrap();
    wait_change(&mwan, "isp1", "up", t0, Duration::from_secs(10));
    both("interface up after the start");

    let t1 = wall();
    lab.router().ip("link set dev wan1 down").unwrap();
    let down = wait_change(&mwan, "isp1", "down", t1, Duration::from_secs(5));
    assert!(down.reason.contains("administratively down"), "{down:?}");
    lab.router().ip("link set dev wan1 up").unwrap();
    let up = wait_change(&mwan, "isp1", "up", down.at, Duration::from_secs(10));
    println!(
        "wan1 set down and up: isp1 up {:.2} s after down",
        up.at - down.at
    );
    both("interface down and up again");

    // Down and up faster than mwan may look, and the route deleted behind
    // its back: it is put back either way, at the latest by the periodic
    // check (every 5 s).
    let table = format!("{}", 1000 + u32::from(mwan.wan("isp1").id));
    let route = || {
        lab.router()
            .sh(&format!("ip route show table {table} default proto 109"))
            .unwrap()
            .contains("dev wan1")
    };
    for what in ["quick down and up", "flushed"] {
        let cmd = match what {
            "flushed" => format!("ip route flush table {table}"),
            _ => "ip link set dev wan1 down; ip link set dev wan1 up".to_string(),
        };
        for _ in 0..3 {
            lab.router().sh(&cmd).unwrap();
            let t = Instant::now();
            assert!(
                wait_until(Duration::from_secs(8), route),
                "{what}: table {table} route not put back\n{}",
                mwan.log()
            );
            println!("{what}: route back after {:?}", t.elapsed());
        }
    }
    mwan.wait_state("isp1", "up", Duration::from_secs(10))
        .unwrap();
    both("after quick toggles and a flushed table");
}

#[test]
fn a_download_on_the_dead_wan_is_reset_at_once_not_left_hanging() {
    // A download only receives: when its WAN dies it sends nothing that
    // could meet the deleted conntrack entry. mwan nudges the client, whose
    // answer leaves through the other WAN and draws the server's reset.
    let lab = build();
    let mwan = start(&lab, &config(&lab, ""));
    mwan.cli_ok(&["drain", "isp2"]).unwrap();
    let download = lab.host(0).open_stream(STREAM).unwrap();
    assert_eq!(isp_of(&lab, download.source()), 1);
    mwan.cli_ok(&["enable", "isp2"]).unwrap();
    let before = download.bytes();
    assert!(wait_until(Duration::from_secs(3), || download.bytes()
        > before + 256 * 1024));

    lab.isp(1).set_blackhole(true).unwrap();
    let t0 = Instant::now();
    mwan.wait_state("isp1", "down", Duration::from_secs(3))
        .unwrap();
    if let Err(e) = download.wait_reset(Duration::from_secs(3)) {
        panic!(
            "the download after its WAN went down: {e:#}\n{}",
            mwan.log()
        );
    }
    let took = t0.elapsed();
    println!("download reset {took:?} after the blackhole");
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
    // The application reconnects at once, through ISP 2.
    let again = lab.host(0).open_stream(STREAM).unwrap();
    assert_eq!(isp_of(&lab, again.source()), 2);
}

/// `max_rtt` and `max_loss`: a slow or lossy WAN is `degraded`. It takes no
/// new connections while a healthy WAN is up, takes them again when it is
/// the best that is left, and is `up` once the impairment is gone.
#[test]
fn a_slow_or_lossy_wan_is_degraded_and_used_only_when_nothing_better() {
    let lab = build();
    // A short window so that the mean RTT follows the delay within a
    // second or two; hold_down short so that the phases do not wait long.
    let per_wan = |i: usize| {
        if i == 1 {
            "max_rtt = \"40ms\"\nmax_loss = 10.0\nhealth_window = 10".to_string()
        } else {
            String::new()
        }
    };
    let mwan = start(&lab, &config_with(&lab, "hold_down = \"1s\"", &per_wan, ""));
    let all_via = |want: usize, what: &str| {
        let isps = connection_isps(&lab, lab.host(0), 30);
        assert_eq!(count(&isps, want), isps.len(), "{what}: {isps:?}");
    };
    // Applies `impair` to ISP 1 and waits for isp1 to go `to`.
    let isp1_goes = |to: &str, what: &str, impair: &dyn Fn()| -> Change {
        let t = wall();
        impair();
        let c = wait_change(&mwan, "isp1", to, t, Duration::from_secs(10));
        println!("{what}: isp1 {to} after {:.2} s ({})", c.at - t, c.reason);
        c
    };

    // 2 × 50 ms one way: a round trip of about 100 ms, over max_rtt.
    let degraded = isp1_goes("degraded", "100 ms RTT", &|| {
        lab.isp(1).set_delay(Duration::from_millis(50)).unwrap()
    });
    assert!(degraded.reason.contains("rtt"), "{degraded:?}");
    let isp1 = mwan.wan("isp1");
    assert_eq!((isp1.share, isp1.alive), (0.0, true), "{isp1:?}");
    all_via(2, "isp1 degraded, isp2 up");

    // The healthy WAN dies: the degraded one is the best that is left.
    let t1 = wall();
    lab.isp(2).set_blackhole(true).unwrap();
    wait_change(&mwan, "isp2", "down", t1, Duration::from_secs(5));
    assert_eq!(mwan.wan("isp1").state, "degraded");
    assert_eq!(mwan.wan("isp1").share, 1.0);
    all_via(1, "isp2 down, isp1 degraded");
    lab.isp(2).set_blackhole(false).unwrap();
    wait_change(&mwan, "isp2", "up", t1, Duration::from_secs(10));
    all_via(2, "isp2 repaired, isp1 still degraded");

    // The delay goes: isp1 is up again and takes its share.
    isp1_goes("up", "delay removed", &|| {
        lab.isp(1).set_delay(Duration::ZERO).unwrap()
    });
    let isps = connection_isps(&lab, lab.host(0), 40);
    assert!(count(&isps, 1) > 0 && count(&isps, 2) > 0, "{isps:?}");

    // 40% loss: rounds still pass (three targets, quorum 1), but the
    // measured loss is over max_loss.
    let degraded = isp1_goes("degraded", "40% loss", &|| lab.isp(1).set_loss(40).unwrap());
    assert!(degraded.reason.contains("loss"), "{degraded:?}");
    assert_eq!(mwan.wan("isp2").state, "up");
    all_via(2, "isp1 lossy");
    isp1_goes("up", "loss removed", &|| lab.isp(1).set_loss(0).unwrap());
}

/// A UDP flow through ISP 1 moves to ISP 2 when ISP 1 dies. After the
/// repair it stays on ISP 2 under `failback = "keep"` (the default) and is
/// sent back through ISP 1 under `failback = "reset"`.
fn failback(mode: &str) -> (usize, usize) {
    let lab = build();
    let top = format!("hold_down = \"1s\"\nfailback = \"{mode}\"");
    let mwan = start(&lab, &config_with(&lab, &top, &|_| String::new(), ""));
    let socket = udp_socket_via(&lab, lab.host(0), 1);

    let t0 = wall();
    lab.isp(1).set_blackhole(true).unwrap();
    wait_change(&mwan, "isp1", "down", t0, Duration::from_secs(5));
    let moved = udp_exchange(&socket).expect("the UDP flow continues");
    assert_eq!(isp_of(&lab, moved), 2, "after the failure");

    // The start resets too (every WAN comes up): wait for a new one.
    let resets = mwan.wan("isp1").connections.failback_resets;
    lab.isp(1).set_blackhole(false).unwrap();
    wait_change(&mwan, "isp1", "up", t0, Duration::from_secs(10));
    if mode == "reset" {
        assert!(
            wait_until(Duration::from_secs(3), || mwan
                .wan("isp1")
                .connections
                .failback_resets
                > resets),
            "no failback reset:\n{}",
            mwan.log()
        );
    }
    // Whatever the mode, the flow answers; where from is the point.
    let after = udp_exchange(&socket).expect("the UDP flow continues after the repair");
    let flows = mwan.flows(&["--wan", "isp1"]);
    println!(
        "failback {mode}: the flow is on ISP {}",
        isp_of(&lab, after)
    );
    (isp_of(&lab, after), flows.len())
}

#[test]
fn failback_keep_leaves_moved_flows_where_they_are() {
    let (isp, _) = failback("keep");
    assert_eq!(isp, 2, "failback = keep moved the flow back");
}

#[test]
fn failback_reset_sends_moved_flows_back_through_the_repaired_wan() {
    let (isp, on_isp1) = failback("reset");
    assert_eq!(isp, 1, "failback = reset left the flow on ISP 2");
    assert!(on_isp1 >= 1, "no flow pinned to isp1 after the reset");
}

/// Every WAN down while the links still forward (all probe targets
/// silent): `all_down = "last"` keeps new connections going through the
/// WANs that were up last, loudly logged; `"unreachable"` refuses them at
/// once with an ICMP error. Both recover when a WAN is up again.
fn all_wans_down(mode: &str) -> Vec<Result<usize, (String, Duration)>> {
    let lab = build();
    let top = format!("hold_down = \"1s\"\nall_down = \"{mode}\"");
    let mwan = start(&lab, &config_with(&lab, &top, &|_| String::new(), ""));
    let t0 = wall();
    for t in PROBE_TARGETS {
        lab.set_target_blocked(t, true).unwrap();
    }
    for wan in ["isp1", "isp2"] {
        wait_change(&mwan, wan, "down", t0, Duration::from_secs(5));
    }
    assert!(mwan.status().all_down);
    assert!(
        wait_until(Duration::from_secs(2), || mwan
            .log()
            .contains("ALL WANs ARE DOWN")),
        "{}",
        mwan.log()
    );
    // The LAN still reaches the router itself, by unicast and broadcast
    // (a local DNS resolver, DHCP).
    for to in [LAN0_ROUTER, Ipv4Addr::new(192, 0, 2, 127)] {
        assert!(lan_reaches_router(&lab, to), "LAN datagram to {to} lost");
    }
    // From a LAN host and from the router itself.
    let spaces: [&Netns; 3] = [lab.host(0), lab.host(1), lab.router()];
    let results = spaces
        .iter()
        .flat_map(|ns| (0..5).map(move |_| ns))
        .map(|ns| {
            let t = Instant::now();
            connect_isp(&lab, ns, Duration::from_secs(2))
                .map_err(|e| (format!("{e:#}"), t.elapsed()))
        })
        .collect();

    let t1 = wall();
    for t in PROBE_TARGETS {
        lab.set_target_blocked(t, false).unwrap();
    }
    wait_change(&mwan, "isp1", "up", t1, Duration::from_secs(10));
    wait_change(&mwan, "isp2", "up", t1, Duration::from_secs(10));
    assert!(!mwan.status().all_down);
    let isps = connection_isps(&lab, lab.host(0), 20);
    assert!(isps.iter().all(|i| *i == 1 || *i == 2), "{isps:?}");
    results
}

/// Whether a UDP datagram from LAN host 0 to `to` (the router's address or
/// the LAN broadcast) reaches a socket of the router.
fn lan_reaches_router(lab: &Lab, to: Ipv4Addr) -> bool {
    let rx = lab
        .router()
        .run(|| -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind(SocketAddrV4::new(to, 9999))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(s)
        })
        .expect("router socket");
    lab.host(0)
        .run(|| -> std::io::Result<()> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_broadcast(true)?;
            s.send_to(b"hello router", SocketAddrV4::new(to, 9999))?;
            Ok(())
        })
        .expect("LAN datagram sent");
    let mut buf = [0u8; 64];
    rx.recv(&mut buf)
        .is_ok_and(|n| &buf[..n] == b"hello router")
}

#[test]
fn all_down_last_keeps_new_connections_on_the_last_wans() {
    let results = all_wans_down("last");
    assert!(
        results.iter().all(|r| matches!(r, Ok(1) | Ok(2))),
        "new connections while every WAN is down: {results:?}"
    );
}

/// Every one of them, not just the first few: ICMP errors alone are
/// rate-limited per host by the kernel, so mwan refuses LAN connections
/// with a TCP reset ("connection refused"); the router's own fail in the
/// route lookup ("no route to host").
#[test]
fn all_down_unreachable_refuses_new_connections_at_once() {
    let results = all_wans_down("unreachable");
    for (i, r) in results.iter().enumerate() {
        let want = if i < 10 {
            "Connection refused"
        } else {
            "No route to host"
        };
        match r {
            Err((msg, took)) => {
                assert!(
                    msg.contains(want),
                    "attempt {i}: {msg}, not {want}; all: {results:#?}"
                );
                assert!(
                    *took < Duration::from_millis(500),
                    "attempt {i} refused after {took:?}"
                );
            }
            Ok(isp) => panic!("a new connection went through ISP {isp}: {results:?}"),
        }
    }
}

/// TCP-connect and DNS probes (no ICMP at all), both required (quorum 2):
/// the WANs come up only if both kinds work through each WAN, and a silent
/// blackhole takes one down within a second.
#[test]
fn tcp_and_dns_probes_detect_a_failure() {
    let lab = build();
    let targets = format!(
        "probe_targets = [\"tcp:{}:{}\", \"dns:{}\"]\nquorum = 2",
        TCP_PROBE.ip(),
        TCP_PROBE.port(),
        DNS.ip()
    );
    let cfg = config_with(&lab, "", &|_| targets.clone(), "");
    let mwan = start(&lab, &cfg);
    for w in mwan.status().wans {
        println!("{}: {} rtt {:?} ms", w.name, w.state, w.rtt_ms);
        assert!(w.rtt_ms.is_some_and(|r| r > 0.0), "{w:?}");
    }
    let t0 = wall();
    lab.isp(1).set_blackhole(true).unwrap();
    let down = wait_change(&mwan, "isp1", "down", t0, Duration::from_secs(5));
    println!(
        "blackhole: isp1 down after {:.0} ms ({})",
        (down.at - t0) * 1000.0,
        down.reason
    );
    assert!(down.at - t0 < FAILOVER.as_secs_f64(), "{down:?}");
    assert_eq!(mwan.wan("isp2").state, "up");
    let isps = connection_isps(&lab, lab.host(0), 20);
    assert_eq!(count(&isps, 2), isps.len(), "{isps:?}");
    lab.isp(1).set_blackhole(false).unwrap();
    wait_change(&mwan, "isp1", "up", t0, Duration::from_secs(10));
}

/// A router whose only default route (static, in the main table) goes
/// through the line that dies, as in the seeds' primary/backup setups: the
/// LAN, the router's own connections and inbound connections all move to
/// ISP 2, and mwan leaves that route where it is.
#[test]
fn a_single_default_route_through_the_dead_wan_does_not_matter() {
    let lab = Lab::builder()
        .lan_hosts(2)
        .isps(2)
        .router_kind(RouterKind::SingleDefault)
        .build()
        .expect("lab builds");
    let main_routes = || lab.router().sh("ip route show table main").unwrap();
    let before = main_routes();
    let mwan = start(
        &lab,
        &config_with(&lab, "hold_down = \"2s\"", &|_| String::new(), ""),
    );
    let _own = lab
        .router()
        .tcp_whoami_server(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 2222))
        .unwrap();
    let t0 = wall();
    lab.isp(1).set_blackhole(true).unwrap();
    wait_change(&mwan, "isp1", "down", t0, Duration::from_secs(5));
    let lan = connection_isps(&lab, lab.host(0), 20);
    assert!(lan.iter().all(|i| *i == 2), "LAN connections: {lan:?}");
    let own: Vec<_> = (0..20)
        .map(|_| connect_isp(&lab, lab.router(), Duration::from_millis(500)))
        .collect();
    assert!(
        own.iter().all(|r| matches!(r, Ok(2))),
        "router's own: {own:?}"
    );
    for n in 0..10 {
        lab.inet()
            .tcp_whoami(SocketAddrV4::new(wan_addr(&lab, 2), 2222))
            .unwrap_or_else(|e| panic!("inbound via ISP 2, try {n}: {e:#}"));
    }
    lab.isp(1).set_blackhole(false).unwrap();
    wait_change(&mwan, "isp1", "up", t0, Duration::from_secs(10));
    let lan: BTreeSet<usize> = connection_isps(&lab, lab.host(1), 40).into_iter().collect();
    assert_eq!(lan, BTreeSet::from([1, 2]), "after the repair");
    assert_eq!(main_routes(), before, "mwan changed the main table");
}
