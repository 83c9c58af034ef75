//! The load generator's broker side: MassTransit-style request/response over RabbitMQ with a fixed
//! number of requests in flight, and the echo responder that gives the broker ceiling.
//!
//! Both sides do what a real client and the bridge do on the wire: requests are persistent
//! messages published with publisher confirms to the fanout exchange named like the receive queue;
//! replies go to the request's `responseAddress`, a temporary exchange and exclusive queue of this
//! generator, and are matched to their request by `requestId`. The echo responder consumes with
//! manual acknowledgements and a prefetch, publishes each reply persistent and confirmed, and
//! acknowledges the request only after that confirm: the bridge's broker work, minus the database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::Deserialize;
use serde::de::IgnoredAny;
use tokio::sync::{Semaphore, mpsc};
use uuid::Uuid;

pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const CONTENT_TYPE: &str = "application/vnd.masstransit+json";
/// How long outstanding replies may take after the measuring window before the run gives up on them.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// How much load, for how long.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Requests in flight at any time.
    pub in_flight: usize,
    /// Load before measuring starts (connections warm, queues in steady state).
    pub warmup: Duration,
    /// The measuring window.
    pub measure: Duration,
    /// Stop after this many requests, whatever the time (large plans); `None`: the window decides.
    pub max_requests: Option<u64>,
}

/// What one load level measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadResult {
    pub in_flight: usize,
    /// Replies received inside the measuring window.
    pub completed: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Replies that carried errors (a failed plan), over the whole run.
    pub replies_with_errors: u64,
    /// Requests the broker did not confirm, or whose reply never came.
    pub lost: u64,
    /// Replies received in the whole run, warm-up included.
    pub replies: u64,
    /// CPU time (user + system) of the responding process per request, over the whole run.
    pub responder_cpu_ms_per_request: f64,
}

/// Builds the body of request number `n` with `message_id` (also its `requestId`) and the
/// generator's `response_address`.
pub type BodyFn = dyn Fn(u64, Uuid, &str) -> Vec<u8> + Send + Sync;

/// The part of a reply envelope the generator reads.
#[derive(Deserialize)]
struct ReplyHead {
    #[serde(rename = "requestId")]
    request_id: Option<Uuid>,
    message: Option<ReplyMessage>,
}

#[derive(Deserialize)]
struct ReplyMessage {
    #[serde(default)]
    errors: Vec<IgnoredAny>,
}

