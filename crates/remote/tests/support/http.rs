//! A tiny hand-rolled HTTP/1.1 server and forwarder for registry tests: one
//! request per connection (`Connection: close`), a scriptable handler, and a
//! log of every request it saw.

#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A request as received.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    /// Path and query (or a full URL for proxy-style requests).
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A response to send.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

fn find_header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
    /// A ranged data GET other than the `bytes=0-0` auth probe.
    pub fn is_data_get(&self) -> bool {
        self.method == "GET" && self.header("range").is_some_and(|r| r != "bytes=0-0")
    }
}

impl Resp {
    pub fn new(status: u16) -> Self {
        Resp {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
    pub fn with_header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    pub fn with_body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = b.into();
        self
    }
    fn set_header(&mut self, k: &str, v: String) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
        self.headers.push((k.to_string(), v));
    }
}

/// A start line and its headers.
type Head = (String, Vec<(String, String)>);

fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut first = String::new();
    if r.read_line(&mut first)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "eof in headers",
            ));
        }
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Some((first.trim_end().to_string(), headers)))
}

fn read_body(
    r: &mut impl BufRead,
    headers: &[(String, String)],
    to_eof: bool,
) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if find_header(headers, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut l = String::new();
            r.read_line(&mut l)?;
            let n = usize::from_str_radix(l.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if n == 0 {
                let mut t = String::new();
                while r.read_line(&mut t)? > 2 {
                    t.clear();
                }
                break;
            }
            let mut c = vec![0; n + 2];
            r.read_exact(&mut c)?;
            body.extend_from_slice(&c[..n]);
        }
    } else if let Some(n) = find_header(headers, "content-length") {
        let n: usize = n.parse().unwrap_or(0);
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else if to_eof {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

pub fn read_request(r: &mut impl BufRead) -> io::Result<Option<Req>> {
    let Some((first, headers)) = read_head(r)? else {
        return Ok(None);
    };
    let mut it = first.split(' ');
    let method = it.next().unwrap_or("").to_string();
    let target = it.next().unwrap_or("").to_string();
    let body = read_body(r, &headers, false)?;
    Ok(Some(Req {
        method,
        target,
        headers,
        body,
    }))
}

pub fn read_response(r: &mut impl BufRead, head: bool) -> io::Result<Resp> {
    let (first, headers) =
        read_head(r)?.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no response"))?;
    let status: u16 = first
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
    let body = if head || status == 204 || status == 304 {
        Vec::new()
    } else {
        read_body(r, &headers, true)?
    };
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// Sends `req` to `upstream` (`host:port`) with `path` and returns the whole response.
pub fn forward_to(upstream: &str, path: &str, req: &Req) -> io::Result<Resp> {
    let mut s = TcpStream::connect(upstream)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut out = format!(
        "{} {} HTTP/1.1\r\nHost: {upstream}\r\nConnection: close\r\n",
        req.method, path
    );
    for (k, v) in &req.headers {
        if [
            "host",
            "connection",
            "content-length",
            "transfer-encoding",
            "keep-alive",
        ]
        .iter()
        .any(|h| k.eq_ignore_ascii_case(h))
        {
            continue;
        }
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !req.body.is_empty() || matches!(req.method.as_str(), "POST" | "PUT" | "PATCH") {
        out.push_str(&format!("Content-Length: {}\r\n", req.body.len()));
    }
    out.push_str("\r\n");
    s.write_all(out.as_bytes())?;
    s.write_all(&req.body)?;
    let mut r = BufReader::new(s);
    read_response(&mut r, req.method == "HEAD")
}

/// Sends `req` to `upstream` unchanged.
pub fn forward(upstream: &str, req: &Req) -> io::Result<Resp> {
    forward_to(upstream, &req.target, req)
}

/// Ways to damage a response.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer this status with an empty body.
    Status(u16),
    /// Send the headers and half the body, then reset the connection (RST).
    ResetMidBody,
    /// Send the headers and half the body, then close cleanly.
    Truncate,
    /// Wait this long before answering.
    Delay(Duration),
    /// Shift the `Content-Range` by one byte.
    WrongContentRange,
    /// Drop the `Range` header upstream: a 200 with the whole blob.
    Whole200,
}

/// What a handler wants done with a request.
pub enum Action {
    /// Answer this.
    Reply(Resp),
    /// Forward to `host:port` unchanged.
    Forward(String),
    /// Forward to `host:port` with this path.
    ForwardPath(String, String),
    /// Forward to `host:port`, damaging the response.
    Faulty(String, Fault),
    /// Close without answering.
    Hangup,
}

type Handler = dyn Fn(&Req) -> Action + Send + Sync;

/// A server on 127.0.0.1 with a free port. Stops accepting on drop.
pub struct Server {
    pub addr: String,
    log: Arc<Mutex<Vec<Req>>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    pub fn start(handler: impl Fn(&Req) -> Action + Send + Sync + 'static) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().unwrap().to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (log, handler) = (log.clone(), handler.clone());
                    std::thread::spawn(move || serve(conn, &log, &*handler));
                }
            });
        }
        Server { addr, log, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request seen so far.
    pub fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }

    pub fn count(&self, f: impl Fn(&Req) -> bool) -> usize {
        self.log.lock().unwrap().iter().filter(|r| f(r)).count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr); // wake the accept loop
    }
}

