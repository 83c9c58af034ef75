//! The benchmark behind `scripts/bench`: throughput, latency, memory and start time of the bridge
//! through the real broker, each figure next to a limit of the same machine measured in the same
//! run (the broker's echo ceiling, PostgreSQL's own single-row transaction rate), because the
//! machine is shared and noisy: the ratios are the comparable figures, the absolute numbers the context.
//!
//! It runs the bridge as child processes (`fhir-pubsub run`, on a fresh PostgreSQL database and on
//! a fresh SQLite file), drives them with its own load generator ([`rpc`]), and writes
//! `report.md`, `report.json` and `report.png` into the output directory.
//!
//! A benchmark target rather than a `fhir-pubsub bench` subcommand: the load generator, the echo
//! responder and the chart stay out of the binary users run, and are built only when measured.
//!
//! Usage: `cargo bench --bench loadgen -- --bridge PATH [--quick] [--out DIR] [--only PARTS]
//! [--in-flight N,…]` (`scripts/bench` does this). `cargo test --all-targets` starts this binary
//! without `--bench`; it then does nothing.

mod baseline;
mod events;
mod process;
mod report;
mod rpc;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fhir_pubsub::contracts::MessageType;
use serde::Serialize;
use sqlx::Connection as _;
use uuid::Uuid;

use process::{Bridge, BridgeSpec};
use rpc::{Load, LoadResult};

const POSTGRES_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable";
/// Every PostgreSQL connection of the run (bridges and baseline) is loopback TCP without TLS, as a
/// bridge next to its database would be configured: TLS on loopback protects nothing and costs CPU
/// on both ends of every round trip.
pub const POSTGRES_SSLMODE: &str = "disable";
/// Requests in flight, swept for the small commands.
const IN_FLIGHT: [usize; 4] = [1, 8, 64, 256];
/// Resources per large plan.
const PLAN_SIZE: usize = 1000;
/// The bridge's defaults (`PrefetchCount`, `ConcurrencyNumber`), which the echo responder copies.
const PREFETCH: u16 = 256;
const CONCURRENCY: usize = 256;
const READY_LIMIT: Duration = Duration::from_secs(30);

/// How long and how much: `--quick` for development (under two minutes), the full run for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub mode: &'static str,
    pub warmup_s: f64,
    pub measure_s: f64,
    pub large_plans: u64,
    pub event_rate: u64,
    pub event_seconds: u64,
    /// Requests in flight, swept for the small commands.
    pub in_flight: Vec<usize>,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                mode: "quick",
                warmup_s: 1.0,
                measure_s: 3.0,
                large_plans: 20,
                event_rate: 1000,
                event_seconds: 3,
                in_flight: IN_FLIGHT.to_vec(),
            }
        } else {
            Plan {
                mode: "full",
                warmup_s: 2.0,
                measure_s: 10.0,
                large_plans: 100,
                event_rate: 1000,
                event_seconds: 10,
                in_flight: IN_FLIGHT.to_vec(),
            }
        }
    }

    fn load(&self, in_flight: usize) -> Load {
        Load {
            in_flight,
            warmup: Duration::from_secs_f64(self.warmup_s),
            measure: Duration::from_secs_f64(self.measure_s),
            max_requests: None,
        }
    }
}

/// The figures of one store's bridge.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreRun {
    pub store: &'static str,
    /// Start to `/readyz` 200 on an empty database (migrations run).
    pub first_start_ms: f64,
    /// Start to ready on a store already migrated and holding a backlog of changes (PostgreSQL).
    pub restart_ms: Option<f64>,
    /// Resident memory one second after ready, before any load.
    pub idle_rss_mib: f64,
    /// Peak resident memory after the small-command sweep.
    pub peak_rss_small_mib: f64,
    /// Peak resident memory after the large plans.
    pub peak_rss_large_mib: f64,
    pub small_commands: Vec<LoadResult>,
    pub large_plans: Vec<LargePlans>,
    pub drains: Vec<events::DrainResult>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LargePlans {
    pub plans: u64,
    pub resources: u64,
    pub in_flight: usize,
    pub seconds: f64,
    pub resources_per_second: f64,
    pub plans_with_errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub plan: Plan,
    pub machine: report::Machine,
    pub broker_ceiling: Vec<LoadResult>,
    pub postgres_baseline: baseline::BaselineResult,
    pub postgres: StoreRun,
    pub sqlite: StoreRun,
    pub event_latency: events::LatencyResult,
}

