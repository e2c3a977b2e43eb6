//! The control socket (`--control PATH`, or `$RUNTIME_DIRECTORY/herder.sock` under systemd):
//! a unix stream socket, mode 0600, where `herder status|reload|scale|stop` talk to a running
//! herder. Every connection's peer credentials are checked (SO_PEERCRED: root or herder's own
//! uid).
//!
//! The protocol is one JSON object per line each way, versioned by `"v"`:
//! `{"v":1,"cmd":"status"}`, `{"v":1,"cmd":"reload","wait":true}`, `{"v":1,"cmd":"scale","to":4}`
//! (or `"by":-1`), `{"v":1,"cmd":"stop","force":false}`, `{"v":1,"cmd":"upgrade","wait":true}`
//! (answered by the new image when it waits); the answer is `{"v":1,"ok":true,…}` or
//! `{"v":1,"ok":false,"error":"…"}`. A bad request gets an error answer, never a crash; requests
//! are bounded in size ([`MAX_LINE`]) and time ([`READ_TIMEOUT`]), answers in time
//! ([`WRITE_TIMEOUT`]: a client that never reads is dropped), connections in number
//! ([`MAX_CONNECTIONS`], accepted by [`crate::serve`]). As with `/status`, every answer comes
//! from the event loop, over a channel.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::pool::MAX_WORKERS;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::serve::{self, Bounds, Delivered};

/// The `"v"` of every request and answer.
pub const PROTOCOL_VERSION: u64 = 1;
/// The longest request line, newline included.
pub const MAX_LINE: usize = 4096;
/// Live connections at most; one more evicts the oldest that has not sent its request, or the
/// oldest of all. Operators run one client at a time: a few `reload --wait` beside a
/// `status --watch` fit, and sixteen answers being written cost a few MB at worst.
pub const MAX_CONNECTIONS: usize = 16;
/// From accept to a complete request line; then the client gets an error answer.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// For writing the answer: a client that does not read it by then is dropped, with the
/// answer, so it holds neither a connection nor herder's memory.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("--control {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    #[error("--control {path}: exists and is not a socket; refusing to remove it")]
    NotASocket { path: String },
    #[error("--control {path}: another herder is listening there")]
    InUse { path: String },
}

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Status,
    Reload {
        wait: bool,
    },
    Scale(Scale),
    Stop {
        force: bool,
    },
    /// `herder upgrade`: re-exec herder in place; with `wait`, the new image answers.
    Upgrade {
        wait: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    To(usize),
    By(i64),
}

/// A request for the event loop, with where to put the answer (for `reload --wait`, later).
pub struct Request {
    pub command: Command,
    pub reply: oneshot::Sender<Value>,
    /// The client's connection, for an answer that a later image gives (`upgrade --wait`).
    pub conn: Option<RawFd>,
}

pub fn error(msg: impl std::fmt::Display) -> Value {
    json!({"v": PROTOCOL_VERSION, "ok": false, "error": msg.to_string()})
}

pub fn ok(mut v: Value) -> Value {
    v["v"] = json!(PROTOCOL_VERSION);
    v["ok"] = json!(true);
    v
}

/// Parses one request line.
pub fn parse(line: &str) -> Result<Command, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    match v.get("v").and_then(Value::as_u64) {
        Some(PROTOCOL_VERSION) => {}
        Some(other) => {
            return Err(format!(
                "protocol version {other} is not supported (this herder speaks {PROTOCOL_VERSION})"
            ))
        }
        None => return Err("missing \"v\" (protocol version)".into()),
    }
    let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    match v.get("cmd").and_then(Value::as_str) {
        Some("status") => Ok(Command::Status),
        Some("reload") => Ok(Command::Reload { wait: flag("wait") }),
        Some("stop") => Ok(Command::Stop {
            force: flag("force"),
        }),
        Some("upgrade") => Ok(Command::Upgrade { wait: flag("wait") }),
        Some("scale") => match (
            v.get("to").and_then(Value::as_u64),
            v.get("by").and_then(Value::as_i64),
        ) {
            (Some(0), _) => Err("scale: the pool needs at least 1 worker".into()),
            (Some(n), None) if n <= MAX_WORKERS as u64 => Ok(Command::Scale(Scale::To(n as usize))),
            (None, Some(d)) if d.unsigned_abs() <= MAX_WORKERS as u64 => {
                Ok(Command::Scale(Scale::By(d)))
            }
            _ => Err(format!(
                "scale: give \"to\": N (1..{MAX_WORKERS}) or \"by\": ±N"
            )),
        },
        Some(other) => Err(format!("unknown command '{other}'")),
        None => Err("missing \"cmd\"".into()),
    }
}

