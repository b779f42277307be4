//! Section 1b: IPv6 forwarding cost — mwan (`ipv6 = "nat"` on every WAN)
//! and the nftables ct-mark balancer of the IPv4 section over IPv6 (NAT66
//! per WAN, [`Balancer`]) against plain IPv6 routing with NAT66 through
//! ISP 1 (the baseline), in a dual-stack lab, interleaved over rounds like
//! the IPv4 section, as a ratio beside the IPv4 rows, with mwan's pieces
//! one at a time (small UDP packets only; see `variants` for how they are
//! made, and why the baseline runs in a second lab whose router never had
//! an ip rule: every variant but (a6) runs in the other). TCP bulk and
//! small UDP packets; no new-connection test (its server is IPv4-only).

use std::net::{SocketAddr, SocketAddrV6};
use std::time::Duration;

use super::variants::{self, Balancer, Family, Pieces};
use anyhow::{bail, Context, Result};
use lab::mwan::{config_with, wan6, Mwan};
use lab::{wait_until, Lab, Netns, SERVER6, SERVER6_2, TCP_WHOAMI6};

use super::forwarding::{Params, UDP_PORT};
use super::sig;
use super::traffic::{self, TcpSink, UdpCounter};

const SINK_PORT: u16 = 9000;

/// The ways compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant6 {
    /// Plain IPv6 routing through ISP 1 with NAT66 (masquerade).
    Plain,
    /// The ct-mark balancer of (c) over IPv6, NAT66 per WAN.
    NftCtMark,
    /// mwan over every ISP, NAT66 per WAN.
    Mwan,
    /// Plain, in a router that has had ip rules.
    PlainRuled,
    /// That + mwan's nftables table.
    NftTable,
    /// That + mwan's classifier.
    Classifier,
    /// mwan without its nftables table.
    NoNft,
}

/// The ways compared in the section's main table.
pub const ALL6: [Variant6; 3] = [Variant6::Plain, Variant6::NftCtMark, Variant6::Mwan];

/// Every variant, in the order of [`Variant6::index`]; the pieces run in
/// the UDP test only.
pub const EVERY6: [Variant6; 7] = [
    Variant6::Plain,
    Variant6::NftCtMark,
    Variant6::Mwan,
    Variant6::PlainRuled,
    Variant6::NftTable,
    Variant6::Classifier,
    Variant6::NoNft,
];

impl Variant6 {
    pub fn label(self) -> &'static str {
        match self {
            Variant6::Plain => "(a6) plain IPv6 routing + NAT66 (baseline)",
            Variant6::NftCtMark => "(c6) nftables ct-mark balancer, IPv6",
            Variant6::Mwan => "(d6) mwan, IPv6 (NAT66 per WAN)",
            Variant6::PlainRuled => {
                "(e6) plain IPv6 routing + NAT66, in a router that has had ip rules"
            }
            Variant6::NftTable => "(g6) (e6) + mwan's nftables table",
            Variant6::Classifier => "(h6) (e6) + mwan's classifier (marks unused)",
            Variant6::NoNft => "(i6) mwan without its nftables table",
        }
    }

    pub fn index(self) -> usize {
        EVERY6.iter().position(|v| *v == self).expect("listed")
    }

    fn pristine(self) -> bool {
        self == Variant6::Plain
    }

    fn pieces(self) -> Option<Pieces> {
        let p = |rules, nft, classifier| {
            Some(Pieces {
                rules,
                nft,
                classifier,
            })
        };
        match self {
            Variant6::NftTable => p(false, true, false),
            Variant6::Classifier => p(false, false, true),
            Variant6::NoNft => p(true, false, true),
            _ => None,
        }
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
    let pristine = Lab::builder().lan_hosts(2).isps(2).dual_stack().build()?;
    let ruled = Lab::builder().lan_hosts(2).isps(2).dual_stack().build()?;
    variants::add_a_rule_once(&ruled)?;
    let labs = [&pristine, &ruled];
    let sinks = labs
        .iter()
        .map(|l| TcpSink::start(l.inet(), SocketAddrV6::new(SERVER6, SINK_PORT, 0, 0)))
        .collect::<Result<Vec<_>>>()?;
    let counters = labs
        .iter()
        .map(|l| UdpCounter::install6(l.inet(), UDP_PORT))
        .collect::<Result<Vec<_>>>()?;
    let hosts: Vec<Vec<&Netns>> = labs
        .iter()
        .map(|l| l.hosts().iter().map(|h| &**h).collect())
        .collect();
    for l in labs {
        super::forwarding::bridge_netfilter(l, super::forwarding::BRIDGE_NETFILTER)?;
    }
    let sink_addr = SocketAddrV6::new(SERVER6, SINK_PORT, 0, 0);
    let dsts: [SocketAddr; 2] = [
        SocketAddrV6::new(SERVER6, UDP_PORT, 0, 0).into(),
        SocketAddrV6::new(SERVER6_2, UDP_PORT, 0, 0).into(),
    ];
    let mut samples = vec![Samples6::default(); EVERY6.len()];
    for round in 0..p.rounds {
        for (list, tcp) in [(&EVERY6[..], false), (&ALL6[..], true)] {
            for k in 0..list.len() {
                sig::check()?;
                let v = list[(round + k) % list.len()];
                let i = usize::from(!v.pristine());
                let active = setup(labs[i], v)?;
                let s = &mut samples[v.index()];
                if tcp {
                    let r =
                        traffic::tcp_bulk(&hosts[i], &sinks[i], sink_addr, p.tcp_streams, p.window);
                    s.tcp.push(r?);
                } else {
                    let r =
                        traffic::udp_flood(&hosts[i], &dsts, p.udp_flows, &counters[i], p.window);
                    s.udp.push(r?.received);
                }
                teardown(labs[i], v, active)?;
            }
        }
        let mut line = format!("  IPv6 round {}/{}:", round + 1, p.rounds);
        for v in EVERY6 {
            let s = &samples[v.index()];
            line += &format!(
                "  {} {} {}",
                v.label().split(' ').next().unwrap_or(""),
                super::stats::si(*s.udp.last().unwrap_or(&0.0), "pps"),
                super::stats::si(*s.tcp.last().unwrap_or(&0.0), "bit/s"),
            );
        }
        log(line);
    }
    Ok(Forwarding6 {
        params: p.clone(),
        hosts: hosts[0].len(),
        isps: pristine.isp_count(),
        samples,
    })
}

