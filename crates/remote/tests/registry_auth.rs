//! Bearer token auth and redirect caching.
//!
//! docker-registry's own `auth: token` needs signed JWTs and a certificate
//! chain, so the tests put a small auth gate in front of a no-auth registry
//! instead: it answers 401 + `WWW-Authenticate: Bearer realm=…,service=…,
//! scope=repository:<name>:pull` unless the request carries a token the test's
//! token server issued, and forwards everything else.
#![cfg(feature = "registry")]

mod support;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use obd_remote::registry::{RegistryClient, RegistryOptions};
use obd_remote::{BlobRef, Priority, RangeFetcher};
use overlaybd_core::Error;
use support::http::{Action, Fault, Req, Resp, Server};
use support::{client_opts, creds, digest_of, pattern, Registry};

const REPO: &str = "test/bearer";

fn opts() -> RegistryOptions {
    client_opts(2_000)
}

struct Setup {
    reg: Registry,
    tokens: Server,
    gate: Server,
    storage: Server,
    /// Tokens the gate accepts.
    valid: Arc<Mutex<HashSet<String>>>,
    /// Gate answers data GETs with 307 to `storage`.
    redirect: Arc<AtomicBool>,
    /// Faults for data GETs at the storage server.
    storage_faults: Arc<Mutex<VecDeque<Fault>>>,
    data: Vec<u8>,
    url: String,
}

fn setup() -> Option<Setup> {
    let reg = Registry::start()?;
    let data = pattern(500_000, 9);
    let direct = reg.push_blob(REPO, &data);

    let valid: Arc<Mutex<HashSet<String>>> = Arc::default();
    let issued = Arc::new(AtomicUsize::new(0));
    let (v, n) = (valid.clone(), issued.clone());
    let expect_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("bob:hunter2")
    );
    let tokens = Server::start(move |r: &Req| {
        if r.header("authorization") != Some(expect_basic.as_str()) {
            return Action::Reply(Resp::new(401));
        }
        let t = format!("tok-{}", n.fetch_add(1, Ordering::SeqCst));
        v.lock().unwrap().insert(t.clone());
        Action::Reply(
            Resp::new(200)
                .with_header("Content-Type", "application/json")
                .with_body(format!(r#"{{"token":"{t}","expires_in":300}}"#)),
        )
    });

    let storage_faults: Arc<Mutex<VecDeque<Fault>>> = Arc::default();
    let (up, sf) = (reg.addr.clone(), storage_faults.clone());
    let storage = Server::start(move |r: &Req| {
        if r.is_data_get() {
            if let Some(f) = sf.lock().unwrap().pop_front() {
                return Action::Faulty(up.clone(), f);
            }
        }
        Action::Forward(up.clone())
    });

    let redirect = Arc::new(AtomicBool::new(false));
    let (v, up, rd, realm, st) = (
        valid.clone(),
        reg.addr.clone(),
        redirect.clone(),
        format!("{}/token", tokens.url()),
        storage.url(),
    );
    let gate = Server::start(move |r: &Req| {
        let ok = r
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|t| v.lock().unwrap().contains(t));
        if !ok {
            return Action::Reply(Resp::new(401).with_header(
                "WWW-Authenticate",
                &format!(
                    r#"Bearer realm="{realm}",service="obd-test",scope="repository:{REPO}:pull""#
                ),
            ));
        }
        if rd.load(Ordering::SeqCst) && r.is_data_get() {
            return Action::Reply(
                Resp::new(307).with_header("Location", &format!("{st}{}?sig=x", r.target)),
            );
        }
        Action::Forward(up.clone())
    });
    let url = direct.replace(&reg.addr, &gate.addr);
    Some(Setup {
        reg,
        tokens,
        gate,
        storage,
        valid,
        redirect,
        storage_faults,
        data,
        url,
    })
}

fn blob(s: &Setup) -> BlobRef {
    BlobRef {
        url: s.url.clone(),
        digest: digest_of(&s.url),
        size: s.data.len() as u64,
        verity: None,
    }
}

/// A client of the gate with bob's credentials, password `pass`.
fn client(s: &Setup, pass: &str) -> RegistryClient {
    RegistryClient::with_credentials(opts(), creds(&s.gate.addr, "bob", pass)).unwrap()
}

/// Reads `len` bytes at each of `offsets` of the blob and checks them.
fn read_back(c: &RegistryClient, s: &Setup, offsets: &[usize], len: usize) {
    let b = blob(s);
    for &off in offsets {
        let got = c
            .fetch(&b, off as u64, len as u64, Priority::Foreground)
            .unwrap();
        assert!(got == s.data[off..off + len], "{len} bytes at {off}");
    }
}

