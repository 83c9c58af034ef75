//! A plain broker connection for the command-line client, built with the same URI, TLS and
//! connection-name rules as the transport, plus the transport's AMQP property and metadata
//! conversions, so that the client speaks to RabbitMQ exactly as the bridge does.
//!
//! Invariant: the password only ever goes into the AMQP URI handed to lapin; errors never carry it.

use lapin::types::LongString;
use lapin::{BasicProperties, Connection, ConnectionProperties};

use super::{RabbitMqOptions, amqp_uri, connect_error, tls_config};
use crate::transport::{OutgoingMessage, TransportError, TransportMeta};

/// Opens a connection (no supervisor, no reconnects) named `fhir-pubsub <purpose>` on the broker.
pub(crate) async fn connect(options: &RabbitMqOptions, purpose: &str) -> Result<Connection, TransportError> {
    let tls = tls_config(options)?;
    let properties =
        ConnectionProperties::default().with_connection_name(LongString::from(format!("fhir-pubsub {purpose}")));
    let runtime = lapin::runtime::default_runtime().map_err(|e| TransportError::Unavailable(e.to_string()))?;
    let connecting = Connection::connect_uri_with_config(amqp_uri(options), properties, tls, runtime);
    tokio::time::timeout(super::CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| TransportError::Unavailable("timed out connecting to RabbitMQ".to_owned()))?
        .map_err(|e| connect_error(&e))
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
