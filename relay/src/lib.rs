//! `veil-relay` as a library: the pieces behind the `veil-relay` binary, for services that embed
//! them.
//!
//! - [`keyfile`]: key, certificate, revocation-list and allowlist files (spec §15.10).
//! - [`tooling`]: the key and certificate commands of the binary (`keygen`, `ca`, `cert`,
//!   `revoke`, `crl`, `allowlist`).
#![forbid(unsafe_code)]

pub mod keyfile;
pub mod tooling;
