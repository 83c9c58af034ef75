//! The `fhir-pubsub` command: runs the bridge, checks a configuration, and acts as a client.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use fhir_pubsub::bridge::{Bridge, BridgeOptions};
use fhir_pubsub::claimcheck::ClaimChecks;
use fhir_pubsub::client::{self, Exit, ListenOptions, RetrieveOptions, StoreOptions};
use fhir_pubsub::config::{BrokerType, Scrubber, Settings, redact_url};
use fhir_pubsub::contracts::Operation;
use fhir_pubsub::http::{self, Observed};
use fhir_pubsub::observe::logs;
use fhir_pubsub::observe::{RunState, StatusBoard};
use fhir_pubsub::plan::PlanLimits;
use fhir_pubsub::publisher::{PausePoint, Publisher};
use fhir_pubsub::transport::Transport;
use fhir_pubsub::transport::rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use tokio::sync::watch;

/// See Cargo.toml: glibc's malloc cost the bridge about a fifth of its CPU under load.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How long `check-config` waits for one connection before calling it failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "fhir-pubsub",
    version,
    about = "A Firely-PubSub-compatible bridge between a message broker and a FHIR store"
)]
struct Cli {
    /// Log format: `text` (key=value lines) or `json` (one object per line).
    #[arg(long, global = true, value_enum, env = "FHIRPUBSUB_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

impl From<LogFormat> for logs::LogFormat {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Text => logs::LogFormat::Text,
            LogFormat::Json => logs::LogFormat::Json,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Runs the bridge: consumes commands, applies them to the store, replies and publishes change events.
    Run {
        /// Settings file (.json or .toml). Without it: defaults and FHIRPUBSUB_* environment variables.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validates the settings, prints the effective ones (secrets hidden) and tries each connection
    /// (the HTTP address, the store, the broker), saying which one fails and why. Exit status 0
    /// when all succeed.
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

/// Loads and validates the settings; from here on their secrets are hidden in every log line.
fn load(config: Option<&PathBuf>) -> anyhow::Result<Settings> {
    let settings = Settings::load(config.map(PathBuf::as_path), std::env::vars())?;
    logs::hide_secrets(Scrubber::new(settings.secrets()));
    for (key, why) in settings.accepted_but_unused() {
        tracing::warn!(key, reason = why, "setting accepted but not used");
    }
    Ok(settings)
}

/// Connects to the configured broker. Each broker type is one branch here; `check-config` tries the
/// broker through this function, so a new transport is checked as soon as it can connect.
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
        #[cfg(feature = "servicebus")]
        BrokerType::AzureServiceBus => {
            use fhir_pubsub::transport::servicebus::{ServiceBusOptions, ServiceBusTransport};
            let events = &settings.pub_sub.resource_change_notifications;
            let options = ServiceBusOptions::from_settings(
                &settings.pub_sub.message_broker,
                events.send_full_events,
                events.send_light_events,
            )
            .map_err(anyhow::Error::msg)?;
            let transport = ServiceBusTransport::connect(options).await.context("connecting to Azure Service Bus")?;
            Ok(Arc::new(transport))
        }
        #[allow(unreachable_patterns)]
        other => {
            anyhow::bail!(
                "PubSub.MessageBroker.BrokerType {other:?} is not supported by this build (a cargo feature is off)"
            )
        }
    }
}

async fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = load(config.as_ref())?;
    let board = StatusBoard::new();
    let metrics = match fhir_pubsub::observe::metrics::install() {
        Ok(handle) => {
            fhir_pubsub::observe::metrics::spawn_upkeep(handle.clone());
            Some(handle)
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics are off: the Prometheus recorder cannot be installed");
            None
        }
    };
    // Bind first: a port in use stops the start before anything connects.
    let (listener, http_address) = http::bind(settings.http.listen)
        .await
        .with_context(|| format!("cannot listen on Http.Listen {}", settings.http.listen))?;
    let store = fhir_pubsub::store::open(&settings.store.url)
        .await
        .with_context(|| format!("opening the store {}", redact_url(&settings.store.url)))?;
    tracing::info!(store = %redact_url(&settings.store.url), kind = store.kind(), "store ready");
    let claim_checks = ClaimChecks::from_settings(&settings.pub_sub.claim_check, settings.limits.max_claim_check_bytes)
        .map_err(anyhow::Error::msg)?
        .map(Arc::new);
    match &claim_checks {
        Some(c) => tracing::info!(storage = c.description(), "claim checks are fetched"),
        None => tracing::info!("claim checks are disabled (PubSub.ClaimCheck.StorageType)"),
    }
    let transport = connect_transport(&settings).await?;
    let options = BridgeOptions {
        concurrency: settings.pub_sub.message_broker.concurrency_number as usize,
        max_message_bytes: settings.limits.max_message_bytes,
        max_json_depth: settings.limits.max_json_depth,
        plan_limits: PlanLimits { max_instructions: settings.limits.max_instructions_per_plan },
    };
    let events = settings.pub_sub.resource_change_notifications.clone();
    let publisher = Arc::new(
        Publisher::new(store.clone(), transport.clone(), events.clone())
            .with_status_board(&board)
            .with_fault_pause(PausePoint::from_env()),
    );
    let observed = Arc::new(Observed {
        board: board.clone(),
        store: store.clone(),
        transport: transport.clone(),
        publisher: publisher.stats(),
        metrics,
        lag_threshold: Duration::from_secs(events.lag_warning_seconds),
        events_enabled: events.send_full_events || events.send_light_events,
        scrubber: Scrubber::new(settings.secrets()),
    });
    let (stop_http, mut http_stopped) = watch::channel(false);
    let serving = tokio::spawn(http::serve(listener, observed, async move {
        let _ = http_stopped.wait_for(|stop| *stop).await;
    }));
    tracing::info!(address = %http_address, "HTTP endpoints listening: /healthz /readyz /metrics /status");

