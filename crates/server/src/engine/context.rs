//! Context files: finding them under `--context` paths, reading them, and
//! splitting them into passages that keep their line ranges.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// File extensions taken from directories (case-insensitive).
const TEXT_EXTENSIONS: &[&str] = &["md", "markdown", "mdx", "txt", "text", "rst", "adoc", "org"];
/// Directories never descended into.
const SKIP_DIRS: &[&str] = &["target", "node_modules"];
/// A passage closes at a blank line once it has this many lines (so a
/// table keeps its caption and the line under it, a command its note)...
const MIN_LINES: usize = 8;
/// ...and is cut at this many lines regardless.
const MAX_LINES: usize = 40;

/// A span of lines of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passage {
    /// First line, 1-based.
    pub start_line: u32,
    /// Last line, inclusive.
    pub end_line: u32,
    /// Byte range of those lines in the file's text.
    pub bytes: std::ops::Range<usize>,
    /// The markdown headings above it (`Claims > Expiry`), empty if none;
    /// one string shared by the passages under the same headings.
    pub heading: Arc<str>,
}

/// What identifies a version of a file on disk without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    len: u64,
    mtime_ns: i128,
    ino: u64,
}

impl Signature {
    /// The signature of the file at `path` now.
    pub fn of(path: &Path) -> std::io::Result<Signature> {
        let md = std::fs::metadata(path)?;
        Ok(Signature {
            len: md.len(),
            mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
            ino: md.ino(),
        })
    }
}

/// A loaded context file.
#[derive(Debug, Clone)]
pub struct ContextFile {
    /// How sources cite it (the path as given under `--context`, without `./`).
    pub display: String,
    /// Where in `display` the part below its context root begins
    /// ([`Found::rel`]).
    pub rel: usize,
    /// The file's text.
    pub text: Arc<str>,
    /// SHA-256 of the text.
    pub hash: [u8; 32],
    /// On-disk signature when read.
    pub signature: Signature,
    /// Its passages, in order.
    pub passages: Vec<Passage>,
    /// Number of lines.
    pub lines: u32,
}

/// A file found under a `--context` root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Where it is.
    pub path: PathBuf,
    /// How to cite it.
    pub display: String,
    /// Where in `display` the part below its context root begins (for a
    /// file named directly, its name): the words a file's path lends its
    /// passages come from there, not from the folders above the root,
    /// which every file shares (and which, for a temporary folder, differ
    /// from run to run).
    pub rel: usize,
    /// Named directly on the command line (its failures are fatal at start).
    pub explicit: bool,
}

/// How a file at `path` is cited: the path as walked, without `./`.
pub fn display_of(path: &Path) -> String {
    let s = path.to_string_lossy();
    s.strip_prefix("./").unwrap_or(&s).to_string()
}

fn is_text_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| TEXT_EXTENSIONS.iter().any(|t| t.eq_ignore_ascii_case(e)))
}

/// The files under `roots`: a root that is a file is taken as is; a directory
/// is walked for text and markdown files, skipping hidden entries, `target`
/// and `node_modules`. Sorted by display path, duplicates removed.
pub fn discover(roots: &[PathBuf]) -> Result<Vec<Found>, String> {
    let mut out: BTreeMap<String, Found> = BTreeMap::new();
    for root in roots {
        let md = std::fs::metadata(root).map_err(|e| format!("context {}: {e}", root.display()))?;
        if md.is_file() {
            let display = display_of(root);
            out.insert(
                display.clone(),
                Found {
                    path: root.clone(),
                    rel: rel_of(&display, root),
                    display,
                    explicit: true,
                },
            );
        } else if md.is_dir() {
            walk(root, root, &mut out).map_err(|e| format!("context {}: {e}", root.display()))?;
        } else {
            return Err(format!(
                "context {}: not a file or directory",
                root.display()
            ));
        }
    }
    Ok(out.into_values().collect())
}

