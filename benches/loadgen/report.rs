//! What a run records about the machine, and the report it writes: `report.md` (figures, ratios to
//! the baselines of the same run, goals), `report.json` (every figure) and `report.png` (throughput
//! and p99 latency against requests in flight).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;
use sqlx::Connection as _;

use crate::Results;
use crate::rpc::LoadResult;

/// The machine and versions, so runs can be compared.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub started_at: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub cpu: String,
    pub os: String,
    pub kernel: String,
    /// 1-minute load average when the run started and when it ended (other work on the machine).
    pub load_at_start: String,
    pub load_at_end: String,
    pub bridge_version: String,
    pub git_commit: String,
    pub rustc: String,
    pub rabbitmq: String,
    pub postgres_version: String,
    pub sqlite_version: String,
    /// Free text from BENCH_NOTE (what else ran on the machine).
    pub note: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn load_average() -> String {
    read("/proc/loadavg").split_whitespace().next().unwrap_or("?").to_owned()
}

impl Machine {
    pub async fn collect(binary: &Path) -> Machine {
        let meminfo = read("/proc/meminfo");
        let memory_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default();
        let os = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default();
        let bridge_version = std::process::Command::new(binary)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let sqlite_version = match sqlx::SqliteConnection::connect("sqlite::memory:").await {
            Ok(mut c) => {
                sqlx::query_scalar::<_, String>("SELECT sqlite_version()").fetch_one(&mut c).await.unwrap_or_default()
            }
            Err(_) => String::new(),
        };
        Machine {
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            memory_gib: memory_kib / 1024.0 / 1024.0,
            cpu,
            os,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            load_at_start: load_average(),
            load_at_end: String::new(),
            bridge_version,
            git_commit: std::env::var("BENCH_GIT_COMMIT").unwrap_or_default(),
            rustc: std::env::var("BENCH_RUSTC").unwrap_or_default(),
            rabbitmq: std::env::var("BENCH_RABBITMQ").unwrap_or_default(),
            postgres_version: String::new(),
            sqlite_version,
            note: std::env::var("BENCH_NOTE").unwrap_or_default(),
        }
    }

    pub fn finish(&mut self) {
        self.load_at_end = load_average();
    }
}

pub async fn postgres_version(url: &str) -> String {
    match sqlx::PgConnection::connect(url).await {
        Ok(mut c) => sqlx::query_scalar::<_, String>("SHOW server_version").fetch_one(&mut c).await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

pub fn write(results: &Results, out: &Path) -> anyhow::Result<()> {
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(results)? + "\n")?;
    std::fs::write(out.join("report.md"), markdown(results))?;
    if let Err(e) = chart(results, &out.join("report.png")) {
        eprintln!("no chart: {e}");
    }
    Ok(())
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() { format!("{:.2}×", a / b) } else { "–".into() }
}

fn goal(met: bool) -> &'static str {
    if met { "met" } else { "**not met**" }
}

fn best(results: &[LoadResult]) -> Option<&LoadResult> {
    results.iter().max_by(|a, b| a.per_second.total_cmp(&b.per_second))
}

