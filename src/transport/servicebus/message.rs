//! Service Bus messages as the bridge reads and writes them (wire spec §4).
//!
//! Incoming: `ContentType`, `MessageId`, `CorrelationId` and the application properties become
//! [`TransportMeta`]; the session a reply must go to (`ReplyToSessionId`, else `SessionId`) and the
//! `PartitionKey` are kept for the reply. Outgoing: the body is the envelope as it is, `MessageId` and
//! `CorrelationId` in the "N" form, the simple-valued headers as application properties (values
//! over 16,382 characters truncated, as MassTransit does), `TimeToLive`, and `SessionId` /
//! `PartitionKey` only when set.
//!
//! Invariant: nothing here panics on broker input; a property value of a type JSON cannot hold is
//! read as its text.

use std::time::Duration;

use azservicebus::{ServiceBusMessage, ServiceBusReceivedMessage};
use fe2o3_amqp_types::messaging::ApplicationProperties;
use fe2o3_amqp_types::primitives::{OrderedMap, SimpleValue};
use serde_json::Value;

use crate::envelope::ids;
use crate::transport::{OutgoingMessage, TransportMeta};

/// MassTransit truncates application property values to this many characters.
pub const MAX_PROPERTY_CHARS: usize = 16_382;
/// Service Bus limits `SessionId` and `PartitionKey` to this many characters.
const MAX_KEY_CHARS: usize = 128;

/// The transport metadata of a received message.
pub fn meta_of(message: &ServiceBusReceivedMessage) -> TransportMeta {
    let headers = message
        .application_properties()
        .map(|properties| properties.0.iter().map(|(k, v)| (k.clone(), json_of(v))).collect())
        .unwrap_or_default();
    TransportMeta {
        content_type: message.content_type().map(str::to_owned),
        message_id: message.message_id().map(|id| id.into_owned()),
        correlation_id: message.correlation_id().map(|id| id.into_owned()),
        headers,
        reply_to: None,
        type_hint: None,
        reply_session_id: message.reply_to_session_id().or(message.session_id()).map(str::to_owned),
        partition_key: message.partition_key().map(str::to_owned),
    }
}

/// The body of a received message: its single data section. A message whose body is an AMQP value
/// or several sections (not something MassTransit or Firely's samples send) reads as empty, so the
/// bridge reports it as unreadable instead of guessing.
pub fn body_of(message: &ServiceBusReceivedMessage) -> Vec<u8> {
    message.body().map(<[u8]>::to_vec).unwrap_or_default()
}

/// A property value as JSON: strings, booleans and numbers as themselves, ids and times as text.
pub fn json_of(value: &SimpleValue) -> Value {
    match value {
        SimpleValue::Null => Value::Null,
        SimpleValue::Bool(b) => Value::Bool(*b),
        SimpleValue::Ubyte(n) => Value::from(*n),
        SimpleValue::Ushort(n) => Value::from(*n),
        SimpleValue::Uint(n) => Value::from(*n),
        SimpleValue::Ulong(n) => Value::from(*n),
        SimpleValue::Byte(n) => Value::from(*n),
        SimpleValue::Short(n) => Value::from(*n),
        SimpleValue::Int(n) => Value::from(*n),
        SimpleValue::Long(n) => Value::from(*n),
        SimpleValue::Float(n) => Value::from(f64::from(n.into_inner())),
        SimpleValue::Double(n) => Value::from(n.into_inner()),
        SimpleValue::Char(c) => Value::String(c.to_string()),
        SimpleValue::String(s) => Value::String(s.clone()),
        SimpleValue::Symbol(s) => Value::String(s.0.clone()),
        SimpleValue::Uuid(u) => Value::String(uuid::Uuid::from_bytes(*u.as_inner()).hyphenated().to_string()),
        SimpleValue::Timestamp(t) => chrono::DateTime::from_timestamp_millis(t.milliseconds())
            .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
            .unwrap_or(Value::Null),
        SimpleValue::Binary(b) => Value::String(String::from_utf8_lossy(b.as_ref()).into_owned()),
        other => Value::String(format!("{other:?}")),
    }
}

