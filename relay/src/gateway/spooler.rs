//! The gateway's side of custody (spec §17.9): the spool ([`crate::spool`]) runs on a thread
//! of its own, so that its disk writes never block the async runtime, and the forwarding task
//! talks to it by messages.
//!
//! - **Appends in batches.** `Verdict::Spool` packets wait in [`Spooler::pending`]; at most one
//!   append is in flight, and everything that arrived meanwhile goes in the next one: one
//!   durable commit (one `fsync`) per batch, never one per packet under load. Only when the
//!   commit returned is a packet acknowledged (`Relay::stored` → `Stored`).
//! - **Replays** oldest first, a batch at a time, while the uplink is up; entries the uplink
//!   took are removed in one commit before the next batch is read.
//! - **Expires** entries older than the ttl on a timer, and **drops** a revoked device's.
//!
//! Every answer names the sources it touched that hold nothing in the spool any more, so that
//! the forwarding task can end their queueing (`Relay::set_spooling`) once none of their
//! packets waits for an append either.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::mpsc;
use veil_protocol::relay::LinkId;
use veil_protocol::trust::NodeId;

use crate::spool::{Appended, Entry, Spool, SpoolConfig, SpoolError, SpoolStats};

/// Packets waiting for the next append; beyond it they are refused (`"queue"`).
pub(super) const MAX_PENDING: usize = 8_192;
/// Entries read per replay batch.
pub(super) const REPLAY_BATCH: usize = 256;
/// Retry delay when the uplink's queue is full or its table has no room.
pub(super) const REPLAY_RETRY: Duration = Duration::from_millis(50);
/// Delay before looking again when the spool holds nothing for the cloud (only packets for
/// another cloud, waiting for their ttl), or after a read or remove failed.
pub(super) const REPLAY_IDLE: Duration = Duration::from_secs(1);

/// A packet of a `Verdict::Spool`, with what its `Stored` (or refusal) needs.
#[derive(Debug)]
pub(super) struct Pending {
    pub link: LinkId,
    pub route: u32,
    pub generation: u8,
    pub counter_lo: u32,
    pub source: NodeId,
    pub destination: NodeId,
    pub packet: Bytes,
}

enum Cmd {
    Append(Vec<Pending>),
    Peek { destination: NodeId },
    Remove { seqs: Vec<u64>, sources: Vec<NodeId> },
    Expire,
    DropSource(NodeId),
}

/// What the spool thread answers.
pub(super) enum Done {
    /// An append committed (`Ok`, one outcome per packet, in order) or failed (nothing stored).
    Appended { batch: Vec<Pending>, outcomes: Result<Vec<Appended>, SpoolError> },
    /// The oldest entries for the destination.
    Peeked(Result<Vec<Entry>, SpoolError>),
    /// Replayed entries removed.
    Removed(Result<(), SpoolError>),
    /// Entries expired.
    Expired(Result<u64, SpoolError>),
    /// A revoked device's entries dropped.
    Dropped(Result<u64, SpoolError>),
}

