//! RabbitMQ set-up shared by the tests: durable fanout exchanges (MassTransit's kind), queues bound to
//! them, and MassTransit's endpoint form (an exchange with a queue of the same name bound to it). Each
//! helper panics with the step that failed: in a test, a broker that refuses the set-up is a failure.
#![allow(dead_code)]

use lapin::Channel;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{ExchangeKind, Queue};

/// Declares the durable fanout exchange `exchange`.
pub async fn durable_fanout(channel: &Channel, exchange: &str) {
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare(exchange.into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .unwrap_or_else(|e| panic!("declaring exchange {exchange}: {e}"));
}

/// Binds `queue` to the fanout exchange `exchange`.
pub async fn bind(channel: &Channel, queue: &str, exchange: &str) {
    channel
        .queue_bind(queue.into(), exchange.into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap_or_else(|e| panic!("binding {queue} to {exchange}: {e}"));
}

/// Declares the durable fanout exchange `exchange` and the queue `queue` (with `queue_flags`), and binds
/// the queue to the exchange. With `queue == exchange` this is a MassTransit endpoint.
pub async fn queue_on_fanout(
    channel: &Channel,
    exchange: &str,
    queue: &str,
    queue_flags: QueueDeclareOptions,
) -> Queue {
    durable_fanout(channel, exchange).await;
    let declared = channel
        .queue_declare(queue.into(), queue_flags, FieldTable::default())
        .await
        .unwrap_or_else(|e| panic!("declaring queue {queue}: {e}"));
    bind(channel, queue, exchange).await;
    declared
}
