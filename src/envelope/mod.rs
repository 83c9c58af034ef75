//! MassTransit envelopes: reading them leniently, writing them as MassTransit v8 does, their ids,
//! times and endpoint addresses.
//!
//! - [`decode`] turns a received body (an envelope, or raw JSON with ids in transport headers)
//!   into an [`Envelope`], accepting everything a MassTransit receiver accepts;
//! - [`encode`] writes an [`Envelope`] byte-compatible with MassTransit v8's System.Text.Json
//!   serializer, and [`Envelope::response`], [`Envelope::fault`], [`Envelope::event`] and
//!   [`Envelope::request`] build the envelopes the bridge sends;
//! - [`address`] reads and writes RabbitMQ, Kafka and Service Bus endpoint addresses.
//!
//! Invariants: `message` is kept as the exact bytes it was received with; every id is a GUID
//! (written in lowercase D form); times we create are truncated to 100 ns so that an envelope we
//! write reads back equal.

pub mod address;
mod decode;
mod encode;
pub mod ids;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::contracts::MessageType;

pub use address::{
    Address, AddressError, DIRECT_REPLY_TO, KafkaAddress, RabbitMqAddress, ServiceBusAddress, ServiceBusEntity,
    TransportKind,
};
pub use decode::{DecodeError, decode, is_envelope};
pub use encode::{encode, host_info, transport_headers};

/// The MassTransit JSON envelope content type.
pub const ENVELOPE_CONTENT_TYPE: &str = "application/vnd.masstransit+json";

/// A MassTransit message envelope, as read and as written (fields in MassTransit v8's order).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub message_id: Option<Uuid>,
    pub request_id: Option<Uuid>,
    pub correlation_id: Option<Uuid>,
    pub conversation_id: Option<Uuid>,
    pub initiator_id: Option<Uuid>,
    pub source_address: Option<String>,
    pub destination_address: Option<String>,
    pub response_address: Option<String>,
    pub fault_address: Option<String>,
    /// Message type URNs, the concrete type first.
    pub message_type: Vec<String>,
    /// The message, exactly as received; `None` when it was missing or `null`.
    pub message: Option<Box<RawValue>>,
    #[serde(serialize_with = "encode::time")]
    pub expiration_time: Option<DateTime<Utc>>,
    #[serde(serialize_with = "encode::time")]
    pub sent_time: Option<DateTime<Utc>>,
    pub headers: Map<String, Value>,
    pub host: Option<Value>,
}

impl PartialEq for Envelope {
    fn eq(&self, other: &Self) -> bool {
        self.message_id == other.message_id
            && self.request_id == other.request_id
            && self.correlation_id == other.correlation_id
            && self.conversation_id == other.conversation_id
            && self.initiator_id == other.initiator_id
            && self.source_address == other.source_address
            && self.destination_address == other.destination_address
            && self.response_address == other.response_address
            && self.fault_address == other.fault_address
            && self.message_type == other.message_type
            && self.message.as_ref().map(|m| m.get()) == other.message.as_ref().map(|m| m.get())
            && self.expiration_time == other.expiration_time
            && self.sent_time == other.sent_time
            && self.headers == other.headers
            && self.host == other.host
    }
}

impl Envelope {
    /// The first Firely message type named in `messageType`, if any.
    pub fn message_kind(&self) -> Option<MessageType> {
        MessageType::first_known(self.message_type.iter().map(String::as_str))
    }

    /// An envelope header by name, ignoring case.
    pub fn header(&self, name: &str) -> Option<&Value> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v)
    }

    /// Where a fault about this message goes: `faultAddress`, else `responseAddress`.
    pub fn fault_target(&self) -> Option<&str> {
        self.fault_address.as_deref().or(self.response_address.as_deref())
    }
}
