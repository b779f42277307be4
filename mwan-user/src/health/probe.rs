//! The prober of one WAN: probing rounds through that WAN only.
//!
//! Every `interval` a round probes all targets at once. Every probe socket
//! carries the WAN's mark (`SO_MARK`, which routes it by the WAN's table)
//! and is bound to the WAN's interface (`SO_BINDTODEVICE`), so a probe can
//! neither leave through another link nor be answered through one. A round
//! succeeds when `quorum` targets answer within `timeout`; it is decided as
//! soon as that is certain (quorum reached, or no longer reachable), or
//! else at its timeout. Rounds overlap when `timeout > interval`; they are
//! reported in the order they were sent.
//!
//! RTTs are measured here: the clock is read immediately before the probe
//! is sent and when its answer is received.
//!
//! A round that succeeded while some probes were still in flight is
//! reported at once with those probes marked pending; when they have
//! answered or timed out, an *update* report with the same `seq` carries
//! the round's final results (for the loss and RTT statistics only).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::MissedTickBehavior;
use tracing::debug;

use super::outcome::{random_u16, Outcome, NO_ANSWER};
use super::{dns, icmp, tcp};
use crate::config::{Family, ProbeTarget};

/// What a prober probes, and how. A WAN has a prober per family it has
/// targets of.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeSpec {
    /// The WAN's id, copied into every report.
    pub wan: usize,
    /// The family of `targets`, copied into every report.
    pub family: Family,
    pub name: String,
    pub interface: String,
    /// The WAN's fwmark: the probes' route lookup uses the WAN's table.
    pub mark: u32,
    pub targets: Vec<ProbeTarget>,
    pub interval: Duration,
    pub timeout: Duration,
    pub quorum: usize,
}

/// One target's result in a round.
///
/// `rtt: Some` — answered. `rtt: None, error: Some` — no answer in time, or
/// the probe failed (the error says which). `rtt: None, error: None` — still
/// in flight when the round was decided; the round's update report has the
/// final result.
#[derive(Clone, Debug)]
pub struct TargetResult {
    pub target: ProbeTarget,
    pub rtt: Option<Duration>,
    pub error: Option<String>,
}

/// A probing round's result.
#[derive(Clone, Debug)]
pub struct RoundReport {
    pub wan: usize,
    pub family: Family,
    /// Rounds of one prober are numbered from 0.
    pub seq: u64,
    pub sent_at: Instant,
    pub success: bool,
    /// One per target, in the order of [`ProbeSpec::targets`].
    pub results: Vec<TargetResult>,
    /// `false`: the round's decision (one per round, in order). `true`: the
    /// final results of round `seq`, which was decided while some probes
    /// were still in flight; `success` repeats the decision.
    pub update: bool,
    /// A burst asked for by passive health ([`Prober::burst`]): why. Its
    /// decision is reported as soon as it is known, out of the rounds'
    /// order, and it has no update.
    pub burst: Option<String>,
}

/// A confirming round, sent at once ([`Prober::burst`]).
#[derive(Clone, Debug)]
pub struct Burst {
    pub timeout: Duration,
    /// Why (the passive suspicion), copied into the report.
    pub why: String,
}

/// A running prober; dropping it stops its probing.
pub struct Prober {
    spec: ProbeSpec,
    task: AbortHandle,
    bursts: mpsc::UnboundedSender<Burst>,
}

impl Prober {
    /// Starts probing (within a tokio runtime). Sockets are opened in the
    /// network namespace of the calling thread; when they cannot be opened
    /// (the interface does not exist yet, ...) the rounds fail with the
    /// error, and the next round tries again.
    pub fn spawn(spec: ProbeSpec, tx: mpsc::Sender<RoundReport>) -> Prober {
        let (bursts, bursts_rx) = mpsc::unbounded_channel();
        let runner = Runner {
            bursts: bursts_rx,
            echo_id: random_u16(),
            spec: spec.clone(),
            tx,
            icmp: None,
            next_echo_seq: 0,
            echoes: HashMap::new(),
            tasks: JoinSet::new(),
            rounds: VecDeque::new(),
            next_seq: 0,
        };
        let task = tokio::spawn(runner.run()).abort_handle();
        Prober { spec, task, bursts }
    }

    /// Probes every target now, with `b.timeout`, besides the rounds.
    pub fn burst(&self, b: Burst) {
        let _ = self.bursts.send(b);
    }

