use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::Instant;

use super::*;
use crate::routing::testns::{wan_lab, TestNs};

const NLA_F_NESTED: u16 = 0x8000;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_EXCL: u16 = 0x200;
const CTA_STATUS: u16 = 3;
const CTA_TIMEOUT: u16 = 7;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// An attribute as the kernel encodes it.
fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&((NLA_HDRLEN + value.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(value);
    a.resize(align(a.len()), 0);
    a
}

fn nest(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
    nla(kind | NLA_F_NESTED, &parts.concat())
}

fn tuple(t: &CtTuple) -> Vec<u8> {
    let addrs = nest(
        CTA_TUPLE_IP,
        &[
            nla(
                if t.src.is_ipv4() {
                    CTA_IP_V4_SRC
                } else {
                    CTA_IP_V6_SRC
                },
                &octets(t.src),
            ),
            nla(
                if t.dst.is_ipv4() {
                    CTA_IP_V4_DST
                } else {
                    CTA_IP_V6_DST
                },
                &octets(t.dst),
            ),
        ],
    );
    let proto = nest(
        CTA_TUPLE_PROTO,
        &[
            nla(CTA_PROTO_NUM, &[t.proto]),
            nla(CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes()),
            nla(CTA_PROTO_DST_PORT, &t.dport.to_be_bytes()),
        ],
    );
    [addrs, proto].concat()
}

fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> CtTuple {
    CtTuple {
        proto: 17,
        src: ip(src),
        dst: ip(dst),
        sport,
        dport,
    }
}

#[test]
fn dump_request_bytes() {
    let mut want = Vec::new();
    want.extend_from_slice(&20u32.to_ne_bytes());
    want.extend_from_slice(&0x0101u16.to_ne_bytes()); // ctnetlink, GET
    want.extend_from_slice(&0x0301u16.to_ne_bytes()); // REQUEST | DUMP
    want.extend_from_slice(&7u32.to_ne_bytes());
    want.extend_from_slice(&0u32.to_ne_bytes());
    want.extend_from_slice(&[0, 0, 0, 0]); // AF_UNSPEC: both families
    assert_eq!(
        request(
            IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_DUMP,
            7,
            AF_UNSPEC,
            &[]
        ),
        want
    );
}

#[test]
fn entries_decode_and_are_deleted_by_their_dumped_identity() {
    let orig = udp("100.64.1.2", 40000, "192.0.2.10", 5000);
    let reply = udp("192.0.2.10", 5000, "203.0.113.1", 40000);
    let orig_attr = nest(CTA_TUPLE_ORIG, &[tuple(&orig)]);
    let zone = nla(CTA_ZONE, &5u16.to_be_bytes());
    let id = nla(CTA_ID, &77u32.to_be_bytes());
    let attrs = [
        orig_attr.clone(),
        nest(CTA_TUPLE_REPLY, &[tuple(&reply)]),
        nla(CTA_STATUS, &0x18u32.to_be_bytes()),
        nla(CTA_MARK, &0x1_0000u32.to_be_bytes()),
        id.clone(),
        zone.clone(),
    ]
    .concat();
    // Two messages in one datagram, as a dump sends them.
    let mut datagram = request(IPCTNL_MSG_CT_NEW, NLM_F_MULTI, 3, AF_INET, &attrs);
    datagram.extend(request(
        IPCTNL_MSG_CT_NEW,
        NLM_F_MULTI | NLM_F_DUMP_INTR,
        3,
        AF_INET,
        &attrs,
    ));
    let msgs: Vec<Message> = messages(&datagram).collect();
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        (msgs[0].kind, msgs[0].seq, msgs[1].flags),
        (0x0100, 3, NLM_F_MULTI | NLM_F_DUMP_INTR)
    );

    let e = parse_entry(msgs[0].payload).unwrap();
    assert_eq!((&e.orig, &e.reply, e.mark), (&orig, &reply, 0x1_0000));
    assert_eq!(e.key, [orig_attr, id, zone].concat());
    let del = request(
        IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        9,
        e.family,
        &e.key,
    );
    assert_eq!(del[16], AF_INET);
    assert_eq!(
        &del[4..8],
        [0x0102u16.to_ne_bytes(), 0x0005u16.to_ne_bytes()].concat()
    );
    assert_eq!(del.len(), 20 + e.key.len());
    assert_eq!(
        u32::from_ne_bytes(del[0..4].try_into().unwrap()) as usize,
        del.len()
    );
    assert_eq!(&del[20..], &e.key[..]);
}

