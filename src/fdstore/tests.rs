//! The pure parts of the fd store: the names (examples, round trips, validity, canonical
//! parsing; property-tested), `$FDSTORE`, and the judgement of a stored socket's facts.

use super::check::{judge, Facts, Mismatch, Want};
use super::name::{self, parse, valid_fdname, Id, FDNAME_MAX, PREFIX};
use super::{wanted, FdStore};
use crate::listen::Addr;

use nix::sys::socket::SockType;
use proptest::prelude::*;
use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

fn tcp(s: &str) -> Addr {
    Addr::Tcp(s.parse().unwrap())
}

#[test]
fn the_documented_names() {
    let cases = [
        (
            Id::Listen {
                addr: tcp("127.0.0.1:8080"),
                copy: 0,
            },
            "herder/listen-tcp-127.0.0.1%3A8080",
        ),
        (
            Id::Listen {
                addr: tcp("127.0.0.1:0"),
                copy: 1,
            },
            "herder/listen.1-tcp-127.0.0.1%3A0",
        ),
        (
            Id::Sibling {
                slot: 2,
                addr: tcp("127.0.0.1:8080"),
                copy: 0,
            },
            "herder/slot2-tcp-127.0.0.1%3A8080",
        ),
        (
            Id::Health {
                addr: tcp("0.0.0.0:8081"),
            },
            "herder/health-tcp-0.0.0.0%3A8081",
        ),
        (
            Id::Listen {
                addr: Addr::UnixPath("/run/app.sock".into()),
                copy: 0,
            },
            "herder/listen-unix-/run/app.sock",
        ),
        (
            Id::Listen {
                addr: Addr::UnixAbstract(b"app 1".to_vec()),
                copy: 0,
            },
            "herder/listen-abstract-app%201",
        ),
        (
            Id::Listen {
                addr: Addr::Udp("[::1]:53".parse().unwrap()),
                copy: 0,
            },
            "herder/listen-udp-[%3A%3A1]%3A53",
        ),
        (
            Id::Sibling {
                slot: 7,
                addr: Addr::Tcp("[fe80::1%2]:80".parse().unwrap()),
                copy: 3,
            },
            "herder/slot7.3-tcp-[fe80%3A%3A1%252]%3A80",
        ),
    ];
    for (id, text) in cases {
        assert_eq!(id.name().as_deref(), Some(text), "{id:?}");
        assert_eq!(parse(text), Some(id), "{text}");
        assert!(valid_fdname(text));
    }
}

#[test]
fn a_path_that_escapes_too_long_is_written_in_hex() {
    let path: Vec<u8> = std::iter::once(b'/').chain([b':'; 106]).collect();
    let id = Id::Listen {
        addr: Addr::UnixPath(PathBuf::from(OsString::from_vec(path))),
        copy: 0,
    };
    let n = id.name().unwrap();
    assert!(n.starts_with("herder/listen-unix.hex-2f3a3a"), "{n}");
    assert!(n.len() <= FDNAME_MAX);
    assert_eq!(parse(&n), Some(id));
}

