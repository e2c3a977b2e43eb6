//! fork/exec of one worker — the only code that runs between fork and exec.
//!
//! Everything the child needs (argv, envp, the fd plan, credentials) is prepared before
//! `fork`, which runs with every signal blocked; the child then makes only async-signal-safe
//! calls (signal-safety(7)): reset signal dispositions, then the mask, `setpgid`, `dup2` the
//! sockets to 3.., close every other fd, drop privileges, give back the fd limit herder
//! found, set PDEATHSIG (after the credential change, which clears it), write its own pid
//! into the pre-allocated LISTEN_PID/WATCHDOG_PID slots, `execve`. std's `Command` cannot do
//! this: LISTEN_PID must be the child's own pid, known only after fork (catatonit and
//! shellflip patch it in the child the same way), and it no longer resets the signal mask
//! (rust-lang/rust#101077).
//!
//! An exec failure travels back over a close-on-exec pipe (errno), so the parent knows at
//! once whether the worker runs; the failed child `_exit`s 127 (not found) or 126.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::pool::Blame;

#[derive(Debug, Error)]
pub enum SpawnError {
    /// The worker command could not be run: not found, not executable, `--user` refused.
    #[error("{what}: {source}")]
    Exec {
        what: String,
        source: std::io::Error,
        code: i32,
    },
    /// herder could not do its part: pipe, fork, or the child's fd setup.
    #[error("{what}: {source}")]
    Herder {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Errors that say "out of resources", not "this command is broken": the process or system
/// fd table, memory, the process limit.
pub fn is_resource_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN | libc::ENOBUFS)
    )
}

impl SpawnError {
    /// The 126/127-style status a shell would report.
    pub fn code(&self) -> i32 {
        match self {
            SpawnError::Exec { code, .. } => *code,
            SpawnError::Herder { .. } => 126,
        }
    }

    /// Whose failure it is: herder's resources are never counted against the command.
    pub fn blame(&self) -> Blame {
        match self {
            SpawnError::Exec { source, .. } if is_resource_error(source) => Blame::Herder,
            SpawnError::Exec { .. } => Blame::Command,
            SpawnError::Herder { .. } => Blame::Herder,
        }
    }
}

/// Who the workers run as (`--user`, `--group`), resolved before any fork.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
}

/// What every spawn shares: the command, the environment, `/dev/null`.
pub struct Plan {
    argv0: OsString,
    argv: Vec<CString>,
    base_env: Vec<CString>,
    path_dirs: Vec<PathBuf>,
    devnull: OwnedFd,
    creds: Option<Credentials>,
    parent: libc::pid_t,
    /// RLIMIT_NOFILE as herder found it, for the workers (herder raised its own soft limit).
    nofile: Option<libc::rlimit>,
}

/// What differs per worker.
pub struct WorkerEnv<'a> {
    /// The worker's slot (`HERDER_WORKER`), or `None` for the agent (`HERDER_AGENT=1`).
    pub slot: Option<usize>,
    pub fds: &'a [RawFd],
    pub fdnames: &'a str,
    pub notify_socket: &'a str,
    pub watchdog: Option<Duration>,
}

/// Variables herder sets for workers; any inherited copy is dropped from the base environment
/// (and so are herder's own settings, `cli::own_vars`).
const OURS: &[&str] = &[
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "HERDER_WORKER",
    "HERDER_AGENT",
    "HERDER_AGENT_SOCKET",
];

fn cstring(b: &[u8]) -> CString {
    // Arguments and environment come from the OS as C strings: no interior NUL possible.
    CString::new(b.to_vec()).unwrap_or_default()
}

