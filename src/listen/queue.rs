//! What still waits on a socket nobody should get anything new on (a removed slot's, while
//! its worker is leaving, src/pool/leave.rs): connections in a listening TCP socket's accept
//! queue, a datagram in a UDP socket's receive queue. Reading only: it never accepts.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::socket::{getsockopt, sockopt, SockType};

/// `TCP_LISTEN` of include/net/tcp_states.h (`tcpi_state`).
const TCP_LISTEN: u8 = 10;

/// Whether anything waits on `fd` (`None`: it cannot be told).
///
/// TCP: for a socket in LISTEN state `tcpi_unacked` of `TCP_INFO` is the accept queue's
/// length (`sk_ack_backlog`; `tcpi_sacked` is the backlog limit — net/ipv4/tcp.c
/// `tcp_get_info`). UDP: `SIOCINQ` is the size of the next pending datagram, 0 when none is
/// (udp(7)).
pub fn waiting(fd: BorrowedFd<'_>) -> Option<bool> {
    match getsockopt(&fd, sockopt::SockType).ok()? {
        SockType::Stream => {
            // SAFETY: tcp_info is plain data, valid when zeroed.
            let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            // SAFETY: an open fd, a buffer of `len` bytes and its length; the kernel writes
            // at most that much.
            let rc = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_INFO,
                    (&mut info as *mut libc::tcp_info).cast(),
                    &mut len,
                )
            };
            let listening = rc == 0 && info.tcpi_state == TCP_LISTEN;
            listening.then_some(info.tcpi_unacked > 0)
        }
        SockType::Datagram => {
            let mut next: libc::c_int = 0;
            // SAFETY: SIOCINQ (FIONREAD) on an open fd writes one int.
            let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut next) };
            (rc == 0).then_some(next > 0)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    use super::waiting;

    #[test]
    fn a_listener_s_accept_queue_and_a_udp_socket_s_datagrams_are_seen() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(waiting(l.as_fd()), Some(false));
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        // The handshake's last ACK may still be on its way through loopback.
        let deadline = Instant::now() + Duration::from_secs(10);
        while waiting(l.as_fd()) != Some(true) && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(waiting(l.as_fd()), Some(true));
        drop(l.accept().unwrap());
        assert_eq!(waiting(l.as_fd()), Some(false));
        // A connected socket is no listener: not told.
        assert_eq!(waiting(c.as_fd()), None);

        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(waiting(u.as_fd()), Some(false));
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(b"x", u.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 4];
        // The datagram is on loopback at once; peek makes sure before looking.
        u.peek_from(&mut buf).unwrap();
        assert_eq!(waiting(u.as_fd()), Some(true));
        u.recv_from(&mut buf).unwrap();
        assert_eq!(waiting(u.as_fd()), Some(false));
    }
}
