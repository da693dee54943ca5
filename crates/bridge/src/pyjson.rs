//! JSON as Python writes it, read leniently.
//!
//! Coordinators are Python programs, and `json.dumps` writes text that strict
//! JSON parsers (serde_json) refuse:
//!
//! - a `str` holding a lone surrogate (what `os.fsdecode` makes of a file
//!   name that is not UTF-8) is written as an escape such as `\udce9`;
//! - `float('nan')` and infinities are written as `NaN`, `Infinity`,
//!   `-Infinity`;
//! - a writer that builds JSON by hand may leave a raw control character
//!   (a NUL byte) inside a string, which Python's `json.loads(strict=False)`
//!   accepts.
//!
//! [`sanitize`] turns such text into JSON serde_json accepts: lone
//! surrogate escapes become `\ufffd` (U+FFFD, as Rust strings cannot hold a
//! surrogate), raw control characters in strings become `\u00XX` escapes
//! (NUL is kept, as `\u0000`), and `NaN`/`Infinity` outside strings become
//! `null`. Valid JSON passes through unchanged.
//!
//! So that an asker's id still matches exactly, [`top_level_string`] finds a
//! key's string literal in the original text, and [`python_escape`] writes
//! its code units back the way `json.dumps` does (ASCII, `\uXXXX` for the
//! rest), lone surrogates included.

use std::borrow::Cow;

/// Make Python-written JSON acceptable to serde_json (see the module doc).
/// Returns the text unchanged when there was nothing to fix.
pub fn sanitize(text: &str) -> Cow<'_, str> {
    if !needs_fixing(text) {
        return Cow::Borrowed(text);
    }
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 16);
    let mut i = 0;
    let mut in_string = false;
    // Copy runs of untouched bytes at once; `start` is where the run began.
    let mut start = 0;
    while i < b.len() {
        let c = b[i];
        if !in_string {
            if c == b'"' {
                in_string = true;
                i += 1;
                continue;
            }
            let lit = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|l| b[i..].starts_with(l.as_bytes()));
            if let Some(l) = lit {
                out.push_str(&text[start..i]);
                out.push_str("null");
                i += l.len();
                start = i;
                continue;
            }
            i += 1;
            continue;
        }
        match c {
            b'"' => {
                in_string = false;
                i += 1;
            }
            b'\\' if b.get(i + 1) == Some(&b'u') => {
                let Some(unit) = hex4(b, i + 2) else {
                    // A broken escape: serde_json will refuse it; so be it.
                    i += 2;
                    continue;
                };
                if (0xD800..0xDC00).contains(&unit) {
                    let low = (b.get(i + 6) == Some(&b'\\') && b.get(i + 7) == Some(&b'u'))
                        .then(|| hex4(b, i + 8))
                        .flatten();
                    if low.is_some_and(|l| (0xDC00..0xE000).contains(&l)) {
                        i += 12; // a proper pair
                        continue;
                    }
                    out.push_str(&text[start..i]);
                    out.push_str("\\ufffd");
                    i += 6;
                    start = i;
                } else if (0xDC00..0xE000).contains(&unit) {
                    out.push_str(&text[start..i]);
                    out.push_str("\\ufffd");
                    i += 6;
                    start = i;
                } else {
                    i += 6;
                }
            }
            b'\\' => i += 2,
            c if c < 0x20 => {
                out.push_str(&text[start..i]);
                out.push_str(&format!("\\u{c:04x}"));
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&text[start.min(text.len())..]);
    Cow::Owned(out)
}

/// A quick look for anything [`sanitize`] would change, so that ordinary
/// JSON costs one scan and no copy.
fn needs_fixing(text: &str) -> bool {
    // Any control character: raw newlines between tokens are fine, but
    // telling them from ones inside strings takes the full scan.
    text.bytes().any(|c| c < 0x20)
        || text.contains("\\ud")
        || text.contains("\\uD")
        || text.contains("NaN")
        || text.contains("Infinity")
}

fn hex4(b: &[u8], at: usize) -> Option<u16> {
    let s = std::str::from_utf8(b.get(at..at + 4)?).ok()?;
    if !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(s, 16).ok()
}

/// Where the string starting at `b[i] == '"'` ends: the index after its
/// closing quote.
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    None
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The index after the JSON value starting at `b[i]`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            Some(j)
        }
    }
}

/// The body (between the quotes, escapes as written) of the string value of
/// `key` in the top-level object of `text`; the last one when the key
/// repeats (as `json.loads` and serde_json keep the last). `None` when the
/// text is not an object, the key is absent, or its value is not a string.
/// Keys are compared as written (an escaped key is not recognised).
pub fn top_level_string<'t>(text: &'t str, key: &str) -> Option<&'t str> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut found = None;
    loop {
        i = skip_ws(b, i);
        match b.get(i)? {
            b'}' => return found,
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let k_end = string_end(b, i)?;
        let k = &text[i + 1..k_end - 1];
        i = skip_ws(b, k_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let v_end = value_end(b, i)?;
        if k == key {
            found = (b.get(i) == Some(&b'"')).then(|| &text[i + 1..v_end - 1]);
        }
        i = v_end;
    }
}

/// The UTF-16 code units a JSON string body stands for (escapes decoded,
/// lone surrogates kept, raw characters as they are). `None` on a broken
/// escape.
pub fn decode_units(body: &str) -> Option<Vec<u16>> {
    let b = body.as_bytes();
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            // Copy the run of plain characters up to the next escape.
            let end = body[i..].find('\\').map_or(body.len(), |n| i + n);
            out.extend(body[i..end].encode_utf16());
            i = end;
            continue;
        }
        let unit = match *b.get(i + 1)? {
            b'"' => u16::from(b'"'),
            b'\\' => u16::from(b'\\'),
            b'/' => u16::from(b'/'),
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => u16::from(b'\n'),
            b'r' => u16::from(b'\r'),
            b't' => u16::from(b'\t'),
            b'u' => {
                let u = hex4(b, i + 2)?;
                out.push(u);
                i += 6;
                continue;
            }
            _ => return None,
        };
        out.push(unit);
        i += 2;
    }
    Some(out)
}

