//! The Prometheus vocabulary of the bridge: every metric name in one place, with its help text.
//!
//! Metrics are recorded with the `metrics` macros where the events happen (the bridge, the plan
//! executor, the publisher, the transports); they go nowhere until [`install`] sets the process-wide
//! recorder (`fhir-pubsub run` does), so library users and tests pay nothing. Names follow the
//! Prometheus conventions: a `fhir_pubsub_` prefix, base units in the name (`_seconds`), `_total` on
//! counters; label values come from small closed sets (message types, outcome codes), never from input.

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Commands taken from the broker, by `type` (the Firely message type, or `unknown` when it cannot be read).
pub const COMMANDS_RECEIVED: &str = "fhir_pubsub_commands_received_total";
/// Commands finished, by `type` and `outcome`: the Firely status code of the reply (`success`,
/// `badRequest`, `error`), or `error_queue`, `skipped`, `retry` when no reply was sent.
pub const COMMANDS: &str = "fhir_pubsub_commands_total";
/// Seconds from taking a command to its acknowledgement, by `type`.
pub const PLAN_DURATION: &str = "fhir_pubsub_plan_duration_seconds";
/// Instructions per plan, by `type`.
pub const PLAN_INSTRUCTIONS: &str = "fhir_pubsub_plan_instructions";
/// Seconds per store transaction of the group commit (begin to commit), several plans each under load.
pub const STORE_TRANSACTION_DURATION: &str = "fhir_pubsub_store_transaction_seconds";
/// Store plans per transaction of the group commit.
pub const STORE_TRANSACTION_PLANS: &str = "fhir_pubsub_store_transaction_plans";
/// Replies confirmed by the broker.
pub const REPLIES_SENT: &str = "fhir_pubsub_replies_sent_total";
/// `Fault<T>` messages sent.
pub const FAULTS: &str = "fhir_pubsub_faults_total";
/// Messages moved to the error queue or topic.
pub const ERROR_QUEUE_MOVES: &str = "fhir_pubsub_error_queue_moves_total";
/// Messages moved to the skipped queue (a type the bridge does not consume).
pub const SKIPPED_QUEUE_MOVES: &str = "fhir_pubsub_skipped_queue_moves_total";
/// Event messages confirmed by the broker, by `type`.
pub const EVENTS_PUBLISHED: &str = "fhir_pubsub_events_published_total";
/// Changes whose events were all confirmed.
pub const CHANGES_PUBLISHED: &str = "fhir_pubsub_changes_published_total";
/// Publish attempts that failed and were retried.
pub const PUBLISH_FAILURES: &str = "fhir_pubsub_publish_failures_total";
/// Age of the oldest unpublished change, in seconds (0 when none waits).
pub const PUBLISHER_LAG: &str = "fhir_pubsub_publisher_lag_seconds";
/// Committed changes not yet published.
pub const PUBLISHER_PENDING: &str = "fhir_pubsub_publisher_pending_changes";
/// 1 while this process publishes the change events, 0 while another does.
pub const PUBLISHER_LEADING: &str = "fhir_pubsub_publisher_leading";
/// Claim checks, by `outcome`: `fetched`, `answered_from_inbox`, or why there is no plan
/// ([`crate::claimcheck::ClaimCheckError::outcome`]: `refused`, `not_found`, `too_large`, `not_a_plan`,
/// `denied`, `rejected`, `unavailable`).
pub const CLAIM_CHECKS: &str = "fhir_pubsub_claim_checks_total";
/// Store transactions run again after losing a race (deadlock, serialization failure, busy).
pub const STORE_RETRIES: &str = "fhir_pubsub_store_retries_total";
/// Broker connections re-established after a loss.
pub const BROKER_RECONNECTS: &str = "fhir_pubsub_broker_reconnects_total";
/// 1 while the broker connection is up.
pub const BROKER_CONNECTED: &str = "fhir_pubsub_broker_connected";
/// When the process started, in seconds since the Unix epoch.
pub const START_TIME: &str = "fhir_pubsub_start_time_seconds";

