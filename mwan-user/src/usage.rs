//! Per-WAN usage in billing cycles, for allowances (`quota`): pure.
//!
//! **Where the bytes come from.** The kernel already counts every byte a
//! link carries, in both directions: the interface's counters
//! (`/proc/net/dev`: everything on the link, the router's own traffic and
//! mwan's probes included, as the ISP meters it), and per interface the
//! IPv6 layer's (`/proc/net/dev_snmp6/IFACE`: `Ip6InOctets`,
//! `Ip6OutOctets` and the packets, IP bytes). mwan reads them once a
//! second and adds what they grew by to the WAN's cycle: nothing is added
//! to the path of a packet. IPv6 is the IPv6 layer's bytes plus the link
//! header of each packet; IPv4 is the rest of the link's (IPv4 and ARP).
//!
//! **Counters that start again.** A sample is added as the difference to
//! the last one of the same interface instance since the same boot. When
//! the interface was re-created (a PPP redial: another ifindex), when the
//! host rebooted (another boot id) or when a counter went backwards, the
//! whole counter is new traffic. So traffic while mwan was stopped is
//! counted at its next start; what an interface instance carried and lost
//! with itself while mwan was not looking is not.
//!
//! **Cycles.** A cycle starts at local midnight of the reset day (day of
//! the month, day of the week, or every day) and ends at the next one; a
//! cycle whose end has passed is closed (kept as the previous cycle) and a
//! new one starts at zero.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::clock::{Date, LocalTime};
use crate::config::ResetDay;
use crate::family::{Family, PerFamily};

/// Bytes in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bytes {
    pub rx: u64,
    pub tx: u64,
}

impl Bytes {
    pub fn total(&self) -> u64 {
        self.rx.saturating_add(self.tx)
    }
}

/// What the kernel counts for one interface instance, cumulative.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub ifindex: u32,
    /// The link's bytes (`/proc/net/dev`).
    pub link: Bytes,
    /// The IPv6 layer's bytes and packets (`dev_snmp6`).
    pub ip6: Bytes,
    pub ip6_packets: Bytes,
}

/// The start and end of a billing cycle, seconds since the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cycle {
    pub start: i64,
    pub end: i64,
}

/// The cycle holding `now` under `reset`: from local midnight of the last
/// reset day to the next; `to_epoch` turns local civil time into a moment
/// (`clock::epoch_of`).
pub fn cycle_at(reset: ResetDay, now: &LocalTime, to_epoch: &dyn Fn(Date, u32) -> i64) -> Cycle {
    let today = now.date;
    let (start, end) = match reset {
        ResetDay::Daily => (today, today.add_days(1)),
        ResetDay::Weekly(wd) => {
            let back = (i64::from(today.weekday()) - i64::from(wd)).rem_euclid(7);
            let start = today.add_days(-back);
            (start, start.add_days(7))
        }
        ResetDay::Monthly(day) => {
            let this = today.nth_of_month(0, day);
            if this <= today {
                (this, today.nth_of_month(1, day))
            } else {
                (today.nth_of_month(-1, day), this)
            }
        }
    };
    let (start, end) = (to_epoch(start, 0), to_epoch(end, 0));
    // A time zone whose midnight a daylight saving change skips: never an
    // empty or inverted cycle.
    Cycle {
        start: start.min(now.epoch),
        end: end.max(now.epoch + 1),
    }
}

/// One WAN's usage: the current cycle's bytes per family, the thresholds
/// already reported, and the counters last added.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WanUsage {
    pub cycle: Cycle,
    pub bytes: PerFamilyBytes,
    /// Warning levels (percent) reported in this cycle, and whether 100 %
    /// was.
    #[serde(default)]
    pub warned: Vec<u8>,
    #[serde(default)]
    pub counters: Option<Counters>,
    /// The cycle before, closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<ClosedCycle>,
}

/// Per family (serialized by family name).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerFamilyBytes {
    pub ipv4: Bytes,
    pub ipv6: Bytes,
}