impl Plan {
    /// `nofile`: the RLIMIT_NOFILE workers get back (see [`raise_nofile`]).
    pub fn new(
        command: &[OsString],
        creds: Option<Credentials>,
        nofile: Option<libc::rlimit>,
    ) -> std::io::Result<Plan> {
        let devnull = std::fs::File::open("/dev/null")?.into();
        // herder's own HERDER_* settings stay in herder's environment (an upgrade re-executes
        // it with them) but are not the workers' business: a worker may itself be a herder.
        let settings = crate::cli::own_vars();
        let base_env = std::env::vars_os()
            .filter(|(k, _)| !OURS.iter().any(|o| OsStr::new(o) == k))
            .filter(|(k, _)| !k.to_str().is_some_and(|k| settings.contains(k)))
            .map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                cstring(&kv)
            })
            .collect();
        let path_dirs = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_else(|| vec!["/usr/local/bin".into(), "/usr/bin".into(), "/bin".into()]);
        Ok(Plan {
            argv0: command[0].clone(),
            argv: command.iter().map(|a| cstring(a.as_bytes())).collect(),
            base_env,
            path_dirs,
            devnull,
            creds,
            // SAFETY: getpid has no preconditions.
            parent: unsafe { libc::getpid() },
            nofile,
        })
    }

    /// Adds `NAME=value` to what every process of this plan gets (`HERDER_AGENT_SOCKET`).
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.base_env
            .push(cstring(format!("{name}={value}").as_bytes()));
    }

    /// The program to exec, found like execvp(3) does, but before fork (PATH search
    /// allocates). `Err` when nothing by that name exists: no point forking.
    fn resolve(&self) -> Result<CString, SpawnError> {
        let argv0 = Path::new(&self.argv0);
        if argv0.as_os_str().as_bytes().contains(&b'/') {
            return Ok(cstring(argv0.as_os_str().as_bytes()));
        }
        let mut found_not_exec = None;
        for dir in &self.path_dirs {
            let p = dir.join(argv0);
            let Ok(meta) = std::fs::metadata(&p) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let c = cstring(p.as_os_str().as_bytes());
            // SAFETY: `c` is a valid NUL-terminated string.
            if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 {
                return Ok(c);
            }
            found_not_exec.get_or_insert(c);
        }
        found_not_exec.ok_or_else(|| SpawnError::Exec {
            what: format!("{}: command not found in PATH", argv0.display()),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
            code: 127,
        })
    }
}

/// A `NAME=` buffer with room for a pid, filled in by the child after fork.
struct PidSlot(Vec<u8>);

impl PidSlot {
    fn new(name: &str) -> PidSlot {
        let mut b = format!("{name}=").into_bytes();
        b.resize(b.len() + 21, 0);
        PidSlot(b)
    }

    /// Writes `pid` in decimal after the `=`. Async-signal-safe: no allocation.
    fn fill(&mut self, pid: libc::pid_t) {
        let start = self.0.iter().position(|&c| c == b'=').map_or(0, |i| i + 1);
        let mut digits = [0u8; 20];
        let mut n = pid as u64;
        let mut len = 0;
        loop {
            digits[len] = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for i in 0..len {
            self.0[start + i] = digits[len - 1 - i];
        }
        self.0[start + len] = 0;
    }
}

/// Starts one worker; returns its pid once it has exec'd.
pub fn spawn(plan: &Plan, w: &WorkerEnv<'_>) -> Result<i32, SpawnError> {
    let path = plan.resolve()?;
    let mut env: Vec<CString> = plan.base_env.clone();
    let mut listen_pid = None;
    if !w.fds.is_empty() {
        env.push(cstring(format!("LISTEN_FDS={}", w.fds.len()).as_bytes()));
        env.push(cstring(format!("LISTEN_FDNAMES={}", w.fdnames).as_bytes()));
        listen_pid = Some(PidSlot::new("LISTEN_PID"));
    }
    match w.slot {
        Some(slot) => env.push(cstring(format!("HERDER_WORKER={slot}").as_bytes())),
        None => env.push(cstring(b"HERDER_AGENT=1")),
    }
    env.push(cstring(
        format!("NOTIFY_SOCKET={}", w.notify_socket).as_bytes(),
    ));
    let mut watchdog_pid = None;
    if let Some(iv) = w.watchdog {
        env.push(cstring(
            format!("WATCHDOG_USEC={}", iv.as_micros()).as_bytes(),
        ));
        watchdog_pid = Some(PidSlot::new("WATCHDOG_PID"));
    }
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|c| c.as_ptr()).collect();
    for slot in [&listen_pid, &watchdog_pid].into_iter().flatten() {
        envp.push(slot.0.as_ptr().cast());
    }
    envp.push(std::ptr::null());
    let mut argv: Vec<*const libc::c_char> = plan.argv.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut tmp_fds = vec![-1 as RawFd; w.fds.len()];

    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Herder {
            what: "cannot create the exec-status pipe",
            source: e.into(),
        })?;
    let child = ChildPlan {
        path: &path,
        argv: &argv,
        envp: &mut envp,
        fds: w.fds,
        tmp_fds: &mut tmp_fds,
        devnull: plan.devnull.as_raw_fd(),
        err_fd: err_w.as_raw_fd(),
        creds: plan.creds.as_ref(),
        parent: plan.parent,
        nofile: plan.nofile.as_ref(),
    };
    // Every signal blocked across fork: one that arrives in the child before it has reset
    // the dispositions would otherwise run herder's handler there (tokio's, which writes to
    // the pipe herder's loop reads: a SIGTERM meant for the child would stop herder). The
    // child resets dispositions, then unmasks; the parent restores its mask right after.
    let mut old: libc::sigset_t = zeroed_sigset();
    // SAFETY: plain sigset manipulation on local values; pthread_sigmask on our own thread.
    unsafe {
        let mut all: libc::sigset_t = zeroed_sigset();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
    }
    // SAFETY: the child branch calls only async-signal-safe functions on memory prepared above
    // (see `ChildPlan::run`) and never returns; herder forks only from its single event-loop
    // thread, so no lock can be held by another thread at fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let (mut lp, mut wp) = (listen_pid, watchdog_pid);
        // SAFETY: we are the child; see above.
        unsafe { child.run(lp.as_mut(), wp.as_mut()) }
    }
    let fork_error = (pid < 0).then(std::io::Error::last_os_error);
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    if let Some(source) = fork_error {
        return Err(SpawnError::Herder {
            what: "fork failed",
            source,
        });
    }
    drop(err_w);
    match read_exec_error(&err_r) {
        None => Ok(pid),
        Some((stage, errno)) => {
            let source = std::io::Error::from_raw_os_error(errno);
            let shown = Path::new(&plan.argv0).display().to_string();
            let (what, code) = match stage {
                STAGE_EXEC if errno == libc::ENOENT => (format!("cannot execute {shown}"), 127),
                STAGE_EXEC => (format!("cannot execute {shown}"), 126),
                STAGE_CREDS => ("cannot switch to --user/--group".to_string(), 126),
                _ => {
                    return Err(SpawnError::Herder {
                        what: "worker setup failed before exec",
                        source,
                    })
                }
            };
            Err(SpawnError::Exec { what, source, code })
        }
    }
}