/// A FHIR Patient of about 1 KB with `id`, version 1.
pub fn patient(id: &str) -> String {
    let mut text = serde_json::json!({
        "resourceType": "Patient", "id": id,
        "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"},
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.2.4.6.3", "value": "999911120"}],
        "name": [{"use": "official", "family": "Benchmark", "given": ["Patient", "Load"]}],
        "telecom": [{"system": "phone", "value": "+31 20 555 0100", "use": "home"}],
        "gender": "female", "birthDate": "1970-01-01",
        "address": [{"line": ["Keizersgracht 1"], "city": "Amsterdam", "postalCode": "1015 CJ", "country": "NL"}],
        "text": {"status": "generated", "div": ""}
    })
    .to_string();
    // Pad the narrative so that the resource is 1,024 bytes with a short id.
    let pad = 1024usize.saturating_sub(text.len() + 40 - id.len().min(40));
    let div = format!("<div xmlns=\\\"http://www.w3.org/1999/xhtml\\\">{}</div>", "x".repeat(pad));
    text = text.replace(r#""div":"""#, &format!(r#""div":"{div}""#));
    text
}

/// A MassTransit request envelope carrying an ExecuteStorePlanCommand of `instructions` (JSON).
fn store_command(id: Uuid, queue: &str, response_address: &str, instructions: &str) -> Vec<u8> {
    let sent = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    format!(
        concat!(
            r#"{{"messageId":"{id}","requestId":"{id}","conversationId":"{id}","sourceAddress":"{ra}","#,
            r#""destinationAddress":"rabbitmq://127.0.0.1/{q}","responseAddress":"{ra}","#,
            r#""messageType":["urn:message:Firely.Server.Contracts.Messages.V1:ExecuteStorePlanCommand"],"#,
            r#""message":{{"instructions":{ins}}},"sentTime":"{sent}","headers":{{}},"#,
            r#""host":{{"machineName":"bench","processName":"loadgen","processId":1,"assembly":"loadgen","#,
            r#""assemblyVersion":"0.1.0","frameworkVersion":"rust","massTransitVersion":"8.0.0","#,
            r#""operatingSystemVersion":"linux"}}}}"#
        ),
        id = id,
        ra = response_address,
        q = queue,
        ins = instructions,
        sent = sent
    )
    .into_bytes()
}

fn upsert(item: usize, resource: &str) -> String {
    format!(
        r#"{{"itemId":"{item}","operation":"upsert","resource":{}}}"#,
        serde_json::to_string(resource).unwrap_or_default()
    )
}

/// Body maker for one-upsert commands on fresh Patients `TAG-n`.
fn small_commands(queue: &str, tag: &str) -> Arc<rpc::BodyFn> {
    let (queue, tag) = (queue.to_owned(), tag.to_owned());
    Arc::new(move |n, id, response_address| {
        let instructions = format!("[{}]", upsert(1, &patient(&format!("{tag}-{n}"))));
        store_command(id, &queue, response_address, &instructions)
    })
}

/// Body maker for plans of PLAN_SIZE upserts on fresh Patients `TAG-plan-i`.
fn large_plans(queue: &str, tag: &str) -> Arc<rpc::BodyFn> {
    let (queue, tag) = (queue.to_owned(), tag.to_owned());
    Arc::new(move |n, id, response_address| {
        let items: Vec<String> = (0..PLAN_SIZE).map(|i| upsert(i, &patient(&format!("{tag}-{n}-{i}")))).collect();
        store_command(id, &queue, response_address, &format!("[{}]", items.join(",")))
    })
}

