//! Section 3b as a table for the terminal, a line for the summary and a
//! section of BENCHMARKS.md (see [`super::busy`]).

use std::fmt::Write as _;
use std::time::Duration;

use super::busy::{opt_ms, Busy, Cleanup, Trial, GOAL, UDP_TIMEOUT};
use super::failover::ms;
use super::held;
use super::stats::{percentile, ratios, summary};

/// The trials of one kind.
fn of_kind(b: &Busy, busy: bool) -> Vec<&Trial> {
    b.trials.iter().filter(|t| t.busy == busy).collect()
}

fn secs(v: &[&Trial], f: impl Fn(&Trial) -> Option<Duration>) -> Vec<f64> {
    v.iter()
        .map(|t| f(t).map_or(f64::NAN, |d| d.as_secs_f64()))
        .collect()
}

/// Busy/idle ratios of the failover, paired by pair.
pub(super) fn failover_ratios(b: &Busy) -> Vec<f64> {
    let f = |busy| secs(&of_kind(b, busy), |t| Some(t.failover));
    ratios(&f(true), &f(false))
}

/// All status latencies of one kind of trial.
fn status_all(v: &[&Trial]) -> (Vec<f64>, usize) {
    let lat = v.iter().flat_map(|t| t.status.iter().copied()).collect();
    (lat, v.iter().map(|t| t.status_failed).sum())
}

/// Whether every busy trial's entries were gone within [`GOAL`].
pub(super) fn goal_met(b: &Busy) -> bool {
    of_kind(b, true)
        .iter()
        .all(|t| t.gone.is_some_and(|g| g <= GOAL))
}

/// The busy trials' status latencies and failed answers.
pub(super) fn status_of_busy(b: &Busy) -> (Vec<f64>, usize) {
    status_all(&of_kind(b, true))
}

/// "0.90 s (worst 0.92 s)": when the dead WAN's entries were gone.
pub(super) fn worst_gone(b: &Busy) -> String {
    let gone = summary(&secs(&of_kind(b, true), |t| t.gone));
    format!("{} (worst {})", fmt_s(gone.median), fmt_s(gone.max))
}

fn fmt_s(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2} s")
    } else {
        "n/a".into()
    }
}

fn dist(v: &[f64]) -> String {
    let s = summary(v);
    format!("{} [{}–{}]", fmt_s(s.median), fmt_s(s.min), fmt_s(s.max))
}

/// One line for the report's summary.
pub fn summary_line(b: &Busy) -> String {
    let busy = of_kind(b, true);
    let idle = of_kind(b, false);
    let (lat, failed) = status_of_busy(b);
    format!(
        "A busy router ({} connections through the WAN that fails): new connections through the other WAN after {} (median; {} on an idle router, ratio {}); all the dead WAN's conntrack entries gone after {}; goal {} s: {}; `mwan status` answered every time it was asked meanwhile{} (p99 {:.0} ms, max {:.0} ms).\n",
        b.params.held(),
        fmt_s(summary(&secs(&busy, |t| Some(t.failover))).median),
        fmt_s(summary(&secs(&idle, |t| Some(t.failover))).median),
        ratio(&failover_ratios(b)),
        worst_gone(b),
        GOAL.as_secs(),
        if goal_met(b) { "met" } else { "missed" },
        if failed == 0 { String::new() } else { format!(" but {failed} times") },
        percentile(&lat, 99.0) * 1e3,
        summary(&lat).max * 1e3,
    )
}

fn ratio(v: &[f64]) -> String {
    let s = summary(v);
    if s.n == 0 {
        return "n/a".into();
    }
    format!("{:.2} [{:.2}–{:.2}]", s.median, s.min, s.max)
}

/// The terminal table.
pub fn table(o: &mut String, b: &Busy) {
    let _ = writeln!(
        o,
        "\nBusy router, {} pairs of trials ({} TCP + {} UDP connections via ISP 1, {} + {} via ISP 2):",
        b.params.pairs, b.params.tcp, b.params.udp, b.params.isp2, b.params.isp2
    );
    for (name, busy) in [("busy", true), ("idle", false)] {
        let v = of_kind(b, busy);
        let (lat, failed) = status_all(&v);
        let _ = writeln!(
            o,
            "  {name}: failover {}, entries gone {}, cleanup logged {}; status p99 {:.0} ms, max {:.0} ms, {failed} failed of {}",
            dist(&secs(&v, |t| Some(t.failover))),
            dist(&secs(&v, |t| t.gone)),
            dist(&secs(&v, |t| t.cleanup.deleted_at)),
            percentile(&lat, 99.0) * 1e3,
            summary(&lat).max * 1e3,
            lat.len() + failed
        );
    }
    let _ = writeln!(
        o,
        "  failover busy/idle {}; goal (entries gone within {} s) {}",
        ratio(&failover_ratios(b)),
        GOAL.as_secs(),
        if goal_met(b) { "met" } else { "missed" }
    );
}

