//! Reading a received body into an [`Envelope`], as a MassTransit receiver would.
//!
//! A body that is a JSON object with a `message` or `messageType` member (any case) is an
//! envelope, whatever the content type says; anything else is raw JSON: the whole body is the
//! message and the ids, addresses and types come from the transport headers. Member names are
//! matched without regard to case, comments and trailing commas are accepted, missing and null
//! members are absent, unknown members are ignored. Ids must be GUIDs and addresses absolute URIs
//! when present and non-empty, because MassTransit faults on anything else.

use serde_json::value::RawValue;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::{ENVELOPE_CONTENT_TYPE, Envelope, ids};
use crate::json::{self, JsonError, Object};
use crate::transport::TransportMeta;

/// Why a received body cannot be read as a message.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body is not UTF-8.
    #[error("the message body is not valid UTF-8 (first bad byte at offset {offset}); send the envelope as UTF-8 JSON")]
    InvalidUtf8 { offset: usize },
    /// The body is not JSON, even allowing comments and trailing commas.
    #[error("the message body is not valid JSON ({detail}); send a MassTransit envelope or a bare JSON message")]
    InvalidJson { detail: String },
    /// The content type says envelope, but the body is not a JSON object.
    #[error(
        "the message is sent as a MassTransit envelope (content type {ENVELOPE_CONTENT_TYPE}) but its body is {found}, \
         not a JSON object; send {{\"messageType\": [...], \"message\": {{...}}}} or use content type application/json"
    )]
    NotAnObject { found: &'static str },
    /// An id field or header is present and non-empty but not a GUID.
    #[error(
        "`{field}` is `{value}`, which is not a GUID; send a GUID such as 3f2504e0-4f89-11d3-9a0c-0305e82c3301, or leave it out"
    )]
    BadId { field: String, value: String },
    /// An address field or header is present and non-empty but not an absolute URI.
    #[error(
        "`{field}` is `{value}`, which is not an absolute URI; send an address such as rabbitmq://host/exchange-name, or leave it out"
    )]
    BadAddress { field: String, value: String },
    /// A time field is present and non-empty but not an ISO-8601 time.
    #[error(
        "`{field}` is `{value}`, which is not an ISO-8601 time; send a time such as 2024-01-31T12:00:00Z, or leave it out"
    )]
    BadTime { field: String, value: String },
    /// A member has the wrong JSON type.
    #[error("`{field}` {problem}")]
    BadField { field: String, problem: String },
}

impl From<JsonError> for DecodeError {
    fn from(e: JsonError) -> Self {
        match e {
            JsonError::InvalidUtf8(offset) => DecodeError::InvalidUtf8 { offset },
            JsonError::Syntax(detail) => DecodeError::InvalidJson { detail },
            JsonError::Field { field, problem } => DecodeError::BadField { field, problem },
        }
    }
}

/// Whether `body` is a MassTransit envelope: a JSON object with a `message` or `messageType`
/// member in any case. False for anything unreadable.
pub fn is_envelope(body: &[u8]) -> bool {
    let Ok(text) = json::utf8(body) else { return false };
    let text = strip_bom(text);
    if let Some(obj) = Object::parse_strict(text) {
        return looks_like_envelope(&obj);
    }
    let Ok(raw) = json::parse_lenient(text) else { return false };
    Object::parse(&raw, "the body").is_ok_and(|obj| looks_like_envelope(&obj))
}

fn looks_like_envelope(obj: &Object<'_>) -> bool {
    obj.get("message").is_some() || obj.get("messageType").is_some()
}

fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Reads a received body. `meta` supplies the ids of a raw JSON body, the message type when the
/// body names none (`meta.type_hint`), and the content type.
///
/// A missing or null `message` is not an error here: the envelope comes back with `message: None`
/// and the caller faults it.
pub fn decode(body: &[u8], meta: &TransportMeta) -> Result<Envelope, DecodeError> {
    let text = strip_bom(json::utf8(body)?);
    let mut envelope = match Object::parse_strict(text) {
        // The usual body, an envelope in strict JSON, is read in one pass.
        Some(obj) if looks_like_envelope(&obj) => from_envelope(&obj)?,
        _ => decode_slowly(text, meta)?,
    };
    if envelope.message_type.is_empty()
        && let Some(hint) = meta.type_hint
    {
        envelope.message_type.push(hint.urn());
    }
    Ok(envelope)
}

