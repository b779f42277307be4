//! An HA pair of mwan routers with the real keepalived and conntrackd
//! (issue 14): the standby takes over every connection on its WAN, from
//! the same public address, when the active router dies; the failed router
//! returns as standby (or takes over again with preemption); mwan stopping
//! or a LAN link failing hands over too; an ISP failure is seen by both.
//!
//! Needs root, keepalived, conntrackd and conntrack (`cargo xtask test`
//! installs them).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use lab::ha::{established_to, holds_gateway, mwan_config, HaDaemons, HaSpec};
use lab::mwan::{ha_router_snapshot, shares, Mwan};
use lab::*;

const DOWNLOADS: usize = 20;
const HOSTS: usize = 4;

fn public_addresses(lab: &Lab) -> Vec<Ipv4Addr> {
    (1..=lab.isp_count())
        .map(|i| lab.isp(i).router_addr().addr())
        .collect()
}

/// The HA role `mwan status` shows, once it is `want` (or what it is
/// after 5 s).
fn wait_role(m: &Mwan, want: &str) -> Option<String> {
    let role = || m.status().ha_role;
    wait_until(Duration::from_secs(5), || role().as_deref() == Some(want));
    role()
}

/// The downloads' conntrack entries on router `k`.
fn stream_entries(lab: &Lab, k: usize) -> Vec<String> {
    established_to(lab, k, STREAM_PORT)
}

/// New connections from a host, one every 50 ms, each bounded by 300 ms:
/// when each succeeded, from which address.
struct Prober {
    stop: AtomicBool,
    ok: Mutex<Vec<(Instant, SocketAddrV4)>>,
}

