//! One WAN at run time: its config, id, what the kernel says about its link,
//! its health (a machine and a prober per address family) and the admin
//! overrides.

use std::net::IpAddr;
use std::time::{Instant, SystemTime};

use crate::config::{self, Gateway, Ipv6Mode, Prefix6};
use crate::family::{Family, PerFamily};
use crate::health::passive::Detector;
use crate::health::{HealthStats, Machine, ProbeSpec, State, Transition};
use crate::nft::Nat6;
use crate::policy::{Allowance, Health, WanView};
use crate::routing::Nexthop;
use ipnet::{IpNet, Ipv6Net};
use mwan_common::MAX_WANS;

pub struct WanRt {
    pub cfg: config::Wan,
    pub id: u8,
    pub mark: u32,
    pub table: u32,
    /// What netlink reported last.
    pub link: LinkInfo,
    /// Health per family: IPv4's judged by the IPv4 probe targets, IPv6's
    /// by the IPv6 ones. A family without targets follows the other
    /// family's state (see [`WanRt::state`]).
    pub health: PerFamily<FamilyHealth>,
    /// Runtime overrides (`mwan set-weight`, `drain`), reset by a reload to
    /// what the config says. (`mwan disable` is the machines' `disabled`
    /// state.) Without a weight override, the weight is the config's (or
    /// its weight schedule's).
    pub weight_override: Option<u32>,
    pub drained: bool,
    /// Probe and state-change totals for the metrics (both families).
    pub stats: HealthStats,
}

/// One family's health of a WAN.
pub struct FamilyHealth {
    pub machine: Machine,
    /// The wall-clock time of the machine's last transition (status).
    pub since: SystemTime,
    /// The passive judgment of the family's own handshakes (fed by the
    /// daemon's passive timer).
    pub passive: Detector,
}

impl FamilyHealth {
    fn new(cfg: &config::HealthConfig, initial: State) -> FamilyHealth {
        FamilyHealth {
            machine: Machine::new(cfg, initial, Instant::now()),
            since: SystemTime::now(),
            passive: Detector::new(cfg.passive),
        }
    }
}

/// The kernel's view of a WAN's link.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    pub ifindex: Option<u32>,
    pub admin_up: bool,
    pub carrier: bool,
    /// The WAN's addresses: IPv4, its primary address (at most one); IPv6,
    /// the link's global addresses (read only for a WAN whose `ipv6` is
    /// not "off").
    pub addrs: PerFamily<Vec<IpNet>>,
    /// The next hop: `gateway` (fixed, or learned from the kernel), and
    /// `gateway6` (fixed, or the router learned from RAs).
    pub nexthop: PerFamily<Option<Nexthop>>,
}

impl LinkInfo {
    /// Why the link cannot carry traffic, if it cannot.
    pub fn unusable_reason(&self, cfg: &config::Wan) -> Option<String> {
        if self.ifindex.is_none() {
            return Some(format!("interface {} does not exist", cfg.interface));
        }
        if !self.admin_up {
            return Some(format!(
                "interface {} is administratively down",
                cfg.interface
            ));
        }
        if !self.carrier {
            return Some(format!("interface {} has no carrier", cfg.interface));
        }
        if cfg.gateway == Gateway::None {
            // An uplink with only IPv6 is usable once it is ready for it.
            if !self.ipv6_ready(cfg) {
                return Some(format!(
                    "no IPv6 address or gateway6 on {} yet (an uplink without IPv4)",
                    cfg.interface
                ));
            }
            return None;
        }
        if self.addrs[Family::Ipv4].is_empty() {
            return Some(format!("interface {} has no IPv4 address", cfg.interface));
        }
        if self.nexthop[Family::Ipv4].is_none() {
            return Some(match cfg.gateway {
                Gateway::Auto => format!(
                    "no default route learned on {} yet (gateway = \"auto\")",
                    cfg.interface
                ),
                Gateway::Fixed(g) => format!("gateway {g} unusable"),
                Gateway::None => unreachable!("handled above"),
            });
        }
        None
    }

