//! Azure Service Bus transport on azservicebus (AMQP 1.0), following MassTransit's Service Bus
//! conventions and Firely's entities (wire spec §4).
//!
//! This module owns the Service Bus connection: one receiver takes commands from the queue
//! `ApplicationQueueName` (lower-cased), which the subscriptions on the command topics
//! `Firely.Server.Contracts.Messages.V1~ExecuteStorePlanCommand` and `…~RetrievePlanCommand` forward
//! to; senders, one per entity, send replies to `sb://ns/queue` and `sb://ns/topic?type=topic`
//! addresses and publish change events to the event topics.
//!
//! Delivery invariant (peek-lock, at least once): a message is **completed** only when the bridge
//! acknowledges it, that is after its SQL commit and the broker's acceptance of its reply. A
//! transient failure (the store is down, a reply not accepted) **abandons** it after
//! [`ServiceBusOptions::retry_delay`], so Service Bus delivers it again with its delivery count one
//! higher; a message that can never be handled is **dead-lettered** with the reason (or copied to
//! `<queue>_error`, then completed, with `UseErrorQueues`). A crash or a lost link before the
//! completion only repeats the message once its lock expires (the store's inbox answers a repeated
//! store plan without applying it twice); nothing is completed early.
//!
//! Settlement happens on the link that received the message, so one task owns the receiver and
//! serves both receiving and the acknowledgement handles' [`acker::Settle`] requests.
//!
//! At start the queue, the command topics, the enabled event topics (and the error queues with
//! `UseErrorQueues`) must exist: Service Bus manages entities over its HTTPS management API, which
//! this transport does not use, so missing ones stop the start with the names and how to create
//! them. Subscriptions cannot be inspected over AMQP and are not checked. The connection string's
//! key is never logged.
//!
//! Plain AMQP (no TLS, port 5672) is used only for a connection string with
//! `UseDevelopmentEmulator=true`; otherwise AMQP over TLS on port 5671. A port written in the
//! connection string's `Endpoint` (an emulator published on another port) is used too.

mod acker;
pub mod message;
mod options;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use azservicebus::authorization::{AzureNamedKeyCredential, AzureSasCredential};
use azservicebus::core::BasicRetryPolicy;
use azservicebus::receiver::DeadLetterOptions;
use azservicebus::{
    ServiceBusClient, ServiceBusClientOptions, ServiceBusMessage, ServiceBusReceiveMode, ServiceBusReceiver,
    ServiceBusReceiverOptions, ServiceBusRetryOptions, ServiceBusSender, ServiceBusSenderOptions,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::ServiceBusCredential;
use crate::contracts::MessageType;
use crate::envelope::{Address, TransportKind};
use crate::transport::{Delivery, OutgoingMessage, Transport, TransportError};

pub use acker::Disposition;
pub use options::{CONSUMED, ServiceBusOptions};

type Client = ServiceBusClient<BasicRetryPolicy>;
type SharedSender = Arc<tokio::sync::Mutex<ServiceBusSender>>;

/// The client and how many times it was replaced: links of an older generation are not used.
struct Connection {
    client: Client,
    generation: u64,
}

/// How long opening the connection (TLS, SASL, the `$cbs` token) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long attaching a link to an entity may take.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a sent message may wait for Service Bus to accept it.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the receiver waits for a message before it serves waiting settle requests again.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// Pause after a failed receive before trying again.
const RECEIVE_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// How long closing a link or the connection may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The Service Bus transport. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct ServiceBusTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ServiceBusTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBusTransport").field("input_address", &self.inner.input_address).finish()
    }
}

/// State shared by the transport, its receiver task and the acknowledgement handles.
pub(crate) struct Inner {
    options: ServiceBusOptions,
    /// The client (its AMQP connection), replaced by a new one after a failure.
    client: tokio::sync::Mutex<Connection>,
    /// One sender per entity, by lower-cased entity path (Service Bus names ignore case).
    senders: tokio::sync::Mutex<HashMap<String, (SharedSender, u64)>>,
    input_address: String,
    connected: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    shutdown: watch::Sender<bool>,
    closed: AtomicBool,
}

/// What a failed Service Bus operation means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The entity does not exist.
    NotFound,
    /// The credential was refused.
    Unauthorized,
    /// Anything else: the connection, a timeout, a busy server.
    Other,
}

