//! Key files, certificate and revocation-list files, and allowlists (spec §15.10).
//!
//! A key file is two lines of text:
//!
//! ```text
//! veil-key 1 <kind>
//! <64 lowercase hex digits>
//! ```
//!
//! Every file is written atomically: to a temporary file in the target's directory, synced,
//! then renamed over the target. Secret key files get mode 0600 and are refused on reading if
//! group or others have any permission on them, as ssh refuses such private keys.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use veil_protocol::trust::{Allowlist, TrustError};
use veil_protocol::PublicKey;
use zeroize::Zeroizing;

/// The key-file format version this build reads and writes.
pub const KEY_FILE_VERSION: u32 = 1;
/// Largest key file accepted (a valid one is at most 87 bytes).
pub const MAX_KEY_FILE_LEN: u64 = 256;
/// Largest allowlist file accepted.
pub const MAX_ALLOWLIST_LEN: u64 = 1 << 20;
const MAGIC: &str = "veil-key";

/// What a key file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A node's X25519 static secret key.
    NodeSecret,
    /// A node's X25519 public key.
    NodePublic,
    /// A CA's Ed25519 secret seed.
    CaSecret,
    /// A CA's Ed25519 public key.
    CaPublic,
}

impl KeyKind {
    const ALL: [Self; 4] = [Self::NodeSecret, Self::NodePublic, Self::CaSecret, Self::CaPublic];

    /// The name in the header line.
    pub const fn name(self) -> &'static str {
        match self {
            Self::NodeSecret => "node-secret",
            Self::NodePublic => "node-public",
            Self::CaSecret => "ca-secret",
            Self::CaPublic => "ca-public",
        }
    }

    /// Whether the file holds a secret (mode 0600, permission check on reading).
    pub const fn is_secret(self) -> bool {
        matches!(self, Self::NodeSecret | Self::CaSecret)
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a key, certificate, list or allowlist file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The operating system refused.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Larger than any valid file of its kind.
    #[error("{}: larger than {max} bytes, not a valid file of this kind", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        max: u64,
    },
    /// The first line is not `veil-key <version> <kind>`.
    #[error("{}: not a Veil key file (the first line must be `veil-key 1 <kind>`)", path.display())]
    BadHeader {
        /// The file.
        path: PathBuf,
    },
    /// A key-file version this build does not read.
    #[error("{}: key file version {version} is not supported (this build reads version {KEY_FILE_VERSION})", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found.
        version: String,
    },
    /// A kind this build does not know.
    #[error("{}: unknown key kind {kind:?}", path.display())]
    UnknownKind {
        /// The file.
        path: PathBuf,
        /// The kind found.
        kind: String,
    },
    /// Another kind of key than the command needs.
    #[error("{}: holds a {found} key, but a {expected} key is needed", path.display())]
    WrongKind {
        /// The file.
        path: PathBuf,
        /// What was needed.
        expected: KeyKind,
        /// What the file holds.
        found: KeyKind,
    },
    /// The file ends before its key line is complete.
    #[error("{}: truncated key file (expected a header line and a key line, each ending in a newline)", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
    },
    /// The key line is not 64 lowercase hex digits.
    #[error("{}: the key line must be exactly 64 lowercase hex digits", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
    },
    /// Something follows the key line.
    #[error("{}: unexpected data after the key line", path.display())]
    TrailingData {
        /// The file.
        path: PathBuf,
    },
    /// A secret key file that group or others may access.
    #[error(
        "permissions {mode:04o} for '{}' are too open: a private key file must not be accessible by group or \
         others; this key is ignored (fix with `chmod 600 {}`)",
        path.display(),
        path.display()
    )]
    PermissionsTooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The target exists and overwriting was not asked for.
    #[error("{}: already exists (pass --force to replace it)", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A certificate, chain or revocation list that does not decode or verify.
    #[error("{}: {source}", path.display())]
    Trust {
        /// The file.
        path: PathBuf,
        /// The trust layer's error.
        source: TrustError,
    },
    /// A line of an allowlist that does not parse.
    #[error("{}:{line}: {what}", path.display())]
    Allowlist {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: &'static str,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io { path: path.to_path_buf(), source }
}

/// Reads at most `max` bytes of `path`; a longer file is [`FileError::TooLarge`].
///
/// # Errors
/// [`FileError::Io`], [`FileError::TooLarge`].
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    let file = File::open(path).map_err(io_err(path))?;
    read_from(file, path, max).map(|z| z.to_vec())
}

fn read_from(file: File, path: &Path, max: u64) -> Result<Zeroizing<Vec<u8>>, FileError> {
    let mut buf = Zeroizing::new(Vec::new());
    file.take(max + 1).read_to_end(&mut buf).map_err(io_err(path))?;
    if buf.len() as u64 > max {
        return Err(FileError::TooLarge { path: path.to_path_buf(), max });
    }
    Ok(buf)
}

