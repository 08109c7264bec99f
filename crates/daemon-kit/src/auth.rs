//! Bearer-token checks for protected routes.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use job_server::ApiError;
use rbee_contract::ErrorCode;

/// The tokens a set of routes accepts. With none, the routes are open (a daemon only allows
/// that on loopback).
#[derive(Clone, Default)]
pub struct BearerAuth {
    tokens: Arc<[Box<str>]>,
    /// Names the credential in error messages, e.g. "cluster token" or "API key".
    what: &'static str,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the tokens themselves.
        f.debug_struct("BearerAuth")
            .field("tokens", &self.tokens.len())
            .field("what", &self.what)
            .finish()
    }
}

impl BearerAuth {
    pub fn new(tokens: impl IntoIterator<Item = String>, what: &'static str) -> Self {
        let tokens: Vec<Box<str>> = tokens
            .into_iter()
            .filter(|t| !t.is_empty())
            .map(String::into_boxed_str)
            .collect();
        BearerAuth {
            tokens: tokens.into(),
            what,
        }
    }

    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Whether `presented` is one of the tokens. Every token is compared in full, so the time
    /// taken reveals neither which token nor how much of it matched.
    pub fn accepts(&self, presented: &str) -> bool {
        self.tokens.iter().fold(false, |hit, token| {
            hit | constant_time_eq(presented.as_bytes(), token.as_bytes())
        })
    }

    /// Puts every route of `router` behind this check.
    pub fn protect<S: Clone + Send + Sync + 'static>(
        self,
        router: axum::Router<S>,
    ) -> axum::Router<S> {
        router.layer(axum::middleware::from_fn_with_state(self, require_bearer))
    }

    /// Checks a request's `Authorization` header; the error is the `401` to answer.
    pub fn check(&self, headers: &axum::http::HeaderMap) -> Result<(), Box<Response>> {
        if self.is_open() {
            return Ok(());
        }
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            Some(given) if self.accepts(given) => Ok(()),
            Some(_) => Err(Box::new(unauthorized(&format!(
                "the bearer token is not a valid {}",
                self.what
            )))),
            None => Err(Box::new(unauthorized(&format!(
                "this route needs `Authorization: Bearer <{}>`",
                self.what
            )))),
        }
    }
}

/// axum middleware: `middleware::from_fn_with_state(auth, require_bearer)`.
pub async fn require_bearer(
    State(auth): State<BearerAuth>,
    request: Request,
    next: Next,
) -> Response {
    match auth.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(response) => *response,
    }
}

fn unauthorized(message: &str) -> Response {
    let mut response = ApiError::new(ErrorCode::Unauthorized, message).into_response();
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Compares without an early exit, so the time taken does not reveal how much of a guess
/// was right. The length is not secret.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_bytes() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secrets"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn accepts_any_of_several_tokens() {
        let auth = BearerAuth::new(
            ["one".to_string(), "two".to_string(), String::new()],
            "API key",
        );
        assert!(auth.accepts("one") && auth.accepts("two"));
        assert!(!auth.accepts("") && !auth.accepts("three"));
        assert!(BearerAuth::new(Vec::new(), "API key").is_open());
    }
}
