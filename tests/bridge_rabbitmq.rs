//! The bridge end to end over the real RabbitMQ (127.0.0.1:5672): Firely client flows, bad input,
//! and a broker restart in the middle of a stream of commands.
//!
//! Each test runs its own bridge (in process, on its own store) on a random application queue and
//! publishes to that queue's own exchange, so tests running in parallel never see each other's commands.

mod amqp_support;
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fhir_pubsub::bridge::{Bridge, BridgeOptions};
use fhir_pubsub::transport::Transport;
use fhir_pubsub::transport::rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};
use tokio::sync::watch;
use uuid::Uuid;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const STORE_RESPONSE: &str = "urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanResponse";
const RETRIEVE_RESPONSE: &str = "urn:message:Firely.Server.Contracts.Messages.V1:RetrievePlanResponse";
const STORE_URN: &str = "urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand";
const RETRIEVE_URN: &str = "urn:message:Firely.Server.Contracts.Messages.V1:RetrievePlanCommand";

/// The broker restart test must not overlap the others: they share this lock, it takes it alone.
static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A bridge running on a random queue, and a test connection to the same broker.
struct Running {
    queue: String,
    store: common::TestStore,
    channel: Channel,
    _connection: Connection,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    cleanup: Vec<String>,
}

async fn start(kind: common::Kind) -> Running {
    let queue = format!("fhir-pubsub-test-{}", Uuid::new_v4().simple());
    let store = common::TestStore::new(kind).await;
    let options = RabbitMqOptions {
        host: "127.0.0.1".into(),
        queue_name: queue.clone(),
        prefetch_count: 32,
        ..RabbitMqOptions::default()
    };
    let transport: Arc<dyn Transport> = Arc::new(RabbitMqTransport::connect(options).await.expect("RabbitMQ"));
    let bridge = Arc::new(Bridge::new(store.store.clone(), transport, BridgeOptions::default()));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        bridge.run(stopped).await.expect("bridge runs");
    });
    let connection = Connection::connect(AMQP, ConnectionProperties::default()).await.expect("test connection");
    // Wait until the bridge declared its queue (a failed passive declare closes its channel).
    for _ in 0..200 {
        let probe = connection.create_channel().await.unwrap();
        if probe.queue_declare(queue.as_str().into(), passive(), FieldTable::default()).await.is_ok() {
            let _ = probe.close(200, "ok".into()).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    Running { queue, store, channel, _connection: connection, stop, task, cleanup: Vec::new() }
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() }
}

