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
use sqlx::{Row, Sqlite, SqliteConnection, Transaction};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};
use uuid::Uuid;

use super::{
    ChangeBatch, Claim, Current, Drained, Found, InboxEntry, Lookup, OutboxState, PendingChange, PlanState,
    PublisherLease, ResourceKey, Store, StoreError, StoreTx, Write, change_type, classify,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// A SQLite-backed store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Serialises this process's writers (SQLite allows one at a time anyway).
    write_lock: Arc<Mutex<()>>,
    /// Bridge writers pass this gate before queueing on `write_lock`, so at most one of them waits
    /// there: the publisher, which takes `write_lock` directly, never waits behind a long queue.
    writer_gate: Arc<Mutex<()>>,
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
            .after_release(|conn, _| Box::pin(async move { still_usable(conn).await }))
            .connect_with(options)
            .await
            .map_err(classify)?;
        MIGRATOR.run(&pool).await.map_err(|e| StoreError::Migration(e.to_string()))?;
        Ok(SqliteStore { pool, write_lock: Arc::default(), writer_gate: Arc::default() })
    }

    /// The connection pool (tests).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// Whether a connection going back to the pool can be used again: not when a transaction is still
/// open on it. A COMMIT that fails for lack of disk space (SQLITE_FULL, SQLITE_IOERR) makes SQLite
/// roll the transaction back by itself; the ROLLBACK sqlx then queues fails ("no transaction is
/// active"), and sqlx still counts the transaction as open, so every later `BEGIN IMMEDIATE` on that
/// connection would fail for good. Such a connection is closed instead (the pool opens a fresh one).
/// The ping first runs the rollback sqlx queued when the transaction was dropped.
async fn still_usable(conn: &mut SqliteConnection) -> Result<bool, sqlx::Error> {
    use sqlx::Connection;
    conn.ping().await?;
    Ok(!conn.is_in_transaction())
}

/// How long a publisher lease lasts without renewal: a killed leader is replaced after at most this.
const LEASE: Duration = Duration::from_secs(5);
/// A lease younger than this is not renewed again (renewal is a write).
const LEASE_RENEW_AFTER: Duration = Duration::from_secs(1);

/// Up to `limit` outbox rows in publishing order. With one writer at a time, `seq` order is commit order.
async fn pending_rows(
    conn: &mut SqliteConnection,
    after_seq: i64,
    limit: usize,
    bodies: bool,
) -> Result<Vec<PendingChange>, StoreError> {
    let rows = sqlx::query(
        "SELECT v.seq, v.txid, v.resource_type, v.resource_id, v.version_id, v.change_type, \
                CASE WHEN ? THEN v.body END AS body, v.recorded_at \
         FROM pending_changes p JOIN resource_versions v ON v.seq = p.seq WHERE p.seq > ? ORDER BY p.seq LIMIT ?",
    )
    .bind(bodies)
    .bind(after_seq)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(conn)
    .await
    .map_err(classify)?;
    rows.iter().map(pending_from_row).collect()
}

/// Deletes confirmed batches and their outbox rows.
async fn delete_completed(conn: &mut SqliteConnection, batches: &[ChangeBatch]) -> Result<(), StoreError> {
    let (ids, seqs) = ChangeBatch::ids_and_seqs(batches);
    sqlx::query("DELETE FROM pending_changes WHERE seq IN (SELECT value FROM json_each(?))")
        .bind(json_list(&seqs)?)
        .execute(&mut *conn)
        .await
        .map_err(classify)?;
    sqlx::query("DELETE FROM publish_batches WHERE id IN (SELECT value FROM json_each(?))")
        .bind(json_list(&ids)?)
        .execute(&mut *conn)
        .await
        .map_err(classify)?;
    Ok(())
}

fn json_list(values: &[i64]) -> Result<String, StoreError> {
    serde_json::to_string(values).map_err(|e| StoreError::Database(e.to_string()))
}

