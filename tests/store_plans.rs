//! Store and retrieve plans against real PostgreSQL and SQLite stores: one suite, run unchanged on both.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fhir_pubsub::bridge::GroupCommit;
use fhir_pubsub::contracts::read::{self, StorePlanMessage};
use fhir_pubsub::contracts::{ChangeType, ExecuteStorePlanResponse, RetrievePlanResponse, StatusCode, StatusDetails};
use fhir_pubsub::plan::{PlanLimits, StoreJob, execute_retrieve_plan, execute_store_plans, validate_store_plan};
use fhir_pubsub::store::{ChangeBatch, Claim, Drained, Lookup, PendingChange, ResourceKey, Store};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

fn raw(v: &Value) -> Box<RawValue> {
    RawValue::from_string(v.to_string()).expect("json")
}

fn job(message: &str, message_id: Option<Uuid>) -> StoreJob {
    let raw = fhir_pubsub::json::parse_lenient(message).expect("lenient json");
    let StorePlanMessage::Instructions(list) = read::store_plan(&raw).expect("a store plan") else {
        panic!("not an inline plan")
    };
    StoreJob { message_id, plan: validate_store_plan(list, &PlanLimits::default()) }
}

async fn store_plan_text(store: &dyn Store, message: &str, message_id: Option<Uuid>) -> ExecuteStorePlanResponse {
    execute_store_plans(store, &[job(message, message_id)]).await.expect("store reachable").remove(0).response
}

async fn store_plan(store: &dyn Store, instructions: Value) -> ExecuteStorePlanResponse {
    store_plan_text(store, &json!({ "instructions": instructions }).to_string(), None).await
}

async fn retrieve(store: &dyn Store, instructions: Value) -> RetrievePlanResponse {
    let list = read::retrieve_plan(&raw(&json!({ "instructions": instructions }))).expect("retrieve plan");
    execute_retrieve_plan(store, list).await.expect("store reachable")
}

/// A Patient as JSON text, the way Firely clients send it.
fn patient(id: &str, version: &str, family: &str) -> String {
    json!({"resourceType": "Patient", "id": id, "meta": {"versionId": version, "lastUpdated": "2024-01-01T00:00:00Z"},
           "name": [{"family": family}]})
    .to_string()
}

fn upsert(item: &str, resource: String) -> Value {
    json!({"itemId": item, "operation": "upsert", "resource": resource})
}

fn assert_applied(response: &ExecuteStorePlanResponse) {
    assert!(response.errors.is_empty(), "expected the plan to be applied, got {response:?}");
}

/// Everything observable about the store's contents: every version, and the outbox.
async fn snapshot(store: &dyn Store) -> (Vec<PendingChange>, Vec<PendingChange>) {
    (store.version_log().await.unwrap(), store.pending_changes(1_000_000).await.unwrap())
}

