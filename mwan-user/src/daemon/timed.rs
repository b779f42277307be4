//! What the daemon does at given times: at the next schedule boundary
//! (rules and weights by time of day), when a returning WAN's drain is due
//! (`failback = "drain"`), and every few seconds the flows past their
//! `max_backup_flow_age`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{error, info};

use super::desired::{next_schedule_change, Desired};
use super::drain::{self, DrainSpec, PinnedHosts};
use super::wan::WeightSource;
use super::Daemon;
use crate::clock::{self, LocalTime};
use crate::config::Sticky;
use crate::control::Event;
use crate::family::{Family, PerFamily};

/// The longest the daemon sleeps without a reason (the periodic tick
/// re-reads the clock anyway).
const IDLE: Duration = Duration::from_secs(3600);

/// What was seen of the schedules at the last computation: each rule's
/// activity, each WAN's weight source.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seen {
    rules: Vec<(String, bool)>,
    weights: Vec<(String, WeightSource)>,
}

impl Daemon {
    /// When the main loop must wake next: the next schedule boundary or the
    /// next drain due.
    pub(super) fn next_wake(&self) -> tokio::time::Instant {
        let now = Instant::now();
        let mut at = now + IDLE;
        if let Some(t) = self.next_boundary() {
            at = at.min(t);
        }
        if let Some(t) = self.outages.next_due() {
            at = at.min(t);
        }
        tokio::time::Instant::from_std(at)
    }

    /// The moment of the next schedule boundary after the last
    /// computation's local time, converted with the time zone's rules (a
    /// daylight saving change in between included).
    fn next_boundary(&self) -> Option<Instant> {
        let secs = next_schedule_change(&self.cfg, &self.clock)?;
        let (date, at) = self.clock.civil_after(secs);
        let mut target = clock::epoch_of(date, at);
        if target <= self.clock.epoch {
            // A time the clock shows twice (the autumn hour), already
            // passed once: it comes again after the wall clock's seconds.
            target = self.clock.epoch + i64::from(secs);
        }
        // A daylight saving change before it moves the wall clock: wake
        // then, and compute the boundary afresh.
        if let Some(change) = clock::offset_change(self.clock.epoch, target) {
            target = change;
        }
        // Fixed until the next computation (which moves the clock on): a
        // wake a moment early finds the old state and waits again.
        let target = UNIX_EPOCH + Duration::from_secs(target.max(0) as u64);
        let wait = target.duration_since(SystemTime::now()).unwrap_or_default();
        Some(Instant::now() + wait + Duration::from_millis(5))
    }

    /// A boundary or a drain is due: schedules are computed afresh, due
    /// drains run.
    pub(super) async fn on_wake(&mut self) {
        if let Err(e) = self.reconcile(false).await {
            error!(error = %format!("{e:#}"), "applying a schedule");
        }
        for due in self.outages.due(Instant::now()) {
            self.run_drain(due).await;
        }
    }

    /// The drain of one returning WAN's family.
    async fn run_drain(&mut self, due: super::failback::Due) {
        let Some(w) = self.wans.iter().find(|w| w.id == due.id) else {
            return;
        };
        let backups = self
            .wans
            .iter()
            .filter(|b| b.id != w.id && (b.cfg.tier > w.cfg.tier || b.cfg.quota.is_some()))
            .map(|b| b.id)
            .collect();
        let Some(policies) = self.applied.policies(due.family) else {
            return;
        };
        let spec = DrainSpec {
            id: w.id,
            name: w.cfg.name.clone(),
            family: due.family,
            window: due.window,
            backups,
            offered: drain::offered(policies),
        };
        info!(wan = %spec.name, family = %spec.family, backups = ?spec.backups, "failback: draining the flows that went to backup and metered WANs back");
        let pinned = self.pinned_hosts(due.family).await;
        let pin_dir = self.cfg.pin_dir.clone();
        drain::drain(&self.facts, pin_dir, spec, pinned, self.cfg.failback_spread);
    }

    /// The host pins that keep their flows where they are (`sticky =
    /// "host"` without `drain_pinned_hosts`).
    async fn pinned_hosts(&self, f: Family) -> Option<PinnedHosts> {
        if self.cfg.sticky != Sticky::Host || self.cfg.drain_pinned_hosts {
            return None;
        }
        let lans: Vec<u32> = self.host_view.lans.values().map(|l| l.ifindex).collect();
        let neighbours = self.net.neighbours(&lans).await.unwrap_or_default();
        let alive = self
            .wans
            .iter()
            .filter(|w| self.applied.alive(f, w.id))
            .fold(0u64, |m, w| m | (1 << w.id));
        Some(PinnedHosts {
            sticky_key: self.cfg.sticky_key,
            neighbours,
            alive,
            ttl_ns: self.cfg.host_ttl.as_nanos() as u64,
        })
    }