    pub fn spec(&self) -> &ProbeSpec {
        &self.spec
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A round in progress.
struct Round {
    seq: u64,
    sent_at: Instant,
    deadline: Instant,
    /// Per target; `None` while in flight.
    results: Vec<Option<Outcome>>,
    /// `Some` once the decision is reported.
    reported: Option<bool>,
    /// Some probes were in flight when the decision was reported.
    needs_update: bool,
    /// A burst's reason ([`RoundReport::burst`]).
    burst: Option<String>,
}

impl Round {
    fn in_flight(&self) -> usize {
        self.results.iter().filter(|r| r.is_none()).count()
    }

    fn decision(&self, quorum: usize) -> Option<bool> {
        let answered = self
            .results
            .iter()
            .filter(|r| matches!(r, Some(Ok(_))))
            .count();
        if answered >= quorum {
            Some(true)
        } else if answered + self.in_flight() < quorum {
            Some(false)
        } else {
            None
        }
    }

    fn report(&self, spec: &ProbeSpec, success: bool, update: bool) -> RoundReport {
        RoundReport {
            wan: spec.wan,
            family: spec.family,
            seq: self.seq,
            sent_at: self.sent_at,
            success,
            results: spec
                .targets
                .iter()
                .zip(&self.results)
                .map(|(target, r)| TargetResult {
                    target: target.clone(),
                    rtt: r.as_ref().and_then(|r| r.as_ref().ok().copied()),
                    error: r.as_ref().and_then(|r| r.as_ref().err().cloned()),
                })
                .collect(),
            update,
            burst: self.burst.clone(),
        }
    }
}

/// An echo request in flight.
struct Echo {
    round: u64,
    target: usize,
    addr: IpAddr,
    sent: Instant,
}

/// The probing task's state.
struct Runner {
    spec: ProbeSpec,
    tx: mpsc::Sender<RoundReport>,
    /// The raw ICMP socket, opened on demand and dropped on errors.
    icmp: Option<icmp::Socket>,
    echo_id: u16,
    next_echo_seq: u16,
    echoes: HashMap<u16, Echo>,
    /// TCP and DNS probes: (round, target index, outcome).
    tasks: JoinSet<(u64, usize, Outcome)>,
    rounds: VecDeque<Round>,
    next_seq: u64,
    bursts: mpsc::UnboundedReceiver<Burst>,
}

impl Runner {
    async fn run(mut self) {
        // (A zero period would panic; the config never has one.)
        let mut ticker = tokio::time::interval(self.spec.interval.max(Duration::from_millis(1)));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut buf = [0u8; 2048];
        loop {
            // Deadlines grow with `seq`: the first round with probes in
            // flight expires first.
            let expiry = self
                .rounds
                .iter()
                .find(|r| r.in_flight() > 0)
                .map(|r| r.deadline);
            tokio::select! {
                biased;
                r = icmp::recv(self.icmp.as_ref(), &mut buf) => match r {
                    Ok((Some(reply), at)) => self.on_echo_reply(reply, at),
                    Ok((None, _)) => {}
                    Err(e) => {
                        debug!(wan = %self.spec.name, "icmp receive: {e}; reopening the socket");
                        self.icmp = None;
                    }
                },
                Some(done) = self.tasks.join_next() => {
                    if let Ok((round, target, outcome)) = done {
                        self.resolve(round, target, outcome);
                    }
                }
                _ = tokio::time::sleep_until(expiry.unwrap_or_else(Instant::now).into()), if expiry.is_some() => {
                    self.expire(Instant::now());
                }
                _ = ticker.tick() => self.start_round(self.spec.timeout, None),
                Some(b) = self.bursts.recv() => self.start_round(b.timeout, Some(b.why)),
            }
            if self.flush().await.is_err() {
                return; // Nobody listens any more.
            }
        }
    }

    fn start_round(&mut self, timeout: Duration, burst: Option<String>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let sent_at = Instant::now();
        let deadline = sent_at + timeout;
        let results = (0..self.spec.targets.len())
            .map(|i| self.start_probe(seq, i, deadline))
            .collect();
        self.rounds.push_back(Round {
            seq,
            sent_at,
            deadline,
            results,
            reported: None,
            needs_update: false,
            burst,
        });
    }

    /// Starts probing target `target` for round `round`: `None` while in
    /// flight, or the outcome when it failed at once.
    fn start_probe(&mut self, round: u64, target: usize, deadline: Instant) -> Option<Outcome> {
        let (iface, mark) = (self.spec.interface.clone(), self.spec.mark);
        match self.spec.targets[target] {
            ProbeTarget::Icmp(addr) => self.send_echo(addr, round, target).err().map(Err),
            ProbeTarget::Tcp(addr) => {
                self.tasks.spawn(async move {
                    (
                        round,
                        target,
                        tcp::probe(&iface, mark, addr, deadline).await,
                    )
                });
                None
            }
            ProbeTarget::Dns(addr) => {
                self.tasks.spawn(async move {
                    (
                        round,
                        target,
                        dns::probe(&iface, mark, addr, deadline).await,
                    )
                });
                None
            }
        }
    }

    /// Sends an echo request for target `target` of round `round`.
    fn send_echo(&mut self, addr: IpAddr, round: u64, target: usize) -> Result<(), String> {
        let v6 = self.spec.family == Family::Ipv6;
        let sock = match self.icmp.take() {
            Some(s) => s,
            None => icmp::Socket::open(&self.spec.interface, self.spec.mark, v6)
                .map_err(|e| format!("icmp socket on {}: {e}", self.spec.interface))?,
        };
        let seq = self.next_echo_seq;
        self.next_echo_seq = seq.wrapping_add(1);
        // On error the socket is dropped and reopened next time: the
        // interface may have been re-created.
        let sent = sock
            .send_echo(addr, self.echo_id, seq)
            .map_err(|e| format!("icmp send: {e}"))?;
        self.icmp = Some(sock);
        let echo = Echo {
            round,
            target,
            addr,
            sent,
        };
        self.echoes.insert(seq, echo);
        Ok(())
    }

    fn on_echo_reply(&mut self, reply: icmp::Reply, at: Instant) {
        if reply.id != self.echo_id {
            return;
        }
        let Some(echo) = self.echoes.get(&reply.seq) else {
            return;
        };
        let in_time = self
            .rounds
            .iter()
            .any(|r| r.seq == echo.round && at <= r.deadline);
        if echo.addr == reply.src && in_time {
            let echo = self.echoes.remove(&reply.seq).expect("looked up above");
            self.resolve(echo.round, echo.target, Ok(at - echo.sent));
        }
    }

    fn resolve(&mut self, round: u64, target: usize, outcome: Outcome) {
        if let Some(r) = self.rounds.iter_mut().find(|r| r.seq == round) {
            r.results[target].get_or_insert(outcome);
        }
    }

    /// Probes of rounds past their deadline get no answer in time.
    fn expire(&mut self, now: Instant) {
        for r in self.rounds.iter_mut().filter(|r| r.deadline <= now) {
            for slot in r.results.iter_mut().filter(|s| s.is_none()) {
                *slot = Some(Err(NO_ANSWER.to_string()));
            }
        }
        let rounds = &self.rounds;
        self.echoes.retain(|_, e| {
            rounds
                .iter()
                .any(|r| r.seq == e.round && r.results[e.target].is_none())
        });
    }

    /// Sends the decisions that are due (the rounds' in order, a burst's
    /// as soon as it is known), then the updates of the rounds that are
    /// complete, and forgets those.
    async fn flush(&mut self) -> Result<(), mpsc::error::SendError<RoundReport>> {
        let mut blocked = false;
        for i in 0..self.rounds.len() {
            let r = &mut self.rounds[i];
            if r.reported.is_some() || (blocked && r.burst.is_none()) {
                continue;
            }
            let Some(success) = r.decision(self.spec.quorum) else {
                blocked |= r.burst.is_none();
                continue;
            };
            r.reported = Some(success);
            r.needs_update = r.in_flight() > 0 && r.burst.is_none();
            let report = r.report(&self.spec, success, false);
            self.tx.send(report).await?;
        }
        while let Some(i) = self
            .rounds
            .iter()
            .position(|r| r.reported.is_some() && r.in_flight() == 0)
        {
            let r = self.rounds.remove(i).expect("position is in range");
            if let (true, Some(success)) = (r.needs_update, r.reported) {
                self.tx.send(r.report(&self.spec, success, true)).await?;
            }
        }
        Ok(())
    }
}
