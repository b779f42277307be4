//! `/metrics`: the snapshot in the Prometheus text exposition format
//! (version 0.0.4). Every family has `# HELP` and `# TYPE`, units are in
//! the names, and the series are bounded: per WAN, per probe target and
//! global, never per flow or per host. docs/METRICS.md lists them.

use std::fmt::Write;

use mwan_common::COUNTERS;

use super::Snapshot;
use crate::control::WanStatus;
use crate::health::stats::HealthStats;
use crate::web::history::unix_secs;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const STATES: [&str; 5] = ["unknown", "up", "degraded", "down", "disabled"];

/// Writes families: `# HELP`, `# TYPE`, then the samples.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        self.0.push(' ');
        push_value(&mut self.0, value);
        self.0.push('\n');
    }

    /// A family with one sample per WAN (labels `wan`, `interface`); WANs
    /// for which `value` is `None` have no sample.
    fn per_wan(
        &mut self,
        s: &Snapshot,
        name: &str,
        kind: &str,
        help: &str,
        value: impl Fn(usize) -> Option<f64>,
    ) {
        self.family(name, kind, help);
        for (i, w) in s.status.wans.iter().enumerate() {
            if let Some(v) = value(i) {
                self.sample(name, &[("wan", &w.name), ("interface", &w.interface)], v);
            }
        }
    }

    /// A gauge family with one sample per WAN (those `state` gives one
    /// for) and state: 1 for its current state, 0 for the others.
    fn state_family(
        &mut self,
        wans: &[WanStatus],
        name: &str,
        help: &str,
        state: impl Fn(&WanStatus) -> Option<&str>,
    ) {
        self.family(name, "gauge", help);
        for w in wans {
            let Some(current) = state(w) else { continue };
            for st in STATES {
                let labels = [
                    ("wan", w.name.as_str()),
                    ("interface", &w.interface),
                    ("state", st),
                ];
                self.sample(name, &labels, f64::from(u8::from(current == st)));
            }
        }
    }

    /// A family with one sample per probe target of every WAN.
    fn per_target(
        &mut self,
        s: &Snapshot,
        name: &str,
        kind: &str,
        help: &str,
        value: impl Fn(&crate::health::TargetStats) -> Option<f64>,
    ) {
        self.family(name, kind, help);
        for (w, h) in s.status.wans.iter().zip(&s.health) {
            for t in &h.targets {
                if let Some(v) = value(t) {
                    let labels = [
                        ("wan", w.name.as_str()),
                        ("interface", &w.interface),
                        ("target", &t.target),
                    ];
                    self.sample(name, &labels, v);
                }
            }
        }
    }
}

fn push_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn health(s: &Snapshot, i: usize) -> &HealthStats {
    &s.health[i]
}

