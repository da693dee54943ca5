//! Retention: deleting finished history older than a cutoff, in small
//! batches, so the bridge file stops growing with every question.
//!
//! What a pass removes, all older than the cutoff (`now - older_than`):
//!
//! 1. `autopoll_answers` rows whose `answered_at` is older (a repeat of such
//!    a query id is then asked again instead of answered from the store);
//! 2. messages with `read = 1` (exactly 1) whose `timestamp` is older:
//!    questions autopoll answered, dead-lettered or skipped, the responses
//!    once their asker has read them, and any other message a reader has
//!    marked read (the Python `check_messages` included), together with
//!    their `autopoll_claims` and `autopoll_outcomes` rows;
//! 3. `audit_log` rows whose `timestamp` is older.
//!
//! Never removed: an unread message (`read` other than 1, whatever its
//! age); a read message under a live claim (an owner and a lease in the
//! future: someone read it by hand while a poller works on it); a response
//! that a kept `autopoll_answers` row points at (so repeats keep their
//! answer); any row whose time cannot be read ([`clock::parse`]) or is not
//! older than the cutoff. `conversations` and `session_status` (one row per
//! conversation or session) are left alone.
//!
//! Times are compared parsed, never as text alone: a row is first preselected
//! by `timestamp < cutoff` on the text (which is exact for the canonical form
//! both writers use, and lets unusual forms such as epoch seconds or a space
//! separator through), then parsed; rows that do not parse are kept and
//! counted. A zoned time whose text sorts after the cutoff is not looked at
//! in this pass; a later pass takes it.
//!
//! A [`Pruner`] does one pass in steps. Each step reads its candidates
//! without a lock, then deletes at most `batch` of them in one short
//! `BEGIN IMMEDIATE` transaction that checks again that each message is
//! read and has no live claim, so a step never holds the write lock for
//! long and never takes a question a claimer is working on.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, Transaction, TransactionBehavior, params};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::{Bridge, clock};

/// What a prune removed (or, dry, would remove), and what it kept and why.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PruneReport {
    /// The cutoff: rows older than this were removed (naive UTC).
    pub cutoff: String,
    /// Nothing was written: the counts are what a real run would remove.
    pub dry_run: bool,
    /// Read messages removed (questions, responses, other read messages).
    pub messages: u64,
    /// `autopoll_claims` rows of those messages (expired or released).
    pub claims: u64,
    /// `autopoll_outcomes` rows of those messages.
    pub outcomes: u64,
    /// `autopoll_answers` rows removed (repeat detection for their query ids ends).
    pub answers: u64,
    /// `audit_log` rows removed.
    pub audit_rows: u64,
    /// Rows (messages, audit rows, answers) kept because their time cannot
    /// be read (of those whose text sorts before the cutoff's: the text
    /// preselection does not look at the others).
    pub kept_bad_time: u64,
    /// Old read messages kept because a live claim is on them.
    pub kept_live_claim: u64,
    /// Old responses kept because a kept `autopoll_answers` row points at them.
    pub kept_for_repeats: u64,
}

/// Run `sql` (a `DELETE ... WHERE key = ?1`) for each of `ids` in one
/// write transaction; the rows it removed.
fn delete_each(
    conn: &Connection,
    map: &dyn Fn(rusqlite::Error) -> Error,
    sql: &str,
    ids: &[i64],
) -> Result<u64> {
    let tx = immediate(conn, map)?;
    let mut n = 0;
    for id in ids {
        n += tx
            .prepare_cached(sql)
            .and_then(|mut s| s.execute([id]))
            .map_err(map)? as u64;
    }
    tx.commit().map_err(map)?;
    Ok(n)
}

impl PruneReport {
    /// Rows removed in all tables.
    pub fn total(&self) -> u64 {
        self.messages + self.claims + self.outcomes + self.answers + self.audit_rows
    }
}

#[derive(Debug)]
enum Phase {
    Answers { after: i64 },
    Messages { after: i64, keep: HashSet<i64> },
    Audit { after: i64 },
    Done,
}

/// One prune pass, done in steps ([`Bridge::prune_step`]); see the module doc.
#[derive(Debug)]
pub struct Pruner {
    cutoff: clock::Timestamp,
    cutoff_text: String,
    batch: usize,
    dry: bool,
    phase: Phase,
    /// Dry run: the answers rows a real run would have removed by now.
    dry_answers: HashSet<i64>,
    report: PruneReport,
}

