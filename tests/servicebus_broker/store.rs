//! The test double's namespace: queues, topics and subscriptions in memory, and the messages in
//! them with their peek-locks, delivery counts and dead-letter sub-queues.
//!
//! Everything here is synchronous and lives behind one mutex (`Broker::namespace`); the AMQP side
//! (`server.rs`) only calls in and out. Invariants kept:
//! - entity names are case-insensitive (keys are lower-cased, the display name is kept);
//! - a message is in exactly one sub-queue (active or dead-letter) of one entity, in sequence order;
//! - a locked message is not handed out again until its lock is settled, released or expired;
//! - `delivery_count` counts deliveries (Service Bus's DeliveryCount: 1 on the first delivery); an
//!   abandon or an expired lock at `max_delivery_count` moves the message to the dead-letter
//!   sub-queue with reason `MaxDeliveryCountExceeded`, as Service Bus does.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, DeliveryAnnotations, Header, Message, MessageAnnotations, MessageId,
};
use fe2o3_amqp::types::primitives::{SimpleValue, Timestamp, Uuid, Value};
use tokio::sync::Notify;

/// A message as the AMQP layer carries it: any body section, any value type.
pub type AmqpMessage = Message<Body<Value>>;

/// Settings of a queue or subscription (Service Bus's defaults unless set).
#[derive(Clone, Debug)]
pub struct QueueOptions {
    /// How long a peek-lock holds a message before it is handed out again (Service Bus: 1 minute).
    pub lock_duration: Duration,
    /// Deliveries after which an abandoned or lock-expired message is dead-lettered (Service Bus: 10).
    pub max_delivery_count: u32,
    /// Whether a message whose time to live ran out goes to the dead-letter sub-queue (else it is dropped).
    pub dead_letter_on_expiration: bool,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            lock_duration: Duration::from_secs(60),
            max_delivery_count: 10,
            dead_letter_on_expiration: false,
        }
    }
}

/// How a receiver settled a locked message.
#[derive(Debug, Clone)]
pub enum Settlement {
    /// `accepted`: the message is removed.
    Complete,
    /// `modified`: the lock is released, the delivery counted.
    Abandon,
    /// `released`: the lock is released, the delivery not counted (it never reached the application).
    Release,
    /// `rejected`: moved to the dead-letter sub-queue with the reason and description given.
    DeadLetter { reason: Option<String>, description: Option<String> },
}

/// Which sub-queue of an entity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubQueue {
    Active,
    DeadLetter,
}

/// A receivable (or sendable) node of the namespace, by lower-cased key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Entity {
    Queue(String),
    Topic(String),
    Subscription(String, String),
}

/// An address a client attaches to, resolved against the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub entity: Entity,
    pub sub_queue: SubQueue,
    /// `<entity>/$management`: the request/response node of the entity.
    pub management: bool,
}

/// A message handed to a receiver link. `until` is `None` while the link holds it waiting for the
/// client's credit (reserved: not yet sent, not counted, no lock clock running).
#[derive(Debug)]
struct Lock {
    token: [u8; 16],
    until: Option<SystemTime>,
}

impl Lock {
    fn expired(&self, now: SystemTime) -> bool {
        self.until.is_some_and(|until| until <= now)
    }
}

#[derive(Debug)]
struct Stored {
    message: AmqpMessage,
    sequence_number: i64,
    enqueued_at: SystemTime,
    delivery_count: u32,
    lock: Option<Lock>,
    dead_letter_source: Option<String>,
}

impl Stored {
    fn expires_at(&self) -> Option<SystemTime> {
        let ttl = self.message.header.as_ref().and_then(|h| h.ttl)?;
        Some(self.enqueued_at + Duration::from_millis(u64::from(ttl)))
    }
}

/// One sub-queue: messages in sequence order, and a notifier woken when one may have become available.
#[derive(Debug, Default)]
pub struct MessageStore {
    messages: VecDeque<Stored>,
    notify: Arc<Notify>,
}

