//! The `[[rule]]` tables: what each matches and what it does.

use std::collections::HashSet;
use std::ops::Range;

use mwan_common::MAX_RULES;
use toml::Spanned;

use super::domains::domains;
use super::error::{key, Problem};
use super::metered::schedule;
use super::raw::{RawConfig, RawRule, Setting};
use super::shape::{List, OneOrMany, Str};
use super::types::{Action, Proto, Rule};
use super::values::{nets, ports, text, texts};

/// The rules, in order; `wans`: the WANs' names, `lan`: the LAN interfaces.
pub(super) fn rules(
    raw: &RawConfig,
    wans: &HashSet<&str>,
    lan: &[String],
) -> Result<Vec<Rule>, Problem> {
    let list = &raw.rule.0;
    if list.len() as u32 > MAX_RULES {
        return Err(Problem::key(
            None,
            key!(raw.rule),
            format!(
                "{} rules defined; at most {MAX_RULES} are supported",
                list.len()
            ),
        ));
    }
    // A rule's name is its identity across reloads (its flows re-choose
    // with it): names must be unique.
    let mut names = HashSet::new();
    let mut rules = Vec::new();
    for (i, r) in list.iter().enumerate() {
        let (table, r) = (r.span(), r.get_ref());
        let name = r.name.read(text)?.unwrap_or_else(|| format!("rule{i}"));
        if !names.insert(name.clone()) {
            return Err(Problem::on(
                &r.name,
                Some(table),
                key!(r.name),
                format!("duplicate rule name `{name}`"),
            ));
        }
        rules.push(rule(name, r, table, wans, lan)?);
    }
    Ok(rules)
}

/// The rule `r`, named `name`, whose table is at `table`.
fn rule(
    name: String,
    r: &RawRule,
    table: Range<usize>,
    wans: &HashSet<&str>,
    lan: &[String],
) -> Result<Rule, Problem> {
    let action = action(r, table.clone(), wans)?;
    let protos = r.proto.read(protos)?.unwrap_or_default();
    let src = r.src.read(nets)?.unwrap_or_default();
    let dst = r.dst.read(nets)?.unwrap_or_default();
    let src_ports = r.src_ports.read(ports)?.unwrap_or_default();
    let dst_ports = r.dst_ports.read(ports)?.unwrap_or_default();
    if (!src_ports.is_empty() || !dst_ports.is_empty())
        && !protos.is_empty()
        && protos.iter().all(|p| *p == Proto::Icmp)
    {
        return Err(Problem::span(
            table,
            "matches ports but only icmp, which has none",
        ));
    }
    let lan_interfaces = r.lan_interface.read(|v| lan_interfaces(v, lan))?;
    let (domains, domains_file) = domains(r)?;
    let schedule = r.schedule.read(schedule)?;
    Ok(Rule {
        name,
        protos,
        src,
        dst,
        src_ports,
        dst_ports,
        lan_interfaces: lan_interfaces.unwrap_or_default(),
        domains,
        domains_file,
        action,
        schedule,
    })
}

/// What the rule at `table` does: exactly one of `wans`, `balance` and
/// `main = true`.
fn action(r: &RawRule, table: Range<usize>, wans: &HashSet<&str>) -> Result<Action, Problem> {
    let list = |s: &Setting<List<Str<_>>>| s.read(|v| wan_list(v, wans));
    match (list(&r.wans)?, list(&r.balance)?, r.main.flag()) {
        (Some(w), None, None | Some(false)) => Ok(Action::Ordered(w)),
        (None, Some(b), None | Some(false)) => Ok(Action::Balance(b)),
        (None, None, Some(true)) => Ok(Action::Main),
        (None, None, _) => Err(Problem::span(
            table,
            "has no action: set one of wans = [..], balance = [..] or main = true",
        )),
        _ => Err(Problem::span(
            table,
            "has more than one action: set only one of wans, balance and main",
        )),
    }
}

/// A list of WANs: at least one, each once, each defined.
fn wan_list<K>(v: &Spanned<List<Str<K>>>, wans: &HashSet<&str>) -> Result<Vec<String>, Problem> {
    let list = texts(&v.get_ref().0);
    if list.is_empty() {
        return Err(Problem::at(v, "is empty: name at least one WAN"));
    }
    let mut seen = HashSet::new();
    for n in &list {
        if !wans.contains(n.as_str()) {
            return Err(Problem::at(v, format!("no WAN is named `{n}`")));
        }
        if !seen.insert(n) {
            return Err(Problem::at(v, format!("`{n}` is listed twice")));
        }
    }
    Ok(list)
}

/// The protocols (`tcp`, `udp`, `icmp`, in any case), each once.
fn protos<K>(v: &Spanned<OneOrMany<Str<K>>>) -> Result<Vec<Proto>, Problem> {
    let mut protos = Vec::new();
    for s in texts(&v.get_ref().0) {
        let proto = match s.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "icmp" => Proto::Icmp,
            _ => return Err(Problem::at(v, format!("`{s}`: use tcp, udp or icmp"))),
        };
        if !protos.contains(&proto) {
            protos.push(proto);
        }
    }
    Ok(protos)
}

