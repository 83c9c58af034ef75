//! Change-event benchmark against the real RabbitMQ, on SQLite and PostgreSQL:
//!
//! 1. latency: 1,000 store commands per second flow through the bridge for 10 s; for each change, the
//!    time from its commit (when the bridge's commit returned) to a consumer of the full-event exchange
//!    receiving it, p50, p99 and max; and the same from when its version row was written
//!    (`recorded_at`, earlier than the commit by the rest of the transaction and the commit's flush);
//! 2. backlog drain: 100,000 changes committed while no publisher runs, then one starts; the rate at
//!    which a consumer receives them, light events only and full events only.
//!
//! Run with `cargo bench --bench events` (PostgreSQL from FHIR_PUBSUB_TEST_POSTGRES, default
//! postgres://postgres@127.0.0.1:5432/postgres). Figures are printed; nothing is asserted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use fhir_pubsub::bridge::{Bridge, BridgeOptions};
use fhir_pubsub::config::ResourceChangeNotificationSettings;
use fhir_pubsub::contracts::MessageType;
use fhir_pubsub::contracts::read::{self, StorePlanMessage};
use fhir_pubsub::plan::{PlanLimits, StoreJob, execute_store_plans, validate_store_plan};
use fhir_pubsub::publisher::Publisher;
use fhir_pubsub::store::{self, Store};
use fhir_pubsub::transport::Transport;
use fhir_pubsub::transport::rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use sqlx::Connection as _;
use tokio::sync::watch;
use uuid::Uuid;

#[path = "../tests/amqp_support/mod.rs"]
mod amqp_support;
#[path = "support/commit_clock.rs"]
mod commit_clock;
#[path = "../tests/event_sink/mod.rs"]
mod event_sink;

use event_sink::{AMQP, EventSink};

/// Arrival time of each change (`Type/id|version`) of `message_type` the sink got.
fn arrivals(sink: &EventSink, message_type: MessageType) -> HashMap<String, DateTime<Utc>> {
    let mut out = HashMap::new();
    for m in sink.messages(message_type) {
        for ((key, version, _), _) in m.changes {
            out.entry(format!("{key}|{version}")).or_insert(m.arrived_at);
        }
    }
    out
}

/// Waits until the sink got `count` distinct changes of `message_type` (at most `limit`).
async fn wait_all(sink: &EventSink, message_type: MessageType, count: usize, limit: Duration) {
    let started = Instant::now();
    while arrivals(sink, message_type).len() < count && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn patient(id: &str) -> String {
    json!({"resourceType": "Patient", "id": id, "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"},
           "name": [{"family": "Bench", "given": ["Event"]}], "birthDate": "1970-01-01"})
    .to_string()
}

async fn transport() -> (Arc<dyn Transport>, String) {
    let queue = format!("fhir-pubsub-bench-{}", Uuid::new_v4().simple());
    let options = RabbitMqOptions {
        host: "127.0.0.1".into(),
        queue_name: queue.clone(),
        prefetch_count: 64,
        ..RabbitMqOptions::default()
    };
    (Arc::new(RabbitMqTransport::connect(options).await.expect("RabbitMQ")), queue)
}

