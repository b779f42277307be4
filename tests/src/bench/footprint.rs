//! Section 5: the daemon's resident memory and CPU with eight WANs probing
//! at the default interval, read from /proc over a measured interval: with
//! nothing else asking the daemon anything, and with its metrics endpoint
//! (`metrics_listen`) scraped every second, as a Prometheus server would.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lab::http::http_get;
use lab::mwan::{config_with, Mwan};
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
    /// With `metrics_listen`: the scrapes of `/metrics` answered during
    /// the measurement, and the size of the last one.
    pub scrapes: Option<(u64, usize)>,
}

/// Where the scraped variant listens (in the lab's router namespace).
const LISTEN: &str = "127.0.0.1:9849";

/// Measures the daemon over `secs`; `scraped`: with the metrics endpoint
/// on and `/metrics` fetched every second meanwhile.
pub fn run(wans: usize, secs: Duration, scraped: bool, log: &dyn Fn(String)) -> Result<Footprint> {
    let lab = Lab::builder().lan_hosts(1).isps(wans).build()?;
    let top = if scraped {
        format!("metrics_listen = \"{LISTEN}\"")
    } else {
        String::new()
    };
    let text = config_with(&lab, &top, &|_| String::new(), "");
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
    let stop = AtomicBool::new(false);
    let (measured, scrapes) = std::thread::scope(|s| {
        let scraper = scraped.then(|| s.spawn(|| lab.router().run(|| scrape_every_second(&stop))));
        let measured = (|| -> Result<_> {
            let (u0, s0) = cpu_ticks(pid)?;
            let t0 = Instant::now();
            sig::sleep(secs)?;
            let (u1, s1) = cpu_ticks(pid)?;
            Ok((u0, s0, u1, s1, t0.elapsed().as_secs_f64()))
        })();
        stop.store(true, Ordering::SeqCst);
        let scrapes = scraper.map(|h| h.join().expect("scraper thread"));
        (measured, scrapes)
    });
    let (u0, s0, u1, s1, el) = measured?;
    let scrapes = scrapes.transpose()?;
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
        scrapes,
    };
    log(format!(
        "  {wans} WANs{}: RSS {:.1} MiB, CPU {:.2} % of one core over {:.0} s",
        match scrapes {
            Some((n, bytes)) => format!(", /metrics scraped {n} times ({bytes} bytes each)"),
            None => String::new(),
        },
        out.rss_kib as f64 / 1024.0,
        out.cpu_pct,
        el
    ));
    drop(mwan);
    Ok(out)
}

/// GETs `/metrics` once a second until `stop`; returns the scrapes that
/// succeeded and the size of the last.
fn scrape_every_second(stop: &AtomicBool) -> Result<(u64, usize)> {
    let addr = LISTEN.parse().expect("valid address");
    let (mut ok, mut size) = (0, 0);
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) && !sig::stopped() {
        let r = http_get(addr, "/metrics")?;
        if r.status != 200 {
            bail!("/metrics answered {}: {}", r.status, r.text());
        }
        ok += 1;
        size = r.body.len();
        next += Duration::from_secs(1);
        while Instant::now() < next && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok((ok, size))
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
