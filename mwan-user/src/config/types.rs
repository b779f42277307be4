//! The validated configuration's parts: what [`Config`](super::Config) is
//! made of once every key has been read and checked, with the defaults.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::{IpNet, Ipv6Net};
use serde::Deserialize;

use crate::family::Family;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Sticky {
    /// Every connection stays on the WAN it started on.
    #[default]
    Connection,
    /// Every connection of a LAN host uses the WAN of its first connection
    /// while the host is active (see `host_ttl`).
    Host,
}

/// How `sticky = "host"` tells hosts apart (`sticky_key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StickyKey {
    /// By source MAC address on Ethernet LANs: one pin for a host's IPv4
    /// address and all its IPv6 addresses. By address on L3 LANs.
    #[default]
    Mac,
    /// By IPv4 address and IPv6 /64: for LANs behind another router, where
    /// every packet carries that router's MAC.
    Address,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AllDown {
    /// Keep sending new connections through the WANs that were up last.
    #[default]
    Last,
    /// Refuse new connections (ICMP host unreachable) until a WAN is up.
    Unreachable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Failback {
    /// Connections that moved away from a failed WAN stay where they are.
    #[default]
    Keep,
    /// When the WAN comes back, connections that moved away from it are reset
    /// (conntrack entry and pin deleted) so they reconnect through it.
    Reset,
    /// Once the WAN is back and stable for `failback_after`, the flows that
    /// went to a backup or metered WAN while it was down are reset to it,
    /// spread over `failback_spread`.
    Drain,
}

/// What a WAN whose allowance is used up does (`quota_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QuotaAction {
    /// It takes new flows only while no other WAN can.
    #[default]
    Backup,
    /// It takes no new flows.
    Off,
    /// Nothing: the usage is reported only.
    None,
}

impl fmt::Display for QuotaAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuotaAction::Backup => "backup",
            QuotaAction::Off => "off",
            QuotaAction::None => "none",
        })
    }
}

/// When a WAN's billing cycle starts again (`quota_reset_day`), at local
/// midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetDay {
    /// This day of every month (a shorter month's last day for 29 to 31).
    Monthly(u8),
    /// This day of every week, 0 for Monday.
    Weekly(u8),
    Daily,
}

impl Default for ResetDay {
    fn default() -> Self {
        ResetDay::Monthly(1)
    }
}

impl fmt::Display for ResetDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetDay::Monthly(d) => write!(f, "day {d} of the month"),
            ResetDay::Weekly(d) => write!(f, "{}", crate::clock::WEEKDAYS[*d as usize]),
            ResetDay::Daily => f.write_str("daily"),
        }
    }
}

/// A WAN's allowance per billing cycle (`quota` and its keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    /// Bytes per cycle, both directions and families together.
    pub bytes: u64,
    /// Percentages at which a warning is given (events, hooks, metrics).
    pub warn: Vec<u8>,
    pub action: QuotaAction,
    /// At 100 %, the WAN's connections are reset too (they move to the
    /// other WANs), not only new ones kept away.
    pub reset_flows: bool,
}

pub const DEFAULT_QUOTA_WARN: [u8; 2] = [75, 95];

/// A weight that applies while its schedule is on (`[[wan.weight_schedule]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightSchedule {
    pub schedule: crate::schedule::Schedule,
    pub weight: u32,
}

/// A WAN's gateway: fixed, or learned from the kernel's routes on the
/// interface (DHCP, PPPoE); `None` for an uplink without IPv4 (no
/// `gateway`, only `gateway6`: DS-Lite, 464XLAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gateway {
    Fixed(Ipv4Addr),
    Auto,
    None,
}

impl fmt::Display for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gateway::Fixed(a) => write!(f, "{a}"),
            Gateway::Auto => write!(f, "auto"),
            Gateway::None => write!(f, "none (no IPv4)"),
        }
    }
}

/// A WAN's IPv6 gateway (`gateway6`): fixed (a global or link-local
/// address; a link-local one is reached through the WAN's interface), or
/// the router learned from Router Advertisements on the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gateway6 {
    Fixed(Ipv6Addr),
    Auto,
}

impl fmt::Display for Gateway6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gateway6::Fixed(a) => write!(f, "{a}"),
            Gateway6::Auto => write!(f, "auto"),
        }
    }
}

