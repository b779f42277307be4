//! Section 3b: a busy router loses a WAN. The router carries 100,000
//! connections through ISP 1 (idle TCP connections, both ends held open,
//! and UDP flows answered by an echo server: each a conntrack entry
//! masqueraded to ISP 1's address and a pin in mwan's flow map) and a few
//! through ISP 2 (a rule sends the second server's traffic there); then
//! ISP 1 fails silently (`set_blackhole`) while a LAN host opens a new
//! connection every 5 ms, as in section 3.
//!
//! Measured from the failure: the first new connection answered through
//! ISP 2 (against the same on an idle router, in trials that alternate
//! with the busy ones), the moment the router's conntrack table holds no
//! LAN connection masqueraded to ISP 1 any more, when the daemon's
//! cleanup (the flush, the dump that follows it, the nudges to the TCP
//! clients) says it is done, and the latency of `mwan status --json`
//! asked every 50 ms meanwhile.
//!
//! Every trial starts a fresh daemon on a flushed conntrack table, so the
//! pins and entries of the last trial play no part.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use lab::mwan::{config_with, Mwan, Status};
use lab::{Lab, Netns, LAN0, SERVER, SERVER2};

use super::failover::{ms, primary_carries, Rng};
use super::held::{self, TcpBacklog, TcpClients, UdpEcho};
use super::sig;
use super::stats::{percentile, summary};
use super::traffic::first_success;

#[derive(Clone, Debug)]
pub struct Params {
    /// Pairs of trials (one busy, one idle).
    pub pairs: usize,
    /// Idle TCP connections and UDP flows through ISP 1.
    pub tcp: usize,
    pub udp: usize,
    /// Of each, through ISP 2.
    pub isp2: usize,
}

impl Params {
    pub fn held(&self) -> usize {
        self.tcp + self.udp
    }
}

