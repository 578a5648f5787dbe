//! Cryptographic building blocks under the Noise layer: static identities, pre-shared
//! keys, the transport AEAD with explicit nonces, Noise `REKEY`, and the snow crypto
//! resolver fed by the caller's random number generator.
//!
//! The core draws no randomness by itself: each handshake takes 32 bytes from the
//! caller's [`CryptoRngCore`] to seed a ChaCha20 generator that snow uses for the
//! ephemeral key, so the caller decides where entropy comes from (a hardware RNG on a
//! microcontroller, the OS on a server).

use alloc::boxed::Box;
use core::fmt;

use rand_core::{CryptoRngCore, RngCore, SeedableRng};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::params::Suite;
use crate::wire::TAG_LEN;

/// Length of symmetric keys (cipher keys and pre-shared keys).
pub const KEY_LEN: usize = 32;

/// An X25519 public key identifying a node.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Constant-time equality, for comparisons an attacker might time (spec §11).
    #[must_use]
    pub fn ct_eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// The raw 32 bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PublicKey(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…)")
    }
}

impl From<[u8; 32]> for PublicKey {
    fn from(b: [u8; 32]) -> Self {
        Self(b)
    }
}

/// The X25519 implementation this build computes with: `"aws-lc"` with the `aws-lc` feature
/// (servers), else `"x25519-dalek"`. The results are the same; benchmarks name it.
pub const X25519_IMPLEMENTATION: &str = if cfg!(feature = "aws-lc") { "aws-lc" } else { "x25519-dalek" };

/// A node's static X25519 key pair: its identity. The secret is zeroized on drop and
/// never printed.
#[derive(Clone)]
pub struct StaticKeypair {
    secret: x25519_dalek::StaticSecret,
    public: PublicKey,
    /// The same secret as aws-lc's key object, built once (feature `aws-lc`, see [`fast`]).
    #[cfg(feature = "aws-lc")]
    fast: Option<fast::Key>,
}

impl StaticKeypair {
    /// Generates a new key pair from the caller's RNG.
    pub fn generate(rng: &mut dyn CryptoRngCore) -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(bytes.as_mut());
        Self::from_secret_bytes(*bytes)
    }

    /// Rebuilds a key pair from its 32-byte secret (for example read from a key file).
    #[must_use]
    pub fn from_secret_bytes(mut bytes: [u8; 32]) -> Self {
        let secret = x25519_dalek::StaticSecret::from(bytes);
        bytes.zeroize();
        let public = PublicKey(x25519_dalek::PublicKey::from(&secret).to_bytes());
        Self {
            #[cfg(feature = "aws-lc")]
            fast: fast::keypair(secret.as_bytes()).map(|(key, _)| key),
            secret,
            public,
        }
    }

    /// The public half.
    #[must_use]
    pub const fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The secret bytes, for handing to snow or writing a key file. Keep the copy short-lived.
    #[must_use]
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }
}

impl fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKeypair").field("public", &self.public).finish_non_exhaustive()
    }
}

/// A 32-byte pre-shared symmetric key for the `psk` patterns. Zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Psk([u8; KEY_LEN]);

impl Psk {
    /// Wraps raw key bytes.
    #[must_use]
    pub const fn new(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    pub(crate) const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

/// A symmetric transport key. Zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub(crate) struct CipherKey(pub(crate) [u8; KEY_LEN]);

impl fmt::Debug for CipherKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CipherKey(<redacted>)")
    }
}

/// The 96-bit AEAD nonce for counter `n`, encoded as Noise specifies for the suite
/// (Noise §12.3: ChaChaPoly little-endian, AESGCM big-endian, after 32 zero bits).
fn nonce_bytes(suite: Suite, n: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    match suite {
        Suite::ChaChaPolyBlake2s => nonce[4..].copy_from_slice(&n.to_le_bytes()),
        Suite::AesGcmSha256 => nonce[4..].copy_from_slice(&n.to_be_bytes()),
    }
    nonce
}

