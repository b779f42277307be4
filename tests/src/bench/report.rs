//! The results as a terminal table and as BENCHMARKS.md.

use std::fmt::Write as _;

use super::dns::{DnsRelay, Figures};
use super::domains::Domains;
use super::failover::{self, ms, Failover};
use super::footprint::Footprint;
use super::forwarding::Forwarding;
use super::forwarding6::{Forwarding6, Variant6, ALL6};
use super::ha::HaFailover;
use super::scale::Scale;
use super::stats::{percentile, ratios, si, summary, Summary};
use super::sysinfo::Machine;
use super::variants::{Variant, ALL, LOADED};

pub struct Results {
    pub date: String,
    pub machine: Machine,
    pub quick: bool,
    pub forwarding: Option<Forwarding>,
    /// IPv6 forwarding against plain IPv6 routing with NAT66.
    pub forwarding6: Option<Forwarding6>,
    pub failover: Option<Failover>,
    /// A WAN with 100,000 connections fails.
    pub busy: Option<super::busy::Busy>,
    pub scale: Option<Scale>,
    pub footprint: Option<Footprint>,
    /// The same with the metrics endpoint scraped every second.
    pub footprint_scraped: Option<Footprint>,
    pub ha: Option<HaFailover>,
    pub domains: Option<Domains>,
    /// The DNS relay under load.
    pub dns: Option<DnsRelay>,
    /// Passive health: failover under traffic, and the soak under loss.
    pub passive: Option<super::passive::Passive>,
    pub total_secs: f64,
    /// Load average when the run started.
    pub load_at_start: f64,
    /// User CPU of other processes during the run, share of the machine.
    pub background: f64,
    /// Nice value the bench (and the mwan it starts) ran at.
    pub nice: i32,
}

/// "0.98 [0.95–1.01]": median of the per-round ratios, with their range.
fn ratio_text(s: Summary) -> String {
    if s.n == 0 {
        return "n/a".into();
    }
    if (s.max - s.min).abs() < 0.0005 {
        return format!("{:.2}", s.median);
    }
    format!("{:.2} [{:.2}–{:.2}]", s.median, s.min, s.max)
}

/// "412 kpps (405–420)": median with the range of the raw values.
fn value_text(v: &[f64], unit: &str) -> String {
    let s = summary(v);
    format!(
        "{} ({}–{})",
        si(s.median, unit),
        si(s.min, ""),
        si(s.max, "")
    )
    .replace(" )", ")")
    .replace(" –", "–")
}

struct FwdRow {
    variant: Variant,
    tcp: String,
    tcp_ratio: String,
    udp: String,
    udp_ratio: String,
    cps: String,
    cps_ratio: String,
}

/// Label, TCP, TCP ratio, UDP, UDP ratio of each IPv6 variant.
fn forwarding6_rows(f: &Forwarding6) -> Vec<[String; 5]> {
    let base = &f.samples[Variant6::Plain.index()];
    ALL6.iter()
        .map(|&v| {
            let s = &f.samples[v.index()];
            [
                v.label().to_string(),
                value_text(&s.tcp, "bit/s"),
                ratio_text(summary(&ratios(&s.tcp, &base.tcp))),
                value_text(&s.udp, "pps"),
                ratio_text(summary(&ratios(&s.udp, &base.udp))),
            ]
        })
        .collect()
}

/// The variants of sections 1 and 2 that were measured: the four ways,
/// then the loaded mwan.
fn compared(f: &Forwarding) -> Vec<Variant> {
    ALL.iter()
        .chain(LOADED.iter().filter(|v| f.params.loaded.contains(v)))
        .copied()
        .collect()
}

fn forwarding_rows(f: &Forwarding) -> Vec<FwdRow> {
    let base = &f.samples[Variant::Plain.index()];
    compared(f)
        .into_iter()
        .map(|v| {
            let s = &f.samples[v.index()];
            FwdRow {
                variant: v,
                tcp: value_text(&s.tcp, "bit/s"),
                tcp_ratio: ratio_text(summary(&ratios(&s.tcp, &base.tcp))),
                udp: value_text(&s.udp, "pps"),
                udp_ratio: ratio_text(summary(&ratios(&s.udp, &base.udp))),
                cps: value_text(&s.cps, "conn/s"),
                cps_ratio: ratio_text(summary(&ratios(&s.cps, &base.cps))),
            }
        })
        .collect()
}