    /// Every few seconds: flows that stayed past `max_backup_flow_age` on a
    /// WAN their policy no longer offers are moved to one it does.
    pub(super) async fn expire_backup_flows(&mut self) {
        let max_age: BTreeMap<u8, u64> = self
            .wans
            .iter()
            .filter_map(|w| Some((w.id, w.cfg.max_backup_flow_age?.as_nanos() as u64)))
            .collect();
        if max_age.is_empty() {
            return;
        }
        let (Some(v4), Some(v6)) = (
            self.applied.policies(Family::Ipv4),
            self.applied.policies(Family::Ipv6),
        ) else {
            return;
        };
        let policies = PerFamily::new(|f| match f {
            Family::Ipv4 => v4.clone(),
            Family::Ipv6 => v6.clone(),
        });
        // Nothing to do while every policy offers every such WAN.
        let backup_somewhere = policies.values().any(|ps| {
            let off = drain::offered(ps);
            max_age
                .keys()
                .any(|id| off.iter().any(|m| *m != 0 && m & (1 << id) == 0))
        });
        if !backup_somewhere {
            return;
        }
        let names = self
            .wans
            .iter()
            .map(|w| (w.id, w.cfg.name.clone()))
            .collect();
        let pinned = self.pinned_hosts(Family::Ipv4).await;
        let pin_dir = self.cfg.pin_dir.clone();
        drain::expire(
            &self.facts,
            pin_dir,
            max_age,
            policies,
            names,
            pinned,
            self.cfg.failback_spread,
        );
    }

    /// Records the schedules' changes since the last computation (log and
    /// events): a rule turned on or off, a WAN's weight from another
    /// source.
    pub(super) fn note_schedules(&mut self, d: &Desired) {
        let week = self.clock.week_secs();
        let seen = Seen {
            rules: self
                .cfg
                .rules
                .iter()
                .zip(&d.rules.active)
                .map(|(r, a)| (r.name.clone(), *a))
                .collect(),
            weights: self
                .wans
                .iter()
                .map(|w| (w.cfg.name.clone(), w.weight_at(week).1))
                .collect(),
        };
        let first = self.seen.rules.is_empty() && self.seen.weights.is_empty();
        let mut events = Vec::new();
        for (name, active) in &seen.rules {
            let before = self
                .seen
                .rules
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, a)| *a);
            if !first && before.is_some_and(|b| b != *active) {
                let (from, to) = if *active {
                    ("off", "on")
                } else {
                    ("on", "off")
                };
                events.push((
                    name.clone(),
                    from,
                    to,
                    format!("rule {name}: its schedule turned it {to} (new connections only)"),
                ));
            }
        }
        for (name, src) in &seen.weights {
            let before = self
                .seen
                .weights
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s);
            if !first && before.is_some_and(|b| b != src) {
                let to = match src {
                    WeightSource::Schedule(s) => format!("weight schedule `{s}`"),
                    WeightSource::Config => "its configured weight".into(),
                    WeightSource::Override => "mwan set-weight".into(),
                };
                let w = self
                    .wans
                    .iter()
                    .find(|w| &w.cfg.name == name)
                    .map(|w| w.weight_at(week).0);
                events.push((
                    name.clone(),
                    "weight",
                    "weight",
                    format!(
                        "wan {name}: weight {} from {to} (new connections only)",
                        w.unwrap_or_default()
                    ),
                ));
            }
        }
        for (name, from, to, reason) in events {
            info!("{reason}");
            self.push_event(Event {
                time: super::status::rfc3339(SystemTime::now()),
                kind: "schedule".into(),
                wan: name,
                family: "all".into(),
                from: from.into(),
                to: to.into(),
                reason,
            });
        }
        self.seen = seen;
    }

    /// The local time as `mwan status` shows it, and the next boundary.
    pub(super) fn clock_status(&self) -> crate::control::ClockStatus {
        let now = LocalTime::now();
        crate::control::ClockStatus {
            local_time: now.to_string(),
            next_schedule_change: next_schedule_change(&self.cfg, &now).map(|secs| {
                let (date, at) = now.civil_after(secs);
                LocalTime::at(clock::epoch_of(date, at)).to_string()
            }),
        }
    }

    /// The rules and their schedules, for `mwan status`.
    pub(super) fn rule_status(&self) -> Vec<crate::control::RuleStatus> {
        let now = LocalTime::now();
        let week = now.week_secs();
        self.cfg
            .rules
            .iter()
            .map(|r| crate::control::RuleStatus {
                name: r.name.clone(),
                schedule: r.schedule.as_ref().map(|s| s.to_string()),
                active: self.applied.rule_active(&r.name, &self.cfg).unwrap_or(true),
                next_change: r
                    .schedule
                    .as_ref()
                    .and_then(|s| s.next_change(week))
                    .map(|secs| {
                        let (date, at) = now.civil_after(secs);
                        LocalTime::at(clock::epoch_of(date, at)).to_string()
                    }),
            })
            .collect()
    }
}
