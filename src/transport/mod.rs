//! The broker seam: what the bridge needs from RabbitMQ, Kafka or Service Bus.
//!
//! A transport delivers commands with an acknowledgement handle, sends replies and faults to an
//! address, and publishes change events. Every send and publish returns only once the broker has
//! confirmed the message (publisher confirms, `acks=all`, or a settled AMQP transfer), so a caller
//! that acknowledges a delivery after `send` returned never loses the reply.

#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "servicebus")]
pub mod servicebus;

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::contracts::MessageType;

/// Transport-level metadata of a received message, used when the body is raw JSON (ids and
/// addresses travel in headers) and to route the message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TransportMeta {
    /// The content type property, if any (`application/vnd.masstransit+json`, `application/json`).
    pub content_type: Option<String>,
    /// The broker's own message id property (AMQP `message_id`, Service Bus `MessageId`).
    pub message_id: Option<String>,
    /// The broker's correlation id property.
    pub correlation_id: Option<String>,
    /// Transport headers with their values as JSON (strings, numbers, booleans).
    pub headers: Vec<(String, serde_json::Value)>,
    /// AMQP `reply_to`, needed to answer a request addressed to `amq.rabbitmq.reply-to`.
    pub reply_to: Option<String>,
    /// The message type implied by where the message arrived (the RabbitMQ exchange it was
    /// published to, the Kafka topic), used when the body names none.
    pub type_hint: Option<MessageType>,
    /// Service Bus: the session a reply goes to (the request's `ReplyToSessionId`, else its
    /// `SessionId`), so that a requester on a session queue gets its answer.
    pub reply_session_id: Option<String>,
    /// Service Bus: the request's `PartitionKey`, copied onto its reply.
    pub partition_key: Option<String>,
}

impl TransportMeta {
    /// A header by name, ignoring case.
    pub fn header(&self, name: &str) -> Option<&serde_json::Value> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v)
    }
}

/// A message to send or publish. The body is a complete envelope (or raw JSON on Kafka).
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    pub body: Vec<u8>,
    pub content_type: &'static str,
    pub message_id: uuid::Uuid,
    pub correlation_id: Option<uuid::Uuid>,
    /// Transport headers (simple values only; MassTransit drops arrays).
    pub headers: Vec<(String, serde_json::Value)>,
    /// Time to live (AMQP `expiration`); replies inherit the request's remaining TTL, at least 1 s.
    pub time_to_live: Option<Duration>,
    /// For direct reply-to: the request's AMQP `reply_to` routing key.
    pub reply_to: Option<String>,
    /// Kafka record key / Service Bus partition key (events are keyed by `Type/id`).
    pub key: Option<String>,
    /// Service Bus `SessionId` (a reply copies the request's, see [`TransportMeta::reply_session_id`]).
    pub session_id: Option<String>,
}

/// Why a message is moved to the error queue instead of being handled.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultReason {
    /// Short exception-like type name (`EnvelopeDecodeError`, `StoreUnavailable`).
    pub exception_type: String,
    /// A sentence saying what went wrong.
    pub message: String,
    /// The message type the bridge took it for, if it got that far.
    pub message_type: Option<MessageType>,
}

/// What to do with a delivery once it has been handled.
#[async_trait]
pub trait Acknowledger: Send + Sync {
    /// The effect is durable and any reply confirmed: remove the message from the broker.
    async fn ack(&self) -> Result<(), TransportError>;
    /// The message can never be handled: copy it unchanged to the error queue/topic with the
    /// reason in headers (`MT-Reason: fault`, `MT-Fault-*`), then remove it.
    async fn move_to_error(&self, reason: &FaultReason) -> Result<(), TransportError>;
    /// No consumer for its type: copy it to the skipped queue (`MT-Reason: dead-letter`), then remove it.
    async fn move_to_skipped(&self) -> Result<(), TransportError>;
    /// A transient failure (the store is down): give the message back for a later attempt.
    async fn retry_later(&self) -> Result<(), TransportError>;
}

/// One received message.
pub struct Delivery {
    pub body: Vec<u8>,
    pub meta: TransportMeta,
    /// Set when the broker says this message was delivered before.
    pub redelivered: bool,
    pub acker: Box<dyn Acknowledger>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").field("bytes", &self.body.len()).field("meta", &self.meta).finish()
    }
}

/// A broker connection as the bridge uses it.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Declares what the bridge needs (queues, exchanges, bindings) and starts consuming commands.
    /// Deliveries arrive on the returned channel; it is bounded by the prefetch count. The
    /// transport reconnects on its own and keeps feeding the same channel.
    async fn start(&self) -> Result<mpsc::Receiver<Delivery>, TransportError>;
    /// Sends to an address of this transport (a reply or a fault) and waits for the broker's confirm.
    async fn send(&self, address: &str, message: OutgoingMessage) -> Result<(), TransportError>;
    /// Publishes an event of `message_type` to its destination and waits for the broker's confirm.
    async fn publish(&self, message_type: MessageType, message: OutgoingMessage) -> Result<(), TransportError>;
    /// Whether each change event must carry the changes of one resource only, keyed `Type/id`
    /// ([`OutgoingMessage::key`]). True on Kafka: the key picks the partition and only a partition
    /// keeps order, so one resource's events stay in order only if each message names one resource.
    /// Such a transport keeps the order of messages with the same key however many are in flight.
    fn events_keyed_by_resource(&self) -> bool {
        false
    }
    /// The bridge's own input address (`rabbitmq://host/FirelyServer`), written as `sourceAddress`.
    fn input_address(&self) -> String;
    /// Whether the broker connection is up now.
    fn is_connected(&self) -> bool;
    /// Stops consuming and closes the connection after in-flight sends.
    async fn close(&self);
}

/// A transport failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The address cannot be sent to on this transport.
    #[error("invalid address `{address}`: {reason}")]
    InvalidAddress { address: String, reason: String },
    /// The broker refused the operation (a 406 on declare, an unknown topic).
    #[error("the broker refused: {0}")]
    Refused(String),
    /// The connection is down or the broker did not confirm; trying again later may work.
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
}

impl TransportError {
    /// Whether a later attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, TransportError::Unavailable(_))
    }
}
