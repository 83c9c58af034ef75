//! Settings as an operator meets them: files pasted from Firely, TOML, environment overrides,
//! refusals that name the key, and redaction of secrets.

use std::path::{Path, PathBuf};

use fhir_pubsub::config::{
    BrokerType, ClaimCheckStorage, ConfigError, KafkaAuthentication, Settings, StoreKind, redact_url,
};

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn load_text(name: &str, text: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, name, text);
    Settings::load(Some(&path), env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
}

fn env_only(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::load(None, env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config").join(name)
}

/// The RabbitMQ, notifications and claim-check sections of Firely's PubSub documentation, with their
/// comments, as an operator pastes them into one file.
const FIRELY_RABBITMQ: &str = r#"{
    "PubSub": {
        "MessageBroker": {
            "BrokerType": "RabbitMq",
            "Host": "localhost",
            "Username": "guest",
            "Password": "guest",
            "PrefetchCount": 1,
            "ConcurrencyNumber": 1,
            "ApplicationQueueName": "FirelyServer", // The name of the message queue used by Firely Server
            "VirtualHost": "/",
            "RabbitMQ": {
                "Port": 5671, // Or 5671 for SSL
                "UseSsl": false,
                "ClientCertificatePath": "", // Path to client certificate file (.pfx format), if using SSL
                "ClientCertificatePassphrase": "", // Passphrase for the client certificate, if using SSL
                "ServerName": "" // Server name for SSL validation, if not set, the host name defined in the Host property will be used
            }
        },
        "ResourceChangeNotifications": {
            "SendLightEvents": false, // If enabled, FS will send out events on changes. These events will not contain the complete resource
            "SendFullEvents": true, // If enabled, FS will send out events on changes. These events will contain the complete resource
            "ExcludeAuditEvents": true, // If enabled, FS will send out events on changes of resources, except Audit Events
            "PollingIntervalSeconds": 5, // How often Firely Server will be polling the DB for changes
            "MaxPublishBatchSize": 1000 // The maximum amount of resource changes that can be sent in a single message
        },
        "ClaimCheck": {
            "StorageType": "AzureBlobStorage", // or "Disabled"
            "AzureBlobContainerName": "firelyserver",
            "AzureBlobStorageConnectionString": "DefaultEndpointsProtocol=https;AccountName=acc;AccountKey=c2VjcmV0;EndpointSuffix=core.windows.net"
        }
    },
}"#;

const FIRELY_KAFKA: &str = r#"{
    "PubSub": {
      "MessageBroker": {
        "BrokerType": "Kafka", // Set to Kafka to use Kafka as the broker
        "Host": "localhost:9092", // Address of Kafka service
        "Kafka": {
          "TopicPrefix": "FirelyServerCommands", // Prefix for topic names (OPTIONAL)
          "ClientGroupId": "FirelyServer", // Consumer group ID
          "ClientId": "FirelyServer", // Unique client identifier
          "NumberOfConcurrentConsumers": 5, // Number of parallel consumers
          "AuthenticationMechanism": "SaslScram256", // None, SaslPlain, SaslScram256, SaslScram512
          "Username": "admin", // Only needed for SASL authentication
          "Password": "******", // Only needed for SASL authentication
          "CaLocation": "/path/to/ca.pem", // Path to CA certificate for SSL
          "KeystoreLocation": "/path/to/kafka.keystore.p12", // Path to client keystore for SSL
          "KeystorePassword": "******", // Password for the keystore
          "ExecuteStorePlanCommandErrorTopicName": "FirelyServerCommands.ExecuteStorePlanCommand.Errors" // Optional custom topic for error messages
        }
      }
    }
}"#;

