//! `herder upgrade`: herder re-executes its own binary in place — the same PID, the same
//! sockets, the same running workers — the way Einhorn and HAProxy's master do, so that a
//! package upgrade needs no restart of anything.
//!
//! This module owns the crossing: the [`State`] document (a versioned, tolerant JSON in a
//! sealed memfd the new image inherits), the preflight that asks the new binary whether it can
//! resume this format, and the exec itself with its fd plan and signal mask. It never decides
//! *whether* to upgrade (the supervisor does) and never touches the pool's logic (it carries
//! `pool::PoolSnapshot` as data).
//!
//! The exec keeps every fd the new image needs (listeners, `--reuseport` siblings, health and
//! control sockets, every worker's notify socket, clients waiting for the answer) by clearing
//! FD_CLOEXEC on exactly those; everything else closes. Every signal is blocked across it, and
//! the new image unblocks only once its handlers are installed, so a SIGCHLD or HUP that
//! arrives meanwhile is delivered to it, not lost (signal(7): the mask and pending signals
//! survive execve).

use std::ffi::{CString, OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::pool::PoolSnapshot;

/// The state format this herder writes, and the oldest it can still read.
pub const FORMAT: u32 = 1;
pub const OLDEST_FORMAT: u32 = 1;

/// The environment variable that hands the state fd to the new image (read and unset first
/// thing in `main`; never an option name).
pub const STATE_FD_VAR: &str = "HERDER_UPGRADE_STATE_FD";

/// How long the preflight may take: a binary that cannot say whether it resumes this format
/// within this is not one to exec.
pub const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest state document read back (a pool of 100,000 workers is ~30 MB of JSON).
const MAX_STATE: u64 = 256 << 20;

/// A listening socket as it crosses (the fd number stays the same across exec).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ListenerState {
    pub fd: RawFd,
    pub name: String,
    pub display: String,
    pub owned_path: Option<PathBuf>,
    pub reusable: bool,
}

/// A worker's notify socket: its fd and the address the worker was given.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NotifyState {
    pub worker: u64,
    pub fd: RawFd,
    pub address: String,
}

/// Everything the new image needs that is not in its command line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    pub format: u32,
    /// The version of the image that wrote it.
    pub from_version: String,
    /// CLOCK_MONOTONIC when the pool snapshot was taken (its instants are relative to it).
    pub taken_monotonic_ns: u64,
    pub pool: PoolSnapshot,
    pub listeners: Vec<ListenerState>,
    pub reuseport: bool,
    /// Per slot: the `--reuseport` siblings (slot 0 uses the listeners themselves).
    pub siblings: Vec<Option<Vec<RawFd>>>,
    /// Per listener: its SO_REUSEPORT group's kernel order (socket inodes; whether known).
    /// Missing (an older image): rebuilt from the slots.
    pub orders: Vec<Option<(Vec<u64>, bool)>>,
    /// Removed slots' siblings still held by old workers: (worker ids, (listener, fd)).
    pub retired: Vec<crate::listen::RetiredParts<RawFd>>,
    pub health_fd: Option<RawFd>,
    pub control_fd: Option<RawFd>,
    pub control_path: Option<PathBuf>,
    /// `--agent-listen`: the agent's socket.
    pub agent_listener: Option<ListenerState>,
    /// The directory of the workers' notify sockets, or the abstract prefix.
    pub notify_dir: Option<PathBuf>,
    pub notify_prefix: Option<String>,
    pub notify: Vec<NotifyState>,
    /// What systemd gave the first image (it unset them from its environment).
    pub notify_socket: Option<String>,
    pub watchdog_usec: Option<String>,
    pub watchdog_pid: Option<String>,
    /// `FDSTORE` (systemd ≥ 254): the fd store the sockets are kept in.
    pub fdstore: Option<String>,
    /// RLIMIT_NOFILE as the first image found it (the workers' limit).
    pub nofile: Option<(u64, u64)>,
    /// Clients of `herder upgrade --wait`, answered by the new image.
    pub waiters: Vec<RawFd>,
    /// Upgrades before this one (and those that failed), and the last (unix seconds, from which
    /// version).
    pub upgrades: u64,
    pub upgrades_failed: u64,
    pub last_upgrade: Option<(u64, String)>,
}

impl State {
    /// Every fd the new image must inherit.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut out: Vec<RawFd> = self.listeners.iter().map(|l| l.fd).collect();
        out.extend(self.siblings.iter().flatten().flatten());
        out.extend(
            self.retired
                .iter()
                .flat_map(|(_, fds)| fds.iter().map(|(_, fd)| *fd)),
        );
        out.extend(self.health_fd);
        out.extend(self.control_fd);
        out.extend(self.agent_listener.iter().map(|l| l.fd));
        out.extend(self.notify.iter().map(|n| n.fd));
        out.extend(&self.waiters);
        out
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `Instant` reads, which goes on across exec.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The moment the snapshot was taken, on this image's clock (`now` read at the same time as
/// `now_ns`).
pub fn taken_at(state: &State, now: Instant, now_ns: u64) -> Instant {
    let ago = Duration::from_nanos(now_ns.saturating_sub(state.taken_monotonic_ns));
    now.checked_sub(ago).unwrap_or(now)
}

/// The state in a memfd, sealed against any change, positioned at its start.
pub fn write_state(state: &State) -> std::io::Result<OwnedFd> {
    let text = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    let fd = nix::sys::memfd::memfd_create(
        c"herder-upgrade-state",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC
            | nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(&text)?;
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(0))?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on an fd we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file.into())
}

