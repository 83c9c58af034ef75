//! `fhir-pubsub store`, `retrieve` and `listen`: the command line as a client of any
//! Firely-compatible PubSub server, speaking the bridge's wire format through the same envelope
//! and contract code.
//!
//! This module owns the commands' behaviour: reading input ([`input`], [`reference`]), building
//! the plans from the contract types, the request/response exchange over RabbitMQ ([`broker`]),
//! what is printed and the exit status.
//!
//! Invariants:
//! * input is read and checked completely before anything is sent: a bad file or reference sends nothing;
//! * envelopes are built with [`Envelope::request`] and written with [`encode`](crate::envelope::encode);
//!   replies are read with [`decode`](crate::envelope::decode) and the lenient readers of
//!   [`contracts::read`](crate::contracts::read);
//! * stdout carries only results (JSON); diagnostics go to the diagnostic writer (stderr), each a
//!   sentence, and never contain a password;
//! * exit status: 0 success, 1 the server reported a failure (or a reference was not found),
//!   2 usage or input error, 3 timeout or broker error.

mod broker;
pub mod input;
pub mod reference;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::{BrokerType, Settings};
use crate::contracts::read::{retrieve_response, store_response};
use crate::contracts::{
    ExecuteStorePlanCommand, MessageType, Operation, RetrieveInstruction, RetrievePlanCommand, StatusCode,
    StatusDetails, StoreInstruction,
};
use crate::envelope::{Envelope, decode, ids};
use crate::transport::rabbitmq::RabbitMqOptions;
pub use broker::Broker;
pub use input::{InputError, SourceResource, read_resources};
pub use reference::{format_reference, parse_reference};

/// How a client command ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything succeeded.
    Success,
    /// The server reported a failure, or a reference was not found.
    Failed,
    /// The command line, the settings or the input are wrong.
    Usage,
    /// No response in time, or the broker failed.
    Unavailable,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::Unavailable => 3,
        }
    }
}

/// A client command that could not be carried out: the exit status and one sentence saying why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ClientError {
    pub exit: Exit,
    pub message: String,
}

impl ClientError {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        ClientError { exit, message: message.into() }
    }
}

/// The value of the `fhir-release` header when none is given.
pub const DEFAULT_FHIR_RELEASE: &str = "R4";

/// What `store` does.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Files to read; `-` is standard input.
    pub files: Vec<String>,
    pub operation: Operation,
    /// `false`: send without a responseAddress and print the messageId.
    pub wait: bool,
    pub fhir_release: String,
    pub timeout: Duration,
}

/// What `retrieve` does.
#[derive(Debug, Clone)]
pub struct RetrieveOptions {
    /// `Type/id` or `Type/id/_history/vid`.
    pub references: Vec<String>,
    /// One resource per line instead of a JSON array.
    pub ndjson: bool,
    pub fhir_release: String,
    pub timeout: Duration,
}

/// What `listen` does.
#[derive(Debug, Clone, Copy)]
pub struct ListenOptions {
    /// Light events instead of full ones.
    pub light: bool,
    /// Stop after this many events.
    pub count: Option<u64>,
}

/// Loads the settings as `run` does: defaults, the file, then `FHIRPUBSUB_*` variables.
pub fn load_settings(config: Option<&Path>) -> Result<Settings, ClientError> {
    Settings::load(config, std::env::vars()).map_err(|e| ClientError::new(Exit::Usage, format!("settings: {e}")))
}

/// The RabbitMQ connection settings of the bridge; other brokers are refused.
pub fn broker_options(settings: &Settings) -> Result<RabbitMqOptions, ClientError> {
    let broker = &settings.pub_sub.message_broker;
    match broker.broker_type {
        BrokerType::RabbitMq => Ok(RabbitMqOptions::from_settings(broker)),
        other => Err(ClientError::new(
            Exit::Usage,
            format!("PubSub.MessageBroker.BrokerType is {other:?}, but the client speaks only RabbitMq"),
        )),
    }
}

