//! What a `--listen` argument says: `[NAME=]ADDR`, parsed and printed back the same way.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

/// One `--listen` argument: `[NAME=]ADDR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    pub name: Option<String>,
    pub addr: Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp(SocketAddr),
    Udp(SocketAddr),
    UnixPath(PathBuf),
    UnixAbstract(Vec<u8>),
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Udp(a) => write!(f, "udp:{a}"),
            Addr::UnixPath(p) => write!(f, "unix:{}", p.display()),
            Addr::UnixAbstract(n) => write!(f, "unix:@{}", String::from_utf8_lossy(n)),
        }
    }
}

impl fmt::Display for ListenSpec {
    /// The `--listen` form, `[NAME=]ADDR`: parses back to the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = &self.name {
            write!(f, "{n}=")?;
        }
        write!(f, "{}", self.addr)
    }
}

fn valid_fdname(name: &str) -> bool {
    // sd_pid_notify_with_fds(3): FDNAME= may not contain control characters or ':'.
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

fn parse_inet(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    // `localhost:PORT` and `*:PORT` / `:PORT` are common enough to accept; no name resolution.
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let ip = match host {
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        "" | "*" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

impl FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid address '{s}': expected HOST:PORT, [V6]:PORT, udp:HOST:PORT, unix:/path or unix:@name")
        };
        let (name, rest) = match s.split_once('=') {
            Some((n, r)) if !n.contains(':') && !n.contains('/') => {
                if !valid_fdname(n) {
                    return Err(format!(
                        "invalid socket name '{n}': printable ASCII, no ':'"
                    ));
                }
                (Some(n.to_string()), r)
            }
            _ => (None, s),
        };
        let addr = if let Some(u) = rest.strip_prefix("unix:") {
            if let Some(a) = u.strip_prefix('@') {
                if a.is_empty() || a.len() > 107 {
                    return Err(bad());
                }
                Addr::UnixAbstract(a.as_bytes().to_vec())
            } else if u.starts_with('/') && u.len() < 108 {
                Addr::UnixPath(PathBuf::from(u))
            } else {
                return Err(bad());
            }
        } else if let Some(u) = rest.strip_prefix("udp:") {
            Addr::Udp(parse_inet(u).ok_or_else(bad)?)
        } else {
            Addr::Tcp(parse_inet(rest.strip_prefix("tcp:").unwrap_or(rest)).ok_or_else(bad)?)
        };
        Ok(ListenSpec { name, addr })
    }
}
