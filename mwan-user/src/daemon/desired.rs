//! What mwan should have put in the kernel and running at this moment: one
//! [`Desired`] value, a pure function ([`desired`]) of the daemon's inputs
//! (the config, each WAN's link and health per family, the admin's
//! overrides, the host's addresses and LAN links, and the little the daemon
//! remembers between two computations). Nothing here touches the kernel;
//! `apply` makes the kernel match it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::{IpNet, Ipv6Net};
use mwan_common::{Policy, Settings, WanEntry, WanIface, MAX_WANS};

use super::wan::WanRt;
use crate::clock::LocalTime;
use crate::config::{AllDown, Config, Gateway6, Ipv6Mode};
use crate::datapath::{self, ConntrackAccess};
use crate::family::{Family, PerFamily};
use crate::health::ProbeSpec;
use crate::nft::NftWan;
use crate::policy::{self, Allowance, CompiledRules};
use crate::routing::{self, Nexthop, RuleSpec};
use crate::sysctl;

/// What the daemon knows of the host beyond its WANs: read from netlink.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Host {
    /// Every address of the host (local addresses and, through their
    /// prefix length, the connected prefixes), per family.
    pub addrs: PerFamily<Vec<IpNet>>,
    /// The configured LAN interfaces that exist: (ifindex, has an
    /// Ethernet header).
    pub lans: BTreeMap<String, LanLink>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LanLink {
    pub ifindex: u32,
    pub l2: bool,
}

/// The daemon's inputs, borrowed for one computation.
pub struct Inputs<'a> {
    pub cfg: &'a Config,
    pub wans: &'a [WanRt],
    pub host: &'a Host,
    /// The policy id of each rule, by name (stable across reloads and
    /// restarts: pins record it).
    pub rule_policies: &'a BTreeMap<String, u8>,
    /// Per family, the default policy's members when some WAN last took
    /// new flows (`all_down = "last"` keeps them).
    pub last_default: &'a PerFamily<Vec<(u8, u32)>>,
    /// How the loaded datapath reads a connection's recorded WAN.
    pub conntrack: ConntrackAccess,
    /// The local time: rules and weights by schedule.
    pub clock: &'a LocalTime,
    /// What each WAN's allowance allows, by id (absent: within it).
    pub allowances: &'a BTreeMap<u8, Allowance>,
}

/// Everything mwan puts in the kernel and runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// `WAN_NAMES`, by id.
    pub names: Vec<Option<String>>,
    /// The per-family maps and routes.
    pub families: PerFamily<FamilyDesired>,
    /// The rule maps, `SETTINGS`, and the LAN ifindexes `RULE_IFACE` uses.
    pub rules: CompiledRules,
    pub settings: Settings,
    pub rule_ifaces: BTreeMap<String, u32>,
    /// Each WAN table's default route, by (family, table).
    pub tables: BTreeMap<(Family, u32), TableRoute>,
    /// mwan's ip rules of both families.
    pub ip_rules: Vec<RuleSpec>,
    pub nft: NftSpec,
    pub sysctls: SysctlSpec,
    /// The DNS relay of rules by domain name, while a rule has domains.
    pub relay: Option<RelaySpec>,
    /// The probers to run, by (WAN id, family).
    pub probers: BTreeMap<(u8, Family), ProberSpec>,
    /// The LAN interfaces the classifier is attached to: name → link
    /// (`None`: the interface does not exist, which refuses the start).
    pub lans: BTreeMap<String, Option<LanLink>>,
    /// The WAN interfaces that exist, with the program that marks what
    /// arrives on them: name → (ifindex, `WAN_IFACES` entry).
    pub wan_filters: BTreeMap<String, (u32, WanIface)>,
    /// How each WAN's connections are known in conntrack (for the cleanup
    /// when it dies), by id.
    pub conns: BTreeMap<u8, WanConns>,
}

/// One family's part of the datapath and of the routes.
#[derive(Clone, Debug, PartialEq)]
pub struct FamilyDesired {
    /// `WANS` / `WANS6`, by id (ids without a WAN: zero).
    pub wans: Vec<WanEntry>,
    /// `POLICIES` / `POLICIES6`: the default policy at 0, the rules' at
    /// their ids.
    pub policies: Vec<Policy>,
    /// `BYPASS` / `BYPASS6`.
    pub bypass: Vec<IpNet>,
    /// The balance table's route (the router's own traffic).
    pub balance: Balance,
    /// No WAN takes new flows of this family.
    pub all_down: bool,
    /// The default policy's members (what `last_default` remembers).
    pub default_members: Vec<(u8, u32)>,
}

