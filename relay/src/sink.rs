//! Where the cloud role delivers device messages: JSON lines, one message per line, on
//! standard output or appended to a file.
//!
//! A message line looks like this (one line; wrapped here):
//!
//! ```text
//! {"record":"message","device":"5b0e…","stream":"0f1e2d3c4b5a6978","channel":0,"id":17,
//!  "via":"relay","relay":"9c41…","received_at_ms":1795850000123,"payload_hex":"48656c6c6f",
//!  "payload_text":"Hello"}
//! ```
//!
//! - `record`: `"message"` (a device message) or `"command"` (the outcome of a command, below).
//! - `device`: the sender's node id (32 hex digits, spec §15.2), authenticated end to end.
//! - `stream`: the sender's delivery stream (16 hex digits, spec §17.2), which `id` belongs
//!   to; absent for a message taken best effort (a sender without delivery).
//! - `channel`, `id`: the message's channel and the sender's id for it on that channel
//!   (spec §9.2, §17.2). With `stream`, each `(device, stream, channel, id)` appears once: the
//!   cloud commits a message (spec §17.7) only after its line is written (and synced, with
//!   `sink.fsync`), and on start it reads the file back to resume each device's stream
//!   where the file ends ([`scan`]).
//! - `via`: `"direct"` (the device's own link session) or `"relay"` (an end-to-end session
//!   through a gateway, whose node id is `relay`).
//! - `received_at_ms`: when the cloud received it, Unix milliseconds.
//! - `payload_hex`: the payload; `payload_text`: the same payload when it is valid UTF-8.
//!
//! A command line reports a command from the control socket that the device never
//! acknowledged within `control.command_ttl_secs` (spec §17.6):
//!
//! ```text
//! {"record":"command","device":"5b0e…","channel":1,"id":4,"outcome":"expired_unconfirmed",
//!  "at_ms":1795850000123,"payload_hex":"6f6e","payload_text":"on"}
//! ```
//!
//! - `channel`, `id`: the command's channel and the cloud's id for it.
//! - `outcome`: `"expired"` (it never left the cloud: the device did not connect in time) or
//!   `"expired_unconfirmed"` (it was sent, but no acknowledgement came: the device may or may
//!   not have it).
//! - `at_ms`: when it was dropped, Unix milliseconds.

use std::collections::HashMap;
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use veil_protocol::delivery::StreamId;
use veil_protocol::trust::NodeId;

/// Where delivered messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkTarget {
    /// JSON lines on standard output.
    Stdout,
    /// JSON lines appended to this file (created if missing).
    File(PathBuf),
}

/// How a message reached the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// In the device's own link session (spec §16.1, direct shape).
    Direct,
    /// In an end-to-end session through the relay with this node id.
    Relay(NodeId),
}

/// One delivered message.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// The sender.
    pub device: &'a NodeId,
    /// The sender's delivery stream (spec §17.2); `None` for a best-effort message.
    pub stream: Option<StreamId>,
    /// Channel.
    pub channel: u16,
    /// The sender's id for the message on its channel.
    pub id: u64,
    /// How it arrived.
    pub via: Via,
    /// When it arrived.
    pub received_at: SystemTime,
    /// The payload.
    pub payload: &'a [u8],
}

#[derive(Serialize)]
struct Line<'a> {
    record: &'static str,
    device: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<String>,
    channel: u16,
    id: u64,
    via: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    relay: Option<String>,
    received_at_ms: u128,
    payload_hex: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_text: Option<&'a str>,
}

/// Renders one delivery as a JSON line (with the trailing newline).
#[must_use]
pub fn render(d: &Delivery<'_>) -> String {
    let (via, relay) = match d.via {
        Via::Direct => ("direct", None),
        Via::Relay(n) => ("relay", Some(n.to_string())),
    };
    let line = Line {
        record: "message",
        device: d.device.to_string(),
        stream: d.stream.map(hex::encode),
        channel: d.channel,
        id: d.id,
        via,
        relay,
        received_at_ms: d.received_at.duration_since(UNIX_EPOCH).map_or(0, |t| t.as_millis()),
        payload_hex: hex::encode(d.payload),
        payload_text: std::str::from_utf8(d.payload).ok(),
    };
    // Serializing a struct of strings and integers cannot fail.
    let mut s = serde_json::to_string(&line).unwrap_or_default();
    s.push('\n');
    s
}

/// A command the device never acknowledged in time (spec §17.6).
#[derive(Debug, Clone, Copy)]
pub struct ExpiredCommand<'a> {
    /// The destination.
    pub device: &'a NodeId,
    /// Channel.
    pub channel: u16,
    /// The cloud's id for it.
    pub id: u64,
    /// It was sent at least once (the device may have it).
    pub unconfirmed: bool,
    /// When it was dropped.
    pub at: SystemTime,
    /// The payload.
    pub payload: &'a [u8],
}