#[test]
fn only_the_canonical_spelling_parses() {
    for bad in [
        "",
        "http",
        "herder/",
        "herder-listen-tcp-127.0.0.1%3A1", // the old spelling, a unit name
        "herder/bogus",
        "herder/listen",
        "herder/listen-tcp",
        "herder/listen-sctp-127.0.0.1%3A1",
        "herder/listen-tcp-127.0.0.1:1",      // a raw ':'
        "herder/listen-tcp-127.0.0.1%3a1",    // lower-case escape
        "herder/listen-tcp-127.0.0.1%3A%31",  // an escaped plain byte
        "herder/listen-tcp-127.0.0.1%3",      // a cut escape
        "herder/listen-tcp-localhost%3A1",    // not what a SocketAddr prints
        "herder/listen.0-tcp-127.0.0.1%3A1",  // copy 0 is not written
        "herder/listen.01-tcp-127.0.0.1%3A1", // nor a leading zero
        "herder/slot01-tcp-127.0.0.1%3A1",
        "herder/slot-tcp-127.0.0.1%3A1",
        "herder/slotx-tcp-127.0.0.1%3A1",
        "herder/health.1-tcp-127.0.0.1%3A1",
        "herder/listen-unix.hex-2f61", // hex only when escaping does not fit
        "herder/listen-unix.hex-2f6",
        "Herder-listen-tcp-127.0.0.1%3A1",
    ] {
        assert_eq!(parse(bad), None, "{bad:?}");
    }
    assert!(name::is_herders("herder/bogus"));
    // A socket unit's default FileDescriptorName= is its unit name, which has no '/'.
    assert!(!name::is_herders("herder-app.socket"));
    assert!(!name::is_herders("http"));
    assert!(!name::is_herders("herder"));
}

#[test]
fn copies_count_earlier_equal_addresses() {
    let (a, b) = (tcp("127.0.0.1:0"), tcp("127.0.0.1:1"));
    let got = name::copies([Some(&a), Some(&b), None, Some(&a), Some(&a), Some(&b)]);
    assert_eq!(got, [0, 0, 0, 1, 2, 1]);
}

#[test]
fn fdstore_env_and_flag() {
    let w = |v: Option<&str>, flag| wanted(v.map(OsStr::new), flag);
    assert_eq!(w(Some("16"), false), (true, Some(16)));
    assert_eq!(w(Some("16"), true), (true, Some(16)));
    assert_eq!(w(None, false), (false, None));
    assert_eq!(w(None, true), (true, None));
    for off in ["0", "", "-1", "+3", " 3", "x", "99999999999999999999999"] {
        assert_eq!(w(Some(off), false), (false, None), "{off:?}");
        assert_eq!(w(Some(off), true), (true, None), "{off:?}");
    }
}

const ME: u32 = 1000;

fn asked(addr: &Addr, reuseport: bool) -> Want<'_> {
    Want::Asked { addr, reuseport }
}

fn listening(local: Addr) -> Facts {
    let ty = if matches!(local, Addr::Udp(_)) {
        SockType::Datagram
    } else {
        SockType::Stream
    };
    Facts {
        socket: true,
        ty: Some(ty),
        listening: ty == SockType::Stream,
        reuseport: false,
        owner: ME,
        file: matches!(local, Addr::UnixPath(_)),
        local: Some(local),
    }
}

