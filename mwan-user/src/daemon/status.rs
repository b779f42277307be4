//! `mwan status`: assembling the report, counting flows off the main loop,
//! interface counters, and systemd readiness notifications.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use mwan_common::WAN_NONE;
use tracing::warn;

use super::apply::Applied;
use super::wan::{WanRt, WeightSource};
use super::Daemon;
use crate::config::Config;
use crate::control::{
    FamilyStatus, PassiveStatus, RelayStatus, ReloadFacts, StartFacts, Status, WanStatus,
};
use crate::datapath;
use crate::family::Family;
use crate::policy;
use crate::web::{Snapshot, Web};

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Sends a notification to systemd (`Type=notify`) when started by it.
pub fn notify(msg: &str) {
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let res = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), &path)
    };
    if let Err(e) = res {
        warn!(error = %e, "notifying systemd");
    }
}

#[derive(Default)]
struct Counts {
    at: Option<Instant>,
    /// How long the last count took.
    took: Duration,
    by_wan: BTreeMap<u8, u64>,
    total: u64,
    running: bool,
}

/// Pinned flows per WAN, counted by a blocking task with batched map reads,
/// so neither status requests nor a million flows ever stall the daemon. A
/// large map is counted at most every few seconds and a status request
/// gets the last count; a small one (a count under [`QUICK`]) is counted
/// afresh for each request that finds it older than [`FRESH`], and the
/// request waits for it.
pub struct FlowCounts {
    pin_dir: PathBuf,
    inner: Arc<Mutex<Counts>>,
}

const STALE: Duration = Duration::from_secs(4);
/// A count this quick (some thousands of flows) is worth waiting for.
const QUICK: Duration = Duration::from_millis(5);
const FRESH: Duration = Duration::from_millis(250);

impl FlowCounts {
    pub fn new(pin_dir: PathBuf) -> FlowCounts {
        FlowCounts {
            pin_dir,
            inner: Arc::default(),
        }
    }

    /// Starts a count unless a recent one exists or one is running; returns
    /// its task.
    pub fn refresh_if_stale(&self) -> Option<tokio::task::JoinHandle<()>> {
        {
            let mut c = self.inner.lock().expect("not poisoned");
            let stale = if c.took < QUICK { FRESH } else { STALE };
            if c.running || c.at.is_some_and(|at| at.elapsed() < stale) {
                return None;
            }
            c.running = true;
        }
        let inner = self.inner.clone();
        let pin_dir = self.pin_dir.clone();
        Some(tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut by_wan = BTreeMap::new();
            let mut total = 0u64;
            let res = datapath::read_flows(&pin_dir, 8192, |_, v| {
                total += 1;
                if v.wan != WAN_NONE {
                    *by_wan.entry(v.wan).or_insert(0u64) += 1;
                }
                true
            });
            let mut c = inner.lock().expect("not poisoned");
            c.running = false;
            match res {
                Ok(()) => {
                    c.by_wan = by_wan;
                    c.total = total;
                    c.at = Some(Instant::now());
                    c.took = started.elapsed();
                }
                Err(e) => warn!(error = %e, "counting flows"),
            }
        }))
    }

    /// Whether a status request should wait for a count that is running:
    /// the first one (an answer should not say "0 flows"), and the quick
    /// ones.
    fn worth_waiting(&self) -> bool {
        let c = self.inner.lock().expect("not poisoned");
        c.at.is_none() || c.took < QUICK
    }

    fn get(&self) -> (BTreeMap<u8, u64>, u64, Option<f64>) {
        let c = self.inner.lock().expect("not poisoned");
        (
            c.by_wan.clone(),
            c.total,
            c.at.map(|a| a.elapsed().as_secs_f64()),
        )
    }
}

/// rx/tx counters of every interface in this network namespace, from
/// What the daemon reports beyond its inputs: counts, times, the metrics
/// listener.
pub struct Report {
    pub started: Instant,
    pub started_wall: SystemTime,
    pub flow_counts: FlowCounts,
    /// The metrics and status page listener (`metrics_listen`).
    pub web: Option<Web>,
    /// Something changed that the listener's snapshot should show now.
    pub dirty: bool,
    pub reloads: ReloadFacts,
    /// How this daemon started.
    pub start: StartFacts,
}

impl Report {
    pub fn new(cfg: &Config, web: Option<Web>, took_over: bool) -> Report {
        Report {
            started: Instant::now(),
            started_wall: SystemTime::now(),
            flow_counts: FlowCounts::new(cfg.pin_dir.clone()),
            web,
            dirty: true,
            reloads: ReloadFacts::default(),
            start: StartFacts {
                took_over,
                ..StartFacts::default()
            },
        }
    }
}

