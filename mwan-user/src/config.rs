//! The configuration file (TOML): parsing and validation.
//!
//! Parsing is strict: syntax errors, unknown keys, values of the wrong type,
//! duplicate names, bad addresses and values out of range are rejected with
//! a message naming the file, the line (found from toml_edit's spans), the
//! key and the reason.
//! [`Config::parse`] checks everything that can be checked from the text
//! alone (and the domains files rules name, which it reads);
//! [`Config::check_system`] checks it against the host's interfaces.
//! Nothing here changes the host.
//!
//! See `docs/CONFIG.md` for the reference.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::{IpNet, Ipv6Net};
use serde::Deserialize;

use mwan_common::{MAX_RULES, MAX_WANS, WAN_NAME_LEN};

use crate::dns::{config_name, DomainMatcher};

/// A configuration error: where it is (`file`, `line`), which setting
/// (`key`, a path such as `wan[1] (isp2).weight` or `rule[0].dst_ports`)
/// and what is wrong (`reason`). Displayed as
/// `mwan.toml:14: wan[1] (isp2).weight: 0 is out of range 1..=1000`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file, when the text came from one.
    pub file: Option<PathBuf>,
    /// 1-based line of the setting, or of its table when the key is
    /// missing; none for what has no place in the text (no `[[wan]]` at all).
    pub line: Option<usize>,
    pub key: String,
    pub reason: String,
    path: KeyPath,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, Some(line)) => write!(f, "line {line}: ")?,
            (None, None) => {}
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.reason)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// Fills in the line from the document the error was found in.
    fn locate(mut self, text: &str) -> ConfigError {
        if self.line.is_none() {
            if let Ok(doc) = toml_edit::ImDocument::parse(text) {
                self.line = self
                    .path
                    .offset_in(&doc)
                    .map(|at| line_of(text.as_bytes(), at));
            }
        }
        self
    }
}

fn err(key: impl Into<KeyPath>, reason: impl Into<String>) -> ConfigError {
    let path = key.into();
    ConfigError {
        file: None,
        line: None,
        key: path.to_string(),
        reason: reason.into(),
        path,
    }
}

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &[u8], at: usize) -> usize {
    text[..at.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Where a setting is: keys and list indexes from the top of the document,
/// with the name of a WAN or rule shown beside its index
/// (`wan[1] (isp2).weight`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct KeyPath(Vec<Seg>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
    /// Shown only; not part of the document's structure.
    Label(String),
}

impl KeyPath {
    fn with(&self, seg: Seg) -> KeyPath {
        let mut p = self.clone();
        p.0.push(seg);
        p
    }
    fn key(&self, k: &str) -> KeyPath {
        self.with(Seg::Key(k.to_string()))
    }
    fn index(&self, i: usize) -> KeyPath {
        self.with(Seg::Index(i))
    }
    fn label(&self, name: &str) -> KeyPath {
        self.with(Seg::Label(name.to_string()))
    }

    /// Byte offset of the setting in `doc`: its key (or list item), else
    /// the deepest enclosing table or key that exists (a missing key is
    /// reported at its table's header).
    fn offset_in(&self, doc: &toml_edit::ImDocument<&str>) -> Option<usize> {
        use toml_edit::{Item, Table, TableLike, Value};
        enum At<'a> {
            Item(&'a Item),
            Table(&'a Table),
        }
        let mut at = At::Table(doc.as_table());
        let mut found = None;
        for seg in &self.0 {
            match seg {
                Seg::Label(_) => {}
                Seg::Key(k) => {
                    let table: &dyn TableLike = match at {
                        At::Table(t) => t,
                        At::Item(i) => match i.as_table_like() {
                            Some(t) => t,
                            None => break,
                        },
                    };
                    let Some(next) = table.get(k) else { break };
                    let span = table.key(k).and_then(|k| k.span()).or_else(|| next.span());
                    found = span.map(|s| s.start).or(found);
                    at = At::Item(next);
                }
                Seg::Index(i) => match at {
                    At::Item(Item::ArrayOfTables(a)) => {
                        // An `[[wan]]` table: its header.
                        let Some(t) = a.get(*i) else { break };
                        found = t.span().map(|s| s.start).or(found);
                        at = At::Table(t);
                    }
                    At::Item(Item::Value(Value::Array(a))) => {
                        if let Some(v) = a.get(*i) {
                            found = v.span().map(|s| s.start).or(found);
                        }
                        break;
                    }
                    _ => break,
                },
            }
        }
        found
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
                Seg::Label(l) => write!(f, " ({l})")?,
            }
        }
        Ok(())
    }
}

/// A top-level key (`"mark_mask"`); `""` is the whole file.
impl From<&str> for KeyPath {
    fn from(k: &str) -> KeyPath {
        if k.is_empty() {
            KeyPath::default()
        } else {
            KeyPath::default().key(k)
        }
    }
}

impl From<&KeyPath> for KeyPath {
    fn from(p: &KeyPath) -> KeyPath {
        p.clone()
    }
}

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

pub use crate::family::Family;

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
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub lan_interfaces: Vec<String>,
    pub sticky: Sticky,
    pub sticky_key: StickyKey,
    pub host_ttl: Duration,
    /// The shortest life of an address learned for a rule by domain name,
    /// whatever the answer's TTL (see `dns::learned`).
    pub domain_ttl_floor: Duration,
    /// Added to the life of every learned address.
    pub domain_ttl_grace: Duration,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub max_flows: u32,
    pub max_hosts: u32,
    pub mark_mask: u32,
    pub table_base: u32,
    pub rule_priority: u32,
    pub all_down: AllDown,
    pub failback: Failback,
    /// Command run (via `sh -c`) on every WAN state change.
    pub on_change: Option<String>,
    pub hook_timeout: Duration,
    /// Where the read-only web listener (`/metrics`, status page, JSON API)
    /// listens; off when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// An HA pair's virtual gateway address (VRRP): this router is the
    /// active one while it holds the address, the standby otherwise.
    pub ha_address: Option<Ipv4Addr>,
    pub wans: Vec<Wan>,
    pub rules: Vec<Rule>,
    /// The text it was parsed from, to place errors found later.
    source: Source,
}

/// Where a config came from, to give errors found after parsing (an
/// interface that does not exist) their file and line. Not part of the
/// config's meaning: any two compare equal.
#[derive(Clone, Default)]
struct Source {
    file: Option<PathBuf>,
    text: std::sync::Arc<str>,
}

impl PartialEq for Source {
    fn eq(&self, _: &Source) -> bool {
        true
    }
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Source({:?})", self.file)
    }
}

impl Source {
    fn place(&self, e: ConfigError) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            ..e.locate(&self.text)
        }
    }
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

// ---------------------------------------------------------------------------
// Raw (serde) form: everything optional, validated into `Config`.

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(i64),
    Str(String),
}

// Each key is read on its own (`get`), so that a value of the wrong type is
// reported with its key path; unknown keys are reported by `check_keys`.
#[derive(Default)]
struct RawHealth {
    probe_targets: Option<Vec<String>>,
    probe_interval: Option<String>,
    probe_timeout: Option<String>,
    quorum: Option<i64>,
    down_after: Option<i64>,
    up_after: Option<i64>,
    hold_down: Option<String>,
    max_loss: Option<f64>,
    max_rtt: Option<String>,
    health_window: Option<i64>,
}

struct RawConfig {
    lan_interfaces: Option<Vec<String>>,
    sticky: Option<Sticky>,
    sticky_key: Option<StickyKey>,
    host_ttl: Option<String>,
    domain_ttl_floor: Option<String>,
    domain_ttl_grace: Option<String>,
    pin_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    max_flows: Option<i64>,
    max_hosts: Option<i64>,
    mark_mask: Option<IntOrString>,
    table_base: Option<i64>,
    rule_priority: Option<i64>,
    all_down: Option<AllDown>,
    failback: Option<Failback>,
    on_change: Option<String>,
    hook_timeout: Option<String>,
    metrics_listen: Option<String>,
    ha_address: Option<String>,
    health: RawHealth,
    wan: Vec<RawWan>,
    rule: Vec<RawRule>,
}

struct RawWan {
    name: Option<String>,
    interface: Option<String>,
    gateway: Option<String>,
    weight: Option<i64>,
    tier: Option<i64>,
    nat: Option<bool>,
    snat_address: Option<String>,
    id: Option<i64>,
    enabled: Option<bool>,
    gateway6: Option<String>,
    ipv6: Option<String>,
    prefix6: Option<String>,
    lan_prefix6: Option<String>,
    health: RawHealth,
}

struct RawRule {
    name: Option<String>,
    proto: Option<OneOrMany<String>>,
    src: Option<OneOrMany<String>>,
    dst: Option<OneOrMany<String>>,
    src_ports: Option<Vec<IntOrString>>,
    dst_ports: Option<Vec<IntOrString>>,
    lan_interface: Option<OneOrMany<String>>,
    domains: Option<OneOrMany<String>>,
    domains_file: Option<PathBuf>,
    wans: Option<Vec<String>>,
    balance: Option<Vec<String>>,
    main: Option<bool>,
}

const INT: &str = "an integer";
const BOOL: &str = "true or false";
const STRING: &str = "a string";
const DURATION: &str = "a duration such as \"5s\"";
const STRINGS: &str = "a string or a list of strings";
const WAN_NAMES: &str = "a list of WAN names";
const GATEWAY6: &str = "an IPv6 address or \"auto\"";
const IPV6_MODES: &str = "\"nat\", \"npt\" or \"off\"";
const PORTS: &str = "a list of ports and ranges such as [25, \"8000-8100\"]";

