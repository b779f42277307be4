//! From WAN states and the config to what the datapath reads: the weighted
//! slot table of every policy, the `alive` flag of every WAN, and the policy
//! rules as per-dimension bit masks. Pure functions, unit-tested.
//!
//! Who takes new flows, for a set of WANs (the default policy: all WANs; a
//! `balance` rule: its list):
//! 1. candidates are WANs that are enabled, not drained, and `up` — or, when
//!    no such WAN is in the set, `degraded`;
//! 2. among them, the lowest tier wins;
//! 3. within it, each WAN gets slots in proportion to its weight.
//!
//! An ordered rule (`wans = [..]`) takes the first `up` WAN of its list (or
//! the first `degraded` one). A rule without candidates is inactive: its flows
//! fall back to the default policy in the datapath.
//!
//! A WAN whose allowance is used up ([`Allowance`]) is no candidate with
//! `quota_action = "off"`, and with `"backup"` only while no other WAN,
//! in any policy, is a candidate. Until its cycle ends its existing flows
//! stay, or (`quota_reset_flows`) move to the other WANs while it is kept
//! away from new ones.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use mwan_common::{
    Policy, DEFAULT_POLICY, MAX_POLICIES, MAX_RULES, POLICY_BALANCE, POLICY_MAIN, POLICY_ORDERED,
    PROTO_ICMPV6, SLOTS, WAN_NONE,
};

use crate::config::{Action, AllDown, Proto, Rule};

/// Health as far as balancing cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Up: takes new flows.
    Good,
    /// Degraded: takes new flows only when no good WAN is available.
    Degraded,
    /// Up or degraded, but passive health suspects it and a burst of
    /// probes is confirming: new flows only when no other WAN takes them.
    Suspected,
    /// Not proven yet (starting): existing pins stay, no new flows.
    Unknown,
    /// Down or disabled: pins move away.
    Bad,
}

/// One WAN as the policy compiler sees it.
#[derive(Clone, Debug)]
pub struct WanView {
    pub id: u8,
    pub name: String,
    pub weight: u32,
    pub tier: u32,
    pub health: Health,
    /// Administratively drained: no new flows, existing ones stay.
    pub drained: bool,
    /// What its allowance (`quota`) still allows.
    pub allowance: Allowance,
}

/// A WAN's allowance for this billing cycle, as balancing cares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Allowance {
    /// Within its quota, or none.
    #[default]
    Within,
    /// Used up, `quota_action = "backup"`: new flows only while no other
    /// WAN takes them. `reset`: its flows move away meanwhile.
    Backup { reset: bool },
    /// Used up, `quota_action = "off"`: no new flows.
    Off { reset: bool },
}

impl WanView {
    /// Whether the WAN can take new flows of its own (health, drain,
    /// allowance "off"), and how well: 0 up, 1 degraded.
    fn class(&self) -> Option<u8> {
        if self.drained || matches!(self.allowance, Allowance::Off { .. }) {
            return None;
        }
        match self.health {
            Health::Good => Some(0),
            Health::Degraded => Some(1),
            Health::Suspected => Some(2),
            Health::Unknown | Health::Bad => None,
        }
    }
}

/// The WANs of `wans` whose used-up allowance keeps them from new flows
/// now: all with `"off"`, those with `"backup"` while some WAN within its
/// allowance can take new flows.
pub fn held_back(wans: &[WanView]) -> BTreeSet<u8> {
    let others = wans
        .iter()
        .any(|w| w.allowance == Allowance::Within && w.class().is_some());
    wans.iter()
        .filter(|w| match w.allowance {
            Allowance::Within => false,
            Allowance::Backup { .. } => others,
            Allowance::Off { .. } => true,
        })
        .map(|w| w.id)
        .collect()
}

/// The WANs (id, weight) that take new flows in a set, by the rules above;
/// `held`: those a used-up allowance keeps away ([`held_back`]).
pub fn select<'a>(
    set: impl IntoIterator<Item = &'a WanView>,
    held: &BTreeSet<u8>,
) -> Vec<(u8, u32)> {
    let members: Vec<&WanView> = set
        .into_iter()
        .filter(|w| w.class().is_some() && !held.contains(&w.id))
        .collect();
    let best_class = match members.iter().filter_map(|w| w.class()).min() {
        Some(c) => c,
        None => return vec![],
    };
    let in_class: Vec<&&WanView> = members
        .iter()
        .filter(|w| w.class() == Some(best_class))
        .collect();
    let tier = in_class.iter().map(|w| w.tier).min().expect("non-empty");
    in_class
        .iter()
        .filter(|w| w.tier == tier)
        .map(|w| (w.id, w.weight))
        .collect()
}

