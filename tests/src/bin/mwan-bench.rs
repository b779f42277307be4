//! `cargo xtask bench [--quick]`: measures mwan against plain routing, a
//! multipath route and an nftables ct-mark balancer in the namespace lab,
//! prints a table and writes BENCHMARKS.md. Needs root.

#[path = "../bench/mod.rs"]
mod bench;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bench::report::Results;
use bench::traffic::Window;
use bench::variants::{Variant, LOADED};
use bench::{
    busy, dns, domains, failover, footprint, forwarding, forwarding6, ha, passive, report, scale,
    sig, sysinfo, update,
};

const USAGE: &str = "usage: mwan-bench [--quick] [--out FILE] [--only SECTIONS]

  --quick          fewer rounds, trials and flows (about 2 minutes); the
                   report goes to target/BENCHMARKS-quick.md unless --out is given
  --out FILE       where to write the Markdown report (default: BENCHMARKS.md
                   at the workspace root; with --quick target/BENCHMARKS-quick.md)
  --rounds N       rounds of the interleaved forwarding sections (default 10, --quick 3)
  --update FILE    with --only: put the sections measured into the report FILE in place
                   of their old text (the header says which, and when)
  --only SECTIONS  comma-separated subset of: forwarding, forwarding6 (IPv6, dual-stack
                   lab), failover, busy (a WAN with 100,000 connections fails), scale,
                   footprint, ha, domains, dns, passive
  --soak-secs N    length of the passive section's soak under 10 % loss (default
                   600, --quick 20)

Runs as root; builds network namespaces only (nothing on the host's own
network changes). MWAN_BIN selects the mwan binary (cargo xtask bench sets it).";

struct Args {
    quick: bool,
    rounds: Option<usize>,
    out: PathBuf,
    sections: Vec<String>,
    /// `--update FILE`: the measured sections go into this report.
    update: Option<PathBuf>,
    soak_secs: Option<u64>,
}

/// Nice value of the bench (inherited by the mwan daemons it starts).
const NICE: i32 = -10;

const SECTIONS: [&str; 10] = [
    "forwarding",
    "forwarding6",
    "failover",
    "busy",
    "scale",
    "footprint",
    "ha",
    "domains",
    "dns",
    "passive",
];

