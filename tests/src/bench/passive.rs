//! Section 9: passive health. Failover times of a silent upstream
//! blackhole while the LAN opens connections continuously, with passive
//! health on and off (`passive = false`: the probes alone), at slow probes
//! (`probe_interval = "1s"`) and at the defaults; and a soak under 10 %
//! random loss on both ISPs counting the WANs that went down (goal: none).
//!
//! ISP 1 is the primary (tier 1), ISP 2 the backup (tier 2), `hold_down =
//! "1s"` so that trials follow each other quickly (the same for every
//! variant). The LAN's traffic: 16 threads opening connections to 64
//! destinations (an AnyIP range of the internet), each attempt bounded by
//! 700 ms. The failover time is from the blackhole to the first new
//! connection answered through ISP 2 (as in section 3): with passive
//! health on, when it suspects ISP 1 and new connections avoid it.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use lab::mwan::{config_with, Mwan};
use lab::{Lab, SERVER, TCP_PROBE_PORT};

use super::failover::{ms, Rng};
use super::sig;
use super::traffic::first_success;

/// One variant's failover times.
#[derive(Clone, Debug)]
pub struct Variant {
    pub probe_interval: &'static str,
    pub passive: bool,
    pub failovers: Vec<Duration>,
    /// How many of its downs had a `passive:` reason.
    pub passive_downs: usize,
}

#[derive(Clone, Debug)]
pub struct Soak {
    pub secs: u64,
    pub loss_pct: u32,
    /// Connections opened and answered during the soak.
    pub connections: u64,
    /// WANs (and families) that went down, and bursts passive health asked
    /// for.
    pub downs: usize,
    pub bursts: usize,
}

#[derive(Clone, Debug)]
pub struct Passive {
    pub variants: Vec<Variant>,
    pub soak: Soak,
}

const OPENERS: usize = 16;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(700);
const WHOAMI_PORT_BASE: u16 = 19000;

/// `trials` trials of each variant, then a soak of `soak`.
pub fn run(trials: usize, soak: Duration, log: &dyn Fn(String)) -> Result<Passive> {
    let mut variants = Vec::new();
    let mut port = 0usize;
    for (interval, passive) in [
        ("1s", true),
        ("1s", false),
        ("100ms", true),
        ("100ms", false),
    ] {
        let lab = Lab::builder().lan_hosts(2).isps(2).build()?;
        destinations(&lab)?;
        let mwan = Mwan::start(&lab, &config(&lab, interval, passive))?;
        mwan.wait_all_up(Duration::from_secs(15))?;
        let mut v = Variant {
            probe_interval: interval,
            passive,
            failovers: Vec::new(),
            passive_downs: 0,
        };
        with_traffic(&lab, |_| -> Result<()> {
            for t in 0..trials {
                let f = trial(&lab, &mwan, &mut port)?;
                log(format!(
                    "  probe_interval {interval:>5}, passive {passive:<5}: trial {:>2}/{trials}: failover {:>5.0} ms",
                    t + 1,
                    ms(f)
                ));
                v.failovers.push(f);
            }
            Ok(())
        })?;
        v.passive_downs = mwan
            .status()
            .events
            .iter()
            .filter(|e| e.to == "down" && e.reason.starts_with("passive:"))
            .count();
        variants.push(v);
    }
    let soak = run_soak(soak, log)?;
    Ok(Passive { variants, soak })
}

fn config(lab: &Lab, interval: &str, passive: bool) -> String {
    config_with(
        lab,
        &format!("probe_interval = \"{interval}\"\nhold_down = \"1s\"\npassive = {passive}"),
        &|i| {
            if i == 2 {
                "tier = 2\n".into()
            } else {
                String::new()
            }
        },
        "",
    )
}

/// The internet answers every address of 198.51.100.128/26.
fn destinations(lab: &Lab) -> Result<()> {
    lab.inet().ip("route add local 198.51.100.128/26 dev lo\n")
}

/// Runs `f` while host 0 opens connections continuously; the number of
/// those answered.
fn with_traffic<T>(lab: &Lab, f: impl FnOnce(&AtomicU64) -> Result<T>) -> Result<T> {
    let stop = AtomicBool::new(false);
    let ok = AtomicU64::new(0);
    let host = lab.host(0);
    std::thread::scope(|s| {
        for w in 0..OPENERS {
            let (stop, ok) = (&stop, &ok);
            s.spawn(move || {
                host.run(|| {
                    let mut k = w;
                    // Bounded: the longest soak plus the trials.
                    let limit = Instant::now() + Duration::from_secs(4 * 3600);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                        let dst = SocketAddr::new(
                            Ipv4Addr::new(198, 51, 100, 128 + (k % 64) as u8).into(),
                            TCP_PROBE_PORT,
                        );
                        if TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT).is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        k += OPENERS;
                    }
                })
            });
        }
        let r = f(&ok);
        stop.store(true, Ordering::Relaxed);
        r
    })
}

