//! One Noise handshake (spec §5): snow's `HandshakeState` plus Veil's headers,
//! prologue, payloads and indices. `Handshake::into_session` consumes it and yields
//! the transport [`Session`].

use core::fmt;

use zeroize::Zeroize;

use crate::config::{Config, Limits};
use crate::crypto::{CipherKey, Psk, PublicKey, Resolver};
use crate::error::{DecodeError, HandshakeError};
use crate::params::{noise_params, Mode, Pattern, Suite, PROTOCOL_VERSION};
use crate::payload::HandshakePayload;
use crate::session::{Role, Session, SessionParams};
use crate::time::Timestamp;
use crate::wire::{InitHeader, DH_LEN, HANDSHAKE_PAYLOAD_MAX, TAG_LEN, TYPE_HANDSHAKE_FINAL, TYPE_HANDSHAKE_RESP};

/// spec §5.2: the domain string that starts every prologue.
pub const PROLOGUE_DOMAIN: &[u8; 7] = b"Veil-v1";
/// Longest prologue: domain, mode byte, datagram INIT header.
const PROLOGUE_MAX: usize = 7 + 1 + 7;
/// The most bytes Noise adds to a handshake payload in Veil's patterns (e, encrypted s, tag).
const NOISE_OVERHEAD_MAX: usize = DH_LEN + DH_LEN + TAG_LEN + TAG_LEN;
/// The largest handshake body Veil reads (spec §3.3).
pub const HANDSHAKE_BODY_MAX: usize = HANDSHAKE_PAYLOAD_MAX + NOISE_OVERHEAD_MAX;

/// Length of the handshake hash exported for channel binding (both suites hash to 32 B).
pub const HANDSHAKE_HASH_LEN: usize = 32;

/// spec §5.4: the smallest Noise message (without payload) for message `index` of `pattern`.
pub(crate) const fn min_body_len(pattern: Pattern, index: usize) -> usize {
    match (pattern, index) {
        (Pattern::IK | Pattern::IKpsk2, 0) => DH_LEN + DH_LEN + TAG_LEN + TAG_LEN,
        (Pattern::XX, 0) => DH_LEN,
        // With a psk, `e` also runs MixKey (Noise §9.2): message 1's payload gets a tag.
        (Pattern::XXpsk3, 0) => DH_LEN + TAG_LEN,
        (Pattern::XX | Pattern::XXpsk3, 1) => DH_LEN + DH_LEN + TAG_LEN + TAG_LEN,
        (Pattern::XX | Pattern::XXpsk3, _) => DH_LEN + TAG_LEN + TAG_LEN,
        // IK/IKpsk2 message 1 and both KK messages: e and an encrypted payload.
        _ => DH_LEN + TAG_LEN,
    }
}

/// Writes the prologue (spec §5.2) into `out`, returning its length.
pub(crate) fn prologue(mode: Mode, init_header: &[u8], out: &mut [u8; PROLOGUE_MAX]) -> usize {
    out[..7].copy_from_slice(PROLOGUE_DOMAIN);
    out[7] = mode.code();
    let n = init_header.len().min(PROLOGUE_MAX - 8);
    out[8..8 + n].copy_from_slice(&init_header[..n]);
    8 + n
}

/// A handshake in progress.
pub struct Handshake {
    state: snow::HandshakeState,
    pattern: Pattern,
    suite: Suite,
    mode: Mode,
    role: Role,
    local_index: u32,
    remote_index: Option<u32>,
    /// Handshake messages processed so far (written or read).
    step: usize,
    init_header: [u8; 7],
    init_header_len: usize,
    peer_payload: Option<HandshakePayload>,
    /// The link to the endpoint's static-static DH cache, if it has one.
    #[cfg(feature = "std")]
    ss: Option<alloc::sync::Arc<crate::dh_cache::SsContext>>,
}