/// "60", "15.5": no trailing ".0".
fn num(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn secs(v: f64) -> String {
    let v = if v.abs() < 0.005 { 0.0 } else { v };
    if v >= 10.0 {
        format!("{v:.0} s")
    } else {
        format!("{v:.2} s")
    }
}

struct FailoverFigures {
    /// Every trial.
    failover: Vec<f64>,
    /// Trials repaired within hold_down: raw, and minus what was left of it.
    recovery: Vec<f64>,
    recovery_net: Vec<f64>,
    /// Trials whose outage outlasted hold_down.
    recovery_long: Vec<f64>,
    short: usize,
    long: usize,
    hold_down: f64,
}

fn failover_figures(f: &Failover) -> FailoverFigures {
    let short: Vec<_> = f.trials.iter().filter(|t| !t.long).collect();
    let long: Vec<_> = f.trials.iter().filter(|t| t.long).collect();
    FailoverFigures {
        failover: f.trials.iter().map(|t| t.failover.as_secs_f64()).collect(),
        recovery: short.iter().map(|t| t.recovery.as_secs_f64()).collect(),
        recovery_net: short
            .iter()
            .map(|t| t.recovery.as_secs_f64() - t.hold_down_left(f.hold_down).as_secs_f64())
            .collect(),
        recovery_long: long.iter().map(|t| t.recovery.as_secs_f64()).collect(),
        short: short.len(),
        long: long.len(),
        hold_down: f.hold_down.as_secs_f64(),
    }
}

fn failover_rows(x: &FailoverFigures) -> Vec<(String, &Vec<f64>)> {
    vec![
        (
            format!(
                "blackhole → first new connection via ISP 2 ({} trials)",
                x.failover.len()
            ),
            &x.failover,
        ),
        (
            format!(
                "repair 0.3–0.8 s after → via ISP 1, raw ({} trials)",
                x.short
            ),
            &x.recovery,
        ),
        (
            "  the same minus the rest of hold_down".to_string(),
            &x.recovery_net,
        ),
        (
            format!(
                "repair after an outage > hold_down → via ISP 1 ({} trials)",
                x.long
            ),
            &x.recovery_long,
        ),
    ]
}

fn dist(v: &[f64]) -> (String, String, String, String) {
    let s = summary(v);
    (
        secs(s.median),
        secs(percentile(v, 90.0)),
        secs(s.min),
        secs(s.max),
    )
}

/// The terminal summary.
pub fn table(r: &Results) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "== mwan benchmarks, {}{} ==",
        r.date,
        if r.quick { " (--quick)" } else { "" }
    );
    let _ = writeln!(
        o,
        "other load: load average {:.2} at the start, other processes used {:.0} % of the CPU time during the run (bench at nice {})",
        r.load_at_start,
        r.background * 100.0,
        r.nice
    );
    if let Some(f) = &r.forwarding {
        let _ = writeln!(
            o,
            "\nForwarding LAN → internet, median of {} interleaved rounds (range); ratio to (a) measured in the same round [range]",
            f.params.rounds
        );
        let tcp_head = format!("TCP bulk, {} streams", f.params.tcp_streams);
        let udp_head = format!("UDP 60-byte frames, {} flows", f.params.udp_flows);
        let _ = writeln!(
            o,
            "{:<50} {tcp_head:<30} {udp_head:<30} new connections",
            "variant"
        );
        for row in forwarding_rows(f) {
            let v = row.variant;
            let s = &f.samples[v.index()];
            let label = format!("({}) {}", v.letter(), v.label());
            let tcp = si(summary(&s.tcp).median, "bit/s");
            let udp = si(summary(&s.udp).median, "pps");
            let cps = si(summary(&s.cps).median, "conn/s");
            let _ = writeln!(
                o,
                "{label:<50} {tcp:>12} {:<17} {udp:>12} {:<17} {cps:>13} {}",
                row.tcp_ratio, row.udp_ratio, row.cps_ratio
            );
        }
        let _ = writeln!(
            o,
            "mwan's classifier (kernel BPF run-time stats): {:.0} ns/packet in the UDP test, {:.0} ns/packet in the TCP test, {:.0} ns/packet while opening connections",
            f.bpf_udp.ns, f.bpf_tcp.ns, f.bpf_cps.ns
        );
        super::loaded_table::table(&mut o, f);
        super::cost_table::table(&mut o, f, r.machine.cpus);
    }
    if let Some(f) = &r.forwarding6 {
        let _ = writeln!(
            o,
            "\nIPv6 forwarding LAN → internet, median of {} interleaved rounds (range); ratio to (a6) measured in the same round [range]",
            f.params.rounds
        );
        for [label, tcp, tcp_ratio, udp, udp_ratio] in forwarding6_rows(f) {
            let _ = writeln!(
                o,
                "{label:<50} TCP {tcp:<28} {tcp_ratio:<17} UDP {udp:<26} {udp_ratio}"
            );
        }
    }
    if let Some(f) = &r.failover {
        let x = failover_figures(f);
        let _ = writeln!(
            o,
            "\nFailover, {} trials at mwan's defaults (probe every {} ms, timeout {} ms, down after {}, up after {}, hold_down {} s)",
            f.trials.len(),
            ms(f.probe_interval),
            ms(f.probe_timeout),
            f.down_after,
            f.up_after,
            x.hold_down
        );
        let _ = writeln!(
            o,
            "{:<62} {:>8} {:>8} {:>8} {:>8}",
            "", "median", "p90", "min", "max"
        );
        for (name, v) in failover_rows(&x) {
            let (m, p, lo, hi) = dist(v);
            let _ = writeln!(o, "{name:<62} {m:>8} {p:>8} {lo:>8} {hi:>8}");
        }
        let med = summary(&x.failover).median;
        for c in failover::computed() {
            let _ = writeln!(
                o,
                "{} defaults (computed, not measured): detection {}–{} s (≈{:.0}× mwan), recovery {}–{} s",
                c.name,
                num(c.detect_min),
                num(c.detect_max),
                (c.detect_min + c.detect_max) / 2.0 / med,
                num(c.recover_min),
                num(c.recover_max)
            );
        }
        let _ = writeln!(
            o,
            "multipath route alone: never notices a silent upstream failure (∞); new connections hashed to the dead ISP keep failing"
        );
    }
    if let Some(b) = &r.busy {
        super::busy_report::table(&mut o, b);
    }
    if let Some(s) = &r.scale {
        let plain = summary(&s.rate_plain).median;
        let _ = writeln!(
            o,
            "\nScale: {} pinned flows (max_flows {}): flow map {:.1} MiB in the kernel ({:.0} bytes/flow); `mwan flows --json` {} ({:.0} MB); UDP with the map full {} = {:.2} of (a), {:.2} of the empty map; classifier {:.0} ns/packet full vs {:.0} empty",
            s.pins,
            s.max_flows,
            s.memlock as f64 / 1048576.0,
            s.memlock as f64 / s.max_flows.max(1) as f64,
            secs(summary(&s.list_secs).median),
            s.list_bytes as f64 / 1e6,
            si(summary(&s.rate_full).median, "pps"),
            summary(&s.rate_full).median / plain,
            summary(&s.rate_full).median / summary(&s.rate_empty).median,
            s.bpf_full.ns,
            s.bpf_empty.ns
        );
    }
    if let Some(f) = &r.footprint {
        let _ = writeln!(
            o,
            "\nFootprint with {} WANs probing {} targets every {} ms: RSS {:.1} MiB, CPU {:.2} % of one core ({} threads)",
            f.wans,
            f.targets_per_wan,
            ms(f.probe_interval),
            f.rss_kib as f64 / 1024.0,
            f.cpu_pct,
            f.threads
        );
    }
    if let Some(f) = &r.footprint_scraped {
        let _ = writeln!(
            o,
            "Footprint with /metrics scraped every second: RSS {:.1} MiB, CPU {:.2} % of one core",
            f.rss_kib as f64 / 1024.0,
            f.cpu_pct
        );
    }
    if let Some(h) = &r.ha {
        let (med, p90, min, max) = dist(&ha_column(h, |t| t.first_connection));
        let _ = writeln!(
            o,
            "\nHA pair, router failover ({} trials): first new connection median {med}, p90 {p90}, range {min}–{max}",
            h.trials.len()
        );
    }
    if let Some(d) = &r.domains {
        let f = domain_figures(d);
        let _ = writeln!(
            o,
            "\nA rule with {} names (domains_file), ratio to mwan without it: UDP forwarding {}, new connections {}; \
             RSS {:.1} MiB vs {:.1} MiB; reload {} vs {}; names parsed in {}, matcher built in {}",
            d.params.names,
            f.udp_ratio,
            f.cps_ratio,
            f.rss_with,
            f.rss_without,
            secs(summary(&d.with.reload_secs).median),
            secs(summary(&d.without.reload_secs).median),
            secs(summary(&d.parse_secs).median),
            secs(summary(&d.matcher_secs).median),
        );
    }
    if let Some(d) = &r.dns {
        let rows = dns_rows(d);
        let _ = writeln!(o, "\nDNS relay (dnsperf), relay on vs off:");
        for row in &rows {
            let _ =
                writeln!(
                o,
                "  {:<24} {} vs {} answers/s (ratio {}), median {} vs {} (+{}), p99 {} vs {} (+{}); mwan CPU/answer {}",
                row.load, row.off_qps, row.on_qps, row.ratio, row.off_median, row.on_median,
                row.added_median, row.off_p99, row.on_p99, row.added_p99, row.cpu
            );
        }
        let f = flood_figures(d);
        let _ = writeln!(
            o,
            "  during a flood from another host: {} q/s lookups answered {} (off) vs {} (on), p99 {} vs {}",
            d.params.victim_rate, f.off_success, f.on_success, f.off_p99, f.on_p99
        );
    }
    if let Some(p) = &r.passive {
        let _ = writeln!(
            o,
            "\nPassive health: failover under traffic (p50, p95), soak under loss"
        );
        o.push_str(&super::passive::markdown(p));
    }
    o
}

/// A microsecond figure from seconds: "212 µs".
fn micros(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    format!("{:.0} µs", v * 1e6)
}

