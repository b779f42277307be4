use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures::Stream;
use netlink_packet_core::NetlinkHeader;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkFlags, LinkLayerType};
use netlink_packet_route::route::RouteProtocol;
use netlink_packet_route::rule::{RuleAction, RuleAttribute};

use super::events::parse_events;
use super::testns::{veth, TestNs};
use super::*;

fn a(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// An IPv4 or IPv6 address as a nexthop's gateway.
fn gw(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

fn spec(priority: u32, selector: Selector, table: u32) -> RuleSpec {
    RuleSpec {
        family: Family::Ipv4,
        priority,
        selector,
        table,
    }
}

const MASK: u32 = 0x00ff_0000;

/// [`wanted_rules`] of IPv4 for WANs with at most one address.
fn rules4(
    p: u32,
    base: u32,
    mask: u32,
    wans: &[(u8, u32, Option<Ipv4Addr>)],
    refuse: bool,
) -> Vec<RuleSpec> {
    let wans: Vec<(u8, u32, Vec<IpAddr>)> = wans
        .iter()
        .map(|(id, m, a)| (*id, *m, a.iter().map(|a| IpAddr::V4(*a)).collect()))
        .collect();
    wanted_rules(Family::Ipv4, p, base, mask, &wans, refuse)
}

/// [`wanted_rules`] of IPv6.
fn rules6(
    p: u32,
    base: u32,
    mask: u32,
    wans: &[(u8, u32, Vec<Ipv6Addr>)],
    refuse: bool,
) -> Vec<RuleSpec> {
    let wans: Vec<(u8, u32, Vec<IpAddr>)> = wans
        .iter()
        .map(|(id, m, a)| (*id, *m, a.iter().map(|a| IpAddr::V6(*a)).collect()))
        .collect();
    wanted_rules(Family::Ipv6, p, base, mask, &wans, refuse)
}

#[test]
fn wanted_rules_follow_the_layout() {
    let rules = rules4(
        1000,
        1000,
        MASK,
        &[(0, 0x1_0000, Some(a("198.51.100.2"))), (2, 0x3_0000, None)],
        false,
    );
    let fw = |mark| Selector::Fwmark { mark, mask: MASK };
    assert_eq!(
        rules,
        vec![
            spec(1000, Selector::AllSuppressDefault, RT_TABLE_MAIN),
            spec(1010, fw(0x1_0000), 1000),
            spec(1012, fw(0x3_0000), 1002),
            spec(1100, Selector::From(IpAddr::V4(a("198.51.100.2"))), 1000),
            spec(1200, Selector::Local, 1032),
        ]
    );
    assert_eq!(rules4(5, 7, MASK, &[], false).len(), 2);
    let refusing = rules4(1000, 1000, MASK, &[], true);
    assert_eq!(refusing[1], spec(1199, Selector::All, 1032));
}

#[test]
fn rules_display_like_ip_rule() {
    let cases = [
        (
            spec(1000, Selector::AllSuppressDefault, 254),
            "1000 from all lookup main suppress_prefixlength 0",
        ),
        (
            spec(
                1010,
                Selector::Fwmark {
                    mark: 0x1_0000,
                    mask: MASK,
                },
                1000,
            ),
            "1010 fwmark 0x10000/0xff0000 lookup 1000",
        ),
        (
            spec(1100, Selector::From(IpAddr::V4(a("192.0.2.1"))), 1000),
            "1100 from 192.0.2.1 lookup 1000",
        ),
        (spec(1200, Selector::All, 1032), "1200 from all lookup 1032"),
        (
            spec(1200, Selector::Local, 1032),
            "1200 from all iif lo lookup 1032",
        ),
    ];
    for (s, text) in cases {
        assert_eq!(s.to_string(), text);
    }
}

#[test]
fn rule_messages_round_trip_and_look_up_a_table() {
    for s in rules4(
        1000,
        1000,
        MASK,
        &[(0, 0x1_0000, Some(a("198.51.100.2")))],
        false,
    ) {
        let m = rule_message(&s);
        assert_eq!(m.header.action, RuleAction::ToTable, "{s}");
        assert!(is_mwan_rule(&m));
        assert!(m.attributes.contains(&RuleAttribute::Table(s.table)));
        assert_eq!(parse_rule(&m), Some(s));
    }
    // As the kernel dumps it: table 252 (compat) in the header, "no
    // suppress_prefixlength" as -1.
    let mut dumped = rule_message(&spec(1200, Selector::All, 1032));
    dumped.header.table = 252;
    dumped
        .attributes
        .push(RuleAttribute::SuppressPrefixLen(u32::MAX));
    assert_eq!(parse_rule(&dumped), Some(spec(1200, Selector::All, 1032)));
    // A rule mwan never makes is not mistaken for one.
    let mut m = rule_message(&spec(1000, Selector::All, 1000));
    m.attributes.push(RuleAttribute::Iifname("eth0".into()));
    assert_eq!(parse_rule(&m), None);
    let mut m = rule_message(&spec(1000, Selector::All, 1000));
    m.header.action = RuleAction::Unreachable;
    assert_eq!(parse_rule(&m), None);
}

#[test]
fn weights_fit_the_kernel_range() {
    assert_eq!(kernel_weights(&[3, 1]), vec![3, 1]);
    assert_eq!(kernel_weights(&[256, 1]), vec![256, 1]);
    assert_eq!(kernel_weights(&[1000, 500, 1]), vec![256, 128, 1]);
    assert_eq!(kernel_weights(&[250, 1000]), vec![64, 256]);
    assert_eq!(kernel_weights(&[300]), vec![256]);
    assert!(kernel_weights(&[]).is_empty());
}

fn notification(msg: RouteNetlinkMessage) -> Vec<u8> {
    let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
    m.finalize();
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    buf
}

#[test]
fn notifications_become_events() {
    let mut link = LinkMessage::default();
    link.header.index = 7;
    link.header.flags = LinkFlags::Up | LinkFlags::LowerUp;
    link.header.link_layer_type = LinkLayerType::Ether;
    link.attributes.push(LinkAttribute::IfName("wan0".into()));
    let mut bridge_port = link.clone();
    bridge_port.header.interface_family = AddressFamily::Bridge;
    let mut addr = AddressMessage::default();
    addr.header.family = AddressFamily::Inet;
    addr.header.index = 7;
    addr.header.prefix_len = 24;
    addr.attributes
        .push(AddressAttribute::Local(IpAddr::V4(a("198.51.100.2"))));
    let mut route = mwan_route(Family::Ipv4, 254, RouteType::Unicast);
    route.header.protocol = RouteProtocol::Dhcp;
    route.attributes.push(RouteAttribute::Oif(7));
    let own = mwan_route(Family::Ipv4, 1000, RouteType::Unicast);

    let mut buf = Vec::new();
    for m in [
        RouteNetlinkMessage::NewLink(link.clone()),
        RouteNetlinkMessage::DelLink(bridge_port),
        RouteNetlinkMessage::DelAddress(addr),
        RouteNetlinkMessage::NewRoute(own),
        RouteNetlinkMessage::DelRoute(route),
        RouteNetlinkMessage::DelLink(link),
    ] {
        buf.extend(notification(m));
    }
    let events = format!("{:?}", parse_events(&buf));
    assert_eq!(
        events,
        "[Link(Link { index: 7, name: \"wan0\", admin_up: true, carrier: true, l2: true }), \
         Addr { index: 7, addr: 198.51.100.2/24, added: false }, \
         Route { table: 254, ifindex: Some(7), default: true }, \
         LinkRemoved { index: 7, name: \"wan0\" }]"
    );
}

// ---------------------------------------------------------------------------
// Against the kernel, in throwaway network namespaces.

/// A namespace with two "WAN" veths, `w0` (198.51.100.2/24, gateway .1) and
/// `w1` (203.0.113.2/24, gateway .1), whose peers stay in the namespace.
fn two_wans(tag: &str) -> TestNs {
    let ns = TestNs::new(tag);
    for (w, net) in [("w0", "198.51.100"), ("w1", "203.0.113")] {
        ns.ip(&format!("link add {w} type veth peer name {w}p"));
        ns.ip(&format!("link set {w} up"));
        ns.ip(&format!("link set {w}p up"));
        ns.ip(&format!("addr add {net}.2/24 dev {w}"));
    }
    ns
}

async fn index(net: &Net, name: &str) -> u32 {
    net.link(name)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no link {name}"))
        .index
}

fn route_dev(ns: &TestNs, args: &str) -> String {
    let out = ns.ip(&format!("route get {args}"));
    let words: Vec<&str> = out.split_whitespace().collect();
    let dev = words
        .iter()
        .position(|w| *w == "dev")
        .unwrap_or_else(|| panic!("{out}"));
    words[dev + 1].to_string()
}

#[test]
fn tables_and_rules_route_marked_packets() {
    let ns = two_wans("rules");
    // A foreign rule and a stale rule of an earlier mwan.
    ns.ip("rule add pref 1050 from 192.0.2.9 lookup 100");
    ns.ip("rule add pref 1015 fwmark 0x90000/0xff0000 lookup 1009 proto 109");
    ns.block_on(|| async {
        let net = Net::connect().await.unwrap();
        let (w0, w1) = (index(&net, "w0").await, index(&net, "w1").await);
        let nh0 = Nexthop {
            gateway: gw("198.51.100.1"),
            ifindex: w0,
        };
        let nh1 = Nexthop {
            gateway: gw("203.0.113.1"),
            ifindex: w1,
        };
        net.set_table_default(1000, nh0).await.unwrap();
        net.set_table_default(1001, nh1).await.unwrap();
        // Replacing is idempotent.
        net.set_table_default(1001, nh1).await.unwrap();
        net.set_balance(Family::Ipv4, 1032, &[(nh0, 3), (nh1, 1)], false)
            .await
            .unwrap();
        let wans = [
            (0, 0x1_0000, Some(a("198.51.100.2"))),
            (1, 0x2_0000, Some(a("203.0.113.2"))),
        ];
        let want = rules4(1000, 1000, MASK, &wans, false);
        net.sync_rules(&want).await.unwrap();

        let rules = ns.ip("rule show");
        for line in [
            "1000:\tfrom all lookup main suppress_prefixlength 0 proto 109",
            "1010:\tfrom all fwmark 0x10000/0xff0000 lookup 1000 proto 109",
            "1011:\tfrom all fwmark 0x20000/0xff0000 lookup 1001 proto 109",
            "1100:\tfrom 198.51.100.2 lookup 1000 proto 109",
            "1101:\tfrom 203.0.113.2 lookup 1001 proto 109",
            "1200:\tfrom all iif lo lookup 1032 proto 109",
            "1050:\tfrom 192.0.2.9 lookup 100",
        ] {
            assert!(
                rules.lines().any(|l| l.trim_end() == line),
                "missing {line:?} in\n{rules}"
            );
        }
        assert!(!rules.contains("1015:"), "stale rule kept:\n{rules}");
        let mut have = net.mwan_rules().await.unwrap();
        have.sort_by_key(|r| r.priority);
        assert_eq!(have, want);

        // The rules really steer: marks and source addresses pick the WAN,
        // connected destinations stay on the main table.
        assert_eq!(route_dev(&ns, "192.0.2.50 mark 0x10000"), "w0");
        assert_eq!(route_dev(&ns, "192.0.2.50 mark 0x20000"), "w1");
        assert_eq!(route_dev(&ns, "192.0.2.50 mark 0x20001"), "w1");
        assert_eq!(route_dev(&ns, "192.0.2.50 from 203.0.113.2"), "w1");
        assert_eq!(route_dev(&ns, "198.51.100.77 mark 0x20000"), "w0");
        let balance = ns.ip("route show table 1032");
        assert!(balance.contains("default proto 109"), "{balance}");
        assert!(
            balance.contains("nexthop via 198.51.100.1 dev w0 weight 3"),
            "{balance}"
        );
        assert!(
            balance.contains("nexthop via 203.0.113.1 dev w1 weight 1"),
            "{balance}"
        );
        let t1 = ns.ip("route show table 1001");
        assert_eq!(t1.trim(), "default via 203.0.113.1 dev w1 proto 109");

        // Idempotent: nothing changes on a second sync.
        net.sync_rules(&want).await.unwrap();
        assert_eq!(ns.ip("rule show"), rules);

        // A WAN losing its address loses its `from` rule only.
        let want2 = rules4(1000, 1000, MASK, &[wans[0], (1, 0x2_0000, None)], false);
        net.sync_rules(&want2).await.unwrap();
        let rules2 = ns.ip("rule show");
        assert!(
            !rules2.contains("1101:") && rules2.contains("1011:") && rules2.contains("1050:"),
            "{rules2}"
        );

        // Weights beyond the kernel's range are scaled.
        net.set_balance(Family::Ipv4, 1032, &[(nh0, 1000), (nh1, 250)], false)
            .await
            .unwrap();
        let balance = ns.ip("route show table 1032");
        assert!(
            balance.contains("dev w0 weight 256") && balance.contains("dev w1 weight 64"),
            "{balance}"
        );
        net.set_balance(Family::Ipv4, 1032, &[(nh1, 5)], false)
            .await
            .unwrap();
        assert_eq!(route_dev(&ns, "192.0.2.50"), "w1");
        net.set_balance(Family::Ipv4, 1032, &[], true)
            .await
            .unwrap();
        assert_eq!(
            ns.ip("route show table 1032").trim(),
            "unreachable default proto 109"
        );
        let unreachable = ns.exec_output(&["ip", "route", "get", "192.0.2.50"]);
        assert!(!unreachable.status.success());
        net.set_balance(Family::Ipv4, 1032, &[], false)
            .await
            .unwrap();
        net.set_balance(Family::Ipv4, 1032, &[], false)
            .await
            .unwrap();
        assert_eq!(ns.ip("route show table 1032").trim(), "");

        // A foreign route in mwan's range goes with the tables, the foreign
        // rule stays.
        ns.ip("route add 192.0.2.0/24 via 198.51.100.1 table 1005");
        net.set_balance(Family::Ipv4, 1032, &[(nh0, 1)], false)
            .await
            .unwrap();
        net.remove_all_mwan(1000..=1032).await.unwrap();
        assert_eq!(ns.ip("route show table all proto 109").trim(), "");
        for t in [1000, 1001, 1005, 1032] {
            assert_eq!(
                ns.ip(&format!("route show table {t}")).trim(),
                "",
                "table {t}"
            );
        }
        let rules = ns.ip("rule show");
        assert!(
            !rules.contains("proto 109") && rules.contains("1050:"),
            "{rules}"
        );
        net.remove_all_mwan(1000..=1032).await.unwrap();
        net.flush_table(Family::Ipv4, 1000).await.unwrap();
    });
}

/// What the daemon relies on to put a WAN's table route back: the kernel
/// drops it (silently) with an interface set down or its last address, does
/// not restore it, and `table_default` sees that.
#[test]
fn a_table_route_dropped_by_the_kernel_is_seen() {
    let ns = two_wans("tabledef");
    ns.block_on(|| async {
        let net = Net::connect().await.unwrap();
        let w0 = index(&net, "w0").await;
        let nh0 = Nexthop {
            gateway: gw("198.51.100.1"),
            ifindex: w0,
        };
        assert_eq!(net.table_default(Family::Ipv4, 1000).await.unwrap(), None);
        // Not mwan's: a foreign default route in the table.
        ns.ip("route add default via 198.51.100.1 dev w0 table 1000");
        assert_eq!(net.table_default(Family::Ipv4, 1000).await.unwrap(), None);
        net.set_table_default(1000, nh0).await.unwrap();
        assert_eq!(
            net.table_default(Family::Ipv4, 1000).await.unwrap(),
            Some(nh0)
        );

        ns.ip("link set dev w0 down");
        assert_eq!(net.table_default(Family::Ipv4, 1000).await.unwrap(), None);
        assert!(net.set_table_default(1000, nh0).await.is_err());
        ns.ip("link set dev w0 up");
        assert_eq!(net.table_default(Family::Ipv4, 1000).await.unwrap(), None);
        net.set_table_default(1000, nh0).await.unwrap();
        assert_eq!(
            net.table_default(Family::Ipv4, 1000).await.unwrap(),
            Some(nh0)
        );

        ns.ip("addr del 198.51.100.2/24 dev w0");
        assert_eq!(net.table_default(Family::Ipv4, 1000).await.unwrap(), None);
        ns.ip("addr add 198.51.100.2/24 dev w0");
        assert_eq!(net.table_default(Family::Ipv4, 1000).await.unwrap(), None);
        net.flush_table(Family::Ipv4, 1000).await.unwrap();
    });
}

#[test]
fn errors_name_the_operation_and_object() {
    let ns = two_wans("errors");
    ns.block_on(|| async {
        let net = Net::connect().await.unwrap();
        let w0 = index(&net, "w0").await;
        let nh = Nexthop {
            gateway: gw("192.0.2.1"),
            ifindex: w0,
        };
        let e = net
            .set_table_default(1000, nh)
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "setting default via 192.0.2.1 ifindex {w0} table 1000: Network is unreachable"
            )
        );
        // Without CAP_NET_ADMIN the kernel refuses changes.
        drop_net_admin();
        let rule = spec(
            1010,
            Selector::Fwmark {
                mark: 0x1_0000,
                mask: MASK,
            },
            1000,
        );
        let e = net.sync_rules(&[rule]).await.unwrap_err().to_string();
        assert_eq!(
            e,
            "adding rule 1010 fwmark 0x10000/0xff0000 lookup 1000: Operation not permitted"
        );
    });
}

