//! The hostile input corpus (`tests/hostile/cases.toml`) sent to a real bridge process on RabbitMQ and
//! SQLite: every case must get the outcome written next to it, the process must stay up and answer a
//! good command after every case, nothing of a bad message may reach the store, and no configured
//! secret may show in a reply, an error-queue header, `/status` or the log.

mod amqp_support;
mod azurite_support;
mod bridge_process;
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bridge_process::BridgeProcess;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use object_store::ObjectStoreExt;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const STORE_URN: &str = "urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand";
const ENVELOPE: &str = "application/vnd.masstransit+json";
/// How long one outcome may take to show (the big cases are a few MB).
const PATIENCE: Duration = Duration::from_secs(60);
/// The limits the bridge runs with here (the corpus's size cases are written against them).
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
const MAX_INSTRUCTIONS: usize = 1000;
const MAX_CLAIM_CHECK_BYTES: u64 = 1024 * 1024;
const CLAIM_CONTAINER: &str = "fhir-claims";

#[derive(Debug, Deserialize)]
struct Corpus {
    case: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    category: String,
    file: Option<String>,
    recipe: Option<String>,
    content_type: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    expect: String,
    #[allow(dead_code)]
    note: Option<String>,
}

/// What a case must get, parsed from its `expect` line.
#[derive(Debug)]
enum Expect {
    Error(String),
    Skipped,
    Reply { details: String, text: String },
    Fault(String),
}

impl Expect {
    fn parse(line: &str) -> Expect {
        let (kind, rest) = line.split_once(':').map(|(k, r)| (k.trim(), r.trim())).unwrap_or((line.trim(), ""));
        match kind {
            "error" => Expect::Error(rest.to_owned()),
            "skipped" => Expect::Skipped,
            "fault" => Expect::Fault(rest.to_owned()),
            "reply" => {
                let (details, text) = rest.split_once(':').map(|(d, t)| (d.trim(), t.trim())).unwrap_or((rest, ""));
                Expect::Reply { details: details.to_owned(), text: text.to_owned() }
            }
            other => panic!("unknown outcome `{other}` in `{line}`"),
        }
    }
}

fn corpus_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile")
}

fn load_corpus() -> Vec<Case> {
    let text = std::fs::read_to_string(corpus_dir().join("cases.toml")).expect("tests/hostile/cases.toml");
    toml::from_str::<Corpus>(&text).expect("cases.toml parses").case
}

/// Replaces every `from` in `bytes` with `to` (bytes, so invalid UTF-8 stays as it is).
fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// Writes out a recipe: `<<repeat N TEXT>>` is TEXT written N times.
fn expand(recipe: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = recipe;
    while let Some(start) = rest.find("<<repeat ") {
        out.extend_from_slice(&rest.as_bytes()[..start]);
        let after = &rest[start + "<<repeat ".len()..];
        let end = after.find(">>").expect("a recipe's <<repeat is closed by >>");
        let (count, text) = after[..end].split_once(' ').expect("<<repeat N TEXT>>");
        let count: usize = count.parse().expect("<<repeat N: N is a number");
        out.extend_from_slice(text.repeat(count).as_bytes());
        rest = &after[end + 2..];
    }
    out.extend_from_slice(rest.as_bytes());
    out
}

/// The body of a case as sent, placeholders filled in.
fn body_of(case: &Case, reply: &str, blobs: &str) -> Vec<u8> {
    let raw = match (&case.file, &case.recipe) {
        (Some(file), None) => std::fs::read(corpus_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}")),
        (None, Some(recipe)) => expand(recipe),
        _ => panic!("{}: give exactly one of file and recipe", case.name),
    };
    let filled = replace(&raw, b"<<reply>>", reply.as_bytes());
    let filled = replace(&filled, b"<<blobs>>", blobs.as_bytes());
    replace(&filled, b"<<message-id>>", Uuid::new_v4().to_string().as_bytes())
}

fn header(headers: &FieldTable, name: &str) -> Option<String> {
    headers.inner().iter().find(|(k, _)| k.as_str() == name).map(|(_, v)| match v {
        AMQPValue::LongString(s) => s.to_string(),
        other => format!("{other:?}"),
    })
}