/// Reads what kind of failure an azservicebus error is. The client wraps the AMQP error
/// conditions (`amqp:not-found`, `amqp:unauthorized-access`) in its own types, which it does not
/// export, so their rendering is what can be inspected.
fn failure_of(error: &(impl std::fmt::Debug + std::fmt::Display)) -> Failure {
    let text = format!("{error:?} {error}").to_ascii_lowercase();
    if ["notfound", "not-found", "not found", "could not be found"].iter().any(|p| text.contains(p)) {
        Failure::NotFound
    } else if ["unauthorized", "sasl", "credential"].iter().any(|p| text.contains(p)) {
        Failure::Unauthorized
    } else {
        Failure::Other
    }
}

impl ServiceBusTransport {
    /// Connects to the namespace and checks that the entities the bridge needs exist. Nothing is
    /// received until [`Transport::start`].
    ///
    /// Fails with [`TransportError::Refused`] when an entity is missing or the credential is
    /// refused, and with [`TransportError::Unavailable`] when Service Bus does not answer.
    pub async fn connect(options: ServiceBusOptions) -> Result<Self, TransportError> {
        let client = new_client(&options).await?;
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            input_address: options.input_address(),
            options,
            client: tokio::sync::Mutex::new(Connection { client, generation: 0 }),
            senders: tokio::sync::Mutex::new(HashMap::new()),
            connected: AtomicBool::new(true),
            tasks: Mutex::new(Vec::new()),
            shutdown,
            closed: AtomicBool::new(false),
        });
        let transport = ServiceBusTransport { inner };
        if let Err(e) = transport.inner.check_entities().await {
            transport.close().await;
            return Err(e);
        }
        tracing::info!(
            namespace = %transport.inner.options.connection.namespace,
            queue = %transport.inner.options.queue(),
            plain_amqp = transport.inner.options.plain_amqp(),
            "connected to Azure Service Bus"
        );
        Ok(transport)
    }
}

#[async_trait]
impl Transport for ServiceBusTransport {
    async fn start(&self) -> Result<mpsc::Receiver<Delivery>, TransportError> {
        let prefetch = self.inner.options.prefetch;
        let queue = self.inner.options.queue();
        let link = self.inner.open_receiver(&queue, prefetch).await?;
        let capacity = usize::try_from(prefetch).unwrap_or(usize::MAX).max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let (settle_tx, settle_rx) = mpsc::channel(capacity.saturating_mul(2).max(16));
        let task = tokio::spawn(receive_loop(
            Arc::clone(&self.inner),
            link,
            tx,
            settle_tx,
            settle_rx,
            self.inner.shutdown.subscribe(),
        ));
        self.inner.tasks.lock().unwrap_or_else(PoisonError::into_inner).push(task);
        tracing::info!(queue = %queue, prefetch, "consuming");
        Ok(rx)
    }

    async fn send(&self, address: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        let entity = entity_of(address)?;
        self.inner.send_to(&entity, message::message_of(&message)).await
    }

    async fn publish(&self, message_type: MessageType, message: OutgoingMessage) -> Result<(), TransportError> {
        if !matches!(message_type, MessageType::ResourcesChangedEvent | MessageType::ResourcesChangedLightEvent) {
            return Err(TransportError::Refused(format!("{message_type} is not an event this bridge publishes")));
        }
        let topic = self.inner.options.topic(message_type);
        self.inner.send_to(&topic, message::message_of(&message)).await
    }

    fn input_address(&self) -> String {
        self.inner.input_address.clone()
    }

    fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = self.inner.shutdown.send(true);
        let tasks: Vec<JoinHandle<()>> =
            self.inner.tasks.lock().unwrap_or_else(PoisonError::into_inner).drain(..).collect();
        for task in tasks {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT * 2, task).await;
        }
        let senders: Vec<SharedSender> =
            self.inner.senders.lock().await.drain().map(|(_, (sender, _))| sender).collect();
        for sender in senders {
            if let Ok(sender) = Arc::try_unwrap(sender) {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, sender.into_inner().dispose()).await;
            }
        }
        // The client is disposed when the transport is dropped; closing its connection here
        // would make a later send fail with "disposed" instead of a clear error.
    }
}