/// An answer, with the spool's state after it.
pub(super) struct Answer {
    pub done: Done,
    pub stats: SpoolStats,
    /// Sources the command touched that have no entry left.
    pub emptied: Vec<NodeId>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Opens the spool (on a blocking thread) and starts its thread. Returns the handle, the
/// answers' receiver, and the sources with entries waiting (from before a restart).
pub(super) async fn start(config: SpoolConfig) -> Result<(Spooler, mpsc::Receiver<Answer>, Vec<NodeId>), SpoolError> {
    let ttl = config.ttl;
    let spool = tokio::task::spawn_blocking(move || Spool::open(config))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    let sources = spool.sources();
    let stats = spool.stats();
    let (cmd_tx, cmd_rx) = std_mpsc::channel::<Cmd>();
    let (ans_tx, ans_rx) = mpsc::channel(64);
    std::thread::Builder::new()
        .name("veil-spool".into())
        .spawn(move || worker(spool, &cmd_rx, &ans_tx))
        .map_err(|e| SpoolError::Storage(Box::new(redb::Error::Io(e))))?;
    let s = Spooler {
        cmds: cmd_tx,
        pending: Vec::new(),
        outstanding: HashMap::new(),
        appending: false,
        replaying: false,
        expiring: false,
        stats,
        expire_every: (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(60)),
    };
    Ok((s, ans_rx, sources))
}

/// The thread: one command at a time, in order; ends when the forwarding task drops its
/// handle.
fn worker(mut spool: Spool, cmds: &std_mpsc::Receiver<Cmd>, answers: &mpsc::Sender<Answer>) {
    while let Ok(cmd) = cmds.recv() {
        let mut touched: Vec<NodeId> = Vec::new();
        let done = match cmd {
            Cmd::Append(batch) => {
                let items: Vec<(NodeId, NodeId, &[u8])> =
                    batch.iter().map(|p| (p.source, p.destination, p.packet.as_ref())).collect();
                let outcomes = spool.append(&items, now_ms());
                drop(items);
                touched.extend(batch.iter().map(|p| p.source));
                Done::Appended { batch, outcomes }
            }
            Cmd::Peek { destination } => Done::Peeked(spool.peek(&destination, REPLAY_BATCH)),
            Cmd::Remove { seqs, sources } => {
                touched = sources;
                Done::Removed(spool.remove(&seqs))
            }
            Cmd::Expire => {
                let r = spool.expire(now_ms());
                if let Ok(per_source) = &r {
                    touched.extend(per_source.keys().copied());
                }
                Done::Expired(r.map(|m| m.values().sum()))
            }
            Cmd::DropSource(source) => {
                touched.push(source);
                Done::Dropped(spool.drop_source(&source))
            }
        };
        touched.sort_unstable();
        touched.dedup();
        touched.retain(|s| !spool.has_entries_from(s));
        let answer = Answer { done, stats: spool.stats(), emptied: touched };
        if answers.blocking_send(answer).is_err() {
            return;
        }
    }
}

/// The forwarding task's handle on the spool thread, and the state of what is in flight.
pub(super) struct Spooler {
    cmds: std_mpsc::Sender<Cmd>,
    /// Packets for the next append, in arrival order.
    pub pending: Vec<Pending>,
    /// Per source: packets pending or in flight in an append.
    pub outstanding: HashMap<NodeId, usize>,
    /// An append is in flight.
    pub appending: bool,
    /// A replay batch (peek, then remove) is in flight.
    pub replaying: bool,
    /// An expiry is in flight.
    pub expiring: bool,
    /// The spool's state as of the last answer.
    pub stats: SpoolStats,
    /// How often expiry runs.
    pub expire_every: Duration,
}

impl Spooler {
    /// Queues a packet for the next append; gives it back if too many are waiting.
    pub fn push(&mut self, p: Pending) -> Result<(), Pending> {
        if self.pending.len() >= MAX_PENDING {
            return Err(p);
        }
        *self.outstanding.entry(p.source).or_default() += 1;
        self.pending.push(p);
        Ok(())
    }

    /// Starts the next append if none is in flight and packets wait.
    pub fn maybe_append(&mut self) {
        if !self.appending && !self.pending.is_empty() {
            let batch = std::mem::take(&mut self.pending);
            self.appending = self.send(Cmd::Append(batch));
        }
    }

    /// The packets of an answered append no longer wait.
    pub fn appended(&mut self, batch: &[Pending]) {
        self.appending = false;
        for p in batch {
            if let Some(n) = self.outstanding.get_mut(&p.source) {
                *n -= 1;
                if *n == 0 {
                    self.outstanding.remove(&p.source);
                }
            }
        }
    }

    /// Whether `source` has packets waiting for an append.
    pub fn is_outstanding(&self, source: &NodeId) -> bool {
        self.outstanding.contains_key(source)
    }

    /// Reads the next replay batch for `destination`.
    pub fn peek(&mut self, destination: NodeId) {
        self.replaying = self.send(Cmd::Peek { destination });
    }

    /// Removes replayed (or dropped) entries.
    pub fn remove(&mut self, seqs: Vec<u64>, sources: Vec<NodeId>) {
        self.replaying = self.send(Cmd::Remove { seqs, sources });
    }

    /// Expires old entries.
    pub fn expire(&mut self) {
        if !self.expiring {
            self.expiring = self.send(Cmd::Expire);
        }
    }

    /// Drops a revoked device's entries, and its packets not yet appended; how many of the
    /// latter.
    pub fn drop_source(&mut self, source: NodeId) -> usize {
        let before = self.pending.len();
        self.pending.retain(|p| p.source != source);
        let removed = before - self.pending.len();
        if removed > 0 {
            if let Some(n) = self.outstanding.get_mut(&source) {
                *n = n.saturating_sub(removed);
                if *n == 0 {
                    self.outstanding.remove(&source);
                }
            }
        }
        let _ = self.send(Cmd::DropSource(source));
        removed
    }

