//! Kafka transport on rdkafka (librdkafka), following MassTransit's Kafka rider and Firely's topics
//! (wire spec §3, settings spec §5).
//!
//! This module owns the Kafka clients: `NumberOfConcurrentConsumers` consumers in group
//! `ClientGroupId` read `<TopicPrefix>.ExecuteStorePlanCommand` and `<TopicPrefix>.RetrievePlanCommand`;
//! one idempotent producer (`acks=all`) sends replies to `kafka://host:port/<topic>` addresses,
//! copies records that cannot be handled to the error topic, and publishes change events keyed
//! `ResourceType/id`.
//!
//! Delivery invariant (at least once): a record's offset is stored, and so committed, only when the
//! bridge acknowledged it, that is after its SQL commit and its reply's delivery report, **and**
//! every earlier record of its partition was acknowledged too ([`offsets`]). A crash, a broker
//! outage or a rebalance therefore only repeats records (the store's inbox answers a repeated
//! store plan without applying it twice); it never skips one.
//!
//! Order: a partition's records reach the bridge in offset order, and the bridge applies commands
//! that touch the same resource in arrival order; a record given back with `retry_later` is handed
//! to the bridge again after `retry_delay` without rewinding its partition.
//!
//! At start the topics the bridge needs must exist: missing ones are named with the command that
//! creates them, or created when `CreateTopics` is set. The passwords are never logged.

mod acker;
pub mod offsets;
mod options;
mod records;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::contracts::MessageType;
use crate::envelope::{Address, TransportKind};
use crate::transport::{Delivery, OutgoingMessage, Transport, TransportError};

pub use offsets::OffsetTracker;
pub use options::{KafkaOptions, KafkaTls, Sasl};

/// How long a metadata request (topic checks) may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the connection to the brokers is checked for [`Transport::is_connected`].
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// Pause after a consumer error before polling again.
const CONSUMER_ERROR_PAUSE: Duration = Duration::from_millis(500);

/// The commands the bridge consumes, one topic each.
const CONSUMED: [MessageType; 2] = [MessageType::ExecuteStorePlanCommand, MessageType::RetrievePlanCommand];

/// The Kafka transport. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport").field("input_address", &self.inner.input_address).finish()
    }
}

/// State shared by the transport, its consumer tasks and the acknowledgement handles.
pub(crate) struct Inner {
    options: KafkaOptions,
    /// The idempotent producer; replaced when librdkafka declares it fatally failed.
    producer: RwLock<FutureProducer<BrokerContext>>,
    input_address: String,
    /// Whether the last check reached a broker.
    connected: Arc<AtomicBool>,
    /// What librdkafka last reported about a failed connection (refused, TLS, SASL).
    last_failure: Arc<Mutex<Option<String>>>,
    /// Topics known to exist (reply topics are checked once before the first send).
    known_topics: Mutex<HashSet<String>>,
    consumers: Mutex<Vec<Arc<CommandConsumer>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    shutdown: watch::Sender<bool>,
    closed: AtomicBool,
}

/// One consumer of the command topics, with the offsets it has handed out.
pub(crate) type CommandConsumer = StreamConsumer<ConsumerState>;

/// Client context: turns "all brokers down" into `is_connected() == false`, keeps the last
/// connection or authentication failure for the error at start, and logs them.
pub(crate) struct BrokerContext {
    connected: Arc<AtomicBool>,
    last_failure: Arc<Mutex<Option<String>>>,
}

impl ClientContext for BrokerContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.connected.store(false, Ordering::Relaxed);
        } else {
            *self.last_failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.to_owned());
        }
        tracing::warn!(error = %error, reason, "Kafka client error");
    }
}

/// Consumer context: forgets revoked partitions' in-flight offsets (their next owner consumes them
/// again from the last committed offset).
pub(crate) struct ConsumerState {
    broker: BrokerContext,
    tracker: Arc<OffsetTracker>,
}

impl ClientContext for ConsumerState {
    fn error(&self, error: KafkaError, reason: &str) {
        self.broker.error(error, reason);
    }
}