#[test]
fn bearer_token_fetched_cached_and_renewed() {
    let Some(s) = setup() else { return };
    let (c, b) = (client(&s, "hunter2"), blob(&s));
    read_back(&c, &s, &[0, 1000, 400_000], 4096);
    assert_eq!(c.blob_size(&s.url).unwrap(), s.data.len() as u64);
    // One probe without credentials, one token for all reads.
    let treqs = s.tokens.requests();
    assert_eq!(treqs.len(), 1);
    let q = &treqs[0].target;
    assert!(q.starts_with("/token?"), "{q}");
    assert!(q.contains("service=obd-test"), "{q}");
    assert!(q.contains("scope=repository%3Atest%2Fbearer%3Apull"), "{q}");
    let probes = s
        .gate
        .count(|r| r.header("range") == Some("bytes=0-0") && r.header("authorization").is_none());
    assert_eq!(probes, 1);
    assert_eq!(s.gate.count(|r| r.is_data_get()), 3);

    // The registry revokes the token: 401 -> new token -> retried once -> OK.
    s.valid.lock().unwrap().clear();
    let got = c.fetch(&b, 5, 10, Priority::Foreground).unwrap();
    assert!(got == s.data[5..15]);
    assert_eq!(s.tokens.requests().len(), 2);

    // Wrong credentials: the token server refuses -> Error::Auth.
    let c = client(&s, "nope");
    let e = c.fetch(&b, 0, 10, Priority::Foreground).unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e}");
}

#[test]
fn concurrent_first_requests_share_one_probe_and_one_token() {
    let Some(s) = setup() else { return };
    let c = std::sync::Arc::new(client(&s, "hunter2"));
    let b = blob(&s);
    let start = std::sync::Arc::new(std::sync::Barrier::new(4));
    std::thread::scope(|sc| {
        for i in 0..4u64 {
            let (c, b, start, data) = (c.clone(), b.clone(), start.clone(), &s.data);
            sc.spawn(move || {
                start.wait();
                let off = i * 100_000;
                let got = c.fetch(&b, off, 4096, Priority::Foreground).unwrap();
                assert!(got == data[off as usize..off as usize + 4096]);
            });
        }
    });
    let probes = s
        .gate
        .count(|r| r.header("range") == Some("bytes=0-0") && r.header("authorization").is_none());
    assert_eq!(probes, 1, "requests that start together wait for one probe");
    assert_eq!(s.tokens.requests().len(), 1);
}

#[test]
fn redirects_cached_and_fetched_without_authorization() {
    let Some(s) = setup() else { return };
    s.redirect.store(true, Ordering::SeqCst);
    let (c, b) = (client(&s, "hunter2"), blob(&s));
    read_back(&c, &s, &[0, 100_000, 200_000], 8192);
    // Only the first data read went to the registry; the location was reused.
    assert_eq!(s.gate.count(Req::is_data_get), 1);
    assert_eq!(s.storage.count(Req::is_data_get), 3);
    assert_eq!(s.storage.count(|r| r.header("authorization").is_some()), 0);
    let loc = c.cached_redirect(&s.url).expect("cached");
    assert!(
        loc.starts_with(&s.storage.url()) && loc.ends_with("?sig=x"),
        "{loc}"
    );

    // An error at the location drops it: the next try resolves again.
    s.storage_faults
        .lock()
        .unwrap()
        .push_back(Fault::Status(503));
    let got = c.fetch(&b, 7, 100, Priority::Foreground).unwrap();
    assert!(got == s.data[7..107]);
    assert_eq!(s.gate.count(Req::is_data_get), 2);
    assert_eq!(s.storage.count(Req::is_data_get), 5);
    assert_eq!(s.storage.count(|r| r.header("authorization").is_some()), 0);
    let _ = (&s.reg, Duration::ZERO);
}

