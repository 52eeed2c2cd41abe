//! Session-scoped gateway keys: the key a session's agent sends to the gateway as its
//! `api_key`, so that the gateway knows which session a call is for and every `provider.*`
//! event carries it.
//!
//! A key is `tsk_<mac>_<session id>`, where `<mac>` is HMAC-SHA-256 of the session id under a
//! secret drawn at node start (cut to 128 bits, hex). Keys need no table: the gateway checks the
//! MAC and then that the session has not ended. They die with the node (a restart draws a new
//! secret; sessions that were running are interrupted anyway) and are never logged.
//!
//! Whether a session is running is answered without a store read for sessions whose
//! `session.started` this node's bus has carried and whose end it has not: [`SessionWatch`], the
//! event store the bus writes through, keeps that set. It sees every event inside the bus actor
//! *before* any subscriber does, so a client that has seen a session's end can no longer use its
//! key. Anything the set does not hold is looked up in the store (records are durable before
//! their transition is announced).

use std::sync::{Arc, OnceLock};

use dashmap::DashSet;
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use troupe_actors::event::{BusItem, EventData, EventStore, StoreResume};
use troupe_actors::ids::{NodeId, SessionId};
use troupe_actors::session::SessionRecord;
use troupe_actors::session::aider::GatewayAccess;

use crate::session::commands::GatewayKeys;

const PREFIX: &str = "tsk_";
const MAC_HEX: usize = 32;

/// Issues and checks session keys. Shared by the command builder and the gateway.
pub struct SessionKeys {
    secret: [u8; 32],
    /// `http://ADDR/v1`, known once the HTTP listener is bound.
    base_url: OnceLock<String>,
    /// This node's sessions that started and have not ended, as the bus has carried them;
    /// written by [`SessionWatch`] only (inside the bus actor).
    running: DashSet<SessionId>,
}

impl SessionKeys {
    /// Keys under a fresh random secret.
    pub fn new() -> Result<Self, getrandom::Error> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret)?;
        Ok(Self {
            secret,
            base_url: OnceLock::new(),
            running: DashSet::new(),
        })
    }

    /// True when `session` is known to be running: its start went through the bus and its end
    /// did not. False says only "not known": ask the store.
    pub fn known_running(&self, session: &SessionId) -> bool {
        self.running.contains(session)
    }

    /// Keeps the running set up to date with one event of this node.
    fn observe(&self, session: &SessionId, data: &EventData) {
        match data {
            EventData::SessionStarted(_) => {
                self.running.insert(session.clone());
            }
            EventData::SessionSucceeded(_)
            | EventData::SessionFailed(_)
            | EventData::SessionCancelled(_)
            | EventData::SessionTimedOut(_)
            | EventData::SessionInterrupted(_) => {
                self.running.remove(session);
            }
            _ => {}
        }
    }

    /// Sets the gateway's base URL (once; later calls change nothing).
    pub fn set_base_url(&self, url: String) {
        let _ = self.base_url.set(url);
    }

    /// The key of `session`.
    pub fn issue(&self, session: &SessionId) -> String {
        format!("{PREFIX}{}_{session}", self.mac(session))
    }

    /// True when `bearer` looks like a session key (so it is not looked up as a node token).
    pub fn is_session_key(bearer: &str) -> bool {
        bearer.starts_with(PREFIX)
    }

    /// The session `key` was issued for, if its MAC is right.
    pub fn verify(&self, key: &str) -> Option<SessionId> {
        let rest = key.strip_prefix(PREFIX)?;
        let (mac, session) = (rest.get(..MAC_HEX)?, rest.get(MAC_HEX..)?);
        let session = SessionId::new(session.strip_prefix('_')?).ok()?;
        let expected = self.mac(&session);
        // Compare digests, so the comparison's time says nothing about the expected MAC.
        (Sha256::digest(mac.as_bytes()) == Sha256::digest(expected.as_bytes())).then_some(session)
    }

    fn mac(&self, session: &SessionId) -> String {
        const BLOCK: usize = 64;
        let mut key = [0u8; BLOCK];
        key[..self.secret.len()].copy_from_slice(&self.secret);
        let pad = |byte: u8| key.map(|k| k ^ byte);
        let inner = Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(session.as_str().as_bytes())
            .finalize();
        let outer = Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize();
        hex::encode(&outer[..MAC_HEX / 2])
    }
}