/// What the daemon's log said about the cleanup of the dead WAN.
#[derive(Clone, Debug, Default)]
pub struct Cleanup {
    /// Failure → the log line that the cleanup deleted what the flush left
    /// (it comes after the flush, the read of the pins and the dump).
    pub deleted_at: Option<Duration>,
    /// Failure → the log line that the TCP clients were nudged.
    pub nudged_at: Option<Duration>,
    /// The flush by ct mark (`flushed_ms`) and the whole deletion (`ms`).
    pub flush_ms: Option<f64>,
    pub delete_ms: Option<f64>,
    /// Entries the dump found after the flush (`deleted`).
    pub deleted: Option<u64>,
    pub nudged: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Trial {
    pub busy: bool,
    /// Creating the held connections.
    pub setup: Duration,
    /// LAN connections masqueraded to ISP 1 (to ISP 2) in conntrack before
    /// the failure, and pins on ISP 1.
    pub isp1_entries: usize,
    pub isp2_entries: usize,
    pub isp1_pins: usize,
    /// ISP 2's connections still in conntrack after the cleanup.
    pub isp2_kept: usize,
    /// Failure → first new connection answered through ISP 2.
    pub failover: Duration,
    /// Failure → no LAN connection masqueraded to ISP 1 in conntrack.
    pub gone: Option<Duration>,
    pub cleanup: Cleanup,
    /// Latencies of `mwan status --json` (seconds), one every 50 ms from
    /// the failure until the cleanup was done.
    pub status: Vec<f64>,
    pub status_failed: usize,
}

#[derive(Clone, Debug)]
pub struct Busy {
    pub params: Params,
    pub trials: Vec<Trial>,
    /// The kernel's `nf_conntrack_max` (read-only in a namespace).
    pub conntrack_max: u64,
}

/// At most 64,512 UDP flows per destination behind one masquerade
/// address: the flows through ISP 1 are spread over these ports.
const ECHO_PORTS: std::ops::Range<u16> = 19000..19004;
const HOLD_PORTS: std::ops::Range<u16> = 19100..19104;
const WHOAMI_PORT_BASE: u16 = 19200;
const ATTEMPT_EVERY: Duration = Duration::from_millis(5);
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(300);
const STATUS_EVERY: Duration = Duration::from_millis(50);
/// Bound of every wait after the failure.
const LIMIT: Duration = Duration::from_secs(15);
/// The goal: a dead WAN's entries gone this soon after its failure.
pub const GOAL: Duration = Duration::from_secs(2);
/// UDP conntrack timeout in the router during the section, so that no
/// held flow expires by itself while it is measured.
pub(super) const UDP_TIMEOUT: &str = "600";

/// The servers the held connections go to, in the internet namespace.
struct Servers {
    _echo: UdpEcho,
    echo1: Vec<SocketAddrV4>,
    echo2: Vec<SocketAddrV4>,
    hold1: Vec<SocketAddrV4>,
    hold2: Vec<SocketAddrV4>,
}

impl Servers {
    fn start(lab: &Lab) -> Result<Servers> {
        let echo1: Vec<_> = ECHO_PORTS.map(|p| SocketAddrV4::new(SERVER, p)).collect();
        let echo2 = vec![SocketAddrV4::new(SERVER2, ECHO_PORTS.start)];
        let hold1: Vec<_> = HOLD_PORTS.map(|p| SocketAddrV4::new(SERVER, p)).collect();
        let hold2 = vec![SocketAddrV4::new(SERVER2, HOLD_PORTS.start)];
        let all_echo: Vec<_> = echo1.iter().chain(&echo2).copied().collect();
        Ok(Servers {
            _echo: UdpEcho::start(lab.inet(), &all_echo)?,
            echo1,
            echo2,
            hold1,
            hold2,
        })
    }
}

/// ISP 1 the primary, ISP 2 the backup (as in section 3), and the second
/// server's traffic through ISP 2 by a rule.
fn config(lab: &Lab) -> String {
    let rule = format!(
        "\n[[rule]]\nname = \"second server via isp2\"\ndst = \"{SERVER2}/32\"\nwans = [\"isp2\"]\n"
    );
    config_with(
        lab,
        "",
        &|i| {
            if i == 2 {
                "tier = 2\n".into()
            } else {
                String::new()
            }
        },
        &rule,
    )
}

pub fn run(p: &Params, log: &dyn Fn(String)) -> Result<Busy> {
    let lab = Lab::builder().lan_hosts(2).isps(2).build()?;
    for h in lab.hosts() {
        h.sysctls(&[("net.ipv4.ip_local_port_range", "1024 65535")])?;
    }
    lab.router().sysctls(&[
        ("net.netfilter.nf_conntrack_udp_timeout", UDP_TIMEOUT),
        ("net.netfilter.nf_conntrack_udp_timeout_stream", UDP_TIMEOUT),
    ])?;
    let conntrack_max: u64 = read_sysctl(lab.router(), "net/netfilter/nf_conntrack_max")?;
    ensure!(
        conntrack_max as usize > 2 * p.held(),
        "nf_conntrack_max is {conntrack_max}: too small for {} connections",
        p.held()
    );
    ensure!(
        p.udp < 64_512 * ECHO_PORTS.len(),
        "{} UDP flows do not fit behind one masquerade address",
        p.udp
    );
    let servers = Servers::start(&lab)?;
    let cfg = config(&lab);
    let mut rng = Rng::seeded();
    let mut trials = Vec::new();
    for k in 0..2 * p.pairs {
        // Busy and idle alternate, the busy one first in every other pair.
        let busy = (k % 2 == 0) == ((k / 2) % 2 == 0);
        let t = trial(&lab, &servers, &cfg, p, busy, k, &mut rng)?;
        log(trial_line(k + 1, 2 * p.pairs, &t));
        trials.push(t);
    }
    Ok(Busy {
        params: p.clone(),
        trials,
        conntrack_max,
    })
}

fn trial_line(k: usize, n: usize, t: &Trial) -> String {
    format!(
        "  trial {k:>2}/{n} {}: {}failover {:>4.0} ms, ISP 1's entries gone after {}, cleanup logged at {} (nudges {}), status p99 {:.0} ms max {:.0} ms ({} samples, {} failed)",
        if t.busy { "busy" } else { "idle" },
        if t.busy {
            format!(
                "{} entries via ISP 1 and {} pins made in {:.1} s, {} via ISP 2 ({} kept); ",
                t.isp1_entries,
                t.isp1_pins,
                t.setup.as_secs_f64(),
                t.isp2_entries,
                t.isp2_kept
            )
        } else {
            String::new()
        },
        ms(t.failover),
        opt_ms(t.gone),
        opt_ms(t.cleanup.deleted_at),
        opt_ms(t.cleanup.nudged_at),
        percentile(&t.status, 99.0) * 1e3,
        summary(&t.status).max * 1e3,
        t.status.len(),
        t.status_failed,
    )
}

pub(super) fn opt_ms(d: Option<Duration>) -> String {
    d.map_or("—".into(), |d| format!("{:.0} ms", ms(d)))
}

/// The held TCP connections of a busy trial: the servers' listeners,
/// whose accept queues hold their ends, and the processes holding the
/// clients'. Dropped, both ends are reset (the servers' first).
struct Held {
    backlog: Option<TcpBacklog>,
    clients: Vec<TcpClients>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.backlog.take();
        self.clients.clear();
    }
}