    fn send(&self, cmd: Cmd) -> bool {
        // The thread ends only when this handle goes, or if it panicked: then nothing is in
        // flight (and nothing will answer).
        self.cmds.send(cmd).is_ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const DEVICE: NodeId = NodeId([1; 16]);
    const OTHER: NodeId = NodeId([2; 16]);
    const CLOUD: NodeId = NodeId([9; 16]);

    fn pending(source: NodeId, counter_lo: u32) -> Pending {
        let packet = Bytes::from(vec![0x10, 0, 0, counter_lo as u8, 0xee, 0xee]);
        Pending { link: 1, route: 0, generation: 0, counter_lo, source, destination: CLOUD, packet }
    }

    async fn next(rx: &mut mpsc::Receiver<Answer>) -> Answer {
        tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn appends_batch_replay_reads_oldest_first_and_emptied_sources_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig::new(dir.path().join("spool.redb")).max_bytes_per_source(3 * 47);
        let (mut sp, mut rx, sources) = start(config.clone()).await.unwrap();
        assert!(sources.is_empty());
        for c in 0..2 {
            sp.push(pending(DEVICE, c)).unwrap();
        }
        sp.maybe_append();
        assert!(sp.appending && sp.is_outstanding(&DEVICE));
        // While one append is in flight the next packets wait for the next batch.
        for c in 2..4 {
            sp.push(pending(DEVICE, c)).unwrap();
        }
        sp.push(pending(OTHER, 0)).unwrap();
        sp.maybe_append();
        assert_eq!(sp.pending.len(), 3);
        let a = next(&mut rx).await;
        let Done::Appended { batch, outcomes } = a.done else { panic!("not an append") };
        assert_eq!(batch.len(), 2);
        assert!(outcomes.unwrap().iter().all(|o| matches!(o, Appended::Stored { .. })));
        sp.appended(&batch);
        assert!(!sp.appending && sp.is_outstanding(&DEVICE), "two still wait");
        sp.maybe_append();
        let a = next(&mut rx).await;
        let Done::Appended { batch, outcomes } = a.done else { panic!("not an append") };
        // The device's share (3 entries of 6 B + 41 B) refuses its fourth packet.
        let outcomes = outcomes.unwrap();
        assert!(matches!(outcomes[0], Appended::Stored { .. }));
        assert_eq!(outcomes[1], Appended::Full(crate::spool::FullReason::Source));
        assert!(matches!(outcomes[2], Appended::Stored { .. }));
        sp.appended(&batch);
        assert!(!sp.is_outstanding(&DEVICE) && sp.outstanding.is_empty());
        assert_eq!(a.stats.entries, 4);

        sp.peek(CLOUD);
        let Done::Peeked(entries) = next(&mut rx).await.done else { panic!("not a peek") };
        let entries = entries.unwrap();
        let order: Vec<(NodeId, u8)> = entries.iter().map(|e| (e.source, e.packet[3])).collect();
        assert_eq!(order, [(DEVICE, 0), (DEVICE, 1), (DEVICE, 2), (OTHER, 0)]);
        // Removing the device's entries names it as emptied; the other source is untouched.
        let seqs = entries.iter().filter(|e| e.source == DEVICE).map(|e| e.seq).collect();
        sp.remove(seqs, vec![DEVICE]);
        let a = next(&mut rx).await;
        assert!(matches!(a.done, Done::Removed(Ok(()))));
        assert_eq!((a.emptied, a.stats.entries), (vec![DEVICE], 1));

        // A revoked source: its packets waiting for an append go, and so do its entries.
        sp.push(pending(OTHER, 1)).unwrap();
        assert_eq!(sp.drop_source(OTHER), 1);
        assert!(sp.pending.is_empty() && !sp.is_outstanding(&OTHER));
        let a = next(&mut rx).await;
        assert!(matches!(a.done, Done::Dropped(Ok(1))));
        assert_eq!((a.emptied, a.stats.entries), (vec![OTHER], 0));
        drop(sp);
        // The thread ends with the handle; a reopened spool is empty.
        assert!(tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().is_none());
        let (_sp, _rx, sources) = start(config).await.unwrap();
        assert!(sources.is_empty());
    }

    #[tokio::test]
    async fn pending_packets_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sp, _rx, _) = start(SpoolConfig::new(dir.path().join("spool.redb"))).await.unwrap();
        for c in 0..MAX_PENDING {
            sp.push(pending(DEVICE, c as u32)).unwrap();
        }
        assert!(sp.push(pending(DEVICE, 0)).is_err());
        assert_eq!(sp.outstanding[&DEVICE], MAX_PENDING);
    }
}