/// The whole exposition.
pub fn render(s: &Snapshot) -> String {
    let mut o = Out(String::with_capacity(16 * 1024));
    let st = &s.status;
    let wans = &st.wans;

    o.family(
        "mwan_build_info",
        "gauge",
        "Always 1; the labels name the running mwan.",
    );
    o.sample("mwan_build_info", &[("version", &st.version)], 1.0);
    o.family(
        "mwan_start_time_seconds",
        "gauge",
        "When the daemon started, in seconds since the Unix epoch.",
    );
    o.sample(
        "mwan_start_time_seconds",
        &[],
        (unix_secs(s.start_time) * 1000.0).round() / 1000.0,
    );
    o.family(
        "mwan_config_reloads_total",
        "counter",
        "Config reloads (mwan reload, SIGHUP) by result; a failed reload keeps the running config.",
    );
    o.sample(
        "mwan_config_reloads_total",
        &[("result", "success")],
        s.reloads_ok as f64,
    );
    o.sample(
        "mwan_config_reloads_total",
        &[("result", "failure")],
        s.reloads_failed as f64,
    );
    o.family(
        "mwan_hook_runs_total",
        "counter",
        "on_change hook runs that ended.",
    );
    o.sample("mwan_hook_runs_total", &[], s.hook_runs as f64);
    o.family(
        "mwan_hook_failures_total",
        "counter",
        "on_change hook runs that failed: non-zero exit, killed at hook_timeout, or not started.",
    );
    o.sample("mwan_hook_failures_total", &[], s.hook_failures as f64);
    o.family(
        "mwan_all_down",
        "gauge",
        "1 while no WAN takes new flows (the all_down policy applies).",
    );
    o.sample("mwan_all_down", &[], f64::from(u8::from(st.all_down)));
    if let Some(role) = &st.ha_role {
        o.family(
            "mwan_ha_active",
            "gauge",
            "With ha_address: 1 while this router is the HA pair's active one (holds the gateway address), 0 on the standby.",
        );
        o.sample("mwan_ha_active", &[], f64::from(u8::from(role == "active")));
    }
    o.family(
        "mwan_flows",
        "gauge",
        "Flows pinned in the flow map (all WANs), from the daemon's background count.",
    );
    o.sample("mwan_flows", &[], st.flows_total as f64);
    o.family("mwan_flows_max", "gauge", "Capacity of the flow map (max_flows); when full, the least recently used pins are evicted.");
    o.sample("mwan_flows_max", &[], f64::from(st.flow_capacity));
    o.family(
        "mwan_datapath_evicted_pins",
        "gauge",
        "Pins made that the flow map no longer holds (new pins minus pinned flows, as of the background count): evicted by the LRU map or deleted by hand.",
    );
    o.sample(
        "mwan_datapath_evicted_pins",
        &[],
        st.counters.get("evicted_pins").copied().unwrap_or(0) as f64,
    );
    if let Some(age) = st.flows_counted_secs_ago {
        o.family(
            "mwan_flows_count_age_seconds",
            "gauge",
            "Age of the background flow count behind mwan_flows and mwan_wan_flows.",
        );
        o.sample(
            "mwan_flows_count_age_seconds",
            &[],
            (age * 1000.0).round() / 1000.0,
        );
    }
    // The datapath's global counters (`Status::counters` keys).
    for c in COUNTERS {
        o.family(c.metric, "counter", c.help);
        let value = st.counters.get(c.name).copied().unwrap_or(0);
        o.sample(c.metric, &[], value as f64);
    }

    o.state_family(
        wans,
        "mwan_wan_state",
        "1 for the WAN's current state, 0 for the others.",
        |w| Some(w.state.as_str()),
    );
    let flag = |b: bool| Some(f64::from(u8::from(b)));
    o.per_wan(
        s,
        "mwan_wan_up",
        "gauge",
        "1 when the WAN is up or degraded (usable), 0 otherwise.",
        |i| flag(wans[i].state == "up" || wans[i].state == "degraded"),
    );
    // The IPv6 side of the WANs that carry IPv6 (its own health).
    o.state_family(
        wans,
        "mwan_wan_ipv6_state",
        "1 for the current state of the WAN's IPv6, 0 for the others (WANs with IPv6 only).",
        |w| Some(w.ipv6.as_ref()?.state.as_str()),
    );
    o.per_wan(
        s,
        "mwan_wan_ipv6_up",
        "gauge",
        "1 when the WAN's IPv6 is up or degraded (takes new IPv6 flows), 0 otherwise.",
        |i| {
            let v6 = wans[i].ipv6.as_ref()?;
            flag(v6.state == "up" || v6.state == "degraded")
        },
    );
    o.per_wan(
        s,
        "mwan_wan_ipv6_share_ratio",
        "gauge",
        "Share of new IPv6 flows the default policy gives the WAN now (0 to 1).",
        |i| Some(wans[i].ipv6.as_ref()?.share),
    );
    o.per_wan(
        s,
        "mwan_wan_state_since_timestamp_seconds",
        "gauge",
        "When the WAN entered its current state, in seconds since the Unix epoch.",
        |i| Some(((unix_secs(s.taken) - wans[i].since_secs) * 1000.0).round() / 1000.0),
    );
    o.per_wan(
        s,
        "mwan_wan_weight",
        "gauge",
        "The WAN's weight (config or mwan set-weight).",
        |i| Some(f64::from(wans[i].weight)),
    );
    o.per_wan(
        s,
        "mwan_wan_tier",
        "gauge",
        "The WAN's tier (1 is primary).",
        |i| Some(f64::from(wans[i].tier)),
    );
    o.per_wan(
        s,
        "mwan_wan_share_ratio",
        "gauge",
        "Share of new flows the default policy gives the WAN now (0 to 1).",
        |i| Some(wans[i].share),
    );
    o.per_wan(
        s,
        "mwan_wan_drained",
        "gauge",
        "1 while the WAN is drained (mwan drain: no new flows).",
        |i| flag(wans[i].drained),
    );
    o.per_wan(
        s,
        "mwan_wan_rtt_seconds",
        "gauge",
        "Mean probe RTT over the health window (absent when no probe was answered).",
        |i| wans[i].rtt_ms.map(|r| r / 1000.0),
    );
    o.per_wan(
        s,
        "mwan_wan_jitter_seconds",
        "gauge",
        "Mean absolute difference of consecutive RTTs of each target over the health window.",
        |i| wans[i].jitter_ms.map(|r| r / 1000.0),
    );
    o.per_wan(
        s,
        "mwan_wan_loss_ratio",
        "gauge",
        "Lost probes over the health window (0 to 1).",
        |i| Some(wans[i].loss_pct / 100.0),
    );
    o.per_wan(
        s,
        "mwan_wan_probe_rounds_total",
        "counter",
        "Probing rounds decided.",
        |i| Some(health(s, i).rounds as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_probe_rounds_failed_total",
        "counter",
        "Probing rounds that failed (fewer than quorum targets answered).",
        |i| Some(health(s, i).rounds_failed as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_last_probe_round_success",
        "gauge",
        "1 if the latest probing round succeeded, 0 if it failed (absent before the first).",
        |i| health(s, i).last_round_ok.and_then(flag),
    );
    o.per_wan(
        s,
        "mwan_wan_state_changes_total",
        "counter",
        "State changes of the WAN since the daemon started.",
        |i| Some(health(s, i).state_changes as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_failovers_total",
        "counter",
        "Times the WAN went from up or degraded to down or disabled (its flows moved).",
        |i| Some(health(s, i).failovers as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_passive_handshakes",
        "gauge",
        "Passive health: IPv4 TCP handshakes from the LAN answered through the WAN in the last 2 s.",
        |i| Some(wans[i].passive.handshakes as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_passive_syns",
        "gauge",
        "Passive health: IPv4 TCP connections opened from the LAN through the WAN (SYNs) in the last 2 s.",
        |i| Some(wans[i].passive.syns as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_passive_handshake_seconds",
        "gauge",
        "Passive health: mean time of those handshakes (absent below 20 handshakes).",
        |i| wans[i].passive.handshake_ms.map(|m| m / 1000.0),
    );
    o.per_wan(
        s,
        "mwan_wan_passive_bursts_total",
        "counter",
        "Bursts of probes passive health asked for (unanswered handshakes to many destinations).",
        |i| Some(health(s, i).passive_bursts as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_passive_bursts_failed_total",
        "counter",
        "Those bursts that failed.",
        |i| Some(health(s, i).passive_bursts_failed as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_passive_downs_total",
        "counter",
        "Times the WAN went down on passive evidence (a failed burst).",
        |i| Some(health(s, i).passive_downs as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_flows",
        "gauge",
        "Flows pinned to the WAN in the flow map (background count).",
        |i| Some(wans[i].flows as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_new_flows_total",
        "counter",
        "Flows pinned to the WAN since the datapath was created (re-pins included).",
        |i| Some(wans[i].new_flows as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_lan_packets_total",
        "counter",
        "LAN packets the datapath sent to the WAN.",
        |i| Some(wans[i].lan_packets as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_lan_bytes_total",
        "counter",
        "LAN bytes the datapath sent to the WAN.",
        |i| Some(wans[i].lan_bytes as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_receive_bytes_total",
        "counter",
        "Bytes received on the WAN's interface (all traffic).",
        |i| Some(wans[i].rx_bytes as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_transmit_bytes_total",
        "counter",
        "Bytes sent on the WAN's interface (all traffic).",
        |i| Some(wans[i].tx_bytes as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_receive_packets_total",
        "counter",
        "Packets received on the WAN's interface.",
        |i| Some(wans[i].rx_packets as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_transmit_packets_total",
        "counter",
        "Packets sent on the WAN's interface.",
        |i| Some(wans[i].tx_packets as f64),
    );

    usage_families(&mut o, s);
    o.family(
        "mwan_rule_active",
        "gauge",
        "1 while the rule matches new flows, 0 while its schedule keeps it off.",
    );
    for r in &st.rules {
        o.sample(
            "mwan_rule_active",
            &[("rule", &r.name)],
            f64::from(u8::from(r.active)),
        );
    }

    o.per_target(
        s,
        "mwan_probe_sent_total",
        "counter",
        "Probes sent to the target through the WAN.",
        |t| Some(t.sent as f64),
    );
    o.per_target(
        s,
        "mwan_probe_answered_total",
        "counter",
        "Probes the target answered in time.",
        |t| Some(t.answered as f64),
    );
    o.per_target(
        s,
        "mwan_probe_rtt_seconds",
        "gauge",
        "RTT of the target's latest answered probe.",
        |t| t.last_rtt.map(|d| d.as_secs_f64()),
    );
    o.0
}

/// Each WAN's usage in its billing cycle and its allowance.
fn usage_families(o: &mut Out, s: &Snapshot) {
    let wans = &s.status.wans;
    let usage = |i: usize| wans[i].usage.as_ref();
    let name = "mwan_wan_cycle_bytes";
    o.family(
        name,
        "gauge",
        "Bytes on the WAN's link in the current billing cycle (the kernel's interface counters, everything the ISP meters), by direction and family; 0 again when a cycle starts.",
    );
    for w in wans {
        let Some(u) = &w.usage else { continue };
        for (family, b) in [("ipv4", &u.ipv4), ("ipv6", &u.ipv6)] {
            for (direction, v) in [("receive", b.rx_bytes), ("transmit", b.tx_bytes)] {
                let labels = [
                    ("wan", w.name.as_str()),
                    ("interface", &w.interface),
                    ("direction", direction),
                    ("family", family),
                ];
                o.sample(name, &labels, v as f64);
            }
        }
    }
    o.per_wan(
        s,
        "mwan_wan_cycle_start_timestamp_seconds",
        "gauge",
        "When the WAN's current billing cycle started, in seconds since the Unix epoch.",
        |i| usage(i).map(|u| u.cycle_start_epoch as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_cycle_reset_timestamp_seconds",
        "gauge",
        "When the WAN's billing cycle resets (quota_reset_day), in seconds since the Unix epoch.",
        |i| usage(i).map(|u| u.next_reset_epoch as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_quota_bytes",
        "gauge",
        "The WAN's allowance per billing cycle (quota; WANs with one only).",
        |i| usage(i)?.quota_bytes.map(|q| q as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_quota_used_ratio",
        "gauge",
        "Share of the allowance used this cycle (1 and more: used up).",
        |i| usage(i)?.used_pct.map(|p| p / 100.0),
    );
    o.per_wan(
        s,
        "mwan_wan_quota_reached_ratio",
        "gauge",
        "The highest quota_warn level reached this cycle (1: used up, 0: none yet).",
        |i| {
            let u = usage(i)?;
            u.quota_bytes?;
            Some(f64::from(u.reached_pct.iter().copied().max().unwrap_or(0)) / 100.0)
        },
    );
    quota_families(o, s);
}

/// Each metered WAN's allowance: used up, held back, its action; and the
/// drains of returning WANs.
fn quota_families(o: &mut Out, s: &Snapshot) {
    let wans = &s.status.wans;
    let usage = |i: usize| wans[i].usage.as_ref();
    let flag = |b: bool| Some(f64::from(u8::from(b)));
    o.per_wan(
        s,
        "mwan_wan_quota_exhausted",
        "gauge",
        "1 when the WAN's allowance is used up for this cycle.",
        |i| {
            usage(i)
                .filter(|u| u.quota_bytes.is_some())
                .and_then(|u| flag(u.exhausted))
        },
    );
    o.per_wan(
        s,
        "mwan_wan_quota_held_back",
        "gauge",
        "1 while the WAN's used-up allowance keeps it from new flows (quota_action).",
        |i| {
            usage(i)
                .filter(|u| u.quota_bytes.is_some())
                .and_then(|u| flag(u.held_back))
        },
    );
    let name = "mwan_wan_quota_action";
    o.family(
        name,
        "gauge",
        "Always 1; the label says what mwan does when the WAN's allowance is used up (backup, off or none).",
    );
    for w in wans {
        if let Some(action) = w.usage.as_ref().and_then(|u| u.action.as_deref()) {
            let labels = [
                ("wan", w.name.as_str()),
                ("interface", &w.interface),
                ("action", action),
            ];
            o.sample(name, &labels, 1.0);
        }
    }
    o.per_wan(
        s,
        "mwan_wan_failback_drains_total",
        "counter",
        "Times the flows that went to backup and metered WANs while the WAN was down were drained back to it (failback = \"drain\").",
        |i| Some(wans[i].connections.failback_drains as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_failback_drained_flows_total",
        "counter",
        "Flows drained back to the WAN when it returned (failback = \"drain\").",
        |i| Some(wans[i].connections.failback_drained_flows as f64),
    );
    o.per_wan(
        s,
        "mwan_wan_backup_age_resets_total",
        "counter",
        "Flows moved off the WAN after max_backup_flow_age on it while their policy offered a better one.",
        |i| Some(wans[i].connections.backup_age_resets as f64),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::tests::snapshot;

    #[test]
    fn every_family_has_help_and_type_and_samples_follow_their_family() {
        let text = render(&snapshot());
        let mut family = String::new();
        let mut families = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                family = rest.split(' ').next().unwrap().to_string();
                assert!(!families.contains(&family), "{family} twice");
                families.push(family.clone());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(name, family);
                assert!(kind == "gauge" || kind == "counter", "{line}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(name, family, "sample outside its family: {line}");
            }
        }
        assert!(families.len() > 40, "{families:?}");
        assert!(
            text.contains("mwan_wan_state{wan=\"isp1\",interface=\"wan1\",state=\"down\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("mwan_wan_state{wan=\"isp1\",interface=\"wan1\",state=\"up\"} 0\n"));
        assert!(text.contains("mwan_wan_loss_ratio{wan=\"isp1\",interface=\"wan1\"} 0.25\n"));
        assert!(text.contains("mwan_wan_rtt_seconds{wan=\"isp1\",interface=\"wan1\"} 0.0125\n"));
        assert!(text.contains("mwan_probe_answered_total{wan=\"isp1\",interface=\"wan1\",target=\"198.51.100.1\"} 2\n"));
        assert!(text.contains("mwan_datapath_repins_total 7\n"));
        // IPv6 health is its own: isp2's IPv6 is down while its IPv4 is up;
        // isp1 has no IPv6 and no IPv6 series.
        assert!(text.contains("mwan_wan_up{wan=\"isp2\",interface=\"wan2\"} 1\n"));
        assert!(text.contains("mwan_wan_ipv6_up{wan=\"isp2\",interface=\"wan2\"} 0\n"));
        assert!(text
            .contains("mwan_wan_ipv6_state{wan=\"isp2\",interface=\"wan2\",state=\"down\"} 1\n"));
        assert!(!text.contains("mwan_wan_ipv6_up{wan=\"isp1\""));
        // isp2 is metered, its allowance used up; isp1 has no usage at all
        // in the snapshot.
        for line in [
            "mwan_wan_cycle_bytes{wan=\"isp2\",interface=\"wan2\",direction=\"receive\",family=\"ipv4\"} 3900000\n",
            "mwan_wan_cycle_bytes{wan=\"isp2\",interface=\"wan2\",direction=\"transmit\",family=\"ipv6\"} 50000\n",
            "mwan_wan_quota_bytes{wan=\"isp2\",interface=\"wan2\"} 4000000\n",
            "mwan_wan_quota_used_ratio{wan=\"isp2\",interface=\"wan2\"} 1.05\n",
            "mwan_wan_quota_reached_ratio{wan=\"isp2\",interface=\"wan2\"} 1\n",
            "mwan_wan_quota_exhausted{wan=\"isp2\",interface=\"wan2\"} 1\n",
            "mwan_wan_quota_held_back{wan=\"isp2\",interface=\"wan2\"} 1\n",
            "mwan_wan_quota_action{wan=\"isp2\",interface=\"wan2\",action=\"backup\"} 1\n",
            "mwan_wan_cycle_reset_timestamp_seconds{wan=\"isp2\",interface=\"wan2\"} 1774994400\n",
        ] {
            assert!(text.contains(line), "{line}");
        }
        assert!(!text.contains("mwan_wan_quota_bytes{wan=\"isp1\""));
    }

    /// docs/METRICS.md names every family the exporter can emit (the
    /// datapath's counters among them) as `` `name` `` or `` `name{…}` ``.
    #[test]
    fn metrics_md_lists_every_family() {
        let doc = include_str!("../../../docs/METRICS.md");
        let listed =
            |name: &str| doc.contains(&format!("`{name}`")) || doc.contains(&format!("`{name}{{"));
        for c in COUNTERS {
            assert!(listed(c.metric), "docs/METRICS.md lacks {}", c.metric);
        }
        // With every optional family present.
        let mut s = snapshot();
        s.status.ha_role = Some("active".into());
        s.status.flows_counted_secs_ago = Some(1.0);
        let text = render(&s);
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert!(families.contains(&"mwan_ha_active"), "{families:?}");
        assert!(families.contains(&"mwan_flows_count_age_seconds"));
        let missing: Vec<&&str> = families.iter().filter(|f| !listed(f)).collect();
        assert!(missing.is_empty(), "docs/METRICS.md lacks {missing:?}");
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut s = String::new();
        for v in [1.0, 0.5, f64::NAN, f64::INFINITY, 1e20] {
            push_value(&mut s, v);
            s.push(' ');
        }
        assert_eq!(s, "1 0.5 NaN +Inf 100000000000000000000 ");
    }
}
