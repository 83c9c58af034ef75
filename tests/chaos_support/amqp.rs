//! The chaos client on RabbitMQ: sends commands to the bridge's endpoint exchange with publisher
//! confirms, resending a command (same messageId) until the broker confirms it, and collects replies
//! and change events from durable queues of its own, reconnecting whenever the broker goes away.
//!
//! Its queues are durable and expire 120 s after their last consumer left (`x-expires`), so a
//! broker restart keeps what they hold and an aborted run leaves nothing behind for long.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use uuid::Uuid;

use fhir_pubsub::contracts::MessageType;
use fhir_pubsub::transport::TransportMeta;

use super::Collected;
use super::workload::Command;

const STORE_URN: &str = "urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand";

/// The client's names on one broker.
pub struct AmqpClient {
    url: String,
    /// The bridge's application queue (and exchange).
    endpoint: String,
    reply: String,
    events: String,
    publisher: Option<(Connection, Channel)>,
    consumers: Vec<tokio::task::JoinHandle<()>>,
}

fn expiring() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongInt(120_000));
    arguments
}

fn durable_fanout() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() }
}

/// How the client consumes change events.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventConsumer {
    /// Each event message is acknowledged only after this pause (one unacknowledged at a time).
    pub delay: Option<Duration>,
    /// The event queue holds at most this many messages and refuses more (`x-overflow:
    /// reject-publish`): a publisher into a full queue gets nacks and must try again.
    pub max_length: Option<i32>,
}

