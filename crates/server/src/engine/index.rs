//! The built-in engine's index: an inverted index over passages, ranked
//! with BM25F (k1 = 1.2) over three fields, the body, the heading path and
//! the file's path; a body shorter than half the average is scored as if
//! it had half the average length (a heading and a line do not outrank a
//! full passage on their few words); the best 20 are then re-ranked by how
//! close the query's words stand (within 5 terms). A query word also looks
//! for its related words ([`super::related`]) at 0.3 of its weight.
//!
//! Tokenising is done once per file version, in units of about 256 KB of
//! passages spread over the cores ([`super::par`]) and merged in order, so
//! the index is the same for any thread count. The workers do all they
//! can: stem each distinct word once per thread, and sort their unit's
//! entries into one encoded run per term (`Unit::group`); the merge, the
//! one serial part, maps each thread's word ids to term ids once and copies
//! each run onto its term's list. Term ids come from a
//! [`Vocab`] shared by every index of one engine and only ever appended to;
//! of each file the index keeps only its distinct terms (to take it out
//! again). Posting lists are compressed (`engine/postings.rs`).
//!
//! After a change, [`Index::update`] makes a new index from the old one:
//! posting lists are shared (`Arc`) and only those of the changed files'
//! terms are copied and edited, and of those only the blocks the change
//! touches (`engine/postings.rs`); removed passages leave holes in the
//! document table until holes outnumber documents ([`Index::wants_compaction`]),
//! when it is compacted ([`Index::compact`]: ids renumbered, every list
//! rewritten, nothing re-tokenised). The new index is swapped in whole, so
//! readers never see one half made; the engine compacts the index it swapped
//! in once nothing else holds it, so each list is rewritten in place and the
//! old lists are not kept beside the new.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use sha2::{Digest, Sha256};

use super::context::ContextFile;
use super::interner::{Interner, Strs};
use super::postings::{List, Runs};
use super::{lines, related, text};

const K1: f32 = 1.2;
const B: f32 = 0.75;
/// The shortest length (a share of the average) a passage is scored with.
const MIN_LEN_SHARE: f32 = 0.5;
/// The fields of a passage (BM25F): its body, the headings above it, its
/// file's path. Heading and path terms are indexed as their own terms,
/// marked by a leading control character no word can hold.
const BODY: usize = 0;
const HEADING: usize = 1;
const PATH: usize = 2;
const FIELD_MARK: [char; 3] = ['\0', '\u{1}', '\u{2}'];
/// Per field: the weight of a term's count, and how much the field's
/// length normalises it (BM25's b). The path's length is not normalised:
/// a word of the file's name counts the same in a long path as in a short.
const FIELD_WEIGHT: [f32; 3] = [1.0, 1.0, 1.0];
const FIELD_B: [f32; 3] = [B, 1.0, 0.0];

/// `t` as a term of `field`.
fn field_term(field: usize, t: &str) -> String {
    let mut s = String::with_capacity(t.len() + 1);
    if field != BODY {
        s.push(FIELD_MARK[field]);
    }
    s.push_str(t);
    s
}
/// Weight of the proximity bonus ([`Index::proximity`]): two query terms
/// side by side add the smaller one's idf once, two terms apart 1/sqrt(2)
/// of it, further apart than [`PROXIMITY_SPAN`] nothing.
const PROXIMITY: f32 = 1.0;
/// Query words further apart than this (in terms) add no proximity bonus:
/// in a long passage or table some pair is always near by chance.
const PROXIMITY_SPAN: u32 = 5;
/// Share of a query word's weight its related words ([`related`]) score
/// with (tune half: 0.2 / 0.3 / 0.4 / 0.5).
const RELATED_WEIGHT: f32 = 0.3;
/// How many of the best BM25 passages proximity re-ranks.
const RERANK: usize = 20;
/// What the weight of a passage's best unit ([`Index::best_unit`]: the
/// sentence, row or line holding the most of the query's weight) adds to
/// its score, so that a passage where the query's words meet in one
/// sentence outranks one where they are scattered over a long table or
/// list (tune half: 0.25 / 0.5 / 1.0; 0.5 took hit@1 from 49.5 to 52.3 %
/// and MRR from 0.581 to 0.586 there, and on the check half hit@3 from
/// 70.4 to 72.2 % and MRR from 0.642 to 0.653, hit@1 unchanged).
const FOCUS: f32 = 0.5;
/// How many of the best passages after proximity get the [`FOCUS`] part
/// (finding units tokenises a passage again; 5 and 20 gave the same
/// ranks as 8).
const FOCUSED: usize = 8;

/// A passage as indexed: which file, which passage of it, its length in terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Doc {
    file: u32,
    passage: u32,
    /// Body terms (the field's length).
    len: u32,
    /// Terms of its heading path.
    hlen: u16,
    /// Terms of its file's path.
    plen: u16,
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
    ids: RwLock<Interner>,
}

impl Vocab {
    /// A new, empty vocabulary.
    pub fn new() -> Arc<Vocab> {
        Arc::new(Vocab::default())
    }

    fn get(&self, term: &str) -> Option<u32> {
        match self.ids.read() {
            Ok(g) => g.get(term),
            Err(p) => p.into_inner().get(term),
        }
    }

    /// The ids of `words`, new ones given the next ids in order. Takes the
    /// write lock once, and only if a word is new, so queries are not held
    /// up while a big file is indexed.
    fn ids_of(&self, words: &[&str]) -> Vec<u32> {
        let mut out: Vec<Option<u32>> = {
            let g = self.ids.read().unwrap_or_else(PoisonError::into_inner);
            words.iter().map(|w| g.get(w)).collect()
        };
        if out.iter().any(Option::is_none) {
            let mut g = self.ids.write().unwrap_or_else(PoisonError::into_inner);
            for (w, id) in words.iter().zip(out.iter_mut()) {
                if id.is_none() {
                    *id = Some(g.intern(w));
                }
            }
        }
        out.into_iter().map(|id| id.unwrap_or(0)).collect()
    }
}

/// What an index keeps of a file's terms: enough to take it out again.
#[derive(Debug, PartialEq, Eq)]
struct FileTerms {
    /// Its distinct term ids, ascending, as LEB128 deltas (about 1.5
    /// bytes a term instead of 4).
    terms: Box<[u8]>,
    /// Its passages' lengths in terms, summed.
    len: u64,
}

/// `ids` (ascending, distinct) as LEB128-encoded gaps.
fn encode_ids(ids: &[u32]) -> Box<[u8]> {
    let mut out = Vec::with_capacity(ids.len() * 2);
    let mut prev = 0u32;
    for &id in ids {
        let mut gap = id - prev;
        prev = id;
        loop {
            let b = (gap & 0x7f) as u8;
            gap >>= 7;
            if gap == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
    }
    out.into_boxed_slice()
}

/// The ids [`encode_ids`] encoded.
fn decode_ids(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    let mut i = 0;
    let mut prev = 0u32;
    std::iter::from_fn(move || {
        if i >= bytes.len() {
            return None;
        }
        let (mut gap, mut shift) = (0u32, 0);
        while let Some(&b) = bytes.get(i) {
            i += 1;
            gap |= u32::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        prev += gap;
        Some(prev)
    })
}

/// FxHash (as in rustc): a multiply and a rotate per word of input. The
/// unit-local term maps are hashed once per token, so SipHash's cost shows;
/// their keys come from our own context files, not from an adversary.
#[derive(Default, Clone, Copy)]
pub(super) struct Fx(u64);

impl std::hash::Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }
}

type FxMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fx>>;

/// A passage's lengths in terms: body, heading, path.
type FieldLens = (u32, u16, u16);

