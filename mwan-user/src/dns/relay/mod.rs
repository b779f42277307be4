//! The DNS relay for rules by domain name (UDP and TCP, IPv4 and IPv6).
//!
//! mwan's nftables table redirects the LAN's DNS queries (port 53, to any
//! address, over either family) to [`Relay`]'s UDP sockets and TCP
//! listeners (one of each per family, on the same ports; see
//! `nft::Divert`). The server is asked over the query's family.
//! For each UDP query the relay learns the server the client addressed
//! from the query's conntrack entry (looked up by its reply direction:
//! this socket's address and the client's), asks that server itself (from
//! a pool of upstream sockets, with a random ID: [`upstream`]), and
//! when the answer comes: parses it ([`parse_response`]), and if it is the
//! answer to that query (ID and question), writes the addresses of the
//! names the rules list into its [`LearnedSink`] (the datapath's
//! `DOMAIN_DST`) — *then* sends the answer, unchanged but for the client's
//! ID put back, to the client from
//! the same socket; conntrack rewrites its source back to the server's.
//! The client cannot connect to an address before the datapath knows it:
//! no race. Over TCP the server is the accepted connection's original
//! destination, and each connection is relayed as a pair of streams
//! ([`tcp`]).
//!
//! It runs as tasks of the daemon's tokio runtime: a receive task per UDP
//! socket ([`udp`]), an accept task per listener, a task per query waiting
//! for its answer and per TCP connection, and the expiry of learned
//! addresses on an interval. Dropping the [`Relay`] (or [`Relay::stop`])
//! takes the sink back first, then aborts every task: nothing is written
//! after.
//!
//! Everything is bounded ([`LIMITS`], [`fair`]): queries held per client
//! and in all, exchanges at once; [`UPSTREAM_TIMEOUT`] per query (then
//! nothing is sent: the client's own timeout and retry take over, as for a
//! lost packet), messages of at most [`MAX_UDP`] bytes. An answer that is
//! malformed or belongs to another query teaches nothing and is still
//! relayed as it is; a server that cannot be reached at all (a send error,
//! an ICMP error) gets the client a SERVFAIL. [`TCP_LIMITS`] bounds the TCP
//! connections, each closed after 30 s idle. Every failure is logged
//! (refusals at most every 10 s).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::task::{AbortHandle, JoinSet};
use tracing::{info, warn};

use super::learned::{AddressTable, Change, LearnedSink};
use super::wire::parse_response;
use super::DomainMatcher;
use fair::{Fair, Limits};

pub mod fair;
mod sockets;
mod tcp;
mod udp;
mod upstream;

/// The bounds of the UDP relay: a client (source address) holds at most
/// 64 queries at once (admitted, not yet answered or timed out), all
/// clients together 1024, and at most 512 exchanges with servers run at
/// once (the others wait, clients in turn). A query
/// beyond a bound is dropped, as a full queue would drop it: the client
/// retries. When the relay is busy, another client's query waits behind
/// the work of at most this many of a flooding client's: the per-client
/// bound is also the latency a flood can add (some 25 µs a query).
pub const LIMITS: Limits = Limits {
    per_client: 64,
    held: 1024,
    in_flight: 512,
};
/// The bounds of TCP: 8 connections per client, 64 in all (more are
/// closed at once: the client retries or falls back).
pub const TCP_LIMITS: Limits = Limits {
    per_client: 8,
    held: 64,
    in_flight: 64,
};
/// Queries of one TCP connection whose answers are watched for at once
/// (more are passed on, unlearned).
const MAX_PENDING_TCP: usize = 256;
/// How long the server has to answer one query.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest UDP message relayed (EDNS buffers rarely exceed 4096).
pub const MAX_UDP: usize = 65_535;
/// How often expired addresses are removed from `DOMAIN_DST`.
const EXPIRY_TICK: Duration = Duration::from_secs(1);

/// The question of a query: what its answer must repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    pub name: String,
    pub qtype: u16,
}

