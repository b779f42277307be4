//! IPv6 fixtures: the extension-header walk, what is never touched, and the
//! classification shared with IPv4 over the IPv6 maps (`FLOWS6`, `WANS6`,
//! `POLICIES6`, `RULE_*6`, `BYPASS6`), per-family liveness and host pins
//! shared by both families.

use std::net::Ipv6Addr;

use lab::{SERVER, TUNNEL_IFACE};
use mwan::policy::Health::*;
use mwan_common::*;

use crate::fixtures::*;
use crate::packet::*;

/// Rules by IPv6 and IPv4 prefixes, on the tiered WANs (default: isp1).
const RULES6: &str = r#"
[[rule]]
name = "v4-only-dst"
dst = ["198.51.100.0/24"]
wans = ["isp4"]
[[rule]]
name = "v4-only-src"
src = ["192.0.2.0/24"]
wans = ["isp4"]
[[rule]]
name = "v6-dst"
dst = ["2001:db8:ff::/48"]
wans = ["isp2"]
[[rule]]
name = "ping"
proto = "icmp"
wans = ["isp3"]
"#;

/// A second LAN host's MAC, and the MAC of the dual-stack host.
const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 1];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0xbb, 2];

/// Host A (`MAC_A`, IPv4 `HOST`) pinned to isp1 while isp2 is unknown in
/// both families.
fn host_a_pinned_to_isp1() -> Vec<Step> {
    vec![
        health(&[("isp2", Unknown)]),
        health6(&[("isp2", Unknown)]),
        send_from(
            MAC_A,
            Pkt::tcp(HOST, 40000, SERVER, 443, SYN),
            Expect::pin("isp1").host(HostPin::Set(W::Named("isp1"))),
        ),
    ]
}