/// Whether an entry named `name` in a context folder can matter to
/// [`discover`]: a folder it descends into, or a file it takes.
pub fn relevant_name(name: &std::ffi::OsStr, is_dir: bool) -> bool {
    let n = name.to_string_lossy();
    if n.starts_with('.') {
        false
    } else if is_dir {
        !SKIP_DIRS.contains(&n.as_ref())
    } else {
        is_text_file(Path::new(name))
    }
}

/// What to watch for changes to the files under `roots`: every folder
/// [`discover`] walks (with `None`), and the folder of each file named
/// directly (with that file's name, the only one that counts there, and the
/// root as given). Roots that are missing, and folders that cannot be read,
/// are left out.
pub fn watch_targets(roots: &[PathBuf]) -> Vec<(PathBuf, Option<(std::ffi::OsString, PathBuf)>)> {
    type Target = (PathBuf, Option<(std::ffi::OsString, PathBuf)>);
    fn dirs(dir: &Path, out: &mut Vec<Target>) {
        out.push((dir.to_path_buf(), None));
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) && relevant_name(&e.file_name(), true) {
                dirs(&e.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    for root in roots {
        match std::fs::metadata(root) {
            Ok(md) if md.is_dir() => dirs(root, &mut out),
            Ok(_) => {
                let parent = match root.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                if let Some(name) = root.file_name() {
                    out.push((parent, Some((name.to_os_string(), root.clone()))));
                }
            }
            Err(_) => {}
        }
    }
    out
}

/// What [`discover`] would find at `path` alone, a file or a folder that
/// the walk of `roots` reaches (as inotify names them: a watched folder
/// joined with an entry name it let through): the path itself if it is a
/// text file (or a root named directly), every text file under it if it is
/// a folder, nothing if it is gone. Fails when a folder cannot be read or
/// a root is missing.
pub fn discover_at(roots: &[PathBuf], path: &Path) -> Result<Vec<Found>, String> {
    let err = |e: std::io::Error| format!("context {}: {e}", path.display());
    let explicit = roots.iter().any(|r| r == path);
    let lmd = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        // A root named on the command line must be there (as for `discover`).
        Err(e) if explicit => return Err(err(e)),
        Err(_) => return Ok(Vec::new()),
    };
    // The root it lies under (the longest, if roots nest).
    let root = roots
        .iter()
        .filter(|r| path.starts_with(r))
        .max_by_key(|r| r.as_os_str().len())
        .map_or(path, PathBuf::as_path);
    if lmd.is_dir() {
        let mut out = BTreeMap::new();
        walk(path, root, &mut out).map_err(err)?;
        return Ok(out.into_values().collect());
    }
    let is_file = path.is_file();
    if is_file && (explicit || is_text_file(path)) {
        let display = display_of(path);
        return Ok(vec![Found {
            path: path.to_path_buf(),
            rel: rel_of(&display, root),
            display,
            explicit,
        }]);
    }
    Ok(Vec::new())
}

/// Where in `display` (a file's, [`display_of`]) the part below `root`
/// begins: after the root and its slash when the file is under it, else
/// at its name.
fn rel_of(display: &str, root: &Path) -> usize {
    let r = display_of(root);
    let r = r.trim_end_matches('/');
    if r == "." || r.is_empty() {
        // `--context .` (what is walked is cited without `./`), or `/`.
        return 0;
    }
    if display.len() > r.len() + 1 && display.starts_with(r) && display.as_bytes()[r.len()] == b'/'
    {
        r.len() + 1
    } else {
        display.rfind('/').map_or(0, |i| i + 1)
    }
}

fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, Found>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let path = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            if !SKIP_DIRS.contains(&name.as_ref()) {
                walk(&path, root, out)?;
            }
        } else if is_text_file(&path) && (ft.is_file() || ft.is_symlink() && path.is_file()) {
            let display = display_of(&path);
            out.insert(
                display.clone(),
                Found {
                    rel: rel_of(&display, root),
                    display,
                    path,
                    explicit: false,
                },
            );
        }
    }
    Ok(())
}

