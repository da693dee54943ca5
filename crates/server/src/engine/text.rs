//! Text analysis shared by indexing and querying: words, lower-cased,
//! stop words dropped, and stemmed with the Snowball English stemmer
//! (Porter2, from the `rust-stemmers` crate) so "claims", "claimed" and
//! "claiming" meet "claim", "restoring" meets "restoration".

/// Common English words that carry no meaning for retrieval.
const STOP: &[&str] = &[
    "a", "about", "above", "after", "again", "all", "also", "am", "an", "and", "any", "are", "as",
    "at", "be", "because", "been", "before", "being", "between", "both", "but", "by", "can",
    "could", "did", "do", "does", "doing", "done", "down", "during", "each", "few", "for", "from",
    "further", "had", "has", "have", "having", "he", "her", "here", "hers", "him", "his", "how",
    "i", "if", "in", "into", "is", "it", "its", "itself", "just", "me", "more", "most", "my", "no",
    "nor", "not", "now", "of", "off", "on", "once", "or", "other", "our", "ours", "over", "own",
    "same", "she", "should", "so", "some", "such", "than", "that", "the", "their", "theirs",
    "them", "then", "there", "these", "they", "this", "those", "through", "to", "too", "under",
    "until", "up", "very", "was", "we", "were", "what", "when", "where", "which", "while", "who",
    "whom", "why", "will", "with", "would", "you", "your", "yours",
];

/// Where each first letter's words start in [`STOP`] (`b'a'..=b'z'`, and
/// one past the end), so a look-up compares a handful of words at most.
const STOP_FROM: [u8; 27] = stop_from();

const fn stop_from() -> [u8; 27] {
    let mut out = [0u8; 27];
    let mut letter = 0;
    while letter < 27 {
        let mut i = 0;
        while i < STOP.len() && (STOP[i].as_bytes()[0] as usize) < b'a' as usize + letter {
            i += 1;
        }
        out[letter] = i as u8;
        letter += 1;
    }
    out
}

/// The longest stop word, in bytes.
const STOP_MAX: usize = 7;

fn is_stop(w: &str) -> bool {
    let b = w.as_bytes();
    if b.is_empty() || b.len() > STOP_MAX || !b[0].is_ascii_lowercase() {
        return false;
    }
    let l = usize::from(b[0] - b'a');
    STOP[usize::from(STOP_FROM[l])..usize::from(STOP_FROM[l + 1])].contains(&w)
}

/// The Snowball English stemmer (Porter2), made once.
fn snowball() -> &'static rust_stemmers::Stemmer {
    static S: std::sync::OnceLock<rust_stemmers::Stemmer> = std::sync::OnceLock::new();
    S.get_or_init(|| rust_stemmers::Stemmer::create(rust_stemmers::Algorithm::English))
}

/// Stem `w` (a word as [`terms_where`] gives it unstemmed) in place with
/// the Snowball English stemmer, as [`terms`] would.
pub fn stem(w: &mut String) {
    if let std::borrow::Cow::Owned(s) = snowball().stem(w) {
        *w = s;
    }
}

/// Longest word kept, in bytes (a longer one is cut here).
const MAX_WORD: usize = 64;

/// Where a word changes inside: `cacheDegradation`, `OAuth|2`, `Web|UI`.
/// Byte offsets into the lower-cased word, ascending; ASCII letters and
/// digits only.
#[derive(Default)]
struct Cuts {
    at: Vec<u8>,
}

/// The kind of an ASCII letter or digit, for [`Cuts`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Lower,
    Upper,
    Digit,
    Other,
}

fn kind(b: u8) -> Kind {
    if b.is_ascii_lowercase() {
        Kind::Lower
    } else if b.is_ascii_uppercase() {
        Kind::Upper
    } else if b.is_ascii_digit() {
        Kind::Digit
    } else {
        Kind::Other
    }
}