/// A stored time as text for [`clock::parse`]: text, or a number (epoch seconds).
fn time_of(v: ValueRef<'_>) -> Option<clock::Timestamp> {
    let s = match v {
        ValueRef::Text(t) => std::str::from_utf8(t).ok()?.to_string(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Null | ValueRef::Blob(_) => return None,
    };
    clock::parse(&s).ok()
}

impl Pruner {
    /// A pass removing what is older than `older_than` before now, at most
    /// `batch` rows of a table per step. `dry`: count only, write nothing.
    pub fn new(older_than: Duration, batch: usize, dry: bool) -> Pruner {
        let now = clock::now();
        let cutoff = now
            .checked_sub(time::Duration::try_from(older_than).unwrap_or(time::Duration::MAX))
            .unwrap_or(clock::Timestamp::MIN);
        let cutoff_text = clock::format(cutoff);
        Pruner {
            cutoff,
            report: PruneReport {
                cutoff: cutoff_text.clone(),
                dry_run: dry,
                ..PruneReport::default()
            },
            cutoff_text,
            batch: batch.max(1),
            dry,
            phase: Phase::Answers { after: 0 },
            dry_answers: HashSet::new(),
        }
    }

    /// What the pass has removed so far.
    pub fn report(&self) -> &PruneReport {
        &self.report
    }

    /// Whether the pass is finished.
    pub fn done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// The cutoff in the bridge's text shape (naive UTC).
    pub(crate) fn cutoff_text(&self) -> &str {
        &self.cutoff_text
    }

    /// Rows per step.
    pub(crate) fn batch(&self) -> usize {
        self.batch
    }

    /// Count only.
    pub(crate) fn is_dry(&self) -> bool {
        self.dry
    }

    /// The report, for a store that prunes with its own SQL.
    pub(crate) fn report_mut(&mut self) -> &mut PruneReport {
        &mut self.report
    }

    /// For a store that prunes with its own SQL: the table the pass is at
    /// (0 answers, 1 messages, 2 audit rows, 3 done).
    pub(crate) fn stage(&self) -> u8 {
        match self.phase {
            Phase::Answers { .. } => 0,
            Phase::Messages { .. } => 1,
            Phase::Audit { .. } => 2,
            Phase::Done => 3,
        }
    }

    /// Go on to the next table.
    pub(crate) fn advance(&mut self) {
        self.phase = match self.phase {
            Phase::Answers { .. } => Phase::Messages {
                after: 0,
                keep: HashSet::new(),
            },
            Phase::Messages { .. } => Phase::Audit { after: 0 },
            Phase::Audit { .. } | Phase::Done => Phase::Done,
        };
    }

    fn older(&mut self, v: ValueRef<'_>) -> bool {
        match time_of(v) {
            Some(t) => t < self.cutoff,
            None => {
                self.report.kept_bad_time += 1;
                false
            }
        }
    }

    fn limit(&self) -> i64 {
        i64::try_from(self.batch).unwrap_or(i64::MAX)
    }

    /// The next batch of `(id, older than the cutoff)` after `after`, from
    /// `sql` (`?1` after, `?2` the cutoff's text, `?3` the batch size; it
    /// selects the id and the row's time).
    fn candidates(
        &mut self,
        conn: &Connection,
        map: &dyn Fn(rusqlite::Error) -> Error,
        sql: &str,
        after: i64,
    ) -> Result<Vec<(i64, bool)>> {
        let mut st = conn.prepare_cached(sql).map_err(map)?;
        let mut q = st
            .query(params![after, self.cutoff_text, self.limit()])
            .map_err(map)?;
        let mut out = Vec::new();
        while let Some(r) = q.next().map_err(map)? {
            let id: i64 = r.get(0).map_err(map)?;
            let old = self.older(r.get_ref(1).map_err(map)?);
            out.push((id, old));
        }
        Ok(out)
    }

    /// One step on `conn`: at most one batch of one table. Returns true when
    /// the pass is done.
    fn step(&mut self, conn: &Connection, map: &dyn Fn(rusqlite::Error) -> Error) -> Result<bool> {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Answers { after } => {
                let rows = self.candidates(
                    conn,
                    map,
                    "SELECT rowid, answered_at FROM autopoll_answers
                     WHERE rowid > ?1 AND answered_at < ?2 ORDER BY rowid LIMIT ?3",
                    after,
                )?;
                let last = rows.last().map(|r| r.0);
                let old: Vec<i64> = rows.iter().filter(|r| r.1).map(|r| r.0).collect();
                if self.dry {
                    self.report.answers += old.len() as u64;
                    self.dry_answers.extend(old);
                } else if !old.is_empty() {
                    self.report.answers += delete_each(
                        conn,
                        map,
                        "DELETE FROM autopoll_answers WHERE rowid = ?1",
                        &old,
                    )?;
                }
                self.phase = match last {
                    Some(after) if rows.len() == self.batch => Phase::Answers { after },
                    _ => Phase::Messages {
                        after: 0,
                        keep: self.kept_responses(conn, map)?,
                    },
                };
            }
            Phase::Messages { after, keep } => {
                let now_ms = clock::unix_ms();
                // (id, older, live claim)
                let rows: Vec<(i64, bool, bool)> = {
                    let mut st = conn
                        .prepare_cached(
                            "SELECT m.id, m.timestamp, EXISTS (
                                 SELECT 1 FROM autopoll_claims c WHERE c.message_id = m.id
                                 AND c.owner IS NOT NULL AND c.lease_until_ms > ?3)
                             FROM messages m
                             WHERE m.id > ?1 AND m.read = 1 AND m.timestamp < ?2
                             ORDER BY m.id LIMIT ?4",
                        )
                        .map_err(map)?;
                    let mut q = st
                        .query(params![after, self.cutoff_text, now_ms, self.limit()])
                        .map_err(map)?;
                    let mut out = Vec::new();
                    while let Some(r) = q.next().map_err(map)? {
                        let id: i64 = r.get(0).map_err(map)?;
                        let old = self.older(r.get_ref(1).map_err(map)?);
                        out.push((id, old, r.get(2).map_err(map)?));
                    }
                    out
                };
                let last = rows.last().map(|r| r.0);
                let mut gone = Vec::new();
                for &(id, old, live) in &rows {
                    if !old {
                        continue;
                    }
                    if live {
                        self.report.kept_live_claim += 1;
                    } else if keep.contains(&id) {
                        self.report.kept_for_repeats += 1;
                    } else {
                        gone.push(id);
                    }
                }
                if self.dry {
                    for id in &gone {
                        let (claims, outcomes): (u64, u64) = conn
                            .prepare_cached(
                                "SELECT (SELECT count(*) FROM autopoll_claims WHERE message_id = ?1),
                                        (SELECT count(*) FROM autopoll_outcomes WHERE message_id = ?1)",
                            )
                            .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?))))
                            .map_err(map)?;
                        self.report.messages += 1;
                        self.report.claims += claims;
                        self.report.outcomes += outcomes;
                    }
                } else if !gone.is_empty() {
                    let tx = immediate(conn, map)?;
                    for id in &gone {
                        // Checked again under the write lock: still read, no live claim.
                        let n = tx
                            .prepare_cached(
                                "DELETE FROM messages WHERE id = ?1 AND read = 1 AND NOT EXISTS (
                                     SELECT 1 FROM autopoll_claims c WHERE c.message_id = ?1
                                     AND c.owner IS NOT NULL AND c.lease_until_ms > ?2)",
                            )
                            .and_then(|mut s| s.execute(params![id, clock::unix_ms()]))
                            .map_err(map)?;
                        if n == 0 {
                            self.report.kept_live_claim += 1;
                            continue;
                        }
                        self.report.messages += 1;
                        self.report.claims += tx
                            .prepare_cached("DELETE FROM autopoll_claims WHERE message_id = ?1")
                            .and_then(|mut s| s.execute([id]))
                            .map_err(map)? as u64;
                        self.report.outcomes += tx
                            .prepare_cached("DELETE FROM autopoll_outcomes WHERE message_id = ?1")
                            .and_then(|mut s| s.execute([id]))
                            .map_err(map)? as u64;
                    }
                    tx.commit().map_err(map)?;
                }
                self.phase = match last {
                    Some(after) if rows.len() == self.batch => Phase::Messages { after, keep },
                    _ => Phase::Audit { after: 0 },
                };
            }
            Phase::Audit { after } => {
                let rows = self.candidates(
                    conn,
                    map,
                    "SELECT id, timestamp FROM audit_log
                     WHERE id > ?1 AND timestamp < ?2 ORDER BY id LIMIT ?3",
                    after,
                )?;
                let last = rows.last().map(|r| r.0);
                let old: Vec<i64> = rows.iter().filter(|r| r.1).map(|r| r.0).collect();
                if self.dry {
                    self.report.audit_rows += old.len() as u64;
                } else if !old.is_empty() {
                    self.report.audit_rows +=
                        delete_each(conn, map, "DELETE FROM audit_log WHERE id = ?1", &old)?;
                }
                self.phase = match last {
                    Some(after) if rows.len() == self.batch => Phase::Audit { after },
                    _ => Phase::Done,
                };
            }
            Phase::Done => {}
        }
        Ok(self.done())
    }

    /// Response ids that kept `autopoll_answers` rows point at.
    fn kept_responses(
        &self,
        conn: &Connection,
        map: &dyn Fn(rusqlite::Error) -> Error,
    ) -> Result<HashSet<i64>> {
        let mut st = conn
            .prepare("SELECT rowid, response_id FROM autopoll_answers")
            .map_err(map)?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .map_err(map)?;
        let mut keep = HashSet::new();
        for r in rows {
            let (rowid, response) = r.map_err(map)?;
            if !self.dry_answers.contains(&rowid) {
                keep.insert(response);
            }
        }
        Ok(keep)
    }
}

