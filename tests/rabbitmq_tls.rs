//! RabbitMQ over TLS: the `PubSub.MessageBroker.RabbitMQ` settings (`UseSsl`, `CaFile`, a PKCS#12 or
//! PEM client identity, `ServerName`) against the real broker at 127.0.0.1:5672, reached through
//! `socat` TLS terminators on free ports of 127.0.0.1 with a PKI generated for the run.
//!
//! Each test loads its settings the way the bridge does (a settings file, then
//! `RabbitMqOptions::from_settings`), uses its own random queue name and deletes what it declared.
//! Needs `openssl` and `socat` (scripts/services installs them).
#![cfg(feature = "rabbitmq")]

mod common;
mod tls_support;

use std::path::Path;
use std::process::Command;
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
        // check-config tries to bind the HTTP address: any free port, whatever else runs here.
        "Http": {"Listen": "127.0.0.1:0"},
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
    transport.send(&transport.input_address(), message(id)).await.expect("send over TLS");
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

fn message(id: uuid::Uuid) -> OutgoingMessage {
    OutgoingMessage {
        body: br#"{"message":{"over":"tls"}}"#.to_vec(),
        content_type: "application/vnd.masstransit+json",
        message_id: id,
        correlation_id: None,
        headers: Vec::new(),
        time_to_live: Some(Duration::from_secs(60)),
        reply_to: None,
        key: None,
        session_id: None,
    }
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

/// The connection error for these settings; it must be a refusal (trying again cannot help).
async fn refusal(settings: &Settings) -> String {
    match RabbitMqTransport::connect(options(settings)).await {
        Ok(transport) => {
            transport.close().await;
            panic!("connected, but the settings should have been refused");
        }
        Err(e @ TransportError::Refused(_)) => e.to_string(),
        Err(e) => panic!("expected a refusal, got: {e}"),
    }
}

/// No secret of the test PKI in a message: not the passphrase, not a private key.
fn assert_no_secret(pki: &Pki, text: &str) {
    assert!(!text.contains(P12_PASSPHRASE), "the passphrase leaked: {text}");
    for key in ["client.key", "server.key", "ca.key"] {
        let pem = std::fs::read_to_string(pki.path(key)).expect("key file");
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!text.contains(&body[..24]), "{key} leaked: {text}");
    }
    assert!(!text.contains("PRIVATE KEY"), "key material in: {text}");
}

fn assert_mentions(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "`{part}` missing from: {text}");
    }
}

/// Server authentication only, as most brokers are set up.
fn server_auth(pki: &Pki) -> TlsTerminator {
    TlsTerminator::start(&pki.path("server.pem"), &pki.path("server.key"), None)
}

/// Mutual TLS: a client certificate signed by the test CA is required.
fn mutual(pki: &Pki) -> TlsTerminator {
    TlsTerminator::start(&pki.path("server.pem"), &pki.path("server.key"), Some(&pki.path("ca.pem")))
}

