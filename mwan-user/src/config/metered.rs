//! A WAN's keys for metered and backup lines: its allowance per billing
//! cycle (`quota`, `quota_reset_day`, `quota_warn`, `quota_action`,
//! `quota_reset_flows`), what its flows do when it returns (`failback`,
//! `failback_after`, `max_backup_flow_age`, each defaulting to the top
//! level's) and its weights by time of day (`[[wan.weight_schedule]]`).

use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::error::{key, Problem};
use super::raw::{kind, RawConfig, RawWan};
use super::shape::{Described, Int, IntOrStr, IntOrText, List, OneOrMany, Str};
use super::types::*;
use super::values::{duration, positive_duration, ranged};
use crate::schedule::Schedule;

/// The keys of this module of one WAN, read.
pub(super) struct Metered {
    pub(super) quota: Option<Quota>,
    pub(super) reset_day: ResetDay,
    pub(super) failback: Failback,
    pub(super) failback_after: Duration,
    pub(super) max_backup_flow_age: Option<Duration>,
    pub(super) weight_schedule: Vec<WeightSchedule>,
}

/// The metered-line keys of WAN `w`, with the top
/// level's defaults from `top`.
pub(super) fn metered(w: &RawWan, top: &RawConfig) -> Result<Metered, Problem> {
    Ok(Metered {
        quota: quota(w)?,
        reset_day: w.quota_reset_day.read(reset_day)?.unwrap_or_default(),
        failback: w.failback.or(&top.failback).choice().unwrap_or_default(),
        failback_after: w
            .failback_after
            .or(&top.failback_after)
            .read(duration)?
            .unwrap_or(DEFAULT_FAILBACK_AFTER),
        max_backup_flow_age: w
            .max_backup_flow_age
            .or(&top.max_backup_flow_age)
            .read(positive_duration)?,
        weight_schedule: weight_schedule(w)?,
    })
}

/// `quota` and the keys that only mean something with it.
fn quota(w: &RawWan) -> Result<Option<Quota>, Problem> {
    let Some(v) = w.quota.get() else {
        let needs = |s: Option<Range<usize>>| {
            s.map(|s| Problem::span(s, "needs `quota` (the allowance per cycle)"))
        };
        let stray = needs(w.quota_warn.span())
            .or_else(|| needs(w.quota_action.span()))
            .or_else(|| needs(w.quota_reset_flows.span()));
        return match stray {
            Some(p) => Err(p),
            None => Ok(None),
        };
    };
    let text = v.get_ref().as_str();
    let bytes = match crate::usage::parse_size(text) {
        Some(0) => return Err(Problem::at(v, "must be more than 0 bytes")),
        Some(b) => b,
        None => {
            return Err(Problem::at(
                v,
                format!(
                    "`{text}` is not a size: write e.g. \"50GB\", \"500MB\" or \"2GiB\" (GB = 10^9 bytes, GiB = 2^30)"
                ),
            ))
        }
    };
    Ok(Some(Quota {
        bytes,
        warn: w
            .quota_warn
            .read(warn_levels)?
            .unwrap_or_else(|| DEFAULT_QUOTA_WARN.to_vec()),
        action: w.quota_action.choice().unwrap_or_default(),
        reset_flows: w.quota_reset_flows.flag().unwrap_or(false),
    }))
}

/// `quota_warn`: percentages below 100, ascending.
fn warn_levels<K: Described>(v: &Spanned<List<Int<K>>>) -> Result<Vec<u8>, Problem> {
    let mut out: Vec<u8> = Vec::new();
    for item in &v.get_ref().0 {
        let pct = ranged(item, 1u8..=99)?;
        if out.last().is_some_and(|last| *last >= pct) {
            return Err(Problem::at(
                item,
                "the levels must be in ascending order, each once",
            ));
        }
        out.push(pct);
    }
    Ok(out)
}

/// `quota_reset_day`: 1 to 31, a day name, or "daily".
fn reset_day(v: &Spanned<IntOrStr<kind::ResetDay>>) -> Result<ResetDay, Problem> {
    match &v.get_ref().0 {
        IntOrText::Int(d) if (1..=31).contains(d) => Ok(ResetDay::Monthly(*d as u8)),
        IntOrText::Int(d) => Err(Problem::at(
            v,
            format!("{d} is out of range 1..=31 (a day of the month; 29 to 31 mean the last day of shorter months)"),
        )),
        IntOrText::Text(s) if s.eq_ignore_ascii_case("daily") => Ok(ResetDay::Daily),
        IntOrText::Text(s) => crate::clock::weekday_named(s)
            .map(ResetDay::Weekly)
            .ok_or_else(|| Problem::at(v, format!("`{s}` is not {}", kind::ResetDay::EXPECTING))),
    }
}

/// A `schedule` value (one string or a list).
pub(super) fn schedule<K>(v: &Spanned<OneOrMany<Str<K>>>) -> Result<Schedule, Problem> {
    let items: Vec<&str> = v.get_ref().0.iter().map(|i| i.get_ref().as_str()).collect();
    Schedule::parse(&items).map_err(|e| Problem::at(v, e))
}