    /// The global IPv6 addresses.
    pub fn addrs6(&self) -> impl Iterator<Item = Ipv6Net> + '_ {
        self.addrs[Family::Ipv6].iter().filter_map(|a| match a {
            IpNet::V6(a) => Some(*a),
            IpNet::V4(_) => None,
        })
    }

    /// The WAN's prefix of NPT: `prefix6`, or with "auto" the prefix of
    /// the link's first global address at `lan_prefix6`'s length.
    pub fn prefix6(&self, cfg: &config::Wan) -> Option<Ipv6Net> {
        match cfg.ipv6 {
            Ipv6Mode::Npt {
                prefix: Prefix6::Fixed(p),
                ..
            } => Some(p),
            Ipv6Mode::Npt {
                prefix: Prefix6::Auto,
                lan_prefix,
            } => self
                .addrs6()
                .next()
                .and_then(|a| Ipv6Net::new(a.addr(), lan_prefix.prefix_len()).ok())
                .map(|p| p.trunc()),
            _ => None,
        }
    }

    /// Whether the link has what IPv6 through the WAN needs: `ipv6` on, a
    /// next hop, an address, and for NPT the prefix.
    pub fn ipv6_ready(&self, cfg: &config::Wan) -> bool {
        cfg.ipv6 != Ipv6Mode::Off
            && self.nexthop[Family::Ipv6].is_some()
            && !self.addrs[Family::Ipv6].is_empty()
            && (!matches!(cfg.ipv6, Ipv6Mode::Npt { .. }) || self.prefix6(cfg).is_some())
    }

    /// The WAN's IPv6 NAT in mwan's nftables table.
    pub fn nat6(&self, cfg: &config::Wan) -> Nat6 {
        match cfg.ipv6 {
            Ipv6Mode::Off => Nat6::None,
            Ipv6Mode::Nat => Nat6::Masquerade,
            Ipv6Mode::Npt { lan_prefix, .. } => match self.prefix6(cfg) {
                Some(wan) => Nat6::Prefix {
                    lan: lan_prefix,
                    wan,
                },
                None => Nat6::None,
            },
        }
    }

    /// The addresses of the WAN's connections in conntrack: its IPv4
    /// address and global IPv6 addresses.
    pub fn own_addresses(&self) -> Vec<IpAddr> {
        self.addrs.values().flatten().map(|a| a.addr()).collect()
    }

    /// The next hop as status and the logs show it: the gateway's address,
    /// or `dev IFACE` for a point-to-point link without one.
    pub fn gateway_text(&self, cfg: &config::Wan) -> Option<String> {
        self.nexthop[Family::Ipv4].map(|n| match n.gateway {
            Some(g) => g.to_string(),
            None => format!("dev {}", cfg.interface),
        })
    }
}

impl WanRt {
    /// `initial[f]`: the state each family starts in (see the daemon's
    /// start).
    pub fn new(
        cfg: config::Wan,
        id: u8,
        mark: u32,
        table_base: u32,
        initial: PerFamily<State>,
    ) -> WanRt {
        assert!((id as u32) < MAX_WANS);
        let initial = initial.map(|_, s| if cfg.enabled { s } else { State::Disabled });
        WanRt {
            stats: HealthStats::new(&cfg.health.targets),
            health: initial.map(|_, s| FamilyHealth::new(&cfg.health, s)),
            weight_override: None,
            cfg,
            id,
            mark,
            table: table_base + id as u32,
            link: LinkInfo::default(),
            drained: false,
        }
    }

    pub fn family(&self, f: Family) -> &FamilyHealth {
        &self.health[f]
    }

    pub fn family_mut(&mut self, f: Family) -> &mut FamilyHealth {
        &mut self.health[f]
    }

    /// Whether family `f` has probe targets here: a WAN without IPv6 (or
    /// without IPv4) ignores that family's targets of a top-level list.
    fn has_targets(&self, f: Family) -> bool {
        self.carries(f) && self.cfg.health.targets.iter().any(|t| t.family() == f)
    }

    /// Whether the WAN has family `f` at all (by its config).
    pub fn carries(&self, f: Family) -> bool {
        match f {
            Family::Ipv4 => self.cfg.gateway != Gateway::None,
            Family::Ipv6 => self.has_ipv6(),
        }
    }

