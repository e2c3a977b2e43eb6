//! Where the workers' notify sockets live and who may reach them: a fresh private directory
//! (socket files of mode 0600, owned by the workers' uid), or, when no directory is writable,
//! abstract names that nobody can predict.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use nix::sys::socket::{self, sockopt};
use socket2::{Domain, SockAddr, Socket, Type};
use thiserror::Error;
use tracing::{info, warn};

use crate::pool::WorkerId;

/// Attempts at a fresh random name when one is taken.
const NAME_ATTEMPTS: usize = 8;
/// `sun_path` holds 108 bytes with the NUL; leave room for the socket's own name.
const MAX_DIR_LEN: usize = 80;

#[derive(Debug, Error)]
pub enum NotifyError {
    #[error("cannot create the notification socket for worker {id}: {source}")]
    Socket {
        id: WorkerId,
        source: std::io::Error,
    },
}

/// 64 random bits from the kernel (getrandom(2)): names nobody can predict.
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: `b` is valid for writes of its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No getrandom (very old kernel): the time and our pid, still unique per herder.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ (u64::from(std::process::id()) << 40);
    }
    u64::from_ne_bytes(b)
}

/// Where the workers' sockets live.
#[derive(Debug)]
enum Place {
    Dir(PathBuf),
    Abstract(String),
}

/// The workers' notify sockets: where they live and who may use them.
#[derive(Debug)]
pub struct NotifySockets {
    place: Place,
    /// Owner of each socket file, when workers run as another uid (`--user`).
    owner: Option<(u32, u32)>,
}

impl NotifySockets {
    /// Chooses the place: a fresh private directory in the first of `$RUNTIME_DIRECTORY`,
    /// `$XDG_RUNTIME_DIR`, `/run`, `$TMPDIR`, `/tmp` and `/dev/shm` (a tmpfs in containers,
    /// even `FROM scratch` ones) where one can be made; else abstract names. `worker` is the
    /// uid and gid workers run as. Called during setup.
    pub fn new(worker: (u32, u32)) -> NotifySockets {
        let me = nix::unistd::geteuid().as_raw();
        let owner = (worker.0 != me).then_some(worker);
        let mut bases: Vec<PathBuf> = Vec::new();
        for var in ["RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"] {
            if let Some(v) = std::env::var_os(var) {
                bases.extend(std::env::split_paths(&v).next());
            }
        }
        bases.push("/run".into());
        bases.extend(std::env::var_os("TMPDIR").map(PathBuf::from));
        bases.push("/tmp".into());
        bases.push("/dev/shm".into());
        for base in bases.iter().filter(|b| b.is_absolute()) {
            if let Some(dir) = private_dir(base, owner.is_some()) {
                info!(
                    dir = %dir.display(),
                    "worker notify sockets in {}",
                    dir.display()
                );
                return NotifySockets {
                    place: Place::Dir(dir),
                    owner,
                };
            }
        }
        let prefix = format!("{}-{:016x}", std::process::id(), random_u64());
        warn!(
            "no writable directory for the worker notify sockets: using abstract sockets \
             (reachable from this network namespace; senders are checked by uid, pid \
             namespace and process tree)"
        );
        NotifySockets {
            place: Place::Abstract(prefix),
            owner,
        }
    }

