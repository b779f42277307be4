//! A rule's domain names: its `domains` list and its `domains_file`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::error::{line_of, Problem};
use super::raw::RawRule;
use super::shape::{OneOrMany, Str};
use super::values::absolute_path;
use crate::dns::config_name;

/// The names of a rule (`domains`, then those of `domains_file`, read
/// again on every load), normalised, each once; and the file.
pub(super) fn domains(r: &RawRule) -> Result<(Vec<String>, Option<PathBuf>), Problem> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    if let Some(v) = r.domains.get() {
        listed(v, &mut out, &mut seen)?;
    }
    let file = r.domains_file.read(absolute_path)?;
    if let (Some(path), Some(v)) = (&file, r.domains_file.get()) {
        read_domains_file(path, &mut out, &mut seen).map_err(|e| Problem::at(v, e))?;
    }
    Ok((out, file))
}

/// The names of a rule's `domains` list; an error names the item.
fn listed<K>(
    v: &Spanned<OneOrMany<Str<K>>>,
    out: &mut Vec<String>,
    seen: &mut HashSet<String>,
) -> Result<(), Problem> {
    let items = &v.get_ref().0;
    if items.is_empty() {
        return Err(Problem::at(
            v,
            "is empty; leave the key out to match any name",
        ));
    }
    for item in items {
        let name = config_name(item.get_ref().as_str()).map_err(|e| Problem::at(item, e.0))?;
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
    // Absolute: see `domains`.
    let at = path.display();
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

#[cfg(test)]
mod tests {
    use crate::config::fixture::*;
    use crate::config::*;

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
}
