//! Opening a client link: a TransportActor under the TransportSupervisor, and the guard the
//! socket side holds. Shared by every transport (SSE, WebSocket, MCP).
//!
//! The socket side ends when the link's `closed` token is cancelled (the actor stopped, failed,
//! or the node shuts down); the actor ends when the socket side drops its [`LinkGuard`] (the
//! client went away). Either way the other side follows and the registry forgets the link.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use troupe_actors::event::{DEFAULT_SUBSCRIPTION, EventFilter, FilterSet, TransportKind};
use troupe_actors::ids::{LinkId, Timestamp, fresh_id};
use troupe_actors::kernel::ActorHandle;
use troupe_actors::link::{TransportActor, TransportArgs, TransportMsg};
use troupe_actors::registry::LinkInfo;
use troupe_actors::supervisor::{ChildPolicy, ChildSpec, Shutdown, StartChildError};

use crate::auth::Principal;
use crate::node::NodeCore;

/// Why a link could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The node already serves `max` links.
    #[error("the node already serves its maximum of {max} links; retry later")]
    TooMany {
        /// The bound.
        max: usize,
    },
    /// The link's token holds its maximum of links already.
    #[error(
        "token {token:?} already holds its maximum of {max} links; close some (or use another \
         token) and retry"
    )]
    TooManyForToken {
        /// The token's name.
        token: String,
        /// The bound (`auth.max_links_per_token`).
        max: usize,
    },
    /// The TransportSupervisor is not available (restarting or shutting down).
    #[error("links cannot be opened right now: {0}")]
    Unavailable(String),
}

/// How many links each token holds.
#[derive(Debug, Default)]
pub struct TokenLinks(dashmap::DashMap<String, usize>);

impl TokenLinks {
    /// A slot for one more link of `token`, while it holds fewer than `max`.
    fn take(self: &Arc<Self>, token: &str, max: usize) -> Option<TokenSlot> {
        let mut held = self.0.entry(token.to_owned()).or_insert(0);
        if *held >= max {
            return None;
        }
        *held += 1;
        drop(held);
        Some(TokenSlot {
            links: Arc::clone(self),
            token: token.to_owned(),
        })
    }

    /// How many links `token` holds.
    pub fn held(&self, token: &str) -> usize {
        self.0.get(token).map_or(0, |held| *held)
    }
}

/// One link's place in its token's count, given back when the link's socket side goes.
#[derive(Debug)]
struct TokenSlot {
    links: Arc<TokenLinks>,
    token: String,
}

impl Drop for TokenSlot {
    fn drop(&mut self) {
        if let Some(mut held) = self.links.0.get_mut(&self.token) {
            *held = held.saturating_sub(1);
        }
        self.links.0.remove_if(&self.token, |_, held| *held == 0);
    }
}

/// The socket side's hold on a link.
pub struct LinkGuard {
    /// The link's id.
    pub id: LinkId,
    /// Cancelled when the link must end.
    pub closed: CancellationToken,
    /// The link's current subscriptions.
    pub filter: watch::Receiver<FilterSet>,
    handle: ActorHandle<TransportMsg>,
    reason: Option<String>,
    /// Its place in its token's count.
    _slot: Option<TokenSlot>,
}

impl LinkGuard {
    /// The TransportActor's handle.
    pub fn handle(&self) -> &ActorHandle<TransportMsg> {
        &self.handle
    }

    /// Asks the TransportActor to change the link's subscriptions; the new set arrives on
    /// [`LinkGuard::filter`]. False when the link is ending.
    pub fn set_filter(&self, filter: FilterSet) -> bool {
        let summary = describe_filters(&filter);
        self.handle
            .cast(TransportMsg::SetFilter { filter, summary })
            .is_ok()
    }

    /// Records why the socket side ends (default: "client disconnected").
    pub fn set_reason(&mut self, reason: impl Into<String>) {
        self.reason = Some(reason.into());
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let reason = self
            .reason
            .take()
            .unwrap_or_else(|| "client disconnected".into());
        let _ = self.handle.cast(TransportMsg::ClientGone { reason });
    }
}

/// The longest description of a link's subscriptions in link listings, in bytes: a WebSocket
/// link may hold 16 subscriptions of 64 kinds, sessions and nodes each (about 140 KB written
/// out), and `/v1/links` lists up to every link of the node.
pub const MAX_FILTER_DESCRIPTION: usize = 512;

/// Describes a link's subscriptions for link listings: `all`, `kind=session.* session=s-1`, or
/// `name: …; name: …` when it holds several (`none` when it holds none); cut at
/// [`MAX_FILTER_DESCRIPTION`] bytes, ending with `… (N subscriptions)` when cut.
pub fn describe_filters(filters: &FilterSet) -> String {
    let parts: Vec<(&str, String)> = filters
        .iter()
        .map(|(name, filter)| (name, describe_filter(filter)))
        .collect();
    let whole = match parts.as_slice() {
        [] => "none".into(),
        [(name, only)] if *name == DEFAULT_SUBSCRIPTION => only.clone(),
        _ => parts
            .iter()
            .map(|(name, filter)| format!("{name}: {filter}"))
            .collect::<Vec<_>>()
            .join("; "),
    };
    if whole.len() <= MAX_FILTER_DESCRIPTION {
        return whole;
    }
    let tail = format!("… ({} subscriptions)", parts.len());
    let mut cut = MAX_FILTER_DESCRIPTION - tail.len();
    while !whole.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{tail}", &whole[..cut])
}

