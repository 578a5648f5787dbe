//! The cookie challenge of datagram mode (spec §5.7.4), responder side: a small, stateless
//! check that an endpoint runs on every INIT that belongs to no connection, before it spends
//! any Diffie-Hellman work or memory on the sender.
//!
//! A [`CookieChecker`] holds two secrets (current and previous, replaced every
//! [`COOKIE_SECRET_LIFETIME`]) and nothing per peer. [`CookieChecker::verdict`] says what to
//! do with one datagram: go on with its INIT, answer it (COOKIE_REPLY or REJECT, written into
//! the caller's buffer) or drop it. When to demand cookies is the caller's policy (`demand`).
//!
//! Like the rest of the core it reads no clock and draws no randomness by itself: time is an
//! argument and the secrets come from a seed drawn once from the caller's RNG (fast key
//! erasure, spec §11.11). The initiator side lives in [`Connection`](crate::Connection).

use core::fmt;
use core::net::SocketAddr;

use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};
use blake2::Blake2sMac;
use rand_core::{RngCore, SeedableRng};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::config::Config;
use crate::error::{DecodeError, HandshakeError};
use crate::handshake::{min_body_len, HANDSHAKE_BODY_MAX};
use crate::params::Mode;
use crate::time::{Duration, Timestamp};
use crate::wire::{self, InitHeader, Packet, RejectReason, COOKIE_LEN, INIT_COOKIE_PREFIX_LEN};

/// spec §5.7.4, §7.7: how long a cookie secret is current; the previous one is still accepted
/// for as long again, so a cookie is valid for 120 to 240 s.
pub const COOKIE_SECRET_LIFETIME: Duration = Duration::from_secs(120);
/// spec §5.7.4, §7.7: COOKIE_REPLYs an initiator acts on per handshake.
pub const MAX_COOKIE_REPLIES: u8 = 3;
/// spec §5.7.4: the domain label in front of every cookie's MAC input.
pub const COOKIE_LABEL: &[u8; 14] = b"Veil-v1 cookie";
/// spec §5.7.4: the address as the MAC sees it: 16-byte IPv6 (IPv4-mapped for IPv4) and port.
pub const ADDRESS_LEN: usize = 18;
/// Length of a cookie secret.
pub const SECRET_LEN: usize = 32;

/// A cookie (spec §4.2).
pub type Cookie = [u8; COOKIE_LEN];

/// spec §5.7.4: the source address as the cookie binds it. An IPv4 address and its
/// IPv4-mapped IPv6 form give the same bytes, as a dual-stack socket may report either.
#[must_use]
pub fn address_bytes(addr: &SocketAddr) -> [u8; ADDRESS_LEN] {
    let ip = match addr {
        SocketAddr::V4(a) => a.ip().to_ipv6_mapped(),
        SocketAddr::V6(a) => *a.ip(),
    };
    let mut out = [0u8; ADDRESS_LEN];
    out[..16].copy_from_slice(&ip.octets());
    out[16..].copy_from_slice(&addr.port().to_be_bytes());
    out
}

/// spec §5.7.4: `BLAKE2s-128(key = secret, "Veil-v1 cookie" || address || INIT)`, where
/// `init` is the datagram INIT as received (without the INIT_COOKIE prefix).
#[must_use]
pub fn compute_cookie(secret: &[u8; SECRET_LEN], source: &SocketAddr, init: &[u8]) -> Cookie {
    // A 32-byte key is within BLAKE2s's limit, so keying cannot fail; the fallback (an
    // unkeyed-looking all-zero cookie) is unreachable and would only ever fail verification.
    let Ok(mut mac) = <Blake2sMac<U16> as KeyInit>::new_from_slice(secret) else {
        return [0; COOKIE_LEN];
    };
    mac.update(COOKIE_LABEL);
    mac.update(&address_bytes(source));
    mac.update(init);
    mac.finalize().into_bytes().into()
}