/// The node's event store with the session keys' watch in front: every event goes to the store
/// as before, and this node's session starts and ends update [`SessionKeys`]' running set.
pub struct SessionWatch<S> {
    store: S,
    keys: Arc<SessionKeys>,
    node: NodeId,
}

impl<S> SessionWatch<S> {
    /// Watches the events of `node` (relayed events of other nodes' sessions are passed on
    /// untouched).
    pub fn new(store: S, keys: Arc<SessionKeys>, node: NodeId) -> Self {
        Self { store, keys, node }
    }
}

impl<S: EventStore> EventStore for SessionWatch<S> {
    fn append(&self, item: &BusItem) {
        let event = &item.event;
        if let Some(session) = &event.session
            && event.node() == &self.node
        {
            self.keys.observe(session, &event.data);
        }
        self.store.append(item);
    }

    fn append_again(&self, item: &BusItem, arrival: u64) {
        // Another node's event: nothing for the session keys.
        self.store.append_again(item, arrival);
    }

    fn resume(&self, ring_capacity: usize) -> StoreResume {
        self.store.resume(ring_capacity)
    }

    fn reserve(&self, through: u64) -> Option<BoxFuture<'static, Result<(), String>>> {
        self.store.reserve(through)
    }

    fn release(&self, last: u64) {
        self.store.release(last);
    }

    fn written(
        &self,
        positions: std::ops::RangeInclusive<u64>,
    ) -> Option<BoxFuture<'static, Result<(), String>>> {
        self.store.written(positions)
    }

    fn relay_floor(&self, node: &NodeId, seq: u64) {
        self.store.relay_floor(node, seq);
    }

    fn relay_lost(&self, node: &NodeId, after: u64, through: u64) {
        self.store.relay_lost(node, after, through);
    }
}

