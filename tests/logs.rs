//! herder's log lines read on their own. Under systemd, `journalctl -u app` and `systemctl
//! status app` show only the message, so the slot, the pid and the exit status must be in its
//! words — and the structured fields (`slot=`, `pid=`, `status=` on stderr; `HERDER_SLOT=`,
//! `HERDER_PID=`, … in the journal) stay beside them.

mod common;

use std::path::Path;

use common::*;

/// Each slot's first worker writes its pid (the shell's `$$`, which `exec sleep` keeps) to
/// `$D/firstS`; slot 0's first worker then exits 3, the others sleep until signalled.
const WORKER: &str = r#"
f="$D/first$HERDER_WORKER"
if [ ! -e "$f" ]; then
    echo $$ > "$f.tmp" && mv "$f.tmp" "$f"
    if [ "$HERDER_WORKER" = 0 ]; then exit 3; fi
fi
exec sleep 600
"#;

/// The pid slot `slot`'s first worker wrote: known to the test without herder's word for it.
fn first_pid(dir: &Path, slot: usize) -> i32 {
    let path = dir.join(format!("first{slot}"));
    let mut pid = None;
    eventually(&format!("{} to be written", path.display()), LONG, || {
        pid = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        pid.is_some()
    });
    pid.unwrap()
}

#[test]
fn a_worker_exit_a_kill_a_reload_and_a_stop_are_told_in_words() {
    let dir = TempDir::new("logs");
    let mut cmd = herder_cmd(&["-w", "2"], &["sh", "-c", WORKER]);
    cmd.env("D", dir.path());
    let mut h = Herder::spawn(cmd);

    let pid0 = first_pid(dir.path(), 0);
    h.wait_line(
        &[&format!("worker 0 (pid {pid0}) spawned, generation 1")],
        LONG,
    );
    h.wait_line(&[&format!("worker 0 (pid {pid0}) ready")], LONG);
    let exit = h.wait_line(
        &[&format!("worker 0 (pid {pid0}) exited with status 3")],
        LONG,
    );
    // The structured fields are still there, unchanged.
    for f in ["slot=0", &format!("pid={pid0}"), "status=exit status 3"] {
        assert!(exit.contains(f), "{f} missing from {exit:?}");
    }
    h.wait_line(
        &["worker 0 restarting in 100 ms (backoff after 1 failed start)"],
        LONG,
    );
    h.wait_line(&["pool ready: 2/2 workers"], LONG);

    let pid1 = first_pid(dir.path(), 1);
    // SAFETY: kill(2) on the pid a worker of our herder wrote.
    unsafe { libc::kill(pid1, libc::SIGKILL) };
    h.wait_line(
        &[&format!(
            "worker 1 (pid {pid1}) killed by signal 9 (SIGKILL)"
        )],
        LONG,
    );
    h.wait_nth_line(&["worker 1 (pid", SPAWNED], 2, LONG);

    h.signal(libc::SIGHUP);
    h.wait_line(
        &["reload requested: rolling the pool to generation 2"],
        LONG,
    );
    h.wait_line(&["worker 0 (pid", ") spawned, generation 2"], LONG);
    h.wait_line(&["worker 1 (pid", ") spawned, generation 2"], LONG);
    h.wait_line(
        &["reload complete: generation 2 serving, 2/2 workers ready"],
        LONG,
    );

    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
    assert_eq!(h.count(&["stop requested: draining the pool"]), 1);
    assert!(
        h.count(&[") killed by signal 15 (SIGTERM)"]) >= 2,
        "the drained workers"
    );
    assert_eq!(h.count(&["pool stopped: herder exits with status 0"]), 1);
}