/// What the INIT's cookie proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieStatus {
    /// A plain INIT: no cookie.
    Absent,
    /// An INIT_COOKIE whose cookie verified for its source and INIT: the address is proven.
    Valid,
    /// An INIT_COOKIE whose cookie did not verify (other address or port, expired, altered).
    Invalid,
}

/// What to do with a datagram that starts with INIT or INIT_COOKIE (spec §5.7.4).
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Verdict<'a> {
    /// Go on: create a responder connection and hand it `init` (the INIT, without any
    /// cookie prefix).
    Proceed {
        /// The INIT packet.
        init: &'a [u8],
        /// Whether a cookie proved the source address.
        cookie: CookieStatus,
    },
    /// Send the first `len` bytes of the output buffer (a COOKIE_REPLY) to the source and
    /// keep nothing.
    CookieReply {
        /// Length of the COOKIE_REPLY written.
        len: usize,
        /// Whether the datagram was an INIT_COOKIE with a cookie that did not verify.
        cookie: CookieStatus,
    },
    /// Send the first `len` bytes of the output buffer (a REJECT, spec §5.8) to the source
    /// and keep nothing.
    Reject {
        /// Length of the REJECT written.
        len: usize,
        /// Why.
        error: HandshakeError,
    },
    /// Drop the datagram silently and keep nothing.
    Drop(HandshakeError),
}

/// The responder's cookie secrets (spec §5.7.4). Nothing per peer: its size is fixed.
pub struct CookieChecker {
    /// Fast-key-erasure seed from which each new secret is derived.
    seed: Zeroizing<[u8; 32]>,
    current: Zeroizing<[u8; SECRET_LEN]>,
    previous: Option<Zeroizing<[u8; SECRET_LEN]>>,
    /// When `current` became current.
    since: Timestamp,
    lifetime: Duration,
}

