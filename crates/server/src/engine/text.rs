//! Text analysis shared by indexing and querying: words, lower-cased,
//! stop words dropped, and a light suffix stemmer so "claims", "claimed" and
//! "claiming" meet "claim".

/// Common English words that carry no meaning for retrieval.
const STOP: &[&str] = &[
    "a", "about", "above", "after", "again", "all", "also", "am", "an", "and", "any", "are", "as",
    "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by",
    "can", "could", "did", "do", "does", "doing", "done", "down", "during", "each", "few", "for",
    "from", "further", "had", "has", "have", "having", "he", "her", "here", "hers", "him", "his",
    "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "me", "more", "most",
    "my", "no", "nor", "not", "now", "of", "off", "on", "once", "only", "or", "other", "our",
    "ours", "out", "over", "own", "same", "she", "should", "so", "some", "such", "than", "that",
    "the", "their", "theirs", "them", "then", "there", "these", "they", "this", "those", "through",
    "to", "too", "under", "until", "up", "very", "was", "we", "were", "what", "when", "where",
    "which", "while", "who", "whom", "why", "will", "with", "would", "you", "your", "yours",
];

fn is_stop(w: &str) -> bool {
    STOP.binary_search(&w).is_ok()
}

/// Strip common inflections, keeping a stem of at least 3 characters.
fn stem(w: &mut String) {
    if !w.is_ascii() || w.len() <= 3 {
        return;
    }
    let cut = |w: &mut String, suffix: &str, with: &str| -> bool {
        if w.ends_with(suffix) && w.len() - suffix.len() + with.len() >= 3 {
            w.truncate(w.len() - suffix.len());
            w.push_str(with);
            true
        } else {
            false
        }
    };
    if !(cut(w, "ies", "y") || cut(w, "sses", "ss")) {
        if w.ends_with('s') && !w.ends_with("ss") && !w.ends_with("us") && !w.ends_with("is") {
            cut(w, "s", "");
        } else if !cut(w, "ing", "") {
            cut(w, "ed", "");
        }
    }
    if w.len() > 4 && w.ends_with('e') {
        w.pop();
    }
}

/// Call `f` with each index term of `text`.
pub fn terms(text: &str, mut f: impl FnMut(&str)) {
    let mut word = String::new();
    let mut flush = |word: &mut String| {
        if word.is_empty() {
            return;
        }
        let keep = word.len() >= 2 || word.chars().all(|c| c.is_ascii_digit());
        if keep && !is_stop(word) {
            stem(word);
            f(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_alphanumeric() {
            if word.len() < 64 {
                word.extend(c.to_lowercase());
            }
        } else {
            flush(&mut word);
        }
    }
    flush(&mut word);
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
        assert_eq!(all("queries query"), vec!["query", "query"]);
        assert_eq!(all("decide decided"), vec!["decid", "decid"]);
        assert_eq!(all("process"), vec!["process"]);
    }

    #[test]
    fn drops_stop_words_and_punctuation_keeps_numbers() {
        assert_eq!(
            all("What did we decide about the FIFO, in 2 days?"),
            vec!["decid", "fifo", "2", "day"]
        );
        assert_eq!(all("autopoll_claims"), vec!["autopoll", "claim"]);
        assert!(all("").is_empty());
    }

    #[test]
    fn unicode_words() {
        assert_eq!(all("Über Caché"), vec!["über", "caché"]);
    }
}
