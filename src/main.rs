//! The `fhir-pubsub` command: runs the bridge, checks a configuration, and acts as a client.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use fhir_pubsub::bridge::{Bridge, BridgeOptions};
use fhir_pubsub::client::{self, Exit, ListenOptions, RetrieveOptions, StoreOptions};
use fhir_pubsub::config::{BrokerType, Settings, redact_url};
use fhir_pubsub::contracts::Operation;
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
    /// Stores resources through the bridge (or any Firely-compatible server) with one
    /// ExecuteStorePlanCommand, and prints the response. Exit status: 0 every instruction
    /// succeeded, 1 the server reported a failure, 2 usage or input error, 3 timeout or broker error.
    Store {
        /// JSON files holding a FHIR resource, an array of resources or a Bundle, or NDJSON files
        /// (one resource per line); `-` reads standard input.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<String>,
        /// What each instruction does.
        #[arg(long, value_enum, default_value_t = StoreOperation::Upsert)]
        operation: StoreOperation,
        /// Send without waiting for a response; prints the command's messageId.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        request: RequestArgs,
    },
    /// Retrieves resources by reference and prints them as a JSON array. Exit status 1 when a
    /// reference was not found.
    Retrieve {
        /// `Type/id` (the current version) or `Type/id/_history/vid`.
        #[arg(required = true, value_name = "REF")]
        references: Vec<String>,
        /// One resource per line instead of a JSON array.
        #[arg(long)]
        ndjson: bool,
        #[command(flatten)]
        request: RequestArgs,
    },
    /// Prints change events as they arrive, the `message` of each as one JSON line.
    Listen {
        /// Light events (references and change types only) instead of full ones.
        #[arg(long)]
        light: bool,
        /// Exit after this many events.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// Settings file (.json or .toml), as for `run`; FHIRPUBSUB_* variables apply too.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// Settings shared by the client's request commands.
#[derive(clap::Args)]
struct RequestArgs {
    /// Settings file (.json or .toml), as for `run`; FHIRPUBSUB_* variables apply too.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// How long to wait for the response (e.g. 30s, 500ms, 2m).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = fhir_pubsub::client::parse_duration)]
    timeout: std::time::Duration,
    /// The `fhir-release` header of the request.
    #[arg(long, value_name = "RELEASE", default_value = fhir_pubsub::client::DEFAULT_FHIR_RELEASE)]
    fhir_release: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum StoreOperation {
    Create,
    Update,
    Upsert,
    Delete,
}

impl From<StoreOperation> for Operation {
    fn from(operation: StoreOperation) -> Self {
        match operation {
            StoreOperation::Create => Operation::Create,
            StoreOperation::Update => Operation::Update,
            StoreOperation::Upsert => Operation::Upsert,
            StoreOperation::Delete => Operation::Delete,
        }
    }
}

/// Runs a client command; its errors become one sentence on stderr and the exit status.
async fn client_command(command: Command) -> Exit {
    let (mut out, mut diag) = (std::io::stdout(), std::io::stderr());
    let result = async {
        match command {
            Command::Store { files, operation, no_wait, request } => {
                let settings = client::load_settings(request.config.as_deref())?;
                let options = StoreOptions {
                    files,
                    operation: operation.into(),
                    wait: !no_wait,
                    fhir_release: request.fhir_release,
                    timeout: request.timeout,
                };
                client::store(&settings, &options, &mut out, &mut diag).await
            }
            Command::Retrieve { references, ndjson, request } => {
                let settings = client::load_settings(request.config.as_deref())?;
                let options = RetrieveOptions {
                    references,
                    ndjson,
                    fhir_release: request.fhir_release,
                    timeout: request.timeout,
                };
                client::retrieve(&settings, &options, &mut out, &mut diag).await
            }
            Command::Listen { light, count, config } => {
                let settings = client::load_settings(config.as_deref())?;
                client::listen(&settings, ListenOptions { light, count }, &mut out, &mut diag).await
            }
            Command::Run { .. } | Command::CheckConfig { .. } => Ok(Exit::Usage),
        }
    }
    .await;
    result.unwrap_or_else(|e| {
        eprintln!("fhir-pubsub: {e}");
        e.exit
    })
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_level.into());
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
        #[cfg(feature = "kafka")]
        BrokerType::Kafka => {
            let events = &settings.pub_sub.resource_change_notifications;
            let options = fhir_pubsub::transport::kafka::KafkaOptions::from_settings(
                &settings.pub_sub.message_broker,
                events.send_full_events,
                events.send_light_events,
            );
            let transport =
                fhir_pubsub::transport::kafka::KafkaTransport::connect(options).await.context("connecting to Kafka")?;
            Ok(Arc::new(transport))
        }
        other => {
            anyhow::bail!(
                "PubSub.MessageBroker.BrokerType {other:?} is not supported by this build yet; use RabbitMq or Kafka"
            )
        }
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
        _ = fhir_pubsub::shutdown::signal() => {
            tracing::info!("shutting down: finishing the commands in flight (a second signal exits at once)");
            let _ = stop.send(true);
            tokio::spawn(async {
                fhir_pubsub::shutdown::signal().await;
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
    let is_client = matches!(cli.command, Command::Store { .. } | Command::Retrieve { .. } | Command::Listen { .. });
    // The client's stderr is for its own sentences: only warnings are logged there, and none of
    // lapin's, whose failures the client reports itself.
    init_logging(cli.log_format, if is_client { "warn,lapin=off" } else { "info" });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fhir-pubsub: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if is_client {
        return ExitCode::from(runtime.block_on(client_command(cli.command)).code());
    }
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => run(config).await.map(|()| true),
            Command::CheckConfig { config } => check_config(config).await,
            Command::Store { .. } | Command::Retrieve { .. } | Command::Listen { .. } => Ok(false),
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
