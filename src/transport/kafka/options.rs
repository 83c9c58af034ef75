//! Settings of the Kafka transport, and the librdkafka configuration built from them.
//!
//! Invariants: passwords never appear in `Debug` output or logs (librdkafka's own configuration is
//! never printed); every client (consumers, producer, admin) gets the same connection and security
//! properties from [`KafkaOptions::client_config`], so a setting that works for one works for all.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::ClientConfig;

use crate::config::{KafkaAuthentication, MessageBrokerSettings};
use crate::contracts::MessageType;

/// How the clients authenticate with SASL.
#[derive(Clone, PartialEq, Eq)]
pub enum Sasl {
    /// SASL PLAIN (send it over TLS: the password travels as is).
    Plain { username: String, password: String },
    /// SASL SCRAM-SHA-256.
    ScramSha256 { username: String, password: String },
    /// SASL SCRAM-SHA-512.
    ScramSha512 { username: String, password: String },
}

impl Sasl {
    fn mechanism(&self) -> &'static str {
        match self {
            Sasl::Plain { .. } => "PLAIN",
            Sasl::ScramSha256 { .. } => "SCRAM-SHA-256",
            Sasl::ScramSha512 { .. } => "SCRAM-SHA-512",
        }
    }

    fn credentials(&self) -> (&str, &str) {
        match self {
            Sasl::Plain { username, password }
            | Sasl::ScramSha256 { username, password }
            | Sasl::ScramSha512 { username, password } => (username, password),
        }
    }
}

impl fmt::Debug for Sasl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sasl").field("mechanism", &self.mechanism()).field("username", &self.credentials().0).finish()
    }
}

/// TLS to the brokers.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaTls {
    /// PEM file of the CAs trusted for the brokers; the system's CAs when absent.
    pub ca_location: Option<PathBuf>,
    /// PKCS#12 keystore with the client certificate and key (mutual TLS), and its password.
    pub keystore: Option<(PathBuf, String)>,
}

impl fmt::Debug for KafkaTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaTls")
            .field("ca_location", &self.ca_location)
            .field("keystore", &self.keystore.as_ref().map(|(path, _)| path))
            .finish()
    }
}

/// What the Kafka transport connects to, consumes and produces to.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    /// Command topics are `<prefix>.ExecuteStorePlanCommand` and `<prefix>.RetrievePlanCommand`.
    pub topic_prefix: String,
    pub group_id: String,
    pub client_id: String,
    /// Consumers in this process, each a member of the group.
    pub consumers: usize,
    /// Deliveries handed to the bridge and not yet finished, at most (the bridge's channel).
    pub prefetch: usize,
    /// Where records that cannot be handled go.
    pub error_topic: String,
    pub full_event_topic: String,
    pub light_event_topic: String,
    /// Whether `ResourcesChangedEvent`s are published (their topic must exist at start).
    pub full_events: bool,
    /// Whether `ResourcesChangedLightEvent`s are published.
    pub light_events: bool,
    /// Create missing topics at start, with this many partitions.
    pub create_topics: Option<u32>,
    pub sasl: Option<Sasl>,
    /// TLS; `None` for plain TCP.
    pub tls: Option<KafkaTls>,
    /// How long a produced record may wait for the brokers' acknowledgement before the send fails
    /// (and the command is handled again later).
    pub delivery_timeout: Duration,
    /// Pause before a delivery given back with `retry_later` is handed to the bridge again.
    pub retry_delay: Duration,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        KafkaOptions {
            bootstrap_servers: "127.0.0.1:9092".into(),
            topic_prefix: "FirelyServerCommands".into(),
            group_id: "FirelyServer".into(),
            client_id: "FirelyServer".into(),
            consumers: 1,
            prefetch: 64,
            error_topic: "FirelyServerCommands.ExecuteStorePlanCommand.Errors".into(),
            full_event_topic: format!("{}.ResourcesChangedEvent", crate::contracts::NAMESPACE),
            light_event_topic: format!("{}.ResourcesChangedLightEvent", crate::contracts::NAMESPACE),
            full_events: false,
            light_events: false,
            create_topics: None,
            sasl: None,
            tls: None,
            delivery_timeout: Duration::from_secs(30),
            retry_delay: Duration::from_secs(1),
        }
    }
}