/// `[[wan.weight_schedule]]`: a schedule and a weight each; no two on at
/// the same moment.
fn weight_schedule(w: &RawWan) -> Result<Vec<WeightSchedule>, Problem> {
    let mut out: Vec<WeightSchedule> = Vec::new();
    for t in &w.weight_schedule.0 {
        let table = t.span();
        let t = t.get_ref();
        let missing = |s: &'static str| Problem::key(Some(table.clone()), s, "missing");
        let v = t.schedule.get().ok_or_else(|| missing(key!(t.schedule)))?;
        let s = schedule(v)?;
        let weight = t
            .weight
            .ranged(1..=1000)?
            .ok_or_else(|| missing(key!(t.weight)))?;
        if let Some(other) = out.iter().find(|o| o.schedule.overlaps(&s)) {
            return Err(Problem::at(
                v,
                format!(
                    "overlaps the weight schedule `{}` (which weight would apply?)",
                    other.schedule
                ),
            ));
        }
        out.push(WeightSchedule {
            schedule: s,
            weight,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::config::fixture::*;
    use crate::config::*;

    /// MIN with `body` in isp2's table.
    fn isp2(body: &str) -> String {
        MIN.replacen(
            "gateway = \"auto\"",
            &format!("gateway = \"auto\"\n{body}"),
            1,
        )
    }

    #[test]
    fn a_metered_lte_line() {
        let c = Config::parse(&isp2(
            "quota = \"50GB\"\nquota_reset_day = 15\nquota_warn = [80]\nquota_action = \"off\"\nquota_reset_flows = true\nfailback = \"keep\"\nmax_backup_flow_age = \"2h\"",
        ))
        .unwrap();
        let (fibre, lte) = (&c.wans[0], &c.wans[1]);
        assert_eq!(fibre.quota, None);
        assert_eq!(fibre.reset_day, ResetDay::Monthly(1));
        assert_eq!(
            lte.quota,
            Some(Quota {
                bytes: 50_000_000_000,
                warn: vec![80],
                action: QuotaAction::Off,
                reset_flows: true
            })
        );
        assert_eq!(lte.reset_day, ResetDay::Monthly(15));
        assert_eq!(lte.max_backup_flow_age, Some(Duration::from_secs(7200)));
        let c = Config::parse(&isp2("quota = \"4 MB\"")).unwrap();
        let q = c.wans[1].quota.as_ref().unwrap();
        assert_eq!(
            (q.bytes, &q.warn[..], q.action),
            (4_000_000, &[75u8, 95][..], QuotaAction::Backup)
        );
        for (day, want) in [
            ("\"Mon\"", ResetDay::Weekly(0)),
            ("\"sunday\"", ResetDay::Weekly(6)),
            ("\"daily\"", ResetDay::Daily),
            ("31", ResetDay::Monthly(31)),
        ] {
            let c = Config::parse(&isp2(&format!("quota_reset_day = {day}"))).unwrap();
            assert_eq!(c.wans[1].reset_day, want, "{day}");
        }
    }

    #[test]
    fn failback_per_wan_with_the_top_level_as_default() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.wans[0].failback, Failback::Keep);
        assert_eq!(c.wans[0].failback_after, DEFAULT_FAILBACK_AFTER);
        assert_eq!(c.failback_spread, DEFAULT_FAILBACK_SPREAD);
        assert!(!c.drains());
        let text = format!(
            "failback = \"drain\"\nfailback_after = \"10s\"\nfailback_spread = \"2s\"\n{}",
            isp2("failback = \"reset\"\nfailback_after = \"1m\"")
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(
            (c.wans[0].failback, c.wans[0].failback_after),
            (Failback::Drain, Duration::from_secs(10))
        );
        assert_eq!(
            (c.wans[1].failback, c.wans[1].failback_after),
            (Failback::Reset, Duration::from_secs(60))
        );
        assert_eq!(c.failback_spread, Duration::from_secs(2));
        assert!(c.drains());
    }

    #[test]
    fn schedules_on_rules_and_weights() {
        let text = format!(
            "{}\n[[wan.weight_schedule]]\nschedule = \"Mon-Fri 08:00-18:00\"\nweight = 5\n[[wan.weight_schedule]]\nschedule = [\"Sat,Sun\"]\nweight = 2\n[[rule]]\nname = \"office\"\nschedule = \"Mon-Fri 08:00-18:00\"\nwans = [\"isp1\"]\n",
            MIN
        );
        let c = Config::parse(&text).unwrap();
        let w = &c.wans[1];
        assert_eq!(w.weight_schedule.len(), 2);
        let monday_noon = 12 * 3600;
        assert_eq!(w.weight_at(monday_noon).0, 5);
        assert_eq!(w.weight_at(5 * 86_400).0, 2);
        assert_eq!(w.weight_at(20 * 3600).0, 1, "outside: the weight");
        assert!(c.wans[0].weight_schedule.is_empty());
        let s = c.rules[0].schedule.as_ref().unwrap();
        assert!(s.active_at(monday_noon) && !s.active_at(5 * 86_400));
    }

    /// The issue's examples of bad values: each refused with its line and
    /// key.
    #[test]
    fn bad_values_are_refused_with_their_line() {
        let cases: Vec<(String, &str, &str)> = vec![
            (isp2("quota = \"50 parsecs\""), "line 15: wan[1] (isp2).quota: ", "is not a size"),
            (isp2("quota = \"0GB\""), "line 15: wan[1] (isp2).quota: ", "more than 0"),
            (isp2("quota = 50"), "line 15: wan[1] (isp2).quota: ", "must be a size"),
            (
                isp2("quota = \"5GB\"\nquota_reset_day = 32"),
                "line 16: wan[1] (isp2).quota_reset_day: ",
                "32 is out of range 1..=31",
            ),
            (
                isp2("quota = \"5GB\"\nquota_reset_day = \"someday\""),
                "line 16: wan[1] (isp2).quota_reset_day: ",
                "is not a day of the month",
            ),
            (
                isp2("quota = \"5GB\"\nquota_warn = [95, 75]"),
                "line 16: wan[1] (isp2).quota_warn",
                "ascending",
            ),
            (
                isp2("quota = \"5GB\"\nquota_warn = [100]"),
                "line 16: wan[1] (isp2).quota_warn",
                "out of range 1..=99",
            ),
            (isp2("quota_warn = [75]"), "line 15: wan[1] (isp2).quota_warn: ", "needs `quota`"),
            (
                isp2("quota = \"5GB\"\nquota_action = \"shout\""),
                "line 16: wan[1] (isp2).quota_action: ",
                "unknown variant `shout`",
            ),
            (
                format!("{MIN}\n[[wan.weight_schedule]]\nschedule = \"Mon-Fri 08:00-18:00\"\nweight = 5\n[[wan.weight_schedule]]\nschedule = \"Fri 17:00-20:00\"\nweight = 2\n"),
                "line 20: wan[1] (isp2).weight_schedule[1].schedule: ",
                "overlaps the weight schedule `Mon-Fri 08:00-18:00`",
            ),
            (
                format!("{MIN}\n[[wan.weight_schedule]]\nschedule = \"Mon-Fri 08:00-18:00\"\n"),
                "line 16: wan[1] (isp2).weight_schedule[0].weight: ",
                "missing",
            ),
            (
                format!("{MIN}\n[[rule]]\nname = \"a\"\nschedule = [\"Mon-Fri 08:00-18:00\", \"Wed 12:00-13:00\"]\nwans = [\"isp1\"]\n"),
                "line 18: rule[0] (a).schedule: ",
                "overlap",
            ),
            (
                format!("{MIN}\n[[rule]]\nname = \"a\"\nschedule = \"Mon-Fri 8am-6pm\"\nwans = [\"isp1\"]\n"),
                "line 18: rule[0] (a).schedule: ",
                "not a time",
            ),
            (
                format!("failback = \"drain\"\nfailback_after = \"soon\"\n{MIN}"),
                "line 2: failback_after: ",
                "not a duration",
            ),
        ];
        for (text, at, reason) in cases {
            let e = parse_err(&text).to_string();
            assert!(
                e.starts_with(at) && e.contains(reason),
                "{e}\nwanted {at}…{reason}\n{text}"
            );
        }
    }

    /// The ```toml blocks of the section of `doc` under `heading`.
    fn toml_blocks(doc: &str, heading: &str) -> Vec<String> {
        let level = heading.split(' ').next().unwrap();
        let start = doc.find(heading).expect("the section");
        let rest = &doc[start + heading.len()..];
        let end = rest.find(&format!("\n{level} ")).unwrap_or(rest.len());
        rest[..end]
            .split("```toml\n")
            .skip(1)
            .map(|b| b.split("```").next().unwrap().to_string())
            .collect()
    }

    /// The fibre + LTE setups of docs/CONFIG.md and the README parse.
    #[test]
    fn the_documented_metered_setups_are_valid() {
        let doc = include_str!("../../../docs/CONFIG.md");
        let blocks = toml_blocks(doc, "## Metered and backup lines");
        assert_eq!(blocks.len(), 2);
        let text = format!(
            "lan_interfaces = [\"eth0\"]\nprobe_targets = [\"198.51.100.1\"]\n{}",
            blocks.join("\n")
        );
        let c = Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(c.wans[1].quota.is_some() && c.wans[1].weight_schedule.len() == 1);
        assert!(c.rules[0].schedule.is_some() && c.drains());
        let readme = include_str!("../../../README.md");
        let blocks = toml_blocks(readme, "## A metered backup line");
        let c = Config::parse(&blocks[0]).unwrap_or_else(|e| panic!("{e}\n{}", blocks[0]));
        assert_eq!(
            c.wans[1].quota.as_ref().map(|q| q.bytes),
            Some(50_000_000_000)
        );
    }

    #[test]
    fn errors_in_a_file_name_the_file_and_line() {
        let s = Scratch::new("metered");
        let path = s.write("mwan.toml", isp2("quota = \"50 parsecs\""));
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}:15: wan[1] (isp2).quota: `50 parsecs` is not a size",
                path.display()
            )),
            "{e}"
        );
    }
}