/// The small-command sweep against the responder `responder` (the bridge or the echo), whose CPU
/// time per request is measured too.
async fn sweep(queue: &str, tag: &str, plan: &Plan, responder: u32) -> anyhow::Result<Vec<LoadResult>> {
    let mut results = Vec::new();
    for &in_flight in &plan.in_flight {
        let cpu_before = process::cpu_seconds(responder);
        let mut result =
            rpc::drive(queue, small_commands(queue, &format!("{tag}n{in_flight}")), plan.load(in_flight)).await?;
        let cpu = process::cpu_seconds(responder) - cpu_before;
        result.responder_cpu_ms_per_request = cpu * 1000.0 / result.replies.max(1) as f64;
        eprintln!(
            "  {in_flight:>3} in flight: {:>7.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  cpu {:.3} ms/request{}",
            result.per_second,
            result.p50_ms,
            result.p99_ms,
            result.responder_cpu_ms_per_request,
            if result.lost + result.replies_with_errors > 0 {
                format!("  ({} lost, {} with errors)", result.lost, result.replies_with_errors)
            } else {
                String::new()
            }
        );
        results.push(result);
    }
    Ok(results)
}

async fn run_large_plans(queue: &str, tag: &str, plans: u64) -> anyhow::Result<LargePlans> {
    let in_flight = 2;
    let load =
        Load { in_flight, warmup: Duration::ZERO, measure: Duration::from_secs(3600), max_requests: Some(plans) };
    let result = rpc::drive(queue, large_plans(queue, tag), load).await?;
    let resources = result.completed * PLAN_SIZE as u64;
    let large = LargePlans {
        plans: result.completed,
        resources,
        in_flight,
        seconds: result.seconds,
        resources_per_second: resources as f64 / result.seconds.max(1e-9),
        plans_with_errors: result.replies_with_errors + result.lost,
    };
    eprintln!(
        "  large plans: {} × {PLAN_SIZE} in {:.1} s = {:.0} resources/s",
        large.plans, large.seconds, large.resources_per_second
    );
    Ok(large)
}

struct Env<'a> {
    binary: &'a Path,
    logs: &'a Path,
    plan: &'a Plan,
}

