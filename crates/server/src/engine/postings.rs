//! One term's posting list, compressed: (document id, count) pairs with ids
//! ascending, stored as LEB128 varints of the gap to the previous id (its
//! lowest bit saying whether a count other than 1 follows) and of that
//! count ([`encode`]). A common term's entry takes 1 byte (gap under 64,
//! the word once in its passage, as most are), a rare one's 2 to 4, against
//! 6 unpacked: on a 200 MB context this is the difference between the
//! index fitting in the size of the text and not. A search reads lists
//! front to back.
//!
//! A list is a chain of blocks of at least [`BLOCK_BYTES`] (plus at most
//! one worker's run, which is appended whole): the full ones
//! shared (`Arc`) between the versions of an index, the last one, still
//! being written, kept inline. An update copies a list's outer part (one
//! pointer a block) and only the blocks it changes: taking a file's run of
//! ids out rewrites the blocks that hold the run (found by binary search
//! on their last ids), appending writes the last one. So an edit costs a
//! few blocks per term it touches, not the whole lists of common words,
//! and the memory an edit needs on top of the old index while both are
//! held stays small whatever the size of the context. Each block's first
//! gap counts from an id of its own (`base`), so blocks decode on their own.
//!
//! An indexing worker encodes its unit's entries of each term apart
//! ([`Runs`]), so that joining them to the lists is a copy.

use std::sync::Arc;

/// A block is sealed (and shared from then on) at the first push once it
/// holds this many bytes of list (an appended run is copied whole, so a
/// block can hold one run more): small enough that copying the few a change touches is
/// cheap, big enough that the per-block cost (about 80 bytes) is 4%.
const BLOCK_BYTES: usize = 2048;

/// A run of a list's entries, encoded on its own.
#[derive(Debug, Default, Clone)]
struct Block {
    bytes: Vec<u8>,
    /// The id the first entry's gap is counted from (the one before it
    /// when it was written, or 0).
    base: u32,
    /// The first and last ids in the block.
    first: u32,
    last: u32,
    /// Entries in the block.
    len: u32,
}

impl Block {
    /// Add `doc` (greater than every id here) with count `tf`.
    fn push(&mut self, base: u32, doc: u32, tf: u16) {
        let prev = if self.len == 0 {
            self.base = base;
            self.first = doc;
            base
        } else {
            self.last
        };
        encode(&mut self.bytes, doc - prev, tf);
        self.last = doc;
        self.len += 1;
    }

    fn iter(&self) -> BlockIter<'_> {
        BlockIter {
            bytes: &self.bytes,
            at: 0,
            doc: self.base,
        }
    }

    /// This block without the ids in `ids`. Its ids ascend, so those are
    /// one stretch of entries: the bytes before and after it are copied as
    /// they are, and only the entry after it is encoded again (its gap now
    /// counts from the entry before the stretch).
    fn without(&self, ids: &std::ops::Range<u32>) -> Block {
        let mut it = self.iter();
        // Entries before the stretch: they end at byte `keep`.
        let (mut keep, mut before, mut prev) = (0usize, 0u32, self.base);
        let mut next = None;
        while let Some((d, tf)) = it.next() {
            if d >= ids.start {
                next = Some((d, tf));
                break;
            }
            (keep, before, prev) = (it.at, before + 1, d);
        }
        // The stretch, and the first entry after it.
        let mut after = None;
        let mut dropped = 0u32;
        while let Some((d, tf)) = next {
            if d >= ids.end {
                after = Some((d, tf));
                break;
            }
            dropped += 1;
            next = it.next();
        }
        if before == 0 && after.is_none() {
            return Block::default();
        }
        // The entry after, encoded again (at most 10 bytes), then the rest
        // as they are.
        let rest = &self.bytes[it.at..];
        let mut out = Block {
            bytes: Vec::with_capacity(keep + 10 + rest.len()),
            base: self.base,
            first: self.first,
            last: prev,
            len: before,
        };
        out.bytes.extend_from_slice(&self.bytes[..keep]);
        if let Some((d, tf)) = after {
            encode(&mut out.bytes, d - prev, tf);
            out.bytes.extend_from_slice(rest);
            if before == 0 {
                out.first = d;
            }
            out.last = self.last;
            out.len = self.len - dropped;
        }
        out
    }
}

/// A compressed posting list.
#[derive(Debug, Default, Clone)]
pub struct List {
    /// Full blocks, ids ascending, none empty.
    sealed: Vec<Arc<Block>>,
    /// The block being written (ids after every sealed one's).
    tail: Block,
    /// Entries in the list (the term's document frequency).
    len: u32,
    /// The last document id (the base of the next gap).
    last: u32,
}

