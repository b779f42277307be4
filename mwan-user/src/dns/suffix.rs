//! Which rule a name belongs to: the first rule, in config order, that lists
//! the name or one of its parent domains (`gov.br` covers `gov.br`,
//! `www.gov.br`, `a.b.gov.br`).
//!
//! One hash map from listed name to the set of rules that list it (a 64-bit
//! mask, bit *i* for rule *i*, as the datapath's `RULE_*` maps hold them);
//! a lookup walks the name's suffixes (`www.gov.br`, `gov.br`, `br`): one
//! hash probe per label, whatever the number of names listed.
//!
//! The mask of every rule a name belongs to is what the datapath needs: a
//! learned address carries it, and the classifier ANDs it with the masks of
//! the other keys, so the first rule that matches *all* its keys wins (rule
//! 0 `gov.br` with `proto = "tcp"`, rule 1 `gov.br` for the rest).

use std::borrow::Cow;
use std::collections::HashMap;

use mwan_common::MAX_RULES;

/// The rules' domain lists, ready for lookups.
#[derive(Debug, Clone, Default)]
pub struct DomainMatcher {
    names: HashMap<Box<str>, u64>,
}

impl DomainMatcher {
    pub fn new() -> DomainMatcher {
        DomainMatcher::default()
    }

    /// From each rule's list, in config order (the index of a rule in the
    /// iterator is its index in the result). Names must be normalised as
    /// [`config_name`](super::config_name) does.
    pub fn from_rules<'a, I, L>(rules: I) -> DomainMatcher
    where
        I: IntoIterator<Item = L>,
        L: IntoIterator<Item = &'a String>,
    {
        let mut m = DomainMatcher::new();
        for (i, list) in rules.into_iter().enumerate() {
            for name in list {
                m.insert(name, i);
            }
        }
        m
    }

    /// Lists `name` for rule `rule` (below [`MAX_RULES`], which the config
    /// enforces).
    pub fn insert(&mut self, name: &str, rule: usize) {
        assert!(rule < MAX_RULES as usize, "rule index {rule} out of range");
        *self.names.entry(name.into()).or_insert(0) |= 1 << rule;
    }