/// The median of `f` over rounds.
pub(super) fn med(v: &[Figures], f: impl Fn(&Figures) -> f64) -> f64 {
    summary(&v.iter().map(f).collect::<Vec<_>>()).median
}

/// Per-round differences `on - off` of `f`, their median.
fn added(on: &[Figures], off: &[Figures], f: impl Fn(&Figures) -> f64) -> f64 {
    let d: Vec<f64> = on.iter().zip(off).map(|(a, b)| f(a) - f(b)).collect();
    summary(&d).median
}

struct DnsRow {
    load: String,
    off_qps: String,
    on_qps: String,
    ratio: String,
    off_median: String,
    on_median: String,
    added_median: String,
    off_p99: String,
    on_p99: String,
    added_p99: String,
    /// mwan's CPU per answer, off / on.
    cpu: String,
    /// dnsmasq's CPU per answer (relay on).
    resolver_cpu: String,
}

/// The relay's throughput against the kernel's at load `i`, paired by round.
pub(super) fn dns_ratio(d: &DnsRelay, i: usize) -> Summary {
    let qps = |v: &[Figures]| v.iter().map(|f| f.qps).collect::<Vec<_>>();
    summary(&ratios(&qps(&d.on.loads[i]), &qps(&d.off.loads[i])))
}

/// The median latency the relay adds at load `i`, seconds.
pub(super) fn dns_added_median(d: &DnsRelay, i: usize) -> f64 {
    added(&d.on.loads[i], &d.off.loads[i], |f| f.median)
}

fn dns_rows(d: &DnsRelay) -> Vec<DnsRow> {
    d.params
        .loads()
        .iter()
        .enumerate()
        .map(|(i, rate)| {
            let (off, on) = (&d.off.loads[i], &d.on.loads[i]);
            let qps = |v: &[Figures]| v.iter().map(|f| f.qps).collect::<Vec<_>>();
            DnsRow {
                load: match rate {
                    Some(r) => format!("{r} q/s"),
                    None => format!("unpaced ({} in flight)", super::dns::OUTSTANDING),
                },
                off_qps: value_text(&qps(off), "").replace("  ", " "),
                on_qps: value_text(&qps(on), "").replace("  ", " "),
                ratio: ratio_text(dns_ratio(d, i)),
                off_median: micros(med(off, |f| f.median)),
                on_median: micros(med(on, |f| f.median)),
                added_median: micros(dns_added_median(d, i)),
                off_p99: micros(med(off, |f| f.p99)),
                on_p99: micros(med(on, |f| f.p99)),
                added_p99: micros(added(on, off, |f| f.p99)),
                cpu: format!(
                    "{} / {}",
                    micros(med(off, |f| f.mwan_cpu)),
                    micros(med(on, |f| f.mwan_cpu))
                ),
                resolver_cpu: micros(med(on, |f| f.resolver_cpu)),
            }
        })
        .collect()
}

struct FloodFigures {
    off_success: String,
    on_success: String,
    off_median: String,
    on_median: String,
    off_p99: String,
    on_p99: String,
    off_flood: String,
    on_flood: String,
}

fn flood_figures(d: &DnsRelay) -> FloodFigures {
    let pct = |v: &[Figures]| {
        let s = summary(&v.iter().map(|f| f.success * 100.0).collect::<Vec<_>>());
        format!("{:.1} % ({:.1}–{:.1})", s.median, s.min, s.max)
    };
    let qps = |v: &[Figures]| value_text(&v.iter().map(|f| f.qps).collect::<Vec<_>>(), "");
    FloodFigures {
        off_success: pct(&d.off.victim),
        on_success: pct(&d.on.victim),
        off_median: micros(med(&d.off.victim, |f| f.median)),
        on_median: micros(med(&d.on.victim, |f| f.median)),
        off_p99: micros(med(&d.off.victim, |f| f.p99)),
        on_p99: micros(med(&d.on.victim, |f| f.p99)),
        off_flood: qps(&d.off.flood),
        on_flood: qps(&d.on.flood),
    }
}

fn markdown_dns(o: &mut String, d: &DnsRelay) {
    let p = &d.params;
    let _ = writeln!(o, "## 8. The DNS relay under load (dnsperf)\n");
    let _ = writeln!(
        o,
        "dnsperf on a LAN host asks a dnsmasq in the internet (answering from its own records, \
         no cache) through the router, {} s per run, {} sockets, at most {} queries in flight, \
         a query lost after {} s. mwan with a domain rule (every LAN query is diverted to the relay, \
         which asks the server itself, learns and answers) against the same mwan without domain \
         rules (the kernel forwards the queries), alternating over {} rounds; ratios and added \
         latencies are paired by round, figures are medians over the rounds. One query in {} is \
         for a name the rule lists. dnsperf keeps one source port per socket, so without the relay \
         its queries reuse {} conntrack entries; the relay asks from a pool of upstream sockets \
         (32 per family on random ports, each rotated after 256 queries or 30 s, query IDs \
         rewritten at random).\n",
        p.run.as_secs_f64(),
        super::dns::CLIENTS,
        super::dns::OUTSTANDING,
        super::dns::TIMEOUT.as_secs_f64(),
        p.rounds,
        10,
        super::dns::CLIENTS,
    );
    let _ = writeln!(
        o,
        "| load | relay off: answers/s | relay on: answers/s | ratio | median off / on | added | p99 off / on | added | mwan CPU per answer off / on | dnsmasq's |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in dns_rows(d) {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} / {} | {} | {} / {} | {} | {} | {} |",
            r.load,
            r.off_qps,
            r.on_qps,
            r.ratio,
            r.off_median,
            r.on_median,
            r.added_median,
            r.off_p99,
            r.on_p99,
            r.added_p99,
            r.cpu,
            r.resolver_cpu
        );
    }
    let _ = writeln!(
        o,
        "\nmwan's CPU per answer is the daemon's user and system time (all threads; the packets its \
         system calls carry through the router's stack included) during the run, divided by the \
         answers; dnsmasq's likewise, for scale. The lab's client, resolver and router share the \
         machine's CPUs, so the unpaced rate is what is left when all three have their share: the \
         relay's cost per query, beside the resolver's and dnsperf's, sets the ratio."
    );
    let f = flood_figures(d);
    let _ = writeln!(
        o,
        "\n**A flood from one host.** One LAN host asks as fast as it can ({} sockets, {} queries in \
         flight); another does {} lookups a second meanwhile. The relay holds at most {} queries of \
         one client and serves the clients' queued queries in turn (docs/ARCHITECTURE.md).\n",
        super::dns::FLOOD_CLIENTS,
        super::dns::FLOOD_OUTSTANDING,
        p.victim_rate,
        mwan::dns::relay::LIMITS.per_client,
    );
    let _ = writeln!(o, "| | relay off | relay on |\n|---|---|---|");
    let _ = writeln!(
        o,
        "| the other host's lookups answered | {} | {} |",
        f.off_success, f.on_success
    );
    let _ = writeln!(
        o,
        "| their latency, median | {} | {} |",
        f.off_median, f.on_median
    );
    let _ = writeln!(o, "| their latency, p99 | {} | {} |", f.off_p99, f.on_p99);
    let _ = writeln!(
        o,
        "| the flooding host's answers/s | {} | {} |\n",
        f.off_flood, f.on_flood
    );
}

