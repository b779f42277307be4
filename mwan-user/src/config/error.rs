//! Configuration errors and their place in the text.
//!
//! Problems are found at a place in the text: a value, key or table known
//! by its bytes (serde's span of a value, or `toml::Spanned`'s), or a key
//! (usually missing) of a table. [`Problem::locate`] turns that place into
//! what is shown: the line, and the key path from the top of the document
//! (`wan[1] (isp2).weight`), found in the document itself, so that no key
//! name is written here or in the validation.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

use toml::Spanned;
use toml_edit::{ImDocument, Item, Table, TableLike, Value};

use super::raw::Setting;

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
    /// An error of the whole text (or file), on `line` if given.
    pub(super) fn whole(line: Option<usize>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: None,
            line,
            key: String::new(),
            reason: reason.into(),
        }
    }
}

/// A problem with the config text, not yet placed in it (see
/// [`Problem::locate`]).
#[derive(Debug)]
pub(super) struct Problem {
    at: At,
    reason: String,
}

#[derive(Debug)]
enum At {
    /// The value, key or table at these bytes; `labelled`: list items are
    /// shown with their names (`wan[1] (isp2)`).
    Text { span: Range<usize>, labelled: bool },
    /// Key `key` of the table at these bytes (`None`: the top level),
    /// usually missing: then shown on the table's line.
    Key {
        table: Option<Range<usize>>,
        key: &'static str,
    },
}

impl Problem {
    /// A problem of the value `v`.
    pub(super) fn at<T>(v: &Spanned<T>, reason: impl Into<String>) -> Problem {
        Problem::span(v.span(), reason)
    }

    /// A problem of what is at `span` (a value, or a whole table).
    pub(super) fn span(span: Range<usize>, reason: impl Into<String>) -> Problem {
        Problem {
            at: At::Text {
                span,
                labelled: true,
            },
            reason: reason.into(),
        }
    }

    /// A problem of key `key` of the table at `table` (`None`: the top
    /// level), such as its absence. `key` is written with `key!`.
    pub(super) fn key(
        table: Option<Range<usize>>,
        key: &'static str,
        reason: impl Into<String>,
    ) -> Problem {
        Problem {
            at: At::Key { table, key },
            reason: reason.into(),
        }
    }

    /// A problem of setting `s` where it is written, else of key `key` of
    /// the table at `table`.
    pub(super) fn on<T>(
        s: &Setting<T>,
        table: Option<Range<usize>>,
        key: &'static str,
        reason: impl Into<String>,
    ) -> Problem {
        match s.get() {
            Some(v) => Problem::at(v, reason),
            None => Problem::key(table, key, reason),
        }
    }

    /// Shown without the names of list items (`wan[0].name`): for what
    /// is found before the name is known to be one.
    pub(super) fn unlabelled(mut self) -> Problem {
        if let At::Text { labelled, .. } = &mut self.at {
            *labelled = false;
        }
        self
    }

    /// The error as shown: the line and key path of the problem's place
    /// in `text`.
    pub(super) fn locate(self, text: &str) -> ConfigError {
        let Ok(doc) = ImDocument::parse(text) else {
            return ConfigError::whole(None, self.reason);
        };
        let path = match self.at {
            At::Text { span, labelled } => KeyPath::at_offset(&doc, span.start, labelled),
            At::Key { table, key } => {
                let table = table.map(|t| KeyPath::at_offset(&doc, t.start, true));
                table.unwrap_or_default().key(key)
            }
        };
        path.error(&doc, self.reason)
    }
}

/// The TOML name of a raw table's field, checked to be one: `key!(w.gateway)`
/// is `"gateway"` (raw fields are named as their keys).
macro_rules! key {
    ($table:ident . $field:ident) => {{
        let _ = &$table.$field;
        stringify!($field)
    }};
}
pub(super) use key;

