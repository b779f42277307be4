//! The relay's upstream sockets: a small pool per family instead of a
//! socket per query, as forwarders such as dnsmasq and unbound keep.
//!
//! Each family has [`POOL`]`.size` slots, each holding (once first used) an
//! unconnected UDP socket bound to a port the kernel picks at random
//! (bind to port 0), registered with tokio once, with one receive task.
//! A query is sent from a slot chosen at random, with its ID rewritten to
//! a fresh random one (the kernel's CSPRNG, `getrandom`), unique among the
//! socket's pending queries to that server; the receive task hands an
//! answer to the waiting exchange only if it comes from the exact address
//! and port the query went to, carries the ID sent, and repeats the
//! query's question section byte for byte. Anything else is dropped
//! (counted, debug-logged) and the exchange keeps waiting. The client's
//! own ID is put back into the answer.
//!
//! *Rotation.* A socket serves at most [`POOL`]`.uses` queries and lives at
//! most [`POOL`]`.age` in its slot; then the slot gets a fresh socket on a
//! fresh random port, and the retired one lives (its receive task too)
//! until its last pending query is answered or timed out.
//!
//! *Errors.* An unconnected socket hears of ICMP errors only through its
//! error queue (`IP_RECVERR`, `IPV6_RECVERR`): an ICMP error (port or host
//! unreachable, ...) that quotes a pending query's server and ID fails that
//! query at once, so "nobody serves DNS there" still gets the client a
//! SERVFAIL. A send error fails its query the same way. No answer within
//! [`POOL`]`.timeout` frees the pending slot (as does an exchange that is
//! aborted).
//!
//! *Entropy.* An off-path spoofer who wants a forged answer accepted for a
//! given query must guess its socket's port (one of some 28,000 ephemeral
//! ports), the 16-bit ID and the question: about 2^-31 per forged packet,
//! as with a socket per query. What the pool gives up: a socket's port is
//! no secret from the servers it asks, and stays open for up to 256
//! queries or 30 s. Someone who learned one (a LAN host asking a server of
//! its own through the relay sees the router's port) has one chance in
//! 32 that a given query of that family leaves from that socket, and then
//! only the ID stands between: 2^-16 per forged packet, for that socket's
//! remaining life. 32 sockets per family (64 descriptors at most, plus
//! retired ones draining) keep that chance small; rotation bounds how
//! long a learned port is worth anything.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::sockets::{recv_err, upstream_socket};
use super::{MAX_UDP, UPSTREAM_TIMEOUT};

/// How a pool is sized and rotated.
#[derive(Clone, Copy, Debug)]
pub(super) struct Settings {
    /// Sockets per family.
    pub size: usize,
    /// Queries a socket serves before it is retired.
    pub uses: u32,
    /// How long a socket serves before it is retired.
    pub age: Duration,
    /// How long the server has to answer one query.
    pub timeout: Duration,
}

/// The relay's pool: see the module's documentation.
pub(super) const POOL: Settings = Settings {
    size: 32,
    uses: 256,
    age: Duration::from_secs(30),
    timeout: UPSTREAM_TIMEOUT,
};

/// Why a query got no answer.
#[derive(Debug)]
pub(super) enum Failure {
    /// The server did not answer in time.
    Timeout,
    /// The server cannot be asked (a send error, an ICMP error, no socket).
    Unreachable(io::Error),
}

/// Datagrams taken from a socket per wake before the others' turn.
const BATCH: usize = 64;
/// Tries to find an ID no pending query to the server has.
const ID_TRIES: usize = 16;
/// Pause after a socket error that is not about one datagram.
const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The upstream sockets of both families.
pub(super) struct Pool {
    settings: Settings,
    v4: Mutex<Vec<Option<Arc<Upstream>>>>,
    v6: Mutex<Vec<Option<Arc<Upstream>>>>,
    /// The receive tasks; aborted when the pool is dropped.
    tasks: Mutex<JoinSet<()>>,
    /// Datagrams dropped as no pending query's answer.
    dropped: Arc<AtomicU64>,
}

/// One socket and the queries waiting for their answers on it.
struct Upstream {
    sock: UdpSocket,
    born: Instant,
    state: Mutex<State>,
    /// Wakes the receive task once the socket is retired and idle.
    idle: Notify,
    dropped: Arc<AtomicU64>,
}

#[derive(Default)]
struct State {
    /// By server address, server port and the ID sent.
    waiting: HashMap<(IpAddr, u16, u16), Waiter>,
    /// Queries sent from this socket.
    sent: u32,
    /// Out of its slot: ends once nothing waits.
    retired: bool,
}

struct Waiter {
    /// The query's QDCOUNT and question section: what the answer repeats.
    question: Vec<u8>,
    tx: oneshot::Sender<io::Result<Vec<u8>>>,
}

impl Pool {
    pub fn new(settings: Settings) -> Pool {
        let slots = || Mutex::new(vec![None; settings.size.max(1)]);
        Pool {
            settings,
            v4: slots(),
            v6: slots(),
            tasks: Mutex::new(JoinSet::new()),
            dropped: Arc::default(),
        }
    }