    /// The family whose machine judges family `f`: `f` itself, or the
    /// other family when the WAN has no probe target of `f`.
    pub fn judged_by(&self, f: Family) -> Family {
        if !self.has_targets(f) && self.has_targets(f.other()) {
            f.other()
        } else {
            f
        }
    }

    /// Family `f`'s health state.
    pub fn state(&self, f: Family) -> State {
        self.family(self.judged_by(f)).machine.state()
    }

    /// Whether passive health suspects family `f` (its judge's machine):
    /// new flows avoid the WAN while a burst confirms.
    pub fn suspected(&self, f: Family) -> bool {
        self.family(self.judged_by(f)).machine.suspected()
    }

    /// Disabled (by the config or `mwan disable`: both families).
    pub fn disabled(&self) -> bool {
        self.state(Family::Ipv4) == State::Disabled
    }

    /// Whether the WAN carries IPv6 at all (`ipv6` is not "off").
    pub fn has_ipv6(&self) -> bool {
        self.cfg.ipv6 != Ipv6Mode::Off
    }

    pub fn probe_spec(&self, f: Family) -> Option<ProbeSpec> {
        let h = &self.cfg.health;
        let (targets, quorum) = h.targets_of(f);
        if !self.has_targets(f) {
            return None;
        }
        Some(ProbeSpec {
            wan: self.id as usize,
            family: f,
            name: self.cfg.name.clone(),
            interface: self.cfg.interface.clone(),
            mark: self.mark,
            targets,
            interval: h.interval,
            timeout: h.timeout,
            quorum,
        })
    }

    /// The probers the WAN should run: one per family it has targets of,
    /// while it is enabled.
    pub fn probers(&self) -> Vec<ProbeSpec> {
        if self.disabled() {
            return Vec::new();
        }
        Family::BOTH
            .into_iter()
            .filter_map(|f| self.probe_spec(f))
            .collect()
    }

    /// Feeds a link change to both families' machines.
    pub fn on_link(
        &mut self,
        usable: bool,
        reason: &str,
        now: Instant,
    ) -> Vec<(Family, Transition)> {
        self.each_machine(|m| m.on_link(usable, reason, now))
    }

    /// Family `f`'s path changed (a new address): see [`Machine::renew`].
    pub fn renew(&mut self, f: Family, reason: &str, now: Instant) -> Vec<(Family, Transition)> {
        if self.judged_by(f) != f {
            return Vec::new();
        }
        self.family_mut(f)
            .machine
            .renew(reason, now)
            .map(|t| vec![(f, t)])
            .unwrap_or_default()
    }

    /// Disables or enables the WAN (both families).
    pub fn set_disabled(&mut self, disabled: bool, now: Instant) -> Vec<(Family, Transition)> {
        self.each_machine(|m| m.set_disabled(disabled, now))
    }

    pub fn set_health_config(&mut self, cfg: &config::HealthConfig) {
        for (_, h) in self.health.iter_mut() {
            h.machine.set_config(cfg);
            h.passive.set_config(cfg.passive);
        }
        self.stats.set_targets(&cfg.targets);
    }

    fn each_machine(
        &mut self,
        mut f: impl FnMut(&mut Machine) -> Option<Transition>,
    ) -> Vec<(Family, Transition)> {
        // Only the machines that judge a family: a family without probe
        // targets follows the other's, and its own machine stays idle.
        let judging: Vec<Family> = Family::BOTH
            .into_iter()
            .filter(|fa| self.judged_by(*fa) == *fa)
            .collect();
        judging
            .into_iter()
            .filter_map(|fa| f(&mut self.family_mut(fa).machine).map(|t| (fa, t)))
            .collect()
    }

    /// The weight at `week_secs` (local time): `mwan set-weight`'s, else
    /// its weight schedule's in force, else the config's; and where it is
    /// from.
    pub fn weight_at(&self, week_secs: u32) -> (u32, WeightSource) {
        if let Some(w) = self.weight_override {
            return (w, WeightSource::Override);
        }
        match self.cfg.weight_at(week_secs) {
            (w, Some(s)) => (w, WeightSource::Schedule(s.schedule.to_string())),
            (w, None) => (w, WeightSource::Config),
        }
    }