/// Sends requests to the fanout exchange `exchange` with `load.in_flight` outstanding at any time
/// and measures the replies.
pub async fn drive(exchange: &str, body: Arc<BodyFn>, load: Load) -> anyhow::Result<LoadResult> {
    let connection = Connection::connect(AMQP, ConnectionProperties::default()).await?;
    let reply_name = format!("bench_reply_{}", Uuid::new_v4().simple());
    let response_address = format!("rabbitmq://127.0.0.1/{reply_name}?temporary=true");
    let replies = connection.create_channel().await?;
    replies
        .exchange_declare(
            reply_name.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    replies
        .queue_declare(
            reply_name.as_str().into(),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    replies
        .queue_bind(
            reply_name.as_str().into(),
            reply_name.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = replies
        .basic_consume(
            reply_name.as_str().into(),
            "".into(),
            BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;

    let sent_at: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let permits = Arc::new(Semaphore::new(load.in_flight));
    let started = Instant::now();
    let window_start = started + load.warmup;
    let window_end = window_start + load.measure;
    let with_errors = Arc::new(AtomicU64::new(0));

    // Replies: match by requestId, record the latency of those inside the window, free a slot.
    let receiving = {
        let (sent_at, permits, with_errors) = (sent_at.clone(), permits.clone(), with_errors.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 16);
            let mut completed_in_window = 0u64;
            let mut last_in_window = window_start;
            let mut replies = 0u64;
            while let Some(Ok(delivery)) = consumer.next().await {
                let now = Instant::now();
                let Ok(head) = serde_json::from_slice::<ReplyHead>(&delivery.data) else { continue };
                let Some(request_id) = head.request_id else { continue };
                let Some(sent) = sent_at.lock().unwrap().remove(&request_id) else { continue };
                replies += 1;
                if head.message.is_some_and(|m| !m.errors.is_empty()) {
                    with_errors.fetch_add(1, Ordering::Relaxed);
                }
                if now >= window_start && (now <= window_end || load.max_requests.is_some()) {
                    completed_in_window += 1;
                    last_in_window = now;
                    latencies.push((now - sent).as_secs_f64() * 1000.0);
                }
                permits.add_permits(1);
            }
            (latencies, completed_in_window, last_in_window, replies)
        })
    };

    // Confirms, awaited in order off the publishing path.
    let (confirm_tx, mut confirm_rx) = mpsc::unbounded_channel::<lapin::PublisherConfirm>();
    let confirming = tokio::spawn(async move {
        let mut refused = 0u64;
        while let Some(confirm) = confirm_rx.recv().await {
            match confirm.await {
                Ok(c) if !c.is_nack() => {}
                _ => refused += 1,
            }
        }
        refused
    });

    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let properties = BasicProperties::default().with_content_type(CONTENT_TYPE.into()).with_delivery_mode(2);
    let mut sent = 0u64;
    loop {
        if load.max_requests.is_some_and(|max| sent >= max) || Instant::now() >= window_end {
            break;
        }
        // A responder that stopped answering must not hang the run: give up at the window's end.
        tokio::select! {
            permit = permits.acquire() => permit?.forget(),
            _ = tokio::time::sleep_until((window_end + DRAIN_LIMIT).into()) => break,
        }
        let id = Uuid::now_v7();
        let data = body(sent, id, &response_address);
        sent_at.lock().unwrap().insert(id, Instant::now());
        let confirm = channel
            .basic_publish(exchange.into(), "".into(), BasicPublishOptions::default(), &data, properties.clone())
            .await?;
        let _ = confirm_tx.send(confirm);
        sent += 1;
    }
    drop(confirm_tx);
    let refused = confirming.await?;
    // Wait for the replies still outstanding, so the next level starts on an empty queue.
    let draining = Instant::now();
    while !sent_at.lock().unwrap().is_empty() && draining.elapsed() < DRAIN_LIMIT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let lost = sent_at.lock().unwrap().len() as u64 + refused;
    let _ = replies.close(200, "done".into()).await;
    let (mut latencies, completed, last, replies) = receiving.await?;
    let _ = connection.close(200, "done".into()).await;

    latencies.sort_by(f64::total_cmp);
    let seconds = if load.max_requests.is_some() { (last - started).as_secs_f64() } else { load.measure.as_secs_f64() };
    Ok(LoadResult {
        in_flight: load.in_flight,
        completed,
        seconds,
        per_second: completed as f64 / seconds.max(1e-9),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        replies_with_errors: with_errors.load(Ordering::Relaxed),
        lost,
        replies,
        responder_cpu_ms_per_request: f64::NAN,
    })
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Declares the receive endpoint as the bridge does: durable queue `queue` bound to the durable
/// fanout exchange of the same name.
pub async fn declare_endpoint(channel: &Channel, queue: &str) -> anyhow::Result<()> {
    channel
        .exchange_declare(
            queue.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await?;
    channel
        .queue_bind(queue.into(), queue.into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await?;
    Ok(())
}

/// Deletes the receive endpoint of a finished run (queue and exchange).
pub async fn delete_endpoint(queue: &str) {
    let Ok(connection) = Connection::connect(AMQP, ConnectionProperties::default()).await else { return };
    if let Ok(channel) = connection.create_channel().await {
        let _ = channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await;
        let _ = channel.exchange_delete(queue.into(), Default::default()).await;
        for suffix in ["_error", "_skipped"] {
            let name = format!("{queue}{suffix}");
            let _ = channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
            let _ = channel.exchange_delete(name.as_str().into(), Default::default()).await;
        }
    }
    let _ = connection.close(200, "done".into()).await;
}

/// The part of a request the echo responder reads, as the bridge must: ids and the reply address.
#[derive(Deserialize)]
struct RequestHead<'a> {
    #[serde(rename = "messageId")]
    message_id: Option<Uuid>,
    #[serde(rename = "requestId")]
    request_id: Option<Uuid>,
    #[serde(rename = "responseAddress", borrow)]
    response_address: Option<std::borrow::Cow<'a, str>>,
}

/// The echo responder: consumes `queue` (prefetch `prefetch`, manual acks) and answers each request
/// with a reply of the size of the bridge's reply to a one-instruction store plan, persistent and
/// confirmed, to the exchange its `responseAddress` names; acknowledges after the confirm. Runs
/// until the process is killed.
pub async fn echo(queue: &str, prefetch: u16, concurrency: usize) -> anyhow::Result<()> {
    let connection = Connection::connect(AMQP, ConnectionProperties::default()).await?;
    let consuming = connection.create_channel().await?;
    declare_endpoint(&consuming, queue).await?;
    consuming.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = consuming
        .basic_consume(queue.into(), "echo".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    // As many confirm channels as the bridge's transport uses for its sends.
    let mut publishers = Vec::new();
    for _ in 0..4 {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        publishers.push(channel);
    }
    let publishers = Arc::new(publishers);
    let permits = Arc::new(Semaphore::new(concurrency));
    let properties = BasicProperties::default().with_content_type(CONTENT_TYPE.into()).with_delivery_mode(2);
    let mut next = 0usize;
    while let Some(Ok(delivery)) = consumer.next().await {
        let permit = permits.clone().acquire_owned().await?;
        let channel = publishers[next % publishers.len()].clone();
        next += 1;
        let properties = properties.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(head) = serde_json::from_slice::<RequestHead>(&delivery.data) else {
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                return;
            };
            let request_id = head.request_id.or(head.message_id).unwrap_or_default();
            let exchange = head
                .response_address
                .as_deref()
                .and_then(|a| a.split('?').next())
                .and_then(|a| a.rsplit('/').next())
                .unwrap_or_default()
                .to_owned();
            let reply = echo_reply(request_id, head.message_id.unwrap_or_default());
            if let Ok(confirm) = channel
                .basic_publish(exchange.as_str().into(), "".into(), BasicPublishOptions::default(), &reply, properties)
                .await
            {
                let _ = confirm.await;
            }
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        });
    }
    Ok(())
}

/// A reply envelope shaped like the bridge's answer to a successful one-instruction store plan.
fn echo_reply(request_id: Uuid, message_id: Uuid) -> Vec<u8> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    format!(
        concat!(
            r#"{{"messageId":"{}","requestId":"{}","conversationId":"{}","initiatorId":"{}","#,
            r#""sourceAddress":"rabbitmq://127.0.0.1/echo","destinationAddress":"rabbitmq://127.0.0.1/reply","#,
            r#""messageType":["urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanResponse"],"#,
            r#""message":{{"errors":[]}},"sentTime":"{}","headers":{{}},"#,
            r#""host":{{"machineName":"bench","processName":"echo","processId":1,"assembly":"echo","#,
            r#""assemblyVersion":"0.1.0","frameworkVersion":"rust","massTransitVersion":"8.0.0","#,
            r#""operatingSystemVersion":"linux"}}}}"#
        ),
        Uuid::now_v7(),
        request_id,
        message_id,
        request_id,
        now
    )
    .into_bytes()
}
