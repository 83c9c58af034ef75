//! The SQLite store, the embedded default.
//!
//! WAL journal with `synchronous=FULL`, so a commit is on disk when it returns. Writers start with
//! `BEGIN IMMEDIATE` and, inside this process, queue on a mutex instead of spinning on SQLITE_BUSY;
//! other processes (the `sqlite3` shell, a second bridge) wait through the busy timeout. With one
//! writer at a time the AUTOINCREMENT `seq` of the version log is exactly commit order.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};
use uuid::Uuid;

use super::{
    Current, Found, Lookup, PendingChange, ResourceKey, Store, StoreError, StoreTx, Write, change_type, classify,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// A SQLite-backed store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Serialises this process's writers (SQLite allows one at a time anyway).
    write_lock: Arc<Mutex<()>>,
}

impl SqliteStore {
    /// Opens (creating the file and its folder if missing) and runs the migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::InvalidUrl(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        if !in_memory {
            let path = options.get_filename();
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Unavailable(format!("cannot create the folder {} for the database: {e}", dir.display()))
                })?;
            }
        }
        // An in-memory database lives in one connection; keep exactly that one.
        let pool = SqlitePoolOptions::new()
            .max_connections(if in_memory { 1 } else { 8 })
            .min_connections(if in_memory { 1 } else { 0 })
            .idle_timeout(if in_memory { None } else { Some(Duration::from_secs(600)) })
            .max_lifetime(if in_memory { None } else { Some(Duration::from_secs(1800)) })
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(classify)?;
        MIGRATOR.run(&pool).await.map_err(|e| StoreError::Migration(e.to_string()))?;
        Ok(SqliteStore { pool, write_lock: Arc::new(Mutex::new(())) })
    }

    /// The connection pool (tests).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

fn pending_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<PendingChange, StoreError> {
    let kind: String = row.try_get("change_type").map_err(classify)?;
    let recorded: String = row.try_get("recorded_at").map_err(classify)?;
    Ok(PendingChange {
        seq: row.try_get("seq").map_err(classify)?,
        txid: row.try_get("txid").map_err(classify)?,
        key: ResourceKey::new(
            row.try_get::<String, _>("resource_type").map_err(classify)?,
            row.try_get::<String, _>("resource_id").map_err(classify)?,
        ),
        version_id: row.try_get("version_id").map_err(classify)?,
        change_type: change_type(&kind)?,
        body: row.try_get("body").map_err(classify)?,
        recorded_at: DateTime::parse_from_rfc3339(&recorded)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(|_| Utc::now()),
    })
}