/// `store FILE…`: one ExecuteStorePlanCommand with an instruction per resource.
pub async fn store(
    settings: &Settings,
    options: &StoreOptions,
    out: &mut dyn Write,
    diag: &mut dyn Write,
) -> Result<Exit, ClientError> {
    let mut instructions = Vec::new();
    for file in &options.files {
        for resource in read_file(file)? {
            instructions.push(store_instruction(resource, options.operation)?);
        }
    }
    let count = instructions.len();
    let message = to_raw(&ExecuteStorePlanCommand { instructions })?;
    let rabbit = broker_options(settings)?;
    let broker = Broker::connect(rabbit, "store").await?;
    let headers = release_header(&options.fhir_release);
    if !options.wait {
        let mut envelope = Envelope::request(MessageType::ExecuteStorePlanCommand, message, None, headers);
        envelope.destination_address = Some(broker.address_of(broker.command_exchange(), false));
        let sent = broker.send_command(&envelope, None).await;
        broker.close().await;
        sent?;
        let id = envelope.message_id.map(|id| id.hyphenated().to_string()).unwrap_or_default();
        write_out(out, format!("{id}\n").as_bytes())?;
        return Ok(Exit::Success);
    }
    let response = request(&broker, MessageType::ExecuteStorePlanCommand, message, headers, options.timeout).await;
    broker.close().await;
    let response = response?;
    let Some(message) = response.message.as_deref() else {
        return Ok(say(diag, Exit::Failed, "the server's response holds no message"));
    };
    write_out(out, pretty(message).as_bytes())?;
    if let Some(fault) = fault_text(&response) {
        return Ok(say(diag, Exit::Failed, &format!("the server failed to handle the store plan: {fault}")));
    }
    match store_response(message) {
        Ok(read) => {
            let failed = read.errors.iter().filter(|e| e.status.code != StatusCode::Success).count();
            if failed == 0 {
                Ok(Exit::Success)
            } else {
                let text = format!("the server refused the store plan: {failed} of {count} instructions failed");
                Ok(say(diag, Exit::Failed, &text))
            }
        }
        Err(e) => Ok(say(diag, Exit::Failed, &format!("the server's response is not a store-plan response: {e}"))),
    }
}

/// `retrieve REF…`: one RetrievePlanCommand; prints the resources found.
pub async fn retrieve(
    settings: &Settings,
    options: &RetrieveOptions,
    out: &mut dyn Write,
    diag: &mut dyn Write,
) -> Result<Exit, ClientError> {
    let mut instructions = Vec::new();
    for text in &options.references {
        let reference = parse_reference(text).map_err(|e| ClientError::new(Exit::Usage, e))?;
        instructions.push(RetrieveInstruction { item_id: format_reference(&reference), reference });
    }
    let message = to_raw(&RetrievePlanCommand { instructions: instructions.clone() })?;
    let rabbit = broker_options(settings)?;
    let broker = Broker::connect(rabbit, "retrieve").await?;
    let headers = release_header(&options.fhir_release);
    let response = request(&broker, MessageType::RetrievePlanCommand, message, headers, options.timeout).await;
    broker.close().await;
    let response = response?;
    if let Some(fault) = fault_text(&response) {
        return Ok(say(diag, Exit::Failed, &format!("the server failed to handle the retrieve plan: {fault}")));
    }
    let Some(message) = response.message.as_deref() else {
        return Ok(say(diag, Exit::Failed, "the server's response holds no message"));
    };
    let items = match retrieve_response(message) {
        Ok(read) => read.items,
        Err(e) => {
            return Ok(say(diag, Exit::Failed, &format!("the server's response is not a retrieve-plan response: {e}")));
        }
    };
    let mut found = Vec::new();
    let mut exit = Exit::Success;
    for (position, instruction) in instructions.iter().enumerate() {
        let item = items
            .iter()
            .find(|i| i.item_id.as_deref() == Some(instruction.item_id.as_str()))
            .or_else(|| items.get(position));
        let reference = &instruction.item_id;
        let why = match item {
            None => "the response has no item for it".to_owned(),
            Some(item) if item.status.code == StatusCode::Success => match item.resource.as_deref() {
                Some(text) if serde_json::from_str::<&RawValue>(text).is_ok() => {
                    found.push(text.to_owned());
                    continue;
                }
                Some(_) => "the server returned a resource that is not JSON".to_owned(),
                None => "the server returned no resource".to_owned(),
            },
            Some(item) => {
                let details =
                    item.status.details.map(|d| d.to_string()).unwrap_or_else(|| item.status.code.to_string());
                // Not-found messages only repeat the reference.
                let not_found = matches!(
                    item.status.details,
                    Some(StatusDetails::ResourceNotFound | StatusDetails::MatchingVersionNotFound)
                );
                match item.message.as_deref().filter(|m| !m.trim().is_empty() && !not_found) {
                    Some(message) => format!("{details}: {message}"),
                    None => details,
                }
            }
        };
        exit = say(diag, Exit::Failed, &format!("{reference} was not found ({why})"));
    }
    let text = if options.ndjson {
        found.iter().map(|r| format!("{}\n", one_line(r))).collect::<String>()
    } else if found.is_empty() {
        "[]\n".to_owned()
    } else {
        format!("[\n{}\n]\n", found.join(",\n"))
    };
    write_out(out, text.as_bytes())?;
    Ok(exit)
}

