//! The RegistryActor: who is where — client links, sessions, providers, cluster members.
//!
//! Writes go through the actor's mailbox (one writer, and the place where `link.*` events are
//! published); reads go to [`RegistryTables`], a lock-free read-side cache only the registry
//! writes. The tables outlive an instance of the actor, so a registry restart loses nothing:
//! queued updates are redelivered by its handle and the tables are still there.

use std::sync::Arc;

use dashmap::DashMap;
use serde::Serialize;

use crate::event::{EventBus, EventData, LinkConnected, LinkDisconnected, TransportKind};
use crate::ids::{LinkId, NodeId, SessionId, Timestamp};
use crate::kernel::{Actor, ActorError, ActorHandle, Context};

/// A live client link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkInfo {
    /// The link.
    pub id: LinkId,
    /// Its transport.
    pub transport: TransportKind,
    /// The client's address, when known.
    pub peer: Option<String>,
    /// The authenticated token's name, when there is one.
    pub principal: Option<String>,
    /// Its subscription, in words.
    pub filter: String,
    /// When it connected.
    pub connected_at: Timestamp,
}

/// Where a session lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionEntry {
    /// The session.
    pub id: SessionId,
    /// The node that owns it.
    pub node: NodeId,
}

/// A configured provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProviderEntry {
    /// Its name in the configuration.
    pub name: String,
    /// Its models.
    pub models: Vec<String>,
}

/// A cluster member as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberEntry {
    /// The node.
    pub node: NodeId,
    /// Its cluster address.
    pub addr: String,
    /// Its incarnation.
    pub generation: u64,
    /// alive, suspect, down or left.
    pub state: String,
    /// What it last said about itself (of this generation), when anything.
    pub meta: Option<crate::cluster::NodeMeta>,
}

/// The registry's read side.
#[derive(Clone, Default)]
pub struct RegistryTables {
    links: Arc<DashMap<LinkId, LinkInfo>>,
    sessions: Arc<DashMap<SessionId, SessionEntry>>,
    providers: Arc<DashMap<String, ProviderEntry>>,
    members: Arc<DashMap<NodeId, MemberEntry>>,
}

fn sorted<K, V: Clone, F: Fn(&V) -> S, S: Ord>(map: &DashMap<K, V>, key: F) -> Vec<V>
where
    K: Eq + std::hash::Hash,
{
    let mut values: Vec<V> = map.iter().map(|entry| entry.value().clone()).collect();
    values.sort_by_key(key);
    values
}

impl RegistryTables {
    /// Live links, oldest first.
    pub fn links(&self) -> Vec<LinkInfo> {
        sorted(&self.links, |link| (link.connected_at, link.id.clone()))
    }

    /// Known sessions.
    pub fn sessions(&self) -> Vec<SessionEntry> {
        sorted(&self.sessions, |entry| entry.id.clone())
    }

    /// Where a session lives.
    pub fn session(&self, id: &SessionId) -> Option<SessionEntry> {
        self.sessions.get(id).map(|entry| entry.value().clone())
    }

    /// Configured providers.
    pub fn providers(&self) -> Vec<ProviderEntry> {
        sorted(&self.providers, |entry| entry.name.clone())
    }

    /// Cluster members.
    pub fn members(&self) -> Vec<MemberEntry> {
        sorted(&self.members, |entry| entry.node.clone())
    }
}

/// Messages of the registry.
pub enum RegistryMsg {
    /// A link connected.
    LinkUp(LinkInfo),
    /// A link's subscription changed.
    LinkFilter {
        /// The link.
        link: LinkId,
        /// Its new subscription, in words.
        filter: String,
    },
    /// A link went away.
    LinkDown {
        /// The link.
        link: LinkId,
        /// Why.
        reason: String,
    },
    /// A session appeared or moved.
    SessionUp(SessionEntry),
    /// A session is gone from this view.
    SessionDown(SessionId),
    /// A provider is configured.
    ProviderUp(ProviderEntry),
    /// A member's view changed.
    MemberUp(MemberEntry),
    /// A member is gone from the view.
    MemberDown(NodeId),
}

/// Arguments of each registry instance.
#[derive(Clone)]
pub struct RegistryArgs {
    /// The tables (they outlive instances).
    pub tables: RegistryTables,
    /// Where `link.*` events go.
    pub events: EventBus,
}

/// The RegistryActor.
pub struct RegistryActor;

/// A registry instance's state: what it was given, and the links it was told were down before
/// it heard they were up.
pub struct RegistryState {
    args: RegistryArgs,
    gone_early: GoneEarly,
}

