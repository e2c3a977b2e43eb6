//! Logs: `tracing` to stderr, or to the journal with structured fields when stderr is the
//! journal (systemd.exec(5) JOURNAL_STREAM). `HERDER_LOG` sets the filter (default `info`).
//! Never stdout: that belongs to the workers.
//!
//! The filter is `tracing_subscriber`'s `Targets` (`info`, `debug`, `herder=debug,warn`), not
//! `EnvFilter`: no regex engine in a process whose memory is counted in single megabytes.

use std::os::fd::AsRawFd;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, Registry};

/// Whether fd 2 is the stream systemd connected to the journal ("DEV:INODE").
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr().as_raw_fd()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

pub fn init() {
    let default = || Targets::new().with_default(tracing::Level::INFO);
    let filter = match std::env::var("HERDER_LOG") {
        Ok(spec) => spec.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("herder: HERDER_LOG={spec}: {e}; using info");
            default()
        }),
        Err(_) => default(),
    };
    if stderr_is_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            // Event fields become journal fields HERDER_SLOT=, HERDER_PID=, …
            let journald = journald
                .with_syslog_identifier("herder".into())
                .with_field_prefix(Some("HERDER".into()));
            Registry::default().with(filter).with(journald).init();
            return;
        }
    }
    let stderr = fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false);
    Registry::default().with(filter).with(stderr).init();
}
