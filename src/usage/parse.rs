//! Pure parsers of the three `/proc` files usage needs: `smaps_rollup` (`Pss:` and `Rss:`, in
//! kB), `stat` (state, ppid, CPU ticks), `statm` (resident pages), and the pid lists of
//! `task/TID/children`. Bytes in, numbers out, no I/O: every one of these files is written by
//! the kernel but shaped by a process herder does not control (a worker names itself anything,
//! `)` and newlines included), so each parser takes arbitrary bytes, returns `None` for what it
//! cannot read, and never panics (property-tested below).

/// The fields of `/proc/PID/stat` (proc_pid_stat(5)) that usage needs. CPU times are in clock
/// ticks (`sysconf(_SC_CLK_TCK)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: `R`, `S`, `D`, `Z` (zombie), …
    pub state: u8,
    /// Field 4.
    pub ppid: u32,
    /// Fields 14 and 15: CPU time the process spent in user and kernel mode.
    pub utime: u64,
    pub stime: u64,
    /// Fields 16 and 17: the same for its children that have exited and been waited for.
    pub cutime: u64,
    pub cstime: u64,
}

impl Stat {
    /// Its own CPU time and that of its waited-for children, in ticks.
    pub fn tree_ticks(&self) -> u64 {
        self.own_ticks()
            .saturating_add(self.cutime)
            .saturating_add(self.cstime)
    }

    /// Its own CPU time (utime + stime), in ticks.
    pub fn own_ticks(&self) -> u64 {
        self.utime.saturating_add(self.stime)
    }

    pub fn is_zombie(&self) -> bool {
        matches!(self.state, b'Z' | b'X')
    }
}

/// Parses `/proc/PID/stat`: `pid (comm) state ppid … utime stime cutime cstime …`.
///
/// `comm` is what the process says it is called (prctl(PR_SET_NAME), up to 15 bytes): it may
/// contain spaces, parentheses and newlines, so the fields start after the *last* `)` in the
/// file — nothing after `comm` can contain one.
pub fn stat(bytes: &[u8]) -> Option<Stat> {
    let close = bytes.iter().rposition(|&b| b == b')')?;
    let mut fields = bytes[close + 1..]
        .split(u8::is_ascii_whitespace)
        .filter(|f| !f.is_empty());
    let state = match fields.next()? {
        [s] => *s,
        _ => return None,
    };
    let ppid = u32::try_from(number(fields.next()?)?).ok()?;
    // Fields 5 to 13: pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt.
    let mut fields = fields.skip(9);
    let utime = number(fields.next()?)?;
    let stime = number(fields.next()?)?;
    // cutime and cstime are `long` in the kernel's format; never negative in practice.
    let cutime = number(fields.next()?)?;
    let cstime = number(fields.next()?)?;
    Some(Stat {
        state,
        ppid,
        utime,
        stime,
        cutime,
        cstime,
    })
}

/// A `Key:   1234 kB` line's value in bytes, from `/proc/PID/smaps_rollup` (or `status`).
/// `key` includes the colon: `b"Pss:"` is not `Pss_Anon:`.
pub fn kb_line(bytes: &[u8], key: &[u8]) -> Option<u64> {
    let line = bytes.split(|&b| b == b'\n').find(|l| l.starts_with(key))?;
    let rest = trim(&line[key.len()..]);
    let digits = trim(rest.strip_suffix(b"kB")?);
    number(digits)?.checked_mul(1024)
}

/// The proportional set size of `/proc/PID/smaps_rollup`, in bytes.
pub fn pss(smaps_rollup: &[u8]) -> Option<u64> {
    kb_line(smaps_rollup, b"Pss:")
}

/// The resident pages of `/proc/PID/statm` (its second field; statm is in pages).
pub fn statm_resident(bytes: &[u8]) -> Option<u64> {
    let mut fields = bytes
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty());
    fields.next()?;
    number(fields.next()?)
}