/// A message taken from a queue: its body as text (lossy) and its headers.
struct Taken {
    data: Vec<u8>,
    body: String,
    headers: FieldTable,
}

struct Client {
    connection: Connection,
    channel: Channel,
    queue: String,
    replies: String,
    reply_address: String,
}

impl Client {
    async fn new(queue: &str) -> Client {
        let connection = Connection::connect(AMQP, ConnectionProperties::default()).await.expect("RabbitMQ");
        let channel = connection.create_channel().await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let replies = format!("fhir-pubsub-test-hostile-replies-{}", Uuid::new_v4().simple());
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        amqp_support::queue_on_fanout(&channel, &replies, &replies, durable).await;
        let reply_address = format!("rabbitmq://127.0.0.1/{replies}");
        Client { connection, channel, queue: queue.to_owned(), replies, reply_address }
    }

    async fn publish(&self, body: &[u8], content_type: Option<&str>, headers: &BTreeMap<String, String>) {
        let mut properties = BasicProperties::default().with_delivery_mode(2);
        if let Some(content_type) = content_type {
            properties = properties.with_content_type(ShortString::from(content_type));
        }
        if !headers.is_empty() {
            let mut table = FieldTable::default();
            for (name, value) in headers {
                let value = value.replace("<<reply>>", &self.reply_address);
                table.insert(name.as_str().into(), AMQPValue::LongString(LongString::from(value)));
            }
            properties = properties.with_headers(table);
        }
        self.channel
            .basic_publish(self.queue.as_str().into(), "".into(), BasicPublishOptions::default(), body, properties)
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// The next message of `queue`, waiting up to [`PATIENCE`].
    async fn next(&self, queue: &str) -> Option<Taken> {
        let started = Instant::now();
        while started.elapsed() < PATIENCE {
            if let Some(m) =
                self.channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.expect("basic.get")
            {
                let headers = m.delivery.properties.headers().clone().unwrap_or_default();
                let body = String::from_utf8_lossy(&m.delivery.data).into_owned();
                return Some(Taken { data: m.delivery.data, body, headers });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    async fn count(&self, queue: &str) -> u32 {
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        self.channel.queue_declare(queue.into(), passive, FieldTable::default()).await.unwrap().message_count()
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

/// GET over HTTP/1.0: (status code, body).
fn get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(address).expect("connect to the HTTP endpoints");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the response");
    let code = response.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status line");
    (code, response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// Whether a store or retrieve response holds a failing item with `details` whose message holds `text`.
fn has_failure(response: &Value, details: &str, text: &str) -> bool {
    let message = &response["message"];
    let items = message["errors"].as_array().or_else(|| message["items"].as_array()).cloned().unwrap_or_default();
    items
        .iter()
        .any(|item| item["status"]["details"] == details && item["message"].as_str().unwrap_or_default().contains(text))
}

/// Whether the outcome of the case just sent is `expect`; what the bridge sent out is added to `sent_out`.
async fn check(client: &Client, expect: &Expect, body: &[u8], sent_out: &mut String) -> Result<(), String> {
    let error_q = format!("{}_error", client.queue);
    let skipped_q = format!("{}_skipped", client.queue);
    match expect {
        Expect::Error(text) => {
            let taken = client.next(&error_q).await.ok_or(format!("nothing in {error_q}"))?;
            let reason = header(&taken.headers, "MT-Reason");
            let message = header(&taken.headers, "MT-Fault-Message").unwrap_or_default();
            sent_out.push_str(&message);
            if reason.as_deref() != Some("fault") || !message.contains(text.as_str()) {
                return Err(format!("MT-Reason {reason:?}, MT-Fault-Message `{message}`"));
            }
            if taken.data != body {
                return Err("the error queue does not hold the body unchanged".into());
            }
        }
        Expect::Skipped => {
            let taken = client.next(&skipped_q).await.ok_or(format!("nothing in {skipped_q}"))?;
            let reason = header(&taken.headers, "MT-Reason");
            if reason.as_deref() != Some("dead-letter") {
                return Err(format!("MT-Reason {reason:?}"));
            }
        }
        Expect::Reply { details, text } => {
            let taken = client.next(&client.replies).await.ok_or("no reply")?;
            sent_out.push_str(&taken.body);
            let reply: Value = serde_json::from_str(&taken.body).map_err(|e| e.to_string())?;
            if !has_failure(&reply, details, text) {
                return Err(format!("expected {details} with `{text}`, got {}", shorten(&taken.body)));
            }
        }
        Expect::Fault(text) => {
            let taken = client.next(&client.replies).await.ok_or("no fault")?;
            sent_out.push_str(&taken.body);
            let fault: Value = serde_json::from_str(&taken.body).map_err(|e| e.to_string())?;
            let kind = fault["messageType"][0].as_str().unwrap_or_default();
            if !kind.starts_with("urn:message:MassTransit:Fault") || !taken.body.contains(text.as_str()) {
                return Err(format!("expected a fault saying `{text}`, got {}", shorten(&taken.body)));
            }
            client.next(&error_q).await.ok_or(format!("not in {error_q}"))?;
        }
    }
    Ok(())
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(600) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_hostile_message_gets_its_outcome_and_the_bridge_keeps_serving() {
    let mut cases = load_corpus();
    assert!(cases.len() >= 50, "the corpus holds {} cases", cases.len());
    // FHIR_PUBSUB_HOSTILE_CASES=a,b runs only the cases whose names hold one of the words (when debugging).
    if let Ok(only) = std::env::var("FHIR_PUBSUB_HOSTILE_CASES") {
        cases.retain(|c| only.split(',').any(|word| c.name.contains(word.trim())));
    }
    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("sqlite://{}/store.db", dir.path().display());
    let queue = format!("fhir-pubsub-test-hostile-{}", Uuid::new_v4().simple());
    // Secrets configured but never needed on this broker: none may leave the process.
    let secrets = [format!("KafkaPw-{}", Uuid::new_v4().simple()), format!("KeystorePw-{}", Uuid::new_v4().simple())];
    // Claim checks on, against an Azurite of the test's own holding a blob over the size limit and
    // one that is not JSON.
    let azurite = azurite_support::Azurite::start().await;
    azurite.create_container(CLAIM_CONTAINER);
    let blobs = azurite.container(CLAIM_CONTAINER);
    let huge = vec![b' '; MAX_CLAIM_CHECK_BYTES as usize + 1024];
    blobs.put(&object_store::path::Path::from("huge.json"), huge.into()).await.expect("huge.json uploaded");
    blobs.put(&object_store::path::Path::from("not-json.txt"), b"plain text".to_vec().into()).await.expect("uploaded");
    let mut command = BridgeProcess::command(&store_url, &queue);
    command
        .env("FHIRPUBSUB_PubSub__ClaimCheck__StorageType", "AzureBlobStorage")
        .env("FHIRPUBSUB_PubSub__ClaimCheck__AzureBlobStorageConnectionString", azurite.connection_string())
        .env("FHIRPUBSUB_PubSub__ClaimCheck__AzureBlobContainerName", CLAIM_CONTAINER)
        .env("FHIRPUBSUB_Limits__MaxClaimCheckBytes", MAX_CLAIM_CHECK_BYTES.to_string())
        .env("FHIRPUBSUB_Limits__MaxMessageBytes", MAX_MESSAGE_BYTES.to_string())
        .env("FHIRPUBSUB_Limits__MaxInstructionsPerPlan", MAX_INSTRUCTIONS.to_string())
        .env("FHIRPUBSUB_PubSub__MessageBroker__Kafka__Password", &secrets[0])
        .env("FHIRPUBSUB_PubSub__MessageBroker__Kafka__KeystorePassword", &secrets[1])
        .env("RUST_LOG", "debug");
    let mut bridge = BridgeProcess::spawn(command);
    let http = bridge.http_address(PATIENCE).await;
    assert!(bridge.wait_logged("bridge consuming commands", PATIENCE).await, "{}", bridge.log_text());
    let client = Client::new(&queue).await;
    let (error_q, skipped_q) = (format!("{queue}_error"), format!("{queue}_skipped"));
    // Everything the bridge sends out, to look for secrets in.
    let mut sent_out = String::new();
    let mut outcomes: BTreeMap<String, BTreeMap<&'static str, usize>> = BTreeMap::new();
    let mut failures = Vec::new();

    for (n, case) in cases.iter().enumerate() {
        let what = format!("case {} ({})", case.name, case.category);
        let body = body_of(case, &client.reply_address, &azurite.endpoint());
        let content_type = match case.content_type.as_deref() {
            None => Some(ENVELOPE),
            Some("") => None,
            Some(other) => Some(other),
        };
        client.publish(&body, content_type, &case.headers).await;
        let expect = Expect::parse(&case.expect);
        if let Err(failure) = check(&client, &expect, &body, &mut sent_out).await {
            failures.push(format!("{what}: {failure}"));
            // Clear what the wrong outcome left behind, so the next case starts clean.
            tokio::time::sleep(Duration::from_secs(1)).await;
            for queue in [&client.replies, &error_q, &skipped_q] {
                while client
                    .channel
                    .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                    .await
                    .unwrap()
                    .is_some()
                {}
            }
        }
        let outcome = match expect {
            Expect::Error(_) => "error queue",
            Expect::Skipped => "skipped queue",
            Expect::Reply { .. } => "reply",
            Expect::Fault(_) => "fault + error queue",
        };
        *outcomes.entry(case.category.clone()).or_default().entry(outcome).or_default() += 1;

        // Still up, and a good command still gets its reply, which is the next thing on the reply queue.
        assert!(bridge.child.try_wait().unwrap().is_none(), "{what}: the bridge exited: {}", bridge.log_text());
        let request_id = Uuid::new_v4();
        let id = format!("good-{n}");
        let good = json!({
            "messageId": request_id, "requestId": request_id, "messageType": [STORE_URN],
            "responseAddress": client.reply_address,
            "message": {"instructions": [{"itemId": "0", "operation": "create", "resource": {
                "resourceType": "Patient", "id": id, "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"}}}]}
        });
        client.publish(good.to_string().as_bytes(), Some(ENVELOPE), &BTreeMap::new()).await;
        let taken =
            client.next(&client.replies).await.unwrap_or_else(|| panic!("after {what}: no reply to a good command"));
        let reply: Value = serde_json::from_str(&taken.body).unwrap();
        assert_eq!(
            reply["requestId"],
            json!(request_id),
            "after {what}: an unexpected message on the reply queue: {reply}"
        );
        assert_eq!(reply["message"], json!({"errors": []}), "after {what}");
        assert_eq!(client.count(&error_q).await, 0, "after {what}: more in {error_q} than expected");
        assert_eq!(client.count(&skipped_q).await, 0, "after {what}: more in {skipped_q} than expected");
    }

    if !failures.is_empty() {
        let log = std::env::temp_dir().join(format!("{queue}.log"));
        std::fs::write(&log, bridge.log_text()).unwrap();
        panic!(
            "{} of {} cases failed (the bridge's log is in {}):\n{}",
            failures.len(),
            cases.len(),
            log.display(),
            failures.join("\n")
        );
    }
    let (health, _) = get(http, "/healthz");
    assert_eq!(health, 200);
    let (status_code, status) = get(http, "/status");
    assert_eq!(status_code, 200);
    assert_eq!(bridge.terminate(), Some(0), "a clean stop after the corpus");
    let log = bridge.log_text();
    for secret in &secrets {
        for (what, text) in [("a reply or error header", &sent_out), ("/status", &status), ("the log", &log)] {
            assert!(!text.contains(secret.as_str()), "{what} shows a configured secret");
        }
    }

    // The store holds the good commands' resources and nothing else.
    let store = fhir_pubsub::store::open(&store_url).await.unwrap();
    let keys: Vec<String> = store.version_log().await.unwrap().iter().map(|c| c.key.to_string()).collect();
    let expected: Vec<String> = (0..cases.len()).map(|n| format!("Patient/good-{n}")).collect();
    assert_eq!(keys, expected, "only the good commands reached the store");
    store.close().await;
    client.remove().await;
    for (category, counts) in &outcomes {
        eprintln!("{category}: {counts:?}");
    }
}