    /// Asks `server` `query` (at least a DNS header long) and waits for
    /// its answer, which is returned with the query's own ID. Within a
    /// tokio runtime.
    pub async fn ask(&self, query: &[u8], server: SocketAddr) -> Result<Vec<u8>, Failure> {
        assert!(query.len() >= 12, "a query shorter than a DNS header");
        let up = self.socket_for(server).map_err(Failure::Unreachable)?;
        let (id, rx) = up.register(server, query).ok_or_else(|| {
            Failure::Unreachable(io::Error::other("no free query ID for this server"))
        })?;
        // Frees the pending slot however this ends (answer, error,
        // timeout, or the exchange aborted).
        let _pending = Pending {
            up: &up,
            key: key(server, id),
        };
        let mut sent = query.to_vec();
        sent[..2].copy_from_slice(&id.to_be_bytes());
        let sending = match up.sock.try_send_to(&sent, server) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => up.sock.send_to(&sent, server).await,
            r => r,
        };
        sending.map_err(Failure::Unreachable)?;
        match tokio::time::timeout(self.settings.timeout, rx).await {
            Ok(Ok(Ok(mut answer))) => {
                answer[..2].copy_from_slice(&query[..2]);
                Ok(answer)
            }
            Ok(Ok(Err(e))) => Err(Failure::Unreachable(e)),
            // The socket's receive task is gone (the pool is dropped).
            Ok(Err(_)) | Err(_) => Err(Failure::Timeout),
        }
    }

    /// Datagrams dropped so far as no pending query's answer.
    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Queries waiting for an answer, on all sockets in the slots.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        let slots = self.v4.lock().expect("pool lock");
        let v6 = self.v6.lock().expect("pool lock");
        slots
            .iter()
            .chain(v6.iter())
            .flatten()
            .map(|u| u.state.lock().expect("state").waiting.len())
            .sum()
    }

    /// Receive tasks running (sockets in slots and retired ones draining).
    #[cfg(test)]
    fn receivers(&self) -> usize {
        let mut tasks = self.tasks.lock().expect("tasks lock");
        while tasks.try_join_next().is_some() {}
        tasks.len()
    }

    /// A random slot's socket of `server`'s family; a fresh one in the slot
    /// when it is empty or has served its time.
    fn socket_for(&self, server: SocketAddr) -> io::Result<Arc<Upstream>> {
        let slots = if server.is_ipv4() { &self.v4 } else { &self.v6 };
        let mut slots = slots.lock().expect("pool lock");
        let i = usize::from(random_u16()) % slots.len();
        if let Some(up) = &slots[i] {
            if up.serves(&self.settings) {
                return Ok(up.clone());
            }
        }
        let up = self.open(server)?;
        if let Some(old) = slots[i].replace(up.clone()) {
            old.retire();
        }
        Ok(up)
    }

    /// A socket for `server`'s family on a random port, its receive task
    /// started.
    fn open(&self, server: SocketAddr) -> io::Result<Arc<Upstream>> {
        let any: IpAddr = match server {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let sock = UdpSocket::from_std(upstream_socket(SocketAddr::new(any, 0))?)?;
        let up = Arc::new(Upstream {
            sock,
            born: Instant::now(),
            state: Mutex::default(),
            idle: Notify::new(),
            dropped: self.dropped.clone(),
        });
        let mut tasks = self.tasks.lock().expect("tasks lock");
        while tasks.try_join_next().is_some() {}
        tasks.spawn(receive(up.clone()));
        Ok(up)
    }
}

/// The map key of a query sent to `server` with `id`. By address and
/// port only: an IPv6 source's flow label and scope are not the server's.
fn key(server: SocketAddr, id: u16) -> (IpAddr, u16, u16) {
    (server.ip(), server.port(), id)
}

/// A pending query, removed from its socket's map when dropped.
struct Pending<'a> {
    up: &'a Upstream,
    key: (IpAddr, u16, u16),
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut st = self.up.state.lock().expect("state lock");
        st.waiting.remove(&self.key);
        if st.retired && st.waiting.is_empty() {
            self.up.idle.notify_one();
        }
    }
}

impl Upstream {
    /// Whether it may take another query.
    fn serves(&self, s: &Settings) -> bool {
        self.born.elapsed() < s.age && self.state.lock().expect("state lock").sent < s.uses
    }

    fn retire(&self) {
        let mut st = self.state.lock().expect("state lock");
        st.retired = true;
        if st.waiting.is_empty() {
            self.idle.notify_one();
        }
    }

    /// Registers `query` to `server` under a fresh random ID; `None` when
    /// no free one was found.
    fn register(
        &self,
        server: SocketAddr,
        query: &[u8],
    ) -> Option<(u16, oneshot::Receiver<io::Result<Vec<u8>>>)> {
        let mut st = self.state.lock().expect("state lock");
        for _ in 0..ID_TRIES {
            let id = random_u16();
            if let std::collections::hash_map::Entry::Vacant(v) = st.waiting.entry(key(server, id))
            {
                let (tx, rx) = oneshot::channel();
                v.insert(Waiter {
                    question: question_of(query),
                    tx,
                });
                st.sent += 1;
                return Some((id, rx));
            }
        }
        None
    }

