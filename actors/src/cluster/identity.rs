//! Who a cluster member is: its node id, the address its QUIC endpoint listens on, and the
//! generation of the process (a restarted node has a higher one). This is the identity the SWIM
//! protocol (foca) gossips about; foca treats two identities with the same node id as the same
//! member and keeps the one with the higher generation.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, Timestamp};

/// A member's identity: node id + address + generation.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// The node (bound to its certificate).
    pub node: NodeId,
    /// Where its QUIC endpoint listens.
    pub addr: SocketAddr,
    /// Grows every time the node (or its membership actor) starts again.
    pub generation: u64,
}

impl NodeIdentity {
    /// An identity whose generation is the current time in microseconds, or `after + 1` when
    /// that is higher (so a restart always gets a higher generation, even with a clock step).
    pub fn fresh(node: NodeId, addr: SocketAddr, after: u64) -> Self {
        let generation = Timestamp::now().as_micros().max(after.saturating_add(1));
        Self {
            node,
            addr,
            generation,
        }
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}", self.node, self.addr, self.generation)
    }
}

impl fmt::Display for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl foca::Identity for NodeIdentity {
    /// Two identities with the same node id are one member (a restart is a rename).
    type Addr = NodeId;

    /// Declared down by mistake (a partition, a pause): rejoin as the next generation.
    fn renew(&self) -> Option<Self> {
        Some(Self {
            generation: self.generation.saturating_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> NodeId {
        self.node.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

#[cfg(test)]
mod tests {
    use foca::Identity;

    use super::*;

    #[test]
    fn a_renewed_or_restarted_identity_wins_over_the_old_one() {
        let node = NodeId::new("a").unwrap();
        let addr: SocketAddr = "127.0.0.1:7071".parse().unwrap();
        let first = NodeIdentity::fresh(node.clone(), addr, 0);
        let renewed = first.renew().unwrap();
        assert!(renewed.win_addr_conflict(&first));
        assert!(!first.win_addr_conflict(&renewed));
        let restarted =
            NodeIdentity::fresh(node, "127.0.0.1:7072".parse().unwrap(), renewed.generation);
        assert!(restarted.generation > renewed.generation);
        assert_eq!(restarted.addr(), first.addr(), "the same member");
        assert_eq!(
            first.to_string(),
            format!("a@127.0.0.1:7071#{}", first.generation)
        );
    }
}