/// Fills `SLOTS` slots in proportion to the weights (largest remainder), WANs
/// interleaved so any contiguous run of slots is also balanced.
pub fn slots_for(members: &[(u8, u32)]) -> [u8; SLOTS] {
    let mut slots = [WAN_NONE; SLOTS];
    let total: u64 = members.iter().map(|(_, w)| *w as u64).sum();
    if members.is_empty() || total == 0 {
        return slots;
    }
    // Quotas by largest remainder.
    let mut quota: Vec<(u8, usize, u64)> = members
        .iter()
        .map(|(id, w)| {
            let exact = (*w as u64) * SLOTS as u64;
            (*id, (exact / total) as usize, exact % total)
        })
        .collect();
    let assigned: usize = quota.iter().map(|q| q.1).sum();
    let mut order: Vec<usize> = (0..quota.len()).collect();
    order.sort_by(|a, b| quota[*b].2.cmp(&quota[*a].2).then(a.cmp(b)));
    for i in order.into_iter().take(SLOTS - assigned) {
        quota[i].1 += 1;
    }
    // Interleave: each slot goes to the WAN furthest behind its quota
    // (a deterministic weighted round robin).
    let mut given = vec![0usize; quota.len()];
    for (s, slot) in slots.iter_mut().enumerate() {
        let pos = (s + 1) as i64;
        let best = (0..quota.len())
            .filter(|i| given[*i] < quota[*i].1)
            .max_by(|a, b| {
                let lag = |i: usize| quota[i].1 as i64 * pos - (given[i] as i64) * SLOTS as i64;
                lag(*a).cmp(&lag(*b)).then(b.cmp(a))
            })
            .expect("quotas sum to SLOTS");
        given[best] += 1;
        *slot = quota[best].0;
    }
    slots
}

fn balance_policy(members: &[(u8, u32)]) -> Policy {
    let mut p = Policy::EMPTY;
    p.kind = POLICY_BALANCE;
    if !members.is_empty() {
        p.active = 1;
        p.slots = slots_for(members);
        p.wan_mask = members.iter().fold(0u64, |m, (id, _)| m | (1u64 << id));
    }
    p
}

/// What the datapath needs for a set of WAN states.
#[derive(Clone)]
pub struct Compiled {
    /// Index 0 is the default policy; rule `i` uses its stable id (see
    /// [`assign_rule_policies`]); every id up to `MAX_POLICIES` is present.
    pub policies: Vec<Policy>,
    /// `alive` per WAN view, in the order given.
    pub alive: Vec<(u8, bool)>,
    /// The WANs of the default policy: (id, weight). Also the balance route.
    pub default_members: Vec<(u8, u32)>,
    /// True when no WAN takes new flows and the last set was kept
    /// (`all_down = "last"`).
    pub all_down: bool,
}

/// Compiles policies: the default policy at index 0, rule `i`'s at
/// `policy_ids[i]`, unused ids empty (a flow of a removed rule falls back to
/// the default policy). `last_default` is the default policy's members from
/// the previous compile, used when every WAN is down under
/// `all_down = "last"`.
pub fn compile(
    wans: &[WanView],
    rules: &[Rule],
    policy_ids: &[u8],
    all_down: AllDown,
    last_default: &[(u8, u32)],
) -> Compiled {
    let by_name = |n: &String| wans.iter().find(|w| &w.name == n);
    let held = held_back(wans);
    let mut default_members = select(wans, &held);
    let mut everything_down = false;
    if default_members.is_empty() {
        everything_down = true;
        if all_down == AllDown::Last {
            default_members = last_default.to_vec();
        }
    }
    let mut policies = vec![Policy::EMPTY; MAX_POLICIES as usize];
    policies[DEFAULT_POLICY as usize] = balance_policy(&default_members);
    for (rule, id) in rules.iter().zip(policy_ids) {
        let p = match &rule.action {
            Action::Main => {
                let mut p = Policy::EMPTY;
                p.kind = POLICY_MAIN;
                p.active = 1;
                p
            }
            Action::Balance(list) => {
                balance_policy(&select(list.iter().filter_map(by_name), &held))
            }
            Action::Ordered(list) => {
                let views: Vec<&WanView> = list
                    .iter()
                    .filter_map(by_name)
                    .filter(|w| !held.contains(&w.id))
                    .collect();
                let first = [0u8, 1]
                    .iter()
                    .find_map(|class| views.iter().find(|w| w.class() == Some(*class)));
                let mut p = balance_policy(&first.map(|w| vec![(w.id, 1)]).unwrap_or_default());
                p.kind = POLICY_ORDERED;
                p
            }
        };
        policies[*id as usize] = p;
    }
    // A WAN kept in service while everything is down must stay alive, or
    // its pins would be re-chosen onto itself forever.
    let kept: BTreeSet<u8> = if everything_down {
        default_members.iter().map(|(id, _)| *id).collect()
    } else {
        BTreeSet::new()
    };
    // A WAN kept away by its allowance with `quota_reset_flows` is not
    // alive: its pins move and its connections are cleaned up.
    let resets = |w: &WanView| {
        held.contains(&w.id)
            && matches!(
                w.allowance,
                Allowance::Backup { reset: true } | Allowance::Off { reset: true }
            )
    };
    let alive = wans
        .iter()
        .map(|w| {
            let alive = (w.health != Health::Bad && !resets(w)) || kept.contains(&w.id);
            (w.id, alive)
        })
        .collect();
    Compiled {
        policies,
        alive,
        default_members,
        all_down: everything_down,
    }
}