/// Reads key `k` of `table` (at `at`) as a `T`; a value of another type is
/// an error naming the key and what it must be.
fn get<T: serde::de::DeserializeOwned>(
    table: &toml::Table,
    at: &KeyPath,
    k: &str,
    expected: &str,
) -> Result<Option<T>, ConfigError> {
    let Some(v) = table.get(k) else {
        return Ok(None);
    };
    v.clone().try_into::<T>().map(Some).map_err(|e| {
        let msg = e.message().trim();
        let wrong_type = ["invalid type", "data did not match", "invalid length"]
            .iter()
            .any(|p| msg.starts_with(p));
        let reason = if wrong_type {
            let shown = match v {
                toml::Value::Table(_) => "a table".to_string(),
                v => v.to_string(),
            };
            format!("must be {expected}, not {shown}")
        } else {
            // An unknown enum variant: serde's message lists the choices.
            msg.to_string()
        };
        err(at.key(k), reason)
    })
}

impl RawHealth {
    fn read(t: &toml::Table, at: &KeyPath) -> Result<RawHealth, ConfigError> {
        Ok(RawHealth {
            probe_targets: get(
                t,
                at,
                "probe_targets",
                "a list of targets such as [\"198.51.100.1\", \"tcp:203.0.113.9:443\"]",
            )?,
            probe_interval: get(t, at, "probe_interval", DURATION)?,
            probe_timeout: get(t, at, "probe_timeout", DURATION)?,
            quorum: get(t, at, "quorum", INT)?,
            down_after: get(t, at, "down_after", INT)?,
            up_after: get(t, at, "up_after", INT)?,
            hold_down: get(t, at, "hold_down", DURATION)?,
            max_loss: get(t, at, "max_loss", "a number (percent)")?,
            max_rtt: get(t, at, "max_rtt", DURATION)?,
            health_window: get(t, at, "health_window", INT)?,
        })
    }
}

/// The tables of a `[[name]]` list (checked to be tables by `parse`).
fn tables<'a>(top: &'a toml::Table, name: &str) -> Vec<&'a toml::Table> {
    match top.get(name) {
        Some(toml::Value::Array(items)) => items.iter().filter_map(|i| i.as_table()).collect(),
        _ => Vec::new(),
    }
}

/// `at` with the item's `name` shown beside its index, when it has one.
fn labelled(t: &toml::Table, at: KeyPath) -> KeyPath {
    match t.get("name").and_then(|n| n.as_str()) {
        Some(n) => at.label(n),
        None => at,
    }
}

impl RawConfig {
    fn read(t: &toml::Table) -> Result<RawConfig, ConfigError> {
        let top = KeyPath::default();
        let at = &top;
        let mut raw = RawConfig {
            lan_interfaces: get(t, at, "lan_interfaces", "a list of interface names")?,
            sticky: get(t, at, "sticky", "\"connection\" or \"host\"")?,
            sticky_key: get(t, at, "sticky_key", "\"mac\" or \"address\"")?,
            host_ttl: get(t, at, "host_ttl", DURATION)?,
            domain_ttl_floor: get(t, at, "domain_ttl_floor", DURATION)?,
            domain_ttl_grace: get(t, at, "domain_ttl_grace", DURATION)?,
            pin_dir: get(t, at, "pin_dir", "a path")?,
            state_dir: get(t, at, "state_dir", "a path")?,
            max_flows: get(t, at, "max_flows", INT)?,
            max_hosts: get(t, at, "max_hosts", INT)?,
            mark_mask: get(
                t,
                at,
                "mark_mask",
                "an integer or a string such as \"0x00ff0000\"",
            )?,
            table_base: get(t, at, "table_base", INT)?,
            rule_priority: get(t, at, "rule_priority", INT)?,
            all_down: get(t, at, "all_down", "\"last\" or \"unreachable\"")?,
            failback: get(t, at, "failback", "\"keep\" or \"reset\"")?,
            on_change: get(t, at, "on_change", "a command (a string)")?,
            hook_timeout: get(t, at, "hook_timeout", DURATION)?,
            metrics_listen: get(t, at, "metrics_listen", "an address and port (a string)")?,
            ha_address: get(t, at, "ha_address", "an IPv4 address (a string)")?,
            health: RawHealth::read(t, at)?,
            wan: Vec::new(),
            rule: Vec::new(),
        };
        for (i, w) in tables(t, "wan").into_iter().enumerate() {
            let at = &labelled(w, KeyPath::from("wan").index(i));
            raw.wan.push(RawWan {
                name: get(w, at, "name", STRING)?,
                interface: get(w, at, "interface", "an interface name")?,
                gateway: get(w, at, "gateway", "an IPv4 address or \"auto\"")?,
                weight: get(w, at, "weight", INT)?,
                tier: get(w, at, "tier", INT)?,
                nat: get(w, at, "nat", BOOL)?,
                snat_address: get(w, at, "snat_address", "an IPv4 address (a string)")?,
                id: get(w, at, "id", INT)?,
                enabled: get(w, at, "enabled", BOOL)?,
                gateway6: get(w, at, "gateway6", GATEWAY6)?,
                ipv6: get(w, at, "ipv6", IPV6_MODES)?,
                prefix6: get(
                    w,
                    at,
                    "prefix6",
                    "an IPv6 prefix such as \"2001:db8:1::/48\" or \"auto\"",
                )?,
                lan_prefix6: get(
                    w,
                    at,
                    "lan_prefix6",
                    "an IPv6 prefix such as \"fd00:1::/48\"",
                )?,
                health: RawHealth::read(w, at)?,
            });
        }
        for (i, r) in tables(t, "rule").into_iter().enumerate() {
            let at = &labelled(r, KeyPath::from("rule").index(i));
            raw.rule.push(RawRule {
                name: get(r, at, "name", STRING)?,
                proto: get(r, at, "proto", STRINGS)?,
                src: get(r, at, "src", STRINGS)?,
                dst: get(r, at, "dst", STRINGS)?,
                src_ports: get(r, at, "src_ports", PORTS)?,
                dst_ports: get(r, at, "dst_ports", PORTS)?,
                lan_interface: get(r, at, "lan_interface", STRINGS)?,
                domains: get(r, at, "domains", "a domain name or a list of them")?,
                domains_file: get(r, at, "domains_file", "a path")?,
                wans: get(r, at, "wans", WAN_NAMES)?,
                balance: get(r, at, "balance", WAN_NAMES)?,
                main: get(r, at, "main", BOOL)?,
            });
        }
        Ok(raw)
    }
}

// serde's `flatten` and `deny_unknown_fields` do not combine; the tables are
// therefore first read as generic TOML and unknown keys reported from here.
const TOP_KEYS: &[&str] = &[
    "lan_interfaces",
    "sticky",
    "sticky_key",
    "host_ttl",
    "domain_ttl_floor",
    "domain_ttl_grace",
    "pin_dir",
    "state_dir",
    "max_flows",
    "max_hosts",
    "mark_mask",
    "table_base",
    "rule_priority",
    "all_down",
    "failback",
    "on_change",
    "hook_timeout",
    "metrics_listen",
    "ha_address",
    "wan",
    "rule",
];
const HEALTH_KEYS: &[&str] = &[
    "probe_targets",
    "probe_interval",
    "probe_timeout",
    "quorum",
    "down_after",
    "up_after",
    "hold_down",
    "max_loss",
    "max_rtt",
    "health_window",
];
const WAN_KEYS: &[&str] = &[
    "name",
    "interface",
    "gateway",
    "weight",
    "tier",
    "nat",
    "snat_address",
    "id",
    "enabled",
    "gateway6",
    "ipv6",
    "prefix6",
    "lan_prefix6",
];
const RULE_KEYS: &[&str] = &[
    "name",
    "proto",
    "src",
    "dst",
    "src_ports",
    "dst_ports",
    "lan_interface",
    "domains",
    "domains_file",
    "wans",
    "balance",
    "main",
];

fn check_keys(table: &toml::Table, allowed: &[&[&str]], at: &KeyPath) -> Result<(), ConfigError> {
    for k in table.keys() {
        if !allowed.iter().any(|set| set.contains(&k.as_str())) {
            let mut all: Vec<&str> = allowed.iter().flat_map(|s| s.iter().copied()).collect();
            all.sort_unstable();
            let key = at.key(k);
            let hint = closest(k, &all)
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default();
            return Err(err(key, format!("unknown key{hint}")));
        }
    }
    Ok(())
}

/// The allowed key nearest to a misspelt one, if it is close.
fn closest<'a>(k: &str, candidates: &[&'a str]) -> Option<&'a str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                let sub = prev[j] + usize::from(ca != *cb);
                cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
            }
            prev = cur;
        }
        prev[b.len()]
    }
    candidates
        .iter()
        .map(|c| (distance(k, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, c)| c)
}

fn duration(key: impl Into<KeyPath>, s: &str) -> Result<Duration, ConfigError> {
    let key = key.into();
    humantime::parse_duration(s).map_err(|e| {
        err(
            key,
            format!("`{s}` is not a duration ({e}); write e.g. \"200ms\", \"5s\", \"10m\""),
        )
    })
}

/// An `ADDRESS:PORT` to listen on, IPv4 or IPv6 (`[::1]:9849`).
fn listen_addr(key: impl Into<KeyPath>, s: &str) -> Result<SocketAddr, ConfigError> {
    let key: KeyPath = key.into();
    let a: SocketAddr = s.parse().map_err(|_| {
        err(
            key.clone(),
            format!(
                "`{s}` is not an address and port: write e.g. \"127.0.0.1:9849\" or \"[::1]:9849\""
            ),
        )
    })?;
    if a.port() == 0 {
        return Err(err(key, format!("`{s}`: port 0 is not a fixed port")));
    }
    Ok(a)
}