    let (stop_publisher, publisher_stopped) = watch::channel(false);
    let publishing = tokio::spawn(publisher.clone().run(publisher_stopped));
    let mut bridge = Bridge::new(store.clone(), transport.clone(), options)
        .with_changes_waker(publisher.waker())
        .with_status_board(&board);
    if let Some(claim_checks) = claim_checks {
        bridge = bridge.with_claim_checks(claim_checks);
    }
    let bridge = Arc::new(bridge);
    let (stop, stopped) = watch::channel(false);
    let mut running = tokio::spawn(bridge.run(stopped));
    let finish_timeout = Duration::from_secs(settings.shutdown.timeout_seconds);
    tokio::select! {
        _ = fhir_pubsub::shutdown::signal() => {
            tracing::info!(
                timeout_seconds = finish_timeout.as_secs(),
                "shutting down: no new commands, finishing those in flight (a second signal exits at once)"
            );
            board.set_state(RunState::Stopping);
            let _ = stop.send(true);
            tokio::spawn(async {
                fhir_pubsub::shutdown::signal().await;
                eprintln!("fhir-pubsub: second signal: exiting at once");
                std::process::exit(130);
            });
            match tokio::time::timeout(finish_timeout, &mut running).await {
                Ok(result) => result.context("the bridge task failed")??,
                Err(_) => {
                    let in_process: u64 = board.inputs().iter().map(|(_, s)| s.snapshot().messages_in_process).sum();
                    tracing::warn!(
                        in_process,
                        timeout_seconds = finish_timeout.as_secs(),
                        "commands still in flight after Shutdown.TimeoutSeconds: they are not acknowledged, the broker delivers them again"
                    );
                    running.abort();
                }
            }
        }
        result = &mut running => result.context("the bridge task failed")??,
    }
    // The bridge is done: publish what its last commits (and anyone else's) left in the outbox.
    let _ = stop_publisher.send(true);
    let publish_timeout = Duration::from_secs(settings.shutdown.publish_timeout_seconds);
    if tokio::time::timeout(publish_timeout, publishing).await.is_err() {
        tracing::warn!(
            timeout_seconds = publish_timeout.as_secs(),
            "stopped before every change was published (Shutdown.PublishTimeoutSeconds); the rest goes out after the next start"
        );
    }
    transport.close().await;
    store.close().await;
    let _ = stop_http.send(true);
    let _ = serving.await;
    tracing::info!("stopped");
    Ok(())
}

/// One line of `check-config`'s report: what was tried and how it went.
fn report_check(what: &str, outcome: Result<String, String>) -> bool {
    match outcome {
        Ok(detail) => {
            println!("{}: ok{}", logs::scrub(what), logs::scrub(&detail));
            true
        }
        Err(why) => {
            println!("{}: FAILED: {}", logs::scrub(what), logs::scrub(&why));
            false
        }
    }
}

async fn bounded<T>(future: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(CHECK_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())))
}

async fn check_config(config: Option<PathBuf>) -> anyhow::Result<bool> {
    let settings = load(config.as_ref())?;
    println!("{}", logs::scrub(&serde_json::to_string_pretty(&settings.redacted())?));
    let mut ok = true;

    // The HTTP address: bound and released at once.
    let listen = settings.http.listen;
    let http = match http::bind(listen).await {
        Ok(_) => Ok(String::new()),
        Err(e) => Err(format!("cannot listen there: {e}")),
    };
    ok &= report_check(&format!("http {listen}"), http);

    let store_url = redact_url(&settings.store.url);
    let store = bounded(async {
        let store = fhir_pubsub::store::open(&settings.store.url).await.map_err(|e| e.to_string())?;
        let kind = store.kind();
        store.close().await;
        Ok(format!(" ({kind}, schema up to date)"))
    })
    .await;
    ok &= report_check(&format!("store {store_url}"), store);

    let broker = bounded(async {
        let transport = connect_transport(&settings).await.map_err(|e| format!("{e:#}"))?;
        let address = transport.input_address();
        transport.close().await;
        Ok(address)
    })
    .await;
    ok &= match broker {
        Ok(address) => report_check(&format!("broker {address}"), Ok(String::new())),
        Err(why) => report_check("broker", Err(why)),
    };

    match ClaimChecks::from_settings(&settings.pub_sub.claim_check, settings.limits.max_claim_check_bytes) {
        Ok(Some(claim_checks)) => {
            let what = format!("claim check {}", claim_checks.description());
            ok &= report_check(&what, bounded(async { claim_checks.probe().await }).await);
        }
        Ok(None) => {}
        Err(why) => ok &= report_check("claim check", Err(why)),
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_client = matches!(cli.command, Command::Store { .. } | Command::Retrieve { .. } | Command::Listen { .. });
    // The client's stderr is for its own sentences: only warnings are logged there, and none of
    // lapin's, whose failures the client reports itself.
    logs::init(cli.log_format.into(), if is_client { "warn,lapin=off" } else { "info" });
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
            eprintln!("fhir-pubsub: {}", logs::scrub(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