/// The section of BENCHMARKS.md.
pub fn markdown(o: &mut String, b: &Busy) {
    let p = &b.params;
    let _ = writeln!(o, "## 3b. A busy router loses a WAN\n");
    let _ = writeln!(
        o,
        "As in section 3 (ISP 1 the primary, ISP 2 the backup, mwan's defaults, a silent \
         blackhole, a new connection every 5 ms), in {} pairs of trials, one on a busy router \
         and one on an idle one, alternating; every trial starts a fresh daemon on a flushed \
         conntrack table (the kernel's `nf_conntrack_max`, {}, read-only in a namespace, is \
         ample). The busy router carries {} connections through ISP 1: {} TCP \
         connections opened from the two LAN hosts and left idle (both ends open: the servers' \
         wait in their listeners' accept queues, the clients' are held by child processes of the \
         bench, {} to a process, each under its own limit of open files) and {} \
         UDP flows, each from its own source port, answered by an echo server (the router's \
         UDP conntrack timeout raised to {UDP_TIMEOUT} s so that none expires by itself); each \
         is a conntrack entry masqueraded to ISP 1's address and a pin in mwan's flow map. A \
         rule sends a second server's traffic through ISP 2, and {} TCP connections and {} UDP \
         flows go there: the cleanup must leave them alone. Times are from the failure: the \
         first new connection answered through ISP 2; the moment the router's conntrack table \
         holds no LAN connection masqueraded to ISP 1 (its entry count polled every 10 ms, and \
         a dump, cheap once the count has fallen, that must find none); the daemon's log line \
         that its cleanup deleted what the flush by ct mark left (after reading every pin and a \
         dump of the table), and the one that it nudged the TCP clients. Meanwhile `mwan status \
         --json` is run every 50 ms (the CLI in the router namespace, start to exit).\n",
        p.pairs,
        b.conntrack_max,
        p.held(),
        p.tcp,
        held::PER_CHILD,
        p.udp,
        p.isp2,
        p.isp2
    );
    let _ = writeln!(o, "| | busy router | idle router |\n|---|---|---|");
    markdown_rows(o, b);
    let _ = writeln!(
        o,
        "\nFailover on the busy router against the idle one, paired by pair: **{}** (1.00: as \
         fast). Goal: every entry of the dead WAN gone within {} s of its failure: **{}**.\n",
        ratio(&failover_ratios(b)),
        GOAL.as_secs(),
        if goal_met(b) { "met" } else { "missed" }
    );
    markdown_trials(o, b);
}

fn markdown_rows(o: &mut String, b: &Busy) {
    let (busy, idle) = (of_kind(b, true), of_kind(b, false));
    let row = |o: &mut String, what: &str, f: &dyn Fn(&[&Trial]) -> String| {
        let _ = writeln!(o, "| {what} | {} | {} |", f(&busy), f(&idle));
    };
    let times = |f: fn(&Trial) -> Option<Duration>| move |v: &[&Trial]| dist(&secs(v, f));
    row(
        o,
        "failure → first new connection via ISP 2, median [range]",
        &times(|t| Some(t.failover)),
    );
    row(o, "failure → no entry of ISP 1 left", &times(|t| t.gone));
    row(
        o,
        "failure → cleanup logged (flush, pins read, dump, deletion)",
        &times(|t| t.cleanup.deleted_at),
    );
    row(
        o,
        "failure → nudges logged",
        &times(|t| t.cleanup.nudged_at),
    );
    row(
        o,
        "in the daemon: the flush by ct mark / the whole deletion",
        &|v| {
            let f = |g: fn(&Cleanup) -> Option<f64>| {
                summary(
                    &v.iter()
                        .map(|t| g(&t.cleanup).unwrap_or(f64::NAN))
                        .collect::<Vec<_>>(),
                )
                .median
            };
            format!("{:.0} ms / {:.0} ms", f(|c| c.flush_ms), f(|c| c.delete_ms))
        },
    );
    row(
        o,
        "entries the dump found after the flush; TCP clients nudged",
        &|v| {
            let f = |g: fn(&Cleanup) -> Option<u64>| {
                summary(
                    &v.iter()
                        .map(|t| g(&t.cleanup).map_or(f64::NAN, |x| x as f64))
                        .collect::<Vec<_>>(),
                )
                .median
            };
            format!("{:.0}; {:.0}", f(|c| c.deleted), f(|c| c.nudged))
        },
    );
    row(o, "`mwan status --json`: answers, p99, max", &|v| {
        let (lat, failed) = status_all(v);
        format!(
            "{} of {}, {:.0} ms, {:.0} ms",
            lat.len(),
            lat.len() + failed,
            percentile(&lat, 99.0) * 1e3,
            summary(&lat).max * 1e3
        )
    });
    row(
        o,
        "LAN entries via ISP 1 / pins on ISP 1 before (median)",
        &|v| {
            let m = |f: fn(&Trial) -> usize| {
                summary(&v.iter().map(|t| f(t) as f64).collect::<Vec<_>>()).median
            };
            format!("{:.0} / {:.0}", m(|t| t.isp1_entries), m(|t| t.isp1_pins))
        },
    );
    row(o, "LAN entries via ISP 2 before / after", &|v| {
        let (before, after): (usize, usize) = (
            v.iter().map(|t| t.isp2_entries).sum(),
            v.iter().map(|t| t.isp2_kept).sum(),
        );
        format!("{before} / {after} (all trials)")
    });
    row(o, "opening the held connections", &|v| {
        dist(&secs(v, |t| Some(t.setup)))
    });
}

fn markdown_trials(o: &mut String, b: &Busy) {
    let _ = writeln!(o, "<details><summary>Every trial</summary>\n");
    let _ = writeln!(
        o,
        "| trial | router | failover | entries gone | cleanup logged | nudges logged | status p99 / max |\n|---|---|---|---|---|---|---|"
    );
    for (i, t) in b.trials.iter().enumerate() {
        let _ = writeln!(
            o,
            "| {} | {} | {:.0} ms | {} | {} | {} | {:.0} / {:.0} ms |",
            i + 1,
            if t.busy { "busy" } else { "idle" },
            ms(t.failover),
            opt_ms(t.gone),
            opt_ms(t.cleanup.deleted_at),
            opt_ms(t.cleanup.nudged_at),
            percentile(&t.status, 99.0) * 1e3,
            summary(&t.status).max * 1e3,
        );
    }
    let _ = writeln!(o, "\n</details>\n");
}
