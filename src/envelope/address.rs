//! Endpoint addresses as MassTransit writes and reads them, for RabbitMQ, Kafka and Service Bus.
//!
//! This module owns the grammar of `rabbitmq://`/`amqp://`, `kafka://` and `sb://` addresses and of
//! the short forms `queue:`, `exchange:` and `topic:`. Invariants kept by every parsed value:
//! - names are percent-decoded, non-empty and valid for their broker (RabbitMQ ≤ 255 bytes, Kafka
//!   `[a-zA-Z0-9._-]{1,249}`, Service Bus ≤ 260 characters);
//! - RabbitMQ's `temporary` is exactly `!durable && auto_delete`, and a port equal to the scheme's
//!   default (5672, or 5671 for the `s` schemes) and the vhost `/` are stored as `None`,
//!
//! so that formatting a value with [`Display`](std::fmt::Display) and parsing the text back gives
//! the same value.

use std::fmt;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

/// Which broker a short-form address (`queue:`, `exchange:`, `topic:`) refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    RabbitMq,
    Kafka,
    ServiceBus,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportKind::RabbitMq => "RabbitMQ",
            TransportKind::Kafka => "Kafka",
            TransportKind::ServiceBus => "Azure Service Bus",
        })
    }
}

/// Why an address could not be read.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The text is empty or only whitespace.
    #[error(
        "the address is empty: give an absolute URI such as `rabbitmq://host/name` or a short form such as `queue:name`"
    )]
    Empty,
    /// The text is not an absolute URI nor a known short form.
    #[error("`{text}` is not an address: {reason}")]
    Malformed { text: String, reason: String },
    /// The scheme is not one the transport understands.
    #[error("`{text}` has the scheme `{scheme}`, which {transport} does not understand (expected {expected})")]
    UnsupportedScheme { text: String, scheme: String, transport: TransportKind, expected: &'static str },
    /// The address names no entity (no path, or an empty last segment).
    #[error("`{text}` names no exchange, queue or topic: put the name after the last `/` (or after `queue:`)")]
    MissingName { text: String },
    /// The entity name breaks the broker's rules.
    #[error("the name `{name}` in `{text}` is not valid: {reason}")]
    InvalidName { text: String, name: String, reason: String },
    /// A query option has a value of the wrong form.
    #[error("the option `{key}={value}` in `{text}` is not valid: {expected}")]
    InvalidOption { text: String, key: String, value: String, expected: &'static str },
}

/// An endpoint address on one of the supported brokers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    RabbitMq(RabbitMqAddress),
    Kafka(KafkaAddress),
    ServiceBus(ServiceBusAddress),
}

impl Address {
    /// Parses an absolute address (the scheme decides the broker) or a short form, which is read
    /// for the `default` broker: `queue:N` and `exchange:N` on RabbitMQ, `topic:N` on Kafka,
    /// `queue:N` and `topic:N` on Service Bus. On Kafka any other scheme (MassTransit's
    /// `loopback://localhost/kafka/topic`) is read as a topic address too.
    pub fn parse(text: &str, default: TransportKind) -> Result<Address, AddressError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(AddressError::Empty);
        }
        let scheme = scheme_of(trimmed).map(|s| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("rabbitmq" | "rabbitmqs" | "amqp" | "amqps") => RabbitMqAddress::parse(trimmed).map(Address::RabbitMq),
            Some("kafka") => KafkaAddress::parse(trimmed).map(Address::Kafka),
            Some("sb") => ServiceBusAddress::parse(trimmed).map(Address::ServiceBus),
            _ => match default {
                TransportKind::RabbitMq => RabbitMqAddress::parse(trimmed).map(Address::RabbitMq),
                TransportKind::Kafka => KafkaAddress::parse(trimmed).map(Address::Kafka),
                TransportKind::ServiceBus => ServiceBusAddress::parse(trimmed).map(Address::ServiceBus),
            },
        }
    }

    /// The broker this address belongs to.
    pub fn kind(&self) -> TransportKind {
        match self {
            Address::RabbitMq(_) => TransportKind::RabbitMq,
            Address::Kafka(_) => TransportKind::Kafka,
            Address::ServiceBus(_) => TransportKind::ServiceBus,
        }
    }

    /// The entity the address names: exchange, topic, or queue/topic.
    pub fn name(&self) -> &str {
        match self {
            Address::RabbitMq(a) => &a.name,
            Address::Kafka(a) => &a.topic,
            Address::ServiceBus(a) => &a.name,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::RabbitMq(a) => a.fmt(f),
            Address::Kafka(a) => a.fmt(f),
            Address::ServiceBus(a) => a.fmt(f),
        }
    }
}

