//! Passive health in the daemon: every [`READ_EVERY`] the datapath's
//! handshake counters of each WAN and family (`PASSIVE`) are read into the
//! family's [`Detector`](crate::health::passive::Detector); its
//! measurements go to the machine that judges the family (degradation), its
//! suspicions to that family's prober as a burst of probes, whose failure
//! takes the WAN down (`Machine::on_round` of a burst report).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::Daemon;
use crate::family::Family;
use crate::health::passive::{Counters, PassiveMeasurements, Suspicion};
use crate::health::probe::Burst;
use crate::health::State;

/// How often the counters are read. A SYN is seen at the read after it,
/// so a suspicion comes between `passive_timeout` and that plus two reads
/// after the WAN stopped answering.
pub const READ_EVERY: Duration = Duration::from_millis(20);
/// A confirming burst waits at least this long for its answers (and at
/// least four times the WAN's mean probe RTT, at most `probe_timeout`).
const BURST_MIN_TIMEOUT: Duration = Duration::from_millis(250);
/// A read of the counters failed once already (warned).
static READ_FAILED: AtomicBool = AtomicBool::new(false);

impl Daemon {
    /// One read of every WAN's counters.
    pub(super) async fn on_passive_tick(&mut self) {
        let now = Instant::now();
        let mut changes = Vec::new();
        // A suspicion steers new flows away until its burst is answered.
        let mut suspected = false;
        for i in 0..self.wans.len() {
            for f in Family::BOTH {
                let w = &self.wans[i];
                if !w.carries(f) {
                    continue;
                }
                let c = match self.dp.maps.take_passive(f, w.id) {
                    Ok(c) => c,
                    Err(e) => {
                        // Every 40 ms: said once, then at debug level.
                        if !READ_FAILED.swap(true, Ordering::Relaxed) {
                            warn!(error = %format!("{e:#}"), "reading the passive health counters");
                        } else {
                            debug!(error = %format!("{e:#}"), "reading the passive health counters");
                        }
                        return;
                    }
                };
                let judge = w.judged_by(f);
                let state = w.state(f);
                let enabled = w.cfg.health.passive.enabled;
                let h = self.wans[i].family_mut(f);
                if matches!(state, State::Down | State::Disabled) {
                    // Nothing to suspect; what it saw is stale once it is back.
                    h.passive.reset();
                    continue;
                }
                let suspicion = h.passive.on_read(counters(&c), now);
                let m = if enabled {
                    h.passive.measurements()
                } else {
                    PassiveMeasurements::default()
                };
                if judge == f {
                    if let Some(t) = h.machine.on_passive(m, now) {
                        changes.push((i, f, t));
                    }
                }
                if let Some(s) = suspicion {
                    suspected |= self.confirm(i, f, judge, s);
                }
            }
        }
        if changes.is_empty() && !suspected {
            return;
        }
        for (i, f, t) in changes {
            self.on_transition(i, f, t);
        }
        if let Err(e) = self.reconcile(false).await {
            tracing::error!(error = %format!("{e:#}"), "applying a health change");
        }
    }

    /// Asks the prober of family `judge` of WAN `i` for a burst confirming
    /// suspicion `s` of family `f`, and marks the judge's machine suspected
    /// meanwhile; whether it was marked.
    fn confirm(&mut self, i: usize, f: Family, judge: Family, s: Suspicion) -> bool {
        let w = &self.wans[i];
        let Some(prober) = self.applied.prober(w.id, judge) else {
            return false;
        };
        let h = &w.cfg.health;
        let rtt = w.family(judge).machine.measurements().rtt_ms.unwrap_or(0.0);
        let timeout = Duration::from_secs_f64(rtt * 4.0 / 1000.0)
            .max(BURST_MIN_TIMEOUT)
            .min(h.timeout);
        info!(wan = %w.cfg.name, family = %f, suspicion = %s, "passive: handshakes go unanswered; confirming with a burst of probes");
        self.wans[i].stats.passive_bursts += 1;
        prober.burst(Burst {
            timeout,
            why: s.to_string(),
        });
        let m = &mut self.wans[i].family_mut(judge).machine;
        m.suspect();
        m.suspected()
    }
}

/// The datapath's counters as the detector reads them.
fn counters(c: &mwan_common::PassiveCounters) -> Counters {
    Counters {
        syns: c.syns,
        answered: c.answered,
        retransmits: c.retransmits,
        handshake_ns: c.handshake_ns,
        syn_dsts: c.syn_dsts,
        answered_dsts: c.answered_dsts,
        timed: c.timed,
    }
}
