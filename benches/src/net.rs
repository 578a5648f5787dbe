//! Loopback pieces of the transport benchmarks: the tokio runtime they all share, Veil endpoint
//! pairs, the TLS peer (tokio-rustls on ring, a self-signed certificate from rcgen), the
//! u16-length-prefixed framing the TLS and plain TCP peers use, and the process's resident memory.
//!
//! Everything listens on 127.0.0.1 and is created by the benchmark itself.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use rustls::client::Resumption;
use rustls::crypto::ring as ring_provider;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::runtime::Runtime;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::codec::{Decoder, LengthDelimitedCodec};
use veil_protocol::{Pattern, StaticKeypair, Suite};
use veil_transports::{Authorizer, Connection, Endpoint, EndpointLimits};

/// Why a benchmark's setup or transfer failed. Any of these means the benchmark is broken (or
/// the machine is out of sockets), never a measurement.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// A socket operation failed.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// Veil refused or failed.
    #[error("veil: {0}")]
    Veil(#[from] veil_transports::Error),
    /// rustls refused its configuration.
    #[error("rustls: {0}")]
    Tls(#[from] rustls::Error),
    /// rcgen could not make the certificate.
    #[error("rcgen: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A task of the benchmark panicked or was cancelled.
    #[error("task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The receiving side got something other than what was sent.
    #[error("benchmark transfer broken: {0}")]
    Broken(String),
}

/// Worker threads of the benchmark runtime: one per core of the 2-core machines the figures
/// are recorded on. Both ends of every connection share it, as a client and a server on one
/// host would share the cores.
pub const WORKER_THREADS: usize = 2;

/// The multi-threaded tokio runtime every transport benchmark runs in.
///
/// # Errors
/// If the runtime cannot start its threads.
pub fn runtime() -> io::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(WORKER_THREADS).enable_all().build()
}

/// The loopback address with a port chosen by the kernel.
#[must_use]
pub fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A static key pair derived from `seed` (benchmarks are reproducible; the keys are not secret).
#[must_use]
pub fn keypair(seed: u64) -> StaticKeypair {
    let mut secret = [0u8; 32];
    StdRng::seed_from_u64(seed).fill_bytes(&mut secret);
    StaticKeypair::from_secret_bytes(secret)
}

/// Limits for endpoints that open thousands of connections from 127.0.0.1: no per-address
/// handshake rate limit, room for `max_connections` connections, and enough concurrent
/// handshakes for a connection storm.
#[must_use]
pub fn open_limits(max_connections: usize) -> EndpointLimits {
    let mut l = EndpointLimits::default();
    l.handshake_rate_per_ip = 1e9;
    l.handshake_burst_per_ip = u32::MAX;
    l.max_connections = max_connections;
    l.max_handshakes = 4_096;
    l.accept_queue = 1_024;
    l.tcp_backlog = 4_096;
    l
}

/// A Veil server and a client endpoint on loopback, both using `pattern` and `suite`, each
/// allowing the other.
#[derive(Debug, Clone)]
pub struct VeilPeers {
    /// Listens on TCP and UDP.
    pub server: Endpoint,
    /// Connects out; has its own UDP socket.
    pub client: Endpoint,
    /// `Some(server key)` when `pattern` needs it in advance.
    pub server_key: Option<veil_protocol::PublicKey>,
}

impl VeilPeers {
    /// Binds both endpoints.
    ///
    /// # Errors
    /// If a socket cannot be bound.
    pub async fn bind(pattern: Pattern, suite: Suite, max_connections: usize) -> Result<Self, NetError> {
        Self::bind_with_limits(pattern, suite, open_limits(max_connections)).await
    }

    /// [`VeilPeers::bind`] with other limits on both endpoints (`open_limits` gives the ones
    /// `bind` uses).
    ///
    /// # Errors
    /// If a socket cannot be bound.
    pub async fn bind_with_limits(pattern: Pattern, suite: Suite, limits: EndpointLimits) -> Result<Self, NetError> {
        Self::bind_each(pattern, suite, limits.clone(), limits).await
    }

    /// [`VeilPeers::bind`] with the server's and the client's own limits.
    ///
    /// # Errors
    /// If a socket cannot be bound.
    pub async fn bind_each(
        pattern: Pattern,
        suite: Suite,
        server_limits: EndpointLimits,
        client_limits: EndpointLimits,
    ) -> Result<Self, NetError> {
        let server_id = keypair(1);
        let client_id = keypair(2);
        let server_pub = *server_id.public();
        let client_pub = *client_id.public();
        let server = Endpoint::builder(server_id)
            .suite(suite)
            .authorizer(Authorizer::allowlist([client_pub]))
            .limits(server_limits)
            .listen_tcp(localhost())
            .bind_udp(localhost())
            .bind()
            .await?;
        let client = Endpoint::builder(client_id)
            .pattern(pattern)
            .suite(suite)
            .authorizer(Authorizer::allowlist([server_pub]))
            .limits(client_limits)
            .bind_udp(localhost())
            .bind()
            .await?;
        let server_key = pattern.initiator_knows_responder().then_some(server_pub);
        Ok(Self { server, client, server_key })
    }

