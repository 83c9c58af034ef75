//! Settings: Firely's `PubSub` section verbatim, plus our own `Store`, `Http` and `Limits`.
//!
//! This module owns reading the settings file (JSON with comments and trailing commas, or TOML),
//! applying `FHIRPUBSUB_…` environment overrides, and refusing anything wrong before the bridge
//! connects to anything. Its invariants:
//! - keys are matched without regard to case, as ASP.NET configuration does, so a `PubSub` section
//!   pasted from a Firely `appsettings.instance.json` loads unchanged; output uses the canonical case;
//! - a value may be written as its type or as text (`"Port": "5672"`), as ASP.NET allows;
//! - an unknown key, a value of the wrong type or an impossible value is an error naming the full
//!   key path (`PubSub.MessageBroker.Port: must be between 1 and 65535, found 0`);
//! - a loaded [`Settings`] has passed [`Settings::validate`], and derived defaults (the Kafka error
//!   topic) are filled in;
//! - secrets never leave through [`Settings::redacted`] or [`redact_url`].
//!
//! The doc comments of the setting fields below are the user documentation of each key.

mod keys;
mod lenient;
mod redact;
mod servicebus;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use redact::{HIDDEN, MIN_SCRUBBED_LEN, Scrubber, redact_url, secrets_in};
pub use servicebus::{ServiceBusConnectionString, ServiceBusCredential};

/// Prefix of the environment variables that override settings: `FHIRPUBSUB_` + the key path joined
/// with `__`, in any case (`FHIRPUBSUB_PubSub__MessageBroker__Host`, `FHIRPUBSUB_STORE__URL`).
pub const ENV_PREFIX: &str = "FHIRPUBSUB_";

/// Variables with the settings' prefix that are options of the command, not settings.
pub const COMMAND_ENV: &[&str] = &["FHIRPUBSUB_LOG_FORMAT"];

/// Firely keys that are accepted, so that an existing Firely section loads, but that the bridge
/// does not act on. [`Settings::accepted_but_unused`] lists the ones a configuration sets, for a
/// warning at start.
pub const ACCEPTED_BUT_UNUSED: &[(&str, &str)] = &[(
    "PubSub.ResourceChangeNotifications.Enabled",
    "Firely Server before 5.0 switched events on with it; use SendLightEvents and/or SendFullEvents",
)];

/// Why a RabbitMQ TLS key is reported by [`Settings::accepted_but_unused`] when TLS is off (as
/// MassTransit does, it is then ignored rather than refused, so a pasted Firely section loads).
pub const TLS_OFF: &str = "TLS is off (UseSsl is false and Port is not 5671), so it has no effect; set UseSsl to true";

/// Why the settings were refused. Every variant about a setting names its full key path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The settings file could not be read.
    #[error("cannot read the settings file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The settings file's name does not end in `.json` or `.toml`.
    #[error("the settings file {path} must end in .json or .toml")]
    UnsupportedFormat { path: PathBuf },
    /// The settings file is not valid JSON or TOML.
    #[error("the settings file {path} is not valid {format}: {message}")]
    Syntax { path: PathBuf, format: &'static str, message: String },
    /// A key that names no setting.
    #[error("{key}: unknown setting (known here: {known})")]
    UnknownKey { key: String, known: String },
    /// An environment variable with the `FHIRPUBSUB_` prefix that names no setting.
    #[error(
        "environment variable {var}: names no setting (expected FHIRPUBSUB_ + a key path joined with __, e.g. FHIRPUBSUB_PubSub__MessageBroker__Host)"
    )]
    UnknownEnv { var: String },
    /// A setting with a wrong type or an impossible value.
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError::Invalid { key: key.into(), problem: problem.into() }
    }

    /// The full key path of the setting at fault, when the error is about one setting.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Declares a settings enum read in any case and written in its canonical spelling.
macro_rules! setting_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal $(| $alias:literal)*),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// The canonical spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Reads a spelling in any case.
            pub fn parse(text: &str) -> Option<Self> {
                let text = text.trim();
                $(if text.eq_ignore_ascii_case($text) $(|| text.eq_ignore_ascii_case($alias))* { return Some($name::$variant); })+
                None
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> { s.serialize_str(self.as_str()) }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = lenient::string(d)?;
                Self::parse(&text).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "must be one of {}, found `{text}`",
                        [$($text),+].join(", ")
                    ))
                })
            }
        }
    };
}

setting_enum! {
    /// The message broker the bridge connects to.
    BrokerType {
        RabbitMq = "RabbitMq",
        Kafka = "Kafka",
        AzureServiceBus = "AzureServiceBus",
    }
}

setting_enum! {
    /// How the Kafka client authenticates.
    KafkaAuthentication {
        /// No SASL.
        None = "None",
        /// SASL PLAIN with Username and Password.
        SaslPlain = "SaslPlain",
        /// SASL SCRAM-SHA-256 with Username and Password.
        SaslScram256 = "SaslScram256",
        /// SASL SCRAM-SHA-512 with Username and Password.
        SaslScram512 = "SaslScram512",
    }
}

setting_enum! {
    /// Where claim-check payloads are stored.
    ClaimCheckStorage {
        /// Claim checks are refused.
        Disabled = "Disabled",
        /// Azure Blob Storage (or the Azurite emulator).
        AzureBlobStorage = "AzureBlobStorage",
        /// Beyond Firely: Amazon S3 or an S3-compatible store (`Bucket`, `Region`, `Endpoint`).
        S3 = "S3" | "AmazonS3",
        /// Beyond Firely: Google Cloud Storage (`Bucket`).
        GoogleCloudStorage = "GoogleCloudStorage" | "Gcs",
        /// Beyond Firely: files under a local directory (`Directory`).
        LocalFiles = "LocalFiles" | "LocalFileSystem",
    }
}

