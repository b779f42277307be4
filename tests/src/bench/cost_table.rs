//! Section 1c of BENCHMARKS.md: what each of mwan's pieces costs, from
//! the rates of the variants made of them (section 1's rounds) and from
//! the kernel profiles (`profile`).

use std::fmt::Write as _;

use super::forwarding::Forwarding;
use super::profile::{Profile, COMPONENTS};
use super::stats::{ratios, si, summary};
use super::variants::{Variant, PARTS};

/// What a piece costs: the variant with it against the variant without.
struct Piece {
    what: &'static str,
    with: Variant,
    without: Variant,
}

const PIECES: [Piece; 6] = [
    Piece {
        what: "ip rules exist at all (the kernel's rule walk instead of one lookup in the merged main table, and a full reverse-path lookup)",
        with: Variant::PlainRuled,
        without: Variant::Plain,
    },
    Piece {
        what: "mwan's ip rules and tables (packets unmarked)",
        with: Variant::Rules,
        without: Variant::PlainRuled,
    },
    Piece {
        what: "mwan's nftables table (ct-mark restore in prerouting, record and NAT in postrouting)",
        with: Variant::NftTable,
        without: Variant::PlainRuled,
    },
    Piece {
        what: "mwan's classifier (tc ingress, its marks unused)",
        with: Variant::Classifier,
        without: Variant::PlainRuled,
    },
    Piece {
        what: "the classifier's marks routed by mwan's ip rules",
        with: Variant::NoNft,
        without: Variant::Classifier,
    },
    Piece {
        what: "all of mwan (d) against plain routing (a)",
        with: Variant::Mwan,
        without: Variant::Plain,
    },
];

/// CPU time per unit of work each round, from a rate `r` on a machine
/// with `cpus` CPUs, all of them busy with the test: `cpus / r`.
/// Returns the per-round differences `with − without`, in `unit`s of a
/// second (1e9: ns).
fn cost(with: &[f64], without: &[f64], cpus: f64, unit: f64) -> Vec<f64> {
    with.iter()
        .zip(without)
        .map(|(w, b)| cpus * unit * (1.0 / w - 1.0 / b))
        .collect()
}

/// "+412 ns [380–455]".
fn cost_text(v: &[f64], unit: &str) -> String {
    let s = summary(v);
    if s.n == 0 {
        return "n/a".into();
    }
    format!("{:+.0} {unit} [{:+.0}–{:+.0}]", s.median, s.min, s.max)
}

fn ratio_text(v: &[f64]) -> String {
    let s = summary(v);
    if s.n == 0 {
        return "n/a".into();
    }
    format!("{:.2} [{:.2}–{:.2}]", s.median, s.min, s.max)
}

pub(super) fn profile_of(f: &Forwarding, v: Variant) -> Option<&Profile> {
    f.profiles.iter().find(|(p, _)| *p == v).map(|(_, p)| p)
}

/// The section.
pub fn markdown(o: &mut String, f: &Forwarding, cpus: usize) {
    let _ = writeln!(o, "## 1c. Where the time goes\n");
    let _ = writeln!(
        o,
        "mwan taken apart: each piece is exactly what mwan installs (it is started with `--keep`, \
         stopped, and everything but the piece removed), added to plain routing and measured in \
         the rounds of sections 1 and 2. Once an ip rule has been added to a network namespace, \
         the kernel routes every packet through the rule list for the namespace's life \
         (`fib_has_custom_rules` is never cleared, the local and main tables stay unmerged) and \
         checks every forwarded packet's source with a full reverse lookup; so (a) and (b) run \
         in a router that never had a rule and every other variant in a second, identical lab \
         whose router has, and (e) is plain routing there.\n"
    );
    let _ = writeln!(
        o,
        "| variant | small UDP packets | ratio to (a) | ratio to (e) | new connections/s | ratio to (a) | ratio to (e) |\n|---|---|---|---|---|---|---|"
    );
    let s = |v: Variant| &f.samples[v.index()];
    let (a, e) = (s(Variant::Plain), s(Variant::PlainRuled));
    for v in [Variant::Plain, Variant::Mwan].iter().chain(&PARTS) {
        let x = s(*v);
        let _ = writeln!(
            o,
            "| ({}) {} | {} | {} | {} | {} | {} | {} |",
            v.letter(),
            v.label(),
            si(summary(&x.udp).median, "pps"),
            ratio_text(&ratios(&x.udp, &a.udp)),
            ratio_text(&ratios(&x.udp, &e.udp)),
            si(summary(&x.cps).median, "conn/s"),
            ratio_text(&ratios(&x.cps, &a.cps)),
            ratio_text(&ratios(&x.cps, &e.cps)),
        );
    }
    let _ = writeln!(
        o,
        "\nWhat each piece costs, from the rates: both CPUs are busy with the test (senders, \
         router, ISPs and sink), so a rate R means {cpus}/R of CPU time per packet (or \
         connection); a piece costs the difference between the variant with it and the one \
         without, round by round (median [range]).\n"
    );
    let _ = writeln!(
        o,
        "| piece | variants | per small UDP packet | per new connection |\n|---|---|---|---|"
    );
    for p in &PIECES {
        let (w, b) = (s(p.with), s(p.without));
        let _ = writeln!(
            o,
            "| {} | ({}) − ({}) | {} | {} |",
            p.what,
            p.with.letter(),
            p.without.letter(),
            cost_text(&cost(&w.udp, &b.udp, cpus as f64, 1e9), "ns"),
            cost_text(&cost(&w.cps, &b.cps, cpus as f64, 1e6), "µs"),
        );
    }
    o.push('\n');
    markdown_profiles(o, f);
}

