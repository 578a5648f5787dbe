//! The cloud role's local control interface: JSON lines on a Unix socket, one command per
//! line, one answer per command.
//!
//! ```text
//! → {"device":"5b0e…","channel":1,"payload_text":"open valve"}
//! ← {"channel":1,"id":4,"ok":true}
//! → {"device":"nope"}
//! ← {"ok":false,"error":"device: expected 32 hex digits"}
//! ```
//!
//! A command names the device by node id (32 hex digits, spec §15.2) and carries the
//! payload as `payload_text` (UTF-8) or `payload_hex`; `channel` defaults to 0. `ok` means
//! the command was accepted into the device's outbox (spec §17.7), not that the device has
//! it; `channel` and `id` name it as the sink's `command` record does if it expires.
//!
//! The socket is created with mode 0600 (only the service's user may command devices); a
//! stale socket file from an earlier run is replaced. Lines are at most
//! [`MAX_LINE`] bytes and at most [`MAX_CLIENTS`] clients are served at once.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use veil_protocol::trust::{NodeId, NODE_ID_LEN};

/// Longest command line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Clients served at once; more wait for a free slot.
pub const MAX_CLIENTS: usize = 16;

/// A command for a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlCommand {
    /// The device.
    pub device: NodeId,
    /// Channel.
    pub channel: u16,
    /// Payload.
    pub payload: Bytes,
}

/// A command with the place to answer it.
#[derive(Debug)]
pub struct ControlRequest {
    /// The command.
    pub command: ControlCommand,
    /// `Ok` with the command's id in its channel once accepted; `Err` with a reason for the
    /// client.
    pub reply: oneshot::Sender<Result<u64, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    device: String,
    #[serde(default)]
    channel: u16,
    payload_text: Option<String>,
    payload_hex: Option<String>,
}

/// Parses one command line.
///
/// # Errors
/// What is wrong with it, naming the field.
pub fn parse(line: &str) -> Result<ControlCommand, String> {
    let w: Wire = serde_json::from_str(line).map_err(|e| format!("invalid command: {e}"))?;
    let mut id = [0u8; NODE_ID_LEN];
    hex::decode_to_slice(w.device.as_bytes(), &mut id)
        .map_err(|_| format!("device: expected {} hex digits", NODE_ID_LEN * 2))?;
    let payload = match (w.payload_text, w.payload_hex) {
        (Some(t), None) => Bytes::from(t),
        (None, Some(h)) => Bytes::from(hex::decode(h).map_err(|e| format!("payload_hex: {e}"))?),
        (None, None) => return Err("payload_text or payload_hex is required".into()),
        (Some(_), Some(_)) => return Err("give payload_text or payload_hex, not both".into()),
    };
    Ok(ControlCommand { device: NodeId(id), channel: w.channel, payload })
}

/// The answer line (without its newline): `channel` is the command's, when one was parsed.
fn answer(result: &Result<(u16, u64), String>) -> String {
    match result {
        Ok((channel, id)) => serde_json::json!({ "ok": true, "channel": channel, "id": id }).to_string(),
        Err(e) => serde_json::json!({ "ok": false, "error": e }).to_string(),
    }
}

/// The control socket, bound.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path` (replacing a stale socket file) with mode 0600.
    ///
    /// # Errors
    /// The socket cannot be bound, or `path` exists and is not a socket.
    pub fn bind(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self { listener, path: path.to_owned() })
    }

    /// Serves clients until `stop` is cancelled, passing every valid command to `requests`;
    /// removes the socket file when done.
    pub async fn serve(self, requests: mpsc::Sender<ControlRequest>, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                a = self.listener.accept() => a,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { break };
            let requests = requests.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = client(stream, requests) => {}
                }
                drop(slot);
            });
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn client(stream: UnixStream, requests: mpsc::Sender<ControlRequest>) {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // One byte past the limit tells an over-long line from one that fits exactly.
        let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX).saturating_add(1);
        match (&mut reader).take(limit).read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let complete = buf.last() == Some(&b'\n');
        if !complete && buf.len() > MAX_LINE {
            let _ = w.write_all(line_of(&Err(format!("line longer than {MAX_LINE} bytes"))).as_bytes()).await;
            return;
        }
        let Ok(line) = std::str::from_utf8(&buf) else {
            if w.write_all(line_of(&Err("the line is not UTF-8".to_owned())).as_bytes()).await.is_err() {
                return;
            }
            continue;
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let result = match parse(line) {
            Ok(command) => {
                let channel = command.channel;
                let (reply, rx) = oneshot::channel();
                if requests.send(ControlRequest { command, reply }).await.is_err() {
                    Err("shutting down".to_owned())
                } else {
                    rx.await.unwrap_or_else(|_| Err("shutting down".to_owned())).map(|id| (channel, id))
                }
            }
            Err(e) => Err(e),
        };
        if w.write_all(line_of(&result).as_bytes()).await.is_err() {
            return;
        }
    }
}

