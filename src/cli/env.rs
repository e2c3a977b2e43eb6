//! Options from the environment: `HERDER_<LONG_NAME>` for every option of the run command (and
//! `HERDER_CONTROL` for the clients), read by clap's `env` feature when the option is not on
//! the command line.
//!
//! This module owns what clap does not do by itself: `HERDER_LISTEN` as a whitespace-separated
//! list, the list of variables herder reads (which workers must not inherit), and error
//! messages that name the variable a bad value came from. It never changes the environment:
//! `herder upgrade` re-executes herder with the same one, and the new image must read the
//! same configuration.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};

use clap::builder::{StringValueParser, TypedValueParser};
use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;

use crate::listen::ListenSpec;

/// The log filter (src/logging.rs): read by herder, not an option.
pub const LOG_VAR: &str = "HERDER_LOG";

/// Names herder sets or reads that no option's variable may take: an option `--worker` or
/// `--log` would otherwise collide with them.
#[cfg(test)]
pub const RESERVED: &[&str] = &[
    "HERDER_WORKER",
    "HERDER_AGENT",
    "HERDER_AGENT_SOCKET",
    LOG_VAR,
    crate::upgrade::STATE_FD_VAR,
];

/// The sockets one `--listen` asks for; from `HERDER_LISTEN`, as many as it lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenArg(pub Vec<ListenSpec>);

/// The value parser of `--listen`: one address per argument on the command line (a unix path
/// may hold a space), one or more separated by whitespace in `HERDER_LISTEN`. Whitespace, not
/// a comma: no TCP or UDP address and no socket name (printable ASCII, no space: `valid_fdname`)
/// can contain it, while a name may contain a comma; and a YAML or shell list of one address
/// per line reads naturally.
#[derive(Debug, Clone, Copy)]
pub struct ListenParser;

impl TypedValueParser for ListenParser {
    type Value = ListenArg;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<ListenArg, clap::Error> {
        self.parse_ref_(cmd, arg, value, ValueSource::CommandLine)
    }

    fn parse_ref_(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
        source: ValueSource,
    ) -> Result<ListenArg, clap::Error> {
        // clap's own errors: "invalid value 'x' for '--listen <[NAME=]ADDR>': invalid address…"
        let one = |v: &OsStr| {
            StringValueParser::new()
                .try_map(|s: String| s.parse::<ListenSpec>())
                .parse_ref(cmd, arg, v)
        };
        if source != ValueSource::EnvVariable {
            return one(value).map(|s| ListenArg(vec![s]));
        }
        let text = StringValueParser::new().parse_ref(cmd, arg, value)?;
        let mut specs = Vec::new();
        for piece in text.split_whitespace() {
            specs.push(one(OsStr::new(piece))?);
        }
        if specs.is_empty() {
            // An empty list is a mistake (an unset variable in a template), not "no socket".
            one(OsStr::new(text.as_str()))?;
        }
        Ok(ListenArg(specs))
    }
}

/// Every variable an option of `cmd` (or of one of its subcommands) is read from.
fn option_vars(cmd: &clap::Command) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    for sub in cmd.get_subcommands() {
        out.extend(option_vars(sub));
    }
    out
}

/// The variables herder itself reads — every option's `HERDER_*` and `HERDER_LOG` — which no
/// worker inherits (a worker may itself be a herder). Other `HERDER_`-prefixed variables are the
/// application's and pass through.
pub fn own_vars() -> BTreeSet<String> {
    let mut vars = option_vars(&super::command());
    vars.insert(LOG_VAR.to_string());
    vars
}

/// `--flag` → `HERDER_FLAG=value` for each run option whose value came from the environment,
/// so that a check after parsing ("--workers must be at least 1") can name the variable.
#[derive(Debug, Clone, Default)]
pub struct FromEnv(pub(super) Vec<(String, String)>);

impl FromEnv {
    pub fn of(cmd: &clap::Command, m: &clap::ArgMatches) -> FromEnv {
        let found = cmd
            .get_arguments()
            .filter(|a| m.value_source(a.get_id().as_str()) == Some(ValueSource::EnvVariable))
            .filter_map(|a| {
                let var = a.get_env()?;
                let value = std::env::var_os(var)?;
                Some((format!("--{}", a.get_long()?), setting(var, &value)))
            })
            .collect();
        FromEnv(found)
    }

    /// `msg` with the variable in front when it is about an option set from the environment.
    pub fn explain(&self, msg: String) -> String {
        let about = |flag: &str| {
            msg.strip_prefix(flag)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', ':']))
        };
        match self.0.iter().find(|(flag, _)| about(flag)) {
            Some((_, setting)) => format!("{setting}: {msg}"),
            None => msg,
        }
    }
}

/// `VAR=value` as a shell would take it back (quoted when the value holds whitespace).
fn setting(var: &OsStr, value: &OsStr) -> String {
    let value = value.to_string_lossy();
    if value.contains(char::is_whitespace) {
        format!("{}='{value}'", var.to_string_lossy())
    } else {
        format!("{}={value}", var.to_string_lossy())
    }
}

/// Whether a parse error is about a value clap took from the environment, and from which
/// variable (`HERDER_WORKERS=abc`). clap reads a variable only for an option missing from the
/// command line, so the same error from the command line alone means the value was typed
/// there.
pub fn culprit(e: &clap::Error, cmd: &clap::Command, argv: &[OsString]) -> Option<String> {
    let Some(ContextValue::String(shown)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let mut built = cmd.clone();
    built.build();
    let var = with_subcommands(&built)
        .into_iter()
        .flat_map(|c| c.get_arguments())
        .filter(|a| a.to_string() == *shown)
        .find_map(|a| a.get_env().map(OsStr::to_os_string))?;
    let value = std::env::var_os(&var)?;
    let alone = without_env(cmd.clone()).try_get_matches_from(argv);
    match alone {
        Err(again) if again.to_string() == e.to_string() => None,
        _ => Some(setting(&var, &value)),
    }
}

fn with_subcommands(cmd: &clap::Command) -> Vec<&clap::Command> {
    let mut out = vec![cmd];
    for sub in cmd.get_subcommands() {
        out.extend(with_subcommands(sub));
    }
    out
}

fn without_env(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| a.env(None::<&'static str>))
        .mut_subcommands(without_env)
}
