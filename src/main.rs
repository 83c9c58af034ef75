//! The `fhir-pubsub` command: runs the bridge, checks a configuration, and acts as a client.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use fhir_pubsub::bridge::{Bridge, BridgeOptions};
use fhir_pubsub::config::{BrokerType, Settings, redact_url};
use fhir_pubsub::plan::PlanLimits;
use fhir_pubsub::publisher::{PausePoint, Publisher};
use fhir_pubsub::transport::Transport;
use fhir_pubsub::transport::rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use tokio::sync::watch;

/// How long a stopping bridge goes on publishing the changes left in the outbox.
const PUBLISH_ON_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(15);

#[derive(Parser)]
#[command(
    name = "fhir-pubsub",
    version,
    about = "A Firely-PubSub-compatible bridge between a message broker and a FHIR store"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the bridge: consumes commands, applies them to the store, replies and publishes change events.
    Run {
        /// Settings file (.json or .toml). Without it: defaults and FHIRPUBSUB_* environment variables.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validates the settings, prints the effective ones (secrets hidden) and tries each connection.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(config: Option<&PathBuf>) -> anyhow::Result<Settings> {
    let settings = Settings::load(config.map(PathBuf::as_path), std::env::vars())?;
    for (key, why) in settings.accepted_but_unused() {
        tracing::warn!(key, reason = why, "setting accepted but not used");
    }
    Ok(settings)
}

async fn connect_transport(settings: &Settings) -> anyhow::Result<Arc<dyn Transport>> {
    match settings.pub_sub.message_broker.broker_type {
        BrokerType::RabbitMq => {
            let options = RabbitMqOptions::from_settings(&settings.pub_sub.message_broker);
            let transport = RabbitMqTransport::connect(options).await.context("connecting to RabbitMQ")?;
            Ok(Arc::new(transport))
        }
        other => {
            anyhow::bail!("PubSub.MessageBroker.BrokerType {other:?} is not supported by this build yet; use RabbitMq")
        }
    }
}

/// Resolves when SIGTERM or SIGINT arrives; a second signal exits at once.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let term = async move {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

async fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = load(config.as_ref())?;
    let store = fhir_pubsub::store::open(&settings.store.url)
        .await
        .with_context(|| format!("opening the store {}", redact_url(&settings.store.url)))?;
    tracing::info!(store = %redact_url(&settings.store.url), kind = store.kind(), "store ready");
    let transport = connect_transport(&settings).await?;
    let options = BridgeOptions {
        concurrency: settings.pub_sub.message_broker.concurrency_number as usize,
        max_message_bytes: settings.limits.max_message_bytes,
        plan_limits: PlanLimits { max_instructions: settings.limits.max_instructions_per_plan },
    };
    let publisher = Arc::new(
        Publisher::new(store.clone(), transport.clone(), settings.pub_sub.resource_change_notifications.clone())
            .with_fault_pause(PausePoint::from_env()),
    );
    let (stop_publisher, publisher_stopped) = watch::channel(false);
    let publishing = tokio::spawn(publisher.clone().run(publisher_stopped));
    let bridge = Arc::new(Bridge::new(store.clone(), transport.clone(), options).with_changes_waker(publisher.waker()));
    let (stop, stopped) = watch::channel(false);
    let mut running = tokio::spawn(bridge.run(stopped));
    tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("shutting down: finishing the commands in flight (a second signal exits at once)");
            let _ = stop.send(true);
            tokio::spawn(async {
                shutdown_signal().await;
                std::process::exit(130);
            });
            running.await.context("the bridge task failed")??;
        }
        result = &mut running => result.context("the bridge task failed")??,
    }
    // The bridge is done: publish what its last commits (and anyone else's) left in the outbox.
    let _ = stop_publisher.send(true);
    if tokio::time::timeout(PUBLISH_ON_SHUTDOWN, publishing).await.is_err() {
        tracing::warn!("stopped before every change was published; the rest goes out after the next start");
    }
    transport.close().await;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn check_config(config: Option<PathBuf>) -> anyhow::Result<bool> {
    let settings = load(config.as_ref())?;
    println!("{}", serde_json::to_string_pretty(&settings.redacted())?);
    let mut ok = true;
    match fhir_pubsub::store::open(&settings.store.url).await {
        Ok(store) => {
            println!("store {}: ok ({})", redact_url(&settings.store.url), store.kind());
            store.close().await;
        }
        Err(e) => {
            ok = false;
            println!("store {}: FAILED: {e}", redact_url(&settings.store.url));
        }
    }
    match connect_transport(&settings).await {
        Ok(t) => {
            println!("broker {}: ok", t.input_address());
            t.close().await;
        }
        Err(e) => {
            ok = false;
            println!("broker: FAILED: {e:#}");
        }
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fhir-pubsub: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => run(config).await.map(|()| true),
            Command::CheckConfig { config } => check_config(config).await,
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fhir-pubsub: {e:#}");
            ExitCode::FAILURE
        }
    }
}
