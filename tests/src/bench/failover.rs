//! Section 3: failover and recovery times of mwan at its defaults, over
//! many trials, and what other tools' documented defaults imply.
//!
//! ISP 1 is the primary (tier 1) and ISP 2 the backup (tier 2), every
//! health setting at its default: before the failure every new connection
//! goes through ISP 1, so "the first new connection that succeeds through
//! the other WAN" is exactly the moment the failover took effect. A LAN
//! host opens a new connection every 5 ms (each attempt abandoned after
//! 300 ms, before the kernel's first SYN retransmission) and the time of
//! the first answer through the wanted ISP is taken.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use lab::mwan::{config_with, Mwan};
use lab::{Lab, Netns, SERVER};

use super::sig;
use super::traffic::first_success;

#[derive(Clone, Debug)]
pub struct Trial {
    /// Blackhole → first new connection answered through ISP 2.
    pub failover: Duration,
    /// Failover → repair: how long ISP 1 had been down when it was repaired.
    pub down_for: Duration,
    /// Repair → first new connection answered through ISP 1 again.
    pub recovery: Duration,
    /// The outage outlasted `hold_down`.
    pub long: bool,
}

impl Trial {
    /// What of `hold_down` (which runs from the moment the WAN went down)
    /// was still left at the repair: the part of `recovery` that is the
    /// deliberate wait.
    pub fn hold_down_left(&self, hold_down: Duration) -> Duration {
        hold_down.saturating_sub(self.down_for)
    }
}

#[derive(Clone, Debug)]
pub struct Failover {
    pub trials: Vec<Trial>,
    /// mwan's defaults, as the running daemon's config has them.
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub down_after: u32,
    pub up_after: u32,
    pub hold_down: Duration,
}

const WHOAMI_PORT_BASE: u16 = 18000;
const ATTEMPT_EVERY: Duration = Duration::from_millis(5);
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(300);

/// `trials` trials repaired soon after the failover (the repair waits for
/// the rest of `hold_down`), then `long_trials` whose outage outlasts
/// `hold_down` (the repair is noticed by the probes alone).
pub fn run(trials: usize, long_trials: usize, log: &dyn Fn(String)) -> Result<Failover> {
    let lab = Lab::builder().lan_hosts(1).isps(2).build()?;
    let cfg = config_with(
        &lab,
        "",
        &|i| {
            if i == 2 {
                "tier = 2\n".into()
            } else {
                String::new()
            }
        },
        "",
    );
    let defaults = mwan::config::Config::parse(&cfg)?;
    let health = &defaults.wans[0].health;
    let mut out = Failover {
        trials: Vec::new(),
        probe_interval: health.interval,
        probe_timeout: health.timeout,
        down_after: health.down_after,
        up_after: health.up_after,
        hold_down: health.hold_down,
    };
    let mwan = Mwan::start(&lab, &cfg)?;
    mwan.wait_all_up(Duration::from_secs(15))?;
    let host = lab.host(0);
    // Fresh 5-tuples for every phase of every trial: a whoami server per
    // phase on its own port. (A reused 5-tuple would hit the pin of an
    // earlier connection; see the report.)
    let mut servers = Vec::new();
    let mut port = |k: usize| -> Result<SocketAddrV4> {
        let addr = SocketAddrV4::new(SERVER, WHOAMI_PORT_BASE + k as u16);
        servers.push(lab.inet().tcp_whoami_server(addr)?);
        Ok(addr)
    };
    let lab_ref = &lab;
    let via = |isp: usize| move |ip: Ipv4Addr| lab_ref.wan_of(ip) == Some(isp);
    let mut rng = Rng::seeded();
    let total = trials + long_trials;
    for t in 0..total {
        let long = t >= trials;
        mwan.wait_state("isp1", "up", Duration::from_secs(30))?;
        let (check, fail_srv, repair_srv) = (port(3 * t)?, port(3 * t + 1)?, port(3 * t + 2)?);
        primary_carries(&lab, host, check)?;
        // A random phase against the probe rounds.
        sig::sleep(Duration::from_millis(rng.below(300)))?;

        let t0 = Instant::now();
        lab.isp(1).set_blackhole(true)?;
        let (failed_over, _) = first_success(
            host,
            fail_srv,
            ATTEMPT_EVERY,
            ATTEMPT_TIMEOUT,
            Duration::from_secs(15),
            &via(2),
        )?
        .ok_or_else(|| anyhow!("trial {t}: no connection through isp2 within 15 s"))?;
        let failover = failed_over - t0;
        mwan.wait_state("isp1", "down", Duration::from_secs(5))?;
        let outage = if long {
            out.hold_down + Duration::from_millis(1000 + rng.below(500))
        } else {
            Duration::from_millis(300 + rng.below(500))
        };
        sig::sleep(outage)?;

        let t1 = Instant::now();
        lab.isp(1).set_blackhole(false)?;
        let down_for = t1 - failed_over;
        let (at, _) = first_success(
            host,
            repair_srv,
            ATTEMPT_EVERY,
            ATTEMPT_TIMEOUT,
            Duration::from_secs(30),
            &via(1),
        )?
        .ok_or_else(|| anyhow!("trial {t}: no connection through isp1 within 30 s of repair"))?;
        let trial = Trial {
            failover,
            down_for,
            recovery: at - t1,
            long,
        };
        log(format!(
            "  trial {:>2}/{total}: failover {:>4.0} ms; repaired after {:>4.0} ms down, recovery {:>5.0} ms ({:>4.0} ms of it the rest of hold_down)",
            t + 1,
            ms(trial.failover),
            ms(trial.down_for),
            ms(trial.recovery),
            ms(trial.hold_down_left(out.hold_down)),
        ));
        out.trials.push(trial);
    }
    Ok(out)
}