#[test]
fn icmp_tuples_hold_the_echo_id() {
    let icmp = |src: &str, dst: &str, kind: u8| {
        nest(
            CTA_TUPLE_IP,
            &[
                nla(CTA_IP_V4_SRC, &octets(ip(src))),
                nla(CTA_IP_V4_DST, &octets(ip(dst))),
            ],
        )
        .into_iter()
        .chain(nest(
            CTA_TUPLE_PROTO,
            &[
                nla(CTA_PROTO_NUM, &[1]),
                nla(CTA_PROTO_ICMP_ID, &0x1234u16.to_be_bytes()),
                nla(CTA_PROTO_ICMP_TYPE, &[kind]),
                nla(CTA_PROTO_ICMP_CODE, &[0]),
            ],
        ))
        .collect::<Vec<u8>>()
    };
    let attrs = [
        nest(CTA_TUPLE_ORIG, &[icmp("100.64.1.2", "192.0.2.10", 8)]),
        nest(CTA_TUPLE_REPLY, &[icmp("192.0.2.10", "100.64.1.2", 0)]),
    ]
    .concat();
    let mut payload = vec![2, 0, 0, 0];
    payload.extend(&attrs);
    let e = parse_entry(&payload).unwrap();
    assert_eq!((e.orig.proto, e.orig.sport, e.orig.dport), (1, 0x1234, 0));
    assert_eq!(e.mark, 0);
    // Neither IPv4 nor IPv6, or without a reply tuple: skipped.
    payload[0] = 7;
    assert!(parse_entry(&payload).is_none());
    let mut payload = vec![2, 0, 0, 0];
    payload.extend(nest(CTA_TUPLE_ORIG, &[icmp("100.64.1.2", "192.0.2.10", 8)]));
    assert!(parse_entry(&payload).is_none());
}

/// IPv6 entries: 16-byte addresses, the ICMPv6 echo id, and the family
/// in the requests that name them.
#[test]
fn ipv6_entries_decode() {
    let orig = CtTuple {
        proto: 6,
        src: ip("fd00:1::2"),
        dst: ip("2001:db8:ff::10"),
        sport: 40000,
        dport: 443,
    };
    let reply = CtTuple {
        proto: 6,
        src: ip("2001:db8:ff::10"),
        dst: ip("2001:db8:a2::2"),
        sport: 443,
        dport: 40000,
    };
    let mut payload = vec![AF_INET6, 0, 0, 0];
    payload.extend(nest(CTA_TUPLE_ORIG, &[tuple(&orig)]));
    payload.extend(nest(CTA_TUPLE_REPLY, &[tuple(&reply)]));
    let e = parse_entry(&payload).unwrap();
    assert_eq!((&e.orig, &e.reply), (&orig, &reply));
    assert!(e.is_ipv6());
    let echo = |src: &str, dst: &str| {
        [
            nest(
                CTA_TUPLE_IP,
                &[
                    nla(CTA_IP_V6_SRC, &octets(ip(src))),
                    nla(CTA_IP_V6_DST, &octets(ip(dst))),
                ],
            ),
            nest(
                CTA_TUPLE_PROTO,
                &[
                    nla(CTA_PROTO_NUM, &[58]),
                    nla(CTA_PROTO_ICMPV6_ID, &0x4321u16.to_be_bytes()),
                ],
            ),
        ]
        .concat()
    };
    let mut payload = vec![AF_INET6, 0, 0, 0];
    payload.extend(nest(
        CTA_TUPLE_ORIG,
        &[echo("fd00:1::2", "2001:db8:ff::10")],
    ));
    payload.extend(nest(
        CTA_TUPLE_REPLY,
        &[echo("2001:db8:ff::10", "fd00:1::2")],
    ));
    let e = parse_entry(&payload).unwrap();
    assert_eq!((e.orig.proto, e.orig.sport, e.orig.dport), (58, 0x4321, 0));
}

