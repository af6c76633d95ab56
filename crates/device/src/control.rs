//! The control socket's transport (`<root>/obd.sock`): who may connect, how
//! large a request may be, how long a client may take, and how many clients
//! are served at once. What the requests mean is [`crate::service`]'s.
//!
//! One thread polls the listener and every connection that has not yet sent
//! its request line; a complete request is served on a thread of its own, at
//! most [`Limits::max_active`] at once. Idle or slow clients therefore cost a
//! descriptor and a bounded buffer each, never a thread, and cannot delay a
//! client whose request is complete:
//!
//! - the socket has mode 0600 whatever the umask: it is bound under a
//!   temporary name, `chmod`ed, then renamed into place;
//! - a peer whose uid (`SO_PEERCRED`) is neither root nor the socket's owner
//!   is answered `permission denied` and closed, before anything is read;
//! - a request line longer than [`MAX_REQUEST`] bytes is refused as soon as it
//!   gets that long; nothing more is read from it;
//! - a connection without a complete request after
//!   [`Limits::request_timeout`] is answered and closed;
//! - at most [`Limits::max_pending`] connections wait for their requests; one
//!   more closes the oldest waiting one;
//! - a reply the client does not read is given up after
//!   [`Limits::reply_timeout`].

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::service::Op;
use crate::{Error, Result};

/// Most bytes a request line may hold, its newline included: 64 KiB. A
/// request is a few hundred bytes (paths are at most 4 KiB).
pub const MAX_REQUEST: usize = 64 << 10;

/// Mode of the control socket.
pub const SOCKET_MODE: u32 = 0o600;

/// The control socket's bounds on clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a client has, from its connect, to send its request line.
    pub request_timeout: Duration,
    /// How long writing a reply may block on a client that does not read it.
    pub reply_timeout: Duration,
    /// Connections waiting for their request lines at once.
    pub max_pending: usize,
    /// Requests served at once (an attach or detach can take seconds).
    pub max_active: usize,
}

impl Default for Limits {
    /// 10 s to send a request, 10 s to take a reply, 256 waiting connections
    /// and 32 requests served at once.
    fn default() -> Self {
        Limits {
            request_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(10),
            max_pending: 256,
            max_active: 32,
        }
    }
}

/// What the bytes a client sent so far amount to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framed {
    /// No newline yet, and still within [`MAX_REQUEST`].
    Incomplete,
    /// A whole line: [`RequestBuf::line`] has it.
    Complete,
    /// The line is longer than [`MAX_REQUEST`] bytes.
    TooLarge,
}

/// The request line of one connection as it arrives. Bytes after the first
/// newline are ignored (one request per connection); never holds more than
/// [`MAX_REQUEST`] bytes.
#[derive(Debug, Default)]
pub struct RequestBuf {
    buf: Vec<u8>,
    state: Option<Framed>,
}

impl RequestBuf {
    /// Adds bytes received. Once the result is `Complete` or `TooLarge`, it
    /// stays so and further bytes are ignored.
    pub fn push(&mut self, data: &[u8]) -> Framed {
        if let Some(done) = self.state {
            return done;
        }
        let (take, newline) = match data.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (data.len(), false),
        };
        let room = MAX_REQUEST - self.buf.len();
        // Without a newline, a full buffer can only become too large.
        if take > room || (!newline && take == room) {
            self.buf = Vec::new();
            self.state = Some(Framed::TooLarge);
            return Framed::TooLarge;
        }
        self.buf.extend_from_slice(&data[..take]);
        if newline {
            self.state = Some(Framed::Complete);
            return Framed::Complete;
        }
        Framed::Incomplete
    }

    /// The client closed its side: a non-empty unterminated line is the
    /// request (as a line reader would take it).
    pub fn finish(&mut self) -> Framed {
        match self.state {
            Some(done) => done,
            None if self.buf.is_empty() => Framed::Incomplete,
            None => {
                self.state = Some(Framed::Complete);
                Framed::Complete
            }
        }
    }

    /// The bytes buffered: the request line once `Complete`.
    pub fn line(&self) -> &[u8] {
        &self.buf
    }
}

