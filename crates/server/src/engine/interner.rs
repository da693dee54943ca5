//! Strings numbered in the order they were first seen, kept in one text
//! buffer: the index's vocabulary. A map from boxed strings to ids costs
//! an allocation per word (32 bytes however short the word) and 24 bytes
//! a slot; here a word costs its bytes, 4 bytes of end offset and about 5
//! bytes of table slot (a `hashbrown` [`HashTable`] of ids, compared
//! against the buffer). On a 200 MB context, with a quarter of a million
//! terms, that is 15 MB less held for the engine's life.

use hashbrown::HashTable;
use std::hash::Hasher;

/// Strings numbered `0..len()` in the order pushed, one after the other
/// in one buffer.
#[derive(Default, Clone)]
pub struct Strs {
    /// Every string, one after the other.
    text: String,
    /// Per id: where its string ends in `text` (it starts where the one
    /// before it ends).
    ends: Vec<u32>,
}

impl Strs {
    /// Number of strings.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Add `s` as string number [`Strs::len`].
    pub fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(self.text.len() as u32);
    }

    /// String `id` (which must be below [`Strs::len`]).
    #[inline]
    pub fn str(&self, id: u32) -> &str {
        let i = id as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }
}

impl std::fmt::Debug for Strs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Strs")
            .field("len", &self.ends.len())
            .field("bytes", &self.text.len())
            .finish()
    }
}

/// Interned strings: ids `0..len()`, each string stored once (its
/// `Debug` shows the counts, not the strings).
#[derive(Default, Debug)]
pub struct Interner {
    strs: Strs,
    /// The ids, found by the hash of their string.
    table: Table,
}

/// The table of ids (its `Debug` shows only how many).
#[derive(Default)]
struct Table(HashTable<u32>);

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ids", self.0.len())
    }
}

fn hash(s: &str) -> u64 {
    let mut h = super::index::Fx::default();
    h.write(s.as_bytes());
    h.finish()
}

impl Interner {
    /// Number of strings.
    pub fn len(&self) -> usize {
        self.strs.len()
    }

    /// The string with id `id` (which must be below [`Interner::len`]).
    pub fn str(&self, id: u32) -> &str {
        self.strs.str(id)
    }

    /// The id of `s`, if it has one.
    pub fn get(&self, s: &str) -> Option<u32> {
        self.table
            .0
            .find(hash(s), |&id| self.strs.str(id) == s)
            .copied()
    }

    /// The id of `s`, the next one if it is new.
    pub fn intern(&mut self, s: &str) -> u32 {
        let strs = &self.strs;
        // One probe: the slot found is the one filled if `s` is new.
        let entry = self
            .table
            .0
            .entry(hash(s), |&id| strs.str(id) == s, |&id| hash(strs.str(id)));
        match entry {
            hashbrown::hash_table::Entry::Occupied(o) => *o.get(),
            hashbrown::hash_table::Entry::Vacant(v) => {
                let id = self.strs.len() as u32;
                v.insert(id);
                self.strs.push(s);
                id
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_in_order_and_each_string_once() {
        let mut t = Interner::default();
        let words = ["lease", "", "claim", "lease", "résumé", "claim", "a"];
        let ids: Vec<u32> = words.iter().map(|w| t.intern(w)).collect();
        assert_eq!(ids, vec![0, 1, 2, 0, 3, 2, 4]);
        assert_eq!(t.len(), 5);
        assert!(format!("{t:?}").len() < 80);
        for (w, id) in words.iter().zip(&ids) {
            assert_eq!(t.str(*id), *w);
            assert_eq!(t.get(w), Some(*id));
        }
        assert_eq!(t.get("leas"), None);
        assert_eq!(t.get("leases"), None);
    }

    #[test]
    fn many_strings_survive_the_table_growing() {
        let mut t = Interner::default();
        for i in 0..50_000u32 {
            assert_eq!(t.intern(&format!("w{i}")), i);
        }
        for i in (0..50_000u32).rev() {
            assert_eq!(t.get(&format!("w{i}")), Some(i));
            assert_eq!(t.str(i), format!("w{i}"));
        }
        assert_eq!(t.get("w50000"), None);
    }
}