impl PerFamilyBytes {
    pub fn get(&self, f: Family) -> Bytes {
        match f {
            Family::Ipv4 => self.ipv4,
            Family::Ipv6 => self.ipv6,
        }
    }

    pub fn both(&self) -> Bytes {
        Bytes {
            rx: self.ipv4.rx.saturating_add(self.ipv6.rx),
            tx: self.ipv4.tx.saturating_add(self.ipv6.tx),
        }
    }

    fn add(&mut self, d: PerFamily<Bytes>) {
        for (f, b) in d.iter() {
            let mine = match f {
                Family::Ipv4 => &mut self.ipv4,
                Family::Ipv6 => &mut self.ipv6,
            };
            mine.rx = mine.rx.saturating_add(b.rx);
            mine.tx = mine.tx.saturating_add(b.tx);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedCycle {
    pub cycle: Cycle,
    pub bytes: Bytes,
}

/// What one sample changed for a WAN.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Crossed {
    /// Warning levels reached now (percent, ascending).
    pub warnings: Vec<u8>,
    /// 100 % reached now.
    pub exhausted: bool,
    /// The cycle ended (before the sample was added): a new one began.
    pub new_cycle: bool,
}

impl WanUsage {
    pub fn new(cycle: Cycle) -> WanUsage {
        WanUsage {
            cycle,
            bytes: PerFamilyBytes::default(),
            warned: Vec::new(),
            counters: None,
            previous: None,
        }
    }

    /// Bytes of both families and directions this cycle.
    pub fn total(&self) -> u64 {
        self.bytes.both().total()
    }

    /// Closes the cycle if `now` is past its end, starting `next`.
    pub fn roll(&mut self, now: i64, next: Cycle) -> bool {
        if now < self.cycle.end {
            return false;
        }
        self.previous = Some(ClosedCycle {
            cycle: self.cycle,
            bytes: self.bytes.both(),
        });
        self.cycle = next;
        self.bytes = PerFamilyBytes::default();
        self.warned.clear();
        true
    }

    /// Adds a sample of the WAN's interface; `header` is the link header
    /// length (14 on Ethernet, 0 on PPP and tunnels), `same_boot` whether
    /// the last counters are of this boot. The first sample ever only sets
    /// the baseline (what the link carried before mwan is of no known
    /// cycle).
    pub fn add(&mut self, c: Counters, header: u64, same_boot: bool) {
        if let Some(last) = self.counters.filter(|_| same_boot) {
            self.bytes.add(growth(&last, &c, header));
        } else if self.counters.is_some() {
            // Another boot: all these counters counted is new.
            self.bytes.add(growth(&Counters::default(), &c, header));
        }
        self.counters = Some(c);
    }

    /// The levels of `warn` (percent) and 100 % that usage reached since
    /// they were last reported (each once per cycle).
    pub fn crossings(&mut self, quota: u64, warn: &[u8]) -> Crossed {
        let used = self.total();
        let reached = |pct: u8| u128::from(used) * 100 >= u128::from(quota) * u128::from(pct);
        let mut out = Crossed::default();
        for &pct in warn.iter().chain(&[100]) {
            if reached(pct) && !self.warned.contains(&pct) {
                self.warned.push(pct);
                if pct == 100 {
                    out.exhausted = true;
                } else {
                    out.warnings.push(pct);
                }
            }
        }
        out
    }

    /// Whether 100 % was reached this cycle.
    pub fn exhausted(&self) -> bool {
        self.warned.contains(&100)
    }
}

/// What the counters grew by from `last` to `c`, per family. A new
/// interface instance, or a counter that went backwards, counts from zero.
fn growth(last: &Counters, c: &Counters, header: u64) -> PerFamily<Bytes> {
    let renewed = last.ifindex != c.ifindex;
    let diff = |new: u64, old: u64| if renewed || new < old { new } else { new - old };
    let d = |pick: fn(&Counters) -> u64| diff(pick(c), pick(last));
    let link = Bytes {
        rx: d(|c| c.link.rx),
        tx: d(|c| c.link.tx),
    };
    let ip6 = Bytes {
        rx: d(|c| c.ip6.rx)
            .saturating_add(d(|c| c.ip6_packets.rx).saturating_mul(header))
            .min(link.rx),
        tx: d(|c| c.ip6.tx)
            .saturating_add(d(|c| c.ip6_packets.tx).saturating_mul(header))
            .min(link.tx),
    };
    PerFamily::new(|f| match f {
        Family::Ipv6 => ip6,
        Family::Ipv4 => Bytes {
            rx: link.rx - ip6.rx,
            tx: link.tx - ip6.tx,
        },
    })
}

/// The usage file (`<state_dir>/usage.json`, or `usage_file`): every
/// WAN's usage by name, and the boot it was saved in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageFile {
    pub version: u32,
    /// `/proc/sys/kernel/random/boot_id` when saved: the counters are of
    /// that boot.
    pub boot_id: String,
    pub wans: BTreeMap<String, WanUsage>,
}

pub const FILE_VERSION: u32 = 1;

impl UsageFile {
    /// The file at `path`; none when it does not exist.
    pub fn load(path: &Path) -> Result<Option<UsageFile>> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let f: UsageFile = serde_json::from_str(&text)
                    .with_context(|| format!("reading {}", path.display()))?;
                Ok(Some(f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Written atomically (a temporary file, then renamed over it).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }
}

/// The boot id (empty when unreadable: every start is then a new boot).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// One interface's line of `/proc/net/dev`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetDev {
    pub bytes: Bytes,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// The link's counters of every interface (`/proc/net/dev` text).
pub fn parse_net_dev(text: &str) -> BTreeMap<String, NetDev> {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            if v.len() < 10 {
                return None;
            }
            let dev = NetDev {
                bytes: Bytes { rx: v[0], tx: v[8] },
                rx_packets: v[1],
                tx_packets: v[9],
            };
            Some((name.trim().to_string(), dev))
        })
        .collect()
}

