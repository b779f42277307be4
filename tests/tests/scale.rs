//! `mwan flows` on a million pinned flows completes while the router keeps
//! forwarding and the daemon keeps answering (issue 5). Speed is measured by
//! `cargo xtask bench`, not asserted here.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lab::mwan::{config_with, Mwan};
use lab::*;

const FLOWS: u32 = 1_000_000;

/// Sends one small UDP packet to each of `n` distinct destinations
/// (198.51.100.128/25 × ports), so the classifier pins `n` flows.
fn blast(host: &Netns, n: u32) {
    host.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut i = 0;
        while i < n {
            let dst = SocketAddrV4::new(
                Ipv4Addr::new(198, 51, 100, 128 + (i % 128) as u8),
                1024 + (i / 128) as u16,
            );
            match s.send_to(&[0u8; 8], dst) {
                Ok(_) => i += 1,
                // The socket buffer is full: try the same packet again.
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOBUFS)
                        || e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("send: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "sending {n} packets took over 2 minutes"
            );
        }
    });
}

#[test]
fn flows_lists_a_million_pins_while_forwarding_continues() {
    let lab = Lab::builder().lan_hosts(2).isps(2).build().unwrap();
    // The blast's destinations are dropped by the router after the
    // classifier, untracked, so conntrack stays small.
    lab.router()
        .exec_input(
            &["nft", "-f", "-"],
            Some(
                "table ip blast {\n chain raw {\n  type filter hook prerouting priority raw;\n  ip daddr 198.51.100.128/25 notrack\n }\n \
                 chain forward_drop {\n  type filter hook forward priority filter;\n  ip daddr 198.51.100.128/25 drop\n }\n}\n",
            ),
        )
        .unwrap();
    let mut mwan = Mwan::start(
        &lab,
        &config_with(&lab, "max_flows = 1200000", &|_| String::new(), ""),
    )
    .unwrap();
    mwan.wait_all_up(Duration::from_secs(5)).unwrap();
    let t = Instant::now();
    blast(lab.host(0), FLOWS);
    println!("sent {FLOWS} packets in {:?}", t.elapsed());

    // List every flow (JSON to a file) while a second host keeps opening
    // connections through the router and the daemon is asked for status.
    let out = lab.dir().join("flows.json");
    let listing_done = AtomicBool::new(false);
    let (listed, forwarded, statuses) = std::thread::scope(|s| {
        let lister = s.spawn(|| {
            let t = Instant::now();
            let r = lab.router().sh(&format!(
                "{} --config {} flows --json > {}",
                lab::mwan::binary().display(),
                mwan.config.display(),
                out.display()
            ));
            listing_done.store(true, Ordering::SeqCst);
            r.map(|_| t.elapsed())
        });
        let mut forwarded = 0;
        let mut statuses = 0;
        while !listing_done.load(Ordering::SeqCst) {
            lab.host(1)
                .tcp_whoami(TCP_WHOAMI)
                .expect("forwarding while flows are listed");
            forwarded += 1;
            if forwarded % 10 == 0 {
                assert!(!mwan.status().wans.is_empty());
                statuses += 1;
            }
        }
        (lister.join().unwrap(), forwarded, statuses)
    });
    let took = listed.expect("mwan flows --json");
    let text = std::fs::read_to_string(&out).unwrap();
    let count = text.matches("\"proto\":").count();
    println!(
        "listed {count} flows ({} MB of JSON) in {took:?}; meanwhile {forwarded} connections forwarded, {statuses} status calls answered",
        text.len() / 1_000_000
    );
    assert!(count >= FLOWS as usize, "only {count} flows listed");
    assert!(forwarded > 0);
    // Filters work at this size too.
    let few = mwan
        .cli_ok(&[
            "flows",
            "--host",
            &lab.host(1).addr().to_string(),
            "--limit",
            "5",
        ])
        .unwrap();
    assert!(few.lines().count() >= 2, "{few}");
    // The daemon's own count catches up.
    assert!(wait_until(Duration::from_secs(15), || mwan
        .status()
        .flows_total
        >= FLOWS as u64));

    // A restart with a larger max_flows copies the million pins into a new
    // map (issue 10).
    mwan.cli_ok(&["stop"]).unwrap();
    let old = mwan.forget().expect("daemon process");
    assert!(old
        .wait_timeout(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    std::fs::write(
        &mwan.config,
        config_with(&lab, "max_flows = 2000000", &|_| String::new(), ""),
    )
    .unwrap();
    let t = Instant::now();
    mwan.launch(&[]).unwrap();
    mwan.wait_all_up(Duration::from_secs(30)).unwrap();
    let m = mwan
        .migration(mwan_common::map::FLOWS)
        .unwrap_or_else(|| panic!("FLOWS not migrated: {:?}", mwan.status().start));
    println!("takeover in {:?}: {m:?}", t.elapsed());
    assert_eq!(
        (m.action.as_str(), m.from, m.to),
        ("resized", Some(1_200_000), Some(2_000_000))
    );
    assert!(m.migrated >= FLOWS as u64, "{m:?}");
    assert_eq!(mwan.status().flow_capacity, 2_000_000);
    lab.host(1).tcp_whoami(TCP_WHOAMI).unwrap();
}
