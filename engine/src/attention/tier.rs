//! FASA-M's two tiers: the slow tier (a file-backed page store the kernel may page out) and the
//! fast tier's row cache (K/V rows fetched in earlier decode steps, evicted least recently used).
//!
//! FASA-M keeps only the resident FC planes and this row cache in fast memory; K rows and V rows
//! of every token live in the slow tier. Consecutive decode steps select mostly the same tokens
//! (FASA.md pitfall 3), so a step moves only the rows its selection adds.
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;

/// Which KV cache a model is loaded with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvVariant {
    /// Everything in fast memory: all K FC planes, K rows, V rows, Quest bounds.
    #[default]
    FasaC,
    /// Fast tier: the `resident_fcs` best-ranked FC planes of each KV head (recorded when a slot
    /// is taken) + a row cache of `row_cache_rows` K/V rows per (layer, KV head). Slow tier: K and
    /// V rows of every token, in a file-backed mapping under `<cache dir>/kv/`.
    FasaM { resident_fcs: usize, row_cache_rows: usize },
}

/// Page slots the slow tier's file grows by at a time.
pub const GROW_PAGES: usize = 64;

/// A growable store of fixed-size f32 pages in an unlinked file, mapped shared: nothing is left
/// on disk once it is dropped (or the process dies), and under memory pressure the kernel writes
/// pages back to the file instead of the OOM killer stepping in.
pub struct SlowTier {
    file: File,
    /// `None` while the file is empty (a zero-length mapping is an error).
    map: Option<MmapMut>,
    /// f32 per page.
    page_elems: usize,
    /// Pages the file holds.
    capacity: usize,
    /// Page slots not in use, reused before the file grows.
    free: Vec<u32>,
    grow: usize,
}

static FILE_SEQ: AtomicU64 = AtomicU64::new(0);

impl SlowTier {
    /// Creates (and immediately unlinks) a backing file in `dir`, which is created if missing.
    pub fn create(dir: &Path, page_elems: usize, grow: usize) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let name = format!("kv-{}-{}.tmp", std::process::id(), FILE_SEQ.fetch_add(1, Ordering::Relaxed));
        let path = dir.join(name);
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(Self { file, map: None, page_elems, capacity: 0, free: Vec::new(), grow: grow.max(1) })
    }

    fn page_bytes(&self) -> usize {
        self.page_elems * 4
    }

    /// Bytes of the backing file (pages in use or free).
    pub fn file_bytes(&self) -> usize {
        self.capacity * self.page_bytes()
    }

    /// Pages in use.
    pub fn pages_in_use(&self) -> usize {
        self.capacity - self.free.len()
    }

    /// Takes a page slot, growing the file by `grow` pages when none is free. Its contents are
    /// whatever was last written there (zero for a fresh file).
    pub fn alloc(&mut self) -> io::Result<u32> {
        if self.free.is_empty() {
            let cap = self.capacity + self.grow;
            self.file.set_len((cap * self.page_bytes()) as u64)?;
            // SAFETY: the file is private to this process (unlinked right after creation, the
            // handle never shared), so nothing else can truncate or resize it under the mapping.
            self.map = Some(unsafe { MmapMut::map_mut(&self.file)? });
            self.free.extend((self.capacity as u32..cap as u32).rev());
            self.capacity = cap;
        }
        Ok(self.free.pop().expect("grown above"))
    }

    /// Returns a page slot for reuse.
    pub fn release(&mut self, p: u32) {
        debug_assert!((p as usize) < self.capacity && !self.free.contains(&p));
        self.free.push(p);
    }

    pub fn page(&self, p: u32) -> &[f32] {
        let map = self.map.as_ref().expect("page of an empty tier");
        let o = p as usize * self.page_bytes();
        let bytes = &map[o..o + self.page_bytes()];
        // SAFETY: the mapping is page-aligned and `o` a multiple of 4, so the f32s are aligned;
        // any bit pattern is a valid f32; the slice borrows `self`, so no remap can happen.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), self.page_elems) }
    }

    pub fn page_mut(&mut self, p: u32) -> &mut [f32] {
        let pb = self.page_bytes();
        let n = self.page_elems;
        let map = self.map.as_mut().expect("page of an empty tier");
        let o = p as usize * pb;
        let bytes = &mut map[o..o + pb];
        // SAFETY: as in `page`, with a unique borrow.
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<f32>(), n) }
    }
}

