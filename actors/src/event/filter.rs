//! Subscription filters: which kinds, sessions and nodes a subscriber wants.
//!
//! Within one dimension the values are alternatives (any kind listed); across dimensions all must
//! match (this kind AND this session). An empty dimension matches everything. A link may hold
//! several named filters at once ([`FilterSet`]): an event passes when any of them matches.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::model::{Event, EventKind, UnknownKind};
use crate::ids::{NodeId, SessionId};

/// Most values a filter accepts per dimension (a limit on what clients can make us check).
pub const MAX_FILTER_VALUES: usize = 64;

/// One kind, or a family of kinds (`session.*` or just `session`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KindPattern {
    /// Exactly this kind.
    Exact(EventKind),
    /// Every kind whose name starts with this family and a dot.
    Family(String),
}

impl KindPattern {
    /// True when `kind` matches.
    pub fn matches(&self, kind: EventKind) -> bool {
        match self {
            Self::Exact(exact) => *exact == kind,
            Self::Family(family) => kind
                .as_str()
                .strip_prefix(family.as_str())
                .is_some_and(|rest| rest.starts_with('.')),
        }
    }
}

impl FromStr for KindPattern {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let family = s.strip_suffix(".*").unwrap_or(s);
        if let Ok(kind) = s.parse::<EventKind>() {
            return Ok(Self::Exact(kind));
        }
        let known_family = EventKind::ALL
            .iter()
            .any(|kind| KindPattern::Family(family.to_owned()).matches(*kind));
        if known_family {
            Ok(Self::Family(family.to_owned()))
        } else {
            Err(UnknownKind(s.chars().take(80).collect()))
        }
    }
}

impl fmt::Display for KindPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(kind) => f.write_str(kind.as_str()),
            Self::Family(family) => write!(f, "{family}.*"),
        }
    }
}

impl Serialize for KindPattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KindPattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a subscriber wants to see.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventFilter {
    /// Kinds or kind families; empty = all.
    #[serde(default)]
    pub kinds: Vec<KindPattern>,
    /// Sessions; empty = all (including events about no session).
    #[serde(default)]
    pub sessions: Vec<SessionId>,
    /// Publishing nodes; empty = all.
    #[serde(default)]
    pub nodes: Vec<NodeId>,
}

/// A filter with more values than allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("too many {dimension} values in the filter ({count}); at most 64 are allowed")]
pub struct FilterTooLarge {
    /// `kind`, `session` or `node`.
    pub dimension: &'static str,
    /// How many were given.
    pub count: usize,
}

impl EventFilter {
    /// Everything.
    pub fn all() -> Self {
        Self::default()
    }

    /// Checks the per-dimension limits.
    pub fn validate(&self) -> Result<(), FilterTooLarge> {
        for (dimension, count) in [
            ("kind", self.kinds.len()),
            ("session", self.sessions.len()),
            ("node", self.nodes.len()),
        ] {
            if count > MAX_FILTER_VALUES {
                return Err(FilterTooLarge { dimension, count });
            }
        }
        Ok(())
    }

    /// True when `event` passes the filter.
    pub fn matches(&self, event: &Event) -> bool {
        self.matches_parts(event.kind(), event.session.as_ref(), event.node())
    }

    /// True when an event of this kind, session and node passes the filter.
    pub fn matches_parts(
        &self,
        kind: EventKind,
        session: Option<&SessionId>,
        node: &NodeId,
    ) -> bool {
        (self.kinds.is_empty() || self.kinds.iter().any(|p| p.matches(kind)))
            && (self.sessions.is_empty() || session.is_some_and(|s| self.sessions.contains(s)))
            && (self.nodes.is_empty() || self.nodes.contains(node))
    }
}

/// Most named subscriptions one link may hold.
pub const MAX_SUBSCRIPTIONS: usize = 16;

/// Longest subscription name, in bytes.
pub const MAX_SUBSCRIPTION_NAME: usize = 64;

/// The name of the subscription a link starts with (its URL's filter).
pub const DEFAULT_SUBSCRIPTION: &str = "default";

