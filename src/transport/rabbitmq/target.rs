//! Where a send goes: the exchange (and optionally queue) named by a MassTransit address, with the
//! flags to declare it with (wire spec §2.3, §2.4).
//!
//! Invariant: host, port and vhost of an address are ignored, as MassTransit does on send; only
//! the name and the query decide the target.

use lapin::ExchangeKind;

use crate::transport::TransportError;

/// The suffix of RabbitMQ's direct reply-to pseudo queue.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

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
        }
    }

    /// Whether this is RabbitMQ's direct reply-to (publish to `""` with the request's `reply_to`).
    pub fn is_direct_reply_to(&self) -> bool {
        self.name.ends_with(DIRECT_REPLY_TO)
    }

    /// Parses a MassTransit RabbitMQ address: `rabbitmq|rabbitmqs|amqp|amqps://host[:port]/[vhost/]name[?query]`,
    /// `queue:name` or `exchange:name`.
    pub fn parse(address: &str) -> Result<Self, TransportError> {
        let invalid =
            |reason: &str| TransportError::InvalidAddress { address: address.to_owned(), reason: reason.to_owned() };
        let text = address.trim();
        let (scheme, rest) = text.split_once(':').ok_or_else(|| invalid("no scheme"))?;
        let scheme = scheme.to_ascii_lowercase();
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        let mut bind = false;
        let raw_name = match scheme.as_str() {
            "rabbitmq" | "rabbitmqs" | "amqp" | "amqps" => {
                let after = path.strip_prefix("//").ok_or_else(|| invalid("expected `//host/name`"))?;
                let (_, path) = after.split_once('/').ok_or_else(|| invalid("no name in the path"))?;
                path.rsplit('/').next().unwrap_or_default()
            }
            "queue" => {
                bind = true;
                path
            }
            "exchange" => path,
            _ => return Err(invalid("not a RabbitMQ address")),
        };
        let name = percent_encoding::percent_decode_str(raw_name)
            .decode_utf8()
            .map_err(|_| invalid("the name is not UTF-8"))?
            .into_owned();
        if name.is_empty() {
            return Err(invalid("empty name"));
        }
        let mut target = SendTarget { bind, ..SendTarget::exchange(name) };
        for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let flag = value.eq_ignore_ascii_case("true");
            match key.to_ascii_lowercase().as_str() {
                "temporary" if flag => {
                    target.durable = false;
                    target.auto_delete = true;
                }
                "durable" => target.durable = flag,
                "autodelete" => target.auto_delete = flag,
                "type" => target.exchange_type = ExchangeType::parse(&value),
                "bind" => target.bind = flag,
                "queue" if !value.is_empty() => target.queue = Some(value.into_owned()),
                "bindexchange" if !value.is_empty() => target.bind_exchanges.push(value.into_owned()),
                "alternateexchange" if !value.is_empty() => target.alternate_exchange = Some(value.into_owned()),
                _ => {}
            }
        }
        Ok(target)
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
}