/// The authentication tag did not verify. Carries no detail by design.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpenError;

/// An AEAD keyed for one direction and epoch, sealing and opening in place: the expanded
/// cipher state, built from a [`CipherKey`] when it is about to be used.
///
/// One backend per build: ring (feature `ring`) or RustCrypto, whose cipher objects zeroize
/// their key material on drop (the `zeroize` features enabled in `Cargo.toml`); ring's keys
/// offer no zeroization.
// Never stored inline: built on the stack for one operation, or boxed whole while in use
// (`TransportKey`); boxing the AES variant as well would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Aead {
    #[cfg(feature = "ring")]
    Ring(ring::aead::LessSafeKey),
    #[cfg(not(feature = "ring"))]
    ChaCha(chacha20poly1305::ChaCha20Poly1305),
    #[cfg(not(feature = "ring"))]
    AesGcm(aes_gcm::Aes256Gcm),
}

impl fmt::Debug for Aead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Aead(<keyed>)")
    }
}

impl Aead {
    /// The cipher for `suite` keyed with `key`. `None` only if ring refused the key, which it
    /// does not for 32-byte keys: callers treat it as a failed operation.
    pub(crate) fn new(suite: Suite, key: &CipherKey) -> Option<Self> {
        #[cfg(feature = "ring")]
        {
            let alg = match suite {
                Suite::ChaChaPolyBlake2s => &ring::aead::CHACHA20_POLY1305,
                Suite::AesGcmSha256 => &ring::aead::AES_256_GCM,
            };
            ring::aead::UnboundKey::new(alg, &key.0).ok().map(|k| Self::Ring(ring::aead::LessSafeKey::new(k)))
        }
        #[cfg(not(feature = "ring"))]
        {
            use aes_gcm::KeyInit;
            Some(match suite {
                Suite::ChaChaPolyBlake2s => Self::ChaCha(chacha20poly1305::ChaCha20Poly1305::new((&key.0).into())),
                Suite::AesGcmSha256 => Self::AesGcm(aes_gcm::Aes256Gcm::new((&key.0).into())),
            })
        }
    }

    /// Encrypts `buf` in place and returns the tag.
    pub(crate) fn seal(&self, suite: Suite, counter: u64, ad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        let nonce = nonce_bytes(suite, counter);
        let mut tag = [0u8; TAG_LEN];
        match self {
            #[cfg(feature = "ring")]
            Self::Ring(k) => {
                let n = ring::aead::Nonce::assume_unique_for_key(nonce);
                // Invariant: ring only fails for inputs over ~256 GiB; packets are ≤ 64 KiB.
                if let Ok(t) = k.seal_in_place_separate_tag(n, ring::aead::Aad::from(ad), buf) {
                    tag.copy_from_slice(t.as_ref());
                }
            }
            #[cfg(not(feature = "ring"))]
            Self::ChaCha(c) => {
                use chacha20poly1305::AeadInPlace;
                if let Ok(t) = c.encrypt_in_place_detached((&nonce).into(), ad, buf) {
                    tag.copy_from_slice(&t);
                }
            }
            #[cfg(not(feature = "ring"))]
            Self::AesGcm(c) => {
                use aes_gcm::AeadInPlace;
                if let Ok(t) = c.encrypt_in_place_detached((&nonce).into(), ad, buf) {
                    tag.copy_from_slice(&t);
                }
            }
        }
        tag
    }

