//! Retention on PostgreSQL: the SQLite pass of [`crate::prune`] (the same
//! rules: stored answers, then read messages with their claims and
//! outcomes, then audit rows, all older than the cutoff; never an unread
//! message, one under a live claim, or a response a kept answer points at)
//! in set-based statements, one batch of one table per step and
//! transaction. Candidate messages are locked `FOR UPDATE SKIP LOCKED`, so
//! a prune never waits on (or takes) a row a poller is completing.
//! Compacting is `VACUUM` (space reused) or, with `full`, `VACUUM FULL`
//! (space given back, tables locked while they are rewritten).

use super::{PgBridge, pg_error};
use crate::error::Result;
use crate::{CompactReport, FileSize, PruneReport, Pruner};

/// The cutoff as a timestamptz parameter expression (`$1` is its text).
const CUTOFF: &str = "($1::text::timestamp AT TIME ZONE 'UTC')";

fn messages_sql(dry: bool) -> String {
    let victims = format!(
        "SELECT m.id FROM messages m
         WHERE m.read AND m.timestamp < {CUTOFF}
           AND NOT EXISTS (SELECT 1 FROM autopoll_claims c WHERE c.message_id = m.id
                           AND c.owner IS NOT NULL AND c.lease_until_ms > autopoll_now_ms())
           AND NOT EXISTS (SELECT 1 FROM autopoll_answers a WHERE a.response_id = m.id)
         ORDER BY m.id LIMIT $2"
    );
    if dry {
        return format!(
            "WITH v AS ({victims})
             SELECT (SELECT count(*) FROM v),
                    (SELECT count(*) FROM autopoll_claims WHERE message_id IN (SELECT id FROM v)),
                    (SELECT count(*) FROM autopoll_outcomes WHERE message_id IN (SELECT id FROM v))"
        );
    }
    format!(
        "WITH v AS ({victims} FOR UPDATE OF m SKIP LOCKED),
              dc AS (DELETE FROM autopoll_claims WHERE message_id IN (SELECT id FROM v) RETURNING 1),
              dout AS (DELETE FROM autopoll_outcomes WHERE message_id IN (SELECT id FROM v) RETURNING 1),
              dm AS (DELETE FROM messages WHERE id IN (SELECT id FROM v) RETURNING 1)
         SELECT (SELECT count(*) FROM dm), (SELECT count(*) FROM dc), (SELECT count(*) FROM dout)"
    )
}

fn simple_sql(table: &str, time: &str, key: &str, dry: bool) -> String {
    let pick = format!("SELECT {key} FROM {table} WHERE {time} < {CUTOFF} ORDER BY {key} LIMIT $2");
    if dry {
        format!("SELECT count(*) FROM ({pick}) p")
    } else {
        format!(
            "WITH d AS (DELETE FROM {table} WHERE {key} IN ({pick}) RETURNING 1)
             SELECT count(*) FROM d"
        )
    }
}