/// `listen`: prints the `message` of every change event as one JSON line until stopped (or
/// `count` events were printed).
pub async fn listen(
    settings: &Settings,
    options: ListenOptions,
    out: &mut dyn Write,
    diag: &mut dyn Write,
) -> Result<Exit, ClientError> {
    let rabbit = broker_options(settings)?;
    let broker = Broker::connect(rabbit, "listen").await?;
    let event =
        if options.light { MessageType::ResourcesChangedLightEvent } else { MessageType::ResourcesChangedEvent };
    let exchange = event.exchange();
    let (mut consumer, channel) = broker.subscribe(&exchange).await?;
    let _ = writeln!(diag, "listening to `{exchange}`");
    let _ = diag.flush();
    let mut printed: u64 = 0;
    let stop = crate::shutdown::signal();
    tokio::pin!(stop);
    let exit = loop {
        if options.count.is_some_and(|n| printed >= n) {
            break Ok(Exit::Success);
        }
        let delivery = tokio::select! {
            _ = &mut stop => break Ok(Exit::Success),
            next = consumer.next() => next,
        };
        let delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => {
                break Err(ClientError::new(Exit::Unavailable, format!("RabbitMQ failed while listening: {e}")));
            }
            None => break Err(ClientError::new(Exit::Unavailable, "the broker connection closed while listening")),
        };
        let meta = crate::transport::rabbitmq::client_connection::meta(&delivery);
        let message = match decode(&delivery.data, &meta) {
            Ok(Envelope { message: Some(message), .. }) => message,
            Ok(_) => {
                let _ = writeln!(diag, "skipped an event without a message");
                continue;
            }
            Err(e) => {
                let _ = writeln!(diag, "skipped an unreadable event: {e}");
                continue;
            }
        };
        let line = format!("{}\n", one_line(message.get()));
        match out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => printed += 1,
            // The reader went away (`listen | head -1`): nothing more to do.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break Ok(Exit::Success),
            Err(e) => break Err(ClientError::new(Exit::Usage, format!("cannot write to standard output: {e}"))),
        }
    };
    drop(channel);
    broker.close().await;
    exit
}

/// Sends a request with a temporary response endpoint and waits for its response.
async fn request(
    broker: &Broker,
    message_type: MessageType,
    message: Box<RawValue>,
    headers: Map<String, Value>,
    timeout: Duration,
) -> Result<Envelope, ClientError> {
    let mut endpoint = broker.response_endpoint().await?;
    let mut envelope = Envelope::request(message_type, message, Some(&endpoint.address), headers);
    envelope.source_address = Some(endpoint.address.clone());
    envelope.destination_address = Some(broker.address_of(broker.command_exchange(), false));
    let deadline = tokio::time::Instant::now() + timeout;
    envelope.expiration_time = chrono::Duration::from_std(timeout).ok().map(|t| ids::truncate_to_ticks(ids::now() + t));
    let request_id = envelope.request_id.unwrap_or_else(ids::new_id);
    envelope.request_id = Some(request_id);
    broker.send_command(&envelope, Some(timeout)).await?;
    endpoint.wait_for(request_id, deadline, timeout, broker.command_exchange()).await
}

fn read_file(file: &str) -> Result<Vec<SourceResource>, ClientError> {
    let (name, bytes) = if file == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
            .map_err(|e| ClientError::new(Exit::Usage, format!("cannot read standard input: {e}")))?;
        ("standard input", bytes)
    } else {
        let bytes =
            std::fs::read(file).map_err(|e| ClientError::new(Exit::Usage, format!("cannot read {file}: {e}")))?;
        (file, bytes)
    };
    let ndjson = Path::new(file).extension().is_some_and(|e| e.eq_ignore_ascii_case("ndjson"));
    read_resources(name, &bytes, ndjson).map_err(|e| ClientError::new(Exit::Usage, e.0))
}