/// Share (0..=1) of new flows each WAN gets under the default policy.
pub fn shares(policy: &Policy) -> Vec<(u8, f64)> {
    let mut counts = BTreeMap::new();
    if policy.active == 0 {
        return vec![];
    }
    for s in policy.slots.iter().filter(|s| **s != WAN_NONE) {
        *counts.entry(*s).or_insert(0usize) += 1;
    }
    counts
        .into_iter()
        .map(|(id, n)| (id, n as f64 / SLOTS as f64))
        .collect()
}

/// Policy rules as the datapath matches them: for every dimension, the set
/// of rules (bit i = rule i) that a packet value allows. The first matching
/// rule is the lowest bit of the intersection. The matching itself is tested
/// on the datapath, packet by packet (tests/tests/datapath).
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledRules {
    pub count: u32,
    /// Indexed by IP protocol number.
    pub proto: Vec<u64>,
    /// Indexed by port (host order).
    pub sport: Vec<u64>,
    pub dport: Vec<u64>,
    /// LPM entries (always including 0.0.0.0/0).
    pub src: Vec<(Ipv4Net, u64)>,
    pub dst: Vec<(Ipv4Net, u64)>,
    /// IPv6 LPM entries (always including ::/0).
    pub src6: Vec<(Ipv6Net, u64)>,
    pub dst6: Vec<(Ipv6Net, u64)>,
    /// Per LAN interface name; interfaces not listed use `any_iface`.
    pub iface: Vec<(String, u64)>,
    pub any_iface: u64,
    pub any_sport: u64,
    pub any_dport: u64,
    /// Policy index of each rule.
    pub actions: Vec<u32>,
    /// Whether each rule matches now (its schedule): an inactive rule has
    /// no bit in any `proto` entry, so it never matches; its policy stays
    /// (the flows it placed re-choose with it).
    pub active: Vec<bool>,
}

/// A prefix of one family, as the rule prefixes of that family's trie.
trait FamilyNet: Ord + Copy {
    /// The whole address space (`0.0.0.0/0`, `::/0`).
    fn any() -> Self;
    /// `n` if it is of this family.
    fn of(n: &IpNet) -> Option<Self>;
    fn contains(&self, other: &Self) -> bool;
}

impl FamilyNet for Ipv4Net {
    fn any() -> Self {
        Ipv4Net::default()
    }
    fn of(n: &IpNet) -> Option<Self> {
        match n {
            IpNet::V4(n) => Some(*n),
            IpNet::V6(_) => None,
        }
    }
    fn contains(&self, other: &Self) -> bool {
        Ipv4Net::contains(self, other)
    }
}

impl FamilyNet for Ipv6Net {
    fn any() -> Self {
        Ipv6Net::default()
    }
    fn of(n: &IpNet) -> Option<Self> {
        match n {
            IpNet::V6(n) => Some(*n),
            IpNet::V4(_) => None,
        }
    }
    fn contains(&self, other: &Self) -> bool {
        Ipv6Net::contains(self, other)
    }
}

