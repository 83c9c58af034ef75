//! The client's RabbitMQ side: sending a request the MassTransit way and waiting for its response,
//! sending without waiting, and listening to an event exchange.
//!
//! Invariants:
//! * a request is published with publisher confirms to the exchange named `ApplicationQueueName`;
//!   the call returns only after the broker confirmed it;
//! * responses arrive on a temporary endpoint (non-durable auto-delete fanout exchange, exclusive
//!   auto-delete queue of the same name, bound together) that exists only while the client runs,
//!   and only the response whose `requestId` matches the request is taken;
//! * the event exchanges are declared exactly as the bridge declares them (durable fanout).

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use uuid::Uuid;

use super::{ClientError, Exit};
use crate::envelope::{ENVELOPE_CONTENT_TYPE, Envelope, RabbitMqAddress, decode, encode, ids, transport_headers};
use crate::transport::rabbitmq::client_connection::{self, reply_code};
use crate::transport::rabbitmq::{PLAIN_PORT, RabbitMqOptions, TLS_PORT};
use crate::transport::{OutgoingMessage, TransportError};

/// How long the broker may take to confirm a publish.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to the broker the bridge uses.
pub struct Broker {
    connection: Connection,
    options: RabbitMqOptions,
}

/// A consumer of a temporary endpoint, waiting for a response.
pub struct ResponseEndpoint {
    /// The endpoint's address, for `responseAddress`.
    pub address: String,
    consumer: lapin::Consumer,
    // Keeps the consumer's channel open.
    _channel: Channel,
}

impl Broker {
    /// Connects with the bridge's own connection settings.
    pub async fn connect(options: RabbitMqOptions, purpose: &str) -> Result<Broker, ClientError> {
        let connection = client_connection::connect(&options, purpose).await.map_err(|e| {
            let why = match e {
                TransportError::Refused(why) | TransportError::Unavailable(why) => why,
                other => other.to_string(),
            };
            let (host, port, vhost) = (&options.host, options.port, &options.vhost);
            ClientError::new(
                Exit::Unavailable,
                format!("cannot connect to RabbitMQ at {host}:{port} (vhost {vhost}): {why}"),
            )
        })?;
        Ok(Broker { connection, options })
    }

    /// The exchange commands are sent to: `ApplicationQueueName`.
    pub fn command_exchange(&self) -> &str {
        &self.options.queue_name
    }

    async fn channel(&self) -> Result<Channel, ClientError> {
        self.connection.create_channel().await.map_err(|e| broker_error("opening a channel", &e))
    }

    /// Declares the temporary response endpoint and starts consuming it.
    pub async fn response_endpoint(&self) -> Result<ResponseEndpoint, ClientError> {
        let name = format!("fhir-pubsub_bus_{}", Uuid::new_v4().simple());
        let channel = self.channel().await?;
        let what = |e: lapin::Error| broker_error(&format!("declaring the response endpoint `{name}`"), &e);
        let temporary = ExchangeDeclareOptions { durable: false, auto_delete: true, ..Default::default() };
        channel
            .exchange_declare(short(&name), ExchangeKind::Fanout, temporary, FieldTable::default())
            .await
            .map_err(what)?;
        let queue = QueueDeclareOptions { durable: false, exclusive: true, auto_delete: true, ..Default::default() };
        channel.queue_declare(short(&name), queue, FieldTable::default()).await.map_err(what)?;
        channel
            .queue_bind(short(&name), short(&name), short(""), QueueBindOptions::default(), FieldTable::default())
            .await
            .map_err(what)?;
        let consume = BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() };
        let consumer =
            channel.basic_consume(short(&name), short(""), consume, FieldTable::default()).await.map_err(what)?;
        Ok(ResponseEndpoint { address: self.address_of(&name, true), consumer, _channel: channel })
    }

    /// `rabbitmq://HOST[:PORT]/[VHOST/]NAME`, with `?temporary=true` for a temporary endpoint.
    pub fn address_of(&self, name: &str, temporary: bool) -> String {
        endpoint_address(&self.options, name, temporary)
    }

    /// Publishes `envelope` to the command exchange and waits for the broker's confirm. `ttl`
    /// becomes the AMQP expiration.
    pub async fn send_command(&self, envelope: &Envelope, ttl: Option<Duration>) -> Result<(), ClientError> {
        let exchange = self.command_exchange().to_owned();
        // A passive declare on a channel of its own: a missing exchange closes the channel.
        let probe = self.channel().await?;
        let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
        match probe.exchange_declare(short(&exchange), ExchangeKind::Fanout, passive, FieldTable::default()).await {
            Ok(()) => {
                let _ = probe.close(200, short("checked")).await;
            }
            Err(e) if reply_code(&e) == Some(404) => {
                return Err(ClientError::new(
                    Exit::Unavailable,
                    format!(
                        "the exchange `{exchange}` does not exist on the broker; start a bridge with \
                         ApplicationQueueName `{exchange}` or set PubSub.MessageBroker.ApplicationQueueName to the one it uses"
                    ),
                ));
            }
            Err(e) => return Err(broker_error(&format!("checking the exchange `{exchange}`"), &e)),
        }
        let message = OutgoingMessage {
            body: encode(envelope),
            content_type: ENVELOPE_CONTENT_TYPE,
            message_id: envelope.message_id.unwrap_or_else(ids::new_id),
            correlation_id: envelope.correlation_id,
            headers: transport_headers(envelope),
            time_to_live: ttl,
            reply_to: None,
            key: None,
            session_id: None,
        };
        let channel = self.channel().await?;
        let sending = |e: lapin::Error| broker_error(&format!("sending to `{exchange}`"), &e);
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(sending)?;
        let confirm = channel
            .basic_publish(
                short(&exchange),
                short(""),
                BasicPublishOptions::default(),
                &message.body,
                client_connection::properties(&message),
            )
            .await
            .map_err(sending)?;
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map_err(|_| {
                ClientError::new(Exit::Unavailable, format!("the broker did not confirm the message to `{exchange}`"))
            })?
            .map_err(sending)?;
        if confirmation.is_nack() {
            return Err(ClientError::new(Exit::Unavailable, format!("the broker refused the message to `{exchange}`")));
        }
        let _ = channel.close(200, short("sent")).await;
        Ok(())
    }

    /// Declares `exchange` as the bridge does (durable fanout), binds an exclusive auto-delete
    /// queue to it and returns its consumer.
    pub async fn subscribe(&self, exchange: &str) -> Result<(lapin::Consumer, Channel), ClientError> {
        let channel = self.channel().await?;
        let what = |e: lapin::Error| broker_error(&format!("subscribing to `{exchange}`"), &e);
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(short(exchange), ExchangeKind::Fanout, durable, FieldTable::default())
            .await
            .map_err(what)?;
        let name = format!("fhir-pubsub_listen_{}", Uuid::new_v4().simple());
        let queue = QueueDeclareOptions { durable: false, exclusive: true, auto_delete: true, ..Default::default() };
        channel.queue_declare(short(&name), queue, FieldTable::default()).await.map_err(what)?;
        channel
            .queue_bind(short(&name), short(exchange), short(""), QueueBindOptions::default(), FieldTable::default())
            .await
            .map_err(what)?;
        let consume = BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() };
        let consumer =
            channel.basic_consume(short(&name), short(""), consume, FieldTable::default()).await.map_err(what)?;
        Ok((consumer, channel))
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.connection.close(200, short("done")).await;
    }
}