#[test]
fn acks_and_errors() {
    let mut datagram = Vec::new();
    for (seq, errno) in [(1u32, 0i32), (2, -libc::ENOENT)] {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&errno.to_ne_bytes());
        m.extend_from_slice(&[0; 16]); // the request's header
        datagram.extend(m);
    }
    let codes: Vec<(u32, i32)> = messages(&datagram)
        .map(|m| (m.seq, error_code(m.payload)))
        .collect();
    assert_eq!(codes, vec![(1, 0), (2, libc::ENOENT)]);
    // A truncated message ends the iteration.
    assert_eq!(messages(&datagram[..50]).count(), 1);
}

/// Connections through a masquerading router: two UDP flows and a TCP
/// connection; one UDP flow is deleted, the rest stay (checked with the
/// `conntrack` tool when installed, and with `dump`).
#[test]
fn deletes_only_matching_entries_of_real_traffic() {
    let t = wan_lab("ct");
    let nat = [crate::nft::NftWan {
        name: "isp2".into(),
        interface: "wan2".into(),
        mark: 0x2_0000,
        nat: true,
        snat: None,
        nat6: crate::nft::Nat6::None,
    }];
    t.router
        .block_on(|| async {
            crate::nft::apply(&crate::nft::Table {
                wans: &nat,
                mark_mask: 0x00ff_0000,
                refuse_from: &[],
                divert: None,
                restore: true,
            })
            .await
        })
        .unwrap();
    let listener = t.server.run(|| TcpListener::bind("192.0.2.10:80").unwrap());
    let (ports, _tcp) = t.lan.run(|| {
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                let s = UdpSocket::bind("100.64.1.2:0").unwrap();
                s.send_to(b"x", "192.0.2.10:5000").unwrap();
                s.local_addr().unwrap().port()
            })
            .collect();
        (ports, TcpStream::connect("192.0.2.10:80").unwrap())
    });
    listener.accept().unwrap();

    let udp_of = |entries: &[CtEntry], port| {
        entries
            .iter()
            .any(|e| e.orig.proto == 17 && e.orig.sport == port)
    };
    // The UDP datagrams cross the router asynchronously; bounded wait.
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    let entries = loop {
        let entries = t.router.run(dump).unwrap();
        if ports.iter().all(|p| udp_of(&entries, *p)) || Instant::now() > deadline {
            break entries;
        }
        std::thread::yield_now();
    };
    assert!(ports.iter().all(|p| udp_of(&entries, *p)), "{entries:?}");
    let tcp = entries
        .iter()
        .find(|e| e.orig.proto == 6)
        .expect("tcp entry");
    assert_eq!(
        tcp.orig,
        CtTuple {
            proto: 6,
            ..tcp.orig.clone()
        }
    );
    assert_eq!(
        (tcp.reply.src, tcp.reply.dst),
        (ip("192.0.2.10"), ip("203.0.113.1"))
    );
    // mwan's nftables table recorded the WAN of each new connection.
    assert!(entries.iter().all(|e| e.mark == 0x2_0000), "{entries:?}");

    let gone = ports[0];
    let n = t
        .router
        .run(|| delete_where(|e| e.orig.proto == 17 && e.orig.sport == gone))
        .unwrap();
    assert_eq!(n, 1);
    let entries = t.router.run(dump).unwrap();
    assert!(
        !udp_of(&entries, gone) && udp_of(&entries, ports[1]),
        "{entries:?}"
    );
    assert!(entries.iter().any(|e| e.orig.proto == 6));
    if std::process::Command::new("conntrack")
        .arg("--version")
        .output()
        .is_ok()
    {
        let listed = String::from_utf8(t.router.exec_output(&["conntrack", "-L"]).stdout).unwrap();
        assert!(!listed.contains(&format!("sport={gone} ")), "{listed}");
        assert!(
            listed.contains(&format!("sport={} ", ports[1])) && listed.contains("tcp "),
            "{listed}"
        );
    }
    assert_eq!(
        t.router
            .run(|| delete_where(|e| e.orig.sport == gone))
            .unwrap(),
        0
    );

    // Marks: only the masked bits change, only where asked, only once.
    let kept = ports[1];
    let remark = || {
        t.router.run(|| {
            mark_where(0x00ff_0000, |e| {
                (e.orig.proto == 17 && e.orig.sport == kept).then_some(0x0005_0000)
            })
        })
    };
    assert_eq!(remark().unwrap(), 1);
    assert_eq!(remark().unwrap(), 0);
    let entries = t.router.run(dump).unwrap();
    for e in &entries {
        let want = if e.orig.proto == 17 {
            0x5_0000
        } else {
            0x2_0000
        };
        assert_eq!(e.mark, want, "{e:?}");
    }
}