/// The LPM entries of one address dimension of family `N`. A rule is
/// unconstrained (its bit in every entry, the whole space included) when
/// `field` is empty and `learned` is false for it: a rule by domain name
/// without `dst` matches only the destinations learned for it
/// (`DOMAIN_DST`), none by prefix. A rule whose `field` lists prefixes of
/// the other family only has no bit here: it never matches this family.
fn prefix_masks<N: FamilyNet>(
    rules: &[Rule],
    field: impl Fn(&Rule) -> &Vec<IpNet>,
    learned: impl Fn(&Rule) -> bool,
) -> Vec<(N, u64)> {
    let unconstrained = rules
        .iter()
        .enumerate()
        .filter(|(_, r)| field(r).is_empty() && !learned(r))
        .fold(0u64, |m, (i, _)| m | (1 << i));
    let of_family = |r: &Rule| -> Vec<N> { field(r).iter().filter_map(N::of).collect() };
    let mut prefixes: BTreeSet<N> = rules.iter().flat_map(of_family).collect();
    prefixes.insert(N::any());
    // The longest matching prefix P must allow every rule that has a prefix
    // containing P: any rule prefix covering the address is either P itself,
    // shorter than P (so it contains P), or longer — impossible, since it
    // would then be the longest match.
    prefixes
        .into_iter()
        .map(|p| {
            let m = rules.iter().enumerate().fold(unconstrained, |m, (i, r)| {
                if of_family(r).iter().any(|q| q.contains(&p)) {
                    m | (1 << i)
                } else {
                    m
                }
            });
            (p, m)
        })
        .collect()
}

fn port_masks(
    rules: &[Rule],
    field: impl Fn(&Rule) -> &Vec<crate::config::PortRange>,
) -> (Vec<u64>, u64) {
    let mut any = 0u64;
    let mut table = vec![0u64; 65536];
    for (i, r) in rules.iter().enumerate() {
        let bit = 1u64 << i;
        if field(r).is_empty() {
            any |= bit;
            continue;
        }
        for range in field(r) {
            for p in range.first..=range.last {
                table[p as usize] |= bit;
            }
        }
    }
    for v in table.iter_mut() {
        *v |= any;
    }
    (table, any)
}

/// Stable policy ids for the rules, by name: a rule keeps the id it had in
/// `previous` (flows it pinned record that id, and re-choose with it when
/// their WAN dies, whatever the rules' order is after a reload); a new
/// rule takes the lowest id in `1..=MAX_RULES` that no rule holds,
/// preferring ids `previous` did not use (a removed rule's flows then fall
/// back to the default policy instead of landing on another rule's).
pub fn assign_rule_policies(rules: &[Rule], previous: &BTreeMap<String, u8>) -> Vec<u8> {
    let mut taken = BTreeSet::new();
    let mut ids: Vec<Option<u8>> = rules
        .iter()
        .map(|r| {
            let id = previous
                .get(&r.name)
                .copied()
                .filter(|id| (1..=MAX_RULES as u8).contains(id) && !taken.contains(id))?;
            taken.insert(id);
            Some(id)
        })
        .collect();
    let used_before: BTreeSet<u8> = previous.values().copied().collect();
    for slot in ids.iter_mut().filter(|s| s.is_none()) {
        let free = |id: &u8| !taken.contains(id);
        let id = (1..=MAX_RULES as u8)
            .filter(free)
            .find(|id| !used_before.contains(id))
            .or_else(|| (1..=MAX_RULES as u8).find(free))
            .expect("config validation bounds the rule count");
        taken.insert(id);
        *slot = Some(id);
    }
    ids.into_iter().map(|i| i.expect("assigned")).collect()
}

