//! A consumer of the two change-event exchanges, for the tests and the benchmark: it keeps the event
//! messages about resources whose id starts with a tag (the exchanges are shared by every bridge on the
//! broker), with their messageId, arrival time and changes.
#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fhir_pubsub::contracts::read;
use fhir_pubsub::contracts::{ChangeType, MessageType};
use fhir_pubsub::store::PendingChange;
use fhir_pubsub::transport::TransportMeta;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
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
}

/// A consumer of both event exchanges keeping the messages about resources whose id starts with `tag`.
pub struct EventSink {
    received: Arc<Mutex<Vec<Received>>>,
    _connection: Connection,
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
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Fanout,
                    ExchangeDeclareOptions { durable: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            channel
                .queue_bind(
                    queue.name().clone(),
                    exchange.as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
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
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let arrived_at = chrono::Utc::now();
                let envelope =
                    fhir_pubsub::envelope::decode(&delivery.data, &TransportMeta::default()).expect("an envelope");
                let message_type = envelope.message_kind().expect("a known event type");
                let changes = read::changes(envelope.message.as_deref().expect("a message")).expect("changes");
                if !changes.iter().any(|c| c.reference.resource_id.starts_with(&tag)) {
                    continue;
                }
                let changes = changes
                    .into_iter()
                    .map(|c| {
                        let key = format!("{}/{}", c.reference.resource_type, c.reference.resource_id);
                        ((key, c.reference.version.unwrap_or_default(), c.change_type), c.resource)
                    })
                    .collect();
                let message_id = envelope.message_id.expect("a messageId");
                sink.lock().unwrap().push(Received { message_type, message_id, arrived_at, changes });
            }
        });
        EventSink { received, _connection: connection }
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
