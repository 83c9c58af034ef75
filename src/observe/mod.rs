//! What an operator sees of a running bridge: logs ([`logs`]), Prometheus metrics ([`metrics`]) and
//! the per-input and per-destination figures of `/status` ([`status`]).

pub mod logs;
pub mod metrics;
pub mod status;

pub use status::{EndpointStats, RunState, StatusBoard};