fn serve(conn: TcpStream, log: &Mutex<Vec<Req>>, handler: &Handler) {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let Ok(Some(req)) = read_request(&mut r) else {
        return;
    };
    log.lock().unwrap().push(req.clone());
    let head = req.method == "HEAD";
    let mut w = conn;
    let (resp, fault) = match handler(&req) {
        Action::Reply(r) => (r, None),
        Action::Hangup => return,
        Action::Forward(up) => (forward(&up, &req).unwrap_or_else(bad_gateway), None),
        Action::ForwardPath(up, path) => (
            forward_to(&up, &path, &req).unwrap_or_else(bad_gateway),
            None,
        ),
        Action::Faulty(up, f) => match f {
            Fault::Status(s) => (Resp::new(s), None),
            Fault::Delay(d) => {
                std::thread::sleep(d);
                (forward(&up, &req).unwrap_or_else(bad_gateway), None)
            }
            Fault::Whole200 => {
                let mut q = req.clone();
                q.headers.retain(|(k, _)| !k.eq_ignore_ascii_case("range"));
                (forward(&up, &q).unwrap_or_else(bad_gateway), None)
            }
            Fault::WrongContentRange => {
                let mut resp = forward(&up, &req).unwrap_or_else(bad_gateway);
                if let Some(cr) = resp.header("content-range").map(str::to_string) {
                    let shifted = shift_content_range(&cr);
                    resp.set_header("Content-Range", shifted);
                }
                (resp, None)
            }
            f => (forward(&up, &req).unwrap_or_else(bad_gateway), Some(f)),
        },
    };
    let _ = write_response(&mut w, &resp, head, fault);
}

fn bad_gateway(e: io::Error) -> Resp {
    Resp::new(502).with_body(e.to_string())
}

fn shift_content_range(cr: &str) -> String {
    // "bytes a-b/t" -> "bytes a+1-b+1/t"
    let rest = cr.trim_start_matches("bytes").trim();
    let (range, total) = rest.split_once('/').unwrap_or((rest, "*"));
    let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
    let a: u64 = a.parse().unwrap_or(0);
    let b: u64 = b.parse().unwrap_or(0);
    format!("bytes {}-{}/{total}", a + 1, b + 1)
}

fn reason(s: u16) -> &'static str {
    match s {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        206 => "Partial Content",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Whatever",
    }
}

fn write_response(
    w: &mut TcpStream,
    resp: &Resp,
    head: bool,
    fault: Option<Fault>,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nConnection: close\r\n",
        resp.status,
        reason(resp.status)
    );
    let mut has_len = false;
    for (k, v) in &resp.headers {
        if ["connection", "transfer-encoding", "keep-alive"]
            .iter()
            .any(|h| k.eq_ignore_ascii_case(h))
        {
            continue;
        }
        if k.eq_ignore_ascii_case("content-length") {
            if head {
                has_len = true;
            } else {
                continue;
            }
        }
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !head && !has_len {
        out.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
    }
    out.push_str("\r\n");
    w.write_all(out.as_bytes())?;
    if head {
        return Ok(());
    }
    match fault {
        Some(Fault::ResetMidBody) => {
            w.write_all(&resp.body[..resp.body.len() / 2])?;
            w.flush()?;
            set_linger_zero(w);
            // Dropping the socket now sends RST.
        }
        Some(Fault::Truncate) => {
            w.write_all(&resp.body[..resp.body.len() / 2])?;
            w.flush()?;
            let _ = w.shutdown(Shutdown::Both);
        }
        _ => {
            w.write_all(&resp.body)?;
            w.flush()?;
        }
    }
    Ok(())
}

fn set_linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// A port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