impl Env<'_> {
    fn spec<'s>(&'s self, store_url: &'s str, queue: &'s str, full: bool, light: bool) -> BridgeSpec<'s> {
        BridgeSpec {
            binary: self.binary,
            store_url,
            queue,
            full_events: full,
            light_events: light,
            log: self.logs.join(format!("{queue}.log")),
        }
    }

    async fn start(&self, store_url: &str, queue: &str, full: bool, light: bool) -> anyhow::Result<(Bridge, f64)> {
        let mut bridge = Bridge::start(&self.spec(store_url, queue, full, light))?;
        let ready = bridge.wait_ready(READY_LIMIT).await.with_context(|| format!("bridge on {queue}"))?;
        Ok((bridge, ready.as_secs_f64() * 1000.0))
    }

    /// Start, idle memory, the small-command sweep and large plans, on a fresh store.
    async fn store_run(&self, store: &'static str, store_url: &str) -> anyhow::Result<StoreRun> {
        let tag = format!("b{}", &Uuid::new_v4().simple().to_string()[..8]);
        let queue = format!("fhir-pubsub-bench-{store}-{tag}");
        eprintln!("{store}: bridge starting");
        let (bridge, first_start_ms) = self.start(store_url, &queue, false, false).await?;
        eprintln!("  bridge pid {}", bridge.process.pid());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (_, idle_rss_mib) = bridge.process.memory_mib();
        eprintln!("  ready in {first_start_ms:.0} ms, idle RSS {idle_rss_mib:.1} MiB");
        let small_commands = sweep(&queue, &tag, self.plan, bridge.process.pid()).await?;
        let (peak_rss_small_mib, _) = bridge.process.memory_mib();
        let large = vec![run_large_plans(&queue, &format!("{tag}l1"), self.plan.large_plans).await?];
        let (peak_rss_large_mib, _) = bridge.process.memory_mib();
        eprintln!("  peak RSS {peak_rss_small_mib:.1} MiB (small commands), {peak_rss_large_mib:.1} MiB (large plans)");
        bridge.process.stop(Duration::from_secs(30));
        rpc::delete_endpoint(&queue).await;
        Ok(StoreRun {
            store,
            first_start_ms,
            idle_rss_mib,
            peak_rss_small_mib,
            peak_rss_large_mib,
            small_commands,
            large_plans: large,
            ..StoreRun::default()
        })
    }

    /// Two backlogs of `large_plans` × PLAN_SIZE changes in `store_url` (a database of their own),
    /// committed while no bridge runs, each drained by a bridge started with one event kind on:
    /// light first, then full. Adds the restart time (on a store already holding changes) and the
    /// drains to `run`.
    async fn drains(&self, store_url: &str, run: &mut StoreRun) -> anyhow::Result<()> {
        let tag = format!("d{}", &Uuid::new_v4().simple().to_string()[..8]);
        let queue = format!("fhir-pubsub-bench-drain-{tag}");
        eprintln!("{}: backlogs of {} changes", run.store, self.plan.large_plans * PLAN_SIZE as u64);
        for (round, message_type) in
            [MessageType::ResourcesChangedLightEvent, MessageType::ResourcesChangedEvent].into_iter().enumerate()
        {
            write_backlog(store_url, &format!("{tag}r{round}"), self.plan.large_plans).await?;
            let drained = self.drain(store_url, &queue, &tag, message_type).await?;
            if round == 0 {
                run.restart_ms = Some(drained.1);
            }
            run.drains.push(drained.0);
        }
        rpc::delete_endpoint(&queue).await;
        Ok(())
    }

    async fn drain(
        &self,
        store_url: &str,
        queue: &str,
        tag: &str,
        message_type: MessageType,
    ) -> anyhow::Result<(events::DrainResult, f64)> {
        let store = fhir_pubsub::store::open(store_url).await?;
        let backlog = store.outbox_state().await?.pending;
        store.close().await;
        let kind = if message_type == MessageType::ResourcesChangedEvent { "full" } else { "light" };
        let counter = events::DrainCounter::start(message_type, tag).await?;
        let full = message_type == MessageType::ResourcesChangedEvent;
        let (bridge, ready_ms) = self.start(store_url, queue, full, !full).await?;
        let result = counter.wait(kind, backlog, std::time::Instant::now(), Duration::from_secs(600)).await;
        eprintln!(
            "  backlog drain ({kind}): {} changes in {:.2} s = {:.0}/s",
            result.changes, result.seconds, result.per_second
        );
        bridge.process.stop(Duration::from_secs(30));
        Ok((result, ready_ms))
    }
}

