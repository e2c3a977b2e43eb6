//! The man page, herder(1), from the clap definitions: clap_mangen renders the title, NAME,
//! OPTIONS and VERSION; herder writes the sections clap knows nothing of (a SYNOPSIS with the
//! `--`, the client commands on this page rather than in man pages that do not exist, EXIT
//! STATUS, SIGNALS, ENVIRONMENT, EXAMPLES, SEE ALSO) in the order man-pages(7) gives.
//!
//! Only text: it never reads the environment (the page must not depend on who builds it).

use std::io::{self, Write};

use clap_mangen::roff::{bold, italic, roman, Inline, Roff};
use clap_mangen::Man;

/// Variables herder reads that are not options.
const READS: &[(&str, &str)] = &[
    (
        "HERDER_LOG",
        "The log filter: info (the default), debug, warn, or per target (herder=debug,warn).",
    ),
    (
        "LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES",
        "The sockets systemd passes (sd_listen_fds(3)); read, checked and removed before any \
         worker starts.",
    ),
    (
        "NOTIFY_SOCKET",
        "Where herder sends READY=1, RELOADING=1, STOPPING=1, STATUS= and WATCHDOG=1 to systemd \
         (sd_notify(3)); removed: workers get herder's own.",
    ),
    (
        "WATCHDOG_USEC, WATCHDOG_PID",
        "systemd's watchdog (WatchdogSec=): herder pings it from its event loop; removed.",
    ),
    (
        "FDSTORE",
        "systemd (254 and later) keeps this many fds: herder stores the sockets it binds itself \
         there (see --fd-store); removed.",
    ),
    (
        "RUNTIME_DIRECTORY",
        "The default control socket is herder.sock in its first directory (RuntimeDirectory=).",
    ),
    (
        "JOURNAL_STREAM",
        "When it names herder's stderr, logs go to the journal with structured fields.",
    ),
];

/// What herder sets for every worker.
const GIVES: &[(&str, &str)] = &[
    (
        "HERDER_WORKER",
        "The worker's slot, 0 to N-1 (the agent gets HERDER_AGENT=1 instead, and only its \
         --agent-listen socket at fd 3, named agent).",
    ),
    (
        "HERDER_AGENT_SOCKET",
        "With --agent-listen, for workers and the agent: the agent's address in --listen \
         syntax (unix:/run/app/agent.sock, 127.0.0.1:9000).",
    ),
    (
        "LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES",
        "The sockets at fd 3, 4, ...: their number, the worker's own pid, their names.",
    ),
    (
        "NOTIFY_SOCKET",
        "herder's socket for this worker: READY=1 (with --ready notify), WATCHDOG=1, STOPPING=1.",
    ),
    (
        "WATCHDOG_USEC, WATCHDOG_PID",
        "With --worker-watchdog: the interval, and the worker's pid.",
    ),
];

/// EXAMPLES: (what it shows, the lines).
const EXAMPLES: &[(&str, &[&str])] = &[
    (
        "Under systemd, which owns the socket and starts herder on the first connection \
         (app.socket and app.service; the package ships both in /usr/share/doc/herder/examples):",
        &[
            "# app.socket",
            "[Socket]",
            "ListenStream=8080",
            "",
            "# app.service",
            "[Service]",
            "Type=notify",
            "ExecStart=/usr/bin/herder --ready notify -- /usr/lib/app/server",
            "ExecReload=/usr/bin/herder reload --wait",
            "KillMode=mixed",
            "RuntimeDirectory=app",
        ],
    ),
    (
        "In a container, as PID 1: herder binds the port itself and answers health probes:",
        &["herder --listen 0.0.0.0:8080 --health 0.0.0.0:8081 --workers 4 -- node server.js"],
    ),
    (
        "The same, configured from the environment (docker run -e, a pod's env:):",
        &[
            "HERDER_LISTEN=0.0.0.0:8080 HERDER_HEALTH=0.0.0.0:8081 HERDER_WORKERS=4 \\",
            "    herder -- node server.js",
        ],
    ),
    (
        "Day to day, against the running herder's control socket (--control, or \
         $RUNTIME_DIRECTORY/herder.sock, or HERDER_CONTROL):",
        &[
            "herder status               # every slot's pid, state, uptime, restarts",
            "herder reload --wait        # a rolling restart; exit 0 once the new code serves",
            "herder scale +1             # or N, or -1",
            "herder upgrade --wait       # re-execute a new herder binary in place",
        ],
    ),
];