#[cfg(unix)]
fn check_private_mode(file: &File, path: &Path) -> Result<(), FileError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = file.metadata().map_err(io_err(path))?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(FileError::PermissionsTooOpen { path: path.to_path_buf(), mode });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private_mode(_file: &File, _path: &Path) -> Result<(), FileError> {
    Ok(())
}

/// Parses the text of a key file (spec §15.10).
///
/// # Errors
/// The format errors of [`FileError`].
pub fn parse_key(text: &[u8], path: &Path, expected: KeyKind) -> Result<Zeroizing<[u8; 32]>, FileError> {
    let p = || path.to_path_buf();
    let Some(nl) = text.iter().position(|&b| b == b'\n') else {
        return Err(if text.starts_with(MAGIC.as_bytes()) {
            FileError::Truncated { path: p() }
        } else {
            FileError::BadHeader { path: p() }
        });
    };
    let header = std::str::from_utf8(&text[..nl]).map_err(|_| FileError::BadHeader { path: p() })?;
    let mut parts = header.split(' ');
    if parts.next() != Some(MAGIC) {
        return Err(FileError::BadHeader { path: p() });
    }
    let (Some(version), Some(kind), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(FileError::BadHeader { path: p() });
    };
    if version != KEY_FILE_VERSION.to_string() {
        return Err(FileError::UnsupportedVersion { path: p(), version: version.to_owned() });
    }
    let found = KeyKind::ALL
        .into_iter()
        .find(|k| k.name() == kind)
        .ok_or_else(|| FileError::UnknownKind { path: p(), kind: kind.to_owned() })?;
    if found != expected {
        return Err(FileError::WrongKind { path: p(), expected, found });
    }
    let rest = &text[nl + 1..];
    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
        return Err(FileError::Truncated { path: p() });
    };
    if end != 64 {
        return Err(if end < 64 && rest[..end].iter().all(u8::is_ascii_hexdigit) {
            FileError::Truncated { path: p() }
        } else {
            FileError::BadKey { path: p() }
        });
    }
    let line = &rest[..end];
    if !line.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
        return Err(FileError::BadKey { path: p() });
    }
    let mut key = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(line, key.as_mut()).map_err(|_| FileError::BadKey { path: p() })?;
    if rest.len() != end + 1 {
        return Err(FileError::TrailingData { path: p() });
    }
    Ok(key)
}

/// Reads a key file of kind `expected`. A secret key file must not be accessible by group
/// or others.
///
/// # Errors
/// Every [`FileError`] of reading and parsing.
pub fn read_key(path: &Path, expected: KeyKind) -> Result<Zeroizing<[u8; 32]>, FileError> {
    let file = File::open(path).map_err(io_err(path))?;
    if expected.is_secret() {
        // Checked before reading a byte, like ssh.
        check_private_mode(&file, path)?;
    }
    let text = read_from(file, path, MAX_KEY_FILE_LEN)?;
    parse_key(&text, path, expected)
}

/// The text of a key file.
pub fn format_key(kind: KeyKind, key: &[u8; 32]) -> Zeroizing<String> {
    let mut s = Zeroizing::new(format!("{MAGIC} {KEY_FILE_VERSION} {}\n", kind.name()));
    let hex = Zeroizing::new(hex::encode(key));
    s.push_str(&hex);
    s.push('\n');
    s
}

/// Writes a key file atomically; secret kinds get mode 0600, public ones 0644.
///
/// # Errors
/// [`FileError::Exists`] if `path` exists and `force` is not set, [`FileError::Io`].
pub fn write_key(path: &Path, kind: KeyKind, key: &[u8; 32], force: bool) -> Result<(), FileError> {
    let text = format_key(kind, key);
    write_atomic(path, text.as_bytes(), if kind.is_secret() { 0o600 } else { 0o644 }, force)
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync,
/// rename), with permission bits `mode`.
///
/// # Errors
/// [`FileError::Exists`] if `path` exists and `force` is not set, [`FileError::Io`].
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32, force: bool) -> Result<(), FileError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // tempfile creates the file with mode 0600, so a secret is never readable by others,
    // not even for a moment.
    let mut tmp = tempfile::Builder::new().prefix(".veil-tmp").tempfile_in(dir).map_err(io_err(dir))?;
    tmp.write_all(bytes).map_err(io_err(tmp.path()))?;
    set_mode(tmp.as_file(), mode).map_err(io_err(path))?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    if force {
        tmp.persist(path).map_err(|e| FileError::Io { path: path.to_path_buf(), source: e.error })?;
    } else {
        tmp.persist_noclobber(path).map_err(|e| {
            if e.error.kind() == io::ErrorKind::AlreadyExists {
                FileError::Exists { path: path.to_path_buf() }
            } else {
                FileError::Io { path: path.to_path_buf(), source: e.error }
            }
        })?;
    }
    // Make the rename itself durable.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(unix)]
fn set_mode(file: &File, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_file: &File, _mode: u32) -> io::Result<()> {
    Ok(())
}

