//! Prober tests with real sockets, in network namespaces each test creates
//! and always deletes (needs root; skipped otherwise).
//!
//! Namespace A is the router running the probers; two veth links lead to
//! namespace B, which holds the targets on its `lo`:
//!
//! ```text
//!   A: a1 198.51.100.1/30 ── b1 198.51.100.2/30 :B   WAN 1: mark 0x10000 → table 1
//!   A: a2 203.0.113.1/30  ── b2 203.0.113.2/30  :B   WAN 2: mark 0x20000 → table 2
//!   B lo: 192.0.2.1 (ICMP, TCP :80 listening, :81 refusing), 192.0.2.53 (DNS :53),
//!         the same on 2001:db8:ff::1 and 2001:db8:ff::53
//! ```
//!
//! A's main table routes everything through a2: a WAN-1 probe escaping its
//! mark and device would be answered through WAN 2.

use std::fs::File;
use std::future::Future;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;

use super::outcome::NO_ANSWER;
use super::{ProbeSpec, Prober, RoundReport};
use crate::config::{Family, ProbeTarget};

const MARK1: u32 = 0x1_0000;
const MARK2: u32 = 0x2_0000;
/// B's service addresses: the ICMP and TCP target, and the DNS responder.
const SERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const RESOLVER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53));
const SERVER6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1));
const RESOLVER6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x53));

/// One of every kind of target of a family: ICMP, TCP (open and refused)
/// and DNS.
fn targets(f: Family) -> Vec<ProbeTarget> {
    let (server, resolver) = match f {
        Family::Ipv4 => (SERVER, RESOLVER),
        Family::Ipv6 => (SERVER6, RESOLVER6),
    };
    vec![
        ProbeTarget::Icmp(server),
        ProbeTarget::Tcp(SocketAddr::new(server, 80)),
        ProbeTarget::Tcp(SocketAddr::new(server, 81)),
        ProbeTarget::Dns(SocketAddr::new(resolver, 53)),
    ]
}

const ICMP: ProbeTarget = ProbeTarget::Icmp(SERVER);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: network namespace tests need root");
    }
    root
}

/// Runs a command (feeding it `stdin`), panicking with its output on failure.
fn run(args: &[&str], stdin: &str) {
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} <<< {stdin}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `ip` commands, one a line, inside namespace `ns`.
fn ip(ns: &str, batch: &str) {
    run(&["ip", "-n", ns, "-batch", "-"], batch);
}

/// Runs `ip -6` commands, one a line, inside namespace `ns`.
fn ip6(ns: &str, batch: &str) {
    run(&["ip", "-6", "-n", ns, "-batch", "-"], batch);
}

/// Runs a command inside namespace `ns`.
fn exec(ns: &str, args: &[&str], stdin: &str) {
    run(&[&["ip", "netns", "exec", ns], args].concat(), stdin);
}

/// Runs `f` on a thread inside namespace `ns`: the sockets it creates
/// belong to the namespace.
fn enter<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace descriptor, for this thread.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A named network namespace, deleted (with its interfaces) on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "mwan-ht-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        run(&["ip", "netns", "add", &name], "");
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The two namespaces, wired up; the servers in B are started by
/// [`Lab::serve`] within the test's runtime.
struct Lab {
    a: Netns,
    b: Netns,
    /// B's servers, IPv4 and IPv6.
    tcp: Vec<std::net::TcpListener>,
    dns: Vec<std::net::UdpSocket>,
}

