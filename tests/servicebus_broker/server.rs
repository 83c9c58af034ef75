//! The AMQP 1.0 side of the test double, on fe2o3-amqp's acceptor: connections (SASL ANONYMOUS, as
//! Service Bus clients use), sessions, and the links a Service Bus client attaches:
//! - `$cbs`: put-token requests, each checked against the namespace key (`sas.rs`): status 202, or
//!   401 with the reason;
//! - `<entity>/$management`: renew-lock and peek-message requests;
//! - `<entity>` (a full `amqp://host/path` address or a bare path): senders enqueue into queues and
//!   topics, receivers get peek-locked messages with their lock token in the `x-opt-lock-token`
//!   delivery annotation, and their dispositions settle the lock (accepted = complete, modified =
//!   abandon, rejected = dead-letter with the error's `DeadLetterReason`/`DeadLetterErrorDescription`,
//!   released = give back uncounted).
//!
//! A link is refused — attached with no terminus on this side and detached at once with the error,
//! so that the client's attach fails with it — when no valid token was put for its entity on the
//! connection (`amqp:unauthorized-access`), the entity does not exist (`amqp:not-found`), or it
//! sends to a subscription or dead-letter queue or receives from a topic (`amqp:not-allowed`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fe2o3_amqp::acceptor::sasl_acceptor::SaslAnonymousMechanism;
use fe2o3_amqp::acceptor::{ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SessionAcceptor};
use fe2o3_amqp::types::definitions::{AmqpError, Error as AmqpErrorFrame, Role};
use fe2o3_amqp::types::messaging::message::__private::{Deserializable, Serializable};
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message, MessageId, Outcome, Properties, TargetArchetype,
};
use fe2o3_amqp::types::primitives::{Array, Binary, OrderedMap, SimpleValue, Timestamp, Value};
use fe2o3_amqp::{Receiver, Sendable, Sender};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};

use super::sas;
use super::store::{Address, AmqpMessage, EnqueueError, Entity, Namespace, Settlement, SubQueue};

/// Microsoft's batch message format: the body's Data sections are each a whole encoded message.
const BATCH_MESSAGE_FORMAT: u32 = 0x8001_3700;

/// How long the double waits before it settles a message a client sent. fe2o3-amqp 0.14's sender
/// (azservicebus's AMQP stack) records a delivery as unsettled only *after* it has handed the
/// transfer to its session; an outcome that comes back faster than that (on loopback, from a
/// client on a multi-threaded runtime) finds no delivery and is dropped, and the send then hangs
/// until the client's try-timeout and panics on its retry. A network's round trip hides this from
/// clients of Service Bus; this delay stands in for it. (The double's own senders are safe: its
/// runtime has one worker thread, so the outcome cannot overtake the bookkeeping.)
const SETTLE_DELAY: Duration = Duration::from_millis(30);

/// State shared by the accept loop, every connection and the test's handle.
pub struct Broker {
    pub namespace: Mutex<Namespace>,
    pub key_name: String,
    pub key: String,
    /// Clones of the open connections' sockets (by connection number), to cut every connection at
    /// once (`drop_connections`); a connection removes its own when it ends.
    pub sockets: Mutex<HashMap<u64, std::net::TcpStream>>,
    pub next_connection: std::sync::atomic::AtomicU64,
    /// While set, a new connection is closed as soon as it is accepted (the broker is "down").
    pub refusing: std::sync::atomic::AtomicBool,
}

impl Broker {
    fn namespace(&self) -> std::sync::MutexGuard<'_, Namespace> {
        self.namespace.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Shuts every accepted socket down: clients see the connection drop, as when a broker restarts.
    pub fn cut_connections(&self) {
        let sockets = std::mem::take(&mut *self.sockets.lock().unwrap_or_else(|p| p.into_inner()));
        for socket in sockets.into_values() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Per-connection state: which resources were authorised by put-token, and the links on which
/// responses to `$cbs`/`$management` requests go back (by the requests' reply-to address).
#[derive(Default)]
struct ConnectionState {
    authorised: Mutex<HashSet<String>>,
    replies: Mutex<HashMap<String, mpsc::UnboundedSender<Message<AmqpValue<Value>>>>>,
    reply_link_attached: Notify,
}

/// Accepts connections until `stop` turns true; also runs the lock-expiry sweep.
pub async fn serve(listener: std::net::TcpListener, broker: Arc<Broker>, mut stop: watch::Receiver<bool>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("Service Bus test double: cannot listen: {e}");
            return;
        }
    };
    let sweeper = tokio::spawn(sweep_locks(broker.clone()));
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if broker.refusing.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(stream);
                    continue;
                }
                let Some((number, stream)) = register_socket(&broker, stream) else { continue };
                let broker = broker.clone();
                tokio::spawn(async move {
                    connection_main(stream, broker.clone()).await;
                    broker.sockets.lock().unwrap_or_else(|p| p.into_inner()).remove(&number);
                });
            }
        }
    }
    sweeper.abort();
    broker.cut_connections();
}

