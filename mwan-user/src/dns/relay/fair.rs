//! The relay's bound on per-client work, and its fair service.
//!
//! Every UDP query the relay takes is *held* from the moment it is admitted
//! until its exchange with the server ends (answered, failed or timed
//! out). A client (a source address) holds at most
//! [`Limits::per_client`] queries, all clients together at most
//! [`Limits::held`]; a query beyond either is refused at once, before any
//! work is done for it (the client retries as after a lost packet). At most
//! [`Limits::in_flight`] exchanges run at once; the admitted queries beyond
//! that wait in one queue per client, and a free place goes to the clients
//! in turn (round robin), one query each. So a host that floods holds its
//! share and no more: another host's query waits behind at most one query
//! of each busy client, never behind the flood, and finds a place as long
//! as fewer than `held / per_client` clients are flooding at once.
//!
//! Pure: no I/O, no clock; the caller runs what [`Fair::next_to_run`] hands out
//! and reports its end with [`Fair::done`].

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

/// The bounds of [`Fair`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Queries one client (source address) holds at once.
    pub per_client: usize,
    /// Queries all clients hold at once.
    pub held: usize,
    /// Exchanges with servers running at once.
    pub in_flight: usize,
}

/// Why a query was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Its client already holds [`Limits::per_client`] queries.
    Client,
    /// All clients together hold [`Limits::held`].
    Full,
}

#[derive(Debug)]
struct Client<T> {
    queue: VecDeque<T>,
    /// Admitted and not yet done (queued, in flight, or between).
    held: usize,
}

/// Admission, per-client queues and round-robin dispatch of held work.
#[derive(Debug)]
pub struct Fair<T> {
    limits: Limits,
    clients: HashMap<IpAddr, Client<T>>,
    /// The clients with queued items, each once, in turn order.
    turns: VecDeque<IpAddr>,
    held: usize,
    in_flight: usize,
}

impl<T> Fair<T> {
    pub fn new(limits: Limits) -> Fair<T> {
        Fair {
            limits,
            clients: HashMap::new(),
            turns: VecDeque::new(),
            held: 0,
            in_flight: 0,
        }
    }

    /// Takes a place for one more query of `client`, or says why not. An
    /// admitted query is then [`push`](Fair::push)ed or
    /// [`cancel`](Fair::cancel)led.
    pub fn admit(&mut self, client: IpAddr) -> Result<(), Refused> {
        let held = self.clients.get(&client).map_or(0, |c| c.held);
        if held >= self.limits.per_client {
            return Err(Refused::Client);
        }
        if self.held >= self.limits.held {
            return Err(Refused::Full);
        }
        self.held += 1;
        self.clients
            .entry(client)
            .or_insert_with(|| Client {
                queue: VecDeque::new(),
                held: 0,
            })
            .held += 1;
        Ok(())
    }

    /// Queues `item` of `client`, which was admitted.
    pub fn push(&mut self, client: IpAddr, item: T) {
        let c = self.clients.get_mut(&client).expect("push follows admit");
        if c.queue.is_empty() {
            self.turns.push_back(client);
        }
        c.queue.push_back(item);
    }

    /// [`admit`](Fair::admit)s one more query of `client` and, if it is
    /// admitted, queues the item `make` makes (`make` is not called for a
    /// refused one): both under one borrow, so a caller behind a lock takes
    /// it once per query.
    pub fn offer(&mut self, client: IpAddr, make: impl FnOnce() -> T) -> Result<(), Refused> {
        self.admit(client)?;
        self.push(client, make());
        Ok(())
    }

    /// Gives back the place of an admitted query that was never queued.
    pub fn cancel(&mut self, client: IpAddr) {
        self.release(client);
    }

    /// The next item to run, if an exchange place is free: the first of
    /// the client whose turn it is.
    pub fn next_to_run(&mut self) -> Option<(IpAddr, T)> {
        if self.in_flight >= self.limits.in_flight {
            return None;
        }
        let client = self.turns.pop_front()?;
        let c = self.clients.get_mut(&client).expect("a client in turn");
        let item = c.queue.pop_front().expect("a client in turn has items");
        if !c.queue.is_empty() {
            self.turns.push_back(client);
        }
        self.in_flight += 1;
        Some((client, item))
    }

    /// An item [`next_to_run`](Fair::next_to_run) handed out has finished.
    pub fn done(&mut self, client: IpAddr) {
        self.in_flight -= 1;
        self.release(client);
    }

    fn release(&mut self, client: IpAddr) {
        self.held -= 1;
        if let Some(c) = self.clients.get_mut(&client) {
            c.held -= 1;
            if c.held == 0 {
                self.clients.remove(&client);
            }
        }
    }