impl KafkaOptions {
    /// The options for Firely's `PubSub.MessageBroker` settings (`Host` holds the bootstrap servers)
    /// and which change events are published.
    pub fn from_settings(broker: &MessageBrokerSettings, full_events: bool, light_events: bool) -> Self {
        let kafka = &broker.kafka;
        let credentials = || (kafka.username.clone().unwrap_or_default(), kafka.password.clone().unwrap_or_default());
        let sasl = match kafka.authentication_mechanism {
            KafkaAuthentication::SaslPlain => {
                let (username, password) = credentials();
                Some(Sasl::Plain { username, password })
            }
            KafkaAuthentication::SaslScram256 => {
                let (username, password) = credentials();
                Some(Sasl::ScramSha256 { username, password })
            }
            KafkaAuthentication::SaslScram512 => {
                let (username, password) = credentials();
                Some(Sasl::ScramSha512 { username, password })
            }
            _ => None,
        };
        let keystore = kafka
            .keystore_location
            .as_ref()
            .map(|path| (PathBuf::from(path), kafka.keystore_password.clone().unwrap_or_default()));
        let tls = (kafka.ca_location.is_some() || keystore.is_some())
            .then(|| KafkaTls { ca_location: kafka.ca_location.as_ref().map(PathBuf::from), keystore });
        KafkaOptions {
            bootstrap_servers: broker.host.clone(),
            topic_prefix: kafka.topic_prefix.clone(),
            group_id: kafka.client_group_id.clone(),
            client_id: kafka.client_id.clone(),
            consumers: kafka.number_of_concurrent_consumers.max(1) as usize,
            prefetch: usize::from(broker.prefetch_count.max(1)),
            error_topic: kafka.error_topic_name(),
            full_event_topic: kafka.resources_changed_event_topic_name.clone(),
            light_event_topic: kafka.resources_changed_light_event_topic_name.clone(),
            full_events,
            light_events,
            create_topics: kafka.create_topics.then_some(kafka.create_topic_partitions.max(1)),
            sasl,
            tls,
            ..KafkaOptions::default()
        }
    }

    /// The topic commands of `message_type` are consumed from.
    pub fn command_topic(&self, message_type: MessageType) -> String {
        format!("{}.{}", self.topic_prefix, message_type.as_str())
    }

    /// The topic events of `message_type` are published to, if it is an event type.
    pub fn event_topic(&self, message_type: MessageType) -> Option<&str> {
        match message_type {
            MessageType::ResourcesChangedEvent => Some(&self.full_event_topic),
            MessageType::ResourcesChangedLightEvent => Some(&self.light_event_topic),
            _ => None,
        }
    }

    /// The topics the bridge needs at start: the two command topics, the error topic and the
    /// topics of the events it publishes.
    pub fn required_topics(&self) -> Vec<String> {
        let mut topics = vec![
            self.command_topic(MessageType::ExecuteStorePlanCommand),
            self.command_topic(MessageType::RetrievePlanCommand),
            self.error_topic.clone(),
        ];
        if self.full_events {
            topics.push(self.full_event_topic.clone());
        }
        if self.light_events {
            topics.push(self.light_event_topic.clone());
        }
        topics
    }

