//! Sections 1 and 2: forwarding cost (TCP bulk, small-packet UDP) and new
//! connections per second through the router, for the four variants,
//! interleaved over several rounds, with mwan's pieces one at a time
//! beside them (UDP and new connections; section 1c); then the
//! classifier's own cost from the kernel's BPF statistics, and where the
//! kernel spends its time per packet (`perf`, [`profile`]).
//!
//! Two identical labs: the variants without ip rules run in one whose
//! router never had a rule, the others in a second one (see
//! [`variants`]).

use std::net::SocketAddrV4;

use anyhow::Result;
use lab::{Lab, Netns, SERVER, SERVER2};

use super::traffic::{self, CpsServer, TcpSink, UdpCounter, Window};
use super::variants::{self, Variant, ALL, EVERY, PARTS};
use super::{bpf, profile, sig};

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
    /// The loaded variants of mwan measured in every test (of
    /// [`variants::LOADED`]).
    pub loaded: Vec<Variant>,
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
    /// Kernel time per packet by component during the UDP test, per
    /// profiled variant (empty when `perf` is missing).
    pub profiles: Vec<(Variant, profile::Profile)>,
}

/// Whether the LAN bridge passes its frames through netfilter
/// (`br_netfilter`'s `bridge-nf-call-iptables`). Off, as on a router
/// without Docker; kernels with br_netfilter built in (or loaded) turn it
/// on in every namespace, and the lab leaves that default alone.
pub const BRIDGE_NETFILTER: bool = false;

/// Sets `bridge-nf-call-iptables` and `-ip6tables` in the router of `lab`
/// (nothing to do where the kernel has no br_netfilter).
pub fn bridge_netfilter(lab: &Lab, on: bool) -> Result<()> {
    if !std::path::Path::new("/proc/sys/net/bridge").exists() {
        return Ok(());
    }
    let v = if on { "1" } else { "0" };
    lab.router().sysctls(&[
        ("net.bridge.bridge-nf-call-iptables", v),
        ("net.bridge.bridge-nf-call-ip6tables", v),
    ])
}

/// One lab with the servers and clients the tests need.
struct Site<'l> {
    lab: &'l Lab,
    hosts: Vec<&'l Netns>,
    sink: TcpSink,
    sink_addr: SocketAddrV4,
    counter: UdpCounter<'l>,
    cps_server: CpsServer,
    dsts: [std::net::SocketAddr; 2],
}

