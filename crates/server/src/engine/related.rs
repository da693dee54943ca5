//! Related words for reworded questions: a small table of groups of
//! common English and software words that a question and its answer may use
//! for the same thing ("prevent" / "forbid", "answer" / "reply" /
//! "response", "folder" / "directory"). A query word in a group also looks
//! for the others, at a fraction of its weight ([`Index::search`]).
//!
//! The table is written by hand for this crate from general knowledge of
//! English and of software vocabulary (no word list, thesaurus or model was
//! copied into it), so it ships under the crate's own licence. It is
//! deliberately general: no group names a word of one project's docs. Words
//! are stemmed as the index stems them when the table is first used; a word
//! in two groups relates to the words of both.
//!
//! [`Index::search`]: super::index::Index::search

use std::collections::HashMap;
use std::sync::OnceLock;

use super::text;

/// Groups of words used for the same thing. Each word is a single word as
/// a question would write it; the stemmer joins its inflections.
const GROUPS: &[&[&str]] = &[
    // Stopping something from happening.
    &[
        "prevent", "avoid", "forbid", "prohibit", "disallow", "block", "guard", "refuse", "reject",
        "deny",
    ],
    &["allow", "permit", "enable", "let"],
    &["disable", "deactivate"],
    // Making, removing, changing.
    &[
        "delete", "remove", "erase", "purge", "drop", "clear", "prune",
    ],
    &["create", "construct", "instantiate", "generate"],
    &["update", "change", "modify", "edit", "alter"],
    &["replace", "substitute", "swap", "overwrite"],
    &["copy", "clone", "replicate"],
    &["duplicate", "twice", "repeat", "double"],
    &["combine", "merge", "join", "concatenate"],
    &["split", "divide", "separate"],
    // Starting and stopping.
    &["start", "begin", "launch", "spawn", "initiate"],
    &[
        "stop",
        "halt",
        "terminate",
        "kill",
        "shutdown",
        "quit",
        "exit",
    ],
    &["restart", "reboot", "respawn", "relaunch"],
    &["run", "execute", "invoke"],
    &["wait", "pause", "sleep", "idle"],
    &["retry", "reattempt", "attempt"],
    // Trouble.
    &["error", "failure", "fault"],
    &["fail", "crash", "panic", "abort"],
    &["bug", "defect", "flaw", "problem"],
    &["fix", "repair", "resolve", "patch"],
    &["vulnerability", "exploit", "hole", "flaw"],
    &["missing", "absent", "gone", "lost"],
    &["recover", "restore", "recovery", "rescue"],
    &["backup", "snapshot"],
    // Speed, size, amount.
    &["fast", "quick", "speed", "rapid", "performance"],
    &["slow", "latency", "delay", "lag"],
    &["large", "big", "huge"],
    &["small", "tiny"],
    &["limit", "maximum", "max", "cap", "bound", "ceiling"],
    &["minimum", "min", "least"],
    &["count", "number", "amount", "quantity", "total"],
    &["size", "length"],
    &["increase", "raise", "grow", "enlarge"],
    &["decrease", "reduce", "lower", "shrink"],
    &["improve", "enhance", "optimize", "optimise"],
    &["cost", "overhead", "expensive", "price"],
    // Time.
    &["timeout", "deadline"],
    &[
        "expire",
        "expiry",
        "expiration",
        "stale",
        "outdated",
        "lapse",
    ],
    &["old", "previous", "earlier", "prior", "former", "legacy"],
    &["latest", "newest", "recent"],
    &["duration", "period", "interval"],
    &["often", "frequency", "rate"],
    &["soon", "quickly", "promptly"],
    &["daily", "day"],
    // Settings and interfaces.
    &["default", "preset"],
    &["config", "configuration", "setting", "option", "preference"],
    &["flag", "switch", "argument"],
    &["folder", "directory", "dir"],
    &["path", "location"],
    &["environment", "env"],
    &["variable", "var"],
    &["behavior", "behaviour"],
    &["color", "colour"],
    &["license", "licence", "copyright"],
    &["author", "maintainer", "contributor"],
    &["documentation", "docs", "manual", "guide"],
    &["example", "sample", "demo"],
    &["feature", "capability"],
    &["platform", "os"],
    &["install", "setup"],
    &["upgrade", "migrate", "migration"],
    &["version", "revision"],
    &["deprecate", "deprecated", "obsolete"],
    &["dependency", "crate", "package", "library"],
    &["compile", "compiler", "build"],
    &["support", "compatible", "compatibility"],
    // Data.
    &["read", "load", "open"],
    &["write", "save", "store", "persist"],
    &["output", "print", "display", "show", "emit"],
    &["log", "logging", "trace"],
    &["warn", "warning", "alert"],
    &["check", "verify", "validate", "ensure", "confirm"],
    &["find", "search", "locate", "lookup"],
    &["match", "pattern"],
    &["sort", "order"],
    &["exclude", "skip", "ignore", "omit"],
    &["include", "contain"],
    &["identical", "equal"],
    &["different", "distinct"],
    &["compare", "diff", "difference"],
    &["empty", "blank"],
    &["null", "none", "nil"],
    &["string", "text", "str"],
    &["integer", "int"],
    &["list", "array", "vector", "vec", "sequence"],
    &["map", "dictionary", "dict", "hashmap"],
    &["function", "method", "routine", "procedure"],
    &["serialize", "serialise", "encode", "marshal"],
    &["deserialize", "deserialise", "decode", "parse"],
    &["hash", "digest", "checksum"],
    &["random", "rng"],
    &["timezone", "tz"],
    &["format", "layout"],
    // Messages and connections.
    &["request", "query", "question", "ask"],
    &["answer", "reply", "response", "respond"],
    &["send", "transmit", "deliver"],
    &["receive", "accept"],
    &["message", "frame", "packet"],
    &["queue", "buffer", "backlog"],
    &["connect", "connection", "attach"],
    &["host", "machine", "computer", "node"],
    &["localhost", "loopback"],
    &["database", "db"],
    &["signal", "interrupt", "sigint", "sigterm"],
    &["heartbeat", "ping", "liveness", "health"],
    &["alive", "live", "active"],
    &["dead", "defunct"],
    &["user", "person", "people"],
    &["owner", "holder"],
    &["permission", "privilege", "access"],
    &["secure", "security", "safety"],
    &["password", "secret", "credential"],
    &["encrypt", "encryption", "tls", "ssl"],
    &["report", "disclose", "notify"],
    &["contact", "email"],
    &["help", "assist"],
    // Concurrency and resources.
    &["thread", "parallel", "concurrent", "concurrency"],
    &["async", "asynchronous", "await"],
    &["lock", "mutex"],
    &["memory", "ram", "heap"],
    &["disk", "storage", "drive"],
    &["cpu", "processor", "core"],
    &["allocate", "allocation", "alloc"],
];

