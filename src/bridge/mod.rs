//! The command pipeline: decode → execute → reply → acknowledge, with bounded concurrency.
//!
//! Acknowledgement invariant: a delivery is acknowledged only after its effect is durable (the SQL
//! transaction committed) **and** its reply, if it asked for one, was confirmed by the broker. When
//! the store or the broker is unavailable the delivery is given back (`retry_later`); a redelivery
//! of a store plan that did commit is answered from the inbox, so it has one effect.
//!
//! Messages that can never be handled go to the error queue with the reason, and a `Fault<T>` goes to
//! the fault or response address; messages of a type nobody here consumes go to the skipped queue.
//! Neither ever blocks the queue or stops the process.
//!
//! Every delivery is counted on the input's [`EndpointStats`] (delivered, failed attempts, skipped,
//! in process) and in the metrics of [`crate::observe::metrics`] once its fate is known.
//!
//! Ordering: commands are handled concurrently (up to `ConcurrencyNumber`), but two commands that
//! touch the same resource are applied in the order they arrived ([`KeyOrder`]). A claim check,
//! whose resources are unknown until its blob is read, waits for the commands before it and holds
//! up the ones after it.
//!
//! Claim checks ([`crate::claimcheck`]): a URL outside the configured storage, a missing blob or one
//! that is no plan is answered like an invalid plan (and recorded in the inbox); a storage outage
//! gives the command back like a database outage. A redelivered claim check the inbox has answered
//! is answered from there, without fetching the blob again.

mod group_commit;
mod order;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{Notify, Semaphore, watch};
use uuid::Uuid;

use crate::claimcheck::{BlobRef, ClaimCheckError, ClaimChecks};
use crate::contracts::read::{self, StorePlanMessage};
use crate::contracts::{ExecuteStorePlanResponse, ItemError, MessageType, StatusDetails};
use crate::envelope::{self, Envelope};
use crate::observe::metrics as m;
use crate::observe::{EndpointStats, StatusBoard};
use crate::plan::{self, PlanLimits, StoreJob};
use crate::store::{ResourceKey, Store, StoreError};
use crate::transport::{Delivery, FaultReason, OutgoingMessage, Transport, TransportError};

pub use group_commit::GroupCommit;
pub use order::KeyOrder;

/// How the bridge handles commands.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// Commands handled at the same time (`ConcurrencyNumber`).
    pub concurrency: usize,
    /// Bodies larger than this go to the error queue unread (`Limits.MaxMessageBytes`).
    pub max_message_bytes: usize,
    /// Bodies nesting arrays and objects deeper than this go to the error queue unparsed
    /// (`Limits.MaxJsonDepth`).
    pub max_json_depth: usize,
    pub plan_limits: PlanLimits,
}

impl Default for BridgeOptions {
    fn default() -> Self {
        BridgeOptions {
            concurrency: 64,
            max_message_bytes: 16 * 1024 * 1024,
            max_json_depth: 128,
            plan_limits: PlanLimits::default(),
        }
    }
}

/// The bridge between one transport and one store.
pub struct Bridge {
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    options: BridgeOptions,
    /// Woken after each commit that recorded changes, so events go out at once.
    changes_waker: Option<Arc<Notify>>,
    /// The figures of this bridge's input (on the status board when one is given).
    input_stats: Arc<EndpointStats>,
    /// Store plans handled at the same time commit together.
    group_commit: Arc<GroupCommit>,
    /// Where claim-check plans are fetched from; `None`: claim checks are refused.
    claim_checks: Option<Arc<ClaimChecks>>,
}

/// What became of one delivery (logged, and used by tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Applied or answered, and acknowledged.
    Done,
    /// Sent to the error queue.
    Error(String),
    /// Sent to the skipped queue.
    Skipped,
    /// Given back to the broker for a later attempt.
    Retry(String),
}

impl Bridge {
    pub fn new(store: Arc<dyn Store>, transport: Arc<dyn Transport>, options: BridgeOptions) -> Self {
        // One group commits at a time, as large as the commands in process allow: SQLite has one
        // writer at a time and flushes to disk at each commit; on PostgreSQL a group costs the same
        // four statements whatever its size (see `plan::execute_store_plans`), and measured with
        // 64 commands in process, 1 group at a time carried 2,000 commands/s, 2 at once 1,700 and
        // 4 at once 1,600: the commit's flush is shorter than the work that fewer, larger groups save.
        let group_commit = GroupCommit::new(store.clone());
        Bridge {
            store,
            transport,
            options,
            changes_waker: None,
            input_stats: Arc::default(),
            group_commit,
            claim_checks: None,
        }
    }