fn register_socket(broker: &Broker, stream: TcpStream) -> Option<(u64, TcpStream)> {
    let socket = stream.into_std().ok()?;
    let clone = socket.try_clone().ok()?;
    let number = broker.next_connection.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    broker.sockets.lock().unwrap_or_else(|p| p.into_inner()).insert(number, clone);
    Some((number, TcpStream::from_std(socket).ok()?))
}

async fn sweep_locks(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        broker.namespace().expire_all(SystemTime::now());
    }
}

async fn connection_main(stream: TcpStream, broker: Arc<Broker>) {
    let acceptor = ConnectionAcceptor::builder()
        .container_id("servicebus-test-double")
        .sasl_acceptor(SaslAnonymousMechanism::new())
        .build();
    let Ok(mut connection) = acceptor.accept(stream).await else { return };
    let state = Arc::new(ConnectionState::default());
    let sessions = SessionAcceptor::new();
    while let Ok(session) = sessions.accept(&mut connection).await {
        tokio::spawn(session_main(session, broker.clone(), state.clone()));
    }
    let _ = connection.close().await;
}

/// What a client's link attaches to.
enum Node {
    Cbs,
    Management(Address),
    /// The client's receiver of `$cbs`/`$management` responses, by its own (reply-to) address.
    Replies(String),
    Entity(Address),
}

async fn session_main(mut session: ListenerSessionHandle, broker: Arc<Broker>, state: Arc<ConnectionState>) {
    let links = LinkAcceptor::new();
    while let Some(mut attach) = session.next_incoming_attach().await {
        // The client's sender attaches to a target, its receiver to a source.
        let target = attach.target.as_ref().and_then(|t| match t.as_ref() {
            TargetArchetype::Target(t) => t.address.clone(),
            #[allow(unreachable_patterns)]
            _ => None,
        });
        let client_sends = attach.role == Role::Sender;
        let address =
            if client_sends { target.clone() } else { attach.source.as_ref().and_then(|s| s.address.clone()) };
        let path = entity_path(&address.unwrap_or_default());
        let node = decide(&broker, &state, &path, client_sends, target);
        // A refused link is attached with no terminus on our side and detached at once with the
        // error, as Service Bus does: the client's attach then fails with that error.
        if node.is_err() {
            if client_sends {
                attach.target = None;
            } else {
                attach.source = None;
            }
        }
        let Ok(link) = links.accept_incoming_attach(attach, &mut session).await else { continue };
        let (broker, state) = (broker.clone(), state.clone());
        match (link, node) {
            (LinkEndpoint::Receiver(receiver), Err(error)) => {
                tokio::spawn(async move { receiver.close_with_error(error).await });
            }
            (LinkEndpoint::Sender(sender), Err(error)) => {
                tokio::spawn(async move { sender.close_with_error(error).await });
            }
            (LinkEndpoint::Receiver(receiver), Ok(Node::Cbs)) => {
                tokio::spawn(cbs_node(receiver, broker, state));
            }
            (LinkEndpoint::Receiver(receiver), Ok(Node::Management(address))) => {
                tokio::spawn(management_node(receiver, address, broker, state));
            }
            (LinkEndpoint::Receiver(receiver), Ok(Node::Entity(_))) => {
                tokio::spawn(entity_receiver(receiver, path, broker));
            }
            (LinkEndpoint::Sender(sender), Ok(Node::Replies(reply_to))) => {
                tokio::spawn(reply_link(sender, reply_to, state));
            }
            (LinkEndpoint::Sender(sender), Ok(Node::Entity(address))) => {
                tokio::spawn(entity_sender(sender, address, broker));
            }
            // Role and node always agree (`decide` uses the role); nothing else can come.
            (_, Ok(_)) => {}
        }
    }
}