fn immediate<'c>(
    conn: &'c Connection,
    map: &dyn Fn(rusqlite::Error) -> Error,
) -> Result<Transaction<'c>> {
    Transaction::new_unchecked(conn, TransactionBehavior::Immediate).map_err(map)
}

/// How the file was compacted after a prune ([`Bridge::compact`]).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CompactReport {
    /// `PRAGMA auto_vacuum` before: `none`, `full` or `incremental`.
    pub auto_vacuum: String,
    /// What was done: `incremental` (free pages given back), `full` (a
    /// full `VACUUM`, which also switched the file to incremental mode), or
    /// `none` (free pages stay in the file and are reused by new rows).
    pub vacuum: String,
    /// Whether the WAL checkpoint completed (false: a reader kept it from finishing).
    pub checkpointed: bool,
}

fn auto_vacuum_name(n: i64) -> &'static str {
    match n {
        1 => "full",
        2 => "incremental",
        _ => "none",
    }
}

/// Bytes of the file and its `-wal`, and the free pages inside it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct FileSize {
    /// The database file plus its `-wal`, on disk.
    pub bytes: u64,
    /// Bytes of free pages inside the database (reused by new rows).
    pub free_bytes: u64,
}

impl Bridge {
    /// One step of `pruner`'s pass on this connection; true when the pass
    /// is done. Each step is one short transaction (or none).
    pub fn prune_step(&mut self, pruner: &mut Pruner) -> Result<bool> {
        let map = self.map();
        pruner.step(&self.conn, &map)
    }