/// Drops CAP_NET_ADMIN from the calling thread's effective capabilities.
fn drop_net_admin() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: the kernel reads the header and fills/reads two `Data`.
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
            0
        );
        data[0].effective &= !(1 << 12); // CAP_NET_ADMIN
        assert_eq!(
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
            0
        );
    }
}

#[test]
fn links_addresses_and_learned_gateways() {
    let ns = two_wans("learn");
    ns.ip("addr add 198.51.100.9/24 dev w0");
    ns.ip("route add default via 198.51.100.1 dev w0 proto dhcp metric 100");
    ns.ip("route add default via 198.51.100.3 dev w0 metric 5 table 50");
    ns.ip("route add default via 198.51.100.4 dev w0 table 1000");
    ns.ip("route add default via 203.0.113.7 dev w1 metric 20 table 51");
    ns.ip("route add default via 203.0.113.5 dev w1 metric 10 table 52");
    ns.ip("tuntap add dev tun0 mode tun");
    ns.ip("link set tun0 up");
    ns.ip("route add default dev tun0 table 60");
    ns.ip("link add lonely type veth peer name lonelyp");
    ns.block_on(|| async {
        let net = Net::connect().await.unwrap();
        let w0 = net.link("w0").await.unwrap().unwrap();
        assert!(w0.l2 && w0.admin_up && w0.carrier, "{w0:?}");
        let tun = net.link("tun0").await.unwrap().unwrap();
        // No process holds the tun: up, without carrier, no L2 header.
        assert!(!tun.l2 && tun.admin_up && !tun.carrier, "{tun:?}");
        assert_eq!(net.link("absent0").await.unwrap(), None);
        let links = net.links().await.unwrap();
        assert!(links.contains(&w0) && links.contains(&tun), "{links:?}");
        let lonely = links.iter().find(|l| l.name == "lonely").unwrap();
        assert!(!lonely.admin_up && !lonely.carrier);

        let net24 = |s: &str| -> Ipv4Net { s.parse().unwrap() };
        assert_eq!(
            net.ipv4_addrs(w0.index).await.unwrap(),
            vec![net24("198.51.100.2/24"), net24("198.51.100.9/24")]
        );
        assert!(net.ipv4_addrs(tun.index).await.unwrap().is_empty());
        let all = net.all_ipv4_addrs().await.unwrap();
        assert!(
            all.contains(&(1, net24("127.0.0.1/8")))
                && all.contains(&(w0.index, net24("198.51.100.9/24")))
        );

        let exclude = 1000..=1032;
        let learned = |i| net.learned_default(Family::Ipv4, i, exclude.clone());
        // The main table wins over a lower metric elsewhere; mwan's range is
        // ignored.
        assert_eq!(
            learned(w0.index).await.unwrap(),
            Some(Nexthop {
                gateway: gw("198.51.100.1"),
                ifindex: w0.index
            })
        );
        let w1 = index(&net, "w1").await;
        assert_eq!(
            learned(w1).await.unwrap().unwrap().gateway,
            gw("203.0.113.5")
        );
        assert_eq!(
            learned(tun.index).await.unwrap(),
            Some(Nexthop {
                gateway: None,
                ifindex: tun.index
            })
        );
        assert_eq!(learned(lonely.index).await.unwrap(), None);
        assert_eq!(learned(999_999).await.unwrap(), None);
        // With the main route gone, the other tables are used.
        ns.ip("route del default via 198.51.100.1 dev w0");
        assert_eq!(
            learned(w0.index).await.unwrap().unwrap().gateway,
            gw("198.51.100.3")
        );

        // A default route via a point-to-point device, in a WAN table.
        net.set_table_default(
            1007,
            Nexthop {
                gateway: None,
                ifindex: tun.index,
            },
        )
        .await
        .unwrap();
        assert_eq!(
            ns.ip("route show table 1007").trim(),
            "default dev tun0 proto 109 scope link linkdown"
        );
        // And as a path of the balance route.
        let via_w0 = Nexthop {
            gateway: gw("198.51.100.1"),
            ifindex: w0.index,
        };
        let ppp = Nexthop {
            gateway: None,
            ifindex: tun.index,
        };
        net.set_balance(Family::Ipv4, 1032, &[(ppp, 1), (via_w0, 2)], false)
            .await
            .unwrap();
        let balance = ns.ip("route show table 1032");
        assert!(
            balance.contains("nexthop dev tun0 weight 1")
                && balance.contains("nexthop via 198.51.100.1 dev w0 weight 2"),
            "{balance}"
        );
    });
}

