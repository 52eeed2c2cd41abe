//! The TransportActor: one per client link (an SSE stream, a WebSocket, an MCP client).
//!
//! It owns the link's bookkeeping, not its socket: it registers the link with the registry
//! (which publishes `link.connected` / `link.disconnected`), owns the link's subscriptions (a
//! [`FilterSet`] the socket side watches), and holds the token that closes the socket side. The
//! bounded outbound queue of a link lives on its socket side: for event streams the bus
//! subscription (drop-oldest, then an `events.lagged` marker), for MCP a bounded channel whose
//! senders wait (responses are never dropped). Links are
//! temporary children of the TransportSupervisor: a link that dies is cleaned up — its socket
//! closed, its registry entry removed, even after a panic — and never restarted, and nothing else
//! is disturbed.

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::event::FilterSet;
use crate::kernel::{Actor, ActorError, Context};
use crate::registry::{LinkInfo, Registry, RegistryMsg};

/// Messages of a TransportActor.
pub enum TransportMsg {
    /// The client changed its subscriptions.
    SetFilter {
        /// The new subscriptions.
        filter: FilterSet,
        /// The filter in words, for link listings.
        summary: String,
    },
    /// The client went away; the link ends.
    ClientGone {
        /// Why, in words.
        reason: String,
    },
}

/// Arguments of a TransportActor (it is never restarted, so they are used once).
#[derive(Clone)]
pub struct TransportArgs {
    /// What the registry lists.
    pub info: LinkInfo,
    /// Where the link is registered.
    pub registry: Registry,
    /// Cancelled when the link ends, whatever the cause; the socket side closes on it.
    pub closed: CancellationToken,
    /// The link's subscriptions; the socket side reads them.
    pub filter: watch::Sender<FilterSet>,
}

/// The TransportActor.
pub struct TransportActor;

/// State of a TransportActor. Dropping it ends the link (also after a panic, when `post_stop`
/// does not run).
pub struct TransportState {
    args: TransportArgs,
    reason: String,
}

impl Drop for TransportState {
    fn drop(&mut self) {
        self.args.closed.cancel();
        self.args.registry.update(RegistryMsg::LinkDown {
            link: self.args.info.id.clone(),
            reason: std::mem::take(&mut self.reason),
        });
    }
}

impl Actor for TransportActor {
    type Msg = TransportMsg;
    type State = TransportState;
    type Arguments = TransportArgs;

    async fn pre_start(
        &self,
        _ctx: &Context<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorError> {
        args.registry.update(RegistryMsg::LinkUp(args.info.clone()));
        Ok(TransportState {
            args,
            reason: "closed by the node".into(),
        })
    }

    async fn handle(
        &self,
        ctx: &Context<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        match message {
            TransportMsg::SetFilter { filter, summary } => {
                state.args.filter.send_replace(filter);
                state.args.registry.update(RegistryMsg::LinkFilter {
                    link: state.args.info.id.clone(),
                    filter: summary,
                });
            }
            TransportMsg::ClientGone { reason } => {
                state.reason = reason;
                ctx.stop(None);
            }
        }
        Ok(())
    }
}
