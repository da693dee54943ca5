//! One term's posting list, compressed: (document id, count) pairs with ids
//! ascending, stored as LEB128 varints of the gap to the previous id and of
//! the count. A common term's entry takes 2 bytes (gap and count both under
//! 128), a rare one's 3 or 4, against 6 unpacked: on a 200 MB context this
//! is the difference between the index fitting in the size of the text and
//! not. A search reads lists front to back; taking a file's run of ids
//! out starts from a skip point (one every [`SKIP_BYTES`] of list, about 1%
//! more memory) found by binary search, so it reads only the run and copies
//! the rest, instead of decoding the list from its start.

/// A skip point is kept about this many bytes of list apart.
const SKIP_BYTES: usize = 256;

/// A compressed posting list.
#[derive(Debug, Default, Clone)]
pub struct List {
    bytes: Vec<u8>,
    /// Entries in the list (the term's document frequency).
    len: u32,
    /// The last document id (the base of the next gap).
    last: u32,
    /// (byte offset of an entry, the id its gap is counted from), offsets
    /// and ids ascending: decoding may start at any of them.
    skips: Vec<(u32, u32)>,
    /// The offset of the last skip point (0: none), kept here so that a
    /// push does not read the skip table (a trip to memory per entry
    /// while an index is built).
    last_skip: u32,
}

impl PartialEq for List {
    /// Same entries (where the skip points fall does not count).
    fn eq(&self, other: &List) -> bool {
        (&self.bytes, self.len, self.last) == (&other.bytes, other.len, other.last)
    }
}

impl Eq for List {}

fn put(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Bytes [`put`] takes for `v`.
fn rest_gap_len(mut v: u32) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn get(bytes: &[u8], at: &mut usize) -> u32 {
    let (mut v, mut shift) = (0u32, 0);
    while let Some(&b) = bytes.get(*at) {
        *at += 1;
        v |= u32::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    v
}

/// Entries of a list, in order.
pub struct Iter<'a> {
    bytes: &'a [u8],
    at: usize,
    doc: u32,
}

impl Iterator for Iter<'_> {
    type Item = (u32, u16);

    fn next(&mut self) -> Option<(u32, u16)> {
        if self.at >= self.bytes.len() {
            return None;
        }
        self.doc += get(self.bytes, &mut self.at);
        let tf = get(self.bytes, &mut self.at) as u16;
        Some((self.doc, tf))
    }
}

impl List {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held (for memory accounting).
    pub fn byte_len(&self) -> usize {
        self.bytes.len() + self.skips.len() * 8
    }

    /// Append `doc` (greater than every id in the list) with count `tf`.
    pub fn push(&mut self, doc: u32, tf: u16) {
        debug_assert!(self.len == 0 || doc > self.last);
        let base = if self.len == 0 { 0 } else { self.last };
        let at = self.bytes.len();
        if at - self.last_skip as usize >= SKIP_BYTES {
            self.skips.push((at as u32, base));
            self.last_skip = at as u32;
        }
        let gap = doc - base;
        if gap < 0x80 && tf < 0x80 {
            // The common case: one byte each.
            self.bytes.extend_from_slice(&[gap as u8, tf as u8]);
        } else {
            put(&mut self.bytes, gap);
            put(&mut self.bytes, u32::from(tf));
        }
        self.last = doc;
        self.len += 1;
    }