/// The question of `query`, when it is a well-formed standard query with one
/// question (anything else is relayed without learning).
pub fn question(query: &[u8]) -> Option<Question> {
    let q = parse_response(query).ok()?;
    if q.header.response || q.header.opcode != 0 {
        return None;
    }
    let (name, qtype) = q.question?;
    Some(Question {
        id: q.header.id,
        name,
        qtype,
    })
}

/// The learning half of the relay, without sockets: answers in, map
/// changes out.
pub struct Learner {
    matcher: DomainMatcher,
    pub table: AddressTable,
}

impl Learner {
    pub fn new(matcher: DomainMatcher) -> Learner {
        Learner {
            matcher,
            table: AddressTable::new(),
        }
    }

    /// Learned addresses live `floor` at least, plus `grace`.
    pub fn with_lifetime(mut self, floor: Duration, grace: Duration) -> Learner {
        self.table = self.table.with_lifetime(floor, grace);
        self
    }

    /// What `answer` to the query `q` teaches at `now_ns`: the changes to
    /// write into `DOMAIN_DST` before the answer is released. Nothing when
    /// the answer is malformed or is not for `q` (ID, name, type).
    pub fn answer(&mut self, q: &Question, answer: &[u8], now_ns: u64) -> Vec<Change> {
        let Ok(resp) = parse_response(answer) else {
            return vec![];
        };
        let same = resp.header.id == q.id
            && resp
                .question
                .as_ref()
                .is_some_and(|(n, t)| n.eq_ignore_ascii_case(&q.name) && *t == q.qtype);
        if !same {
            return vec![];
        }
        let mut changes = Vec::new();
        for l in &resp.learned {
            let mask = self.matcher.chain_rules(&l.chain);
            let name = l.chain.first().map(String::as_str).unwrap_or("");
            if let Some(c) = self.table.learn(l.addr, mask, l.ttl, now_ns, name) {
                changes.push(c);
            }
        }
        changes
    }
}

/// A SERVFAIL answer to `query` (its header and question), or `None` when
/// the query is too short to answer.
pub fn servfail(query: &[u8], q: Option<&Question>) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // Header and question only: the question ends 4 bytes after its name.
    let qlen = q.map(|q| q.name.len() + 2 + 4).unwrap_or(0);
    let end = (12 + qlen).min(query.len());
    let mut a = query[..end].to_vec();
    a[2] = 0x80 | (query[2] & 0x79); // QR, opcode and RD kept
    a[3] = 0x80 | 2; // RA, SERVFAIL
    let qd: u16 = if qlen > 0 { 1 } else { 0 };
    a[4..6].copy_from_slice(&qd.to_be_bytes());
    a[6..12].fill(0);
    Some(a)
}

/// The running relay: its sockets' ports, and tasks that stop when it is
/// dropped. `S` is where learned addresses are written (the daemon's
/// `DOMAIN_DST`, lent while the relay runs).
pub struct Relay<S: LearnedSink> {
    /// The UDP sockets' port.
    pub port: u16,
    /// The TCP listeners' port.
    pub tcp_port: u16,
    shared: Arc<Shared<S>>,
    /// The receive, accept and expiry tasks.
    tasks: Vec<AbortHandle>,
}

/// A relay that could not start, and the sink it was given, back.
pub struct NotStarted<S> {
    pub sink: S,
    pub error: anyhow::Error,
}

/// What the relay's tasks share.
struct Shared<S> {
    state: Mutex<State<S>>,
    fair: Mutex<Fair<udp::Pending>>,
    /// TCP connections per client (admission only).
    connections: Mutex<Fair<()>>,
    /// The sockets the UDP queries are asked from.
    upstream: upstream::Pool,
    /// The tasks of queries and connections; `None` once stopped.
    tasks: Mutex<Option<JoinSet<()>>>,
    /// The clock of the learned table's expiry times.
    started: Instant,
}

