//! The PostgreSQL store.
//!
//! Writers lock the rows of their plan (`SELECT … FOR UPDATE`, in key order so that concurrent plans
//! rarely deadlock) and write `resources`; the trigger of the migration records each version and its
//! outbox row after the row lock is held, which is why `seq` follows commit order per resource. The
//! publisher's read groups rows by transaction and orders the groups by their last `seq` (see
//! docs/design.md for why this never reorders two changes of one resource).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres, Row, Transaction};
use std::sync::Arc;
use tokio::sync::Notify;
use uuid::Uuid;

use super::{
    ChangeBatch, Claim, Current, Drained, Found, InboxEntry, Lookup, NewVersion, OutboxState, PendingChange, PlanState,
    PublisherLease, ResourceKey, Store, StoreError, StoreTx, Write, change_type, classify,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// A PostgreSQL-backed store.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// The publisher's own connections, so that its reads and claims never queue behind the bridge's
    /// transactions for a connection of the main pool.
    publisher_pool: PgPool,
    /// Outbox rows deleted since the publisher last vacuumed the outbox.
    deleted_since_vacuum: Arc<std::sync::atomic::AtomicU64>,
}

/// A pooled connection unused for this long is pinged before it is handed out.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

impl PostgresStore {
    /// Connects and runs the migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| StoreError::InvalidUrl(e.to_string()))?;
        // Marks the bridge's own writes: the change trigger skips NOTIFY for them (migration 0003).
        let options = options.options([("fhir_pubsub.writer", "bridge")]);
        // Writes need one connection at a time (one group commits at a time); the rest serve
        // retrieves. Few, because each connection keeps a buffer as large as the largest statement
        // it carried, and idle connections are used in turn.
        // A connection is checked with a ping only after a second unused: one that was in use a
        // moment ago is very likely alive, and under load a ping before every transaction is one
        // more round trip to a busy server on the path every command waits on. One that died
        // anyway (a server restart) fails its transaction as unavailable, and the commands in it
        // are delivered again.
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_AFTER_IDLE {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options.clone())
            .await
            .map_err(classify)?;
        MIGRATOR.run(&pool).await.map_err(|e| StoreError::Migration(e.to_string()))?;
        // The publisher's own bookkeeping commits without waiting for the WAL flush: its commits are visible
        // at once and survive any crash of ours, and only a crash of the database server within the flush
        // delay (`wal_writer_delay`, 200 ms by default) could undo one. Undoing a completion republishes a
        // batch (same messageId); undoing a claim lets the batch be cut again (a repeat under another
        // messageId). No change is ever lost either way, and the publisher never waits on fsyncs.
        let publisher_options = options.options([("synchronous_commit", "off")]);
        let publisher_pool = PgPoolOptions::new()
            .max_connections(3)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(publisher_options);
        Ok(PostgresStore { pool, publisher_pool, deleted_since_vacuum: Arc::default() })
    }

    /// The outbox is small but churns: every change is inserted and deleted once. Autovacuum visits at
    /// most once a minute, and meanwhile the publisher's reads would wade through dead rows; so the
    /// publisher vacuums its own tables as it goes (a cheap, non-blocking pass, off the publishing path).
    fn outbox_rows_deleted(&self, count: usize) {
        let deleted = self.deleted_since_vacuum.fetch_add(count as u64, std::sync::atomic::Ordering::Relaxed);
        if deleted + count as u64 >= OUTBOX_VACUUM_AFTER {
            self.deleted_since_vacuum.store(0, std::sync::atomic::Ordering::Relaxed);
            let pool = self.publisher_pool.clone();
            tokio::spawn(async move {
                if let Err(e) =
                    sqlx::query("VACUUM (SKIP_LOCKED) pending_changes, publish_batches").execute(&pool).await
                {
                    tracing::debug!(error = %e, "vacuuming the outbox failed; autovacuum will do it");
                }
            });
        }
    }

    /// The connection pool (tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// The channel the change trigger notifies at commit.
const CHANGES_CHANNEL: &str = "fhir_pubsub_changes";

