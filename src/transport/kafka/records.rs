//! Kafka records as the bridge reads and writes them (wire spec §3).
//!
//! Incoming: the record's headers become [`TransportMeta`] headers (UTF-8 text, the first of a
//! repeated key wins); the topic says the message type, so a `MT-MessageType` header is ignored as
//! MassTransit's Kafka rider ignores it. Outgoing: the bridge hands the transport MassTransit
//! envelopes; on Kafka the record's value is the bare `message` and the envelope's ids, addresses,
//! message type and headers travel as record headers.
//!
//! Invariant: nothing here panics on broker input; header values that are not UTF-8 are read
//! lossily, and a header without a value reads as JSON null.

use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use serde_json::Value;

use crate::contracts::MessageType;
use crate::envelope::{self, ENVELOPE_CONTENT_TYPE};
use crate::transport::{OutgoingMessage, TransportMeta};

/// The content type written on records whose value is a bare JSON message.
pub const RAW_JSON: &str = "application/json";

/// A received record, kept whole so that it can be copied unchanged to the error topic.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Received {
    pub fn of(message: &impl Message) -> Received {
        let headers = message
            .headers()
            .map(|h| h.iter().map(|header| (header.key.to_owned(), header.value.map(<[u8]>::to_vec))).collect())
            .unwrap_or_default();
        Received {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers,
        }
    }

    /// The transport metadata the envelope decoder reads ids and addresses from.
    pub fn meta(&self, type_hint: Option<MessageType>) -> TransportMeta {
        let headers: Vec<(String, Value)> = self
            .headers
            .iter()
            .filter(|(key, _)| !key.eq_ignore_ascii_case("MT-MessageType"))
            .map(|(key, value)| {
                let value = value.as_deref().map_or(Value::Null, |v| Value::String(String::from_utf8_lossy(v).into()));
                (key.clone(), value)
            })
            .collect();
        let content_type = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("Content-Type") || k.eq_ignore_ascii_case("ContentType"))
            .and_then(|(_, v)| v.as_str().map(str::to_owned));
        TransportMeta { content_type, headers, type_hint, ..TransportMeta::default() }
    }

    /// The record's headers plus `extra`, for a copy of it.
    pub fn headers_with(&self, extra: &[(&str, String)]) -> OwnedHeaders {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len() + extra.len());
        for (key, value) in &self.headers {
            headers = headers.insert(Header { key, value: value.as_deref() });
        }
        for (key, value) in extra {
            headers = headers.insert(Header { key, value: Some(value.as_bytes()) });
        }
        headers
    }
}

/// What is produced for an outgoing message.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn owned_headers(&self) -> OwnedHeaders {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len());
        for (key, value) in &self.headers {
            headers = headers.insert(Header { key, value: Some(value.as_bytes()) });
        }
        headers
    }
}

/// The record for an outgoing message sent to `destination`: an envelope becomes its bare message
/// with the MassTransit Kafka headers; anything else goes as it is, with its own headers.
pub fn record_of(message: &OutgoingMessage, destination: &str) -> Record {
    let decoded = (message.content_type == ENVELOPE_CONTENT_TYPE)
        .then(|| envelope::decode(&message.body, &TransportMeta::default()).ok())
        .flatten()
        .filter(|e| e.message.is_some());
    let Some(envelope) = decoded else {
        return Record {
            key: message.key.clone(),
            value: message.body.clone(),
            headers: message.headers.iter().filter_map(|(k, v)| header_text(v).map(|v| (k.clone(), v))).collect(),
        };
    };
    let mut headers = Vec::new();
    let mut id = |name: &str, value: Option<uuid::Uuid>| {
        if let Some(v) = value {
            headers.push((name.to_owned(), v.hyphenated().to_string()));
        }
    };
    id("MessageId", envelope.message_id.or(Some(message.message_id)));
    id("RequestId", envelope.request_id);
    id("CorrelationId", envelope.correlation_id);
    id("ConversationId", envelope.conversation_id);
    id("InitiatorId", envelope.initiator_id);
    if let Some(source) = &envelope.source_address {
        headers.push(("SourceAddress".to_owned(), source.clone()));
    }
    headers.push(("DestinationAddress".to_owned(), destination.to_owned()));
    headers.push(("MT-MessageType".to_owned(), envelope.message_type.join(";")));
    headers.push(("Content-Type".to_owned(), RAW_JSON.to_owned()));
    for (key, value) in &envelope.headers {
        if let Some(text) = header_text(value)
            && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(key))
        {
            headers.push((key.clone(), text));
        }
    }
    let value = envelope.message.as_ref().map(|m| m.get().as_bytes().to_vec()).unwrap_or_default();
    Record { key: message.key.clone(), value, headers }
}