/// Any body: lenient JSON, a raw message, or no JSON at all.
fn decode_slowly(text: &str, meta: &TransportMeta) -> Result<Envelope, DecodeError> {
    let raw = if text.trim().is_empty() { json::parse_lenient("{}")? } else { json::parse_lenient(text)? };
    match Object::parse(&raw, "the body") {
        Ok(obj) if looks_like_envelope(&obj) => from_envelope(&obj),
        Ok(_) => from_raw(&raw, meta),
        Err(_) if declares_envelope(meta) => Err(DecodeError::NotAnObject { found: json::kind_of(&raw) }),
        Err(_) => from_raw(&raw, meta),
    }
}

fn declares_envelope(meta: &TransportMeta) -> bool {
    let content_type = meta
        .content_type
        .as_deref()
        .or_else(|| ["Content-Type", "ContentType"].iter().find_map(|h| meta.header(h).and_then(Value::as_str)));
    content_type.and_then(|c| c.split(';').next()).is_some_and(|m| m.trim().eq_ignore_ascii_case(ENVELOPE_CONTENT_TYPE))
}

fn from_envelope(obj: &Object<'_>) -> Result<Envelope, DecodeError> {
    let id = |name: &str| -> Result<Option<Uuid>, DecodeError> {
        match obj.get_non_null(name) {
            None => Ok(None),
            Some(raw) => parse_id(name, &scalar_text(raw)),
        }
    };
    let address = |name: &str| -> Result<Option<String>, DecodeError> {
        match obj.get_non_null(name) {
            None => Ok(None),
            Some(raw) => parse_address(name, &scalar_text(raw)),
        }
    };
    let time = |name: &str| -> Result<Option<chrono::DateTime<chrono::Utc>>, DecodeError> {
        match obj.get_non_null(name) {
            None => Ok(None),
            Some(raw) => {
                let text = scalar_text(raw);
                if text.trim().is_empty() {
                    return Ok(None);
                }
                ids::parse_time(&text)
                    .map(Some)
                    .ok_or_else(|| DecodeError::BadTime { field: name.to_owned(), value: text })
            }
        }
    };
    Ok(Envelope {
        message_id: id("messageId")?,
        request_id: id("requestId")?,
        correlation_id: id("correlationId")?,
        conversation_id: id("conversationId")?,
        initiator_id: id("initiatorId")?,
        source_address: address("sourceAddress")?,
        destination_address: address("destinationAddress")?,
        response_address: address("responseAddress")?,
        fault_address: address("faultAddress")?,
        message_type: message_types(obj.get_non_null("messageType"))?,
        message: obj.get_non_null("message").map(RawValue::to_owned),
        expiration_time: time("expirationTime")?,
        sent_time: time("sentTime")?,
        headers: headers(obj.get_non_null("headers"))?,
        host: match obj.get_non_null("host") {
            None => None,
            Some(raw) => Some(
                serde_json::from_str::<Value>(raw.get())
                    .map_err(|e| DecodeError::BadField { field: "host".into(), problem: e.to_string() })?,
            ),
        },
    })
}

/// A string member's text, or any other JSON value's source text (for error messages and for
/// senders that write ids as numbers).
fn scalar_text(raw: &RawValue) -> String {
    serde_json::from_str::<String>(raw.get()).unwrap_or_else(|_| raw.get().to_owned())
}

fn parse_id(field: &str, text: &str) -> Result<Option<Uuid>, DecodeError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    ids::parse_guid(text)
        .map(Some)
        .ok_or_else(|| DecodeError::BadId { field: field.to_owned(), value: text.to_owned() })
}

fn parse_address(field: &str, text: &str) -> Result<Option<String>, DecodeError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    match url::Url::parse(trimmed) {
        Ok(_) => Ok(Some(trimmed.to_owned())),
        Err(_) => Err(DecodeError::BadAddress { field: field.to_owned(), value: text.to_owned() }),
    }
}

