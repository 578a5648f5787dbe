//! The spool survives `kill -9` at any moment: a child process appends batches and reports
//! each commit on stdout; the test kills it (SIGKILL) after a seeded number of commits,
//! reopens the spool and checks that every reported entry is there, byte for byte, and that
//! everything else the spool holds is intact too (a commit the child could not report yet).
//! Three rounds on the same file, so that a spool reopened after a crash is written to again.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use veil_protocol::trust::NodeId;
use veil_relay::spool::{Appended, Spool, SpoolConfig};

const CHILD_ENV: &str = "VEIL_SPOOL_CRASH_CHILD";
const CLOUD: NodeId = NodeId([0xC; 16]);
/// Entries per batch (one commit).
const BATCH: u64 = 8;
/// Bound on one child's run.
const CHILD_BOUND: Duration = Duration::from_secs(30);

/// The packet stored under `seq`: its length and bytes follow from `seq`, so that any
/// damage or mix-up shows.
fn packet(seq: u64) -> Vec<u8> {
    let len = 24 + (seq % 300) as usize;
    (0..len).map(|i| (seq as u8).wrapping_mul(7).wrapping_add(i as u8)).collect()
}

fn source(seq: u64) -> NodeId {
    NodeId([(seq % 5) as u8 + 1; 16])
}

fn config(path: &Path) -> SpoolConfig {
    SpoolConfig::new(path).max_bytes(1 << 30).max_bytes_per_source(1 << 30)
}

/// The child: appends batches until killed (or its bound), printing `committed <last seq>`
/// after each commit.
#[test]
#[ignore = "the child process of spool_survives_kill_9; run by that test"]
fn spool_crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else { return };
    let mut spool = Spool::open(config(Path::new(&path))).unwrap();
    let started = Instant::now();
    let mut next = spool.stats().entries; // entries are never removed in this test
    while started.elapsed() < CHILD_BOUND {
        let packets: Vec<Vec<u8>> = (next..next + BATCH).map(packet).collect();
        let batch: Vec<(NodeId, NodeId, &[u8])> =
            (next..next + BATCH).zip(&packets).map(|(seq, p)| (source(seq), CLOUD, p.as_slice())).collect();
        let out = spool.append(&batch, 1).unwrap();
        for (i, o) in out.iter().enumerate() {
            assert_eq!(*o, Appended::Stored { seq: next + i as u64 });
        }
        next += BATCH;
        println!("committed {}", next - 1);
    }
}

#[test]
fn spool_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.redb");
    let exe = std::env::current_exe().unwrap();
    // Seeded kill points (in commits), different in each round.
    for (round, kill_after) in [13u64, 41, 7].into_iter().enumerate() {
        let mut child = Command::new(&exe)
            .args(["--ignored", "--exact", "spool_crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut acknowledged = None;
        let mut commits = 0;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(seq) = line.strip_prefix("committed ") {
                acknowledged = Some(seq.trim().parse::<u64>().unwrap());
                commits += 1;
                if commits == kill_after {
                    break;
                }
            }
        }
        // SIGKILL, in the middle of whatever the child is doing now.
        child.kill().unwrap();
        child.wait().unwrap();
        let acknowledged = acknowledged.expect("the child committed nothing");
        assert_eq!(commits, kill_after, "round {round}: the child ended early");

        let spool = Spool::open(config(&path)).unwrap();
        let stats = spool.stats();
        assert_eq!(stats.corrupt_removed, 0, "round {round}");
        assert!(stats.entries > acknowledged, "round {round}: lost acknowledged entries: {stats:?}");
        let entries = spool.peek(&CLOUD, usize::MAX).unwrap();
        assert_eq!(entries.len() as u64, stats.entries);
        for (i, e) in entries.iter().enumerate() {
            // Every acknowledged entry, and every entry at all, is complete and in order:
            // a commit is all or nothing.
            assert_eq!(e.seq, i as u64, "round {round}");
            assert_eq!(e.packet, packet(e.seq), "round {round}: entry {} damaged", e.seq);
            assert_eq!(e.source, source(e.seq));
        }
        assert_eq!(stats.entries % BATCH, 0, "round {round}: a batch was stored in part");
        eprintln!("round {round}: killed after {kill_after} commits; {} entries intact", stats.entries);
    }
}
