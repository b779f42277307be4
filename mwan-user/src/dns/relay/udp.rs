//! The relay over UDP: receive, admit, ask, learn, answer.
//!
//! A receive task per socket (IPv4, IPv6) drains the queries queued on it
//! (up to [`BATCH`] per wake) into [`Fair`]'s per-client queues: the cheap
//! part, so that the socket's queue, which serves everyone in arrival
//! order, stays short. Then the queries are *started* in turn, one client
//! after the other: the server the client addressed is read from the
//! query's conntrack entry, the query is sent to it from a socket of the
//! [`upstream`](super::upstream) pool (a random port and a random ID),
//! and a task waits for the answer. When it comes: learn, write, then
//! answer the client; then the next queued query is started.

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use super::fair::Refused;
use super::sockets::{recv_orig, send_from6};
use super::upstream::Failure;
use super::{question, servfail, Question, Shared, MAX_UDP};
use crate::conntrack::{CtTuple, Lookup};
use crate::dns::learned::LearnedSink;

/// Queries taken from a socket's queue before the queued ones are started.
const BATCH: usize = 64;
/// A query that waited this long for an exchange place is dropped: its
/// client has most likely asked again.
const STALE: Duration = Duration::from_secs(2);
/// Pause after a socket error that is not about one datagram.
const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// An admitted query, waiting for an exchange place.
pub(super) struct Pending {
    query: Vec<u8>,
    client: SocketAddr,
    /// Where it was redirected to: the relay's address the answer leaves from.
    local: SocketAddr,
    /// The relay socket it came in on.
    sock: Arc<UdpSocket>,
    arrived: Instant,
}