impl PartialEq for List {
    /// Same entries (where the blocks are cut does not count).
    fn eq(&self, other: &List) -> bool {
        (self.len, self.last) == (other.len, other.last) && self.iter().eq(other.iter())
    }
}

impl Eq for List {}

fn put(out: &mut Vec<u8>, mut v: u64) {
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

fn get(bytes: &[u8], at: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    while let Some(&b) = bytes.get(*at) {
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    v
}

/// One entry: the gap to the previous id, doubled, plus one when a count
/// other than 1 follows it. Most entries are of a word once in its
/// passage, so a common term's entry is one byte.
#[inline]
fn encode(out: &mut Vec<u8>, gap: u32, tf: u16) {
    if tf == 1 && gap < 0x40 {
        out.push((gap << 1) as u8);
    } else {
        encode_long(out, gap, tf);
    }
}

/// [`encode`] past its one-byte case.
fn encode_long(out: &mut Vec<u8>, gap: u32, tf: u16) {
    let head = u64::from(gap) << 1 | u64::from(tf != 1);
    // (A count of 1 with a gap under 64 is `encode`'s one-byte case.)
    match (head < 0x80, tf) {
        (true, t) if t < 0x80 => out.extend_from_slice(&[head as u8, t as u8]),
        (_, 1) => put(out, head),
        (_, t) => {
            put(out, head);
            put(out, u64::from(t));
        }
    }
}

/// Entries of one block, in order.
struct BlockIter<'a> {
    bytes: &'a [u8],
    at: usize,
    doc: u32,
}

impl Iterator for BlockIter<'_> {
    type Item = (u32, u16);

    fn next(&mut self) -> Option<(u32, u16)> {
        if self.at >= self.bytes.len() {
            return None;
        }
        let head = get(self.bytes, &mut self.at);
        self.doc += (head >> 1) as u32;
        let tf = if head & 1 == 0 {
            1
        } else {
            get(self.bytes, &mut self.at) as u16
        };
        Some((self.doc, tf))
    }
}

/// Entries of a list, in order.
pub struct Iter<'a> {
    cur: BlockIter<'a>,
    sealed: std::slice::Iter<'a, Arc<Block>>,
    tail: Option<&'a Block>,
}