fn line_of(result: &Result<(u16, u64), String>) -> String {
    let mut s = answer(result);
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_errors_name_the_field() {
        let dev = "ab".repeat(16);
        let c = parse(&format!(r#"{{"device":"{dev}","channel":2,"payload_text":"on"}}"#)).unwrap();
        assert_eq!((c.device, c.channel, &c.payload[..]), (NodeId([0xab; 16]), 2, &b"on"[..]));
        let c = parse(&format!(r#"{{"device":"{dev}","payload_hex":"00ff"}}"#)).unwrap();
        assert_eq!((c.channel, &c.payload[..]), (0, &[0, 0xff][..]));
        for (line, needle) in [
            (r#"{"device":"abc","payload_text":"x"}"#.to_owned(), "device:"),
            (format!(r#"{{"device":"{dev}"}}"#), "payload_text or payload_hex"),
            (format!(r#"{{"device":"{dev}","payload_hex":"zz"}}"#), "payload_hex:"),
            (format!(r#"{{"device":"{dev}","payload_text":"a","payload_hex":"00"}}"#), "not both"),
            (format!(r#"{{"device":"{dev}","payload_text":"a","extra":1}}"#), "unknown field"),
            ("not json".to_owned(), "invalid command"),
        ] {
            let e = parse(&line).unwrap_err();
            assert!(e.contains(needle), "{line}: {e}");
        }
    }

    #[tokio::test]
    async fn the_socket_answers_each_line_and_passes_valid_commands_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        // A stale socket file from an earlier run is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let socket = ControlSocket::bind(&path).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let stop = CancellationToken::new();
        let server = tokio::spawn(socket.serve(tx, stop.clone()));
        // The service side: refuses channel 9, accepts the rest.
        let service = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(req) = rx.recv().await {
                let r = if req.command.channel == 9 { Err("no such channel".to_owned()) } else { Ok(41) };
                seen.push(req.command);
                let _ = req.reply.send(r);
            }
            seen
        });
        let stream = UnixStream::connect(&path).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        let dev = "01".repeat(16);
        let script = [
            format!(r#"{{"device":"{dev}","payload_text":"a"}}"#),
            "garbage".to_owned(),
            format!(r#"{{"device":"{dev}","channel":9,"payload_text":"b"}}"#),
        ];
        let mut answers = Vec::new();
        for line in &script {
            w.write_all(format!("{line}\n").as_bytes()).await.unwrap();
            let a = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line()).await.unwrap();
            answers.push(a.unwrap().unwrap());
        }
        assert_eq!(answers[0], r#"{"channel":0,"id":41,"ok":true}"#);
        assert!(answers[1].contains(r#""ok":false"#) && answers[1].contains("invalid command"), "{}", answers[1]);
        assert!(answers[2].contains("no such channel"), "{}", answers[2]);
        // An over-long line is answered and the client dropped.
        w.write_all(&vec![b'x'; MAX_LINE + 10]).await.unwrap();
        w.write_all(b"\n").await.unwrap();
        let a = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line()).await.unwrap();
        assert!(a.unwrap().unwrap().contains("longer than"));
        stop.cancel();
        server.await.unwrap();
        let seen = service.await.unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(&seen[0].payload[..], b"a");
        assert!(!path.exists(), "the socket file is removed on shutdown");
    }
}
