//! Sessions: one agent run each.
//!
//! ```text
//! SessionSupervisor (dynamic one_for_one)     sessions
//! ├── SessionManager (permanent)              sessions/manager   admission, queue, recovery
//! └── SessionActor ×N (transient)             sessions/<id>      one per run
//! ```
//!
//! The pure parts (the state machine, the spec and its limits), the actors, and the ports the
//! node implements (a process runner, a chat runner, a session store), and the Aider preset.

mod actor;
pub mod aider;
mod chat;
mod context;
mod flood;
mod manager;
mod ports;
mod spec;
mod state;

pub use actor::{
    SessionActor, SessionActorState, SessionArgs, SessionMsg, describe_exit, program_of,
};
pub use chat::{ChatInterpreter, ChatRunner};
pub use context::{
    CommandBuilder, DURATION_BUCKETS_SECS, OutputCredit, OutputInterpreter, OutputSignal,
    SessionContext, SessionSettings, SessionStats,
};
pub use manager::{
    Admitted, CancelError, MANAGER_TIMEOUT, ManagerArgs, ManagerMsg, ManagerShared, ManagerState,
    SessionManager, SessionsSummary, SubmitError,
};

pub use ports::{
    CommandLine, ExitStatus, Leftover, LeftoverGroup, LoggedLine, OutputLimits, ProcessEvent,
    ProcessRunner, ProcessSink, RunnerError, SessionStore, StoreError,
};
pub use spec::{
    AiderSession, ChatMessage, ChatSession, CommandSession, MAX_ARG_STRLEN, MAX_PRIORITY,
    ProcessInfo, SESSION_ID_ENV, SessionKind, SessionRecord, SessionSpec, SpecError, SpecLimits,
    StopRequest, Transition, refused_env,
};
pub use state::{InvalidTransition, SessionState};
