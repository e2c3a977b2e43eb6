//! One datagram from a worker socket: its bytes (capped), the sender's credentials, and every
//! fd that came along closed.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use super::MAX_DATAGRAM;

/// Control-message buffer: room for credentials and SCM_MAX_FD (253) fds several times over,
/// so that what the kernel can attach fits; should it not, the fds that did arrive are still
/// found and closed.
const CMSG_BUF: usize = 4096;

pub(super) struct Datagram {
    pub data: Vec<u8>,
    /// (pid, uid) from SCM_CREDENTIALS.
    pub sender: Option<(i32, u32)>,
    pub truncated: bool,
}

/// Control-message buffer with the alignment `cmsghdr` needs.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF]);

/// One non-blocking recvmsg(2): `Ok(None)` when the queue is empty. Every fd that came along
/// (SCM_RIGHTS) is closed, also when the control data was truncated (MSG_CTRUNC: the kernel
/// installed the fds that fit and dropped the rest). Written against libc, not nix's
/// `cmsgs()`, because that refuses to walk truncated control data — which is exactly when
/// fds must still be found and closed.
pub(super) fn recv_one(fd: RawFd) -> std::io::Result<Option<Datagram>> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut cmsg = CmsgBuf([0u8; CMSG_BUF]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_BUF as _;
    let flags = libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC | libc::MSG_TRUNC;
    // SAFETY: `msg` points at live buffers of the lengths it states.
    let n = unsafe { libc::recvmsg(fd, &mut msg, flags) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel filled `msg_controllen` bytes of `cmsg`; CMSG_FIRSTHDR/NXTHDR stay
    // within them, and every header they return is checked against the buffer's end.
    let sender = unsafe { walk_cmsgs(&msg) };
    let len = n as usize;
    let truncated = msg.msg_flags & libc::MSG_TRUNC != 0 || len > MAX_DATAGRAM;
    buf.truncate(len.min(MAX_DATAGRAM));
    Ok(Some(Datagram {
        data: buf,
        sender,
        truncated,
    }))
}

/// Closes every passed fd and returns the credentials, from the control data of `msg`.
unsafe fn walk_cmsgs(msg: &libc::msghdr) -> Option<(i32, u32)> {
    let start = msg.msg_control as usize;
    // (socklen_t on musl, size_t on glibc.)
    #[allow(clippy::unnecessary_cast)]
    let end = start + (msg.msg_controllen as usize).min(CMSG_BUF);
    let mut sender = None;
    let mut c = libc::CMSG_FIRSTHDR(msg);
    while !c.is_null() {
        let data = libc::CMSG_DATA(c) as usize;
        // The payload, as far as it lies inside what the kernel wrote.
        let avail = (c as usize + (*c).cmsg_len as usize)
            .min(end)
            .saturating_sub(data);
        match ((*c).cmsg_level, (*c).cmsg_type) {
            (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                let count = avail / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let p = (data as *const RawFd).add(i);
                    let fd = std::ptr::read_unaligned(p);
                    if fd >= 0 {
                        // SAFETY: the kernel just installed this fd for us; nobody else owns it.
                        drop(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            (libc::SOL_SOCKET, libc::SCM_CREDENTIALS)
                if avail >= std::mem::size_of::<libc::ucred>() =>
            {
                let cred = std::ptr::read_unaligned(data as *const libc::ucred);
                sender = Some((cred.pid, cred.uid));
            }
            _ => {}
        }
        c = libc::CMSG_NXTHDR(msg, c);
    }
    sender
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{self, sockopt};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;

    fn fds_open() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    /// Sends `n` fds of /dev/null in one datagram (the kernel takes up to SCM_MAX_FD, 253).
    fn send_fds(to: &UnixDatagram, n: usize) -> std::io::Result<usize> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let null = std::fs::File::open("/dev/null").unwrap();
        let fds: Vec<RawFd> = vec![null.as_raw_fd(); n];
        let iov = [std::io::IoSlice::new(b"READY=1")];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(to.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(Into::into)
    }

    #[test]
    fn passed_fds_are_closed_even_when_the_control_data_is_truncated() {
        let (a, b) = UnixDatagram::pair().unwrap();
        socket::setsockopt(&b, sockopt::PassCred, &true).unwrap();
        b.set_nonblocking(true).unwrap();
        let before = fds_open();
        for n in [1, 16, 17, 200, 253] {
            send_fds(&a, n).unwrap();
            let d = recv_one(b.as_raw_fd()).unwrap().expect("a datagram");
            assert_eq!(d.data, b"READY=1");
            assert!(d.sender.is_some(), "credentials with {n} fds");
            assert_eq!(fds_open(), before, "{n} fds came and went");
        }
        assert!(recv_one(b.as_raw_fd()).unwrap().is_none());
    }

    #[test]
    fn a_truncating_control_buffer_still_closes_the_fds_that_arrived() {
        // Receive with a deliberately small buffer: MSG_CTRUNC, some fds installed.
        let (a, b) = UnixDatagram::pair().unwrap();
        let before = fds_open();
        send_fds(&a, 100).unwrap();
        let mut buf = [0u8; 64];
        let mut small = CmsgBuf([0u8; CMSG_BUF]);
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: as in recv_one, with a control length of 64 bytes.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = small.0.as_mut_ptr().cast();
            msg.msg_controllen = 64;
            assert!(libc::recvmsg(b.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) > 0);
            assert!(msg.msg_flags & libc::MSG_CTRUNC != 0);
            assert!(fds_open() > before, "the kernel installed some");
            walk_cmsgs(&msg);
        }
        assert_eq!(fds_open(), before);
    }
}