/// Commits `plans` plans of PLAN_SIZE new Patients `TAG-plan-i` through the library, no bridge
/// and so no publisher running: a backlog of changes in the outbox.
async fn write_backlog(store_url: &str, tag: &str, plans: u64) -> anyhow::Result<()> {
    use fhir_pubsub::contracts::read::{self, StorePlanMessage};
    use fhir_pubsub::plan::{PlanLimits, StoreJob, execute_store_plans, validate_store_plan};
    let store = fhir_pubsub::store::open(store_url).await?;
    for p in 0..plans {
        let items: Vec<String> = (0..PLAN_SIZE).map(|i| upsert(i, &patient(&format!("{tag}-{p}-{i}")))).collect();
        let text = format!(r#"{{"instructions":[{}]}}"#, items.join(","));
        let raw = fhir_pubsub::json::parse_lenient(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let Ok(StorePlanMessage::Instructions(list)) = read::store_plan(&raw) else {
            anyhow::bail!("the backlog plan cannot be read")
        };
        let job = StoreJob { message_id: None, plan: validate_store_plan(list, &PlanLimits::default()) };
        execute_store_plans(store.as_ref(), &[job]).await?;
    }
    store.close().await;
    Ok(())
}

/// Development runs (`--only ceiling,postgres,sqlite`): those parts only, their figures printed and
/// no report written (a report compares parts measured in one run). The bridge's PID is printed, so
/// that a profiler can be attached while it runs.
async fn partial_run(env: &Env<'_>, parts: &str) -> anyhow::Result<()> {
    let run_id = Uuid::new_v4().simple().to_string()[..8].to_owned();
    for part in parts.split(',') {
        match part {
            "ceiling" => {
                let queue = format!("fhir-pubsub-bench-echo-{run_id}");
                let connection = lapin::Connection::connect(rpc::AMQP, Default::default()).await?;
                rpc::declare_endpoint(&connection.create_channel().await?, &queue).await?;
                let _ = connection.close(200, "declared".into()).await;
                let echo = process::start_echo(&queue, PREFETCH, CONCURRENCY, &env.logs.join("echo.log"))?;
                eprintln!("broker ceiling (echo pid {})", echo.pid());
                sweep(&queue, &format!("e{run_id}"), env.plan, echo.pid()).await?;
                drop(echo);
                rpc::delete_endpoint(&queue).await;
            }
            "postgres" => {
                let name = format!("fhir_pubsub_bench_{run_id}");
                let url = create_database(&name).await?;
                let run = env.store_run("postgres", &url).await;
                drop_database(&name).await;
                run?;
            }
            "sqlite" => {
                let dir = tempfile::tempdir()?;
                env.store_run("sqlite", &format!("sqlite://{}/bench.db", dir.path().display())).await?;
            }
            other => anyhow::bail!("--only: unknown part `{other}` (ceiling, postgres, sqlite)"),
        }
    }
    Ok(())
}

/// A fresh PostgreSQL database for this run; its URL.
async fn create_database(name: &str) -> anyhow::Result<String> {
    let mut admin = sqlx::PgConnection::connect(POSTGRES_ADMIN).await.context("PostgreSQL at 127.0.0.1:5432")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await?;
    admin.close().await?;
    Ok(format!("postgres://postgres@127.0.0.1:5432/{name}?sslmode={POSTGRES_SSLMODE}"))
}

async fn drop_database(name: &str) {
    if let Ok(mut admin) = sqlx::PgConnection::connect(POSTGRES_ADMIN).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
            .execute(&mut admin)
            .await;
    }
}

fn argument(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("loadgen: a benchmark; run it with scripts/bench");
        return Ok(());
    }
    if let Some(queue) = argument(&args, "--echo") {
        let prefetch = argument(&args, "--prefetch").and_then(|p| p.parse().ok()).unwrap_or(PREFETCH);
        let concurrency = argument(&args, "--concurrency").and_then(|c| c.parse().ok()).unwrap_or(CONCURRENCY);
        return rpc::echo(&queue, prefetch, concurrency).await;
    }
    let binary = PathBuf::from(argument(&args, "--bridge").context("--bridge PATH of the fhir-pubsub binary")?);
    let out = PathBuf::from(argument(&args, "--out").unwrap_or_else(|| "bench".into()));
    let mut plan = Plan::new(args.iter().any(|a| a == "--quick"));
    if let Some(levels) = argument(&args, "--in-flight") {
        plan.in_flight = levels.split(',').map(str::parse).collect::<Result<_, _>>().context("--in-flight N[,N…]")?;
    }
    let logs = tempfile::tempdir()?;
    if let Some(parts) = argument(&args, "--only") {
        let env = Env { binary: &binary, logs: logs.path(), plan: &plan };
        return partial_run(&env, &parts).await;
    }
    std::fs::create_dir_all(&out)?;
    let run_id = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut machine = report::Machine::collect(&binary).await;

    // 4. The broker ceiling first: echo responder, same sweep.
    eprintln!("broker ceiling: echo responder, prefetch {PREFETCH}, concurrency {CONCURRENCY}");
    let echo_queue = format!("fhir-pubsub-bench-echo-{run_id}");
    {
        let connection = lapin::Connection::connect(rpc::AMQP, Default::default()).await?;
        rpc::declare_endpoint(&connection.create_channel().await?, &echo_queue).await?;
        let _ = connection.close(200, "declared".into()).await;
    }
    let echo_log = logs.path().join("echo.log");
    let mut echo = process::start_echo(&echo_queue, PREFETCH, CONCURRENCY, &echo_log)?;
    let broker_ceiling = sweep(&echo_queue, &format!("e{run_id}"), &plan, echo.pid()).await?;
    if let Some(status) = echo.exited() {
        let log = std::fs::read_to_string(&echo_log).unwrap_or_default();
        anyhow::bail!("the echo responder stopped during the run ({status}): {log}");
    }
    drop(echo);
    rpc::delete_endpoint(&echo_queue).await;

    let env = Env { binary: &binary, logs: logs.path(), plan: &plan };

    // 1, 2, 3 (drains), 5 on PostgreSQL.
    let pg_name = format!("fhir_pubsub_bench_{run_id}");
    let pg_url = create_database(&pg_name).await?;
    let postgres = env.store_run("postgres", &pg_url).await;
    let drain_name = format!("fhir_pubsub_bench_{run_id}_drain");
    let postgres = match postgres {
        Ok(mut run) => {
            let drain_url = create_database(&drain_name).await?;
            let drained = env.drains(&drain_url, &mut run).await;
            drop_database(&drain_name).await;
            drained.map(|()| run)
        }
        Err(e) => Err(e),
    };

    // The database's own limit, in the same database.
    eprintln!("postgres baseline: {} connections, single-row upserts", baseline::CONNECTIONS);
    let postgres_baseline = baseline::postgres_upserts(
        &pg_url,
        &format!("base{run_id}"),
        Arc::new(|id: &str| patient(id)),
        Duration::from_secs_f64(plan.warmup_s),
        Duration::from_secs_f64(plan.measure_s),
    )
    .await;
    machine.postgres_version = report::postgres_version(&pg_url).await;
    drop_database(&pg_name).await;
    let postgres = postgres?;
    let postgres_baseline = postgres_baseline?;
    eprintln!("  {:.0} transactions/s, p50 {:.2} ms", postgres_baseline.per_second, postgres_baseline.p50_ms);

    // 1, 2, 5 on SQLite.
    let sqlite_dir = tempfile::tempdir()?;
    let sqlite_url = format!("sqlite://{}/bench.db", sqlite_dir.path().display());
    let sqlite = env.store_run("sqlite", &sqlite_url).await?;

    // 3. Event latency at 1,000 commands/s on PostgreSQL, full events on.
    eprintln!("event latency: {} commands/s for {} s, full events, postgres", plan.event_rate, plan.event_seconds);
    let ev_name = format!("fhir_pubsub_bench_{run_id}_ev");
    let ev_url = create_database(&ev_name).await?;
    let ev_queue = format!("fhir-pubsub-bench-ev-{run_id}");
    let event_latency = async {
        let (bridge, _) = env.start(&ev_url, &ev_queue, true, false).await?;
        let tag = format!("v{run_id}");
        let result = events::latency(&ev_queue, &ev_url, &tag, plan.event_rate, plan.event_seconds, &patient).await;
        bridge.process.stop(Duration::from_secs(30));
        result
    }
    .await;
    drop_database(&ev_name).await;
    rpc::delete_endpoint(&ev_queue).await;
    let event_latency = event_latency?;
    eprintln!(
        "  p50 {:.1} ms, p99 {:.1} ms ({} of {} changes seen)",
        event_latency.p50_ms, event_latency.p99_ms, event_latency.events_matched, event_latency.commands
    );

    machine.finish();
    let results = Results { plan, machine, broker_ceiling, postgres_baseline, postgres, sqlite, event_latency };
    report::write(&results, &out)?;
    eprintln!("report: {}", out.join("report.md").display());
    Ok(())
}