    /// A whole prune pass: remove what is older than `older_than` (see the
    /// [module doc](crate::prune)), `batch` rows per transaction.
    pub fn prune(&mut self, older_than: Duration, batch: usize) -> Result<PruneReport> {
        let mut p = Pruner::new(older_than, batch, false);
        while !self.prune_step(&mut p)? {}
        Ok(p.report)
    }

    /// After a prune: checkpoint the WAL, then give free pages back to the
    /// file system: `PRAGMA incremental_vacuum` when the file is in
    /// incremental mode; otherwise, when `full`, one `VACUUM` that also
    /// switches it to incremental mode (it takes the write lock for as long
    /// as it rewrites the file); otherwise nothing.
    pub fn compact(&mut self, full: bool) -> Result<CompactReport> {
        let map = self.map();
        let mode: i64 = self
            .conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .map_err(&map)?;
        let vacuum = if mode == 2 {
            // It frees pages as it is stepped: step it to the end.
            let mut st = self
                .conn
                .prepare("PRAGMA incremental_vacuum")
                .map_err(&map)?;
            let mut rows = st.query([]).map_err(&map)?;
            while rows.next().map_err(&map)?.is_some() {}
            "incremental"
        } else if full {
            self.conn
                .execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")
                .map_err(&map)?;
            "full"
        } else {
            "none"
        };
        let checkpointed = self.checkpoint_truncate()?;
        Ok(CompactReport {
            auto_vacuum: auto_vacuum_name(mode).to_string(),
            vacuum: vacuum.to_string(),
            checkpointed,
        })
    }

