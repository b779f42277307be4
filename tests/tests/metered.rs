//! End-to-end proof of metered and backup links (issue 21): a WAN's usage
//! per billing cycle against what its ISP counted, warnings at the
//! thresholds (events, the `on_change` hook), a used-up allowance that
//! keeps the WAN as a backup, the usage across reloads and restarts, a
//! reset day in the past, `failback = "drain"`, and rules by schedule at a
//! boundary and across a daylight saving change.
//!
//! Local time is the daemon's: each test gives it a POSIX `TZ` chosen so
//! that a boundary falls a few seconds after now (the host's clock is
//! never touched). Everything is read from `mwan status --json`.

use std::net::{IpAddr, SocketAddrV4};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lab::mwan::{config_with, Mwan, WanStatus};
use lab::*;

const UP: Duration = Duration::from_secs(10);

fn build() -> Lab {
    Lab::builder()
        .lan_hosts(1)
        .isps(2)
        .build()
        .expect("lab builds")
}

fn start<'l>(lab: &'l Lab, text: &str, env: &[(&str, &str)]) -> Mwan<'l> {
    let mwan = Mwan::start_env(lab, text, &[], env).expect("mwan starts");
    mwan.wait_all_up(UP).expect("WANs up");
    mwan
}

fn isp_of(lab: &Lab, seen: SocketAddrV4) -> usize {
    lab.wan_of(*seen.ip()).unwrap_or(0)
}

/// Seconds since the epoch, now (fractional).
fn wall() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// A POSIX `TZ` under which the local time of day is `secs_of_day` at
/// the epoch second `at`, and that offset (local minus UTC, seconds).
fn tz_showing(secs_of_day: i64, at: i64) -> (String, i64) {
    let utc = at.rem_euclid(86_400);
    let mut offset = (secs_of_day - utc).rem_euclid(86_400);
    if offset > 43_200 {
        offset -= 86_400;
    }
    // POSIX offsets are what is added to local time to get UTC.
    let sign = if offset > 0 { '-' } else { '+' };
    let o = offset.abs();
    let tz = format!("<LAB>{sign}{}:{:02}:{:02}", o / 3600, o / 60 % 60, o % 60);
    (tz, offset)
}

/// ISP 2's metered WAN in the daemon's status.
fn usage(mwan: &Mwan, wan: &str) -> lab::mwan::Status {
    let s = mwan.status();
    assert!(
        s.wans.iter().any(|w| w.name == wan && w.usage.is_some()),
        "no usage for {wan}: {:?}",
        s.wans
    );
    s
}

fn wan<'s>(s: &'s lab::mwan::Status, name: &str) -> &'s WanStatus {
    s.wans.iter().find(|w| w.name == name).expect("the WAN")
}

fn used(mwan: &Mwan, name: &str) -> u64 {
    wan(&usage(mwan, name), name).usage.as_ref().unwrap().bytes
}

/// New connections to `server` from the first host: the ISP of each.
fn isps_to(lab: &Lab, server: SocketAddrV4, n: usize) -> Vec<usize> {
    (0..n)
        .map(|_| isp_of(lab, lab.host(0).tcp_whoami(server).expect("a connection")))
        .collect()
}

