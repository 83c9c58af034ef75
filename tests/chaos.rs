//! Crash and outage scenarios: a mixed workload of store plans runs through a bridge process while
//! a scenario kills the bridge or takes away its broker, its database or its disk, or slows down
//! the consumer of its events; afterwards the harness ([`chaos_support`]) checks against a model of
//! the commands sent that every command had exactly one effect and one kind of reply, that every
//! committed change was published in order, and that the bridge recovered by itself.
//!
//! A test target (not a bench) so that `cargo test` in CI runs the short variant of every scenario
//! with the test support the other suites share; `scripts/chaos --long` runs it with 20,000
//! commands a scenario (`FHIR_PUBSUB_CHAOS=long`) and collects the figures.
//!
//! Servers that a scenario stops are private to it (a RabbitMQ node, a PostgreSQL cluster, a
//! tmpfs): the shared RabbitMQ and PostgreSQL are never stopped.

mod bridge_process;
mod chaos_support;
mod common;
#[cfg(feature = "kafka")]
mod kafka_support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bridge_process::BridgeProcess;
use chaos_support::amqp::{self, AmqpClient, EventConsumer};
use chaos_support::servers::{PrivatePostgres, PrivateRabbit, SmallDisk};
use chaos_support::workload::{Model, Rng};
use chaos_support::{Collected, Driven, Report, Size, check, drive, ready_since, reply_since, wait_answered};
use fhir_pubsub::store::Store;
use tokio::sync::mpsc;
use uuid::Uuid;

const SHARED_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// No reply for this long while commands wait: they are lost.
const QUIET: Duration = Duration::from_secs(120);
/// How long a recovery may take before the scenario gives up measuring it.
const RECOVERY_LIMIT: Duration = Duration::from_secs(180);

/// A bridge process on one store and broker, and the client driving it.
struct Rig {
    tag: String,
    queue: String,
    amqp_url: String,
    amqp_port: u16,
    store_url: String,
    extra_env: Vec<(String, String)>,
    bridge: BridgeProcess,
    collected: Arc<Collected>,
    client: Option<AmqpClient>,
    first_replies: Option<mpsc::UnboundedReceiver<(Uuid, serde_json::Value)>>,
}

