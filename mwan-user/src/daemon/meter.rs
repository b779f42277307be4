//! The WANs' usage per billing cycle in the daemon (the accounting itself
//! is `crate::usage`'s): sampled from the kernel's interface counters once
//! a second, kept in the usage file (`Config::usage_path`, written
//! atomically every minute, at each threshold, reload and stop), its
//! thresholds reported (log, events, `on_change` hooks with `MWAN_EVENT =
//! quota`, metrics), and what each WAN's allowance still allows handed to
//! the desired state as an input.
//!
//! The usage file outlives `mwan stop --teardown`: a billing cycle is the
//! admin's record of the ISP's bill, not mwan's state in the kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use super::wan::WanRt;
use super::Daemon;
use crate::clock::{self, LocalTime};
use crate::config::{self, Config, QuotaAction};
use crate::control::{ByteCounts, Event, PastCycle, UsageStatus};
use crate::hooks::{run_hook, HookEvent};
use crate::policy::Allowance;
use crate::usage::{self, cycle_at, show_size, Counters, UsageFile, WanUsage};

/// How often the usage file is written while the usage grows.
const SAVE_EVERY: Duration = Duration::from_secs(60);

pub struct Meter {
    file: UsageFile,
    path: PathBuf,
    /// WANs whose recorded counters are of another boot (their next
    /// sample counts from zero).
    stale: BTreeSet<String>,
    dirty: bool,
    saved: Option<Instant>,
}

/// What a sample or a config change reached for one WAN.
#[derive(Debug, PartialEq, Eq)]
pub enum Notice {
    Warning { wan: String, pct: u8 },
    Exhausted { wan: String },
    NewCycle { wan: String, previous: u64 },
}

impl Meter {
    /// The usage recorded in `cfg`'s usage file. An unreadable file is set
    /// aside (`.bad`) and counting starts afresh: the returned warning says
    /// so.
    pub fn load(cfg: &Config) -> (Meter, Option<String>) {
        let path = cfg.usage_path();
        let boot = usage::boot_id();
        let (file, warning) = match UsageFile::load(&path) {
            Ok(Some(f)) if f.version == usage::FILE_VERSION => (f, None),
            Ok(None) => (UsageFile::default(), None),
            Ok(Some(f)) => (
                UsageFile::default(),
                Some(format!(
                    "{}: usage file version {} is not {}: counting afresh",
                    path.display(),
                    f.version,
                    usage::FILE_VERSION
                )),
            ),
            Err(e) => {
                let bad = path.with_extension("json.bad");
                let _ = std::fs::rename(&path, &bad);
                let w = format!("{e:#}: kept as {}; counting afresh", bad.display());
                (UsageFile::default(), Some(w))
            }
        };
        let stale = if file.boot_id == boot {
            BTreeSet::new()
        } else {
            file.wans.keys().cloned().collect()
        };
        let file = UsageFile {
            version: usage::FILE_VERSION,
            boot_id: boot,
            ..file
        };
        let m = Meter {
            file,
            path,
            stale,
            dirty: true,
            saved: None,
        };
        (m, warning)
    }

    /// Takes `cfg`'s WANs (a start or a reload): a WAN without a record
    /// starts a cycle at zero, a record whose cycle has ended is closed, the
    /// others end at the reset day `cfg` gives; records of WANs no longer
    /// configured are dropped.
    pub fn configure(&mut self, cfg: &Config, now: &LocalTime) -> Vec<Notice> {
        self.file
            .wans
            .retain(|name, _| cfg.wans.iter().any(|w| &w.name == name));
        let mut notices = Vec::new();
        for w in &cfg.wans {
            let cycle = cycle_at(w.reset_day, now, &clock::epoch_of);
            let u = self
                .file
                .wans
                .entry(w.name.clone())
                .or_insert_with(|| WanUsage::new(cycle));
            if let Some(n) = roll(w, u, now, cycle) {
                notices.push(n);
            } else {
                u.cycle.end = cycle.end;
            }
            notices.extend(check(w, u));
        }
        self.dirty = true;
        notices
    }

    /// Adds a sample of the counters (by WAN name) at `now`.
    pub fn sample(
        &mut self,
        cfg: &Config,
        counters: &BTreeMap<String, (Counters, u64)>,
        now: &LocalTime,
    ) -> Vec<Notice> {
        let mut notices = Vec::new();
        for w in &cfg.wans {
            let Some(u) = self.file.wans.get_mut(&w.name) else {
                continue;
            };
            let next = || cycle_at(w.reset_day, now, &clock::epoch_of);
            if now.epoch >= u.cycle.end {
                notices.extend(roll(w, u, now, next()));
            }
            if let Some((c, header)) = counters.get(&w.name) {
                let same_boot = !self.stale.remove(&w.name);
                let before = u.total();
                u.add(*c, *header, same_boot);
                self.dirty |= u.total() != before || u.counters != Some(*c);
            }
            notices.extend(check(w, u));
        }
        if !notices.is_empty() {
            self.save(true);
        }
        notices
    }

