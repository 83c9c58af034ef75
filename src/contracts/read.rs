//! Lenient readers for the messages we receive and the replies the CLI client reads.
//!
//! Member names are matched without regard to case; a member of the wrong JSON type inside one
//! instruction is recorded on that instruction (it becomes a BadRequest for that line) rather than
//! failing the whole message, so the reply can name the line at fault. Only a message that is not
//! an object, or whose `instructions` is not an array, fails as a whole.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{
    ChangeType, ExecuteStorePlanResponse, ItemError, LightResourceChange, ResourceChange, ResourceReference,
    RetrieveItem, RetrievePlanResponse, Status, StatusCode, StatusDetails,
};
use crate::json::{JsonError, Name, Object, array, kind_of};

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

/// Reads an ExecuteStorePlanCommand's `message`, in one pass over its text (it is read for every
/// command, and a resource sent as a JSON string is mostly escapes).
pub fn store_plan(message: &RawValue) -> Result<StorePlanMessage, JsonError> {
    let plan: StorePlanText<'_> =
        serde_json::from_str(message.get()).map_err(|_| JsonError::not_an_object("message", kind_of(message)))?;
    match plan.instructions {
        None | Some(Listed::Null) => {
            if let Some(payload) = plan.payload.filter(|p| p.get() != "null") {
                let payload = Object::parse(payload, "payload")?;
                return match payload.string("data-ref")? {
                    Some(data_ref) if !data_ref.trim().is_empty() => Ok(StorePlanMessage::ClaimCheck { data_ref }),
                    _ => Err(JsonError::field("payload.data-ref", "must be the URL of the blob holding the plan")),
                };
            }
            Err(JsonError::field("instructions", "is missing: a store plan is { \"instructions\": [ ... ] }"))
        }
        Some(Listed::Other(kind)) => Err(JsonError::not_an_array("instructions", kind)),
        Some(Listed::Items(items)) => Ok(StorePlanMessage::Instructions(
            items
                .into_iter()
                .enumerate()
                .map(|(index, item)| match item {
                    Item::Object(obj) => store_instruction(index, &obj),
                    Item::Other(kind) => StoreInstructionRead {
                        index,
                        problems: vec![JsonError::not_an_object(format!("instruction {index}"), kind).to_string()],
                        ..Default::default()
                    },
                })
                .collect(),
        )),
    }
}

/// The members of a store plan that matter, as [`Object`] would find them: names in any case, the
/// first occurrence of a name wins.
struct StorePlanText<'a> {
    instructions: Option<Listed<'a>>,
    payload: Option<&'a RawValue>,
}

/// The value of `instructions`.
enum Listed<'a> {
    Null,
    Items(Vec<Item<'a>>),
    /// Not an array: the word for what it is.
    Other(&'static str),
}

/// One element of `instructions`.
enum Item<'a> {
    Object(Object<'a>),
    Other(&'static str),
}

impl<'de: 'a, 'a> Deserialize<'de> for StorePlanText<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Visit<'a> {
            type Value = StorePlanText<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut plan = StorePlanText { instructions: None, payload: None };
                while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
                    if plan.instructions.is_none() && name.eq_ignore_ascii_case("instructions") {
                        plan.instructions = Some(map.next_value()?);
                    } else if plan.payload.is_none() && name.eq_ignore_ascii_case("payload") {
                        plan.payload = Some(map.next_value()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(plan)
            }
        }
        deserializer.deserialize_map(Visit(PhantomData))
    }
}

/// Visits any JSON value, calling `other` with the word for its type unless the visitor handles it.
macro_rules! any_other_value {
    ($other:expr) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($other("null"))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other("a boolean"))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other("a number"))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other("a number"))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other("a number"))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($other("a string"))
        }
    };
}

impl<'de: 'a, 'a> Deserialize<'de> for Listed<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Visit<'a> {
            type Value = Listed<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            any_other_value!(|kind| if kind == "null" { Listed::Null } else { Listed::Other(kind) });
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Listed::Items(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Listed::Other("an object"))
            }
        }
        deserializer.deserialize_any(Visit(PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Item<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Visit<'a> {
            type Value = Item<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            any_other_value!(Item::Other);
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Item::Other("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Object::deserialize(de::value::MapAccessDeserializer::new(map)).map(Item::Object)
            }
        }
        deserializer.deserialize_any(Visit(PhantomData))
    }
}