fn trial(
    lab: &Lab,
    servers: &Servers,
    cfg: &str,
    p: &Params,
    busy: bool,
    k: usize,
    rng: &mut Rng,
) -> Result<Trial> {
    let mwan = Mwan::start(lab, cfg)?;
    mwan.wait_all_up(Duration::from_secs(15))?;
    let port = |i: u16| SocketAddrV4::new(SERVER, WHOAMI_PORT_BASE + 2 * k as u16 + i);
    let (check, fail_srv) = (port(0), port(1));
    let _whoami = [
        lab.inet().tcp_whoami_server(check)?,
        lab.inet().tcp_whoami_server(fail_srv)?,
    ];
    let via = |isp: usize| move |ip: Ipv4Addr| lab.wan_of(ip) == Some(isp);
    primary_carries(lab, lab.host(0), check)?;
    let started = Instant::now();
    let held = if busy {
        Some(hold(lab, servers, p)?)
    } else {
        None
    };
    let setup = started.elapsed();
    let (isp1_entries, isp2_entries) = lab_entries(lab)?;
    let isp1_pins = pins_on(lab, wan_id(&mwan.status(), "isp1")?)?;
    if busy {
        ensure!(
            isp1_entries >= p.held() && isp2_entries >= 2 * p.isp2,
            "{isp1_entries} entries via ISP 1 and {isp2_entries} via ISP 2 for {} and {}",
            p.held(),
            2 * p.isp2
        );
    }
    // A random phase against the probe rounds.
    sig::sleep(Duration::from_millis(rng.below(300)))?;
    let measured = fail(lab, &mwan, fail_srv, busy && p.tcp > 0, &via(2));
    // The servers' ends are reset while ISP 1 still drops what they send.
    drop(held);
    drop(mwan);
    lab.isp(1).set_blackhole(false)?;
    lab.clear_plain_routing()?;
    let m = measured?;
    Ok(Trial {
        busy,
        setup,
        isp1_entries,
        isp2_entries,
        isp1_pins,
        isp2_kept: m.isp2_kept,
        failover: m.failover,
        gone: m.gone,
        cleanup: m.cleanup,
        status: m.status,
        status_failed: m.status_failed,
    })
}