impl std::str::FromStr for RabbitMqAddress {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RabbitMqAddress::parse(s)
    }
}

/// The name RabbitMQ gives its direct reply-to pseudo-queue.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A RabbitMQ exchange address (`RabbitMqEndpointAddress`): where to publish, and how to declare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RabbitMqAddress {
    /// `rabbitmq`, `rabbitmqs`, `amqp` or `amqps` (lowercase); `queue` or `exchange` for a short form.
    pub scheme: String,
    /// The host, absent in a short form.
    pub host: Option<String>,
    /// The port when it is not the scheme's default (5672, or 5671 for `rabbitmqs`/`amqps`).
    pub port: Option<u16>,
    /// The virtual host when it is not `/`, percent-decoded.
    pub vhost: Option<String>,
    /// The exchange name (last path segment, percent-decoded).
    pub name: String,
    /// The exchange type; `fanout` unless `type=` or `delayedtype=` says otherwise.
    pub exchange_type: String,
    pub durable: bool,
    pub auto_delete: bool,
    /// `!durable && auto_delete`, written as `temporary=true`.
    pub temporary: bool,
    /// Also declare a queue (named [`RabbitMqAddress::queue_name`]) and bind it to the exchange.
    pub bind: bool,
    /// The queue to bind when it is not named like the exchange (`queue=`).
    pub queue: Option<String>,
    /// Exchanges to bind to this one (`bindexchange=`, repeatable).
    pub bind_exchanges: Vec<String>,
    /// `alternateexchange=`.
    pub alternate_exchange: Option<String>,
    /// `delayedtype=`: the type of a delayed-message exchange (the exchange type is then `x-delayed-message`).
    pub delayed_type: Option<String>,
    /// `singleactiveconsumer=true`.
    pub single_active_consumer: bool,
}

impl RabbitMqAddress {
    /// An address of exchange `name` with MassTransit's defaults (durable fanout), in short form.
    pub fn exchange(name: impl Into<String>) -> Self {
        RabbitMqAddress {
            scheme: "exchange".into(),
            host: None,
            port: None,
            vhost: None,
            name: name.into(),
            exchange_type: "fanout".into(),
            durable: true,
            auto_delete: false,
            temporary: false,
            bind: false,
            queue: None,
            bind_exchanges: Vec::new(),
            alternate_exchange: None,
            delayed_type: None,
            single_active_consumer: false,
        }
    }