impl Daemon {
    pub(super) async fn status(&mut self) -> Result<Status> {
        let task = self.report.flow_counts.refresh_if_stale();
        if self.report.flow_counts.worth_waiting() {
            // A blocking task: the event loop waits for it only the first
            // time, or for a few milliseconds.
            if let Some(t) = task {
                let _ = t.await;
            }
        }
        self.build_status()
    }

    /// The status from what is at hand: the last flow count, the maps'
    /// counters. Never waits.
    fn build_status(&self) -> Result<Status> {
        let (by_wan, total, counted_ago) = self.report.flow_counts.get();
        let counters = self.dp.maps.wan_counters()?;
        let global = self.dp.maps.global_counters()?;
        let shares = |f| -> BTreeMap<u8, f64> {
            self.applied
                .default_policy(f)
                .map(policy::shares)
                .unwrap_or_default()
                .into_iter()
                .collect()
        };
        let (shares, shares6) = (shares(Family::Ipv4), shares(Family::Ipv6));
        let ifstats = crate::usage::net_dev();
        let now = SystemTime::now();
        let week = crate::clock::LocalTime::now().week_secs();
        let held = self.held_back(week);
        let wans = self
            .wans
            .iter()
            .map(|w| {
                let m = w.family(w.judged_by(Family::Ipv4)).machine.measurements();
                let c = counters.get(w.id as usize).copied().unwrap_or_default();
                let dev = ifstats.get(&w.cfg.interface).copied().unwrap_or_default();
                let since = w.family(w.judged_by(Family::Ipv4)).since;
                let mut st = WanStatus {
                    name: w.cfg.name.clone(),
                    id: w.id,
                    interface: w.cfg.interface.clone(),
                    state: w.state(Family::Ipv4).to_string(),
                    since: rfc3339(since),
                    since_secs: now.duration_since(since).unwrap_or_default().as_secs_f64(),
                    tier: w.cfg.tier,
                    share: shares.get(&w.id).copied().unwrap_or(0.0),
                    drained: w.drained,
                    enabled: !w.disabled(),
                    alive: self.applied.alive(Family::Ipv4, w.id),
                    ipv6: w
                        .has_ipv6()
                        .then(|| family_status(w, &self.applied, Family::Ipv6, &shares6, now)),
                    address: w.link.addrs[Family::Ipv4].first().map(|a| a.to_string()),
                    gateway: w.link.gateway_text(&w.cfg),
                    rtt_ms: m.rtt_ms,
                    jitter_ms: m.jitter_ms,
                    loss_pct: m.loss_pct,
                    flows: by_wan.get(&w.id).copied().unwrap_or(0),
                    new_flows: c.flows,
                    lan_packets: c.packets,
                    lan_bytes: c.bytes,
                    rx_bytes: dev.bytes.rx,
                    rx_packets: dev.rx_packets,
                    tx_bytes: dev.bytes.tx,
                    tx_packets: dev.tx_packets,
                    connections: self.facts.of(&w.cfg.name),
                    passive: passive_status(w, Family::Ipv4),
                    ..WanStatus::default()
                };
                self.metered_status(&mut st, w, week, &held);
                st
            })
            .collect();
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            config: self.opts.config.display().to_string(),
            uptime_secs: self.report.started.elapsed().as_secs_f64(),
            sticky: format!("{:?}", self.cfg.sticky).to_lowercase(),
            all_down: self.applied.all_down(Family::Ipv4),
            all_down6: self.applied.all_down(Family::Ipv6),
            ha_role: self
                .ha_active
                .map(|a| if a { "active" } else { "standby" }.to_string()),
            wans,
            flows_total: total,
            flows_counted_secs_ago: counted_ago,
            flow_capacity: self.dp.flow_capacity,
            counters: {
                let mut c: BTreeMap<String, u64> = mwan_common::COUNTERS
                    .iter()
                    .zip(global)
                    .map(|(c, v)| (c.name.to_string(), v))
                    .collect();
                // The LRU map evicts silently: pins made that the map no
                // longer holds (as of the flow count's time).
                let made = c.get("new_flows").copied().unwrap_or(0)
                    + c.get("pins_from_conntrack").copied().unwrap_or(0);
                c.insert("evicted_pins".into(), made.saturating_sub(total));
                c
            },
            events: self.events.iter().cloned().collect(),
            start: self.report.start.clone(),
            reloads: self.report.reloads.clone(),
            lans: self.applied.lans(),
            relay: self.applied.relay().map(|r| RelayStatus {
                port: r.port,
                tcp_port: r.tcp_port,
            }),
            rules: self.rule_status(),
            clock: self.clock_status(),
        })
    }

    /// The WANs a used-up allowance keeps from new flows now.
    fn held_back(&self, week: u32) -> std::collections::BTreeSet<u8> {
        let allowances = self.meter.allowances(&self.wans);
        let views: Vec<policy::WanView> = self
            .wans
            .iter()
            .map(|w| {
                let a = allowances.get(&w.id).copied().unwrap_or_default();
                w.view(Family::Ipv4, week, a)
            })
            .collect();
        policy::held_back(&views)
    }

    /// A WAN's weight and where it is from, its usage and allowance, and
    /// its failback.
    fn metered_status(
        &self,
        st: &mut WanStatus,
        w: &WanRt,
        week: u32,
        held: &std::collections::BTreeSet<u8>,
    ) {
        let (weight, source) = w.weight_at(week);
        st.weight = weight;
        st.weight_source = match &source {
            WeightSource::Config => "config",
            WeightSource::Schedule(_) => "schedule",
            WeightSource::Override => "set-weight",
        }
        .to_string();
        st.weight_schedule = match source {
            WeightSource::Schedule(s) => Some(s),
            _ => None,
        };
        st.usage = self.usage_status(w, held.contains(&w.id));
        st.failback = format!("{:?}", w.cfg.failback).to_lowercase();
        st.failback_due_secs = self
            .outages
            .pending(w.id)
            .map(|t| t.saturating_duration_since(Instant::now()).as_secs_f64());
    }

    /// Hands the listener a fresh snapshot (and, once a second, a history
    /// sample). The flow count it shows is the background one, started here
    /// when stale and never waited for.
    pub(super) fn publish(&mut self, sample: bool) {
        self.report.dirty = false;
        if self.report.web.is_none() {
            return;
        }
        let _ = self.report.flow_counts.refresh_if_stale();
        let status = match self.build_status() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "reading the datapath for the metrics");
                return;
            }
        };
        let (hook_runs, hook_failures) = crate::hooks::counts();
        let Some(web) = &self.report.web else {
            return;
        };
        web.publish(
            Snapshot {
                status,
                health: self.wans.iter().map(|w| w.stats.clone()).collect(),
                taken: SystemTime::now(),
                start_time: self.report.started_wall,
                reloads_ok: self.report.reloads.ok,
                reloads_failed: self.report.reloads.failed,
                hook_runs,
                hook_failures,
                max_flows: self.cfg.max_flows,
            },
            sample,
        );
    }
}