    /// The server's TCP address.
    ///
    /// # Errors
    /// Never for endpoints made by [`VeilPeers::bind`].
    pub fn tcp_addr(&self) -> Result<SocketAddr, NetError> {
        self.server.local_tcp_addr().ok_or_else(|| NetError::Broken("server not listening on TCP".into()))
    }

    /// The server's UDP address.
    ///
    /// # Errors
    /// Never for endpoints made by [`VeilPeers::bind`].
    pub fn udp_addr(&self) -> Result<SocketAddr, NetError> {
        self.server.local_udp_addr().ok_or_else(|| NetError::Broken("server has no UDP socket".into()))
    }

    /// One connection over `transport`: `(client end, server end)`. Only call it while no
    /// other connection to this server is being set up, or the ends may be paired wrongly.
    ///
    /// # Errors
    /// The first error of either side.
    pub async fn connect(&self, transport: veil_transports::Transport) -> Result<(Connection, Connection), NetError> {
        let addr = match transport {
            veil_transports::Transport::Tcp => self.tcp_addr()?,
            _ => self.udp_addr()?,
        };
        let (c, s) = tokio::try_join!(self.client.connect(transport, addr, self.server_key), self.server.accept())?;
        Ok((c, s))
    }
}

/// The TLS 1.3 cipher suite that uses the same AEAD as a Veil suite.
///
/// Veil's `25519_AESGCM_SHA256` is AES-256-GCM (Noise's `AESGCM`), so its TLS counterpart is
/// `TLS13_AES_256_GCM_SHA384`; `25519_ChaChaPoly_BLAKE2s` pairs with
/// `TLS13_CHACHA20_POLY1305_SHA256`. Only the hash differs (TLS 1.3 has no BLAKE2s suite and pairs
/// AES-256 with SHA-384); it runs in the handshake only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsSuite {
    /// `TLS13_CHACHA20_POLY1305_SHA256`.
    ChaCha20Poly1305,
    /// `TLS13_AES_256_GCM_SHA384`.
    Aes256Gcm,
}

impl TlsSuite {
    /// The suite with the same AEAD as `suite`.
    #[must_use]
    pub fn matching(suite: Suite) -> Self {
        match suite {
            Suite::AesGcmSha256 => Self::Aes256Gcm,
            _ => Self::ChaCha20Poly1305,
        }
    }

    /// The IANA name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::ChaCha20Poly1305 => "TLS13_CHACHA20_POLY1305_SHA256",
            Self::Aes256Gcm => "TLS13_AES_256_GCM_SHA384",
        }
    }

    fn rustls(self) -> SupportedCipherSuite {
        match self {
            Self::ChaCha20Poly1305 => ring_provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            Self::Aes256Gcm => ring_provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
        }
    }
}

/// Both sides of the TLS peer: TLS 1.3 only, one cipher suite, X25519 key exchange (Veil's DH),
/// rustls's ring provider (Veil's server AEAD), a self-signed ECDSA P-256 certificate for
/// `localhost` made by rcgen (its default key type, the common choice for TLS servers), server
/// authentication only, and no resumption: no tickets, no session cache, so every handshake is
/// a full one.
#[derive(Clone)]
pub struct Tls {
    /// Server side.
    pub acceptor: TlsAcceptor,
    /// Client side.
    pub connector: TlsConnector,
    /// The name the certificate is issued for.
    pub server_name: ServerName<'static>,
    /// The server's certificate (DER), which the client trusts.
    pub certificate: CertificateDer<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}