/// Parses one request line (trailing newline optional). The error is the
/// reply's text.
pub fn parse_request(line: &[u8]) -> std::result::Result<Op, String> {
    serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))
}

/// The reply line for a failure.
pub fn error_reply(detail: &str) -> Value {
    json!({"ok": false, "error": detail})
}

/// Whether a peer with uid `peer` may use a socket owned by uid `owner`: root,
/// or the owner.
pub fn peer_allowed(peer: u32, owner: u32) -> bool {
    peer == 0 || peer == owner
}

/// Binds the control socket at `sock` with mode [`SOCKET_MODE`]: bound under
/// a temporary name, `chmod`ed, renamed into place, so the path never has any
/// other mode. Replaces whatever is at `sock`.
pub fn bind(sock: &Path) -> Result<UnixListener> {
    let mut tmp = sock.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let ctx = |what: &str, p: &Path| format!("{what} {}", p.display());
    let listener = UnixListener::bind(&tmp).map_err(|e| Error::io(ctx("binding", &tmp), e))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| Error::io(ctx("setting the mode of", &tmp), e))
        .and_then(|()| std::fs::rename(&tmp, sock).map_err(|e| Error::io(ctx("placing", sock), e)));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// A connection waiting for its request line.
struct Pending {
    conn: UnixStream,
    req: RequestBuf,
    deadline: Instant,
}

/// Serves `listener` forever (see the module docs): every complete request
/// line is passed to `handle`, on a thread of its own, and its reply written
/// back as one line.
pub fn serve(
    listener: &UnixListener,
    owner: u32,
    limits: Limits,
    handle: &(dyn Fn(&[u8]) -> Value + Sync),
) -> Result<()> {
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("setting the control socket non-blocking", e))?;
    let active = AtomicUsize::new(0);
    let mut pending: VecDeque<Pending> = VecDeque::new();
    // After running out of descriptors, the listener rests until then.
    let mut accept_after: Option<Instant> = None;
    std::thread::scope(|s| loop {
        let now = Instant::now();
        while pending.front().is_some_and(|p| p.deadline <= now) {
            let p = pending.pop_front().expect("front exists");
            let secs = limits.request_timeout.as_secs_f64();
            reject(p.conn, &format!("no complete request within {secs} s"));
        }
        accept_after = accept_after.filter(|&t| t > now);
        let wake = pending
            .front()
            .map(|p| p.deadline)
            .into_iter()
            .chain(accept_after)
            .min();
        let ready = match wait(listener, accept_after.is_none(), &pending, wake) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("obd device service: poll: {e}");
                return Err(Error::io("polling the control socket", e));
            }
        };
        // Read what arrived; hand complete requests over (back to front, so
        // removing keeps the indices of those not yet looked at).
        for i in (0..pending.len()).rev() {
            if !ready.conns[i] {
                continue;
            }
            match read_some(&mut pending[i]) {
                Got::Waiting | Got::Framed(Framed::Incomplete) => {}
                Got::Gone => drop(pending.remove(i)),
                Got::Framed(Framed::TooLarge) => {
                    let p = pending.remove(i).expect("index in range");
                    reject(
                        p.conn,
                        &format!("request larger than {MAX_REQUEST} bytes; refused"),
                    );
                }
                Got::Framed(Framed::Complete) => {
                    let p = pending.remove(i).expect("index in range");
                    start(s, p, &active, limits, handle);
                }
            }
        }
        if ready.listener {
            accept_after = accept_all(listener, owner, limits, &mut pending);
        }
    })
}

/// Which of the listener and the pending connections can be read.
struct Ready {
    listener: bool,
    conns: Vec<bool>,
}