/// Whether `units` hold a surrogate that is not part of a pair (a string
/// Rust cannot represent exactly).
pub fn has_lone_surrogate(units: &[u16]) -> bool {
    char::decode_utf16(units.iter().copied()).any(|c| c.is_err())
}

/// A JSON string body (no quotes) for `units`, as Python's `json.dumps`
/// writes it with its default `ensure_ascii=True`: printable ASCII as is,
/// `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, and `\uXXXX` (lower-case hex)
/// for every other code unit, lone surrogates included. Equal strings give
/// equal text, so it doubles as a canonical key.
pub fn python_escape(units: &[u16]) -> String {
    let mut out = String::with_capacity(units.len());
    for &u in units {
        match u {
            0x22 => out.push_str("\\\""),
            0x5c => out.push_str("\\\\"),
            0x0a => out.push_str("\\n"),
            0x0d => out.push_str("\\r"),
            0x09 => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            0x20..=0x7e => out.push(char::from(u as u8)),
            _ => out.push_str(&format!("\\u{u:04x}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parse(text: &str) -> Value {
        serde_json::from_str(&sanitize(text)).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn valid_json_passes_unchanged_and_uncopied() {
        for t in [
            r#"{"type":"query","query_id":"q-1","question":"why?"}"#,
            "{\n  \"a\": [1, 2.5, \"\\ud83d\\ude00\"]\n}",
            r#"{"nan":"NaN is fine inside a string"}"#,
        ] {
            assert_eq!(sanitize(t), t);
        }
        assert!(matches!(sanitize(r#"{"a":"b"}"#), Cow::Borrowed(_)));
    }

    #[test]
    fn lone_surrogates_become_replacement_characters() {
        // json.dumps({"f": os.fsdecode(b"caf\xe9")}) == '{"f": "caf\\udce9"}'
        assert_eq!(parse(r#"{"f": "caf\udce9"}"#)["f"], "caf\u{fffd}");
        assert_eq!(parse(r#"{"f": "\ud800x"}"#)["f"], "\u{fffd}x");
        assert_eq!(parse(r#"{"f": "\ud800\ud800"}"#)["f"], "\u{fffd}\u{fffd}");
        // A proper pair stays a pair; an escaped backslash is no escape.
        assert_eq!(parse(r#"{"f": "\ud83d\ude00"}"#)["f"], "\u{1f600}");
        assert_eq!(parse(r#"{"f": "\\udce9"}"#)["f"], "\\udce9");
    }

    #[test]
    fn raw_control_characters_and_python_floats() {
        assert_eq!(parse("{\"q\": \"a\u{0}b\tc\nd\"}")["q"], "a\u{0}b\tc\nd");
        let v = parse(r#"{"x": NaN, "y": [Infinity, -Infinity], "s": "NaN"}"#);
        assert_eq!(v["x"], Value::Null);
        assert_eq!(v["y"], serde_json::json!([null, null]));
        assert_eq!(v["s"], "NaN");
    }

    #[test]
    fn finds_top_level_string_literals_as_written() {
        let t = r#" {"type": "query", "nested": {"query_id": "no"}, "list": ["query_id", {"a": "}"}],
                    "query_id" : "q-\udce9\"x", "n": 5}"#;
        assert_eq!(top_level_string(t, "query_id"), Some(r#"q-\udce9\"x"#));
        assert_eq!(top_level_string(t, "type"), Some("query"));
        assert_eq!(top_level_string(t, "n"), None);
        assert_eq!(
            top_level_string(r#"{"query_id":"a","query_id":"b"}"#, "query_id"),
            Some("b")
        );
        assert_eq!(top_level_string("plain text", "query_id"), None);
        assert_eq!(top_level_string(r#"["query_id"]"#, "query_id"), None);
    }

    #[test]
    fn python_escape_matches_json_dumps() {
        // python3 -c 'import json; print(json.dumps("q-\udce9\u00e9\"\\\n\x00\x7f\U0001f600"))'
        let units = decode_units(r#"q-\udce9\u00e9\"\\\n\u0000\u007f\ud83d\ude00"#).unwrap();
        assert!(has_lone_surrogate(&units));
        assert_eq!(
            python_escape(&units),
            r#"q-\udce9\u00e9\"\\\n\u0000\u007f\ud83d\ude00"#
        );
        let plain: Vec<u16> = "q-é".encode_utf16().collect();
        assert!(!has_lone_surrogate(&plain));
        assert_eq!(decode_units("q-é").unwrap(), plain);
        assert!(decode_units(r"bad \x escape").is_none());
    }
}