/// Reads the state the previous image left at `fd` (and closes it).
pub fn read_state(fd: RawFd) -> Result<State, String> {
    // SAFETY: the fd number came from our own environment, put there by the previous image
    // for us alone; fstat below proves it is open.
    if nix::sys::stat::fstat(fd).is_err() {
        return Err(format!("{STATE_FD_VAR}={fd}: not an open fd"));
    }
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut text = Vec::new();
    file.take(MAX_STATE)
        .read_to_end(&mut text)
        .map_err(|e| format!("cannot read the upgrade state: {e}"))?;
    let state: State = serde_json::from_slice(&text)
        .map_err(|e| format!("the upgrade state is not valid: {e}"))?;
    if !(OLDEST_FORMAT..=FORMAT).contains(&state.format) {
        return Err(format!(
            "upgrade state format {} (this herder reads {OLDEST_FORMAT}..={FORMAT})",
            state.format
        ));
    }
    Ok(state)
}

/// `herder --upgrade-check FORMAT`: whether this binary resumes that format.
pub fn check(format: u32) -> Result<(), String> {
    if (OLDEST_FORMAT..=FORMAT).contains(&format) {
        Ok(())
    } else {
        Err(format!(
            "cannot resume upgrade state format {format} (this herder reads {OLDEST_FORMAT}..={FORMAT})"
        ))
    }
}

/// The path herder was started from, absolute (`argv[0]` against the start directory, or found
/// in PATH): after a package upgrade that path holds the new binary, while /proc/self/exe is
/// the deleted old one. Symlinks are kept, not resolved.
pub fn own_path(argv0: &OsStr) -> Option<PathBuf> {
    // `./herder` from /srv is /srv/herder: `.` components say nothing.
    let tidy = |p: PathBuf| -> PathBuf {
        p.components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect()
    };
    own_path_raw(argv0).map(tidy)
}

fn own_path_raw(argv0: &OsStr) -> Option<PathBuf> {
    let p = Path::new(argv0);
    if p.as_os_str().as_bytes().contains(&b'/') {
        return if p.is_absolute() {
            Some(p.to_path_buf())
        } else {
            std::env::current_dir().ok().map(|d| d.join(p))
        };
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(p))
        .find(|c| c.is_file())
        .and_then(|c| {
            if c.is_absolute() {
                Some(c)
            } else {
                std::env::current_dir().ok().map(|d| d.join(c))
            }
        })
}

/// Runs `exe --upgrade-check FORMAT ARGS…` and says whether it can take over. Blocks the loop
/// for at most [`PREFLIGHT_TIMEOUT`] (a binary that hangs is killed): the child is reaped here,
/// synchronously, before the loop's reaper can run again.
pub fn preflight(exe: &Path, args: &[OsString]) -> Result<(), String> {
    let mut child = Command::new(exe)
        .arg("--upgrade-check")
        .arg(FORMAT.to_string())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let deadline = Instant::now() + PREFLIGHT_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => {
                // Polling a child we just started, for at most a few seconds; herder's own
                // loop is paused meanwhile by design (see above).
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not answer the upgrade check within {PREFLIGHT_TIMEOUT:?}",
                    exe.display()
                ));
            }
            Err(e) => return Err(format!("upgrade check of {}: {e}", exe.display())),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = (&mut e).take(4096).read_to_string(&mut err);
    }
    let why = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().trim_start_matches("herder: ").to_string())
        .unwrap_or_else(|| format!("it exited with {status}"));
    Err(format!("{} refused the upgrade: {why}", exe.display()))
}

fn set_cloexec(fd: RawFd, on: bool) {
    // SAFETY: F_GETFD/F_SETFD on an fd number; a closed one fails harmlessly.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            let flags = if on {
                flags | libc::FD_CLOEXEC
            } else {
                flags & !libc::FD_CLOEXEC
            };
            libc::fcntl(fd, libc::F_SETFD, flags);
        }
    }
}

