//! Registry credentials: the explicit credential file (upstream `cred.json`) and
//! the docker `config.json` (`auths`, `credHelpers`, `credsStore`).
//!
//! Files are read at every lookup. Lookups happen only when authenticating (a
//! probe, a token fetch, or after a 401/403), so "reload the credentials" is
//! simply the next lookup.
//!
//! Key matching in `auths` follows upstream: the blob URL is split into host and
//! repository segments, and the first key in file order that equals `host`,
//! `host/ns`, `host/ns/repo`, … wins. Keys may carry an `http(s)://` prefix and a
//! trailing `/` or `/v1/`/`/v2/`; the docker.io aliases (`docker.io`,
//! `index.docker.io`, `registry-1.docker.io`) are one host.

use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use overlaybd_core::error::{Error, Result};

/// A username and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// User name.
    pub username: String,
    /// Password, token or secret.
    pub password: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Where the registry client gets credentials from.
pub trait CredentialSource: Send + Sync {
    /// Credentials for `repo` (e.g. `library/ubuntu`) on `host` (`host[:port]`),
    /// or `None` for anonymous access.
    fn lookup(&self, host: &str, repo: &str) -> Result<Option<Credential>>;
}

/// No credentials at all.
#[derive(Debug, Default, Clone, Copy)]
pub struct Anonymous;

impl CredentialSource for Anonymous {
    fn lookup(&self, _host: &str, _repo: &str) -> Result<Option<Credential>> {
        Ok(None)
    }
}

/// Fixed credentials, matched like `auths` keys (first match in order wins).
#[derive(Debug, Default, Clone)]
pub struct StaticCredentials {
    entries: Vec<(String, Credential)>,
}

impl StaticCredentials {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `cred` under `key` (`host`, `host/ns`, `https://host/`, ...).
    pub fn with(mut self, key: &str, cred: Credential) -> Self {
        self.entries.push((key.to_string(), cred));
        self
    }
}

impl CredentialSource for StaticCredentials {
    fn lookup(&self, host: &str, repo: &str) -> Result<Option<Credential>> {
        Ok(match_key(
            self.entries.iter().map(|(k, c)| (k.as_str(), c)),
            host,
            repo,
        )
        .cloned())
    }
}

/// The canonical form of a registry host: lower case, docker.io aliases folded.
pub fn canonical_host(host: &str) -> String {
    let h = host.to_ascii_lowercase();
    match h.as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => h,
    }
}

/// Normalises an `auths` key to `host[/path]`: drops the scheme, trailing `/`,
/// a trailing `/v1` or `/v2`, and folds docker.io aliases.
pub fn normalize_key(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let mut k = k.trim_end_matches('/');
    for suffix in ["/v1", "/v2"] {
        if let Some(s) = k.strip_suffix(suffix) {
            k = s;
        }
    }
    let (host, rest) = match k.find('/') {
        Some(i) => (&k[..i], &k[i..]),
        None => (k, ""),
    };
    format!("{}{}", canonical_host(host), rest)
}

/// The candidates upstream tries, shortest first: `host`, `host/ns`, `host/ns/repo`.
fn candidates(host: &str, repo: &str) -> Vec<String> {
    let mut out = vec![canonical_host(host)];
    let mut cur = out[0].clone();
    for seg in repo.split('/').filter(|s| !s.is_empty()) {
        cur = format!("{cur}/{seg}");
        out.push(cur.clone());
    }
    out
}

/// The first entry, in order, whose normalised key equals one of the
/// candidates for `host` + `repo`.
pub fn match_key<'a, T>(
    entries: impl IntoIterator<Item = (&'a str, T)>,
    host: &str,
    repo: &str,
) -> Option<T> {
    let cands = candidates(host, repo);
    entries
        .into_iter()
        .find(|(k, _)| cands.contains(&normalize_key(k)))
        .map(|(_, v)| v)
}

/// One `auths` entry.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuthEntry {
    /// base64("user:password").
    #[serde(default)]
    pub auth: Option<String>,
    /// User name (with `password`).
    #[serde(default)]
    pub username: Option<String>,
    /// Password (with `username`).
    #[serde(default)]
    pub password: Option<String>,
}