#[derive(Debug)]
struct Queue {
    name: String,
    options: QueueOptions,
    active: MessageStore,
    dead: MessageStore,
}

#[derive(Debug)]
struct Subscription {
    name: String,
    forward_to: Option<String>,
    options: QueueOptions,
    active: MessageStore,
    dead: MessageStore,
}

#[derive(Debug)]
struct Topic {
    name: String,
    subscriptions: HashMap<String, Subscription>,
}

/// Why a message could not be accepted by an entity.
#[derive(Debug)]
pub enum EnqueueError {
    NotFound(String),
    NotAllowed(String),
}

/// The namespace: all entities and the next sequence number (one counter for the namespace).
#[derive(Debug, Default)]
pub struct Namespace {
    queues: HashMap<String, Queue>,
    topics: HashMap<String, Topic>,
    next_sequence_number: i64,
}

pub fn key(name: &str) -> String {
    name.trim_matches('/').to_lowercase()
}

fn timestamp(time: SystemTime) -> Timestamp {
    let millis = time.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    Timestamp::from_milliseconds(millis)
}

impl Namespace {
    pub fn create_queue(&mut self, name: &str, options: QueueOptions) {
        let key = key(name);
        assert!(
            !self.topics.contains_key(&key),
            "a topic named {name} exists: Service Bus names are unique across queues and topics"
        );
        self.queues.entry(key).or_insert_with(|| Queue {
            name: name.to_string(),
            options,
            active: MessageStore::default(),
            dead: MessageStore::default(),
        });
    }

    pub fn create_topic(&mut self, name: &str) {
        let key = key(name);
        assert!(
            !self.queues.contains_key(&key),
            "a queue named {name} exists: Service Bus names are unique across queues and topics"
        );
        self.topics.entry(key).or_insert_with(|| Topic { name: name.to_string(), subscriptions: HashMap::new() });
    }

    pub fn create_subscription(&mut self, topic: &str, name: &str, forward_to: Option<&str>, options: QueueOptions) {
        if let Some(target) = forward_to {
            let target_key = key(target);
            assert!(
                self.queues.contains_key(&target_key) || self.topics.contains_key(&target_key),
                "subscription {topic}/{name} forwards to {target}, which does not exist (create it first, as Service Bus requires)"
            );
        }
        let topic_entry = self.topics.get_mut(&key(topic)).unwrap_or_else(|| panic!("topic {topic} does not exist"));
        topic_entry.subscriptions.entry(key(name)).or_insert_with(|| Subscription {
            name: name.to_string(),
            forward_to: forward_to.map(str::to_string),
            options,
            active: MessageStore::default(),
            dead: MessageStore::default(),
        });
    }

    /// Resolves an entity path (`queue`, `topic`, `topic/Subscriptions/sub`, each optionally followed by
    /// `/$DeadLetterQueue` and/or `/$management`), case-insensitively. Entity names may contain `/`.
    pub fn resolve(&self, path: &str) -> Option<Address> {
        let mut rest = key(path);
        let mut management = false;
        if let Some(stripped) = rest.strip_suffix("/$management") {
            management = true;
            rest = stripped.to_string();
        }
        let mut sub_queue = SubQueue::Active;
        if let Some(stripped) = rest.strip_suffix("/$deadletterqueue") {
            sub_queue = SubQueue::DeadLetter;
            rest = stripped.to_string();
        }
        let entity = if self.queues.contains_key(&rest) {
            Entity::Queue(rest)
        } else if self.topics.contains_key(&rest) {
            if sub_queue == SubQueue::DeadLetter {
                return None;
            }
            Entity::Topic(rest)
        } else {
            let (topic, subscription) = rest.rsplit_once("/subscriptions/")?;
            let exists = self.topics.get(topic).is_some_and(|t| t.subscriptions.contains_key(subscription));
            if !exists {
                return None;
            }
            Entity::Subscription(topic.to_string(), subscription.to_string())
        };
        Some(Address { entity, sub_queue, management })
    }

