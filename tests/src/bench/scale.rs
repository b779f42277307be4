//! Section 4: a flow map with a million real pins: its kernel memory, the
//! time `mwan flows --json` takes to list it, and the forwarding rate
//! while it is full.
//!
//! The pins are made by real packets: a LAN host sends UDP packets with
//! distinct 5-tuples (source port × destination address) through the
//! router with an AF_PACKET socket. mwan pins at tc ingress, before
//! conntrack, so the router's conntrack table overflowing (it holds far
//! fewer entries) does not matter; it is flushed before the rate is
//! measured.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lab::mwan::config_with;
use lab::{Lab, Netns, SERVER, SERVER2};

use super::forwarding::{BpfCost, UDP_PORT};
use super::traffic::{self, UdpCounter, Window};
use super::variants::{self, Variant};
use super::{bpf, sig};

#[derive(Clone, Debug)]
pub struct Params {
    pub max_flows: u32,
    pub reps: usize,
    pub window: Window,
    pub udp_flows: usize,
    /// Pacing of the packets that fill the map.
    pub fill_pps: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Scale {
    pub max_flows: u64,
    pub pins: u64,
    pub pins_after_rate_test: u64,
    pub memlock: u64,
    pub fill_packets: u64,
    pub fill_secs: f64,
    /// Wall time of `mwan flows --json` (piped to `wc -c`), per run.
    pub list_secs: Vec<f64>,
    pub list_bytes: u64,
    /// Small-UDP packet rates (received per second).
    pub rate_plain: Vec<f64>,
    pub rate_empty: Vec<f64>,
    pub rate_full: Vec<f64>,
    pub bpf_empty: BpfCost,
    pub bpf_full: BpfCost,
}

pub fn run(p: &Params, log: &dyn Fn(String)) -> Result<Scale> {
    let lab = Lab::builder().lan_hosts(2).isps(2).build()?;
    let counter = UdpCounter::install(lab.inet(), UDP_PORT)?;
    let hosts: Vec<&Netns> = lab.hosts().iter().map(|h| &**h).collect();
    let dsts = [
        SocketAddrV4::new(SERVER, UDP_PORT).into(),
        SocketAddrV4::new(SERVER2, UDP_PORT).into(),
    ];
    let rate = || -> Result<f64> {
        Ok(traffic::udp_flood(&hosts, &dsts, p.udp_flows, &counter, p.window)?.received)
    };
    let mut out = Scale {
        max_flows: u64::from(p.max_flows),
        ..Scale::default()
    };

    // Baseline (a) in this lab, before.
    let plain = variants::setup(&lab, Variant::Plain, None)?;
    for _ in 0..p.reps {
        out.rate_plain.push(rate()?);
    }
    plain.teardown()?;

    let cfg = config_with(
        &lab,
        &format!("max_flows = {}", p.max_flows),
        &|_| String::new(),
        "",
    );
    let active = variants::setup(&lab, Variant::Mwan, Some(&cfg))?;
    let pin_dir = lab.pin_dir();
    let id = bpf::lan_prog_id(&lab)?;
    for _ in 0..p.reps {
        out.rate_empty.push(rate()?);
    }
    let (ns, runs, _) = bpf::cost_during(id, rate)?;
    out.bpf_empty = BpfCost { ns, runs };
    log(format!(
        "  empty map: {} ({} flows), classifier {ns:.0} ns/packet",
        super::stats::si(super::stats::summary(&out.rate_empty).median, "pps"),
        bpf::count_flows(&pin_dir)?
    ));

    // Fill the map with real pins.
    let router_mac = traffic::parse_mac(&lab.router().sh("cat /sys/class/net/lan0/address")?)?;
    let host = lab.host(0);
    let host_mac = traffic::parse_mac(&host.sh("cat /sys/class/net/eth0/address")?)?;
    let target = u64::from(p.max_flows) * 98 / 100;
    let start = Instant::now();
    for pass in 0..4u32 {
        sig::check()?;
        // Destinations 203.0.113.128 and up: lab addresses nothing uses;
        // the internet counts and drops the packets (UDP port UDP_PORT).
        let first_dst = Ipv4Addr::new(203, 0, 113, 128 + 32 * pass as u8);
        let count = u64::from(p.max_flows) + u64::from(p.max_flows) / 8;
        let st = traffic::fill_flows(
            host,
            host_mac,
            router_mac,
            host.addr(),
            first_dst,
            UDP_PORT,
            count,
            p.fill_pps,
        )?;
        out.fill_packets += st.sent;
        out.pins = bpf::count_flows(&pin_dir)?;
        log(format!(
            "  fill pass {}: sent {} packets in {:.1} s; {} flows pinned",
            pass + 1,
            st.sent,
            st.secs,
            out.pins
        ));
        if out.pins >= target {
            break;
        }
    }
    out.fill_secs = start.elapsed().as_secs_f64();
    if out.pins < target {
        bail!(
            "only {} of {} flows pinned after 4 passes",
            out.pins,
            p.max_flows
        );
    }
    let facts = bpf::flow_map_facts(&pin_dir)?;
    out.memlock = facts.memlock;
    out.max_flows = facts.max_entries;

    // The fill overflowed the router's conntrack table; flush it now (so
    // the rate test's flows are not dropped there), before the listing,
    // which gives the kernel time to free the entries before the rate is
    // measured.
    lab.clear_plain_routing()?;

    // Listing.
    let mwan = active.mwan.as_ref().expect("mwan variant");
    let script = format!(
        "{} --config {} flows --json | wc -c",
        lab::mwan::binary().display(),
        mwan.config.display()
    );
    for _ in 0..2 {
        sig::check()?;
        let t = Instant::now();
        let text = lab.router().sh(&script).context("mwan flows --json")?;
        out.list_secs.push(t.elapsed().as_secs_f64());
        out.list_bytes = text.trim().parse().unwrap_or(0);
    }
    log(format!(
        "  mwan flows --json: {} flows, {:.1} MB of JSON in {:.2} s",
        out.pins,
        out.list_bytes as f64 / 1e6,
        super::stats::summary(&out.list_secs).median
    ));

    // Forwarding with the map full.
    sig::sleep(Duration::from_secs(1))?;
    for _ in 0..p.reps {
        out.rate_full.push(rate()?);
    }
    let (ns, runs, _) = bpf::cost_during(id, rate)?;
    out.bpf_full = BpfCost { ns, runs };
    out.pins_after_rate_test = bpf::count_flows(&pin_dir)?;
    log(format!(
        "  full map: {} ({} flows), classifier {ns:.0} ns/packet",
        super::stats::si(super::stats::summary(&out.rate_full).median, "pps"),
        out.pins_after_rate_test
    ));
    active.teardown()?;

    // Baseline (a) again, after.
    let plain = variants::setup(&lab, Variant::Plain, None)?;
    for _ in 0..p.reps {
        out.rate_plain.push(rate()?);
    }
    plain.teardown()?;
    Ok(out)
}
