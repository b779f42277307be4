//! mwan's nftables table `inet mwan` (both families): the ruleset text
//! (pure) and its atomic replacement with `nft -f -`. The `ip mwan` table
//! of earlier versions is removed in the same transaction.
//!
//! The conntrack entry is where a connection's WAN is recorded for its
//! whole life: `ct mark` = mark(i) for every connection that uses WAN *i*,
//! whoever chose it (the classifier's pin, the balance route, a port
//! forward). Every later packet of the connection, in both directions,
//! gets its packet mark from there. So a connection keeps its WAN when its
//! pin is evicted or deleted, when it is older than the daemon, or when a
//! new daemon takes over, and replies carry the mark their WAN's table
//! routes (the reverse-path filter checks them with `src_valid_mark`,
//! which matters on routers with no main-table default route).
//!
//! * `prerouting` (filter, priority mangle, after tc ingress where the
//!   classifier marked a new flow): a new connection arriving on WAN *i*
//!   gets `ct mark` mark(i); then every packet whose connection's ct mark
//!   names a WAN gets that packet mark (both directions; a new LAN
//!   connection has no ct mark yet and keeps the classifier's). Both touch
//!   only the bits of the mark mask. The first packet of an inbound
//!   connection thus carries its WAN's mark too, and passes the
//!   reverse-path check on a router without a main-table default route. While every WAN is down under
//!   `all_down = "unreachable"`, new connections from the LAN interfaces
//!   that would hit mwan's `unreachable` route are refused here, before
//!   routing: TCP with a reset (the application sees "connection refused"
//!   at once), the rest with ICMP host unreachable. The route alone would
//!   answer with ICMP errors only, which the kernel rate-limits per host: a
//!   browser's third connection would hang until its SYN retries give up.
//! * `dns_divert` (nat, prerouting, only while a rule has domains): LAN DNS
//!   queries (UDP and TCP) are redirected to mwan's relay while its socket
//!   exists, and pass untouched when it does not ([`Divert`]); `dns_zone`
//!   (filter, prerouting, priority raw) tracks them in a conntrack zone of
//!   their own meanwhile, so that none of their entries outlives the relay.
//! * `output` (filter, priority raw): mwan's nudge segments (mark
//!   [`NUDGE_MARK`]) are not tracked. Nothing restores marks in `output`:
//!   the router's own sockets (and mwan's probes) choose their route
//!   themselves.
//! * `postrouting` (nat, priority srcnat; only the first packet of each
//!   connection passes a nat chain): a new connection leaving through WAN
//!   *i* gets `ct mark` mark(i), then `masquerade` of IPv4 out of each WAN
//!   with `nat = true`; a WAN with a `snat_address` gives forwarded
//!   connections that source instead (the router's own keep masquerading).
//!   IPv6 per WAN ([`Nat6`]): `masquerade` (NAT66), or prefix translation
//!   (`snat ip6 prefix to`, NPT) of the LAN prefix onto the WAN's.
//! * `dstnat` (nat, prerouting, only with an NPT WAN): new connections
//!   arriving on the WAN for an address of its prefix are mapped back onto
//!   the LAN prefix (`dnat ip6 prefix to`), the interface identifier kept.
//!
//! The ct mark record and restore, the refusal while every WAN is down and
//! the DNS divert cover both families (the relay listens on IPv4 and IPv6,
//! each family's sockets on the same ports).
//!
//! nft 1.0.6 (Debian 12) cannot OR two non-constant expressions, so a
//! restore dispatches on `ct mark & mask` with a verdict map to one chain
//! per WAN that ORs in a constant.

use std::fmt::Write as _;
use std::process::Stdio;

use anyhow::{anyhow, bail, Context, Result};
use ipnet::Ipv6Net;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// What the table needs to know about one WAN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftWan {
    /// The WAN's name (config-validated: letters, digits, `-`, `_`, `.`),
    /// used in chain names.
    pub name: String,
    /// Matched by name (`iifname`/`oifname`), so a re-created PPP link keeps
    /// working.
    pub interface: String,
    pub mark: u32,
    pub nat: bool,
    /// `snat_address`: forwarded connections get this source instead of
    /// the masqueraded one (the router's own keep masquerading).
    pub snat: Option<std::net::Ipv4Addr>,
    /// What happens to IPv6 leaving (and, for NPT, arriving on) the WAN.
    pub nat6: Nat6,
}

/// A WAN's IPv6 NAT in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat6 {
    /// Nothing: IPv6 leaves with its source (`ipv6 = "off"`, or no IPv6
    /// usable on the WAN yet).
    None,
    /// `ipv6 = "nat"`: masquerade to the WAN's address.
    Masquerade,
    /// `ipv6 = "npt"`: `lan` mapped onto `wan` (the same length).
    Prefix { lan: Ipv6Net, wan: Ipv6Net },
}

