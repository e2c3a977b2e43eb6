//! The client side of the control socket: `herder status`, `reload`, `scale`, `stop`,
//! `upgrade`. Each
//! sends one request line, prints the answer, and exits 0 on success, 1 when herder said no
//! (a failed reload, a refused request), 2 when it cannot reach herder at all. The status
//! table is drawn here; `status --watch` redraws it ([`crate::watch`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::control::{self, PROTOCOL_VERSION};

/// What `herder <subcommand>` asks.
pub enum Ask {
    Status {
        json: bool,
        watch: bool,
    },
    Reload {
        wait: bool,
        timeout: Option<Duration>,
    },
    Scale {
        to: String,
    },
    Stop {
        force: bool,
    },
    Upgrade {
        wait: bool,
        timeout: Option<Duration>,
    },
}

fn fail(code: i32, msg: impl std::fmt::Display) -> ! {
    eprintln!("herder: {msg}");
    std::process::exit(code)
}

fn resolve(path: Option<PathBuf>) -> PathBuf {
    path.or_else(control::default_path).unwrap_or_else(|| {
        fail(
            crate::EXIT_USAGE,
            "no control socket: pass --control PATH (or set RUNTIME_DIRECTORY)",
        )
    })
}

/// Parses `N`, `+N` or `-N`.
fn scale_request(to: &str) -> Value {
    let bad = || -> ! {
        fail(
            crate::EXIT_USAGE,
            format!("scale: '{to}' is not N, +N or -N"),
        )
    };
    if let Some(d) = to.strip_prefix('+') {
        json!({"cmd": "scale", "by": d.parse::<i64>().unwrap_or_else(|_| bad())})
    } else if to.starts_with('-') {
        json!({"cmd": "scale", "by": to.parse::<i64>().unwrap_or_else(|_| bad())})
    } else {
        json!({"cmd": "scale", "to": to.parse::<u64>().unwrap_or_else(|_| bad())})
    }
}

/// Why an exchange with herder failed: the exit status and the message.
pub type Failure = (i32, String);

/// Sends one request, returns the answer.
pub fn exchange(
    path: &Path,
    mut request: Value,
    timeout: Option<Duration>,
) -> Result<Value, Failure> {
    request["v"] = json!(PROTOCOL_VERSION);
    let mut s = UnixStream::connect(path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                "nothing is listening there"
            }
            std::io::ErrorKind::PermissionDenied => "permission denied",
            _ => "cannot connect",
        };
        (
            crate::EXIT_USAGE,
            format!(
                "{}: {why} ({e}); is herder running with --control {}?",
                path.display(),
                path.display()
            ),
        )
    })?;
    let _ = s.set_read_timeout(timeout);
    let line = format!("{request}\n");
    // herder may answer (and close) before reading, e.g. to refuse our uid: the answer is
    // still there to read, so a failed write is not the end.
    let written = s.write_all(line.as_bytes());
    let mut answer = String::new();
    match BufReader::new(&s).read_line(&mut answer) {
        Ok(0) => match written {
            Err(e) => return Err((crate::EXIT_USAGE, format!("{}: {e}", path.display()))),
            Ok(()) => {
                return Err((
                    1,
                    "herder closed the connection without an answer (is it stopping?)".into(),
                ))
            }
        },
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Err((
                1,
                "timed out waiting for herder's answer (the request goes on)".into(),
            ))
        }
        Err(e) => return Err((1, format!("reading the answer: {e}"))),
    }
    serde_json::from_str(&answer).map_err(|_| (1, format!("not an answer: {answer}")))
}