/// Receives the queries of `sock` until aborted.
pub(super) async fn receive<S: LearnedSink>(sock: Arc<UdpSocket>, shared: Arc<Shared<S>>) {
    let mut buf = vec![0u8; MAX_UDP];
    let mut refusals = Refusals::default();
    loop {
        if let Err(e) = sock.readable().await {
            warn!(error = %e, "DNS relay: waiting for queries");
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        }
        for _ in 0..BATCH {
            match sock.try_io(Interest::READABLE, || recv_orig(&*sock, &mut buf)) {
                Ok((n, client, local)) => {
                    let offered = shared
                        .fair
                        .lock()
                        .expect("fair lock")
                        .offer(client.ip(), || Pending {
                            query: buf[..n].to_vec(),
                            client,
                            local,
                            sock: sock.clone(),
                            arrived: Instant::now(),
                        });
                    if let Err(why) = offered {
                        refusals.note(client.ip(), why);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // One bad datagram (no original destination, ...).
                Err(e) if e.raw_os_error().is_none() => warn!(error = %e, "DNS relay: a query"),
                Err(e) => {
                    warn!(error = %e, "DNS relay: receiving a query");
                    tokio::time::sleep(ERROR_PAUSE).await;
                    break;
                }
            }
        }
        serve(&shared);
    }
}

/// Starts the queued queries there are places for, clients in turn: a
/// task each, so that the runtime's threads share the work (sending a
/// query carries it through the router's stack to the next hop).
pub(super) fn serve<S: LearnedSink>(shared: &Arc<Shared<S>>) {
    let first = shared.fair.lock().expect("fair lock").next_to_run();
    serve_from(shared, first);
}

/// Starts `next`, then the further queued queries there are places for.
fn serve_from<S: LearnedSink>(shared: &Arc<Shared<S>>, mut next: Option<(IpAddr, Pending)>) {
    while let Some((client, p)) = next {
        let s = shared.clone();
        let spawned = shared.spawn(async move {
            exchange(&s, p).await;
            // The place this exchange held goes to the next queued query
            // under the same lock.
            let next = {
                let mut fair = s.fair.lock().expect("fair lock");
                fair.done(client);
                fair.next_to_run()
            };
            serve_from(&s, next);
        });
        if !spawned {
            return;
        }
        next = shared.fair.lock().expect("fair lock").next_to_run();
    }
}

thread_local! {
    /// Each runtime thread's ctnetlink socket for the lookups.
    static LOOKUP: RefCell<Option<Lookup>> = const { RefCell::new(None) };
}

/// The server a query from `client` redirected to `local` was sent to.
fn server_of(client: SocketAddr, local: SocketAddr) -> Result<Option<SocketAddr>> {
    let reply = CtTuple {
        proto: 17,
        src: local.ip(),
        dst: client.ip(),
        sport: local.port(),
        dport: client.port(),
    };
    LOOKUP.with_borrow_mut(|l| {
        if l.is_none() {
            *l = Some(Lookup::open()?);
        }
        let found = l.as_mut().expect("opened").by_reply(&reply);
        if found.is_err() {
            // A fresh socket next time.
            *l = None;
        }
        Ok(found?.map(|e| SocketAddr::new(e.orig.dst, e.orig.dport)))
    })
}

/// Relays `p`: finds its server, asks it through the pool of upstream
/// sockets, learns from the answer, writes, then answers.
async fn exchange<S: LearnedSink>(shared: &Shared<S>, p: Pending) {
    if p.arrived.elapsed() > STALE {
        debug!(client = %p.client, "DNS relay: a query waited too long for a place, dropped");
        return;
    }
    if p.query.len() < HEADER {
        debug!(client = %p.client, len = p.query.len(), "DNS relay: a query shorter than a DNS header, dropped");
        return;
    }
    let server = match server_of(p.client, p.local) {
        Ok(Some(s)) => s,
        Ok(None) => {
            warn!(client = %p.client, "DNS relay: no conntrack entry for a redirected query, dropped");
            return;
        }
        Err(e) => {
            warn!(client = %p.client, error = %format!("{e:#}"), "DNS relay: looking up a query's server, dropped");
            return;
        }
    };
    let q = question(&p.query);
    match shared.upstream.ask(&p.query, server).await {
        Ok(answer) => {
            if let Some(q) = &q {
                shared.learn(q, &answer);
            }
            reply(&p, &answer, server).await;
        }
        Err(Failure::Timeout) => {
            debug!(client = %p.client, %server, "DNS relay: no answer in time; the client will retry");
        }
        // A send error, an ICMP error: nobody serves DNS there.
        Err(Failure::Unreachable(e)) => {
            warn!(client = %p.client, %server, error = %e, "DNS relay: the server cannot be asked; answering SERVFAIL");
            answer_servfail(&p, q.as_ref(), server).await;
        }
    }
}

/// The length of a DNS header: a shorter query is no query.
const HEADER: usize = 12;

async fn answer_servfail(p: &Pending, q: Option<&Question>, server: SocketAddr) {
    if let Some(a) = servfail(&p.query, q) {
        reply(p, &a, server).await;
    }
}

/// Sends `answer` to the client of `p` from the relay's socket. Over IPv4
/// the kernel picks the address of the client's interface, the one the
/// query was redirected to; over IPv6 an interface often has several (ULA
/// and global, link-local), so the answer is sent from the redirect's
/// address explicitly (`IPV6_PKTINFO`). Conntrack turns it back into
/// `server`'s.
async fn reply(p: &Pending, answer: &[u8], server: SocketAddr) {
    let sent = match (p.client, p.local) {
        (SocketAddr::V6(c), SocketAddr::V6(l)) => {
            p.sock
                .async_io(Interest::WRITABLE, || {
                    send_from6(&*p.sock, answer, c, *l.ip())
                })
                .await
        }
        _ => p.sock.send_to(answer, p.client).await.map(|_| ()),
    };
    if let Err(e) = sent {
        warn!(client = %p.client, %server, error = %e, "DNS relay: sending the answer");
    }
}

/// How often refusals are logged at most (a flood would fill the log).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Refused queries, logged at most every [`REFUSAL_LOG_EVERY`] with the
/// count since.
#[derive(Default)]
struct Refusals {
    logged: Option<Instant>,
    since: u64,
}

impl Refusals {
    fn note(&mut self, client: IpAddr, why: Refused) {
        self.since += 1;
        if self.logged.is_some_and(|t| t.elapsed() < REFUSAL_LOG_EVERY) {
            return;
        }
        let limits = super::LIMITS;
        match why {
            Refused::Client => warn!(%client, refused = self.since,
                "DNS relay: a client holds {} queries, more are dropped", limits.per_client),
            Refused::Full => warn!(%client, refused = self.since,
                "DNS relay: {} queries held, more are dropped", limits.held),
        }
        self.logged = Some(Instant::now());
        self.since = 0;
    }
}