    pub fn display_name(&self, entity: &Entity) -> String {
        match entity {
            Entity::Queue(q) => self.queues.get(q).map(|q| q.name.clone()).unwrap_or_default(),
            Entity::Topic(t) => self.topics.get(t).map(|t| t.name.clone()).unwrap_or_default(),
            Entity::Subscription(t, s) => match self.topics.get(t) {
                Some(topic) => {
                    let sub = topic.subscriptions.get(s).map(|s| s.name.clone()).unwrap_or_default();
                    format!("{}/Subscriptions/{}", topic.name, sub)
                }
                None => String::new(),
            },
        }
    }

    /// Enqueues a message sent to a queue or a topic (a topic copies it into each subscription, or
    /// to the subscription's ForwardTo entity).
    pub fn enqueue(&mut self, path: &str, message: AmqpMessage) -> Result<(), EnqueueError> {
        let address = self.resolve(path).ok_or_else(|| EnqueueError::NotFound(path.to_string()))?;
        if address.management || address.sub_queue != SubQueue::Active {
            return Err(EnqueueError::NotAllowed(format!("cannot send to {path}")));
        }
        self.enqueue_entity(&address.entity, message, 0)
    }

    fn enqueue_entity(&mut self, entity: &Entity, message: AmqpMessage, hops: u32) -> Result<(), EnqueueError> {
        if hops > 4 {
            return Err(EnqueueError::NotAllowed("ForwardTo chain longer than 4 hops".into()));
        }
        match entity {
            Entity::Queue(q) => {
                let sequence_number = self.next_sequence();
                let queue = self.queues.get_mut(q).ok_or_else(|| EnqueueError::NotFound(q.clone()))?;
                queue.active.push(message, sequence_number, None);
                Ok(())
            }
            Entity::Topic(t) => {
                let topic = self.topics.get(t).ok_or_else(|| EnqueueError::NotFound(t.clone()))?;
                let mut forwards = Vec::new();
                let mut locals = Vec::new();
                for (key, sub) in &topic.subscriptions {
                    match &sub.forward_to {
                        Some(target) => forwards.push(target.clone()),
                        None => locals.push(key.clone()),
                    }
                }
                for sub in locals {
                    let sequence_number = self.next_sequence();
                    if let Some(s) = self.topics.get_mut(t).and_then(|t| t.subscriptions.get_mut(&sub)) {
                        s.active.push(message.clone(), sequence_number, None);
                    }
                }
                for target in forwards {
                    let address = self.resolve(&target).ok_or_else(|| EnqueueError::NotFound(target.clone()))?;
                    self.enqueue_entity(&address.entity, message.clone(), hops + 1)?;
                }
                Ok(())
            }
            Entity::Subscription(..) => Err(EnqueueError::NotAllowed("cannot send to a subscription".into())),
        }
    }

    fn next_sequence(&mut self) -> i64 {
        self.next_sequence_number += 1;
        self.next_sequence_number
    }

    /// The active and dead-letter stores and the options of a receivable entity.
    fn stores_mut(&mut self, entity: &Entity) -> Option<(&mut MessageStore, &mut MessageStore, QueueOptions, String)> {
        match entity {
            Entity::Queue(q) => {
                let q = self.queues.get_mut(q)?;
                Some((&mut q.active, &mut q.dead, q.options.clone(), q.name.clone()))
            }
            Entity::Subscription(t, s) => {
                let topic = self.topics.get_mut(t)?;
                let topic_name = topic.name.clone();
                let s = topic.subscriptions.get_mut(s)?;
                let name = format!("{}/Subscriptions/{}", topic_name, s.name);
                Some((&mut s.active, &mut s.dead, s.options.clone(), name))
            }
            Entity::Topic(_) => None,
        }
    }

    /// The notifier of a sub-queue, to wait for messages without holding the namespace lock.
    pub fn notifier(&mut self, entity: &Entity, sub_queue: SubQueue) -> Option<Arc<Notify>> {
        let (active, dead, _, _) = self.stores_mut(entity)?;
        Some(match sub_queue {
            SubQueue::Active => active.notify.clone(),
            SubQueue::DeadLetter => dead.notify.clone(),
        })
    }