/// A run of passages tokenised by one worker, with term ids local to the
/// run (`words[id]`), so workers share nothing while they work.
struct Unit {
    /// The [`ThreadWords`] (by its `era`) whose ids `tids` are.
    era: u64,
    words: Strs,
    /// Per local id: the id of its term in that thread's words.
    tids: Vec<u32>,
    /// Per passage, in order: (local term id, count), ending at `ends`.
    entries: Vec<(u32, u16)>,
    ends: Vec<u32>,
    /// Per passage: its lengths in terms: body, heading, path.
    lens: Vec<FieldLens>,
    /// Per local id, in order, once [`Unit::group`] ran: its (document
    /// id, count) entries, encoded as posting lists hold them.
    runs: Runs,
    /// Per file the unit's passages are of, in order: (its position in
    /// the files, its passages in the unit, the end of its terms in
    /// `file_terms`).
    segments: Vec<(u32, u32, u32)>,
    /// The distinct local ids of each segment's passages.
    file_terms: Vec<u32>,
}

impl Unit {
    /// Turn the per-passage counts into one run of entries per term, the
    /// unit's first passage being document `first_doc`, so the merge only
    /// copies them onto the lists (it is the one part of the work that
    /// cannot be spread over the cores).
    fn group(&mut self, first_doc: u32) {
        let n = self.words.len();
        // Counting sort by term: `at[l]` is where term l's entries start...
        let mut at = vec![0u32; n + 1];
        for &(l, _) in &self.entries {
            at[l as usize + 1] += 1;
        }
        for i in 0..n {
            at[i + 1] += at[i];
        }
        let mut sorted = vec![(0u32, 0u16); self.entries.len()];
        let mut from = 0usize;
        for (p, &end) in self.ends.iter().enumerate() {
            let doc = first_doc + p as u32;
            for &(l, c) in &self.entries[from..end as usize] {
                let slot = &mut at[l as usize];
                sorted[*slot as usize] = (doc, c);
                *slot += 1;
            }
            from = end as usize;
        }
        // ...and, moved on by its entries, where they end.
        let mut runs = Runs::default();
        let mut start = 0usize;
        for &end in &at[..n] {
            // Empty for a heading word's stem not in any body here.
            runs.push(&sorted[start..end as usize]);
            start = end as usize;
        }
        self.runs = runs;
        self.entries = Vec::new();
        self.ends = Vec::new();
    }
}

/// A unit of tokenising work is about this much text: small enough to
/// spread a single big file over the cores, big enough that the per-unit
/// merge (one vocabulary lookup per distinct word) stays cheap.
const UNIT_BYTES: usize = 256 << 10;

/// Tokenise passages `flat` of `files` (numbered across the files in
/// order; `starts[i]` is file i's first) into local term counts.
fn tokenize_unit(files: &[&ContextFile], starts: &[usize], flat: std::ops::Range<usize>) -> Unit {
    WORDS.with(|words| {
        let words = &mut *words.borrow_mut();
        if words.cached() >= STEM_CACHE || words.terms.len() >= STEM_CACHE {
            *words = ThreadWords::new();
        }
        tokenize_with(words, files, starts, flat)
    })
}

fn tokenize_with(
    words: &mut ThreadWords,
    files: &[&ContextFile],
    starts: &[usize],
    flat: std::ops::Range<usize>,
) -> Unit {
    let mut t = UnitTerms::default();
    let mut lens_all = Vec::with_capacity(flat.len());
    let mut ends = Vec::with_capacity(flat.len());
    let mut entries = Vec::new();
    let mut segments: Vec<(u32, u32, u32)> = Vec::new();
    let mut fi = starts.partition_point(|&s| s <= flat.start) - 1;
    let mut path: Option<(usize, Vec<u32>)> = None;
    for i in flat {
        while starts[fi + 1] <= i {
            fi += 1;
        }
        let file = files[fi];
        let p = &file.passages[i - starts[fi]];
        if path.as_ref().is_none_or(|(f, _)| *f != fi) {
            segments.push((fi as u32, 0, t.file_terms.len() as u32));
            t.segment = segments.len() as u32;
            let mut v = Vec::new();
            text::terms(&file.display[file.rel..], |w| {
                v.push(t.marked_id(words, &field_term(PATH, w)));
            });
            path = Some((fi, v));
        }
        let mut lens = [0u32; 3];
        // Words come unstemmed: `ThreadWords` stems each distinct one once.
        text::terms_where(
            &file.text[p.bytes.clone()],
            |_| false,
            |w, _| {
                let id = t.stem_id(words, w);
                t.count(id);
                lens[BODY] += 1;
            },
        );
        text::terms_where(
            &p.heading,
            |_| false,
            |w, _| {
                let id = t.stem_id(words, w);
                let id = t.heading_id(words, id);
                t.count(id);
                lens[HEADING] += 1;
            },
        );
        for &id in path.iter().flat_map(|(_, v)| v) {
            t.count(id);
            lens[PATH] += 1;
        }
        for id in t.seen.drain(..) {
            entries.push((id, std::mem::take(&mut t.counts[id as usize])));
        }
        ends.push(entries.len() as u32);
        if let Some(s) = segments.last_mut() {
            s.1 += 1;
            s.2 = t.file_terms.len() as u32;
        }
        let short = |n: u32| n.min(u32::from(u16::MAX)) as u16;
        lens_all.push((lens[BODY], short(lens[HEADING]), short(lens[PATH])));
    }
    Unit {
        era: words.era,
        words: t.words,
        tids: t.tids,
        entries,
        ends,
        lens: lens_all,
        runs: Runs::default(),
        segments,
        file_terms: t.file_terms,
    }
}

/// A tokenising thread's words, kept across its units: each distinct
/// unstemmed word is stemmed once (Snowball costs more than a look-up) and
/// given a thread-wide id of its stem, so a unit maps a word to its own id
/// with one hash look-up and an index. Marked (heading, path) terms get
/// thread ids too, so the merge can map thread ids to index ids once per
/// term instead of looking every unit's words up in the [`Vocab`].
struct ThreadWords {
    /// Which of these this is (never reused), for the merge's map of
    /// thread ids to index ids.
    era: u64,
    /// Unstemmed word of up to 16 bytes, packed ([`short_key`]) -> thread
    /// id of its stem: compared in place, where a boxed key would cost a
    /// trip to memory per token.
    short: FxMap<(u64, u64), u32>,
    /// Longer unstemmed word -> thread id of its stem.
    raw: FxMap<Box<str>, u32>,
    /// Stems and marked terms, by thread id.
    terms: Interner,
}

impl ThreadWords {
    fn new() -> ThreadWords {
        static ERA: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        ThreadWords {
            era: ERA.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            short: FxMap::default(),
            raw: FxMap::default(),
            terms: Interner::default(),
        }
    }

    /// The thread id of term `t` (a stem or a marked term).
    fn term_id(&mut self, t: &str) -> u32 {
        self.terms.intern(t)
    }

    /// The thread id of unstemmed word `w`'s stem.
    fn stem_id(&mut self, w: &str) -> u32 {
        let key = short_key(w);
        let found = match key {
            Some(k) => self.short.get(&k),
            None => self.raw.get(w),
        };
        if let Some(&id) = found {
            return id;
        }
        let mut stem = w.to_string();
        text::stem(&mut stem);
        let id = self.term_id(&stem);
        match key {
            Some(k) => self.short.insert(k, id),
            None => self.raw.insert(w.into(), id),
        };
        id
    }

    /// Distinct unstemmed words cached.
    fn cached(&self) -> usize {
        self.short.len() + self.raw.len()
    }
}

/// A word of up to 16 bytes as two numbers: its bytes, zero-padded. Words
/// hold no zero byte (letters and digits only), so no two share a key.
/// (Not one `u128`: its 16-byte alignment would pad each map slot from
/// 24 bytes to 32.)
fn short_key(w: &str) -> Option<(u64, u64)> {
    let b = w.as_bytes();
    if b.len() > 16 {
        return None;
    }
    let mut k = [0u8; 16];
    k[..b.len()].copy_from_slice(b);
    let half = |h: &[u8]| u64::from_le_bytes(h.try_into().unwrap_or([0; 8]));
    Some((half(&k[..8]), half(&k[8..])))
}

/// Distinct words a tokenising thread keeps the stems of; past it, the
/// cache is emptied before the next unit.
const STEM_CACHE: usize = 1 << 18;