fn trusting(pki: &Pki, extra: Value) -> Value {
    let mut section = json!({"UseSsl": true, "CaFile": pki.setting("ca.pem")});
    section.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
    section
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_file_over_server_auth_round_trips() {
    let pki = Pki::generate();
    let tls = server_auth(&pki);
    // The server certificate carries both as subject alternative names.
    for host in ["localhost", "127.0.0.1"] {
        let s = settings(&pki.path(""), host, tls.port, &unique("tls-ca"), trusting(&pki, json!({})));
        assert_round_trip(&s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_pem_identity_round_trips() {
    let pki = Pki::generate();
    let tls = mutual(&pki);
    for key in ["client.key", "client-sec1.key"] {
        let identity = json!({"ClientCertFile": pki.setting("client.pem"), "ClientKeyFile": pki.setting(key)});
        let s = settings(&pki.path(""), "localhost", tls.port, &unique("tls-pem"), trusting(&pki, identity));
        assert_round_trip(&s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_pkcs12_identity_round_trips() {
    let pki = Pki::generate();
    let tls = mutual(&pki);
    for bundle in ["client.p12", "client-3des.p12", "client-legacy.p12"] {
        let identity =
            json!({"ClientCertificatePath": pki.setting(bundle), "ClientCertificatePassphrase": P12_PASSPHRASE});
        let s = settings(&pki.path(""), "localhost", tls.port, &unique("tls-p12"), trusting(&pki, identity));
        assert_round_trip(&s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_accepts_a_certificate_for_another_name() {
    let pki = Pki::generate();
    let tls = TlsTerminator::start(&pki.path("elsewhere.pem"), &pki.path("elsewhere.key"), None);
    let without = settings(&pki.path(""), "localhost", tls.port, &unique("tls-name"), trusting(&pki, json!({})));
    let text = refusal(&without).await;
    assert_mentions(&text, &["does not carry the name", "ServerName", "\"localhost\"", "elsewhere.test"]);
    assert_no_secret(&pki, &text);

    let named = trusting(&pki, json!({"ServerName": "elsewhere.test"}));
    let with = settings(&pki.path(""), "127.0.0.1", tls.port, &unique("tls-name"), named);
    assert!(with.accepted_but_unused().is_empty(), "ServerName is honoured");
    assert_round_trip(&with).await;
}

/// The reconnecting supervisor goes through the same TLS setup (CA, PKCS#12 identity, ServerName).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumption_resumes_over_tls_after_the_connection_drops() {
    let pki = Pki::generate();
    let mut tls = mutual(&pki);
    let identity = json!({
        "ClientCertificatePath": pki.setting("client.p12"), "ClientCertificatePassphrase": P12_PASSPHRASE,
        "ServerName": "localhost",
    });
    let s = settings(&pki.path(""), "127.0.0.1", tls.port, &unique("tls-reconnect"), trusting(&pki, identity));
    let transport = RabbitMqTransport::connect(options(&s)).await.expect("connect over TLS");
    let mut deliveries = transport.start().await.expect("start");

    tls.cut();
    common::eventually("the connection is seen lost", Duration::from_secs(30), || !transport.is_connected()).await;
    tls.resume();
    common::eventually("the transport reconnects", Duration::from_secs(30), || transport.is_connected()).await;

    let id = uuid::Uuid::new_v4();
    // A send right after the reconnect may still find the consumer being set up; it is not lost.
    transport.send(&transport.input_address(), message(id)).await.expect("send after reconnecting");
    let delivery = tokio::time::timeout(Duration::from_secs(30), deliveries.recv())
        .await
        .expect("a delivery within 30 s")
        .expect("the same delivery channel keeps working");
    assert_eq!(delivery.meta.message_id, Some(id.to_string()));
    delivery.acker.ack().await.expect("ack");
    transport.close().await;
    delete_endpoint(&s.pub_sub.message_broker.application_queue_name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_did_not_sign_the_server_certificate_is_refused() {
    let pki = Pki::generate();
    let tls = server_auth(&pki);
    let section = json!({"UseSsl": true, "CaFile": pki.setting("other-ca.pem")});
    let s = settings(&pki.path(""), "localhost", tls.port, &unique("tls-other-ca"), section);
    let text = refusal(&s).await;
    assert_mentions(&text, &["not signed by a CA in CaFile", "UnknownIssuer", &format!("localhost:{}", tls.port)]);
    assert_no_secret(&pki, &text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ca_file_a_private_ca_is_not_trusted() {
    let pki = Pki::generate();
    let tls = server_auth(&pki);
    let s = settings(&pki.path(""), "localhost", tls.port, &unique("tls-no-ca"), json!({"UseSsl": true}));
    let text = refusal(&s).await;
    assert_mentions(&text, &["not signed by a CA in CaFile or in the system's trust store"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_without_a_client_certificate_is_refused() {
    let pki = Pki::generate();
    let tls = mutual(&pki);
    let s = settings(&pki.path(""), "localhost", tls.port, &unique("tls-no-cert"), trusting(&pki, json!({})));
    let text = refusal(&s).await;
    assert_mentions(&text, &["demands a client certificate", "ClientCertificatePath", "ClientCertFile"]);
    assert_no_secret(&pki, &text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused() {
    let pki = Pki::generate();
    let tls = mutual(&pki);
    let identity = json!({"ClientCertFile": pki.setting("stranger.pem"), "ClientKeyFile": pki.setting("stranger.key")});
    let s = settings(&pki.path(""), "localhost", tls.port, &unique("tls-stranger"), trusting(&pki, identity));
    let text = refusal(&s).await;
    assert_mentions(&text, &["did not accept the client certificate"]);
    assert_no_secret(&pki, &text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pkcs12_passphrase_is_refused_before_connecting() {
    let pki = Pki::generate();
    // Nothing listens there: the passphrase is checked before any connection.
    let port = unused_port();
    for wrong in ["not-the-passphrase", ""] {
        let identity =
            json!({"ClientCertificatePath": pki.setting("client.p12"), "ClientCertificatePassphrase": wrong});
        let s = settings(&pki.path(""), "localhost", port, &unique("tls-bad-pass"), trusting(&pki, identity));
        let text = refusal(&s).await;
        assert_mentions(
            &text,
            &["ClientCertificatePath", &pki.setting("client.p12"), "wrong ClientCertificatePassphrase"],
        );
        assert!(wrong.is_empty() || !text.contains(wrong), "the given passphrase leaked: {text}");
        assert_no_secret(&pki, &text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_tls_files_are_named_before_connecting() {
    let pki = Pki::generate();
    let port = unused_port();
    let cases = [
        (
            json!({"UseSsl": true, "CaFile": pki.setting("no-such-ca.pem")}),
            vec!["CaFile", "no-such-ca.pem", "cannot be read"],
        ),
        (
            json!({"UseSsl": true, "CaFile": pki.setting("client.p12")}),
            vec!["CaFile", "client.p12", "holds no PEM certificate"],
        ),
        (
            trusting(
                &pki,
                json!({"ClientCertFile": pki.setting("client.pem"), "ClientKeyFile": pki.setting("no-such.key")}),
            ),
            vec!["ClientKeyFile", "no-such.key", "cannot be read"],
        ),
        (
            trusting(
                &pki,
                json!({"ClientCertFile": pki.setting("client.pem"), "ClientKeyFile": pki.setting("client.pem")}),
            ),
            vec!["ClientCertFile", "ClientKeyFile", "not a usable PEM certificate and private key"],
        ),
        // A key that does not belong to the certificate.
        (
            trusting(
                &pki,
                json!({"ClientCertFile": pki.setting("client.pem"), "ClientKeyFile": pki.setting("server.key")}),
            ),
            vec!["ClientCertFile", "server.key", "not a usable PEM certificate and private key"],
        ),
        (
            trusting(&pki, json!({"ClientCertificatePath": pki.setting("no-such.p12")})),
            vec!["ClientCertificatePath", "no-such.p12", "cannot be read"],
        ),
    ];
    for (section, parts) in cases {
        let s = settings(&pki.path(""), "localhost", port, &unique("tls-files"), section);
        let text = refusal(&s).await;
        assert_mentions(&text, &parts);
        assert_no_secret(&pki, &text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_plain_amqp_port_says_so() {
    let pki = Pki::generate();
    let s = settings(&pki.path(""), "127.0.0.1", 5672, &unique("tls-plain"), json!({"UseSsl": true}));
    let text = refusal(&s).await;
    assert_mentions(&text, &["did not answer in TLS", "5671"]);
}

#[test]
fn tls_keys_without_tls_are_reported_as_unused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let section = json!({"CaFile": "ca.pem", "ClientCertificatePath": "c.p12", "ServerName": "mq"});
    let off = settings(dir.path(), "localhost", 5672, "tls-off", section.clone());
    let unused: Vec<&str> = off.accepted_but_unused().into_iter().map(|(key, _)| key).collect();
    assert_eq!(
        unused,
        [
            "PubSub.MessageBroker.RabbitMQ.CaFile",
            "PubSub.MessageBroker.RabbitMQ.ClientCertificatePath",
            "PubSub.MessageBroker.RabbitMQ.ServerName"
        ]
    );
    assert!(off.accepted_but_unused().iter().all(|(_, why)| why.contains("set UseSsl to true")));
    let on = settings(dir.path(), "localhost", 5671, "tls-on", section);
    assert!(on.accepted_but_unused().is_empty());
}

/// A port of 127.0.0.1 nothing listens on.
fn unused_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

/// Runs `fhir-pubsub check-config` on these settings: (success, stdout and stderr).
fn check_config(settings_file: &Path) -> (bool, String) {
    check_config_with(settings_file, &[])
}

fn check_config_with(settings_file: &Path, env: &[(&str, &Path)]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fhir-pubsub"))
        .args(["check-config", "--config"])
        .arg(settings_file)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .expect("run fhir-pubsub check-config");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_says_which_connection_fails_and_why() {
    let pki = Pki::generate();
    let tls = mutual(&pki);
    let identity =
        json!({"ClientCertificatePath": pki.setting("client.p12"), "ClientCertificatePassphrase": P12_PASSPHRASE});
    settings(&pki.path(""), "localhost", tls.port, "tls-check-good", trusting(&pki, identity.clone()));
    let (ok, text) = check_config(&pki.path("tls-check-good.json"));
    assert!(ok, "{text}");
    assert_mentions(&text, &[&format!("broker rabbitmq://localhost:{}/tls-check-good: ok", tls.port)]);
    assert_no_secret(&pki, &text);

    let mut untrusting = identity;
    untrusting["UseSsl"] = json!(true);
    untrusting["CaFile"] = json!(pki.setting("other-ca.pem"));
    settings(&pki.path(""), "localhost", tls.port, "tls-check-bad", untrusting);
    let (ok, text) = check_config(&pki.path("tls-check-bad.json"));
    assert!(!ok, "{text}");
    // The store is fine; the broker connection is the one that fails, and the reason is given.
    assert_mentions(&text, &["tls-check-bad.db: ok", "broker: FAILED: connecting to RabbitMQ", "not signed by a CA"]);
    assert_no_secret(&pki, &text);
}

/// As in a minimal container image: no system CA certificates at all (the TLS library reads them
/// from `SSL_CERT_FILE` when it is set, here a file that does not exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_system_certificates_the_ca_file_is_enough() {
    let pki = Pki::generate();
    let tls = server_auth(&pki);
    let no_system_roots = [("SSL_CERT_FILE", pki.path("no-system-roots.pem")), ("SSL_CERT_DIR", pki.path("none"))];
    let env: Vec<(&str, &Path)> = no_system_roots.iter().map(|(k, v)| (*k, v.as_path())).collect();

    settings(&pki.path(""), "localhost", tls.port, "tls-bare", json!({"UseSsl": true}));
    let (ok, text) = check_config_with(&pki.path("tls-bare.json"), &env);
    assert!(!ok, "{text}");
    assert_mentions(&text, &["broker: FAILED", "TLS cannot trust any server", "set CaFile"]);

    settings(&pki.path(""), "localhost", tls.port, "tls-bare-ca", trusting(&pki, json!({})));
    let (ok, text) = check_config_with(&pki.path("tls-bare-ca.json"), &env);
    assert!(ok, "{text}");
    assert_mentions(&text, &[&format!("broker rabbitmq://localhost:{}/tls-bare-ca: ok", tls.port)]);
}