#[derive(Serialize)]
struct CommandLine<'a> {
    record: &'static str,
    device: String,
    channel: u16,
    id: u64,
    outcome: &'static str,
    at_ms: u128,
    payload_hex: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_text: Option<&'a str>,
}

/// Renders an expired command as a JSON line (with the trailing newline).
#[must_use]
pub fn render_command(c: &ExpiredCommand<'_>) -> String {
    let line = CommandLine {
        record: "command",
        device: c.device.to_string(),
        channel: c.channel,
        id: c.id,
        outcome: if c.unconfirmed { "expired_unconfirmed" } else { "expired" },
        at_ms: c.at.duration_since(UNIX_EPOCH).map_or(0, |t| t.as_millis()),
        payload_hex: hex::encode(c.payload),
        payload_text: std::str::from_utf8(c.payload).ok(),
    };
    let mut s = serde_json::to_string(&line).unwrap_or_default();
    s.push('\n');
    s
}

/// What a sink file says each device's stream reached (spec §17.7): per device, the stream of
/// its last message line and, per channel of that stream, the id after the highest one
/// written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    /// `device -> (stream, channel -> next id)`.
    pub devices: HashMap<NodeId, (StreamId, HashMap<u16, u64>)>,
    /// Lines that are not message records with a stream (best-effort messages, command
    /// records) or do not parse (a line cut short by a crash).
    pub skipped: u64,
}

#[derive(serde::Deserialize)]
struct ScanLine {
    device: String,
    stream: Option<String>,
    channel: u16,
    id: u64,
}

/// Reads a sink file back (spec §17.7): where each device's current stream stands. A missing
/// file is an empty one. Memory: one entry per device and channel.
///
/// # Errors
/// The file exists but cannot be read.
pub fn scan(path: &Path) -> io::Result<Resume> {
    let mut resume = Resume::default();
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(resume),
        Err(e) => return Err(e),
    };
    let mut reader = io::BufReader::new(file);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let parsed = serde_json::from_slice::<ScanLine>(&line).ok().and_then(|l| {
            let device = parse_node(&l.device)?;
            let stream: StreamId = hex::decode(l.stream?).ok()?.try_into().ok()?;
            Some((device, stream, l.channel, l.id))
        });
        let Some((device, stream, channel, id)) = parsed else {
            resume.skipped += 1;
            continue;
        };
        let entry = resume.devices.entry(device).or_insert_with(|| (stream, HashMap::new()));
        if entry.0 != stream {
            // A sender that restarted without its state: its new stream starts over.
            *entry = (stream, HashMap::new());
        }
        let next = entry.1.entry(channel).or_insert(0);
        *next = (*next).max(id.saturating_add(1));
    }
    Ok(resume)
}

/// One message line of a sink file, as read back (tests, `veil-relay soak`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkLine {
    /// The sender's node id (hex).
    pub device: String,
    /// The sender's delivery stream (hex), if it used delivery (spec §17.2).
    pub stream: Option<String>,
    /// Channel.
    pub channel: u16,
    /// The sender's id for the message.
    pub id: u64,
    /// `"relay"` or `"direct"`.
    pub via: String,
    /// The gateway's node id for `via = "relay"`.
    pub relay: Option<String>,
    /// When the cloud received it, Unix milliseconds.
    pub received_at_ms: u64,
    /// The payload.
    pub payload: Vec<u8>,
}

impl SinkLine {
    /// A message record of one line (without or with its newline); `None` for any other
    /// record or a line that does not parse (one a crash cut short).
    #[must_use]
    pub fn parse(line: &[u8]) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(line).ok()?;
        if v["record"] != "message" {
            return None;
        }
        let s = |k: &str| v[k].as_str().map(str::to_owned);
        Some(Self {
            device: s("device")?,
            stream: s("stream"),
            channel: u16::try_from(v["channel"].as_u64()?).ok()?,
            id: v["id"].as_u64()?,
            via: s("via")?,
            relay: s("relay"),
            received_at_ms: v["received_at_ms"].as_u64().unwrap_or(0),
            payload: hex::decode(s("payload_hex")?).ok()?,
        })
    }
}

