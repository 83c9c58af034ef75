//! Acknowledgement of Kafka records: storing offsets, the error topic, and retries.
//!
//! Invariants: `ack` stores an offset only through the partition's watermark ([`OffsetTracker`]),
//! so an offset is stored only when its record and every earlier one of the partition are done; a
//! record moved to the error topic is acknowledged only after the broker confirmed the copy
//! (`acks=all`), so a crash in between repeats it rather than losing it. A record of a partition
//! this consumer no longer owns is neither stored nor copied: its next owner consumes it again.

use std::sync::Arc;

use async_trait::async_trait;
use rdkafka::consumer::Consumer;
use tokio::sync::mpsc;

use super::offsets::{Finished, OffsetTracker};
use super::records::Received;
use super::{CommandConsumer, Inner};
use crate::transport::{Acknowledger, Delivery, FaultReason, TransportError};

/// What a record's acknowledgement needs.
pub(super) struct Handle {
    pub inner: Arc<Inner>,
    /// The consumer that owns the record's partition (offsets are stored on it).
    pub consumer: Arc<CommandConsumer>,
    pub tracker: Arc<OffsetTracker>,
    /// The assignment generation the record was handed out under.
    pub generation: u64,
    /// Where a record given back for a later attempt goes.
    pub retries: mpsc::UnboundedSender<Delivery>,
}

/// A record as a [`Delivery`] for the bridge.
pub(super) fn delivery(record: Arc<Received>, handle: Handle, redelivered: bool) -> Delivery {
    let type_hint = handle.inner.type_of_topic(&record.topic);
    Delivery {
        body: record.value.clone(),
        meta: record.meta(type_hint),
        redelivered,
        acker: Box::new(KafkaAcker { record, handle }),
    }
}

struct KafkaAcker {
    record: Arc<Received>,
    handle: Handle,
}

impl KafkaAcker {
    fn partition(&self) -> (String, i32) {
        (self.record.topic.clone(), self.record.partition)
    }

    fn revoked(&self) -> TransportError {
        TransportError::Unavailable(format!(
            "partition {} of `{}` was reassigned; its next owner consumes offset {} again",
            self.record.partition, self.record.topic, self.record.offset
        ))
    }

    /// Copies the record, with `extra` headers, to the error topic and waits for the confirmation.
    async fn copy_to_error_topic(&self, extra: &[(&str, String)]) -> Result<(), TransportError> {
        if !self.handle.tracker.is_current(&self.partition(), self.handle.generation) {
            return Err(self.revoked());
        }
        let inner = &self.handle.inner;
        let topic = inner.options.error_topic.as_str();
        let key = self.record.key.as_deref().map(String::from_utf8_lossy);
        inner.produce(topic, key.as_deref(), &self.record.value, self.record.headers_with(extra)).await
    }

    fn source_headers(&self) -> Vec<(&'static str, String)> {
        vec![
            ("MT-Fault-InputAddress", self.handle.inner.input_address.clone()),
            ("MT-Fault-Timestamp", chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
            ("MT-Source-Topic", self.record.topic.clone()),
            ("MT-Source-Partition", self.record.partition.to_string()),
            ("MT-Source-Offset", self.record.offset.to_string()),
        ]
    }
}

#[async_trait]
impl Acknowledger for KafkaAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        let partition = self.partition();
        match self.handle.tracker.finish(&partition, self.record.offset, self.handle.generation) {
            Finished::Store(offset) => self
                .handle
                .consumer
                .store_offset(&partition.0, partition.1, offset)
                .map_err(|e| TransportError::Unavailable(format!("storing offset {offset} of {partition:?}: {e}"))),
            Finished::Wait => Ok(()),
            Finished::Stale => Err(self.revoked()),
        }
    }

    async fn move_to_error(&self, reason: &FaultReason) -> Result<(), TransportError> {
        let mut headers = vec![
            ("MT-Reason", "fault".to_owned()),
            ("MT-Fault-ExceptionType", reason.exception_type.clone()),
            ("MT-Fault-Message", reason.message.clone()),
        ];
        if let Some(message_type) = reason.message_type {
            headers.push(("MT-Fault-MessageType", message_type.urn()));
        }
        headers.extend(self.source_headers());
        self.copy_to_error_topic(&headers).await?;
        self.ack().await
    }

    async fn move_to_skipped(&self) -> Result<(), TransportError> {
        // Kafka has one error topic (Firely's); a record of a type nobody consumes goes there too,
        // marked as MassTransit marks skipped messages.
        let mut headers = vec![
            ("MT-Reason", "dead-letter".to_owned()),
            (
                "MT-Fault-Message",
                "The record's message type is not one this bridge consumes (ExecuteStorePlanCommand, \
                 RetrievePlanCommand)."
                    .to_owned(),
            ),
        ];
        headers.extend(self.source_headers());
        self.copy_to_error_topic(&headers).await?;
        self.ack().await
    }

    async fn retry_later(&self) -> Result<(), TransportError> {
        tokio::time::sleep(self.handle.inner.options.retry_delay).await;
        if !self.handle.tracker.is_current(&self.partition(), self.handle.generation) {
            return Err(self.revoked());
        }
        // The offset stays unstored (the watermark waits for it); the record goes round again.
        let handle = Handle {
            inner: Arc::clone(&self.handle.inner),
            consumer: Arc::clone(&self.handle.consumer),
            tracker: Arc::clone(&self.handle.tracker),
            generation: self.handle.generation,
            retries: self.handle.retries.clone(),
        };
        let again = delivery(Arc::clone(&self.record), handle, true);
        self.handle
            .retries
            .send(again)
            .map_err(|_| TransportError::Unavailable("the transport stopped consuming".to_owned()))
    }
}
