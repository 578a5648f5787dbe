//! The transport session (spec §6–§8): per-direction counters and epoch keys, sealing
//! and opening in place, truncated-counter reconstruction, the replay window, symmetric
//! rekeying and its overlap window.
//!
//! Every receive-side failure leaves the session exactly as it was (spec §10): keys are
//! derived tentatively, the replay window and counters move only after a packet has
//! authenticated.

use alloc::boxed::Box;

use crate::config::Limits;
use crate::crypto::{CipherKey, TransportKey};
use crate::error::{DecodeError, SessionError};
use crate::params::{Mode, Suite};
use crate::replay::ReplayWindow;
use crate::time::Timestamp;
use crate::wire::{self, Packet, TransportHeader, TAG_LEN};

/// spec §6.1: a counter's epoch is `counter >> EPOCH_BITS`, so each key protects at
/// most 2^20 messages (`REKEY_AFTER_MESSAGES`).
pub const EPOCH_BITS: u32 = 20;
/// spec §7.1: messages per epoch key.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << EPOCH_BITS;
/// spec §7.4: no direction ever uses a counter at or above this.
pub const REJECT_AFTER_MESSAGES: u64 = 1 << 60;
/// spec §6.3: bits of the counter carried in datagram mode.
pub const COUNTER_LO_BITS: u32 = 24;
/// spec §6.3: a receiver ratchets at most this many epochs ahead for one packet.
pub const MAX_EPOCH_JUMP: u64 = 8;

const COUNTER_LO_MASK: u64 = (1 << COUNTER_LO_BITS) - 1;
const HALF_COUNTER_SPACE: u64 = 1 << (COUNTER_LO_BITS - 1);

/// spec §6.3: the unique counter congruent to `lo` modulo 2^24 within
/// `[expected - 2^23, expected + 2^23)`, clamped to the valid range.
#[must_use]
pub fn reconstruct_counter(lo: u32, expected: u64) -> u64 {
    let lo = u64::from(lo) & COUNTER_LO_MASK;
    let base = expected & !COUNTER_LO_MASK;
    let candidate = base | lo;
    // Choose among candidate - 2^24, candidate, candidate + 2^24 the one in the window.
    if candidate.saturating_add(HALF_COUNTER_SPACE) < expected {
        candidate.saturating_add(1 << COUNTER_LO_BITS)
    } else if candidate >= expected.saturating_add(HALF_COUNTER_SPACE) && candidate >= (1 << COUNTER_LO_BITS) {
        candidate - (1 << COUNTER_LO_BITS)
    } else {
        candidate
    }
}

const fn epoch_of(counter: u64) -> u64 {
    counter >> EPOCH_BITS
}

/// An epoch's key: raw, expanded only while in use (see [`TransportKey`]).
#[derive(Debug)]
struct EpochKey {
    epoch: u64,
    key: TransportKey,
}

impl EpochKey {
    fn ratchet(&self, suite: Suite) -> Self {
        Self { epoch: self.epoch + 1, key: self.key.rekey(suite) }
    }
}

#[derive(Debug)]
struct PreviousEpoch {
    key: EpochKey,
    until: Timestamp,
    /// spec §8: every epoch has its own window, so packets of the old epoch still in
    /// flight are accepted exactly once even after a time-based counter jump.
    window: Box<ReplayWindow>,
}

#[derive(Debug)]
struct SendHalf {
    /// Next counter to use.
    counter: u64,
    key: EpochKey,
    key_since: Timestamp,
}

#[derive(Debug)]
struct RecvHalf {
    key: EpochKey,
    /// spec §7.2: the previous epoch's key, its replay window and when it stops being
    /// accepted (datagram only). Boxed: it exists only for a short overlap after a rekey.
    previous: Option<Box<PreviousEpoch>>,
    /// Stream mode: the next expected counter.
    expected: u64,
    /// Datagram mode: the replay window (spec §8). Boxed: absent in stream mode.
    window: Option<Box<ReplayWindow>>,
}

/// Which side of the handshake a session came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Sent the first handshake message.
    Initiator,
    /// Answered it.
    Responder,
}

/// Counters a session reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Packets sealed.
    pub packets_sent: u64,
    /// Packets opened.
    pub packets_received: u64,
    /// Epoch changes of the sending key.
    pub send_rekeys: u64,
    /// Epoch changes of the receiving key.
    pub recv_rekeys: u64,
}

