//! Identifiers that cross actor, node and wire boundaries: node ids, session ids, link ids,
//! actor paths, and the microsecond timestamp every event carries.
//!
//! Every id is validated when it is built or deserialized, so a malformed id from a client or a
//! peer is rejected at the edge instead of travelling through the core.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest id accepted for nodes, sessions and links.
pub const MAX_ID_LEN: usize = 64;

/// Why a string was refused as an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct InvalidId {
    /// Which kind of id was being parsed ("node id", "session id", ...).
    pub what: &'static str,
    /// The refused input, truncated to a readable length.
    pub value: String,
    /// What rule it broke.
    pub reason: &'static str,
}

fn validate(what: &'static str, value: &str) -> Result<(), InvalidId> {
    let refuse = |reason| InvalidId {
        what,
        value: value.chars().take(80).collect(),
        reason,
    };
    if value.is_empty() {
        return Err(refuse("it is empty"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(refuse("it is longer than 64 bytes"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(refuse(
            "only ASCII letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    if value.starts_with(['.', '-']) {
        return Err(refuse("it must not start with '.' or '-'"));
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Builds the id, refusing strings that break the id rules.
            pub fn new(value: impl AsRef<str>) -> Result<Self, InvalidId> {
                let value = value.as_ref();
                validate($what, value)?;
                Ok(Self(Arc::from(value)))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = String::deserialize(deserializer)?;
                Self::new(value).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id!(
    /// A node's identity in the cluster; stable across restarts of that node.
    NodeId,
    "node id"
);
string_id!(
    /// One agent run.
    SessionId,
    "session id"
);
string_id!(
    /// One client link (an SSE stream, a WebSocket, an MCP client).
    LinkId,
    "link id"
);

/// Generates a fresh random id: `prefix` + 16 lowercase base-32 characters (80 bits), time-ordered
/// in its first characters so ids sort roughly by creation.
pub fn fresh_id(prefix: &str) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let mut out = String::with_capacity(prefix.len() + 16);
    out.push_str(prefix);
    // 8 characters of time (40 bits of milliseconds: ~34 years of range), 8 of randomness.
    for shift in (0..8).rev() {
        out.push(ALPHABET[((millis >> (shift * 5)) & 31) as usize] as char);
    }
    for _ in 0..8 {
        out.push(ALPHABET[fastrand::usize(..32)] as char);
    }
    out
}

/// Where an actor sits in a node's supervision tree: `event_bus`, `providers/openai`,
/// `sessions/s-…`. The same names appear in restart log lines, `actor.*` events, metrics and the
/// fault-injection API. The root supervisor's path is empty and prints as `node`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActorPath(Arc<str>);

impl ActorPath {
    /// The root of a node's tree (the NodeSupervisor).
    pub fn root() -> Self {
        Self(Arc::from(""))
    }

    /// Parses a path as users type it (`providers/openai`); `node` names the root.
    pub fn parse(value: &str) -> Option<Self> {
        if value == "node" || value.is_empty() {
            return Some(Self::root());
        }
        let valid = value
            .split('/')
            .all(|segment| validate("path", segment).is_ok());
        valid.then(|| Self(Arc::from(value)))
    }

    /// The path of a child named `name` under this one.
    pub fn child(&self, name: &str) -> Self {
        if self.0.is_empty() {
            Self(Arc::from(name))
        } else {
            Self(Arc::from(format!("{}/{}", self.0, name)))
        }
    }

    /// True for the node's root supervisor.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The last segment: the child's name within its supervisor.
    pub fn name(&self) -> &str {
        match self.0.rsplit_once('/') {
            Some((_, name)) => name,
            None if self.0.is_empty() => "node",
            None => &self.0,
        }
    }

    /// The path as printed (`node` for the root).
    pub fn as_str(&self) -> &str {
        if self.0.is_empty() { "node" } else { &self.0 }
    }
}

impl fmt::Display for ActorPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ActorPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ActorPath({:?})", self.as_str())
    }
}

impl Serialize for ActorPath {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ActorPath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        Self::parse(&value)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid actor path {value:?}")))
    }
}

/// Wall-clock time in microseconds since the Unix epoch.
///
/// Human-readable formats (JSON) carry it as RFC 3339 with microseconds; binary formats (the
/// cluster wire) as a plain integer.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from_system_time(SystemTime::now())
    }

    /// Converts a `SystemTime`; times before the epoch clamp to zero.
    pub fn from_system_time(time: SystemTime) -> Self {
        Self(
            time.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_micros() as u64,
        )
    }

    /// Builds a timestamp from microseconds since the epoch.
    pub const fn from_micros(micros: u64) -> Self {
        Self(micros)
    }

    /// Microseconds since the epoch.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// As a `SystemTime`.
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            humantime::format_rfc3339_micros(self.to_system_time())
        )
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({self})")
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            humantime::parse_rfc3339(&text)
                .map(Self::from_system_time)
                .map_err(serde::de::Error::custom)
        } else {
            u64::deserialize(deserializer).map(Self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_documented_alphabet_and_refuse_the_rest() {
        assert!(NodeId::new("node-a.1_b").is_ok());
        for bad in ["", "-a", ".a", "a b", "a/b", "ä", &"x".repeat(65)] {
            assert!(NodeId::new(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn ids_validate_when_deserialized() {
        let ok: SessionId = serde_json::from_str("\"s-1\"").unwrap();
        assert_eq!(ok.as_str(), "s-1");
        assert!(serde_json::from_str::<SessionId>("\"../etc\"").is_err());
    }

    #[test]
    fn fresh_ids_are_valid_unique_and_prefixed() {
        let a = fresh_id("s-");
        let b = fresh_id("s-");
        assert_ne!(a, b);
        assert!(a.starts_with("s-"));
        assert_eq!(a.len(), 18);
        SessionId::new(&a).unwrap();
    }

    #[test]
    fn actor_paths_compose_from_the_root() {
        let root = ActorPath::root();
        assert_eq!(root.to_string(), "node");
        let providers = root.child("providers");
        let openai = providers.child("openai");
        assert_eq!(openai.as_str(), "providers/openai");
        assert_eq!(openai.name(), "openai");
        assert_eq!(ActorPath::parse("providers/openai"), Some(openai));
        assert_eq!(ActorPath::parse("node"), Some(root));
        assert_eq!(ActorPath::parse("a//b"), None);
    }

    #[test]
    fn timestamps_are_rfc3339_in_json() {
        let at = Timestamp::from_micros(1_700_000_000_123_456);
        let json = serde_json::to_string(&at).unwrap();
        assert_eq!(json, "\"2023-11-14T22:13:20.123456Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), at);
    }
}