impl<'l> Site<'l> {
    fn new(lab: &'l Lab) -> Result<Site<'l>> {
        bridge_netfilter(lab, BRIDGE_NETFILTER)?;
        for h in lab.hosts() {
            h.sysctls(&[("net.ipv4.ip_local_port_range", "1024 65535")])?;
        }
        let inet = lab.inet();
        let sink_addr = SocketAddrV4::new(SERVER, SINK_PORT);
        Ok(Site {
            lab,
            hosts: lab.hosts().iter().map(|h| &**h).collect(),
            sink: TcpSink::start(inet, sink_addr)?,
            sink_addr,
            counter: UdpCounter::install(inet, UDP_PORT)?,
            cps_server: CpsServer::start(inet, &[SERVER, SERVER2], CPS_PORTS)?,
            dsts: [
                SocketAddrV4::new(SERVER, UDP_PORT).into(),
                SocketAddrV4::new(SERVER2, UDP_PORT).into(),
            ],
        })
    }

    fn udp(&self, p: &Params) -> Result<traffic::UdpRate> {
        self.udp_over(p, p.window)
    }

    fn udp_over(&self, p: &Params, w: Window) -> Result<traffic::UdpRate> {
        traffic::udp_flood(&self.hosts, &self.dsts, p.udp_flows, &self.counter, w)
    }

    fn tcp(&self, p: &Params) -> Result<f64> {
        traffic::tcp_bulk(
            &self.hosts,
            &self.sink,
            self.sink_addr,
            p.tcp_streams,
            p.window,
        )
    }

    fn cps(&self, p: &Params) -> Result<traffic::Cps> {
        traffic::cps(&self.hosts, &self.cps_server, p.cps_threads, p.window)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Test {
    Udp,
    Tcp,
    Cps,
}

impl Test {
    /// The variants a test runs: TCP bulk only those compared in section 1
    /// (and the loaded ones).
    fn variants(self, p: &Params) -> Vec<Variant> {
        let mut v = match self {
            Test::Tcp => ALL.to_vec(),
            Test::Udp | Test::Cps => ALL.iter().chain(&PARTS).copied().collect(),
        };
        v.extend(&p.loaded);
        if variants::base_bin().is_some() {
            v.push(Variant::MwanBase);
        }
        v
    }
}

pub fn run(p: &Params, log: &dyn Fn(String)) -> Result<Forwarding> {
    let pristine = Lab::builder().lan_hosts(2).isps(2).build()?;
    let ruled = Lab::builder().lan_hosts(2).isps(2).build()?;
    variants::add_a_rule_once(&ruled)?;
    let sites = [Site::new(&pristine)?, Site::new(&ruled)?];
    let site = |v: Variant| &sites[usize::from(!v.pristine())];
    let mut samples = vec![Samples::default(); EVERY.len()];
    for round in 0..p.rounds {
        let started = std::time::Instant::now();
        // One test at a time over all variants, so the measurements a ratio
        // compares are seconds apart; the order of the variants rotates
        // from round to round, so none always runs first (or after the
        // same neighbour).
        for test in [Test::Udp, Test::Tcp, Test::Cps] {
            let list = test.variants(p);
            for k in 0..list.len() {
                sig::check()?;
                let v = list[(round + k) % list.len()];
                let site = site(v);
                let active = variants::setup(site.lab, v, None)?;
                let s = &mut samples[v.index()];
                match test {
                    Test::Udp => {
                        let r = site.udp(p)?;
                        s.udp.push(r.received);
                        s.udp_sent.push(r.sent);
                    }
                    Test::Tcp => s.tcp.push(site.tcp(p)?),
                    Test::Cps => {
                        let r = site.cps(p)?;
                        s.cps.push(r.rate);
                        s.cps_failed += r.failed;
                    }
                }
                active.teardown()?;
            }
        }
        let mut line = format!(
            "  round {}/{} ({:.0} s):",
            round + 1,
            p.rounds,
            started.elapsed().as_secs_f64()
        );
        for v in EVERY {
            let s = &samples[v.index()];
            if s.udp.is_empty() && s.tcp.is_empty() && s.cps.is_empty() {
                continue;
            }
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
    let mwan_site = site(Variant::Mwan);
    let active = variants::setup(mwan_site.lab, Variant::Mwan, None)?;
    let id = bpf::lan_prog_id(mwan_site.lab)?;
    let (ns, runs, _) = bpf::cost_during(id, || mwan_site.udp(p))?;
    let bpf_udp = BpfCost { ns, runs };
    let (ns, runs, _) = bpf::cost_during(id, || mwan_site.tcp(p))?;
    let bpf_tcp = BpfCost { ns, runs };
    let (ns, runs, c) = bpf::cost_during(id, || mwan_site.cps(p))?;
    let bpf_cps = BpfCost { ns, runs };
    let runs_per_conn = runs as f64 / c.total.max(1) as f64;
    active.teardown()?;
    log(format!(
        "  eBPF mwan_lan_eth: {:.0} ns/run (UDP flood), {:.0} ns/run (TCP bulk), {:.0} ns/run (new connections)",
        bpf_udp.ns, bpf_tcp.ns, bpf_cps.ns
    ));

    let profiles = if profile::available() {
        profiles(p, &|v| site(v), log)?
    } else {
        log("  perf not found: no kernel profile".into());
        Vec::new()
    };
    Ok(Forwarding {
        params: p.clone(),
        hosts: sites[0].hosts.len(),
        isps: pristine.isp_count(),
        samples,
        bpf_udp,
        bpf_tcp,
        bpf_cps,
        runs_per_conn,
        profiles,
    })
}

/// [`profile::REPEATS`] interleaved profiles of each of
/// [`profile::PROFILED`] during the UDP test; their medians.
fn profiles<'s>(
    p: &Params,
    site: &dyn Fn(Variant) -> &'s Site<'s>,
    log: &dyn Fn(String),
) -> Result<Vec<(Variant, profile::Profile)>> {
    let mut list = profile::PROFILED.to_vec();
    if variants::base_bin().is_some() {
        list.push(Variant::MwanBase);
    }
    let mut all: Vec<Vec<profile::Profile>> = vec![Vec::new(); list.len()];
    for _ in 0..profile::REPEATS {
        for (i, &v) in list.iter().enumerate() {
            sig::check()?;
            let site = site(v);
            let active = variants::setup(site.lab, v, None)?;
            let prof = profile::during(p.window, &|| site.counter.packets(), |w| {
                site.udp_over(p, w)
            })?;
            active.teardown()?;
            log(format!("  perf ({}): {}", v.letter(), prof.brief()));
            all[i].push(prof);
        }
    }
    Ok(list
        .into_iter()
        .zip(all)
        .map(|(v, ps)| (v, profile::Profile::median(&ps)))
        .collect())
}
