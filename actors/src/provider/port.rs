//! The port through which provider calls reach the network: [`ProviderClient`], implemented by
//! the node with HTTP clients (and by tests with scripted ones).
//!
//! The ProviderActor decides whether, when and where a call goes; the caller's own task sends it
//! through the provider's client and reports the outcome back. So a slow provider never holds
//! up the actor's mailbox, and streamed bytes never pass through it.

use futures::future::BoxFuture;

use super::failure::ErrorClass;
use super::headers::RateLimitSnapshot;

/// One provider's client.
pub trait ProviderClient: Send + Sync + 'static {
    /// What a caller asks the provider for. Opaque to the actor crate: the node passes its
    /// gateway's request body through.
    type Request: Send + Sync + 'static;
    /// What the provider answered, as far as it was read: the whole answer, or a stream whose
    /// first event has arrived.
    type Reply: Send + 'static;

    /// Sends one attempt of `request` for `model` (the model as the provider names it). Resolves
    /// once the first byte of the answer has arrived (so that a failure before it can still be
    /// retried or sent elsewhere), or with the failure.
    fn send<'a>(
        &'a self,
        model: &'a str,
        request: &'a Self::Request,
    ) -> BoxFuture<'a, Result<Answer<Self::Reply>, Failed>>;
}

/// A successful first answer.
#[derive(Debug)]
pub struct Answer<R> {
    /// The answer.
    pub reply: R,
    /// What the provider's rate-limit headers said.
    pub rate_limits: RateLimitSnapshot,
    /// Whether the answer is already complete.
    pub progress: Progress,
}

/// How far an answer has got when [`ProviderClient::send`] resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The whole answer is in.
    Complete {
        /// Tokens it used, when the provider said.
        tokens: Option<u32>,
    },
    /// The answer streams on; its caller reports the end.
    Streaming,
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// What went wrong.
    pub class: ErrorClass,
    /// What the provider's rate-limit headers said, when it answered.
    pub rate_limits: RateLimitSnapshot,
    /// Whether the request reached the provider (false for a refused connection, or a request
    /// the client could not even build).
    pub reached_provider: bool,
}

impl Failed {
    /// A failure of `class` that never reached the provider.
    pub fn before_sending(class: ErrorClass) -> Self {
        Self {
            class,
            rate_limits: RateLimitSnapshot::default(),
            reached_provider: false,
        }
    }
}