impl Lab {
    fn new() -> Lab {
        let (a, b) = (Netns::new(), Netns::new());
        ip(
            &a.0,
            &format!(
                "link add a1 type veth peer name b1 netns {b}
             link add a2 type veth peer name b2 netns {b}
             addr add 198.51.100.1/30 dev a1
             addr add 203.0.113.1/30 dev a2
             link set lo up
             link set a1 up
             link set a2 up
             route add default via 198.51.100.2 dev a1 table 1
             route add default via 203.0.113.2 dev a2 table 2
             route add default via 203.0.113.2 dev a2
             rule add fwmark {MARK1:#x}/0xff0000 lookup 1 pref 100
             rule add fwmark {MARK2:#x}/0xff0000 lookup 2 pref 101",
                b = b.0
            ),
        );
        ip6(
            &a.0,
            &format!(
                "addr add 2001:db8:1::1/64 dev a1 nodad
             addr add 2001:db8:2::1/64 dev a2 nodad
             route add default via 2001:db8:1::2 dev a1 table 1
             route add default via 2001:db8:2::2 dev a2 table 2
             route add default via 2001:db8:2::2 dev a2
             rule add fwmark {MARK1:#x}/0xff0000 lookup 1 pref 100
             rule add fwmark {MARK2:#x}/0xff0000 lookup 2 pref 101"
            ),
        );
        ip(
            &b.0,
            "addr add 198.51.100.2/30 dev b1
             addr add 203.0.113.2/30 dev b2
             addr add 192.0.2.1/32 dev lo
             addr add 192.0.2.53/32 dev lo
             addr add 2001:db8:1::2/64 dev b1 nodad
             addr add 2001:db8:2::2/64 dev b2 nodad
             addr add 2001:db8:ff::1/128 dev lo
             addr add 2001:db8:ff::53/128 dev lo
             link set lo up
             link set b1 up
             link set b2 up",
        );
        // Replies come back on the WAN's link, which the main table does
        // not route to: no reverse-path filter.
        exec(
            &a.0,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.a1.rp_filter=0",
            ],
            "",
        );
        let (tcp, dns) = enter(&b.0, || {
            let tcp = [SERVER, SERVER6]
                .map(|a| std::net::TcpListener::bind(SocketAddr::new(a, 80)).unwrap());
            let dns = [RESOLVER, RESOLVER6]
                .map(|a| std::net::UdpSocket::bind(SocketAddr::new(a, 53)).unwrap());
            (tcp.into(), dns.into())
        });
        Lab { a, b, tcp, dns }
    }

    /// Starts an accepting TCP server and a DNS responder (within a tokio
    /// runtime; they stop with it).
    fn serve(&self) {
        for tcp in &self.tcp {
            tcp.set_nonblocking(true).unwrap();
            let tcp = TcpListener::from_std(tcp.try_clone().unwrap()).unwrap();
            tokio::spawn(async move {
                while let Ok(conn) = tcp.accept().await {
                    drop(conn);
                }
            });
        }
        for dns in &self.dns {
            dns.set_nonblocking(true).unwrap();
            let dns = UdpSocket::from_std(dns.try_clone().unwrap()).unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                while let Ok((len, peer)) = dns.recv_from(&mut buf).await {
                    buf[2] |= 0x80; // QR: the query itself makes a fine response.
                    let _ = dns.send_to(&buf[..len], peer).await;
                }
            });
        }
    }

    /// Runs `test` on a current-thread runtime inside namespace A.
    fn run_in_a<F: Future<Output = ()>>(self, test: impl FnOnce(Lab) -> F + Send + 'static) {
        let a = self.a.0.clone();
        enter(&a, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                self.serve();
                test(self).await
            })
        });
    }
}

fn spec(
    wan: usize,
    interface: &str,
    mark: u32,
    targets: Vec<ProbeTarget>,
    quorum: usize,
) -> ProbeSpec {
    let family = targets.first().map_or(Family::Ipv4, |t| t.family());
    ProbeSpec {
        wan,
        family,
        name: format!("wan{wan}"),
        interface: interface.into(),
        mark,
        targets,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(400),
        quorum,
    }
}

/// The next report, failing the test at `deadline`.
async fn next(rx: &mut mpsc::Receiver<RoundReport>, deadline: Instant) -> RoundReport {
    tokio::time::timeout_at(deadline.into(), rx.recv())
        .await
        .expect("timed out waiting for a round")
        .expect("the probers stopped")
}

/// Checks that the decisions of each WAN come in order, one per round.
struct Order(Vec<Option<u64>>);

impl Order {
    fn check(&mut self, r: &RoundReport) {
        if !r.update {
            if let Some(prev) = self.0[r.wan] {
                assert_eq!(r.seq, prev + 1, "wan {} reports out of order", r.wan);
            }
            self.0[r.wan] = Some(r.seq);
        }
    }
}

#[test]
fn probes_leave_through_their_wan_only() {
    probes_leave_through_their_wan_only_in(Family::Ipv4);
}

#[test]
fn ipv6_probes_leave_through_their_wan_only() {
    probes_leave_through_their_wan_only_in(Family::Ipv6);
}

fn probes_leave_through_their_wan_only_in(f: Family) {
    if !is_root() {
        return;
    }
    Lab::new().run_in_a(move |lab| async move {
        let targets = targets(f);
        let (tx, mut rx) = mpsc::channel(64);
        let _p1 = Prober::spawn(spec(1, "a1", MARK1, targets.clone(), 4), tx.clone());
        let _p2 = Prober::spawn(spec(2, "a2", MARK2, targets, 4), tx);
        let mut order = Order(vec![None; 3]);

        // Every kind of probe answers through both WANs, with an RTT.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut answered = [false; 3];
        while !(answered[1] && answered[2]) {
            let r = next(&mut rx, deadline).await;
            order.check(&r);
            if r.success {
                for t in &r.results {
                    assert!(t.rtt.is_some_and(|d| d > Duration::ZERO), "{t:?}");
                    assert!(t.rtt.unwrap() < Duration::from_millis(400), "{t:?}");
                }
                answered[r.wan] = true;
            }
        }

        // B drops everything arriving through WAN 1's link.
        let b = lab.b.0.clone();
        tokio::task::spawn_blocking(move || {
            let rules = "table inet mwan_test {
                chain pre { type filter hook prerouting priority -300; iifname \"b1\" drop; }
            }";
            exec(&b, &["nft", "-f", "-"], rules);
        })
        .await
        .unwrap();
        expect_wan1_cut_off(&mut rx, &mut order).await;

        // WAN 1's table loses its route too: the mark alone would now fall
        // through to the main table (and WAN 2); the device binding holds.
        let a = lab.a.0.clone();
        let cmd = match f {
            Family::Ipv4 => "route del default table 1",
            Family::Ipv6 => "route del ::/0 table 1",
        };
        let ip = match f {
            Family::Ipv4 => ip,
            Family::Ipv6 => ip6,
        };
        tokio::task::spawn_blocking(move || ip(&a, cmd))
            .await
            .unwrap();
        expect_wan1_cut_off(&mut rx, &mut order).await;
    });
}