/// Outbox rows deleted between two vacuums of the outbox by the publisher.
const OUTBOX_VACUUM_AFTER: u64 = 5_000;

/// The advisory lock key of the publisher's leadership ("fhirpubs" in ASCII).
const PUBLISHER_LOCK_KEY: i64 = 0x6668_6972_7075_6273;

/// Up to `limit` outbox rows in publishing order: each transaction's rows together, the groups ordered by
/// their last `seq`. The window runs over the outbox alone (it carries the txid), which stays small while the
/// publisher keeps up; only the rows returned are read from the version log.
async fn pending_rows(conn: &mut PgConnection, limit: usize) -> Result<Vec<PendingChange>, StoreError> {
    let rows = sqlx::query(
        "SELECT v.seq, v.txid::text::bigint AS txid, v.resource_type, v.resource_id, v.version_id, \
                v.change_type, v.body, v.recorded_at \
         FROM (SELECT seq, max(seq) OVER (PARTITION BY txid) AS group_end FROM pending_changes \
               ORDER BY group_end, seq LIMIT $1) o \
         JOIN resource_versions v ON v.seq = o.seq \
         ORDER BY o.group_end, o.seq",
    )
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(conn)
    .await
    .map_err(classify)?;
    rows.iter().map(pending_from_row).collect()
}

/// The publisher's leadership: held as long as this connection lives.
struct PgLease {
    conn: PgConnection,
}

#[async_trait]
impl PublisherLease for PgLease {
    async fn confirm(&mut self) -> Result<bool, StoreError> {
        match tokio::time::timeout(Duration::from_secs(5), sqlx::query("SELECT 1").execute(&mut self.conn)).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) => Err(classify(e)),
            Err(_) => Err(StoreError::Unavailable("the leadership connection did not answer within 5 s".into())),
        }
    }

    async fn release(self: Box<Self>) {
        let _ = self.conn.close().await;
    }
}

fn pending_from_row(row: &sqlx::postgres::PgRow) -> Result<PendingChange, StoreError> {
    let kind: String = row.try_get("change_type").map_err(classify)?;
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
        recorded_at: row.try_get::<DateTime<Utc>, _>("recorded_at").map_err(classify)?,
    })
}