/// [`parse_net_dev`] of the kernel's `/proc/net/dev` now (empty if it cannot
/// be read).
pub fn net_dev() -> BTreeMap<String, NetDev> {
    parse_net_dev(&std::fs::read_to_string("/proc/net/dev").unwrap_or_default())
}

/// The IPv6 layer's (bytes, packets) of one interface (`dev_snmp6` text).
pub fn parse_snmp6(text: &str) -> (Bytes, Bytes) {
    let mut bytes = Bytes::default();
    let mut packets = Bytes::default();
    let (mut out_requests, mut out_forwarded, mut transmits) = (0, 0, None);
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next().and_then(|v| v.parse::<u64>().ok())) else {
            continue;
        };
        match k {
            "Ip6InOctets" => bytes.rx = v,
            "Ip6OutOctets" => bytes.tx = v,
            "Ip6InReceives" => packets.rx = v,
            "Ip6OutTransmits" => transmits = Some(v),
            "Ip6OutRequests" => out_requests = v,
            "Ip6OutForwDatagrams" => out_forwarded = v,
            _ => {}
        }
    }
    // Kernels before 6.3 have no Ip6OutTransmits.
    packets.tx = transmits.unwrap_or(out_requests + out_forwarded);
    (bytes, packets)
}

/// `"50GB"`, `"1.5 TB"`, `"500MiB"`, `"123456"` (bytes): SI units are
/// decimal (GB is 10^9 bytes, as ISPs bill), IEC units binary.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    if num.is_empty() || num.starts_with('.') || num.matches('.').count() > 1 {
        return None;
    }
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "tb" | "t" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let int: u64 = int.parse().ok()?;
    let mut bytes = int.checked_mul(mult)?;
    if !frac.is_empty() {
        let digits = frac.len().min(12) as u32;
        let f: u64 = frac[..digits as usize].parse().ok()?;
        let part = (u128::from(f) * u128::from(mult)) / 10u128.pow(digits);
        bytes = bytes.checked_add(part as u64)?;
    }
    Some(bytes)
}