const SEE_ALSO: &[(&str, &str)] = &[
    ("systemd.socket", "5"),
    ("systemd.service", "5"),
    ("systemd.exec", "5"),
    ("sd_listen_fds", "3"),
    ("sd_notify", "3"),
    ("systemctl", "1"),
];

/// Writes herder(1) for `cmd` (the whole command line, [`super::command`]).
pub fn render(mut cmd: clap::Command, out: &mut dyn Write) -> io::Result<()> {
    cmd.build();
    let man = Man::new(cmd.clone());
    let mut page = Page::default();
    page.clap(|w| man.render_title(w))?;
    page.clap(|w| man.render_name_section(w))?;
    page.roff(synopsis(&cmd));
    page.roff(description());
    page.clap(|w| man.render_options_section(w))?;
    page.roff(units());
    page.roff(commands(&cmd));
    page.roff(exit_status_and_signals());
    page.roff(environment(&cmd));
    page.roff(examples());
    page.roff(see_also());
    page.clap(|w| man.render_version_section(w))?;
    out.write_all(&page.0)
}

/// The page, section by section.
#[derive(Default)]
struct Page(Vec<u8>);

impl Page {
    /// A section clap_mangen renders. Each of its `render_*` writes the apostrophe preamble
    /// (two `.ds Aq` lines); the page needs it once, at the top.
    fn clap(&mut self, f: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> io::Result<()> {
        let mut part = Vec::new();
        f(&mut part)?;
        let text = String::from_utf8_lossy(&part);
        let kept: String = if self.0.is_empty() {
            text.into_owned()
        } else {
            text.lines()
                .filter(|l| !l.starts_with(".ie \\n(.g .ds Aq") && !l.starts_with(".el .ds Aq"))
                .flat_map(|l| [l, "\n"])
                .collect()
        };
        self.0.extend_from_slice(kept.as_bytes());
        Ok(())
    }

    /// A section of herder's own (`to_roff` writes no preamble).
    fn roff(&mut self, r: Roff) {
        self.0.extend_from_slice(r.to_roff().as_bytes());
    }
}

fn heading(r: &mut Roff, name: &str) {
    r.control("SH", [name]);
}

/// `.TP` item: a bold term, then its text.
fn item(r: &mut Roff, term: Vec<Inline>, text: &str) {
    r.control("TP", []);
    r.text(term);
    r.text([roman(text)]);
}

fn paragraphs(r: &mut Roff, text: &str) {
    for (i, p) in text.split("\n\n").enumerate() {
        if i > 0 {
            r.control("PP", []);
        }
        r.text([roman(p.replace('\n', " "))]);
    }
}

/// What an option takes (`PATH`, `DUR`), if it takes a value (a flag does not).
fn value_name(a: &clap::Arg) -> Option<String> {
    a.get_num_args().filter(|n| n.takes_values())?;
    a.get_value_names()?.first().map(|v| v.to_string())
}

/// `--flag VALUE`, or `--flag`.
fn option(a: &clap::Arg) -> Vec<Inline> {
    let mut term = vec![bold(format!("--{}", a.get_long().unwrap_or_default()))];
    if let Some(v) = value_name(a) {
        term.extend([roman(" "), italic(v)]);
    }
    term
}

/// `[--flag VALUE]` for each visible option of `cmd`, `VALUE` for a positional.
fn usage(cmd: &clap::Command) -> Vec<Inline> {
    let mut line = Vec::new();
    for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        if matches!(a.get_id().as_str(), "help" | "version") {
            continue;
        }
        if a.get_long().is_some() {
            line.push(roman(" ["));
            line.extend(option(a));
            line.push(roman("]"));
        } else if let Some(v) = value_name(a) {
            line.extend([roman(" "), italic(v)]);
        }
    }
    line
}

fn synopsis(cmd: &clap::Command) -> Roff {
    let mut r = Roff::default();
    heading(&mut r, "SYNOPSIS");
    r.text([
        bold("herder"),
        roman(" ["),
        italic("OPTIONS"),
        roman("] "),
        bold("--"),
        roman(" "),
        italic("COMMAND"),
        roman(" ["),
        italic("ARG"),
        roman("]..."),
    ]);
    for sub in visible(cmd) {
        r.control("br", []);
        let mut line = vec![bold(format!("herder {}", sub.get_name()))];
        line.extend(usage(sub));
        r.text(line);
    }
    r
}

fn visible(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
}

