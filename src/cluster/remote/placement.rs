//! Placement: which node a `least_loaded` session runs on, as a pure choice over this node and
//! the members' gossiped metadata. It never reads the network or a clock; the caller gathers the
//! candidates (this node's exact load, members that are alive with metadata).

use std::collections::BTreeMap;

use troupe_actors::cluster::NodeLoad;
use troupe_actors::ids::NodeId;

/// A node that could run the session.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The node.
    pub node: NodeId,
    /// Its load and capacity (this node's own, or what a member last gossiped).
    pub load: NodeLoad,
    /// Its labels (`cluster.labels`).
    pub labels: BTreeMap<String, String>,
}

impl Candidate {
    fn carries(&self, labels: &BTreeMap<String, String>) -> bool {
        labels
            .iter()
            .all(|(key, value)| self.labels.get(key) == Some(value))
    }
}

/// Why no node was chosen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    /// No node carries every constraint.
    #[error("{}", no_match_message(.unmatched, .constraints, .nodes))]
    NoMatch {
        /// The constraints that no node carries at all (empty when each is carried by some node,
        /// but no node carries all of them).
        unmatched: BTreeMap<String, String>,
        /// Every constraint asked for.
        constraints: BTreeMap<String, String>,
        /// The candidates and their labels.
        nodes: Vec<(NodeId, BTreeMap<String, String>)>,
    },
    /// Nodes carry the constraints, but none has room (a free slot or room in its queue).
    #[error(
        "{} carr{} the labels asked for but {} no room (every slot and queue place is taken); \
         retry later, or relax the placement labels",
        join(.matching.iter().map(|(node, _)| node.to_string())),
        if .matching.len() == 1 { "ies" } else { "y" },
        if .matching.len() == 1 { "has" } else { "have" }
    )]
    NoRoom {
        /// The nodes that carry the constraints, with their loads.
        matching: Vec<(NodeId, NodeLoad)>,
    },
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

fn pairs(labels: &BTreeMap<String, String>) -> String {
    join(labels.iter().map(|(key, value)| format!("{key}={value}")))
}

fn no_match_message(
    unmatched: &BTreeMap<String, String>,
    constraints: &BTreeMap<String, String>,
    nodes: &[(NodeId, BTreeMap<String, String>)],
) -> String {
    let seen = join(nodes.iter().map(|(node, labels)| {
        if labels.is_empty() {
            format!("{node} (no labels)")
        } else {
            format!("{node} ({})", pairs(labels))
        }
    }));
    if unmatched.is_empty() {
        format!(
            "no node carries all of the placement labels {}; nodes: {seen}",
            pairs(constraints)
        )
    } else {
        format!(
            "no node carries the placement label{} {}; nodes: {seen}; set cluster.labels on a \
             node, or change the placement labels",
            if unmatched.len() == 1 { "" } else { "s" },
            pairs(unmatched)
        )
    }
}