impl ConsumerContext for ConsumerState {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let partitions: Vec<offsets::Partition> =
                    list.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
                tracing::info!(partitions = ?partitions, "Kafka partitions revoked");
                self.tracker.revoke(&partitions);
            }
            Rebalance::Assign(list) => {
                let partitions: Vec<(String, i32)> =
                    list.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
                tracing::info!(partitions = ?partitions, "Kafka partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "Kafka rebalance failed"),
        }
    }
}

impl KafkaTransport {
    /// Creates the producer and checks that the topics the bridge needs exist (creating them when
    /// `create_topics` is set). Nothing is consumed until [`Transport::start`].
    ///
    /// Fails with [`TransportError::Refused`] when a topic is missing or the configuration is
    /// refused by librdkafka (a wrong security setting, an unreadable keystore), and with
    /// [`TransportError::Unavailable`] when no broker answers.
    pub async fn connect(options: KafkaOptions) -> Result<Self, TransportError> {
        let connected = Arc::new(AtomicBool::new(false));
        let last_failure = Arc::new(Mutex::new(None));
        let context = BrokerContext { connected: connected.clone(), last_failure: last_failure.clone() };
        let producer = new_producer(&options, context)?;
        let input_address = format!(
            "kafka://{}/{}",
            options.bootstrap_servers.split(',').next().unwrap_or_default().trim(),
            options.topic_prefix
        );
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            options,
            producer: RwLock::new(producer),
            input_address,
            connected,
            last_failure,
            known_topics: Mutex::new(HashSet::new()),
            consumers: Mutex::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
            shutdown,
            closed: AtomicBool::new(false),
        });
        inner.ensure_topics().await?;
        inner.connected.store(true, Ordering::Relaxed);
        tracing::info!(
            bootstrap = %inner.options.bootstrap_servers,
            group = %inner.options.group_id,
            security = ?inner.options.sasl,
            tls = inner.options.tls.is_some(),
            "connected to Kafka"
        );
        let health = tokio::spawn(watch_health(Arc::downgrade(&inner), inner.shutdown.subscribe()));
        inner.tasks.lock().unwrap_or_else(PoisonError::into_inner).push(health);
        Ok(KafkaTransport { inner })
    }

    /// The settings this transport was built with.
    pub fn options(&self) -> &KafkaOptions {
        &self.inner.options
    }

    /// The partitions each of this process's consumers owns now (for status pages and tests).
    pub fn assignments(&self) -> Vec<Vec<(String, i32)>> {
        let consumers = self.inner.consumers.lock().unwrap_or_else(PoisonError::into_inner);
        consumers
            .iter()
            .map(|c| {
                c.assignment()
                    .map(|list| list.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect())
                    .unwrap_or_default()
            })
            .collect()
    }
}

#[async_trait]
impl Transport for KafkaTransport {
    async fn start(&self) -> Result<mpsc::Receiver<Delivery>, TransportError> {
        if !self.inner.consumers.lock().unwrap_or_else(PoisonError::into_inner).is_empty() {
            return Err(TransportError::Refused("the transport is already consuming".to_owned()));
        }
        let (tx, rx) = mpsc::channel(self.inner.options.prefetch.max(1));
        let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<Delivery>();
        let topics: Vec<String> = CONSUMED.iter().map(|t| self.inner.options.command_topic(*t)).collect();
        let topic_names: Vec<&str> = topics.iter().map(String::as_str).collect();
        for index in 0..self.inner.options.consumers.max(1) {
            let tracker = Arc::new(OffsetTracker::default());
            let context = ConsumerState { broker: self.inner.broker_context(), tracker: tracker.clone() };
            let consumer: CommandConsumer = self
                .inner
                .options
                .consumer_config()
                .create_with_context(context)
                .map_err(|e| config_error("consumer", &e))?;
            consumer
                .subscribe(&topic_names)
                .map_err(|e| TransportError::Refused(format!("subscribing to {topics:?} failed: {e}")))?;
            let consumer = Arc::new(consumer);
            self.inner.consumers.lock().unwrap_or_else(PoisonError::into_inner).push(consumer.clone());
            let task = tokio::spawn(consume(
                index,
                Arc::clone(&self.inner),
                consumer,
                tracker,
                tx.clone(),
                retry_tx.clone(),
                self.inner.shutdown.subscribe(),
            ));
            self.inner.tasks.lock().unwrap_or_else(PoisonError::into_inner).push(task);
        }
        // Records given back for a later attempt re-enter the same channel, behind what is queued.
        // (Deliveries waiting here hold senders of this very channel: stop on shutdown, not on close.)
        let mut shutdown = self.inner.shutdown.subscribe();
        let retries = tokio::spawn(async move {
            loop {
                let delivery = tokio::select! {
                    () = stopped(&mut shutdown) => break,
                    delivery = retry_rx.recv() => match delivery { Some(d) => d, None => break },
                };
                if tx.send(delivery).await.is_err() {
                    break;
                }
            }
        });
        self.inner.tasks.lock().unwrap_or_else(PoisonError::into_inner).push(retries);
        tracing::info!(topics = ?topics, consumers = self.inner.options.consumers, "consuming");
        Ok(rx)
    }

