//! Operations against a running bridge process: the HTTP endpoints (`/healthz`, `/readyz`,
//! `/metrics`, `/status`) and their figures as commands flow, readiness through a store outage,
//! SIGTERM in the middle of a stream of commands, `check-config`, and secrets kept out of
//! everything the process shows.
//!
//! Each test runs `fhir-pubsub run` on its own store and application queue, with the HTTP endpoints
//! on a free port, against the local RabbitMQ and PostgreSQL.

mod amqp_support;
mod bridge_process;
mod common;
mod event_sink;
mod tcp_relay;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use bridge_process::BridgeProcess;
use event_sink::{ChangeKey, EventSink, key_of};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tcp_relay::Relay;
use uuid::Uuid;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const STORE_URN: &str = "urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand";
/// Upper bound for anything the tests wait for; reaching it fails the test.
const PATIENCE: Duration = Duration::from_secs(60);

/// GET over HTTP/1.0 (one request per connection): (status code, body). A dozen lines instead of an
/// HTTP client dependency; the endpoints answer with a Content-Length and close.
async fn get(address: SocketAddr, path: &str) -> (u16, String) {
    tokio::task::spawn_blocking({
        let path = path.to_owned();
        move || {
            let mut stream = std::net::TcpStream::connect(address).expect("connect to the HTTP endpoints");
            write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).expect("read the response");
            let code = response.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status line");
            let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
            (code, body)
        }
    })
    .await
    .unwrap()
}

async fn get_json(address: SocketAddr, path: &str) -> (u16, Value) {
    let (code, body) = get(address, path).await;
    (code, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}")))
}

