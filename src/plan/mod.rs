//! Store and retrieve plans: validation, execution against a [`Store`], and the mapping of every
//! outcome to a Firely status.
//!
//! Invariants:
//! - a store plan is all or nothing: every rule is checked against the locked state before any of
//!   its writes, so a failing instruction leaves nothing written (the response names every failing
//!   instruction); data the database refuses is undone by the plan's savepoint;
//! - several plans may share one SQL transaction (group commit); one plan's failure never affects
//!   another's, and the effect of all of them is durable only when [`execute_store_plans`] returns `Ok`;
//! - a plan whose messageId is in the inbox is not applied again; its stored response is returned;
//! - a transaction that loses a race (deadlock, concurrent insert) is run again from the start, so
//!   rules are always checked against the state the transaction commits on.

mod validate;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

pub use validate::{PlanLimits, ResourceVersion, ValidInstruction, validate_store_plan};

use crate::contracts::read::RetrieveInstructionRead;
use crate::contracts::{
    ExecuteStorePlanResponse, ItemError, MessageType, Operation, RetrieveItem, RetrievePlanResponse, Status,
    StatusDetails,
};
use crate::store::{Current, Found, InboxEntry, Lookup, NewVersion, ResourceKey, Store, StoreError, StoreTx, Write};

/// One store plan to execute.
#[derive(Debug, Clone)]
pub struct StoreJob {
    /// The command's messageId; with it the outcome is recorded in the inbox.
    pub message_id: Option<Uuid>,
    /// The validated instructions, or the errors validation found (recorded in the inbox like any outcome).
    pub plan: Result<Vec<ValidInstruction>, Vec<ItemError>>,
}

/// What happened to one plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOutcome {
    pub response: ExecuteStorePlanResponse,
    /// The command was processed before; `response` is the stored one.
    pub replayed: bool,
    /// How many changes (versions and tombstones) the plan committed.
    pub changes: usize,
}

/// How often a transaction that lost a race is run again before the error is returned.
const MAX_CONFLICT_RETRIES: u32 = 12;

/// Executes store plans in one transaction and commits.
///
/// Plans that share no resource and no messageId run together: one read of their state and one
/// write of their changes and answers, whatever the group's size, since the rules are checked
/// before anything is written. Otherwise, or when the database refuses some plan's data, each plan
/// runs after the other in a savepoint of its own, so that one plan's refusal spares the others.
pub async fn execute_store_plans(store: &dyn Store, jobs: &[StoreJob]) -> Result<Vec<PlanOutcome>, StoreError> {
    let mut savepoints = !independent(jobs);
    let mut attempt = 0;
    loop {
        match try_execute(store, jobs, savepoints).await {
            // Only data the database refuses aborts the transaction; the plans then run again each in a
            // savepoint, so the refusal can be recorded in the inbox.
            Err(StoreError::Rejected(_)) if !savepoints => savepoints = true,
            Err(e) if e.is_conflict() && attempt < MAX_CONFLICT_RETRIES => {
                attempt += 1;
                metrics::counter!(crate::observe::metrics::STORE_RETRIES).increment(1);
                tracing::debug!(attempt, error = %e, "store transaction conflicted; running it again");
                // Jittered backoff so that the same writers do not collide again in lockstep.
                let jitter = u64::from(Uuid::new_v4().as_bytes()[0]) % 8;
                tokio::time::sleep(Duration::from_millis((1u64 << attempt.min(6)) + jitter)).await;
            }
            other => return other,
        }
    }
}

/// Whether no two plans touch the same resource or carry the same messageId (the bridge's ordering
/// keeps such plans out of one group, but callers of the library may not).
fn independent(jobs: &[StoreJob]) -> bool {
    if jobs.len() < 2 {
        return true;
    }
    let mut ids = HashSet::new();
    let mut keys = HashSet::new();
    jobs.iter().all(|job| {
        job.message_id.is_none_or(|id| ids.insert(id))
            && job.plan.as_ref().map_or(true, |plan| plan.iter().all(|ins| keys.insert(&ins.key)))
    })
}