/// Parses an allowlist file (spec §15.10): `<64 hex digits> <name>` per line; `#` comments
/// and blank lines allowed.
///
/// # Errors
/// [`FileError::Allowlist`] naming the first bad line, and the errors of reading.
pub fn read_allowlist(path: &Path) -> Result<Allowlist, FileError> {
    let bytes = read_bounded(path, MAX_ALLOWLIST_LEN)?;
    let bad = |line, what| FileError::Allowlist { path: path.to_path_buf(), line, what };
    let text = std::str::from_utf8(&bytes).map_err(|_| bad(1, "not UTF-8"))?;
    let mut list = Allowlist::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, name) = line.split_once(' ').ok_or_else(|| bad(i + 1, "expected `<64 hex digits> <name>`"))?;
        let mut k = [0u8; 32];
        hex::decode_to_slice(key, &mut k).map_err(|_| bad(i + 1, "the key must be 64 hex digits"))?;
        list.insert(PublicKey(k), name.trim())
            .map_err(|_| bad(i + 1, "invalid name (1 to 64 bytes, no control characters)"))?;
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn round_trip_with_modes() {
        let d = dir();
        let p = d.path().join("node.key");
        write_key(&p, KeyKind::NodeSecret, &[7; 32], false).unwrap();
        assert_eq!(*read_key(&p, KeyKind::NodeSecret).unwrap(), [7; 32]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(matches!(write_key(&p, KeyKind::NodeSecret, &[8; 32], false), Err(FileError::Exists { .. })));
        write_key(&p, KeyKind::NodeSecret, &[8; 32], true).unwrap();
        assert_eq!(*read_key(&p, KeyKind::NodeSecret).unwrap(), [8; 32]);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn world_or_group_readable_secret_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir();
        let p = d.path().join("ca.key");
        write_key(&p, KeyKind::CaSecret, &[1; 32], false).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o610] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let err = read_key(&p, KeyKind::CaSecret).unwrap_err();
            assert!(matches!(err, FileError::PermissionsTooOpen { mode: m, .. } if m == mode), "{err}");
            assert!(err.to_string().contains("too open"), "{err}");
        }
        // A public key file may be world-readable.
        let q = d.path().join("ca.pub");
        write_key(&q, KeyKind::CaPublic, &[1; 32], false).unwrap();
        assert!(read_key(&q, KeyKind::CaPublic).is_ok());
    }

    #[test]
    fn malformed_and_truncated_files() {
        let p = Path::new("k");
        let good = format_key(KeyKind::NodePublic, &[0xab; 32]);
        let good = good.as_bytes();
        let parse = |t: &[u8]| parse_key(t, p, KeyKind::NodePublic);
        assert!(parse(good).is_ok());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "BadHeader"),
            (b"veil-key 1 node-public".to_vec(), "Truncated"),
            (good[..good.len() - 1].to_vec(), "Truncated"),
            (good[..40].to_vec(), "Truncated"),
            (b"ssh-ed25519 AAAA\n".to_vec(), "BadHeader"),
            (b"veil-key 2 node-public\n".to_vec(), "UnsupportedVersion"),
            (b"veil-key 1 gizmo\n".to_vec(), "UnknownKind"),
            (b"veil-key 1 node-public extra\n".to_vec(), "BadHeader"),
            (format_key(KeyKind::NodeSecret, &[1; 32]).as_bytes().to_vec(), "WrongKind"),
            ([good, b"\n"].concat(), "TrailingData"),
            (good.to_ascii_uppercase(), "BadHeader"),
            ([&good[..23], &[b'Z'; 64][..], b"\n"].concat(), "BadKey"),
            ([&good[..23], &[b'A'; 64][..], b"\n"].concat(), "BadKey"),
            ([&good[..23], &[b'a'; 66][..], b"\n"].concat(), "BadKey"),
        ];
        for (text, want) in cases {
            let err = parse(&text).unwrap_err();
            assert!(format!("{err:?}").starts_with(want), "{:?}: {err:?}", String::from_utf8_lossy(&text));
        }
    }

    #[test]
    fn oversized_file_is_refused_unread() {
        let d = dir();
        let p = d.path().join("big.pub");
        fs::write(&p, vec![b'a'; 10_000]).unwrap();
        assert!(matches!(read_key(&p, KeyKind::NodePublic), Err(FileError::TooLarge { .. })));
    }

    #[test]
    fn allowlist_file() {
        let d = dir();
        let p = d.path().join("allow");
        let k = hex::encode([3u8; 32]);
        fs::write(&p, format!("# fleet\n\n{k} sensor 1\n")).unwrap();
        let list = read_allowlist(&p).unwrap();
        assert_eq!(list.check(&PublicKey([3; 32])), Ok("sensor 1"));
        fs::write(&p, format!("{k}\n")).unwrap();
        assert!(matches!(read_allowlist(&p), Err(FileError::Allowlist { line: 1, .. })));
        fs::write(&p, "zz name\n").unwrap();
        assert!(matches!(read_allowlist(&p), Err(FileError::Allowlist { line: 1, .. })));
    }
}
