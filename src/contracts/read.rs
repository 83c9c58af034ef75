//! Lenient readers for the messages we receive and the replies the CLI client reads.
//!
//! Member names are matched without regard to case; a member of the wrong JSON type inside one
//! instruction is recorded on that instruction (it becomes a BadRequest for that line) rather than
//! failing the whole message, so the reply can name the line at fault. Only a message that is not
//! an object, or whose `instructions` is not an array, fails as a whole.

use serde_json::value::RawValue;

use super::{
    ChangeType, ExecuteStorePlanResponse, ItemError, LightResourceChange, ResourceChange, ResourceReference,
    RetrieveItem, RetrievePlanResponse, Status, StatusCode, StatusDetails,
};
use crate::json::{JsonError, Object, array};

/// A store-plan message: the instructions, or a claim check pointing at them.
#[derive(Debug, Clone, PartialEq)]
pub enum StorePlanMessage {
    Instructions(Vec<StoreInstructionRead>),
    /// `{ "payload": { "data-ref": URL } }`.
    ClaimCheck {
        data_ref: String,
    },
}

/// One store instruction as sent, before validation. Every field is optional here; the plan
/// validator decides which absences are errors.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoreInstructionRead {
    /// Position in the plan, from 0.
    pub index: usize,
    pub item_id: Option<String>,
    /// The operation as sent, not yet checked.
    pub operation: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    /// The resource as JSON text: a JSON-string resource unescaped, an object resource as its raw bytes.
    /// Absent, null and the string `"null"` (sent by clients for deletes) are all `None`.
    pub resource: Option<String>,
    pub current_version: Option<String>,
    /// Members that had the wrong JSON type, described for the reply.
    pub problems: Vec<String>,
}

/// Reads an ExecuteStorePlanCommand's `message`.
pub fn store_plan(message: &RawValue) -> Result<StorePlanMessage, JsonError> {
    let obj = Object::parse(message, "message")?;
    if obj.get_non_null("instructions").is_none() {
        if let Some(payload) = obj.get_non_null("payload") {
            let payload = Object::parse(payload, "payload")?;
            return match payload.string("data-ref")? {
                Some(data_ref) if !data_ref.trim().is_empty() => Ok(StorePlanMessage::ClaimCheck { data_ref }),
                _ => Err(JsonError::field("payload.data-ref", "must be the URL of the blob holding the plan")),
            };
        }
        return Err(JsonError::field("instructions", "is missing: a store plan is { \"instructions\": [ ... ] }"));
    }
    let list = array(obj.get("instructions").expect("checked above"), "instructions")?;
    Ok(StorePlanMessage::Instructions(list.into_iter().enumerate().map(|(i, raw)| store_instruction(i, raw)).collect()))
}

fn store_instruction(index: usize, raw: &RawValue) -> StoreInstructionRead {
    let mut read = StoreInstructionRead { index, ..Default::default() };
    let obj = match Object::parse(raw, &format!("instruction {index}")) {
        Ok(obj) => obj,
        Err(e) => {
            read.problems.push(e.to_string());
            return read;
        }
    };
    let mut text = |name: &str| match obj.string(name) {
        Ok(v) => v,
        Err(e) => {
            read.problems.push(e.to_string());
            None
        }
    };
    read.item_id = text("itemId");
    read.operation = text("operation");
    read.resource_type = text("resourceType");
    read.resource_id = text("resourceId");
    read.current_version = text("currentVersion");
    match obj.get_non_null("resource") {
        None => {}
        Some(raw) => match raw.get().as_bytes().first() {
            Some(b'"') => match serde_json::from_str::<String>(raw.get()) {
                Ok(s) if s.trim() == "null" || s.trim().is_empty() => {}
                Ok(s) => read.resource = Some(s),
                Err(e) => read.problems.push(format!("`resource` {e}")),
            },
            Some(b'{') => read.resource = Some(raw.get().to_owned()),
            _ => read.problems.push(format!(
                "`resource` must be a FHIR resource as a JSON object or as JSON text in a string, found {}",
                crate::json::kind_of(raw)
            )),
        },
    }
    read
}

/// One retrieve instruction as sent, before validation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RetrieveInstructionRead {
    pub index: usize,
    pub item_id: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub version: Option<String>,
    /// Whether a `reference` object was present at all.
    pub has_reference: bool,
    pub problems: Vec<String>,
}

/// Reads a RetrievePlanCommand's `message`.
pub fn retrieve_plan(message: &RawValue) -> Result<Vec<RetrieveInstructionRead>, JsonError> {
    let obj = Object::parse(message, "message")?;
    let Some(list) = obj.get_non_null("instructions") else {
        return Err(JsonError::field("instructions", "is missing: a retrieve plan is { \"instructions\": [ ... ] }"));
    };
    Ok(array(list, "instructions")?.into_iter().enumerate().map(|(i, raw)| retrieve_instruction(i, raw)).collect())
}

