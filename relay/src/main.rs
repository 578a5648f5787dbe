//! `veil-relay`: the Veil gateway relay and cloud endpoint.
//!
//! **Status: placeholder.** The binary parses its command line and explains what is coming; it has
//! no working subcommands yet. The gateway and cloud roles, key and certificate tooling, and the
//! `demo` subcommand land with the relay issue.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

/// Text shown after the usage, so that nobody mistakes the placeholder for a working relay.
const NOT_YET: &str = "\
This build of veil-relay has no working subcommands yet.

Coming with later issues:
  gateway    accept devices over local links and forward their end-to-end traffic to the cloud
             (it never holds end-to-end keys)
  cloud      terminate device sessions and print their messages as JSON lines
  keys       generate node identities (static X25519 key pairs) and fleet-CA certificates
  demo       run a device, a gateway and a cloud endpoint in one process

Unknown subcommands are rejected with exit code 2.";

/// Command line of `veil-relay`. It has no subcommands yet; see [`NOT_YET`].
#[derive(Debug, Parser)]
#[command(name = "veil-relay", version, about, after_help = NOT_YET)]
struct Cli {}

fn main() -> ExitCode {
    // clap exits with code 2 on any unknown argument or subcommand, and 0 on --help/--version.
    let Cli {} = Cli::parse();
    // No arguments at all: there is nothing to run yet, so say what will be here and succeed,
    // like `--help` does.
    match Cli::command().print_help() {
        Ok(()) => {
            println!();
            ExitCode::SUCCESS
        }
        // stdout is gone (e.g. a closed pipe); there is nobody left to tell.
        Err(_) => ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn unknown_subcommands_exit_with_code_2() {
        let Err(err) = Cli::try_parse_from(["veil-relay", "demo"]) else {
            panic!("`demo` is not implemented yet and must be rejected");
        };
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn no_arguments_parse() {
        assert!(Cli::try_parse_from(["veil-relay"]).is_ok());
    }
}
