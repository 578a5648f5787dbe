//! Trust in the transports (spec §15): the shared trust state an [`Authorizer`] built with
//! [`Authorizer::trust`] checks every peer against, the time it checks with, which roles it
//! expects from whom, and how revocation lists and `TimeSync` reach live sessions.
//!
//! [`Authorizer`]: crate::Authorizer
//! [`Authorizer::trust`]: crate::Authorizer::trust

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;
use veil_protocol::trust::{
    Allowlist, Authorized, CertRole, IssuerId, RevocationUpdate, RoleSet, Trust, TrustError, TrustStore, UnixTime,
};
use veil_protocol::PublicKey;

/// Where a node's Unix time comes from (spec §15.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeSource {
    /// A real-time clock (`SystemTime`): gateways and cloud services. Validity is checked at
    /// every verification, and a verification without a time fails (`NoTime`); the node
    /// sends `TimeSync` to each device peer and ignores `TimeSync` it receives.
    SystemClock,
    /// No real-time clock (a device): time is learned from `TimeSync` sent by a peer verified
    /// as gateway or cloud (or, in allowlist mode, listed as a time source), then followed
    /// with the monotonic clock. Until then certificates are checked against the time floor
    /// only (spec §15.7).
    Learned,
}

/// Which certificate roles an endpoint expects from its peers (spec §15.6), by direction.
///
/// An [`Endpoint`](crate::Endpoint) with a trust authorizer expects `inbound` roles from
/// every peer that connects to it (its TCP listener and UDP socket alike) and `outbound`
/// roles from every peer it connects to, unless a connect call names its own
/// ([`Endpoint::connect_expecting`](crate::Endpoint::connect_expecting)). A node that serves
/// two kinds of peers on different ports (a cloud with a gateway uplink port and a device
/// port) runs one endpoint per port, sharing one [`TrustState`]. Allowlist mode ignores roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRoles {
    /// Roles accepted from peers that connect to this endpoint.
    pub inbound: RoleSet,
    /// Roles expected from peers this endpoint connects to.
    pub outbound: RoleSet,
}

impl PeerRoles {
    /// A gateway's uplink port at the cloud: gateways only, so a device certificate cannot
    /// open a gateway uplink.
    pub const GATEWAY_UPLINK: Self = Self { inbound: RoleSet::GATEWAY, outbound: RoleSet::CLOUD };

    /// `inbound` and `outbound` as given.
    #[must_use]
    pub const fn new(inbound: RoleSet, outbound: RoleSet) -> Self {
        Self { inbound, outbound }
    }

    /// What a node of role `role` expects by default:
    ///
    /// | node | accepts (inbound) | connects to (outbound) |
    /// |---|---|---|
    /// | device | nobody | gateway or cloud |
    /// | gateway | devices | cloud |
    /// | cloud | gateways and devices | cloud |
    /// | ca | nobody | nobody |
    ///
    /// A gateway never accepts another gateway on its device port, so a gateway cannot pose
    /// as a device; a cloud that must tell gateway uplinks from devices uses
    /// [`PeerRoles::GATEWAY_UPLINK`] on its uplink endpoint or reads
    /// [`Connection::peer`](crate::Connection::peer).
    #[must_use]
    pub const fn for_node(role: CertRole) -> Self {
        match role {
            CertRole::Device => Self::new(RoleSet::NONE, RoleSet::UPSTREAM),
            CertRole::Gateway => Self::new(RoleSet::DEVICE, RoleSet::CLOUD),
            CertRole::Cloud => Self::new(RoleSet::GATEWAY.union(RoleSet::DEVICE), RoleSet::CLOUD),
            CertRole::Ca => Self::new(RoleSet::NONE, RoleSet::NONE),
        }
    }
}

#[derive(Debug)]
struct Shared {
    trust: RwLock<Trust>,
    time: TimeSource,
    /// `TimeSource::Learned`: the newest accepted hint and when it arrived.
    learned: Mutex<Option<(UnixTime, Instant)>>,
    /// Allowlist mode: peers whose `TimeSync` is believed (spec §15.7).
    time_sources: Vec<PublicKey>,
    /// Bumped whenever the trust state changes; every live connection re-checks its peer.
    changes: watch::Sender<u64>,
    /// The revocation lists accepted through [`TrustState::update_revocation_list`] (pushed by
    /// peers or offered by the application), the newest per anchor: [`TrustState::replace`]
    /// offers them to the new trust, so that reloading older files never drops a newer list.
    /// At most one per anchor of the current trust (`MAX_TRUST_ANCHORS`, each at most
    /// `MAX_REVOCATION_LIST_LEN` bytes). Locked only while the trust's write lock is held.
    accepted_lists: Mutex<Vec<AcceptedList>>,
}

