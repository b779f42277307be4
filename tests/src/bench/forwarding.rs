//! Sections 1 and 2: forwarding cost (TCP bulk, small-packet UDP) and new
//! connections per second through the router, for the four variants,
//! interleaved over several rounds; then the classifier's own cost from
//! the kernel's BPF statistics.

use std::net::SocketAddrV4;

use anyhow::Result;
use lab::{Lab, Netns, SERVER, SERVER2};

use super::traffic::{self, CpsServer, TcpSink, UdpCounter, Window};
use super::variants::{self, Variant, ALL};
use super::{bpf, sig};

/// UDP port of the packet-rate tests (counted and dropped in the internet).
pub const UDP_PORT: u16 = 9999;
const SINK_PORT: u16 = 9000;
pub const CPS_PORTS: std::ops::Range<u16> = 9100..9108;

#[derive(Clone, Debug)]
pub struct Params {
    pub rounds: usize,
    pub window: Window,
    pub tcp_streams: usize,
    pub udp_flows: usize,
    /// Connection-opening threads per LAN host.
    pub cps_threads: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Samples {
    /// TCP bulk, bits per second.
    pub tcp: Vec<f64>,
    /// Small UDP packets arriving in the internet, per second.
    pub udp: Vec<f64>,
    /// Small UDP packets the senders handed to the kernel, per second.
    pub udp_sent: Vec<f64>,
    /// New connections per second.
    pub cps: Vec<f64>,
    pub cps_failed: u64,
}

/// The classifier's cost per run, from BPF run-time statistics.
#[derive(Clone, Debug, Default)]
pub struct BpfCost {
    pub ns: f64,
    pub runs: u64,
}

#[derive(Clone, Debug)]
pub struct Forwarding {
    pub params: Params,
    pub hosts: usize,
    pub isps: usize,
    pub samples: Vec<Samples>,
    pub bpf_udp: BpfCost,
    pub bpf_tcp: BpfCost,
    pub bpf_cps: BpfCost,
    /// Classifier runs per established connection in the new-connection
    /// test (SYN, ACK, RST: about 3).
    pub runs_per_conn: f64,
}

#[derive(Clone, Copy)]
enum Test {
    Udp,
    Tcp,
    Cps,
}

pub fn run(p: &Params, log: &dyn Fn(String)) -> Result<Forwarding> {
    let lab = Lab::builder().lan_hosts(2).isps(2).build()?;
    for h in lab.hosts() {
        h.sysctls(&[("net.ipv4.ip_local_port_range", "1024 65535")])?;
    }
    let inet = lab.inet();
    let sink_addr = SocketAddrV4::new(SERVER, SINK_PORT);
    let sink = TcpSink::start(inet, sink_addr)?;
    let counter = UdpCounter::install(inet, UDP_PORT)?;
    let cps_server = CpsServer::start(inet, &[SERVER, SERVER2], CPS_PORTS)?;
    let hosts: Vec<&Netns> = lab.hosts().iter().map(|h| &**h).collect();
    let dsts = [
        SocketAddrV4::new(SERVER, UDP_PORT).into(),
        SocketAddrV4::new(SERVER2, UDP_PORT).into(),
    ];
    let mut samples = vec![Samples::default(); ALL.len()];
    for round in 0..p.rounds {
        // One test at a time over all variants, so the measurements a ratio
        // compares are seconds apart; the order of the variants rotates
        // from round to round, so none always runs first (or after the
        // same neighbour).
        for test in [Test::Udp, Test::Tcp, Test::Cps] {
            for k in 0..ALL.len() {
                sig::check()?;
                let v = ALL[(round + k) % ALL.len()];
                let active = variants::setup(&lab, v, None)?;
                let s = &mut samples[v.index()];
                match test {
                    Test::Udp => {
                        let r = traffic::udp_flood(&hosts, &dsts, p.udp_flows, &counter, p.window)?;
                        s.udp.push(r.received);
                        s.udp_sent.push(r.sent);
                    }
                    Test::Tcp => s.tcp.push(traffic::tcp_bulk(
                        &hosts,
                        &sink,
                        sink_addr,
                        p.tcp_streams,
                        p.window,
                    )?),
                    Test::Cps => {
                        let r = traffic::cps(&hosts, &cps_server, p.cps_threads, p.window)?;
                        s.cps.push(r.rate);
                        s.cps_failed += r.failed;
                    }
                }
                active.teardown()?;
            }
        }
        let mut line = format!("  round {}/{}:", round + 1, p.rounds);
        for v in ALL {
            let s = &samples[v.index()];
            line += &format!(
                "  ({}) {} {} {}",
                v.letter(),
                super::stats::si(*s.udp.last().unwrap_or(&0.0), "pps"),
                super::stats::si(*s.tcp.last().unwrap_or(&0.0), "bit/s"),
                super::stats::si(*s.cps.last().unwrap_or(&0.0), "c/s"),
            );
        }
        log(line);
    }

    // The classifier's own cost, with BPF statistics enabled only now (they
    // add two clock reads per run, so they stay off while the variants are
    // compared).
    sig::check()?;
    let active = variants::setup(&lab, Variant::Mwan, None)?;
    let id = bpf::lan_prog_id(&lab)?;
    let (ns, runs, _) = bpf::cost_during(id, || {
        traffic::udp_flood(&hosts, &dsts, p.udp_flows, &counter, p.window)
    })?;
    let bpf_udp = BpfCost { ns, runs };
    let (ns, runs, _) = bpf::cost_during(id, || {
        traffic::tcp_bulk(&hosts, &sink, sink_addr, p.tcp_streams, p.window)
    })?;
    let bpf_tcp = BpfCost { ns, runs };
    let (ns, runs, c) = bpf::cost_during(id, || {
        traffic::cps(&hosts, &cps_server, p.cps_threads, p.window)
    })?;
    let bpf_cps = BpfCost { ns, runs };
    let runs_per_conn = runs as f64 / c.total.max(1) as f64;
    active.teardown()?;
    log(format!(
        "  eBPF mwan_lan_eth: {:.0} ns/run (UDP flood), {:.0} ns/run (TCP bulk), {:.0} ns/run (new connections)",
        bpf_udp.ns, bpf_tcp.ns, bpf_cps.ns
    ));
    Ok(Forwarding {
        params: p.clone(),
        hosts: hosts.len(),
        isps: lab.isp_count(),
        samples,
        bpf_udp,
        bpf_tcp,
        bpf_cps,
        runs_per_conn,
    })
}
