//! Change events end to end: the publisher against the real RabbitMQ, on PostgreSQL and SQLite, with a
//! consumer bound to the two event exchanges; and the committed-changes check again over Kafka (a
//! tansu broker of the test's own) and over Service Bus (the Service Bus test double of
//! `tests/servicebus_broker`, not Microsoft's service).
//!
//! The event exchanges are shared by every bridge on the broker, so each test names its resources with a
//! tag of its own and keeps only the messages about them.

mod amqp_support;
mod bridge_process;
mod common;
mod event_sink;
#[cfg(feature = "kafka")]
mod kafka_support;
#[cfg(feature = "servicebus")]
mod servicebus_broker;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bridge_process::BridgeProcess;

use event_sink::{ChangeKey, EventSink, key_of};
use fhir_pubsub::config::ResourceChangeNotificationSettings;
use fhir_pubsub::contracts::read::{self, StorePlanMessage};
use fhir_pubsub::contracts::{ChangeType, MessageType};
use fhir_pubsub::plan::{PlanLimits, StoreJob, execute_store_plans, validate_store_plan};
use fhir_pubsub::publisher::Publisher;
use fhir_pubsub::store::Store;
use fhir_pubsub::transport::Transport;
use fhir_pubsub::transport::rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use serde_json::json;
use tokio::sync::{Notify, watch};
use uuid::Uuid;

fn sorted(mut keys: Vec<ChangeKey>) -> Vec<ChangeKey> {
    keys.sort_by(|a, b| (&a.0, &a.1, a.2.as_str()).cmp(&(&b.0, &b.1, b.2.as_str())));
    keys
}

fn event_settings(batch: u32, polling_seconds: u64) -> ResourceChangeNotificationSettings {
    ResourceChangeNotificationSettings {
        send_full_events: true,
        send_light_events: true,
        max_publish_batch_size: batch,
        polling_interval_seconds: polling_seconds,
        ..ResourceChangeNotificationSettings::default()
    }
}

fn patient(id: &str, version: &str, family: &str) -> String {
    json!({"resourceType": "Patient", "id": id, "meta": {"versionId": version, "lastUpdated": "2024-01-01T00:00:00Z"},
           "name": [{"family": family}]})
    .to_string()
}

/// Applies one plan given as instruction objects; true when it was applied.
async fn apply(store: &dyn Store, instructions: Vec<serde_json::Value>) -> bool {
    let text = json!({ "instructions": instructions }).to_string();
    let raw = fhir_pubsub::json::parse_lenient(&text).unwrap();
    let StorePlanMessage::Instructions(list) = read::store_plan(&raw).unwrap() else { panic!("inline plan") };
    let job = StoreJob { message_id: Some(Uuid::new_v4()), plan: validate_store_plan(list, &PlanLimits::default()) };
    execute_store_plans(store, &[job]).await.expect("store reachable").remove(0).response.errors.is_empty()
}

/// `count` upserts of new resources `<tag>-<n>`, in plans of three.
async fn write_new(store: &dyn Store, tag: &str, from: usize, count: usize) {
    for chunk in (from..from + count).collect::<Vec<_>>().chunks(3) {
        let instructions = chunk
            .iter()
            .map(|n| json!({"itemId": n.to_string(), "operation": "upsert", "resource": patient(&format!("{tag}-{n}"), "1", "N")}))
            .collect();
        assert!(apply(store, instructions).await);
    }
}