    /// Decrypts `buf` (ciphertext followed by the tag) in place. On success the first
    /// `buf.len() - TAG_LEN` bytes hold the plaintext. On failure the contents of `buf`
    /// are unspecified; the caller must discard them.
    pub(crate) fn open(&self, suite: Suite, counter: u64, ad: &[u8], buf: &mut [u8]) -> Result<(), OpenError> {
        if buf.len() < TAG_LEN {
            return Err(OpenError);
        }
        let nonce = nonce_bytes(suite, counter);
        match self {
            #[cfg(feature = "ring")]
            Self::Ring(k) => {
                let n = ring::aead::Nonce::assume_unique_for_key(nonce);
                k.open_in_place(n, ring::aead::Aad::from(ad), buf).map(|_| ()).map_err(|_| OpenError)
            }
            #[cfg(not(feature = "ring"))]
            Self::ChaCha(c) => {
                use chacha20poly1305::AeadInPlace;
                let (ct, tag) = buf.split_at_mut(buf.len() - TAG_LEN);
                c.decrypt_in_place_detached((&nonce).into(), ad, ct, (&*tag).into()).map_err(|_| OpenError)
            }
            #[cfg(not(feature = "ring"))]
            Self::AesGcm(c) => {
                use aes_gcm::AeadInPlace;
                let (ct, tag) = buf.split_at_mut(buf.len() - TAG_LEN);
                c.decrypt_in_place_detached((&nonce).into(), ad, ct, (&*tag).into()).map_err(|_| OpenError)
            }
        }
    }
}

/// Noise `REKEY(k)` (Noise §4.2): the first 32 bytes of `ENCRYPT(k, 2^64-1, "", zeros)`.
pub(crate) fn rekey(suite: Suite, key: &CipherKey) -> CipherKey {
    let mut next = CipherKey([0u8; KEY_LEN]);
    if let Some(aead) = Aead::new(suite, key) {
        let _tag = aead.seal(suite, u64::MAX, &[], &mut next.0);
    }
    next
}

/// A transport key for one direction and epoch (spec §6.1), held as its raw 32 bytes
/// (zeroized on drop) rather than as an expanded cipher object: an idle connection holds
/// two of these, not two expanded AEADs of ≈ 0.5–1 KiB each (spec §13).
///
/// ChaCha20-Poly1305 has no key schedule: its cipher object is built on the stack for each
/// operation and dropped right after it. AES-256-GCM's key schedule and GHASH key cost more
/// than sealing a small packet, so its expanded state is built on first use and kept while
/// the connection is busy; [`TransportKey::release`] drops it once the connection goes idle.
pub(crate) struct TransportKey {
    key: CipherKey,
    /// AES-GCM only: the expanded cipher, while in use. Boxed: absent when idle.
    expanded: Option<Box<Aead>>,
}

impl fmt::Debug for TransportKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportKey").field("expanded", &self.expanded.is_some()).finish_non_exhaustive()
    }
}

impl TransportKey {
    pub(crate) fn new(key: CipherKey) -> Self {
        Self { key, expanded: None }
    }

    /// Runs `f` with the cipher for `suite`: ChaCha20-Poly1305 built for this call only and
    /// dropped after it, AES-GCM expanded once and kept until [`TransportKey::release`].
    fn with_aead<R>(&mut self, suite: Suite, f: impl FnOnce(&Aead) -> R) -> Option<R> {
        match suite {
            Suite::ChaChaPolyBlake2s => Aead::new(suite, &self.key).map(|a| f(&a)),
            Suite::AesGcmSha256 => {
                if self.expanded.is_none() {
                    self.expanded = Aead::new(suite, &self.key).map(Box::new);
                }
                self.expanded.as_deref().map(f)
            }
        }
    }

    /// Encrypts `buf` in place and returns the tag (see [`Aead::seal`]).
    pub(crate) fn seal(&mut self, suite: Suite, counter: u64, ad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        // Invariant: `Aead::new` accepts every 32-byte key (see there).
        self.with_aead(suite, |a| a.seal(suite, counter, ad, buf)).unwrap_or([0u8; TAG_LEN])
    }

    /// Decrypts `buf` in place (see [`Aead::open`]).
    pub(crate) fn open(&mut self, suite: Suite, counter: u64, ad: &[u8], buf: &mut [u8]) -> Result<(), OpenError> {
        self.with_aead(suite, |a| a.open(suite, counter, ad, buf)).unwrap_or(Err(OpenError))
    }

    /// Noise `REKEY` (spec §6.1): the next epoch's key.
    pub(crate) fn rekey(&self, suite: Suite) -> Self {
        Self::new(rekey(suite, &self.key))
    }