fn settings(full: bool, light: bool) -> ResourceChangeNotificationSettings {
    ResourceChangeNotificationSettings {
        send_full_events: full,
        send_light_events: light,
        ..ResourceChangeNotificationSettings::default()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn latency(store: Arc<dyn Store>, label: &str) {
    let (store, commit_times) = commit_clock::CommitClock::wrap(store);
    const RATE: usize = 1000;
    const SECONDS: usize = 10;
    let tag = format!("lat{}", Uuid::new_v4().simple());
    let sink = EventSink::start(&tag).await;
    let (transport, queue) = transport().await;
    let publisher = Arc::new(Publisher::new(store.clone(), transport.clone(), settings(true, false)));
    let bridge = Arc::new(
        Bridge::new(store.clone(), transport.clone(), BridgeOptions::default()).with_changes_waker(publisher.waker()),
    );
    let (stop, stopped) = watch::channel(false);
    let publishing = tokio::spawn(publisher.clone().run(stopped.clone()));
    let running = tokio::spawn(bridge.run(stopped));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let connection = Connection::connect(AMQP, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut confirms = Vec::new();
    for n in 0..RATE * SECONDS {
        if n % (RATE / 100) == 0 {
            tick.tick().await;
        }
        let instructions =
            json!([{ "itemId": "1", "operation": "upsert", "resource": patient(&format!("{tag}-{n}")) }]);
        let envelope = json!({ "messageId": Uuid::new_v4(), "messageType": [MessageType::ExecuteStorePlanCommand.urn()],
                               "message": { "instructions": instructions } });
        let properties = BasicProperties::default().with_content_type("application/vnd.masstransit+json".into());
        let body = envelope.to_string();
        let confirm = channel
            .basic_publish(
                queue.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                properties,
            )
            .await
            .unwrap();
        confirms.push(confirm);
        if confirms.len() >= 200 {
            for c in confirms.drain(..) {
                c.await.unwrap();
            }
        }
    }
    let sent_in = started.elapsed();
    wait_all(&sink, MessageType::ResourcesChangedEvent, RATE * SECONDS, Duration::from_secs(60)).await;
    let log = store.version_log().await.unwrap();
    let arrivals = arrivals(&sink, MessageType::ResourcesChangedEvent);
    let commit_times = commit_times.lock().unwrap().clone();
    let mut from_commit = Vec::new();
    let mut from_row = Vec::new();
    for c in &log {
        let key = format!("{}|{}", c.key, c.version_id);
        let Some(at) = arrivals.get(&key) else { continue };
        let millis = |from: DateTime<Utc>| (*at - from).num_microseconds().map(|us| us as f64 / 1000.0);
        from_row.extend(millis(c.recorded_at));
        from_commit.extend(commit_times.get(&key).and_then(|t| millis(*t)));
    }
    from_commit.sort_by(f64::total_cmp);
    from_row.sort_by(f64::total_cmp);
    println!(
        "{label:<10} latency  {} commands in {:.1} s ({:.0}/s offered), {} events received: commit→consumer p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        RATE * SECONDS,
        sent_in.as_secs_f64(),
        (RATE * SECONDS) as f64 / sent_in.as_secs_f64(),
        from_commit.len(),
        percentile(&from_commit, 0.50),
        percentile(&from_commit, 0.99),
        from_commit.last().copied().unwrap_or(f64::NAN),
    );
    println!(
        "{label:<10} latency  row written→consumer p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&from_row, 0.50),
        percentile(&from_row, 0.99),
        from_row.last().copied().unwrap_or(f64::NAN),
    );
    let _ = stop.send(true);
    let _ = running.await;
    let _ = publishing.await;
    transport.close().await;
}

async fn backlog(store: Arc<dyn Store>, label: &str, full: bool) {
    const CHANGES: usize = 100_000;
    const PLAN: usize = 1000;
    let tag = format!("bl{}", Uuid::new_v4().simple());
    let message_type = if full { MessageType::ResourcesChangedEvent } else { MessageType::ResourcesChangedLightEvent };
    let sink = EventSink::start(&tag).await;
    let writing = Instant::now();
    for p in 0..CHANGES / PLAN {
        let instructions: Vec<_> = (0..PLAN)
            .map(|i| json!({ "itemId": i.to_string(), "operation": "upsert", "resource": patient(&format!("{tag}-{p}-{i}")) }))
            .collect();
        let text = json!({ "instructions": instructions }).to_string();
        let raw = fhir_pubsub::json::parse_lenient(&text).unwrap();
        let StorePlanMessage::Instructions(list) = read::store_plan(&raw).unwrap() else { unreachable!() };
        let limits = PlanLimits::default();
        let job = StoreJob { message_id: None, plan: validate_store_plan(list, &limits) };
        execute_store_plans(store.as_ref(), &[job]).await.unwrap();
    }
    let written_in = writing.elapsed();
    let (transport, _) = transport().await;
    let publisher = Arc::new(Publisher::new(store.clone(), transport.clone(), settings(full, !full)));
    let (stop, stopped) = watch::channel(false);
    let started = Instant::now();
    let publishing = tokio::spawn(publisher.clone().run(stopped));
    wait_all(&sink, message_type, CHANGES, Duration::from_secs(300)).await;
    let drained_in = started.elapsed();
    let received = arrivals(&sink, message_type).len();
    println!(
        "{label:<10} backlog  {} {} events: {received} changes received in {:.2} s = {:.0} changes/s (writing them took {:.1} s)",
        CHANGES,
        if full { "full" } else { "light" },
        drained_in.as_secs_f64(),
        received as f64 / drained_in.as_secs_f64(),
        written_in.as_secs_f64(),
    );
    let _ = stop.send(true);
    let _ = publishing.await;
    transport.close().await;
}

/// A fresh store of each kind; PostgreSQL databases are dropped afterwards.
async fn with_store<F, Fut>(kind: &str, body: F)
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if kind == "sqlite" {
        let dir = tempfile::tempdir().unwrap();
        let store = store::open(&format!("sqlite://{}/bench.db", dir.path().display())).await.unwrap();
        body(store.clone()).await;
        store.close().await;
        return;
    }
    let admin = std::env::var("FHIR_PUBSUB_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("fhir_pubsub_bench_{}", Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin).await.expect("PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin));
    let store = store::open(&url).await.unwrap();
    body(store.clone()).await;
    store.close().await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
        .execute(&mut conn)
        .await;
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo test --all-targets` runs this binary too, without `--bench`: the figures take minutes, so
    // only `cargo bench` measures.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("events: a benchmark; run it with `cargo bench --bench events`");
        return;
    }
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    for kind in ["sqlite", "postgres"] {
        if only.as_deref().is_some_and(|o| o != kind) {
            continue;
        }
        with_store(kind, |s| latency(s, kind)).await;
        with_store(kind, |s| backlog(s, kind, false)).await;
        with_store(kind, |s| backlog(s, kind, true)).await;
    }
}