    /// Parses `rabbitmq[s]://host[:port]/[vhost/]name[?options]`, `amqp[s]://…`, `queue:name[?options]`,
    /// `exchange:name[?options]` or the bare name `amq.rabbitmq.reply-to`.
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(AddressError::Empty);
        }
        if text == DIRECT_REPLY_TO {
            return Ok(RabbitMqAddress::exchange(DIRECT_REPLY_TO));
        }
        let scheme = scheme_of(text).map(|s| s.to_ascii_lowercase()).ok_or_else(|| AddressError::Malformed {
            text: text.into(),
            reason: "it has no scheme (expected `rabbitmq://host/name`, `queue:name` or `exchange:name`)".into(),
        })?;
        let mut address = RabbitMqAddress::exchange(String::new());
        let query = match scheme.as_str() {
            "rabbitmq" | "rabbitmqs" | "amqp" | "amqps" => {
                let url = url::Url::parse(text)
                    .map_err(|e| AddressError::Malformed { text: text.into(), reason: e.to_string() })?;
                let host = url
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| AddressError::Malformed { text: text.into(), reason: "it names no host".into() })?;
                let default_port = if scheme.ends_with('s') { 5671 } else { 5672 };
                let mut segments: Vec<String> = Vec::new();
                for segment in url.path().split('/').filter(|s| !s.is_empty()) {
                    segments.push(decode(text, segment)?);
                }
                let name = segments.pop().ok_or_else(|| AddressError::MissingName { text: text.into() })?;
                let vhost = segments.join("/");
                address.host = Some(host.to_owned());
                address.port = url.port().filter(|p| *p != default_port);
                address.vhost = if vhost.is_empty() || vhost == "/" { None } else { Some(vhost) };
                address.name = name;
                address.scheme = scheme;
                url.query().map(str::to_owned)
            }
            "queue" | "exchange" => {
                let rest = &text[scheme.len() + 1..];
                let (path, query) = split_query(rest);
                let path = path.trim_start_matches('/');
                if path.is_empty() {
                    return Err(AddressError::MissingName { text: text.into() });
                }
                address.name = decode(text, path)?;
                address.bind = scheme == "queue";
                address.scheme = scheme;
                query.map(str::to_owned)
            }
            other => {
                return Err(AddressError::UnsupportedScheme {
                    text: text.into(),
                    scheme: other.into(),
                    transport: TransportKind::RabbitMq,
                    expected: "rabbitmq, rabbitmqs, amqp, amqps, queue: or exchange:",
                });
            }
        };
        check_rabbit_name(text, &address.name)?;
        if let Some(query) = query {
            address.apply_query(text, &query)?;
        }
        address.temporary = !address.durable && address.auto_delete;
        Ok(address)
    }

    fn apply_query(&mut self, text: &str, query: &str) -> Result<(), AddressError> {
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let key = key.to_ascii_lowercase();
            let value = value.trim().to_owned();
            let flag = |value: &str| -> Result<bool, AddressError> {
                parse_bool(value).ok_or_else(|| AddressError::InvalidOption {
                    text: text.into(),
                    key: key.clone(),
                    value: value.into(),
                    expected: "expected true or false",
                })
            };
            match key.as_str() {
                "temporary" => {
                    let on = flag(&value)?;
                    self.auto_delete = on;
                    self.durable = !on;
                }
                "durable" | "persistent" => self.durable = flag(&value)?,
                "autodelete" => self.auto_delete = flag(&value)?,
                "bind" => self.bind = flag(&value)?,
                "singleactiveconsumer" => self.single_active_consumer = flag(&value)?,
                "type" if !value.is_empty() => self.exchange_type = value,
                "queue" if !value.is_empty() => {
                    check_rabbit_name(text, &value)?;
                    self.queue = Some(value);
                }
                "delayedtype" if !value.is_empty() => {
                    self.delayed_type = Some(value);
                    self.exchange_type = "x-delayed-message".into();
                }
                "alternateexchange" if !value.is_empty() => {
                    check_rabbit_name(text, &value)?;
                    self.alternate_exchange = Some(value);
                }
                "bindexchange" if !value.is_empty() => {
                    check_rabbit_name(text, &value)?;
                    if !self.bind_exchanges.contains(&value) {
                        self.bind_exchanges.push(value);
                    }
                }
                // Unknown keys and empty values are ignored, as MassTransit does.
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether this is RabbitMQ's direct reply-to pseudo-queue: answer by publishing to the
    /// default exchange with the request's AMQP `reply_to` as routing key.
    pub fn is_direct_reply_to(&self) -> bool {
        self.name.ends_with(DIRECT_REPLY_TO)
    }

    /// The queue to declare and bind, when `bind` is set: `queue=` or else the exchange's name.
    pub fn queue_name(&self) -> Option<&str> {
        if self.bind { Some(self.queue.as_deref().unwrap_or(&self.name)) } else { None }
    }

    fn query_options(&self) -> Vec<String> {
        let mut options = Vec::new();
        if !self.durable && self.auto_delete {
            options.push("temporary=true".to_owned());
        } else if !self.durable {
            options.push("durable=false".to_owned());
        } else if self.auto_delete {
            options.push("autodelete=true".to_owned());
        }
        if self.delayed_type.is_none() && self.exchange_type != "fanout" {
            options.push(format!("type={}", encode_value(&self.exchange_type)));
        }
        // The short form `queue:` implies bind=true.
        if self.bind && self.scheme != "queue" {
            options.push("bind=true".to_owned());
        } else if !self.bind && self.scheme == "queue" {
            options.push("bind=false".to_owned());
        }
        if let Some(queue) = &self.queue {
            options.push(format!("queue={}", encode_value(queue)));
        }
        if let Some(delayed) = &self.delayed_type {
            options.push(format!("delayedtype={}", encode_value(delayed)));
        }
        if let Some(alternate) = &self.alternate_exchange {
            options.push(format!("alternateexchange={}", encode_value(alternate)));
        }
        for exchange in &self.bind_exchanges {
            options.push(format!("bindexchange={}", encode_value(exchange)));
        }
        if self.single_active_consumer {
            options.push("singleactiveconsumer=true".to_owned());
        }
        options
    }
}

impl fmt::Display for RabbitMqAddress {
    /// MassTransit's form: port 5672/5671 and vhost `/` omitted, options in MassTransit's order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = utf8_percent_encode(&self.name, SEGMENT);
        match &self.host {
            Some(host) if self.scheme != "queue" && self.scheme != "exchange" => {
                write!(f, "{}://{}", self.scheme, host)?;
                if let Some(port) = self.port {
                    write!(f, ":{port}")?;
                }
                if let Some(vhost) = &self.vhost {
                    write!(f, "/{}", utf8_percent_encode(vhost, SEGMENT))?;
                }
                write!(f, "/{name}")?;
            }
            _ if self.scheme == "queue" => write!(f, "queue:{name}")?,
            _ => write!(f, "exchange:{name}")?,
        }
        let options = self.query_options();
        if !options.is_empty() {
            write!(f, "?{}", options.join("&"))?;
        }
        Ok(())
    }
}

