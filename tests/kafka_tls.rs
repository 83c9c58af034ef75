//! TLS to Kafka against a real broker: tansu behind a `socat` TLS front-end serving a certificate
//! of a throw-away PKI (made with the `openssl` command line); tansu advertises the front-end's
//! port, so every client connection goes through TLS. (tansu 0.6 has `--cert`/`--key` flags, but
//! its command line refuses them together.) `CaLocation` turns TLS on and must trust the broker; a
//! PKCS#12 keystore (`KeystoreLocation`) is opened with its password and gives mutual TLS.
#![cfg(feature = "kafka")]

mod kafka_support;
mod tls_support;

use fhir_pubsub::transport::kafka::{KafkaOptions, KafkaTls, KafkaTransport};
use fhir_pubsub::transport::{OutgoingMessage, Transport, TransportError};
use kafka_support::{Collector, Tansu};
use tls_support::{P12_PASSPHRASE, Pki, TlsTerminator};
use uuid::Uuid;

/// tansu, its TLS front-end, and the prefix of the topics made on it.
struct TlsBroker {
    tansu: Tansu,
    _front: TlsTerminator,
    prefix: String,
}

/// With `mutual`, the front-end demands a client certificate signed by the test CA.
async fn tls_broker(pki: &Pki, mutual: bool) -> TlsBroker {
    let front_port = tls_support::free_port();
    let client_keystore = mutual.then(|| (pki.path("client.p12"), P12_PASSPHRASE.to_owned()));
    let tansu = Tansu::start_behind(front_port, (pki.path("ca.pem"), client_keystore)).await;
    let client_ca = mutual.then(|| pki.path("ca.pem"));
    let front = TlsTerminator::start_on(
        front_port,
        &pki.path("server.pem"),
        &pki.path("server.key"),
        client_ca.as_deref(),
        tansu.port,
    );
    let prefix = format!("t{}", Uuid::new_v4().simple());
    let topics = [
        format!("{prefix}.ExecuteStorePlanCommand"),
        format!("{prefix}.RetrievePlanCommand"),
        format!("{prefix}.ExecuteStorePlanCommand.Errors"),
        format!("{prefix}.replies"),
    ];
    tansu.create_topics(&topics.iter().map(String::as_str).collect::<Vec<_>>(), 1).await;
    TlsBroker { tansu, _front: front, prefix }
}

impl TlsBroker {
    fn options(&self, tls: KafkaTls) -> KafkaOptions {
        KafkaOptions {
            bootstrap_servers: self.tansu.bootstrap(),
            topic_prefix: self.prefix.clone(),
            error_topic: format!("{}.ExecuteStorePlanCommand.Errors", self.prefix),
            tls: Some(tls),
            ..KafkaOptions::default()
        }
    }
}

fn refusal(error: &TransportError) -> &str {
    match error {
        TransportError::Refused(message) => message,
        other => panic!("not a refusal: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ca_location_turns_tls_on_and_a_reply_goes_out_over_it() {
    let pki = Pki::generate();
    let broker = tls_broker(&pki, false).await;
    let tls = KafkaTls { ca_location: Some(pki.path("ca.pem")), keystore: None };
    let transport = KafkaTransport::connect(broker.options(tls)).await.expect("TLS with the broker's CA");
    let replies = format!("{}.replies", broker.prefix);
    let collector = Collector::start(&broker.tansu, &[&replies]).await;
    let message = OutgoingMessage {
        body: br#"{"errors": []}"#.to_vec(),
        content_type: "application/json",
        message_id: Uuid::new_v4(),
        correlation_id: None,
        headers: vec![("fhir-release".into(), serde_json::json!("R4"))],
        time_to_live: None,
        reply_to: None,
        key: None,
        session_id: None,
    };
    transport.send(&format!("kafka://localhost:9093/{replies}"), message).await.expect("sent over TLS");
    let records = collector.wait_for(&replies, 1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].header("fhir-release"), Some("R4"));
    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_certificate_from_another_ca_is_refused_at_start() {
    let pki = Pki::generate();
    let broker = tls_broker(&pki, false).await;
    let tls = KafkaTls { ca_location: Some(pki.path("other-ca.pem")), keystore: None };
    let error = KafkaTransport::connect(broker.options(tls)).await.expect_err("untrusted broker");
    let message = refusal(&error);
    assert!(message.contains("SSL handshake") && message.contains("certificate verify failed"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pkcs12_keystore_opens_with_its_password_and_a_wrong_one_is_refused_without_showing_it() {
    let pki = Pki::generate();
    let broker = tls_broker(&pki, false).await;
    let keystore = |password: &str| KafkaTls {
        ca_location: Some(pki.path("ca.pem")),
        keystore: Some((pki.path("client.p12"), password.to_owned())),
    };
    let transport = KafkaTransport::connect(broker.options(keystore(P12_PASSPHRASE))).await.expect("keystore opens");
    transport.close().await;

    let wrong = "wrong-Keystore-Password-91";
    let error = KafkaTransport::connect(broker.options(keystore(wrong))).await.expect_err("wrong password");
    let message = refusal(&error);
    assert!(message.contains("keystore"), "{message}");
    assert!(!message.contains(wrong) && !message.contains(P12_PASSPHRASE), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_needs_the_keystore() {
    let pki = Pki::generate();
    let broker = tls_broker(&pki, true).await;
    let with_keystore = KafkaTls {
        ca_location: Some(pki.path("ca.pem")),
        keystore: Some((pki.path("client.p12"), P12_PASSPHRASE.to_owned())),
    };
    let transport = KafkaTransport::connect(broker.options(with_keystore)).await.expect("client certificate accepted");
    transport.close().await;

    let without = KafkaTls { ca_location: Some(pki.path("ca.pem")), keystore: None };
    let error = KafkaTransport::connect(broker.options(without)).await.expect_err("no client certificate");
    let message = refusal(&error);
    assert!(message.contains("certificate required"), "{message}");
}
