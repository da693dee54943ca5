//! What the best line is chosen from: the units of a passage ([`units`]:
//! a sentence of prose over its wrapped lines, a table row with its
//! header, a line of code) that [`super::index::Index::best_line`] scores.

/// The most lines a sentence chosen as the best line may span; a longer
/// one is judged line by line.
pub const MAX_SENTENCE_LINES: usize = 3;

/// One unit of a passage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    /// Its first and last line (indexes into the passage's lines,
    /// inclusive).
    pub first: usize,
    /// See `first`.
    pub last: usize,
    /// Where it starts in its first line (bytes; a sentence that begins
    /// after another ended mid-line).
    pub from: usize,
    /// Where it ends in its last line (bytes; None: at the line's end).
    pub to: Option<usize>,
    /// For a table row, its table's header row.
    pub header: Option<usize>,
}

impl Unit {
    /// All of line `i`.
    fn line(i: usize, header: Option<usize>) -> Unit {
        Unit {
            first: i,
            last: i,
            from: 0,
            to: None,
            header,
        }
    }

    /// The unit's text in each of its lines of `lines`, in order (the
    /// header row not included).
    pub fn parts<'a>(&self, lines: &[&'a str]) -> impl Iterator<Item = &'a str> {
        let (first, last, from, to) = (self.first, self.last, self.from, self.to);
        lines[first..=last].iter().enumerate().map(move |(k, l)| {
            let end = match to {
                Some(e) if first + k == last => e,
                _ => l.len(),
            };
            let start = if k == 0 { from.min(end) } else { 0 };
            &l[start..end]
        })
    }
}

/// The units the best line is chosen from, in `lines` (a passage's):
/// sentences of prose paragraphs of at most [`MAX_SENTENCE_LINES`] lines
/// (a longer one split into its lines), each from where it starts to where
/// it ends, mid-line if need be; and one line for each table row, line of
/// code and line that is not prose. Headings, fences, a table's header row
/// and lines with no letter or digit are in none: a table row comes with
/// its header row, whose words it is judged with, as they name what its
/// cells are.
pub fn units(lines: &[&str]) -> Vec<Unit> {
    let mut out: Vec<Unit> = Vec::new();
    let mut code = false;
    // The header row of the table being read.
    let mut header: Option<usize> = None;
    // The open sentence's first line and where in it it starts.
    let mut open: Option<(usize, usize)> = None;
    let close = |out: &mut Vec<Unit>, (first, from): (usize, usize), last: usize, to| {
        if last - first < MAX_SENTENCE_LINES {
            out.push(Unit {
                first,
                last,
                from,
                to,
                header: None,
            });
        } else {
            out.extend((first..=last).map(|i| Unit::line(i, None)));
        }
    };
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        let fence = t.starts_with("```") || t.starts_with("~~~");
        if fence {
            code = !code;
        }
        let usable = !t.starts_with('#') && t.chars().any(char::is_alphanumeric);
        let row = !code && t.starts_with('|');
        let prose = usable
            && !code
            && !fence
            && !row
            && !line.starts_with("    ")
            && !line.starts_with('\t');
        // A list item, a blank line, a heading or any other kind of line
        // ends the open sentence (a list item also starts one).
        let item = prose && is_item(t);
        if let Some(o) = open
            && (!prose || item)
        {
            close(&mut out, o, i - 1, None);
            open = None;
        }
        if !row {
            header = None;
        }
        if !usable {
            continue;
        }
        if row {
            if lines.get(i + 1).is_some_and(|n| is_rule(n.trim())) {
                header = Some(i);
            } else {
                out.push(Unit::line(i, header));
            }
            continue;
        }
        if !prose {
            out.push(Unit::line(i, None));
            continue;
        }
        let lead = line.len() - line.trim_start().len();
        let mut o = open.unwrap_or((i, lead));
        open = Some(o);
        for end in sentence_ends(t) {
            if end == t.len() {
                close(&mut out, o, i, None);
                open = None;
            } else {
                // The next sentence starts after the spaces that follow.
                close(&mut out, o, i, Some(lead + end));
                o = (i, lead + t.len() - t[end..].trim_start().len());
                open = Some(o);
            }
        }
    }
    if let Some(o) = open {
        close(&mut out, o, lines.len() - 1, None);
    }
    out
}