struct DomainFigures {
    udp_ratio: String,
    cps_ratio: String,
    rss_with: f64,
    rss_without: f64,
}

fn domain_figures(d: &Domains) -> DomainFigures {
    DomainFigures {
        udp_ratio: ratio_text(summary(&ratios(&d.with.udp, &d.without.udp))),
        cps_ratio: ratio_text(summary(&ratios(&d.with.cps, &d.without.cps))),
        rss_with: summary(&d.with.rss_kib).median / 1024.0,
        rss_without: summary(&d.without.rss_kib).median / 1024.0,
    }
}

fn markdown_domains(o: &mut String, d: &Domains) {
    let f = domain_figures(d);
    let _ = writeln!(o, "## 7. Rules by domain name: {} names\n", d.params.names);
    let _ = writeln!(
        o,
        "mwan with one rule whose `domains_file` lists {} names ({:.1} MB), against the same mwan \
         without domain rules, alternating over {} rounds (ratios paired by round). With the rule, \
         every new flow pays the classifier's `DOMAIN_DST` lookup and passes the DNS divert's rules; \
         the relay is not on the path of this (non-DNS) traffic. Memory is the daemon's resident set \
         after start; the reload re-reads the config and its names file.\n",
        d.params.names,
        d.file_bytes as f64 / 1e6,
        d.params.rounds
    );
    let _ = writeln!(
        o,
        "| | without domain rules | with the {}-name rule | ratio |\n|---|---|---|---|",
        d.params.names
    );
    let _ = writeln!(
        o,
        "| small UDP packets, {} flows | {} | {} | {} |",
        d.params.udp_flows,
        value_text(&d.without.udp, "pps"),
        value_text(&d.with.udp, "pps"),
        f.udp_ratio
    );
    let _ = writeln!(
        o,
        "| new connections/s | {} | {} | {} |",
        value_text(&d.without.cps, "conn/s"),
        value_text(&d.with.cps, "conn/s"),
        f.cps_ratio
    );
    let _ = writeln!(
        o,
        "| daemon RSS | {:.1} MiB | {:.1} MiB | +{:.1} MiB ({:.0} bytes per name) |",
        f.rss_without,
        f.rss_with,
        f.rss_with - f.rss_without,
        (f.rss_with - f.rss_without) * 1048576.0 / d.params.names.max(1) as f64
    );
    let _ = writeln!(
        o,
        "| `mwan reload` (nothing changed) | {} | {} | |",
        secs(summary(&d.without.reload_secs).median),
        secs(summary(&d.with.reload_secs).median)
    );
    let _ = writeln!(
        o,
        "| load the names: parse and validate the config / build the matcher (median of {}) | | {} / {} | |\n",
        d.parse_secs.len(),
        secs(summary(&d.parse_secs).median),
        secs(summary(&d.matcher_secs).median)
    );
}

fn ha_column(h: &HaFailover, f: impl Fn(&super::ha::HaTrial) -> std::time::Duration) -> Vec<f64> {
    h.trials.iter().map(|t| f(t).as_secs_f64()).collect()
}

fn markdown_ha(o: &mut String, h: &HaFailover) {
    let _ = writeln!(o, "## 6. Router failover (HA pair)\n");
    let _ = writeln!(
        o,
        "Two routers run mwan with keepalived (VRRPv3, `advert_int` {:.1} s, `nopreempt`) and conntrackd \
         (FTFW, entries injected into the standby's kernel table), as in [docs/HA.md](docs/HA.md). In \
         each of {} trials a download runs through the active router, which then dies (links down, every \
         process killed) at a random phase against the advertisements; the dead router boots again as \
         the standby and the next trial kills the other one. Times from the death; the download must go \
         on from the same address (it does in every trial, or the bench stops).\n",
        h.advert_int.as_secs_f64(),
        h.trials.len()
    );
    let _ = writeln!(o, "| | median | p90 | min | max |\n|---|---|---|---|---|");
    for (name, col) in [
        (
            "standby holds the gateway address",
            ha_column(h, |t| t.address_moved),
        ),
        (
            "first new connection answered",
            ha_column(h, |t| t.first_connection),
        ),
        ("download's longest stall", ha_column(h, |t| t.stall)),
    ] {
        let (med, p90, min, max) = dist(&col);
        let _ = writeln!(o, "| {name} | {med} | {p90} | {min} | {max} |");
    }
    let _ = writeln!(
        o,
        "\nVRRP declares the master dead after three advertisement intervals plus a skew of \
         (256 − priority)/256 intervals; a shorter `advert_int` moves the addresses sooner at the price \
         of more advertisements and a higher risk of a spurious takeover on a loaded router. New \
         connections work as soon as the addresses have moved (the bench starts an attempt every 5 ms; \
         an application whose SYN went to the dead router waits for the kernel's SYN retransmission). \
         The download resumes with the server's next TCP retransmission after the move.\n"
    );
    let _ = writeln!(o, "<details><summary>Every trial</summary>\n");
    let _ = writeln!(
        o,
        "| trial | address moved | first new connection | download stall |\n|---|---|---|---|"
    );
    for (i, t) in h.trials.iter().enumerate() {
        let _ = writeln!(
            o,
            "| {} | {:.0} ms | {:.0} ms | {:.0} ms |",
            i + 1,
            ms(t.address_moved),
            ms(t.first_connection),
            ms(t.stall)
        );
    }
    let _ = writeln!(o, "\n</details>\n");
}