impl fmt::Debug for CookieChecker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secrets never reach a log.
        f.debug_struct("CookieChecker")
            .field("since", &self.since)
            .field("lifetime", &self.lifetime)
            .field("has_previous", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

impl CookieChecker {
    /// A checker whose first secret is current from `now`. `rng` is read once, here (32
    /// bytes of seed); `lifetime` is [`COOKIE_SECRET_LIFETIME`] unless a test needs it shorter
    /// (zero is raised to one microsecond).
    pub fn new(now: Timestamp, lifetime: Duration, rng: &mut dyn rand_core::CryptoRngCore) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        let mut c = Self {
            seed,
            current: Zeroizing::new([0; SECRET_LEN]),
            previous: None,
            since: now,
            lifetime: lifetime.max(Duration::from_micros(1)),
        };
        c.current = c.next_secret();
        c
    }

    /// A checker with a fixed current secret, for test vectors only. Later secrets still come
    /// from a seed (all zero here: no secrecy at all).
    #[cfg(feature = "dangerous-testing")]
    #[must_use]
    pub fn with_secret_for_testing_only(secret: [u8; SECRET_LEN], now: Timestamp, lifetime: Duration) -> Self {
        Self {
            seed: Zeroizing::new([0; 32]),
            current: Zeroizing::new(secret),
            previous: None,
            since: now,
            lifetime: lifetime.max(Duration::from_micros(1)),
        }
    }

    /// 32 fresh secret bytes; the seed is replaced first (spec §11.11).
    fn next_secret(&mut self) -> Zeroizing<[u8; SECRET_LEN]> {
        let mut g = rand_chacha::ChaCha20Rng::from_seed(*self.seed);
        let mut out = Zeroizing::new([0u8; SECRET_LEN]);
        g.fill_bytes(self.seed.as_mut());
        g.fill_bytes(out.as_mut());
        out
    }

    /// spec §5.7.4: a new secret every lifetime, the previous one kept for one more; replaced
    /// secrets are zeroized on drop.
    fn rotate(&mut self, now: Timestamp) {
        let age = now.saturating_since(self.since);
        if age < self.lifetime {
            return;
        }
        let fresh = self.next_secret();
        if age < self.lifetime.doubled() {
            self.previous = Some(core::mem::replace(&mut self.current, fresh));
            self.since = self.since + self.lifetime;
        } else {
            // Both are too old: nothing made under either may still be accepted.
            self.previous = None;
            self.current = fresh;
            self.since = now;
        }
    }

    /// The cookie for `init` from `source` under the current secret (after rotating to `now`).
    pub fn cookie(&mut self, now: Timestamp, source: &SocketAddr, init: &[u8]) -> Cookie {
        self.rotate(now);
        compute_cookie(&self.current, source, init)
    }

    /// Whether `cookie` was made for `init` from `source` under the current or the previous
    /// secret. Constant time in the cookie's value.
    pub fn verify(&mut self, now: Timestamp, source: &SocketAddr, init: &[u8], cookie: &Cookie) -> bool {
        self.rotate(now);
        let mut ok = compute_cookie(&self.current, source, init).ct_eq(cookie);
        if let Some(previous) = &self.previous {
            ok |= compute_cookie(previous, source, init).ct_eq(cookie);
        }
        ok.into()
    }

    /// What to do with `packet`, a datagram of type INIT or INIT_COOKIE from `source` that
    /// belongs to no connection (spec §5.7.4). With `demand` the caller requires a proven
    /// address (under load); without it every INIT goes on, and the cookie of an INIT_COOKIE
    /// is still checked so that the caller can treat a proven address differently (its rate
    /// limit). `config` supplies the accept lists and `max_packet_len`; `out` receives the
    /// answer of [`Verdict::CookieReply`] and [`Verdict::Reject`] (a REJECT is 6 B, a
    /// COOKIE_REPLY 21 B: smaller than any INIT that gets one).
    pub fn verdict<'a>(
        &mut self,
        now: Timestamp,
        source: &SocketAddr,
        packet: &'a [u8],
        demand: bool,
        config: &Config,
        out: &mut [u8],
    ) -> Verdict<'a> {
        let (init, header, body, cookie) = match wire::parse(Mode::Datagram, config.limits.packet_len(), packet) {
            Ok(Packet::Init { header, body, .. }) => (packet, header, body, None),
            Ok(Packet::InitCookie { cookie, init, header, body, .. }) => (init, header, body, Some(cookie)),
            Ok(_) => return Verdict::Drop(HandshakeError::UnexpectedPacket),
            Err(e) => {
                let init = match packet.first() {
                    Some(&wire::TYPE_HANDSHAKE_INIT) => packet,
                    // An INIT_COOKIE with no INIT inside is nobody's first packet.
                    Some(&wire::TYPE_HANDSHAKE_INIT_COOKIE) => match packet.get(INIT_COOKIE_PREFIX_LEN..) {
                        Some(i) if i.first() == Some(&wire::TYPE_HANDSHAKE_INIT) => i,
                        _ => return Verdict::Drop(e.into()),
                    },
                    _ => return Verdict::Drop(e.into()),
                };
                if !demand {
                    // The connection answers it as spec §5.8 says, as without cookies.
                    return Verdict::Proceed { init, cookie: CookieStatus::Absent };
                }
                // spec §5.7.4 step 1: the REJECT of spec §5.8, sent without any state.
                return reject(init, RejectReason::for_decode_error(e), e.into(), out);
            }
        };
        let status = match cookie {
            None => CookieStatus::Absent,
            Some(c) if self.verify(now, source, init, &c) => CookieStatus::Valid,
            Some(_) => CookieStatus::Invalid,
        };
        if status == CookieStatus::Valid || !demand {
            return Verdict::Proceed { init, cookie: status };
        }
        // spec §5.7.4 step 1: patterns and suites outside the accept lists, as spec §4.3.
        if !config.accept_patterns.contains(&header.pattern) {
            return reject(init, RejectReason::UnsupportedPattern, HandshakeError::NotAccepted, out);
        }
        if !config.accept_suites.contains(&header.suite) {
            return reject(init, RejectReason::UnsupportedSuite, HandshakeError::NotAccepted, out);
        }
        // spec §5.7.4 step 2: only an INIT a responder could read earns a reply, so a reply
        // is always smaller than the datagram that caused it.
        if body.len() < min_body_len(header.pattern, 0) {
            return Verdict::Drop(DecodeError::Truncated.into());
        }
        if body.len() > HANDSHAKE_BODY_MAX {
            return Verdict::Drop(HandshakeError::PayloadTooLarge);
        }
        let Some(index) = header.sender_index else {
            return Verdict::Drop(HandshakeError::UnexpectedPacket);
        };
        // spec §5.7.4 step 4.
        let c = self.cookie(now, source, init);
        match wire::encode_cookie_reply(index, &c, out) {
            Ok(len) => Verdict::CookieReply { len, cookie: status },
            Err(_) => Verdict::Drop(HandshakeError::BufferTooSmall),
        }
    }
}

