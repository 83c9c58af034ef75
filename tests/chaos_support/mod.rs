//! The chaos harness: drives a workload through a bridge while a scenario breaks something, then
//! checks the outcome against the model of the commands sent ([`workload`]):
//!
//! - every command had exactly one effect: the store equals the model, and the version log holds
//!   each change of every applied command once (nothing missing, nothing twice, nothing else);
//! - every command got a reply, the reply says what the model predicted, and all replies to one
//!   command agree (repeats are counted);
//! - every committed change is in both kinds of change events at least once, per resource in
//!   version order (repeats are counted);
//! - the bridge recovered by itself (recovery times measured to `/readyz` 200 and to the first reply).
#![allow(dead_code)]

pub mod amqp;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod servers;
pub mod workload;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fhir_pubsub::contracts::{ChangeType, MessageType, read};
use fhir_pubsub::store::{Found, Lookup, ResourceKey, Store};
use fhir_pubsub::transport::TransportMeta;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use uuid::Uuid;

use workload::{ChangeKey, Command, Model, ResourceState};

/// How big a run is: `FHIR_PUBSUB_CHAOS=long` for the figures (20,000 commands a scenario), the
/// short run otherwise (CI); `FHIR_PUBSUB_CHAOS_COMMANDS` overrides the count.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    pub commands: u64,
    pub resources: usize,
    /// Commands in flight at once.
    pub window: usize,
    pub long: bool,
}

impl Size {
    pub fn from_env() -> Size {
        let long = std::env::var("FHIR_PUBSUB_CHAOS").is_ok_and(|v| v == "long");
        let default = if long { 20_000 } else { 1_500 };
        let commands = std::env::var("FHIR_PUBSUB_CHAOS_COMMANDS").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        Size { commands, resources: if long { 3_000 } else { 1_000 }, window: 32, long }
    }
}

/// One event message as received.
#[derive(Debug, Clone)]
pub struct EventMessage {
    pub message_type: MessageType,
    pub message_id: Uuid,
    pub changes: Vec<ChangeKey>,
}

/// Everything the client received: replies by requestId (in arrival order) and event messages.
#[derive(Default)]
pub struct Collected {
    replies: Mutex<HashMap<Uuid, Vec<Value>>>,
    events: Mutex<Vec<EventMessage>>,
    pub reply_count: AtomicU64,
    first_reply_count: AtomicU64,
}

impl Collected {
    /// Records a reply's `message`; true when it is the first for that request.
    pub fn reply(&self, request_id: Uuid, message: Value) -> bool {
        self.reply_count.fetch_add(1, Ordering::Relaxed);
        let mut replies = self.replies.lock().unwrap();
        let list = replies.entry(request_id).or_default();
        list.push(message);
        if list.len() == 1 {
            self.first_reply_count.fetch_add(1, Ordering::Relaxed);
        }
        list.len() == 1
    }

    /// Keeps an event message if it names a resource whose id starts with `tag`.
    pub fn event(&self, body: &[u8], meta: &TransportMeta, tag: &str) {
        let Ok(envelope) = fhir_pubsub::envelope::decode(body, meta) else { return };
        let Some(message_type) = envelope.message_kind() else { return };
        let Some(message) = envelope.message.as_deref() else { return };
        let Ok(changes) = read::changes(message) else { return };
        if !changes.iter().any(|c| c.reference.resource_id.starts_with(tag)) {
            return;
        }
        let changes = changes
            .into_iter()
            .map(|c| {
                let key = format!("{}/{}", c.reference.resource_type, c.reference.resource_id);
                (key, c.reference.version.unwrap_or_default(), c.change_type)
            })
            .collect();
        let message_id = envelope.message_id.unwrap_or_default();
        self.events.lock().unwrap().push(EventMessage { message_type, message_id, changes });
    }

    /// Commands answered at least once so far.
    pub fn answered(&self) -> u64 {
        self.first_reply_count.load(Ordering::Relaxed)
    }

    pub fn events(&self) -> Vec<EventMessage> {
        self.events.lock().unwrap().clone()
    }

    fn replies(&self) -> HashMap<Uuid, Vec<Value>> {
        self.replies.lock().unwrap().clone()
    }