async fn every_status_detail_and_nothing_stored_on_failure(store: &common::TestStore) {
    // Patient/a at version 2 (version 1 used before); Patient/d created and deleted at version 1.
    assert_applied(&store_plan(&**store, json!([upsert("0", patient("a", "1", "One"))])).await);
    assert_applied(&store_plan(&**store, json!([upsert("0", patient("a", "2", "Two"))])).await);
    assert_applied(&store_plan(&**store, json!([upsert("0", patient("d", "1", "Dee"))])).await);
    assert_applied(
        &store_plan(
            &**store,
            json!([{"itemId": "0", "operation": "delete", "resourceType": "Patient", "resourceId": "d"}]),
        )
        .await,
    );
    let no_id_or_meta = include_str!("data/no-id-or-meta-patient.json");
    let no_version =
        json!({"resourceType": "Patient", "id": "x", "meta": {"lastUpdated": "2024-01-01T00:00:00Z"}}).to_string();
    let no_last_updated = json!({"resourceType": "Patient", "id": "x", "meta": {"versionId": "1"}}).to_string();
    let no_type = json!({"id": "x", "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"}}).to_string();

    // Each case: a good instruction first (which must not be applied), then the offending one.
    let cases: Vec<(&str, Value, StatusCode, StatusDetails)> = vec![
        (
            "missing itemId",
            json!({"operation": "create", "resource": patient("x", "1", "X")}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestMissingItemId,
        ),
        (
            "delete without resourceId",
            json!({"itemId": "bad", "operation": "delete", "resourceType": "Patient"}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestMissingResourceId,
        ),
        (
            "resource without id",
            json!({"itemId": "bad", "operation": "create", "resource": no_id_or_meta}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestPayloadMissingResourceId,
        ),
        (
            "resource without versionId",
            json!({"itemId": "bad", "operation": "upsert", "resource": no_version}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestPayloadMissingVersionId,
        ),
        (
            "resource without lastUpdated",
            json!({"itemId": "bad", "operation": "upsert", "resource": no_last_updated}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestPayloadMissingLastUpdated,
        ),
        (
            "resource without resourceType",
            json!({"itemId": "bad", "operation": "create", "resource": no_type}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestMissingResourceType,
        ),
        (
            "delete without resourceType",
            json!({"itemId": "bad", "operation": "delete", "resourceId": "a"}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestMissingResourceType,
        ),
        (
            "create without resource",
            json!({"itemId": "bad", "operation": "create", "resourceType": "Patient", "resourceId": "x"}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestMissingResourcePayload,
        ),
        (
            "resource \"null\"",
            json!({"itemId": "bad", "operation": "update", "resource": "null"}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestMissingResourcePayload,
        ),
        (
            "resource that is not JSON",
            json!({"itemId": "bad", "operation": "create", "resource": "{\"resourceType\": "}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestWrongPayloadFormat,
        ),
        (
            "resource that is a number",
            json!({"itemId": "bad", "operation": "create", "resource": 42}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestWrongPayloadFormat,
        ),
        (
            "resourceType differs from the resource",
            json!({"itemId": "bad", "operation": "create", "resourceType": "Observation", "resource": patient("x", "1", "X")}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestWrongPayloadFormat,
        ),
        (
            "resourceId differs from the resource",
            json!({"itemId": "bad", "operation": "create", "resourceId": "y", "resource": patient("x", "1", "X")}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestWrongPayloadFormat,
        ),
        (
            "operation of the wrong type",
            json!({"itemId": "bad", "operation": ["create"], "resource": patient("x", "1", "X")}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestWrongPayloadFormat,
        ),
        (
            "second instruction for the same resource",
            json!({"itemId": "bad", "operation": "upsert", "resource": patient("fresh", "9", "Again")}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestWrongPayloadFormat,
        ),
        (
            "unknown operation",
            json!({"itemId": "bad", "operation": "patch", "resource": patient("x", "1", "X")}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestOperationNotSupported,
        ),
        (
            "no operation",
            json!({"itemId": "bad", "resource": patient("x", "1", "X")}),
            StatusCode::BadRequest,
            StatusDetails::BadRequestOperationNotSupported,
        ),
        (
            "create of an existing resource",
            json!({"itemId": "bad", "operation": "create", "resource": patient("a", "3", "Three")}),
            StatusCode::Error,
            StatusDetails::CreationFailedResourceAlreadyExists,
        ),
        (
            "create reusing a deleted version",
            json!({"itemId": "bad", "operation": "create", "resource": patient("d", "1", "Dee")}),
            StatusCode::Error,
            StatusDetails::CreationFailedVersionIdCannotBeReused,
        ),
        (
            "upsert-create reusing a deleted version",
            json!({"itemId": "bad", "operation": "upsert", "resource": patient("d", "1", "Dee again")}),
            StatusCode::Error,
            StatusDetails::CreationFailedVersionIdCannotBeReused,
        ),
        (
            "update of an absent resource",
            json!({"itemId": "bad", "operation": "update", "resource": patient("nobody", "1", "N")}),
            StatusCode::Error,
            StatusDetails::UpdateFailedResourceNotFound,
        ),
        (
            "update of a deleted resource",
            json!({"itemId": "bad", "operation": "update", "resource": patient("d", "2", "D")}),
            StatusCode::Error,
            StatusDetails::UpdateFailedResourceNotFound,
        ),
        (
            "update with a stale currentVersion",
            json!({"itemId": "bad", "operation": "update", "currentVersion": "1", "resource": patient("a", "3", "Three")}),
            StatusCode::Error,
            StatusDetails::UpdateFailedVersionIdMismatch,
        ),
        (
            "upsert with a stale currentVersion",
            json!({"itemId": "bad", "operation": "upsert", "currentVersion": "1", "resource": patient("a", "3", "Three")}),
            StatusCode::Error,
            StatusDetails::UpdateFailedVersionIdMismatch,
        ),
        (
            "update reusing an earlier version",
            json!({"itemId": "bad", "operation": "update", "resource": patient("a", "1", "Changed")}),
            StatusCode::Error,
            StatusDetails::UpdateFailedVersionIdCannotBeReused,
        ),
        (
            "update reusing the current version with new content",
            json!({"itemId": "bad", "operation": "update", "resource": patient("a", "2", "Changed")}),
            StatusCode::Error,
            StatusDetails::UpdateFailedVersionIdCannotBeReused,
        ),
        (
            "delete with a stale currentVersion",
            json!({"itemId": "bad", "operation": "delete", "resourceType": "Patient", "resourceId": "a", "currentVersion": "1"}),
            StatusCode::Error,
            StatusDetails::DeletionFailedVersionIdMismatch,
        ),
    ];
    for (what, bad, code, details) in cases {
        let before = snapshot(&**store).await;
        let response = store_plan(&**store, json!([upsert("good", patient("fresh", "1", "Fresh")), bad.clone()])).await;
        assert_eq!(response.errors.len(), 1, "{what}: exactly the offending instruction is reported: {response:?}");
        let error = &response.errors[0];
        assert_eq!((error.status.code, error.status.details), (code, Some(details)), "{what}: {response:?}");
        let expected_item = bad.get("itemId").and_then(Value::as_str).map(str::to_owned);
        assert_eq!(error.item_id, expected_item, "{what}: the error names the instruction");
        assert!(error.message.as_deref().is_some_and(|m| m.len() > 10), "{what}: a sentence to act on: {error:?}");
        assert_eq!(snapshot(&**store).await, before, "{what}: the failing plan left the store unchanged");
    }

    // Every failing instruction is reported, not only the first.
    let response = store_plan(
        &**store,
        json!([
            {"itemId": "1", "operation": "update", "resource": patient("nobody", "1", "N")},
            upsert("2", patient("fresh2", "1", "OK")),
            {"itemId": "3", "operation": "create", "resource": patient("a", "5", "A")}
        ]),
    )
    .await;
    let reported: Vec<_> =
        response.errors.iter().map(|e| (e.item_id.clone().unwrap(), e.status.details.unwrap())).collect();
    assert_eq!(
        reported,
        vec![
            ("1".to_owned(), StatusDetails::UpdateFailedResourceNotFound),
            ("3".to_owned(), StatusDetails::CreationFailedResourceAlreadyExists)
        ]
    );

    // Retrieve details.
    let items = retrieve(
        &**store,
        json!([
            {"itemId": "cur", "reference": {"resourceType": "Patient", "resourceId": "a"}},
            {"itemId": "old", "reference": {"resourceType": "Patient", "resourceId": "a", "version": "1"}},
            {"itemId": "deleted", "reference": {"resourceType": "Patient", "resourceId": "d"}},
            {"itemId": "deleted-old", "reference": {"resourceType": "Patient", "resourceId": "d", "version": "1"}},
            {"itemId": "no-version", "reference": {"resourceType": "Patient", "resourceId": "a", "version": "77"}},
            {"itemId": "absent", "reference": {"resourceType": "Patient", "resourceId": "nobody"}},
            {"reference": {"resourceType": "Patient", "resourceId": "a"}},
            {"itemId": "no-ref"},
            {"itemId": "half-ref", "reference": {"resourceType": "Patient"}},
        ]),
    )
    .await
    .items;
    let got: Vec<_> = items.iter().map(|i| (i.item_id.as_deref(), i.status.code, i.status.details.unwrap())).collect();
    assert_eq!(
        got,
        vec![
            (Some("cur"), StatusCode::Success, StatusDetails::Ok),
            (Some("old"), StatusCode::Success, StatusDetails::Ok),
            (Some("deleted"), StatusCode::Error, StatusDetails::ResourceNotFound),
            (Some("deleted-old"), StatusCode::Success, StatusDetails::Ok),
            (Some("no-version"), StatusCode::Error, StatusDetails::MatchingVersionNotFound),
            (Some("absent"), StatusCode::Error, StatusDetails::ResourceNotFound),
            (None, StatusCode::BadRequest, StatusDetails::BadRequestMissingItemId),
            (Some("no-ref"), StatusCode::BadRequest, StatusDetails::BadRequestMissingReference),
            (Some("half-ref"), StatusCode::BadRequest, StatusDetails::BadRequestMissingReference),
        ]
    );
    assert_eq!(items[0].resource.as_deref(), Some(patient("a", "2", "Two").as_str()));
    assert_eq!(items[1].resource.as_deref(), Some(patient("a", "1", "One").as_str()));
    assert_eq!(items[3].resource.as_deref(), Some(patient("d", "1", "Dee").as_str()));
    assert!(items[2].resource.is_none() && items[4].resource.is_none());
}
both_stores!(every_status_detail, every_status_detail_and_nothing_stored_on_failure);

async fn success_rules(store: &common::TestStore) {
    // The .NET client sends the new versionId as currentVersion on create: ignored.
    let r = store_plan(
        &**store,
        json!([{"itemId": "0", "operation": "create", "currentVersion": "1", "resource": patient("c", "1", "C")}]),
    )
    .await;
    assert_applied(&r);
    // An upsert that creates ignores currentVersion too; operations are read in any case.
    let r = store_plan(
        &**store,
        json!([{"itemId": "0", "operation": "UPSERT", "currentVersion": "zzz", "resource": patient("u", "1", "U")}]),
    )
    .await;
    assert_applied(&r);
    let log_before = store.version_log().await.unwrap();
    // Upserting or updating the identical resource writes nothing and records no change.
    assert_applied(&store_plan(&**store, json!([upsert("0", patient("u", "1", "U"))])).await);
    let same_but_spaced =
        serde_json::to_string_pretty(&serde_json::from_str::<Value>(&patient("u", "1", "U")).unwrap()).unwrap();
    assert_applied(
        &store_plan(
            &**store,
            json!([{"itemId": "0", "operation": "Update", "currentVersion": "1", "resource": same_but_spaced}]),
        )
        .await,
    );
    // Deleting an absent resource succeeds and changes nothing.
    assert_applied(
        &store_plan(&**store, json!([{"itemId": "0", "operation": "delete", "resourceType": "Patient", "resourceId": "ghost", "currentVersion": "4"}]))
            .await,
    );
    assert_eq!(store.version_log().await.unwrap(), log_before, "no-ops record nothing");

    // A plan's changes are recorded in instruction order, deletes with the version they removed.
    assert_applied(
        &store_plan(
            &**store,
            json!([
                {"itemId": "0", "operation": "update", "currentVersion": "1", "resource": patient("u", "2", "U2")},
                {"itemId": "1", "operation": "delete", "resourceType": "Patient", "resourceId": "c", "currentVersion": "1"},
                upsert("2", patient("n", "1", "N")),
            ]),
        )
        .await,
    );
    let log = store.version_log().await.unwrap();
    let tail: Vec<_> = log[log.len() - 3..]
        .iter()
        .map(|c| (c.key.to_string(), c.version_id.as_str(), c.change_type, c.body.is_some()))
        .collect();
    assert_eq!(
        tail,
        vec![
            ("Patient/u".into(), "2", ChangeType::Update, true),
            ("Patient/c".into(), "1", ChangeType::Delete, false),
            ("Patient/n".into(), "1", ChangeType::Create, true)
        ]
    );
    // After a delete the resource can be created again with a new version.
    assert_applied(
        &store_plan(&**store, json!([{"itemId": "0", "operation": "create", "resource": patient("c", "2", "C2")}]))
            .await,
    );
}
both_stores!(success_rules_hold, success_rules);

async fn resources_are_stored_byte_for_byte(store: &common::TestStore) {
    // As a JSON string (Firely's form), with its own odd spacing and key order.
    let as_text = "{ \"resourceType\":\"Patient\",  \"meta\":{\"versionId\":\"v1\",\"lastUpdated\":\"2023-06-09T08:33:21+02:00\"},\"id\":\"s\", \"name\":[{\"given\":[\"Zoë\"]}] }";
    // As a JSON object inside the message (the sample form), with comments and odd case around it.
    let message = r#"{
        "Instructions": [
            { "ItemId": "0", "Operation": "Upsert", "Resource": {"resourceType" : "Patient", "id":"o",
                "meta": {"versionId": "v1", "lastUpdated": "2023-06-09T08:33:21+02:00"}, "birthDate": "1974-12-25" } }, // an object
            { "itemId": "1", "operation": "create", "resource": "RESOURCE" },
        ]
    }"#
    .replace("\"RESOURCE\"", &serde_json::to_string(as_text).unwrap());
    assert_applied(&store_plan_text(&**store, &message, None).await);
    let found = store
        .read(&[
            Lookup { key: ResourceKey::new("Patient", "o"), version_id: None },
            Lookup { key: ResourceKey::new("Patient", "s"), version_id: Some("v1".into()) },
        ])
        .await
        .unwrap();
    let texts: Vec<_> = found
        .into_iter()
        .map(|f| match f {
            fhir_pubsub::store::Found::Resource(body) => body,
            other => panic!("not found: {other:?}"),
        })
        .collect();
    assert_eq!(
        texts[0],
        r#"{"resourceType" : "Patient", "id":"o",
                "meta": {"versionId": "v1", "lastUpdated": "2023-06-09T08:33:21+02:00"}, "birthDate": "1974-12-25" }"#
    );
    assert_eq!(texts[1], as_text);
}
both_stores!(byte_for_byte, resources_are_stored_byte_for_byte);

async fn the_inbox_makes_a_command_idempotent(store: &common::TestStore) {
    let id = Uuid::new_v4();
    let plan = json!({"instructions": [upsert("0", patient("i", "1", "I"))]}).to_string();
    let first = store_plan_text(&**store, &plan, Some(id)).await;
    assert_applied(&first);
    let log = store.version_log().await.unwrap();
    // The same command again: same response, no second effect, even though the world changed.
    assert_applied(&store_plan(&**store, json!([upsert("0", patient("i", "2", "I2"))])).await);
    let log_after_other = store.version_log().await.unwrap();
    let outcome = execute_store_plans(&**store, &[job(&plan, Some(id))]).await.unwrap().remove(0);
    assert!(outcome.replayed);
    assert_eq!(outcome.response, first);
    assert_eq!(store.version_log().await.unwrap(), log_after_other);
    assert_eq!(log_after_other.len(), log.len() + 1);

    // A failed command is remembered with its failure, and is not retried into success later.
    let failing_id = Uuid::new_v4();
    let failing =
        json!({"instructions": [{"itemId": "0", "operation": "update", "resource": patient("later", "1", "L")}]})
            .to_string();
    let first_failure = store_plan_text(&**store, &failing, Some(failing_id)).await;
    assert_eq!(first_failure.errors[0].status.details, Some(StatusDetails::UpdateFailedResourceNotFound));
    assert_applied(&store_plan(&**store, json!([upsert("0", patient("later", "0", "L0"))])).await);
    assert_eq!(store_plan_text(&**store, &failing, Some(failing_id)).await, first_failure);
    assert_eq!(
        store
            .inbox_response(failing_id)
            .await
            .unwrap()
            .map(|t| serde_json::from_str::<ExecuteStorePlanResponse>(&t).unwrap()),
        Some(first_failure)
    );

    // In one group commit, a command and its duplicate: one effect, the same response twice.
    let dup = Uuid::new_v4();
    let plan = json!({"instructions": [upsert("0", patient("g", "1", "G"))]}).to_string();
    let outcomes = execute_store_plans(&**store, &[job(&plan, Some(dup)), job(&plan, Some(dup))]).await.unwrap();
    assert_eq!(outcomes[0].response, outcomes[1].response);
    assert!(!outcomes[0].replayed && outcomes[1].replayed);
    assert_eq!(outcomes[0].changes + outcomes[1].changes, 1);
}
both_stores!(inbox, the_inbox_makes_a_command_idempotent);

/// Plans whose resources take more than one SQL statement (PostgreSQL sends at most 256 KiB of
/// resources per statement): every change lands, in plan order, and the inbox still answers.
async fn plans_larger_than_a_statement(store: &common::TestStore) {
    let padding = "x".repeat(2000);
    let fresh: Vec<Value> =
        (0..400).map(|i| upsert(&i.to_string(), patient(&format!("big-{i}"), "1", &padding))).collect();
    let id = Uuid::new_v4();
    let plan = json!({ "instructions": fresh }).to_string();
    let first = store_plan_text(&**store, &plan, Some(id)).await;
    assert_applied(&first);
    // Updates of all of them, then new ones: a run of updates and a run of inserts, both long.
    let mut second: Vec<Value> =
        (0..400).map(|i| upsert(&i.to_string(), patient(&format!("big-{i}"), "2", &padding))).collect();
    second.extend((400..600).map(|i| upsert(&i.to_string(), patient(&format!("big-{i}"), "1", &padding))));
    assert_applied(&store_plan(&**store, Value::Array(second)).await);

    let log: Vec<(String, String)> = store
        .version_log()
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.key.resource_id.starts_with("big-"))
        .map(|c| (c.key.resource_id, c.version_id))
        .collect();
    let expected: Vec<(String, String)> = (0..400)
        .map(|i| (format!("big-{i}"), "1".to_owned()))
        .chain((0..400).map(|i| (format!("big-{i}"), "2".to_owned())))
        .chain((400..600).map(|i| (format!("big-{i}"), "1".to_owned())))
        .collect();
    assert_eq!(log, expected, "every change, in plan order");
    let found = store.read(&[Lookup { key: ResourceKey::new("Patient", "big-399"), version_id: None }]).await.unwrap();
    assert!(matches!(&found[0], fhir_pubsub::store::Found::Resource(body) if body.contains("\"versionId\":\"2\"")));

    // The first command again: its answer from the inbox, nothing written.
    let outcome = execute_store_plans(&**store, &[job(&plan, Some(id))]).await.unwrap().remove(0);
    assert!(outcome.replayed);
    assert_eq!(outcome.response, first);
    assert_eq!(
        store.version_log().await.unwrap().iter().filter(|c| c.key.resource_id.starts_with("big-")).count(),
        1000
    );
}
both_stores!(larger_than_a_statement, plans_larger_than_a_statement);

async fn plans_in_one_group_commit_fail_alone(store: &common::TestStore) {
    let good = json!({"instructions": [upsert("0", patient("g1", "1", "G"))]}).to_string();
    let bad = json!({"instructions": [upsert("0", patient("g2", "1", "G")), {"itemId": "1", "operation": "update", "resource": patient("none", "1", "N")}]}).to_string();
    let also_good = json!({"instructions": [upsert("0", patient("g3", "1", "G"))]}).to_string();
    let outcomes =
        execute_store_plans(&**store, &[job(&good, None), job(&bad, None), job(&also_good, None)]).await.unwrap();
    assert!(outcomes[0].response.errors.is_empty() && outcomes[2].response.errors.is_empty());
    assert_eq!(outcomes[1].response.errors[0].status.details, Some(StatusDetails::UpdateFailedResourceNotFound));
    let keys: Vec<String> = store.version_log().await.unwrap().iter().map(|c| c.key.to_string()).collect();
    assert_eq!(keys, vec!["Patient/g1", "Patient/g3"]);
}
both_stores!(group_commit, plans_in_one_group_commit_fail_alone);

/// A group runs as one statement per step; each plan still gets the outcome it would get alone: a
/// command answered before is replayed, an invalid plan and one breaking a rule store nothing, the
/// others are applied with their versions in plan order, and every new answer goes to the inbox.
/// Plans of one group on the same resource (the bridge never groups them, a library caller may) see
/// each other's writes in order.
async fn a_group_gives_each_plan_its_own_outcome(store: &common::TestStore) {
    let answered = Uuid::new_v4();
    let earlier = json!({"instructions": [upsert("0", patient("m0", "1", "M"))]}).to_string();
    assert_applied(&store_plan_text(&**store, &earlier, Some(answered)).await);
    let log_before = store.version_log().await.unwrap().len();

    let two = json!({"instructions": [upsert("0", patient("m2", "1", "M")), upsert("1", patient("m1", "1", "M"))]});
    let invalid = json!({"instructions": [{"itemId": "0", "operation": "upsert"}]});
    let breaks_rule = json!({"instructions": [upsert("0", patient("m3", "1", "M")), {"itemId": "1", "operation": "create", "resource": patient("m0", "7", "M")}]});
    let last = json!({"instructions": [upsert("0", patient("m4", "1", "M"))]});
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let jobs = [
        job(&earlier, Some(answered)),
        job(&two.to_string(), Some(ids[0])),
        job(&invalid.to_string(), Some(ids[1])),
        job(&breaks_rule.to_string(), Some(ids[2])),
        job(&last.to_string(), Some(ids[3])),
    ];
    let outcomes = execute_store_plans(&**store, &jobs).await.unwrap();
    assert!(outcomes[0].replayed && outcomes[0].response.errors.is_empty(), "{:?}", outcomes[0]);
    assert_eq!(outcomes[1].changes, 2);
    assert_applied(&outcomes[1].response);
    assert_eq!(outcomes[2].response.errors[0].status.details, Some(StatusDetails::BadRequestMissingResourcePayload));
    assert_eq!(outcomes[3].response.errors.len(), 1, "{:?}", outcomes[3]);
    assert_eq!(outcomes[3].response.errors[0].status.details, Some(StatusDetails::CreationFailedResourceAlreadyExists));
    assert_eq!(outcomes[3].changes, 0);
    assert_eq!(outcomes[4].changes, 1);
    let written: Vec<String> =
        store.version_log().await.unwrap()[log_before..].iter().map(|c| c.key.to_string()).collect();
    assert_eq!(written, vec!["Patient/m2", "Patient/m1", "Patient/m4"]);
    for (id, outcome) in ids.iter().zip(&outcomes[1..]) {
        let stored = store.inbox_response(*id).await.unwrap().expect("answer in the inbox");
        assert_eq!(serde_json::from_str::<ExecuteStorePlanResponse>(&stored).unwrap(), outcome.response);
    }

    let create = json!({"instructions": [upsert("0", patient("same", "1", "S"))]}).to_string();
    let update = json!({"instructions": [upsert("0", patient("same", "2", "S2"))]}).to_string();
    let outcomes = execute_store_plans(&**store, &[job(&create, None), job(&update, None)]).await.unwrap();
    assert!(outcomes.iter().all(|o| o.response.errors.is_empty() && o.changes == 1), "{outcomes:?}");
    let versions: Vec<(String, ChangeType)> = store
        .version_log()
        .await
        .unwrap()
        .iter()
        .filter(|c| c.key.resource_id == "same")
        .map(|c| (c.version_id.clone(), c.change_type))
        .collect();
    assert_eq!(versions, vec![("1".to_owned(), ChangeType::Create), ("2".to_owned(), ChangeType::Update)]);
}
both_stores!(group_outcomes, a_group_gives_each_plan_its_own_outcome);

/// The bridge's group commit: 40 commands at once share transactions,
/// and each still gets its own outcome: the 30 good plans are applied, the 10 that update a missing
/// resource get UpdateFailedResourceNotFound and store nothing, a repeated messageId is answered from
/// the inbox.
async fn grouped_commands_keep_their_own_outcomes(store: &common::TestStore) {
    let store: Arc<dyn Store> = store.store.clone();
    let group = GroupCommit::new(store.clone());
    let repeated = Uuid::new_v4();
    let mut tasks = Vec::new();
    for n in 0..40 {
        let group = group.clone();
        tasks.push(tokio::spawn(async move {
            let plan = if n % 4 == 3 {
                json!({"instructions": [{"itemId": "0", "operation": "update", "resource": patient(&format!("missing{n}"), "1", "M")}]})
            } else {
                json!({"instructions": [upsert("0", patient(&format!("p{n}"), "1", "P"))]})
            };
            let id = if n == 0 { repeated } else { Uuid::new_v4() };
            (n, group.execute(job(&plan.to_string(), Some(id))).await.expect("store reachable"))
        }));
    }
    for task in tasks {
        let (n, outcome) = task.await.unwrap();
        if n % 4 == 3 {
            assert_eq!(outcome.response.errors.len(), 1, "plan {n}: {outcome:?}");
            assert_eq!(outcome.response.errors[0].status.details, Some(StatusDetails::UpdateFailedResourceNotFound));
        } else {
            assert_applied(&outcome.response);
            assert_eq!(outcome.changes, 1, "plan {n}");
        }
    }
    assert!(group.groups() < 40, "no group formed: {} transactions for 40 plans", group.groups());
    let keys: HashSet<String> = store.version_log().await.unwrap().iter().map(|c| c.key.to_string()).collect();
    let expected: HashSet<String> = (0..40).filter(|n| n % 4 != 3).map(|n| format!("Patient/p{n}")).collect();
    assert_eq!(keys, expected);
    let plan = json!({"instructions": [upsert("0", patient("p0", "1", "P"))]}).to_string();
    let again = group.execute(job(&plan, Some(repeated))).await.unwrap();
    assert!(again.replayed && again.changes == 0, "{again:?}");
}
both_stores!(bridge_group_commit, grouped_commands_keep_their_own_outcomes);

async fn a_foreign_sql_write_is_recorded(store: &common::TestStore) {
    let body = patient("f", "1", "Foreign");
    let sql = "INSERT INTO resources (resource_type, resource_id, version_id, last_updated, body) VALUES ('Patient', 'f', '1', '2024-01-01T00:00:00Z', $1)";
    let delete = "DELETE FROM resources WHERE resource_type = 'Patient' AND resource_id = 'f'";
    if store.url.starts_with("sqlite") {
        let pool = sqlx::SqlitePool::connect(&store.url).await.unwrap();
        sqlx::query(sql).bind(&body).execute(&pool).await.unwrap();
        sqlx::query(delete).execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(&store.url).await.unwrap();
        sqlx::query(sql).bind(&body).execute(&pool).await.unwrap();
        sqlx::query(delete).execute(&pool).await.unwrap();
        pool.close().await;
    }
    let pending: Vec<_> =
        store.pending_changes(10).await.unwrap().into_iter().map(|c| (c.change_type, c.version_id, c.body)).collect();
    assert_eq!(pending, vec![(ChangeType::Create, "1".into(), Some(body)), (ChangeType::Delete, "1".into(), None)]);
}
both_stores!(foreign_writes, a_foreign_sql_write_is_recorded);

/// The publisher claims the next batches while it still publishes the ones before: a claim cuts new
/// batches only from rows no batch holds, completes the confirmed ones in the same transaction, and
/// after a crash (a claim holding nothing) every open batch comes back unchanged, in order.
async fn claims_while_publishing(store: &common::TestStore) {
    let store = store.store.as_ref();
    for id in ["a", "b", "c"] {
        assert_applied(&store_plan(store, json!([upsert("1", patient(id, "1", "Claim"))])).await);
    }
    let ids = |batches: &[ChangeBatch]| -> Vec<Vec<String>> {
        batches.iter().map(|b| b.changes.iter().map(|c| c.key.resource_id.clone()).collect()).collect()
    };
    let first = store.claim_batches(Claim::fresh(1, 1)).await.unwrap();
    assert_eq!(ids(&first), [["a"]]);
    let in_hand = |b: &[ChangeBatch]| b.last().map(|b| b.id);
    let second = store
        .claim_batches(Claim {
            completed: &[],
            publishing_through: in_hand(&first),
            batch_size: 1,
            max_batches: 1,
            bodies: true,
        })
        .await
        .unwrap();
    assert_eq!(ids(&second), [["b"]], "the row held by the first batch is not cut again");
    let third = store
        .claim_batches(Claim {
            completed: &first,
            publishing_through: in_hand(&second),
            batch_size: 1,
            max_batches: 1,
            bodies: true,
        })
        .await
        .unwrap();
    assert_eq!(ids(&third), [["c"]]);
    let waiting: Vec<String> =
        store.pending_changes(10).await.unwrap().into_iter().map(|c| c.key.resource_id).collect();
    assert_eq!(waiting, ["b", "c"], "the first batch was completed by the third claim");

    // A restart: the open batches come back as they were cut, whatever the new claim's size.
    let after_restart = store.claim_batches(Claim::fresh(50, 5)).await.unwrap();
    assert_eq!(after_restart, [second[0].clone(), third[0].clone()]);
    let done = store
        .claim_batches(Claim {
            completed: &after_restart,
            publishing_through: in_hand(&after_restart),
            batch_size: 50,
            max_batches: 5,
            bodies: true,
        })
        .await
        .unwrap();
    assert!(done.is_empty());
    assert!(store.pending_changes(10).await.unwrap().is_empty());
    assert!(store.claim_batches(Claim::fresh(50, 5)).await.unwrap().is_empty(), "no batch is left open");
}
both_stores!(claim_pipeline, claims_while_publishing);

/// Light events need no bodies: a claim without them cuts the same batches, each change with its
/// resource, version and kind but no body; the same open batches claimed again with the bodies (a
/// restart with full events turned on) carry them, as the outbox recorded them.
async fn claims_without_bodies(store: &common::TestStore) {
    let store = store.store.as_ref();
    assert_applied(
        &store_plan(store, json!([upsert("1", patient("a", "1", "Light")), upsert("2", patient("b", "1", "Light"))]))
            .await,
    );
    assert_applied(&store_plan(store, json!([upsert("1", patient("a", "2", "Lighter"))])).await);
    assert_applied(
        &store_plan(
            store,
            json!([{"itemId": "1", "operation": "delete", "resourceType": "Patient", "resourceId": "b", "currentVersion": "1"}]),
        )
        .await,
    );
    let recorded = store.pending_changes(10).await.unwrap();
    assert_eq!(recorded.len(), 4);

    let light = store
        .claim_batches(Claim { completed: &[], publishing_through: None, batch_size: 3, max_batches: 2, bodies: false })
        .await
        .unwrap();
    let changes: Vec<&PendingChange> = light.iter().flat_map(|b| b.changes.iter()).collect();
    assert_eq!(light.iter().map(|b| b.changes.len()).collect::<Vec<_>>(), [3, 1]);
    assert!(changes.iter().all(|c| c.body.is_none()), "no change carries its body: {changes:?}");
    let without_body = |c: &PendingChange| PendingChange { body: None, ..c.clone() };
    assert_eq!(changes.into_iter().cloned().collect::<Vec<_>>(), recorded.iter().map(without_body).collect::<Vec<_>>());

    let full = store.claim_batches(Claim::fresh(3, 2)).await.unwrap();
    assert_eq!(full.iter().map(|b| b.id).collect::<Vec<_>>(), light.iter().map(|b| b.id).collect::<Vec<_>>());
    assert_eq!(full.into_iter().flat_map(|b| b.changes).collect::<Vec<_>>(), recorded, "the bodies, as recorded");
}
both_stores!(claim_bodies, claims_without_bodies);

/// With events off the publisher drains the outbox instead of claiming it: oldest rows first, at
/// most the limit asked, open batches dropped with them; the versions stay in the log, and a
/// change recorded afterwards waits in the outbox as usual.
async fn draining_the_outbox(store: &common::TestStore) {
    let store = store.store.as_ref();
    for id in ["a", "b", "c"] {
        assert_applied(&store_plan(store, json!([upsert("1", patient(id, "1", "Drain"))])).await);
    }
    let recorded = store.pending_changes(10).await.unwrap();
    let open = store.claim_batches(Claim::fresh(1, 1)).await.unwrap();
    assert_eq!(open.len(), 1, "a batch left open by an earlier publisher");

    let first = store.drain_changes(2).await.unwrap();
    assert_eq!(first, Drained { changes: 2, last_seq: Some(recorded[1].seq) });
    let waiting: Vec<String> =
        store.pending_changes(10).await.unwrap().into_iter().map(|c| c.key.resource_id).collect();
    assert_eq!(waiting, ["c"], "the two oldest rows went first");
    assert_eq!(store.drain_changes(10).await.unwrap(), Drained { changes: 1, last_seq: Some(recorded[2].seq) });
    assert_eq!(store.drain_changes(10).await.unwrap(), Drained::default(), "an empty outbox drains nothing");
    assert!(store.claim_batches(Claim::fresh(50, 5)).await.unwrap().is_empty(), "no batch is left open");
    assert_eq!(store.version_log().await.unwrap(), recorded, "the versions stay in the log");

    assert_applied(&store_plan(store, json!([upsert("1", patient("d", "1", "Drain"))])).await);
    let later: Vec<String> = store.pending_changes(10).await.unwrap().into_iter().map(|c| c.key.resource_id).collect();
    assert_eq!(later, ["d"]);
}
both_stores!(drain_outbox, draining_the_outbox);

/// What a writer knows it committed: (resource, version, change, the version it replaced).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Committed {
    key: String,
    version: String,
    change: ChangeType,
    /// For update/delete: the currentVersion the instruction named, so the change must follow it.
    after: Option<String>,
}

/// 8 writers on 12 overlapping resources for several seconds, with optimistic-concurrency conflicts and
/// plans designed to fail, while a reader drains the outbox as the publisher will. Afterwards the drained
/// changes are exactly the committed ones, each once, per resource in version order, each plan's
/// changes together and in instruction order.
async fn concurrent_writers_and_a_reader(store: &common::TestStore) {
    const WRITERS: usize = 8;
    const RESOURCES: usize = 12;
    let run_for = Duration::from_secs(4);
    let store: Arc<dyn Store> = store.store.clone();
    let writing = Arc::new(AtomicBool::new(true));

    let reader = {
        let (store, writing) = (store.clone(), writing.clone());
        tokio::spawn(async move {
            // As the publisher does: each claim completes the batches "published" in the round before
            // and cuts new ones beyond those still in hand.
            let mut drained: Vec<PendingChange> = Vec::new();
            let mut confirmed = Vec::new();
            let mut in_hand: Vec<ChangeBatch> = Vec::new();
            loop {
                let still_writing = writing.load(Ordering::SeqCst);
                let claim = Claim {
                    completed: &confirmed,
                    publishing_through: in_hand.last().map(|b| b.id),
                    batch_size: 50,
                    max_batches: 2,
                    bodies: true,
                };
                let batches = store.claim_batches(claim).await.unwrap();
                assert!(batches.iter().all(|b| !b.changes.is_empty() && b.changes.len() <= 50));
                assert!(batches.iter().all(|b| in_hand.last().is_none_or(|h| b.id > h.id)));
                drained.extend(in_hand.iter().flat_map(|b| b.changes.iter().cloned()));
                confirmed = std::mem::replace(&mut in_hand, batches);
                if in_hand.is_empty() && confirmed.is_empty() {
                    if !still_writing {
                        return drained;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
    };

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut committed_plans: Vec<Vec<Committed>> = Vec::new();
            let mut failed_versions: Vec<String> = Vec::new();
            let (mut conflicts, mut n) = (0usize, 0usize);
            let started = Instant::now();
            let mut rng = (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = move |m: usize| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng % m as u64) as usize
            };
            while started.elapsed() < run_for {
                n += 1;
                let size = 1 + next(3);
                let mut ids: Vec<usize> = (0..size).map(|_| next(RESOURCES)).collect();
                ids.sort_unstable();
                ids.dedup();
                let lookups: Vec<Lookup> =
                    ids.iter().map(|i| Lookup { key: ResourceKey::new("Patient", format!("r{i}")), version_id: None }).collect();
                let current = store.read(&lookups).await.unwrap();
                let mut instructions = Vec::new();
                let mut expect = Vec::new();
                for (i, found) in ids.iter().zip(current) {
                    let id = format!("r{i}");
                    let version = format!("w{w}-{n}-{i}");
                    let current_version = match &found {
                        fhir_pubsub::store::Found::Resource(body) => Some(
                            serde_json::from_str::<Value>(body).unwrap()["meta"]["versionId"].as_str().unwrap().to_owned(),
                        ),
                        _ => None,
                    };
                    let item = format!("{}", instructions.len());
                    match current_version {
                        None => {
                            instructions.push(json!({"itemId": item, "operation": "create", "resource": patient(&id, &version, "C")}));
                            expect.push(Committed { key: format!("Patient/{id}"), version, change: ChangeType::Create, after: None });
                        }
                        Some(cur) if next(4) == 0 => {
                            instructions.push(json!({"itemId": item, "operation": "delete", "resourceType": "Patient", "resourceId": id, "currentVersion": cur}));
                            expect.push(Committed { key: format!("Patient/{id}"), version: cur.clone(), change: ChangeType::Delete, after: Some(cur) });
                        }
                        Some(cur) => {
                            instructions.push(json!({"itemId": item, "operation": "update", "currentVersion": cur, "resource": patient(&id, &version, "U")}));
                            expect.push(Committed { key: format!("Patient/{id}"), version, change: ChangeType::Update, after: Some(cur) });
                        }
                    }
                }
                let designed_to_fail = next(10) == 0;
                if designed_to_fail {
                    instructions.push(json!({"itemId": "doomed", "operation": "update", "resource": patient("never-there", "1", "X")}));
                }
                let plan = json!({"instructions": instructions}).to_string();
                let response = execute_store_plans(store.as_ref(), &[job(&plan, Some(Uuid::new_v4()))]).await.unwrap().remove(0).response;
                if response.errors.is_empty() {
                    assert!(!designed_to_fail);
                    committed_plans.push(expect);
                } else {
                    let designed = response.errors.iter().any(|e| e.item_id.as_deref() == Some("doomed"));
                    assert!(designed || response.errors.iter().all(|e| e.status.code == StatusCode::Error), "{response:?}");
                    conflicts += usize::from(!designed);
                    failed_versions.extend(expect.into_iter().filter(|c| c.change != ChangeType::Delete).map(|c| c.version));
                }
            }
            (committed_plans, failed_versions, conflicts)
        }));
    }
    let mut committed_plans = Vec::new();
    let mut failed_versions = HashSet::new();
    let mut conflicts = 0;
    for w in writers {
        let (plans, failed, c) = w.await.unwrap();
        committed_plans.extend(plans);
        failed_versions.extend(failed);
        conflicts += c;
    }
    writing.store(false, Ordering::SeqCst);
    let drained = reader.await.unwrap();

    let committed: usize = committed_plans.iter().map(Vec::len).sum();
    assert!(
        committed_plans.len() > 50,
        "the writers committed too little to prove anything: {}",
        committed_plans.len()
    );
    assert!(conflicts > 0, "the test must produce optimistic-concurrency conflicts");
    assert!(!failed_versions.is_empty(), "the test must produce rolled-back plans");

    // Exactly the committed changes, each once.
    let as_committed = |c: &PendingChange| (c.key.to_string(), c.version_id.clone(), c.change_type);
    let drained_set: HashSet<_> = drained.iter().map(as_committed).collect();
    assert_eq!(drained_set.len(), drained.len(), "a change was drained twice");
    let expected_set: HashSet<_> =
        committed_plans.iter().flatten().map(|c| (c.key.clone(), c.version.clone(), c.change)).collect();
    // A delete that found the resource already gone succeeds as a no-op and records nothing, so the
    // writers' expectations may hold deletes that never became changes; every other change must match.
    let log_list = store.version_log().await.unwrap();
    let log: HashSet<_> = log_list.iter().map(as_committed).collect();
    assert_eq!(log.len(), log_list.len());
    let missing: Vec<_> = log.difference(&drained_set).collect();
    let unexpected: Vec<_> = drained_set.difference(&log).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "logged but never drained: {missing:?}; drained but not logged: {unexpected:?}"
    );
    let not_logged: Vec<_> = expected_set.difference(&log).collect();
    assert!(not_logged.iter().all(|c| c.2 == ChangeType::Delete), "committed but not logged: {not_logged:?}");
    let never_committed: Vec<_> = log.difference(&expected_set).collect();
    assert!(never_committed.is_empty(), "logged but never committed: {never_committed:?}");
    assert!(drained.iter().all(|c| c.change_type == ChangeType::Delete || !failed_versions.contains(&c.version_id)));

    // Per resource, in drained order, each change follows the version it named.
    let after: HashMap<(String, String, ChangeType), Option<String>> = committed_plans
        .iter()
        .flatten()
        .map(|c| ((c.key.clone(), c.version.clone(), c.change), c.after.clone()))
        .collect();
    let mut live: HashMap<String, Option<String>> = HashMap::new();
    for c in &drained {
        let key = as_committed(c);
        let state = live.entry(key.0.clone()).or_default();
        match c.change_type {
            ChangeType::Create => assert!(state.is_none(), "{key:?} created while {state:?} was live"),
            _ => assert_eq!(state, &after[&key], "{key:?} out of order"),
        }
        *state = (c.change_type != ChangeType::Delete).then(|| c.version_id.clone());
    }

    // Each plan's changes are contiguous and in instruction order. A delete of a version that two plans
    // both deleted was a no-op in one of them (deleting an absent resource succeeds), so such deletes
    // are left out of this check.
    let position: HashMap<_, usize> = drained.iter().enumerate().map(|(i, c)| (as_committed(c), i)).collect();
    let mut claims: HashMap<(String, String, ChangeType), usize> = HashMap::new();
    for c in committed_plans.iter().flatten() {
        *claims.entry((c.key.clone(), c.version.clone(), c.change)).or_default() += 1;
    }
    for plan in &committed_plans {
        let at: Vec<usize> = plan
            .iter()
            .map(|c| (c.key.clone(), c.version.clone(), c.change))
            .filter(|k| claims[k] == 1)
            // A delete that was a no-op recorded nothing.
            .filter_map(|k| position.get(&k).copied())
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "a plan's changes were reordered: {at:?}");
        let own: HashSet<_> = plan.iter().map(|c| (c.key.clone(), c.version.clone(), c.change)).collect();
        if let (Some(first), Some(last)) = (at.first(), at.last()) {
            for c in &drained[*first..=*last] {
                assert!(own.contains(&as_committed(c)), "another plan's change {c:?} came between a plan's changes");
            }
        }
    }
    eprintln!(
        "{} plans committed ({committed} changes), {conflicts} conflicts, {} versions rolled back",
        committed_plans.len(),
        failed_versions.len()
    );
}
both_stores!(concurrent_change_log, concurrent_writers_and_a_reader);

/// Data PostgreSQL refuses (a NUL character in meta.lastUpdated, which its text cannot hold) fails only its own
/// plan, alone or in a group: the reply says the database refused it, nothing of it is stored, the
/// refusal is in the inbox, and the other plans of the group are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_refused_data_fails_its_plan_alone_or_in_a_group() {
    let store = common::TestStore::new(common::Kind::Postgres).await;
    let refused = json!({"resourceType": "Patient", "id": "nul", "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z\u{0}"}})
    .to_string();
    let refused_plan = json!({"instructions": [upsert("0", refused)]}).to_string();
    let refused_id = Uuid::new_v4();
    let alone = execute_store_plans(&*store, &[job(&refused_plan, Some(refused_id))]).await.unwrap().remove(0);
    assert_eq!(alone.response.errors.len(), 1, "{alone:?}");
    assert_eq!(alone.response.errors[0].status.details, Some(StatusDetails::BadRequestWrongPayloadFormat));
    assert!(alone.response.errors[0].message.as_deref().unwrap_or("").contains("refused"), "{alone:?}");
    assert_eq!(alone.changes, 0);
    let replay = execute_store_plans(&*store, &[job(&refused_plan, Some(refused_id))]).await.unwrap().remove(0);
    assert!(replay.replayed && replay.response == alone.response, "{replay:?}");

    let good = json!({"instructions": [upsert("0", patient("fine", "1", "F"))]}).to_string();
    let grouped = execute_store_plans(&*store, &[job(&good, None), job(&refused_plan, None)]).await.unwrap();
    assert_applied(&grouped[0].response);
    assert_eq!(grouped[1].response.errors[0].status.details, Some(StatusDetails::BadRequestWrongPayloadFormat));
    let keys: Vec<String> = store.version_log().await.unwrap().iter().map(|c| c.key.to_string()).collect();
    assert_eq!(keys, vec!["Patient/fine"]);
}
