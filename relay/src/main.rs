//! `veil-relay`: the Veil gateway relay and cloud endpoint.
//!
//! - `gateway --config F`: the gateway role ([`veil_relay::gateway`]).
//! - `cloud --config F`: the cloud role ([`veil_relay::cloud`]) with its JSON-lines sink and
//!   control socket.
//! - `demo`: a cloud, a gateway and simulated devices on loopback ([`veil_relay::demo`]).
//! - `soak`: the fault-injection run against cloud and gateway processes ([`veil_relay::soak`]).
//! - key and certificate tooling: `keygen`, `ca init`, `cert issue`, `cert show`, `revoke`,
//!   `crl show`, `allowlist show` (spec §15.10).
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

Roles: `gateway --config F` and `cloud --config F` run until SIGTERM (graceful drain); SIGHUP
reloads their trust files; `--check-config` only checks. See relay/CONFIG.md.

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
    /// Run the gateway role: accept devices, keep the uplink to the cloud, forward their
    /// end-to-end envelopes (see relay/CONFIG.md).
    Gateway(RoleArgs),
    /// Run the cloud role: accept gateway uplinks and devices, terminate their end-to-end
    /// sessions, write messages to the sink (JSON lines), take commands on the control socket.
    Cloud(RoleArgs),
    /// Run a cloud, a gateway and simulated devices on loopback in one process, with keys
    /// and certificates in a temporary directory, and print a summary (exit 1 if a check fails).
    Demo(DemoArgs),
    /// Run the fault-injection soak: a cloud and a gateway as child processes, simulated
    /// devices with acknowledged delivery, and a seeded mix of uplink faults, an outage and
    /// kill -9 of each role; checks every reading in the sink (exit 1 on any loss,
    /// duplicate, reordering or damage).
    Soak(SoakArgs),
    #[command(flatten)]
    Tool(ToolCommand),
}

/// The key, certificate and trust-file commands.
#[derive(Debug, Subcommand)]
enum ToolCommand {
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

/// Arguments of `demo`.
#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 50)]
    devices: usize,
    /// How long the devices send, in seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Readings per second per device.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Every N-th device links over UDP (0: all over TCP).
    #[arg(long, default_value_t = 5)]
    udp_every: usize,
    /// Log level for the demo's own logs (default: warn).
    #[arg(long, default_value = "warn")]
    log_level: String,
}

async fn demo(args: DemoArgs) -> ExitCode {
    veil_relay::run::init_logging(&args.log_level);
    if !(args.duration.is_finite() && args.duration > 0.0 && args.duration <= 3600.0) {
        eprintln!("error: --duration must be between 0 and 3600 seconds");
        return ExitCode::from(2);
    }
    if args.devices == 0 || args.devices > 10_000 || !(args.rate > 0.0 && args.rate <= 10_000.0) {
        eprintln!("error: --devices must be 1 to 10000 and --rate above 0 and at most 10000");
        return ExitCode::from(2);
    }
    let opts = veil_relay::demo::DemoOptions {
        devices: args.devices,
        duration: std::time::Duration::from_secs_f64(args.duration),
        rate: args.rate,
        udp_every: args.udp_every,
        progress: true,
    };
    println!(
        "veil demo: a cloud, a gateway and {} devices on loopback; {} readings/s each for {:.1} s",
        opts.devices, opts.rate, args.duration
    );
    report_exit(veil_relay::demo::run(&opts).await, veil_relay::demo::DemoReport::passed)
}

/// Arguments of `soak`.
#[derive(Debug, clap::Args)]
#[allow(clippy::struct_excessive_bools)]
struct SoakArgs {
    /// How long the devices send (e.g. 60s, 2m, 1500ms).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: std::time::Duration,
    /// Simulated devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Readings per second per device.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// Seed of the fault schedule, the proxies and the readings (the run is reproducible in
    /// its schedule).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Every N-th device links over UDP through the lossy proxy (0: all over TCP).
    #[arg(long, default_value_t = 5)]
    udp_every: usize,
    /// Length of the uplink outage (0s: none).
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    outage: std::time::Duration,
    /// No uplink cuts, stalls or corruption.
    #[arg(long)]
    no_uplink_noise: bool,
    /// No kill -9 of the gateway.
    #[arg(long)]
    no_kill_gateway: bool,
    /// No kill -9 of the cloud.
    #[arg(long)]
    no_kill_cloud: bool,
    /// No loss, reordering or duplication on the UDP devices' links.
    #[arg(long)]
    no_udp_loss: bool,
    /// The gateway's spool.max_bytes_per_device (4096 or more; small values make the spool
    /// refuse packets with SpoolFull, which the devices send again).
    #[arg(long, default_value_t = 1 << 20)]
    spool_per_device: u64,
    /// Log level for the soak's own logs (default: warn).
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// Keep the run's directory (the cloud's and gateway's logs, the sink, the spool) even
    /// when it passes; a failed run always keeps it.
    #[arg(long)]
    keep: bool,
}