/// Parameters for [`Session::new`].
#[derive(Debug)]
pub(crate) struct SessionParams {
    pub suite: Suite,
    pub mode: Mode,
    pub role: Role,
    pub generation: bool,
    pub local_index: u32,
    pub remote_index: u32,
    pub peer_max_packet_len: usize,
    pub local_max_packet_len: usize,
}

/// An established transport session (spec §6).
#[derive(Debug)]
pub struct Session {
    suite: Suite,
    mode: Mode,
    role: Role,
    generation: bool,
    local_index: u32,
    remote_index: u32,
    peer_max_packet_len: usize,
    local_max_packet_len: usize,
    established: Timestamp,
    send: SendHalf,
    recv: RecvHalf,
    stats: SessionStats,
    /// The three [`Limits`] a session uses, not all of them: the struct is part of every
    /// idle connection (spec §13).
    limits: SessionLimits,
}

/// The parts of [`Limits`] a session reads.
#[derive(Debug, Clone, Copy)]
struct SessionLimits {
    rekey_after_time: crate::time::Duration,
    reject_after_time: crate::time::Duration,
    key_overlap: crate::time::Duration,
}

impl Session {
    /// Builds a session from the raw Noise split keys (spec §6.1). `k1` encrypts
    /// initiator→responder, `k2` responder→initiator.
    pub(crate) fn new(p: SessionParams, k1: CipherKey, k2: CipherKey, now: Timestamp, limits: Limits) -> Self {
        let (send_key, recv_key) = match p.role {
            Role::Initiator => (k1, k2),
            Role::Responder => (k2, k1),
        };
        Self {
            suite: p.suite,
            mode: p.mode,
            role: p.role,
            generation: p.generation,
            local_index: p.local_index,
            remote_index: p.remote_index,
            peer_max_packet_len: p.peer_max_packet_len,
            local_max_packet_len: p.local_max_packet_len,
            established: now,
            send: SendHalf { counter: 0, key: EpochKey { epoch: 0, key: TransportKey::new(send_key) }, key_since: now },
            recv: RecvHalf {
                key: EpochKey { epoch: 0, key: TransportKey::new(recv_key) },
                previous: None,
                expected: 0,
                window: p.mode.is_lossy().then(|| Box::new(ReplayWindow::new())),
            },
            stats: SessionStats::default(),
            limits: SessionLimits {
                rekey_after_time: limits.rekey_after_time,
                reject_after_time: limits.reject_after_time,
                key_overlap: limits.key_overlap,
            },
        }
    }

    /// The carrier mode.
    #[must_use]
    pub const fn mode(&self) -> Mode {
        self.mode
    }

    /// The suite.
    #[must_use]
    pub const fn suite(&self) -> Suite {
        self.suite
    }

    /// Which side of the handshake this session came from.
    #[must_use]
    pub const fn role(&self) -> Role {
        self.role
    }

    /// Generation parity (spec §6.2).
    #[must_use]
    pub const fn generation(&self) -> bool {
        self.generation
    }

    /// The index peers address this session by (datagram mode).
    #[must_use]
    pub const fn local_index(&self) -> u32 {
        self.local_index
    }

    /// When the session was established.
    #[must_use]
    pub const fn established_at(&self) -> Timestamp {
        self.established
    }

    /// Counters.
    #[must_use]
    pub const fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Bytes in front of the plaintext in a sealed packet.
    #[must_use]
    pub const fn header_len(&self) -> usize {
        wire::transport_header_len(self.mode)
    }

    /// The largest plaintext one packet can carry to this peer.
    #[must_use]
    pub fn max_plaintext_len(&self) -> usize {
        self.peer_max_packet_len.saturating_sub(wire::transport_overhead(self.mode))
    }

    /// Whether the session is past `REJECT_AFTER_TIME` (spec §7.4).
    #[must_use]
    pub fn is_expired(&self, now: Timestamp) -> bool {
        now.saturating_since(self.established) >= self.limits.reject_after_time
    }

    /// The earliest time at which [`Session::handle_timeout`] has work.
    #[must_use]
    pub fn next_timeout(&self) -> Option<Timestamp> {
        self.recv.previous.as_ref().map(|p| p.until)
    }