impl AuthEntry {
    /// The credential this entry holds, if any (`auth` first, then
    /// `username`/`password`). Empty entries (as docker writes next to a
    /// `credsStore`) give `None`.
    pub fn credential(&self) -> Result<Option<Credential>> {
        if let Some(a) = self.auth.as_deref().filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .map_err(|e| cred_err(format!("`auth` is not base64: {e}")))?;
            let s = String::from_utf8(raw).map_err(|_| cred_err("`auth` is not UTF-8".into()))?;
            let (u, p) = s
                .split_once(':')
                .ok_or_else(|| cred_err("`auth` has no `:` between user and password".into()))?;
            return Ok(Some(Credential {
                username: u.to_string(),
                password: p.to_string(),
            }));
        }
        match (&self.username, &self.password) {
            (Some(u), Some(p)) if !u.is_empty() => Ok(Some(Credential {
                username: u.clone(),
                password: p.clone(),
            })),
            _ => Ok(None),
        }
    }
}

fn cred_err(detail: String) -> Error {
    Error::ServiceConfig {
        field: "auths".into(),
        detail,
    }
}

/// `auths` entries in file order (a JSON object read as a list).
#[derive(Debug, Clone, Default)]
pub struct OrderedAuths(pub Vec<(String, AuthEntry)>);

impl<'de> Deserialize<'de> for OrderedAuths {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedAuths;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of registry keys")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some((k, e)) = m.next_entry::<String, AuthEntry>()? {
                    v.push((k, e));
                }
                Ok(OrderedAuths(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// The parts of a docker `config.json` (and of upstream's `cred.json`) we read.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DockerConfig {
    /// Inline credentials, in file order.
    #[serde(default)]
    pub auths: OrderedAuths,
    /// Per-registry credential helpers (`docker-credential-<name>`).
    #[serde(default, rename = "credHelpers")]
    pub cred_helpers: HashMap<String, String>,
    /// The default credential helper.
    #[serde(default, rename = "credsStore")]
    pub creds_store: Option<String>,
}

impl DockerConfig {
    /// Parses config JSON.
    pub fn parse(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| cred_err(format!("bad credential JSON: {e}")))
    }

    /// Reads a config file (a regular file of at most
    /// [`overlaybd_core::regular::MAX_CONFIG_SIZE`] bytes); a missing file is
    /// an empty config.
    pub fn load(path: &Path) -> Result<Self> {
        use overlaybd_core::regular;
        match regular::read_to_string(path, regular::MAX_CONFIG_SIZE, "credentials file") {
            Ok(t) => Self::parse(&t).map_err(|e| e.in_file(path)),
            Err(e) if e.io_kind() == Some(std::io::ErrorKind::NotFound) => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// The inline `auths` credential for `host` + `repo`.
    pub fn auths_lookup(&self, host: &str, repo: &str) -> Result<Option<Credential>> {
        let hit = match_key(
            self.auths.0.iter().map(|(k, e)| (k.as_str(), e)),
            host,
            repo,
        );
        match hit {
            Some(e) => e.credential(),
            None => Ok(None),
        }
    }

    /// Full docker lookup: `credHelpers[host]`, then `credsStore`, then `auths`.
    pub fn lookup(&self, host: &str, repo: &str) -> Result<Option<Credential>> {
        let canon = canonical_host(host);
        let helper = self
            .cred_helpers
            .iter()
            .find(|(k, _)| normalize_key(k) == canon)
            .map(|(_, v)| v.clone());
        let server = helper_server(host);
        if let Some(h) = helper {
            if let Some(c) = run_helper(&h, &server)? {
                return Ok(Some(c));
            }
        } else if let Some(store) = self.creds_store.as_deref().filter(|s| !s.is_empty()) {
            if let Some(c) = run_helper(store, &server)? {
                return Ok(Some(c));
            }
        }
        self.auths_lookup(host, repo)
    }
}

/// The server name docker passes to credential helpers for `host`.
fn helper_server(host: &str) -> String {
    if canonical_host(host) == "docker.io" {
        "https://index.docker.io/v1/".to_string()
    } else {
        host.to_string()
    }
}

/// Longest a credential helper may run.
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `docker-credential-<name> get` with `server` on stdin. `Ok(None)` when
/// the helper has no credentials for it.
pub fn run_helper(name: &str, server: &str) -> Result<Option<Credential>> {
    let prog = format!("docker-credential-{name}");
    let auth_err = |detail: String| Error::Auth {
        registry: server.to_string(),
        detail,
    };
    let mut child = Command::new(&prog)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| auth_err(format!("cannot run {prog}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading is fine; its exit status tells.
        let _ = stdin.write_all(server.as_bytes());
    }
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() < HELPER_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(auth_err(format!(
                    "{prog} timed out after {HELPER_TIMEOUT:?}"
                )));
            }
            Err(e) => return Err(auth_err(format!("{prog}: {e}"))),
        }
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        // "credentials not found in native keychain" and friends.
        return Ok(None);
    }
    #[derive(Deserialize)]
    struct HelperOut {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let o: HelperOut = serde_json::from_slice(&out)
        .map_err(|e| auth_err(format!("{prog} printed bad JSON: {e}")))?;
    if o.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credential {
        username: o.username,
        password: o.secret,
    }))
}

