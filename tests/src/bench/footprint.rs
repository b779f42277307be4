//! Section 5: the daemon's resident memory and CPU with eight WANs probing
//! at the default interval, read from /proc over a measured interval with
//! nothing else asking the daemon anything.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lab::mwan::{config, Mwan};
use lab::{Lab, PROBE_TARGETS};

use super::sig;

#[derive(Clone, Debug, Default)]
pub struct Footprint {
    pub wans: usize,
    pub targets_per_wan: usize,
    pub probe_interval: Duration,
    pub secs: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub threads: u64,
    /// Percent of one CPU (user + system).
    pub cpu_pct: f64,
    pub user_pct: f64,
    pub sys_pct: f64,
}

pub fn run(wans: usize, secs: Duration, log: &dyn Fn(String)) -> Result<Footprint> {
    let lab = Lab::builder().lan_hosts(1).isps(wans).build()?;
    let text = config(&lab, "");
    let parsed = mwan::config::Config::parse(&text)?;
    let mwan = Mwan::start(&lab, &text)?;
    mwan.wait_all_up(Duration::from_secs(20))?;
    // Let start-up work (map creation, first rounds) settle.
    sig::sleep(Duration::from_secs(3))?;
    let pid = mwan.pid().context("mwan pid")?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "mwan" {
        bail!("pid {pid} is {comm:?}, not the mwan daemon");
    }
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (u0, s0) = cpu_ticks(pid)?;
    let t0 = Instant::now();
    sig::sleep(secs)?;
    let (u1, s1) = cpu_ticks(pid)?;
    let el = t0.elapsed().as_secs_f64();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let user_pct = (u1 - u0) as f64 / tck / el * 100.0;
    let sys_pct = (s1 - s0) as f64 / tck / el * 100.0;
    let out = Footprint {
        wans,
        targets_per_wan: PROBE_TARGETS.len(),
        probe_interval: parsed.wans[0].health.interval,
        secs: el,
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        threads: field("Threads:"),
        cpu_pct: user_pct + sys_pct,
        user_pct,
        sys_pct,
    };
    log(format!(
        "  {wans} WANs: RSS {:.1} MiB, CPU {:.2} % of one core over {:.0} s",
        out.rss_kib as f64 / 1024.0,
        out.cpu_pct,
        el
    ));
    drop(mwan);
    Ok(out)
}

/// utime and stime (clock ticks) of the whole process.
fn cpu_ticks(pid: u32) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) in parens.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc/pid/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let utime = f.get(11).and_then(|v| v.parse().ok()).context("utime")?;
    let stime = f.get(12).and_then(|v| v.parse().ok()).context("stime")?;
    Ok((utime, stime))
}