#[async_trait]
impl Store for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn begin(&self) -> Result<Box<dyn StoreTx>, StoreError> {
        let tx = self.pool.begin().await.map_err(classify)?;
        Ok(Box::new(PgTx { tx }))
    }

    async fn inbox_response(&self, message_id: Uuid) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT response FROM inbox WHERE message_id = $1")
            .bind(message_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)
    }

    async fn read(&self, lookups: &[Lookup]) -> Result<Vec<Found>, StoreError> {
        let mut out = Vec::with_capacity(lookups.len());
        let mut conn = self.pool.acquire().await.map_err(classify)?;
        for lookup in lookups {
            let body: Option<String> = match &lookup.version_id {
                None => sqlx::query_scalar("SELECT body FROM resources WHERE resource_type = $1 AND resource_id = $2")
                    .bind(&lookup.key.resource_type)
                    .bind(&lookup.key.resource_id)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(classify)?,
                Some(version) => sqlx::query_scalar(
                    "SELECT body FROM resource_versions WHERE resource_type = $1 AND resource_id = $2 \
                     AND version_id = $3 AND change_type <> 'delete'",
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
                        "SELECT EXISTS (SELECT 1 FROM resource_versions WHERE resource_type = $1 AND resource_id = $2)",
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
        let mut conn = self.publisher_pool.acquire().await.map_err(classify)?;
        pending_rows(&mut conn, limit).await
    }

    async fn claim_batches(&self, claim: Claim<'_>) -> Result<Vec<ChangeBatch>, StoreError> {
        let (completed_ids, completed_seqs) = ChangeBatch::ids_and_seqs(claim.completed);
        let rows = sqlx::query("SELECT * FROM fhir_pubsub_claim_batches($1, $2, $3, $4, $5, $6)")
            .bind(&completed_ids)
            .bind(&completed_seqs)
            .bind(claim.publishing_through.unwrap_or(0))
            .bind(i32::try_from(claim.batch_size.max(1)).unwrap_or(i32::MAX))
            .bind(i32::try_from(claim.max_batches.max(1)).unwrap_or(i32::MAX))
            .bind(claim.bodies)
            .fetch_all(&self.publisher_pool)
            .await
            .map_err(classify)?;
        let mut batches: Vec<ChangeBatch> = Vec::new();
        for row in &rows {
            let id: i64 = row.try_get("batch_id").map_err(classify)?;
            if row.try_get::<Option<String>, _>("change_type").map_err(classify)?.is_none() {
                let seq: i64 = row.try_get("seq").map_err(classify)?;
                return Err(StoreError::Database(format!(
                    "publish batch {id} names change {seq}, which is not in the log"
                )));
            }
            let change = pending_from_row(row)?;
            match batches.last_mut() {
                Some(batch) if batch.id == id => batch.changes.push(change),
                _ => batches.push(ChangeBatch { id, changes: vec![change] }),
            }
        }
        self.outbox_rows_deleted(completed_seqs.len());
        Ok(batches)
    }

    async fn drain_changes(&self, limit: usize) -> Result<Drained, StoreError> {
        // One statement, one transaction: the open batches go with the rows (a batch holding a drained row
        // could never be completed). The rows go by a range of the primary key, up to the `limit`-th
        // visible one, whatever the planner believes of the table's size; a row committed after the
        // statement's snapshot, even below that bound, is left for the next call.
        let (changes, last_seq): (i64, Option<i64>) = sqlx::query_as(
            "WITH batches AS (DELETE FROM publish_batches), \
                  drained AS (DELETE FROM pending_changes \
                              WHERE seq <= (SELECT max(seq) FROM (SELECT seq FROM pending_changes \
                                                                  ORDER BY seq LIMIT $1) first) \
                              RETURNING seq) \
             SELECT count(*), max(seq) FROM drained",
        )
        .bind(i64::try_from(limit.max(1)).unwrap_or(i64::MAX))
        .fetch_one(&self.publisher_pool)
        .await
        .map_err(classify)?;
        let changes = u64::try_from(changes).unwrap_or(0);
        self.outbox_rows_deleted(changes as usize);
        Ok(Drained { changes, last_seq })
    }

    async fn outbox_state(&self) -> Result<OutboxState, StoreError> {
        let (pending, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM pending_changes), \
                    (SELECT recorded_at FROM resource_versions WHERE seq = (SELECT min(seq) FROM pending_changes))",
        )
        .fetch_one(&self.publisher_pool)
        .await
        .map_err(classify)?;
        Ok(OutboxState { pending: u64::try_from(pending).unwrap_or(0), oldest })
    }

    async fn try_lead(&self, _holder: &str) -> Result<Option<Box<dyn PublisherLease>>, StoreError> {
        // A session lock on a connection of its own: PostgreSQL releases it when that connection ends,
        // so a killed leader hands over at once.
        let mut conn = self.publisher_pool.acquire().await.map_err(classify)?.detach();
        let led: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(PUBLISHER_LOCK_KEY)
            .fetch_one(&mut conn)
            .await
            .map_err(classify)?;
        if led {
            Ok(Some(Box::new(PgLease { conn })))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    async fn announce_changes(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANGES_CHANNEL)
            .execute(&self.publisher_pool)
            .await
            .map_err(classify)?;
        Ok(())
    }

    fn watch_changes(&self, waker: Arc<Notify>) {
        let pool = self.publisher_pool.clone();
        tokio::spawn(async move {
            while !pool.is_closed() {
                if let Ok(mut listener) = PgListener::connect_with(&pool).await
                    && listener.listen(CHANGES_CHANNEL).await.is_ok()
                {
                    // Anything committed while we were not listening is found by this first look.
                    waker.notify_one();
                    // `Ok(None)`: the connection was lost and is re-established on the next call;
                    // notifications may have been missed, so look anyway.
                    while listener.try_recv().await.is_ok() {
                        waker.notify_one();
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn version_log(&self) -> Result<Vec<PendingChange>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, txid::text::bigint AS txid, resource_type, resource_id, version_id, change_type, body, recorded_at \
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
        self.publisher_pool.close().await;
        self.pool.close().await;
    }
}

/// A PostgreSQL write transaction.
struct PgTx {
    tx: Transaction<'static, Postgres>,
}

#[async_trait]
impl StoreTx for PgTx {
    async fn read_state(
        &mut self,
        message_ids: &[Uuid],
        keys: &[ResourceKey],
        versions: &[(ResourceKey, String)],
    ) -> Result<PlanState, StoreError> {
        // One statement, one round trip. `part` says which question a row answers, `ord` for which
        // item (1-based).
        // Each part probes its table once per item through a LATERAL subquery that the planner
        // cannot flatten (OFFSET 0): always an index lookup, whatever the statistics say (a join
        // with the unnested arrays may otherwise be planned as a scan of a whole table, and the
        // inbox and the version log only grow). Rows are locked in key order, so that concurrent
        // plans rarely deadlock.
        const READ_STATE: &str = "WITH answered AS ( \
                 SELECT k.ord, a.response FROM unnest($1::uuid[]) WITH ORDINALITY AS k(id, ord) \
                 CROSS JOIN LATERAL (SELECT response FROM inbox WHERE message_id = k.id OFFSET 0) a), \
             locked AS MATERIALIZED ( \
                 SELECT k.ord, r.version_id, r.body \
                 FROM (SELECT * FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS u(t, i, ord) ORDER BY t, i) k \
                 CROSS JOIN LATERAL (SELECT version_id, body FROM resources \
                                     WHERE resource_type = k.t AND resource_id = k.i FOR UPDATE OFFSET 0) r), \
             used AS ( \
                 SELECT k.ord FROM unnest($4::text[], $5::text[], $6::text[]) WITH ORDINALITY AS k(t, i, v, ord) \
                 CROSS JOIN LATERAL (SELECT 1 FROM resource_versions WHERE resource_type = k.t AND resource_id = k.i \
                                     AND version_id = k.v AND change_type <> 'delete' LIMIT 1 OFFSET 0) u) \
             SELECT 0 AS part, ord, response AS version_id, NULL::text AS body FROM answered \
             UNION ALL SELECT 1, ord, version_id, body FROM locked \
             UNION ALL SELECT 2, ord, NULL, NULL FROM used";
        let mut state = PlanState {
            answers: vec![None; message_ids.len()],
            current: vec![None; keys.len()],
            used: vec![false; versions.len()],
        };
        if message_ids.is_empty() && keys.is_empty() && versions.is_empty() {
            return Ok(state);
        }
        let rows: Vec<(i32, i64, Option<String>, Option<String>)> = sqlx::query_as(READ_STATE)
            .bind(message_ids)
            .bind(keys.iter().map(|k| k.resource_type.as_str()).collect::<Vec<_>>())
            .bind(keys.iter().map(|k| k.resource_id.as_str()).collect::<Vec<_>>())
            .bind(versions.iter().map(|(k, _)| k.resource_type.as_str()).collect::<Vec<_>>())
            .bind(versions.iter().map(|(k, _)| k.resource_id.as_str()).collect::<Vec<_>>())
            .bind(versions.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>())
            .fetch_all(&mut *self.tx)
            .await
            .map_err(classify)?;
        for (part, ord, first, second) in rows {
            let Ok(index) = usize::try_from(ord - 1) else { continue };
            match part {
                0 => {
                    if let Some(slot) = state.answers.get_mut(index) {
                        *slot = first;
                    }
                }
                1 => {
                    if let (Some(slot), Some(version_id), Some(body)) = (state.current.get_mut(index), first, second) {
                        *slot = Some(Current { version_id, body });
                    }
                }
                _ => {
                    if let Some(slot) = state.used.get_mut(index) {
                        *slot = true;
                    }
                }
            }
        }
        Ok(state)
    }

    async fn write(&mut self, writes: &[Write], answers: &[InboxEntry<'_>]) -> Result<(), StoreError> {
        // Consecutive writes of one kind go in one statement; ORDER BY ord makes the triggers see
        // them in plan order. Updates go through INSERT … ON CONFLICT because that, unlike
        // UPDATE … FROM, processes rows in the order given; their rows are locked by this
        // transaction, so the conflict path is always taken. The answers ride with the last
        // statement (a statement of their own when nothing is written).
        // A statement carries at most this many bytes of resources (at least one resource): each
        // pooled connection keeps a send buffer as large as the largest statement it sent.
        const STATEMENT_TEXT: usize = 256 * 1024;
        // The statements share their text; `concat!` takes only literals, hence the macros.
        macro_rules! insert_versions {
            () => {
                "INSERT INTO resources (resource_type, resource_id, version_id, last_updated, body) \
                 SELECT t, i, v, l, b FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
                      WITH ORDINALITY AS u(t, i, v, l, b, ord) ORDER BY ord"
            };
        }
        macro_rules! or_update {
            () => {
                " ON CONFLICT (resource_type, resource_id) DO UPDATE SET \
                 version_id = EXCLUDED.version_id, last_updated = EXCLUDED.last_updated, body = EXCLUDED.body"
            };
        }
        macro_rules! with_answers {
            () => {
                "WITH answers AS (INSERT INTO inbox (message_id, message_type, response) \
                 SELECT * FROM unnest($6::uuid[], $7::text[], $8::text[])) "
            };
        }
        const INSERT: &str = insert_versions!();
        const UPDATE: &str = concat!(insert_versions!(), or_update!());
        const INSERT_WITH_ANSWERS: &str = concat!(with_answers!(), insert_versions!());
        const UPDATE_WITH_ANSWERS: &str = concat!(with_answers!(), insert_versions!(), or_update!());
        const DELETE: &str = "DELETE FROM resources WHERE resource_type = $1 AND resource_id = $2";
        const ANSWERS: &str = "INSERT INTO inbox (message_id, message_type, response) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])";
        let answer_ids: Vec<Uuid> = answers.iter().map(|a| a.message_id).collect();
        let answer_types: Vec<&str> = answers.iter().map(|a| a.message_type).collect();
        let answer_texts: Vec<&str> = answers.iter().map(|a| a.response).collect();
        let mut answered = answers.is_empty();
        let mut i = 0;
        while i < writes.len() {
            if let Write::Delete(key) = &writes[i] {
                sqlx::query(DELETE)
                    .bind(&key.resource_type)
                    .bind(&key.resource_id)
                    .execute(&mut *self.tx)
                    .await
                    .map_err(classify)?;
                i += 1;
                continue;
            }
            // The run of inserts or updates that starts here, up to STATEMENT_TEXT bytes of resources.
            let insert = matches!(writes[i], Write::Insert(_));
            let mut text = 0;
            let run: Vec<&NewVersion> = writes[i..]
                .iter()
                .map_while(|w| match (w, insert) {
                    (Write::Insert(v), true) | (Write::Update(v), false) => Some(v),
                    _ => None,
                })
                .take_while(|v| {
                    let first = text == 0;
                    text += v.body.len().max(1);
                    first || text <= STATEMENT_TEXT
                })
                .collect();
            i += run.len();
            let with_answers = !answered && i == writes.len();
            let sql = match (insert, with_answers) {
                (true, false) => INSERT,
                (false, false) => UPDATE,
                (true, true) => INSERT_WITH_ANSWERS,
                (false, true) => UPDATE_WITH_ANSWERS,
            };
            let column = |f: fn(&NewVersion) -> &str| run.iter().map(|v| f(v)).collect::<Vec<&str>>();
            let mut query = sqlx::query(sql)
                .bind(column(|v| &v.key.resource_type))
                .bind(column(|v| &v.key.resource_id))
                .bind(column(|v| &v.version_id))
                .bind(column(|v| &v.last_updated))
                .bind(column(|v| &v.body));
            if with_answers {
                query = query.bind(&answer_ids).bind(&answer_types).bind(&answer_texts);
                answered = true;
            }
            query.execute(&mut *self.tx).await.map_err(classify)?;
        }
        if !answered {
            sqlx::query(ANSWERS)
                .bind(&answer_ids)
                .bind(&answer_types)
                .bind(&answer_texts)
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
