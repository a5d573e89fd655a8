//! `atoll`: the launcher. It validates the configuration, opens every file, starts `vmm-core`
//! and the device processes as fresh `exec`s with explicit descriptor lists, connects the
//! console to the terminal and exits with a code that tells how the VM ended.

#![forbid(unsafe_code)]

mod cli;
mod config;
mod confine;
mod console;
mod net;
mod restart;
mod supervisor;
mod vm;

use clap::Parser;
use clap::error::ErrorKind;
use cli::{Cli, Command};
use ipc::control::exit_code;
use std::process::ExitCode;

/// The label in front of every line atoll writes to stderr.
const LABEL: &str = "atoll";

fn main() -> ExitCode {
    init_logging();
    let code = match Cli::try_parse() {
        Ok(cli) => match cli.command {
            Command::Run(args) => run(&args),
        },
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                let _ = e.print();
                exit_code::POWER_OFF
            }
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = e.print();
                exit_code::USAGE
            }
            _ => {
                eprintln!("{LABEL}: {}", one_line(&e.render().to_string()));
                exit_code::USAGE
            }
        },
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// `atoll run`: returns the process exit code.
fn run(args: &cli::RunArgs) -> i32 {
    let config =
        match config::Host::detect().and_then(|host| config::RunConfig::from_args(args, &host)) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("{LABEL}: error: {e}");
                return exit_code::USAGE;
            }
        };
    tracing::debug!(?config, "configuration");
    // The processes --debug-device may name: the core and every device atoll starts.
    let mut names = vec![supervisor::VMM_CORE.name.to_owned()];
    names.extend(config.disks.iter().filter_map(|d| match d {
        config::Disk::Image(disk) => Some(disk.id.clone()),
        config::Disk::Socket(_) => None,
    }));
    names.extend(config.nets.iter().map(|n| n.id.clone()));
    let confiner = match confine::Confiner::new(
        args.strict,
        &args.debug_device,
        &names,
        config.memory_bytes,
    ) {
        Ok(confiner) => confiner,
        Err(e) => {
            eprintln!("{LABEL}: error: {e}");
            return exit_code::USAGE;
        }
    };
    match vm::run(config, confiner) {
        Ok(outcome) => {
            if let Some(summary) = outcome.summary {
                eprintln!("{LABEL}: {summary}");
            }
            outcome.code
        }
        Err(e) => {
            eprintln!("{LABEL}: error: {}", error_chain(&e));
            exit_code::INTERNAL
        }
    }
}

/// Joins an error and its sources into one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        line.push_str(": ");
        line.push_str(&s.to_string());
        source = s.source();
    }
    line
}

/// Clap's messages, up to the first blank line, as one line (`error: unexpected argument
/// '--foo' found`, `error: the following required arguments were not provided: --kernel <PATH>`).
fn one_line(rendered: &str) -> String {
    let first_paragraph = rendered.split("\n\n").next().unwrap_or_default();
    let mut line = first_paragraph
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    line.push_str(" (see atoll --help)");
    line
}

/// Logs go to stderr, filtered by `ATOLL_LOG` (default `warn`), each line labelled `atoll:`.
fn init_logging() {
    ipc::logging::init(LABEL, "warn");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_become_one_line() {
        let e = Cli::try_parse_from(["atoll", "run", "--kernel", "k", "--bogus"]).unwrap_err();
        let line = one_line(&e.render().to_string());
        assert!(
            line.starts_with("error: unexpected argument '--bogus'"),
            "{line}"
        );
        assert!(!line.contains('\n'));
        let e = Cli::try_parse_from(["atoll", "run"]).unwrap_err();
        let line = one_line(&e.render().to_string());
        assert!(line.contains("--kernel <PATH>"), "{line}");
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