const STAGE_EXEC: u8 = 1;
const STAGE_CREDS: u8 = 2;
const STAGE_SETUP: u8 = 3;

/// Blocks until the child has exec'd (EOF: the pipe closed on exec) or reported an errno.
fn read_exec_error(r: &OwnedFd) -> Option<(u8, i32)> {
    let mut buf = [0u8; 5];
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(r.as_raw_fd(), &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    (got == buf.len()).then(|| (buf[0], i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]])))
}

struct ChildPlan<'a> {
    path: &'a CString,
    argv: &'a [*const libc::c_char],
    envp: &'a mut [*const libc::c_char],
    fds: &'a [RawFd],
    tmp_fds: &'a mut [RawFd],
    devnull: RawFd,
    err_fd: RawFd,
    creds: Option<&'a Credentials>,
    parent: libc::pid_t,
    nofile: Option<&'a libc::rlimit>,
}

/// A zeroed `sigset_t` (valid: it is plain data; sigemptyset/sigfillset follow).
fn zeroed_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is a plain array of integers; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Raises herder's soft RLIMIT_NOFILE to the hard limit (every worker costs herder fds) and
/// returns the limit as it was, for the workers: like systemd, which keeps the soft limit at
/// 1024 for programs that still use select(2). Called in `main` before anything is opened.
pub fn raise_nofile() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= lim.rlim_max {
            return None;
        }
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        (libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0).then_some(lim)
    }
}