    /// The WAN as family `f`'s policy compiler sees it at `week_secs`
    /// (local time, for its weight schedule), with `allowance`. A WAN
    /// without IPv6, or whose link is not ready for it (no address or
    /// gateway yet), takes no IPv6 flows.
    pub fn view(&self, f: Family, week_secs: u32, allowance: Allowance) -> WanView {
        let carries = match f {
            Family::Ipv4 => self.carries(f),
            Family::Ipv6 => self.link.ipv6_ready(&self.cfg),
        };
        WanView {
            id: self.id,
            name: self.cfg.name.clone(),
            weight: self.weight_at(week_secs).0,
            tier: self.cfg.tier,
            health: match self.state(f) {
                _ if !carries => Health::Bad,
                _ if self.suspected(f) => Health::Suspected,
                State::Up => Health::Good,
                State::Degraded => Health::Degraded,
                State::Unknown => Health::Unknown,
                State::Down | State::Disabled => Health::Bad,
            },
            drained: self.drained,
            allowance,
        }
    }
}

/// Where a WAN's weight is from now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightSource {
    Config,
    /// A `[[wan.weight_schedule]]` in force (its schedule).
    Schedule(String),
    /// `mwan set-weight`.
    Override,
}

/// How many WAN ids `mark_mask` can number: id `i` uses mark
/// `(i + 1) << shift`, which must stay inside the mask (and below
/// [`MAX_WANS`]).
pub fn id_capacity(mark_mask: u32) -> usize {
    let marks = mark_mask >> mark_mask.trailing_zeros();
    (marks as usize).min(MAX_WANS as usize)
}

