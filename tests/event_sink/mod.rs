//! A consumer of the two change-event exchanges, for the tests and the benchmark: it keeps the event
//! messages about resources whose id starts with a tag (the exchanges are shared by every bridge on the
//! broker), with their messageId, arrival time and changes.
//! Its includer declares `mod amqp_support;` (the RabbitMQ set-up helpers it uses).
#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fhir_pubsub::contracts::read;
use fhir_pubsub::contracts::{ChangeType, MessageType};
use fhir_pubsub::store::PendingChange;
use fhir_pubsub::transport::TransportMeta;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use uuid::Uuid;

pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// (Type/id, version, change type)
pub type ChangeKey = (String, String, ChangeType);

/// One event message as the consumer got it.
#[derive(Debug, Clone)]
pub struct Received {
    pub message_type: MessageType,
    pub message_id: Uuid,
    /// When the consumer got it.
    pub arrived_at: chrono::DateTime<chrono::Utc>,
    pub changes: Vec<(ChangeKey, Option<String>)>,
    /// The Kafka record's key and partition (RabbitMQ messages have neither).
    pub key: Option<String>,
    pub partition: Option<i32>,
}

/// A consumer of both event exchanges keeping the messages about resources whose id starts with `tag`.
pub struct EventSink {
    received: Arc<Mutex<Vec<Received>>>,
    _connection: Option<Connection>,
    consumer_task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for EventSink {
    fn drop(&mut self) {
        if let Some(task) = self.consumer_task.take() {
            task.abort();
        }
    }
}

/// Keeps an event message if it is about a resource tagged `tag`.
fn keep(
    sink: &Mutex<Vec<Received>>,
    tag: &str,
    body: &[u8],
    meta: &TransportMeta,
    key: Option<String>,
    partition: Option<i32>,
) {
    let arrived_at = chrono::Utc::now();
    let envelope = fhir_pubsub::envelope::decode(body, meta).expect("an envelope or a bare event");
    let message_type = envelope.message_kind().expect("a known event type");
    let changes = read::changes(envelope.message.as_deref().expect("a message")).expect("changes");
    if !changes.iter().any(|c| c.reference.resource_id.starts_with(tag)) {
        return;
    }
    let changes = changes
        .into_iter()
        .map(|c| {
            let key = format!("{}/{}", c.reference.resource_type, c.reference.resource_id);
            ((key, c.reference.version.unwrap_or_default(), c.change_type), c.resource)
        })
        .collect();
    let message_id = envelope.message_id.expect("a messageId");
    sink.lock().unwrap().push(Received { message_type, message_id, arrived_at, changes, key, partition });
}

impl EventSink {
    pub async fn start(tag: &str) -> EventSink {
        let connection = Connection::connect(AMQP, ConnectionProperties::default()).await.expect("RabbitMQ");
        let channel = connection.create_channel().await.unwrap();
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        for message_type in [MessageType::ResourcesChangedEvent, MessageType::ResourcesChangedLightEvent] {
            let exchange = message_type.exchange();
            crate::amqp_support::durable_fanout(&channel, &exchange).await;
            crate::amqp_support::bind(&channel, queue.name().as_str(), &exchange).await;
        }
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let (sink, tag) = (received.clone(), tag.to_owned());
        let consumer_task = tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                keep(&sink, &tag, &delivery.data, &TransportMeta::default(), None, None);
            }
        });
        EventSink { received, _connection: Some(connection), consumer_task: Some(consumer_task) }
    }

    /// A consumer of the two Kafka event topics (from their start), keeping the records about
    /// resources whose id starts with `tag`, with their keys and partitions.
    #[cfg(feature = "kafka")]
    pub async fn start_kafka(bootstrap: &str, full_topic: &str, light_topic: &str, tag: &str) -> EventSink {
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::message::{Headers, Message};
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("event-sink-{}", Uuid::new_v4().simple()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .expect("Kafka consumer");
        consumer.subscribe(&[full_topic, light_topic]).expect("subscribe");
        let types = [
            (full_topic.to_owned(), MessageType::ResourcesChangedEvent),
            (light_topic.to_owned(), MessageType::ResourcesChangedLightEvent),
        ];
        let received = Arc::new(Mutex::new(Vec::new()));
        let (sink, tag) = (received.clone(), tag.to_owned());
        let consumer_task = tokio::spawn(async move {
            loop {
                let Ok(record) = consumer.recv().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let headers = record
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                let value =
                                    h.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
                                (h.key.to_owned(), serde_json::Value::String(value))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let type_hint = types.iter().find(|(t, _)| t == record.topic()).map(|(_, m)| *m);
                let meta = TransportMeta { headers, type_hint, ..TransportMeta::default() };
                let key = record.key().map(|k| String::from_utf8_lossy(k).into_owned());
                keep(&sink, &tag, record.payload().unwrap_or_default(), &meta, key, Some(record.partition()));
            }
        });
        EventSink { received, _connection: None, consumer_task: Some(consumer_task) }
    }

    /// A sink fed by polling `snapshot`, which returns, per source (a queue, say), every event
    /// message it received so far (type and body) in arrival order, never fewer than before: for a
    /// broker the test can look into without consuming, such as the Service Bus test double.
    pub fn start_polling<F>(tag: &str, snapshot: F) -> EventSink
    where
        F: Fn() -> Vec<Vec<(MessageType, Vec<u8>)>> + Send + 'static,
    {
        let received = Arc::new(Mutex::new(Vec::new()));
        let (sink, tag) = (received.clone(), tag.to_owned());
        let consumer_task = tokio::spawn(async move {
            let mut seen: Vec<usize> = Vec::new();
            loop {
                for (source, messages) in snapshot().iter().enumerate() {
                    if seen.len() <= source {
                        seen.resize(source + 1, 0);
                    }
                    for (message_type, body) in messages.iter().skip(seen[source]) {
                        let meta = TransportMeta { type_hint: Some(*message_type), ..TransportMeta::default() };
                        keep(&sink, &tag, body, &meta, None, None);
                    }
                    seen[source] = seen[source].max(messages.len());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        EventSink { received, _connection: None, consumer_task: Some(consumer_task) }
    }

    pub fn messages(&self, message_type: MessageType) -> Vec<Received> {
        self.received.lock().unwrap().iter().filter(|m| m.message_type == message_type).cloned().collect()
    }

    /// The changes of all messages of a type, in arrival order.
    pub fn changes(&self, message_type: MessageType) -> Vec<(ChangeKey, Option<String>)> {
        self.messages(message_type).into_iter().flat_map(|m| m.changes).collect()
    }

    /// Waits until both event types carried every change of `log` (at most `limit`).
    pub async fn wait_for(&self, log: &[PendingChange], limit: Duration) {
        let want: HashSet<ChangeKey> = log.iter().map(key_of).collect();
        let started = Instant::now();
        while started.elapsed() < limit {
            let full: HashSet<ChangeKey> =
                self.changes(MessageType::ResourcesChangedEvent).into_iter().map(|c| c.0).collect();
            let light: HashSet<ChangeKey> =
                self.changes(MessageType::ResourcesChangedLightEvent).into_iter().map(|c| c.0).collect();
            if want.is_subset(&full) && want.is_subset(&light) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn key_of(c: &PendingChange) -> ChangeKey {
    (c.key.to_string(), c.version_id.clone(), c.change_type)
}