fn wait_state(mwan: &Mwan, wan: &str, state: &str) {
    mwan.wait_state(wan, state, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Everything ISP `i` counted on its side of the link, both directions.
fn isp_total(lab: &Lab, i: usize) -> u64 {
    let (rx, tx) = lab.isp(i).link_bytes().expect("ISP counters");
    rx + tx
}

/// Waits until the daemon's usage of `name` stops growing with no traffic
/// but the probes' (its next sample is in): the usage then.
fn settled(mwan: &Mwan, name: &str) -> u64 {
    std::thread::sleep(Duration::from_millis(1500));
    used(mwan, name)
}

/// `|a - b|` within `pct` percent of `b`.
fn within(a: u64, b: u64, pct: f64) -> bool {
    (a as f64 - b as f64).abs() <= b as f64 * pct / 100.0
}

/// ISP 2 is metered with a 4 MB allowance and a rule sends the second
/// server's traffic to it; ISP 2 is limited to 8 Mbit/s so the usage
/// crosses each threshold in its own second.
#[test]
fn a_quota_is_counted_as_the_isp_counts_and_a_used_up_wan_is_a_backup() {
    let lab = build();
    let hooks = lab.dir().join("hooks.log");
    let top = format!(
        "hold_down = \"1s\"\non_change = \"echo \\\"$MWAN_EVENT $MWAN_WAN $MWAN_QUOTA_PCT $MWAN_NEW_STATE\\\" >> {}\"",
        hooks.display()
    );
    let rule = format!("[[rule]]\nname = \"to-lte\"\ndst = [\"{SERVER2}\"]\nwans = [\"isp2\"]\n");
    let per_wan = |i: usize| {
        if i == 2 {
            "quota = \"4MB\"\n".into()
        } else {
            String::new()
        }
    };
    let text = config_with(&lab, &top, &per_wan, &rule);
    lab.isp(2).set_rate(Some(8)).unwrap();
    let mut mwan = start(&lab, &text, &[]);
    let (isp0, used0) = (isp_total(&lab, 2), used(&mwan, "isp2"));
    assert_eq!(
        isps_to(&lab, TCP_WHOAMI2, 3),
        vec![2, 2, 2],
        "the rule's line"
    );

    use_up_the_allowance(&lab, &mwan, &hooks);
    let counted = |mwan: &Mwan, what: &str| {
        let (m, i) = (settled(mwan, "isp2") - used0, isp_total(&lab, 2) - isp0);
        println!("usage {what}: mwan {m} bytes, ISP 2 {i} bytes");
        assert!(within(m, i, 1.0), "{what}: mwan {m}, ISP {i}");
    };
    // What mwan counted is what the ISP counted (both directions, the
    // probes included), within 1 %.
    counted(&mwan, "of the download");
    a_used_up_wan_is_a_backup(&lab, &mwan);
    let after = usage_survives_a_reload_and_a_restart(&lab, &mut mwan);
    counted(&mwan, "across the restart");
    // A teardown leaves the usage of the metered line.
    mwan.cli_ok(&["stop", "--teardown"]).unwrap();
    let proc = mwan.forget().unwrap();
    assert!(proc
        .wait_timeout(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    assert!(
        used_from_file(&lab) >= after,
        "the usage file is gone or shrank"
    );
}

/// Downloads through ISP 2 until its 4 MB are used up: each threshold is
/// reported once, with the usage past it (events, the hook).
fn use_up_the_allowance(lab: &Lab, mwan: &Mwan, hooks: &std::path::Path) {
    // A download through ISP 2 until the allowance is used up: each
    // threshold is reported once, with the usage past it.
    let bulk = lab
        .host(0)
        .open_stream(SocketAddrV4::new(SERVER2, BULK_PORT))
        .expect("a download");
    assert_eq!(isp_of(lab, bulk.source()), 2);
    let mut first_seen: Vec<(u8, u64)> = Vec::new();
    let done = wait_until(Duration::from_secs(30), || {
        let s = mwan.status();
        let u = wan(&s, "isp2").usage.clone().unwrap();
        for pct in &u.reached_pct {
            if !first_seen.iter().any(|(p, _)| p == pct) {
                first_seen.push((*pct, u.bytes));
            }
        }
        u.exhausted
    });
    let report = bulk.close();
    assert!(
        done,
        "the allowance was not used up: {first_seen:?}\n{}",
        mwan.log()
    );
    println!(
        "reached (percent, bytes): {first_seen:?}; downloaded {} bytes",
        report.bytes
    );
    for (pct, bytes) in &first_seen {
        assert!(
            *bytes >= 4_000_000 * u64::from(*pct) / 100,
            "{pct}% reported at {bytes} bytes"
        );
    }
    let s = mwan.status();
    let quota_events: Vec<String> = s
        .events
        .iter()
        .filter(|e| e.kind == "quota" && e.wan == "isp2")
        .map(|e| e.to.clone())
        .collect();
    assert_eq!(quota_events, ["75%", "95%", "100%"], "{:?}", s.events);
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(hooks)
            .is_ok_and(|t| t.lines().filter(|l| l.starts_with("quota ")).count() == 3)
    }));
    let lines: Vec<String> = std::fs::read_to_string(hooks)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("quota "))
        .map(str::to_string)
        .collect();
    assert_eq!(
        lines,
        ["quota isp2 75 up", "quota isp2 95 up", "quota isp2 100 up"]
    );
}