/// How long a status request may take.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(ask: Ask, path: Option<PathBuf>) -> i32 {
    let path = resolve(path);
    let (request, timeout) = match &ask {
        Ask::Status { json, watch: true } => return crate::watch::run(&path, *json),
        Ask::Status { .. } => (json!({"cmd": "status"}), Some(STATUS_TIMEOUT)),
        // Without --wait the answer is immediate; with it, as long as the reload (or --timeout;
        // 0s means do not wait at all: set_read_timeout refuses a zero).
        Ask::Reload { wait: false, .. } => (
            json!({"cmd": "reload", "wait": false}),
            Some(Duration::from_secs(10)),
        ),
        Ask::Reload {
            wait: true,
            timeout,
        } => (
            json!({"cmd": "reload", "wait": true}),
            timeout.map(|t| t.max(Duration::from_millis(1))),
        ),
        Ask::Scale { to } => (scale_request(to), Some(Duration::from_secs(10))),
        // The preflight runs before any answer (up to 5 s); with --wait the new image answers.
        Ask::Upgrade { wait, timeout } => (
            json!({"cmd": "upgrade", "wait": wait}),
            if *wait {
                timeout.map(|t| t.max(Duration::from_millis(1)))
            } else {
                Some(Duration::from_secs(30))
            },
        ),
        Ask::Stop { force } => (
            json!({"cmd": "stop", "force": force}),
            Some(Duration::from_secs(10)),
        ),
    };
    let answer = exchange(&path, request, timeout).unwrap_or_else(|(code, msg)| fail(code, msg));
    if answer["ok"] != json!(true) {
        eprintln!(
            "herder: {}",
            answer["error"].as_str().unwrap_or("request refused")
        );
        return 1;
    }
    match ask {
        Ask::Status { json: true, .. } => out(&format!("{:#}\n", answer["status"])),
        Ask::Status { json: false, .. } => out(&table(&answer["status"])),
        Ask::Reload { wait: true, .. } => println!(
            "reload complete: generation {} is serving",
            answer["generation"]
        ),
        Ask::Reload { wait: false, .. } => {
            println!("reload started: generation {}", answer["generation"])
        }
        Ask::Scale { .. } => println!("pool size: {}", answer["workers"]),
        Ask::Upgrade { wait: true, .. } => println!(
            "upgraded: herder {} pid {} runs the pool",
            text(&answer["version"]),
            text(&answer["pid"])
        ),
        Ask::Upgrade { wait: false, .. } => {
            println!("upgrade started: executing {}", text(&answer["upgrading"]))
        }
        Ask::Stop { force } => println!(
            "{}",
            if force {
                "stopping at once"
            } else {
                "draining"
            }
        ),
    }
    0
}

