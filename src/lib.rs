//! fhir-pubsub: a Firely-PubSub-compatible bridge between a message broker and a SQL store.
//!
//! The flow, and the module that owns each step: a transport receives a command, [`envelope`]
//! decodes it, [`plan`] validates and executes it in one transaction against a [`store`], the
//! reply goes back through the transport, and committed changes are published as events.

pub mod bridge;
pub mod claimcheck;
#[cfg(feature = "rabbitmq")]
pub mod client;
pub mod config;
pub mod contracts;
pub mod envelope;
pub mod http;
pub mod json;
pub mod observe;
pub mod plan;
pub mod publisher;
pub mod shutdown;
pub mod store;
pub mod transport;