/// Links whose `LinkDown` came before their `LinkUp`, the most recent [`GONE_EARLY`] of them.
///
/// A link's `LinkUp` taken by an instance that then failed is redelivered to the next one, and
/// may reach it after the link's `LinkDown` (sent later, by a link that ended quickly; see
/// ARCHITECTURE.md on redelivery): without this the late `LinkUp` would list a link that is
/// gone, for as long as the node runs. Link ids are never reused, so an id seen here is gone.
#[derive(Debug, Default)]
struct GoneEarly {
    order: std::collections::VecDeque<LinkId>,
    ids: std::collections::HashSet<LinkId>,
}

/// How many early `LinkDown`s a registry instance remembers.
const GONE_EARLY: usize = 1024;

impl GoneEarly {
    fn insert(&mut self, link: LinkId) {
        if !self.ids.insert(link.clone()) {
            return;
        }
        self.order.push_back(link);
        if self.order.len() > GONE_EARLY
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
    }

    /// Whether `link` went down before this `LinkUp`; it is forgotten either way.
    fn take(&mut self, link: &LinkId) -> bool {
        if !self.ids.remove(link) {
            return false;
        }
        self.order.retain(|gone| gone != link);
        true
    }
}

impl Actor for RegistryActor {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = RegistryArgs;

    async fn pre_start(
        &self,
        _ctx: &Context<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorError> {
        Ok(RegistryState {
            args,
            gone_early: GoneEarly::default(),
        })
    }

    async fn handle(
        &self,
        _ctx: &Context<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        let RegistryState { args, gone_early } = state;
        let tables = &args.tables;
        match message {
            RegistryMsg::LinkUp(info) => {
                if gone_early.take(&info.id) {
                    return Ok(());
                }
                args.events.publish(
                    None,
                    EventData::LinkConnected(LinkConnected {
                        link: info.id.clone(),
                        transport: info.transport,
                        peer: info.peer.clone(),
                    }),
                );
                tables.links.insert(info.id.clone(), info);
            }
            RegistryMsg::LinkFilter { link, filter } => {
                if let Some(mut info) = tables.links.get_mut(&link) {
                    info.filter = filter;
                }
            }
            RegistryMsg::LinkDown { link, reason } => match tables.links.remove(&link) {
                Some((_, info)) => args.events.publish(
                    None,
                    EventData::LinkDisconnected(LinkDisconnected {
                        link,
                        transport: info.transport,
                        reason,
                    }),
                ),
                None => gone_early.insert(link),
            },
            RegistryMsg::SessionUp(entry) => {
                tables.sessions.insert(entry.id.clone(), entry);
            }
            RegistryMsg::SessionDown(id) => {
                tables.sessions.remove(&id);
            }
            RegistryMsg::ProviderUp(entry) => {
                tables.providers.insert(entry.name.clone(), entry);
            }
            RegistryMsg::MemberUp(entry) => {
                tables.members.insert(entry.node.clone(), entry);
            }
            RegistryMsg::MemberDown(node) => {
                tables.members.remove(&node);
            }
        }
        Ok(())
    }
}

/// The registry as callers use it: writes through the actor, reads from the tables.
#[derive(Clone)]
pub struct Registry {
    handle: ActorHandle<RegistryMsg>,
    tables: RegistryTables,
}

impl Registry {
    /// Wraps the actor's handle and its tables.
    pub fn new(handle: ActorHandle<RegistryMsg>, tables: RegistryTables) -> Self {
        Self { handle, tables }
    }

    /// The actor's handle.
    pub fn handle(&self) -> &ActorHandle<RegistryMsg> {
        &self.handle
    }

    /// The read side.
    pub fn tables(&self) -> &RegistryTables {
        &self.tables
    }

    /// Sends an update; returns false if the registry has stopped for good.
    pub fn update(&self, message: RegistryMsg) -> bool {
        self.handle.cast(message).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(n: usize) -> LinkId {
        LinkId::new(format!("l-{n}")).unwrap()
    }

    #[test]
    fn early_link_downs_are_remembered_up_to_the_bound_and_each_taken_once() {
        let mut gone = GoneEarly::default();
        for n in 0..GONE_EARLY + 10 {
            gone.insert(link(n));
        }
        gone.insert(link(GONE_EARLY + 9)); // a repeat takes no room
        assert_eq!(gone.order.len(), GONE_EARLY);
        assert_eq!(gone.ids.len(), GONE_EARLY);
        assert!(!gone.take(&link(9)), "the oldest ten were forgotten");
        assert!(gone.take(&link(10)));
        assert!(!gone.take(&link(10)), "taken once");
        assert_eq!(gone.order.len(), GONE_EARLY - 1);
    }
}