    /// Drops the expanded cipher state, if any; the next operation builds it again.
    pub(crate) fn release(&mut self) {
        self.expanded = None;
    }

    /// Whether expanded cipher state is held (for tests).
    #[cfg(test)]
    pub(crate) const fn is_expanded(&self) -> bool {
        self.expanded.is_some()
    }
}

/// snow's source of randomness: ChaCha20 seeded from the caller's RNG.
struct SeededRandom(rand_chacha::ChaCha20Rng);

impl snow::types::Random for SeededRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

/// A snow resolver: primitives from ring (feature `ring`) or RustCrypto, randomness
/// from a seed drawn from the caller's RNG.
pub(crate) struct Resolver {
    seed: Zeroizing<[u8; 32]>,
    /// This node's identity, so that snow's X25519 reuses its public key (see [`Dh25519`]).
    identity: Option<KnownStatic>,
    /// The endpoint's static-static DH cache, for X25519 with the identity (see [`Dh25519`]).
    #[cfg(feature = "std")]
    ss: Option<alloc::sync::Arc<crate::dh_cache::SsContext>>,
}

impl Resolver {
    pub(crate) fn new(rng: &mut dyn CryptoRngCore) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Self {
            seed,
            identity: None,
            #[cfg(feature = "std")]
            ss: None,
        }
    }

    /// Lets the X25519 objects handed to snow take `identity`'s public key as it is
    /// instead of recomputing it for every handshake.
    pub(crate) fn with_identity(mut self, identity: &StaticKeypair) -> Self {
        self.identity = Some(KnownStatic::of(identity));
        self
    }

    /// Lets X25519 with the identity (see [`Resolver::with_identity`]) use and feed the
    /// endpoint's static-static DH cache through `ss`.
    #[cfg(feature = "std")]
    pub(crate) fn with_static_dh_cache(mut self, ss: alloc::sync::Arc<crate::dh_cache::SsContext>) -> Self {
        self.ss = Some(ss);
        self
    }

    pub(crate) fn boxed(self) -> snow::resolvers::BoxedCryptoResolver {
        #[cfg(feature = "ring")]
        {
            Box::new(snow::resolvers::FallbackResolver::new(Box::new(self), Box::new(snow::resolvers::RingResolver)))
        }
        #[cfg(not(feature = "ring"))]
        {
            Box::new(self)
        }
    }
}

impl snow::resolvers::CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        Some(Box::new(SeededRandom(rand_chacha::ChaCha20Rng::from_seed(*self.seed))))
    }

    fn resolve_dh(&self, choice: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        match choice {
            snow::params::DHChoice::Curve25519 => {
                let mut dh = Dh25519::with_known(self.identity.clone());
                #[cfg(feature = "std")]
                {
                    dh.ss.clone_from(&self.ss);
                }
                Some(Box::new(dh))
            }
            _ => None,
        }
    }

    fn resolve_hash(&self, choice: &snow::params::HashChoice) -> Option<Box<dyn snow::types::Hash>> {
        #[cfg(feature = "ring")]
        if let Some(h) = snow::resolvers::RingResolver.resolve_hash(choice) {
            return Some(h);
        }
        snow::resolvers::DefaultResolver.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &snow::params::CipherChoice) -> Option<Box<dyn snow::types::Cipher>> {
        let suite = match choice {
            snow::params::CipherChoice::ChaChaPoly => Suite::ChaChaPolyBlake2s,
            snow::params::CipherChoice::AESGCM => Suite::AesGcmSha256,
            // Other ciphers exist only behind snow features Veil does not enable.
            #[allow(unreachable_patterns)]
            _ => return None,
        };
        Some(Box::new(HandshakeCipher { suite, key: CipherKey([0u8; KEY_LEN]) }))
    }
}

