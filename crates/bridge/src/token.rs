//! Identifiers and secrets: conversation ids, session tokens, claim owners,
//! all from the operating system's CSPRNG, and constant-time comparison.

use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// `n` random bytes as lowercase hex (2n characters).
pub fn random_hex(n: usize) -> Result<String> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf)
        .map_err(|e| Error::Invalid(format!("the OS random number generator failed: {e}")))?;
    Ok(hex(&buf))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// A new conversation id: `conv_` and 16 lowercase hex digits.
pub fn conversation_id() -> Result<String> {
    Ok(format!("conv_{}", random_hex(8)?))
}

/// A new session token: 64 lowercase hex characters (256 random bits).
pub fn session_token() -> Result<String> {
    random_hex(32)
}

/// True when `s` has the shape of a conversation id.
pub fn is_conversation_id(s: &str) -> bool {
    s.len() == 21
        && s.starts_with("conv_")
        && s[5..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Compare a presented token with the stored one in time independent of
/// where they differ (the length is not secret: tokens are always 64 chars).
pub fn tokens_equal(presented: &str, stored: &str) -> bool {
    presented.len() == stored.len() && bool::from(presented.as_bytes().ct_eq(stored.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_tokens_have_the_python_shape() {
        let id = conversation_id().unwrap();
        assert!(is_conversation_id(&id), "{id}");
        let t = session_token().unwrap();
        assert_eq!(t.len(), 64);
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(t, session_token().unwrap());
    }

    #[test]
    fn conversation_id_shape_is_checked() {
        assert!(is_conversation_id("conv_0123456789abcdef"));
        assert!(!is_conversation_id("conv_0123456789ABCDEF"));
        assert!(!is_conversation_id("conv_0123"));
        assert!(!is_conversation_id("xonv_0123456789abcdef"));
    }

    #[test]
    fn token_comparison() {
        assert!(tokens_equal("abc", "abc"));
        assert!(!tokens_equal("abc", "abd"));
        assert!(!tokens_equal("abc", "abcd"));
        assert!(!tokens_equal("", "a"));
    }
}