/// A Kafka topic address: `kafka://host:port/[kafka/]topic` or `topic:name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaAddress {
    /// `host[:port]` of an absolute address (informational: we use our own connection).
    pub host: Option<String>,
    pub topic: String,
}

impl KafkaAddress {
    /// Parses `kafka://host[:port]/[kafka/]topic[?…]` (the query is ignored), `topic:name`, or any
    /// other absolute URI whose last path segment is the topic (`loopback://localhost/kafka/t`).
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(AddressError::Empty);
        }
        let scheme = scheme_of(text).map(|s| s.to_ascii_lowercase()).ok_or_else(|| AddressError::Malformed {
            text: text.into(),
            reason: "it has no scheme (expected `kafka://host:port/topic` or `topic:name`)".into(),
        })?;
        let (host, topic) = if scheme == "topic" {
            let (path, _) = split_query(&text[scheme.len() + 1..]);
            (None, decode(text, path.trim_start_matches('/'))?)
        } else if scheme == "queue" || scheme == "exchange" {
            return Err(AddressError::UnsupportedScheme {
                text: text.into(),
                scheme,
                transport: TransportKind::Kafka,
                expected: "kafka:// or topic:",
            });
        } else {
            let url = url::Url::parse(text)
                .map_err(|e| AddressError::Malformed { text: text.into(), reason: e.to_string() })?;
            let host = url.host_str().filter(|h| !h.is_empty()).map(|h| match url.port() {
                Some(port) => format!("{h}:{port}"),
                None => h.to_owned(),
            });
            let last = url.path().split('/').rfind(|s| !s.is_empty()).unwrap_or("");
            (host, decode(text, last)?)
        };
        if topic.is_empty() {
            return Err(AddressError::MissingName { text: text.into() });
        }
        check_kafka_topic(text, &topic)?;
        Ok(KafkaAddress { host, topic })
    }
}

impl fmt::Display for KafkaAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Some(host) => write!(f, "kafka://{host}/{}", self.topic),
            None => write!(f, "topic:{}", self.topic),
        }
    }
}

/// What a Service Bus address names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceBusEntity {
    Queue,
    Topic,
}

