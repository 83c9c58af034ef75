//! Keeps `contracts/` (the JSON Schema of every message and one example each) in step with the
//! Rust types, and checks that every example reads back through the lenient readers unchanged.
//!
//! `UPDATE_CONTRACTS=1 cargo test --test contracts` rewrites the files after a deliberate change.

use std::path::{Path, PathBuf};

use fhir_pubsub::contracts::read::{self, StorePlanMessage};
use fhir_pubsub::contracts::*;
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::value::RawValue;

fn contracts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contracts")
}

fn pretty<T: Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("contract types serialize");
    text.push('\n');
    text
}

fn schema_of<T: JsonSchema>() -> String {
    pretty(&schemars::schema_for!(T))
}

/// Compares `expected` with the committed file, or rewrites it under `UPDATE_CONTRACTS=1`.
/// Returns a description of the drift, if any.
fn check(relative: &str, expected: &str) -> Option<String> {
    let path = contracts_dir().join(relative);
    if std::env::var_os("UPDATE_CONTRACTS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("create contracts dir");
        std::fs::write(&path, expected).expect("write contract file");
        return None;
    }
    match std::fs::read_to_string(&path) {
        Ok(actual) if actual == expected => None,
        Ok(_) => Some(format!("contracts/{relative} differs from the code")),
        Err(e) => Some(format!("contracts/{relative} cannot be read: {e}")),
    }
}

const PATIENT: &str = r#"{"resourceType":"Patient","id":"example","meta":{"versionId":"2","lastUpdated":"2024-05-01T10:00:00+00:00"},"name":[{"family":"Chalmers","given":["Peter"]}]}"#;
const PATIENT_V1: &str = r#"{"resourceType":"Patient","id":"example","meta":{"versionId":"1","lastUpdated":"2024-04-01T10:00:00+00:00"},"name":[{"family":"Chalmers"}]}"#;

fn reference(resource_type: &str, id: &str, version: Option<&str>) -> ResourceReference {
    ResourceReference { resource_type: resource_type.into(), resource_id: id.into(), version: version.map(Into::into) }
}

fn store_command() -> ExecuteStorePlanCommand {
    ExecuteStorePlanCommand {
        instructions: vec![
            StoreInstruction {
                item_id: "Patient/example".into(),
                operation: Operation::Upsert,
                resource_type: Some("Patient".into()),
                resource_id: Some("example".into()),
                resource: Some(PATIENT.into()),
                current_version: Some("1".into()),
            },
            StoreInstruction {
                item_id: "Observation/obsolete".into(),
                operation: Operation::Delete,
                resource_type: Some("Observation".into()),
                resource_id: Some("obsolete".into()),
                resource: None,
                current_version: None,
            },
        ],
    }
}

fn store_response() -> ExecuteStorePlanResponse {
    ExecuteStorePlanResponse {
        errors: vec![ItemError::new(
            Some("Patient/example".into()),
            StatusDetails::UpdateFailedVersionIdMismatch,
            "Patient/example is at version 3, not at the expected version 1",
        )],
    }
}

fn retrieve_command() -> RetrievePlanCommand {
    RetrievePlanCommand {
        instructions: vec![
            RetrieveInstruction { item_id: "current".into(), reference: reference("Patient", "example", None) },
            RetrieveInstruction { item_id: "seventh".into(), reference: reference("Patient", "example", Some("7")) },
        ],
    }
}

fn retrieve_response() -> RetrievePlanResponse {
    RetrievePlanResponse {
        items: vec![
            RetrieveItem {
                item_id: Some("current".into()),
                resource: Some(PATIENT.into()),
                status: Status::of(StatusDetails::Ok),
                message: Some("Retrieved.".into()),
            },
            RetrieveItem {
                item_id: Some("seventh".into()),
                resource: None,
                status: Status::of(StatusDetails::MatchingVersionNotFound),
                message: Some("Patient/example has no version 7".into()),
            },
        ],
    }
}

fn changes() -> Vec<ResourceChange> {
    vec![
        ResourceChange {
            reference: reference("Patient", "example", Some("1")),
            resource: Some(PATIENT_V1.into()),
            change_type: ChangeType::Create,
        },
        ResourceChange {
            reference: reference("Patient", "example", Some("2")),
            resource: Some(PATIENT.into()),
            change_type: ChangeType::Update,
        },
        ResourceChange {
            reference: reference("Observation", "obsolete", Some("4")),
            resource: None,
            change_type: ChangeType::Delete,
        },
    ]
}

fn claim_check() -> ClaimCheckMessage {
    ClaimCheckMessage {
        payload: ClaimCheckPayload {
            data_ref: "https://account.blob.core.windows.net/firelyserver/0b9f2a4e-1c5d-4f7a-9e8b-3d2c1a0f6e5d.json"
                .into(),
        },
    }
}

fn raw(text: &str) -> Box<RawValue> {
    RawValue::from_string(text.to_owned()).expect("examples are JSON")
}

