//! The agent (issue 14): one singleton process supervised beside the pool, reachable by the
//! workers at `HERDER_AGENT_SOCKET`, with the real binary. The agent and the workers are the
//! Python fixtures in tests/agent/: the agent answers a line on its socket with its pid and a
//! counter ("state=starting" before its READY=1), the workers ask it at start-up, on
//! `GET /agent`, and once more while they drain; both log what they saw to stderr, which is
//! the same pipe as herder's log, so the order of the lines is the order of the events.

#[path = "../common/mod.rs"]
mod common;
mod harness;

mod reload;
mod restart;
mod start;
mod stop;