fn wait(
    listener: &UnixListener,
    accepting: bool,
    pending: &VecDeque<Pending>,
    wake: Option<Instant>,
) -> io::Result<Ready> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(pending.len() + 1);
    for p in pending {
        fds.push(PollFd::new(&p.conn, PollFlags::IN));
    }
    if accepting {
        fds.push(PollFd::new(listener, PollFlags::IN));
    }
    let timeout = wake.map(|t| {
        let d = t.saturating_duration_since(Instant::now());
        Timespec {
            tv_sec: d.as_secs() as i64,
            tv_nsec: d.subsec_nanos() as i64,
        }
    });
    match poll(&mut fds, timeout.as_ref()) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => {
            return Ok(Ready {
                listener: false,
                conns: vec![false; pending.len()],
            })
        }
        Err(e) => return Err(e.into()),
    }
    // Errors and hang-ups count as readable: the read reports them.
    let ready = |f: &PollFd<'_>| !f.revents().is_empty();
    Ok(Ready {
        listener: accepting && fds.last().is_some_and(ready),
        conns: fds[..pending.len()].iter().map(ready).collect(),
    })
}

/// What reading a waiting connection came to.
enum Got {
    /// Its request is still incomplete.
    Waiting,
    /// See [`Framed`].
    Framed(Framed),
    /// The client closed (or broke) the connection without a request.
    Gone,
}

/// Reads what `p`'s client has sent, up to the end of its request line.
fn read_some(p: &mut Pending) -> Got {
    let mut chunk = [0u8; 8192];
    loop {
        match p.conn.read(&mut chunk) {
            Ok(0) => {
                return match p.req.finish() {
                    Framed::Incomplete => Got::Gone,
                    done => Got::Framed(done),
                }
            }
            Ok(n) => match p.req.push(&chunk[..n]) {
                Framed::Incomplete => {}
                done => return Got::Framed(done),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Got::Waiting,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Got::Gone,
        }
    }
}

/// Accepts every waiting connection. Returns when to try again if the
/// process ran out of descriptors with no waiting connection to close.
fn accept_all(
    listener: &UnixListener,
    owner: u32,
    limits: Limits,
    pending: &mut VecDeque<Pending>,
) -> Option<Instant> {
    loop {
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                match pending.pop_front() {
                    Some(p) => {
                        reject(p.conn, "the service is out of file descriptors");
                        continue;
                    }
                    None => {
                        tracing::warn!("obd device service: accept: {e}");
                        return Some(Instant::now() + Duration::from_millis(100));
                    }
                }
            }
            Err(e) => {
                tracing::warn!("obd device service: accept: {e}");
                return None;
            }
        };
        let peer = match rustix::net::sockopt::socket_peercred(&conn) {
            Ok(c) => c.uid.as_raw(),
            Err(e) => {
                reject(conn, &format!("cannot read the peer's credentials: {e}"));
                continue;
            }
        };
        if !peer_allowed(peer, owner) {
            tracing::warn!("obd device service: refused a client with uid {peer}");
            reject(
                conn,
                &format!(
                    "permission denied: uid {peer} is neither root nor the socket's owner (uid {owner})"
                ),
            );
            continue;
        }
        if conn.set_nonblocking(true).is_err() {
            continue;
        }
        if pending.len() >= limits.max_pending {
            let oldest = pending.pop_front().expect("max_pending > 0");
            reject(
                oldest.conn,
                &format!(
                    "the service is busy: {} connections are waiting to send requests",
                    limits.max_pending
                ),
            );
        }
        pending.push_back(Pending {
            conn,
            req: RequestBuf::default(),
            deadline: Instant::now() + limits.request_timeout,
        });
    }
}