    /// Waits until the events of both kinds hold every change of `log` (at most `limit`); true when they do.
    pub async fn wait_for_events(&self, log: &[ChangeKey], limit: Duration) -> bool {
        let want: HashSet<&ChangeKey> = log.iter().collect();
        let started = Instant::now();
        loop {
            let events = self.events();
            let covered =
                [MessageType::ResourcesChangedEvent, MessageType::ResourcesChangedLightEvent].iter().all(|t| {
                    let got: HashSet<&ChangeKey> =
                        events.iter().filter(|m| m.message_type == *t).flat_map(|m| m.changes.iter()).collect();
                    want.iter().all(|k| got.contains(k))
                });
            if covered {
                return true;
            }
            if started.elapsed() > limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Sends one command until the broker took it; returns the refused attempts.
#[async_trait::async_trait]
pub trait CommandSender: Send {
    async fn send(&mut self, command: &Command) -> u32;
}

#[async_trait::async_trait]
impl CommandSender for amqp::AmqpClient {
    async fn send(&mut self, command: &Command) -> u32 {
        amqp::AmqpClient::send(self, command).await
    }
}

/// What the driving of the workload gave.
pub struct Driven {
    pub model: Model,
    pub lost: Vec<Command>,
    /// Publishes the broker refused (sent again).
    pub resent: u64,
    pub seconds: f64,
}

/// Sends `size.commands` commands, at most `size.window` in flight, and waits for their replies;
/// a command still unanswered once no reply came for `quiet` is lost.
pub async fn drive(
    mut model: Model,
    sender: &mut dyn CommandSender,
    first_replies: &mut mpsc::UnboundedReceiver<(Uuid, Value)>,
    size: Size,
    quiet: Duration,
) -> Driven {
    let started = Instant::now();
    let mut generated = 0u64;
    let mut resent = 0u64;
    let mut last_progress = Instant::now();
    loop {
        while let Ok((id, message)) = first_replies.try_recv() {
            model.on_first_reply(id, &message);
            last_progress = Instant::now();
        }
        if generated < size.commands && model.in_flight.len() < size.window {
            if let Some(command) = model.generate() {
                generated += 1;
                resent += u64::from(sender.send(&command).await);
                last_progress = Instant::now();
                continue;
            }
        }
        if generated >= size.commands && model.in_flight.is_empty() {
            break;
        }
        if last_progress.elapsed() > quiet {
            break;
        }
        if let Ok(Some((id, message))) = tokio::time::timeout(Duration::from_millis(500), first_replies.recv()).await {
            model.on_first_reply(id, &message);
            last_progress = Instant::now();
        }
    }
    let lost = model.give_up_in_flight();
    Driven { model, lost, resent, seconds: started.elapsed().as_secs_f64() }
}

/// The figures of one scenario.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    pub scenario: String,
    pub store: String,
    pub commands: u64,
    pub applied: u64,
    pub refused_by_design: u64,
    /// Commands never answered.
    pub lost: u64,
    /// Replies that said something else than the model predicted.
    pub wrong_outcomes: u64,
    /// Commands whose replies disagree with each other.
    pub disagreeing_replies: u64,
    /// Replies beyond the first (a redelivered command answered again from the inbox).
    pub repeated_replies: u64,
    /// Resources whose stored state differs from the model.
    pub store_mismatches: u64,
    /// Changes of applied commands that are not in the version log.
    pub missing_effects: u64,
    /// Changes in the version log more than once, or of no applied command.
    pub duplicated_effects: u64,
    pub committed_changes: u64,
    /// Committed changes missing from the full / light events.
    pub events_missing: u64,
    /// Resources whose events are not in version order.
    pub events_out_of_order: u64,
    /// Change entries received more than once (full + light).
    pub duplicated_events: u64,
    /// Publishes of commands the broker did not confirm (sent again with the same messageId).
    pub resent_publishes: u64,
    /// Event publishes the broker refused (nacked) and the bridge's publisher retried, from its
    /// log (the last process's log after a restart).
    pub refused_event_publishes: u64,
    /// Fault → `/readyz` 200, per fault, in seconds.
    pub recovery_ready_s: Vec<f64>,
    /// Fault end → the next reply, per fault, in seconds.
    pub recovery_reply_s: Vec<f64>,
    pub seconds: f64,
    /// Details of every failed check (empty when clean).
    pub problems: Vec<String>,
}

impl Report {
    pub fn print(&self) {
        let list = |v: &[f64]| v.iter().map(|s| format!("{s:.1}")).collect::<Vec<_>>().join(",");
        eprintln!(
            "CHAOS scenario={} store={} commands={} applied={} refused_by_design={} lost={} wrong_outcomes={} \
             disagreeing_replies={} repeated_replies={} store_mismatches={} missing_effects={} duplicated_effects={} \
             committed_changes={} events_missing={} events_out_of_order={} duplicated_events={} resent_publishes={} \
             refused_event_publishes={} recovery_ready_s=[{}] recovery_reply_s=[{}] seconds={:.0}",
            self.scenario,
            self.store,
            self.commands,
            self.applied,
            self.refused_by_design,
            self.lost,
            self.wrong_outcomes,
            self.disagreeing_replies,
            self.repeated_replies,
            self.store_mismatches,
            self.missing_effects,
            self.duplicated_effects,
            self.committed_changes,
            self.events_missing,
            self.events_out_of_order,
            self.duplicated_events,
            self.resent_publishes,
            self.refused_event_publishes,
            list(&self.recovery_ready_s),
            list(&self.recovery_reply_s),
            self.seconds
        );
        for problem in self.problems.iter().take(20) {
            eprintln!("CHAOS problem: {problem}");
        }
        if let Ok(path) = std::env::var("FHIR_PUBSUB_CHAOS_REPORT") {
            use std::io::Write;
            if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = writeln!(file, "{}", serde_json::to_string(self).unwrap_or_default());
            }
        }
    }

    /// Panics naming every failed check.
    pub fn assert_clean(&self) {
        assert!(self.problems.is_empty(), "{}: {} problems: {:#?}", self.scenario, self.problems.len(), self.problems);
    }
}

fn change_key(c: &fhir_pubsub::store::PendingChange) -> ChangeKey {
    (c.key.to_string(), c.version_id.clone(), c.change_type)
}

/// Runs every check of the harness on a finished run and returns the report.
pub async fn check(
    scenario: &str,
    store_name: &str,
    store: &dyn Store,
    driven: &Driven,
    collected: &Collected,
    event_limit: Duration,
) -> Report {
    let model = &driven.model;
    let mut report = Report {
        scenario: scenario.to_owned(),
        store: store_name.to_owned(),
        commands: model.sent.len() as u64,
        seconds: driven.seconds,
        resent_publishes: driven.resent,
        ..Report::default()
    };
    let mut problems = Vec::new();

    // Replies: one per command at least, all alike, as predicted.
    let replies = collected.replies();
    for command in &driven.lost {
        problems.push(format!("lost: command {} ({}) got no reply", command.number, command.id));
    }
    report.lost = driven.lost.len() as u64;
    for (id, answers) in &replies {
        if !model.sent.contains_key(id) {
            continue;
        }
        report.repeated_replies += answers.len() as u64 - 1;
        if answers.iter().any(|a| a != &answers[0]) {
            report.disagreeing_replies += 1;
            problems.push(format!("replies to {id} disagree: {answers:?}"));
        }
        if answers[0]["errors"].as_array().is_some_and(|e| e.is_empty()) {
            report.applied += 1;
        } else {
            report.refused_by_design += 1;
        }
    }
    report.wrong_outcomes = model.wrong_outcomes.len() as u64;
    problems.extend(model.wrong_outcomes.iter().cloned());

    // The store equals the model.
    let keys: Vec<usize> = (0..model.states.len()).filter(|r| model.states[*r] != ResourceState::Unknown).collect();
    for chunk in keys.chunks(500) {
        let lookups: Vec<Lookup> = chunk
            .iter()
            .map(|r| Lookup { key: ResourceKey::new("Patient", model.resource_id(*r)), version_id: None })
            .collect();
        let found = store.read(&lookups).await.expect("the store answers after the run");
        for (r, found) in chunk.iter().zip(found) {
            let ok = match (&model.states[*r], &found) {
                (ResourceState::Live { body, .. }, Found::Resource(stored)) => stored == body,
                (ResourceState::Absent | ResourceState::Deleted { .. }, Found::NoResource) => true,
                _ => false,
            };
            if !ok {
                report.store_mismatches += 1;
                problems.push(format!("{}: model {:?}, store {found:?}", model.resource_id(*r), model.states[*r]));
            }
        }
    }

    // The version log holds each change of every applied command once.
    let log: Vec<ChangeKey> = store.version_log().await.expect("version log").iter().map(change_key).collect();
    report.committed_changes = log.len() as u64;
    let mut in_log: HashMap<&ChangeKey, u64> = HashMap::new();
    for key in &log {
        *in_log.entry(key).or_default() += 1;
    }
    let expected: HashSet<&ChangeKey> = model.expected_changes.iter().collect();
    let unknown: HashSet<String> =
        driven.lost.iter().flat_map(|c| c.steps.iter().map(|s| s.change.0.clone())).collect();
    for key in &model.expected_changes {
        if !in_log.contains_key(key) {
            report.missing_effects += 1;
            problems.push(format!("missing effect: {key:?}"));
        }
    }
    for (key, count) in &in_log {
        if *count > 1 {
            report.duplicated_effects += count - 1;
            problems.push(format!("effect {key:?} committed {count} times"));
        } else if !expected.contains(key) && !unknown.contains(&key.0) {
            report.duplicated_effects += 1;
            problems.push(format!("effect {key:?} of no applied command"));
        }
    }

    // Events: every committed change, per resource in version order; repeats counted.
    if !collected.wait_for_events(&log, event_limit).await {
        problems.push(format!("events did not cover the version log within {event_limit:?}"));
    }
    let events = collected.events();
    for message_type in [MessageType::ResourcesChangedEvent, MessageType::ResourcesChangedLightEvent] {
        let changes: Vec<&ChangeKey> =
            events.iter().filter(|m| m.message_type == message_type).flat_map(|m| m.changes.iter()).collect();
        let mut seen: HashSet<&ChangeKey> = HashSet::new();
        let mut first_order: HashMap<&str, Vec<&ChangeKey>> = HashMap::new();
        for key in &changes {
            if seen.insert(key) {
                first_order.entry(key.0.as_str()).or_default().push(key);
            } else {
                report.duplicated_events += 1;
            }
        }
        let mut log_order: HashMap<&str, Vec<&ChangeKey>> = HashMap::new();
        for key in &log {
            if !seen.contains(key) {
                report.events_missing += 1;
                problems.push(format!("{message_type:?}: committed change {key:?} never published"));
            }
            log_order.entry(key.0.as_str()).or_default().push(key);
        }
        for (resource, logged) in &log_order {
            let published: Vec<&ChangeKey> = first_order.get(resource).cloned().unwrap_or_default();
            let logged: Vec<&ChangeKey> = logged.iter().filter(|k| seen.contains(**k)).copied().collect();
            if published != logged {
                report.events_out_of_order += 1;
                problems
                    .push(format!("{message_type:?}: {resource} published as {published:?}, committed as {logged:?}"));
            }
        }
        // A delete names the version it removed; anything else names a version the log holds.
        debug_assert!(changes.iter().all(|k| k.2 != ChangeType::Delete || !k.1.is_empty()));
    }
    report.problems = problems;
    report
}

/// The status code of `GET path` at `address`, `None` when nothing answers.
pub async fn http_status(address: std::net::SocketAddr, path: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Waits until `/readyz` at `address` answers 200; the time it took from `since`.
pub async fn ready_since(address: std::net::SocketAddr, since: Instant, limit: Duration) -> Option<Duration> {
    while since.elapsed() < limit {
        if http_status(address, "/readyz").await == Some(200) {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Waits until `answered` moves past `before`; the time it took from `since`.
pub async fn reply_since(collected: &Collected, before: u64, since: Instant, limit: Duration) -> Option<Duration> {
    while since.elapsed() < limit {
        if collected.answered() > before {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Waits until `fraction` of `total` commands are answered, or the workload `driving` ended.
pub async fn wait_answered<T>(collected: &Collected, total: u64, fraction: f64, driving: &tokio::task::JoinHandle<T>) {
    let target = (total as f64 * fraction) as u64;
    while collected.answered() < target && !driving.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