/// One blackhole of ISP 1 and its repair: the failover time.
fn trial(lab: &Lab, mwan: &Mwan, port: &mut usize) -> Result<Duration> {
    mwan.wait_state("isp1", "up", Duration::from_secs(30))?;
    let mut rng = Rng::seeded();
    let via = |isp: usize| move |ip: Ipv4Addr| lab.wan_of(ip) == Some(isp);
    let srv = SocketAddrV4::new(SERVER, WHOAMI_PORT_BASE + (*port % 1000) as u16);
    *port += 1;
    let _server = lab.inet().tcp_whoami_server(srv)?;
    // A random phase against the probe rounds.
    sig::sleep(Duration::from_millis(200 + rng.below(1000)))?;
    let t0 = Instant::now();
    lab.isp(1).set_blackhole(true)?;
    let (at, _) = first_success(
        lab.host(1),
        srv,
        Duration::from_millis(5),
        Duration::from_millis(300),
        Duration::from_secs(15),
        &via(2),
    )?
    .ok_or_else(|| anyhow!("no connection through isp2 within 15 s"))?;
    mwan.wait_state("isp1", "down", Duration::from_secs(10))?;
    lab.isp(1).set_blackhole(false)?;
    Ok(at - t0)
}

/// Both ISPs drop 10 % of what they send to the router, for `length`,
/// while the LAN opens connections; counts the WANs that went down.
fn run_soak(length: Duration, log: &dyn Fn(String)) -> Result<Soak> {
    const LOSS: u32 = 10;
    let lab = Lab::builder().lan_hosts(1).isps(2).build()?;
    destinations(&lab)?;
    let text = config_with(&lab, "", &|_| String::new(), "");
    let mwan = Mwan::start(&lab, &text)?;
    mwan.wait_all_up(Duration::from_secs(15))?;
    for i in 1..=2 {
        lab.isp(i).set_loss(LOSS)?;
    }
    let connections = with_traffic(&lab, |ok| -> Result<u64> {
        sig::sleep(length)?;
        Ok(ok.load(Ordering::Relaxed))
    })?;
    let downs = mwan
        .status()
        .events
        .iter()
        .filter(|e| e.kind == "state" && e.to == "down")
        .count();
    let bursts = mwan
        .log()
        .matches("confirming with a burst of probes")
        .count();
    let soak = Soak {
        secs: length.as_secs(),
        loss_pct: LOSS,
        connections,
        downs,
        bursts,
    };
    log(format!(
        "  soak: {} s at {LOSS} % loss, {connections} connections: {downs} WANs down, {bursts} bursts",
        soak.secs
    ));
    Ok(soak)
}

/// The `q` quantile (0..=1) of `v`, nearest rank.
fn quantile(v: &[Duration], q: f64) -> Option<Duration> {
    let mut s = v.to_vec();
    s.sort();
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len().max(1)) - 1;
    s.get(i).copied()
}

/// The section as a Markdown table and a sentence (the console shows the
/// same).
pub fn markdown(p: &Passive) -> String {
    let mut o = String::from(
        "| probe_interval | passive | trials | failover p50 | failover p95 | downs with a `passive:` reason |\n|---|---|---|---|---|---|\n",
    );
    let fmt = |d: Option<Duration>| d.map_or("–".to_string(), |d| format!("{:.0} ms", ms(d)));
    for v in &p.variants {
        o += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            v.probe_interval,
            if v.passive {
                "on"
            } else {
                "off (probes alone)"
            },
            v.failovers.len(),
            fmt(quantile(&v.failovers, 0.5)),
            fmt(quantile(&v.failovers, 0.95)),
            v.passive_downs,
        );
    }
    let s = &p.soak;
    o += &format!(
        "\nSoak: {} s with {} % random loss on both ISPs (downstream), {} connections opened: **{} WANs down** (goal 0), {} bursts of probes asked for by passive health.\n",
        s.secs, s.loss_pct, s.connections, s.downs, s.bursts
    );
    o
}