    /// Reserves the next available message of a sub-queue for a receiver link, and returns the
    /// lock token and the message as it will be sent (lock token, sequence number, enqueued time,
    /// locked-until and delivery count stamped on it). The delivery is counted and the lock clock
    /// starts only at `confirm_delivery`, once the link had credit and sent it; `unreserve` gives
    /// it back untouched.
    pub fn reserve_next(
        &mut self,
        entity: &Entity,
        sub_queue: SubQueue,
        now: SystemTime,
    ) -> Option<([u8; 16], AmqpMessage)> {
        self.expire(entity, now);
        let (active, dead, options, _) = self.stores_mut(entity)?;
        let store = match sub_queue {
            SubQueue::Active => active,
            SubQueue::DeadLetter => dead,
        };
        let stored = store.messages.iter_mut().find(|m| m.lock.is_none())?;
        let token = *uuid::Uuid::new_v4().as_bytes();
        stored.lock = Some(Lock { token, until: None });
        // This delivery will be number `delivery_count + 1`; AMQP's header counts prior ones.
        let message = outgoing(stored, stored.delivery_count, Some((token, now + options.lock_duration)));
        Some((token, message))
    }

    /// The reserved message went out: count the delivery and start its lock clock.
    pub fn confirm_delivery(&mut self, entity: &Entity, sub_queue: SubQueue, token: [u8; 16], now: SystemTime) {
        let Some((active, dead, options, _)) = self.stores_mut(entity) else { return };
        let store = if sub_queue == SubQueue::Active { active } else { dead };
        if let Some(m) = store.messages.iter_mut().find(|m| m.lock.as_ref().is_some_and(|l| l.token == token)) {
            m.delivery_count += 1;
            m.lock = Some(Lock { token, until: Some(now + options.lock_duration) });
        }
    }

    /// The reserved message never went out (the link went away first): available again, uncounted.
    pub fn unreserve(&mut self, entity: &Entity, sub_queue: SubQueue, token: [u8; 16]) {
        let Some((active, dead, _, _)) = self.stores_mut(entity) else { return };
        let store = if sub_queue == SubQueue::Active { active } else { dead };
        let reserved = |l: &Lock| l.token == token && l.until.is_none();
        if let Some(m) = store.messages.iter_mut().find(|m| m.lock.as_ref().is_some_and(reserved)) {
            m.lock = None;
            store.notify.notify_waiters();
        }
    }

    /// Settles a locked message. Returns false when no message holds this lock (completed already,
    /// or its lock expired).
    pub fn settle(&mut self, entity: &Entity, sub_queue: SubQueue, token: [u8; 16], settlement: Settlement) -> bool {
        let Some((active, dead, options, name)) = self.stores_mut(entity) else { return false };
        let (store, other) = match sub_queue {
            SubQueue::Active => (active, Some(dead)),
            SubQueue::DeadLetter => (dead, None),
        };
        let Some(index) =
            store.messages.iter().position(|m| m.lock.as_ref().is_some_and(|l| l.token == token && l.until.is_some()))
        else {
            return false;
        };
        match settlement {
            Settlement::Complete => {
                store.messages.remove(index);
            }
            Settlement::Release => {
                let m = &mut store.messages[index];
                m.lock = None;
                m.delivery_count = m.delivery_count.saturating_sub(1);
                store.notify.notify_waiters();
            }
            Settlement::Abandon => {
                store.messages[index].lock = None;
                match other {
                    Some(dead) if store.messages[index].delivery_count >= options.max_delivery_count => {
                        let stored = store.messages.remove(index).expect("index found above");
                        let description = format!(
                            "Message could not be consumed after {} delivery attempts.",
                            options.max_delivery_count
                        );
                        dead.push_dead(stored, "MaxDeliveryCountExceeded", Some(description), &name);
                    }
                    _ => store.notify.notify_waiters(),
                }
            }
            Settlement::DeadLetter { reason, description } => match other {
                Some(dead) => {
                    let stored = store.messages.remove(index).expect("index found above");
                    dead.push_dead(stored, reason.as_deref().unwrap_or(""), description, &name);
                }
                // A message of the dead-letter sub-queue cannot be dead-lettered again: it stays.
                None => {
                    store.messages[index].lock = None;
                    store.notify.notify_waiters();
                }
            },
        }
        true
    }