#[test]
fn a_stored_socket_is_used_only_when_it_is_what_is_asked_for() {
    let any_port = tcp("127.0.0.1:0");
    let p8080 = tcp("127.0.0.1:8080");
    let ok = listening(tcp("127.0.0.1:40000"));
    assert_eq!(judge(&asked(&any_port, false), &ok, ME), Ok(()));
    assert_eq!(
        judge(&asked(&tcp("127.0.0.1:40000"), false), &ok, ME),
        Ok(())
    );
    let moved = Mismatch::Address {
        found: Some("127.0.0.1:40000".into()),
    };
    assert_eq!(judge(&asked(&p8080, false), &ok, ME), Err(moved.clone()));
    assert_eq!(
        judge(&asked(&tcp("0.0.0.0:0"), false), &ok, ME),
        Err(moved.clone())
    );
    assert_eq!(
        judge(&asked(&tcp("[::1]:0"), false), &ok, ME),
        Err(Mismatch::Address {
            found: Some("127.0.0.1:40000".into())
        })
    );
    // A sibling must be bound exactly where its listener is, with SO_REUSEPORT.
    let sib = Facts {
        reuseport: true,
        ..ok.clone()
    };
    let at = tcp("127.0.0.1:40000");
    assert_eq!(judge(&Want::SiblingOf { addr: &at }, &sib, ME), Ok(()));
    assert_eq!(
        judge(&Want::SiblingOf { addr: &any_port }, &sib, ME),
        Err(moved)
    );
    assert_eq!(
        judge(&Want::SiblingOf { addr: &at }, &ok, ME),
        Err(Mismatch::ReusePort { want: true })
    );
    assert_eq!(
        judge(&asked(&any_port, false), &sib, ME),
        Err(Mismatch::ReusePort { want: false })
    );
    assert_eq!(judge(&asked(&any_port, true), &sib, ME), Ok(()));
    // The facts that make it something else.
    let not_socket = Facts {
        socket: false,
        ty: None,
        local: None,
        ..ok.clone()
    };
    assert_eq!(
        judge(&asked(&any_port, false), &not_socket, ME),
        Err(Mismatch::NotASocket)
    );
    let udp = listening(Addr::Udp("127.0.0.1:40000".parse().unwrap()));
    assert_eq!(
        judge(&asked(&any_port, false), &udp, ME),
        Err(Mismatch::Type)
    );
    assert_eq!(
        judge(
            &asked(&Addr::Udp("127.0.0.1:0".parse().unwrap()), false),
            &udp,
            ME
        ),
        Ok(())
    );
    let unlistened = Facts {
        listening: false,
        ..ok.clone()
    };
    assert_eq!(
        judge(&asked(&any_port, false), &unlistened, ME),
        Err(Mismatch::NotListening)
    );
    // Another uid's socket can take no siblings of herder's; without SO_REUSEPORT that is moot.
    assert_eq!(
        judge(&asked(&any_port, true), &sib, 0),
        Err(Mismatch::Owner { owner: ME })
    );
    assert_eq!(
        judge(&Want::SiblingOf { addr: &at }, &sib, 0),
        Err(Mismatch::Owner { owner: ME })
    );
    assert_eq!(judge(&asked(&any_port, false), &ok, 0), Ok(()));
    let unbound = Facts { local: None, ..ok };
    assert_eq!(
        judge(&asked(&any_port, false), &unbound, ME),
        Err(Mismatch::Address { found: None })
    );
}

#[test]
fn a_unix_socket_must_still_have_its_file() {
    let path = Addr::UnixPath("/run/app.sock".into());
    let want = Want::Asked {
        addr: &path,
        reuseport: true,
    };
    let f = listening(path.clone());
    assert_eq!(
        judge(&want, &f, ME),
        Ok(()),
        "SO_REUSEPORT means nothing here"
    );
    let gone = Facts { file: false, ..f };
    assert_eq!(judge(&want, &gone, ME), Err(Mismatch::FileGone));
    let other = listening(Addr::UnixPath("/run/other.sock".into()));
    assert!(matches!(
        judge(&want, &other, ME),
        Err(Mismatch::Address { .. })
    ));
    let abs = Addr::UnixAbstract(b"app".to_vec());
    let want = Want::Asked {
        addr: &abs,
        reuseport: false,
    };
    assert_eq!(judge(&want, &listening(abs.clone()), ME), Ok(()));
    assert!(judge(&want, &listening(Addr::UnixAbstract(b"ap".to_vec())), ME).is_err());
}

fn inet() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        (any::<u128>(), any::<u16>(), any::<u32>()).prop_map(|(ip, port, scope)| {
            std::net::SocketAddrV6::new(ip.into(), port, 0, scope).into()
        }),
    ]
}

/// Every address `--listen` can hold (a unix path or abstract name of at most 107 bytes).
fn addr() -> impl Strategy<Value = Addr> {
    prop_oneof![
        inet().prop_map(Addr::Tcp),
        inet().prop_map(Addr::Udp),
        prop::collection::vec(any::<u8>(), 0..=106).prop_map(|b| {
            let path: Vec<u8> = std::iter::once(b'/').chain(b).collect();
            Addr::UnixPath(PathBuf::from(OsString::from_vec(path)))
        }),
        prop::collection::vec(any::<u8>(), 1..=107).prop_map(Addr::UnixAbstract),
    ]
}