/// A WAN table's default route: the link's next hop, and whether the link
/// is usable (while it is not, the kernel may refuse the route, and drops
/// it without telling; see `apply`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableRoute {
    pub nexthop: Option<Nexthop>,
    pub usable: bool,
}

/// The balance table of a family: a multipath default route, or
/// `unreachable` when refusing, or nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Balance {
    pub nexthops: Vec<(Nexthop, u32)>,
    pub unreachable: bool,
}

/// mwan's nftables table (see `nft::ruleset`); the divert's ports are the
/// running relay's, known once it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftSpec {
    pub wans: Vec<NftWan>,
    pub mark_mask: u32,
    /// LAN interfaces whose new connections are refused (every WAN down
    /// under `all_down = "unreachable"`).
    pub refuse_from: Vec<String>,
    /// LAN interfaces whose DNS queries go to the relay (while it runs).
    pub divert_from: Option<Vec<String>>,
    /// nftables restores every packet's mark from its connection's
    /// (a datapath that cannot read conntrack itself).
    pub restore: bool,
}

/// The sysctls mwan sets, and the interfaces they depend on: a WAN
/// interface that appears (or is re-created) gets its settings then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysctlSpec {
    pub settings: Vec<(String, String)>,
    /// Keys of WAN interfaces: not setting one (the interface does not
    /// exist yet) is a warning, not a failure.
    pub per_interface: Vec<String>,
    /// The WAN interfaces' ifindexes (`None`: missing).
    pub interfaces: Vec<Option<u32>>,
    /// WANs with IPv6, for the forwarding warning.
    pub ipv6_interfaces: Vec<String>,
}

/// What the relay needs: the rules' names (bit *i* is rule *i*), the
/// expiry, and the LAN interfaces it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelaySpec {
    pub domains: Vec<Vec<String>>,
    pub lans: Vec<String>,
    pub ttl_floor: Duration,
    pub ttl_grace: Duration,
}

/// A prober, and the interface instance it opened its sockets on: a
/// re-created interface (PPP redial) needs a new prober.
#[derive(Clone, Debug, PartialEq)]
pub struct ProberSpec {
    pub spec: ProbeSpec,
    pub ifindex: Option<u32>,
}

/// The addresses by which a WAN's connections are known in conntrack (NAT
/// to its address, inbound to it, NPT to its prefix) and its mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WanConns {
    pub id: u8,
    pub name: String,
    pub mark: u32,
    pub addrs: Vec<IpAddr>,
    pub prefix6: Option<Ipv6Net>,
}

/// The desired state for `inputs`.
pub fn desired(inputs: &Inputs) -> Desired {
    let cfg = inputs.cfg;
    let families = PerFamily::new(|f| family(inputs, f));
    let refusing = families[Family::Ipv4].all_down && cfg.all_down == AllDown::Unreachable;
    let families = families.map(|f, mut d| {
        d.balance.unreachable = refusing && (f == Family::Ipv4 || has_ipv6(inputs.wans));
        d
    });
    let ids: Vec<u8> = cfg
        .rules
        .iter()
        .map(|r| inputs.rule_policies[&r.name])
        .collect();
    let week = inputs.clock.week_secs();
    let active: Vec<bool> = cfg
        .rules
        .iter()
        .map(|r| r.schedule.as_ref().is_none_or(|s| s.active_at(week)))
        .collect();
    let rules = policy::compile_rules(&cfg.rules, &ids, &active);
    let settings = datapath::settings(cfg, &rules, rules.count);
    let mut names = vec![None; MAX_WANS as usize];
    for w in inputs.wans {
        names[w.id as usize] = Some(w.cfg.name.clone());
    }
    Desired {
        names,
        families,
        rule_ifaces: inputs
            .host
            .lans
            .iter()
            .map(|(n, l)| (n.clone(), l.ifindex))
            .collect(),
        rules,
        settings,
        tables: tables(inputs.wans),
        ip_rules: ip_rules(cfg, inputs.wans, refusing),
        nft: nft(cfg, inputs.wans, refusing, inputs.conntrack),
        sysctls: sysctls(inputs.wans),
        relay: cfg.has_domain_rules().then(|| RelaySpec {
            domains: cfg.rules.iter().map(|r| r.domains.clone()).collect(),
            lans: cfg.lan_interfaces.clone(),
            ttl_floor: cfg.domain_ttl_floor,
            ttl_grace: cfg.domain_ttl_grace,
        }),
        probers: probers(inputs.wans),
        lans: cfg
            .lan_interfaces
            .iter()
            .map(|n| (n.clone(), inputs.host.lans.get(n).copied()))
            .collect(),
        wan_filters: inputs
            .wans
            .iter()
            .filter_map(|w| {
                let entry = WanIface {
                    mark: w.mark,
                    id: w.id.into(),
                };
                Some((w.cfg.interface.clone(), (w.link.ifindex?, entry)))
            })
            .collect(),
        conns: inputs
            .wans
            .iter()
            .map(|w| {
                let c = WanConns {
                    id: w.id,
                    name: w.cfg.name.clone(),
                    mark: w.mark,
                    addrs: w.link.own_addresses(),
                    prefix6: w.link.prefix6(&w.cfg),
                };
                (w.id, c)
            })
            .collect(),
    }
}