/// 100 000 entries: a dump of many datagrams and deletes in batches.
#[test]
fn large_tables() {
    const N: u32 = 100_000;
    let ns = TestNs::new("ct-many");
    ns.run(|| {
        let items: Vec<Vec<u8>> = (0..N)
            .map(|i| {
                let src = IpAddr::V4(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i / 50_000,
                ));
                let sport = 1024 + (i % 50_000) as u16;
                let orig = CtTuple {
                    src,
                    sport,
                    ..udp("0.0.0.0", 0, "192.0.2.10", 5000)
                };
                let reply = CtTuple {
                    dst: src,
                    dport: sport,
                    ..udp("192.0.2.10", 5000, "0.0.0.0", 0)
                };
                [
                    nest(CTA_TUPLE_ORIG, &[tuple(&orig)]),
                    nest(CTA_TUPLE_REPLY, &[tuple(&reply)]),
                    nla(CTA_TIMEOUT, &600u32.to_be_bytes()),
                    nla(CTA_MARK, &((i % 2) << 16).to_be_bytes()),
                ]
                .concat()
            })
            .collect();
        let refs: Vec<(u8, &[u8])> = items.iter().map(|i| (AF_INET, i.as_slice())).collect();
        let mut socket = CtSocket::open().unwrap();
        let created = socket
            .send_all(IPCTNL_MSG_CT_NEW, NLM_F_CREATE | NLM_F_EXCL, &refs, |i| {
                format!("creating {i}")
            })
            .unwrap();
        assert_eq!(created, N as usize);

        let started = Instant::now();
        assert_eq!(dump().unwrap().len(), N as usize);
        let dumped = started.elapsed();
        let deleted = delete_where(|e| e.mark == 0x1_0000).unwrap();
        let total = started.elapsed();
        assert_eq!(deleted, N as usize / 2);
        let left = dump().unwrap();
        assert_eq!(left.len(), N as usize / 2);
        assert!(left.iter().all(|e| e.mark == 0));
        eprintln!("{N} entries: dump {dumped:?}, dump + delete half {total:?}");
    });
}

/// Real IPv6 connections through a NAT66 router: dumped beside the IPv4
/// ones with their translated reply tuple, marked, and deleted alone.
#[test]
fn ipv6_entries_of_real_traffic_are_marked_and_deleted() {
    let t = wan_lab("ct6").with_ipv6();
    let nat = [crate::nft::NftWan {
        name: "isp2".into(),
        interface: "wan2".into(),
        mark: 0x2_0000,
        nat: true,
        snat: None,
        nat6: crate::nft::Nat6::Masquerade,
    }];
    t.router
        .block_on(|| async {
            crate::nft::apply(&crate::nft::Table {
                wans: &nat,
                mark_mask: 0x00ff_0000,
                refuse_from: &[],
                divert: None,
                restore: true,
            })
            .await
        })
        .unwrap();
    let server6 = t
        .server
        .run(|| UdpSocket::bind("[2001:db8:ff::10]:5000").unwrap());
    let server4 = t.server.run(|| UdpSocket::bind("192.0.2.10:5000").unwrap());
    let (p6, p4) = t.lan.run(|| {
        let s6 = UdpSocket::bind("[fd00:1::2]:0").unwrap();
        s6.send_to(b"6", "[2001:db8:ff::10]:5000").unwrap();
        let s4 = UdpSocket::bind("100.64.1.2:0").unwrap();
        s4.send_to(b"4", "192.0.2.10:5000").unwrap();
        (
            s6.local_addr().unwrap().port(),
            s4.local_addr().unwrap().port(),
        )
    });
    let mut buf = [0; 4];
    for s in [&server6, &server4] {
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.recv_from(&mut buf).expect("datagram through the router");
    }
    let entries = t.router.run(dump).unwrap();
    let e6 = entries
        .iter()
        .find(|e| e.orig.sport == p6 && e.is_ipv6())
        .expect("IPv6 entry");
    assert_eq!(
        (e6.orig.src, e6.reply.dst),
        (ip("fd00:1::2"), ip("2001:db8:2::1"))
    );
    assert_eq!(e6.mark, 0x2_0000, "the ct mark record covers IPv6");
    assert!(entries.iter().any(|e| e.orig.sport == p4 && !e.is_ipv6()));
    // Marks set through ctnetlink on an IPv6 entry.
    let marked = t
        .router
        .run(|| mark_where(0xff, |e| (e.orig.sport == p6).then_some(0x42)))
        .unwrap();
    assert_eq!(marked, 1);
    let deleted = t
        .router
        .run(|| delete_where(|e| e.is_ipv6() && e.mark == 0x2_0042))
        .unwrap();
    assert_eq!(deleted, 1);
    let left = t.router.run(dump).unwrap();
    assert!(!left.iter().any(|e| e.orig.sport == p6 && e.is_ipv6()));
    assert!(left.iter().any(|e| e.orig.sport == p4), "IPv4 entry kept");
}