impl Iterator for Iter<'_> {
    type Item = (u32, u16);

    fn next(&mut self) -> Option<(u32, u16)> {
        loop {
            if let Some(e) = self.cur.next() {
                return Some(e);
            }
            let b: &Block = match self.sealed.next() {
                Some(b) => b,
                None => self.tail.take()?,
            };
            self.cur = b.iter();
        }
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
        let block = std::mem::size_of::<Block>() + 16;
        self.sealed
            .iter()
            .map(|b| b.bytes.len() + block)
            .sum::<usize>()
            + self.tail.bytes.len()
    }

    /// Seal the tail if it is full.
    fn seal_full(&mut self) {
        if self.tail.bytes.len() >= BLOCK_BYTES {
            let mut b = std::mem::take(&mut self.tail);
            b.bytes.shrink_to_fit();
            self.sealed.push(Arc::new(b));
        }
    }

    /// Append `doc` (greater than every id in the list) with count `tf`.
    pub fn push(&mut self, doc: u32, tf: u16) {
        debug_assert!(self.len == 0 || doc > self.last);
        self.seal_full();
        let base = if self.len == 0 { 0 } else { self.last };
        self.tail.push(base, doc, tf);
        self.last = doc;
        self.len += 1;
    }

    /// The entries, ids ascending.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            cur: BlockIter {
                bytes: &[],
                at: 0,
                doc: 0,
            },
            sealed: self.sealed.iter(),
            tail: Some(&self.tail),
        }
    }

    /// Drop the entries with ids in `ids` (the documents of one file are
    /// one run of ids). Rewrites only the blocks that hold some of them;
    /// the others stay shared.
    pub fn remove_run(&mut self, ids: std::ops::Range<u32>) {
        if ids.is_empty() {
            return;
        }
        let from = self.sealed.partition_point(|b| b.last < ids.start);
        let to = from + self.sealed[from..].partition_point(|b| b.first < ids.end);
        if from < to {
            let mut kept: Vec<Arc<Block>> = Vec::with_capacity(to - from);
            for b in &self.sealed[from..to] {
                if ids.start <= b.first && b.last < ids.end {
                    self.len -= b.len; // wholly inside: dropped unread
                    continue;
                }
                let nb = b.without(&ids);
                self.len -= b.len - nb.len;
                if nb.len > 0 {
                    kept.push(Arc::new(nb));
                }
            }
            self.sealed.splice(from..to, kept);
        }
        if self.tail.len > 0 && self.tail.last >= ids.start && self.tail.first < ids.end {
            let nb = self.tail.without(&ids);
            self.len -= self.tail.len - nb.len;
            self.tail = nb;
        }
        self.last = if self.tail.len > 0 {
            self.tail.last
        } else {
            self.sealed.last().map_or(0, |b| b.last)
        };
    }

    /// The list with every id mapped through `new_id` (monotone, so the
    /// order holds).
    pub fn remap(&self, new_id: &[u32]) -> List {
        let mut out = List::default();
        for (d, tf) in self.iter() {
            out.push(new_id[d as usize], tf);
        }
        out
    }

    /// Make room for run `i` of `runs` with nothing to spare, where
    /// appending would otherwise double the last block's buffer: for a
    /// list an update copied, which is not shrunk after.
    pub fn reserve_run(&mut self, runs: &Runs, i: usize) {
        let from = i.checked_sub(1).map_or(0, |p| runs.heads[p].bytes_end);
        // The run's encoded entries and its first entry (at most 8 bytes).
        let need = (runs.heads[i].bytes_end - from) as usize + 8;
        if self.tail.bytes.len() < BLOCK_BYTES {
            self.tail.bytes.reserve_exact(need);
        }
    }

    /// Append run `i` of `runs` (its first id greater than every id in
    /// the list): the first entry as [`List::push`] would, the rest copied
    /// as encoded onto the last block.
    pub fn append_run(&mut self, runs: &Runs, i: usize) {
        let h = &runs.heads[i];
        if h.len == 0 {
            return;
        }
        let from = i.checked_sub(1).map_or(0, |p| runs.heads[p].bytes_end);
        self.push(h.first, h.first_tf);
        self.tail
            .bytes
            .extend_from_slice(&runs.bytes[from as usize..h.bytes_end as usize]);
        self.tail.len += h.len - 1;
        self.tail.last = h.last;
        self.len += h.len - 1;
        self.last = h.last;
    }

    /// Give back spare capacity.
    pub fn shrink_to_fit(&mut self) {
        self.tail.bytes.shrink_to_fit();
        self.sealed.shrink_to_fit();
    }
}

/// One run of [`Runs`]: where it ends in the shared buffer, its first
/// entry, its last id and its number of entries.
#[derive(Debug, Clone, Copy)]
struct RunHead {
    first: u32,
    first_tf: u16,
    last: u32,
    len: u32,
    bytes_end: u32,
}

