//! The gateway's spool (spec §17.9): durable storage, in a `redb` database, for the routed
//! packets a gateway cannot pass on while its uplink is down.
//!
//! The gateway cannot read what it stores: each entry is a sealed end-to-end packet, with the
//! node ids of its source (the device whose link it came in on) and destination (the cloud),
//! and the time it was stored. Entries are kept in one table keyed by a sequence number, so
//! that replay is oldest first, and are removed once the uplink has taken them.
//!
//! Every write is one `redb` transaction committed with immediate durability: when
//! [`Spool::append`] returns, its entries survive a crash of the process (`kill -9`) or of the
//! machine, and only then may the gateway acknowledge them to the device (`Stored`). A batch
//! of packets shares one commit (one `fsync`), which is what makes a spool keep up with many
//! devices.
//!
//! Bounds: at most [`SpoolConfig::max_bytes`] in all and [`SpoolConfig::max_bytes_per_source`]
//! per device, counting each entry's packet plus [`ENTRY_OVERHEAD`]. A packet that does not
//! fit is refused ([`Appended::Full`]): the gateway answers `Unreachable { SpoolFull }` and
//! the device's window applies backpressure. Nothing is dropped silently; only
//! [`Spool::expire`] (entries older than [`SpoolConfig::ttl`]) and [`Spool::drop_source`] (a
//! revoked device) remove entries that were not replayed, and both say how many.
//!
//! ```
//! use std::time::Duration;
//! use veil_protocol::trust::NodeId;
//! use veil_relay::spool::{Appended, Spool, SpoolConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let config = SpoolConfig::new(dir.path().join("spool.redb"));
//! let (device, cloud) = (NodeId([1; 16]), NodeId([2; 16]));
//! let mut spool = Spool::open(config.clone())?;
//! let outcomes = spool.append(&[(device, cloud, &b"sealed packet"[..])], 1_000)?;
//! assert!(matches!(outcomes[0], Appended::Stored { .. }));
//! drop(spool);
//!
//! // After a restart the entry is still there, oldest first.
//! let mut spool = Spool::open(config)?;
//! let entries = spool.peek(&cloud, 16)?;
//! assert_eq!(entries[0].packet, &b"sealed packet"[..]);
//! spool.remove(&[entries[0].seq])?;
//! assert_eq!(spool.stats().entries, 0);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use veil_protocol::trust::NodeId;

/// The table: sequence number → entry.
const ENTRIES: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("veil_spool_entries_v1");
/// Layout version of an entry (its first byte).
const ENTRY_VERSION: u8 = 1;
/// Bytes an entry takes besides its packet: version, source, destination, time.
pub const ENTRY_OVERHEAD: usize = 1 + 16 + 16 + 8;
/// The largest packet the spool takes (a routed packet always fits one link packet).
pub const MAX_PACKET: usize = 65_535;

/// Where and how much a [`Spool`] stores.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpoolConfig {
    /// The database file (created if missing).
    pub path: PathBuf,
    /// Bytes stored in all (packets plus [`ENTRY_OVERHEAD`] each). Default 64 MiB.
    pub max_bytes: u64,
    /// Bytes stored for one source device. Default 1 MiB.
    pub max_bytes_per_source: u64,
    /// Entries older than this are dropped by [`Spool::expire`]. Default 24 h.
    pub ttl: Duration,
}

impl SpoolConfig {
    /// The defaults, storing in `path`.
    #[must_use]
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), max_bytes: 64 << 20, max_bytes_per_source: 1 << 20, ttl: Duration::from_secs(86_400) }
    }

    /// Sets [`SpoolConfig::max_bytes`].
    #[must_use]
    pub fn max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = n;
        self
    }

    /// Sets [`SpoolConfig::max_bytes_per_source`].
    #[must_use]
    pub fn max_bytes_per_source(mut self, n: u64) -> Self {
        self.max_bytes_per_source = n;
        self
    }

    /// Sets [`SpoolConfig::ttl`].
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }
}