/// What a link attaching to `path` gets, or why it is refused.
fn decide(
    broker: &Broker,
    state: &ConnectionState,
    path: &str,
    client_sends: bool,
    target: Option<String>,
) -> Result<Node, AmqpErrorFrame> {
    let management = path.to_lowercase().ends_with("/$management");
    if path == "$cbs" || (management && !client_sends) {
        return Ok(if client_sends { Node::Cbs } else { Node::Replies(target.unwrap_or_default()) });
    }
    let address = admit(broker, state, path)?;
    if management {
        return Ok(Node::Management(address));
    }
    let not_allowed = |why: &str| Err(amqp_error(AmqpError::NotAllowed, format!("cannot {why} '{path}'")));
    match (&address.entity, address.sub_queue, client_sends) {
        (Entity::Subscription(..), _, true) => not_allowed("send to a subscription,"),
        (_, SubQueue::DeadLetter, true) => not_allowed("send to a dead-letter queue,"),
        (Entity::Topic(_), _, false) => not_allowed("receive from a topic,"),
        _ => Ok(Node::Entity(address)),
    }
}

/// `amqp://host[:port]/a/b` → `a/b`; a bare path is returned as it is.
fn entity_path(address: &str) -> String {
    match address.split_once("://") {
        Some((_, rest)) => rest.split_once('/').map(|(_, path)| path).unwrap_or("").trim_end_matches('/').to_string(),
        None => address.trim_matches('/').to_string(),
    }
}

fn amqp_error(condition: AmqpError, description: impl Into<String>) -> AmqpErrorFrame {
    AmqpErrorFrame::new(condition, Some(description.into()), None)
}

/// Checks that the entity exists and that a token for it was put on this connection.
fn admit(broker: &Broker, state: &ConnectionState, path: &str) -> Result<Address, AmqpErrorFrame> {
    let address = broker
        .namespace()
        .resolve(path)
        .ok_or_else(|| amqp_error(AmqpError::NotFound, format!("The messaging entity '{path}' could not be found.")))?;
    let authorised = state.authorised.lock().unwrap_or_else(|p| p.into_inner());
    let entity_key = super::store::key(path);
    let base = entity_key.trim_end_matches("/$management").trim_end_matches("/$deadletterqueue");
    if !authorised.contains(&entity_key) && !authorised.contains(base) {
        return Err(amqp_error(AmqpError::UnauthorizedAccess, format!("no valid token was put to $cbs for '{path}'")));
    }
    Ok(address)
}

// --- $cbs and $management: request/response nodes ----------------------------------------------

/// A response to a management request: status code, description, correlation id and body.
fn response(request: &Message<Body<Value>>, status: i32, description: &str, body: Value) -> Message<AmqpValue<Value>> {
    let correlation_id: Option<MessageId> = request.properties.as_ref().and_then(|p| p.message_id.clone());
    let properties = Properties { correlation_id, ..Default::default() };
    let mut application = ApplicationProperties::default();
    application.0.insert("status-code".into(), SimpleValue::Int(status));
    application.0.insert("status-description".into(), SimpleValue::String(description.into()));
    Message::builder().properties(properties).application_properties(application).value(body).build()
}

async fn send_reply(state: &ConnectionState, request: &Message<Body<Value>>, reply: Message<AmqpValue<Value>>) {
    let Some(reply_to) = request.properties.as_ref().and_then(|p| p.reply_to.clone()) else { return };
    // The client attaches its reply link before it sends; wait briefly in case it is still on its way.
    for _ in 0..50 {
        let link = state.replies.lock().unwrap_or_else(|p| p.into_inner()).get(&reply_to).cloned();
        if let Some(link) = link {
            let _ = link.send(reply);
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), state.reply_link_attached.notified()).await;
    }
}

async fn reply_link(mut sender: Sender, reply_to: String, state: Arc<ConnectionState>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    state.replies.lock().unwrap_or_else(|p| p.into_inner()).insert(reply_to.clone(), tx);
    state.reply_link_attached.notify_waiters();
    loop {
        let message = tokio::select! {
            message = rx.recv() => message,
            _ = sender.on_detach() => None,
        };
        let Some(message) = message else { break };
        if sender.send(message).await.is_err() {
            break;
        }
    }
    state.replies.lock().unwrap_or_else(|p| p.into_inner()).remove(&reply_to);
    // Dropping the sender answers the client's detach.
}

fn application_string(message: &Message<Body<Value>>, name: &str) -> Option<String> {
    match message.application_properties.as_ref()?.0.get(name)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

async fn cbs_node(mut receiver: Receiver, broker: Arc<Broker>, state: Arc<ConnectionState>) {
    while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
        let _ = receiver.accept(&delivery).await;
        let request = delivery.into_message();
        let reply = put_token(&request, &broker, &state);
        send_reply(&state, &request, reply).await;
    }
}