/// The divert of the LAN's DNS queries to the relay (rules by domain name,
/// `dns::relay`): new UDP flows and TCP connections to port 53 arriving on
/// `lans`, to any address, are redirected (DNAT to the incoming interface's address) to
/// the relay's socket on `port`. The relay learns the server the client
/// addressed from the conntrack entry, and its answer, sent from that
/// socket, is un-NATed by conntrack: the client sees it come from the
/// server.
///
/// It fails open: each rule first tries `tproxy` to the relay's port,
/// which finds a socket only while a process holds one there with
/// `IP_TRANSPARENT` (the relay's); when none does (the daemon was killed,
/// or crashed), the kernel's tproxy expression ends the rule (`NFT_BREAK`)
/// and the query goes to the server it was sent to, untouched. When the
/// relay lives, tproxy assigns it its own socket and the `redirect` does the
/// delivery (on a bridged LAN with `br_netfilter`, prerouting runs before
/// `ip_rcv`, which orphans the socket tproxy assigned, so tproxy alone
/// cannot deliver; the redirect can). `tproxy ip` is valid in `ip` and
/// `inet` tables alike; `tproxy ip6` is its IPv6 twin (the kernel's
/// `nft_tproxy_eval_v6` ends the rule the same way when no transparent
/// socket is found), and IPv6 queries are redirected to an address of the
/// incoming interface of the query's scope.
///
/// Failing open must hold for a flow's later packets too, and the redirect
/// is a NAT binding: a conntrack entry made while the relay lived keeps
/// sending its flow's packets to the relay's port after the relay is gone
/// (refused), for as long as the client keeps it alive: a client that asks
/// from a fixed source port, or a stub resolver whose random port repeats
/// one of a minute ago. So the flows diverted while the relay lives are
/// tracked in a conntrack zone of their own ([`DIVERT_ZONE`], set in
/// `dns_zone` before conntrack, behind the same tproxy test), in their
/// original direction only (the relay's answers and the lookups of
/// their entries by reply tuple find them in the default zone). Once the
/// relay is gone, a query is tracked in the default zone: it never meets
/// an entry of the relay's, and is forwarded and masqueraded as any other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Divert {
    pub lans: Vec<String>,
    /// The relay's UDP port.
    pub port: u16,
    /// The relay's TCP port.
    pub tcp_port: u16,
}

/// The text that replaces the table atomically in one `nft -f`: the
/// leading `add`/`delete` make it work whether or not the table exists.
/// The packet mark of mwan's own nudge segments ("mnud").
pub const NUDGE_MARK: u32 = 0x6d6e_7564;

/// The conntrack zone ("mw") of the LAN's DNS flows diverted to the relay,
/// in their original direction ([`Divert`]).
pub const DIVERT_ZONE: u16 = 0x6d77;

/// Everything the table holds.
#[derive(Clone, Copy, Debug)]
pub struct Table<'a> {
    pub wans: &'a [NftWan],
    pub mark_mask: u32,
    /// The LAN interfaces whose new connections to unreachable destinations
    /// are refused (empty unless every WAN is down under `all_down =
    /// "unreachable"`).
    pub refuse_from: &'a [String],
    pub divert: Option<&'a Divert>,
    /// Every packet gets the mark its connection's ct mark records, in
    /// prerouting: only for a datapath that cannot read conntrack itself
    /// (`datapath::ConntrackAccess::Nftables`).
    pub restore: bool,
}

