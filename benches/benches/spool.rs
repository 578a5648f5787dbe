//! The gateway spool (spec §17.9, `veil_relay::spool`) against the raw limit of the same disk:
//! appending records to a plain file and `fdatasync`-ing it.
//!
//! A spooled packet here is 56 B, a routed packet carrying one 32-B reading (spec §16.1).
//! - **write**: `Spool::append` of a batch (1, 16 or 256 packets) in one durable commit, vs the
//!   same records (41 B header + packet) appended to a file and synced once per batch;
//! - **replay**: draining 4 096 stored packets, 256 at a time (`peek` + `remove`, one durable
//!   commit per chunk), vs reading the same records back from the file and syncing an 8-byte
//!   "consumed up to" mark once per chunk;
//! - **replay behind another cloud**: the same drain, with [`BEHIND`] packets for another
//!   cloud stored ahead of them (a gateway whose cloud key changed keeps those until their ttl),
//!   which the replay must pass over (criterion only).
//!
//! criterion times each; afterwards the ratios are printed from interleaved rounds
//! (`veil_benches::timing`), in packets per second. The files live in a temporary directory
//! on the filesystem of `std::env::temp_dir()` (record it with the result: fsync costs are the
//! disk's).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use veil_benches::timing::{self, format_ns, Plan};
use veil_protocol::trust::NodeId;
use veil_relay::spool::{Appended, Spool, SpoolConfig, ENTRY_OVERHEAD};

const PACKET: usize = 56;
const REPLAY: usize = 4_096;
const CHUNK: usize = 256;
const SOURCES: u8 = 50;
const CLOUD: NodeId = NodeId([0xC; 16]);
const OTHER_CLOUD: NodeId = NodeId([0xD; 16]);
/// Packets for another cloud ahead of the replayed ones.
const BEHIND: usize = 65_536;

fn spool_at(dir: &Path, name: &str) -> Spool {
    let config = SpoolConfig::new(dir.join(name)).max_bytes(1 << 40).max_bytes_per_source(1 << 40);
    Spool::open(config).unwrap()
}

/// The spool side of a write: one durable commit of `n` packets; the entries are removed
/// again, untimed, every so often so that the file does not grow without end.
struct SpoolWriter {
    spool: Spool,
    packets: Vec<Vec<u8>>,
    written: Vec<u64>,
}

impl SpoolWriter {
    fn new(dir: &Path, name: &str, n: usize) -> Self {
        let packets = (0..n).map(|i| vec![i as u8; PACKET]).collect();
        Self { spool: spool_at(dir, name), packets, written: Vec::new() }
    }

    fn write(&mut self) {
        let batch: Vec<(NodeId, NodeId, &[u8])> = self
            .packets
            .iter()
            .enumerate()
            .map(|(i, p)| (NodeId([(i as u8) % SOURCES; 16]), CLOUD, p.as_slice()))
            .collect();
        for o in self.spool.append(&batch, 1).unwrap() {
            let Appended::Stored { seq } = o else { panic!("refused: {o:?}") };
            self.written.push(seq);
        }
        if self.written.len() >= 16_384 {
            self.spool.remove(&self.written).unwrap();
            self.written.clear();
        }
    }
}

/// The raw side of a write: records appended to a file, one `fdatasync` per batch.
struct RawWriter {
    file: File,
    record: Vec<u8>,
    n: usize,
    written: u64,
}

impl RawWriter {
    fn new(dir: &Path, name: &str, n: usize) -> Self {
        let file = OpenOptions::new().create(true).read(true).write(true).truncate(true).open(dir.join(name)).unwrap();
        Self { file, record: vec![7u8; ENTRY_OVERHEAD + PACKET], n, written: 0 }
    }