fn put_token(request: &Message<Body<Value>>, broker: &Broker, state: &ConnectionState) -> Message<AmqpValue<Value>> {
    if application_string(request, "operation").as_deref() != Some("put-token") {
        return response(request, 501, "the test double's $cbs node only knows put-token", Value::Null);
    }
    let name = application_string(request, "name").unwrap_or_default();
    let token = match &request.body {
        Body::Value(AmqpValue(Value::String(token))) => token.clone(),
        _ => return response(request, 400, "the token must be a string", Value::Null),
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    if let Err(why) = sas::verify(&token, &broker.key_name, &broker.key, now) {
        return response(request, 401, &format!("Unauthorized: {why}"), Value::Null);
    }
    // As in Service Bus, a valid token is accepted whether or not the entity exists: an unknown
    // entity is refused when the link attaches (`amqp:not-found`).
    let path = entity_path(&name);
    state.authorised.lock().unwrap_or_else(|p| p.into_inner()).insert(super::store::key(&path));
    response(request, 202, "Accepted", Value::Null)
}

async fn management_node(mut receiver: Receiver, address: Address, broker: Arc<Broker>, state: Arc<ConnectionState>) {
    while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
        let _ = receiver.accept(&delivery).await;
        let request = delivery.into_message();
        let reply = management_request(&request, &address, &broker);
        send_reply(&state, &request, reply).await;
    }
}

fn body_map(request: &Message<Body<Value>>) -> Option<&OrderedMap<Value, Value>> {
    match &request.body {
        Body::Value(AmqpValue(Value::Map(map))) => Some(map),
        _ => None,
    }
}

fn timestamp(time: SystemTime) -> Timestamp {
    Timestamp::from_milliseconds(time.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0))
}

fn management_request(request: &Message<Body<Value>>, address: &Address, broker: &Broker) -> Message<AmqpValue<Value>> {
    let operation = application_string(request, "operation").unwrap_or_default();
    let now = SystemTime::now();
    match operation.as_str() {
        "com.microsoft:renew-lock" => {
            let tokens: Vec<[u8; 16]> = body_map(request)
                .and_then(|m| m.get(&Value::String("lock-tokens".into())))
                .map(|v| match v {
                    Value::Array(items) => items.0.iter().filter_map(uuid_of).collect(),
                    Value::List(items) => items.iter().filter_map(uuid_of).collect(),
                    other => uuid_of(other).into_iter().collect(),
                })
                .unwrap_or_default();
            let mut expirations = Vec::new();
            let mut namespace = broker.namespace();
            for token in tokens {
                match namespace.renew_lock(&address.entity, token, now) {
                    Some(until) => expirations.push(timestamp(until)),
                    None => {
                        return response(
                            request,
                            410,
                            "The lock supplied is invalid. Either the lock expired, or the message has already been removed from the queue.",
                            Value::Null,
                        );
                    }
                }
            }
            let mut body = OrderedMap::new();
            body.insert(
                Value::String("expirations".into()),
                Value::Array(Array(expirations.into_iter().map(Value::Timestamp).collect())),
            );
            response(request, 200, "OK", Value::Map(body))
        }
        "com.microsoft:peek-message" => {
            let map = body_map(request);
            let from = map
                .and_then(|m| m.get(&Value::String("from-sequence-number".into())))
                .and_then(|v| if let Value::Long(n) = v { Some(*n) } else { None })
                .unwrap_or(0);
            let count = map
                .and_then(|m| m.get(&Value::String("message-count".into())))
                .and_then(|v| if let Value::Int(n) = v { Some(*n) } else { None })
                .unwrap_or(1)
                .max(0) as usize;
            let messages = broker.namespace().peek(&address.entity, address.sub_queue, from, count, now);
            if messages.is_empty() {
                return response(request, 204, "No Content", Value::Null);
            }
            let encoded: Vec<Value> = messages
                .into_iter()
                .filter_map(|m| serde_amqp::to_vec(&Serializable(m)).ok())
                .map(|bytes| {
                    let mut entry = OrderedMap::new();
                    entry.insert(Value::String("message".into()), Value::Binary(Binary::from(bytes)));
                    Value::Map(entry)
                })
                .collect();
            let mut body = OrderedMap::new();
            body.insert(Value::String("messages".into()), Value::List(encoded));
            response(request, 200, "OK", Value::Map(body))
        }
        other => {
            response(request, 501, &format!("the Service Bus test double does not implement {other}"), Value::Null)
        }
    }
}