/// The rule's LAN interfaces: each one of `lan_interfaces`.
fn lan_interfaces<K>(
    v: &Spanned<OneOrMany<Str<K>>>,
    lan: &[String],
) -> Result<Vec<String>, Problem> {
    let list = texts(&v.get_ref().0);
    for l in &list {
        if !lan.contains(l) {
            return Err(Problem::at(
                v,
                format!("`{l}` is not one of lan_interfaces"),
            ));
        }
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use mwan_common::MAX_RULES;

    use crate::config::fixture::*;
    use crate::config::*;

    #[test]
    fn rules_parse_and_validate() {
        let text = format!(
            r#"{MIN}
[[rule]]
name = "web"
proto = "tcp"
dst_ports = [80, 443, "8000-8100"]
wans = ["isp1", "isp2"]

[[rule]]
name = "mail"
proto = ["tcp"]
dst_ports = [25, 110, 143, 465, 587, 993, 995]
wans = ["isp2", "isp1"]

[[rule]]
src = ["192.0.2.128/25"]
lan_interface = "lan0"
balance = ["isp2"]

[[rule]]
dst = ["10.8.0.0/16", "192.0.2.77", "2001:db8:ff::/48", "2001:db8::1"]
main = true
"#
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.rules.len(), 4);
        assert_eq!(c.rules[0].name, "web");
        assert_eq!(
            c.rules[0].dst_ports[2],
            PortRange {
                first: 8000,
                last: 8100
            }
        );
        assert_eq!(
            c.rules[1].action,
            Action::Ordered(vec!["isp2".into(), "isp1".into()])
        );
        assert_eq!(c.rules[2].action, Action::Balance(vec!["isp2".into()]));
        assert_eq!(c.rules[2].name, "rule2");
        assert_eq!(c.rules[3].action, Action::Main);
        assert_eq!(c.rules[3].dst[1].to_string(), "192.0.2.77/32");
        assert_eq!(c.rules[3].dst[2].to_string(), "2001:db8:ff::/48");
        assert_eq!(c.rules[3].dst[3].to_string(), "2001:db8::1/128");
    }

    #[test]
    fn bad_rules_are_rejected() {
        let rule = |body: &str| parse_err(&format!("{MIN}\n[[rule]]\n{body}\n"));
        assert_eq!(rule("dst_ports = [25]").key, "rule[0]");
        assert!(rule("dst_ports = [25]").reason.contains("no action"));
        assert!(rule("wans = [\"isp1\"]\nmain = true")
            .reason
            .contains("more than one action"));
        assert_eq!(rule("wans = [\"isp9\"]").key, "rule[0].wans");
        assert_eq!(rule("wans = []").key, "rule[0].wans");
        assert_eq!(
            rule("dst_ports = [0]\nwans = [\"isp1\"]").key,
            "rule[0].dst_ports"
        );
        assert_eq!(
            rule("dst_ports = [\"90-80\"]\nwans = [\"isp1\"]").key,
            "rule[0].dst_ports"
        );
        assert_eq!(
            rule("dst = [\"192.0.2.1/24\"]\nwans = [\"isp1\"]").key,
            "rule[0].dst"
        );
        let e = rule("src = [\"2001:db8::1/48\"]\nwans = [\"isp1\"]");
        assert_eq!(e.key, "rule[0].src");
        assert!(
            e.reason.contains("did you mean `2001:db8::/48`"),
            "{}",
            e.reason
        );
        let e = rule("dst = [\"2001:db8::g\"]\nwans = [\"isp1\"]");
        assert!(
            e.reason.contains("is not an IP address or CIDR"),
            "{}",
            e.reason
        );
        assert_eq!(
            rule("proto = \"sctp\"\nwans = [\"isp1\"]").key,
            "rule[0].proto"
        );
        assert_eq!(
            rule("lan_interface = \"eth9\"\nwans = [\"isp1\"]").key,
            "rule[0].lan_interface"
        );
        assert!(rule("proto = \"icmp\"\ndst_ports = [1]\nwans = [\"isp1\"]")
            .reason
            .contains("icmp"));
    }

    #[test]
    fn domain_rules_count_toward_the_rule_limit() {
        let rule = "\n[[rule]]\ndomains = [\"example.com\"]\nwans = [\"isp1\"]\n";
        let at_limit = format!("{MIN}{}", rule.repeat(MAX_RULES as usize));
        assert_eq!(
            Config::parse(&at_limit).unwrap().rules.len(),
            MAX_RULES as usize
        );
        let over = format!("{MIN}{}", rule.repeat(MAX_RULES as usize + 1));
        assert_eq!(parse_err(&over).key, "rule");
    }
}
