//! The configuration file (TOML): parsing and validation.
//!
//! Parsing is strict: syntax errors, unknown keys, values of the wrong type,
//! duplicate names, bad addresses and values out of range are rejected with
//! a message naming the file, the line, the key and the reason.
//! [`Config::parse`] checks everything that can be checked from the text
//! alone (and the domains files rules name, which it reads);
//! [`Config::check_system`] checks it against the host's interfaces.
//! Nothing here changes the host.
//!
//! The text is read in two steps: serde reads it into the raw tables
//! (raw.rs: the keys, each declared once, and the shapes of their values,
//! shape.rs), then validation turns them into [`Config`] (validate.rs,
//! health.rs, rules.rs, domains.rs, values.rs). Errors are found at places
//! in the text and shown with their line and key path (error.rs).
//!
//! Adding a key: a field in its raw table (raw.rs; its name is the key, its
//! shape what a value must be), a line reading it in validation (with its
//! default), a field in the validated type (types.rs), and docs/CONFIG.md.
//!
//! See `docs/CONFIG.md` for the reference.

mod domains;
mod error;
mod health;
mod metered;
mod raw;
mod rules;
mod shape;
mod types;
mod validate;
mod values;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use self::error::ConfigError;
pub use self::types::*;
pub use crate::family::Family;

use self::error::{line_of, Problem};
use self::raw::RawConfig;
use crate::dns::DomainMatcher;

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
    /// Every WAN's `failback` unless it sets its own.
    pub failback: Failback,
    /// `failback = "drain"`: the flows of a returning WAN are reset over
    /// this long, a few at a time.
    pub failback_spread: Duration,
    /// `failback = "drain"` also moves flows of LAN hosts pinned
    /// (`sticky = "host"`) to a WAN that is still up.
    pub drain_pinned_hosts: bool,
    /// Where the WANs' usage per billing cycle is kept (`usage.json` in
    /// `state_dir` unless set).
    pub usage_file: Option<PathBuf>,
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
    /// An error found after parsing (an interface that does not exist),
    /// placed by `find`: the place of the setting in the raw tables, read
    /// again from the text.
    fn place(
        &self,
        find: impl FnOnce(&RawConfig) -> Option<Range<usize>>,
        reason: String,
    ) -> ConfigError {
        let span = RawConfig::read(&self.text).ok().as_ref().and_then(find);
        let e = match span {
            Some(span) => Problem::span(span, reason).locate(&self.text),
            None => ConfigError::whole(None, reason),
        };
        ConfigError {
            file: self.file.clone(),
            ..e
        }
    }
}

impl Config {
    /// Reads and parses a config file; errors name the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let in_file = |e: ConfigError| ConfigError {
            file: Some(path.to_path_buf()),
            ..e
        };
        let bytes = std::fs::read(path)
            .map_err(|e| in_file(ConfigError::whole(None, format!("cannot read it: {e}"))))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let bytes = e.as_bytes();
            in_file(ConfigError::whole(
                Some(line_of(bytes, at)),
                format!(
                    "not UTF-8 text: byte {at} (0x{:02x}) is not valid UTF-8 (a binary file?)",
                    bytes[at]
                ),
            ))
        })?;
        let mut c = Config::parse(&text).map_err(in_file)?;
        c.source.file = Some(path.to_path_buf());
        Ok(c)
    }

    /// Parses and validates config text. Does not look at the host. Errors
    /// carry the line (see [`ConfigError`]).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw = RawConfig::read(text)?;
        let mut c = validate::config(&raw).map_err(|p| p.locate(text))?;
        c.source = Source {
            file: None,
            text: text.into(),
        };
        Ok(c)
    }

    /// Checks the config against the host: every LAN interface must exist;
    /// a WAN interface must exist unless its gateway is `auto` (a PPP or
    /// DHCP link that may appear later). `exists` answers whether an
    /// interface exists.
    pub fn check_system(&self, exists: &dyn Fn(&str) -> bool) -> Result<Vec<String>, ConfigError> {
        let mut warnings = Vec::new();
        for (i, l) in self.lan_interfaces.iter().enumerate() {
            if !exists(l) {
                return Err(self.source.place(
                    |raw| Some(raw.lan_interfaces.get()?.get_ref().0.get(i)?.span()),
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
                    return Err(self.source.place(
                        |raw| raw.wan.0.get(i)?.get_ref().interface.span(),
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

    /// Where the WANs' usage per billing cycle is kept: `usage_file`, else
    /// `<state_dir>/usage.json`. A teardown leaves it when
    /// [`Config::keeps_usage`] (the admin's record of the ISP's bills, not
    /// mwan's state in the kernel).
    pub fn usage_path(&self) -> PathBuf {
        self.usage_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("usage.json"))
    }

    /// Whether the usage file outlives a teardown: some WAN is metered (a
    /// `quota`) or the admin chose where it goes (`usage_file`).
    pub fn keeps_usage(&self) -> bool {
        self.usage_file.is_some() || self.wans.iter().any(|w| w.quota.is_some())
    }

    /// Whether some WAN's flows are drained back when it returns.
    pub fn drains(&self) -> bool {
        self.wans.iter().any(|w| w.failback == Failback::Drain)
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

/// What the tests of the config modules share.
#[cfg(test)]
mod fixture {
    use std::path::PathBuf;

    use super::{Config, ConfigError};

    pub(super) const MIN: &str = r#"
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

    pub(super) fn parse_err(text: &str) -> ConfigError {
        Config::parse(text).expect_err("config should be rejected")
    }

    /// A scratch directory for one test, removed when dropped.
    pub(super) struct Scratch(PathBuf);
    impl Scratch {
        pub(super) fn new(tag: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("mwan-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).unwrap();
            Scratch(dir)
        }
        pub(super) fn write(&self, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
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

    pub(super) fn domain_rule(body: &str) -> String {
        format!("{MIN}\n[[rule]]\nname = \"gov\"\n{body}\n")
    }
}

#[cfg(test)]
mod tests {
    use crate::config::fixture::*;
    use crate::config::*;

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
    fn the_shipped_example_config_is_valid() {
        let c = Config::parse(include_str!("../../packaging/mwan.example.toml")).unwrap();
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
}