    fn write(&mut self) {
        let mut buf = Vec::with_capacity(self.n * self.record.len());
        for _ in 0..self.n {
            buf.extend_from_slice(&self.record);
        }
        self.file.write_all(&buf).unwrap();
        self.file.sync_data().unwrap();
        self.written += buf.len() as u64;
        if self.written >= 16 << 20 {
            self.file.set_len(0).unwrap();
            self.file.seek(SeekFrom::Start(0)).unwrap();
            self.written = 0;
        }
    }
}

/// Replay of `REPLAY` packets from the spool: fill (durably, in chunks) and drain; only the
/// drain counts, so the fill is subtracted by timing it separately.
fn spool_fill(spool: &mut Spool) {
    let p = vec![3u8; PACKET];
    for _ in 0..REPLAY / CHUNK {
        let batch: Vec<(NodeId, NodeId, &[u8])> =
            (0..CHUNK).map(|i| (NodeId([(i as u8) % SOURCES; 16]), CLOUD, p.as_slice())).collect();
        spool.append(&batch, 1).unwrap();
    }
}

fn spool_drain(spool: &mut Spool) -> usize {
    let mut drained = 0;
    loop {
        let entries = spool.peek(&CLOUD, CHUNK).unwrap();
        if entries.is_empty() {
            return drained;
        }
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        drained += seqs.len();
        spool.remove(&seqs).unwrap();
    }
}

fn raw_fill(file: &mut File) {
    let record = vec![3u8; ENTRY_OVERHEAD + PACKET];
    file.set_len(0).unwrap();
    file.seek(SeekFrom::Start(8)).unwrap();
    for _ in 0..REPLAY / CHUNK {
        let mut buf = Vec::with_capacity(CHUNK * record.len());
        for _ in 0..CHUNK {
            buf.extend_from_slice(&record);
        }
        file.write_all(&buf).unwrap();
        file.sync_data().unwrap();
    }
}

fn raw_drain(file: &mut File) -> usize {
    let mut drained = 0;
    let mut chunk = vec![0u8; CHUNK * (ENTRY_OVERHEAD + PACKET)];
    let mut offset = 8u64;
    while drained < REPLAY {
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.read_exact(&mut chunk).unwrap();
        assert!(chunk.iter().all(|&b| b == 3));
        offset += chunk.len() as u64;
        drained += CHUNK;
        // The durable "consumed up to" mark.
        file.seek(SeekFrom::Start(0)).unwrap();
        file.write_all(&offset.to_le_bytes()).unwrap();
        file.sync_data().unwrap();
    }
    drained
}

/// `iters` replays of `store`: `fill` untimed, then `drain` timed (it must drain [`REPLAY`]
/// packets).
fn timed_replay<S>(iters: u64, store: &mut S, fill: fn(&mut S), drain: fn(&mut S) -> usize) -> Duration {
    let mut spent = Duration::ZERO;
    for _ in 0..iters {
        fill(store);
        let start = std::time::Instant::now();
        assert_eq!(drain(store), REPLAY);
        spent += start.elapsed();
    }
    spent
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("spool");
    for n in [1usize, 16, 256] {
        group.throughput(Throughput::Elements(n as u64));
        let mut s = SpoolWriter::new(dir.path(), &format!("w{n}.redb"), n);
        group.bench_function(format!("write/spool/batch-{n}"), |b| b.iter(|| s.write()));
        let mut r = RawWriter::new(dir.path(), &format!("w{n}.raw"), n);
        group.bench_function(format!("write/raw-file/batch-{n}"), |b| b.iter(|| r.write()));
    }
    group.throughput(Throughput::Elements(REPLAY as u64));
    let mut spool = spool_at(dir.path(), "replay.redb");
    group.bench_function("replay/spool", |b| {
        b.iter_custom(|iters| timed_replay(iters, &mut spool, spool_fill, spool_drain));
    });
    let mut behind = spool_at(dir.path(), "behind.redb");
    let p = vec![4u8; PACKET];
    for _ in 0..BEHIND / CHUNK {
        let batch: Vec<(NodeId, NodeId, &[u8])> =
            (0..CHUNK).map(|_| (NodeId([0xE; 16]), OTHER_CLOUD, p.as_slice())).collect();
        behind.append(&batch, 1).unwrap();
    }
    group.bench_function("replay/spool-behind-another-cloud", |b| {
        b.iter_custom(|iters| timed_replay(iters, &mut behind, spool_fill, spool_drain));
    });
    drop(behind);
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(dir.path().join("replay.raw"))
        .unwrap();
    group.bench_function("replay/raw-file", |b| {
        b.iter_custom(|iters| timed_replay(iters, &mut file, raw_fill, raw_drain));
    });
    group.finish();
}

