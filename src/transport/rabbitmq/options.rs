//! Connection settings of the RabbitMQ transport, built by the caller from the configuration.
//!
//! Invariant: the password (and a PKCS#12 password) never appears in `Debug` output or logs.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::contracts::MessageType;

/// Port on which RabbitMQ speaks AMQP over TLS; choosing it turns TLS on.
pub const TLS_PORT: u16 = 5671;
/// Plain AMQP port.
pub const PLAIN_PORT: u16 = 5672;

/// How to reach RabbitMQ and which endpoint to consume.
#[derive(Clone)]
pub struct RabbitMqOptions {
    /// Broker host name or address.
    pub host: String,
    /// Broker port (5672; 5671 turns TLS on).
    pub port: u16,
    pub username: String,
    pub password: String,
    /// Virtual host (`/` by default).
    pub vhost: String,
    /// The receive endpoint `Q` (Firely's `ApplicationQueueName`, default `FirelyServer`).
    pub queue_name: String,
    /// How many unacknowledged deliveries the broker may hand out at once (at least 1).
    pub prefetch_count: u16,
    /// Extra arguments of queue `Q` (`x-message-ttl`, `x-queue-type`, …). They must equal those of
    /// an existing queue exactly, or the broker refuses the declare.
    pub queue_arguments: serde_json::Map<String, serde_json::Value>,
    /// TLS settings; TLS is used when `tls.enabled` or the port is 5671.
    pub tls: TlsOptions,
    /// Event types whose exchanges are declared at start.
    pub event_types: Vec<MessageType>,
    /// How long `retry_later` waits before giving a message back, so a dead store does not spin.
    pub retry_delay: Duration,
    /// How long a send or publish waits for a lost connection to come back before failing with
    /// [`TransportError::Unavailable`](crate::transport::TransportError::Unavailable).
    pub reconnect_wait: Duration,
    /// How long to wait for a publisher confirm.
    pub confirm_timeout: Duration,
    /// Number of confirm-mode channels used for concurrent sends.
    pub publish_channels: usize,
}

impl Default for RabbitMqOptions {
    fn default() -> Self {
        RabbitMqOptions {
            host: "localhost".to_owned(),
            port: PLAIN_PORT,
            username: "guest".to_owned(),
            password: "guest".to_owned(),
            vhost: "/".to_owned(),
            queue_name: "FirelyServer".to_owned(),
            prefetch_count: 1,
            queue_arguments: serde_json::Map::new(),
            tls: TlsOptions::default(),
            event_types: vec![MessageType::ResourcesChangedEvent, MessageType::ResourcesChangedLightEvent],
            retry_delay: Duration::from_secs(1),
            reconnect_wait: Duration::from_secs(5),
            confirm_timeout: Duration::from_secs(30),
            publish_channels: 4,
        }
    }
}

impl RabbitMqOptions {
    /// Whether the connection uses TLS (explicitly, or because the port is 5671).
    pub fn use_tls(&self) -> bool {
        self.tls.enabled || self.port == TLS_PORT
    }

    /// The name the server's certificate is checked against: `tls.server_name`, else `host`.
    pub fn tls_server_name(&self) -> &str {
        self.tls.server_name.as_deref().map(str::trim).filter(|name| !name.is_empty()).unwrap_or(&self.host)
    }
}

impl fmt::Debug for RabbitMqOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("vhost", &self.vhost)
            .field("queue_name", &self.queue_name)
            .field("prefetch_count", &self.prefetch_count)
            .field("queue_arguments", &self.queue_arguments)
            .field("tls", &self.tls)
            .field("event_types", &self.event_types)
            .field("retry_delay", &self.retry_delay)
            .field("reconnect_wait", &self.reconnect_wait)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("publish_channels", &self.publish_channels)
            .finish()
    }
}

