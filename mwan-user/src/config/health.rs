//! A WAN's health-check settings: its own keys, else the top level's,
//! else the built-in defaults.

use std::collections::HashSet;
use std::ops::Range;

use toml::Spanned;

use super::error::{key, Problem};
use super::raw::{Health, Setting};
use super::shape::{Float, Int, List, Str};
use super::types::*;
use super::values::{duration, positive_duration, ranged};
use crate::family::Family;

/// The health settings of the WAN whose table is at `table`, from `h`
/// (its keys over the top level's).
pub(super) fn health(h: &Health, table: Range<usize>) -> Result<HealthConfig, Problem> {
    let targets = h.probe_targets.read(targets)?.ok_or_else(|| {
        Problem::key(
            Some(table),
            key!(h.probe_targets),
            "missing: list the addresses to probe through this WAN (per WAN, or at the top level for all WANs)",
        )
    })?;
    Ok(HealthConfig {
        quorum: quorum(h.quorum, &targets)?,
        targets,
        interval: h
            .probe_interval
            .read(positive_duration)?
            .unwrap_or(DEFAULT_PROBE_INTERVAL),
        timeout: h
            .probe_timeout
            .read(positive_duration)?
            .unwrap_or(DEFAULT_PROBE_TIMEOUT),
        down_after: h.down_after.ranged(1..=1000)?.unwrap_or(DEFAULT_DOWN_AFTER),
        up_after: h.up_after.ranged(1..=1000)?.unwrap_or(DEFAULT_UP_AFTER),
        hold_down: h.hold_down.read(duration)?.unwrap_or(DEFAULT_HOLD_DOWN),
        max_loss: h.max_loss.read(percent)?,
        max_rtt: h.max_rtt.read(duration)?,
        window: h
            .health_window
            .ranged(2..=10_000)?
            .unwrap_or(DEFAULT_WINDOW),
        passive: PassiveConfig {
            enabled: h.passive.flag().unwrap_or(true),
            timeout: h
                .passive_timeout
                .read(positive_duration)?
                .unwrap_or(DEFAULT_PASSIVE_TIMEOUT),
            min_destinations: h
                .passive_destinations
                .ranged(2..=48)?
                .unwrap_or(DEFAULT_PASSIVE_DESTINATIONS),
        },
    })
}