/// Every setting of the bridge. Load with [`Settings::load`]; `Settings::default()` is what runs
/// without a settings file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields, default)]
pub struct Settings {
    /// Firely Server's `PubSub` section, verbatim.
    pub pub_sub: PubSubSettings,
    /// Where resources, history and the change log are stored.
    pub store: StoreSettings,
    /// The HTTP endpoint for health, readiness, metrics and status.
    pub http: HttpSettings,
    /// Limits on what a message may hold.
    pub limits: LimitSettings,
    /// How a stopping bridge finishes its work.
    pub shutdown: ShutdownSettings,
}

/// `PubSub`: Firely's section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields, default)]
pub struct PubSubSettings {
    /// The broker to connect to and how.
    pub message_broker: MessageBrokerSettings,
    /// Which change events to publish and how.
    pub resource_change_notifications: ResourceChangeNotificationSettings,
    /// Where store plans sent by claim check are fetched from.
    pub claim_check: ClaimCheckSettings,
}

/// `PubSub.MessageBroker`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields, default)]
pub struct MessageBrokerSettings {
    /// `RabbitMq`, `Kafka` or `AzureServiceBus` (any case). Default `RabbitMq`.
    pub broker_type: BrokerType,
    /// RabbitMQ: the host name. Kafka: the bootstrap servers (`host:9092,host2:9092`). Azure Service
    /// Bus: the connection string (`Endpoint=sb://…;SharedAccessKeyName=…;SharedAccessKey=…`).
    /// Default `127.0.0.1`.
    #[serde(deserialize_with = "lenient::string")]
    pub host: String,
    /// RabbitMQ port. Default 5672; 5671 turns TLS on. Firely's own place for it,
    /// `PubSub.MessageBroker.RabbitMQ.Port`, is accepted too.
    #[serde(deserialize_with = "lenient::int")]
    pub port: u16,
    /// RabbitMQ user. Default `guest`.
    #[serde(deserialize_with = "lenient::string")]
    pub username: String,
    /// RabbitMQ password. Default `guest`.
    #[serde(deserialize_with = "lenient::string")]
    pub password: String,
    /// RabbitMQ virtual host. Default `/`.
    #[serde(deserialize_with = "lenient::string")]
    pub virtual_host: String,
    /// The queue (RabbitMQ), subscription target queue (Service Bus) the bridge consumes commands
    /// from. Default `FirelyServer`, so the bridge takes Firely Server's place unchanged.
    #[serde(deserialize_with = "lenient::string")]
    pub application_queue_name: String,
    /// How many unacknowledged commands the broker may hand the bridge at once (MassTransit's
    /// `PrefetchCount`). Default 256, not Firely's 1: the bridge keeps per-resource ordering itself
    /// (commands touching the same resource are applied in arrival order), so a deeper prefetch only
    /// saves round trips (RabbitMQ's guidance puts the best throughput at 100 to 300). Each message
    /// in hand is held in memory: at most `PrefetchCount` × `Limits.MaxMessageBytes`.
    #[serde(deserialize_with = "lenient::int")]
    pub prefetch_count: u16,
    /// How many commands are processed at once (MassTransit's `ConcurrentMessageLimit`). Default 256,
    /// not Firely's 1, for the same reason as `PrefetchCount`: store plans in process at the same
    /// time commit together, so more in process means larger groups. At most `PrefetchCount` are
    /// ever in hand, so a higher value has no further effect.
    #[serde(deserialize_with = "lenient::int")]
    pub concurrency_number: u32,
    /// RabbitMQ arguments for declaring the command queue, name → JSON value, e.g.
    /// `{ "x-message-ttl": 60000, "x-queue-type": "quorum" }`. Default none. They must match an
    /// existing queue's arguments, or RabbitMQ refuses the declaration.
    #[serde(deserialize_with = "lenient::object")]
    pub queue_arguments: serde_json::Map<String, Value>,
    /// RabbitMQ TLS (Firely's `RabbitMQ` subsection, plus our PEM keys).
    #[serde(rename = "RabbitMQ")]
    pub rabbit_mq: RabbitMqSettings,
    /// Kafka (Firely's `Kafka` subsection).
    pub kafka: KafkaSettings,
    /// Ours: Azure Service Bus names and error handling.
    pub service_bus: ServiceBusSettings,
}

impl Default for MessageBrokerSettings {
    fn default() -> Self {
        MessageBrokerSettings {
            broker_type: BrokerType::RabbitMq,
            host: "127.0.0.1".into(),
            port: 5672,
            username: "guest".into(),
            password: "guest".into(),
            virtual_host: "/".into(),
            application_queue_name: "FirelyServer".into(),
            prefetch_count: 256,
            concurrency_number: 256,
            queue_arguments: serde_json::Map::new(),
            rabbit_mq: RabbitMqSettings::default(),
            kafka: KafkaSettings::default(),
            service_bus: ServiceBusSettings::default(),
        }
    }
}

impl MessageBrokerSettings {
    /// Whether the RabbitMQ connection uses TLS: `UseSsl` is true or the port is 5671.
    pub fn rabbitmq_tls(&self) -> bool {
        self.rabbit_mq.use_ssl || self.port == 5671
    }
}

