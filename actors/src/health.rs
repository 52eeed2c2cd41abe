//! The HealthActor: periodic aggregation of the node's health.
//!
//! Every tick it reads the actor directory (which actors run, which are restarting), counts the
//! restarts inside its window, and folds in the reports other parts of the node send it
//! ("components": sessions, providers, links). It publishes `health.degraded` when the status
//! becomes worse than healthy and `health.recovered` when it is healthy again.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::RpcReplyPort;
use serde::{Deserialize, Serialize};

use crate::event::{EventBus, EventData, HealthChanged};
use crate::ids::{ActorPath, NodeId, SessionId, Timestamp};
use crate::kernel::{
    Actor, ActorDirectory, ActorError, ActorHandle, CallError, Context, HandleStatus,
};

/// Overall status, ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Everything runs.
    Healthy,
    /// Working, with something restarting or failing (a restarting core actor included).
    Degraded,
    /// A core part is down: stopped for good, or not started.
    Unhealthy,
}

/// Tuning of the HealthActor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// How often it aggregates.
    pub tick: Duration,
    /// The window restarts are counted in.
    pub window: Duration,
    /// Restarts inside the window that make the node degraded.
    pub degraded_after_restarts: u64,
    /// Actors without which the node is unhealthy.
    pub core_actors: Vec<ActorPath>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            window: Duration::from_secs(60),
            degraded_after_restarts: 3,
            core_actors: vec![
                ActorPath::root().child("event_bus"),
                ActorPath::root().child("registry"),
            ],
        }
    }
}

/// A component's own view of its health, sent by the part of the node that owns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComponentHealth {
    /// Its status.
    pub status: HealthStatus,
    /// What it says about itself.
    pub detail: String,
    /// When it last reported.
    pub updated_at: Timestamp,
    /// Its figures as fields, when it reports any (shown beside `status` and `detail`).
    #[serde(flatten)]
    pub figures: Option<ComponentFigures>,
}

/// Structured figures a component reports with its health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ComponentFigures {
    /// The `sessions` component.
    Sessions(SessionsHealth),
}

/// The session machinery's figures (component `sessions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionsHealth {
    /// Sessions running (or starting).
    pub running: usize,
    /// Sessions waiting for a slot.
    pub queued: usize,
    /// Run slots (`sessions.max_concurrent`).
    pub max_concurrent: usize,
    /// Queue capacity (`sessions.queue_capacity`).
    pub queue_capacity: usize,
    /// The session running longest, when one runs.
    pub longest_running: Option<LongestRunning>,
}

/// The session running longest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LongestRunning {
    /// The session.
    pub id: SessionId,
    /// When it started.
    pub since: Timestamp,
    /// Seconds it had run when the figures were taken.
    pub elapsed_secs: u64,
}

/// Actor counts in a report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ActorSummary {
    /// Supervised actors known to the directory.
    pub total: usize,
    /// Of which running.
    pub running: usize,
    /// Paths starting for the first time (during node start-up).
    pub starting: Vec<ActorPath>,
    /// Paths restarting.
    pub restarting: Vec<ActorPath>,
    /// Paths stopped for good but still listed.
    pub stopped: Vec<ActorPath>,
}

/// The answer of `/v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    /// Overall status.
    pub status: HealthStatus,
    /// This node.
    pub node: NodeId,
    /// When the node started.
    pub started_at: Timestamp,
    /// Seconds since then.
    pub uptime_secs: u64,
    /// Actors.
    pub actors: ActorSummary,
    /// Restarts in the last `window_secs`.
    pub restarts_in_window: u64,
    /// The window.
    pub window_secs: u64,
    /// Reports of sessions, providers, links, ….
    pub components: BTreeMap<String, ComponentHealth>,
    /// Why the status is not healthy.
    pub reasons: Vec<String>,
}

/// Messages of the HealthActor.
pub enum HealthMsg {
    /// Aggregate now (sent by its own timer).
    Tick,
    /// A component reports its health (a hook for sessions, providers, links).
    Report {
        /// Component name, e.g. `sessions` or `providers/openai`.
        component: String,
        /// Its status.
        status: HealthStatus,
        /// A short explanation.
        detail: String,
        /// Its figures, if it reports any.
        figures: Option<ComponentFigures>,
    },
    /// A component no longer exists.
    Forget {
        /// Component name.
        component: String,
    },
    /// The current report.
    Get {
        /// Where the report goes.
        reply: RpcReplyPort<HealthReport>,
    },
}

