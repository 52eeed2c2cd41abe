//! How a supervisor is told what to run: strategies, child policies, shutdown modes, and the
//! [`ChildSpec`] that knows how to start one child and which handle to bind it to.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use ractor::{ActorCell, SpawnErr};

use crate::ids::ActorPath;
use crate::kernel::{
    Actor, ActorControl, ActorHandle, ChildKind, InPlace, InPlaceRestarts, Instance, spawn_linked,
};

/// Which children restart when one fails (OTP restart strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Only the failed child.
    #[default]
    OneForOne,
    /// Every child: the others are stopped (in reverse order) and all restart in order.
    OneForAll,
    /// The failed child and every child started after it.
    RestForOne,
}

/// When a child that exited is restarted (OTP child restart types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildPolicy {
    /// Always restarted.
    #[default]
    Permanent,
    /// Restarted only after an abnormal exit (a panic, an error, a kill it did not ask for).
    Transient,
    /// Never restarted; removed when it exits.
    Temporary,
}

/// How a child is stopped by its supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Let it handle the messages already queued and run `post_stop`, for at most this long;
    /// then kill it. When the supervisor's own stop has a deadline, the child may get less:
    /// what is left of the supervisor's budget minus a reserve for the children stopped after
    /// it (each the smaller of that child's own timeout and an equal share of the budget).
    Graceful(Duration),
    /// Kill it at once (no `post_stop`).
    Kill,
}

impl Shutdown {
    /// Default for workers.
    pub const WORKER: Self = Self::Graceful(Duration::from_secs(5));
    /// Default for supervisors. A supervisor child is told when this ends and fits its own
    /// children's stops into it (see [`Shutdown::Graceful`]).
    pub const SUPERVISOR: Self = Self::Graceful(Duration::from_secs(60));
}

/// Starts instances of one child and binds them to its handle.
pub(crate) trait Starter: Send + Sync {
    /// Starts an instance linked to `supervisor`; with `in_place`, the instance may replace a
    /// failed incarnation of itself when the supervisor admits it.
    fn start(
        &self,
        supervisor: ActorCell,
        in_place: Option<Arc<dyn InPlaceRestarts>>,
    ) -> BoxFuture<'static, Result<Instance, SpawnErr>>;
    fn control(&self) -> Arc<dyn ActorControl>;
    fn unbind(&self);
    fn stop_for_good(&self);
}

struct TypedStarter<A: Actor, F> {
    factory: Arc<F>,
    handle: ActorHandle<A::Msg>,
}

impl<A, F> Starter for TypedStarter<A, F>
where
    A: Actor,
    F: Fn() -> (A, A::Arguments) + Send + Sync + 'static,
{
    fn start(
        &self,
        supervisor: ActorCell,
        in_place: Option<Arc<dyn InPlaceRestarts>>,
    ) -> BoxFuture<'static, Result<Instance, SpawnErr>> {
        let (actor, args) = (self.factory)();
        let handle = self.handle.clone();
        let in_place = in_place.map(|restarts| InPlace {
            factory: self.factory.clone() as Arc<dyn Fn() -> (A, A::Arguments) + Send + Sync>,
            restarts,
        });
        Box::pin(async move { spawn_linked(actor, args, &handle, supervisor, in_place).await })
    }

    fn control(&self) -> Arc<dyn ActorControl> {
        Arc::new(self.handle.clone())
    }

    fn unbind(&self) {
        self.handle.unbind();
    }

    fn stop_for_good(&self) {
        self.handle.stop_for_good();
    }
}

/// Everything a supervisor needs to run one child.
#[derive(Clone)]
pub struct ChildSpec {
    pub(crate) path: ActorPath,
    pub(crate) policy: ChildPolicy,
    pub(crate) shutdown: Shutdown,
    pub(crate) kind: ChildKind,
    pub(crate) starter: Arc<dyn Starter>,
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpec")
            .field("path", &self.path)
            .field("policy", &self.policy)
            .field("shutdown", &self.shutdown)
            .field("kind", &self.kind)
            .finish()
    }
}

impl ChildSpec {
    /// A worker child bound to `handle`; `factory` builds the actor and its arguments for each
    /// new instance. Permanent, graceful shutdown within 5 s, unless changed.
    pub fn worker<A, F>(handle: &ActorHandle<A::Msg>, factory: F) -> Self
    where
        A: Actor,
        F: Fn() -> (A, A::Arguments) + Send + Sync + 'static,
    {
        Self {
            path: handle.path().clone(),
            policy: ChildPolicy::Permanent,
            shutdown: Shutdown::WORKER,
            kind: ChildKind::Worker,
            starter: Arc::new(TypedStarter::<A, F> {
                factory: Arc::new(factory),
                handle: handle.clone(),
            }),
        }
    }

    /// A supervisor child (same as [`ChildSpec::worker`], marked as a supervisor, with a longer
    /// shutdown timeout).
    pub fn supervisor<A, F>(handle: &ActorHandle<A::Msg>, factory: F) -> Self
    where
        A: Actor,
        F: Fn() -> (A, A::Arguments) + Send + Sync + 'static,
    {
        Self {
            kind: ChildKind::Supervisor,
            shutdown: Shutdown::SUPERVISOR,
            ..Self::worker(handle, factory)
        }
    }

    /// Sets the restart policy.
    pub fn policy(mut self, policy: ChildPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets how the child is stopped.
    pub fn shutdown(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// The child's path.
    pub fn path(&self) -> &ActorPath {
        &self.path
    }
}
