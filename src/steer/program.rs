//! The classic BPF program that picks a socket in one SO_REUSEPORT group: pure data in
//! (which slot each socket of the group serves, which slots can serve, the balance mode),
//! instructions out. Nothing here touches a socket.
//!
//! The kernel runs the program on the first packet of a connection (a TCP SYN, a UDP
//! datagram) with the skb's data pulled past the transport header, and takes its return value
//! as an index into the group's socket array; an index at or past the group's size makes it
//! fall back to its own hash choice (`run_bpf_filter` / `reuseport_select_sock` in
//! net/core/sock_reuseport.c). The addresses are reached with `SKF_NET_OFF` loads, relative to
//! the network header (filter(2)-style negative offsets, `bpf_internal_load_pointer_neg_helper`).
//!
//! Hand-written instructions, not a crate: the program is a few dozen fixed instructions and
//! two jump tables, no crate generates reuseport cBPF, and eBPF would need privilege.
//!
//! The hash is our own (source address, plus the source port for `hash`), not the skb's
//! `ld #rxhash`: on loopback a TCP SYN carries the client socket's random txhash but a UDP
//! datagram carries none (0), and a NIC without RSS sets none either.

use libc::sock_filter;

/// At most this many instructions in one classic BPF program (`BPF_MAXINSNS`).
pub const MAX_INSNS: usize = 4096;

/// The index that makes the kernel choose by its own hash: any value ≥ the group's size.
pub const FALLBACK: u32 = u32::MAX;

/// How new connections are spread over the slots that can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// By a hash of the source address and port: every connection anywhere among the ready.
    Hash,
    /// By the client's address (IPv4) or /64 (IPv6): its home slot while that is ready.
    ClientIp,
}

impl Balance {
    pub fn word(self) -> &'static str {
        match self {
            Balance::Hash => "hash",
            Balance::ClientIp => "client-ip",
        }
    }
}

// Opcodes (linux/bpf_common.h, linux/filter.h).
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const ABS: u16 = 0x20;
const IND: u16 = 0x40;
const MEM: u16 = 0x60;
const MUL: u16 = 0x20;
const AND: u16 = 0x50;
const LSH: u16 = 0x60;
const RSH: u16 = 0x70;
const MOD: u16 = 0x90;
const XOR: u16 = 0xa0;
const JA: u16 = 0x00;
const JEQ: u16 = 0x10;
const K: u16 = 0x00;
const X: u16 = 0x08;
const TAX: u16 = 0x00;

/// `SKF_NET_OFF`: loads relative to the network header.
const NET: u32 = libc::SKF_NET_OFF as u32;

/// Multipliers of the hash (odd, well mixed): the golden ratio's and murmur3's finalizer's.
const C1: u32 = 0x9e37_79b1;
const C2: u32 = 0x85eb_ca6b;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// What the program is made from.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The group's sockets in the kernel's order: which slot each serves (`None`: it serves
    /// none, e.g. a removed slot's socket that is still open).
    pub group: &'a [Option<usize>],
    /// Per slot (0..total): whether it can take new connections (its worker is ready).
    pub ready: &'a [bool],
    pub balance: Balance,
}

impl Input<'_> {
    /// Each slot's index in the group, if it has a socket there.
    fn index_of(&self) -> Vec<Option<u32>> {
        let mut at = vec![None; self.ready.len()];
        for (i, s) in self.group.iter().enumerate() {
            if let Some(slot) = *s {
                if slot < at.len() && at[slot].is_none() {
                    at[slot] = Some(i as u32);
                }
            }
        }
        at
    }

    /// The slots that get new connections: ready, and with a socket in the group.
    pub fn receiving(&self) -> Vec<usize> {
        let at = self.index_of();
        (0..self.ready.len())
            .filter(|&s| self.ready[s] && at[s].is_some())
            .collect()
    }
}