/// A link's subscriptions: named filters, any of which lets an event through. Empty means
/// nothing passes (every subscription was cancelled).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterSet {
    subscriptions: BTreeMap<String, EventFilter>,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    /// The link already holds the most subscriptions allowed.
    #[error("a link holds at most {MAX_SUBSCRIPTIONS} subscriptions; unsubscribe one first")]
    TooMany,
    /// The name is empty, too long, or not printable ASCII.
    #[error("subscription names are 1 to 64 printable ASCII characters")]
    BadName,
    /// The filter is over its limits.
    #[error(transparent)]
    Filter(#[from] FilterTooLarge),
}

impl FilterSet {
    /// One subscription, named [`DEFAULT_SUBSCRIPTION`].
    pub fn single(filter: EventFilter) -> Self {
        let mut subscriptions = BTreeMap::new();
        subscriptions.insert(DEFAULT_SUBSCRIPTION.to_owned(), filter);
        Self { subscriptions }
    }

    /// No subscription: nothing passes.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the subscription `name`.
    pub fn subscribe(&mut self, name: &str, filter: EventFilter) -> Result<(), SubscriptionError> {
        if name.is_empty()
            || name.len() > MAX_SUBSCRIPTION_NAME
            || !name.bytes().all(|byte| byte.is_ascii_graphic())
        {
            return Err(SubscriptionError::BadName);
        }
        filter.validate()?;
        if !self.subscriptions.contains_key(name) && self.subscriptions.len() >= MAX_SUBSCRIPTIONS {
            return Err(SubscriptionError::TooMany);
        }
        self.subscriptions.insert(name.to_owned(), filter);
        Ok(())
    }

    /// Removes the subscription `name`; false when there was none.
    pub fn unsubscribe(&mut self, name: &str) -> bool {
        self.subscriptions.remove(name).is_some()
    }

