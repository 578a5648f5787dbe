//! `veil-relay` as a library: the pieces behind the `veil-relay` binary, for services that embed
//! them.
//!
//! - [`keyfile`]: key, certificate, revocation-list and allowlist files (spec §15.10).
//! - [`tooling`]: the key and certificate commands of the binary (`keygen`, `ca`, `cert`,
//!   `revoke`, `crl`, `allowlist`).
//! - [`cloud`]: the cloud role as a library (gateway uplinks, direct devices, end-to-end
//!   sessions, messages by node id).
//! - [`demo`]: `veil-relay demo`, devices, a gateway and a cloud on loopback in one process.
//! - [`gateway`]: the gateway role (device links, the uplink, forwarding).
//! - [`run`]: running a role as a process (configuration, logging, metrics, signals).
//! - [`sink`]: where the cloud role writes device messages (JSON lines).
//! - [`soak`]: `veil-relay soak`, the fault-injection run against real cloud and gateway processes.
//! - [`control`]: the cloud role's control socket (commands for devices, JSON lines).
//! - [`config`]: the TOML configuration of the gateway and cloud roles (see `relay/CONFIG.md`).
//! - [`trustload`]: the node's identity, trust state and chain from its configuration, and
//!   the SIGHUP trust reload.
//! - [`metrics`]: Prometheus metrics (names, descriptions) and the `/metrics` endpoint.
#![forbid(unsafe_code)]

pub mod cloud;
pub mod config;
pub mod control;
pub mod demo;
pub mod gateway;
pub mod keyfile;
pub mod metrics;
pub mod run;
pub mod sink;
pub mod soak;
pub mod spool;
pub mod tooling;
pub mod trustload;
