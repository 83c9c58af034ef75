//! Turning a batch of committed changes into event messages.
//!
//! Invariant: the same changes always give the same messageId, whenever and by whichever process they
//! are published, so a consumer can drop a repeat by messageId alone. The id is a UUIDv5 of the event
//! type and the log positions (`seq`) of the changes it carries.

use serde_json::value::RawValue;
use uuid::Uuid;

use crate::contracts::{
    ChangeType, LightResourceChange, MessageType, ResourceChange, ResourceReference, ResourcesChangedEvent,
    ResourcesChangedLightEvent,
};
use crate::envelope::{self, Envelope};
use crate::store::PendingChange;
use crate::transport::OutgoingMessage;

/// The namespace of event messageIds (a fixed random UUID: ids are ours alone).
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0xd896_dfb2_aa8f_4482_8240_18bd_c307_066f);

/// The messageId of the event of `message_type` carrying `changes`.
pub fn event_message_id(message_type: MessageType, changes: &[&PendingChange]) -> Uuid {
    let mut name = String::with_capacity(64 + changes.len() * 8);
    name.push_str(message_type.as_str());
    for change in changes {
        name.push(':');
        name.push_str(&change.seq.to_string());
    }
    Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
}

fn reference(change: &PendingChange) -> ResourceReference {
    ResourceReference {
        resource_type: change.key.resource_type.clone(),
        resource_id: change.key.resource_id.clone(),
        version: Some(change.version_id.clone()),
    }
}

/// The `ResourcesChangedEvent` message: each change with the resource after it (null for a delete).
pub fn full_event(changes: &[&PendingChange]) -> ResourcesChangedEvent {
    ResourcesChangedEvent {
        changes: changes
            .iter()
            .map(|c| ResourceChange {
                reference: reference(c),
                resource: if c.change_type == ChangeType::Delete { None } else { c.body.clone() },
                change_type: c.change_type,
            })
            .collect(),
    }
}

/// The `ResourcesChangedLightEvent` message: references and change types only.
pub fn light_event(changes: &[&PendingChange]) -> ResourcesChangedLightEvent {
    ResourcesChangedLightEvent {
        changes: changes
            .iter()
            .map(|c| LightResourceChange { reference: reference(c), change_type: c.change_type })
            .collect(),
    }
}

/// The envelope of an event, ready to publish.
pub fn outgoing<T: serde::Serialize>(
    message_type: MessageType,
    message: &T,
    changes: &[&PendingChange],
    source_address: &str,
) -> Result<OutgoingMessage, serde_json::Error> {
    let message_id = event_message_id(message_type, changes);
    let raw: Box<RawValue> = serde_json::value::to_raw_value(message)?;
    let envelope = Envelope::event(message_type, raw, message_id, source_address);
    Ok(OutgoingMessage {
        body: envelope::encode(&envelope),
        content_type: envelope::ENVELOPE_CONTENT_TYPE,
        message_id,
        correlation_id: None,
        headers: Vec::new(),
        time_to_live: None,
        reply_to: None,
        key: None,
        session_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ResourceKey;

    fn change(seq: i64, change_type: ChangeType) -> PendingChange {
        PendingChange {
            seq,
            txid: 1,
            key: ResourceKey::new("Patient", format!("p{seq}")),
            version_id: "v1".into(),
            change_type,
            body: (change_type != ChangeType::Delete).then(|| r#"{"resourceType":"Patient"}"#.to_owned()),
            recorded_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn message_ids_follow_the_log_positions_and_the_event_type() {
        let (a, b) = (change(1, ChangeType::Create), change(2, ChangeType::Update));
        let id = event_message_id(MessageType::ResourcesChangedEvent, &[&a, &b]);
        assert_eq!(id, event_message_id(MessageType::ResourcesChangedEvent, &[&a, &b]));
        assert_ne!(id, event_message_id(MessageType::ResourcesChangedEvent, &[&a]));
        assert_ne!(id, event_message_id(MessageType::ResourcesChangedEvent, &[&b, &a]));
        assert_ne!(id, event_message_id(MessageType::ResourcesChangedLightEvent, &[&a, &b]));
        assert_eq!(id.get_version_num(), 5);
    }

    #[test]
    fn a_delete_carries_no_resource_and_the_light_event_no_body() {
        let (a, d) = (change(1, ChangeType::Create), change(2, ChangeType::Delete));
        let full = serde_json::to_value(full_event(&[&a, &d])).unwrap();
        assert_eq!(full["changes"][0]["resource"], r#"{"resourceType":"Patient"}"#);
        assert_eq!(full["changes"][1]["resource"], serde_json::Value::Null);
        assert_eq!(full["changes"][1]["changeType"], "delete");
        let light = serde_json::to_value(light_event(&[&a, &d])).unwrap();
        assert!(light["changes"][0].get("resource").is_none());
        assert_eq!(light["changes"][0]["reference"]["version"], "v1");
    }
}