    /// Connection and security properties shared by every client.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers).set("client.id", &self.client_id);
        let protocol = match (&self.sasl, &self.tls) {
            (None, None) => "plaintext",
            (None, Some(_)) => "ssl",
            (Some(_), None) => "sasl_plaintext",
            (Some(_), Some(_)) => "sasl_ssl",
        };
        config.set("security.protocol", protocol);
        if let Some(sasl) = &self.sasl {
            let (username, password) = sasl.credentials();
            config
                .set("sasl.mechanisms", sasl.mechanism())
                .set("sasl.username", username)
                .set("sasl.password", password);
        }
        if let Some(tls) = &self.tls {
            if let Some(ca) = &tls.ca_location {
                config.set("ssl.ca.location", ca.display().to_string());
            }
            if let Some((path, password)) = &tls.keystore {
                config.set("ssl.keystore.location", path.display().to_string()).set("ssl.keystore.password", password);
            }
        }
        config
    }

    /// The producer's configuration: idempotent, `acks=all`, bounded delivery time.
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = self.client_config();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", self.delivery_timeout.as_millis().to_string())
            .set("linger.ms", "2");
        config
    }

    /// A consumer's configuration: offsets stored by the transport only once a command's effect is
    /// durable, and committed from there in the background.
    pub fn consumer_config(&self) -> ClientConfig {
        let mut config = self.client_config();
        config
            .set("group.id", &self.group_id)
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn options_for(kafka_json: &str) -> KafkaOptions {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let text = format!(
            r#"{{"PubSub": {{"MessageBroker": {{"BrokerType": "Kafka", "Host": "k1:9093,k2:9093", "Kafka": {kafka_json}}}}}}}"#
        );
        std::fs::write(&path, text).unwrap();
        let settings = Settings::load(Some(&path), std::iter::empty()).unwrap();
        KafkaOptions::from_settings(&settings.pub_sub.message_broker, false, false)
    }

    fn get<'a>(config: &'a ClientConfig, key: &str) -> Option<&'a str> {
        config.get(key)
    }

    #[test]
    fn no_authentication_is_plaintext() {
        let config = options_for("{}").client_config();
        assert_eq!(get(&config, "bootstrap.servers"), Some("k1:9093,k2:9093"));
        assert_eq!(get(&config, "security.protocol"), Some("plaintext"));
        assert_eq!(get(&config, "sasl.mechanisms"), None);
    }

    #[test]
    fn sasl_mechanisms_map_to_librdkafka_names() {
        for (setting, mechanism) in
            [("SaslPlain", "PLAIN"), ("SaslScram256", "SCRAM-SHA-256"), ("SaslScram512", "SCRAM-SHA-512")]
        {
            let options = options_for(&format!(
                r#"{{"AuthenticationMechanism": "{setting}", "Username": "bridge", "Password": "pw-1"}}"#
            ));
            let config = options.client_config();
            assert_eq!(get(&config, "security.protocol"), Some("sasl_plaintext"), "{setting}");
            assert_eq!(get(&config, "sasl.mechanisms"), Some(mechanism), "{setting}");
            assert_eq!(get(&config, "sasl.username"), Some("bridge"));
            assert_eq!(get(&config, "sasl.password"), Some("pw-1"));
            assert!(!format!("{options:?}").contains("pw-1"), "Debug shows no password");
        }
    }

    #[test]
    fn ca_location_turns_tls_on_and_a_keystore_gives_mutual_tls() {
        let config = options_for(r#"{"CaLocation": "/etc/ca.pem"}"#).client_config();
        assert_eq!(get(&config, "security.protocol"), Some("ssl"));
        assert_eq!(get(&config, "ssl.ca.location"), Some("/etc/ca.pem"));
        assert_eq!(get(&config, "ssl.keystore.location"), None);

        let options = options_for(
            r#"{"AuthenticationMechanism": "SaslScram512", "Username": "u", "Password": "p",
                "CaLocation": "/etc/ca.pem", "KeystoreLocation": "/etc/me.p12", "KeystorePassword": "ks-secret"}"#,
        );
        let config = options.client_config();
        assert_eq!(get(&config, "security.protocol"), Some("sasl_ssl"));
        assert_eq!(get(&config, "ssl.keystore.location"), Some("/etc/me.p12"));
        assert_eq!(get(&config, "ssl.keystore.password"), Some("ks-secret"));
        assert!(!format!("{options:?}").contains("ks-secret"));

        let config = options_for(r#"{"KeystoreLocation": "/etc/me.p12", "KeystorePassword": "x"}"#).client_config();
        assert_eq!(get(&config, "security.protocol"), Some("ssl"), "a keystore alone turns TLS on too");
        assert_eq!(get(&config, "ssl.ca.location"), None, "the system's CAs");
    }

    #[test]
    fn consumers_store_offsets_themselves_and_the_producer_is_idempotent() {
        let options = options_for(r#"{"ClientGroupId": "g1", "NumberOfConcurrentConsumers": 3}"#);
        assert_eq!(options.consumers, 3);
        let consumer = options.consumer_config();
        assert_eq!(get(&consumer, "group.id"), Some("g1"));
        assert_eq!(get(&consumer, "enable.auto.offset.store"), Some("false"));
        let producer = options.producer_config();
        assert_eq!(get(&producer, "enable.idempotence"), Some("true"));
        assert_eq!(get(&producer, "acks"), Some("all"));
    }

    #[test]
    fn topics_follow_the_prefix_and_the_event_settings() {
        let options = options_for(
            r#"{"TopicPrefix": "Cmds", "ResourcesChangedEventTopicName": "full", "ResourcesChangedLightEventTopicName": "light"}"#,
        );
        assert_eq!(options.command_topic(MessageType::ExecuteStorePlanCommand), "Cmds.ExecuteStorePlanCommand");
        assert_eq!(options.error_topic, "Cmds.ExecuteStorePlanCommand.Errors");
        assert_eq!(options.event_topic(MessageType::ResourcesChangedLightEvent), Some("light"));
        assert_eq!(options.required_topics().len(), 3, "event topics are required only with events on");
        let with_events = KafkaOptions { light_events: true, ..options };
        assert!(with_events.required_topics().contains(&"light".to_owned()));
        assert!(!with_events.required_topics().contains(&"full".to_owned()));
    }
}
