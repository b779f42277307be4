//! From the raw tables to [`Config`]: the top level's keys and the WANs
//! (health.rs: their health checks; rules.rs: the rules). A key is read by
//! one line here, with the reader of its kind (values.rs) and its default.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;

use mwan_common::{MAX_WANS, WAN_NAME_LEN};
use toml::Spanned;

use super::error::{key, Problem};
use super::health::health;
use super::metered::metered;
use super::raw::{kind, Health, RawConfig, RawWan};
use super::rules::rules;
use super::shape::{Described, Str};
use super::types::*;
use super::values::*;
use super::{Config, Source};
use crate::dns::learned;
use crate::family::Family;

pub(super) fn config(raw: &RawConfig) -> Result<Config, Problem> {
    let lan_interfaces = lan_interfaces(raw)?;
    let mark_mask = raw.mark_mask.read(mark_mask)?.unwrap_or(DEFAULT_MARK_MASK);
    let wans = wans(raw, &lan_interfaces, mark_mask)?;
    // `failback_after` and `max_backup_flow_age` are read (and checked)
    // with each WAN; at the top level they are only its defaults.
    let names = wans.iter().map(|w| w.name.as_str()).collect();
    let rules = rules(raw, &names, &lan_interfaces)?;
    Ok(Config {
        sticky: raw.sticky.choice().unwrap_or_default(),
        sticky_key: raw.sticky_key.choice().unwrap_or_default(),
        host_ttl: raw
            .host_ttl
            .read(positive_duration)?
            .unwrap_or(DEFAULT_HOST_TTL),
        domain_ttl_floor: raw
            .domain_ttl_floor
            .read(duration)?
            .unwrap_or(learned::TTL_FLOOR),
        domain_ttl_grace: raw
            .domain_ttl_grace
            .read(duration)?
            .unwrap_or(learned::GRACE),
        pin_dir: raw
            .pin_dir
            .read(absolute_path)?
            .unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
        state_dir: raw
            .state_dir
            .read(absolute_path)?
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        max_flows: raw
            .max_flows
            .ranged(1024..=64 << 20)?
            .unwrap_or(DEFAULT_MAX_FLOWS),
        max_hosts: raw
            .max_hosts
            .ranged(16..=16 << 20)?
            .unwrap_or(DEFAULT_MAX_HOSTS),
        mark_mask,
        table_base: table_base(raw)?,
        rule_priority: raw
            .rule_priority
            .ranged(1..=32000)?
            .unwrap_or(DEFAULT_RULE_PRIORITY),
        all_down: raw.all_down.choice().unwrap_or_default(),
        failback: raw.failback.choice().unwrap_or_default(),
        failback_spread: raw
            .failback_spread
            .read(duration)?
            .unwrap_or(DEFAULT_FAILBACK_SPREAD),
        drain_pinned_hosts: raw.drain_pinned_hosts.flag().unwrap_or(false),
        usage_file: raw.usage_file.read(absolute_path)?,
        on_change: raw.on_change.read(text)?,
        hook_timeout: raw
            .hook_timeout
            .read(duration)?
            .unwrap_or(DEFAULT_HOOK_TIMEOUT),
        metrics_listen: raw.metrics_listen.read(listen_addr)?,
        ha_address: raw.ha_address.read(ha_address)?,
        lan_interfaces,
        wans,
        rules,
        source: Source::default(),
    })
}

