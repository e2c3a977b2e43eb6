//! The health endpoint (`--health ADDR`): plain HTTP/1.1 on a socket herder owns, for
//! container probes and scrapers: `/livez`, `/readyz`, `/status` (JSON), `/metrics`; `GET` or
//! `HEAD` (the same status line and headers, no body).
//!
//! Every answer comes from the event loop itself, over a channel, so `/livez` proves the loop
//! is alive (a wedged loop answers nothing and the probe fails). Connections are accepted by
//! [`crate::serve`] and handled in their own tasks, never blocking the loop; hostile clients are
//! bounded: at most [`MAX_CONNECTIONS`] at once (one more evicts the oldest that has not sent
//! its request, so idle and slowloris clients cannot lock a probe out), [`IO_TIMEOUT`] per
//! connection, [`MAX_REQUEST`] bytes of request head. The parser is ours: four fixed routes
//! do not justify an HTTP stack's weight in a process whose memory goal is counted in single
//! megabytes.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::serve::{self, Bounds, Delivered};

/// Live connections at most. Eviction, not this number, keeps probes answered; the number
/// bounds what a flood costs: about 4 KB of herder's memory per idle connection (measured:
/// 512 of them add 2.3 MB of RSS), 13 KB with a full head, so under 7 MB at worst; and 512
/// descriptors — half the common soft limit of 1024, leaving room for the control socket's
/// and the workers' own.
pub const MAX_CONNECTIONS: usize = 512;
/// A connection's whole life, accept to close: a client slower than this is cut.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head read; a longer one is answered 431.
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a probe waits for the event loop before declaring it dead.
const LOOP_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Livez,
    Readyz,
    Status,
    Metrics,
}

/// One HTTP answer, composed by the event loop.
#[derive(Debug)]
pub struct Answer {
    pub code: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Answer {
    pub fn text(code: u16, body: impl Into<String>) -> Answer {
        Answer {
            code,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// A question for the event loop, with where to put the answer.
pub struct Query {
    pub route: Route,
    pub reply: oneshot::Sender<Answer>,
}

/// Accepts probe connections until the runtime ends.
pub async fn serve(listener: TcpListener, tx: mpsc::Sender<Query>) {
    let bounds = Bounds {
        what: "health",
        connections: MAX_CONNECTIONS,
        deadline: Some(IO_TIMEOUT),
    };
    serve::accept_loop(listener, bounds, move |(conn, peer), delivered| {
        let tx = tx.clone();
        async move {
            if let Err(e) = handle(conn, tx, delivered).await {
                debug!(%peer, "health connection from {peer}: {e}");
            }
        }
    })
    .await
}

async fn handle(
    mut conn: TcpStream,
    tx: mpsc::Sender<Query>,
    mut delivered: Delivered,
) -> std::io::Result<()> {
    let head = read_head(&mut conn).await?;
    delivered.mark();
    let Some(head) = head else {
        let answer = Answer::text(431, "request too large\n");
        return respond(&mut conn, answer, false).await;
    };
    let answer = match parse(&head) {
        Err(code) => Answer::text(code, "bad request\n"),
        Ok(route) => ask(&tx, route).await,
    };
    respond(&mut conn, answer, is_head(&head)).await
}

async fn ask(tx: &mpsc::Sender<Query>, route: Route) -> Answer {
    let (reply, rx) = oneshot::channel();
    let dead = || Answer::text(503, "event loop not responding\n");
    if tx.send(Query { route, reply }).await.is_err() {
        return dead();
    }
    match tokio::time::timeout(LOOP_TIMEOUT, rx).await {
        Ok(Ok(a)) => a,
        _ => dead(),
    }
}

/// Reads until the blank line ending the head; `None` when it exceeds [`MAX_REQUEST`].
async fn read_head(conn: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Some(buf)); // half-closed: answer what we have
        }
        // Only the new bytes (and the three before them) can complete the blank line: a
        // client sending a byte at a time must not cost a rescan of the whole head per byte.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        let tail = &buf[from..];
        if tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(buf));
        }
        if buf.len() > MAX_REQUEST {
            return Ok(None);
        }
    }
}

/// The request line: the head up to its first newline, without a trailing CR.
fn request_line(head: &[u8]) -> &[u8] {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The route of a `GET|HEAD <path>[?query] HTTP/1.<digit>` request line; an HTTP status code
/// otherwise (400 malformed, 405 another method, 404 another path).
pub fn parse(head: &[u8]) -> Result<Route, u16> {
    let line = std::str::from_utf8(request_line(head)).map_err(|_| 400u16)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(400);
    };
    let minor = version.strip_prefix("HTTP/1.").unwrap_or_default();
    if minor.len() != 1 || !minor.bytes().all(|b| b.is_ascii_digit()) {
        return Err(400);
    }
    if method != "GET" && method != "HEAD" {
        return Err(405);
    }
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/livez" | "/healthz" => Ok(Route::Livez),
        "/readyz" => Ok(Route::Readyz),
        "/status" => Ok(Route::Status),
        "/metrics" => Ok(Route::Metrics),
        _ => Err(404),
    }
}

