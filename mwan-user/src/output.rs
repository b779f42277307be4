//! Terminal output of the CLI: aligned tables and human units. Pure.

use crate::control::{FlowRecord, HostRecord, Status};

/// Formats rows as left-aligned columns separated by two spaces (numbers are
/// right-aligned). The first row is the header.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let numeric = |c: usize| {
        rows.iter().skip(1).filter_map(|r| r.get(c)).all(|s| {
            let t = s.trim_end_matches(['%', 's', 'B', 'k', 'M', 'G', 'T', 'm']);
            !s.is_empty() && (s == "-" || t.parse::<f64>().is_ok())
        }) && rows.len() > 1
    };
    let right: Vec<bool> = (0..cols).map(numeric).collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let pad = width[c].saturating_sub(cell.chars().count());
            if c > 0 {
                line.push_str("  ");
            }
            if right[c] {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if c + 1 < r.len() {
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// 1536 → "1.5k", binary-free decimal units as `ip -h` prints them.
pub fn human(n: u64) -> String {
    const UNITS: [(&str, f64); 4] = [("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)];
    for (u, f) in UNITS {
        if n as f64 >= f {
            return format!("{:.1}{u}", n as f64 / f);
        }
    }
    n.to_string()
}

pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else if s < 86400.0 {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    } else {
        format!(
            "{}d{:02}h",
            (s / 86400.0) as u64,
            ((s % 86400.0) / 3600.0) as u64
        )
    }
}

/// Passive health's column: handshakes answered / SYNs sent in the last
/// 2 s, or `off`.
fn handshakes(p: &crate::control::PassiveStatus) -> String {
    if p.enabled {
        format!("{}/{}", p.handshakes, p.syns)
    } else {
        "off".into()
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into())
}

pub fn status(s: &Status) -> String {
    let mut rows = vec![[
        "WAN", "STATE", "SINCE", "TIER", "WEIGHT", "SHARE", "RTT(ms)", "JITTER", "LOSS", "HS/2s",
        "FLOWS", "NEW", "LAN-OUT", "RX", "TX", "ADDRESS", "GATEWAY",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for w in &s.wans {
        let mut state = w.state.clone();
        if w.drained {
            state.push_str(",drained");
        }
        rows.push(vec![
            format!("{} ({})", w.name, w.interface),
            state,
            duration(w.since_secs),
            w.tier.to_string(),
            w.weight.to_string(),
            format!("{:.0}%", w.share * 100.0),
            opt_ms(w.rtt_ms),
            opt_ms(w.jitter_ms),
            format!("{:.1}%", w.loss_pct),
            handshakes(&w.passive),
            w.flows.to_string(),
            human(w.new_flows),
            format!("{}B", human(w.lan_bytes)),
            format!("{}B", human(w.rx_bytes)),
            format!("{}B", human(w.tx_bytes)),
            w.address.clone().unwrap_or_else(|| "-".into()),
            w.gateway.clone().unwrap_or_else(|| "-".into()),
        ]);
        if let Some(v6) = &w.ipv6 {
            // The WAN's IPv6 side: its own health, share and addresses.
            let mut state = v6.state.clone();
            if v6.judged_by != "ipv6" {
                state.push_str(" (as ipv4)");
            }
            let blank = String::new;
            rows.push(vec![
                "  └ IPv6".to_string(),
                state,
                duration(v6.since_secs),
                blank(),
                blank(),
                format!("{:.0}%", v6.share * 100.0),
                opt_ms(v6.rtt_ms),
                opt_ms(v6.jitter_ms),
                format!("{:.1}%", v6.loss_pct),
                handshakes(&v6.passive),
                blank(),
                blank(),
                blank(),
                blank(),
                blank(),
                v6.address.clone().unwrap_or_else(|| "-".into()),
                v6.gateway.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
    }
    let mut out = table(&rows);
    out.push_str(&usage_lines(s));
    out.push_str(&schedule_lines(s));
    if let Some(role) = &s.ha_role {
        out.push_str(&format!("\nHA role: {role}\n"));
    }
    if s.all_down {
        out.push_str("\n!! ALL WANs ARE DOWN: the all_down policy applies\n");
    }
    if s.all_down6 {
        out.push_str("\n!! ALL WANs ARE DOWN FOR IPv6: the all_down policy applies to IPv6\n");
    }
    out.push_str(&format!(
        "\nflows pinned: {} of {}   uptime: {}   sticky: {}   datapath: {} LAN packets balanced, {} new flows, {} re-pinned\n",
        s.flows_total,
        s.flow_capacity,
        duration(s.uptime_secs),
        s.sticky,
        human(s.wans.iter().map(|w| w.lan_packets).sum()),
        human(*s.counters.get("new_flows").unwrap_or(&0)),
        human(*s.counters.get("repins").unwrap_or(&0)),
    ));
    if !s.events.is_empty() {
        out.push_str("\nrecent events:\n");
        for e in s.events.iter().rev().take(10) {
            let wan = match (e.kind.as_str(), e.family.as_str()) {
                ("state", "ipv4") => e.wan.clone(),
                ("state", f) => format!("{} {f}", e.wan),
                (kind, _) => format!("{} {kind}", e.wan),
            };
            out.push_str(&format!(
                "  {}  {:<10} {} -> {}  ({})\n",
                e.time, wan, e.from, e.to, e.reason
            ));
        }
    }
    out
}

/// Each WAN's usage this billing cycle, its allowance and what mwan does
/// about it; a drain waiting for a returning WAN.
fn usage_lines(s: &Status) -> String {
    let mut out = String::new();
    for w in &s.wans {
        if let Some(u) = &w.usage {
            let of = match (u.quota_bytes, u.used_pct) {
                (Some(q), Some(p)) => format!(" of {} ({p:.1}%)", crate::usage::show_size(q)),
                _ => String::new(),
            };
            out.push_str(&format!(
                "{}: {}{of} this cycle (rx {}, tx {}), resets {}: {}\n",
                w.name,
                crate::usage::show_size(u.bytes),
                crate::usage::show_size(u.rx_bytes),
                crate::usage::show_size(u.tx_bytes),
                u.next_reset,
                u.effect
            ));
        }
        if let Some(due) = w.failback_due_secs {
            out.push_str(&format!(
                "{}: back; its flows on backup and metered WANs are drained back in {}\n",
                w.name,
                duration(due)
            ));
        }
    }
    if out.is_empty() {
        out
    } else {
        format!("\n{out}")
    }
}

/// The rules and weights that follow a schedule, and whether they are on.
fn schedule_lines(s: &Status) -> String {
    let mut out = String::new();
    for r in s.rules.iter().filter(|r| r.schedule.is_some()) {
        out.push_str(&format!(
            "rule {}: {} ({}){}\n",
            r.name,
            if r.active { "on" } else { "off" },
            r.schedule.as_deref().unwrap_or_default(),
            r.next_change
                .as_ref()
                .map(|t| format!(", changes at {t}"))
                .unwrap_or_default()
        ));
    }
    for w in s.wans.iter().filter(|w| w.weight_source == "schedule") {
        out.push_str(&format!(
            "{}: weight {} by its schedule ({})\n",
            w.name,
            w.weight,
            w.weight_schedule.as_deref().unwrap_or_default()
        ));
    }
    if out.is_empty() {
        return out;
    }
    format!("\nlocal time {}\n{out}", s.clock.local_time)
}

pub fn flows(flows: &[FlowRecord]) -> String {
    let mut rows = vec![[
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "WAN",
        "AGE",
        "IDLE",
        "PACKETS",
        "BYTES",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for f in flows {
        let wan = match &f.moved_from {
            Some(m) => format!("{} (from {m})", f.wan),
            None => f.wan.clone(),
        };
        let ep = |a: &str, p: u16| {
            if p == 0 {
                a.to_string()
            } else {
                format!("{a}:{p}")
            }
        };
        rows.push(vec![
            f.proto.clone(),
            ep(&f.src, f.sport),
            ep(&f.dst, f.dport),
            wan,
            duration(f.age_secs),
            duration(f.idle_secs),
            human(f.packets),
            format!("{}B", human(f.bytes)),
        ]);
    }
    table(&rows)
}

pub fn hosts(hosts: &[HostRecord]) -> String {
    let mut rows = vec![["HOST", "WAN", "IDLE", "EXPIRES IN"]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()];
    for h in hosts {
        rows.push(vec![
            h.host.clone(),
            h.wan.clone(),
            duration(h.idle_secs),
            if h.expires_in_secs > 0.0 {
                duration(h.expires_in_secs)
            } else {
                "expired".into()
            },
        ]);
    }
    table(&rows)
}

/// `mwan domains`: one row per learned address and rule.
pub fn domains(entries: &[crate::dns::relay::LearnedEntry]) -> String {
    let mut rows = vec![["NAME", "ADDRESS", "RULE", "EXPIRES IN"]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()];
    for e in entries {
        for r in &e.rules {
            rows.push(vec![
                e.name.clone(),
                e.address.to_string(),
                r.rule.clone(),
                duration(r.expires_in_secs),
            ]);
        }
    }
    table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A metered WAN's line: its usage, allowance, reset and effect; a
    /// scheduled rule's state.
    #[test]
    fn status_shows_usage_and_schedules() {
        let mut s = crate::web::tests::snapshot().status;
        s.rules = vec![crate::control::RuleStatus {
            name: "night".into(),
            schedule: Some("22:00-06:00".into()),
            active: false,
            next_change: Some("2026-03-02T22:00:00+01:00".into()),
        }];
        s.clock.local_time = "2026-03-02T12:00:00+01:00".into();
        let text = status(&s);
        assert!(
            text.contains("isp2: 4.2 MB of 4 MB (105.0%) this cycle (rx 4 MB, tx 200 kB), resets 2026-04-01T00:00:00+02:00: used up: no new flows while another WAN is up; its connections stay\n"),
            "{text}"
        );
        assert!(
            text.contains("rule night: off (22:00-06:00), changes at 2026-03-02T22:00:00+01:00\n"),
            "{text}"
        );
        assert!(
            text.contains("local time 2026-03-02T12:00:00+01:00"),
            "{text}"
        );
    }

    #[test]
    fn tables_align_and_right_align_numbers() {
        let t = table(&[
            vec!["NAME".into(), "N".into(), "NOTE".into()],
            vec!["isp1".into(), "5".into(), "x".into()],
            vec!["backup".into(), "1234".into(), "yy".into()],
        ]);
        assert_eq!(t, "NAME       N  NOTE\nisp1       5  x\nbackup  1234  yy\n");
    }

    #[test]
    fn human_units() {
        assert_eq!(human(999), "999");
        assert_eq!(human(1536), "1.5k");
        assert_eq!(human(2_500_000_000), "2.5G");
        assert_eq!(duration(5.25), "5.2s");
        assert_eq!(duration(125.0), "2m05s");
        assert_eq!(duration(7300.0), "2h01m");
        assert_eq!(duration(90000.0), "1d01h");
    }

    /// `mwan domains` lists IPv6 (AAAA-learned) addresses like IPv4 ones,
    /// in the table and in `--json`.
    #[test]
    fn domains_lists_ipv6_addresses() {
        use crate::dns::relay::{LearnedEntry, LearnedRule};
        let entries: Vec<LearnedEntry> = ["203.0.113.5", "2001:db8::5"]
            .iter()
            .map(|a| LearnedEntry {
                address: a.parse().unwrap(),
                name: "www.gov.example".into(),
                rules: vec![LearnedRule {
                    rule: "gov".into(),
                    expires_in_secs: 300.0,
                }],
            })
            .collect();
        let text = domains(&entries);
        assert!(
            text.contains("203.0.113.5") && text.contains("2001:db8::5"),
            "{text}"
        );
        let json = serde_json::to_string(&entries).unwrap();
        assert!(json.contains("\"address\":\"2001:db8::5\""), "{json}");
        let back: Vec<LearnedEntry> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, entries);
    }
}
