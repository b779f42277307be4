//! Section 1b: IPv6 forwarding cost — mwan (`ipv6 = "nat"` on every WAN)
//! against plain IPv6 routing with NAT66 through ISP 1 (the baseline), in
//! a dual-stack lab, interleaved over rounds like the IPv4 section, as a
//! ratio beside the IPv4 rows. TCP bulk and small UDP packets; no
//! new-connection test (its server is IPv4-only).

use std::net::{SocketAddr, SocketAddrV6};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lab::mwan::{config_with, wan6, Mwan};
use lab::{wait_until, Lab, Netns, SERVER6, SERVER6_2, TCP_WHOAMI6};

use super::forwarding::{Params, UDP_PORT};
use super::sig;
use super::traffic::{self, TcpSink, UdpCounter};

const SINK_PORT: u16 = 9000;

/// The two ways compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant6 {
    /// Plain IPv6 routing through ISP 1 with NAT66 (masquerade).
    Plain,
    /// mwan over every ISP, NAT66 per WAN.
    Mwan,
}

pub const ALL6: [Variant6; 2] = [Variant6::Plain, Variant6::Mwan];

impl Variant6 {
    pub fn label(self) -> &'static str {
        match self {
            Variant6::Plain => "(a6) plain IPv6 routing + NAT66 (baseline)",
            Variant6::Mwan => "(d6) mwan, IPv6 (NAT66 per WAN)",
        }
    }

    pub fn index(self) -> usize {
        ALL6.iter().position(|v| *v == self).expect("listed")
    }
}

#[derive(Clone, Debug, Default)]
pub struct Samples6 {
    /// TCP bulk, bits per second.
    pub tcp: Vec<f64>,
    /// Small UDP packets arriving in the internet, per second.
    pub udp: Vec<f64>,
}

#[derive(Clone, Debug)]
pub struct Forwarding6 {
    pub params: Params,
    pub hosts: usize,
    pub isps: usize,
    /// Indexed by [`Variant6::index`].
    pub samples: Vec<Samples6>,
}

pub fn run(p: &Params, log: &dyn Fn(String)) -> Result<Forwarding6> {
    let lab = Lab::builder().lan_hosts(2).isps(2).dual_stack().build()?;
    let inet = lab.inet();
    let sink_addr = SocketAddrV6::new(SERVER6, SINK_PORT, 0, 0);
    let sink = TcpSink::start(inet, sink_addr)?;
    let counter = UdpCounter::install6(inet, UDP_PORT)?;
    let hosts: Vec<&Netns> = lab.hosts().iter().map(|h| &**h).collect();
    let dsts: [SocketAddr; 2] = [
        SocketAddrV6::new(SERVER6, UDP_PORT, 0, 0).into(),
        SocketAddrV6::new(SERVER6_2, UDP_PORT, 0, 0).into(),
    ];
    let mut samples = vec![Samples6::default(); ALL6.len()];
    for round in 0..p.rounds {
        for k in 0..ALL6.len() {
            sig::check()?;
            let v = ALL6[(round + k) % ALL6.len()];
            let mwan = setup(&lab, v)?;
            let s = &mut samples[v.index()];
            s.udp
                .push(traffic::udp_flood(&hosts, &dsts, p.udp_flows, &counter, p.window)?.received);
            s.tcp.push(traffic::tcp_bulk(
                &hosts,
                &sink,
                sink_addr,
                p.tcp_streams,
                p.window,
            )?);
            teardown(&lab, mwan)?;
        }
        let mut line = format!("  IPv6 round {}/{}:", round + 1, p.rounds);
        for v in ALL6 {
            let s = &samples[v.index()];
            line += &format!(
                "  {} {} {}",
                &v.label()[..4],
                super::stats::si(*s.udp.last().unwrap_or(&0.0), "pps"),
                super::stats::si(*s.tcp.last().unwrap_or(&0.0), "bit/s"),
            );
        }
        log(line);
    }
    Ok(Forwarding6 {
        params: p.clone(),
        hosts: hosts.len(),
        isps: lab.isp_count(),
        samples,
    })
}

/// Sets `v` up and checks that a LAN host reaches the IPv6 internet
/// through it.
fn setup(lab: &Lab, v: Variant6) -> Result<Option<Mwan<'_>>> {
    let mwan = match v {
        Variant6::Plain => {
            lab.plain_routing_via(1)?;
            None
        }
        Variant6::Mwan => {
            let text = config_with(lab, "", &|i| wan6(lab, i, "nat"), "");
            let mwan = Mwan::start(lab, &text)?;
            mwan.wait_all_up(Duration::from_secs(5))?;
            Some(mwan)
        }
    };
    let ok = wait_until(Duration::from_secs(5), || {
        lab.host(0)
            .tcp_whoami_within(TCP_WHOAMI6, Duration::from_millis(500))
            .is_ok()
    });
    if !ok {
        let log = mwan.as_ref().map(Mwan::log).unwrap_or_default();
        bail!("{}: no IPv6 from the LAN to the internet\n{log}", v.label());
    }
    Ok(mwan)
}

fn teardown(lab: &Lab, mwan: Option<Mwan<'_>>) -> Result<()> {
    match mwan {
        // Dropping the daemon stops it with SIGTERM: full teardown.
        Some(m) => drop(m),
        None => lab
            .clear_plain_routing()
            .context("removing plain routing")?,
    }
    Ok(())
}
