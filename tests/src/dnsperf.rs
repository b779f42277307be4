//! Debian's `dnsperf`, the DNS load tool, run from a LAN host against a
//! dnsmasq resolver in the internet (the DNS relay's bench and its flood
//! test). dnsperf sends from `clients` sockets (a fixed source port each),
//! keeps at most `outstanding` queries in flight, optionally paced at
//! `rate` queries per second; `-v` prints each answer's latency, from which
//! the median and the 99th percentile are taken here.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::{Lab, Netns, Proc};

/// The resolver's address in the internet namespace.
pub const PERF_RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 55);

/// Fails with what to install when dnsperf is missing.
pub fn check_dnsperf() -> Result<()> {
    let found = Command::new("dnsperf").arg("-h").output().is_ok();
    ensure!(
        found,
        "dnsperf is needed (Debian: dnsperf; `cargo xtask bench` installs it)"
    );
    Ok(())
}

/// dnsmasq on [`PERF_RESOLVER`]:53 answering every name under each
/// `(zone, address)` from its own records (no cache, no upstream), in the
/// foreground (the lab ends it with the namespace); returns once it
/// answers.
pub fn start_resolver(lab: &Lab, zones: &[(&str, Ipv4Addr)]) -> Result<Proc> {
    let inet = lab.inet();
    inet.ip(&format!("addr add {PERF_RESOLVER}/32 dev lo"))?;
    let mut args: Vec<String> = [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--port=53",
        "--pid-file=",
        "--cache-size=0",
        "--local-ttl=300",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--listen-address={PERF_RESOLVER}"));
    args.extend(zones.iter().map(|(z, a)| format!("--address=/{z}/{a}")));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let proc = inet.spawn("dnsmasq", &argv, &[])?;
    let (zone, _) = zones.first().context("a zone")?;
    let ready = crate::wait_until(Duration::from_secs(5), || {
        inet.dns_lookup(
            SocketAddrV4::new(PERF_RESOLVER, 53),
            &format!("ready.{zone}"),
        )
        .is_ok()
    });
    if !ready {
        bail!("dnsmasq does not answer\n{}", proc.output_so_far());
    }
    Ok(proc)
}

/// A query file for dnsperf: `n` names, one in `every` of them under
/// `listed` and the others under `other`, type A.
pub fn names_file(path: &Path, n: usize, listed: &str, other: &str, every: usize) -> Result<()> {
    let mut s = String::new();
    for i in 0..n {
        let zone = if every > 0 && i % every == 0 {
            listed
        } else {
            other
        };
        s += &format!("n{i}.{zone} A\n");
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

/// How dnsperf loads the resolver.
#[derive(Clone, Debug)]
pub struct Load {
    /// Queries per second (`-Q`); `None`: as fast as answers come.
    pub rate: Option<u32>,
    /// Queries in flight at most (`-q`).
    pub outstanding: u32,
    /// Sockets (`-c`).
    pub clients: u32,
    pub duration: Duration,
    /// A query unanswered this long is lost (`-t`).
    pub timeout: Duration,
}

/// What one dnsperf run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub sent: u64,
    pub completed: u64,
    /// Answers per second.
    pub qps: f64,
    /// Seconds, one per answer, sorted.
    pub latencies: Vec<f64>,
}

impl Report {
    /// The share of sent queries answered.
    pub fn success(&self) -> f64 {
        if self.sent == 0 {
            return f64::NAN;
        }
        self.completed as f64 / self.sent as f64
    }

    /// The latency below which `p` percent of the answers came, seconds.
    pub fn latency_percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil().max(1.0) as usize;
        self.latencies[rank.min(self.latencies.len()) - 1]
    }
}

/// A dnsperf run in progress.
pub struct Running {
    proc: Proc,
    deadline: Instant,
}

/// Starts dnsperf in `host` against `server` with the queries of `names`.
pub fn start(host: &Netns, server: SocketAddrV4, names: &Path, load: &Load) -> Result<Running> {
    let mut args = vec![
        "-s".to_string(),
        server.ip().to_string(),
        "-p".into(),
        server.port().to_string(),
        "-d".into(),
        names.display().to_string(),
        "-l".into(),
        format!("{:.1}", load.duration.as_secs_f64()),
        "-q".into(),
        load.outstanding.to_string(),
        "-c".into(),
        load.clients.to_string(),
        "-T".into(),
        "1".into(),
        "-t".into(),
        format!("{:.1}", load.timeout.as_secs_f64()),
        "-v".into(),
    ];
    if let Some(r) = load.rate {
        args.extend(["-Q".into(), r.to_string()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let proc = host.spawn("dnsperf", &argv, &[])?;
    Ok(Running {
        proc,
        deadline: Instant::now() + load.duration + load.timeout + Duration::from_secs(10),
    })
}

impl Running {
    /// Waits for the run to end and reads its figures.
    pub fn finish(self) -> Result<Report> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let status = self.proc.wait_timeout(left);
        let out = self.proc.output_so_far();
        match status {
            Some(s) if s.success() => {}
            Some(s) => bail!("dnsperf failed ({s})\n{out}"),
            None => bail!("dnsperf did not end in time\n{out}"),
        }
        parse(&out.stdout).with_context(|| format!("reading dnsperf's output\n{out}"))
    }
}

/// The figures of dnsperf's `-v` output: its statistics block and one
/// `> RCODE name type latency` line per answer.
pub fn parse(stdout: &str) -> Result<Report> {
    let field = |label: &str| -> Result<f64> {
        let line = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .with_context(|| format!("no `{label}` line"))?;
        let v = line.split_whitespace().next().context("no value")?;
        v.parse().with_context(|| format!("`{label}` {v}"))
    };
    let mut latencies: Vec<f64> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("> "))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse().ok())
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok(Report {
        sent: field("Queries sent:")? as u64,
        completed: field("Queries completed:")? as u64,
        qps: field("Queries per second:")?,
        latencies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_statistics_and_latencies() {
        let out = "[Status] Sending queries (to 198.51.100.55:53)\n\
            > NOERROR n1.bench.example A 0.000300\n\
            > NOERROR n2.bench.example A 0.000100\n\
            > SERVFAIL n3.bench.example A 0.000200\n\
            \nStatistics:\n\n  Queries sent:         4\n  Queries completed:    3 (75.00%)\n\
              Queries lost:         1 (25.00%)\n  Queries per second:   1.500000\n";
        let r = parse(out).unwrap();
        assert_eq!((r.sent, r.completed), (4, 3));
        assert_eq!(r.qps, 1.5);
        assert_eq!(r.latencies, [0.0001, 0.0002, 0.0003]);
        assert_eq!(r.latency_percentile(50.0), 0.0002);
        assert_eq!(r.latency_percentile(99.0), 0.0003);
        assert_eq!(r.success(), 0.75);
    }
}
