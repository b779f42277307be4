//! The addresses learned for rules by domain name, with their expiry: the
//! userspace side of the datapath's `DOMAIN_DST` map (destination → mask of
//! the rules whose names resolved to it). IPv4 (A records) and IPv6 (AAAA
//! records) alike: the table is one, the writer picks the map by family.
//!
//! The kernel map holds only the mask; this table holds, per address and
//! rule, when the learning expires, and tells the caller what to write:
//! a new mask for an address, or its deletion when no rule holds it any
//! more. An entry lives for the answer's TTL (the smallest of the CNAME
//! chain and the address record), at least [`TTL_FLOOR`], plus [`GRACE`];
//! learning it again pushes the expiry out (never in). Expiry is per rule,
//! so an address learned for two rules' names keeps the one whose answer is
//! still fresh.
//!
//! Why a floor: answers with a TTL of 0 or 1 s (load balancers, CDNs) would
//! expire before the client has even connected; why a grace: stub resolvers
//! and applications keep using an address a little past its TTL (they
//! cached it when the TTL had not run out, or count from a later moment).
//! Connections already pinned do not depend on the entry at all: the flow
//! map keeps them on their WAN until they end.
//!
//! The table is bounded by [`DOMAIN_DST_CAPACITY`], the map's size, per
//! family (the IPv4 and the IPv6 map each hold that many): an address
//! beyond it is not learned (its connections are balanced) and counted in
//! [`AddressTable::refused`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use mwan_common::DOMAIN_DST_CAPACITY;

/// The shortest life of a learned address, whatever the answer's TTL
/// (default of `domain_ttl_floor`).
pub const TTL_FLOOR: Duration = Duration::from_secs(60);
/// Added to every life, for clients that use an address a little past its
/// TTL (default of `domain_ttl_grace`).
pub const GRACE: Duration = Duration::from_secs(30);

/// How long an answer with `ttl` seconds keeps its addresses learned, with
/// the default floor and grace.
pub fn lifetime(ttl: u32) -> Duration {
    lifetime_with(ttl, TTL_FLOOR, GRACE)
}

pub fn lifetime_with(ttl: u32, floor: Duration, grace: Duration) -> Duration {
    Duration::from_secs(ttl as u64).max(floor) + grace
}

/// One change to write into `DOMAIN_DST`: the address's new mask, or `None`
/// to delete it.
pub type Change = (IpAddr, Option<u64>);

/// Where learned-address changes go: the datapath's `DOMAIN_DST` and
/// `DOMAIN_DST6` (`datapath::DomainMaps`), whose one handle the daemon
/// lends to the relay while it runs.
pub trait LearnedSink: Send + 'static {
    /// Writes `changes`; when it returns, the classifier's next lookup sees
    /// them (so the answer that taught them may be released).
    fn apply(&mut self, changes: &[Change]) -> anyhow::Result<()>;
    /// Forgets every learned address.
    fn clear(&mut self) -> anyhow::Result<()>;
}

/// What is learned, per address and rule (bit index), with expiry times
/// (nanoseconds of the caller's monotonic clock).
#[derive(Debug, Default)]
pub struct AddressTable {
    entries: HashMap<IpAddr, BTreeMap<u8, u64>>,
    /// The name whose answer last taught each address (for `mwan domains`).
    names: HashMap<IpAddr, Box<str>>,
    /// (expiry, address, rule), possibly stale (an entry learned again later
    /// has a newer expiry): checked against `entries` when popped.
    queue: BinaryHeap<Reverse<(u64, IpAddr, u8)>>,
    /// Per family: the IPv4 and the IPv6 map each hold this many.
    capacity: usize,
    /// Learned addresses per family (IPv4, IPv6).
    counts: [usize; 2],
    floor: Duration,
    grace: Duration,
    /// Addresses not learned because the table was full.
    pub refused: u64,
}

impl AddressTable {
    pub fn new() -> AddressTable {
        AddressTable::with_capacity(DOMAIN_DST_CAPACITY as usize)
    }

    pub fn with_capacity(capacity: usize) -> AddressTable {
        AddressTable {
            capacity,
            floor: TTL_FLOOR,
            grace: GRACE,
            ..Default::default()
        }
    }

    /// Lives of `floor` at least, plus `grace` (`domain_ttl_floor`,
    /// `domain_ttl_grace`).
    pub fn with_lifetime(mut self, floor: Duration, grace: Duration) -> AddressTable {
        self.floor = floor;
        self.grace = grace;
        self
    }