/// Replaces this process with `exe`, keeping `keep` and the `state` fd open and every signal
/// blocked. Returns only when execve failed: then the fds are close-on-exec again and the
/// signal mask is as it was, and the old image carries on.
pub fn exec(exe: &Path, args: &[OsString], keep: &[RawFd], state: &OwnedFd) -> std::io::Error {
    let cstr = |b: &[u8]| CString::new(b.to_vec()).unwrap_or_default();
    let path = cstr(exe.as_os_str().as_bytes());
    let argv: Vec<CString> = std::iter::once(exe.as_os_str().to_os_string())
        .chain(args.iter().cloned())
        .map(|a| cstr(&a.into_vec()))
        .collect();
    let mut envp: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != STATE_FD_VAR)
        .map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            cstr(&kv)
        })
        .collect();
    envp.push(cstr(
        format!("{STATE_FD_VAR}={}", state.as_raw_fd()).as_bytes(),
    ));
    let argv_p: Vec<*const libc::c_char> = argv
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_p: Vec<*const libc::c_char> = envp
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let all: Vec<RawFd> = keep.iter().copied().chain([state.as_raw_fd()]).collect();
    for &fd in &all {
        set_cloexec(fd, false);
    }
    // SAFETY: plain sigset manipulation; execve with NUL-terminated arrays that outlive it.
    let err = unsafe {
        let mut block: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut block);
        libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old);
        libc::execve(path.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr());
        let err = std::io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        err
    };
    for &fd in &all {
        set_cloexec(fd, true);
    }
    err
}

/// A build tag stamped into a copy of the binary after the build (tests/stamp-build-tag.py,
/// packaging): the 20-byte marker, then up to 28 bytes of tag, NUL-padded. `#[used]` and a
/// volatile read keep the bytes in the binary and stop the compiler from folding them.
#[used]
static BUILD_TAG: [u8; 48] =
    *b"@@herder-build-tag@@\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
const MARKER_LEN: usize = 20;

/// herder's version: the package version, with the stamped build tag if there is one
/// (`0.1.0+two`).
pub fn version() -> String {
    // SAFETY: a read of a static we own.
    let raw: [u8; 48] = unsafe { std::ptr::read_volatile(&BUILD_TAG) };
    let tag: Vec<u8> = raw[MARKER_LEN..]
        .iter()
        .copied()
        .take_while(|&b| b != 0)
        .filter(|b| b.is_ascii_graphic())
        .collect();
    let base = env!("CARGO_PKG_VERSION");
    if tag.is_empty() {
        base.to_string()
    } else {
        format!("{base}+{}", String::from_utf8_lossy(&tag))
    }
}

/// Writes one answer line on a connection some task still owns (not closing it), within a
/// few tries: the line is short and the socket's buffer empty.
pub fn write_line(fd: RawFd, answer: &serde_json::Value) {
    let mut text = answer.to_string().into_bytes();
    text.push(b'\n');
    let mut done = 0;
    for _ in 0..16 {
        if done == text.len() {
            break;
        }
        // SAFETY: write(2) from a live buffer to an fd number that stays open meanwhile.
        let n = unsafe { libc::write(fd, text[done..].as_ptr().cast(), text.len() - done) };
        if n <= 0 {
            break;
        }
        done += n as usize;
    }
}

/// Writes one answer line to a waiting client (an fd inherited from the old image) and closes
/// it; a client that has gone is no matter.
pub fn answer_waiter(fd: RawFd, answer: &serde_json::Value) {
    if nix::sys::stat::fstat(fd).is_err() {
        return;
    }
    // SAFETY: the fd number is one the previous image handed to us in the state, for us alone.
    let sock = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    let _ = sock.set_write_timeout(Some(Duration::from_secs(2)));
    let mut text = answer.to_string();
    text.push('\n');
    let _ = (&sock).write_all(text.as_bytes());
    let _ = sock.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_round_trips_through_a_sealed_memfd() {
        let state = State {
            format: FORMAT,
            from_version: "0.1.0+one".into(),
            listeners: vec![ListenerState {
                fd: 3,
                name: "http".into(),
                display: "127.0.0.1:80".into(),
                owned_path: None,
                reusable: true,
            }],
            waiters: vec![9],
            ..Default::default()
        };
        let fd = write_state(&state).unwrap();
        // Sealed: no write can change it.
        let mut f = std::fs::File::from(fd.try_clone().unwrap());
        assert!(f.write_all(b"x").is_err());
        let raw = fd.as_raw_fd();
        std::mem::forget(fd);
        let back = read_state(raw).unwrap();
        assert_eq!(back.from_version, "0.1.0+one");
        assert_eq!(back.fds(), vec![3, 9]);
    }

    #[test]
    fn formats_are_checked() {
        assert!(check(FORMAT).is_ok());
        assert!(check(FORMAT + 1).unwrap_err().contains("cannot resume"));
        assert!(check(0).is_err());
        assert!(read_state(987_654).is_err());
    }

    #[test]
    fn the_version_is_the_package_version_without_a_tag() {
        assert_eq!(version(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn own_path_is_absolute() {
        assert!(own_path(OsStr::new("sh")).is_some_and(|p| p.is_absolute()));
        assert_eq!(
            own_path(OsStr::new("/usr/bin/herder")),
            Some(PathBuf::from("/usr/bin/herder"))
        );
        let here = own_path(OsStr::new("./x")).unwrap();
        assert!(
            here.is_absolute() && !here.to_string_lossy().contains("/./"),
            "{here:?}"
        );
    }
}