impl PgBridge {
    /// One step of `pruner`'s pass; true when the pass is done.
    pub(crate) fn prune_step_pg(&mut self, pruner: &mut Pruner) -> Result<bool> {
        let dry = pruner.is_dry();
        let cutoff = pruner.cutoff_text().to_string();
        let batch = pruner.batch() as i64;
        let c = self.conn()?;
        let mut tx = c
            .transaction()
            .map_err(|e| pg_error("cannot begin a prune step", e))?;
        let (n, stage) = match pruner.stage() {
            0 => {
                // Answers whose response goes: by their own time.
                let n: i64 = tx
                    .query_one(
                        &simple_sql("autopoll_answers", "answered_at", "ctid", dry),
                        &[&cutoff, &batch],
                    )
                    .map_err(|e| pg_error("cannot prune stored answers", e))?
                    .get(0);
                pruner.report_mut().answers += n as u64;
                (n, 0)
            }
            1 => {
                let r = tx
                    .query_one(&messages_sql(dry), &[&cutoff, &batch])
                    .map_err(|e| pg_error("cannot prune read messages", e))?;
                let (m, cl, out): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
                let rep = pruner.report_mut();
                rep.messages += m as u64;
                rep.claims += cl as u64;
                rep.outcomes += out as u64;
                (m, 1)
            }
            2 => {
                let n: i64 = tx
                    .query_one(
                        &simple_sql("audit_log", "timestamp", "id", dry),
                        &[&cutoff, &batch],
                    )
                    .map_err(|e| pg_error("cannot prune the audit log", e))?
                    .get(0);
                pruner.report_mut().audit_rows += n as u64;
                (n, 2)
            }
            _ => return Ok(true),
        };
        if stage == 1 && (dry || n < batch) {
            // What stays, and why (counted once, at the end of the table).
            let r = tx
                .query_one(
                    &format!(
                        "SELECT
                           (SELECT count(*) FROM messages m JOIN autopoll_claims c ON c.message_id = m.id
                             WHERE m.read AND m.timestamp < {CUTOFF} AND c.owner IS NOT NULL
                               AND c.lease_until_ms > autopoll_now_ms()),
                           (SELECT count(*) FROM messages m WHERE m.read AND m.timestamp < {CUTOFF}
                             AND EXISTS (SELECT 1 FROM autopoll_answers a WHERE a.response_id = m.id))"
                    ),
                    &[&cutoff],
                )
                .map_err(|e| pg_error("cannot count what prune keeps", e))?;
            let rep = pruner.report_mut();
            rep.kept_live_claim = r.get::<_, i64>(0) as u64;
            rep.kept_for_repeats = r.get::<_, i64>(1) as u64;
        }
        tx.commit()
            .map_err(|e| pg_error("cannot commit a prune step", e))?;
        // A dry run counts a whole table in one look (nothing is removed,
        // so the next batch would count the same rows again).
        if dry || n < batch {
            pruner.advance();
        }
        Ok(pruner.stage() >= 3)
    }

    /// `VACUUM` the bridge's tables (`VACUUM FULL` with `full`).
    pub(crate) fn compact_pg(&mut self, full: bool) -> Result<CompactReport> {
        let verb = if full {
            "VACUUM (FULL, ANALYZE)"
        } else {
            "VACUUM (ANALYZE)"
        };
        // VACUUM runs alone (not in a transaction) and may take longer
        // than the statement timeout on a big database: lift it for this
        // statement only (the lock timeout stays).
        let restore = format!(
            "SET statement_timeout = {}",
            crate::ms(super::statement_timeout(&self.opts)).max(1)
        );
        let c = self.conn()?;
        c.batch_execute("SET statement_timeout = 0")
            .map_err(|e| pg_error("cannot lift the statement timeout", e))?;
        let r = c.batch_execute(&format!(
            "{verb} messages, audit_log, autopoll_claims, autopoll_outcomes, autopoll_answers"
        ));
        let back = c.batch_execute(&restore);
        r.map_err(|e| pg_error("cannot vacuum the bridge's tables", e))?;
        back.map_err(|e| pg_error("cannot restore the statement timeout", e))?;
        Ok(CompactReport {
            auto_vacuum: "autovacuum".into(),
            vacuum: if full { "full" } else { "plain" }.into(),
            checkpointed: true,
        })
    }

    /// The database's size (`pg_database_size`); free space inside is not
    /// known to PostgreSQL cheaply and shows as 0.
    pub(crate) fn file_size_pg(&mut self) -> Result<FileSize> {
        let n: i64 = self
            .conn()?
            .query_one("SELECT pg_database_size(current_database())", &[])
            .map_err(|e| pg_error("cannot read the database's size", e))?
            .get(0);
        Ok(FileSize {
            bytes: n.max(0) as u64,
            free_bytes: 0,
        })
    }

    /// A dry pass: what a prune would remove now.
    pub(crate) fn prune_dry_pg(&mut self, older_than: std::time::Duration) -> Result<PruneReport> {
        let mut p = Pruner::new(older_than, i64::MAX as usize / 2, true);
        while !self.prune_step_pg(&mut p)? {}
        Ok(p.report().clone())
    }
}
