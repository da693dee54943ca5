//! The quality bench's reference: a plain BM25 (k1 = 1.2, b = 0.75, Lucene's
//! idf) over fixed 12-line windows of each file, words lower-cased, English
//! stop words dropped and Porter's stemmer applied. Written here, apart from
//! the engine, so the engine's ranking is judged against a textbook one that
//! no engine change moves (the reference was bm25s with Snowball
//! stemming over 12-line windows; Snowball's English stemmer is Porter's,
//! revised).

use std::collections::HashMap;

/// BM25's term-frequency saturation.
const K1: f32 = 1.2;
/// BM25's length normalisation.
const B: f32 = 0.75;
/// Lines per window.
pub const WINDOW: usize = 12;

/// English stop words (NLTK's list without the contractions), sorted.
const STOP: &[&str] = &[
    "a",
    "about",
    "above",
    "after",
    "again",
    "against",
    "all",
    "am",
    "an",
    "and",
    "any",
    "are",
    "as",
    "at",
    "be",
    "because",
    "been",
    "before",
    "being",
    "below",
    "between",
    "both",
    "but",
    "by",
    "can",
    "did",
    "do",
    "does",
    "doing",
    "don",
    "down",
    "during",
    "each",
    "few",
    "for",
    "from",
    "further",
    "had",
    "has",
    "have",
    "having",
    "he",
    "her",
    "here",
    "hers",
    "herself",
    "him",
    "himself",
    "his",
    "how",
    "i",
    "if",
    "in",
    "into",
    "is",
    "it",
    "its",
    "itself",
    "just",
    "me",
    "more",
    "most",
    "my",
    "myself",
    "no",
    "nor",
    "not",
    "now",
    "of",
    "off",
    "on",
    "once",
    "only",
    "or",
    "other",
    "our",
    "ours",
    "ourselves",
    "out",
    "over",
    "own",
    "s",
    "same",
    "she",
    "should",
    "so",
    "some",
    "such",
    "t",
    "than",
    "that",
    "the",
    "their",
    "theirs",
    "them",
    "themselves",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "through",
    "to",
    "too",
    "under",
    "until",
    "up",
    "very",
    "was",
    "we",
    "were",
    "what",
    "when",
    "where",
    "which",
    "while",
    "who",
    "whom",
    "why",
    "will",
    "with",
    "you",
    "your",
    "yours",
    "yourself",
    "yourselves",
];

/// The index terms of `text`, in order.
pub fn terms(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| STOP.binary_search(&w.as_str()).is_err())
        .map(|w| porter(&w))
        .collect()
}

/// One window: a file (by index) and its line range, 1-based, inclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Index into the files given to [`Bm25::build`].
    pub file: usize,
    /// First line.
    pub start: u32,
    /// Last line.
    pub end: u32,
}

/// The baseline index.
#[derive(Debug)]
pub struct Bm25 {
    windows: Vec<Window>,
    lens: Vec<f32>,
    avg_len: f32,
    vocab: HashMap<String, usize>,
    postings: Vec<Vec<(u32, u32)>>,
}

impl Bm25 {
    /// Index the texts of `files`, each cut into [`WINDOW`]-line windows.
    pub fn build(files: &[&str]) -> Bm25 {
        let mut idx = Bm25 {
            windows: Vec::new(),
            lens: Vec::new(),
            avg_len: 0.0,
            vocab: HashMap::new(),
            postings: Vec::new(),
        };
        for (f, text) in files.iter().enumerate() {
            let lines: Vec<&str> = text.lines().collect();
            for (w, chunk) in lines.chunks(WINDOW).enumerate() {
                let doc = idx.windows.len() as u32;
                let start = (w * WINDOW) as u32 + 1;
                idx.windows.push(Window {
                    file: f,
                    start,
                    end: start + chunk.len() as u32 - 1,
                });
                let mut tf: HashMap<usize, u32> = HashMap::new();
                let mut len = 0usize;
                for line in chunk {
                    for t in terms(line) {
                        len += 1;
                        let next = idx.vocab.len();
                        let id = *idx.vocab.entry(t).or_insert(next);
                        if id == idx.postings.len() {
                            idx.postings.push(Vec::new());
                        }
                        *tf.entry(id).or_insert(0) += 1;
                    }
                }
                let mut tf: Vec<(usize, u32)> = tf.into_iter().collect();
                tf.sort_unstable();
                for (id, n) in tf {
                    idx.postings[id].push((doc, n));
                }
                idx.lens.push(len as f32);
            }
        }
        let n = idx.lens.len().max(1) as f32;
        idx.avg_len = (idx.lens.iter().sum::<f32>() / n).max(1.0);
        idx
    }