impl Running {
    /// Publishes a raw body to the bridge's own exchange, with the given AMQP properties.
    async fn publish(&self, body: &[u8], properties: BasicProperties) {
        self.channel
            .basic_publish(self.queue.as_str().into(), "".into(), BasicPublishOptions::default(), body, properties)
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn send(&self, envelope: &Value) {
        let properties = BasicProperties::default()
            .with_content_type("application/vnd.masstransit+json".into())
            .with_delivery_mode(2);
        self.publish(envelope.to_string().as_bytes(), properties).await;
    }

    /// A durable fanout exchange with a queue of the same name bound to it (the Postman form).
    async fn reply_queue(&mut self) -> String {
        let name = format!("fhir-pubsub-test-reply-{}", Uuid::new_v4().simple());
        amqp_support::durable_fanout(&self.channel, &name).await;
        self.declare_bound_queue(&name, true).await;
        self.cleanup.push(name.clone());
        name
    }

    async fn declare_bound_queue(&self, name: &str, durable: bool) {
        self.channel
            .queue_declare(name.into(), QueueDeclareOptions { durable, ..Default::default() }, FieldTable::default())
            .await
            .unwrap();
        amqp_support::bind(&self.channel, name, name).await;
    }

    /// The next message of a queue, waiting up to 15 s.
    async fn next(&self, queue: &str) -> Option<(Value, FieldTable)> {
        for _ in 0..300 {
            if let Some(m) = self.channel.basic_get(queue.into(), BasicGetOptions::default()).await.unwrap() {
                m.delivery.ack(BasicAckOptions::default()).await.unwrap();
                let body = serde_json::from_slice(&m.delivery.data).unwrap_or(Value::Null);
                let headers = m.delivery.properties.headers().clone().unwrap_or_default();
                return Some((body, headers));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        for name in self.cleanup.iter().chain([&self.queue]) {
            let _ = self.channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
            let _ = self.channel.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default()).await;
        }
        for suffix in ["_error", "_skipped"] {
            let name = format!("{}{suffix}", self.queue);
            let _ = self.channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
            let _ = self.channel.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default()).await;
        }
    }
}

fn header(headers: &FieldTable, name: &str) -> Option<String> {
    headers.inner().iter().find(|(k, _)| k.as_str() == name).map(|(_, v)| match v {
        AMQPValue::LongString(s) => s.to_string(),
        other => format!("{other:?}"),
    })
}

fn patient(id: &str, version: &str) -> String {
    json!({"resourceType": "Patient", "id": id, "meta": {"versionId": version, "lastUpdated": "2024-01-01T00:00:00Z"}})
        .to_string()
}

fn store_envelope(response_address: &str, instructions: Value) -> Value {
    json!({
        "messageType": [STORE_URN],
        "headers": {"fhir-release": "R4"},
        "responseAddress": response_address,
        "message": {"instructions": instructions}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn masstransit_js_request_is_answered_on_its_temporary_exchange() {
    let _shared = BROKER.read().await;
    let run = start(common::Kind::Sqlite).await;
    let fixture: Value =
        serde_json::from_str(include_str!("data/fixtures/captured-masstransit-rabbitmq.json")).unwrap();
    let body = fixture["request"]["captured"]["body_utf8"].as_str().unwrap().to_owned();
    let request: Value = serde_json::from_str(&body).unwrap();
    // The JS client's bus endpoint: non-durable, auto-delete, x-expires (a 406 for a plain redeclare).
    let bus =
        request["responseAddress"].as_str().unwrap().rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(60_000));
    run.channel
        .exchange_declare(
            bus.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { auto_delete: true, ..Default::default() },
            args.clone(),
        )
        .await
        .unwrap();
    run.channel
        .queue_declare(bus.as_str().into(), QueueDeclareOptions { auto_delete: true, ..Default::default() }, args)
        .await
        .unwrap();
    run.channel
        .queue_bind(
            bus.as_str().into(),
            bus.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    // The exact captured bytes and properties.
    let properties = BasicProperties::default()
        .with_content_type("application/vnd.masstransit+json".into())
        .with_delivery_mode(2)
        .with_headers(FieldTable::default());
    run.publish(body.as_bytes(), properties).await;
    let (reply, _) = run.next(&bus).await.expect("a reply on the JS client's exchange");
    assert_eq!(reply["messageType"][0], STORE_RESPONSE);
    assert_eq!(reply["requestId"], request["requestId"]);
    // The captured plan has no `instructions`: the client learns why.
    let error = &reply["message"]["errors"][0];
    assert_eq!(error["status"]["code"], "badRequest");
    assert_eq!(error["status"]["details"], "BadRequestWrongPayloadFormat");
    assert!(error["message"].as_str().unwrap().contains("instructions"));

    // The captured send (no responseAddress) is consumed without a reply, and the queue moves on.
    let send = fixture["send_as_publish"]["captured"]["body_utf8"].as_str().unwrap();
    run.publish(
        send.as_bytes(),
        BasicProperties::default().with_content_type("application/vnd.masstransit+json".into()),
    )
    .await;
    let mut reply_q = run;
    let postman = reply_q.reply_queue().await;
    reply_q
        .send(&store_envelope(
            &format!("rabbitmq://localhost/{postman}"),
            json!([{"itemId": "0", "operation": "upsert", "resource": patient("js", "1")}]),
        ))
        .await;
    let (reply, _) = reply_q.next(&postman).await.expect("the next command is answered");
    assert_eq!(reply["message"]["errors"], json!([]));
    let _ = reply_q.channel.queue_delete(bus.as_str().into(), QueueDeleteOptions::default()).await;
    let _ = reply_q.channel.exchange_delete(bus.as_str().into(), ExchangeDeleteOptions::default()).await;
    reply_q.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn firely_flows_postman_dotnet_upsert_twice_retrieve_and_fhir_release() {
    let _shared = BROKER.read().await;
    let mut run = start(common::Kind::Postgres).await;
    let reply = run.reply_queue().await;
    let address = format!("rabbitmq://localhost/{reply}");
    let patient_file = include_str!("data/fixtures/firely-sample/resources/example-patient.json");

    // Postman: an envelope with empty AMQP properties (no content type), a durable fanout reply exchange.
    let envelope = store_envelope(&address, json!([{"itemId": "0", "operation": "upsert", "resource": patient_file}]));
    run.publish(envelope.to_string().as_bytes(), BasicProperties::default()).await;
    let (response, headers) = run.next(&reply).await.expect("reply to the Postman flow");
    assert_eq!(response["messageType"], json!([STORE_RESPONSE]));
    assert_eq!(response["message"], json!({"errors": []}));
    assert_eq!(response["headers"]["fhir-release"], "R4", "fhir-release is echoed in the envelope");
    assert_eq!(header(&headers, "fhir-release").as_deref(), Some("R4"), "and in the AMQP headers");

    // Upsert twice: the second is a no-op.
    run.publish(envelope.to_string().as_bytes(), BasicProperties::default()).await;
    let (response, _) = run.next(&reply).await.unwrap();
    assert_eq!(response["message"], json!({"errors": []}));
    assert_eq!(run.store.version_log().await.unwrap().len(), 1, "the identical upsert wrote nothing");

    // The .NET client's create sends the new versionId as currentVersion.
    let mut dotnet = store_envelope(
        &address,
        json!([{"itemId": "Organization/example-organization", "operation": "create", "resourceType": "Organization",
                "resourceId": "example-organization", "currentVersion": "1",
                "resource": include_str!("data/fixtures/firely-sample/resources/example-organization.json")}]),
    );
    let request_id = Uuid::new_v4();
    dotnet["requestId"] = json!(request_id);
    dotnet["messageId"] = json!(Uuid::new_v4());
    dotnet["headers"]["MT-Request-AcceptType"] = json!(["urn:message:Bogus"]);
    run.send(&dotnet).await;
    let (response, _) = run.next(&reply).await.unwrap();
    assert_eq!(response["message"], json!({"errors": []}));
    assert_eq!(response["requestId"], json!(request_id));
    assert!(response["headers"].get("MT-Request-AcceptType").is_none(), "MT- headers are not carried over");

    // Retrieve returns the stored text byte for byte.
    let retrieve = json!({
        "messageType": [RETRIEVE_URN], "responseAddress": address,
        "message": {"instructions": [
            {"itemId": "p", "reference": {"resourceType": "Patient", "resourceId": "example-patient"}},
            {"itemId": "x", "reference": {"resourceType": "Patient", "resourceId": "nobody"}}]}
    });
    run.send(&retrieve).await;
    let (response, _) = run.next(&reply).await.unwrap();
    assert_eq!(response["messageType"][0], RETRIEVE_RESPONSE);
    assert_eq!(response["message"]["items"][0]["resource"], patient_file);
    assert_eq!(response["message"]["items"][1]["status"]["details"], "ResourceNotFound");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_goes_to_a_reply_or_the_error_or_skipped_queue_and_the_next_message_is_processed() {
    let _shared = BROKER.read().await;
    let mut run = start(common::Kind::Sqlite).await;
    let reply = run.reply_queue().await;
    let address = format!("rabbitmq://localhost/{reply}");
    let error_q = format!("{}_error", run.queue);
    let skipped_q = format!("{}_skipped", run.queue);
    let good = |id: &str| {
        store_envelope(&address, json!([{"itemId": "0", "operation": "upsert", "resource": patient(id, "1")}]))
    };

    enum Expect {
        Error(&'static str),
        Skipped,
        Reply(&'static str),
        FaultAndError,
    }
    let huge = format!(
        "{{\"messageType\": [\"{STORE_URN}\"], \"message\": {{\"pad\": \"{}\"}}}}",
        "x".repeat(20 * 1024 * 1024)
    );
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("invalid JSON", b"{\"messageType\": [".to_vec(), Expect::Error("not valid JSON")),
        ("invalid UTF-8", vec![b'{', 0xff, 0xfe, b'}'], Expect::Error("UTF-8")),
        (
            "no message",
            json!({"messageType": [STORE_URN], "responseAddress": address}).to_string().into_bytes(),
            Expect::FaultAndError,
        ),
        (
            "unknown messageType",
            json!({"messageType": ["urn:message:Other:Thing"], "message": {}}).to_string().into_bytes(),
            Expect::Skipped,
        ),
        (
            "non-GUID messageId",
            {
                let mut e = good("g1");
                e["messageId"] = json!("not-a-guid");
                e.to_string().into_bytes()
            },
            Expect::Error("not a GUID"),
        ),
        (
            "a plan that is not an object",
            json!({"messageType": [STORE_URN], "responseAddress": address, "message": 5}).to_string().into_bytes(),
            Expect::Reply("BadRequestWrongPayloadFormat"),
        ),
        (
            "instructions not an array",
            json!({"messageType": [STORE_URN], "responseAddress": address, "message": {"instructions": {}}})
                .to_string()
                .into_bytes(),
            Expect::Reply("BadRequestWrongPayloadFormat"),
        ),
        ("a 20 MB message", huge.into_bytes(), Expect::Error("MaxMessageBytes")),
    ];
    for (i, (what, body, expect)) in cases.into_iter().enumerate() {
        run.publish(&body, BasicProperties::default().with_content_type("application/vnd.masstransit+json".into()))
            .await;
        match expect {
            Expect::Error(reason) => {
                let (_, headers) = run.next(&error_q).await.unwrap_or_else(|| panic!("{what}: nothing in {error_q}"));
                assert_eq!(header(&headers, "MT-Reason").as_deref(), Some("fault"), "{what}");
                let message = header(&headers, "MT-Fault-Message").unwrap_or_default();
                assert!(message.contains(reason), "{what}: {message}");
            }
            Expect::FaultAndError => {
                let (fault, _) = run.next(&reply).await.unwrap_or_else(|| panic!("{what}: no fault"));
                assert_eq!(
                    fault["messageType"][0],
                    "urn:message:MassTransit:Fault[[Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand]]"
                );
                assert!(run.next(&error_q).await.is_some(), "{what}: not in {error_q}");
            }
            Expect::Skipped => {
                let (_, headers) =
                    run.next(&skipped_q).await.unwrap_or_else(|| panic!("{what}: nothing in {skipped_q}"));
                assert_eq!(header(&headers, "MT-Reason").as_deref(), Some("dead-letter"));
            }
            Expect::Reply(details) => {
                let (response, _) = run.next(&reply).await.unwrap_or_else(|| panic!("{what}: no reply"));
                assert_eq!(response["message"]["errors"][0]["status"]["details"], details, "{what}");
            }
        }
        // The next good message is processed.
        run.send(&good(&format!("after-{i}"))).await;
        let (response, _) =
            run.next(&reply).await.unwrap_or_else(|| panic!("after {what}: the next message got no reply"));
        assert_eq!(response["message"], json!({"errors": []}), "after {what}");
    }
    run.stop().await;
}

/// Stops and starts the RabbitMQ application; restores it even if the test fails.
struct BrokerRestart;
impl BrokerRestart {
    fn run(args: &[&str]) {
        let _ = std::process::Command::new("rabbitmqctl").args(args).status();
    }
}
impl Drop for BrokerRestart {
    fn drop(&mut self) {
        BrokerRestart::run(&["start_app"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_restart_mid_stream_loses_no_command_and_applies_none_twice() {
    if std::env::var_os("FHIR_PUBSUB_SKIP_BROKER_RESTART").is_some() {
        eprintln!("skipped: FHIR_PUBSUB_SKIP_BROKER_RESTART is set");
        return;
    }
    const COMMANDS: usize = 1500;
    let _alone = BROKER.write().await;
    let mut run = start(common::Kind::Postgres).await;
    let reply = run.reply_queue().await;
    let address = format!("rabbitmq://localhost/{reply}");
    let mut expected = HashMap::new();
    let mut confirms = Vec::new();
    for i in 0..COMMANDS {
        let request_id = Uuid::new_v4();
        let mut e = store_envelope(
            &address,
            json!([{"itemId": "0", "operation": "create", "resource": patient(&format!("r{i}"), "1")}]),
        );
        e["messageId"] = json!(Uuid::new_v4());
        e["requestId"] = json!(request_id);
        let properties = BasicProperties::default()
            .with_content_type("application/vnd.masstransit+json".into())
            .with_delivery_mode(2);
        let confirm = run
            .channel
            .basic_publish(
                run.queue.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                e.to_string().as_bytes(),
                properties,
            )
            .await
            .unwrap();
        confirms.push(confirm);
        expected.insert(request_id.to_string(), i);
    }
    for confirm in confirms {
        confirm.await.unwrap();
    }
    // Restart while commands are in flight: once a quarter of them are answered.
    let probe = run._connection.create_channel().await.unwrap();
    loop {
        let answered =
            probe.queue_declare(reply.as_str().into(), passive(), FieldTable::default()).await.unwrap().message_count();
        if answered as usize >= COMMANDS / 4 {
            assert!(
                (answered as usize) < COMMANDS,
                "all commands were answered before the restart; the test proves nothing"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let guard = BrokerRestart;
    BrokerRestart::run(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    BrokerRestart::run(&["start_app"]);
    drop(guard);
    BrokerRestart::run(&["await_startup"]);

    // Read every reply with a fresh connection (the old one died with the broker).
    let connection = Connection::connect(AMQP, ConnectionProperties::default()).await.unwrap();
    run.channel = connection.create_channel().await.unwrap();
    let mut replies: HashMap<String, Vec<Value>> = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while replies.len() < COMMANDS && std::time::Instant::now() < deadline {
        match run.next(&reply).await {
            Some((r, _)) => replies
                .entry(r["requestId"].as_str().unwrap_or_default().to_owned())
                .or_default()
                .push(r["message"].clone()),
            None => break,
        }
    }
    assert_eq!(replies.len(), COMMANDS, "every command answered");
    for (request, answers) in &replies {
        assert!(expected.contains_key(request));
        assert!(answers.iter().all(|a| *a == json!({"errors": []})), "{request}: {answers:?}");
    }
    let log = run.store.version_log().await.unwrap();
    assert_eq!(log.len(), COMMANDS, "each command applied exactly once");
    let repeats: usize = replies.values().map(|a| a.len() - 1).sum();
    eprintln!("{COMMANDS} commands, {repeats} repeated replies after redelivery");
    run._connection = connection;
    run.stop().await;
}
