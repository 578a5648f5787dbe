//! Shared pieces of Veil's benchmarks.
//!
//! Veil's benchmarks measure Veil next to the raw limit or a peer *in the same run* and report the
//! ratio: absolute numbers on a shared 2-core machine drift too much to mean anything alone.
//! [`raw`] holds the raw limits: bare AEAD seal+open and bare X25519, with no framing, no
//! handshake state and no allocation per call. [`pair`] builds Veil connections and runs their
//! handshakes in one thread; [`timing`] measures a subject and its limit interleaved, so that both
//! see the same machine load, and reports their ratio. [`net`] holds the loopback pieces of the
//! transport benchmarks: Veil endpoints, the TLS peer (tokio-rustls) and the plain TCP framing.
//! [`relay`] holds the relay benchmarks' fleet: a cloud, a gateway and devices provisioned with
//! veil-relay's tooling.
#![forbid(unsafe_code)]

pub mod net;
#[cfg(feature = "relay")]
pub mod relay;

/// Which crypto this build of Veil uses: `"ring"` with the `ring` feature (the default), or
/// `"pure"`, the pure-Rust resolver that `no_std` firmware gets (`--no-default-features`, which
/// also leaves out veil-relay: it is built with ring). Benchmark names carry it, so that
/// criterion never compares one build with the other. Which X25519 the build computes with is
/// [`veil_protocol::X25519_IMPLEMENTATION`].
pub const VEIL_BUILD: &str = if cfg!(feature = "ring") { "ring" } else { "pure" };

pub mod raw {
    //! The raw limits: one AEAD seal followed by one open of the same buffer, and one X25519 DH.
    //!
    //! The nonces follow Noise's layout (Noise spec §12.3 and §12.4): four zero bytes, then the
    //! 64-bit counter, little-endian for ChaCha20-Poly1305 and big-endian for AES-GCM, with empty
    //! associated data, as Noise transport messages use. Every seal+open is checked: a benchmark
    //! that silently stopped decrypting would report nonsense.

    use core::fmt;

    use aes_gcm::Aes256Gcm;
    use aws_lc_rs::agreement::{self, PrivateKey};
    use chacha20poly1305::aead::consts::U12;
    use chacha20poly1305::aead::{AeadCore, AeadInPlace, KeyInit, Nonce};
    use chacha20poly1305::ChaCha20Poly1305;
    use ring::aead::{Aad, LessSafeKey, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
    use x25519_dalek::{PublicKey, SharedSecret, StaticSecret};

    /// Key length of every AEAD here, in bytes.
    pub const KEY_LEN: usize = 32;
    /// Authentication tag length of every AEAD here, in bytes.
    pub const TAG_LEN: usize = 16;

    /// A seal+open round trip did not give back the plaintext's length, or the open step rejected
    /// the ciphertext. Either means the benchmark itself is broken.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct RoundTripFailed;

    impl fmt::Display for RoundTripFailed {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("AEAD seal+open round trip failed")
        }
    }

    impl std::error::Error for RoundTripFailed {}

    /// A fresh random 32-byte key.
    #[must_use]
    pub fn random_key() -> [u8; KEY_LEN] {
        rand::random()
    }

