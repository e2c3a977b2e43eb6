//! Unit and property tests of every parser here: `--listen` specs and LISTEN_*.

use super::inherit::*;
use super::*;
use proptest::prelude::*;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

#[test]
fn parses_the_documented_forms() {
    let s: ListenSpec = "127.0.0.1:8080".parse().unwrap();
    assert_eq!(s.addr, Addr::Tcp("127.0.0.1:8080".parse().unwrap()));
    assert_eq!(s.name, None);
    let s: ListenSpec = "web=[::1]:80".parse().unwrap();
    assert_eq!(s.name.as_deref(), Some("web"));
    assert_eq!(s.addr, Addr::Tcp("[::1]:80".parse().unwrap()));
    let s: ListenSpec = "udp:0.0.0.0:53".parse().unwrap();
    assert_eq!(s.addr, Addr::Udp("0.0.0.0:53".parse().unwrap()));
    let s: ListenSpec = "unix:/run/app.sock".parse().unwrap();
    assert_eq!(s.addr, Addr::UnixPath("/run/app.sock".into()));
    let s: ListenSpec = "ctl=unix:@app".parse().unwrap();
    assert_eq!(s.addr, Addr::UnixAbstract(b"app".to_vec()));
    let s: ListenSpec = "localhost:9".parse().unwrap();
    assert_eq!(s.addr, Addr::Tcp("127.0.0.1:9".parse().unwrap()));
}

#[test]
fn rejects_garbage() {
    for bad in [
        "",
        "8080",
        "host:port",
        "1.2.3.4",
        "unix:",
        "unix:relative",
        "udp:x",
        "bad:name=1.2.3.4:1",
    ] {
        assert!(bad.parse::<ListenSpec>().is_err(), "{bad} should not parse");
    }
}

#[test]
fn a_spec_displays_as_it_is_written() {
    for text in [
        "127.0.0.1:8080",
        "web=[::1]:80",
        "dns=udp:0.0.0.0:53",
        "unix:/run/app.sock",
        "ctl=unix:@app",
    ] {
        assert_eq!(text.parse::<ListenSpec>().unwrap().to_string(), text);
    }
}

