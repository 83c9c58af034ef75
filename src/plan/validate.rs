//! Validation of store plans: every rule that can be checked without the database.
//!
//! A plan either becomes a list of [`ValidInstruction`]s or is refused with one [`ItemError`] per
//! offending instruction (all of them, not only the first), each with the detail the contract
//! defines and a sentence saying what to fix.

use std::collections::HashMap;

use serde::Deserialize;

use crate::contracts::read::StoreInstructionRead;
use crate::contracts::{ItemError, Operation, StatusDetails};
use crate::store::ResourceKey;

/// Limits on what one plan may hold.
#[derive(Debug, Clone, Copy)]
pub struct PlanLimits {
    pub max_instructions: usize,
}

impl Default for PlanLimits {
    fn default() -> Self {
        PlanLimits { max_instructions: 10_000 }
    }
}

/// A checked store instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidInstruction {
    pub item_id: String,
    pub operation: Operation,
    pub key: ResourceKey,
    /// For create/update/upsert: the new version; `None` for delete.
    pub version: Option<ResourceVersion>,
    pub current_version: Option<String>,
}

/// The version an instruction writes, with the fields taken from the resource itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceVersion {
    pub version_id: String,
    pub last_updated: String,
    /// The resource text exactly as received.
    pub body: String,
}

/// The fields of a FHIR resource the rules need (FHIR JSON names are case-sensitive).
#[derive(Deserialize)]
struct ResourceHead {
    #[serde(rename = "resourceType")]
    resource_type: Option<serde_json::Value>,
    id: Option<serde_json::Value>,
    meta: Option<MetaHead>,
}

#[derive(Deserialize)]
struct MetaHead {
    #[serde(rename = "versionId")]
    version_id: Option<serde_json::Value>,
    #[serde(rename = "lastUpdated")]
    last_updated: Option<serde_json::Value>,
}

fn non_empty_string(v: Option<serde_json::Value>) -> Option<String> {
    match v {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Some(s),
        _ => None,
    }
}

fn non_blank(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// FHIR's rule for a resource type name: a capital letter, then letters (at most 64 in all).
fn is_fhir_type(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase()) && text.len() <= 64 && chars.all(|c| c.is_ascii_alphabetic())
}

/// FHIR's `id` datatype (resource ids and `meta.versionId`): `[A-Za-z0-9\-\.]{1,64}`.
fn is_fhir_id(text: &str) -> bool {
    (1..=64).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A value for an error reply: cut short, so that a megabyte id is not sent back whole.
fn shown(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((end, _)) => format!("{}… ({} bytes)", &text[..end], text.len()),
        None => text.to_owned(),
    }
}

/// Refuses a type or id the store could not index or FHIR would not allow.
fn check_key(item_id: &str, resource_type: &str, resource_id: &str) -> Result<(), String> {
    if !is_fhir_type(resource_type) {
        return Err(format!(
            "Instruction `{}`: `{}` is not a FHIR resource type (a capital letter, then letters).",
            shown(item_id),
            shown(resource_type)
        ));
    }
    if !is_fhir_id(resource_id) {
        return Err(format!(
            "Instruction `{}`: `{}` is not a FHIR id (1 to 64 of A-Z, a-z, 0-9, `-` and `.`).",
            shown(item_id),
            shown(resource_id)
        ));
    }
    Ok(())
}