/// The probe targets: at least one, each once.
fn targets<K>(v: &Spanned<List<Str<K>>>) -> Result<Vec<ProbeTarget>, Problem> {
    let list = &v.get_ref().0;
    if list.is_empty() {
        return Err(Problem::at(v, "is empty; list at least one target"));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for t in list {
        let t = t.get_ref().as_str();
        let target: ProbeTarget = t.parse().map_err(|e: String| Problem::at(v, e))?;
        if !seen.insert(target.clone()) {
            return Err(Problem::at(v, format!("target `{t}` is listed twice")));
        }
        out.push(target);
    }
    Ok(out)
}

/// The quorum applies to each family's targets, capped at their number
/// (see `HealthConfig::targets_of`): it may not exceed the larger family's.
fn quorum(q: &Setting<Int>, targets: &[ProbeTarget]) -> Result<usize, Problem> {
    let Some(v) = q.get() else {
        return Ok(DEFAULT_QUORUM);
    };
    let quorum = ranged(v, 1..=64u32)? as usize;
    let v6 = targets
        .iter()
        .filter(|t| t.family() == Family::Ipv6)
        .count();
    let most = v6.max(targets.len() - v6);
    if quorum > most {
        return Err(Problem::at(
            v,
            format!(
                "{quorum} is more than the {most} probe target(s) of one family (the quorum applies to the IPv4 and the IPv6 targets separately); the WAN could never be up",
            ),
        ));
    }
    Ok(quorum)
}

fn percent<K>(v: &Spanned<Float<K>>) -> Result<f64, Problem> {
    let p = v.get_ref().0;
    if !(0.0..=100.0).contains(&p) {
        return Err(Problem::at(v, format!("{p} is not a percentage (0..=100)")));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use crate::config::fixture::*;
    use crate::config::*;

    #[test]
    fn defaults_detect_within_a_second() {
        // Worst case: the failure starts just after a round was answered;
        // down_after rounds must then be sent and time out.
        let worst = DEFAULT_PROBE_INTERVAL * DEFAULT_DOWN_AFTER + DEFAULT_PROBE_TIMEOUT;
        assert!(worst < Duration::from_secs(1), "{worst:?}");
        const {
            assert!(
                DEFAULT_DOWN_AFTER >= 2,
                "a single lost probe must not take a WAN down"
            )
        };
    }

    #[test]
    fn per_wan_health_overrides_top_level() {
        let text = MIN.replace(
            "weight = 3",
            "weight = 3\nprobe_interval = \"200ms\"\nprobe_timeout = \"500ms\"\nquorum = 2\ndown_after = 3\nup_after = 5\nhold_down = \"5s\"\nmax_loss = 20\nmax_rtt = \"150ms\"",
        );
        let c = Config::parse(&text).unwrap();
        let h = &c.wans[0].health;
        assert_eq!(h.interval, Duration::from_millis(200));
        assert_eq!(h.timeout, Duration::from_millis(500));
        assert_eq!(h.quorum, 2);
        assert_eq!((h.down_after, h.up_after), (3, 5));
        assert_eq!(h.max_loss, Some(20.0));
        assert_eq!(h.max_rtt, Some(Duration::from_millis(150)));
        assert_eq!(c.wans[1].health.interval, DEFAULT_PROBE_INTERVAL);
    }

    #[test]
    fn passive_is_on_by_default_and_its_keys_are_checked() {
        let c = Config::parse(MIN).unwrap();
        let p = c.wans[0].health.passive;
        assert!(p.enabled);
        assert_eq!(p.timeout, DEFAULT_PASSIVE_TIMEOUT);
        assert_eq!(p.min_destinations, DEFAULT_PASSIVE_DESTINATIONS);
        let c = Config::parse(&MIN.replace(
            "weight = 3",
            "weight = 3\npassive = false\npassive_timeout = \"2s\"\npassive_destinations = 12",
        ))
        .unwrap();
        let p = c.wans[0].health.passive;
        assert_eq!(
            (p.enabled, p.timeout, p.min_destinations),
            (false, Duration::from_secs(2), 12)
        );
        assert!(c.wans[1].health.passive.enabled);
        let e = parse_err(&MIN.replace("weight = 3", "weight = 3\npassive_destinations = 1"));
        assert!(e.key.ends_with(".passive_destinations"), "{e}");
        let e = parse_err(&MIN.replace("weight = 3", "weight = 3\npassive = \"yes\""));
        assert!(e.key.ends_with(".passive"), "{e}");
    }

    /// The quorum applies to each family's targets, capped at their number.
    #[test]
    fn quorum_applies_per_family() {
        let c = Config::parse(&MIN.replace(
            r#"probe_targets = ["198.51.100.1", "tcp:203.0.113.9:443"]"#,
            "probe_targets = [\"198.51.100.1\", \"tcp:203.0.113.9:443\", \"2001:db8::1\"]\nquorum = 2",
        ))
        .unwrap();
        let h = &c.wans[0].health;
        let (v4, q4) = h.targets_of(Family::Ipv4);
        let (v6, q6) = h.targets_of(Family::Ipv6);
        assert_eq!((v4.len(), q4, v6.len(), q6), (2, 2, 1, 1));
        let e = parse_err(&MIN.replace(
            r#"probe_targets = ["198.51.100.1", "tcp:203.0.113.9:443"]"#,
            "probe_targets = [\"198.51.100.1\", \"2001:db8::1\"]\nquorum = 2",
        ));
        assert_eq!(e.key, "quorum");
        assert!(e.reason.contains("of one family"), "{e}");
    }
}
