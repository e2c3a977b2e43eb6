//! The names herder stores its sockets under (`FDNAME=`, sd_notify(3)), and back: pure.
//!
//! ```text
//! herder/listen-tcp-127.0.0.1%3A8080     the --listen socket asking for 127.0.0.1:8080
//! herder/listen.1-tcp-127.0.0.1%3A0      the second --listen asking for the same address
//! herder/slot2-tcp-127.0.0.1%3A8080      slot 2's SO_REUSEPORT sibling of the listener bound there
//! herder/health-tcp-0.0.0.0%3A8081       the --health socket
//! herder/listen-unix-/run/app.sock       unix:/run/app.sock (unix:@app: herder/listen-abstract-app)
//! ```
//!
//! `herder/KIND-TAG-PAYLOAD`: KIND is `listen`, `slotN` or `health`, with `.C` for the C-th
//! (C > 0) of several identical addresses; TAG is `tcp`, `udp`, `unix` or `abstract`; PAYLOAD is
//! the address (`SocketAddr` text, path or abstract name) with every byte that is not printable
//! ASCII, and `:` and `%`, written `%XX`. A unix address whose escaped form would not fit in 255
//! characters is written in hex instead, under TAG `unix.hex` / `abstract.hex`. Every name is a
//! valid FDNAME= (at most 255 characters, no control character, no `:`), and each socket has
//! exactly one: [`parse`] accepts only the name [`Id::name`] writes.
//!
//! A `--listen` socket is named by the address it asks for (port 0 stays 0), so that the same
//! command line finds it again; a sibling by the address its listener is bound to, which is the
//! address the sibling must have.

use std::ffi::OsString;
use std::fmt::Write;
use std::net::SocketAddr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use crate::listen::Addr;

/// Every name herder stores a socket under starts with this; LISTEN_FDNAMES entries that do are
/// herder's own and never a socket unit's. A socket unit's default `FileDescriptorName=` is the
/// unit's name (systemd.socket(5)), and unit names may well start with `herder-`
/// (`herder-app.socket`) but never contain `/`: only an explicit `FileDescriptorName=herder/…`
/// can collide, and that prefix is reserved.
pub const PREFIX: &str = "herder/";

/// `FDNAME_MAX` in systemd.
pub const FDNAME_MAX: usize = 255;

/// What a stored socket is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Id {
    /// A `--listen` socket: the `copy`-th (from 0) of the `--listen` arguments asking for `addr`.
    Listen { addr: Addr, copy: u32 },
    /// `slot`'s SO_REUSEPORT sibling of the `copy`-th listener bound to `addr`.
    Sibling { slot: u32, addr: Addr, copy: u32 },
    /// The `--health` socket.
    Health { addr: Addr },
}

/// Whether a LISTEN_FDNAMES name is herder's own (stored) rather than a socket unit's.
pub fn is_herders(name: &str) -> bool {
    name.starts_with(PREFIX)
}

/// Whether `name` may go into `FDNAME=` (systemd's `fdname_is_valid()`).
pub fn valid_fdname(name: &str) -> bool {
    name.len() <= FDNAME_MAX
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b':')
}

fn kind_with_copy(kind: String, copy: u32) -> String {
    if copy == 0 {
        kind
    } else {
        format!("{kind}.{copy}")
    }
}

impl Id {
    pub fn addr(&self) -> &Addr {
        match self {
            Id::Listen { addr, .. } | Id::Sibling { addr, .. } | Id::Health { addr } => addr,
        }
    }

    /// The FDNAME= this socket is stored under; `None` only when it cannot fit in 255
    /// characters (never for an address `--listen` accepts, a slot below 100000 and a copy
    /// below 10000).
    pub fn name(&self) -> Option<String> {
        let kind = match self {
            Id::Listen { copy, .. } => kind_with_copy("listen".into(), *copy),
            Id::Sibling { slot, copy, .. } => kind_with_copy(format!("slot{slot}"), *copy),
            Id::Health { .. } => "health".into(),
        };
        let (tag, payload) = match self.addr() {
            Addr::Tcp(a) => ("tcp", a.to_string().into_bytes()),
            Addr::Udp(a) => ("udp", a.to_string().into_bytes()),
            Addr::UnixPath(p) => ("unix", p.as_os_str().as_bytes().to_vec()),
            Addr::UnixAbstract(n) => ("abstract", n.clone()),
        };
        let escaped = format!("{PREFIX}{kind}-{tag}-{}", escape(&payload));
        if escaped.len() <= FDNAME_MAX {
            return Some(escaped);
        }
        let hex = format!("{PREFIX}{kind}-{tag}.hex-{}", hex(&payload));
        (hex.len() <= FDNAME_MAX).then_some(hex)
    }
}

/// What a name of herder's says; `None` for anything [`Id::name`] would not have written.
pub fn parse(name: &str) -> Option<Id> {
    let id = parse_loose(name)?;
    // One socket, one name: anything but the canonical spelling is not ours.
    (id.name().as_deref() == Some(name)).then_some(id)
}

fn parse_loose(name: &str) -> Option<Id> {
    let rest = name.strip_prefix(PREFIX)?;
    let (kind, rest) = rest.split_once('-')?;
    let (tag, payload) = rest.split_once('-')?;
    let (tag, bytes) = match tag.strip_suffix(".hex") {
        Some(t) => (t, unhex(payload)?),
        None => (tag, unescape(payload)?),
    };
    let addr = match tag {
        "tcp" => Addr::Tcp(inet(&bytes)?),
        "udp" => Addr::Udp(inet(&bytes)?),
        "unix" => Addr::UnixPath(PathBuf::from(OsString::from_vec(bytes))),
        "abstract" => Addr::UnixAbstract(bytes),
        _ => return None,
    };
    let (kind, copy) = match kind.split_once('.') {
        Some((k, c)) => (k, c.parse().ok()?),
        None => (kind, 0),
    };
    Some(match kind {
        "listen" => Id::Listen { addr, copy },
        "health" if copy == 0 => Id::Health { addr },
        _ => Id::Sibling {
            slot: kind.strip_prefix("slot")?.parse().ok()?,
            addr,
            copy,
        },
    })
}

fn inet(bytes: &[u8]) -> Option<SocketAddr> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Bytes that stand for themselves in a payload: printable ASCII but `:` (FDNAME='s one
/// forbidden character) and `%` (the escape).
fn plain(b: u8) -> bool {
    b.is_ascii_graphic() && b != b':' && b != b'%'
}

fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if plain(b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The `copy` of each address in `addrs`: how many earlier entries are equal to it.
pub fn copies<'a>(addrs: impl IntoIterator<Item = Option<&'a Addr>>) -> Vec<u32> {
    let mut seen: Vec<&Addr> = Vec::new();
    addrs
        .into_iter()
        .map(|a| match a {
            Some(a) => {
                let n = seen.iter().filter(|s| **s == a).count();
                seen.push(a);
                u32::try_from(n).unwrap_or(u32::MAX)
            }
            None => 0,
        })
        .collect()
}
