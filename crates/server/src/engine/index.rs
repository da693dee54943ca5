//! The built-in engine's index: an inverted index over passages, ranked
//! with BM25 (k1 = 1.2, b = 0.75); heading words count once more in the
//! passages under them.
//!
//! Tokenising is done once per file version ([`Vocab::tokenize`] gives a
//! [`Tokenized`] kept next to the file), with term ids from a [`Vocab`]
//! shared by every index of one engine and only ever appended to. After a
//! change, [`Index::update`] makes a new index from the old one: posting
//! lists are shared (`Arc`) and only those of the changed files' terms are
//! copied and edited; removed passages leave holes in the document table
//! until holes outnumber documents, when it builds afresh. The new index is
//! swapped in whole, so readers never see one half made.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

use super::context::ContextFile;
use super::text;

const K1: f32 = 1.2;
const B: f32 = 0.75;

/// A passage as indexed: which file, which passage of it, its length in terms.
#[derive(Debug, Clone, Copy)]
struct Doc {
    file: u32,
    passage: u32,
    len: u32,
}

/// A scored passage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// Index into [`Index::files`].
    pub file: usize,
    /// Index into that file's passages.
    pub passage: usize,
    /// BM25 score.
    pub score: f32,
}

/// Term ids, shared by the indexes of one engine. Ids are only ever added,
/// so an older index reading it sees ids past its own postings (and treats
/// them as absent). Words of deleted text keep their ids: memory grows with
/// the distinct words ever seen, not with the current context.
#[derive(Debug, Default)]
pub struct Vocab {
    ids: RwLock<HashMap<Box<str>, u32>>,
}

/// One file's passages as term counts: what [`Index::build`] needs from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// Per passage: (term id, count) sorted by id, and the length in terms.
    passages: Vec<(Vec<(u32, u16)>, u32)>,
}

impl Vocab {
    /// A new, empty vocabulary.
    pub fn new() -> Arc<Vocab> {
        Arc::new(Vocab::default())
    }

    fn get(&self, term: &str) -> Option<u32> {
        match self.ids.read() {
            Ok(g) => g.get(term).copied(),
            Err(p) => p.into_inner().get(term).copied(),
        }
    }

    /// The id of `term`, given one if new. Takes the write lock only for a
    /// new word, so queries are not held up while a big file is tokenised.
    fn id_of(&self, term: &str) -> u32 {
        if let Some(id) = self.get(term) {
            return id;
        }
        let mut ids = self
            .ids
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = ids.len() as u32;
        *ids.entry(term.into()).or_insert(next)
    }

    /// Split `file`'s passages into term counts, giving new words ids.
    pub fn tokenize(&self, file: &ContextFile) -> Tokenized {
        let mut counts: HashMap<u32, u16> = HashMap::new();
        let mut passages = Vec::with_capacity(file.passages.len());
        for p in &file.passages {
            counts.clear();
            let mut len = 0u32;
            let mut add = |t: &str| {
                let c = counts.entry(self.id_of(t)).or_insert(0);
                *c = c.saturating_add(1);
                len += 1;
            };
            text::terms(&file.text[p.bytes.clone()], &mut add);
            text::terms(&p.heading, &mut add);
            let mut v: Vec<(u32, u16)> = counts.iter().map(|(&t, &c)| (t, c)).collect();
            v.sort_unstable();
            passages.push((v, len));
        }
        Tokenized { passages }
    }
}

/// An immutable index over a set of context files.
#[derive(Debug)]
pub struct Index {
    files: Vec<Arc<ContextFile>>,
    /// Per file (same order): its term counts and its document ids.
    toks: Vec<(Arc<Tokenized>, std::ops::Range<u32>)>,
    /// Documents by id; ids of removed passages stay as holes (`len` 0,
    /// in no posting list) until the next full build.
    docs: Vec<Doc>,
    vocab: Arc<Vocab>,
    /// Per term id: (document id, count), ids ascending. Shared with the
    /// index this one was updated from, copied only where a change touched.
    postings: Vec<Arc<Vec<(u32, u16)>>>,
    /// Documents that are not holes.
    live: u32,
    total_len: u64,
    avg_len: f32,
    version: String,
    bytes: u64,
}