/// What one HealthActor instance hands to the next: the last status it announced and its
/// restart samples. The HealthActor is restarted together with the actors whose restarts it
/// counts (rest_for_one), so without this a new instance would never see them.
/// Only the current instance touches it.
struct HealthMemory {
    last_status: Option<HealthStatus>,
    /// (when, total restarts then), oldest first.
    samples: VecDeque<(Instant, u64)>,
}

/// The parts of health that outlive one instance.
pub struct HealthShared {
    node: NodeId,
    started_at: Timestamp,
    started: Instant,
    memory: Mutex<HealthMemory>,
}

impl HealthShared {
    /// Creates the shared parts; restarts are counted from now.
    pub fn new(node: NodeId) -> Arc<Self> {
        let started = tokio::time::Instant::now().into_std();
        Arc::new(Self {
            node,
            started_at: Timestamp::now(),
            started,
            memory: Mutex::new(HealthMemory {
                last_status: None,
                samples: VecDeque::from([(started, 0)]),
            }),
        })
    }
}

/// Arguments of each HealthActor instance.
#[derive(Clone)]
pub struct HealthArgs {
    /// Tuning.
    pub config: HealthConfig,
    /// Survives restarts.
    pub shared: Arc<HealthShared>,
    /// What to look at.
    pub directory: ActorDirectory,
    /// Where status changes go.
    pub events: EventBus,
}

/// The HealthActor.
pub struct HealthActor;

/// State of one instance.
pub struct HealthState {
    args: HealthArgs,
    components: BTreeMap<String, ComponentHealth>,
}

impl Actor for HealthActor {
    type Msg = HealthMsg;
    type State = HealthState;
    type Arguments = HealthArgs;