fn store_instruction(index: usize, obj: &Object<'_>) -> StoreInstructionRead {
    let mut read = StoreInstructionRead { index, ..Default::default() };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<StorePlanMessage, String> {
        let raw: Box<RawValue> = serde_json::from_str(text).expect("test JSON");
        store_plan(&raw).map_err(|e| e.to_string())
    }

    fn instructions(text: &str) -> Vec<StoreInstructionRead> {
        match read(text) {
            Ok(StorePlanMessage::Instructions(list)) => list,
            other => panic!("expected instructions, got {other:?}"),
        }
    }

    #[test]
    fn a_message_that_is_no_plan_is_refused_as_a_whole() {
        assert_eq!(read(r#""x""#).unwrap_err(), "`message` must be a JSON object, found a string");
        assert_eq!(read("[]").unwrap_err(), "`message` must be a JSON object, found an array");
        let missing = "`instructions` is missing: a store plan is { \"instructions\": [ ... ] }";
        assert_eq!(read("{}").unwrap_err(), missing);
        assert_eq!(read(r#"{"instructions": null}"#).unwrap_err(), missing);
        assert_eq!(read(r#"{"Instructions": 5}"#).unwrap_err(), "`instructions` must be a JSON array, found a number");
        assert_eq!(
            read(r#"{"instructions": {"a": [1]}}"#).unwrap_err(),
            "`instructions` must be a JSON array, found an object"
        );
        assert_eq!(
            read(r#"{"instructions": "[]"}"#).unwrap_err(),
            "`instructions` must be a JSON array, found a string"
        );
        assert_eq!(
            read(r#"{"payload": {"data-ref": " "}}"#).unwrap_err(),
            "`payload.data-ref` must be the URL of the blob holding the plan"
        );
    }

    #[test]
    fn names_in_any_case_and_escaped_names_match_and_the_first_occurrence_wins() {
        // A first `instructions` that is null hides a later one, as a lookup by name would.
        let missing = "`instructions` is missing: a store plan is { \"instructions\": [ ... ] }";
        assert_eq!(read(r#"{"INSTRUCTIONS": null, "instructions": []}"#).unwrap_err(), missing);
        assert!(instructions(r#"{"instr\u0075ctions": [], "instructions": 5}"#).is_empty());
        let list =
            instructions(r#"{"Instructions": [{"ITEMID": "a", "itemId": "b", "Operation": "upsert"}], "x": [{}]}"#);
        assert_eq!(list[0].item_id.as_deref(), Some("a"));
        assert_eq!(list[0].operation.as_deref(), Some("upsert"));
        match read(r#"{"payload": null, "PayLoad": {"data-ref": "https://blob/x"}, "instructions": null}"#) {
            // `payload: null` comes first, so the plan has no payload.
            Err(e) => assert_eq!(e, missing),
            other => panic!("{other:?}"),
        }
        match read(r#"{"Payload": {"Data-Ref": "https://blob/x"}}"#) {
            Ok(StorePlanMessage::ClaimCheck { data_ref }) => assert_eq!(data_ref, "https://blob/x"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_instruction_that_is_no_object_is_a_problem_of_its_own() {
        let list = instructions(r#"{"instructions": [null, "s", 1, -2.5, [1, {"a": 2}], true, {"itemId": 7}]}"#);
        let problems: Vec<_> = list.iter().map(|i| i.problems.join("; ")).collect();
        assert_eq!(
            problems,
            [
                "`instruction 0` must be a JSON object, found null",
                "`instruction 1` must be a JSON object, found a string",
                "`instruction 2` must be a JSON object, found a number",
                "`instruction 3` must be a JSON object, found a number",
                "`instruction 4` must be a JSON object, found an array",
                "`instruction 5` must be a JSON object, found a boolean",
                "",
            ]
        );
        assert_eq!(list.iter().map(|i| i.index).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(list[6].item_id.as_deref(), Some("7"), "a number is taken as its text");
    }

    #[test]
    fn a_resource_is_kept_as_sent_whether_object_or_string() {
        let list = instructions(
            r#"{"instructions": [
                {"resource": {"resourceType" : "Patient", "id":"a"}},
                {"resource": "{\"resourceType\":\"Patient\",\"id\":\"b\"}"},
                {"resource": "null"},
                {"resource": 3}
            ]}"#,
        );
        assert_eq!(list[0].resource.as_deref(), Some(r#"{"resourceType" : "Patient", "id":"a"}"#));
        assert_eq!(list[1].resource.as_deref(), Some(r#"{"resourceType":"Patient","id":"b"}"#));
        assert_eq!(list[2].resource, None);
        assert!(list[2].problems.is_empty());
        assert_eq!(list[3].resource, None);
        assert_eq!(
            list[3].problems,
            ["`resource` must be a FHIR resource as a JSON object or as JSON text in a string, found a number"]
        );
    }
}