/// A flush by mark: the kernel deletes exactly the entries of the family
/// asked whose mark has the value in the mask's bits (other bits set or
/// not), in one request, however many there are.
#[test]
fn flush_by_mark_deletes_exactly_the_marked_entries_of_a_family() {
    const N: u32 = 100_000;
    const MASK: u32 = 0x00ff_0000;
    let ns = TestNs::new("ct-flush");
    // Entry i: IPv4 (IPv6 for every 1000th), mark WAN 1 or 2 in the mask,
    // every third also a bit outside it.
    let mark = |i: u32| ((1 + i % 2) << 16) | if i.is_multiple_of(3) { 0x42 } else { 0 };
    let v6 = |i: u32| i.is_multiple_of(1000);
    ns.run(|| {
        let items: Vec<(u8, Vec<u8>)> = (0..N)
            .map(|i| {
                let sport = 1024 + (i % 50_000) as u16;
                let (src, dst) = if v6(i) {
                    (
                        ip(&format!("fd00::{:x}", i / 50_000 + 1)),
                        ip("2001:db8::10"),
                    )
                } else {
                    let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i / 50_000);
                    (IpAddr::V4(src), ip("192.0.2.10"))
                };
                let orig = CtTuple {
                    src,
                    sport,
                    ..udp("0.0.0.0", 0, "0.0.0.0", 5000)
                };
                let orig = CtTuple { dst, ..orig };
                let reply = CtTuple {
                    src: dst,
                    dst: src,
                    sport: 5000,
                    dport: sport,
                    proto: 17,
                };
                let attrs = [
                    nest(CTA_TUPLE_ORIG, &[tuple(&orig)]),
                    nest(CTA_TUPLE_REPLY, &[tuple(&reply)]),
                    nla(CTA_TIMEOUT, &600u32.to_be_bytes()),
                    nla(CTA_MARK, &mark(i).to_be_bytes()),
                ]
                .concat();
                (if v6(i) { AF_INET6 } else { AF_INET }, attrs)
            })
            .collect();
        let refs: Vec<(u8, &[u8])> = items.iter().map(|(f, a)| (*f, a.as_slice())).collect();
        let created = CtSocket::open()
            .unwrap()
            .send_all(IPCTNL_MSG_CT_NEW, NLM_F_CREATE | NLM_F_EXCL, &refs, |i| {
                format!("creating {i}")
            })
            .unwrap();
        assert_eq!(created, N as usize);

        let started = Instant::now();
        flush_marked(Some(Family::Ipv4), 0x1_0000, MASK).unwrap();
        let took = started.elapsed();
        let left = dump().unwrap();
        let want = (0..N)
            .filter(|i| v6(*i) || mark(*i) & MASK != 0x1_0000)
            .count();
        assert_eq!(left.len(), want);
        assert!(
            left.iter()
                .all(|e| e.is_ipv6() || e.mark & MASK == 0x2_0000),
            "an IPv4 entry of WAN 1 is left"
        );
        let v6_wan1 = left
            .iter()
            .filter(|e| e.is_ipv6() && e.mark & MASK == 0x1_0000)
            .count();
        assert_eq!(v6_wan1, 100, "the IPv6 entries of WAN 1 are kept");
        // Both families; nothing of the other WAN.
        flush_marked(None, 0x1_0000, MASK).unwrap();
        let left = dump().unwrap();
        assert_eq!(left.len(), want - 100);
        assert!(left.iter().all(|e| e.mark & MASK == 0x2_0000));
        eprintln!(
            "{N} entries: flushed the {} of one WAN in {took:?}",
            N as usize - want
        );
    });
}
