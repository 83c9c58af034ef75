//! The bridge end to end over Kafka, against a real Kafka-API broker (tansu, started per test on a
//! free loopback port): Firely client flows with raw JSON and header ids, bad input and the error
//! topic, offsets stored only after the effect, missing topics, a third-party Python client, and a
//! broker restart in the middle of a stream of commands.
//!
//! tansu keeps its data in memory, except in the restart test, where it keeps it in an SQLite file
//! so that the crashed broker comes back with its topics, records, committed offsets and producer
//! state. tansu has no transactions (no EndTxn), which the bridge does not use.
#![cfg(feature = "kafka")]

mod common;
mod kafka_support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fhir_pubsub::bridge::{Bridge, BridgeOptions};
use fhir_pubsub::config::ResourceChangeNotificationSettings;
use fhir_pubsub::publisher::Publisher;
use fhir_pubsub::transport::kafka::{KafkaOptions, KafkaTransport};
use fhir_pubsub::transport::{Transport, TransportError};
use kafka_support::{Collector, Tansu, produce};
use rdkafka::producer::FutureProducer;
use serde_json::{Value, json};
use tokio::sync::watch;
use uuid::Uuid;

const STORE_RESPONSE: &str = "urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanResponse";
const RETRIEVE_RESPONSE: &str = "urn:message:Firely.Server.Contracts.Messages.V1:RetrievePlanResponse";
const STORE_URN: &str = "urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand";

/// The topics of one test.
#[derive(Clone)]
struct Topics {
    prefix: String,
    store: String,
    retrieve: String,
    errors: String,
    replies: String,
    full: String,
    light: String,
}

impl Topics {
    fn new() -> Topics {
        let prefix = format!("t{}", Uuid::new_v4().simple());
        Topics {
            store: format!("{prefix}.ExecuteStorePlanCommand"),
            retrieve: format!("{prefix}.RetrievePlanCommand"),
            errors: format!("{prefix}.ExecuteStorePlanCommand.Errors"),
            replies: format!("{prefix}.replies"),
            full: format!("{prefix}.ResourcesChangedEvent"),
            light: format!("{prefix}.ResourcesChangedLightEvent"),
            prefix,
        }
    }

    fn all(&self) -> Vec<&str> {
        vec![&self.store, &self.retrieve, &self.errors, &self.replies, &self.full, &self.light]
    }

    fn options(&self, tansu: &Tansu) -> KafkaOptions {
        KafkaOptions {
            bootstrap_servers: tansu.bootstrap(),
            topic_prefix: self.prefix.clone(),
            group_id: format!("{}-bridge", self.prefix),
            client_id: "fhir-pubsub-test".into(),
            error_topic: self.errors.clone(),
            full_event_topic: self.full.clone(),
            light_event_topic: self.light.clone(),
            full_events: true,
            light_events: true,
            retry_delay: Duration::from_millis(200),
            ..KafkaOptions::default()
        }
    }
}

/// A bridge (and its change publisher) on its own store and topics, and a client's view of them.
struct Running {
    topics: Topics,
    store: common::TestStore,
    transport: Arc<KafkaTransport>,
    producer: FutureProducer,
    collector: Collector,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn start_bridge(
    tansu: &Tansu,
    topics: Topics,
    store: common::TestStore,
    options: KafkaOptions,
    bridge_options: BridgeOptions,
) -> Running {
    let transport = Arc::new(KafkaTransport::connect(options).await.expect("the bridge connects to Kafka"));
    let dyn_transport: Arc<dyn Transport> = transport.clone();
    let events = ResourceChangeNotificationSettings {
        send_full_events: true,
        send_light_events: true,
        ..ResourceChangeNotificationSettings::default()
    };
    let publisher = Arc::new(Publisher::new(store.store.clone(), dyn_transport.clone(), events));
    let bridge =
        Arc::new(Bridge::new(store.store.clone(), dyn_transport, bridge_options).with_changes_waker(publisher.waker()));
    let (stop, stopped) = watch::channel(false);
    let publisher_stopped = stopped.clone();
    let tasks = vec![
        tokio::spawn(async move { bridge.run(stopped).await.expect("bridge runs") }),
        tokio::spawn(async move { publisher.run(publisher_stopped).await }),
    ];
    let collector = Collector::start(tansu, &[&topics.replies, &topics.errors, &topics.full, &topics.light]).await;
    Running { topics, store, transport, producer: tansu.producer(), collector, stop, tasks }
}

async fn start(tansu: &Tansu, kind: common::Kind) -> Running {
    let topics = Topics::new();
    tansu.create_topics(&topics.all(), 1).await;
    let options = topics.options(tansu);
    let store = common::TestStore::new(kind).await;
    start_bridge(tansu, topics, store, options, BridgeOptions::default()).await
}

impl Running {
    fn reply_address(&self) -> String {
        format!("kafka://{}/{}?type=topic", "kafka-broker:9092", self.topics.replies)
    }