    /// Learns `addr` for the rules of `mask` (bit *i*: rule *i*) from an
    /// answer of `ttl` seconds at `now_ns`. Returns the change to write
    /// before the answer is released (`None`: the map already holds the
    /// right mask, only expiries moved).
    pub fn learn(
        &mut self,
        addr: IpAddr,
        mask: u64,
        ttl: u32,
        now_ns: u64,
        name: &str,
    ) -> Option<Change> {
        if mask == 0 {
            return None;
        }
        if !self.entries.contains_key(&addr) {
            if self.counts[family(addr)] >= self.capacity {
                self.refused += 1;
                return None;
            }
            self.counts[family(addr)] += 1;
        }
        let life = lifetime_with(ttl, self.floor, self.grace);
        let expires = now_ns.saturating_add(life.as_nanos() as u64);
        if self.names.get(&addr).map(|n| &**n) != Some(name) {
            self.names.insert(addr, name.into());
        }
        let rules = self.entries.entry(addr).or_default();
        let before = mask_of(rules);
        for rule in (0..64u8).filter(|r| mask & (1 << r) != 0) {
            let e = rules.entry(rule).or_insert(0);
            if expires > *e {
                *e = expires;
                self.queue.push(Reverse((expires, addr, rule)));
            }
        }
        let after = mask_of(rules);
        (after != before).then_some((addr, Some(after)))
    }

    /// Drops what expired at `now_ns`; returns the changes to write.
    pub fn expire(&mut self, now_ns: u64) -> Vec<Change> {
        let mut touched = Vec::new();
        while let Some(Reverse((at, addr, rule))) = self.queue.peek().copied() {
            if at > now_ns {
                break;
            }
            self.queue.pop();
            let Some(rules) = self.entries.get_mut(&addr) else {
                continue;
            };
            // Stale queue item: the entry was learned again since.
            if rules.get(&rule) != Some(&at) {
                continue;
            }
            rules.remove(&rule);
            touched.push(addr);
        }
        touched.sort();
        touched.dedup();
        touched
            .into_iter()
            .map(|addr| {
                let mask = self.entries.get(&addr).map(mask_of).unwrap_or(0);
                if mask == 0 {
                    self.entries.remove(&addr);
                    self.counts[family(addr)] -= 1;
                    self.names.remove(&addr);
                    (addr, None)
                } else {
                    (addr, Some(mask))
                }
            })
            .collect()
    }

