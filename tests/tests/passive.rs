//! End-to-end proof of passive health (issue 19): while the LAN opens TCP
//! connections, a silent upstream blackhole is seen in the handshakes
//! themselves (SYNs leave through the WAN, no SYN-ACK comes back); a burst
//! of probes confirms it and the WAN goes down with a `passive: …` reason,
//! before the (deliberately slow) probing rounds would have taken it down.
//! Without traffic, the probes judge as before. One dead destination among
//! answering ones, and a LAN host scanning 500 dead or closed addresses,
//! take no WAN down.
//!
//! Probes are slow on purpose here (`probe_interval = "1s"`, so the rounds
//! alone need about 4 s: `down_after` 4). The assertions are on the
//! reasons and the order of the daemon's events, not on wall-clock times
//! (the bench section `passive` measures those).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use lab::mwan::{config_with, wan6, Mwan};
use lab::*;

/// Generous bound for the WANs to be up after start.
const UP: Duration = Duration::from_secs(10);
/// Slow probes: the rounds alone take a WAN down after about 4 s.
const SLOW: &str = "probe_interval = \"1s\"";
/// The longest a test waits for a WAN to go down.
const DOWN_WITHIN: Duration = Duration::from_secs(15);
/// Connection openers at once (a busy LAN).
const OPENERS: usize = 16;
/// Each connection attempt's bound.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(700);

/// Live destinations: the internet answers every address of
/// 198.51.100.128/26 (an AnyIP route) on the probe port.
fn live4(k: usize) -> SocketAddr {
    SocketAddr::new(
        Ipv4Addr::new(198, 51, 100, 128 + (k % 64) as u8).into(),
        TCP_PROBE_PORT,
    )
}

/// Live IPv6 destinations: 2001:db8:ffff:1::/64 likewise.
fn live6(k: usize) -> SocketAddr {
    SocketAddr::new(
        Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 1, 0, 0, 0, 1 + (k % 64) as u16).into(),
        TCP_PROBE_PORT,
    )
}

/// The one dead destination: the internet drops what is sent to it.
const DEAD: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 250);

/// Makes the internet answer many addresses, and drop some.
fn destinations(lab: &Lab) {
    let mut cmds = String::from(
        "route add local 198.51.100.128/26 dev lo\n\
         route add blackhole 198.51.100.250/32\n\
         route add blackhole 203.0.113.128/25\n",
    );
    if lab.is_dual_stack() {
        cmds += "route add local 2001:db8:ffff:1::/64 dev lo\n";
    }
    lab.inet().ip(&cmds).expect("internet destinations");
}

fn start<'l>(lab: &'l Lab, text: &str) -> Mwan<'l> {
    let mwan = Mwan::start(lab, text).expect("mwan starts");
    mwan.wait_all_up(UP).expect("WANs up");
    if lab.is_dual_stack() {
        mwan.wait_all_up6(UP).expect("WANs' IPv6 up");
    }
    mwan
}

/// New connections opened from `host` by [`OPENERS`] threads until `stop`
/// (or `limit`), each to the next of `dst(k)`; counts those that
/// connected.
struct Openers<'a> {
    stop: AtomicBool,
    ok: AtomicU64,
    dst: &'a (dyn Fn(usize) -> SocketAddr + Sync),
}

impl Openers<'_> {
    fn run(&self, host: &Netns, worker: usize, limit: Instant) {
        host.run(|| {
            let mut k = worker;
            while !self.stop.load(Ordering::Relaxed) && Instant::now() < limit {
                if TcpStream::connect_timeout(&(self.dst)(k), CONNECT_TIMEOUT).is_ok() {
                    self.ok.fetch_add(1, Ordering::Relaxed);
                    // At most ~20 connections per second per opener.
                    thread::sleep(Duration::from_millis(50));
                }
                k += OPENERS;
            }
        })
    }
}

