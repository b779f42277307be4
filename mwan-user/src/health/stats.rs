//! Running totals of one WAN's health for the metrics endpoint: probing
//! rounds, each target's probes sent and answered and its last RTT, state
//! changes and failovers. Pure bookkeeping, fed with the same reports and
//! transitions as the [`Machine`](super::Machine); a few dozen bytes per
//! target, whatever the uptime.

use std::collections::VecDeque;
use std::time::Duration;

use super::machine::{State, Transition};
use super::probe::RoundReport;
use crate::config::{Family, ProbeTarget};

/// Rounds whose pending probes are remembered until their update report
/// (rounds overlap by at most `timeout / interval`; more is plenty).
const PENDING_ROUNDS: usize = 32;

/// A round decided with probes in flight: its seq and family, and the
/// indexes of those probes in the round and in `HealthStats::targets`.
type Pending = (u64, Family, Vec<(usize, usize)>);

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TargetStats {
    /// As written in the config (`198.51.100.1`, `tcp:…`, `dns:…`).
    pub target: String,
    pub sent: u64,
    pub answered: u64,
    /// RTT of its latest answered probe.
    pub last_rtt: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct HealthStats {
    /// Rounds of both families' probers.
    pub rounds: u64,
    pub rounds_failed: u64,
    /// Whether the latest round succeeded (none yet: `None`).
    pub last_round_ok: Option<bool>,
    pub state_changes: u64,
    /// Times the WAN stopped carrying traffic while it was carrying some:
    /// `up` or `degraded` to `down` or `disabled` (its flows moved).
    pub failovers: u64,
    /// Bursts of probes asked for by passive health, those that failed,
    /// and the times they took the WAN down.
    pub passive_bursts: u64,
    pub passive_bursts_failed: u64,
    pub passive_downs: u64,
    pub targets: Vec<TargetStats>,
    /// Rounds decided with probes still in flight: (seq, family, their
    /// indexes in the round and in `targets`).
    pending: VecDeque<Pending>,
}

impl HealthStats {
    pub fn new(targets: &[ProbeTarget]) -> HealthStats {
        let mut s = HealthStats::default();
        s.set_targets(targets);
        s
    }

    /// The probe targets changed (reload): targets that stay keep their
    /// totals.
    pub fn set_targets(&mut self, targets: &[ProbeTarget]) {
        let old = std::mem::take(&mut self.targets);
        self.targets = targets
            .iter()
            .map(|t| {
                let name = t.to_string();
                old.iter()
                    .find(|o| o.target == name)
                    .cloned()
                    .unwrap_or(TargetStats {
                        target: name,
                        ..TargetStats::default()
                    })
            })
            .collect();
        self.pending.clear();
    }

    /// Accounts for a round of one family's prober: its results name their
    /// targets, which are found in the WAN's whole list.
    pub fn on_round(&mut self, r: &RoundReport) {
        if r.update {
            // Count the answers of the probes that were still in flight.
            let Some(p) = self
                .pending
                .iter()
                .position(|(seq, family, _)| *seq == r.seq && *family == r.family)
            else {
                return;
            };
            let (_, _, idx) = self.pending.remove(p).expect("found");
            for (i, t) in idx {
                if let (Some(res), Some(t)) = (r.results.get(i), self.targets.get_mut(t)) {
                    if let Some(rtt) = res.rtt {
                        t.answered += 1;
                        t.last_rtt = Some(rtt);
                    }
                }
            }
            return;
        }
        if r.burst.is_some() {
            self.passive_bursts_failed += u64::from(!r.success);
        } else {
            self.rounds += 1;
            self.rounds_failed += u64::from(!r.success);
            self.last_round_ok = Some(r.success);
        }
        let mut in_flight = Vec::new();
        for (i, res) in r.results.iter().enumerate() {
            let name = res.target.to_string();
            let Some(ti) = self.targets.iter().position(|t| t.target == name) else {
                continue;
            };
            let t = &mut self.targets[ti];
            t.sent += 1;
            match (res.rtt, &res.error) {
                (Some(rtt), _) => {
                    t.answered += 1;
                    t.last_rtt = Some(rtt);
                }
                (None, None) => in_flight.push((i, ti)),
                (None, Some(_)) => {}
            }
        }
        if !in_flight.is_empty() && r.burst.is_none() {
            self.pending.push_back((r.seq, r.family, in_flight));
            while self.pending.len() > PENDING_ROUNDS {
                self.pending.pop_front();
            }
        }
    }

    pub fn on_transition(&mut self, t: &Transition) {
        self.state_changes += 1;
        let carried = matches!(t.from, State::Up | State::Degraded);
        let stopped = matches!(t.to, State::Down | State::Disabled);
        self.failovers += u64::from(carried && stopped);
        self.passive_downs += u64::from(t.to == State::Down && t.reason.starts_with("passive:"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{Measurements, TargetResult};
    use std::time::Instant;

    fn targets() -> Vec<ProbeTarget> {
        vec![
            "198.51.100.1".parse().unwrap(),
            "dns:198.51.100.53".parse().unwrap(),
        ]
    }

    fn report(seq: u64, update: bool, res: [(Option<u64>, bool); 2]) -> RoundReport {
        RoundReport {
            wan: 0,
            family: crate::config::Family::Ipv4,
            seq,
            sent_at: Instant::now(),
            success: res.iter().any(|(r, _)| r.is_some()),
            update,
            burst: None,
            results: targets()
                .into_iter()
                .zip(res)
                .map(|(target, (rtt, lost))| TargetResult {
                    target,
                    rtt: rtt.map(Duration::from_millis),
                    error: lost.then(|| "no answer in time".to_string()),
                })
                .collect(),
        }
    }

    #[test]
    fn probes_are_counted_once_including_late_answers() {
        let mut s = HealthStats::new(&targets());
        s.on_round(&report(0, false, [(Some(10), false), (None, true)]));
        // Round 1 decided while target 2 was in flight; it answers later.
        s.on_round(&report(1, false, [(Some(12), false), (None, false)]));
        s.on_round(&report(1, true, [(Some(12), false), (Some(30), false)]));
        // An update for a round nobody waits for counts nothing.
        s.on_round(&report(1, true, [(Some(12), false), (Some(30), false)]));
        s.on_round(&report(2, false, [(None, true), (None, true)]));
        assert_eq!(s.rounds, 3);
        assert_eq!(s.rounds_failed, 1);
        assert_eq!(s.last_round_ok, Some(false));
        let t = &s.targets;
        assert_eq!(
            (t[0].target.as_str(), t[0].sent, t[0].answered),
            ("198.51.100.1", 3, 2)
        );
        assert_eq!(
            (t[1].target.as_str(), t[1].sent, t[1].answered),
            ("dns:198.51.100.53", 3, 1)
        );
        assert_eq!(t[1].last_rtt, Some(Duration::from_millis(30)));
    }

    #[test]
    fn failovers_are_losses_of_a_carrying_wan() {
        let mut s = HealthStats::new(&targets());
        let go = |s: &mut HealthStats, from, to| {
            s.on_transition(&Transition {
                from,
                to,
                reason: String::new(),
                measurements: Measurements::default(),
                at: Instant::now(),
            })
        };
        go(&mut s, State::Unknown, State::Down);
        go(&mut s, State::Down, State::Up);
        go(&mut s, State::Up, State::Degraded);
        go(&mut s, State::Degraded, State::Down);
        go(&mut s, State::Down, State::Up);
        go(&mut s, State::Up, State::Disabled);
        assert_eq!((s.state_changes, s.failovers), (6, 2));
    }

    #[test]
    fn reloaded_targets_keep_their_totals() {
        let mut s = HealthStats::new(&targets());
        s.on_round(&report(0, false, [(Some(10), false), (Some(11), false)]));
        s.set_targets(&[
            "dns:198.51.100.53".parse().unwrap(),
            "198.51.100.9".parse().unwrap(),
        ]);
        assert_eq!(s.targets[0].sent, 1);
        assert_eq!(
            (s.targets[1].target.as_str(), s.targets[1].sent),
            ("198.51.100.9", 0)
        );
    }
}