/// Seconds from `clock` (local wall time) to the next moment a rule's or
/// a weight's schedule turns on or off, if any ever does.
pub fn next_schedule_change(cfg: &Config, clock: &LocalTime) -> Option<u32> {
    let week = clock.week_secs();
    cfg.rules
        .iter()
        .filter_map(|r| r.schedule.as_ref())
        .chain(
            cfg.wans
                .iter()
                .flat_map(|w| w.weight_schedule.iter().map(|s| &s.schedule)),
        )
        .filter_map(|s| s.next_change(week))
        .min()
}

fn has_ipv6(wans: &[WanRt]) -> bool {
    wans.iter().any(|w| w.cfg.ipv6 != Ipv6Mode::Off)
}

/// Family `f`'s policies and `alive` flags from the WANs' health, its
/// bypass prefixes and balance route.
fn family(inputs: &Inputs, f: Family) -> FamilyDesired {
    let cfg = inputs.cfg;
    let week = inputs.clock.week_secs();
    let views: Vec<_> = inputs
        .wans
        .iter()
        .map(|w| {
            let a = inputs.allowances.get(&w.id).copied().unwrap_or_default();
            w.view(f, week, a)
        })
        .collect();
    let ids: Vec<u8> = cfg
        .rules
        .iter()
        .map(|r| inputs.rule_policies[&r.name])
        .collect();
    let c = policy::compile(
        &views,
        &cfg.rules,
        &ids,
        cfg.all_down,
        &inputs.last_default[f],
    );
    let mut wans = vec![WanEntry::default(); MAX_WANS as usize];
    for (id, alive) in &c.alive {
        let w = inputs
            .wans
            .iter()
            .find(|w| w.id == *id)
            .expect("a view of a WAN");
        wans[*id as usize] = WanEntry {
            mark: w.mark,
            alive: *alive as u32,
        };
    }
    let nexthops = c
        .default_members
        .iter()
        .filter_map(|(id, weight)| {
            let w = inputs.wans.iter().find(|w| w.id == *id)?;
            Some((w.link.nexthop[f]?, *weight))
        })
        .collect();
    FamilyDesired {
        wans,
        policies: c.policies,
        bypass: bypass(f, &inputs.host.addrs[f]),
        balance: Balance {
            nexthops,
            unreachable: false,
        },
        all_down: c.all_down,
        default_members: c.default_members,
    }
}

/// Local addresses and connected prefixes are never pinned to a WAN; for
/// IPv6 also loopback, link-local and multicast.
fn bypass(f: Family, addrs: &[IpNet]) -> Vec<IpNet> {
    let host_len = match f {
        Family::Ipv4 => 32,
        Family::Ipv6 => 128,
    };
    let fixed: &[&str] = match f {
        Family::Ipv4 => &["127.0.0.0/8"],
        Family::Ipv6 => &["::1/128", "fe80::/10", "ff00::/8"],
    };
    let mut prefixes: Vec<IpNet> = addrs
        .iter()
        .flat_map(|a| {
            [
                a.trunc(),
                IpNet::new(a.addr(), host_len).expect("a host prefix"),
            ]
        })
        .filter(|n| n.prefix_len() > 0)
        .chain(fixed.iter().map(|p| p.parse().expect("valid")))
        .collect();
    prefixes.sort();
    prefixes.dedup();
    prefixes
}

