//! A Service Bus **test double**: a small AMQP 1.0 broker that speaks enough of Azure Service Bus's
//! protocol for the `azservicebus` client and the bridge's tests. It is not Microsoft's service nor
//! its emulator (neither runs here); its behaviour follows Service Bus's documented semantics.
//!
//! What it does: SASL ANONYMOUS plus `$cbs` put-token with the namespace's shared access key (a
//! wrong key or an expired token is refused with 401); queues; topics whose subscriptions keep
//! messages or forward them (ForwardTo) to a queue or topic; peek-lock receive with lock tokens,
//! lock duration, renew-lock, complete / abandon / dead-letter / release, delivery count, max
//! delivery count → dead-letter sub-queue (`<entity>/$DeadLetterQueue`, readable and settleable);
//! receive-and-delete; time to live (dropped or dead-lettered when expired); batches sent in
//! Microsoft's batch format; peek. Names are case-insensitive.
//!
//! What it does not do (its limits): sessions (SessionId is carried, but there are no session
//! receivers or session locks), transactions, scheduled and deferred messages (a deferral counts as
//! an abandon), duplicate detection, subscription rules/filters (every subscription gets every
//! message), auto-forwarding to a dead-letter queue, message size and quota limits, TLS, the HTTPS
//! management (ATOM) API, partitioning, and Service Bus's error for settling after the lock expired
//! (such a settlement is ignored). A receiver link that has no credit keeps the next message
//! reserved for itself (unlocked, uncounted) until it asks for it or detaches, so two receivers of
//! one queue do not share fairly. Its state is in memory.
//!
//! It listens on `127.0.0.N:5672` (N ≥ 2, the first free), because `azservicebus` drops the port of
//! a connection string's endpoint. When port 5672 is taken on every such address (a broker bound
//! to all interfaces), it falls back to a free port, and `connection_string()` then carries it:
//! clients must pass `host:port` themselves (`namespace_address()`), e.g. through
//! `ServiceBusClient::with_custom_retry_policy().unsecured().new_from_named_key_credential`.
//!
//! It settles each message a client sends after 30 ms (`SETTLE_DELAY` in `server.rs`), standing in
//! for a network round trip that the client's AMQP stack relies on without knowing it.
//!
//! The broker runs on a runtime of its own (one worker thread), so that it keeps serving whatever
//! the test's runtime does, and stops when the handle is dropped.
#![allow(dead_code)]

mod sas;
mod server;
mod store;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub use store::QueueOptions;
use store::{Namespace, SubQueue};
use tokio::sync::watch;

/// The name of the namespace key in the connection string (Service Bus's default rule).
pub const KEY_NAME: &str = "RootManageSharedAccessKey";

