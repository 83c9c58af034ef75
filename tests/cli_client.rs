//! The `store`, `retrieve` and `listen` commands, run as the built binary against the real
//! RabbitMQ: through a real bridge process (`fhir-pubsub run` on a temporary SQLite store), with
//! bad input, with events published by the test, and with nobody answering.
//!
//! Every test uses its own ApplicationQueueName and resource ids, so tests run in parallel and
//! beside other users of the broker; the event exchanges are shared, so event checks look for the
//! test's own resource id.

mod amqp_support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fhir_pubsub::contracts::{
    ChangeType, LightResourceChange, MessageType, ResourceChange, ResourceReference, ResourcesChangedEvent,
    ResourcesChangedLightEvent,
};
use fhir_pubsub::envelope::{Envelope, encode};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::value::RawValue;
use tokio::io::AsyncBufReadExt;
use uuid::Uuid;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const BIN: &str = env!("CARGO_BIN_EXE_fhir-pubsub");
const QUEUE_ENV: &str = "FHIRPUBSUB_PubSub__MessageBroker__ApplicationQueueName";
/// Upper bound for anything the tests wait for; reaching it fails the test.
const PATIENCE: Duration = Duration::from_secs(60);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::new_v4().simple())
}

/// A bridge process on a temporary SQLite store and its own ApplicationQueueName; killed on drop.
struct BridgeProcess {
    child: Child,
    queue: String,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl BridgeProcess {
    async fn start() -> BridgeProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let queue = unique("fhir-pubsub-cli-test");
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let mut child = Command::new(BIN)
            .arg("run")
            .env("RUST_LOG", "info")
            .env("FHIRPUBSUB_Store__Url", format!("sqlite://{}/db", dir.path().display()))
            .env(QUEUE_ENV, &queue)
            .env("FHIRPUBSUB_Http__Listen", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fhir-pubsub run");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stderr, lines) = (child.stderr.take().expect("stderr"), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let bridge = BridgeProcess { child, queue, log, _dir: dir };
        let started = std::time::Instant::now();
        while !bridge.log.lock().unwrap().iter().any(|l| l.contains("consuming")) {
            assert!(started.elapsed() < PATIENCE, "the bridge never started consuming: {:?}", bridge.log);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bridge
    }
}

impl BridgeProcess {
    /// Stops the bridge and deletes the queues and exchanges it declared under its own name.
    async fn remove(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let connection = Connection::connect(AMQP, ConnectionProperties::default()).await.expect("RabbitMQ");
        let channel = connection.create_channel().await.unwrap();
        for suffix in ["", "_error", "_skipped"] {
            let name = format!("{}{suffix}", self.queue);
            let _ = channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
            let _ = channel.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default()).await;
        }
        let _ = connection.close(200, "done".into()).await;
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a CLI run printed, and how it ended.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the CLI with `queue` as ApplicationQueueName; `stdin` is fed to it.
async fn cli(queue: &str, args: &[&str], stdin: Option<&str>) -> Run {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(args)
        .env(QUEUE_ENV, queue)
        .env_remove("RUST_LOG")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("start the CLI");
    if let Some(text) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(text.as_bytes()).await.expect("write stdin");
    }
    let output = tokio::time::timeout(PATIENCE, child.wait_with_output()).await.expect("the CLI ends").expect("output");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("UTF-8 stderr"),
    }
}

fn patient(id: &str, version: &str, pretty: bool) -> String {
    if pretty {
        format!(
            "{{\n  \"resourceType\": \"Patient\",\n  \"id\": \"{id}\",\n  \"meta\": {{ \"versionId\": \"{version}\", \"lastUpdated\": \"2024-01-01T00:00:00Z\" }},\n  \"name\": [ {{ \"family\": \"Ünïcode\" }} ]\n}}"
        )
    } else {
        format!(
            r#"{{"resourceType":"Patient","id":"{id}","meta":{{"versionId":"{version}","lastUpdated":"2024-01-01T00:00:00Z"}},"active":true}}"#
        )
    }
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write input file");
    path.display().to_string()
}

/// The resources a `retrieve` printed, as their exact texts.
fn printed_resources(run: &Run) -> Vec<String> {
    let items: Vec<Box<RawValue>> = serde_json::from_str(&run.stdout).expect("retrieve prints a JSON array");
    items.into_iter().map(|r| r.get().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_and_retrieve_through_a_bridge() {
    let bridge = BridgeProcess::start().await;
    let q = bridge.queue.as_str();
    let dir = tempfile::tempdir().unwrap();
    let tag = Uuid::new_v4().simple().to_string();
    let id = |n: &str| format!("{n}-{tag}");

    let single = patient(&id("single"), "1", true);
    let lines = [patient(&id("line1"), "1", false), patient(&id("line2"), "7", false)];
    let entries = [patient(&id("entry1"), "1", false), patient(&id("entry2"), "1", true)];
    let bundle = format!(
        "{{\"resourceType\":\"Bundle\",\"type\":\"collection\",\"entry\":[\n{{\"fullUrl\":\"urn:x\",\"resource\":{}}},\n{{\"resource\":{}}}\n]}}",
        entries[0], entries[1]
    );
    let files = [
        write(&dir, "single.json", &format!("{single}\n")),
        write(&dir, "lines.ndjson", &format!("{}\n{}\n", lines[0], lines[1])),
        write(&dir, "bundle.json", &bundle),
    ];
    let store = cli(q, &["store", &files[0], &files[1], &files[2]], None).await;
    assert_eq!(store.code, Some(0), "{}", store.stderr);
    let response: serde_json::Value = serde_json::from_str(&store.stdout).expect("the response message as JSON");
    assert_eq!(response, serde_json::json!({"errors": []}));

    let refs = [id("single"), id("line1"), id("line2"), id("entry1"), id("entry2")].map(|i| format!("Patient/{i}"));
    let mut args = vec!["retrieve"];
    args.extend(refs.iter().map(String::as_str));
    let retrieved = cli(q, &args, None).await;
    assert_eq!(retrieved.code, Some(0), "{}", retrieved.stderr);
    let expected = [single.clone(), lines[0].clone(), lines[1].clone(), entries[0].clone(), entries[1].clone()];
    assert_eq!(printed_resources(&retrieved), expected, "byte-identical bodies, in the order asked");

    // A version by _history, one line per resource.
    let versioned = format!("Patient/{}/_history/7", id("line2"));
    let ndjson = cli(q, &["retrieve", "--ndjson", &versioned, &refs[1]], None).await;
    assert_eq!(ndjson.code, Some(0), "{}", ndjson.stderr);
    assert_eq!(ndjson.stdout, format!("{}\n{}\n", lines[1], lines[0]));

    // A create of an existing resource is refused by the server: exit 1 and the reason on stdout.
    let again = cli(q, &["store", "--operation", "create", &files[0]], None).await;
    assert_eq!(again.code, Some(1), "{}", again.stderr);
    assert!(again.stdout.contains("CreationFailedResourceAlreadyExists"), "{}", again.stdout);
    assert!(again.stdout.contains(&files[0]), "the itemId names the input: {}", again.stdout);

    // Delete, then the resource is not found: exit 1, saying which.
    let delete = cli(q, &["store", "--operation", "delete", &files[0]], None).await;
    assert_eq!(delete.code, Some(0), "{}", delete.stderr);
    let gone = cli(q, &["retrieve", &refs[0], &refs[1]], None).await;
    assert_eq!(gone.code, Some(1));
    assert!(gone.stderr.contains(&refs[0]) && gone.stderr.contains("not found"), "{}", gone.stderr);
    assert!(!gone.stderr.contains(&refs[1]), "{}", gone.stderr);
    assert_eq!(printed_resources(&gone), [lines[0].clone()], "what was found is still printed");

    // From standard input, without waiting: the messageId is printed and the bridge stores it.
    let later = patient(&id("nowait"), "1", false);
    let sent = cli(q, &["store", "--no-wait", "--fhir-release", "R5", "-"], Some(&later)).await;
    assert_eq!(sent.code, Some(0), "{}", sent.stderr);
    assert!(Uuid::parse_str(sent.stdout.trim()).is_ok(), "prints the messageId: {}", sent.stdout);
    let reference = format!("Patient/{}", id("nowait"));
    let started = std::time::Instant::now();
    loop {
        let found = cli(q, &["retrieve", &reference], None).await;
        if found.code == Some(0) {
            assert_eq!(printed_resources(&found), std::slice::from_ref(&later));
            break;
        }
        assert!(started.elapsed() < PATIENCE, "the --no-wait command was never applied: {}", found.stderr);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bridge.remove().await;
}

/// A queue bound to an exchange named like an ApplicationQueueName, standing in for a bridge that
/// is not consuming; removed on drop.
struct IdleEndpoint {
    name: String,
    connection: Connection,
}

impl IdleEndpoint {
    async fn declare(with_queue: bool) -> IdleEndpoint {
        let name = unique("fhir-pubsub-cli-idle");
        let connection = Connection::connect(AMQP, ConnectionProperties::default()).await.expect("RabbitMQ");
        let channel = connection.create_channel().await.unwrap();
        if with_queue {
            amqp_support::queue_on_fanout(&channel, &name, &name, QueueDeclareOptions::default()).await;
        } else {
            amqp_support::durable_fanout(&channel, &name).await;
        }
        IdleEndpoint { name, connection }
    }

    async fn message_count(&self) -> u32 {
        let channel = self.connection.create_channel().await.unwrap();
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        channel.queue_declare(self.name.as_str().into(), passive, FieldTable::default()).await.unwrap().message_count()
    }

    async fn remove(self) {
        let channel = self.connection.create_channel().await.unwrap();
        let _ = channel.queue_delete(self.name.as_str().into(), QueueDeleteOptions::default()).await;
        let _ = channel.exchange_delete(self.name.as_str().into(), ExchangeDeleteOptions::default()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_nothing_is_sent() {
    let endpoint = IdleEndpoint::declare(true).await;
    let dir = tempfile::tempdir().unwrap();
    let good = write(&dir, "good.json", &patient("good", "1", false));
    let bad = write(&dir, "notes.json", "{\"resourceType\": \"Patient\",\n  \"id\": oops\n}");

    let run = cli(&endpoint.name, &["store", &good, &bad], None).await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains(&bad) && run.stderr.contains("line 2"), "names the file and line: {}", run.stderr);
    assert!(run.stdout.is_empty());

    let not_resource = write(&dir, "numbers.json", "[1, 2]");
    let run = cli(&endpoint.name, &["store", &not_resource], None).await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("not a FHIR resource"), "{}", run.stderr);

    for reference in ["Patient", "patient/p1", "Patient/p1/history/1", "Patient/p 1"] {
        let run = cli(&endpoint.name, &["retrieve", "Patient/fine", reference], None).await;
        assert_eq!(run.code, Some(2), "{reference}: {}", run.stderr);
        assert!(run.stderr.contains(reference), "names the reference: {}", run.stderr);
    }
    let run = cli(&endpoint.name, &["store", "--operation", "patch", &good], None).await;
    assert_eq!(run.code, Some(2), "an unknown operation is a usage error");

    assert_eq!(endpoint.message_count().await, 0, "nothing was sent");
    endpoint.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_response_in_time_exits_3() {
    let endpoint = IdleEndpoint::declare(false).await;
    let run = cli(&endpoint.name, &["retrieve", "--timeout", "1s", "Patient/p1"], None).await;
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert!(run.stderr.contains("no response arrived within 1s"), "{}", run.stderr);
    assert!(run.stdout.is_empty());
    endpoint.remove().await;

    // No exchange at all: said at once, naming it.
    let missing = unique("fhir-pubsub-cli-missing");
    let run = cli(&missing, &["store", "-"], Some(&patient("p1", "1", false))).await;
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert!(run.stderr.contains(&missing) && run.stderr.contains("does not exist"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_settings_are_said_clearly_without_secrets() {
    let output = tokio::process::Command::new(BIN)
        .args(["retrieve", "Patient/p1"])
        .env("FHIRPUBSUB_PubSub__MessageBroker__BrokerType", "Kafka")
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("BrokerType") && stderr.contains("RabbitMq"), "{stderr}");

    let password = unique("not-the-password");
    let output = tokio::process::Command::new(BIN)
        .args(["retrieve", "Patient/p1"])
        .env("FHIRPUBSUB_PubSub__MessageBroker__Password", &password)
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "a refused login is a broker error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("refused") && !stderr.contains(&password), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one sentence: {stderr}");
}

/// A running `listen`, its stdout lines delivered as they come; killed on drop.
struct Listener {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Listener {
    async fn start(args: &[&str]) -> Listener {
        let mut child = tokio::process::Command::new(BIN)
            .arg("listen")
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start listen");
        let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let ready = tokio::time::timeout(PATIENCE, stderr.next_line()).await.expect("listen says it listens");
        assert!(ready.as_ref().is_ok_and(|l| l.as_deref().is_some_and(|l| l.contains("listening to"))), "{ready:?}");
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        Listener { child, lines }
    }

    /// The first printed line that mentions `text`.
    async fn line_with(&mut self, text: &str) -> String {
        let found = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = self.lines.next_line().await.expect("read stdout") {
                if line.contains(text) {
                    return Some(line);
                }
            }
            None
        });
        found.await.expect("the event was printed in time").expect("listen ended before printing the event")
    }
}

/// Publishes one change of `Patient/id` as the bridge would.
async fn publish_change(light: bool, id: &str) {
    let reference =
        ResourceReference { resource_type: "Patient".into(), resource_id: id.into(), version: Some("1".into()) };
    let resource = Some(patient(id, "1", false));
    let change = ResourceChange { reference, resource, change_type: ChangeType::Create };
    let (message_type, message) = if light {
        let event = ResourcesChangedLightEvent { changes: vec![LightResourceChange::from(change)] };
        (MessageType::ResourcesChangedLightEvent, serde_json::value::to_raw_value(&event).unwrap())
    } else {
        let event = ResourcesChangedEvent { changes: vec![change] };
        (MessageType::ResourcesChangedEvent, serde_json::value::to_raw_value(&event).unwrap())
    };
    let envelope = Envelope::event(message_type, message, Uuid::new_v4(), "rabbitmq://localhost/cli-test");
    let connection = Connection::connect(AMQP, ConnectionProperties::default()).await.expect("RabbitMQ");
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let properties = BasicProperties::default().with_content_type("application/vnd.masstransit+json".into());
    channel
        .basic_publish(
            message_type.exchange().as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &encode(&envelope),
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_prints_full_events() {
    let id = unique("listen-full");
    let mut listener = Listener::start(&[]).await;
    publish_change(false, &id).await;
    let line = listener.line_with(&id).await;
    let message: serde_json::Value = serde_json::from_str(&line).expect("one JSON line");
    let change = &message["changes"][0];
    assert_eq!(change["reference"]["resourceId"], id.as_str());
    assert_eq!(change["changeType"], "create");
    assert_eq!(change["resource"], patient(&id, "1", false).as_str(), "the full event carries the resource");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_light_prints_light_events() {
    let id = unique("listen-light");
    let mut listener = Listener::start(&["--light"]).await;
    publish_change(true, &id).await;
    let line = listener.line_with(&id).await;
    let message: serde_json::Value = serde_json::from_str(&line).expect("one JSON line");
    assert_eq!(message["changes"][0]["reference"]["resourceId"], id.as_str());
    assert!(message["changes"][0].get("resource").is_none(), "light events carry no resource: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_count_exits_after_n_events() {
    let id = unique("listen-count");
    let mut listener = Listener::start(&["--light", "--count", "2"]).await;
    publish_change(true, &format!("{id}-a")).await;
    publish_change(true, &format!("{id}-b")).await;
    let mut printed = 0;
    let reading = async {
        while let Some(line) = listener.lines.next_line().await.expect("read stdout") {
            assert!(serde_json::from_str::<serde_json::Value>(&line).is_ok(), "{line}");
            printed += 1;
        }
    };
    tokio::time::timeout(PATIENCE, reading).await.expect("stdout closes after the events");
    assert_eq!(printed, 2);
    let status = tokio::time::timeout(PATIENCE, listener.child.wait()).await.expect("listen exits").unwrap();
    assert_eq!(status.code(), Some(0));
}