/// The next event matching `pred`, within a deadline.
async fn expect_event(
    events: &mut (impl Stream<Item = NetEvent> + Unpin),
    what: &str,
    pred: impl Fn(&NetEvent) -> bool,
) -> NetEvent {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(ev) = events.next().await {
            if pred(&ev) {
                return ev;
            }
            seen.push(ev);
        }
        panic!("event stream ended");
    })
    .await;
    found.unwrap_or_else(|_| panic!("no {what} event within 5 s; saw {seen:?}"))
}

#[test]
fn events_report_carrier_addresses_and_default_routes() {
    let ns = TestNs::new("events");
    let peer = TestNs::new("events-peer");
    veth(&ns, "wa", &peer, "wb");
    ns.block_on(|| async {
        let net = Net::connect().await.unwrap();
        let a_index = index(&net, "wa").await;
        let mut events = net.events().unwrap();

        peer.ip("link set wb down");
        let ev = expect_event(&mut events, "carrier loss", |e| {
            matches!(e, NetEvent::Link(l) if l.name == "wa" && !l.carrier)
        })
        .await;
        assert!(matches!(ev, NetEvent::Link(l) if l.admin_up && l.index == a_index));
        peer.ip("link set wb up");
        expect_event(&mut events, "carrier", |e| matches!(e, NetEvent::Link(l) if l.name == "wa" && l.carrier)).await;

        let addr: IpNet = "100.64.0.1/24".parse().unwrap();
        ns.ip("addr add 100.64.0.1/24 dev wa");
        expect_event(&mut events, "address added", |e| {
            matches!(e, NetEvent::Addr { index, addr: x, added: true } if *index == a_index && *x == addr)
        })
        .await;

        expect_event(&mut events, "connected route", |e| {
            matches!(e, NetEvent::Route { table: 254, default: false, .. })
        })
        .await;

        // mwan's own routes are not echoed: the next route event is the
        // foreign default route.
        net.set_table_default(
            1000,
            Nexthop {
                gateway: gw("100.64.0.2"),
                ifindex: a_index,
            },
        )
        .await
        .unwrap();
        ns.ip("route add default via 100.64.0.2 dev wa proto dhcp");
        let ev = expect_event(&mut events, "route", |e| matches!(e, NetEvent::Route { .. })).await;
        assert!(
            matches!(ev, NetEvent::Route { table: 254, ifindex: Some(i), default: true } if i == a_index),
            "{ev:?}"
        );
        ns.ip("route del default via 100.64.0.2 dev wa");
        expect_event(&mut events, "route removed", |e| {
            matches!(e, NetEvent::Route { table: 254, default: true, .. })
        })
        .await;

        ns.ip("addr del 100.64.0.1/24 dev wa");
        expect_event(&mut events, "address removed", |e| {
            matches!(e, NetEvent::Addr { addr: x, added: false, .. } if *x == addr)
        })
        .await;
        ns.ip("link del wa");
        expect_event(&mut events, "link removed", |e| {
            matches!(e, NetEvent::LinkRemoved { index, name } if *index == a_index && name == "wa")
        })
        .await;
    });
}

