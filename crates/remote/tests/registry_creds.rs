//! Credentials: docker `config.json` and upstream `cred.json` parsing and key
//! matching, credential helpers (`docker-credential-test` on PATH), and reads
//! from an htpasswd registry with credentials from each source.
//!
//! One test function only: it changes PATH, which must not race other threads.
#![cfg(feature = "registry")]

mod support;

use std::path::Path;

use base64::Engine;
use obd_remote::creds::{run_helper, Anonymous, CredentialSource, DockerConfig, FileCredentials};
use obd_remote::registry::{RegistryClient, RegistryOptions};
use obd_remote::{BlobRef, Priority, RangeFetcher};
use overlaybd_core::Error;
use support::{digest_of, pattern, write_script, Registry};

/// Writes a `cred.json` giving `user_pass` (`user:pass`) for `host`.
fn write_auth(cred: &std::path::Path, host: &str, user_pass: &str) {
    let auth = b64(user_pass);
    let json = format!(r#"{{"auths": {{"{host}": {{"auth": "{auth}"}}}}}}"#);
    std::fs::write(cred, json).unwrap();
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn user(c: &dyn CredentialSource, host: &str, repo: &str) -> Option<String> {
    c.lookup(host, repo).unwrap().map(|c| c.username)
}

fn docker_user(c: &DockerConfig, host: &str, repo: &str) -> Option<String> {
    c.lookup(host, repo).unwrap().map(|c| c.username)
}

fn parsing_and_key_matching(dir: &Path) {
    let cfg = format!(
        r#"{{"auths": {{
            "https://index.docker.io/v1/": {{"auth": "{}"}},
            "reg.example/team": {{"username": "team", "password": "pw2"}},
            "reg.example": {{"auth": "{}"}},
            "http://other:5000/": {{"auth": "!!not base64"}},
            "empty.example": {{}}
        }}}}"#,
        b64("dh:pw1"),
        b64("any:pw:with:colons")
    );
    let c = DockerConfig::parse(&cfg).unwrap();
    let hub = c
        .lookup("registry-1.docker.io", "library/ubuntu")
        .unwrap()
        .unwrap();
    assert_eq!(
        (hub.username.as_str(), hub.password.as_str()),
        ("dh", "pw1")
    );
    assert_eq!(
        c.auths_lookup("docker.io", "x/y")
            .unwrap()
            .unwrap()
            .username,
        "dh"
    );
    assert_eq!(
        c.auths_lookup("reg.example", "team/app")
            .unwrap()
            .unwrap()
            .username,
        "team"
    );
    let any = c.auths_lookup("reg.example", "x/app").unwrap().unwrap();
    assert_eq!(
        (any.username.as_str(), any.password.as_str()),
        ("any", "pw:with:colons")
    );
    assert!(c.auths_lookup("other:5000", "a/b").is_err());
    assert!(c.auths_lookup("empty.example", "a").unwrap().is_none());
    assert!(c.auths_lookup("nowhere", "a").unwrap().is_none());

    // File order decides: the host key first shadows the longer one.
    let c = DockerConfig::parse(&format!(
        r#"{{"auths": {{"reg.example": {{"auth": "{}"}}, "reg.example/team": {{"auth": "{}"}}}}}}"#,
        b64("host:1"),
        b64("team:2")
    ))
    .unwrap();
    assert_eq!(
        c.auths_lookup("reg.example", "team/app")
            .unwrap()
            .unwrap()
            .username,
        "host"
    );
    assert!(DockerConfig::parse("{not json").is_err());

    // The explicit credential file goes before the docker config.
    let docker = dir.join("config.json");
    std::fs::write(&docker, &cfg).unwrap();
    let cred = dir.join("cred.json");
    std::fs::write(
        &cred,
        r#"{"auths": {"reg.example": {"username": "file-user", "password": "x"}}}"#,
    )
    .unwrap();
    let fc = FileCredentials {
        cri_credential_file: None,
        credential_file: Some(cred),
        docker_config: Some(docker),
    };
    assert_eq!(
        user(&fc, "reg.example", "team/app").as_deref(),
        Some("file-user")
    );
    assert_eq!(user(&fc, "index.docker.io", "a/b").as_deref(), Some("dh"));
    assert_eq!(user(&fc, "nowhere", "a").as_deref(), None);
    // Missing files are empty.
    let none = FileCredentials {
        cri_credential_file: Some(dir.join("missing0.json")),
        credential_file: Some(dir.join("missing.json")),
        docker_config: Some(dir.join("missing2.json")),
    };
    assert_eq!(user(&none, "reg.example", "a"), None);
    assert_eq!(user(&Anonymous, "reg.example", "a"), None);
}

