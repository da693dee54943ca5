//! The built-in context engine: the embedded "instance". It indexes the
//! context into passages that keep their line ranges, ranks them with BM25,
//! and answers with its best line (`FILE:LINE`) and then the best passages,
//! cited as `FILE:START-END`. It needs no
//! outside service. Context files that change on disk are reloaded by
//! [`BuiltinEngine::reload_paths`] (the paths inotify named) or
//! [`BuiltinEngine::reload`] (a walk of everything); a failed reload keeps
//! the old content of the files that failed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use autopoll_protocol::EngineInfo;

use super::context::{self, ContextFile, Found, Signature};
use super::index::{Index, Vocab};
use super::{Engine, EngineAnswer, EngineError, par};

/// How many passages an answer quotes at most.
const TOP_K: usize = 3;
/// Passages scoring below this share of the best one are left out.
const RELATIVE_CUTOFF: f32 = 0.35;
/// Longest quote of one passage, in characters.
const MAX_QUOTE: usize = 1_500;

/// A loaded file, reused while its signature holds (the signature is kept
/// here, not in the shared [`ContextFile`], so a touch without change keeps
/// the file's `Arc`, and with it its documents in the index).
struct Loaded {
    found: Found,
    signature: Signature,
    file: Arc<ContextFile>,
}

struct State {
    roots: Vec<PathBuf>,
    /// By display path: the order files are indexed and cited in.
    files: BTreeMap<String, Loaded>,
    threads: usize,
    reloads: u64,
    loaded_at: String,
    /// Files that failed to load, by display path (their old content stays).
    errors: BTreeMap<String, String>,
    /// Why the last walk failed, if it did.
    walk_error: Option<String>,
    /// What `stats` says: the errors above, joined.
    last_error: Option<String>,
    /// Compactions done in place, compactions done on a copy, and the
    /// posting lists those in place had to copy ([`BuiltinEngine::compact_live`]).
    compactions: (u64, u64, usize),
}

/// What one look at the disk found, before the index is touched.
#[derive(Default)]
struct Delta {
    changed: bool,
    read: usize,
}

/// The built-in engine.
pub struct BuiltinEngine {
    index: RwLock<Arc<Index>>,
    state: Mutex<State>,
}

impl std::fmt::Debug for BuiltinEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltinEngine")
            .field("version", &self.index().version())
            .finish_non_exhaustive()
    }
}

fn now_utc() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A file read: its signature (taken before the read) and content, or why
/// it could not be read.
type Read = Result<(Signature, ContextFile), String>;

/// Read `found` on up to `threads` threads, in order.
fn load_all(found: Vec<Found>, threads: usize) -> Vec<(Found, Read)> {
    let mut out = Vec::with_capacity(found.len());
    let mut results = Vec::with_capacity(found.len());
    par::map_ordered(
        found.len(),
        threads,
        |i| {
            let f = &found[i];
            let sig = Signature::of(&f.path).map_err(|e| format!("{}: {e}", f.path.display()))?;
            context::load(f).map(|cf| (sig, cf))
        },
        |_, r| results.push(r),
    );
    out.extend(found.into_iter().zip(results));
    out
}

impl BuiltinEngine {
    /// Load and index the context under `roots`. Fails when a root is
    /// missing, when a file named directly cannot be read as UTF-8 text, or
    /// when there is no text at all. Unreadable files found in directories
    /// are skipped with a warning.
    pub fn load(roots: &[PathBuf]) -> Result<BuiltinEngine, String> {
        BuiltinEngine::load_with(roots, par::threads())
    }