/// Writes to stdout; a reader that went away (`herder status | head -1`) ends the client
/// quietly, status 0, where `print!` would panic.
fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        fail(1, format!("writing to stdout: {e}"));
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn uptime(v: &Value) -> String {
    let Some(s) = v.as_f64() else {
        return "-".into();
    };
    let s = s as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `steering: client-ip, receiving 0 1 3, steered away 2` (`--reuseport`).
fn steering_line(steer: &serde_json::Map<String, Value>) -> String {
    let slots = steer.get("slots").and_then(Value::as_array);
    let which = |state: &str| -> String {
        let n: Vec<String> = slots
            .into_iter()
            .flatten()
            .enumerate()
            .filter(|(_, s)| s.as_str() == Some(state))
            .map(|(i, _)| i.to_string())
            .collect();
        if n.is_empty() {
            "none".into()
        } else {
            n.join(" ")
        }
    };
    match slots {
        Some(_) => format!(
            "steering: {}, receiving {}, steered away {}\n",
            text(&steer["balance"]),
            which("receiving"),
            which("steered away")
        ),
        None => format!("steering: {}, off\n", text(&steer["balance"])),
    }
}

/// A `pm2 list`-like table of the `/status` document.
pub fn table(st: &Value) -> String {
    let h = &st["herder"];
    let mut out = format!(
        "herder {} pid {}  state {}  generation {}  workers {}/{} ready  restarts {}\n",
        text(&h["version"]),
        text(&h["pid"]),
        text(&h["state"]),
        text(&h["generation"]),
        text(&h["ready_workers"]),
        text(&h["workers"]),
        text(&h["restarts_total"]),
    );
    if let Some(r) = h["last_reload"].as_object() {
        out += &format!(
            "last reload: generation {} {}",
            text(&r["generation"]),
            text(&r["result"])
        );
        if let Some(why) = r.get("reason") {
            out += &format!(": {}", text(why));
        }
        out.push('\n');
    }
    if let Some(u) = h["last_upgrade"].as_object() {
        out += &format!(
            "last upgrade: {} ago, from {}\n",
            uptime(&u["ago_s"]),
            text(&u["from"])
        );
    }
    if !h["gave_up"].is_null() {
        out += &format!("gave up: {}\n", text(&h["gave_up"]));
    }
    for s in st["sockets"].as_array().into_iter().flatten() {
        out += &format!(
            "socket: fd {} {} ({})\n",
            text(&s["fd"]),
            text(&s["address"]),
            text(&s["name"])
        );
    }
    if !h["memory_bytes"].is_null() {
        out += &format!(
            "herder itself: memory {} (RSS)  cpu {} ({}s in all)\n",
            size(&h["memory_bytes"]),
            percent(&h["cpu_percent"]),
            text(&h["cpu_seconds"]),
        );
    }
    if let Some(steer) = st["steering"].as_object() {
        out += &steering_line(steer);
    }
    out += &format!(
        "{:<5} {:<8} {:<9} {:<8} {:>7} {:>7} {:<8} {}\n",
        "SLOT", "PID", "STATE", "UPTIME", "MEM", "CPU", "RESTARTS", "LAST EXIT"
    );
    for s in st["slots"].as_array().into_iter().flatten() {
        out += &format!(
            "{:<5} {:<8} {:<9} {:<8} {:>7} {:>7} {:<8} {}\n",
            text(&s["slot"]),
            text(&s["pid"]),
            text(&s["state"]),
            uptime(&s["uptime_s"]),
            size(&s["memory_bytes"]),
            percent(&s["cpu_percent"]),
            text(&s["restarts"]),
            text(&s["last_exit"]),
        );
    }
    for w in st["other_workers"].as_array().into_iter().flatten() {
        out += &format!(
            "{:<5} {:<8} {:<9} {:<8} {:>7} {:>7} {:<8} {}\n",
            text(&w["slot"]),
            text(&w["pid"]),
            text(&w["state"]),
            uptime(&w["uptime_s"]),
            size(&w["memory_bytes"]),
            percent(&w["cpu_percent"]),
            "",
            "(old generation)"
        );
    }
    let a = &st["agent"];
    if a.is_object() {
        out += &format!(
            "{:<5} {:<8} {:<9} {:<8} {:>7} {:>7} {:<8} {}\n",
            "agent",
            text(&a["pid"]),
            text(&a["state"]),
            uptime(&a["uptime_s"]),
            size(&a["memory_bytes"]),
            percent(&a["cpu_percent"]),
            text(&a["restarts"]),
            text(&a["last_exit"]),
        );
        if !a["socket"].is_null() {
            out += &format!("agent socket: {}\n", text(&a["socket"]));
        }
    }
    out
}

/// Bytes, human-readable in powers of 1024: `512B`, `12.3M`, `1.2G`, `123M`.
fn size(v: &Value) -> String {
    let Some(b) = v.as_u64() else {
        return "-".into();
    };
    let mut x = b as f64;
    let mut unit = 0;
    while x >= 1024.0 && unit < 5 {
        x /= 1024.0;
        unit += 1;
    }
    let suffix = ["B", "K", "M", "G", "T", "P"][unit];
    match unit {
        0 => format!("{b}B"),
        _ if x < 99.95 => format!("{x:.1}{suffix}"),
        _ => format!("{x:.0}{suffix}"),
    }
}

/// CPU in % of one core, one decimal.
fn percent(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |p| format!("{p:.1}%"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_percentages() {
        let s = |n: u64| size(&json!(n));
        assert_eq!(s(512), "512B");
        assert_eq!(s(1536), "1.5K");
        assert_eq!(s(12_900_000), "12.3M");
        assert_eq!(s(1_288_490_189), "1.2G");
        assert_eq!(s(123 << 20), "123M");
        assert_eq!(s(u64::MAX), "16384P");
        assert_eq!(size(&Value::Null), "-");
        assert_eq!(percent(&json!(0.04)), "0.0%");
        assert_eq!(percent(&json!(187.25)), "187.2%");
        assert_eq!(percent(&Value::Null), "-");
    }

    #[test]
    fn the_table_has_mem_and_cpu_columns() {
        let doc = json!({
            "herder": {"version": "0.1.0", "pid": 1, "memory_bytes": 4_300_000,
                       "cpu_seconds": 0.52, "cpu_percent": 0.1},
            "slots": [{"slot": 0, "pid": 42, "state": "ready", "uptime_s": 134.0,
                       "memory_bytes": 12_900_000, "cpu_percent": 3.25, "restarts": 0}],
            "other_workers": [],
        });
        let t = table(&doc);
        assert!(
            t.contains("herder itself: memory 4.1M (RSS)  cpu 0.1% (0.52s in all)"),
            "{t}"
        );
        let rows: Vec<&str> = t.lines().skip_while(|l| !l.starts_with("SLOT")).collect();
        assert_eq!(
            rows[0],
            "SLOT  PID      STATE     UPTIME       MEM     CPU RESTARTS LAST EXIT"
        );
        assert_eq!(
            rows[1],
            "0     42       ready     2m14s      12.3M    3.2% 0        -"
        );
    }
}
