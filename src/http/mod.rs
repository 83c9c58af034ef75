//! The operator's HTTP endpoints, served on `Http.Listen`:
//!
//! - `GET /healthz`: the process is up (always 200 while it answers);
//! - `GET /readyz`: the store answers, the broker connection is up and the change publisher keeps
//!   up (oldest unpublished change younger than `LagWarningSeconds`); otherwise 503 naming what
//!   fails; 503 as well once a stop was asked;
//! - `GET /metrics`: Prometheus exposition text ([`crate::observe::metrics`]);
//! - `GET /status`: per input and per event destination the figures of [`StatusBoard`], the
//!   publisher's cursor and lag, as JSON, or as a FHIR `Parameters` resource with `?_format=fhir`.
//!
//! Invariant: nothing these endpoints show carries a configured secret; every text that could
//! hold one (error messages) passes through the [`Scrubber`]. The endpoints only read: they never
//! change what the bridge does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::config::Scrubber;
use crate::observe::metrics as m;
use crate::observe::{RunState, StatusBoard};
use crate::publisher::PublisherStats;
use crate::store::Store;
use crate::transport::Transport;

/// How long `/readyz` and `/status` wait for the store to answer.
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the endpoints look at.
pub struct Observed {
    pub board: Arc<StatusBoard>,
    pub store: Arc<dyn Store>,
    pub transport: Arc<dyn Transport>,
    pub publisher: Arc<PublisherStats>,
    /// Renders `/metrics`; without it `/metrics` answers 404 (metrics are off).
    pub metrics: Option<PrometheusHandle>,
    /// Readiness fails when the oldest unpublished change is older than this.
    pub lag_threshold: Duration,
    /// Whether any change event is sent (`SendFullEvents` or `SendLightEvents`).
    pub events_enabled: bool,
    /// Hides secrets in the error texts shown.
    pub scrubber: Scrubber,
}

/// The router of every endpoint.
pub fn router(observed: Arc<Observed>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/status", get(status))
        .with_state(observed)
}

/// Binds `address` (port 0 picks a free port); the bound address is returned so that it can be
/// logged. Fails when the address cannot be bound (in use, not local).
pub async fn bind(address: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

/// Serves the endpoints on `listener` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    observed: Arc<Observed>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(observed)).with_graceful_shutdown(stop).await
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// One readiness check: its name, whether it passes, and a sentence.
fn check(name: &str, ok: bool, detail: impl Into<String>) -> Value {
    json!({"name": name, "ok": ok, "detail": detail.into()})
}

async fn store_check(observed: &Observed) -> Result<(), String> {
    match tokio::time::timeout(STORE_CHECK_TIMEOUT, observed.store.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(observed.scrubber.hide(&e.to_string()).into_owned()),
        Err(_) => Err(format!("the store did not answer within {} s", STORE_CHECK_TIMEOUT.as_secs())),
    }
}

async fn readyz(State(observed): State<Arc<Observed>>) -> Response {
    let mut checks = Vec::new();
    let stopping = observed.board.state() == RunState::Stopping;
    checks.push(check(
        "process",
        !stopping,
        if stopping { "stopping: finishing the messages in flight" } else { "running" },
    ));
    checks.push(match store_check(&observed).await {
        Ok(()) => check("store", true, format!("{} answers", observed.store.kind())),
        Err(why) => check("store", false, format!("{} unreachable: {why}", observed.store.kind())),
    });
    let connected = observed.transport.is_connected();
    checks.push(check("broker", connected, if connected { "connected" } else { "not connected; reconnecting" }));
    let stats = &observed.publisher;
    let publisher = if !observed.events_enabled {
        check("publisher", true, "change events are off")
    } else if !stats.leading.load(Ordering::Relaxed) {
        check("publisher", true, "another process publishes the change events, or none yet")
    } else {
        let lag = Duration::from_millis(stats.lag_millis.load(Ordering::Relaxed));
        let pending = stats.pending.load(Ordering::Relaxed);
        let ok = lag <= observed.lag_threshold;
        let detail = format!(
            "{pending} changes wait; the oldest for {:.1} s (threshold {} s, LagWarningSeconds)",
            lag.as_secs_f64(),
            observed.lag_threshold.as_secs()
        );
        check("publisher", ok, detail)
    };
    checks.push(publisher);
    let ready = checks.iter().all(|c| c["ok"] == Value::Bool(true));
    let failing: Vec<String> = checks
        .iter()
        .filter(|c| c["ok"] == Value::Bool(false))
        .map(|c| format!("{}: {}", c["name"].as_str().unwrap_or_default(), c["detail"].as_str().unwrap_or_default()))
        .collect();
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "reason": if ready { Value::Null } else { Value::String(failing.join("; ")) },
        "checks": checks,
    });
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, axum::Json(body)).into_response()
}