/// 8 writers on 12 shared resources for 3 s: creates, updates, deletes, version conflicts and plans
/// designed to fail. Returns the versions written by plans that failed.
async fn concurrent_writers(store: Arc<dyn Store>, waker: Arc<Notify>, tag: &str) -> HashSet<String> {
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let (store, waker, tag) = (store.clone(), waker.clone(), tag.to_owned());
        writers.push(tokio::spawn(async move {
            let mut failed = HashSet::new();
            let mut rng = (w + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = move |m: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % m
            };
            let started = Instant::now();
            let mut n = 0;
            while started.elapsed() < Duration::from_secs(3) {
                n += 1;
                let mut ids: Vec<u64> = (0..1 + next(3)).map(|_| next(12)).collect();
                ids.sort_unstable();
                ids.dedup();
                let mut instructions = Vec::new();
                let mut versions = Vec::new();
                for i in ids {
                    let id = format!("{tag}-{i}");
                    let version = format!("w{w}-{n}-{i}");
                    let current = store
                        .read(&[fhir_pubsub::store::Lookup {
                            key: fhir_pubsub::store::ResourceKey::new("Patient", &id),
                            version_id: None,
                        }])
                        .await
                        .unwrap()
                        .remove(0);
                    let current = match current {
                        fhir_pubsub::store::Found::Resource(body) => Some(
                            serde_json::from_str::<serde_json::Value>(&body).unwrap()["meta"]["versionId"]
                                .as_str()
                                .unwrap()
                                .to_owned(),
                        ),
                        _ => None,
                    };
                    match current {
                        Some(cur) if next(4) == 0 => instructions.push(json!({"itemId": id, "operation": "delete",
                            "resourceType": "Patient", "resourceId": id, "currentVersion": cur})),
                        cur => {
                            versions.push(version.clone());
                            instructions.push(json!({"itemId": id, "operation": "upsert", "currentVersion": cur,
                                "resource": patient(&id, &version, "U")}))
                        }
                    }
                }
                if next(10) == 0 {
                    instructions.push(json!({"itemId": "doomed", "operation": "update",
                        "resource": patient(&format!("{tag}-never-there"), "1", "X")}));
                }
                if apply(store.as_ref(), instructions).await {
                    waker.notify_one();
                } else {
                    failed.extend(versions);
                }
            }
            failed
        }));
    }
    let mut failed = HashSet::new();
    for w in writers {
        failed.extend(w.await.unwrap());
    }
    failed
}

async fn rabbitmq_transport() -> Arc<dyn Transport> {
    let options = RabbitMqOptions {
        host: "127.0.0.1".into(),
        queue_name: format!("fhir-pubsub-test-{}", Uuid::new_v4().simple()),
        ..RabbitMqOptions::default()
    };
    Arc::new(RabbitMqTransport::connect(options).await.expect("RabbitMQ"))
}

/// Concurrent writers with conflicts and rolled-back plans: the events carry exactly the committed
/// changes, per resource in version order, never more than MaxPublishBatchSize per message.
async fn events_equal_the_committed_changes(store: &common::TestStore) {
    let tag = format!("t{}", Uuid::new_v4().simple());
    let sink = EventSink::start(&tag).await;
    let transport = rabbitmq_transport().await;
    check_events_equal_the_committed_changes(store, transport, &sink, &tag).await;
}
both_stores!(committed_changes, events_equal_the_committed_changes);

