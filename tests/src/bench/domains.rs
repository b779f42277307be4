//! Section 7: rules by domain name at scale. mwan with one rule listing
//! 50,000 names (`domains_file`) against the same mwan without it, in
//! interleaved rounds: the forwarding rate of small UDP packets and new
//! connections per second (ratios of the two, paired by round); then the
//! daemon's resident memory with and without the names, the time
//! `mwan reload` takes with them (the config and its names file re-read),
//! and the time to parse the file and build the matcher (what start and
//! reload do with it), measured in this process.
//!
//! With the rule active, every new flow pays the classifier's `DOMAIN_DST`
//! lookup (its destinations are not learned here: the lookup costs the
//! same hit or miss) and passes the DNS divert's rules in nat prerouting;
//! the relay itself is not on the path of non-DNS traffic.

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lab::mwan::config_with;
use lab::{Lab, Netns, SERVER, SERVER2};

use super::forwarding::{CPS_PORTS, UDP_PORT};
use super::traffic::{self, CpsServer, UdpCounter, Window};
use super::variants::{self, Variant};
use super::{sig, stats::summary};

#[derive(Clone, Debug)]
pub struct Params {
    pub rounds: usize,
    pub window: Window,
    pub udp_flows: usize,
    pub cps_threads: usize,
    pub names: usize,
}

/// One daemon configuration's measurements.
#[derive(Clone, Debug, Default)]
pub struct Side {
    /// Small UDP packets arriving in the internet, per second.
    pub udp: Vec<f64>,
    /// New connections per second.
    pub cps: Vec<f64>,
    /// Resident memory after start (KiB), one per round.
    pub rss_kib: Vec<f64>,
    /// `mwan reload` (the config file re-read) from the CLI, seconds.
    pub reload_secs: Vec<f64>,
}

#[derive(Clone, Debug)]
pub struct Domains {
    pub params: Params,
    /// Size of the names file.
    pub file_bytes: usize,
    pub without: Side,
    pub with: Side,
    /// `Config::load` of the config with the names file, seconds.
    pub parse_secs: Vec<f64>,
    /// `Config::domain_matcher` over the 50,000 names, seconds.
    pub matcher_secs: Vec<f64>,
}

/// `n` distinct names in a realistic spread of zones, one per line with a
/// comment at the top.
pub fn names_file(n: usize) -> String {
    let mut s = String::from("# bench: generated names\n");
    for i in 0..n {
        s += &format!("site-{i}.zone{}.example.br\n", i % 997);
    }
    s
}

pub fn run(p: &Params, log: &dyn Fn(String)) -> Result<Domains> {
    let lab = Lab::builder().lan_hosts(2).isps(2).build()?;
    for h in lab.hosts() {
        h.sysctls(&[("net.ipv4.ip_local_port_range", "1024 65535")])?;
    }
    let list = lab.dir().join("names.list");
    let text = names_file(p.names);
    std::fs::write(&list, &text)?;
    let rule = format!(
        "[[rule]]\nname = \"by name\"\ndomains_file = \"{}\"\nwans = [\"isp2\", \"isp1\"]\n",
        list.display()
    );
    let configs = [
        config_with(&lab, "", &|_| String::new(), ""),
        config_with(&lab, "", &|_| String::new(), &rule),
    ];

    let inet = lab.inet();
    let counter = UdpCounter::install(inet, UDP_PORT)?;
    let cps_server = CpsServer::start(inet, &[SERVER, SERVER2], CPS_PORTS)?;
    let hosts: Vec<&Netns> = lab.hosts().iter().map(|h| &**h).collect();
    let dsts = [
        SocketAddrV4::new(SERVER, UDP_PORT).into(),
        SocketAddrV4::new(SERVER2, UDP_PORT).into(),
    ];
    let mut sides = [Side::default(), Side::default()];
    for round in 0..p.rounds {
        // The order alternates from round to round.
        for k in 0..2 {
            sig::check()?;
            let which = (round + k) % 2;
            let active = variants::setup(&lab, Variant::Mwan, Some(&configs[which]))?;
            let mwan = active.mwan.as_ref().context("mwan variant")?;
            let s = &mut sides[which];
            if which == 1 {
                let relay = mwan
                    .log()
                    .contains("DNS relay for rules by domain name started");
                anyhow::ensure!(relay, "the domain rule did not start the relay");
            }
            s.rss_kib
                .push(rss_kib(mwan.pid().context("mwan pid")?)? as f64);
            let t = Instant::now();
            mwan.cli_ok(&["reload"])?;
            s.reload_secs.push(t.elapsed().as_secs_f64());
            let r = traffic::udp_flood(&hosts, &dsts, p.udp_flows, &counter, p.window)?;
            s.udp.push(r.received);
            let c = traffic::cps(&hosts, &cps_server, p.cps_threads, p.window)?;
            s.cps.push(c.rate);
            active.teardown()?;
        }
        log(format!(
            "  round {}/{}: without {} {}, with 50k names {} {}",
            round + 1,
            p.rounds,
            super::stats::si(*sides[0].udp.last().unwrap_or(&0.0), "pps"),
            super::stats::si(*sides[0].cps.last().unwrap_or(&0.0), "c/s"),
            super::stats::si(*sides[1].udp.last().unwrap_or(&0.0), "pps"),
            super::stats::si(*sides[1].cps.last().unwrap_or(&0.0), "c/s"),
        ));
    }

    let config_path = lab.dir().join("bench-domains.toml");
    std::fs::write(&config_path, &configs[1])?;
    let (mut parse_secs, mut matcher_secs) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let c = mwan::config::Config::load(&config_path)?;
        parse_secs.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let m = c.domain_matcher();
        matcher_secs.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(m.len() == p.names, "{} names in the matcher", m.len());
    }
    let [without, with] = sides;
    log(format!(
        "  RSS {:.1} MiB without, {:.1} MiB with {} names; parse {:.0} ms + matcher {:.0} ms; reload {:.0} ms vs {:.0} ms",
        summary(&without.rss_kib).median / 1024.0,
        summary(&with.rss_kib).median / 1024.0,
        p.names,
        summary(&parse_secs).median * 1e3,
        summary(&matcher_secs).median * 1e3,
        summary(&with.reload_secs).median * 1e3,
        summary(&without.reload_secs).median * 1e3,
    ));
    Ok(Domains {
        params: p.clone(),
        file_bytes: text.len(),
        without,
        with,
        parse_secs,
        matcher_secs,
    })
}

/// The daemon's resident memory (VmRSS), KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    // Let the start settle (the relay's threads, the first probe rounds).
    sig::sleep(Duration::from_millis(500))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS in /proc/pid/status")
}