impl Tls {
    /// A fresh certificate and both configurations for `suite`.
    ///
    /// # Errors
    /// If rcgen or rustls refuse (a bug in this function).
    pub fn new(suite: TlsSuite) -> Result<Self, NetError> {
        let provider = provider(suite);
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
        let cert = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));

        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)?;
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(NoServerSessionStorage {});
        let (connector, server_name) = Self::connector_trusting(suite, cert.clone())?;
        Ok(Self { acceptor: TlsAcceptor::from(Arc::new(server)), connector, server_name, certificate: cert })
    }

    /// Mutual authentication, as Veil always does: the server of [`Tls::new`] (self-signed
    /// ECDSA P-256 certificate, trusted by the client as its anchor) also demands a client
    /// certificate and verifies it with rustls's `WebPkiClientVerifier` against a CA (rcgen,
    /// ECDSA P-256). The client presents its certificate alone (one signature to verify, as a
    /// one-certificate Veil chain) and signs the handshake with its key.
    ///
    /// # Errors
    /// If rcgen or rustls refuse (a bug in this function).
    pub fn mutual(suite: TlsSuite) -> Result<Self, NetError> {
        let provider = provider(suite);
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
        let cert = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));

        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "bench client CA");
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
        let mut client_params = rcgen::CertificateParams::new(vec!["client.localhost".to_owned()])?;
        client_params.distinguished_name.push(rcgen::DnType::CommonName, "bench client");
        client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = rcgen::KeyPair::generate()?;
        let client_cert = client_params.signed_by(&client_key, &ca)?.der().clone();
        let client_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client_key.serialize_der()));

        let mut client_roots = RootCertStore::empty();
        client_roots.add(ca.der().clone())?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(client_roots), Arc::clone(&provider))
            .build()
            .map_err(|e| NetError::Broken(format!("client verifier: {e}")))?;
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert.clone()], key)?;
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(NoServerSessionStorage {});

        let mut roots = RootCertStore::empty();
        roots.add(cert.clone())?;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![client_cert], client_key)?;
        client.resumption = Resumption::disabled();
        let server_name = ServerName::try_from("localhost").map_err(|e| NetError::Broken(e.to_string()))?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            server_name,
            certificate: cert,
        })
    }

    /// The client side alone, trusting `certificate` (a [`Tls::certificate`] made elsewhere,
    /// for example in another process) for `localhost`.
    ///
    /// # Errors
    /// If rustls refuses the certificate as a trust anchor.
    pub fn connector_trusting(
        suite: TlsSuite,
        certificate: CertificateDer<'static>,
    ) -> Result<(TlsConnector, ServerName<'static>), NetError> {
        let mut roots = RootCertStore::empty();
        roots.add(certificate)?;
        let mut client = ClientConfig::builder_with_provider(provider(suite))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.resumption = Resumption::disabled();
        let name = ServerName::try_from("localhost").map_err(|e| NetError::Broken(e.to_string()))?;
        Ok((TlsConnector::from(Arc::new(client)), name))
    }
}

/// rustls's ring provider cut down to one TLS 1.3 suite and X25519.
fn provider(suite: TlsSuite) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![suite.rustls()],
        kx_groups: vec![ring_provider::kx_group::X25519],
        ..ring_provider::default_provider()
    })
}

/// The peers' message framing: a u16 big-endian length and the payload, the same layout as a
/// Veil stream frame (spec §3.1), so that the TLS and plain TCP peers delimit messages as Veil
/// does.
///
/// # Errors
/// [`NetError::Broken`] for a payload over 65 535 bytes.
pub fn framed(payload: &[u8]) -> Result<Bytes, NetError> {
    let len = u16::try_from(payload.len()).map_err(|_| NetError::Broken("message over 65 535 B".into()))?;
    let mut b = BytesMut::with_capacity(2 + payload.len());
    b.put_u16(len);
    b.extend_from_slice(payload);
    Ok(b.freeze())
}

/// Reads messages framed by [`framed`] from a byte stream, with tokio-util's
/// `LengthDelimitedCodec` as Veil's TCP driver does; each message comes out as its own buffer,
/// as Veil hands out each message as its own `Bytes`.
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    codec: LengthDelimitedCodec,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    /// Bytes read per `read` call at least (the buffer grows when frames are larger).
    const READ_SIZE: usize = 64 * 1024;

    /// An empty reader.
    #[must_use]
    pub fn new() -> Self {
        let codec = LengthDelimitedCodec::builder().length_field_type::<u16>().big_endian().new_codec();
        Self { buf: BytesMut::new(), codec }
    }

    /// The next message, or `None` at the end of the stream.
    ///
    /// # Errors
    /// Read errors, and a stream that ends inside a message.
    pub async fn next<R: AsyncRead + Unpin + ?Sized>(&mut self, r: &mut R) -> Result<Option<BytesMut>, NetError> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if self.buf.capacity() - self.buf.len() < Self::READ_SIZE / 4 {
                self.buf.reserve(Self::READ_SIZE);
            }
            if r.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(NetError::Broken("stream ended inside a message".into()))
                };
            }
        }
    }
}