fn uuid_of(value: &Value) -> Option<[u8; 16]> {
    match value {
        Value::Uuid(u) => Some(*u.as_ref()),
        _ => None,
    }
}

// --- entities -------------------------------------------------------------------------------------

/// A client's sender: each message (or each message of a batch) is enqueued, then accepted; a
/// message the entity cannot take is rejected with the reason.
async fn entity_receiver(mut receiver: Receiver, path: String, broker: Arc<Broker>) {
    while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
        let batched = matches!(delivery.message_format(), Some(format) if *format == BATCH_MESSAGE_FORMAT);
        let message = delivery.message().clone();
        let messages = if batched { unbatch(message) } else { Ok(vec![message]) };
        let result = messages.and_then(|messages| {
            let mut namespace = broker.namespace();
            for message in messages {
                namespace.enqueue(&path, message).map_err(|e| match e {
                    EnqueueError::NotFound(what) => {
                        amqp_error(AmqpError::NotFound, format!("The messaging entity '{what}' could not be found."))
                    }
                    EnqueueError::NotAllowed(why) => amqp_error(AmqpError::NotAllowed, why),
                })?;
            }
            Ok(())
        });
        // See SETTLE_DELAY: an outcome sent at once can be lost by the client.
        tokio::time::sleep(SETTLE_DELAY).await;
        let _ = match result {
            Ok(()) => receiver.accept(&delivery).await,
            Err(error) => receiver.reject(&delivery, error).await,
        };
    }
}

fn unbatch(envelope: AmqpMessage) -> Result<Vec<AmqpMessage>, AmqpErrorFrame> {
    let Body::Data(sections) = envelope.body else {
        return Err(amqp_error(AmqpError::DecodeError, "a batch message must carry Data sections"));
    };
    sections
        .iter()
        .map(|data| {
            serde_amqp::from_slice::<Deserializable<AmqpMessage>>(&data.0)
                .map(|m| m.0)
                .map_err(|e| amqp_error(AmqpError::DecodeError, format!("a message of the batch does not decode: {e}")))
        })
        .collect()
}

/// A client's receiver: hands out peek-locked messages as the client gives credit, and settles
/// each lock by the client's disposition.
async fn entity_sender(mut sender: Sender, address: Address, broker: Arc<Broker>) {
    let Some(notify) = broker.namespace().notifier(&address.entity, address.sub_queue) else { return };
    loop {
        // Wait for a message, watching for the client's detach meanwhile.
        let (token, message) = loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(next) = broker.namespace().reserve_next(&address.entity, address.sub_queue, SystemTime::now()) {
                break next;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = sender.on_detach() => return,
            }
        };
        let sendable = Sendable::builder().message(message).build();
        // Waits for the client's credit; the message stays reserved (uncounted, no lock clock) meanwhile.
        match sender.send_batchable(sendable).await {
            Ok(outcome) => {
                broker.namespace().confirm_delivery(&address.entity, address.sub_queue, token, SystemTime::now());
                let broker = broker.clone();
                let address = address.clone();
                tokio::spawn(async move {
                    // An error here means the link or connection went away unsettled: the lock then
                    // runs out as in Service Bus.
                    if let Ok(outcome) = outcome.await {
                        broker.namespace().settle(&address.entity, address.sub_queue, token, settlement(outcome));
                    }
                });
            }
            Err(_) => {
                // Never reached the client (detached while waiting for credit).
                broker.namespace().unreserve(&address.entity, address.sub_queue, token);
                return;
            }
        }
    }
}

fn settlement(outcome: Outcome) -> Settlement {
    match outcome {
        Outcome::Accepted(_) => Settlement::Complete,
        Outcome::Released(_) => Settlement::Release,
        // Deferral (undeliverable-here) is not supported: it counts as an abandon.
        Outcome::Modified(_) => Settlement::Abandon,
        Outcome::Rejected(rejected) => {
            let info = rejected.error.as_ref().and_then(|e| e.info.as_ref());
            let field = |name: &str| {
                info.and_then(|i| i.get(&fe2o3_amqp::types::primitives::Symbol::from(name))).and_then(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    _ => None,
                })
            };
            Settlement::DeadLetter {
                reason: field("DeadLetterReason"),
                description: field("DeadLetterErrorDescription"),
            }
        }
        #[allow(unreachable_patterns)]
        _ => Settlement::Abandon,
    }
}