/// An older Firely section (before 5.0), with `Enabled` and no BrokerType case care.
const FIRELY_OLD: &str = r#"{
        "PubSub": {
            "MessageBroker": {
                "Host": "localhost",
                "Username": "<your RabbitMQ username>",
                "Password": "<your RabbitMQ password>",
                "ApplicationQueueName": "FirelyServer",
                "VirtualHost": "/",
                "BrokerType": "rabbitmq" //  RabbitMq, AzureServiceBus
            },
            "ResourceChangeNotifications": {
                "Enabled": false, // set to true to enable this functionality
                "PollingIntervalSeconds": 5,
                "MaxPublishBatchSize": 1000
            }
        }
}"#;

#[test]
fn firely_rabbitmq_section_pasted_verbatim_loads() {
    let s = load_text("appsettings.json", FIRELY_RABBITMQ, &[]).unwrap();
    let broker = &s.pub_sub.message_broker;
    assert_eq!(broker.broker_type, BrokerType::RabbitMq);
    assert_eq!(broker.host, "localhost");
    assert_eq!(broker.port, 5671, "Firely's RabbitMQ.Port is honoured");
    assert!(broker.rabbitmq_tls(), "port 5671 means TLS");
    assert_eq!((broker.prefetch_count, broker.concurrency_number), (1, 1), "explicit values win over our defaults");
    assert_eq!(broker.rabbit_mq.client_certificate_path, None, "an empty path means none");
    let events = &s.pub_sub.resource_change_notifications;
    assert!(events.send_full_events && !events.send_light_events && events.exclude_audit_events);
    assert!(!events.publishes("AuditEvent") && events.publishes("Patient"));
    assert_eq!(s.pub_sub.claim_check.storage_type, ClaimCheckStorage::AzureBlobStorage);
    assert!(s.accepted_but_unused().is_empty());
}

#[test]
fn firely_kafka_section_pasted_verbatim_loads() {
    let s = load_text("appsettings.json", FIRELY_KAFKA, &[]).unwrap();
    let broker = &s.pub_sub.message_broker;
    assert_eq!(broker.broker_type, BrokerType::Kafka);
    assert_eq!(broker.kafka.number_of_concurrent_consumers, 5);
    assert_eq!(broker.kafka.authentication_mechanism, KafkaAuthentication::SaslScram256);
    assert_eq!(broker.kafka.keystore_location.as_deref(), Some("/path/to/kafka.keystore.p12"));
}

#[test]
fn an_old_firely_section_loads_and_its_unused_key_is_reported() {
    let s = load_text("appsettings.json", FIRELY_OLD, &[]).unwrap();
    assert_eq!(s.pub_sub.message_broker.broker_type, BrokerType::RabbitMq);
    let unused: Vec<&str> = s.accepted_but_unused().into_iter().map(|(k, _)| k).collect();
    assert_eq!(unused, ["PubSub.ResourceChangeNotifications.Enabled"]);
}

#[test]
fn keys_match_in_any_case_and_are_written_canonically() {
    let s = load_text(
        "s.json",
        r#"{"pubsub": {"messagebroker": {"HOST": "rabbit", "port": "5673", "brokertype": "KAFKA"}}, "store": {"url": "sqlite://x.db"}}"#,
        &[],
    )
    .unwrap();
    assert_eq!(s.pub_sub.message_broker.host, "rabbit");
    assert_eq!(s.pub_sub.message_broker.port, 5673, "a number written as text is converted");
    assert_eq!(s.pub_sub.message_broker.broker_type, BrokerType::Kafka);
    let out = s.redacted();
    assert_eq!(out["PubSub"]["MessageBroker"]["Host"], "rabbit");
    assert_eq!(out["PubSub"]["MessageBroker"]["BrokerType"], "Kafka");
    assert_eq!(out["Store"]["Url"], "sqlite://x.db");
}

#[test]
fn the_example_files_load_and_agree() {
    let json = Settings::load(Some(&example("bridge.json")), Vec::new()).unwrap();
    let toml = Settings::load(Some(&example("bridge.toml")), Vec::new()).unwrap();
    assert_eq!(json, toml);
    assert_ne!(json, Settings::load(None, Vec::new()).unwrap(), "the examples set more than the defaults");
    assert_eq!(json.pub_sub.message_broker.queue_arguments["x-queue-type"], "quorum");
    assert!(json.pub_sub.resource_change_notifications.send_light_events);
}

