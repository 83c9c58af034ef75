//! RabbitMQ transport on lapin, with MassTransit's topology and conventions (wire spec §2).
//!
//! This module owns the broker connection: it declares the receive endpoint `Q` and the exchanges
//! Firely clients expect, consumes `Q` with manual acknowledgement, sends replies to MassTransit
//! addresses, publishes events, and moves failed or unroutable messages to `Q_error`/`Q_skipped`.
//!
//! Invariants it keeps:
//! * every send and publish waits for the broker's publisher confirm before returning `Ok`;
//! * a message moved to `Q_error`/`Q_skipped` is acknowledged only after its copy was confirmed;
//! * after a connection loss a supervisor task reconnects, redeclares the topology and resumes
//!   consuming into the same `mpsc` channel; while it is down `is_connected()` is false and sends
//!   wait at most [`RabbitMqOptions::reconnect_wait`] before failing with a retryable error;
//! * the password is never logged;
//! * TLS material (CA file, client identity) is read and checked once, in [`RabbitMqTransport::connect`],
//!   before any connection, so a wrong path, passphrase or key is reported as such and not as a
//!   network failure; the server's certificate is checked against `ServerName` (default: the host).
//!
//! Recovery is done here rather than with lapin's `enable_auto_recover`: a fresh connection per
//! outage keeps the state simple (a channel closed by a 406 on a reply declare is not "recovered",
//! acknowledgement handles of the lost connection fail cleanly, and the declared-exchange cache is
//! per connection).

mod acker;
pub(crate) mod client_connection;
mod convert;
mod options;
mod target;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeBindOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::{AMQPUriTcpExt, AsyncTcpStream, OwnedIdentity, OwnedTLSConfig, TLSConfig};
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::contracts::MessageType;
use crate::transport::{Delivery, OutgoingMessage, Transport, TransportError, TransportMeta};

pub use options::{ClientIdentity, PLAIN_PORT, RabbitMqOptions, TLS_PORT, TlsOptions};
pub use target::{ExchangeType, SendTarget};

/// The command types the bridge consumes; their exchanges are bound to `Q`.
const CONSUMED: [MessageType; 2] = [MessageType::ExecuteStorePlanCommand, MessageType::RetrievePlanCommand];
/// Response types whose exchanges MassTransit-JS clients bind to and expect to exist.
const RESPONSES: [MessageType; 2] = [MessageType::ExecuteStorePlanResponse, MessageType::RetrievePlanResponse];
/// How long establishing a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the supervisor checks the connection.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The RabbitMQ transport. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct RabbitMqTransport {
    inner: Arc<Inner>,
    /// Send addresses parsed before: replies go to the same few response addresses again and again.
    targets: Mutex<HashMap<String, Arc<SendTarget>>>,
}

/// The parsed-address cache is emptied when it reaches this many addresses (a client per
/// temporary response queue can send from ever new addresses).
const MAX_CACHED_TARGETS: usize = 1024;

impl std::fmt::Debug for RabbitMqTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqTransport")
            .field("input_address", &self.inner.input_address)
            .field("connected", &self.inner.is_connected())
            .finish()
    }
}

/// State shared by the transport, its supervisor task and the acknowledgement handles.
pub(crate) struct Inner {
    options: RabbitMqOptions,
    uri: AMQPUri,
    tls: OwnedTLSConfig,
    input_address: String,
    session: RwLock<Option<Arc<Session>>>,
    next_session_id: AtomicU64,
    /// Where deliveries go once `start` was called.
    consumer: Mutex<Option<mpsc::Sender<Delivery>>>,
    /// Serialises topology declaration and consumer setup between `start` and the supervisor.
    setup: tokio::sync::Mutex<()>,
    closed: AtomicBool,
    shutdown: watch::Sender<bool>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

/// One broker connection and what was set up on it.
pub(crate) struct Session {
    id: u64,
    connection: Connection,
    /// Confirm-mode channels, used round-robin; a slot is reopened when its channel closed.
    publishers: Vec<tokio::sync::Mutex<Option<Channel>>>,
    next_publisher: AtomicUsize,
    /// Exchanges (and queues) declared for sends on this connection.
    declared: Mutex<HashSet<String>>,
    /// Whether a consumer forwards deliveries from this connection.
    consuming: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(handle) = self.supervisor.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            handle.abort();
        }
    }
}