fn parse_args() -> Result<Option<Args>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut quick = false;
    let mut rounds = None;
    let mut soak_secs = None;
    let mut out = None;
    let mut update = None;
    let mut sections: Vec<String> = SECTIONS.iter().map(|s| s.to_string()).collect();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--rounds" => {
                let n = it.next().unwrap_or_default();
                rounds =
                    Some(n.parse().map_err(|_| {
                        anyhow::anyhow!("--rounds: `{n}` is not a number\n\n{USAGE}")
                    })?);
            }
            "--soak-secs" => {
                let n = it.next().unwrap_or_default();
                soak_secs = Some(n.parse().map_err(|_| {
                    anyhow::anyhow!("--soak-secs: `{n}` is not a number\n\n{USAGE}")
                })?);
            }
            "--out" => out = Some(PathBuf::from(it.next().unwrap_or_default())),
            "--update" => update = Some(PathBuf::from(it.next().unwrap_or_default())),
            "--only" => {
                sections = it
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if let Some(bad) = sections.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
                    bail!("unknown section `{bad}`\n\n{USAGE}");
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument `{other}`\n\n{USAGE}"),
        }
    }
    let out = out.unwrap_or_else(|| {
        if quick {
            root.join("target/BENCHMARKS-quick.md")
        } else {
            root.join("BENCHMARKS.md")
        }
    });
    Ok(Some(Args {
        quick,
        rounds,
        out,
        sections,
        update,
        soak_secs,
    }))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(bench::held::CHILD_ARG) {
        // A child holding TCP connections for the busy-router section.
        return match bench::held::child_main(&args[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mwan-bench {}: {e:#}", bench::held::CHILD_ARG);
                ExitCode::FAILURE
            }
        };
    }
    sig::install();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if sig::stopped() {
                eprintln!("mwan-bench: interrupted; the lab has been removed");
                return ExitCode::from(130);
            }
            eprintln!("mwan-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks build network namespaces: run as root (sudo cargo xtask bench)");
    }
    let started = Instant::now();
    let cpu0 = sysinfo::cpu_sample();
    let load_at_start = sysinfo::loadavg();
    // Other processes on the machine (builds, tests) skew every figure; a
    // higher priority for the bench and what it starts keeps them from
    // stealing the CPUs the lab runs on. It favours no variant.
    let nice = if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) } == 0 {
        NICE
    } else {
        0
    };
    let bin = lab::mwan::binary();
    let machine = sysinfo::machine(&bin);
    println!(
        "mwan-bench{}: {} ({} CPUs), {}, Linux {}; mwan {}",
        if args.quick { " --quick" } else { "" },
        machine.cpu,
        machine.cpus,
        machine.os,
        machine.kernel,
        bin.display()
    );
    let log = |s: String| println!("{s}");
    let want = |s: &str| args.sections.iter().any(|x| x == s);
    let q = args.quick;
    let mut results = Results {
        date: sysinfo::utc_now(),
        machine,
        quick: q,
        forwarding: None,
        forwarding6: None,
        failover: None,
        busy: None,
        scale: None,
        footprint: None,
        footprint_scraped: None,
        ha: None,
        domains: None,
        dns: None,
        passive: None,
        total_secs: 0.0,
        load_at_start,
        background: 0.0,
        nice,
    };
    if load_at_start > 1.0 {
        println!(
            "note: load average {load_at_start:.1}: other processes are busy; the figures will be noisier"
        );
    }
    let window = Window {
        warmup: Duration::from_millis(300),
        measure: Duration::from_millis(if q { 600 } else { 1000 }),
    };
    if want("forwarding") {
        println!("\n1-2. Forwarding cost and new connections per second");
        results.forwarding = Some(forwarding::run(
            &forwarding::Params {
                rounds: args.rounds.unwrap_or(if q { 3 } else { 10 }),
                window,
                tcp_streams: 4,
                udp_flows: 256,
                cps_threads: 2,
                // --quick: only the one with everything.
                loaded: if q {
                    vec![Variant::MwanAll]
                } else {
                    LOADED.to_vec()
                },
            },
            &log,
        )?);
    }
    if want("forwarding6") {
        println!("\n1b. IPv6 forwarding cost (mwan vs plain IPv6 routing with NAT66)");
        results.forwarding6 = Some(forwarding6::run(
            &forwarding::Params {
                rounds: args.rounds.unwrap_or(if q { 3 } else { 10 }),
                window,
                tcp_streams: 4,
                udp_flows: 256,
                cps_threads: 2,
                loaded: Vec::new(),
            },
            &log,
        )?);
    }
    if want("failover") {
        println!("\n3. Failover and recovery (silent upstream blackhole)");
        results.failover = Some(failover::run(
            if q { 5 } else { 20 },
            if q { 2 } else { 5 },
            &log,
        )?);
    }
    if want("busy") {
        println!("\n3b. A busy router loses a WAN (100,000 connections)");
        results.busy = Some(busy::run(
            &busy::Params {
                pairs: if q { 2 } else { 5 },
                tcp: 50_000,
                udp: 50_000,
                isp2: 100,
            },
            &log,
        )?);
    }
    if want("scale") {
        println!("\n4. Scale: a full flow map");
        results.scale = Some(scale::run(
            &scale::Params {
                max_flows: if q { 262_144 } else { 1_048_576 },
                reps: if q { 1 } else { 5 },
                window,
                udp_flows: 256,
                fill_pps: 250_000,
            },
            &log,
        )?);
    }
    if want("footprint") {
        println!("\n5. Daemon footprint");
        let secs = Duration::from_secs(if q { 5 } else { 20 });
        results.footprint = Some(footprint::run(8, secs, false, &log)?);
        results.footprint_scraped = Some(footprint::run(8, secs, true, &log)?);
    }
    if want("ha") {
        println!("\n6. Router failover of an HA pair (keepalived, conntrackd)");
        results.ha = Some(ha::run(if q { 3 } else { 10 }, &log)?);
    }
    if want("domains") {
        println!("\n7. Rules by domain name: 50,000 names");
        results.domains = Some(domains::run(
            &domains::Params {
                rounds: if q { 2 } else { 5 },
                window,
                udp_flows: 256,
                cps_threads: 2,
                names: 50_000,
            },
            &log,
        )?);
    }
    if want("dns") {
        println!("\n8. The DNS relay under load (dnsperf)");
        results.dns = Some(dns::run(
            &dns::Params {
                rounds: if q { 2 } else { 5 },
                run: Duration::from_secs(if q { 2 } else { 4 }),
                rates: vec![1_000, 10_000],
                victim_rate: 200,
            },
            &log,
        )?);
    }
    if want("passive") {
        println!("\n9. Passive health: failover under traffic, soak under loss");
        let soak = args.soak_secs.unwrap_or(if q { 20 } else { 600 });
        results.passive = Some(passive::run(
            if q { 3 } else { 20 },
            Duration::from_secs(soak),
            &log,
        )?);
    }
    results.total_secs = started.elapsed().as_secs_f64();
    results.background = sysinfo::background_share(cpu0, sysinfo::cpu_sample());
    println!("\n{}", report::table(&results));
    let mut md = report::markdown(&results);
    if let Some(into) = &args.update {
        let old = std::fs::read_to_string(into)
            .map_err(|e| anyhow::anyhow!("--update {}: {e}", into.display()))?;
        let when = sysinfo::utc_now();
        md = update::merge(&old, &md, &when);
        std::fs::write(into, &md)?;
        println!("updated {}", into.display());
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, md)?;
    let out = args.out.canonicalize().unwrap_or(args.out);
    println!(
        "wrote {} (total {:.0} s)",
        out.display(),
        results.total_secs
    );
    Ok(())
}
