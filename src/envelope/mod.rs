//! MassTransit envelopes and endpoint addresses.
//!
//! [`address`] reads and writes the endpoint addresses of RabbitMQ, Kafka and Service Bus.

pub mod address;

pub use address::{
    Address, AddressError, DIRECT_REPLY_TO, KafkaAddress, RabbitMqAddress, ServiceBusAddress, ServiceBusEntity,
    TransportKind,
};