/// Serves `p`'s complete request on a thread of its own, or refuses it when
/// `max_active` requests are being served.
fn start<'s, 'e>(
    s: &'s std::thread::Scope<'s, 'e>,
    p: Pending,
    active: &'e AtomicUsize,
    limits: Limits,
    handle: &'e (dyn Fn(&[u8]) -> Value + Sync),
) {
    if active.fetch_add(1, Ordering::AcqRel) >= limits.max_active {
        active.fetch_sub(1, Ordering::AcqRel);
        let n = limits.max_active;
        reject(
            p.conn,
            &format!("the service is busy: {n} requests are being served"),
        );
        return;
    }
    struct Done<'a>(&'a AtomicUsize);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    // Counted from here: also when the thread cannot start (the closure,
    // and the guard in it, are dropped then).
    let done = Done(active);
    let serve = move || {
        let _done = done;
        let reply = handle(p.req.line());
        let conn = p.conn;
        if conn.set_nonblocking(false).is_ok()
            && conn.set_write_timeout(Some(limits.reply_timeout)).is_ok()
        {
            let _ = writeln!(&conn, "{reply}");
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("obd-control".into())
        .spawn_scoped(s, serve)
    {
        // The connection is closed with the closure: no reply.
        tracing::error!("obd device service: cannot start a thread for a request: {e}");
    }
}

/// Answers `conn` with an error, without blocking, and closes it.
fn reject(conn: UnixStream, detail: &str) {
    let _ = conn.set_nonblocking(true);
    let _ = writeln!(&conn, "{}", error_reply(detail));
}

/// The uid owning the socket file at `sock`.
pub fn socket_owner(sock: &Path) -> Result<u32> {
    std::fs::metadata(sock)
        .map(|m| m.uid())
        .map_err(|e| Error::io(format!("reading {}", sock.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_and_the_owner_may_connect() {
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(65534, 1000));
        assert!(!peer_allowed(1000, 0));
        assert!(peer_allowed(0, 0));
    }

    #[test]
    fn a_line_is_framed_whatever_the_chunks() {
        let line = br#"{"op":"ping"}"#;
        let mut r = RequestBuf::default();
        assert_eq!(r.push(&line[..3]), Framed::Incomplete);
        assert_eq!(r.push(&line[3..]), Framed::Incomplete);
        assert_eq!(r.push(b"\n{\"op\":\"list\"}\n"), Framed::Complete);
        assert_eq!(r.line(), b"{\"op\":\"ping\"}\n");
        assert_eq!(r.push(b"more"), Framed::Complete);
        assert!(matches!(parse_request(r.line()), Ok(Op::Ping)));
        // Unterminated, then the client closes: the bytes are the request.
        let mut r = RequestBuf::default();
        r.push(line);
        assert_eq!(r.finish(), Framed::Complete);
        assert_eq!(r.line(), line);
        assert_eq!(RequestBuf::default().finish(), Framed::Incomplete);
    }

    #[test]
    fn the_size_cap_is_exact() {
        // MAX_REQUEST bytes with the newline: accepted.
        let mut r = RequestBuf::default();
        let mut line = vec![b' '; MAX_REQUEST - 1];
        line.push(b'\n');
        assert_eq!(r.push(&line), Framed::Complete);
        assert_eq!(r.line().len(), MAX_REQUEST);
        // One more byte: refused, and nothing is kept.
        let mut r = RequestBuf::default();
        assert_eq!(r.push(&vec![b' '; MAX_REQUEST - 1]), Framed::Incomplete);
        assert_eq!(r.push(b" "), Framed::TooLarge);
        assert_eq!(r.line(), b"");
        assert_eq!(r.push(b"\n"), Framed::TooLarge);
        assert_eq!(r.finish(), Framed::TooLarge);
    }

    #[test]
    fn bad_requests_are_errors() {
        assert_eq!(
            parse_request(b"{\"op\":\"fly\"}").unwrap_err(),
            "bad request: unknown variant `fly`, expected one of `attach`, `detach`, `list`, `ping` at line 1 column 11"
        );
        assert!(parse_request(b"\xff\n").is_err());
        assert!(parse_request(b"").is_err());
    }
}