/// The process's resident set size (`VmRSS` in `/proc/self/status`), in bytes.
///
/// # Errors
/// If the file cannot be read or has no `VmRSS` line (not Linux).
pub fn rss_bytes() -> Result<u64, NetError> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    parse_vm_rss(&status).ok_or_else(|| NetError::Broken("no VmRSS in /proc/self/status".into()))
}

/// The resident set size (`VmRSS`) of process `pid`, in bytes: a child process the benchmark
/// started.
///
/// # Errors
/// If the process is gone, or as [`rss_bytes`].
pub fn rss_bytes_of(pid: u32) -> Result<u64, NetError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vm_rss(&status).ok_or_else(|| NetError::Broken(format!("no VmRSS in /proc/{pid}/status")))
}

/// CPU time the live threads of this process have run, in nanoseconds: the sum over
/// `/proc/self/task/*/schedstat` of its first field. Threads that have ended are not counted,
/// so take differences over a stretch in which the runtime's threads live throughout.
///
/// # Errors
/// If `/proc` cannot be read (not Linux, or a kernel without scheduler statistics).
pub fn process_cpu_ns() -> Result<u64, NetError> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task")? {
        let path = task?.path().join("schedstat");
        // A thread that ended between the listing and the read has nothing left to count.
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let ns: u64 = text
            .split_whitespace()
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| NetError::Broken(format!("{}: {text:?}", path.display())))?;
        total = total.saturating_add(ns);
    }
    Ok(total)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_kilobytes() {
        let status = "Name:\tx\nVmPeak:\t  100 kB\nVmRSS:\t    2048 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_has_a_resident_set_and_cpu_time() -> Result<(), NetError> {
        assert!(rss_bytes()? > 0);
        assert!(rss_bytes_of(std::process::id())? > 0);
        let before = process_cpu_ns()?;
        // Busy for a moment: the count must move.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(process_cpu_ns()? > before);
        Ok(())
    }

    #[test]
    fn framed_messages_come_out_whole_and_in_order() -> Result<(), NetError> {
        let rt = runtime()?;
        rt.block_on(async {
            let payloads: Vec<Vec<u8>> = vec![vec![1], vec![7; 300], vec![9; 65_535], vec![3; 64]];
            let mut wire = Vec::new();
            for p in &payloads {
                wire.extend_from_slice(&framed(p)?);
            }
            let mut reader = FrameReader::new();
            let mut src = &wire[..];
            for p in &payloads {
                let got = reader.next(&mut src).await?.ok_or_else(|| NetError::Broken("early end".into()))?;
                assert_eq!(&got[..], &p[..]);
            }
            assert!(reader.next(&mut src).await?.is_none());
            // A stream cut inside a message is an error, not a short message.
            let mut cut = &wire[..10];
            let mut reader = FrameReader::new();
            assert!(reader.next(&mut cut).await?.is_some());
            assert!(reader.next(&mut cut).await.is_err());
            assert!(framed(&vec![0; 65_536]).is_err());
            Ok(())
        })
    }

    #[test]
    fn the_tls_peer_completes_a_full_handshake_with_the_chosen_suite() -> Result<(), NetError> {
        let rt = runtime()?;
        rt.block_on(async {
            for suite in [TlsSuite::ChaCha20Poly1305, TlsSuite::Aes256Gcm] {
                let tls = Tls::new(suite)?;
                let listener = tokio::net::TcpListener::bind(localhost()).await?;
                let addr = listener.local_addr()?;
                let acceptor = tls.acceptor.clone();
                let server = tokio::spawn(async move {
                    let (tcp, _) = listener.accept().await?;
                    let stream = acceptor.accept(tcp).await?;
                    let (_, conn) = stream.get_ref();
                    Ok::<_, NetError>((conn.negotiated_cipher_suite(), conn.protocol_version()))
                });
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let client = tls.connector.connect(tls.server_name.clone(), tcp).await?;
                let (server_suite, version) = server.await??;
                assert_eq!(server_suite, Some(suite.rustls()));
                assert_eq!(client.get_ref().1.negotiated_cipher_suite(), Some(suite.rustls()));
                assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));
                assert_eq!(client.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full));
            }
            Ok(())
        })
    }

    #[test]
    fn veil_peers_connect_over_tcp_and_udp() -> Result<(), NetError> {
        let rt = runtime()?;
        rt.block_on(async {
            let peers = VeilPeers::bind(Pattern::IK, Suite::AesGcmSha256, 16).await?;
            for transport in [veil_transports::Transport::Tcp, veil_transports::Transport::Udp] {
                let (c, s) = peers.connect(transport).await?;
                c.send(Bytes::from_static(b"ping")).await?;
                assert_eq!(&s.recv().await?.payload[..], b"ping");
            }
            Ok(())
        })
    }
}