/// Opens a client (one AMQP connection) to the namespace.
async fn new_client(options: &ServiceBusOptions) -> Result<Client, TransportError> {
    let client_options = ServiceBusClientOptions {
        retry_options: ServiceBusRetryOptions {
            max_retries: 3,
            try_timeout: Duration::from_secs(30),
            ..ServiceBusRetryOptions::default()
        },
        ..ServiceBusClientOptions::default()
    };
    let namespace = options.connection.namespace.clone();
    let default_port = if options.plain_amqp() { 5672 } else { 5671 };
    // azservicebus drops the port of a connection string's Endpoint; given as `host:port` to
    // the credential constructors it is kept (an emulator published on another port).
    let address = options.connection.port.filter(|p| *p != default_port).map(|port| format!("{namespace}:{port}"));
    let connecting = async {
        match (&address, &options.connection.credential, options.plain_amqp()) {
            (None, _, false) => {
                Client::new_from_connection_string(options.connection_string.as_str(), client_options).await
            }
            (None, _, true) => {
                Client::unsecured().new_from_connection_string(options.connection_string.as_str(), client_options).await
            }
            (Some(address), ServiceBusCredential::Key { name, key }, plain) => {
                let credential = AzureNamedKeyCredential::new(name, key);
                if plain {
                    Client::unsecured().new_from_named_key_credential(address, credential, client_options).await
                } else {
                    Client::new_from_named_key_credential(address, credential, client_options).await
                }
            }
            (Some(address), ServiceBusCredential::Signature(signature), plain) => {
                let credential = AzureSasCredential::new(signature);
                if plain {
                    Client::unsecured().new_from_sas_credential(address, credential, client_options).await
                } else {
                    Client::new_from_sas_credential(address, credential, client_options).await
                }
            }
        }
    };
    let port = address.as_ref().and(options.connection.port).unwrap_or(default_port);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => {
            let message = format!(
                "cannot connect to the Service Bus namespace {namespace} ({} on port {port}): {e}",
                if options.plain_amqp() { "plain AMQP" } else { "AMQP over TLS" }
            );
            Err(match failure_of(&e) {
                Failure::Unauthorized => TransportError::Refused(format!(
                    "{message}; check SharedAccessKeyName and SharedAccessKey in PubSub.MessageBroker.Host"
                )),
                _ => TransportError::Unavailable(message),
            })
        }
        Err(_) => Err(TransportError::Unavailable(format!(
            "the Service Bus namespace {namespace} did not answer within {}s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// The entity a reply address names: `sb://ns/[scope/]name[?type=topic]`, `queue:name` or
/// `topic:name`. The namespace in the address is not used: replies go through this connection, as
/// MassTransit sends through its own host.
pub fn entity_of(address: &str) -> Result<String, TransportError> {
    match Address::parse(address, TransportKind::ServiceBus) {
        Ok(Address::ServiceBus(a)) => Ok(a.entity_path()),
        Ok(other) => Err(TransportError::InvalidAddress {
            address: address.to_owned(),
            reason: format!("it is a {} address; this bridge runs on Azure Service Bus", other.kind()),
        }),
        Err(e) => Err(TransportError::InvalidAddress { address: address.to_owned(), reason: e.to_string() }),
    }
}

impl Inner {
    /// Attaches a peek-lock receiver to `queue`, and says on which client generation. With
    /// `prefetch` 0 no message is requested, which is how the start-up check looks at the queue
    /// without locking anything.
    async fn open_receiver(&self, queue: &str, prefetch: u32) -> Result<(ServiceBusReceiver, u64), TransportError> {
        let options = ServiceBusReceiverOptions {
            prefetch_count: prefetch,
            receive_mode: ServiceBusReceiveMode::PeekLock,
            ..ServiceBusReceiverOptions::default()
        };
        let mut connection = self.client.lock().await;
        let generation = connection.generation;
        let attach = contained(connection.client.create_receiver_for_queue(queue, options));
        match tokio::time::timeout(ATTACH_TIMEOUT, attach).await {
            Ok(Ok(Ok(receiver))) => Ok((receiver, generation)),
            Ok(Ok(Err(e))) if failure_of(&e) == Failure::NotFound => {
                Err(TransportError::Refused(self.missing_message(&[("queue", queue.to_owned())])))
            }
            Ok(Ok(Err(e))) if failure_of(&e) == Failure::Unauthorized => Err(TransportError::Refused(format!(
                "Service Bus refused access to queue `{queue}`: {e}; check SharedAccessKeyName and SharedAccessKey \
                 in PubSub.MessageBroker.Host"
            ))),
            Ok(Ok(Err(e))) => Err(TransportError::Unavailable(format!("cannot receive from queue `{queue}`: {e}"))),
            Ok(Err(panic)) => Err(TransportError::Unavailable(format!("cannot receive from queue `{queue}`: {panic}"))),
            Err(_) => Err(TransportError::Unavailable(format!(
                "attaching to queue `{queue}` took more than {}s",
                ATTACH_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Replaces the client of `generation` by a new one (a new connection), unless another task did
    /// already. Every sender is dropped; links of the old client are no longer used.
    async fn reconnect(&self, generation: u64) -> Result<(), TransportError> {
        let mut connection = self.client.lock().await;
        if connection.generation != generation {
            return Ok(());
        }
        let client = new_client(&self.options).await?;
        connection.client = client;
        connection.generation += 1;
        self.senders.lock().await.clear();
        tracing::info!(generation = connection.generation, "reconnected to Azure Service Bus");
        Ok(())
    }

    /// The sender for an entity, attached on first use, and its client generation.
    async fn sender(&self, entity: &str) -> Result<(SharedSender, u64), TransportError> {
        let key = entity.to_lowercase();
        let mut senders = self.senders.lock().await;
        if let Some((sender, generation)) = senders.get(&key) {
            return Ok((Arc::clone(sender), *generation));
        }
        let mut connection = self.client.lock().await;
        let generation = connection.generation;
        let attach = contained(connection.client.create_sender(entity, ServiceBusSenderOptions::default()));
        let sender = match tokio::time::timeout(ATTACH_TIMEOUT, attach).await {
            Ok(Ok(Ok(sender))) => Arc::new(tokio::sync::Mutex::new(sender)),
            Ok(Ok(Err(e))) => {
                return Err(match failure_of(&e) {
                    Failure::NotFound => {
                        TransportError::Refused(format!("the Service Bus entity `{entity}` does not exist"))
                    }
                    Failure::Unauthorized => {
                        TransportError::Refused(format!("Service Bus refused sending to `{entity}`: {e}"))
                    }
                    Failure::Other => TransportError::Unavailable(format!("cannot send to `{entity}`: {e}")),
                });
            }
            Ok(Err(panic)) => return Err(TransportError::Unavailable(format!("cannot send to `{entity}`: {panic}"))),
            Err(_) => {
                return Err(TransportError::Unavailable(format!(
                    "attaching to `{entity}` took more than {}s",
                    ATTACH_TIMEOUT.as_secs()
                )));
            }
        };
        senders.insert(key, (Arc::clone(&sender), generation));
        Ok((sender, generation))
    }

    /// Sends one message to an entity and waits until Service Bus accepted it. A failure other than
    /// a missing entity replaces the client (and so the connection) for the next attempt.
    async fn send_to(&self, entity: &str, message: ServiceBusMessage) -> Result<(), TransportError> {
        let (sender, generation) = match self.sender(entity).await {
            Ok(found) => found,
            Err(e @ TransportError::Unavailable(_)) => {
                let generation = self.client.lock().await.generation;
                self.replace_client(generation).await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let mut link = sender.lock().await;
        let outcome = tokio::time::timeout(SEND_TIMEOUT, contained(link.send_message(message))).await;
        drop(link);
        let error = match outcome {
            Ok(Ok(Ok(()))) => {
                self.connected.store(true, Ordering::Relaxed);
                return Ok(());
            }
            Ok(Ok(Err(e))) if failure_of(&e) == Failure::NotFound => {
                self.senders.lock().await.remove(&entity.to_lowercase());
                return Err(TransportError::Refused(format!("the Service Bus entity `{entity}` does not exist")));
            }
            Ok(Ok(Err(e))) => format!("Service Bus did not accept the message for `{entity}`: {e}"),
            Ok(Err(panic)) => format!("sending to `{entity}` failed: {panic}"),
            Err(_) => {
                format!("Service Bus did not accept the message for `{entity}` within {}s", SEND_TIMEOUT.as_secs())
            }
        };
        self.connected.store(false, Ordering::Relaxed);
        self.replace_client(generation).await;
        Err(TransportError::Unavailable(error))
    }

    /// [`Inner::reconnect`], logging a failure (the next operation tries again).
    async fn replace_client(&self, generation: u64) {
        if let Err(e) = self.reconnect(generation).await {
            tracing::warn!(error = %e, "reconnecting to Azure Service Bus failed; the next operation tries again");
        }
    }

    /// Checks at start that every entity the bridge uses exists, naming all missing ones.
    async fn check_entities(&self) -> Result<(), TransportError> {
        let options = &self.options;
        let mut missing: Vec<(&'static str, String)> = Vec::new();
        let queue = options.queue();
        match self.open_receiver(&queue, 0).await {
            Ok((receiver, _)) => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, contained(receiver.dispose())).await;
            }
            Err(TransportError::Refused(e)) if e.contains("lacks") => missing.push(("queue", queue)),
            Err(e) => return Err(e),
        }
        let mut wanted: Vec<(&'static str, String)> =
            options.command_topics().into_iter().map(|t| ("topic", t)).collect();
        wanted.extend(options.event_topics().into_iter().map(|t| ("topic", t)));
        if options.use_error_queues {
            wanted.push(("queue", options.error_queue()));
            wanted.push(("queue", options.skipped_queue()));
        }
        for (kind, entity) in wanted {
            match self.sender(&entity).await {
                Ok(_) => {}
                Err(TransportError::Refused(e)) if e.contains("does not exist") => missing.push((kind, entity)),
                Err(e) => return Err(e),
            }
        }
        if !missing.is_empty() {
            return Err(TransportError::Refused(self.missing_message(&missing)));
        }
        // The command topics' senders were only a check: the bridge never sends to them.
        let mut senders = self.senders.lock().await;
        for topic in options.command_topics() {
            if let Some((sender, _)) = senders.remove(&topic.to_lowercase())
                && let Ok(sender) = Arc::try_unwrap(sender)
            {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, sender.into_inner().dispose()).await;
            }
        }
        tracing::info!(
            subscription = %options.subscription(),
            queue = %options.queue(),
            topics = ?options.command_topics(),
            "the command topics' subscriptions must forward to the queue (not checked: Service Bus shows subscriptions only through its management API)"
        );
        Ok(())
    }

    /// The start-up error for missing entities, with how to create each.
    fn missing_message(&self, missing: &[(&str, String)]) -> String {
        let options = &self.options;
        let namespace = &options.connection.namespace;
        let short = namespace.split('.').next().unwrap_or(namespace);
        let names: Vec<String> = missing.iter().map(|(kind, name)| format!("{kind} `{name}`")).collect();
        let mut how: Vec<String> = Vec::new();
        for (kind, name) in missing {
            how.push(format!(
                "az servicebus {kind} create --resource-group <group> --namespace-name {short} --name '{name}'"
            ));
            if *kind == "topic" && options.command_topics().iter().any(|t| t.eq_ignore_ascii_case(name)) {
                how.push(format!(
                    "az servicebus topic subscription create --resource-group <group> --namespace-name {short} \
                     --topic-name '{name}' --name {} --forward-to {}",
                    options.subscription(),
                    options.queue()
                ));
            }
        }
        format!(
            "the Service Bus namespace {namespace} lacks {}; the bridge does not create Service Bus entities. \
             Create them in the Azure portal, with the Azure CLI ({}), or in the emulator's Config.json{}",
            names.join(", "),
            how.join("; "),
            if options.namespace_separator == "~" {
                ""
            } else {
                " (or check PubSub.MessageBroker.ServiceBus.NamespaceSeparator)"
            }
        )
    }
}

/// Receives commands and settles them, until shutdown. Settle requests are served between
/// receives, which wait at most [`POLL_WAIT`]; a message is only taken when the bridge's channel
/// has room, so a full channel never stops settlements (which free it).
///
/// When receiving fails (the connection is lost and azservicebus could not recover it), the
/// receiver is dropped and a new client and receiver are made, with a pause between attempts.
/// Messages received on the lost link can no longer be settled: their settle requests fail, and
/// Service Bus delivers them again when their locks expire.
async fn receive_loop(
    inner: Arc<Inner>,
    link: (ServiceBusReceiver, u64),
    tx: mpsc::Sender<Delivery>,
    settle_tx: mpsc::Sender<acker::Settle>,
    mut settle_rx: mpsc::Receiver<acker::Settle>,
    mut shutdown: watch::Receiver<bool>,
) {
    let queue = inner.options.queue();
    let (mut receiver, mut generation) = (Some(link.0), link.1);
    loop {
        let Some(current) = receiver.as_mut() else {
            // Answer what waits (it cannot be settled any more), then make a new receiver.
            while let Ok(request) = settle_rx.try_recv() {
                let _ = request.done.send(Err("the link that received the message was lost".into()));
            }
            tokio::select! {
                () = stopped(&mut shutdown) => break,
                () = tokio::time::sleep(RECEIVE_ERROR_PAUSE) => {}
            }
            inner.replace_client(generation).await;
            match inner.open_receiver(&queue, inner.options.prefetch).await {
                Ok((fresh, fresh_generation)) => {
                    receiver = Some(fresh);
                    generation = fresh_generation;
                    inner.connected.store(true, Ordering::Relaxed);
                    tracing::info!(queue = %queue, "receiving from Service Bus again");
                }
                Err(e) => tracing::warn!(error = %e, queue = %queue, "receiving from Service Bus is still failing"),
            }
            continue;
        };
        while let Ok(request) = settle_rx.try_recv() {
            settle(current, generation, request).await;
        }
        let permit = tokio::select! {
            biased;
            () = stopped(&mut shutdown) => break,
            Some(request) = settle_rx.recv() => {
                settle(current, generation, request).await;
                continue;
            }
            permit = tx.reserve() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let failure = match contained(current.receive_messages_with_max_wait_time(1, Some(POLL_WAIT))).await {
            Ok(Ok(mut messages)) => {
                inner.connected.store(true, Ordering::Relaxed);
                if let Some(received) = messages.pop() {
                    permit.send(acker::delivery(Arc::clone(&inner), received, generation, settle_tx.clone()));
                }
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(panic) => panic,
        };
        drop(permit);
        inner.connected.store(false, Ordering::Relaxed);
        tracing::warn!(error = %failure, queue = %queue, "receiving from Service Bus failed; reconnecting");
        // Dropped, not disposed: closing a broken link can itself hang or fail.
        receiver = None;
    }
    // Requests still queued were sent after the bridge stopped waiting for them; answer them so
    // that no handle waits forever (their messages are delivered again when their locks expire).
    settle_rx.close();
    while let Ok(request) = settle_rx.try_recv() {
        match receiver.as_mut() {
            Some(current) => settle(current, generation, request).await,
            None => {
                let _ = request.done.send(Err("the transport is closing".into()));
            }
        }
    }
    if let Some(receiver) = receiver {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, contained(receiver.dispose())).await;
    }
}

/// Settles one message on the receiver's link and answers the handle that asked. A message
/// received on an earlier link (before a reconnect) is not settled on this one.
async fn settle(receiver: &mut ServiceBusReceiver, generation: u64, request: acker::Settle) {
    if request.generation != generation {
        let _ = request.done.send(Err("the link that received the message was lost".into()));
        return;
    }
    let message = request.message;
    let outcome = match request.disposition {
        Disposition::Complete => contained(receiver.complete_message(message.as_ref())).await,
        Disposition::Abandon => contained(receiver.abandon_message(message.as_ref(), None)).await,
        Disposition::DeadLetter { reason, description } => {
            let options = DeadLetterOptions {
                dead_letter_reason: Some(reason),
                dead_letter_error_description: Some(description),
                properties_to_modify: None,
            };
            contained(receiver.dead_letter_message(message.as_ref(), options)).await
        }
    };
    let answer = match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(panic),
    };
    let _ = request.done.send(answer);
}

/// Runs an azservicebus operation, turning a panic inside it into an error. azservicebus 0.25
/// can panic while it recovers a lost connection (it polls a finished future again); the bridge
/// then replaces the client instead of losing the task that receives or sends.
async fn contained<T>(operation: impl std::future::Future<Output = T>) -> Result<T, String> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(operation).catch_unwind().await.map_err(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".to_owned());
        format!("the Service Bus client failed internally ({what})")
    })
}

/// Resolves once shutdown was asked for (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_addresses_name_the_entity() {
        assert_eq!(entity_of("sb://ns.servicebus.windows.net/replies").unwrap(), "replies");
        assert_eq!(
            entity_of("sb://ns/Firely.Server.Contracts.Messages.V1/Replies?type=topic").unwrap(),
            "Firely.Server.Contracts.Messages.V1/Replies"
        );
        assert_eq!(entity_of("sb://other-namespace/scope/q_bus_x?autodelete=300").unwrap(), "scope/q_bus_x");
        assert_eq!(entity_of("queue:replies").unwrap(), "replies");
        assert_eq!(entity_of("topic:events").unwrap(), "events");
        for wrong in ["rabbitmq://localhost/replies", "kafka://k:9092/replies", "sb://ns/", "nowhere"] {
            assert!(matches!(entity_of(wrong), Err(TransportError::InvalidAddress { .. })), "{wrong}");
        }
    }
}