/// BENCHMARKS.md.
pub fn markdown(r: &Results) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let _ = writeln!(o, "# mwan benchmarks\n");
    let _ = writeln!(
        o,
        "Generated by `cargo xtask bench{}` on {} — do not edit by hand; run it again instead.\n",
        if r.quick { " --quick" } else { "" },
        r.date
    );
    let _ = writeln!(
        o,
        "Every figure below was measured in one run, on one machine, in the same namespace lab; \
         forwarding figures are given as ratios to the plain-routing baseline measured alongside them. \
         The lab is virtual (veth pairs between network namespaces, all on {} CPUs), so absolute \
         numbers say little about real hardware; the ratios are the point.\n",
        m.cpus
    );
    let _ = writeln!(o, "## Machine\n");
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| CPU | {} ({} CPUs) |", m.cpu, m.cpus);
    let _ = writeln!(o, "| Memory | {:.1} GiB |", m.memory_gib);
    let _ = writeln!(
        o,
        "| System | {}, Linux {}{} |",
        m.os,
        m.kernel,
        m.virt
            .as_ref()
            .map(|v| format!(", virtualized ({v})"))
            .unwrap_or_default()
    );
    let _ = writeln!(o, "| mwan | {} |", m.mwan_version);
    let _ = writeln!(o, "| nftables | {} |", m.nft_version);
    let _ = writeln!(o, "| Date | {} |", r.date);
    let _ = writeln!(o, "| Bench run time | {:.0} s |", r.total_secs);
    let _ = writeln!(
        o,
        "| Other load | load average {:.2} at the start; other processes used {:.0} % of the machine's CPU time (user) during the run |",
        r.load_at_start,
        r.background * 100.0
    );
    let _ = writeln!(
        o,
        "| Priority | the bench and the daemons it starts ran at nice {} so that other processes disturb the figures less |\n",
        r.nice
    );

    markdown_summary(&mut o, r);
    super::goals::markdown(&mut o, r);
    if let Some(f) = &r.forwarding {
        markdown_forwarding(&mut o, f);
    }
    if let Some(f) = &r.forwarding6 {
        markdown_forwarding6(&mut o, f);
        super::cost_table::markdown6(&mut o, f, r.machine.cpus);
    }
    if let Some(f) = &r.forwarding {
        super::cost_table::markdown(&mut o, f, r.machine.cpus);
    }
    if let Some(f) = &r.failover {
        markdown_failover(&mut o, f);
    }
    if let Some(b) = &r.busy {
        super::busy_report::markdown(&mut o, b);
    }
    if let Some(s) = &r.scale {
        markdown_scale(&mut o, s);
    }
    if let Some(f) = &r.footprint {
        markdown_footprint(&mut o, f, r.footprint_scraped.as_ref());
    }
    if let Some(h) = &r.ha {
        markdown_ha(&mut o, h);
    }
    if let Some(d) = &r.domains {
        markdown_domains(&mut o, d);
    }
    if let Some(p) = &r.passive {
        let _ = writeln!(o, "## 9. Passive health\n");
        let _ = writeln!(
            o,
            "A silent upstream blackhole of the primary (ISP 1; ISP 2 is the backup) while a LAN host opens connections continuously (16 threads, 64 destinations, each attempt bounded by 700 ms); `hold_down = \"1s\"` in every variant. Failover: from the blackhole to the first new connection answered through ISP 2 (as in section 3); with passive health on, that is when it suspects ISP 1 (new connections avoid a suspected WAN while a burst of probes confirms; the burst's failure then takes it down, the last column). `passive = false` is the probes alone. The soak runs the defaults with the same traffic (`mwan-bench --soak-secs`).\n"
        );
        o.push_str(&super::passive::markdown(p));
        o.push('\n');
    }
    if let Some(d) = &r.dns {
        markdown_dns(&mut o, d);
    }
    o += CHANGES;
    o += METHOD;
    o
}

fn markdown_summary(o: &mut String, r: &Results) {
    let _ = writeln!(o, "## Summary\n");
    if let Some(f) = &r.forwarding {
        let rows = forwarding_rows(f);
        let _ = writeln!(
            o,
            "Forwarding through the router, as a ratio to plain routing with NAT (a) measured in the \
             same round (median of {} rounds, range in brackets; 1.00 = no cost, higher is better):\n",
            f.params.rounds
        );
        let _ = writeln!(
            o,
            "| | TCP bulk | small UDP packets | new connections/s |\n|---|---|---|---|"
        );
        for row in rows.iter().skip(1) {
            let _ = writeln!(
                o,
                "| ({}) {} | {} | {} | {} |",
                row.variant.letter(),
                row.variant.label(),
                row.tcp_ratio,
                row.udp_ratio,
                row.cps_ratio
            );
        }
        o.push('\n');
        super::loaded_table::markdown(o, f);
        let base = summary(&f.samples[Variant::Plain.index()].udp);
        let _ = writeln!(
            o,
            "mwan's classifier costs {:.0} ns per forwarded packet (kernel BPF statistics, small-packet test).\n",
            f.bpf_udp.ns
        );
        let _ = writeln!(
            o,
            "How noisy this machine is: the baseline's own small-packet rate ranged from {} to {} \
             between rounds ({:+.0} % to {:+.0} % around its median). Ratios closer to 1 than that \
             are within the noise of a single measurement; the medians over {} rounds are steadier, \
             but differences of a few percent are not resolved by this run.\n",
            si(base.min, "pps"),
            si(base.max, "pps"),
            (base.min / base.median - 1.0) * 100.0,
            (base.max / base.median - 1.0) * 100.0,
            f.params.rounds
        );
    }
    if let Some(f) = &r.forwarding6 {
        let rows = forwarding6_rows(f);
        let _ = writeln!(
            o,
            "IPv6 forwarding, as a ratio to plain IPv6 routing with NAT66 (a6) measured in the same \
             round (median of {} rounds):\n\n| | TCP bulk | small UDP packets |\n|---|---|---|",
            f.params.rounds
        );
        for [label, _, tcp_ratio, _, udp_ratio] in rows.iter().skip(1) {
            let _ = writeln!(o, "| {label} | {tcp_ratio} | {udp_ratio} |");
        }
        let _ = writeln!(o);
    }
    if let Some(f) = &r.failover {
        let x = failover_figures(f);
        let med = summary(&x.failover).median;
        let mut line = format!(
            "Silent upstream failure to working new connections: **mwan {} (median of {} trials, \
             measured)**",
            secs(med),
            x.failover.len()
        );
        for c in failover::computed() {
            line += &format!(
                "; {} defaults {}–{} s (computed, not measured: {:.0}–{:.0}× longer)",
                c.name,
                num(c.detect_min),
                num(c.detect_max),
                c.detect_min / med,
                c.detect_max / med
            );
        }
        line += "; a multipath route never notices.\n";
        let _ = writeln!(o, "{line}");
    }
    if let Some(b) = &r.busy {
        let _ = writeln!(o, "{}", super::busy_report::summary_line(b));
    }
    if let Some(s) = &r.scale {
        let _ = writeln!(
            o,
            "{} pinned flows take {:.0} MiB of kernel memory; `mwan flows --json` lists them in {}; \
             with the map full, small packets forward at {:.2} of plain routing ({:.2} of mwan with \
             an empty map; the classifier takes {:.0} ns per packet instead of {:.0}).\n",
            s.pins,
            s.memlock as f64 / 1048576.0,
            secs(summary(&s.list_secs).median),
            summary(&s.rate_full).median / summary(&s.rate_plain).median,
            summary(&s.rate_full).median / summary(&s.rate_empty).median,
            s.bpf_full.ns,
            s.bpf_empty.ns
        );
    }
    if let Some(f) = &r.footprint {
        let _ = writeln!(
            o,
            "The daemon with {} WANs probing every {} ms: {:.1} MiB resident, {:.1} % of one CPU{}.\n",
            f.wans,
            ms(f.probe_interval),
            f.rss_kib as f64 / 1024.0,
            f.cpu_pct,
            match &r.footprint_scraped {
                Some(s) => format!(
                    "; with its metrics endpoint scraped every second, {:.1} MiB and {:.1} %",
                    s.rss_kib as f64 / 1024.0,
                    s.cpu_pct
                ),
                None => String::new(),
            }
        );
    }
}

fn markdown_forwarding6(o: &mut String, f: &Forwarding6) {
    let _ = writeln!(o, "## 1b. IPv6 forwarding cost\n");
    let _ = writeln!(
        o,
        "The same measurements over IPv6 in the dual-stack lab ({} LAN hosts, {} ISPs): mwan with \
         `ipv6 = \"nat\"` on every WAN and the ct-mark balancer of (c) over IPv6 (an `ip6` table, \
         `ip -6` rules, NAT66 per WAN; in the router that has had ip rules) against plain IPv6 \
         routing through ISP 1 with NAT66 (masquerade), interleaved over {} rounds. Ratios are to \
         (a6) in the same round; higher is better.\n",
        f.hosts, f.isps, f.params.rounds
    );
    let _ = writeln!(
        o,
        "| variant | TCP bulk, {} streams | ratio | UDP, small packets, {} flows | ratio |\n|---|---|---|---|---|",
        f.params.tcp_streams, f.params.udp_flows
    );
    for [label, tcp, tcp_ratio, udp, udp_ratio] in forwarding6_rows(f) {
        let _ = writeln!(o, "| {label} | {tcp} | {tcp_ratio} | {udp} | {udp_ratio} |");
    }
    let _ = writeln!(o);
}

