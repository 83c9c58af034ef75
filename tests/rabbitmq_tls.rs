//! RabbitMQ over TLS: the `PubSub.MessageBroker.RabbitMQ` settings (`UseSsl`, `CaFile`, a PKCS#12 or
//! PEM client identity, `ServerName`) against the real broker at 127.0.0.1:5672, reached through
//! `socat` TLS terminators on free ports of 127.0.0.1 with a PKI generated for the run.
//!
//! Each test loads its settings the way the bridge does (a settings file, then
//! `RabbitMqOptions::from_settings`), uses its own random queue name and deletes what it declared.
//! Needs `openssl` and `socat` (scripts/services installs them).
#![cfg(feature = "rabbitmq")]

mod tls_support;

use std::path::Path;
use std::time::Duration;

use fhir_pubsub::config::Settings;
use fhir_pubsub::transport::rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use fhir_pubsub::transport::{OutgoingMessage, Transport, TransportError};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use serde_json::{Value, json};
use tls_support::{P12_PASSPHRASE, Pki, TlsTerminator};

const PLAIN_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Settings as an operator writes them: `rabbit_mq` is the `PubSub.MessageBroker.RabbitMQ` section.
fn settings(dir: &Path, host: &str, port: u16, queue: &str, rabbit_mq: Value) -> Settings {
    let file = dir.join(format!("{queue}.json"));
    let text = json!({
        "PubSub": {"MessageBroker": {
            "Host": host, "Port": port, "Username": "guest", "Password": "guest",
            "ApplicationQueueName": queue, "RabbitMQ": rabbit_mq,
        }},
        "Store": {"Url": format!("sqlite://{}", dir.join(format!("{queue}.db")).display())},
    });
    std::fs::write(&file, text.to_string()).expect("write settings");
    Settings::load(Some(&file), std::iter::empty()).expect("settings load")
}

fn options(settings: &Settings) -> RabbitMqOptions {
    let mut options = RabbitMqOptions::from_settings(&settings.pub_sub.message_broker);
    options.reconnect_wait = Duration::from_secs(5);
    options
}

/// Connects with these settings, sends a message to its own queue through the TLS connection and
/// receives it back through the same connection.
async fn assert_round_trip(settings: &Settings) {
    let queue = settings.pub_sub.message_broker.application_queue_name.clone();
    let transport = RabbitMqTransport::connect(options(settings)).await.expect("connect over TLS");
    assert!(transport.is_connected());
    let mut deliveries = transport.start().await.expect("declare and consume over TLS");
    let id = uuid::Uuid::new_v4();
    let message = OutgoingMessage {
        body: br#"{"message":{"over":"tls"}}"#.to_vec(),
        content_type: "application/vnd.masstransit+json",
        message_id: id,
        correlation_id: None,
        headers: Vec::new(),
        time_to_live: Some(Duration::from_secs(60)),
        reply_to: None,
        key: None,
    };
    transport.send(&transport.input_address(), message).await.expect("send over TLS");
    let delivery = tokio::time::timeout(Duration::from_secs(30), deliveries.recv())
        .await
        .expect("a delivery within 30 s")
        .expect("delivery channel open");
    assert_eq!(delivery.meta.message_id, Some(id.to_string()));
    assert_eq!(delivery.body, br#"{"message":{"over":"tls"}}"#.to_vec());
    delivery.acker.ack().await.expect("ack over TLS");
    transport.close().await;
    delete_endpoint(&queue).await;
}

/// Deletes the endpoint `q` with its error and skipped queues and exchanges, over plain AMQP.
async fn delete_endpoint(q: &str) {
    let connection = Connection::connect(PLAIN_URI, ConnectionProperties::default()).await.expect("plain connection");
    for name in [q.to_owned(), format!("{q}_error"), format!("{q}_skipped")] {
        let channel = connection.create_channel().await.expect("channel");
        let _ = channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
        let _ = channel.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default()).await;
    }
    let _ = connection.close(200, "done".into()).await;
}

/// The connection error for these settings; nothing may have been declared.
async fn connect_error(settings: &Settings) -> TransportError {
    match RabbitMqTransport::connect(options(settings)).await {
        Ok(transport) => {
            transport.close().await;
            panic!("connected, but the settings should have been refused");
        }
        Err(e) => e,
    }
}