/// Before a trial: new connections from `host` to `check` go through ISP 1
/// (the primary), within 5 s.
pub fn primary_carries(lab: &Lab, host: &Netns, check: SocketAddrV4) -> Result<()> {
    first_success(
        host,
        check,
        Duration::from_millis(20),
        Duration::from_millis(500),
        Duration::from_secs(5),
        &|ip: Ipv4Addr| lab.wan_of(ip) == Some(1),
    )?
    .ok_or_else(|| anyhow!("isp1 is up but new connections do not use it"))?;
    Ok(())
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// xorshift64*, seeded from the clock: random phases, nothing more.
pub struct Rng(u64);

impl Rng {
    pub fn seeded() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Rng(t | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// Detection times other tools' documented defaults imply for a silent
/// upstream failure (computed, not measured).
pub struct Computed {
    pub name: &'static str,
    pub settings: &'static str,
    pub detect_min: f64,
    pub detect_max: f64,
    pub recover_min: f64,
    pub recover_max: f64,
    pub how: &'static str,
}

/// mwan3 (mwan3track defaults: interval 10 s, timeout 4 s, down 5, up 5,
/// failure_interval = recovery_interval = interval, count 1,
/// reliability 1; one track_ip) and pfSense (dpinger as started by
/// pfSense: probe interval 500 ms, loss interval 2000 ms, time period
/// 60000 ms, alert interval 1000 ms, loss down threshold 20 %).
pub fn computed() -> Vec<Computed> {
    vec![
        Computed {
            name: "mwan3 (OpenWrt)",
            settings: "interval 10 s, timeout 4 s, down 5, up 5, failure_interval = recovery_interval = interval, count 1, reliability 1, one track_ip",
            // The next test starts 0–10 s after the failure; each failed
            // test takes timeout (4 s) and is followed by failure_interval
            // (10 s); offline after the 5th: 4 × 14 s + 4 s = 60 s.
            detect_min: 60.0,
            detect_max: 70.0,
            // Offline, a failed test still takes 4 s + 10 s; the first good
            // one comes 0–14 s after the repair, then one every
            // recovery_interval (10 s): online after the 5th.
            recover_min: 40.0,
            recover_max: 54.0,
            how: "next test 0–10 s after the failure; 5 failed tests of timeout 4 s + failure_interval 10 s; offline at the 5th failure = 60–70 s. Recovery: first good test 0–14 s after repair, 4 more every 10 s = 40–54 s. Each extra track_ip adds 4 s per failed test (with reliability 1 all are tried).",
        },
        Computed {
            name: "pfSense (dpinger)",
            settings: "probe interval 500 ms, loss interval 2000 ms, time period 60000 ms, alert interval 1000 ms, packet loss down threshold 20 %",
            // 120 probes in the 60 s window; a probe counts as lost 2 s
            // after it was sent; loss is lost / (received + lost), pending
            // probes excluded: > 20 % with 25 lost of 116 → the 25th probe
            // after the failure (sent 12.0–12.5 s) is lost at 14.0–14.5 s,
            // seen at the next alert check (≤ 1 s).
            detect_min: 14.0,
            detect_max: 15.5,
            // After an outage of at least the window: loss must fall to
            // ≤ 20 % (95 of 120 probes answered: 47.5 s), then the alarm
            // clears after 10 more alert intervals (ALARM_DECAY_PERIODS).
            recover_min: 57.5,
            recover_max: 58.5,
            how: "probes every 0.5 s, lost after 2 s, loss averaged over 60 s (120 probes); loss > 20 % needs 25 lost probes: the 25th is sent 12–12.5 s after the failure, counted lost 2 s later, noticed at the next 1 s alert check = 14–15.5 s. Recovery (outage ≥ 60 s): loss ≤ 20 % after 47.5 s, then 10 alert periods of decay = 57.5–58.5 s. pfSense then still reloads its ruleset.",
        },
    ]
}
