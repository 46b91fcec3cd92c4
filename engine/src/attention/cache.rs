//! The KV cache pool: one slot per live sequence, pages of `PAGE` tokens per (layer, KV head).
//!
//! K pages are `(n_fc, PAGE, 2)` (FC planes, rotated K), V pages `(PAGE, d)`; see
//! `fasa_kernels::cpu` for why. Pages are allocated as a sequence grows and freed with its slot,
//! so memory follows the tokens actually cached, not the context limit.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fasa_kernels::cpu::HeadView;

use super::calib::CaRecorder;
use super::config::{AttnConfig, QUEST_PAGE};
use super::profile::Profile;
use super::stats::AttnStats;

/// Tokens per page.
pub const PAGE: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl CacheShape {
    pub fn n_fc(&self) -> usize {
        self.head_dim / 2
    }
    /// f32 elements of one page: K planes, K rows, V rows and Quest bounds.
    fn page_elems(&self) -> usize {
        3 * PAGE * self.head_dim + PAGE / QUEST_PAGE * 2 * self.head_dim
    }
    /// Bytes one cached token costs over all layers and heads: K planes, K rows, V (f32) and
    /// its share of the Quest bounds.
    pub fn bytes_per_token(&self) -> usize {
        self.n_layers * self.n_kv_heads * self.page_elems() * 4 / PAGE
    }
}

#[derive(Default)]
struct HeadPages {
    k: Vec<Box<[f32]>>,
    /// K rows `(PAGE, d)` in FC-pair order, for focused and dense attention.
    kr: Vec<Box<[f32]>>,
    v: Vec<Box<[f32]>>,
    /// Quest bounds per page: `(PAGE/16, 2, d)`, elementwise min then max of rotated K in FC-pair
    /// order, over each 16-token Quest page.
    bounds: Vec<Box<[f32]>>,
}

/// Per-sequence attention settings and counters, read and updated by the operator.
#[derive(Default)]
pub struct SlotState {
    pub config: AttnConfig,
    pub stats: AttnStats,
    /// Also compute recall vs the oracle and attention mass kept (costs a dense pass).
    pub measure: bool,
    /// Records contextual agreement at every decode step (calibration).
    pub recorder: Option<CaRecorder>,
}

fn slices(v: &[Box<[f32]>]) -> Vec<&[f32]> {
    v.iter().map(|p| &p[..]).collect()
}

/// Page slices of one (layer, KV head); `view()` borrows them as a kernel `HeadView`.
pub struct Pages<'a> {
    k: Vec<&'a [f32]>,
    kr: Vec<&'a [f32]>,
    v: Vec<&'a [f32]>,
    len: usize,
    n_fc: usize,
}

impl Pages<'_> {
    pub fn view(&self) -> HeadView<'_> {
        HeadView { k_pages: &self.k, kr_pages: &self.kr, v_pages: &self.v, page: PAGE, n_fc: self.n_fc, len: self.len }
    }
}

/// The cache of one sequence.
pub struct SeqCache {
    shape: CacheShape,
    /// Tokens cached, per layer (layers are appended one after the other within a run).
    lens: Vec<usize>,
    /// `(layer, kv_head)` flattened.
    heads: Vec<HeadPages>,
    pub state: SlotState,
}

impl SeqCache {
    fn new(shape: CacheShape) -> Self {
        let heads = (0..shape.n_layers * shape.n_kv_heads).map(|_| HeadPages::default()).collect();
        Self { shape, lens: vec![0; shape.n_layers], heads, state: SlotState::default() }
    }