fn markdown_forwarding(o: &mut String, f: &Forwarding) {
    let _ = writeln!(o, "## 1. Forwarding cost\n");
    let _ = writeln!(
        o,
        "LAN → internet through the router, {} LAN hosts, {} ISPs; every measurement {:.1} s after \
         a {:.1} s warm-up. Median of {} rounds, range in parentheses; ratio to (a) is the median of \
         the per-round ratios (each variant against the baseline of the same round), range in \
         brackets. Higher is better.\n",
        f.hosts,
        f.isps,
        f.params.window.measure.as_secs_f64(),
        f.params.window.warmup.as_secs_f64(),
        f.params.rounds
    );
    let _ = writeln!(
        o,
        "| variant | TCP bulk, {} streams | ratio | UDP, 60-byte frames, {} flows | ratio |\n|---|---|---|---|---|",
        f.params.tcp_streams, f.params.udp_flows
    );
    let rows = forwarding_rows(f);
    for row in &rows {
        let _ = writeln!(
            o,
            "| ({}) {} | {} | {} | {} | {} |",
            row.variant.letter(),
            row.variant.label(),
            row.tcp,
            row.tcp_ratio,
            row.udp,
            row.udp_ratio
        );
    }
    let _ = writeln!(
        o,
        "\n**mwan's classifier itself** (`mwan_lan_eth`, kernel BPF run-time statistics: \
         `run_time_ns / run_cnt`, enabled with `BPF_ENABLE_STATS` only for this measurement): \
         **{:.0} ns per packet** in the UDP test ({} runs), {:.0} ns per packet in the TCP test \
         ({} runs: the uploads' packets, mostly GSO super-packets), {:.0} ns per packet while opening \
         connections ({} runs, {:.1} per connection: every SYN inserts a pin), i.e. \
         {:.2} µs of classifier time per new connection.\n",
        f.bpf_udp.ns,
        f.bpf_udp.runs,
        f.bpf_tcp.ns,
        f.bpf_tcp.runs,
        f.bpf_cps.ns,
        f.bpf_cps.runs,
        f.runs_per_conn,
        f.bpf_cps.ns * f.runs_per_conn / 1000.0
    );
    let _ = writeln!(o, "## 2. New connections per second\n");
    let _ = writeln!(
        o,
        "{} client threads on {} LAN hosts open TCP connections one after the other to 16 \
         listening ports in the internet and reset them once established (no TIME_WAIT); every \
         connection is a new conntrack entry, a new NAT binding and, with mwan, a new pin.\n",
        f.params.cps_threads * f.hosts,
        f.hosts
    );
    let _ = writeln!(o, "| variant | connections/s | ratio |\n|---|---|---|");
    for row in &rows {
        let _ = writeln!(
            o,
            "| ({}) {} | {} | {} |",
            row.variant.letter(),
            row.variant.label(),
            row.cps,
            row.cps_ratio
        );
    }
    let failed: u64 = f.samples.iter().map(|s| s.cps_failed).sum();
    let _ = writeln!(
        o,
        "\nFailed connection attempts over all rounds: {failed}.\n"
    );
    let _ = writeln!(o, "<details><summary>Every round</summary>\n");
    let _ = writeln!(
        o,
        "| variant | TCP bit/s | UDP received pps | UDP sent pps | connections/s |\n|---|---|---|---|---|"
    );
    for v in compared(f) {
        let s = &f.samples[v.index()];
        for i in 0..s.tcp.len() {
            let _ = writeln!(
                o,
                "| ({}) round {} | {} | {} | {} | {} |",
                v.letter(),
                i + 1,
                si(s.tcp[i], ""),
                si(s.udp[i], ""),
                si(s.udp_sent[i], ""),
                si(s.cps[i], "")
            );
        }
    }
    let _ = writeln!(o, "\n</details>\n");
}