impl Rig {
    async fn start(
        amqp_url: &str,
        amqp_port: u16,
        store_url: &str,
        extra_env: &[(&str, &str)],
        events: EventConsumer,
    ) -> Rig {
        let tag = format!("x{}", &Uuid::new_v4().simple().to_string()[..12]);
        let queue = format!("fhir-pubsub-chaos-{}", Uuid::new_v4().simple());
        let extra_env: Vec<(String, String)> = extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let collected = Arc::new(Collected::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let client = AmqpClient::start(amqp_url, &queue, events, collected.clone(), &tag, tx).await;
        let bridge = spawn_bridge(store_url, &queue, amqp_port, &extra_env);
        let rig = Rig {
            tag,
            queue,
            amqp_url: amqp_url.to_owned(),
            amqp_port,
            store_url: store_url.to_owned(),
            extra_env,
            bridge,
            collected,
            client: Some(client),
            first_replies: Some(rx),
        };
        let address = rig.bridge.http_address(Duration::from_secs(60)).await;
        assert!(
            ready_since(address, Instant::now(), Duration::from_secs(120)).await.is_some(),
            "the bridge never became ready: {}",
            rig.bridge.log_text()
        );
        rig
    }

    fn spawn_bridge(&self) -> BridgeProcess {
        spawn_bridge(&self.store_url, &self.queue, self.amqp_port, &self.extra_env)
    }

    /// Starts driving the workload in a task of its own.
    fn drive(&mut self, size: Size, seed: u64) -> tokio::task::JoinHandle<(Driven, AmqpClient)> {
        let model = Model::new(&self.tag, size.resources, seed);
        let mut client = self.client.take().unwrap();
        let mut replies = self.first_replies.take().unwrap();
        tokio::spawn(async move {
            let driven = drive(model, &mut client, &mut replies, size, QUIET).await;
            (driven, client)
        })
    }

    /// Checks the run, prints the report, cleans up, and fails on any problem.
    async fn finish(
        self,
        scenario: &str,
        store_name: &str,
        store: &dyn Store,
        driving: tokio::task::JoinHandle<(Driven, AmqpClient)>,
        recovery_ready: Vec<f64>,
        recovery_reply: Vec<f64>,
    ) -> Report {
        self.finish_within(
            scenario,
            store_name,
            store,
            driving,
            recovery_ready,
            recovery_reply,
            Duration::from_secs(180),
        )
        .await
    }

    /// [`Rig::finish`], waiting up to `event_limit` for the events to cover the version log.
    #[allow(clippy::too_many_arguments)]
    async fn finish_within(
        mut self,
        scenario: &str,
        store_name: &str,
        store: &dyn Store,
        driving: tokio::task::JoinHandle<(Driven, AmqpClient)>,
        recovery_ready: Vec<f64>,
        recovery_reply: Vec<f64>,
        event_limit: Duration,
    ) -> Report {
        let (driven, client) = driving.await.expect("the workload ran");
        let mut report = check(scenario, store_name, store, &driven, &self.collected, event_limit).await;
        report.recovery_ready_s = recovery_ready;
        report.recovery_reply_s = recovery_reply;
        if let Ok(Some(status)) = self.bridge.child.try_wait() {
            report.problems.push(format!("the bridge exited by itself ({status})"));
        }
        report.refused_event_publishes = self.bridge.log_text().matches("did not accept the message").count() as u64;
        report.print();
        if !report.problems.is_empty() {
            let log = self.bridge.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("bridge log tail:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        self.bridge.terminate();
        client.close().await;
        amqp::delete_endpoint(&self.amqp_url, &self.queue).await;
        report
    }
}

/// `fhir-pubsub run` on `store_url`, the broker on 127.0.0.1:`amqp_port` and the application queue `queue`.
fn spawn_bridge(store_url: &str, queue: &str, amqp_port: u16, extra_env: &[(String, String)]) -> BridgeProcess {
    let mut command = BridgeProcess::command(store_url, queue);
    command
        .env("RUST_LOG", "warn,fhir_pubsub=info")
        .env("FHIRPUBSUB_PubSub__MessageBroker__Host", "127.0.0.1")
        .env("FHIRPUBSUB_PubSub__MessageBroker__Port", amqp_port.to_string());
    for (k, v) in extra_env {
        command.env(k, v);
    }
    BridgeProcess::spawn(command)
}

/// Seconds, for the report.
fn secs(d: Option<Duration>) -> f64 {
    d.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN)
}

// --- SIGKILL ×5 -------------------------------------------------------------------------------

/// The bridge killed with SIGKILL five times at random moments, restarted at once each time.
async fn sigkill_five_times(store: &common::TestStore, store_name: &str) {
    let size = Size::from_env();
    let mut rig = Rig::start(SHARED_AMQP, 5672, &store.url, &[], EventConsumer::default()).await;
    let driving = rig.drive(size, 1);
    let mut rng = Rng::new(7);
    let (mut ready, mut reply) = (Vec::new(), Vec::new());
    for k in 0..5 {
        wait_answered(&rig.collected, size.commands, 0.1 + 0.15 * k as f64, &driving).await;
        tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
        rig.bridge.kill();
        let before = rig.collected.answered();
        let restarted = Instant::now();
        rig.bridge = rig.spawn_bridge();
        let address = rig.bridge.http_address(Duration::from_secs(60)).await;
        ready.push(secs(ready_since(address, restarted, RECOVERY_LIMIT).await));
        reply.push(secs(reply_since(&rig.collected, before, restarted, RECOVERY_LIMIT).await));
    }
    let report = rig.finish("sigkill-x5", store_name, store.store.as_ref(), driving, ready, reply).await;
    report.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_five_times_sqlite() {
    let store = common::TestStore::new(common::Kind::Sqlite).await;
    sigkill_five_times(&store, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_five_times_postgres() {
    let store = common::TestStore::new(common::Kind::Postgres).await;
    sigkill_five_times(&store, "postgres").await;
}

// --- RabbitMQ stopped and started ---------------------------------------------------------------

/// A private RabbitMQ node stopped (SIGTERM to its VM) at a third of the run and started again
/// 3 s later on the same data; the bridge reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_restart() {
    let size = Size::from_env();
    let mut rabbit = PrivateRabbit::start();
    let store = common::TestStore::new(common::Kind::Postgres).await;
    let mut rig = Rig::start(&rabbit.url(), rabbit.port, &store.url, &[], EventConsumer::default()).await;
    let address = rig.bridge.http_address(Duration::from_secs(10)).await;
    let driving = rig.drive(size, 2);
    wait_answered(&rig.collected, size.commands, 0.3, &driving).await;
    rabbit.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = rig.collected.answered();
    rabbit.launch();
    let back = Instant::now();
    let ready = secs(ready_since(address, back, RECOVERY_LIMIT).await);
    let reply = secs(reply_since(&rig.collected, before, back, RECOVERY_LIMIT).await);
    let report =
        rig.finish("rabbitmq-restart", "postgres", store.store.as_ref(), driving, vec![ready], vec![reply]).await;
    report.assert_clean();
}

// --- PostgreSQL restarted (immediate) ------------------------------------------------------------

/// A private PostgreSQL cluster stopped with `pg_ctl stop -m immediate` at a third of the run and
/// started again 3 s later (crash recovery); the bridge gives the deliveries in flight back and
/// carries on by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restart_immediate() {
    let size = Size::from_env();
    let cluster = PrivatePostgres::start();
    let database = format!("chaos_{}", Uuid::new_v4().simple());
    let status = Command::new("psql")
        .arg(cluster.url("postgres"))
        .args(["-qc", &format!("CREATE DATABASE {database}")])
        .status()
        .expect("psql");
    assert!(status.success(), "create the database");
    let url = cluster.url(&database);
    let store = fhir_pubsub::store::open(&url).await.expect("open the private PostgreSQL store");
    let mut rig = Rig::start(SHARED_AMQP, 5672, &url, &[], EventConsumer::default()).await;
    let address = rig.bridge.http_address(Duration::from_secs(10)).await;
    let driving = rig.drive(size, 3);
    wait_answered(&rig.collected, size.commands, 0.3, &driving).await;
    cluster.stop_immediate();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = rig.collected.answered();
    cluster.launch();
    let back = Instant::now();
    let ready = secs(ready_since(address, back, RECOVERY_LIMIT).await);
    let reply = secs(reply_since(&rig.collected, before, back, RECOVERY_LIMIT).await);
    let report = rig.finish("postgres-restart", "postgres", store.as_ref(), driving, vec![ready], vec![reply]).await;
    store.close().await;
    report.assert_clean();
}

// --- A slow consumer of events -------------------------------------------------------------------

/// The only consumer of the events takes 20 ms a message and its queue holds at most 50, refusing
/// more (reject-publish): the publisher's publishes are nacked again and again, and it must back off
/// and publish again, losing nothing. A private RabbitMQ node, so that the nacks reach no other
/// bridge on the shared broker's event exchanges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_event_consumer() {
    let size = Size::from_env();
    let rabbit = PrivateRabbit::start();
    let store = common::TestStore::new(common::Kind::Sqlite).await;
    let slow = EventConsumer { delay: Some(Duration::from_millis(20)), max_length: Some(50) };
    let batch = [("FHIRPUBSUB_PubSub__ResourceChangeNotifications__MaxPublishBatchSize", "50")];
    let mut rig = Rig::start(&rabbit.url(), rabbit.port, &store.url, &batch, slow).await;
    let driving = rig.drive(size, 4);
    let limit = Duration::from_secs(if size.long { 1800 } else { 600 });
    let mut report =
        rig.finish_within("slow-event-consumer", "sqlite", store.store.as_ref(), driving, vec![], vec![], limit).await;
    if report.refused_event_publishes == 0 {
        report.problems.push("the consumer never pushed back: the scenario proves nothing".into());
    }
    report.assert_clean();
}

// --- The disk of a SQLite store full ------------------------------------------------------------

/// The SQLite store on a small tmpfs that is filled up at a third of the run for 5 s, then freed:
/// commands that cannot commit are neither acknowledged nor answered with an error, and the bridge
/// carries on by itself once there is room. Left out (and said so) where tmpfs cannot be mounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_disk_full() {
    let size = Size::from_env();
    let Some(disk) = SmallDisk::mount(256) else {
        eprintln!("CHAOS scenario=sqlite-disk-full skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let url = format!("sqlite://{}/store.db", disk.path().display());
    let store = fhir_pubsub::store::open(&url).await.expect("open the SQLite store");
    let mut rig = Rig::start(SHARED_AMQP, 5672, &url, &[], EventConsumer::default()).await;
    let address = rig.bridge.http_address(Duration::from_secs(10)).await;
    let driving = rig.drive(size, 5);
    wait_answered(&rig.collected, size.commands, 0.3, &driving).await;
    let filled = disk.fill();
    eprintln!("disk full: {filled} bytes of filler");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = rig.collected.answered();
    disk.free();
    let back = Instant::now();
    let ready = secs(ready_since(address, back, RECOVERY_LIMIT).await);
    let reply = secs(reply_since(&rig.collected, before, back, RECOVERY_LIMIT).await);
    let report = rig.finish("sqlite-disk-full", "sqlite", store.as_ref(), driving, vec![ready], vec![reply]).await;
    store.close().await;
    report.assert_clean();
}

// --- The Kafka broker restarted -----------------------------------------------------------------

/// A tansu broker keeping its data in an SQLite file (a produce is one transaction, so a crash loses
/// nothing it acknowledged), killed at a third of the run and started again 2 s later on the same port
/// and data; the bridge (BrokerType Kafka) carries on by itself.
#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_restart() {
    use chaos_support::kafka::{KafkaClient, Topics};
    let size = Size::from_env();
    let mut tansu = kafka_support::Tansu::start_persistent().await;
    let topics = Topics::new();
    tansu.create_topics(&topics.all(), 1).await;
    let store = common::TestStore::new(common::Kind::Postgres).await;
    let tag = format!("x{}", &Uuid::new_v4().simple().to_string()[..12]);
    let collected = Arc::new(Collected::default());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut client = KafkaClient::start(tansu.client_config(), topics.clone(), collected.clone(), &tag, tx);
    let mut command = BridgeProcess::command(&store.url, "unused-on-kafka");
    command
        .env("RUST_LOG", "warn,fhir_pubsub=info")
        .env("FHIRPUBSUB_PubSub__MessageBroker__BrokerType", "Kafka")
        .env("FHIRPUBSUB_PubSub__MessageBroker__Host", tansu.bootstrap())
        .env("FHIRPUBSUB_PubSub__MessageBroker__Kafka__TopicPrefix", &topics.prefix)
        .env("FHIRPUBSUB_PubSub__MessageBroker__Kafka__ClientGroupId", format!("{}-bridge", topics.prefix))
        .env("FHIRPUBSUB_PubSub__MessageBroker__Kafka__ExecuteStorePlanCommandErrorTopicName", &topics.errors)
        .env("FHIRPUBSUB_PubSub__MessageBroker__Kafka__ResourcesChangedEventTopicName", &topics.full)
        .env("FHIRPUBSUB_PubSub__MessageBroker__Kafka__ResourcesChangedLightEventTopicName", &topics.light);
    let mut bridge = BridgeProcess::spawn(command);
    let address = bridge.http_address(Duration::from_secs(60)).await;
    assert!(
        ready_since(address, Instant::now(), Duration::from_secs(120)).await.is_some(),
        "the bridge never became ready: {}",
        bridge.log_text()
    );
    let model = Model::new(&tag, size.resources, 6);
    let driving = tokio::spawn(async move {
        let driven = drive(model, &mut client, &mut rx, size, QUIET).await;
        (driven, client)
    });
    wait_answered(&collected, size.commands, 0.3, &driving).await;
    tansu.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = collected.answered();
    tansu.restart().await;
    let back = Instant::now();
    let ready = secs(ready_since(address, back, RECOVERY_LIMIT).await);
    let reply = secs(reply_since(&collected, before, back, RECOVERY_LIMIT).await);
    let (driven, client) = driving.await.expect("the workload ran");
    let mut report =
        check("kafka-restart", "postgres", store.store.as_ref(), &driven, &collected, Duration::from_secs(180)).await;
    report.recovery_ready_s = vec![ready];
    report.recovery_reply_s = vec![reply];
    report.resent_publishes = client.refused.load(std::sync::atomic::Ordering::Relaxed);
    if let Ok(Some(status)) = bridge.child.try_wait() {
        report.problems.push(format!("the bridge exited by itself ({status})"));
    }
    report.print();
    if report.events_missing > 0 {
        // Published and lost by the broker, or never published? The outbox, and the topics read again.
        eprintln!("CHAOS outbox after the run: {:?}", store.store.outbox_state().await);
        let again = Arc::new(Collected::default());
        let (tx, _rx) = mpsc::unbounded_channel();
        let reader = KafkaClient::start(tansu.client_config(), topics.clone(), again.clone(), &tag, tx);
        tokio::time::sleep(Duration::from_secs(30)).await;
        let events = again.events();
        for message_type in [
            fhir_pubsub::contracts::MessageType::ResourcesChangedEvent,
            fhir_pubsub::contracts::MessageType::ResourcesChangedLightEvent,
        ] {
            let n: usize = events.iter().filter(|m| m.message_type == message_type).map(|m| m.changes.len()).sum();
            eprintln!(
                "CHAOS {message_type:?}: a fresh reader of the topic finds {n} changes (committed: {})",
                report.committed_changes
            );
        }
        reader.close();
        let log = bridge.log_text();
        let notable: Vec<&str> =
            log.lines().filter(|l| l.contains("level=warn") || l.contains("level=error")).take(60).collect();
        eprintln!("bridge warnings:\n{}", notable.join("\n"));
    }
    if report.lost > 0 {
        // What the store holds for each lost command: applied or not.
        for command in &driven.lost {
            let lookups: Vec<fhir_pubsub::store::Lookup> = command
                .steps
                .iter()
                .map(|s| fhir_pubsub::store::Lookup {
                    key: fhir_pubsub::store::ResourceKey::new("Patient", driven.model.resource_id(s.resource)),
                    version_id: Some(format!("v{}", command.number)),
                })
                .collect();
            let found = store.store.read(&lookups).await;
            eprintln!("CHAOS lost command {} ({}): its versions in the store: {found:?}", command.number, command.id);
        }
        // Did the broker keep them? Read the command topic again from its start.
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::message::{Headers, Message};
        let reader: StreamConsumer = tansu
            .client_config()
            .set("group.id", format!("chaos-check-{}", Uuid::new_v4().simple()))
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        reader.subscribe(&[&topics.store]).expect("subscribe");
        let mut on_topic = std::collections::HashSet::new();
        let until = Instant::now() + Duration::from_secs(30);
        while let Ok(Ok(record)) = tokio::time::timeout_at(until.into(), reader.recv()).await {
            let id = record.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "MessageId")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
            on_topic.extend(id);
        }
        let kept = driven.lost.iter().filter(|c| on_topic.contains(&c.id.to_string())).count();
        eprintln!(
            "CHAOS the command topic holds {} records; of the {} lost commands it holds {kept}",
            on_topic.len(),
            driven.lost.len()
        );
        let log = bridge.log_text();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!("bridge log tail:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    bridge.terminate();
    client.close();
    report.assert_clean();
}

/// The fault the disk-full scenario found, on its own: a COMMIT that fails for lack of space (SQLite
/// then rolls the transaction back by itself) reports the store unavailable, and once there is room
/// again every later plan commits: no pooled connection is left believing a transaction is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_commit_on_a_full_disk_leaves_the_store_usable() {
    use fhir_pubsub::contracts::read::{self, StorePlanMessage};
    use fhir_pubsub::plan::{PlanLimits, StoreJob, execute_store_plans, validate_store_plan};
    let Some(disk) = SmallDisk::mount(8) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let store = fhir_pubsub::store::open(&format!("sqlite://{}/store.db", disk.path().display())).await.unwrap();
    let plan = |n: usize| {
        let body = serde_json::json!({"resourceType": "Patient", "id": format!("p{n}"),
            "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"}, "text": "x".repeat(20_000)})
        .to_string();
        let text = serde_json::json!({"instructions": [{"itemId": "0", "operation": "create", "resource": body}]});
        let raw = fhir_pubsub::json::parse_lenient(&text.to_string()).unwrap();
        let StorePlanMessage::Instructions(list) = read::store_plan(&raw).unwrap() else { panic!("inline plan") };
        vec![StoreJob { message_id: Some(Uuid::new_v4()), plan: validate_store_plan(list, &PlanLimits::default()) }]
    };
    for n in 0..3 {
        let outcome = execute_store_plans(store.as_ref(), &plan(n)).await.expect("room on the disk");
        assert!(outcome[0].response.errors.is_empty());
    }
    disk.fill();
    let mut refused = 0;
    for n in 3..10 {
        if let Err(e) = execute_store_plans(store.as_ref(), &plan(n)).await {
            assert!(e.is_unavailable(), "a full disk makes the store unavailable, not {e}");
            refused += 1;
        }
    }
    assert!(refused > 0, "a full disk refuses commits (the test proves nothing otherwise)");
    disk.free();
    for n in 10..40 {
        let outcome = execute_store_plans(store.as_ref(), &plan(n)).await.expect("room on the disk again");
        assert!(outcome[0].response.errors.is_empty());
    }
    store.close().await;
}