    /// [`BuiltinEngine::load`] reading and tokenising on `threads` threads
    /// (1: all on this one, the sequential reference).
    pub fn load_with(roots: &[PathBuf], threads: usize) -> Result<BuiltinEngine, String> {
        if roots.is_empty() {
            return Err("at least one --context PATH is needed: the files or folders of text/markdown the shard answers from (and, for external backends, the files the model is told to read and its citations are checked against)".into());
        }
        let threads = threads.max(1);
        let found = context::discover(roots)?;
        let mut files = BTreeMap::new();
        for (f, r) in load_all(found, threads) {
            match r {
                Ok((signature, cf)) => {
                    files.insert(
                        f.display.clone(),
                        Loaded {
                            found: f,
                            signature,
                            file: Arc::new(cf),
                        },
                    );
                }
                Err(e) if f.explicit => return Err(format!("context {e}")),
                Err(e) => log::warn!("skipping context file: {e}"),
            }
        }
        if files.is_empty() {
            return Err(format!(
                "no text or markdown files under {}",
                roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let index = Index::build(
            files.values().map(|l| l.file.clone()).collect(),
            Vocab::new(),
            threads,
        );
        release_freed_memory();
        let (table_bytes, entries) = index.table_bytes();
        log::debug!("event=index_tables bytes={table_bytes} postings={entries}");
        log::info!(
            "event=context_loaded files={} passages={} bytes={} version={}",
            files.len(),
            index.passages(),
            index.bytes(),
            index.version()
        );
        Ok(BuiltinEngine {
            index: RwLock::new(Arc::new(index)),
            state: Mutex::new(State {
                roots: roots.to_vec(),
                files,
                threads,
                reloads: 0,
                loaded_at: now_utc(),
                errors: BTreeMap::new(),
                walk_error: None,
                last_error: None,
                compactions: (0, 0, 0),
            }),
        })
    }

    /// The `--context` paths this engine reads.
    pub fn roots(&self) -> Vec<PathBuf> {
        self.state().roots.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current index.
    pub fn index(&self) -> Arc<Index> {
        match self.index.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Answer from the current index (also used by benchmarks).
    pub fn answer_now(&self, question: &str) -> EngineAnswer {
        let index = self.index();
        let hits = index.search(question, TOP_K);
        let Some(best) = hits.first().map(|h| h.score) else {
            return EngineAnswer {
                answer: format!(
                    "Nothing in the context matches this question (searched {} files, {} passages; context {}).",
                    index.files().len(),
                    index.passages(),
                    index.version()
                ),
                sources: Vec::new(),
                invalid_sources: Vec::new(),
                found: false,
                context_version: index.version().to_string(),
                meta: None,
            };
        };
        let mut answer = String::new();
        let mut sources = Vec::new();
        // The best line's file and lines (a passage they cover whole is
        // not cited again).
        let mut best_range = None;
        // The best line first, from the best passage: one line to read.
        if let Some((first, last, text)) = index.best_line(&hits[0], question) {
            best_range = Some((hits[0].file, first, last));
            let display = &index.files()[hits[0].file].display;
            let source = if first == last {
                format!("{display}:{first}")
            } else {
                format!("{display}:{first}-{last}")
            };
            answer.push_str("Best line: [");
            answer.push_str(&source);
            answer.push_str("] ");
            match text.char_indices().nth(MAX_QUOTE) {
                Some((cut, _)) => {
                    answer.push_str(&text[..cut]);
                    answer.push_str(" [...]");
                }
                None => answer.push_str(&text),
            }
            sources.push(source);
        }
        for h in hits.iter().filter(|h| h.score >= best * RELATIVE_CUTOFF) {
            let file = &index.files()[h.file];
            let p = &file.passages[h.passage];
            let source = format!("{}:{}-{}", file.display, p.start_line, p.end_line);
            if !answer.is_empty() {
                answer.push_str("\n\n");
            }
            answer.push('[');
            answer.push_str(&source);
            answer.push(']');
            if !p.heading.is_empty() {
                answer.push(' ');
                answer.push_str(&p.heading);
            }
            answer.push('\n');
            let quote = &file.text[p.bytes.clone()];
            match quote.char_indices().nth(MAX_QUOTE) {
                Some((cut, _)) => {
                    answer.push_str(&quote[..cut]);
                    answer.push_str(" [...]");
                }
                None => answer.push_str(quote),
            }
            // Cited once: a best line that is the whole passage (one
            // line, or one sentence over all of its lines) already is.
            if best_range != Some((h.file, p.start_line, p.end_line)) {
                sources.push(source);
            }
        }
        EngineAnswer {
            answer,
            sources,
            invalid_sources: Vec::new(),
            found: true,
            context_version: index.version().to_string(),
            meta: None,
        }
    }

    /// Walk every root, re-read what changed, update the index (only the
    /// changed files' posting lists, [`Index::update`]) and swap it in if
    /// anything did. O(files) system calls: the safety net, and what runs
    /// when inotify cannot say what changed. Returns whether the index
    /// changed.
    pub fn reload(&self) -> bool {
        let mut st = self.state();
        let found = match context::discover(&st.roots) {
            Ok(f) => {
                st.walk_error = None;
                f
            }
            Err(e) => {
                if st.walk_error.as_deref() != Some(e.as_str()) {
                    log::warn!("event=reload_failed reason={e:?}: keeping the old index");
                }
                st.walk_error = Some(e);
                st.last_error = joined(&st);
                return false;
            }
        };
        // Everything held is in scope: what the walk did not find is gone
        // (`found` is sorted by display path).
        let gone: Vec<String> = st
            .files
            .keys()
            .filter(|k| {
                found
                    .binary_search_by(|f| f.display.as_str().cmp(k.as_str()))
                    .is_err()
            })
            .cloned()
            .collect();
        let delta = self.apply(&mut st, gone, found);
        self.commit(&mut st, delta)
    }

    /// Re-read only `paths` (files or folders, as inotify named them: a
    /// watched folder joined with an entry name), and whatever the engine
    /// holds under them; update and swap the index if anything changed.
    /// Costs what those files cost, not what the context costs. Falls back
    /// to [`BuiltinEngine::reload`] when a folder among them cannot be read
    /// or a root named directly is missing (which the walk reports, keeping
    /// the old index), and while the last walk failed.
    /// Returns whether the index changed.
    pub fn reload_paths(&self, paths: &[PathBuf]) -> bool {
        let mut st = self.state();
        if st.walk_error.is_some() {
            // Only a walk that works clears a walk's error.
            drop(st);
            return self.reload();
        }
        let mut found: BTreeMap<String, Found> = BTreeMap::new();
        let mut scope: Vec<String> = Vec::new();
        for p in paths {
            match context::discover_at(&st.roots, p) {
                Ok(fs) => found.extend(fs.into_iter().map(|f| (f.display.clone(), f))),
                Err(e) => {
                    log::debug!("event=reload_walk reason={e:?}");
                    drop(st);
                    return self.reload();
                }
            }
            let display = context::display_of(p);
            let under = format!("{display}/");
            if st.files.contains_key(&display) {
                scope.push(display);
            }
            scope.extend(
                st.files
                    .range(under.clone()..)
                    .take_while(|(k, _)| k.starts_with(&under))
                    .map(|(k, _)| k.clone()),
            );
        }
        let gone = scope
            .into_iter()
            .filter(|d| !found.contains_key(d))
            .collect();
        let delta = self.apply(&mut st, gone, found.into_values().collect());
        self.commit(&mut st, delta)
    }

    /// Bring `st.files` in line with `found`, the files now on disk where
    /// the engine looked: re-read those whose signature moved, drop `gone`
    /// (held, looked for, not found).
    fn apply(&self, st: &mut State, gone: Vec<String>, found: Vec<Found>) -> Delta {
        let mut delta = Delta::default();
        let mut to_load = Vec::new();
        for f in found {
            let same = st.files.get(&f.display).is_some_and(|l| {
                l.found.path == f.path && Signature::of(&f.path).ok() == Some(l.signature)
            });
            if !same {
                to_load.push(f);
            }
        }
        for display in gone {
            st.errors.remove(&display);
            delta.changed |= st.files.remove(&display).is_some();
        }
        for (f, r) in load_all(to_load, st.threads) {
            match r {
                Ok((signature, cf)) => {
                    delta.read += 1;
                    st.errors.remove(&f.display);
                    let file = match st.files.get(&f.display) {
                        // Touched, same text: keep the file (and its documents).
                        Some(l) if l.file.hash == cf.hash => l.file.clone(),
                        _ => {
                            delta.changed = true;
                            Arc::new(cf)
                        }
                    };
                    st.files.insert(
                        f.display.clone(),
                        Loaded {
                            found: f,
                            signature,
                            file,
                        },
                    );
                }
                // Keep what we had for this file, if anything.
                Err(e) => {
                    st.errors.insert(f.display.clone(), e);
                }
            }
        }
        delta
    }

    /// Report errors; index and swap in the new files if they changed.
    fn commit(&self, st: &mut State, delta: Delta) -> bool {
        let error = joined(st);
        if error != st.last_error {
            if let Some(e) = &error {
                log::warn!(
                    "event=reload_failed reason={e:?}: keeping the old content of those files"
                );
            }
            st.last_error = error;
        }
        if !delta.changed {
            return false;
        }
        let index = self.index().update(
            st.files.values().map(|l| l.file.clone()).collect(),
            st.threads,
        );
        log::info!(
            "event=context_reloaded files={} read={} passages={} version={}",
            st.files.len(),
            delta.read,
            index.passages(),
            index.version()
        );
        st.reloads += 1;
        st.loaded_at = now_utc();
        let compact = index.wants_compaction();
        let old = match self.index.write() {
            Ok(mut g) => std::mem::replace(&mut *g, Arc::new(index)),
            Err(p) => std::mem::replace(&mut *p.into_inner(), Arc::new(index)),
        };
        if compact {
            match self.compact_live(old) {
                Some(copied) => {
                    st.compactions.0 += 1;
                    st.compactions.2 += copied;
                }
                None => st.compactions.1 += 1,
            }
        } else if Arc::strong_count(&old) == 1 {
            // The old index's copied lists go now (unless a query still
            // holds it); give their pages back rather than let the heap grow.
            drop(old);
            release_freed_memory();
        }
        true
    }

    /// Compact the index just swapped in (see [`Index::compact`]) where it
    /// is, so its lists are rewritten one at a time and never held twice:
    /// new questions wait for the index meanwhile (the write lock), and the
    /// compaction starts once the questions already under way, on this
    /// index or on `old`, are done with them. Should one still hold on after
    /// [`COMPACT_WAIT`], a compacted copy is swapped in instead (every list
    /// then held twice for a moment, as before this was done in place).
    /// Returns, when it was done in place, how many lists it still copied
    /// (held by an older index a question is still on).
    fn compact_live(&self, old: Arc<Index>) -> Option<usize> {
        // The lists the new index shares with the old are its own once the
        // old is gone.
        let gone = Arc::downgrade(&old);
        drop(old);
        let started = Instant::now();
        let mut g = match self.index.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let in_place = loop {
            if gone.strong_count() == 0
                && let Some(ix) = Arc::get_mut(&mut *g)
            {
                let waited = started.elapsed();
                let copied = ix.compact();
                log::info!(
                    "event=context_compacted in_place=true passages={} lists_copied={copied} waited_ms={:.1} ms={:.1}",
                    ix.passages(),
                    waited.as_secs_f64() * 1e3,
                    (started.elapsed() - waited).as_secs_f64() * 1e3
                );
                break Some(copied);
            }
            if started.elapsed() >= COMPACT_WAIT {
                let mut copy = Index::clone(&g);
                let copied = copy.compact();
                *g = Arc::new(copy);
                log::info!(
                    "event=context_compacted in_place=false passages={} lists_copied={copied} \
                     reason=\"a question held the index for {} s\"",
                    g.passages(),
                    COMPACT_WAIT.as_secs()
                );
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        drop(g);
        release_freed_memory();
        in_place
    }
}

/// How long a compaction waits for the questions under way to let go of
/// the index (a question holds it for milliseconds).
const COMPACT_WAIT: Duration = Duration::from_secs(2);

/// Hand memory freed while indexing (the read buffers, the units, the
/// grown-then-shrunk posting lists, spread over the indexing threads'
/// arenas) back to the system, so the server's resident size is what the
/// index holds.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: plain libc call, no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What `stats` shows as the last reload error: the walk's, then each file's.
fn joined(st: &State) -> Option<String> {
    let all: Vec<&str> = st
        .walk_error
        .iter()
        .map(String::as_str)
        .chain(st.errors.values().map(String::as_str))
        .collect();
    (!all.is_empty()).then(|| all.join("; "))
}

impl Engine for BuiltinEngine {
    fn name(&self) -> &str {
        "builtin"
    }

    fn answer(&self, question: &str, _deadline: Instant) -> Result<EngineAnswer, EngineError> {
        Ok(self.answer_now(question))
    }

    fn is_inline(&self) -> bool {
        true
    }

    fn info(&self) -> EngineInfo {
        // The state first: a reload holds it while it compacts, which waits
        // for every holder of the index to let go (the index first would
        // hold one while waiting for the state).
        let st = self.state();
        let index = self.index();
        EngineInfo {
            name: "builtin".into(),
            context_version: index.version().to_string(),
            files: index.files().len(),
            passages: index.passages(),
            bytes: index.bytes(),
            loaded_at: st.loaded_at.clone(),
            reloads: st.reloads,
            last_reload_error: st.last_error.clone(),
            down: false,
        }
    }

    fn reload_if_changed(&self) {
        self.reload();
    }

    fn reload_paths(&self, paths: &[PathBuf]) {
        BuiltinEngine::reload_paths(self, paths);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOTES: &str = "# Session notes\n\n## Cache decision\nWe decided to keep the LRU cache at 64 entries.\nThe reason: memory on the shard host is tight.\nRevisit in March.\n\n## Transport\nQuestions travel over named pipes (FIFOs), one private pair per client.\nHello frames go on the shared FIFO only.\nReplies never interleave.\n";

    fn engine(body: &str) -> (tempfile::TempDir, std::path::PathBuf, BuiltinEngine) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("NOTES.md");
        std::fs::write(&p, body).unwrap();
        let e = BuiltinEngine::load(std::slice::from_ref(&p)).unwrap();
        (d, p, e)
    }

    fn line_range(source: &str) -> (u32, u32) {
        let (_, range) = source.rsplit_once(':').unwrap();
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        (a.parse().unwrap(), b.parse().unwrap())
    }

    /// `a` opens with its best line `text`, cited `cite`, first in its
    /// sources too, and the passages follow.
    fn assert_best_line(a: &EngineAnswer, cite: &str, text: &str) {
        assert_eq!(a.sources[0], cite, "{:?}", a.sources);
        assert!(
            a.answer
                .starts_with(&format!("Best line: [{cite}] {text}\n\n[")),
            "{}",
            a.answer
        );
    }

    #[test]
    fn the_best_line_comes_first_with_its_file_and_line() {
        let (_d, p, e) = engine(NOTES);
        let a = e.answer_now("How big is the cache we decided on?");
        let line = NOTES
            .lines()
            .position(|l| l.contains("64 entries"))
            .unwrap()
            + 1;
        let cite = format!("{}:{line}", p.display());
        assert_best_line(&a, &cite, "We decided to keep the LRU cache at 64 entries.");
        // It lies in the best passage, which follows, cited as before.
        let (s, end) = line_range(&a.sources[1]);
        assert!((s..=end).contains(&(line as u32)), "{:?}", a.sources);
        assert_eq!(a.sources.len(), 1 + a.answer.matches("\n\n[").count());
    }

    #[test]
    fn a_best_line_that_is_its_whole_passage_is_cited_once() {
        // One line, and one sentence over all of a passage's lines: the
        // best line's citation already covers the passage that follows.
        for body in [
            "The relay listens on port 8080 for the coordinator.\n",
            "The relay listens on port 8080\nfor the coordinator, and on no\nother port at all.\n",
        ] {
            let (_d, p, e) = engine(body);
            let a = e.answer_now("Which port does the relay listen on?");
            let lines = body.lines().count();
            let cite = if lines == 1 {
                format!("{}:1", p.display())
            } else {
                format!("{}:1-{lines}", p.display())
            };
            assert_eq!(a.sources, vec![cite], "{}", a.answer);
            assert!(
                a.answer
                    .contains(&format!("\n\n[{}:1-{lines}]", p.display())),
                "the passage still follows: {}",
                a.answer
            );
        }
    }

    #[test]
    fn a_best_sentence_wrapped_over_lines_is_cited_as_their_range_and_quoted_alone() {
        let body = "# Limits\n\nEach client gets a private pair of pipes. The cap is one\nmebibyte per frame, newline included, and a longer frame\nis refused.\n\n| code | meaning |\n|---|---|\n| 5 | usage |\n| 6 | bridge busy |\n";
        let (_d, p, e) = engine(body);
        let a = e.answer_now("What is the cap per frame, with the newline?");
        let cite = format!("{}:3-5", p.display());
        assert_best_line(
            &a,
            &cite,
            "The cap is one mebibyte per frame, newline included, and a longer frame is refused.",
        );
        // A table row is judged with its header's words, and the header
        // row itself is never the best line.
        let a = e.answer_now("What does code 6 mean?");
        assert_eq!(a.sources[0], format!("{}:10", p.display()), "{}", a.answer);
    }

    #[test]
    fn the_folders_above_the_context_root_do_not_change_the_ranking() {
        // The same files under two roots of other names (a temporary folder
        // is named at random): the same passages, in the same order, with
        // the same scores.
        let d = tempfile::tempdir().unwrap();
        let ranks = |root: &str| {
            let r = d.path().join(root);
            std::fs::create_dir_all(r.join("leases")).unwrap();
            std::fs::write(r.join("NOTES.md"), NOTES).unwrap();
            std::fs::write(
                r.join("leases/claims.md"),
                "# Claims\nA claim holds a lease of 30 s.\n",
            )
            .unwrap();
            let e = BuiltinEngine::load(&[r]).unwrap();
            let idx = e.index();
            ["claims lease cache", "pipes per client", "claim 64 entries"].map(|q| {
                idx.search(q, 3)
                    .iter()
                    .map(|h| {
                        let f = &idx.files()[h.file];
                        (f.display[f.rel..].to_string(), h.passage, h.score)
                    })
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(ranks("q0b2x7"), ranks("claims-cache-notes"));
    }

    #[test]
    fn top_source_range_contains_the_answer() {
        let (_d, p, e) = engine(NOTES);
        let a = e.answer_now("How big is the cache we decided on?");
        assert!(a.found);
        let (s, end) = line_range(&a.sources[0]);
        let answer_line = NOTES
            .lines()
            .position(|l| l.contains("64 entries"))
            .unwrap() as u32
            + 1;
        assert!(
            (s..=end).contains(&answer_line),
            "{:?} vs line {answer_line}",
            a.sources
        );
        assert!(a.sources[0].starts_with(&p.display().to_string()));
        assert!(a.answer.contains("64 entries"));
        assert!(a.context_version.starts_with("sha256:"));

        let a = e.answer_now("how do replies reach each client?");
        let (s, end) = line_range(&a.sources[1]);
        let line = NOTES
            .lines()
            .position(|l| l.contains("private pair"))
            .unwrap() as u32
            + 1;
        assert!((s..=end).contains(&line), "{:?}", a.sources);
    }

    #[test]
    fn says_plainly_when_nothing_matches() {
        let (_d, _p, e) = engine(NOTES);
        let a = e.answer_now("quantum chromodynamics");
        assert!(!a.found);
        assert!(a.sources.is_empty());
        assert!(
            a.answer.starts_with("Nothing in the context matches"),
            "{}",
            a.answer
        );
    }

    #[test]
    fn reload_picks_up_edits_and_keeps_old_index_on_failure() {
        let (_d, p, e) = engine(NOTES);
        let v1 = e.info().context_version;
        assert!(!e.reload(), "nothing changed yet");
        std::fs::write(&p, NOTES.replace("64 entries", "128 entries")).unwrap();
        assert!(e.reload());
        let a = e.answer_now("cache size decided");
        assert!(a.answer.contains("128 entries"), "{}", a.answer);
        assert_ne!(a.context_version, v1);
        let v2 = a.context_version;
        // Invalid UTF-8: the reload fails, the old index stays, the error is reported.
        std::fs::write(&p, b"\xff\xfe broken").unwrap();
        assert!(!e.reload());
        assert!(
            e.answer_now("cache size decided")
                .answer
                .contains("128 entries")
        );
        let info = e.info();
        assert_eq!(info.context_version, v2);
        assert!(info.last_reload_error.unwrap().contains("not UTF-8"));
        // Fixed again: error clears.
        std::fs::write(&p, NOTES).unwrap();
        assert!(e.reload());
        assert!(e.info().last_reload_error.is_none());
        assert_eq!(e.info().reloads, 2);
    }

    /// Edit the files of `dir` in turn until the engine compacts (at
    /// most 200 edits); each edit's new text is found, its old gone.
    /// During each reload a question holds the index it started on: for
    /// `Some(d)`, a thread lets go of it after `d`; for `None`, it is held
    /// until the reload is over, and returned.
    fn edit_until_compacted(
        e: &BuiltinEngine,
        dir: &std::path::Path,
        hold: Option<Duration>,
    ) -> Option<Arc<Index>> {
        let before = e.state().compactions;
        for round in 0..200 {
            let p = dir.join(format!("f{}.md", round % 8));
            let old = std::fs::read_to_string(&p).unwrap();
            let word = format!("edit{round}word");
            std::fs::write(
                &p,
                format!("# Notes\n\nThe {word} lives here.\n\nA second passage.\n\nA third one.\n"),
            )
            .unwrap();
            let question = e.index();
            let (holder, kept) = match hold {
                Some(d) => (
                    Some(std::thread::spawn(move || {
                        std::thread::sleep(d);
                        drop(question);
                    })),
                    None,
                ),
                None => (None, Some(question)),
            };
            assert!(e.reload_paths(std::slice::from_ref(&p)));
            if let Some(h) = holder {
                h.join().unwrap();
            }
            let a = e.answer_now(&word);
            assert!(a.answer.contains(&word), "round {round}: {}", a.answer);
            if let Some(prev) = old.split_whitespace().find(|w| w.starts_with("edit")) {
                let a = e.answer_now(prev);
                assert!(
                    !a.answer.contains(prev),
                    "round {round}: {prev} still found"
                );
            }
            if e.state().compactions != before {
                assert_same_as_fresh(e, dir);
                return kept;
            }
        }
        panic!("no compaction in 200 edits");
    }

    fn eight_files() -> (tempfile::TempDir, BuiltinEngine) {
        let d = tempfile::tempdir().unwrap();
        for i in 0..8 {
            std::fs::write(
                d.path().join(format!("f{i}.md")),
                format!("# F{i}\n\nfirst words {i}\n"),
            )
            .unwrap();
        }
        let e = BuiltinEngine::load(&[d.path().to_path_buf()]).unwrap();
        (d, e)
    }

    #[test]
    fn a_compaction_rewrites_the_live_index_in_place_once_questions_let_go() {
        let (d, e) = eight_files();
        // `stats` asked all the while (it reads the index and the state).
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    assert!(e.info().passages > 0);
                }
            });
            edit_until_compacted(&e, d.path(), Some(Duration::from_millis(30)));
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(
            e.state().compactions,
            (1, 0, 0),
            "every list rewritten in place"
        );
        // And with no question under way at all.
        edit_until_compacted(&e, d.path(), Some(Duration::ZERO));
        assert_eq!(e.state().compactions, (2, 0, 0));
    }

    #[test]
    fn a_compaction_while_a_question_holds_on_swaps_in_a_compacted_copy() {
        let (d, e) = eight_files();
        let held = edit_until_compacted(&e, d.path(), None).unwrap();
        assert_eq!(e.state().compactions, (0, 1, 0));
        // The question's index still answers, from the text it had.
        assert!(!held.search("second passage", 3).is_empty());
    }

    /// What a search returns, by file name rather than index position.
    fn results(e: &BuiltinEngine, q: &str) -> Vec<(String, usize, u32)> {
        let idx = e.index();
        idx.search(q, 10)
            .into_iter()
            .map(|h| {
                (
                    idx.files()[h.file].display.clone(),
                    h.passage,
                    h.score.to_bits(),
                )
            })
            .collect()
    }

    fn assert_same_as_fresh(e: &BuiltinEngine, dir: &std::path::Path) {
        let fresh = BuiltinEngine::load(&[dir.to_path_buf()]).unwrap();
        let (a, b) = (e.index(), fresh.index());
        assert_eq!(a.version(), b.version());
        assert_eq!(a.passages(), b.passages());
        assert_eq!(a.bytes(), b.bytes());
        for q in [
            "cache entries decided",
            "how do replies reach each client",
            "zebra migration",
            "common words shared everywhere",
            "brand new subdirectory file",
        ] {
            assert_eq!(results(e, q), results(&fresh, q), "query {q:?}");
        }
    }

    #[test]
    fn an_index_updated_incrementally_equals_one_built_from_scratch() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::write(root.join("NOTES.md"), NOTES).unwrap();
        for i in 0..20 {
            std::fs::write(
                root.join(format!("f{i:02}.md")),
                format!("# File {i}\n\ncommon words shared everywhere\nzebra {i}\n"),
            )
            .unwrap();
        }
        let e = BuiltinEngine::load(&[root.to_path_buf()]).unwrap();
        assert_same_as_fresh(&e, root);
        // An edit: new words in, old words out.
        std::fs::write(
            root.join("NOTES.md"),
            NOTES.replace("64 entries", "zebra migration entries"),
        )
        .unwrap();
        assert!(e.reload());
        assert_same_as_fresh(&e, root);
        assert!(!results(&e, "zebra migration").is_empty());
        // An addition (in a new subdirectory) and a removal.
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(
            root.join("sub/new.md"),
            "brand new subdirectory file\ncommon words\n",
        )
        .unwrap();
        std::fs::remove_file(root.join("f05.md")).unwrap();
        assert!(e.reload());
        assert_same_as_fresh(&e, root);
        // A file's words all gone: its terms no longer match anything.
        std::fs::write(root.join("sub/new.md"), "nothing left\n").unwrap();
        assert!(e.reload());
        assert_same_as_fresh(&e, root);
        assert!(results(&e, "brand subdirectory").is_empty());
        // Every file rewritten, twice: holes outnumber documents and the
        // update falls back to a full build; still the same.
        for round in 0..2 {
            for i in (0..20).filter(|i| *i != 5) {
                std::fs::write(
                    root.join(format!("f{i:02}.md")),
                    format!("# File {i}\n\ncommon words\n\nround {round}\nzebra {i}\n"),
                )
                .unwrap();
            }
            assert!(e.reload());
            assert_same_as_fresh(&e, root);
        }
        // Touched without change: no new index.
        let v = e.index().version().to_string();
        std::fs::write(
            root.join("f01.md"),
            std::fs::read(root.join("f01.md")).unwrap(),
        )
        .unwrap();
        assert!(!e.reload());
        assert_eq!(e.index().version(), v);
    }

    #[test]
    fn a_reload_of_named_paths_reads_only_those_and_equals_a_fresh_load() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::write(root.join("NOTES.md"), NOTES).unwrap();
        std::fs::create_dir(root.join("old")).unwrap();
        for i in 0..10 {
            std::fs::write(
                root.join(format!("old/f{i}.md")),
                format!("# File {i}\n\ncommon words shared everywhere\nzebra {i}\n"),
            )
            .unwrap();
        }
        let e = BuiltinEngine::load(&[root.to_path_buf()]).unwrap();
        // An edit, named: the new text is found, the old is gone.
        std::fs::write(
            root.join("NOTES.md"),
            NOTES.replace("64 entries", "zebra migration entries"),
        )
        .unwrap();
        assert!(e.reload_paths(&[root.join("NOTES.md")]));
        assert_same_as_fresh(&e, root);
        assert!(!e.answer_now("cache entries").answer.contains("64 entries"));
        // Changes not named are not looked at: that is what the walk is for.
        std::fs::write(
            root.join("old/f1.md"),
            "# File 1\nbrand new subdirectory file\n",
        )
        .unwrap();
        assert!(!e.reload_paths(&[root.join("NOTES.md")]));
        assert!(results(&e, "brand subdirectory").is_empty());
        assert!(e.reload());
        assert_same_as_fresh(&e, root);
        // A file added and one removed; a whole folder removed; a new one
        // with files in it, named by the folder alone.
        std::fs::write(root.join("added.md"), "walrus quorum\n").unwrap();
        std::fs::remove_file(root.join("old/f2.md")).unwrap();
        assert!(e.reload_paths(&[root.join("added.md"), root.join("old/f2.md")]));
        assert_same_as_fresh(&e, root);
        std::fs::remove_dir_all(root.join("old")).unwrap();
        std::fs::create_dir_all(root.join("new/deeper")).unwrap();
        std::fs::write(root.join("new/deeper/x.md"), "narwhal ledger\n").unwrap();
        assert!(e.reload_paths(&[root.join("old"), root.join("new")]));
        assert_same_as_fresh(&e, root);
        assert_eq!(e.info().files, 3);
        // A path that is not a context file is ignored.
        std::fs::write(root.join("main.rs"), "fn main() {}\n").unwrap();
        assert!(!e.reload_paths(&[root.join("main.rs"), root.join("missing.md")]));
        // A bad file is reported until it is fixed, whatever else is reloaded.
        std::fs::write(root.join("added.md"), b"\xff").unwrap();
        assert!(!e.reload_paths(&[root.join("added.md")]));
        std::fs::write(root.join("NOTES.md"), NOTES).unwrap();
        assert!(e.reload_paths(&[root.join("NOTES.md")]));
        assert!(e.info().last_reload_error.unwrap().contains("not UTF-8"));
        std::fs::write(root.join("added.md"), "walrus quorum\n").unwrap();
        assert!(
            !e.reload_paths(&[root.join("added.md")]),
            "same text as indexed"
        );
        assert!(e.info().last_reload_error.is_none());
        assert_same_as_fresh(&e, root);
    }

    #[test]
    fn a_file_named_directly_that_goes_missing_keeps_its_content_and_says_so() {
        let (_d, p, e) = engine(NOTES);
        std::fs::remove_file(&p).unwrap();
        assert!(!e.reload_paths(std::slice::from_ref(&p)));
        assert!(
            e.answer_now("cache entries decided")
                .answer
                .contains("64 entries")
        );
        let err = e.info().last_reload_error.unwrap();
        assert!(err.contains("NOTES.md"), "{err}");
        std::fs::write(&p, NOTES.replace("64 entries", "65 entries")).unwrap();
        assert!(e.reload_paths(std::slice::from_ref(&p)));
        assert!(e.info().last_reload_error.is_none());
    }

    #[test]
    fn refuses_to_start_without_usable_context() {
        assert!(BuiltinEngine::load(&[]).is_err());
        let d = tempfile::tempdir().unwrap();
        assert!(
            BuiltinEngine::load(&[d.path().to_path_buf()])
                .unwrap_err()
                .contains("no text")
        );
        let bad = d.path().join("bad.md");
        std::fs::write(&bad, b"\xff").unwrap();
        assert!(
            BuiltinEngine::load(&[bad])
                .unwrap_err()
                .contains("not UTF-8")
        );
    }
}