/// Stable WAN ids below `capacity` (see [`id_capacity`]): a WAN with a
/// configured id (`fixed[i]`, validated below `capacity` and unique) takes
/// it; another keeps the id recorded in the pinned `WAN_NAMES` (its flows
/// refer to it) unless a configured id claims it; new WANs take the lowest
/// id that no configured WAN holds. `pinned[i]` is the name recorded for
/// id `i`.
pub fn assign_ids(
    names: &[&str],
    fixed: &[Option<u8>],
    pinned: &[Option<String>],
    capacity: usize,
) -> Vec<u8> {
    let capacity = capacity.min(MAX_WANS as usize);
    let mut taken = vec![false; capacity];
    let mut ids = vec![None; names.len()];
    for (i, f) in fixed.iter().enumerate().take(names.len()) {
        if let Some(id) = f.filter(|id| usize::from(*id) < capacity) {
            ids[i] = Some(id);
            taken[usize::from(id)] = true;
        }
    }
    for (i, n) in names.iter().enumerate() {
        if ids[i].is_some() {
            continue;
        }
        if let Some(id) = pinned
            .iter()
            .take(capacity)
            .position(|p| p.as_deref() == Some(*n))
            .filter(|id| !taken[*id])
        {
            ids[i] = Some(id as u8);
            taken[id] = true;
        }
    }
    // Prefer ids no pinned WAN used: a removed WAN's stale flows then never
    // land on a new WAN's id by accident.
    let pinned_used = |id: usize| pinned.get(id).map(|p| p.is_some()).unwrap_or(false);
    for slot in ids.iter_mut().filter(|s| s.is_none()) {
        let id = (0..capacity)
            .find(|id| !taken[*id] && !pinned_used(*id))
            .or_else(|| (0..capacity).find(|id| !taken[*id]))
            .expect("config validation bounds the number of WANs by the mark mask");
        taken[id] = true;
        *slot = Some(id as u8);
    }
    ids.into_iter().map(|i| i.expect("assigned")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wan6(extra: &str) -> config::Wan {
        let text = format!(
            "lan_interfaces = [\"lan0\"]\nprobe_targets = [\"192.0.2.1\"]\n[[wan]]\nname = \"a\"\ninterface = \"w0\"\ngateway = \"auto\"\n{extra}\n"
        );
        config::Config::parse(&text).unwrap().wans.remove(0)
    }

    /// What the daemon derives from a WAN's IPv6 link state: the NPT
    /// prefix (fixed, or the address's at lan_prefix6's length), the NAT
    /// of the nftables table, and readiness.
    #[test]
    fn ipv6_link_state() {
        let npt_auto = wan6(
            "gateway6 = \"auto\"\nipv6 = \"npt\"\nprefix6 = \"auto\"\nlan_prefix6 = \"fd00:1::/56\"",
        );
        let mut link = LinkInfo::default();
        assert_eq!(link.prefix6(&npt_auto), None);
        assert_eq!(link.nat6(&npt_auto), Nat6::None);
        link.addrs[Family::Ipv6] = vec!["2001:db8:a2:5:1::9/64".parse().unwrap()];
        assert_eq!(
            link.prefix6(&npt_auto),
            Some("2001:db8:a2::/56".parse().unwrap())
        );
        assert_eq!(
            link.nat6(&npt_auto),
            Nat6::Prefix {
                lan: "fd00:1::/56".parse().unwrap(),
                wan: "2001:db8:a2::/56".parse().unwrap()
            }
        );
        assert!(!link.ipv6_ready(&npt_auto), "no next hop yet");
        link.nexthop[Family::Ipv6] = Some(Nexthop {
            gateway: Some("fe80::1".parse().unwrap()),
            ifindex: 3,
        });
        assert!(link.ipv6_ready(&npt_auto));
        assert_eq!(
            link.own_addresses(),
            vec!["2001:db8:a2:5:1::9".parse::<IpAddr>().unwrap()]
        );

        let nat = wan6("gateway6 = \"fe80::1\"");
        assert_eq!(link.nat6(&nat), Nat6::Masquerade);
        assert!(link.ipv6_ready(&nat));
        let off = wan6("");
        assert_eq!(link.nat6(&off), Nat6::None);
        assert!(!link.ipv6_ready(&off), "no IPv6 configured");
    }

    #[test]
    fn ids_are_stable_across_restarts_and_reloads() {
        const ALL: usize = MAX_WANS as usize;
        assert_eq!(assign_ids(&["a", "b", "c"], &[], &[], ALL), vec![0, 1, 2]);
        let pinned = vec![
            Some("a".to_string()),
            Some("b".to_string()),
            Some("c".to_string()),
        ];
        // b removed, d added: d must not inherit b's id (b's flows must move).
        assert_eq!(
            assign_ids(&["c", "a", "d"], &[], &pinned, ALL),
            vec![2, 0, 3]
        );
        // Reordered config keeps ids.
        assert_eq!(assign_ids(&["b", "a"], &[], &pinned, ALL), vec![1, 0]);
        // When every id was used once, a free one is reused.
        let full: Vec<Option<String>> = (0..MAX_WANS).map(|i| Some(format!("w{i}"))).collect();
        assert_eq!(assign_ids(&["w3", "new"], &[], &full, ALL), vec![3, 0]);
    }

    /// Configured ids win over the pinned ones (an HA pair's routers must
    /// agree); the WAN that held a claimed id gets a free one.
    #[test]
    fn configured_ids_are_taken_first() {
        const ALL: usize = MAX_WANS as usize;
        assert_eq!(
            assign_ids(&["a", "b"], &[Some(5), None], &[], ALL),
            vec![5, 0]
        );
        let pinned = vec![Some("a".to_string()), Some("b".to_string())];
        assert_eq!(
            assign_ids(&["a", "b"], &[None, Some(0)], &pinned, ALL),
            vec![2, 0]
        );
        assert_eq!(
            assign_ids(&["a", "b"], &[Some(1), Some(0)], &pinned, ALL),
            vec![1, 0]
        );
    }

    /// `mark_mask = "0x300"` numbers three WANs (marks 0x100, 0x200,
    /// 0x300): replacing one on reload reuses the freed id rather than
    /// handing out id 3 (mark 0x400, outside the mask).
    #[test]
    fn ids_stay_within_the_mark_mask() {
        assert_eq!(id_capacity(0x300), 3);
        assert_eq!(id_capacity(0x00ff_0000), MAX_WANS as usize);
        assert_eq!(id_capacity(0x1), 1);
        let pinned = vec![
            Some("a".to_string()),
            Some("b".to_string()),
            Some("c".to_string()),
        ];
        assert_eq!(assign_ids(&["a", "b", "d"], &[], &pinned, 3), vec![0, 1, 2]);
        // A pinned id the mask no longer numbers is not kept.
        assert_eq!(assign_ids(&["c", "a"], &[], &pinned, 2), vec![1, 0]);
    }
}
