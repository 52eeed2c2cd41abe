//! Where this node sent the spawns with an idempotency key that it forwarded, so that a retry
//! through it goes to the same node.
//!
//! Keys are kept by the node that runs the session (in its store), and `placement` chooses
//! again on every request: without this table, a retry of a placed spawn (after a dropped
//! connection, or a forward that timed out after the request was sent) could be placed on
//! another node, which had never seen the key, and the command ran twice. A retry through
//! another node than the first attempt's is not covered: that node never saw the key.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use troupe_actors::ids::NodeId;

/// Keys remembered at most; the oldest is forgotten first.
pub const MAX_KEY_ROUTES: usize = 4096;

/// Idempotency key → the node a spawn with that key was forwarded to.
#[derive(Debug, Default)]
pub struct KeyRoutes(Mutex<Routes>);

#[derive(Debug, Default)]
struct Routes {
    nodes: HashMap<String, NodeId>,
    /// Keys, oldest first (each once).
    order: VecDeque<String>,
}

impl KeyRoutes {
    /// The node a spawn with `key` was forwarded to, if this node remembers it.
    pub fn get(&self, key: &str) -> Option<NodeId> {
        self.lock().nodes.get(key).cloned()
    }

    /// Remembers that a spawn with `key` goes to `node` (before it is sent: a forward whose
    /// answer is lost may still have run there).
    pub fn remember(&self, key: &str, node: &NodeId) {
        let mut routes = self.lock();
        if routes.nodes.insert(key.to_owned(), node.clone()).is_some() {
            return;
        }
        routes.order.push_back(key.to_owned());
        while routes.order.len() > MAX_KEY_ROUTES {
            if let Some(oldest) = routes.order.pop_front() {
                routes.nodes.remove(&oldest);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_goes_where_it_went_first_and_the_oldest_are_forgotten_past_the_bound() {
        let routes = KeyRoutes::default();
        let b = NodeId::new("b").unwrap();
        let c = NodeId::new("c").unwrap();
        routes.remember("k0", &b);
        routes.remember("k0", &c);
        assert_eq!(routes.get("k0"), Some(c), "the latest forward of a key");
        for n in 1..=MAX_KEY_ROUTES {
            routes.remember(&format!("k{n}"), &b);
        }
        assert_eq!(routes.get("k0"), None, "the oldest is forgotten");
        assert_eq!(routes.get("k1"), Some(b.clone()));
        assert_eq!(routes.get(&format!("k{MAX_KEY_ROUTES}")), Some(b));
        let routes = routes.lock();
        assert_eq!(
            (routes.nodes.len(), routes.order.len()),
            (MAX_KEY_ROUTES, MAX_KEY_ROUTES)
        );
    }
}