impl GatewayKeys for std::sync::Arc<SessionKeys> {
    fn access_for(&self, record: &SessionRecord) -> Option<GatewayAccess> {
        let base_url = self.base_url.get()?.clone();
        Some(GatewayAccess {
            base_url,
            api_key: self.issue(&record.id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use troupe_actors::event::{Event, EventId, SessionEnded, SessionStarted};
    use troupe_actors::ids::Timestamp;

    /// Positions appended, reservations asked for and the release, in order.
    #[derive(Default, Clone)]
    struct Recorded(Arc<Mutex<Vec<u64>>>, Arc<Mutex<Vec<String>>>);

    impl EventStore for Recorded {
        fn append(&self, item: &BusItem) {
            self.0.lock().unwrap().push(item.pos);
        }

        fn append_again(&self, item: &BusItem, _arrival: u64) {
            self.0.lock().unwrap().push(item.pos);
        }

        fn resume(&self, _ring_capacity: usize) -> StoreResume {
            self.1.lock().unwrap().push("resume".into());
            StoreResume {
                last_seq: 41,
                ..StoreResume::default()
            }
        }

        fn reserve(&self, through: u64) -> Option<BoxFuture<'static, Result<(), String>>> {
            self.1.lock().unwrap().push(format!("reserve {through}"));
            Some(Box::pin(async { Ok(()) }))
        }

        fn release(&self, last: u64) {
            self.1.lock().unwrap().push(format!("release {last}"));
        }

        fn written(
            &self,
            positions: std::ops::RangeInclusive<u64>,
        ) -> Option<BoxFuture<'static, Result<(), String>>> {
            self.1
                .lock()
                .unwrap()
                .push(format!("written {positions:?}"));
            Some(Box::pin(async { Ok(()) }))
        }

        fn relay_floor(&self, node: &NodeId, seq: u64) {
            self.1.lock().unwrap().push(format!("floor {node} {seq}"));
        }

        fn relay_lost(&self, node: &NodeId, after: u64, through: u64) {
            self.1
                .lock()
                .unwrap()
                .push(format!("lost {node} {after} {through}"));
        }
    }

    /// The watch wraps the node's store: id reservation must reach the store through it, or a
    /// crashed node hands out ids it handed out before (a regression found by the relay tests);
    /// so must the wait for a write (or the relay acknowledges what is not in the log yet: it
    /// did, until the trait stopped defaulting it to "nothing to wait for") and relay floors.
    #[test]
    fn the_watch_passes_resume_reservations_writes_floors_losses_and_the_release_on_to_the_store() {
        let keys = Arc::new(SessionKeys::new().unwrap());
        let store = Recorded::default();
        let watch = SessionWatch::new(store.clone(), keys, NodeId::new("here").unwrap());
        assert_eq!(watch.resume(8).last_seq, 41);
        assert!(
            watch.reserve(16_384).is_some(),
            "the reservation was swallowed"
        );
        assert!(
            watch.written(3..=12).is_some(),
            "the wait for a write was swallowed"
        );
        watch.relay_floor(&NodeId::new("there").unwrap(), 99);
        watch.relay_lost(&NodeId::new("there").unwrap(), 4, 6);
        watch.release(57);
        assert_eq!(
            *store.1.lock().unwrap(),
            [
                "resume",
                "reserve 16384",
                "written 3..=12",
                "floor there 99",
                "lost there 4 6",
                "release 57"
            ]
        );
    }

    #[test]
    fn the_watch_knows_which_of_this_nodes_sessions_run_and_passes_every_event_on() {
        let keys = Arc::new(SessionKeys::new().unwrap());
        let store = Recorded::default();
        let here = NodeId::new("here").unwrap();
        let watch = SessionWatch::new(store.clone(), keys.clone(), here.clone());
        let session = SessionId::new("s-7").unwrap();
        let mut pos = 0;
        let mut publish = |node: &NodeId, data: EventData| {
            pos += 1;
            watch.append(&BusItem {
                pos,
                event: Arc::new(Event {
                    rendered: Default::default(),
                    id: EventId::new(node.clone(), pos),
                    at: Timestamp::now(),
                    session: Some(session.clone()),
                    data,
                }),
            });
        };
        let started = || {
            EventData::SessionStarted(SessionStarted {
                program: "agent".into(),
                pid: Some(1),
            })
        };
        let ended = || {
            EventData::SessionSucceeded(SessionEnded {
                exit_code: Some(0),
                signal: None,
                reason: None,
                duration_ms: 1,
            })
        };
        assert!(!keys.known_running(&session));
        // Another node's session of the same name changes nothing here.
        publish(&NodeId::new("there").unwrap(), started());
        assert!(!keys.known_running(&session));
        publish(&here, started());
        assert!(keys.known_running(&session));
        publish(&here, ended());
        assert!(!keys.known_running(&session));
        assert_eq!(
            *store.0.lock().unwrap(),
            [1, 2, 3],
            "every event reached the store"
        );
    }

    #[test]
    fn a_key_names_its_session_and_a_changed_key_names_none() {
        let keys = SessionKeys::new().unwrap();
        let session = SessionId::new("s-123").unwrap();
        let key = keys.issue(&session);
        assert!(SessionKeys::is_session_key(&key));
        assert_eq!(keys.verify(&key), Some(session.clone()));
        let other = SessionId::new("s-124").unwrap();
        let forged = key.replace("s-123", "s-124");
        assert_eq!(keys.verify(&forged), None);
        assert_ne!(keys.issue(&other), forged);
        let mut flipped = key.clone().into_bytes();
        flipped[PREFIX.len()] = if flipped[PREFIX.len()] == b'0' {
            b'1'
        } else {
            b'0'
        };
        assert_eq!(keys.verify(&String::from_utf8(flipped).unwrap()), None);
        for bad in ["", "tsk_", "tsk_abc", "sk-something", &key[..key.len() - 1]] {
            assert_ne!(keys.verify(bad), Some(session.clone()), "{bad}");
        }
        // Another node's (or a restarted node's) keys are not accepted.
        assert_eq!(SessionKeys::new().unwrap().verify(&key), None);
    }
}