/// Chooses among `own` (this node) and `members` the node that carries every one of `labels`,
/// has room, and has the lowest `(running + queued) / max_concurrent`; `own` wins ties.
pub fn choose(
    own: &Candidate,
    members: &[Candidate],
    labels: &BTreeMap<String, String>,
) -> Result<NodeId, PlacementError> {
    let all = || std::iter::once(own).chain(members);
    let matching: Vec<&Candidate> = all().filter(|node| node.carries(labels)).collect();
    if matching.is_empty() {
        let unmatched = labels
            .iter()
            .filter(|(key, value)| !all().any(|node| node.labels.get(*key) == Some(*value)))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        return Err(PlacementError::NoMatch {
            unmatched,
            constraints: labels.clone(),
            nodes: all()
                .map(|node| (node.node.clone(), node.labels.clone()))
                .collect(),
        });
    }
    let mut best: Option<&Candidate> = None;
    for node in matching.iter().copied().filter(|node| node.load.has_room()) {
        if best.is_none_or(|best| node.load.ratio() < best.load.ratio()) {
            best = Some(node);
        }
    }
    match best {
        Some(node) => Ok(node.node.clone()),
        None => Err(PlacementError::NoRoom {
            matching: matching
                .iter()
                .map(|node| (node.node.clone(), node.load))
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, running: u32, queued: u32, labels: &[(&str, &str)]) -> Candidate {
        Candidate {
            node: NodeId::new(name).unwrap(),
            load: NodeLoad {
                running,
                queued,
                max_concurrent: 2,
                queue_capacity: 2,
            },
            labels: labels
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn the_least_loaded_node_with_room_wins_and_this_node_wins_ties() {
        let own = node("a", 1, 0, &[]);
        let members = [node("b", 0, 0, &[]), node("c", 0, 0, &[])];
        assert_eq!(choose(&own, &members, &labels(&[])).unwrap().as_str(), "b");
        let idle = node("a", 0, 0, &[]);
        assert_eq!(choose(&idle, &members, &labels(&[])).unwrap().as_str(), "a");
        // A loaded node is avoided even when it is this one.
        let busy = node("a", 2, 1, &[]);
        let members = [node("b", 1, 0, &[]), node("c", 2, 0, &[])];
        assert_eq!(choose(&busy, &members, &labels(&[])).unwrap().as_str(), "b");
    }

    #[test]
    fn constraints_pick_only_nodes_carrying_every_label() {
        let own = node("a", 0, 0, &[("zone", "z1")]);
        let members = [
            node("b", 2, 0, &[("zone", "z2"), ("gpu", "yes")]),
            node("c", 1, 0, &[("zone", "z2")]),
        ];
        // a is idle but in the wrong zone; c is less loaded than b.
        assert_eq!(
            choose(&own, &members, &labels(&[("zone", "z2")]))
                .unwrap()
                .as_str(),
            "c"
        );
        // Only b has a gpu, however busy it is, as long as it has room.
        assert_eq!(
            choose(&own, &members, &labels(&[("zone", "z2"), ("gpu", "yes")]))
                .unwrap()
                .as_str(),
            "b"
        );
        assert_eq!(
            choose(&own, &members, &labels(&[("zone", "z1")]))
                .unwrap()
                .as_str(),
            "a"
        );
    }

    #[test]
    fn a_constraint_nobody_carries_is_named() {
        let own = node("a", 0, 0, &[("zone", "z1")]);
        let members = [node("b", 0, 0, &[("zone", "z2")])];
        let error = choose(&own, &members, &labels(&[("zone", "z9"), ("gpu", "yes")])).unwrap_err();
        match &error {
            PlacementError::NoMatch { unmatched, .. } => {
                assert_eq!(unmatched, &labels(&[("zone", "z9"), ("gpu", "yes")]))
            }
            other => panic!("{other:?}"),
        }
        let message = error.to_string();
        assert!(message.contains("gpu=yes, zone=z9"), "{message}");
        assert!(message.contains("b (zone=z2)"), "{message}");

        // Each label exists somewhere, but on different nodes.
        let members = [node("b", 0, 0, &[("gpu", "yes")])];
        let error = choose(&own, &members, &labels(&[("zone", "z1"), ("gpu", "yes")])).unwrap_err();
        assert!(
            matches!(&error, PlacementError::NoMatch { unmatched, .. } if unmatched.is_empty()),
            "{error:?}"
        );
        assert!(error.to_string().contains("all of"), "{error}");
    }

    #[test]
    fn matching_nodes_without_room_are_a_no_room_error() {
        let own = node("a", 0, 0, &[("zone", "z1")]);
        let members = [node("b", 2, 2, &[("zone", "z2")])];
        let error = choose(&own, &members, &labels(&[("zone", "z2")])).unwrap_err();
        assert!(
            matches!(&error, PlacementError::NoRoom { matching } if matching.len() == 1),
            "{error:?}"
        );
        assert!(error.to_string().starts_with("b carries"), "{error}");
    }
}