/// The default docker config path: `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`.
pub fn default_docker_config() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// File-backed credentials: the pull credentials recorded from CRI, then the
/// explicit credential file (both `auths` only), then the docker config
/// (helpers, store, `auths`). Re-read at every lookup.
#[derive(Debug, Clone, Default)]
pub struct FileCredentials {
    /// Credentials that CRI pulls carried (`auths` keyed `host/repo`, as
    /// obd-snapshotter's CRI image proxy records them).
    pub cri_credential_file: Option<PathBuf>,
    /// Upstream-style `cred.json` (`auths` only, no helpers).
    pub credential_file: Option<PathBuf>,
    /// A docker `config.json`.
    pub docker_config: Option<PathBuf>,
}

impl CredentialSource for FileCredentials {
    fn lookup(&self, host: &str, repo: &str) -> Result<Option<Credential>> {
        if let Some(p) = &self.cri_credential_file {
            if let Some(c) = DockerConfig::load(p)?.auths_lookup(host, repo)? {
                return Ok(Some(c));
            }
        }
        if let Some(p) = &self.credential_file {
            if let Some(c) = DockerConfig::load(p)?.auths_lookup(host, repo)? {
                return Ok(Some(c));
            }
        }
        if let Some(p) = &self.docker_config {
            return DockerConfig::load(p)?.lookup(host, repo);
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_empty() {
        let c = DockerConfig::load(Path::new("/nonexistent/obd/config.json")).unwrap();
        assert!(c.auths.0.is_empty());
    }

    #[test]
    fn key_normalisation() {
        assert_eq!(normalize_key("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalize_key("http://Reg:5000/ns/"), "reg:5000/ns");
        assert_eq!(normalize_key("reg/v2"), "reg");
    }

    #[test]
    fn first_key_in_file_order_wins() {
        let c = DockerConfig::parse(
            r#"{"auths":{"reg/ns/repo":{"username":"a","password":"1"},
                          "reg":{"username":"b","password":"2"}}}"#,
        )
        .unwrap();
        assert_eq!(
            c.auths_lookup("reg", "ns/repo").unwrap().unwrap().username,
            "a"
        );
        assert_eq!(
            c.auths_lookup("reg", "ns/other").unwrap().unwrap().username,
            "b"
        );
        assert!(c.auths_lookup("other", "ns/repo").unwrap().is_none());
        // `reg/n` must not match `reg/ns`.
        let c =
            DockerConfig::parse(r#"{"auths":{"reg/n":{"username":"a","password":"1"}}}"#).unwrap();
        assert!(c.auths_lookup("reg", "ns/repo").unwrap().is_none());
    }
}
