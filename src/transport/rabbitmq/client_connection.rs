//! A plain broker connection for the command-line client, opened exactly as the transport opens its
//! own (same URI, TLS checks and server-name verification), plus the transport's AMQP property and metadata
//! conversions, so that the client speaks to RabbitMQ exactly as the bridge does.
//!
//! Invariant: the password only ever goes into the AMQP URI handed to lapin; errors never carry it.

use lapin::{BasicProperties, Connection};

use super::{RabbitMqOptions, amqp_uri, open_connection, tls_config};
use crate::transport::{OutgoingMessage, TransportError, TransportMeta};

/// Opens a connection (no supervisor, no reconnects) named `fhir-pubsub <purpose>` on the broker.
pub(crate) async fn connect(options: &RabbitMqOptions, purpose: &str) -> Result<Connection, TransportError> {
    let tls = tls_config(options).await?;
    open_connection(options, amqp_uri(options), tls, format!("fhir-pubsub {purpose}")).await
}

/// The AMQP properties the transport gives a send of `message`.
pub(crate) fn properties(message: &OutgoingMessage) -> BasicProperties {
    super::send_properties(message)
}

/// The metadata the transport reads from a delivery.
pub(crate) fn meta(delivery: &lapin::message::Delivery) -> TransportMeta {
    super::delivery_meta(delivery)
}

/// The AMQP reply code of a protocol error (404, 406, 403…).
pub(crate) fn reply_code(error: &lapin::Error) -> Option<u16> {
    super::reply_code(error)
}
