//! Bearer tokens with `read` or `write` scope. A `write` token may also read.
//!
//! Token file format, one token per line: `read <token>` or `write <token>`; blank lines and
//! lines starting with `#` are skipped.

use super::error::ApiError;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
}

#[derive(Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub token: String,
    pub scope: Scope,
}

impl std::fmt::Debug for TokenEntry {
    // Never print the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEntry")
            .field("token", &format_args!("<{} chars>", self.token.len()))
            .field("scope", &self.scope)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("token file line {line}: {message}")]
pub struct TokenFileError {
    pub line: usize,
    pub message: String,
}

/// Parse a token file (see the module docs).
pub fn parse_token_file(text: &str) -> Result<Vec<TokenEntry>, TokenFileError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |message: String| TokenFileError { line: i + 1, message };
        let mut parts = line.split_whitespace();
        let scope = match parts.next() {
            Some("read") => Scope::Read,
            Some("write") => Scope::Write,
            Some(other) => return Err(err(format!("unknown scope {other:?}; expected `read` or `write`"))),
            None => continue,
        };
        let token = parts
            .next()
            .ok_or_else(|| err("missing token after the scope".to_string()))?;
        if parts.next().is_some() {
            return Err(err("expected `<scope> <token>`, found more words".to_string()));
        }
        out.push(TokenEntry {
            token: token.to_string(),
            scope,
        });
    }
    Ok(out)
}

/// Equal in time independent of where the bytes differ (the length may leak).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as u64;
    }
    diff == 0
}

/// The configured tokens and the access rules.
pub struct Tokens {
    entries: Vec<TokenEntry>,
}

impl Tokens {
    pub fn new(entries: Vec<TokenEntry>) -> Tokens {
        Tokens { entries }
    }

    /// The scope of a presented token (every entry is compared, no early exit).
    fn scope_of(&self, presented: &str) -> Option<Scope> {
        let mut best = None;
        for e in &self.entries {
            if ct_eq(e.token.as_bytes(), presented.as_bytes()) {
                best = best.max(Some(e.scope));
            }
        }
        best
    }

    /// Check the request's `Authorization` for an operation needing `need`. A missing or
    /// unknown token is 401; a read token on a write is 403; with `open_reads`, reads need
    /// no token (but a presented one must be valid). An empty `Bearer` is no token: clients
    /// of open OpenAI-compatible servers send one when no key is configured
    /// (lm-evaluation-harness's `local-completions` does).
    pub fn check(&self, headers: &HeaderMap, need: Scope, open_reads: bool) -> Result<(), ApiError> {
        let presented = match headers.get(AUTHORIZATION) {
            None => None,
            Some(v) => {
                let v = v
                    .to_str()
                    .map_err(|_| ApiError::unauthorized("the Authorization header is not valid text"))?
                    .trim();
                let token = match v {
                    "Bearer" | "bearer" => "",
                    _ => v
                        .strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                        .ok_or_else(|| ApiError::unauthorized("expected `Authorization: Bearer <token>`"))?,
                };
                Some(token.trim()).filter(|t| !t.is_empty())
            }
        };
        let scope = match presented {
            None if need == Scope::Read && open_reads => return Ok(()),
            None => {
                return Err(ApiError::unauthorized(match need {
                    Scope::Read => "reading needs a token: `Authorization: Bearer <token>`",
                    Scope::Write => "writing needs a write token: `Authorization: Bearer <token>`",
                }));
            }
            Some(t) => self
                .scope_of(t)
                .ok_or_else(|| ApiError::unauthorized("the bearer token is not valid"))?,
        };
        if scope < need {
            return Err(ApiError::forbidden(
                "this token may only read; writing needs a write token",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_parses_and_names_the_bad_line() {
        let t = parse_token_file("# comment\n\nread  aaaaaaaaaaaaaaaa\nwrite bbbbbbbbbbbbbbbb\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].scope, t[1].scope), (Scope::Read, Scope::Write));
        assert_eq!(t[1].token, "bbbbbbbbbbbbbbbb");
        let e = parse_token_file("read x\nadmin y\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("admin"), "{e}");
        assert_eq!(parse_token_file("write\n").unwrap_err().line, 1);
        assert_eq!(parse_token_file("read a b\n").unwrap_err().line, 1);
        assert!(!format!("{:?}", t[0]).contains("aaaa"), "Debug hides the token");
    }

    #[test]
    fn scopes_and_statuses() {
        let tokens = Tokens::new(parse_token_file("read rrrrrrrrrrrrrrrr\nwrite wwwwwwwwwwwwwwww\n").unwrap());
        let h = |t: Option<&str>| {
            let mut m = HeaderMap::new();
            if let Some(t) = t {
                m.insert(AUTHORIZATION, t.parse().unwrap());
            }
            m
        };
        let status = |r: Result<(), ApiError>| r.err().map(|e| e.status.as_u16());
        assert_eq!(status(tokens.check(&h(None), Scope::Read, true)), None);
        assert_eq!(status(tokens.check(&h(None), Scope::Read, false)), Some(401));
        assert_eq!(status(tokens.check(&h(None), Scope::Write, true)), Some(401));
        let read = Some("Bearer rrrrrrrrrrrrrrrr");
        let write = Some("Bearer wwwwwwwwwwwwwwww");
        assert_eq!(status(tokens.check(&h(read), Scope::Read, false)), None);
        assert_eq!(status(tokens.check(&h(read), Scope::Write, false)), Some(403));
        assert_eq!(status(tokens.check(&h(write), Scope::Write, false)), None);
        assert_eq!(status(tokens.check(&h(write), Scope::Read, false)), None);
        assert_eq!(
            status(tokens.check(&h(Some("Bearer nope")), Scope::Read, true)),
            Some(401)
        );
        assert_eq!(
            status(tokens.check(&h(Some("Basic abc")), Scope::Read, true)),
            Some(401)
        );
        // An empty bearer is no token: open reads pass, writes and closed reads do not.
        for empty in ["Bearer ", "Bearer", "bearer  "] {
            assert_eq!(
                status(tokens.check(&h(Some(empty)), Scope::Read, true)),
                None,
                "{empty:?}"
            );
            assert_eq!(status(tokens.check(&h(Some(empty)), Scope::Read, false)), Some(401));
            assert_eq!(status(tokens.check(&h(Some(empty)), Scope::Write, true)), Some(401));
        }
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"abc", b"abcd"));
    }
}