#[test]
fn wanted_rules6_follow_the_ipv4_layout() {
    let v6 = |s: &str| -> Ipv6Addr { s.parse().unwrap() };
    assert!(rules6(1000, 1000, MASK, &[], false).is_empty());
    let rules = rules6(
        1000,
        1000,
        MASK,
        &[
            (0, 0x1_0000, vec![v6("2001:db8:1::2"), v6("2001:db8:1::99")]),
            (2, 0x3_0000, vec![]),
        ],
        true,
    );
    let shown: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        shown,
        [
            "-6 1000 from all lookup main suppress_prefixlength 0",
            "-6 1010 fwmark 0x10000/0xff0000 lookup 1000",
            "-6 1012 fwmark 0x30000/0xff0000 lookup 1002",
            "-6 1100 from 2001:db8:1::2 lookup 1000",
            "-6 1100 from 2001:db8:1::99 lookup 1000",
            "-6 1199 from all lookup 1032",
            "-6 1200 from all iif lo lookup 1032",
        ]
    );
    assert!(rules.iter().all(|r| r.family == Family::Ipv6));
    // The messages round-trip, so sync_rules recognises its own rules.
    for r in &rules {
        assert_eq!(msg::parse_rule(&msg::rule_message(r)).as_ref(), Some(r));
    }
}