/// A Service Bus entity address: `sb://ns.servicebus.windows.net/[scope/]name[?type=topic][&autodelete=SECS]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceBusAddress {
    /// The namespace host (`ns.servicebus.windows.net`); empty for a short form.
    pub namespace: String,
    /// Every path segment before the last, joined with `/` (entity names may themselves contain
    /// `/`, so use [`ServiceBusAddress::entity_path`] to address the entity).
    pub scope: Option<String>,
    /// The last path segment.
    pub name: String,
    /// Queue unless `type=topic`.
    pub kind: ServiceBusEntity,
    /// `autodelete=SECS`: delete the entity after this long idle.
    pub auto_delete_seconds: Option<u64>,
}

impl ServiceBusAddress {
    /// Parses `sb://namespace/[scope/]name[?type=topic|queue][&autodelete=SECS]`, `queue:name` or `topic:name`.
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(AddressError::Empty);
        }
        let scheme = scheme_of(text).map(|s| s.to_ascii_lowercase()).ok_or_else(|| AddressError::Malformed {
            text: text.into(),
            reason: "it has no scheme (expected `sb://namespace/name`, `queue:name` or `topic:name`)".into(),
        })?;
        let (mut address, query) = match scheme.as_str() {
            "sb" => {
                let url = url::Url::parse(text)
                    .map_err(|e| AddressError::Malformed { text: text.into(), reason: e.to_string() })?;
                let namespace = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| AddressError::Malformed {
                    text: text.into(),
                    reason: "it names no namespace".into(),
                })?;
                // A `/` written as `%2F` separates like any other: the scope is kept as its segments
                // joined with `/`, so an empty piece could not be written back and read the same.
                let mut segments = Vec::new();
                for segment in url.path().split('/').filter(|s| !s.is_empty()) {
                    push_pieces(&mut segments, &decode(text, segment)?);
                }
                let name = segments.pop().ok_or_else(|| AddressError::MissingName { text: text.into() })?;
                let scope = if segments.is_empty() { None } else { Some(segments.join("/")) };
                let address = ServiceBusAddress {
                    namespace: namespace.to_owned(),
                    scope,
                    name,
                    kind: ServiceBusEntity::Queue,
                    auto_delete_seconds: None,
                };
                (address, url.query().map(str::to_owned))
            }
            "queue" | "topic" => {
                let (path, query) = split_query(&text[scheme.len() + 1..]);
                let path = path.trim_matches('/');
                if path.is_empty() {
                    return Err(AddressError::MissingName { text: text.into() });
                }
                let mut segments = Vec::new();
                for segment in path.split('/') {
                    push_pieces(&mut segments, &decode(text, segment)?);
                }
                let name = segments.pop().unwrap_or_default();
                let scope = if segments.is_empty() { None } else { Some(segments.join("/")) };
                let kind = if scheme == "topic" { ServiceBusEntity::Topic } else { ServiceBusEntity::Queue };
                let address =
                    ServiceBusAddress { namespace: String::new(), scope, name, kind, auto_delete_seconds: None };
                (address, query.map(str::to_owned))
            }
            other => {
                return Err(AddressError::UnsupportedScheme {
                    text: text.into(),
                    scheme: other.into(),
                    transport: TransportKind::ServiceBus,
                    expected: "sb://, queue: or topic:",
                });
            }
        };
        if address.name.is_empty() {
            return Err(AddressError::MissingName { text: text.into() });
        }
        let path = address.entity_path();
        if path.chars().count() > 260 {
            return Err(AddressError::InvalidName {
                text: text.into(),
                name: path,
                reason: "Service Bus entity paths are at most 260 characters".into(),
            });
        }
        if let Some(query) = query {
            for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
                let value = value.trim();
                match key.to_ascii_lowercase().as_str() {
                    "type" if value.eq_ignore_ascii_case("topic") => address.kind = ServiceBusEntity::Topic,
                    "type" if value.eq_ignore_ascii_case("queue") => address.kind = ServiceBusEntity::Queue,
                    "type" => {
                        return Err(AddressError::InvalidOption {
                            text: text.into(),
                            key: "type".into(),
                            value: value.into(),
                            expected: "expected queue or topic",
                        });
                    }
                    "autodelete" => {
                        let seconds = value.parse::<u64>().map_err(|_| AddressError::InvalidOption {
                            text: text.into(),
                            key: "autodelete".into(),
                            value: value.into(),
                            expected: "expected a whole number of seconds",
                        })?;
                        address.auto_delete_seconds = Some(seconds);
                    }
                    _ => {}
                }
            }
        }
        Ok(address)
    }

    /// The entity's full path in the namespace: `scope/name`, or `name`.
    pub fn entity_path(&self) -> String {
        match &self.scope {
            Some(scope) => format!("{scope}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

impl fmt::Display for ServiceBusAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut path = String::new();
        if let Some(scope) = &self.scope {
            for segment in scope.split('/') {
                path.push_str(&utf8_percent_encode(segment, SEGMENT).to_string());
                path.push('/');
            }
        }
        path.push_str(&utf8_percent_encode(&self.name, SEGMENT).to_string());
        let mut options = Vec::new();
        if self.namespace.is_empty() {
            let form = match self.kind {
                ServiceBusEntity::Queue => "queue",
                ServiceBusEntity::Topic => "topic",
            };
            write!(f, "{form}:{path}")?;
        } else {
            write!(f, "sb://{}/{path}", self.namespace)?;
            if self.kind == ServiceBusEntity::Topic {
                options.push("type=topic".to_owned());
            }
        }
        if let Some(seconds) = self.auto_delete_seconds {
            options.push(format!("autodelete={seconds}"));
        }
        if !options.is_empty() {
            write!(f, "?{}", options.join("&"))?;
        }
        Ok(())
    }
}

/// Adds a decoded Service Bus path segment to `segments` as URL resolution would read its printed form:
/// a `/` it holds (sent as `%2F`) separates, empty pieces and `.` go, `..` removes the piece before.
/// The scope is kept as its segments joined with `/`, so only normalized pieces print and read back the same.
fn push_pieces(segments: &mut Vec<String>, decoded: &str) {
    for piece in decoded.split('/') {
        match piece {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other.to_owned()),
        }
    }
}

