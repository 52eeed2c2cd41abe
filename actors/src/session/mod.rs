//! Sessions: one agent run each. The pure parts (the state machine, the spec and its limits)
//! and the ports the node implements (a process runner, a session store), and the Aider preset.

pub mod aider;
mod ports;
mod spec;
mod state;

pub use ports::{
    CommandLine, ExitStatus, LeftoverGroup, OutputLimits, ProcessEvent, ProcessRunner, ProcessSink,
    RunnerError, SessionStore, StoreError,
};
pub use spec::{
    AiderSession, ChatMessage, ChatSession, CommandSession, MAX_PRIORITY, ProcessInfo, SessionKind,
    SessionRecord, SessionSpec, SpecError, SpecLimits, Transition,
};
pub use state::{InvalidTransition, SessionState};
