//! Domain names as mwan writes them: lowercase ASCII labels joined by `.`,
//! without the trailing dot (the root is `""`).
//!
//! Names decoded from the wire may hold any byte; every byte that is not a
//! lowercase letter, a digit, `-` or `_` is written `\DDD` (decimal, as
//! `dig` does), so a `.` in the text is always a label separator and a
//! label with odd bytes can never equal a name of the config, which are
//! letters, digits and hyphens only.

use std::fmt;

/// Longest name in text form (RFC 1035: 255 octets on the wire, that is
/// 253 characters without the trailing dot).
pub const MAX_NAME_TEXT: usize = 253;
/// Longest label (RFC 1035).
pub const MAX_LABEL: usize = 63;

/// Appends one wire label to `out` in mwan's text form.
pub(crate) fn push_label(out: &mut String, label: &[u8]) {
    if !out.is_empty() {
        out.push('.');
    }
    for &b in label {
        let b = b.to_ascii_lowercase();
        if b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push('\\');
            out.push_str(&format!("{b:03}"));
        }
    }
}

/// Why a configured name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError(pub String);

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A name written in the config or a domains file, normalised: lowercase,
/// no trailing dot, a leading `*.` dropped (`*.gov.br` means the same as
/// `gov.br`: the name and all its subdomains). Labels are 1 to 63 letters,
/// digits and hyphens, not starting or ending with a hyphen; the name is at
/// most 253 characters. Internationalised names must be written in their
/// `xn--` (punycode) form.
pub fn config_name(s: &str) -> Result<String, NameError> {
    let bad = |why: &str| Err(NameError(format!("\"{s}\" is not a domain name: {why}")));
    if !s.is_ascii() {
        return bad("it is not ASCII; write internationalised names in their xn-- (punycode) form");
    }
    let mut n = s.trim();
    if n != s {
        return bad("it has spaces around it");
    }
    if let Some(rest) = n.strip_prefix("*.") {
        n = rest;
    }
    if let Some(rest) = n.strip_suffix('.') {
        n = rest;
    }
    if n.is_empty() {
        return bad("it is empty (the root would match every name)");
    }
    if n.len() > MAX_NAME_TEXT {
        return bad(&format!("it is longer than {MAX_NAME_TEXT} characters"));
    }
    let mut last = "";
    for label in n.split('.') {
        if label.is_empty() {
            return bad("it has an empty label (two dots in a row, or a dot at the start)");
        }
        if label.len() > MAX_LABEL {
            return bad(&format!(
                "label \"{label}\" is longer than {MAX_LABEL} characters"
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            let why = if c == '*' {
                "a `*` is allowed only as the whole first label (`*.example.com`)".to_string()
            } else {
                format!("label \"{label}\" has `{c}`; use letters, digits and hyphens")
            };
            return bad(&why);
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad(&format!("label \"{label}\" starts or ends with a hyphen"));
        }
        last = label;
    }
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return bad("it looks like an address; match addresses with `dst`");
    }
    Ok(n.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_are_normalised() {
        for (written, name) in [
            ("gov.br", "gov.br"),
            ("GOV.BR", "gov.br"),
            ("gov.br.", "gov.br"),
            ("*.gov.br", "gov.br"),
            ("*.Blogspot.COM.", "blogspot.com"),
            ("br", "br"),
            ("xn--bcher-kva.de", "xn--bcher-kva.de"),
            ("a-b.c0", "a-b.c0"),
            ("1.example.com", "1.example.com"),
        ] {
            assert_eq!(config_name(written).unwrap(), name, "{written}");
        }
        let long_label = "a".repeat(63);
        assert!(config_name(&format!("{long_label}.com")).is_ok());
        // 253 characters: three labels of 63 and one of 61.
        let max = format!("{0}.{0}.{0}.{1}", long_label, &long_label[..61]);
        assert_eq!(max.len(), 253);
        assert!(config_name(&max).is_ok());
        assert!(config_name(&format!("{max}.")).is_ok());
        assert!(config_name(&format!("a{max}")).is_err());
    }

    #[test]
    fn bad_config_names_say_why() {
        for (written, why) in [
            ("foo..bar", "empty label"),
            (".foo", "empty label"),
            ("", "empty"),
            (".", "empty"),
            ("*.", "empty"),
            ("*", "only as the whole first label"),
            ("a.*.com", "only as the whole first label"),
            ("foo*.com", "only as the whole first label"),
            ("bücher.de", "punycode"),
            ("a_b.com", "has `_`"),
            ("a b.com", "has ` `"),
            (" gov.br", "spaces"),
            ("-a.com", "hyphen"),
            ("a-.com", "hyphen"),
            ("192.0.2.1", "address"),
            ("gov..", "empty label"),
        ] {
            let e = config_name(written).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("\"{written}\" is not a domain name: ")),
                "{e}"
            );
            assert!(e.contains(why), "{written}: {e}");
        }
        let long_label = "a".repeat(64);
        assert!(config_name(&format!("{long_label}.com"))
            .unwrap_err()
            .0
            .contains("longer than 63"));
        let too_long = format!("{}.com", vec!["a".repeat(60); 5].join("."));
        assert!(config_name(&too_long)
            .unwrap_err()
            .0
            .contains("longer than 253"));
    }

    #[test]
    fn wire_labels_escape_what_is_not_a_hostname_character() {
        let mut s = String::new();
        push_label(&mut s, b"WWW");
        push_label(&mut s, b"gov.br");
        push_label(&mut s, b"a\\b\x00 _-");
        assert_eq!(s, "www.gov\\046br.a\\092b\\000\\032_-");
    }
}