thread_local! {
    static WORDS: RefCell<ThreadWords> = RefCell::new(ThreadWords::new());
}

/// A unit's terms while it is tokenised: local ids, and the counts of the
/// passage at hand.
#[derive(Default)]
struct UnitTerms {
    /// Thread id of a term -> local id + 1 (0: not in this unit yet).
    local: Vec<u32>,
    /// Local id -> term.
    words: Strs,
    /// Local id -> thread id.
    tids: Vec<u32>,
    /// Body term's local id -> its heading term's id (`u32::MAX`: none yet).
    heading: Vec<u32>,
    /// Per local id: count in the passage at hand.
    counts: Vec<u16>,
    /// Local ids counted in the passage at hand, in first-seen order.
    seen: Vec<u32>,
    /// The segment (file) at hand, 1-based, and per local id the last
    /// segment it was counted in.
    segment: u32,
    in_segment: Vec<u32>,
    /// Each segment's distinct local ids, one segment after the other.
    file_terms: Vec<u32>,
}

impl UnitTerms {
    /// The local id of thread term `tid`.
    fn local_of(&mut self, words: &ThreadWords, tid: u32) -> u32 {
        let ti = tid as usize;
        if ti >= self.local.len() {
            self.local.resize(words.terms.len().max(ti + 1), 0);
        }
        match self.local[ti] {
            0 => {
                let id = self.words.len() as u32;
                self.words.push(words.terms.str(tid));
                self.tids.push(tid);
                self.counts.push(0);
                self.heading.push(u32::MAX);
                self.in_segment.push(0);
                self.local[ti] = id + 1;
                id
            }
            l => l - 1,
        }
    }

    /// The local id of marked term `t`.
    fn marked_id(&mut self, words: &mut ThreadWords, t: &str) -> u32 {
        let tid = words.term_id(t);
        self.local_of(words, tid)
    }

    /// The local id of unstemmed word `w`'s stem.
    fn stem_id(&mut self, words: &mut ThreadWords, w: &str) -> u32 {
        let tid = words.stem_id(w);
        self.local_of(words, tid)
    }

    /// The local id of body term `id` as a heading term.
    fn heading_id(&mut self, words: &mut ThreadWords, id: u32) -> u32 {
        match self.heading[id as usize] {
            u32::MAX => {
                let marked = field_term(HEADING, self.words.str(id));
                let h = self.marked_id(words, &marked);
                self.heading[id as usize] = h;
                h
            }
            h => h,
        }
    }

    /// Count local id `id` once more in the passage at hand.
    fn count(&mut self, id: u32) {
        let i = id as usize;
        let c = &mut self.counts[i];
        if *c == 0 {
            self.seen.push(id);
        }
        *c = c.saturating_add(1);
        if self.in_segment[i] != self.segment {
            self.in_segment[i] = self.segment;
            self.file_terms.push(id);
        }
    }
}

/// The merge's map from the ids of each tokenising thread's words to the
/// index's term ids, so each term is looked up in the [`Vocab`] once per
/// thread rather than once per unit.
#[derive(Default)]
struct KnownIds {
    /// Per [`ThreadWords::era`]: thread id -> term id (`u32::MAX`: not yet).
    by_era: Vec<(u64, Vec<u32>)>,
}

impl KnownIds {
    /// The term ids of `unit`'s words (new ones given the next ids in
    /// order, as [`Vocab::ids_of`] over all its words would).
    fn of(&mut self, unit: &Unit, vocab: &Vocab) -> Vec<u32> {
        let slot = match self.by_era.iter().position(|(g, _)| *g == unit.era) {
            Some(i) => i,
            None => {
                self.by_era.push((unit.era, Vec::new()));
                self.by_era.len() - 1
            }
        };
        let known = &mut self.by_era[slot].1;
        let mut out = vec![u32::MAX; unit.words.len()];
        let (mut missing, mut words) = (Vec::new(), Vec::new());
        for (l, &tid) in unit.tids.iter().enumerate() {
            match known.get(tid as usize) {
                Some(&id) if id != u32::MAX => out[l] = id,
                _ => {
                    missing.push(l);
                    words.push(unit.words.str(l as u32));
                }
            }
        }
        if !missing.is_empty() {
            for (&l, id) in missing.iter().zip(vocab.ids_of(&words)) {
                out[l] = id;
                let tid = unit.tids[l] as usize;
                if tid >= known.len() {
                    known.resize(tid + 1, u32::MAX);
                }
                known[tid] = id;
            }
        }
        out
    }
}

/// The tables an index is made of, while being made.
struct Tables {
    docs: Vec<Doc>,
    postings: Vec<Arc<List>>,
    total_len: u64,
    /// Grow lists by what they need, not by doubling (an update: its
    /// lists are copies, not shrunk after).
    tight: bool,
}

impl Tables {
    /// Tokenise `add` (new file position, file) on up to `threads` threads
    /// and append their passages as documents, in order; returns each
    /// file's terms and document ids, in the order of `add`. The documents,
    /// postings and term ids come out the same whatever `threads` is.
    /// The workers also sort their units' entries into runs per term
    /// ([`Unit::group`]); the merge, on this thread, copies each run onto
    /// its term's list.
    fn add_files(
        &mut self,
        add: &[(usize, &Arc<ContextFile>)],
        vocab: &Vocab,
        threads: usize,
        unit_bytes: usize,
    ) -> Vec<(Arc<FileTerms>, std::ops::Range<u32>)> {
        let files: Vec<&ContextFile> = add.iter().map(|(_, f)| f.as_ref()).collect();
        let mut starts = Vec::with_capacity(files.len() + 1);
        let mut cuts = vec![0usize];
        let (mut flat, mut bytes) = (0usize, 0usize);
        for f in &files {
            starts.push(flat);
            for p in &f.passages {
                flat += 1;
                bytes += p.bytes.len() + p.heading.len();
                if bytes >= unit_bytes {
                    cuts.push(flat);
                    bytes = 0;
                }
            }
        }
        starts.push(flat);
        // One document per passage: room for all of them at once, not by
        // doubling (the spare half of a doubled table is part of the peak).
        self.docs.reserve_exact(flat);
        if *cuts.last().unwrap_or(&0) != flat {
            cuts.push(flat);
        }
        let mut out = Vec::with_capacity(files.len());
        // Where the merge is: file `k` of `add`, `done` of its passages.
        let (mut k, mut done) = (0usize, 0usize);
        let first_doc = self.docs.len() as u32;
        let mut start = first_doc;
        let mut terms: Vec<u32> = Vec::new();
        // Per term id: 1 + the position in `add` of the last file that
        // listed it, so `terms` gets each of a file's terms once.
        let mut in_file: Vec<u32> = Vec::new();
        let mut len = 0u64;
        let mut known = KnownIds::default();
        let mut finish = |tables: &Tables, terms: &mut Vec<u32>, len: &mut u64, start: &mut u32| {
            terms.sort_unstable();
            terms.dedup();
            let end = tables.docs.len() as u32;
            out.push((
                Arc::new(FileTerms {
                    terms: encode_ids(terms),
                    len: std::mem::take(len),
                }),
                *start..end,
            ));
            terms.clear();
            *start = end;
        };
        super::par::map_ordered(
            cuts.len() - 1,
            threads,
            |u| {
                let mut unit = tokenize_unit(&files, &starts, cuts[u]..cuts[u + 1]);
                unit.group(first_doc + cuts[u] as u32);
                unit
            },
            |_, unit| {
                let global = known.of(&unit, vocab);
                for (l, &t) in global.iter().enumerate() {
                    if unit.runs.run_len(l) == 0 {
                        continue;
                    }
                    let ti = t as usize;
                    if ti >= self.postings.len() {
                        self.postings.resize_with(ti + 1, Default::default);
                    }
                    let list = Arc::make_mut(&mut self.postings[ti]);
                    if self.tight {
                        list.reserve_run(&unit.runs, l);
                    }
                    list.append_run(&unit.runs, l);
                }
                let (mut from, mut p) = (0usize, 0usize);
                for &(fi, passages, terms_end) in &unit.segments {
                    while k < fi as usize {
                        finish(self, &mut terms, &mut len, &mut start);
                        (k, done) = (k + 1, 0);
                    }
                    for &l in &unit.file_terms[from..terms_end as usize] {
                        let t = global[l as usize];
                        let ti = t as usize;
                        if ti >= in_file.len() {
                            in_file.resize(ti + 1, 0);
                        }
                        if in_file[ti] != k as u32 + 1 {
                            in_file[ti] = k as u32 + 1;
                            terms.push(t);
                        }
                    }
                    from = terms_end as usize;
                    for &(plen, hlen, pathlen) in &unit.lens[p..p + passages as usize] {
                        len += u64::from(plen);
                        self.total_len += u64::from(plen);
                        self.docs.push(Doc {
                            file: add[k].0 as u32,
                            passage: done as u32,
                            len: plen,
                            hlen,
                            plen: pathlen,
                        });
                        done += 1;
                    }
                    p += passages as usize;
                }
            },
        );
        while k < files.len() {
            finish(self, &mut terms, &mut len, &mut start);
            k += 1;
        }
        out
    }
}

