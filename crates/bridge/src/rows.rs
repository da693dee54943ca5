//! Multi-row statements: one `INSERT .. VALUES (..), (..)` for many rows
//! instead of one statement per row, for the set-based writes of a group
//! of answers (`Bridge::complete`).
//!
//! A statement's text depends on its number of rows, and every text is a
//! prepared statement of its own in the connection's cache. So rows go in
//! chunks of a few fixed sizes ([`CHUNKS`]): any group is at most a handful
//! of statements, and a connection keeps at most `CHUNKS.len()` statements
//! per kind of row.

use std::ops::Range;
use std::sync::OnceLock;

use rusqlite::{Connection, ToSql};

/// The row counts multi-row statements are built for, largest first. A
/// group of up to 63 rows takes at most one statement of each size; the
/// poller's usual group (half of `--concurrency 64`) takes one.
pub(crate) const CHUNKS: [usize; 6] = [32, 16, 8, 4, 2, 1];

/// The ranges of `0..n` that [`CHUNKS`] cut it into, in order, each with
/// its index in [`CHUNKS`].
pub(crate) fn chunks(n: usize) -> impl Iterator<Item = (usize, Range<usize>)> {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= n {
            return None;
        }
        let left = n - start;
        let i = CHUNKS.iter().position(|&c| c <= left)?;
        let r = start..start + CHUNKS[i];
        start = r.end;
        Some((i, r))
    })
}

/// One kind of multi-row statement: `{head} VALUES (row), (row) .. {tail}`,
/// where `row` is the text of one row's values (with `?` for each
/// parameter). The texts for the sizes of [`CHUNKS`] are built once.
pub(crate) struct MultiRow {
    head: &'static str,
    row: &'static str,
    tail: &'static str,
    texts: OnceLock<Vec<String>>,
}

impl MultiRow {
    /// A statement kind (for a `static`).
    pub(crate) const fn new(head: &'static str, row: &'static str, tail: &'static str) -> Self {
        MultiRow {
            head,
            row,
            tail,
            texts: OnceLock::new(),
        }
    }

    /// The text for `CHUNKS[size]` rows.
    pub(crate) fn sql(&self, size: usize) -> &str {
        &self.texts.get_or_init(|| {
            CHUNKS
                .iter()
                .map(|&n| {
                    let rows = vec![self.row; n].join(", ");
                    format!("{} VALUES {rows} {}", self.head, self.tail)
                })
                .collect()
        })[size]
    }

    /// Run the statement over `rows` (each a row's parameters, in the
    /// order of `row`), a chunk at a time. Returns the rows changed.
    pub(crate) fn execute(
        &self,
        conn: &Connection,
        rows: &[Vec<&dyn ToSql>],
    ) -> rusqlite::Result<usize> {
        let mut n = 0;
        for (size, r) in chunks(rows.len()) {
            let params: Vec<&dyn ToSql> = rows[r].iter().flatten().copied().collect();
            n += conn
                .prepare_cached(self.sql(size))?
                .execute(params.as_slice())?;
        }
        Ok(n)
    }

    /// Run the statement over `rows` a chunk at a time, collecting the first
    /// column of its `RETURNING` clause, per chunk in increasing order (for
    /// new row ids: the order the rows were inserted in, which is the
    /// order of `rows`).
    pub(crate) fn returning_ids(
        &self,
        conn: &Connection,
        rows: &[Vec<&dyn ToSql>],
    ) -> rusqlite::Result<Vec<i64>> {
        let mut out = Vec::with_capacity(rows.len());
        for (size, r) in chunks(rows.len()) {
            let params: Vec<&dyn ToSql> = rows[r.clone()].iter().flatten().copied().collect();
            let mut stmt = conn.prepare_cached(self.sql(size))?;
            let mut ids: Vec<i64> = stmt
                .query_map(params.as_slice(), |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            if ids.len() != r.len() {
                return Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_INTERNAL),
                    Some(format!(
                        "a multi-row insert of {} rows returned {} ids",
                        r.len(),
                        ids.len()
                    )),
                ));
            }
            ids.sort_unstable();
            out.extend(ids);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_row_once_in_order_with_few_statements() {
        for n in 0..200 {
            let got: Vec<(usize, Range<usize>)> = chunks(n).collect();
            let mut next = 0;
            for (i, r) in &got {
                assert_eq!(r.start, next);
                assert_eq!(r.len(), CHUNKS[*i]);
                next = r.end;
            }
            assert_eq!(next, n);
            if n < 64 {
                assert!(got.len() <= CHUNKS.len(), "{n}: {got:?}");
            }
        }
        assert_eq!(chunks(32).count(), 1);
        assert_eq!(chunks(64).count(), 2);
    }

    #[test]
    fn a_multi_row_insert_returns_the_new_ids_in_row_order() {
        static INS: MultiRow = MultiRow::new("INSERT INTO t (v)", "(?)", "RETURNING id");
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)")
            .unwrap();
        assert_eq!(INS.sql(5), "INSERT INTO t (v) VALUES (?) RETURNING id");
        assert_eq!(INS.sql(4), "INSERT INTO t (v) VALUES (?), (?) RETURNING id");
        let vals: Vec<String> = (0..45).map(|i| format!("v{i}")).collect();
        let rows: Vec<Vec<&dyn ToSql>> = vals.iter().map(|v| vec![v as &dyn ToSql]).collect();
        let ids = INS.returning_ids(&conn, &rows).unwrap();
        assert_eq!(ids.len(), 45);
        for (id, v) in ids.iter().zip(&vals) {
            let got: String = conn
                .query_row("SELECT v FROM t WHERE id = ?1", [id], |r| r.get(0))
                .unwrap();
            assert_eq!(&got, v);
        }
    }
}
