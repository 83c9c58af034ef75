//! Acknowledgement of RabbitMQ deliveries, including the moves to `Q_error` and `Q_skipped`.
//!
//! Invariants: a moved message is a copy of the original body and properties (only `expiration`
//! cleared and the MassTransit fault/host headers added) published to `{Q}_error`/`{Q}_skipped`
//! with the original routing key; the original is acknowledged only after the broker confirmed
//! the copy, so a crash in between duplicates rather than loses it. A handle whose connection was
//! lost reports a retryable error: the broker redelivers the message anyway.

use std::sync::Arc;

use async_trait::async_trait;
use lapin::Acker;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};

use super::{Inner, PublishFailure, convert};
use crate::transport::{Acknowledger, Delivery, FaultReason, TransportError};

/// Wraps a lapin delivery into the transport's [`Delivery`].
pub(super) fn into_delivery(delivery: lapin::message::Delivery, inner: Arc<Inner>, session_id: u64) -> Delivery {
    let meta = super::delivery_meta(&delivery);
    let redelivered = delivery.redelivered;
    let lapin::message::Delivery { data, properties, routing_key, acker, .. } = delivery;
    let handle =
        RabbitAcker { inner, session_id, acker, body: data.clone(), properties, routing_key: routing_key.to_string() };
    Delivery { body: data, meta, redelivered, acker: Box::new(handle) }
}

struct RabbitAcker {
    inner: Arc<Inner>,
    session_id: u64,
    acker: Acker,
    body: Vec<u8>,
    properties: BasicProperties,
    routing_key: String,
}

impl RabbitAcker {
    fn lost() -> TransportError {
        TransportError::Unavailable(
            "the delivery's connection or channel is gone; the broker will redeliver it".to_owned(),
        )
    }

    /// Copies the message to `exchange` with `extra` headers and waits for the confirm.
    async fn copy_to(&self, exchange: &str, extra: Vec<(&'static str, AMQPValue)>) -> Result<(), TransportError> {
        let session = self.inner.wait_for_session().await?;
        if session.id != self.session_id {
            // The original can no longer be acked; copying it now would duplicate it.
            return Err(Self::lost());
        }
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        for (key, value) in extra {
            headers.insert(ShortString::from(key), value);
        }
        let properties = copy_properties(&self.properties, headers);
        self.inner
            .publish_confirmed(&session, exchange, &self.routing_key, &self.body, properties)
            .await
            .map_err(|f: PublishFailure| f.into_error(exchange))
    }

    fn host_headers(&self) -> Vec<(&'static str, AMQPValue)> {
        let process = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| env!("CARGO_PKG_NAME").to_owned());
        vec![
            ("MT-Host-MachineName", convert::text(machine_name())),
            ("MT-Host-ProcessName", convert::text(process)),
            ("MT-Host-ProcessId", AMQPValue::LongInt(i32::try_from(std::process::id()).unwrap_or(i32::MAX))),
            ("MT-Host-Assembly", convert::text(env!("CARGO_PKG_NAME"))),
            ("MT-Host-AssemblyVersion", convert::text(env!("CARGO_PKG_VERSION"))),
            ("MT-Host-OperatingSystemVersion", convert::text(std::env::consts::OS)),
        ]
    }
}

#[async_trait]
impl Acknowledger for RabbitAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        match self.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            Ok(false) | Err(_) => Err(Self::lost()),
        }
    }

    async fn move_to_error(&self, reason: &FaultReason) -> Result<(), TransportError> {
        let mut headers = vec![
            ("MT-Reason", convert::text("fault")),
            ("MT-Fault-ExceptionType", convert::text(&reason.exception_type)),
            ("MT-Fault-InputAddress", convert::text(&self.inner.input_address)),
            ("MT-Fault-Message", convert::text(&reason.message)),
            ("MT-Fault-Timestamp", convert::text(round_trip_timestamp(chrono::Utc::now()))),
        ];
        if let Some(message_type) = reason.message_type {
            headers.push(("MT-Fault-MessageType", convert::text(message_type.urn())));
        }
        headers.extend(self.host_headers());
        let exchange = format!("{}_error", self.inner.options.queue_name);
        self.copy_to(&exchange, headers).await?;
        self.ack().await
    }

    async fn move_to_skipped(&self) -> Result<(), TransportError> {
        let mut headers = vec![("MT-Reason", convert::text("dead-letter"))];
        headers.extend(self.host_headers());
        let exchange = format!("{}_skipped", self.inner.options.queue_name);
        self.copy_to(&exchange, headers).await?;
        self.ack().await
    }

    async fn retry_later(&self) -> Result<(), TransportError> {
        tokio::time::sleep(self.inner.options.retry_delay).await;
        match self.acker.nack(BasicNackOptions { multiple: false, requeue: true }).await {
            Ok(true) => Ok(()),
            Ok(false) | Err(_) => Err(Self::lost()),
        }
    }
}

/// The original properties with `expiration` cleared and the given headers.
fn copy_properties(original: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut p = BasicProperties::default().with_headers(headers);
    if let Some(v) = original.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = original.delivery_mode() {
        p = p.with_delivery_mode(*v);
    }
    if let Some(v) = original.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = original.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = original.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = original.user_id() {
        p = p.with_user_id(v.clone());
    }
    if let Some(v) = original.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = original.cluster_id() {
        p = p.with_cluster_id(v.clone());
    }
    p
}

/// .NET's round-trip ("O") format in UTC: seven fractional digits and `Z`.
fn round_trip_timestamp(at: chrono::DateTime<chrono::Utc>) -> String {
    format!("{}.{:07}Z", at.format("%Y-%m-%dT%H:%M:%S"), at.timestamp_subsec_nanos() / 100)
}

fn machine_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_owned()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn timestamp_has_seven_fraction_digits() {
        let at = chrono::Utc.with_ymd_and_hms(2024, 4, 28, 7, 26, 15).single().expect("valid date")
            + chrono::Duration::nanoseconds(289_027_512);
        assert_eq!(round_trip_timestamp(at), "2024-04-28T07:26:15.2890275Z");
    }

    #[test]
    fn copy_clears_expiration_only() {
        let original = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_expiration("5000".into())
            .with_message_id("m1".into())
            .with_delivery_mode(2)
            .with_priority(3);
        let copy = copy_properties(&original, FieldTable::default());
        assert_eq!(copy.expiration(), &None);
        assert_eq!(copy.content_type(), original.content_type());
        assert_eq!(copy.message_id(), original.message_id());
        assert_eq!(copy.priority(), &Some(3));
        assert_eq!(copy.delivery_mode(), &Some(2));
    }
}