fn fetch_ok(c: &RegistryClient, url: &str, data: &[u8]) {
    let b = BlobRef {
        url: url.to_string(),
        digest: digest_of(url),
        size: data.len() as u64,
        verity: None,
    };
    let got = c.fetch(&b, 10, 1000, Priority::Foreground).unwrap();
    assert!(got == data[10..1010]);
}

#[test]
fn credential_sources() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    // The helper answers for the server named in `known` and logs each call.
    write_script(
        &bin,
        "docker-credential-test",
        &format!(
            r#"#!/bin/sh
[ "$1" = get ] || exit 2
read -r server
echo "$server" >> {d}/calls
if [ "$server" = "$(cat {d}/known 2>/dev/null)" ]; then
  printf '{{"ServerURL":"%s","Username":"alice","Secret":"s3cret"}}\n' "$server"
else
  echo "credentials not found in native keychain"
  exit 1
fi
"#,
            d = dir.path().display()
        ),
    );
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bin.clone()];
    paths.extend(std::env::split_paths(&path));
    // Only this test runs in this binary, and nothing else has started yet.
    std::env::set_var("PATH", std::env::join_paths(paths).unwrap());

    parsing_and_key_matching(dir.path());

    // Helpers, without a registry.
    std::fs::write(dir.path().join("known"), "reg.example").unwrap();
    let c = run_helper("test", "reg.example").unwrap().unwrap();
    assert_eq!(
        (c.username.as_str(), c.password.as_str()),
        ("alice", "s3cret")
    );
    assert!(run_helper("test", "elsewhere").unwrap().is_none());
    let e = run_helper("no-such-helper-obd", "x").unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e}");
    let helpers = DockerConfig::parse(
        r#"{"credHelpers": {"reg.example": "test"},
            "auths": {"reg.example": {"username": "inline", "password": "x"},
                      "elsewhere": {"username": "inline2", "password": "x"}}}"#,
    )
    .unwrap();
    let store = DockerConfig::parse(
        r#"{"credsStore": "test", "auths": {"elsewhere": {"username": "inline", "password": "x"}}}"#,
    )
    .unwrap();
    for (cfg, host, repo, want) in [
        (&helpers, "reg.example", "a/b", "alice"),
        // No helper for the host: `auths`.
        (&helpers, "elsewhere", "a/b", "inline2"),
        (&store, "reg.example", "a", "alice"),
        // The store has nothing for it: fall back to `auths`.
        (&store, "elsewhere", "a", "inline"),
    ] {
        let got = docker_user(cfg, host, repo);
        assert_eq!(got.as_deref(), Some(want), "{host} {repo}");
    }
    // docker.io is asked for under its classic server name.
    std::fs::write(dir.path().join("known"), "https://index.docker.io/v1/").unwrap();
    assert_eq!(
        docker_user(&store, "registry-1.docker.io", "library/x").as_deref(),
        Some("alice")
    );

    // End to end against an htpasswd registry.
    let Some(reg) = Registry::start_basic("alice", "s3cret") else {
        return;
    };
    let data = pattern(100_000, 7);
    let url = reg.push_blob("test/creds", &data);
    std::fs::write(dir.path().join("known"), &reg.addr).unwrap();

    // docker config with a credential helper.
    let docker = dir.path().join("docker-config.json");
    std::fs::write(
        &docker,
        format!(r#"{{"credHelpers": {{"{}": "test"}}}}"#, reg.addr),
    )
    .unwrap();
    let c = RegistryClient::new(RegistryOptions {
        docker_config: Some(docker),
        ..RegistryOptions::default()
    })
    .unwrap();
    fetch_ok(&c, &url, &data);

    // Upstream cred.json with an `http://host/` key.
    let cred = dir.path().join("cred.json");
    std::fs::write(
        &cred,
        format!(
            r#"{{"auths": {{"http://{}/test": {{"auth": "{}"}}}}}}"#,
            reg.addr,
            b64("alice:s3cret")
        ),
    )
    .unwrap();
    let c = RegistryClient::new(RegistryOptions {
        credential_file: Some(cred.clone()),
        use_docker_config: false,
        ..RegistryOptions::default()
    })
    .unwrap();
    fetch_ok(&c, &url, &data);

    // Credentials are re-read after a 401: fix a wrong password in the file
    // and a new client-side auth attempt succeeds without a new client.
    let c = RegistryClient::new(RegistryOptions {
        credential_file: Some(cred.clone()),
        use_docker_config: false,
        ..RegistryOptions::default()
    })
    .unwrap();
    write_auth(&cred, &reg.addr, "alice:wrong");
    let b = BlobRef {
        url: url.clone(),
        digest: digest_of(&url),
        size: data.len() as u64,
        verity: None,
    };
    let e = c.fetch(&b, 0, 10, Priority::Foreground).unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e}");
    write_auth(&cred, &reg.addr, "alice:s3cret");
    fetch_ok(&c, &url, &data);
}