    /// The file's size on disk and its free pages.
    pub fn file_size(&self) -> Result<FileSize> {
        let map = self.map();
        let (free, page): (u64, u64) = self
            .conn
            .query_row(
                "SELECT (SELECT freelist_count FROM pragma_freelist_count),
                        (SELECT page_size FROM pragma_page_size)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(&map)?;
        Ok(FileSize {
            bytes: on_disk(&self.path),
            free_bytes: free * page,
        })
    }
}

fn on_disk(path: &Path) -> u64 {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    [path.to_path_buf(), wal.into()]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// A dry run on `path`, opened read-only (nothing is written to the file):
/// what [`Bridge::prune`] with these arguments would remove now.
pub fn dry_run(path: &Path, older_than: Duration) -> Result<PruneReport> {
    let timeout_ms = crate::ms(crate::DEFAULT_BUSY_TIMEOUT);
    let map = crate::error::sql(timeout_ms);
    if !path.exists() {
        return Err(Error::NotFound {
            what: format!("bridge file {}", path.display()),
            hint: format!(
                "; create it with `autopoll bridge init --db {}`",
                crate::error::sh_quote(&path.to_string_lossy())
            ),
        });
    }
    crate::schema::refuse(
        crate::schema::inspect(path, timeout_ms)?,
        path,
        false,
        false,
    )?;
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
        | rusqlite::OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags).map_err(&map)?;
    conn.busy_timeout(crate::DEFAULT_BUSY_TIMEOUT)
        .map_err(&map)?;
    let mut p = Pruner::new(older_than, 10_000, true);
    while !p.step(&conn, &map)? {}
    Ok(p.report)
}

/// Parse a retention duration: a whole number with a unit, `30s`, `15m`,
/// `12h`, `7d`.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("{s:?} is not a duration such as 30s, 15m, 12h or 7d");
    let unit = s.chars().last().ok_or_else(bad)?;
    let n: u64 = s[..s.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
    let secs = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(secs)
        .filter(|&v| v > 0)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Fixture;
    use crate::{Answer, ClaimOptions, Claimer, Session, shard};

    const OLD: &str = "2020-01-01T00:00:00.000001";
    const HOUR: Duration = Duration::from_secs(3600);

    fn exec(f: &Fixture, sql: &str) {
        f.bridge.connection().execute_batch(sql).unwrap();
    }

    fn count(f: &Fixture, sql: &str) -> i64 {
        f.bridge
            .connection()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    }

    fn exists(f: &Fixture, id: i64) -> bool {
        count(f, &format!("SELECT count(*) FROM messages WHERE id = {id}")) == 1
    }

    /// Claim everything unread to b, answer `ids` (remembered for repeats),
    /// and let a read the responses. Returns the response ids.
    fn answer_all(f: &mut Fixture, me: &Claimer) -> Vec<(i64, i64)> {
        let conv = f.id().to_string();
        let batch = f
            .bridge
            .claim(me, &conv, Session::B, &ClaimOptions::default())
            .unwrap();
        let answers: Vec<Answer> = batch
            .claimed
            .iter()
            .map(|c| Answer {
                repeat_key: Some(format!("q-{}", c.message.id)),
                ..Answer::new(c.message.id, format!("answer to {}", c.message.id))
            })
            .collect();
        let ids = f.bridge.complete(me, &answers).unwrap();
        let tok = f.conv.session_a_token.clone();
        f.bridge.read_unread(&conv, Session::A, &tok).unwrap();
        answers
            .iter()
            .zip(ids)
            .map(|(a, r)| (a.message_id, r.unwrap()))
            .collect()
    }

    #[test]
    fn removes_old_finished_history_and_keeps_unread_live_young_and_unreadable() {
        let mut f = Fixture::new();
        let me = Claimer::new("shard").unwrap();
        let conv = f.id().to_string();
        // An old answered question with its read response.
        let q_old = f.send_a(&shard::query_text("q-old", "old?"));
        let [(_, r_old)] = answer_all(&mut f, &me)[..] else {
            panic!()
        };
        // A young one.
        let q_young = f.send_a(&shard::query_text("q-young", "young?"));
        let [(_, r_young)] = answer_all(&mut f, &me)[..] else {
            panic!()
        };
        let audit_young_from = count(&f, "SELECT max(id) FROM audit_log");
        // Old and unread; old, read by hand while a live claim is on it;
        // old-looking and read, with a time nobody can read.
        let q_unread = f.send_a("old but never read");
        let q_live = f.send_a("claimed");
        let q_bad = f.send_a("bad time");
        let claimed = f
            .bridge
            .claim(
                &me,
                &conv,
                Session::B,
                &ClaimOptions {
                    limit: 1,
                    ..ClaimOptions::default()
                },
            )
            .unwrap();
        assert_eq!(claimed.claimed[0].message.id, q_unread);
        let live = f
            .bridge
            .claim(
                &me,
                &conv,
                Session::B,
                &ClaimOptions {
                    limit: 1,
                    ..ClaimOptions::default()
                },
            )
            .unwrap();
        assert_eq!(live.claimed[0].message.id, q_live);
        // q_unread's claim expires: still unread, so still kept.
        exec(
            &f,
            &format!(
                "UPDATE autopoll_claims SET lease_until_ms = 1 WHERE message_id = {q_unread};
                 UPDATE messages SET read = 1 WHERE id IN ({q_live}, {q_bad});
                 UPDATE messages SET timestamp = '{OLD}' WHERE id IN ({q_old}, {r_old}, {q_unread}, {q_live});
                 UPDATE messages SET timestamp = '1999-99-99 garbage' WHERE id = {q_bad};
                 UPDATE autopoll_answers SET answered_at = '{OLD}' WHERE message_id = {q_old};
                 UPDATE audit_log SET timestamp = '{OLD}' WHERE id <= {audit_young_from};"
            ),
        );
        let audit_before = count(&f, "SELECT count(*) FROM audit_log");

        // A dry run writes nothing and counts what the real run removes.
        f.bridge.checkpoint_truncate().unwrap();
        let bytes = std::fs::read(f.path()).unwrap();
        let dry = dry_run(&f.path(), HOUR).unwrap();
        assert_eq!(std::fs::read(f.path()).unwrap(), bytes);

        let report = f.bridge.prune(HOUR, 2).unwrap();
        assert_eq!(
            PruneReport {
                dry_run: true,
                cutoff: dry.cutoff.clone(),
                ..report.clone()
            },
            dry
        );
        assert_eq!(report.messages, 2, "{report:?}");
        assert_eq!(report.outcomes, 1, "{report:?}");
        assert_eq!(report.answers, 1, "{report:?}");
        assert_eq!(report.claims, 0, "{report:?}");
        assert_eq!(report.kept_live_claim, 1, "{report:?}");
        assert_eq!(report.kept_bad_time, 1, "{report:?}");
        assert_eq!(report.audit_rows as i64, audit_young_from, "{report:?}");
        assert!(!exists(&f, q_old) && !exists(&f, r_old));
        for id in [q_young, r_young, q_unread, q_live, q_bad] {
            assert!(exists(&f, id), "message {id} was removed");
        }
        assert_eq!(f.bridge.outcome(q_old).unwrap(), None);
        assert!(f.bridge.outcome(q_young).unwrap().is_some());
        assert_eq!(
            count(&f, "SELECT count(*) FROM audit_log"),
            audit_before - audit_young_from
        );
        assert_eq!(
            count(
                &f,
                &format!("SELECT count(*) FROM audit_log WHERE id <= {audit_young_from}")
            ),
            0
        );
        // The expired claim on the unread question is still there.
        assert_eq!(
            count(
                &f,
                &format!("SELECT count(*) FROM autopoll_claims WHERE message_id = {q_unread}")
            ),
            1
        );

        // Once the live claim is finished (skipped: read, outcome), it goes too.
        assert_eq!(f.bridge.skip(&me, &[q_live], "test").unwrap(), 1);
        let again = f.bridge.prune(HOUR, 100).unwrap();
        assert_eq!((again.messages, again.outcomes), (1, 1), "{again:?}");
        assert!(!exists(&f, q_live));
        assert!(exists(&f, q_unread) && exists(&f, q_bad));
    }

    #[test]
    fn a_kept_answer_keeps_its_response_and_repeats_work_until_it_is_pruned() {
        let mut f = Fixture::new();
        let me = Claimer::new("shard").unwrap();
        let conv = f.id().to_string();
        f.send_a(&shard::query_text("q-1", "what?"));
        let [(q, r)] = answer_all(&mut f, &me)[..] else {
            panic!()
        };
        // The messages look old, the answer row is young.
        exec(
            &f,
            &format!("UPDATE messages SET timestamp = '{OLD}' WHERE id IN ({q}, {r})"),
        );
        let key = format!("q-{q}");
        let report = f.bridge.prune(HOUR, 100).unwrap();
        assert_eq!(
            (report.messages, report.kept_for_repeats),
            (1, 1),
            "{report:?}"
        );
        assert!(!exists(&f, q) && exists(&f, r));
        assert_eq!(
            f.bridge.earlier_answer(&conv, Session::B, &key).unwrap(),
            Some((q, format!("answer to {q}")))
        );
        // A cutoff older than the answer changes nothing about it.
        f.bridge.prune(Duration::from_secs(600), 100).unwrap();
        assert!(
            f.bridge
                .earlier_answer(&conv, Session::B, &key)
                .unwrap()
                .is_some()
        );
        // Once the answer row is old too, both go.
        exec(
            &f,
            &format!("UPDATE autopoll_answers SET answered_at = '{OLD}'"),
        );
        let report = f.bridge.prune(HOUR, 100).unwrap();
        assert_eq!((report.answers, report.messages), (1, 1), "{report:?}");
        assert_eq!(
            f.bridge.earlier_answer(&conv, Session::B, &key).unwrap(),
            None
        );
    }

    #[test]
    fn times_are_compared_parsed_not_as_text() {
        let mut f = Fixture::new();
        let ids: Vec<i64> = (0..7).map(|i| f.send_a(&format!("m{i}"))).collect();
        let young = clock::format(clock::now());
        // Old in other forms; young in a form whose text sorts before the cutoff.
        let stamps = [
            "2020-01-01 00:00:00".to_string(),
            "1577836800".to_string(),
            "2020-01-01T00:00:00Z".to_string(),
            young.replace('T', " "),
            format!("{}+00:00", &young),
            "not a time".to_string(),
            "1999-99-99 garbage".to_string(),
        ];
        for (id, t) in ids.iter().zip(&stamps) {
            exec(
                &f,
                &format!("UPDATE messages SET read = 1, timestamp = '{t}' WHERE id = {id}"),
            );
        }
        exec(&f, "DELETE FROM audit_log");
        let report = f.bridge.prune(HOUR, 100).unwrap();
        assert_eq!(report.messages, 3, "{report:?}");
        assert_eq!(report.kept_bad_time, 1, "{report:?}");
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(exists(&f, *id), i >= 3, "{:?}", stamps[i]);
        }
    }

