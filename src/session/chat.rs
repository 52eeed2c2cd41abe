//! The node's chat runner: `chat` sessions run through the providers (their actors' budgets,
//! breakers, retries and fallback), streamed, with each piece of the reply delivered to the
//! session as output on the `tokens` stream, and the end as an exit (0, or 1 after an error
//! line). Events reach the session through the same bounded delivery the process runner uses,
//! so a restarting SessionActor finds them when it reattaches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use serde_json::{Value, json};
use troupe_actors::event::OutputStream;
use troupe_actors::ids::SessionId;
use troupe_actors::provider::{CallMeta, ProviderSet};
use troupe_actors::session::{
    ChatRunner, ChatSession, ExitStatus, ProcessEvent, ProcessSink, RunnerError,
};

use crate::process::delivery::{BacklogLimits, Delivery};
use crate::provider::client::{ChatReply, ChatRequest, HttpProvider};

/// What a chat run keeps while its session is not taking events.
const BACKLOG: BacklogLimits = BacklogLimits {
    lines: 10_000,
    bytes: 4 * 1024 * 1024,
};

/// Runs chat sessions through the node's providers.
pub struct NodeChats {
    providers: ProviderSet<HttpProvider>,
    runs: Arc<Mutex<HashMap<SessionId, Arc<Run>>>>,
}

struct Run {
    delivery: Mutex<Delivery>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl NodeChats {
    /// A runner over `providers`.
    pub fn new(providers: ProviderSet<HttpProvider>) -> Self {
        Self {
            providers,
            runs: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

/// Delivers `event` unless the run already ended; forgets the run once its exit is delivered.
fn emit(
    runs: &Mutex<HashMap<SessionId, Arc<Run>>>,
    session: &SessionId,
    run: &Run,
    event: ProcessEvent,
) {
    let delivered = {
        let mut delivery = lock(&run.delivery);
        if delivery.exit_emitted() {
            return;
        }
        delivery.push(event);
        delivery.exit_delivered()
    };
    if delivered {
        lock(runs).remove(session);
    }
}

fn output(stream: OutputStream, text: String) -> ProcessEvent {
    ProcessEvent::Output {
        stream,
        lines: vec![text],
    }
}

fn exited(code: Option<i32>) -> ProcessEvent {
    ProcessEvent::Exited(ExitStatus { code, signal: None })
}

/// Runs one chat to its end, delivering as it goes. It does not wait for the session to have
/// room (see [`ProcessSink::ready`]): a reply is bounded by its model's output limit, and
/// holding back a provider's stream would be taken for the provider's stall.
async fn run_chat(
    providers: ProviderSet<HttpProvider>,
    session: SessionId,
    chat: ChatSession,
    emit: impl Fn(ProcessEvent),
) {
    let fail = |message: String| {
        emit(output(OutputStream::Stderr, message));
        emit(exited(Some(1)));
    };
    let route = match providers.route(&chat.model) {
        Ok(route) => route,
        Err(error) => return fail(error.to_string()),
    };
    let messages: Vec<Value> = chat
        .messages
        .iter()
        .map(|message| json!({"role": message.role, "content": message.content}))
        .collect();
    let request = ChatRequest::new(json!({
        "model": chat.model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    }));
    let meta = CallMeta {
        estimate_tokens: request.estimate_tokens(),
        session: Some(session),
    };
    let committed = match providers.call(&route, &request, &meta).await {
        Ok(committed) => committed,
        Err(error) => return fail(error.to_string()),
    };
    match committed.reply {
        ChatReply::Complete(body) => {
            let body: Value = serde_json::from_slice(&body).unwrap_or_default();
            let text = body
                .pointer("/choices/0/message/content")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !text.is_empty() {
                emit(output(OutputStream::Tokens, text.to_owned()));
            }
            emit(exited(Some(0)));
        }
        ChatReply::Stream(mut chunks) => {
            let guard = committed.stream;
            while let Some(item) = chunks.next().await {
                match item {
                    Ok(chunk) => {
                        let Ok(chunk) = serde_json::from_slice::<Value>(&chunk) else {
                            continue;
                        };
                        if let Some(piece) = chunk
                            .pointer("/choices/0/delta/content")
                            .and_then(Value::as_str)
                            .filter(|piece| !piece.is_empty())
                        {
                            emit(output(OutputStream::Tokens, piece.to_owned()));
                        }
                    }
                    Err(class) => {
                        let message = format!(
                            "{}: the reply broke off: {}",
                            committed.target,
                            class.describe()
                        );
                        if let Some(guard) = guard {
                            guard.fail(class);
                        }
                        return fail(message);
                    }
                }
            }
            if let Some(guard) = guard {
                guard.succeed(chunks.tokens());
            }
            emit(exited(Some(0)));
        }
    }
}

impl ChatRunner for NodeChats {
    fn start(
        &self,
        session: &SessionId,
        chat: &ChatSession,
        sink: Arc<dyn ProcessSink>,
    ) -> Result<(), RunnerError> {
        let run = Arc::new(Run {
            delivery: Mutex::new(Delivery::new(sink, BACKLOG)),
            task: Mutex::new(None),
        });
        {
            let mut runs = lock(&self.runs);
            if runs.contains_key(session) {
                return Err(RunnerError::AlreadyRunning(session.clone()));
            }
            runs.insert(session.clone(), run.clone());
        }
        let runs = self.runs.clone();
        let id = session.clone();
        let emitter = {
            let run = run.clone();
            move |event| emit(&runs, &id, &run, event)
        };
        let task = tokio::spawn(run_chat(
            self.providers.clone(),
            session.clone(),
            chat.clone(),
            emitter,
        ));
        *lock(&run.task) = Some(task.abort_handle());
        Ok(())
    }

    fn reattach(&self, session: &SessionId, sink: Arc<dyn ProcessSink>) -> bool {
        let Some(run) = lock(&self.runs).get(session).cloned() else {
            return false;
        };
        let delivered = {
            let mut delivery = lock(&run.delivery);
            if delivery.exit_delivered() {
                return false;
            }
            delivery.reattach(sink);
            delivery.exit_delivered()
        };
        if delivered {
            lock(&self.runs).remove(session);
        }
        true
    }

    fn cancel(&self, session: &SessionId) -> bool {
        let Some(run) = lock(&self.runs).get(session).cloned() else {
            return false;
        };
        if lock(&run.delivery).exit_emitted() {
            return false;
        }
        if let Some(task) = lock(&run.task).take() {
            // Dropping the call's guard reports it abandoned to its provider.
            task.abort();
        }
        emit(&self.runs, session, &run, exited(None));
        true
    }
}
