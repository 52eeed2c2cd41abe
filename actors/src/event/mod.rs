//! Events: the model (`{id, at, node, session?, kind, data}`), subscription filters, and the
//! EventBus actor with its subscriptions, replay ring and persistence hook.

mod bus;
mod filter;
mod model;

pub use bus::{
    BusItem, BusShared, Delivery, EventBus, EventBusActor, EventBusArgs, EventBusConfig,
    EventBusMsg, EventBusState, EventStore, FANOUT_WHOLE_BYTES, MAX_UNRESERVED,
    MAX_UNRESERVED_BYTES, RELAY_TIMEOUT, REPLAY_TIMEOUT, RESERVE_BLOCK, RING_BYTES,
    RelayBatchError, Replay, ReplayFrom, StoreResume, Subscription, ring_charge,
};
pub use filter::{
    DEFAULT_SUBSCRIPTION, EventFilter, FilterSet, FilterTooLarge, KindPattern, MAX_FILTER_VALUES,
    MAX_SUBSCRIPTION_NAME, MAX_SUBSCRIPTIONS, SubscriptionError,
};
pub use model::*;