    async fn send(&self, address: &str, message: OutgoingMessage) -> Result<(), TransportError> {
        let topic = match Address::parse(address, TransportKind::Kafka) {
            Ok(Address::Kafka(a)) => a.topic,
            Ok(other) => {
                return Err(TransportError::InvalidAddress {
                    address: address.to_owned(),
                    reason: format!("it is a {} address; this bridge runs on Kafka", other.kind()),
                });
            }
            Err(e) => {
                return Err(TransportError::InvalidAddress { address: address.to_owned(), reason: e.to_string() });
            }
        };
        self.inner.check_topic(&topic).await?;
        let record = records::record_of(&message, address);
        self.inner.produce(&topic, record.key.as_deref(), &record.value, record.owned_headers()).await
    }

    async fn publish(&self, message_type: MessageType, message: OutgoingMessage) -> Result<(), TransportError> {
        let Some(topic) = self.inner.options.event_topic(message_type) else {
            return Err(TransportError::Refused(format!("{message_type} is not an event this bridge publishes")));
        };
        let destination = format!("kafka://{}/{topic}", self.inner.first_bootstrap());
        let record = records::record_of(&message, &destination);
        self.inner.produce(topic, record.key.as_deref(), &record.value, record.owned_headers()).await
    }

    fn events_keyed_by_resource(&self) -> bool {
        true
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
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let consumers: Vec<Arc<CommandConsumer>> =
            self.inner.consumers.lock().unwrap_or_else(PoisonError::into_inner).drain(..).collect();
        let inner = Arc::clone(&self.inner);
        // Committing the stored offsets and flushing the producer block: off the async threads.
        let _ = tokio::task::spawn_blocking(move || {
            for consumer in consumers {
                match consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
                    Ok(()) => {}
                    // Nothing stored since the last commit.
                    Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {
                        tracing::debug!("no new offsets to commit at close")
                    }
                    // The next consumer of the partition reads those records again; the inbox
                    // answers them without applying them twice.
                    Err(e) => tracing::warn!(error = %e, "offsets not committed at close"),
                }
                drop(consumer);
            }
            if let Err(e) = inner.producer().flush(Timeout::After(inner.options.delivery_timeout)) {
                tracing::warn!(error = %e, "records still unconfirmed at close");
            }
        })
        .await;
    }
}

impl Inner {
    fn broker_context(&self) -> BrokerContext {
        BrokerContext { connected: self.connected.clone(), last_failure: self.last_failure.clone() }
    }

    fn first_bootstrap(&self) -> &str {
        self.options.bootstrap_servers.split(',').next().unwrap_or_default().trim()
    }

    /// The message type of a command topic.
    fn type_of_topic(&self, topic: &str) -> Option<MessageType> {
        CONSUMED.into_iter().find(|t| self.options.command_topic(*t) == topic)
    }

