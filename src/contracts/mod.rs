//! The Firely PubSub V1 messages (namespace `Firely.Server.Contracts.Messages.V1`), their status
//! codes and details, and the message-type URNs.
//!
//! The structs here are the *write* form: camelCase, nulls written, enums as camelCase strings,
//! exactly what MassTransit v8 with Firely's serializer settings emits. They also derive
//! `Deserialize` for clients that read our replies; incoming commands are read leniently by
//! [`read`] instead, because senders in the wild vary key case, value types and casing of enums.
//! `contracts/` at the top of the repository holds the JSON Schema of each message, generated from
//! these types by `tests/contracts.rs`, which fails when the files drift from the code.

pub mod read;

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The .NET namespace of the Firely contracts, the first part of every URN and exchange name.
pub const NAMESPACE: &str = "Firely.Server.Contracts.Messages.V1";

/// Declares a string enum that is written exactly as given and read without regard to case.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The exact text written on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Reads the wire text in any ASCII case.
            pub fn parse(text: &str) -> Option<Self> {
                let text = text.trim();
                Self::ALL.iter().copied().find(|v| v.as_str().eq_ignore_ascii_case(text))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> { s.serialize_str(self.as_str()) }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&text).ok_or_else(|| {
                    let all: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                    serde::de::Error::custom(format!("unknown {} `{}` (expected one of {})", stringify!($name), text, all.join(", ")))
                })
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> { stringify!($name).into() }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "type": "string", "enum": [$($text),+] })
            }
        }
    };
}

wire_enum! {
    /// The message types of the contract.
    MessageType {
        ExecuteStorePlanCommand = "ExecuteStorePlanCommand",
        ExecuteStorePlanResponse = "ExecuteStorePlanResponse",
        RetrievePlanCommand = "RetrievePlanCommand",
        RetrievePlanResponse = "RetrievePlanResponse",
        ResourcesChangedEvent = "ResourcesChangedEvent",
        ResourcesChangedLightEvent = "ResourcesChangedLightEvent",
    }
}

/// URN prefix of every contract type.
const URN_PREFIX: &str = "urn:message:Firely.Server.Contracts.Messages.V1:";
/// The claim-check wrapper's generic URN, as sent for large store plans.
const CLAIM_CHECK_WRAPPER: &str = "urn:message:Firely.Server.Contracts.Messages.V1:ClaimCheckMessageWrapper[[Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand]]";

impl MessageType {
    /// `urn:message:Firely.Server.Contracts.Messages.V1:<Type>`.
    pub fn urn(self) -> String {
        format!("{URN_PREFIX}{}", self.as_str())
    }

    /// The RabbitMQ exchange named after the type: `Firely.Server.Contracts.Messages.V1:<Type>`.
    pub fn exchange(self) -> String {
        format!("{NAMESPACE}:{}", self.as_str())
    }

    /// The URN of `MassTransit:Fault<Type>`.
    pub fn fault_urn(self) -> String {
        format!("urn:message:MassTransit:Fault[[{NAMESPACE}:{}]]", self.as_str())
    }

    /// The RabbitMQ exchange of `Fault<Type>`: `MassTransit:Fault--<ns>:<Type>--`.
    pub fn fault_exchange(self) -> String {
        format!("MassTransit:Fault--{NAMESPACE}:{}--", self.as_str())
    }

    /// Recognises a URN as MassTransit does (ordinal, ignoring case). The claim-check wrapper of a
    /// store plan counts as a store plan.
    pub fn from_urn(urn: &str) -> Option<Self> {
        let urn = urn.trim();
        if urn.eq_ignore_ascii_case(CLAIM_CHECK_WRAPPER) {
            return Some(MessageType::ExecuteStorePlanCommand);
        }
        let prefix = urn.get(..URN_PREFIX.len())?;
        if !prefix.eq_ignore_ascii_case(URN_PREFIX) {
            return None;
        }
        Self::parse(&urn[URN_PREFIX.len()..]).filter(|t| urn.len() == URN_PREFIX.len() + t.as_str().len())
    }

    /// The first command type named in a `messageType` list.
    pub fn first_known<'a>(urns: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        urns.into_iter().find_map(Self::from_urn)
    }
}