impl RabbitMqTransport {
    /// Connects to the broker. Nothing is declared until [`Transport::start`] or a send.
    ///
    /// Fails with [`TransportError::Refused`] for bad credentials, an unknown vhost, unusable TLS
    /// material or a TLS handshake that cannot succeed (untrusted or misnamed server certificate,
    /// client certificate missing or not accepted), and with [`TransportError::Unavailable`] when
    /// the broker cannot be reached.
    pub async fn connect(options: RabbitMqOptions) -> Result<Self, TransportError> {
        let tls = tls_config(&options).await?;
        let uri = amqp_uri(&options);
        let input_address = input_address(&options);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            options,
            uri,
            tls,
            input_address,
            session: RwLock::new(None),
            next_session_id: AtomicU64::new(1),
            consumer: Mutex::new(None),
            setup: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
            shutdown,
            supervisor: Mutex::new(None),
        });
        let session = inner.open_session().await?;
        inner.set_session(Some(session));
        tracing::info!(
            host = %inner.options.host,
            port = inner.options.port,
            vhost = %inner.options.vhost,
            user = %inner.options.username,
            "connected to RabbitMQ"
        );
        let handle = tokio::spawn(supervise(Arc::downgrade(&inner), shutdown_rx));
        *inner.supervisor.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
        Ok(RabbitMqTransport { inner, targets: Mutex::default() })
    }

    /// The target of a send address, parsed once.
    fn target(&self, address: &str) -> Result<Arc<SendTarget>, TransportError> {
        let mut targets = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(target) = targets.get(address) {
            return Ok(target.clone());
        }
        let target = Arc::new(SendTarget::parse(address)?);
        if targets.len() >= MAX_CACHED_TARGETS {
            targets.clear();
        }
        targets.insert(address.to_owned(), target.clone());
        Ok(target)
    }

    /// The settings this transport was built with.
    pub fn options(&self) -> &RabbitMqOptions {
        &self.inner.options
    }

    /// Sends to an already resolved target (what [`Transport::send`] does after parsing the address).
    pub async fn send_to(&self, target: &SendTarget, message: &OutgoingMessage) -> Result<(), TransportError> {
        self.inner.send_to(target, message).await
    }
}

#[async_trait]
impl Transport for RabbitMqTransport {
    async fn start(&self) -> Result<mpsc::Receiver<Delivery>, TransportError> {
        let capacity = usize::from(self.inner.options.prefetch_count.max(1));
        let (tx, rx) = mpsc::channel(capacity);
        {
            let mut consumer = self.inner.consumer.lock().unwrap_or_else(PoisonError::into_inner);
            if consumer.as_ref().is_some_and(|c| !c.is_closed()) {
                return Err(TransportError::Refused("the transport is already consuming".to_owned()));
            }
            *consumer = Some(tx);
        }
        let session = self.inner.wait_for_session().await?;
        Inner::ensure_consuming(&self.inner, &session).await?;
        Ok(rx)
    }

    async fn send(&self, address: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        let target = self.target(address)?;
        self.inner.send_to(&target, &message).await
    }

    async fn publish(&self, message_type: MessageType, message: OutgoingMessage) -> Result<(), TransportError> {
        let target = SendTarget::exchange(message_type.exchange());
        self.inner.send_to(&target, &message).await
    }

    fn input_address(&self) -> String {
        self.inner.input_address.clone()
    }

    fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }

    async fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let _ = self.inner.shutdown.send(true);
        let handle = self.inner.supervisor.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(handle) = handle {
            handle.abort();
        }
        self.inner.consumer.lock().unwrap_or_else(PoisonError::into_inner).take();
        let session = self.inner.session.write().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(session) = session {
            // Let in-flight publishes see their confirms before the connection goes.
            for slot in &session.publishers {
                if let Some(channel) = slot.lock().await.take() {
                    let _ = tokio::time::timeout(self.inner.options.confirm_timeout, channel.wait_for_confirms()).await;
                }
            }
            let _ = session.connection.close(200, ShortString::from("closing")).await;
        }
    }
}