fn store_instruction(resource: SourceResource, operation: Operation) -> Result<StoreInstruction, ClientError> {
    if operation == Operation::Delete && resource.id.is_none() {
        return Err(ClientError::new(
            Exit::Usage,
            format!("{}: the {} has no id, so it cannot be deleted", resource.label, resource.resource_type),
        ));
    }
    Ok(StoreInstruction {
        item_id: resource.label,
        operation,
        resource_type: Some(resource.resource_type),
        resource_id: resource.id,
        resource: (operation != Operation::Delete).then_some(resource.text),
        current_version: None,
    })
}

fn release_header(release: &str) -> Map<String, Value> {
    let mut headers = Map::new();
    headers.insert("fhir-release".to_owned(), Value::String(release.to_owned()));
    headers
}

fn to_raw<T: serde::Serialize>(value: &T) -> Result<Box<RawValue>, ClientError> {
    serde_json::value::to_raw_value(value)
        .map_err(|e| ClientError::new(Exit::Usage, format!("cannot write the plan as JSON: {e}")))
}

/// The first exception message of a `Fault<T>` response, if the response is a fault.
fn fault_text(response: &Envelope) -> Option<String> {
    let is_fault =
        response.message_type.iter().any(|t| t.to_ascii_lowercase().starts_with("urn:message:masstransit:fault"));
    if !is_fault {
        return None;
    }
    let message: Value = response.message.as_deref().and_then(|m| serde_json::from_str(m.get()).ok())?;
    let text = message
        .get("exceptions")
        .and_then(|e| e.get(0))
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .unwrap_or("no reason given");
    Some(text.to_owned())
}

/// Indented JSON with a final newline; the raw text when it cannot be re-read.
fn pretty(message: &RawValue) -> String {
    match serde_json::from_str::<Value>(message.get()).and_then(|v| serde_json::to_string_pretty(&v)) {
        Ok(text) => format!("{text}\n"),
        Err(_) => format!("{}\n", message.get()),
    }
}

/// JSON text on one line: whitespace outside strings removed, everything else byte for byte.
pub fn one_line(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            if c == '"' {
                in_string = true;
            }
            out.push(c);
        }
    }
    out
}

/// `1s`, `1.5s`, `250ms`, `2m`.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis % 60_000 == 0 && millis > 0 {
        format!("{}m", millis / 60_000)
    } else if millis % 1000 == 0 {
        format!("{}s", millis / 1000)
    } else if millis > 1000 {
        format!("{:.1}s", duration.as_secs_f64())
    } else {
        format!("{millis}ms")
    }
}

/// Reads `30`, `30s`, `1.5s`, `500ms` or `2m` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 =
        number.trim().parse().map_err(|_| format!("`{text}` is not a duration such as 30s, 500ms or 2m"))?;
    let seconds = value * scale;
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 86_400.0 {
        return Err(format!("`{text}` must be more than 0 and at most a day"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn write_out(out: &mut dyn Write, bytes: &[u8]) -> Result<(), ClientError> {
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(ClientError::new(Exit::Usage, format!("cannot write to standard output: {e}"))),
    }
}

/// Writes a diagnostic sentence and returns `exit`.
fn say(diag: &mut dyn Write, exit: Exit, text: &str) -> Exit {
    let _ = writeln!(diag, "fhir-pubsub: {text}");
    exit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_keeps_strings_exact() {
        assert_eq!(one_line("{\n  \"a b\": \"x \\\" y\",\n  \"c\": [1, 2]\n}"), "{\"a b\":\"x \\\" y\",\"c\":[1,2]}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err() && parse_duration("soon").is_err() && parse_duration("-1").is_err());
        assert_eq!(format_duration(Duration::from_secs(1)), "1s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
    }

    #[test]
    fn delete_instructions_carry_the_reference_only() {
        let resource = SourceResource {
            label: "p.json".into(),
            resource_type: "Patient".into(),
            id: Some("p1".into()),
            text: "{}".into(),
        };
        let i = store_instruction(resource.clone(), Operation::Delete).unwrap();
        assert_eq!(
            (i.resource_type.as_deref(), i.resource_id.as_deref(), i.resource),
            (Some("Patient"), Some("p1"), None)
        );
        let i = store_instruction(resource.clone(), Operation::Upsert).unwrap();
        assert_eq!(i.resource.as_deref(), Some("{}"));
        let e = store_instruction(SourceResource { id: None, ..resource }, Operation::Delete).unwrap_err();
        assert_eq!(e.exit, Exit::Usage);
    }

    #[test]
    fn exit_codes() {
        assert_eq!([Exit::Success, Exit::Failed, Exit::Usage, Exit::Unavailable].map(Exit::code), [0, 1, 2, 3]);
    }
}