/// What can go wrong with the spool.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// The database file could not be opened or created.
    #[error("spool {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<redb::DatabaseError>,
    },
    /// A read or write failed (I/O, a full disk).
    #[error("spool storage: {0}")]
    Storage(#[from] Box<redb::Error>),
    /// A configuration with a zero bound.
    #[error("spool {0} must be at least 1")]
    ZeroLimit(&'static str),
}

impl SpoolError {
    fn storage(e: impl Into<redb::Error>) -> Self {
        Self::Storage(Box::new(e.into()))
    }
}

/// The outcome of one packet given to [`Spool::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored durably under this sequence number.
    Stored {
        /// The entry's sequence number (replay order).
        seq: u64,
    },
    /// Not stored: no room.
    Full(FullReason),
    /// Not stored: empty or larger than [`MAX_PACKET`].
    BadSize,
}

/// Which bound refused a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullReason {
    /// [`SpoolConfig::max_bytes`].
    Total,
    /// [`SpoolConfig::max_bytes_per_source`].
    Source,
}

/// One stored packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Sequence number: replay order.
    pub seq: u64,
    /// The device it came from.
    pub source: NodeId,
    /// The node it is for.
    pub destination: NodeId,
    /// When it was stored (the caller's clock, milliseconds since the Unix epoch).
    pub stored_at_ms: u64,
    /// The sealed end-to-end packet.
    pub packet: Bytes,
}

/// What the spool holds (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpoolStats {
    /// Entries stored.
    pub entries: u64,
    /// Bytes counted against the bounds.
    pub bytes: u64,
    /// Devices with at least one entry.
    pub sources: usize,
    /// Unreadable entries found (and removed) when the spool was opened.
    pub corrupt_removed: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    entries: u64,
    bytes: u64,
}

/// A durable FIFO of routed packets (see the [module](self) docs). Synchronous: the gateway
/// runs it on a blocking thread.
#[derive(Debug)]
pub struct Spool {
    db: Database,
    config: SpoolConfig,
    next_seq: u64,
    total: Usage,
    per_source: HashMap<NodeId, Usage>,
    /// Per destination: its entries, and a sequence number no entry of it is below, where
    /// [`Spool::peek`] starts reading. Entries for another node (a cloud whose key changed)
    /// then cost nothing to the current cloud's replay: without it, every batch read them
    /// again, and a spool holding only theirs was read whole each time the gateway looked.
    per_destination: HashMap<NodeId, Destination>,
    corrupt_removed: u64,
}

#[derive(Debug, Clone, Copy)]
struct Destination {
    entries: u64,
    first: u64,
}

fn cost(packet_len: usize) -> u64 {
    (packet_len + ENTRY_OVERHEAD) as u64
}

fn encode(source: &NodeId, destination: &NodeId, stored_at_ms: u64, packet: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(ENTRY_OVERHEAD + packet.len());
    v.push(ENTRY_VERSION);
    v.extend_from_slice(&source.0);
    v.extend_from_slice(&destination.0);
    v.extend_from_slice(&stored_at_ms.to_be_bytes());
    v.extend_from_slice(packet);
    v
}

fn decode(seq: u64, v: &[u8]) -> Option<Entry> {
    if v.len() <= ENTRY_OVERHEAD || v.len() > ENTRY_OVERHEAD + MAX_PACKET || v[0] != ENTRY_VERSION {
        return None;
    }
    let source = NodeId(v[1..17].try_into().ok()?);
    let destination = NodeId(v[17..33].try_into().ok()?);
    let stored_at_ms = u64::from_be_bytes(v[33..41].try_into().ok()?);
    Some(Entry { seq, source, destination, stored_at_ms, packet: Bytes::copy_from_slice(&v[ENTRY_OVERHEAD..]) })
}

impl Spool {
    /// Opens (or creates) the spool at `config.path`, counting what it holds; unreadable
    /// entries (written by another version, or damaged) are removed and counted in
    /// [`SpoolStats::corrupt_removed`].
    ///
    /// # Errors
    ///
    /// [`SpoolError`] if the file cannot be opened or read, or a bound is zero.
    pub fn open(config: SpoolConfig) -> Result<Self, SpoolError> {
        if config.max_bytes == 0 {
            return Err(SpoolError::ZeroLimit("max_bytes"));
        }
        if config.max_bytes_per_source == 0 {
            return Err(SpoolError::ZeroLimit("max_bytes_per_source"));
        }
        let db = Database::create(&config.path)
            .map_err(|e| SpoolError::Open { path: config.path.clone(), source: Box::new(e) })?;
        let mut spool = Self {
            db,
            config,
            next_seq: 0,
            total: Usage::default(),
            per_source: HashMap::new(),
            per_destination: HashMap::new(),
            corrupt_removed: 0,
        };
        spool.scan()?;
        Ok(spool)
    }