/// How the LAN's IPv6 traffic leaves through a WAN (`ipv6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Mode {
    /// Masquerade to the WAN's global address (NAT66).
    Nat,
    /// Map `lan_prefix6` onto `prefix6` (prefix translation, the interface
    /// identifier kept).
    Npt {
        prefix: Prefix6,
        lan_prefix: Ipv6Net,
    },
    /// mwan leaves this WAN's IPv6 alone.
    Off,
}

/// The WAN's prefix of NPT (`prefix6`): fixed, or the prefix of the WAN
/// interface's global address, at `lan_prefix6`'s length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix6 {
    Fixed(Ipv6Net),
    Auto,
}

/// One health-check target, IPv4 or IPv6. A WAN's targets of each family
/// judge that family's health (see `health`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProbeTarget {
    /// ICMP (ICMPv6) echo to the address.
    Icmp(IpAddr),
    /// A TCP connection to the address and port (success: connected or
    /// actively refused, both prove the path works).
    Tcp(SocketAddr),
    /// A DNS query (for `.` NS) to a resolver; any answer with our id counts.
    Dns(SocketAddr),
}

impl ProbeTarget {
    pub fn family(&self) -> Family {
        let v6 = match self {
            ProbeTarget::Icmp(a) => a.is_ipv6(),
            ProbeTarget::Tcp(s) | ProbeTarget::Dns(s) => s.is_ipv6(),
        };
        if v6 {
            Family::Ipv6
        } else {
            Family::Ipv4
        }
    }
}

impl fmt::Display for ProbeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeTarget::Icmp(a) => write!(f, "{a}"),
            ProbeTarget::Tcp(s) => write!(f, "tcp:{s}"),
            ProbeTarget::Dns(s) if s.port() == 53 => write!(f, "dns:{}", s.ip()),
            ProbeTarget::Dns(s) => write!(f, "dns:{s}"),
        }
    }
}

impl std::str::FromStr for ProbeTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // A bare address (IPv6 ones contain colons themselves).
        if let Ok(a) = s.parse::<IpAddr>() {
            return Ok(ProbeTarget::Icmp(a));
        }
        let (kind, rest) = match s.split_once(':') {
            Some((k, r)) => (k, r),
            None => ("icmp", s),
        };
        let addr = |r: &str| {
            r.parse::<IpAddr>()
                .map_err(|_| format!("`{r}` is not an IPv4 or IPv6 address"))
        };
        let sock = |r: &str, default_port: Option<u16>| -> Result<SocketAddr, String> {
            if let Ok(s) = r.parse::<SocketAddr>() {
                if s.port() == 0 {
                    return Err(format!("`{r}`: port 0 is not a valid target port"));
                }
                return Ok(s);
            }
            match default_port {
                Some(p) => Ok(SocketAddr::new(addr(r)?, p)),
                None => Err(format!(
                    "`{r}` is not ADDRESS:PORT (an IPv6 address in brackets: [2001:db8::1]:443)"
                )),
            }
        };
        match kind {
            "icmp" => Ok(ProbeTarget::Icmp(addr(rest)?)),
            "tcp" => Ok(ProbeTarget::Tcp(sock(rest, None)?)),
            "dns" => Ok(ProbeTarget::Dns(sock(rest, Some(53))?)),
            other => Err(format!(
                "unknown probe kind `{other}` in `{s}` (use ADDRESS, icmp:ADDRESS, tcp:ADDRESS:PORT or dns:ADDRESS[:PORT]; IPv6 with a port in brackets)"
            )),
        }
    }
}

/// Health-check settings of one WAN (defaults from the top level, then the
/// built-in defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    pub targets: Vec<ProbeTarget>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Targets that must answer for a round to succeed.
    pub quorum: usize,
    /// Consecutive failed rounds that take the WAN down.
    pub down_after: u32,
    /// Consecutive good rounds (then `hold_down`) that bring it back.
    pub up_after: u32,
    /// Minimum time a WAN stays down.
    pub hold_down: Duration,
    /// Rolling loss (percent) above which the WAN is `degraded`.
    pub max_loss: Option<f64>,
    /// Rolling mean RTT above which the WAN is `degraded`.
    pub max_rtt: Option<Duration>,
    /// Rounds in the rolling loss/RTT/jitter window.
    pub window: u32,
    /// Passive health: `passive`, `passive_timeout`,
    /// `passive_destinations`.
    pub passive: PassiveConfig,
}