    #[test]
    fn compact_vacuums_incrementally_or_once_fully() {
        // A new bridge is made in incremental mode.
        let mut f = Fixture::new();
        let text = "x".repeat(4000);
        for _ in 0..200 {
            f.send_a(&text);
        }
        exec(
            &f,
            &format!("UPDATE messages SET read = 1, timestamp = '{OLD}'"),
        );
        f.bridge.prune(HOUR, 50).unwrap();
        f.bridge.checkpoint_truncate().unwrap();
        let before = f.bridge.file_size().unwrap();
        assert!(before.free_bytes > 500_000, "{before:?}");
        let c = f.bridge.compact(false).unwrap();
        assert_eq!(
            (c.auto_vacuum.as_str(), c.vacuum.as_str()),
            ("incremental", "incremental")
        );
        let after = f.bridge.file_size().unwrap();
        assert_eq!(after.free_bytes, 0);
        assert!(after.bytes < before.bytes / 2, "{before:?} {after:?}");

        // A file made without it (as the Python server makes it): nothing
        // without `full`; a full VACUUM switches it to incremental mode.
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("py.db");
        let c = Connection::open(&db).unwrap();
        c.execute_batch(crate::schema::SHARED_DDL).unwrap();
        drop(c);
        let mut b = Bridge::open(&db).unwrap();
        let none = b.compact(false).unwrap();
        assert_eq!(
            (none.auto_vacuum.as_str(), none.vacuum.as_str()),
            ("none", "none")
        );
        let full = b.compact(true).unwrap();
        assert_eq!(
            (full.auto_vacuum.as_str(), full.vacuum.as_str()),
            ("none", "full")
        );
        let mode: i64 = b
            .connection()
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, 2);
        assert_eq!(b.journal_mode().unwrap(), "wal");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        for bad in [
            "",
            "7",
            "d",
            "0s",
            "-1d",
            "1.5h",
            "7w",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
