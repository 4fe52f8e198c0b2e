//! The bearer token that requests changing something must carry.

use std::net::SocketAddr;

use axum::http::{header, HeaderMap};

use super::error::ApiError;

/// A token, trimmed. Its bytes never reach a log or `Debug`.
#[derive(Clone)]
pub(super) struct Token(Box<[u8]>);

impl Token {
    pub(super) fn new(token: &str) -> Token {
        Token(token.trim().as_bytes().into())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `given` is this token, in time that depends on the lengths only, not
    /// on where the first difference is: every byte is compared and the differences
    /// are OR-ed together, with no early return. (The length of the token is not
    /// secret enough to hide: a 32-byte random token has 256 bits either way.)
    fn matches(&self, given: &[u8]) -> bool {
        if given.len() != self.0.len() {
            return false;
        }
        let difference = self
            .0
            .iter()
            .zip(given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        // black_box keeps the optimiser from turning the fold into an early exit.
        std::hint::black_box(difference) == 0
    }
}

/// Lets a change through when `token` is set and `headers` carry it; otherwise 403
/// (read-only server) or 401, logged with the peer, the method and path, never the
/// token.
pub(super) fn authorize(
    token: Option<&Token>,
    headers: &HeaderMap,
    peer: SocketAddr,
    what: &str,
) -> Result<(), ApiError> {
    let Some(token) = token else {
        return Err(ApiError::forbidden(format!(
            "refused to {what}: dirq serve is read-only (started without --token-file)"
        )));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .map(|value| value.as_bytes())
        // The scheme is case-insensitive (RFC 9110, section 11.1).
        .and_then(|value| {
            let (scheme, rest) = value.split_at_checked(7)?;
            scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
        });
    match given {
        Some(given) if token.matches(given.trim_ascii()) => Ok(()),
        Some(_) => {
            tracing::warn!(%peer, what, "refused a request with a wrong bearer token");
            Err(ApiError::unauthorized(format!(
                "refused to {what}: wrong bearer token"
            )))
        }
        None => {
            tracing::warn!(%peer, what, "refused a request without a bearer token");
            Err(ApiError::unauthorized(format!(
                "refused to {what}: missing 'Authorization: Bearer <token>' header"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_trimmed_and_compared_whole() {
        let token = Token::new("  s3cret\n");
        assert!(token.matches(b"s3cret"));
        assert!(!token.matches(b"s3cre"));
        assert!(!token.matches(b"s3cret!"));
        assert!(!token.matches(b"S3cret"));
        assert!(!token.matches(b""));
        assert!(Token::new(" \n").is_empty());
    }
}