    /// Number of windows.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// True when nothing was indexed.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// The best `k` windows for `query`, best first (ties: earlier window
    /// first). `scores` is a buffer reused across queries.
    pub fn search(&self, query: &str, k: usize, scores: &mut Vec<f32>) -> Vec<&Window> {
        scores.clear();
        scores.resize(self.windows.len(), 0.0);
        let mut q = terms(query);
        q.sort_unstable();
        q.dedup();
        let n = self.windows.len() as f32;
        let mut touched: Vec<u32> = Vec::new();
        for t in &q {
            let Some(&id) = self.vocab.get(t) else {
                continue;
            };
            let list = &self.postings[id];
            let df = list.len() as f32;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            for &(doc, tf) in list {
                let tf = tf as f32;
                let norm = K1 * (1.0 - B + B * self.lens[doc as usize] / self.avg_len);
                let s = &mut scores[doc as usize];
                if *s == 0.0 {
                    touched.push(doc);
                }
                *s += idf * tf * (K1 + 1.0) / (tf + norm);
            }
        }
        touched.sort_unstable_by(|a, b| {
            scores[*b as usize]
                .total_cmp(&scores[*a as usize])
                .then(a.cmp(b))
        });
        touched
            .into_iter()
            .take(k)
            .map(|d| &self.windows[d as usize])
            .collect()
    }
}

/// Porter's stemmer (M. F. Porter, "An algorithm for suffix stripping",
/// 1980), for lower-case ASCII words; other words are returned unchanged.
pub fn porter(word: &str) -> String {
    if word.len() <= 2 || !word.bytes().all(|b| b.is_ascii_lowercase()) {
        return word.to_string();
    }
    let mut w = Stem(word.as_bytes().to_vec());
    w.step1ab();
    w.step1c();
    w.step2();
    w.step3();
    w.step4();
    w.step5();
    String::from_utf8(w.0).unwrap_or_else(|_| word.to_string())
}

struct Stem(Vec<u8>);

impl Stem {
    fn cons(&self, i: usize) -> bool {
        match self.0[i] {
            b'a' | b'e' | b'i' | b'o' | b'u' => false,
            b'y' => i == 0 || !self.cons(i - 1),
            _ => true,
        }
    }

    /// Porter's m: the number of vowel-consonant sequences in the first `j` letters.
    fn measure(&self, j: usize) -> usize {
        let mut i = 0;
        while i < j && self.cons(i) {
            i += 1;
        }
        let mut m = 0;
        loop {
            while i < j && !self.cons(i) {
                i += 1;
            }
            if i >= j {
                return m;
            }
            while i < j && self.cons(i) {
                i += 1;
            }
            m += 1;
        }
    }

    fn has_vowel(&self, j: usize) -> bool {
        (0..j).any(|i| !self.cons(i))
    }

    fn double_cons(&self, j: usize) -> bool {
        j >= 2 && self.0[j - 1] == self.0[j - 2] && self.cons(j - 1)
    }

    /// Consonant-vowel-consonant ending at `j`, the last not w, x or y.
    fn cvc(&self, j: usize) -> bool {
        j >= 3
            && self.cons(j - 3)
            && !self.cons(j - 2)
            && self.cons(j - 1)
            && !matches!(self.0[j - 1], b'w' | b'x' | b'y')
    }

    fn ends(&self, s: &str) -> bool {
        self.0.ends_with(s.as_bytes())
    }

    fn set(&mut self, suffix_len: usize, with: &str) {
        let n = self.0.len() - suffix_len;
        self.0.truncate(n);
        self.0.extend_from_slice(with.as_bytes());
    }

    fn step1ab(&mut self) {
        if self.ends("sses") || self.ends("ies") {
            self.set(2, "");
        } else if self.ends("s") && !self.ends("ss") {
            self.set(1, "");
        }
        let n = self.0.len();
        if self.ends("eed") {
            if self.measure(n - 3) > 0 {
                self.set(1, "");
            }
            return;
        }
        let cut = if self.ends("ed") && self.has_vowel(n - 2) {
            2
        } else if self.ends("ing") && self.has_vowel(n - 3) {
            3
        } else {
            return;
        };
        self.set(cut, "");
        let n = self.0.len();
        if self.ends("at") || self.ends("bl") || self.ends("iz") {
            self.set(0, "e");
        } else if self.double_cons(n) && !matches!(self.0[n - 1], b'l' | b's' | b'z') {
            self.set(1, "");
        } else if self.measure(n) == 1 && self.cvc(n) {
            self.set(0, "e");
        }
    }

    fn step1c(&mut self) {
        let n = self.0.len();
        if self.ends("y") && self.has_vowel(n - 1) {
            self.set(1, "i");
        }
    }