/// A revocation list [`TrustState::update_revocation_list`] accepted.
#[derive(Debug)]
struct AcceptedList {
    issuer: IssuerId,
    epoch: u64,
    bytes: Vec<u8>,
}

/// The trust state of a node (spec §15): its [`Trust`] (allowlist or fleet CA with
/// revocation lists), its [`TimeSource`], and the live connections that depend on it.
///
/// Cheap to clone; clones share the state, so endpoints built with the same `TrustState`
/// (say, a cloud's gateway-uplink and device endpoints) apply a revocation list together.
/// Every change — a revocation list accepted, a time learned — makes every live connection of
/// these endpoints check its peer again, and close it if it now fails (spec §15.6, §15.8).
#[derive(Debug, Clone)]
pub struct TrustState {
    inner: Arc<Shared>,
}

impl TrustState {
    /// A trust state. With [`TimeSource::SystemClock`] a fleet-CA store is set to require a
    /// time (spec §15.7: gateways and cloud always check validity).
    #[must_use]
    pub fn new(trust: Trust, time: TimeSource) -> Self {
        let trust = Self::prepare(trust, time);
        Self {
            inner: Arc::new(Shared {
                trust: RwLock::new(trust),
                time,
                learned: Mutex::new(None),
                time_sources: Vec::new(),
                changes: watch::channel(0).0,
                accepted_lists: Mutex::new(Vec::new()),
            }),
        }
    }

    /// spec §15.7: gateways and cloud services (a real-time clock) always check validity.
    fn prepare(trust: Trust, time: TimeSource) -> Trust {
        match trust {
            Trust::FleetCa(store) if time == TimeSource::SystemClock => Trust::FleetCa(store.require_time(true)),
            other => other,
        }
    }

    /// Fleet-CA mode with the node's store (spec §15.1).
    #[must_use]
    pub fn fleet_ca(store: TrustStore, time: TimeSource) -> Self {
        Self::new(Trust::FleetCa(store), time)
    }

    /// Allowlist mode (spec §15.1). `time_sources` are the listed peers whose `TimeSync` a
    /// [`TimeSource::Learned`] node believes (spec §15.7).
    #[must_use]
    pub fn allowlist(list: Allowlist, time: TimeSource, time_sources: impl IntoIterator<Item = PublicKey>) -> Self {
        let mut state = Self::new(Trust::Allowlist(list), time);
        if let Some(shared) = Arc::get_mut(&mut state.inner) {
            shared.time_sources = time_sources.into_iter().collect();
        }
        state
    }

