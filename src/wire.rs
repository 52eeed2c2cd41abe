//! The cluster wire codec: bincode 2.0.1 in its serde mode, behind this one module.
//!
//! Why one module: bincode's development stopped in 2025 (its 3.x release is a tombstone);
//! 2.0.1 is final and works, but the codec may have to be swapped for another (postcard,
//! wincode). Every byte that crosses a node boundary is encoded and decoded here and nowhere
//! else, so a swap is a change to one file plus its round-trip tests. Decoding is bounded: a
//! frame larger than [`MAX_FRAME_BYTES`], a malformed frame or trailing garbage is an error,
//! never a panic and never an unbounded allocation.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest encoded value accepted (a batch of relayed events fits easily).
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_BYTES>()
}

/// Why a value could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The value could not be encoded.
    #[error("cannot encode: {0}")]
    Encode(String),
    /// The bytes are not a valid value of the expected type.
    #[error("malformed frame: {0}")]
    Decode(String),
    /// The frame is larger than allowed.
    #[error("frame of {size} bytes is larger than the {max} allowed")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The cap.
        max: usize,
    },
    /// A value was decoded but bytes were left over.
    #[error("{0} unexpected bytes after the value")]
    Trailing(usize),
}

/// Encodes a value.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    let bytes = bincode::serde::encode_to_vec(value, config())
        .map_err(|error| WireError::Encode(error.to_string()))?;
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    Ok(bytes)
}

/// Encodes a value behind a 4-byte big-endian length prefix, in one buffer (how stream frames go
/// out: no second copy to put the prefix in front).
pub fn encode_framed<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    let mut framed = Vec::with_capacity(256);
    framed.extend_from_slice(&[0; 4]);
    bincode::serde::encode_into_std_write(value, &mut framed, config())
        .map_err(|error| WireError::Encode(error.to_string()))?;
    let size = framed.len() - 4;
    if size > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge {
            size,
            max: MAX_FRAME_BYTES,
        });
    }
    let length = u32::try_from(size).expect("at most MAX_FRAME_BYTES");
    framed[..4].copy_from_slice(&length.to_be_bytes());
    Ok(framed)
}