    /// Replace the first of `rules` whose suffix ends the word, when the
    /// stem before it has a measure above `min_m`.
    fn rule(&mut self, rules: &[(&str, &str)], min_m: usize) {
        if let Some((from, to)) = rules.iter().find(|(from, _)| self.ends(from)) {
            let stem = self.0.len() - from.len();
            if self.measure(stem) > min_m {
                self.set(from.len(), to);
            }
        }
    }

    fn step2(&mut self) {
        self.rule(
            &[
                ("ational", "ate"),
                ("tional", "tion"),
                ("enci", "ence"),
                ("anci", "ance"),
                ("izer", "ize"),
                ("abli", "able"),
                ("alli", "al"),
                ("entli", "ent"),
                ("eli", "e"),
                ("ousli", "ous"),
                ("ization", "ize"),
                ("ation", "ate"),
                ("ator", "ate"),
                ("alism", "al"),
                ("iveness", "ive"),
                ("fulness", "ful"),
                ("ousness", "ous"),
                ("aliti", "al"),
                ("iviti", "ive"),
                ("biliti", "ble"),
            ],
            0,
        );
    }

    fn step3(&mut self) {
        self.rule(
            &[
                ("icate", "ic"),
                ("ative", ""),
                ("alize", "al"),
                ("iciti", "ic"),
                ("ical", "ic"),
                ("ful", ""),
                ("ness", ""),
            ],
            0,
        );
    }

    fn step4(&mut self) {
        const SUFFIXES: &[&str] = &[
            "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion",
            "ou", "ism", "ate", "iti", "ous", "ive", "ize",
        ];
        // The longest suffix that ends the word decides (ement before ment before ent).
        let Some(s) = SUFFIXES
            .iter()
            .filter(|s| self.ends(s))
            .max_by_key(|s| s.len())
        else {
            return;
        };
        let stem = self.0.len() - s.len();
        if *s == "ion" && !(stem > 0 && matches!(self.0[stem - 1], b's' | b't')) {
            return;
        }
        if self.measure(stem) > 1 {
            self.set(s.len(), "");
        }
    }

    fn step5(&mut self) {
        let n = self.0.len();
        if self.ends("e") {
            let m = self.measure(n - 1);
            if m > 1 || (m == 1 && !self.cvc(n - 1)) {
                self.set(1, "");
            }
        }
        let n = self.0.len();
        if self.ends("l") && self.double_cons(n) && self.measure(n) > 1 {
            self.set(1, "");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn porter_stems_as_the_paper_says() {
        for (word, stem) in [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("cats", "cat"),
            ("feed", "feed"),
            ("agreed", "agre"),
            ("plastered", "plaster"),
            ("motoring", "motor"),
            ("sing", "sing"),
            ("conflated", "conflat"),
            ("hopping", "hop"),
            ("falling", "fall"),
            ("filing", "file"),
            ("happy", "happi"),
            ("relational", "relat"),
            ("conditional", "condit"),
            ("rational", "ration"),
            ("digitizer", "digit"),
            ("hopefulness", "hope"),
            ("triplicate", "triplic"),
            ("formalize", "formal"),
            ("electrical", "electr"),
            ("revival", "reviv"),
            ("allowance", "allow"),
            ("adjustment", "adjust"),
            ("adoption", "adopt"),
            ("controll", "control"),
            ("retention", "retent"),
            ("retain", "retain"),
            ("generalizations", "gener"),
            ("oscillators", "oscil"),
        ] {
            assert_eq!(porter(word), stem, "{word}");
        }
        assert_eq!(porter("Überall"), "Überall");
        assert_eq!(porter("x86"), "x86");
    }

    #[test]
    fn windows_are_twelve_lines_and_rank_the_matching_one_first() {
        let mut a: String = (1..=30).map(|i| format!("filler line {i}\n")).collect();
        a = a.replace(
            "filler line 17\n",
            "the lease expires after thirty seconds\n",
        );
        let b = "nothing about leases here\nfiller\n";
        let idx = Bm25::build(&[&a, b]);
        assert_eq!(idx.len(), 4);
        let mut buf = Vec::new();
        let hits = idx.search("When do leases expire?", 3, &mut buf);
        assert_eq!(
            hits[0],
            &Window {
                file: 0,
                start: 13,
                end: 24
            }
        );
        assert_eq!(hits[1].file, 1, "{hits:?}");
        assert!(idx.search("zebra", 3, &mut buf).is_empty());
        // The last window is as long as what is left.
        assert_eq!(idx.search("line 30", 1, &mut buf)[0].end, 30);
    }
}
