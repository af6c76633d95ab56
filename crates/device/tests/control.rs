//! The control socket under hostile clients: its mode whatever the umask, a
//! peer of another uid refused, huge request lines, idle connections by the
//! thousand and more requests than it serves at once — and a real request
//! still answered promptly.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use obd_device::control::{Limits, MAX_REQUEST};
use obd_device::service::{call, Op, Service};
use obd_device::state::Root;
use obd_device::Error;

/// Starts a service on a fresh root (in a thread that runs until the test
/// process ends) and waits until it answers.
fn start(limits: Limits, worker_cmd: &[&str]) -> (tempfile::TempDir, Root) {
    let dir = fixtures::procs::short_tempdir("obd-ctl");
    let root = Root::new(dir.path());
    let svc = Service::new(
        root.clone(),
        worker_cmd.iter().map(|s| s.to_string()).collect(),
    )
    .with_limits(limits);
    std::thread::spawn(move || {
        if let Err(e) = svc.serve() {
            panic!("serve: {e}");
        }
    });
    fixtures::procs::wait_until("the service answers", Duration::from_secs(20), || {
        call(&root, &Op::Ping).is_ok()
    });
    (dir, root)
}

/// Connects and reads the one reply line the service sends.
fn reply_of(conn: &UnixStream) -> String {
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).unwrap();
    line
}

fn proc_status(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_socket_is_0600_whatever_the_umask() {
    let old = rustix::process::umask(rustix::fs::Mode::empty());
    let (_dir, root) = start(Limits::default(), &["false"]);
    rustix::process::umask(old);
    let mode = std::fs::metadata(root.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o600, "mode {mode:o}");
    // No temporary name is left beside it.
    let names: Vec<_> = std::fs::read_dir(root.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names.iter().filter(|n| n.starts_with("obd.sock")).count(),
        1,
        "{names:?}"
    );
}

/// Run as another uid by `a_peer_of_another_uid_is_refused`: connects to the
/// socket named in the environment, sends a ping and prints what happened.
#[test]
fn peer_client() {
    let Ok(sock) = std::env::var("OBD_CONTROL_TEST_SOCKET") else {
        return;
    };
    match UnixStream::connect(&sock) {
        Ok(mut c) => {
            // The service may refuse (and close) before the ping is written:
            // its reply is read either way.
            let _ = c.write_all(b"{\"op\":\"ping\"}\n");
            println!("REPLY {}", reply_of(&c).trim_end());
        }
        Err(e) => println!("CONNECT {}", e.raw_os_error().unwrap_or(0)),
    }
}

fn as_nobody(sock: &Path) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "peer_client", "--nocapture", "--test-threads=1"])
        .env("OBD_CONTROL_TEST_SOCKET", sock)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // libtest prints the test's name on the same line.
    text.lines()
        .find_map(|l| l.find("REPLY ").or(l.find("CONNECT ")).map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no result from the client: {out:?}"))
        .to_string()
}