    pub fn len(&self, layer: usize) -> usize {
        self.lens[layer]
    }

    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&l| l == 0)
    }

    /// Sets `layer`'s length to `len` (≤ current: rewinds), then grows it to `len + extra`
    /// tokens, allocating pages; returns the number of page bytes newly allocated.
    pub(crate) fn resize(&mut self, layer: usize, len: usize, extra: usize) -> isize {
        let n_fc = self.shape.n_fc();
        let d = self.shape.head_dim;
        let pages = (len + extra).div_ceil(PAGE);
        let mut delta = 0isize;
        for h in 0..self.shape.n_kv_heads {
            let hp = &mut self.heads[layer * self.shape.n_kv_heads + h];
            while hp.k.len() > pages {
                hp.k.pop();
                hp.kr.pop();
                hp.v.pop();
                hp.bounds.pop();
                delta -= (self.shape.page_elems() * 4) as isize;
            }
            while hp.k.len() < pages {
                hp.k.push(vec![0.0; n_fc * PAGE * 2].into_boxed_slice());
                hp.kr.push(vec![0.0; PAGE * d].into_boxed_slice());
                hp.v.push(vec![0.0; PAGE * d].into_boxed_slice());
                hp.bounds.push(vec![0.0; PAGE / QUEST_PAGE * 2 * d].into_boxed_slice());
                delta += (self.shape.page_elems() * 4) as isize;
            }
        }
        self.lens[layer] = len + extra;
        delta
    }

    /// Writes token `t` of (layer, kv head): `k_fc` is `(n_fc, 2)` rotated pairs, `v` is `(d,)`.
    pub(crate) fn write(&mut self, layer: usize, head: usize, t: usize, k_fc: &[f32], v: &[f32]) {
        let d = self.shape.head_dim;
        let hp = &mut self.heads[layer * self.shape.n_kv_heads + head];
        let (p, i) = (t / PAGE, t % PAGE);
        let kp = &mut hp.k[p];
        for f in 0..self.shape.n_fc() {
            kp[(f * PAGE + i) * 2] = k_fc[2 * f];
            kp[(f * PAGE + i) * 2 + 1] = k_fc[2 * f + 1];
        }
        hp.v[p][i * d..(i + 1) * d].copy_from_slice(v);
        hp.kr[p][i * d..(i + 1) * d].copy_from_slice(k_fc);
        let b = &mut hp.bounds[p][(i / QUEST_PAGE) * 2 * d..(i / QUEST_PAGE + 1) * 2 * d];
        let (lo, hi) = b.split_at_mut(d);
        if i % QUEST_PAGE == 0 {
            lo.copy_from_slice(k_fc);
            hi.copy_from_slice(k_fc);
        } else {
            for j in 0..d {
                lo[j] = lo[j].min(k_fc[j]);
                hi[j] = hi[j].max(k_fc[j]);
            }
        }
    }

    /// Quest bounds pages of (layer, kv head).
    pub fn bounds(&self, layer: usize, head: usize) -> Vec<&[f32]> {
        self.heads[layer * self.shape.n_kv_heads + head].bounds.iter().map(|p| &p[..]).collect()
    }

    /// Page slices of (layer, kv head) for building a `HeadView`.
    pub fn pages(&self, layer: usize, head: usize) -> Pages<'_> {
        let hp = &self.heads[layer * self.shape.n_kv_heads + head];
        Pages { k: slices(&hp.k), kr: slices(&hp.kr), v: slices(&hp.v), len: self.lens[layer], n_fc: self.shape.n_fc() }
    }

    /// Copies the pages and lengths of `other` (not its state) into `self`; returns the page
    /// bytes allocated minus freed.
    fn copy_from(&mut self, other: &SeqCache) -> isize {
        let before = self.heads.iter().map(|h| h.k.len()).sum::<usize>();
        for (dst, src) in self.heads.iter_mut().zip(&other.heads) {
            dst.k = src.k.clone();
            dst.kr = src.kr.clone();
            dst.v = src.v.clone();
            dst.bounds = src.bounds.clone();
        }
        self.lens.clone_from(&other.lens);
        let after = self.heads.iter().map(|h| h.k.len()).sum::<usize>();
        (after as isize - before as isize) * (self.shape.page_elems() * 4) as isize
    }

    fn clear(&mut self) -> usize {
        let bytes = self.heads.iter().map(|h| h.k.len()).sum::<usize>() * self.shape.page_elems() * 4;
        for h in &mut self.heads {
            *h = HeadPages::default();
        }
        self.lens.fill(0);
        self.state = SlotState::default();
        bytes
    }
}

/// Slots shared by every sequence of one model (one ONNX Runtime session).
pub struct CachePool {
    shape: CacheShape,
    max_context: usize,
    slots: Vec<Mutex<SeqCache>>,
    free: Mutex<Vec<usize>>,
    bytes: AtomicUsize,
    profile: std::sync::RwLock<Arc<Profile>>,
}