    fn scan(&mut self) -> Result<(), SpoolError> {
        let txn = self.db.begin_write().map_err(SpoolError::storage)?;
        let mut corrupt = Vec::new();
        {
            let mut table = txn.open_table(ENTRIES).map_err(SpoolError::storage)?;
            for item in table.iter().map_err(SpoolError::storage)? {
                let (k, v) = item.map_err(SpoolError::storage)?;
                let seq = k.value();
                self.next_seq = self.next_seq.max(seq.saturating_add(1));
                match decode(seq, v.value()) {
                    Some(e) => {
                        self.count_in(&e.source, e.packet.len());
                        self.destination_in(&e.destination, seq);
                    }
                    None => corrupt.push(seq),
                }
            }
            for seq in &corrupt {
                table.remove(seq).map_err(SpoolError::storage)?;
            }
        }
        txn.commit().map_err(SpoolError::storage)?;
        self.corrupt_removed = corrupt.len() as u64;
        Ok(())
    }

    fn count_in(&mut self, source: &NodeId, packet_len: usize) {
        let c = cost(packet_len);
        self.total.entries += 1;
        self.total.bytes += c;
        let u = self.per_source.entry(*source).or_default();
        u.entries += 1;
        u.bytes += c;
    }

    fn destination_in(&mut self, destination: &NodeId, seq: u64) {
        let d = self.per_destination.entry(*destination).or_insert(Destination { entries: 0, first: seq });
        d.entries += 1;
        d.first = d.first.min(seq);
    }

    fn destination_out(&mut self, destination: &NodeId) {
        if let Some(d) = self.per_destination.get_mut(destination) {
            d.entries = d.entries.saturating_sub(1);
            if d.entries == 0 {
                self.per_destination.remove(destination);
            }
        }
    }

    fn count_out(&mut self, source: &NodeId, packet_len: usize) {
        let c = cost(packet_len);
        self.total.entries = self.total.entries.saturating_sub(1);
        self.total.bytes = self.total.bytes.saturating_sub(c);
        if let Some(u) = self.per_source.get_mut(source) {
            u.entries = u.entries.saturating_sub(1);
            u.bytes = u.bytes.saturating_sub(c);
            if u.entries == 0 {
                self.per_source.remove(source);
            }
        }
    }

