//! `desired` as a pure function: inputs built by hand, no kernel.

use std::collections::BTreeMap;
use std::time::Instant;

use super::*;
use crate::health::State;
use crate::routing::Selector;

const LAN: &str = "lan0";

fn config(extra_top: &str, wans: &str) -> Config {
    let text = format!(
        "lan_interfaces = [\"{LAN}\"]\nprobe_targets = [\"198.51.100.1\", \"2001:db8:ff::1\"]\n{extra_top}\n{wans}"
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

const TWO: &str = r#"
[[wan]]
name = "fibre"
interface = "wan1"
gateway = "100.64.1.1"
gateway6 = "fe80::1"
weight = 3
[[wan]]
name = "cable"
interface = "wan2"
gateway = "100.64.2.1"
"#;

/// The WANs of `cfg` with ids in config order, every family in `state`,
/// and links with an address and next hop of each family they carry.
fn wans(cfg: &Config, state: State) -> Vec<WanRt> {
    cfg.wans
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let id = i as u8;
            let mut rt = WanRt::new(
                w.clone(),
                id,
                cfg.wan_mark(id),
                cfg.table_base,
                PerFamily::both(state),
            );
            let n = i + 1;
            let ifindex = 10 + n as u32;
            rt.link.ifindex = Some(ifindex);
            rt.link.admin_up = true;
            rt.link.carrier = true;
            if w.gateway != crate::config::Gateway::None {
                rt.link.addrs[Family::Ipv4] = vec![format!("100.64.{n}.2/24").parse().unwrap()];
                rt.link.nexthop[Family::Ipv4] = Some(Nexthop {
                    gateway: Some(format!("100.64.{n}.1").parse().unwrap()),
                    ifindex,
                });
            }
            if w.ipv6 != Ipv6Mode::Off {
                rt.link.addrs[Family::Ipv6] = vec![format!("2001:db8:{n}::2/64").parse().unwrap()];
                rt.link.nexthop[Family::Ipv6] = Some(Nexthop {
                    gateway: Some("fe80::1".parse().unwrap()),
                    ifindex,
                });
            }
            rt
        })
        .collect()
}

fn host() -> Host {
    let mut lans = BTreeMap::new();
    lans.insert(
        LAN.to_string(),
        LanLink {
            ifindex: 2,
            l2: true,
        },
    );
    Host {
        addrs: PerFamily::new(|f| match f {
            Family::Ipv4 => vec!["192.0.2.1/25".parse().unwrap()],
            Family::Ipv6 => vec!["fd00:1::1/64".parse().unwrap()],
        }),
        lans,
    }
}

fn compute(cfg: &Config, wans: &[WanRt], last: &PerFamily<Vec<(u8, u32)>>) -> Desired {
    compute_at(cfg, wans, last, &monday_noon(), &BTreeMap::new())
}

/// Monday 2026-03-02, 12:00 UTC.
fn monday_noon() -> LocalTime {
    LocalTime::utc(crate::clock::utc_epoch_of(
        crate::clock::Date::new(2026, 3, 2),
        12 * 3600,
    ))
}

fn compute_at(
    cfg: &Config,
    wans: &[WanRt],
    last: &PerFamily<Vec<(u8, u32)>>,
    clock: &LocalTime,
    allowances: &BTreeMap<u8, Allowance>,
) -> Desired {
    let policies: BTreeMap<String, u8> = cfg
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| (r.name.clone(), i as u8 + 1))
        .collect();
    desired(&Inputs {
        cfg,
        wans,
        host: &host(),
        rule_policies: &policies,
        last_default: last,
        conntrack: ConntrackAccess::Kfuncs,
        clock,
        allowances,
    })
}

fn share(p: &Policy, id: u8) -> usize {
    p.slots.iter().filter(|s| **s == id).count()
}

