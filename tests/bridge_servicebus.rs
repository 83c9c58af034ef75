//! The bridge end to end over Azure Service Bus, against the Service Bus *test double*
//! (`servicebus_broker`: a small AMQP 1.0 broker in the test process, not Microsoft's service),
//! with the real azservicebus client on both sides: Firely's store and retrieve flows with replies
//! to a queue and to a topic address (SessionId and PartitionKey copied), change events on the
//! event topics, bad input dead-lettered (or copied to `<queue>_error`) with its reason while the
//! next command is still served, repeated commands answered from the inbox, a transient failure
//! abandoned and delivered again, and missing entities or a wrong key refused at start.
//!
//! Each test starts its own broker on its own loopback address, so tests never see each other's
//! messages.
#![cfg(feature = "servicebus")]

mod common;
mod servicebus_broker;
mod tcp_relay;

use std::sync::Arc;
use std::time::Duration;

use azservicebus::authorization::AzureNamedKeyCredential;
use azservicebus::{ServiceBusClient, ServiceBusClientOptions, ServiceBusMessage, ServiceBusSenderOptions};
use fhir_pubsub::bridge::{Bridge, BridgeOptions};
use fhir_pubsub::config::{ResourceChangeNotificationSettings, ServiceBusConnectionString};
use fhir_pubsub::publisher::Publisher;
use fhir_pubsub::transport::servicebus::{ServiceBusOptions, ServiceBusTransport};
use fhir_pubsub::transport::{Transport, TransportError};
use serde_json::{Value, json};
use servicebus_broker::{BrokerMessage, TestServiceBus};
use tcp_relay::Relay;
use tokio::sync::watch;
use uuid::Uuid;

const STORE_RESPONSE: &str = "urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanResponse";
const RETRIEVE_RESPONSE: &str = "urn:message:Firely.Server.Contracts.Messages.V1:RetrievePlanResponse";
const STORE_URN: &str = "urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand";
const RETRIEVE_URN: &str = "urn:message:Firely.Server.Contracts.Messages.V1:RetrievePlanCommand";
const STORE_TOPIC: &str = "Firely.Server.Contracts.Messages.V1~ExecuteStorePlanCommand";
const RETRIEVE_TOPIC: &str = "Firely.Server.Contracts.Messages.V1~RetrievePlanCommand";
const FULL_TOPIC: &str = "Firely.Server.Contracts.Messages.V1~ResourcesChangedEvent";
const LIGHT_TOPIC: &str = "Firely.Server.Contracts.Messages.V1~ResourcesChangedLightEvent";
/// The queue the bridge consumes (`ApplicationQueueName` `FirelyServer`, lower-cased).
const QUEUE: &str = "firelyserver";
/// Where the test reads replies sent to a queue, and those sent to a topic (via a subscription).
const REPLIES: &str = "replies";
const REPLY_TOPIC: &str = "reply-topic";
const REPLY_TOPIC_COPY: &str = "reply-topic-copy";
/// Queues the event topics' subscriptions forward to, for the test to read.
const FULL_EVENTS: &str = "full-events";
const LIGHT_EVENTS: &str = "light-events";

/// Declares Firely's entities on the test broker, plus the test's own reply and event queues.
fn declare_entities(bus: &TestServiceBus, error_queues: bool) {
    bus.create_queue(QUEUE);
    for topic in [STORE_TOPIC, RETRIEVE_TOPIC] {
        bus.create_topic(topic);
        bus.create_subscription(topic, "FirelyServer", Some(QUEUE));
    }
    for (topic, queue) in [(FULL_TOPIC, FULL_EVENTS), (LIGHT_TOPIC, LIGHT_EVENTS), (REPLY_TOPIC, REPLY_TOPIC_COPY)] {
        bus.create_queue(queue);
        bus.create_topic(topic);
        bus.create_subscription(topic, "test", Some(queue));
    }
    bus.create_queue(REPLIES);
    if error_queues {
        bus.create_queue(&format!("{QUEUE}_error"));
        bus.create_queue(&format!("{QUEUE}_skipped"));
    }
}

