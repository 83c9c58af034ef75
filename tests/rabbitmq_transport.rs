//! The RabbitMQ transport against a real broker at 127.0.0.1:5672 (guest/guest).
//!
//! Every test uses its own random queue name and deletes what it declared. The broker-restart test
//! stops and starts the RabbitMQ application for a few seconds (skip it by setting
//! `FHIR_PUBSUB_SKIP_BROKER_RESTART=1`); it takes a write lock that the other tests of this file
//! hold for reading, so they never run during the outage.
#![cfg(feature = "rabbitmq")]

mod amqp_support;
mod common;

use std::time::Duration;

use fhir_pubsub::contracts::MessageType;
use fhir_pubsub::transport::rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use fhir_pubsub::transport::{Delivery, FaultReason, OutgoingMessage, Transport, TransportError};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;
use tokio::sync::{RwLock, mpsc};

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const WAIT: Duration = Duration::from_secs(10);

/// Held for reading by every test, for writing by the restart test.
static BROKER: RwLock<()> = RwLock::const_new(());

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn options(queue: &str) -> RabbitMqOptions {
    RabbitMqOptions {
        host: "127.0.0.1".to_owned(),
        queue_name: queue.to_owned(),
        prefetch_count: 4,
        retry_delay: Duration::from_millis(100),
        ..RabbitMqOptions::default()
    }
}

fn message(body: &str) -> OutgoingMessage {
    OutgoingMessage {
        body: body.as_bytes().to_vec(),
        content_type: "application/vnd.masstransit+json",
        message_id: uuid::Uuid::new_v4(),
        correlation_id: Some(uuid::Uuid::new_v4()),
        headers: vec![("fhir-release".to_owned(), json!("R4")), ("MT-Request-AcceptType".to_owned(), json!(["x"]))],
        time_to_live: Some(Duration::from_secs(30)),
        reply_to: None,
        key: None,
        session_id: None,
    }
}

/// A plain lapin connection for setting up and inspecting the broker side.
struct Raw {
    connection: Connection,
}

impl Raw {
    async fn connect() -> Raw {
        let connection = Connection::connect(URI, ConnectionProperties::default()).await.expect("raw connection");
        Raw { connection }
    }

    async fn channel(&self) -> Channel {
        self.connection.create_channel().await.expect("raw channel")
    }

    /// Whether a non-passive declare with these flags is accepted (a 406 means they differ).
    async fn exchange_matches(&self, name: &str, kind: ExchangeKind, durable: bool) -> bool {
        let options = ExchangeDeclareOptions { durable, ..ExchangeDeclareOptions::default() };
        self.channel().await.exchange_declare(name.into(), kind, options, FieldTable::default()).await.is_ok()
    }

    /// Ready messages in a queue (`None` when it does not exist).
    async fn queue_count(&self, name: &str) -> Option<u32> {
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let queue = self.channel().await.queue_declare(name.into(), options, FieldTable::default()).await.ok()?;
        Some(queue.message_count())
    }

    async fn get(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        let channel = self.channel().await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.expect("basic.get");
            if got.is_some() || tokio::time::Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn publish(&self, exchange: &str, routing_key: &str, body: &[u8], properties: BasicProperties) {
        let channel = self.channel().await;
        channel.confirm_select(Default::default()).await.expect("confirm.select");
        channel
            .basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions::default(), body, properties)
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }

    async fn delete_queue(&self, name: &str) {
        let _ = self.channel().await.queue_delete(name.into(), QueueDeleteOptions::default()).await;
    }

    async fn delete_exchange(&self, name: &str) {
        let _ = self.channel().await.exchange_delete(name.into(), ExchangeDeleteOptions::default()).await;
    }

    /// Deletes the endpoint `q` with its error and skipped queues and exchanges.
    async fn delete_endpoint(&self, q: &str) {
        for name in [q.to_owned(), format!("{q}_error"), format!("{q}_skipped")] {
            self.delete_queue(&name).await;
            self.delete_exchange(&name).await;
        }
    }
}

/// The next delivery whose message id is `id` (others, e.g. from other suites publishing to
/// the shared command exchanges, are acknowledged and ignored).
async fn receive(rx: &mut mpsc::Receiver<Delivery>, id: &str) -> Delivery {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let delivery = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no delivery with message id {id}"))
            .expect("delivery channel open");
        if delivery.meta.message_id.as_deref() == Some(id) {
            return delivery;
        }
        let _ = delivery.acker.ack().await;
    }
}