impl Inner {
    fn current_session(&self) -> Option<Arc<Session>> {
        self.session.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set_session(&self, session: Option<Arc<Session>>) {
        *self.session.write().unwrap_or_else(PoisonError::into_inner) = session;
    }

    fn is_connected(&self) -> bool {
        self.current_session().is_some_and(|s| s.connection.status().connected())
    }

    /// The live session, waiting up to `reconnect_wait` for the supervisor to bring one back.
    async fn wait_for_session(&self) -> Result<Arc<Session>, TransportError> {
        let deadline = tokio::time::Instant::now() + self.options.reconnect_wait;
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(TransportError::Unavailable("the transport is closed".to_owned()));
            }
            if let Some(session) = self.current_session().filter(|s| s.connection.status().connected()) {
                return Ok(session);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TransportError::Unavailable("not connected to RabbitMQ".to_owned()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn open_session(&self) -> Result<Arc<Session>, TransportError> {
        let name = format!("fhir-pubsub {}", self.options.queue_name);
        let connection = open_connection(&self.options, self.uri.clone(), self.tls.clone(), name).await?;
        let publishers = (0..self.options.publish_channels.max(1)).map(|_| tokio::sync::Mutex::new(None)).collect();
        Ok(Arc::new(Session {
            id: self.next_session_id.fetch_add(1, Ordering::Relaxed),
            connection,
            publishers,
            next_publisher: AtomicUsize::new(0),
            declared: Mutex::new(HashSet::new()),
            consuming: AtomicBool::new(false),
        }))
    }

    /// Declares the topology and starts the consumer on `session` unless one already runs there.
    async fn ensure_consuming(this: &Arc<Inner>, session: &Arc<Session>) -> Result<(), TransportError> {
        let _guard = this.setup.lock().await;
        if session.consuming.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(tx) = this.consumer.lock().unwrap_or_else(PoisonError::into_inner).clone() else {
            return Ok(());
        };
        let channel = session.connection.create_channel().await.map_err(|e| broker_error(&e))?;
        this.declare_topology(&channel).await?;
        channel
            .basic_qos(this.options.prefetch_count.max(1), BasicQosOptions::default())
            .await
            .map_err(|e| broker_error(&e))?;
        let consumer = channel
            .basic_consume(
                ShortString::from(this.options.queue_name.as_str()),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| broker_error(&e))?;
        session.consuming.store(true, Ordering::SeqCst);
        tracing::info!(queue = %this.options.queue_name, "consuming");
        let weak = Arc::downgrade(this);
        let session = Arc::clone(session);
        tokio::spawn(async move {
            forward(consumer, tx, weak, &session).await;
            session.consuming.store(false, Ordering::SeqCst);
            // Keep the consumer channel open until forwarding ends; dropping it closes it.
            drop(channel);
        });
        Ok(())
    }

    /// Spec §2.2: `Q` (exchange and queue), the command exchanges bound to it, the event and
    /// response exchanges, and `Q_error` / `Q_skipped`.
    async fn declare_topology(&self, channel: &Channel) -> Result<(), TransportError> {
        let q = self.options.queue_name.as_str();
        let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        let queue_options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        let declare_exchange = |name: String| async move {
            channel
                .exchange_declare(
                    ShortString::from(name.as_str()),
                    ExchangeKind::Fanout,
                    durable,
                    FieldTable::default(),
                )
                .await
                .map_err(|e| declare_error(&name, &e))
        };
        let declare_queue = |name: String, args: FieldTable| async move {
            channel
                .queue_declare(ShortString::from(name.as_str()), queue_options, args)
                .await
                .map_err(|e| declare_error(&name, &e))?;
            channel
                .queue_bind(
                    ShortString::from(name.as_str()),
                    ShortString::from(name.as_str()),
                    ShortString::from(""),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| declare_error(&name, &e))
        };

        declare_exchange(q.to_owned()).await?;
        declare_queue(q.to_owned(), convert::arguments_table(&self.options.queue_arguments)).await?;
        for message_type in CONSUMED {
            let exchange = message_type.exchange();
            declare_exchange(exchange.clone()).await?;
            channel
                .exchange_bind(
                    ShortString::from(q),
                    ShortString::from(exchange.as_str()),
                    ShortString::from(""),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| declare_error(&exchange, &e))?;
        }
        for message_type in self.options.event_types.iter().copied().chain(RESPONSES) {
            declare_exchange(message_type.exchange()).await?;
        }
        for suffix in ["_error", "_skipped"] {
            let name = format!("{q}{suffix}");
            declare_exchange(name.clone()).await?;
            declare_queue(name, FieldTable::default()).await?;
        }
        Ok(())
    }

    /// A confirm-mode channel of `session`, reopening its slot if the channel closed.
    async fn publisher(&self, session: &Session) -> Result<Channel, TransportError> {
        let index = session.next_publisher.fetch_add(1, Ordering::Relaxed) % session.publishers.len().max(1);
        let Some(slot) = session.publishers.get(index) else {
            return Err(TransportError::Unavailable("no publish channel".to_owned()));
        };
        let mut slot = slot.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = session.connection.create_channel().await.map_err(|e| broker_error(&e))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| broker_error(&e))?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Publishes and waits for the confirm. `Err` carries lapin's error so callers can tell a
    /// missing exchange (404) from a lost connection.
    async fn publish_confirmed(
        &self,
        session: &Session,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishFailure> {
        let channel = self.publisher(session).await.map_err(PublishFailure::Transport)?;
        let confirm = channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .map_err(PublishFailure::Lapin)?;
        let confirmation = tokio::time::timeout(self.options.confirm_timeout, confirm)
            .await
            .map_err(|_| {
                PublishFailure::Transport(TransportError::Unavailable("no publisher confirm in time".to_owned()))
            })?
            .map_err(PublishFailure::Lapin)?;
        if confirmation.is_nack() {
            return Err(PublishFailure::Transport(TransportError::Unavailable(format!(
                "the broker did not accept the message for `{exchange}`"
            ))));
        }
        Ok(())
    }

    async fn send_to(&self, target: &SendTarget, message: &OutgoingMessage) -> Result<(), TransportError> {
        let session = self.wait_for_session().await?;
        let properties = send_properties(message);
        if target.is_direct_reply_to() {
            let Some(reply_to) = message.reply_to.as_deref().filter(|r| !r.is_empty()) else {
                return Err(TransportError::InvalidAddress {
                    address: target.name.clone(),
                    reason: "direct reply-to needs the request's AMQP reply_to".to_owned(),
                });
            };
            return self
                .publish_confirmed(&session, "", reply_to, &message.body, properties)
                .await
                .map_err(|f| f.into_error(""));
        }
        self.ensure_declared(&session, target).await?;
        match self.publish_confirmed(&session, &target.name, "", &message.body, properties.clone()).await {
            Ok(()) => Ok(()),
            Err(failure) if failure.is_not_found() => {
                // The exchange went away since we declared it (auto-delete, x-expires): declare again.
                session.forget(&target.name);
                self.ensure_declared(&session, target).await?;
                self.publish_confirmed(&session, &target.name, "", &message.body, properties)
                    .await
                    .map_err(|f| f.into_error(&target.name))
            }
            Err(failure) => Err(failure.into_error(&target.name)),
        }
    }

    /// Declares the target's exchange (and queue when `bind`) once per connection. A 406 (the
    /// exchange exists with other flags) falls back to a passive declare on a fresh channel.
    async fn ensure_declared(&self, session: &Session, target: &SendTarget) -> Result<(), TransportError> {
        if session.is_declared(&target.name) {
            return Ok(());
        }
        let channel = session.connection.create_channel().await.map_err(|e| broker_error(&e))?;
        let options = ExchangeDeclareOptions {
            durable: target.durable,
            auto_delete: target.auto_delete,
            ..ExchangeDeclareOptions::default()
        };
        let mut arguments = FieldTable::default();
        if let Some(alternate) = &target.alternate_exchange {
            arguments.insert(ShortString::from("alternate-exchange"), convert::text(alternate));
        }
        if let Some(delayed) = &target.delayed_type {
            arguments.insert(ShortString::from("x-delayed-type"), convert::text(delayed));
        }
        let name = ShortString::from(target.name.as_str());
        let declared = channel.exchange_declare(name.clone(), target.exchange_type.kind(), options, arguments).await;
        let channel = match declared {
            Ok(()) => channel,
            Err(e) if reply_code(&e) == Some(406) => {
                tracing::debug!(exchange = %target.name, "exchange exists with other flags; using it as it is");
                let channel = session.connection.create_channel().await.map_err(|e| broker_error(&e))?;
                let passive = ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() };
                channel
                    .exchange_declare(name.clone(), target.exchange_type.kind(), passive, FieldTable::default())
                    .await
                    .map_err(|e| declare_error(&target.name, &e))?;
                channel
            }
            Err(e) => return Err(declare_error(&target.name, &e)),
        };
        if target.bind {
            let queue = target.queue.as_deref().unwrap_or(&target.name);
            let queue_options = QueueDeclareOptions {
                durable: target.durable,
                auto_delete: target.auto_delete,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(ShortString::from(queue), queue_options, FieldTable::default())
                .await
                .map_err(|e| declare_error(queue, &e))?;
            channel
                .queue_bind(
                    ShortString::from(queue),
                    name.clone(),
                    ShortString::from(""),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| declare_error(queue, &e))?;
        }
        for source in &target.bind_exchanges {
            channel
                .exchange_declare(
                    ShortString::from(source.as_str()),
                    ExchangeKind::Fanout,
                    ExchangeDeclareOptions {
                        durable: target.durable,
                        auto_delete: target.auto_delete,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| declare_error(source, &e))?;
            channel
                .exchange_bind(
                    name.clone(),
                    ShortString::from(source.as_str()),
                    ShortString::from(""),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| declare_error(source, &e))?;
        }
        let _ = channel.close(200, ShortString::from("declared")).await;
        session.remember(&target.name);
        Ok(())
    }
}

impl Session {
    fn is_declared(&self, name: &str) -> bool {
        self.declared.lock().unwrap_or_else(PoisonError::into_inner).contains(name)
    }

    fn remember(&self, name: &str) {
        self.declared.lock().unwrap_or_else(PoisonError::into_inner).insert(name.to_owned());
    }

    fn forget(&self, name: &str) {
        self.declared.lock().unwrap_or_else(PoisonError::into_inner).remove(name);
    }
}

/// Why a confirmed publish failed.
enum PublishFailure {
    Lapin(lapin::Error),
    Transport(TransportError),
}

impl PublishFailure {
    fn is_not_found(&self) -> bool {
        matches!(self, PublishFailure::Lapin(e) if reply_code(e) == Some(404))
    }

    fn into_error(self, exchange: &str) -> TransportError {
        match self {
            PublishFailure::Lapin(e) if reply_code(&e) == Some(404) => {
                TransportError::Refused(format!("exchange `{exchange}` does not exist"))
            }
            PublishFailure::Lapin(e) => broker_error(&e),
            PublishFailure::Transport(e) => e,
        }
    }
}

/// Forwards the deliveries of one consumer into the transport's channel until the consumer or
/// the receiver goes away.
async fn forward(
    mut consumer: lapin::Consumer,
    tx: mpsc::Sender<Delivery>,
    inner: Weak<Inner>,
    session: &Arc<Session>,
) {
    while let Some(item) = consumer.next().await {
        let delivery = match item {
            Ok(delivery) => delivery,
            Err(e) => {
                // Closing the transport ends the consumer this way too: that is no news.
                if inner.upgrade().is_some_and(|i| !i.closed.load(Ordering::SeqCst)) {
                    tracing::warn!(error = %e, "consumer stopped");
                }
                break;
            }
        };
        let Some(strong) = inner.upgrade() else { break };
        let delivery = acker::into_delivery(delivery, strong, session.id);
        if tx.send(delivery).await.is_err() {
            tracing::info!("delivery receiver dropped; consumer stops");
            break;
        }
    }
}

/// Watches the connection; reconnects with backoff and resumes consuming when it is lost.
async fn supervise(inner: Weak<Inner>, mut shutdown: watch::Receiver<bool>) {
    let mut failures: u32 = 0;
    loop {
        let pause = {
            let Some(inner) = inner.upgrade() else { return };
            if inner.closed.load(Ordering::SeqCst) {
                return;
            }
            match inner.current_session().filter(|s| s.connection.status().connected()) {
                Some(session) => {
                    let wanted = inner
                        .consumer
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .as_ref()
                        .is_some_and(|c| !c.is_closed());
                    if wanted && !session.consuming.load(Ordering::SeqCst) {
                        match Inner::ensure_consuming(&inner, &session).await {
                            Ok(()) => failures = 0,
                            Err(e) => {
                                failures = failures.saturating_add(1);
                                tracing::warn!(error = %e, "cannot resume consuming");
                            }
                        }
                    }
                    if failures == 0 { WATCH_INTERVAL } else { backoff(failures) }
                }
                None => {
                    if inner.current_session().is_some() {
                        tracing::warn!("RabbitMQ connection lost; reconnecting");
                        inner.set_session(None);
                    }
                    match inner.open_session().await {
                        Ok(session) => {
                            inner.set_session(Some(Arc::clone(&session)));
                            tracing::info!("reconnected to RabbitMQ");
                            metrics::counter!(crate::observe::metrics::BROKER_RECONNECTS).increment(1);
                            failures = 0;
                            Duration::ZERO
                        }
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            tracing::debug!(error = %e, attempt = failures, "reconnect failed");
                            backoff(failures)
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

fn backoff(failures: u32) -> Duration {
    let millis = 250u64.saturating_mul(1u64 << failures.min(5));
    Duration::from_millis(millis).min(MAX_BACKOFF)
}

/// AMQP properties of a send (spec §2.5). Never type, app_id or timestamp.
fn send_properties(message: &OutgoingMessage) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_content_type(ShortString::from(message.content_type))
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(message.message_id.hyphenated().to_string()));
    if let Some(correlation_id) = message.correlation_id {
        properties = properties.with_correlation_id(ShortString::from(correlation_id.hyphenated().to_string()));
    }
    if let Some(ttl) = message.time_to_live {
        let millis = ttl.as_millis().max(1000);
        properties = properties.with_expiration(ShortString::from(millis.to_string()));
    }
    let headers = convert::headers_table(&message.headers);
    if !headers.inner().is_empty() {
        properties = properties.with_headers(headers);
    }
    properties
}

/// Metadata of a received message.
fn delivery_meta(delivery: &lapin::message::Delivery) -> TransportMeta {
    let p = &delivery.properties;
    TransportMeta {
        content_type: p.content_type().as_ref().map(|s| s.to_string()),
        message_id: p.message_id().as_ref().map(|s| s.to_string()),
        correlation_id: p.correlation_id().as_ref().map(|s| s.to_string()),
        headers: p.headers().as_ref().map(convert::table_to_headers).unwrap_or_default(),
        reply_to: p.reply_to().as_ref().map(|s| s.to_string()),
        type_hint: convert::type_hint(delivery.exchange.as_str()),
        ..TransportMeta::default()
    }
}

/// `rabbitmq://host[:port]/[vhost/]Q`, omitting the standard ports and vhost `/` as MassTransit does.
fn input_address(options: &RabbitMqOptions) -> String {
    let mut address = format!("rabbitmq://{}", options.host);
    if options.port != PLAIN_PORT && options.port != TLS_PORT {
        address.push_str(&format!(":{}", options.port));
    }
    address.push('/');
    let vhost = options.vhost.trim_matches('/');
    if !vhost.is_empty() {
        address.push_str(&percent_encoding::utf8_percent_encode(vhost, percent_encoding::NON_ALPHANUMERIC).to_string());
        address.push('/');
    }
    address.push_str(&options.queue_name);
    address
}

/// The largest AMQP frame the bridge accepts, in bytes (the broker may agree on less).
const FRAME_MAX: u32 = 32 * 1024;

fn amqp_uri(options: &RabbitMqOptions) -> AMQPUri {
    AMQPUri {
        scheme: if options.use_tls() { AMQPScheme::AMQPS } else { AMQPScheme::AMQP },
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo { username: options.username.clone(), password: options.password.clone() },
            host: options.host.clone(),
            port: options.port,
        },
        vhost: if options.vhost.is_empty() { "/".to_owned() } else { options.vhost.clone() },
        // lapin keeps a receive and a send ring of 32 frames per connection: at RabbitMQ's default
        // frame size (128 KiB) that is 8 MiB resident per connection; 32 KiB frames keep it at 2 MiB
        // and split a large plan into more frames, which costs nothing measurable.
        query: AMQPQueryString { heartbeat: Some(30), frame_max: Some(FRAME_MAX), ..AMQPQueryString::default() },
    }
}

/// Opens one AMQP connection named `name` on the broker. lapin's own connector checks the broker's
/// certificate against the URI's host; this one against `ServerName`, which is the host unless set.
async fn open_connection(
    options: &RabbitMqOptions,
    uri: AMQPUri,
    tls: OwnedTLSConfig,
    name: String,
) -> Result<Connection, TransportError> {
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    let runtime = lapin::runtime::default_runtime().map_err(|e| TransportError::Unavailable(e.to_string()))?;
    let server_name = options.tls_server_name().to_owned();
    let connect = async move |uri: AMQPUri, runtime| {
        let tcp_only = AMQPUri { scheme: AMQPScheme::AMQP, ..uri.clone() };
        let stream = AMQPUriTcpExt::connect_with_config_async(&tcp_only, TLSConfig::default(), &runtime).await?;
        if uri.scheme == AMQPScheme::AMQP {
            return Ok(stream);
        }
        Ok::<_, lapin::Error>(stream.into_tls(&server_name, tls.as_ref()).await?)
    };
    let connecting = Connection::connector(uri, runtime, connect, properties);
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| TransportError::Unavailable("timed out connecting to RabbitMQ".to_owned()))?
        .map_err(|e| connect_error(options, &e))
}

/// The TLS material of `options`, read and checked before any connection: every file must be
/// readable, `CaFile` must hold PEM certificates, and the client identity must open (the right
/// PKCS#12 passphrase, a certificate and key that parse). Messages name the setting and the file,
/// never a passphrase.
async fn tls_config(options: &RabbitMqOptions) -> Result<OwnedTLSConfig, TransportError> {
    if !options.use_tls() {
        return Ok(OwnedTLSConfig::default());
    }
    let read = |setting: &str, path: &Path| {
        std::fs::read(path)
            .map_err(|e| TransportError::Refused(format!("TLS {setting} `{}` cannot be read: {e}", path.display())))
    };
    let mut config = OwnedTLSConfig::default();
    if let Some(path) = &options.tls.ca_file {
        let pem = String::from_utf8(read("CaFile", path)?).ok().filter(|text| text.contains(PEM_CERTIFICATE));
        let Some(pem) = pem else {
            return Err(TransportError::Refused(format!(
                "TLS CaFile `{}` holds no PEM certificate (`{PEM_CERTIFICATE}`)",
                path.display()
            )));
        };
        config.cert_chain = Some(pem);
    }
    build_tls_client(&config).await.map_err(|e| match &options.tls.ca_file {
        Some(path) => {
            TransportError::Refused(format!("TLS CaFile `{}` holds an unusable certificate: {e}", path.display()))
        }
        None => TransportError::Refused(format!(
            "TLS cannot trust any server: {e} (install the system's CA certificates, or set CaFile)"
        )),
    })?;
    match &options.tls.client_identity {
        Some(ClientIdentity::Pkcs12 { path, password }) => {
            config.identity =
                Some(OwnedIdentity::PKCS12 { der: read("ClientCertificatePath", path)?, password: password.clone() });
            build_tls_client(&config).await.map_err(|e| {
                TransportError::Refused(format!(
                    "TLS ClientCertificatePath `{}` cannot be opened: wrong ClientCertificatePassphrase, or not a \
                     PKCS#12 file with a certificate and its private key ({e})",
                    path.display()
                ))
            })?;
        }
        Some(ClientIdentity::Pem { cert_path, key_path }) => {
            config.identity = Some(OwnedIdentity::PKCS8 {
                pem: read("ClientCertFile", cert_path)?,
                key: read("ClientKeyFile", key_path)?,
            });
            build_tls_client(&config).await.map_err(|e| {
                TransportError::Refused(format!(
                    "TLS ClientCertFile `{}` and ClientKeyFile `{}` are not a usable PEM certificate and \
                     private key: {e}",
                    cert_path.display(),
                    key_path.display()
                ))
            })?;
        }
        None => {}
    }
    Ok(config)
}

const PEM_CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----";

/// Builds the TLS client exactly as a connection does, over a stream that is already at its end:
/// material that cannot be used (a wrong passphrase, a key that does not parse, a key that does not
/// match its certificate) fails before a byte is exchanged, while usable material gets as far as
/// the handshake and stops there with `UnexpectedEof`.
async fn build_tls_client(config: &OwnedTLSConfig) -> std::io::Result<()> {
    match AsyncTcpStream::Plain(EndedStream).into_tls("localhost", config.as_ref()).await {
        Err(e) if e.kind() != std::io::ErrorKind::UnexpectedEof => Err(e),
        _ => Ok(()),
    }
}

/// A stream that swallows writes and reads as ended.
struct EndedStream;

impl futures::io::AsyncRead for EndedStream {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut [u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(0))
    }
}

impl futures::io::AsyncWrite for EndedStream {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Why a TLS connection failed, in the words of the settings, from the TLS library's message.
/// The library's own message is kept beside it, so an unknown case still says something.
fn tls_failure_hint(message: &str) -> Option<&'static str> {
    const HINTS: &[(&[&str], &str)] = &[
        (&["UnknownIssuer"], "the server's certificate is not signed by a CA in CaFile or in the system's trust store"),
        (
            &["not valid for name", "NotValidForName"],
            "the server's certificate does not carry the name connected to; connect by a name it carries \
             (Host) or set ServerName to one",
        ),
        (
            &["certificate expired", "certificate not valid yet", "Expired", "NotValidYet"],
            "the server's certificate is outside its validity period",
        ),
        (
            &["alert: CertificateRequired"],
            "the server demands a client certificate: set ClientCertificatePath (PKCS#12) or ClientCertFile \
             and ClientKeyFile (PEM)",
        ),
        (
            &["alert: BadCertificate", "alert: UnknownCA", "alert: CertificateUnknown", "alert: AccessDenied"],
            "the server did not accept the client certificate (is it signed by a CA the server trusts?)",
        ),
        (
            &["alert: HandshakeFailure"],
            "the server ended the handshake: it may demand a client certificate, or share no TLS version or \
             cipher suite with the bridge",
        ),
        (
            &["received corrupt message", "InvalidContentType"],
            "the server did not answer in TLS; is this its TLS port (usually 5671), not plain AMQP (5672)?",
        ),
    ];
    HINTS.iter().find(|(needles, _)| needles.iter().any(|n| message.contains(n))).map(|(_, hint)| *hint)
}
/// The AMQP reply code of a protocol error (404, 406, 403…).
fn reply_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

fn connect_error(options: &RabbitMqOptions, error: &lapin::Error) -> TransportError {
    if let Some(code @ (403 | 530)) = reply_code(error) {
        return TransportError::Refused(format!("RabbitMQ refused the connection ({code}): {error}"));
    }
    if options.use_tls() {
        let message = error.to_string();
        // The TLS library reports certificate and protocol failures as invalid data.
        let tls_error =
            matches!(error.kind(), lapin::ErrorKind::IOError(e) if e.kind() == std::io::ErrorKind::InvalidData);
        if tls_error {
            let hint = tls_failure_hint(&message).map(|hint| format!("{hint} ")).unwrap_or_default();
            return TransportError::Refused(format!(
                "TLS with {}:{} (server name `{}`) failed: {hint}({message})",
                options.host,
                options.port,
                options.tls_server_name()
            ));
        }
    }
    TransportError::Unavailable(format!("cannot connect to RabbitMQ: {error}"))
}

fn declare_error(name: &str, error: &lapin::Error) -> TransportError {
    match reply_code(error) {
        Some(code @ 403..=406) => TransportError::Refused(format!("declaring `{name}` failed ({code}): {error}")),
        _ => TransportError::Unavailable(format!("declaring `{name}` failed: {error}")),
    }
}

fn broker_error(error: &lapin::Error) -> TransportError {
    match reply_code(error) {
        Some(code @ 403..=406) => TransportError::Refused(format!("({code}) {error}")),
        _ => TransportError::Unavailable(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_address_omits_standard_port_and_root_vhost() {
        let options = RabbitMqOptions { host: "mq".into(), ..RabbitMqOptions::default() };
        assert_eq!(input_address(&options), "rabbitmq://mq/FirelyServer");
        let options =
            RabbitMqOptions { host: "mq".into(), port: 5671, vhost: "/".into(), ..RabbitMqOptions::default() };
        assert_eq!(input_address(&options), "rabbitmq://mq/FirelyServer");
        let options = RabbitMqOptions {
            host: "mq".into(),
            port: 5673,
            vhost: "prod".into(),
            queue_name: "Q".into(),
            ..Default::default()
        };
        assert_eq!(input_address(&options), "rabbitmq://mq:5673/prod/Q");
    }

    #[test]
    fn send_properties_follow_masstransit() {
        let message = OutgoingMessage {
            body: b"{}".to_vec(),
            content_type: "application/vnd.masstransit+json",
            message_id: uuid::Uuid::nil(),
            correlation_id: None,
            headers: vec![("fhir-release".into(), serde_json::json!("R4"))],
            time_to_live: Some(Duration::from_millis(20)),
            reply_to: None,
            key: None,
            session_id: None,
        };
        let p = send_properties(&message);
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(p.expiration().as_ref().map(|s| s.as_str()), Some("1000"));
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("00000000-0000-0000-0000-000000000000"));
        assert!(p.kind().is_none() && p.app_id().is_none() && p.timestamp().is_none() && p.correlation_id().is_none());
    }

    #[test]
    fn tls_failures_are_explained_in_the_words_of_the_settings() {
        let cases = [
            ("IO error: invalid peer certificate: UnknownIssuer", "CaFile"),
            (
                r#"IO error: invalid peer certificate: certificate not valid for name "mq"; certificate is only valid for DnsName("x")"#,
                "ServerName",
            ),
            ("IO error: invalid peer certificate: certificate expired: verification time 2", "validity period"),
            ("IO error: received fatal alert: CertificateRequired", "ClientCertificatePath"),
            ("IO error: received fatal alert: UnknownCA", "did not accept the client certificate"),
            ("IO error: received fatal alert: HandshakeFailure", "ended the handshake"),
            ("IO error: received corrupt message of type InvalidContentType", "5671"),
        ];
        for (message, expected) in cases {
            let hint = tls_failure_hint(message).unwrap_or_else(|| panic!("no hint for {message}"));
            assert!(hint.contains(expected), "{message} → {hint}");
        }
        assert_eq!(tls_failure_hint("IO error: Connection refused (os error 111)"), None);
    }

    #[test]
    fn backoff_is_bounded() {
        assert!(backoff(1) < backoff(3));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