/// Rows a `RowCache::fetch` found resident and rows it moved from the slow tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fetch {
    pub hits: usize,
    pub moved: usize,
}

/// Up to `cap` K/V rows of one (layer, KV head) in fast memory, by token; when full, the rows
/// least recently used (by fetch step) are evicted. Storage for all `cap` rows is allocated at the
/// first fetch (a decode step fills most of it at once) and freed by `clear`.
pub struct RowCache {
    d: usize,
    cap: usize,
    /// `(slots, d)` each.
    k: Vec<f32>,
    v: Vec<f32>,
    /// Token held by each slot.
    token: Vec<u32>,
    /// Fetch step each slot was last used at.
    last: Vec<u64>,
    /// Token → slot.
    map: HashMap<u32, u32>,
    /// Slots allocated but holding no token (after invalidation).
    free: Vec<u32>,
    step: u64,
}

impl RowCache {
    pub fn new(cap: usize, d: usize) -> Self {
        Self { d, cap, k: Vec::new(), v: Vec::new(), token: Vec::new(), last: Vec::new(), map: HashMap::new(), free: Vec::new(), step: 0 }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Rows currently held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes of row storage allocated (K and V, f32).
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * 4
    }

    /// Bytes `cap` rows take once allocated.
    pub fn full_bytes(cap: usize, d: usize) -> usize {
        cap * 2 * d * 4
    }

    pub fn contains(&self, t: u32) -> bool {
        self.map.contains_key(&t)
    }

    /// K row `(d,)` (FC-pair order) in `slot`.
    pub fn k(&self, slot: u32) -> &[f32] {
        &self.k[slot as usize * self.d..(slot as usize + 1) * self.d]
    }

    /// V row `(d,)` in `slot`.
    pub fn v(&self, slot: u32) -> &[f32] {
        &self.v[slot as usize * self.d..(slot as usize + 1) * self.d]
    }

    /// Makes every token of `rows` (distinct) resident and marks them used by this step; misses
    /// are copied in by `load(token, k_out, v_out)`. Returns each row's slot, in `rows` order,
    /// or `Err(cap)` when `rows` cannot fit at once.
    pub fn fetch(&mut self, rows: &[u32], mut load: impl FnMut(u32, &mut [f32], &mut [f32])) -> Result<(Vec<u32>, Fetch), usize> {
        if rows.len() > self.cap {
            return Err(self.cap);
        }
        if self.k.is_empty() {
            self.k = vec![0.0; self.cap * self.d];
            self.v = vec![0.0; self.cap * self.d];
        }
        self.step += 1;
        let step = self.step;
        let mut slots = vec![u32::MAX; rows.len()];
        let mut misses = Vec::new();
        for (i, t) in rows.iter().enumerate() {
            match self.map.get(t) {
                Some(&s) => {
                    self.last[s as usize] = step;
                    slots[i] = s;
                }
                None => misses.push(i),
            }
        }
        let st = Fetch { hits: rows.len() - misses.len(), moved: misses.len() };
        // Slots for the misses: invalidated slots first, then never-used capacity, then the
        // least recently used rows not needed by this step.
        let mut open: Vec<u32> = Vec::with_capacity(misses.len());
        while open.len() < misses.len() {
            match self.free.pop() {
                Some(s) => open.push(s),
                None => break,
            }
        }
        while open.len() < misses.len() && self.token.len() < self.cap {
            let s = self.token.len() as u32;
            self.token.push(u32::MAX);
            self.last.push(0);
            open.push(s);
        }
        let need = misses.len() - open.len();
        if need > 0 {
            let mut old: Vec<(u64, u32)> = (0..self.token.len() as u32).filter(|&s| self.token[s as usize] != u32::MAX && self.last[s as usize] < step).map(|s| (self.last[s as usize], s)).collect();
            // `rows.len() ≤ cap` guarantees enough rows not used by this step.
            old.select_nth_unstable(need - 1);
            for &(_, s) in &old[..need] {
                self.map.remove(&self.token[s as usize]);
                open.push(s);
            }
        }
        let d = self.d;
        for (&i, s) in misses.iter().zip(open) {
            let t = rows[i];
            let (k, v) = (&mut self.k[s as usize * d..(s as usize + 1) * d], &mut self.v[s as usize * d..(s as usize + 1) * d]);
            load(t, k, v);
            self.token[s as usize] = t;
            self.last[s as usize] = step;
            self.map.insert(t, s);
            slots[i] = s;
        }
        Ok((slots, st))
    }