wire_enum! {
    /// What an instruction does to its resource.
    Operation {
        Create = "create",
        Update = "update",
        Upsert = "upsert",
        Delete = "delete",
    }
}

wire_enum! {
    /// The kind of a committed change, in change events.
    ChangeType {
        Create = "create",
        Update = "update",
        Delete = "delete",
    }
}

wire_enum! {
    /// `status.code` of an item in a response.
    StatusCode {
        Success = "success",
        BadRequest = "badRequest",
        Error = "error",
        InternalServerError = "internalServerError",
    }
}

wire_enum! {
    /// `status.details` of an item in a response: every detail the contract defines.
    StatusDetails {
        Ok = "Ok",
        BadRequestMissingItemId = "BadRequestMissingItemId",
        BadRequestMissingResourceId = "BadRequestMissingResourceId",
        BadRequestPayloadMissingResourceId = "BadRequestPayloadMissingResourceId",
        BadRequestPayloadMissingVersionId = "BadRequestPayloadMissingVersionId",
        BadRequestPayloadMissingLastUpdated = "BadRequestPayloadMissingLastUpdated",
        BadRequestMissingResourceType = "BadRequestMissingResourceType",
        BadRequestMissingResourcePayload = "BadRequestMissingResourcePayload",
        BadRequestWrongPayloadFormat = "BadRequestWrongPayloadFormat",
        BadRequestOperationNotSupported = "BadRequestOperationNotSupported",
        BadRequestMissingReference = "BadRequestMissingReference",
        CreationSucceeded = "CreationSucceeded",
        CreationFailedResourceAlreadyExists = "CreationFailedResourceAlreadyExists",
        CreationFailedVersionIdCannotBeReused = "CreationFailedVersionIdCannotBeReused",
        UpdateSucceeded = "UpdateSucceeded",
        UpdateFailedResourceNotFound = "UpdateFailedResourceNotFound",
        UpdateFailedVersionIdMismatch = "UpdateFailedVersionIdMismatch",
        UpdateFailedVersionIdCannotBeReused = "UpdateFailedVersionIdCannotBeReused",
        DeletionSucceeded = "DeletionSucceeded",
        DeletionFailedVersionIdMismatch = "DeletionFailedVersionIdMismatch",
        ResourceNotFound = "ResourceNotFound",
        MatchingVersionNotFound = "MatchingVersionNotFound",
    }
}

impl StatusDetails {
    /// The status code that goes with this detail.
    pub fn code(self) -> StatusCode {
        use StatusDetails::*;
        match self {
            Ok | CreationSucceeded | UpdateSucceeded | DeletionSucceeded => StatusCode::Success,
            BadRequestMissingItemId
            | BadRequestMissingResourceId
            | BadRequestPayloadMissingResourceId
            | BadRequestPayloadMissingVersionId
            | BadRequestPayloadMissingLastUpdated
            | BadRequestMissingResourceType
            | BadRequestMissingResourcePayload
            | BadRequestWrongPayloadFormat
            | BadRequestOperationNotSupported
            | BadRequestMissingReference => StatusCode::BadRequest,
            CreationFailedResourceAlreadyExists
            | CreationFailedVersionIdCannotBeReused
            | UpdateFailedResourceNotFound
            | UpdateFailedVersionIdMismatch
            | UpdateFailedVersionIdCannotBeReused
            | DeletionFailedVersionIdMismatch
            | ResourceNotFound
            | MatchingVersionNotFound => StatusCode::Error,
        }
    }
}

/// `{ code, details }` of an item. `details` is null only in what other servers send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub code: StatusCode,
    #[serde(default)]
    pub details: Option<StatusDetails>,
}

impl Status {
    pub fn of(details: StatusDetails) -> Self {
        Status { code: details.code(), details: Some(details) }
    }

    /// An unexpected failure of the server itself (the database went away mid-plan, say).
    pub fn internal() -> Self {
        Status { code: StatusCode::InternalServerError, details: None }
    }
}

/// One line of a store plan, as a client writes it (the resource as a JSON string, Firely's form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreInstruction {
    /// The caller's label for this line, echoed in results.
    pub item_id: String,
    pub operation: Operation,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    /// The complete FHIR resource as JSON text (readers also accept a JSON object).
    pub resource: Option<String>,
    /// For update, upsert and delete: the version the caller expects to be current.
    pub current_version: Option<String>,
}