/// The complete records of kind `record` (`"message"`, `"command"`) of a sink file, as JSON
/// values: a line still being written (no newline yet) is skipped, and so is a line that does
/// not parse (one a crash cut short, which the restarted cloud ended with a newline). A
/// missing file is an empty one.
///
/// # Errors
/// The file exists but cannot be read.
pub fn read_records(path: &Path, record: &str) -> io::Result<Vec<serde_json::Value>> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .split_inclusive(|b| *b == b'\n')
        .filter(|l| l.ends_with(b"\n"))
        .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
        .filter(|v| v["record"] == record)
        .collect())
}

/// The complete message lines of a sink file, in file order (see [`read_records`]).
///
/// # Errors
/// The file exists but cannot be read.
pub fn read_lines(path: &Path) -> io::Result<Vec<SinkLine>> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text.split_inclusive(|b| *b == b'\n').filter(|l| l.ends_with(b"\n")).filter_map(SinkLine::parse).collect())
}

fn parse_node(s: &str) -> Option<NodeId> {
    let bytes: [u8; 16] = hex::decode(s).ok()?.try_into().ok()?;
    Some(NodeId(bytes))
}

/// A JSON-lines writer. Buffered: call [`Sink::flush`] when the burst is over.
pub struct Sink {
    out: BufWriter<Box<dyn AsyncWrite + Send + Unpin>>,
    written: u64,
    /// With `sink.fsync`: the file, synced after each flush.
    sync: Option<tokio::fs::File>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("written", &self.written).finish_non_exhaustive()
    }
}

impl Sink {
    /// Opens the target (a file is created if missing and appended to).
    ///
    /// # Errors
    /// The file cannot be opened.
    pub async fn open(target: &SinkTarget) -> io::Result<Self> {
        Self::open_synced(target, false).await
    }

    /// Opens the target; with `fsync` and a file, [`Sink::flush`] also syncs the file to disk.
    /// A file whose last line was cut short (a crash mid-write) gets a newline first, so that
    /// the lines appended now stay whole.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub async fn open_synced(target: &SinkTarget, fsync: bool) -> io::Result<Self> {
        match target {
            SinkTarget::Stdout => Ok(Self::from_writer(Box::new(tokio::io::stdout()))),
            SinkTarget::File(path) => {
                let mut file = open_append(path).await?;
                if !ends_with_newline(path)? {
                    file.write_all(b"\n").await?;
                    file.flush().await?;
                }
                let sync = if fsync { Some(file.try_clone().await?) } else { None };
                let mut sink = Self::from_writer(Box::new(file));
                sink.sync = sync;
                Ok(sink)
            }
        }
    }

    /// A sink writing to `out` (tests, embedding).
    #[must_use]
    pub fn from_writer(out: Box<dyn AsyncWrite + Send + Unpin>) -> Self {
        Self { out: BufWriter::new(out), written: 0, sync: None }
    }

    /// Writes one delivery.
    ///
    /// # Errors
    /// The write failed.
    pub async fn write(&mut self, d: &Delivery<'_>) -> io::Result<()> {
        self.out.write_all(render(d).as_bytes()).await?;
        self.written += 1;
        Ok(())
    }

    /// Writes the record of an expired command.
    ///
    /// # Errors
    /// The write failed.
    pub async fn write_command(&mut self, c: &ExpiredCommand<'_>) -> io::Result<()> {
        self.out.write_all(render_command(c).as_bytes()).await
    }

    /// Flushes buffered lines to the operating system and, when the sink was opened with
    /// `fsync`, syncs the file: once it returns, the lines written so far are committed.
    ///
    /// # Errors
    /// The write failed.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.out.flush().await?;
        if let Some(f) = &self.sync {
            f.sync_data().await?;
        }
        Ok(())
    }

    /// Lines written so far.
    #[must_use]
    pub const fn written(&self) -> u64 {
        self.written
    }
}

async fn open_append(path: &Path) -> io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new().create(true).append(true).open(path).await
}

