//! The health state machine of one WAN: pure logic, no I/O, time passed in.
//!
//! States and rules:
//!
//! * `unknown` (start) → `up` after the first good round (fast start, no
//!   hold-down), or → `down` after `down_after` consecutive failed rounds.
//! * `up` / `degraded` → `down` after `down_after` consecutive failed rounds.
//!   A single lost round never takes a WAN down unless `down_after` is 1.
//! * `down` → `up` after `up_after` consecutive good rounds, and not before
//!   `hold_down` has passed since the WAN went down. However fast a link
//!   flaps, a down transition is followed by the next up transition no
//!   sooner than `hold_down`.
//! * Link events: an unusable interface (carrier lost, address removed,
//!   interface gone) takes the WAN `down` at once, whatever the probes say.
//!   Good rounds do not count while the link is unusable; once it is usable
//!   again the normal `up_after` + `hold_down` rule applies.
//! * Quality: rolling loss (per probe, not per round), mean RTT and jitter
//!   (mean absolute difference of consecutive RTTs of the same target) over
//!   the last `window` rounds. An `up` WAN becomes `degraded` when loss is
//!   above `max_loss` or the mean RTT above `max_rtt`; this is judged only
//!   once the window holds [`MIN_JUDGED_ROUNDS`] rounds (or the whole window
//!   if smaller), so that a handful of samples cannot degrade a WAN. It
//!   returns to `up` only when both are below [`RECOVER_FRACTION`] (80%) of
//!   their thresholds: this hysteresis keeps a WAN hovering at a threshold
//!   from flapping between `up` and `degraded`.
//! * When a WAN comes back up, the window forgets the outage: only the
//!   rounds of the good streak that brought it back are kept, so the loss
//!   of the outage does not mark the repaired link degraded.
//! * `disabled` (config or admin) ignores rounds and link events; enabling
//!   returns to `unknown` with fresh counters (or straight to `down` when
//!   the link is unusable).

use std::collections::VecDeque;
use std::fmt;
use std::time::Instant;

use serde::Serialize;

use super::passive::{PassiveMeasurements, DEGRADE_WINDOW};
use super::probe::{RoundReport, TargetResult};
use crate::config::{HealthConfig, ProbeTarget};

/// A `degraded` WAN is `up` again once loss and RTT are below this fraction
/// of their thresholds.
pub const RECOVER_FRACTION: f64 = 0.8;

/// Rounds the window must hold before loss and RTT can degrade a WAN.
pub const MIN_JUDGED_ROUNDS: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Unknown,
    Up,
    Degraded,
    Down,
    Disabled,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            State::Unknown => "unknown",
            State::Up => "up",
            State::Degraded => "degraded",
            State::Down => "down",
            State::Disabled => "disabled",
        })
    }
}

/// The numbers behind a state, over the rolling window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Measurements {
    /// Lost probes in percent of the answered and lost ones.
    pub loss_pct: f64,
    /// Mean RTT of the answered probes.
    pub rtt_ms: Option<f64>,
    /// Mean absolute difference of consecutive RTTs of each target.
    pub jitter_ms: Option<f64>,
    /// Rounds counted since the machine was created (or last enabled).
    pub rounds: u64,
    pub good_streak: u32,
    pub bad_streak: u32,
    /// The targets that failed in the latest round, as `target: error`.
    pub failed_targets: Vec<String>,
}

/// A state change, with why it happened and the measurements behind it.
#[derive(Clone, Debug)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: String,
    pub measurements: Measurements,
    pub at: Instant,
}

/// One probe of a round, as kept in the window.
#[derive(Clone, Debug)]
enum Outcome {
    Answered {
        rtt_ms: f64,
    },
    Lost(String),
    /// Still in flight when its round was decided; refined by the round's
    /// update report. Counts neither as answered nor as lost.
    Pending,
}

impl Outcome {
    fn of(r: &TargetResult) -> Outcome {
        match (r.rtt, &r.error) {
            (Some(rtt), _) => Outcome::Answered {
                rtt_ms: rtt.as_secs_f64() * 1000.0,
            },
            (None, Some(e)) => Outcome::Lost(e.clone()),
            (None, None) => Outcome::Pending,
        }
    }
}

/// One round in the window.
struct Sample {
    seq: u64,
    probes: Vec<(ProbeTarget, Outcome)>,
}

impl Sample {
    fn of(report: &RoundReport) -> Sample {
        Sample {
            seq: report.seq,
            probes: report
                .results
                .iter()
                .map(|r| (r.target.clone(), Outcome::of(r)))
                .collect(),
        }
    }

    fn rtt_of(&self, target: &ProbeTarget) -> Option<f64> {
        self.probes.iter().find_map(|(t, o)| match o {
            Outcome::Answered { rtt_ms } if t == target => Some(*rtt_ms),
            _ => None,
        })
    }
}

/// The health state machine of one WAN (see the module documentation).
pub struct Machine {
    cfg: HealthConfig,
    state: State,
    since: Instant,
    /// Why the link is unusable, while it is.
    link_down: Option<String>,
    /// Set by [`Machine::renew`]: rounds sent before it probed the old
    /// path and are ignored.
    renewed_at: Option<Instant>,
    good_streak: u32,
    bad_streak: u32,
    rounds: u64,
    window: VecDeque<Sample>,
    /// The passive signals of the WAN's handshakes, as last read.
    passive: PassiveMeasurements,
    /// A burst confirming a passive suspicion is out ([`Machine::suspect`]):
    /// until it or a round is answered, or the WAN changes state, new
    /// flows go to other WANs when they can.
    suspected: bool,
}