#[test]
fn healthy_wans_share_by_weight_in_every_part() {
    let cfg = config("", TWO);
    let w = wans(&cfg, State::Up);
    let d = compute(&cfg, &w, &PerFamily::default());
    assert_eq!(d.names[0].as_deref(), Some("fibre"));
    assert_eq!(d.names[1].as_deref(), Some("cable"));
    assert!(d.names[2..].iter().all(Option::is_none));

    let v4 = &d.families[Family::Ipv4];
    assert_eq!(
        v4.wans[0],
        WanEntry {
            mark: cfg.wan_mark(0),
            alive: 1
        }
    );
    assert_eq!(
        v4.wans[1],
        WanEntry {
            mark: cfg.wan_mark(1),
            alive: 1
        }
    );
    assert_eq!(v4.wans[2], WanEntry::default());
    assert_eq!(share(&v4.policies[0], 0), 768);
    assert_eq!(share(&v4.policies[0], 1), 256);
    assert_eq!(v4.default_members, vec![(0, 3), (1, 1)]);
    assert_eq!(v4.balance.nexthops.len(), 2);
    assert!(!v4.balance.unreachable && !v4.all_down);
    assert!(v4.bypass.contains(&"192.0.2.0/25".parse().unwrap()));
    assert!(v4.bypass.contains(&"192.0.2.1/32".parse().unwrap()));
    assert!(v4.bypass.contains(&"127.0.0.0/8".parse().unwrap()));

    // Only fibre has IPv6: it takes every IPv6 flow.
    let v6 = &d.families[Family::Ipv6];
    assert_eq!(v6.wans[0].alive, 1);
    assert_eq!(v6.wans[1].alive, 0, "cable has no IPv6");
    assert_eq!(share(&v6.policies[0], 0), 1024);
    assert!(v6.bypass.contains(&"fe80::/10".parse().unwrap()));

    let t = d.tables[&(Family::Ipv4, cfg.table_base + 1)];
    assert!(t.usable && t.nexthop.is_some());
    assert!(d.tables[&(Family::Ipv6, cfg.table_base)].usable);
    assert!(!d.tables[&(Family::Ipv6, cfg.table_base + 1)].usable);

    let fwmarks = |f| {
        d.ip_rules
            .iter()
            .filter(|r| r.family == f && matches!(r.selector, Selector::Fwmark { .. }))
            .count()
    };
    assert_eq!((fwmarks(Family::Ipv4), fwmarks(Family::Ipv6)), (2, 1));
    assert!(!d.ip_rules.iter().any(|r| r.selector == Selector::All));
    assert!(d.nft.refuse_from.is_empty() && d.nft.divert_from.is_none());
    assert_eq!(d.nft.wans.len(), 2);
    assert!(d.relay.is_none());
    // A prober per WAN and family with targets (cable has no IPv6).
    let keys: Vec<_> = d.probers.keys().copied().collect();
    assert_eq!(
        keys,
        vec![(0, Family::Ipv4), (0, Family::Ipv6), (1, Family::Ipv4)]
    );
    assert_eq!(
        d.lans[LAN],
        Some(LanLink {
            ifindex: 2,
            l2: true
        })
    );
    assert_eq!(d.conns[&0].addrs.len(), 2);
    assert!(d
        .sysctls
        .settings
        .iter()
        .any(|(k, v)| k == "net.ipv4.ip_forward" && v == "1"));
}

#[test]
fn a_dead_wan_leaves_the_policies_and_loses_its_pins() {
    let cfg = config("", TWO);
    let mut w = wans(&cfg, State::Up);
    w[0].link.carrier = false;
    w[0].on_link(false, "carrier lost", Instant::now());
    let d = compute(&cfg, &w, &PerFamily::default());
    let v4 = &d.families[Family::Ipv4];
    assert_eq!(v4.wans[0].alive, 0);
    assert_eq!(v4.wans[1].alive, 1);
    assert_eq!(share(&v4.policies[0], 1), 1024);
    assert_eq!(v4.balance.nexthops.len(), 1);
    assert!(!d.tables[&(Family::Ipv4, cfg.table_base)].usable);
    // Its IPv6 dies with its link: no WAN has IPv6 now.
    let v6 = &d.families[Family::Ipv6];
    assert!(v6.all_down && v6.wans[0].alive == 0);
}