    /// The entries, ids ascending.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            bytes: &self.bytes,
            at: 0,
            doc: 0,
        }
    }

    /// Drop the entries with ids in `ids` (the documents of one file are
    /// one run of ids). Reads the list up to the end of the run.
    pub fn remove_run(&mut self, ids: std::ops::Range<u32>) {
        // The last skip point before the run (its entry may be the run's first).
        let k = self.skips.partition_point(|&(_, base)| base < ids.start);
        let (mut at, mut prev) = match k.checked_sub(1) {
            Some(k) => (self.skips[k].0 as usize, self.skips[k].1),
            None => (0, 0),
        };
        let mut doc = prev; // id before the run, and the decoding base
        let mut cut_from = None;
        let mut removed = 0u32;
        while at < self.bytes.len() {
            let entry = at;
            doc += get(&self.bytes, &mut at);
            let _ = get(&self.bytes, &mut at);
            if doc < ids.start {
                prev = doc;
                continue;
            }
            if doc >= ids.end {
                let Some(from) = cut_from else {
                    return; // nothing in the run
                };
                // Re-base the first entry after the run on the id before it.
                let mut rest = Vec::with_capacity(self.bytes.len() - entry + 5);
                let base = if from == 0 { 0 } else { prev };
                put(&mut rest, doc - base);
                let gap_end = {
                    let mut a = entry;
                    let _ = get(&self.bytes, &mut a);
                    a
                };
                rest.extend_from_slice(&self.bytes[gap_end..]);
                self.bytes.truncate(from);
                self.bytes.extend_from_slice(&rest);
                self.len -= removed;
                // Skip points: those inside the run go; the one at the entry
                // after it (re-based) and those later move by the bytes cut.
                let g = rest_gap_len(doc - base);
                self.skips.retain_mut(|(o, b)| {
                    let o_us = *o as usize;
                    if o_us < from {
                        true
                    } else if o_us < entry {
                        false
                    } else {
                        if o_us == entry {
                            *o = from as u32;
                            *b = base;
                        } else {
                            *o = (o_us + g - (gap_end - from)) as u32;
                        }
                        true
                    }
                });
                self.last_skip = self.skips.last().map_or(0, |&(o, _)| o);
                return;
            }
            cut_from.get_or_insert(entry);
            removed += 1;
        }
        // The run reached the end of the list.
        if let Some(from) = cut_from {
            self.skips.retain(|&(o, _)| (o as usize) < from);
            self.last_skip = self.skips.last().map_or(0, |&(o, _)| o);
            self.bytes.truncate(from);
            self.len -= removed;
            self.last = if self.len == 0 { 0 } else { prev };
        }
    }

    /// The list with every id mapped through `new_id` (monotone, so the
    /// order holds).
    pub fn remap(&self, new_id: &[u32]) -> List {
        let mut out = List::default();
        out.bytes.reserve(self.bytes.len());
        for (d, tf) in self.iter() {
            out.push(new_id[d as usize], tf);
        }
        out
    }

    /// Append run `i` of `runs` (its first id greater than every id in
    /// the list): the first entry as [`List::push`] would, the rest copied
    /// as encoded, with the run's skip points that fall at least
    /// [`SKIP_BYTES`] after the list's last one.
    pub fn append_run(&mut self, runs: &Runs, i: usize) {
        let h = &runs.heads[i];
        if h.len == 0 {
            return;
        }
        let (bytes_from, skips_from) = match i.checked_sub(1) {
            Some(p) => (runs.heads[p].bytes_end, runs.heads[p].skips_end),
            None => (0, 0),
        };
        self.push(h.first, h.first_tf);
        let off0 = self.bytes.len();
        self.bytes
            .extend_from_slice(&runs.bytes[bytes_from as usize..h.bytes_end as usize]);
        for &(rel, base) in &runs.skips[skips_from as usize..h.skips_end as usize] {
            let at = off0 + rel as usize;
            if at - self.last_skip as usize >= SKIP_BYTES {
                self.skips.push((at as u32, base));
                self.last_skip = at as u32;
            }
        }
        self.len += h.len - 1;
        self.last = h.last;
    }

    /// Give back spare capacity.
    pub fn shrink_to_fit(&mut self) {
        self.bytes.shrink_to_fit();
        self.skips.shrink_to_fit();
    }
}

/// One run of [`Runs`]: where it ends in the shared buffers, its first
/// entry, its last id and its number of entries.
#[derive(Debug, Clone, Copy)]
struct RunHead {
    first: u32,
    first_tf: u16,
    last: u32,
    len: u32,
    bytes_end: u32,
    skips_end: u32,
}

