//! The kernel: the [`Actor`] trait troupe actors implement, the [`Context`] they run with, and
//! the restart-surviving [`ActorHandle`] callers hold. Built on ractor's runtime (mailboxes,
//! linking, supervision events); the restart policy itself lives in [`crate::supervisor`].

mod actor;
mod deadline;
mod directory;
mod handle;
mod idle;
mod stats;

pub use actor::{Actor, ActorError, Context, spawn};
pub(crate) use actor::{Admission, InPlace, InPlaceRestarts, Instance, spawn_linked};
pub(crate) use deadline::within;
pub use directory::{ActorControl, ActorDirectory, ChildKind, DirectoryEntry, FaultError};
pub use handle::{
    ActorHandle, CallError, DEFAULT_RESTART_BACKLOG, Envelope, FaultKind, HandleStatus, SendError,
    SendErrorKind,
};
pub(crate) use idle::when_worker_idles;
pub use stats::{ActorStats, ActorStatsSnapshot};