    /// What each WAN's allowance allows now, by id.
    pub fn allowances(&self, wans: &[WanRt]) -> BTreeMap<u8, Allowance> {
        wans.iter()
            .filter_map(|w| {
                let q = w.cfg.quota.as_ref()?;
                let u = self.file.wans.get(&w.cfg.name)?;
                if !u.exhausted() {
                    return None;
                }
                let reset = q.reset_flows;
                let a = match q.action {
                    QuotaAction::Backup => Allowance::Backup { reset },
                    QuotaAction::Off => Allowance::Off { reset },
                    QuotaAction::None => return None,
                };
                Some((w.id, a))
            })
            .collect()
    }

    pub fn usage(&self, name: &str) -> Option<&WanUsage> {
        self.file.wans.get(name)
    }

    /// Writes the usage file if it changed, at most once a minute unless
    /// `force`d.
    pub fn save(&mut self, force: bool) {
        let due = self.saved.is_none_or(|t| t.elapsed() >= SAVE_EVERY);
        if !self.dirty || !(force || due) {
            return;
        }
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match self.file.save(&self.path) {
            Ok(()) => {
                self.dirty = false;
                self.saved = Some(Instant::now());
            }
            Err(e) => warn!(error = %format!("{e:#}"), "writing the usage file"),
        }
    }
}

/// Closes `u`'s cycle if `now` is past its end, starting `next`.
fn roll(w: &config::Wan, u: &mut WanUsage, now: &LocalTime, next: usage::Cycle) -> Option<Notice> {
    let before = u.total();
    u.roll(now.epoch, next).then(|| Notice::NewCycle {
        wan: w.name.clone(),
        previous: before,
    })
}

/// The thresholds of `w`'s quota that `u` reached since they were last
/// reported.
fn check(w: &config::Wan, u: &mut WanUsage) -> Vec<Notice> {
    let Some(q) = &w.quota else {
        return Vec::new();
    };
    let c = u.crossings(q.bytes, &q.warn);
    let mut out: Vec<Notice> = c
        .warnings
        .into_iter()
        .map(|pct| Notice::Warning {
            wan: w.name.clone(),
            pct,
        })
        .collect();
    if c.exhausted {
        out.push(Notice::Exhausted {
            wan: w.name.clone(),
        });
    }
    out
}

/// The counters of each WAN's interface now (by WAN name), with its link
/// header length; WANs whose interface is missing have none.
pub fn read_counters(wans: &[WanRt]) -> BTreeMap<String, (Counters, u64)> {
    let links = usage::net_dev();
    wans.iter()
        .filter_map(|w| {
            let iface = &w.cfg.interface;
            let link = links.get(iface)?.bytes;
            let sys = |f: &str| std::fs::read_to_string(format!("/sys/class/net/{iface}/{f}"));
            let ifindex: u32 = sys("ifindex").ok()?.trim().parse().ok()?;
            // ARPHRD_ETHER (1): a 14-byte header on every frame.
            let header = match sys("type").map(|t| t.trim().to_string()).as_deref() {
                Ok("1") => 14,
                _ => 0,
            };
            let snmp6 =
                std::fs::read_to_string(format!("/proc/net/dev_snmp6/{iface}")).unwrap_or_default();
            let (ip6, ip6_packets) = usage::parse_snmp6(&snmp6);
            let c = Counters {
                ifindex,
                link,
                ip6,
                ip6_packets,
            };
            Some((w.cfg.name.clone(), (c, header)))
        })
        .collect()
}

impl Daemon {
    /// Once a second: samples the counters, reports what was reached, and
    /// reconciles when a WAN's allowance changed what it may take.
    pub(super) async fn on_meter_tick(&mut self) {
        let counters = read_counters(&self.wans);
        let before = self.meter.allowances(&self.wans);
        let notices = self.meter.sample(&self.cfg, &counters, &LocalTime::now());
        self.on_notices(notices);
        if self.meter.allowances(&self.wans) != before {
            if let Err(e) = self.reconcile(false).await {
                tracing::error!(error = %format!("{e:#}"), "applying a WAN's allowance");
            }
        }
        self.meter.save(false);
    }