/// Runs of entries of many terms, encoded apart from their lists (by an
/// indexing worker, for the documents of its unit of work) so that
/// joining them to their lists is a copy ([`List::append_run`]): the
/// first entry of each run kept as it is (its gap is counted from the
/// list it joins), the others encoded as a list holds them, with skip
/// points about [`SKIP_BYTES`] apart.
#[derive(Debug, Default)]
pub struct Runs {
    bytes: Vec<u8>,
    /// (offset from the start of its run's encoded entries, the id its
    /// gap is counted from).
    skips: Vec<(u32, u32)>,
    heads: Vec<RunHead>,
}

impl Runs {
    /// Entries in run `i`.
    pub fn run_len(&self, i: usize) -> usize {
        self.heads[i].len as usize
    }

    /// Add a run of `entries` (ids ascending; may be empty).
    pub fn push(&mut self, entries: &[(u32, u16)]) {
        let Some(&(first, first_tf)) = entries.first() else {
            self.heads.push(RunHead {
                first: 0,
                first_tf: 0,
                last: 0,
                len: 0,
                bytes_end: self.bytes.len() as u32,
                skips_end: self.skips.len() as u32,
            });
            return;
        };
        let start = self.bytes.len();
        let mut last_skip = 0usize;
        let mut prev = first;
        for &(doc, tf) in &entries[1..] {
            let rel = self.bytes.len() - start;
            if rel - last_skip >= SKIP_BYTES {
                self.skips.push((rel as u32, prev));
                last_skip = rel;
            }
            let gap = doc - prev;
            if gap < 0x80 && tf < 0x80 {
                self.bytes.extend_from_slice(&[gap as u8, tf as u8]);
            } else {
                put(&mut self.bytes, gap);
                put(&mut self.bytes, u32::from(tf));
            }
            prev = doc;
        }
        self.heads.push(RunHead {
            first,
            first_tf,
            last: prev,
            len: entries.len() as u32,
            bytes_end: self.bytes.len() as u32,
            skips_end: self.skips.len() as u32,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[(u32, u16)]) -> List {
        let mut l = List::default();
        for &(d, t) in entries {
            l.push(d, t);
        }
        l
    }

    #[test]
    fn entries_round_trip_and_runs_come_out_anywhere() {
        let all: Vec<(u32, u16)> = [0, 1, 5, 127, 128, 300, 16_384, 70_000, 1 << 28]
            .iter()
            .enumerate()
            .map(|(i, &d)| (d, [1, 2, 127, 128, u16::MAX][i % 5]))
            .collect();
        let l = list(&all);
        assert_eq!(l.iter().collect::<Vec<_>>(), all);
        assert_eq!(l.len(), all.len());
        assert!(l.byte_len() < all.len() * 6);
        for a in [0u32, 1, 6, 128, 200, 1 << 28, (1 << 28) + 1] {
            for b in [a, a + 1, a + 130, 70_000, 1 << 29] {
                if b < a {
                    continue;
                }
                let mut l = list(&all);
                l.remove_run(a..b);
                let want: Vec<_> = all
                    .iter()
                    .copied()
                    .filter(|(d, _)| !(a..b).contains(d))
                    .collect();
                assert_eq!(l.iter().collect::<Vec<_>>(), want, "{a}..{b}");
                assert_eq!(l.len(), want.len());
                // Appending after a removal continues from the right base.
                l.push(1 << 30, 3);
                assert_eq!(l.iter().last(), Some((1 << 30, 3)), "{a}..{b}");
                assert_eq!(
                    l,
                    list(&[want.as_slice(), &[(1 << 30, 3)]].concat()),
                    "{a}..{b}"
                );
            }
        }
    }

    #[test]
    fn long_lists_with_skip_points_stay_right_through_many_cuts() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut model: Vec<(u32, u16)> = Vec::new();
        let mut l = List::default();
        let mut doc = 0u32;
        for _ in 0..20_000 {
            doc += 1 + (next() % 300) as u32;
            let tf = 1 + (next() % 200) as u16;
            model.push((doc, tf));
            l.push(doc, tf);
        }
        assert!(l.skips.len() > 100);
        for round in 0..300 {
            let a = (next() % u64::from(doc + 10)) as u32;
            let b = a + (next() % 3_000) as u32;
            l.remove_run(a..b);
            model.retain(|(d, _)| !(a..b).contains(d));
            if round % 3 == 0 {
                doc += 1 + (next() % 50) as u32;
                l.push(doc, 7);
                model.push((doc, 7));
            }
            assert_eq!(l.len(), model.len(), "round {round}");
            if round % 25 == 0 {
                assert_eq!(l.iter().collect::<Vec<_>>(), model, "round {round}");
                assert_eq!(l.last_skip, l.skips.last().map_or(0, |s| s.0));
                // Every skip point decodes to the right entries.
                for &(o, base) in &l.skips {
                    let mut it = Iter {
                        bytes: &l.bytes,
                        at: o as usize,
                        doc: base,
                    };
                    let first = it.next().unwrap();
                    assert!(model.contains(&first), "round {round}");
                    assert!(first.0 > base || o == 0);
                }
            }
        }
        assert_eq!(l.iter().collect::<Vec<_>>(), model);
        let fresh = {
            let mut f = List::default();
            for &(d, t) in &model {
                f.push(d, t);
            }
            f
        };
        assert_eq!(l, fresh);
    }

    /// Lists joined from runs hold what lists pushed entry by entry hold,
    /// and their skip points stay right through cuts.
    #[test]
    fn runs_appended_equal_entries_pushed() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut model: Vec<(u32, u16)> = Vec::new();
        let (mut pushed, mut joined) = (List::default(), List::default());
        let mut doc = 0u32;
        for _ in 0..400 {
            let mut run = Vec::new();
            for _ in 0..(1 + next() % [1, 3, 400][(next() % 3) as usize]) {
                doc += 1 + (next() % [2, 300, 40_000][(next() % 3) as usize]) as u32;
                run.push((doc, 1 + (next() % 300) as u16));
            }
            let mut runs = Runs::default();
            runs.push(&[(1, 1)]);
            runs.push(&[]);
            runs.push(&run);
            assert_eq!((runs.run_len(1), runs.run_len(2)), (0, run.len()));
            joined.append_run(&runs, 1);
            joined.append_run(&runs, 2);
            for &(d, t) in &run {
                pushed.push(d, t);
            }
            model.extend_from_slice(&run);
        }
        assert_eq!(joined, pushed);
        assert_eq!(joined.iter().collect::<Vec<_>>(), model);
        assert!(joined.skips.len() > 50, "{} skips", joined.skips.len());
        assert!(
            joined
                .skips
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1)
        );
        for round in 0..200 {
            let a = (next() % u64::from(doc + 10)) as u32;
            let b = a + (next() % 200_000) as u32;
            joined.remove_run(a..b);
            model.retain(|(d, _)| !(a..b).contains(d));
            assert_eq!(joined.last_skip, joined.skips.last().map_or(0, |s| s.0));
            for &(o, base) in &joined.skips {
                let mut it = Iter {
                    bytes: &joined.bytes,
                    at: o as usize,
                    doc: base,
                };
                let first = it.next().unwrap();
                assert!(model.contains(&first), "round {round}");
            }
            assert_eq!(joined.iter().collect::<Vec<_>>(), model, "round {round}");
        }
    }

    #[test]
    fn remap_keeps_counts() {
        let mut map: Vec<u32> = (0..10).map(|i| i * 2).collect();
        map[3] = 7;
        let small = list(&[(1, 1), (3, 2), (9, 1)]);
        assert_eq!(
            small.remap(&map).iter().collect::<Vec<_>>(),
            vec![(2, 1), (7, 2), (18, 1)]
        );
    }
}