impl CachePool {
    pub fn new(shape: CacheShape, n_slots: usize, max_context: usize, profile: Profile) -> Arc<Self> {
        Arc::new(Self {
            shape,
            max_context,
            slots: (0..n_slots).map(|_| Mutex::new(SeqCache::new(shape))).collect(),
            free: Mutex::new((0..n_slots).rev().collect()),
            bytes: AtomicUsize::new(0),
            profile: std::sync::RwLock::new(Arc::new(profile)),
        })
    }

    pub fn shape(&self) -> CacheShape {
        self.shape
    }
    pub fn max_context(&self) -> usize {
        self.max_context
    }
    pub fn n_slots(&self) -> usize {
        self.slots.len()
    }
    pub fn free_count(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
    /// Bytes of pages currently allocated across all slots.
    pub fn bytes_in_use(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The calibration profile the sparse modes rank FCs by.
    pub fn profile(&self) -> Arc<Profile> {
        Arc::clone(&self.profile.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn set_profile(&self, p: Profile) {
        *self.profile.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
    }

    /// Takes a free slot; `None` when all are in use.
    pub fn acquire(self: &Arc<Self>) -> Option<SlotLease> {
        let slot = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(SlotLease { pool: Arc::clone(self), slot })
    }

    /// Locks a slot's cache (the operator does this for the duration of one layer).
    pub fn lock(&self, slot: usize) -> Option<MutexGuard<'_, SeqCache>> {
        self.slots.get(slot).map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Copies slot `from`'s cached tokens into slot `to` (which must differ): a shared prefix
    /// computed once, decoded several ways (the fidelity harness).
    pub fn copy_slot(&self, from: usize, to: usize) -> bool {
        if from == to {
            return false;
        }
        let (Some(src), Some(mut dst)) = (self.slots.get(from), self.slots.get(to).map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))) else {
            return false;
        };
        let src = src.lock().unwrap_or_else(|e| e.into_inner());
        let delta = dst.copy_from(&src);
        drop(dst);
        self.account(delta);
        true
    }

    pub(crate) fn account(&self, delta: isize) {
        if delta >= 0 {
            self.bytes.fetch_add(delta as usize, Ordering::Relaxed);
        } else {
            self.bytes.fetch_sub((-delta) as usize, Ordering::Relaxed);
        }
    }
}

/// A held slot; dropping it clears the slot's pages and returns it to the pool.
pub struct SlotLease {
    pool: Arc<CachePool>,
    slot: usize,
}

impl SlotLease {
    pub fn slot(&self) -> usize {
        self.slot
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        if let Some(mut c) = self.pool.lock(self.slot) {
            let freed = c.clear();
            self.pool.account(-(freed as isize));
        }
        self.pool.free.lock().unwrap_or_else(|e| e.into_inner()).push(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_pages_are_returned() {
        let shape = CacheShape { n_layers: 2, n_kv_heads: 3, head_dim: 8 };
        let cfg = crate::ModelConfig { architecture: "llama".into(), name: "t".into(), n_layers: 2, hidden: 8, n_heads: 3, n_kv_heads: 3, head_dim: 8, ffn_hidden: 8, vocab_size: 8, context_length: 1024, rope_theta: 1e4, rms_eps: 1e-5, rope_layout: crate::RopeLayout::Adjacent, tied_embeddings: true, qkv_bias: false };
        let pool = CachePool::new(shape, 2, 1024, Profile::heuristic(&cfg, ""));
        let a = pool.acquire().unwrap();
        let b = pool.acquire().unwrap();
        assert!(pool.acquire().is_none());
        {
            let mut c = pool.lock(a.slot()).unwrap();
            let d = c.resize(0, 0, PAGE + 1);
            pool.account(d);
        }
        assert_eq!(pool.bytes_in_use(), 2 * 3 * shape.page_elems() * 4);
        drop(a);
        assert_eq!(pool.bytes_in_use(), 0);
        assert_eq!(pool.free_count(), 1);
        drop(b);
        assert_eq!(pool.free_count(), 2);
    }

    #[test]
    fn rewind_frees_pages() {
        let shape = CacheShape { n_layers: 1, n_kv_heads: 1, head_dim: 4 };
        let mut c = SeqCache::new(shape);
        assert!(c.resize(0, 0, 3 * PAGE) > 0);
        assert!(c.resize(0, PAGE, 0) < 0);
        assert_eq!(c.len(0), PAGE);
        assert_eq!(c.pages(0, 0).view().k_pages.len(), 1);
    }
}