/// The distribution client learns Bearer auth from the 401 of the request
/// itself (no probe), asks for the scope the operation needs (`pull` for
/// reads, `pull,push` for pushes even when the challenge names only `pull`)
/// and sends the token up front afterwards.
#[test]
fn distribution_bearer_scope_per_access() {
    use obd_remote::distribution::ImageRef;

    const REPO: &str = "test/dist";
    const MANIFEST: &str = r#"{"schemaVersion":2}"#;
    // Issued tokens and the scope each was asked for.
    let issued: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let expect_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("bob:hunter2")
    );
    let iss = issued.clone();
    let tokens = Server::start(move |r: &Req| {
        if r.header("authorization") != Some(expect_basic.as_str()) {
            return Action::Reply(Resp::new(401));
        }
        let scope = r
            .target
            .split(['?', '&'])
            .find_map(|kv| kv.strip_prefix("scope="))
            .unwrap_or("")
            .replace("%3A", ":")
            .replace("%2F", "/")
            .replace("%2C", ",");
        let mut iss = iss.lock().unwrap();
        let t = format!("tok-{}", iss.len());
        iss.push((t.clone(), scope));
        Action::Reply(
            Resp::new(200)
                .with_header("Content-Type", "application/json")
                .with_body(format!(r#"{{"token":"{t}"}}"#)),
        )
    });
    let (iss, realm) = (issued.clone(), format!("{}/token", tokens.url()));
    let gate = Server::start(move |r: &Req| {
        let want = if r.method == "GET" {
            format!("repository:{REPO}:pull")
        } else {
            format!("repository:{REPO}:pull,push")
        };
        let granted = r
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .and_then(|t| {
                let iss = iss.lock().unwrap();
                iss.iter().find(|(k, _)| k == t).map(|(_, s)| s.clone())
            });
        if granted.as_deref() != Some(want.as_str()) {
            // Like some registries, the challenge names `pull` whatever the
            // request is.
            return Action::Reply(Resp::new(401).with_header(
                "WWW-Authenticate",
                &format!(
                    r#"Bearer realm="{realm}",service="obd-test",scope="repository:{REPO}:pull""#
                ),
            ));
        }
        Action::Reply(match r.method.as_str() {
            "GET" => Resp::new(200)
                .with_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                .with_body(MANIFEST),
            "PUT" => Resp::new(201),
            _ => Resp::new(404),
        })
    });

    let client = |pass: &str| dist_client(&gate.addr, pass);
    let d = client("hunter2");
    let r = ImageRef::parse(&format!("{}/{REPO}:v1", gate.addr)).unwrap();
    let m = d.get_manifest(&r, "v1").unwrap();
    assert_eq!(m.bytes, MANIFEST.as_bytes());
    let blob = format!("sha256:{}", "0".repeat(64));
    assert_eq!(d.blob_exists(&r, &blob).unwrap(), None);
    d.put_manifest(
        &r,
        "v2",
        "application/vnd.oci.image.manifest.v1+json",
        MANIFEST.as_bytes(),
    )
    .unwrap();
    assert!(d.get_manifest_opt(&r, "v1").unwrap().is_some());
    let scopes: Vec<String> = issued.lock().unwrap().iter().map(|x| x.1.clone()).collect();
    assert_eq!(
        scopes,
        [
            format!("repository:{REPO}:pull"),
            format!("repository:{REPO}:pull,push")
        ]
    );
    // One anonymous request per access (no probe), then tokens up front.
    let anon = gate.count(|r| r.header("authorization").is_none());
    assert_eq!(anon, 2, "{:#?}", gate.requests());
    assert_eq!(gate.requests().len(), 6);

    // Wrong credentials: the token server refuses -> Error::Auth.
    let d = client("nope");
    let e = d.get_manifest(&r, "v1").unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e}");
}

/// Requests that all start anonymously (the distribution client has no
/// probe) and are refused together each learn Basic from their own 401 and
/// retry with it: one request's refusal must not drop the scheme another
/// has just learnt and send that one's retry anonymously (a converter's
/// parallel blob pushes failed with "401 … after re-authenticating").
#[test]
fn distribution_requests_refused_together_all_retry_authenticated() {
    use obd_remote::distribution::ImageRef;

    const N: usize = 8;
    const ROUNDS: usize = 25;
    let expect_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("bob:hunter2")
    );
    // Each round's anonymous requests are answered together.
    let together = Arc::new(std::sync::Barrier::new(N));
    let t = together.clone();
    let gate = Server::start(move |r: &Req| match r.header("authorization") {
        None => {
            t.wait();
            Action::Reply(
                Resp::new(401).with_header("WWW-Authenticate", r#"Basic realm="obd-test""#),
            )
        }
        Some(a) if a == expect_basic => Action::Reply(Resp::new(404)),
        Some(_) => Action::Reply(Resp::new(401)),
    });
    for round in 0..ROUNDS {
        let d = dist_client(&gate.addr, "hunter2");
        let r = ImageRef::parse(&format!("{}/test/basic:v1", gate.addr)).unwrap();
        std::thread::scope(|sc| {
            for i in 0..N {
                let (d, r) = (&d, &r);
                sc.spawn(move || {
                    let blob = format!("sha256:{:064x}", round * N + i);
                    let got = d.blob_exists(r, &blob);
                    assert!(
                        matches!(got, Ok(None)),
                        "round {round}, request {i}: {got:?}"
                    );
                });
            }
        });
    }
    let anon = gate.count(|r| r.header("authorization").is_none());
    assert_eq!(anon, N * ROUNDS, "one anonymous try per request, no more");
}

/// A distribution client of plain-HTTP `addr` as `bob` with `pass`.
fn dist_client(addr: &str, pass: &str) -> obd_remote::distribution::Distribution {
    let mut o = opts();
    o.hosts.insert(
        addr.to_string(),
        obd_remote::registry::HostOptions {
            plain_http: true,
            ..Default::default()
        },
    );
    obd_remote::distribution::Distribution::with_credentials(o, creds(addr, "bob", pass)).unwrap()
}