/// Call `f` with each word of `text` (runs of letters and digits,
/// lower-cased, cut at [`MAX_WORD`] bytes) and the places it changes case
/// or turns from letters to digits. ASCII takes a byte-at-a-time path; the
/// word buffer is reused, so no word allocates.
fn words(text: &str, mut f: impl FnMut(&mut String, &[u8])) {
    let mut word = String::with_capacity(MAX_WORD + 4);
    let mut cuts = Cuts::default();
    // The last two ASCII kinds seen in this word.
    let (mut prev, mut prev2) = (Kind::Other, Kind::Other);
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b < 0x80 {
            i += 1;
            if b.is_ascii_alphanumeric() {
                if word.len() < MAX_WORD {
                    let k = kind(b);
                    let at = word.len() as u8;
                    let cut = match (prev2, prev, k) {
                        (_, Kind::Lower, Kind::Upper) => Some(at),
                        (_, Kind::Lower | Kind::Upper, Kind::Digit) => Some(at),
                        (_, Kind::Digit, Kind::Lower | Kind::Upper) => Some(at),
                        // `OAuth`, `UIKit`: the last capital starts a word.
                        (Kind::Upper, Kind::Upper, Kind::Lower) => Some(at - 1),
                        _ => None,
                    };
                    if let Some(c) = cut
                        && c > 0
                        && cuts.at.last() != Some(&c)
                    {
                        cuts.at.push(c);
                    }
                    (prev2, prev) = (prev, k);
                    word.push(char::from(b.to_ascii_lowercase()));
                }
            } else if !word.is_empty() {
                f(&mut word, &cuts.at);
                word.clear();
                cuts.at.clear();
                (prev2, prev) = (Kind::Other, Kind::Other);
            }
        } else {
            let c = text[i..]
                .chars()
                .next()
                .unwrap_or(char::REPLACEMENT_CHARACTER);
            i += c.len_utf8();
            if c.is_alphanumeric() {
                if word.len() < MAX_WORD {
                    word.extend(c.to_lowercase());
                    (prev2, prev) = (prev, Kind::Other);
                }
            } else if !word.is_empty() {
                f(&mut word, &cuts.at);
                word.clear();
                cuts.at.clear();
                (prev2, prev) = (Kind::Other, Kind::Other);
            }
        }
    }
    if !word.is_empty() {
        f(&mut word, &cuts.at);
    }
}

/// Hand `word` to `f` unless it is a stop word or too short: stemmed, with
/// `true`, when `may_match` says it may be wanted, else as it is, with
/// `false` (stemming is most of a word's cost).
fn emit(
    word: &mut String,
    may_match: &mut impl FnMut(&str) -> bool,
    f: &mut impl FnMut(&str, bool),
) {
    let keep = word.len() >= 2 || word.bytes().all(|c| c.is_ascii_digit());
    if keep && !is_stop(word) {
        if may_match(word) {
            stem(word);
            f(word, true);
        } else {
            f(word, false);
        }
    }
}

/// Call `f` with each index term of `text`: each word, lower-cased, stop
/// words dropped, stemmed; a joined word (`CacheDegradation`, `OAuth2`,
/// `WebUI`) also gives its parts (`cache`, `degradation`; `oauth`, `auth`,
/// `2`; `web`, `ui`), after the whole word.
pub fn terms(text: &str, mut f: impl FnMut(&str)) {
    terms_where(text, |_| true, |t, _| f(t));
}

/// [`terms`], but a word is stemmed only when `may_match` (given the word
/// lower-cased, unstemmed) says so; `f` gets every term in order, with
/// `false` and the unstemmed word for the others, so term positions are
/// those of [`terms`]. [`could_stem_to`] makes a `may_match` that skips
/// the words that cannot stem to a given term.
pub fn terms_where(
    text: &str,
    mut may_match: impl FnMut(&str) -> bool,
    mut f: impl FnMut(&str, bool),
) {
    let mut part = String::with_capacity(MAX_WORD + 4);
    words(text, |word, cuts| {
        if cuts.is_empty() {
            emit(word, &mut may_match, &mut f);
            return;
        }
        let whole = std::mem::take(word);
        *word = whole.clone();
        emit(word, &mut may_match, &mut f);
        let mut from = 0usize;
        for &c in cuts.iter().chain(std::iter::once(&(whole.len() as u8))) {
            let c = usize::from(c);
            part.clear();
            part.push_str(&whole[from..c]);
            emit(&mut part, &mut may_match, &mut f);
            from = c;
        }
        // Letters before a number, as one word: `OAuth2` -> `oauth`.
        let letters = whole.trim_end_matches(|c: char| c.is_ascii_digit());
        if letters.len() < whole.len() && letters.len() > cuts[0] as usize {
            part.clear();
            part.push_str(letters);
            emit(&mut part, &mut may_match, &mut f);
        }
    });
}

