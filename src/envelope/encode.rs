//! Writing envelopes as MassTransit v8 (System.Text.Json) does, and building the envelopes the
//! bridge sends: responses, faults, events and requests.
//!
//! Output: camelCase, nulls written, indented with 2 spaces, ids in lowercase D form, times with
//! at most 7 fractional digits, non-ASCII written as is. Responses and faults follow MassTransit's
//! rules: the concrete type first in `messageType`, `requestId` echoed, and every request header
//! not starting with `MT-` carried over.

use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::{Envelope, ids};
use crate::contracts::MessageType;

/// The name we give ourselves in `host.processName` and `host.assembly`.
const PROCESS_NAME: &str = "fhir-pubsub";

/// The generic fault URN MassTransit lists after the concrete `Fault<T>`.
pub const FAULT_URN: &str = "urn:message:MassTransit:Fault";

pub(super) fn time<S: Serializer>(time: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match time {
        Some(t) => s.serialize_str(&ids::format_time(t)),
        None => s.serialize_none(),
    }
}

/// Writes an envelope as MassTransit v8 does (indented with 2 spaces, nulls written). The
/// `message` is written exactly as it is held.
pub fn encode(envelope: &Envelope) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"  ");
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    // Every field is a string, a GUID, a JSON value or valid raw JSON, none of which can fail.
    envelope.serialize(&mut serializer).expect("an Envelope always serializes");
    out
}

/// Our `host` object, with the keys MassTransit writes. Built once per process: it goes into every
/// reply, and the machine name is a file read.
pub fn host_info() -> Value {
    static HOST: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    HOST.get_or_init(build_host_info).clone()
}

fn build_host_info() -> Value {
    json!({
        "machineName": machine_name(),
        "processName": PROCESS_NAME,
        "processId": std::process::id(),
        "assembly": PROCESS_NAME,
        "assemblyVersion": env!("CARGO_PKG_VERSION"),
        "frameworkVersion": "rust",
        "massTransitVersion": null,
        "operatingSystemVersion": std::env::consts::OS,
    })
}

fn machine_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The request's headers that travel on with a response or fault: every one not starting with `MT-`.
fn transferred_headers(headers: &Map<String, Value>) -> Map<String, Value> {
    headers.iter().filter(|(k, _)| !is_mt_header(k)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn is_mt_header(name: &str) -> bool {
    name.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("MT-"))
}

fn non_empty(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

impl Envelope {
    /// The response to `request`, as MassTransit's `RespondAsync` writes it: new messageId,
    /// requestId echoed, conversation kept, initiatorId = request correlationId ?? requestId,
    /// `messageType` = the response URN only, non-`MT-` headers carried over, the request's
    /// expirationTime kept.
    pub fn response(
        request: &Envelope,
        response_type: MessageType,
        message: Box<RawValue>,
        source_address: &str,
        destination_address: &str,
    ) -> Envelope {
        Envelope {
            message_id: Some(ids::new_id()),
            request_id: request.request_id,
            correlation_id: None,
            conversation_id: Some(request.conversation_id.unwrap_or_else(ids::new_id)),
            initiator_id: request.correlation_id.or(request.request_id),
            source_address: non_empty(source_address),
            destination_address: non_empty(destination_address),
            response_address: None,
            fault_address: None,
            message_type: vec![response_type.urn()],
            message: Some(message),
            expiration_time: request.expiration_time,
            sent_time: Some(ids::now()),
            headers: transferred_headers(&request.headers),
            host: Some(host_info()),
        }
    }

    /// A `Fault<request_type>` about `request`, for an unexpected failure (business errors go in
    /// the normal response). `destination` is where it is sent (see [`Envelope::fault_target`]).
    pub fn fault(
        request: &Envelope,
        request_type: MessageType,
        exception_type: &str,
        message: &str,
        source_address: &str,
        destination: &str,
    ) -> Envelope {
        let now = ids::now();
        let original: Value =
            request.message.as_ref().and_then(|m| serde_json::from_str::<Value>(m.get()).ok()).unwrap_or(Value::Null);
        let body = json!({
            "faultId": ids::new_id(),
            "faultedMessageId": request.message_id,
            "timestamp": ids::format_time(&now),
            "exceptions": [{
                "exceptionType": exception_type,
                "innerException": null,
                "stackTrace": "",
                "message": message,
                "source": PROCESS_NAME,
                "data": null,
            }],
            "host": host_info(),
            "faultMessageTypes": [request_type.urn()],
            "message": original,
        });
        Envelope {
            message_id: Some(ids::new_id()),
            request_id: request.request_id,
            correlation_id: request.correlation_id,
            conversation_id: Some(request.conversation_id.unwrap_or_else(ids::new_id)),
            initiator_id: request.correlation_id.or(request.request_id),
            source_address: non_empty(source_address),
            destination_address: non_empty(destination),
            response_address: None,
            fault_address: None,
            message_type: vec![request_type.fault_urn(), FAULT_URN.to_owned()],
            message: Some(to_raw(&body)),
            expiration_time: request.expiration_time,
            sent_time: Some(now),
            headers: transferred_headers(&request.headers),
            host: Some(host_info()),
        }
    }

    /// A published event (no request, no reply address).
    pub fn event(
        message_type: MessageType,
        message: Box<RawValue>,
        message_id: Uuid,
        source_address: &str,
    ) -> Envelope {
        Envelope {
            message_id: Some(message_id),
            conversation_id: Some(ids::new_id()),
            source_address: non_empty(source_address),
            message_type: vec![message_type.urn()],
            message: Some(message),
            sent_time: Some(ids::now()),
            host: Some(host_info()),
            ..Envelope::default()
        }
    }

    /// A request from our client: new messageId, requestId and conversationId, sent now. Set
    /// `expiration_time` on the result to give it a deadline.
    pub fn request(
        message_type: MessageType,
        message: Box<RawValue>,
        response_address: Option<&str>,
        headers: Map<String, Value>,
    ) -> Envelope {
        Envelope {
            message_id: Some(ids::new_id()),
            request_id: Some(ids::new_id()),
            conversation_id: Some(ids::new_id()),
            response_address: response_address.and_then(non_empty),
            message_type: vec![message_type.urn()],
            message: Some(message),
            sent_time: Some(ids::now()),
            headers,
            host: Some(host_info()),
            ..Envelope::default()
        }
    }
}

fn to_raw(value: &Value) -> Box<RawValue> {
    // A Value always serializes to valid JSON.
    serde_json::value::to_raw_value(value).expect("a JSON value always serializes")
}

/// The transport headers (AMQP headers, Service Bus application properties) of an outgoing
/// envelope, as MassTransit writes them: the envelope headers with simple values only (strings,
/// numbers, and booleans as `True`/`False`); arrays, objects and nulls are dropped.
pub fn transport_headers(envelope: &Envelope) -> Vec<(String, Value)> {
    envelope
        .headers
        .iter()
        .filter_map(|(k, v)| {
            let simple = match v {
                Value::String(_) | Value::Number(_) => v.clone(),
                Value::Bool(b) => Value::String(if *b { "True" } else { "False" }.to_owned()),
                Value::Null | Value::Array(_) | Value::Object(_) => return None,
            };
            Some((k.clone(), simple))
        })
        .collect()
}