fn tables(wans: &[WanRt]) -> BTreeMap<(Family, u32), TableRoute> {
    let mut out = BTreeMap::new();
    for w in wans {
        let usable = w.link.unusable_reason(&w.cfg).is_none();
        for f in Family::BOTH {
            let usable = match f {
                Family::Ipv4 => usable,
                Family::Ipv6 => usable && w.link.ipv6_ready(&w.cfg),
            };
            let route = TableRoute {
                nexthop: w.link.nexthop[f],
                usable,
            };
            out.insert((f, w.table), route);
        }
    }
    out
}

fn ip_rules(cfg: &Config, wans: &[WanRt], refusing: bool) -> Vec<RuleSpec> {
    Family::BOTH
        .into_iter()
        .flat_map(|f| {
            let wans: Vec<(u8, u32, Vec<IpAddr>)> = wans
                .iter()
                .filter(|w| f == Family::Ipv4 || w.cfg.ipv6 != Ipv6Mode::Off)
                .map(|w| {
                    let addrs = w.link.addrs[f].iter().map(|a| a.addr()).collect();
                    (w.id, w.mark, addrs)
                })
                .collect();
            routing::wanted_rules(
                f,
                cfg.rule_priority,
                cfg.table_base,
                cfg.mark_mask,
                &wans,
                refusing,
            )
        })
        .collect()
}

fn nft(cfg: &Config, wans: &[WanRt], refusing: bool, ct: ConntrackAccess) -> NftSpec {
    NftSpec {
        wans: wans
            .iter()
            .map(|w| NftWan {
                name: w.cfg.name.clone(),
                interface: w.cfg.interface.clone(),
                mark: w.mark,
                nat: w.cfg.nat,
                snat: w.cfg.snat_address,
                nat6: w.link.nat6(&w.cfg),
            })
            .collect(),
        mark_mask: cfg.mark_mask,
        refuse_from: if refusing {
            cfg.lan_interfaces.clone()
        } else {
            Vec::new()
        },
        divert_from: cfg.has_domain_rules().then(|| cfg.lan_interfaces.clone()),
        restore: ct == ConntrackAccess::Nftables,
    }
}

fn sysctls(wans: &[WanRt]) -> SysctlSpec {
    let ifaces: Vec<String> = wans.iter().map(|w| w.cfg.interface.clone()).collect();
    let ipv6 = |ra_only: bool| -> Vec<String> {
        wans.iter()
            .filter(|w| w.cfg.ipv6 != Ipv6Mode::Off)
            .filter(|w| !ra_only || w.cfg.gateway6 == Some(Gateway6::Auto))
            .map(|w| w.cfg.interface.clone())
            .collect()
    };
    let (ifaces6, ra_ifaces) = (ipv6(false), ipv6(true));
    let mut per_interface: Vec<String> = ifaces
        .iter()
        .flat_map(|i| {
            sysctl::WAN_IFACE_SETTINGS
                .iter()
                .map(move |(name, _)| sysctl::iface_key(i, name))
        })
        .chain(ra_ifaces.iter().map(|i| sysctl::iface_key6(i, "accept_ra")))
        .collect();
    per_interface.sort();
    SysctlSpec {
        settings: sysctl::router_settings(&ifaces)
            .into_iter()
            .chain(sysctl::ipv6_settings(&ifaces6, &ra_ifaces))
            .collect(),
        per_interface,
        interfaces: wans.iter().map(|w| w.link.ifindex).collect(),
        ipv6_interfaces: ifaces6,
    }
}

fn probers(wans: &[WanRt]) -> BTreeMap<(u8, Family), ProberSpec> {
    wans.iter()
        .flat_map(|w| {
            w.probers().into_iter().map(|spec| {
                let key = (w.id, spec.family);
                let p = ProberSpec {
                    spec,
                    ifindex: w.link.ifindex,
                };
                (key, p)
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "desired_tests.rs"]
mod tests;
