//! `herder status --watch`: the status table again every second until Ctrl-C, like
//! `pm2 monit` or `watch herder status`. On a terminal each table replaces the last (a plain
//! ANSI clear, no curses); into a pipe or a file, tables follow each other, a blank line
//! between; with `--json`, one status document per line. Each refresh is one control request,
//! so CPU % is over the second since the previous one.
//!
//! It ends with status 0 on SIGINT, SIGTERM or SIGHUP, and when the reader of its output goes
//! away (EPIPE: herder ignores SIGPIPE); a table is never cut in the middle. When herder goes
//! away it says so and exits as `herder status` would (2: nothing listens there any more).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use serde_json::json;

use crate::client::{exchange, table, STATUS_TIMEOUT};

/// How often the table is redrawn.
pub const EVERY: Duration = Duration::from_secs(1);

/// Home and clear the screen (ECMA-48 CUP and ED).
const CLEAR: &str = "\x1b[H\x1b[2J";

/// Set while a table is being written: a stop signal then waits for its end.
static WRITING: AtomicBool = AtomicBool::new(false);
/// A stop signal arrived while writing.
static STOP: AtomicBool = AtomicBool::new(false);
/// stdout is a terminal: end the last table's screen with a newline, so the shell's prompt
/// (after the terminal's `^C`) starts a line of its own.
static TTY: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    if WRITING.load(Ordering::SeqCst) {
        STOP.store(true, Ordering::SeqCst);
    } else {
        if TTY.load(Ordering::SeqCst) {
            // SAFETY: write(2) is async-signal-safe; a failure changes nothing.
            unsafe { libc::write(1, b"\n".as_ptr().cast(), 1) };
        }
        // SAFETY: _exit(2) is async-signal-safe (signal-safety(7)); nothing is half-written,
        // and nothing else needs undoing (the terminal's modes were never changed).
        unsafe { libc::_exit(0) }
    }
}

fn install() {
    let action = SigAction::new(
        SigHandler::Handler(on_stop),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only touches atomics and calls _exit.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

/// Redraws until stopped; the exit status.
pub fn run(path: &Path, json: bool) -> i32 {
    let tty = std::io::stdout().is_terminal();
    TTY.store(tty, Ordering::SeqCst);
    install();
    let mut next = Instant::now();
    for n in 0u64.. {
        let answer = match exchange(path, json!({"cmd": "status"}), Some(STATUS_TIMEOUT)) {
            Ok(a) => a,
            Err((code, why)) if n > 0 => {
                eprintln!("herder: herder went away: {why}");
                return code;
            }
            Err((code, why)) => {
                eprintln!("herder: {why}");
                return code;
            }
        };
        if answer["ok"] != json!(true) {
            eprintln!(
                "herder: {}",
                answer["error"].as_str().unwrap_or("request refused")
            );
            return 1;
        }
        let doc = &answer["status"];
        let text = match (json, tty) {
            (true, _) => format!("{doc}\n"),
            (false, true) => format!("{CLEAR}{}", table(doc)),
            (false, false) if n == 0 => table(doc),
            (false, false) => format!("\n{}", table(doc)),
        };
        if let Some(code) = write(&text) {
            return code;
        }
        next += EVERY;
        let now = Instant::now();
        if next < now {
            next = now; // herder answered late: no burst of catching up
        }
        std::thread::sleep(next - now);
    }
    0
}

/// Writes one table whole; `Some(status)` when the client is to end.
fn write(text: &str) -> Option<i32> {
    WRITING.store(true, Ordering::SeqCst);
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    WRITING.store(false, Ordering::SeqCst);
    match written {
        _ if STOP.load(Ordering::SeqCst) => Some(0),
        Ok(()) => None,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Some(0),
        Err(e) => {
            eprintln!("herder: writing to stdout: {e}");
            Some(1)
        }
    }
}
