//! The parsing cases the fixtures cannot build, end to end through the
//! running daemon: datagrams a LAN host sends in fragments (the later
//! fragments reach tc ingress on their own, conntrack reassembles them
//! after it), and VLAN-tagged frames on the LAN's parent interface (the
//! kernel moves the tag into the skb before tc ingress, which
//! BPF_PROG_TEST_RUN cannot do).

use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use lab::mwan::{config, Mwan};
use lab::*;

use crate::packet::{vlan_tagged, Body, Pkt, HOST};

const UP: Duration = Duration::from_secs(5);

fn counter(mwan: &Mwan, name: &str) -> u64 {
    mwan.status().counters.get(name).copied().unwrap_or(0)
}

/// Sends datagrams of 4000 bytes (three fragments at MTU 1500, two of them
/// without a UDP header) from `host` to the UDP whoami server; each must be
/// answered and leave through the WAN of its flow's pin: the reassembled
/// datagram carries the first fragment's mark. Returns the later fragments
/// the classifier counted.
fn fragmented_datagrams(lab: &Lab, mwan: &Mwan, host: &Netns, what: &str) -> u64 {
    const N: usize = 10;
    let before = counter(mwan, "fragments");
    let seen: Vec<SocketAddrV4> = (0..N)
        .map(|_| {
            host.udp_whoami_sized(UDP_WHOAMI, 4000)
                .unwrap_or_else(|e| panic!("{what}: no answer to a fragmented datagram: {e:#}"))
        })
        .collect();
    let later = counter(mwan, "fragments") - before;
    let udp: Vec<_> = mwan
        .flows(&[])
        .into_iter()
        .filter(|f| f.proto == "udp")
        .collect();
    assert!(
        !udp.iter().any(|f| f.sport == 0 && f.dport == 0),
        "{what}: a fragment made a pin of its own: {udp:?}"
    );
    for s in &seen {
        // Masquerade keeps the port.
        let isp = lab.wan_of(*s.ip()).expect("a WAN address");
        let pin = udp
            .iter()
            .find(|f| f.sport == s.port() && f.dport == UDP_WHOAMI_PORT)
            .unwrap_or_else(|| panic!("{what}: no pin for the datagram seen from {s}: {udp:?}"));
        assert_eq!(
            pin.wan,
            format!("isp{isp}"),
            "{what}: the datagram seen from {s} left through ISP {isp}, its pin says {}",
            pin.wan
        );
    }
    println!("{what}: {N} datagrams, {later} later fragments counted");
    later
}

#[test]
fn fragmented_datagrams_follow_the_pin_of_their_first_fragment() {
    let lab = Lab::builder()
        .lan_hosts(1)
        .isps(2)
        .tunnel_host()
        .build()
        .unwrap();
    let mwan = Mwan::start(&lab, &config(&lab, "")).unwrap();
    mwan.wait_all_up(UP).unwrap();
    let tunnel = lab.tunnel_host().expect("tunnel host");
    // The point-to-point LAN (mwan_lan_l3) sees every fragment.
    let later = fragmented_datagrams(&lab, &mwan, tunnel, "tun0");
    assert!(
        later >= 20,
        "tun0: {later} later fragments counted, expected 20"
    );
    // The bridged LAN without br_netfilter sees every fragment too.
    let bridge_nf = |on: &str| {
        lab.router()
            .sysctls(&[("net.bridge.bridge-nf-call-iptables", on)])
            .unwrap()
    };
    bridge_nf("0");
    let later = fragmented_datagrams(&lab, &mwan, lab.host(0), "lan0");
    assert!(
        later >= 20,
        "lan0: {later} later fragments counted, expected 20"
    );
    // With br_netfilter, conntrack at the bridge port may reassemble them
    // before tc ingress of the bridge: the datagram is classified whole.
    bridge_nf("1");
    fragmented_datagrams(&lab, &mwan, lab.host(0), "lan0 with br_netfilter");
}

fn mac(text: &str) -> [u8; 6] {
    let b: Vec<u8> = text
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("a MAC address"))
        .collect();
    b.try_into().expect("six bytes")
}

/// Sends `frame` (from its Ethernet header) out of `ifname` of the calling
/// thread's namespace, as it is.
fn send_raw(ifname: &str, frame: &[u8]) -> io::Result<()> {
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).expect("no NUL");
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn vlan_tagged_frames_on_the_parent_interface_are_left_alone() {
    let lab = Lab::builder().lan_hosts(1).isps(1).build().unwrap();
    let mwan = Mwan::start(&lab, &config(&lab, "")).unwrap();
    mwan.wait_all_up(UP).unwrap();
    let read_mac =
        |ns: &Netns, dev: &str| mac(&ns.sh(&format!("cat /sys/class/net/{dev}/address")).unwrap());
    let router = read_mac(lab.router(), "lan0");
    let host = lab.host(0);
    let own = read_mac(host, "eth0");
    // Host 0's datagrams to the server in VLAN 10, which the router has no
    // interface for (they are dropped after tc ingress), and one untagged
    // as a control: it is pinned.
    const N: u16 = 10;
    let tagged = |sport| vlan_tagged(Pkt::udp(HOST, sport, SERVER, 9)).frame_between(router, own);
    let untagged = Body::Ip(Pkt::udp(HOST, 41000, SERVER, 9)).frame_between(router, own);
    let before = counter(&mwan, "not_ipv4");
    host.run(|| -> io::Result<()> {
        for i in 0..N {
            send_raw("eth0", &tagged(40000 + i))?;
        }
        send_raw("eth0", &untagged)
    })
    .unwrap();
    // Every tagged frame reached the classifier, which left it alone.
    let reached = wait_until(Duration::from_secs(3), || {
        counter(&mwan, "not_ipv4") >= before + N as u64
            && mwan.flows(&[]).iter().any(|f| f.sport == 41000)
    });
    let flows: Vec<_> = mwan
        .flows(&[])
        .into_iter()
        .filter(|f| f.dst == SERVER.to_string() && f.dport == 9)
        .collect();
    assert!(
        reached,
        "not_ipv4 went from {before} to {}, expected {N} more; the untagged control \
         datagram's pin: {flows:?}",
        counter(&mwan, "not_ipv4")
    );
    assert!(
        flows.iter().all(|f| f.sport == 41000),
        "tagged frames were pinned on the parent interface: {flows:?}"
    );
}