pub fn fixtures6() -> Vec<Fixture> {
    let plain = config("", TIERED, "");
    let syn = Pkt6::tcp(HOST6, 40000, SERVER6, 443, SYN);
    let ack = Pkt6::tcp(HOST6, 40000, SERVER6, 443, ACK);
    let udp = Pkt6::udp(HOST6, 40001, SERVER6, 8081);
    let isp1 = W::Named("isp1");
    let isp2 = W::Named("isp2");
    // The same SYN from another source port (a new flow each).
    let syn_from = |sport: u16| Pkt6::tcp(HOST6, sport, SERVER6, 443, SYN);
    vec![
        Fixture {
            name: "IPv6: a lost pin is made again from the WAN conntrack records",
            config: plain.clone(),
            steps: vec![
                record(ack.clone(), Some("isp2")),
                send6(ack.clone(), Expect::recorded("isp2")),
                send6(ack.clone().payload(100), Expect::follows("isp2")),
                record(udp.clone(), Some("isp3")),
                send6(udp.clone(), Expect::recorded("isp3")),
            ],
        },
        Fixture {
            name: "IPv6 TCP: SYN pinned and marked, the connection follows, mid-stream left alone",
            config: plain.clone(),
            steps: vec![
                send6(ack.clone(), Expect::untouched(GS_MIDSTREAM)),
                send6(syn.clone(), Expect::pin("isp1")),
                send6(syn.clone(), Expect::follows("isp1")),
                send6(ack.clone().payload(1000), Expect::follows("isp1")),
                send6(
                    Pkt6::tcp(HOST6, 40000, SERVER6, 443, FIN | ACK),
                    Expect::follows("isp1"),
                ),
            ],
        },
        Fixture {
            name: "IPv6 UDP: pinned, followed, placed anew after conntrack's timeout",
            config: plain.clone(),
            steps: vec![
                send6(udp.clone(), Expect::pin("isp1")),
                send6(udp.clone(), Expect::follows("isp1")),
                health6(&[("isp1", Degraded)]),
                send6(udp.clone(), Expect::follows("isp1")),
                Step::Age(udp.clone().into(), 200),
                send6(udp.clone(), Expect::pin("isp2")),
            ],
        },
        Fixture {
            name: "ICMPv6 echo requests are pinned by identifier",
            config: plain.clone(),
            steps: vec![
                send6(Pkt6::echo(HOST6, SERVER6, 0x1234), Expect::pin("isp1")),
                send6(Pkt6::echo(HOST6, SERVER6, 0x1234), Expect::follows("isp1")),
                send6(Pkt6::echo(HOST6, SERVER6, 0x1235), Expect::pin("isp1")),
            ],
        },
        Fixture {
            name: "Neighbour Discovery, MLD, echo replies and ICMPv6 errors are never touched",
            config: plain.clone(),
            steps: {
                let ll = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x10);
                let all_routers = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
                let mld = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16);
                let mut v: Vec<Step> = [133, 134, 135, 136, 137]
                    .into_iter()
                    .map(|ty| send6(Pkt6::icmp(ll, all_routers, ty), Expect::untouched(GS_PASS)))
                    .collect();
                // ND from a global address to a global one (not bypassed).
                v.push(send6(
                    Pkt6::icmp(HOST6, SERVER6, 135),
                    Expect::untouched(GS_PASS),
                ));
                // MLD query, report, done, MLDv2 report: behind a hop-by-hop
                // header (router alert), as hosts send them.
                for ty in [130, 131, 132, 143] {
                    v.push(send6(
                        Pkt6::icmp(ll, mld, ty).ext(HOP, 0),
                        Expect::untouched(GS_PASS),
                    ));
                }
                // Destination unreachable, packet too big, time exceeded,
                // parameter problem, echo reply.
                for ty in [1, 2, 3, 4, 129] {
                    v.push(send6(
                        Pkt6::icmp(HOST6, SERVER6, ty),
                        Expect::untouched(GS_PASS),
                    ));
                }
                v
            },
        },
        Fixture {
            name: "unknown IPv6 next headers (ESP, AH, no next header, GRE) pass unmarked",
            config: plain.clone(),
            steps: [50u8, 51, NO_NEXT, 47]
                .into_iter()
                .map(|p| {
                    send6(
                        Pkt6::new(HOST6, SERVER6, L4::Raw(p)).payload(40),
                        Expect::untouched(GS_PASS),
                    )
                })
                .chain([send6(
                    // No next header after a destination options header.
                    Pkt6::new(HOST6, SERVER6, L4::Raw(NO_NEXT)).ext(DEST, 0),
                    Expect::untouched(GS_PASS),
                )])
                .collect(),
        },
        Fixture {
            name: "every extension header kind is walked to TCP, UDP or ICMPv6; at most six",
            config: plain.clone(),
            steps: vec![
                send6(syn_from(41000).ext(HOP, 0), Expect::pin("isp1")),
                send6(syn_from(41001).ext(ROUTING, 2), Expect::pin("isp1")),
                send6(syn_from(41002).ext(DEST, 1), Expect::pin("isp1")),
                // A first fragment (offset 0) carries its L4 header.
                send6(syn_from(41003).ext(FRAGMENT, 0), Expect::pin("isp1")),
                send6(
                    Pkt6::udp(HOST6, 41004, SERVER6, 53).ext(HOP, 0).ext(DEST, 0),
                    Expect::pin("isp1"),
                ),
                send6(
                    Pkt6::echo(HOST6, SERVER6, 9).ext(DEST, 0),
                    Expect::pin("isp1"),
                ),
                // Six: the most the walk takes.
                send6(
                    syn_from(41005)
                        .ext(HOP, 0)
                        .ext(DEST, 0)
                        .ext(ROUTING, 0)
                        .ext(FRAGMENT, 0)
                        .ext(DEST, 0)
                        .ext(DEST, 0),
                    Expect::pin("isp1"),
                ),
                // Seven: not mwan's business (unmarked, unpinned).
                send6(
                    syn_from(41006)
                        .ext(HOP, 0)
                        .ext(DEST, 0)
                        .ext(ROUTING, 0)
                        .ext(FRAGMENT, 0)
                        .ext(DEST, 0)
                        .ext(DEST, 0)
                        .ext(DEST, 0),
                    Expect::untouched(GS_PASS),
                ),
            ],
        },
        Fixture {
            name: "IPv6 non-first fragments are counted and unmarked",
            config: plain.clone(),
            steps: vec![
                send6(syn.clone().ext(FRAGMENT, 0), Expect::pin("isp1")),
                // A later fragment of the pinned flow: no L4 header, the
                // pin is not touched.
                send6(
                    Pkt6::new(HOST6, SERVER6, L4::Raw(PROTO_TCP))
                        .payload(64)
                        .ext(FRAGMENT, 185),
                    Expect::untouched(GS_FRAGMENTS),
                ),
                send6(
                    Pkt6::new(HOST6, SERVER6, L4::Raw(PROTO_UDP))
                        .payload(64)
                        .ext(HOP, 0)
                        .ext(FRAGMENT, 1),
                    Expect::untouched(GS_FRAGMENTS),
                ),
            ],
        },
        Fixture {
            name: "malformed IPv6 packets make no pin",
            config: plain.clone(),
            steps: vec![
                // An IPv6 ethertype whose header is not version 6.
                send6(syn.clone().version(4), Expect::untouched(GS_MALFORMED)),
                // Payload length beyond the frame.
                send6(syn.clone().payload_len(21), Expect::untouched(GS_MALFORMED)),
                send6(syn.clone().payload_len(1400), Expect::untouched(GS_MALFORMED)),
                // L4 headers cut short (payload length agrees).
                send6(syn.clone().cut(13), Expect::untouched(GS_MALFORMED)),
                send6(
                    Pkt6::udp(HOST6, 40001, SERVER6, 8081).payload(0).cut(4),
                    Expect::untouched(GS_MALFORMED),
                ),
                send6(
                    Pkt6::echo(HOST6, SERVER6, 7).payload(0).cut(6),
                    Expect::untouched(GS_MALFORMED),
                ),
                // An extension header cut short.
                send6(syn.clone().ext(HOP, 1).cut(12), Expect::untouched(GS_MALFORMED)),
                // A first fragment too short for its TCP header.
                send6(
                    syn.clone().ext(FRAGMENT, 0).cut(8 + 10),
                    Expect::untouched(GS_MALFORMED),
                ),
                // Nothing above left a pin: the flow is still new.
                send6(syn.clone(), Expect::pin("isp1")),
            ],
        },
        Fixture {
            name: "IPv6: connected and link-local destinations bypass, premarked packets are respected",
            config: plain.clone(),
            steps: vec![
                send6(
                    Pkt6::tcp(HOST6, 40000, Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1), 22, SYN),
                    Expect::untouched(GS_BYPASS),
                ),
                send6(
                    Pkt6::udp(HOST6, 40000, Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1), 53),
                    Expect::untouched(GS_BYPASS),
                ),
                send_on("lan0", 0x0002_0000, syn.clone().into(), Expect::untouched(GS_PREMARKED)),
            ],
        },
        Fixture {
            name: "rules: an IPv6 dst CIDR steers IPv6; IPv4-only rules never match IPv6; icmp matches ICMPv6",
            config: config("", TIERED, RULES6),
            steps: vec![
                // 2001:db8:ff::/48 → isp2.
                send6(syn.clone(), Expect::pin("isp2")),
                // Elsewhere: no IPv4-only rule (src 192.0.2.0/24 would
                // match any IPv4 host here) applies: the default.
                send6(
                    Pkt6::tcp(HOST6, 40000, SERVER6_B, 443, SYN),
                    Expect::pin("isp1"),
                ),
                send6(Pkt6::echo(HOST6, SERVER6_B, 1), Expect::pin("isp3")),
                // The same rules for IPv4: the IPv4-only rule matches.
                send(Pkt::tcp(HOST, 40000, SERVER, 443, SYN), Expect::pin("isp4")),
            ],
        },
        Fixture {
            name: "per-family liveness: IPv6 of a WAN dies, its IPv6 flows move, its IPv4 flows stay",
            config: plain.clone(),
            steps: vec![
                send6(syn.clone(), Expect::pin("isp1")),
                send(Pkt::tcp(HOST, 40000, SERVER, 443, SYN), Expect::pin("isp1")),
                health6(&[("isp1", Bad)]),
                send6(
                    ack.clone(),
                    Expect {
                        mark: Mark::Wan(isp2),
                        flow: Flow::Moved {
                            to: isp2,
                            from: "isp1",
                        },
                        host: HostPin::Unchanged,
                        counters: vec![(GS_REPINS, 1)],
                        passive: None,
                    },
                ),
                send(Pkt::tcp(HOST, 40000, SERVER, 443, ACK), Expect::follows("isp1")),
                // New flows: IPv6 to isp2, IPv4 still to isp1.
                send6(syn_from(40100), Expect::pin("isp2")),
                send(Pkt::tcp(HOST, 40100, SERVER, 443, SYN), Expect::pin("isp1")),
            ],
        },
        Fixture {
            name: "sticky hosts by MAC: one pin for a host's IPv4 and two IPv6 addresses",
            config: config("sticky = \"host\"", LOPSIDED, ""),
            steps: [
                host_a_pinned_to_isp1(),
                vec![health(&[("isp2", Good)]), health6(&[("isp2", Good)])],
                vec![
                // isp2 holds 1023 of 1024 slots in both families, yet
                // every address of the host stays on isp1.
                send_from(MAC_A, syn.clone(), Expect::pin("isp1").also(GS_HOST_HITS)),
                send_from(
                    MAC_A,
                    Pkt6::tcp(HOST6_TMP, 40000, SERVER6, 443, SYN),
                    Expect::pin("isp1").also(GS_HOST_HITS),
                ),
                send_from(MAC_A, udp.clone(), Expect::pin("isp1").also(GS_HOST_HITS)),
                send_from(MAC_A, ack.clone(), Expect::follows("isp1")),
                // Another host (MAC) with an address of the same /64 has
                // its own pin.
                send_from(
                    MAC_B,
                    Pkt6::tcp(
                        Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x22),
                        40000,
                        SERVER6,
                        443,
                        SYN,
                    ),
                    Expect {
                        mark: Mark::Wan(W::HostPin),
                        flow: Flow::New(Some(W::HostPin)),
                        host: HostPin::Set(W::HostPin),
                        counters: vec![(GS_NEW_FLOWS, 1)],
                        passive: None,
                    },
                ),
                ],
            ]
            .concat(),
        },
        Fixture {
            name: "sticky hosts: a WAN down in one family only keeps the host's pin for the other",
            config: config("sticky = \"host\"", LOPSIDED, ""),
            steps: [
                host_a_pinned_to_isp1(),
                vec![
                health(&[("isp2", Good)]),
                // isp1's IPv6 breaks: the host's IPv6 goes to isp2 without
                // moving its pin...
                health6(&[("isp2", Good), ("isp1", Bad)]),
                send_from(MAC_A, syn.clone(), Expect::pin("isp2")),
                // ...so its IPv4 stays on isp1.
                send_from(
                    MAC_A,
                    Pkt::tcp(HOST, 40001, SERVER, 443, SYN),
                    Expect::pin("isp1").also(GS_HOST_HITS),
                ),
                // Down in both families: the pin moves.
                health(&[("isp1", Bad)]),
                send_from(
                    MAC_A,
                    Pkt::tcp(HOST, 40002, SERVER, 443, SYN),
                    Expect::pin("isp2").host(HostPin::Set(isp2)),
                ),
                ],
            ]
            .concat(),
        },
        Fixture {
            name: "sticky_key = \"address\": a host is its IPv4 address or its IPv6 /64",
            config: config("sticky = \"host\"\nsticky_key = \"address\"", LOPSIDED, ""),
            steps: vec![
                health6(&[("isp2", Unknown)]),
                send_from(MAC_A, syn.clone(), Expect::pin("isp1").host(HostPin::Set(isp1))),
                health6(&[("isp2", Good)]),
                // Another address of the /64, from another MAC (a router's
                // LAN behind this one would show one MAC for all).
                send_from(
                    MAC_B,
                    Pkt6::tcp(HOST6_TMP, 40000, SERVER6, 443, SYN),
                    Expect::pin("isp1").also(GS_HOST_HITS),
                ),
            ],
        },
        // `mwan_lan_l3` sees the IPv6 packet at offset 0 (see the L3
        // fixture in `fixtures`): BPF_PROG_TEST_RUN takes the protocol from
        // bytes 12-13, which are the third group of the source address.
        Fixture {
            name: "mwan_lan_l3: IPv6 is pinned and marked",
            config: plain.clone(),
            steps: {
                let src = Ipv6Addr::new(0x2001, 0xdb8, 0x86dd, 0, 0, 0, 0, 0x10);
                vec![
                    send_on(
                        TUNNEL_IFACE,
                        0,
                        Pkt6::tcp(src, 40000, SERVER6, 443, SYN).into(),
                        Expect::pin("isp1"),
                    ),
                    send_on(
                        TUNNEL_IFACE,
                        0,
                        Pkt6::tcp(src, 40000, SERVER6, 443, ACK).into(),
                        Expect::follows("isp1"),
                    ),
                ]
            },
        },
    ]
}
