//! Passive health: a WAN that stopped answering, seen in the LAN's own TCP
//! handshakes before the probes notice. Pure logic, time passed in.
//!
//! The datapath counts, per WAN and family, the connections it pins (a
//! TCP SYN), the handshakes answered (the client's first packet after its
//! SYN that is not a SYN: the SYN-ACK reached it), SYN retransmissions,
//! the handshakes' total time, and two 64-bit sets of destination hashes
//! (the destinations SYNs went to, and those that answered). A
//! [`Detector`] reads them every few tens of milliseconds:
//!
//! * **Suspicion.** Since the WAN last answered a handshake, SYNs to at
//!   least `min_destinations` distinct destinations (estimated from the
//!   hash set) have waited longer than the answer timeout, and at least as
//!   many SYNs. The timeout is `passive_timeout`, or twice the WAN's usual
//!   handshake time when that is longer (a slow link is not suspected for
//!   being slow). One dead server, one peer that never answers, a LAN
//!   host's broken application: one destination, never enough. A port scan
//!   from the LAN reaches many destinations but the rest of the LAN's
//!   handshakes keep being answered, which resets the count.
//! * **Confirmation.** Suspicion alone takes nothing down: the daemon asks
//!   the WAN's prober for a burst of probes at once, and only when the
//!   burst fails too does the WAN go down (`Machine::on_burst`). A scan on
//!   an idle WAN thus costs a few probes (at most one burst per
//!   [`BURST_SPACING`]), never the WAN.
//! * **Degradation.** The mean handshake time and the SYN retransmission
//!   rate over the last [`DEGRADE_WINDOW`] (with at least
//!   [`MIN_HANDSHAKES`] handshakes) are handed to the machine beside the
//!   probes' RTT and loss, judged by the same `max_rtt` and `max_loss`.
//!
//! What it cannot see: connections other than TCP (UDP and QUIC have no
//! handshake a router can read), a WAN whose only traffic is established
//! connections (no SYNs; the probes judge it), and upstream failures that
//! still answer handshakes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// At most one confirming burst per WAN and family this often.
pub const BURST_SPACING: Duration = Duration::from_secs(1);
/// The window of the passive RTT and loss.
pub const DEGRADE_WINDOW: Duration = Duration::from_secs(2);
/// Handshakes the window must hold before they can degrade a WAN.
pub const MIN_HANDSHAKES: u64 = 20;

/// The datapath's cumulative counters of one WAN and family, and the
/// destination hash sets collected since the last read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub syns: u64,
    pub answered: u64,
    pub retransmits: u64,
    /// Total handshake time of the timed ones: the answered handshakes
    /// whose SYN was not retransmitted (`timed` of them).
    pub handshake_ns: u64,
    pub timed: u64,
    /// Bit `h & 63` for each destination hash `h` of a SYN (of an answered
    /// handshake), since the last read.
    pub syn_dsts: u64,
    pub answered_dsts: u64,
}

pub use crate::config::PassiveConfig;

/// Why the detector suspects the WAN.
#[derive(Clone, Debug, PartialEq)]
pub struct Suspicion {
    /// SYNs waiting longer than the timeout since the last answer.
    pub unanswered: u64,
    /// Their distinct destinations (estimated).
    pub destinations: u32,
    /// How long the oldest has waited.
    pub waited: Duration,
}

impl std::fmt::Display for Suspicion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} handshakes to {} destinations unanswered for {} ms",
            self.unanswered,
            self.destinations,
            self.waited.as_millis()
        )
    }
}

/// What the passive signals measure over [`DEGRADE_WINDOW`].
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct PassiveMeasurements {
    /// Handshakes answered and SYNs sent in the window.
    pub handshakes: u64,
    pub syns: u64,
    /// Mean handshake time, when the window holds enough handshakes.
    pub handshake_ms: Option<f64>,
    /// SYN retransmissions in percent of the SYNs, likewise.
    pub retransmit_pct: Option<f64>,
}

/// One read of the counters: what changed since the previous one.
#[derive(Clone, Copy, Debug)]
struct Delta {
    at: Instant,
    syns: u64,
    answered: u64,
    retransmits: u64,
    handshake_ns: u64,
    timed: u64,
    syn_dsts: u64,
}

/// The passive judgment of one WAN and family.
pub struct Detector {
    cfg: PassiveConfig,
    last: Option<Counters>,
    /// SYN batches since the last answered handshake, oldest first.
    pending: VecDeque<Delta>,
    /// Every read of the last [`DEGRADE_WINDOW`].
    recent: VecDeque<Delta>,
    /// The usual handshake time (exponentially weighted).
    usual_ns: Option<f64>,
    last_burst: Option<Instant>,
}