    /// Noise's ChaCha20-Poly1305 nonce for counter `n`: 4 zero bytes, then `n` little-endian.
    #[must_use]
    pub fn chacha_nonce(n: u64) -> [u8; 12] {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.to_le_bytes());
        nonce
    }

    /// Noise's AES-GCM nonce for counter `n`: 4 zero bytes, then `n` big-endian.
    #[must_use]
    pub fn aesgcm_nonce(n: u64) -> [u8; 12] {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        nonce
    }

    /// A ring ChaCha20-Poly1305 key.
    #[must_use]
    pub fn ring_chacha20_poly1305(key: &[u8; KEY_LEN]) -> LessSafeKey {
        // A 32-byte key is exactly what CHACHA20_POLY1305 takes, so `new` cannot fail; a match
        // keeps the invariant visible without an `unwrap`.
        match UnboundKey::new(&CHACHA20_POLY1305, key) {
            Ok(k) => LessSafeKey::new(k),
            Err(_) => unreachable!("CHACHA20_POLY1305 takes 32-byte keys"),
        }
    }

    /// A ring AES-256-GCM key.
    #[must_use]
    pub fn ring_aes_256_gcm(key: &[u8; KEY_LEN]) -> LessSafeKey {
        match UnboundKey::new(&AES_256_GCM, key) {
            Ok(k) => LessSafeKey::new(k),
            Err(_) => unreachable!("AES_256_GCM takes 32-byte keys"),
        }
    }

    /// Seals `buf` in place with ring (appending the tag), opens it again and drops the tag.
    ///
    /// Give `buf` a capacity of at least `buf.len() + TAG_LEN` so that the call never allocates.
    /// On success `buf` holds the original plaintext again.
    pub fn ring_seal_open(key: &LessSafeKey, nonce: [u8; 12], buf: &mut Vec<u8>) -> Result<(), RoundTripFailed> {
        ring_seal_open_with_ad(key, nonce, &[], buf)
    }

    /// [`ring_seal_open`] with associated data `ad` (Veil authenticates its transport header
    /// this way), to tell the cost of associated data apart from the rest of a session's work.
    pub fn ring_seal_open_with_ad(
        key: &LessSafeKey,
        nonce: [u8; 12],
        ad: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<(), RoundTripFailed> {
        let len = buf.len();
        key.seal_in_place_append_tag(ring::aead::Nonce::assume_unique_for_key(nonce), Aad::from(ad), buf)
            .map_err(|_| RoundTripFailed)?;
        let opened = key
            .open_in_place(ring::aead::Nonce::assume_unique_for_key(nonce), Aad::from(ad), buf)
            .map_err(|_| RoundTripFailed)?
            .len();
        buf.truncate(len);
        if opened == len {
            Ok(())
        } else {
            Err(RoundTripFailed)
        }
    }

    /// A RustCrypto `chacha20poly1305` cipher (software; SIMD backends as the build allows).
    #[must_use]
    pub fn rustcrypto_chacha20_poly1305(key: &[u8; KEY_LEN]) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(key.into())
    }

    /// A RustCrypto `aes-gcm` AES-256-GCM cipher.
    #[must_use]
    pub fn rustcrypto_aes_256_gcm(key: &[u8; KEY_LEN]) -> Aes256Gcm {
        Aes256Gcm::new(key.into())
    }

    /// Seals `buf` in place with a RustCrypto AEAD (detached tag), then opens it again.
    ///
    /// On success `buf` holds the original plaintext again.
    pub fn rustcrypto_seal_open<A>(cipher: &A, nonce: [u8; 12], buf: &mut [u8]) -> Result<(), RoundTripFailed>
    where
        A: AeadInPlace + AeadCore<NonceSize = U12>,
    {
        rustcrypto_seal_open_with_ad(cipher, nonce, &[], buf)
    }

    /// [`rustcrypto_seal_open`] with associated data `ad`.
    pub fn rustcrypto_seal_open_with_ad<A>(
        cipher: &A,
        nonce: [u8; 12],
        ad: &[u8],
        buf: &mut [u8],
    ) -> Result<(), RoundTripFailed>
    where
        A: AeadInPlace + AeadCore<NonceSize = U12>,
    {
        let nonce = Nonce::<A>::from(nonce);
        let tag = cipher.encrypt_in_place_detached(&nonce, ad, buf).map_err(|_| RoundTripFailed)?;
        cipher.decrypt_in_place_detached(&nonce, ad, buf, &tag).map_err(|_| RoundTripFailed)
    }

    /// One X25519 Diffie-Hellman with x25519-dalek 2 (the curve25519-dalek 4 that snow uses).
    #[must_use]
    pub fn x25519_dh(secret: &StaticSecret, public: &PublicKey) -> SharedSecret {
        secret.diffie_hellman(public)
    }

    /// One X25519 public key from a secret: a fixed-base multiplication with curve25519-dalek's
    /// precomputed table, the work snow does to generate an ephemeral key pair.
    #[must_use]
    pub fn x25519_public(secret: &StaticSecret) -> PublicKey {
        PublicKey::from(secret)
    }

    /// aws-lc refused an X25519 key or DH, or the implementation's name is unknown: the
    /// benchmark itself is broken (random keys are never refused).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct X25519Failed;

    impl fmt::Display for X25519Failed {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("X25519 failed")
        }
    }

    impl std::error::Error for X25519Failed {}

    /// X25519 as one implementation computes it, for the raw limit of a build
    /// ([`X25519::of_veil`]): the DH and the key generation that a Veil handshake does.
    pub enum X25519 {
        /// x25519-dalek's serial Montgomery ladder and precomputed base-point table.
        Dalek {
            /// The private key.
            secret: StaticSecret,
            /// The peer's public key.
            public: PublicKey,
        },
        /// aws-lc's (veil-protocol feature `aws-lc`): the secret already in aws-lc's form, as
        /// Veil keeps its identity; a key generation builds that form from 32 bytes.
        AwsLc {
            /// The private key's bytes.
            secret: [u8; 32],
            /// The same key in aws-lc's form.
            key: PrivateKey,
            /// The peer's public key.
            public: [u8; 32],
        },
    }

    impl X25519 {
        /// `implementation` (`"x25519-dalek"` or `"aws-lc"`) with a random secret and peer key.
        ///
        /// # Errors
        /// An unknown name, or aws-lc refusing the key.
        pub fn new(implementation: &str) -> Result<Self, X25519Failed> {
            let secret = StaticSecret::from(random_key());
            let public = PublicKey::from(&StaticSecret::from(random_key()));
            match implementation {
                "x25519-dalek" => Ok(Self::Dalek { secret, public }),
                "aws-lc" => {
                    let bytes = secret.to_bytes();
                    let key = PrivateKey::from_private_key(&agreement::X25519, &bytes).map_err(|_| X25519Failed)?;
                    Ok(Self::AwsLc { secret: bytes, key, public: public.to_bytes() })
                }
                _ => Err(X25519Failed),
            }
        }

        /// The one Veil computes with in this build ([`veil_protocol::X25519_IMPLEMENTATION`]).
        ///
        /// # Errors
        /// As [`X25519::new`].
        pub fn of_veil() -> Result<Self, X25519Failed> {
            Self::new(veil_protocol::X25519_IMPLEMENTATION)
        }

        /// One DH with the secret and the peer key.
        ///
        /// # Errors
        /// aws-lc refused the DH (it does for low-order keys only).
        pub fn dh(&self) -> Result<[u8; 32], X25519Failed> {
            match self {
                Self::Dalek { secret, public } => Ok(x25519_dh(secret, public).to_bytes()),
                Self::AwsLc { key, public, .. } => agreement::agree(
                    key,
                    agreement::UnparsedPublicKey::new(&agreement::X25519, public),
                    X25519Failed,
                    |shared| <[u8; 32]>::try_from(shared).map_err(|_| X25519Failed),
                ),
            }
        }

        /// One key generation from the secret's bytes: the public key (and, for aws-lc, the key
        /// object a DH needs).
        ///
        /// # Errors
        /// aws-lc refused the key.
        pub fn keygen(&self) -> Result<[u8; 32], X25519Failed> {
            match self {
                Self::Dalek { secret, .. } => Ok(x25519_public(secret).to_bytes()),
                Self::AwsLc { secret, .. } => {
                    let key = PrivateKey::from_private_key(&agreement::X25519, secret).map_err(|_| X25519Failed)?;
                    let public = key.compute_public_key().map_err(|_| X25519Failed)?;
                    <[u8; 32]>::try_from(public.as_ref()).map_err(|_| X25519Failed)
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const SIZES: [usize; 5] = [0, 1, 64, 1024, 65_000];

        fn pattern(len: usize) -> Vec<u8> {
            let mut v = Vec::with_capacity(len + TAG_LEN);
            v.extend((0..len).map(|i| (i % 251) as u8));
            v
        }

        #[test]
        fn every_seal_open_gives_back_the_plaintext() -> Result<(), RoundTripFailed> {
            let key = random_key();
            let ring_chacha = ring_chacha20_poly1305(&key);
            let ring_aes = ring_aes_256_gcm(&key);
            let rc_chacha = rustcrypto_chacha20_poly1305(&key);
            let rc_aes = rustcrypto_aes_256_gcm(&key);
            for len in SIZES {
                let want = pattern(len);
                let mut buf = want.clone();
                ring_seal_open(&ring_chacha, chacha_nonce(7), &mut buf)?;
                ring_seal_open(&ring_aes, aesgcm_nonce(7), &mut buf)?;
                ring_seal_open_with_ad(&ring_aes, aesgcm_nonce(8), &[0x10], &mut buf)?;
                rustcrypto_seal_open(&rc_chacha, chacha_nonce(7), &mut buf)?;
                rustcrypto_seal_open(&rc_aes, aesgcm_nonce(7), &mut buf)?;
                rustcrypto_seal_open_with_ad(&rc_chacha, chacha_nonce(8), &[0x10], &mut buf)?;
                assert_eq!(buf, want);
            }
            Ok(())
        }

        #[test]
        fn ring_and_rustcrypto_produce_identical_ciphertexts() {
            // If the two libraries disagreed, one of the "limits" would be measuring something
            // other than the cipher Noise specifies.
            let key = random_key();
            let cases: [(&ring::aead::Algorithm, [u8; 12]); 2] =
                [(&CHACHA20_POLY1305, chacha_nonce(u64::MAX - 1)), (&AES_256_GCM, aesgcm_nonce(u64::MAX - 1))];
            for (alg, nonce) in cases {
                let mut ring_out = pattern(1000);
                let Ok(unbound) = UnboundKey::new(alg, &key) else {
                    panic!("32-byte key rejected");
                };
                let Ok(()) = LessSafeKey::new(unbound).seal_in_place_append_tag(
                    ring::aead::Nonce::assume_unique_for_key(nonce),
                    Aad::empty(),
                    &mut ring_out,
                ) else {
                    panic!("ring seal failed");
                };
                let mut rc_out = pattern(1000);
                let rc_tag = if alg == &CHACHA20_POLY1305 {
                    rustcrypto_chacha20_poly1305(&key).encrypt_in_place_detached(&nonce.into(), &[], &mut rc_out)
                } else {
                    rustcrypto_aes_256_gcm(&key).encrypt_in_place_detached(&nonce.into(), &[], &mut rc_out)
                };
                let Ok(rc_tag) = rc_tag else {
                    panic!("RustCrypto seal failed");
                };
                rc_out.extend_from_slice(&rc_tag);
                assert_eq!(ring_out, rc_out);
            }
        }

        #[test]
        fn a_flipped_ciphertext_bit_is_rejected() {
            let key = rustcrypto_chacha20_poly1305(&random_key());
            let nonce = Nonce::<ChaCha20Poly1305>::from(chacha_nonce(0));
            let mut buf = pattern(64);
            let Ok(tag) = key.encrypt_in_place_detached(&nonce, &[], &mut buf) else {
                panic!("seal failed");
            };
            buf[10] ^= 0x01;
            assert!(key.decrypt_in_place_detached(&nonce, &[], &mut buf, &tag).is_err());
        }

        #[test]
        fn both_sides_of_a_dh_agree() {
            let a = StaticSecret::from(random_key());
            let b = StaticSecret::from(random_key());
            let ab = x25519_dh(&a, &PublicKey::from(&b));
            let ba = x25519_dh(&b, &PublicKey::from(&a));
            assert_eq!(ab.as_bytes(), ba.as_bytes());
        }

        #[test]
        fn both_x25519_implementations_compute_the_same() {
            let Ok(X25519::Dalek { secret, public }) = X25519::new("x25519-dalek") else { unreachable!() };
            let key = PrivateKey::from_private_key(&agreement::X25519, &secret.to_bytes()).unwrap();
            let aws = X25519::AwsLc { secret: secret.to_bytes(), key, public: public.to_bytes() };
            let dalek = X25519::Dalek { secret, public };
            assert_eq!(dalek.dh(), aws.dh());
            assert_eq!(dalek.keygen(), aws.keygen());
            assert_ne!(dalek.dh(), Ok([0u8; 32]));
            assert!(X25519::new("curve448").is_err());
        }

        #[test]
        fn nonces_follow_the_noise_layout() {
            let n = 0x0102_0304_0506_0708;
            assert_eq!(chacha_nonce(n), [0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
            assert_eq!(aesgcm_nonce(n), [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        }
    }
}

pub mod pair {
    //! Two Veil connections in one thread: build both ends, run the handshake to completion
    //! (authorizing every peer, as a permissive application would) and hand back the pair.
    //!
    //! Everything runs at one fixed [`NOW`]: a benchmark never crosses a timer, so sessions do
    //! not expire and keys change only by message count, as they would under load.

    use std::sync::Arc;

    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use veil_protocol::{
        Config, Connection, ConnectionError, Decision, Event, Mode, Pattern, Psk, PublicKey, Role, StaticKeypair,
        Suite, Timestamp,
    };

    /// The time every benchmark runs at.
    pub const NOW: Timestamp = Timestamp::from_millis(1_000);

    /// A buffer that holds any Veil packet.
    #[must_use]
    pub fn packet_buffer() -> Vec<u8> {
        vec![0u8; veil_protocol::wire::MAX_PACKET_LEN]
    }

    /// The tokens of each handshake message of `pattern`, as the Noise specification writes
    /// them; pre-messages are left out (they cost no computation). `None` for a pattern these
    /// benchmarks do not know yet.
    #[must_use]
    pub fn noise_tokens(pattern: Pattern) -> Option<&'static [&'static str]> {
        Some(match pattern {
            Pattern::IK => &["e, es, s, ss", "e, ee, se"],
            Pattern::XX => &["e", "e, ee, s, es", "s, se"],
            Pattern::KK => &["e, es, ss", "e, ee, se"],
            Pattern::IKpsk2 => &["e, es, s, ss", "e, ee, se, psk"],
            Pattern::XXpsk3 => &["e", "e, ee, s, es", "s, se, psk"],
            _ => return None,
        })
    }

    /// The X25519 work of one complete handshake, both sides together.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct DhCost {
        /// Variable-base DHs: each `ee`, `es`, `se` or `ss` token is one DH on each side.
        pub dh: u32,
        /// Fixed-base multiplications: each `e` token makes its writer generate an ephemeral pair.
        pub keygen: u32,
        /// Of `dh`, the static-static ones (`ss`, one on each side), which a static-static DH
        /// cache skips once it holds the peer.
        pub ss: u32,
    }

    /// Counts the X25519 work of `pattern` from its Noise tokens.
    #[must_use]
    pub fn dh_cost(pattern: Pattern) -> Option<DhCost> {
        let tokens = noise_tokens(pattern)?.iter().flat_map(|m| m.split(", "));
        let (mut dh, mut keygen, mut ss) = (0, 0, 0);
        for t in tokens {
            match t {
                "ee" | "es" | "se" => dh += 2,
                "ss" => {
                    dh += 2;
                    ss += 2;
                }
                "e" => keygen += 1,
                _ => {}
            }
        }
        Some(DhCost { dh, keygen, ss })
    }

    /// The identities and configurations of both ends of a benchmark pair.
    #[derive(Debug)]
    pub struct Endpoints {
        pattern: Pattern,
        initiator: Arc<Config>,
        responder: Arc<Config>,
        initiator_key: PublicKey,
        responder_key: PublicKey,
    }

    impl Endpoints {
        /// Two fixed identities configured for `pattern`, `suite` and `mode`, with a shared
        /// pre-shared key for the psk patterns.
        #[must_use]
        pub fn new(pattern: Pattern, suite: Suite, mode: Mode) -> Self {
            Self::build(pattern, suite, mode, false)
        }

        /// [`Endpoints::new`], each side with its own static-static DH cache
        /// ([`veil_protocol::StaticDhCache`], spec §11.11), as `veil-transports` endpoints have:
        /// from the second handshake on, IK, IKpsk2 and KK skip the `ss` X25519 on both sides.
        #[must_use]
        pub fn with_static_dh_cache(pattern: Pattern, suite: Suite, mode: Mode) -> Self {
            Self::build(pattern, suite, mode, true)
        }

        fn build(pattern: Pattern, suite: Suite, mode: Mode, ss_cache: bool) -> Self {
            let psk = pattern.psk_position().map(|_| Psk::new([0x42; 32]));
            let initiator_id = StaticKeypair::from_secret_bytes([0x11; 32]);
            let responder_id = StaticKeypair::from_secret_bytes([0x22; 32]);
            let initiator_key = *initiator_id.public();
            let responder_key = *responder_id.public();
            let mut initiator = Config::new(initiator_id, mode);
            initiator.pattern = pattern;
            initiator.suite = suite;
            initiator.psk.clone_from(&psk);
            let mut responder = Config::new(responder_id, mode);
            responder.psk = psk;
            if ss_cache {
                initiator.static_dh_cache = Some(Arc::new(veil_protocol::StaticDhCache::new(16)));
                responder.static_dh_cache = Some(Arc::new(veil_protocol::StaticDhCache::new(16)));
            }
            Self {
                pattern,
                initiator: Arc::new(initiator),
                responder: Arc::new(responder),
                initiator_key,
                responder_key,
            }
        }

        /// Builds both connections and runs the handshake until both are connected. `buf`
        /// carries the packets; give it [`packet_buffer`]'s size. On success no event and no
        /// packet is left pending on either side.
        ///
        /// # Errors
        /// The first error either side reported, or [`ConnectionError::NotConnected`] if the
        /// handshake did not finish.
        pub fn connect(&self, rng: &mut StdRng, buf: &mut [u8]) -> Result<(Connection, Connection), ConnectionError> {
            let to_responder = self.pattern.initiator_knows_responder().then_some(self.responder_key);
            let to_initiator = self.pattern.responder_knows_initiator().then_some(self.initiator_key);
            let mut a = Connection::new(Arc::clone(&self.initiator), Role::Initiator, to_responder, NOW, rng)?;
            let mut b = Connection::new(Arc::clone(&self.responder), Role::Responder, to_initiator, NOW, rng)?;
            // Three handshake messages and one confirming transport packet take at most two
            // rounds; the bound only stops a broken handshake from spinning.
            for _ in 0..4 {
                pump(&mut a, &mut b, buf)?;
                authorize_all(&mut b)?;
                pump(&mut b, &mut a, buf)?;
                authorize_all(&mut a)?;
                if a.is_connected() && b.is_connected() {
                    if pump(&mut a, &mut b, buf)? + pump(&mut b, &mut a, buf)? > 0 {
                        authorize_all(&mut a)?;
                        authorize_all(&mut b)?;
                    }
                    return Ok((a, b));
                }
            }
            Err(ConnectionError::NotConnected)
        }
    }

    /// An IK pair of `suite` in `mode`, connected, with a seeded RNG.
    ///
    /// # Errors
    /// As [`Endpoints::connect`].
    pub fn established(suite: Suite, mode: Mode) -> Result<(Connection, Connection), ConnectionError> {
        let mut rng = StdRng::seed_from_u64(7);
        Endpoints::new(Pattern::IK, suite, mode).connect(&mut rng, &mut packet_buffer())
    }

    /// Hands every packet `from` has to send to `to`; returns how many there were.
    ///
    /// # Errors
    /// The first error either side reported.
    pub fn pump(from: &mut Connection, to: &mut Connection, buf: &mut [u8]) -> Result<usize, ConnectionError> {
        let mut packets = 0;
        while let Some(n) = from.poll_transmit(NOW, buf)? {
            to.handle_input(NOW, &buf[..n])?;
            packets += 1;
        }
        Ok(packets)
    }

    /// Drains `c`'s events, allowing every peer that asks for a decision.
    ///
    /// # Errors
    /// The error that closed the connection, or the one `authorize` returned.
    pub fn authorize_all(c: &mut Connection) -> Result<(), ConnectionError> {
        while let Some(event) = c.poll_event() {
            match event {
                Event::AuthorizationRequired { .. } => c.authorize(NOW, Decision::allow())?,
                Event::Closed(closed) => return Err(closed.error.unwrap_or(ConnectionError::Closed)),
                _ => {}
            }
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn dh_costs_follow_the_noise_tokens() {
            let cost = |p| dh_cost(p).map(|c| (c.dh, c.keygen, c.ss));
            assert_eq!(cost(Pattern::IK), Some((8, 2, 2)));
            assert_eq!(cost(Pattern::IKpsk2), Some((8, 2, 2)));
            assert_eq!(cost(Pattern::KK), Some((8, 2, 2)));
            assert_eq!(cost(Pattern::XX), Some((6, 2, 0)));
            assert_eq!(cost(Pattern::XXpsk3), Some((6, 2, 0)));
        }

        #[test]
        fn every_pattern_and_suite_connects_with_nothing_left_pending() -> Result<(), ConnectionError> {
            let mut rng = StdRng::seed_from_u64(1);
            let mut buf = packet_buffer();
            for pattern in Pattern::ALL {
                for suite in Suite::ALL {
                    let (mut a, mut b) = Endpoints::new(pattern, suite, Mode::Stream).connect(&mut rng, &mut buf)?;
                    assert!(a.is_connected() && b.is_connected(), "{pattern} {suite}");
                    assert_eq!(a.poll_event(), None, "{pattern} {suite}");
                    assert_eq!(b.poll_event(), None, "{pattern} {suite}");
                    assert_eq!(a.poll_transmit(NOW, &mut buf)?, None, "{pattern} {suite}");
                    assert_eq!(b.poll_transmit(NOW, &mut buf)?, None, "{pattern} {suite}");
                }
            }
            Ok(())
        }
    }
}

pub mod timing {
    //! Interleaved timing: several operations measured in alternating short batches, round after
    //! round, so that all of them sample the same stretch of machine load. On a shared machine
    //! other processes only ever add time, so each operation's fastest batch ([`Rounds::best_ns`])
    //! is the best estimate of its own cost, and ratios of those are the headline figures; the
    //! median over rounds of each round's ratio ([`Rounds::median_of`]) is printed next to them as
    //! a check. criterion gives the careful per-benchmark statistics; this gives the ratios.

    use std::hint::black_box;
    use std::time::{Duration, Instant};

    /// How long an interleaved measurement runs.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Plan {
        /// Rounds; each times every operation once.
        pub rounds: usize,
        /// Target duration of one operation's batch in a round.
        pub batch: Duration,
    }

    impl Plan {
        /// For `cargo bench`: 31 rounds of about 5 ms per operation.
        pub const BENCH: Self = Self { rounds: 31, batch: Duration::from_millis(5) };
        /// For `cargo test --benches`: one single-operation round, which only checks that the
        /// code runs.
        pub const SMOKE: Self = Self { rounds: 1, batch: Duration::ZERO };

        /// [`Plan::BENCH`] when the process was started by `cargo bench` (which passes
        /// `--bench`, as criterion also checks), [`Plan::SMOKE`] otherwise (`cargo test
        /// --benches`), and `None` when criterion was asked to `--list` its benchmarks or to
        /// run them for a profiler (`--profile-time`).
        #[must_use]
        pub fn from_args() -> Option<Self> {
            let args: Vec<String> = std::env::args().collect();
            if args.iter().any(|a| a == "--list" || a.starts_with("--profile-time")) {
                None
            } else if args.iter().any(|a| a == "--bench") {
                Some(Self::BENCH)
            } else {
                Some(Self::SMOKE)
            }
        }

        /// Whether this plan measures anything worth printing.
        #[must_use]
        pub fn is_measuring(&self) -> bool {
            self.batch > Duration::ZERO
        }
    }

    /// Per-operation times, in nanoseconds, of every operation in every round.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Rounds {
        /// `ns[round][op]`.
        pub ns: Vec<Vec<f64>>,
    }

    impl Rounds {
        /// Operation `op`'s time in its fastest round, in nanoseconds.
        #[must_use]
        pub fn best_ns(&self, op: usize) -> f64 {
            self.ns.iter().map(|r| r[op]).fold(f64::INFINITY, f64::min)
        }

        /// Median over rounds of operation `op`'s time, in nanoseconds.
        #[must_use]
        pub fn median_ns(&self, op: usize) -> f64 {
            median(self.ns.iter().map(|r| r[op]).collect())
        }

        /// Median over rounds of `f` applied to each round's times.
        #[must_use]
        pub fn median_of(&self, f: impl Fn(&[f64]) -> f64) -> f64 {
            median(self.ns.iter().map(|r| f(r)).collect())
        }
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    fn time_batch(op: &mut dyn FnMut(), iters: u64) -> Duration {
        let start = Instant::now();
        for _ in 0..iters {
            op();
        }
        black_box(start.elapsed())
    }

    /// Runs every operation in `ops` for `plan.rounds` interleaved rounds. Each operation is
    /// first warmed up and calibrated for its own batch size.
    pub fn interleave(plan: Plan, ops: &mut [&mut dyn FnMut()]) -> Rounds {
        let batch_ns = plan.batch.as_nanos() as f64;
        let iters: Vec<u64> = ops
            .iter_mut()
            .map(|op| {
                // Warm up for about one batch, then size the batch from the warm-up's pace.
                let mut n = 1u64;
                let mut spent = time_batch(&mut **op, 1);
                let mut done = 1u64;
                while spent < plan.batch {
                    spent += time_batch(&mut **op, n);
                    done += n;
                    n *= 2;
                }
                let per_op = spent.as_nanos() as f64 / done as f64;
                ((batch_ns / per_op.max(1.0)).ceil() as u64).max(1)
            })
            .collect();
        let ns = (0..plan.rounds)
            .map(|_| {
                ops.iter_mut()
                    .zip(&iters)
                    .map(|(op, &n)| time_batch(&mut **op, n).as_nanos() as f64 / n as f64)
                    .collect()
            })
            .collect();
        Rounds { ns }
    }

    /// Formats nanoseconds with a unit that keeps 3 significant figures.
    #[must_use]
    pub fn format_ns(ns: f64) -> String {
        if ns >= 1e6 {
            format!("{:.2} ms", ns / 1e6)
        } else if ns >= 1e3 {
            format!("{:.2} µs", ns / 1e3)
        } else {
            format!("{ns:.0} ns")
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_median_is_the_middle_value_or_the_mean_of_the_two_middle_ones() {
            assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
            assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
            assert!(median(Vec::new()).is_nan());
        }

        #[test]
        fn every_operation_runs_in_every_round() {
            let (mut a, mut b) = (0u32, 0u32);
            let rounds = interleave(Plan { rounds: 3, batch: Duration::ZERO }, &mut [&mut || a += 1, &mut || b += 1]);
            assert_eq!(rounds.ns.len(), 3);
            assert!(rounds.ns.iter().all(|r| r.len() == 2));
            // One warm-up call, then one call per round.
            assert_eq!((a, b), (4, 4));
        }
    }
}