/// Characters escaped in a path segment we write.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Characters escaped in a query value we write.
const QUERY_VALUE: &AsciiSet = &SEGMENT.add(b'&').add(b'=').add(b'+').add(b';');

fn encode_value(value: &str) -> String {
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

/// The scheme of `text` if it starts with one (`letter *(letter / digit / + - .)` then `:`).
fn scheme_of(text: &str) -> Option<&str> {
    let colon = text.find(':')?;
    let scheme = &text[..colon];
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic() && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
        .then_some(scheme)
}

fn split_query(text: &str) -> (&str, Option<&str>) {
    match text.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (text, None),
    }
}

fn decode(text: &str, segment: &str) -> Result<String, AddressError> {
    percent_decode_str(segment).decode_utf8().map(|s| s.into_owned()).map_err(|_| AddressError::Malformed {
        text: text.into(),
        reason: format!("`{segment}` does not percent-decode to UTF-8"),
    })
}

/// .NET's `bool.TryParse`: `true`/`false` in any case.
fn parse_bool(value: &str) -> Option<bool> {
    if value.eq_ignore_ascii_case("true") {
        Some(true)
    } else if value.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

fn check_rabbit_name(text: &str, name: &str) -> Result<(), AddressError> {
    let problem = if name.is_empty() {
        Some("RabbitMQ names cannot be empty".to_owned())
    } else if name.len() > 255 {
        Some(format!("RabbitMQ names are at most 255 bytes, this one has {}", name.len()))
    } else if name.chars().any(char::is_control) {
        Some("RabbitMQ names cannot contain control characters".to_owned())
    } else {
        None
    };
    match problem {
        Some(reason) => Err(AddressError::InvalidName { text: text.into(), name: name.into(), reason }),
        None => Ok(()),
    }
}

fn check_kafka_topic(text: &str, topic: &str) -> Result<(), AddressError> {
    let problem = if topic.len() > 249 {
        Some(format!("Kafka topic names are at most 249 characters, this one has {}", topic.len()))
    } else if topic == "." || topic == ".." {
        Some("Kafka does not allow the topic names `.` and `..`".to_owned())
    } else {
        topic
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            .map(|bad| format!("Kafka topic names may only contain letters, digits, `.`, `_` and `-`, not `{bad}`"))
    };
    match problem {
        Some(reason) => Err(AddressError::InvalidName { text: text.into(), name: topic.into(), reason }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rabbit(text: &str) -> RabbitMqAddress {
        match Address::parse(text, TransportKind::RabbitMq) {
            Ok(Address::RabbitMq(a)) => a,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn js_response_address_is_a_temporary_exchange_on_the_default_vhost() {
        let a = rabbit("amqp://127.0.0.1/bus-8703f5ee-9a4c-9693-362f-7e1c52769792?temporary=true");
        assert_eq!(a.scheme, "amqp");
        assert_eq!(a.host.as_deref(), Some("127.0.0.1"));
        assert_eq!((a.port, a.vhost.as_deref()), (None, None));
        assert_eq!(a.name, "bus-8703f5ee-9a4c-9693-362f-7e1c52769792");
        assert!(!a.durable && a.auto_delete && a.temporary);
        assert_eq!(a.exchange_type, "fanout");
        assert_eq!(a.queue_name(), None);
        assert_eq!(a.to_string(), "amqp://127.0.0.1/bus-8703f5ee-9a4c-9693-362f-7e1c52769792?temporary=true");
    }

    #[test]
    fn vhost_port_and_percent_encoding() {
        let a =
            rabbit("RabbitMQS://Broker:5671/my%20vhost/Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand");
        assert_eq!(a.scheme, "rabbitmqs");
        assert_eq!(a.port, None, "5671 is the default of an s scheme");
        assert_eq!(a.vhost.as_deref(), Some("my vhost"));
        assert_eq!(a.name, "Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand");
        let b = rabbit("rabbitmq://h:5673/%2F/q%3Fx");
        assert_eq!((b.port, b.vhost.as_deref(), b.name.as_str()), (Some(5673), None, "q?x"));
        assert_eq!(b.to_string(), "rabbitmq://h:5673/q%3Fx");
    }

    #[test]
    fn every_query_option_is_read() {
        let a = rabbit(
            "rabbitmq://h/x?durable=false&AutoDelete=TRUE&type=topic&bind=true&queue=my%20q&bindexchange=a&bindexchange=b\
             &alternateexchange=alt&singleactiveconsumer=true&unknown=1",
        );
        assert!(!a.durable && a.auto_delete && a.temporary);
        assert_eq!(a.exchange_type, "topic");
        assert_eq!(a.queue_name(), Some("my q"));
        assert_eq!(a.bind_exchanges, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(a.alternate_exchange.as_deref(), Some("alt"));
        assert!(a.single_active_consumer);
        let d = rabbit("rabbitmq://h/x?delayedtype=direct&autodelete=true");
        assert_eq!((d.exchange_type.as_str(), d.delayed_type.as_deref()), ("x-delayed-message", Some("direct")));
        assert!(d.durable && d.auto_delete && !d.temporary);
        assert_eq!(d.to_string(), "rabbitmq://h/x?autodelete=true&delayedtype=direct");
    }

    #[test]
    fn short_forms_follow_the_default_transport() {
        let q = rabbit("queue:orders?durable=false");
        assert!(q.bind && !q.durable && !q.auto_delete);
        assert_eq!(q.queue_name(), Some("orders"));
        assert_eq!(q.to_string(), "queue:orders?durable=false");
        let e = rabbit("exchange:orders");
        assert!(!e.bind && e.durable);
        assert_eq!(e.to_string(), "exchange:orders");
        assert!(rabbit(DIRECT_REPLY_TO).is_direct_reply_to());
        assert!(rabbit("rabbitmq://localhost/amq.rabbitmq.reply-to").is_direct_reply_to());

        assert_eq!(
            Address::parse("topic:FirelyServerCommands.ExecuteStorePlanCommand", TransportKind::Kafka).unwrap(),
            Address::Kafka(KafkaAddress { host: None, topic: "FirelyServerCommands.ExecuteStorePlanCommand".into() })
        );
        let Address::ServiceBus(t) = Address::parse("topic:ns/Type", TransportKind::ServiceBus).unwrap() else {
            panic!()
        };
        assert_eq!((t.kind, t.entity_path().as_str()), (ServiceBusEntity::Topic, "ns/Type"));
        assert!(matches!(Address::parse("queue:x", TransportKind::Kafka), Err(AddressError::UnsupportedScheme { .. })));
        assert!(matches!(
            Address::parse("topic:x", TransportKind::RabbitMq),
            Err(AddressError::UnsupportedScheme { .. })
        ));
    }

    #[test]
    fn absolute_schemes_win_over_the_default() {
        assert_eq!(Address::parse("rabbitmq://h/x", TransportKind::Kafka).unwrap().kind(), TransportKind::RabbitMq);
        let k = Address::parse("kafka://kafka-broker:9092/response-topic?type=topic", TransportKind::RabbitMq).unwrap();
        assert_eq!(
            k,
            Address::Kafka(KafkaAddress { host: Some("kafka-broker:9092".into()), topic: "response-topic".into() })
        );
        assert_eq!(k.to_string(), "kafka://kafka-broker:9092/response-topic");
        let l = Address::parse("loopback://localhost/kafka/FirelyServerCommands.X", TransportKind::Kafka).unwrap();
        assert_eq!(l.name(), "FirelyServerCommands.X");
        let s = Address::parse(
            "sb://ns.servicebus.windows.net/scope/name?type=topic&autodelete=300",
            TransportKind::RabbitMq,
        )
        .unwrap();
        assert_eq!(
            s,
            Address::ServiceBus(ServiceBusAddress {
                namespace: "ns.servicebus.windows.net".into(),
                scope: Some("scope".into()),
                name: "name".into(),
                kind: ServiceBusEntity::Topic,
                auto_delete_seconds: Some(300),
            })
        );
        assert_eq!(s.to_string(), "sb://ns.servicebus.windows.net/scope/name?type=topic&autodelete=300");
        let Address::ServiceBus(q) = Address::parse("sb://ns/firelyserver", TransportKind::ServiceBus).unwrap() else {
            panic!()
        };
        assert_eq!((q.kind, q.scope, q.name.as_str()), (ServiceBusEntity::Queue, None, "firelyserver"));
    }

    #[test]
    fn bad_addresses_name_the_problem() {
        assert_eq!(Address::parse("  ", TransportKind::RabbitMq), Err(AddressError::Empty));
        assert!(matches!(RabbitMqAddress::parse("not an address"), Err(AddressError::Malformed { .. })));
        assert!(matches!(RabbitMqAddress::parse("rabbitmq://host/"), Err(AddressError::MissingName { .. })));
        assert!(matches!(RabbitMqAddress::parse("http://host/x"), Err(AddressError::UnsupportedScheme { .. })));
        let long = format!("rabbitmq://h/{}", "a".repeat(256));
        assert!(matches!(RabbitMqAddress::parse(&long), Err(AddressError::InvalidName { .. })));
        assert!(RabbitMqAddress::parse(&format!("rabbitmq://h/{}", "a".repeat(255))).is_ok());
        let err = RabbitMqAddress::parse("rabbitmq://h/x?durable=maybe").unwrap_err();
        assert!(matches!(&err, AddressError::InvalidOption { key, value, .. } if key == "durable" && value == "maybe"));
        assert!(err.to_string().contains("durable=maybe"), "{err}");
        let err =
            KafkaAddress::parse("kafka://h/Firely.Server.Contracts.Messages.V1:ResourcesChangedEvent").unwrap_err();
        assert!(matches!(err, AddressError::InvalidName { .. }), "{err:?}");
        assert!(err.to_string().contains("`:`"), "{err}");
        assert!(KafkaAddress::parse(&format!("topic:{}", "t".repeat(250))).is_err());
        assert!(KafkaAddress::parse(&format!("topic:{}", "t".repeat(249))).is_ok());
        assert!(matches!(ServiceBusAddress::parse("sb://ns/x?type=exchange"), Err(AddressError::InvalidOption { .. })));
        assert!(matches!(
            ServiceBusAddress::parse("sb://ns/x?autodelete=soon"),
            Err(AddressError::InvalidOption { .. })
        ));
    }
}