/// `PubSub.MessageBroker.RabbitMQ`: TLS to RabbitMQ. The server's certificate is checked against the
/// system's roots, plus `CaFile` when given. A client identity is either a PKCS#12 file
/// (`ClientCertificatePath` + `ClientCertificatePassphrase`, Firely's keys) or a PEM pair
/// (`ClientCertFile` + `ClientKeyFile`), not both.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields, default)]
pub struct RabbitMqSettings {
    /// Turns TLS on whatever the port. Default false (TLS is still on for port 5671).
    #[serde(deserialize_with = "lenient::boolean")]
    pub use_ssl: bool,
    /// PKCS#12 (`.pfx`/`.p12`) file with the client certificate and key, for mutual TLS. Default none.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub client_certificate_path: Option<String>,
    /// Password of `ClientCertificatePath`. Default none.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub client_certificate_passphrase: Option<String>,
    /// The name the server's certificate must carry, also sent as the TLS server name (SNI).
    /// Default: `Host`. Set it when `Host` is an address the certificate does not name.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub server_name: Option<String>,
    /// Ours: a PEM file of CA certificates trusted for the server, in addition to the system's
    /// (which `SSL_CERT_FILE`/`SSL_CERT_DIR` replace when set).
    #[serde(deserialize_with = "lenient::opt_string")]
    pub ca_file: Option<String>,
    /// Ours: a PEM client certificate (chain), with `ClientKeyFile`.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub client_cert_file: Option<String>,
    /// Ours: the PEM private key of `ClientCertFile`.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub client_key_file: Option<String>,
}

/// `PubSub.MessageBroker.Kafka`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Command topics are `<TopicPrefix>.ExecuteStorePlanCommand` and
    /// `<TopicPrefix>.RetrievePlanCommand`. Default `FirelyServerCommands`.
    #[serde(deserialize_with = "lenient::string")]
    pub topic_prefix: String,
    /// Consumer group id. Default `FirelyServer`.
    #[serde(deserialize_with = "lenient::string")]
    pub client_group_id: String,
    /// Client id. Default `FirelyServer`.
    #[serde(deserialize_with = "lenient::string")]
    pub client_id: String,
    /// How many consumers read the command topics in parallel. Default 1.
    #[serde(deserialize_with = "lenient::int")]
    pub number_of_concurrent_consumers: u32,
    /// `None`, `SaslPlain`, `SaslScram256` or `SaslScram512`. Default `None`; anything else needs
    /// `Username` and `Password`.
    pub authentication_mechanism: KafkaAuthentication,
    /// SASL user name. Default none.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub username: Option<String>,
    /// SASL password. Default none.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub password: Option<String>,
    /// PEM file of the CAs trusted for the brokers; setting it turns TLS on. Default none.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub ca_location: Option<String>,
    /// PKCS#12 keystore with the client certificate and key, for mutual TLS; setting it turns TLS on
    /// too (the server is then checked against `CaLocation`, or the system's CAs). Default none.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub keystore_location: Option<String>,
    /// Password of `KeystoreLocation`. Default none.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub keystore_password: Option<String>,
    /// Topic that receives store plans that could not be processed. Default
    /// `<TopicPrefix>.ExecuteStorePlanCommand.Errors`.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub execute_store_plan_command_error_topic_name: Option<String>,
    /// Ours: the topic of `ResourcesChangedEvent`. Default
    /// `Firely.Server.Contracts.Messages.V1.ResourcesChangedEvent` (Kafka topic names cannot hold `:`).
    #[serde(deserialize_with = "lenient::string")]
    pub resources_changed_event_topic_name: String,
    /// Ours: the topic of `ResourcesChangedLightEvent`. Default
    /// `Firely.Server.Contracts.Messages.V1.ResourcesChangedLightEvent`.
    #[serde(deserialize_with = "lenient::string")]
    pub resources_changed_light_event_topic_name: String,
    /// Ours: create the topics the bridge needs (command, error and enabled event topics) when they
    /// are missing, with `CreateTopicPartitions` partitions and the broker's default replication.
    /// Default false: a missing topic stops the bridge at start with the command that creates it.
    #[serde(deserialize_with = "lenient::boolean")]
    pub create_topics: bool,
    /// Ours: partitions of a topic made by `CreateTopics`. Default 1.
    #[serde(deserialize_with = "lenient::int")]
    pub create_topic_partitions: u32,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            topic_prefix: "FirelyServerCommands".into(),
            client_group_id: "FirelyServer".into(),
            client_id: "FirelyServer".into(),
            number_of_concurrent_consumers: 1,
            authentication_mechanism: KafkaAuthentication::None,
            username: None,
            password: None,
            ca_location: None,
            keystore_location: None,
            keystore_password: None,
            execute_store_plan_command_error_topic_name: None,
            resources_changed_event_topic_name: format!("{}.ResourcesChangedEvent", crate::contracts::NAMESPACE),
            resources_changed_light_event_topic_name: format!(
                "{}.ResourcesChangedLightEvent",
                crate::contracts::NAMESPACE
            ),
            create_topics: false,
            create_topic_partitions: 1,
        }
    }
}

impl KafkaSettings {
    /// The error topic: the setting, or `<TopicPrefix>.ExecuteStorePlanCommand.Errors`.
    pub fn error_topic_name(&self) -> String {
        self.execute_store_plan_command_error_topic_name
            .clone()
            .unwrap_or_else(|| format!("{}.ExecuteStorePlanCommand.Errors", self.topic_prefix))
    }
}

/// `PubSub.MessageBroker.ServiceBus` (ours): how the bridge names Service Bus entities and where
/// messages it cannot handle go. `Host` holds the connection string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields, default)]
pub struct ServiceBusSettings {
    /// What MassTransit puts between the message namespace and the type name in a topic name:
    /// `~` (Firely's `Firely.Server.Contracts.Messages.V1~ExecuteStorePlanCommand`), `/`
    /// (MassTransit's default) or `_`. Default `~`.
    #[serde(deserialize_with = "lenient::string")]
    pub namespace_separator: String,
    /// Copy messages that cannot be handled to the queues `<queue>_error` and `<queue>_skipped`
    /// (with the reason in `MT-Fault-*` application properties), as MassTransit does, instead of
    /// dead-lettering them with the reason. Default false: the queue's dead-letter sub-queue.
    #[serde(deserialize_with = "lenient::boolean")]
    pub use_error_queues: bool,
    /// When the store is unavailable, how many seconds a command stays locked before it is
    /// abandoned and so delivered again (its delivery count one higher; past the queue's
    /// `MaxDeliveryCount` Service Bus dead-letters it). Default 5.
    #[serde(deserialize_with = "lenient::int")]
    pub retry_delay_seconds: u64,
}