fn id(
    slots: impl Strategy<Value = u32>,
    copies: impl Strategy<Value = u32> + Clone,
) -> impl Strategy<Value = Id> {
    prop_oneof![
        (addr(), copies.clone()).prop_map(|(addr, copy)| Id::Listen { addr, copy }),
        (slots, addr(), copies).prop_map(|(slot, addr, copy)| Id::Sibling { slot, addr, copy }),
        addr().prop_map(|addr| Id::Health { addr }),
    ]
}

proptest! {
    #[test]
    fn every_socket_has_a_valid_name_that_parses_back_to_it(
        id in id(0..100_000u32, 0..10_000u32)
    ) {
        let n = id.name().expect("fits");
        prop_assert!(valid_fdname(&n), "{n}");
        prop_assert!(n.starts_with(PREFIX) && name::is_herders(&n));
        prop_assert_eq!(parse(&n), Some(id));
    }

    #[test]
    fn any_slot_and_copy_name_validly_or_not_at_all(id in id(any::<u32>(), any::<u32>())) {
        if let Some(n) = id.name() {
            prop_assert!(valid_fdname(&n) && n.len() <= FDNAME_MAX, "{n}");
            prop_assert_eq!(parse(&n), Some(id));
        }
    }

    #[test]
    fn what_parses_is_spelled_the_one_way_herder_writes_it(
        s in prop_oneof![
            any::<String>(),
            "herder/(listen|health|slot[0-9]{1,3})(\\.[0-9]{1,2})?-(tcp|udp|unix|abstract)(\\.hex)?-[0-9a-fA-F%:./\\[\\]]{0,30}",
        ]
    ) {
        if let Some(id) = parse(&s) {
            prop_assert_eq!(id.name(), Some(s.clone()));
            prop_assert!(valid_fdname(&s));
        }
    }
}

#[test]
fn after_an_upgrade_nothing_is_pushed_again_and_slots_are_mirrored_as_before() {
    use crate::listen::{ListenSpec, SocketSet};
    use std::os::unix::net::UnixDatagram;
    let dir = std::env::temp_dir().join(format!("herder-unit-fdstore-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify");
    let _ = std::fs::remove_file(&path);
    let systemd = UnixDatagram::bind(&path).unwrap();
    systemd.set_nonblocking(true).unwrap();
    let next = || {
        let mut buf = [0u8; 512];
        let n = systemd.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).to_string())
    };
    // What the earlier image had: a --listen socket with siblings for slots 1 and 2.
    let spec: ListenSpec = "127.0.0.1:0".parse().unwrap();
    let l = crate::listen::bind(&spec, true).unwrap();
    let port = socket2::SockRef::from(&l.fd)
        .local_addr()
        .unwrap()
        .as_socket()
        .unwrap()
        .port();
    let mut sockets = SocketSet::new(vec![l], true).unwrap();
    sockets.prepare(3).unwrap();
    let m = crate::manager::Manager::new(path.to_str().unwrap()).unwrap();
    let fdstore = Some(OsStr::new("16"));
    let mut store = FdStore::resumed(fdstore, false, Some(&m), &[spec], None, &mut sockets, 3);
    assert_eq!(next(), None, "stored already: nothing sent");
    let slot2 = format!("herder/slot2-tcp-127.0.0.1%3A{port}");
    sockets.release(2, Vec::new());
    store.sync(&mut sockets);
    assert_eq!(next(), Some(format!("FDSTOREREMOVE=1\nFDNAME={slot2}\n")));
    sockets.fds_for(2).unwrap();
    store.sync(&mut sockets);
    assert_eq!(next(), Some(format!("FDSTORE=1\nFDNAME={slot2}\n")));
    assert_eq!(next(), None);
    let _ = std::fs::remove_dir_all(&dir);
}