#[test]
fn a_peer_of_another_uid_is_refused() {
    if !fixtures::procs::Needs::root(&[]).met("a_peer_of_another_uid_is_refused") {
        return;
    }
    let (dir, root) = start(Limits::default(), &["false"]);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The socket's mode keeps other users out at connect.
    assert_eq!(
        as_nobody(&root.socket()),
        format!("CONNECT {}", libc::EACCES)
    );
    // With the mode opened up, the peer credential check still refuses them.
    std::fs::set_permissions(root.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(
        as_nobody(&root.socket()),
        r#"REPLY {"error":"permission denied: uid 65534 is neither root nor the socket's owner (uid 0)","ok":false}"#
    );
    // Root (the owner here) is served.
    assert!(call(&root, &Op::Ping).is_ok());
}

#[test]
fn idle_connections_and_a_huge_line_do_not_stop_a_real_request() {
    let limits = Limits::default();
    let (_dir, root) = start(limits, &["false"]);
    let hwm_before = proc_status("VmHWM:");

    // 1,000 idle connections.
    let idle: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(root.socket()).unwrap())
        .collect();
    // A client sending a 400 MB request line.
    let mut c = UnixStream::connect(root.socket()).unwrap();
    let chunk = vec![b' '; 1 << 20];
    let mut sent = 0u64;
    while sent < 400 << 20 {
        match c.write(&chunk) {
            Ok(n) => sent += n as u64,
            Err(_) => break,
        }
    }
    assert!(
        sent < 64 << 20,
        "the service read {sent} bytes of the huge line"
    );
    assert_eq!(
        reply_of(&c),
        format!(
            "{{\"error\":\"request larger than {MAX_REQUEST} bytes; refused\",\"ok\":false}}\n"
        )
    );

    // A real request is answered at once, while they are all open.
    let t = Instant::now();
    let v = call(&root, &Op::List).unwrap();
    let took = t.elapsed();
    assert_eq!(v["devices"], serde_json::json!([]));
    assert!(took < Duration::from_secs(2), "list took {took:?}");

    // No thread per connection, no memory for the huge line.
    let threads = proc_status("Threads:");
    assert!(threads < 64, "{threads} threads");
    let grew = proc_status("VmHWM:").saturating_sub(hwm_before);
    assert!(grew < 64 << 10, "peak RSS grew by {grew} KiB");
    eprintln!(
        "1,000 idle connections + a huge line ({sent} bytes sent before refusal): \
         list answered in {took:?}; {threads} threads; peak RSS +{grew} KiB"
    );

    // The oldest idle connections were closed to make room, with a reason.
    assert_eq!(
        reply_of(&idle[0]),
        format!(
            "{{\"error\":\"the service is busy: {} connections are waiting to send requests\",\"ok\":false}}\n",
            limits.max_pending
        )
    );
}

#[test]
fn an_idle_connection_times_out() {
    let limits = Limits {
        request_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let (_dir, root) = start(limits, &["false"]);
    let mut c = UnixStream::connect(root.socket()).unwrap();
    // Half a request, never finished.
    c.write_all(b"{\"op\":").unwrap();
    let t = Instant::now();
    assert_eq!(
        reply_of(&c),
        "{\"error\":\"no complete request within 0.2 s\",\"ok\":false}\n"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "{:?}",
        t.elapsed()
    );
    // Closed after the reply.
    let mut rest = Vec::new();
    assert_eq!(c.read_to_end(&mut rest).unwrap(), 0);
    assert!(call(&root, &Op::Ping).is_ok());
}

#[test]
fn requests_beyond_max_active_are_refused_not_queued() {
    // Workers that hold their attach until `go` exists; each says it started.
    let gate = tempfile::tempdir().unwrap();
    let started = gate.path().join("started");
    let script = r#"touch "$0.$$"; while [ ! -e "$0.go" ]; do sleep 0.02; done"#;
    let limits = Limits {
        max_active: 2,
        ..Limits::default()
    };
    let (_dir, root) = start(limits, &["sh", "-c", script, started.to_str().unwrap()]);
    let attach = |id: &str| {
        let (root, id) = (root.clone(), id.to_string());
        std::thread::spawn(move || {
            call(
                &root,
                &Op::Attach {
                    config: "/nonexistent/config.v1.json".into(),
                    frontend: "fuse".into(),
                    mountpoint: None,
                    id: Some(id),
                },
            )
        })
    };
    let slow = [attach("a"), attach("b")];
    let count_started = || {
        std::fs::read_dir(gate.path())
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                n.to_string_lossy().starts_with("started.")
            })
            .count()
    };
    fixtures::procs::wait_until("both workers start", Duration::from_secs(20), || {
        count_started() == 2
    });
    match call(&root, &Op::Ping) {
        Err(Error::Request(m)) => {
            assert_eq!(m, "the service is busy: 2 requests are being served")
        }
        other => panic!("{other:?}"),
    }
    std::fs::write(gate.path().join("started.go"), b"").unwrap();
    for t in slow {
        match t.join().unwrap() {
            Err(Error::Request(m)) => assert!(
                m.starts_with("attach failed: worker exited without a result"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
    }
    assert!(call(&root, &Op::Ping).is_ok());
}
