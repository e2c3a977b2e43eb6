//! The kernel's order of the sockets in one SO_REUSEPORT group, which is what a reuseport
//! program's return value indexes. A model, kept by [`crate::listen::SocketSet`] as it opens
//! and closes sockets; it never asks the kernel (nothing can).
//!
//! The rules, from net/core/sock_reuseport.c (and checked on 6.18: a program returning a
//! constant index, sockets listened in another order than bound, one closed): a socket
//! joins at the end of the array when it is hashed — at `listen()` for TCP, at `bind()` for
//! UDP (`reuseport_add_sock` via `inet_reuseport_add_sock` / `udp_reuseport_add_sock`); when
//! its last reference closes, the last socket of the array moves into its place
//! (`reuseport_detach_sock`: `socks[i] = socks[num_socks - 1]`). With
//! `net.ipv4.tcp_migrate_req=1` a closed TCP listener moves to the closed section instead,
//! which takes it out of the array the same way (`__reuseport_detach_sock`).

/// A socket's identity: its sockfs inode number (`fstat(2)` `st_ino`), the same in every fd
/// and process that holds it, and across exec.
pub type SockId = u64;

/// One group's sockets, in the kernel's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    socks: Vec<SockId>,
    /// Whether herder saw every socket join (not so when some came back from systemd's fd
    /// store: their order is an earlier herder's history).
    known: bool,
}

impl Order {
    /// A group whose first socket is `first` (herder bound it, or it was inherited and has
    /// nobody else in its group yet).
    pub fn new(first: SockId) -> Order {
        Order {
            socks: vec![first],
            known: true,
        }
    }

    /// `id` joined (it was just bound and listened): at the end.
    pub fn join(&mut self, id: SockId) {
        if !self.socks.contains(&id) {
            self.socks.push(id);
        }
    }

    /// `id` joined at a place herder does not know: the order is lost for good.
    pub fn join_unknown(&mut self, id: SockId) {
        self.join(id);
        self.known = false;
    }

    /// `id`'s last reference closed: the last socket moves into its place.
    pub fn leave(&mut self, id: SockId) {
        if let Some(i) = self.socks.iter().position(|&s| s == id) {
            self.socks.swap_remove(i);
        }
    }

    /// The sockets in the kernel's order, if known.
    pub fn socks(&self) -> Option<&[SockId]> {
        self.known.then_some(&self.socks[..])
    }

    /// The model as it crosses `herder upgrade`: every socket, and whether the order is known.
    pub fn to_parts(&self) -> (Vec<SockId>, bool) {
        (self.socks.clone(), self.known)
    }

    /// The model an earlier image kept ([`Order::to_parts`]).
    pub fn from_parts(socks: Vec<SockId>, known: bool) -> Order {
        Order { socks, known }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joining_appends_and_leaving_moves_the_last_into_the_gap() {
        let mut o = Order::new(10);
        for id in [11, 12, 13] {
            o.join(id);
        }
        assert_eq!(o.socks(), Some(&[10, 11, 12, 13][..]));
        o.leave(11);
        assert_eq!(o.socks(), Some(&[10, 13, 12][..]));
        o.leave(12); // the last one: nothing moves
        assert_eq!(o.socks(), Some(&[10, 13][..]));
        o.join(14);
        o.leave(10);
        assert_eq!(o.socks(), Some(&[14, 13][..]));
        o.leave(99); // not a member: no change
        assert_eq!(o.socks(), Some(&[14, 13][..]));
    }

    #[test]
    fn a_socket_of_unknown_history_makes_the_order_unknown() {
        let mut o = Order::new(1);
        o.join_unknown(2);
        assert_eq!(o.socks(), None);
    }
}
