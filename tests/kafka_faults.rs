//! Faults tansu cannot stage, on librdkafka's in-process mock cluster (a mock: the real-broker
//! suite is `bridge_kafka.rs`): a reply that cannot be delivered keeps its command's offset
//! uncommitted, and holds back the offsets of the commands after it in the partition, until the
//! reply went out; the command is then answered and applied once.
#![cfg(feature = "kafka")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use fhir_pubsub::bridge::{Bridge, BridgeOptions};
use fhir_pubsub::transport::Transport;
use fhir_pubsub::transport::kafka::{KafkaOptions, KafkaTransport};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::{MockCluster, MockCoordinator};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use tokio::sync::watch;
use uuid::Uuid;

const PREFIX: &str = "Faults";
const STORE_TOPIC: &str = "Faults.ExecuteStorePlanCommand";
const GROUP: &str = "bridge";
/// Led by broker 2, which the test takes down.
const UNREACHABLE_REPLIES: &str = "replies-on-broker-2";
/// Led by broker 1, which stays up.
const REPLIES: &str = "replies-on-broker-1";

struct Bridged {
    transport: Arc<KafkaTransport>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_bridge(bootstrap: &str, store: &common::TestStore) -> Bridged {
    let options = KafkaOptions {
        bootstrap_servers: bootstrap.to_owned(),
        topic_prefix: PREFIX.into(),
        group_id: GROUP.into(),
        error_topic: format!("{PREFIX}.ExecuteStorePlanCommand.Errors"),
        delivery_timeout: Duration::from_secs(2),
        retry_delay: Duration::from_millis(200),
        ..KafkaOptions::default()
    };
    let transport = Arc::new(KafkaTransport::connect(options).await.expect("the bridge connects"));
    let bridge = Arc::new(Bridge::new(store.store.clone(), transport.clone(), BridgeOptions::default()));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move { bridge.run(stopped).await.expect("bridge runs") });
    Bridged { transport, stop, task }
}

impl Bridged {
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        self.transport.close().await;
    }
}

/// Sends a create of `Patient/<id>` answered on `reply_topic`, with RequestId `<id>`'s
/// [`request_id`]; returns its offset.
async fn send(producer: &FutureProducer, id: &str, reply_topic: &str) -> i64 {
    let request = request_id(id);
    let body = json!({"instructions": [{"itemId": "0", "operation": "create", "resource":
        json!({"resourceType": "Patient", "id": id, "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"}}).to_string()}]})
    .to_string();
    let message_id = Uuid::new_v4().to_string();
    let address = format!("kafka://mock/{reply_topic}");
    let headers = OwnedHeaders::new()
        .insert(Header { key: "MessageId", value: Some(message_id.as_str()) })
        .insert(Header { key: "RequestId", value: Some(request.as_str()) })
        .insert(Header { key: "ResponseAddress", value: Some(address.as_str()) });
    let record = FutureRecord::<str, str>::to(STORE_TOPIC).payload(&body).headers(headers);
    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("sent").offset
}

/// The RequestId of the command about `Patient/<id>` (a GUID named after it).
fn request_id(id: &str) -> String {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, id.as_bytes()).to_string()
}

/// The offset committed by the bridge's group for the command partition (-1: none).
fn committed(bootstrap: &str) -> i64 {
    let probe: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", GROUP).create().expect("probe");
    let mut list = TopicPartitionList::new();
    list.add_partition(STORE_TOPIC, 0);
    let list = probe.committed_offsets(list, Duration::from_secs(10)).expect("committed offsets");
    match list.find_partition(STORE_TOPIC, 0).map(|p| p.offset()) {
        Some(Offset::Offset(offset)) => offset,
        _ => -1,
    }
}

/// Which commands the replies on `topic` answer (by their RequestId), waiting until `want` are
/// there (at most 60 s).
async fn replies(bootstrap: &str, topic: &str, want: usize) -> Vec<&'static str> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    // Assigned, not subscribed: no group coordinator (which could be the broker that is down).
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    consumer.assign(&partitions).unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < want {
        // Errors about the broker that is down are reported here too: read on.
        let m = match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Err(_) => break,
            Ok(Err(_)) => continue,
            Ok(Ok(m)) => m,
        };
        let request = m.headers().and_then(|h| h.iter().find(|h| h.key == "RequestId").and_then(|h| h.value));
        let request = String::from_utf8_lossy(request.unwrap_or_default()).into_owned();
        seen.push(["first", "held", "after"].into_iter().find(|id| request_id(id) == request).unwrap_or("?"));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undelivered_reply_holds_back_the_partition_offset_until_it_is_sent_and_the_command_applies_once() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .try_init();
    let cluster = MockCluster::new(2).expect("mock cluster");
    let bootstrap = cluster.bootstrap_servers();
    for topic in [STORE_TOPIC, "Faults.RetrievePlanCommand", "Faults.ExecuteStorePlanCommand.Errors", REPLIES] {
        cluster.create_topic(topic, 1, 1).unwrap();
        cluster.partition_leader(topic, 0, Some(1)).unwrap();
    }
    cluster.create_topic(UNREACHABLE_REPLIES, 1, 1).unwrap();
    cluster.partition_leader(UNREACHABLE_REPLIES, 0, Some(2)).unwrap();
    cluster.coordinator(MockCoordinator::Group(GROUP.into()), 1).unwrap();
    let store = common::TestStore::new(common::Kind::Sqlite).await;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();

    let bridged = start_bridge(&bootstrap, &store).await;
    let first = send(&producer, "first", REPLIES).await;
    assert_eq!(replies(&bootstrap, REPLIES, 1).await, ["first"]);

    // Broker 2 goes down: the next command's reply cannot be delivered; the one after it can.
    cluster.broker_down(2).unwrap();
    let held = send(&producer, "held", UNREACHABLE_REPLIES).await;
    let after = send(&producer, "after", REPLIES).await;
    assert_eq!(replies(&bootstrap, REPLIES, 2).await, ["first", "after"]);
    // The bridge stops (committing what it stored) while the reply is still undeliverable.
    bridged.stop().await;
    let ids: Vec<String> = store.version_log().await.unwrap().iter().map(|c| c.key.resource_id.clone()).collect();
    assert!(ids.contains(&"held".to_owned()), "the command itself was applied: {ids:?}");
    assert_eq!(
        committed(&bootstrap),
        held,
        "committed up to the unanswered command (offset {held}), not past it to {after}, though `after` is done \
         (first was {first})"
    );

    // Broker 2 is back; the next bridge in the group reads from the held command again.
    cluster.broker_up(2).unwrap();
    let bridged = start_bridge(&bootstrap, &store).await;
    assert_eq!(replies(&bootstrap, UNREACHABLE_REPLIES, 1).await, ["held"], "the held command is answered");
    let answered = replies(&bootstrap, REPLIES, 3).await;
    assert_eq!(answered, ["first", "after", "after"], "the command after it is read again and answered again");
    // A reply seen by a reader may still wait for its delivery report; one that misses it goes round
    // again (answered from the inbox). Either way the running bridge commits past both commands.
    common::eventually("the group's committed offset passes both commands", Duration::from_secs(30), || {
        committed(&bootstrap) == after + 1
    })
    .await;
    bridged.stop().await;
    let log = store.version_log().await.unwrap();
    assert_eq!(log.len(), 3, "each command applied once: {log:?}");
    assert_eq!(committed(&bootstrap), after + 1, "still committed after the bridge stopped");
}