/// The default path: `$RUNTIME_DIRECTORY/herder.sock` (systemd's RuntimeDirectory=; the first
/// one if several).
pub fn default_path() -> Option<PathBuf> {
    let dirs = std::env::var_os("RUNTIME_DIRECTORY")?;
    let first = std::env::split_paths(&dirs).next()?;
    Some(first.join("herder.sock"))
}

/// Binds the socket, mode 0600, replacing a stale one. Runs during setup (single-threaded),
/// so the umask change cannot race another thread.
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, ControlError> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display().to_string();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ControlError::NotASocket { path: shown });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse { path: shown });
        }
        let _ = std::fs::remove_file(path);
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    bound.map_err(|source| ControlError::Bind {
        path: shown,
        source,
    })
}

/// Accepts control connections until the runtime ends. There is no deadline on a whole
/// connection: `reload --wait` waits for as long as the reload takes.
pub async fn serve(listener: UnixListener, tx: mpsc::Sender<Request>) {
    let bounds = Bounds {
        what: "control",
        connections: MAX_CONNECTIONS,
        deadline: None,
    };
    let my_uid = nix::unistd::getuid().as_raw();
    serve::accept_loop(listener, bounds, move |(conn, _), delivered| {
        let tx = tx.clone();
        async move {
            if let Err(e) = handle(conn, tx, my_uid, delivered).await {
                debug!("control connection: {e}");
            }
        }
    })
    .await
}

async fn handle(
    conn: UnixStream,
    tx: mpsc::Sender<Request>,
    my_uid: u32,
    mut delivered: Delivered,
) -> std::io::Result<()> {
    // unix(7) SO_PEERCRED: the credentials of the process that connected, checked first.
    let cred = conn.peer_cred()?;
    let fd = conn.as_raw_fd();
    let (read, mut write) = conn.into_split();
    if cred.uid() != 0 && cred.uid() != my_uid {
        warn!(
            uid = cred.uid(),
            pid = cred.pid(),
            "control connection from pid {} (uid {}) refused: not root or herder's uid",
            cred.pid().unwrap_or(0),
            cred.uid()
        );
        let answer = error(format!(
            "permission denied: uid {} is neither root nor herder's uid",
            cred.uid()
        ));
        return send(&mut write, &answer).await;
    }
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_LINE as u64 + 1);
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    delivered.mark();
    let answer = match read {
        Err(_) => error("timed out waiting for a request line"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) if line.len() > MAX_LINE => {
            error(format!("request longer than {MAX_LINE} bytes"))
        }
        Ok(Ok(0)) => return Ok(()), // connected and left
        Ok(Ok(_)) => match std::str::from_utf8(&line)
            .map_err(|_| "not UTF-8".to_string())
            .and_then(|l| parse(l.trim()))
        {
            Err(e) => error(e),
            Ok(command) => {
                let (reply, rx) = oneshot::channel();
                let request = Request {
                    command,
                    reply,
                    conn: Some(fd),
                };
                if tx.send(request).await.is_err() {
                    error("herder is exiting")
                } else {
                    rx.await.unwrap_or_else(|_| error("herder is exiting"))
                }
            }
        },
    };
    send(&mut write, &answer).await
}