/// 1-based line of byte offset `at` in `text`.
pub(super) fn line_of(text: &[u8], at: usize) -> usize {
    text[..at.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// A TOML syntax error, with its line and column.
pub(super) fn syntax(e: &toml_edit::TomlError, text: &str) -> ConfigError {
    let start = e.span().map(|s| s.start.min(text.len()));
    let column = start.map(|at| {
        let line_start = text[..at].rfind('\n').map_or(0, |n| n + 1);
        format!(" at column {}", text[line_start..at].chars().count() + 1)
    });
    let message: Vec<&str> = e.message().lines().map(str::trim).collect();
    ConfigError::whole(
        start.map(|at| line_of(text.as_bytes(), at)),
        format!(
            "not valid TOML{}: {}",
            column.unwrap_or_default(),
            message.join("; ")
        ),
    )
}

/// What a `[[wan]]` or `[[rule]]` item must be, and their list (the
/// `expecting` of the raw tables and of `shape::Tables`).
pub(super) const TABLE: &str = "a table";
pub(super) const TABLES: &str = "a list of tables";

/// An error serde found reading the raw tables (raw.rs): an unknown key
/// (with the nearest known one, from the keys serde lists), a value of the
/// wrong type (told what it must be: the `expecting` of its shape), or a
/// value serde refused for itself (an unknown `sticky` choice).
pub(super) fn from_serde(e: &toml::de::Error, text: &str) -> ConfigError {
    let message = e.message().trim();
    let Ok(doc) = ImDocument::parse(text) else {
        return ConfigError::whole(None, message);
    };
    let at = e.span().map_or(0, |s| s.start);
    if message.starts_with("unknown field `") {
        let path = KeyPath::at_offset(&doc, at, false);
        let hint = path
            .last_key()
            .and_then(|k| message.strip_prefix(&format!("unknown field `{k}`, expected ")))
            .map(|list| {
                // serde lists the struct's fields: "one of `a`, `b`".
                let mut known: Vec<&str> = list.split('`').skip(1).step_by(2).collect();
                known.sort_unstable();
                known
            })
            .and_then(|known| closest(path.last_key().unwrap_or_default(), &known))
            .map(|c| format!(" (did you mean `{c}`?)"))
            .unwrap_or_default();
        return path.error(&doc, format!("unknown key{hint}"));
    }
    let mut path = KeyPath::at_offset(&doc, at, true);
    let Some(what) = message
        .strip_prefix("invalid type: ")
        .and_then(|m| m.rsplit_once(", expected "))
        .map(|(_, what)| what)
    else {
        return path.error(&doc, message);
    };
    if what == TABLE || what == TABLES {
        if what == TABLES {
            path.drop_indexes();
        }
        let header = path.keys().join(".");
        return path.error(&doc, format!("must be {what}: write [[{header}]]"));
    }
    // A list item of the wrong type: the list is shown, whole.
    path.drop_indexes();
    let shown = path.value_in(text).unwrap_or_default();
    path.error(&doc, format!("must be {what}, not {shown}"))
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

/// The key whose value names a list item (`[[wan]]`, `[[rule]]`) in a key
/// path: `wan[1] (isp2)`.
const LABEL_KEY: &str = "name";

impl KeyPath {
    fn key(mut self, k: &str) -> KeyPath {
        self.0.push(Seg::Key(k.to_string()));
        self
    }

    fn last_key(&self) -> Option<&str> {
        self.0.iter().rev().find_map(|s| match s {
            Seg::Key(k) => Some(k.as_str()),
            _ => None,
        })
    }

    /// The keys, without indexes: `wan.weight_schedule` for
    /// `wan[0].weight_schedule[1]`.
    fn keys(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter_map(|s| match s {
                Seg::Key(k) => Some(k.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Up to the last key: the list rather than one of its items.
    fn drop_indexes(&mut self) {
        while matches!(self.0.last(), Some(Seg::Index(_) | Seg::Label(_))) {
            self.0.pop();
        }
    }

    /// The error at this path of `doc`, on the line of its key (or list
    /// item), else of the deepest enclosing table or key that exists.
    fn error(self, doc: &ImDocument<&str>, reason: impl Into<String>) -> ConfigError {
        let text = doc.raw();
        ConfigError {
            file: None,
            line: self.offset_in(doc).map(|at| line_of(text.as_bytes(), at)),
            key: self.to_string(),
            reason: reason.into(),
        }
    }

    /// The path of the deepest key, list item or table of `doc` that holds
    /// byte `offset`; list items named (`labelled`) by their `name`.
    fn at_offset(doc: &ImDocument<&str>, offset: usize, labelled: bool) -> KeyPath {
        let mut finder = Finder {
            offset,
            labelled,
            path: KeyPath::default(),
        };
        finder.table(doc.as_table());
        finder.path
    }

    /// Byte offset of the setting in `doc`: its key (or list item), else
    /// the deepest enclosing table or key that exists (a missing key is
    /// reported at its table's header).
    fn offset_in(&self, doc: &ImDocument<&str>) -> Option<usize> {
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

    /// The value at this path in `text`, as TOML (`"3"`, `[1]`), or "a table".
    fn value_in(&self, text: &str) -> Option<String> {
        let top: toml::Table = text.parse().ok()?;
        let mut at = None::<&toml::Value>;
        for seg in &self.0 {
            at = match (seg, at) {
                (Seg::Label(_), _) => continue,
                (Seg::Key(k), None) => top.get(k),
                (Seg::Key(k), Some(v)) => v.get(k.as_str()),
                (Seg::Index(i), Some(v)) => v.get(*i),
                (Seg::Index(_), None) => None,
            };
            at?;
        }
        Some(match at? {
            toml::Value::Table(_) => "a table".to_string(),
            // Shown by toml as its private form otherwise.
            toml::Value::Datetime(d) => d.to_string(),
            v => v.to_string(),
        })
    }
}

/// Searches a document for the deepest key, item or table holding a byte.
struct Finder {
    offset: usize,
    labelled: bool,
    path: KeyPath,
}

impl Finder {
    fn holds(&self, span: Option<Range<usize>>) -> bool {
        span.is_some_and(|s| s.contains(&self.offset))
    }

    /// Whether a key of `t` (or what is under it) holds the offset; the
    /// path then leads to it.
    fn table(&mut self, t: &dyn TableLike) -> bool {
        for (k, item) in t.iter() {
            self.path.0.push(Seg::Key(k.to_string()));
            if self.holds(t.key(k).and_then(|k| k.span())) || self.item(item) {
                return true;
            }
            self.path.0.pop();
        }
        false
    }

    fn item(&mut self, item: &Item) -> bool {
        match item {
            Item::None => false,
            Item::Value(v) => self.value(v),
            Item::Table(t) => self.table(t) || self.holds(t.span()),
            Item::ArrayOfTables(a) => a
                .iter()
                .enumerate()
                .any(|(i, t)| self.list_item(i, t, |f| f.table(t) || f.holds(t.span()))),
        }
    }

    fn value(&mut self, v: &Value) -> bool {
        if !self.holds(v.span()) {
            return false;
        }
        match v {
            Value::Array(a) => {
                for (i, e) in a.iter().enumerate() {
                    let found = match e.as_inline_table() {
                        Some(t) => self.list_item(i, t, |f| f.value(e)),
                        None => self.list_item(i, &Table::new(), |f| f.value(e)),
                    };
                    if found {
                        break;
                    }
                }
            }
            Value::InlineTable(t) => {
                self.table(t);
            }
            _ => {}
        }
        true
    }

    /// Item `i` of a list, named by its table `t`'s name: whether `found`.
    fn list_item(
        &mut self,
        i: usize,
        t: &dyn TableLike,
        found: impl FnOnce(&mut Finder) -> bool,
    ) -> bool {
        let depth = self.path.0.len();
        self.path.0.push(Seg::Index(i));
        if self.labelled {
            if let Some(name) = t.get(LABEL_KEY).and_then(|n| n.as_str()) {
                self.path.0.push(Seg::Label(name.to_string()));
            }
        }
        if found(self) {
            return true;
        }
        self.path.0.truncate(depth);
        false
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

#[cfg(test)]
mod tests {
    use crate::config::fixture::*;

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

    /// Every kind of error names the line (MIN's lines: 2 lan_interfaces,
    /// 3 probe_targets, 5 and 11 the `[[wan]]` headers, 6-9 isp1's keys,
    /// 12-14 isp2's) and the key, with the WAN's or rule's index and name.
    fn assert_placed(cases: &[(&str, &str, &str)]) {
        for (from, to, want) in cases {
            assert!(MIN.contains(from), "{from}");
            let text = MIN.replacen(from, to, 1);
            let e = parse_err(&text).to_string();
            assert!(e.starts_with(want), "{to:?}:\n got: {e}\nwant: {want}");
        }
    }

    #[test]
    fn errors_of_syntax_keys_and_types_name_the_line_and_the_key() {
        assert_placed(&[
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
        ]);
    }

    #[test]
    fn errors_of_values_name_the_line_and_the_key() {
        assert_placed(&[
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
        ]);
    }

    #[test]
    fn errors_of_ipv6_settings_name_the_line_and_the_key() {
        assert_placed(&[
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
        ]);
    }

    #[test]
    fn errors_of_missing_keys_and_rules_name_the_line_and_the_key() {
        const RULE: &str = "\n[[rule]]\nname = \"mail\"\ndst_ports = [25]\nwans = [\"isp1\"]\n";
        assert_placed(&[
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
        ]);
        // Nothing in the text to point at.
        let e = parse_err("lan_interfaces = [\"lan0\"]\n");
        assert_eq!((e.line, e.key.as_str()), (None, "wan"));
    }

    /// Unknown keys in any table, with the line of the key and the nearest
    /// key of that table (serde's list of its fields).
    #[test]
    fn unknown_keys_in_nested_tables_are_named_with_their_line() {
        let wan3 =
            "\n[[wan]]\nname = \"isp3\"\ninterface = \"wan3\"\ngateway = \"auto\"\ntierr = 2\n";
        let rules = "\n[[rule]]\nname = \"a\"\nwans = [\"isp1\"]\n\n[[rule]]\nname = \"b\"\nbalnce = [\"isp1\"]\n";
        let cases: &[(String, &str)] = &[
            // The third WAN's table (lines 16-20); a health key's suggestion.
            (format!("{MIN}{wan3}"), "line 20: wan[2].tierr: unknown key (did you mean `tier`?)"),
            (
                MIN.replace("weight = 3", "weight = 3\nprobe_intervall = \"1s\""),
                "line 10: wan[0].probe_intervall: unknown key (did you mean `probe_interval`?)",
            ),
            // A `[wan.health]` section: health keys are the WAN's own.
            (
                format!("{MIN}\n[wan.health]\nprobe_interval = \"1s\"\n"),
                "line 16: wan[1].health: unknown key",
            ),
            // The second rule (lines 20-22).
            (format!("{MIN}{rules}"), "line 22: rule[1].balnce: unknown key (did you mean `balance`?)"),
            // A WAN written as an inline table.
            (
                "lan_interfaces = [\"lan0\"]\nprobe_targets = [\"192.0.2.1\"]\nwan = [\n  { name = \"a\", interface = \"w\", gateway = \"auto\" },\n  { name = \"b\", interface = \"v\", gatway = \"auto\" },\n]\n"
                    .to_string(),
                "line 5: wan[1].gatway: unknown key (did you mean `gateway`?)",
            ),
            // Nothing close.
            (format!("frobnicate = 1\n{MIN}"), "line 1: frobnicate: unknown key"),
        ];
        for (text, want) in cases {
            assert_eq!(&parse_err(text).to_string(), want);
        }
    }

    /// What each shape of value must be, said to a value of another type.
    #[test]
    fn values_of_the_wrong_shape_are_told_what_they_must_be() {
        let top = |k: &str| format!("{k}\n{MIN}");
        let cases: &[(String, &str)] = &[
            (
                "lan_interfaces = [\"lan0\"]\nwan = 5\n".to_string(),
                "line 2: wan: must be a list of tables: write [[wan]]",
            ),
            (
                "lan_interfaces = [\"lan0\"]\nwan = [{}, 5]\n".to_string(),
                "line 2: wan[1]: must be a table: write [[wan]]",
            ),
            (top("rule = [1]"), "line 1: rule[0]: must be a table: write [[rule]]"),
            (top("sticky = 5"), "line 1: sticky: must be \"connection\" or \"host\", not 5"),
            (top("all_down = []"), "line 1: all_down: must be \"last\" or \"unreachable\", not []"),
            (
                top("failback = \"later\""),
                "line 1: failback: unknown variant `later`, expected one of `keep`, `reset`, `drain`",
            ),
            (
                top("mark_mask = true"),
                "line 1: mark_mask: must be an integer or a string such as \"0x00ff0000\", not true",
            ),
            (top("host_ttl = 1979-05-27"), "line 1: host_ttl: must be a duration such as \"5s\", not 1979-05-27"),
            (
                MIN.replace("[\"lan0\"]", "{ a = 1 }"),
                "line 2: lan_interfaces: must be a list of interface names, not a table",
            ),
            // An item of the wrong type: the whole list is shown.
            (
                MIN.replace("[\"lan0\"]", "[\n  \"lan0\",\n  5,\n]"),
                "line 2: lan_interfaces: must be a list of interface names, not [\"lan0\", 5]",
            ),
            (
                format!("{MIN}\n[[rule]]\nname = \"r\"\nproto = [\"tcp\", 6]\nwans = [\"isp1\"]\n"),
                "line 18: rule[0] (r).proto: must be a string or a list of strings, not [\"tcp\", 6]",
            ),
            (
                MIN.replace("weight = 3", "weight = 3\nmax_loss = \"5%\""),
                "line 10: wan[0] (isp1).max_loss: must be a number (percent), not \"5%\"",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(&parse_err(text).to_string(), want);
        }
    }
}
