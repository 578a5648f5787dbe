//! Shared pieces of Veil's benchmarks.
//!
//! Veil's benchmarks measure Veil next to the raw limit or a peer *in the same run* and report the
//! ratio: absolute numbers on a shared 2-core machine drift too much to mean anything alone.
//! [`raw`] holds the raw limits: bare AEAD seal+open and bare X25519, with no framing, no
//! handshake state and no allocation per call.
#![forbid(unsafe_code)]

pub mod raw {
    //! The raw limits: one AEAD seal followed by one open of the same buffer, and one X25519 DH.
    //!
    //! The nonces follow Noise's layout (Noise spec §12.3 and §12.4): four zero bytes, then the
    //! 64-bit counter, little-endian for ChaCha20-Poly1305 and big-endian for AES-GCM, with empty
    //! associated data, as Noise transport messages use. Every seal+open is checked: a benchmark
    //! that silently stopped decrypting would report nonsense.

    use core::fmt;

    use aes_gcm::Aes256Gcm;
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
        let len = buf.len();
        key.seal_in_place_append_tag(ring::aead::Nonce::assume_unique_for_key(nonce), Aad::empty(), buf)
            .map_err(|_| RoundTripFailed)?;
        let opened = key
            .open_in_place(ring::aead::Nonce::assume_unique_for_key(nonce), Aad::empty(), buf)
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
        let nonce = Nonce::<A>::from(nonce);
        let tag = cipher.encrypt_in_place_detached(&nonce, &[], buf).map_err(|_| RoundTripFailed)?;
        cipher.decrypt_in_place_detached(&nonce, &[], buf, &tag).map_err(|_| RoundTripFailed)
    }

    /// One X25519 Diffie-Hellman with x25519-dalek 2 (the curve25519-dalek 4 that snow uses).
    #[must_use]
    pub fn x25519_dh(secret: &StaticSecret, public: &PublicKey) -> SharedSecret {
        secret.diffie_hellman(public)
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
                rustcrypto_seal_open(&rc_chacha, chacha_nonce(7), &mut buf)?;
                rustcrypto_seal_open(&rc_aes, aesgcm_nonce(7), &mut buf)?;
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
        fn nonces_follow_the_noise_layout() {
            let n = 0x0102_0304_0506_0708;
            assert_eq!(chacha_nonce(n), [0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
            assert_eq!(aesgcm_nonce(n), [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        }
    }
}