/// Whether the request is a `HEAD`: its answer has the status line and headers of the `GET`
/// one, `Content-Length` included, and no body (RFC 9110, 9.3.2) — whatever the status.
fn is_head(head: &[u8]) -> bool {
    request_line(head).starts_with(b"HEAD ")
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

async fn respond(conn: &mut TcpStream, a: Answer, head_only: bool) -> std::io::Result<()> {
    let body = if a.code == 404 {
        "not found: try /livez /readyz /status /metrics\n".to_string()
    } else {
        a.body
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        a.code,
        reason(a.code),
        a.content_type,
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    if !head_only {
        conn.write_all(body.as_bytes()).await?;
    }
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            parse(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(Route::Livez)
        );
        assert_eq!(
            parse(b"GET /readyz?verbose HTTP/1.0\r\n\r\n"),
            Ok(Route::Readyz)
        );
        assert_eq!(parse(b"HEAD /status HTTP/1.1\r\n\r\n"), Ok(Route::Status));
        assert_eq!(parse(b"GET /metrics HTTP/1.1\n\n"), Ok(Route::Metrics));
        assert_eq!(parse(b"GET /nope HTTP/1.1\r\n\r\n"), Err(404));
        assert_eq!(parse(b"POST /livez HTTP/1.1\r\n\r\n"), Err(405));
        assert_eq!(parse(b"\xff\xfe garbage"), Err(400));
        assert_eq!(parse(b""), Err(400));
        assert_eq!(parse(b"GET /livez SPDY/3\r\n\r\n"), Err(400));
        assert_eq!(parse(b"GET /livez HTTP/1.1 extra\r\n\r\n"), Err(400));
        assert_eq!(parse(b"GET /livez HTTP/1.12\r\n\r\n"), Err(400));
        assert_eq!(parse(b"GET  /livez HTTP/1.1\r\n\r\n"), Err(400));
        assert!(is_head(b"HEAD /nope HTTP/1.1\r\n\r\n"));
        assert!(!is_head(b"GET /livez HTTP/1.1\r\nX: HEAD \r\n\r\n"));
    }

    const PATHS: [(&str, Route); 5] = [
        ("/livez", Route::Livez),
        ("/healthz", Route::Livez),
        ("/readyz", Route::Readyz),
        ("/status", Route::Status),
        ("/metrics", Route::Metrics),
    ];

    /// The grammar, written out independently of [`parse`]: the route a request line must
    /// get, if any.
    fn expected(line: &[u8]) -> Option<Route> {
        let line = std::str::from_utf8(line).ok()?;
        let rest = line
            .strip_prefix("GET ")
            .or_else(|| line.strip_prefix("HEAD "))?;
        let (target, version) = rest.rsplit_once(' ')?;
        let digit = version.strip_prefix("HTTP/1.")?;
        if digit.len() != 1 || !digit.as_bytes()[0].is_ascii_digit() || target.contains(' ') {
            return None;
        }
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        PATHS.iter().find(|(p, _)| *p == path).map(|&(_, r)| r)
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_routes_exactly_the_grammar(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)
        ) {
            let got = parse(&bytes).ok();
            proptest::prop_assert_eq!(got, expected(request_line(&bytes)));
        }

        #[test]
        fn every_well_formed_probe_is_routed(
            head in proptest::bool::ANY,
            path in 0..PATHS.len(),
            query in proptest::option::of("[a-zA-Z0-9=&%._?-]{0,20}"),
            minor in 0u8..10,
            crlf in proptest::bool::ANY,
            rest in proptest::collection::vec(proptest::num::u8::ANY, 0..100),
        ) {
            let (p, route) = PATHS[path];
            let method = if head { "HEAD" } else { "GET" };
            let query = query.map(|q| format!("?{q}")).unwrap_or_default();
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut req = format!("{method} {p}{query} HTTP/1.{minor}{eol}").into_bytes();
            req.extend_from_slice(&rest); // whatever the headers, only the line counts
            proptest::prop_assert_eq!(parse(&req), Ok(route));
            proptest::prop_assert_eq!(is_head(&req), head);
        }

        #[test]
        fn a_line_off_the_grammar_is_refused(
            method in "[A-Z]{1,7}",
            path in "/[a-z]{0,8}",
            minor in 0u8..10,
        ) {
            let req = format!("{method} {path} HTTP/1.{minor}\r\n\r\n");
            let known = PATHS.iter().any(|(p, _)| *p == path);
            let result = parse(req.as_bytes());
            if method != "GET" && method != "HEAD" {
                proptest::prop_assert_eq!(result, Err(405));
            } else if !known {
                proptest::prop_assert_eq!(result, Err(404));
            } else {
                proptest::prop_assert!(result.is_ok());
            }
        }
    }
}