    /// Drops cipher state expanded from the keys (AES-GCM key schedules) and replay bitmaps
    /// that a run of counters describes as well ([`ReplayWindow::compact`]), for a connection
    /// that has gone idle; the next packet expands what it needs again. Changes nothing but
    /// memory.
    pub fn release_idle_memory(&mut self) {
        self.send.key.key.release();
        self.recv.key.key.release();
        if let Some(w) = self.recv.window.as_deref_mut() {
            w.compact();
        }
        if let Some(p) = &mut self.recv.previous {
            p.key.key.release();
            p.window.compact();
        }
    }

    /// Drops the previous epoch key once its overlap has passed (spec §7.2).
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if matches!(&self.recv.previous, Some(p) if now >= p.until) {
            self.recv.previous = None;
        }
    }

    /// Seals the plaintext held at `buf[header_len..header_len + plaintext_len]`: writes
    /// the header in front and the tag behind, and returns the packet length.
    ///
    /// # Errors
    /// [`SessionError::BufferTooSmall`], [`SessionError::TooLarge`] (above the peer's
    /// packet limit), [`SessionError::Expired`], [`SessionError::CounterExhausted`]. On
    /// error nothing changed.
    pub fn seal(&mut self, now: Timestamp, buf: &mut [u8], plaintext_len: usize) -> Result<usize, SessionError> {
        let hlen = self.header_len();
        let total = hlen + plaintext_len + TAG_LEN;
        if total > self.peer_max_packet_len {
            return Err(SessionError::TooLarge);
        }
        if buf.len() < total {
            return Err(SessionError::BufferTooSmall);
        }
        if self.is_expired(now) {
            return Err(SessionError::Expired);
        }
        let mut counter = self.send.counter;
        let mut epoch_advance = false;
        // spec §7.1: a key older than REKEY_AFTER_TIME is retired by jumping to the next epoch.
        if epoch_of(counter) == self.send.key.epoch
            && now.saturating_since(self.send.key_since) >= self.limits.rekey_after_time
        {
            counter = (epoch_of(counter) + 1) << EPOCH_BITS;
            epoch_advance = true;
        }
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(SessionError::CounterExhausted);
        }
        while self.send.key.epoch < epoch_of(counter) {
            self.send.key = self.send.key.ratchet(self.suite);
            self.send.key_since = now;
            self.stats.send_rekeys += 1;
        }
        let header = TransportHeader {
            generation: self.generation,
            epoch_advance: epoch_advance && matches!(self.mode, Mode::Stream),
            receiver_index: Some(self.remote_index),
            counter_lo: Some((counter & COUNTER_LO_MASK) as u32),
        };
        header.encode(self.mode, buf)?;
        let (head, rest) = buf.split_at_mut(hlen);
        let (body, tail) = rest.split_at_mut(plaintext_len);
        let tag = self.send.key.key.seal(self.suite, counter, head, body);
        tail[..TAG_LEN].copy_from_slice(&tag);
        self.send.counter = counter + 1;
        self.stats.packets_sent += 1;
        Ok(total)
    }

    /// Opens a transport packet in place. On success returns the plaintext's range within
    /// `packet`.
    ///
    /// # Errors
    /// A [`SessionError`]; the session is then unchanged (spec §10).
    pub fn open(&mut self, now: Timestamp, packet: &mut [u8]) -> Result<core::ops::Range<usize>, SessionError> {
        let header = match wire::parse(self.mode, self.local_max_packet_len, packet)? {
            Packet::Transport(h, _) => h,
            _ => return Err(SessionError::Decode(DecodeError::UnknownPacketType(packet[0]))),
        };
        self.open_parsed(now, header, packet)
    }

    pub(crate) fn open_parsed(
        &mut self,
        now: Timestamp,
        header: TransportHeader,
        packet: &mut [u8],
    ) -> Result<core::ops::Range<usize>, SessionError> {
        if self.is_expired(now) {
            return Err(SessionError::Expired);
        }
        let hlen = self.header_len();
        let counter = match self.mode {
            Mode::Stream => {
                if header.generation != self.generation {
                    return Err(SessionError::WrongSession);
                }
                if header.epoch_advance {
                    (epoch_of(self.recv.expected) + 1) << EPOCH_BITS
                } else {
                    self.recv.expected
                }
            }
            Mode::Datagram | Mode::Routed => {
                // spec §16.2: a routed packet has no index; its route picked this session.
                let index_ok = self.mode == Mode::Routed || header.receiver_index == Some(self.local_index);
                if !index_ok || header.generation != self.generation {
                    return Err(SessionError::WrongSession);
                }
                let window = self.recv.window.as_deref().ok_or(SessionError::WrongSession)?;
                let c = reconstruct_counter(header.counter_lo.unwrap_or(0), window.expected());
                // spec §8: a packet is checked against its own epoch's window.
                match &self.recv.previous {
                    Some(p) if epoch_of(c) == p.key.epoch => p.window.check(c)?,
                    _ => window.check(c)?,
                }
                c
            }
        };
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(SessionError::CounterExhausted);
        }
        let epoch = epoch_of(counter);
        let current = self.recv.key.epoch;
        let (head, body) = packet.split_at_mut(hlen);
        let plain = 0..body.len() - TAG_LEN;
        if epoch == current {
            self.recv.key.key.open(self.suite, counter, head, body).map_err(|_| SessionError::Authentication)?;
        } else if epoch < current {
            match &mut self.recv.previous {
                Some(prev) if prev.key.epoch == epoch && now < prev.until => {
                    prev.key.key.open(self.suite, counter, head, body).map_err(|_| SessionError::Authentication)?;
                    // Invariant: checked against this window before decrypting.
                    let _ = prev.window.commit(counter);
                    self.stats.packets_received += 1;
                    return Ok(hlen + plain.start..hlen + plain.end);
                }
                _ => return Err(SessionError::Replay(crate::replay::ReplayError::TooOld)),
            }
        } else {
            let jump = epoch - current;
            if jump > MAX_EPOCH_JUMP {
                return Err(SessionError::EpochJumpTooLarge);
            }
            // spec §7.1: derive tentatively; commit only once the packet authenticated.
            let mut before = None;
            let mut key = self.recv.key.ratchet(self.suite);
            for _ in 1..jump {
                let next = key.ratchet(self.suite);
                before = Some(core::mem::replace(&mut key, next));
            }
            key.key.open(self.suite, counter, head, body).map_err(|_| SessionError::Authentication)?;
            let old = core::mem::replace(&mut self.recv.key, key);
            let prev = before.unwrap_or(old);
            self.recv.previous = match self.mode {
                Mode::Datagram | Mode::Routed => {
                    // The old window goes with the old key when the epochs are adjacent;
                    // an epoch that was skipped entirely starts with an empty one.
                    let fresh = Box::new(ReplayWindow::new());
                    let old_window = self.recv.window.replace(fresh).unwrap_or_default();
                    let window = if jump == 1 { old_window } else { Box::new(ReplayWindow::new()) };
                    Some(Box::new(PreviousEpoch { key: prev, until: now + self.limits.key_overlap, window }))
                }
                Mode::Stream => None,
            };
            self.stats.recv_rekeys += jump;
        }
        match self.mode {
            Mode::Stream => self.recv.expected = counter + 1,
            Mode::Datagram | Mode::Routed => {
                if let Some(w) = self.recv.window.as_deref_mut() {
                    // Invariant: check() passed above (or the window is new for this
                    // epoch) and nothing else touched it.
                    let _ = w.commit(counter);
                }
            }
        }
        self.stats.packets_received += 1;
        Ok(hlen + plain.start..hlen + plain.end)
    }

    /// The send counter (next to use), for tests and diagnostics.
    #[must_use]
    pub const fn send_counter(&self) -> u64 {
        self.send.counter
    }

    /// Skips the send counter forward, for testing counter exhaustion and epoch jumps.
    ///
    /// A jump of more than [`MAX_EPOCH_JUMP`] epochs, which no receiver follows anyway, only
    /// relabels the current key instead of ratcheting once per epoch (up to 2^40 times near
    /// `REJECT_AFTER_MESSAGES`): packets sealed after it never authenticate.
    #[cfg(any(test, feature = "dangerous-testing"))]
    pub fn set_send_counter_for_testing_only(&mut self, counter: u64) {
        if epoch_of(counter) > self.send.key.epoch + MAX_EPOCH_JUMP {
            self.send.key.epoch = epoch_of(counter);
        }
        while self.send.key.epoch < epoch_of(counter) {
            self.send.key = self.send.key.ratchet(self.suite);
        }
        self.send.counter = counter;
    }
}
