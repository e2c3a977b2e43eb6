//! Reading `/proc`: each file with one bounded read into a fixed buffer, whatever the file
//! says (a process's `/proc` files are shaped by that process: herder never reads an unbounded
//! amount because of one). The bytes go to [`super::parse`]; this module only opens, reads and
//! maps the outcome. A process that is gone is an `Err`, for the caller to skip.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::sync::OnceLock;

use super::parse::{self, Stat};

/// `stat` is about 350 bytes (52 numbers and a comm of at most 64); the fields read are within
/// the first 300. A longer file is cut, and what is cut is never read.
const STAT_MAX: usize = 1024;
/// `smaps_rollup` is about 1 KB; `Pss:` is its third line.
const ROLLUP_MAX: usize = 4096;
/// `statm`: seven numbers.
const STATM_MAX: usize = 256;
/// One thread's `children`: up to about 4,000 pids; more are not measured (see
/// [`parse::pids`]: a cut pid is dropped, never misread).
pub const CHILDREN_MAX: usize = 32 * 1024;

/// Reads `path` until EOF or until `buf` is full; the bytes and whether `buf` filled up.
pub fn bounded<'b>(path: &str, buf: &'b mut [u8]) -> io::Result<(&'b [u8], bool)> {
    let mut f = File::open(path)?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((&buf[..n], n == buf.len()))
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("unreadable {what}"))
}

/// `/proc/PID/stat` (`self` for herder's own).
pub fn stat(pid: impl std::fmt::Display) -> io::Result<Stat> {
    let mut buf = [0u8; STAT_MAX];
    let (bytes, _) = bounded(&format!("/proc/{pid}/stat"), &mut buf)?;
    parse::stat(bytes).ok_or_else(|| invalid("stat"))
}

/// The PSS of `/proc/PID/smaps_rollup`, in bytes. The kernel refuses the file (ESRCH) for a
/// zombie and for a kernel thread; EACCES when herder may not ptrace-read the process (not
/// root, and the process is another uid's or not dumpable).
pub fn pss(pid: impl std::fmt::Display) -> io::Result<u64> {
    let mut buf = [0u8; ROLLUP_MAX];
    let (bytes, _) = bounded(&format!("/proc/{pid}/smaps_rollup"), &mut buf)?;
    parse::pss(bytes).ok_or_else(|| invalid("smaps_rollup"))
}

/// herder's own resident pages, from `/proc/self/statm`.
pub fn own_resident_pages() -> io::Result<u64> {
    let mut buf = [0u8; STATM_MAX];
    let (bytes, _) = bounded("/proc/self/statm", &mut buf)?;
    parse::statm_resident(bytes).ok_or_else(|| invalid("statm"))
}

/// Whether this kernel has `task/TID/children` (CONFIG_PROC_CHILDREN, proc(5)); checked once,
/// on herder's own thread.
pub fn have_children_files() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| std::path::Path::new("/proc/thread-self/children").exists())
}

/// The children of every thread of `pid` (a thread's children are listed under that thread:
/// proc(5), `/proc/PID/task/TID/children`). Empty when the process is gone.
pub fn children(pid: u32, buf: &mut [u8], out: &mut Vec<u32>) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for task in tasks.flatten() {
        let name = task.file_name();
        let Some(tid) = name.to_str() else { continue };
        let path = format!("/proc/{pid}/task/{tid}/children");
        if let Ok((bytes, full)) = bounded(&path, buf) {
            out.extend(parse::pids(bytes, full));
        }
    }
}

/// Without children files: every process's children, from the ppid in each `/proc/*/stat`.
/// One pass over `/proc`, costlier than the files; only used on kernels that lack them.
pub fn children_by_ppid() -> HashMap<u32, Vec<u32>> {
    let mut table: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return table;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let (Ok(num), Ok(st)) = (pid.parse::<u32>(), stat(pid)) else {
            continue; // gone meanwhile
        };
        table.entry(st.ppid).or_default().push(num);
    }
    table
}