    /// The subscriptions' names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.subscriptions.keys().map(String::as_str)
    }

    /// The subscriptions.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &EventFilter)> {
        self.subscriptions
            .iter()
            .map(|(name, filter)| (name.as_str(), filter))
    }

    /// True when no subscription is left.
    pub fn is_empty(&self) -> bool {
        self.subscriptions.is_empty()
    }

    /// True when the set is its own [`FilterSet::cover`] (it holds one subscription), so an
    /// event that passed the cover needs no second check.
    pub fn is_its_cover(&self) -> bool {
        self.subscriptions.len() == 1
    }

    /// True when some subscription matches `event`.
    pub fn matches(&self, event: &Event) -> bool {
        self.subscriptions
            .values()
            .any(|filter| filter.matches(event))
    }

    /// One filter that lets through at least everything the set does (the set itself when it
    /// holds one subscription, everything otherwise): what the bus filters on before the
    /// link applies the set exactly.
    pub fn cover(&self) -> EventFilter {
        match self.subscriptions.values().next() {
            Some(only) if self.subscriptions.len() == 1 => only.clone(),
            _ => EventFilter::all(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::model::{EventData, EventId, ProviderRecovered, SessionProgress};
    use crate::ids::Timestamp;

    fn event(node: &str, session: Option<&str>, data: EventData) -> Event {
        Event {
            rendered: Default::default(),
            id: EventId::new(NodeId::new(node).unwrap(), 1),
            at: Timestamp::now(),
            session: session.map(|s| SessionId::new(s).unwrap()),
            data,
        }
    }

    fn progress() -> EventData {
        EventData::SessionProgress(SessionProgress {
            message: "x".into(),
            current: None,
            total: None,
        })
    }

    fn recovered() -> EventData {
        EventData::ProviderRecovered(ProviderRecovered {
            provider: "p".into(),
        })
    }

    #[test]
    fn kind_patterns_parse_exact_kinds_and_families() {
        assert_eq!(
            "session.progress".parse::<KindPattern>().unwrap(),
            KindPattern::Exact(EventKind::SessionProgress)
        );
        assert_eq!(
            "session.*".parse::<KindPattern>().unwrap(),
            KindPattern::Family("session".into())
        );
        assert_eq!(
            "provider".parse::<KindPattern>().unwrap(),
            KindPattern::Family("provider".into())
        );
        assert!(
            "sess".parse::<KindPattern>().is_err(),
            "no partial families"
        );
        assert!("bogus.*".parse::<KindPattern>().is_err());
    }

    #[test]
    fn dimensions_are_anded_and_values_ored() {
        let filter = EventFilter {
            kinds: vec!["session.*".parse().unwrap()],
            sessions: vec![SessionId::new("s1").unwrap(), SessionId::new("s2").unwrap()],
            nodes: vec![],
        };
        assert!(filter.matches(&event("a", Some("s1"), progress())));
        assert!(filter.matches(&event("b", Some("s2"), progress())));
        assert!(!filter.matches(&event("a", Some("s3"), progress())));
        assert!(!filter.matches(&event("a", None, progress())));
        assert!(!filter.matches(&event("a", Some("s1"), recovered())));
        assert!(EventFilter::all().matches(&event("a", None, recovered())));
        let by_node = EventFilter {
            nodes: vec![NodeId::new("b").unwrap()],
            ..EventFilter::all()
        };
        assert!(by_node.matches(&event("b", None, recovered())));
        assert!(!by_node.matches(&event("a", None, recovered())));
    }

    #[test]
    fn a_filter_set_passes_what_any_subscription_matches() {
        let mut set = FilterSet::single(EventFilter {
            sessions: vec![SessionId::new("s1").unwrap()],
            ..EventFilter::all()
        });
        assert_eq!(set.cover(), set.iter().next().unwrap().1.clone());
        assert!(set.matches(&event("a", Some("s1"), progress())));
        assert!(!set.matches(&event("a", None, recovered())));
        set.subscribe(
            "providers",
            EventFilter {
                kinds: vec!["provider.*".parse().unwrap()],
                ..EventFilter::all()
            },
        )
        .unwrap();
        assert!(set.matches(&event("a", None, recovered())));
        assert_eq!(set.cover(), EventFilter::all());
        assert_eq!(set.names().collect::<Vec<_>>(), ["default", "providers"]);
        assert!(set.unsubscribe(DEFAULT_SUBSCRIPTION));
        assert!(!set.unsubscribe(DEFAULT_SUBSCRIPTION));
        assert!(!set.matches(&event("a", Some("s1"), progress())));
        assert!(set.unsubscribe("providers"));
        assert!(set.is_empty());
        assert!(
            !set.matches(&event("a", None, recovered())),
            "empty passes nothing"
        );
    }

    #[test]
    fn filter_sets_are_bounded() {
        let mut set = FilterSet::none();
        for index in 0..MAX_SUBSCRIPTIONS {
            set.subscribe(&format!("s{index}"), EventFilter::all())
                .unwrap();
        }
        assert_eq!(
            set.subscribe("one-more", EventFilter::all()),
            Err(SubscriptionError::TooMany)
        );
        assert!(
            set.subscribe("s0", EventFilter::all()).is_ok(),
            "replacing is fine"
        );
        for bad in ["", "has space", &"x".repeat(65)] {
            assert_eq!(
                set.subscribe(bad, EventFilter::all()),
                Err(SubscriptionError::BadName),
                "{bad:?}"
            );
        }
        let huge = EventFilter {
            nodes: vec![NodeId::new("n").unwrap(); MAX_FILTER_VALUES + 1],
            ..EventFilter::all()
        };
        assert!(matches!(
            set.subscribe("s1", huge),
            Err(SubscriptionError::Filter(_))
        ));
    }

    #[test]
    fn oversized_filters_are_refused() {
        let filter = EventFilter {
            nodes: vec![NodeId::new("n").unwrap(); MAX_FILTER_VALUES + 1],
            ..EventFilter::all()
        };
        assert_eq!(
            filter.validate(),
            Err(FilterTooLarge {
                dimension: "node",
                count: 65
            })
        );
    }
}