/// Describes a filter for link listings.
pub fn describe_filter(filter: &EventFilter) -> String {
    let mut parts = Vec::new();
    if !filter.kinds.is_empty() {
        let kinds: Vec<String> = filter.kinds.iter().map(ToString::to_string).collect();
        parts.push(format!("kind={}", kinds.join(",")));
    }
    if !filter.sessions.is_empty() {
        let sessions: Vec<&str> = filter.sessions.iter().map(|s| s.as_str()).collect();
        parts.push(format!("session={}", sessions.join(",")));
    }
    if !filter.nodes.is_empty() {
        let nodes: Vec<&str> = filter.nodes.iter().map(|n| n.as_str()).collect();
        parts.push(format!("node={}", nodes.join(",")));
    }
    if parts.is_empty() {
        "all".into()
    } else {
        parts.join(" ")
    }
}

/// A place in `principal`'s count of links for a stream that is not a link of its own (a
/// session's followed output), held as long as the stream: one token cannot open such streams
/// without bound either (`auth.max_links_per_token`, shared with its links).
pub fn take_stream_slot(
    core: &NodeCore,
    principal: &Principal,
) -> Result<impl Send + Sync + 'static, LinkError> {
    let max = core.config.auth.max_links_per_token;
    core.token_links
        .take(&principal.name, max)
        .ok_or_else(|| LinkError::TooManyForToken {
            token: principal.name.clone(),
            max,
        })
}

/// Starts a TransportActor for a new link.
pub async fn open_link(
    core: &Arc<NodeCore>,
    transport: TransportKind,
    peer: Option<SocketAddr>,
    principal: Option<&Principal>,
    filter: FilterSet,
) -> Result<LinkGuard, LinkError> {
    // One client, or one token's clients together, cannot take every link of the node from
    // the others (`auth.max_links_per_token`). Links without a token (the node's own stdio
    // MCP) do not count.
    let max = core.config.auth.max_links_per_token;
    let slot = match principal {
        Some(principal) => Some(core.token_links.take(&principal.name, max).ok_or_else(|| {
            LinkError::TooManyForToken {
                token: principal.name.clone(),
                max,
            }
        })?),
        None => None,
    };
    let id = LinkId::new(fresh_id("l-")).expect("generated ids are valid");
    let handle = ActorHandle::new(core.tree.links.path().child(id.as_str()));
    let closed = CancellationToken::new();
    let (filter_tx, filter_rx) = watch::channel(filter.clone());
    let args = TransportArgs {
        info: LinkInfo {
            id: id.clone(),
            transport,
            peer: peer.map(|peer| peer.to_string()),
            principal: principal.map(|principal| principal.name.clone()),
            filter: describe_filters(&filter),
            connected_at: Timestamp::now(),
        },
        registry: core.tree.registry.clone(),
        closed: closed.clone(),
        filter: filter_tx,
    };
    let spec = ChildSpec::worker(&handle, move || (TransportActor, args.clone()))
        .policy(ChildPolicy::Temporary)
        .shutdown(Shutdown::Graceful(Duration::from_secs(2)));
    core.tree
        .links
        .start_child(spec)
        .await
        .map_err(|error| match error {
            StartChildError::MaxChildren { max } => LinkError::TooMany { max },
            other => LinkError::Unavailable(other.to_string()),
        })?;
    Ok(LinkGuard {
        id,
        closed,
        filter: filter_rx,
        handle,
        reason: None,
        _slot: slot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use troupe_actors::ids::SessionId;

    /// Regression: a WebSocket link's 16 subscriptions of 64 sessions each were written out
    /// whole (about 140 KB a link), so one viewer's 200 links made `/v1/links` answer 28 MB.
    #[test]
    fn a_links_description_is_cut_at_its_bound_saying_how_many_subscriptions_it_has() {
        let mut filters = FilterSet::none();
        for n in 0..16 {
            let filter = EventFilter {
                sessions: (0..64)
                    .map(|s| SessionId::new(format!("s-{n}-{s}-{}", "x".repeat(40))).unwrap())
                    .collect(),
                ..EventFilter::all()
            };
            filters.subscribe(&format!("sub{n}"), filter).unwrap();
        }
        let described = describe_filters(&filters);
        assert!(
            described.len() <= MAX_FILTER_DESCRIPTION,
            "{}",
            described.len()
        );
        assert!(described.starts_with("sub"), "{described}");
        assert!(described.ends_with("… (16 subscriptions)"), "{described}");
        let short = FilterSet::single(EventFilter::all());
        assert_eq!(describe_filters(&short), "all", "short ones are whole");
    }

    /// Regression: one token (a viewer's, say) could open every link the node serves, and a
    /// legacy MCP session keeps its link with no connection open, so a script could fill the
    /// node's table and shut every other client out.
    #[test]
    fn a_token_holds_at_most_its_share_of_links_and_gets_each_back_when_one_goes() {
        let links = Arc::new(TokenLinks::default());
        let first = links.take("dash", 2).unwrap();
        let second = links.take("dash", 2).unwrap();
        assert!(links.take("dash", 2).is_none(), "past the token's bound");
        let other = links
            .take("ops", 2)
            .expect("another token is not held back");
        assert_eq!((links.held("dash"), links.held("ops")), (2, 1));
        drop(first);
        let third = links.take("dash", 2).expect("a slot came back");
        drop((second, third, other));
        assert_eq!((links.held("dash"), links.held("ops")), (0, 0));
        assert!(links.0.is_empty(), "no entry left for tokens without links");
    }
}