impl Default for ServiceBusSettings {
    fn default() -> Self {
        ServiceBusSettings { namespace_separator: "~".into(), use_error_queues: false, retry_delay_seconds: 5 }
    }
}

/// The namespace separators MassTransit can be set to on Service Bus.
pub const SERVICE_BUS_SEPARATORS: [&str; 3] = ["~", "/", "_"];

/// `PubSub.ResourceChangeNotifications`: change events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields, default)]
pub struct ResourceChangeNotificationSettings {
    /// Publish `ResourcesChangedLightEvent` (references only). Default false.
    #[serde(deserialize_with = "lenient::boolean")]
    pub send_light_events: bool,
    /// Publish `ResourcesChangedEvent` (with the resources). Default false.
    #[serde(deserialize_with = "lenient::boolean")]
    pub send_full_events: bool,
    /// Do not publish changes of `AuditEvent` resources. Default false.
    #[serde(deserialize_with = "lenient::boolean")]
    pub exclude_audit_events: bool,
    /// How often, in seconds, the change log is checked for changes the bridge was not told about
    /// (written by another instance). Changes the bridge commits itself are published at once.
    /// Default 5.
    #[serde(deserialize_with = "lenient::int")]
    pub polling_interval_seconds: u64,
    /// At most this many changes per event message, 1 to 100000. Default 1000.
    #[serde(deserialize_with = "lenient::int")]
    pub max_publish_batch_size: u32,
    /// Ours: publish changes of these resource types only (`["Patient", "Observation"]`, or as text
    /// `Patient,Observation`). Default empty: every type.
    #[serde(deserialize_with = "lenient::string_list")]
    pub resource_types: Vec<String>,
    /// Ours: warn when the oldest unpublished change is older than this many seconds. Default 30.
    #[serde(deserialize_with = "lenient::int")]
    pub lag_warning_seconds: u64,
    /// Firely Server before 5.0: switched events on. Accepted and not used (see
    /// [`ACCEPTED_BUT_UNUSED`]); use `SendLightEvents` and `SendFullEvents`.
    #[serde(deserialize_with = "lenient::opt_boolean")]
    pub enabled: Option<bool>,
}

impl Default for ResourceChangeNotificationSettings {
    fn default() -> Self {
        ResourceChangeNotificationSettings {
            send_light_events: false,
            send_full_events: false,
            exclude_audit_events: false,
            polling_interval_seconds: 5,
            max_publish_batch_size: 1000,
            resource_types: Vec::new(),
            lag_warning_seconds: 30,
            enabled: None,
        }
    }
}

impl ResourceChangeNotificationSettings {
    /// Whether a change of `resource_type` is published (by `ResourceTypes` and `ExcludeAuditEvents`).
    pub fn publishes(&self, resource_type: &str) -> bool {
        if self.exclude_audit_events && resource_type == "AuditEvent" {
            return false;
        }
        self.resource_types.is_empty() || self.resource_types.iter().any(|t| t == resource_type)
    }
}

/// `PubSub.ClaimCheck`: store plans whose instructions are in a blob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields, default)]
pub struct ClaimCheckSettings {
    /// `AzureBlobStorage` or `Disabled` (Firely's), or beyond Firely `S3`, `GoogleCloudStorage` or
    /// `LocalFiles`. Default `Disabled`: claim-check commands are refused.
    pub storage_type: ClaimCheckStorage,
    /// The container the blobs are in: only blob URLs in this container are fetched. Default none:
    /// any container of the account (the blob URL in the message names it).
    #[serde(deserialize_with = "lenient::opt_string")]
    pub azure_blob_container_name: Option<String>,
    /// The storage account's connection string (`DefaultEndpointsProtocol=…;AccountName=…;AccountKey=…`,
    /// optionally `BlobEndpoint=…` or `SharedAccessSignature=…`, or `UseDevelopmentStorage=true` for
    /// the Azurite emulator on 127.0.0.1:10000). Required when `StorageType` is `AzureBlobStorage`.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub azure_blob_storage_connection_string: Option<String>,
    /// Beyond Firely, `S3` and `GoogleCloudStorage`: the bucket the blobs are in (required); only
    /// URLs of this bucket are fetched.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub bucket: Option<String>,
    /// Beyond Firely, `S3`: the bucket's region. Default from the AWS environment, else `us-east-1`.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub region: Option<String>,
    /// Beyond Firely, `S3`: the URL of an S3-compatible service (`http://minio:9000`); blob URLs are
    /// then `<Endpoint>/<Bucket>/<key>`. Default none: Amazon S3.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub endpoint: Option<String>,
    /// Beyond Firely, `S3`: the access key id. Default from the AWS environment (`AWS_ACCESS_KEY_ID`,
    /// an instance profile).
    #[serde(deserialize_with = "lenient::opt_string")]
    pub access_key_id: Option<String>,
    /// Beyond Firely, `S3`: the secret access key that goes with `AccessKeyId`.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub secret_access_key: Option<String>,
    /// Beyond Firely, `GoogleCloudStorage`: the service account key file. Default from the Google
    /// environment (`GOOGLE_APPLICATION_CREDENTIALS`, the metadata server).
    #[serde(deserialize_with = "lenient::opt_string")]
    pub service_account_path: Option<String>,
    /// Beyond Firely, `LocalFiles`: the directory the blobs are in (required); only `file://` URLs
    /// of files under it are read.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub directory: Option<String>,
}

