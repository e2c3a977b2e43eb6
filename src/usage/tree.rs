//! A worker's process tree and what it uses: the worker and every live descendant (found
//! through `task/TID/children`, or the ppid of every process where the kernel has no children
//! files), PSS summed over them, CPU summed over them. A process that exits during the walk is
//! skipped: the tree is whatever is alive while it is read, never an error. A descendant
//! whose parent exited (a daemon's double fork) is reparented to herder, the subreaper, and is
//! then in no worker's tree.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::read;

/// Processes measured per tree at most: a worker that forks without end costs a bounded walk
/// (about 4 opens per process), and what lies beyond is not counted.
pub const MAX_TREE: usize = 4096;

/// What a worker's process tree uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// The proportional set size summed over the tree: a page shared by k processes counts
    /// 1/k in each, so the sum counts it once (a forked helper's copy-on-write pages are not
    /// counted twice, as RSS would).
    pub pss_bytes: u64,
    /// CPU time of the live tree, user and system: each process's own, plus that of its
    /// exited children it waited for (so that the total does not drop when a helper exits).
    pub cpu: Duration,
    /// How many processes were measured (1: the worker alone).
    pub processes: u32,
}

/// `pid` first, then its descendants breadth first, each once (pids may be reused while the
/// walk runs: a cycle ends there), at most [`MAX_TREE`].
pub fn walk(root: u32, mut children: impl FnMut(u32, &mut Vec<u32>)) -> Vec<u32> {
    let mut seen = HashSet::from([root]);
    let mut order = vec![root];
    let mut kids = Vec::new();
    let mut next = 0;
    while next < order.len() && order.len() < MAX_TREE {
        kids.clear();
        children(order[next], &mut kids);
        for &k in &kids {
            if order.len() < MAX_TREE && seen.insert(k) {
                order.push(k);
            }
        }
        next += 1;
    }
    order
}

/// The pids of `root`'s tree, from the children files or, lacking them, one scan of `/proc`.
pub fn members(root: u32) -> Vec<u32> {
    if read::have_children_files() {
        let mut buf = vec![0u8; read::CHILDREN_MAX];
        walk(root, |pid, out| read::children(pid, &mut buf, out))
    } else {
        members_by_ppid(root)
    }
}

/// The same from the ppid of every process (the fallback; tested against the files).
pub fn members_by_ppid(root: u32) -> Vec<u32> {
    let table: HashMap<u32, Vec<u32>> = read::children_by_ppid();
    walk(root, |pid, out| {
        out.extend(table.get(&pid).into_iter().flatten());
    })
}

/// What the process `pid` and its live descendants use; `None` when `pid` is gone or herder
/// may not read its memory (a worker of another uid while herder is not root, or one that
/// made itself undumpable): no measurement, rather than a wrong one.
pub fn tree_usage(pid: u32) -> Option<TreeUsage> {
    let root = read::stat(pid).ok()?;
    let pss = match read::pss(pid) {
        Ok(b) => b,
        // Exited, not yet reaped: it holds no memory.
        Err(_) if root.is_zombie() => 0,
        Err(_) => return None,
    };
    let mut usage = TreeUsage {
        pss_bytes: pss,
        cpu: ticks(root.tree_ticks()),
        processes: 1,
    };
    for p in members(pid).into_iter().skip(1) {
        let Ok(st) = read::stat(p) else {
            continue; // gone
        };
        // A zombie, or a descendant herder may not read (it exec'd a setuid program): no PSS.
        usage.pss_bytes = usage.pss_bytes.saturating_add(read::pss(p).unwrap_or(0));
        usage.cpu = usage.cpu.saturating_add(ticks(st.tree_ticks()));
        usage.processes += 1;
    }
    Some(usage)
}

/// Clock ticks as a duration.
pub fn ticks(n: u64) -> Duration {
    let hz = super::clock_ticks_per_second();
    Duration::from_secs(n / hz) + Duration::from_nanos((n % hz) * 1_000_000_000 / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from<'a>(table: &'a [(u32, &'a [u32])]) -> impl FnMut(u32, &mut Vec<u32>) + 'a {
        move |pid, out| {
            if let Some((_, k)) = table.iter().find(|(p, _)| *p == pid) {
                out.extend_from_slice(k);
            }
        }
    }

    #[test]
    fn walks_breadth_first_each_once() {
        let t: &[(u32, &[u32])] = &[(1, &[2, 3]), (2, &[4]), (3, &[5, 2]), (4, &[1])];
        assert_eq!(walk(1, from(t)), vec![1, 2, 3, 4, 5]);
        assert_eq!(walk(9, from(t)), vec![9]);
    }

    #[test]
    fn a_fork_bomb_is_walked_to_the_bound() {
        let mut n = 100;
        let tree = walk(1, |_, out| {
            for _ in 0..10 {
                n += 1;
                out.push(n);
            }
        });
        assert_eq!(tree.len(), MAX_TREE);
    }

    #[test]
    fn ticks_are_seconds_over_clk_tck() {
        let hz = crate::usage::clock_ticks_per_second();
        assert_eq!(ticks(hz * 3), Duration::from_secs(3));
        assert_eq!(ticks(0), Duration::ZERO);
        let _ = ticks(u64::MAX); // no overflow
    }

    /// This test process with two children, one of which has two of its own.
    #[test]
    fn measures_a_real_tree_both_ways() {
        use std::os::unix::process::CommandExt;
        let mut outer = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30; wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let mut plain = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        // Until sh has forked both sleeps.
        while members(outer.id()).len() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Other tests of this process fork too: compare the subtrees that are ours alone.
        let mut by_files = members(outer.id());
        assert_eq!((by_files.len(), by_files[0]), (3, outer.id()));
        let mut by_ppid = members_by_ppid(outer.id());
        by_files.sort_unstable();
        by_ppid.sort_unstable();
        assert_eq!(by_files, by_ppid);
        let me = std::process::id();
        let mine = members(me);
        assert!(mine.contains(&outer.id()) && mine.contains(&plain.id()));

        let sh = tree_usage(outer.id()).unwrap();
        assert_eq!(sh.processes, 3);
        let alone = tree_usage(plain.id()).unwrap();
        assert_eq!(alone.processes, 1);
        assert!(
            alone.pss_bytes > 0 && alone.pss_bytes < sh.pss_bytes,
            "{alone:?} {sh:?}"
        );
        let all = tree_usage(me).unwrap();
        assert!(
            all.processes >= 5 && all.pss_bytes > sh.pss_bytes,
            "{all:?}"
        );

        // SAFETY: kill(2) on the process group of our own child.
        unsafe { libc::kill(-(outer.id() as i32), libc::SIGKILL) };
        let _ = plain.kill();
        let _ = outer.wait();
        let _ = plain.wait();
        assert_eq!(tree_usage(plain.id()), None, "a reaped pid is gone");
    }
}