/// Each stemmed term and the other terms of its groups.
type Table = HashMap<Box<str>, Box<[Box<str>]>>;

/// The table, stemmed once.
fn table() -> &'static Table {
    static T: OnceLock<Table> = OnceLock::new();
    T.get_or_init(|| {
        let mut out: HashMap<Box<str>, Vec<Box<str>>> = HashMap::new();
        for group in GROUPS {
            let mut stems: Vec<Box<str>> = Vec::new();
            for w in *group {
                text::terms(w, |t| {
                    if !stems.iter().any(|s| &**s == t) {
                        stems.push(t.into());
                    }
                });
            }
            for s in &stems {
                let entry = out.entry(s.clone()).or_default();
                for o in &stems {
                    if o != s && !entry.contains(o) {
                        entry.push(o.clone());
                    }
                }
            }
        }
        out.into_iter()
            .map(|(k, v)| (k, v.into_boxed_slice()))
            .collect()
    })
}

/// The terms related to index term `t` (stemmed, as [`text::terms`] gives
/// it), not `t` itself; empty for a word in no group.
pub fn related(t: &str) -> &'static [Box<str>] {
    table().get(t).map_or(&[], |v| &v[..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stem(w: &str) -> String {
        let mut out = String::new();
        text::terms(w, |t| out = t.to_string());
        out
    }

    #[test]
    fn related_words_meet_in_either_direction_and_inflected() {
        let prevent = stem("prevented");
        let forbid = stem("forbids");
        assert!(related(&prevent).iter().any(|t| **t == *forbid));
        assert!(related(&forbid).iter().any(|t| **t == *prevent));
        assert!(!related(&prevent).iter().any(|t| **t == *prevent));
        assert!(
            related(&stem("directories"))
                .iter()
                .any(|t| **t == *stem("folder"))
        );
        assert!(related("zebra").is_empty());
    }

    #[test]
    fn every_group_word_is_an_index_term() {
        // A stop word or a word the stemmer merges into another group's
        // word would silently do nothing; each must give exactly one term.
        for group in GROUPS {
            assert!(
                group.len() >= 2,
                "a group of one relates nothing: {group:?}"
            );
            for w in *group {
                let mut n = 0;
                text::terms(w, |_| n += 1);
                assert_eq!(n, 1, "{w:?} must be one index term, not {n}");
            }
        }
    }
}
