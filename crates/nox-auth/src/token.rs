//! API token format: `nox_` followed by 64 hex digits (256 random bits),
//! or a token the operator chose (`NOX_ADMIN_TOKEN`: at least 32
//! characters).
//!
//! A bearer value that no stored token could match is refused without a
//! database lookup ([`is_well_formed`]): 32 to 512 bytes of printable ASCII
//! without spaces. Generated tokens are 68 such bytes; operator-chosen ones
//! are checked against the same rule when the server starts, so every token
//! that can exist passes it. The rule is deliberately no stricter (not
//! "`nox_` + 64 hex digits" only): an operator's token may be any such
//! string, including one that happens to start with `nox_`.

use sha2::{Digest, Sha256};

pub const TOKEN_PREFIX: &str = "nox_";
/// How many leading characters of a token are kept for display: `nox_`
/// plus 8 hex digits, 32 of the 256 secret bits.
const DISPLAY_PREFIX_LEN: usize = 12;
/// Shorter bearer values are refused without a lookup: no token is shorter
/// (operator-chosen tokens need at least this many characters).
pub const MIN_TOKEN_LEN: usize = 32;
/// Longer bearer values are refused without hashing them.
pub const MAX_TOKEN_LEN: usize = 512;

/// A freshly generated token. `secret` is shown to the caller once and then
/// forgotten; only `hash` and `prefix` are stored.
#[derive(Debug)]
pub struct NewToken {
    pub secret: crate::Secret,
    pub hash: [u8; 32],
    pub prefix: String,
}

impl NewToken {
    pub fn generate() -> Result<NewToken, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(NewToken::from_secret(format!(
            "{TOKEN_PREFIX}{}",
            hex::encode(bytes)
        )))
    }

    /// Wraps a token chosen elsewhere (the operator's `NOX_ADMIN_TOKEN`).
    pub fn from_secret(secret: String) -> NewToken {
        NewToken {
            hash: hash(&secret),
            prefix: display_prefix(&secret),
            secret: crate::Secret::new(secret),
        }
    }
}

pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The non-secret beginning shown in token lists. Only Nox's own tokens,
/// long enough to spare 32 bits, show one; an operator-chosen token (which
/// may be as short as 32 characters) shows none of itself.
pub fn display_prefix(token: &str) -> String {
    if token.starts_with(TOKEN_PREFIX) && token.len() == TOKEN_PREFIX.len() + 64 {
        token.chars().take(DISPLAY_PREFIX_LEN).collect()
    } else {
        String::new()
    }
}

/// The token of an `Authorization: Bearer <token>` header value, or `None`
/// when the value is not a well-formed bearer credential.
pub fn parse_bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    let well_formed = !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token.bytes().all(|b| b.is_ascii_graphic());
    well_formed.then_some(token)
}

/// Whether `token` could be a Nox token at all: 32 to 512 bytes, each
/// printable ASCII other than space (what an `Authorization` header can
/// carry as one bearer credential). Anything else is refused from this
/// check alone, before any lookup.
pub fn is_well_formed(token: &str) -> bool {
    (MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&token.len())
        && token.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_long_random_and_prefixed() {
        let a = NewToken::generate().expect("random");
        let b = NewToken::generate().expect("random");
        assert!(a.secret.expose().starts_with("nox_"));
        assert_eq!(a.secret.expose().len(), 4 + 64);
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.hash, hash(a.secret.expose()));
        assert_eq!(a.prefix, &a.secret.expose()[..12]);
        assert_eq!(display_prefix("an-operator-chosen-secret-of-32+chars"), "");
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(parse_bearer("Bearer abc"), Some("abc"));
        assert_eq!(parse_bearer("bearer abc"), Some("abc"));
        assert_eq!(parse_bearer("Basic abc"), None);
        assert_eq!(parse_bearer("Bearer"), None);
        assert_eq!(parse_bearer("Bearer "), None);
        assert_eq!(parse_bearer("Bearer a b"), None);
        assert_eq!(parse_bearer(&format!("Bearer {}", "x".repeat(513))), None);
    }

    #[test]
    fn generated_and_operator_tokens_are_well_formed_and_junk_is_not() {
        let generated = NewToken::generate().expect("random");
        assert!(is_well_formed(generated.secret.expose()));
        assert!(is_well_formed("an-operator-chosen-secret-of-32+chars"));
        assert!(is_well_formed("nox_but-chosen-by-the-operator-not-hex!"));
        assert!(is_well_formed(&"x".repeat(MAX_TOKEN_LEN)));
        assert!(!is_well_formed("x"));
        assert!(!is_well_formed(&"x".repeat(MIN_TOKEN_LEN - 1)));
        assert!(!is_well_formed(&"x".repeat(MAX_TOKEN_LEN + 1)));
        assert!(!is_well_formed(&format!("{} tail", "x".repeat(40))));
        assert!(!is_well_formed(&format!("{}é", "x".repeat(40))));
        assert!(!is_well_formed(&format!("{}\u{7f}", "x".repeat(40))));
    }
}