/// Checks a store plan. `Err` holds the errors to reply with; nothing may be applied then.
pub fn validate_store_plan(
    instructions: Vec<StoreInstructionRead>,
    limits: &PlanLimits,
) -> Result<Vec<ValidInstruction>, Vec<ItemError>> {
    if instructions.len() > limits.max_instructions {
        return Err(vec![ItemError::new(
            None,
            StatusDetails::BadRequestWrongPayloadFormat,
            format!(
                "The plan has {} instructions; at most {} are accepted in one plan (Limits.MaxInstructionsPerPlan). Split it into several plans.",
                instructions.len(),
                limits.max_instructions
            ),
        )]);
    }
    let mut valid = Vec::with_capacity(instructions.len());
    let mut errors = Vec::new();
    let mut seen: HashMap<ResourceKey, String> = HashMap::new();
    for read in instructions {
        match validate_instruction(read) {
            Ok(ins) => {
                if let Some(first) = seen.get(&ins.key) {
                    errors.push(ItemError::new(
                        Some(ins.item_id.clone()),
                        StatusDetails::BadRequestWrongPayloadFormat,
                        format!(
                            "Instruction `{}` targets {} like instruction `{first}`; a plan may hold at most one instruction per resource.",
                            ins.item_id, ins.key
                        ),
                    ));
                } else {
                    seen.insert(ins.key.clone(), ins.item_id.clone());
                    valid.push(ins);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() { Ok(valid) } else { Err(errors) }
}

fn validate_instruction(read: StoreInstructionRead) -> Result<ValidInstruction, ItemError> {
    let label = read.item_id.clone();
    let fail = |details: StatusDetails, message: String| Err(ItemError::new(label.clone(), details, message));
    if !read.problems.is_empty() {
        return fail(
            StatusDetails::BadRequestWrongPayloadFormat,
            format!("Instruction {} is malformed: {}.", read.index, read.problems.join("; ")),
        );
    }
    let Some(item_id) = non_blank(&read.item_id).map(str::to_owned) else {
        return fail(StatusDetails::BadRequestMissingItemId, format!("Instruction {} has no itemId.", read.index));
    };
    let operation = match non_blank(&read.operation) {
        None => {
            return fail(
                StatusDetails::BadRequestOperationNotSupported,
                format!("Instruction `{item_id}` has no operation; use create, update, upsert or delete."),
            );
        }
        Some(op) => match Operation::parse(op) {
            Some(op) => op,
            None => {
                return fail(
                    StatusDetails::BadRequestOperationNotSupported,
                    format!(
                        "Instruction `{item_id}`: operation `{op}` is not supported; use create, update, upsert or delete."
                    ),
                );
            }
        },
    };
    let current_version = non_blank(&read.current_version).map(str::to_owned);
    let given_type = non_blank(&read.resource_type).map(str::to_owned);
    let given_id = non_blank(&read.resource_id).map(str::to_owned);

    if operation == Operation::Delete {
        let Some(resource_type) = given_type else {
            return fail(
                StatusDetails::BadRequestMissingResourceType,
                format!("Delete `{item_id}` has no resourceType."),
            );
        };
        let Some(resource_id) = given_id else {
            return fail(StatusDetails::BadRequestMissingResourceId, format!("Delete `{item_id}` has no resourceId."));
        };
        if let Err(message) = check_key(&item_id, &resource_type, &resource_id) {
            return fail(StatusDetails::BadRequestWrongPayloadFormat, message);
        }
        return Ok(ValidInstruction {
            item_id,
            operation,
            key: ResourceKey::new(resource_type, resource_id),
            version: None,
            current_version,
        });
    }

    let Some(body) = read.resource else {
        return fail(
            StatusDetails::BadRequestMissingResourcePayload,
            format!("Instruction `{item_id}` ({operation}) has no resource; send the complete FHIR resource."),
        );
    };
    if body.contains('\0') {
        return fail(
            StatusDetails::BadRequestWrongPayloadFormat,
            format!("The resource of `{item_id}` contains a NUL character, which cannot be stored."),
        );
    }
    if crate::json::has_lone_surrogate(&body) {
        return fail(
            StatusDetails::BadRequestWrongPayloadFormat,
            format!(
                "The resource of `{item_id}` is not a FHIR JSON object: it escapes half of a surrogate pair (\\uD800-\\uDFFF) alone, which no text can hold."
            ),
        );
    }
    let head: ResourceHead = match serde_json::from_str(&body) {
        Ok(head) => head,
        Err(e) => {
            return fail(
                StatusDetails::BadRequestWrongPayloadFormat,
                format!("The resource of `{item_id}` is not a FHIR JSON object: {e}."),
            );
        }
    };
    let Some(own_type) = non_empty_string(head.resource_type) else {
        return fail(
            StatusDetails::BadRequestMissingResourceType,
            format!("The resource of `{item_id}` has no resourceType."),
        );
    };
    if let Some(t) = &given_type
        && *t != own_type
    {
        return fail(
            StatusDetails::BadRequestWrongPayloadFormat,
            format!("Instruction `{item_id}` says resourceType `{t}` but its resource is a `{own_type}`."),
        );
    }
    let Some(own_id) = non_empty_string(head.id) else {
        return fail(
            StatusDetails::BadRequestPayloadMissingResourceId,
            format!("The resource of `{item_id}` has no id."),
        );
    };
    if let Some(i) = &given_id
        && *i != own_id
    {
        return fail(
            StatusDetails::BadRequestWrongPayloadFormat,
            format!("Instruction `{item_id}` says resourceId `{i}` but its resource has id `{own_id}`."),
        );
    }
    if let Err(message) = check_key(&item_id, &own_type, &own_id) {
        return fail(StatusDetails::BadRequestWrongPayloadFormat, message);
    }
    let (version_id, last_updated) = match head.meta {
        None => (None, None),
        Some(meta) => (non_empty_string(meta.version_id), non_empty_string(meta.last_updated)),
    };
    let Some(version_id) = version_id else {
        return fail(
            StatusDetails::BadRequestPayloadMissingVersionId,
            format!("The resource of `{item_id}` has no meta.versionId; the caller chooses the versionId."),
        );
    };
    if !is_fhir_id(&version_id) {
        return fail(
            StatusDetails::BadRequestWrongPayloadFormat,
            format!(
                "The resource of `{}` has meta.versionId `{}`, which is not a FHIR id (1 to 64 of A-Z, a-z, 0-9, `-` and `.`).",
                shown(&item_id),
                shown(&version_id)
            ),
        );
    }
    let Some(last_updated) = last_updated else {
        return fail(
            StatusDetails::BadRequestPayloadMissingLastUpdated,
            format!("The resource of `{item_id}` has no meta.lastUpdated; the caller chooses it."),
        );
    };
    Ok(ValidInstruction {
        item_id,
        operation,
        key: ResourceKey::new(own_type, own_id),
        version: Some(ResourceVersion { version_id, last_updated, body }),
        current_version,
    })
}
