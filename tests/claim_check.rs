//! Claim checks end to end: a real bridge process (`fhir-pubsub run`) fetches store plans from
//! Azurite (the Azure Storage emulator, one per test on a free loopback port, its container created
//! by the test), over RabbitMQ (SQLite and PostgreSQL) and over Kafka (tansu, one per test).
//!
//! What each input gets:
//! - a claim check in either message-type form: applied and answered like an inline plan, the
//!   resources retrievable and their change events published; redelivered, the same answer from the
//!   inbox, without storing or fetching again; the blob is still there afterwards;
//! - a URL of another host, account or container, with `..`, a query string or another scheme, or any
//!   claim check when claim checks are disabled: an error reply naming the cause, and no request to
//!   the storage (Azurite's request log, and a decoy listener for the other host, show none);
//! - a missing blob, a blob that is not JSON, JSON that is not a plan, a blob over the size limit: an
//!   error reply naming the cause, nothing stored, the blob left in place;
//! - the storage unreachable (a relay the test cuts): no answer, the command is delivered again and
//!   applied once the storage is back.

mod azurite_support;
mod bridge_process;
mod common;
#[cfg(feature = "kafka")]
mod kafka_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use azurite_support::Azurite;
use bridge_process::BridgeProcess;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde_json::{Value, json};
use uuid::Uuid;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const STORE_URN: &str = "urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand";
const WRAPPER_URN: &str = "urn:message:Firely.Server.Contracts.Messages.V1:ClaimCheckMessageWrapper[[Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand]]";
const RETRIEVE_URN: &str = "urn:message:Firely.Server.Contracts.Messages.V1:RetrievePlanCommand";
const FULL_EVENT_EXCHANGE: &str = "Firely.Server.Contracts.Messages.V1:ResourcesChangedEvent";
/// A bound for a slow, shared machine, not a speed requirement.
const PATIENCE: Duration = Duration::from_secs(120);

fn patient(id: &str, version: &str) -> String {
    json!({"resourceType": "Patient", "id": id, "meta": {"versionId": version, "lastUpdated": "2024-01-01T00:00:00Z"}})
        .to_string()
}

fn plan(instructions: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"instructions": instructions})).unwrap()
}

fn upsert(id: &str, version: &str) -> Value {
    json!({"itemId": id, "operation": "upsert", "resource": patient(id, version)})
}

/// A container of the test's own in `azurite`, with `blobs` in it.
async fn container_with(azurite: &Azurite, blobs: &[(&str, Vec<u8>)]) -> String {
    let name = format!("plans-{}", Uuid::new_v4().simple());
    azurite.create_container(&name);
    let client = azurite.container(&name);
    for (blob, content) in blobs {
        client.put(&Path::from(*blob), content.clone().into()).await.expect("upload blob");
    }
    name
}

async fn blob_exists(azurite: &Azurite, container: &str, blob: &str) -> bool {
    azurite.container(container).head(&Path::from(blob)).await.is_ok()
}

fn claim_check_envelope(message_type: &str, data_ref: &str, response_address: &str, message_id: Uuid) -> Value {
    json!({
        "messageId": message_id,
        "requestId": Uuid::new_v4(),
        "messageType": [message_type],
        "headers": {"fhir-release": "R4"},
        "responseAddress": response_address,
        "message": {"payload": {"data-ref": data_ref}}
    })
}

fn retrieve_envelope(ids: &[&str], response_address: &str) -> Value {
    let instructions: Vec<Value> = ids
        .iter()
        .map(|id| json!({"itemId": id, "reference": {"resourceType": "Patient", "resourceId": id}}))
        .collect();
    json!({
        "messageId": Uuid::new_v4(),
        "requestId": Uuid::new_v4(),
        "messageType": [RETRIEVE_URN],
        "responseAddress": response_address,
        "message": {"instructions": instructions}
    })
}

