//! Test support for the registry client: a real `docker-registry` (distribution
//! 2.8) on 127.0.0.1, plus small HTTP helpers (see [`http`]).

#![allow(dead_code)]

pub mod calls;
pub mod http;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use obd_remote::creds::{Credential, StaticCredentials};
use obd_remote::registry::{RegistryOptions, RetryOptions, Timeouts};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// `true` if `prog` is on PATH.
pub fn have(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// Prints a loud skip line and returns `None` when a binary is missing.
pub fn require(progs: &[&str]) -> Option<()> {
    for p in progs {
        if !have(p) {
            eprintln!(
                "SKIPPED: `{p}` is not installed (apt packages docker-registry, apache2-utils)"
            );
            return None;
        }
    }
    Some(())
}

pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A running `docker-registry serve`, killed on drop.
pub struct Registry {
    child: Child,
    _dir: tempfile::TempDir,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// Basic credentials when started with htpasswd auth.
    pub basic: Option<(String, String)>,
    /// Served over TLS.
    pub tls: bool,
}

/// A test CA and a leaf certificate for 127.0.0.1 made with `openssl`.
pub struct TestCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a CA and a leaf for IP 127.0.0.1 in `dir`; `None` (after a SKIPPED
/// line) without `openssl`.
pub fn make_certs(dir: &Path) -> Option<TestCerts> {
    require(&["openssl"])?;
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=obd-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]);
    Some(TestCerts {
        ca: dir.join("ca.pem"),
        cert: dir.join("leaf.pem"),
        key: dir.join("leaf.key"),
    })
}

impl Registry {
    /// Starts a registry without auth; `None` (after a SKIPPED line) if the
    /// binary is missing.
    pub fn start() -> Option<Registry> {
        Self::start_with(None)
    }

    /// Starts a registry with htpasswd Basic auth for `user`/`pass`.
    pub fn start_basic(user: &str, pass: &str) -> Option<Registry> {
        Self::start_with(Some((user, pass)))
    }

    fn start_with(basic: Option<(&str, &str)>) -> Option<Registry> {
        Self::start_full(basic, None)
    }

    /// Starts a registry serving TLS with `certs`.
    pub fn start_tls(certs: &TestCerts) -> Option<Registry> {
        Self::start_full(None, Some(certs))
    }

    fn start_full(basic: Option<(&str, &str)>, tls: Option<&TestCerts>) -> Option<Registry> {
        require(&["docker-registry"])?;
        if basic.is_some() {
            require(&["htpasswd"])?;
        }
        init_tls();
        let dir = tempfile::tempdir().unwrap();
        let port = http::closed_port();
        let addr = format!("127.0.0.1:{port}");
        let mut auth = String::new();
        if let Some((u, p)) = basic {
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .unwrap();
            assert!(out.status.success(), "htpasswd failed");
            let f = dir.path().join("htpasswd");
            std::fs::write(&f, &out.stdout).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: obd-test\n    path: {}\n",
                f.display()
            );
        }
        let mut tls_cfg = String::new();
        if let Some(t) = tls {
            tls_cfg.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                t.cert.display(),
                t.key.display()
            ));
        }
        let cfg = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  cache:\n    blobdescriptor: inmemory\nhttp:\n  addr: {addr}\n{tls_cfg}{auth}",
            dir.path().join("data").display()
        );
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn docker-registry");
        // Readiness: the registry logs "listening on <addr>"; wait for that
        // line (bounded), keep draining the log afterwards.
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut tail = Vec::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening on") {
                    if let Some(t) = tx.take() {
                        let _ = t.send(Ok(()));
                    }
                }
                if tx.is_some() {
                    tail.push(line);
                }
            }
            if let Some(t) = tx.take() {
                let _ = t.send(Err(tail.join("\n")));
            }
        });
        let mut reg = Registry {
            child,
            _dir: dir,
            addr,
            basic: basic.map(|(u, p)| (u.to_string(), p.to_string())),
            tls: tls.is_some(),
        };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(())) => {}
            Ok(Err(log)) => panic!("docker-registry exited before listening:\n{log}"),
            Err(_) => {
                let _ = reg.child.kill();
                panic!("docker-registry did not start listening within 20 s");
            }
        }
        // And /v2/ answers.
        let resp = reg
            .client()
            .get(format!("{}/v2/", reg.url()))
            .send()
            .unwrap();
        assert!(
            resp.status().as_u16() == 200 || resp.status().as_u16() == 401,
            "/v2/ answered {}",
            resp.status()
        );
        Some(reg)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    fn client(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .no_proxy()
            .tls_danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    fn authed(&self, rb: reqwest::blocking::RequestBuilder) -> reqwest::blocking::RequestBuilder {
        match &self.basic {
            Some((u, p)) => rb.basic_auth(u, Some(p)),
            None => rb,
        }
    }

    /// Pushes `data` into `repo` (monolithic upload) and returns its blob URL.
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        let c = self.client();
        let resp = self
            .authed(c.post(format!("{}/v2/{repo}/blobs/uploads/", self.url())))
            .send()
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            202,
            "start upload: {}",
            resp.status()
        );
        let loc = resp.headers()["location"].to_str().unwrap().to_string();
        let base = reqwest::Url::parse(&self.url()).unwrap();
        let mut put = base.join(&loc).unwrap();
        put.query_pairs_mut().append_pair("digest", &digest);
        let resp = self
            .authed(c.put(put))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            201,
            "finish upload: {}",
            resp.status()
        );
        self.blob_url(repo, &digest)
    }

    pub fn blob_url(&self, repo: &str, digest: &str) -> String {
        format!("{}/v2/{repo}/blobs/{digest}", self.url())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Client options for the tests: no docker config, short timeouts
/// (`request_ms` per request), three quick tries.
pub fn client_opts(request_ms: u64) -> RegistryOptions {
    RegistryOptions {
        use_docker_config: false,
        timeouts: Timeouts {
            connect_ms: 1_000,
            request_ms,
            total_ms: 10_000,
        },
        retry: RetryOptions {
            tries: 3,
            backoff_ms: 10,
            max_backoff_ms: 100,
        },
        ..RegistryOptions::default()
    }
}

/// Credentials `user`/`pass` for `host`.
pub fn creds(host: &str, user: &str, pass: &str) -> Arc<StaticCredentials> {
    Arc::new(StaticCredentials::new().with(
        host,
        Credential {
            username: user.into(),
            password: pass.into(),
        },
    ))
}

/// Deterministic test data.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32 % 31) as u8
                ^ seed
        })
        .collect()
}

/// The digest part of a blob URL.
pub fn digest_of(url: &str) -> String {
    url.rsplit('/').next().unwrap().to_string()
}

/// Writes an executable script.
pub fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}