/// The learned table and where its changes go, under one lock: a change
/// is written in the order the table made it. `sink` is `None` once the
/// relay is stopped: nothing is learned or written after.
struct State<S> {
    learner: Learner,
    sink: Option<S>,
}

impl<S: LearnedSink> Shared<S> {
    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    /// Learns from `answer` to `q` and writes the changes (before the
    /// caller releases the answer).
    fn learn(&self, q: &Question, answer: &[u8]) {
        let now = self.now_ns();
        let mut st = self.state.lock().expect("state lock");
        let State { learner, sink } = &mut *st;
        let Some(sink) = sink else { return };
        let changes = learner.answer(q, answer, now);
        write(sink, &changes, "writing learned addresses");
    }

    fn expire(&self) {
        let now = self.now_ns();
        let mut st = self.state.lock().expect("state lock");
        let State { learner, sink } = &mut *st;
        let Some(sink) = sink else { return };
        let changes = learner.table.expire(now);
        write(sink, &changes, "expiring learned addresses");
    }

    /// Runs `task` as one of the relay's; `false` (and not run) once the
    /// relay is stopped.
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) -> bool {
        let mut tasks = self.tasks.lock().expect("tasks lock");
        let Some(set) = tasks.as_mut() else {
            return false;
        };
        // Forget the finished ones.
        while set.try_join_next().is_some() {}
        set.spawn(task);
        true
    }
}

fn write<S: LearnedSink>(sink: &mut S, changes: &[Change], what: &str) {
    if changes.is_empty() {
        return;
    }
    if let Err(e) = sink.apply(changes) {
        warn!(error = %format!("{e:#}"), "DNS relay: {what}");
    }
}

impl<S: LearnedSink> Relay<S> {
    /// Opens the diverted sockets (on free ports, see [`Relay::port`]),
    /// empties `sink` (what it held has no expiry record here) and starts
    /// relaying, writing what is learned into `sink`. Within a tokio
    /// runtime.
    pub fn start(
        mut sink: S,
        matcher: DomainMatcher,
        floor: Duration,
        grace: Duration,
    ) -> Result<Relay<S>, NotStarted<S>> {
        let sockets = match sockets::Sockets::open().and_then(|s| sink.clear().map(|()| s)) {
            Ok(s) => s,
            Err(error) => return Err(NotStarted { sink, error }),
        };
        let (port, tcp_port) = (sockets.port, sockets.tcp_port);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                learner: Learner::new(matcher).with_lifetime(floor, grace),
                sink: Some(sink),
            }),
            fair: Mutex::new(Fair::new(LIMITS)),
            connections: Mutex::new(Fair::new(TCP_LIMITS)),
            upstream: upstream::Pool::new(upstream::POOL),
            tasks: Mutex::new(Some(JoinSet::new())),
            started: Instant::now(),
        });
        let mut tasks = Vec::new();
        for sock in sockets.udp {
            let fut = udp::receive(Arc::new(sock), shared.clone());
            tasks.push(tokio::spawn(fut).abort_handle());
        }
        for listener in sockets.tcp {
            let fut = tcp::accept(listener, shared.clone());
            tasks.push(tokio::spawn(fut).abort_handle());
        }
        let s = shared.clone();
        let expiry = async move {
            let mut tick = tokio::time::interval(EXPIRY_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                s.expire();
            }
        };
        tasks.push(tokio::spawn(expiry).abort_handle());
        info!(port, tcp_port, "DNS relay for rules by domain name started");
        Ok(Relay {
            port,
            tcp_port,
            shared,
            tasks,
        })
    }

    /// Stops relaying and gives the sink back, as it is (what was learned
    /// stays in it): nothing is written into it after.
    pub fn stop(mut self) -> S {
        self.retire().expect("a running relay has its sink")
    }

    /// Takes the sink away (so no task writes any more), then aborts
    /// every task. The sockets close as the aborted tasks are dropped.
    fn retire(&mut self) -> Option<S> {
        let sink = self.shared.state.lock().expect("state lock").sink.take();
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(mut set) = self.shared.tasks.lock().expect("tasks lock").take() {
            set.abort_all();
            set.detach_all();
        }
        sink
    }
}