fn markdown_profiles(o: &mut String, f: &Forwarding) {
    if f.profiles.is_empty() {
        let _ = writeln!(o, "(No kernel profile: `perf` was not found.)\n");
        return;
    }
    let _ = writeln!(
        o,
        "Where the kernel spends the time, per small UDP packet, by component (`perf record -a -g \
         -e cpu-clock`, {} kHz, during the UDP test of each variant, {} times interleaved, median; \
         only the bench's own threads, in whose system calls the whole path from the LAN host's \
         socket through the router and the ISP to the sink runs; a sample counts for the first \
         component found on its call stack, in the order of the table). Nanoseconds per packet:\n",
        super::profile::FREQ / 1000,
        super::profile::REPEATS
    );
    let cols: Vec<(Variant, &Profile)> = f.profiles.iter().map(|(v, p)| (*v, p)).collect();
    let head: Vec<String> = cols
        .iter()
        .map(|(v, _)| format!("({})", v.letter()))
        .collect();
    let _ = writeln!(
        o,
        "| component | {} | (d) − (a) |\n|---|{}---|",
        head.join(" | "),
        "---|".repeat(cols.len())
    );
    let (a, d) = (profile_of(f, Variant::Plain), profile_of(f, Variant::Mwan));
    for (i, c) in COMPONENTS.iter().enumerate() {
        let cells: Vec<String> = cols
            .iter()
            .map(|(_, p)| format!("{:.0}", p.ns[i]))
            .collect();
        let diff = match (a, d) {
            (Some(a), Some(d)) => format!("{:+.0}", d.ns[i] - a.ns[i]),
            _ => "n/a".into(),
        };
        let _ = writeln!(o, "| {} | {} | {diff} |", c.name, cells.join(" | "));
    }
    let totals: Vec<String> = cols
        .iter()
        .map(|(_, p)| format!("**{:.0}**", p.total_ns))
        .collect();
    let diff = match (a, d) {
        (Some(a), Some(d)) => format!("**{:+.0}**", d.total_ns - a.total_ns),
        _ => "n/a".into(),
    };
    let _ = writeln!(o, "| all | {} | {diff} |\n", totals.join(" | "));
    let foreign: u64 = cols.iter().map(|(_, p)| p.foreign_samples).sum();
    let ours: u64 = cols.iter().map(|(_, p)| p.samples).sum();
    let _ = writeln!(
        o,
        "Other processes took {:.0} % of the busy samples meanwhile (other load on the machine; \
         their samples are left out).\n",
        foreign as f64 * 100.0 / (foreign + ours).max(1) as f64
    );
}

/// One line per piece for the terminal.
pub fn table(o: &mut String, f: &Forwarding, cpus: usize) {
    let s = |v: Variant| &f.samples[v.index()];
    let _ = writeln!(
        o,
        "\nWhat mwan's pieces cost (from the rates of section 1c):"
    );
    for p in &PIECES {
        let (w, b) = (s(p.with), s(p.without));
        let _ = writeln!(
            o,
            "  ({}) − ({}): {} per UDP packet, {} per connection: {}",
            p.with.letter(),
            p.without.letter(),
            cost_text(&cost(&w.udp, &b.udp, cpus as f64, 1e9), "ns"),
            cost_text(&cost(&w.cps, &b.cps, cpus as f64, 1e6), "µs"),
            p.what
        );
    }
    for (v, p) in &f.profiles {
        let _ = writeln!(o, "  perf ({}): {}", v.letter(), p.brief());
    }
}

/// The IPv6 pieces, below section 1b's table.
pub fn markdown6(o: &mut String, f: &super::forwarding6::Forwarding6, cpus: usize) {
    use super::forwarding6::{Variant6, EVERY6};
    let s = |v: Variant6| &f.samples[v.index()];
    let (a, e) = (s(Variant6::Plain), s(Variant6::PlainRuled));
    let _ = writeln!(
        o,
        "mwan's pieces over IPv6, small UDP packets (made and compared as in section 1c: (a6) in a \
         router that never had an ip rule, the others in one that has); the cost per packet is \
         {cpus}/R of the variant minus that of (e6) (of (a6) for (e6) itself, (c6) and (d6)):\n"
    );
    let _ = writeln!(
        o,
        "| variant | small UDP packets | ratio to (a6) | ratio to (e6) | cost per packet |\n|---|---|---|---|---|"
    );
    for v in EVERY6 {
        let x = s(v);
        let base = if matches!(
            v,
            Variant6::PlainRuled | Variant6::NftCtMark | Variant6::Mwan
        ) {
            a
        } else {
            e
        };
        let cost = if v == Variant6::Plain {
            "—".to_string()
        } else {
            cost_text(&cost(&x.udp, &base.udp, cpus as f64, 1e9), "ns")
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {cost} |",
            v.label(),
            si(summary(&x.udp).median, "pps"),
            ratio_text(&ratios(&x.udp, &a.udp)),
            ratio_text(&ratios(&x.udp, &e.udp)),
        );
    }
    o.push('\n');
}