    /// Queries held now, all clients.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Queries `client` holds now.
    pub fn held_by(&self, client: IpAddr) -> usize {
        self.clients.get(&client).map_or(0, |c| c.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(i: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, i])
    }

    const LIMITS: Limits = Limits {
        per_client: 4,
        held: 10,
        in_flight: 2,
    };

    /// A client that floods holds its share and no more; another client's
    /// query is still admitted, and served at the next free place, ahead
    /// of the flood's backlog.
    #[test]
    fn a_flooding_client_cannot_starve_another() {
        let mut f = Fair::new(LIMITS);
        let (flood, victim) = (host(10), host(20));
        let mut admitted = 0;
        for i in 0..1000 {
            match f.admit(flood) {
                Ok(()) => {
                    f.push(flood, i);
                    admitted += 1;
                }
                Err(r) => assert_eq!(r, Refused::Client),
            }
        }
        assert_eq!(admitted, LIMITS.per_client);
        // Two of the flood's run, two wait.
        let running: Vec<_> = std::iter::from_fn(|| f.next_to_run()).collect();
        assert_eq!(running, [(flood, 0), (flood, 1)]);
        // The victim is admitted, and queued behind one query of the
        // flood's, not behind its backlog (nor behind its next queries).
        f.admit(victim).unwrap();
        f.push(victim, 500);
        assert_eq!(f.next_to_run(), None, "no free place yet");
        f.done(flood);
        assert_eq!(f.next_to_run(), Some((flood, 2)));
        f.admit(flood).unwrap();
        f.push(flood, 4);
        f.done(flood);
        assert_eq!(f.next_to_run(), Some((victim, 500)));
        // The flood refills its share as places free, never beyond.
        f.admit(flood).unwrap();
        f.push(flood, 5);
        assert_eq!(f.admit(flood), Err(Refused::Client));
        assert_eq!(f.held_by(flood), 4);
        assert_eq!(f.held_by(victim), 1);
        f.done(victim);
        assert_eq!(f.next_to_run(), Some((flood, 3)));
        assert_eq!(f.held_by(victim), 0);
    }

    /// Busy clients are served in turn, one item each.
    #[test]
    fn queued_work_is_served_round_robin() {
        let mut f = Fair::new(Limits {
            per_client: 8,
            held: 100,
            in_flight: 1,
        });
        for (c, n) in [(host(1), 5), (host(2), 2), (host(3), 1)] {
            for i in 0..n {
                f.admit(c).unwrap();
                f.push(c, i);
            }
        }
        let mut order = Vec::new();
        while let Some((c, i)) = f.next_to_run() {
            order.push((c, i));
            f.done(c);
        }
        let want = [
            (host(1), 0),
            (host(2), 0),
            (host(3), 0),
            (host(1), 1),
            (host(2), 1),
            (host(1), 2),
            (host(1), 3),
            (host(1), 4),
        ];
        assert_eq!(order, want);
        assert_eq!(f.held(), 0);
        assert!(f.clients.is_empty(), "nothing kept for idle clients");
    }

    /// The total bound holds across clients; a cancelled admission and a
    /// finished item give their places back.
    #[test]
    fn the_total_is_bounded_and_places_come_back() {
        let mut f: Fair<u32> = Fair::new(LIMITS);
        for i in 0..10u8 {
            f.admit(host(i)).unwrap();
        }
        assert_eq!(f.admit(host(99)), Err(Refused::Full));
        f.cancel(host(3));
        assert_eq!(f.admit(host(99)), Ok(()));
        f.push(host(99), 7);
        assert_eq!(f.next_to_run(), Some((host(99), 7)));
        f.done(host(99));
        assert_eq!(f.held(), 9);
        assert_eq!(f.held_by(host(99)), 0);
    }

    /// `offer` queues an admitted item, makes none for a refused query,
    /// and refuses as `admit` does.
    #[test]
    fn an_offer_queues_only_what_is_admitted() {
        let mut f: Fair<u32> = Fair::new(LIMITS);
        for i in 0..4 {
            assert_eq!(f.offer(host(1), || i), Ok(()));
        }
        let refused = f.offer(host(1), || panic!("made for a refused query"));
        assert_eq!(refused, Err(Refused::Client));
        assert_eq!(f.held_by(host(1)), 4);
        assert_eq!(f.next_to_run(), Some((host(1), 0)));
        assert_eq!(f.next_to_run(), Some((host(1), 1)));
        assert_eq!(f.next_to_run(), None, "two in flight at most");
    }
}