fn description() -> Roff {
    let mut r = Roff::default();
    heading(&mut r, "DESCRIPTION");
    paragraphs(&mut r, super::DESCRIPTION);
    r
}

/// The units of DUR and N, at the end of OPTIONS.
fn units() -> Roff {
    let mut r = Roff::default();
    r.control("PP", []);
    paragraphs(&mut r, super::UNITS);
    r
}

/// The clients of a running herder, each with its options.
fn commands(cmd: &clap::Command) -> Roff {
    let mut r = Roff::default();
    heading(&mut r, "COMMANDS");
    r.text([roman(
        "These talk to a running herder over its control socket (root or herder's own uid only).",
    )]);
    for sub in visible(cmd) {
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        let mut term = vec![bold(format!("herder {}", sub.get_name()))];
        term.extend(usage(sub));
        item(&mut r, term, &about);
        let args: Vec<&clap::Arg> = sub
            .get_arguments()
            .filter(|a| !a.is_hide_set() && a.get_long().is_some_and(|l| l != "help"))
            .collect();
        if args.is_empty() {
            continue;
        }
        r.control("RS", []);
        for a in args {
            let mut help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            if let Some(var) = a.get_env() {
                help.push_str(&format!(" [env: {}]", var.to_string_lossy()));
            }
            item(&mut r, option(a), &help);
        }
        r.control("RE", []);
    }
    r
}

fn exit_status_and_signals() -> Roff {
    let mut r = Roff::default();
    heading(&mut r, "EXIT STATUS");
    for (code, what) in super::EXIT_STATUS {
        item(&mut r, vec![bold(code)], what);
    }
    item(
        &mut r,
        vec![bold("128+N")],
        "herder itself was killed by signal N (137: SIGKILL, when a grace period ran out).",
    );
    heading(&mut r, "SIGNALS");
    paragraphs(&mut r, super::SIGNALS);
    r
}

fn environment(cmd: &clap::Command) -> Roff {
    let mut r = Roff::default();
    heading(&mut r, "ENVIRONMENT");
    paragraphs(
        &mut r,
        "Every option of the run command can also be set as HERDER_ and its long name in \
         capitals, - as _ (HERDER_WORKERS=4, HERDER_DRAIN_TIMEOUT=10s); --agent's is \
         HERDER_AGENT_COMMAND (HERDER_AGENT=1 marks the agent process). The command line wins: \
         an option given there is used and its variable ignored (for --listen, the whole of \
         HERDER_LISTEN). HERDER_LISTEN takes one or more addresses separated by whitespace; \
         flags take 1, true, yes or on, and 0, false, no or off. A bad value is a usage error \
         that names the variable (exit status 2).\n\n\
         Workers do not see these variables, nor HERDER_LOG: herder removes every variable it \
         reads from their environment (a worker may itself be a herder). Other HERDER_ \
         variables are the application's and are passed on. herder's own environment is left \
         as it is, so that herder upgrade re-executes it with the same settings.",
    );
    for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        if let (Some(var), Some(long)) = (a.get_env(), a.get_long()) {
            let mut text = format!("Sets --{long}");
            if long == "control" {
                text.push_str(", for herder itself and for the commands");
            }
            text.push('.');
            item(&mut r, vec![bold(var.to_string_lossy())], &text);
        }
    }
    for (var, what) in READS {
        item(&mut r, vec![bold(*var)], what);
    }
    r.control("PP", []);
    r.text([roman("What herder sets for every worker:")]);
    for (var, what) in GIVES {
        item(&mut r, vec![bold(*var)], what);
    }
    r
}

fn examples() -> Roff {
    let mut r = Roff::default();
    heading(&mut r, "EXAMPLES");
    for (i, (what, lines)) in EXAMPLES.iter().enumerate() {
        if i > 0 {
            r.control("PP", []);
        }
        r.text([roman(*what)]);
        r.control("PP", []);
        r.control("RS", ["4"]);
        r.control("nf", []);
        for line in *lines {
            r.text([roman(*line)]);
        }
        r.control("fi", []);
        r.control("RE", []);
    }
    r
}

fn see_also() -> Roff {
    let mut r = Roff::default();
    heading(&mut r, "SEE ALSO");
    let mut line = Vec::new();
    for (i, (page, section)) in SEE_ALSO.iter().enumerate() {
        if i > 0 {
            line.push(roman(", "));
        }
        line.extend([bold(*page), roman(format!("({section})"))]);
    }
    r.text(line);
    r
}