#[test]
fn unknown_wans_keep_their_pins_but_take_no_new_flows() {
    let cfg = config("", TWO);
    let w = wans(&cfg, State::Unknown);
    let d = compute(&cfg, &w, &PerFamily::default());
    let v4 = &d.families[Family::Ipv4];
    assert_eq!((v4.wans[0].alive, v4.wans[1].alive), (1, 1));
    assert_eq!(v4.policies[0].active, 0);
    assert!(v4.all_down);
}

#[test]
fn all_down_unreachable_refuses_everywhere() {
    let cfg = config("all_down = \"unreachable\"", TWO);
    let w = wans(&cfg, State::Down);
    let d = compute(&cfg, &w, &PerFamily::default());
    let v4 = &d.families[Family::Ipv4];
    assert!(v4.all_down && v4.balance.unreachable && v4.balance.nexthops.is_empty());
    assert!(d.families[Family::Ipv6].balance.unreachable);
    assert_eq!(d.nft.refuse_from, vec![LAN.to_string()]);
    let refuse: Vec<_> = d
        .ip_rules
        .iter()
        .filter(|r| r.selector == Selector::All)
        .map(|r| r.family)
        .collect();
    assert_eq!(refuse, vec![Family::Ipv4, Family::Ipv6]);
}

#[test]
fn all_down_last_keeps_the_last_set_alive() {
    let cfg = config("", TWO);
    let w = wans(&cfg, State::Down);
    let last = PerFamily::new(|f| match f {
        Family::Ipv4 => vec![(1, 1)],
        Family::Ipv6 => vec![],
    });
    let d = compute(&cfg, &w, &last);
    let v4 = &d.families[Family::Ipv4];
    assert!(v4.all_down);
    assert_eq!(v4.default_members, vec![(1, 1)]);
    assert_eq!(share(&v4.policies[0], 1), 1024);
    assert_eq!((v4.wans[0].alive, v4.wans[1].alive), (0, 1));
    assert!(!v4.balance.unreachable && d.nft.refuse_from.is_empty());
}

#[test]
fn a_disabled_wan_runs_no_prober_and_a_drained_one_keeps_its_pins() {
    let cfg = config("", TWO);
    let mut w = wans(&cfg, State::Up);
    w[0].set_disabled(true, Instant::now());
    w[1].drained = true;
    let d = compute(&cfg, &w, &PerFamily::default());
    assert!(d.probers.keys().all(|(id, _)| *id == 1));
    let v4 = &d.families[Family::Ipv4];
    assert_eq!(v4.wans[0].alive, 0, "disabled: pins move");
    assert_eq!(v4.wans[1].alive, 1, "drained: pins stay");
    assert_eq!(v4.policies[0].active, 0, "nothing takes new flows");
}

#[test]
fn domain_rules_run_the_relay_and_divert_the_lan() {
    let rule = "[[rule]]\nname = \"gov\"\ndomains = [\"gov.br\"]\nwans = [\"fibre\"]\n";
    let cfg = config("", &format!("{TWO}{rule}"));
    let w = wans(&cfg, State::Up);
    let d = compute(&cfg, &w, &PerFamily::default());
    let relay = d.relay.as_ref().expect("a relay");
    assert_eq!(relay.domains, vec![vec!["gov.br".to_string()]]);
    assert_eq!(relay.lans, vec![LAN.to_string()]);
    assert_eq!(d.nft.divert_from, Some(vec![LAN.to_string()]));
    // The rule's policy (id 1 here): its ordered list's first WAN.
    let v4 = &d.families[Family::Ipv4];
    assert_eq!(share(&v4.policies[1], 0), 1024);
    assert_eq!(d.rules.count, 1);
    assert_eq!(d.settings.rule_count, 1);
    assert_eq!(d.rule_ifaces[LAN], 2);
}

#[test]
fn the_same_inputs_give_the_same_state() {
    let cfg = config("", TWO);
    let w = wans(&cfg, State::Up);
    let a = compute(&cfg, &w, &PerFamily::default());
    let b = compute(&cfg, &w, &PerFamily::default());
    assert_eq!(a, b);
    // A re-created interface (new ifindex) changes its probers' spec and
    // its sysctls' interfaces: both are applied again.
    let mut w2 = wans(&cfg, State::Up);
    w2[1].link.ifindex = Some(99);
    let c = compute(&cfg, &w2, &PerFamily::default());
    assert_ne!(a.probers[&(1, Family::Ipv4)], c.probers[&(1, Family::Ipv4)]);
    assert_eq!(a.probers[&(0, Family::Ipv4)], c.probers[&(0, Family::Ipv4)]);
    assert_ne!(a.sysctls, c.sysctls);
}