/// The client's side of one transport: send an envelope, collect replies and full change events.
enum Wire {
    Rabbit(Box<Rabbit>),
    #[cfg(feature = "kafka")]
    Kafka(Kafka),
}

struct Rabbit {
    queue: String,
    replies: String,
    events: String,
    channel: Channel,
    _connection: Connection,
    /// Everything taken from the queues so far.
    seen_replies: Vec<Value>,
    seen_events: Vec<Value>,
}

impl Rabbit {
    async fn new(queue: &str) -> Rabbit {
        let connection = Connection::connect(AMQP, ConnectionProperties::default()).await.expect("RabbitMQ");
        let channel = connection.create_channel().await.unwrap();
        let replies = format!("fhir-pubsub-test-reply-{}", Uuid::new_v4().simple());
        amqp_queue_on(&channel, &replies, &replies).await;
        let events = format!("fhir-pubsub-test-events-{}", Uuid::new_v4().simple());
        amqp_queue_on(&channel, FULL_EVENT_EXCHANGE, &events).await;
        Rabbit {
            queue: queue.into(),
            replies,
            events,
            channel,
            _connection: connection,
            seen_replies: vec![],
            seen_events: vec![],
        }
    }

    async fn drain(&mut self) {
        for (queue, sink) in [(&self.replies, &mut self.seen_replies), (&self.events, &mut self.seen_events)] {
            while let Some(m) = self.channel.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.unwrap()
            {
                m.delivery.ack(BasicAckOptions::default()).await.unwrap();
                sink.push(serde_json::from_slice(&m.delivery.data).unwrap_or(Value::Null));
            }
        }
    }

    /// Deletes the test's queues and exchanges, and the bridge's.
    async fn cleanup(&self) {
        delete_amqp(&self.channel, &[&self.replies, &self.events]).await;
        delete_amqp(
            &self.channel,
            &[&self.queue, &format!("{}_error", self.queue), &format!("{}_skipped", self.queue)],
        )
        .await;
    }
}

/// Deletes queues and the exchanges of the same name.
async fn delete_amqp(channel: &Channel, names: &[&str]) {
    for name in names {
        let _ = channel.queue_delete((*name).into(), QueueDeleteOptions::default()).await;
        let _ = channel.exchange_delete((*name).into(), Default::default()).await;
    }
}