/// Compiles the rules' match tables; rule `i` selects policy
/// `policy_ids[i]` (see [`assign_rule_policies`]) and matches only while
/// `active[i]` (its schedule is on). Bit `i` stays rule `i`'s whether it is
/// active or not (`DOMAIN_DST` masks index the rules by position).
pub fn compile_rules(rules: &[Rule], policy_ids: &[u8], active: &[bool]) -> CompiledRules {
    assert!(rules.len() <= 64, "config validation bounds the rule count");
    assert_eq!(rules.len(), policy_ids.len(), "one policy id per rule");
    assert_eq!(rules.len(), active.len(), "one activity per rule");
    let bit = |i: usize| 1u64 << i;
    let mut proto = vec![0u64; 256];
    for (i, r) in rules.iter().enumerate() {
        if !active[i] {
            continue;
        }
        if r.protos.is_empty() {
            proto.iter_mut().for_each(|m| *m |= bit(i));
        } else {
            for p in &r.protos {
                proto[p.number() as usize] |= bit(i);
                // `icmp` is ICMP for IPv4 and ICMPv6 for IPv6.
                if *p == Proto::Icmp {
                    proto[PROTO_ICMPV6 as usize] |= bit(i);
                }
            }
        }
    }
    let (sport, any_sport) = port_masks(rules, |r| &r.src_ports);
    let (dport, any_dport) = port_masks(rules, |r| &r.dst_ports);
    let any_iface = rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.lan_interfaces.is_empty())
        .fold(0u64, |m, (i, _)| m | bit(i));
    let names: BTreeSet<&String> = rules.iter().flat_map(|r| r.lan_interfaces.iter()).collect();
    let iface = names
        .into_iter()
        .map(|n| {
            let m = rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.lan_interfaces.contains(n))
                .fold(any_iface, |m, (i, _)| m | bit(i));
            (n.clone(), m)
        })
        .collect();
    CompiledRules {
        count: rules.len() as u32,
        proto,
        sport,
        dport,
        src: prefix_masks(rules, |r| &r.src, |_| false),
        // The destination of a rule by domain name is what DNS answers
        // taught (`DOMAIN_DST`, ORed in by the classifier), plus its `dst`
        // prefixes if it has any: the union.
        dst: prefix_masks(rules, |r| &r.dst, |r| !r.domains.is_empty()),
        src6: prefix_masks(rules, |r| &r.src, |_| false),
        dst6: prefix_masks(rules, |r| &r.dst, |r| !r.domains.is_empty()),
        iface,
        any_iface,
        any_sport,
        any_dport,
        actions: policy_ids.iter().map(|id| *id as u32).collect(),
        active: active.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn view(id: u8, weight: u32, tier: u32, health: Health) -> WanView {
        WanView {
            id,
            name: format!("isp{}", id + 1),
            weight,
            tier,
            health,
            drained: false,
            allowance: Allowance::Within,
        }
    }

    fn share_of(p: &Policy, id: u8) -> f64 {
        p.slots.iter().filter(|s| **s == id).count() as f64 / SLOTS as f64
    }

    #[test]
    fn slots_follow_weights_closely() {
        for weights in [
            vec![1, 1],
            vec![3, 1],
            vec![5, 3, 2],
            vec![1000, 1],
            vec![7, 11, 13, 17],
        ] {
            let members: Vec<(u8, u32)> = weights
                .iter()
                .enumerate()
                .map(|(i, w)| (i as u8, *w))
                .collect();
            let total: u32 = weights.iter().sum();
            let p = balance_policy(&members);
            for (id, w) in &members {
                let want = *w as f64 / total as f64;
                let got = share_of(&p, *id);
                assert!(
                    (got - want).abs() <= 1.0 / SLOTS as f64,
                    "{weights:?} wan {id}: {got} vs {want}"
                );
            }
            assert!(p.slots.iter().all(|s| *s != WAN_NONE));
        }
    }

    #[test]
    fn slots_are_interleaved() {
        let s = slots_for(&[(0, 1), (1, 1)]);
        // Any 8 consecutive slots hold both WANs.
        assert!(s.windows(8).all(|w| w.contains(&0) && w.contains(&1)));
    }

    #[test]
    fn lowest_tier_wins_and_backup_takes_over() {
        let mut wans = vec![view(0, 10, 1, Health::Good), view(1, 1, 2, Health::Good)];
        let none = BTreeSet::new();
        assert_eq!(select(&wans, &none), vec![(0, 10)]);
        wans[0].health = Health::Bad;
        assert_eq!(select(&wans, &none), vec![(1, 1)]);
        wans[0].health = Health::Good;
        assert_eq!(select(&wans, &none), vec![(0, 10)]);
    }

    #[test]
    fn degraded_only_when_nothing_better() {
        let none = BTreeSet::new();
        let mut wans = vec![view(0, 1, 1, Health::Degraded), view(1, 1, 1, Health::Good)];
        assert_eq!(select(&wans, &none), vec![(1, 1)]);
        // A good backup tier beats a degraded primary.
        wans[1].tier = 2;
        assert_eq!(select(&wans, &none), vec![(1, 1)]);
        wans[1].health = Health::Bad;
        assert_eq!(select(&wans, &none), vec![(0, 1)]);
    }

    #[test]
    fn a_suspected_wan_takes_new_flows_only_when_no_other_does_and_stays_alive() {
        let none = BTreeSet::new();
        let mut wans = vec![
            view(0, 1, 1, Health::Suspected),
            view(1, 1, 2, Health::Good),
        ];
        assert_eq!(select(&wans, &none), vec![(1, 1)], "the backup tier");
        wans[1].health = Health::Degraded;
        assert_eq!(select(&wans, &none), vec![(1, 1)]);
        wans[1].health = Health::Bad;
        assert_eq!(select(&wans, &none), vec![(0, 1)], "alone, it keeps them");
        let c = compile(&wans, &[], &[], AllDown::Last, &[]);
        assert_eq!(c.alive, vec![(0, true), (1, false)], "its pins stay");
    }

    #[test]
    fn drained_and_unknown_take_no_new_flows_but_stay_alive() {
        let mut wans = vec![view(0, 1, 1, Health::Good), view(1, 1, 1, Health::Unknown)];
        wans[0].drained = true;
        let c = compile(&wans, &[], &[], AllDown::Last, &[]);
        assert!(c.all_down);
        assert_eq!(c.alive, vec![(0, true), (1, true)]);
        assert_eq!(c.policies[0].active, 0);
    }

    #[test]
    fn all_down_keeps_last_set_alive_or_goes_unreachable() {
        let wans = vec![view(0, 1, 1, Health::Bad), view(1, 1, 1, Health::Bad)];
        let last = vec![(1u8, 1u32)];
        let c = compile(&wans, &[], &[], AllDown::Last, &last);
        assert!(c.all_down);
        assert_eq!(c.default_members, last);
        assert_eq!(c.alive, vec![(0, false), (1, true)]);
        assert_eq!(share_of(&c.policies[0], 1), 1.0);
        let c = compile(&wans, &[], &[], AllDown::Unreachable, &last);
        assert!(c.default_members.is_empty());
        assert_eq!(c.policies[0].active, 0);
        assert_eq!(c.alive, vec![(0, false), (1, false)]);
    }

    /// A used-up allowance: "backup" takes new flows only while no other
    /// WAN can, in every policy; "off" none; with `reset`, its pins move
    /// while it is kept away.
    #[test]
    fn a_used_up_allowance_keeps_a_wan_back() {
        let c = config_with_rules(
            "[[rule]]\nname = \"lte-only\"\nwans = [\"isp2\"]\n[[rule]]\nname = \"both\"\nbalance = [\"isp1\", \"isp2\"]\n",
        );
        let ids = positions(&c.rules);
        let mut wans = vec![view(0, 1, 1, Health::Good), view(1, 1, 1, Health::Good)];
        wans[1].allowance = Allowance::Backup { reset: false };
        let comp = compile(&wans, &c.rules, &ids, AllDown::Last, &[]);
        assert_eq!(share_of(&comp.policies[0], 0), 1.0);
        // The rule naming only isp2 is inactive: its flows take the default.
        assert_eq!(comp.policies[1].active, 0);
        assert_eq!(share_of(&comp.policies[2], 0), 1.0);
        assert_eq!(comp.alive, vec![(0, true), (1, true)], "its flows stay");
        assert!(!comp.all_down);
        // The other WAN dies: the backup takes everything again.
        wans[0].health = Health::Bad;
        let comp = compile(&wans, &c.rules, &ids, AllDown::Last, &[]);
        assert_eq!(share_of(&comp.policies[0], 1), 1.0);
        assert_eq!(share_of(&comp.policies[1], 1), 1.0);
        // A drained other WAN takes no new flows either.
        wans[0].health = Health::Good;
        wans[0].drained = true;
        let comp = compile(&wans, &c.rules, &ids, AllDown::Last, &[]);
        assert_eq!(share_of(&comp.policies[0], 1), 1.0);
        wans[0].drained = false;
        // With reset: held back and not alive (its flows move).
        wans[1].allowance = Allowance::Backup { reset: true };
        let comp = compile(&wans, &c.rules, &ids, AllDown::Last, &[]);
        assert_eq!(comp.alive, vec![(0, true), (1, false)]);
        // "off": no new flows even when nothing else is up.
        wans[1].allowance = Allowance::Off { reset: false };
        wans[0].health = Health::Bad;
        let comp = compile(&wans, &c.rules, &ids, AllDown::Unreachable, &[]);
        assert!(comp.all_down);
        assert_eq!(comp.alive, vec![(0, false), (1, true)]);
        // Two used-up backups and nothing else: both take flows.
        let both = vec![
            WanView {
                allowance: Allowance::Backup { reset: true },
                ..view(0, 1, 1, Health::Good)
            },
            WanView {
                allowance: Allowance::Backup { reset: true },
                ..view(1, 1, 1, Health::Good)
            },
        ];
        assert!(held_back(&both).is_empty());
        let comp = compile(&both, &[], &[], AllDown::Last, &[]);
        assert_eq!(comp.alive, vec![(0, true), (1, true)]);
    }

    /// A rule outside its schedule has no bit in any protocol entry, so it
    /// never matches; the bits of the others stay where they were.
    #[test]
    fn an_inactive_rule_matches_nothing_and_keeps_its_position() {
        let c = config_with_rules(TUTORIAL);
        let ids = positions(&c.rules);
        let all = compile_rules(&c.rules, &ids, &[true; 4]);
        let off = compile_rules(&c.rules, &ids, &[true, false, true, true]);
        assert_eq!(all.proto[6] & 0b10, 0b10);
        assert!(off.proto.iter().all(|m| m & 0b10 == 0));
        for (a, o) in all.proto.iter().zip(&off.proto) {
            assert_eq!(a & !0b10, *o);
        }
        assert_eq!(
            (all.dport.clone(), all.actions.clone()),
            (off.dport.clone(), off.actions.clone())
        );
        assert_eq!(off.active, vec![true, false, true, true]);
    }

    fn config_with_rules(rules: &str) -> Config {
        Config::parse(&format!(
            r#"lan_interfaces = ["lan0", "lan1"]
probe_targets = ["198.51.100.1"]
[[wan]]
name = "isp1"
interface = "wan1"
gateway = "100.64.1.1"
[[wan]]
name = "isp2"
interface = "wan2"
gateway = "100.64.2.1"
{rules}"#
        ))
        .unwrap()
    }

    const TUTORIAL: &str = r#"
[[rule]]
name = "web"
proto = ["tcp", "udp"]
dst_ports = [80, 443, 53]
wans = ["isp1", "isp2"]
[[rule]]
name = "mail"
proto = "tcp"
dst_ports = [25, 110, 143, 465, 587, 993, 995]
wans = ["isp2", "isp1"]
[[rule]]
name = "backup-subnet"
src = ["192.0.2.128/25"]
wans = ["isp2"]
[[rule]]
name = "vpn"
dst = ["198.51.100.0/24"]
main = true
"#;

    /// Policy ids as a fresh daemon assigns them: rule `i` gets `i + 1`.
    fn positions(rules: &[Rule]) -> Vec<u8> {
        assign_rule_policies(rules, &BTreeMap::new())
    }

    /// Rules with these names (the action does not matter here).
    fn named(names: &[&str]) -> Vec<Rule> {
        let text: String = names
            .iter()
            .map(|n| format!("[[rule]]\nname = \"{n}\"\nmain = true\n"))
            .collect();
        config_with_rules(&text).rules
    }

    #[test]
    fn rule_policy_ids_follow_the_rule_not_its_position() {
        let none = BTreeMap::new();
        assert_eq!(
            assign_rule_policies(&named(&["web", "mail", "vpn"]), &none),
            vec![1, 2, 3]
        );
        let before: BTreeMap<String, u8> = [("web", 1), ("mail", 2), ("vpn", 3)]
            .map(|(n, i)| (n.to_string(), i))
            .into();
        // Reordered: each rule keeps its id.
        assert_eq!(
            assign_rule_policies(&named(&["vpn", "web", "mail"]), &before),
            vec![3, 1, 2]
        );
        // "mail" removed, "games" added first: games avoids mail's id.
        assert_eq!(
            assign_rule_policies(&named(&["games", "web", "vpn"]), &before),
            vec![4, 1, 3]
        );
        // Only when every id was used is a freed one reused.
        let full: BTreeMap<String, u8> = (1..=MAX_RULES as u8)
            .map(|i| (format!("r{i}"), i))
            .collect();
        assert_eq!(
            assign_rule_policies(&named(&["r7", "new"]), &full),
            vec![7, 1]
        );
    }

    #[test]
    fn ordered_rules_take_first_eligible() {
        let c = config_with_rules(TUTORIAL);
        let mut wans = vec![view(0, 1, 1, Health::Good), view(1, 1, 1, Health::Good)];
        let comp = compile(&wans, &c.rules, &positions(&c.rules), AllDown::Last, &[]);
        assert_eq!(comp.policies.len(), MAX_POLICIES as usize);
        assert_eq!(comp.policies[5].active, 0);
        assert_eq!(comp.policies[1].kind, POLICY_ORDERED);
        assert_eq!(share_of(&comp.policies[1], 0), 1.0);
        assert_eq!(share_of(&comp.policies[2], 1), 1.0);
        assert_eq!(comp.policies[4].kind, POLICY_MAIN);
        // Mail falls back to isp1 while isp2 is down, the subnet rule goes
        // inactive (datapath falls back to the default policy).
        wans[1].health = Health::Bad;
        let comp = compile(&wans, &c.rules, &positions(&c.rules), AllDown::Last, &[]);
        assert_eq!(share_of(&comp.policies[2], 0), 1.0);
        assert_eq!(comp.policies[3].active, 0);
    }

    #[test]
    fn domain_rules_have_no_bit_in_the_any_destination_entry() {
        let c = config_with_rules(
            r#"
[[rule]]
name = "gov"
domains = ["gov.example"]
wans = ["isp2"]
[[rule]]
name = "gov-or-net"
domains = ["gov.example"]
dst = ["198.51.100.0/24"]
wans = ["isp2"]
[[rule]]
name = "any"
proto = "tcp"
wans = ["isp1"]
"#,
        );
        let r = compile_rules(&c.rules, &positions(&c.rules), &vec![true; c.rules.len()]);
        let dst: BTreeMap<String, u64> = r.dst.iter().map(|(n, m)| (n.to_string(), *m)).collect();
        // Rule 0 (domains only): no prefix at all; rule 1: its prefix only;
        // rule 2 (no dst, no domains): everywhere.
        assert_eq!(dst["0.0.0.0/0"], 0b100);
        assert_eq!(dst["198.51.100.0/24"], 0b110);
        assert_eq!(dst.len(), 2);
        // Other dimensions are not affected by domains.
        assert!(r.src.iter().all(|(_, m)| *m == 0b111));
    }

    #[test]
    fn a_rule_with_prefixes_of_one_family_matches_only_that_family() {
        let c = config_with_rules(
            r#"
[[rule]]
name = "v4-dst"
dst = ["198.51.100.0/24"]
wans = ["isp2"]
[[rule]]
name = "v6-dst"
dst = ["2001:db8:ff::/48"]
wans = ["isp2"]
[[rule]]
name = "both-src"
src = ["192.0.2.0/24", "2001:db8:1::/64"]
wans = ["isp2"]
[[rule]]
name = "ping"
proto = "icmp"
wans = ["isp1"]
"#,
        );
        let r = compile_rules(&c.rules, &positions(&c.rules), &vec![true; c.rules.len()]);
        let map = |v: Vec<(String, u64)>| v.into_iter().collect::<BTreeMap<String, u64>>();
        let dst4 = map(r.dst.iter().map(|(n, m)| (n.to_string(), *m)).collect());
        let dst6 = map(r.dst6.iter().map(|(n, m)| (n.to_string(), *m)).collect());
        let src4 = map(r.src.iter().map(|(n, m)| (n.to_string(), *m)).collect());
        let src6 = map(r.src6.iter().map(|(n, m)| (n.to_string(), *m)).collect());
        // Rules 2 and 3 have no dst: everywhere in both families; rule 0
        // only under its IPv4 prefix, rule 1 only under its IPv6 one.
        assert_eq!(dst4["0.0.0.0/0"], 0b1100);
        assert_eq!(dst4["198.51.100.0/24"], 0b1101);
        assert_eq!(dst4.len(), 2);
        assert_eq!(dst6["::/0"], 0b1100);
        assert_eq!(dst6["2001:db8:ff::/48"], 0b1110);
        assert_eq!(dst6.len(), 2);
        // Rule 2's sources in both families; the others anywhere.
        assert_eq!(src4["0.0.0.0/0"], 0b1011);
        assert_eq!(src4["192.0.2.0/24"], 0b1111);
        assert_eq!(src6["::/0"], 0b1011);
        assert_eq!(src6["2001:db8:1::/64"], 0b1111);
        // `icmp` is ICMP and ICMPv6.
        assert_eq!(r.proto[1] & 0b1000, 0b1000);
        assert_eq!(r.proto[PROTO_ICMPV6 as usize] & 0b1000, 0b1000);
        assert_eq!(r.proto[6] & 0b1000, 0);
    }
}