/// The bridge's options for the test broker: plain AMQP, as for Microsoft's emulator.
fn options(bus: &TestServiceBus) -> ServiceBusOptions {
    let connection_string = format!("{};UseDevelopmentEmulator=true", bus.connection_string());
    ServiceBusOptions {
        connection: ServiceBusConnectionString::parse(&connection_string).expect("the test broker's connection string"),
        connection_string,
        application_queue_name: "FirelyServer".into(),
        namespace_separator: "~".into(),
        prefetch: 16,
        use_error_queues: false,
        full_events: true,
        light_events: true,
        retry_delay: Duration::from_millis(200),
    }
}

/// A client of the test broker (by address and key: azservicebus drops a connection string's port).
async fn client(bus: &TestServiceBus) -> ServiceBusClient<azservicebus::core::BasicRetryPolicy> {
    let credential = AzureNamedKeyCredential::new(bus.key_name(), bus.key());
    ServiceBusClient::unsecured()
        .new_from_named_key_credential(bus.namespace_address(), credential, ServiceBusClientOptions::default())
        .await
        .expect("the test client connects")
}

/// A bridge (and its change publisher) on its own store, and a client of the same broker.
struct Running {
    bus: TestServiceBus,
    store: common::TestStore,
    transport: Arc<ServiceBusTransport>,
    client: ServiceBusClient<azservicebus::core::BasicRetryPolicy>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn start_with(bus: TestServiceBus, kind: common::Kind, options: ServiceBusOptions) -> Running {
    let store = common::TestStore::new(kind).await;
    let bridge_store = store.store.clone();
    start_on(bus, store, bridge_store, options).await
}

/// A bridge on `bridge_store` (the test store itself, or the same database reached another way).
async fn start_on(
    bus: TestServiceBus,
    store: common::TestStore,
    bridge_store: Arc<dyn fhir_pubsub::store::Store>,
    options: ServiceBusOptions,
) -> Running {
    let transport = Arc::new(ServiceBusTransport::connect(options).await.expect("the bridge connects to Service Bus"));
    let dyn_transport: Arc<dyn Transport> = transport.clone();
    let events = ResourceChangeNotificationSettings {
        send_full_events: true,
        send_light_events: true,
        ..ResourceChangeNotificationSettings::default()
    };
    let publisher = Arc::new(Publisher::new(bridge_store.clone(), dyn_transport.clone(), events));
    let bridge = Arc::new(
        Bridge::new(bridge_store, dyn_transport, BridgeOptions::default()).with_changes_waker(publisher.waker()),
    );
    let (stop, stopped) = watch::channel(false);
    let publisher_stopped = stopped.clone();
    let tasks = vec![
        tokio::spawn(async move { bridge.run(stopped).await.expect("bridge runs") }),
        tokio::spawn(async move { publisher.run(publisher_stopped).await }),
    ];
    let client = client(&bus).await;
    Running { bus, store, transport, client, stop, tasks }
}

async fn start(kind: common::Kind) -> Running {
    let bus = TestServiceBus::start().await;
    declare_entities(&bus, false);
    let options = options(&bus);
    start_with(bus, kind, options).await
}

/// Properties a client sets on a command message.
#[derive(Default)]
struct Outgoing<'a> {
    content_type: Option<&'a str>,
    message_id: Option<String>,
    session_id: Option<&'a str>,
    reply_to_session_id: Option<&'a str>,
    partition_key: Option<&'a str>,
    properties: Vec<(&'a str, &'a str)>,
}

impl Running {
    fn namespace(&self) -> String {
        self.bus.namespace_host()
    }

    /// `sb://<namespace>/replies`, the address Firely clients give for a reply queue.
    fn reply_queue_address(&self) -> String {
        format!("sb://{}/{REPLIES}", self.namespace())
    }

    /// `sb://<namespace>/reply-topic?type=topic`.
    fn reply_topic_address(&self) -> String {
        format!("sb://{}/{REPLY_TOPIC}?type=topic", self.namespace())
    }