/// `60s`, `2m`, `1500ms`, or seconds without a unit.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("{s:?}: not a duration (e.g. 60s, 2m, 1500ms)"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    if !(secs.is_finite() && (0.0..=86_400.0).contains(&secs)) {
        return Err(format!("{s:?}: must be between 0 and 24 hours"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

async fn soak(args: SoakArgs) -> ExitCode {
    veil_relay::run::init_logging(&args.log_level);
    if args.devices == 0 || args.devices > 10_000 || !(args.rate > 0.0 && args.rate <= 1_000.0) {
        eprintln!("error: --devices must be 1 to 10000 and --rate above 0 and at most 1000");
        return ExitCode::from(2);
    }
    if args.duration.is_zero() {
        eprintln!("error: --duration must be above 0");
        return ExitCode::from(2);
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot find this executable to run the roles: {e}");
            return ExitCode::from(1);
        }
    };
    let mut opts = veil_relay::soak::SoakOptions::new(exe);
    opts.devices = args.devices;
    opts.duration = args.duration;
    opts.rate = args.rate;
    opts.seed = args.seed;
    opts.udp_every = args.udp_every;
    opts.spool_max_bytes_per_device = args.spool_per_device.max(4096);
    opts.keep = args.keep;
    opts.faults = veil_relay::soak::Faults {
        uplink_noise: !args.no_uplink_noise,
        outage: (!args.outage.is_zero()).then_some(args.outage),
        kill_gateway: !args.no_kill_gateway,
        kill_cloud: !args.no_kill_cloud,
        udp_loss: !args.no_udp_loss,
    };
    // A session must live through the outage; a dead cloud is noticed after this.
    opts.session_idle = opts.session_idle.max(args.outage + std::time::Duration::from_secs(4));
    println!(
        "veil soak: seed {}, {} devices, {} readings/s each for {:.1} s, against real cloud and gateway processes",
        opts.seed,
        opts.devices,
        opts.rate,
        opts.duration.as_secs_f64()
    );
    // SIGTERM or SIGINT end the run early; dropping it kills the cloud and the gateway.
    let outcome = tokio::select! {
        r = veil_relay::soak::run(&opts) => r,
        () = veil_relay::run::terminated() => {
            eprintln!("soak interrupted: the cloud and the gateway were stopped");
            return ExitCode::from(1);
        }
    };
    report_exit(outcome, veil_relay::soak::SoakReport::passed)
}

/// Prints a run's report (or its error) and maps it to the exit code: 0 only if every check
/// of the report passed.
fn report_exit<R: std::fmt::Display, E: std::fmt::Display>(
    outcome: Result<R, E>,
    passed: impl FnOnce(&R) -> bool,
) -> ExitCode {
    match outcome {
        Ok(report) => {
            println!("{report}");
            if passed(&report) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Arguments of the long-running roles.
#[derive(Debug, clap::Args)]
struct RoleArgs {
    /// The TOML configuration file.
    #[arg(long)]
    config: PathBuf,
    /// Check the configuration and every file it names, print the result and exit (0 if
    /// good, 1 with the key and the problem otherwise).
    #[arg(long)]
    check_config: bool,
    /// Log level (trace, debug, info, warn, error, off); overrides log.level; RUST_LOG
    /// overrides both.
    #[arg(long)]
    log_level: Option<String>,
    /// Gateway only: append every end-to-end packet the gateway passes on to FILE, one hex
    /// line each: an audit of what it sees of device traffic (opaque, sealed packets).
    #[arg(long, value_name = "FILE")]
    audit_tap: Option<PathBuf>,
}

impl RoleArgs {
    fn options(&self) -> veil_relay::run::RunOptions {
        veil_relay::run::RunOptions {
            check_config: self.check_config,
            log_level: self.log_level.clone(),
            audit_tap: self.audit_tap.clone(),
        }
    }
}

/// Runs a long-running role on a tokio runtime.
fn serve<F: std::future::Future<Output = ExitCode>>(f: impl FnOnce() -> F) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt.block_on(f()),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
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

fn run(command: ToolCommand) -> Result<String, tooling::ToolError> {
    match command {
        ToolCommand::Keygen { out, force } => tooling::keygen(&out, force),
        ToolCommand::Ca(CaCommand::Init { dir, force }) => tooling::ca_init(&dir, force),
        ToolCommand::Cert(CertCommand::Issue { ca, key, name, role, groups, not_before, days, out, force }) => {
            tooling::cert_issue(tooling::IssueRequest { ca, key, name, role, groups, not_before, days, out, force })
        }
        ToolCommand::Cert(CertCommand::Show { file, ca, at }) => tooling::cert_show(&file, ca.as_deref(), at),
        ToolCommand::Revoke { ca, serials, issuer, keys } => {
            tooling::revoke(&ca, tooling::RevokeRequest { serials, issuer, keys })
        }
        ToolCommand::Crl(CrlCommand::Show { file, ca }) => tooling::crl_show(&file, ca.as_deref()),
        ToolCommand::Allowlist(AllowlistCommand::Show { file }) => tooling::allowlist_show(&file),
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
    let tool = match command {
        Command::Gateway(args) => return serve(|| veil_relay::run::gateway(&args.config, args.options())),
        Command::Cloud(args) => return serve(|| veil_relay::run::cloud(&args.config, args.options())),
        Command::Demo(args) => return serve(|| demo(args)),
        Command::Soak(args) => return serve(|| soak(args)),
        Command::Tool(tool) => tool,
    };
    match run(tool) {
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
        let Err(err) = Cli::try_parse_from(["veil-relay", "frobnicate"]) else {
            panic!("an unknown subcommand must be rejected");
        };
        assert_eq!(err.exit_code(), 2);
        let Err(err) = Cli::try_parse_from(["veil-relay", "cert", "issue", "--role", "admin"]) else {
            panic!("an unknown role must be rejected");
        };
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("60s"), Ok(std::time::Duration::from_secs(60)));
        assert_eq!(parse_duration("2m"), Ok(std::time::Duration::from_secs(120)));
        assert_eq!(parse_duration("1500ms"), Ok(std::time::Duration::from_millis(1500)));
        assert_eq!(parse_duration("7"), Ok(std::time::Duration::from_secs(7)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn no_arguments_parse() {
        assert!(Cli::try_parse_from(["veil-relay"]).is_ok());
    }
}