impl Default for ClaimCheckSettings {
    fn default() -> Self {
        ClaimCheckSettings {
            storage_type: ClaimCheckStorage::Disabled,
            azure_blob_container_name: None,
            azure_blob_storage_connection_string: None,
            bucket: None,
            region: None,
            endpoint: None,
            access_key_id: None,
            secret_access_key: None,
            service_account_path: None,
            directory: None,
        }
    }
}

/// `Store`: the database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields, default)]
pub struct StoreSettings {
    /// An sqlx URL: `sqlite://PATH` (relative to the working directory; `sqlite::memory:` for a
    /// throw-away database) or `postgres://user:password@host:5432/database`. Default
    /// `sqlite://data/fhir-pubsub.db`.
    #[serde(deserialize_with = "lenient::string")]
    pub url: String,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings { url: "sqlite://data/fhir-pubsub.db".into() }
    }
}

/// The kind of database a [`StoreSettings::url`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

impl StoreSettings {
    /// The kind of database, or why the URL is not one the bridge can use.
    pub fn kind(&self) -> Result<StoreKind, String> {
        let url = self.url.trim();
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase()).unwrap_or_default();
        match scheme.as_str() {
            "sqlite" => {
                let rest = url["sqlite:".len()..].trim_start_matches("//");
                let path = rest.split('?').next().unwrap_or_default();
                if path.is_empty() {
                    Err(format!("must name a database file (sqlite://PATH), found `{}`", redact_url(url)))
                } else {
                    Ok(StoreKind::Sqlite)
                }
            }
            "postgres" | "postgresql" => match url::Url::parse(url) {
                Ok(parsed) if parsed.host_str().is_some_and(|h| !h.is_empty()) => Ok(StoreKind::Postgres),
                Ok(_) => Err(format!("must name a host (postgres://user@host/db), found `{}`", redact_url(url))),
                Err(e) => Err(format!("is not a valid URL ({e}): `{}`", redact_url(url))),
            },
            _ => Err(format!("must start with sqlite:// or postgres://, found `{}`", redact_url(url))),
        }
    }
}

/// `Http`: health, readiness, metrics and status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields, default)]
pub struct HttpSettings {
    /// The address to listen on, `IP:port` (`0.0.0.0:8080` for every interface). Default
    /// `127.0.0.1:8080`.
    #[serde(deserialize_with = "lenient::socket_addr")]
    pub listen: SocketAddr,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings { listen: SocketAddr::from(([127, 0, 0, 1], 8080)) }
    }
}

/// `Shutdown`: what happens between SIGTERM (or SIGINT) and the exit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields, default)]
pub struct ShutdownSettings {
    /// How long the commands in flight may take to finish once a stop is asked. Those still running
    /// after it are not acknowledged: the broker delivers them again, and the inbox answers a
    /// command that did commit without applying it twice. Default 30.
    #[serde(deserialize_with = "lenient::int")]
    pub timeout_seconds: u64,
    /// How long the change publisher goes on publishing what the outbox holds after the commands
    /// finished; what is left goes out after the next start. Default 15.
    #[serde(deserialize_with = "lenient::int")]
    pub publish_timeout_seconds: u64,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings { timeout_seconds: 30, publish_timeout_seconds: 15 }
    }
}

/// `Limits`: what a single message may hold; a message beyond them is refused, not processed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Largest message body in bytes. Default 16 MiB (16777216).
    #[serde(deserialize_with = "lenient::int")]
    pub max_message_bytes: usize,
    /// Largest claim-check blob in bytes: a larger blob is refused by its size before it is read,
    /// and reading stops past it. Default 64 MiB (67108864).
    #[serde(deserialize_with = "lenient::int")]
    pub max_claim_check_bytes: u64,
    /// Most instructions in one store or retrieve plan. Default 10000.
    #[serde(deserialize_with = "lenient::int")]
    pub max_instructions_per_plan: usize,
    /// Deepest nesting of JSON objects and arrays in a message, resources included. Default 128.
    #[serde(deserialize_with = "lenient::int")]
    pub max_json_depth: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            max_message_bytes: 16 * 1024 * 1024,
            max_claim_check_bytes: 64 * 1024 * 1024,
            max_instructions_per_plan: 10_000,
            max_json_depth: 128,
        }
    }
}

impl Settings {
    /// Reads the settings: defaults, then the file at `path` (`.json` or `.toml`), then every
    /// `FHIRPUBSUB_…` variable of `env`; then validates. Variables without the prefix are ignored.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Settings, ConfigError> {
        let defaults =
            serde_json::to_value(Settings::default()).map_err(|e| ConfigError::invalid("(defaults)", e.to_string()))?;
        let tree = keys::KeyTree::from_defaults(&defaults);

        let mut raw = match path {
            Some(path) => tree.canonicalize(read_file(path)?)?,
            None => Value::Object(serde_json::Map::new()),
        };
        apply_env(&tree, &mut raw, env)?;
        move_aliases(&mut raw)?;