/// Every message: its name, schema, example and a check that the example reads back.
fn all() -> Vec<(&'static str, String, String)> {
    vec![
        ("ExecuteStorePlanCommand", schema_of::<ExecuteStorePlanCommand>(), pretty(&store_command())),
        ("ExecuteStorePlanResponse", schema_of::<ExecuteStorePlanResponse>(), pretty(&store_response())),
        ("RetrievePlanCommand", schema_of::<RetrievePlanCommand>(), pretty(&retrieve_command())),
        ("RetrievePlanResponse", schema_of::<RetrievePlanResponse>(), pretty(&retrieve_response())),
        (
            "ResourcesChangedEvent",
            schema_of::<ResourcesChangedEvent>(),
            pretty(&ResourcesChangedEvent { changes: changes() }),
        ),
        (
            "ResourcesChangedLightEvent",
            schema_of::<ResourcesChangedLightEvent>(),
            pretty(&ResourcesChangedLightEvent {
                changes: changes().into_iter().map(LightResourceChange::from).collect(),
            }),
        ),
        ("ClaimCheckMessage", schema_of::<ClaimCheckMessage>(), pretty(&claim_check())),
    ]
}

#[test]
fn committed_schemas_and_examples_match_the_code() {
    let mut drift = Vec::new();
    for (name, schema, example) in all() {
        drift.extend(check(&format!("{name}.schema.json"), &schema));
        drift.extend(check(&format!("examples/{name}.json"), &example));
    }
    assert!(
        drift.is_empty(),
        "{}\nrun `UPDATE_CONTRACTS=1 cargo test --test contracts` after a deliberate change",
        drift.join("\n")
    );
}

#[test]
fn every_schema_names_its_message_and_the_wire_case() {
    for (name, schema, _) in all() {
        let schema: serde_json::Value = serde_json::from_str(&schema).unwrap();
        assert_eq!(schema["title"], name, "{name}");
        let properties = schema["properties"].as_object().unwrap_or_else(|| panic!("{name} has properties"));
        for key in properties.keys() {
            assert!(key.starts_with(|c: char| c.is_ascii_lowercase()), "{name}.{key} is written camelCase");
        }
    }
}

#[test]
fn examples_read_back_to_the_same_values() {
    let example = |name: &str| {
        let (_, _, text) = all().into_iter().find(|(n, _, _)| *n == name).expect("known message");
        raw(&text)
    };

    let StorePlanMessage::Instructions(read) = read::store_plan(&example("ExecuteStorePlanCommand")).unwrap() else {
        panic!("a store plan with instructions");
    };
    let sent = store_command().instructions;
    assert_eq!(read.len(), sent.len());
    for (got, want) in read.iter().zip(&sent) {
        assert!(got.problems.is_empty(), "{:?}", got.problems);
        assert_eq!(got.item_id.as_deref(), Some(want.item_id.as_str()));
        assert_eq!(got.operation.as_deref().and_then(Operation::parse), Some(want.operation));
        assert_eq!(got.resource_type, want.resource_type);
        assert_eq!(got.resource_id, want.resource_id);
        assert_eq!(got.resource, want.resource);
        assert_eq!(got.current_version, want.current_version);
    }

    let read = read::retrieve_plan(&example("RetrievePlanCommand")).unwrap();
    let sent = retrieve_command().instructions;
    assert_eq!(read.len(), sent.len());
    for (got, want) in read.iter().zip(&sent) {
        assert!(got.problems.is_empty() && got.has_reference, "{got:?}");
        assert_eq!(got.item_id.as_deref(), Some(want.item_id.as_str()));
        assert_eq!(got.resource_type.as_deref(), Some(want.reference.resource_type.as_str()));
        assert_eq!(got.resource_id.as_deref(), Some(want.reference.resource_id.as_str()));
        assert_eq!(got.version, want.reference.version);
    }

    assert_eq!(read::store_response(&example("ExecuteStorePlanResponse")).unwrap(), store_response());
    assert_eq!(read::retrieve_response(&example("RetrievePlanResponse")).unwrap(), retrieve_response());
    assert_eq!(read::changes(&example("ResourcesChangedEvent")).unwrap(), changes());
    let light: Vec<LightResourceChange> = read::changes(&example("ResourcesChangedLightEvent"))
        .unwrap()
        .into_iter()
        .map(|c| {
            assert_eq!(c.resource, None, "a light event carries no resource");
            LightResourceChange::from(c)
        })
        .collect();
    assert_eq!(light, changes().into_iter().map(LightResourceChange::from).collect::<Vec<_>>());

    match read::store_plan(&example("ClaimCheckMessage")).unwrap() {
        StorePlanMessage::ClaimCheck { data_ref } => assert_eq!(data_ref, claim_check().payload.data_ref),
        other => panic!("expected a claim check, read {other:?}"),
    }
}