fn markdown_failover(o: &mut String, f: &Failover) {
    let x = failover_figures(f);
    let _ = writeln!(o, "## 3. Failover\n");
    let _ = writeln!(
        o,
        "{} trials. ISP 1 is the primary (tier 1), ISP 2 the backup (tier 2); every health setting \
         is mwan's default (a probe round every {} ms to 3 targets, timeout {} ms, down after {} \
         failed rounds, up after {} good rounds and not before `hold_down` = {} s has passed since \
         it went down). The failure is silent: ISP 1 drops everything it would forward while its \
         link and gateway stay up (`lab.isp(1).set_blackhole(true)`). A LAN host opens a new \
         connection every 5 ms (each to a port used by no earlier trial, so every attempt is a new \
         5-tuple: the pin of a closed connection stays in the flow map until it is evicted, and a \
         new connection that reused its 5-tuple would follow it); the time is taken from the failure (or the repair) to the first new connection \
         answered through the other (or the repaired) ISP. In {} trials ISP 1 is repaired \
         0.3–0.8 s after the failover, in {} after an outage longer than `hold_down`.\n",
        f.trials.len(),
        ms(f.probe_interval),
        ms(f.probe_timeout),
        f.down_after,
        f.up_after,
        x.hold_down,
        x.short,
        x.long
    );
    let _ = writeln!(
        o,
        "| measured (mwan) | median | p90 | min | max |\n|---|---|---|---|---|"
    );
    for (name, v) in failover_rows(&x) {
        let (m, p, lo, hi) = dist(v);
        let _ = writeln!(o, "| {name} | {m} | {p} | {lo} | {hi} |");
    }
    let med = summary(&x.failover).median;
    let rec_long = summary(&x.recovery_long).median;
    let _ = writeln!(
        o,
        "\n**About `hold_down`**: the raw repair time of the short outages includes the deliberate \
         `hold_down` of {} s. It runs from the moment the WAN went down, not from the repair, so \
         what is left of it at the repair (5 s minus the 0.3–0.8 s the WAN had already been down) \
         is the bulk of the raw figure; the row below it subtracts exactly that remainder, trial by \
         trial. After an outage longer than `hold_down` nothing is left to wait for and the repair \
         is noticed by the good probe rounds alone.\n",
        x.hold_down
    );
    let _ = writeln!(
        o,
        "**For comparison, computed from documented defaults, not measured** (the same event: a \
         silent upstream failure, one monitored target; recovery after a long outage):\n"
    );
    let _ = writeln!(
        o,
        "| | defaults | failure detected | vs mwan (median) | repair detected |\n|---|---|---|---|---|"
    );
    let _ = writeln!(
        o,
        "| **mwan (measured above)** | probe every {} ms, timeout {} ms, down after {}, up after {}, hold_down {} s | **{}** (median, until a new connection works) | 1× | {} (median, outage > hold_down) |",
        ms(f.probe_interval),
        ms(f.probe_timeout),
        f.down_after,
        f.up_after,
        x.hold_down,
        secs(med),
        secs(rec_long)
    );
    for c in failover::computed() {
        let _ = writeln!(
            o,
            "| {} (computed) | {} | {}–{} s | {:.0}–{:.0}× slower | {}–{} s |",
            c.name,
            c.settings,
            num(c.detect_min),
            num(c.detect_max),
            c.detect_min / med,
            c.detect_max / med,
            num(c.recover_min),
            num(c.recover_max)
        );
    }
    let _ = writeln!(o, "| multipath route alone | — | never (∞) | — | — |\n");
    for c in failover::computed() {
        let _ = writeln!(o, "* **{}**: {}", c.name, c.how);
    }
    let _ = writeln!(
        o,
        "* **Multipath route alone**: the kernel drops a nexthop only when its link goes down \
         (or, with `ignore_routes_with_linkdown`, loses carrier). A silent upstream failure \
         leaves the link up, so the route never changes and the new connections hashed to the \
         dead ISP keep failing until someone intervenes.\n"
    );
    let _ = writeln!(o, "Sources for the defaults:\n");
    let _ = writeln!(
        o,
        "* mwan3: OpenWrt documentation, <https://openwrt.org/docs/guide-user/network/wan/multiwan/mwan3> \
         (interface options `interval`, `timeout`, `down`, `up`, `failure_interval`, `recovery_interval`); \
         the values are the defaults `mwan3track` applies to an interface that leaves them unset \
         (`config_get timeout … 4`, `interval … 10`, `down … 5`, `up … 5`, \
         `failure_interval` and `recovery_interval` default to `interval`), \
         <https://github.com/openwrt/packages/blob/master/net/mwan3/files/usr/sbin/mwan3track>."
    );
    let _ = writeln!(
        o,
        "* pfSense: Netgate documentation, Gateway Settings (advanced: Probe Interval, Loss Interval, \
         Time Period, Alert Interval, Packet Loss Thresholds), \
         <https://docs.netgate.com/pfsense/en/latest/routing/gateway-configure.html>; the defaults \
         pfSense starts dpinger with (`interval` 500, `loss_interval` 2000, `time_period` 60000, \
         `alert_interval` 1000, `losshigh` 20, `latencyhigh` 500) are in `return_dpinger_defaults()`, \
         <https://github.com/pfsense/pfsense/blob/master/src/etc/inc/gwlb.inc>; how dpinger counts \
         loss and raises and clears alarms: <https://github.com/dennypage/dpinger/blob/master/dpinger.c>.\n"
    );
    let _ = writeln!(o, "<details><summary>Every trial</summary>\n");
    let _ = writeln!(
        o,
        "| trial | outage | failover | down when repaired | recovery (raw) | of it, rest of hold_down |\n|---|---|---|---|---|---|"
    );
    for (i, t) in f.trials.iter().enumerate() {
        let _ = writeln!(
            o,
            "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |",
            i + 1,
            if t.long { "long" } else { "short" },
            ms(t.failover),
            ms(t.down_for),
            ms(t.recovery),
            ms(t.hold_down_left(f.hold_down))
        );
    }
    let _ = writeln!(o, "\n</details>\n");
}

fn markdown_scale(o: &mut String, s: &Scale) {
    let plain = summary(&s.rate_plain);
    let empty = summary(&s.rate_empty);
    let full = summary(&s.rate_full);
    let _ = writeln!(o, "## 4. Scale: a million pinned flows\n");
    let _ = writeln!(
        o,
        "mwan with `max_flows = {}`. A LAN host sent {} UDP packets with distinct 5-tuples \
         (source port × destination address) through the router in {:.1} s; every one that \
         reached the classifier became a real pin (the router's conntrack table overflowed, as \
         expected: pins are made at tc ingress, before conntrack).\n",
        s.max_flows, s.fill_packets, s.fill_secs
    );
    let _ = writeln!(o, "| | |\n|---|---|");
    let _ = writeln!(o, "| pinned flows | {} |", s.pins);
    let _ = writeln!(
        o,
        "| flow map memory (kernel `memlock` of the map, /proc/…/fdinfo) | {:.1} MiB ({:.0} bytes per flow) |",
        s.memlock as f64 / 1048576.0,
        s.memlock as f64 / s.max_flows.max(1) as f64
    );
    let _ = writeln!(
        o,
        "| `mwan flows --json` (all flows, {:.0} MB of JSON) | {} (median of {}) |",
        s.list_bytes as f64 / 1e6,
        secs(summary(&s.list_secs).median),
        s.list_secs.len()
    );
    let _ = writeln!(
        o,
        "| UDP forwarding, (a) plain routing | {} |",
        value_text(&s.rate_plain, "pps")
    );
    let _ = writeln!(
        o,
        "| UDP forwarding, mwan, empty map | {} = {:.2} of (a) |",
        value_text(&s.rate_empty, "pps"),
        empty.median / plain.median
    );
    let _ = writeln!(
        o,
        "| UDP forwarding, mwan, map full ({} flows after the test) | {} = {:.2} of (a), {:.2} of the empty map |",
        s.pins_after_rate_test,
        value_text(&s.rate_full, "pps"),
        full.median / plain.median,
        full.median / empty.median
    );
    let _ = writeln!(
        o,
        "| classifier, ns per packet (BPF stats) | {:.0} with the map full, {:.0} empty |\n",
        s.bpf_full.ns, s.bpf_empty.ns
    );
}

fn markdown_footprint(o: &mut String, f: &Footprint, scraped: Option<&Footprint>) {
    let _ = writeln!(o, "## 5. Daemon footprint\n");
    let _ = writeln!(
        o,
        "mwan with {} WANs at the default probe interval ({} ms, {} ICMP targets per WAN: {:.0} \
         probes per second), all up; /proc/<pid>/stat and /proc/<pid>/status over {:.0} s. \
         *Idle*: nothing asks it anything. *Scraped*: `metrics_listen` on and `/metrics` \
         fetched every second meanwhile{}.\n",
        f.wans,
        ms(f.probe_interval),
        f.targets_per_wan,
        f.wans as f64 * f.targets_per_wan as f64 * 1000.0 / ms(f.probe_interval),
        f.secs,
        match scraped.and_then(|s| s.scrapes) {
            Some((n, bytes)) => format!(" ({n} scrapes of {:.1} kB)", bytes as f64 / 1e3),
            None => String::new(),
        }
    );
    let all: Vec<&Footprint> = std::iter::once(f).chain(scraped).collect();
    let row = |o: &mut String, what: &str, cell: &dyn Fn(&Footprint) -> String| {
        let cells: Vec<String> = all.iter().map(|f| cell(f)).collect();
        let _ = writeln!(o, "| {what} | {} |", cells.join(" | "));
    };
    let _ = writeln!(
        o,
        "| | idle |{}\n|---|---|{}",
        if scraped.is_some() {
            " scraped every second |"
        } else {
            ""
        },
        if scraped.is_some() { "---|" } else { "" }
    );
    row(o, "resident memory (VmRSS)", &|f| {
        format!(
            "{:.1} MiB (peak {:.1} MiB)",
            f.rss_kib as f64 / 1024.0,
            f.hwm_kib as f64 / 1024.0
        )
    });
    row(o, "CPU (utime + stime)", &|f| {
        format!(
            "{:.2} % of one core ({:.2} % user, {:.2} % system)",
            f.cpu_pct, f.user_pct, f.sys_pct
        )
    });
    row(o, "threads", &|f| f.threads.to_string());
    o.push('\n');
}