/// A header value as a property value: strings (truncated), booleans and numbers; others dropped.
fn property_of(value: &Value) -> Option<SimpleValue> {
    match value {
        Value::String(s) => Some(SimpleValue::String(truncate(s, MAX_PROPERTY_CHARS))),
        Value::Bool(b) => Some(SimpleValue::Bool(*b)),
        Value::Number(n) => {
            n.as_i64().map(SimpleValue::Long).or_else(|| n.as_f64().map(|f| SimpleValue::Double(f.into())))
        }
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

fn truncate(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((end, _)) => text[..end].to_owned(),
        None => text.to_owned(),
    }
}

/// The Service Bus message for an outgoing message.
pub fn message_of(outgoing: &OutgoingMessage) -> ServiceBusMessage {
    let mut message = ServiceBusMessage::new(outgoing.body.clone());
    message.set_content_type(Some(outgoing.content_type.to_owned()));
    // An "N"-form GUID is 32 characters, far below the 128 allowed: setting it cannot fail.
    let _ = message.set_message_id(ids::n_form(outgoing.message_id));
    message.set_correlation_id(outgoing.correlation_id.map(ids::n_form));
    if let Some(ttl) = outgoing.time_to_live {
        let _ = message.set_time_to_live(Some(ttl.max(Duration::from_secs(1))));
    }
    let (session_id, partition_key) = routing_keys(outgoing.session_id.as_deref(), outgoing.key.as_deref());
    if let Some(session_id) = session_id {
        let _ = message.set_session_id(Some(session_id));
    }
    if let Some(partition_key) = partition_key {
        let _ = message.set_partition_key(Some(partition_key));
    }
    let mut properties = OrderedMap::new();
    for (key, value) in &outgoing.headers {
        if let Some(value) = property_of(value) {
            properties.insert(key.clone(), value);
        }
    }
    if !properties.is_empty() {
        *message.application_properties_mut() = Some(ApplicationProperties(properties));
    }
    message
}

/// `SessionId` and `PartitionKey` for a message: Service Bus refuses a message whose partition key
/// differs from its session id, so with a session the partition key follows it (as Microsoft's
/// clients do). Values too long for Service Bus are left out rather than failing the send.
pub fn routing_keys(session_id: Option<&str>, partition_key: Option<&str>) -> (Option<String>, Option<String>) {
    let fits = |s: &&str| !s.is_empty() && s.chars().count() <= MAX_KEY_CHARS;
    let session_id = session_id.filter(fits).map(str::to_owned);
    let partition_key = match &session_id {
        Some(session) => partition_key.filter(fits).map(|_| session.clone()),
        None => partition_key.filter(fits).map(str::to_owned),
    };
    (session_id, partition_key)
}

/// A copy of a received message for the error or skipped queue: the same body and properties, plus
/// `extra` application properties (`MT-Reason`, `MT-Fault-*`).
pub fn copy_of(received: &ServiceBusReceivedMessage, extra: &[(&str, String)]) -> ServiceBusMessage {
    let mut message = ServiceBusMessage::new(body_of(received));
    message.set_content_type(received.content_type().map(str::to_owned));
    if let Some(id) = received.message_id() {
        let _ = message.set_message_id(id.into_owned());
    }
    message.set_correlation_id(received.correlation_id().map(|id| id.into_owned()));
    message.set_subject(received.subject().map(str::to_owned));
    let (session_id, partition_key) = routing_keys(received.session_id(), received.partition_key());
    if let Some(session_id) = session_id {
        let _ = message.set_session_id(Some(session_id));
    }
    if let Some(partition_key) = partition_key {
        let _ = message.set_partition_key(Some(partition_key));
    }
    let mut properties = received.application_properties().map(|p| p.0.clone()).unwrap_or_default();
    for (key, value) in extra {
        properties.insert((*key).to_owned(), SimpleValue::String(truncate(value, MAX_PROPERTY_CHARS)));
    }
    if !properties.is_empty() {
        *message.application_properties_mut() = Some(ApplicationProperties(properties));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn outgoing() -> OutgoingMessage {
        OutgoingMessage {
            body: br#"{"message":{}}"#.to_vec(),
            content_type: "application/vnd.masstransit+json",
            message_id: uuid::Uuid::parse_str("0190b8f5-0000-7000-8000-000000000001").unwrap(),
            correlation_id: Some(uuid::Uuid::parse_str("0190b8f5-0000-7000-8000-000000000002").unwrap()),
            headers: vec![
                ("fhir-release".into(), json!("R4")),
                ("count".into(), json!(3)),
                ("ratio".into(), json!(0.5)),
                ("flag".into(), json!(true)),
                ("long".into(), json!("x".repeat(MAX_PROPERTY_CHARS + 10))),
                ("dropped".into(), json!(["a"])),
            ],
            time_to_live: Some(Duration::from_millis(1500)),
            reply_to: None,
            key: Some("part".into()),
            session_id: None,
        }
    }

    fn property<'a>(message: &'a ServiceBusMessage, name: &str) -> Option<&'a SimpleValue> {
        message.application_properties().and_then(|p| p.0.get(name))
    }

    #[test]
    fn an_outgoing_message_carries_masstransits_service_bus_properties() {
        let message = message_of(&outgoing());
        assert_eq!(message.body(), br#"{"message":{}}"#);
        assert_eq!(message.content_type(), Some("application/vnd.masstransit+json"));
        assert_eq!(message.message_id().as_deref(), Some("0190b8f5000070008000000000000001"), "N form");
        assert_eq!(message.correlation_id().as_deref(), Some("0190b8f5000070008000000000000002"));
        assert_eq!(message.time_to_live(), Some(Duration::from_millis(1500)));
        assert_eq!(message.partition_key(), Some("part"));
        assert_eq!(message.session_id(), None);
        assert_eq!(property(&message, "fhir-release"), Some(&SimpleValue::String("R4".into())));
        assert_eq!(property(&message, "count"), Some(&SimpleValue::Long(3)));
        assert_eq!(property(&message, "ratio"), Some(&SimpleValue::Double(0.5.into())));
        assert_eq!(property(&message, "flag"), Some(&SimpleValue::Bool(true)));
        match property(&message, "long") {
            Some(SimpleValue::String(s)) => assert_eq!(s.chars().count(), MAX_PROPERTY_CHARS),
            other => panic!("long: {other:?}"),
        }
        assert_eq!(property(&message, "dropped"), None, "arrays are not property values");
    }

    #[test]
    fn a_reply_goes_to_the_requesters_session_and_partition() {
        let mut reply = outgoing();
        reply.session_id = Some("session-7".into());
        reply.key = Some("session-7".into());
        let message = message_of(&reply);
        assert_eq!((message.session_id(), message.partition_key()), (Some("session-7"), Some("session-7")));
        // A reply-to session that differs from the request's partition key: Service Bus needs them
        // equal, so the partition key follows the session.
        assert_eq!(
            routing_keys(Some("reply-session"), Some("request-partition")),
            (Some("reply-session".into()), Some("reply-session".into()))
        );
        assert_eq!(routing_keys(None, Some("p")), (None, Some("p".into())));
        assert_eq!(routing_keys(Some(""), None), (None, None), "an empty session id is no session");
        let long = "s".repeat(MAX_KEY_CHARS + 1);
        assert_eq!(routing_keys(Some(&long), Some(&long)), (None, None), "too long for Service Bus: left out");
    }

    #[test]
    fn property_values_read_as_json() {
        assert_eq!(json_of(&SimpleValue::String("R4".into())), json!("R4"));
        assert_eq!(json_of(&SimpleValue::Int(-4)), json!(-4));
        assert_eq!(json_of(&SimpleValue::Ulong(7)), json!(7));
        assert_eq!(json_of(&SimpleValue::Bool(false)), json!(false));
        assert_eq!(json_of(&SimpleValue::Double(1.5.into())), json!(1.5));
        let id = uuid::Uuid::parse_str("0190b8f5-0000-7000-8000-000000000003").unwrap();
        assert_eq!(
            json_of(&SimpleValue::Uuid(fe2o3_amqp_types::primitives::Uuid::from(*id.as_bytes()))),
            json!(id.to_string())
        );
        assert_eq!(json_of(&SimpleValue::Null), Value::Null);
    }
}