/// Used up: no new flows while ISP 1 is up, the rule's included; a backup
/// again while ISP 1 is down.
fn a_used_up_wan_is_a_backup(lab: &Lab, mwan: &Mwan) {
    let server2 = TCP_WHOAMI2;
    // Used up: no new flows while ISP 1 is up, the rule's included.
    let isp2 = wan(&mwan.status(), "isp2").clone();
    let u = isp2.usage.as_ref().unwrap();
    assert!(u.exhausted && u.held_back, "{u:?}");
    assert_eq!(u.action.as_deref(), Some("backup"));
    assert!(
        u.effect.contains("no new flows while another WAN is up"),
        "{}",
        u.effect
    );
    assert_eq!(isp2.share, 0.0);
    assert_eq!(isps_to(lab, server2, 6), vec![1; 6]);
    // ISP 1 dies: the used-up line is the backup again.
    lab.isp(1).set_blackhole(true).unwrap();
    wait_state(mwan, "isp1", "down");
    assert_eq!(isps_to(lab, server2, 4), vec![2; 4]);
    assert_eq!(isps_to(lab, TCP_WHOAMI, 4), vec![2; 4]);
    assert!(
        !wan(&mwan.status(), "isp2")
            .usage
            .as_ref()
            .unwrap()
            .held_back
    );
    lab.isp(1).set_blackhole(false).unwrap();
    wait_state(mwan, "isp1", "up");
    assert_eq!(isps_to(lab, server2, 4), vec![1; 4]);
}