    /// Binds worker `id`'s socket, with SO_PASSCRED set before any datagram can arrive.
    pub fn bind(&self, id: WorkerId) -> Result<WorkerSocket, NotifyError> {
        let err = |source| NotifyError::Socket { id, source };
        let sock =
            Socket::new(Domain::UNIX, Type::DGRAM.nonblocking().cloexec(), None).map_err(err)?;
        // SCM_CREDENTIALS on every datagram, sent with them or not (unix(7) SO_PASSCRED).
        socket::setsockopt(&sock, sockopt::PassCred, &true).map_err(|e| err(e.into()))?;
        match &self.place {
            Place::Dir(dir) => {
                let path = dir.join(id.to_string());
                // Ours alone: a file of that name can only be a leftover of our own.
                let _ = std::fs::remove_file(&path);
                let addr = SockAddr::unix(&path).map_err(err)?;
                // 0600 from the start (umask), so no other uid can ever send to it. herder's
                // loop is single-threaded: no file is created concurrently under this umask,
                // and workers are forked after it is restored.
                let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
                let bound = sock.bind(&addr);
                nix::sys::stat::umask(old);
                bound.map_err(err)?;
                let guard = PathGuard(path.clone());
                if let Some((uid, gid)) = self.owner {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(err)?;
                }
                Ok(WorkerSocket {
                    fd: sock.into(),
                    address: path.display().to_string(),
                    _path: Some(guard),
                })
            }
            Place::Abstract(prefix) => {
                let mut last = None;
                for _ in 0..NAME_ATTEMPTS {
                    let name = format!("herder/{prefix}/{id}-{:016x}", random_u64());
                    let raw: Vec<u8> = std::iter::once(0).chain(name.bytes()).collect();
                    let addr =
                        SockAddr::unix(PathBuf::from(OsString::from_vec(raw))).map_err(err)?;
                    match sock.bind(&addr) {
                        Ok(()) => {
                            return Ok(WorkerSocket {
                                fd: sock.into(),
                                address: format!("@{name}"),
                                _path: None,
                            })
                        }
                        // Taken (by chance, or by someone who wants it): another name.
                        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                            warn!(name, "notify socket name @{name} taken: trying another");
                            last = Some(e);
                        }
                        Err(e) => return Err(err(e)),
                    }
                }
                Err(err(
                    last.unwrap_or_else(|| std::io::Error::other("no free name"))
                ))
            }
        }
    }

    /// Removes the directory (at exit; the sockets in it are gone with their workers).
    pub fn remove(&self) {
        if let Place::Dir(dir) = &self.place {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// The private directory, when the sockets are files.
    pub fn dir(&self) -> Option<&Path> {
        match &self.place {
            Place::Dir(d) => Some(d),
            Place::Abstract(_) => None,
        }
    }

    /// The abstract names' prefix, when there is no directory.
    pub fn prefix(&self) -> Option<&str> {
        match &self.place {
            Place::Abstract(p) => Some(p),
            Place::Dir(_) => None,
        }
    }

    /// The place an earlier image made (an in-place upgrade).
    pub fn resume(dir: Option<PathBuf>, prefix: Option<String>, worker: (u32, u32)) -> Self {
        let me = nix::unistd::geteuid().as_raw();
        let place = match (dir, prefix) {
            (Some(d), _) => Place::Dir(d),
            (None, Some(p)) => Place::Abstract(p),
            (None, None) => {
                Place::Abstract(format!("{}-{:016x}", std::process::id(), random_u64()))
            }
        };
        NotifySockets {
            place,
            owner: (worker.0 != me).then_some(worker),
        }
    }

    /// A worker's socket an earlier image bound: its fd (inherited across exec) and address.
    /// A path socket's file is unlinked when the socket goes, as if bound here.
    ///
    /// # Safety
    /// `fd` must be an open socket this process owns and nothing else will close.
    pub unsafe fn adopt(&self, fd: RawFd, address: String) -> WorkerSocket {
        let path = self
            .dir()
            .filter(|_| address.starts_with('/'))
            .map(|_| PathGuard(PathBuf::from(&address)));
        WorkerSocket {
            // SAFETY: the caller's promise.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            address,
            _path: path,
        }
    }
}

/// Makes `base/herder-<pid>-<random>`, exclusively (a name someone else made is skipped).
fn private_dir(base: &Path, other_uid: bool) -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !base.is_dir() || base.as_os_str().len() > MAX_DIR_LEN - 40 {
        return None;
    }
    for _ in 0..NAME_ATTEMPTS {
        let dir = base.join(format!(
            "herder-{}-{:016x}",
            std::process::id(),
            random_u64()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                // Workers of another uid need to reach their socket: search, not list.
                let mode = if other_uid { 0o711 } else { 0o700 };
                if std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).is_err() {
                    let _ = std::fs::remove_dir(&dir);
                    return None;
                }
                return Some(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(_) => return None,
        }
    }
    None
}

/// Unlinks a socket file when its socket goes.
#[derive(Debug)]
pub(super) struct PathGuard(PathBuf);

impl Drop for PathGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A worker's private NOTIFY_SOCKET, bound before its fork.
#[derive(Debug)]
pub struct WorkerSocket {
    pub(super) fd: OwnedFd,
    /// What the worker gets as NOTIFY_SOCKET: a path, or `@name`.
    pub address: String,
    pub(super) _path: Option<PathGuard>,
}

impl WorkerSocket {
    /// The socket's fd number (it crosses an upgrade as a number).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