/// Bucket bounds of [`PLAN_DURATION`], in seconds: a millisecond to half a minute.
const DURATION_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Bucket bounds of [`PLAN_INSTRUCTIONS`].
const INSTRUCTION_BUCKETS: &[f64] =
    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0];

/// Installs the process-wide Prometheus recorder and registers the help texts. Call once; the
/// handle renders the exposition text (`/metrics`).
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(PLAN_DURATION.into()), DURATION_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(PLAN_INSTRUCTIONS.into()), INSTRUCTION_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(STORE_TRANSACTION_DURATION.into()), DURATION_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(STORE_TRANSACTION_PLANS.into()), INSTRUCTION_BUCKETS)?
        .install_recorder()?;
    describe();
    // Counters without labels start at 0, so that a rate over them exists before the first event.
    for name in [
        REPLIES_SENT,
        FAULTS,
        ERROR_QUEUE_MOVES,
        SKIPPED_QUEUE_MOVES,
        CHANGES_PUBLISHED,
        PUBLISH_FAILURES,
        STORE_RETRIES,
        BROKER_RECONNECTS,
    ] {
        metrics::counter!(name).increment(0);
    }
    Ok(handle)
}

/// Drains the histograms' recorded samples into their buckets every few seconds. The recorder
/// keeps every sample until then; without this, a process whose `/metrics` nobody scrapes would
/// hold every sample it ever recorded. Call from within the runtime.
pub fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            handle.run_upkeep();
        }
    });
}

/// Registers the help text and unit of every metric.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(COMMANDS_RECEIVED, "Commands taken from the broker, by message type.");
    describe_counter!(
        COMMANDS,
        "Commands finished, by message type and outcome (the reply's status code, or error_queue, skipped, retry)."
    );
    describe_histogram!(PLAN_DURATION, Unit::Seconds, "Time from taking a command to its acknowledgement.");
    describe_histogram!(PLAN_INSTRUCTIONS, Unit::Count, "Instructions per plan.");
    describe_histogram!(
        STORE_TRANSACTION_DURATION,
        Unit::Seconds,
        "Time of each store transaction of the group commit, from begin to commit."
    );
    describe_histogram!(STORE_TRANSACTION_PLANS, Unit::Count, "Store plans per transaction of the group commit.");
    describe_counter!(REPLIES_SENT, "Replies confirmed by the broker.");
    describe_counter!(FAULTS, "Fault messages sent.");
    describe_counter!(ERROR_QUEUE_MOVES, "Messages moved to the error queue.");
    describe_counter!(
        SKIPPED_QUEUE_MOVES,
        "Messages of a type the bridge does not consume, moved to the skipped queue."
    );
    describe_counter!(EVENTS_PUBLISHED, "Change event messages confirmed by the broker, by event type.");
    describe_counter!(CHANGES_PUBLISHED, "Changes whose events were all confirmed.");
    describe_counter!(PUBLISH_FAILURES, "Publish attempts of change events that failed and were retried.");
    describe_gauge!(PUBLISHER_LAG, Unit::Seconds, "Age of the oldest unpublished change (0 when none waits).");
    describe_gauge!(PUBLISHER_PENDING, Unit::Count, "Committed changes not yet published.");
    describe_gauge!(PUBLISHER_LEADING, "1 while this process publishes the change events.");
    describe_counter!(
        CLAIM_CHECKS,
        "Claim checks by outcome: fetched, answered_from_inbox, refused, not_found, too_large, not_a_plan, denied, rejected, unavailable."
    );
    describe_counter!(STORE_RETRIES, "Store transactions run again after losing a race.");
    describe_counter!(BROKER_RECONNECTS, "Broker connections re-established after a loss.");
    describe_gauge!(BROKER_CONNECTED, "1 while the broker connection is up.");
    describe_gauge!(START_TIME, Unit::Seconds, "Start time of the process since the Unix epoch.");
}
