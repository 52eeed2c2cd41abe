//! The QUIC cluster: certificates ([`certs`]), the node's endpoint with mutual TLS
//! ([`endpoint`]). Only this module knows the wire codec's use on the network.

pub mod certs;
pub mod endpoint;
pub mod membership;
pub mod relay;
pub mod remote;

pub use endpoint::{ClusterEndpoint, ClusterStats, DialError, EndpointError, Refusal};
