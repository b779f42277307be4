//! Section 6: router failover of an HA pair (keepalived and conntrackd,
//! docs/HA.md), over several trials.
//!
//! A download runs through the active router; once the standby holds its
//! conntrack entry, the active router dies (links down, every process
//! killed) at a random phase against the VRRP advertisements. Measured from
//! that moment: when the standby holds the gateway address, when the first
//! new connection from a LAN host is answered (one attempt every 5 ms, each
//! abandoned after 300 ms), and the download's longest stall (it must go
//! on). The dead router then boots again as the standby, and the next trial
//! kills the other one.

use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use lab::ha::{established_to, holds_gateway, mwan_config, HaDaemons, HaSpec};
use lab::mwan::Mwan;
use lab::{wait_until, Lab, STREAM, STREAM_PACE, STREAM_PORT, TCP_WHOAMI};

use super::failover::Rng;
use super::sig;
use super::traffic::first_success;

#[derive(Clone, Debug)]
pub struct HaTrial {
    /// Death → the standby holds the gateway address.
    pub address_moved: Duration,
    /// Death → first new connection answered.
    pub first_connection: Duration,
    /// The download's longest time without data around the takeover.
    pub stall: Duration,
}

#[derive(Clone, Debug)]
pub struct HaFailover {
    pub trials: Vec<HaTrial>,
    pub advert_int: Duration,
}

pub fn run(trials: usize, log: &dyn Fn(String)) -> Result<HaFailover> {
    let lab = Lab::builder().ha_pair().lan_hosts(2).isps(2).build()?;
    let spec = HaSpec::default();
    let mut mwans = Vec::new();
    for k in 0..2 {
        mwans.push(Mwan::start_on(&lab, k, &mwan_config(&lab, k), &[], &[])?);
    }
    for m in &mwans {
        m.wait_all_up(Duration::from_secs(15))?;
    }
    let mut ha = Vec::new();
    for (k, m) in mwans.iter().enumerate() {
        ha.push(HaDaemons::start(&lab, k, &spec, Some(&m.config))?);
    }
    if !ha[0].wait_master(Duration::from_secs(15))
        || !ha[1].wait_state("BACKUP", Duration::from_secs(15))
    {
        bail!("no master and backup:\n{}{}", ha[0].logs(), ha[1].logs());
    }
    let public: Vec<Ipv4Addr> = (1..=lab.isp_count())
        .map(|i| lab.isp(i).router_addr().addr())
        .collect();
    let mut rng = Rng::seeded();
    let mut out = HaFailover {
        trials: Vec::new(),
        advert_int: spec.advert_int,
    };
    let mut active = 0;
    for t in 0..trials {
        let standby = 1 - active;
        let stream = lab.host(0).open_stream(STREAM)?;
        let synced = wait_until(Duration::from_secs(10), || {
            !established_to(&lab, standby, STREAM_PORT).is_empty()
        });
        if !synced {
            bail!(
                "the standby has no entry of the download:\n{}",
                ha[standby].logs()
            );
        }
        sig::sleep(Duration::from_millis(rng.below(300)))?;
        stream.reset_max_gap();
        let before = stream.bytes();

        let died = Instant::now();
        ha[active].power_off()?;
        mwans[active].forget();
        let moved: Mutex<Option<Instant>> = Mutex::new(None);
        let first = std::thread::scope(|s| {
            // Watches until it sees the address (or 10 s): not until the
            // first connection, which may be answered while a look that
            // began before the address moved is still under way.
            s.spawn(|| {
                while died.elapsed() < Duration::from_secs(10) {
                    if holds_gateway(&lab, standby) {
                        *moved.lock().unwrap() = Some(Instant::now());
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            let r = first_success(
                lab.host(1),
                TCP_WHOAMI,
                Duration::from_millis(5),
                Duration::from_millis(300),
                Duration::from_secs(10),
                &|ip| public.contains(&ip),
            );
            r
        })?;
        let (first_at, _) = first.ok_or_else(|| anyhow!("no new connection within 10 s"))?;
        let moved_at = moved
            .into_inner()
            .unwrap()
            .ok_or_else(|| {
                anyhow!(
                    "the standby did not take the gateway address within 10 s (the first new connection was answered after {:.0} ms):\n{}",
                    (first_at - died).as_secs_f64() * 1e3,
                    ha[standby].logs()
                )
            })?;
        let flowing = wait_until(Duration::from_secs(10), || {
            stream.bytes() >= before + STREAM_PACE
        });
        if !flowing || stream.end().is_some() {
            bail!("the download did not continue: {:?}", stream.end());
        }
        let trial = HaTrial {
            address_moved: moved_at - died,
            first_connection: first_at - died,
            stall: stream.max_gap(),
        };
        stream.close();
        log(format!(
            "  trial {}: address moved {:.0} ms, first new connection {:.0} ms, download stall {:.0} ms",
            t + 1,
            trial.address_moved.as_secs_f64() * 1e3,
            trial.first_connection.as_secs_f64() * 1e3,
            trial.stall.as_secs_f64() * 1e3
        ));
        out.trials.push(trial);

        // The dead router boots again and becomes the standby.
        let r = mwans[active].cli(&["stop", "--teardown"])?;
        if !r.status.success() {
            bail!("mwan stop --teardown: {r:?}");
        }
        ha[active].boot(&spec, Some(&mwans[active].config))?;
        mwans[active].launch(&[])?;
        mwans[active].wait_all_up(Duration::from_secs(15))?;
        // Ready to take over only once keepalived is BACKUP (it stays in
        // FAULT until mwan's track script has risen).
        if !ha[active].wait_state("BACKUP", Duration::from_secs(15)) {
            bail!("the returned router is not BACKUP:\n{}", ha[active].logs());
        }
        active = standby;
    }
    Ok(out)
}