    /// Sends a raw body to a command topic with the given headers.
    async fn send(&self, topic: &str, body: &[u8], headers: &[(&str, &str)]) {
        produce(&self.producer, topic, None, body, headers).await;
    }

    /// Sends a store plan as raw JSON with Firely's headers; returns its RequestId.
    async fn store_plan(&self, instructions: Value) -> String {
        let request_id = Uuid::new_v4().to_string();
        let body = json!({"instructions": instructions}).to_string();
        let message_id = Uuid::new_v4().to_string();
        let address = self.reply_address();
        let headers = [
            ("MessageId", message_id.as_str()),
            ("RequestId", request_id.as_str()),
            ("fhir-release", "R4"),
            ("ResponseAddress", address.as_str()),
        ];
        self.send(&self.topics.store, body.as_bytes(), &headers).await;
        request_id
    }

    /// The reply whose RequestId header is `request_id`, waiting up to 120 s (a bound for a slow,
    /// shared machine, not a speed requirement).
    async fn reply_to(&self, request_id: &str) -> kafka_support::Record {
        for _ in 0..2400 {
            if let Some(r) = self
                .collector
                .records(&self.topics.replies)
                .into_iter()
                .find(|r| r.header("RequestId") == Some(request_id))
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let replies = self.collector.records(&self.topics.replies).len();
        let errors = self.collector.records(&self.topics.errors).len();
        panic!("no reply to {request_id} ({replies} replies and {errors} error records so far)");
    }

    async fn stop(self) -> common::TestStore {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
        }
        self.transport.close().await;
        self.store
    }
}

fn patient(id: &str, version: &str) -> String {
    json!({"resourceType": "Patient", "id": id, "meta": {"versionId": version, "lastUpdated": "2024-01-01T00:00:00Z"}})
        .to_string()
}

fn upsert(id: &str, version: &str) -> Value {
    json!([{"itemId": "0", "operation": "upsert", "resource": patient(id, version)}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn firely_flows_raw_json_with_header_ids_envelopes_and_retrieve() {
    let tansu = Tansu::start().await;
    let run = start(&tansu, common::Kind::Postgres).await;
    let patient_file = include_str!("data/fixtures/firely-sample/resources/example-patient.json");
    let address = run.reply_address();

    // Firely's documented headers, the response address under `responseAddress` (any case is accepted).
    let (message_id, conversation_id, request_id) =
        (Uuid::new_v4().to_string(), Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    let body = json!({"instructions": [{"itemId": "0", "operation": "upsert", "resource": patient_file}]}).to_string();
    let headers = [
        ("SourceAddress", "kafka://client/somewhere"),
        ("ConversationId", conversation_id.as_str()),
        ("MessageId", message_id.as_str()),
        ("RequestId", request_id.as_str()),
        ("DestinationAddress", "kafka://kafka-broker:9092/FirelyServerCommands.ExecuteStorePlanCommand"),
        ("fhir-release", "R4"),
        ("responseAddress", address.as_str()),
    ];
    run.send(&run.topics.store, body.as_bytes(), &headers).await;
    let reply = run.reply_to(&request_id).await;
    assert_eq!(reply.json(), json!({"errors": []}), "the reply's value is the bare response");
    assert_eq!(reply.header("MT-MessageType"), Some(STORE_RESPONSE));
    assert_eq!(reply.header("ConversationId"), Some(conversation_id.as_str()));
    assert_eq!(reply.header("fhir-release"), Some("R4"), "fhir-release is echoed");
    let reply_id = reply.header("MessageId").expect("a MessageId header");
    assert!(Uuid::parse_str(reply_id).is_ok() && reply_id != message_id, "a new MessageId");
    assert_eq!(reply.header("DestinationAddress"), Some(address.as_str()));

    // The same upsert again (a new message): nothing new is written.
    let again = Uuid::new_v4().to_string();
    let other_message = Uuid::new_v4().to_string();
    let headers = [
        ("MessageId", other_message.as_str()),
        ("RequestId", again.as_str()),
        ("MT-Response-Address", address.as_str()),
    ];
    run.send(&run.topics.store, body.as_bytes(), &headers).await;
    assert_eq!(run.reply_to(&again).await.json(), json!({"errors": []}));
    assert_eq!(run.store.version_log().await.unwrap().len(), 1, "the identical upsert wrote nothing");

    // A MassTransit envelope on the topic is unwrapped; its requestId is echoed.
    let envelope_request = Uuid::new_v4();
    let envelope = json!({
        "messageId": Uuid::new_v4(), "requestId": envelope_request, "messageType": [STORE_URN],
        "headers": {"fhir-release": "R5"}, "responseAddress": address,
        "message": {"instructions": [{"itemId": "o", "operation": "create", "resourceType": "Organization",
            "resourceId": "example-organization", "currentVersion": "1",
            "resource": include_str!("data/fixtures/firely-sample/resources/example-organization.json")}]}
    });
    run.send(&run.topics.store, envelope.to_string().as_bytes(), &[]).await;
    let reply = run.reply_to(&envelope_request.to_string()).await;
    assert_eq!(reply.json(), json!({"errors": []}));
    assert_eq!(reply.header("fhir-release"), Some("R5"));

    // Retrieve, raw JSON on the retrieve topic: the stored text byte for byte, and a miss.
    let retrieve_request = Uuid::new_v4().to_string();
    let retrieve = json!({"instructions": [
        {"itemId": "p", "reference": {"resourceType": "Patient", "resourceId": "example-patient"}},
        {"itemId": "x", "reference": {"resourceType": "Patient", "resourceId": "nobody"}}]});
    let headers = [("RequestId", retrieve_request.as_str()), ("ResponseAddress", address.as_str())];
    run.send(&run.topics.retrieve, retrieve.to_string().as_bytes(), &headers).await;
    let reply = run.reply_to(&retrieve_request).await;
    assert_eq!(reply.header("MT-MessageType"), Some(RETRIEVE_RESPONSE));
    let response = reply.json();
    assert_eq!(response["items"][0]["resource"], patient_file);
    assert_eq!(response["items"][1]["status"]["details"], "ResourceNotFound");

    // Events: one record per resource, keyed Type/id, bare JSON with ids in headers.
    let full = run.collector.wait_for(&run.topics.full, 2).await;
    let keys: HashSet<Option<String>> = full.iter().map(|r| r.key.clone()).collect();
    assert_eq!(
        keys,
        HashSet::from([
            Some("Patient/example-patient".to_owned()),
            Some("Organization/example-organization".to_owned())
        ])
    );
    assert!(full.iter().all(|r| r.header("MessageId").is_some_and(|id| Uuid::parse_str(id).is_ok())));
    assert!(full[0].json()["changes"].is_array());
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_goes_to_the_error_topic_or_a_reply_and_consumption_goes_on() {
    let tansu = Tansu::start().await;
    let topics = Topics::new();
    tansu.create_topics(&topics.all(), 1).await;
    let options = topics.options(&tansu);
    let store = common::TestStore::new(common::Kind::Sqlite).await;
    let limits = BridgeOptions { max_message_bytes: 64 * 1024, ..BridgeOptions::default() };
    let run = start_bridge(&tansu, topics, store, options, limits).await;
    let address = run.reply_address();

    enum Expect {
        /// In the error topic with MT-Reason `fault` and this text in MT-Fault-Message.
        Error(&'static str),
        /// In the error topic with MT-Reason `dead-letter`.
        Skipped,
        /// Answered with an error of this status detail.
        Reply(&'static str),
    }
    let huge = json!({"instructions": [], "pad": "x".repeat(100 * 1024)}).to_string();
    let bad_plan_request = Uuid::new_v4().to_string();
    /// What is sent, the record's value and headers, and what it gets.
    type Case<'a> = (&'a str, Vec<u8>, Vec<(&'a str, String)>, Expect);
    let cases: Vec<Case> = vec![
        ("invalid JSON", b"{\"instructions\": [".to_vec(), vec![], Expect::Error("not valid JSON")),
        ("invalid UTF-8", vec![b'{', 0xff, 0xfe, b'}'], vec![], Expect::Error("UTF-8")),
        (
            "a MessageId header that is not a GUID",
            br#"{"instructions": []}"#.to_vec(),
            vec![("MessageId", "not-a-guid".into())],
            Expect::Error("not a GUID"),
        ),
        (
            "an envelope of a type the bridge does not consume",
            json!({"messageType": ["urn:message:Firely.Server.Contracts.Messages.V1:ResourcesChangedEvent"],
                   "message": {"changes": []}})
            .to_string()
            .into_bytes(),
            vec![],
            Expect::Skipped,
        ),
        ("a 100 KB message", huge.into_bytes(), vec![], Expect::Error("MaxMessageBytes")),
        (
            "a plan that is not an object",
            b"5".to_vec(),
            vec![("ResponseAddress", address.clone()), ("RequestId", bad_plan_request.clone())],
            Expect::Reply("BadRequestWrongPayloadFormat"),
        ),
        (
            "a reply address on another broker",
            json!({"instructions": upsert("elsewhere", "1")}).to_string().into_bytes(),
            vec![("ResponseAddress", "rabbitmq://localhost/replies".into())],
            Expect::Error("rabbitmq"),
        ),
        (
            "a reply topic that does not exist",
            json!({"instructions": upsert("nowhere", "1")}).to_string().into_bytes(),
            vec![("ResponseAddress", "kafka://k:9092/no-such-topic".into())],
            Expect::Error("no-such-topic"),
        ),
    ];
    let mut errors_seen = 0;
    for (i, (what, body, headers, expect)) in cases.into_iter().enumerate() {
        let key = format!("case-{i}");
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        produce(&run.producer, &run.topics.store, Some(&key), &body, &headers).await;
        if let Expect::Reply(details) = expect {
            let reply = run.reply_to(&bad_plan_request).await;
            assert_eq!(reply.json()["errors"][0]["status"]["details"], details, "{what}");
        } else {
            errors_seen += 1;
            let records = run.collector.wait_for(&run.topics.errors, errors_seen).await;
            assert_eq!(records.len(), errors_seen, "{what}: nothing in the error topic");
            let record = records.last().expect("checked above");
            assert_eq!(record.value, body, "{what}: the record is copied unchanged");
            assert_eq!(record.key.as_deref(), Some(key.as_str()), "{what}: with its key");
            for (name, value) in &headers {
                assert_eq!(record.header(name), Some(*value), "{what}: and its headers");
            }
            assert_eq!(record.header("MT-Source-Topic"), Some(run.topics.store.as_str()));
            if let Expect::Error(text) = expect {
                assert_eq!(record.header("MT-Reason"), Some("fault"), "{what}");
                let message = record.header("MT-Fault-Message").unwrap_or_default();
                assert!(message.contains(text), "{what}: {message}");
            } else {
                assert_eq!(record.header("MT-Reason"), Some("dead-letter"), "{what}");
            }
        }
        // The next good command is processed.
        let request = run.store_plan(upsert(&format!("after-{i}"), "1")).await;
        assert_eq!(run.reply_to(&request).await.json(), json!({"errors": []}), "after {what}");
    }
    let store = run.stop().await;
    let ids: HashSet<String> = store.version_log().await.unwrap().iter().map(|c| c.key.resource_id.clone()).collect();
    assert!(ids.contains("elsewhere") && ids.contains("nowhere"), "a failed reply does not undo the committed effect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offsets_are_committed_after_the_effect_so_the_next_bridge_resumes_after_the_last_command() {
    let tansu = Tansu::start().await;
    let topics = Topics::new();
    tansu.create_topics(&topics.all(), 1).await;
    let options = topics.options(&tansu);
    let store = common::TestStore::new(common::Kind::Sqlite).await;
    let run = start_bridge(&tansu, topics.clone(), store, options.clone(), BridgeOptions::default()).await;
    let mut requests = Vec::new();
    for i in 0..20 {
        requests.push(run.store_plan(upsert(&format!("first-{i}"), "1")).await);
    }
    for request in &requests {
        run.reply_to(request).await;
    }
    let store = run.stop().await;

    // The next bridge in the same consumer group, one command at a time: a repeat of any earlier
    // command would be answered before the new one.
    let one_at_a_time = BridgeOptions { concurrency: 1, ..BridgeOptions::default() };
    let run = start_bridge(&tansu, topics, store, options, one_at_a_time).await;
    let last = run.store_plan(upsert("second", "1")).await;
    run.reply_to(&last).await;
    let replies = run.collector.records(&run.topics.replies);
    assert_eq!(replies.len(), 21, "no command was handled twice");
    let store = run.stop().await;
    assert_eq!(store.version_log().await.unwrap().len(), 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_consumers_on_four_partitions_apply_each_resources_commands_in_partition_order() {
    const RESOURCES: usize = 8;
    const VERSIONS: usize = 10;
    let tansu = Tansu::start().await;
    let topics = Topics::new();
    tansu.create_topics(&[&topics.store], 4).await;
    tansu.create_topics(&[&topics.retrieve, &topics.errors, &topics.replies, &topics.full, &topics.light], 1).await;
    let options = KafkaOptions { consumers: 2, ..topics.options(&tansu) };
    let store = common::TestStore::new(common::Kind::Postgres).await;
    let run = start_bridge(&tansu, topics, store, options, BridgeOptions::default()).await;
    // Both consumers of the group own partitions before anything is sent.
    for _ in 0..1200 {
        if run.transport.assignments().iter().all(|a| !a.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let assignments = run.transport.assignments();
    assert!(assignments.iter().all(|a| !a.is_empty()), "a consumer owns no partition: {assignments:?}");
    let address = run.reply_address();
    let mut requests = Vec::new();
    // Version by version, all resources interleaved; each resource keyed to one partition.
    for version in 1..=VERSIONS {
        for r in 0..RESOURCES {
            let (request, message) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
            let id = format!("ordered-{r}");
            let body = json!({"instructions": upsert(&id, &version.to_string())}).to_string();
            let headers = [
                ("MessageId", message.as_str()),
                ("RequestId", request.as_str()),
                ("ResponseAddress", address.as_str()),
            ];
            produce(&run.producer, &run.topics.store, Some(&format!("Patient/{id}")), body.as_bytes(), &headers).await;
            requests.push(request);
        }
    }
    for request in &requests {
        assert_eq!(run.reply_to(request).await.json(), json!({"errors": []}));
    }
    let store = run.stop().await;
    let log = store.version_log().await.unwrap();
    assert_eq!(log.len(), RESOURCES * VERSIONS, "every command applied once");
    for r in 0..RESOURCES {
        let versions: Vec<String> =
            log.iter().filter(|c| c.key.resource_id == format!("ordered-{r}")).map(|c| c.version_id.clone()).collect();
        let expected: Vec<String> = (1..=VERSIONS).map(|v| v.to_string()).collect();
        assert_eq!(versions, expected, "ordered-{r} applied out of its partition's order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_topics_are_named_at_start_and_created_when_allowed() {
    let tansu = Tansu::start().await;
    let topics = Topics::new();
    tansu.create_topics(&[&topics.store], 1).await;
    let options = topics.options(&tansu);
    let error = KafkaTransport::connect(options.clone()).await.expect_err("topics are missing");
    let TransportError::Refused(message) = &error else { panic!("not a refusal: {error}") };
    for topic in [&topics.retrieve, &topics.errors, &topics.full, &topics.light] {
        assert!(message.contains(&format!("`{topic}`")), "{topic} is named: {message}");
    }
    assert!(!message.contains(&format!("`{}`", topics.store)), "an existing topic is not named: {message}");
    assert!(message.contains("kafka-topics.sh") && message.contains("CreateTopics"), "{message}");

    let creating = KafkaOptions { create_topics: Some(2), ..options };
    let transport = KafkaTransport::connect(creating).await.expect("the bridge creates the missing topics");
    transport.close().await;
    let again = KafkaTransport::connect(topics.options(&tansu)).await.expect("now they all exist");
    again.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sasl_credentials_reach_the_broker_and_a_refusal_is_reported_at_start() {
    // tansu with --authentication knows no user here (its users are created through an
    // authenticated connection): the SCRAM exchange runs and the broker answers unknown-user.
    let tansu = Tansu::start_authenticating().await;
    let options = KafkaOptions {
        sasl: Some(fhir_pubsub::transport::kafka::Sasl::ScramSha256 {
            username: "bridge".into(),
            password: "pw-not-to-be-logged".into(),
        }),
        ..Topics::new().options(&tansu)
    };
    let error = KafkaTransport::connect(options).await.expect_err("no such user");
    let TransportError::Refused(message) = &error else { panic!("not a refusal: {error}") };
    assert!(message.contains("SASL authentication") && message.contains("SCRAM"), "{message}");
    assert!(!message.contains("pw-not-to-be-logged"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_broker_is_reported_at_start_as_unavailable() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let options = KafkaOptions { bootstrap_servers: format!("127.0.0.1:{free}"), ..KafkaOptions::default() };
    let error = KafkaTransport::connect(options).await.expect_err("nothing listens there");
    assert!(error.is_retryable(), "{error}");
    assert!(error.to_string().contains(&format!("127.0.0.1:{free}")), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_python_confluent_kafka_client_gets_its_reply_and_events() {
    let tansu = Tansu::start().await;
    let run = start(&tansu, common::Kind::Sqlite).await;
    let patient_id = format!("py-{}", Uuid::new_v4().simple());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/kafka_client.py");
    let output = tokio::process::Command::new("python3")
        .arg(script)
        .args([&tansu.bootstrap(), &run.topics.store, &run.topics.replies, &run.topics.full, &run.topics.light])
        .arg(&patient_id)
        .output()
        .await
        .expect("python3 runs (scripts/services --kafka installs confluent-kafka)");
    assert!(output.status.success(), "the Python client failed: {}", String::from_utf8_lossy(&output.stderr));
    let result: Value = serde_json::from_slice(&output.stdout).expect("the client prints JSON");
    let reply = &result["reply"];
    assert_eq!(reply["body"], json!({"errors": []}), "{result}");
    assert_eq!(reply["headers"]["ConversationId"], result["sent"]["conversationId"]);
    assert_eq!(reply["headers"]["fhir-release"], "R4");
    assert_eq!(reply["headers"]["MT-MessageType"], STORE_RESPONSE);
    let events = result["events"].as_array().expect("events");
    let topics: HashSet<&str> = events.iter().filter_map(|e| e["topic"].as_str()).collect();
    assert_eq!(topics, HashSet::from([run.topics.full.as_str(), run.topics.light.as_str()]), "{result}");
    for event in events {
        assert_eq!(event["key"], format!("Patient/{patient_id}"), "events are keyed by resource");
        assert_eq!(event["body"]["changes"][0]["changeType"], "create");
    }
    run.stop().await;
}

/// Says, for each command never answered, where it was lost: whether the broker still holds the
/// command record, whether the store applied it, and whether the broker holds a reply to it that
/// the test's consumer missed.
async fn explain_unanswered(tansu: &Tansu, run: &Running, requests: &[String], unanswered: &[usize]) -> String {
    let commands = kafka_support::read_topic(tansu, &run.topics.store).await;
    let replies = kafka_support::read_topic(tansu, &run.topics.replies).await;
    let errors = kafka_support::read_topic(tansu, &run.topics.errors).await;
    let applied: HashSet<String> =
        run.store.store.version_log().await.unwrap().into_iter().map(|c| c.key.resource_id).collect();
    let mut lines = vec![format!(
        "{} of {} commands unanswered; the broker holds {} command records and {} replies",
        unanswered.len(),
        requests.len(),
        commands.len(),
        replies.len()
    )];
    for &i in unanswered {
        let request = &requests[i];
        let in_topic = commands.iter().filter(|r| r.header("RequestId") == Some(request)).count();
        let replied = replies.iter().filter(|r| r.header("RequestId") == Some(request)).count();
        let faulted: Vec<&str> = errors
            .iter()
            .filter(|r| r.header("RequestId") == Some(request))
            .map(|r| r.header("MT-Fault-Message").unwrap_or("?"))
            .collect();
        lines.push(format!(
            "command {i} (RequestId {request}, Patient/r{i}): {in_topic} command record(s) in the topic, \
             applied: {}, {replied} reply record(s) in the topic, in the error topic: {faulted:?}",
            applied.contains(&format!("r{i}"))
        ));
    }
    lines.join("\n")
}

/// Two broker crashes (SIGKILL) while commands are in flight. The broker keeps its data in a file
/// (tansu's SQLite storage), so it comes back with its topics, records, committed offsets and
/// producer state, as a restarted Kafka broker does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_restart_mid_stream_loses_no_command_and_applies_none_twice() {
    const BEFORE: usize = 600;
    const AFTER: usize = 50;
    const RESTARTS: usize = 2;
    let mut tansu = Tansu::start_persistent().await;
    let topics = Topics::new();
    tansu.create_topics(&topics.all(), 1).await;
    let options = topics.options(&tansu);
    let store = common::TestStore::new(common::Kind::Postgres).await;
    let run = start_bridge(&tansu, topics, store, options, BridgeOptions::default()).await;
    let mut requests = Vec::new();
    for i in 0..BEFORE {
        let plan = json!([{"itemId": "0", "operation": "create", "resource": patient(&format!("r{i}"), "1")}]);
        requests.push(run.store_plan(plan).await);
    }
    // Crash the broker while commands are in flight: once a third, then two thirds are answered.
    for restart in 1..=RESTARTS {
        loop {
            let answered = run.collector.records(&run.topics.replies).len();
            if answered >= BEFORE * restart / (RESTARTS + 1) {
                assert!(answered < BEFORE, "all commands were answered before the restart; the test proves nothing");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tansu.kill();
        tokio::time::sleep(Duration::from_secs(2)).await;
        tansu.restart().await;
    }
    for i in 0..AFTER {
        let plan =
            json!([{"itemId": "0", "operation": "create", "resource": patient(&format!("r{}", BEFORE + i), "1")}]);
        requests.push(run.store_plan(plan).await);
    }

    // Every reply, waiting at most 120 s in all (a bound for a slow, shared machine).
    for _ in 0..2400 {
        let answered: HashSet<String> = run
            .collector
            .records(&run.topics.replies)
            .iter()
            .filter_map(|r| r.header("RequestId").map(str::to_owned))
            .collect();
        if requests.iter().all(|r| answered.contains(r)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut replies: HashMap<String, Vec<Value>> = HashMap::new();
    for r in run.collector.records(&run.topics.replies) {
        replies.entry(r.header("RequestId").unwrap_or_default().to_owned()).or_default().push(r.json());
    }
    let unanswered: Vec<usize> = (0..requests.len()).filter(|i| !replies.contains_key(&requests[*i])).collect();
    if !unanswered.is_empty() {
        panic!("{}", explain_unanswered(&tansu, &run, &requests, &unanswered).await);
    }
    for (request, answers) in &replies {
        assert!(answers.iter().all(|a| *a == json!({"errors": []})), "{request}: {answers:?}");
    }
    // Every change in the events too (at least once), waiting at most 120 s in all.
    let keys = |records: Vec<kafka_support::Record>| -> HashSet<String> {
        records.into_iter().filter_map(|r| r.key).collect()
    };
    let wanted: HashSet<String> = (0..BEFORE + AFTER).map(|i| format!("Patient/r{i}")).collect();
    for _ in 0..2400 {
        if wanted.is_subset(&keys(run.collector.records(&run.topics.full))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = run.collector.records(&run.topics.full).len();
    let missing: Vec<String> = wanted.difference(&keys(run.collector.records(&run.topics.full))).cloned().collect();
    assert!(missing.is_empty(), "changes never published: {missing:?}");
    let store = run.stop().await;
    let log = store.version_log().await.unwrap();
    assert_eq!(log.len(), BEFORE + AFTER, "each command applied exactly once");
    let repeats: usize = replies.values().map(|a| a.len() - 1).sum();
    eprintln!(
        "{} commands, {RESTARTS} broker crashes: {repeats} repeated replies, {} repeated events",
        BEFORE + AFTER,
        events - (BEFORE + AFTER)
    );
}