    /// Where time comes from.
    #[must_use]
    pub fn time_source(&self) -> TimeSource {
        self.inner.time
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Trust> {
        // The trust state stays consistent even if a holder panicked: every write is one
        // assignment or one `TrustStore` call that changes nothing on error.
        self.inner.trust.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Trust> {
        self.inner.trust.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current Unix time as this node knows it: the system clock, or the last learned
    /// `TimeSync` plus the monotonic time since (spec §15.7); `None` if unknown.
    #[must_use]
    pub fn now(&self) -> Option<UnixTime> {
        match self.inner.time {
            TimeSource::SystemClock => {
                SystemTime::now().duration_since(UNIX_EPOCH).ok().map(|d| UnixTime::from_secs(d.as_secs()))
            }
            TimeSource::Learned => {
                let learned = *self.inner.learned.lock().unwrap_or_else(PoisonError::into_inner);
                learned.map(|(t, at)| UnixTime::from_secs(t.as_secs().saturating_add(at.elapsed().as_secs())))
            }
        }
    }

    /// A copy of the current trust (to inspect anchors, epochs, the time floor).
    #[must_use]
    pub fn snapshot(&self) -> Trust {
        self.read().clone()
    }

    /// The clock-skew tolerance (fleet-CA mode; 0 in allowlist mode, where no validity is
    /// checked).
    #[must_use]
    pub fn clock_skew(&self) -> u64 {
        match &*self.read() {
            Trust::FleetCa(store) => store.clock_skew(),
            _ => 0,
        }
    }

    /// The authorization check (spec §5.5, §15.6) at the current time.
    ///
    /// # Errors
    /// The [`TrustError`] of the first failing check.
    pub fn check(
        &self,
        remote_static: &PublicKey,
        certificate: Option<&[u8]>,
        expected: RoleSet,
    ) -> Result<Authorized, TrustError> {
        let now = self.now();
        self.read().check(remote_static, certificate, now, expected)
    }

    /// Offers a revocation list (spec §15.5). On success every live connection re-checks its
    /// peer and those now revoked close with reason `Revoked` (spec §15.8). A list that fails
    /// changes nothing: the current list stays in force and the error is logged.
    ///
    /// # Errors
    /// The errors of [`TrustStore::update_revocation_list`]; in allowlist mode, which holds no
    /// trust anchor, [`TrustError::UnknownIssuer`].
    pub fn update_revocation_list(&self, list: &[u8]) -> Result<RevocationUpdate, TrustError> {
        let result = match &mut *self.write() {
            Trust::FleetCa(store) => {
                let result = store.update_revocation_list(list);
                if let Ok(u) = &result {
                    // Kept (under the trust lock) for `replace`: the newest list of its anchor.
                    let mut kept = self.inner.accepted_lists.lock().unwrap_or_else(PoisonError::into_inner);
                    kept.retain(|l| l.issuer != u.issuer);
                    kept.push(AcceptedList { issuer: u.issuer, epoch: u.epoch, bytes: list.to_vec() });
                }
                result
            }
            _ => Err(TrustError::UnknownIssuer),
        };
        match &result {
            Ok(u) => {
                tracing::info!(issuer = %u.issuer, epoch = u.epoch, previous = ?u.previous_epoch, "revocation list accepted");
                self.changed();
            }
            Err(e) => tracing::warn!(error = %e, len = list.len(), "revocation list refused, current one kept"),
        }
        result
    }

    /// Replaces the trust as a whole — a reload of the allowlist, the trust anchors or the
    /// revocation lists from their files — without dropping live connections: each one checks
    /// its peer against the new trust at once, keeps going if it passes and closes with the
    /// mapped reason if it does not (a peer taken off the allowlist: `Unauthorized`; revoked:
    /// `Revoked`), exactly as after an accepted revocation list (spec §15.6, §15.8).
    ///
    /// In fleet-CA mode the new store keeps what the node learned meanwhile: it is set to
    /// require a time on a node with a real-time clock (as in [`TrustState::new`]), its time
    /// floor is raised to the current one (time does not run back, spec §15.7), and every
    /// revocation list accepted through [`TrustState::update_revocation_list`] (pushed by a peer)
    /// is offered to it again, so a newer pushed list survives a reload of an older file. The
    /// time sources of allowlist mode and the time source stay as they are.
    ///
    /// # Errors
    /// [`TrustError::StaleRevocationList`] if, for a trust anchor both trusts share, the new
    /// trust would hold an older revocation list than the one in force (`received` is 0 if it
    /// holds none): spec §15.5 never lets a list be replaced by an older one, so a revocation
    /// cannot be undone by restoring an old file. Nothing changes then.
    pub fn replace(&self, trust: Trust) -> Result<(), TrustError> {
        let mut trust = Self::prepare(trust, self.inner.time);
        {
            let mut current = self.write();
            let mut kept = self.inner.accepted_lists.lock().unwrap_or_else(PoisonError::into_inner);
            if let Trust::FleetCa(new) = &mut trust {
                for list in kept.iter() {
                    // Refused if older than the new store's own list or of an anchor no longer
                    // trusted: nothing to keep then.
                    let _ = new.update_revocation_list(&list.bytes);
                }
                if let Trust::FleetCa(old) = &*current {
                    if let Some(floor) = old.time_floor() {
                        new.raise_time_floor(floor);
                    }
                    for issuer in old.anchors() {
                        let (Some(held), true) = (old.revocation_epoch(issuer), new.anchors().any(|a| a == issuer))
                        else {
                            continue;
                        };
                        let received = new.revocation_epoch(issuer).unwrap_or(0);
                        if received < held {
                            tracing::warn!(%issuer, held, received, "trust replacement refused: it would roll back a revocation list");
                            return Err(TrustError::StaleRevocationList { current: held, received });
                        }
                    }
                }
                // Keep only lists still in force: of a trusted anchor and not superseded.
                kept.retain(|l| new.revocation_epoch(l.issuer) == Some(l.epoch));
            } else {
                kept.clear();
            }
            *current = trust;
        }
        tracing::info!("trust replaced; live connections re-check their peers");
        self.changed();
        Ok(())
    }

    /// spec §15.7: a `TimeSync` hint from a peer, believed only by a node without a
    /// real-time clock and only from a peer verified as gateway or cloud (or, in allowlist
    /// mode, named as a time source); a hint below the time floor is ignored. An accepted
    /// hint raises the floor, becomes the node's time, and makes live connections re-check.
    /// Returns whether it was accepted.
    pub fn accept_time_sync(&self, remote_static: &PublicKey, peer: Option<&Authorized>, unix_time: u64) -> bool {
        if self.inner.time != TimeSource::Learned {
            return false;
        }
        let trusted = match peer {
            Some(Authorized::Certified(p)) => matches!(p.role, CertRole::Gateway | CertRole::Cloud),
            Some(Authorized::Listed { .. }) => self.inner.time_sources.contains(remote_static),
            _ => false,
        };
        if !trusted {
            tracing::debug!("TimeSync ignored: the peer is no time source");
            return false;
        }
        let hint = UnixTime::from_secs(unix_time);
        {
            let mut trust = self.write();
            if let Trust::FleetCa(store) = &mut *trust {
                if store.time_floor().is_some_and(|f| hint < f) {
                    tracing::debug!("TimeSync ignored: below the time floor");
                    return false;
                }
                store.raise_time_floor(hint);
            }
            let mut learned = self.inner.learned.lock().unwrap_or_else(PoisonError::into_inner);
            // Time does not run back: keep the later of the hint and the running estimate.
            let current = learned.map(|(t, at)| t.as_secs().saturating_add(at.elapsed().as_secs()));
            if current.is_none_or(|c| c <= unix_time) {
                *learned = Some((hint, Instant::now()));
            }
        }
        tracing::debug!(unix_time, "time learned from TimeSync");
        self.changed();
        true
    }

    fn changed(&self) {
        self.inner.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A receiver that sees every later change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// A receiver that sees every later change of the trust state (a revocation list
    /// accepted, a reload, a time learned): a cloud pushes its revocation lists again then.
    #[must_use]
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.subscribe()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use veil_protocol::trust::{
        CaSigningKey, Certificate, CertificateBody, CertificateChain, NodeId, RevocationList, RevocationListBody,
        VerifiedPeer,
    };
    use veil_protocol::StaticKeypair;

    use super::*;

    fn certified(role: CertRole) -> Authorized {
        let key = StaticKeypair::from_secret_bytes([3; 32]);
        Authorized::Certified(VerifiedPeer {
            node_id: NodeId::from_public_key(key.public()),
            name: "peer".into(),
            role,
            groups: Vec::new(),
            serial: 1,
            issuer: CaSigningKey::from_seed([1; 32]).issuer_id(),
            valid_until: UnixTime::from_secs(u64::MAX),
        })
    }

    fn fleet(time: TimeSource) -> (TrustState, CaSigningKey) {
        let ca = CaSigningKey::from_seed([0xca; 32]);
        (TrustState::fleet_ca(TrustStore::new([ca.verifying_key()]).unwrap(), time), ca)
    }

    #[test]
    fn roles_by_node_kind() {
        let gw = PeerRoles::for_node(CertRole::Gateway);
        assert!(gw.inbound.contains(CertRole::Device) && !gw.inbound.contains(CertRole::Gateway));
        assert_eq!(gw.outbound, RoleSet::CLOUD);
        let cloud = PeerRoles::for_node(CertRole::Cloud);
        assert!(cloud.inbound.contains(CertRole::Gateway) && cloud.inbound.contains(CertRole::Device));
        assert!(!PeerRoles::GATEWAY_UPLINK.inbound.contains(CertRole::Device));
        assert_eq!(PeerRoles::for_node(CertRole::Device).inbound, RoleSet::NONE);
    }

    #[tokio::test]
    async fn a_device_learns_time_only_from_a_gateway_or_cloud_and_never_backwards() {
        let (dev, _) = fleet(TimeSource::Learned);
        let key = *StaticKeypair::from_secret_bytes([3; 32]).public();
        assert_eq!(dev.now(), None);
        let changes = dev.subscribe();
        // A device peer, or a peer nobody verified, is no time source.
        assert!(!dev.accept_time_sync(&key, Some(&certified(CertRole::Device)), 1_800_000_000));
        assert!(!dev.accept_time_sync(&key, None, 1_800_000_000));
        assert!(!changes.has_changed().unwrap());
        assert!(dev.accept_time_sync(&key, Some(&certified(CertRole::Gateway)), 1_800_000_000));
        assert!(changes.has_changed().unwrap());
        let now = dev.now().unwrap().as_secs();
        assert!((1_800_000_000..1_800_000_010).contains(&now), "{now}");
        // Below the floor: ignored.
        assert!(!dev.accept_time_sync(&key, Some(&certified(CertRole::Cloud)), 1_700_000_000));
        assert!(dev.now().unwrap().as_secs() >= 1_800_000_000);
        match dev.snapshot() {
            Trust::FleetCa(s) => assert_eq!(s.time_floor(), Some(UnixTime::from_secs(1_800_000_000))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_node_with_a_clock_ignores_time_sync_and_requires_time() {
        let (gw, ca) = fleet(TimeSource::SystemClock);
        let key = *StaticKeypair::from_secret_bytes([3; 32]).public();
        assert!(!gw.accept_time_sync(&key, Some(&certified(CertRole::Cloud)), 4_000_000_000));
        assert!(gw.now().unwrap().as_secs() > 1_700_000_000);
        // The store requires time: a certificate valid now passes, one expired by the system
        // clock fails.
        let now = gw.now().unwrap().as_secs();
        let cert = |nb: u64, na: u64| {
            let body = CertificateBody::new(*key.as_bytes(), "dev", CertRole::Device, nb, na, 1, ca.issuer_id());
            CertificateChain::new(vec![Certificate::sign(body, &ca).unwrap()]).unwrap().encode().unwrap()
        };
        assert!(gw.check(&key, Some(&cert(now - 100, now + 3_600)), RoleSet::DEVICE).is_ok());
        assert_eq!(gw.check(&key, Some(&cert(now - 7_200, now - 3_600)), RoleSet::DEVICE), Err(TrustError::Expired));
    }

    #[test]
    fn allowlist_mode_refuses_revocation_lists_and_believes_only_named_time_sources() {
        let key = *StaticKeypair::from_secret_bytes([3; 32]).public();
        let other = *StaticKeypair::from_secret_bytes([4; 32]).public();
        let mut list = Allowlist::new();
        list.insert(key, "gw").unwrap();
        list.insert(other, "peer").unwrap();
        let state = TrustState::allowlist(list, TimeSource::Learned, [key]);
        assert_eq!(state.update_revocation_list(&[0; 100]), Err(TrustError::UnknownIssuer));
        let listed = |k: &PublicKey| Authorized::Listed { node_id: NodeId::from_public_key(k), name: "x".into() };
        assert!(!state.accept_time_sync(&other, Some(&listed(&other)), 1_800_000_000));
        assert!(state.accept_time_sync(&key, Some(&listed(&key)), 1_800_000_000));
        assert!(state.check(&other, None, RoleSet::NONE).is_ok());
    }

    /// A list of `ca` at `epoch` revoking `keys`, issued at `issued_at`.
    fn list(ca: &CaSigningKey, epoch: u64, issued_at: u64, keys: &[PublicKey]) -> Vec<u8> {
        let mut body = RevocationListBody::new(ca.issuer_id(), epoch, issued_at);
        body.keys = keys.iter().map(|k| *k.as_bytes()).collect();
        body.normalize();
        RevocationList::sign(body, ca).unwrap().encoding().to_vec()
    }

    fn store_with(ca: &CaSigningKey, lists: &[&[u8]]) -> Trust {
        let mut store = TrustStore::new([ca.verifying_key()]).unwrap();
        for l in lists {
            store.update_revocation_list(l).unwrap();
        }
        Trust::FleetCa(store)
    }

    fn epoch(state: &TrustState, ca: &CaSigningKey) -> Option<u64> {
        match state.snapshot() {
            Trust::FleetCa(s) => s.revocation_epoch(ca.issuer_id()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn replace_keeps_a_newer_pushed_list_and_refuses_to_roll_one_back() {
        let (state, ca) = fleet(TimeSource::SystemClock);
        let revoked = *StaticKeypair::from_secret_bytes([5; 32]).public();
        let t = 1_750_000_000;
        let changes = state.subscribe();
        // The file held epoch 1; a peer pushed epoch 3, which revokes a key.
        state.replace(store_with(&ca, &[&list(&ca, 1, t, &[])])).unwrap();
        assert!(changes.has_changed().unwrap());
        state.update_revocation_list(&list(&ca, 3, t + 10, &[revoked])).unwrap();
        // A reload of the (older) file keeps the pushed list in force, and the time floor.
        state.replace(store_with(&ca, &[&list(&ca, 2, t, &[])])).unwrap();
        assert_eq!(epoch(&state, &ca), Some(3));
        match state.snapshot() {
            Trust::FleetCa(s) => assert_eq!(s.time_floor(), Some(UnixTime::from_secs(t + 10))),
            other => panic!("{other:?}"),
        }
        // A newer file wins over the pushed list.
        state.replace(store_with(&ca, &[&list(&ca, 4, t + 20, &[])])).unwrap();
        assert_eq!(epoch(&state, &ca), Some(4));
        // Now nothing older than epoch 4 can come back: not a file of epoch 3, nor no list at all.
        let mut seen = state.subscribe();
        seen.mark_unchanged();
        assert_eq!(
            state.replace(store_with(&ca, &[&list(&ca, 3, t, &[])])).unwrap_err(),
            TrustError::StaleRevocationList { current: 4, received: 3 }
        );
        assert_eq!(
            state.replace(store_with(&ca, &[])).unwrap_err(),
            TrustError::StaleRevocationList { current: 4, received: 0 }
        );
        assert_eq!(epoch(&state, &ca), Some(4));
        assert!(!seen.has_changed().unwrap(), "a refused replacement changes nothing");
    }

    #[test]
    fn replace_switches_anchors_and_modes_and_keeps_time_required() {
        let (state, ca) = fleet(TimeSource::SystemClock);
        let key = *StaticKeypair::from_secret_bytes([3; 32]).public();
        let now = state.now().unwrap().as_secs();
        let chain = |signer: &CaSigningKey| {
            let body = CertificateBody::new(
                *key.as_bytes(),
                "dev",
                CertRole::Device,
                now - 10,
                now + 3_600,
                1,
                signer.issuer_id(),
            );
            CertificateChain::new(vec![Certificate::sign(body, signer).unwrap()]).unwrap().encode().unwrap()
        };
        let rotated = CaSigningKey::from_seed([0xcb; 32]);
        assert!(state.check(&key, Some(&chain(&ca)), RoleSet::DEVICE).is_ok());
        // A CA rotation: the old anchor's list has nothing to roll back, since it is gone.
        state.update_revocation_list(&list(&ca, 7, now, &[])).unwrap();
        state.replace(store_with(&rotated, &[])).unwrap();
        assert_eq!(state.check(&key, Some(&chain(&ca)), RoleSet::DEVICE), Err(TrustError::UnknownIssuer));
        assert!(state.check(&key, Some(&chain(&rotated)), RoleSet::DEVICE).is_ok());
        // The new store requires a time, as `new` makes it on a node with a clock.
        match state.snapshot() {
            Trust::FleetCa(s) => {
                assert_eq!(s.verify(&key, Some(&chain(&rotated)), None, RoleSet::DEVICE), Err(TrustError::NoTime))
            }
            other => panic!("{other:?}"),
        }
        // To allowlist mode and back.
        let mut allow = Allowlist::new();
        allow.insert(key, "listed").unwrap();
        state.replace(Trust::Allowlist(allow)).unwrap();
        assert!(state.check(&key, None, RoleSet::DEVICE).is_ok());
        state.replace(store_with(&rotated, &[])).unwrap();
        assert_eq!(state.check(&key, None, RoleSet::DEVICE), Err(TrustError::CertificateMissing));
    }
}