thread_local! {
    /// Per-thread score accumulator, reused across queries.
    static SCRATCH: RefCell<(Vec<f32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A file's passages, added as new documents at the end of `docs`.
fn add_docs(
    fi: usize,
    tok: &Tokenized,
    docs: &mut Vec<Doc>,
    postings: &mut Vec<Arc<Vec<(u32, u16)>>>,
    total_len: &mut u64,
) -> std::ops::Range<u32> {
    let start = docs.len() as u32;
    for (pi, (counts, len)) in tok.passages.iter().enumerate() {
        let doc = docs.len() as u32;
        for &(t, c) in counts {
            let t = t as usize;
            if t >= postings.len() {
                postings.resize_with(t + 1, Default::default);
            }
            Arc::make_mut(&mut postings[t]).push((doc, c));
        }
        *total_len += u64::from(*len);
        docs.push(Doc {
            file: fi as u32,
            passage: pi as u32,
            len: *len,
        });
    }
    start..docs.len() as u32
}

/// The context version: SHA-256 over each file's path and content hash.
fn version_of(files: &[(Arc<ContextFile>, Arc<Tokenized>)]) -> (String, u64) {
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    for (f, _) in files {
        hasher.update(f.display.as_bytes());
        hasher.update([0]);
        hasher.update(f.hash);
        bytes += f.text.len() as u64;
    }
    let digest = hasher.finalize();
    let version = format!(
        "sha256:{}",
        digest[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    (version, bytes)
}

impl Index {
    /// Build from loaded files (in display order), each with its term
    /// counts from `vocab` (see [`Vocab::tokenize`]).
    pub fn build(files: Vec<(Arc<ContextFile>, Arc<Tokenized>)>, vocab: Arc<Vocab>) -> Index {
        let mut postings = Vec::new();
        let mut docs = Vec::new();
        let mut total_len: u64 = 0;
        let mut toks = Vec::with_capacity(files.len());
        for (fi, (_, tok)) in files.iter().enumerate() {
            let span = add_docs(fi, tok, &mut docs, &mut postings, &mut total_len);
            toks.push((tok.clone(), span));
        }
        Index::finish(files, toks, docs, postings, total_len, vocab)
    }

    fn finish(
        files: Vec<(Arc<ContextFile>, Arc<Tokenized>)>,
        toks: Vec<(Arc<Tokenized>, std::ops::Range<u32>)>,
        docs: Vec<Doc>,
        postings: Vec<Arc<Vec<(u32, u16)>>>,
        total_len: u64,
        vocab: Arc<Vocab>,
    ) -> Index {
        let (version, bytes) = version_of(&files);
        let live = toks.iter().map(|(_, r)| r.len() as u32).sum::<u32>();
        let avg_len = if live == 0 {
            1.0
        } else {
            (total_len as f32 / live as f32).max(1.0)
        };
        Index {
            files: files.into_iter().map(|(f, _)| f).collect(),
            toks,
            docs,
            vocab,
            postings,
            live,
            total_len,
            avg_len,
            version,
            bytes,
        }
    }

    /// This index with `files` (the whole new list, in display order) in
    /// place of its own: a file whose term counts are the same `Arc` as
    /// before keeps its documents; the documents of the others are removed
    /// from the posting lists of their terms and the new ones appended.
    /// Only the posting lists of those terms are copied; the document
    /// table and the version are redone (O(passages), O(files)). Searches
    /// give exactly what [`Index::build`] over `files` gives. Falls back to
    /// a full build once holes outnumber live documents.
    pub fn update(&self, files: Vec<(Arc<ContextFile>, Arc<Tokenized>)>) -> Index {
        let old: HashMap<&str, usize> = self
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.display.as_str(), i))
            .collect();
        let mut kept = vec![None; self.files.len()];
        for (ni, (f, tok)) in files.iter().enumerate() {
            if let Some(&oi) = old.get(f.display.as_str())
                && Arc::ptr_eq(&self.toks[oi].0, tok)
            {
                kept[oi] = Some(ni);
            }
        }
        let mut postings = self.postings.clone();
        let mut docs = self.docs.clone();
        let mut total_len = self.total_len;
        let mut touched: Vec<u32> = Vec::new();
        for (oi, (tok, span)) in self.toks.iter().enumerate() {
            if kept[oi].is_some() {
                continue;
            }
            touched.clear();
            for (counts, len) in &tok.passages {
                touched.extend(counts.iter().map(|&(t, _)| t));
                total_len -= u64::from(*len);
            }
            touched.sort_unstable();
            touched.dedup();
            for &t in &touched {
                Arc::make_mut(&mut postings[t as usize]).retain(|(d, _)| !span.contains(d));
            }
            for d in span.clone() {
                docs[d as usize] = Doc {
                    file: u32::MAX,
                    passage: 0,
                    len: 0,
                };
            }
        }
        let mut spans: Vec<Option<std::ops::Range<u32>>> = vec![None; files.len()];
        for (oi, ni) in kept.iter().enumerate() {
            if let Some(ni) = *ni {
                let span = self.toks[oi].1.clone();
                for d in span.clone() {
                    docs[d as usize].file = ni as u32;
                }
                spans[ni] = Some(span);
            }
        }
        let mut toks = Vec::with_capacity(files.len());
        for (ni, (_, tok)) in files.iter().enumerate() {
            let span = match spans[ni].take() {
                Some(s) => s,
                None => add_docs(ni, tok, &mut docs, &mut postings, &mut total_len),
            };
            toks.push((tok.clone(), span));
        }
        let index = Index::finish(files, toks, docs, postings, total_len, self.vocab.clone());
        if index.docs.len() > 2 * index.live as usize + 64 {
            let files = index
                .files
                .iter()
                .cloned()
                .zip(index.toks.iter().map(|(t, _)| t.clone()))
                .collect();
            return Index::build(files, index.vocab.clone());
        }
        index
    }

    /// The files, in citation order.
    pub fn files(&self) -> &[Arc<ContextFile>] {
        &self.files
    }

    /// Content hash of all files (`sha256:` + 16 hex digits).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Number of passages.
    pub fn passages(&self) -> usize {
        self.live as usize
    }

    /// Total bytes of context.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The best `k` passages for `query`, best first; empty when no query
    /// term occurs anywhere.
    pub fn search(&self, query: &str, k: usize) -> Vec<Hit> {
        let mut ids: Vec<u32> = Vec::new();
        text::terms(query, |t| {
            if let Some(id) = self.vocab.get(t)
                && self
                    .postings
                    .get(id as usize)
                    .is_some_and(|l| !l.is_empty())
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        });
        if ids.is_empty() || k == 0 {
            return Vec::new();
        }
        let n = self.live as f32;
        SCRATCH.with(|s| {
            let (scores, touched) = &mut *s.borrow_mut();
            if scores.len() < self.docs.len() {
                scores.resize(self.docs.len(), 0.0);
            }
            for id in ids {
                let list = &self.postings[id as usize];
                let df = list.len() as f32;
                let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
                for &(doc, tf) in list.iter() {
                    let tf = f32::from(tf);
                    let dl = self.docs[doc as usize].len as f32;
                    let s = idf * tf * (K1 + 1.0) / (tf + K1 * (1.0 - B + B * dl / self.avg_len));
                    let slot = &mut scores[doc as usize];
                    if *slot == 0.0 {
                        touched.push(doc);
                    }
                    *slot += s;
                }
            }
            let mut hits: Vec<Hit> = touched
                .iter()
                .map(|&d| {
                    let doc = self.docs[d as usize];
                    Hit {
                        file: doc.file as usize,
                        passage: doc.passage as usize,
                        score: scores[d as usize],
                    }
                })
                .collect();
            for &d in touched.iter() {
                scores[d as usize] = 0.0;
            }
            touched.clear();
            let by_score = |a: &Hit, b: &Hit| {
                b.score
                    .total_cmp(&a.score)
                    .then(a.file.cmp(&b.file))
                    .then(a.passage.cmp(&b.passage))
            };
            if hits.len() > k {
                hits.select_nth_unstable_by(k - 1, by_score);
                hits.truncate(k);
            }
            hits.sort_by(by_score);
            hits
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::context::{Found, load};
    use super::*;

    fn index_of(files: &[(&str, &str)]) -> (tempfile::TempDir, Index) {
        let d = tempfile::tempdir().unwrap();
        let mut loaded = Vec::new();
        for (name, body) in files {
            let p = d.path().join(name);
            std::fs::write(&p, body).unwrap();
            loaded.push(Arc::new(
                load(&Found {
                    path: p,
                    display: (*name).into(),
                    explicit: true,
                })
                .unwrap(),
            ));
        }
        let vocab = Vocab::new();
        let files = loaded
            .into_iter()
            .map(|f| {
                let t = Arc::new(vocab.tokenize(&f));
                (f, t)
            })
            .collect();
        (d, Index::build(files, vocab))
    }

    #[test]
    fn ranks_the_passage_with_the_rare_terms_first() {
        let (_d, idx) = index_of(&[(
            "notes.md",
            "# Cache\nWe decided to keep the LRU cache at 64 entries.\nIt is rebuilt nightly.\nOwner: Ana.\n\n# FIFO\nThe server reads hello frames from a FIFO.\nEach client has its own pair.\nWritten by Bo.\n\n# Misc\nThe cache and the FIFO are unrelated.\nNothing else.\nReally.\n",
        )]);
        let hits = idx.search("What did we decide about the cache size?", 3);
        assert_eq!(hits[0].passage, 0, "{hits:?}");
        let hits = idx.search("how does a client talk to the FIFO", 3);
        assert_eq!(hits[0].passage, 1, "{hits:?}");
        assert!(idx.search("zebra xylophone", 3).is_empty());
        assert!(idx.search("the and of", 3).is_empty());
        assert!(idx.version().starts_with("sha256:") && idx.version().len() == 23);
    }

    #[test]
    fn version_changes_with_content_and_scores_are_reset_between_queries() {
        let (_d, a) = index_of(&[("a.md", "alpha beta\n")]);
        let (_d2, b) = index_of(&[("a.md", "alpha gamma\n")]);
        assert_ne!(a.version(), b.version());
        let first = a.search("alpha", 1)[0].score;
        let second = a.search("alpha", 1)[0].score;
        assert_eq!(first, second);
    }

    fn file(vocab: &Vocab, name: &str, body: &str) -> (Arc<ContextFile>, Arc<Tokenized>) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(name);
        std::fs::write(&p, body).unwrap();
        let f = load(&Found {
            path: p,
            display: name.into(),
            explicit: true,
        })
        .unwrap();
        let t = Arc::new(vocab.tokenize(&f));
        (Arc::new(f), t)
    }

    fn hits(idx: &Index, q: &str) -> Vec<(String, usize, u32)> {
        idx.search(q, 20)
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

    #[test]
    fn an_update_shares_untouched_postings_and_equals_a_build() {
        let vocab = Vocab::new();
        let body = |i: usize, w: &str| {
            format!("# F{i}\nshared text {w}\n\n\nmore {w} words here\nand more\nstill more\nend\n")
        };
        let mut files: Vec<_> = (0..30)
            .map(|i| file(&vocab, &format!("f{i:02}.md"), &body(i, "alpha")))
            .collect();
        let mut idx = Index::build(files.clone(), vocab.clone());
        for round in 0..40usize {
            // Edit one file, drop one, add one (in the middle of the order).
            let i = round % files.len();
            let name = files[i].0.display.clone();
            files[i] = file(&vocab, &name, &body(i, &format!("w{round}")));
            if round % 3 == 0 {
                files.remove((i + 7) % files.len());
                files.push(file(
                    &vocab,
                    &format!("f{i:02}b{round}.md"),
                    &body(i, "other"),
                ));
                files.sort_by(|a, b| a.0.display.cmp(&b.0.display));
            }
            let next = idx.update(files.clone());
            let fresh = Index::build(files.clone(), vocab.clone());
            assert_eq!(next.version(), fresh.version());
            assert_eq!(next.passages(), fresh.passages());
            for q in [
                "shared text",
                "alpha",
                "other words",
                &format!("w{round}"),
                "w3 f4",
            ] {
                assert_eq!(hits(&next, q), hits(&fresh, q), "round {round} query {q:?}");
            }
            // Holes stay bounded; untouched lists are shared, not copied.
            assert!(next.docs.len() <= 2 * next.live as usize + 64);
            if next.docs.len() > fresh.docs.len() {
                let end = vocab.get("end").unwrap() as usize;
                let quoted = vocab.get(&format!("w{round}")).unwrap() as usize;
                assert!(!Arc::ptr_eq(&next.postings[end], &idx.postings[end]));
                assert!(next.postings.len() > quoted);
            }
            idx = next;
        }
        // Untouched: a term only in files that did not change shares its list.
        let a = Index::build(files.clone(), vocab.clone());
        let mut changed = files.clone();
        let name = changed[0].0.display.clone();
        changed[0] = file(&vocab, &name, "# F0\nzzz\n");
        let b = a.update(changed);
        let f29 = vocab.get("f29").unwrap() as usize;
        assert!(Arc::ptr_eq(&a.postings[f29], &b.postings[f29]));
        let f0 = vocab.get("f0").unwrap() as usize;
        assert!(!Arc::ptr_eq(&a.postings[f0], &b.postings[f0]));
        assert_eq!(
            b.docs.len(),
            a.docs.len() + 1,
            "one hole-free passage appended"
        );
    }

    #[test]
    fn top_k_is_sorted_and_bounded() {
        let body: String = (0..50)
            .map(|i| format!("word{} common\n\n\n\n\n", i % 5))
            .collect();
        let (_d, idx) = index_of(&[("x.md", &body)]);
        let hits = idx.search("common word3", 4);
        assert_eq!(hits.len(), 4);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    }
}