fn props(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/vnd.masstransit+json".into())
        .with_message_id(id.into())
        .with_delivery_mode(2)
}

fn header<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    p.headers().as_ref()?.inner().get(name)
}

fn header_text(p: &BasicProperties, name: &str) -> Option<String> {
    match header(p, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_declares_the_masstransit_topology() {
    let _shared = BROKER.read().await;
    let q = unique("topo");
    let raw = Raw::connect().await;
    let mut opts = options(&q);
    opts.queue_arguments = serde_json::from_value(json!({"x-message-ttl": 600000})).expect("map");
    let transport = RabbitMqTransport::connect(opts).await.expect("connect");
    let mut rx = transport.start().await.expect("start");

    for name in [q.clone(), format!("{q}_error"), format!("{q}_skipped")] {
        assert!(raw.exchange_matches(&name, ExchangeKind::Fanout, true).await, "exchange {name} fanout durable");
        assert!(!raw.exchange_matches(&name, ExchangeKind::Direct, true).await, "exchange {name} is not direct");
        assert_eq!(raw.queue_count(&name).await, Some(0), "queue {name}");
    }
    for t in MessageType::ALL {
        assert!(raw.exchange_matches(&t.exchange(), ExchangeKind::Fanout, true).await, "{}", t.exchange());
    }
    // The queue arguments were applied: a declare without them is refused.
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    assert!(raw.channel().await.queue_declare(q.as_str().into(), durable, FieldTable::default()).await.is_err());
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(600000));
    assert!(raw.channel().await.queue_declare(q.as_str().into(), durable, args).await.is_ok());

    // Q_error and Q_skipped exchanges feed their queues.
    for name in [format!("{q}_error"), format!("{q}_skipped")] {
        raw.publish(&name, "", b"x", props("p")).await;
        assert_eq!(raw.get(&name).await.map(|m| m.delivery.data), Some(b"x".to_vec()), "{name} is bound");
    }

    // Both command exchanges reach Q, and the delivery says which type it came through.
    for t in [MessageType::ExecuteStorePlanCommand, MessageType::RetrievePlanCommand] {
        let id = uuid::Uuid::new_v4().to_string();
        raw.publish(&t.exchange(), "", b"{}", props(&id)).await;
        let delivery = receive(&mut rx, &id).await;
        assert_eq!(delivery.meta.type_hint, Some(t));
        delivery.acker.ack().await.expect("ack");
    }
    transport.close().await;
    raw.delete_endpoint(&q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_carries_meta_and_ack_removes_it() {
    let _shared = BROKER.read().await;
    let q = unique("meta");
    let raw = Raw::connect().await;
    let transport = RabbitMqTransport::connect(options(&q)).await.expect("connect");
    assert!(transport.is_connected());
    assert_eq!(transport.input_address(), format!("rabbitmq://127.0.0.1/{q}"));
    let mut rx = transport.start().await.expect("start");

    let id = uuid::Uuid::new_v4().to_string();
    let mut headers = FieldTable::default();
    headers.insert("fhir-release".into(), AMQPValue::LongString("R4".into()));
    headers.insert("bytes".into(), AMQPValue::ByteArray(b"text".to_vec().into()));
    headers.insert("count".into(), AMQPValue::LongInt(7));
    let properties = props(&id)
        .with_correlation_id("corr-1".into())
        .with_reply_to("amq.rabbitmq.reply-to.abc".into())
        .with_headers(headers);
    raw.publish(&q, "", br#"{"message":{}}"#, properties).await;

    let delivery = receive(&mut rx, &id).await;
    assert_eq!(delivery.body, br#"{"message":{}}"#.to_vec());
    assert!(!delivery.redelivered);
    let meta = &delivery.meta;
    assert_eq!(meta.content_type.as_deref(), Some("application/vnd.masstransit+json"));
    assert_eq!(meta.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(meta.reply_to.as_deref(), Some("amq.rabbitmq.reply-to.abc"));
    assert_eq!(meta.type_hint, None, "published straight to Q, not to a type exchange");
    assert_eq!(meta.header("FHIR-RELEASE"), Some(&json!("R4")));
    assert_eq!(meta.header("bytes"), Some(&json!("text")));
    assert_eq!(meta.header("count"), Some(&json!(7)));
    delivery.acker.ack().await.expect("ack");

    transport.close().await;
    // Closing would requeue an unacknowledged message; an acknowledged one is gone.
    assert_eq!(raw.queue_count(&q).await, Some(0));
    raw.delete_endpoint(&q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_to_error_copies_the_message_with_fault_headers() {
    let _shared = BROKER.read().await;
    let q = unique("err");
    let raw = Raw::connect().await;
    let transport = RabbitMqTransport::connect(options(&q)).await.expect("connect");
    let mut rx = transport.start().await.expect("start");

    let id = uuid::Uuid::new_v4().to_string();
    let mut headers = FieldTable::default();
    headers.insert("custom".into(), AMQPValue::LongString("kept".into()));
    let properties = props(&id)
        .with_expiration("60000".into())
        .with_correlation_id("c-9".into())
        .with_priority(2)
        .with_headers(headers);
    raw.publish(&q, "rk-1", b"not an envelope", properties).await;

    let delivery = receive(&mut rx, &id).await;
    let reason = FaultReason {
        exception_type: "EnvelopeDecodeError".to_owned(),
        message: "the body is not JSON".to_owned(),
        message_type: Some(MessageType::ExecuteStorePlanCommand),
    };
    delivery.acker.move_to_error(&reason).await.expect("move to error");

    let copy = raw.get(&format!("{q}_error")).await.expect("copy in Q_error");
    let d = copy.delivery;
    assert_eq!(d.data, b"not an envelope".to_vec());
    assert_eq!(d.routing_key.as_str(), "rk-1");
    let p = &d.properties;
    assert_eq!(p.message_id().as_ref().map(|s| s.to_string()), Some(id.clone()));
    assert_eq!(p.correlation_id().as_ref().map(|s| s.to_string()).as_deref(), Some("c-9"));
    assert_eq!(p.content_type().as_ref().map(|s| s.to_string()).as_deref(), Some("application/vnd.masstransit+json"));
    assert_eq!(p.priority(), &Some(2));
    assert_eq!(p.delivery_mode(), &Some(2));
    assert_eq!(p.expiration(), &None);
    assert_eq!(header_text(p, "custom").as_deref(), Some("kept"));
    assert_eq!(header_text(p, "MT-Reason").as_deref(), Some("fault"));
    assert_eq!(header_text(p, "MT-Fault-ExceptionType").as_deref(), Some("EnvelopeDecodeError"));
    assert_eq!(header_text(p, "MT-Fault-Message").as_deref(), Some("the body is not JSON"));
    assert_eq!(header_text(p, "MT-Fault-InputAddress"), Some(transport.input_address()));
    assert!(header_text(p, "MT-Fault-MessageType").is_some_and(|t| t.ends_with(":ExecuteStorePlanCommand")));
    let timestamp = header_text(p, "MT-Fault-Timestamp").expect("timestamp");
    assert!(chrono::DateTime::parse_from_rfc3339(&timestamp).is_ok(), "{timestamp}");
    assert!(header_text(p, "MT-Host-MachineName").is_some_and(|m| !m.is_empty()));

    transport.close().await;
    assert_eq!(raw.queue_count(&q).await, Some(0), "the original was acknowledged");
    raw.delete_endpoint(&q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_to_skipped_marks_dead_letter() {
    let _shared = BROKER.read().await;
    let q = unique("skip");
    let raw = Raw::connect().await;
    let transport = RabbitMqTransport::connect(options(&q)).await.expect("connect");
    let mut rx = transport.start().await.expect("start");

    let id = uuid::Uuid::new_v4().to_string();
    raw.publish(&q, "", b"{}", props(&id)).await;
    let delivery = receive(&mut rx, &id).await;
    delivery.acker.move_to_skipped().await.expect("skip");

    let copy = raw.get(&format!("{q}_skipped")).await.expect("copy in Q_skipped");
    assert_eq!(copy.delivery.data, b"{}".to_vec());
    assert_eq!(header_text(&copy.delivery.properties, "MT-Reason").as_deref(), Some("dead-letter"));
    assert_eq!(copy.delivery.properties.message_id().as_ref().map(|s| s.to_string()), Some(id));
    assert_eq!(raw.queue_count(&format!("{q}_error")).await, Some(0));

    transport.close().await;
    assert_eq!(raw.queue_count(&q).await, Some(0));
    raw.delete_endpoint(&q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_later_gives_the_message_back() {
    let _shared = BROKER.read().await;
    let q = unique("retry");
    let raw = Raw::connect().await;
    let transport = RabbitMqTransport::connect(options(&q)).await.expect("connect");
    let mut rx = transport.start().await.expect("start");

    let id = uuid::Uuid::new_v4().to_string();
    raw.publish(&q, "", b"{}", props(&id)).await;
    let first = receive(&mut rx, &id).await;
    assert!(!first.redelivered);
    let started = std::time::Instant::now();
    first.acker.retry_later().await.expect("retry later");
    assert!(started.elapsed() >= Duration::from_millis(100), "retry waits the configured delay");

    let second = receive(&mut rx, &id).await;
    assert!(second.redelivered);
    assert_eq!(second.body, b"{}".to_vec());
    second.acker.ack().await.expect("ack");

    transport.close().await;
    raw.delete_endpoint(&q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_a_js_bus_exchange_with_x_expires() {
    let _shared = BROKER.read().await;
    let raw = Raw::connect().await;
    let bus = unique("bus");
    // What MassTransit-JS declares for its bus endpoint.
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(60000));
    let channel = raw.channel().await;
    let flags = ExchangeDeclareOptions { durable: false, auto_delete: true, ..ExchangeDeclareOptions::default() };
    channel.exchange_declare(bus.as_str().into(), ExchangeKind::Fanout, flags, args.clone()).await.expect("exchange");
    let queue_flags = QueueDeclareOptions { durable: false, auto_delete: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(bus.as_str().into(), queue_flags, args).await.expect("queue");
    channel
        .queue_bind(
            bus.as_str().into(),
            bus.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");

    let transport = RabbitMqTransport::connect(options(&unique("unused"))).await.expect("connect");
    let reply = message(r#"{"reply":1}"#);
    transport.send(&format!("amqp://127.0.0.1/{bus}?temporary=true"), reply.clone()).await.expect("send");
    let got = raw.get(&bus).await.expect("reply delivered");
    assert_eq!(got.delivery.data, reply.body);
    let p = &got.delivery.properties;
    assert_eq!(p.message_id().as_ref().map(|s| s.to_string()), Some(reply.message_id.to_string()));
    assert_eq!(p.correlation_id().as_ref().map(|s| s.to_string()), reply.correlation_id.map(|c| c.to_string()));
    assert_eq!(p.delivery_mode(), &Some(2));
    assert_eq!(p.expiration().as_ref().map(|s| s.to_string()).as_deref(), Some("30000"));
    assert_eq!(header_text(p, "fhir-release").as_deref(), Some("R4"));
    assert!(header(p, "MT-Request-AcceptType").is_none(), "arrays are dropped");
    assert!(p.kind().is_none() && p.app_id().is_none() && p.timestamp().is_none());

    transport.close().await;
    raw.delete_queue(&bus).await;
    raw.delete_exchange(&bus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_falls_back_to_passive_declare_on_406() {
    let _shared = BROKER.read().await;
    let raw = Raw::connect().await;
    let name = unique("bus");
    // The exchange exists durable; the address asks for a temporary one: the declare gets a 406.
    let channel = raw.channel().await;
    let queue_flags = QueueDeclareOptions { auto_delete: true, ..QueueDeclareOptions::default() };
    amqp_support::queue_on_fanout(&channel, &name, &name, queue_flags).await;

    let transport = RabbitMqTransport::connect(options(&unique("unused"))).await.expect("connect");
    let address = format!("amqp://127.0.0.1/{name}?temporary=true");
    for n in 0..3 {
        let reply = message(&format!("{{\"n\":{n}}}"));
        transport.send(&address, reply.clone()).await.expect("send despite the 406");
        assert_eq!(raw.get(&name).await.map(|m| m.delivery.data), Some(reply.body));
    }
    assert!(raw.exchange_matches(&name, ExchangeKind::Fanout, true).await, "the exchange was left as it was");

    transport.close().await;
    raw.delete_queue(&name).await;
    raw.delete_exchange(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_with_bind_creates_a_durable_exchange_and_queue() {
    let _shared = BROKER.read().await;
    let raw = Raw::connect().await;
    let name = unique("ExecuteStorePlanResponse_postman");
    let transport = RabbitMqTransport::connect(options(&unique("unused"))).await.expect("connect");
    let reply = message("{}");
    transport.send(&format!("rabbitmq://localhost/{name}?bind=true"), reply.clone()).await.expect("send");

    assert!(raw.exchange_matches(&name, ExchangeKind::Fanout, true).await, "durable fanout exchange");
    let got = raw.get(&name).await.expect("queue bound and filled");
    assert_eq!(got.delivery.data, reply.body);

    // queue:name is the short form of the same thing.
    let short = unique("replies");
    transport.send(&format!("queue:{short}"), reply.clone()).await.expect("send queue:");
    assert_eq!(raw.get(&short).await.map(|m| m.delivery.data), Some(reply.body.clone()));

    // A name ending in a separate `queue=` binds that queue instead.
    let other = unique("other");
    transport.send(&format!("exchange:{name}-x?bind=true&queue={other}"), reply.clone()).await.expect("send queue=");
    assert_eq!(raw.get(&other).await.map(|m| m.delivery.data), Some(reply.body));

    transport.close().await;
    for n in [name.clone(), short, other, format!("{name}-x")] {
        raw.delete_queue(&n).await;
        raw.delete_exchange(&n).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_rejects_foreign_addresses() {
    let _shared = BROKER.read().await;
    let transport = RabbitMqTransport::connect(options(&unique("unused"))).await.expect("connect");
    let err = transport.send("sb://namespace/queue", message("{}")).await.expect_err("not RabbitMQ");
    assert!(matches!(err, TransportError::InvalidAddress { .. }), "{err}");
    assert!(!err.is_retryable());
    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_reaches_the_requester() {
    let _shared = BROKER.read().await;
    let q = unique("drt");
    let raw = Raw::connect().await;
    let transport = RabbitMqTransport::connect(options(&q)).await.expect("connect");
    let mut rx = transport.start().await.expect("start");

    // The requester consumes the pseudo queue and publishes on the same channel.
    let requester = raw.channel().await;
    let mut replies = requester
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
            FieldTable::default(),
        )
        .await
        .expect("consume reply-to");
    let id = uuid::Uuid::new_v4().to_string();
    requester
        .basic_publish(
            q.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            b"{}",
            props(&id).with_reply_to("amq.rabbitmq.reply-to".into()),
        )
        .await
        .expect("publish request");

    let request = receive(&mut rx, &id).await;
    let reply_to = request.meta.reply_to.clone().expect("broker filled reply_to");
    assert!(reply_to.starts_with("amq.rabbitmq.reply-to."), "{reply_to}");
    let mut reply = message(r#"{"answer":true}"#);
    reply.reply_to = Some(reply_to);
    transport.send(&format!("rabbitmq://127.0.0.1/{q}/amq.rabbitmq.reply-to"), reply.clone()).await.expect("reply");
    request.acker.ack().await.expect("ack");

    let got = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut replies))
        .await
        .expect("reply in time")
        .expect("stream open")
        .expect("delivery");
    assert_eq!(got.data, reply.body);

    // Without the request's reply_to there is nowhere to send.
    let err =
        transport.send("rabbitmq://127.0.0.1/amq.rabbitmq.reply-to", message("{}")).await.expect_err("no reply_to");
    assert!(matches!(err, TransportError::InvalidAddress { .. }));

    transport.close().await;
    raw.delete_endpoint(&q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reaches_queues_bound_to_the_event_exchange() {
    let _shared = BROKER.read().await;
    let raw = Raw::connect().await;
    let transport = RabbitMqTransport::connect(options(&unique("unused"))).await.expect("connect");
    let listener = unique("events");
    let channel = raw.channel().await;
    let exchange = MessageType::ResourcesChangedLightEvent.exchange();
    let queue_flags = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
    amqp_support::queue_on_fanout(&channel, &exchange, &listener, queue_flags).await;

    let mut event = message(r#"{"changes":[]}"#);
    event.time_to_live = None;
    transport.publish(MessageType::ResourcesChangedLightEvent, event.clone()).await.expect("publish");
    let deadline = tokio::time::Instant::now() + WAIT;
    let got = loop {
        let got = channel.basic_get(listener.as_str().into(), BasicGetOptions { no_ack: true }).await.expect("get");
        match got {
            Some(m)
                if m.delivery.properties.message_id().as_ref().map(ShortString::to_string)
                    == Some(event.message_id.to_string()) =>
            {
                break m;
            }
            Some(_) => continue,
            None if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            None => panic!("event not delivered"),
        }
    };
    assert_eq!(got.delivery.data, event.body);
    assert_eq!(got.delivery.exchange.as_str(), exchange);
    assert_eq!(got.delivery.properties.expiration(), &None);
    transport.close().await;
    raw.delete_queue(&listener).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_sends_are_all_confirmed() {
    let _shared = BROKER.read().await;
    let raw = Raw::connect().await;
    let transport = std::sync::Arc::new(RabbitMqTransport::connect(options(&unique("unused"))).await.expect("connect"));
    let target = unique("burst");
    let address = format!("queue:{target}");
    let mut tasks = Vec::new();
    for n in 0..200 {
        let transport = std::sync::Arc::clone(&transport);
        let address = address.clone();
        tasks.push(tokio::spawn(async move { transport.send(&address, message(&format!("{{\"n\":{n}}}"))).await }));
    }
    for task in tasks {
        task.await.expect("task").expect("confirmed send");
    }
    // Every send returned after its confirm, so all 200 are in the queue now.
    assert_eq!(raw.queue_count(&target).await, Some(200));
    transport.close().await;
    raw.delete_queue(&target).await;
    raw.delete_exchange(&target).await;
}

/// Starts the RabbitMQ application again when dropped, so a failing test never leaves it down.
struct RestartGuard {
    stopped: bool,
}

impl RestartGuard {
    fn rabbitmqctl(command: &str) {
        let status = std::process::Command::new("rabbitmqctl").arg(command).status().expect("run rabbitmqctl");
        assert!(status.success(), "rabbitmqctl {command} failed");
    }

    fn stop(&mut self) {
        self.stopped = true;
        Self::rabbitmqctl("stop_app");
    }

    fn start(&mut self) {
        Self::rabbitmqctl("start_app");
        self.stopped = false;
    }
}

impl Drop for RestartGuard {
    fn drop(&mut self) {
        if self.stopped {
            let _ = std::process::Command::new("rabbitmqctl").arg("start_app").status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumption_resumes_after_a_broker_restart() {
    if std::env::var_os("FHIR_PUBSUB_SKIP_BROKER_RESTART").is_some() {
        eprintln!("skipped: FHIR_PUBSUB_SKIP_BROKER_RESTART is set");
        return;
    }
    let _exclusive = BROKER.write().await;
    let q = unique("restart");
    let mut opts = options(&q);
    opts.reconnect_wait = Duration::from_millis(300);
    let transport = RabbitMqTransport::connect(opts).await.expect("connect");
    let mut rx = transport.start().await.expect("start");

    let raw = Raw::connect().await;
    let before = uuid::Uuid::new_v4().to_string();
    raw.publish(&q, "", b"{}", props(&before)).await;
    let unacked = receive(&mut rx, &before).await;
    drop(raw);

    let mut guard = RestartGuard { stopped: false };
    tokio::task::block_in_place(|| guard.stop());
    let outage = async {
        common::eventually("the transport notices the outage", Duration::from_secs(10), || !transport.is_connected())
            .await;
        let err = transport.send("queue:nowhere", message("{}")).await.expect_err("no broker");
        assert!(err.is_retryable(), "{err}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    outage.await;
    tokio::task::block_in_place(|| guard.start());

    common::eventually("the transport reconnects", Duration::from_secs(30), || transport.is_connected()).await;
    // The delivery of the lost connection cannot be acknowledged; the broker redelivers it.
    let err = unacked.acker.ack().await.expect_err("old delivery");
    assert!(err.is_retryable());
    let again = receive(&mut rx, &before).await;
    assert!(again.redelivered);
    again.acker.ack().await.expect("ack after reconnect");

    let raw = Raw::connect().await;
    let after = uuid::Uuid::new_v4().to_string();
    raw.publish(&q, "", b"{}", props(&after)).await;
    let delivery = receive(&mut rx, &after).await;
    delivery.acker.ack().await.expect("ack");
    transport.send(&format!("queue:{q}-reply"), message("{}")).await.expect("send after reconnect");
    assert_eq!(raw.queue_count(&format!("{q}-reply")).await, Some(1));

    transport.close().await;
    raw.delete_endpoint(&q).await;
    raw.delete_queue(&format!("{q}-reply")).await;
    raw.delete_exchange(&format!("{q}-reply")).await;
}