/// Six rounds of each WAN sent from now on: all of WAN 1's fail, all of
/// WAN 2's succeed.
async fn expect_wan1_cut_off(rx: &mut mpsc::Receiver<RoundReport>, order: &mut Order) {
    let from = Instant::now();
    let deadline = from + Duration::from_secs(10);
    let mut seen = [0; 3];
    while seen[1] < 6 || seen[2] < 6 {
        let r = next(rx, deadline).await;
        order.check(&r);
        if r.update || r.sent_at <= from {
            continue;
        }
        seen[r.wan] += 1;
        if r.wan == 1 {
            assert!(!r.success, "WAN 1 is cut off: {r:?}");
            for t in &r.results {
                // Lost, or still in flight when the round failed, or (IPv6,
                // whose route lookup honours the device binding) refused
                // at once for want of a route through the bound device.
                assert_eq!(t.rtt, None, "{t:?}");
                assert!(
                    matches!(t.error.as_deref(), None | Some(NO_ANSWER))
                        || t.error
                            .as_deref()
                            .is_some_and(|e| e.contains("unreachable")),
                    "{t:?}"
                );
            }
        } else {
            assert!(r.success, "WAN 2 still works: {r:?}");
        }
    }
}

#[test]
fn a_round_is_reported_when_decided_and_updated_when_complete() {
    if !is_root() {
        return;
    }
    Lab::new().run_in_a(|_lab| async move {
        // Nothing answers 192.0.2.99: B does not forward.
        let silent = ProbeTarget::Icmp(Ipv4Addr::new(192, 0, 2, 99).into());
        let (tx, mut rx) = mpsc::channel(64);
        let _p = Prober::spawn(spec(1, "a1", MARK1, vec![ICMP, silent], 1), tx);
        let deadline = Instant::now() + Duration::from_secs(10);
        let decision = loop {
            let r = next(&mut rx, deadline).await;
            if r.success && !r.update {
                break r;
            }
        };
        // Decided on the first answer, long before the timeout.
        assert!(
            decision.sent_at.elapsed() < Duration::from_millis(400),
            "{decision:?}"
        );
        assert!(decision.results[0].rtt.is_some());
        let pending = &decision.results[1];
        assert_eq!(
            (pending.rtt, pending.error.as_deref()),
            (None, None),
            "{decision:?}"
        );
        let update = loop {
            let r = next(&mut rx, deadline).await;
            if r.update && r.seq == decision.seq {
                break r;
            }
        };
        assert!(update.success);
        assert!(update.sent_at.elapsed() >= Duration::from_millis(400));
        assert_eq!(update.results[1].error.as_deref(), Some(NO_ANSWER));
        assert_eq!(update.results[0].rtt, decision.results[0].rtt);
    });
}

#[test]
fn a_missing_interface_fails_rounds_until_it_appears() {
    if !is_root() {
        return;
    }
    Lab::new().run_in_a(|lab| async move {
        let (tx, mut rx) = mpsc::channel(64);
        let targets = vec![
            ProbeTarget::Icmp(Ipv4Addr::new(100, 64, 0, 2).into()),
            ProbeTarget::Tcp(SocketAddr::from((Ipv4Addr::new(100, 64, 0, 2), 9))),
            ProbeTarget::Dns(SocketAddr::new(RESOLVER, 53)),
        ];
        let prober = Prober::spawn(spec(3, "late0", 0x3_0000, targets, 1), tx);
        assert_eq!(prober.spec().interface, "late0");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut order = Order(vec![None; 4]);
        for _ in 0..3 {
            let r = next(&mut rx, deadline).await;
            order.check(&r);
            assert!(!r.success);
            for t in &r.results {
                let e = t.error.as_deref().unwrap();
                assert!(e.contains("late0") && e.contains("No such device"), "{e}");
            }
        }

        // The link appears (like a PPP session coming up).
        let (a, b) = (lab.a.0.clone(), lab.b.0.clone());
        tokio::task::spawn_blocking(move || {
            ip(
                &a,
                &format!(
                    "link add late0 type veth peer name late1 netns {b}
                 addr add 100.64.0.1/30 dev late0
                 link set late0 up
                 route add default via 100.64.0.2 dev late0 table 3
                 rule add fwmark 0x30000/0xff0000 lookup 3 pref 102"
                ),
            );
            ip(&b, "addr add 100.64.0.2/30 dev late1\nlink set late1 up");
        })
        .await
        .unwrap();
        loop {
            let r = next(&mut rx, deadline).await;
            order.check(&r);
            if r.success {
                break;
            }
        }

        // Dropping the prober stops it: its sender goes away.
        drop(prober);
        while tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .expect("the prober keeps running after drop")
            .is_some()
        {}
    });
}