    /// Names listed (each once, whatever the number of rules listing it).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Calls `f` with each listed name that is `name` or a parent of it,
    /// and its rules. Case-insensitive; one trailing dot is ignored.
    fn each_suffix<'a>(&'a self, name: &str, mut f: impl FnMut(&'a str, u64)) {
        let name = name.strip_suffix('.').unwrap_or(name);
        let name: Cow<str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(name.to_ascii_lowercase())
        } else {
            Cow::Borrowed(name)
        };
        let mut rest: &str = &name;
        loop {
            if let Some((k, &mask)) = self.names.get_key_value(rest) {
                f(k, mask);
            }
            match rest.split_once('.') {
                Some((_, parent)) if !parent.is_empty() => rest = parent,
                _ => break,
            }
        }
    }

    /// The rules (bit *i*: rule *i*) whose lists hold `name` or a parent.
    pub fn rules(&self, name: &str) -> u64 {
        let mut mask = 0;
        self.each_suffix(name, |_, m| mask |= m);
        mask
    }

    /// The rules matching any name of a CNAME chain (the question's name or
    /// a target it led to).
    pub fn chain_rules<S: AsRef<str>>(&self, chain: &[S]) -> u64 {
        chain.iter().fold(0, |m, n| m | self.rules(n.as_ref()))
    }

    /// The first rule (config order) whose list holds `name` or a parent of
    /// it, and the listed name that put it there.
    pub fn lookup(&self, name: &str) -> Option<(usize, &str)> {
        let mut best: Option<(u32, &str)> = None;
        self.each_suffix(name, |k, mask| {
            let r = mask.trailing_zeros();
            if best.is_none_or(|(b, _)| r < b) {
                best = Some((r, k));
            }
        });
        best.map(|(r, k)| (r as usize, k))
    }

    /// The first rule matching any name of a CNAME chain, with the index of
    /// that name in the chain and the listed name that matched (for `mwan
    /// domains`: which name an address was learned through).
    pub fn lookup_chain<S: AsRef<str>>(&self, chain: &[S]) -> Option<(usize, usize, &str)> {
        chain
            .iter()
            .enumerate()
            .filter_map(|(i, n)| self.lookup(n.as_ref()).map(|(r, k)| (r, i, k)))
            .min_by_key(|(r, i, _)| (*r, *i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn matcher(rules: &[&[&str]]) -> DomainMatcher {
        let owned: Vec<Vec<String>> = rules
            .iter()
            .map(|l| l.iter().map(|s| s.to_string()).collect())
            .collect();
        DomainMatcher::from_rules(&owned)
    }

    #[test]
    fn names_and_their_subdomains_match() {
        let m = matcher(&[&["gov.br", "edu.br", "blogspot.com"], &["example.com"]]);
        for (name, want) in [
            ("gov.br", Some((0, "gov.br"))),
            ("www.gov.br", Some((0, "gov.br"))),
            ("a.b.c.GOV.BR.", Some((0, "gov.br"))),
            ("x.blogspot.com", Some((0, "blogspot.com"))),
            ("www.example.com", Some((1, "example.com"))),
            ("example.com.", Some((1, "example.com"))),
            // Not a label boundary, or a parent of the listed name.
            ("notgov.br", None),
            ("br", None),
            ("com", None),
            ("gov.br.evil.example", None),
            ("", None),
            (".", None),
            ("..", None),
            ("gov\\046br", None),
        ] {
            assert_eq!(m.lookup(name), want, "{name}");
        }
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn the_first_rule_in_config_order_wins() {
        // Rule 1 lists a subdomain of rule 0's name, rule 2 lists rule 0's
        // name again, rule 3 a parent of it.
        let m = matcher(&[&["gov.br"], &["www.gov.br"], &["gov.br"], &["br"]]);
        assert_eq!(m.lookup("www.gov.br"), Some((0, "gov.br")));
        assert_eq!(m.lookup("gov.br"), Some((0, "gov.br")));
        assert_eq!(m.lookup("x.edu.br"), Some((3, "br")));
        // Every rule a name belongs to, for the datapath's masks.
        assert_eq!(m.rules("www.gov.br"), 0b1111);
        assert_eq!(m.rules("gov.br"), 0b1101);
        assert_eq!(m.rules("x.edu.br"), 0b1000);
        assert_eq!(m.rules("example.org"), 0);
        let m = matcher(&[&["www.gov.br"], &["gov.br"]]);
        assert_eq!(m.lookup("a.www.gov.br"), Some((0, "www.gov.br")));
        assert_eq!(m.lookup("mail.gov.br"), Some((1, "gov.br")));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn sixty_four_rules_fit() {
        let mut m = DomainMatcher::new();
        m.insert("example.com", 63);
        m.insert("example.com", 0);
        assert_eq!(m.rules("a.example.com"), 1 | 1 << 63);
        assert_eq!(m.lookup("a.example.com"), Some((0, "example.com")));
    }

    #[test]
    #[should_panic(expected = "rule index 64 out of range")]
    fn a_sixty_fifth_rule_is_refused() {
        DomainMatcher::new().insert("example.com", 64);
    }

    #[test]
    fn a_cname_chain_matches_by_any_of_its_names() {
        let m = matcher(&[&["cdn.example"], &["gov.br"]]);
        let chain = ["www.gov.br", "edge.gov.br", "a1.cdn.example"];
        assert_eq!(m.lookup_chain(&chain), Some((0, 2, "cdn.example")));
        assert_eq!(m.lookup_chain(&chain[..2]), Some((1, 0, "gov.br")));
        assert_eq!(m.lookup_chain(&["other.example"]), None);
        assert_eq!(m.lookup_chain::<&str>(&[]), None);
        assert_eq!(m.chain_rules(&chain), 0b11);
        assert_eq!(m.chain_rules(&chain[..1]), 0b10);
        assert_eq!(m.chain_rules::<&str>(&[]), 0);
    }

    /// 50,000 names: build time and lookup cost, printed (timings are not
    /// asserted; `cargo test --release -p mwan-user suffix -- --nocapture`).
    #[test]
    fn fifty_thousand_names() {
        let names: Vec<String> = (0..50_000)
            .map(|i| format!("host{i}.zone{}.example{}.br", i % 97, i % 13))
            .collect();
        let t = Instant::now();
        let m = DomainMatcher::from_rules([&names[..25_000], &names[25_000..]]);
        let build = t.elapsed();
        assert_eq!(m.len(), 50_000);
        let queries: Vec<String> = (0..100_000)
            .map(|i| match i % 4 {
                0 => format!(
                    "www.host{}.zone{}.example{}.br",
                    i / 4,
                    (i / 4) % 97,
                    (i / 4) % 13
                ),
                1 => format!("a.b.c.d.miss{i}.example.org"),
                2 => format!(
                    "HOST{}.ZONE{}.EXAMPLE{}.BR.",
                    i / 4,
                    (i / 4) % 97,
                    (i / 4) % 13
                ),
                _ => format!("miss{i}.br"),
            })
            .collect();
        let t = Instant::now();
        let mut hits = 0;
        for q in &queries {
            if let Some((r, _)) = m.lookup(q) {
                hits += 1;
                assert_eq!(r, 0);
            }
        }
        let per = t.elapsed() / queries.len() as u32;
        // Quarters 0 and 2 hit (i / 4 < 25,000: rule 0).
        assert_eq!(hits, 50_000);
        println!("suffix matcher: built 50,000 names in {build:?}; {per:?} per lookup (half hits, 4-6 labels)");
    }
}