impl Prober {
    fn run(&self, host: &Netns) {
        while !self.stop.load(Ordering::Relaxed) {
            if let Ok(seen) = host.tcp_whoami_within(TCP_WHOAMI, Duration::from_millis(300)) {
                self.ok.lock().unwrap().push((Instant::now(), seen));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn first_after(&self, t: Instant) -> Option<Duration> {
        self.ok
            .lock()
            .unwrap()
            .iter()
            .find(|(at, _)| *at > t)
            .map(|(at, _)| *at - t)
    }
}

/// Waits until every stream has received `more` bytes beyond `from`
/// (their byte counts at some earlier moment); panics naming the ones
/// that stalled or ended.
/// mwan on both routers of the pair (every WAN up), then keepalived and
/// conntrackd with `spec`; returns once router A is the active one.
fn start_pair<'l>(lab: &'l Lab, spec: &HaSpec) -> (Vec<Mwan<'l>>, Vec<HaDaemons<'l>>) {
    let mwans: Vec<Mwan> = (0..2)
        .map(|k| Mwan::start_on(lab, k, &mwan_config(lab, k), &[], &[]).unwrap())
        .collect();
    for m in &mwans {
        m.wait_all_up(Duration::from_secs(10)).unwrap();
    }
    let ha: Vec<HaDaemons> = (0..2)
        .map(|k| HaDaemons::start(lab, k, spec, Some(&mwans[k].config)).unwrap())
        .collect();
    assert!(
        ha[0].wait_master(Duration::from_secs(15)),
        "{}",
        ha[0].logs()
    );
    (mwans, ha)
}

fn wait_streams_flow(streams: &[Stream], from: &[u64], more: u64, what: &str) {
    let flowing = wait_until(Duration::from_secs(15), || {
        streams.iter().zip(from).all(|(s, b)| s.bytes() >= b + more)
    });
    let stalled: Vec<String> = streams
        .iter()
        .zip(from)
        .enumerate()
        .filter(|(_, (s, b))| s.bytes() < *b + more || s.end().is_some())
        .map(|(j, (s, b))| format!("#{j} {} +{} {:?}", s.source(), s.bytes() - b, s.end()))
        .collect();
    assert!(
        flowing && stalled.is_empty(),
        "{what}: stalled downloads: {stalled:?}"
    );
}

#[test]
fn standby_continues_every_download_from_the_same_address() {
    let lab = Lab::builder()
        .ha_pair()
        .lan_hosts(HOSTS + 1)
        .isps(2)
        .build()
        .expect("lab builds");
    let spec = HaSpec::default();
    let before: Vec<String> = (0..2).map(|k| ha_router_snapshot(&lab, k)).collect();
    let mut mwan_a = Mwan::start_on(&lab, 0, &mwan_config(&lab, 0), &[], &[]).unwrap();
    let mwan_b = Mwan::start_on(&lab, 1, &mwan_config(&lab, 1), &[], &[]).unwrap();
    // Health is per router: each probes through its own addresses.
    mwan_a.wait_all_up(Duration::from_secs(10)).unwrap();
    mwan_b.wait_all_up(Duration::from_secs(10)).unwrap();
    // Both routers record a WAN under the same mark: its configured id.
    let ids = |m: &Mwan| {
        m.status()
            .wans
            .into_iter()
            .map(|w| (w.name, w.id))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&mwan_a), ids(&mwan_b));
    assert_eq!(
        ids(&mwan_a),
        [("isp1".to_string(), 1), ("isp2".to_string(), 0)]
    );

    let mut ha_a = HaDaemons::start(&lab, 0, &spec, Some(&mwan_a.config)).unwrap();
    let ha_b = HaDaemons::start(&lab, 1, &spec, Some(&mwan_b.config)).unwrap();
    assert!(
        ha_a.wait_master(Duration::from_secs(15)),
        "router 0 did not become master\n{}{}",
        ha_a.logs(),
        ha_b.logs()
    );
    assert!(!holds_gateway(&lab, 1));
    assert_eq!(wait_role(&mwan_a, "active").as_deref(), Some("active"));
    assert_eq!(wait_role(&mwan_b, "standby").as_deref(), Some("standby"));
    let text = mwan_b.cli_ok(&["status"]).unwrap();
    assert!(text.contains("HA role: standby"), "{text}");

    // 20 long downloads through the active router, from the public
    // addresses, over both WANs.
    let streams: Vec<Stream> = (0..DOWNLOADS)
        .map(|j| {
            lab.host(j % HOSTS)
                .open_stream(STREAM)
                .expect("download starts")
        })
        .collect();
    let public = public_addresses(&lab);
    for s in &streams {
        assert!(
            public.contains(s.source().ip()),
            "{} is no public address",
            s.source()
        );
    }
    // A UDP flow (a VPN, a call) keeps its public address and port too.
    let udp = lab.host(0).udp_flow(UDP_WHOAMI).unwrap();
    let udp_seen = udp.whoami().unwrap();
    assert!(public.contains(udp_seen.ip()), "{udp_seen}");
    let sources: Vec<SocketAddrV4> = streams.iter().map(Stream::source).collect();
    let share = shares(&lab, &sources);
    assert_eq!(share.len(), 2, "both WANs carry downloads: {share:?}");

    // The standby holds every download's entry, with its NAT binding and
    // the ct mark naming its WAN.
    let synced = wait_until(Duration::from_secs(10), || {
        stream_entries(&lab, 1).len() >= DOWNLOADS
    });
    let entries = stream_entries(&lab, 1);
    assert!(
        synced,
        "standby has {} of {DOWNLOADS} downloads\n{}",
        entries.len(),
        ha_b.logs()
    );
    for e in &entries {
        assert!(
            public.iter().any(|p| e.contains(&format!("dst={p} ")))
                && e.contains("mark=")
                && !e.contains("mark=0 "),
            "entry without NAT binding or WAN mark: {e}"
        );
    }

    let udp_port = UDP_WHOAMI_PORT.to_string();
    let udp_synced = wait_until(Duration::from_secs(10), || {
        let out = lab
            .ha_router(1)
            .exec(&["conntrack", "-L", "-p", "udp", "--dport", &udp_port])
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains(&format!("dport={}", udp_seen.port())) && !text.contains("mark=0 ")
    });
    assert!(udp_synced, "the standby has no entry of the UDP flow");

    let prober = Prober {
        stop: AtomicBool::new(false),
        ok: Mutex::new(Vec::new()),
    };
    thread::scope(|scope| {
        scope.spawn(|| prober.run(lab.host(HOSTS)));
        assert!(wait_until(Duration::from_secs(5), || prober
            .ok
            .lock()
            .unwrap()
            .len()
            >= 3));

        // The active router dies, once the standby is ready to take over.
        assert!(
            ha_b.wait_state("BACKUP", Duration::from_secs(15)),
            "{}",
            ha_b.logs()
        );
        let before: Vec<u64> = streams.iter().map(Stream::bytes).collect();
        let died = Instant::now();
        ha_a.power_off().unwrap();
        mwan_a.forget();
        assert!(
            ha_b.wait_master(Duration::from_secs(10)),
            "standby did not take over\n{}",
            ha_b.logs()
        );
        let vip_moved = died.elapsed();
        let new_conn = wait_until(Duration::from_secs(10), || {
            prober.first_after(died).is_some()
        });
        assert!(new_conn, "no new connection through the new active router");
        let new_conn = prober.first_after(died).unwrap();
        assert_eq!(wait_role(&mwan_b, "active").as_deref(), Some("active"));
        wait_streams_flow(&streams, &before, 2 * STREAM_PACE, "after the takeover");
        assert_eq!(
            udp.whoami().unwrap(),
            udp_seen,
            "the UDP flow's public address"
        );
        let gaps: Vec<Duration> = streams.iter().map(Stream::max_gap).collect();
        let max_gap = gaps.iter().max().unwrap();
        println!(
            "router failover: gateway address moved after {:.0} ms, first new connection after {:.0} ms, longest download stall {:.0} ms",
            vip_moved.as_secs_f64() * 1e3,
            new_conn.as_secs_f64() * 1e3,
            max_gap.as_secs_f64() * 1e3
        );

        // New connections are balanced over both WANs by weight.
        let seen: Vec<SocketAddrV4> = many_tcp_whoami(lab.host(0), TCP_WHOAMI, 40, 8)
            .into_iter()
            .map(|r| r.expect("new connection through the new active router"))
            .collect();
        let share = shares(&lab, &seen);
        assert!(
            share.len() == 2 && share.values().all(|s| *s > 0.2),
            "new connections over both WANs: {share:?}"
        );
        for s in &seen {
            assert!(public.contains(s.ip()), "{s} is no public address");
        }

        // The failed router returns (a reboot: mwan's state is gone) and
        // becomes the standby; nothing breaks.
        let out = mwan_a.cli(&["stop", "--teardown"]).unwrap();
        assert!(out.status.success(), "{out:?}");
        ha_a.boot(&spec, Some(&mwan_a.config)).unwrap();
        mwan_a.launch(&[]).unwrap();
        mwan_a.wait_all_up(Duration::from_secs(10)).unwrap();
        let resynced = wait_until(Duration::from_secs(15), || {
            stream_entries(&lab, 0).len() >= DOWNLOADS
        });
        assert!(
            resynced,
            "returned router has {} of {DOWNLOADS} downloads\n{}",
            stream_entries(&lab, 0).len(),
            ha_a.logs()
        );
        assert!(holds_gateway(&lab, 1) && !holds_gateway(&lab, 0));
        assert_eq!(wait_role(&mwan_a, "standby").as_deref(), Some("standby"));
        let now: Vec<u64> = streams.iter().map(Stream::bytes).collect();
        wait_streams_flow(&streams, &now, STREAM_PACE, "after the return");

        prober.stop.store(true, Ordering::Relaxed);
    });
    for (j, s) in streams.into_iter().enumerate() {
        let r = s.close();
        assert!(r.end.is_none(), "download #{j} ended: {:?}", r.end);
    }

    // The test stops what it started; both routers are as they were
    // (keepalived removes its addresses, mwan everything it added).
    drop((ha_a, ha_b));
    let mut mwan_b = mwan_b;
    mwan_a.stop_with(libc::SIGTERM).unwrap();
    mwan_b.stop_with(libc::SIGTERM).unwrap();
    for (k, before) in before.iter().enumerate() {
        assert_eq!(
            &ha_router_snapshot(&lab, k),
            before,
            "router {k} after the test"
        );
    }
}

/// An ISP fails while the pair runs: both routers see it (health is per
/// router), the active one moves new connections to the other ISP and
/// stays active; both take the ISP back when it recovers.
#[test]
fn both_routers_see_an_isp_fail_and_the_active_one_fails_over() {
    let lab = Lab::builder()
        .ha_pair()
        .lan_hosts(1)
        .isps(2)
        .build()
        .expect("lab builds");
    let spec = HaSpec::default();
    let (mwans, _ha) = start_pair(&lab, &spec);

    lab.isp(1).set_blackhole(true).unwrap();
    for m in &mwans {
        m.wait_state("isp1", "down", Duration::from_secs(10))
            .unwrap();
        assert_eq!(m.wan("isp2").state, "up");
    }
    let isp2 = lab.isp(2).router_addr().addr();
    for r in many_tcp_whoami(lab.host(0), TCP_WHOAMI, 10, 4) {
        assert_eq!(*r.expect("connection through ISP 2").ip(), isp2);
    }
    assert!(holds_gateway(&lab, 0) && !holds_gateway(&lab, 1));

    lab.isp(1).set_blackhole(false).unwrap();
    for m in &mwans {
        m.wait_all_up(Duration::from_secs(15)).unwrap();
    }
    let seen: Vec<SocketAddrV4> = many_tcp_whoami(lab.host(0), TCP_WHOAMI, 40, 8)
        .into_iter()
        .map(|r| r.expect("new connection"))
        .collect();
    assert_eq!(shares(&lab, &seen).len(), 2, "both ISPs again");

    // A reload may not renumber a running WAN (its connections' marks).
    let text = mwan_config(&lab, 0);
    let swapped = text.replace("id = 1", "id = 9").replace("id = 0", "id = 1");
    std::fs::write(&mwans[0].config, swapped).unwrap();
    let out = mwans[0].cli(&["reload"]).unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("restart mwan to apply it"),
        "{out:?}"
    );
    std::fs::write(&mwans[0].config, text).unwrap();
    assert!(mwans[0].cli(&["reload"]).unwrap().status.success());
    assert_eq!(mwans[0].wan("isp1").id, 1);
}