/// The LAN interfaces: at least one, each once.
fn lan_interfaces(raw: &RawConfig) -> Result<Vec<String>, Problem> {
    let items = raw.lan_interfaces.get().map_or(&[][..], |l| &l.get_ref().0);
    if items.is_empty() {
        return Err(Problem::key(
            None,
            key!(raw.lan_interfaces),
            "missing or empty: list the LAN-facing interfaces whose traffic mwan balances",
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for item in items {
        let name = ifname(item)?;
        if !seen.insert(name.clone()) {
            return Err(Problem::at(item, format!("`{name}` is listed twice")));
        }
        out.push(name);
    }
    Ok(out)
}

/// `table_base`: the WANs' routing tables may not include the kernel's.
fn table_base(raw: &RawConfig) -> Result<u32, Problem> {
    let Some(v) = raw.table_base.get() else {
        return Ok(DEFAULT_TABLE_BASE);
    };
    let base = ranged(v, 1..=0xffff_0000u32)?;
    if (base..base + MAX_WANS + 1).any(|t| (253..=255).contains(&t)) {
        return Err(Problem::at(
            v,
            format!(
                "{base}: tables {base}..{} would include the kernel's tables 253-255",
                base + MAX_WANS
            ),
        ));
    }
    Ok(base)
}

/// The WANs: at least one, as many as the datapath and the mark mask can
/// number; names, interfaces and ids unique.
fn wans(raw: &RawConfig, lan: &[String], mark_mask: u32) -> Result<Vec<Wan>, Problem> {
    let list = &raw.wan.0;
    let count = |what: String| Problem::key(None, key!(raw.wan), what);
    if list.is_empty() {
        return Err(count(
            "no [[wan]] defined: mwan needs at least one WAN".into(),
        ));
    }
    if list.len() as u32 > MAX_WANS {
        return Err(count(format!(
            "{} WANs defined; at most {MAX_WANS} are supported",
            list.len()
        )));
    }
    let capacity = mark_mask >> mark_mask.trailing_zeros();
    if list.len() as u32 > capacity {
        return Err(Problem::key(
            None,
            key!(raw.mark_mask),
            format!(
                "{mark_mask:#x} can number only {capacity} WANs, {} are defined",
                list.len()
            ),
        ));
    }
    let max_id = (capacity.min(MAX_WANS) - 1) as u8;
    let mut names = HashSet::new();
    let mut interfaces = BTreeMap::new();
    let mut ids = BTreeMap::new();
    let mut wans = Vec::new();
    let top = raw.health();
    for w in list {
        let wan = wan(w, raw, &top, lan, max_id)?;
        let at = |s: Option<Range<usize>>, what| Problem::span(s.unwrap_or(w.span()), what);
        let w = w.get_ref();
        if !names.insert(wan.name.clone()) {
            let what = format!("duplicate WAN name `{}`", wan.name);
            return Err(at(w.name.span(), what));
        }
        if let Some(other) = interfaces.insert(wan.interface.clone(), wan.name.clone()) {
            let what = format!("`{}` is already used by WAN `{other}`", wan.interface);
            return Err(at(w.interface.span(), what));
        }
        if let Some(other) = wan.id.and_then(|id| ids.insert(id, wan.name.clone())) {
            let what = format!(
                "id {} is already WAN `{other}`'s",
                wan.id.unwrap_or_default()
            );
            return Err(at(w.id.span(), what));
        }
        wans.push(wan);
    }
    Ok(wans)
}

/// One WAN; `raw`: the top level (its defaults), `top`: its health keys,
/// `max_id`: the largest id the mark mask numbers.
fn wan(
    w: &Spanned<RawWan>,
    raw: &RawConfig,
    top: &Health,
    lan: &[String],
    max_id: u8,
) -> Result<Wan, Problem> {
    let table = w.span();
    let w = w.get_ref();
    let name = wan_name(w, table.clone())?;
    let iface = w
        .interface
        .get()
        .ok_or_else(|| Problem::key(Some(table.clone()), key!(w.interface), "missing"))?;
    let interface = ifname(iface)?;
    if lan.contains(&interface) {
        let what = format!("`{interface}` is also listed in lan_interfaces");
        return Err(Problem::at(iface, what));
    }
    let gateway = match w.gateway.get() {
        Some(v) => gateway(v)?,
        // An uplink with only IPv6.
        None if w.gateway6.is_some() => Gateway::None,
        None => {
            return Err(Problem::key(
                Some(table),
                key!(w.gateway),
                format!(
                    "missing: {} (an uplink without IPv4 sets gateway6 alone)",
                    kind::Gateway::EXPECTING
                ),
            ))
        }
    };
    let health = health(&w.health().or(top), table.clone())?;
    if gateway == Gateway::None && !health.targets.iter().any(|t| t.family() == Family::Ipv6) {
        return Err(Problem::key(
            Some(table),
            key!(w.probe_targets),
            "this uplink has no IPv4 (no gateway): list IPv6 probe targets to judge it by",
        ));
    }
    let nat = w.nat.flag().unwrap_or(true);
    let (gateway6, ipv6) = ipv6(w, table)?;
    let m = metered(w, raw)?;
    Ok(Wan {
        weight: w.weight.ranged(1..=1000)?.unwrap_or(1),
        tier: w.tier.ranged(1..=16)?.unwrap_or(1),
        id: w.id.ranged(0..=max_id)?,
        snat_address: w.snat_address.read(|v| snat_address(v, nat))?,
        enabled: w.enabled.flag().unwrap_or(true),
        name,
        interface,
        gateway,
        nat,
        health,
        gateway6,
        ipv6,
        quota: m.quota,
        reset_day: m.reset_day,
        failback: m.failback,
        failback_after: m.failback_after,
        max_backup_flow_age: m.max_backup_flow_age,
        weight_schedule: m.weight_schedule,
    })
}

/// A WAN's name: 1 to `WAN_NAME_LEN - 1` letters, digits, '-', '_' or '.'.
fn wan_name(w: &RawWan, table: Range<usize>) -> Result<String, Problem> {
    let v = w
        .name
        .get()
        .ok_or_else(|| Problem::key(Some(table), key!(w.name), "missing"))?;
    let name = v.get_ref().as_str();
    if name.is_empty()
        || name.len() >= WAN_NAME_LEN
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        let what = format!(
            "`{name}`: use 1 to {} letters, digits, '-', '_' or '.'",
            WAN_NAME_LEN - 1
        );
        return Err(Problem::at(v, what).unlabelled());
    }
    Ok(name.to_string())
}

/// `snat_address` replaces masquerading: it needs `nat`.
fn snat_address<K>(v: &Spanned<Str<K>>, nat: bool) -> Result<std::net::Ipv4Addr, Problem> {
    let a = unicast_ipv4(v, "a source address")?;
    if !nat {
        return Err(Problem::at(
            v,
            "needs `nat = true` (it replaces masquerading)",
        ));
    }
    Ok(a)
}

/// A WAN's `gateway6`, `ipv6`, `prefix6` and `lan_prefix6`, validated
/// together: `ipv6` defaults to "nat" with a `gateway6` and "off" without;
/// "nat" and "npt" need a `gateway6`; "npt" needs both prefixes, of the
/// same length; the prefixes are refused with another mode.
fn ipv6(w: &RawWan, table: Range<usize>) -> Result<(Option<Gateway6>, Ipv6Mode), Problem> {
    let gateway6 = w.gateway6.read(gateway6)?;
    let mode = match w.ipv6.get() {
        None if gateway6.is_some() => "nat",
        None => "off",
        Some(v) => v.get_ref().as_str(),
    };
    let needs_gateway = |v: &Spanned<_>| {
        Problem::at(
            v,
            format!("\"{mode}\" needs gateway6 ({})", kind::Gateway6::EXPECTING),
        )
    };
    let ipv6 = match (mode, w.ipv6.get()) {
        ("off", _) => Ipv6Mode::Off,
        ("nat" | "npt", Some(v)) if gateway6.is_none() => return Err(needs_gateway(v)),
        ("nat", _) => Ipv6Mode::Nat,
        ("npt", _) => npt(w, table)?,
        (other, v) => {
            let what = not(other, kind::Ipv6Mode::EXPECTING);
            return Err(Problem::span(v.map_or(table, Spanned::span), what));
        }
    };
    if !matches!(ipv6, Ipv6Mode::Npt { .. }) {
        if let Some(s) = w.prefix6.span().or(w.lan_prefix6.span()) {
            return Err(Problem::span(s, "is used only with ipv6 = \"npt\""));
        }
    }
    Ok((gateway6, ipv6))
}

/// `ipv6 = "npt"`: `lan_prefix6` mapped onto `prefix6`, of the same length.
fn npt(w: &RawWan, table: Range<usize>) -> Result<Ipv6Mode, Problem> {
    let lan = w.lan_prefix6.get().ok_or_else(|| {
        Problem::key(
            Some(table.clone()),
            key!(w.lan_prefix6),
            "missing: ipv6 = \"npt\" maps the LAN prefix onto prefix6",
        )
    })?;
    let lan_prefix = npt_prefix(lan)?;
    let v = w.prefix6.get().ok_or_else(|| {
        Problem::key(
            Some(table),
            key!(w.prefix6),
            "missing: ipv6 = \"npt\" needs the WAN's prefix (a prefix or \"auto\")",
        )
    })?;
    let prefix = match v.get_ref().as_str() {
        "auto" => Prefix6::Auto,
        _ => {
            let p = npt_prefix(v)?;
            if p.prefix_len() != lan_prefix.prefix_len() {
                return Err(Problem::at(
                    v,
                    format!(
                        "`{p}` is a /{}, lan_prefix6 `{lan_prefix}` a /{}: NPT maps prefixes of the same length",
                        p.prefix_len(),
                        lan_prefix.prefix_len()
                    ),
                ));
            }
            Prefix6::Fixed(p)
        }
    };
    Ok(Ipv6Mode::Npt { prefix, lan_prefix })
}

#[cfg(test)]
mod tests {
    use crate::config::fixture::*;
    use crate::config::*;

    #[test]
    fn ipv6_settings_and_their_defaults() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!((c.wans[0].gateway6, c.wans[0].ipv6), (None, Ipv6Mode::Off));
        let text = MIN.replace(
            "weight = 3",
            "weight = 3\ngateway6 = \"fe80::1\"\nipv6 = \"npt\"\nprefix6 = \"2001:db8:1::/48\"\nlan_prefix6 = \"fd00:1::/48\"",
        );
        let text = text.replace(
            "gateway = \"auto\"",
            "gateway = \"auto\"\ngateway6 = \"auto\"",
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(
            c.wans[0].gateway6,
            Some(Gateway6::Fixed("fe80::1".parse().unwrap()))
        );
        assert_eq!(
            c.wans[0].ipv6,
            Ipv6Mode::Npt {
                prefix: Prefix6::Fixed("2001:db8:1::/48".parse().unwrap()),
                lan_prefix: "fd00:1::/48".parse().unwrap(),
            }
        );
        // With a gateway6, "nat" is the default.
        assert_eq!(c.wans[1].gateway6, Some(Gateway6::Auto));
        assert_eq!(c.wans[1].ipv6, Ipv6Mode::Nat);
        let off = text.replace(
            "gateway6 = \"auto\"",
            "gateway6 = \"2001:db8:2::1\"\nipv6 = \"off\"",
        );
        assert_eq!(Config::parse(&off).unwrap().wans[1].ipv6, Ipv6Mode::Off);
        let auto = text.replace("prefix6 = \"2001:db8:1::/48\"", "prefix6 = \"auto\"");
        assert!(matches!(
            Config::parse(&auto).unwrap().wans[0].ipv6,
            Ipv6Mode::Npt {
                prefix: Prefix6::Auto,
                ..
            }
        ));
    }

    #[test]
    fn wan_ids_are_in_range_and_unique() {
        let with = |a: &str, b: &str| {
            MIN.replacen("weight = 3", &format!("weight = 3\n{a}"), 1)
                .replacen("name = \"isp2\"", &format!("name = \"isp2\"\n{b}"), 1)
        };
        let c = Config::parse(&with("id = 7", "id = 0")).unwrap();
        assert_eq!(
            c.wans.iter().map(|w| w.id).collect::<Vec<_>>(),
            [Some(7), Some(0)]
        );
        let e = parse_err(&with("id = 32", ""));
        assert_eq!(e.key, "wan[0] (isp1).id", "{e}");
        assert!(e.reason.contains("out of range 0..=31"), "{e}");
        let e = parse_err(&with("id = 3", "id = 3"));
        assert_eq!(e.key, "wan[1] (isp2).id", "{e}");
        assert!(e.reason.contains("already WAN `isp1`'s"), "{e}");
        // The mark mask bounds the ids: 0x300 numbers three WANs.
        let e = parse_err(&format!("mark_mask = \"0x300\"\n{}", with("id = 3", "")));
        assert!(e.reason.contains("out of range 0..=2"), "{e}");
    }

    #[test]
    fn ha_address_is_an_ipv4_address() {
        assert_eq!(Config::parse(MIN).unwrap().ha_address, None);
        let c = Config::parse(&format!("ha_address = \"192.0.2.1\"\n{MIN}")).unwrap();
        assert_eq!(c.ha_address, Some(Ipv4Addr::new(192, 0, 2, 1)));
        for bad in ["192.0.2", "0.0.0.0", "224.0.0.18"] {
            let e = parse_err(&format!("ha_address = \"{bad}\"\n{MIN}"));
            assert_eq!(e.key, "ha_address", "{bad}: {e}");
        }
    }

    #[test]
    fn metrics_listen_is_off_by_default_and_takes_v4_and_v6() {
        assert_eq!(Config::parse(MIN).unwrap().metrics_listen, None);
        for a in ["127.0.0.1:9849", "[::1]:9849", "0.0.0.0:80", "[::]:9849"] {
            let c = Config::parse(&format!("metrics_listen = \"{a}\"\n{MIN}")).unwrap();
            assert_eq!(c.metrics_listen, Some(a.parse().unwrap()));
        }
        for bad in [
            "localhost:9849",
            "127.0.0.1",
            "9849",
            "127.0.0.1:0",
            "::1:9849",
        ] {
            let e = parse_err(&format!("metrics_listen = \"{bad}\"\n{MIN}"));
            assert_eq!(e.key, "metrics_listen", "{bad}: {e}");
        }
    }

    /// An uplink with only IPv6: `gateway6` without `gateway`.
    #[test]
    fn an_uplink_may_have_ipv6_only() {
        let c = Config::parse(&MIN.replace(
            "gateway = \"auto\"",
            "gateway6 = \"auto\"\nprobe_targets = [\"2001:db8::1\"]",
        ))
        .unwrap();
        assert_eq!(c.wans[1].gateway, Gateway::None);
        assert_eq!(c.wans[1].ipv6, Ipv6Mode::Nat);
        assert_eq!(
            c.wans[0].gateway,
            Gateway::Fixed("100.64.1.1".parse().unwrap())
        );
    }

    #[test]
    fn rejects_bad_values_naming_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("weight = 3", "weight = 0", "wan[0] (isp1).weight"),
            ("weight = 3", "weight = 1001", "wan[0] (isp1).weight"),
            ("weight = 3", "tier = 0", "wan[0] (isp1).tier"),
            (
                "gateway = \"100.64.1.1\"",
                "gateway = \"100.64.1\"",
                "wan[0] (isp1).gateway",
            ),
            (
                "gateway = \"100.64.1.1\"",
                "gateway = \"0.0.0.0\"",
                "wan[0] (isp1).gateway",
            ),
            ("name = \"isp2\"", "name = \"isp1\"", "wan[1] (isp1).name"),
            (
                "interface = \"wan2\"",
                "interface = \"wan1\"",
                "wan[1] (isp2).interface",
            ),
            (
                "interface = \"wan2\"",
                "interface = \"lan0\"",
                "wan[1] (isp2).interface",
            ),
            (
                "interface = \"wan2\"",
                "interface = \"a-very-long-interface\"",
                "wan[1] (isp2).interface",
            ),
            (
                "lan_interfaces = [\"lan0\"]",
                "lan_interfaces = []",
                "lan_interfaces",
            ),
            (
                "probe_targets = [\"198.51.100.1\", \"tcp:203.0.113.9:443\"]",
                "probe_targets = [\"198.51.100.1\", \"198.51.100.1\"]",
                "probe_targets",
            ),
            (
                "probe_targets = [\"198.51.100.1\", \"tcp:203.0.113.9:443\"]",
                "probe_targets = [\"198.51.100.1\"]\nquorum = 2",
                "quorum",
            ),
            (
                "probe_targets = [\"198.51.100.1\", \"tcp:203.0.113.9:443\"]",
                "probe_targets = [\"198.51.100.1\"]\nprobe_interval = \"fast\"",
                "probe_interval",
            ),
        ];
        for (from, to, key) in cases {
            assert!(MIN.contains(from), "{from}");
            let e = parse_err(&MIN.replacen(from, to, 1));
            assert_eq!(&e.key, key, "{to}: {e}");
        }
    }

    #[test]
    fn rejects_missing_pieces() {
        let e = parse_err("lan_interfaces = [\"lan0\"]\n");
        assert_eq!(e.key, "wan");
        let e = parse_err("lan_interfaces = [\"lan0\"]\n[[wan]]\nname = \"a\"\ninterface = \"w\"\ngateway = \"auto\"\n");
        assert_eq!(e.key, "wan[0] (a).probe_targets");
        let e = parse_err(&MIN.replace("gateway = \"auto\"", ""));
        assert_eq!(e.key, "wan[1] (isp2).gateway");
        let e = parse_err("this is not toml");
        assert!(e.reason.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn mark_mask_must_be_contiguous_and_large_enough() {
        let c = Config::parse(&format!("mark_mask = \"0xff00\"\n{MIN}")).unwrap();
        assert_eq!(c.wan_mark(0), 0x100);
        assert_eq!(
            parse_err(&format!("mark_mask = \"0xf0f0\"\n{MIN}")).key,
            "mark_mask"
        );
        // One bit numbers only one WAN.
        assert_eq!(
            parse_err(&format!("mark_mask = 0x100\n{MIN}")).key,
            "mark_mask"
        );
        assert_eq!(
            parse_err(&format!("mark_mask = \"zz\"\n{MIN}")).key,
            "mark_mask"
        );
    }

    #[test]
    fn domain_ttl_floor_and_grace() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(
            (c.domain_ttl_floor, c.domain_ttl_grace),
            (Duration::from_secs(60), Duration::from_secs(30))
        );
        let c = Config::parse(&format!(
            "domain_ttl_floor = \"5s\"\ndomain_ttl_grace = \"0s\"\n{MIN}"
        ))
        .unwrap();
        assert_eq!(
            (c.domain_ttl_floor, c.domain_ttl_grace),
            (Duration::from_secs(5), Duration::ZERO)
        );
        let e = Config::parse(&format!("domain_ttl_floor = \"soon\"\n{MIN}"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("line 1: domain_ttl_floor: "), "{e}");
    }
}
