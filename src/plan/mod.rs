//! Store and retrieve plans: validation, execution against a [`Store`], and the mapping of every
//! outcome to a Firely status.
//!
//! Invariants:
//! - a store plan is all or nothing: it runs in its own savepoint, and any failing instruction rolls
//!   the whole plan back (the response names every failing instruction);
//! - several plans may share one SQL transaction (group commit); one plan's failure never affects
//!   another's, and the effect of all of them is durable only when [`execute_store_plans`] returns `Ok`;
//! - a plan whose messageId is in the inbox is not applied again; its stored response is returned;
//! - a transaction that loses a race (deadlock, concurrent insert) is run again from the start, so
//!   rules are always checked against the state the transaction commits on.

mod validate;

use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

pub use validate::{PlanLimits, ResourceVersion, ValidInstruction, validate_store_plan};

use crate::contracts::read::RetrieveInstructionRead;
use crate::contracts::{
    ExecuteStorePlanResponse, ItemError, MessageType, Operation, RetrieveItem, RetrievePlanResponse, Status,
    StatusDetails,
};
use crate::store::{Current, Found, Lookup, NewVersion, ResourceKey, Store, StoreError, StoreTx, Write};

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

/// Executes store plans in one transaction, each in its own savepoint, and commits.
pub async fn execute_store_plans(store: &dyn Store, jobs: &[StoreJob]) -> Result<Vec<PlanOutcome>, StoreError> {
    // A plan alone in its transaction needs no savepoint (two round trips fewer): a rule violation is
    // found before anything is written. Only data the database refuses aborts the transaction; the
    // plan then runs again inside a savepoint, so the refusal can be recorded in the inbox.
    let mut savepoints = jobs.len() > 1;
    let mut attempt = 0;
    loop {
        match try_execute(store, jobs, savepoints).await {
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

/// Runs `jobs` in one transaction, each in a savepoint when `savepoints` (without, a plan whose data
/// the database refuses fails the whole transaction with [`StoreError::Rejected`]).
async fn try_execute(store: &dyn Store, jobs: &[StoreJob], savepoints: bool) -> Result<Vec<PlanOutcome>, StoreError> {
    let mut tx = store.begin().await?;
    let mut outcomes = Vec::with_capacity(jobs.len());
    for job in jobs {
        if savepoints {
            tx.savepoint().await?;
        }
        if let Some(id) = job.message_id
            && let Some(stored) = tx.inbox_get(id).await?
        {
            if savepoints {
                tx.release_savepoint().await?;
            }
            outcomes.push(PlanOutcome { response: stored_response(&stored), replayed: true, changes: 0 });
            continue;
        }
        let (response, changes) = match &job.plan {
            Err(errors) => (ExecuteStorePlanResponse { errors: errors.clone() }, 0),
            Ok(instructions) => match apply_plan(tx.as_mut(), instructions).await {
                Ok(Ok(changes)) => (ExecuteStorePlanResponse::default(), changes),
                Ok(Err(errors)) => {
                    // Nothing was written (the rules are checked first); the savepoint, if any, goes.
                    if savepoints {
                        tx.rollback_to_savepoint().await?;
                    }
                    (ExecuteStorePlanResponse { errors }, 0)
                }
                Err(StoreError::Rejected(reason)) if savepoints => {
                    // The database refused this plan's data; the other plans of the group go on.
                    tx.rollback_to_savepoint().await?;
                    let error = ItemError::new(
                        None,
                        StatusDetails::BadRequestWrongPayloadFormat,
                        format!("The database refused the plan's data: {reason}"),
                    );
                    (ExecuteStorePlanResponse { errors: vec![error] }, 0)
                }
                Err(e) => return Err(e),
            },
        };
        if let Some(id) = job.message_id {
            let text = serde_json::to_string(&response).map_err(|e| StoreError::Database(e.to_string()))?;
            tx.inbox_put(id, MessageType::ExecuteStorePlanCommand.as_str(), &text).await?;
        }
        if savepoints {
            tx.release_savepoint().await?;
        }
        outcomes.push(PlanOutcome { response, replayed: false, changes });
    }
    tx.commit().await?;
    Ok(outcomes)
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

/// Applies one plan inside the open transaction. `Ok(Err(..))` is a rule violation (the caller
/// rolls back to the savepoint); `Ok(Ok(n))` means `n` changes were written.
async fn apply_plan(
    tx: &mut dyn StoreTx,
    plan: &[ValidInstruction],
) -> Result<Result<usize, Vec<ItemError>>, StoreError> {
    let keys: Vec<ResourceKey> = plan.iter().map(|i| i.key.clone()).collect();
    let current = tx.lock_current(&keys).await?;
    let new_versions: Vec<(ResourceKey, String)> =
        plan.iter().filter_map(|i| i.version.as_ref().map(|v| (i.key.clone(), v.version_id.clone()))).collect();
    let mut used = tx.versions_used(&new_versions).await?.into_iter();

    let mut errors = Vec::new();
    let mut writes = Vec::new();
    for (ins, current) in plan.iter().zip(current) {
        let version_used = if ins.version.is_some() { used.next().unwrap_or(false) } else { false };
        match decide(ins, current.as_ref(), version_used) {
            Decision::Write(w) => writes.push(w),
            Decision::Nothing => {}
            Decision::Fail(details, message) => {
                errors.push(ItemError::new(Some(ins.item_id.clone()), details, message))
            }
        }
    }
    if !errors.is_empty() {
        return Ok(Err(errors));
    }
    tx.apply(&writes).await?;
    Ok(Ok(writes.len()))
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