/// An immutable index over a set of context files. (`Clone` shares the
/// files and the posting lists; the document table is copied.)
#[derive(Debug, Clone)]
pub struct Index {
    files: Vec<Arc<ContextFile>>,
    /// Per file (same order): its distinct terms and its document ids.
    toks: Vec<(Arc<FileTerms>, std::ops::Range<u32>)>,
    /// Documents by id; ids of removed passages stay as holes (`len` 0,
    /// in no posting list) until the next full build.
    docs: Vec<Doc>,
    vocab: Arc<Vocab>,
    /// Per term id: (document id, count), ids ascending. Shared with the
    /// index this one was updated from, copied only where a change touched.
    postings: Vec<Arc<List>>,
    /// Documents that are not holes.
    live: u32,
    total_len: u64,
    /// Average length of each field (body, heading, path) over live passages.
    avg_len: [f32; 3],
    version: String,
    bytes: u64,
}

thread_local! {
    /// Per-thread score accumulator, reused across queries.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The context version: SHA-256 over each file's path and content hash.
fn version_of(files: &[Arc<ContextFile>]) -> (String, u64) {
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    for f in files {
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
    /// Index `files` (in display order), tokenising on up to `threads`
    /// threads (see [`par::threads`](super::par::threads)); the index is the
    /// same whatever the thread count.
    pub fn build(files: Vec<Arc<ContextFile>>, vocab: Arc<Vocab>, threads: usize) -> Index {
        Index::build_in(files, vocab, threads, UNIT_BYTES)
    }

    fn build_in(
        files: Vec<Arc<ContextFile>>,
        vocab: Arc<Vocab>,
        threads: usize,
        unit_bytes: usize,
    ) -> Index {
        let mut t = Tables {
            docs: Vec::new(),
            postings: Vec::new(),
            total_len: 0,
            tight: false,
        };
        let add: Vec<(usize, &Arc<ContextFile>)> = files.iter().enumerate().collect();
        let toks = t.add_files(&add, &vocab, threads, unit_bytes);
        for l in &mut t.postings {
            Arc::make_mut(l).shrink_to_fit();
        }
        t.docs.shrink_to_fit();
        Index::finish(files, toks, t, vocab)
    }

    fn finish(
        files: Vec<Arc<ContextFile>>,
        toks: Vec<(Arc<FileTerms>, std::ops::Range<u32>)>,
        t: Tables,
        vocab: Arc<Vocab>,
    ) -> Index {
        let (version, bytes) = version_of(&files);
        let live = toks.iter().map(|(_, r)| r.len() as u32).sum::<u32>();
        let (mut heading, mut path) = (0u64, 0u64);
        for d in t.docs.iter().filter(|d| d.file != u32::MAX) {
            heading += u64::from(d.hlen);
            path += u64::from(d.plen);
        }
        let avg = |total: u64| {
            if live == 0 {
                1.0
            } else {
                (total as f32 / live as f32).max(1.0)
            }
        };
        let avg_len = [avg(t.total_len), avg(heading), avg(path)];
        Index {
            files,
            toks,
            docs: t.docs,
            vocab,
            postings: t.postings,
            live,
            total_len: t.total_len,
            avg_len,
            version,
            bytes,
        }
    }

    /// This index with `files` (the whole new list, in display order) in
    /// place of its own: a file that is the same `Arc` as before, under the
    /// same name, keeps its documents; the documents of the others are
    /// removed from the posting lists of their terms and the new files
    /// tokenised (on up to `threads` threads) and appended. Only the
    /// posting lists of those terms are copied; the document table and the
    /// version are redone (O(passages), O(files)). Searches give exactly
    /// what [`Index::build`] over `files` gives. Holes are left for
    /// [`Index::compact`].
    pub fn update(&self, files: Vec<Arc<ContextFile>>, threads: usize) -> Index {
        let old: HashMap<&str, usize> = self
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.display.as_str(), i))
            .collect();
        let mut kept = vec![None; self.files.len()];
        // Passages of the files that are new or changed.
        let mut fresh = 0usize;
        for (ni, f) in files.iter().enumerate() {
            if let Some(&oi) = old.get(f.display.as_str())
                && Arc::ptr_eq(&self.files[oi], f)
            {
                kept[oi] = Some(ni);
            } else {
                fresh += f.passages.len();
            }
        }
        // Copies with room for what the change adds (its passages exactly;
        // new words: a few per cent), so that neither is copied again by
        // growing while the old index is still held.
        let mut docs = Vec::with_capacity(self.docs.len() + fresh);
        docs.extend_from_slice(&self.docs);
        let mut postings = Vec::with_capacity(self.postings.len() * 17 / 16 + 1024);
        postings.extend(self.postings.iter().cloned());
        let mut t = Tables {
            docs,
            postings,
            total_len: self.total_len,
            tight: true,
        };
        for (oi, (tok, span)) in self.toks.iter().enumerate() {
            if kept[oi].is_some() {
                continue;
            }
            t.total_len -= tok.len;
            for term in decode_ids(&tok.terms) {
                // The file's documents are one run of ids: cut it out.
                Arc::make_mut(&mut t.postings[term as usize]).remove_run(span.clone());
            }
            for d in span.clone() {
                t.docs[d as usize] = Doc {
                    file: u32::MAX,
                    passage: 0,
                    len: 0,
                    hlen: 0,
                    plen: 0,
                };
            }
        }
        let mut spans: Vec<Option<(Arc<FileTerms>, std::ops::Range<u32>)>> =
            vec![None; files.len()];
        for (oi, ni) in kept.iter().enumerate() {
            if let Some(ni) = *ni {
                let (tok, span) = self.toks[oi].clone();
                if oi != ni {
                    for d in span.clone() {
                        t.docs[d as usize].file = ni as u32;
                    }
                }
                spans[ni] = Some((tok, span));
            }
        }
        let add: Vec<(usize, &Arc<ContextFile>)> = files
            .iter()
            .enumerate()
            .filter(|(ni, _)| spans[*ni].is_none())
            .collect();
        let added = t.add_files(&add, &self.vocab, threads, UNIT_BYTES);
        for ((ni, _), tok) in add.iter().zip(added) {
            spans[*ni] = Some(tok);
        }
        let toks = spans.into_iter().flatten().collect();
        Index::finish(files, toks, t, self.vocab.clone())
    }

    /// Whether holes (ids of removed passages) outnumber live passages, so
    /// the index is due for [`Index::compact`].
    pub fn wants_compaction(&self) -> bool {
        self.docs.len() > 2 * self.live as usize + 64
    }

    /// Take the holes out: documents renumbered in order, every posting
    /// list rewritten with the new ids (the order of ids is kept, so lists
    /// stay sorted). O(postings), no reading or tokenising. A list held
    /// by this index alone is rewritten in place (the old one freed before
    /// the next is made); one shared with another index is copied. Returns
    /// how many lists were copied.
    pub fn compact(&mut self) -> usize {
        let mut new_id = vec![u32::MAX; self.docs.len()];
        let mut docs = Vec::with_capacity(self.live as usize);
        for (old, d) in self.docs.iter().enumerate() {
            if d.file != u32::MAX {
                new_id[old] = docs.len() as u32;
                docs.push(*d);
            }
        }
        self.docs = docs;
        let mut copied = 0;
        for l in &mut self.postings {
            match Arc::get_mut(l) {
                Some(list) => *list = list.remap(&new_id),
                None => {
                    *l = Arc::new(l.remap(&new_id));
                    copied += 1;
                }
            }
        }
        for (_, span) in &mut self.toks {
            let len = span.end - span.start;
            // No documents: any id where the run would be will do.
            let start = if len == 0 {
                0
            } else {
                new_id[span.start as usize]
            };
            *span = start..start + len;
        }
        copied
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

    /// What the index's own tables hold, in bytes (postings, documents,
    /// per-file terms; not the files' text or passages), and the number of
    /// posting entries. For logs and benchmarks.
    pub fn table_bytes(&self) -> (usize, usize) {
        let entries: usize = self.postings.iter().map(|l| l.len()).sum();
        let bytes: usize = self.postings.iter().map(|l| l.byte_len()).sum();
        let lists = self.postings.len() * (8 + 16 + 32);
        let terms: usize = self
            .toks
            .iter()
            .map(|(t, _)| t.terms.len() + 16 + 8 + 24)
            .sum();
        (
            bytes + lists + terms + self.docs.len() * std::mem::size_of::<Doc>(),
            entries,
        )
    }

    /// The line or sentence of passage `hit` most likely to answer
    /// `query`: of its units ([`lines::units`]: a sentence, a table row, a
    /// list item, a line of code), the one whose distinct query terms weigh
    /// most (`Index::best_unit`). Its 1-based first and last line numbers
    /// and its text (its parts of those lines, trimmed, joined by spaces),
    /// or `None` when no unit holds a query term.
    pub fn best_line(&self, hit: &Hit, query: &str) -> Option<(u32, u32, String)> {
        let weights = self.line_weights(query);
        let (start, ls) = self.passage_lines(hit)?;
        let (_, u) = self.best_unit(&ls, &weights)?;
        let joined = u
            .parts(&ls)
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        Some((start + u.first as u32, start + u.last as u32, joined))
    }

    /// Passage `hit`'s first line number and its lines.
    fn passage_lines(&self, hit: &Hit) -> Option<(u32, Vec<&str>)> {
        let file = self.files.get(hit.file)?;
        let p = file.passages.get(hit.passage)?;
        Some((p.start_line, file.text[p.bytes.clone()].lines().collect()))
    }

    /// The weight of each of `query`'s terms for choosing a best line: its
    /// idf; a related word's at [`RELATED_WEIGHT`] of its own, never above
    /// the word it stands for (as in [`Index::search`]). Each with its
    /// text, as [`text::terms`] gives it.
    fn line_weights(&self, query: &str) -> Vec<(String, f32)> {
        let n = self.live as f32;
        let df = |t: &str| {
            self.vocab
                .get(t)
                .and_then(|id| self.postings.get(id as usize))
                .map_or(0, |l| l.len())
        };
        let mut weights: Vec<(String, f32)> = Vec::new();
        text::terms(query, |t| {
            let d = df(t);
            if d > 0 && !weights.iter().any(|(x, _)| x == t) {
                weights.push((t.to_string(), idf(n, d as f32)));
            }
        });
        let mut wide: Vec<(String, f32)> = Vec::new();
        text::terms(query, |t| {
            let cap = weights
                .iter()
                .find(|(x, _)| x == t)
                .map_or(f32::INFINITY, |(_, w)| *w);
            for r in related::related(t) {
                let d = df(r);
                if d > 0 && !weights.iter().chain(&wide).any(|(x, _)| **x == **r) {
                    let w = idf(n, d as f32);
                    wide.push((r.to_string(), RELATED_WEIGHT * w.min(cap)));
                }
            }
        });
        weights.extend(wide);
        weights
    }

    /// Of the units of passage lines `ls` ([`lines::units`]), the one whose
    /// distinct terms weigh most by `weights` (a table row's with its
    /// header's), the shorter then the earlier on a tie, and its weight.
    /// None when no unit holds a weighted term. Only words that may stem to
    /// a weighted term are stemmed ([`text::could_stem_to`]).
    fn best_unit(&self, ls: &[&str], weights: &[(String, f32)]) -> Option<(f32, lines::Unit)> {
        let mut best: Option<(f32, lines::Unit)> = None;
        let mut seen: Vec<usize> = Vec::new();
        for u in lines::units(ls) {
            seen.clear();
            let mut score = 0.0f32;
            for part in u.header.iter().map(|&h| ls[h]).chain(u.parts(ls)) {
                text::terms_where(
                    part,
                    |w| weights.iter().any(|(t, _)| text::could_stem_to(w, t)),
                    |t, stemmed| {
                        if stemmed
                            && let Some(i) = weights.iter().position(|(x, _)| x == t)
                            && !seen.contains(&i)
                        {
                            seen.push(i);
                            score += weights[i].1;
                        }
                    },
                );
            }
            let span = |u: &lines::Unit| u.last - u.first;
            let better =
                |(bs, bu): (f32, lines::Unit)| score > bs || (score == bs && span(&u) < span(&bu));
            if score > 0.0 && best.is_none_or(better) {
                best = Some((score, u));
            }
        }
        best
    }

    /// The best `k` passages for `query`, best first; empty when neither a
    /// query word nor one of its related words occurs anywhere.
    pub fn search(&self, query: &str, k: usize) -> Vec<Hit> {
        let mut q: Vec<QTerm> = Vec::new();
        text::terms(query, |t| {
            if !q.iter().any(|x| x.text == t)
                && let Some(qt) = self.qterm(t)
            {
                q.push(qt);
            }
        });
        // Related words of each query word (also of one the corpus lacks),
        // unless the query has them itself.
        let mut wide: Vec<QTerm> = Vec::new();
        text::terms(query, |t| {
            for r in related::related(t) {
                if !q.iter().chain(wide.iter()).any(|x| *x.text == **r)
                    && let Some(mut qt) = self.qterm(r)
                {
                    qt.weight = RELATED_WEIGHT;
                    qt.of = Some(t.to_string());
                    wide.push(qt);
                }
            }
        });
        if (q.is_empty() && wide.is_empty()) || k == 0 {
            return Vec::new();
        }
        SCRATCH.with(|s| {
            let sc = &mut *s.borrow_mut();
            if sc.scores.len() < self.docs.len() {
                sc.scores.resize(self.docs.len(), 0.0);
                sc.tf.resize(self.docs.len(), 0.0);
            }
            for t in &mut q {
                t.idf = self.score_term(t, sc);
            }
            // A related word scores with at most the idf of the word it
            // stands for, and takes no part in proximity.
            for t in &mut wide {
                if let Some(o) = q.iter().find(|x| t.of.as_deref() == Some(&*x.text)) {
                    t.cap = o.idf;
                }
                t.idf = self.score_term(t, sc);
            }
            let mut hits: Vec<Hit> = sc
                .touched
                .iter()
                .map(|&d| {
                    let doc = self.docs[d as usize];
                    Hit {
                        file: doc.file as usize,
                        passage: doc.passage as usize,
                        score: sc.scores[d as usize],
                    }
                })
                .collect();
            for &d in sc.touched.iter() {
                sc.scores[d as usize] = 0.0;
            }
            sc.touched.clear();
            // Proximity re-ranks the best few: tokenising a passage again
            // costs more than its BM25 sum.
            let r = k.max(RERANK);
            if hits.len() > r {
                hits.select_nth_unstable_by(r - 1, by_score);
                hits.truncate(r);
            }
            if q.len() > 1 {
                for h in &mut hits {
                    h.score += PROXIMITY * self.proximity(h, &q);
                }
            }
            if q.len() > 1 {
                let focused = k.max(FOCUSED);
                if hits.len() > focused {
                    hits.select_nth_unstable_by(focused - 1, by_score);
                    hits.truncate(focused);
                }
                let weights = self.line_weights(query);
                for h in &mut hits {
                    if let Some((_, ls)) = self.passage_lines(h)
                        && let Some((w, _)) = self.best_unit(&ls, &weights)
                    {
                        h.score += FOCUS * w;
                    }
                }
            }
            if hits.len() > k {
                hits.select_nth_unstable_by(k - 1, by_score);
                hits.truncate(k);
            }
            hits.sort_by(by_score);
            hits
        })
    }

    /// Query term `t`'s ids in each field; `None` when it is in none.
    fn qterm(&self, t: &str) -> Option<QTerm> {
        let look = |s: &str| {
            self.vocab.get(s).filter(|&id| {
                self.postings
                    .get(id as usize)
                    .is_some_and(|l| !l.is_empty())
            })
        };
        let ids = [
            look(t),
            look(&field_term(HEADING, t)),
            look(&field_term(PATH, t)),
        ];
        ids.iter().any(Option::is_some).then(|| QTerm {
            text: t.to_string(),
            ids,
            idf: 0.0,
            weight: 1.0,
            cap: f32::INFINITY,
            of: None,
        })
    }

    /// Add term `t`'s BM25F part to every passage holding it in any field:
    /// its counts, each weighted and normalised by its field's length, are
    /// summed before BM25's saturation; a body shorter than
    /// [`MIN_LEN_SHARE`] of the average is normalised as if it had that
    /// much, so a near-empty passage (a heading and a line) does not
    /// outweigh a full one on its few words. Returns the term's idf (over
    /// the passages holding it in any field).
    fn score_term(&self, t: &QTerm, sc: &mut Scratch) -> f32 {
        let min_len = self.avg_len[BODY] * MIN_LEN_SHARE;
        for (field, id) in t.ids.iter().enumerate() {
            let Some(id) = id else { continue };
            let (w, b, avg) = (FIELD_WEIGHT[field], FIELD_B[field], self.avg_len[field]);
            for (doc, tf) in self.postings[*id as usize].iter() {
                let d = &self.docs[doc as usize];
                let len = match field {
                    BODY => (d.len as f32).max(min_len),
                    HEADING => f32::from(d.hlen),
                    _ => f32::from(d.plen),
                };
                let slot = &mut sc.tf[doc as usize];
                if *slot == 0.0 {
                    sc.term_docs.push(doc);
                }
                *slot += w * f32::from(tf) / (1.0 - b + b * len / avg).max(0.01);
            }
        }
        let n = self.live as f32;
        let df = sc.term_docs.len() as f32;
        let idf = idf(n, df);
        let w = t.weight * idf.min(t.cap);
        for &doc in &sc.term_docs {
            let tf = std::mem::take(&mut sc.tf[doc as usize]);
            let slot = &mut sc.scores[doc as usize];
            if *slot == 0.0 {
                sc.touched.push(doc);
            }
            *slot += w * tf * (K1 + 1.0) / (tf + K1);
        }
        sc.term_docs.clear();
        idf
    }

    /// How close the query's terms `q` stand in passage `h`'s body:
    /// over each pair of distinct terms found, the smaller idf over the
    /// square root of their least distance in terms (1 for neighbours),
    /// for pairs at most [`PROXIMITY_SPAN`] terms apart.
    fn proximity(&self, h: &Hit, q: &[QTerm]) -> f32 {
        let f = &self.files[h.file];
        let p = &f.passages[h.passage];
        let n = q.len();
        let mut last: Vec<Option<u32>> = vec![None; n];
        let mut least: Vec<u32> = vec![u32::MAX; n * n];
        let mut pos = 0u32;
        text::terms_where(
            &f.text[p.bytes.clone()],
            |w| q.iter().any(|t| text::could_stem_to(w, &t.text)),
            |t, stemmed| {
                if stemmed && let Some(i) = q.iter().position(|x| x.text == t) {
                    last[i] = Some(pos);
                    for (j, l) in last.iter().enumerate() {
                        if let Some(l) = l
                            && j != i
                        {
                            let slot = &mut least[i.min(j) * n + i.max(j)];
                            *slot = (*slot).min((pos - l).max(1));
                        }
                    }
                }
                pos += 1;
            },
        );
        let mut bonus = 0.0;
        for a in 0..n {
            for b in a + 1..n {
                let d = least[a * n + b];
                if d != u32::MAX && d <= PROXIMITY_SPAN {
                    bonus += q[a].idf.min(q[b].idf) / (d as f32).sqrt();
                }
            }
        }
        bonus
    }
}

/// A query term: its text, its ids in the body, heading and path fields,
/// and its idf (set once scored).
struct QTerm {
    text: String,
    ids: [Option<u32>; 3],
    idf: f32,
    /// Share of its BM25F part that counts: 1 for a word of the query,
    /// less for a related word ([`related`]).
    weight: f32,
    /// The most idf it scores with: a related word never weighs more than
    /// the query word it stands for.
    cap: f32,
    /// The query word a related word stands for.
    of: Option<String>,
}

/// Per-thread score accumulators, reused across queries: every entry is
/// back to zero and every list empty between queries.
#[derive(Default)]
struct Scratch {
    /// BM25F score per document so far.
    scores: Vec<f32>,
    /// Documents with a score.
    touched: Vec<u32>,
    /// The current term's weighted count per document, over its fields.
    tf: Vec<f32>,
    /// Documents holding the current term.
    term_docs: Vec<u32>,
}

/// BM25's inverse document frequency of a term in `df` of `n` passages.
fn idf(n: f32, df: f32) -> f32 {
    (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
}

/// Best first; on a tie, by file and passage.
fn by_score(a: &Hit, b: &Hit) -> std::cmp::Ordering {
    b.score
        .total_cmp(&a.score)
        .then(a.file.cmp(&b.file))
        .then(a.passage.cmp(&b.passage))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

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
                    rel: 0,
                    explicit: true,
                })
                .unwrap(),
            ));
        }
        (d, Index::build(loaded, Vocab::new(), 1))
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

    fn file(name: &str, body: &str) -> Arc<ContextFile> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body).unwrap();
        let f = load(&Found {
            path: p,
            display: name.into(),
            rel: 0,
            explicit: true,
        })
        .unwrap();
        Arc::new(f)
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
            .map(|i| file(&format!("f{i:02}.md"), &body(i, "alpha")))
            .collect();
        let mut idx = Index::build(files.clone(), vocab.clone(), 1);
        let mut compactions = 0;
        for round in 0..120usize {
            // Edit one file, drop one, add one (in the middle of the order).
            let i = round % files.len();
            let name = files[i].display.clone();
            files[i] = file(&name, &body(i, &format!("w{round}")));
            if round % 3 == 0 {
                files.remove((i + 7) % files.len());
                files.push(file(&format!("f{i:02}b{round}.md"), &body(i, "other")));
                files.sort_by(|a, b| a.display.cmp(&b.display));
            }
            let mut next = idx.update(files.clone(), 2);
            if next.wants_compaction() {
                // Every list that changed is this index's own; the rest
                // are shared with `idx`, which is still held: copied.
                let copied = next.compact();
                assert!(copied > 0 && copied < next.postings.len());
            }
            let fresh = Index::build(files.clone(), Vocab::new(), 1);
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
            if next.docs.len() < idx.docs.len() {
                compactions += 1;
                assert_eq!(next.docs.len(), next.live as usize, "no holes left");
            }
            idx = next;
        }
        assert!(compactions > 0, "holes never outnumbered documents");
        // Untouched: a term only in files that did not change shares its list.
        let a = Index::build(files.clone(), vocab.clone(), 1);
        let mut changed = files.clone();
        let name = changed[0].display.clone();
        changed[0] = file(&name, "# F0\nzzz\n");
        let b = a.update(changed, 1);
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

    /// Files of every shape: tiny, empty, headings only, fenced code,
    /// unicode, and big ones cut across several units of work.
    fn varied_corpus() -> Vec<Arc<ContextFile>> {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let words = [
            "cache", "claims", "claimed", "fifo", "über", "caché", "lease", "expiry", "2026",
            "the", "of", "server", "poller", "bridge", "sqlite", "frames", "hello", "x", "42",
        ];
        let mut files = Vec::new();
        for i in 0..60usize {
            let mut body = String::new();
            let size = match i % 6 {
                0 => 0,
                1 => 40,
                2 => 600,
                3 => 5_000,
                4 => 30_000,
                _ => 2_000,
            };
            let mut section = 0;
            while body.len() < size {
                match next() % 9 {
                    0 => {
                        section += 1;
                        body.push_str(&format!(
                            "\n{} Part {section}\n",
                            "#".repeat(1 + (next() % 3) as usize)
                        ));
                    }
                    1 => body.push_str("```\nlet x = 1;\n\nfifo();\n```\n"),
                    2 => body.push('\n'),
                    _ => {
                        for _ in 0..(3 + next() % 9) {
                            body.push_str(words[(next() % words.len() as u64) as usize]);
                            body.push(' ');
                        }
                        body.push_str(&format!("w{}\n", next() % 500));
                    }
                }
            }
            if i == 7 {
                body = "# Only a heading\n".into();
            }
            files.push(file(&format!("d{}/f{i:02}.md", i % 4), &body));
        }
        files.sort_by(|a, b| a.display.cmp(&b.display));
        files
    }

    #[test]
    fn a_compaction_of_an_index_held_alone_rewrites_its_lists_in_place() {
        let vocab = Vocab::new();
        let body = |i: usize, w: &str| format!("# F{i}\nshared text {w}\n\nmore {w} here\n");
        let mut files: Vec<_> = (0..20)
            .map(|i| file(&format!("f{i:02}.md"), &body(i, "alpha")))
            .collect();
        let mut idx = Index::build(files.clone(), vocab.clone(), 1);
        let mut round = 0;
        while !idx.wants_compaction() {
            let i = round % files.len();
            let name = files[i].display.clone();
            files[i] = file(&name, &body(i, &format!("w{round}")));
            // The old index is dropped here, as the engine's is once no
            // query holds it.
            idx = idx.update(files.clone(), 1);
            round += 1;
            assert!(round < 1_000, "holes never outnumbered documents");
        }
        let before: Vec<*const List> = idx.postings.iter().map(Arc::as_ptr).collect();
        assert_eq!(idx.compact(), 0, "nothing else holds a list: none copied");
        let after: Vec<*const List> = idx.postings.iter().map(Arc::as_ptr).collect();
        assert_eq!(before, after, "each list rewritten where it was");
        assert_eq!(idx.docs.len(), idx.live as usize, "no holes left");
        assert!(!idx.wants_compaction());
        let fresh = Index::build(files.clone(), Vocab::new(), 1);
        for q in [
            "shared text",
            "alpha",
            "more here",
            &format!("w{}", round - 1),
            "f3",
        ] {
            assert_eq!(hits(&idx, q), hits(&fresh, q), "query {q:?}");
        }
    }

    #[test]
    fn a_parallel_index_equals_the_sequential_one() {
        let files = varied_corpus();
        let queries = [
            "cache claims",
            "what did we decide about the fifo",
            "über caché",
            "w17 w230 lease",
            "sqlite bridge expiry 2026",
            "part 3",
            "let fifo",
            "42 x",
            "nothing-matches-this",
        ];
        // Small units, so one file spans several and units span files.
        let seq = Index::build_in(files.clone(), Vocab::new(), 1, 2_048);
        assert!(seq.passages() > 200, "{} passages", seq.passages());
        for threads in [2, 3, 8] {
            let par = Index::build_in(files.clone(), Vocab::new(), threads, 2_048);
            assert_eq!(par.docs, seq.docs, "{threads} threads");
            assert_eq!(par.postings, seq.postings, "{threads} threads");
            assert_eq!(par.toks, seq.toks, "{threads} threads");
            assert_eq!(
                (par.version(), par.passages(), par.total_len),
                (seq.version(), seq.passages(), seq.total_len)
            );
            for q in queries {
                assert_eq!(hits(&par, q), hits(&seq, q), "{threads} threads, {q:?}");
            }
        }
        // Cut differently (one unit, so term ids differ): the same answers.
        let whole = Index::build_in(files.clone(), Vocab::new(), 1, usize::MAX);
        for q in queries {
            assert_eq!(hits(&whole, q), hits(&seq, q), "{q:?}");
        }
        // An update done in parallel gives what a sequential build gives.
        let mut changed = files.clone();
        for i in (0..changed.len()).step_by(5) {
            let name = changed[i].display.clone();
            changed[i] = file(&name, &format!("# New {i}\ncache fifo w{i}\n"));
        }
        changed.remove(3);
        let updated = seq.update(changed.clone(), 4);
        let fresh = Index::build_in(changed, Vocab::new(), 1, 2_048);
        for q in queries {
            assert_eq!(hits(&updated, q), hits(&fresh, q), "{q:?}");
        }
    }

    #[test]
    fn term_ids_round_trip_through_their_compact_form() {
        let ids = [0, 1, 2, 127, 128, 129, 16_383, 16_384, 1 << 21, u32::MAX];
        let bytes = encode_ids(&ids);
        assert_eq!(decode_ids(&bytes).collect::<Vec<_>>(), ids);
        assert!(bytes.len() < ids.len() * 4);
        assert_eq!(decode_ids(&encode_ids(&[])).count(), 0);
    }

    #[test]
    fn a_near_empty_passage_does_not_outrank_a_full_one() {
        let filler = "alpha beta gamma delta epsilon zeta\n".repeat(6);
        let mut body = format!(
            "# Notes\nCache eviction.\n# Policy\nThe cache eviction policy drops the oldest cache entry; the cache eviction runs hourly.\n{filler}"
        );
        for i in 0..4 {
            body.push_str(&format!("# Other {i}\n{filler}omega\n"));
        }
        let (_d, idx) = index_of(&[("notes.md", &body)]);
        let hits = idx.search("cache eviction", 2);
        // Two words once in a heading and a line lose to a full passage
        // that says them three and two times.
        assert_eq!(hits[0].passage, 1, "{hits:?}");
        assert_eq!(hits[1].passage, 0, "{hits:?}");
    }

    /// Sub-word tokens survive the stemmer: joined words are found by
    /// their parts, on both sides of the index.
    #[test]
    fn joined_words_are_found_by_their_parts() {
        let filler = "alpha beta gamma delta\n".repeat(3);
        let (_d, idx) = index_of(&[(
            "notes.md",
            &format!(
                "# One\nThe CacheDegradation event fires.\n{filler}\n# Two\nLog in with OAuth2 tokens.\n{filler}\n# Three\nOpen the WebUI page.\n{filler}\n# Four\nA cache of tokens; a page.\n{filler}"
            ),
        )]);
        for (q, want) in [("cache degradation", 0), ("oauth", 1), ("web UI", 2)] {
            let hits = idx.search(q, 3);
            assert_eq!(
                hits.first().map(|h| h.passage),
                Some(want),
                "{q:?}: {hits:?}"
            );
        }
    }

    #[test]
    fn query_words_side_by_side_outrank_the_same_words_apart() {
        let filler = "alpha beta gamma delta epsilon zeta eta theta\n".repeat(3);
        let (_d, idx) = index_of(&[(
            "notes.md",
            &format!(
                "# Apart\nThe lease is long.\n{filler}Each claim is short.\n\n# Close\nThe claim lease is short.\n{filler}Nothing more is said.\n\n# Other\n{filler}omega\n"
            ),
        )]);
        // Same words, same counts, same lengths: BM25 alone ties them and
        // the first would win; proximity puts the close pair first.
        let hits = idx.search("claim lease", 2);
        assert_eq!(hits[0].passage, 1, "{hits:?}");
        assert_eq!(hits[1].passage, 0, "{hits:?}");
        assert!(hits[0].score > hits[1].score, "{hits:?}");
    }

    #[test]
    fn query_words_in_one_sentence_outrank_the_same_words_in_two() {
        let filler = "alpha beta gamma delta epsilon zeta eta theta\n";
        let (_d, idx) = index_of(&[(
            "notes.md",
            &format!(
                "# Apart\nThe lease is long.\n{filler}Each claim is short.\n\n# Together\nThe lease is long\n{filler}and each claim is short.\n\n# Other\n{filler}omega\n"
            ),
        )]);
        // Same terms, same counts, further apart than proximity's span in
        // both: BM25 and proximity tie them and the first would win; the
        // second's one sentence holds both words.
        let hits = idx.search("claim lease", 2);
        assert_eq!(hits[0].passage, 1, "{hits:?}");
        assert_eq!(hits[1].passage, 0, "{hits:?}");
        assert!(hits[0].score > hits[1].score, "{hits:?}");
    }

    #[test]
    fn file_path_words_pick_the_file_the_question_names() {
        let same = "# Minimum supported version\nThe minimum supported rustc version is 1.60.\n";
        let (_d, idx) = index_of(&[("alpha.md", same), ("zeta.md", same)]);
        // The same passage in two files: the one whose path says "zeta".
        let hits = idx.search("What is zeta's minimum supported rustc version?", 2);
        assert_eq!(idx.files()[hits[0].file].display, "zeta.md", "{hits:?}");
        let hits = idx.search("What is alpha's minimum supported rustc version?", 2);
        assert_eq!(idx.files()[hits[0].file].display, "alpha.md", "{hits:?}");
        // A path word alone finds the file's passages.
        let hits = idx.search("zeta", 2);
        assert_eq!(hits.len(), 1, "{hits:?}");
    }

    #[test]
    fn query_words_further_apart_than_the_span_add_no_proximity() {
        let filler = "alpha beta gamma delta epsilon zeta eta theta\n".repeat(3);
        let (_d, idx) = index_of(&[(
            "notes.md",
            &format!(
                "# Near\nThe claim and the lease.\n{filler}\n# Far\nThe claim, alpha beta gamma delta epsilon zeta, the lease.\n{filler}\n# Other\n{filler}omega\n"
            ),
        )]);
        let near = idx.search("claim lease", 3);
        let alone = idx.search("claim", 3);
        let score = |hits: &[Hit], p: usize| hits.iter().find(|h| h.passage == p).unwrap().score;
        // Side by side: a bonus. Seven apart (past the span): none, the
        // passage scores its BM25 sum and its best sentence's part only
        // ([`FOCUS`]; a one-word query has neither).
        let lease = idx.search("lease", 3);
        let bm25_far = score(&alone, 1) + score(&lease, 1);
        let far = Hit {
            file: 0,
            passage: 1,
            score: 0.0,
        };
        let (_, ls) = idx.passage_lines(&far).unwrap();
        let (focus, _) = idx
            .best_unit(&ls, &idx.line_weights("claim lease"))
            .unwrap();
        assert!(
            (score(&near, 1) - bm25_far - FOCUS * focus).abs() < 1e-4,
            "{near:?}"
        );
        assert!(
            score(&near, 0) > score(&alone, 0) + score(&lease, 0) + 0.1,
            "{near:?}"
        );
    }

    #[test]
    fn a_related_word_finds_a_reworded_answer_below_the_exact_word() {
        let filler = "alpha beta gamma delta epsilon zeta eta theta\n".repeat(3);
        let (_d, idx) = index_of(&[(
            "notes.md",
            &format!(
                "# One\nThe key forbids a second row.\n{filler}\n# Two\nNothing here prevents it.\n{filler}\n# Three\n{filler}omega\n"
            ),
        )]);
        // "prevented" is in passage 1 itself and, as "forbids", in passage
        // 0: the exact word ranks first, the related word still finds 0.
        let hits = idx.search("what is prevented", 3);
        assert_eq!(hits.len(), 2, "{hits:?}");
        assert_eq!(hits[0].passage, 1, "{hits:?}");
        assert_eq!(hits[1].passage, 0, "{hits:?}");
        // A word the corpus lacks still brings its related words.
        let hits = idx.search("what is prohibited", 3);
        assert_eq!(hits.len(), 2, "{hits:?}");
        // Its related word scores at most RELATED_WEIGHT of the word asked
        // (same idf, cap) in the same passage.
        let exact = idx.search("forbids", 3);
        let via = idx.search("prevents", 3);
        let s0 = |h: &[Hit]| h.iter().find(|x| x.passage == 0).unwrap().score;
        assert!(
            s0(&via) <= RELATED_WEIGHT * s0(&exact) + 1e-5,
            "{via:?} {exact:?}"
        );
    }

    #[test]
    fn heading_words_are_their_own_field() {
        let filler = "alpha beta gamma delta epsilon zeta eta theta\n".repeat(3);
        let (_d, idx) = index_of(&[(
            "notes.md",
            &format!(
                "# Leases\nHow long a claim is held.\n{filler}\n# Other\nThe word leases once in a long body.\n{filler}{filler}\n"
            ),
        )]);
        // "leases" once in each: in a short heading it weighs more than
        // once in a long body.
        let hits = idx.search("leases", 2);
        assert_eq!(hits[0].passage, 0, "{hits:?}");
        assert_eq!(hits.len(), 2, "{hits:?}");
        // Heading terms are marked, so a body word is not a heading word.
        assert!(idx.vocab.get("leas").is_some());
        assert!(idx.vocab.get("\u{1}leas").is_some());
        assert!(idx.vocab.get("\u{2}note").is_some());
    }

    /// The cached stems give each passage the terms `text::terms` gives,
    /// in every field, whatever the thread saw before.
    #[test]
    fn cached_stems_give_the_terms_of_the_plain_tokeniser() {
        let files = varied_corpus();
        let refs: Vec<&ContextFile> = files.iter().map(|f| f.as_ref()).collect();
        let mut starts = vec![0usize];
        for f in &refs {
            starts.push(starts.last().unwrap() + f.passages.len());
        }
        let all = *starts.last().unwrap();
        // Twice on this thread: the second pass reads the cache only.
        for _ in 0..2 {
            let mut unit = tokenize_unit(&refs, &starts, 0..all);
            let mut lists = vec![List::default(); unit.words.len()];
            let mut fi = 0;
            assert_eq!(unit.ends.len(), all);
            for (i, lens) in unit.lens.iter().enumerate() {
                let from = i.checked_sub(1).map_or(0, |p| unit.ends[p] as usize);
                let counts = &unit.entries[from..unit.ends[i] as usize];
                while starts[fi + 1] <= i {
                    fi += 1;
                }
                let f = refs[fi];
                let p = &f.passages[i - starts[fi]];
                let mut want: BTreeMap<String, u16> = BTreeMap::new();
                let mut n = [0u32; 3];
                text::terms(&f.text[p.bytes.clone()], |t| {
                    *want.entry(t.to_string()).or_default() += 1;
                    n[BODY] += 1;
                });
                text::terms(&p.heading, |t| {
                    *want.entry(field_term(HEADING, t)).or_default() += 1;
                    n[HEADING] += 1;
                });
                text::terms(&f.display, |t| {
                    *want.entry(field_term(PATH, t)).or_default() += 1;
                    n[PATH] += 1;
                });
                let got: BTreeMap<String, u16> = counts
                    .iter()
                    .map(|&(id, c)| (unit.words.str(id).to_string(), c))
                    .collect();
                assert_eq!(got, want, "passage {i}");
                assert_eq!(*lens, (n[BODY], n[HEADING] as u16, n[PATH] as u16));
                for &(l, c) in counts {
                    lists[l as usize].push(7 + i as u32, c);
                }
            }
            // Grouped into runs per term, they make the same lists.
            unit.group(7);
            for (l, want) in lists.iter().enumerate() {
                let mut got = List::default();
                got.append_run(&unit.runs, l);
                assert_eq!(&got, want, "term {:?}", unit.words.str(l as u32));
            }
        }
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