/// Plain IPv6 routing through ISP 1: the default route, and NAT66 unless
/// mwan's table (which has it) stays.
fn plain_routes6(lab: &Lab, masquerade: bool) -> Result<()> {
    let r = lab.router();
    r.ip(&format!(
        "route replace ::/0 via {} dev wan1 proto static metric 10",
        lab.isp(1).gateway6()
    ))?;
    if masquerade {
        r.exec_input(
            &["nft", "-f", "-"],
            Some("table ip6 bench6 {\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n  oifname \"wan*\" masquerade\n }\n}\n"),
        )?;
    }
    Ok(())
}

/// A variant set up: mwan (running, or its pieces left by a stopped
/// daemon), or the balancer; plain routing has neither.
struct Active6<'l> {
    mwan: Option<Mwan<'l>>,
    balancer: Option<Balancer<'l>>,
}

/// Sets `v` up and checks that a LAN host reaches the IPv6 internet
/// through it.
fn setup(lab: &Lab, v: Variant6) -> Result<Active6<'_>> {
    let text = config_with(lab, "", &|i| wan6(lab, i, "nat"), "");
    let mut balancer = None;
    let mwan = match (v, v.pieces()) {
        (Variant6::Plain | Variant6::PlainRuled, _) => {
            lab.plain_routing_via(1)?;
            None
        }
        (Variant6::NftCtMark, _) => {
            balancer = Some(Balancer::install(lab, Family::V6)?);
            None
        }
        (Variant6::Mwan, _) => {
            let mwan = Mwan::start(lab, &text)?;
            mwan.wait_all_up(Duration::from_secs(5))?;
            Some(mwan)
        }
        (_, Some(pieces)) => {
            let m = variants::start_pieces(lab, pieces, Some(&text))?;
            plain_routes6(lab, !pieces.nft)?;
            Some(m)
        }
        (_, None) => unreachable!("every variant of pieces has pieces"),
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
    Ok(Active6 { mwan, balancer })
}

fn teardown(lab: &Lab, v: Variant6, active: Active6<'_>) -> Result<()> {
    if let Some(b) = active.balancer {
        b.remove()?;
    }
    match active.mwan {
        // Dropping the daemon stops it with SIGTERM: full teardown.
        Some(m) if m.is_running() => drop(m),
        Some(m) => {
            m.cli_ok(&["stop", "--teardown"])?;
            let r = lab.router();
            for lan in ["lan0", "lan1"] {
                let _ = r.exec(&["tc", "qdisc", "del", "dev", lan, "clsact"]);
            }
            let _ = r.ip("route del ::/0 metric 10");
            r.exec_input(
                &["nft", "-f", "-"],
                Some("table ip6 bench6 {}\ndelete table ip6 bench6\n"),
            )?;
            lab.clear_plain_routing()
                .with_context(|| format!("removing {}", v.label()))?;
        }
        None => lab
            .clear_plain_routing()
            .context("removing plain routing")?,
    }
    Ok(())
}