impl Detector {
    pub fn new(cfg: PassiveConfig) -> Detector {
        Detector {
            cfg,
            last: None,
            pending: VecDeque::new(),
            recent: VecDeque::new(),
            usual_ns: None,
            last_burst: None,
        }
    }

    pub fn set_config(&mut self, cfg: PassiveConfig) {
        self.cfg = cfg;
    }

    /// Forgets what was seen (the WAN came back, was renumbered, or its
    /// counters restarted).
    pub fn reset(&mut self) {
        self.last = None;
        self.pending.clear();
        self.recent.clear();
    }

    /// The time after which a SYN counts as unanswered.
    pub fn answer_timeout(&self) -> Duration {
        let usual = self
            .usual_ns
            .map(|ns| Duration::from_nanos((2.0 * ns) as u64))
            .unwrap_or_default();
        self.cfg.timeout.max(usual)
    }

    /// Accounts for one read of the counters at `now`. Returns a suspicion
    /// when the probes should confirm now (at most once per
    /// [`BURST_SPACING`]).
    pub fn on_read(&mut self, c: Counters, now: Instant) -> Option<Suspicion> {
        let last = self.last.replace(c)?;
        if c.syns < last.syns || c.answered < last.answered {
            // The datapath's counters restarted (a new map).
            self.reset();
            self.last = Some(c);
            return None;
        }
        let d = Delta {
            at: now,
            syns: c.syns - last.syns,
            answered: c.answered - last.answered,
            retransmits: c.retransmits.saturating_sub(last.retransmits),
            handshake_ns: c.handshake_ns.saturating_sub(last.handshake_ns),
            timed: c.timed.saturating_sub(last.timed),
            syn_dsts: c.syn_dsts,
        };
        self.learn_usual(&d);
        self.recent.push_back(d);
        while self
            .recent
            .front()
            .is_some_and(|r| now.saturating_duration_since(r.at) > DEGRADE_WINDOW)
        {
            self.recent.pop_front();
        }
        if d.answered > 0 {
            self.pending.clear();
        }
        if d.syns > 0 {
            self.pending.push_back(Delta { answered: 0, ..d });
        }
        if !self.cfg.enabled {
            return None;
        }
        let s = self.suspicion(now)?;
        if self
            .last_burst
            .is_some_and(|t| now.saturating_duration_since(t) < BURST_SPACING)
        {
            return None;
        }
        self.last_burst = Some(now);
        Some(s)
    }

    /// The SYNs waiting past the timeout since the last answer, if they
    /// are enough and go to enough destinations.
    fn suspicion(&self, now: Instant) -> Option<Suspicion> {
        let timeout = self.answer_timeout();
        let overdue: Vec<&Delta> = self
            .pending
            .iter()
            .filter(|d| now.saturating_duration_since(d.at) >= timeout)
            .collect();
        let unanswered: u64 = overdue.iter().map(|d| d.syns).sum();
        let dsts = overdue.iter().fold(0u64, |m, d| m | d.syn_dsts);
        let destinations = dsts.count_ones();
        let min = self.cfg.min_destinations.max(1);
        if destinations < min || unanswered < u64::from(min) {
            return None;
        }
        Some(Suspicion {
            unanswered,
            destinations,
            waited: now.saturating_duration_since(overdue[0].at),
        })
    }

    fn learn_usual(&mut self, d: &Delta) {
        if d.timed == 0 {
            return;
        }
        let mean = d.handshake_ns as f64 / d.timed as f64;
        self.usual_ns = Some(match self.usual_ns {
            None => mean,
            // Slow to move: one slow burst of handshakes is not "usual".
            Some(u) => u + (mean - u) * 0.05,
        });
    }