/// A key pair whose public half is already known: the node's identity.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct KnownStatic {
    secret: [u8; 32],
    public: [u8; 32],
    /// aws-lc's object for `secret`, shared with the [`StaticKeypair`]; it cleanses its own
    /// memory when the last reference goes.
    #[cfg(feature = "aws-lc")]
    #[zeroize(skip)]
    fast: Option<fast::Key>,
}

impl KnownStatic {
    fn of(identity: &StaticKeypair) -> Self {
        Self {
            secret: identity.secret.to_bytes(),
            public: identity.public.0,
            #[cfg(feature = "aws-lc")]
            fast: identity.fast.clone(),
        }
    }
}

/// X25519 from aws-lc-rs (feature `aws-lc`, servers): aws-lc's assembly ladder (s2n-bignum)
/// computes a DH in ≈ 24 µs and a public key in ≈ 7 µs on x86-64, against ≈ 53 µs and
/// ≈ 16 µs for x25519-dalek's serial ladder (`benches/RESULTS.md`). Results are the same
/// bit for bit, with one exception that [`dh`] hands back: aws-lc refuses an all-zero
/// output (a low-order peer key), which spec §11.11 says is computed, not checked, so the
/// caller computes that case with x25519-dalek. aws-lc keeps private keys in memory it
/// cleanses when it frees it (`OPENSSL_free`).
#[cfg(feature = "aws-lc")]
mod fast {
    use aws_lc_rs::agreement::{agree, PrivateKey, UnparsedPublicKey, X25519};

    /// A private key in aws-lc's form, shared between a node's identity and its handshakes.
    pub(super) type Key = alloc::sync::Arc<PrivateKey>;

    /// aws-lc's key for `secret` (clamped as RFC 7748 says) and its public key.
    pub(super) fn keypair(secret: &[u8; 32]) -> Option<(Key, [u8; 32])> {
        let key = PrivateKey::from_private_key(&X25519, secret).ok()?;
        let public = <[u8; 32]>::try_from(key.compute_public_key().ok()?.as_ref()).ok()?;
        Some((alloc::sync::Arc::new(key), public))
    }

    /// `X25519(key, theirs)` into `out`; false when aws-lc refuses (see the module).
    pub(super) fn dh(key: &PrivateKey, theirs: &[u8; 32], out: &mut [u8; 32]) -> bool {
        agree(key, UnparsedPublicKey::new(&X25519, theirs), (), |shared| {
            *out = <[u8; 32]>::try_from(shared).map_err(|_| ())?;
            Ok(())
        })
        .is_ok()
    }
}

/// X25519 for snow whose private key is zeroized on drop (snow's own does not zeroize).
///
/// snow sets the static private key on every handshake it builds, and deriving the public
/// key is a fixed-base scalar multiplication; when the key is the node's identity, whose
/// public key [`StaticKeypair`] already holds, that work is skipped (one multiplication
/// per side and handshake; see `benches/RESULTS.md`).
///
/// With the identity's key (`is_identity`) and an endpoint cache (`ss`, `std` only), X25519
/// first looks the peer's public key up in the cache and records what it computes, so that
/// the handshake can store `DH(s, rs)` once it has finished ([`crate::dh_cache`]). Whether
/// the key is the identity is decided by comparing it with the identity's secret, not by how
/// snow set it (snow also `set`s fixed test ephemerals): the cache only ever holds
/// `DH(identity secret, P)`, which is what this computes for that key and any `P`.
#[derive(Zeroize, ZeroizeOnDrop)]
struct Dh25519 {
    secret: [u8; 32],
    public: [u8; 32],
    known: Option<KnownStatic>,
    /// The secret is the identity's (`known`'s).
    is_identity: bool,
    /// aws-lc's object for `secret` (feature `aws-lc`).
    #[cfg(feature = "aws-lc")]
    #[zeroize(skip)]
    fast: Option<fast::Key>,
    #[cfg(feature = "std")]
    #[zeroize(skip)]
    ss: Option<alloc::sync::Arc<crate::dh_cache::SsContext>>,
}