/// The pids of a `task/TID/children` file: numbers separated by spaces. `truncated` says the
/// read filled its buffer, so that the last number may be cut short: it is dropped (its
/// process is missed, never mistaken for another).
pub fn pids(bytes: &[u8], truncated: bool) -> Vec<u32> {
    let mut tokens: Vec<&[u8]> = bytes
        .split(|b| b.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
        .collect();
    if truncated && !bytes.last().is_some_and(u8::is_ascii_whitespace) {
        tokens.pop();
    }
    tokens
        .into_iter()
        .filter_map(|t| u32::try_from(number(t)?).ok())
        .filter(|&p| p > 0)
        .collect()
}

/// A plain decimal number: ASCII digits only (no sign, no space), at most `u64::MAX`.
fn number(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    b.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A real line, as 6.x prints it (52 fields).
    const STAT: &[u8] = b"5745 (cat) R 5741 5741 4468 0 -1 4194304 103 0 0 0 7 3 20 4 20 0 1 0 \
52069 3133440 390 18446744073709551615 93890640707584 93890640727465 140720920752688 0 0 0 0 \
0 0 0 0 0 17 1 0 0 0 0 0 93890640743472 93890640745088 93891607707648 140720920758997 \
140720920759017 140720920759017 140720920760299 0\n";

    const ROLLUP: &[u8] =
        b"556eca5e2000-7ffc6a542000 ---p 00000000 00:00 0                          [rollup]
Rss:                1784 kB
Pss:                 493 kB
Pss_Dirty:           112 kB
Pss_Anon:            112 kB
Pss_File:            381 kB
Shared_Clean:       1608 kB
Swap:                  0 kB
";

    #[test]
    fn stat_fields() {
        let s = stat(STAT).unwrap();
        assert_eq!(
            s,
            Stat {
                state: b'R',
                ppid: 5741,
                utime: 7,
                stime: 3,
                cutime: 20,
                cstime: 4
            }
        );
        assert_eq!(s.own_ticks(), 10);
        assert_eq!(s.tree_ticks(), 34);
        assert!(!s.is_zombie());
    }

    #[test]
    fn a_hostile_comm_cannot_shift_the_fields() {
        // A worker that calls itself ") Z 1 1 1 1 1 1 1 1 1 1 1 99 99 99 99" with a newline.
        let line = b"42 () Z 1 1\n 9 9 9 9 9 9 9 99 99 99 99) S 7 1 1 0 -1 0 0 0 0 0 5 6 0 0 20";
        let s = stat(line).unwrap();
        assert_eq!((s.state, s.ppid, s.utime, s.stime), (b'S', 7, 5, 6));
        // A comm with only spaces and parentheses.
        let s = stat(b"1 ( (() ) S 0 1 1 0 -1 0 0 0 0 0 1 2 3 4 20").unwrap();
        assert_eq!(s.tree_ticks(), 10);
    }

    #[test]
    fn a_zombie_or_short_stat() {
        let z = stat(b"9 (x) Z 1 9 9 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 1 0 0").unwrap();
        assert!(z.is_zombie());
        assert_eq!(stat(b"9 (x) S 1 9 9 0 -1 0 0 0 0 0 1 2 3"), None); // cut before cstime
        assert_eq!(stat(b"9 (x"), None);
        assert_eq!(stat(b""), None);
        assert_eq!(stat(b"9 (x) SS 1 9 9 0 -1 0 0 0 0 0 1 2 3 4"), None);
        assert_eq!(stat(b"9 (x) S -1 9 9 0 -1 0 0 0 0 0 1 2 3 4"), None);
        assert_eq!(
            stat(b"9 (x) S 1 9 9 0 -1 0 0 0 0 0 1 99999999999999999999999 3 4"),
            None
        );
    }

    #[test]
    fn rollup_lines() {
        assert_eq!(pss(ROLLUP), Some(493 * 1024));
        assert_eq!(kb_line(ROLLUP, b"Rss:"), Some(1784 * 1024));
        assert_eq!(kb_line(ROLLUP, b"Pss_Anon:"), Some(112 * 1024));
        assert_eq!(pss(b""), None); // a kernel thread, or a process gone
        assert_eq!(pss(b"Pss_Anon: 1 kB\n"), None);
        assert_eq!(pss(b"Pss: 12 MB\n"), None);
        assert_eq!(pss(b"Pss:\t7 kB"), Some(7 * 1024));
        assert_eq!(pss(b"Pss: 18446744073709551615 kB\n"), None); // overflows bytes
    }

    #[test]
    fn statm_and_children() {
        assert_eq!(statm_resident(b"765 435 407 5 0 123 0\n"), Some(435));
        assert_eq!(statm_resident(b"765"), None);
        assert_eq!(pids(b"12 345 6789 ", false), vec![12, 345, 6789]);
        assert_eq!(pids(b"12 345 67", true), vec![12, 345]);
        assert_eq!(pids(b"12 345 ", true), vec![12, 345]);
        assert_eq!(pids(b"", false), Vec::<u32>::new());
        assert_eq!(pids(b"0 x 4294967296 7", false), vec![7]);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = stat(&bytes);
            let _ = pss(&bytes);
            let _ = kb_line(&bytes, b"Rss:");
            let _ = statm_resident(&bytes);
            let _ = pids(&bytes, false);
            let _ = pids(&bytes, true);
        }

        #[test]
        fn any_comm_reads_the_same_fields(
            comm in proptest::collection::vec(any::<u8>(), 0..16),
            state in "[RSDZTtWXIP]",
            ppid in any::<u32>(),
            times in proptest::array::uniform4(0u64..1 << 40),
        ) {
            let mut line = b"4242 (".to_vec();
            line.extend_from_slice(&comm);
            line.extend_from_slice(format!(
                ") {state} {ppid} 1 1 0 -1 4194304 103 0 0 0 {} {} {} {} 20 0 1 0 52069\n",
                times[0], times[1], times[2], times[3]
            ).as_bytes());
            let s = stat(&line).unwrap();
            prop_assert_eq!(s.state, state.as_bytes()[0]);
            prop_assert_eq!(s.ppid, ppid);
            prop_assert_eq!([s.utime, s.stime, s.cutime, s.cstime], times);
        }

        #[test]
        fn a_pss_line_is_found_among_any_others(
            before in proptest::collection::vec("[A-Za-z_]{1,12}: +[0-9]{1,9} kB", 0..8),
            kb in 0u64..1 << 40,
            pad in " {1,20}",
        ) {
            let mut text: String = before
                .iter()
                .filter(|l| !l.starts_with("Pss:"))
                .map(|l| format!("{l}\n"))
                .collect();
            text += &format!("Pss:{pad}{kb} kB\n");
            prop_assert_eq!(pss(text.as_bytes()), Some(kb * 1024));
        }

        #[test]
        fn pid_lists_round_trip(list in proptest::collection::vec(1u32..=4_194_304, 0..50)) {
            let text: String = list.iter().map(|p| format!("{p} ")).collect();
            prop_assert_eq!(pids(text.as_bytes(), false), list.clone());
            // Cut anywhere: never a number that was not in the list.
            for cut in 0..text.len() {
                let got = pids(&text.as_bytes()[..cut], true);
                prop_assert!(got.iter().all(|p| list.contains(p)), "{:?} from {:?}", got, &text[..cut]);
                prop_assert_eq!(&got[..], &list[..got.len()]);
            }
        }
    }
}