    /// The handshakes of the last [`DEGRADE_WINDOW`].
    pub fn measurements(&self) -> PassiveMeasurements {
        let handshakes: u64 = self.recent.iter().map(|d| d.answered).sum();
        let syns: u64 = self.recent.iter().map(|d| d.syns).sum();
        let retransmits: u64 = self.recent.iter().map(|d| d.retransmits).sum();
        let ns: u64 = self.recent.iter().map(|d| d.handshake_ns).sum();
        let timed: u64 = self.recent.iter().map(|d| d.timed).sum();
        let enough = handshakes >= MIN_HANDSHAKES;
        PassiveMeasurements {
            handshakes,
            syns,
            handshake_ms: (timed >= MIN_HANDSHAKES).then(|| ns as f64 / timed as f64 / 1e6),
            retransmit_pct: (enough && syns > 0)
                .then(|| 100.0 * retransmits as f64 / (syns + retransmits) as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: PassiveConfig = PassiveConfig {
        enabled: true,
        timeout: Duration::from_millis(100),
        min_destinations: 4,
    };

    /// Feeds `n` reads 20 ms apart, each adding `syns` SYNs to the
    /// destinations `dsts` and `answered` handshakes of 1 ms; returns the
    /// suspicions.
    struct Feed {
        d: Detector,
        c: Counters,
        t: Instant,
    }

    impl Feed {
        fn new() -> Feed {
            let mut f = Feed {
                d: Detector::new(CFG),
                c: Counters::default(),
                t: Instant::now(),
            };
            assert!(f.d.on_read(f.c, f.t).is_none());
            f
        }

        fn read(&mut self, syns: u64, dsts: u64, answered: u64) -> Option<Suspicion> {
            self.t += Duration::from_millis(20);
            self.c.syns += syns;
            self.c.answered += answered;
            self.c.handshake_ns += answered * 1_000_000;
            self.c.timed += answered;
            self.c.syn_dsts = dsts;
            self.d.on_read(self.c, self.t)
        }
    }

    #[test]
    fn unanswered_handshakes_to_many_destinations_are_suspected_after_the_timeout() {
        let mut f = Feed::new();
        for _ in 0..10 {
            assert!(f.read(5, 0b1111_0000, 5).is_none(), "answered: fine");
        }
        // The WAN goes silent: SYNs to 8 destinations, nothing answered.
        let mut first = None;
        for i in 0..20 {
            if let Some(s) = f.read(2, 0b11 << (2 * (i % 4)), 0) {
                first = Some((i, s));
                break;
            }
        }
        let (i, s) = first.expect("suspected");
        // 100 ms timeout, reads every 20 ms: the SYNs of the last good
        // read (4 destinations, not answered in that read) are overdue at
        // the 5th read after it; never sooner.
        assert_eq!(i, 4, "after {} reads: {s}", i + 1);
        assert!(s.destinations >= 4 && s.unanswered >= 4, "{s}");
        assert!(s.waited >= CFG.timeout);
        // Not again at once: one burst per second.
        assert!(f.read(2, 0xff, 0).is_none());
    }

    #[test]
    fn one_dead_destination_is_never_enough() {
        let mut f = Feed::new();
        for _ in 0..200 {
            assert!(f.read(10, 1 << 7, 0).is_none());
        }
    }

    #[test]
    fn a_scan_while_the_rest_is_answered_is_not_suspected() {
        let mut f = Feed::new();
        for i in 0..200u64 {
            // 50 SYNs to new addresses each read, one handshake answered
            // every other read.
            assert!(f.read(50, u64::MAX, i % 2).is_none(), "read {i}");
        }
    }

    #[test]
    fn a_slow_link_is_judged_by_its_usual_handshake_time() {
        let mut d = Detector::new(CFG);
        let t0 = Instant::now();
        let mut c = Counters::default();
        d.on_read(c, t0);
        // Handshakes of 300 ms are usual on this link.
        for i in 1..=50u32 {
            c.syns += 1;
            c.answered += 1;
            c.handshake_ns += 300_000_000;
            c.timed += 1;
            d.on_read(c, t0 + Duration::from_millis(20) * i);
        }
        assert!(d.answer_timeout() >= Duration::from_millis(590));
        let t1 = t0 + Duration::from_secs(2);
        for i in 0..25u32 {
            c.syns += 1;
            c.syn_dsts = 1 << i;
            let s = d.on_read(c, t1 + Duration::from_millis(20) * i);
            assert!(s.is_none(), "a 300 ms link suspected after {i} reads");
        }
    }

    #[test]
    fn handshake_time_and_retransmits_are_measured_over_the_window() {
        let mut f = Feed::new();
        assert_eq!(f.d.measurements().handshake_ms, None);
        for _ in 0..10 {
            f.read(3, 1, 3);
            f.c.retransmits += 1;
        }
        let m = f.d.measurements();
        assert_eq!(m.handshakes, 30);
        assert_eq!(m.handshake_ms, Some(1.0));
        assert!(
            m.retransmit_pct.is_some_and(|p| p > 0.0 && p < 30.0),
            "{m:?}"
        );
        // Older than the window: forgotten.
        f.t += DEGRADE_WINDOW + Duration::from_millis(100);
        f.read(0, 0, 0);
        assert_eq!(f.d.measurements().handshakes, 0);
    }

    #[test]
    fn disabled_suspects_nothing_and_a_counter_restart_is_no_signal() {
        let mut f = Feed::new();
        f.d.set_config(PassiveConfig {
            enabled: false,
            ..CFG
        });
        for _ in 0..50 {
            assert!(f.read(5, u64::MAX, 0).is_none());
        }
        f.d.set_config(CFG);
        f.c = Counters::default();
        assert!(f.read(0, 0, 0).is_none(), "restarted counters");
    }
}