/// TLS settings.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Use TLS even on a port other than 5671.
    pub enabled: bool,
    /// A PEM file with the CA certificate(s) to trust, in addition to the platform's.
    pub ca_file: Option<PathBuf>,
    /// The client certificate, when the broker asks for one.
    pub client_identity: Option<ClientIdentity>,
    /// The name the server's certificate must carry, and the SNI sent; `host` when `None`. Lets the
    /// bridge reach the broker by an address its certificate does not name (an IP, a tunnel).
    pub server_name: Option<String>,
}

/// A client certificate for TLS client authentication.
#[derive(Clone)]
#[non_exhaustive]
pub enum ClientIdentity {
    /// A PKCS#12 (`.pfx`/`.p12`) file and its password.
    Pkcs12 { path: PathBuf, password: String },
    /// A PEM certificate and a PEM (PKCS#8) private key.
    Pem { cert_path: PathBuf, key_path: PathBuf },
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientIdentity::Pkcs12 { path, .. } => {
                f.debug_struct("Pkcs12").field("path", path).field("password", &"<redacted>").finish()
            }
            ClientIdentity::Pem { cert_path, key_path } => {
                f.debug_struct("Pem").field("cert_path", cert_path).field("key_path", key_path).finish()
            }
        }
    }
}

impl RabbitMqOptions {
    /// The options for Firely's `PubSub.MessageBroker` settings.
    pub fn from_settings(broker: &crate::config::MessageBrokerSettings) -> Self {
        let rabbit = &broker.rabbit_mq;
        let client_identity = match (&rabbit.client_certificate_path, &rabbit.client_cert_file, &rabbit.client_key_file)
        {
            (Some(p12), _, _) => Some(ClientIdentity::Pkcs12 {
                path: PathBuf::from(p12),
                password: rabbit.client_certificate_passphrase.clone().unwrap_or_default(),
            }),
            (None, Some(cert), Some(key)) => {
                Some(ClientIdentity::Pem { cert_path: PathBuf::from(cert), key_path: PathBuf::from(key) })
            }
            _ => None,
        };
        RabbitMqOptions {
            host: broker.host.clone(),
            port: broker.port,
            username: broker.username.clone(),
            password: broker.password.clone(),
            vhost: broker.virtual_host.clone(),
            queue_name: broker.application_queue_name.clone(),
            prefetch_count: broker.prefetch_count,
            queue_arguments: broker.queue_arguments.clone(),
            tls: TlsOptions {
                enabled: broker.rabbitmq_tls(),
                ca_file: rabbit.ca_file.as_ref().map(PathBuf::from),
                client_identity,
                server_name: rabbit.server_name.clone(),
            },
            ..RabbitMqOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_passwords() {
        let options = RabbitMqOptions {
            password: "s3cret-pw".to_owned(),
            tls: TlsOptions {
                enabled: true,
                ca_file: None,
                client_identity: Some(ClientIdentity::Pkcs12 { path: "c.pfx".into(), password: "pfx-pw".to_owned() }),
                server_name: None,
            },
            ..RabbitMqOptions::default()
        };
        let text = format!("{options:?}");
        assert!(!text.contains("s3cret-pw"), "{text}");
        assert!(!text.contains("pfx-pw"), "{text}");
        assert!(text.contains("c.pfx"));
    }

    #[test]
    fn port_5671_turns_tls_on() {
        assert!(RabbitMqOptions { port: 5671, ..RabbitMqOptions::default() }.use_tls());
        assert!(!RabbitMqOptions::default().use_tls());
    }

    #[test]
    fn server_name_defaults_to_the_host() {
        let mut options = RabbitMqOptions { host: "10.0.0.7".into(), ..RabbitMqOptions::default() };
        assert_eq!(options.tls_server_name(), "10.0.0.7");
        options.tls.server_name = Some(" ".into());
        assert_eq!(options.tls_server_name(), "10.0.0.7");
        options.tls.server_name = Some("rabbit.example.org".into());
        assert_eq!(options.tls_server_name(), "rabbit.example.org");
    }
}