fn message_types(raw: Option<&RawValue>) -> Result<Vec<String>, DecodeError> {
    let Some(raw) = raw else { return Ok(Vec::new()) };
    if let Ok(single) = serde_json::from_str::<String>(raw.get()) {
        return Ok(split_types(&single));
    }
    let list = json::array(raw, "messageType").map_err(|_| DecodeError::BadField {
        field: "messageType".into(),
        problem: format!("must be a list of message type URNs, found {}", json::kind_of(raw)),
    })?;
    let mut types = Vec::with_capacity(list.len());
    for item in list {
        match serde_json::from_str::<Option<String>>(item.get()) {
            Ok(Some(urn)) if !urn.trim().is_empty() => types.push(urn.trim().to_owned()),
            Ok(_) => {}
            Err(_) => {
                return Err(DecodeError::BadField {
                    field: "messageType".into(),
                    problem: format!("must hold only URN strings, found {}", json::kind_of(item)),
                });
            }
        }
    }
    Ok(types)
}

fn split_types(text: &str) -> Vec<String> {
    text.split(';').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

fn headers(raw: Option<&RawValue>) -> Result<Map<String, Value>, DecodeError> {
    let Some(raw) = raw else { return Ok(Map::new()) };
    serde_json::from_str::<Map<String, Value>>(raw.get()).map_err(|_| DecodeError::BadField {
        field: "headers".into(),
        problem: format!("must be a JSON object of header names and values, found {}", json::kind_of(raw)),
    })
}

/// Transport headers that carry envelope fields of a raw JSON message, and so are not copied
/// into the envelope's headers.
const ENVELOPE_HEADERS: &[&str] = &[
    "MessageId",
    "CorrelationId",
    "ConversationId",
    "RequestId",
    "InitiatorId",
    "SourceAddress",
    "DestinationAddress",
    "ResponseAddress",
    "FaultAddress",
    "Content-Type",
    "ContentType",
];

fn from_raw(raw: &RawValue, meta: &TransportMeta) -> Result<Envelope, DecodeError> {
    let text = |names: &[&str]| -> Option<(String, String)> {
        names.iter().find_map(|name| {
            let value = meta.header(name)?;
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(_) | Value::Bool(_) => value.to_string(),
                _ => return None,
            };
            Some(((*name).to_owned(), text))
        })
    };
    let id = |names: &[&str]| -> Result<Option<Uuid>, DecodeError> {
        match text(names) {
            Some((name, value)) => parse_id(&name, &value),
            None => Ok(None),
        }
    };
    let address = |names: &[&str]| -> Result<Option<String>, DecodeError> {
        match text(names) {
            Some((name, value)) => parse_address(&name, &value),
            None => Ok(None),
        }
    };
    // The broker's own id properties are set by all sorts of clients: use them only when they
    // are GUIDs, while an explicit MassTransit header that is not a GUID is an error.
    let property = |value: &Option<String>| value.as_deref().and_then(ids::parse_guid);
    let mut headers = Map::new();
    for (name, value) in &meta.headers {
        let is_mt = name.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("MT-"));
        if !is_mt && !ENVELOPE_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name)) && !headers.contains_key(name) {
            headers.insert(name.clone(), value.clone());
        }
    }
    Ok(Envelope {
        message_id: id(&["MessageId"])?.or_else(|| property(&meta.message_id)),
        request_id: id(&["RequestId"])?,
        correlation_id: id(&["CorrelationId"])?.or_else(|| property(&meta.correlation_id)),
        conversation_id: id(&["ConversationId"])?,
        initiator_id: id(&["MT-InitiatorId", "InitiatorId"])?,
        source_address: address(&["MT-Source-Address", "SourceAddress"])?,
        destination_address: address(&["DestinationAddress"])?,
        response_address: address(&["MT-Response-Address", "ResponseAddress"])?,
        fault_address: address(&["MT-Fault-Address", "FaultAddress"])?,
        message_type: text(&["MT-MessageType"]).map(|(_, t)| split_types(&t)).unwrap_or_default(),
        // A bare `null` is no message, as `"message": null` in an envelope is not.
        message: (raw.get() != "null").then(|| raw.to_owned()),
        expiration_time: None,
        sent_time: None,
        headers,
        host: text(&["MT-Host-Info"]).and_then(|(_, t)| serde_json::from_str::<Value>(&t).ok()),
    })
}