/// What changed in mwan's per-packet work since the previous published
/// run, and what it did to the figures (kept by hand, with the code).
const CHANGES: &str = "## Changes since the previous run

* **The DNS relay asks from a pool of upstream sockets** (issue 18, section 8). Before,
  every query opened, connected and closed a socket of its own (with tokio's registration:
  about a fifth of the relay's CPU in a profile under dnsperf). Now each family has 32
  sockets on kernel-chosen random ports, rotated after 256 queries or 30 s; each query's
  ID is rewritten to a random one and an answer is taken only from the server asked, with
  that ID and the query's question byte for byte (docs/ARCHITECTURE.md weighs what this
  gives up against a socket per query). The fair queue is locked once per query, and
  answers are received into a per-thread buffer. A quick A/B on a busy machine (2 rounds
  each) measured the unpaced ratio 0.39 → 0.56 and the relay's CPU per answer 53 → 34 µs;
  section 8 has this run's figures.
* **The DNS divert has a conntrack zone of its own** (`dns_zone`, a filter chain at raw
  priority), so that a client repeating a diverted query's 5-tuple after the daemon died is
  not sent to the dead relay. While a rule has domains, every LAN packet passes this one
  more base chain; all but DNS leave at its first rule. The (d+domains) and (d+all) rows
  include it.
* New: the goals of issue 18, figure by figure (after the summary), and (c6), the
  nftables ct-mark balancer over IPv6, in section 1b. The bench now checks that (c) and
  (c6) really spread connections over both WANs before measuring them.

";

const METHOD: &str = "## Method

* **Lab**: network namespaces (crate `mwan-tests`, `lab`): LAN hosts on a bridge, a router,
  one namespace per ISP (each filters foreign source addresses, BCP 38 — the same cost for
  every variant) and an internet namespace with the servers. No rate limits or delays.
  Traffic generators and sinks are threads of the bench process with their sockets in the
  namespaces, so sender, router, ISPs and receiver share the same CPUs: a variant that costs
  more per packet shows up as a lower rate.
* **Variants**, set up by the bench in the router namespace and removed between runs (the
  router's conntrack table is flushed each time, and the `clsact` qdisc mwan leaves on
  `lan0` after its teardown is deleted, so no variant inherits an ingress hook):
  (a) a default route through ISP 1 and `masquerade` — no balancing;
  (b) a multipath default route over both ISPs (`fib_multipath_hash_policy = 1`, L4 hash),
  `masquerade` per WAN;
  (c) the ct-mark balancer of mwan3 and VyOS, in nftables: in `prerouting` (priority
  mangle) every packet gets `meta mark set ct mark`; a new connection from the LAN without
  a mark gets `numgen random mod 2` → a WAN mark; every packet saves `ct mark set meta
  mark`; `ip rule` fwmark → per-WAN table with a default route; `masquerade` per WAN
  (plus `lookup main suppress_prefixlength 0` first, so replies reach the LAN); (c6), in
  section 1b, is the same over IPv6 (`table ip6`, `ip -6 rule`, each ISP's IPv6 default
  route, NAT66 `masquerade` per WAN); before each measurement of (c) and (c6), 20 connections
  from a LAN host must leave through both WANs;
  (d) the real `mwan` binary with the lab's config (both ISPs, weight 1, every default);
  (e)–(i) mwan's pieces one at a time (section 1c): mwan is started with `--keep` and
  stopped, everything but the piece is removed (its nftables table, its ip rules, its
  `clsact` qdisc), and plain routing through ISP 1 is added;
  (d+domains), (d+sticky), (d+scrape), (d+all): mwan with what a loaded router has, in the
  same rounds as (d): a rule whose `domains_file` lists 50,000 names (the DNS relay runs),
  `sticky = \"host\"`, `metrics_listen` with `/metrics` fetched every second while the
  variant is set up (its measurement included), and all three (`--quick`: (d+all) only).
  Variants (a) and (b) run in a
  lab whose router never had an ip rule, all others in a second, identical lab whose router
  has (the kernel routes through the rule list for good once a namespace has had one).
  The LAN bridge does not pass frames to netfilter (`bridge-nf-call-iptables = 0`, as on a
  router without `br_netfilter`; kernels with it built in turn it on in every namespace).
* **Interleaving**: in each round, for one test after the other (UDP, TCP, new
  connections), every variant is set up, measured after a warm-up and torn down, in an order rotated from round to round; so the measurements a ratio compares are
  seconds apart. Ratios are taken within a round; the median over rounds is reported with
  the range of the per-round ratios, and every round is listed.
* **TCP bulk**: 4 connections from the LAN hosts upload as fast as they can to a sink in the
  internet; bytes received per second. veth passes GSO super-packets, so this test has few
  packets and mostly shows that nothing is in the way of bulk transfers.
* **Small UDP packets**: 256 UDP sockets (flows) on 2 LAN hosts send 18-byte datagrams
  (60-byte frames) with `sendmmsg`; an nftables rule in the internet namespace counts and
  drops them before conntrack. Packets per second that arrive.
* **New connections**: see section 2. The server resets each connection as soon as it has
  accepted it; when that reset reaches the client before the client has looked at its
  completed `connect`, the kernel reports `ECONNRESET`, which (unlike `ECONNREFUSED`) only
  happens after the handshake, so it is counted as an established connection.
* **Kernel profiles** (section 1c): `perf record -a -g -e cpu-clock` (a software clock; no
  hardware counters needed) for 3 s of the UDP test, per variant, 3 times interleaved;
  `perf script` gives every sample's call stack, and each of the bench's own samples is put
  in the first component of the table whose functions are on it. Time per packet is the
  samples over the sampling rate and the packets counted in the internet meanwhile.
  `MWAN_BENCH_BASE_BIN` adds mwan built from another revision as variant (d0) to the same
  rounds and profiles (an A/B of two builds).
* **eBPF cost**: `BPF_ENABLE_STATS` (fd-scoped, no sysctl changed) only around dedicated
  runs; `run_time_ns` and `run_cnt` of the `mwan_lan_eth` program attached to `lan0`, read with
  `BPF_OBJ_GET_INFO_BY_FD` (aya's program info).
* **Failover**: see section 3. The computed figures for mwan3 and pfSense follow their
  documented defaults and the algorithms of `mwan3track` and `dpinger` step by step; they are
  arithmetic, not measurements, and leave out the time those tools then need to rewrite
  rules (mwan3's hotplug scripts, pfSense's filter reload).
* **A busy router**: see section 3b (`mwan-bench --only busy`). The servers' ends of the
  idle TCP connections wait in their listeners' accept queues and the clients' are held by
  child processes of the bench, so no process needs more open files than its limit.
* **Scale**: see section 4. **Footprint**: see section 5. **Rules by domain name**: see
  section 7 (`mwan-bench --only domains` runs it alone). **The DNS relay under load**: see
  section 8 (`mwan-bench --only dns`; Debian's `dnsperf`, latencies from its `-v` lines).
* Benchmarks are never tests: no timing assertion exists in the test suite.
";