/// Runs `jobs` in one transaction: all at once, or each in a savepoint when `savepoints` (without,
/// a plan whose data the database refuses fails the whole transaction with [`StoreError::Rejected`]).
async fn try_execute(store: &dyn Store, jobs: &[StoreJob], savepoints: bool) -> Result<Vec<PlanOutcome>, StoreError> {
    let mut tx = store.begin().await?;
    let outcomes =
        if savepoints { each_in_savepoint(tx.as_mut(), jobs).await? } else { all_at_once(tx.as_mut(), jobs).await? };
    tx.commit().await?;
    Ok(outcomes)
}

/// Independent plans, read and written together: one read of the state for all of them, one
/// write of all their changes and answers.
async fn all_at_once(tx: &mut dyn StoreTx, jobs: &[StoreJob]) -> Result<Vec<PlanOutcome>, StoreError> {
    let ids: Vec<Uuid> = jobs.iter().filter_map(|job| job.message_id).collect();
    let (keys, versions) = to_read(jobs.iter().filter_map(|job| job.plan.as_ref().ok()).flatten());
    let state = tx.read_state(&ids, &keys, &versions).await?;
    let (mut answers, mut current, mut used) =
        (state.answers.into_iter(), state.current.into_iter(), state.used.into_iter());
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut writes = Vec::new();
    for job in jobs {
        let answered = if job.message_id.is_some() { answers.next().flatten() } else { None };
        // A plan's share of the state is taken even when it is answered from the inbox.
        let decided = job.plan.as_ref().map(|plan| decide_plan(plan, &mut current, &mut used));
        outcomes.push(match (answered, decided) {
            (Some(text), _) => replayed(&text),
            (None, Err(errors)) => not_applied(errors.clone()),
            (None, Ok(Err(errors))) => not_applied(errors),
            (None, Ok(Ok(plan_writes))) => {
                let outcome = applied(plan_writes.len());
                writes.extend(plan_writes);
                outcome
            }
        });
    }
    let texts = new_answers(jobs, &outcomes)?;
    tx.write(&writes, &inbox_entries(&texts)).await?;
    Ok(outcomes)
}

/// Plans one after the other, each in a savepoint: a plan whose data the database refuses is
/// answered with that refusal, and the others go on.
async fn each_in_savepoint(tx: &mut dyn StoreTx, jobs: &[StoreJob]) -> Result<Vec<PlanOutcome>, StoreError> {
    let mut outcomes = Vec::with_capacity(jobs.len());
    for job in jobs {
        tx.savepoint().await?;
        let ids: Vec<Uuid> = job.message_id.into_iter().collect();
        let (keys, versions) = to_read(job.plan.as_deref().unwrap_or_default());
        let state = tx.read_state(&ids, &keys, &versions).await?;
        if let Some(Some(text)) = state.answers.into_iter().next() {
            tx.release_savepoint().await?;
            outcomes.push(replayed(&text));
            continue;
        }
        let decided = match &job.plan {
            Err(errors) => Err(errors.clone()),
            Ok(plan) => decide_plan(plan, &mut state.current.into_iter(), &mut state.used.into_iter()),
        };
        let (mut outcome, writes) = match decided {
            Ok(writes) => (applied(writes.len()), writes),
            Err(errors) => (not_applied(errors), Vec::new()),
        };
        let answer = new_answers(std::slice::from_ref(job), std::slice::from_ref(&outcome))?;
        match tx.write(&writes, &inbox_entries(&answer)).await {
            Ok(()) => {}
            Err(StoreError::Rejected(reason)) => {
                // The database refused this plan's data; the other plans of the group go on.
                tx.rollback_to_savepoint().await?;
                outcome = not_applied(vec![ItemError::new(
                    None,
                    StatusDetails::BadRequestWrongPayloadFormat,
                    format!("The database refused the plan's data: {reason}"),
                )]);
                let answer = new_answers(std::slice::from_ref(job), std::slice::from_ref(&outcome))?;
                tx.write(&[], &inbox_entries(&answer)).await?;
            }
            Err(e) => return Err(e),
        }
        tx.release_savepoint().await?;
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

fn applied(changes: usize) -> PlanOutcome {
    PlanOutcome { response: ExecuteStorePlanResponse::default(), replayed: false, changes }
}

fn not_applied(errors: Vec<ItemError>) -> PlanOutcome {
    PlanOutcome { response: ExecuteStorePlanResponse { errors }, replayed: false, changes: 0 }
}

/// The outcome of a command answered before: its stored response.
fn replayed(text: &str) -> PlanOutcome {
    PlanOutcome { response: stored_response(text), replayed: true, changes: 0 }
}

/// The inbox texts of the plans not answered before: (messageId, response).
fn new_answers(jobs: &[StoreJob], outcomes: &[PlanOutcome]) -> Result<Vec<(Uuid, String)>, StoreError> {
    let mut answers = Vec::new();
    for (job, outcome) in jobs.iter().zip(outcomes) {
        if let Some(id) = job.message_id
            && !outcome.replayed
        {
            answers.push((id, response_text(&outcome.response)?));
        }
    }
    Ok(answers)
}

fn response_text(response: &ExecuteStorePlanResponse) -> Result<String, StoreError> {
    serde_json::to_string(response).map_err(|e| StoreError::Database(e.to_string()))
}

fn inbox_entries(answers: &[(Uuid, String)]) -> Vec<InboxEntry<'_>> {
    answers
        .iter()
        .map(|(id, response)| InboxEntry {
            message_id: *id,
            message_type: MessageType::ExecuteStorePlanCommand.as_str(),
            response,
        })
        .collect()
}

fn stored_response(text: &str) -> ExecuteStorePlanResponse {
    serde_json::from_str(text).unwrap_or_else(|e| ExecuteStorePlanResponse {
        errors: vec![ItemError {
            item_id: None,
            status: Status::internal(),
            message: Some(format!("The stored response of this command cannot be read: {e}")),
        }],
    })
}

/// What the rules need read for these instructions, in order: the keys to lock, and the versions
/// they would write (to check that none was used before).
fn to_read<'a>(
    instructions: impl IntoIterator<Item = &'a ValidInstruction>,
) -> (Vec<ResourceKey>, Vec<(ResourceKey, String)>) {
    let mut keys = Vec::new();
    let mut versions = Vec::new();
    for ins in instructions {
        keys.push(ins.key.clone());
        versions.extend(ins.version.as_ref().map(|v| (ins.key.clone(), v.version_id.clone())));
    }
    (keys, versions)
}

