//! Settings of the Service Bus transport and the entity names derived from them (wire spec §4).
//!
//! Invariants: the connection string (it holds the shared access key) never appears in `Debug`
//! output or logs; entity names are derived in one place, [`ServiceBusOptions`], so the start-up
//! check, the receiver, the senders and the error messages always agree.

use std::fmt;
use std::time::Duration;

use crate::config::{MessageBrokerSettings, ServiceBusConnectionString};
use crate::contracts::{MessageType, NAMESPACE};

/// The commands the bridge consumes; each has a topic with a subscription forwarding to the queue.
pub const CONSUMED: [MessageType; 2] = [MessageType::ExecuteStorePlanCommand, MessageType::RetrievePlanCommand];

/// What the Service Bus transport connects to, consumes and sends to.
#[derive(Clone)]
pub struct ServiceBusOptions {
    /// The connection string as the user wrote it (secret).
    pub connection_string: String,
    /// Its parsed parts.
    pub connection: ServiceBusConnectionString,
    /// `ApplicationQueueName` as written: the name of each command topic's subscription.
    pub application_queue_name: String,
    /// `~`, `/` or `_` between the message namespace and the type name in topic names.
    pub namespace_separator: String,
    /// Messages the broker may lock for the bridge ahead of handling (`PrefetchCount`).
    pub prefetch: u32,
    /// Copy failed and skipped messages to `<queue>_error` / `<queue>_skipped` instead of
    /// dead-lettering them.
    pub use_error_queues: bool,
    /// Whether `ResourcesChangedEvent`s are published (their topic must exist at start).
    pub full_events: bool,
    /// Whether `ResourcesChangedLightEvent`s are published.
    pub light_events: bool,
    /// How long a message given back with `retry_later` stays locked before it is abandoned (and so
    /// delivered again, its delivery count one higher).
    pub retry_delay: Duration,
}

impl fmt::Debug for ServiceBusOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceBusOptions")
            .field("connection", &self.connection)
            .field("queue", &self.queue())
            .field("namespace_separator", &self.namespace_separator)
            .field("prefetch", &self.prefetch)
            .field("use_error_queues", &self.use_error_queues)
            .field("full_events", &self.full_events)
            .field("light_events", &self.light_events)
            .field("retry_delay", &self.retry_delay)
            .finish()
    }
}

impl ServiceBusOptions {
    /// The options for Firely's `PubSub.MessageBroker` settings (`Host` holds the connection
    /// string) and which change events are published.
    pub fn from_settings(
        broker: &MessageBrokerSettings,
        full_events: bool,
        light_events: bool,
    ) -> Result<Self, String> {
        let connection = ServiceBusConnectionString::parse(&broker.host)
            .map_err(|problem| format!("PubSub.MessageBroker.Host {problem}"))?;
        let service_bus = &broker.service_bus;
        Ok(ServiceBusOptions {
            connection_string: broker.host.clone(),
            connection,
            application_queue_name: broker.application_queue_name.clone(),
            namespace_separator: service_bus.namespace_separator.clone(),
            prefetch: u32::from(broker.prefetch_count.max(1)),
            use_error_queues: service_bus.use_error_queues,
            full_events,
            light_events,
            retry_delay: Duration::from_secs(service_bus.retry_delay_seconds),
        })
    }

    /// Whether the connection is plain AMQP (port 5672, no TLS): only for a connection string that
    /// says `UseDevelopmentEmulator=true`, Microsoft's convention for its emulator.
    pub fn plain_amqp(&self) -> bool {
        self.connection.use_development_emulator
    }

    /// The queue the bridge consumes: `ApplicationQueueName` lower-cased, as MassTransit and Service
    /// Bus name it (`FirelyServer` → `firelyserver`).
    pub fn queue(&self) -> String {
        self.application_queue_name.to_lowercase()
    }

    /// The topic of a message type: `Firely.Server.Contracts.Messages.V1~ExecuteStorePlanCommand`
    /// with the configured separator.
    pub fn topic(&self, message_type: MessageType) -> String {
        format!("{NAMESPACE}{}{}", self.namespace_separator, message_type.as_str())
    }

