//! The one effect of steering: `setsockopt(SO_ATTACH_REUSEPORT_CBPF)` on a socket of the group
//! (the program belongs to the group, not to the socket: attaching on any member replaces it
//! for all, socket(7)). No privilege needed; no eBPF.

use std::os::fd::{AsRawFd, BorrowedFd};

use libc::{sock_filter, sock_fprog};

/// Attaches `prog` to the SO_REUSEPORT group of `fd`, replacing the one it had.
pub fn attach(fd: BorrowedFd<'_>, prog: &[sock_filter]) -> std::io::Result<()> {
    let mut insns = prog.to_vec();
    let fprog = sock_fprog {
        len: u16::try_from(insns.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?,
        filter: insns.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `insns`, which outlives the call; the kernel copies the
    // program (sk_attach_filter → bpf_prog_create_from_user) and keeps no pointer to it.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::addr_of!(fprog).cast(),
            std::mem::size_of::<sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A socket's identity for [`super::order`]: its inode number.
pub fn sock_id(fd: BorrowedFd<'_>) -> Option<super::SockId> {
    nix::sys::stat::fstat(fd.as_raw_fd()).ok().map(|s| s.st_ino)
}