#[test]
fn toml_and_json_give_the_same_settings() {
    let json = load_text(
        "s.json",
        r#"{"PubSub": {"MessageBroker": {"Host": "h", "QueueArguments": {"x-message-ttl": 60000}},
            "ResourceChangeNotifications": {"ResourceTypes": ["Patient", "Observation"], "MaxPublishBatchSize": 10}},
            "Http": {"Listen": "0.0.0.0:9000"}, "Limits": {"MaxJsonDepth": 64}}"#,
        &[],
    )
    .unwrap();
    let toml = load_text(
        "s.toml",
        r#"
        [pubsub.messagebroker]
        host = "h"
        QueueArguments = { x-message-ttl = 60000 }
        [PubSub.ResourceChangeNotifications]
        ResourceTypes = ["Patient", "Observation"]
        MaxPublishBatchSize = 10
        [Http]
        Listen = "0.0.0.0:9000"
        [Limits]
        MaxJsonDepth = 64
        "#,
        &[],
    )
    .unwrap();
    assert_eq!(json, toml);
    assert_eq!(json.http.listen.port(), 9000);
    assert_eq!(json.pub_sub.message_broker.queue_arguments["x-message-ttl"], 60000);
}

#[test]
fn defaults_without_a_file() {
    let s = env_only(&[("PATH", "/usr/bin"), ("HOME", "/root")]).unwrap();
    let broker = &s.pub_sub.message_broker;
    assert_eq!((broker.host.as_str(), broker.port), ("127.0.0.1", 5672));
    assert_eq!((broker.username.as_str(), broker.password.as_str()), ("guest", "guest"));
    assert_eq!(broker.virtual_host, "/");
    assert_eq!(broker.application_queue_name, "FirelyServer");
    assert_eq!((broker.prefetch_count, broker.concurrency_number), (256, 256));
    assert!(!broker.rabbitmq_tls());
    assert_eq!(broker.kafka.topic_prefix, "FirelyServerCommands");
    assert_eq!(
        broker.kafka.execute_store_plan_command_error_topic_name.as_deref(),
        Some("FirelyServerCommands.ExecuteStorePlanCommand.Errors")
    );
    let events = &s.pub_sub.resource_change_notifications;
    assert!(!events.send_light_events && !events.send_full_events && !events.exclude_audit_events);
    assert_eq!(
        (events.polling_interval_seconds, events.max_publish_batch_size, events.lag_warning_seconds),
        (5, 1000, 30)
    );
    assert!(events.resource_types.is_empty());
    assert_eq!(s.pub_sub.claim_check.storage_type, ClaimCheckStorage::Disabled);
    assert_eq!(s.store.url, "sqlite://data/fhir-pubsub.db");
    assert_eq!(s.store.kind(), Ok(StoreKind::Sqlite));
    assert_eq!(s.http.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(s.limits.max_message_bytes, 16 * 1024 * 1024);
    assert_eq!((s.limits.max_instructions_per_plan, s.limits.max_json_depth), (10_000, 128));
}

#[test]
fn kafka_event_topics_default_to_names_kafka_accepts() {
    let kafka = Settings::default().pub_sub.message_broker.kafka;
    assert_eq!(kafka.resources_changed_event_topic_name, "Firely.Server.Contracts.Messages.V1.ResourcesChangedEvent");
    assert_eq!(
        kafka.resources_changed_light_event_topic_name,
        "Firely.Server.Contracts.Messages.V1.ResourcesChangedLightEvent"
    );
    assert!(!kafka.create_topics, "topics are not created unless asked");
}

#[test]
fn the_kafka_error_topic_follows_the_prefix() {
    let s = env_only(&[("FHIRPUBSUB_PubSub__MessageBroker__Kafka__TopicPrefix", "Cmds")]).unwrap();
    assert_eq!(
        s.pub_sub.message_broker.kafka.execute_store_plan_command_error_topic_name.as_deref(),
        Some("Cmds.ExecuteStorePlanCommand.Errors")
    );
}

#[test]
fn environment_overrides_nested_keys_in_any_case_with_conversion() {
    let s = load_text(
        "s.json",
        r#"{"PubSub": {"MessageBroker": {"Host": "from-file", "Port": 5672, "QueueArguments": {"x-queue-type": "quorum"}}}}"#,
        &[
            ("FHIRPUBSUB_PubSub__MessageBroker__Host", "rabbit"),
            ("fhirpubsub_pubsub__messagebroker__port", "5671"),
            ("FHIRPUBSUB_STORE__URL", "postgres://fhir:pw@db:5432/fhir"),
            ("FHIRPUBSUB_PUBSUB__RESOURCECHANGENOTIFICATIONS__SENDFULLEVENTS", "TRUE"),
            ("FHIRPUBSUB_PubSub__ResourceChangeNotifications__ResourceTypes", r#"["Patient","Observation"]"#),
            ("FHIRPUBSUB_PUBSUB__MESSAGEBROKER__QUEUEARGUMENTS__x-message-ttl", "60000"),
            ("FHIRPUBSUB_Http__Listen", "0.0.0.0:8081"),
            ("FHIRPUBSUB_PubSub__MessageBroker__BrokerType", "kAFKA"),
            ("UNRELATED", "ignored"),
        ],
    )
    .unwrap();
    let broker = &s.pub_sub.message_broker;
    assert_eq!(broker.host, "rabbit", "the environment wins over the file");
    assert_eq!(broker.port, 5671);
    assert_eq!(broker.broker_type, BrokerType::Kafka);
    assert_eq!(s.store.kind(), Ok(StoreKind::Postgres));
    assert!(s.pub_sub.resource_change_notifications.send_full_events);
    assert_eq!(s.pub_sub.resource_change_notifications.resource_types, ["Patient", "Observation"]);
    assert_eq!(broker.queue_arguments["x-message-ttl"], 60000, "a queue argument from the environment is typed");
    assert_eq!(broker.queue_arguments["x-queue-type"], "quorum", "the file's other arguments are kept");
    assert_eq!(s.http.listen.port(), 8081);
}

#[test]
fn environment_gives_lists_as_comma_text_and_objects_as_json_text() {
    let s = env_only(&[
        ("FHIRPUBSUB_PubSub__ResourceChangeNotifications__ResourceTypes", "Patient, Encounter"),
        ("FHIRPUBSUB_PubSub__MessageBroker__QueueArguments", r#"{"x-max-length": 10}"#),
        ("FHIRPUBSUB_PubSub__MessageBroker__RabbitMQ__Port", "5671"),
    ])
    .unwrap();
    assert_eq!(s.pub_sub.resource_change_notifications.resource_types, ["Patient", "Encounter"]);
    assert_eq!(s.pub_sub.message_broker.queue_arguments["x-max-length"], 10);
    assert_eq!(s.pub_sub.message_broker.port, 5671);
}

#[test]
fn an_environment_variable_naming_no_setting_is_refused() {
    for var in [
        "FHIRPUBSUB_PubSub__MessageBroker__Hots",
        "FHIRPUBSUB_Store",
        "FHIRPUBSUB_Store__Url__Extra",
        "FHIRPUBSUB_NOPE",
    ] {
        let err = env_only(&[(var, "x")]).unwrap_err();
        assert!(matches!(&err, ConfigError::UnknownEnv { var: v } if v == var), "{var}: {err}");
        assert!(err.to_string().contains(var), "{err}");
    }
}

#[test]
fn an_environment_value_of_the_wrong_type_names_the_key() {
    let err = env_only(&[("FHIRPUBSUB_pubsub__messagebroker__prefetchcount", "many")]).unwrap_err();
    assert_eq!(err.key(), Some("PubSub.MessageBroker.PrefetchCount"), "{err}");
    assert!(err.to_string().contains("many"), "{err}");
    let err = env_only(&[("FHIRPUBSUB_PubSub__ResourceChangeNotifications__SendLightEvents", "yes")]).unwrap_err();
    assert_eq!(err.key(), Some("PubSub.ResourceChangeNotifications.SendLightEvents"), "{err}");
}

#[test]
fn every_refusal_names_its_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            r#"{"PubSub": {"MessageBroker": {"Port": 0}}}"#,
            "PubSub.MessageBroker.Port",
            "must be between 1 and 65535, found 0",
        ),
        (r#"{"PubSub": {"MessageBroker": {"Port": "http"}}}"#, "PubSub.MessageBroker.Port", "whole number"),
        (r#"{"PubSub": {"MessageBroker": {"PrefetchCount": 0}}}"#, "PubSub.MessageBroker.PrefetchCount", "at least 1"),
        (
            r#"{"PubSub": {"MessageBroker": {"ConcurrencyNumber": 0}}}"#,
            "PubSub.MessageBroker.ConcurrencyNumber",
            "at least 1",
        ),
        (r#"{"PubSub": {"MessageBroker": {"BrokerType": "Mqtt"}}}"#, "PubSub.MessageBroker.BrokerType", "Mqtt"),
        (r#"{"PubSub": {"MessageBroker": {"Host": ""}}}"#, "PubSub.MessageBroker.Host", "empty"),
        (r#"{"PubSub": {"MessageBroker": {"Hots": "x"}}}"#, "PubSub.MessageBroker.Hots", "unknown"),
        (r#"{"PubSub": {"MessageBroker": {"Host": "a", "host": "b"}}}"#, "PubSub.MessageBroker.Host", "twice"),
        (r#"{"PubSub": {"MessageBroker": {"QueueArguments": [1]}}}"#, "PubSub.MessageBroker.QueueArguments", "object"),
        (
            r#"{"PubSub": {"MessageBroker": {"QueueArguments": {"x-a": null}}}}"#,
            "PubSub.MessageBroker.QueueArguments.x-a",
            "null",
        ),
        (
            r#"{"PubSub": {"MessageBroker": {"RabbitMQ": {"UseSsl": "maybe"}}}}"#,
            "PubSub.MessageBroker.RabbitMQ.UseSsl",
            "true or false",
        ),
        (
            r#"{"PubSub": {"MessageBroker": {"RabbitMQ": {"ClientCertFile": "c.pem"}}}}"#,
            "PubSub.MessageBroker.RabbitMQ.ClientKeyFile",
            "required",
        ),
        (
            r#"{"PubSub": {"MessageBroker": {"BrokerType": "Kafka", "Kafka": {"AuthenticationMechanism": "SaslPlain"}}}}"#,
            "PubSub.MessageBroker.Kafka.Username",
            "required",
        ),
        (
            r#"{"PubSub": {"MessageBroker": {"BrokerType": "Kafka", "Kafka": {"ResourcesChangedEventTopicName": "Firely.Server.Contracts.Messages.V1:ResourcesChangedEvent"}}}}"#,
            "PubSub.MessageBroker.Kafka.ResourcesChangedEventTopicName",
            "not `:`",
        ),
        (
            r#"{"PubSub": {"MessageBroker": {"BrokerType": "Kafka", "Kafka": {"TopicPrefix": "Firely Commands"}}}}"#,
            "PubSub.MessageBroker.Kafka.TopicPrefix",
            "not ` `",
        ),
        (
            r#"{"PubSub": {"MessageBroker": {"BrokerType": "Kafka", "Kafka": {"CreateTopicPartitions": 0}}}}"#,
            "PubSub.MessageBroker.Kafka.CreateTopicPartitions",
            "at least 1",
        ),
        (
            r#"{"PubSub": {"MessageBroker": {"Kafka": {"AuthenticationMechanism": "Kerberos"}}}}"#,
            "PubSub.MessageBroker.Kafka.AuthenticationMechanism",
            "Kerberos",
        ),
        (
            r#"{"PubSub": {"ResourceChangeNotifications": {"MaxPublishBatchSize": 0}}}"#,
            "PubSub.ResourceChangeNotifications.MaxPublishBatchSize",
            "between 1 and 100000",
        ),
        (
            r#"{"PubSub": {"ResourceChangeNotifications": {"MaxPublishBatchSize": 100001}}}"#,
            "PubSub.ResourceChangeNotifications.MaxPublishBatchSize",
            "found 100001",
        ),
        (
            r#"{"PubSub": {"ResourceChangeNotifications": {"PollingIntervalSeconds": 0}}}"#,
            "PubSub.ResourceChangeNotifications.PollingIntervalSeconds",
            "at least 1",
        ),
        (
            r#"{"PubSub": {"ResourceChangeNotifications": {"ResourceTypes": ["Patient", "not a type"]}}}"#,
            "PubSub.ResourceChangeNotifications.ResourceTypes.1",
            "not a type",
        ),
        (
            r#"{"PubSub": {"ResourceChangeNotifications": {"ResourceTypes": "[1]"}}}"#,
            "PubSub.ResourceChangeNotifications.ResourceTypes",
            "strings",
        ),
        (
            r#"{"PubSub": {"ClaimCheck": {"StorageType": "AzureBlobStorage"}}}"#,
            "PubSub.ClaimCheck.AzureBlobStorageConnectionString",
            "required",
        ),
        (r#"{"PubSub": {"ClaimCheck": {"StorageType": "Ftp"}}}"#, "PubSub.ClaimCheck.StorageType", "AzureBlobStorage"),
        (r#"{"PubSub": {"ClaimCheck": {"StorageType": "S3"}}}"#, "PubSub.ClaimCheck.Bucket", "required"),
        (r#"{"PubSub": {"ClaimCheck": {"StorageType": "LocalFiles"}}}"#, "PubSub.ClaimCheck.Directory", "required"),
        (
            r#"{"PubSub": {"ClaimCheck": {"StorageType": "AzureBlobStorage", "AzureBlobStorageConnectionString": "AccountKey=secret"}}}"#,
            "PubSub.ClaimCheck.AzureBlobStorageConnectionString",
            "AccountName",
        ),
        (
            r#"{"PubSub": {"ClaimCheck": {"StorageType": "S3", "Bucket": "b", "SecretAccessKey": "secret"}}}"#,
            "PubSub.ClaimCheck.SecretAccessKey",
            "AccessKeyId",
        ),
        (r#"{"Limits": {"MaxClaimCheckBytes": 0}}"#, "Limits.MaxClaimCheckBytes", "at least 1"),
        (r#"{"PubSub": {"Claimcheck": 3}}"#, "PubSub.ClaimCheck", "section"),
        (r#"{"Store": {"Url": "mysql://u:secret@h/db"}}"#, "Store.Url", "sqlite:// or postgres://"),
        (r#"{"Store": {"Url": "postgres://"}}"#, "Store.Url", "host"),
        (r#"{"Http": {"Listen": "localhost:80:80"}}"#, "Http.Listen", "localhost:80:80"),
        (r#"{"Limits": {"MaxJsonDepth": 0}}"#, "Limits.MaxJsonDepth", "at least 1"),
        (r#"{"Limits": {"MaxMessageBytes": -5}}"#, "Limits.MaxMessageBytes", "-5"),
        (r#"{"Logging": {}}"#, "Logging", "unknown"),
    ];
    for (text, key, fragment) in cases {
        let err = load_text("s.json", text, &[]).expect_err(text);
        assert_eq!(err.key(), Some(*key), "{text}: {err}");
        let message = err.to_string();
        assert!(message.starts_with(&format!("{key}: ")), "{text}: {message}");
        assert!(message.contains(fragment), "{text}: `{message}` should mention `{fragment}`");
        assert!(!message.contains("secret"), "{message}");
    }
}

#[test]
fn unreadable_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = write(&dir, "s.yaml", "PubSub: {}");
    assert!(matches!(Settings::load(Some(&yaml), Vec::new()), Err(ConfigError::UnsupportedFormat { .. })));
    let broken = write(&dir, "s.json", "{\"PubSub\": ");
    assert!(matches!(Settings::load(Some(&broken), Vec::new()), Err(ConfigError::Syntax { format: "JSON", .. })));
    let broken = write(&dir, "s.toml", "[PubSub\n");
    assert!(matches!(Settings::load(Some(&broken), Vec::new()), Err(ConfigError::Syntax { format: "TOML", .. })));
    let missing = dir.path().join("missing.json");
    assert!(matches!(Settings::load(Some(&missing), Vec::new()), Err(ConfigError::Read { .. })));
}

#[test]
fn redaction_hides_every_secret() {
    let secrets =
        ["broker-pw-1", "p12-pass-2", "kafka-pw-3", "keystore-pw-4", "YWNjb3VudGtleQ5", "db-pw-6", "sas-key-7"];
    let settings = load_text(
        "s.json",
        &format!(
            r#"{{"PubSub": {{
                "MessageBroker": {{"Password": "{}", "RabbitMQ": {{"ClientCertificatePath": "id.p12", "ClientCertificatePassphrase": "{}"}},
                    "Kafka": {{"Username": "u", "Password": "{}", "KeystoreLocation": "k.p12", "KeystorePassword": "{}"}}}},
                "ClaimCheck": {{"StorageType": "AzureBlobStorage",
                    "AzureBlobStorageConnectionString": "DefaultEndpointsProtocol=https;AccountName=a;AccountKey={}"}}}},
              "Store": {{"Url": "postgres://fhir:{}@db:5432/fhir"}}}}"#,
            secrets[0], secrets[1], secrets[2], secrets[3], secrets[4], secrets[5]
        ),
        &[],
    )
    .unwrap();
    let shown = settings.redacted().to_string();
    for secret in &secrets[..6] {
        assert!(!shown.contains(secret), "{secret} leaked in {shown}");
    }
    let redacted = settings.redacted();
    assert_eq!(redacted["PubSub"]["MessageBroker"]["Password"], "***");
    assert_eq!(redacted["PubSub"]["MessageBroker"]["Kafka"]["KeystorePassword"], "***");
    assert_eq!(redacted["Store"]["Url"], "postgres://fhir:***@db:5432/fhir");
    assert_eq!(
        redacted["PubSub"]["MessageBroker"]["RabbitMQ"]["ClientCertificatePath"], "id.p12",
        "paths are not secrets"
    );

    // A Service Bus Host is a connection string with the key in it.
    let sb = env_only(&[
        ("FHIRPUBSUB_PubSub__MessageBroker__BrokerType", "AzureServiceBus"),
        (
            "FHIRPUBSUB_PubSub__MessageBroker__Host",
            &format!(
                "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey={}",
                secrets[6]
            ),
        ),
    ])
    .unwrap();
    let shown = sb.redacted().to_string();
    assert!(!shown.contains(secrets[6]), "{shown}");
    assert!(shown.contains("SharedAccessKeyName=Root"), "{shown}");
    assert!(!format!("{:?}", redact_url(&sb.pub_sub.message_broker.host)).contains(secrets[6]));
}

#[test]
fn claim_check_secrets_are_hidden() {
    let settings = load_text(
        "s.json",
        r#"{"PubSub": {"ClaimCheck": {"StorageType": "S3", "Bucket": "plans", "AccessKeyId": "AKIDEXAMPLE",
            "SecretAccessKey": "s3-secret-8"}}}"#,
        &[],
    )
    .unwrap();
    assert!(!settings.redacted().to_string().contains("s3-secret-8"));
    assert!(settings.secrets().contains(&"s3-secret-8".to_owned()));
}