/// The same over Kafka (tansu, event topics of 3 partitions): besides, each record carries one
/// resource's changes and is keyed by it, and one resource's records all share a partition.
#[cfg(feature = "kafka")]
async fn kafka_events_equal_the_committed_changes(store: &common::TestStore) {
    use fhir_pubsub::transport::kafka::{KafkaOptions, KafkaTransport};
    let tansu = kafka_support::Tansu::start().await;
    let tag = format!("t{}", Uuid::new_v4().simple());
    let (full, light) = (format!("{tag}.full"), format!("{tag}.light"));
    let prefix = format!("{tag}.commands");
    let commands = [
        format!("{prefix}.ExecuteStorePlanCommand"),
        format!("{prefix}.RetrievePlanCommand"),
        format!("{prefix}.ExecuteStorePlanCommand.Errors"),
    ];
    tansu.create_topics(&[&full, &light], 3).await;
    tansu.create_topics(&commands.iter().map(String::as_str).collect::<Vec<_>>(), 1).await;
    let options = KafkaOptions {
        bootstrap_servers: tansu.bootstrap(),
        topic_prefix: prefix.clone(),
        error_topic: commands[2].clone(),
        full_event_topic: full.clone(),
        light_event_topic: light.clone(),
        full_events: true,
        light_events: true,
        ..KafkaOptions::default()
    };
    let transport: Arc<dyn Transport> = Arc::new(KafkaTransport::connect(options).await.expect("Kafka"));
    let sink = EventSink::start_kafka(&tansu.bootstrap(), &full, &light, &tag).await;
    check_events_equal_the_committed_changes(store, transport, &sink, &tag).await;
    for message_type in [MessageType::ResourcesChangedEvent, MessageType::ResourcesChangedLightEvent] {
        let mut partition_of: HashMap<String, i32> = HashMap::new();
        for message in sink.messages(message_type) {
            let key = message.key.clone().expect("a keyed record");
            assert!(message.changes.iter().all(|c| c.0.0 == key), "{key}: a record mixes resources");
            let partition = message.partition.expect("a partition");
            assert_eq!(*partition_of.entry(key.clone()).or_insert(partition), partition, "{key}: two partitions");
        }
        let partitions: HashSet<i32> = partition_of.values().copied().collect();
        assert!(partitions.len() > 1, "12 resources over 3 partitions use more than one: {partitions:?}");
    }
}
#[cfg(feature = "kafka")]
both_stores!(committed_changes_on_kafka, kafka_events_equal_the_committed_changes);

/// The same over Service Bus: the publisher sends to the event topics of a Service Bus test double,
/// whose subscriptions forward to queues the sink looks into.
#[cfg(feature = "servicebus")]
async fn servicebus_events_equal_the_committed_changes(store: &common::TestStore) {
    use fhir_pubsub::config::ServiceBusConnectionString;
    use fhir_pubsub::transport::servicebus::{ServiceBusOptions, ServiceBusTransport};
    let bus = Arc::new(servicebus_broker::TestServiceBus::start().await);
    let ns = "Firely.Server.Contracts.Messages.V1~";
    bus.create_queue("firelyserver");
    for command in ["ExecuteStorePlanCommand", "RetrievePlanCommand"] {
        bus.create_topic(&format!("{ns}{command}"));
        bus.create_subscription(&format!("{ns}{command}"), "FirelyServer", Some("firelyserver"));
    }
    let queues = [
        (MessageType::ResourcesChangedEvent, "full-events"),
        (MessageType::ResourcesChangedLightEvent, "light-events"),
    ];
    for (message_type, queue) in queues {
        let topic = format!("{ns}{}", message_type.as_str());
        bus.create_queue(queue);
        bus.create_topic(&topic);
        bus.create_subscription(&topic, "test", Some(queue));
    }
    let connection_string = format!("{};UseDevelopmentEmulator=true", bus.connection_string());
    let options = ServiceBusOptions {
        connection: ServiceBusConnectionString::parse(&connection_string).expect("the test broker's connection string"),
        connection_string,
        application_queue_name: "FirelyServer".into(),
        namespace_separator: "~".into(),
        prefetch: 16,
        use_error_queues: false,
        full_events: true,
        light_events: true,
        retry_delay: Duration::from_millis(200),
    };
    let transport: Arc<dyn Transport> = Arc::new(ServiceBusTransport::connect(options).await.expect("Service Bus"));
    let tag = format!("t{}", Uuid::new_v4().simple());
    let looked_into = bus.clone();
    let sink = EventSink::start_polling(&tag, move || {
        queues
            .iter()
            .map(|(message_type, queue)| {
                looked_into.active_messages(queue).into_iter().map(|m| (*message_type, m.body)).collect()
            })
            .collect()
    });
    check_events_equal_the_committed_changes(store, transport, &sink, &tag).await;
}
#[cfg(feature = "servicebus")]
both_stores!(committed_changes_on_servicebus, servicebus_events_equal_the_committed_changes);