impl<S: LearnedSink> Drop for Relay<S> {
    fn drop(&mut self) {
        self.retire();
    }
}

impl<S: LearnedSink> Relay<S> {
    /// What is learned now, for `mwan domains`: `rule_names[i]` names rule
    /// *i*; only entries whose name is `under` or below it, if given.
    pub fn learned(&self, rule_names: &[String], under: Option<&str>) -> Vec<LearnedEntry> {
        let now = self.shared.now_ns();
        let st = self.shared.state.lock().expect("state lock");
        let mut out: Vec<LearnedEntry> = st
            .learner
            .table
            .iter()
            .filter(|(_, name, _)| under.is_none_or(|u| is_under(name, u)))
            .map(|(addr, name, rules)| LearnedEntry {
                address: addr,
                name: name.to_string(),
                rules: rules
                    .iter()
                    .map(|(r, exp)| LearnedRule {
                        rule: rule_names
                            .get(*r as usize)
                            .cloned()
                            .unwrap_or_else(|| format!("rule {r}")),
                        expires_in_secs: exp.saturating_sub(now) as f64 / 1e9,
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.address.cmp(&b.address)));
        out
    }
}

/// Whether `name` is `domain` or a name under it (case-insensitive).
fn is_under(name: &str, domain: &str) -> bool {
    let (name, domain) = (
        name.to_ascii_lowercase(),
        domain.trim_end_matches('.').to_ascii_lowercase(),
    );
    name == domain || name.ends_with(&format!(".{domain}"))
}

/// One learned address (`mwan domains --json`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LearnedEntry {
    pub address: std::net::IpAddr,
    /// The name whose answer last taught it (the question's name).
    pub name: String,
    pub rules: Vec<LearnedRule>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LearnedRule {
    pub rule: String,
    /// Seconds until it expires (TTL, floor and grace included).
    pub expires_in_secs: f64,
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn matcher() -> DomainMatcher {
        let mut m = DomainMatcher::new();
        m.insert("gov.example", 0);
        m.insert("cdn.example", 1);
        m
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
        query_type(id, name, 1)
    }

    fn query_type(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&id.to_be_bytes());
        a.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        push_name(&mut a, name);
        a.extend_from_slice(&qtype.to_be_bytes());
        a.extend_from_slice(&[0, 1]);
        a
    }

    /// The answer to an AAAA query for `chain[0]`: a CNAME from each name
    /// of `chain` to the next, then the last name's AAAA record `addr`.
    fn aaaa_answer(id: u16, chain: &[&str], addr: std::net::Ipv6Addr) -> Vec<u8> {
        let mut a = query_type(id, chain[0], 28);
        a[2..4].copy_from_slice(&[0x81, 0x80]);
        a[6..8].copy_from_slice(&(chain.len() as u16).to_be_bytes());
        for pair in chain.windows(2) {
            push_name(&mut a, pair[0]);
            a.extend_from_slice(&[0, 5, 0, 1, 0, 0, 1, 44]);
            let mut target = Vec::new();
            push_name(&mut target, pair[1]);
            a.extend_from_slice(&(target.len() as u16).to_be_bytes());
            a.extend_from_slice(&target);
        }
        push_name(&mut a, chain[chain.len() - 1]);
        a.extend_from_slice(&[0, 28, 0, 1, 0, 0, 1, 44, 0, 16]);
        a.extend_from_slice(&addr.octets());
        a
    }

    /// AAAA answers teach IPv6 addresses, directly and at the end of a
    /// CNAME chain whose later name is the listed one.
    #[test]
    fn aaaa_answers_teach_ipv6_addresses_through_cname_chains() {
        let mut l = Learner::new(matcher());
        let v6: std::net::Ipv6Addr = "2001:db8::5".parse().unwrap();
        let q = question(&query_type(3, "www.gov.example", 28)).unwrap();
        assert_eq!(q.qtype, 28);
        assert_eq!(
            l.answer(&q, &aaaa_answer(3, &["www.gov.example"], v6), 0),
            vec![(v6.into(), Some(0b1))]
        );
        // portal.example (not listed) -> www.portal.net -> edge.cdn.example.
        let cdn: std::net::Ipv6Addr = "2001:db8::20".parse().unwrap();
        let chain = ["portal.example", "www.portal.net", "edge.cdn.example"];
        let q = question(&query_type(4, chain[0], 28)).unwrap();
        assert_eq!(
            l.answer(&q, &aaaa_answer(4, &chain, cdn), 0),
            vec![(cdn.into(), Some(0b10))]
        );
        // The AAAA answer to an A question is another question: nothing.
        let q = question(&query(5, "www.gov.example")).unwrap();
        assert!(l
            .answer(&q, &aaaa_answer(5, &["www.gov.example"], v6), 0)
            .is_empty());
        // A chain to a name no rule lists teaches nothing.
        let q = question(&query_type(6, "a.example.org", 28)).unwrap();
        assert!(l
            .answer(
                &q,
                &aaaa_answer(6, &["a.example.org", "b.example.org"], v6),
                0
            )
            .is_empty());
        // `mwan domains` lists it with the question's name.
        let names: Vec<(std::net::IpAddr, String)> =
            l.table.iter().map(|(a, n, _)| (a, n.to_string())).collect();
        assert!(
            names.contains(&(cdn.into(), "portal.example".to_string())),
            "{names:?}"
        );
    }

    fn push_name(a: &mut Vec<u8>, name: &str) {
        for l in name.split('.') {
            a.push(l.len() as u8);
            a.extend_from_slice(l.as_bytes());
        }
        a.push(0);
    }

    #[test]
    fn an_answer_to_its_query_teaches_the_listed_names_only() {
        let mut l = Learner::new(matcher());
        let q = question(&query(7, "www.gov.example")).unwrap();
        assert_eq!(q.name, "www.gov.example");
        let changes = l.answer(
            &q,
            &simple_answer(7, "www.gov.example", [203, 0, 113, 5]),
            0,
        );
        assert_eq!(
            changes,
            vec![(Ipv4Addr::new(203, 0, 113, 5).into(), Some(0b1))]
        );
        // Another ID, another name: nothing.
        assert!(l
            .answer(
                &q,
                &simple_answer(8, "www.gov.example", [203, 0, 113, 6]),
                0
            )
            .is_empty());
        assert!(l
            .answer(
                &q,
                &simple_answer(7, "www.other.example", [203, 0, 113, 6]),
                0
            )
            .is_empty());
        // Malformed: nothing, no panic.
        assert!(l.answer(&q, &[0u8; 5], 0).is_empty());
        // A name no rule lists.
        let q2 = question(&query(9, "example.org")).unwrap();
        assert!(l
            .answer(&q2, &simple_answer(9, "example.org", [203, 0, 113, 7]), 0)
            .is_empty());
    }

    /// A response with one question and one A record for it.
    fn simple_answer(id: u16, name: &str, addr: [u8; 4]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&id.to_be_bytes());
        a.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
        push_name(&mut a, name);
        a.extend_from_slice(&[0, 1, 0, 1]);
        a.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4]);
        a.extend_from_slice(&addr);
        a
    }

    #[test]
    fn servfail_keeps_id_and_question() {
        let q = query(0x1234, "www.gov.example");
        let s = servfail(&q, question(&q).as_ref()).unwrap();
        let r = parse_response(&s).unwrap();
        assert_eq!(r.header.id, 0x1234);
        assert!(r.header.response);
        assert_eq!(r.header.rcode, 2);
        assert_eq!(r.question, Some(("www.gov.example".to_string(), 1)));
        assert!(servfail(&[1, 2, 3], None).is_none());
    }
}