/// A Service Bus *test double*: a small AMQP 1.0 broker, not Microsoft's service.
pub struct TestServiceBus {
    broker: Arc<server::Broker>,
    host: Ipv4Addr,
    port: u16,
    stop: watch::Sender<bool>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// A message as the broker holds it (a snapshot: taking it consumes nothing).
#[derive(Clone, Debug, PartialEq)]
pub struct BrokerMessage {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub session_id: Option<String>,
    pub reply_to_session_id: Option<String>,
    pub reply_to: Option<String>,
    pub to: Option<String>,
    pub partition_key: Option<String>,
    pub subject: Option<String>,
    pub time_to_live: Option<Duration>,
    /// Application properties in the order sent (Timestamp → milliseconds since the epoch, Uuid →
    /// its hyphenated text, Binary → an array of bytes); the dead-letter reason and description are
    /// not repeated here.
    pub application_properties: Vec<(String, serde_json::Value)>,
    /// Service Bus's DeliveryCount: how many times the message was handed to a receiver.
    pub delivery_count: u32,
    pub sequence_number: i64,
    /// Whether a receiver holds a peek-lock on it now.
    pub locked: bool,
    pub dead_letter_reason: Option<String>,
    pub dead_letter_description: Option<String>,
}

impl BrokerMessage {
    pub fn application_property(&self, name: &str) -> Option<&serde_json::Value> {
        self.application_properties.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

impl TestServiceBus {
    /// Starts on a free loopback address 127.0.0.N:5672 (N >= 2), because azservicebus ignores a
    /// connection string's port (see the module documentation for the fallback).
    pub async fn start() -> TestServiceBus {
        Self::start_sync()
    }

    /// `start` for code outside an async context.
    pub fn start_sync() -> TestServiceBus {
        let (listener, host, port) = bind();
        listener.set_nonblocking(true).expect("non-blocking listener");
        let key = random_key();
        let broker = Arc::new(server::Broker {
            namespace: Mutex::new(Namespace::default()),
            key_name: KEY_NAME.to_string(),
            key,
            sockets: Mutex::new(Default::default()),
            next_connection: Default::default(),
            refusing: AtomicBool::new(false),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("servicebus-test-double")
            .enable_all()
            .build()
            .expect("the test double's runtime");
        let (stop, stopped) = watch::channel(false);
        runtime.spawn(server::serve(listener, broker.clone(), stopped));
        TestServiceBus { broker, host, port, stop, runtime: Some(runtime) }
    }

    /// `Endpoint=sb://127.0.0.N/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=<random>`
    /// (`sb://127.0.0.N:PORT/` when the fallback port is in use).
    pub fn connection_string(&self) -> String {
        format!(
            "Endpoint=sb://{}/;SharedAccessKeyName={};SharedAccessKey={}",
            self.namespace_address(),
            KEY_NAME,
            self.broker.key
        )
    }

    /// "127.0.0.N"
    pub fn namespace_host(&self) -> String {
        self.host.to_string()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// "127.0.0.N" on port 5672, else "127.0.0.N:PORT": what to give a client as the namespace.
    pub fn namespace_address(&self) -> String {
        if self.port == 5672 { self.host.to_string() } else { format!("{}:{}", self.host, self.port) }
    }

    pub fn key_name(&self) -> &str {
        &self.broker.key_name
    }

    pub fn key(&self) -> &str {
        &self.broker.key
    }

    /// Creates a queue with Service Bus's defaults (lock 1 minute, max delivery count 10);
    /// names are case-insensitive, as in Service Bus. Creating an existing queue does nothing.
    pub fn create_queue(&self, name: &str) {
        self.create_queue_with(name, QueueOptions::default());
    }

    pub fn create_queue_with(&self, name: &str, options: QueueOptions) {
        self.namespace().create_queue(name, options);
    }

    pub fn create_topic(&self, name: &str) {
        self.namespace().create_topic(name);
    }

    /// A subscription on `topic`; with `forward_to`, what it receives goes on to that queue or
    /// topic (which must exist already, as in Service Bus).
    pub fn create_subscription(&self, topic: &str, name: &str, forward_to: Option<&str>) {
        self.create_subscription_with(topic, name, forward_to, QueueOptions::default());
    }

    pub fn create_subscription_with(&self, topic: &str, name: &str, forward_to: Option<&str>, options: QueueOptions) {
        self.namespace().create_subscription(topic, name, forward_to, options);
    }

    /// Whether a queue, topic or subscription (`topic/Subscriptions/name`) exists.
    pub fn entity_exists(&self, name: &str) -> bool {
        self.namespace().resolve(name).is_some()
    }

    /// The active messages of a queue or subscription (`topic/Subscriptions/name`), locked ones
    /// included; a snapshot, nothing is consumed.
    pub fn active_messages(&self, queue: &str) -> Vec<BrokerMessage> {
        self.namespace().snapshot(queue, SubQueue::Active, SystemTime::now())
    }

    /// The messages of the dead-letter sub-queue of a queue or subscription.
    pub fn dead_letters(&self, queue: &str) -> Vec<BrokerMessage> {
        self.namespace().snapshot(queue, SubQueue::DeadLetter, SystemTime::now())
    }

    /// Waits until the queue holds at least `count` active messages, and returns them; panics
    /// after `timeout` (a bound for a hung test, not a measurement).
    pub async fn wait_for_active(&self, queue: &str, count: usize, timeout: Duration) -> Vec<BrokerMessage> {
        self.wait_for(queue, SubQueue::Active, count, timeout).await
    }

    /// Waits until the dead-letter sub-queue holds at least `count` messages, and returns them.
    pub async fn wait_for_dead_letters(&self, queue: &str, count: usize, timeout: Duration) -> Vec<BrokerMessage> {
        self.wait_for(queue, SubQueue::DeadLetter, count, timeout).await
    }

    async fn wait_for(&self, queue: &str, sub_queue: SubQueue, count: usize, timeout: Duration) -> Vec<BrokerMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.namespace().snapshot(queue, sub_queue, SystemTime::now());
            if messages.len() >= count {
                return messages;
            }
            assert!(
                Instant::now() < deadline,
                "{queue} ({sub_queue:?}) has {} messages after {timeout:?}, expected {count}",
                messages.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many client connections are open now.
    pub fn connection_count(&self) -> usize {
        self.broker.sockets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Cuts every client connection at once (the state stays): what clients see of a broker
    /// restart. Locks held by the cut connections run out after their lock duration, as in
    /// Service Bus.
    pub fn drop_connections(&self) {
        self.broker.cut_connections();
    }

    /// An outage: while `down` is true, every connection is cut and new ones are closed as soon
    /// as they open (clients' reconnection attempts fail); `false` ends it. The state is kept.
    pub fn set_down(&self, down: bool) {
        self.broker.refusing.store(down, Ordering::SeqCst);
        if down {
            self.broker.cut_connections();
        }
    }

    /// Puts a message whose body is an AMQP *value* (a string) rather than Data sections, as some
    /// AMQP clients send, into a queue or topic; `azservicebus` itself only sends Data bodies.
    pub fn enqueue_amqp_value(&self, entity: &str, value: &str, message_id: Option<&str>) {
        use fe2o3_amqp::types::messaging::{AmqpValue, Body, Message, MessageId, Properties};
        use fe2o3_amqp::types::primitives::Value;
        let properties =
            Properties { message_id: message_id.map(|id| MessageId::String(id.to_string())), ..Default::default() };
        let message = Message::builder()
            .properties(properties)
            .body(Body::Value(AmqpValue(Value::String(value.to_string()))))
            .build();
        if let Err(error) = self.namespace().enqueue(entity, message) {
            panic!("cannot enqueue into {entity}: {error:?}");
        }
    }

    /// `drop_connections`, and every lock released at once (each counted as a delivery).
    pub fn restart(&self) {
        self.broker.cut_connections();
        self.namespace().release_all_locks(SystemTime::now());
    }

    /// Stops listening and cuts every connection.
    pub async fn stop(self) {
        drop(self);
    }

    fn namespace(&self) -> std::sync::MutexGuard<'_, Namespace> {
        self.broker.namespace.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for TestServiceBus {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.broker.cut_connections();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The first 127.0.0.N:5672 (N ≥ 2) free to bind, else a free port on the first bindable address.
fn bind() -> (TcpListener, Ipv4Addr, u16) {
    for n in 2..=254u8 {
        let host = Ipv4Addr::new(127, 0, 0, n);
        if let Ok(listener) = TcpListener::bind(SocketAddrV4::new(host, 5672)) {
            return (listener, host, 5672);
        }
    }
    for n in 2..=254u8 {
        let host = Ipv4Addr::new(127, 0, 0, n);
        if let Ok(listener) = TcpListener::bind(SocketAddrV4::new(host, 0)) {
            let port = listener.local_addr().expect("bound address").port();
            return (listener, host, port);
        }
    }
    panic!("no loopback address 127.0.0.2-254 can be bound for the Service Bus test double");
}

fn random_key() -> String {
    use base64::Engine;
    let bytes: Vec<u8> =
        uuid::Uuid::new_v4().as_bytes().iter().chain(uuid::Uuid::new_v4().as_bytes()).copied().collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