/// The usage survives a reload and a restart, and the bytes of the time
/// between (the router's own download through ISP 2) count. Returns the
/// usage after the restart.
fn usage_survives_a_reload_and_a_restart(lab: &Lab, mwan: &mut Mwan) -> u64 {
    let server2 = TCP_WHOAMI2;
    // The usage survives a reload and a restart, and the bytes of the
    // time between (the router's own download through ISP 2) count.
    let before = used(mwan, "isp2");
    mwan.cli_ok(&["reload"]).unwrap();
    assert!(used(mwan, "isp2") >= before);
    mwan.cli_ok(&["stop"]).unwrap();
    let proc = mwan.forget().unwrap();
    assert!(proc
        .wait_timeout(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    let stopped_at = used_from_file(lab);
    let wan2 = IpAddr::V4(lab.isp(2).router_addr().addr());
    let own = lab
        .router()
        .open_stream_from(BULK, Some(wan2))
        .expect("the router's own download");
    assert!(wait_until(Duration::from_secs(10), || own.bytes() >= 500_000));
    let own = own.close();
    mwan.launch(&[]).unwrap();
    mwan.wait_all_up(UP).unwrap();
    let after = settled(mwan, "isp2");
    println!(
        "stopped at {stopped_at}, {} downloaded meanwhile, {after} after the restart",
        own.bytes
    );
    assert!(
        after >= stopped_at + own.bytes,
        "{after} < {stopped_at} + {}",
        own.bytes
    );
    let u = wan(&mwan.status(), "isp2").usage.clone().unwrap();
    assert!(u.exhausted && u.reached_pct == [75, 95, 100], "{u:?}");
    assert_eq!(
        isps_to(lab, server2, 4),
        vec![1; 4],
        "still used up after the restart"
    );
    after
}

/// The bytes of isp2's cycle as the usage file records them.
fn used_from_file(lab: &Lab) -> u64 {
    let text = std::fs::read_to_string(lab.state_dir().join("usage.json")).expect("usage.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let b = &v["wans"]["isp2"]["bytes"];
    ["ipv4", "ipv6"]
        .iter()
        .flat_map(|f| ["rx", "tx"].map(|d| b[f][d].as_u64().unwrap_or(0)))
        .sum()
}

/// A cycle whose reset day passed while no daemon ran is closed at the
/// next start: the new cycle starts at that midnight, at zero.
#[test]
fn a_reset_day_in_the_past_starts_a_new_cycle() {
    let lab = build();
    // Local midnight 12 s from now; the reset day is that new day.
    let now = wall() as i64;
    let (tz, offset) = tz_showing(86_400 - 12, now);
    let midnight = now + 12;
    let tomorrow = ::mwan::clock::Date::from_days((now + offset + 12).div_euclid(86_400));
    let per_wan = |i: usize| {
        if i == 2 {
            format!("quota = \"1GB\"\nquota_reset_day = {}\n", tomorrow.day)
        } else {
            String::new()
        }
    };
    let rule = format!("[[rule]]\nname = \"to-lte\"\ndst = [\"{SERVER2}\"]\nwans = [\"isp2\"]\n");
    let text = config_with(&lab, "", &per_wan, &rule);
    let mut mwan = start(&lab, &text, &[("TZ", &tz)]);
    let u = wan(&mwan.status(), "isp2").usage.clone().unwrap();
    assert_eq!(u.next_reset_epoch, midnight, "{u:?}");
    assert!(u.next_reset.contains("T00:00:00"), "{u:?}");
    let bulk = lab
        .host(0)
        .open_stream(SocketAddrV4::new(SERVER2, BULK_PORT))
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || bulk.bytes() >= 2_000_000));
    drop(bulk);
    let before = settled(&mwan, "isp2");
    assert!(before >= 2_000_000, "{before}");
    mwan.cli_ok(&["stop"]).unwrap();
    let proc = mwan.forget().unwrap();
    assert!(proc
        .wait_timeout(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    let left = midnight as f64 - wall();
    assert!(left > 0.0, "the test was too slow to stop before midnight");
    std::thread::sleep(Duration::from_secs_f64(left + 1.0));
    mwan.launch(&[]).unwrap();
    let u = wan(&mwan.status(), "isp2").usage.clone().unwrap();
    println!("after the reset day: {u:?}");
    assert_eq!(u.cycle_start_epoch, midnight);
    assert!(u.bytes < 100_000, "a new cycle starts at zero: {u:?}");
    let p = u.previous_cycle.expect("the closed cycle");
    assert!(p.bytes >= before, "{p:?}");
    let events = mwan.status().events;
    assert!(
        events.iter().any(|e| e.kind == "quota" && e.to == "0%"),
        "{events:?}"
    );
}

/// Whether `stream` ended, polled until `deadline`: when it was seen to.
fn ended_at(stream: &Stream, deadline: Instant) -> Option<f64> {
    while Instant::now() < deadline {
        if stream.end().is_some() {
            return Some(wall());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// ISP 2 is a metered backup (tier 2, a quota). A download that had to
/// reconnect through it during an outage of ISP 1, and a UDP flow that
/// moved there, go back through ISP 1 once it has been up for
/// `failback_after`, not before; a download that started on ISP 2 while
/// ISP 1 was up stays.
#[test]
fn failback_drain_moves_what_went_to_the_backup_back_after_failback_after() {
    let lab = build();
    const AFTER: f64 = 4.0;
    let top = "hold_down = \"1s\"\nfailback = \"drain\"\nfailback_after = \"4s\"\nfailback_spread = \"1s\"";
    let per_wan = |i: usize| {
        if i == 2 {
            "tier = 2\nquota = \"100GB\"\n".into()
        } else {
            String::new()
        }
    };
    let mwan = start(&lab, &config_with(&lab, top, &per_wan, ""), &[]);
    let host = lab.host(0);
    // A download on ISP 2 while ISP 1 is up (drained for a moment).
    mwan.cli_ok(&["drain", "isp1"]).unwrap();
    let early = host.open_stream(STREAM).unwrap();
    mwan.cli_ok(&["enable", "isp1"]).unwrap();
    assert_eq!(isp_of(&lab, early.source()), 2);
    let on_isp1 = host.open_stream(STREAM).unwrap();
    assert_eq!(isp_of(&lab, on_isp1.source()), 1);
    let udp = host.udp_flow(UDP_WHOAMI).unwrap();
    assert_eq!(isp_of(&lab, udp.whoami().unwrap()), 1);

    // The outage: the download on ISP 1 is reset and reconnects through
    // ISP 2; the UDP flow moves there.
    lab.isp(1).set_blackhole(true).unwrap();
    wait_state(&mwan, "isp1", "down");
    on_isp1
        .wait_reset(Duration::from_secs(5))
        .expect("reset when ISP 1 died");
    let moved = host.open_stream(STREAM).unwrap();
    assert_eq!(isp_of(&lab, moved.source()), 2);
    assert_eq!(isp_of(&lab, udp.whoami().unwrap()), 2);

    lab.isp(1).set_blackhole(false).unwrap();
    wait_state(&mwan, "isp1", "up");
    let up_at = state_change_at(&mwan, "isp1", "up");
    let due = wan(&mwan.status(), "isp1").failback_due_secs;
    assert!(due.is_some_and(|d| d > 0.0 && d <= AFTER), "{due:?}");
    // Not before failback_after: the moved download runs, the UDP flow
    // answers from ISP 2.
    let reset_at = ended_at(
        &moved,
        Instant::now() + Duration::from_secs_f64(AFTER + 5.0),
    );
    let reset_at =
        reset_at.unwrap_or_else(|| panic!("the moved download was never reset:\n{}", mwan.log()));
    println!(
        "isp1 up at {up_at:.2}, the moved download reset {:.2} s later",
        reset_at - up_at
    );
    assert!(
        reset_at - up_at >= AFTER - 0.2,
        "reset {:.2} s after the repair",
        reset_at - up_at
    );
    assert!(
        reset_at - up_at <= AFTER + 1.0 + 2.0,
        "reset {:.2} s after the repair",
        reset_at - up_at
    );
    assert!(
        matches!(
            moved.end(),
            Some(StreamEnd::Error(std::io::ErrorKind::ConnectionReset, _))
        ),
        "{:?}",
        moved.end()
    );
    // It reconnects through ISP 1; the UDP flow is back there too.
    let again = host.open_stream(STREAM).unwrap();
    assert_eq!(isp_of(&lab, again.source()), 1);
    assert!(wait_until(Duration::from_secs(3), || udp
        .whoami()
        .is_ok_and(|s| isp_of(&lab, s) == 1)));
    // The download that started on ISP 2 while ISP 1 was up was not touched.
    let b = early.bytes();
    assert!(wait_until(Duration::from_secs(3), || early.bytes() > b + 100_000));
    assert_eq!(early.end(), None);
    assert_eq!(isp_of(&lab, early.source()), 2);
    // The drain records its facts once its last batch has moved
    // (`failback_spread` after its first).
    let facts = || wan(&mwan.status(), "isp1").connections.clone();
    assert!(wait_until(Duration::from_secs(5), || facts()
        .failback_drains
        > 0));
    let f = facts();
    println!("isp1's facts: {f:?}");
    assert_eq!(f.failback_drains, 1, "{f:?}");
    assert!(f.failback_drained_flows >= 2, "{f:?}");
}

/// When WAN `name` last went `to`, seconds since the epoch (its event).
fn state_change_at(mwan: &Mwan, name: &str, to: &str) -> f64 {
    let e = mwan
        .status()
        .events
        .into_iter()
        .rev()
        .find(|e| e.kind == "state" && e.wan == name && e.to == to)
        .expect("the state change");
    let t = humantime_parse(&e.time);
    t.unwrap_or_else(|| panic!("time {}", e.time))
}

/// `2026-03-01T12:00:00.123Z` as seconds since the epoch.
fn humantime_parse(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i32>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min): (i64, i64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let sec: f64 = t.next()?.parse().ok()?;
    let days = ::mwan::clock::Date::new(y, m as u8, day as u8).days();
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

/// One new connection to the second server every 100 ms from `from` to
/// `to` (epoch seconds): when each started and its ISP.
fn connections_between(lab: &Lab, from: f64, to: f64) -> Vec<(f64, usize)> {
    let server2 = TCP_WHOAMI2;
    while wall() < from {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = Vec::new();
    while wall() < to && out.len() < 200 {
        let t = wall();
        let isp = isp_of(lab, lab.host(0).tcp_whoami(server2).expect("a connection"));
        out.push((t, isp));
        std::thread::sleep(Duration::from_millis(100));
    }
    out
}

/// A rule that sends the second server's traffic to ISP 2 from 12:00
/// (local time: the boundary is a few seconds after the daemon starts). New
/// connections follow it within a second; a download opened before stays
/// on ISP 1.
/// mwan with ISP 2 as the backup tier, `rule` and the time zone `tz`.
fn start_scheduled<'l>(lab: &'l Lab, rule: &str, tz: &str) -> Mwan<'l> {
    let per_wan = |i: usize| {
        if i == 2 {
            "tier = 2\n".into()
        } else {
            String::new()
        }
    };
    start(lab, &config_with(lab, "", &per_wan, rule), &[("TZ", tz)])
}

#[test]
fn a_scheduled_rule_turns_on_at_its_time_for_new_connections_only() {
    let lab = build();
    let now = wall() as i64;
    let (tz, _) = tz_showing(12 * 3600 - 12, now);
    let boundary = (now + 12) as f64;
    let rule = format!(
        "[[rule]]\nname = \"noon\"\ndst = [\"{SERVER2}\"]\nschedule = \"12:00-23:00\"\nwans = [\"isp2\"]\n"
    );
    let mwan = start_scheduled(&lab, &rule, &tz);
    let s = mwan.status();
    let r = &s.rules[0];
    assert!(
        !r.active
            && r.next_change
                .as_deref()
                .is_some_and(|t| t.contains("T12:00:00")),
        "{r:?}"
    );
    assert!(s.clock.local_time.contains("T11:59:"), "{:?}", s.clock);
    let live = lab
        .host(0)
        .open_stream(SocketAddrV4::new(SERVER2, STREAM_PORT))
        .unwrap();
    assert_eq!(isp_of(&lab, live.source()), 1);
    let seen = connections_between(&lab, boundary - 3.0, boundary + 3.0);
    report_switch("rule on", boundary, &seen);
    if !seen.iter().any(|(_, isp)| *isp == 2) {
        std::thread::sleep(Duration::from_secs(6));
        panic!(
            "no switch: {:?}\n{:?}\n{}",
            mwan.status().rules,
            mwan.status().clock,
            mwan.log()
        );
    }
    for (t, isp) in &seen {
        if *t < boundary - 0.2 {
            assert_eq!(
                *isp,
                1,
                "{:.2} s before the boundary: {seen:?}",
                boundary - t
            );
        }
        if *t > boundary + 1.0 {
            assert_eq!(
                *isp,
                2,
                "{:.2} s after the boundary: {seen:?}",
                t - boundary
            );
        }
    }
    let r = mwan.status().rules[0].clone();
    assert!(r.active, "{r:?}");
    // The live download did not move.
    let b = live.bytes();
    assert!(wait_until(Duration::from_secs(3), || live.bytes() > b + 256 * 1024));
    assert_eq!(live.end(), None);
    assert_eq!(isp_of(&lab, live.source()), 1);
    assert!(mwan
        .status()
        .events
        .iter()
        .any(|e| e.kind == "schedule" && e.wan == "noon" && e.to == "on"));
}

/// The first connection through ISP 2 after `boundary`, as the test saw it.
fn report_switch(what: &str, boundary: f64, seen: &[(f64, usize)]) {
    let first = seen
        .iter()
        .find(|(_, isp)| *isp == 2)
        .map(|(t, _)| t - boundary);
    let last1 = seen
        .iter()
        .rev()
        .find(|(_, isp)| *isp == 1)
        .map(|(t, _)| t - boundary);
    println!("{what}: last connection through ISP 1 at {last1:?} s, first through ISP 2 at {first:?} s from the boundary");
}

/// A daylight saving change a few seconds from now moves the local clock
/// an hour on, into a rule's schedule: new connections follow it within a
/// second (the daemon wakes at the change), a live download stays.
#[test]
fn a_daylight_saving_change_moves_no_live_connection() {
    let lab = build();
    let now = wall() as i64;
    // Standard time 11:59:48 now; summer time (an hour on) from 11:59:59
    // standard, i.e. from 12:59:59 on the clock. The rule is on from 12:30.
    let (std_tz, offset) = tz_showing(12 * 3600 - 12, now);
    let jday = julian_day(now + offset);
    let tz = format!(
        "{std_tz}LABS,J{jday}/11:59:59,J{}/12:00:00",
        if jday < 365 { jday + 1 } else { 1 }
    );
    let change = (now + 11) as f64;
    let rule = format!(
        "[[rule]]\nname = \"afternoon\"\ndst = [\"{SERVER2}\"]\nschedule = \"12:30-23:00\"\nwans = [\"isp2\"]\n"
    );
    let mwan = start_scheduled(&lab, &rule, &tz);
    let s = mwan.status();
    assert!(s.clock.local_time.contains("T11:59:"), "{:?}", s.clock);
    assert!(!s.rules[0].active);
    let live = lab
        .host(0)
        .open_stream(SocketAddrV4::new(SERVER2, STREAM_PORT))
        .unwrap();
    assert_eq!(isp_of(&lab, live.source()), 1);
    let seen = connections_between(&lab, change - 3.0, change + 3.0);
    report_switch("DST change", change, &seen);
    let local = mwan.status().clock.local_time;
    assert!(local.contains("T13:00:"), "an hour on: {local}");
    for (t, isp) in &seen {
        if *t < change - 0.2 {
            assert_eq!(*isp, 1, "before the change: {seen:?}");
        }
        if *t > change + 1.0 {
            assert_eq!(*isp, 2, "after the change: {seen:?}");
        }
    }
    let b = live.bytes();
    assert!(wait_until(Duration::from_secs(3), || live.bytes() > b + 256 * 1024));
    assert_eq!(live.end(), None);
    assert_eq!(isp_of(&lab, live.source()), 1);
}

/// The POSIX `Jn` day (1 to 365, February 29 never counted) of the local
/// date at `local_epoch`.
fn julian_day(local_epoch: i64) -> i64 {
    let d = ::mwan::clock::Date::from_days(local_epoch.div_euclid(86_400));
    let jan1 = ::mwan::clock::Date::new(d.year, 1, 1).days();
    let mut n = d.days() - jan1 + 1;
    let leap = ::mwan::clock::days_in_month(d.year, 2) == 29;
    if leap && d.month > 2 {
        n -= 1;
    }
    n
}