async fn metrics_text(State(observed): State<Arc<Observed>>) -> Response {
    let Some(handle) = &observed.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are not recorded by this process\n").into_response();
    };
    // Gauges that describe the present are set when asked.
    metrics::gauge!(m::BROKER_CONNECTED).set(if observed.transport.is_connected() { 1.0 } else { 0.0 });
    metrics::gauge!(m::START_TIME).set(observed.board.started_at().timestamp_millis() as f64 / 1000.0);
    handle.run_upkeep();
    let text = observed.scrubber.hide(&handle.render()).into_owned();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

#[derive(Debug, Deserialize)]
struct StatusQuery {
    #[serde(rename = "_format")]
    format: Option<String>,
}

async fn status(State(observed): State<Arc<Observed>>, Query(query): Query<StatusQuery>) -> Response {
    let report = status_report(&observed).await;
    let report = scrub_strings(report, &observed.scrubber);
    match query.format.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("json") | Some("application/json") => axum::Json(report).into_response(),
        Some("fhir" | "json+fhir" | "fhir+json" | "application/fhir+json" | "application/json+fhir") => {
            ([(header::CONTENT_TYPE, "application/fhir+json")], axum::Json(as_parameters(&report))).into_response()
        }
        Some(other) => (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": format!("_format `{other}` is not known; use json (the default) or fhir")})),
        )
            .into_response(),
    }
}

/// The `/status` document (JSON).
async fn status_report(observed: &Observed) -> Value {
    let state = observed.board.state();
    let connected = observed.transport.is_connected();
    let store = store_check(observed).await;
    let stats = &observed.publisher;
    let leading = stats.leading.load(Ordering::Relaxed);
    // Read the outbox now when the store answers: the publisher's own figures are only kept while
    // it leads, and only once a second.
    let outbox = match &store {
        Ok(()) => {
            tokio::time::timeout(STORE_CHECK_TIMEOUT, observed.store.outbox_state()).await.ok().and_then(Result::ok)
        }
        Err(_) => None,
    };
    let (queued, lag_seconds) = match outbox {
        Some(state) => {
            let age = state.oldest.map(|t| (chrono::Utc::now() - t).to_std().unwrap_or_default()).unwrap_or_default();
            (state.pending, age.as_secs_f64())
        }
        None => (stats.pending.load(Ordering::Relaxed), stats.lag_millis.load(Ordering::Relaxed) as f64 / 1000.0),
    };
    let running = |up: &str| match (state, connected) {
        (RunState::Stopping, _) => "stopping".to_owned(),
        (RunState::Running, false) => "disconnected".to_owned(),
        (RunState::Running, true) => up.to_owned(),
    };
    let inputs: Vec<Value> = observed
        .board
        .inputs()
        .into_iter()
        .map(|(address, stats)| {
            let mut entry = json!({"address": address, "status": running("active")});
            merge(&mut entry, serde_json::to_value(stats.snapshot()).unwrap_or_default());
            entry
        })
        .collect();
    let destinations: Vec<Value> = observed
        .board
        .destinations()
        .into_iter()
        .map(|(name, stats)| {
            let mut entry = json!({
                "name": name,
                "status": running(if leading { "active" } else { "standby" }),
                "messagesQueued": queued,
            });
            merge(&mut entry, serde_json::to_value(stats.snapshot()).unwrap_or_default());
            entry
        })
        .collect();
    json!({
        "status": match state { RunState::Running => "running", RunState::Stopping => "stopping" },
        "startTimestamp": observed.board.started_at(),
        "version": env!("CARGO_PKG_VERSION"),
        "store": {
            "kind": observed.store.kind(),
            "reachable": store.is_ok(),
            "error": store.err(),
        },
        "broker": {"connected": connected},
        "inputs": inputs,
        "destinations": destinations,
        "publisher": {
            "leading": leading,
            "cursor": stats.last_seq.load(Ordering::Relaxed),
            "lagChanges": queued,
            "lagSeconds": (lag_seconds * 1000.0).round() / 1000.0,
            "changesPublished": stats.changes_published.load(Ordering::Relaxed),
            "messagesPublished": stats.messages_published.load(Ordering::Relaxed),
            "failedAttempts": stats.failures.load(Ordering::Relaxed),
        },
    })
}

fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(into), Value::Object(from)) = (into, from) {
        into.extend(from);
    }
}

/// Every string of `value` with the secrets hidden.
fn scrub_strings(value: Value, scrubber: &Scrubber) -> Value {
    match value {
        Value::String(text) => Value::String(scrubber.hide(&text).into_owned()),
        Value::Array(items) => Value::Array(items.into_iter().map(|v| scrub_strings(v, scrubber)).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (k, scrub_strings(v, scrubber))).collect()),
        other => other,
    }
}

/// The `/status` document as a FHIR `Parameters` resource: each member a parameter, objects as
/// `part`, lists as repeated parameters (`inputs` → `input`, `destinations` → `destination`),
/// counts as `valueDecimal` (as Aidbox's `$status`), times as `valueDateTime`; nulls are left out.
fn as_parameters(report: &Value) -> Value {
    let parameter = match report {
        Value::Object(map) => parameters_of(map),
        _ => Vec::new(),
    };
    json!({"resourceType": "Parameters", "parameter": parameter})
}

fn parameters_of(map: &Map<String, Value>) -> Vec<Value> {
    let mut out = Vec::new();
    for (name, value) in map {
        match value {
            Value::Array(items) => {
                let single = match name.as_str() {
                    "inputs" => "input",
                    "destinations" => "destination",
                    other => other,
                };
                out.extend(items.iter().filter_map(|item| parameter(single, item)));
            }
            other => out.extend(parameter(name, other)),
        }
    }
    out
}

fn parameter(name: &str, value: &Value) -> Option<Value> {
    let typed = match value {
        Value::Null => return None,
        Value::Bool(b) => json!({"name": name, "valueBoolean": b}),
        Value::Number(n) => json!({"name": name, "valueDecimal": n}),
        Value::String(s) if name.eq_ignore_ascii_case("timestamp") || name.ends_with("Timestamp") => {
            json!({"name": name, "valueDateTime": s})
        }
        Value::String(s) => json!({"name": name, "valueString": s}),
        Value::Object(map) => json!({"name": name, "part": parameters_of(map)}),
        Value::Array(items) => {
            json!({"name": name, "part": items.iter().filter_map(|i| parameter(name, i)).collect::<Vec<_>>()})
        }
    };
    Some(typed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_becomes_parameters_with_repeated_inputs_and_typed_values() {
        let report = json!({
            "status": "running",
            "startTimestamp": "2024-05-01T10:00:00Z",
            "store": {"kind": "sqlite", "reachable": true, "error": null},
            "inputs": [{"address": "rabbitmq://h/Q", "messagesDelivered": 3,
                        "lastErrorDetail": [{"message": "boom", "timestamp": "2024-05-01T10:00:01Z"}]}],
        });
        let parameters = as_parameters(&report);
        assert_eq!(parameters["resourceType"], "Parameters");
        let list = parameters["parameter"].as_array().unwrap();
        assert_eq!(list[0], json!({"name": "status", "valueString": "running"}));
        assert_eq!(list[1], json!({"name": "startTimestamp", "valueDateTime": "2024-05-01T10:00:00Z"}));
        assert_eq!(
            list[2]["part"],
            json!([{"name": "kind", "valueString": "sqlite"}, {"name": "reachable", "valueBoolean": true}])
        );
        assert_eq!(list[3]["name"], "input");
        let input = list[3]["part"].as_array().unwrap();
        assert_eq!(input[1], json!({"name": "messagesDelivered", "valueDecimal": 3}));
        assert_eq!(
            input[2],
            json!({"name": "lastErrorDetail", "part": [{"name": "message", "valueString": "boom"},
                                                        {"name": "timestamp", "valueDateTime": "2024-05-01T10:00:01Z"}]})
        );
    }

    #[test]
    fn secrets_are_hidden_in_every_string() {
        let scrubber = Scrubber::new(["hunter22".to_owned()]);
        let report = json!({"store": {"error": "password hunter22 refused"}, "list": ["hunter22"], "n": 1});
        assert_eq!(
            scrub_strings(report, &scrubber),
            json!({"store": {"error": "password *** refused"}, "list": ["***"], "n": 1})
        );
    }
}
