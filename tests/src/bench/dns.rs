//! Section 8: the DNS relay of rules by domain name, under load. dnsperf
//! (Debian's DNS load tool) on a LAN host asks a dnsmasq resolver in the
//! internet through the router, with mwan running a domain rule (every
//! LAN query goes through the relay) against the same mwan without domain
//! rules (the queries are forwarded by the kernel), in interleaved rounds:
//! only the relay differs. Measured: answers per second and latency
//! (median, 99th percentile) at 1,000 and 10,000 queries per second and as
//! fast as the answers come; then a flood: one LAN host asks as fast as it
//! can with many queries in flight while another does paced lookups, whose
//! success rate and latency are reported.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result};
use lab::dnsperf::{self, Load, Report, PERF_RESOLVER};
use lab::mwan::config_with;
use lab::Lab;

use super::sig;
use super::stats::si;
use super::variants::{self, Variant};

#[derive(Clone, Debug)]
pub struct Params {
    pub rounds: usize,
    /// Length of one dnsperf run.
    pub run: Duration,
    /// The paced loads, queries per second; an unpaced one follows.
    pub rates: Vec<u32>,
    /// The paced lookups of the flood's other host, per second.
    pub victim_rate: u32,
}

/// dnsperf's queries in flight and sockets for the paced and unpaced
/// loads (well within the relay's per-client bound, so none is refused;
/// enough to keep the lab busy either way).
pub const OUTSTANDING: u32 = 48;
pub const CLIENTS: u32 = 8;
/// The flood: queries in flight and sockets of the flooding host.
pub const FLOOD_OUTSTANDING: u32 = 2000;
pub const FLOOD_CLIENTS: u32 = 16;
/// A query unanswered this long counts as lost.
pub const TIMEOUT: Duration = Duration::from_secs(1);
/// Names in the query file; one in `LISTED_EVERY` is under the rule's zone.
const NAMES: usize = 10_000;
const LISTED_EVERY: usize = 10;
const LISTED: &str = "listed.example";
const OTHER: &str = "bench.example";

/// One run's figures.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    /// Answers per second.
    pub qps: f64,
    /// Seconds.
    pub median: f64,
    pub p99: f64,
    /// Answered share of the queries sent.
    pub success: f64,
    /// CPU time of the mwan daemon (every thread, user and system: the
    /// packets its system calls carry through the router included) per
    /// answer, seconds.
    pub mwan_cpu: f64,
    /// The same of the resolver (dnsmasq).
    pub resolver_cpu: f64,
}

impl From<&Report> for Figures {
    fn from(r: &Report) -> Figures {
        Figures {
            qps: r.qps,
            median: r.latency_percentile(50.0),
            p99: r.latency_percentile(99.0),
            success: r.success(),
            mwan_cpu: f64::NAN,
            resolver_cpu: f64::NAN,
        }
    }
}

/// One daemon configuration's runs, one per round each.
#[derive(Clone, Debug, Default)]
pub struct Side {
    /// Per load (the paced rates in order, then unpaced): one per round.
    pub loads: Vec<Vec<Figures>>,
    /// The paced host during the flood.
    pub victim: Vec<Figures>,
    /// The flooding host.
    pub flood: Vec<Figures>,
}

#[derive(Clone, Debug)]
pub struct DnsRelay {
    pub params: Params,
    /// mwan without domain rules: the relay is off.
    pub off: Side,
    /// mwan with a domain rule: every query goes through the relay.
    pub on: Side,
}

impl Params {
    /// The loads in order: each paced rate, then unpaced.
    pub fn loads(&self) -> Vec<Option<u32>> {
        self.rates.iter().copied().map(Some).chain([None]).collect()
    }
}