    /// Sends a body to an entity as a client would, and waits for the broker to accept it.
    async fn send(&mut self, entity: &str, body: &[u8], send: Outgoing<'_>) {
        let mut message = ServiceBusMessage::new(body.to_vec());
        message.set_content_type(send.content_type.map(str::to_owned));
        if let Some(id) = send.message_id {
            message.set_message_id(id).unwrap();
        }
        if let Some(session) = send.session_id {
            message.set_session_id(Some(session.to_owned())).unwrap();
        }
        if let Some(session) = send.reply_to_session_id {
            message.set_reply_to_session_id(Some(session.to_owned())).unwrap();
        }
        if let Some(key) = send.partition_key {
            message.set_partition_key(Some(key.to_owned())).unwrap();
        }
        if !send.properties.is_empty() {
            let mut properties = fe2o3_amqp_types::messaging::ApplicationProperties::default();
            for (k, v) in send.properties {
                properties.0.insert(k.to_owned(), fe2o3_amqp_types::primitives::SimpleValue::String(v.to_owned()));
            }
            *message.application_properties_mut() = Some(properties);
        }
        let mut sender = self.client.create_sender(entity, ServiceBusSenderOptions::default()).await.expect("sender");
        sender.send_message(message).await.expect("the broker accepts the command");
        let _ = sender.dispose().await;
    }

    /// Sends a MassTransit envelope of `urn` to `topic`; returns its requestId.
    async fn send_envelope(&mut self, topic: &str, urn: &str, response_address: &str, message: Value) -> Uuid {
        let request_id = Uuid::new_v4();
        let envelope = json!({
            "messageId": Uuid::new_v4(), "requestId": request_id, "conversationId": Uuid::new_v4(),
            "messageType": [urn], "headers": {"fhir-release": "R4"},
            "responseAddress": response_address, "message": message,
        });
        let send = Outgoing { content_type: Some("application/vnd.masstransit+json"), ..Outgoing::default() };
        self.send(topic, envelope.to_string().as_bytes(), send).await;
        request_id
    }

    /// A store plan upserting `id`, as an envelope with a reply to the reply queue.
    async fn store_plan(&mut self, id: &str) -> Uuid {
        let address = self.reply_queue_address();
        self.send_envelope(STORE_TOPIC, STORE_URN, &address, json!({"instructions": upsert(id, "1")})).await
    }

