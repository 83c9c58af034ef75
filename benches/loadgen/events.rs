//! Change events seen from a consumer of the event exchanges: commit→consumer latency while a
//! bridge process takes 1,000 store commands per second, and the rate at which a backlog of
//! committed changes drains when a publishing bridge starts.
//!
//! The exchanges are shared by every bridge on the broker, so only messages about resources whose
//! id carries this run's tag are counted; a repeated message (same `messageId`) is counted once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use fhir_pubsub::contracts::{MessageType, read};
use fhir_pubsub::transport::TransportMeta;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde::Deserialize;
use serde::de::IgnoredAny;
use uuid::Uuid;

use crate::rpc::{AMQP, percentile};

/// Commit→consumer latency of full events.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LatencyResult {
    pub offered_per_second: f64,
    pub commands: u64,
    pub events_matched: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Backlog drain of one event kind.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DrainResult {
    pub kind: &'static str,
    pub changes: u64,
    pub seconds: f64,
    pub per_second: f64,
}

/// A queue bound to one event exchange, consumed without acks; `on_message` sees each body.
async fn subscribe(
    message_type: MessageType,
    on_message: impl FnMut(&[u8]) + Send + 'static,
) -> anyhow::Result<Connection> {
    let connection = Connection::connect(AMQP, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let exchange = message_type.exchange();
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let mut on_message = on_message;
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            on_message(&delivery.data);
        }
    });
    Ok(connection)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The body of a store command without a reply: one upsert of `resource` (a JSON string).
pub fn fire_and_forget_command(resource: &str) -> Vec<u8> {
    format!(
        concat!(
            r#"{{"messageId":"{}","messageType":["urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand"],"#,
            r#""message":{{"instructions":[{{"itemId":"1","operation":"upsert","resource":{}}}]}}}}"#
        ),
        Uuid::now_v7(),
        serde_json::to_string(resource).unwrap_or_default()
    )
    .into_bytes()
}

/// Sends `rate` commands per second for `seconds` to `exchange` (no replies), each upserting a new
/// Patient of `patient(id)`; then waits until a full event carried each of them, and measures
/// each change's delay from its commit (`recorded_at` of its version in `store_url`) to its arrival.
pub async fn latency(
    exchange: &str,
    store_url: &str,
    tag: &str,
    rate: u64,
    seconds: u64,
    patient: &(dyn Fn(&str) -> String + Sync),
) -> anyhow::Result<LatencyResult> {
    let arrivals: Arc<Mutex<HashMap<String, DateTime<Utc>>>> = Arc::default();
    let needle = tag.as_bytes().to_vec();
    let sink = arrivals.clone();
    let _subscription = subscribe(MessageType::ResourcesChangedEvent, move |body| {
        let arrived_at = Utc::now();
        if !contains(body, &needle) {
            return;
        }
        let Ok(envelope) = fhir_pubsub::envelope::decode(body, &TransportMeta::default()) else { return };
        let Some(Ok(changes)) = envelope.message.as_deref().map(read::changes) else { return };
        let mut sink = sink.lock().unwrap();
        for change in changes {
            let key = format!(
                "{}/{}|{}",
                change.reference.resource_type,
                change.reference.resource_id,
                change.reference.version.unwrap_or_default()
            );
            sink.entry(key).or_insert(arrived_at);
        }
    })
    .await?;

    let connection = Connection::connect(AMQP, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let properties =
        BasicProperties::default().with_content_type("application/vnd.masstransit+json".into()).with_delivery_mode(2);
    let total = rate * seconds;
    // Paced in ticks of 10 ms: rate/100 commands per tick.
    let per_tick = (rate / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut confirms = Vec::new();
    let started = Instant::now();
    for n in 0..total {
        if n % per_tick == 0 {
            tick.tick().await;
        }
        let body = fire_and_forget_command(&patient(&format!("{tag}-{n}")));
        confirms.push(
            channel
                .basic_publish(exchange.into(), "".into(), BasicPublishOptions::default(), &body, properties.clone())
                .await?,
        );
        if confirms.len() >= 100 {
            for c in confirms.drain(..) {
                c.await?;
            }
        }
    }
    for c in confirms.drain(..) {
        c.await?;
    }
    let offered = total as f64 / started.elapsed().as_secs_f64();
    let waiting = Instant::now();
    while (arrivals.lock().unwrap().len() as u64) < total && waiting.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = connection.close(200, "done".into()).await;

    let store = fhir_pubsub::store::open(store_url).await?;
    let log = store.version_log().await?;
    store.close().await;
    let arrivals = arrivals.lock().unwrap();
    let mut delays: Vec<f64> = log
        .iter()
        .filter_map(|c| {
            let at = arrivals.get(&format!("{}|{}", c.key, c.version_id))?;
            Some((*at - c.recorded_at).num_microseconds()? as f64 / 1000.0)
        })
        .collect();
    delays.sort_by(f64::total_cmp);
    Ok(LatencyResult {
        offered_per_second: offered,
        commands: total,
        events_matched: delays.len() as u64,
        p50_ms: percentile(&delays, 0.50),
        p99_ms: percentile(&delays, 0.99),
        max_ms: delays.last().copied().unwrap_or(f64::NAN),
    })
}

#[derive(Deserialize)]
struct EventHead {
    #[serde(rename = "messageId")]
    message_id: Option<Uuid>,
    message: Option<EventMessage>,
}

#[derive(Deserialize)]
struct EventMessage {
    #[serde(default)]
    changes: Vec<IgnoredAny>,
}

/// Counts the changes of `message_type` about resources tagged `tag`, from the moment it is called.
pub struct DrainCounter {
    state: Arc<Mutex<DrainState>>,
    _subscription: Connection,
}

#[derive(Default)]
struct DrainState {
    seen: HashSet<Uuid>,
    changes: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl DrainCounter {
    pub async fn start(message_type: MessageType, tag: &str) -> anyhow::Result<DrainCounter> {
        let state: Arc<Mutex<DrainState>> = Arc::default();
        let (sink, needle) = (state.clone(), tag.as_bytes().to_vec());
        let subscription = subscribe(message_type, move |body| {
            let now = Instant::now();
            if !contains(body, &needle) {
                return;
            }
            let Ok(head) = serde_json::from_slice::<EventHead>(body) else { return };
            let count = head.message.map(|m| m.changes.len() as u64).unwrap_or(0);
            let mut state = sink.lock().unwrap();
            if !state.seen.insert(head.message_id.unwrap_or_else(Uuid::new_v4)) {
                return;
            }
            state.changes += count;
            state.first.get_or_insert(now);
            state.last = Some(now);
        })
        .await?;
        Ok(DrainCounter { state, _subscription: subscription })
    }

    /// Waits until `expected` changes arrived (at most `limit`); the rate is measured from `since`
    /// (the publishing bridge ready) or the first message's arrival, whichever came first, to the
    /// last message's arrival.
    pub async fn wait(&self, kind: &'static str, expected: u64, since: Instant, limit: Duration) -> DrainResult {
        let started = Instant::now();
        while self.state.lock().unwrap().changes < expected && started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let state = self.state.lock().unwrap();
        let seconds = match (state.first, state.last) {
            (Some(first), Some(last)) => (last - first.min(since)).as_secs_f64(),
            _ => f64::NAN,
        };
        DrainResult { kind, changes: state.changes, seconds, per_second: state.changes as f64 / seconds.max(1e-9) }
    }
}