    /// Fetches claim-check plans from `claim_checks` (without, they are refused).
    pub fn with_claim_checks(mut self, claim_checks: Arc<ClaimChecks>) -> Self {
        self.claim_checks = Some(claim_checks);
        self
    }

    /// Reports this bridge's figures on `board`, under the transport's input address.
    pub fn with_status_board(mut self, board: &StatusBoard) -> Self {
        self.input_stats = board.input(&self.transport.input_address());
        self
    }

    /// Wakes `waker` after every commit that recorded changes (the change publisher).
    pub fn with_changes_waker(mut self, waker: Arc<Notify>) -> Self {
        self.changes_waker = Some(waker);
        self
    }

    /// Consumes commands until `shutdown` turns true, then waits for the commands in flight.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) -> Result<(), TransportError> {
        let mut deliveries = self.transport.start().await?;
        let permits = Arc::new(Semaphore::new(self.options.concurrency.max(1)));
        let mut order = KeyOrder::default();
        tracing::info!(input = %self.transport.input_address(), concurrency = self.options.concurrency, "bridge consuming commands");
        loop {
            let delivery = tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                d = deliveries.recv() => match d { Some(d) => d, None => break },
            };
            let Ok(permit) = permits.clone().acquire_owned().await else { break };
            // Decode here, in arrival order, so that the resources a command touches are known
            // before it is handed to a task; decoding is cheap next to the SQL it precedes.
            let prepared = self.prepare(&delivery);
            let (waits, done) = match &prepared {
                Prepared::ClaimCheck(..) => order.enter_exclusive(),
                _ => order.enter(prepared.keys()),
            };
            let bridge = self.clone();
            tokio::spawn(async move {
                for wait in waits {
                    let _ = wait.await;
                }
                // Boxed: the handling future is several KB, and a task's future is moved by value
                // on its way into the runtime; this way only the captured values are.
                let outcome = Box::pin(bridge.handle(delivery, prepared)).await;
                drop(done);
                drop(permit);
                outcome
            });
        }
        // Wait for the commands in flight.
        let _ = permits.acquire_many(self.options.concurrency.max(1) as u32).await;
        tracing::info!("bridge stopped consuming");
        Ok(())
    }

    /// Handles one delivery from start to acknowledgement (tests call this directly).
    pub async fn handle_delivery(&self, delivery: Delivery) -> Handled {
        let prepared = self.prepare(&delivery);
        self.handle(delivery, prepared).await
    }

    fn prepare(&self, delivery: &Delivery) -> Prepared {
        if delivery.body.len() > self.options.max_message_bytes {
            return Prepared::Unreadable(FaultReason {
                exception_type: "MessageTooLarge".into(),
                message: format!(
                    "The message has {} bytes; at most {} are accepted (Limits.MaxMessageBytes). Send large plans by claim check.",
                    delivery.body.len(),
                    self.options.max_message_bytes
                ),
                message_type: None,
            });
        }
        if crate::json::nesting_exceeds(&delivery.body, self.options.max_json_depth) {
            return Prepared::Unreadable(FaultReason {
                exception_type: "MessageTooDeep".into(),
                message: format!(
                    "The message nests arrays and objects more than {} deep (Limits.MaxJsonDepth); FHIR resources need far less.",
                    self.options.max_json_depth
                ),
                message_type: None,
            });
        }
        let envelope = match envelope::decode(&delivery.body, &delivery.meta) {
            Ok(e) => e,
            Err(e) => {
                return Prepared::Unreadable(FaultReason {
                    exception_type: "EnvelopeDecodeError".into(),
                    message: e.to_string(),
                    message_type: None,
                });
            }
        };
        let Some(kind) = envelope.message_kind().or(delivery.meta.type_hint) else {
            return Prepared::Skip;
        };
        if !matches!(kind, MessageType::ExecuteStorePlanCommand | MessageType::RetrievePlanCommand) {
            return Prepared::Skip;
        }
        let Some(message) = envelope.message.as_deref() else {
            return Prepared::Fault(
                envelope.clone(),
                kind,
                "MissingMessage".into(),
                "The envelope has no `message`; put the command in `message`.".into(),
            );
        };
        match kind {
            MessageType::ExecuteStorePlanCommand => {
                let job = match read::store_plan(message) {
                    Ok(StorePlanMessage::Instructions(list)) => StoreJob {
                        message_id: envelope.message_id,
                        plan: plan::validate_store_plan(list, &self.options.plan_limits),
                    },
                    Ok(StorePlanMessage::ClaimCheck { data_ref }) => {
                        let resolved = match &self.claim_checks {
                            Some(claim_checks) => claim_checks.resolve(&data_ref),
                            None => Err(ClaimCheckError::Disabled),
                        };
                        match resolved {
                            Ok(blob) => return Prepared::ClaimCheck(envelope, ClaimCheck { data_ref, blob }),
                            Err(refused) => {
                                metrics::counter!(m::CLAIM_CHECKS, "outcome" => refused.outcome()).increment(1);
                                tracing::info!(reason = %refused, "claim check refused");
                                StoreJob { message_id: envelope.message_id, plan: Err(vec![refused.item_error()]) }
                            }
                        }
                    }
                    Err(e) => StoreJob {
                        message_id: envelope.message_id,
                        plan: Err(vec![ItemError::new(
                            None,
                            StatusDetails::BadRequestWrongPayloadFormat,
                            format!("The store plan cannot be read: {e}."),
                        )]),
                    },
                };
                Prepared::Store(envelope, job)
            }
            _ => Prepared::Retrieve(envelope),
        }
    }

    /// Handles one delivery and counts what became of it.
    async fn handle(&self, delivery: Delivery, prepared: Prepared) -> Handled {
        let _in_process = self.input_stats.begin();
        let started = Instant::now();
        let message_type = prepared.message_type();
        metrics::counter!(m::COMMANDS_RECEIVED, "type" => message_type).increment(1);
        let mut reply_outcome = None;
        let handled = self.process(delivery, prepared, &mut reply_outcome).await;
        let outcome = match &handled {
            Handled::Done => {
                self.input_stats.delivered();
                reply_outcome.unwrap_or("success")
            }
            Handled::Error(reason) => {
                self.input_stats.failed(format!("moved to the error queue: {reason}"));
                metrics::counter!(m::ERROR_QUEUE_MOVES).increment(1);
                "error_queue"
            }
            Handled::Skipped => {
                self.input_stats.skipped();
                metrics::counter!(m::SKIPPED_QUEUE_MOVES).increment(1);
                "skipped"
            }
            Handled::Retry(reason) => {
                self.input_stats.failed(format!("given back for a later attempt: {reason}"));
                "retry"
            }
        };
        metrics::counter!(m::COMMANDS, "type" => message_type, "outcome" => outcome).increment(1);
        metrics::histogram!(m::PLAN_DURATION, "type" => message_type).record(started.elapsed().as_secs_f64());
        handled
    }

    /// Handles one delivery from decoding to acknowledgement. `reply_outcome` gets the status code
    /// of the reply once there is one.
    async fn process(
        &self,
        delivery: Delivery,
        prepared: Prepared,
        reply_outcome: &mut Option<&'static str>,
    ) -> Handled {
        let acker = &delivery.acker;
        let outcome = match prepared {
            Prepared::Unreadable(reason) => {
                tracing::warn!(reason = %reason.message, "message cannot be read; moving it to the error queue");
                return match acker.move_to_error(&reason).await {
                    Ok(()) => Handled::Error(reason.message),
                    Err(e) => Handled::Retry(e.to_string()),
                };
            }
            Prepared::Skip => {
                tracing::info!("message of a type this bridge does not consume; moving it to the skipped queue");
                return match acker.move_to_skipped().await {
                    Ok(()) => Handled::Skipped,
                    Err(e) => Handled::Retry(e.to_string()),
                };
            }
            Prepared::Fault(envelope, kind, exception_type, message) => {
                return self.fault(&delivery, &envelope, kind, &exception_type, &message).await;
            }
            Prepared::Store(envelope, job) => self.store_plan(&envelope, job).await.map(|r| (envelope, r)),
            Prepared::ClaimCheck(envelope, claim) => match self.claim_check_job(&envelope, claim).await {
                Ok(job) => self.store_plan(&envelope, job).await.map(|r| (envelope, r)),
                Err(e) => {
                    tracing::warn!(error = %e, "claim-check storage unavailable; the command will be delivered again");
                    return match acker.retry_later().await {
                        Ok(()) | Err(_) => Handled::Retry(e.to_string()),
                    };
                }
            },
            Prepared::Retrieve(envelope) => self.retrieve_plan(&envelope).await.map(|r| (envelope, r)),
        };
        let (envelope, reply) = match outcome {
            Ok(done) => {
                *reply_outcome = Some(done.1.outcome);
                done
            }
            Err(e) if e.is_unavailable() || e.is_conflict() => {
                tracing::warn!(error = %e, "store unavailable; the command will be delivered again");
                return match acker.retry_later().await {
                    Ok(()) | Err(_) => Handled::Retry(e.to_string()),
                };
            }
            Err(e) => {
                let kind = envelope_kind(&delivery);
                return self.fault_decoded(&delivery, kind, "StoreError", &e.to_string()).await;
            }
        };
        if let Some(address) = envelope.response_address.as_deref() {
            let sent = self.reply(&delivery, &envelope, address, reply).await;
            if sent.is_ok() {
                metrics::counter!(m::REPLIES_SENT).increment(1);
            }
            if let Err(e) = sent {
                if e.is_retryable() {
                    tracing::warn!(error = %e, "reply not confirmed; the command will be delivered again");
                    let _ = acker.retry_later().await;
                    return Handled::Retry(e.to_string());
                }
                // The effect is committed; the reply can never be sent. Keep the message for the operator.
                let reason = FaultReason {
                    exception_type: "ReplyFailed".into(),
                    message: format!("The command was processed, but its reply to {address} failed: {e}"),
                    message_type: envelope_kind(&delivery),
                };
                tracing::warn!(reason = %reason.message, "moving the message to the error queue");
                return match acker.move_to_error(&reason).await {
                    Ok(()) => Handled::Error(reason.message),
                    Err(e) => Handled::Retry(e.to_string()),
                };
            }
        }
        match acker.ack().await {
            Ok(()) => Handled::Done,
            Err(e) => Handled::Retry(e.to_string()),
        }
    }

    /// The store job of a claim check: its plan read from the blob, or the reason there is none.
    /// `Err` only when the storage is unavailable (the command is delivered again later).
    async fn claim_check_job(&self, envelope: &Envelope, claim: ClaimCheck) -> Result<StoreJob, ClaimCheckError> {
        let message_id = envelope.message_id;
        if let Some(id) = message_id
            && let Ok(Some(_)) = self.store.inbox_response(id).await
        {
            // Answered before: the transaction replays the inbox's answer in place of this plan,
            // which only shows if that answer vanished in between.
            metrics::counter!(m::CLAIM_CHECKS, "outcome" => "answered_from_inbox").increment(1);
            let gone = ItemError {
                item_id: None,
                status: crate::contracts::Status::internal(),
                message: Some("This claim check was answered before, but its answer is no longer stored.".into()),
            };
            return Ok(StoreJob { message_id, plan: Err(vec![gone]) });
        }
        let Some(claim_checks) = &self.claim_checks else {
            return Ok(StoreJob { message_id, plan: Err(vec![ClaimCheckError::Disabled.item_error()]) });
        };
        let fetched = claim_checks.fetch(&claim.data_ref, &claim.blob).await;
        let outcome = fetched.as_ref().map(|_| "fetched").unwrap_or_else(ClaimCheckError::outcome);
        metrics::counter!(m::CLAIM_CHECKS, "outcome" => outcome).increment(1);
        match fetched {
            Ok(list) => Ok(StoreJob { message_id, plan: plan::validate_store_plan(list, &self.options.plan_limits) }),
            Err(e) if e.is_retryable() => Err(e),
            Err(e) => {
                tracing::info!(reason = %e, "claim check answered with an error");
                Ok(StoreJob { message_id, plan: Err(vec![e.item_error()]) })
            }
        }
    }

    async fn store_plan(&self, envelope: &Envelope, job: StoreJob) -> Result<Reply, StoreError> {
        if let Ok(list) = &job.plan {
            metrics::histogram!(m::PLAN_INSTRUCTIONS, "type" => MessageType::ExecuteStorePlanCommand.as_str())
                .record(list.len() as f64);
        }
        let instructions = job.plan.as_ref().map(Vec::len).unwrap_or(0);
        let outcome = self.group_commit.execute(job).await?;
        if outcome.changes > 0
            && let Some(waker) = &self.changes_waker
        {
            waker.notify_one();
        }
        tracing::info!(
            message_id = ?envelope.message_id,
            instructions,
            errors = outcome.response.errors.len(),
            changes = outcome.changes,
            replayed = outcome.replayed,
            "store plan handled"
        );
        let code =
            outcome.response.errors.first().map(|e| e.status.code).unwrap_or(crate::contracts::StatusCode::Success);
        Ok(Reply::new(MessageType::ExecuteStorePlanResponse, &outcome.response, code))
    }

    async fn retrieve_plan(&self, envelope: &Envelope) -> Result<Reply, StoreError> {
        let response = match envelope.message.as_deref().map(read::retrieve_plan) {
            Some(Ok(list)) if list.len() > self.options.plan_limits.max_instructions => {
                crate::contracts::RetrievePlanResponse {
                    items: vec![crate::contracts::RetrieveItem {
                        item_id: None,
                        resource: None,
                        status: crate::contracts::Status::of(StatusDetails::BadRequestWrongPayloadFormat),
                        message: Some(format!(
                            "The plan has {} instructions; at most {} are accepted in one plan (Limits.MaxInstructionsPerPlan). Split it into several plans.",
                            list.len(),
                            self.options.plan_limits.max_instructions
                        )),
                    }],
                }
            }
            Some(Ok(list)) => {
                metrics::histogram!(m::PLAN_INSTRUCTIONS, "type" => MessageType::RetrievePlanCommand.as_str())
                    .record(list.len() as f64);
                plan::execute_retrieve_plan(self.store.as_ref(), list).await?
            }
            Some(Err(e)) => crate::contracts::RetrievePlanResponse {
                items: vec![crate::contracts::RetrieveItem {
                    item_id: None,
                    resource: None,
                    status: crate::contracts::Status::of(StatusDetails::BadRequestWrongPayloadFormat),
                    message: Some(format!("The retrieve plan cannot be read: {e}.")),
                }],
            },
            None => crate::contracts::RetrievePlanResponse::default(),
        };
        let code = response
            .items
            .iter()
            .map(|item| item.status.code)
            .find(|code| *code != crate::contracts::StatusCode::Success)
            .unwrap_or(crate::contracts::StatusCode::Success);
        Ok(Reply::new(MessageType::RetrievePlanResponse, &response, code))
    }

    async fn reply(
        &self,
        delivery: &Delivery,
        request: &Envelope,
        address: &str,
        reply: Reply,
    ) -> Result<(), TransportError> {
        let response = Envelope::response(request, reply.kind, reply.message, &self.transport.input_address(), address);
        self.transport.send(address, outgoing(&response, delivery)).await
    }

    /// Moves a decoded message that cannot be handled to the error queue, and sends `Fault<T>`.
    async fn fault(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        kind: MessageType,
        exception_type: &str,
        message: &str,
    ) -> Handled {
        if let Some(target) = envelope.fault_target() {
            let fault =
                Envelope::fault(envelope, kind, exception_type, message, &self.transport.input_address(), target);
            match self.transport.send(target, outgoing(&fault, delivery)).await {
                Ok(()) => metrics::counter!(m::FAULTS).increment(1),
                Err(e) => tracing::warn!(error = %e, address = target, "fault could not be sent"),
            }
        }
        let reason =
            FaultReason { exception_type: exception_type.into(), message: message.into(), message_type: Some(kind) };
        tracing::warn!(reason = message, "command failed; moving it to the error queue");
        match delivery.acker.move_to_error(&reason).await {
            Ok(()) => Handled::Error(message.into()),
            Err(e) => Handled::Retry(e.to_string()),
        }
    }

    async fn fault_decoded(
        &self,
        delivery: &Delivery,
        kind: Option<MessageType>,
        exception_type: &str,
        message: &str,
    ) -> Handled {
        match (envelope::decode(&delivery.body, &delivery.meta), kind) {
            (Ok(envelope), Some(kind)) => self.fault(delivery, &envelope, kind, exception_type, message).await,
            _ => {
                let reason =
                    FaultReason { exception_type: exception_type.into(), message: message.into(), message_type: kind };
                match delivery.acker.move_to_error(&reason).await {
                    Ok(()) => Handled::Error(message.into()),
                    Err(e) => Handled::Retry(e.to_string()),
                }
            }
        }
    }
}