    /// Extends a lock by the entity's lock duration; `None` when the lock is not held.
    pub fn renew_lock(&mut self, entity: &Entity, token: [u8; 16], now: SystemTime) -> Option<SystemTime> {
        self.expire(entity, now);
        let (active, dead, options, _) = self.stores_mut(entity)?;
        for store in [active, dead] {
            let held = |l: &Lock| l.token == token && l.until.is_some();
            if let Some(m) = store.messages.iter_mut().find(|m| m.lock.as_ref().is_some_and(held)) {
                let until = now + options.lock_duration;
                m.lock = Some(Lock { token, until: Some(until) });
                return Some(until);
            }
        }
        None
    }

    /// Messages from a sequence number on, as a peek sees them (not locked, not counted).
    pub fn peek(
        &mut self,
        entity: &Entity,
        sub_queue: SubQueue,
        from: i64,
        count: usize,
        now: SystemTime,
    ) -> Vec<AmqpMessage> {
        self.expire(entity, now);
        let Some((active, dead, _, _)) = self.stores_mut(entity) else { return Vec::new() };
        let store = if sub_queue == SubQueue::Active { active } else { dead };
        store
            .messages
            .iter()
            .filter(|m| m.sequence_number >= from)
            .take(count)
            .map(|m| outgoing(m, m.delivery_count.saturating_sub(1), None))
            .collect()
    }

    /// Releases every lock whose time is up (counting it as a failed delivery) and drops, or
    /// dead-letters, messages whose time to live ran out.
    pub fn expire(&mut self, entity: &Entity, now: SystemTime) {
        let Some((active, dead, options, name)) = self.stores_mut(entity) else { return };
        let mut woke = false;
        let mut index = 0;
        while index < active.messages.len() {
            let m = &mut active.messages[index];
            if m.lock.as_ref().is_some_and(|l| l.expired(now)) {
                m.lock = None;
                woke = true;
                if m.delivery_count >= options.max_delivery_count {
                    let stored = active.messages.remove(index).expect("index in range");
                    let description = format!(
                        "Message could not be consumed after {} delivery attempts.",
                        options.max_delivery_count
                    );
                    dead.push_dead(stored, "MaxDeliveryCountExceeded", Some(description), &name);
                    continue;
                }
            }
            let m = &active.messages[index];
            if m.lock.is_none() && m.expires_at().is_some_and(|at| at <= now) {
                let stored = active.messages.remove(index).expect("index in range");
                if options.dead_letter_on_expiration {
                    dead.push_dead(
                        stored,
                        "TTLExpiredException",
                        Some("The message expired and was dead lettered.".into()),
                        &name,
                    );
                }
                continue;
            }
            index += 1;
        }
        for m in dead.messages.iter_mut() {
            if m.lock.as_ref().is_some_and(|l| l.expired(now)) {
                m.lock = None;
                woke = true;
            }
        }
        if woke {
            active.notify.notify_waiters();
            dead.notify.notify_waiters();
        }
    }

    /// Runs `expire` on every receivable entity.
    pub fn expire_all(&mut self, now: SystemTime) {
        for entity in self.receivable_entities() {
            self.expire(&entity, now);
        }
    }

    /// Releases every lock now, each counted as a failed delivery (what a broker restart does to
    /// messages that were out for delivery).
    pub fn release_all_locks(&mut self, now: SystemTime) {
        for entity in self.receivable_entities() {
            if let Some((active, dead, _, _)) = self.stores_mut(&entity) {
                for m in active.messages.iter_mut().chain(dead.messages.iter_mut()) {
                    if let Some(lock) = m.lock.as_mut() {
                        if lock.until.is_some() {
                            lock.until = Some(now);
                        }
                    }
                }
            }
            self.expire(&entity, now);
        }
    }

