//! `mwan-bench --only SECTIONS --update FILE`: measures some sections again
//! and puts them into an existing report in place of their old text, saying
//! so in the report's header. The rest of the report stays as it was
//! measured.

/// A report's top-level blocks: the text before the first `## ` heading,
/// then one block per heading (the heading line and what follows it).
fn blocks(md: &str) -> (String, Vec<String>) {
    let mut head = String::new();
    let mut out: Vec<String> = Vec::new();
    for line in md.split_inclusive('\n') {
        if line.starts_with("## ") {
            out.push(String::new());
        }
        match out.last_mut() {
            Some(b) => b.push_str(line),
            None => head.push_str(line),
        }
    }
    (head, out)
}

/// The number of a numbered section's heading (`## 3c. Passive …` → `3c`).
fn number(block: &str) -> Option<&str> {
    let rest = block.strip_prefix("## ")?;
    let n = rest.split(['.', ' ']).next()?;
    n.starts_with(|c: char| c.is_ascii_digit()).then_some(n)
}

/// The line of the header that says which sections were measured later.
const LATER: &str = "Measured again in a later run";

/// `old` with the numbered sections of `new` in place of its own (a new
/// section goes before "Changes since the previous run", or at the end),
/// and a line in the header naming them and `when` they were measured.
pub fn merge(old: &str, new: &str, when: &str) -> String {
    let (mut head, mut have) = blocks(old);
    let (_, fresh) = blocks(new);
    let mut names = Vec::new();
    for b in fresh.into_iter().filter(|b| number(b).is_some()) {
        let n = number(&b).unwrap_or_default().to_string();
        match have.iter().position(|h| number(h) == Some(n.as_str())) {
            Some(i) => have[i] = b,
            None => {
                let at = have
                    .iter()
                    .position(|h| h.starts_with("## Changes") || h.starts_with("## Method"))
                    .unwrap_or(have.len());
                have.insert(at, b);
            }
        }
        names.push(n);
    }
    // Earlier runs' lines keep the sections not measured again now.
    let mut lines = Vec::new();
    let mut kept = String::new();
    let mut skip_blank = false;
    for l in head.split_inclusive('\n') {
        if let Some(earlier) = l.strip_prefix(LATER) {
            let (when, sections) = later_line(earlier);
            let rest: Vec<String> = sections
                .into_iter()
                .filter(|s| !names.contains(s))
                .collect();
            if !rest.is_empty() {
                lines.push(later(&when, &rest));
            }
            skip_blank = true;
        } else if skip_blank && l == "\n" {
            skip_blank = false;
        } else {
            skip_blank = false;
            kept.push_str(l);
        }
    }
    head = kept;
    if !names.is_empty() {
        lines.insert(0, later(when, &names));
    }
    if !lines.is_empty() {
        // After the generated-by line and its blank line.
        let from = head.find("Generated").unwrap_or(0);
        let at = head[from..]
            .find("\n\n")
            .map(|i| from + i + 2)
            .unwrap_or(head.len());
        head.insert_str(at, &lines.concat());
    }
    head + &have.concat()
}

/// The header line saying that `sections` were measured `when`.
fn later(when: &str, sections: &[String]) -> String {
    format!(
        "{LATER} ({when}, same machine, `mwan-bench --only … --update`): section {}; every other figure is from the run above.\n\n",
        sections.join(", ")
    )
}

/// The time and the sections of a [`later`] line (without [`LATER`]).
fn later_line(l: &str) -> (String, Vec<String>) {
    let when = l
        .trim_start()
        .strip_prefix('(')
        .and_then(|r| r.split(", same machine").next())
        .unwrap_or_default()
        .to_string();
    let sections = l
        .split("): section ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .map(|r| r.split(", ").map(str::to_string).collect())
        .unwrap_or_default();
    (when, sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "# mwan benchmarks\n\nGenerated on day 1.\n\nEvery figure...\n\n## Summary\n\nold summary\n\n## 3. Failover\n\nold 3\n\n## 3b. Busy\n\nold 3b\n\n## Changes since the previous run\n\nchanges\n\n## Method\n\nmethod\n";

    #[test]
    fn replaces_and_inserts_numbered_sections_only() {
        let new = "# mwan benchmarks\n\nGenerated on day 2.\n\n## Summary\n\nnew summary\n\n## 3b. Busy\n\nnew 3b\n\n## 3c. Passive\n\nnew 3c\n\n## Method\n\nnew method\n";
        let m = merge(OLD, new, "day 2");
        assert!(
            m.contains("old summary") && !m.contains("new summary"),
            "{m}"
        );
        assert!(m.contains("old 3\n") && m.contains("new 3b") && !m.contains("old 3b"));
        assert!(m.find("new 3c").unwrap() < m.find("## Changes").unwrap());
        assert!(m.contains("method\n") && !m.contains("new method"));
        assert!(m.find("Generated on day 1.").unwrap() < m.find(LATER).unwrap());
        assert!(
            m.contains("(day 2, same machine, `mwan-bench --only … --update`): section 3b, 3c;")
        );
        // Merging the same sections again replaces the header line, not
        // adds one.
        let again = merge(&m, new, "day 3");
        assert_eq!(again.matches(LATER).count(), 1, "{again}");
        assert!(again.contains("day 3"));
        assert_eq!(again.matches("new 3c").count(), 1);
        assert!(!again.contains("\n\n\n"), "{again}");
        // Merging one of them keeps the other's earlier line.
        let only = "# mwan benchmarks\n\nGenerated on day 4.\n\n## 3c. Passive\n\nnewer 3c\n";
        let later_merge = merge(&again, only, "day 4");
        assert!(
            later_merge
                .contains("(day 4, same machine, `mwan-bench --only … --update`): section 3c;"),
            "{later_merge}"
        );
        assert!(
            later_merge
                .contains("(day 3, same machine, `mwan-bench --only … --update`): section 3b;"),
            "{later_merge}"
        );
        assert!(!later_merge.contains("\n\n\n"), "{later_merge}");
    }
}