/// What [`Handshake::build`] makes.
struct Built {
    state: snow::HandshakeState,
    #[cfg(feature = "std")]
    ss: Option<alloc::sync::Arc<crate::dh_cache::SsContext>>,
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("pattern", &self.pattern)
            .field("suite", &self.suite)
            .field("mode", &self.mode)
            .field("role", &self.role)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

fn snow_error(e: snow::Error) -> HandshakeError {
    match e {
        snow::Error::Rng => HandshakeError::Rng,
        // Decrypt, DH and input-shape failures are indistinguishable on purpose (spec §10).
        _ => HandshakeError::Crypto,
    }
}

/// Inputs to build a handshake.
pub(crate) struct HandshakeParams<'a> {
    pub config: &'a Config,
    pub pattern: Pattern,
    pub suite: Suite,
    pub local_index: u32,
    /// The peer's static key when the pattern needs it in advance.
    pub remote_static: Option<&'a PublicKey>,
    pub psk: Option<&'a Psk>,
    pub fixed_ephemeral: Option<&'a [u8; 32]>,
}

impl Handshake {
    fn build(
        p: &HandshakeParams<'_>,
        role: Role,
        init_header: &[u8],
        rng: &mut dyn rand_core::CryptoRngCore,
    ) -> Result<Built, HandshakeError> {
        let params: snow::params::NoiseParams =
            noise_params(p.pattern, p.suite).parse().map_err(|_| HandshakeError::Config("noise parameters"))?;
        let mut pro = [0u8; PROLOGUE_MAX];
        let pro_len = prologue(p.config.mode, init_header, &mut pro);
        let secret = p.config.identity.secret_bytes();
        let resolver = Resolver::new(rng).with_identity(&p.config.identity);
        #[cfg(feature = "std")]
        let ss = p.config.static_dh_cache.as_ref().map(|cache| {
            alloc::sync::Arc::new(crate::dh_cache::SsContext::new(
                alloc::sync::Arc::clone(cache),
                p.config.identity.public(),
            ))
        });
        #[cfg(feature = "std")]
        let resolver = match &ss {
            Some(ss) => resolver.with_static_dh_cache(alloc::sync::Arc::clone(ss)),
            None => resolver,
        };
        let mut b = snow::Builder::with_resolver(params, resolver.boxed())
            .prologue(&pro[..pro_len])
            .map_err(snow_error)?
            .local_private_key(secret.as_ref())
            .map_err(snow_error)?;
        let needs_remote = match role {
            Role::Initiator => p.pattern.initiator_knows_responder(),
            Role::Responder => p.pattern.responder_knows_initiator(),
        };
        if needs_remote {
            let rs = p.remote_static.ok_or(HandshakeError::Config("pattern needs the peer's static key"))?;
            b = b.remote_public_key(rs.as_bytes()).map_err(snow_error)?;
        }
        if let Some(pos) = p.pattern.psk_position() {
            // IKpsk2 responders may pick the psk after reading message 1 (spec §5.4).
            let deferred = role == Role::Responder && p.pattern == Pattern::IKpsk2;
            match p.psk {
                Some(psk) => b = b.psk(pos, psk.as_bytes()).map_err(snow_error)?,
                None if deferred => {}
                None => return Err(HandshakeError::Config("pattern needs a pre-shared key")),
            }
        }
        #[cfg(feature = "dangerous-testing")]
        if let Some(e) = p.fixed_ephemeral {
            b = b.fixed_ephemeral_key_for_testing_only(e);
        }
        #[cfg(not(feature = "dangerous-testing"))]
        let _ = p.fixed_ephemeral;
        let state = match role {
            Role::Initiator => b.build_initiator(),
            Role::Responder => b.build_responder(),
        }
        .map_err(snow_error)?;
        Ok(Built {
            state,
            #[cfg(feature = "std")]
            ss,
        })
    }

    /// Starts an initiator. Nothing is sent until [`Handshake::write`].
    pub(crate) fn initiator(
        p: &HandshakeParams<'_>,
        rng: &mut dyn rand_core::CryptoRngCore,
    ) -> Result<Self, HandshakeError> {
        let header = InitHeader {
            version: PROTOCOL_VERSION,
            pattern: p.pattern,
            suite: p.suite,
            sender_index: p.config.mode.has_indices().then_some(p.local_index),
        };
        let mut init_header = [0u8; 7];
        let init_header_len = header.encode(p.config.mode, &mut init_header)?;
        let built = Self::build(p, Role::Initiator, &init_header[..init_header_len], rng)?;
        Ok(Self {
            state: built.state,
            #[cfg(feature = "std")]
            ss: built.ss,
            pattern: p.pattern,
            suite: p.suite,
            mode: p.config.mode,
            role: Role::Initiator,
            local_index: p.local_index,
            remote_index: None,
            step: 0,
            init_header,
            init_header_len,
            peer_payload: None,
        })
    }