impl ResponseEndpoint {
    /// Waits until `deadline` for the response to `request_id`; other messages are skipped.
    pub async fn wait_for(
        &mut self,
        request_id: Uuid,
        deadline: tokio::time::Instant,
        waited: Duration,
        exchange: &str,
    ) -> Result<Envelope, ClientError> {
        loop {
            let next = tokio::time::timeout_at(deadline, self.consumer.next()).await.map_err(|_| {
                ClientError::new(
                    Exit::Unavailable,
                    format!(
                        "no response arrived within {}; is a bridge consuming `{exchange}`?",
                        super::format_duration(waited)
                    ),
                )
            })?;
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => return Err(broker_error("waiting for the response", &e)),
                None => {
                    return Err(ClientError::new(
                        Exit::Unavailable,
                        "the broker connection closed while waiting for the response",
                    ));
                }
            };
            match decode(&delivery.data, &client_connection::meta(&delivery)) {
                Ok(envelope) if envelope.request_id == Some(request_id) => return Ok(envelope),
                Ok(_) => tracing::debug!("skipping a message that answers another request"),
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable message on the response endpoint"),
            }
        }
    }
}

/// The MassTransit address of exchange `name` on the broker of `options`.
fn endpoint_address(options: &RabbitMqOptions, name: &str, temporary: bool) -> String {
    let tls = options.use_tls();
    let mut address = RabbitMqAddress::exchange(name);
    address.scheme = if tls { "rabbitmqs" } else { "rabbitmq" }.to_owned();
    address.host = Some(options.host.clone());
    let default_port = if tls { TLS_PORT } else { PLAIN_PORT };
    address.port = Some(options.port).filter(|p| *p != default_port);
    let vhost = options.vhost.trim_matches('/');
    address.vhost = (!vhost.is_empty()).then(|| vhost.to_owned());
    if temporary {
        address.durable = false;
        address.auto_delete = true;
        address.temporary = true;
    }
    address.to_string()
}

fn short(text: &str) -> ShortString {
    ShortString::from(text)
}

fn broker_error(doing: &str, error: &lapin::Error) -> ClientError {
    ClientError::new(Exit::Unavailable, format!("RabbitMQ failed while {doing}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_addresses_read_back_as_the_same_endpoint() {
        let options = RabbitMqOptions { host: "mq".into(), ..RabbitMqOptions::default() };
        assert_eq!(endpoint_address(&options, "bus_1", true), "rabbitmq://mq/bus_1?temporary=true");
        assert_eq!(endpoint_address(&options, "FirelyServer", false), "rabbitmq://mq/FirelyServer");
        let options = RabbitMqOptions { host: "mq".into(), port: 5673, vhost: "prod/a".into(), ..Default::default() };
        let text = endpoint_address(&options, "bus_2", true);
        assert_eq!(text, "rabbitmq://mq:5673/prod%2Fa/bus_2?temporary=true");
        let read = RabbitMqAddress::parse(&text).unwrap();
        assert_eq!((read.name.as_str(), read.vhost.as_deref(), read.temporary), ("bus_2", Some("prod/a"), true));
        let options = RabbitMqOptions { host: "mq".into(), port: 5671, ..Default::default() };
        assert_eq!(endpoint_address(&options, "b", true), "rabbitmqs://mq/b?temporary=true");
    }
}