        let mut settings: Settings = serde_path_to_error::deserialize(raw).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::invalid(if key == "." { "(top level)".to_owned() } else { key }, e.into_inner().to_string())
        })?;
        settings.fill_derived();
        settings.validate()?;
        Ok(settings)
    }

    /// [`Settings::load`] without a file: defaults and the process environment.
    pub fn from_env_only() -> Result<Settings, ConfigError> {
        Settings::load(None, std::env::vars())
    }

    fn fill_derived(&mut self) {
        let kafka = &mut self.pub_sub.message_broker.kafka;
        if kafka.execute_store_plan_command_error_topic_name.is_none() {
            kafka.execute_store_plan_command_error_topic_name = Some(kafka.error_topic_name());
        }
    }

    /// Refuses impossible values, naming the key. [`Settings::load`] calls it; call it again after
    /// changing settings in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let broker = &self.pub_sub.message_broker;
        const MB: &str = "PubSub.MessageBroker";
        non_empty(&format!("{MB}.Host"), &broker.host)?;
        if broker.port == 0 {
            return Err(ConfigError::invalid(format!("{MB}.Port"), "must be between 1 and 65535, found 0"));
        }
        at_least_one(&format!("{MB}.PrefetchCount"), broker.prefetch_count.into())?;
        at_least_one(&format!("{MB}.ConcurrencyNumber"), broker.concurrency_number.into())?;
        non_empty(&format!("{MB}.ApplicationQueueName"), &broker.application_queue_name)?;
        for (name, value) in &broker.queue_arguments {
            if value.is_null() || value.is_array() {
                return Err(ConfigError::invalid(
                    format!("{MB}.QueueArguments.{name}"),
                    format!("must be a string, number, boolean or object, found {}", kind(value)),
                ));
            }
        }
        if broker.broker_type == BrokerType::RabbitMq {
            non_empty(&format!("{MB}.VirtualHost"), &broker.virtual_host)?;
            let tls = &broker.rabbit_mq;
            let key = format!("{MB}.RabbitMQ");
            match (&tls.client_cert_file, &tls.client_key_file) {
                (Some(_), None) => {
                    return Err(ConfigError::invalid(
                        format!("{key}.ClientKeyFile"),
                        "is required with ClientCertFile",
                    ));
                }
                (None, Some(_)) => {
                    return Err(ConfigError::invalid(
                        format!("{key}.ClientCertFile"),
                        "is required with ClientKeyFile",
                    ));
                }
                _ => {}
            }
            if tls.client_certificate_path.is_some() && tls.client_cert_file.is_some() {
                return Err(ConfigError::invalid(
                    format!("{key}.ClientCertFile"),
                    "give the client identity either as ClientCertificatePath (PKCS#12) or as ClientCertFile + ClientKeyFile (PEM), not both",
                ));
            }
            if tls.client_certificate_passphrase.is_some() && tls.client_certificate_path.is_none() {
                return Err(ConfigError::invalid(
                    format!("{key}.ClientCertificatePath"),
                    "is required with ClientCertificatePassphrase",
                ));
            }
        }
        if broker.broker_type == BrokerType::Kafka {
            let kafka = &broker.kafka;
            let key = format!("{MB}.Kafka");
            non_empty(&format!("{key}.TopicPrefix"), &kafka.topic_prefix)?;
            non_empty(&format!("{key}.ClientGroupId"), &kafka.client_group_id)?;
            at_least_one(&format!("{key}.NumberOfConcurrentConsumers"), kafka.number_of_concurrent_consumers.into())?;
            if kafka.authentication_mechanism != KafkaAuthentication::None {
                for (name, value) in [("Username", &kafka.username), ("Password", &kafka.password)] {
                    if value.is_none() {
                        return Err(ConfigError::invalid(
                            format!("{key}.{name}"),
                            format!("is required with AuthenticationMechanism {}", kafka.authentication_mechanism),
                        ));
                    }
                }
            }
            if kafka.keystore_location.is_some() && kafka.keystore_password.is_none() {
                return Err(ConfigError::invalid(
                    format!("{key}.KeystorePassword"),
                    "is required with KeystoreLocation",
                ));
            }
            at_least_one(&format!("{key}.CreateTopicPartitions"), kafka.create_topic_partitions.into())?;
            // The prefix first: the default error topic is derived from it.
            let topics = [
                ("TopicPrefix", format!("{}.ExecuteStorePlanCommand", kafka.topic_prefix)),
                ("ExecuteStorePlanCommandErrorTopicName", kafka.error_topic_name()),
                ("ResourcesChangedEventTopicName", kafka.resources_changed_event_topic_name.clone()),
                ("ResourcesChangedLightEventTopicName", kafka.resources_changed_light_event_topic_name.clone()),
            ];
            for (name, topic) in topics {
                if let Err(e) = crate::envelope::KafkaAddress::parse(&format!("topic:{topic}")) {
                    return Err(ConfigError::invalid(format!("{key}.{name}"), e.to_string()));
                }
            }
        }

        if broker.broker_type == BrokerType::AzureServiceBus {
            let key = format!("{MB}.ServiceBus");
            let separator = broker.service_bus.namespace_separator.as_str();
            if !SERVICE_BUS_SEPARATORS.contains(&separator) {
                return Err(ConfigError::invalid(
                    format!("{key}.NamespaceSeparator"),
                    format!("must be one of ~, / or _, found `{separator}`"),
                ));
            }
            if let Err(problem) = ServiceBusConnectionString::parse(&broker.host) {
                return Err(ConfigError::invalid(format!("{MB}.Host"), problem));
            }
        }

        let events = &self.pub_sub.resource_change_notifications;
        const RCN: &str = "PubSub.ResourceChangeNotifications";
        at_least_one(&format!("{RCN}.PollingIntervalSeconds"), events.polling_interval_seconds)?;
        at_least_one(&format!("{RCN}.LagWarningSeconds"), events.lag_warning_seconds)?;
        if !(1..=100_000).contains(&events.max_publish_batch_size) {
            return Err(ConfigError::invalid(
                format!("{RCN}.MaxPublishBatchSize"),
                format!("must be between 1 and 100000, found {}", events.max_publish_batch_size),
            ));
        }
        for (i, name) in events.resource_types.iter().enumerate() {
            let ok = name.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                && name.chars().all(|c| c.is_ascii_alphanumeric());
            if !ok {
                return Err(ConfigError::invalid(
                    format!("{RCN}.ResourceTypes.{i}"),
                    format!("must be a FHIR resource type such as Patient, found `{name}`"),
                ));
            }
        }

        let claim = &self.pub_sub.claim_check;
        let required = match claim.storage_type {
            ClaimCheckStorage::AzureBlobStorage => {
                Some(("AzureBlobStorageConnectionString", &claim.azure_blob_storage_connection_string))
            }
            ClaimCheckStorage::S3 | ClaimCheckStorage::GoogleCloudStorage => Some(("Bucket", &claim.bucket)),
            ClaimCheckStorage::LocalFiles => Some(("Directory", &claim.directory)),
            ClaimCheckStorage::Disabled => None,
        };
        if let Some((name, value)) = required
            && value.as_deref().is_none_or(|v| v.trim().is_empty())
        {
            return Err(ConfigError::invalid(
                format!("PubSub.ClaimCheck.{name}"),
                format!("is required when StorageType is {}", claim.storage_type),
            ));
        }
        if claim.storage_type != ClaimCheckStorage::Disabled
            && let Err((key, problem)) = crate::claimcheck::ClaimChecks::check_settings(claim)
        {
            return Err(ConfigError::invalid(format!("PubSub.ClaimCheck.{key}"), problem));
        }

        self.store.kind().map_err(|problem| ConfigError::invalid("Store.Url", problem))?;

        let limits = &self.limits;
        at_least_one("Limits.MaxMessageBytes", limits.max_message_bytes as u64)?;
        at_least_one("Limits.MaxClaimCheckBytes", limits.max_claim_check_bytes)?;
        at_least_one("Limits.MaxInstructionsPerPlan", limits.max_instructions_per_plan as u64)?;
        at_least_one("Limits.MaxJsonDepth", limits.max_json_depth as u64)?;
        at_least_one("Shutdown.TimeoutSeconds", self.shutdown.timeout_seconds)?;
        Ok(())
    }

    /// The effective settings as JSON in canonical key case, with every secret as `***`: passwords,
    /// passphrases, connection strings, and passwords inside URLs (`Store.Url`, a Service Bus `Host`).
    pub fn redacted(&self) -> Value {
        let mut value = serde_json::to_value(self).unwrap_or(Value::Null);
        redact_tree(&mut value, "");
        value
    }

    /// Every secret value of these settings (passwords, passphrases, the password of `Store.Url`,
    /// connection strings and their keys), in the forms it may be printed in: as written and
    /// percent-decoded. What the log writer and the HTTP endpoints hide wherever it appears.
    pub fn secrets(&self) -> Vec<String> {
        let broker = &self.pub_sub.message_broker;
        let mut found: Vec<String> = vec![broker.password.clone()];
        found.extend(broker.rabbit_mq.client_certificate_passphrase.clone());
        found.extend(broker.kafka.password.clone());
        found.extend(broker.kafka.keystore_password.clone());
        found.extend(self.pub_sub.claim_check.azure_blob_storage_connection_string.clone());
        found.extend(self.pub_sub.claim_check.secret_access_key.clone());
        let mut connection_strings = vec![self.store.url.clone()];
        connection_strings.extend(self.pub_sub.claim_check.azure_blob_storage_connection_string.clone());
        if broker.broker_type == BrokerType::AzureServiceBus {
            connection_strings.push(broker.host.clone());
            found.push(broker.host.clone());
        }
        for text in &connection_strings {
            found.extend(redact::secrets_in(text));
        }
        let mut all: Vec<String> = Vec::new();
        for secret in found {
            let decoded = percent_encoding::percent_decode_str(&secret).decode_utf8_lossy().into_owned();
            for form in [secret, decoded] {
                if !form.trim().is_empty() && !all.contains(&form) {
                    all.push(form);
                }
            }
        }
        all
    }

    /// The keys this configuration sets that the bridge accepts but does not act on, with the
    /// reason, for a warning at start: the keys of [`ACCEPTED_BUT_UNUSED`], and the RabbitMQ TLS
    /// keys when TLS is off ([`TLS_OFF`]).
    pub fn accepted_but_unused(&self) -> Vec<(&'static str, &'static str)> {
        let mut unused: Vec<(&'static str, &'static str)> = ACCEPTED_BUT_UNUSED
            .iter()
            .copied()
            .filter(|(key, _)| match *key {
                "PubSub.ResourceChangeNotifications.Enabled" => {
                    self.pub_sub.resource_change_notifications.enabled.is_some()
                }
                _ => false,
            })
            .collect();
        let broker = &self.pub_sub.message_broker;
        if broker.broker_type == BrokerType::RabbitMq && !broker.rabbitmq_tls() {
            let tls = &broker.rabbit_mq;
            let set = [
                ("PubSub.MessageBroker.RabbitMQ.CaFile", tls.ca_file.is_some()),
                ("PubSub.MessageBroker.RabbitMQ.ClientCertificatePath", tls.client_certificate_path.is_some()),
                ("PubSub.MessageBroker.RabbitMQ.ClientCertFile", tls.client_cert_file.is_some()),
                ("PubSub.MessageBroker.RabbitMQ.ServerName", tls.server_name.is_some()),
            ];
            unused.extend(set.into_iter().filter(|(_, is_set)| *is_set).map(|(key, _)| (key, TLS_OFF)));
        }
        unused
    }
}

