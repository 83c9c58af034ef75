//! The chaos client on Kafka: produces commands (raw JSON with Firely's headers) with an idempotent
//! producer, producing a command again (same MessageId) until the broker acknowledges it and taking
//! a new producer after a failure, and reads the reply topic and both event topics.
//!
//! A record read twice by this client (same topic, partition and offset, e.g. after its consumer
//! group rebalanced when the broker came back) is counted once: the repeats the report counts are
//! records the bridge wrote more than once.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use tokio::sync::mpsc;
use uuid::Uuid;

use fhir_pubsub::contracts::MessageType;
use fhir_pubsub::transport::TransportMeta;

use super::workload::Command;
use super::{Collected, CommandSender};

/// The topics of one run.
#[derive(Debug, Clone)]
pub struct Topics {
    pub prefix: String,
    pub store: String,
    pub retrieve: String,
    pub errors: String,
    pub replies: String,
    pub full: String,
    pub light: String,
}

impl Topics {
    pub fn new() -> Topics {
        let prefix = format!("chaos{}", Uuid::new_v4().simple());
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

    pub fn all(&self) -> Vec<&str> {
        vec![&self.store, &self.retrieve, &self.errors, &self.replies, &self.full, &self.light]
    }
}

pub struct KafkaClient {
    config: ClientConfig,
    producer: Arc<std::sync::Mutex<FutureProducer>>,
    /// Produce attempts the broker refused (each was produced again).
    pub refused: Arc<AtomicU64>,
    producing: Vec<tokio::task::JoinHandle<()>>,
    topics: Topics,
    consumer: tokio::task::JoinHandle<()>,
}

fn idempotent(config: &ClientConfig) -> FutureProducer {
    config.clone().set("enable.idempotence", "true").create().expect("producer")
}

impl KafkaClient {
    pub fn start(
        config: ClientConfig,
        topics: Topics,
        collected: Arc<Collected>,
        tag: &str,
        first_replies: mpsc::UnboundedSender<(Uuid, Value)>,
    ) -> KafkaClient {
        let consumer: StreamConsumer = config
            .clone()
            .set("group.id", format!("chaos-client-{}", Uuid::new_v4().simple()))
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&[&topics.replies, &topics.full, &topics.light]).expect("subscribe");
        let (replies, full, light, tag) =
            (topics.replies.clone(), topics.full.clone(), topics.light.clone(), tag.to_owned());
        let task = tokio::spawn(async move {
            let mut seen: HashSet<(String, i32, i64)> = HashSet::new();
            loop {
                let Ok(record) = consumer.recv().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                if !seen.insert((record.topic().to_owned(), record.partition(), record.offset())) {
                    continue;
                }
                let headers: Vec<(String, String)> = record
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                let value =
                                    h.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
                                (h.key.to_owned(), value)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let payload = record.payload().unwrap_or_default();
                if record.topic() == replies {
                    let id = headers
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("RequestId"))
                        .and_then(|(_, v)| v.parse::<Uuid>().ok());
                    let message: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
                    // A reply is the bare message, or an envelope holding it.
                    let message = if message.get("message").is_some() { message["message"].clone() } else { message };
                    if let Some(id) = id {
                        if collected.reply(id, message.clone()) {
                            let _ = first_replies.send((id, message));
                        }
                    }
                } else {
                    let type_hint = if record.topic() == full {
                        Some(MessageType::ResourcesChangedEvent)
                    } else if record.topic() == light {
                        Some(MessageType::ResourcesChangedLightEvent)
                    } else {
                        None
                    };
                    let headers = headers.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
                    let meta = TransportMeta { headers, type_hint, ..TransportMeta::default() };
                    collected.event(payload, &meta, &tag);
                }
            }
        });
        KafkaClient {
            producer: Arc::new(std::sync::Mutex::new(idempotent(&config))),
            refused: Arc::default(),
            producing: Vec::new(),
            config,
            topics,
            consumer: task,
        }
    }

    fn reply_address(&self) -> String {
        format!("kafka://kafka-broker:9092/{}?type=topic", self.topics.replies)
    }

    pub fn close(self) {
        self.consumer.abort();
        for task in self.producing {
            task.abort();
        }
    }
}

/// Produces one command until the broker acknowledges it, taking a new producer after a failure.
async fn produce(
    producer: Arc<std::sync::Mutex<FutureProducer>>,
    config: ClientConfig,
    topic: String,
    body: String,
    id: String,
    address: String,
    refused: Arc<AtomicU64>,
) {
    loop {
        let mut headers = OwnedHeaders::new();
        for (k, v) in
            [("MessageId", id.as_str()), ("RequestId", &id), ("fhir-release", "R4"), ("ResponseAddress", &address)]
        {
            headers = headers.insert(Header { key: k, value: Some(v) });
        }
        let record = FutureRecord::<str, str>::to(&topic).payload(&body).headers(headers);
        let current = producer.lock().unwrap().clone();
        match current.send(record, Duration::from_secs(30)).await {
            Ok(_) => return,
            Err(_) => {
                refused.fetch_add(1, Ordering::Relaxed);
                // The broker may come back behind the producer's sequence: a new producer.
                *producer.lock().unwrap() = idempotent(&config);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

#[async_trait::async_trait]
impl CommandSender for KafkaClient {
    /// Hands the command to a task that produces it until acknowledged (so commands are produced
    /// concurrently, as a client with many requests in flight does); refusals are counted there.
    async fn send(&mut self, command: &Command) -> u32 {
        let task = tokio::spawn(produce(
            self.producer.clone(),
            self.config.clone(),
            self.topics.store.clone(),
            command.message.to_string(),
            command.id.to_string(),
            self.reply_address(),
            self.refused.clone(),
        ));
        self.producing.push(task);
        self.producing.retain(|t| !t.is_finished());
        0
    }
}