/// Opens the held connections from both LAN hosts: through ISP 1 `p.tcp`
/// TCP connections and `p.udp` UDP flows, through ISP 2 `p.isp2` of each.
fn hold(lab: &Lab, s: &Servers, p: &Params) -> Result<Held> {
    let all: Vec<_> = s.hold1.iter().chain(&s.hold2).copied().collect();
    let backlog = TcpBacklog::listen(lab.inet(), &all)?;
    let hosts = lab.hosts();
    let n = hosts.len();
    let results = std::thread::scope(|sc| {
        let jobs: Vec<_> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let share = move |total: usize| total / n + usize::from(i < total % n);
                sc.spawn(move || -> Result<(Vec<TcpClients>, usize)> {
                    let udp = held::udp_flows(h, h.addr(), &s.echo1, share(p.udp))?
                        + held::udp_flows(h, h.addr(), &s.echo2, share(p.isp2))?;
                    let tcp = vec![
                        TcpClients::open(h, &s.hold1, share(p.tcp))?,
                        TcpClients::open(h, &s.hold2, share(p.isp2))?,
                    ];
                    Ok((tcp, udp))
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().expect("no panic"))
            .collect::<Result<Vec<_>>>()
    })?;
    let mut held = Held {
        backlog: None,
        clients: Vec::new(),
    };
    let (mut udp, mut failed) = (0, 0);
    for (tcp, u) in results {
        failed += tcp.iter().map(|c| c.failed).sum::<usize>();
        held.clients.extend(tcp);
        udp += u;
    }
    let (want_udp, want_tcp) = (p.udp + p.isp2, p.tcp + p.isp2);
    ensure!(
        udp == want_udp && failed == 0,
        "{udp} of {want_udp} UDP flows answered, {failed} of {want_tcp} TCP connections failed"
    );
    let queued = backlog.queued()?;
    ensure!(
        queued >= want_tcp,
        "the servers' accept queues hold {queued} of {want_tcp} TCP connections"
    );
    held.backlog = Some(backlog);
    Ok(held)
}

/// What was measured after the failure.
struct Measured {
    failover: Duration,
    gone: Option<Duration>,
    cleanup: Cleanup,
    status: Vec<f64>,
    status_failed: usize,
    isp2_kept: usize,
}

/// Blackholes ISP 1 and measures, concurrently: the first new connection
/// through ISP 2, the moment ISP 1's entries are gone, the daemon's
/// cleanup lines, and `mwan status` every 50 ms until the cleanup is done
/// (`nudges`: until its nudges are logged too).
fn fail(
    lab: &Lab,
    mwan: &Mwan,
    fail_srv: SocketAddrV4,
    nudges: bool,
    via2: &(dyn Fn(Ipv4Addr) -> bool + Sync),
) -> Result<Measured> {
    let isp1: IpAddr = lab.isp(1).router_addr().addr().into();
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    lab.isp(1).set_blackhole(true)?;
    let (failover, gone, cleanup, status) = std::thread::scope(|s| {
        let status = s.spawn(|| sample_status(mwan, &stop));
        let gone = s.spawn(|| wait_gone(lab.router(), isp1, t0));
        let cleanup = s.spawn(|| watch_cleanup(mwan, t0, nudges));
        let failover = first_success(
            lab.host(0),
            fail_srv,
            ATTEMPT_EVERY,
            ATTEMPT_TIMEOUT,
            LIMIT,
            via2,
        );
        let gone = gone.join().expect("no panic");
        let cleanup = cleanup.join().expect("no panic");
        // Half a second more of status after the last of it.
        let _ = sig::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        (failover, gone, cleanup, status.join().expect("no panic"))
    });
    let (at, _) =
        failover?.ok_or_else(|| anyhow!("no connection through isp2 within {LIMIT:?}"))?;
    let (status, status_failed) = status?;
    Ok(Measured {
        failover: at - t0,
        gone: gone?,
        cleanup: cleanup?,
        status,
        status_failed,
        isp2_kept: lab_entries(lab)?.1,
    })
}

/// `mwan status --json` every [`STATUS_EVERY`] (the next right after a
/// slower answer) until `stop`: the latencies of the answers, and how many
/// gave none.
fn sample_status(mwan: &Mwan, stop: &AtomicBool) -> Result<(Vec<f64>, usize)> {
    let (mut lat, mut failed) = (Vec::new(), 0);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) && lat.len() + failed < 10_000 {
        sig::check()?;
        let t = Instant::now();
        let out = mwan.cli(&["status", "--json"])?;
        let el = t.elapsed().as_secs_f64();
        // Exit codes 4 and 5 say a WAN is down; the JSON is there.
        match serde_json::from_slice::<Status>(&out.stdout) {
            Ok(_) => lat.push(el),
            Err(_) => failed += 1,
        }
        next += STATUS_EVERY;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    Ok((lat, failed))
}

/// A LAN connection masqueraded to `wan` (its reply comes back to that
/// address).
fn lan_via(e: &mwan::conntrack::CtEntry, wan: IpAddr) -> bool {
    matches!(e.orig.src, IpAddr::V4(a) if LAN0.contains(&a)) && e.reply.dst == wan
}

/// LAN connections masqueraded to ISP 1, and to the second server
/// masqueraded to ISP 2 (the rule's), in the router's conntrack table.
fn lab_entries(lab: &Lab) -> Result<(usize, usize)> {
    let a: IpAddr = lab.isp(1).router_addr().addr().into();
    let b: IpAddr = lab.isp(2).router_addr().addr().into();
    let entries = lab.router().run(mwan::conntrack::dump)?;
    Ok((
        entries.iter().filter(|e| lan_via(e, a)).count(),
        entries
            .iter()
            .filter(|e| lan_via(e, b) && e.orig.dst == IpAddr::from(SERVER2))
            .count(),
    ))
}

/// Polls the router's conntrack table until it holds no LAN connection
/// masqueraded to `isp1`: the entry count every 10 ms, and while it is
/// below a fifth of a busy table a dump (cheap then) that must find none.
/// Returns when, from `t0`, or `None` after [`LIMIT`].
fn wait_gone(router: &Netns, isp1: IpAddr, t0: Instant) -> Result<Option<Duration>> {
    router.run(|| loop {
        sig::check()?;
        if t0.elapsed() > LIMIT {
            return Ok(None);
        }
        let count: u64 = read_proc("net/netfilter/nf_conntrack_count")?;
        if count < 20_000 {
            let left = mwan::conntrack::dump()?
                .iter()
                .filter(|e| lan_via(e, isp1))
                .count();
            if left == 0 {
                return Ok(Some(t0.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    })
}

fn read_proc<T: std::str::FromStr>(key: &str) -> Result<T> {
    let path = format!("/proc/sys/{key}");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.trim()
        .parse()
        .map_err(|_| anyhow!("{path}: not a number: {text:?}"))
}

fn read_sysctl<T: std::str::FromStr + Send>(ns: &Netns, key: &str) -> Result<T> {
    ns.run(|| read_proc(key))
}

/// Watches the daemon's log for the lines of the cleanup of the dead WAN
/// (the deletion after the flush; the nudges when `nudges`), until they
/// are there or [`LIMIT`]; the times they appeared and their figures.
fn watch_cleanup(mwan: &Mwan, t0: Instant, nudges: bool) -> Result<Cleanup> {
    const DELETED: &str = "conntrack entries of the dead WAN deleted";
    const NUDGED: &str = "TCP clients of the dead WAN nudged";
    let mut c = Cleanup::default();
    let before = mwan.log();
    let seen = |text: &str, what: &str| text.matches(what).count() > before.matches(what).count();
    while t0.elapsed() < LIMIT && (c.deleted_at.is_none() || (nudges && c.nudged_at.is_none())) {
        sig::check()?;
        let text = mwan.log();
        if c.deleted_at.is_none() && seen(&text, DELETED) {
            c.deleted_at = Some(t0.elapsed());
            let line = last_line(&text, DELETED);
            c.flush_ms = field(line, "flushed_ms");
            c.delete_ms = field(line, "ms");
            c.deleted = field(line, "deleted").map(|v| v as u64);
        }
        if c.nudged_at.is_none() && seen(&text, NUDGED) {
            c.nudged_at = Some(t0.elapsed());
            c.nudged = field(last_line(&text, NUDGED), "connections").map(|v| v as u64);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(c)
}

fn last_line<'t>(text: &'t str, what: &str) -> &'t str {
    text.lines().rev().find(|l| l.contains(what)).unwrap_or("")
}

/// The value of `key=…` in a log line.
fn field(line: &str, key: &str) -> Option<f64> {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
}

fn wan_id(s: &Status, name: &str) -> Result<u8> {
    s.wans
        .iter()
        .find(|w| w.name == name)
        .map(|w| w.id)
        .with_context(|| format!("no WAN {name} in mwan status"))
}

/// Pins on WAN `id` in the lab's flow maps.
fn pins_on(lab: &Lab, id: u8) -> Result<usize> {
    let mut n = 0;
    mwan::datapath::read_flows(&lab.pin_dir(), 8192, |_, v| {
        n += usize::from(v.wan == id);
        true
    })?;
    Ok(n)
}
