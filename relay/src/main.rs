//! `veil-relay`: the Veil gateway relay and cloud endpoint.
//!
//! **Status:** the key and certificate tooling works (`keygen`, `ca init`, `cert issue`,
//! `cert show`, `revoke`, `crl show`; spec §15.10); the gateway and cloud roles and the `demo`
//! subcommand land with the relay issue.
//!
//! Exit codes: 0 success; 1 error (I/O, a malformed, refused or inconsistent file); 2 usage;
//! 3 verification failed (`cert show` / `crl show` with `--ca`).
#![forbid(unsafe_code)]

use veil_relay::tooling;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use veil_protocol::trust::CertRole;

/// Text shown after the usage.
const AFTER_HELP: &str = "\
Exit codes: 0 success, 1 error, 2 usage, 3 verification failed (cert show / crl show --ca).

Coming with later issues:
  gateway    accept devices over local links and forward their end-to-end traffic to the cloud
             (it never holds end-to-end keys)
  cloud      terminate device sessions and print their messages as JSON lines
  demo       run a device, a gateway and a cloud endpoint in one process

Unknown subcommands are rejected with exit code 2.";

/// Command line of `veil-relay`.
#[derive(Debug, Parser)]
#[command(name = "veil-relay", version, about, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a node identity: a static X25519 key pair (OUT, mode 0600, and OUT.pub).
    Keygen {
        /// The secret key file to write; the public key goes to OUT.pub.
        #[arg(long)]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Fleet CA operations.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Revoke certificates (by serial) or keys: the CA signs its next revocation list.
    Revoke {
        /// The CA directory (see `ca init`).
        #[arg(long)]
        ca: PathBuf,
        /// A serial to revoke (repeatable).
        #[arg(long = "serial")]
        serials: Vec<u64>,
        /// The issuer id (32 hex digits) of the serials, if an intermediate issued them;
        /// default: the CA.
        #[arg(long)]
        issuer: Option<String>,
        /// A key to revoke: a public key file or 64 hex digits (repeatable).
        #[arg(long = "key")]
        keys: Vec<String>,
    },
    /// Revocation lists.
    #[command(subcommand)]
    Crl(CrlCommand),
    /// Allowlists (the other trust mode: `<64 hex digits> <name>` per line).
    #[command(subcommand)]
    Allowlist(AllowlistCommand),
}

#[derive(Debug, Subcommand)]
enum AllowlistCommand {
    /// Parse an allowlist file and print its entries with their node ids.
    Show {
        /// The allowlist file.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a CA directory: ca.key (0600), ca.pub, serial, ca.crl (epoch 1, empty).
    Init {
        /// The directory (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Replace an existing CA. Its certificates stay valid for whoever still trusts the old key.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Issue a certificate for a node (or an intermediate, role ca) with the CA's next serial.
    Issue {
        /// The CA directory.
        #[arg(long)]
        ca: PathBuf,
        /// The subject's public key file (node-public; ca-public for role ca).
        #[arg(long)]
        key: PathBuf,
        /// The certificate name (1 to 64 bytes, no control characters).
        #[arg(long)]
        name: String,
        /// device, gateway, cloud or ca.
        #[arg(long, value_parser = parse_role)]
        role: CertRole,
        /// A group (repeatable; at most 8, each 1 to 32 bytes).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Start of validity, Unix seconds (default: now).
        #[arg(long)]
        not_before: Option<u64>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// The certificate file to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print a certificate or chain; with --ca, verify it (exit code 3 if it fails).
    Show {
        /// The certificate (or chain) file.
        file: PathBuf,
        /// The CA's public key file (ca.pub) to verify against.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Check validity at this Unix time instead of now.
        #[arg(long)]
        at: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum CrlCommand {
    /// Print a revocation list; with --ca, verify it (exit code 3 if it fails).
    Show {
        /// The revocation list file.
        file: PathBuf,
        /// The CA's public key file (ca.pub) to verify against.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

fn parse_role(s: &str) -> Result<CertRole, String> {
    CertRole::from_name(s).ok_or_else(|| format!("unknown role {s:?} (device, gateway, cloud or ca)"))
}

fn run(command: Command) -> Result<String, tooling::ToolError> {
    match command {
        Command::Keygen { out, force } => tooling::keygen(&out, force),
        Command::Ca(CaCommand::Init { dir, force }) => tooling::ca_init(&dir, force),
        Command::Cert(CertCommand::Issue { ca, key, name, role, groups, not_before, days, out, force }) => {
            tooling::cert_issue(tooling::IssueRequest { ca, key, name, role, groups, not_before, days, out, force })
        }
        Command::Cert(CertCommand::Show { file, ca, at }) => tooling::cert_show(&file, ca.as_deref(), at),
        Command::Revoke { ca, serials, issuer, keys } => {
            tooling::revoke(&ca, tooling::RevokeRequest { serials, issuer, keys })
        }
        Command::Crl(CrlCommand::Show { file, ca }) => tooling::crl_show(&file, ca.as_deref()),
        Command::Allowlist(AllowlistCommand::Show { file }) => tooling::allowlist_show(&file),
    }
}

fn main() -> ExitCode {
    // clap exits with code 2 on any unknown argument or subcommand, and 0 on --help/--version.
    let cli = Cli::parse();
    let Some(command) = cli.command else {
        // No arguments at all: show what there is, like `--help` does.
        return match Cli::command().print_help() {
            Ok(()) => {
                println!();
                ExitCode::SUCCESS
            }
            // stdout is gone (e.g. a closed pipe); there is nobody left to tell.
            Err(_) => ExitCode::FAILURE,
        };
    };
    match run(command) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
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
        let Err(err) = Cli::try_parse_from(["veil-relay", "cert", "issue", "--role", "admin"]) else {
            panic!("an unknown role must be rejected");
        };
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn no_arguments_parse() {
        assert!(Cli::try_parse_from(["veil-relay"]).is_ok());
    }
}