/// No secret of the test PKI in a message: not the passphrase, not a private key.
fn assert_no_secret(pki: &Pki, text: &str) {
    assert!(!text.contains(P12_PASSPHRASE), "the passphrase leaked: {text}");
    for key in ["client.key", "server.key", "ca.key"] {
        let pem = std::fs::read_to_string(pki.path(key)).expect("key file");
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!text.contains(&body[..20]), "{key} leaked: {text}");
    }
    assert!(!text.contains("PRIVATE KEY"), "key material in: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_file_over_server_auth_round_trips() {
    let pki = Pki::generate();
    let tls = TlsTerminator::start(&pki.path("server.pem"), &pki.path("server.key"), None);
    for host in ["localhost", "127.0.0.1"] {
        let s = settings(
            pki.path("").as_path(),
            host,
            tls.port,
            &unique("tls-ca"),
            json!({"UseSsl": true, "CaFile": pki.setting("ca.pem")}),
        );
        assert_round_trip(&s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_pem_identity_round_trips() {
    let pki = Pki::generate();
    let tls = TlsTerminator::start(&pki.path("server.pem"), &pki.path("server.key"), Some(&pki.path("ca.pem")));
    let s = settings(
        pki.path("").as_path(),
        "localhost",
        tls.port,
        &unique("tls-pem"),
        json!({
            "UseSsl": true, "CaFile": pki.setting("ca.pem"),
            "ClientCertFile": pki.setting("client.pem"), "ClientKeyFile": pki.setting("client.key"),
        }),
    );
    assert_round_trip(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_pkcs12_identity_round_trips() {
    let pki = Pki::generate();
    let tls = TlsTerminator::start(&pki.path("server.pem"), &pki.path("server.key"), Some(&pki.path("ca.pem")));
    for bundle in ["client.p12", "client-3des.p12"] {
        let s = settings(
            pki.path("").as_path(),
            "localhost",
            tls.port,
            &unique("tls-p12"),
            json!({
                "UseSsl": true, "CaFile": pki.setting("ca.pem"),
                "ClientCertificatePath": pki.setting(bundle), "ClientCertificatePassphrase": P12_PASSPHRASE,
            }),
        );
        assert_round_trip(&s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_did_not_sign_the_server_certificate_is_refused() {
    let pki = Pki::generate();
    let tls = TlsTerminator::start(&pki.path("server.pem"), &pki.path("server.key"), None);
    let s = settings(
        pki.path("").as_path(),
        "localhost",
        tls.port,
        &unique("tls-other-ca"),
        json!({"UseSsl": true, "CaFile": pki.setting("other-ca.pem")}),
    );
    let text = connect_error(&s).await.to_string();
    eprintln!("{text}");
    assert_no_secret(&pki, &text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_without_a_client_certificate_is_refused() {
    let pki = Pki::generate();
    let tls = TlsTerminator::start(&pki.path("server.pem"), &pki.path("server.key"), Some(&pki.path("ca.pem")));
    let s = settings(
        pki.path("").as_path(),
        "localhost",
        tls.port,
        &unique("tls-no-cert"),
        json!({"UseSsl": true, "CaFile": pki.setting("ca.pem")}),
    );
    let text = connect_error(&s).await.to_string();
    eprintln!("{text}");
    assert_no_secret(&pki, &text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pkcs12_passphrase_is_refused() {
    let pki = Pki::generate();
    let tls = TlsTerminator::start(&pki.path("server.pem"), &pki.path("server.key"), Some(&pki.path("ca.pem")));
    let s = settings(
        pki.path("").as_path(),
        "localhost",
        tls.port,
        &unique("tls-bad-pass"),
        json!({
            "UseSsl": true, "CaFile": pki.setting("ca.pem"),
            "ClientCertificatePath": pki.setting("client.p12"), "ClientCertificatePassphrase": "not-the-passphrase",
        }),
    );
    let text = connect_error(&s).await.to_string();
    eprintln!("{text}");
    assert_no_secret(&pki, &text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_ca_file_is_named() {
    let pki = Pki::generate();
    let tls = TlsTerminator::start(&pki.path("server.pem"), &pki.path("server.key"), None);
    let s = settings(
        pki.path("").as_path(),
        "localhost",
        tls.port,
        &unique("tls-no-ca"),
        json!({"UseSsl": true, "CaFile": pki.setting("no-such-ca.pem")}),
    );
    let text = connect_error(&s).await.to_string();
    eprintln!("{text}");
    assert_no_secret(&pki, &text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_for_another_name_is_refused() {
    let pki = Pki::generate();
    let tls = TlsTerminator::start(&pki.path("elsewhere.pem"), &pki.path("elsewhere.key"), None);
    let s = settings(
        pki.path("").as_path(),
        "localhost",
        tls.port,
        &unique("tls-name"),
        json!({"UseSsl": true, "CaFile": pki.setting("ca.pem")}),
    );
    let text = connect_error(&s).await.to_string();
    eprintln!("{text}");
    assert_no_secret(&pki, &text);
}