/// The local time is an input: a rule outside its schedule has no bit in
/// the protocol masks (its policy stays, for the flows it placed), a
/// weight schedule changes the slots, and the next boundary is known.
#[test]
fn schedules_follow_the_clock_given() {
    let extra = "[[wan.weight_schedule]]\nschedule = \"Mon-Fri 08:00-18:00\"\nweight = 3\n[[rule]]\nname = \"office\"\nproto = \"tcp\"\nschedule = \"Mon-Fri 09:00-17:00\"\nwans = [\"cable\"]\n";
    let cfg = config("", &format!("{TWO}{extra}"));
    let w = wans(&cfg, State::Up);
    let at = |date: crate::clock::Date, secs: u32| {
        LocalTime::utc(crate::clock::utc_epoch_of(date, secs))
    };
    let monday = crate::clock::Date::new(2026, 3, 2);
    let noon = compute_at(
        &cfg,
        &w,
        &PerFamily::default(),
        &at(monday, 12 * 3600),
        &BTreeMap::new(),
    );
    assert_eq!(noon.rules.active, vec![true]);
    assert_eq!(noon.rules.proto[6] & 1, 1);
    let v4 = &noon.families[Family::Ipv4];
    // fibre 3, cable 3 by its schedule.
    assert_eq!(
        (share(&v4.policies[0], 0), share(&v4.policies[0], 1)),
        (512, 512)
    );
    assert_eq!(share(&v4.policies[1], 1), 1024);
    let evening = compute_at(
        &cfg,
        &w,
        &PerFamily::default(),
        &at(monday, 20 * 3600),
        &BTreeMap::new(),
    );
    assert_eq!(evening.rules.active, vec![false]);
    assert!(
        evening.rules.proto.iter().all(|m| m & 1 == 0),
        "never matches"
    );
    let v4 = &evening.families[Family::Ipv4];
    assert_eq!(
        (share(&v4.policies[0], 0), share(&v4.policies[0], 1)),
        (768, 256)
    );
    assert_eq!(
        share(&v4.policies[1], 1),
        1024,
        "its policy stays for its flows"
    );
    assert_eq!(
        evening.families[Family::Ipv4].wans,
        noon.families[Family::Ipv4].wans,
        "no pin moves"
    );
    // Next boundaries: 17:00 (the rule) from noon, Tuesday 08:00 (the
    // weight) from the evening.
    assert_eq!(
        next_schedule_change(&cfg, &at(monday, 12 * 3600)),
        Some(5 * 3600)
    );
    assert_eq!(
        next_schedule_change(&cfg, &at(monday, 20 * 3600)),
        Some(12 * 3600)
    );
    assert_eq!(next_schedule_change(&config("", TWO), &at(monday, 0)), None);
}

/// A WAN's used-up allowance is an input: with "backup" it leaves the
/// policies while another WAN is up and keeps its pins.
#[test]
fn a_used_up_allowance_is_an_input() {
    let cfg = config("", TWO);
    let w = wans(&cfg, State::Up);
    let held: BTreeMap<u8, Allowance> = [(1, Allowance::Backup { reset: false })].into();
    let d = compute_at(&cfg, &w, &PerFamily::default(), &monday_noon(), &held);
    let v4 = &d.families[Family::Ipv4];
    assert_eq!(share(&v4.policies[0], 0), 1024);
    assert_eq!(v4.wans[1].alive, 1);
    assert_eq!(v4.balance.nexthops.len(), 1, "the router's own traffic too");
    let reset: BTreeMap<u8, Allowance> = [(1, Allowance::Off { reset: true })].into();
    let d = compute_at(&cfg, &w, &PerFamily::default(), &monday_noon(), &reset);
    assert_eq!(d.families[Family::Ipv4].wans[1].alive, 0, "its flows move");
}