/// Runs of entries of many terms, encoded apart from their lists (by an
/// indexing worker, for the documents of its unit of work) so that
/// joining them to their lists is a copy ([`List::append_run`]): the
/// first entry of each run kept as it is (its gap is counted from the
/// list it joins), the others encoded as a list holds them.
#[derive(Debug, Default)]
pub struct Runs {
    bytes: Vec<u8>,
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
            });
            return;
        };
        let mut prev = first;
        for &(doc, tf) in &entries[1..] {
            encode(&mut self.bytes, doc - prev, tf);
            prev = doc;
        }
        self.heads.push(RunHead {
            first,
            first_tf,
            last: prev,
            len: entries.len() as u32,
            bytes_end: self.bytes.len() as u32,
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

    /// A list of `all` with the ids in `a..b` cut out, checked against
    /// `all` without them, and that model.
    fn cut(all: &[(u32, u16)], a: u32, b: u32) -> (List, Vec<(u32, u16)>) {
        let mut l = list(all);
        l.remove_run(a..b);
        let want: Vec<_> = all
            .iter()
            .copied()
            .filter(|(d, _)| !(a..b).contains(d))
            .collect();
        assert_eq!(l.iter().collect::<Vec<_>>(), want, "{a}..{b}");
        assert_eq!(l.len(), want.len(), "{a}..{b}");
        (l, want)
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
                let (mut l, want) = cut(&all, a, b);
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
    fn a_run_cut_out_of_long_stretches_of_one_byte_entries_leaves_the_rest() {
        // Mostly one-byte entries (gap under 64, count 1), now and then a
        // longer one, over many blocks; cuts at either end, inside one
        // block and across several.
        let mut all = Vec::new();
        let (mut d, mut x) = (0u32, 7u32);
        for i in 0..6000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            d += 1 + (x >> 16) % 63;
            let tf = if i % 37 == 0 { 2 } else { 1 };
            if i % 53 == 0 {
                d += 100;
            }
            all.push((d, tf));
        }
        let last = d;
        for (a, b) in [
            (0, 1),
            (0, last / 3),
            (last / 5, last / 5 + 9),
            (last / 2, last / 2 + 500),
            (last / 3, last + 1),
            (last - 40, last + 1),
            (all[1000].0, all[1008].0),
            (all[2000].0 + 1, all[2016].0 + 1),
        ] {
            let (l, want) = cut(&all, a, b);
            check_blocks(&l, &want);
        }
    }

    /// Every block decodes on its own to its part of `model`, in order,
    /// and says what it holds; no sealed block is empty.
    fn check_blocks(l: &List, model: &[(u32, u16)]) {
        let mut all = Vec::new();
        for b in l
            .sealed
            .iter()
            .map(|b| &**b)
            .chain(std::iter::once(&l.tail))
        {
            let e: Vec<_> = b.iter().collect();
            assert_eq!(e.len(), b.len as usize);
            if let (Some(f), Some(z)) = (e.first(), e.last()) {
                assert_eq!((f.0, z.0), (b.first, b.last));
                assert!(b.base <= b.first);
            }
            all.extend(e);
        }
        assert!(l.sealed.iter().all(|b| b.len > 0));
        assert_eq!(all, model);
        assert_eq!(l.len(), model.len());
        assert_eq!(l.last, model.last().map_or(0, |e| e.0));
    }

    #[test]
    fn long_lists_of_many_blocks_stay_right_through_many_cuts() {
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
        assert!(l.sealed.len() > 20, "{} blocks", l.sealed.len());
        for round in 0..300 {
            let a = (next() % u64::from(doc + 10)) as u32;
            let b = a + (next() % [3_000, 300_000][round % 2]) as u32;
            l.remove_run(a..b);
            model.retain(|(d, _)| !(a..b).contains(d));
            if round % 3 == 0 {
                doc += 1 + (next() % 50) as u32;
                l.push(doc, 7);
                model.push((doc, 7));
            }
            assert_eq!(l.len(), model.len(), "round {round}");
            if round % 25 == 0 {
                check_blocks(&l, &model);
            }
        }
        check_blocks(&l, &model);
        let fresh = {
            let mut f = List::default();
            for &(d, t) in &model {
                f.push(d, t);
            }
            f
        };
        assert_eq!(l, fresh);
    }

    /// What makes an edit cheap: a copy of a long list, cut in the middle
    /// and appended to, shares every block but the ones it changed.
    #[test]
    fn a_copy_cut_and_appended_to_shares_the_other_blocks() {
        let mut old = List::default();
        let model: Vec<(u32, u16)> = (0..100_000u32)
            .map(|d| (d * 3, 1 + (d % 5) as u16))
            .collect();
        for &(d, t) in &model {
            old.push(d, t);
        }
        let mut new = old.clone();
        new.remove_run(150_000..150_300);
        new.push(400_000, 2);
        let shared = new
            .sealed
            .iter()
            .filter(|b| old.sealed.iter().any(|o| Arc::ptr_eq(o, b)))
            .count();
        assert!(old.sealed.len() > 50, "{} blocks", old.sealed.len());
        assert!(
            new.sealed.len() - shared <= 2,
            "{shared} of {}",
            new.sealed.len()
        );
        check_blocks(&old, &model);
        let mut want: Vec<_> = model
            .iter()
            .copied()
            .filter(|(d, _)| !(150_000..150_300).contains(d))
            .collect();
        want.push((400_000, 2));
        check_blocks(&new, &want);
    }

    /// Lists joined from runs hold what lists pushed entry by entry hold,
    /// and their blocks stay right through cuts.
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
            joined.reserve_run(&runs, 2);
            joined.append_run(&runs, 1);
            joined.append_run(&runs, 2);
            for &(d, t) in &run {
                pushed.push(d, t);
            }
            model.extend_from_slice(&run);
        }
        assert_eq!(joined, pushed);
        check_blocks(&joined, &model);
        assert!(joined.sealed.len() > 20, "{} blocks", joined.sealed.len());
        for _ in 0..200 {
            let a = (next() % u64::from(doc + 10)) as u32;
            let b = a + (next() % 200_000) as u32;
            joined.remove_run(a..b);
            model.retain(|(d, _)| !(a..b).contains(d));
            check_blocks(&joined, &model);
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
