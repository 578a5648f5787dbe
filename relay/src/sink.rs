//! Where the cloud role delivers device messages: JSON lines, one message per line, on
//! standard output or appended to a file.
//!
//! A line looks like this (one line; wrapped here):
//!
//! ```text
//! {"device":"5b0e…","channel":0,"id":17,"via":"relay","relay":"9c41…",
//!  "received_at_ms":1795850000123,"payload_hex":"48656c6c6f","payload_text":"Hello"}
//! ```
//!
//! - `device`: the sender's node id (32 hex digits, spec §15.2), authenticated end to end.
//! - `channel`, `id`: the message's channel and the sender's id for it on that channel
//!   (spec §9.2).
//! - `via`: `"direct"` (the device's own link session) or `"relay"` (an end-to-end session
//!   through a gateway, whose node id is `relay`).
//! - `received_at_ms`: when the cloud received it, Unix milliseconds.
//! - `payload_hex`: the payload; `payload_text`: the same payload when it is valid UTF-8.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
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
    device: String,
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
        device: d.device.to_string(),
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

/// A JSON-lines writer. Buffered: call [`Sink::flush`] when the burst is over.
pub struct Sink {
    out: BufWriter<Box<dyn AsyncWrite + Send + Unpin>>,
    written: u64,
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
        let out: Box<dyn AsyncWrite + Send + Unpin> = match target {
            SinkTarget::Stdout => Box::new(tokio::io::stdout()),
            SinkTarget::File(path) => Box::new(open_append(path).await?),
        };
        Ok(Self::from_writer(out))
    }

    /// A sink writing to `out` (tests, embedding).
    #[must_use]
    pub fn from_writer(out: Box<dyn AsyncWrite + Send + Unpin>) -> Self {
        Self { out: BufWriter::new(out), written: 0 }
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

    /// Flushes buffered lines.
    ///
    /// # Errors
    /// The write failed.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.out.flush().await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_carries_every_field_and_text_only_when_utf8() {
        let device = NodeId([0xab; 16]);
        let at = UNIX_EPOCH + std::time::Duration::from_millis(1_795_850_000_123);
        let d = Delivery { device: &device, channel: 3, id: 9, via: Via::Direct, received_at: at, payload: b"hi" };
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

    #[tokio::test]
    async fn a_file_sink_appends_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let device = NodeId([2; 16]);
        for round in 0..2u64 {
            let mut sink = Sink::open(&SinkTarget::File(path.clone())).await.unwrap();
            let d = Delivery {
                device: &device,
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
