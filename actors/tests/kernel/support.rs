//! Test actors and helpers shared by the kernel's integration tests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::RpcReplyPort;
use tracing::field::{Field, Visit};
use tracing::{Level, Subscriber};
use tracing_subscriber::layer::{Context as LayerContext, Layer, SubscriberExt};

use troupe_actors::event::{
    BusShared, Delivery, Event, EventBus, EventBusActor, EventBusArgs, EventBusConfig, EventFilter,
    Subscription,
};
use troupe_actors::ids::{ActorPath, NodeId};
use troupe_actors::kernel::{self, Actor, ActorError, ActorHandle, Context, HandleStatus};

/// Silences the panics these tests cause on purpose (they are the point of the tests, and the
/// default hook captures a backtrace for each, which costs milliseconds in a debug build when
/// `RUST_BACKTRACE` is set). Any other panic is reported as usual.
pub fn quiet_intended_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            let intended = ["fault injected", "was told to panic", "poison message"]
                .iter()
                .any(|marker| message.contains(marker));
            if !intended {
                default(info);
            }
        }));
    });
}

/// A shared, ordered log of lifecycle lines ("a started", "b stopped").
#[derive(Clone, Default)]
pub struct Log {
    lines: Arc<Mutex<Vec<String>>>,
    pushed: Arc<tokio::sync::Notify>,
}

impl Log {
    pub fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
        self.pushed.notify_waiters();
    }

    /// Waits until the log has `line`. It awaits the push, so paused time may auto-advance
    /// meanwhile (a loop of `yield_now` would keep it from advancing).
    pub async fn wait_for(&self, line: &str) {
        loop {
            let pushed = self.pushed.notified();
            let mut pushed = std::pin::pin!(pushed);
            pushed.as_mut().enable();
            if self.lines().iter().any(|logged| logged == line) {
                return;
            }
            pushed.await;
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.lines.lock().unwrap().clear();
    }
}

/// A test worker that logs its lifecycle and can be told to misbehave.
pub struct Probe;

#[derive(Clone)]
pub struct ProbeArgs {
    pub name: &'static str,
    pub log: Log,
    /// How many upcoming `pre_start` calls fail.
    pub failing_starts: Arc<AtomicU32>,
    /// How long the next `pre_start` that succeeds takes, in milliseconds (then 0 again); it
    /// logs "<name> starting slowly" first.
    pub slow_start_ms: Arc<AtomicU64>,
}