    fn receivable_entities(&self) -> Vec<Entity> {
        let mut entities: Vec<Entity> = self.queues.keys().map(|q| Entity::Queue(q.clone())).collect();
        for (t, topic) in &self.topics {
            entities.extend(topic.subscriptions.keys().map(|s| Entity::Subscription(t.clone(), s.clone())));
        }
        entities
    }

    /// A snapshot of a sub-queue (locked messages included: they are still active in Service Bus terms).
    pub fn snapshot(&mut self, path: &str, sub_queue: SubQueue, now: SystemTime) -> Vec<super::BrokerMessage> {
        let Some(address) = self.resolve(path) else { panic!("no queue or subscription named {path}") };
        self.expire(&address.entity, now);
        let Some((active, dead, _, _)) = self.stores_mut(&address.entity) else {
            panic!("{path} is a topic: topics hold no messages, their subscriptions do")
        };
        let store = if sub_queue == SubQueue::Active { active } else { dead };
        store.messages.iter().map(snapshot).collect()
    }
}

impl MessageStore {
    fn push(&mut self, mut message: AmqpMessage, sequence_number: i64, dead_letter_source: Option<String>) {
        // Delivery annotations are hop-by-hop: what the sender put there is not kept.
        message.delivery_annotations = None;
        self.messages.push_back(Stored {
            message,
            sequence_number,
            enqueued_at: SystemTime::now(),
            delivery_count: 0,
            lock: None,
            dead_letter_source,
        });
        self.notify.notify_waiters();
    }

    fn push_dead(&mut self, mut stored: Stored, reason: &str, description: Option<String>, source: &str) {
        let properties = stored.message.application_properties.get_or_insert_with(ApplicationProperties::default);
        properties.0.insert("DeadLetterReason".to_string(), SimpleValue::String(reason.to_string()));
        if let Some(description) = description {
            properties.0.insert("DeadLetterErrorDescription".to_string(), SimpleValue::String(description));
        }
        stored.lock = None;
        stored.dead_letter_source = Some(source.to_string());
        self.messages.push_back(stored);
        self.notify.notify_waiters();
    }
}

/// The message as a receiver gets it: Service Bus's broker annotations stamped on a copy.
/// `prior_deliveries` goes into the header's delivery-count (AMQP counts *prior* deliveries; the
/// client adds one to show Service Bus's DeliveryCount).
fn outgoing(stored: &Stored, prior_deliveries: u32, lock: Option<([u8; 16], SystemTime)>) -> AmqpMessage {
    let mut message = stored.message.clone();
    let header = message.header.get_or_insert_with(Header::default);
    // AMQP's delivery-count is the number of *prior* deliveries; the client adds one.
    header.delivery_count = prior_deliveries;
    let annotations = message.message_annotations.get_or_insert_with(MessageAnnotations::default);
    annotations.0.insert("x-opt-sequence-number".into(), Value::Long(stored.sequence_number));
    annotations.0.insert("x-opt-enqueued-time".into(), Value::Timestamp(timestamp(stored.enqueued_at)));
    if let Some(source) = &stored.dead_letter_source {
        annotations.0.insert("x-opt-deadletter-source".into(), Value::String(source.clone()));
    }
    if let Some((token, until)) = lock {
        annotations.0.insert("x-opt-locked-until".into(), Value::Timestamp(timestamp(until)));
        let delivery = message.delivery_annotations.get_or_insert_with(DeliveryAnnotations::default);
        delivery.0.insert("x-opt-lock-token".into(), Value::Uuid(Uuid::from(token)));
    }
    message
}

fn message_id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => uuid::Uuid::from_bytes(*u.as_ref()).to_string(),
        MessageId::Binary(b) => String::from_utf8_lossy(b.as_ref()).into_owned(),
    }
}