/// Whether `word` (lower-cased, unstemmed) may stem to `stem`: Snowball
/// keeps a word's start and changes at most its last letter of the stem
/// (`queries` -> `queri`), but for a few irregular words (`dying` -> `die`),
/// which this lets pass unstemmed.
pub fn could_stem_to(word: &str, stem: &str) -> bool {
    let keep = stem.len().saturating_sub(1);
    match stem.get(..keep) {
        Some(head) => word.starts_with(head),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(s: &str) -> Vec<String> {
        let mut v = Vec::new();
        terms(s, |t| v.push(t.to_string()));
        v
    }

    #[test]
    fn stop_list_is_sorted_for_binary_search() {
        let mut sorted = STOP.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, STOP);
    }

    #[test]
    fn inflections_meet() {
        assert_eq!(all("claims claimed claiming claim"), vec!["claim"; 4]);
        assert_eq!(all("queries query"), vec!["queri", "queri"]);
        assert_eq!(all("decide decided"), vec!["decid", "decid"]);
        assert_eq!(all("process"), vec!["process"]);
    }

    /// The word forms issue 14 named (Snowball joins them; the suffix
    /// rules it replaced did not). "retain"/"retention" stay apart in
    /// Porter2 too.
    #[test]
    fn snowball_joins_derived_forms() {
        let one = |s: &str| {
            let v = all(s);
            assert!(v.windows(2).all(|w| w[0] == w[1]), "{s:?} -> {v:?}");
        };
        one("restoring restoration restore restored");
        one("ingested ingestion ingest ingesting");
        one("prevented preventing prevention");
        one("degradation degraded degrade");
        assert_ne!(all("retain"), all("retention"));
    }

    #[test]
    fn drops_stop_words_and_punctuation_keeps_numbers() {
        assert_eq!(
            all("What did we decide about the FIFO, in 2 days?"),
            vec!["decid", "fifo", "2", "day"]
        );
        assert_eq!(all("autopoll_claims"), vec!["autopol", "claim"]);
        // Words that carry meaning in docs are not stop words.
        assert_eq!(
            all("only the rows below, out of order"),
            vec!["onli", "row", "below", "out", "order"]
        );
        assert!(all("").is_empty());
    }

    #[test]
    fn stop_buckets_cover_the_list() {
        assert_eq!(usize::from(STOP_FROM[26]), STOP.len());
        assert!(STOP.iter().all(|w| w.len() <= STOP_MAX && is_stop(w)));
        assert!(!is_stop("ab") && !is_stop("zebra") && !is_stop("") && !is_stop("Über"));
    }

    /// The tokeniser as it was (a char at a time, a binary search per
    /// word): the fast path must cut and lower-case words the same.
    fn reference_words(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut word = String::new();
        for c in text.chars().chain(std::iter::once(' ')) {
            if c.is_alphanumeric() {
                if word.len() < 64 {
                    word.extend(c.to_lowercase());
                }
            } else if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
        }
        out
    }

    #[test]
    fn the_fast_word_scanner_equals_the_reference() {
        let long = "x".repeat(70) + "Ü" + &"y".repeat(3) + " " + &"é".repeat(40);
        let texts = [
            "What did we decide about the FIFO, in 2 days?",
            "Über Caché İstanbul ǅemal ΣΊΣΥΦΟΣ naïve-café 東京 x\u{301}y",
            "CacheDegradation OAuth2 WebUI v1.2.3 sha256 x86_64 a_b-c",
            long.as_str(),
            "",
            "  \t\r\n--- *** ```rust\nlet x = 1;``` ",
        ];
        for t in texts {
            let mut got = Vec::new();
            words(t, |w, _| got.push(w.clone()));
            assert_eq!(got, reference_words(t), "{t:?}");
            // Without joined words, the terms are the words, stop words
            // dropped, stemmed: as before.
            let mut joined = 0;
            words(t, |_, cuts| joined += usize::from(!cuts.is_empty()));
            if joined == 0 {
                let mut plain = Vec::new();
                for mut w in reference_words(t) {
                    let keep = w.len() >= 2 || w.chars().all(|c| c.is_ascii_digit());
                    if keep && STOP.binary_search(&w.as_str()).is_err() {
                        stem(&mut w);
                        plain.push(w);
                    }
                }
                assert_eq!(all(t), plain, "{t:?}");
            }
        }
    }

    #[test]
    fn joined_words_also_give_their_parts() {
        assert_eq!(
            all("CacheDegradation"),
            vec!["cachedegrad", "cach", "degrad"]
        );
        assert_eq!(all("OAuth2"), vec!["oauth2", "auth", "2", "oauth"]);
        assert_eq!(all("WebUI"), vec!["webui", "web", "ui"]);
        assert_eq!(all("UIKit"), vec!["uikit", "ui", "kit"]);
        assert_eq!(all("sha256"), vec!["sha256", "sha", "256"]);
        // Plain words and all-capitals are left whole.
        assert_eq!(all("FIFO cache Claims"), vec!["fifo", "cach", "claim"]);
    }

    #[test]
    fn the_stem_filter_skips_only_words_that_cannot_match() {
        for w in [
            "queries",
            "query",
            "claimed",
            "restoration",
            "degradation",
            "oauth2",
        ] {
            let mut stem = w.to_string();
            super::stem(&mut stem);
            assert!(could_stem_to(w, &stem), "{w} -> {stem}");
        }
        assert!(!could_stem_to("lease", "claim"));
        // Positions are those of `terms`, stemmed or not.
        let text = "The claims of CacheDegradation were leased";
        let mut all_terms = Vec::new();
        terms(text, |t| all_terms.push(t.to_string()));
        let mut got = Vec::new();
        terms_where(
            text,
            |w| could_stem_to(w, "claim"),
            |t, stemmed| got.push((t.to_string(), stemmed)),
        );
        assert_eq!(got.len(), all_terms.len());
        assert_eq!(got[0], ("claim".to_string(), true));
        assert!(got[1..].iter().all(|(_, s)| !s), "{got:?}");
    }

    #[test]
    fn unicode_words() {
        assert_eq!(all("Über Caché"), vec!["über", "caché"]);
    }
}