/// A size as people read it: `37.5 MB`, `50 GB`, `812 B`.
pub fn show_size(b: u64) -> String {
    const UNITS: [(&str, f64); 4] = [("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)];
    for (u, m) in UNITS {
        if b as f64 >= m {
            let v = b as f64 / m;
            return if v >= 100.0 || v.fract() == 0.0 {
                format!("{v:.0} {u}")
            } else {
                format!("{v:.1} {u}")
            };
        }
    }
    format!("{b} B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::utc_epoch_of;

    fn utc(date: Date, secs: u32) -> LocalTime {
        LocalTime::utc(utc_epoch_of(date, secs))
    }

    fn dates(c: Cycle) -> (Date, Date) {
        (LocalTime::utc(c.start).date, LocalTime::utc(c.end).date)
    }

    #[test]
    fn cycles_start_at_midnight_of_the_reset_day() {
        let to = &utc_epoch_of;
        let d = |y, m, d| Date::new(y, m, d);
        let now = utc(d(2026, 3, 14), 12 * 3600);
        assert_eq!(
            dates(cycle_at(ResetDay::Monthly(1), &now, to)),
            (d(2026, 3, 1), d(2026, 4, 1))
        );
        assert_eq!(
            dates(cycle_at(ResetDay::Monthly(20), &now, to)),
            (d(2026, 2, 20), d(2026, 3, 20))
        );
        assert_eq!(
            dates(cycle_at(ResetDay::Monthly(14), &now, to)),
            (d(2026, 3, 14), d(2026, 4, 14))
        );
        // Day 31 in short months is their last day.
        let feb = utc(d(2026, 2, 28), 0);
        assert_eq!(
            dates(cycle_at(ResetDay::Monthly(31), &feb, to)),
            (d(2026, 2, 28), d(2026, 3, 31))
        );
        let feb27 = utc(d(2026, 2, 27), 0);
        assert_eq!(
            dates(cycle_at(ResetDay::Monthly(31), &feb27, to)),
            (d(2026, 1, 31), d(2026, 2, 28))
        );
        // 2026-03-14 is a Saturday.
        assert_eq!(
            dates(cycle_at(ResetDay::Weekly(0), &now, to)),
            (d(2026, 3, 9), d(2026, 3, 16))
        );
        assert_eq!(
            dates(cycle_at(ResetDay::Weekly(5), &now, to)),
            (d(2026, 3, 14), d(2026, 3, 21))
        );
        assert_eq!(
            dates(cycle_at(ResetDay::Daily, &now, to)),
            (d(2026, 3, 14), d(2026, 3, 15))
        );
        let c = cycle_at(ResetDay::Daily, &now, to);
        assert_eq!(c.end - c.start, 86_400);
    }

    fn sample(ifindex: u32, rx: u64, tx: u64, rx6: u64, tx6: u64, p6: u64) -> Counters {
        Counters {
            ifindex,
            link: Bytes { rx, tx },
            ip6: Bytes { rx: rx6, tx: tx6 },
            ip6_packets: Bytes { rx: p6, tx: p6 },
        }
    }

    #[test]
    fn usage_grows_by_the_counters_differences_per_family() {
        let mut u = WanUsage::new(Cycle { start: 0, end: 100 });
        u.add(sample(5, 1000, 500, 0, 0, 0), 14, true);
        assert_eq!(u.total(), 0, "the first sample is the baseline");
        // 10 IPv6 packets of 100 IP bytes each way: 1140 link bytes.
        u.add(sample(5, 11_000, 2_500, 1000, 1000, 10), 14, true);
        assert_eq!(u.bytes.ipv6, Bytes { rx: 1140, tx: 1140 });
        assert_eq!(u.bytes.ipv4, Bytes { rx: 8860, tx: 860 });
        assert_eq!(u.total(), 12_000);
        // Re-created interface (PPP redial): its counters are all new.
        u.add(sample(9, 300, 200, 0, 0, 0), 14, true);
        assert_eq!(u.total(), 12_500);
        // A counter that went backwards on the same instance: new too.
        u.add(sample(9, 100, 250, 0, 0, 0), 14, true);
        assert_eq!(u.total(), 12_650);
        // Another boot: the same ifindex, counting since the boot.
        u.add(sample(9, 4_000, 1_000, 0, 0, 0), 14, false);
        assert_eq!(u.total(), 17_650);
    }

    #[test]
    fn thresholds_are_reported_once_per_cycle_and_a_cycle_rolls_over() {
        let mut u = WanUsage::new(Cycle { start: 0, end: 100 });
        u.add(sample(1, 0, 0, 0, 0, 0), 0, true);
        u.add(sample(1, 740, 0, 0, 0, 0), 0, true);
        assert_eq!(u.crossings(1000, &[75, 95]), Crossed::default());
        u.add(sample(1, 960, 0, 0, 0, 0), 0, true);
        let c = u.crossings(1000, &[75, 95]);
        assert_eq!((c.warnings, c.exhausted), (vec![75, 95], false));
        assert_eq!(u.crossings(1000, &[75, 95]), Crossed::default(), "once");
        u.add(sample(1, 1000, 0, 0, 0, 0), 0, true);
        assert!(u.crossings(1000, &[75, 95]).exhausted && u.exhausted());
        assert!(!u.roll(
            99,
            Cycle {
                start: 100,
                end: 200
            }
        ));
        assert!(u.roll(
            100,
            Cycle {
                start: 100,
                end: 200
            }
        ));
        assert_eq!(u.total(), 0);
        assert!(!u.exhausted());
        assert_eq!(u.previous.unwrap().bytes.total(), 1000);
        u.add(sample(1, 1100, 0, 0, 0, 0), 0, true);
        assert_eq!(u.total(), 100, "counting on from the same counters");
    }

    #[test]
    fn kernel_counter_texts() {
        let dev = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:     128       2    0    0    0     0          0         0      128       2    0    0    0     0       0          0\n  wan2: 9876543   12000    0    0    0     0          0         0   123456     900    0    0    0     0       0          0\n";
        let m = parse_net_dev(dev);
        assert_eq!(
            m["wan2"],
            NetDev {
                bytes: Bytes {
                    rx: 9_876_543,
                    tx: 123_456
                },
                rx_packets: 12_000,
                tx_packets: 900,
            }
        );
        assert_eq!(m["lo"].bytes, Bytes { rx: 128, tx: 128 });
        let snmp = "ifIndex\t5\nIp6InReceives\t7\nIp6OutRequests\t3\nIp6OutForwDatagrams\t2\nIp6InOctets\t700\nIp6OutOctets\t500\nIp6OutTransmits\t6\n";
        assert_eq!(
            parse_snmp6(snmp),
            (Bytes { rx: 700, tx: 500 }, Bytes { rx: 7, tx: 6 })
        );
        let old = snmp.replace("Ip6OutTransmits\t6\n", "");
        assert_eq!(parse_snmp6(&old).1.tx, 5);
    }

    #[test]
    fn sizes() {
        for (s, b) in [
            ("50GB", 50_000_000_000),
            ("50 GB", 50_000_000_000),
            ("1.5TB", 1_500_000_000_000),
            ("500MiB", 500 << 20),
            ("4 MB", 4_000_000),
            ("2.25 kB", 2250),
            ("123456", 123_456),
            ("8G", 8_000_000_000),
        ] {
            assert_eq!(parse_size(s), Some(b), "{s}");
        }
        for s in [
            "50 parsecs",
            "",
            "GB",
            ".5GB",
            "1.2.3GB",
            "-1GB",
            "99999999999999TB",
        ] {
            assert_eq!(parse_size(s), None, "{s}");
        }
        assert_eq!(show_size(37_500_000), "37.5 MB");
        assert_eq!(show_size(50_000_000_000), "50 GB");
        assert_eq!(show_size(812), "812 B");
        assert_eq!(show_size(123_456_789), "123 MB");
    }
}