pub fn ruleset(t: &Table) -> String {
    let (wans, mark_mask) = (t.wans, t.mark_mask);
    let keep = !mark_mask;
    let mut s = format!("{DELETE}table inet mwan {{\n");
    let restore = t.restore && !wans.is_empty();
    if restore || !t.refuse_from.is_empty() {
        s.push_str(
            "\tchain prerouting {\n\t\ttype filter hook prerouting priority mangle; policy accept;\n",
        );
    }
    if restore {
        let restore = join(wans, |w| {
            format!("{:#010x} : goto route_{}", w.mark, w.name)
        });
        let _ = writeln!(s, "\t\tct mark and {mark_mask:#010x} vmap {{ {restore} }}");
    }
    if !t.refuse_from.is_empty() {
        // `fib daddr oif missing`: the route lookup (as the router's own
        // traffic, which mwan's rules send to the same table) fails, i.e.
        // hits the `unreachable` route. Only unicast destinations: the
        // router's own addresses (for which the lookup reports no
        // interface either), broadcasts and multicast are left alone.
        let lans = t
            .refuse_from
            .iter()
            .map(|l| format!("\"{l}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let doomed = format!(
            "iifname {{ {lans} }} ct state new fib daddr type unicast fib daddr oif missing"
        );
        let _ = writeln!(s, "\t\t{doomed} meta l4proto tcp reject with tcp reset");
        let _ = writeln!(s, "\t\t{doomed} reject with icmpx type host-unreachable");
    }
    if restore || !t.refuse_from.is_empty() {
        s.push_str("\t}\n");
    }
    // conn_X: this connection uses WAN X; route_X: route this packet
    // through WAN X.
    for w in wans {
        let _ = write!(
            s,
            "\tchain conn_{name} {{\n\t\tct mark set ct mark and {keep:#010x} or {mark:#010x}\n\t}}\n",
            name = w.name,
            mark = w.mark
        );
        if restore {
            let _ = write!(
                s,
                "\tchain route_{name} {{\n\t\tmeta mark set meta mark and {keep:#010x} or {mark:#010x}\n\t}}\n",
                name = w.name,
                mark = w.mark
            );
        }
    }
    // The segments mwan sends to wake up LAN clients whose TCP connections
    // died with their WAN (see `nudge`) must not create conntrack entries.
    let _ = write!(
        s,
        "\tchain output {{\n\t\ttype filter hook output priority raw; policy accept;\n\t\tmeta mark {NUDGE_MARK:#010x} notrack\n\t}}\n"
    );
    if let Some(d) = t.divert {
        let lans = d
            .lans
            .iter()
            .map(|l| format!("\"{l}\""))
            .collect::<Vec<_>>()
            .join(", ");
        // Each query the relay takes: "is its socket there?" (tproxy ends
        // the rule when not), then what each chain does with it.
        let takes: Vec<(String, u16)> = [("ipv4", "ip"), ("ipv6", "ip6")]
            .into_iter()
            .flat_map(|(nfproto, tproxy)| {
                [("udp", d.port), ("tcp", d.tcp_port)].map(|(proto, port)| {
                    (
                        format!("iifname {{ {lans} }} meta nfproto {nfproto} {proto} dport 53 tproxy {tproxy} to :{port}"),
                        port,
                    )
                })
            })
            .collect();
        // Every packet passes `dns_zone` (a zone must be set before
        // conntrack, which sees them all): all but DNS leave at its first
        // test, one load and compare of the destination port.
        s.push_str("\tchain dns_zone {\n\t\ttype filter hook prerouting priority raw; policy accept;\n\t\tth dport != 53 accept\n");
        for (take, _) in &takes {
            let _ = writeln!(s, "\t\t{take} ct original zone set {DIVERT_ZONE}");
        }
        s.push_str("\t}\n\tchain dns_divert {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n");
        for (take, port) in &takes {
            let _ = writeln!(s, "\t\t{take} counter redirect to :{port}");
        }
        s.push_str("\t}\n");
    }
    let npt: Vec<(&NftWan, Ipv6Net, Ipv6Net)> = wans
        .iter()
        .filter_map(|w| match w.nat6 {
            Nat6::Prefix { lan, wan } => Some((w, lan, wan)),
            _ => None,
        })
        .collect();
    if !npt.is_empty() {
        s.push_str(
            "\tchain dstnat {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n",
        );
        for (w, lan, wan) in &npt {
            let _ = writeln!(
                s,
                "\t\tiifname \"{}\" ip6 daddr {wan} dnat ip6 prefix to ip6 daddr map {{ {wan} : {lan} }}",
                w.interface
            );
        }
        s.push_str("\t}\n");
    }
    // A connection's WAN is recorded by the nat chains, which see the
    // first packet of each connection only: inbound ones by the WAN they
    // arrive on (forwarded: postrouting; to the router itself: input),
    // outbound ones by the WAN they leave through.
    let by_wan = join(wans, |w| {
        format!("\"{}\" : jump conn_{}", w.interface, w.name)
    });
    if !wans.is_empty() {
        let _ = writeln!(
            s,
            "\tchain input {{\n\t\ttype nat hook input priority 100; policy accept;\n\t\tiifname vmap {{ {by_wan} }}\n\t}}"
        );
    }
    s.push_str(
        "\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n",
    );
    if !wans.is_empty() {
        let _ = writeln!(s, "\t\tiifname vmap {{ {by_wan} }}");
        let _ = writeln!(s, "\t\toifname vmap {{ {by_wan} }}");
    }
    for w in wans.iter().filter(|w| w.nat) {
        if let Some(addr) = w.snat {
            // Only forwarded connections: the router's own (mwan's probes
            // among them) keep their source, which on an HA pair's standby
            // is its own address, not the shared one it does not hold.
            let _ = writeln!(
                s,
                "\t\toifname \"{}\" fib saddr type != local snat ip to {addr}",
                w.interface
            );
        }
        let _ = writeln!(
            s,
            "\t\toifname \"{}\" meta nfproto ipv4 masquerade",
            w.interface
        );
    }
    for w in wans {
        match w.nat6 {
            Nat6::None => {}
            Nat6::Masquerade => {
                let _ = writeln!(
                    s,
                    "\t\toifname \"{}\" meta nfproto ipv6 masquerade",
                    w.interface
                );
            }
            Nat6::Prefix { lan, wan } => {
                let _ = writeln!(
                    s,
                    "\t\toifname \"{}\" ip6 saddr {lan} snat ip6 prefix to ip6 saddr map {{ {lan} : {wan} }}",
                    w.interface
                );
            }
        }
    }
    s.push_str("\t}\n}\n");
    s
}

fn join(wans: &[NftWan], f: impl Fn(&NftWan) -> String) -> String {
    wans.iter().map(f).collect::<Vec<_>>().join(", ")
}

/// Names that cannot be written into the ruleset (nft has no escapes).
fn check(wans: &[NftWan], lans: &[String]) -> Result<()> {
    if let Some(l) = lans
        .iter()
        .find(|l| l.is_empty() || l.contains(['"', '\\']))
    {
        bail!("interface name `{l}` cannot be written in an nftables rule");
    }
    for w in wans {
        if w.name.is_empty()
            || !w
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!(
                "WAN name `{}` cannot be used in an nftables chain name",
                w.name
            );
        }
        if w.interface.is_empty() || w.interface.contains(['"', '\\']) {
            bail!(
                "interface name `{}` cannot be written in an nftables rule",
                w.interface
            );
        }
    }
    Ok(())
}