impl Dh25519 {
    fn with_known(known: Option<KnownStatic>) -> Self {
        Self {
            secret: [0u8; 32],
            public: [0u8; 32],
            known,
            is_identity: false,
            #[cfg(feature = "aws-lc")]
            fast: None,
            #[cfg(feature = "std")]
            ss: None,
        }
    }

    fn derive_public(&mut self) {
        self.is_identity = false;
        #[cfg(feature = "aws-lc")]
        {
            self.fast = None;
        }
        if let Some(k) = &self.known {
            if bool::from(k.secret.ct_eq(&self.secret)) {
                self.public = k.public;
                self.is_identity = true;
                #[cfg(feature = "aws-lc")]
                self.fast.clone_from(&k.fast);
                return;
            }
        }
        #[cfg(feature = "aws-lc")]
        if let Some((key, public)) = fast::keypair(&self.secret) {
            self.public = public;
            self.fast = Some(key);
            return;
        }
        let secret = x25519_dalek::StaticSecret::from(self.secret);
        self.public = x25519_dalek::PublicKey::from(&secret).to_bytes();
    }

    /// The endpoint cache, when this key is the identity.
    #[cfg(feature = "std")]
    fn cache(&self) -> Option<&crate::dh_cache::SsContext> {
        self.ss.as_deref().filter(|_| self.is_identity)
    }
}

impl snow::types::Dh for Dh25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        32
    }

    fn priv_len(&self) -> usize {
        32
    }

    fn set(&mut self, privkey: &[u8]) {
        let n = privkey.len().min(32);
        self.secret[..n].copy_from_slice(&privkey[..n]);
        self.derive_public();
    }

    fn generate(&mut self, rng: &mut dyn snow::types::Random) -> Result<(), snow::Error> {
        rng.try_fill_bytes(&mut self.secret)?;
        self.derive_public();
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        &self.secret
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        // snow passes its fixed-size key buffer; the key is its first 32 bytes.
        let theirs: [u8; 32] = pubkey.get(..32).and_then(|k| k.try_into().ok()).ok_or(snow::Error::Dh)?;
        let dst: &mut [u8; 32] = out.get_mut(..32).and_then(|d| d.try_into().ok()).ok_or(snow::Error::Dh)?;
        #[cfg(feature = "std")]
        if let Some(ss) = self.cache() {
            if ss.lookup(&theirs, dst) {
                return Ok(());
            }
        }
        #[cfg(feature = "aws-lc")]
        let done = self.fast.as_deref().is_some_and(|key| fast::dh(key, &theirs, dst));
        #[cfg(not(feature = "aws-lc"))]
        let done = false;
        if !done {
            let shared =
                x25519_dalek::StaticSecret::from(self.secret).diffie_hellman(&x25519_dalek::PublicKey::from(theirs));
            dst.copy_from_slice(shared.as_bytes());
        }
        #[cfg(feature = "std")]
        if let Some(ss) = self.cache() {
            ss.record(&theirs, dst);
        }
        Ok(())
    }
}

/// The handshake's AEAD for snow, on Veil's own [`Aead`], with the key zeroized on drop.
struct HandshakeCipher {
    suite: Suite,
    key: CipherKey,
}

