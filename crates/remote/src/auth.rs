//! Registry authentication: `WWW-Authenticate` parsing, the per-repository
//! scheme learnt from the probe, and the bearer-token cache.
//!
//! The HTTP requests themselves (probe, token fetch) and the policy (when to
//! probe, which scope to ask for, when to renew) are the transport's
//! (`super::http`); this module holds the state and the parsing so it can be
//! tested without a network.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;

use super::creds::Credential;
use overlaybd_core::error::{Error, Result};
use zfile::sync::MutexExt;

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The scheme, lower-cased (`basic`, `bearer`).
    pub scheme: String,
    /// `key=value` parameters; keys lower-cased, quotes and escapes removed.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// The value of parameter `key` (case-insensitive).
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a `WWW-Authenticate` value into its challenges. Quoted values may hold
/// commas and `\"` escapes; several challenges may share one header.
pub fn parse_www_authenticate(header: &str) -> Vec<Challenge> {
    let b = header.as_bytes();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    let is_tok = |c: u8| !matches!(c, b' ' | b'\t' | b',' | b'=' | b'"');
    while i < b.len() {
        skip_ws(&mut i);
        while i < b.len() && (b[i] == b',' || b[i] == b' ') {
            i += 1;
        }
        // A token: a scheme, or a parameter name.
        let start = i;
        while i < b.len() && is_tok(b[i]) {
            i += 1;
        }
        if start == i {
            if i < b.len() {
                i += 1; // stray character
            }
            continue;
        }
        let tok = &header[start..i];
        let save = i;
        skip_ws(&mut i);
        if i < b.len() && b[i] == b'=' && !out.is_empty() {
            // A parameter of the current challenge (token68 `abc==` aside).
            i += 1;
            skip_ws(&mut i);
            let val = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut v = String::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    // Push whole UTF-8 characters.
                    let ch = header[i..].chars().next().unwrap_or('\u{fffd}');
                    v.push(ch);
                    i += ch.len_utf8();
                }
                i += 1; // closing quote
                v
            } else {
                let s = i;
                while i < b.len() && b[i] != b',' {
                    i += 1;
                }
                header[s..i].trim().to_string()
            };
            out.last_mut()
                .expect("checked non-empty")
                .params
                .push((tok.to_ascii_lowercase(), val));
        } else {
            i = save;
            out.push(Challenge {
                scheme: tok.to_ascii_lowercase(),
                params: Vec::new(),
            });
        }
    }
    out
}

/// How a repository on a host authenticates, as learnt from the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    /// No authentication needed.
    Anonymous,
    /// HTTP Basic with the stored credentials.
    Basic,
    /// Token auth.
    Bearer {
        /// Token endpoint.
        realm: String,
        /// `service` parameter.
        service: Option<String>,
        /// `scope` parameter.
        scope: Option<String>,
    },
}

impl Scheme {
    /// The scheme a 401/403 response's challenges ask for (Bearer preferred).
    pub fn from_challenges(ch: &[Challenge]) -> Option<Scheme> {
        if let Some(c) = ch.iter().find(|c| c.scheme == "bearer") {
            if let Some(realm) = c.param("realm") {
                return Some(Scheme::Bearer {
                    realm: realm.to_string(),
                    service: c.param("service").map(str::to_string),
                    scope: c.param("scope").map(str::to_string),
                });
            }
        }
        ch.iter()
            .any(|c| c.scheme == "basic")
            .then_some(Scheme::Basic)
    }
}

/// `Authorization` value for Basic auth.
pub fn basic_header(c: &Credential) -> String {
    let raw = format!("{}:{}", c.username, c.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// A token endpoint's answer.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenResponse {
    /// The token (docker distribution).
    #[serde(default)]
    pub token: Option<String>,
    /// The token (OAuth2 form).
    #[serde(default)]
    pub access_token: Option<String>,
    /// Lifetime in seconds.
    #[serde(default)]
    pub expires_in: Option<u64>,
}

/// Default token lifetime when the server gives none.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60);
/// Tokens are cached at least this long, whatever `expires_in` says.
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(30);

/// Parses a token response: `(token, lifetime)`.
pub fn parse_token_response(registry: &str, body: &[u8]) -> Result<(String, Duration)> {
    let r: TokenResponse = serde_json::from_slice(body).map_err(|e| Error::Auth {
        registry: registry.to_string(),
        detail: format!("token response is not JSON: {e}"),
    })?;
    let tok = r
        .token
        .filter(|t| !t.is_empty())
        .or(r.access_token.filter(|t| !t.is_empty()))
        .ok_or_else(|| Error::Auth {
            registry: registry.to_string(),
            detail: "token response has neither `token` nor `access_token`".into(),
        })?;
    let ttl = r
        .expires_in
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TOKEN_TTL)
        .max(MIN_TOKEN_TTL);
    Ok((tok, ttl))
}

/// Key of a cached token: realm, service, scope.
type TokenKey = (String, Option<String>, Option<String>);

/// Per-repository schemes and cached bearer tokens.
#[derive(Debug, Default)]
pub struct AuthCache {
    schemes: Mutex<HashMap<String, Scheme>>,
    /// One lock per scheme or token being learnt ([`AuthCache::single_flight`]).
    flights: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    tokens: Mutex<HashMap<TokenKey, (String, Instant)>>,
}

impl AuthCache {
    /// A new, empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The scheme learnt for `repo_key` (`host/repo`), if probed.
    pub fn scheme(&self, repo_key: &str) -> Option<Scheme> {
        self.schemes.locked().get(repo_key).cloned()
    }