impl ChildPlan<'_> {
    /// Runs in the child between fork and exec. Only async-signal-safe calls (signal-safety(7)).
    unsafe fn run(self, listen_pid: Option<&mut PidSlot>, watchdog_pid: Option<&mut PidSlot>) -> ! {
        // Default dispositions (exec keeps SIG_IGN: Rust's runtime ignores SIGPIPE, and a parent
        // may have ignored anything) and an empty mask (exec keeps the mask). The raw syscall,
        // because glibc's sigaction refuses its internal signals 32 and 33, which an
        // ignoring parent may have passed down too. A zeroed kernel sigaction is SIG_DFL.
        let dfl = [0u64; 4];
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    dfl.as_ptr(),
                    std::ptr::null_mut::<u64>(),
                    8usize,
                );
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        // Its own process group: herder can signal the worker and everything it started.
        libc::setpgid(0, 0);
        let n = self.fds.len() as RawFd;
        let first_free = 3 + n;
        let err_fd = libc::fcntl(self.err_fd, libc::F_DUPFD_CLOEXEC, first_free);
        if err_fd < 0 {
            fail(self.err_fd, STAGE_SETUP, errno());
        }
        if libc::dup2(self.devnull, 0) < 0 {
            fail(err_fd, STAGE_SETUP, errno());
        }
        // Move every socket above the target range first, so that dup2 into 3.. never
        // overwrites a source that is still needed; dup2 clears FD_CLOEXEC on the target.
        for (i, &fd) in self.fds.iter().enumerate() {
            self.tmp_fds[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, first_free);
            if self.tmp_fds[i] < 0 {
                fail(err_fd, STAGE_SETUP, errno());
            }
        }
        for (i, &tmp) in self.tmp_fds.iter().enumerate() {
            if libc::dup2(tmp, 3 + i as RawFd) < 0 {
                fail(err_fd, STAGE_SETUP, errno());
            }
        }
        // Nothing else crosses exec: mark every higher fd close-on-exec (the error pipe stays
        // usable until exec succeeds).
        if libc::syscall(
            libc::SYS_close_range,
            first_free as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            close_all_but(first_free, err_fd);
        }

        if let Some(c) = self.creds {
            if libc::setgroups(c.groups.len(), c.groups.as_ptr()) != 0
                || libc::setgid(c.gid) != 0
                || libc::setuid(c.uid) != 0
            {
                fail(err_fd, STAGE_CREDS, errno());
            }
        }
        // The fd limit herder found, not the one it raised for itself (setrlimit is a plain
        // system call; lowering a soft limit always succeeds).
        if let Some(lim) = self.nofile {
            libc::setrlimit(libc::RLIMIT_NOFILE, lim);
        }
        // Die with herder (prctl(2)). After the credential change, which would clear it. If
        // herder is already gone, don't start at all.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        if libc::getppid() != self.parent {
            fail(err_fd, STAGE_SETUP, libc::ESRCH);
        }

        let pid = libc::getpid();
        // The placeholders sit at the end of envp, before the terminating NULL.
        for slot in [listen_pid, watchdog_pid].into_iter().flatten() {
            slot.fill(pid);
        }
        libc::execve(self.path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr());
        fail(err_fd, STAGE_EXEC, errno())
    }
}

/// Fallback for kernels without close_range(CLOSE_RANGE_CLOEXEC) (< 5.11).
unsafe fn close_all_but(from: RawFd, keep: RawFd) {
    let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(1024, 1 << 20) as RawFd;
    for fd in from..max {
        if fd != keep {
            libc::close(fd);
        }
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Reports `(stage, errno)` to the parent and exits 127 (not found) or 126.
unsafe fn fail(err_fd: RawFd, stage: u8, err: i32) -> ! {
    let b = err.to_ne_bytes();
    let msg = [stage, b[0], b[1], b[2], b[3]];
    libc::write(err_fd, msg.as_ptr().cast(), msg.len());
    libc::_exit(if stage == STAGE_EXEC && err == libc::ENOENT {
        127
    } else {
        126
    })
}

/// `/dev/null` opened onto any of fds 0, 1, 2 that is closed, so that no socket or pipe herder
/// opens later can land there (a daemon-hygiene rule older than herder).
pub fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries; open returns the lowest free fd, which is `fd` here.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) == -1 {
                let nul = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if nul >= 0 && nul != fd {
                    // Lower fds were open, so this cannot happen; keep the fd anyway.
                    let _ = OwnedFd::from_raw_fd(nul);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_slot_is_filled_in_place() {
        let mut s = PidSlot::new("LISTEN_PID");
        s.fill(12345);
        let c = std::ffi::CStr::from_bytes_until_nul(&s.0).unwrap();
        assert_eq!(c.to_str().unwrap(), "LISTEN_PID=12345");
        s.fill(7);
        let c = std::ffi::CStr::from_bytes_until_nul(&s.0).unwrap();
        assert_eq!(c.to_str().unwrap(), "LISTEN_PID=7");
    }

    #[test]
    fn missing_command_is_127_without_forking() {
        let plan = Plan::new(&["herder-no-such-command-xyz".into()], None, None).unwrap();
        let err = plan.resolve().unwrap_err();
        assert_eq!(err.code(), 127);
    }
}