    /// Produces one record and waits for its delivery report (`acks=all`).
    async fn produce(
        &self,
        topic: &str,
        key: Option<&str>,
        value: &[u8],
        headers: OwnedHeaders,
    ) -> Result<(), TransportError> {
        let mut record = FutureRecord::<str, [u8]>::to(topic).payload(value).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        let producer = self.producer();
        match producer.send(record, Timeout::After(self.options.delivery_timeout)).await {
            Ok(_) => {
                self.connected.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err((error, _)) => {
                if let Some((code, reason)) = producer.client().fatal_error() {
                    self.replace_producer(&producer, code, &reason);
                }
                Err(produce_error(topic, &error))
            }
        }
    }

    fn producer(&self) -> FutureProducer<BrokerContext> {
        self.producer.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// An idempotent producer that failed fatally (a broker that lost its producer state, say after
    /// a restart with empty storage) refuses every record from then on: start a new one. Records it
    /// did not deliver failed, so their commands are handled again.
    fn replace_producer(&self, failed: &FutureProducer<BrokerContext>, code: RDKafkaErrorCode, reason: &str) {
        let mut current = self.producer.write().unwrap_or_else(PoisonError::into_inner);
        if !std::ptr::eq(failed.client(), current.client()) {
            return; // another send replaced it already
        }
        match new_producer(&self.options, self.broker_context()) {
            Ok(fresh) => {
                tracing::warn!(error = %code, reason, "the Kafka producer failed fatally; replaced by a new one");
                *current = fresh;
            }
            Err(e) => tracing::warn!(error = %e, "the Kafka producer failed fatally and cannot be replaced"),
        }
    }

    /// Refuses a send to a topic that does not exist, at once rather than after librdkafka's
    /// metadata timeout. Known topics are remembered.
    async fn check_topic(&self, topic: &str) -> Result<(), TransportError> {
        if self.known_topics.lock().unwrap_or_else(PoisonError::into_inner).contains(topic) {
            return Ok(());
        }
        let missing = self.missing_topics(&[topic.to_owned()]).await?;
        if missing.is_empty() {
            self.known_topics.lock().unwrap_or_else(PoisonError::into_inner).insert(topic.to_owned());
            Ok(())
        } else {
            Err(TransportError::Refused(format!("Kafka topic `{topic}` does not exist")))
        }
    }

    /// The topics of `wanted` the cluster does not have.
    async fn missing_topics(&self, wanted: &[String]) -> Result<Vec<String>, TransportError> {
        let producer = self.producer();
        // fetch_metadata blocks (at most METADATA_TIMEOUT): off the async threads.
        let existing = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, METADATA_TIMEOUT).map(|metadata| {
                metadata
                    .topics()
                    .iter()
                    .filter(|t| t.error().is_none())
                    .map(|t| t.name().to_owned())
                    .collect::<HashSet<String>>()
            })
        })
        .await
        .map_err(|e| TransportError::Unavailable(format!("reading the Kafka topics failed: {e}")))?
        .map_err(|e| {
            let failure = self.last_failure.lock().unwrap_or_else(PoisonError::into_inner).clone();
            let detail = failure.map(|f| format!(" (last failure: {f})")).unwrap_or_default();
            let message = format!(
                "cannot read the topics of the Kafka cluster at {}: {e}{detail}",
                self.options.bootstrap_servers
            );
            // Credentials and TLS settings do not fix themselves: say so rather than "try later".
            const SETTINGS_FAILURES: [&str; 3] = ["SASL authentication", "SSL handshake", "SSL alert"];
            if SETTINGS_FAILURES.iter().any(|f| detail.contains(f)) {
                TransportError::Refused(message)
            } else {
                TransportError::Unavailable(message)
            }
        })?;
        Ok(wanted.iter().filter(|t| !existing.contains(t.as_str())).cloned().collect())
    }

    /// Checks the required topics at start, creating missing ones when allowed.
    async fn ensure_topics(&self) -> Result<(), TransportError> {
        let required = self.options.required_topics();
        let mut missing = self.missing_topics(&required).await?;
        if let (false, Some(partitions)) = (missing.is_empty(), self.options.create_topics) {
            self.create_topics(&missing, partitions).await?;
            missing = self.missing_topics(&required).await?;
        }
        if !missing.is_empty() {
            let bootstrap = self.first_bootstrap();
            let commands: Vec<String> = missing
                .iter()
                .map(|t| format!("kafka-topics.sh --bootstrap-server {bootstrap} --create --topic {t}"))
                .collect();
            return Err(TransportError::Refused(format!(
                "the Kafka topic{} {} do{} not exist; create {} ({}), or set PubSub.MessageBroker.Kafka.CreateTopics \
                 to true to let the bridge create {}",
                if missing.len() == 1 { "" } else { "s" },
                missing.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", "),
                if missing.len() == 1 { "es" } else { "" },
                if missing.len() == 1 { "it" } else { "them" },
                commands.join("; "),
                if missing.len() == 1 { "it" } else { "them" },
            )));
        }
        self.known_topics.lock().unwrap_or_else(PoisonError::into_inner).extend(required);
        Ok(())
    }

    async fn create_topics(&self, topics: &[String], partitions: u32) -> Result<(), TransportError> {
        let admin: AdminClient<_> = self.options.client_config().create().map_err(|e| config_error("admin", &e))?;
        let partitions = i32::try_from(partitions).unwrap_or(i32::MAX);
        let new: Vec<NewTopic<'_>> =
            topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1))).collect();
        let results =
            admin.create_topics(&new, &AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT))).await.map_err(
                |e| TransportError::Unavailable(format!("creating the Kafka topics {topics:?} failed: {e}")),
            )?;
        for result in results {
            match result {
                Ok(topic) => tracing::info!(topic, partitions, "created Kafka topic"),
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => tracing::debug!(topic, "topic exists already"),
                Err((topic, code)) => {
                    return Err(TransportError::Refused(format!("creating the Kafka topic `{topic}` failed: {code}")));
                }
            }
        }
        Ok(())
    }
}