/// The writes of one plan, or every instruction that breaks a rule. `current` yields the locked
/// state of each instruction's resource, `used` whether each new version was used before, both in
/// plan order; exactly this plan's share of each is taken.
fn decide_plan(
    plan: &[ValidInstruction],
    current: &mut impl Iterator<Item = Option<Current>>,
    used: &mut impl Iterator<Item = bool>,
) -> Result<Vec<Write>, Vec<ItemError>> {
    let mut errors = Vec::new();
    let mut writes = Vec::new();
    for ins in plan {
        let current = current.next().flatten();
        let version_used = ins.version.is_some() && used.next().unwrap_or(false);
        match decide(ins, current.as_ref(), version_used) {
            Decision::Write(w) => writes.push(w),
            Decision::Nothing => {}
            Decision::Fail(details, message) => {
                errors.push(ItemError::new(Some(ins.item_id.clone()), details, message))
            }
        }
    }
    if errors.is_empty() { Ok(writes) } else { Err(errors) }
}

enum Decision {
    Write(Write),
    Nothing,
    Fail(StatusDetails, String),
}

/// The rules of spec section 1 for one instruction, given the locked current state.
fn decide(ins: &ValidInstruction, current: Option<&Current>, version_used: bool) -> Decision {
    let key = &ins.key;
    let version = |v: &ResourceVersion| NewVersion {
        key: key.clone(),
        version_id: v.version_id.clone(),
        last_updated: v.last_updated.clone(),
        body: v.body.clone(),
    };
    match (ins.operation, &ins.version, current) {
        (Operation::Delete, _, None) => Decision::Nothing,
        (Operation::Delete, _, Some(cur)) => match &ins.current_version {
            Some(expected) if *expected != cur.version_id => Decision::Fail(
                StatusDetails::DeletionFailedVersionIdMismatch,
                format!("{key} is at version `{}`, not `{expected}`; it was not deleted.", cur.version_id),
            ),
            _ => Decision::Write(Write::Delete(key.clone())),
        },
        (_, None, _) => {
            Decision::Fail(StatusDetails::BadRequestMissingResourcePayload, format!("{key}: no resource given."))
        }
        (Operation::Create, Some(_), Some(cur)) => Decision::Fail(
            StatusDetails::CreationFailedResourceAlreadyExists,
            format!("{key} already exists (version `{}`); use update or upsert.", cur.version_id),
        ),
        (Operation::Create | Operation::Upsert, Some(v), None) => {
            if version_used {
                Decision::Fail(
                    StatusDetails::CreationFailedVersionIdCannotBeReused,
                    format!("{key} had version `{}` before; choose a new versionId.", v.version_id),
                )
            } else {
                Decision::Write(Write::Insert(version(v)))
            }
        }
        (Operation::Update, Some(_), None) => Decision::Fail(
            StatusDetails::UpdateFailedResourceNotFound,
            format!("{key} does not exist; use create or upsert."),
        ),
        (Operation::Update | Operation::Upsert, Some(v), Some(cur)) => {
            if let Some(expected) = &ins.current_version
                && *expected != cur.version_id
            {
                return Decision::Fail(
                    StatusDetails::UpdateFailedVersionIdMismatch,
                    format!("{key} is at version `{}`, not `{expected}`; reload it and try again.", cur.version_id),
                );
            }
            if same_resource(&cur.body, &v.body) {
                return Decision::Nothing;
            }
            if version_used {
                return Decision::Fail(
                    StatusDetails::UpdateFailedVersionIdCannotBeReused,
                    format!("{key} already had version `{}`; choose a new versionId.", v.version_id),
                );
            }
            Decision::Write(Write::Update(version(v)))
        }
    }
}