/// Writes the answer line and closes, within [`WRITE_TIMEOUT`].
async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, v: &Value) -> std::io::Result<()> {
    let mut text = v.to_string();
    text.push('\n');
    let write = async {
        w.write_all(text.as_bytes()).await?;
        w.shutdown().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client did not read its answer within {WRITE_TIMEOUT:?}: dropped"),
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        assert_eq!(parse(r#"{"v":1,"cmd":"status"}"#), Ok(Command::Status));
        assert_eq!(
            parse(r#"{"v":1,"cmd":"reload","wait":true}"#),
            Ok(Command::Reload { wait: true })
        );
        assert_eq!(
            parse(r#"{"v":1,"cmd":"reload"}"#),
            Ok(Command::Reload { wait: false })
        );
        assert_eq!(
            parse(r#"{"v":1,"cmd":"scale","to":3}"#),
            Ok(Command::Scale(Scale::To(3)))
        );
        assert_eq!(
            parse(r#"{"v":1,"cmd":"scale","by":-1}"#),
            Ok(Command::Scale(Scale::By(-1)))
        );
        assert_eq!(
            parse(r#"{"v":1,"cmd":"stop","force":true}"#),
            Ok(Command::Stop { force: true })
        );
    }

    #[test]
    fn refuses_bad_requests_with_a_reason() {
        assert!(parse("garbage").unwrap_err().starts_with("not JSON"));
        assert!(parse(r#"{"cmd":"status"}"#)
            .unwrap_err()
            .contains("protocol version"));
        assert!(parse(r#"{"v":2,"cmd":"status"}"#)
            .unwrap_err()
            .contains("not supported"));
        assert!(parse(r#"{"v":1,"cmd":"fly"}"#)
            .unwrap_err()
            .contains("unknown command"));
        assert!(parse(r#"{"v":1,"cmd":"scale","to":0}"#).is_err());
        assert!(parse(r#"{"v":1,"cmd":"scale"}"#).is_err());
        assert!(parse(r#"{"v":1,"cmd":"scale","to":-3}"#).is_err());
    }

    #[test]
    fn an_extreme_scale_is_refused_not_a_panic() {
        // i64::MIN.abs() overflows: a panic, which aborts herder in a release build.
        let line = format!(r#"{{"v":1,"cmd":"scale","by":{}}}"#, i64::MIN);
        assert!(parse(&line).is_err());
        let line = format!(r#"{{"v":1,"cmd":"scale","to":{}}}"#, u64::MAX);
        assert!(parse(&line).is_err());
    }

    /// A request line as the module doc specifies it (and `herder`'s client writes it).
    fn request_line(c: &Command) -> String {
        let mut v = match c {
            Command::Status => json!({"cmd": "status"}),
            Command::Reload { wait } => json!({"cmd": "reload", "wait": wait}),
            Command::Scale(Scale::To(n)) => json!({"cmd": "scale", "to": n}),
            Command::Scale(Scale::By(d)) => json!({"cmd": "scale", "by": d}),
            Command::Stop { force } => json!({"cmd": "stop", "force": force}),
            Command::Upgrade { wait } => json!({"cmd": "upgrade", "wait": wait}),
        };
        v["v"] = json!(PROTOCOL_VERSION);
        v.to_string()
    }

    fn any_command() -> impl proptest::strategy::Strategy<Value = Command> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Command::Status),
            any::<bool>().prop_map(|wait| Command::Reload { wait }),
            any::<bool>().prop_map(|force| Command::Stop { force }),
            any::<bool>().prop_map(|wait| Command::Upgrade { wait }),
            (1usize..=100_000).prop_map(|n| Command::Scale(Scale::To(n))),
            (-100_000i64..=100_000).prop_map(|d| Command::Scale(Scale::By(d))),
        ]
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_on_any_string(line in ".{0,200}") {
            let _ = parse(&line);
        }

        #[test]
        fn parse_never_panics_on_any_json_request(
            cmd in proptest::prop_oneof![
                proptest::strategy::Just("scale".to_string()),
                proptest::strategy::Just("reload".to_string()),
                "[a-z]{0,8}",
            ],
            // The edges too: uniform sampling would never draw i64::MIN.
            to in proptest::prop_oneof![
                proptest::strategy::Just(u64::MAX),
                proptest::num::u64::ANY,
                0u64..200_000,
            ],
            by in proptest::prop_oneof![
                proptest::strategy::Just(i64::MIN),
                proptest::strategy::Just(i64::MAX),
                proptest::num::i64::ANY,
                -200_000i64..200_000,
            ],
            keys in 0u8..4,
        ) {
            let mut v = json!({"v": 1, "cmd": cmd});
            if keys & 1 != 0 { v["to"] = json!(to); }
            if keys & 2 != 0 { v["by"] = json!(by); }
            let _ = parse(&v.to_string());
        }

        #[test]
        fn every_command_survives_the_round_trip(c in any_command(), pretty in proptest::bool::ANY) {
            let line = request_line(&c);
            let line = if pretty {
                serde_json::to_string_pretty(&serde_json::from_str::<Value>(&line).unwrap()).unwrap()
            } else {
                line
            };
            proptest::prop_assert_eq!(parse(&line), Ok(c));
        }
    }
}