async fn amqp_queue_on(channel: &Channel, exchange: &str, queue: &str) {
    let durable = lapin::options::ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel
        .exchange_declare(exchange.into(), lapin::ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .expect("declare exchange");
    channel.queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    channel
        .queue_bind(queue.into(), exchange.into(), "".into(), Default::default(), FieldTable::default())
        .await
        .unwrap();
}

#[cfg(feature = "kafka")]
struct Kafka {
    /// Kept running as long as the wire is used.
    _tansu: kafka_support::Tansu,
    prefix: String,
    producer: rdkafka::producer::FutureProducer,
    collector: kafka_support::Collector,
}

impl Wire {
    fn response_address(&self) -> String {
        match self {
            Wire::Rabbit(r) => format!("rabbitmq://localhost/{}", r.replies),
            #[cfg(feature = "kafka")]
            Wire::Kafka(k) => format!("kafka://kafka-broker:9092/{}.replies?type=topic", k.prefix),
        }
    }

    async fn send(&self, envelope: &Value) {
        let body = envelope.to_string();
        match self {
            Wire::Rabbit(r) => {
                let properties = BasicProperties::default()
                    .with_content_type("application/vnd.masstransit+json".into())
                    .with_delivery_mode(2);
                r.channel
                    .basic_publish(
                        r.queue.as_str().into(),
                        "".into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        properties,
                    )
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
            #[cfg(feature = "kafka")]
            Wire::Kafka(k) => {
                let is_retrieve = envelope["messageType"][0] == RETRIEVE_URN;
                let topic = format!(
                    "{}.{}",
                    k.prefix,
                    if is_retrieve { "RetrievePlanCommand" } else { "ExecuteStorePlanCommand" }
                );
                kafka_support::produce(&k.producer, &topic, None, body.as_bytes(), &[]).await;
            }
        }
    }

    async fn replies(&mut self) -> Vec<Value> {
        match self {
            Wire::Rabbit(r) => {
                r.drain().await;
                r.seen_replies.clone()
            }
            #[cfg(feature = "kafka")]
            // On Kafka a reply's value is the bare response; its RequestId is a header.
            Wire::Kafka(k) => k
                .collector
                .records(&format!("{}.replies", k.prefix))
                .iter()
                .map(|r| json!({"requestId": r.header("RequestId"), "message": r.json()}))
                .collect(),
        }
    }

    async fn events(&mut self) -> Vec<Value> {
        match self {
            Wire::Rabbit(r) => {
                r.drain().await;
                r.seen_events.clone()
            }
            #[cfg(feature = "kafka")]
            Wire::Kafka(k) => k
                .collector
                .records(&format!("{}.ResourcesChangedEvent", k.prefix))
                .iter()
                .map(|r| {
                    let value = r.json();
                    if value.get("message").is_some() { value } else { json!({"message": value}) }
                })
                .collect(),
        }
    }

    /// The reply to the envelope `request`, by its requestId.
    async fn reply_to(&mut self, request: &Value) -> Value {
        let request_id = request["requestId"].as_str().unwrap().to_owned();
        let started = std::time::Instant::now();
        while started.elapsed() < PATIENCE {
            if let Some(reply) = self.replies().await.into_iter().find(|r| r["requestId"] == request_id.as_str()) {
                return reply["message"].clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no reply to {request_id}");
    }

    /// Sends `request` and returns its reply's message.
    async fn ask(&mut self, request: &Value) -> Value {
        self.send(request).await;
        self.reply_to(request).await
    }

    /// The (resourceId, version, changeType) of every full change event of `ids` so far.
    async fn changes_of(&mut self, ids: &[&str]) -> Vec<(String, String, String)> {
        let mut found = Vec::new();
        for event in self.events().await {
            for change in event["message"]["changes"].as_array().cloned().unwrap_or_default() {
                let id = change["reference"]["resourceId"].as_str().unwrap_or_default().to_owned();
                if ids.contains(&id.as_str()) {
                    let version = change["reference"]["version"].as_str().unwrap_or_default().to_owned();
                    found.push((id, version, change["changeType"].as_str().unwrap_or_default().to_owned()));
                }
            }
        }
        found
    }

    async fn wait_changes(&mut self, ids: &[&str], count: usize) -> Vec<(String, String, String)> {
        let started = std::time::Instant::now();
        loop {
            let changes = self.changes_of(ids).await;
            if changes.len() >= count || started.elapsed() > PATIENCE {
                return changes;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The stored version of each patient (None: not found).
    async fn versions(&mut self, ids: &[&str]) -> Vec<Option<String>> {
        let address = self.response_address();
        let reply = self.ask(&retrieve_envelope(ids, &address)).await;
        reply["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| {
                item["resource"].as_str().map(|r| {
                    let resource: Value = serde_json::from_str(r).unwrap();
                    resource["meta"]["versionId"].as_str().unwrap().to_owned()
                })
            })
            .collect()
    }
}

/// The settings of a claim check on `azurite`'s `container`, as environment variables.
fn claim_check_env(azurite: &Azurite, container: &str) -> Vec<(String, String)> {
    vec![
        ("FHIRPUBSUB_PubSub__ClaimCheck__StorageType".into(), "AzureBlobStorage".into()),
        ("FHIRPUBSUB_PubSub__ClaimCheck__AzureBlobContainerName".into(), container.into()),
        ("FHIRPUBSUB_PubSub__ClaimCheck__AzureBlobStorageConnectionString".into(), azurite.connection_string()),
    ]
}

/// A bridge process on RabbitMQ and a fresh store, with `env` set; and the client's wire.
async fn rabbit_bridge(store: &common::TestStore, env: &[(String, String)]) -> (BridgeProcess, Wire) {
    let queue = format!("fhir-pubsub-test-{}", Uuid::new_v4().simple());
    let mut command = BridgeProcess::command(&store.url, &queue);
    command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let bridge = BridgeProcess::spawn(command);
    assert!(
        bridge.wait_logged("bridge consuming commands", PATIENCE).await,
        "bridge did not start: {}",
        bridge.log_text()
    );
    (bridge, Wire::Rabbit(Box::new(Rabbit::new(&queue).await)))
}

/// The value of the claim-check counter with `outcome`, read from the bridge's `/metrics`.
async fn claim_checks_counted(bridge: &BridgeProcess, outcome: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = bridge.http_address(PATIENCE).await;
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("the HTTP endpoints");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    let series = format!("fhir_pubsub_claim_checks_total{{outcome=\"{outcome}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(series.as_str())).map(|v| v.trim().parse().unwrap()).unwrap_or(0)
}

/// Both message-type forms are applied like inline plans; a redelivery is answered from the inbox.
async fn claim_checks_are_applied(wire: &mut Wire, azurite: &Azurite, container: &str, bridge: &BridgeProcess) {
    let (a, b) = (format!("a{}", Uuid::new_v4().simple()), format!("b{}", Uuid::new_v4().simple()));
    let client = azurite.container(container);
    client.put(&Path::from("first.json"), plan(json!([upsert(&a, "1"), upsert(&b, "1")])).into()).await.unwrap();
    client.put(&Path::from("nested/second.json"), plan(json!([upsert(&a, "2")])).into()).await.unwrap();
    let address = wire.response_address();

    let first_id = Uuid::new_v4();
    let first = claim_check_envelope(STORE_URN, &azurite.blob_url(container, "first.json"), &address, first_id);
    assert_eq!(wire.ask(&first).await, json!({"errors": []}));
    let second =
        claim_check_envelope(WRAPPER_URN, &azurite.blob_url(container, "nested/second.json"), &address, Uuid::new_v4());
    assert_eq!(wire.ask(&second).await, json!({"errors": []}));
    assert_eq!(wire.versions(&[&a, &b]).await, vec![Some("2".to_owned()), Some("1".to_owned())]);

    let expected = vec![
        (a.clone(), "1".to_owned(), "create".to_owned()),
        (b.clone(), "1".to_owned(), "create".to_owned()),
        (a.clone(), "2".to_owned(), "update".to_owned()),
    ];
    assert_eq!(wire.wait_changes(&[&a, &b], 3).await, expected);

    // The first command again (same messageId): the same answer, nothing stored or fetched again.
    let fetches = azurite.reads(&format!("{container}/first.json")).len();
    assert!(fetches >= 1, "the first blob was fetched");
    let again = claim_check_envelope(STORE_URN, &azurite.blob_url(container, "first.json"), &address, first_id);
    assert_eq!(wire.ask(&again).await, json!({"errors": []}));
    assert_eq!(azurite.reads(&format!("{container}/first.json")).len(), fetches, "redelivery fetched the blob again");
    assert_eq!(wire.versions(&[&a, &b]).await, vec![Some("2".to_owned()), Some("1".to_owned())]);
    assert_eq!(wire.changes_of(&[&a, &b]).await, expected, "the redelivery stored nothing");

    assert_eq!(claim_checks_counted(bridge, "fetched").await, 2);
    assert_eq!(claim_checks_counted(bridge, "answered_from_inbox").await, 1);
    assert!(
        blob_exists(azurite, container, "first.json").await
            && blob_exists(azurite, container, "nested/second.json").await
    );
    assert!(!bridge.log_text().contains(azurite_support::KEY), "the account key was logged");
}

async fn rabbitmq_claim_checks(store: &common::TestStore) {
    let azurite = Azurite::start().await;
    let container = container_with(&azurite, &[]).await;
    let (bridge, mut wire) = rabbit_bridge(store, &claim_check_env(&azurite, &container)).await;
    claim_checks_are_applied(&mut wire, &azurite, &container, &bridge).await;
    if let Wire::Rabbit(r) = &wire {
        r.cleanup().await;
    }
}

both_stores!(rabbitmq_claim_checks_are_applied_once, rabbitmq_claim_checks);

/// Accepts connections and counts them: a host the bridge must never reach.
async fn decoy() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((_socket, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    });
    (port, count)
}

fn assert_refused(reply: &Value, fragment: &str, what: &str) {
    let error = &reply["errors"][0];
    assert_eq!(error["status"]["code"], "badRequest", "{what}: {reply}");
    assert_eq!(error["status"]["details"], "BadRequestWrongPayloadFormat", "{what}: {reply}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains(fragment), "{what}: `{message}` should mention `{fragment}`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn urls_outside_the_container_and_bad_blobs_get_error_replies_and_store_nothing() {
    let azurite = Azurite::start().await;
    let id = format!("p{}", Uuid::new_v4().simple());
    let good = plan(json!([upsert(&id, "1")]));
    let container = container_with(
        &azurite,
        &[
            ("not-json.txt", b"this is not JSON".to_vec()),
            ("not-a-plan.json", serde_json::to_vec(&json!({"resourceType": "Patient", "id": id})).unwrap()),
            ("big.json", {
                let mut big = good.clone();
                big.extend(std::iter::repeat_n(b' ', 5000));
                big
            }),
        ],
    )
    .await;
    // A valid plan in another container of the same account, which must not be read.
    let other = container_with(&azurite, &[("plan.json", good.clone())]).await;
    let store = common::TestStore::new(common::Kind::Sqlite).await;
    let mut env = claim_check_env(&azurite, &container);
    env.push(("FHIRPUBSUB_Limits__MaxClaimCheckBytes".into(), "4096".into()));
    let (bridge, mut wire) = rabbit_bridge(&store, &env).await;
    let address = wire.response_address();
    let (decoy_port, decoy_connections) = decoy().await;
    let port = azurite.port;

    let other_container = format!("container `{other}`");
    let refused = [
        (
            format!("http://127.0.0.1:{decoy_port}/devstoreaccount1/{container}/plan.json"),
            "outside the configured storage",
            "another host",
        ),
        (
            format!("http://127.0.0.1:{port}/devstoreaccount1/{other}/plan.json"),
            other_container.as_str(),
            "another container",
        ),
        (
            format!("http://127.0.0.1:{port}/otheraccount/{container}/plan.json"),
            "outside the configured account",
            "another account",
        ),
        (
            format!("http://127.0.0.1:{port}/devstoreaccount1/{container}/../{other}/plan.json"),
            "`..`",
            "a `..` segment",
        ),
        (
            format!("http://127.0.0.1:{port}/devstoreaccount1/{container}/%2e%2e/{other}/plan.json"),
            "`..`",
            "an encoded `..`",
        ),
        (
            format!("ftp://127.0.0.1:{port}/devstoreaccount1/{other}/plan.json"),
            "outside the configured storage",
            "another scheme",
        ),
        (format!("file:///devstoreaccount1/{other}/plan.json"), "outside the configured storage", "a file URL"),
        (
            format!("http://127.0.0.1:{port}/devstoreaccount1/{other}/plan.json?comp=list"),
            "query string",
            "a query string",
        ),
    ];
    for (url, fragment, what) in &refused {
        let reply = wire.ask(&claim_check_envelope(STORE_URN, url, &address, Uuid::new_v4())).await;
        assert_refused(&reply, fragment, what);
    }
    assert_eq!(decoy_connections.load(Ordering::SeqCst), 0, "the bridge connected to another host");
    assert_eq!(azurite.reads(&other), Vec::<String>::new(), "the bridge asked for a blob of another container");
    assert_eq!(azurite.requests("otheraccount"), Vec::<String>::new());

    let bad_blobs = [
        ("missing.json", "does not exist"),
        ("not-json.txt", "is not JSON"),
        ("not-a-plan.json", "is not a store plan"),
        ("big.json", "at most 4096 are read (Limits.MaxClaimCheckBytes)"),
    ];
    for (blob, fragment) in bad_blobs {
        let reply = wire
            .ask(&claim_check_envelope(WRAPPER_URN, &azurite.blob_url(&container, blob), &address, Uuid::new_v4()))
            .await;
        assert_refused(&reply, fragment, blob);
    }
    // The over-size blob was refused by its size: asked about, never downloaded.
    let big = azurite.reads(&format!("{container}/big.json"));
    assert!(!big.is_empty() && big.iter().all(|r| r.starts_with("HEAD ")), "{big:?}");

    assert_eq!(wire.versions(&[&id]).await, vec![None], "nothing was stored");
    for (outcome, count) in
        [("refused", refused.len() as u64), ("not_found", 1), ("not_a_plan", 2), ("too_large", 1), ("fetched", 0)]
    {
        assert_eq!(claim_checks_counted(&bridge, outcome).await, count, "{outcome}");
    }
    for blob in ["not-json.txt", "not-a-plan.json", "big.json"] {
        assert!(blob_exists(&azurite, &container, blob).await, "{blob} was deleted");
    }
    assert!(blob_exists(&azurite, &other, "plan.json").await);
    assert!(!bridge.log_text().contains(azurite_support::KEY), "the account key was logged");
    if let Wire::Rabbit(r) = &wire {
        r.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disabled_claim_checks_are_refused_without_a_request() {
    let azurite = Azurite::start().await;
    let id = format!("p{}", Uuid::new_v4().simple());
    let container = container_with(&azurite, &[("plan.json", plan(json!([upsert(&id, "1")])))]).await;
    let store = common::TestStore::new(common::Kind::Sqlite).await;
    let (_bridge, mut wire) = rabbit_bridge(&store, &[]).await;
    let address = wire.response_address();
    let reply = wire
        .ask(&claim_check_envelope(STORE_URN, &azurite.blob_url(&container, "plan.json"), &address, Uuid::new_v4()))
        .await;
    assert_refused(&reply, "Claim checks are disabled (PubSub.ClaimCheck.StorageType)", "a disabled claim check");
    assert_eq!(azurite.reads(&container), Vec::<String>::new(), "only the test's own requests");
    assert_eq!(wire.versions(&[&id]).await, vec![None]);
    if let Wire::Rabbit(r) = &wire {
        r.cleanup().await;
    }
}

/// A TCP relay in front of Azurite that the test can cut: while down, it accepts connections and
/// closes them at once, as a storage that went away would.
async fn relay(target: u16) -> (u16, Arc<std::sync::atomic::AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let open = up.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            if !open.load(Ordering::SeqCst) {
                continue; // dropped: closed at once
            }
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (port, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storage_outage_delays_the_claim_check_instead_of_failing_it() {
    let azurite = Azurite::start().await;
    let id = format!("p{}", Uuid::new_v4().simple());
    let container = container_with(&azurite, &[("plan.json", plan(json!([upsert(&id, "1")])))]).await;
    let (relay_port, up) = relay(azurite.port).await;
    let endpoint = format!("http://127.0.0.1:{relay_port}/{}", azurite_support::ACCOUNT);
    let mut env = claim_check_env(&azurite, &container);
    env[2].1 = format!(
        "DefaultEndpointsProtocol=http;AccountName={};AccountKey={};BlobEndpoint={endpoint}",
        azurite_support::ACCOUNT,
        azurite_support::KEY
    );
    let store = common::TestStore::new(common::Kind::Sqlite).await;
    let (bridge, mut wire) = rabbit_bridge(&store, &env).await;
    let address = wire.response_address();

    up.store(false, Ordering::SeqCst);
    let request =
        claim_check_envelope(STORE_URN, &format!("{endpoint}/{container}/plan.json"), &address, Uuid::new_v4());
    wire.send(&request).await;
    assert!(
        bridge.wait_logged("claim-check storage unavailable; the command will be delivered again", PATIENCE).await,
        "{}",
        bridge.log_text()
    );
    assert_eq!(wire.replies().await, Vec::<Value>::new(), "an outage must not be answered");

    up.store(true, Ordering::SeqCst);
    assert_eq!(wire.reply_to(&request).await, json!({"errors": []}));
    assert_eq!(wire.versions(&[&id]).await, vec![Some("1".to_owned())]);
    if let Wire::Rabbit(r) = &wire {
        r.cleanup().await;
    }
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_claim_checks_are_applied_once() {
    let azurite = Azurite::start().await;
    let container = container_with(&azurite, &[]).await;
    let tansu = kafka_support::Tansu::start().await;
    let prefix = format!("t{}", Uuid::new_v4().simple());
    let topics: Vec<String> = [
        "ExecuteStorePlanCommand",
        "RetrievePlanCommand",
        "ExecuteStorePlanCommand.Errors",
        "replies",
        "ResourcesChangedEvent",
        "ResourcesChangedLightEvent",
    ]
    .iter()
    .map(|t| format!("{prefix}.{t}"))
    .collect();
    tansu.create_topics(&topics.iter().map(String::as_str).collect::<Vec<_>>(), 1).await;
    let store = common::TestStore::new(common::Kind::Sqlite).await;
    let mut command = BridgeProcess::command(&store.url, "unused");
    command
        .env("FHIRPUBSUB_PubSub__MessageBroker__BrokerType", "Kafka")
        .env("FHIRPUBSUB_PubSub__MessageBroker__Host", tansu.bootstrap())
        .env("FHIRPUBSUB_PubSub__MessageBroker__Kafka__TopicPrefix", &prefix)
        .env("FHIRPUBSUB_PubSub__MessageBroker__Kafka__ClientGroupId", format!("{prefix}-bridge"))
        .env(
            "FHIRPUBSUB_PubSub__MessageBroker__Kafka__ResourcesChangedEventTopicName",
            format!("{prefix}.ResourcesChangedEvent"),
        )
        .env(
            "FHIRPUBSUB_PubSub__MessageBroker__Kafka__ResourcesChangedLightEventTopicName",
            format!("{prefix}.ResourcesChangedLightEvent"),
        )
        .envs(claim_check_env(&azurite, &container));
    let bridge = BridgeProcess::spawn(command);
    assert!(
        bridge.wait_logged("bridge consuming commands", PATIENCE).await,
        "bridge did not start: {}",
        bridge.log_text()
    );
    let collector = kafka_support::Collector::start(
        &tansu,
        &[&format!("{prefix}.replies"), &format!("{prefix}.ResourcesChangedEvent")],
    )
    .await;
    let producer = tansu.producer();
    let mut wire = Wire::Kafka(Kafka { _tansu: tansu, prefix, producer, collector });
    claim_checks_are_applied(&mut wire, &azurite, &container, &bridge).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_file_claim_checks_are_read_under_the_directory_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let claims = root.join("claims");
    std::fs::create_dir_all(claims.join("in")).unwrap();
    let (inside, outside) = (format!("p{}", Uuid::new_v4().simple()), format!("q{}", Uuid::new_v4().simple()));
    std::fs::write(claims.join("in").join("plan.json"), plan(json!([upsert(&inside, "1")]))).unwrap();
    std::fs::write(root.join("outside.json"), plan(json!([upsert(&outside, "1")]))).unwrap();
    let store = common::TestStore::new(common::Kind::Sqlite).await;
    let env = vec![
        ("FHIRPUBSUB_PubSub__ClaimCheck__StorageType".to_owned(), "LocalFiles".to_owned()),
        ("FHIRPUBSUB_PubSub__ClaimCheck__Directory".to_owned(), claims.display().to_string()),
    ];
    let (_bridge, mut wire) = rabbit_bridge(&store, &env).await;
    let address = wire.response_address();
    let url = |path: &std::path::Path| url::Url::from_file_path(path).unwrap().to_string();

    let reply = wire
        .ask(&claim_check_envelope(WRAPPER_URN, &url(&claims.join("in/plan.json")), &address, Uuid::new_v4()))
        .await;
    assert_eq!(reply, json!({"errors": []}));
    for (data_ref, fragment) in [
        (url(&root.join("outside.json")), "outside the configured account or directory"),
        (format!("{}/../outside.json", url(&claims)), "`..`"),
        (url(&claims.join("in/missing.json")), "does not exist"),
        ("http://127.0.0.1:1/claims/in/plan.json".to_owned(), "outside the configured storage"),
    ] {
        let reply = wire.ask(&claim_check_envelope(STORE_URN, &data_ref, &address, Uuid::new_v4())).await;
        assert_refused(&reply, fragment, &data_ref);
    }
    assert_eq!(wire.versions(&[&inside, &outside]).await, vec![Some("1".to_owned()), None]);
    assert!(claims.join("in/plan.json").exists() && root.join("outside.json").exists(), "files are never deleted");
    if let Wire::Rabbit(r) = &wire {
        r.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_config_asks_the_storage_and_names_refused_credentials() {
    let azurite = Azurite::start().await;
    let container = container_with(&azurite, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let queue = format!("fhir-pubsub-test-{}", Uuid::new_v4().simple());
    let check = |env: &[(String, String)]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-pubsub"))
            .arg("check-config")
            .env_remove("RUST_LOG")
            .env("FHIRPUBSUB_Store__Url", format!("sqlite://{}/check.db", dir.path().display()))
            .env("FHIRPUBSUB_Http__Listen", "127.0.0.1:0")
            .env("FHIRPUBSUB_PubSub__MessageBroker__ApplicationQueueName", &queue)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run fhir-pubsub check-config");
        (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let (code, stdout) = check(&claim_check_env(&azurite, &container));
    assert_eq!(code, Some(0), "{stdout}");
    let line = format!(
        "claim check Azure Blob Storage {}/{container}: ok (storage answers, credentials accepted)",
        azurite.endpoint()
    );
    assert!(stdout.contains(&line), "{stdout}");
    assert!(!stdout.contains(azurite_support::KEY), "the account key was shown: {stdout}");

    // Another key (valid base64, not the account's): refused by the storage, named, not shown.
    let wrong_key = "d3Jvbmcta2V5LW5vdC10aGUtYWNjb3VudHMta2V5LXdyb25nLWtleQ==";
    let mut env = claim_check_env(&azurite, &container);
    env[2].1 = format!(
        "DefaultEndpointsProtocol=http;AccountName={};AccountKey={wrong_key};BlobEndpoint={}",
        azurite_support::ACCOUNT,
        azurite.endpoint()
    );
    let (code, stdout) = check(&env);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("FAILED: the storage refused to give the claim-check blob"), "{stdout}");
    assert!(!stdout.contains(wrong_key), "the account key was shown: {stdout}");

    let connection = Connection::connect(AMQP, ConnectionProperties::default()).await.expect("RabbitMQ");
    let channel = connection.create_channel().await.unwrap();
    delete_amqp(&channel, &[&queue, &format!("{queue}_error"), &format!("{queue}_skipped")]).await;
}