/// Passive health of one WAN (see `health::passive`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PassiveConfig {
    /// `passive`: on by default.
    pub enabled: bool,
    /// `passive_timeout`: the shortest time a handshake may take before it
    /// counts as unanswered.
    pub timeout: Duration,
    /// `passive_destinations`: distinct destinations with unanswered
    /// handshakes before the probes are asked to confirm.
    pub min_destinations: u32,
}

impl PassiveConfig {
    pub const DEFAULT: PassiveConfig = PassiveConfig {
        enabled: true,
        timeout: DEFAULT_PASSIVE_TIMEOUT,
        min_destinations: DEFAULT_PASSIVE_DESTINATIONS,
    };
}

impl HealthConfig {
    /// The targets of one family and the quorum they need: `quorum`,
    /// capped at their number. Empty when the WAN has no target of that
    /// family (its health then follows the other family's).
    pub fn targets_of(&self, family: Family) -> (Vec<ProbeTarget>, usize) {
        let t: Vec<ProbeTarget> = self
            .targets
            .iter()
            .filter(|t| t.family() == family)
            .cloned()
            .collect();
        let quorum = self.quorum.min(t.len());
        (t, quorum)
    }
}

pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(100);
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(400);
pub const DEFAULT_QUORUM: usize = 1;
pub const DEFAULT_DOWN_AFTER: u32 = 4;
pub const DEFAULT_UP_AFTER: u32 = 5;
pub const DEFAULT_HOLD_DOWN: Duration = Duration::from_secs(5);
pub const DEFAULT_WINDOW: u32 = 50;
/// The shortest wait for a SYN's answer before it counts as unanswered.
/// A wrong suspicion costs only a detour of new connections for one
/// burst's timeout (never a down), so it can be short.
pub const DEFAULT_PASSIVE_TIMEOUT: Duration = Duration::from_millis(150);
/// Distinct destinations whose handshakes must go unanswered before the
/// probes are asked to confirm.
pub const DEFAULT_PASSIVE_DESTINATIONS: u32 = 8;

#[derive(Debug, Clone, PartialEq)]
pub struct Wan {
    pub name: String,
    pub interface: String,
    pub gateway: Gateway,
    pub weight: u32,
    pub tier: u32,
    pub nat: bool,
    /// Source address for forwarded connections leaving this WAN, instead
    /// of masquerading to the interface's primary address: the public
    /// address an HA pair shares as a VRRP virtual address, so a
    /// connection keeps its address when the other router takes it over.
    pub snat_address: Option<Ipv4Addr>,
    /// A fixed WAN id (and so mark): the routers of an HA pair must record
    /// a WAN in conntrack under the same mark. Unset: mwan numbers WANs
    /// itself, in config order at the first start, stable afterwards.
    pub id: Option<u8>,
    /// `false`: the WAN is `disabled` (no flows, no probes).
    pub enabled: bool,
    pub health: HealthConfig,
    /// The IPv6 gateway; `None`: no IPv6 on this WAN.
    pub gateway6: Option<Gateway6>,
    /// `Off` when `gateway6` is unset.
    pub ipv6: Ipv6Mode,
    /// The allowance per billing cycle, if the line is metered.
    pub quota: Option<Quota>,
    /// When its billing cycle starts again (also without a quota: the
    /// usage is shown per cycle).
    pub reset_day: ResetDay,
    /// What its connections do when it comes back after being down (the
    /// top-level `failback` unless set here).
    pub failback: Failback,
    /// `failback = "drain"`: how long it must be up before its flows are
    /// drained back to it.
    pub failback_after: Duration,
    /// A flow on this WAN while its policy offers a better one (a lower
    /// tier is back, this one is over its allowance) is reset after this
    /// age.
    pub max_backup_flow_age: Option<Duration>,
    /// Weights by time of day (non-overlapping); `weight` otherwise.
    pub weight_schedule: Vec<WeightSchedule>,
}