#[async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn begin(&self) -> Result<Box<dyn StoreTx>, StoreError> {
        let guard = self.write_lock.clone().lock_owned().await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        Ok(Box::new(SqliteTx { tx, _guard: guard }))
    }

    async fn inbox_response(&self, message_id: Uuid) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT response FROM inbox WHERE message_id = ?")
            .bind(message_id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)
    }

    async fn read(&self, lookups: &[Lookup]) -> Result<Vec<Found>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(classify)?;
        let mut out = Vec::with_capacity(lookups.len());
        for lookup in lookups {
            let body: Option<String> = match &lookup.version_id {
                None => sqlx::query_scalar("SELECT body FROM resources WHERE resource_type = ? AND resource_id = ?")
                    .bind(&lookup.key.resource_type)
                    .bind(&lookup.key.resource_id)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(classify)?,
                Some(version) => sqlx::query_scalar(
                    "SELECT body FROM resource_versions WHERE resource_type = ? AND resource_id = ? \
                     AND version_id = ? AND change_type <> 'delete'",
                )
                .bind(&lookup.key.resource_type)
                .bind(&lookup.key.resource_id)
                .bind(version)
                .fetch_optional(&mut *conn)
                .await
                .map_err(classify)?,
            };
            out.push(match body {
                Some(body) => Found::Resource(body),
                None if lookup.version_id.is_none() => Found::NoResource,
                None => {
                    let existed: bool = sqlx::query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM resource_versions WHERE resource_type = ? AND resource_id = ?)",
                    )
                    .bind(&lookup.key.resource_type)
                    .bind(&lookup.key.resource_id)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(classify)?;
                    if existed { Found::NoVersion } else { Found::NoResource }
                }
            });
        }
        Ok(out)
    }

    async fn pending_changes(&self, limit: usize) -> Result<Vec<PendingChange>, StoreError> {
        let rows = sqlx::query(
            "SELECT v.seq, v.txid, v.resource_type, v.resource_id, v.version_id, v.change_type, v.body, v.recorded_at \
             FROM pending_changes p JOIN resource_versions v ON v.seq = p.seq ORDER BY p.seq LIMIT ?",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter().map(pending_from_row).collect()
    }

    async fn delete_pending(&self, seqs: &[i64]) -> Result<(), StoreError> {
        let list = serde_json::to_string(seqs).map_err(|e| StoreError::Database(e.to_string()))?;
        let _guard = self.write_lock.lock().await;
        sqlx::query("DELETE FROM pending_changes WHERE seq IN (SELECT value FROM json_each(?))")
            .bind(list)
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn version_log(&self) -> Result<Vec<PendingChange>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, txid, resource_type, resource_id, version_id, change_type, body, recorded_at \
             FROM resource_versions ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter().map(pending_from_row).collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(classify)?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// A SQLite write transaction; holds the process's write lock until it ends.
struct SqliteTx {
    tx: Transaction<'static, Sqlite>,
    _guard: OwnedMutexGuard<()>,
}

#[async_trait]
impl StoreTx for SqliteTx {
    async fn inbox_get(&mut self, message_id: Uuid) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT response FROM inbox WHERE message_id = ?")
            .bind(message_id.to_string())
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(classify)
    }

    async fn inbox_put(&mut self, message_id: Uuid, message_type: &str, response: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO inbox (message_id, message_type, response) VALUES (?, ?, ?)")
            .bind(message_id.to_string())
            .bind(message_type)
            .bind(response)
            .execute(&mut *self.tx)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn lock_current(&mut self, keys: &[ResourceKey]) -> Result<Vec<Option<Current>>, StoreError> {
        // BEGIN IMMEDIATE already holds the database's write lock.
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let row = sqlx::query("SELECT version_id, body FROM resources WHERE resource_type = ? AND resource_id = ?")
                .bind(&key.resource_type)
                .bind(&key.resource_id)
                .fetch_optional(&mut *self.tx)
                .await
                .map_err(classify)?;
            out.push(match row {
                Some(row) => Some(Current {
                    version_id: row.try_get("version_id").map_err(classify)?,
                    body: row.try_get("body").map_err(classify)?,
                }),
                None => None,
            });
        }
        Ok(out)
    }

    async fn versions_used(&mut self, versions: &[(ResourceKey, String)]) -> Result<Vec<bool>, StoreError> {
        let mut out = Vec::with_capacity(versions.len());
        for (key, version) in versions {
            let used: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM resource_versions WHERE resource_type = ? AND resource_id = ? \
                 AND version_id = ? AND change_type <> 'delete')",
            )
            .bind(&key.resource_type)
            .bind(&key.resource_id)
            .bind(version)
            .fetch_one(&mut *self.tx)
            .await
            .map_err(classify)?;
            out.push(used);
        }
        Ok(out)
    }

    async fn apply(&mut self, writes: &[Write]) -> Result<(), StoreError> {
        for write in writes {
            match write {
                Write::Insert(v) => sqlx::query(
                    "INSERT INTO resources (resource_type, resource_id, version_id, last_updated, body) VALUES (?, ?, ?, ?, ?)",
                )
                .bind(&v.key.resource_type)
                .bind(&v.key.resource_id)
                .bind(&v.version_id)
                .bind(&v.last_updated)
                .bind(&v.body),
                Write::Update(v) => sqlx::query(
                    "UPDATE resources SET version_id = ?, last_updated = ?, body = ? WHERE resource_type = ? AND resource_id = ?",
                )
                .bind(&v.version_id)
                .bind(&v.last_updated)
                .bind(&v.body)
                .bind(&v.key.resource_type)
                .bind(&v.key.resource_id),
                Write::Delete(key) => sqlx::query("DELETE FROM resources WHERE resource_type = ? AND resource_id = ?")
                    .bind(&key.resource_type)
                    .bind(&key.resource_id),
            }
            .execute(&mut *self.tx)
            .await
            .map_err(classify)?;
        }
        Ok(())
    }

    async fn savepoint(&mut self) -> Result<(), StoreError> {
        sqlx::query("SAVEPOINT plan").execute(&mut *self.tx).await.map_err(classify)?;
        Ok(())
    }

    async fn rollback_to_savepoint(&mut self) -> Result<(), StoreError> {
        sqlx::query("ROLLBACK TO SAVEPOINT plan").execute(&mut *self.tx).await.map_err(classify)?;
        Ok(())
    }

    async fn release_savepoint(&mut self) -> Result<(), StoreError> {
        sqlx::query("RELEASE SAVEPOINT plan").execute(&mut *self.tx).await.map_err(classify)?;
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.tx.commit().await.map_err(classify)
    }
}