    /// Drops rows of tokens `≥ len` (the sequence was rewound: those positions will be rewritten).
    pub fn invalidate_from(&mut self, len: usize) {
        let (token, free) = (&mut self.token, &mut self.free);
        self.map.retain(|&t, &mut s| {
            let keep = (t as usize) < len;
            if !keep {
                token[s as usize] = u32::MAX;
                free.push(s);
            }
            keep
        });
    }

    /// Forgets every row and frees the storage.
    pub fn clear(&mut self) {
        *self = Self::new(self.cap, self.d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row of token t: K all t, V all −t.
    fn load(t: u32, k: &mut [f32], v: &mut [f32]) {
        k.fill(t as f32);
        v.fill(-(t as f32));
    }

    #[test]
    fn row_cache_counts_hits_and_evicts_least_recently_used() {
        let mut rc = RowCache::new(4, 2);
        let (s, f) = rc.fetch(&[1, 2, 3], load).unwrap();
        assert_eq!(f, Fetch { hits: 0, moved: 3 });
        assert_eq!(rc.k(s[1]), &[2.0, 2.0]);
        assert_eq!(rc.v(s[2]), &[-3.0, -3.0]);
        // 2 and 3 hit; 4 fills the last free slot.
        let (_, f) = rc.fetch(&[2, 3, 4], load).unwrap();
        assert_eq!(f, Fetch { hits: 2, moved: 1 });
        assert_eq!(rc.len(), 4);
        // Full: 5 evicts 1, the least recently used (last used at step 1).
        let (s, f) = rc.fetch(&[3, 5], load).unwrap();
        assert_eq!(f, Fetch { hits: 1, moved: 1 });
        assert!(!rc.contains(1) && rc.contains(2) && rc.contains(4));
        assert_eq!(rc.k(s[1]), &[5.0, 5.0]);
        // Rows used by the current step are never evicted, even if old: 2 and 4 go, not 3/5.
        let (s, f) = rc.fetch(&[3, 5, 6, 7], load).unwrap();
        assert_eq!(f, Fetch { hits: 2, moved: 2 });
        assert!(!rc.contains(2) && !rc.contains(4));
        for (t, s) in [3u32, 5, 6, 7].iter().zip(&s) {
            assert_eq!(rc.k(*s), &[*t as f32; 2]);
            assert_eq!(rc.v(*s), &[-(*t as f32); 2]);
        }
        assert_eq!(rc.fetch(&[1, 2, 3, 4, 5], load), Err(4));
        assert_eq!(rc.bytes(), 4 * 2 * 2 * 4);
    }

    #[test]
    fn row_cache_rewind_invalidates_later_tokens() {
        let mut rc = RowCache::new(4, 1);
        rc.fetch(&[0, 5, 9], load).unwrap();
        rc.invalidate_from(5);
        assert!(rc.contains(0) && !rc.contains(5) && !rc.contains(9));
        // Token 5 was rewritten: the next fetch moves it again, reusing a freed slot.
        let mut calls = 0;
        let (_, f) = rc
            .fetch(&[0, 5], |t, k, v| {
                calls += 1;
                load(t, k, v)
            })
            .unwrap();
        assert_eq!((f, calls), (Fetch { hits: 1, moved: 1 }, 1));
        assert_eq!(rc.token.len(), 3, "freed slots are reused before unused capacity");
    }

    #[test]
    fn slow_tier_grows_reads_back_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut tier = SlowTier::create(dir.path(), 8, 2).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the backing file is unlinked at once");
        assert_eq!(tier.file_bytes(), 0);
        let pages: Vec<u32> = (0..5).map(|_| tier.alloc().unwrap()).collect();
        assert_eq!(tier.file_bytes(), 6 * 8 * 4, "grown in chunks of 2 pages");
        for &p in &pages {
            tier.page_mut(p).iter_mut().enumerate().for_each(|(i, x)| *x = (p * 100 + i as u32) as f32);
        }
        // Growing remaps the file: earlier pages keep their contents.
        for &p in &pages {
            assert_eq!(tier.page(p)[7], (p * 100 + 7) as f32);
        }
        tier.release(pages[2]);
        assert_eq!(tier.pages_in_use(), 4);
        assert_eq!(tier.alloc().unwrap(), pages[2], "a released page is reused before growing");
        assert_eq!(tier.file_bytes(), 6 * 8 * 4);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