impl ProbeArgs {
    pub fn new(name: &'static str, log: &Log) -> Self {
        Self {
            name,
            log: log.clone(),
            failing_starts: Arc::new(AtomicU32::new(0)),
            slow_start_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

pub enum ProbeMsg {
    /// Answers with the handle's generation.
    Ping(RpcReplyPort<u64>),
    /// Panics while handling this message.
    Panic,
    /// Sleeps inside the handler (keeps the actor busy).
    Busy(Duration),
    /// Stops itself normally.
    StopNormally,
    /// Arms a timer that sends `Fired` to this incarnation after the delay.
    Arm(Duration),
    /// Logs "<name> fired".
    Fired,
    /// Sends `Fired` to itself, then panics before handling it.
    FireThenPanic,
}

impl Actor for Probe {
    type Msg = ProbeMsg;
    type State = ProbeArgs;
    type Arguments = ProbeArgs;

    async fn pre_start(
        &self,
        _ctx: &Context<ProbeMsg>,
        args: ProbeArgs,
    ) -> Result<ProbeArgs, ActorError> {
        let failing = args
            .failing_starts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            args.log.push(format!("{} failed to start", args.name));
            return Err(format!("{} cannot start yet", args.name).into());
        }
        let slow = args.slow_start_ms.swap(0, Ordering::SeqCst);
        if slow > 0 {
            args.log.push(format!("{} starting slowly", args.name));
            tokio::time::sleep(Duration::from_millis(slow)).await;
        }
        args.log.push(format!("{} started", args.name));
        Ok(args)
    }

    async fn handle(
        &self,
        ctx: &Context<ProbeMsg>,
        message: ProbeMsg,
        state: &mut ProbeArgs,
    ) -> Result<(), ActorError> {
        match message {
            ProbeMsg::Ping(reply) => {
                let generation = match ctx.handle().status() {
                    HandleStatus::Running { generation } => generation,
                    _ => 0,
                };
                let _ = reply.send(generation);
            }
            ProbeMsg::Panic => panic!("{} was told to panic", state.name),
            ProbeMsg::Busy(duration) => tokio::time::sleep(duration).await,
            ProbeMsg::StopNormally => ctx.stop(None),
            ProbeMsg::Arm(delay) => {
                ctx.send_after(delay, ProbeMsg::Fired);
            }
            ProbeMsg::Fired => state.log.push(format!("{} fired", state.name)),
            ProbeMsg::FireThenPanic => {
                if ctx.send_self(ProbeMsg::Fired).is_err() {
                    panic!("{} could not send to itself", state.name);
                }
                panic!("{} was told to panic", state.name)
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _ctx: &Context<ProbeMsg>,
        state: &mut ProbeArgs,
    ) -> Result<(), ActorError> {
        state.log.push(format!("{} stopped", state.name));
        Ok(())
    }
}

pub async fn ping(handle: &ActorHandle<ProbeMsg>) -> u64 {
    handle
        .call(ProbeMsg::Ping, Duration::from_secs(30))
        .await
        .expect("ping")
}

/// A standalone event bus for tests.
pub async fn start_bus(config: EventBusConfig) -> EventBus {
    quiet_intended_panics();
    let shared = BusShared::new(NodeId::new("test").unwrap(), config);
    let handle = ActorHandle::new(ActorPath::root().child("event_bus"));
    kernel::spawn(
        EventBusActor,
        EventBusArgs {
            shared: shared.clone(),
            store: None,
        },
        &handle,
    )
    .await
    .expect("bus starts");
    EventBus::new(handle, shared)
}

/// Receives the next event (not a lag marker). The bound is a day: under paused time a stuck
/// test still fails at once, and real timers of minutes fit under it.
pub async fn next_event(subscription: &mut Subscription) -> Arc<Event> {
    loop {
        let delivery = tokio::time::timeout(Duration::from_secs(86_400), subscription.recv())
            .await
            .expect("timed out waiting for an event")
            .expect("bus closed");
        if let Delivery::Event(event) = delivery {
            return event;
        }
    }
}

pub fn all_events(bus: &EventBus) -> Subscription {
    bus.subscribe(EventFilter::all())
}

/// One captured tracing event.
#[derive(Debug, Clone)]
pub struct Captured {
    pub level: Level,
    pub message: String,
    pub fields: BTreeMap<String, String>,
}

thread_local! {
    static CAPTURING: std::cell::RefCell<Option<Arc<Mutex<Vec<Captured>>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Collects the tracing events emitted on the current thread (use a current-thread runtime).
///
/// One global subscriber routes events to the capturing thread's buffer. A per-test
/// `set_default` subscriber would not do: tracing caches each callsite's interest across
/// threads, so a test running in parallel without a subscriber can make a callsite look
/// uninteresting to the capturing one.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<Captured>>>);

/// Stops capturing on this thread when dropped.
pub struct CaptureGuard;

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CAPTURING.with(|slot| slot.borrow_mut().take());
    }
}

impl Capture {
    pub fn install() -> (Self, CaptureGuard) {
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let subscriber = tracing_subscriber::registry().with(ThreadRouter);
            tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        });
        let capture = Self::default();
        CAPTURING.with(|slot| *slot.borrow_mut() = Some(capture.0.clone()));
        (capture, CaptureGuard)
    }

    pub fn events(&self) -> Vec<Captured> {
        self.0.lock().unwrap().clone()
    }

    pub fn with_message(&self, level: Level, message: &str) -> Vec<Captured> {
        self.events()
            .into_iter()
            .filter(|event| event.level == level && event.message == message)
            .collect()
    }
}

struct FieldVisitor<'a>(&'a mut Captured);

impl Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.0.message = text;
        } else {
            self.0.fields.insert(field.name().to_owned(), text);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.message = value.to_owned();
        } else {
            self.0
                .fields
                .insert(field.name().to_owned(), value.to_owned());
        }
    }
}

/// The global layer: hands each event to the buffer of the thread that emitted it, if any.
struct ThreadRouter;

impl<S: Subscriber> Layer<S> for ThreadRouter {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: LayerContext<'_, S>) {
        CAPTURING.with(|slot| {
            if let Some(buffer) = slot.borrow().as_ref() {
                let mut captured = Captured {
                    level: *event.metadata().level(),
                    message: String::new(),
                    fields: BTreeMap::new(),
                };
                event.record(&mut FieldVisitor(&mut captured));
                buffer.lock().unwrap().push(captured);
            }
        });
    }
}