impl Wan {
    /// The weight at `week_secs` (local): the schedule's in force, else
    /// `weight`; with the schedule that gave it.
    pub fn weight_at(&self, week_secs: u32) -> (u32, Option<&WeightSchedule>) {
        match self
            .weight_schedule
            .iter()
            .find(|s| s.schedule.active_at(week_secs))
        {
            Some(s) => (s.weight, Some(s)),
            None => (self.weight, None),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Icmp => 1,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        })
    }
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// What a matching rule does with a new flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The first eligible WAN of the list.
    Ordered(Vec<String>),
    /// Weighted among the eligible WANs of the list (tiers apply).
    Balance(Vec<String>),
    /// Not balanced: routed by the main table.
    Main,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    /// Empty: any of tcp, udp, icmp and other protocols.
    pub protos: Vec<Proto>,
    /// IPv4 and IPv6 prefixes. A rule whose `src` (or `dst`) holds
    /// prefixes of one family only matches that family.
    pub src: Vec<IpNet>,
    pub dst: Vec<IpNet>,
    pub src_ports: Vec<PortRange>,
    pub dst_ports: Vec<PortRange>,
    pub lan_interfaces: Vec<String>,
    /// Names whose addresses (learned from DNS answers) the rule matches,
    /// each with all its subdomains: those of `domains`, then those of
    /// `domains_file`, normalised (lowercase, no trailing dot, no `*.`),
    /// each once. Empty: any destination.
    pub domains: Vec<String>,
    /// Where part of `domains` was read from (re-read on every load).
    pub domains_file: Option<PathBuf>,
    pub action: Action,
    /// When the rule matches (local time); always when unset. Outside it,
    /// new flows go to the next rule that matches or the default policy.
    pub schedule: Option<crate::schedule::Schedule>,
}

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mwan";
pub const DEFAULT_STATE_DIR: &str = "/run/mwan";
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;
pub const DEFAULT_MAX_HOSTS: u32 = 65_536;
pub const DEFAULT_MARK_MASK: u32 = 0x00ff_0000;
pub const DEFAULT_TABLE_BASE: u32 = 1000;
pub const DEFAULT_RULE_PRIORITY: u32 = 1000;
pub const DEFAULT_HOST_TTL: Duration = Duration::from_secs(600);
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_FAILBACK_AFTER: Duration = Duration::from_secs(30);
pub const DEFAULT_FAILBACK_SPREAD: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use crate::config::*;

    #[test]
    fn probe_target_forms() {
        assert_eq!(
            "dns:198.51.100.53".parse::<ProbeTarget>().unwrap(),
            ProbeTarget::Dns("198.51.100.53:53".parse().unwrap())
        );
        assert_eq!(
            "dns:198.51.100.53:5353"
                .parse::<ProbeTarget>()
                .unwrap()
                .to_string(),
            "dns:198.51.100.53:5353"
        );
        assert_eq!(
            "icmp:192.0.2.1".parse::<ProbeTarget>().unwrap().to_string(),
            "192.0.2.1"
        );
        assert!("tcp:203.0.113.9".parse::<ProbeTarget>().is_err());
        assert!("ftp:203.0.113.9:21"
            .parse::<ProbeTarget>()
            .unwrap_err()
            .contains("unknown probe kind"));
        assert!("example.com".parse::<ProbeTarget>().is_err());
    }

    #[test]
    fn ipv6_probe_targets_parse_and_print_back() {
        for (text, target) in [
            (
                "2001:db8::1",
                ProbeTarget::Icmp("2001:db8::1".parse().unwrap()),
            ),
            (
                "icmp:2001:db8::1",
                ProbeTarget::Icmp("2001:db8::1".parse().unwrap()),
            ),
            (
                "tcp:[2001:db8::1]:443",
                ProbeTarget::Tcp("[2001:db8::1]:443".parse().unwrap()),
            ),
            (
                "dns:2001:db8::53",
                ProbeTarget::Dns("[2001:db8::53]:53".parse().unwrap()),
            ),
            (
                "dns:[2001:db8::53]:5353",
                ProbeTarget::Dns("[2001:db8::53]:5353".parse().unwrap()),
            ),
        ] {
            let t: ProbeTarget = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(t, target, "{text}");
            assert_eq!(t.family(), Family::Ipv6, "{text}");
            let shown = t.to_string();
            assert_eq!(shown.parse::<ProbeTarget>().unwrap(), t, "{shown}");
        }
        assert_eq!(
            "tcp:[2001:db8::1]:443"
                .parse::<ProbeTarget>()
                .unwrap()
                .to_string(),
            "tcp:[2001:db8::1]:443"
        );
        let e = "tcp:2001:db8::1:443".parse::<ProbeTarget>().unwrap_err();
        assert!(e.contains("in brackets"), "{e}");
        assert!("2001:db8::g".parse::<ProbeTarget>().is_err());
    }
}