fn markdown(r: &Results) -> String {
    let m = &r.machine;
    let mut s = String::new();
    let _ = writeln!(s, "# fhir-pubsub benchmark report\n");
    let _ = writeln!(
        s,
        "Run `{}` mode at {} on {} cores, {:.1} GiB ({}), {}. 1-minute load average {} at the start, {} at the end. \
         Every process (RabbitMQ, PostgreSQL, the bridge, the load generator) shares these cores, so the ratios to the \
         baselines measured in this same run are the figures to compare between runs; the absolute numbers are context.",
        r.plan.mode, m.started_at, m.cores, m.memory_gib, m.cpu, m.os, m.load_at_start, m.load_at_end
    );
    if !m.note.is_empty() {
        let _ = writeln!(s, "\n{}", m.note);
    }
    let _ = writeln!(s, "\n| | |\n|---|---|");
    for (k, v) in [
        ("bridge", m.bridge_version.as_str()),
        ("commit", m.git_commit.as_str()),
        ("rustc", m.rustc.as_str()),
        ("RabbitMQ", m.rabbitmq.as_str()),
        ("PostgreSQL", m.postgres_version.as_str()),
        ("SQLite", m.sqlite_version.as_str()),
        ("kernel", m.kernel.as_str()),
    ] {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let _ = writeln!(
        s,
        "| settings | bridge defaults: PrefetchCount {}, ConcurrencyNumber {}, events off unless stated, log level info to a file; \
         PostgreSQL over loopback TCP with sslmode={}; warm-up {} s, window {} s per level |",
        crate::PREFETCH,
        crate::CONCURRENCY,
        crate::POSTGRES_SSLMODE,
        r.plan.warmup_s,
        r.plan.measure_s
    );

    let ceiling = best(&r.broker_ceiling).map(|b| b.per_second).unwrap_or(f64::NAN);
    let pg_best = best(&r.postgres.small_commands).map(|b| b.per_second).unwrap_or(f64::NAN);
    let _ = writeln!(s, "\n## Goals\n\n| goal | measured | |\n|---|---|---|");
    let _ = writeln!(s, "| ≥ 5,000 commands/s on PostgreSQL | {pg_best:.0}/s | {} |", goal(pg_best >= 5000.0));
    let _ = writeln!(
        s,
        "| ≥ 0.8× the broker ceiling (PostgreSQL) | {} of {ceiling:.0}/s | {} |",
        ratio(pg_best, ceiling),
        goal(pg_best >= 0.8 * ceiling)
    );
    let pg_large = r.postgres.large_plans.iter().map(|l| l.resources_per_second).fold(f64::NAN, f64::max);
    let _ = writeln!(
        s,
        "| ≥ 20,000 resources/s in plans of 1,000 (PostgreSQL) | {pg_large:.0}/s | {} |",
        goal(pg_large >= 20000.0)
    );
    let _ = writeln!(
        s,
        "| event p99 < 50 ms at 1,000 commands/s | {:.1} ms | {} |",
        r.event_latency.p99_ms,
        goal(r.event_latency.p99_ms < 50.0)
    );
    if let Some(light) = r.postgres.drains.iter().find(|d| d.kind == "light") {
        let _ = writeln!(
            s,
            "| > 50,000 light changes/s drained | {:.0}/s | {} |",
            light.per_second,
            goal(light.per_second > 50000.0)
        );
    }
    for run in [&r.postgres, &r.sqlite] {
        let peak = run.peak_rss_small_mib.max(run.peak_rss_large_mib);
        let _ = writeln!(
            s,
            "| peak RSS under load < 100 MB ({}) | {peak:.1} MiB | {} |",
            run.store,
            goal(peak * 1.048576 < 100.0)
        );
        let _ = writeln!(
            s,
            "| idle RSS < 30 MB ({}) | {:.1} MiB | {} |",
            run.store,
            run.idle_rss_mib,
            goal(run.idle_rss_mib * 1.048576 < 30.0)
        );
        let start = run.restart_ms.unwrap_or(run.first_start_ms);
        let _ = writeln!(s, "| start to ready < 1 s ({}) | {start:.0} ms | {} |", run.store, goal(start < 1000.0));
    }

    let _ = writeln!(
        s,
        "\n## 1 and 4. Small commands against the broker ceiling\n\n\
         One ExecuteStorePlanCommand with one 1 KB Patient upsert (a new resource each), request/response: persistent, \
         publisher-confirmed request to the queue's exchange, reply to the generator's temporary endpoint, matched by \
         `requestId`. The **broker ceiling** is the same exchange of messages with an echo responder in place of the \
         bridge (manual acks after a confirmed persistent reply, same prefetch and concurrency, no database).\n"
    );
    let _ = writeln!(
        s,
        "| in flight | broker ceiling /s (p50 / p99 ms) | PostgreSQL bridge /s (p50 / p99 ms) | × ceiling | SQLite bridge /s (p50 / p99 ms) | × ceiling |\n|---:|---:|---:|---:|---:|---:|"
    );
    for (i, echo) in r.broker_ceiling.iter().enumerate() {
        let cell = |run: &[LoadResult]| {
            run.get(i)
                .map(|l| {
                    (
                        format!("{:.0} ({:.2} / {:.2})", l.per_second, l.p50_ms, l.p99_ms),
                        ratio(l.per_second, echo.per_second),
                    )
                })
                .unwrap_or_default()
        };
        let (pg, pg_ratio) = cell(&r.postgres.small_commands);
        let (lite, lite_ratio) = cell(&r.sqlite.small_commands);
        let _ = writeln!(
            s,
            "| {} | {:.0} ({:.2} / {:.2}) | {pg} | {pg_ratio} | {lite} | {lite_ratio} |",
            echo.in_flight, echo.per_second, echo.p50_ms, echo.p99_ms
        );
    }
    let _ = writeln!(
        s,
        "\nCPU time of the responding process per request (user + system, whole level): {}.",
        [
            ("echo", &r.broker_ceiling),
            ("PostgreSQL bridge", &r.postgres.small_commands),
            ("SQLite bridge", &r.sqlite.small_commands)
        ]
        .iter()
        .map(|(name, run)| format!(
            "{name} {}",
            run.iter().map(|l| format!("{:.3}", l.responder_cpu_ms_per_request)).collect::<Vec<_>>().join(" / ")
        ))
        .collect::<Vec<_>>()
        .join("; ")
            + " ms at 1 / 8 / 64 / 256 in flight"
    );
    let lost: u64 = [&r.postgres.small_commands, &r.sqlite.small_commands, &r.broker_ceiling]
        .iter()
        .flat_map(|v| v.iter())
        .map(|l| l.lost + l.replies_with_errors)
        .sum();
    let b = &r.postgres_baseline;
    let _ = writeln!(
        s,
        "\nPostgreSQL alone (the same upserts as single-row transactions from {} connections, no broker): **{:.0} \
         transactions/s** (p50 {:.2} ms, p99 {:.2} ms). Best PostgreSQL bridge rate: {pg_best:.0}/s = {} of the \
         database alone, {} of the broker ceiling ({ceiling:.0}/s). Requests lost or answered with errors in all \
         runs: {lost}.",
        b.connections,
        b.per_second,
        b.p50_ms,
        b.p99_ms,
        ratio(pg_best, b.per_second),
        ratio(pg_best, ceiling)
    );
    // Each command needs a broker round trip and a database write, on the same cores: if each costs
    // the machine what it costs at its own limit, the two in series carry C·P/(C+P).
    if ceiling > 0.0 && b.per_second > 0.0 {
        let in_series = ceiling * b.per_second / (ceiling + b.per_second);
        let _ = writeln!(
            s,
            "\nThe broker ceiling and the database alone in series (each command costing the machine one echo round \
             trip plus one single-row transaction, at the rates measured above): {in_series:.0}/s = {} of the \
             ceiling. Group commit (one transaction per group of commands) is what takes the bridge past that; \
             reaching 0.8× would need the database's share per command to be at most a quarter of the broker's.",
            ratio(in_series, ceiling)
        );
    }

    let _ = writeln!(
        s,
        "\n## 2. Large plans\n\nPlans of 1,000 new 1 KB Patients each, 2 plans in flight, request/response.\n\n\
         | store | plans | resources | seconds | resources/s | × PostgreSQL alone (rows/s) |\n|---|---:|---:|---:|---:|---:|"
    );
    for run in [&r.postgres, &r.sqlite] {
        for l in &run.large_plans {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2} | {:.0} | {} |",
                run.store,
                l.plans,
                l.resources,
                l.seconds,
                l.resources_per_second,
                ratio(l.resources_per_second, b.per_second)
            );
        }
    }

    let e = &r.event_latency;
    let _ = writeln!(
        s,
        "\n## 3. Change events (PostgreSQL)\n\n\
         Latency: {:.0} commands/s offered for {} commands (one new Patient each, no reply), full events on; for each \
         change, its commit (the version row's `recorded_at`) to its arrival at a consumer of the full-event exchange: \
         **p50 {:.1} ms, p99 {:.1} ms**, max {:.1} ms ({} of {} changes seen).\n",
        e.offered_per_second, e.commands, e.p50_ms, e.p99_ms, e.max_ms, e.events_matched, e.commands
    );
    let _ = writeln!(
        s,
        "Backlog drain: {} plans of 1,000 new Patients committed through the library with no bridge running, \
         then published by a bridge started with one event kind on; rate from that bridge being ready (or the first \
         event's arrival, if earlier) to the last event's arrival.\n\n\
         | events | changes | seconds | changes/s |\n|---|---:|---:|---:|",
        r.plan.large_plans
    );
    for d in &r.postgres.drains {
        let _ = writeln!(s, "| {} | {} | {:.2} | {:.0} |", d.kind, d.changes, d.seconds, d.per_second);
    }

    let _ = writeln!(
        s,
        "\n## 5. Memory and start\n\n| store | start to ready, empty store | start on a store holding a backlog | idle RSS | peak RSS, small commands | peak RSS, large plans |\n|---|---:|---:|---:|---:|---:|"
    );
    for run in [&r.postgres, &r.sqlite] {
        let _ = writeln!(
            s,
            "| {} | {:.0} ms | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
            run.store,
            run.first_start_ms,
            run.restart_ms.map(|ms| format!("{ms:.0} ms")).unwrap_or_else(|| "–".into()),
            run.idle_rss_mib,
            run.peak_rss_small_mib,
            run.peak_rss_large_mib
        );
    }
    let _ = writeln!(
        s,
        "\nStart: from spawning `fhir-pubsub run` to `/readyz` answering 200 (store migrated and reachable, broker \
         topology declared, consuming). Memory: `VmRSS` one second after ready, and `VmHWM` of `/proc/PID/status`.\n\n\
         ![throughput and latency](report.png)"
    );
    s
}

