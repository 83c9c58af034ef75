//! The checks behind each fuzz target, shared with the normal test suite (`tests/fuzz_regressions.rs`
//! replays every input kept under `fuzz/regressions/` through them). Each takes arbitrary bytes and
//! panics only when the code under test breaks one of its promises.
#![allow(dead_code)]

use fhir_pubsub::contracts::read::{self, StorePlanMessage};
use fhir_pubsub::envelope::{self, ENVELOPE_CONTENT_TYPE};
use fhir_pubsub::envelope::{Address, TransportKind};
use fhir_pubsub::json;
use fhir_pubsub::plan::{PlanLimits, validate_store_plan};
use fhir_pubsub::transport::TransportMeta;
use std::collections::HashSet;

/// Any bytes, as a body received with one of the content types a broker gives, through the envelope
/// decoder. It must never panic; a body it accepts must survive being written back as a MassTransit
/// envelope and read again with the same ids, types and message bytes.
pub fn envelope_decode(data: &[u8]) {
    // The first byte picks the transport metadata; the rest is the body as received.
    let Some((&selector, body)) = data.split_first() else { return };
    let mut meta = TransportMeta::default();
    match selector % 4 {
        0 => {}
        1 => meta.content_type = Some(ENVELOPE_CONTENT_TYPE.into()),
        2 => meta.content_type = Some("application/json".into()),
        _ => {
            // Raw JSON with MassTransit's Kafka headers, as a Kafka record carries them.
            meta.headers = vec![
                ("MessageId".into(), "3f2504e0-4f89-11d3-9a0c-0305e82c3301".into()),
                (
                    "MT-MessageType".into(),
                    "urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand".into(),
                ),
                ("MT-Response-Address".into(), "kafka://localhost/replies".into()),
            ];
        }
    }
    let _ = json::nesting_exceeds(body, 128);
    let _ = envelope::is_envelope(body);
    let Ok(decoded) = envelope::decode(body, &meta) else { return };
    let written = envelope::encode(&decoded);
    let again = envelope::decode(&written, &TransportMeta::default())
        .unwrap_or_else(|e| panic!("an envelope we wrote cannot be read back: {e}"));
    assert_eq!(again.message_id, decoded.message_id);
    assert_eq!(again.request_id, decoded.request_id);
    assert_eq!(again.response_address, decoded.response_address);
    assert_eq!(again.message_type, decoded.message_type);
    assert_eq!(again.message.as_ref().map(|m| m.get()), decoded.message.as_ref().map(|m| m.get()));
}

/// Any bytes as the `message` of a store or retrieve plan: read leniently, then validated. Neither
/// may panic; a plan the validator accepts must name each resource once, with the type and id its
/// resource says, and keep the resource text as sent.
pub fn plan_validate(data: &[u8]) {
    let Ok(text) = json::utf8(data) else { return };
    if json::nesting_exceeds(data, 128) {
        return; // refused before parsing by the bridge (Limits.MaxJsonDepth)
    }
    let Ok(raw) = json::parse_lenient(text) else { return };
    let _ = read::retrieve_plan(&raw);
    let Ok(StorePlanMessage::Instructions(list)) = read::store_plan(&raw) else { return };
    let sent: Vec<Option<String>> = list.iter().map(|i| i.resource.clone()).collect();
    let Ok(valid) = validate_store_plan(list, &PlanLimits { max_instructions: 64 }) else { return };
    assert!(valid.len() <= 64);
    let mut keys = HashSet::new();
    for instruction in &valid {
        assert!(keys.insert(instruction.key.clone()), "two instructions for {}", instruction.key);
        assert!(!instruction.item_id.trim().is_empty());
        if let Some(version) = &instruction.version {
            assert!(sent.contains(&Some(version.body.clone())), "the resource text was changed");
            // Only the members the key comes from: other members are kept as sent, numbers beyond
            // f64 included (FHIR decimals have no range), so the whole text need not fit a `Value`.
            let head: Head = serde_json::from_str(&version.body).expect("a validated resource names its type and id");
            assert_eq!(head.resource_type, instruction.key.resource_type);
            assert_eq!(head.id, instruction.key.resource_id);
        }
    }
}

#[derive(serde::Deserialize)]
struct Head {
    #[serde(rename = "resourceType")]
    resource_type: String,
    id: String,
}

/// Any text as an endpoint address, for each broker. Parsing must never panic, and an address that
/// parses must print as text that parses back, for its own broker, to the same address (the module's
/// invariant; `kafka:` text given where RabbitMQ is the default prints as `topic:…`, a Kafka short form).
pub fn address_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for kind in [TransportKind::RabbitMq, TransportKind::Kafka, TransportKind::ServiceBus] {
        let Ok(address) = Address::parse(text, kind) else { continue };
        let printed = address.to_string();
        let again = Address::parse(&printed, address.kind())
            .unwrap_or_else(|e| panic!("`{text}` parsed, but its printed form `{printed}` does not: {e}"));
        assert_eq!(again, address, "`{text}` printed as `{printed}` reads back differently");
    }
}