/// Runs concurrent writers and checks the events `sink` got against the version log.
async fn check_events_equal_the_committed_changes(
    store: &common::TestStore,
    transport: Arc<dyn Transport>,
    sink: &EventSink,
    tag: &str,
) {
    let publisher = Arc::new(Publisher::new(store.store.clone(), transport.clone(), event_settings(5, 5)));
    let (stop, stopped) = watch::channel(false);
    let publishing = tokio::spawn(publisher.clone().run(stopped));

    let failed = concurrent_writers(store.store.clone(), publisher.waker(), tag).await;
    let log = store.version_log().await.unwrap();
    assert!(log.len() > 50, "the writers committed too little to prove anything: {}", log.len());
    assert!(!failed.is_empty(), "the test must roll plans back");
    sink.wait_for(&log, Duration::from_secs(30)).await;
    let _ = stop.send(true);
    publishing.await.unwrap();

    for message_type in [MessageType::ResourcesChangedEvent, MessageType::ResourcesChangedLightEvent] {
        let messages = sink.messages(message_type);
        assert!(messages.iter().all(|m| !m.changes.is_empty() && m.changes.len() <= 5), "a batch above 5 changes");
        let ids: HashSet<Uuid> = messages.iter().map(|m| m.message_id).collect();
        assert_eq!(ids.len(), messages.len(), "messageIds are unique without a crash");
        let changes = sink.changes(message_type);
        let keys: Vec<ChangeKey> = changes.iter().map(|c| c.0.clone()).collect();
        // Each committed change exactly once, nothing else.
        let expected = sorted(log.iter().map(key_of).collect());
        assert_eq!(sorted(keys.clone()), expected, "{message_type:?}: the events differ from the committed changes");
        assert!(keys.iter().all(|k| k.2 == ChangeType::Delete || !failed.contains(&k.1)), "a rolled-back change");
        // Per resource, the order of the log (commit order).
        let mut per_resource: HashMap<&str, Vec<&ChangeKey>> = HashMap::new();
        for k in &keys {
            per_resource.entry(k.0.as_str()).or_default().push(k);
        }
        let log_keys: Vec<ChangeKey> = log.iter().map(key_of).collect();
        for (resource, seen) in per_resource {
            let logged: Vec<&ChangeKey> = log_keys.iter().filter(|k| k.0 == resource).collect();
            assert_eq!(seen, logged, "{message_type:?}: {resource} out of order");
        }
        if message_type == MessageType::ResourcesChangedEvent {
            let bodies: HashMap<ChangeKey, Option<String>> = log.iter().map(|c| (key_of(c), c.body.clone())).collect();
            for (key, resource) in &changes {
                assert_eq!(
                    resource, &bodies[key],
                    "{key:?}: the full event must carry the stored body (null for a delete)"
                );
            }
        } else {
            assert!(changes.iter().all(|c| c.1.is_none()), "light events carry no resource");
        }
    }
    assert_eq!(store.outbox_state().await.unwrap().pending, 0, "the outbox is empty once everything is confirmed");
    transport.close().await;
}

const LEADING: &str = "this process publishes the change events";
const PAUSED: &str = "publisher paused for fault injection";