pub fn run(p: &Params, log: &dyn Fn(String)) -> Result<DnsRelay> {
    dnsperf::check_dnsperf()?;
    let lab = Lab::builder().lan_hosts(2).isps(2).build()?;
    let resolver = dnsperf::start_resolver(
        &lab,
        &[
            (LISTED, Ipv4Addr::new(203, 0, 113, 200)),
            (OTHER, Ipv4Addr::new(203, 0, 113, 201)),
        ],
    )?;
    let names = lab.dir().join("dnsperf-names.txt");
    dnsperf::names_file(&names, NAMES, LISTED, OTHER, LISTED_EVERY)?;
    let rule = format!(
        "[[rule]]\nname = \"by name\"\ndomains = [\"{LISTED}\"]\nwans = [\"isp2\", \"isp1\"]\n"
    );
    let configs = [
        config_with(&lab, "", &|_| String::new(), ""),
        config_with(&lab, "", &|_| String::new(), &rule),
    ];
    let server = SocketAddrV4::new(PERF_RESOLVER, 53);
    let mut sides = [Side::default(), Side::default()];
    for s in &mut sides {
        s.loads = vec![Vec::new(); p.loads().len()];
    }
    for round in 0..p.rounds {
        for k in 0..2 {
            sig::check()?;
            let which = (round + k) % 2;
            let active = variants::setup(&lab, Variant::Mwan, Some(&configs[which]))?;
            let mwan = active.mwan.as_ref().context("mwan variant")?;
            let relay = mwan
                .log()
                .contains("DNS relay for rules by domain name started");
            anyhow::ensure!(
                relay == (which == 1),
                "relay running: {relay}, side {which}"
            );
            let side = &mut sides[which];
            let pids = [mwan.pid().context("mwan pid")?, resolver.pid()];
            for (i, rate) in p.loads().into_iter().enumerate() {
                let load = Load {
                    rate,
                    outstanding: OUTSTANDING,
                    clients: CLIENTS,
                    duration: p.run,
                    timeout: TIMEOUT,
                };
                let before = [cpu_secs(pids[0])?, cpu_secs(pids[1])?];
                let r = dnsperf::start(lab.host(0), server, &names, &load)?.finish()?;
                let after = [cpu_secs(pids[0])?, cpu_secs(pids[1])?];
                let per = |k: usize| (after[k] - before[k]) / r.completed.max(1) as f64;
                let mut f = Figures::from(&r);
                (f.mwan_cpu, f.resolver_cpu) = (per(0), per(1));
                side.loads[i].push(f);
            }
            let (victim, flood) = flood(&lab, server, &names, p)?;
            side.victim.push(victim);
            side.flood.push(flood);
            active.teardown()?;
        }
        log(round_line(p, round, &sides));
    }
    let [off, on] = sides;
    Ok(DnsRelay {
        params: p.clone(),
        off,
        on,
    })
}

/// One host floods (unpaced, [`FLOOD_OUTSTANDING`] in flight) while the
/// other asks at `victim_rate`: the other's figures, then the flood's.
fn flood(
    lab: &Lab,
    server: SocketAddrV4,
    names: &std::path::Path,
    p: &Params,
) -> Result<(Figures, Figures)> {
    let flood = Load {
        rate: None,
        outstanding: FLOOD_OUTSTANDING,
        clients: FLOOD_CLIENTS,
        duration: p.run + Duration::from_millis(1000),
        timeout: TIMEOUT,
    };
    let paced = Load {
        rate: Some(p.victim_rate),
        outstanding: 10,
        clients: 1,
        duration: p.run,
        timeout: TIMEOUT,
    };
    let flooding = dnsperf::start(lab.host(0), server, names, &flood)?;
    sig::sleep(Duration::from_millis(500))?;
    let victim = dnsperf::start(lab.host(1), server, names, &paced)?.finish()?;
    let flood = flooding.finish()?;
    Ok((Figures::from(&victim), Figures::from(&flood)))
}

/// CPU time (user and system, all threads) of process `pid`, seconds.
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name in parentheses: fields 3 on; utime and stime
    // are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("/proc/pid/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

fn round_line(p: &Params, round: usize, sides: &[Side; 2]) -> String {
    let last = |s: &Side| -> String {
        let max = s
            .loads
            .last()
            .and_then(|l| l.last())
            .copied()
            .unwrap_or_default();
        let v = s.victim.last().copied().unwrap_or_default();
        format!(
            "max {} (median {:.3} ms), flood's victim {:.1} % answered, p99 {:.2} ms",
            si(max.qps, "qps"),
            max.median * 1e3,
            v.success * 100.0,
            v.p99 * 1e3
        )
    };
    format!(
        "  round {}/{}: relay off: {}; relay on: {}",
        round + 1,
        p.rounds,
        last(&sides[0]),
        last(&sides[1])
    )
}