/// Interleaved ratios of every pair.
fn ratios() {
    let Some(plan) = Plan::from_args() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut subjects: Vec<(usize, SpoolWriter, RawWriter)> = [1usize, 16, 256]
        .into_iter()
        .map(|n| {
            (
                n,
                SpoolWriter::new(dir.path(), &format!("i{n}.redb"), n),
                RawWriter::new(dir.path(), &format!("i{n}.raw"), n),
            )
        })
        .collect();
    let mut spool = spool_at(dir.path(), "ireplay.redb");
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(dir.path().join("ireplay.raw"))
        .unwrap();
    let [(_, s1, r1), (_, s16, r16), (_, s256, r256)] = subjects.as_mut_slice() else { unreachable!() };
    let rounds = timing::interleave(
        plan,
        &mut [
            &mut || s1.write(),
            &mut || r1.write(),
            &mut || s16.write(),
            &mut || r16.write(),
            &mut || s256.write(),
            &mut || r256.write(),
        ],
    );
    // Replay: fills untimed, drains timed, the two subjects alternating round by round.
    let (mut spool_best, mut raw_best) = (f64::INFINITY, f64::INFINITY);
    let mut per_round = Vec::new();
    for _ in 0..plan.rounds.min(11) {
        spool_fill(&mut spool);
        let t = std::time::Instant::now();
        assert_eq!(spool_drain(&mut spool), REPLAY);
        let s = t.elapsed().as_nanos() as f64;
        raw_fill(&mut file);
        let t = std::time::Instant::now();
        assert_eq!(raw_drain(&mut file), REPLAY);
        let r = t.elapsed().as_nanos() as f64;
        spool_best = spool_best.min(s);
        raw_best = raw_best.min(r);
        per_round.push(r / s);
    }
    per_round.sort_by(f64::total_cmp);
    let replay_median = per_round[per_round.len() / 2];
    if !plan.is_measuring() {
        return;
    }
    println!(
        "\nSpool vs raw file + fdatasync ({} B packets, temp dir {}, interleaved over {} rounds; best round, \
         (m …) median of per-round ratios):",
        PACKET,
        std::env::temp_dir().display(),
        plan.rounds
    );
    for (i, n) in [1usize, 16, 256].into_iter().enumerate() {
        let (s, r) = (rounds.best_ns(2 * i), rounds.best_ns(2 * i + 1));
        println!(
            "write, batch {n:>3}: spool {:>9.0} packets/s ({} per commit), raw file {:>9.0} packets/s; spool/raw {:.2} (m {:.2})",
            n as f64 * 1e9 / s,
            format_ns(s),
            n as f64 * 1e9 / r,
            r / s,
            rounds.median_of(|x| x[2 * i + 1] / x[2 * i]),
        );
    }
    println!(
        "replay, {REPLAY} packets in chunks of {CHUNK}: spool {:.0} packets/s, raw file {:.0} packets/s; spool/raw {:.2} \
         (m {:.2})",
        REPLAY as f64 * 1e9 / spool_best,
        REPLAY as f64 * 1e9 / raw_best,
        raw_best / spool_best,
        replay_median,
    );
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3)).sample_size(10)
}

criterion_group! {
    name = spool_benches;
    config = config();
    targets = benches
}
criterion_main!(spool_benches, ratios);