/// Polls `path` until `done` holds for its JSON (at most [`PATIENCE`]); returns the last answer.
async fn wait_json(address: SocketAddr, path: &str, done: impl Fn(u16, &Value) -> bool) -> (u16, Value) {
    let started = Instant::now();
    loop {
        let (code, body) = get_json(address, path).await;
        if done(code, &body) {
            return (code, body);
        }
        assert!(started.elapsed() < PATIENCE, "{path} never reached the expected state: {code} {body:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The one input of a `/status` document.
fn input(status: &Value) -> &Value {
    let inputs = status["inputs"].as_array().expect("inputs");
    assert_eq!(inputs.len(), 1, "one input: {status:#}");
    &inputs[0]
}

fn destination<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["destinations"].as_array().unwrap().iter().find(|d| d["name"] == name).unwrap_or_else(|| {
        panic!("no destination {name}: {status:#}");
    })
}

fn patient(id: &str, version: &str) -> String {
    json!({"resourceType": "Patient", "id": id, "meta": {"versionId": version, "lastUpdated": "2024-01-01T00:00:00Z"}})
        .to_string()
}

/// A test's connection to RabbitMQ: sends commands to the bridge's queue, receives the replies on a
/// queue of its own, and deletes every queue and exchange of the test when done.
struct Client {
    connection: Connection,
    channel: Channel,
    queue: String,
    replies: String,
}

impl Client {
    async fn new(queue: &str) -> Client {
        let connection = Connection::connect(AMQP, ConnectionProperties::default()).await.expect("RabbitMQ");
        let channel = connection.create_channel().await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let replies = format!("fhir-pubsub-test-replies-{}", Uuid::new_v4().simple());
        // The MassTransit form of a reply endpoint: a fanout exchange with a queue of the same name bound to it.
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        amqp_support::queue_on_fanout(&channel, &replies, &replies, durable).await;
        Client { connection, channel, queue: queue.to_owned(), replies }
    }

    /// Publishes a raw body to the bridge's exchange, waiting for the broker's confirm.
    async fn publish(&self, body: &[u8]) {
        let properties = BasicProperties::default()
            .with_content_type("application/vnd.masstransit+json".into())
            .with_delivery_mode(2);
        self.channel
            .basic_publish(self.queue.as_str().into(), "".into(), BasicPublishOptions::default(), body, properties)
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// A store plan envelope asking for a reply on this client's queue; `requestId` = `messageId` = `id`.
    fn store_plan(&self, id: Uuid, instructions: Value) -> Vec<u8> {
        json!({
            "messageId": id, "requestId": id,
            "messageType": [STORE_URN],
            "headers": {"fhir-release": "R4"},
            "responseAddress": format!("rabbitmq://127.0.0.1/{}", self.replies),
            "message": {"instructions": instructions},
        })
        .to_string()
        .into_bytes()
    }

    /// Takes every message of `queue` now waiting there, as JSON.
    async fn drain(&self, queue: &str) -> Vec<Value> {
        let mut taken = Vec::new();
        while let Some(m) =
            self.channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.expect("basic.get")
        {
            taken.push(serde_json::from_slice(&m.delivery.data).unwrap_or(Value::Null));
        }
        taken
    }

    /// Waits for `count` replies (at most [`PATIENCE`]) and returns them.
    async fn replies(&self, count: usize) -> Vec<Value> {
        let started = Instant::now();
        let mut got = Vec::new();
        while got.len() < count {
            got.extend(self.drain(&self.replies).await);
            assert!(started.elapsed() < PATIENCE, "only {} of {count} replies: {got:?}", got.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        got
    }

    async fn remove(self) {
        for name in [
            self.replies.clone(),
            self.queue.clone(),
            format!("{}_error", self.queue),
            format!("{}_skipped", self.queue),
        ] {
            let _ = self.channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
            let _ = self.channel.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default()).await;
        }
        let _ = self.connection.close(200, "done".into()).await;
    }
}

fn unique_queue() -> String {
    format!("fhir-pubsub-test-{}", Uuid::new_v4().simple())
}

/// Starts a bridge and waits until it consumes; returns it with its HTTP address.
async fn started(command: Command) -> (BridgeProcess, SocketAddr) {
    let bridge = BridgeProcess::spawn(command);
    let address = bridge.http_address(PATIENCE).await;
    assert!(bridge.wait_logged("bridge consuming commands", PATIENCE).await, "never consumed: {}", bridge.log_text());
    (bridge, address)
}

/// The value of one sample of the metrics text (`name{labels} value`), or None when absent.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endpoints_report_what_the_bridge_does() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique_queue();
    let tag = format!("o{}", Uuid::new_v4().simple());
    let sink = EventSink::start(&tag).await;
    let store_url = format!("sqlite://{}/store.db", dir.path().display());
    let (mut bridge, http) = started(BridgeProcess::command(&store_url, &queue)).await;
    let client = Client::new(&queue).await;

    let (code, body) = get(http, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, ready) = get_json(http, "/readyz").await;
    assert_eq!(code, 200, "{ready:#}");
    assert_eq!(ready["status"], "ready");
    let names: Vec<&str> = ready["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["process", "store", "broker", "publisher"]);

    let (_, before) = get_json(http, "/status").await;
    assert_eq!(before["status"], "running");
    assert_eq!(input(&before)["address"], format!("rabbitmq://127.0.0.1/{queue}"));
    assert_eq!(input(&before)["status"], "active");
    assert_eq!(input(&before)["messagesDelivered"], 0);

    // Three plans applied, one refused on a rule (an update of a resource that does not exist),
    // one body that is not JSON (to the error queue), one message of a type nobody consumes.
    for n in 0..3 {
        let id = format!("{tag}-{n}");
        let plan = client
            .store_plan(Uuid::new_v4(), json!([{"itemId": id, "operation": "upsert", "resource": patient(&id, "1")}]));
        client.publish(&plan).await;
    }
    let missing = format!("{tag}-missing");
    let refused = client.store_plan(
        Uuid::new_v4(),
        json!([{"itemId": "x", "operation": "update", "resource": patient(&missing, "1")}]),
    );
    client.publish(&refused).await;
    client.publish(b"this is not JSON").await;
    client.publish(json!({"messageType": ["urn:message:Other:Thing"], "message": {}}).to_string().as_bytes()).await;
    let replies = client.replies(4).await;
    assert_eq!(replies.iter().filter(|r| r["message"]["errors"].as_array().is_some_and(Vec::is_empty)).count(), 3);

    let (_, status) = wait_json(http, "/status", |_, s| {
        let i = input(s);
        i["messagesDelivered"] == 4 && i["messagesDeliveryAttempts"] == 1 && i["messagesSkipped"] == 1
    })
    .await;
    let i = input(&status);
    assert_eq!(i["messagesInProcess"], 0);
    let errors = i["lastErrorDetail"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{status:#}");
    assert!(errors[0]["message"].as_str().unwrap().contains("moved to the error queue"), "{errors:?}");
    assert!(errors[0]["timestamp"].as_str().is_some());

    // The three patients' changes are published; the outbox is empty and the cursor moved.
    let (_, status) = wait_json(http, "/status", |_, s| {
        s["publisher"]["changesPublished"].as_u64() >= Some(3) && s["publisher"]["lagChanges"] == 0
    })
    .await;
    for name in ["ResourcesChangedEvent", "ResourcesChangedLightEvent"] {
        let d = destination(&status, name);
        assert_eq!(d["status"], "active", "{d:#}");
        assert!(d["messagesDelivered"].as_u64().unwrap() >= 1, "{d:#}");
        assert_eq!(d["messagesQueued"], 0);
        assert_eq!(d["messagesDeliveryAttempts"], 0);
    }
    assert!(status["publisher"]["cursor"].as_i64().unwrap() >= 3, "{status:#}");
    assert_eq!(status["publisher"]["leading"], true);
    assert_eq!(status["store"], json!({"kind": "sqlite", "reachable": true, "error": null}));
    let want: HashSet<ChangeKey> = (0..3)
        .map(|n| (format!("Patient/{tag}-{n}"), "1".to_owned(), fhir_pubsub::contracts::ChangeType::Create))
        .collect();
    let log = fhir_pubsub::store::open(&store_url).await.unwrap().version_log().await.unwrap();
    sink.wait_for(&log, PATIENCE).await;
    let got: HashSet<ChangeKey> =
        sink.changes(fhir_pubsub::contracts::MessageType::ResourcesChangedEvent).into_iter().map(|c| c.0).collect();
    assert_eq!(got, want);

    // The same figures as a FHIR Parameters resource.
    let (code, parameters) = get_json(http, "/status?_format=fhir").await;
    assert_eq!(code, 200);
    assert_eq!(parameters["resourceType"], "Parameters");
    let input_part = parameters["parameter"].as_array().unwrap().iter().find(|p| p["name"] == "input").expect("input");
    let delivered = input_part["part"].as_array().unwrap().iter().find(|p| p["name"] == "messagesDelivered").unwrap();
    assert_eq!(delivered["valueDecimal"], 4);
    let (code, _) = get(http, "/status?_format=xml").await;
    assert_eq!(code, 400, "an unknown _format is refused, not ignored");

    // Prometheus text with the same story.
    let (code, metrics) = get(http, "/metrics").await;
    assert_eq!(code, 200);
    let store_type = "type=\"ExecuteStorePlanCommand\"";
    assert_eq!(
        sample(&metrics, &format!("fhir_pubsub_commands_received_total{{{store_type}}}")),
        Some(4.0),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, &format!("fhir_pubsub_commands_total{{{store_type},outcome=\"success\"}}")), Some(3.0));
    assert_eq!(sample(&metrics, &format!("fhir_pubsub_commands_total{{{store_type},outcome=\"error\"}}")), Some(1.0));
    assert_eq!(sample(&metrics, "fhir_pubsub_commands_total{type=\"unknown\",outcome=\"error_queue\"}"), Some(1.0));
    assert_eq!(sample(&metrics, "fhir_pubsub_replies_sent_total"), Some(4.0));
    assert_eq!(sample(&metrics, "fhir_pubsub_error_queue_moves_total"), Some(1.0));
    assert_eq!(sample(&metrics, "fhir_pubsub_skipped_queue_moves_total"), Some(1.0));
    assert_eq!(sample(&metrics, &format!("fhir_pubsub_plan_duration_seconds_count{{{store_type}}}")), Some(4.0));
    assert_eq!(sample(&metrics, &format!("fhir_pubsub_plan_instructions_sum{{{store_type}}}")), Some(4.0));
    // The four store plans (the refused one too: its answer is kept) went through the group commit.
    assert_eq!(sample(&metrics, "fhir_pubsub_store_transaction_plans_sum"), Some(4.0), "{metrics}");
    let transactions = sample(&metrics, "fhir_pubsub_store_transaction_seconds_count").unwrap_or(0.0);
    assert!((1.0..=4.0).contains(&transactions), "{transactions} transactions for four plans");
    assert!(sample(&metrics, "fhir_pubsub_events_published_total{type=\"ResourcesChangedEvent\"}").unwrap() >= 1.0);
    assert_eq!(sample(&metrics, "fhir_pubsub_broker_connected"), Some(1.0));
    assert_eq!(sample(&metrics, "fhir_pubsub_publisher_leading"), Some(1.0));
    assert!(metrics.contains("# TYPE fhir_pubsub_plan_duration_seconds histogram"), "{metrics}");
    assert!(metrics.contains("# HELP fhir_pubsub_commands_total "), "{metrics}");

    // Logs: key=value lines with the message as msg="…".
    let log = bridge.log_text();
    let handled = log.lines().find(|l| l.contains("msg=\"store plan handled\"")).unwrap_or_else(|| panic!("{log}"));
    assert!(
        handled.starts_with("ts=") && handled.contains(" level=info ") && handled.contains(" changes=1"),
        "{handled}"
    );

    assert_eq!(bridge.terminate(), Some(0));
    client.remove().await;
}

/// `postgres://user@host:port/db` with host and port replaced by `address`.
fn through(url: &str, address: SocketAddr) -> String {
    let parsed = url::Url::parse(url).unwrap();
    let mut relayed = parsed.clone();
    relayed.set_host(Some(&address.ip().to_string())).unwrap();
    relayed.set_port(Some(address.port())).unwrap();
    relayed.to_string()
}

fn postgres_address(url: &str) -> SocketAddr {
    let parsed = url::Url::parse(url).unwrap();
    let host = parsed.host_str().unwrap();
    let host = if host == "localhost" { "127.0.0.1" } else { host };
    format!("{host}:{}", parsed.port().unwrap_or(5432)).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_fails_while_the_store_is_away_and_recovers() {
    let store = common::TestStore::new(common::Kind::Postgres).await;
    let relay = Relay::start(postgres_address(&store.url)).await;
    let queue = unique_queue();
    let (mut bridge, http) = started(BridgeProcess::command(&through(&store.url, relay.address), &queue)).await;
    let client = Client::new(&queue).await;
    wait_json(http, "/readyz", |code, _| code == 200).await;

    relay.cut();
    let (_, not_ready) = wait_json(http, "/readyz", |code, _| code == 503).await;
    assert_eq!(not_ready["status"], "not ready");
    let reason = not_ready["reason"].as_str().unwrap();
    assert!(reason.starts_with("store: postgres unreachable"), "{not_ready:#}");
    let checks = not_ready["checks"].as_array().unwrap();
    let broker = checks.iter().find(|c| c["name"] == "broker").unwrap();
    assert_eq!(broker["ok"], true, "only the store fails: {not_ready:#}");
    let (_, status) = get_json(http, "/status").await;
    assert_eq!(status["store"]["reachable"], false);
    assert!(status["store"]["error"].as_str().is_some(), "{status:#}");

    // A command sent during the outage is given back, not lost, and applied once the store returns.
    let id = format!("outage-{}", Uuid::new_v4().simple());
    let plan = client
        .store_plan(Uuid::new_v4(), json!([{"itemId": id, "operation": "upsert", "resource": patient(&id, "1")}]));
    client.publish(&plan).await;
    wait_json(http, "/status", |_, s| input(s)["messagesDeliveryAttempts"].as_u64() >= Some(1)).await;

    relay.restore();
    let (_, ready) = wait_json(http, "/readyz", |code, _| code == 200).await;
    assert_eq!(ready["status"], "ready");
    let replies = client.replies(1).await;
    assert_eq!(replies[0]["message"]["errors"], json!([]), "{replies:?}");
    let (_, status) = wait_json(http, "/status", |_, s| input(s)["messagesDelivered"] == 1).await;
    let errors = input(&status)["lastErrorDetail"].as_array().unwrap();
    assert!(
        errors.iter().all(|e| e["message"].as_str().unwrap().contains("given back for a later attempt")),
        "{errors:?}"
    );
    let log = store.version_log().await.unwrap();
    assert_eq!(log.iter().filter(|c| c.key.resource_id == id).count(), 1, "applied once");

    assert_eq!(bridge.terminate(), Some(0));
    client.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_loses_nothing() {
    let store = common::TestStore::new(common::Kind::Postgres).await;
    let queue = unique_queue();
    let tag = format!("s{}", Uuid::new_v4().simple());
    let sink = EventSink::start(&tag).await;
    let mut command = BridgeProcess::command(&store.url, &queue);
    command
        .env("FHIRPUBSUB_PubSub__MessageBroker__ConcurrencyNumber", "8")
        .env("FHIRPUBSUB_PubSub__MessageBroker__PrefetchCount", "32");
    let (mut bridge, http) = started(command).await;
    let client = Client::new(&queue).await;

    const COMMANDS: usize = 1500;
    let mut sent = HashSet::new();
    let mut confirms = Vec::new();
    for n in 0..COMMANDS {
        let id = Uuid::new_v4();
        sent.insert(id);
        let resource = format!("{tag}-{n}");
        let body = client
            .store_plan(id, json!([{"itemId": resource, "operation": "upsert", "resource": patient(&resource, "1")}]));
        let properties = BasicProperties::default()
            .with_content_type("application/vnd.masstransit+json".into())
            .with_delivery_mode(2);
        let confirm = client
            .channel
            .basic_publish(queue.as_str().into(), "".into(), BasicPublishOptions::default(), &body, properties)
            .await
            .unwrap();
        confirms.push(confirm);
    }
    for confirm in confirms {
        confirm.await.unwrap();
    }
    // Stop in the middle of the stream.
    wait_json(http, "/status", |_, s| input(s)["messagesDelivered"].as_u64() >= Some(50)).await;
    assert_eq!(bridge.terminate(), Some(0), "SIGTERM ends with 0: {}", bridge.log_text());
    assert!(bridge.logged("shutting down") && bridge.logged("msg=stopped"), "{}", bridge.log_text());

    // Every command was either applied and answered, or is still in the queue for the next start.
    let replies = client.drain(&client.replies).await;
    let replied: HashSet<Uuid> = replies.iter().filter_map(|r| r["requestId"].as_str()?.parse().ok()).collect();
    assert!(replies.iter().all(|r| r["message"]["errors"] == json!([])), "every plan succeeds");
    let waiting: HashSet<Uuid> =
        client.drain(&queue).await.iter().filter_map(|m| m["messageId"].as_str()?.parse().ok()).collect();
    let missing: Vec<&Uuid> = sent.iter().filter(|id| !replied.contains(id) && !waiting.contains(id)).collect();
    assert!(missing.is_empty(), "{} commands neither answered nor in the queue", missing.len());
    assert!(!waiting.is_empty(), "the stop came after the last command: the test proves nothing");
    assert!(replied.len() >= 50);

    // Each answered command is in the store, and every committed change was published before the exit.
    let log = store.version_log().await.unwrap();
    assert!(log.len() >= replied.len(), "{} changes for {} answered commands", log.len(), replied.len());
    assert_eq!(store.outbox_state().await.unwrap().pending, 0, "the outbox was published before the exit");
    sink.wait_for(&log, PATIENCE).await;
    let published: HashSet<ChangeKey> =
        sink.changes(fhir_pubsub::contracts::MessageType::ResourcesChangedEvent).into_iter().map(|c| c.0).collect();
    let committed: HashSet<ChangeKey> = log.iter().map(key_of).collect();
    assert_eq!(published, committed, "every committed change published");
    client.remove().await;
}

/// Runs `fhir-pubsub` with these arguments and variables: (exit code, stdout, stderr).
fn run_cli(args: &[&str], env: &[(&str, String)]) -> (Option<i32>, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fhir-pubsub"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("FHIRPUBSUB_LOG_FORMAT")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run fhir-pubsub");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_tries_each_connection_and_names_the_failing_one() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique_queue();
    let base = vec![
        ("FHIRPUBSUB_Store__Url", format!("sqlite://{}/check.db", dir.path().display())),
        ("FHIRPUBSUB_PubSub__MessageBroker__ApplicationQueueName", queue.clone()),
        ("FHIRPUBSUB_Http__Listen", "127.0.0.1:0".to_owned()),
    ];
    let (code, stdout, stderr) = run_cli(&["check-config"], &base);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let settings: Value =
        serde_json::from_str(&stdout[..stdout.find("\nhttp ").expect("the checks follow the settings") + 1]).unwrap();
    assert_eq!(
        settings["Shutdown"],
        json!({"TimeoutSeconds": 30, "PublishTimeoutSeconds": 15}),
        "effective settings, defaults included"
    );
    assert!(stdout.contains("\nhttp 127.0.0.1:0: ok\n"), "{stdout}");
    assert!(stdout.contains("check.db: ok (sqlite, schema up to date)\n"), "{stdout}");
    assert!(stdout.contains(&format!("broker rabbitmq://127.0.0.1/{queue}: ok\n")), "{stdout}");

    // An address in use, a database server that is not there: each named, with the reason; the broker still ok.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut failing = base.clone();
    failing[0].1 = format!("postgres://postgres@127.0.0.1:{closed_port}/nothing");
    failing[2].1 = taken.local_addr().unwrap().to_string();
    let (code, stdout, stderr) = run_cli(&["check-config"], &failing);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("http {}: FAILED: cannot listen there:", taken.local_addr().unwrap())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "store postgres://postgres@127.0.0.1:{closed_port}/nothing: FAILED: the database is unavailable"
        )),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("broker rabbitmq://127.0.0.1/{queue}: ok")), "{stdout}");

    // `run` refuses to start on an address in use, before connecting anywhere.
    let (code, _, stderr) = run_cli(&["run"], &failing);
    assert_eq!(code, Some(1));
    assert!(stderr.contains(&format!("cannot listen on Http.Listen {}", taken.local_addr().unwrap())), "{stderr}");

    // A settings error names the key.
    let mut invalid = base.clone();
    invalid.push(("FHIRPUBSUB_Shutdown__TimeoutSeconds", "0".to_owned()));
    let (code, _, stderr) = run_cli(&["check-config"], &invalid);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("Shutdown.TimeoutSeconds: must be at least 1, found 0"), "{stderr}");
    let channel =
        Connection::connect(AMQP, ConnectionProperties::default()).await.unwrap().create_channel().await.unwrap();
    let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn configured_secrets_never_appear_in_logs_status_or_metrics() {
    let store = common::TestStore::new(common::Kind::Postgres).await;
    // Trust authentication on the test server: the password is configured but never needed.
    let store_secret = format!("StorePw-{}", Uuid::new_v4().simple());
    let url = url::Url::parse(&store.url).unwrap();
    let mut with_password = url.clone();
    with_password.set_password(Some(&store_secret)).unwrap();
    let queue = unique_queue();
    let passphrase = format!("Passphrase-{}", Uuid::new_v4().simple());

    // A running bridge, every module logging at debug level, in JSON.
    let mut command = BridgeProcess::command(with_password.as_str(), &queue);
    command
        .arg("--log-format")
        .arg("json")
        .env("RUST_LOG", "debug")
        .env("FHIRPUBSUB_PubSub__MessageBroker__Kafka__KeystorePassword", &passphrase);
    let (mut bridge, http) = started(command).await;
    let client = Client::new(&queue).await;
    let id = format!("secret-{}", Uuid::new_v4().simple());
    client
        .publish(
            &client.store_plan(
                Uuid::new_v4(),
                json!([{"itemId": id, "operation": "upsert", "resource": patient(&id, "1")}]),
            ),
        )
        .await;
    client.publish(b"not JSON").await;
    client.replies(1).await;
    let mut shown = String::new();
    for path in ["/status", "/status?_format=fhir", "/metrics", "/readyz"] {
        shown.push_str(&get(http, path).await.1);
    }
    assert_eq!(bridge.terminate(), Some(0));
    let log = bridge.log_text();
    assert!(log.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()), "JSON lines only: {log}");
    assert!(log.contains("\"message\":\"store plan handled\""), "{log}");
    assert!(log.contains("postgres://postgres:***@"), "the store URL is logged, its password hidden: {log}");

    // check-config with a wrong broker password: it fails, naming the broker, never the password.
    let broker_secret = format!("BrokerPw-{}", Uuid::new_v4().simple());
    let env = vec![
        ("FHIRPUBSUB_Store__Url", with_password.to_string()),
        ("FHIRPUBSUB_PubSub__MessageBroker__Password", broker_secret.clone()),
        ("FHIRPUBSUB_PubSub__MessageBroker__ApplicationQueueName", queue.clone()),
        ("FHIRPUBSUB_Http__Listen", "127.0.0.1:0".to_owned()),
        ("RUST_LOG", "debug".to_owned()),
    ];
    let (code, stdout, stderr) = run_cli(&["check-config"], &env);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("broker: FAILED: connecting to RabbitMQ: the broker refused"), "{stdout}");
    assert!(stdout.contains("\"Password\": \"***\""), "{stdout}");
    // And `run` with it stops at start, saying why.
    let (code, run_out, run_err) = run_cli(&["run"], &env);
    assert_eq!(code, Some(1));
    assert!(run_err.contains("the broker refused"), "{run_err}");

    for secret in [&store_secret, &passphrase, &broker_secret] {
        for (what, text) in [
            ("log", &log),
            ("endpoints", &shown),
            ("check-config", &format!("{stdout}{stderr}")),
            ("run", &format!("{run_out}{run_err}")),
        ] {
            assert!(!text.contains(secret.as_str()), "{what} shows a secret: {text}");
        }
    }
    client.remove().await;
}