fn envelope_kind(delivery: &Delivery) -> Option<MessageType> {
    envelope::decode(&delivery.body, &delivery.meta).ok().and_then(|e| e.message_kind()).or(delivery.meta.type_hint)
}

/// A decoded delivery, ready to be handled.
enum Prepared {
    Unreadable(FaultReason),
    Skip,
    Fault(Envelope, MessageType, String, String),
    Store(Envelope, StoreJob),
    /// A store plan whose instructions are in a blob the URL rule accepts (not fetched yet).
    ClaimCheck(Envelope, ClaimCheck),
    Retrieve(Envelope),
}

/// A claim check to fetch: the URL as sent, and the blob it resolved to.
struct ClaimCheck {
    data_ref: String,
    blob: BlobRef,
}

impl Prepared {
    /// The message type, as the metrics label it.
    fn message_type(&self) -> &'static str {
        match self {
            Prepared::Unreadable(_) => "unknown",
            Prepared::Skip => "other",
            Prepared::Fault(_, kind, _, _) => kind.as_str(),
            Prepared::Store(..) | Prepared::ClaimCheck(..) => MessageType::ExecuteStorePlanCommand.as_str(),
            Prepared::Retrieve(_) => MessageType::RetrievePlanCommand.as_str(),
        }
    }

    /// The resources the command touches, for ordering.
    fn keys(&self) -> Vec<ResourceKey> {
        match self {
            Prepared::Store(_, StoreJob { plan: Ok(list), .. }) => list.iter().map(|i| i.key.clone()).collect(),
            Prepared::Retrieve(envelope) => envelope
                .message
                .as_deref()
                .and_then(|m| read::retrieve_plan(m).ok())
                .map(|list| {
                    list.into_iter().filter_map(|i| Some(ResourceKey::new(i.resource_type?, i.resource_id?))).collect()
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

/// A response message, its type and its outcome (the status code the metrics count it under).
struct Reply {
    kind: MessageType,
    message: Box<RawValue>,
    outcome: &'static str,
}

impl Reply {
    fn new(kind: MessageType, message: &impl Serialize, code: crate::contracts::StatusCode) -> Self {
        let message = serde_json::value::to_raw_value(message).unwrap_or_else(|_| {
            // The contract types always serialize; keep the reply well-formed regardless.
            serde_json::value::to_raw_value(&ExecuteStorePlanResponse::default()).expect("empty response serializes")
        });
        Reply { kind, message, outcome: code.as_str() }
    }
}

/// The transport message for an envelope we send in answer to `delivery`.
fn outgoing(envelope: &Envelope, delivery: &Delivery) -> OutgoingMessage {
    // A reply inherits the request's remaining time to live, at least one second (MassTransit).
    let time_to_live = envelope.expiration_time.map(|t| {
        let left = (t - chrono::Utc::now()).to_std().unwrap_or_default();
        left.max(Duration::from_secs(1))
    });
    OutgoingMessage {
        body: envelope::encode(envelope),
        content_type: envelope::ENVELOPE_CONTENT_TYPE,
        message_id: envelope.message_id.unwrap_or_else(Uuid::now_v7),
        correlation_id: envelope.correlation_id,
        headers: envelope::transport_headers(envelope),
        time_to_live,
        reply_to: delivery.meta.reply_to.clone(),
        // Service Bus: a reply goes to the requester's session and partition (MassTransit).
        key: delivery.meta.partition_key.clone(),
        session_id: delivery.meta.reply_session_id.clone(),
    }
}