/// A datagram REJECT for `init` (spec §5.8): bytes 3–6 of the INIT are the initiator's index
/// in every version; an INIT too short to hold them gets nothing.
fn reject<'a>(init: &[u8], reason: RejectReason, error: HandshakeError, out: &mut [u8]) -> Verdict<'a> {
    let (Some(index), Some(dst)) = (init.get(3..InitHeader::len(Mode::Datagram)), out.get_mut(..6)) else {
        return Verdict::Drop(error);
    };
    dst[0] = wire::TYPE_HANDSHAKE_REJECT;
    dst[1..5].copy_from_slice(index);
    dst[5] = reason.code();
    Verdict::Reject { len: 6, error }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::StaticKeypair;
    use crate::params::{Pattern, Suite, PROTOCOL_VERSION};
    use crate::wire::{COOKIE_REPLY_LEN, TYPE_HANDSHAKE_INIT};
    use alloc::vec;
    use alloc::vec::Vec;
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use rand_core::SeedableRng;

    const T0: Timestamp = Timestamp::from_micros(5_000_000);

    fn addr(last: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), port)
    }

    fn checker() -> CookieChecker {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        CookieChecker::new(T0, COOKIE_SECRET_LIFETIME, &mut rng)
    }

    fn config() -> Config {
        Config::new(StaticKeypair::from_secret_bytes([2; 32]), Mode::Datagram)
    }

    /// A datagram INIT with a body of `body_len` bytes (the checker never reads the body).
    fn init(pattern: Pattern, index: u32, body_len: usize) -> Vec<u8> {
        let h = InitHeader {
            version: PROTOCOL_VERSION,
            pattern,
            suite: Suite::ChaChaPolyBlake2s,
            sender_index: Some(index),
        };
        let mut p = vec![0u8; 7 + body_len];
        h.encode(Mode::Datagram, &mut p).unwrap();
        p[7..].iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        p
    }

    fn with_cookie(cookie: &Cookie, init: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; INIT_COOKIE_PREFIX_LEN + init.len()];
        wire::encode_init_cookie(cookie, init, &mut p).unwrap();
        p
    }

    /// The cookie a demanding checker answers `init` from `src` with.
    fn challenge(c: &mut CookieChecker, now: Timestamp, src: &SocketAddr, init: &[u8]) -> Cookie {
        let mut out = [0u8; 64];
        match c.verdict(now, src, init, true, &config(), &mut out) {
            Verdict::CookieReply { len, cookie: CookieStatus::Absent } => {
                assert_eq!(len, COOKIE_REPLY_LEN);
                assert!(len < init.len(), "a reply is smaller than its INIT");
                match wire::parse(Mode::Datagram, 65_535, &out[..len]).unwrap() {
                    Packet::CookieReply { receiver_index, cookie } => {
                        assert_eq!(receiver_index.to_be_bytes(), init[3..7]);
                        cookie
                    }
                    p => panic!("{p:?}"),
                }
            }
            v => panic!("{v:?}"),
        }
    }

    fn verdict_of(c: &mut CookieChecker, now: Timestamp, src: &SocketAddr, packet: &[u8]) -> Verdict<'static> {
        let mut out = [0u8; 64];
        match c.verdict(now, src, packet, true, &config(), &mut out) {
            Verdict::Proceed { cookie, .. } => Verdict::Proceed { init: &[], cookie },
            Verdict::CookieReply { len, cookie } => Verdict::CookieReply { len, cookie },
            Verdict::Reject { len, error } => Verdict::Reject { len, error },
            Verdict::Drop(e) => Verdict::Drop(e),
        }
    }

    #[test]
    fn cookie_round_trip_proves_the_address() {
        let mut c = checker();
        let src = addr(1, 4000);
        let i = init(Pattern::IK, 7, 100);
        let cookie = challenge(&mut c, T0, &src, &i);
        let packet = with_cookie(&cookie, &i);
        let mut out = [0u8; 64];
        assert_eq!(
            c.verdict(T0, &src, &packet, true, &config(), &mut out),
            Verdict::Proceed { init: &i[..], cookie: CookieStatus::Valid }
        );
        // Deterministic and stateless: the same INIT gets the same cookie, and answering it
        // left nothing behind that a second check could depend on.
        assert_eq!(challenge(&mut c, T0, &src, &i), cookie);
    }

    #[test]
    fn cookie_from_another_address_or_port_or_for_another_init_is_refused() {
        let mut c = checker();
        let i = init(Pattern::IK, 7, 100);
        let cookie = challenge(&mut c, T0, &addr(1, 4000), &i);
        let packet = with_cookie(&cookie, &i);
        for other in [addr(2, 4000), addr(1, 4001)] {
            assert_eq!(
                verdict_of(&mut c, T0, &other, &packet),
                Verdict::CookieReply { len: COOKIE_REPLY_LEN, cookie: CookieStatus::Invalid }
            );
        }
        // Another INIT (another ephemeral key, here one body byte) from the same address.
        let mut j = i.clone();
        j[20] ^= 1;
        assert_eq!(
            verdict_of(&mut c, T0, &addr(1, 4000), &with_cookie(&cookie, &j)),
            Verdict::CookieReply { len: COOKIE_REPLY_LEN, cookie: CookieStatus::Invalid }
        );
    }

    #[test]
    fn any_single_bit_flip_of_the_cookie_is_refused() {
        let mut c = checker();
        let src = addr(1, 4000);
        let i = init(Pattern::XX, 9, 32);
        let cookie = challenge(&mut c, T0, &src, &i);
        for bit in 0..COOKIE_LEN * 8 {
            let mut bad = cookie;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(!c.verify(T0, &src, &i, &bad), "bit {bit}");
        }
        assert!(c.verify(T0, &src, &i, &cookie));
    }

    #[test]
    fn cookie_expires_after_two_secret_lifetimes() {
        let mut c = checker();
        let src = addr(1, 4000);
        let i = init(Pattern::IK, 7, 100);
        let made_late = T0 + Duration::from_secs(119);
        let cookie = challenge(&mut c, made_late, &src, &i);
        // Valid through the next lifetime (the previous secret is still accepted)…
        assert!(c.verify(T0 + Duration::from_secs(120), &src, &i, &cookie));
        assert!(c.verify(T0 + Duration::from_micros(240_000_000 - 1), &src, &i, &cookie));
        // …and never again once its secret was replaced twice.
        assert!(!c.verify(T0 + Duration::from_secs(240), &src, &i, &cookie));
        assert_eq!(
            verdict_of(&mut c, T0 + Duration::from_secs(240), &src, &with_cookie(&cookie, &i)),
            Verdict::CookieReply { len: COOKIE_REPLY_LEN, cookie: CookieStatus::Invalid }
        );
        // A clock jump of two lifetimes replaces both secrets at once.
        let mut c = checker();
        let cookie = challenge(&mut c, T0, &src, &i);
        assert!(!c.verify(T0 + Duration::from_secs(10_000), &src, &i, &cookie));
        assert!(c.previous.is_none());
    }

    #[test]
    fn without_demand_every_init_goes_on_and_cookies_are_still_checked() {
        let mut c = checker();
        let src = addr(1, 4000);
        let i = init(Pattern::IK, 7, 100);
        let mut out = [0u8; 64];
        assert_eq!(
            c.verdict(T0, &src, &i, false, &config(), &mut out),
            Verdict::Proceed { init: &i[..], cookie: CookieStatus::Absent }
        );
        let bogus = with_cookie(&[0; COOKIE_LEN], &i);
        assert_eq!(
            c.verdict(T0, &src, &bogus, false, &config(), &mut out),
            Verdict::Proceed { init: &i[..], cookie: CookieStatus::Invalid }
        );
        // A header the connection will refuse goes on too: it answers with REJECT itself.
        let mut v2 = i.clone();
        v2[1] = 2;
        assert_eq!(
            c.verdict(T0, &src, &v2, false, &config(), &mut out),
            Verdict::Proceed { init: &v2[..], cookie: CookieStatus::Absent }
        );
    }

    #[test]
    fn under_demand_bad_headers_get_the_stateless_reject_and_bad_bodies_nothing() {
        let mut c = checker();
        let src = addr(1, 4000);
        let mut out = [0u8; 64];
        let mut v2 = init(Pattern::IK, 0x0a0b_0c0d, 100);
        v2[1] = 2;
        assert!(matches!(c.verdict(T0, &src, &v2, true, &config(), &mut out), Verdict::Reject { len: 6, .. }));
        assert_eq!(out[..6], [wire::TYPE_HANDSHAKE_REJECT, 0x0a, 0x0b, 0x0c, 0x0d, 0x02]);
        // The same inside an INIT_COOKIE.
        let wrapped = with_cookie(&[1; COOKIE_LEN], &v2);
        assert!(matches!(c.verdict(T0, &src, &wrapped, true, &config(), &mut out), Verdict::Reject { len: 6, .. }));
        assert_eq!(out[..6], [wire::TYPE_HANDSHAKE_REJECT, 0x0a, 0x0b, 0x0c, 0x0d, 0x02]);
        // A pattern the responder does not accept.
        let mut cfg = config();
        cfg.accept_patterns = vec![Pattern::IK];
        let xx = init(Pattern::XX, 5, 40);
        assert_eq!(
            c.verdict(T0, &src, &xx, true, &cfg, &mut out),
            Verdict::Reject { len: 6, error: HandshakeError::NotAccepted }
        );
        assert_eq!(out[5], RejectReason::UnsupportedPattern.code());
        // Bodies outside the spec §4.4 bounds earn no reply: nothing to amplify.
        for (pattern, len) in [(Pattern::XX, 31), (Pattern::IK, 95), (Pattern::IK, HANDSHAKE_BODY_MAX + 1)] {
            assert!(
                matches!(verdict_of(&mut c, T0, &src, &init(pattern, 1, len)), Verdict::Drop(_)),
                "{pattern:?} {len}"
            );
        }
        // An INIT too short for an index gets nothing at all.
        assert!(matches!(verdict_of(&mut c, T0, &src, &[TYPE_HANDSHAKE_INIT, 1, 0x11, 0]), Verdict::Drop(_)));
        // Not an INIT at all.
        assert!(matches!(verdict_of(&mut c, T0, &src, &[0x10; 40]), Verdict::Drop(_)));
    }

    #[test]
    fn smallest_init_that_gets_a_reply_is_larger_than_the_reply() {
        let mut c = checker();
        let i = init(Pattern::XX, 3, 32);
        assert_eq!(i.len(), 39);
        challenge(&mut c, T0, &addr(9, 9), &i);
    }

    #[test]
    fn ipv4_and_its_mapped_ipv6_form_are_the_same_address() {
        let v4 = addr(1, 4000);
        let v6 = SocketAddr::new(IpAddr::V6(Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped()), 4000);
        assert_eq!(address_bytes(&v4), address_bytes(&v6));
        let other = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 4000);
        assert_ne!(address_bytes(&v4), address_bytes(&other));
        assert_eq!(address_bytes(&v4)[10..], [0xff, 0xff, 127, 0, 0, 1, 0x0f, 0xa0]);
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let c = checker();
        let s = alloc::format!("{c:?}");
        assert!(s.contains("CookieChecker") && !s.contains("current") && !s.contains("seed"), "{s}");
    }
}
