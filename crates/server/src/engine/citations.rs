//! Checking the `FILE:START-END` citations a model gives against the
//! context files, so a range that does not exist is never passed on as if
//! true.

use std::sync::OnceLock;

use regex::Regex;

/// A context file as citations see it: its display path and line count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLines {
    /// The path as the shard cites it.
    pub display: String,
    /// Number of lines.
    pub lines: u32,
}

fn pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        // A path with an extension, a colon, a line or a line range.
        Regex::new(r"(?:^|[\s(\[`'\x22,;])(/?(?:[\w.~-]+/)*[\w.~-]+\.[A-Za-z0-9]+):(\d+)(?:\s*[-–]\s*(\d+))?")
            .unwrap_or_else(|e| panic!("citation pattern: {e}"))
    })
}

/// Citations found in free text, in order, without repeats.
pub fn extract(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in pattern().captures_iter(text) {
        let s = match c.get(3) {
            Some(end) => format!("{}:{}-{}", &c[1], &c[2], end.as_str()),
            None => format!("{}:{}", &c[1], &c[2]),
        };
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// Split citations into (valid, invalid). A valid one names a context file
/// (its display path, or a unique path suffix of one) and a range inside it;
/// it is rewritten with the file's display path.
pub fn check(cited: &[String], files: &[FileLines]) -> (Vec<String>, Vec<String>) {
    let mut valid = Vec::new();
    let mut invalid = Vec::new();
    for c in cited {
        match resolve(c, files) {
            Some(v) => {
                if !valid.contains(&v) {
                    valid.push(v);
                }
            }
            None => invalid.push(c.clone()),
        }
    }
    (valid, invalid)
}

fn resolve(c: &str, files: &[FileLines]) -> Option<String> {
    let (path, range) = c.rsplit_once(':')?;
    let (start, end) = match range.split_once('-') {
        Some((a, b)) => (a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?),
        None => {
            let l = range.trim().parse::<u32>().ok()?;
            (l, l)
        }
    };
    let path = path.trim().trim_start_matches("./");
    let exact = files.iter().find(|f| f.display == path);
    let file = match exact {
        Some(f) => f,
        None => {
            let suffix = format!("/{path}");
            let mut m = files.iter().filter(|f| f.display.ends_with(&suffix));
            let first = m.next()?;
            if m.next().is_some() {
                return None; // ambiguous
            }
            first
        }
    };
    if start == 0 || start > end || end > file.lines {
        return None;
    }
    Some(if start == end {
        format!("{}:{start}", file.display)
    } else {
        format!("{}:{start}-{end}", file.display)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> Vec<FileLines> {
        vec![
            FileLines {
                display: "docs/ARCHITECTURE.md".into(),
                lines: 200,
            },
            FileLines {
                display: "NOTES.md".into(),
                lines: 10,
            },
            FileLines {
                display: "a/x.md".into(),
                lines: 5,
            },
            FileLines {
                display: "b/x.md".into(),
                lines: 5,
            },
        ]
    }

    #[test]
    fn extracts_ranges_and_single_lines() {
        let t =
            "See docs/ARCHITECTURE.md:12-30 and (NOTES.md:4), also `NOTES.md:4` again; x.rs:1 – 3";
        assert_eq!(
            extract(t),
            vec!["docs/ARCHITECTURE.md:12-30", "NOTES.md:4", "x.rs:1-3"]
        );
        assert!(extract("no citations: 12:30 pm, ratio 3:4").is_empty());
        assert_eq!(
            extract("(/tmp/x/NOTES.md:1-2)"),
            vec!["/tmp/x/NOTES.md:1-2"]
        );
    }

    #[test]
    fn sorts_valid_from_invalid() {
        let cited: Vec<String> = [
            "docs/ARCHITECTURE.md:12-30",
            "ARCHITECTURE.md:190-200",
            "NOTES.md:9",
            "NOTES.md:9-11",
            "NOTES.md:0",
            "NOTES.md:5-4",
            "MISSING.md:1-2",
            "x.md:1-2",
        ]
        .map(String::from)
        .to_vec();
        let (valid, invalid) = check(&cited, &files());
        assert_eq!(
            valid,
            vec![
                "docs/ARCHITECTURE.md:12-30",
                "docs/ARCHITECTURE.md:190-200",
                "NOTES.md:9"
            ]
        );
        assert_eq!(
            invalid,
            vec![
                "NOTES.md:9-11",
                "NOTES.md:0",
                "NOTES.md:5-4",
                "MISSING.md:1-2",
                "x.md:1-2"
            ]
        );
    }
}