    /// Starts a responder for a received `HANDSHAKE_INIT` whose header was parsed and
    /// whose pattern and suite the caller accepted. Call [`Handshake::read`] with the body next.
    pub(crate) fn responder(
        p: &HandshakeParams<'_>,
        header: &InitHeader,
        header_bytes: &[u8],
        rng: &mut dyn rand_core::CryptoRngCore,
    ) -> Result<Self, HandshakeError> {
        let mut init_header = [0u8; 7];
        let n = header_bytes.len().min(7);
        init_header[..n].copy_from_slice(&header_bytes[..n]);
        let built = Self::build(p, Role::Responder, header_bytes, rng)?;
        Ok(Self {
            state: built.state,
            #[cfg(feature = "std")]
            ss: built.ss,
            pattern: header.pattern,
            suite: header.suite,
            mode: p.config.mode,
            role: Role::Responder,
            local_index: p.local_index,
            remote_index: header.sender_index,
            step: 0,
            init_header,
            init_header_len: n,
            peer_payload: None,
        })
    }

    /// The pattern.
    #[must_use]
    pub const fn pattern(&self) -> Pattern {
        self.pattern
    }

    /// The suite.
    #[must_use]
    pub const fn suite(&self) -> Suite {
        self.suite
    }

    /// This side's role.
    #[must_use]
    pub const fn role(&self) -> Role {
        self.role
    }

    /// Messages processed so far.
    #[must_use]
    pub const fn step(&self) -> usize {
        self.step
    }

    /// This side's session index.
    #[must_use]
    pub const fn local_index(&self) -> u32 {
        self.local_index
    }

    /// Whether the next handshake message is ours to write.
    #[must_use]
    pub fn is_my_turn(&self) -> bool {
        !self.is_finished() && self.state.is_my_turn()
    }