    /// Hands `msg` from `from` to the query it answers, if any.
    fn deliver(&self, from: SocketAddr, msg: &[u8]) {
        let id = (msg.len() >= 12).then(|| u16::from_be_bytes([msg[0], msg[1]]));
        let mut st = self.state.lock().expect("state lock");
        let k = id.map(|id| key(from, id));
        let ours = k.and_then(|k| {
            st.waiting
                .get(&k)
                .is_some_and(|w| question_of(msg) == w.question)
                .then_some(k)
        });
        let Some(k) = ours else {
            drop(st);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            debug!(%from, len = msg.len(), "DNS relay: a datagram that answers no pending query, dropped");
            return;
        };
        let w = st.waiting.remove(&k).expect("found");
        drop(st);
        // The exchange may have just timed out: then nobody listens.
        let _ = w.tx.send(Ok(msg.to_vec()));
    }

    /// Fails the query an ICMP error quotes (its server and ID).
    fn fail(&self, to: SocketAddr, quoted: &[u8], error: io::Error) {
        if quoted.len() < 2 {
            return;
        }
        let k = key(to, u16::from_be_bytes([quoted[0], quoted[1]]));
        let w = self.state.lock().expect("state lock").waiting.remove(&k);
        match w {
            Some(w) => {
                let _ = w.tx.send(Err(error));
            }
            None => debug!(%to, %error, "DNS relay: an ICMP error about no pending query"),
        }
    }

    /// Retired and nothing waits: the receive task may end.
    fn done(&self) -> bool {
        let st = self.state.lock().expect("state lock");
        st.retired && st.waiting.is_empty()
    }
}

/// The QDCOUNT and question section of a DNS message (as far as the
/// message goes): what an answer must repeat exactly.
fn question_of(msg: &[u8]) -> Vec<u8> {
    if msg.len() < 12 {
        return msg.to_vec();
    }
    let count = u16::from_be_bytes([msg[4], msg[5]]);
    let mut at = 12;
    for _ in 0..count {
        // The name: labels up to the root or a compression pointer.
        while at < msg.len() {
            let len = usize::from(msg[at]);
            if len == 0 {
                at += 1;
                break;
            }
            if len & 0xc0 != 0 {
                at += 2;
                break;
            }
            at += 1 + len;
        }
        at += 4; // type and class
    }
    let mut q = msg[4..6].to_vec();
    q.extend_from_slice(&msg[12..at.min(msg.len())]);
    q
}

thread_local! {
    /// Each runtime thread's buffer for the servers' answers: an answer is
    /// received into it, then only its bytes are copied out.
    static ANSWER_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_UDP].into_boxed_slice());
}

/// Receives the answers and errors of `up` until it is retired and idle.
async fn receive(up: Arc<Upstream>) {
    loop {
        tokio::select! {
            ready = up.sock.ready(Interest::READABLE | Interest::ERROR) => match ready {
                Ok(r) => {
                    if r.is_error() {
                        drain_errors(&up);
                    }
                    if r.is_readable() {
                        drain_answers(&up);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "DNS relay: waiting for answers");
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            },
            () = up.idle.notified() => {}
        }
        if up.done() {
            return;
        }
    }
}

fn drain_answers(up: &Upstream) {
    ANSWER_BUF.with_borrow_mut(|buf| {
        for _ in 0..BATCH {
            match up
                .sock
                .try_io(Interest::READABLE, || up.sock.try_recv_from(buf))
            {
                Ok((n, from)) => up.deliver(from, &buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // A pending ICMP error (`IP_RECVERR`), reported by recv
                // once; its error queue entry says whose.
                Err(e) => debug!(error = %e, "DNS relay: receiving an answer"),
            }
        }
    })
}

fn drain_errors(up: &Upstream) {
    ANSWER_BUF.with_borrow_mut(|buf| {
        for _ in 0..BATCH {
            match up.sock.try_io(Interest::ERROR, || recv_err(&up.sock, buf)) {
                Ok(Some(e)) => up.fail(e.to, &buf[..e.len.min(buf.len())], e.error),
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!(error = %e, "DNS relay: reading a socket's errors");
                    return;
                }
            }
        }
    })
}

thread_local! {
    /// Each thread's random bytes from the kernel's CSPRNG, taken 2 at a
    /// time; refilled when used up.
    static RANDOM: RefCell<([u8; 256], usize)> = const { RefCell::new(([0; 256], 256)) };
}

/// A random number from the kernel's CSPRNG (`getrandom`).
fn random_u16() -> u16 {
    RANDOM.with_borrow_mut(|(bytes, used)| {
        if *used + 2 > bytes.len() {
            fill_random(bytes);
            *used = 0;
        }
        let r = u16::from_be_bytes([bytes[*used], bytes[*used + 1]]);
        *used += 2;
        r
    })
}

fn fill_random(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a live buffer of the length given.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            assert_eq!(e.kind(), io::ErrorKind::Interrupted, "getrandom: {e}");
            continue;
        }
        filled += n as usize;
    }
}

#[cfg(test)]
mod tests;