/// The daemon's events of WAN `wan` and family `family` to state `to`:
/// their reasons, oldest first.
fn reasons(mwan: &Mwan, wan: &str, family: &str, to: &str) -> Vec<String> {
    mwan.status()
        .events
        .into_iter()
        .filter(|e| e.kind == "state" && e.wan == wan && e.family == family && e.to == to)
        .map(|e| e.reason)
        .collect()
}

/// Waits until WAN `wan`'s `family` has gone down; its reasons.
fn wait_down(mwan: &Mwan, wan: &str, family: &str) -> Vec<String> {
    let down = wait_until(DOWN_WITHIN, || {
        !reasons(mwan, wan, family, "down").is_empty()
    });
    assert!(down, "{wan} ({family}) never went down:\n{}", mwan.log());
    reasons(mwan, wan, family, "down")
}

/// A blackhole of ISP 1 (`v6`: of its IPv6 only) while host 0 opens
/// connections continuously: ISP 1's family goes down on passive
/// evidence, the only down event of the test (the probes' own verdict
/// never came first), and the connections opened after it succeed.
fn blackhole_under_traffic(lab: &Lab, mwan: &Mwan, v6: bool) {
    let family = if v6 { "ipv6" } else { "ipv4" };
    let dst: &(dyn Fn(usize) -> SocketAddr + Sync) = if v6 { &live6 } else { &live4 };
    let openers = Openers {
        stop: AtomicBool::new(false),
        ok: AtomicU64::new(0),
        dst,
    };
    let limit = Instant::now() + Duration::from_secs(30);
    thread::scope(|s| {
        for w in 0..OPENERS {
            let o = &openers;
            s.spawn(move || o.run(lab.host(0), w, limit));
        }
        let warm = wait_until(Duration::from_secs(5), || {
            openers.ok.load(Ordering::Relaxed) > 200
        });
        let status = mwan.wan("isp1");
        let p = if v6 {
            status.ipv6.expect("IPv6 side").passive
        } else {
            status.passive
        };
        println!("before: isp1 {family} passive {p:?}");
        assert!(
            warm && p.handshakes > 0,
            "no handshakes through isp1: {p:?}"
        );
        if v6 {
            lab.isp(1).set_blackhole6(true).unwrap();
        } else {
            lab.isp(1).set_blackhole(true).unwrap();
        }
        let downs = wait_down(mwan, "isp1", family);
        let before = openers.ok.load(Ordering::Relaxed);
        // New connections work again: those opened after the WAN went
        // down go through ISP 2.
        let moved = wait_until(Duration::from_secs(5), || {
            openers.ok.load(Ordering::Relaxed) > before + 100
        });
        openers.stop.store(true, Ordering::Relaxed);
        println!("isp1 {family} down: {downs:?}");
        assert_eq!(downs.len(), 1, "{downs:?}");
        assert!(
            downs[0].starts_with("passive: ") && downs[0].contains("burst of probes failed"),
            "isp1 went down without passive evidence: {downs:?}\n{}",
            mwan.log()
        );
        assert!(moved, "new connections did not recover after the failover");
    });
    // The other WAN never went down.
    assert!(reasons(mwan, "isp2", family, "down").is_empty());
}

#[test]
fn blackhole_under_traffic_goes_down_on_passive_evidence() {
    let lab = Lab::builder().lan_hosts(1).isps(2).build().unwrap();
    destinations(&lab);
    let mwan = start(&lab, &config_with(&lab, SLOW, &|_| String::new(), ""));
    blackhole_under_traffic(&lab, &mwan, false);
}

#[test]
fn ipv6_blackhole_under_traffic_goes_down_on_passive_evidence() {
    let lab = Lab::builder()
        .lan_hosts(1)
        .isps(2)
        .dual_stack()
        .build()
        .unwrap();
    destinations(&lab);
    let mwan = start(
        &lab,
        &config_with(&lab, SLOW, &|i| wan6(&lab, i, "nat"), ""),
    );
    blackhole_under_traffic(&lab, &mwan, true);
    // IPv4 through ISP 1 was not blackholed.
    assert!(reasons(&mwan, "isp1", "ipv4", "down").is_empty());
}

