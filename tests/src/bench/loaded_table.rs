//! mwan as a loaded router runs it (a 50,000-name domain rule, host pins,
//! its metrics scraped every second, all three) against plain mwan (d),
//! from the rounds of sections 1 and 2: for the summary of BENCHMARKS.md
//! and the terminal.

use std::fmt::Write as _;

use super::forwarding::{Forwarding, Samples};
use super::stats::{ratios, summary};
use super::variants::{Variant, LOADED};

/// The loaded variants that were measured.
fn measured(f: &Forwarding) -> Vec<Variant> {
    LOADED
        .iter()
        .filter(|v| f.params.loaded.contains(v))
        .copied()
        .collect()
}

/// One test's figures of a variant: its rates, per round.
type Test = fn(&Samples) -> &Vec<f64>;

const TESTS: [(&str, Test); 3] = [
    ("TCP bulk", |s| &s.tcp),
    ("small UDP packets", |s| &s.udp),
    ("new connections/s", |s| &s.cps),
];

/// Per round: the variant's ratio to (a) minus (d)'s, in points.
pub(super) fn points(x: &[f64], d: &[f64], a: &[f64]) -> Vec<f64> {
    ratios(x, a)
        .iter()
        .zip(ratios(d, a))
        .map(|(x, d)| (x - d) * 100.0)
        .collect()
}

/// "0.99 [0.95–1.02], −0.6 points [−4.1–+2.0]".
fn cell(f: &Forwarding, v: Variant, test: Test) -> String {
    let s = |v: Variant| test(&f.samples[v.index()]);
    let (x, d, a) = (s(v), s(Variant::Mwan), s(Variant::Plain));
    let r = summary(&ratios(x, d));
    let p = summary(&points(x, d, a));
    if r.n == 0 {
        return "n/a".into();
    }
    format!(
        "{:.2} [{:.2}–{:.2}]; {:+.1} points [{:+.1} to {:+.1}]",
        r.median, r.min, r.max, p.median, p.min, p.max
    )
}

/// The table below the summary's forwarding table.
pub fn markdown(o: &mut String, f: &Forwarding) {
    let loaded = measured(f);
    if loaded.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "mwan with what a loaded router has, against (d) plain mwan in the same round: the ratio \
         to (d), then how far the variant's ratio to (a) is from (d)'s, in points (median of the \
         {} rounds, range in brackets). (d+scrape) fetches `/metrics` once a second during each \
         of its measurements; (d+domains) has one rule whose `domains_file` lists 50,000 names \
         (every new flow pays the classifier's domain lookup and passes the DNS divert's rules).\n",
        f.params.rounds
    );
    let head: Vec<&str> = TESTS.iter().map(|(name, _)| *name).collect();
    let _ = writeln!(o, "| | {} |\n|---|---|---|---|", head.join(" | "));
    for v in loaded {
        let cells: Vec<String> = TESTS.iter().map(|(_, t)| cell(f, v, *t)).collect();
        let _ = writeln!(
            o,
            "| ({}) {} | {} |",
            v.letter(),
            v.label(),
            cells.join(" | ")
        );
    }
    o.push('\n');
}

/// One line per loaded variant for the terminal.
pub fn table(o: &mut String, f: &Forwarding) {
    let loaded = measured(f);
    if loaded.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\nLoaded mwan against (d), same rounds (ratio to (d); points of ratio to (a) from (d)'s):"
    );
    for v in loaded {
        let cells: Vec<String> = TESTS
            .iter()
            .map(|(name, t)| format!("{name} {}", cell(f, v, *t)))
            .collect();
        let _ = writeln!(o, "  ({}): {}", v.letter(), cells.join(", "));
    }
}