/// A table's rule line (`|---|:--:|`).
fn is_rule(t: &str) -> bool {
    t.starts_with('|') && t.contains('-') && t.bytes().all(|c| b"|-: ".contains(&c))
}

/// A list item's first line (`- `, `* `, `+ `, `1. `, `1) `).
fn is_item(t: &str) -> bool {
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    t.starts_with("- ")
        || t.starts_with("* ")
        || t.starts_with("+ ")
        || (digits > 0 && (t[digits..].starts_with(". ") || t[digits..].starts_with(") ")))
}

/// Where each sentence that ends in `t` ends (the byte after its `.`,
/// `?`, `!` or `:` and any closing quotes, brackets or emphasis): at the
/// end of the line, or before a space.
fn sentence_ends(t: &str) -> impl Iterator<Item = usize> + '_ {
    let b = t.as_bytes();
    b.iter().enumerate().filter_map(move |(i, &c)| {
        if !matches!(c, b'.' | b'?' | b'!' | b':') {
            return None;
        }
        let mut j = i + 1;
        while j < b.len() && matches!(b[j], b'"' | b'\'' | b')' | b']' | b'*' | b'_' | b'`') {
            j += 1;
        }
        (j == b.len() || b[j] == b' ').then_some(j)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(text: &str) -> Vec<(usize, usize, Option<usize>)> {
        units(&text.lines().collect::<Vec<_>>())
            .iter()
            .map(|u| (u.first, u.last, u.header))
            .collect()
    }

    fn texts(text: &str) -> Vec<String> {
        let lines: Vec<&str> = text.lines().collect();
        units(&lines)
            .iter()
            .map(|u| u.parts(&lines).map(str::trim).collect::<Vec<_>>().join(" "))
            .collect()
    }

    #[test]
    fn a_sentence_wrapped_over_lines_is_one_unit() {
        let text = "It is fast. You should expect about 500\n\
                    megabytes per second, depending on\n\
                    your data.\n\
                    \n\
                    Next.";
        assert_eq!(
            of(text),
            vec![(0, 0, None), (0, 2, None), (4, 4, None)],
            "the line where one sentence ends and another begins is in both"
        );
        // Each from where it starts to where it ends.
        assert_eq!(
            texts(text),
            [
                "It is fast.",
                "You should expect about 500 megabytes per second, depending on your data.",
                "Next."
            ]
        );
        assert_eq!(
            texts("  One ends here.  Two starts\nand ends. Three."),
            ["One ends here.", "Two starts and ends.", "Three."]
        );
    }

    #[test]
    fn a_sentence_longer_than_the_cap_is_judged_line_by_line() {
        let text = "one\ntwo\nthree\nfour ends.";
        assert_eq!(
            of(text),
            vec![(0, 0, None), (1, 1, None), (2, 2, None), (3, 3, None)]
        );
    }

    #[test]
    fn list_items_headings_and_code_are_units_of_their_own() {
        let text = "# Heading\n\
                    - first item\n  \
                    continued\n\
                    - second item.\n\
                    ```\n\
                    let x = 1\n\
                    ```\n\
                    ---";
        assert_eq!(
            of(text),
            vec![(1, 2, None), (3, 3, None), (5, 5, None)],
            "no heading, fence or rule"
        );
    }

    #[test]
    fn table_rows_come_with_their_header_which_is_no_unit() {
        let text = "| code | meaning |\n|---|---|\n| 6 | bridge busy |\n| 7 | gone |\nAfter.";
        assert_eq!(
            of(text),
            vec![(2, 2, Some(0)), (3, 3, Some(0)), (4, 4, None)]
        );
        // A table without a rule line has no header.
        assert_eq!(of("| a | b |\n| c | d |"), vec![(0, 0, None), (1, 1, None)]);
    }
}
