//! Where a send goes: the exchange (and optionally queue) named by a MassTransit address, with the
//! flags to declare it with (wire spec §2.3, §2.4). Addresses are parsed by
//! [`crate::envelope::address`]; this module only turns one into what the broker needs.
//!
//! Invariant: host, port and vhost of an address are ignored, as MassTransit does on send; only
//! the name and the query decide the target.

use lapin::ExchangeKind;

use crate::envelope::address::{DIRECT_REPLY_TO, RabbitMqAddress};
use crate::transport::TransportError;

/// The exchange type of a send target.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ExchangeType {
    #[default]
    Fanout,
    Direct,
    Topic,
    Headers,
    /// A plugin type such as `x-delayed-message`.
    Other(String),
}

impl ExchangeType {
    /// Reads `type=` from an address (any case).
    pub fn parse(text: &str) -> Self {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "fanout" => ExchangeType::Fanout,
            "direct" => ExchangeType::Direct,
            "topic" => ExchangeType::Topic,
            "headers" => ExchangeType::Headers,
            other => ExchangeType::Other(other.to_owned()),
        }
    }

    pub(crate) fn kind(&self) -> ExchangeKind {
        match self {
            ExchangeType::Fanout => ExchangeKind::Fanout,
            ExchangeType::Direct => ExchangeKind::Direct,
            ExchangeType::Topic => ExchangeKind::Topic,
            ExchangeType::Headers => ExchangeKind::Headers,
            ExchangeType::Other(name) => ExchangeKind::Custom(name.clone()),
        }
    }
}

/// A resolved send destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendTarget {
    /// Exchange name (the last path segment of the address, percent-decoded).
    pub name: String,
    pub exchange_type: ExchangeType,
    pub durable: bool,
    pub auto_delete: bool,
    /// Also declare a queue (`queue`, default the same name) and bind it to the exchange.
    pub bind: bool,
    pub queue: Option<String>,
    /// Exchanges to declare and bind to this one (`bindexchange=`).
    pub bind_exchanges: Vec<String>,
    pub alternate_exchange: Option<String>,
    /// For an `x-delayed-message` exchange, the type it routes like (`x-delayed-type`).
    pub delayed_type: Option<String>,
}

impl SendTarget {
    /// A durable fanout exchange, as used for published message types.
    pub fn exchange(name: impl Into<String>) -> Self {
        SendTarget {
            name: name.into(),
            exchange_type: ExchangeType::Fanout,
            durable: true,
            auto_delete: false,
            bind: false,
            queue: None,
            bind_exchanges: Vec::new(),
            alternate_exchange: None,
            delayed_type: None,
        }
    }

    /// Whether this is RabbitMQ's direct reply-to (publish to `""` with the request's `reply_to`).
    pub fn is_direct_reply_to(&self) -> bool {
        self.name.ends_with(DIRECT_REPLY_TO)
    }

    /// Parses a MassTransit RabbitMQ address: `rabbitmq|rabbitmqs|amqp|amqps://host[:port]/[vhost/]name[?query]`,
    /// `queue:name` or `exchange:name`.
    pub fn parse(address: &str) -> Result<Self, TransportError> {
        let parsed = RabbitMqAddress::parse(address)
            .map_err(|e| TransportError::InvalidAddress { address: address.to_owned(), reason: e.to_string() })?;
        Ok(SendTarget::from(&parsed))
    }
}

impl From<&RabbitMqAddress> for SendTarget {
    fn from(address: &RabbitMqAddress) -> Self {
        SendTarget {
            name: address.name.clone(),
            exchange_type: ExchangeType::parse(&address.exchange_type),
            durable: address.durable,
            auto_delete: address.auto_delete,
            bind: address.bind,
            queue: address.queue_name().filter(|q| *q != address.name).map(str::to_owned),
            bind_exchanges: address.bind_exchanges.clone(),
            alternate_exchange: address.alternate_exchange.clone(),
            delayed_type: address.delayed_type.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn js_bus_address_is_temporary() {
        let t = SendTarget::parse("amqp://localhost:5672/bus-1234?temporary=true").expect("valid");
        assert_eq!(t.name, "bus-1234");
        assert!(!t.durable && t.auto_delete && !t.bind);
    }

    #[test]
    fn vhost_and_host_are_ignored() {
        let t = SendTarget::parse("rabbitmq://h/vh/My%20Exchange?durable=false&type=topic&bind=true&queue=q1")
            .expect("valid");
        assert_eq!(t.name, "My Exchange");
        assert_eq!(t.exchange_type, ExchangeType::Topic);
        assert!(!t.durable && t.bind);
        assert_eq!(t.queue.as_deref(), Some("q1"));
    }

    #[test]
    fn short_forms_and_reply_to() {
        let t = SendTarget::parse("queue:replies").expect("valid");
        assert!(t.bind && t.durable && t.name == "replies");
        assert!(SendTarget::parse("rabbitmq://localhost/amq.rabbitmq.reply-to").expect("valid").is_direct_reply_to());
        assert!(SendTarget::parse("http://x/y").is_err());
        assert!(SendTarget::parse("rabbitmq://host/").is_err());
    }

    #[test]
    fn delayed_exchanges_keep_their_routing_type() {
        let t = SendTarget::parse("rabbitmq://h/x?delayedtype=direct").expect("valid");
        assert_eq!(t.exchange_type, ExchangeType::Other("x-delayed-message".to_owned()));
        assert_eq!(t.delayed_type.as_deref(), Some("direct"));
    }
}