/// Whether two resource texts are the same resource: the same bytes, or the same JSON value.
fn same_resource(stored: &str, given: &str) -> bool {
    if stored == given {
        return true;
    }
    match (serde_json::from_str::<Value>(stored), serde_json::from_str::<Value>(given)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Executes a retrieve plan: one item per instruction, in order; a bad instruction spoils only its own item.
pub async fn execute_retrieve_plan(
    store: &dyn Store,
    instructions: Vec<RetrieveInstructionRead>,
) -> Result<RetrievePlanResponse, StoreError> {
    enum Slot {
        Ready(RetrieveItem),
        Lookup(Option<String>, usize),
    }
    let mut slots = Vec::with_capacity(instructions.len());
    let mut lookups = Vec::new();
    for ins in instructions {
        let item_id = ins.item_id.clone().filter(|s| !s.trim().is_empty());
        let bad = |details: StatusDetails, message: String| {
            Slot::Ready(RetrieveItem {
                item_id: ins.item_id.clone(),
                resource: None,
                status: Status::of(details),
                message: Some(message),
            })
        };
        let slot = if !ins.problems.is_empty() {
            bad(
                StatusDetails::BadRequestWrongPayloadFormat,
                format!("Instruction {} is malformed: {}.", ins.index, ins.problems.join("; ")),
            )
        } else if item_id.is_none() {
            bad(StatusDetails::BadRequestMissingItemId, format!("Instruction {} has no itemId.", ins.index))
        } else {
            match (&ins.resource_type, &ins.resource_id) {
                (Some(t), Some(i)) if ins.has_reference => {
                    lookups
                        .push(Lookup { key: ResourceKey::new(t.clone(), i.clone()), version_id: ins.version.clone() });
                    Slot::Lookup(item_id, lookups.len() - 1)
                }
                _ => bad(
                    StatusDetails::BadRequestMissingReference,
                    format!(
                        "Instruction `{}` needs a reference with resourceType and resourceId.",
                        item_id.as_deref().unwrap_or_default()
                    ),
                ),
            }
        };
        slots.push(slot);
    }
    let found = store.read(&lookups).await?;
    let items = slots
        .into_iter()
        .map(|slot| match slot {
            Slot::Ready(item) => item,
            Slot::Lookup(item_id, index) => {
                let lookup = &lookups[index];
                let (resource, details, message) = match found.get(index) {
                    Some(Found::Resource(body)) => (Some(body.clone()), StatusDetails::Ok, None),
                    Some(Found::NoVersion) => (
                        None,
                        StatusDetails::MatchingVersionNotFound,
                        Some(format!(
                            "{} has no version `{}`.",
                            lookup.key,
                            lookup.version_id.as_deref().unwrap_or_default()
                        )),
                    ),
                    _ => (None, StatusDetails::ResourceNotFound, Some(format!("{} was not found.", lookup.key))),
                };
                RetrieveItem { item_id, resource, status: Status::of(details), message }
            }
        })
        .collect();
    Ok(RetrievePlanResponse { items })
}