/// `ExecuteStorePlanCommand`: instructions applied as one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecuteStorePlanCommand {
    pub instructions: Vec<StoreInstruction>,
}

/// A failed instruction in an [`ExecuteStorePlanResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ItemError {
    /// The failing instruction's itemId (null when it had none, or when the fault is the plan's).
    pub item_id: Option<String>,
    pub status: Status,
    /// A sentence a person can act on.
    pub message: Option<String>,
}

impl ItemError {
    pub fn new(item_id: Option<String>, details: StatusDetails, message: impl Into<String>) -> Self {
        ItemError { item_id, status: Status::of(details), message: Some(message.into()) }
    }
}

/// `ExecuteStorePlanResponse`: empty `errors` means the plan was applied.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecuteStorePlanResponse {
    pub errors: Vec<ItemError>,
}

/// Points at a resource, optionally at one version of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceReference {
    pub resource_type: String,
    pub resource_id: String,
    /// The versionId; null asks for the current version.
    pub version: Option<String>,
}

/// One line of a retrieve plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrieveInstruction {
    pub item_id: String,
    pub reference: ResourceReference,
}

/// `RetrievePlanCommand`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrievePlanCommand {
    pub instructions: Vec<RetrieveInstruction>,
}

/// One result of a retrieve plan, in the order of the instructions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrieveItem {
    pub item_id: Option<String>,
    /// The stored resource as JSON text, exactly as it was stored; null when not found.
    pub resource: Option<String>,
    pub status: Status,
    pub message: Option<String>,
}

/// `RetrievePlanResponse`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrievePlanResponse {
    pub items: Vec<RetrieveItem>,
}

/// One committed change in a full event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceChange {
    /// The resource and the version the change made (for a delete: the version it removed).
    pub reference: ResourceReference,
    /// The resource after the change as JSON text; null for a delete.
    pub resource: Option<String>,
    pub change_type: ChangeType,
}

/// `ResourcesChangedEvent`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourcesChangedEvent {
    pub changes: Vec<ResourceChange>,
}

/// One committed change in a light event (no resource body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LightResourceChange {
    pub reference: ResourceReference,
    pub change_type: ChangeType,
}

/// `ResourcesChangedLightEvent`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourcesChangedLightEvent {
    pub changes: Vec<LightResourceChange>,
}

/// The claim-check form of a store plan: the instructions live in a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClaimCheckMessage {
    pub payload: ClaimCheckPayload,
}

/// `{ "data-ref": "<blob URL>" }`; the blob holds the bare `{ "instructions": [...] }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClaimCheckPayload {
    #[serde(rename = "data-ref")]
    pub data_ref: String,
}

/// The MassTransit messageType URN of the claim-check wrapper around a store plan.
pub fn claim_check_wrapper_urn() -> &'static str {
    CLAIM_CHECK_WRAPPER
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urns_are_recognised_in_any_case_and_nothing_else_is() {
        assert_eq!(
            MessageType::from_urn("urn:message:firely.server.contracts.messages.v1:executestoreplancommand"),
            Some(MessageType::ExecuteStorePlanCommand)
        );
        assert_eq!(MessageType::from_urn(claim_check_wrapper_urn()), Some(MessageType::ExecuteStorePlanCommand));
        assert_eq!(
            MessageType::from_urn("urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommandX"),
            None
        );
        assert_eq!(MessageType::from_urn("urn:message:Other:ExecuteStorePlanCommand"), None);
        assert_eq!(MessageType::from_urn(""), None);
    }

    #[test]
    fn enums_write_exact_text_and_read_any_case() {
        assert_eq!(serde_json::to_string(&StatusCode::BadRequest).unwrap(), "\"badRequest\"");
        assert_eq!(serde_json::from_str::<StatusCode>("\"BadRequest\"").unwrap(), StatusCode::BadRequest);
        assert_eq!(Operation::parse("UPSERT"), Some(Operation::Upsert));
        assert_eq!(StatusDetails::parse("badrequestmissingitemid"), Some(StatusDetails::BadRequestMissingItemId));
        assert!(serde_json::from_str::<Operation>("\"patch\"").is_err());
    }
}