/// The first TrueType font of the system (DejaVu Sans preferred), for the chart's text.
fn system_font() -> Option<&'static [u8]> {
    let mut candidates = Vec::new();
    let mut dirs = vec![std::path::PathBuf::from("/usr/share/fonts")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "ttf") {
                candidates.push(path);
            }
        }
    }
    candidates.sort_by_key(|p| !p.ends_with("DejaVuSans.ttf"));
    let bytes = std::fs::read(candidates.first()?).ok()?;
    Some(Box::leak(bytes.into_boxed_slice()))
}

fn chart(r: &Results, path: &Path) -> anyhow::Result<()> {
    let font = system_font().ok_or_else(|| anyhow::anyhow!("no TrueType font under /usr/share/fonts"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("the system font cannot be read"))?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let levels: Vec<String> = r.broker_ceiling.iter().map(|l| l.in_flight.to_string()).collect();
    let last = (levels.len().max(2) - 1) as f64;
    let series: [(&str, &[LoadResult], RGBColor); 3] = [
        ("broker ceiling (echo)", &r.broker_ceiling, RGBColor(120, 120, 120)),
        ("bridge on PostgreSQL", &r.postgres.small_commands, RGBColor(31, 119, 180)),
        ("bridge on SQLite", &r.sqlite.small_commands, RGBColor(214, 39, 40)),
    ];
    let label = |x: &f64| levels.get(x.round() as usize).cloned().unwrap_or_default();

    let top = series
        .iter()
        .flat_map(|(_, v, _)| v.iter().map(|l| l.per_second))
        .chain([r.postgres_baseline.per_second])
        .fold(1.0, f64::max)
        * 1.1;
    let mut throughput = ChartBuilder::on(&left)
        .caption("Small commands: round trips per second", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.2..last + 0.2, 0.0..top)?;
    throughput
        .configure_mesh()
        .x_labels(levels.len())
        .x_label_formatter(&label)
        .x_desc("requests in flight")
        .y_desc("per second")
        .label_style(("sans-serif", 15))
        .draw()?;
    for (name, values, color) in series {
        let points: Vec<(f64, f64)> = values.iter().enumerate().map(|(i, l)| (i as f64, l.per_second)).collect();
        throughput
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
        throughput.draw_series(points.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    let baseline = r.postgres_baseline.per_second;
    let green = RGBColor(44, 160, 44);
    throughput
        .draw_series(LineSeries::new(vec![(-0.2, baseline), (last + 0.2, baseline)], green.stroke_width(2)))?
        .label("PostgreSQL alone, 16 connections")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], green.stroke_width(2)));
    throughput
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let worst =
        series.iter().flat_map(|(_, v, _)| v.iter().map(|l| l.p99_ms)).filter(|v| v.is_finite()).fold(1.0, f64::max);
    let mut latency = ChartBuilder::on(&right)
        .caption("Small commands: reply latency p99 (ms, log scale)", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.2..last + 0.2, (0.1..worst * 1.5).log_scale())?;
    latency
        .configure_mesh()
        .x_labels(levels.len())
        .x_label_formatter(&label)
        .x_desc("requests in flight")
        .y_desc("ms")
        .label_style(("sans-serif", 15))
        .draw()?;
    for (name, values, color) in series {
        let points: Vec<(f64, f64)> = values.iter().enumerate().map(|(i, l)| (i as f64, l.p99_ms)).collect();
        latency
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
        latency.draw_series(points.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
    }
    latency
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