fn env(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> InheritedEnv {
    InheritedEnv {
        listen_pid: pid.map(OsString::from),
        listen_fds: fds.map(OsString::from),
        listen_fdnames: names.map(OsString::from),
    }
}

const ME: u32 = 4242;

fn parsed(fds: &str, names: Option<&str>) -> Result<Option<(usize, Vec<String>)>, String> {
    parse_env(&env(Some("4242"), Some(fds), names), ME).map_err(|e| e.to_string())
}

#[test]
fn listen_env_for_us() {
    assert_eq!(parsed("2", None), Ok(Some((2, vec!["unknown".into(); 2]))));
    assert_eq!(
        parsed("2", Some("web:")),
        Ok(Some((2, vec!["web".into(), String::new()])))
    );
    assert_eq!(parsed("0", Some("anything")), Ok(None));
    assert_eq!(parsed("0004", None).unwrap().unwrap().0, 4);
    let longest = "n".repeat(FDNAME_MAX);
    assert_eq!(parsed("1", Some(&longest)), Ok(Some((1, vec![longest]))));
    let max = MAX_LISTEN_FDS.to_string();
    assert_eq!(parsed(&max, None).unwrap().unwrap().1.len(), MAX_LISTEN_FDS);
}

#[test]
fn listen_env_not_for_us() {
    assert!(parse_env(&env(None, Some("1"), None), ME)
        .unwrap()
        .is_none());
    assert!(parse_env(&env(Some("4242"), None, None), ME)
        .unwrap()
        .is_none());
    // Another process's values are not ours to judge, however odd.
    let other = env(Some("4243"), Some("4611686018427387904"), Some("\n"));
    assert!(parse_env(&other, ME).unwrap().is_none());
}

#[test]
fn listen_env_refused() {
    let cases: &[(&str, Option<&str>, &str)] = &[
        ("three", None, "LISTEN_FDS=three: not a number"),
        ("-1", None, "LISTEN_FDS=-1: not a number"),
        ("+1", None, "LISTEN_FDS=+1: not a number"),
        (" 1", None, "LISTEN_FDS= 1: not a number"),
        ("1\n", None, "LISTEN_FDS=1\\n: not a number"),
        ("", None, "LISTEN_FDS=: not a number"),
        ("4097", None, "LISTEN_FDS=4097: out of range (at most 4096"),
        ("2147483648", None, "LISTEN_FDS=2147483648: out of range"),
        ("4611686018427387904", None, "out of range"),
        ("99999999999999999999999", None, "out of range"),
        (
            "1",
            Some("a:b"),
            "LISTEN_FDNAMES has 2 names but LISTEN_FDS=1",
        ),
        (
            "2",
            Some("a"),
            "LISTEN_FDNAMES has 1 names but LISTEN_FDS=2",
        ),
        (
            "2",
            Some("a:b\tc"),
            "name 2 of 2 has a control or non-ASCII byte",
        ),
        (
            "1",
            Some("café"),
            "name 1 of 1 has a control or non-ASCII byte",
        ),
    ];
    for &(fds, names, expect) in cases {
        let e = parsed(fds, names).unwrap_err();
        assert!(
            e.contains(expect),
            "LISTEN_FDS={fds:?}: {e:?} lacks {expect:?}"
        );
    }
    let long = "n".repeat(FDNAME_MAX + 1);
    let e = parsed("1", Some(&long)).unwrap_err();
    assert_eq!(
        e,
        "LISTEN_FDNAMES: name 1 of 1 is 256 bytes long (at most 255)"
    );
    let junk = OsString::from_vec(vec![b'a', 0xff]);
    let e = parse_env(
        &InheritedEnv {
            listen_fdnames: Some(junk),
            ..env(Some("4242"), Some("1"), None)
        },
        ME,
    );
    assert!(matches!(
        e,
        Err(ListenError::NameInvalid { index: 1, count: 1 })
    ));
    for pid in ["0", "x", "-4242", "+4242", " 4242", "4294967296"] {
        let e = parse_env(&env(Some(pid), Some("1"), None), ME).unwrap_err();
        assert!(e
            .to_string()
            .starts_with(&format!("LISTEN_PID={pid}: not a number")));
    }
}

#[test]
fn a_huge_value_is_shown_cut_short() {
    let e = parsed(&"9".repeat(100_000), None).unwrap_err();
    assert!(e.len() < 120, "{e}");
    assert!(e.contains("9999…: out of range"), "{e}");
}

/// Bytes allocated on this thread: the property tests below check that parsing LISTEN_*
/// allocates in proportion to the input's length or to a checked count, never to a number
/// it read. (A counting wrapper around the system allocator, for this test binary only.)
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Counting;

    thread_local! {
        static ALLOCATED: Cell<usize> = const { Cell::new(0) };
    }

    // SAFETY: every call is forwarded unchanged to `System`; the counter is a
    // const-initialized thread-local without a destructor, which never allocates.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = ALLOCATED.try_with(|a| a.set(a.get().saturating_add(layout.size())));
            // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from `System.alloc` with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    /// What `f` allocated (in bytes, frees not subtracted) and its result.
    pub fn allocated<T>(f: impl FnOnce() -> T) -> (usize, T) {
        let before = ALLOCATED.with(Cell::get);
        let out = f();
        (ALLOCATED.with(Cell::get) - before, out)
    }
}

/// The most `parse_env` may allocate for an input of `len` bytes: the names it copies (and
/// their list), a message quoting at most 40 characters, and the default names for the
/// largest count it accepts.
fn allocation_bound(len: usize) -> usize {
    let list = MAX_LISTEN_FDS * (std::mem::size_of::<String>() + "unknown".len());
    2 * len + list + 1024
}

