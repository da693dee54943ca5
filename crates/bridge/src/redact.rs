//! Secret redaction, applied to message text and metadata before they are stored.
//!
//! The patterns and markers follow the Python bridge server (AWS keys, PEM
//! private keys, bearer tokens, password/api_key/secret assignments, GitHub and
//! OpenAI-style keys), so a reader cannot tell which writer stored a message.
//! Two deliberate differences: a `password`/`secret` word is only redacted when
//! an assignment (`:` or `=`) follows, so prose such as "password rotation" in
//! a shard's answer survives; and `sk-` keys of any length of 32 or more match,
//! not only the 48-character legacy shape.

use std::sync::OnceLock;

use regex::Regex;
use serde_json::Value;

struct Pattern {
    re: Regex,
    marker: &'static str,
}

fn patterns() -> &'static [Pattern] {
    static P: OnceLock<Vec<Pattern>> = OnceLock::new();
    P.get_or_init(|| {
        let table: [(&str, &'static str); 8] = [
            (r"AKIA[0-9A-Z]{16}", "AWS_KEY_REDACTED"),
            (
                r"(?s)-----BEGIN[^-]*PRIVATE KEY-----.*?-----END[^-]*PRIVATE KEY-----",
                "PRIVATE_KEY_REDACTED",
            ),
            (r"Bearer [A-Za-z0-9\-._~+/]+=*", "BEARER_TOKEN_REDACTED"),
            (r#"(?i)password"?\s*[:=]\s*"?[^\s"]+"#, "PASSWORD_REDACTED"),
            (
                r#"(?i)api[_-]?key"?\s*[:=]\s*"?[^\s"]+"#,
                "API_KEY_REDACTED",
            ),
            (r#"(?i)secret"?\s*[:=]\s*"?[^\s"]+"#, "SECRET_REDACTED"),
            (r"ghp_[A-Za-z0-9]{36}", "GITHUB_TOKEN_REDACTED"),
            (
                r"\bsk-[A-Za-z0-9][A-Za-z0-9_\-]{31,}",
                "OPENAI_KEY_REDACTED",
            ),
        ];
        table
            .into_iter()
            .map(|(re, marker)| Pattern {
                // The patterns are constants covered by the tests below.
                re: Regex::new(re).unwrap_or_else(|e| panic!("bad redaction pattern {re}: {e}")),
                marker,
            })
            .collect()
    })
}

/// Redact secrets from `text`; returns the text and whether anything changed.
pub fn redact(text: &str) -> (String, bool) {
    let mut out = std::borrow::Cow::Borrowed(text);
    for p in patterns() {
        if p.re.is_match(&out) {
            out = std::borrow::Cow::Owned(p.re.replace_all(&out, p.marker).into_owned());
        }
    }
    let changed = matches!(out, std::borrow::Cow::Owned(_));
    (out.into_owned(), changed)
}

/// Redact a message text. As [`redact`], except that a text that is valid
/// JSON (a shard query or response) stays valid JSON: when redacting the
/// raw text would break it (a secret inside an escaped string, say
/// `"api_key: \"abc\""`), the strings inside the parsed value are redacted
/// instead. Where nothing is found the text is left byte for byte.
pub fn redact_message(text: &str) -> (String, bool) {
    let (out, changed) = redact(text);
    if !changed || serde_json::from_str::<serde::de::IgnoredAny>(&out).is_ok() {
        return (out, changed);
    }
    match serde_json::from_str::<Value>(text) {
        Ok(mut v) => {
            let changed = redact_json(&mut v);
            (v.to_string(), changed)
        }
        Err(_) => (out, changed),
    }
}

/// Redact every string (keys and values) inside a JSON value; returns whether
/// anything changed. Working on the parsed value keeps the result valid JSON.
pub fn redact_json(v: &mut Value) -> bool {
    match v {
        Value::String(s) => {
            let (r, changed) = redact(s);
            if changed {
                *s = r;
            }
            changed
        }
        Value::Array(items) => items.iter_mut().fold(false, |acc, i| redact_json(i) | acc),
        Value::Object(map) => {
            let mut changed = false;
            let old = std::mem::take(map);
            for (k, mut val) in old {
                changed |= redact_json(&mut val);
                let (k2, kc) = redact(&k);
                changed |= kc;
                map.insert(k2, val);
            }
            changed
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> String {
        redact(s).0
    }

    #[test]
    fn a_secret_inside_a_json_query_leaves_valid_json_without_the_secret() {
        let q = crate::shard::query_text("q-1", r#"is my api_key: "abc123" set? password=hunter2"#);
        let (out, changed) = redact_message(&q);
        assert!(changed);
        let v: Value = serde_json::from_str(&out).expect("still JSON");
        let question = v["question"].as_str().unwrap();
        assert!(
            !question.contains("abc123") && !question.contains("hunter2"),
            "{question}"
        );
        assert_eq!(v["query_id"], "q-1");
        // Plain text and clean JSON are as redact() leaves them.
        assert_eq!(redact_message("password=x").0, redact("password=x").0);
        assert_eq!(
            redact_message(&crate::shard::query_text("q", "fine")),
            (crate::shard::query_text("q", "fine"), false)
        );
    }

    #[test]
    fn aws_access_key_id() {
        assert_eq!(
            r("key AKIAIOSFODNN7EXAMPLE here"),
            "key AWS_KEY_REDACTED here"
        );
    }

    #[test]
    fn pem_private_key_block_across_lines() {
        let pem = "before\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nIBAAK\n-----END RSA PRIVATE KEY-----\nafter";
        assert_eq!(r(pem), "before\nPRIVATE_KEY_REDACTED\nafter");
        let pem = "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----";
        assert_eq!(r(pem), "PRIVATE_KEY_REDACTED");
    }

    #[test]
    fn bearer_token() {
        assert_eq!(
            r("Authorization: Bearer eyJhbGciOi.J9-x_y~z+/w=="),
            "Authorization: BEARER_TOKEN_REDACTED"
        );
    }

    #[test]
    fn password_api_key_secret_assignments() {
        assert_eq!(r("password=hunter2 ok"), "PASSWORD_REDACTED ok");
        assert_eq!(r("Password: hunter2"), "PASSWORD_REDACTED");
        assert_eq!(r(r#"{"password": "hunter2"}"#), r#"{"PASSWORD_REDACTED"}"#);
        assert_eq!(r("api_key=abc123"), "API_KEY_REDACTED");
        assert_eq!(r("api-key: abc123"), "API_KEY_REDACTED");
        assert_eq!(r("APIKEY=abc123"), "API_KEY_REDACTED");
        assert_eq!(r("secret = s3cr3t!"), "SECRET_REDACTED");
        assert_eq!(r("client_secret: zzz"), "client_SECRET_REDACTED");
    }

    #[test]
    fn prose_without_assignment_survives() {
        for s in [
            "we discussed password rotation",
            "the secret sauce",
            "api key handling",
        ] {
            assert_eq!(redact(s), (s.to_string(), false));
        }
    }

    #[test]
    fn github_token() {
        let t = format!("token ghp_{}", "a1B2".repeat(9));
        assert_eq!(r(&t), "token GITHUB_TOKEN_REDACTED");
    }

    #[test]
    fn openai_style_keys() {
        let legacy = format!("sk-{}", "Ab3".repeat(16));
        assert_eq!(r(&legacy), "OPENAI_KEY_REDACTED");
        let proj = format!("use sk-proj-{} now", "x9_Y-".repeat(10));
        assert_eq!(r(&proj), "use OPENAI_KEY_REDACTED now");
        // Inside a word ("task-...") is not a key.
        let word = format!("task-{}", "a".repeat(40));
        assert_eq!(redact(&word), (word.clone(), false));
    }

    #[test]
    fn reports_whether_anything_changed() {
        assert!(!redact("nothing here").1);
        assert!(redact("AKIAIOSFODNN7EXAMPLE").1);
    }

    #[test]
    fn json_values_and_keys_are_redacted_and_stay_valid() {
        let mut v = serde_json::json!({
            "action_type": "info",
            "files_involved": ["a.md", "password=x"],
            "note": {"deep": "Bearer abc.def"},
            "n": 3
        });
        assert!(redact_json(&mut v));
        assert_eq!(v["files_involved"][1], "PASSWORD_REDACTED");
        assert_eq!(v["note"]["deep"], "BEARER_TOKEN_REDACTED");
        assert_eq!(v["n"], 3);
        let mut clean = serde_json::json!({"action_type": "question"});
        assert!(!redact_json(&mut clean));
    }
}