fn non_empty(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() { Err(ConfigError::invalid(key, "must not be empty")) } else { Ok(()) }
}

fn at_least_one(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 { Err(ConfigError::invalid(key, "must be at least 1, found 0")) } else { Ok(()) }
}

/// A word for the JSON type of a value, for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn read_file(path: &Path) -> Result<Value, ConfigError> {
    let extension = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let format = match extension.as_deref() {
        Some("json") => "JSON",
        Some("toml") => "TOML",
        _ => return Err(ConfigError::UnsupportedFormat { path: path.to_owned() }),
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    let syntax = |message: String| ConfigError::Syntax { path: path.to_owned(), format, message };
    if format == "JSON" {
        let strict = crate::json::strict_text(&text).map_err(|e| syntax(e.to_string()))?;
        serde_json::from_str(&strict).map_err(|e| syntax(e.to_string()))
    } else {
        let table: toml::Table = toml::from_str(&text).map_err(|e| syntax(e.to_string()))?;
        serde_json::to_value(table).map_err(|e| syntax(e.to_string()))
    }
}

fn apply_env(
    tree: &keys::KeyTree,
    raw: &mut Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| name.get(..ENV_PREFIX.len()).is_some_and(|p| p.eq_ignore_ascii_case(ENV_PREFIX)))
        .filter(|(name, _)| !COMMAND_ENV.iter().any(|c| c.eq_ignore_ascii_case(name)))
        .collect();
    // Deterministic whatever the environment's order.
    vars.sort();
    for (name, text) in vars {
        let segments: Vec<&str> = name[ENV_PREFIX.len()..].split("__").collect();
        let (path, free_form) = tree.resolve(&segments).ok_or_else(|| ConfigError::UnknownEnv { var: name.clone() })?;
        // Free-form map entries (queue arguments) are JSON when they parse as JSON, so that
        // `x-message-ttl=60000` is a number; settings get the text and convert it to their type.
        let value =
            if free_form { serde_json::from_str(&text).unwrap_or(Value::String(text)) } else { Value::String(text) };
        keys::set(raw, &path, value);
    }
    Ok(())
}

