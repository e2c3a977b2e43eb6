//! The agent's options (`--agent` and `--agent-*`, issue 14) and their translation into an
//! [`AgentConfig`]: one process beside the pool, with its own command, socket, readiness,
//! stop signal and drain timeout.

use std::ffi::OsString;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::Args;
use nix::sys::signal::Signal;

use super::{duration, signal, ReadyArg};
use crate::listen::{Addr, ListenSpec};
use crate::pool::{AgentConfig, ReadyMode};

/// The variable of `--agent`: not `HERDER_AGENT`, which is what the agent process itself is
/// given (`HERDER_AGENT=1`, as workers get `HERDER_WORKER`).
pub const COMMAND_VAR: &str = "HERDER_AGENT_COMMAND";

#[derive(Debug, Args)]
pub struct AgentArgs {
    // (An explicit help text: rustdoc would read "[ARG]" in a doc comment as a link.)
    #[arg(
        long = "agent",
        env = COMMAND_VAR,
        value_name = "CMD",
        help = "Run one agent process beside the pool: \"CMD [ARG]...\" split like a shell \
                would (quotes, backslashes; no shell is run). It starts before the workers, is \
                restarted on its own backoff and stops after the pool has drained."
    )]
    pub agent: Option<String>,

    /// A socket herder binds and keeps for the agent (any --listen form but udp:): the agent
    /// gets it at fd 3 (LISTEN_FDS), workers learn its address from HERDER_AGENT_SOCKET.
    /// Connections wait in the kernel while the agent restarts.
    #[arg(long, env = "HERDER_AGENT_LISTEN", value_name = "ADDR")]
    pub agent_listen: Option<String>,

    /// When the agent counts as ready [default: as --ready]
    #[arg(
        long,
        env = "HERDER_AGENT_READY",
        value_enum,
        value_name = "exec|notify"
    )]
    pub agent_ready: Option<ReadyArg>,

    /// The service cannot run without the agent: the workers wait for its first READY, the
    /// pool counts as not ready while it is down, and more than --restart-limit restarts of
    /// it within --restart-window give up (exit 1).
    #[arg(long, env = "HERDER_AGENT_REQUIRED", value_parser = BoolishValueParser::new())]
    pub agent_required: bool,

    /// Signal that makes the agent drain [default: as --stop-signal]
    #[arg(long, env = "HERDER_AGENT_STOP_SIGNAL", value_parser = signal, value_name = "SIG")]
    pub agent_stop_signal: Option<Signal>,

    /// How long the draining agent may take before SIGKILL [default: as --drain-timeout]
    #[arg(long, env = "HERDER_AGENT_DRAIN_TIMEOUT", value_parser = duration, value_name = "DUR")]
    pub agent_drain_timeout: Option<Duration>,

    /// `herder reload` (HUP) also replaces the agent, once the pool has rolled: the new one
    /// starts on the same socket, then the old one drains; the reload ends when it is ready.
    #[arg(long, env = "HERDER_AGENT_RELOAD", value_parser = BoolishValueParser::new())]
    pub agent_reload: bool,
}

impl AgentArgs {
    /// The agent's command line, split (`None`: no agent).
    pub fn command(&self) -> Result<Option<Vec<OsString>>, String> {
        let Some(cmd) = &self.agent else {
            return Ok(None);
        };
        let words = shell_words::split(cmd).map_err(|e| format!("--agent '{cmd}': {e}"))?;
        if words.is_empty() {
            return Err("--agent needs a command".into());
        }
        Ok(Some(words.into_iter().map(OsString::from).collect()))
    }

    /// What `--agent-listen` names (`None`: no socket).
    pub fn listen(&self) -> Result<Option<ListenSpec>, String> {
        let Some(addr) = &self.agent_listen else {
            return Ok(None);
        };
        let spec: ListenSpec = addr.parse().map_err(|e| format!("--agent-listen: {e}"))?;
        if matches!(spec.addr, Addr::Udp(_)) {
            return Err(format!(
                "--agent-listen {addr}: a stream socket is needed (workers connect to the agent)"
            ));
        }
        Ok(Some(spec))
    }

    /// The agent's configuration; `pool_*` are the pool's values its defaults follow.
    pub fn config(
        &self,
        ready: ReadyMode,
        stop_signal: Signal,
        drain_timeout: Duration,
    ) -> Result<Option<AgentConfig>, String> {
        if self.command()?.is_none() {
            let set = [
                ("--agent-listen", self.agent_listen.is_some()),
                ("--agent-ready", self.agent_ready.is_some()),
                ("--agent-required", self.agent_required),
                ("--agent-stop-signal", self.agent_stop_signal.is_some()),
                ("--agent-drain-timeout", self.agent_drain_timeout.is_some()),
                ("--agent-reload", self.agent_reload),
            ];
            if let Some((flag, _)) = set.iter().find(|(_, on)| *on) {
                return Err(format!("{flag} needs --agent"));
            }
            return Ok(None);
        }
        self.listen()?;
        Ok(Some(AgentConfig {
            ready: match self.agent_ready {
                None => ready,
                Some(ReadyArg::Exec) => ReadyMode::Exec,
                Some(ReadyArg::Notify) => ReadyMode::Notify,
            },
            required: self.agent_required,
            stop_signal: self.agent_stop_signal.unwrap_or(stop_signal),
            drain_timeout: self.agent_drain_timeout.unwrap_or(drain_timeout),
            reload: self.agent_reload,
        }))
    }
}