/// Family `f`'s side of a WAN for `mwan status`.
fn family_status(
    w: &WanRt,
    applied: &Applied,
    f: Family,
    shares: &BTreeMap<u8, f64>,
    now: SystemTime,
) -> FamilyStatus {
    let judge = w.judged_by(f);
    let h = w.family(judge);
    let m = h.machine.measurements();
    FamilyStatus {
        state: w.state(f).to_string(),
        since: rfc3339(h.since),
        since_secs: now
            .duration_since(h.since)
            .unwrap_or_default()
            .as_secs_f64(),
        judged_by: judge.to_string(),
        alive: applied.alive(f, w.id),
        share: shares.get(&w.id).copied().unwrap_or(0.0),
        address: (!w.link.addrs[f].is_empty()).then(|| {
            let a: Vec<String> = w.link.addrs[f].iter().map(|a| a.to_string()).collect();
            a.join(" ")
        }),
        gateway: w.link.nexthop[f].and_then(|n| n.gateway).map(|g| match g {
            // A link-local gateway is reached through the WAN's interface.
            std::net::IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => {
                format!("{g}%{}", w.cfg.interface)
            }
            _ => g.to_string(),
        }),
        rtt_ms: m.rtt_ms,
        jitter_ms: m.jitter_ms,
        loss_pct: m.loss_pct,
        passive: passive_status(w, f),
    }
}

/// Family `f`'s handshakes through a WAN.
fn passive_status(w: &WanRt, f: Family) -> PassiveStatus {
    let d = &w.family(f).passive;
    let m = d.measurements();
    PassiveStatus {
        enabled: w.cfg.health.passive.enabled,
        handshakes: m.handshakes,
        syns: m.syns,
        handshake_ms: m.handshake_ms,
        retransmit_pct: m.retransmit_pct,
        answer_timeout_ms: d.answer_timeout().as_secs_f64() * 1000.0,
        suspected: w.suspected(f),
    }
}