/// Decodes a value that must use all of `bytes`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|error| WireError::Decode(error.to_string()))?;
    if used != bytes.len() {
        return Err(WireError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// Decodes a value from the front of `bytes`; returns it and how many bytes it used (for
/// formats that put several values back to back, like membership packets).
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), WireError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    bincode::serde::decode_from_slice(bytes, config())
        .map_err(|error| WireError::Decode(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use troupe_actors::event::*;
    use troupe_actors::health::HealthStatus;
    use troupe_actors::ids::{ActorPath, LinkId, NodeId, SessionId, Timestamp};

    fn node() -> NodeId {
        NodeId::new("node-a").unwrap()
    }

    fn ended() -> SessionEnded {
        SessionEnded {
            exit_code: Some(3),
            signal: None,
            reason: Some("exit 3".into()),
            duration_ms: 1500,
        }
    }

    fn breaker() -> ProviderBreaker {
        ProviderBreaker {
            provider: "openai".into(),
            reason: Some("5 failures".into()),
            open_for_ms: Some(30_000),
        }
    }

    fn member() -> NodeMembership {
        NodeMembership {
            node: node(),
            addr: Some("127.0.0.1:7071".into()),
            generation: Some(2),
        }
    }

    /// One payload of every kind.
    fn every_kind() -> Vec<EventData> {
        let link = LinkId::new("l-1").unwrap();
        vec![
            EventData::SessionQueued(SessionQueued {
                kind: SessionKindTag::Aider,
                priority: 5,
                position: 2,
            }),
            EventData::SessionStarted(SessionStarted {
                program: "sh".into(),
                pid: Some(42),
            }),
            EventData::SessionOutput(SessionOutput {
                stream: OutputStream::Stderr,
                first_line: 10,
                lines: vec!["é🦀".into(), String::new()],
                skipped: 3,
            }),
            EventData::SessionProgress(SessionProgress {
                message: "half".into(),
                current: Some(1),
                total: Some(2),
            }),
            EventData::SessionLongRunning(SessionLongRunning {
                elapsed_secs: 120,
                threshold_secs: 60,
            }),
            EventData::SessionRateLimited(SessionRateLimited {
                provider: Some("openai".into()),
                retry_in_ms: Some(500),
                line: "Retrying in 0.5 seconds...".into(),
            }),
            EventData::SessionSucceeded(ended()),
            EventData::SessionFailed(ended()),
            EventData::SessionCancelled(ended()),
            EventData::SessionTimedOut(ended()),
            EventData::SessionInterrupted(ended()),
            EventData::ProviderRateLimited(ProviderRateLimited {
                provider: "openai".into(),
                model: "gpt-4o".into(),
                retry_after_ms: None,
                source: RateLimitSource::Headers,
            }),
            EventData::ProviderRetry(ProviderRetry {
                provider: "openai".into(),
                model: "gpt-4o".into(),
                attempt: 2,
                delay_ms: 250,
                reason: "429".into(),
            }),
            EventData::ProviderBreakerOpened(breaker()),
            EventData::ProviderBreakerHalfOpen(breaker()),
            EventData::ProviderBreakerClosed(breaker()),
            EventData::ProviderFallback(ProviderFallback {
                from: "openai/gpt-4o".into(),
                to: "anthropic/claude".into(),
                reason: "breaker open".into(),
            }),
            EventData::ProviderRecovered(ProviderRecovered {
                provider: "openai".into(),
            }),
            EventData::ActorRestarted(ActorRestarted {
                supervisor: ActorPath::root(),
                child: ActorPath::root().child("registry"),
                reason: "panic".into(),
                restart_count: 1,
                restarts_in_window: 1,
                max_restarts: 10,
                window_secs: 60,
                delay_ms: 10,
            }),
            EventData::ActorEscalated(ActorEscalated {
                supervisor: ActorPath::root().child("sessions"),
                child: ActorPath::root().child("sessions").child("s-1"),
                reason: "too many".into(),
                restarts_in_window: 11,
                window_secs: 60,
            }),
            EventData::HealthDegraded(HealthChanged {
                from: HealthStatus::Healthy,
                to: HealthStatus::Degraded,
                reasons: vec!["restarting: registry".into()],
            }),
            EventData::HealthRecovered(HealthChanged {
                from: HealthStatus::Unhealthy,
                to: HealthStatus::Healthy,
                reasons: vec![],
            }),
            EventData::LinkConnected(LinkConnected {
                link: link.clone(),
                transport: TransportKind::McpWebSocket,
                peer: Some("127.0.0.1:5555".into()),
            }),
            EventData::LinkDisconnected(LinkDisconnected {
                link,
                transport: TransportKind::Sse,
                reason: "client disconnected".into(),
            }),
            EventData::NodeJoined(member()),
            EventData::NodeSuspected(member()),
            EventData::NodeDown(member()),
            EventData::NodeLeft(member()),
            EventData::EventsLagged(EventsLagged {
                missed: 9,
                resume_after: Some(EventId::new(node(), 4)),
            }),
            EventData::SessionUnreachable(SessionUnreachable { node: node() }),
        ]
    }

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
        let bytes = encode(value).unwrap();
        let back: T = decode(&bytes).unwrap();
        assert_eq!(&back, value);
    }

    #[test]
    fn every_event_kind_round_trips() {
        let payloads = every_kind();
        let kinds: std::collections::BTreeSet<_> = payloads.iter().map(EventData::kind).collect();
        assert_eq!(kinds.len(), EventKind::ALL.len(), "a sample of every kind");
        for (seq, data) in payloads.into_iter().enumerate() {
            round_trip(&Event {
                rendered: Default::default(),
                id: EventId::new(node(), seq as u64 + 1),
                at: Timestamp::now(),
                session: (seq % 2 == 0).then(|| SessionId::new("s-1").unwrap()),
                data,
            });
        }
    }

    #[test]
    fn ids_and_filters_round_trip() {
        round_trip(&node());
        round_trip(&SessionId::new("s-1").unwrap());
        round_trip(&EventId::new(node(), u64::MAX));
        round_trip(&Timestamp::from_micros(1_700_000_000_000_001));
        round_trip(&ActorPath::root().child("providers").child("openai"));
        round_trip(&EventFilter {
            kinds: vec!["session.*".parse().unwrap(), "node.down".parse().unwrap()],
            sessions: vec![SessionId::new("s-2").unwrap()],
            nodes: vec![node()],
        });
    }

    #[test]
    fn ids_are_validated_when_decoded() {
        let bytes = encode(&"not a valid id!".to_owned()).unwrap();
        assert!(matches!(
            decode::<NodeId>(&bytes),
            Err(WireError::Decode(_))
        ));
    }

    #[test]
    fn truncated_and_random_frames_are_errors_not_panics() {
        let event = Event {
            rendered: Default::default(),
            id: EventId::new(node(), 1),
            at: Timestamp::now(),
            session: None,
            data: every_kind().remove(2),
        };
        let bytes = encode(&event).unwrap();
        for cut in 0..bytes.len() {
            assert!(decode::<Event>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut extended = bytes.clone();
        extended.push(0);
        assert_eq!(decode::<Event>(&extended), Err(WireError::Trailing(1)));
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let noise: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            let _ = decode::<Event>(&noise);
            let _ = decode::<EventFilter>(&noise);
        }
    }

    #[test]
    fn huge_length_prefixes_do_not_allocate_unbounded() {
        // A string claiming to be 2^60 bytes long.
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode::<String>(&bytes).is_err());
        assert!(matches!(
            decode::<Vec<u8>>(&vec![0; MAX_FRAME_BYTES + 1]),
            Err(WireError::TooLarge { .. })
        ));
    }
}