fn env_value() -> impl Strategy<Value = Option<OsString>> {
    let bytes = prop::collection::vec(any::<u8>(), 0..300).prop_map(OsString::from_vec);
    let digits = "[0-9]{1,30}".prop_map(OsString::from);
    let near = prop_oneof![Just("4242"), Just("1"), Just("4096"), Just("4097")];
    prop::option::of(prop_oneof![bytes, digits, near.prop_map(OsString::from)])
}

fn names_value() -> impl Strategy<Value = Option<OsString>> {
    let name = prop_oneof!["[ -9;-~]{0,8}", "[\\x00-\\x7f]{0,300}"];
    let joined = prop::collection::vec(name, 0..10).prop_map(|n| OsString::from(n.join(":")));
    let bytes = prop::collection::vec(any::<u8>(), 0..600).prop_map(OsString::from_vec);
    prop::option::of(prop_oneof![joined, bytes])
}

/// A `--listen` spec its parser can produce: names are printable ASCII without `:` (the
/// address separator), `=` (the name separator) and `/` (what tells a path from a name).
fn valid_spec() -> impl Strategy<Value = ListenSpec> {
    let name = prop::option::of("[!-~&&[^:=/]]{1,40}");
    let ip = prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u16; 8]>().prop_map(IpAddr::from),
    ];
    let inet = (ip, any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port));
    let addr = prop_oneof![
        inet.clone().prop_map(Addr::Tcp),
        inet.prop_map(Addr::Udp),
        "/[^\\x00]{0,60}"
            .prop_filter("sun_path holds 107 bytes", |p| p.len() < 108)
            .prop_map(|p| Addr::UnixPath(PathBuf::from(p))),
        "[^\\x00]{1,60}"
            .prop_filter("sun_path holds 107 bytes", |n| n.len() <= 107)
            .prop_map(|n| Addr::UnixAbstract(n.into_bytes())),
    ];
    (name, addr).prop_map(|(name, addr)| ListenSpec { name, addr })
}

proptest! {
    #[test]
    fn the_listen_env_parser_never_panics_nor_allocates_from_a_number(
        pid in prop_oneof![Just(Some(OsString::from("4242"))), env_value()],
        fds in env_value(),
        names in names_value(),
    ) {
        let len = [&pid, &fds, &names]
            .iter()
            .map(|v| v.as_ref().map_or(0, |v| v.len()))
            .sum();
        let env = InheritedEnv { listen_pid: pid, listen_fds: fds, listen_fdnames: names };
        let (bytes, out) = counting::allocated(|| parse_env(&env, ME).map_err(|e| e.to_string()));
        prop_assert!(bytes <= allocation_bound(len), "{bytes} bytes for {len}: {out:?}");
        if let Ok(Some((count, names))) = out {
            prop_assert!((1..=MAX_LISTEN_FDS).contains(&count));
            prop_assert_eq!(names.len(), count);
        }
    }

    #[test]
    fn listen_spec_parsing_never_panics(
        s in prop_oneof![any::<String>(), "[0-9a-z:@=/\\[\\]%.*]{0,40}"]
    ) {
        if let Ok(spec) = s.parse::<ListenSpec>() {
            prop_assert_eq!(spec.to_string().parse::<ListenSpec>(), Ok(spec));
        }
    }

    #[test]
    fn listen_specs_round_trip_through_display(spec in valid_spec()) {
        let text = spec.to_string();
        prop_assert_eq!(text.parse::<ListenSpec>(), Ok(spec), "{}", text);
    }
}

#[test]
fn an_absurd_count_allocates_nothing_much() {
    for fds in [
        "4611686018427387904",
        "2147483648",
        "18446744073709551615",
        "4097",
    ] {
        let env = env(Some("4242"), Some(fds), None);
        let (bytes, out) = counting::allocated(|| parse_env(&env, ME));
        assert!(out.is_err());
        assert!(bytes < 1024, "LISTEN_FDS={fds}: {bytes} bytes");
    }
}
