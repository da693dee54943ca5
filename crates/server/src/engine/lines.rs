//! What the best line is chosen from: the units of a passage ([`units`]:
//! a sentence of prose over its wrapped lines, a table row with its
//! header, a line of code) that [`super::index::Index::best_line`] scores.

/// The most lines a sentence chosen as the best line may span; a longer
/// one is judged line by line.
pub const MAX_SENTENCE_LINES: usize = 3;

/// One unit of a passage: its first and last line (indexes into the
/// passage's lines, inclusive) and, for a table row, its table's header
/// row.
pub type Unit = (usize, usize, Option<usize>);

/// The units the best line is chosen from, as inclusive ranges of `lines`
/// (a passage's): sentences of prose paragraphs of at most
/// [`MAX_SENTENCE_LINES`] lines (a longer one split into its lines), and
/// one line for each table row, line of code and line that is not prose.
/// A line where one sentence ends and the next begins is in both.
/// Headings, fences, a table's header row and lines with no letter or
/// digit are in none: a table row comes with its header row, whose words
/// it is judged with, as they name what its cells are.
pub fn units(lines: &[&str]) -> Vec<Unit> {
    let mut out: Vec<Unit> = Vec::new();
    let mut code = false;
    // The header row of the table being read.
    let mut header: Option<usize> = None;
    // The open sentence's first line.
    let mut open: Option<usize> = None;
    let close = |out: &mut Vec<Unit>, a: usize, b: usize| {
        if b - a < MAX_SENTENCE_LINES {
            out.push((a, b, None));
        } else {
            out.extend((a..=b).map(|i| (i, i, None)));
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
        if let Some(a) = open
            && (!prose || item)
        {
            close(&mut out, a, i - 1);
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
                out.push((i, i, header));
            }
            continue;
        }
        if !prose {
            out.push((i, i, None));
            continue;
        }
        let a = open.unwrap_or(i);
        match last_sentence_end(t) {
            Some(end) if end == t.len() => {
                close(&mut out, a, i);
                open = None;
            }
            // One sentence ends inside the line, another runs on.
            Some(_) => {
                close(&mut out, a, i);
                open = Some(i);
            }
            None => open = Some(a),
        }
    }
    if let Some(a) = open {
        close(&mut out, a, lines.len() - 1);
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

/// Where the last sentence that ends in `t` ends (the byte after its
/// `.`, `?`, `!` or `:` and any closing quotes, brackets or emphasis),
/// when one does: at the end of the line, or before a space.
fn last_sentence_end(t: &str) -> Option<usize> {
    let b = t.as_bytes();
    let mut found = None;
    for (i, &c) in b.iter().enumerate() {
        if !matches!(c, b'.' | b'?' | b'!' | b':') {
            continue;
        }
        let mut j = i + 1;
        while j < b.len() && matches!(b[j], b'"' | b'\'' | b')' | b']' | b'*' | b'_' | b'`') {
            j += 1;
        }
        if j == b.len() || b[j] == b' ' {
            found = Some(j);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(text: &str) -> Vec<(usize, usize, Option<usize>)> {
        units(&text.lines().collect::<Vec<_>>())
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