    async fn pre_start(
        &self,
        _ctx: &Context<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorError> {
        Ok(HealthState {
            args,
            components: BTreeMap::new(),
        })
    }

    async fn post_start(
        &self,
        ctx: &Context<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        ctx.send_interval(state.args.config.tick, || HealthMsg::Tick);
        state.evaluate();
        Ok(())
    }

    async fn handle(
        &self,
        _ctx: &Context<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorError> {
        match message {
            HealthMsg::Tick => {
                state.evaluate();
            }
            HealthMsg::Report {
                component,
                status,
                detail,
                figures,
            } => {
                state.components.insert(
                    component,
                    ComponentHealth {
                        status,
                        detail,
                        updated_at: Timestamp::now(),
                        figures,
                    },
                );
            }
            HealthMsg::Forget { component } => {
                state.components.remove(&component);
            }
            HealthMsg::Get { reply } => {
                let _ = reply.send(state.evaluate());
            }
        }
        Ok(())
    }
}

impl HealthState {
    fn evaluate(&mut self) -> HealthReport {
        let now = tokio::time::Instant::now().into_std();
        let mut actors = ActorSummary::default();
        let total_restarts = self.args.directory.restarts_total();
        for (path, entry) in self.args.directory.list() {
            actors.total += 1;
            match entry.control.status() {
                HandleStatus::Running { .. } => actors.running += 1,
                HandleStatus::Starting => actors.starting.push(path),
                HandleStatus::Restarting => actors.restarting.push(path),
                HandleStatus::Stopped => actors.stopped.push(path),
            }
        }
        let config = &self.args.config;
        let shared = &self.args.shared;
        let mut memory = shared
            .memory
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let restarts_in_window =
            restarts_in_window(&mut memory.samples, now, total_restarts, config.window);

        let mut status = HealthStatus::Healthy;
        let mut reasons = Vec::new();
        // A core actor that is restarting is the tree healing itself: degraded (reported below
        // with the other restarting actors), so a liveness probe does not fail over a restart of
        // a few milliseconds. Stopped for good, or gone, it is down: unhealthy.
        for core in &config.core_actors {
            let status_of_core = self
                .args
                .directory
                .get(core)
                .map(|entry| entry.control.status());
            if !matches!(
                status_of_core,
                Some(HandleStatus::Running { .. } | HandleStatus::Restarting)
            ) {
                status = status.max(HealthStatus::Unhealthy);
                reasons.push(format!("{core} is not running"));
            }
        }
        if !actors.restarting.is_empty() {
            status = status.max(HealthStatus::Degraded);
            let names: Vec<_> = actors.restarting.iter().map(ToString::to_string).collect();
            reasons.push(format!("restarting: {}", names.join(", ")));
        }
        if restarts_in_window >= config.degraded_after_restarts {
            status = status.max(HealthStatus::Degraded);
            reasons.push(format!(
                "{restarts_in_window} restarts in the last {}s",
                config.window.as_secs()
            ));
        }
        for (name, component) in &self.components {
            if component.status > HealthStatus::Healthy {
                status = status.max(component.status);
                reasons.push(format!("{name}: {}", component.detail));
            }
        }

        let previous = memory.last_status.replace(status);
        drop(memory);
        if let Some(previous) = previous
            && previous != status
        {
            let change = HealthChanged {
                from: previous,
                to: status,
                reasons: reasons.clone(),
            };
            if status == HealthStatus::Healthy {
                tracing::info!(from = ?previous, "node health recovered");
                self.args
                    .events
                    .publish(None, EventData::HealthRecovered(change));
            } else {
                tracing::warn!(from = ?previous, to = ?status, reasons = ?reasons, "node health changed");
                self.args
                    .events
                    .publish(None, EventData::HealthDegraded(change));
            }
        }

        HealthReport {
            status,
            node: shared.node.clone(),
            started_at: shared.started_at,
            uptime_secs: now.saturating_duration_since(shared.started).as_secs(),
            actors,
            restarts_in_window,
            window_secs: config.window.as_secs(),
            components: self.components.clone(),
            reasons,
        }
    }
}

/// Records a sample and returns the restarts since the window's start. One sample at or before
/// the start is kept as the baseline. A sample is kept only when the total moved (the previous
/// one stands for it until then), so the samples grow with the restarts in the window, not with
/// how often health is asked for.
fn restarts_in_window(
    samples: &mut VecDeque<(Instant, u64)>,
    now: Instant,
    total: u64,
    window: Duration,
) -> u64 {
    if samples.back().is_none_or(|&(_, last)| last != total) {
        samples.push_back((now, total));
    }
    while samples.len() > 1 && now.saturating_duration_since(samples[1].0) >= window {
        samples.pop_front();
    }
    let baseline = samples.front().map_or(total, |(_, restarts)| *restarts);
    total.saturating_sub(baseline)
}

/// The HealthActor as callers use it.
#[derive(Clone)]
pub struct Health {
    handle: ActorHandle<HealthMsg>,
}

impl Health {
    /// Wraps the actor's handle.
    pub fn new(handle: ActorHandle<HealthMsg>) -> Self {
        Self { handle }
    }

    /// The actor's handle.
    pub fn handle(&self) -> &ActorHandle<HealthMsg> {
        &self.handle
    }

    /// The current report.
    pub async fn report(&self) -> Result<HealthReport, CallError> {
        self.handle
            .call(|reply| HealthMsg::Get { reply }, Duration::from_secs(5))
            .await
    }

    /// Reports a component's health (sessions, providers, links use this hook).
    pub fn report_component(
        &self,
        component: impl Into<String>,
        status: HealthStatus,
        detail: impl Into<String>,
    ) {
        self.report_figures(component, status, detail, None);
    }

    /// Reports a component's health with its figures as fields.
    pub fn report_figures(
        &self,
        component: impl Into<String>,
        status: HealthStatus,
        detail: impl Into<String>,
        figures: Option<ComponentFigures>,
    ) {
        let _ = self.handle.cast(HealthMsg::Report {
            component: component.into(),
            status,
            detail: detail.into(),
            figures,
        });
    }

    /// Removes a component.
    pub fn forget_component(&self, component: impl Into<String>) {
        let _ = self.handle.cast(HealthMsg::Forget {
            component: component.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_are_counted_over_the_window_and_idle_reports_add_no_samples() {
        let start = Instant::now();
        let window = Duration::from_secs(60);
        let at = |secs| start + Duration::from_secs(secs);
        let mut samples = VecDeque::from([(start, 0)]);
        // A thousand reports without a restart keep one sample.
        for second in 0..1000 {
            assert_eq!(
                restarts_in_window(&mut samples, at(second / 100), 0, window),
                0
            );
        }
        assert_eq!(samples.len(), 1);
        // Restarts at 10 s and 30 s; by 75 s the first has left the window, by 95 s both.
        assert_eq!(restarts_in_window(&mut samples, at(10), 1, window), 1);
        assert_eq!(restarts_in_window(&mut samples, at(30), 3, window), 3);
        assert_eq!(restarts_in_window(&mut samples, at(40), 3, window), 3);
        assert_eq!(restarts_in_window(&mut samples, at(75), 3, window), 2);
        assert_eq!(restarts_in_window(&mut samples, at(95), 3, window), 0);
        assert!(samples.len() <= 2, "{samples:?}");
    }
}