/// Declares the reply endpoint and the event queue (bound to both event exchanges), says so on
/// `declared`, then consumes both until the connection fails.
#[allow(clippy::too_many_arguments)]
async fn consume_once(
    url: &str,
    reply: &str,
    events: &str,
    options: EventConsumer,
    collected: &Collected,
    tag: &str,
    first_replies: &mpsc::UnboundedSender<(Uuid, Value)>,
    declared: &tokio::sync::watch::Sender<bool>,
) -> Result<(), lapin::Error> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.exchange_declare(reply.into(), ExchangeKind::Fanout, durable_fanout(), FieldTable::default()).await?;
    channel.queue_declare(reply.into(), durable, expiring()).await?;
    channel
        .queue_bind(reply.into(), reply.into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await?;
    let mut event_arguments = expiring();
    if let Some(max) = options.max_length {
        event_arguments.insert("x-max-length".into(), AMQPValue::LongInt(max));
        event_arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    }
    channel.queue_declare(events.into(), durable, event_arguments).await?;
    for message_type in [MessageType::ResourcesChangedEvent, MessageType::ResourcesChangedLightEvent] {
        let exchange = message_type.exchange();
        channel
            .exchange_declare(exchange.as_str().into(), ExchangeKind::Fanout, durable_fanout(), FieldTable::default())
            .await?;
        channel
            .queue_bind(
                events.into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    // Manual acknowledgements after recording: a message is never lost in a dying connection.
    channel.basic_qos(200, BasicQosOptions::default()).await?;
    let mut replies =
        channel.basic_consume(reply.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    let event_channel = connection.create_channel().await?;
    event_channel.basic_qos(if options.delay.is_some() { 1 } else { 200 }, BasicQosOptions::default()).await?;
    let mut event_messages = event_channel
        .basic_consume(events.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let _ = declared.send(true);
    let reading_replies = async {
        while let Some(Ok(delivery)) = replies.next().await {
            if let Ok(envelope) = serde_json::from_slice::<Value>(&delivery.data) {
                if let Some(id) = envelope["requestId"].as_str().and_then(|s| s.parse::<Uuid>().ok()) {
                    if collected.reply(id, envelope["message"].clone()) {
                        let _ = first_replies.send((id, envelope["message"].clone()));
                    }
                }
            }
            if delivery.acker.ack(BasicAckOptions::default()).await.is_err() {
                break;
            }
        }
    };
    let reading_events = async {
        while let Some(Ok(delivery)) = event_messages.next().await {
            collected.event(&delivery.data, &TransportMeta::default(), tag);
            if let Some(delay) = options.delay {
                tokio::time::sleep(delay).await;
            }
            if delivery.acker.ack(BasicAckOptions::default()).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = reading_replies => {}
        _ = reading_events => {}
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

impl AmqpClient {
    /// Starts consuming replies and events on `url` (reconnecting until dropped) and returns once its
    /// queues are declared; commands go to `endpoint`.
    pub async fn start(
        url: &str,
        endpoint: &str,
        options: EventConsumer,
        collected: Arc<Collected>,
        tag: &str,
        first_replies: mpsc::UnboundedSender<(Uuid, Value)>,
    ) -> AmqpClient {
        let suffix = Uuid::new_v4().simple();
        let reply = format!("chaos-reply-{suffix}");
        let events = format!("chaos-events-{suffix}");
        let (declared, mut is_declared) = tokio::sync::watch::channel(false);
        let consumer = {
            let (url, reply, events, tag) = (url.to_owned(), reply.clone(), events.clone(), tag.to_owned());
            tokio::spawn(async move {
                loop {
                    let _ =
                        consume_once(&url, &reply, &events, options, &collected, &tag, &first_replies, &declared).await;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            })
        };
        // Replies sent before the reply queue exists would be dropped by the broker.
        let _ = tokio::time::timeout(Duration::from_secs(60), is_declared.wait_for(|d| *d)).await;
        AmqpClient {
            url: url.to_owned(),
            endpoint: endpoint.to_owned(),
            reply,
            events,
            publisher: None,
            consumers: vec![consumer],
        }
    }

    /// The reply address commands carry.
    pub fn response_address(&self) -> String {
        format!("rabbitmq://127.0.0.1/{}", self.reply)
    }

    /// Publishes once and waits for the confirm; false (and a fresh connection next time) on any failure.
    async fn publish_once(&mut self, body: &[u8]) -> bool {
        if self.publisher.is_none() {
            let Ok(connection) = Connection::connect(&self.url, ConnectionProperties::default()).await else {
                return false;
            };
            let Ok(channel) = connection.create_channel().await else { return false };
            if channel.confirm_select(ConfirmSelectOptions::default()).await.is_err() {
                return false;
            }
            self.publisher = Some((connection, channel));
        }
        let (_, channel) = self.publisher.as_ref().unwrap();
        let properties = BasicProperties::default()
            .with_content_type("application/vnd.masstransit+json".into())
            .with_delivery_mode(2);
        let sent = async {
            let confirm = channel
                .basic_publish(
                    self.endpoint.as_str().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await?;
            confirm.await
        };
        match tokio::time::timeout(Duration::from_secs(10), sent).await {
            Ok(Ok(confirmation)) if !confirmation.is_nack() => true,
            _ => {
                self.publisher = None;
                false
            }
        }
    }

    /// Sends `command` until the broker confirms it (the same messageId each time: the bridge's inbox
    /// makes a repeat harmless). Returns how many attempts were refused.
    pub async fn send(&mut self, command: &Command) -> u32 {
        let envelope = json!({
            "messageId": command.id,
            "requestId": command.id,
            "conversationId": command.id,
            "messageType": [STORE_URN],
            "headers": {"fhir-release": "R4"},
            "responseAddress": self.response_address(),
            "message": command.message,
        })
        .to_string();
        let mut refused = 0;
        while !self.publish_once(envelope.as_bytes()).await {
            refused += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        refused
    }

    /// Stops consuming and deletes the client's queues and the reply exchange.
    pub async fn close(mut self) {
        for task in self.consumers.drain(..) {
            task.abort();
        }
        if let Ok(connection) = Connection::connect(&self.url, ConnectionProperties::default()).await {
            if let Ok(channel) = connection.create_channel().await {
                for queue in [&self.reply, &self.events] {
                    let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
                }
                let _ = channel.exchange_delete(self.reply.as_str().into(), Default::default()).await;
            }
            let _ = connection.close(200, "done".into()).await;
        }
    }
}

/// Deletes the bridge's endpoint (queue, exchange, error and skipped queues) after a run.
pub async fn delete_endpoint(url: &str, queue: &str) {
    let Ok(connection) = Connection::connect(url, ConnectionProperties::default()).await else { return };
    if let Ok(channel) = connection.create_channel().await {
        for name in [queue.to_owned(), format!("{queue}_error"), format!("{queue}_skipped")] {
            let _ = channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
            let _ = channel.exchange_delete(name.as_str().into(), Default::default()).await;
        }
    }
    let _ = connection.close(200, "done".into()).await;
}