/// IPv6 tables (link-local gateways), rules from marks and from every
/// global address, the IPv6 balance route, and their removal; the IPv4
/// rules and foreign rules of both families stay as they are.
#[test]
fn ipv6_tables_rules_and_balance_route_marked_packets() {
    let ns = two_wans("rules6");
    ns.ip("addr add 2001:db8:1::2/64 dev w0 nodad");
    ns.ip("addr add 2001:db8:1::99/64 dev w0 nodad");
    ns.ip("addr add 2001:db8:2::2/64 dev w1 nodad");
    ns.ip("-6 rule add pref 1051 from 2001:db8:9::9 lookup 100");
    ns.ip("-6 rule add pref 1015 fwmark 0x90000/0xff0000 lookup 1009 proto 109");
    ns.block_on(|| async {
        let net = Net::connect().await.unwrap();
        let (w0, w1) = (index(&net, "w0").await, index(&net, "w1").await);
        let nh0 = Nexthop {
            gateway: gw("fe80::1"),
            ifindex: w0,
        };
        let nh1 = Nexthop {
            gateway: gw("fe80::2"),
            ifindex: w1,
        };
        assert_eq!(nh0.family(), Family::Ipv6);
        net.set_table_default(1000, nh0).await.unwrap();
        net.set_table_default(1001, nh1).await.unwrap();
        net.set_table_default(1001, nh1).await.unwrap();
        assert_eq!(
            net.table_default(Family::Ipv6, 1000).await.unwrap(),
            Some(nh0)
        );
        assert_eq!(net.table_default(Family::Ipv4, 1000).await.unwrap(), None);
        net.set_balance(Family::Ipv6, 1032, &[(nh0, 3), (nh1, 1)], false)
            .await
            .unwrap();
        let addrs0: Vec<Ipv6Addr> = net
            .ipv6_addrs(w0)
            .await
            .unwrap()
            .iter()
            .map(|a| a.addr())
            .collect();
        let mut sorted = addrs0.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            ["2001:db8:1::2", "2001:db8:1::99"].map(|s| s.parse::<Ipv6Addr>().unwrap()),
            "global addresses only"
        );
        let mut want = rules4(
            1000,
            1000,
            MASK,
            &[
                (0, 0x1_0000, Some(a("198.51.100.2"))),
                (1, 0x2_0000, Some(a("203.0.113.2"))),
            ],
            false,
        );
        want.extend(rules6(
            1000,
            1000,
            MASK,
            &[
                (0, 0x1_0000, addrs0),
                (1, 0x2_0000, vec!["2001:db8:2::2".parse().unwrap()]),
            ],
            false,
        ));
        net.sync_rules(&want).await.unwrap();
        let rules6 = ns.ip("-6 rule show");
        for line in [
            "1000:\tfrom all lookup main suppress_prefixlength 0 proto 109",
            "1010:\tfrom all fwmark 0x10000/0xff0000 lookup 1000 proto 109",
            "1011:\tfrom all fwmark 0x20000/0xff0000 lookup 1001 proto 109",
            "1100:\tfrom 2001:db8:1::2 lookup 1000 proto 109",
            "1100:\tfrom 2001:db8:1::99 lookup 1000 proto 109",
            "1101:\tfrom 2001:db8:2::2 lookup 1001 proto 109",
            "1200:\tfrom all iif lo lookup 1032 proto 109",
            "1051:\tfrom 2001:db8:9::9 lookup 100",
        ] {
            assert!(
                rules6.lines().any(|l| l.trim_end() == line),
                "missing {line:?} in\n{rules6}"
            );
        }
        assert!(!rules6.contains("1015:"), "stale rule kept:\n{rules6}");
        assert!(
            ns.ip("rule show")
                .contains("1100:\tfrom 198.51.100.2 lookup 1000 proto 109"),
            "IPv4 rules beside"
        );
        let key = |r: &RuleSpec| (r.family, r.priority, r.to_string());
        let mut have = net.mwan_rules().await.unwrap();
        have.sort_by_key(key);
        want.sort_by_key(key);
        assert_eq!(have, want);
        net.sync_rules(&want).await.unwrap();
        assert_eq!(ns.ip("-6 rule show"), rules6, "idempotent");

        // Marks and source addresses pick the WAN's table.
        assert_eq!(route_dev(&ns, "2001:db8:ff::1 mark 0x10000"), "w0");
        assert_eq!(route_dev(&ns, "2001:db8:ff::1 mark 0x20000"), "w1");
        assert_eq!(route_dev(&ns, "2001:db8:ff::1 from 2001:db8:1::99"), "w0");
        assert_eq!(route_dev(&ns, "2001:db8:ff::1 from 2001:db8:2::2"), "w1");
        // Connected destinations stay on the main table.
        assert_eq!(route_dev(&ns, "2001:db8:2::77 mark 0x10000"), "w1");
        let t0 = ns.ip("-6 route show table 1000");
        assert!(
            t0.starts_with("default via fe80::1 dev w0 proto 109"),
            "{t0}"
        );
        let balance = ns.ip("-6 route show table 1032");
        assert!(
            balance.contains("nexthop via fe80::1 dev w0 weight 3")
                && balance.contains("nexthop via fe80::2 dev w1 weight 1"),
            "{balance}"
        );
        // The router's own traffic (no default in main) uses the balance.
        ns.ip("-6 route get 2001:db8:ff::1");
        // One nexthop, unreachable, none, and back to two: replace works
        // between every shape.
        net.set_balance(Family::Ipv6, 1032, &[(nh1, 5)], false)
            .await
            .unwrap();
        assert_eq!(route_dev(&ns, "2001:db8:ff::1"), "w1");
        net.set_balance(Family::Ipv6, 1032, &[], true)
            .await
            .unwrap();
        let shown = ns.ip("-6 route show table 1032");
        assert!(shown.starts_with("unreachable default"), "{shown}");
        assert!(!ns
            .exec_output(&["ip", "-6", "route", "get", "2001:db8:ff::1"])
            .status
            .success());
        net.set_balance(Family::Ipv6, 1032, &[], false)
            .await
            .unwrap();
        assert_eq!(ns.ip("-6 route show table 1032").trim(), "");
        net.set_balance(Family::Ipv6, 1032, &[(nh0, 1), (nh1, 1)], false)
            .await
            .unwrap();
        assert!(ns
            .ip("-6 route show table 1032")
            .contains("nexthop via fe80::2"));

        // No IPv6 any more: mwan's IPv6 rules go, IPv4's and foreign stay.
        net.sync_rules(
            &want
                .iter()
                .filter(|r| r.family == Family::Ipv4)
                .cloned()
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
        let rules6 = ns.ip("-6 rule show");
        assert!(
            !rules6.contains("proto 109") && rules6.contains("1051:"),
            "{rules6}"
        );
        assert!(ns.ip("rule show").contains("proto 109"));

        // Teardown: every IPv6 rule and route of mwan's tables.
        net.sync_rules(&want).await.unwrap();
        net.remove_all_mwan(1000..=1032).await.unwrap();
        assert_eq!(ns.ip("-6 route show table all proto 109").trim(), "");
        for t in [1000, 1001, 1032] {
            assert_eq!(
                ns.ip(&format!("-6 route show table {t}")).trim(),
                "",
                "table {t}"
            );
        }
        for fam in ["-4", "-6"] {
            let rules = ns.ip(&format!("{fam} rule show"));
            assert!(!rules.contains("proto 109"), "{rules}");
        }
        assert!(ns.ip("-6 rule show").contains("1051:"));
    });
}

