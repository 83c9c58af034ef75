//! Test support: a fresh store per test on each database, removed afterwards.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use fhir_pubsub::store::{self, Store};
use sqlx::Connection;

/// The PostgreSQL server the tests use (override with FHIR_PUBSUB_TEST_POSTGRES).
pub fn postgres_admin_url() -> String {
    std::env::var("FHIR_PUBSUB_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A store on a fresh database; dropping it removes the database (or the SQLite folder).
pub struct TestStore {
    pub store: Arc<dyn Store>,
    pub url: String,
    pg_database: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl std::ops::Deref for TestStore {
    type Target = dyn Store;
    fn deref(&self) -> &Self::Target {
        self.store.as_ref()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Postgres,
    Sqlite,
}

impl TestStore {
    pub async fn new(kind: Kind) -> TestStore {
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}/store.db", dir.path().display());
                let store = store::open(&url).await.expect("open sqlite store");
                TestStore { store, url, pg_database: None, _dir: Some(dir) }
            }
            Kind::Postgres => {
                let name = format!("fhir_pubsub_test_{}", uuid::Uuid::new_v4().simple());
                let admin = postgres_admin_url();
                let mut conn = sqlx::PgConnection::connect(&admin).await.expect("connect to PostgreSQL");
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("create db");
                conn.close().await.ok();
                let url = replace_database(&admin, &name);
                let store = store::open(&url).await.expect("open postgres store");
                TestStore { store, url, pg_database: Some(name), _dir: None }
            }
        }
    }
}

/// `postgres://…/olddb` → `postgres://…/newdb`.
pub fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map(|(b, q)| (b, Some(q))).unwrap_or((url, None));
    let base = base.rsplit_once('/').map(|(b, _)| b).unwrap_or(base);
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some(name) = self.pg_database.take() {
            let store = self.store.clone();
            // Drop runs inside the test's runtime: do the async cleanup on a thread of its own.
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                rt.block_on(async move {
                    store.close().await;
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&postgres_admin_url()).await {
                        let _ =
                            sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                                .execute(&mut conn)
                                .await;
                    }
                });
            })
            .join()
            .ok();
        }
    }
}

/// Runs one async test body against both stores: `both_stores!(name, body_fn)`.
#[macro_export]
macro_rules! both_stores {
    ($name:ident, $body:path) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                let store = common::TestStore::new(common::Kind::Postgres).await;
                $body(&store).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let store = common::TestStore::new(common::Kind::Sqlite).await;
                $body(&store).await;
            }
        }
    };
}

/// Waits until `check` holds, polling every 100 ms; fails the test naming `what` after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