/// Read and split one file. Fails on I/O errors and invalid UTF-8.
pub fn load(found: &Found) -> Result<ContextFile, String> {
    let signature =
        Signature::of(&found.path).map_err(|e| format!("{}: {e}", found.path.display()))?;
    let bytes = std::fs::read(&found.path).map_err(|e| format!("{}: {e}", found.path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        format!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            found.path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let hash: [u8; 32] = Sha256::digest(text.as_bytes()).into();
    let (passages, lines) = split(&text);
    Ok(ContextFile {
        display: found.display.clone(),
        rel: found.rel,
        text: text.into(),
        hash,
        signature,
        passages,
        lines,
    })
}

fn heading_level(trimmed: &str) -> Option<(usize, &str)> {
    let level = trimmed.bytes().take_while(|&b| b == b'#').count();
    if (1..=6).contains(&level) {
        let rest = &trimmed[level..];
        if rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\t') {
            return Some((level, rest.trim().trim_end_matches('#').trim()));
        }
    }
    None
}

/// Split text into passages: a markdown heading starts a new passage; a blank
/// line ends one that has at least 8 lines; none grows past 40 lines; blank
/// lines inside fenced code blocks do not split. Lines with no letter or
/// digit (`---`, `***`, a lone fence) are not body: a passage of such lines
/// and headings alone runs on into the next one, and at the end of a file
/// joins the passage before it. Returns the passages and the number of
/// lines.
pub fn split(text: &str) -> (Vec<Passage>, u32) {
    struct Open {
        start: usize,
        last: usize,
        byte_start: usize,
        byte_end: usize,
        /// Lines that are not headings: a passage of headings alone has
        /// nothing to quote, so it runs on into the next one.
        body: usize,
    }
    impl Open {
        /// A passage starting (and, so far, ending) at line `i`.
        fn at(i: usize, byte_start: usize, byte_end: usize, body: usize) -> Open {
            Open {
                start: i,
                last: i,
                byte_start,
                byte_end,
                body,
            }
        }
    }
    let mut out = Vec::new();
    let mut headings: Vec<(usize, String)> = Vec::new();
    let mut cur: Option<Open> = None;
    let mut in_fence = false;
    let mut offset = 0usize;
    let mut n = 0usize;
    let close = |cur: &mut Option<Open>, headings: &[(usize, String)], out: &mut Vec<Passage>| {
        if let Some(o) = cur.take() {
            let joined = headings
                .iter()
                .map(|(_, h)| h.as_str())
                .collect::<Vec<_>>()
                .join(" > ");
            let heading = match out.last() {
                Some(p) if *p.heading == *joined => p.heading.clone(),
                _ => Arc::from(joined),
            };
            out.push(Passage {
                start_line: (o.start + 1) as u32,
                end_line: (o.last + 1) as u32,
                bytes: o.byte_start..o.byte_end,
                heading,
            });
        }
    };
    for (i, raw) in text.split_inclusive('\n').enumerate() {
        n = i + 1;
        let line_start = offset;
        offset += raw.len();
        let line_end = line_start + raw.trim_end_matches(['\n', '\r']).len();
        let trimmed = raw.trim();
        let fence = trimmed.starts_with("```") || trimmed.starts_with("~~~");
        if !in_fence && !fence {
            if let Some((level, title)) = heading_level(trimmed) {
                if cur.as_ref().is_some_and(|o| o.body > 0) {
                    close(&mut cur, &headings, &mut out);
                }
                headings.retain(|(l, _)| *l < level);
                headings.push((level, title.to_string()));
                match cur.as_mut() {
                    // Headings with nothing under them yet run on.
                    Some(o) => {
                        o.last = i;
                        o.byte_end = line_end;
                    }
                    None => cur = Some(Open::at(i, line_start, line_end, 0)),
                }
                continue;
            }
            if trimmed.is_empty() {
                if cur
                    .as_ref()
                    .is_some_and(|o| o.body > 0 && o.last - o.start + 1 >= MIN_LINES)
                {
                    close(&mut cur, &headings, &mut out);
                }
                continue;
            }
        }
        if fence {
            in_fence = !in_fence;
        }
        if in_fence && trimmed.is_empty() && cur.is_none() {
            continue;
        }
        let body = usize::from(trimmed.chars().any(char::is_alphanumeric));
        match cur.as_mut() {
            Some(o) => {
                o.last = i;
                o.byte_end = line_end;
                o.body += body;
            }
            None => cur = Some(Open::at(i, line_start, line_end, body)),
        }
        let limit = if in_fence { 2 * MAX_LINES } else { MAX_LINES };
        if cur.as_ref().is_some_and(|o| o.last - o.start + 1 >= limit) {
            close(&mut cur, &headings, &mut out);
        }
    }
    // Trailing lines with nothing to quote (`---`) join the passage before.
    if let (Some(o), Some(last)) = (cur.as_ref(), out.last_mut())
        && o.body == 0
    {
        last.end_line = (o.last + 1) as u32;
        last.bytes.end = o.byte_end;
        cur = None;
    }
    close(&mut cur, &headings, &mut out);
    // Kept for the file's life: no spare room from doubling.
    out.shrink_to_fit();
    (out, n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(text: &str) -> Vec<(u32, u32, String)> {
        split(text)
            .0
            .into_iter()
            .map(|p| (p.start_line, p.end_line, p.heading.to_string()))
            .collect()
    }

    #[test]
    fn headings_start_passages_and_keep_line_ranges() {
        let t = "# Title\n\nintro one\nintro two\n\n## Cache\n\nWe decided to keep the cache.\nIt is small.\n\n## FIFO\npipes\n";
        assert_eq!(
            spans(t),
            vec![
                (1, 4, "Title".into()),
                (6, 9, "Title > Cache".into()),
                (11, 12, "Title > FIFO".into())
            ]
        );
        let (ps, lines) = split(t);
        assert_eq!(lines, 12);
        assert_eq!(
            &t[ps[1].bytes.clone()],
            "## Cache\n\nWe decided to keep the cache.\nIt is small."
        );
    }

    #[test]
    fn a_heading_with_no_body_runs_on_into_the_next_passage() {
        let t = "# A\n\n## B\n\n### C\ntext under c\n\n## D\nd text\n";
        assert_eq!(
            spans(t),
            vec![(1, 6, "A > B > C".into()), (8, 9, "A > D".into())]
        );
        // Closed by the next heading (no blank line): keeps its own headings.
        let t = "# A\n## B\nb1\n## C\nc1\n";
        assert_eq!(
            spans(t),
            vec![(1, 3, "A > B".into()), (4, 5, "A > C".into())]
        );
    }

    #[test]
    fn paragraphs_merge_until_eight_lines_then_split_at_blank() {
        let t = "a\nb\n\nc\nd\n\ne\nf\ng\n\nh\n";
        assert_eq!(
            spans(t),
            vec![(1, 9, String::new()), (11, 11, String::new())]
        );
    }

    #[test]
    fn a_table_with_its_caption_and_the_line_under_it_stays_one_passage() {
        let t = "## Limits\n\nTable 1: what each limit is.\n\n| limit | value |\n|---|---|\n| clients | 64 |\n\nThe clients limit counts open FIFOs.\n\n## Next\nother\n";
        assert_eq!(
            spans(t),
            vec![(1, 9, "Limits".into()), (11, 12, "Next".into())]
        );
        // A command with the note that explains it, too.
        let t = "text one\ntext two\n\n```\nautopoll ask --name x\n```\n\nNote: exits 3 when no server runs.\n";
        assert_eq!(spans(t), vec![(1, 8, String::new())]);
    }

    #[test]
    fn a_rule_line_never_forms_a_passage_of_its_own() {
        let body: String = (0..8).map(|i| format!("line {i}\n")).collect();
        // Between sections: it runs on into the next one.
        let t = format!("# A\n{body}\n---\n\n# B\nb text\n");
        assert_eq!(spans(&t), vec![(1, 9, "A".into()), (11, 14, "B".into())]);
        // At the end of the file: it joins the passage before.
        let t = format!("# A\n{body}\n---\n");
        assert_eq!(spans(&t), vec![(1, 11, "A".into())]);
        // A file of nothing else still has its passage.
        assert_eq!(spans("---\n"), vec![(1, 1, String::new())]);
    }

    #[test]
    fn long_runs_are_cut_and_fences_hold_together() {
        let long: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let s = spans(&long);
        assert_eq!(s[0], (1, 40, String::new()));
        assert_eq!(s.len(), 3);
        let fenced = "```\nx\n\ny\n\nz\n```\n";
        assert_eq!(spans(fenced), vec![(1, 7, String::new())]);
        // A '#' inside a fence is not a heading.
        assert_eq!(
            spans("```\n# not a heading\n```\n"),
            vec![(1, 3, String::new())]
        );
    }

    #[test]
    fn crlf_and_no_trailing_newline() {
        let (ps, lines) = split("one\r\ntwo");
        assert_eq!(lines, 2);
        assert_eq!((ps[0].start_line, ps[0].end_line), (1, 2));
        assert_eq!(&"one\r\ntwo"[ps[0].bytes.clone()], "one\r\ntwo");
    }

    #[test]
    fn discover_walks_text_files_only() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("sub/.hidden")).unwrap();
        std::fs::create_dir_all(d.path().join("target")).unwrap();
        for f in [
            "a.md",
            "sub/b.TXT",
            "sub/c.rs",
            "sub/.hidden/d.md",
            "target/e.md",
            ".f.md",
        ] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        let found = discover(&[d.path().to_path_buf()]).unwrap();
        let names: Vec<_> = found
            .iter()
            .map(|f| {
                f.path
                    .strip_prefix(d.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names, vec!["a.md", "sub/b.TXT"]);
        assert!(found.iter().all(|f| !f.explicit));
        assert!(discover(&[d.path().join("missing")]).is_err());
    }

    #[test]
    fn the_part_of_a_path_below_its_root_is_marked() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("notes");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.md"), "x").unwrap();
        std::fs::write(root.join("sub/b.md"), "x").unwrap();
        let below = |f: &Found| f.display[f.rel..].to_string();
        let found = discover(std::slice::from_ref(&root)).unwrap();
        assert_eq!(
            found.iter().map(below).collect::<Vec<_>>(),
            ["a.md", "sub/b.md"]
        );
        // A change named by inotify is marked as the walk marks it.
        let again = discover_at(std::slice::from_ref(&root), &root.join("sub/b.md")).unwrap();
        assert_eq!(again, vec![found[1].clone()]);
        let again = discover_at(std::slice::from_ref(&root), &root.join("sub")).unwrap();
        assert_eq!(again, vec![found[1].clone()]);
        // A file named directly: its name.
        let file = root.join("sub/b.md");
        let found = discover(std::slice::from_ref(&file)).unwrap();
        assert_eq!(below(&found[0]), "b.md");
        // A relative root, with or without a trailing slash.
        assert_eq!(rel_of("docs/a/b.md", Path::new("docs/")), 5);
        assert_eq!(rel_of("docs/a/b.md", Path::new("docs")), 5);
        assert_eq!(rel_of("docsx/b.md", Path::new("docs")), 6);
        assert_eq!(rel_of("sub/b.md", Path::new(".")), 0);
        assert_eq!(rel_of("sub/b.md", Path::new("./")), 0);
    }

    #[test]
    fn invalid_utf8_fails_to_load() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bad.md");
        std::fs::write(&p, b"ok\n\xff\xfe").unwrap();
        let e = load(&Found {
            path: p,
            display: "bad.md".into(),
            rel: 0,
            explicit: true,
        })
        .unwrap_err();
        assert!(e.contains("not UTF-8"), "{e}");
    }
}