/// No traffic: nothing for passive health to see; the probes take the
/// WAN down as before.
#[test]
fn without_traffic_the_probes_judge() {
    let lab = Lab::builder().lan_hosts(1).isps(2).build().unwrap();
    let mwan = start(&lab, &config_with(&lab, SLOW, &|_| String::new(), ""));
    lab.isp(1).set_blackhole(true).unwrap();
    let downs = wait_down(&mwan, "isp1", "ipv4");
    assert_eq!(downs.len(), 1, "{downs:?}");
    assert!(
        downs[0].contains("consecutive failed rounds"),
        "{downs:?}\n{}",
        mwan.log()
    );
}

/// Host 1 scans 500 addresses (250 that the internet drops, 250 closed
/// ports that answer with a reset) while nothing else runs; then host 0
/// keeps connecting to one dead destination among answering ones. Passive
/// health suspects the scan (the log says it asked for bursts), the bursts
/// answer, and no WAN ever goes down.
#[test]
fn a_scan_and_a_dead_destination_take_no_wan_down() {
    let lab = Lab::builder().lan_hosts(2).isps(2).build().unwrap();
    destinations(&lab);
    let mwan = start(&lab, &config_with(&lab, SLOW, &|_| String::new(), ""));
    let scan = |k: usize| -> SocketAddr {
        if k.is_multiple_of(2) {
            SocketAddr::new(
                Ipv4Addr::new(203, 0, 113, 128 + (k / 2 % 125) as u8).into(),
                443,
            )
        } else {
            SocketAddr::new(
                Ipv4Addr::new(198, 51, 100, 128 + (k / 2 % 64) as u8).into(),
                9,
            )
        }
    };
    // 500 attempts by 25 threads of 20, each bounded.
    thread::scope(|s| {
        for t in 0..25 {
            let host = lab.host(1);
            s.spawn(move || {
                host.run(|| {
                    for j in 0..20 {
                        let r = TcpStream::connect_timeout(&scan(t * 20 + j), CONNECT_TIMEOUT);
                        assert!(r.is_err(), "scan target {} answered", scan(t * 20 + j));
                    }
                })
            });
        }
    });
    // Host 0: connections to answering destinations and, from 4 openers,
    // to the dead one, for 6 s.
    let dst = |k: usize| -> SocketAddr {
        if k % OPENERS < 4 {
            SocketAddr::new(IpAddr::V4(DEAD), TCP_PROBE_PORT)
        } else {
            live4(k)
        }
    };
    let openers = Openers {
        stop: AtomicBool::new(false),
        ok: AtomicU64::new(0),
        dst: &dst,
    };
    let limit = Instant::now() + Duration::from_secs(6);
    let host0 = lab.host(0);
    thread::scope(|s| {
        for w in 0..OPENERS {
            let o = &openers;
            s.spawn(move || o.run(host0, w, limit));
        }
    });
    // Probing rounds and bursts that were sent are answered by now.
    thread::sleep(Duration::from_secs(2));
    let log = mwan.log();
    let bursts = log.matches("confirming with a burst of probes").count();
    println!(
        "{bursts} bursts; {} connections to live destinations",
        openers.ok.load(Ordering::Relaxed)
    );
    assert!(bursts > 0, "the scan was never suspected:\n{log}");
    assert!(openers.ok.load(Ordering::Relaxed) > 50);
    for wan in ["isp1", "isp2"] {
        let downs = reasons(&mwan, wan, "ipv4", "down");
        assert!(downs.is_empty(), "{wan} went down: {downs:?}\n{log}");
        assert_eq!(mwan.wan(wan).state, "up");
    }
}