fn unix_millis(at: std::time::SystemTime) -> i64 {
    at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The publisher's leadership on SQLite: a row naming the holder, renewed before it expires.
struct SqliteLease {
    store: SqliteStore,
    holder: String,
    renewed: Option<std::time::Instant>,
}

impl SqliteLease {
    /// Takes or extends the lease; `false` when another live holder has it.
    async fn renew(&mut self) -> Result<bool, StoreError> {
        let now = std::time::SystemTime::now();
        let _guard = self.store.write_lock.lock().await;
        let taken = sqlx::query(
            "INSERT INTO publisher_lease (id, holder, expires_at) VALUES (1, ?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE publisher_lease.holder = excluded.holder OR publisher_lease.expires_at < ?3",
        )
        .bind(&self.holder)
        .bind(unix_millis(now + LEASE))
        .bind(unix_millis(now))
        .execute(&self.store.pool)
        .await
        .map_err(classify)?
        .rows_affected()
            == 1;
        if taken {
            self.renewed = Some(std::time::Instant::now());
        }
        Ok(taken)
    }
}

#[async_trait]
impl PublisherLease for SqliteLease {
    async fn confirm(&mut self) -> Result<bool, StoreError> {
        match self.renewed {
            Some(at) if at.elapsed() < LEASE_RENEW_AFTER => Ok(true),
            _ => self.renew().await,
        }
    }

    async fn release(self: Box<Self>) {
        let _guard = self.store.write_lock.lock().await;
        let _ = sqlx::query("DELETE FROM publisher_lease WHERE holder = ?")
            .bind(&self.holder)
            .execute(&self.store.pool)
            .await;
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
        let gate = self.writer_gate.lock().await;
        let guard = self.write_lock.clone().lock_owned().await;
        drop(gate);
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
        let mut conn = self.pool.acquire().await.map_err(classify)?;
        pending_rows(&mut conn, 0, limit, true).await
    }

    async fn claim_batches(&self, claim: Claim<'_>) -> Result<Vec<ChangeBatch>, StoreError> {
        let _guard = self.write_lock.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        if !claim.completed.is_empty() {
            delete_completed(&mut tx, claim.completed).await?;
        }
        let mut held_through = 0;
        let mut open = Vec::new();
        let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, seqs FROM publish_batches ORDER BY id")
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        for (id, text) in rows {
            let seqs: Vec<i64> = serde_json::from_str(&text)
                .map_err(|e| StoreError::Database(format!("publish batch {id} has unreadable seqs: {e}")))?;
            held_through = held_through.max(seqs.iter().copied().max().unwrap_or(0));
            if claim.publishing_through.is_none_or(|through| id > through) {
                open.push((id, seqs));
            }
        }
        let batches = if open.is_empty() {
            // One writer at a time: seq order is commit order, and open batches hold a prefix of it.
            let limit = claim.batch_size.max(1).saturating_mul(claim.max_batches.max(1));
            let changes = pending_rows(&mut tx, held_through, limit, claim.bodies).await?;
            let mut batches = Vec::new();
            for chunk in changes.chunks(claim.batch_size.max(1)) {
                let seqs: Vec<i64> = chunk.iter().map(|c| c.seq).collect();
                let id: i64 = sqlx::query_scalar("INSERT INTO publish_batches (seqs) VALUES (?) RETURNING id")
                    .bind(json_list(&seqs)?)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(classify)?;
                batches.push(ChangeBatch { id, changes: chunk.to_vec() });
            }
            batches
        } else {
            let all: Vec<i64> = open.iter().flat_map(|(_, seqs)| seqs.iter().copied()).collect();
            let rows = sqlx::query(
                "SELECT seq, txid, resource_type, resource_id, version_id, change_type, \
                        CASE WHEN ? THEN body END AS body, recorded_at \
                 FROM resource_versions WHERE seq IN (SELECT value FROM json_each(?))",
            )
            .bind(claim.bodies)
            .bind(json_list(&all)?)
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
            let changes = rows.iter().map(pending_from_row).collect::<Result<Vec<_>, _>>()?;
            super::reassemble(open, changes)?
        };
        tx.commit().await.map_err(classify)?;
        Ok(batches)
    }

    async fn drain_changes(&self, limit: usize) -> Result<Drained, StoreError> {
        let _guard = self.write_lock.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
        sqlx::query("DELETE FROM publish_batches").execute(&mut *tx).await.map_err(classify)?;
        let (changes, last_seq): (i64, Option<i64>) = sqlx::query_as(
            "WITH drained AS (SELECT seq FROM pending_changes ORDER BY seq LIMIT ?) \
             SELECT count(*), max(seq) FROM drained",
        )
        .bind(i64::try_from(limit.max(1)).unwrap_or(i64::MAX))
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        if let Some(last) = last_seq {
            // No other writer can add a row inside this IMMEDIATE transaction: the rows up to `last` are the ones counted.
            sqlx::query("DELETE FROM pending_changes WHERE seq <= ?")
                .bind(last)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(Drained { changes: u64::try_from(changes).unwrap_or(0), last_seq })
    }

    async fn outbox_state(&self) -> Result<OutboxState, StoreError> {
        let (pending, oldest): (i64, Option<String>) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM pending_changes), \
                    (SELECT recorded_at FROM resource_versions WHERE seq = (SELECT min(seq) FROM pending_changes))",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(classify)?;
        Ok(OutboxState {
            pending: u64::try_from(pending).unwrap_or(0),
            oldest: oldest.and_then(|t| DateTime::parse_from_rfc3339(&t).ok()).map(|t| t.with_timezone(&Utc)),
        })
    }

    async fn try_lead(&self, holder: &str) -> Result<Option<Box<dyn PublisherLease>>, StoreError> {
        let mut lease = SqliteLease { store: self.clone(), holder: holder.to_owned(), renewed: None };
        Ok(if lease.renew().await? { Some(Box::new(lease)) } else { None })
    }

    async fn announce_changes(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn watch_changes(&self, _waker: Arc<Notify>) {
        // SQLite cannot tell another process's commits: the publisher's polling finds them.
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

impl SqliteTx {
    async fn answers(&mut self, message_ids: &[Uuid]) -> Result<Vec<Option<String>>, StoreError> {
        let mut out = Vec::with_capacity(message_ids.len());
        for id in message_ids {
            out.push(
                sqlx::query_scalar("SELECT response FROM inbox WHERE message_id = ?")
                    .bind(id.to_string())
                    .fetch_optional(&mut *self.tx)
                    .await
                    .map_err(classify)?,
            );
        }
        Ok(out)
    }

    async fn record_answers(&mut self, entries: &[InboxEntry<'_>]) -> Result<(), StoreError> {
        for entry in entries {
            sqlx::query("INSERT INTO inbox (message_id, message_type, response) VALUES (?, ?, ?)")
                .bind(entry.message_id.to_string())
                .bind(entry.message_type)
                .bind(entry.response)
                .execute(&mut *self.tx)
                .await
                .map_err(classify)?;
        }
        Ok(())
    }

    async fn current(&mut self, keys: &[ResourceKey]) -> Result<Vec<Option<Current>>, StoreError> {
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

    async fn used(&mut self, versions: &[(ResourceKey, String)]) -> Result<Vec<bool>, StoreError> {
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
}

#[async_trait]
impl StoreTx for SqliteTx {
    async fn read_state(
        &mut self,
        message_ids: &[Uuid],
        keys: &[ResourceKey],
        versions: &[(ResourceKey, String)],
    ) -> Result<PlanState, StoreError> {
        Ok(PlanState {
            answers: self.answers(message_ids).await?,
            current: self.current(keys).await?,
            used: self.used(versions).await?,
        })
    }

    async fn write(&mut self, writes: &[Write], answers: &[InboxEntry<'_>]) -> Result<(), StoreError> {
        self.apply(writes).await?;
        self.record_answers(answers).await
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