/// The publisher killed with SIGKILL before publishing, between the messages of a claim, and after
/// publishing but before the outbox moved: after a restart no change is missing, and a change that
/// came twice came in the same message (same messageId, same content).
async fn sigkill_loses_nothing(store: &common::TestStore) {
    let tag = format!("k{}", Uuid::new_v4().simple());
    let queue = format!("fhir-pubsub-test-{}", Uuid::new_v4().simple());
    let sink = EventSink::start(&tag).await;
    let mut written = 0;
    for point in ["before-publish", "mid-batch", "after-publish"] {
        write_new(store.store.as_ref(), &tag, written, 12).await;
        written += 12;
        let mut bridge = BridgeProcess::start(&store.url, &queue, Some(point));
        assert!(
            bridge.wait_logged(PAUSED, Duration::from_secs(30)).await,
            "{point}: never paused: {}",
            bridge.log_text()
        );
        bridge.kill();
    }
    let mut bridge = BridgeProcess::start(&store.url, &queue, None);
    let log = store.version_log().await.unwrap();
    assert_eq!(log.len(), written);
    sink.wait_for(&log, Duration::from_secs(30)).await;
    assert_eq!(bridge.terminate(), Some(0), "SIGTERM stops the bridge cleanly");

    for message_type in [MessageType::ResourcesChangedEvent, MessageType::ResourcesChangedLightEvent] {
        let messages = sink.messages(message_type);
        let got: HashSet<ChangeKey> = messages.iter().flat_map(|m| m.changes.iter().map(|c| c.0.clone())).collect();
        let want: HashSet<ChangeKey> = log.iter().map(key_of).collect();
        assert_eq!(got, want, "{message_type:?}: a change is missing after the crashes");
        // Same messageId, same content; a change seen twice was in one and the same message.
        let mut by_id: HashMap<Uuid, Vec<ChangeKey>> = HashMap::new();
        let mut carriers: HashMap<ChangeKey, HashSet<Uuid>> = HashMap::new();
        for m in &messages {
            let content: Vec<ChangeKey> = m.changes.iter().map(|c| c.0.clone()).collect();
            if let Some(earlier) = by_id.insert(m.message_id, content.clone()) {
                assert_eq!(earlier, content, "a repeated messageId with other content");
            }
            for c in content {
                carriers.entry(c).or_default().insert(m.message_id);
            }
        }
        assert!(
            carriers.values().all(|ids| ids.len() == 1),
            "{message_type:?}: a change came in two different messages"
        );
        let repeats = messages.len() - by_id.len();
        assert!(
            repeats > 0,
            "{message_type:?}: killing after publishing must cause repeats (the test proves nothing otherwise)"
        );
    }
}
both_stores!(sigkill, sigkill_loses_nothing);

/// A row written by plain SQL (psql, sqlite3), not through the bridge, produces its events.
async fn foreign_sql_writes_are_published(store: &common::TestStore) {
    let tag = format!("f{}", Uuid::new_v4().simple());
    let sink = EventSink::start(&tag).await;
    let transport = rabbitmq_transport().await;
    let publisher = Arc::new(Publisher::new(store.store.clone(), transport.clone(), event_settings(100, 1)));
    let (stop, stopped) = watch::channel(false);
    let publishing = tokio::spawn(publisher.clone().run(stopped));
    let body = patient(&tag, "v1", "Foreign").replace('\'', "''");
    let sql = format!(
        "INSERT INTO resources (resource_type, resource_id, version_id, last_updated, body) \
         VALUES ('Patient', '{tag}', 'v1', '2024-01-01T00:00:00Z', '{body}'); \
         UPDATE resources SET version_id = 'v2', body = replace(body, '\"v1\"', '\"v2\"') WHERE resource_id = '{tag}'; \
         DELETE FROM resources WHERE resource_id = '{tag}';"
    );
    let status = if let Some(path) = store.url.strip_prefix("sqlite://") {
        Command::new("sqlite3").arg("-cmd").arg(".timeout 10000").arg(path).arg(&sql).status()
    } else {
        Command::new("psql").arg(&store.url).arg("-v").arg("ON_ERROR_STOP=1").arg("-qc").arg(&sql).status()
    }
    .expect("run the SQL shell");
    assert!(status.success());
    let log = store.version_log().await.unwrap();
    assert_eq!(log.len(), 3, "insert, update and delete each recorded");
    // No wake-up from the bridge here: only the poll (and PostgreSQL's NOTIFY) can find these.
    sink.wait_for(&log, Duration::from_secs(20)).await;
    let got: Vec<ChangeKey> = sink.changes(MessageType::ResourcesChangedEvent).into_iter().map(|c| c.0).collect();
    let key = format!("Patient/{tag}");
    assert_eq!(
        got,
        vec![
            (key.clone(), "v1".to_owned(), ChangeType::Create),
            (key.clone(), "v2".to_owned(), ChangeType::Update),
            (key, "v2".to_owned(), ChangeType::Delete),
        ]
    );
    let _ = stop.send(true);
    publishing.await.unwrap();
    transport.close().await;
}
both_stores!(foreign_sql, foreign_sql_writes_are_published);