/// A header value as record text: strings as they are, other values as JSON; nulls dropped.
fn header_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;
    use serde_json::json;

    fn outgoing(envelope: &Envelope) -> OutgoingMessage {
        OutgoingMessage {
            body: envelope::encode(envelope),
            content_type: ENVELOPE_CONTENT_TYPE,
            message_id: envelope.message_id.unwrap(),
            correlation_id: None,
            headers: envelope::transport_headers(envelope),
            time_to_live: None,
            reply_to: None,
            key: Some("Patient/p1".into()),
            session_id: None,
        }
    }

    #[test]
    fn a_reply_is_its_bare_message_with_ids_and_the_echoed_headers() {
        let mut request_headers = serde_json::Map::new();
        request_headers.insert("fhir-release".into(), json!("R4"));
        request_headers.insert("MT-Request-AcceptType".into(), json!(["x"]));
        let request = Envelope {
            request_id: Some(uuid::Uuid::new_v4()),
            conversation_id: Some(uuid::Uuid::new_v4()),
            headers: request_headers,
            ..Envelope::default()
        };
        let message = serde_json::value::to_raw_value(&json!({"errors": []})).unwrap();
        let reply = Envelope::response(
            &request,
            MessageType::ExecuteStorePlanResponse,
            message,
            "kafka://k:9092/Cmds",
            "kafka://k:9092/replies",
        );
        let record = record_of(&outgoing(&reply), "kafka://k:9092/replies");
        assert_eq!(serde_json::from_slice::<Value>(&record.value).unwrap(), json!({"errors": []}));
        let header = |name: &str| record.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(header("RequestId"), Some(request.request_id.unwrap().to_string().as_str()));
        assert_eq!(header("ConversationId"), Some(request.conversation_id.unwrap().to_string().as_str()));
        assert_eq!(header("MessageId"), Some(reply.message_id.unwrap().to_string().as_str()));
        assert_eq!(header("fhir-release"), Some("R4"));
        assert_eq!(header("MT-Request-AcceptType"), None, "MT- headers are not echoed");
        assert_eq!(header("MT-MessageType"), Some(MessageType::ExecuteStorePlanResponse.urn().as_str()));
        assert_eq!(header("DestinationAddress"), Some("kafka://k:9092/replies"));
        assert_eq!(record.key.as_deref(), Some("Patient/p1"));
    }

    #[test]
    fn incoming_headers_read_as_text_and_the_topic_sets_the_type() {
        let received = Received {
            topic: "Cmds.RetrievePlanCommand".into(),
            partition: 0,
            offset: 3,
            key: None,
            value: b"{}".to_vec(),
            headers: vec![
                ("responseAddress".into(), Some(b"kafka://k/replies".to_vec())),
                ("MT-MessageType".into(), Some(b"urn:message:Other".to_vec())),
                ("bad-utf8".into(), Some(vec![0xff, b'a'])),
                ("empty".into(), None),
            ],
        };
        let meta = received.meta(Some(MessageType::RetrievePlanCommand));
        assert_eq!(meta.header("ResponseAddress"), Some(&json!("kafka://k/replies")));
        assert_eq!(meta.header("MT-MessageType"), None);
        assert_eq!(meta.header("bad-utf8"), Some(&json!("\u{fffd}a")));
        assert_eq!(meta.header("empty"), Some(&Value::Null));
        let envelope = envelope::decode(&received.value, &meta).unwrap();
        assert_eq!(envelope.message_kind(), Some(MessageType::RetrievePlanCommand));
        assert_eq!(envelope.response_address.as_deref(), Some("kafka://k/replies"));
    }
}
