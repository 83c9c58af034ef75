//! Settling Service Bus messages: complete, abandon, dead-letter, or copy to an error queue.
//!
//! A message is settled on the link that received it, which only the receiver task may touch; an
//! acknowledgement handle therefore sends a [`Settle`] request to that task and waits for its
//! answer. Invariants: `ack` completes the message only when the bridge says its effect is durable
//! (SQL commit and the confirmed reply); a message copied to `<queue>_error`/`<queue>_skipped` is
//! completed only after Service Bus accepted the copy; a settle that fails (lost link, expired lock)
//! is reported as retryable, and Service Bus delivers the message again once its lock expires.

use std::sync::Arc;

use async_trait::async_trait;
use azservicebus::ServiceBusReceivedMessage;
use tokio::sync::{mpsc, oneshot};

use super::{Inner, message};
use crate::transport::{Acknowledger, Delivery, FaultReason, TransportError};

/// What to do with a received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Remove it: it was handled.
    Complete,
    /// Release the lock: Service Bus delivers it again, its delivery count one higher.
    Abandon,
    /// Move it to the queue's dead-letter sub-queue with a reason and a description.
    DeadLetter { reason: String, description: String },
}

/// A request to the receiver task.
pub struct Settle {
    pub message: Arc<ServiceBusReceivedMessage>,
    /// The client generation of the link that received the message.
    pub generation: u64,
    pub disposition: Disposition,
    pub done: oneshot::Sender<Result<(), String>>,
}

/// Service Bus limits a dead-letter description; longer reasons are cut at this many characters.
const MAX_DESCRIPTION_CHARS: usize = 4_096;

/// A received message as a [`Delivery`] for the bridge.
pub(super) fn delivery(
    inner: Arc<Inner>,
    received: ServiceBusReceivedMessage,
    generation: u64,
    settle: mpsc::Sender<Settle>,
) -> Delivery {
    let redelivered = received.delivery_count().is_some_and(|count| count > 1);
    let body = message::body_of(&received);
    let meta = message::meta_of(&received);
    Delivery {
        body,
        meta,
        redelivered,
        acker: Box::new(ServiceBusAcker { inner, message: Arc::new(received), generation, settle }),
    }
}

struct ServiceBusAcker {
    inner: Arc<Inner>,
    message: Arc<ServiceBusReceivedMessage>,
    generation: u64,
    settle: mpsc::Sender<Settle>,
}

impl ServiceBusAcker {
    async fn settle(&self, disposition: Disposition) -> Result<(), TransportError> {
        let (done, answer) = oneshot::channel();
        let what = format!("{disposition:?}");
        let request = Settle { message: Arc::clone(&self.message), generation: self.generation, disposition, done };
        let stopped = || {
            TransportError::Unavailable("the Service Bus receiver stopped; the message will be delivered again".into())
        };
        self.settle.send(request).await.map_err(|_| stopped())?;
        match answer.await.map_err(|_| stopped())? {
            Ok(()) => Ok(()),
            Err(e) => Err(TransportError::Unavailable(format!(
                "settling message {} ({what}) failed: {e}; Service Bus delivers it again when its lock expires",
                self.message.message_id().unwrap_or_default()
            ))),
        }
    }

    fn fault_properties(&self, reason: &FaultReason) -> Vec<(&'static str, String)> {
        let mut properties = vec![
            ("MT-Reason", "fault".to_owned()),
            ("MT-Fault-ExceptionType", reason.exception_type.clone()),
            ("MT-Fault-Message", reason.message.clone()),
            ("MT-Fault-InputAddress", self.inner.input_address.clone()),
            ("MT-Fault-Timestamp", chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        ];
        if let Some(message_type) = reason.message_type {
            properties.push(("MT-Fault-MessageType", message_type.urn()));
        }
        properties
    }
}

#[async_trait]
impl Acknowledger for ServiceBusAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        self.settle(Disposition::Complete).await
    }

    async fn move_to_error(&self, reason: &FaultReason) -> Result<(), TransportError> {
        if self.inner.options.use_error_queues {
            let copy = message::copy_of(&self.message, &self.fault_properties(reason));
            self.inner.send_to(&self.inner.options.error_queue(), copy).await?;
            return self.settle(Disposition::Complete).await;
        }
        let description: String = reason.message.chars().take(MAX_DESCRIPTION_CHARS).collect();
        self.settle(Disposition::DeadLetter { reason: reason.exception_type.clone(), description }).await
    }

    async fn move_to_skipped(&self) -> Result<(), TransportError> {
        const WHY: &str =
            "The message's type is not one this bridge consumes (ExecuteStorePlanCommand, RetrievePlanCommand).";
        if self.inner.options.use_error_queues {
            let properties = [
                ("MT-Reason", "dead-letter".to_owned()),
                ("MT-Fault-Message", WHY.to_owned()),
                ("MT-Fault-InputAddress", self.inner.input_address.clone()),
            ];
            let copy = message::copy_of(&self.message, &properties);
            self.inner.send_to(&self.inner.options.skipped_queue(), copy).await?;
            return self.settle(Disposition::Complete).await;
        }
        self.settle(Disposition::DeadLetter { reason: "Skipped".into(), description: WHY.into() }).await
    }

    async fn retry_later(&self) -> Result<(), TransportError> {
        // Held (still locked) for a while, so that a store outage is not met with a burst of
        // redeliveries that would use up the queue's MaxDeliveryCount at once.
        tokio::time::sleep(self.inner.options.retry_delay).await;
        self.settle(Disposition::Abandon).await
    }
}