/// A dnsmasq sending Router Advertisements in its own namespace.
struct RaServer(std::process::Child);

impl RaServer {
    fn start(ns: &TestNs, iface: &str, prefix: &str) -> RaServer {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "dnsmasq", "--keep-in-foreground"])
            .args(["--no-resolv", "--no-hosts", "--port=0", "--bind-interfaces"])
            .arg(format!("--interface={iface}"))
            .args([
                "--enable-ra",
                "--pid-file=",
                "--log-facility=-",
                "--conf-file=/dev/null",
            ])
            .arg(format!("--dhcp-range={prefix},ra-only,64"))
            .arg(format!("--ra-param={iface},3,1800"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dnsmasq (dnsmasq-base) is needed for the RA tests");
        RaServer(child)
    }
}

impl Drop for RaServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `gateway6 = "auto"`: the router an RA announces (its link-local
/// address, on the WAN's interface) is what `learned_default` finds,
/// with the SLAAC address, both announced by netlink events; mwan's own
/// tables are not mistaken for it.
#[test]
fn gateway6_auto_is_the_router_of_router_advertisements() {
    let rtr = TestNs::new("ra-rtr");
    let isp = TestNs::new("ra-isp");
    rtr.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    rtr.ip(&format!(
        "link add w0 type veth peer name p0 netns {}",
        isp.name
    ));
    // While forwarding, the kernel takes RAs only with accept_ra = 2.
    rtr.exec(&["sysctl", "-qw", "net.ipv6.conf.w0.accept_ra=2"]);
    // One link-local address (no automatic one): the RAs come from it.
    isp.ip("link set p0 addrgenmode none");
    isp.ip("addr add 2001:db8:1::1/64 dev p0 nodad");
    isp.ip("addr add fe80::1/64 dev p0 nodad");
    isp.ip("link set p0 up");
    rtr.block_on(|| async {
        let net = Net::connect().await.unwrap();
        let mut events = net.events().unwrap();
        rtr.ip("link set w0 up");
        let w0 = index(&net, "w0").await;
        let _ra = RaServer::start(&isp, "p0", "2001:db8:1::");
        // The RA's route and the SLAAC address arrive as events: wait on
        // them (the RA comes once the ISP's link-local address is past
        // DAD), re-reading the kernel's state at each.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let slaac: ipnet::Ipv6Net = "2001:db8:1::/64".parse().unwrap();
        let (mut route_event, mut addr_event) = (false, false);
        let learned = loop {
            let nh = net
                .learned_default(Family::Ipv6, w0, 1000..=1032)
                .await
                .unwrap();
            let addrs = net.ipv6_addrs(w0).await.unwrap();
            if let (Some(nh), true) = (nh, addrs.iter().any(|a| slaac.contains(&a.addr()))) {
                if route_event && addr_event {
                    break nh;
                }
            }
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(NetEvent::Route { default: true, ifindex: Some(i), .. })) if i == w0 => {
                    route_event = true
                }
                Ok(Some(NetEvent::Addr { index, addr: IpNet::V6(a), added: true }))
                    if index == w0 && slaac.contains(&a.addr()) =>
                {
                    addr_event = true
                }
                Ok(Some(_)) => {}
                _ => panic!(
                    "no RA route and SLAAC address on w0 (events: route {route_event}, address {addr_event}):\n{}\n{}",
                    rtr.ip("-6 route show"),
                    rtr.ip("-6 addr show dev w0")
                ),
            }
        };
        assert_eq!(
            learned,
            Nexthop {
                gateway: gw("fe80::1"),
                ifindex: w0
            }
        );
        assert!(rtr.ip("-6 route show default").contains("proto ra"));
        // mwan's own table routes via the same router are not "learned".
        net.set_table_default(1000, learned).await.unwrap();
        rtr.ip("-6 route del default proto ra dev w0");
        assert_eq!(
            net.learned_default(Family::Ipv6, w0, 1000..=1032)
                .await
                .unwrap(),
            None
        );
        net.remove_all_mwan(1000..=1032).await.unwrap();
    });
}