/// `mwan install --ha` writes the pair's scripts and commented configs;
/// the mwan example parses and keepalived accepts its example (checked in
/// a namespace that has the example's interfaces).
#[test]
fn install_ha_writes_the_pair_files() {
    let lab = Lab::builder().lan_hosts(1).isps(1).build().unwrap();
    let root = lab.dir().join("root");
    let out = std::process::Command::new(lab::mwan::binary())
        .args(["install", "--ha", "--root", root.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    use std::os::unix::fs::PermissionsExt;
    for script in ["mwan-ha-notify", "mwan-ha-check"] {
        let p = root.join("usr/local/lib/mwan").join(script);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "{}", p.display());
    }
    let cfg = ::mwan::config::Config::load(&root.join("etc/mwan/mwan-ha.example.toml"))
        .expect("the HA example config is valid");
    assert!(cfg.ha_address.is_some() && cfg.wans.iter().all(|w| w.snat_address.is_some()));
    assert!(root.join("etc/conntrackd/conntrackd.conf").is_file());
    let keepalived = root.join("etc/keepalived/keepalived.conf");
    lab.router()
        .ip("link add eth0 type veth peer name eth1\nlink add eth2 type veth peer name eth3")
        .unwrap();
    // With the scripts where this install put them.
    let text = std::fs::read_to_string(&keepalived).unwrap();
    let checked = lab.dir().join("keepalived-check.conf");
    let lib = root.join("usr/local/lib/mwan/");
    let text = text.replace("/usr/local/lib/mwan/", &format!("{}/", lib.display()));
    std::fs::write(&checked, text).unwrap();
    let test = lab
        .router()
        .exec_status(&[
            "keepalived",
            "--config-test",
            "-f",
            checked.to_str().unwrap(),
        ])
        .unwrap();
    assert!(
        test.status.success(),
        "keepalived rejects the example: {test:?}"
    );
    // A second install keeps the admin's files.
    std::fs::write(&keepalived, "# edited\n").unwrap();
    let out = std::process::Command::new(lab::mwan::binary())
        .args(["install", "--ha", "--root", root.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(&keepalived).unwrap(), "# edited\n");
    assert!(root
        .join("etc/keepalived/keepalived.conf.mwan-example")
        .is_file());
}

/// With preemption, the failed router takes the addresses back when it
/// returns, once conntrackd has resynced it: the downloads made through
/// the other router meanwhile go on through it.
#[test]
fn returning_router_takes_over_again_without_breaking_connections() {
    const N: usize = 6;
    let lab = Lab::builder()
        .ha_pair()
        .lan_hosts(2)
        .isps(2)
        .build()
        .expect("lab builds");
    let spec = HaSpec {
        preempt: true,
        ..HaSpec::default()
    };
    let (mut mwans, mut ha) = start_pair(&lab, &spec);
    assert!(
        ha[1].wait_state("BACKUP", Duration::from_secs(15)),
        "{}",
        ha[1].logs()
    );

    ha[0].power_off().unwrap();
    mwans[0].forget();
    assert!(
        ha[1].wait_master(Duration::from_secs(10)),
        "{}",
        ha[1].logs()
    );
    // Downloads through router 1 only.
    let streams: Vec<Stream> = (0..N)
        .map(|j| {
            lab.host(j % 2)
                .open_stream(STREAM)
                .expect("download starts")
        })
        .collect();
    let public = public_addresses(&lab);
    for s in &streams {
        assert!(public.contains(s.source().ip()), "{}", s.source());
    }

    let out = mwans[0].cli(&["stop", "--teardown"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    ha[0].boot(&spec, Some(&mwans[0].config)).unwrap();
    mwans[0].launch(&[]).unwrap();
    mwans[0].wait_all_up(Duration::from_secs(10)).unwrap();
    // Resynced as standby, then back as the active router.
    let resynced = wait_until(Duration::from_secs(10), || {
        stream_entries(&lab, 0).len() >= N
    });
    assert!(
        resynced,
        "router 0 has {} of {N}\n{}",
        stream_entries(&lab, 0).len(),
        ha[0].logs()
    );
    assert!(
        ha[0].wait_master(Duration::from_secs(15)),
        "router 0 did not take over again\n{}",
        ha[0].logs()
    );
    assert!(wait_until(Duration::from_secs(5), || !holds_gateway(
        &lab, 1
    )));
    assert_eq!(wait_role(&mwans[0], "active").as_deref(), Some("active"));
    let now: Vec<u64> = streams.iter().map(Stream::bytes).collect();
    wait_streams_flow(&streams, &now, 2 * STREAM_PACE, "after the return");
    for (j, s) in streams.into_iter().enumerate() {
        let r = s.close();
        assert!(r.end.is_none(), "download #{j} ended: {:?}", r.end);
    }
}

/// keepalived hands the addresses over when mwan stops on the active
/// router (the track script fails) and when the active router loses its
/// LAN link; the downloads go on each time.
#[test]
fn mwan_stopping_or_a_lan_link_failing_hands_over() {
    const N: usize = 6;
    let lab = Lab::builder()
        .ha_pair()
        .lan_hosts(2)
        .isps(2)
        .build()
        .expect("lab builds");
    let spec = HaSpec::default();
    let (mut mwans, ha) = start_pair(&lab, &spec);
    assert!(
        ha[1].wait_state("BACKUP", Duration::from_secs(15)),
        "{}",
        ha[1].logs()
    );
    let streams: Vec<Stream> = (0..N)
        .map(|j| {
            lab.host(j % 2)
                .open_stream(STREAM)
                .expect("download starts")
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || {
        stream_entries(&lab, 1).len() >= N
    }));

    // mwan stops on the active router (its datapath keeps forwarding):
    // the track script fails and the standby takes over.
    mwans[0].cli_ok(&["stop"]).unwrap();
    mwans[0].forget();
    assert!(
        ha[1].wait_master(Duration::from_secs(10)),
        "no takeover after mwan stopped\n{}",
        ha[0].logs()
    );
    assert!(wait_until(Duration::from_secs(5), || !holds_gateway(
        &lab, 0
    )));
    let now: Vec<u64> = streams.iter().map(Stream::bytes).collect();
    wait_streams_flow(&streams, &now, STREAM_PACE, "after mwan stopped");

    // mwan runs again: router 0 becomes the standby.
    mwans[0].launch(&[]).unwrap();
    mwans[0].wait_all_up(Duration::from_secs(10)).unwrap();
    assert!(
        ha[0].wait_state("BACKUP", Duration::from_secs(15)),
        "{}",
        ha[0].logs()
    );
    assert!(holds_gateway(&lab, 1));

    // The active router's LAN link fails: router 0 takes over again.
    lab.ha_router(1).ip("link set dev lan0 down").unwrap();
    assert!(
        ha[0].wait_master(Duration::from_secs(10)),
        "no takeover after the LAN link failed\n{}",
        ha[0].logs()
    );
    let now: Vec<u64> = streams.iter().map(Stream::bytes).collect();
    wait_streams_flow(&streams, &now, STREAM_PACE, "after the LAN link failed");
    lab.ha_router(1).ip("link set dev lan0 up").unwrap();
    for (j, s) in streams.into_iter().enumerate() {
        let r = s.close();
        assert!(r.end.is_none(), "download #{j} ended: {:?}", r.end);
    }
}