/// With both event kinds off (Firely's default) the publisher sends nothing and drains the outbox,
/// so it does not grow; the versions stay in the log, and a shutdown drains what is left.
async fn events_off_drains_the_outbox_unpublished(store: &common::TestStore) {
    let tag = format!("o{}", Uuid::new_v4().simple());
    let sink = EventSink::start(&tag).await;
    let transport = rabbitmq_transport().await;
    let settings = ResourceChangeNotificationSettings {
        send_full_events: false,
        send_light_events: false,
        ..event_settings(100, 1)
    };
    let publisher = Arc::new(Publisher::new(store.store.clone(), transport.clone(), settings));
    let stats = publisher.stats();
    let (stop, stopped) = watch::channel(false);
    let publishing = tokio::spawn(publisher.clone().run(stopped));
    write_new(store.store.as_ref(), &tag, 0, 20).await;
    let log = store.version_log().await.unwrap();
    assert_eq!(log.len(), 20);
    let drained = || stats.changes_published.load(std::sync::atomic::Ordering::Relaxed);
    common::eventually("the publisher drained 20 changes", Duration::from_secs(10), || drained() >= 20).await;
    assert_eq!(drained(), 20);
    assert!(store.pending_changes(1).await.unwrap().is_empty(), "the outbox is empty once they are counted");

    // Written just before the stop: drained by the shutdown, not left for the next start.
    write_new(store.store.as_ref(), &tag, 20, 5).await;
    let _ = stop.send(true);
    publishing.await.unwrap();
    assert!(store.pending_changes(10).await.unwrap().is_empty(), "the shutdown drains the rest");
    assert_eq!(store.version_log().await.unwrap().len(), 25, "every version stays in the log");
    // An event would have been confirmed before its change left the outbox; allow for delivery.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for message_type in [MessageType::ResourcesChangedEvent, MessageType::ResourcesChangedLightEvent] {
        assert!(sink.messages(message_type).is_empty(), "{message_type:?} published with events off");
    }
    transport.close().await;
}
both_stores!(events_off, events_off_drains_the_outbox_unpublished);

/// Two bridge processes on one store: one publishes, each change goes out once; killing it hands over.
async fn two_processes_one_publisher(store: &common::TestStore) {
    let tag = format!("l{}", Uuid::new_v4().simple());
    let queue = format!("fhir-pubsub-test-{}", Uuid::new_v4().simple());
    let sink = EventSink::start(&tag).await;
    let mut first = BridgeProcess::start(&store.url, &queue, None);
    assert!(first.wait_logged(LEADING, Duration::from_secs(30)).await, "the first process never leads");
    let mut second = BridgeProcess::start(&store.url, &queue, None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!second.logged(LEADING), "two publishers at once");

    write_new(store.store.as_ref(), &tag, 0, 30).await;
    let log = store.version_log().await.unwrap();
    sink.wait_for(&log, Duration::from_secs(30)).await;
    let once = sorted(sink.changes(MessageType::ResourcesChangedEvent).into_iter().map(|c| c.0).collect());
    assert_eq!(once, sorted(log.iter().map(key_of).collect()), "each change published once, by one process");

    first.kill();
    assert!(second.wait_logged(LEADING, Duration::from_secs(30)).await, "the second process never took over");
    write_new(store.store.as_ref(), &tag, 30, 30).await;
    let log = store.version_log().await.unwrap();
    sink.wait_for(&log, Duration::from_secs(30)).await;
    let got: HashSet<ChangeKey> = sink.changes(MessageType::ResourcesChangedEvent).into_iter().map(|c| c.0).collect();
    assert_eq!(got, log.iter().map(key_of).collect::<HashSet<_>>(), "after the handover every change is published");
    assert_eq!(second.terminate(), Some(0));
}
both_stores!(two_processes, two_processes_one_publisher);