    /// The subscription on each command topic that forwards to [`ServiceBusOptions::queue`].
    pub fn subscription(&self) -> &str {
        &self.application_queue_name
    }

    /// `<queue>_error`, used when [`ServiceBusOptions::use_error_queues`] is set.
    pub fn error_queue(&self) -> String {
        format!("{}_error", self.queue())
    }

    /// `<queue>_skipped`, used when [`ServiceBusOptions::use_error_queues`] is set.
    pub fn skipped_queue(&self) -> String {
        format!("{}_skipped", self.queue())
    }

    /// The event topics the bridge publishes to (those of the enabled events).
    pub fn event_topics(&self) -> Vec<String> {
        let mut topics = Vec::new();
        if self.full_events {
            topics.push(self.topic(MessageType::ResourcesChangedEvent));
        }
        if self.light_events {
            topics.push(self.topic(MessageType::ResourcesChangedLightEvent));
        }
        topics
    }

    /// The command topic a message type arrives on, if it is one the bridge consumes.
    pub fn command_topics(&self) -> Vec<String> {
        CONSUMED.iter().map(|t| self.topic(*t)).collect()
    }

    /// The bridge's input address, written as `sourceAddress`: `sb://<namespace>/<queue>`.
    pub fn input_address(&self) -> String {
        format!("sb://{}/{}", self.connection.namespace, self.queue())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BrokerType, Settings};

    fn settings(separator: &str, queue: &str) -> MessageBrokerSettings {
        let mut settings = Settings::default();
        let broker = &mut settings.pub_sub.message_broker;
        broker.broker_type = BrokerType::AzureServiceBus;
        broker.host =
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey=c2VjcmV0".into();
        broker.application_queue_name = queue.into();
        broker.service_bus.namespace_separator = separator.into();
        settings.validate().unwrap();
        settings.pub_sub.message_broker
    }

    #[test]
    fn names_follow_firely_and_masstransit() {
        let options = ServiceBusOptions::from_settings(&settings("~", "FirelyServer"), true, false).unwrap();
        assert_eq!(options.queue(), "firelyserver", "the queue is lower-cased as Service Bus shows it");
        assert_eq!(options.subscription(), "FirelyServer");
        assert_eq!(
            options.command_topics(),
            [
                "Firely.Server.Contracts.Messages.V1~ExecuteStorePlanCommand",
                "Firely.Server.Contracts.Messages.V1~RetrievePlanCommand"
            ]
        );
        assert_eq!(options.event_topics(), ["Firely.Server.Contracts.Messages.V1~ResourcesChangedEvent"]);
        assert_eq!(
            (options.error_queue().as_str(), options.skipped_queue().as_str()),
            ("firelyserver_error", "firelyserver_skipped")
        );
        assert_eq!(options.input_address(), "sb://ns.servicebus.windows.net/firelyserver");
        assert!(!options.plain_amqp(), "TLS unless the connection string names the emulator");
    }

    #[test]
    fn the_separator_setting_changes_every_topic() {
        for (separator, expected) in [
            ("/", "Firely.Server.Contracts.Messages.V1/RetrievePlanCommand"),
            ("_", "Firely.Server.Contracts.Messages.V1_RetrievePlanCommand"),
        ] {
            let options = ServiceBusOptions::from_settings(&settings(separator, "Q"), true, true).unwrap();
            assert_eq!(options.topic(MessageType::RetrievePlanCommand), expected);
            assert!(options.event_topics().iter().all(|t| t.contains(&format!("V1{separator}ResourcesChanged"))));
        }
        let mut wrong = Settings::default();
        wrong.pub_sub.message_broker = settings("~", "Q");
        wrong.pub_sub.message_broker.service_bus.namespace_separator = ":".into();
        let error = wrong.validate().unwrap_err().to_string();
        assert!(error.contains("PubSub.MessageBroker.ServiceBus.NamespaceSeparator"), "{error}");
    }

    #[test]
    fn the_key_stays_out_of_debug_output() {
        let options = ServiceBusOptions::from_settings(&settings("~", "Q"), false, false).unwrap();
        let shown = format!("{options:?}");
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert!(shown.contains("ns.servicebus.windows.net"), "{shown}");
    }
}