    /// Stores `(source, destination, packet)` triples in one durable commit, in order, and
    /// says for each whether it was stored. When it returns `Ok`, every `Stored` entry
    /// survives a crash.
    ///
    /// # Errors
    ///
    /// [`SpoolError::Storage`] if the commit fails; then nothing of the batch is stored.
    pub fn append(&mut self, batch: &[(NodeId, NodeId, &[u8])], now_ms: u64) -> Result<Vec<Appended>, SpoolError> {
        let mut outcomes = Vec::with_capacity(batch.len());
        // What this batch adds per source; the spool's own counts change only once it is durable.
        let mut added: HashMap<NodeId, Usage> = HashMap::new();
        let mut total = self.total;
        let mut next_seq = self.next_seq;
        let mut stored = Vec::with_capacity(batch.len());
        let txn = self.db.begin_write().map_err(SpoolError::storage)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(SpoolError::storage)?;
            for (source, destination, packet) in batch {
                if packet.is_empty() || packet.len() > MAX_PACKET {
                    outcomes.push(Appended::BadSize);
                    continue;
                }
                let c = cost(packet.len());
                let used =
                    self.per_source.get(source).map_or(0, |u| u.bytes) + added.get(source).map_or(0, |u| u.bytes);
                if total.bytes + c > self.config.max_bytes {
                    outcomes.push(Appended::Full(FullReason::Total));
                    continue;
                }
                if used + c > self.config.max_bytes_per_source {
                    outcomes.push(Appended::Full(FullReason::Source));
                    continue;
                }
                let seq = next_seq;
                next_seq += 1;
                table
                    .insert(seq, encode(source, destination, now_ms, packet).as_slice())
                    .map_err(SpoolError::storage)?;
                let u = added.entry(*source).or_default();
                u.entries += 1;
                u.bytes += c;
                total.entries += 1;
                total.bytes += c;
                stored.push((*destination, seq));
                outcomes.push(Appended::Stored { seq });
            }
        }
        txn.commit().map_err(SpoolError::storage)?;
        for (source, a) in added {
            let u = self.per_source.entry(source).or_default();
            u.entries += a.entries;
            u.bytes += a.bytes;
        }
        self.total = total;
        self.next_seq = next_seq;
        for (destination, seq) in stored {
            self.destination_in(&destination, seq);
        }
        Ok(outcomes)
    }

    /// Up to `max` entries for `destination`, oldest first.
    ///
    /// # Errors
    ///
    /// [`SpoolError::Storage`] if the read fails.
    pub fn peek(&self, destination: &NodeId, max: usize) -> Result<Vec<Entry>, SpoolError> {
        let txn = self.db.begin_read().map_err(SpoolError::storage)?;
        let table = match txn.open_table(ENTRIES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(SpoolError::storage(e)),
        };
        let Some(first) = self.per_destination.get(destination).map(|d| d.first) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for item in table.range(first..).map_err(SpoolError::storage)? {
            if out.len() >= max {
                break;
            }
            let (k, v) = item.map_err(SpoolError::storage)?;
            if let Some(e) = decode(k.value(), v.value()) {
                if e.destination == *destination {
                    out.push(e);
                }
            }
        }
        Ok(out)
    }

    /// Removes entries (replayed ones) in one commit. Unknown sequence numbers are ignored.
    ///
    /// # Errors
    ///
    /// [`SpoolError::Storage`] if the commit fails; then nothing is removed.
    pub fn remove(&mut self, seqs: &[u64]) -> Result<(), SpoolError> {
        self.remove_where(|e| seqs.contains(&e.seq), Some(seqs)).map(|_| ())
    }

    /// Removes every entry stored before `now_ms − ttl`; returns how many per source.
    ///
    /// # Errors
    ///
    /// [`SpoolError::Storage`] if the commit fails; then nothing is removed.
    pub fn expire(&mut self, now_ms: u64) -> Result<HashMap<NodeId, u64>, SpoolError> {
        let ttl_ms = u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_ms.saturating_sub(ttl_ms);
        self.remove_where(|e| e.stored_at_ms < cutoff, None)
    }

    /// Removes every entry from `source` (a revoked device); returns how many.
    ///
    /// # Errors
    ///
    /// [`SpoolError::Storage`] if the commit fails; then nothing is removed.
    pub fn drop_source(&mut self, source: &NodeId) -> Result<u64, SpoolError> {
        if !self.per_source.contains_key(source) {
            return Ok(0);
        }
        let removed = self.remove_where(|e| e.source == *source, None)?;
        Ok(removed.values().sum())
    }

    /// Removes the entries `pick` selects, in one commit; `keys`, when given, are the only
    /// candidates (looked up directly instead of scanning).
    fn remove_where(
        &mut self,
        pick: impl Fn(&Entry) -> bool,
        keys: Option<&[u64]>,
    ) -> Result<HashMap<NodeId, u64>, SpoolError> {
        let mut removed: Vec<(NodeId, NodeId, usize)> = Vec::new();
        let txn = self.db.begin_write().map_err(SpoolError::storage)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(SpoolError::storage)?;
            let candidates: Vec<u64> = match keys {
                Some(k) => k.to_vec(),
                None => {
                    let mut all = Vec::new();
                    for item in table.iter().map_err(SpoolError::storage)? {
                        let (k, v) = item.map_err(SpoolError::storage)?;
                        if decode(k.value(), v.value()).is_some_and(|e| pick(&e)) {
                            all.push(k.value());
                        }
                    }
                    all
                }
            };
            for seq in candidates {
                let Some(old) = table.remove(seq).map_err(SpoolError::storage)? else { continue };
                match decode(seq, old.value()) {
                    Some(e) if pick(&e) => removed.push((e.source, e.destination, e.packet.len())),
                    Some(_) => {
                        // Not selected after all: put it back unchanged.
                        let bytes = old.value().to_vec();
                        drop(old);
                        table.insert(seq, bytes.as_slice()).map_err(SpoolError::storage)?;
                    }
                    None => {}
                }
            }
        }
        txn.commit().map_err(SpoolError::storage)?;
        let mut per_source = HashMap::new();
        for (source, destination, len) in removed {
            self.count_out(&source, len);
            self.destination_out(&destination);
            *per_source.entry(source).or_insert(0) += 1;
        }
        Ok(per_source)
    }

    /// Whether `source` has entries waiting (its newer packets then queue behind them,
    /// spec §17.9).
    #[must_use]
    pub fn has_entries_from(&self, source: &NodeId) -> bool {
        self.per_source.contains_key(source)
    }

    /// The devices with entries waiting (a gateway that reopens its spool queues their newer
    /// packets behind them, spec §17.9).
    #[must_use]
    pub fn sources(&self) -> Vec<NodeId> {
        self.per_source.keys().copied().collect()
    }

    /// What the spool holds.
    #[must_use]
    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            entries: self.total.entries,
            bytes: self.total.bytes,
            sources: self.per_source.len(),
            corrupt_removed: self.corrupt_removed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId([0xA; 16]);
    const B: NodeId = NodeId([0xB; 16]);
    const CLOUD: NodeId = NodeId([0xC; 16]);
    const OTHER_CLOUD: NodeId = NodeId([0xD; 16]);

    fn config(dir: &tempfile::TempDir) -> SpoolConfig {
        SpoolConfig::new(dir.path().join("spool.redb"))
    }

    /// Entries for another cloud ahead of the current cloud's (its key changed) are passed
    /// over, not read again for every batch; a destination with none reads nothing. The
    /// bookkeeping follows appends, removals, expiry and reopening.
    #[test]
    fn peek_starts_at_the_destinations_first_entry() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(config(&dir)).unwrap();
        let old: Vec<(NodeId, NodeId, &[u8])> = (0..300).map(|_| (A, OTHER_CLOUD, &b"old"[..])).collect();
        spool.append(&old, 1).unwrap();
        assert!(spool.peek(&CLOUD, 10).unwrap().is_empty());
        assert_eq!(spool.per_destination.get(&CLOUD).map(|d| d.entries), None);
        let new: Vec<(NodeId, NodeId, &[u8])> = (0..5).map(|_| (B, CLOUD, &b"new"[..])).collect();
        spool.append(&new, 2).unwrap();
        assert_eq!(spool.per_destination[&CLOUD].first, 300);
        let got = spool.peek(&CLOUD, 3).unwrap();
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [300, 301, 302]);
        spool.remove(&[300, 301, 302]).unwrap();
        assert_eq!(spool.peek(&CLOUD, 10).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), [303, 304]);
        drop(spool);

        let mut spool = Spool::open(config(&dir)).unwrap();
        assert_eq!(spool.per_destination[&CLOUD].first, 303);
        assert_eq!(spool.per_destination[&OTHER_CLOUD].entries, 300);
        spool.remove(&[303, 304]).unwrap();
        assert!(spool.peek(&CLOUD, 10).unwrap().is_empty());
        assert!(!spool.per_destination.contains_key(&CLOUD));
        // The old cloud's entries expire with their ttl, and its bookkeeping with them.
        spool.expire(1 + 86_400_001).unwrap();
        assert!(spool.per_destination.is_empty());
        assert_eq!(spool.stats().entries, 0);
        // A destination that comes back starts at its new first entry.
        spool.append(&[(A, OTHER_CLOUD, b"again")], 2).unwrap();
        assert_eq!(spool.peek(&OTHER_CLOUD, 10).unwrap()[0].packet, &b"again"[..]);
    }

    #[test]
    fn entries_come_back_in_order_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(config(&dir)).unwrap();
        let packets: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        let batch: Vec<(NodeId, NodeId, &[u8])> =
            packets.iter().enumerate().map(|(i, p)| (if i % 2 == 0 { A } else { B }, CLOUD, p.as_slice())).collect();
        let out = spool.append(&batch, 5).unwrap();
        assert_eq!(out, (0..10).map(|seq| Appended::Stored { seq }).collect::<Vec<_>>());
        spool.append(&[(A, OTHER_CLOUD, b"elsewhere")], 6).unwrap();
        drop(spool);

        let mut spool = Spool::open(config(&dir)).unwrap();
        assert_eq!(spool.stats().entries, 11);
        assert_eq!(spool.stats().sources, 2);
        let got = spool.peek(&CLOUD, 100).unwrap();
        assert_eq!(got.len(), 10);
        for (i, e) in got.iter().enumerate() {
            assert_eq!(e.seq, i as u64);
            assert_eq!(e.packet, packets[i]);
            assert_eq!(e.source, if i % 2 == 0 { A } else { B });
            assert_eq!(e.stored_at_ms, 5);
        }
        assert_eq!(spool.peek(&CLOUD, 3).unwrap().len(), 3);
        spool.remove(&[0, 1, 2, 99]).unwrap();
        assert_eq!(spool.peek(&CLOUD, 100).unwrap()[0].seq, 3);
        // New entries continue the sequence after a reopen.
        drop(spool);
        let mut spool = Spool::open(config(&dir)).unwrap();
        assert_eq!(spool.append(&[(A, CLOUD, b"late")], 7).unwrap(), vec![Appended::Stored { seq: 11 }]);
        assert_eq!(spool.stats().entries, 9);
    }

    #[test]
    fn bounds_refuse_with_a_reason_and_free_on_removal() {
        let dir = tempfile::tempdir().unwrap();
        let per = cost(100);
        let mut spool = Spool::open(config(&dir).max_bytes(per * 5).max_bytes_per_source(per * 3)).unwrap();
        let p = [7u8; 100];
        let out = spool.append(&[(A, CLOUD, &p[..]); 4], 1).unwrap();
        assert_eq!(out[3], Appended::Full(FullReason::Source));
        let out = spool.append(&[(B, CLOUD, &p[..]); 3], 1).unwrap();
        assert_eq!(
            out,
            vec![Appended::Stored { seq: 3 }, Appended::Stored { seq: 4 }, Appended::Full(FullReason::Total)]
        );
        assert_eq!(spool.append(&[(B, CLOUD, &[][..])], 1).unwrap(), vec![Appended::BadSize]);
        let big = vec![0u8; MAX_PACKET + 1];
        assert_eq!(spool.append(&[(B, CLOUD, big.as_slice())], 1).unwrap(), vec![Appended::BadSize]);
        spool.remove(&[0]).unwrap();
        assert!(matches!(spool.append(&[(B, CLOUD, &p[..])], 1).unwrap()[0], Appended::Stored { .. }));
        assert_eq!(spool.stats().bytes, per * 5);
    }

    #[test]
    fn expiry_and_revocation_remove_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(config(&dir).ttl(Duration::from_secs(10))).unwrap();
        spool.append(&[(A, CLOUD, b"old"), (B, CLOUD, b"old")], 1_000).unwrap();
        spool.append(&[(A, CLOUD, b"new"), (B, CLOUD, b"new")], 9_000).unwrap();
        let expired = spool.expire(12_000).unwrap();
        assert_eq!(expired.get(&A), Some(&1));
        assert_eq!(expired.get(&B), Some(&1));
        assert_eq!(spool.drop_source(&A).unwrap(), 1);
        assert!(!spool.has_entries_from(&A));
        assert!(spool.has_entries_from(&B));
        let left = spool.peek(&CLOUD, 10).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].source, &left[0].packet[..]), (B, &b"new"[..]));
    }

    #[test]
    fn unreadable_entries_are_removed_and_counted_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(config(&dir)).unwrap();
        spool.append(&[(A, CLOUD, b"good")], 1).unwrap();
        {
            let txn = spool.db.begin_write().unwrap();
            {
                let mut t = txn.open_table(ENTRIES).unwrap();
                t.insert(50, &[9u8, 1, 2][..]).unwrap();
                t.insert(51, &[][..]).unwrap();
            }
            txn.commit().unwrap();
        }
        drop(spool);
        let spool = Spool::open(config(&dir)).unwrap();
        assert_eq!(spool.stats().corrupt_removed, 2);
        assert_eq!(spool.stats().entries, 1);
        assert_eq!(spool.peek(&CLOUD, 10).unwrap()[0].packet, &b"good"[..]);
    }

    #[test]
    fn zero_bounds_and_unopenable_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(Spool::open(config(&dir).max_bytes(0)), Err(SpoolError::ZeroLimit("max_bytes"))));
        std::fs::write(dir.path().join("junk.redb"), b"not a database at all, just some bytes").unwrap();
        let err = Spool::open(SpoolConfig::new(dir.path().join("junk.redb"))).unwrap_err();
        assert!(matches!(err, SpoolError::Open { .. }), "{err}");
    }
}