/// The program for `input`. With no slot to send to (or more slots than a program can
/// hold), it is the single `ret #FALLBACK`: the kernel's own choice, as with no program.
pub fn program(input: &Input) -> Vec<sock_filter> {
    let at = input.index_of();
    let receiving = input.receiving();
    let total = input.ready.len();
    let fallback = vec![stmt(RET | K, FALLBACK)];
    if receiving.is_empty() {
        return fallback;
    }
    let mut p = hash(input.balance);
    // M[1] holds the hash; A too.
    if input.balance == Balance::ClientIp && total > 0 {
        // The home slot: its socket if it can serve, else the spread below.
        p.push(stmt(ALU | MOD | K, total as u32));
        let spread_at = p.len() + 2 * total;
        for (slot, idx) in at.iter().enumerate() {
            p.push(jump(JMP | JEQ | K, slot as u32, 0, 1));
            match idx {
                Some(i) if input.ready[slot] => p.push(stmt(RET | K, *i)),
                _ => {
                    let from = p.len() + 1;
                    p.push(stmt(JMP | JA, (spread_at - from) as u32));
                }
            }
        }
        debug_assert_eq!(p.len(), spread_at);
        // The spread takes other bits than the home did: with the same low bits, the clients
        // of an odd home slot would all land on one odd receiving slot.
        p.extend([stmt(LD | MEM, 1), stmt(ALU | RSH | K, 16)]);
    }
    p.push(stmt(ALU | MOD | K, receiving.len() as u32));
    for (r, &slot) in receiving.iter().enumerate() {
        p.push(jump(JMP | JEQ | K, r as u32, 0, 1));
        p.push(stmt(
            RET | K,
            at[slot].expect("receiving slots have a socket"),
        ));
    }
    p.push(stmt(RET | K, FALLBACK));
    if p.len() > MAX_INSNS {
        return fallback;
    }
    p
}

/// The program's head: the hash of the client into A and `M[1]`. IPv4 and IPv6 are told apart
/// by the version nibble of the network header's first byte.
fn hash(balance: Balance) -> Vec<sock_filter> {
    let with_port = balance == Balance::Hash;
    let mut v4 = Vec::new();
    if with_port {
        // X = the IPv4 header's length (IHL × 4); the source port is the first half-word
        // after it.
        v4.extend([
            stmt(LD | B | ABS, NET),
            stmt(ALU | AND | K, 0xf),
            stmt(ALU | LSH | K, 2),
            stmt(MISC | TAX, 0),
            stmt(LD | H | IND, NET),
            stmt(ST, 0),
        ]);
    }
    fold(&mut v4, &[NET + 12], with_port);
    // IPv6: the /64 for client-ip (privacy addresses change the low half), the whole address
    // and the port (right after the fixed 40-byte header) for hash.
    let mut v6 = Vec::new();
    let words: &[u32] = if with_port {
        v6.extend([stmt(LD | H | ABS, NET + 40), stmt(ST, 0)]);
        &[NET + 8, NET + 12, NET + 16, NET + 20]
    } else {
        &[NET + 8, NET + 12]
    };
    fold(&mut v6, words, with_port);
    let mut p = vec![
        stmt(LD | B | ABS, NET),
        stmt(ALU | RSH | K, 4),
        // IPv6: skip the IPv4 part and its closing jump.
        jump(JMP | JEQ | K, 6, (v4.len() + 1) as u8, 0),
    ];
    p.extend(v4);
    p.push(stmt(JMP | JA, v6.len() as u32));
    p.extend(v6);
    // The finalizer: A ^= A >> 15; A *= C2; A ^= A >> 13; M[1] = A.
    for (shift, mul) in [(15, Some(C2)), (13, None)] {
        p.extend([
            stmt(ST, 0),
            stmt(ALU | RSH | K, shift),
            stmt(LDX | MEM, 0),
            stmt(ALU | XOR | X, 0),
        ]);
        if let Some(m) = mul {
            p.push(stmt(ALU | MUL | K, m));
        }
    }
    p.push(stmt(ST, 1));
    p
}

/// A = fold of the words at `offsets` (and of `M[0]` first, when `seeded`): each step
/// `A = (A ^ word) × C1`.
fn fold(p: &mut Vec<sock_filter>, offsets: &[u32], seeded: bool) {
    for (n, &off) in offsets.iter().enumerate() {
        p.push(stmt(LD | W | ABS, off));
        if seeded || n > 0 {
            p.extend([stmt(LDX | MEM, 0), stmt(ALU | XOR | X, 0)]);
        }
        p.push(stmt(ALU | MUL | K, C1));
        if n + 1 < offsets.len() {
            p.push(stmt(ST, 0));
        }
    }
}

#[cfg(test)]
#[path = "program_tests.rs"]
mod tests;