impl snow::types::Cipher for HandshakeCipher {
    fn name(&self) -> &'static str {
        match self.suite {
            Suite::ChaChaPolyBlake2s => "ChaChaPoly",
            Suite::AesGcmSha256 => "AESGCM",
        }
    }

    fn set(&mut self, key: &[u8; KEY_LEN]) {
        self.key.0 = *key;
    }

    fn encrypt(&self, nonce: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let n = plaintext.len();
        // snow sizes `out` for plaintext plus tag; a shorter one is a snow bug, not input.
        let Some(dst) = out.get_mut(..n + TAG_LEN) else { return 0 };
        dst[..n].copy_from_slice(plaintext);
        let Some(aead) = Aead::new(self.suite, &self.key) else { return 0 };
        let tag = aead.seal(self.suite, nonce, authtext, &mut dst[..n]);
        dst[n..].copy_from_slice(&tag);
        n + TAG_LEN
    }

    fn decrypt(&self, nonce: u64, authtext: &[u8], ciphertext: &[u8], out: &mut [u8]) -> Result<usize, snow::Error> {
        let n = ciphertext.len().checked_sub(TAG_LEN).ok_or(snow::Error::Decrypt)?;
        let mut buf = Zeroizing::new(ciphertext.to_vec());
        Aead::new(self.suite, &self.key)
            .ok_or(snow::Error::Decrypt)?
            .open(self.suite, nonce, authtext, &mut buf)
            .map_err(|_| snow::Error::Decrypt)?;
        out.get_mut(..n).ok_or(snow::Error::Decrypt)?.copy_from_slice(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snow::resolvers::CryptoResolver;

    #[test]
    fn rekey_matches_snow_cipher_rekey() {
        for (suite, choice) in [
            (Suite::ChaChaPolyBlake2s, snow::params::CipherChoice::ChaChaPoly),
            (Suite::AesGcmSha256, snow::params::CipherChoice::AESGCM),
        ] {
            let key = CipherKey([7u8; 32]);
            let mut c = snow::resolvers::DefaultResolver.resolve_cipher(&choice).unwrap();
            c.set(&key.0);
            c.rekey();
            let ours = rekey(suite, &key);
            // Compare by encrypting the same message with both keys.
            let mut a = [0u8; 48];
            let n = c.encrypt(5, b"ad", b"0123456789abcdef0123456789abcdef", &mut a);
            assert_eq!(n, 48);
            let mut b = *b"0123456789abcdef0123456789abcdef";
            let tag = Aead::new(suite, &ours).unwrap().seal(suite, 5, b"ad", &mut b);
            assert_eq!(&a[..32], &b);
            assert_eq!(&a[32..], &tag);
        }
    }

    #[test]
    fn open_rejects_any_tampering_and_short_input() {
        for suite in Suite::ALL {
            let key = CipherKey([1u8; 32]);
            let aead = Aead::new(suite, &key).unwrap();
            let mut buf = [0u8; 20 + TAG_LEN];
            buf[..20].copy_from_slice(b"twenty bytes of text");
            let tag = aead.seal(suite, 9, b"hdr", &mut buf[..20]);
            buf[20..].copy_from_slice(&tag);
            let sealed = buf;
            let mut ok = sealed;
            assert!(aead.open(suite, 9, b"hdr", &mut ok).is_ok());
            assert_eq!(&ok[..20], b"twenty bytes of text");
            let mut wrong_nonce = sealed;
            assert!(aead.open(suite, 10, b"hdr", &mut wrong_nonce).is_err());
            let mut wrong_ad = sealed;
            assert!(aead.open(suite, 9, b"hdR", &mut wrong_ad).is_err());
            assert!(aead.open(suite, 9, b"hdr", &mut [0u8; 5]).is_err());
        }
    }

    #[test]
    fn transport_keys_seal_as_the_aead_and_hold_no_expanded_state_once_released() {
        for suite in Suite::ALL {
            let raw = CipherKey([4u8; 32]);
            let aead = Aead::new(suite, &raw).unwrap();
            let mut key = TransportKey::new(raw.clone());
            assert!(!key.is_expanded());
            let mut a = *b"sixteen byte msg";
            let mut b = a;
            let tag_a = key.seal(suite, 3, b"ad", &mut a);
            let tag_b = aead.seal(suite, 3, b"ad", &mut b);
            assert_eq!((a, tag_a), (b, tag_b));
            // Only AES-GCM keeps its key schedule between operations.
            assert_eq!(key.is_expanded(), suite == Suite::AesGcmSha256);
            key.release();
            assert!(!key.is_expanded());
            let mut sealed = [0u8; 16 + TAG_LEN];
            sealed[..16].copy_from_slice(&a);
            sealed[16..].copy_from_slice(&tag_a);
            assert!(key.open(suite, 3, b"ad", &mut sealed).is_ok());
            assert_eq!(&sealed[..16], b"sixteen byte msg");
            // The next epoch's key is REKEY of this one, expanded or not.
            let mut next = key.rekey(suite);
            let mut c = [0u8; 16];
            let mut d = [0u8; 16];
            let tag_c = next.seal(suite, 0, &[], &mut c);
            let tag_d = Aead::new(suite, &rekey(suite, &raw)).unwrap().seal(suite, 0, &[], &mut d);
            assert_eq!((c, tag_c), (d, tag_d));
        }
    }

    #[test]
    fn a_known_identity_gives_the_same_public_key_as_deriving_it() {
        use snow::types::Dh;
        let id = StaticKeypair::from_secret_bytes([5u8; 32]);
        let known = KnownStatic::of(&id);
        let mut cached = Dh25519::with_known(Some(known.clone()));
        cached.set(&[5u8; 32]);
        let mut derived = Dh25519::with_known(None);
        derived.set(&[5u8; 32]);
        assert_eq!(cached.pubkey(), derived.pubkey());
        // Any other key is derived, never taken from the cache.
        let mut other = Dh25519::with_known(Some(known));
        other.set(&[6u8; 32]);
        assert_eq!(other.pubkey(), StaticKeypair::from_secret_bytes([6u8; 32]).public().as_bytes());
    }

    /// X25519 through [`Dh25519`] (aws-lc's with feature `aws-lc`) against x25519-dalek's.
    #[cfg(feature = "aws-lc")]
    fn same_as_dalek(secret: [u8; 32], theirs: [u8; 32]) {
        use snow::types::Dh;
        let mut ours = Dh25519::with_known(None);
        ours.set(&secret);
        let dalek = x25519_dalek::StaticSecret::from(secret);
        assert_eq!(ours.pubkey(), x25519_dalek::PublicKey::from(&dalek).as_bytes());
        let mut out = [0u8; 32];
        ours.dh(&theirs, &mut out).unwrap();
        assert_eq!(&out, dalek.diffie_hellman(&x25519_dalek::PublicKey::from(theirs)).as_bytes());
    }

    #[cfg(feature = "aws-lc")]
    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn aws_lc_x25519_matches_x25519_dalek(secret in proptest::prelude::any::<[u8; 32]>(), theirs in proptest::prelude::any::<[u8; 32]>()) {
            same_as_dalek(secret, theirs);
        }
    }

    /// Low-order points and non-canonical encodings (u ≥ p, the top bit set): aws-lc refuses
    /// the all-zero outputs, and the result must still be x25519-dalek's (spec §11.11).
    #[cfg(feature = "aws-lc")]
    #[test]
    fn aws_lc_x25519_matches_x25519_dalek_on_low_order_and_non_canonical_keys() {
        let hex = |s: &str| -> [u8; 32] { hex::decode(s).unwrap().try_into().unwrap() };
        let mut keys = alloc::vec![
            [0u8; 32],
            hex("0100000000000000000000000000000000000000000000000000000000000000"),
            // The two points of order 8.
            hex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
            hex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
            // p − 1, p, p + 1, p + 9 (≡ 9, the base point).
            hex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            hex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            hex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            hex("f6ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            [0xff; 32],
        ];
        let high: alloc::vec::Vec<[u8; 32]> = keys
            .iter()
            .map(|k| {
                let mut k = *k;
                k[31] |= 0x80;
                k
            })
            .collect();
        keys.extend(high);
        for theirs in keys {
            for secret in [[1u8; 32], [0x5a; 32], [0xff; 32]] {
                same_as_dalek(secret, theirs);
            }
        }
    }

    #[test]
    fn secrets_are_not_printed() {
        let kp = StaticKeypair::from_secret_bytes([3u8; 32]);
        let s = alloc::format!("{kp:?} {:?} {:?}", Psk::new([9u8; 32]), CipherKey([9u8; 32]));
        assert!(!s.contains("0303"));
        assert!(!s.contains("[9"));
        assert!(s.contains("redacted"));
    }
}