    /// When the next entry expires, if any (for the caller's timer).
    pub fn next_expiry(&self) -> Option<u64> {
        self.queue.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The mask held for `addr` (0: not learned).
    pub fn mask(&self, addr: IpAddr) -> u64 {
        self.entries.get(&addr).map(mask_of).unwrap_or(0)
    }

    /// Every learned address with the name that last taught it, its rules
    /// and their expiry times.
    pub fn iter(&self) -> impl Iterator<Item = (IpAddr, &str, &BTreeMap<u8, u64>)> {
        self.entries
            .iter()
            .map(|(a, r)| (*a, self.names.get(a).map(|n| &**n).unwrap_or(""), r))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Index of `addr`'s family in [`AddressTable::counts`].
fn family(addr: IpAddr) -> usize {
    usize::from(addr.is_ipv6())
}

fn mask_of(rules: &BTreeMap<u8, u64>) -> u64 {
    rules.keys().fold(0, |m, r| m | (1u64 << r))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn a(last: u8) -> IpAddr {
        IpAddr::from([198, 51, 100, last])
    }

    fn a6(last: u16) -> IpAddr {
        IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, last])
    }

    /// IPv6 addresses (AAAA answers) are learned and expire like IPv4
    /// ones; an IPv4 and an IPv6 address of one name are separate entries,
    /// and each family has the capacity of its own map.
    #[test]
    fn ipv6_addresses_are_learned_and_expire_like_ipv4() {
        let mut t = AddressTable::with_capacity(1);
        assert_eq!(
            t.learn(a6(1), 0b1, 0, 0, "x.example"),
            Some((a6(1), Some(0b1)))
        );
        assert_eq!(
            t.learn(a(1), 0b1, 600, 0, "x.example"),
            Some((a(1), Some(0b1)))
        );
        assert_eq!(t.mask(a6(1)), 0b1);
        assert_eq!(t.learn(a6(2), 0b1, 0, 0, "x.example"), None);
        assert_eq!(t.learn(a(2), 0b1, 0, 0, "x.example"), None);
        assert_eq!(t.refused, 2);
        assert_eq!(t.expire(90 * S), vec![(a6(1), None)]);
        assert_eq!(t.mask(a(1)), 0b1);
        // The IPv6 place is free again; IPv4's is still taken.
        assert!(t.learn(a6(2), 0b1, 0, 100 * S, "x.example").is_some());
        assert_eq!(t.learn(a(2), 0b1, 0, 100 * S, "x.example"), None);
        let mut addrs: Vec<IpAddr> = t.iter().map(|(a, _, _)| a).collect();
        addrs.sort();
        assert_eq!(addrs, [a(1), a6(2)]);
    }

    #[test]
    fn lifetime_has_a_floor_and_a_grace() {
        assert_eq!(lifetime(0), Duration::from_secs(90));
        assert_eq!(lifetime(59), Duration::from_secs(90));
        assert_eq!(lifetime(300), Duration::from_secs(330));
    }

    #[test]
    fn an_address_expires_after_its_lifetime_and_not_before() {
        let mut t = AddressTable::new();
        assert_eq!(
            t.learn(a(1), 0b1, 0, 0, "x.example"),
            Some((a(1), Some(0b1)))
        );
        assert_eq!(t.next_expiry(), Some(90 * S));
        assert_eq!(t.expire(90 * S - 1), vec![]);
        assert_eq!(t.mask(a(1)), 0b1);
        assert_eq!(t.expire(90 * S), vec![(a(1), None)]);
        assert_eq!(t.mask(a(1)), 0);
        assert!(t.is_empty());
        assert_eq!(t.next_expiry(), None);
    }

    #[test]
    fn learning_again_extends_never_shortens_and_writes_nothing() {
        let mut t = AddressTable::new();
        t.learn(a(1), 0b1, 600, 0, "x.example");
        // The same mask: no write.
        assert_eq!(t.learn(a(1), 0b1, 0, 10 * S, "x.example"), None);
        // The earlier, longer life still holds.
        assert_eq!(t.expire(600 * S), vec![]);
        assert_eq!(t.expire(630 * S), vec![(a(1), None)]);
        // AddressTable again later: the expiry moves out.
        t.learn(a(2), 0b1, 0, 0, "x.example");
        t.learn(a(2), 0b1, 0, 80 * S, "x.example");
        assert_eq!(t.expire(100 * S), vec![]);
        assert_eq!(t.expire(170 * S), vec![(a(2), None)]);
    }

    #[test]
    fn rules_expire_one_by_one() {
        let mut t = AddressTable::new();
        assert_eq!(
            t.learn(a(1), 0b01, 0, 0, "x.example"),
            Some((a(1), Some(0b01)))
        );
        assert_eq!(
            t.learn(a(1), 0b10, 600, 0, "x.example"),
            Some((a(1), Some(0b11)))
        );
        assert_eq!(t.expire(90 * S), vec![(a(1), Some(0b10))]);
        assert_eq!(t.mask(a(1)), 0b10);
        assert_eq!(t.expire(630 * S), vec![(a(1), None)]);
    }

    #[test]
    fn a_full_table_refuses_new_addresses_only() {
        let mut t = AddressTable::with_capacity(2);
        assert!(t.learn(a(1), 1, 0, 0, "x.example").is_some());
        assert!(t.learn(a(2), 1, 0, 0, "x.example").is_some());
        assert_eq!(t.learn(a(3), 1, 0, 0, "x.example"), None);
        assert_eq!(t.refused, 1);
        // A known address still learns another rule.
        assert_eq!(
            t.learn(a(2), 0b100, 0, 0, "x.example"),
            Some((a(2), Some(0b101)))
        );
        assert_eq!(t.len(), 2);
        // Room again once one expired.
        assert_eq!(t.expire(90 * S).len(), 2);
        assert!(t.learn(a(3), 1, 0, 100 * S, "x.example").is_some());
    }

    #[test]
    fn floor_and_grace_are_configurable() {
        let mut t = AddressTable::new().with_lifetime(Duration::from_secs(1), Duration::ZERO);
        t.learn(a(1), 1, 0, 0, "x.example");
        assert_eq!(t.next_expiry(), Some(S));
        let names: Vec<&str> = t.iter().map(|(_, n, _)| n).collect();
        assert_eq!(names, ["x.example"]);
    }

    #[test]
    fn a_mask_without_rules_learns_nothing() {
        let mut t = AddressTable::new();
        assert_eq!(t.learn(a(1), 0, 300, 0, "x.example"), None);
        assert!(t.is_empty());
    }
}