    /// Records the scheme for `repo_key`.
    pub fn set_scheme(&self, repo_key: &str, s: Scheme) {
        self.schemes.locked().insert(repo_key.to_string(), s);
    }

    /// What `cached` finds, else what `make` learns (and caches itself),
    /// with one `make` per `key` at a time: requests that start together (a
    /// layer's two ends, the opens of an image's layers) wait for one probe
    /// or one token fetch instead of each making their own.
    pub fn single_flight<T, E>(
        &self,
        key: &str,
        cached: impl Fn() -> Option<T>,
        make: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        if let Some(v) = cached() {
            return Ok(v);
        }
        let lock = Arc::clone(self.flights.locked().entry(key.to_string()).or_default());
        let _held = lock.locked();
        match cached() {
            Some(v) => Ok(v),
            None => make(),
        }
    }

    /// A cached, unexpired token for the bearer parameters.
    pub fn token(
        &self,
        realm: &str,
        service: &Option<String>,
        scope: &Option<String>,
    ) -> Option<String> {
        let key = (realm.to_string(), service.clone(), scope.clone());
        let mut t = self.tokens.locked();
        match t.get(&key) {
            Some((tok, exp)) if Instant::now() < *exp => Some(tok.clone()),
            Some(_) => {
                t.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Caches a token for `ttl`.
    pub fn put_token(
        &self,
        realm: &str,
        service: &Option<String>,
        scope: &Option<String>,
        token: String,
        ttl: Duration,
    ) {
        self.tokens.locked().insert(
            (realm.to_string(), service.clone(), scope.clone()),
            (token, Instant::now() + ttl),
        );
    }

    /// Forgets `failed`, the scheme a request for `repo_key` was refused
    /// with (a 401/403), and the token of its scope, so the next request
    /// re-learns them. A scheme learnt since (by another request's retry)
    /// stays: dropping it would send that request's retry anonymously.
    pub fn invalidate_if(&self, repo_key: &str, failed: &Scheme) {
        {
            let mut schemes = self.schemes.locked();
            if schemes.get(repo_key) == Some(failed) {
                schemes.remove(repo_key);
            }
        }
        if let Scheme::Bearer {
            realm,
            service,
            scope,
        } = failed
        {
            self.tokens
                .locked()
                .remove(&(realm.clone(), service.clone(), scope.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_with_commas_in_quotes() {
        let c = parse_www_authenticate(
            r#"Bearer realm="https://auth.example/token",service="reg.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.example/token"));
        assert_eq!(c[0].param("scope"), Some("repository:a/b:pull,push"));
        assert_eq!(
            Scheme::from_challenges(&c),
            Some(Scheme::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("reg.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
    }

    #[test]
    fn basic_and_multiple_challenges() {
        let c = parse_www_authenticate(r#"Basic realm="Registry Realm""#);
        assert_eq!(Scheme::from_challenges(&c), Some(Scheme::Basic));
        let c = parse_www_authenticate(
            r#"Basic realm="x, y", Bearer realm=https://t/tok, service = s ,scope="a\"b""#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].param("realm"), Some("x, y"));
        assert_eq!(c[1].param("realm"), Some("https://t/tok"));
        assert_eq!(c[1].param("service"), Some("s"));
        assert_eq!(c[1].param("scope"), Some("a\"b"));
        assert!(parse_www_authenticate("").is_empty());
        assert_eq!(
            Scheme::from_challenges(&parse_www_authenticate("Negotiate")),
            None
        );
    }

    #[test]
    fn cache_expiry_and_invalidation() {
        let c = AuthCache::new();
        let (svc, scope) = (Some("s".to_string()), Some("repository:a:pull".to_string()));
        c.put_token("r", &svc, &scope, "t1".into(), Duration::from_secs(60));
        assert_eq!(c.token("r", &svc, &scope).as_deref(), Some("t1"));
        assert_eq!(c.token("r", &svc, &None), None, "per scope");
        c.put_token("r", &svc, &scope, "t0".into(), Duration::ZERO);
        assert_eq!(c.token("r", &svc, &scope), None, "expired");
        c.put_token("r", &svc, &scope, "t2".into(), Duration::from_secs(60));
        let bearer = Scheme::Bearer {
            realm: "r".into(),
            service: svc.clone(),
            scope: scope.clone(),
        };
        c.set_scheme("h/a", Scheme::Basic);
        c.invalidate_if("h/a", &Scheme::Anonymous);
        assert_eq!(
            c.scheme("h/a"),
            Some(Scheme::Basic),
            "a scheme learnt since the refused request stays"
        );
        c.set_scheme("h/a", bearer.clone());
        assert_eq!(c.scheme("h/a"), Some(bearer.clone()));
        c.invalidate_if("h/a", &bearer);
        assert_eq!(c.scheme("h/a"), None);
        assert_eq!(
            c.token("r", &svc, &scope),
            None,
            "token dropped with the scheme"
        );
    }

    #[test]
    fn token_parsing_and_ttl() {
        let (t, ttl) = parse_token_response("r", br#"{"token":"abc","expires_in":5}"#).unwrap();
        assert_eq!((t.as_str(), ttl), ("abc", MIN_TOKEN_TTL));
        let (t, ttl) = parse_token_response("r", br#"{"access_token":"x"}"#).unwrap();
        assert_eq!((t.as_str(), ttl), ("x", DEFAULT_TOKEN_TTL));
        assert!(parse_token_response("r", br#"{"token":""}"#).is_err());
    }
}