    /// Whether all messages of the pattern were processed.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.state.is_handshake_finished()
    }

    /// The peer's static key, once the pattern revealed it.
    #[must_use]
    pub fn remote_static(&self) -> Option<PublicKey> {
        let rs = self.state.get_remote_static()?;
        let arr: [u8; 32] = rs.try_into().ok()?;
        Some(PublicKey(arr))
    }

    /// The payload the peer sent in its latest handshake message.
    #[must_use]
    pub const fn peer_payload(&self) -> Option<&HandshakePayload> {
        self.peer_payload.as_ref()
    }

    /// Sets the psk of an IKpsk2 responder after it learned the initiator (spec §5.4).
    pub(crate) fn set_psk(&mut self, psk: &Psk) -> Result<(), HandshakeError> {
        let pos = self.pattern.psk_position().ok_or(HandshakeError::Config("pattern takes no psk"))?;
        self.state.set_psk(usize::from(pos), psk.as_bytes()).map_err(snow_error)
    }

    /// Writes the next handshake packet (header and Noise message) into `out`.
    pub(crate) fn write(&mut self, payload: &HandshakePayload, out: &mut [u8]) -> Result<usize, HandshakeError> {
        if self.step == 0 && self.is_xx() && payload.certificate.is_some() {
            // spec §5.3, §5.4.1: XX message 1 is cleartext; a certificate there would be
            // shown to anyone on the path.
            return Err(HandshakeError::Config("no certificate in XX message 1"));
        }
        // spec §16.2: routed handshake packets have the datagram layouts.
        let indexed = self.mode.has_indices();
        let hlen = match (self.step, indexed) {
            (0, _) => {
                let h = &self.init_header[..self.init_header_len];
                out.get_mut(..h.len()).ok_or(HandshakeError::BufferTooSmall)?.copy_from_slice(h);
                h.len()
            }
            (1, false) => {
                *out.first_mut().ok_or(HandshakeError::BufferTooSmall)? = TYPE_HANDSHAKE_RESP;
                1
            }
            (1, true) => {
                let o = out.get_mut(..9).ok_or(HandshakeError::BufferTooSmall)?;
                o[0] = TYPE_HANDSHAKE_RESP;
                o[1..5].copy_from_slice(&self.remote_index.unwrap_or(0).to_be_bytes());
                o[5..9].copy_from_slice(&self.local_index.to_be_bytes());
                9
            }
            (_, false) => {
                *out.first_mut().ok_or(HandshakeError::BufferTooSmall)? = TYPE_HANDSHAKE_FINAL;
                1
            }
            (_, true) => {
                let o = out.get_mut(..5).ok_or(HandshakeError::BufferTooSmall)?;
                o[0] = TYPE_HANDSHAKE_FINAL;
                o[1..5].copy_from_slice(&self.remote_index.unwrap_or(0).to_be_bytes());
                5
            }
        };
        let mut plain = [0u8; HANDSHAKE_PAYLOAD_MAX];
        let plen = payload.encode(&mut plain)?;
        let n = self.state.write_message(&plain[..plen], &mut out[hlen..]).map_err(|e| match e {
            snow::Error::Input => HandshakeError::BufferTooSmall,
            e => snow_error(e),
        })?;
        self.step += 1;
        Ok(hlen + n)
    }

    /// Reads the body of the peer's next handshake message and decodes its payload.
    /// On error the handshake state is as before (snow restores its symmetric state).
    pub(crate) fn read(&mut self, body: &[u8], sender_index: Option<u32>) -> Result<&HandshakePayload, HandshakeError> {
        if body.len() < min_body_len(self.pattern, self.step) {
            return Err(HandshakeError::Decode(DecodeError::Truncated));
        }
        if body.len() > HANDSHAKE_BODY_MAX {
            return Err(HandshakeError::PayloadTooLarge);
        }
        let mut plain = [0u8; HANDSHAKE_BODY_MAX];
        let n = self.state.read_message(body, &mut plain).map_err(snow_error)?;
        let decoded = HandshakePayload::decode(&plain[..n]);
        plain.zeroize();
        let payload = decoded?;
        if self.step == 0 && self.is_xx() && payload.certificate.is_some() {
            // spec §5.3: XX message 1 travels in cleartext and must not carry a certificate.
            return Err(HandshakeError::Decode(DecodeError::MalformedPayload));
        }
        if self.role == Role::Initiator && self.step == 1 {
            if let Some(i) = sender_index {
                self.remote_index = Some(i);
            }
        }
        self.step += 1;
        Ok(self.peer_payload.insert(payload))
    }

    fn is_xx(&self) -> bool {
        matches!(self.pattern, Pattern::XX | Pattern::XXpsk3)
    }

    /// The handshake hash, for channel binding (spec §5.5).
    #[must_use]
    pub fn handshake_hash(&self) -> [u8; HANDSHAKE_HASH_LEN] {
        let mut h = [0u8; HANDSHAKE_HASH_LEN];
        let src = self.state.get_handshake_hash();
        let n = src.len().min(HANDSHAKE_HASH_LEN);
        h[..n].copy_from_slice(&src[..n]);
        h
    }

    /// Finishes the handshake: Noise `Split()` into the transport session (spec §6.1).
    pub(crate) fn into_session(
        mut self,
        now: Timestamp,
        limits: Limits,
        generation: bool,
    ) -> Result<(Session, [u8; HANDSHAKE_HASH_LEN]), HandshakeError> {
        if !self.is_finished() {
            return Err(HandshakeError::UnexpectedPacket);
        }
        let hash = self.handshake_hash();
        // The peer proved its static key and was authorized (spec §5.5): `DH(s, rs)`, if this
        // handshake computed it, may serve the next handshakes with this peer.
        #[cfg(feature = "std")]
        if let Some(ss) = &self.ss {
            ss.commit(self.remote_static().as_ref());
        }
        let (mut a, mut b) = self.state.dangerously_get_raw_split();
        let (k1, k2) = (CipherKey(a), CipherKey(b));
        a.zeroize();
        b.zeroize();
        let peer_max = self.peer_payload.as_ref().map_or(crate::wire::MAX_PACKET_LEN, HandshakePayload::packet_limit);
        let session = Session::new(
            SessionParams {
                suite: self.suite,
                mode: self.mode,
                role: self.role,
                generation,
                local_index: self.local_index,
                remote_index: self.remote_index.unwrap_or(0),
                peer_max_packet_len: peer_max,
                local_max_packet_len: limits.packet_len(),
            },
            k1,
            k2,
            now,
            limits,
        );
        Ok((session, hash))
    }

    /// The INIT header bytes this handshake was built with.
    #[must_use]
    pub fn init_header(&self) -> &[u8] {
        &self.init_header[..self.init_header_len]
    }
}