/// A WAN's `gateway6`, `ipv6`, `prefix6` and `lan_prefix6`, validated
/// together: `ipv6` defaults to "nat" with a `gateway6` and "off" without;
/// "nat" and "npt" need a `gateway6`; "npt" needs both prefixes, of the
/// same length; the prefixes are refused with another mode.
fn ipv6_settings(w: &RawWan, at: &KeyPath) -> Result<(Option<Gateway6>, Ipv6Mode), ConfigError> {
    let gateway6 = match w.gateway6.as_deref() {
        None => None,
        Some("auto") => Some(Gateway6::Auto),
        Some(s) => {
            let key = at.key("gateway6");
            let a: Ipv6Addr = s
                .parse()
                .map_err(|_| err(key.clone(), format!("`{s}` is not {GATEWAY6}")))?;
            if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                return Err(err(key, format!("`{a}` cannot be a gateway")));
            }
            Some(Gateway6::Fixed(a))
        }
    };
    let prefix = |k: &str, s: &str| -> Result<Ipv6Net, ConfigError> {
        let net: Ipv6Net = s.parse().map_err(|_| {
            err(
                at.key(k),
                format!("`{s}` is not an IPv6 prefix (ADDRESS/LENGTH)"),
            )
        })?;
        if net.prefix_len() == 0 || net.prefix_len() > 64 {
            return Err(err(
                at.key(k),
                format!(
                    "`{s}`: the prefix length must be 1 to 64 (the interface identifier is kept)"
                ),
            ));
        }
        if net != net.trunc() {
            return Err(err(
                at.key(k),
                format!(
                    "`{s}` has bits set after the prefix length: write `{}`",
                    net.trunc()
                ),
            ));
        }
        Ok(net)
    };
    let mode = w
        .ipv6
        .as_deref()
        .unwrap_or(if gateway6.is_some() { "nat" } else { "off" });
    if matches!(mode, "nat" | "npt") && gateway6.is_none() {
        return Err(err(
            at.key("ipv6"),
            format!("\"{mode}\" needs gateway6 (an IPv6 address or \"auto\")"),
        ));
    }
    let ipv6 = match mode {
        "off" => Ipv6Mode::Off,
        "nat" => Ipv6Mode::Nat,
        "npt" => {
            let lan_s = w.lan_prefix6.as_deref().ok_or_else(|| {
                err(
                    at.key("lan_prefix6"),
                    "missing: ipv6 = \"npt\" maps the LAN prefix onto prefix6",
                )
            })?;
            let lan_prefix = prefix("lan_prefix6", lan_s)?;
            let prefix = match w.prefix6.as_deref() {
                None => {
                    return Err(err(
                        at.key("prefix6"),
                        "missing: ipv6 = \"npt\" needs the WAN's prefix (a prefix or \"auto\")",
                    ))
                }
                Some("auto") => Prefix6::Auto,
                Some(s) => {
                    let p = prefix("prefix6", s)?;
                    if p.prefix_len() != lan_prefix.prefix_len() {
                        return Err(err(
                            at.key("prefix6"),
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
            Ipv6Mode::Npt { prefix, lan_prefix }
        }
        other => {
            return Err(err(
                at.key("ipv6"),
                format!("`{other}` is not {IPV6_MODES}"),
            ))
        }
    };
    if !matches!(ipv6, Ipv6Mode::Npt { .. }) {
        for (k, v) in [("prefix6", &w.prefix6), ("lan_prefix6", &w.lan_prefix6)] {
            if v.is_some() {
                return Err(err(at.key(k), "is used only with ipv6 = \"npt\""));
            }
        }
    }
    Ok((gateway6, ipv6))
}

fn int_in(key: impl Into<KeyPath>, v: i64, lo: i64, hi: i64) -> Result<i64, ConfigError> {
    if v < lo || v > hi {
        Err(err(key, format!("{v} is out of range {lo}..={hi}")))
    } else {
        Ok(v)
    }
}

fn valid_ifname(key: impl Into<KeyPath>, name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.contains(char::is_whitespace)
    {
        return Err(err(
            key,
            format!(
                "`{name}` is not a valid interface name (1 to 15 characters, no '/' or spaces)"
            ),
        ));
    }
    Ok(())
}

fn parse_ports(
    key: impl Into<KeyPath>,
    items: Vec<IntOrString>,
) -> Result<Vec<PortRange>, ConfigError> {
    let key = &key.into();
    let port = |s: &str| -> Result<u16, ConfigError> {
        match s.trim().parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
            _ => Err(err(key, format!("`{s}` is not a port (1..=65535)"))),
        }
    };
    let mut out = Vec::new();
    for item in items {
        match item {
            IntOrString::Int(p) => {
                let p = int_in(key, p, 1, 65535)? as u16;
                out.push(PortRange { first: p, last: p });
            }
            IntOrString::Str(s) => {
                let r = match s.split_once('-') {
                    Some((a, b)) => PortRange {
                        first: port(a)?,
                        last: port(b)?,
                    },
                    None => {
                        let p = port(&s)?;
                        PortRange { first: p, last: p }
                    }
                };
                if r.first > r.last {
                    return Err(err(key, format!("range `{s}` is reversed")));
                }
                out.push(r);
            }
        }
    }
    if out.is_empty() {
        return Err(err(key, "is empty; leave the key out to match any port"));
    }
    Ok(out)
}

fn parse_nets(key: impl Into<KeyPath>, items: Vec<String>) -> Result<Vec<IpNet>, ConfigError> {
    let key = &key.into();
    if items.is_empty() {
        return Err(err(key, "is empty; leave the key out to match any address"));
    }
    items
        .iter()
        .map(|s| {
            if let Ok(n) = s.parse::<IpNet>() {
                if n.network() != n.addr() {
                    return Err(err(
                        key,
                        format!("`{s}` has host bits set; did you mean `{}`?", n.trunc()),
                    ));
                }
                return Ok(n);
            }
            s.parse::<std::net::IpAddr>()
                .map(IpNet::from)
                .map_err(|_| err(key, format!("`{s}` is not an IP address or CIDR")))
        })
        .collect()
}

/// The names of a rule's `domains` list, normalised, each once.
fn parse_domains(
    at: &KeyPath,
    items: Vec<String>,
    out: &mut Vec<String>,
    seen: &mut HashSet<String>,
) -> Result<(), ConfigError> {
    let key = at.key("domains");
    if items.is_empty() {
        return Err(err(key, "is empty; leave the key out to match any name"));
    }
    for (j, item) in items.iter().enumerate() {
        let name = config_name(item).map_err(|e| err(key.index(j), e.0))?;
        if seen.insert(name.clone()) {
            out.push(name);
        }
    }
    Ok(())
}

/// Largest domains file read (about 8 million names of 16 characters).
const MAX_DOMAINS_FILE: u64 = 128 << 20;

/// Reads a domains file: one name per line, `#` starts a comment, blank
/// lines are skipped. An error names the file and its line.
fn read_domains_file(
    path: &Path,
    out: &mut Vec<String>,
    seen: &mut HashSet<String>,
) -> Result<(), String> {
    let at = path.display();
    if !path.is_absolute() {
        return Err(format!("`{at}` must be an absolute path"));
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {at}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{at} is not a regular file"));
    }
    if meta.len() > MAX_DOMAINS_FILE {
        return Err(format!(
            "{at} is {} bytes; at most {MAX_DOMAINS_FILE} are read",
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {at}: {e}"))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        let bad = e.valid_up_to();
        format!(
            "{at}:{}: not UTF-8 text: byte {bad} (0x{:02x}) is not valid UTF-8",
            line_of(&bytes, bad),
            bytes[bad]
        )
    })?;
    let mut listed = 0;
    for (i, line) in text.lines().enumerate() {
        let entry = line.split_once('#').map_or(line, |(e, _)| e).trim();
        if entry.is_empty() {
            continue;
        }
        if entry.contains(char::is_whitespace) {
            return Err(format!(
                "{at}:{}: \"{entry}\": write one name per line",
                i + 1
            ));
        }
        let name = config_name(entry).map_err(|e| format!("{at}:{}: {e}", i + 1))?;
        listed += 1;
        if seen.insert(name.clone()) {
            out.push(name);
        }
    }
    if listed == 0 {
        return Err(format!(
            "{at} lists no domain names (one per line; `#` starts a comment)"
        ));
    }
    Ok(())
}

struct HealthDefaults<'a> {
    top: &'a RawHealth,
}

impl HealthDefaults<'_> {
    fn resolve(&self, wan: &RawHealth, at: &KeyPath) -> Result<HealthConfig, ConfigError> {
        // A WAN's own key wins over the top-level default.
        macro_rules! pick {
            ($f:ident) => {
                match (&wan.$f, &self.top.$f) {
                    (Some(v), _) => Some((v.clone(), at.key(stringify!($f)))),
                    (None, Some(v)) => Some((v.clone(), KeyPath::from(stringify!($f)))),
                    (None, None) => None,
                }
            };
        }
        let targets = match pick!(probe_targets) {
            Some((list, key)) => {
                if list.is_empty() {
                    return Err(err(key, "is empty; list at least one target"));
                }
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                for t in &list {
                    let target: ProbeTarget = t.parse().map_err(|e| err(&key, e))?;
                    if !seen.insert(target.clone()) {
                        return Err(err(&key, format!("target `{t}` is listed twice")));
                    }
                    out.push(target);
                }
                out
            }
            None => {
                return Err(err(
                    at.key("probe_targets"),
                    "missing: list the addresses to probe through this WAN (per WAN, or at the top level for all WANs)",
                ))
            }
        };
        let dur = |v: Option<(String, KeyPath)>, d: Duration| -> Result<Duration, ConfigError> {
            match v {
                Some((s, key)) => {
                    let v = duration(&key, &s)?;
                    if v.is_zero() {
                        return Err(err(key, "must be greater than zero"));
                    }
                    Ok(v)
                }
                None => Ok(d),
            }
        };
        let interval = dur(pick!(probe_interval), DEFAULT_PROBE_INTERVAL)?;
        let timeout = dur(pick!(probe_timeout), DEFAULT_PROBE_TIMEOUT)?;
        let hold_down = match pick!(hold_down) {
            Some((s, key)) => duration(&key, &s)?,
            None => DEFAULT_HOLD_DOWN,
        };
        let int =
            |v: Option<(i64, KeyPath)>, d: i64, lo: i64, hi: i64| -> Result<i64, ConfigError> {
                match v {
                    Some((v, key)) => int_in(&key, v, lo, hi),
                    None => Ok(d),
                }
            };
        let quorum_raw = pick!(quorum);
        let quorum_key = quorum_raw
            .as_ref()
            .map(|(_, k)| k.clone())
            .unwrap_or_else(|| at.key("quorum"));
        let quorum = int(quorum_raw, DEFAULT_QUORUM as i64, 1, 64)? as usize;
        // The quorum applies to each family's targets, capped at their
        // number (see `HealthConfig::targets_of`).
        let v6 = targets
            .iter()
            .filter(|t| t.family() == Family::Ipv6)
            .count();
        let most = v6.max(targets.len() - v6);
        if quorum > most {
            return Err(err(
                quorum_key,
                format!(
                    "{quorum} is more than the {most} probe target(s) of one family (the quorum applies to the IPv4 and the IPv6 targets separately); the WAN could never be up",
                ),
            ));
        }
        let down_after = int(pick!(down_after), DEFAULT_DOWN_AFTER as i64, 1, 1000)? as u32;
        let up_after = int(pick!(up_after), DEFAULT_UP_AFTER as i64, 1, 1000)? as u32;
        let window = int(pick!(health_window), DEFAULT_WINDOW as i64, 2, 10_000)? as u32;
        let max_loss = match pick!(max_loss) {
            Some((v, key)) => {
                if !(0.0..=100.0).contains(&v) {
                    return Err(err(key, format!("{v} is not a percentage (0..=100)")));
                }
                Some(v)
            }
            None => None,
        };
        let max_rtt = match pick!(max_rtt) {
            Some((s, key)) => Some(duration(&key, &s)?),
            None => None,
        };
        Ok(HealthConfig {
            targets,
            interval,
            timeout,
            quorum,
            down_after,
            up_after,
            hold_down,
            max_loss,
            max_rtt,
            window,
        })
    }
}

impl Config {
    /// Reads and parses a config file; errors name the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let in_file = |e: ConfigError| ConfigError {
            file: Some(path.to_path_buf()),
            ..e
        };
        let bytes =
            std::fs::read(path).map_err(|e| in_file(err("", format!("cannot read it: {e}"))))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let bytes = e.as_bytes();
            in_file(ConfigError {
                line: Some(line_of(bytes, at)),
                ..err(
                    "",
                    format!(
                        "not UTF-8 text: byte {at} (0x{:02x}) is not valid UTF-8 (a binary file?)",
                        bytes[at]
                    ),
                )
            })
        })?;
        let mut c = Config::parse(&text).map_err(in_file)?;
        c.source.file = Some(path.to_path_buf());
        Ok(c)
    }

    /// Parses and validates config text. Does not look at the host. Errors
    /// carry the line (see [`ConfigError`]).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut c = Self::parse_unlocated(text).map_err(|e| e.locate(text))?;
        c.source = Source {
            file: None,
            text: text.into(),
        };
        Ok(c)
    }

    fn parse_unlocated(text: &str) -> Result<Config, ConfigError> {
        // toml_edit tells where a syntax error is.
        if let Err(e) = toml_edit::ImDocument::parse(text) {
            let start = e.span().map(|s| s.start.min(text.len()));
            let column = start.map(|at| {
                let line_start = text[..at].rfind('\n').map_or(0, |n| n + 1);
                format!(" at column {}", text[line_start..at].chars().count() + 1)
            });
            let message: Vec<&str> = e.message().lines().map(str::trim).collect();
            return Err(ConfigError {
                line: start.map(|at| line_of(text.as_bytes(), at)),
                ..err(
                    "",
                    format!(
                        "not valid TOML{}: {}",
                        column.unwrap_or_default(),
                        message.join("; ")
                    ),
                )
            });
        }
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            err("", format!("not valid TOML: {}", e.message().trim()))
        })?;
        check_keys(&table, &[TOP_KEYS, HEALTH_KEYS], &KeyPath::default())?;
        for (name, keys, extra) in [("wan", WAN_KEYS, HEALTH_KEYS), ("rule", RULE_KEYS, &[][..])] {
            match table.get(name) {
                None => {}
                Some(toml::Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        match item {
                            toml::Value::Table(t) => {
                                check_keys(t, &[keys, extra], &KeyPath::from(name).index(i))?
                            }
                            _ => {
                                return Err(err(
                                    KeyPath::from(name).index(i),
                                    format!("must be a table: write [[{name}]]"),
                                ))
                            }
                        }
                    }
                }
                Some(_) => {
                    return Err(err(
                        name,
                        format!("must be a list of tables: write [[{name}]]"),
                    ))
                }
            }
        }
        Self::validate(RawConfig::read(&table)?)
    }

    fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let lan_interfaces = raw.lan_interfaces.unwrap_or_default();
        if lan_interfaces.is_empty() {
            return Err(err(
                "lan_interfaces",
                "missing or empty: list the LAN-facing interfaces whose traffic mwan balances",
            ));
        }
        let mut seen = HashSet::new();
        for (i, l) in lan_interfaces.iter().enumerate() {
            let at = KeyPath::from("lan_interfaces").index(i);
            valid_ifname(&at, l)?;
            if !seen.insert(l.clone()) {
                return Err(err(at, format!("`{l}` is listed twice")));
            }
        }
        let host_ttl = match &raw.host_ttl {
            Some(s) => duration("host_ttl", s)?,
            None => DEFAULT_HOST_TTL,
        };
        if host_ttl.is_zero() {
            return Err(err("host_ttl", "must be greater than zero"));
        }
        let domain_ttl_floor = match &raw.domain_ttl_floor {
            Some(s) => duration("domain_ttl_floor", s)?,
            None => crate::dns::learned::TTL_FLOOR,
        };
        let domain_ttl_grace = match &raw.domain_ttl_grace {
            Some(s) => duration("domain_ttl_grace", s)?,
            None => crate::dns::learned::GRACE,
        };
        let pin_dir = raw
            .pin_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR));
        if !pin_dir.is_absolute() {
            return Err(err(
                "pin_dir",
                format!("`{}` must be an absolute path", pin_dir.display()),
            ));
        }
        let state_dir = raw
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            return Err(err(
                "state_dir",
                format!("`{}` must be an absolute path", state_dir.display()),
            ));
        }
        let max_flows = match raw.max_flows {
            Some(v) => int_in("max_flows", v, 1024, 64 << 20)? as u32,
            None => DEFAULT_MAX_FLOWS,
        };
        let max_hosts = match raw.max_hosts {
            Some(v) => int_in("max_hosts", v, 16, 16 << 20)? as u32,
            None => DEFAULT_MAX_HOSTS,
        };
        let mark_mask = match raw.mark_mask {
            None => DEFAULT_MARK_MASK,
            Some(v) => {
                let n = match v {
                    IntOrString::Int(i) => int_in("mark_mask", i, 1, u32::MAX as i64)? as u32,
                    IntOrString::Str(s) => {
                        let t = s.trim();
                        let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                            Some(h) => u32::from_str_radix(h, 16),
                            None => t.parse::<u32>(),
                        };
                        parsed.map_err(|_| {
                            err("mark_mask", format!("`{s}` is not a 32-bit number"))
                        })?
                    }
                };
                // The WAN number (id + 1) is stored at the mask's lowest bit.
                let capacity = (n >> n.trailing_zeros()) as u64;
                if n == 0 || (capacity & (capacity + 1)) != 0 {
                    return Err(err(
                        "mark_mask",
                        format!("{n:#x} must be one contiguous run of bits (such as 0x00ff0000)"),
                    ));
                }
                n
            }
        };
        let table_base = match raw.table_base {
            Some(v) => int_in("table_base", v, 1, 0xffff_0000)? as u32,
            None => DEFAULT_TABLE_BASE,
        };
        if (table_base..table_base + MAX_WANS + 1).any(|t| (253..=255).contains(&t)) {
            return Err(err(
                "table_base",
                format!("{table_base}: tables {table_base}..{} would include the kernel's tables 253-255", table_base + MAX_WANS),
            ));
        }
        let rule_priority = match raw.rule_priority {
            Some(v) => int_in("rule_priority", v, 1, 32000)? as u32,
            None => DEFAULT_RULE_PRIORITY,
        };
        let hook_timeout = match &raw.hook_timeout {
            Some(s) => duration("hook_timeout", s)?,
            None => DEFAULT_HOOK_TIMEOUT,
        };
        let metrics_listen = match &raw.metrics_listen {
            Some(s) => Some(listen_addr("metrics_listen", s)?),
            None => None,
        };
        let ha_address = match raw.ha_address.as_deref() {
            None => None,
            Some(s) => match s.parse::<Ipv4Addr>() {
                Ok(a) if !(a.is_unspecified() || a.is_broadcast() || a.is_multicast()) => Some(a),
                Ok(a) => {
                    return Err(err(
                        "ha_address",
                        format!("`{a}` cannot be a gateway address"),
                    ))
                }
                Err(_) => return Err(err("ha_address", format!("`{s}` is not an IPv4 address"))),
            },
        };

        if raw.wan.is_empty() {
            return Err(err(
                "wan",
                "no [[wan]] defined: mwan needs at least one WAN",
            ));
        }
        if raw.wan.len() as u32 > MAX_WANS {
            return Err(err(
                "wan",
                format!(
                    "{} WANs defined; at most {MAX_WANS} are supported",
                    raw.wan.len()
                ),
            ));
        }
        let mark_capacity = mark_mask >> mark_mask.trailing_zeros();
        if (raw.wan.len() as u32) > mark_capacity {
            return Err(err(
                "mark_mask",
                format!(
                    "{mark_mask:#x} can number only {mark_capacity} WANs, {} are defined",
                    raw.wan.len()
                ),
            ));
        }
        let defaults = HealthDefaults { top: &raw.health };
        let mut wans: Vec<Wan> = Vec::new();
        let mut names = HashSet::new();
        let mut ifaces: BTreeMap<String, String> = BTreeMap::new();
        let mut fixed_ids: BTreeMap<u8, String> = BTreeMap::new();
        for (i, w) in raw.wan.iter().enumerate() {
            let at = KeyPath::from("wan").index(i);
            let name = w
                .name
                .clone()
                .ok_or_else(|| err(at.key("name"), "missing"))?;
            if name.is_empty()
                || name.len() >= WAN_NAME_LEN
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                return Err(err(
                    at.key("name"),
                    format!(
                        "`{name}`: use 1 to {} letters, digits, '-', '_' or '.'",
                        WAN_NAME_LEN - 1
                    ),
                ));
            }
            let at = at.label(&name);
            if !names.insert(name.clone()) {
                return Err(err(at.key("name"), format!("duplicate WAN name `{name}`")));
            }
            let interface = w
                .interface
                .clone()
                .ok_or_else(|| err(at.key("interface"), "missing"))?;
            valid_ifname(at.key("interface"), &interface)?;
            if let Some(other) = ifaces.insert(interface.clone(), name.clone()) {
                return Err(err(
                    at.key("interface"),
                    format!("`{interface}` is already used by WAN `{other}`"),
                ));
            }
            if lan_interfaces.contains(&interface) {
                return Err(err(
                    at.key("interface"),
                    format!("`{interface}` is also listed in lan_interfaces"),
                ));
            }
            let gateway = match w.gateway.as_deref() {
                // An uplink with only IPv6.
                None if w.gateway6.is_some() => Gateway::None,
                None => {
                    return Err(err(
                        at.key("gateway"),
                        "missing: an IPv4 address or \"auto\" (an uplink without IPv4 sets gateway6 alone)",
                    ))
                }
                Some("auto") => Gateway::Auto,
                Some(s) => Gateway::Fixed(s.parse().map_err(|_| {
                    err(
                        at.key("gateway"),
                        format!("`{s}` is not an IPv4 address or \"auto\""),
                    )
                })?),
            };
            if let Gateway::Fixed(a) = gateway {
                if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
                    return Err(err(at.key("gateway"), format!("`{a}` cannot be a gateway")));
                }
            }
            let weight = int_in(at.key("weight"), w.weight.unwrap_or(1), 1, 1000)? as u32;
            let tier = int_in(at.key("tier"), w.tier.unwrap_or(1), 1, 16)? as u32;
            let health = defaults.resolve(&w.health, &at)?;
            if gateway == Gateway::None
                && !health.targets.iter().any(|t| t.family() == Family::Ipv6)
            {
                return Err(err(
                    at.key("probe_targets"),
                    "this uplink has no IPv4 (no gateway): list IPv6 probe targets to judge it by",
                ));
            }
            let id = match w.id {
                None => None,
                Some(v) => {
                    let max = i64::from(mark_capacity.min(MAX_WANS)) - 1;
                    let id = int_in(at.key("id"), v, 0, max)? as u8;
                    if let Some(other) = fixed_ids.insert(id, name.clone()) {
                        return Err(err(
                            at.key("id"),
                            format!("id {id} is already WAN `{other}`'s"),
                        ));
                    }
                    Some(id)
                }
            };
            let nat = w.nat.unwrap_or(true);
            let snat_address = match w.snat_address.as_deref() {
                None => None,
                Some(s) => {
                    let key = at.key("snat_address");
                    let a: Ipv4Addr = s
                        .parse()
                        .map_err(|_| err(key.clone(), format!("`{s}` is not an IPv4 address")))?;
                    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback()
                    {
                        return Err(err(key, format!("`{a}` cannot be a source address")));
                    }
                    if !nat {
                        return Err(err(key, "needs `nat = true` (it replaces masquerading)"));
                    }
                    Some(a)
                }
            };
            let (gateway6, ipv6) = ipv6_settings(w, &at)?;
            wans.push(Wan {
                name,
                interface,
                gateway,
                weight,
                tier,
                nat,
                snat_address,
                id,
                enabled: w.enabled.unwrap_or(true),
                health,
                gateway6,
                ipv6,
            });
        }

        if raw.rule.len() as u32 > MAX_RULES {
            return Err(err(
                "rule",
                format!(
                    "{} rules defined; at most {MAX_RULES} are supported",
                    raw.rule.len()
                ),
            ));
        }
        let mut rules = Vec::new();
        let mut rule_names = HashSet::new();
        for (i, r) in raw.rule.into_iter().enumerate() {
            let at = match &r.name {
                Some(n) => KeyPath::from("rule").index(i).label(n),
                None => KeyPath::from("rule").index(i),
            };
            // A rule's name is its identity across reloads (its flows
            // re-choose with it): names must be unique.
            let name = r.name.clone().unwrap_or_else(|| format!("rule{i}"));
            if !rule_names.insert(name.clone()) {
                return Err(err(at.key("name"), format!("duplicate rule name `{name}`")));
            }
            let wan_list = |key: &str, list: Vec<String>| -> Result<Vec<String>, ConfigError> {
                if list.is_empty() {
                    return Err(err(at.key(key), "is empty: name at least one WAN"));
                }
                let mut seen = HashSet::new();
                for n in &list {
                    if !names.contains(n) {
                        return Err(err(at.key(key), format!("no WAN is named `{n}`")));
                    }
                    if !seen.insert(n) {
                        return Err(err(at.key(key), format!("`{n}` is listed twice")));
                    }
                }
                Ok(list)
            };
            let action = match (r.wans, r.balance, r.main) {
                (Some(w), None, None | Some(false)) => Action::Ordered(wan_list("wans", w)?),
                (None, Some(b), None | Some(false)) => Action::Balance(wan_list("balance", b)?),
                (None, None, Some(true)) => Action::Main,
                (None, None, _) => {
                    return Err(err(
                        &at,
                        "has no action: set one of wans = [..], balance = [..] or main = true",
                    ))
                }
                _ => {
                    return Err(err(
                        &at,
                        "has more than one action: set only one of wans, balance and main",
                    ))
                }
            };
            let mut protos = Vec::new();
            if let Some(p) = r.proto {
                for s in p.into_vec() {
                    let proto = match s.to_ascii_lowercase().as_str() {
                        "tcp" => Proto::Tcp,
                        "udp" => Proto::Udp,
                        "icmp" => Proto::Icmp,
                        _ => {
                            return Err(err(
                                at.key("proto"),
                                format!("`{s}`: use tcp, udp or icmp"),
                            ))
                        }
                    };
                    if !protos.contains(&proto) {
                        protos.push(proto);
                    }
                }
            }
            let src = match r.src {
                Some(v) => parse_nets(at.key("src"), v.into_vec())?,
                None => vec![],
            };
            let dst = match r.dst {
                Some(v) => parse_nets(at.key("dst"), v.into_vec())?,
                None => vec![],
            };
            let src_ports = match r.src_ports {
                Some(v) => parse_ports(at.key("src_ports"), v)?,
                None => vec![],
            };
            let dst_ports = match r.dst_ports {
                Some(v) => parse_ports(at.key("dst_ports"), v)?,
                None => vec![],
            };
            if (!src_ports.is_empty() || !dst_ports.is_empty())
                && !protos.is_empty()
                && protos.iter().all(|p| *p == Proto::Icmp)
            {
                return Err(err(&at, "matches ports but only icmp, which has none"));
            }
            let lan_ifaces = r.lan_interface.map(|v| v.into_vec()).unwrap_or_default();
            for l in &lan_ifaces {
                if !lan_interfaces.contains(l) {
                    return Err(err(
                        at.key("lan_interface"),
                        format!("`{l}` is not one of lan_interfaces"),
                    ));
                }
            }
            let mut domains = Vec::new();
            let mut seen_domains = HashSet::new();
            if let Some(items) = r.domains {
                parse_domains(&at, items.into_vec(), &mut domains, &mut seen_domains)?;
            }
            if let Some(path) = &r.domains_file {
                read_domains_file(path, &mut domains, &mut seen_domains)
                    .map_err(|e| err(at.key("domains_file"), e))?;
            }
            rules.push(Rule {
                name,
                protos,
                src,
                dst,
                src_ports,
                dst_ports,
                lan_interfaces: lan_ifaces,
                domains,
                domains_file: r.domains_file,
                action,
            });
        }

        Ok(Config {
            lan_interfaces,
            sticky: raw.sticky.unwrap_or_default(),
            sticky_key: raw.sticky_key.unwrap_or_default(),
            host_ttl,
            domain_ttl_floor,
            domain_ttl_grace,
            pin_dir,
            state_dir,
            max_flows,
            max_hosts,
            mark_mask,
            table_base,
            rule_priority,
            all_down: raw.all_down.unwrap_or_default(),
            failback: raw.failback.unwrap_or_default(),
            on_change: raw.on_change,
            hook_timeout,
            metrics_listen,
            ha_address,
            wans,
            rules,
            source: Source::default(),
        })
    }

    /// Checks the config against the host: every LAN interface must exist;
    /// a WAN interface must exist unless its gateway is `auto` (a PPP or
    /// DHCP link that may appear later). `exists` answers whether an
    /// interface exists.
    pub fn check_system(&self, exists: &dyn Fn(&str) -> bool) -> Result<Vec<String>, ConfigError> {
        self.check_system_unlocated(exists)
            .map_err(|e| self.source.place(e))
    }

    fn check_system_unlocated(
        &self,
        exists: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<String>, ConfigError> {
        let mut warnings = Vec::new();
        for (i, l) in self.lan_interfaces.iter().enumerate() {
            if !exists(l) {
                return Err(err(
                    KeyPath::from("lan_interfaces").index(i),
                    format!("interface `{l}` does not exist"),
                ));
            }
        }
        for (i, w) in self.wans.iter().enumerate() {
            if !exists(&w.interface) {
                if w.gateway == Gateway::Auto {
                    warnings.push(format!(
                        "wan[{i}] ({}): interface `{}` does not exist yet; the WAN stays down until it appears",
                        w.name, w.interface
                    ));
                } else {
                    return Err(err(
                        KeyPath::from("wan").index(i).label(&w.name).key("interface"),
                        format!(
                            "interface `{}` does not exist (set gateway = \"auto\" for a link that appears later, such as PPP)",
                            w.interface
                        ),
                    ));
                }
            }
        }
        warnings.extend(self.ha_warnings());
        Ok(warnings)
    }

    /// The rules' domain names, for finding the first rule a name belongs to
    /// (rule indexes are those of `rules`).
    pub fn domain_matcher(&self) -> DomainMatcher {
        DomainMatcher::from_rules(self.rules.iter().map(|r| &r.domains))
    }

    /// An HA pair's WANs without a shared source address: their connections
    /// leave from this router's own address, which the other router cannot
    /// take over (docs/HA.md).
    fn ha_warnings(&self) -> Vec<String> {
        if self.ha_address.is_none() {
            return Vec::new();
        }
        let mut warnings = Vec::new();
        for (i, w) in self.wans.iter().enumerate() {
            if w.nat && w.snat_address.is_none() {
                warnings.push(format!(
                    "wan[{i}] ({}): no snat_address: with ha_address set, its connections are masqueraded to this router's own address and will not survive a takeover by the other router",
                    w.name
                ));
            }
            if w.id.is_none() {
                warnings.push(format!(
                    "wan[{i}] ({}): no id: with ha_address set, give it a fixed id, the same on both routers, so that both record its connections under the same mark",
                    w.name
                ));
            }
        }
        warnings
    }

    pub fn wan(&self, name: &str) -> Option<&Wan> {
        self.wans.iter().find(|w| w.name == name)
    }

    /// The control socket of the daemon running this config.
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.join("mwan.sock")
    }

    /// Where the daemon records what it changed on the host (so a later
    /// instance can restore it).
    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }

    /// The first bit of `mark_mask`: WAN id `i` uses mark `(i + 1) << shift`.
    pub fn mark_shift(&self) -> u32 {
        self.mark_mask.trailing_zeros()
    }

    pub fn wan_mark(&self, id: u8) -> u32 {
        ((id as u32) + 1) << self.mark_shift()
    }

    /// Whether a rule steers by domain name (the DNS relay is needed).
    pub fn has_domain_rules(&self) -> bool {
        self.rules.iter().any(|r| !r.domains.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
lan_interfaces = ["lan0"]
probe_targets = ["198.51.100.1", "tcp:203.0.113.9:443"]

[[wan]]
name = "isp1"
interface = "wan1"
gateway = "100.64.1.1"
weight = 3

[[wan]]
name = "isp2"
interface = "wan2"
gateway = "auto"
"#;

    fn parse_err(text: &str) -> ConfigError {
        Config::parse(text).expect_err("config should be rejected")
    }

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
    fn minimal_config_and_defaults() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.lan_interfaces, vec!["lan0"]);
        assert_eq!(c.sticky, Sticky::Connection);
        assert_eq!(c.sticky_key, StickyKey::Mac);
        assert_eq!(c.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(c.max_flows, DEFAULT_MAX_FLOWS);
        assert_eq!(c.wans.len(), 2);
        let w = &c.wans[0];
        assert_eq!(w.weight, 3);
        assert_eq!(w.tier, 1);
        assert!(w.nat && w.enabled);
        assert_eq!(w.gateway, Gateway::Fixed("100.64.1.1".parse().unwrap()));
        assert_eq!(c.wans[1].gateway, Gateway::Auto);
        assert_eq!(w.health.interval, DEFAULT_PROBE_INTERVAL);
        assert_eq!(w.health.down_after, DEFAULT_DOWN_AFTER);
        assert_eq!(
            w.health.targets,
            vec![
                ProbeTarget::Icmp("198.51.100.1".parse().unwrap()),
                ProbeTarget::Tcp("203.0.113.9:443".parse().unwrap())
            ]
        );
        assert_eq!(c.wan_mark(0), 0x0001_0000);
        assert_eq!(c.wan_mark(1), 0x0002_0000);
    }

    #[test]
    fn check_warns_of_pair_wans_without_a_shared_address() {
        let c = Config::parse(&format!("ha_address = \"192.0.2.1\"\n{MIN}")).unwrap();
        let w = c.check_system(&|_| true).unwrap();
        assert_eq!(w.len(), 4, "{w:?}");
        assert!(w[0].starts_with("wan[0] (isp1): no snat_address"), "{w:?}");
        assert!(w[1].starts_with("wan[0] (isp1): no id"), "{w:?}");
        let text = MIN.replacen(
            "weight = 3",
            "weight = 3\nsnat_address = \"100.64.1.2\"\nid = 0",
            1,
        );
        let c = Config::parse(&format!("ha_address = \"192.0.2.1\"\n{text}")).unwrap();
        let w = c.check_system(&|_| true).unwrap();
        assert!(
            w.len() == 2 && w.iter().all(|w| w.starts_with("wan[1] (isp2)")),
            "{w:?}"
        );
        // A single router has nothing to warn about.
        assert!(Config::parse(MIN)
            .unwrap()
            .check_system(&|_| true)
            .unwrap()
            .is_empty());
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

    #[test]
    fn defaults_detect_within_a_second() {
        // Worst case: the failure starts just after a round was answered;
        // down_after rounds must then be sent and time out.
        let worst = DEFAULT_PROBE_INTERVAL * DEFAULT_DOWN_AFTER + DEFAULT_PROBE_TIMEOUT;
        assert!(worst < Duration::from_secs(1), "{worst:?}");
        assert!(
            DEFAULT_DOWN_AFTER >= 2,
            "a single lost probe must not take a WAN down"
        );
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

    #[test]
    fn unknown_keys_are_named_with_a_suggestion() {
        let e = parse_err(&MIN.replace("weight = 3", "wieght = 3"));
        assert_eq!(e.key, "wan[0].wieght");
        assert!(e.reason.contains("did you mean `weight`"), "{e}");
        let e = parse_err(&format!("stiky = \"host\"\n{MIN}"));
        assert_eq!(e.key, "stiky");
        let e = parse_err(&format!("{MIN}\n[[rule]]\nport = 25\nwans = [\"isp1\"]\n"));
        assert_eq!(e.key, "rule[0].port");
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

    /// Every kind of error names the line (MIN's lines: 2 lan_interfaces,
    /// 3 probe_targets, 5 and 11 the `[[wan]]` headers, 6-9 isp1's keys,
    /// 12-14 isp2's) and the key, with the WAN's or rule's index and name.
    #[test]
    fn errors_name_the_line_and_the_key() {
        const RULE: &str = "\n[[rule]]\nname = \"mail\"\ndst_ports = [25]\nwans = [\"isp1\"]\n";
        let cases: &[(&str, &str, &str)] = &[
            // TOML syntax.
            (
                "weight = 3",
                "weight = = 3",
                "line 9: not valid TOML at column 10: invalid string; expected `\"`, `'`",
            ),
            (
                "name = \"isp2\"",
                "name = \"isp2",
                "line 12: not valid TOML at column 13: invalid basic string",
            ),
            (
                "weight = 3",
                "weight = 3\nweight = 4",
                "line 10: not valid TOML at column 1: duplicate key `weight` in table `wan`",
            ),
            // Unknown keys.
            (
                "weight = 3",
                "wieght = 3",
                "line 9: wan[0].wieght: unknown key (did you mean `weight`?)",
            ),
            (
                "probe_targets",
                "stiky = \"host\"\nprobe_targets",
                "line 3: stiky: unknown key (did you mean `sticky`?)",
            ),
            // Types.
            (
                "gateway = \"auto\"",
                "gateway = \"auto\"\nweight = \"3\"",
                "line 15: wan[1] (isp2).weight: must be an integer, not \"3\"",
            ),
            (
                "lan_interfaces = [\"lan0\"]",
                "lan_interfaces = \"lan0\"",
                "line 2: lan_interfaces: must be a list of interface names, not \"lan0\"",
            ),
            (
                "weight = 3",
                "weight = 3\nnat = \"no\"",
                "line 10: wan[0] (isp1).nat: must be true or false, not \"no\"",
            ),
            (
                "probe_targets",
                "sticky = \"hosts\"\nprobe_targets",
                "line 3: sticky: unknown variant `hosts`, expected `connection` or `host`",
            ),
            (
                "probe_targets",
                "sticky_key = \"ip\"\nprobe_targets",
                "line 3: sticky_key: unknown variant `ip`, expected `mac` or `address`",
            ),
            // Values.
            (
                "weight = 3",
                "weight = 0",
                "line 9: wan[0] (isp1).weight: 0 is out of range 1..=1000",
            ),
            (
                "name = \"isp2\"",
                "name = \"isp1\"",
                "line 12: wan[1] (isp1).name: duplicate WAN name `isp1`",
            ),
            (
                "gateway = \"100.64.1.1\"",
                "gateway = \"100.64.1\"",
                "line 8: wan[0] (isp1).gateway: `100.64.1` is not an IPv4 address or \"auto\"",
            ),
            (
                "weight = 3",
                "weight = 3\nsnat_address = \"100.64.1\"",
                "line 10: wan[0] (isp1).snat_address: `100.64.1` is not an IPv4 address",
            ),
            (
                "weight = 3",
                "weight = 3\nnat = false\nsnat_address = \"100.64.1.2\"",
                "line 11: wan[0] (isp1).snat_address: needs `nat = true` (it replaces masquerading)",
            ),
            (
                "interface = \"wan2\"",
                "interface = \"wan1\"",
                "line 13: wan[1] (isp2).interface: `wan1` is already used by WAN `isp1`",
            ),
            (
                "lan_interfaces = [\"lan0\"]",
                "lan_interfaces = [\n  \"lan0\",\n  \"lan0\",\n]",
                "line 4: lan_interfaces[1]: `lan0` is listed twice",
            ),
            (
                "weight = 3",
                "weight = 3\nprobe_interval = \"fast\"",
                "line 10: wan[0] (isp1).probe_interval: `fast` is not a duration",
            ),
            (
                "probe_targets = [\"198.51.100.1\", \"tcp:203.0.113.9:443\"]",
                "probe_targets = [\"198.51.100.1\", \"198.51.100.1\"]",
                "line 3: probe_targets: target `198.51.100.1` is listed twice",
            ),
            (
                "probe_targets",
                "mark_mask = \"zz\"\nprobe_targets",
                "line 3: mark_mask: `zz` is not a 32-bit number",
            ),
            // IPv6 settings (wan[0]'s `weight = 3` is line 9).
            (
                "weight = 3",
                "weight = 3\ngateway6 = \"fe80::1::2\"",
                "line 10: wan[0] (isp1).gateway6: `fe80::1::2` is not an IPv6 address or \"auto\"",
            ),
            (
                "weight = 3",
                "weight = 3\ngateway6 = \"ff02::2\"",
                "line 10: wan[0] (isp1).gateway6: `ff02::2` cannot be a gateway",
            ),
            (
                "weight = 3",
                "weight = 3\ngateway6 = \"100.64.1.1\"",
                "line 10: wan[0] (isp1).gateway6: `100.64.1.1` is not an IPv6 address or \"auto\"",
            ),
            (
                "weight = 3",
                "weight = 3\ngateway6 = \"auto\"\nipv6 = \"nat66\"",
                "line 11: wan[0] (isp1).ipv6: `nat66` is not \"nat\", \"npt\" or \"off\"",
            ),
            (
                "weight = 3",
                "weight = 3\nipv6 = \"nat\"",
                "line 10: wan[0] (isp1).ipv6: \"nat\" needs gateway6 (an IPv6 address or \"auto\")",
            ),
            (
                "weight = 3",
                "weight = 3\ngateway6 = \"auto\"\nipv6 = \"npt\"\nprefix6 = \"auto\"",
                "line 5: wan[0] (isp1).lan_prefix6: missing: ipv6 = \"npt\" maps the LAN prefix onto prefix6",
            ),
            (
                "weight = 3",
                "weight = 3\ngateway6 = \"auto\"\nipv6 = \"npt\"\nlan_prefix6 = \"fd00:1::/48\"",
                "line 5: wan[0] (isp1).prefix6: missing: ipv6 = \"npt\" needs the WAN's prefix (a prefix or \"auto\")",
            ),
            (
                "weight = 3",
                "weight = 3\ngateway6 = \"auto\"\nipv6 = \"npt\"\nprefix6 = \"2001:db8:1::/56\"\nlan_prefix6 = \"fd00:1::/48\"",
                "line 12: wan[0] (isp1).prefix6: `2001:db8:1::/56` is a /56, lan_prefix6 `fd00:1::/48` a /48: NPT maps prefixes of the same length",
            ),
            (
                "weight = 3",
                "weight = 3\ngateway6 = \"auto\"\nipv6 = \"npt\"\nprefix6 = \"auto\"\nlan_prefix6 = \"fd00:1::1/64\"",
                "line 13: wan[0] (isp1).lan_prefix6: `fd00:1::1/64` has bits set after the prefix length: write `fd00:1::/64`",
            ),
            (
                "weight = 3",
                "weight = 3\ngateway6 = \"auto\"\nipv6 = \"npt\"\nprefix6 = \"2001:db8::/96\"\nlan_prefix6 = \"fd00::/96\"",
                "line 13: wan[0] (isp1).lan_prefix6: `fd00::/96`: the prefix length must be 1 to 64 (the interface identifier is kept)",
            ),
            (
                "weight = 3",
                "weight = 3\ngateway6 = \"auto\"\nprefix6 = \"2001:db8::/48\"",
                "line 11: wan[0] (isp1).prefix6: is used only with ipv6 = \"npt\"",
            ),
            (
                "weight = 3",
                "weight = 3\ngateway6 = \"auto\"\nipv6 = \"npt\"\nprefix6 = \"2001:db8:::/48\"\nlan_prefix6 = \"fd00::/48\"",
                "line 12: wan[0] (isp1).prefix6: `2001:db8:::/48` is not an IPv6 prefix (ADDRESS/LENGTH)",
            ),
            (
                "weight = 3",
                "weight = 3\ngateway6 = 6",
                "line 10: wan[0] (isp1).gateway6: must be an IPv6 address or \"auto\", not 6",
            ),
            // A missing key: the line of its table.
            (
                "gateway = \"auto\"",
                "",
                "line 11: wan[1] (isp2).gateway: missing: an IPv4 address or \"auto\" (an uplink without IPv4 sets gateway6 alone)",
            ),
            // An uplink without IPv4 is judged by IPv6 targets.
            (
                "gateway = \"auto\"",
                "gateway6 = \"auto\"",
                "line 11: wan[1] (isp2).probe_targets: this uplink has no IPv4 (no gateway): list IPv6 probe targets to judge it by",
            ),
            // Rules (lines 16 [[rule]], 17 name, 18 dst_ports, 19 wans).
            (
                "gateway = \"auto\"\n",
                &format!("gateway = \"auto\"\n{}", RULE.replace("isp1", "isp9")),
                "line 19: rule[0] (mail).wans: no WAN is named `isp9`",
            ),
            (
                "gateway = \"auto\"\n",
                &format!("gateway = \"auto\"\n{}", RULE.replace("[25]", "[70000]")),
                "line 18: rule[0] (mail).dst_ports: 70000 is out of range 1..=65535",
            ),
            (
                "gateway = \"auto\"\n",
                &format!(
                    "gateway = \"auto\"\n{}",
                    RULE.replace("wans = [\"isp1\"]", "")
                ),
                "line 16: rule[0] (mail): has no action",
            ),
            (
                "gateway = \"auto\"\n",
                &format!("gateway = \"auto\"\n{RULE}{RULE}"),
                "line 22: rule[1] (mail).name: duplicate rule name `mail`",
            ),
            (
                "gateway = \"auto\"\n",
                &format!("gateway = \"auto\"\n{}", RULE.replace("[25]", "25")),
                "line 18: rule[0] (mail).dst_ports: must be a list of ports",
            ),
        ];
        for (from, to, want) in cases {
            assert!(MIN.contains(from), "{from}");
            let text = MIN.replacen(from, to, 1);
            let e = parse_err(&text).to_string();
            assert!(e.starts_with(want), "{to:?}:\n got: {e}\nwant: {want}");
        }
        // Nothing in the text to point at.
        let e = parse_err("lan_interfaces = [\"lan0\"]\n");
        assert_eq!((e.line, e.key.as_str()), (None, "wan"));
    }

    #[test]
    fn errors_of_a_file_name_it() {
        let dir = std::env::temp_dir().join(format!("mwan-config-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("mwan.toml");
        let at = path.display();
        std::fs::write(&path, MIN.replace("weight = 3", "weight = 1001")).unwrap();
        assert_eq!(
            Config::load(&path).unwrap_err().to_string(),
            format!("{at}:9: wan[0] (isp1).weight: 1001 is out of range 1..=1000")
        );
        // Found after parsing: a missing interface.
        std::fs::write(&path, MIN).unwrap();
        let c = Config::load(&path).unwrap();
        let e = c.check_system(&|n| n != "wan1").unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{at}:7: wan[0] (isp1).interface: interface `wan1` does not exist"
            )),
            "{e}"
        );
        // Not text: the line and byte offset of the first bad byte.
        let mut bytes = MIN.as_bytes().to_vec();
        let offset = MIN.find("wan1").unwrap();
        bytes[offset] = 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            Config::load(&path).unwrap_err().to_string(),
            format!(
                "{at}:7: not UTF-8 text: byte {offset} (0xff) is not valid UTF-8 (a binary file?)"
            )
        );
        let e = Config::load(&dir.join("missing.toml")).unwrap_err();
        assert!(
            e.to_string().contains("missing.toml: cannot read it: "),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
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

    /// A scratch directory for one test, removed when dropped.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("mwan-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).unwrap();
            Scratch(dir)
        }
        fn write(&self, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).unwrap();
            p
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn domain_rule(body: &str) -> String {
        format!("{MIN}\n[[rule]]\nname = \"gov\"\n{body}\n")
    }

    #[test]
    fn domain_rules_parse_with_every_match_key_and_action() {
        let text = format!(
            r#"{MIN}
[[rule]]
name = "government via fibre"
domains = ["gov.br", "*.Edu.BR.", "blogspot.com", "www.gov.br", "gov.br."]
proto = "tcp"
dst_ports = [443]
src = "192.0.2.0/25"
lan_interface = "lan0"
wans = ["isp1", "isp2"]

[[rule]]
domains = "example.com"
balance = ["isp2"]

[[rule]]
domains = ["intranet.example"]
main = true
"#
        );
        let c = Config::parse(&text).unwrap();
        let r = &c.rules[0];
        assert_eq!(
            r.domains,
            ["gov.br", "edu.br", "blogspot.com", "www.gov.br"]
        );
        assert_eq!(r.domains_file, None);
        assert_eq!(r.protos, [Proto::Tcp]);
        assert_eq!(r.dst_ports.len(), 1);
        assert_eq!(r.src.len(), 1);
        assert_eq!(r.lan_interfaces, ["lan0"]);
        assert_eq!(c.rules[1].domains, ["example.com"]);
        assert_eq!(c.rules[1].action, Action::Balance(vec!["isp2".into()]));
        assert_eq!(c.rules[2].action, Action::Main);
        // Rules without domains have none.
        assert!(Config::parse(&format!(
            "{MIN}\n[[rule]]\ndst_ports = [25]\nwans = [\"isp1\"]\n"
        ))
        .unwrap()
        .rules[0]
            .domains
            .is_empty());
        let m = c.domain_matcher();
        assert_eq!(m.lookup("x.www.gov.br").map(|(r, _)| r), Some(0));
        assert_eq!(m.lookup("www.example.com").map(|(r, _)| r), Some(1));
        assert_eq!(m.lookup("intranet.example.").map(|(r, _)| r), Some(2));
        assert_eq!(m.lookup("example.org"), None);
    }

    #[test]
    fn bad_domains_name_the_line_and_the_item() {
        let cases: &[(&str, &str)] = &[
            (
                "domains = [\"gov.br\", \"foo..bar\"]\nwans = [\"isp1\"]",
                "line 18: rule[0] (gov).domains[1]: \"foo..bar\" is not a domain name: it has an empty label",
            ),
            (
                "domains = [\n  \"gov.br\",\n  \"bücher.de\",\n]\nwans = [\"isp1\"]",
                "line 20: rule[0] (gov).domains[1]: \"bücher.de\" is not a domain name: it is not ASCII; write internationalised names in their xn-- (punycode) form",
            ),
            (
                "domains = []\nwans = [\"isp1\"]",
                "line 18: rule[0] (gov).domains: is empty; leave the key out to match any name",
            ),
            (
                "domains = [1]\nwans = [\"isp1\"]",
                "line 18: rule[0] (gov).domains: must be a domain name or a list of them, not [1]",
            ),
            (
                "domains = [\"gov.br\"]",
                "line 16: rule[0] (gov): has no action",
            ),
            (
                "domain = [\"gov.br\"]\nwans = [\"isp1\"]",
                "line 18: rule[0].domain: unknown key (did you mean `domains`?)",
            ),
            (
                "domains_file = \"gov.list\"\nwans = [\"isp1\"]",
                "line 18: rule[0] (gov).domains_file: `gov.list` must be an absolute path",
            ),
        ];
        for (body, want) in cases {
            let e = parse_err(&domain_rule(body)).to_string();
            assert!(e.starts_with(want), "{body:?}:\n got: {e}\nwant: {want}");
        }
    }

    #[test]
    fn domains_files_are_read_and_errors_name_both_lines() {
        let dir = Scratch::new("domains");
        let list = dir.write(
            "gov.list",
            "# government\r\ngov.br\r\n\n  *.edu.br   # universities\nGOV.BR.\n\tblogspot.com\n",
        );
        let config = dir.write(
            "mwan.toml",
            domain_rule(&format!(
                "domains = [\"example.com\", \"gov.br\"]\ndomains_file = \"{}\"\nwans = [\"isp1\"]",
                list.display()
            )),
        );
        let c = Config::load(&config).unwrap();
        assert_eq!(
            c.rules[0].domains,
            ["example.com", "gov.br", "edu.br", "blogspot.com"]
        );
        assert_eq!(c.rules[0].domains_file.as_deref(), Some(list.as_path()));
        // Read again on every load (a reload).
        std::fs::write(&list, "gov.br\nfoo..bar\n").unwrap();
        let (file, at) = (config.display(), list.display());
        assert_eq!(
            Config::load(&config).unwrap_err().to_string(),
            format!(
                "{file}:19: rule[0] (gov).domains_file: {at}:2: \"foo..bar\" is not a domain name: \
                 it has an empty label (two dots in a row, or a dot at the start)"
            )
        );
        let cases: &[(&[u8], String)] = &[
            (
                b"a.example b.example\n",
                format!("{at}:1: \"a.example b.example\": write one name per line"),
            ),
            (b"# nothing\n\n", format!("{at} lists no domain names")),
            (
                b"ok.example\n\xff.example\n",
                format!("{at}:2: not UTF-8 text: byte 11 (0xff)"),
            ),
            (
                b"ok.example\n10.0.0.1\n",
                format!("{at}:2: \"10.0.0.1\" is not a domain name: it looks like an address"),
            ),
        ];
        for (text, want) in cases {
            std::fs::write(&list, text).unwrap();
            let e = Config::load(&config).unwrap_err();
            assert_eq!(
                (e.line, e.key.as_str()),
                (Some(19), "rule[0] (gov).domains_file")
            );
            assert!(
                e.reason.starts_with(want.as_str()),
                "got: {e}\nwant: {want}"
            );
        }
        std::fs::remove_file(&list).unwrap();
        let e = Config::load(&config).unwrap_err();
        assert!(e.reason.starts_with(&format!("cannot read {at}: ")), "{e}");
        // A directory (or a device) is not read.
        std::fs::create_dir(&list).unwrap();
        let e = Config::load(&config).unwrap_err();
        assert_eq!(e.reason, format!("{at} is not a regular file"));
    }

    /// 50,000 names in a file: loaded, and the load time printed (not
    /// asserted; `cargo test --release -p mwan-user domains -- --nocapture`).
    #[test]
    fn fifty_thousand_domains_load() {
        let dir = Scratch::new("domains50k");
        let text: String = (0..50_000)
            .map(|i| format!("site-{i}.zone{}.example.br\n", i % 211))
            .collect();
        let list = dir.write("big.list", &text);
        let config = dir.write(
            "mwan.toml",
            domain_rule(&format!(
                "domains_file = \"{}\"\nwans = [\"isp1\"]",
                list.display()
            )),
        );
        let t = std::time::Instant::now();
        let c = Config::load(&config).unwrap();
        let load = t.elapsed();
        let t = std::time::Instant::now();
        let m = c.domain_matcher();
        let build = t.elapsed();
        assert_eq!(c.rules[0].domains.len(), 50_000);
        assert_eq!(m.len(), 50_000);
        assert_eq!(
            m.lookup("www.site-49999.zone203.example.br")
                .map(|(r, _)| r),
            Some(0)
        );
        println!(
            "domains_file: 50,000 names ({} KiB) parsed and validated in {load:?}; matcher built in {build:?}",
            text.len() / 1024
        );
    }

    #[test]
    fn domain_rules_pass_the_system_check() {
        let c = Config::parse(&domain_rule(
            "proto = \"tcp\"\ndomains = [\"gov.br\", \"edu.br\"]\nwans = [\"isp1\"]",
        ))
        .unwrap();
        assert!(c.has_domain_rules());
        assert_eq!(c.check_system(&|_| true).unwrap(), Vec::<String>::new());
        assert!(!Config::parse(MIN).unwrap().has_domain_rules());
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

    #[test]
    fn the_shipped_example_config_is_valid() {
        let c = Config::parse(include_str!("../packaging/mwan.example.toml")).unwrap();
        assert_eq!(c.wans.len(), 2);
        assert_eq!(c.rules.len(), 2);
        assert_eq!(c.wans[1].gateway, Gateway::Auto);
    }

    #[test]
    fn system_check_names_missing_interfaces() {
        let c = Config::parse(MIN).unwrap();
        let e = c.check_system(&|n| n != "lan0").unwrap_err();
        assert_eq!(e.key, "lan_interfaces[0]");
        let e = c.check_system(&|n| n != "wan1").unwrap_err();
        assert_eq!(e.key, "wan[0] (isp1).interface");
        // gateway = "auto": a warning, the WAN waits for its interface.
        let w = c.check_system(&|n| n != "wan2").unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("wan2"));
        assert!(c.check_system(&|_| true).unwrap().is_empty());
    }
}