/// Replaces the table (atomically: packets see the old or the new one).
/// `refuse_from`: the LAN interfaces whose new connections to unreachable
/// destinations are refused (empty unless every WAN is down under
/// `all_down = "unreachable"`).
pub async fn apply(t: &Table<'_>) -> Result<()> {
    check(t.wans, t.refuse_from)?;
    if let Some(d) = t.divert {
        check(&[], &d.lans)?;
    }
    nft(&["-f", "-"], Some(&ruleset(t)))
        .await
        .context("replacing nftables table inet mwan")?;
    Ok(())
}

/// Deletes mwan's tables: `inet mwan`, and `ip mwan` of earlier versions.
const DELETE: &str =
    "add table inet mwan\ndelete table inet mwan\nadd table ip mwan\ndelete table ip mwan\n";

/// Deletes the table (and an `ip mwan` of an earlier version); no error if
/// it does not exist.
pub async fn delete() -> Result<()> {
    nft(&["-f", "-"], Some(DELETE))
        .await
        .context("deleting nftables table inet mwan")?;
    Ok(())
}

/// The UDP ports of the DNS divert in mwan's table as it is in the kernel
/// (a daemon that died without cleanup left it): the relay ports whose
/// conntrack entries a new daemon must forget. Empty when there is none.
pub async fn divert_ports() -> Result<Vec<u16>> {
    let tables = nft(&["list", "tables"], None).await?;
    let mut ports = Vec::new();
    for line in tables.lines() {
        // "table FAMILY NAME"
        let words: Vec<&str> = line.split_whitespace().collect();
        let ["table", family, "mwan"] = words[..] else {
            continue;
        };
        if let Ok(chain) = nft(&["list", "chain", family, "mwan", "dns_divert"], None).await {
            ports.extend(udp_divert_ports(&chain));
        }
    }
    // The IPv4 and IPv6 rules name the same port.
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// The `redirect to :PORT` ports of the `udp dport 53` rules in `chain`
/// (`nft list chain` output).
fn udp_divert_ports(chain: &str) -> Vec<u16> {
    chain
        .lines()
        .filter(|l| l.contains("udp dport 53 "))
        .filter_map(|l| {
            l.split("redirect to :")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Whether a table of mwan's (`inet mwan`, or an earlier version's
/// `ip mwan`) exists.
pub async fn present() -> Result<bool> {
    let tables = nft(&["list", "tables"], None).await?;
    Ok(tables
        .lines()
        .any(|l| matches!(l.trim(), "table inet mwan" | "table ip mwan")))
}

/// Runs `nft` with `args`, feeding `input` on stdin; its stdout, or an error
/// with its stderr. The child runs in the calling thread's network
/// namespace.
async fn nft(args: &[&str], input: Option<&str>) -> Result<String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!("nft not found: install the nftables package"),
            _ => anyhow!("running nft: {e}"),
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .await
            .context("writing to nft")?;
    }
    let out = child.wait_with_output().await.context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::testns::{wan_lab, TestNs};

    fn wan(name: &str, interface: &str, mark: u32, nat: bool) -> NftWan {
        NftWan {
            name: name.into(),
            interface: interface.into(),
            mark,
            nat,
            snat: None,
            nat6: Nat6::None,
        }
    }

    /// With a datapath that reads conntrack itself, no chain sees every
    /// packet: the nat chains (first packets only) record each
    /// connection's WAN.
    #[test]
    fn ruleset_text() {
        let wans = [
            wan("isp1", "wan1", 0x1_0000, true),
            wan("lte.2", "ppp0", 0x2_0000, false),
        ];
        let table = |restore| Table {
            wans: &wans,
            mark_mask: 0x00ff_0000,
            refuse_from: &[],
            divert: None,
            restore,
        };
        assert_eq!(
            ruleset(&table(false)),
            "add table inet mwan
delete table inet mwan
add table ip mwan
delete table ip mwan
table inet mwan {
\tchain conn_isp1 {
\t\tct mark set ct mark and 0xff00ffff or 0x00010000
\t}
\tchain conn_lte.2 {
\t\tct mark set ct mark and 0xff00ffff or 0x00020000
\t}
\tchain output {
\t\ttype filter hook output priority raw; policy accept;
\t\tmeta mark 0x6d6e7564 notrack
\t}
\tchain input {
\t\ttype nat hook input priority 100; policy accept;
\t\tiifname vmap { \"wan1\" : jump conn_isp1, \"ppp0\" : jump conn_lte.2 }
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tiifname vmap { \"wan1\" : jump conn_isp1, \"ppp0\" : jump conn_lte.2 }
\t\toifname vmap { \"wan1\" : jump conn_isp1, \"ppp0\" : jump conn_lte.2 }
\t\toifname \"wan1\" meta nfproto ipv4 masquerade
\t}
}
"
        );
        // A datapath that cannot: every packet's mark restored.
        let legacy = ruleset(&table(true));
        for part in [
            "\tchain prerouting {\n\t\ttype filter hook prerouting priority mangle; policy accept;\n\t\tct mark and 0x00ff0000 vmap { 0x00010000 : goto route_isp1, 0x00020000 : goto route_lte.2 }\n\t}\n",
            "\tchain route_isp1 {\n\t\tmeta mark set meta mark and 0xff00ffff or 0x00010000\n\t}\n",
            "\tchain route_lte.2 {\n\t\tmeta mark set meta mark and 0xff00ffff or 0x00020000\n\t}\n",
        ] {
            assert!(legacy.contains(part), "{part} missing in\n{legacy}");
        }
    }

    #[test]
    fn refusing_adds_the_reject_rules_for_the_lans_only() {
        let wans = [wan("isp1", "wan1", 0x1_0000, true)];
        let lans = ["lan0".to_string(), "br-guest".to_string()];
        let text = ruleset(&Table {
            wans: &wans,
            mark_mask: 0x00ff_0000,
            refuse_from: &lans,
            divert: None,
            restore: true,
        });
        let doomed = "iifname { \"lan0\", \"br-guest\" } ct state new fib daddr type unicast fib daddr oif missing";
        assert!(
            text.contains(&format!(
                "{doomed} meta l4proto tcp reject with tcp reset\n"
            )) && text.contains(&format!(
                "{doomed} reject with icmpx type host-unreachable\n"
            )),
            "{text}"
        );
        assert!(!ruleset(&Table {
            wans: &wans,
            mark_mask: 0x00ff_0000,
            refuse_from: &[],
            divert: None,
            restore: true
        })
        .contains("reject"));
    }

    #[test]
    fn ruleset_without_wans_is_valid_and_empty() {
        let text = ruleset(&Table {
            wans: &[],
            mark_mask: 0xff,
            refuse_from: &[],
            divert: None,
            restore: true,
        });
        assert!(
            !text.contains("vmap") && !text.contains("masquerade"),
            "{text}"
        );
    }

    #[test]
    fn unusable_names_are_rejected() {
        assert!(check(&[wan("isp 1", "wan1", 1, true)], &[]).is_err());
        assert!(check(&[wan("isp1", "wa\"n1", 1, true)], &[]).is_err());
        assert!(check(&[], &["la\"n".into()]).is_err());
        assert!(check(&[wan("isp-1_a.b", "eth0.10", 1, true)], &["br-lan".into()]).is_ok());
    }

    /// Apply, replace and delete in a namespace; the `nft` children run in
    /// the namespace of the thread that spawns them.
    #[test]
    fn apply_replace_delete() {
        let ns = TestNs::new("nft");
        let list = || ns.exec(&["nft", "list", "ruleset"]);
        ns.block_on(|| async {
            assert!(!present().await.unwrap());
            delete().await.unwrap();
            // An earlier version's `ip mwan`: found, and replaced by the
            // first apply.
            nft(&["-f", "-"], Some("table ip mwan {\n chain c {\n }\n}\n"))
                .await
                .unwrap();
            assert!(present().await.unwrap());
            let wans = [
                wan("isp-1", "wan1", 0x1_0000, true),
                wan("isp.2", "wan2", 0x2_0000, true),
            ];
            apply(&Table { wans: &wans, mark_mask: 0x00ff_0000, refuse_from: &[], divert: None, restore: true }).await.unwrap();
            assert!(present().await.unwrap());
            let text = list();
            assert!(!text.contains("table ip mwan"), "{text}");
            assert!(
                text.contains("oifname \"wan2\" meta nfproto ipv4 masquerade")
                    && text.contains("chain route_isp.2"),
                "{text}"
            );
            // The DNS divert of rules by domain name: nft accepts it.
            let divert = Divert {
                lans: vec!["lan0".into()],
                port: 40053,
                tcp_port: 40054,
            };
            apply(&Table { wans: &wans, mark_mask: 0x00ff_0000, refuse_from: &[], divert: Some(&divert), restore: true }).await.unwrap();
            let text = list();
            assert!(
                text.contains(
                    "iifname \"lan0\" meta nfproto ipv4 udp dport 53 tproxy ip to :40053 counter packets 0 bytes 0 redirect to :40053"
                ),
                "{text}"
            );
            assert!(
                text.contains(
                    "iifname \"lan0\" meta nfproto ipv6 tcp dport 53 tproxy ip6 to :40054 counter packets 0 bytes 0 redirect to :40054"
                ),
                "{text}"
            );
            assert!(
                text.contains(&format!(
                    "iifname \"lan0\" meta nfproto ipv6 udp dport 53 tproxy ip6 to :40053 ct original zone set {DIVERT_ZONE}"
                )),
                "{text}"
            );
            assert_eq!(divert_ports().await.unwrap(), [40053]);
            apply(&Table { wans: &wans[..1], mark_mask: 0x00ff_0000, refuse_from: &[], divert: None, restore: true }).await.unwrap();
            assert!(divert_ports().await.unwrap().is_empty());
            let text = list();
            assert!(
                text.contains("oifname \"wan1\" meta nfproto ipv4 masquerade") && !text.contains("wan2"),
                "{text}"
            );
            apply(&Table { wans: &[], mark_mask: 0x00ff_0000, refuse_from: &[], divert: None, restore: true }).await.unwrap();
            delete().await.unwrap();
            assert!(!present().await.unwrap());
            assert_eq!(list().trim(), "");
            delete().await.unwrap();
            // nft's complaint is in the error.
            let e = nft(&["-f", "-"], Some("table inet mwan { chain c { bogus } }\n"))
                .await
                .unwrap_err();
            assert!(format!("{e:#}").contains("syntax error"), "{e:#}");
        });
    }

    #[test]
    fn masquerade_rewrites_the_source() {
        let t = wan_lab("masq");
        t.router
            .block_on(|| async {
                apply(&Table {
                    wans: &[wan("isp1", "wan2", 0x1_0000, true)],
                    mark_mask: 0x00ff_0000,
                    refuse_from: &[],
                    divert: None,
                    restore: true,
                })
                .await
            })
            .unwrap();
        let server = t
            .server
            .run(|| std::net::UdpSocket::bind("192.0.2.10:5000").unwrap());
        t.lan.run(|| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(b"ping", "192.0.2.10:5000").unwrap();
        });
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0; 16];
        let (_, from) = server
            .recv_from(&mut buf)
            .expect("datagram through the router");
        assert_eq!(from.ip().to_string(), "203.0.113.1");
    }

    #[test]
    fn ipv6_nat_text() {
        let mut a = wan("isp1", "wan1", 0x1_0000, true);
        a.nat6 = Nat6::Masquerade;
        let mut b = wan("isp2", "wan2", 0x2_0000, false);
        b.nat6 = Nat6::Prefix {
            lan: "fd00:1::/48".parse().unwrap(),
            wan: "2001:db8:a2::/48".parse().unwrap(),
        };
        let text = ruleset(&Table {
            wans: &[a, b],
            mark_mask: 0x00ff_0000,
            refuse_from: &[],
            divert: None,
            restore: true,
        });
        for line in [
            "\tchain dstnat {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tiifname \"wan2\" ip6 daddr 2001:db8:a2::/48 dnat ip6 prefix to ip6 daddr map { 2001:db8:a2::/48 : fd00:1::/48 }\n\t}\n",
            "\t\toifname \"wan1\" meta nfproto ipv4 masquerade\n",
            "\t\toifname \"wan1\" meta nfproto ipv6 masquerade\n",
            "\t\toifname \"wan2\" ip6 saddr fd00:1::/48 snat ip6 prefix to ip6 saddr map { fd00:1::/48 : 2001:db8:a2::/48 }\n",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        // nat = false and no IPv6: neither family is translated.
        assert!(!text.contains("\"wan2\" meta nfproto"), "{text}");
        let plain = ruleset(&Table {
            wans: &[wan("isp1", "wan1", 0x1_0000, true)],
            mark_mask: 0x00ff_0000,
            refuse_from: &[],
            divert: None,
            restore: true,
        });
        assert!(
            !plain.contains("ipv6") && !plain.contains("dstnat"),
            "{plain}"
        );
    }

    /// Sends one UDP datagram from `from` (bound to `src`) to `to`, received
    /// in `at`'s namespace on a socket bound to `bound`; returns the source
    /// `at` saw.
    fn udp_seen(from: &TestNs, src: &str, to: &str, at: &TestNs, bound: &str) -> std::net::IpAddr {
        use std::net::UdpSocket;
        let server = at.run(|| UdpSocket::bind(bound).unwrap());
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        from.run(|| {
            let s = UdpSocket::bind(src).unwrap();
            s.send_to(b"ping", to).unwrap();
        });
        let mut buf = [0; 16];
        let (_, seen) = server
            .recv_from(&mut buf)
            .expect("datagram through the router");
        seen.ip()
    }

    /// NAT66: IPv6 leaving the WAN gets the WAN's address; without it
    /// (`ipv6 = "off"`) IPv6 keeps its source while IPv4 still masquerades.
    #[test]
    fn nat66_masquerades_ipv6_only_where_asked() {
        let t = wan_lab("nat66").with_ipv6();
        let mut w = wan("isp2", "wan2", 0x2_0000, true);
        let send6 = || {
            udp_seen(
                &t.lan,
                "[fd00:1::2]:0",
                "[2001:db8:ff::10]:5000",
                &t.server,
                "[2001:db8:ff::10]:5000",
            )
            .to_string()
        };
        let send4 = || {
            udp_seen(
                &t.lan,
                "100.64.1.2:0",
                "192.0.2.10:5000",
                &t.server,
                "192.0.2.10:5000",
            )
            .to_string()
        };
        for (nat6, want6) in [
            (Nat6::Masquerade, "2001:db8:2::1"),
            (Nat6::None, "fd00:1::2"),
        ] {
            w.nat6 = nat6;
            t.router
                .block_on(|| async {
                    apply(&Table {
                        wans: &[w.clone()],
                        mark_mask: 0x00ff_0000,
                        refuse_from: &[],
                        divert: None,
                        restore: true,
                    })
                    .await
                })
                .unwrap();
            assert_eq!(send6(), want6, "{nat6:?}");
            assert_eq!(send4(), "203.0.113.1", "{nat6:?}");
        }
    }

    /// NPT: a LAN host's address leaves with the WAN's prefix and its own
    /// interface identifier, and a new flow from outside to that mapped
    /// address reaches the host at its LAN address.
    #[test]
    fn npt_keeps_the_interface_identifier_both_ways() {
        let t = wan_lab("npt").with_ipv6();
        t.lan.ip("addr add fd00:1::abcd:1234/64 dev eth0 nodad");
        let mut w = wan("isp2", "wan2", 0x2_0000, true);
        w.nat6 = Nat6::Prefix {
            lan: "fd00:1::/64".parse().unwrap(),
            wan: "2001:db8:a2::/64".parse().unwrap(),
        };
        t.router
            .block_on(|| async {
                apply(&Table {
                    wans: &[w],
                    mark_mask: 0x00ff_0000,
                    refuse_from: &[],
                    divert: None,
                    restore: true,
                })
                .await
            })
            .unwrap();
        for (host, mapped) in [
            ("fd00:1::2", "2001:db8:a2::2"),
            ("fd00:1::abcd:1234", "2001:db8:a2::abcd:1234"),
        ] {
            let seen = udp_seen(
                &t.lan,
                &format!("[{host}]:0"),
                "[2001:db8:ff::10]:5000",
                &t.server,
                "[2001:db8:ff::10]:5000",
            );
            assert_eq!(seen.to_string(), mapped, "outbound from {host}");
            let seen = udp_seen(
                &t.server,
                "[2001:db8:ff::10]:0",
                &format!("[{mapped}]:7000"),
                &t.lan,
                &format!("[{host}]:7000"),
            );
            assert_eq!(seen.to_string(), "2001:db8:ff::10", "inbound to {mapped}");
        }
        // IPv4 keeps masquerading.
        let seen = udp_seen(
            &t.lan,
            "100.64.1.2:0",
            "192.0.2.10:5000",
            &t.server,
            "192.0.2.10:5000",
        );
        assert_eq!(seen.to_string(), "203.0.113.1");
    }

    /// With a `snat_address`, forwarded connections leave with that source
    /// (an address the router need not hold: the standby of an HA pair
    /// has its rule too) and the router's own keep theirs.
    #[test]
    fn snat_address_is_the_source_of_forwarded_connections_only() {
        let t = wan_lab("snat");
        let mut w = wan("isp1", "wan2", 0x1_0000, true);
        w.snat = Some("203.0.113.9".parse().unwrap());
        t.router
            .block_on(|| async {
                apply(&Table {
                    wans: &[w],
                    mark_mask: 0x00ff_0000,
                    refuse_from: &[],
                    divert: None,
                    restore: true,
                })
                .await
            })
            .unwrap();
        let server = t
            .server
            .run(|| std::net::UdpSocket::bind("192.0.2.10:5000").unwrap());
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0; 16];
        for (ns, want) in [(&t.lan, "203.0.113.9"), (&t.router, "203.0.113.1")] {
            ns.run(|| {
                let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                s.send_to(b"ping", "192.0.2.10:5000").unwrap();
            });
            let (_, from) = server
                .recv_from(&mut buf)
                .expect("datagram through the router");
            assert_eq!(from.ip().to_string(), want);
        }
    }

    /// A port forward on wan1 (not the default route): the ct mark set on
    /// the way in brings the LAN server's replies back out of wan1.
    #[test]
    fn replies_of_inbound_connections_leave_through_their_wan() {
        use crate::routing::{wanted_rules, Net, Nexthop};
        use std::io::{Read, Write};
        use std::time::Duration;

        let t = wan_lab("ctmark");
        t.router.exec(&[
            "nft",
            "add table ip testfwd; add chain ip testfwd pre { type nat hook prerouting priority dstnat; }; \
             add rule ip testfwd pre iifname \"wan1\" tcp dport 8080 dnat to 100.64.1.2:80",
        ]);
        t.router.block_on(|| async {
            let net = Net::connect().await.unwrap();
            let wan1 = net.link("wan1").await.unwrap().unwrap().index;
            let gw = "198.51.100.2".parse().ok();
            net.set_table_default(
                1000,
                Nexthop {
                    gateway: gw,
                    ifindex: wan1,
                },
            )
            .await
            .unwrap();
            net.sync_rules(&wanted_rules(
                crate::family::Family::Ipv4,
                1000,
                1000,
                0x00ff_0000,
                &[(0, 0x1_0000, vec![])],
                false,
            ))
            .await
            .unwrap();
        });
        let listener = t
            .lan
            .run(|| std::net::TcpListener::bind("100.64.1.2:80").unwrap());
        let connect = || {
            t.server.run(|| -> std::io::Result<std::net::TcpStream> {
                use socket2::{Domain, SockAddr, Socket, Type};
                let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                s.bind(&SockAddr::from(
                    "192.0.2.10:0".parse::<std::net::SocketAddr>().unwrap(),
                ))?;
                let to: std::net::SocketAddr = "198.51.100.1:8080".parse().unwrap();
                s.connect_timeout(&to.into(), Duration::from_secs(1))?;
                Ok(s.into())
            })
        };
        // Without mwan's table the SYN-ACK leaves through wan2 and is dropped.
        assert!(connect().is_err());

        t.router
            .block_on(|| async {
                apply(&Table {
                    wans: &[wan("isp1", "wan1", 0x1_0000, false)],
                    mark_mask: 0x00ff_0000,
                    refuse_from: &[],
                    divert: None,
                    restore: true,
                })
                .await
            })
            .unwrap();
        let mut client = connect().expect("connection through the port forward");
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(b"hello").unwrap();
        let mut buf = [0; 5];
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        let entries = t.router.run(crate::conntrack::dump).unwrap();
        let e = entries
            .iter()
            .find(|e| e.orig.sport == client.local_addr().unwrap().port())
            .expect("conntrack entry");
        assert_eq!(e.mark, 0x1_0000);
    }
}
