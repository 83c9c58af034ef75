//! The database's own limit: the same 1 KB upserts as single-row SQL transactions from 16
//! connections straight to PostgreSQL, no broker and no bridge.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;

use crate::rpc::percentile;

pub const CONNECTIONS: usize = 16;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BaselineResult {
    pub connections: usize,
    pub transactions: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Upserts (`INSERT … ON CONFLICT DO UPDATE`, one autocommitted statement each) of `body(id)` into
/// a table of its own in `url`, for `warmup` then `measure`.
pub async fn postgres_upserts(
    url: &str,
    tag: &str,
    body: Arc<dyn Fn(&str) -> String + Send + Sync>,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<BaselineResult> {
    let pool = PgPoolOptions::new().max_connections(CONNECTIONS as u32).connect(url).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_baseline (id text PRIMARY KEY, body jsonb NOT NULL)")
        .execute(&pool)
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let (window_start, window_end) = (started + warmup, started + warmup + measure);
    let mut workers = Vec::new();
    for worker in 0..CONNECTIONS {
        let (pool, stop, body, tag) = (pool.clone(), stop.clone(), body.clone(), tag.to_owned());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("{tag}-{worker}-{n}");
                n += 1;
                let resource = body(&id);
                let sent = Instant::now();
                sqlx::query(
                    "INSERT INTO bench_baseline (id, body) VALUES ($1, $2::jsonb) \
                     ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                )
                .bind(&id)
                .bind(&resource)
                .execute(&pool)
                .await?;
                let now = Instant::now();
                if now >= window_start && now <= window_end {
                    latencies.push((now - sent).as_secs_f64() * 1000.0);
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    tokio::time::sleep_until((window_end).into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await??);
    }
    pool.close().await;
    latencies.sort_by(f64::total_cmp);
    let seconds = measure.as_secs_f64();
    Ok(BaselineResult {
        connections: CONNECTIONS,
        transactions: latencies.len() as u64,
        seconds,
        per_second: latencies.len() as f64 / seconds,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
    })
}