    /// The reply in `queue` whose envelope's requestId is `request_id`, waiting up to 120 s (a
    /// bound for a slow, shared machine, not a speed requirement).
    async fn reply_in(&self, queue: &str, request_id: Uuid) -> (BrokerMessage, Value) {
        for _ in 0..2400 {
            for message in self.bus.active_messages(queue) {
                let envelope: Value = serde_json::from_slice(&message.body).unwrap_or(Value::Null);
                if envelope["requestId"] == json!(request_id) {
                    return (message, envelope);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let dead = self.bus.dead_letters(QUEUE);
        panic!(
            "no reply to {request_id} in `{queue}` ({} dead letters: {:?})",
            dead.len(),
            dead.last().map(|m| &m.dead_letter_description)
        );
    }

    /// Waits until `queue`'s dead-letter sub-queue holds `count` messages.
    async fn dead_letters(&self, count: usize) -> Vec<BrokerMessage> {
        for _ in 0..2400 {
            let dead = self.bus.dead_letters(QUEUE);
            if dead.len() >= count {
                return dead;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("fewer than {count} dead letters in `{QUEUE}`");
    }

    /// Waits until `queue` holds at least `count` messages.
    async fn messages(&self, queue: &str, count: usize) -> Vec<BrokerMessage> {
        for _ in 0..2400 {
            let messages = self.bus.active_messages(queue);
            if messages.len() >= count {
                return messages;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("fewer than {count} messages in `{queue}`");
    }

    async fn stop(self) -> (common::TestStore, TestServiceBus) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
        }
        self.transport.close().await;
        let _ = self.client.dispose().await;
        (self.store, self.bus)
    }
}

/// Waits (up to 120 s, a bound for a slow machine) until `queue` holds no message, locked or not.
async fn wait_until_empty(bus: &TestServiceBus, queue: &str) {
    for _ in 0..2400 {
        if bus.active_messages(queue).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("`{queue}` still holds {} messages", bus.active_messages(queue).len());
}

fn patient(id: &str, version: &str) -> String {
    json!({"resourceType": "Patient", "id": id, "meta": {"versionId": version, "lastUpdated": "2024-01-01T00:00:00Z"}})
        .to_string()
}

fn upsert(id: &str, version: &str) -> Value {
    json!([{"itemId": "0", "operation": "upsert", "resource": patient(id, version)}])
}

fn property<'a>(message: &'a BrokerMessage, name: &str) -> Option<&'a Value> {
    message.application_properties.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn firely_flows_reply_to_queues_and_topics_with_the_requesters_session_and_publish_events() {
    let mut run = start(common::Kind::Postgres).await;
    let patient_file = include_str!("data/fixtures/firely-sample/resources/example-patient.json");
    let reply_queue = run.reply_queue_address();

    // Firely's store plan as a MassTransit envelope, from a requester on a session: the reply goes to
    // its ReplyToSessionId, with the partition key following the session.
    let request_id = Uuid::new_v4();
    let conversation_id = Uuid::new_v4();
    let envelope = json!({
        "messageId": Uuid::new_v4(), "requestId": request_id, "conversationId": conversation_id,
        "messageType": [STORE_URN], "headers": {"fhir-release": "R4", "MT-Request-AcceptType": [STORE_RESPONSE]},
        "responseAddress": reply_queue,
        "message": {"instructions": [{"itemId": "0", "operation": "upsert", "resource": patient_file}]},
    });
    let send = Outgoing {
        content_type: Some("application/vnd.masstransit+json"),
        session_id: Some("request-session"),
        reply_to_session_id: Some("reply-session"),
        partition_key: Some("request-session"),
        ..Outgoing::default()
    };
    run.send(STORE_TOPIC, envelope.to_string().as_bytes(), send).await;
    let (reply, body) = run.reply_in(REPLIES, request_id).await;
    assert_eq!(body["message"], json!({"errors": []}));
    assert_eq!(body["messageType"][0], STORE_RESPONSE);
    assert_eq!(body["conversationId"], json!(conversation_id));
    assert_eq!(body["headers"]["fhir-release"], "R4", "fhir-release is echoed");
    assert_eq!(body["sourceAddress"], format!("sb://{}/{QUEUE}", run.namespace()));
    assert_eq!(body["destinationAddress"], reply_queue.as_str());
    assert_eq!(reply.content_type.as_deref(), Some("application/vnd.masstransit+json"));
    let message_id = reply.message_id.as_deref().expect("a MessageId");
    assert!(message_id.len() == 32 && message_id.chars().all(|c| c.is_ascii_hexdigit()), "N form: {message_id}");
    assert_eq!(Uuid::parse_str(message_id).ok(), body["messageId"].as_str().and_then(|id| Uuid::parse_str(id).ok()));
    assert_eq!(reply.session_id.as_deref(), Some("reply-session"), "ReplyToSessionId wins over SessionId");
    assert_eq!(reply.partition_key.as_deref(), Some("reply-session"), "the partition key follows the session");
    assert_eq!(property(&reply, "fhir-release"), Some(&json!("R4")), "simple headers as application properties");
    assert_eq!(property(&reply, "MT-Request-AcceptType"), None, "MT- headers are not echoed");

    // A requester with a session and no ReplyToSessionId gets its SessionId back; Python's lower-case
    // topic name reaches the same topic (Service Bus names ignore case).
    let request_id = Uuid::new_v4();
    let envelope = json!({"requestId": request_id, "messageType": [STORE_URN], "headers": {"fhir-release": "R4"},
        "responseAddress": reply_queue, "message": {"instructions": upsert("second", "1")}});
    let send = Outgoing { session_id: Some("s-2"), partition_key: Some("s-2"), ..Outgoing::default() };
    run.send(&STORE_TOPIC.to_lowercase(), envelope.to_string().as_bytes(), send).await;
    let (reply, body) = run.reply_in(REPLIES, request_id).await;
    assert_eq!(body["message"], json!({"errors": []}));
    assert_eq!((reply.session_id.as_deref(), reply.partition_key.as_deref()), (Some("s-2"), Some("s-2")));

    // Retrieve, replying to a topic address: the stored text byte for byte, and a miss.
    let topic_address = run.reply_topic_address();
    let retrieve = json!({"instructions": [
        {"itemId": "p", "reference": {"resourceType": "Patient", "resourceId": "example-patient"}},
        {"itemId": "x", "reference": {"resourceType": "Patient", "resourceId": "nobody"}}]});
    let request_id = run.send_envelope(RETRIEVE_TOPIC, RETRIEVE_URN, &topic_address, retrieve).await;
    let (reply, body) = run.reply_in(REPLY_TOPIC_COPY, request_id).await;
    assert_eq!(body["messageType"][0], RETRIEVE_RESPONSE);
    assert_eq!(body["message"]["items"][0]["resource"], patient_file);
    assert_eq!(body["message"]["items"][1]["status"]["details"], "ResourceNotFound");
    assert_eq!(reply.session_id, None, "no session without one on the request");

    // Events on the event topics: both committed patients, in full and light events.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2400 {
        seen.clear();
        for message in run.bus.active_messages(FULL_EVENTS) {
            let envelope: Value = serde_json::from_slice(&message.body).unwrap();
            assert_eq!(
                envelope["messageType"][0],
                "urn:message:Firely.Server.Contracts.Messages.V1:ResourcesChangedEvent"
            );
            for change in envelope["message"]["changes"].as_array().unwrap() {
                seen.insert(change["reference"]["resourceId"].as_str().unwrap_or_default().to_owned());
            }
        }
        if seen.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen.contains("example-patient") && seen.contains("second"), "{seen:?}");
    let light = run.messages(LIGHT_EVENTS, 1).await;
    let envelope: Value = serde_json::from_slice(&light[0].body).unwrap();
    assert_eq!(
        envelope["messageType"][0],
        "urn:message:Firely.Server.Contracts.Messages.V1:ResourcesChangedLightEvent"
    );
    assert!(light[0].message_id.as_deref().is_some_and(|id| id.len() == 32), "events carry an N-form MessageId");
    wait_until_empty(&run.bus, QUEUE).await; // every command was completed
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raw_json_with_transport_headers_and_a_repeated_command_get_one_effect() {
    let mut run = start(common::Kind::Sqlite).await;
    let reply_queue = run.reply_queue_address();

    // MassTransit raw JSON: the bare plan, ids and the response address in application properties.
    let request_id = Uuid::new_v4().to_string();
    let message_id = Uuid::new_v4().simple().to_string();
    let body = json!({"instructions": upsert("raw", "1")}).to_string();
    for attempt in 0..2 {
        // The same message twice (a client's retry, or Service Bus delivering it again): one effect,
        // the same answer.
        let send = Outgoing {
            content_type: Some("application/json"),
            message_id: Some(message_id.clone()),
            properties: vec![
                ("RequestId", request_id.as_str()),
                ("MT-Response-Address", reply_queue.as_str()),
                ("MT-MessageType", STORE_URN),
                ("fhir-release", "R4"),
            ],
            ..Outgoing::default()
        };
        run.send(STORE_TOPIC, body.as_bytes(), send).await;
        let replies = run.messages(REPLIES, attempt + 1).await;
        let answers: Vec<Value> =
            replies.iter().map(|m| serde_json::from_slice::<Value>(&m.body).unwrap()["message"].clone()).collect();
        assert!(answers.iter().all(|a| *a == json!({"errors": []})), "attempt {attempt}: {answers:?}");
    }
    let (store, _bus) = run.stop().await;
    assert_eq!(store.version_log().await.unwrap().len(), 1, "the repeated command was applied once");
}

/// What a bad input gets.
enum Expect {
    /// Dead-lettered (or copied to `_error`) with this reason and this text in the description.
    Error(&'static str, &'static str),
    /// Dead-lettered as skipped (or copied to `_skipped`).
    Skipped,
}

async fn bad_input_cases(error_queues: bool) {
    let bus = TestServiceBus::start().await;
    declare_entities(&bus, error_queues);
    let mut options = options(&bus);
    options.use_error_queues = error_queues;
    let mut run = start_with(bus, common::Kind::Sqlite, options).await;
    let elsewhere = json!({"messageType": [STORE_URN], "responseAddress": "rabbitmq://localhost/replies",
        "message": {"instructions": upsert("elsewhere", "1")}});
    let nowhere = json!({"messageType": [STORE_URN], "responseAddress": format!("sb://{}/no-such-queue", run.namespace()),
        "message": {"instructions": upsert("nowhere", "1")}});
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("invalid JSON", b"{\"messageType\": [".to_vec(), Expect::Error("EnvelopeDecodeError", "JSON")),
        ("invalid UTF-8", vec![b'{', 0xff, 0xfe, b'}'], Expect::Error("EnvelopeDecodeError", "UTF-8")),
        (
            "a messageId that is not a GUID",
            json!({"messageId": "not-a-guid", "messageType": [STORE_URN], "message": {"instructions": []}})
                .to_string()
                .into_bytes(),
            Expect::Error("EnvelopeDecodeError", "GUID"),
        ),
        (
            "a type the bridge does not consume",
            json!({"messageType": ["urn:message:Firely.Server.Contracts.Messages.V1:ResourcesChangedEvent"],
                   "message": {"changes": []}})
            .to_string()
            .into_bytes(),
            Expect::Skipped,
        ),
        (
            "a reply address on another broker",
            elsewhere.to_string().into_bytes(),
            Expect::Error("ReplyFailed", "rabbitmq"),
        ),
        (
            "a reply queue that does not exist",
            nowhere.to_string().into_bytes(),
            Expect::Error("ReplyFailed", "no-such-queue"),
        ),
    ];
    let mut moved = 0;
    for (i, (what, body, expect)) in cases.into_iter().enumerate() {
        let send = Outgoing { properties: vec![("test-case", what)], ..Outgoing::default() };
        run.send(STORE_TOPIC, &body, send).await;
        moved += 1;
        let message = if error_queues {
            let queue = match expect {
                Expect::Skipped => format!("{QUEUE}_skipped"),
                Expect::Error(..) => format!("{QUEUE}_error"),
            };
            let count = run.bus.active_messages(&format!("{QUEUE}_error")).len()
                + run.bus.active_messages(&format!("{QUEUE}_skipped")).len();
            assert!(count <= moved, "{what}");
            let copies = run.messages(&queue, 1).await;
            let copy = copies.into_iter().find(|m| property(m, "test-case") == Some(&json!(what)));
            let copy = match copy {
                Some(copy) => copy,
                None => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    run.bus
                        .active_messages(&queue)
                        .into_iter()
                        .find(|m| property(m, "test-case") == Some(&json!(what)))
                        .unwrap_or_else(|| panic!("{what}: not in {queue}"))
                }
            };
            match expect {
                Expect::Error(reason, text) => {
                    assert_eq!(property(&copy, "MT-Reason"), Some(&json!("fault")), "{what}");
                    assert_eq!(property(&copy, "MT-Fault-ExceptionType"), Some(&json!(reason)), "{what}");
                    let message = property(&copy, "MT-Fault-Message").and_then(Value::as_str).unwrap_or_default();
                    assert!(message.contains(text), "{what}: {message}");
                }
                Expect::Skipped => assert_eq!(property(&copy, "MT-Reason"), Some(&json!("dead-letter")), "{what}"),
            }
            copy
        } else {
            let dead = run.dead_letters(moved).await;
            assert_eq!(dead.len(), moved, "{what}: one dead letter per bad message");
            let letter = dead.into_iter().find(|m| property(m, "test-case") == Some(&json!(what))).expect(what);
            match expect {
                Expect::Error(reason, text) => {
                    assert_eq!(letter.dead_letter_reason.as_deref(), Some(reason), "{what}");
                    let description = letter.dead_letter_description.clone().unwrap_or_default();
                    assert!(description.contains(text), "{what}: {description}");
                }
                Expect::Skipped => assert_eq!(letter.dead_letter_reason.as_deref(), Some("Skipped"), "{what}"),
            }
            letter
        };
        assert_eq!(message.body, body, "{what}: the message is kept unchanged");
        // The next good command is served.
        let request = run.store_plan(&format!("after-{i}")).await;
        assert_eq!(run.reply_in(REPLIES, request).await.1["message"], json!({"errors": []}), "after {what}");
    }
    if error_queues {
        assert!(run.bus.dead_letters(QUEUE).is_empty(), "with error queues nothing is dead-lettered");
    }
    // The last command is completed just after its reply; then the queue is empty.
    wait_until_empty(&run.bus, QUEUE).await;
    let (store, _bus) = run.stop().await;
    let ids: Vec<String> = store.version_log().await.unwrap().iter().map(|c| c.key.resource_id.clone()).collect();
    assert!(
        ids.contains(&"elsewhere".to_owned()) && ids.contains(&"nowhere".to_owned()),
        "a failed reply does not undo the committed effect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_dead_lettered_with_its_reason_and_the_next_command_is_served() {
    bad_input_cases(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_error_queues_bad_input_is_copied_to_the_error_or_skipped_queue() {
    bad_input_cases(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_given_back_is_abandoned_and_delivered_again_with_its_delivery_count() {
    let bus = TestServiceBus::start().await;
    declare_entities(&bus, false);
    let transport = ServiceBusTransport::connect(options(&bus)).await.expect("connects");
    let mut deliveries = transport.start().await.expect("starts");
    let mut client = client(&bus).await;
    let mut sender = client.create_sender(QUEUE, ServiceBusSenderOptions::default()).await.unwrap();
    let mut message = ServiceBusMessage::new(b"{\"instructions\": []}".to_vec());
    message.set_session_id(Some("s".to_owned())).unwrap();
    sender.send_message(message).await.unwrap();

    let first = tokio::time::timeout(Duration::from_secs(60), deliveries.recv()).await.unwrap().unwrap();
    assert!(!first.redelivered);
    assert_eq!(first.meta.reply_session_id.as_deref(), Some("s"));
    first.acker.retry_later().await.expect("abandoned");
    let second = tokio::time::timeout(Duration::from_secs(60), deliveries.recv()).await.unwrap().unwrap();
    assert!(second.redelivered, "the broker says it was delivered before");
    assert_eq!(second.body, first.body);
    assert_eq!(bus.active_messages(QUEUE)[0].delivery_count, 2, "abandoning counted a delivery");
    second.acker.ack().await.expect("completed");
    wait_until_empty(&bus, QUEUE).await; // a completed message is gone
    assert!(bus.dead_letters(QUEUE).is_empty());
    let _ = sender.dispose().await;
    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_entities_are_named_at_start_and_a_wrong_key_is_refused() {
    let bus = TestServiceBus::start().await;
    bus.create_topic(STORE_TOPIC);
    let error = ServiceBusTransport::connect(options(&bus)).await.expect_err("entities are missing");
    let TransportError::Refused(text) = error else { panic!("refused, not {error:?}") };
    for missing in [format!("queue `{QUEUE}`"), format!("topic `{RETRIEVE_TOPIC}`"), format!("topic `{FULL_TOPIC}`")] {
        assert!(text.contains(&missing), "{missing} in {text}");
    }
    assert!(!text.contains(&format!("topic `{STORE_TOPIC}`")), "an existing topic is not named: {text}");
    assert!(text.contains("--forward-to firelyserver"), "says how to create the subscription: {text}");

    declare_entities(&bus, false);
    let mut wrong = options(&bus);
    let right_key = match &wrong.connection.credential {
        fhir_pubsub::config::ServiceBusCredential::Key { key, .. } => key.clone(),
        other => panic!("{other:?}"),
    };
    wrong.connection_string = wrong.connection_string.replace(&right_key, "d3Jvbmcta2V5");
    wrong.connection = ServiceBusConnectionString::parse(&wrong.connection_string).unwrap();
    let error = ServiceBusTransport::connect(wrong).await.expect_err("a wrong key is refused");
    assert!(matches!(error, TransportError::Refused(_)), "{error:?}");
    assert!(!error.to_string().contains("d3Jvbmcta2V5"), "the key is not repeated: {error}");

    ServiceBusTransport::connect(options(&bus))
        .await
        .expect("with every entity and the right key it starts")
        .close()
        .await;
}

/// The test double cuts every connection while commands are in flight. The bridge replaces its
/// client (azservicebus's own recovery can panic; the transport contains that); messages locked by
/// the cut link come back when their locks expire (the double's default 60 s), and the inbox
/// answers those already applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_restart_mid_stream_loses_no_command_and_applies_none_twice() {
    const COMMANDS: usize = 300;
    let bus = TestServiceBus::start().await;
    declare_entities(&bus, false);
    // The commands wait in the queue before the bridge starts, so the restart meets a stream of them.
    let address = format!("sb://{}/{REPLIES}", bus.namespace_host());
    let mut client = client(&bus).await;
    let mut sender = client.create_sender(QUEUE, ServiceBusSenderOptions::default()).await.unwrap();
    let mut expected = std::collections::HashSet::new();
    let mut messages = Vec::new();
    for i in 0..COMMANDS {
        let request_id = Uuid::new_v4();
        let envelope = json!({"messageId": Uuid::new_v4(), "requestId": request_id, "messageType": [STORE_URN],
            "responseAddress": address,
            "message": {"instructions": [{"itemId": "0", "operation": "create", "resource": patient(&format!("r{i}"), "1")}]}});
        messages.push(ServiceBusMessage::new(envelope.to_string().into_bytes()));
        expected.insert(request_id.to_string());
    }
    // One batch: the test double stalls a second transfer on a client's sender link (its limit,
    // reported; the bridge's own senders are not affected).
    sender.send_messages(messages).await.expect("the batch is accepted");
    let _ = sender.dispose().await;
    let _ = client.dispose().await;
    let options = options(&bus);
    let run = start_with(bus, common::Kind::Postgres, options).await;
    // Restart while commands are in flight: once a quarter of them are answered.
    loop {
        let answered = run.bus.active_messages(REPLIES).len();
        if answered >= COMMANDS / 4 {
            assert!(answered < COMMANDS, "all commands were answered before the restart; the test proves nothing");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    run.bus.restart();

    let mut replies: std::collections::HashMap<String, Vec<Value>> = std::collections::HashMap::new();
    for _ in 0..2400 {
        replies.clear();
        for message in run.bus.active_messages(REPLIES) {
            let envelope: Value = serde_json::from_slice(&message.body).unwrap();
            replies
                .entry(envelope["requestId"].as_str().unwrap_or_default().to_owned())
                .or_default()
                .push(envelope["message"].clone());
        }
        if replies.len() == COMMANDS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(replies.len(), COMMANDS, "every command answered");
    for (request, answers) in &replies {
        assert!(expected.contains(request));
        assert!(answers.iter().all(|a| *a == json!({"errors": []})), "{request}: {answers:?}");
    }
    wait_until_empty(&run.bus, QUEUE).await;
    assert!(run.bus.dead_letters(QUEUE).is_empty(), "nothing dead-lettered");
    let (store, _bus) = run.stop().await;
    assert_eq!(store.version_log().await.unwrap().len(), COMMANDS, "each command applied exactly once");
    let repeats: usize = replies.values().map(|a| a.len() - 1).sum();
    eprintln!("{COMMANDS} commands, {repeats} repeated replies after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_outage_abandons_the_command_and_it_succeeds_when_the_store_is_back() {
    let bus = TestServiceBus::start().await;
    declare_entities(&bus, false);
    let store = common::TestStore::new(common::Kind::Postgres).await;
    let url = url::Url::parse(&store.url).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let target = tokio::net::lookup_host(target).await.unwrap().next().unwrap();
    let relay = Relay::start(target).await;
    let mut relayed = url.clone();
    relayed.set_host(Some(&relay.address.ip().to_string())).unwrap();
    relayed.set_port(Some(relay.address.port())).unwrap();
    let bridge_store = fhir_pubsub::store::open(relayed.as_str()).await.expect("the store through the relay");
    let options = options(&bus);
    let mut run = start_on(bus, store, bridge_store, options).await;

    relay.cut();
    let request = run.store_plan("during-outage").await;
    // Abandoned at least once: Service Bus counts the deliveries.
    let mut delivered = 0;
    for _ in 0..2400 {
        delivered = run.bus.active_messages(QUEUE).iter().map(|m| m.delivery_count).max().unwrap_or(0);
        if delivered >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(delivered >= 3, "the command was given back and delivered again while the store was down");
    assert!(run.bus.active_messages(REPLIES).is_empty(), "no reply while the store is down");
    relay.restore();
    let (_, reply) = run.reply_in(REPLIES, request).await;
    assert_eq!(reply["message"], json!({"errors": []}));
    wait_until_empty(&run.bus, QUEUE).await;
    assert!(run.bus.dead_letters(QUEUE).is_empty(), "a transient failure is not dead-lettered");
    let (store, _bus) = run.stop().await;
    assert_eq!(store.version_log().await.unwrap().len(), 1, "applied once");
}