impl Machine {
    /// A machine in state `initial` since `now`: `Unknown` normally, the
    /// inherited state of a restarted daemon, or `Disabled`. An inherited
    /// `Down` waits `hold_down` from `now` like any other down WAN.
    pub fn new(cfg: &HealthConfig, initial: State, now: Instant) -> Self {
        Machine {
            cfg: cfg.clone(),
            state: initial,
            since: now,
            link_down: None,
            renewed_at: None,
            good_streak: 0,
            bad_streak: 0,
            rounds: 0,
            window: VecDeque::new(),
            passive: PassiveMeasurements::default(),
            suspected: false,
        }
    }

    /// Applies a reloaded config. State, streaks and the window are kept
    /// (the window shortened if it shrank); new thresholds apply from the
    /// next round.
    pub fn set_config(&mut self, cfg: &HealthConfig) {
        self.cfg = cfg.clone();
        self.trim_window();
    }

    /// Accounts for one probing round (reports must come in the order the
    /// rounds were sent). An update report only refines the statistics of
    /// the round it names.
    pub fn on_round(&mut self, report: &RoundReport, now: Instant) -> Option<Transition> {
        if self.state == State::Disabled {
            return None;
        }
        if self.renewed_at.is_some_and(|at| report.sent_at < at) {
            return None;
        }
        if let Some(why) = &report.burst {
            return self.on_burst(report.success, why, now);
        }
        if report.update {
            let sample = self.window.iter_mut().rev().find(|s| s.seq == report.seq)?;
            *sample = Sample::of(report);
            return self.judge_quality(now);
        }
        self.rounds += 1;
        self.window.push_back(Sample::of(report));
        self.trim_window();
        if report.success {
            self.suspected = false;
            self.bad_streak = 0;
            if self.link_down.is_none() {
                self.good_streak = self.good_streak.saturating_add(1);
            }
        } else {
            self.good_streak = 0;
            self.bad_streak = self.bad_streak.saturating_add(1);
        }
        match self.state {
            State::Unknown if self.good_streak > 0 => {
                self.go(State::Up, "probes answered (fast start)".into(), now)
            }
            State::Unknown | State::Up | State::Degraded
                if self.bad_streak >= self.cfg.down_after =>
            {
                let reason = format!("{} consecutive failed rounds", self.bad_streak);
                self.go(State::Down, reason, now)
            }
            State::Down
                if self.good_streak >= self.cfg.up_after
                    && now.saturating_duration_since(self.since) >= self.cfg.hold_down =>
            {
                let reason = format!(
                    "{} consecutive good rounds after {:.1}s down",
                    self.good_streak,
                    now.saturating_duration_since(self.since).as_secs_f64()
                );
                // Forget the outage: keep only the rounds of the good streak.
                let keep = (self.good_streak as usize).min(self.window.len());
                self.window.drain(..self.window.len() - keep);
                self.go(State::Up, reason, now)
            }
            State::Up | State::Degraded => self.judge_quality(now),
            _ => None,
        }
    }

    /// A burst of probes confirming a passive suspicion (`why`): failed,
    /// it takes the WAN down at once (its return follows the usual
    /// `up_after` and `hold_down`); answered, it changes nothing (neither
    /// streaks nor the window: it is no round).
    fn on_burst(&mut self, success: bool, why: &str, now: Instant) -> Option<Transition> {
        self.suspected = false;
        if success || !matches!(self.state, State::Unknown | State::Up | State::Degraded) {
            return None;
        }
        self.good_streak = 0;
        let reason = format!("passive: {why}; a burst of probes failed too");
        self.go(State::Down, reason, now)
    }

    /// The passive signals read now: a WAN whose handshakes take longer
    /// than `max_rtt`, or whose SYN retransmissions exceed `max_loss`, is
    /// `degraded` as for its probes. They are judged only once their
    /// window ([`DEGRADE_WINDOW`]) lies wholly within the current state:
    /// the slow handshakes of a degraded spell do not degrade the WAN again
    /// just after it recovered.
    pub fn on_passive(&mut self, m: PassiveMeasurements, now: Instant) -> Option<Transition> {
        if self.state == State::Disabled {
            return None;
        }
        self.passive = if now.saturating_duration_since(self.since) >= DEGRADE_WINDOW {
            m
        } else {
            PassiveMeasurements::default()
        };
        match self.state {
            State::Up | State::Degraded => self.judge_quality(now),
            _ => None,
        }
    }

    /// The passive signals as last read.
    pub fn passive(&self) -> PassiveMeasurements {
        self.passive
    }

    /// The WAN's interface became usable or unusable (`reason` says why:
    /// carrier lost, address removed, interface gone, ...).
    pub fn on_link(&mut self, usable: bool, reason: &str, now: Instant) -> Option<Transition> {
        if usable {
            // Good rounds count from now on (none did while it was not).
            self.link_down = None;
            return None;
        }
        self.link_down = Some(reason.to_string());
        self.good_streak = 0;
        match self.state {
            State::Disabled | State::Down => None,
            _ => self.go(State::Down, reason.to_string(), now),
        }
    }

    /// The path changed under the machine (the WAN got a new address: a
    /// renumbered uplink, a new lease): the failures seen before say
    /// nothing about it. A WAN down for failed probes (not for its link)
    /// starts afresh in `unknown`, so its first good round brings it up
    /// without waiting `hold_down`; its pins stay valid meanwhile.
    pub fn renew(&mut self, reason: &str, now: Instant) -> Option<Transition> {
        if self.state != State::Down || self.link_down.is_some() {
            return None;
        }
        self.good_streak = 0;
        self.bad_streak = 0;
        self.window.clear();
        // Rounds still in flight were sent the old way.
        self.renewed_at = Some(now);
        self.go(State::Unknown, reason.to_string(), now)
    }