fn move_aliases(raw: &mut Value) -> Result<(), ConfigError> {
    for (alias, ours) in keys::ALIASES {
        let Some(value) = keys::take(raw, alias) else { continue };
        match keys::get(raw, ours) {
            Some(existing) if !same_setting(existing, &value) => {
                return Err(ConfigError::invalid(
                    *alias,
                    format!("is {value} but {ours} is {existing}; give the setting once"),
                ));
            }
            Some(_) => {}
            None => {
                let path: Vec<String> = ours.split('.').map(str::to_owned).collect();
                keys::set(raw, &path, value);
            }
        }
    }
    Ok(())
}

/// Whether two raw values mean the same setting (`5671` and `"5671"` do).
fn same_setting(a: &Value, b: &Value) -> bool {
    let text = |v: &Value| match v {
        Value::String(s) => s.trim().to_owned(),
        other => other.to_string(),
    };
    text(a) == text(b)
}

fn redact_tree(value: &mut Value, key: &str) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                redact_tree(v, k);
            }
        }
        Value::String(text) => {
            let lower = key.to_ascii_lowercase();
            if lower.contains("password")
                || lower.contains("passphrase")
                || lower.contains("connectionstring")
                || lower.contains("secret")
            {
                *text = HIDDEN.to_owned();
            } else if lower == "host" || lower == "url" {
                *text = redact_url(text);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_json(text: &str) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        std::fs::write(&path, text).unwrap();
        Settings::load(Some(&path), Vec::new())
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let s = Settings::load(None, Vec::new()).unwrap();
        assert_eq!(s.pub_sub.message_broker.port, 5672);
        assert_eq!(s.pub_sub.message_broker.prefetch_count, 256);
        assert_eq!(
            s.pub_sub.message_broker.kafka.error_topic_name(),
            "FirelyServerCommands.ExecuteStorePlanCommand.Errors"
        );
        assert_eq!(s.store.kind(), Ok(StoreKind::Sqlite));
    }

    #[test]
    fn firely_rabbitmq_port_is_moved_and_conflicts_are_refused() {
        let s = load_json(r#"{"PubSub": {"MessageBroker": {"RabbitMQ": {"Port": 5671}}}}"#).unwrap();
        assert_eq!(s.pub_sub.message_broker.port, 5671);
        assert!(s.pub_sub.message_broker.rabbitmq_tls());
        let err =
            load_json(r#"{"PubSub": {"MessageBroker": {"Port": 5672, "rabbitmq": {"port": "5671"}}}}"#).unwrap_err();
        assert_eq!(err.key(), Some("PubSub.MessageBroker.RabbitMQ.Port"), "{err}");
        load_json(r#"{"PubSub": {"MessageBroker": {"Port": 5671, "rabbitmq": {"port": "5671"}}}}"#).unwrap();
    }

    #[test]
    fn numbers_out_of_range_name_the_key() {
        let err = load_json(r#"{"PubSub": {"MessageBroker": {"Port": 70000}}}"#).unwrap_err();
        assert_eq!(err.key(), Some("PubSub.MessageBroker.Port"));
        assert!(err.to_string().contains("70000"), "{err}");
        let err = load_json(r#"{"PubSub": {"MessageBroker": {"Port": -1}}}"#).unwrap_err();
        assert_eq!(err.key(), Some("PubSub.MessageBroker.Port"));
    }

    #[test]
    fn store_kinds() {
        let kind = |url: &str| StoreSettings { url: url.into() }.kind();
        assert_eq!(kind("postgres://u:p@localhost/db"), Ok(StoreKind::Postgres));
        assert_eq!(kind("postgresql://localhost:5432/db"), Ok(StoreKind::Postgres));
        assert_eq!(kind("sqlite::memory:"), Ok(StoreKind::Sqlite));
        assert!(kind("sqlite://").is_err());
        assert!(kind("mysql://localhost/db").is_err());
        assert!(kind("postgres://:::").is_err());
        let err = kind("redis://u:secret@h").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
    }
}
