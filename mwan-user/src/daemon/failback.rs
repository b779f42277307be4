//! When a returning WAN's flows are drained back (`failback = "drain"`):
//! the outages of each WAN's families, and the drains they make due once
//! the WAN has been back for `failback_after` without failing again. Pure
//! bookkeeping, an input of the daemon; the drain itself is `drain`'s.
//!
//! An outage starts when a family's pins are invalidated (the apply's
//! `died`) and ends when they are valid again (`revived`). A WAN that fails
//! again before its drain is due has not been stable: the drain is
//! cancelled and the outage goes on from its first failure, so the next
//! return drains what went to the backups since then. Times are monotonic
//! (a wall-clock jump moves nothing); the outage's bounds are also kept in
//! the datapath's clock (`bpf_ktime`), which dates the flows.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::family::Family;

#[derive(Debug, Default)]
pub struct Failback {
    outages: BTreeMap<(u8, Family), Outage>,
}

#[derive(Clone, Copy, Debug)]
struct Outage {
    /// When the family died, `bpf_ktime` ns (0: unknown, before this
    /// daemon).
    down_ns: u64,
    /// Back since (`bpf_ktime` ns), and when the drain is due.
    back: Option<(u64, Instant)>,
}

/// A drain that is due: WAN `id`'s family `family`, for the outage from
/// `window.0` to `window.1` (`bpf_ktime` ns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Due {
    pub id: u8,
    pub family: Family,
    pub window: (u64, u64),
}

impl Failback {
    /// WAN `id`'s `family` died at `now_ns`.
    pub fn died(&mut self, id: u8, family: Family, now_ns: u64) {
        let o = self.outages.entry((id, family)).or_insert(Outage {
            down_ns: now_ns,
            back: None,
        });
        o.back = None;
    }

    /// WAN `id`'s `family` is back at `now` (`now_ns`): its drain is due
    /// after `after`, if it was down while this daemon watched (or was down
    /// when it took over). Returns whether a drain is pending.
    pub fn revived(
        &mut self,
        id: u8,
        family: Family,
        now: Instant,
        now_ns: u64,
        after: Duration,
    ) -> bool {
        match self.outages.get_mut(&(id, family)) {
            Some(o) => {
                o.back = Some((now_ns, now + after));
                true
            }
            None => false,
        }
    }

    /// The drains due at `now`; their outages are over.
    pub fn due(&mut self, now: Instant) -> Vec<Due> {
        let due: Vec<Due> = self
            .outages
            .iter()
            .filter_map(|(&(id, family), o)| {
                let (up_ns, at) = o.back?;
                (at <= now).then_some(Due {
                    id,
                    family,
                    window: (o.down_ns, up_ns),
                })
            })
            .collect();
        for d in &due {
            self.outages.remove(&(d.id, d.family));
        }
        due
    }

    /// When the next drain is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.outages
            .values()
            .filter_map(|o| o.back.map(|b| b.1))
            .min()
    }

    /// When WAN `id`'s next drain is due, if one is pending.
    pub fn pending(&self, id: u8) -> Option<Instant> {
        self.outages
            .iter()
            .filter(|((i, _), _)| *i == id)
            .filter_map(|(_, o)| o.back.map(|b| b.1))
            .min()
    }

    /// Forgets the WANs `keep` says no longer drain (removed, or another
    /// `failback` after a reload).
    pub fn retain(&mut self, keep: impl Fn(u8) -> bool) {
        self.outages.retain(|(id, _), _| keep(*id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_drain_is_due_after_the_wan_was_back_long_enough() {
        let t0 = Instant::now();
        let mut f = Failback::default();
        assert!(
            !f.revived(0, Family::Ipv4, t0, 5, 30 * S),
            "no outage seen: a start"
        );
        f.died(0, Family::Ipv4, 100);
        assert!(f.revived(0, Family::Ipv4, t0 + 10 * S, 200, 30 * S));
        assert_eq!(f.next_due(), Some(t0 + 40 * S));
        assert_eq!(f.pending(0), Some(t0 + 40 * S));
        assert!(f.due(t0 + 39 * S).is_empty(), "not before failback_after");
        assert_eq!(
            f.due(t0 + 40 * S),
            vec![Due {
                id: 0,
                family: Family::Ipv4,
                window: (100, 200)
            }]
        );
        assert!(f.due(t0 + 100 * S).is_empty(), "once");
        assert_eq!(f.next_due(), None);
    }

    #[test]
    fn a_wan_that_fails_again_is_not_stable_and_its_outage_goes_on() {
        let t0 = Instant::now();
        let mut f = Failback::default();
        f.died(1, Family::Ipv6, 100);
        f.revived(1, Family::Ipv6, t0, 200, 30 * S);
        f.died(1, Family::Ipv6, 300);
        assert_eq!(f.next_due(), None, "cancelled");
        f.revived(1, Family::Ipv6, t0 + 20 * S, 400, 30 * S);
        assert!(f.due(t0 + 40 * S).is_empty());
        assert_eq!(
            f.due(t0 + 50 * S)[0].window,
            (100, 400),
            "from the first failure"
        );
        // Families are apart.
        f.died(1, Family::Ipv4, 500);
        f.revived(1, Family::Ipv4, t0, 600, S);
        f.retain(|id| id != 1);
        assert_eq!(f.next_due(), None, "forgotten with its WAN");
    }
}
