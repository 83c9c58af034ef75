//! Conversions between AMQP field tables and JSON values, and the MassTransit header values the
//! transport writes.
//!
//! Invariants: nothing here panics on broker input; values that have no JSON or AMQP counterpart
//! are dropped rather than guessed (arrays in outgoing headers, as MassTransit does), and byte
//! arrays are read as (lossy) UTF-8 text, which is how MassTransit exposes them.

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::Value;

use crate::contracts::{MessageType, NAMESPACE};

/// An AMQP value as JSON. Byte arrays and strings become strings, timestamps seconds since the epoch.
pub(crate) fn amqp_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(f) => serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            let value = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ByteArray(b) => Value::String(String::from_utf8_lossy(b.as_slice()).into_owned()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => {
            Value::Object(t.inner().iter().map(|(k, v)| (k.to_string(), amqp_to_json(v))).collect())
        }
        AMQPValue::Void => Value::Null,
    }
}

/// A field table as a list of JSON-valued headers, in the table's (sorted) order.
pub(crate) fn table_to_headers(table: &FieldTable) -> Vec<(String, Value)> {
    table.inner().iter().map(|(k, v)| (k.to_string(), amqp_to_json(v))).collect()
}

/// A JSON value as a header value the way MassTransit writes send headers: strings, booleans
/// and numbers only (integers as 64-bit). Arrays, objects and nulls give `None` (dropped).
pub(crate) fn header_value(value: &Value) -> Option<AMQPValue> {
    match value {
        Value::String(s) => Some(AMQPValue::LongString(LongString::from(s.as_bytes()))),
        Value::Bool(b) => Some(AMQPValue::Boolean(*b)),
        Value::Number(n) => number_value(n, false),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// A JSON value as a queue argument: integers as long ints (32-bit when they fit, as .NET's
/// `int` is written), strings, booleans, floats as doubles; arrays and objects recursively.
pub(crate) fn argument_value(value: &Value) -> Option<AMQPValue> {
    match value {
        Value::String(s) => Some(AMQPValue::LongString(LongString::from(s.as_bytes()))),
        Value::Bool(b) => Some(AMQPValue::Boolean(*b)),
        Value::Number(n) => number_value(n, true),
        Value::Array(items) => {
            Some(AMQPValue::FieldArray(FieldArray::from(items.iter().filter_map(argument_value).collect::<Vec<_>>())))
        }
        Value::Object(map) => Some(AMQPValue::FieldTable(arguments_table(map))),
        Value::Null => None,
    }
}

fn number_value(n: &serde_json::Number, prefer_32: bool) -> Option<AMQPValue> {
    if let Some(i) = n.as_i64() {
        if prefer_32 && let Ok(small) = i32::try_from(i) {
            return Some(AMQPValue::LongInt(small));
        }
        return Some(AMQPValue::LongLongInt(i));
    }
    if let Some(u) = n.as_u64() {
        // Larger than i64::MAX: nothing exact exists in AMQP 0-9-1 as RabbitMQ reads it.
        return Some(AMQPValue::Double(u as f64));
    }
    n.as_f64().map(AMQPValue::Double)
}

/// Queue arguments (`QueueArguments` in the settings) as an AMQP field table.
pub(crate) fn arguments_table(map: &serde_json::Map<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in map {
        if let Some(v) = argument_value(value) {
            table.insert(ShortString::from(key.as_str()), v);
        }
    }
    table
}

/// Send headers as an AMQP field table (MassTransit's simple-value rule).
pub(crate) fn headers_table(headers: &[(String, Value)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in headers {
        if let Some(v) = header_value(value) {
            table.insert(ShortString::from(key.as_str()), v);
        }
    }
    table
}

/// The message type implied by the exchange a delivery was published to
/// (`Firely.Server.Contracts.Messages.V1:<Type>`, compared ignoring case as MassTransit does).
pub(crate) fn type_hint(exchange: &str) -> Option<MessageType> {
    let prefix = exchange.get(..NAMESPACE.len())?;
    if !prefix.eq_ignore_ascii_case(NAMESPACE) {
        return None;
    }
    let rest = exchange[NAMESPACE.len()..].strip_prefix(':')?;
    MessageType::parse(rest).filter(|t| t.as_str().len() == rest.len())
}

/// A string header value.
pub(crate) fn text(value: impl AsRef<str>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_ref().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn type_hint_reads_the_contract_exchanges_only() {
        assert_eq!(
            type_hint("Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand"),
            Some(MessageType::ExecuteStorePlanCommand)
        );
        assert_eq!(
            type_hint("firely.server.contracts.messages.v1:retrieveplancommand"),
            Some(MessageType::RetrievePlanCommand)
        );
        assert_eq!(type_hint("FirelyServer"), None);
        assert_eq!(type_hint(""), None);
        assert_eq!(type_hint("Firely.Server.Contracts.Messages.V1:Other"), None);
        assert_eq!(type_hint("Firely.Server.Contracts.Messages.V1ExecuteStorePlanCommand"), None);
    }

    #[test]
    fn queue_arguments_keep_integers_as_long_ints() {
        let map = json!({"x-message-ttl": 60000, "x-queue-type": "classic", "x-single-active-consumer": true, "big": 5_000_000_000i64});
        let Value::Object(map) = map else { unreachable!() };
        let table = arguments_table(&map);
        let inner = table.inner();
        assert_eq!(inner.get("x-message-ttl"), Some(&AMQPValue::LongInt(60000)));
        assert_eq!(inner.get("big"), Some(&AMQPValue::LongLongInt(5_000_000_000)));
        assert_eq!(inner.get("x-single-active-consumer"), Some(&AMQPValue::Boolean(true)));
        assert_eq!(amqp_to_json(inner.get("x-queue-type").unwrap_or(&AMQPValue::Void)), json!("classic"));
    }

    #[test]
    fn send_headers_drop_arrays_and_nulls() {
        let headers = vec![
            ("fhir-release".to_owned(), json!("R4")),
            ("MT-Request-AcceptType".to_owned(), json!(["urn:a"])),
            ("n".to_owned(), json!(3)),
            ("none".to_owned(), Value::Null),
        ];
        let table = headers_table(&headers);
        assert_eq!(
            table_to_headers(&table),
            vec![("fhir-release".to_owned(), json!("R4")), ("n".to_owned(), json!(3))]
        );
    }

    #[test]
    fn byte_arrays_read_as_text() {
        let v = AMQPValue::ByteArray(b"hello".to_vec().into());
        assert_eq!(amqp_to_json(&v), json!("hello"));
    }
}