fn retrieve_instruction(index: usize, raw: &RawValue) -> RetrieveInstructionRead {
    let mut read = RetrieveInstructionRead { index, ..Default::default() };
    let obj = match Object::parse(raw, &format!("instruction {index}")) {
        Ok(obj) => obj,
        Err(e) => {
            read.problems.push(e.to_string());
            return read;
        }
    };
    match obj.string("itemId") {
        Ok(v) => read.item_id = v,
        Err(e) => read.problems.push(e.to_string()),
    }
    if let Some(reference) = obj.get_non_null("reference") {
        match Object::parse(reference, "reference") {
            Ok(r) => {
                read.has_reference = true;
                for (name, slot) in [
                    ("resourceType", &mut read.resource_type),
                    ("resourceId", &mut read.resource_id),
                    ("version", &mut read.version),
                ] {
                    match r.string(name) {
                        Ok(v) => *slot = v.filter(|s| !s.trim().is_empty()),
                        Err(e) => read.problems.push(format!("reference.{e}")),
                    }
                }
            }
            Err(e) => read.problems.push(e.to_string()),
        }
    }
    read
}

fn status(raw: Option<&RawValue>) -> Result<Status, JsonError> {
    let Some(raw) = raw else {
        return Err(JsonError::field("status", "is missing"));
    };
    let obj = Object::parse(raw, "status")?;
    let code = obj
        .string("code")?
        .and_then(|c| StatusCode::parse(&c))
        .ok_or_else(|| JsonError::field("status.code", "is missing or unknown"))?;
    Ok(Status { code, details: obj.string("details")?.and_then(|d| StatusDetails::parse(&d)) })
}

/// Reads an ExecuteStorePlanResponse from any Firely-compatible server.
pub fn store_response(message: &RawValue) -> Result<ExecuteStorePlanResponse, JsonError> {
    let obj = Object::parse(message, "message")?;
    let mut errors = Vec::new();
    if let Some(list) = obj.get_non_null("errors") {
        for raw in array(list, "errors")? {
            let e = Object::parse(raw, "errors[]")?;
            errors.push(ItemError {
                item_id: e.string("itemId")?,
                status: status(e.get_non_null("status"))?,
                message: e.string("message")?,
            });
        }
    }
    Ok(ExecuteStorePlanResponse { errors })
}

/// Reads a RetrievePlanResponse from any Firely-compatible server.
pub fn retrieve_response(message: &RawValue) -> Result<RetrievePlanResponse, JsonError> {
    let obj = Object::parse(message, "message")?;
    let mut items = Vec::new();
    if let Some(list) = obj.get_non_null("items") {
        for raw in array(list, "items")? {
            let i = Object::parse(raw, "items[]")?;
            items.push(RetrieveItem {
                item_id: i.string("itemId")?,
                resource: resource_text(i.get_non_null("resource")),
                status: status(i.get_non_null("status"))?,
                message: i.string("message")?,
            });
        }
    }
    Ok(RetrievePlanResponse { items })
}

fn resource_text(raw: Option<&RawValue>) -> Option<String> {
    let raw = raw?;
    if raw.get().starts_with('"') { serde_json::from_str::<String>(raw.get()).ok() } else { Some(raw.get().to_owned()) }
}

/// Reads the changes of a ResourcesChangedEvent or ResourcesChangedLightEvent (light changes have no resource).
pub fn changes(message: &RawValue) -> Result<Vec<ResourceChange>, JsonError> {
    let obj = Object::parse(message, "message")?;
    let Some(list) = obj.get_non_null("changes") else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for raw in array(list, "changes")? {
        let c = Object::parse(raw, "changes[]")?;
        let r = Object::parse(
            c.get_non_null("reference").ok_or_else(|| JsonError::field("reference", "is missing"))?,
            "reference",
        )?;
        out.push(ResourceChange {
            reference: ResourceReference {
                resource_type: r.string("resourceType")?.unwrap_or_default(),
                resource_id: r.string("resourceId")?.unwrap_or_default(),
                version: r.string("version")?,
            },
            resource: resource_text(c.get_non_null("resource")),
            change_type: c
                .string("changeType")?
                .and_then(|t| ChangeType::parse(&t))
                .ok_or_else(|| JsonError::field("changeType", "is missing or unknown"))?,
        });
    }
    Ok(out)
}

impl From<ResourceChange> for LightResourceChange {
    fn from(c: ResourceChange) -> Self {
        LightResourceChange { reference: c.reference, change_type: c.change_type }
    }
}
