//! The real `obd-snapshotter` binary with `--metrics-address` and
//! `--log-format json`: gRPC calls through the generated client over its unix
//! socket (one of them failing with NotFound) show up on `GET /metrics`, and
//! stderr is one JSON object per line. Needs no root.

use fixtures::procs::{free_port, short_tempdir, terminate, wait_until};
use hyper_util::rt::TokioIo;
use snapshotter::proto::containerd::services::snapshots::v1 as api;
use snapshotter::proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint, Uri};

/// The snapshotter process; SIGTERMed (then killed) on drop.
struct Snapshotter(Child);

impl Snapshotter {
    /// Sends SIGTERM and waits (bounded) for the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        terminate(&mut self.0, Duration::from_secs(20))
            .expect("obd-snapshotter did not exit on SIGTERM")
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// One HTTP/1.1 GET; returns (status line, body).
fn http_get(addr: &str, path: &str) -> std::io::Result<(String, String)> {
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    Ok((
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    ))
}

/// The value of the sample line starting with `prefix` (name + labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn client(sock: &Path) -> SnapshotsClient<Channel> {
    let sock = sock.to_path_buf();
    // The URI is ignored: every connection goes to the unix socket.
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(sock).await?))
            }
        }))
        .await
        .expect("connect to the snapshotter socket");
    SnapshotsClient::new(channel)
}

fn with_ns<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("containerd-namespace", "default".parse().unwrap());
    r
}

fn start(dir: &Path, sock: &Path, metrics: &str, log: &Path) -> Snapshotter {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_obd-snapshotter"))
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--address")
        .arg(sock)
        .args(["--metrics-address", metrics])
        .args(["--log-format", "json", "--log-level", "debug"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut sn = Snapshotter(child);
    wait_until(
        "the snapshotter socket and metrics endpoint",
        Duration::from_secs(30),
        || {
            if let Some(st) = sn.0.try_wait().unwrap() {
                panic!("obd-snapshotter exited early: {st}");
            }
            std::os::unix::net::UnixStream::connect(sock).is_ok()
                && std::net::TcpStream::connect(metrics).is_ok()
        },
    );
    sn
}

#[test]
fn grpc_calls_show_up_in_metrics_and_json_logs() {
    let tmp = short_tempdir("obd-metrics-");
    let dir: PathBuf = tmp.path().into();
    let sock = dir.join("obd.sock");
    let log = dir.join("stderr.log");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut sn = start(&dir, &sock, &metrics, &log);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = client(&sock).await;
        let prepare = api::PrepareSnapshotRequest {
            key: "k1".into(),
            ..Default::default()
        };
        let p = c.prepare(with_ns(prepare)).await.expect("prepare");
        assert_eq!(p.into_inner().mounts.len(), 1);
        let stat = |key: &str| {
            with_ns(api::StatSnapshotRequest {
                key: key.into(),
                ..Default::default()
            })
        };
        let st = c.stat(stat("k1")).await.expect("stat");
        assert_eq!(st.into_inner().info.unwrap().name, "k1");
        let err = c.stat(stat("missing")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        let remove = api::RemoveSnapshotRequest {
            key: "k1".into(),
            ..Default::default()
        };
        c.remove(with_ns(remove)).await.expect("remove");
    });

    let (status, body) = http_get(&metrics, "/metrics").unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    let v = |p: &str| sample(&body, p).unwrap_or_else(|| panic!("no `{p}` in\n{body}"));
    for (sample, want) in [
        (r#"grpc_requests_total{method="Prepare",code="ok"}"#, 1.0),
        (r#"grpc_requests_total{method="Stat",code="ok"}"#, 1.0),
        (
            r#"grpc_requests_total{method="Stat",code="not_found"}"#,
            1.0,
        ),
        (r#"grpc_requests_total{method="Remove",code="ok"}"#, 1.0),
        (r#"grpc_errors_total{method="Stat",code="not_found"}"#, 1.0),
        (r#"grpc_request_duration_seconds_count{method="Stat"}"#, 2.0),
        ("devices ", 0.0),
    ] {
        assert_eq!(v(&format!("obd_snapshotter_{sample}")), want, "{sample}");
    }
    assert!(
        !body.contains(r#"grpc_errors_total{method="Prepare""#),
        "{body}"
    );
    let (status, _) = http_get(&metrics, "/other").unwrap();
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    // Close the client's connection (its runtime drives it), so the
    // server's graceful shutdown does not wait for it.
    drop(rt);
    let st = sn.stop();
    assert!(st.success(), "obd-snapshotter exit: {st}");
    // Both servers stopped: the socket is gone and the port is closed.
    assert!(!sock.exists());
    assert!(std::net::TcpStream::connect(&metrics).is_err());

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 5, "{text}");
    let rpc = |method: &str, result: &str| {
        lines.iter().any(|l| {
            let f = &l["fields"];
            f["method"] == method && f["result"] == result && f["duration_ms"].is_number()
        })
    };
    assert!(rpc("Prepare", "ok"), "{text}");
    assert!(rpc("Stat", "not_found"), "{text}");
    assert!(
        lines.iter().any(|l| l["fields"]["method"] == "Stat"
            && l["fields"]["key"] == "missing"
            && l["fields"]["namespace"] == "default"),
        "{text}"
    );
    assert!(lines.iter().all(|l| l["level"].is_string()), "{text}");
}

#[test]
fn unusable_metrics_address_fails_the_start() {
    let tmp = short_tempdir("obd-metrics-");
    let dir = tmp.path();
    // A port that is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_obd-snapshotter"))
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--address")
        .arg(dir.join("obd.sock"))
        .args(["--metrics-address", &addr])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr), "{err}");
    // Text logs to a pipe carry no colour codes.
    assert!(!err.contains('\x1b'), "{err:?}");
    assert!(!dir.join("obd.sock").exists());

    let out = Command::new(env!("CARGO_BIN_EXE_obd-snapshotter"))
        .args(["--log-format", "yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("text or json"));
}