    /// Logs each notice, records it as an event and runs the hook.
    pub(super) fn on_notices(&mut self, notices: Vec<Notice>) {
        for n in notices {
            self.report.dirty = true;
            let (name, pct) = match &n {
                Notice::Warning { wan, pct } => (wan, *pct),
                Notice::Exhausted { wan } => (wan, 100),
                Notice::NewCycle { wan, .. } => (wan, 0),
            };
            let Some(w) = self.wans.iter().find(|w| &w.cfg.name == name) else {
                continue;
            };
            let used = self.meter.usage(name).map_or(0, WanUsage::total);
            let quota = w.cfg.quota.as_ref().map_or(0, |q| q.bytes);
            let reason = match &n {
                Notice::NewCycle { previous, .. } => {
                    format!(
                        "a new billing cycle began (the last one used {})",
                        show_size(*previous)
                    )
                }
                _ => format!(
                    "{pct}% of the {} allowance used ({}); {}",
                    show_size(quota),
                    show_size(used),
                    effect(&w.cfg, pct == 100, false)
                ),
            };
            if pct == 100 {
                warn!(wan = %name, used, quota, "{reason}");
            } else {
                info!(wan = %name, used, quota, "{reason}");
            }
            let state = w.state(crate::family::Family::Ipv4).to_string();
            if let Some(cmd) = &self.cfg.on_change {
                let hook = HookEvent {
                    event: "quota",
                    wan: name.clone(),
                    interface: w.cfg.interface.clone(),
                    family: "ipv4".into(),
                    old: state.clone(),
                    new: state,
                    reason: reason.clone(),
                    loss_pct: 0.0,
                    rtt_ms: None,
                    time: SystemTime::now(),
                    extra: vec![
                        ("MWAN_QUOTA_PCT", pct.to_string()),
                        ("MWAN_USAGE_BYTES", used.to_string()),
                        ("MWAN_QUOTA_BYTES", quota.to_string()),
                    ],
                };
                run_hook(cmd, &hook, self.cfg.hook_timeout);
            }
            let from = match &n {
                Notice::NewCycle { .. } => "100%".to_string(),
                _ => "-".to_string(),
            };
            self.push_event(Event {
                time: super::status::rfc3339(SystemTime::now()),
                kind: "quota".into(),
                wan: name.clone(),
                family: "all".into(),
                from,
                to: format!("{pct}%"),
                reason,
            });
        }
    }

    /// `w`'s usage for `mwan status`.
    pub(super) fn usage_status(&self, w: &WanRt, held_back: bool) -> Option<UsageStatus> {
        let u = self.meter.usage(&w.cfg.name)?;
        let both = u.bytes.both();
        let counts = |f| {
            let b = u.bytes.get(f);
            ByteCounts {
                rx_bytes: b.rx,
                tx_bytes: b.tx,
            }
        };
        let local = |t: i64| LocalTime::at(t).to_string();
        let q = w.cfg.quota.as_ref();
        Some(UsageStatus {
            cycle_start: local(u.cycle.start),
            next_reset: local(u.cycle.end),
            cycle_start_epoch: u.cycle.start,
            next_reset_epoch: u.cycle.end,
            rx_bytes: both.rx,
            tx_bytes: both.tx,
            bytes: both.total(),
            ipv4: counts(crate::family::Family::Ipv4),
            ipv6: counts(crate::family::Family::Ipv6),
            quota_bytes: q.map(|q| q.bytes),
            used_pct: q.map(|q| (u.total() as f64 * 1e4 / q.bytes as f64).round() / 100.0),
            warn_pct: q.map(|q| q.warn.clone()).unwrap_or_default(),
            reached_pct: {
                let mut r = u.warned.clone();
                r.sort_unstable();
                r
            },
            action: q.map(|q| q.action.to_string()),
            exhausted: q.is_some() && u.exhausted(),
            held_back,
            effect: effect(&w.cfg, q.is_some() && u.exhausted(), held_back),
            previous_cycle: u.previous.map(|p| PastCycle {
                start: local(p.cycle.start),
                end: local(p.cycle.end),
                bytes: p.bytes.total(),
            }),
        })
    }
}

/// What mwan does about `w`'s allowance, in words: now that it is
/// `exhausted` (and `held` back), or at 100 %.
fn effect(w: &config::Wan, exhausted: bool, held: bool) -> String {
    let Some(q) = &w.quota else {
        return "counting (no quota)".into();
    };
    let reset = if q.reset_flows {
        ", and its connections move to the other WANs"
    } else {
        "; its connections stay"
    };
    match (exhausted, q.action) {
        (_, QuotaAction::None) if exhausted => {
            "used up: reported only (quota_action = \"none\")".into()
        }
        (_, QuotaAction::None) => "at 100%: reported only (quota_action = \"none\")".into(),
        (false, QuotaAction::Backup) => {
            format!("at 100%: new flows only while no other WAN is up{reset}")
        }
        (false, QuotaAction::Off) => format!("at 100%: no new flows{reset}"),
        (true, QuotaAction::Backup) if held => {
            format!("used up: no new flows while another WAN is up{reset}")
        }
        (true, QuotaAction::Backup) => {
            "used up, but no other WAN is up: taking new flows as a backup".into()
        }
        (true, QuotaAction::Off) => format!("used up: no new flows until the cycle resets{reset}"),
    }
}
