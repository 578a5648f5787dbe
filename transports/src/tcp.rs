//! TCP: a listener task that admits peers and one driver task per connection
//! (stream mode, spec §3.1).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use veil_protocol::trust::RoleSet;
use veil_protocol::wire::{self, RejectReason};
use veil_protocol::{PublicKey, Role};

use crate::config::{EndpointLimits, Transport};
use crate::connection::Connection;
use crate::driver::{Carrier, Driver, Ready};
use crate::endpoint::{EndpointShared, Slot};
use crate::error::Error;

/// Pause after a failed `accept` (for example out of file descriptors) so the loop
/// does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// spec §5.8: `REJECT(Busy)` as a stream frame (length 2).
const REJECT_BUSY_FRAME: [u8; 4] = [0, 2, wire::TYPE_HANDSHAKE_REJECT, 0x05];

fn socket(addr: SocketAddr, limits: &EndpointLimits) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(n) = limits.tcp_send_buffer {
        socket.set_send_buffer_size(n)?;
    }
    if let Some(n) = limits.tcp_recv_buffer {
        socket.set_recv_buffer_size(n)?;
    }
    Ok(socket)
}

/// The listening socket. Buffer sizes set on it are inherited by accepted sockets.
pub(crate) fn listen(addr: SocketAddr, limits: &EndpointLimits) -> std::io::Result<TcpListener> {
    let socket = socket(addr, limits)?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(limits.tcp_backlog)
}

pub(crate) async fn accept_loop(ep: Arc<EndpointShared>, listener: TcpListener, listening: CancellationToken) {
    debug_assert_eq!(RejectReason::Busy.code(), REJECT_BUSY_FRAME[3]);
    loop {
        let accepted = tokio::select! {
            () = listening.cancelled() => break,
            () = ep.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, addr) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let now = ep.clock.now();
        let admission = match ep.admit(addr.ip(), now) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(peer = %addr, error = %e, "peer refused");
                if !matches!(e, Error::RateLimited) {
                    // Best effort, never waits: a fresh socket's send buffer is empty.
                    let _ = stream.try_write(&REJECT_BUSY_FRAME);
                }
                ep.report_failure(addr, Transport::Tcp, e);
                continue;
            }
        };
        let core = match veil_protocol::Connection::new(
            Arc::clone(&ep.stream_config),
            Role::Responder,
            ep.kk_initiator,
            now,
            &mut rand::rngs::OsRng,
        ) {
            Ok(c) => c,
            Err(e) => {
                ep.report_failure(addr, Transport::Tcp, e.into());
                continue;
            }
        };
        spawn(&ep, stream, addr, core, Ready::Responder, admission.connection, Some(admission.handshake), None);
    }
    tracing::debug!("listener stopped");
}

#[allow(clippy::too_many_arguments)]
fn spawn(
    ep: &Arc<EndpointShared>,
    stream: TcpStream,
    addr: SocketAddr,
    core: veil_protocol::Connection,
    ready: Ready,
    connection_slot: Slot,
    handshake_slot: Option<Slot>,
    expected: Option<RoleSet>,
) {
    // Veil packs small messages into frames itself; Nagle would only add latency.
    let _ = stream.set_nodelay(true);
    let max = ep.stream_config.limits.packet_len();
    let driver = Driver::new(
        Arc::clone(ep),
        core,
        Transport::Tcp,
        addr,
        Carrier::tcp(stream, max),
        ready,
        connection_slot,
        handshake_slot,
    )
    .expecting(expected);
    let span = driver.span();
    tokio::spawn(driver.run().instrument(span));
}

pub(crate) async fn connect(
    ep: &Arc<EndpointShared>,
    addr: SocketAddr,
    remote_static: Option<PublicKey>,
    expected: Option<RoleSet>,
) -> Result<Connection, Error> {
    if ep.shutdown.is_cancelled() {
        return Err(Error::EndpointClosed);
    }
    let slot = ep.connection_slot()?;
    let timeout: Duration = ep.stream_config.limits.handshake_timeout.into();
    let socket = socket(addr, &ep.limits)?;
    let stream = tokio::time::timeout(timeout, socket.connect(addr)).await.map_err(|_| Error::ConnectTimeout)??;
    let core = veil_protocol::Connection::new(
        Arc::clone(&ep.stream_config),
        Role::Initiator,
        remote_static,
        ep.clock.now(),
        &mut rand::rngs::OsRng,
    )?;
    let (tx, rx) = oneshot::channel();
    spawn(ep, stream, addr, core, Ready::Initiator(Some(tx)), slot, None, expected);
    rx.await.unwrap_or(Err(Error::EndpointClosed))
}
