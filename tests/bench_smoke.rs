//! Smoke test of the benchmark suite: `bench/run --quick --smoke` must run every section end to
//! end (< 90 s) against the binaries cargo just built, writing into a temp dir, never over the
//! committed bench/RESULTS.md. The numbers are not checked: the machine is shared and noisy.
//! Section 10 runs without its Node peers in smoke mode (herder-demo only, ~4 s, plus ~2 s for
//! its crash-looping-slot part: two 4-worker herders, 0.5 s of load each).
//!
//! Prerequisites (wrk, node, python3, rustc; bench/install-deps.sh) missing: prints
//! `skipping: <why>` and passes, unless CI=true, where a missing prerequisite is a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn skip_or_fail(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("bench smoke prerequisite missing under CI=true: {why} (run bench/install-deps.sh)");
    }
    eprintln!("skipping: {why}");
}

#[test]
fn bench_run_quick_smoke_runs_end_to_end() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for tool in ["wrk", "node", "python3", "rustc"] {
        if !on_path(tool) {
            return skip_or_fail(&format!("{tool} not found (bench/install-deps.sh)"));
        }
    }
    let out: PathBuf =
        std::env::temp_dir().join(format!("herder-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).expect("create the output dir");
    // The suite's progress log goes to a file, shown only when something fails.
    let log_path = out.join("bench.log");
    let log = std::fs::File::create(&log_path).expect("create bench.log");

    let started = Instant::now();
    let mut child = Command::new("python3")
        .arg(root.join("bench/run"))
        .args(["--quick", "--smoke", "--out"])
        .arg(&out)
        .env("HERDER_BIN", env!("CARGO_BIN_EXE_herder"))
        .env("HERDER_DEMO_BIN", env!("CARGO_BIN_EXE_herder-demo"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start bench/run");
    // Every wait has a deadline: 90 s is the smoke budget, plus slack for a loaded machine.
    let deadline = Duration::from_secs(180);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait bench/run") {
            break st;
        }
        if started.elapsed() > deadline {
            let _ = child.kill(); // by its pid; bench/run stops its own processes at exit
            let _ = child.wait();
            panic!(
                "bench/run --quick --smoke did not finish within {deadline:?}\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut stdout = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    eprintln!("{stdout}(took {:.0?})", started.elapsed());

    let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        status.success(),
        "bench/run --quick --smoke failed: {status}\n{log_text}"
    );
    assert!(
        stdout.contains("sections run: 9/9"),
        "not every section ran: {stdout}"
    );
    let results = std::fs::read_to_string(out.join("RESULTS.md")).expect("RESULTS.md written");
    for heading in [
        "## 1. Request path",
        "## 2. Against the peers",
        "## 3. Reload under load",
        "## 4. Crash under load",
        "## 5. Weight",
        "## 6. Scale and reaction",
        "## 7. Fairness",
        "## 9. Recycling",
        "## 10. Sticky sessions",
    ] {
        assert!(results.contains(heading), "RESULTS.md lacks {heading:?}");
    }
    assert!(
        !results.contains("section crashed"),
        "a section crashed:\n{results}"
    );
    // herder itself must have been measured: its row in the request-path table.
    assert!(
        results.contains("| herder | "),
        "herder was not measured:\n{results}"
    );
    assert!(out.join("results.svg").exists(), "results.svg written");
    let _ = std::fs::remove_dir_all(&out);
}