    /// Disables (admin or config) or enables the WAN. Enabling starts
    /// afresh in `unknown`, or `down` while the link is unusable.
    pub fn set_disabled(&mut self, disabled: bool, now: Instant) -> Option<Transition> {
        if disabled == (self.state == State::Disabled) {
            return None;
        }
        if disabled {
            return self.go(State::Disabled, "disabled".into(), now);
        }
        self.good_streak = 0;
        self.bad_streak = 0;
        self.rounds = 0;
        self.window.clear();
        match self.link_down.clone() {
            Some(why) => self.go(State::Down, format!("enabled, but {why}"), now),
            None => self.go(State::Unknown, "enabled".into(), now),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Passive health suspects the WAN and asked for a confirming burst:
    /// while it is out, new flows avoid the WAN where another can take
    /// them (a wrong suspicion costs them a detour of one burst's
    /// timeout; only the burst's failure takes the WAN down). Nothing to
    /// suspect in a state that takes no new flows.
    pub fn suspect(&mut self) {
        self.suspected = matches!(self.state, State::Up | State::Degraded);
    }

    /// Whether a suspicion's burst is out ([`Machine::suspect`]).
    pub fn suspected(&self) -> bool {
        self.suspected
    }

    /// When the current state began.
    pub fn since(&self) -> Instant {
        self.since
    }

    pub fn measurements(&self) -> Measurements {
        let (mut answered, mut lost) = (0usize, 0usize);
        let (mut rtt_sum, mut jitter_sum, mut jitter_pairs) = (0.0, 0.0, 0usize);
        let mut prev: Option<&Sample> = None;
        for sample in &self.window {
            for (target, outcome) in &sample.probes {
                match outcome {
                    Outcome::Answered { rtt_ms } => {
                        answered += 1;
                        rtt_sum += rtt_ms;
                        if let Some(before) = prev.and_then(|p| p.rtt_of(target)) {
                            jitter_sum += (rtt_ms - before).abs();
                            jitter_pairs += 1;
                        }
                    }
                    Outcome::Lost(_) => lost += 1,
                    Outcome::Pending => {}
                }
            }
            prev = Some(sample);
        }
        let failed_targets = self
            .window
            .back()
            .map(|s| {
                s.probes
                    .iter()
                    .filter_map(|(t, o)| match o {
                        Outcome::Lost(e) => Some(format!("{t}: {e}")),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Measurements {
            loss_pct: if answered + lost == 0 {
                0.0
            } else {
                100.0 * lost as f64 / (answered + lost) as f64
            },
            rtt_ms: (answered > 0).then(|| rtt_sum / answered as f64),
            jitter_ms: (jitter_pairs > 0).then(|| jitter_sum / jitter_pairs as f64),
            rounds: self.rounds,
            good_streak: self.good_streak,
            bad_streak: self.bad_streak,
            failed_targets,
        }
    }

    /// `up` ↔ `degraded` from the rolling loss and RTT.
    fn judge_quality(&mut self, now: Instant) -> Option<Transition> {
        let m = self.measurements();
        match self.state {
            State::Up => {
                let judged = self.window.len() >= MIN_JUDGED_ROUNDS.min(self.cfg.window as usize);
                let over = self.over_thresholds(&m, 1.0, judged);
                if over.is_empty() {
                    None
                } else {
                    self.go(State::Degraded, over.join(", "), now)
                }
            }
            State::Degraded if self.over_thresholds(&m, RECOVER_FRACTION, true).is_empty() => {
                let rtt = m.rtt_ms.map_or("-".into(), |r| format!("{r:.1} ms"));
                let reason = format!(
                    "loss {:.1}% and rtt {rtt} under {:.0}% of the thresholds",
                    m.loss_pct,
                    RECOVER_FRACTION * 100.0
                );
                self.go(State::Up, reason, now)
            }
            _ => None,
        }
    }

    /// Which of loss and RTT (the probes', when `probes` says they are
    /// enough to judge, and the passive ones) exceed `fraction` of their
    /// thresholds, as reason phrases.
    fn over_thresholds(&self, m: &Measurements, fraction: f64, probes: bool) -> Vec<String> {
        let mut over = Vec::new();
        let p = &self.passive;
        if let Some(max) = self.cfg.max_loss {
            let limit = max * fraction;
            if probes && m.loss_pct > limit {
                over.push(format!("loss {:.1}% above {limit:.1}%", m.loss_pct));
            }
            if let Some(r) = p.retransmit_pct.filter(|r| *r > limit) {
                over.push(format!(
                    "passive: SYN loss (retransmits) {r:.1}% above {limit:.1}%"
                ));
            }
        }
        if let Some(max) = self.cfg.max_rtt {
            let limit = max.as_secs_f64() * 1000.0 * fraction;
            if let Some(rtt) = m.rtt_ms.filter(|r| probes && *r > limit) {
                over.push(format!("rtt {rtt:.1} ms above {limit:.1} ms"));
            }
            if let Some(h) = p.handshake_ms.filter(|h| *h > limit) {
                over.push(format!("passive: handshakes {h:.1} ms above {limit:.1} ms"));
            }
        }
        over
    }

    fn trim_window(&mut self) {
        let len = (self.cfg.window as usize).max(1);
        while self.window.len() > len {
            self.window.pop_front();
        }
    }

    fn go(&mut self, to: State, reason: String, now: Instant) -> Option<Transition> {
        let t = Transition {
            from: self.state,
            to,
            reason,
            measurements: self.measurements(),
            at: now,
        };
        self.state = to;
        self.since = now;
        self.suspected = false;
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;
    use crate::config::*;

    fn target(i: usize) -> ProbeTarget {
        ProbeTarget::Icmp(Ipv4Addr::new(192, 0, 2, i as u8 + 1).into())
    }

    /// The built-in defaults, two ICMP targets.
    fn defaults() -> HealthConfig {
        HealthConfig {
            targets: vec![target(0), target(1)],
            interval: DEFAULT_PROBE_INTERVAL,
            timeout: DEFAULT_PROBE_TIMEOUT,
            quorum: DEFAULT_QUORUM,
            down_after: DEFAULT_DOWN_AFTER,
            up_after: DEFAULT_UP_AFTER,
            hold_down: DEFAULT_HOLD_DOWN,
            max_loss: None,
            max_rtt: None,
            window: DEFAULT_WINDOW,
            passive: PassiveConfig::DEFAULT,
        }
    }

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1000.0)
    }

    /// A decision report: per target the RTT in ms, or `None` for lost.
    fn report(seq: u64, rtts: &[Option<f64>], quorum: usize) -> RoundReport {
        RoundReport {
            wan: 0,
            family: crate::config::Family::Ipv4,
            seq,
            sent_at: Instant::now(),
            success: rtts.iter().flatten().count() >= quorum,
            results: rtts
                .iter()
                .enumerate()
                .map(|(i, r)| TargetResult {
                    target: target(i),
                    rtt: r.map(ms),
                    error: r.is_none().then(|| "no answer in time".to_string()),
                })
                .collect(),
            update: false,
            burst: None,
        }
    }

    /// A machine fed with synthetic rounds, one every `interval`.
    struct Sim {
        m: Machine,
        cfg: HealthConfig,
        now: Instant,
        seq: u64,
    }

    impl Sim {
        fn new(cfg: HealthConfig) -> Sim {
            Sim::with_state(cfg, State::Unknown)
        }

        fn with_state(cfg: HealthConfig, initial: State) -> Sim {
            let now = Instant::now();
            Sim {
                m: Machine::new(&cfg, initial, now),
                cfg,
                now,
                seq: 0,
            }
        }

        /// Fast-started: `up` after one good round.
        fn up(cfg: HealthConfig) -> Sim {
            let mut s = Sim::new(cfg);
            assert_eq!(s.good().unwrap().to, State::Up);
            s
        }

        fn round(&mut self, rtts: &[Option<f64>]) -> Option<Transition> {
            self.now += self.cfg.interval;
            let mut r = report(self.seq, rtts, self.cfg.quorum);
            r.sent_at = self.now;
            self.seq += 1;
            self.m.on_round(&r, self.now)
        }

        fn good(&mut self) -> Option<Transition> {
            self.round(&[Some(20.0), Some(20.0)])
        }

        fn bad(&mut self) -> Option<Transition> {
            self.round(&[None, None])
        }

        /// `n` rounds of `f`; the transitions they caused.
        fn rounds(&mut self, n: usize, f: fn(&mut Sim) -> Option<Transition>) -> Vec<Transition> {
            (0..n).filter_map(|_| f(self)).collect()
        }

        fn link(&mut self, usable: bool, reason: &str) -> Option<Transition> {
            self.m.on_link(usable, reason, self.now)
        }

        /// A burst confirming a passive suspicion, answered or not.
        fn burst(&mut self, answered: bool) -> Option<Transition> {
            let rtt = answered.then_some(20.0);
            let mut r = report(self.seq, &[rtt, rtt], self.cfg.quorum);
            r.burst = Some("9 handshakes to 9 destinations unanswered for 260 ms".into());
            self.seq += 1;
            self.m.on_round(&r, self.now)
        }
    }

    #[test]
    fn a_suspicion_lasts_until_its_burst_or_a_round_is_answered_or_the_state_changes() {
        let mut s = Sim::up(defaults());
        s.rounds(3, Sim::good);
        s.m.suspect();
        assert!(s.m.suspected());
        assert!(s.burst(true).is_none());
        assert!(!s.m.suspected(), "an answered burst clears it");
        s.m.suspect();
        assert!(s.bad().is_none());
        assert!(s.m.suspected(), "a failed round keeps it");
        assert!(s.good().is_none());
        assert!(!s.m.suspected(), "an answered round clears it");
        s.m.suspect();
        assert!(s.burst(false).is_some());
        assert!(!s.m.suspected(), "down: nothing to suspect");
        s.m.suspect();
        assert!(!s.m.suspected(), "a down WAN takes no new flows to avoid");
    }

    #[test]
    fn a_failed_burst_takes_the_wan_down_at_once_and_an_answered_one_changes_nothing() {
        let mut s = Sim::up(defaults());
        s.rounds(3, Sim::good);
        assert!(s.burst(true).is_none());
        let m = s.m.measurements();
        assert_eq!((m.rounds, m.bad_streak), (4, 0), "a burst is no round");
        let t = s.burst(false).expect("down");
        assert_eq!((t.from, t.to), (State::Up, State::Down));
        assert!(
            t.reason.starts_with("passive: 9 handshakes"),
            "{}",
            t.reason
        );
        assert!(
            t.reason.ends_with("a burst of probes failed too"),
            "{}",
            t.reason
        );
        // Down already: another failed burst says nothing; the return is
        // the usual one (up_after good rounds after hold_down).
        assert!(s.burst(false).is_none());
        assert!(
            s.rounds(DEFAULT_UP_AFTER as usize, Sim::good).is_empty(),
            "before hold_down"
        );
        s.now += s.cfg.hold_down;
        assert_eq!(s.good().map(|t| t.to), Some(State::Up));
    }

    #[test]
    fn slow_handshakes_or_syn_retransmits_degrade_like_rtt_and_loss() {
        let cfg = HealthConfig {
            max_rtt: Some(ms(50.0)),
            max_loss: Some(10.0),
            ..defaults()
        };
        let mut s = Sim::up(cfg);
        let slow = PassiveMeasurements {
            handshakes: 40,
            syns: 40,
            handshake_ms: Some(80.0),
            retransmit_pct: Some(0.0),
        };
        // Not in the first window of a state: it may hold the last state's
        // handshakes.
        assert!(s.m.on_passive(slow, s.now).is_none(), "judged too early");
        s.now += DEGRADE_WINDOW;
        // No probe window needed: the handshakes are enough.
        let t = s.m.on_passive(slow, s.now).expect("degraded");
        assert_eq!(t.to, State::Degraded);
        assert!(
            t.reason
                .contains("passive: handshakes 80.0 ms above 50.0 ms"),
            "{}",
            t.reason
        );
        let fine = PassiveMeasurements {
            handshake_ms: Some(10.0),
            ..slow
        };
        // Recovery is judged by the probes alone in the first window (a
        // fresh window, the slow handshakes gone, is judged after it).
        assert_eq!(s.m.on_passive(slow, s.now).map(|t| t.to), Some(State::Up));
        assert!(s.m.on_passive(slow, s.now).is_none(), "judged too early");
        s.now += DEGRADE_WINDOW;
        let lossy = PassiveMeasurements {
            retransmit_pct: Some(30.0),
            ..fine
        };
        let t = s.m.on_passive(lossy, s.now).expect("degraded");
        assert!(
            t.reason.contains("passive: SYN loss (retransmits) 30.0%"),
            "{}",
            t.reason
        );
        // Too few handshakes measure nothing.
        s.now += DEGRADE_WINDOW;
        assert_eq!(
            s.m.on_passive(PassiveMeasurements::default(), s.now)
                .map(|t| t.to),
            Some(State::Up)
        );
    }

    /// SplitMix64: a small seeded PRNG for reproducible random loss.
    struct Rng(u64);

    impl Rng {
        fn next_f64(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn state_names_are_lowercase() {
        assert_eq!(State::Degraded.to_string(), "degraded");
        assert_eq!(format!("{:>5}", State::Up), "   up");
        assert_eq!(
            serde_json::to_string(&State::Disabled).unwrap(),
            "\"disabled\""
        );
    }

    #[test]
    fn fast_start_on_the_first_good_round() {
        let mut s = Sim::new(defaults());
        assert_eq!(s.m.state(), State::Unknown);
        assert!(s.bad().is_none());
        let t = s.good().unwrap();
        assert_eq!((t.from, t.to), (State::Unknown, State::Up));
        assert!(t.reason.contains("fast start"), "{}", t.reason);
        assert_eq!(t.measurements.good_streak, 1);
        assert_eq!(s.m.since(), s.now);
    }

    #[test]
    fn unknown_goes_down_after_down_after_failures() {
        let mut s = Sim::new(defaults());
        assert!(s.rounds(3, Sim::bad).is_empty());
        assert_eq!(s.m.state(), State::Unknown);
        let t = s.bad().unwrap();
        assert_eq!((t.from, t.to), (State::Unknown, State::Down));
        // Leaving that down state is subject to hold_down like any other.
        let ups = s.rounds(49, Sim::good);
        assert!(ups.is_empty(), "{ups:?}");
        assert_eq!(s.good().unwrap().to, State::Up);
    }

    #[test]
    fn a_single_lost_round_never_takes_a_wan_down() {
        let mut s = Sim::up(defaults());
        for _ in 0..100 {
            assert!(s.bad().is_none());
            assert!(s.good().is_none());
        }
        // Up to down_after - 1 failures in a row are tolerated.
        for _ in 0..20 {
            assert!(s.rounds(3, Sim::bad).is_empty());
            assert!(s.good().is_none());
        }
        // One target of two lost: the round still succeeds at quorum 1.
        for _ in 0..100 {
            assert!(s.round(&[None, Some(20.0)]).is_none());
        }
        assert_eq!(s.m.state(), State::Up);
    }

    #[test]
    fn down_after_exactly_down_after_failed_rounds() {
        for down_after in [1, 2, 4, 7] {
            let cfg = HealthConfig {
                down_after,
                ..defaults()
            };
            let mut s = Sim::up(cfg);
            assert!(s.rounds(down_after as usize - 1, Sim::bad).is_empty());
            let t = s.bad().expect("down");
            assert_eq!((t.from, t.to), (State::Up, State::Down));
            assert_eq!(t.reason, format!("{down_after} consecutive failed rounds"));
            let m = &t.measurements;
            assert_eq!((m.bad_streak, m.good_streak), (down_after, 0));
            assert_eq!(
                m.failed_targets,
                vec![
                    "192.0.2.1: no answer in time",
                    "192.0.2.2: no answer in time"
                ]
            );
            assert!(m.loss_pct > 0.0);
        }
    }

    #[test]
    fn quorum_decides_which_rounds_fail() {
        let cfg = HealthConfig {
            quorum: 2,
            ..defaults()
        };
        let mut s = Sim::up(cfg);
        let t = s.rounds(4, |s| s.round(&[Some(10.0), None]));
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].to, State::Down);
        assert_eq!(
            t[0].measurements.failed_targets,
            vec!["192.0.2.2: no answer in time"]
        );
    }

    #[test]
    fn up_needs_up_after_good_rounds_and_hold_down() {
        let mut s = Sim::up(defaults());
        let down_at = s.rounds(4, Sim::bad)[0].at;
        // up_after good rounds, but hold_down has not passed.
        assert!(s.rounds(5, Sim::good).is_empty());
        let t = (0..100).find_map(|_| s.good()).expect("up after hold_down");
        assert_eq!((t.from, t.to), (State::Down, State::Up));
        let down_for = t.at - down_at;
        assert!(
            down_for >= DEFAULT_HOLD_DOWN && down_for < DEFAULT_HOLD_DOWN + DEFAULT_PROBE_INTERVAL
        );
        assert!(
            t.reason.contains("consecutive good rounds after 5.0s down"),
            "{}",
            t.reason
        );

        // hold_down long past: up_after consecutive good rounds decide, and
        // a failed round starts the count again.
        s.rounds(4, Sim::bad);
        s.rounds(100, Sim::bad);
        assert!(s.rounds(4, Sim::good).is_empty());
        assert!(s.bad().is_none());
        assert!(s.rounds(4, Sim::good).is_empty());
        let t = s.good().unwrap();
        assert_eq!(t.to, State::Up);
        assert_eq!(t.measurements.good_streak, DEFAULT_UP_AFTER);
    }

    /// A new address (renumbered uplink) restarts a WAN that probes took
    /// down: its first good round brings it up, without `hold_down`. Not a
    /// WAN whose link is down, nor one that is up.
    #[test]
    fn a_new_address_restarts_a_down_wan_without_hold_down() {
        let mut s = Sim::up(defaults());
        assert!(
            s.m.renew("a new address", s.now).is_none(),
            "up: nothing to do"
        );
        s.rounds(4, Sim::bad);
        assert_eq!(s.m.state(), State::Down);
        let renewed = s.now;
        let t = s.m.renew("a new IPv6 address", renewed).expect("restarted");
        assert_eq!((t.from, t.to), (State::Down, State::Unknown));
        // A failed round sent before the new address does not count.
        let mut stale = report(99, &[None, None], 1);
        stale.sent_at = renewed - Duration::from_millis(50);
        for _ in 0..4 {
            assert!(s.m.on_round(&stale, renewed).is_none());
        }
        let t = s.good().expect("up on the first good round");
        assert_eq!((t.from, t.to), (State::Unknown, State::Up));
        // Down because of the link: a new address changes nothing.
        s.m.on_link(false, "no carrier", s.now);
        assert!(s.m.renew("a new address", s.now).is_none());
        assert_eq!(s.m.state(), State::Down);
    }

    #[test]
    fn flapping_is_limited_by_hold_down() {
        // 10 bad / 10 good rounds alternately at 100 ms for 60 s.
        let mut s = Sim::up(defaults());
        let mut log = Vec::new();
        for _ in 0..30 {
            log.extend(s.rounds(10, Sim::bad));
            log.extend(s.rounds(10, Sim::good));
        }
        let downs = log.iter().filter(|t| t.to == State::Down).count();
        assert!(downs >= 3, "the link does go down: {downs}");
        for pair in log.windows(2) {
            if pair[0].to == State::Down && pair[1].to == State::Up {
                let held = pair[1].at - pair[0].at;
                assert!(held >= DEFAULT_HOLD_DOWN, "up {held:?} after down");
            }
        }
        // At most one down→up cycle per hold_down (plus the first).
        assert!(downs <= 60 / 5 + 1, "{downs}");
    }

    #[test]
    fn link_down_is_immediate_and_needs_rounds_after_link_up() {
        let mut s = Sim::up(defaults());
        let t = s.link(false, "carrier lost").unwrap();
        assert_eq!(
            (t.from, t.to, t.reason.as_str()),
            (State::Up, State::Down, "carrier lost")
        );
        assert!(s.link(false, "carrier lost").is_none());
        // Good rounds while the link is unusable do not count.
        assert!(s.rounds(100, Sim::good).is_empty());
        assert_eq!(s.m.measurements().good_streak, 0);
        assert!(s.link(true, "usable").is_none());
        assert!(s.link(true, "usable").is_none());
        // hold_down has passed during the 10 s: up_after rounds decide.
        assert!(s.rounds(4, Sim::good).is_empty());
        assert_eq!(s.good().unwrap().to, State::Up);

        // A short carrier loss still costs hold_down.
        let down = s.link(false, "address removed").unwrap();
        assert_eq!(down.reason, "address removed");
        s.link(true, "usable");
        let up = s.rounds(100, Sim::good);
        assert_eq!(up.len(), 1);
        assert!(up[0].at - down.at >= DEFAULT_HOLD_DOWN);

        // From unknown, and from a degraded WAN.
        let mut s = Sim::new(defaults());
        assert_eq!(s.link(false, "interface gone").unwrap().to, State::Down);
        let mut s = Sim::up(HealthConfig {
            max_rtt: Some(ms(50.0)),
            ..defaults()
        });
        let t = s.rounds(20, |s| s.round(&[Some(90.0), Some(90.0)]));
        assert_eq!(t[0].to, State::Degraded);
        assert_eq!(s.link(false, "carrier lost").unwrap().from, State::Degraded);
    }

    #[test]
    fn degraded_on_loss_with_hysteresis() {
        let cfg = HealthConfig {
            max_loss: Some(20.0),
            ..defaults()
        };
        let mut s = Sim::up(cfg);
        s.rounds(19, Sim::good);
        // One target of two keeps failing: 50% loss in those rounds.
        let t = (0..50)
            .find_map(|_| s.round(&[Some(20.0), None]))
            .expect("degraded");
        assert_eq!((t.from, t.to), (State::Up, State::Degraded));
        assert!(
            t.reason.starts_with("loss 20.") && t.reason.contains("above 20.0%"),
            "{}",
            t.reason
        );
        assert!(t.measurements.loss_pct > 20.0);
        // Good rounds bring loss down; below 20% is not enough, below 16% is.
        let mut seen_between = false;
        let t = (0..50)
            .find_map(|_| {
                let before = s.m.measurements().loss_pct;
                let t = s.good();
                assert!(t.is_none() || before > 16.0);
                let loss = s.m.measurements().loss_pct;
                seen_between |= t.is_none() && loss > 16.0 && loss <= 20.0;
                t
            })
            .expect("up again");
        assert!(
            seen_between,
            "hysteresis: still degraded between 80% and 100% of max_loss"
        );
        assert_eq!((t.from, t.to), (State::Degraded, State::Up));
        assert!(t.measurements.loss_pct <= 16.0);
        assert!(
            t.reason.contains("under 80% of the thresholds"),
            "{}",
            t.reason
        );
    }

    #[test]
    fn degraded_on_rtt_with_hysteresis() {
        let cfg = HealthConfig {
            max_rtt: Some(ms(100.0)),
            ..defaults()
        };
        let mut s = Sim::up(cfg);
        // Too few rounds to judge right after the start.
        assert!(s
            .rounds(8, |s| s.round(&[Some(500.0), Some(500.0)]))
            .is_empty());
        let t = s.round(&[Some(500.0), Some(500.0)]).unwrap();
        assert_eq!(s.m.measurements().rounds, MIN_JUDGED_ROUNDS as u64);
        assert_eq!(t.to, State::Degraded);
        assert!(t.reason.contains("above 100.0 ms"), "{}", t.reason);
        // Back to 20 ms: the mean must fall to 80 ms, not just 100 ms.
        let t = (0..50)
            .find_map(|_| {
                let t = s.good();
                assert!(t.is_some() || s.m.measurements().rtt_ms.unwrap() > 80.0);
                t
            })
            .expect("up again");
        assert_eq!(t.to, State::Up);
        assert!(t.measurements.rtt_ms.unwrap() <= 80.0);
    }

    #[test]
    fn recovery_forgets_the_outage() {
        let cfg = HealthConfig {
            max_loss: Some(10.0),
            ..defaults()
        };
        let mut s = Sim::up(cfg);
        s.rounds(40, Sim::bad);
        let t = s.rounds(60, Sim::good);
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(t[0].to, State::Up);
        assert_eq!(t[0].measurements.loss_pct, 0.0);
        assert_eq!(s.m.state(), State::Up);
    }

    #[test]
    fn disabled_ignores_everything_until_enabled() {
        let mut s = Sim::with_state(defaults(), State::Disabled);
        assert!(s.rounds(10, Sim::good).is_empty());
        assert!(s.link(false, "carrier lost").is_none());
        assert!(s.m.set_disabled(true, s.now).is_none());
        // Enabled while the link is unusable: down at once.
        let t = s.m.set_disabled(false, s.now).unwrap();
        assert_eq!((t.from, t.to), (State::Disabled, State::Down));
        assert_eq!(t.reason, "enabled, but carrier lost");
        assert!(s.m.set_disabled(false, s.now).is_none());

        let mut s = Sim::up(defaults());
        s.rounds(3, Sim::bad);
        let t = s.m.set_disabled(true, s.now).unwrap();
        assert_eq!(
            (t.from, t.to, t.reason.as_str()),
            (State::Up, State::Disabled, "disabled")
        );
        assert!(s.rounds(10, Sim::bad).is_empty());
        let t = s.m.set_disabled(false, s.now).unwrap();
        assert_eq!(
            (t.from, t.to, t.reason.as_str()),
            (State::Disabled, State::Unknown, "enabled")
        );
        // Fresh counters: the earlier failures are forgotten.
        assert_eq!(t.measurements.rounds, 0);
        assert!(s.bad().is_none());
        assert_eq!(s.good().unwrap().to, State::Up);
    }

    #[test]
    fn set_config_keeps_state_and_counters() {
        let mut s = Sim::up(defaults());
        s.rounds(3, Sim::bad);
        let since = s.m.since();
        s.m.set_config(&HealthConfig {
            down_after: 5,
            ..defaults()
        });
        assert_eq!((s.m.state(), s.m.since()), (State::Up, since));
        assert_eq!(s.m.measurements().bad_streak, 3);
        assert!(s.bad().is_none());
        assert_eq!(s.bad().unwrap().measurements.bad_streak, 5);

        // Thresholds removed: a degraded WAN is up on the next round.
        let cfg = HealthConfig {
            max_rtt: Some(ms(50.0)),
            ..defaults()
        };
        let mut s = Sim::up(cfg);
        s.rounds(20, |s| s.round(&[Some(90.0), Some(90.0)]));
        assert_eq!(s.m.state(), State::Degraded);
        s.m.set_config(&defaults());
        assert_eq!(s.m.state(), State::Degraded);
        assert_eq!(s.round(&[Some(90.0), Some(90.0)]).unwrap().to, State::Up);

        // A shorter window drops the oldest rounds.
        let mut s = Sim::up(defaults());
        s.rounds(4, |s| s.round(&[None, Some(10.0)]));
        s.rounds(3, Sim::good);
        assert!(s.m.measurements().loss_pct > 0.0);
        s.m.set_config(&HealthConfig {
            window: 3,
            ..defaults()
        });
        assert_eq!(s.m.measurements().loss_pct, 0.0);
        assert_eq!(s.m.measurements().rounds, 8);
    }

    #[test]
    fn inherited_states() {
        let mut s = Sim::with_state(defaults(), State::Up);
        assert!(s.rounds(3, Sim::bad).is_empty());
        assert_eq!(s.bad().unwrap().from, State::Up);

        // An inherited down waits hold_down from the start.
        let mut s = Sim::with_state(defaults(), State::Down);
        let start = s.now;
        let t = s.rounds(100, Sim::good);
        assert_eq!(t.len(), 1);
        assert!(t[0].at - start >= DEFAULT_HOLD_DOWN);
    }

    #[test]
    fn loss_rtt_and_jitter_over_the_window() {
        let cfg = HealthConfig {
            window: 3,
            ..defaults()
        };
        let mut s = Sim::new(cfg);
        s.round(&[Some(1000.0), None]); // leaves the window below
        s.round(&[Some(10.0), Some(30.0)]);
        s.round(&[Some(20.0), None]);
        s.round(&[Some(14.0), Some(40.0)]);
        let m = s.m.measurements();
        assert!((m.loss_pct - 100.0 / 6.0).abs() < 1e-9, "{m:?}");
        assert!((m.rtt_ms.unwrap() - 22.8).abs() < 1e-9, "{m:?}");
        // Target 1: |20 - 10|, |14 - 20|; target 2 has no consecutive pair.
        assert!((m.jitter_ms.unwrap() - 8.0).abs() < 1e-9, "{m:?}");
        assert_eq!(m.rounds, 4);
        assert!(m.failed_targets.is_empty());

        let empty = Sim::new(defaults()).m.measurements();
        assert_eq!(
            (empty.loss_pct, empty.rtt_ms, empty.jitter_ms),
            (0.0, None, None)
        );
    }

    #[test]
    fn pending_probes_count_once_their_update_arrives() {
        let mut s = Sim::up(defaults());
        // Decided on the first answer; target 2 still in flight.
        let mut r = report(7, &[Some(10.0), None], 1);
        r.results[1].error = None;
        assert!(s.m.on_round(&r, s.now).is_none());
        let m = s.m.measurements();
        assert_eq!((m.rounds, m.good_streak, m.loss_pct), (2, 2, 0.0));
        assert!(m.failed_targets.is_empty());
        // The update: target 2 never answered.
        let mut u = report(7, &[Some(10.0), None], 1);
        u.update = true;
        assert!(s.m.on_round(&u, s.now).is_none());
        let m = s.m.measurements();
        assert_eq!((m.rounds, m.good_streak, m.loss_pct), (2, 2, 25.0));
        assert_eq!(m.failed_targets, vec!["192.0.2.2: no answer in time"]);
        // An update of a round the window does not hold changes nothing.
        u.seq = 99;
        u.results[0].rtt = None;
        assert!(s.m.on_round(&u, s.now).is_none());
        assert_eq!(s.m.measurements().loss_pct, 25.0);
    }

    /// Rounds sent every `interval` whose probes answer after `rtt` while
    /// the link works; a failure starting at `t0` loses every probe whose
    /// answer would come later. Returns when the WAN was declared down,
    /// relative to `t0`.
    fn detection_time(cfg: &HealthConfig, t0: Duration, rtt: Duration) -> Duration {
        let start = Instant::now();
        let mut m = Machine::new(cfg, State::Unknown, start);
        let mut decided = start;
        for seq in 0.. {
            let sent = start + cfg.interval * seq as u32;
            let ok = sent + rtt < start + t0;
            let r = report(seq, &[ok.then_some(1.0), ok.then_some(1.0)], cfg.quorum);
            // Decided on the answer, or at the timeout; reported in order.
            decided = decided.max(sent + if ok { rtt } else { cfg.timeout });
            if let Some(t) = m.on_round(&r, decided) {
                if t.to == State::Down {
                    return t.at - (start + t0);
                }
            }
        }
        unreachable!()
    }

    #[test]
    fn defaults_detect_a_dead_link_within_a_second() {
        let cfg = defaults();
        let bound = cfg.interval * cfg.down_after + cfg.timeout;
        assert!(bound < Duration::from_secs(1), "{bound:?}");
        let mut worst = Duration::ZERO;
        // The failure starts at every phase of the probing cycle.
        for phase_ms in 0..100u64 {
            let t0 = Duration::from_millis(2000 + phase_ms) + Duration::from_micros(500);
            let d = detection_time(&cfg, t0, Duration::from_millis(1));
            assert!(d <= bound, "failure at {t0:?} detected after {d:?}");
            worst = worst.max(d);
        }
        assert!(worst > cfg.timeout, "{worst:?}");
    }

    /// Two targets at quorum 1 with independent per-probe loss `loss`
    /// for 10 minutes of rounds at the defaults: the transitions seen.
    fn random_loss(loss: f64, seed: u64) -> Vec<Transition> {
        let mut rng = Rng(seed);
        let mut s = Sim::up(defaults());
        let mut log = Vec::new();
        for _ in 0..10 * 60 * 10 {
            let mut probe = || (rng.next_f64() >= loss).then_some(20.0);
            let rtts = [probe(), probe()];
            log.extend(s.round(&rtts));
        }
        log
    }

    #[test]
    fn random_loss_of_ten_percent_never_takes_a_wan_down() {
        for seed in [1, 2, 3, 0x6d77_616e] {
            let log = random_loss(0.10, seed);
            assert!(
                log.iter().all(|t| t.to != State::Down),
                "seed {seed}: {log:?}"
            );
        }
        let log = random_loss(1.0, 1);
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].to, State::Down);
    }
}