/// The body as bytes: the Data sections concatenated; a string or binary amqp-value as its bytes.
pub fn body_bytes(body: &Body<Value>) -> Vec<u8> {
    match body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        Body::Value(v) => match &v.0 {
            Value::String(s) => s.clone().into_bytes(),
            Value::Binary(b) => b.to_vec(),
            other => serde_amqp::to_vec(other).unwrap_or_default(),
        },
        Body::Sequence(_) | Body::Empty => Vec::new(),
    }
}

pub fn simple_to_json(value: &SimpleValue) -> serde_json::Value {
    use serde_json::json;
    match value {
        SimpleValue::Null => serde_json::Value::Null,
        SimpleValue::Bool(b) => json!(b),
        SimpleValue::Ubyte(n) => json!(n),
        SimpleValue::Ushort(n) => json!(n),
        SimpleValue::Uint(n) => json!(n),
        SimpleValue::Ulong(n) => json!(n),
        SimpleValue::Byte(n) => json!(n),
        SimpleValue::Short(n) => json!(n),
        SimpleValue::Int(n) => json!(n),
        SimpleValue::Long(n) => json!(n),
        SimpleValue::Float(f) => json!(f.into_inner()),
        SimpleValue::Double(f) => json!(f.into_inner()),
        SimpleValue::Char(c) => json!(c.to_string()),
        SimpleValue::Timestamp(t) => json!(t.milliseconds()),
        SimpleValue::Uuid(u) => json!(uuid::Uuid::from_bytes(*u.as_ref()).to_string()),
        SimpleValue::Binary(b) => json!(b.to_vec()),
        SimpleValue::String(s) => json!(s),
        SimpleValue::Symbol(s) => json!(s.0),
        other => json!(format!("{other:?}")),
    }
}

fn snapshot(stored: &Stored) -> super::BrokerMessage {
    let message = &stored.message;
    let properties = message.properties.as_ref();
    let annotation = |name: &str| {
        message
            .message_annotations
            .as_ref()
            .and_then(|a| a.0.get(&name.into() as &fe2o3_amqp::types::messaging::annotations::OwnedKey))
            .and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                _ => None,
            })
    };
    let app = message.application_properties.as_ref();
    let app_string = |name: &str| {
        app.and_then(|a| a.0.get(name)).and_then(|v| match v {
            SimpleValue::String(s) => Some(s.clone()),
            _ => None,
        })
    };
    super::BrokerMessage {
        body: body_bytes(&message.body),
        message_id: properties.and_then(|p| p.message_id.as_ref()).map(message_id_text),
        correlation_id: properties.and_then(|p| p.correlation_id.as_ref()).map(message_id_text),
        content_type: properties.and_then(|p| p.content_type.as_ref()).map(|s| s.0.clone()),
        session_id: properties.and_then(|p| p.group_id.clone()),
        reply_to_session_id: properties.and_then(|p| p.reply_to_group_id.clone()),
        reply_to: properties.and_then(|p| p.reply_to.clone()),
        to: properties.and_then(|p| p.to.clone()),
        partition_key: annotation("x-opt-partition-key"),
        subject: properties.and_then(|p| p.subject.clone()),
        time_to_live: message.header.as_ref().and_then(|h| h.ttl).map(|ms| Duration::from_millis(u64::from(ms))),
        application_properties: app
            .map(|a| {
                a.0.iter()
                    .filter(|(k, _)| k.as_str() != "DeadLetterReason" && k.as_str() != "DeadLetterErrorDescription")
                    .map(|(k, v)| (k.clone(), simple_to_json(v)))
                    .collect()
            })
            .unwrap_or_default(),
        delivery_count: stored.delivery_count,
        sequence_number: stored.sequence_number,
        locked: stored.lock.as_ref().is_some_and(|l| l.until.is_some()),
        dead_letter_reason: if stored.dead_letter_source.is_some() { app_string("DeadLetterReason") } else { None },
        dead_letter_description: if stored.dead_letter_source.is_some() {
            app_string("DeadLetterErrorDescription")
        } else {
            None
        },
    }
}
