//! The container packaging, checked without Docker (none runs here): the bridge's settings in
//! `compose/docker-compose.yml` load and validate as the bridge would load them, its stop grace
//! period covers the shutdown timeouts, the Dockerfile builds in one stage and runs as a non-root
//! user from what the build context holds, and the Service Bus emulator declares Firely's entities.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fhir_pubsub::config::{Settings, StoreKind};

fn file(name: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (path, text)
}

/// `${NAME:-default}` → `default` (what compose substitutes when NAME is not set).
fn with_defaults(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed ${…}") + start;
        let inner = &rest[start + 2..end];
        out.push_str(inner.split_once(":-").map(|(_, default)| default).unwrap_or(""));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out.trim_matches('"').to_owned()
}

/// The lines of one service's block in the compose file (indented under `  name:`).
fn service<'a>(compose: &'a str, name: &str) -> Vec<&'a str> {
    let header = format!("  {name}:");
    let mut lines = compose.lines().skip_while(|l| *l != header).skip(1);
    let mut block = Vec::new();
    for line in lines.by_ref() {
        if !line.is_empty() && !line.starts_with("   ") && !line.trim_start().starts_with('#') {
            break;
        }
        block.push(line);
    }
    assert!(!block.is_empty(), "no service {name}");
    block
}

#[test]
fn the_compose_bridge_settings_are_valid_and_its_grace_period_covers_the_shutdown() {
    let (_, compose) = file("compose/docker-compose.yml");
    let bridge = service(&compose, "bridge");
    let env: HashMap<String, String> = bridge
        .iter()
        .filter_map(|l| l.trim().split_once(": "))
        .filter(|(k, _)| k.starts_with("FHIRPUBSUB_") || *k == "RUST_LOG")
        .map(|(k, v)| (k.to_owned(), with_defaults(v)))
        .collect();
    assert!(env.len() >= 8, "{env:?}");
    assert_eq!(env["FHIRPUBSUB_LOG_FORMAT"], "json");
    let settings = Settings::load(None, env.clone()).expect("the bridge's settings in compose are valid");
    let broker = &settings.pub_sub.message_broker;
    assert_eq!((broker.host.as_str(), broker.username.as_str()), ("rabbitmq", "fhir-pubsub"));
    assert_eq!(settings.store.kind(), Ok(StoreKind::Postgres));
    assert!(settings.store.url.contains("@postgres:5432/fhir"));
    assert_eq!(settings.http.listen.to_string(), "0.0.0.0:8080");
    let events = &settings.pub_sub.resource_change_notifications;
    assert!(events.send_full_events && events.send_light_events);

    // The same passwords on both ends: what RabbitMQ and PostgreSQL are given is what the bridge uses.
    let rabbitmq: Vec<&str> = service(&compose, "rabbitmq");
    let rabbit_password = rabbitmq.iter().find_map(|l| l.trim().strip_prefix("RABBITMQ_DEFAULT_PASS: ")).unwrap();
    assert_eq!(with_defaults(rabbit_password), broker.password);
    let postgres = service(&compose, "postgres");
    let pg_password = postgres.iter().find_map(|l| l.trim().strip_prefix("POSTGRES_PASSWORD: ")).unwrap();
    assert!(settings.store.url.contains(&format!(":{}@", with_defaults(pg_password))));

    let grace = bridge.iter().find_map(|l| l.trim().strip_prefix("stop_grace_period: ")).expect("stop_grace_period");
    let grace: u64 = grace.trim_end_matches('s').parse().expect("seconds");
    let shutdown = &settings.shutdown;
    assert!(grace > shutdown.timeout_seconds + shutdown.publish_timeout_seconds, "{grace}s cuts the shutdown short");

    // Every port on loopback only: a mapping is `"[IP:]HOST:CONTAINER"`, digits, dots and colons.
    let mappings: Vec<&str> = compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- \"")?.split('"').next())
        .filter(|m| m.contains(':') && m.chars().all(|c| c.is_ascii_digit() || c == '.' || c == ':'))
        .collect();
    assert!(mappings.len() >= 5, "{mappings:?}");
    for mapping in mappings {
        assert!(mapping.starts_with("127.0.0.1:"), "a port published beyond loopback: {mapping}");
    }
    // Files mounted from next to the compose file exist.
    for line in compose.lines().map(str::trim).filter(|l| l.starts_with("- ./")) {
        let source = line[2..].split(':').next().unwrap();
        assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join("compose").join(source).exists(), "{line}");
    }
}

#[test]
fn the_dockerfile_builds_from_the_context_and_runs_as_non_root() {
    let (_, dockerfile) = file("Dockerfile");
    let (_, ignore) = file(".dockerignore");
    let froms: Vec<&str> = dockerfile.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage: {froms:?}");
    assert!(froms[0].ends_with(" AS build"), "{froms:?}");
    let runtime = dockerfile.split(froms[1]).nth(1).unwrap();
    let user = runtime.lines().find_map(|l| l.strip_prefix("USER ")).expect("USER in the runtime stage");
    assert!(!["root", "0", "0:0"].contains(&user.trim()), "runs as {user}");
    // What the build stage copies exists and is not excluded from the build context.
    let ignored: Vec<&str> = ignore.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    let build = dockerfile.split(froms[1]).next().unwrap();
    for line in build.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join(source).exists(), "{line}: {source} missing");
            assert!(!ignored.contains(source), "{source} is copied but excluded by .dockerignore");
        }
    }
    assert!(dockerfile.contains("cargo build --release --locked"), "the image builds from Cargo.lock");
}

#[test]
fn the_service_bus_emulator_declares_firelys_entities() {
    let (_, text) = file("compose/servicebus-config.json");
    let config: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let namespace = &config["UserConfig"]["Namespaces"][0];
    let queues: Vec<&str> =
        namespace["Queues"].as_array().unwrap().iter().map(|q| q["Name"].as_str().unwrap()).collect();
    assert_eq!(queues, ["firelyserver", "firelyserver_error", "firelyserver_skipped"]);
    let topics = namespace["Topics"].as_array().unwrap();
    for kind in
        ["ExecuteStorePlanCommand", "RetrievePlanCommand", "ResourcesChangedEvent", "ResourcesChangedLightEvent"]
    {
        let name = format!("Firely.Server.Contracts.Messages.V1~{kind}");
        let topic = topics.iter().find(|t| t["Name"] == name.as_str()).unwrap_or_else(|| panic!("no topic {name}"));
        let subscriptions = topic["Subscriptions"].as_array().unwrap();
        assert!(!subscriptions.is_empty(), "{name} keeps nothing without a subscription");
        if kind.ends_with("Command") {
            assert_eq!(subscriptions[0]["Properties"]["ForwardTo"], "firelyserver", "{name}");
        }
    }
}