/// Whether the file is empty or ends with a newline.
fn ends_with_newline(path: &Path) -> io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(true);
    }
    f.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_carries_every_field_and_text_only_when_utf8() {
        let device = NodeId([0xab; 16]);
        let at = UNIX_EPOCH + std::time::Duration::from_millis(1_795_850_000_123);
        let d = Delivery {
            device: &device,
            stream: None,
            channel: 3,
            id: 9,
            via: Via::Direct,
            received_at: at,
            payload: b"hi",
        };
        let v: serde_json::Value = serde_json::from_str(render(&d).trim_end()).unwrap();
        assert_eq!(v["device"], "ab".repeat(16));
        assert_eq!((v["channel"].as_u64(), v["id"].as_u64()), (Some(3), Some(9)));
        assert_eq!(v["via"], "direct");
        assert!(v.get("relay").is_none());
        assert_eq!(v["received_at_ms"].as_u64(), Some(1_795_850_000_123));
        assert_eq!((v["payload_hex"].as_str(), v["payload_text"].as_str()), (Some("6869"), Some("hi")));

        let relay = NodeId([1; 16]);
        let d = Delivery { via: Via::Relay(relay), payload: &[0xff, 0xfe], ..d };
        let line = render(&d);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!((v["via"].as_str(), v["relay"].as_str()), (Some("relay"), Some("01".repeat(16).as_str())));
        assert!(v.get("payload_text").is_none());
        assert_eq!(v["payload_hex"], "fffe");
    }

    #[test]
    fn a_line_names_the_stream_and_a_command_record_its_outcome() {
        let device = NodeId([0xab; 16]);
        let at = UNIX_EPOCH + std::time::Duration::from_millis(5);
        let d = Delivery {
            device: &device,
            stream: Some([0x0f, 1, 2, 3, 4, 5, 6, 7]),
            channel: 3,
            id: 9,
            via: Via::Direct,
            received_at: at,
            payload: b"hi",
        };
        let v: serde_json::Value = serde_json::from_str(render(&d).trim_end()).unwrap();
        assert_eq!((v["record"].as_str(), v["stream"].as_str()), (Some("message"), Some("0f01020304050607")));
        for (unconfirmed, outcome) in [(false, "expired"), (true, "expired_unconfirmed")] {
            let c = ExpiredCommand { device: &device, channel: 1, id: 4, unconfirmed, at, payload: b"on" };
            let line = render_command(&c);
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
            let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
            assert_eq!(v["record"], "command");
            assert_eq!(v["device"], "ab".repeat(16));
            assert_eq!((v["channel"].as_u64(), v["id"].as_u64()), (Some(1), Some(4)));
            assert_eq!((v["outcome"].as_str(), v["at_ms"].as_u64()), (Some(outcome), Some(5)));
            assert_eq!(v["payload_text"], "on");
        }
    }

    #[tokio::test]
    async fn a_scan_resumes_each_devices_latest_stream_and_skips_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        assert_eq!(scan(&path).unwrap(), Resume::default(), "a missing file is an empty one");
        let (a, b) = (NodeId([1; 16]), NodeId([2; 16]));
        let (s1, s2) = ([1u8; 8], [2u8; 8]);
        let mut sink = Sink::open(&SinkTarget::File(path.clone())).await.unwrap();
        let line = |device, stream, channel, id| Delivery {
            device,
            stream,
            channel,
            id,
            via: Via::Direct,
            received_at: SystemTime::now(),
            payload: b"p",
        };
        for d in [
            line(&a, Some(s1), 0, 0),
            line(&a, Some(s1), 0, 1),
            line(&a, Some(s1), 5, 7),
            line(&b, Some(s1), 0, 3),
            // Device a restarted: its new stream starts over.
            line(&a, Some(s2), 0, 0),
            // Best effort: no stream, not resumed.
            line(&b, None, 9, 100),
        ] {
            sink.write(&d).await.unwrap();
        }
        sink.flush().await.unwrap();
        drop(sink);
        // A crash mid-line leaves a torn record.
        let mut torn = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut torn, br#"{"record":"message","device":"0202"#).unwrap();
        drop(torn);
        let r = scan(&path).unwrap();
        assert_eq!(r.devices.len(), 2);
        assert_eq!(r.devices[&a], (s2, HashMap::from([(0, 1)])));
        assert_eq!(r.devices[&b], (s1, HashMap::from([(0, 4)])));
        assert_eq!(r.skipped, 2, "the best-effort line and the torn one");

        // Appending after the torn line starts on a line of its own.
        let mut sink = Sink::open_synced(&SinkTarget::File(path.clone()), true).await.unwrap();
        sink.write(&line(&b, Some(s1), 0, 4)).await.unwrap();
        sink.flush().await.unwrap();
        let r = scan(&path).unwrap();
        assert_eq!(r.devices[&b], (s1, HashMap::from([(0, 5)])));
        assert_eq!(r.skipped, 2);
    }

    #[tokio::test]
    async fn a_file_sink_appends_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let device = NodeId([2; 16]);
        for round in 0..2u64 {
            let mut sink = Sink::open(&SinkTarget::File(path.clone())).await.unwrap();
            let d = Delivery {
                device: &device,
                stream: None,
                channel: 0,
                id: round,
                via: Via::Direct,
                received_at: SystemTime::now(),
                payload: b"x",
            };
            sink.write(&d).await.unwrap();
            sink.flush().await.unwrap();
            assert_eq!(sink.written(), 1);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let ids: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [0, 1]);
    }
}