/// Reads one consumer's records and hands them to the bridge, in order, until shutdown.
async fn consume(
    index: usize,
    inner: Arc<Inner>,
    consumer: Arc<CommandConsumer>,
    tracker: Arc<OffsetTracker>,
    tx: mpsc::Sender<Delivery>,
    retries: mpsc::UnboundedSender<Delivery>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let message = tokio::select! {
            biased;
            () = stopped(&mut shutdown) => break,
            message = consumer.recv() => message.map(|m| records::Received::of(&m)),
        };
        let received = match message {
            Ok(received) => received,
            Err(e) => {
                tracing::warn!(consumer = index, error = %e, "Kafka consumer error");
                tokio::time::sleep(CONSUMER_ERROR_PAUSE).await;
                continue;
            }
        };
        inner.connected.store(true, Ordering::Relaxed);
        let partition = (received.topic.clone(), received.partition);
        let generation = tracker.register(&partition, received.offset);
        let delivery = acker::delivery(
            Arc::new(received),
            acker::Handle {
                inner: Arc::clone(&inner),
                consumer: Arc::clone(&consumer),
                tracker: Arc::clone(&tracker),
                generation,
                retries: retries.clone(),
            },
            false,
        );
        if tx.send(delivery).await.is_err() {
            break;
        }
    }
}

/// Resolves once shutdown was asked for (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Checks now and then that a broker answers, for `is_connected`.
async fn watch_health(inner: std::sync::Weak<Inner>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            () = stopped(&mut shutdown) => return,
        }
        let Some(inner) = inner.upgrade() else { return };
        let producer = inner.producer();
        let client_ok =
            tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, Duration::from_secs(3)).is_ok())
                .await
                .unwrap_or(false);
        inner.connected.store(client_ok, Ordering::Relaxed);
    }
}

fn new_producer(
    options: &KafkaOptions,
    context: BrokerContext,
) -> Result<FutureProducer<BrokerContext>, TransportError> {
    options.producer_config().create_with_context(context).map_err(|e| config_error("producer", &e))
}

fn config_error(client: &str, error: &KafkaError) -> TransportError {
    TransportError::Refused(format!("the Kafka {client} cannot be created with these settings: {error}"))
}

/// A failed produce: refused for what trying again cannot fix, unavailable otherwise.
fn produce_error(topic: &str, error: &KafkaError) -> TransportError {
    use RDKafkaErrorCode as Code;
    match error.rdkafka_error_code() {
        Some(
            Code::UnknownTopicOrPartition
            | Code::UnknownTopic
            | Code::TopicAuthorizationFailed
            | Code::MessageSizeTooLarge
            | Code::InvalidTopic
            | Code::InvalidMessageSize,
        ) => TransportError::Refused(format!("Kafka refused the record for `{topic}`: {error}")),
        _ => TransportError::Unavailable(format!("the record for `{topic}` was not confirmed: {error}")),
    }
}
