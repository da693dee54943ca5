//! The built-in context engine: the embedded "instance". It indexes the
//! context into passages that keep their line ranges, ranks them with BM25,
//! and answers with the best passages, cited as `FILE:START-END`. It needs no
//! outside service. Context files that change on disk are reloaded by
//! [`Engine::reload_if_changed`]; a failed reload keeps the old index.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use autopoll_protocol::EngineInfo;

use super::context::{self, ContextFile, Found, Signature};
use super::index::{Index, Tokenized, Vocab};
use super::{Engine, EngineAnswer, EngineError};

/// How many passages an answer quotes at most.
const TOP_K: usize = 3;
/// Passages scoring below this share of the best one are left out.
const RELATIVE_CUTOFF: f32 = 0.35;
/// Longest quote of one passage, in characters.
const MAX_QUOTE: usize = 1_500;

/// A loaded file and its term counts, reused while its signature holds.
type Loaded = (Found, Arc<ContextFile>, Arc<Tokenized>);

struct State {
    roots: Vec<std::path::PathBuf>,
    files: Vec<Loaded>,
    vocab: Arc<Vocab>,
    reloads: u64,
    loaded_at: String,
    last_error: Option<String>,
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

impl BuiltinEngine {
    /// Load and index the context under `roots`. Fails when a root is
    /// missing, when a file named directly cannot be read as UTF-8 text, or
    /// when there is no text at all. Unreadable files found in directories
    /// are skipped with a warning.
    pub fn load(roots: &[std::path::PathBuf]) -> Result<BuiltinEngine, String> {
        if roots.is_empty() {
            return Err("at least one --context PATH is needed: the files or folders of text/markdown the shard answers from (and, for external backends, the files the model is told to read and its citations are checked against)".into());
        }
        let found = context::discover(roots)?;
        let vocab = Vocab::new();
        let mut files = Vec::new();
        for f in found {
            match context::load(&f) {
                Ok(cf) => {
                    let tok = Arc::new(vocab.tokenize(&cf));
                    files.push((f, Arc::new(cf), tok));
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
        let index = build(&files, &vocab);
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
                vocab,
                reloads: 0,
                loaded_at: now_utc(),
                last_error: None,
            }),
        })
    }

    /// The `--context` paths this engine reads.
    pub fn roots(&self) -> Vec<std::path::PathBuf> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .roots
            .clone()
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
            sources.push(source);
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

    /// Re-read what changed; update the index (only the changed files'
    /// posting lists, [`Index::update`]) and swap it in if anything did.
    /// Returns whether the index changed.
    pub fn reload(&self) -> bool {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let found = match context::discover(&st.roots) {
            Ok(f) => f,
            Err(e) => {
                if st.last_error.as_deref() != Some(e.as_str()) {
                    log::warn!("event=reload_failed reason={e:?}: keeping the old index");
                }
                st.last_error = Some(e);
                return false;
            }
        };
        let mut changed = found.len() != st.files.len();
        // O(F): each old entry found by path, each file stat'ed once.
        let mut old: HashMap<std::path::PathBuf, (Arc<ContextFile>, Arc<Tokenized>)> =
            std::mem::take(&mut st.files)
                .into_iter()
                .map(|(f, cf, tok)| (f.path, (cf, tok)))
                .collect();
        let mut next = Vec::with_capacity(found.len());
        let mut errors = Vec::new();
        let mut loaded = 0usize;
        for f in found {
            let prev = old.remove(&f.path);
            if let Some((cf, tok)) = prev
                .as_ref()
                .filter(|(cf, _)| Signature::of(&f.path).ok() == Some(cf.signature))
            {
                next.push((f, cf.clone(), tok.clone()));
                continue;
            }
            match context::load(&f) {
                Ok(cf) => {
                    loaded += 1;
                    match prev {
                        // Touched, same text: keep the term counts.
                        Some((o, tok)) if o.hash == cf.hash && o.display == cf.display => {
                            next.push((f, Arc::new(cf), tok));
                        }
                        _ => {
                            changed = true;
                            let tok = Arc::new(st.vocab.tokenize(&cf));
                            next.push((f, Arc::new(cf), tok));
                        }
                    }
                }
                Err(e) => {
                    errors.push(e);
                    // Keep what we had for this file.
                    if let Some((cf, tok)) = prev {
                        next.push((f, cf, tok));
                    }
                }
            }
        }
        // Files no longer found (their paths are left in `old`).
        changed |= !old.is_empty();
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        if error != st.last_error {
            if let Some(e) = &error {
                log::warn!(
                    "event=reload_failed reason={e:?}: keeping the old content of those files"
                );
            }
            st.last_error = error;
        }
        if !changed {
            // Signatures may have moved (touch) without content change.
            st.files = next;
            return false;
        }
        let index = self.index().update(
            next.iter()
                .map(|(_, f, t)| (f.clone(), t.clone()))
                .collect(),
        );
        log::info!(
            "event=context_reloaded files={} read={loaded} passages={} version={}",
            next.len(),
            index.passages(),
            index.version()
        );
        st.files = next;
        st.reloads += 1;
        st.loaded_at = now_utc();
        match self.index.write() {
            Ok(mut g) => *g = Arc::new(index),
            Err(p) => *p.into_inner() = Arc::new(index),
        }
        true
    }
}

fn build(files: &[Loaded], vocab: &Arc<Vocab>) -> Index {
    Index::build(
        files
            .iter()
            .map(|(_, f, t)| (f.clone(), t.clone()))
            .collect(),
        vocab.clone(),
    )
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
        let index = self.index();
        let st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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
        let (a, b) = range.split_once('-').unwrap();
        (a.parse().unwrap(), b.parse().unwrap())
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
        let (s, end) = line_range(&a.sources[0]);
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
