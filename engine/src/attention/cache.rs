//! The KV cache pool: one slot per live sequence, pages of `PAGE` tokens per (layer, KV head).
//!
//! K pages are `(n_fc, PAGE, 2)` (FC planes, rotated K), V pages `(PAGE, d)`; see
//! `fasa_kernels::cpu` for why. FASA-C also keeps int8 copies of the planes that `fasa`'s TIP
//! reads (`fasa_kernels::cpu::quant`; `FASA_EXPERIMENT_TIP=int4` quantises them on a 4-bit grid
//! instead, `tip_bits`). Pages are allocated as a sequence grows and freed with its slot,
//! so memory follows the tokens actually cached, not the context limit.
//!
//! Two variants (`KvVariant`, chosen at model load). FASA-C keeps every page in memory. FASA-M
//! keeps in memory (the fast tier) only the planes of the `resident_fcs` best-ranked FCs of each
//! KV head, `(R, PAGE, 2)` in rank order, plus a `RowCache` per (layer, KV head); K rows and V
//! rows go to the slow tier (`SlowTier`, one file-backed page `(2, PAGE, d)` per cache page).
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fasa_kernels::cpu::{add_moments, quantize_page_block_bits, FcMoments, HeadView, Q8View, QB};

use super::calib::CaRecorder;
use super::pagebuf::{Elem, PageBuf};
use super::config::{AttnConfig, Mode, QUEST_PAGE};
use super::profile::Profile;
use super::stats::AttnStats;
use super::tier::{KvVariant, RowCache, SlowTier, GROW_PAGES};

/// Tokens per page.
pub const PAGE: usize = 64;

/// Bits of the scoring planes' values: 8, or 4 under the experiment switch
/// `FASA_EXPERIMENT_TIP=int4` (bench/FIDELITY.md, "Int4 scoring planes"). Int4 values are held
/// one per `i8` in the same pages (no memory saved on the CPU) and read by the same scorer; read
/// once, when a pool is built.
pub fn tip_bits() -> u32 {
    if super::sparse::experiment("FASA_EXPERIMENT_TIP", "int4") {
        4
    } else {
        8
    }
}

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
    /// Bytes of one FASA-C page: the f32 elements, then the int8 scoring planes `(n_fc, 2, PAGE)`
    /// and their scales `(n_fc, PAGE/QB)` f32.
    fn page_bytes(&self) -> usize {
        self.page_elems() * 4 + PAGE * self.head_dim + self.n_fc() * (PAGE / QB) * 4
    }
    /// Bytes one cached token costs over all layers and heads: K planes, K rows, V (f32), its
    /// share of the Quest bounds, and the int8 scoring planes with their scales.
    pub fn bytes_per_token(&self) -> usize {
        self.n_layers * self.n_kv_heads * self.page_bytes() / PAGE
    }
    /// f32 elements of one FASA-M fast-tier page: `(resident, PAGE, 2)` planes.
    fn m_fast_elems(&self, resident: usize) -> usize {
        resident * PAGE * 2
    }
    /// f32 elements of one FASA-M slow-tier page: K rows then V rows, `(2, PAGE, d)`.
    fn m_slow_elems(&self) -> usize {
        2 * PAGE * self.head_dim
    }
}

/// Page bytes allocated (positive) or freed (negative), per tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierBytes {
    pub fast: isize,
    pub slow: isize,
}

impl TierBytes {
    pub fn total(&self) -> isize {
        self.fast + self.slow
    }
}

/// The variant as a slot sees it.
#[derive(Debug, Clone)]
enum Tiering {
    FasaC,
    FasaM { resident: usize, row_cache_rows: usize, dir: PathBuf },
}

#[derive(Default)]
struct HeadPages {
    /// FASA-C: all FC planes `(n_fc, PAGE, 2)`; FASA-M: the resident ones `(R, PAGE, 2)`.
    k: Vec<PageBuf<f32>>,
    /// K rows `(PAGE, d)` in FC-pair order, for focused and dense attention.
    kr: Vec<PageBuf<f32>>,
    v: Vec<PageBuf<f32>>,
    /// Quest bounds per page: `(PAGE/16, 2, d)`, elementwise min then max of rotated K in FC-pair
    /// order, over each 16-token Quest page.
    bounds: Vec<PageBuf<f32>>,
    /// FASA-M: the slow-tier page slot of each cache page (`kr`, `v`, `bounds` stay empty).
    slow: Vec<u32>,
    /// K moments of each plane over tokens `0..mom_n` (a few hundred bytes per head, not per
    /// token): tokens are counted as they are appended in order.
    mom: Vec<FcMoments>,
    mom_n: usize,
    /// FASA-C: int8 scoring planes per page `(n_fc, 2, PAGE)` and scales `(n_fc, PAGE/QB)`
    /// (`fasa_kernels::cpu::quant`); blocks `0..q8_blocks` are quantised from the planes.
    q8: Vec<PageBuf<i8>>,
    q8_scale: Vec<PageBuf<f32>>,
    q8_blocks: usize,
}

/// Adds token `t`'s pair of every plane (pages `k`, each `(planes, PAGE, 2)`) to `mom`.
fn add_token(k: &[PageBuf<f32>], mom: &mut [FcMoments], t: usize) {
    let (p, i) = (t / PAGE, t % PAGE);
    for (j, m) in mom.iter_mut().enumerate() {
        add_moments(m, k[p][(j * PAGE + i) * 2], k[p][(j * PAGE + i) * 2 + 1]);
    }
}

impl HeadPages {
    /// Planes per page.
    fn planes(&self) -> usize {
        self.k.first().map_or(0, |p| p.len() / (PAGE * 2))
    }

    /// Moments of each plane over tokens `0..n`, counted from the planes.
    fn recount(&self, n: usize) -> Vec<FcMoments> {
        let mut out = vec![[0f64; 5]; self.planes()];
        for t in 0..n {
            add_token(&self.k, &mut out, t);
        }
        out
    }

    /// Counts token `t` (just written to the planes): the next in order is added; a rewrite
    /// after a rollback (or a gap) recounts the tokens before it from the planes first.
    fn note_token(&mut self, t: usize) {
        if t != self.mom_n || self.mom.len() != self.planes() {
            self.mom = self.recount(t);
        }
        add_token(&self.k, &mut self.mom, t);
        self.mom_n = t + 1;
    }

    /// K moments of each plane over tokens `0..n` (recounted when a rollback left `0..n`
    /// different from what was counted).
    fn moments(&self, n: usize) -> Vec<FcMoments> {
        if n == self.mom_n && self.mom.len() == self.planes() {
            self.mom.clone()
        } else {
            self.recount(n)
        }
    }
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
    /// Records decode steps' K/V and queries (`fasa-bench capture`).
    pub capture: Option<super::capture::KvCapture>,
}

fn slices<T: Elem>(v: &[PageBuf<T>]) -> Vec<&[T]> {
    v.iter().map(|p| &p[..]).collect()
}

/// Page slices of one (layer, KV head); `view()` borrows them as a kernel `HeadView`.
pub struct Pages<'a> {
    k: Vec<&'a [f32]>,
    q8: Vec<&'a [i8]>,
    q8_scale: Vec<&'a [f32]>,
    q8_blocks: usize,
    q8_bits: u32,
    kr: Vec<&'a [f32]>,
    v: Vec<&'a [f32]>,
    len: usize,
    n_fc: usize,
    /// FCs in each K plane page: `n_fc` (FASA-C) or the resident count (FASA-M).
    n_planes: usize,
}

impl Pages<'_> {
    /// The whole head: K rows, V rows and, when all FCs are kept as planes, the planes. On FASA-M
    /// the K rows and V rows are the slow tier's and `k_pages` is empty (see `plane_view`).
    pub fn view(&self) -> HeadView<'_> {
        let k: &[&[f32]] = if self.n_planes == self.n_fc { &self.k } else { &[] };
        HeadView { k_pages: k, kr_pages: &self.kr, v_pages: &self.v, page: PAGE, n_fc: self.n_fc, len: self.len }
    }

    /// The FC planes kept in fast memory as a head of `n_planes` FCs (FASA-M: FC `j` of the view
    /// is the slot's `j`-th resident FC, and queries must be compacted the same way); no rows.
    pub fn plane_view(&self) -> HeadView<'_> {
        HeadView { k_pages: &self.k, kr_pages: &[], v_pages: &[], page: PAGE, n_fc: self.n_planes, len: self.len }
    }

    /// The int8 scoring planes (FASA-C; none on FASA-M).
    pub fn q8_view(&self) -> Option<Q8View<'_>> {
        (!self.q8.is_empty()).then(|| Q8View { pages: &self.q8, scales: &self.q8_scale, blocks: self.q8_blocks.min(self.len / QB), bits: self.q8_bits })
    }

    /// Bits of the scoring planes' values (`tip_bits`).
    pub fn q8_bits(&self) -> u32 {
        self.q8_bits
    }
}

/// The cache of one sequence.
pub struct SeqCache {
    shape: CacheShape,
    tiering: Tiering,
    /// Tokens cached, per layer (layers are appended one after the other within a run).
    lens: Vec<usize>,
    /// `(layer, kv_head)` flattened.
    heads: Vec<HeadPages>,
    /// FASA-M: per `(layer, kv_head)` the resident FCs, best first (recorded when the slot is
    /// taken, from the profile then installed); plane `j` of a fast page holds FC `resident[j]`.
    resident: Vec<Vec<usize>>,
    /// FASA-M: the profile the resident FCs were taken from, and the same re-expressed over
    /// resident FCs (`Pages::plane_view` numbering).
    taken: Option<Arc<Profile>>,
    compact: Option<Arc<Profile>>,
    /// FASA-M: created at the first page.
    slow: Option<SlowTier>,
    /// FASA-M: per `(layer, kv_head)`.
    rows: Vec<Mutex<RowCache>>,
    /// FASA-C: bits of the scoring planes' values (`tip_bits`, the pool's).
    tip_bits: u32,
    pub state: SlotState,
}

impl SeqCache {
    #[cfg(test)]
    fn new(shape: CacheShape) -> Self {
        Self::with_tiering(shape, Tiering::FasaC)
    }

    fn with_tiering(shape: CacheShape, tiering: Tiering) -> Self {
        let heads = (0..shape.n_layers * shape.n_kv_heads).map(|_| HeadPages::default()).collect();
        let rows = match &tiering {
            Tiering::FasaC => vec![],
            Tiering::FasaM { row_cache_rows, .. } => (0..shape.n_layers * shape.n_kv_heads).map(|_| Mutex::new(RowCache::new(*row_cache_rows, shape.head_dim))).collect(),
        };
        Self { shape, tiering, lens: vec![0; shape.n_layers], heads, resident: vec![], taken: None, compact: None, slow: None, rows, tip_bits: 8, state: SlotState::default() }
    }

    /// Bits of the scoring planes' values (the pool's `tip_bits`).
    pub fn tip_bits(&self) -> u32 {
        self.tip_bits
    }

    /// True for a FASA-M slot.
    pub fn is_tiered(&self) -> bool {
        matches!(self.tiering, Tiering::FasaM { .. })
    }

    /// FASA-M: records the resident FCs of every KV head from `p` (the top `R` of its ranking).
    fn take_resident(&mut self, p: &Arc<Profile>) {
        let Tiering::FasaM { resident: r, .. } = self.tiering else { return };
        self.taken = Some(Arc::clone(p));
        let hkv = self.shape.n_kv_heads;
        self.resident = p.layers.iter().flat_map(|l| l.kv_heads.iter().map(|h| h.ranked_fcs[..r.min(h.ranked_fcs.len())].to_vec())).collect();
        let mut c = Profile::clone(p);
        c.head_dim = 2 * r;
        for (li, l) in c.layers.iter_mut().enumerate() {
            let group = l.q_heads.len() / hkv.max(1);
            for (g, h) in l.kv_heads.iter_mut().enumerate() {
                h.ranked_fcs = (0..self.resident[li * hkv + g].len()).collect();
                h.ca.clear();
                h.ca_by_k.clear();
            }
            for (qh, h) in l.q_heads.iter_mut().enumerate() {
                let res = &self.resident[li * hkv + qh / group.max(1)];
                h.ranked_fcs = h.ranked_fcs.iter().filter_map(|f| res.iter().position(|r| r == f)).collect();
                h.ca.clear();
                h.ca_by_k.clear();
            }
        }
        self.compact = Some(Arc::new(c));
    }

    /// FASA-M: the resident FCs of (layer, kv head), best first.
    pub fn resident(&self, layer: usize, head: usize) -> &[usize] {
        self.resident.get(layer * self.shape.n_kv_heads + head).map_or(&[], |r| r.as_slice())
    }

    /// FASA-M: the profile over resident FCs, numbered as `Pages::plane_view` numbers them.
    pub fn compact_profile(&self) -> Option<Arc<Profile>> {
        self.compact.clone()
    }

    /// FASA-M: the row cache of (layer, kv head).
    pub fn row_cache(&self, layer: usize, head: usize) -> Option<MutexGuard<'_, RowCache>> {
        self.rows.get(layer * self.shape.n_kv_heads + head).map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Copies token `t`'s K row (FC-pair order) and V row of (layer, kv head) into `k` and `v`
    /// (`(d,)` each): from the pages (FASA-C) or the slow tier (FASA-M).
    pub fn load_row(&self, layer: usize, head: usize, t: u32, k: &mut [f32], v: &mut [f32]) {
        let d = self.shape.head_dim;
        let hp = &self.heads[layer * self.shape.n_kv_heads + head];
        let (p, i) = (t as usize / PAGE, t as usize % PAGE);
        if let Tiering::FasaC = self.tiering {
            k.copy_from_slice(&hp.kr[p][i * d..(i + 1) * d]);
            v.copy_from_slice(&hp.v[p][i * d..(i + 1) * d]);
            return;
        }
        let page = self.slow.as_ref().expect("FASA-M slot without a slow tier").page(hp.slow[p]);
        k.copy_from_slice(&page[i * d..(i + 1) * d]);
        v.copy_from_slice(&page[(PAGE + i) * d..(PAGE + i + 1) * d]);
    }

    /// Checks `c` against what this slot keeps (always fine on FASA-C); the message names the limit.
    pub fn check_config(&self, c: &AttnConfig) -> Result<(), String> {
        check_tiered(&self.tiering, &self.resident, self.shape, self.taken.as_deref(), c)
    }

    pub fn len(&self, layer: usize) -> usize {
        self.lens[layer]
    }

    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&l| l == 0)
    }

    /// Sets `layer`'s length to `len` (≤ current: rewinds), then grows it to `len + extra`
    /// tokens, allocating pages; returns the page bytes newly allocated per tier. Fails only when
    /// FASA-M's slow tier cannot grow its file.
    pub(crate) fn resize(&mut self, layer: usize, len: usize, extra: usize) -> std::io::Result<TierBytes> {
        let n_fc = self.shape.n_fc();
        let d = self.shape.head_dim;
        let pages = (len + extra).div_ceil(PAGE);
        let mut delta = TierBytes::default();
        let shape = self.shape;
        match self.tiering.clone() {
            Tiering::FasaC => {
                let page_bytes = shape.page_bytes() as isize;
                for h in 0..shape.n_kv_heads {
                    let hp = &mut self.heads[layer * shape.n_kv_heads + h];
                    while hp.k.len() > pages {
                        hp.k.pop();
                        hp.kr.pop();
                        hp.v.pop();
                        hp.bounds.pop();
                        hp.q8.pop();
                        hp.q8_scale.pop();
                        delta.fast -= page_bytes;
                    }
                    while hp.k.len() < pages {
                        hp.k.push(PageBuf::zeroed(n_fc * PAGE * 2));
                        hp.kr.push(PageBuf::zeroed(PAGE * d));
                        hp.v.push(PageBuf::zeroed(PAGE * d));
                        hp.bounds.push(PageBuf::zeroed(PAGE / QUEST_PAGE * 2 * d));
                        hp.q8.push(PageBuf::zeroed(n_fc * 2 * PAGE));
                        hp.q8_scale.push(PageBuf::zeroed(n_fc * (PAGE / QB)));
                        delta.fast += page_bytes;
                    }
                }
            }
            Tiering::FasaM { resident, dir, .. } => {
                let (fast_elems, slow_elems) = (shape.m_fast_elems(resident), shape.m_slow_elems());
                if self.slow.is_none() && pages > 0 {
                    self.slow = Some(SlowTier::create(&dir, slow_elems, GROW_PAGES)?);
                }
                for h in 0..shape.n_kv_heads {
                    let hp = &mut self.heads[layer * shape.n_kv_heads + h];
                    while hp.k.len() > pages {
                        hp.k.pop();
                        let p = hp.slow.pop().expect("one slow page per cache page");
                        self.slow.as_mut().expect("slow tier").release(p);
                        delta.fast -= (fast_elems * 4) as isize;
                        delta.slow -= (slow_elems * 4) as isize;
                    }
                    while hp.k.len() < pages {
                        let p = self.slow.as_mut().expect("slow tier").alloc()?;
                        hp.slow.push(p);
                        hp.k.push(PageBuf::zeroed(resident * PAGE * 2));
                        delta.fast += (fast_elems * 4) as isize;
                        delta.slow += (slow_elems * 4) as isize;
                    }
                }
                if len < self.lens[layer] {
                    for h in 0..shape.n_kv_heads {
                        self.rows[layer * shape.n_kv_heads + h].get_mut().unwrap_or_else(|e| e.into_inner()).invalidate_from(len);
                    }
                }
            }
        }
        for h in 0..shape.n_kv_heads {
            let hp = &mut self.heads[layer * shape.n_kv_heads + h];
            // Blocks past the new length are requantised when they fill again.
            hp.q8_blocks = hp.q8_blocks.min(len / QB);
            if len < hp.mom_n {
                // Counted tokens were dropped: recount at the next write or read.
                hp.mom.clear();
            }
        }
        self.lens[layer] = len + extra;
        Ok(delta)
    }

    /// Writes token `t` of (layer, kv head): `k_fc` is `(n_fc, 2)` rotated pairs, `v` is `(d,)`.
    pub(crate) fn write(&mut self, layer: usize, head: usize, t: usize, k_fc: &[f32], v: &[f32]) {
        let d = self.shape.head_dim;
        let hp = &mut self.heads[layer * self.shape.n_kv_heads + head];
        let (p, i) = (t / PAGE, t % PAGE);
        let kp = &mut hp.k[p];
        if let Tiering::FasaM { .. } = self.tiering {
            for (j, &f) in self.resident[layer * self.shape.n_kv_heads + head].iter().enumerate() {
                kp[(j * PAGE + i) * 2] = k_fc[2 * f];
                kp[(j * PAGE + i) * 2 + 1] = k_fc[2 * f + 1];
            }
            hp.note_token(t);
            let page = self.slow.as_mut().expect("slow tier").page_mut(hp.slow[p]);
            page[i * d..(i + 1) * d].copy_from_slice(k_fc);
            page[(PAGE + i) * d..(PAGE + i + 1) * d].copy_from_slice(v);
            return;
        }
        for f in 0..self.shape.n_fc() {
            kp[(f * PAGE + i) * 2] = k_fc[2 * f];
            kp[(f * PAGE + i) * 2 + 1] = k_fc[2 * f + 1];
        }
        hp.note_token(t);
        // A write inside a quantised block (after a rollback) voids it and the blocks after it;
        // the write that completes the next block in order quantises it.
        let b = t / QB;
        hp.q8_blocks = hp.q8_blocks.min(b);
        if t % QB == QB - 1 && hp.q8_blocks == b {
            quantize_page_block_bits(&hp.k[p], PAGE, self.shape.n_fc(), i / QB, &mut hp.q8[p], &mut hp.q8_scale[p], self.tip_bits);
            hp.q8_blocks = b + 1;
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

    /// K moments of each FC plane of (layer, kv head) over its cached tokens (FASA-M: the
    /// resident planes, in plane order).
    pub fn moments(&self, layer: usize, head: usize) -> Vec<FcMoments> {
        self.heads[layer * self.shape.n_kv_heads + head].moments(self.lens[layer])
    }

    /// Quest bounds pages of (layer, kv head).
    pub fn bounds(&self, layer: usize, head: usize) -> Vec<&[f32]> {
        self.heads[layer * self.shape.n_kv_heads + head].bounds.iter().map(|p| &p[..]).collect()
    }

    /// Page slices of (layer, kv head) for building a `HeadView` (FASA-M: rows from the slow tier).
    pub fn pages(&self, layer: usize, head: usize) -> Pages<'_> {
        let hp = &self.heads[layer * self.shape.n_kv_heads + head];
        let (n_fc, len) = (self.shape.n_fc(), self.lens[layer]);
        match (&self.tiering, &self.slow) {
            (Tiering::FasaM { .. }, slow) => {
                let d = self.shape.head_dim;
                let pages: Vec<&[f32]> = slow.as_ref().map_or(vec![], |s| hp.slow.iter().map(|&p| s.page(p)).collect());
                let kr = pages.iter().map(|p| &p[..PAGE * d]).collect();
                let v = pages.iter().map(|p| &p[PAGE * d..]).collect();
                Pages { k: slices(&hp.k), q8: vec![], q8_scale: vec![], q8_blocks: 0, q8_bits: self.tip_bits, kr, v, len, n_fc, n_planes: self.resident(layer, head).len() }
            }
            (Tiering::FasaC, _) => Pages {
                k: slices(&hp.k),
                q8: hp.q8.iter().map(|p| &p[..]).collect(),
                q8_scale: slices(&hp.q8_scale),
                q8_blocks: hp.q8_blocks,
                q8_bits: self.tip_bits,
                kr: slices(&hp.kr),
                v: slices(&hp.v),
                len,
                n_fc,
                n_planes: n_fc,
            },
        }
    }

    /// Page bytes held, per tier (FASA-M's row caches count as fast).
    fn held(&self) -> TierBytes {
        let pages = self.heads.iter().map(|h| h.k.len()).sum::<usize>();
        match &self.tiering {
            Tiering::FasaC => TierBytes { fast: (pages * self.shape.page_bytes()) as isize, slow: 0 },
            Tiering::FasaM { resident, .. } => {
                let rows: usize = self.rows.iter().map(|r| r.lock().unwrap_or_else(|e| e.into_inner()).bytes()).sum();
                TierBytes { fast: (pages * self.shape.m_fast_elems(*resident) * 4 + rows) as isize, slow: (pages * self.shape.m_slow_elems() * 4) as isize }
            }
        }
    }

    /// Copies the pages and lengths of `other` (not its state; same variant) into `self`;
    /// returns the page bytes allocated minus freed.
    fn copy_from(&mut self, other: &SeqCache) -> std::io::Result<TierBytes> {
        let before = self.held();
        if let Tiering::FasaM { .. } = self.tiering {
            // Same resident FCs as the source, so the copied planes mean the same FCs.
            self.resident.clone_from(&other.resident);
            self.taken.clone_from(&other.taken);
            self.compact.clone_from(&other.compact);
            for r in &mut self.rows {
                r.get_mut().unwrap_or_else(|e| e.into_inner()).clear();
            }
            for layer in 0..self.shape.n_layers {
                self.resize(layer, 0, other.lens[layer])?;
            }
            if let (Some(dst), Some(src)) = (self.slow.as_mut(), other.slow.as_ref()) {
                for (dh, sh) in self.heads.iter_mut().zip(&other.heads) {
                    dh.k = sh.k.clone();
                    (dh.mom, dh.mom_n) = (sh.mom.clone(), sh.mom_n);
                    for (&dp, &sp) in dh.slow.iter().zip(&sh.slow) {
                        dst.page_mut(dp).copy_from_slice(src.page(sp));
                    }
                }
            }
        } else {
            for (dst, src) in self.heads.iter_mut().zip(&other.heads) {
                dst.k = src.k.clone();
                dst.kr = src.kr.clone();
                dst.v = src.v.clone();
                dst.bounds = src.bounds.clone();
                (dst.q8, dst.q8_scale, dst.q8_blocks) = (src.q8.clone(), src.q8_scale.clone(), src.q8_blocks);
                (dst.mom, dst.mom_n) = (src.mom.clone(), src.mom_n);
            }
        }
        self.lens.clone_from(&other.lens);
        let after = self.held();
        Ok(TierBytes { fast: after.fast - before.fast, slow: after.slow - before.slow })
    }

    /// Frees every page (and FASA-M's file and row caches); returns the bytes freed.
    fn clear(&mut self) -> TierBytes {
        let bytes = self.held();
        for h in &mut self.heads {
            *h = HeadPages::default();
        }
        for r in &mut self.rows {
            r.get_mut().unwrap_or_else(|e| e.into_inner()).clear();
        }
        self.slow = None;
        self.resident.clear();
        self.taken = None;
        self.compact = None;
        self.lens.fill(0);
        self.state = SlotState::default();
        bytes
    }
}

/// FASA-M's limits on a request: stage 1 may score only resident planes, stage 2 holds at most
/// `row_cache_rows` rows at once; modes that need every K plane (oracle, random-fc, Quest's
/// bounds) or exact K of candidates (re-rank) are refused rather than read from the slow tier.
fn check_tiered(t: &Tiering, resident: &[Vec<usize>], shape: CacheShape, profile: Option<&Profile>, c: &AttnConfig) -> Result<(), String> {
    let Tiering::FasaM { resident: r, row_cache_rows, .. } = t else { return Ok(()) };
    let fix = "or load the model with the FASA-C cache";
    match c.mode {
        Mode::Dense => return Ok(()),
        Mode::Oracle | Mode::RandomFc | Mode::Quest => {
            return Err(format!("mode {} needs K data the FASA-M cache keeps only in its slow tier; use fasa, fasa-paper, streaming or dense, {fix}", c.mode));
        }
        Mode::Streaming => {}
        Mode::Fasa | Mode::FasaPaper => {
            if c.pool > *r || c.chunks > *r {
                return Err(format!("pool {} (chunks {}) exceeds the {r} FCs the FASA-M cache keeps resident per KV head; ask for pool and chunks of at most {r}, {fix}", c.pool, c.chunks));
            }
            if c.rerank != 0 {
                return Err(format!("rerank needs exact K of {} candidates, which the FASA-M cache keeps only in its slow tier; set rerank to 0, {fix}", c.rerank));
            }
        }
    }
    if c.budget > *row_cache_rows {
        return Err(format!("budget {} exceeds the FASA-M row cache of {row_cache_rows} rows per KV head; ask for a budget of at most {row_cache_rows}, {fix}", c.budget));
    }
    // Per-query-head selection ranks FCs per query head: its pool must be resident too.
    if matches!(c.mode, Mode::Fasa | Mode::FasaPaper) && !c.per_group {
        if let Some(p) = profile {
            let hkv = shape.n_kv_heads;
            for (li, l) in p.layers.iter().enumerate() {
                let group = l.q_heads.len() / hkv.max(1);
                for (qh, h) in l.q_heads.iter().enumerate() {
                    let res = &resident[li * hkv + qh / group.max(1)];
                    if let Some(f) = h.ranked_fcs.iter().take(c.pool).find(|f| !res.contains(f)) {
                        return Err(format!("per-head selection of layer {li} query head {qh} ranks FC {f} in its top {}, but the FASA-M cache keeps only its KV head's best {r} FCs resident; use per_group, a smaller pool, {fix}", c.pool));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Slots shared by every sequence of one model (one ONNX Runtime session).
pub struct CachePool {
    shape: CacheShape,
    variant: KvVariant,
    max_context: usize,
    slots: Vec<Mutex<SeqCache>>,
    free: Mutex<Vec<usize>>,
    /// Bytes held in both tiers; `slow_bytes` of them in the slow tier.
    bytes: AtomicUsize,
    slow_bytes: AtomicUsize,
    profile: std::sync::RwLock<Arc<Profile>>,
    /// FASA-C with a usable GPU: the device mirror decode steps attend from (`super::gpu`).
    gpu: std::sync::OnceLock<super::gpu::GpuMirror>,
}

impl CachePool {
    /// A pool of `n_slots` sequences of up to `max_context` tokens. FASA-M's slow tier files go to
    /// `paths::cache_dir()/kv/` (created, and unlinked at once, when a slot first needs one);
    /// `resident_fcs` is clamped to `1..=d/2`.
    pub fn new(shape: CacheShape, n_slots: usize, max_context: usize, profile: Profile, variant: KvVariant) -> Arc<Self> {
        Self::with_kv_dir(shape, n_slots, max_context, profile, variant, crate::paths::cache_dir().join("kv"))
    }

    /// As `new`, with the slow tier's files under `dir`.
    pub fn with_kv_dir(shape: CacheShape, n_slots: usize, max_context: usize, profile: Profile, variant: KvVariant, dir: PathBuf) -> Arc<Self> {
        let (variant, tiering) = match variant {
            KvVariant::FasaC => (variant, Tiering::FasaC),
            KvVariant::FasaM { resident_fcs, row_cache_rows } => {
                let resident = resident_fcs.clamp(1, shape.n_fc().max(1));
                (KvVariant::FasaM { resident_fcs: resident, row_cache_rows }, Tiering::FasaM { resident, row_cache_rows, dir })
            }
        };
        let tip_bits = tip_bits();
        Arc::new(Self {
            shape,
            variant,
            max_context,
            slots: (0..n_slots).map(|_| Mutex::new(SeqCache { tip_bits, ..SeqCache::with_tiering(shape, tiering.clone()) })).collect(),
            free: Mutex::new((0..n_slots).rev().collect()),
            bytes: AtomicUsize::new(0),
            slow_bytes: AtomicUsize::new(0),
            profile: std::sync::RwLock::new(Arc::new(profile)),
            gpu: std::sync::OnceLock::new(),
        })
    }

    pub fn shape(&self) -> CacheShape {
        self.shape
    }
    pub fn variant(&self) -> KvVariant {
        self.variant
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
    /// Bytes of pages currently allocated across all slots, both tiers (FASA-M's row caches
    /// included).
    pub fn bytes_in_use(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
    /// `bytes_in_use` split as (fast tier, slow tier).
    pub fn bytes_in_use_by_tier(&self) -> (usize, usize) {
        let slow = self.slow_bytes.load(Ordering::Relaxed);
        (self.bytes_in_use().saturating_sub(slow), slow)
    }

    /// Bytes one cached token costs over all layers and KV heads, as (fast tier, slow tier).
    /// FASA-C: everything is fast (K planes, K rows, V, Quest bounds). FASA-M: fast = the
    /// resident planes, slow = K rows + V rows; the row caches are a fixed cost per slot on top
    /// (`row_cache_bytes_per_slot`), not per token.
    pub fn bytes_per_token_by_tier(&self) -> (usize, usize) {
        let s = self.shape;
        let heads = s.n_layers * s.n_kv_heads;
        match self.variant {
            KvVariant::FasaC => (s.bytes_per_token(), 0),
            KvVariant::FasaM { resident_fcs, .. } => (heads * s.m_fast_elems(resident_fcs) * 4 / PAGE, heads * s.m_slow_elems() * 4 / PAGE),
        }
    }

    /// FASA-M: fast-tier bytes of one slot's full row caches (all layers and KV heads); 0 on FASA-C.
    pub fn row_cache_bytes_per_slot(&self) -> usize {
        match self.variant {
            KvVariant::FasaC => 0,
            KvVariant::FasaM { row_cache_rows, .. } => self.shape.n_layers * self.shape.n_kv_heads * RowCache::full_bytes(row_cache_rows, self.shape.head_dim),
        }
    }

    /// Checks a request's attention settings against what this cache keeps (FASA-M: resident
    /// FCs of the current profile, the row cache size, the modes it serves); the message says
    /// what to change. Always fine on FASA-C.
    pub fn check_config(&self, c: &AttnConfig) -> Result<(), String> {
        let tiering = self.tiering_of_variant();
        if let Tiering::FasaC = tiering {
            return Ok(());
        }
        // What a slot acquired now would record.
        let mut probe = SeqCache::with_tiering(self.shape, tiering);
        probe.take_resident(&self.profile());
        probe.check_config(c)
    }

    fn tiering_of_variant(&self) -> Tiering {
        match self.variant {
            KvVariant::FasaC => Tiering::FasaC,
            KvVariant::FasaM { resident_fcs, row_cache_rows } => Tiering::FasaM { resident: resident_fcs, row_cache_rows, dir: PathBuf::new() },
        }
    }

    /// `c` narrowed to what this cache serves (FASA-M: pool and chunks ≤ resident FCs, budget ≤
    /// row cache rows, no re-rank); unchanged on FASA-C. For defaults, not for requests.
    pub fn fit_config(&self, mut c: AttnConfig) -> AttnConfig {
        if let KvVariant::FasaM { resident_fcs, row_cache_rows } = self.variant {
            c.pool = c.pool.min(resident_fcs);
            c.chunks = c.chunks.min(c.pool);
            c.budget = c.budget.min(row_cache_rows);
            c.sinks = c.sinks.min(c.budget);
            c.recent = c.recent.min(c.budget - c.sinks);
            c.rerank = 0;
        }
        c
    }

    /// The calibration profile the sparse modes rank FCs by (FASA-M slots keep the resident FCs
    /// they took from the profile installed when they were acquired).
    pub fn profile(&self) -> Arc<Profile> {
        Arc::clone(&self.profile.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Attaches the GPU mirror (once; FASA-C pools only, else ignored).
    pub fn set_gpu(&self, m: super::gpu::GpuMirror) {
        if self.variant == KvVariant::FasaC {
            let _ = self.gpu.set(m);
        }
    }

    /// The GPU mirror, when decode steps may run on the GPU.
    pub fn gpu(&self) -> Option<&super::gpu::GpuMirror> {
        self.gpu.get()
    }

    pub fn set_profile(&self, p: Profile) {
        *self.profile.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
    }

    /// Takes a free slot; `None` when all are in use.
    pub fn acquire(self: &Arc<Self>) -> Option<SlotLease> {
        let slot = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        if let Some(mut c) = self.lock(slot) {
            c.take_resident(&self.profile());
        }
        Some(SlotLease { pool: Arc::clone(self), slot })
    }

    /// Locks a slot's cache (the operator does this for the duration of one layer).
    pub fn lock(&self, slot: usize) -> Option<MutexGuard<'_, SeqCache>> {
        self.slots.get(slot).map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Copies slot `from`'s cached tokens into slot `to` (which must differ): a shared prefix
    /// computed once, decoded several ways (the fidelity harness). False when a slot is missing
    /// or FASA-M's slow tier could not grow.
    pub fn copy_slot(&self, from: usize, to: usize) -> bool {
        if from == to {
            return false;
        }
        let (Some(src), Some(mut dst)) = (self.slots.get(from), self.slots.get(to).map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))) else {
            return false;
        };
        let src = src.lock().unwrap_or_else(|e| e.into_inner());
        let before = dst.held();
        let res = dst.copy_from(&src);
        if let Some(m) = self.gpu() {
            m.invalidate(to);
        }
        let delta = match &res {
            Ok(d) => *d,
            Err(_) => {
                let after = dst.held();
                TierBytes { fast: after.fast - before.fast, slow: after.slow - before.slow }
            }
        };
        drop(dst);
        self.account(delta);
        res.is_ok()
    }

    pub(crate) fn account(&self, delta: TierBytes) {
        let add = |a: &AtomicUsize, d: isize| {
            if d >= 0 {
                a.fetch_add(d as usize, Ordering::Relaxed);
            } else {
                a.fetch_sub((-d) as usize, Ordering::Relaxed);
            }
        };
        add(&self.bytes, delta.total());
        add(&self.slow_bytes, delta.slow);
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
            if let Some(m) = self.pool.gpu() {
                m.invalidate(self.slot);
            }
            self.pool.account(TierBytes { fast: -freed.fast, slow: -freed.slow });
        }
        self.pool.free.lock().unwrap_or_else(|e| e.into_inner()).push(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_cfg(n_layers: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> crate::ModelConfig {
        crate::ModelConfig { architecture: "llama".into(), name: "t".into(), n_layers, hidden: 8, n_heads, n_kv_heads, head_dim, ffn_hidden: 8, vocab_size: 8, context_length: 1024, rope_theta: 1e4, rms_eps: 1e-5, rope_layout: crate::RopeLayout::Adjacent, tied_embeddings: true, qkv_bias: false }
    }

    #[test]
    fn slots_and_pages_are_returned() {
        let shape = CacheShape { n_layers: 2, n_kv_heads: 3, head_dim: 8 };
        let cfg = model_cfg(2, 3, 3, 8);
        let pool = CachePool::new(shape, 2, 1024, Profile::heuristic(&cfg, ""), KvVariant::FasaC);
        let a = pool.acquire().unwrap();
        let b = pool.acquire().unwrap();
        assert!(pool.acquire().is_none());
        {
            let mut c = pool.lock(a.slot()).unwrap();
            let d = c.resize(0, 0, PAGE + 1).unwrap();
            pool.account(d);
        }
        assert_eq!(pool.bytes_in_use(), 2 * 3 * shape.page_bytes());
        assert_eq!(pool.bytes_in_use_by_tier(), (2 * 3 * shape.page_bytes(), 0));
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
        assert!(c.resize(0, 0, 3 * PAGE).unwrap().total() > 0);
        assert!(c.resize(0, PAGE, 0).unwrap().total() < 0);
        assert_eq!(c.len(0), PAGE);
        assert_eq!(c.pages(0, 0).view().k_pages.len(), 1);
    }

    /// A FASA-M pool over `dir`: 2 layers, 4 query / 2 KV heads, d = 8 (4 FCs), 2 resident FCs,
    /// with KV head g of every layer ranking FCs `[3 - g, ...]` so the two heads keep different FCs.
    fn tiered_pool(dir: &std::path::Path, rows: usize) -> Arc<CachePool> {
        let shape = CacheShape { n_layers: 2, n_kv_heads: 2, head_dim: 8 };
        let mut prof = Profile::heuristic(&model_cfg(2, 4, 2, 8), "");
        for l in &mut prof.layers {
            l.kv_heads[0].ranked_fcs = vec![3, 1, 2, 0];
            l.kv_heads[1].ranked_fcs = vec![2, 0, 3, 1];
            for qh in 0..4 {
                l.q_heads[qh].ranked_fcs = l.kv_heads[qh / 2].ranked_fcs.clone();
            }
        }
        let v = KvVariant::FasaM { resident_fcs: 2, row_cache_rows: rows };
        CachePool::with_kv_dir(shape, 2, 1024, prof, v, dir.to_path_buf())
    }

    /// Moments recounted from the planes of `c`'s (layer 0, head 0) over `0..n`.
    fn recount(c: &SeqCache, n: usize) -> Vec<FcMoments> {
        let pages = c.pages(0, 0);
        let view = pages.view();
        let mut m = vec![[0f64; 5]; view.n_fc];
        for t in 0..n {
            for (f, mf) in m.iter_mut().enumerate() {
                add_moments(mf, view.k_row(t)[2 * f], view.k_row(t)[2 * f + 1]);
            }
        }
        m
    }

    #[test]
    fn k_moments_follow_appends_rollbacks_and_copies() {
        let shape = CacheShape { n_layers: 1, n_kv_heads: 1, head_dim: 8 };
        let mut c = SeqCache::new(shape);
        let k = |t: usize, round: usize| -> Vec<f32> { (0..8).map(|j| ((t * 7 + j * 3 + round) % 11) as f32 - 5.0 + j as f32 / 8.0).collect() };
        let close = |a: &[FcMoments], b: &[FcMoments]| a.iter().flatten().zip(b.iter().flatten()).all(|(x, y)| (x - y).abs() <= 1e-9 * (1.0 + y.abs()));
        // Appends over three pages, checked at every length.
        let n = 2 * PAGE + 9;
        for t in 0..n {
            c.resize(0, t, 1).unwrap();
            c.write(0, 0, t, &k(t, 0), &[0.0; 8]);
            assert!(close(&c.moments(0, 0), &recount(&c, t + 1)), "after append {t}");
        }
        assert_eq!(c.heads[0].mom_n, n);
        // Roll back into the first page and rewrite with other values, then grow again.
        c.resize(0, PAGE - 3, 4).unwrap();
        for t in PAGE - 3..PAGE + 1 {
            c.write(0, 0, t, &k(t, 1), &[0.0; 8]);
        }
        assert!(close(&c.moments(0, 0), &recount(&c, PAGE + 1)));
        // A rollback without a rewrite still reports only the tokens kept.
        c.resize(0, PAGE / 2, 0).unwrap();
        assert!(close(&c.moments(0, 0), &recount(&c, PAGE / 2)));
        let mut d = SeqCache::new(shape);
        c.resize(0, PAGE + 1, 0).unwrap();
        d.copy_from(&c).unwrap();
        assert!(close(&d.moments(0, 0), &recount(&c, PAGE + 1)));
    }

    /// The int8 planes of (0, 0) hold exactly the quantisation of the current f32 planes, block
    /// by block, for `blocks` whole blocks.
    fn assert_q8_current(c: &SeqCache, blocks: usize) {
        let pages = c.pages(0, 0);
        let q8 = pages.q8_view().expect("FASA-C keeps int8 planes");
        assert_eq!(q8.blocks, blocks);
        let hp = &c.heads[0];
        for b in 0..blocks {
            let (p, bi) = (b * QB / PAGE, (b * QB % PAGE) / QB);
            let (mut q, mut sc) = (vec![0i8; hp.q8[p].len()], vec![0f32; hp.q8_scale[p].len()]);
            fasa_kernels::cpu::quantize_page_block(&hp.k[p], PAGE, c.shape.n_fc(), bi, &mut q, &mut sc);
            for f in 0..c.shape.n_fc() {
                let o = f * 2 * PAGE + bi * QB;
                for r in [o, o + PAGE] {
                    assert_eq!(q[r..r + QB], hp.q8[p][r..r + QB], "block {b} FC {f}");
                }
                assert_eq!(sc[f * (PAGE / QB) + bi], hp.q8_scale[p][f * (PAGE / QB) + bi]);
            }
        }
    }

    #[test]
    fn q8_planes_follow_appends_rollbacks_and_copies() {
        let shape = CacheShape { n_layers: 1, n_kv_heads: 1, head_dim: 8 };
        let mut c = SeqCache::new(shape);
        let k = |t: usize, round: usize| -> Vec<f32> { (0..8).map(|j| ((t * 7 + j * 3 + round) % 11) as f32 - 5.0 + j as f32 / 8.0).collect() };
        let n = 2 * PAGE + 9;
        for t in 0..n {
            c.resize(0, t, 1).unwrap();
            c.write(0, 0, t, &k(t, 0), &[0.0; 8]);
            assert_q8_current(&c, (t + 1) / QB);
        }
        // Roll back into the second block and rewrite it with other values: the block and those
        // after it are void until rewritten in order.
        c.resize(0, QB + 5, 0).unwrap();
        assert_q8_current(&c, 1);
        c.resize(0, QB + 5, 2 * QB).unwrap();
        for t in QB + 5..3 * QB + 5 {
            c.write(0, 0, t, &k(t, 1), &[0.0; 8]);
        }
        assert_q8_current(&c, 3);
        // TIP from the int8 planes stays close to the f32 planes' scores.
        let (pages, q) = (c.pages(0, 0), [0.5f32, -1.0, 0.25, 2.0, 1.0, 0.0, -0.5, 0.75]);
        let (view, q8) = (pages.view(), pages.q8_view().unwrap());
        let (mut a, mut b) = (vec![0f32; 3 * QB + 5], vec![0f32; 3 * QB + 5]);
        fasa_kernels::cpu::fc_scores(&view, &q, &[0, 2, 3], a.len(), &mut a, false);
        fasa_kernels::cpu::fc_scores_q8(&view, &q8, &q, &[0, 2, 3], b.len(), &mut b, false);
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 0.1), "{a:?} vs {b:?}");
        assert_eq!(a[3 * QB..], b[3 * QB..], "the filling block is read from the f32 planes");
        let mut d = SeqCache::new(shape);
        d.copy_from(&c).unwrap();
        assert_q8_current(&d, 3);
    }

    #[test]
    fn fasa_m_keeps_resident_planes_fast_and_rows_in_the_slow_tier() {
        let dir = tempfile::tempdir().unwrap();
        let pool = tiered_pool(dir.path(), 8);
        let lease = pool.acquire().unwrap();
        let n = PAGE + 5;
        {
            let mut c = pool.lock(lease.slot()).unwrap();
            assert!(c.is_tiered());
            assert_eq!((c.resident(1, 0), c.resident(1, 1)), (&[3, 1][..], &[2, 0][..]));
            let d = c.resize(1, 0, n).unwrap();
            pool.account(d);
            // Token t, head h: K element j = 100·h + t + j/10, V = −(that).
            for h in 0..2 {
                for t in 0..n {
                    let k: Vec<f32> = (0..8).map(|j| (100 * h + t) as f32 + j as f32 / 10.0).collect();
                    let v: Vec<f32> = k.iter().map(|x| -x).collect();
                    c.write(1, h, t, &k, &v);
                }
            }
            let pages = c.pages(1, 1);
            let full = pages.view();
            assert!(full.k_pages.is_empty(), "no full-FC planes on FASA-M");
            assert_eq!(full.k_row(PAGE + 2)[3], (100 + PAGE + 2) as f32 + 0.3);
            assert_eq!(full.v_row(7)[0], -107.0);
            // Plane 0 of head 1 is FC 2 (dims 4, 5); plane 1 is FC 0.
            let planes = pages.plane_view();
            assert_eq!(planes.n_fc, 2);
            assert_eq!(planes.k_pages[1][2 * 2 + 1], (100 + PAGE + 2) as f32 + 0.5);
            assert_eq!(planes.k_pages[1][(PAGE + 2) * 2], (100 + PAGE + 2) as f32);
            // The row cache copies rows out of the slow tier.
            let mut rc = c.row_cache(1, 1).unwrap();
            let (slots, f) = rc.fetch(&[3, PAGE as u32 + 1], |t, k, v| c.load_row(1, 1, t, k, v)).unwrap();
            assert_eq!((f.hits, f.moved), (0, 2));
            assert_eq!(rc.k(slots[1])[1], (100 + PAGE + 1) as f32 + 0.1);
            assert_eq!(rc.v(slots[0])[2], -(103.0 + 2.0 / 10.0));
            // The operator accounts the row cache's storage when a fetch allocates it.
            pool.account(TierBytes { fast: rc.bytes() as isize, slow: 0 });
        }
        // Fast: 2 heads × 2 pages × 2 planes + one row cache of 8 rows; slow: 2 heads × 2 pages
        // × K and V rows.
        let (fast, slow) = pool.bytes_in_use_by_tier();
        assert_eq!(slow, 2 * 2 * 2 * PAGE * 8 * 4);
        assert_eq!(fast, 2 * 2 * 2 * PAGE * 2 * 4 + 8 * 2 * 8 * 4);
        // The rewound tail leaves the row cache; pages go back to the file's free list.
        {
            let mut c = pool.lock(lease.slot()).unwrap();
            let d = c.resize(1, 2, 0).unwrap();
            pool.account(d);
            assert!(!c.row_cache(1, 1).unwrap().contains(3));
        }
        assert_eq!(pool.bytes_in_use_by_tier().1, 2 * 2 * PAGE * 8 * 4);
        drop(lease);
        assert_eq!(pool.bytes_in_use(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no slow-tier file left behind");
    }

    #[test]
    fn fasa_m_copy_slot_copies_both_tiers() {
        let dir = tempfile::tempdir().unwrap();
        let pool = tiered_pool(dir.path(), 8);
        let (a, b) = (pool.acquire().unwrap(), pool.acquire().unwrap());
        {
            let mut c = pool.lock(a.slot()).unwrap();
            pool.account(c.resize(0, 0, 3).unwrap());
            for t in 0..3 {
                c.write(0, 1, t, &[t as f32; 8], &[-(t as f32); 8]);
            }
        }
        assert!(pool.copy_slot(a.slot(), b.slot()));
        let c = pool.lock(b.slot()).unwrap();
        assert_eq!(c.len(0), 3);
        assert_eq!(c.pages(0, 1).view().v_row(2), &[-2.0; 8]);
        assert_eq!(c.pages(0, 1).plane_view().k_pages[0][2 * 2], 2.0);
        drop(c);
        assert_eq!(pool.bytes_in_use_by_tier().1, 2 * 2 * 2 * PAGE * 8 * 4);
    }

    #[test]
    fn fasa_m_refuses_what_it_cannot_serve() {
        let dir = tempfile::tempdir().unwrap();
        let pool = tiered_pool(dir.path(), 64);
        let mut c = AttnConfig::fasa(64, 2);
        (c.pool, c.recent, c.rerank) = (2, 16, 0);
        assert_eq!(pool.check_config(&c), Ok(()));
        c.pool = 3;
        assert!(pool.check_config(&c).unwrap_err().contains("at most 2"));
        c.pool = 2;
        c.budget = 65;
        assert!(pool.check_config(&c).unwrap_err().contains("at most 64"));
        for m in [Mode::Oracle, Mode::Quest, Mode::RandomFc] {
            assert!(pool.check_config(&AttnConfig::baseline(m, 32, 2)).unwrap_err().contains(m.as_str()));
        }
        assert_eq!(pool.check_config(&AttnConfig::baseline(Mode::Streaming, 32, 2)), Ok(()));
        assert_eq!(pool.check_config(&AttnConfig::dense()), Ok(()));
        assert_eq!(pool.check_config(&AttnConfig::paper(32, 2)), Ok(()));
        // A query head whose own ranking leaves its KV head's resident set.
        let mut p = Profile::clone(&pool.profile());
        p.layers[1].q_heads[3].ranked_fcs = vec![1, 2, 0, 3];
        pool.set_profile(p);
        assert!(pool.check_config(&AttnConfig::paper(32, 2)).unwrap_err().contains("query head 3"));
        assert_eq!(pool.check_config(&AttnConfig { pool: 2, rerank: 0, ..AttnConfig::fasa(32, 2) }), Ok(()), "per-group selection uses the KV head's ranking");
        let fit = pool.fit_config(AttnConfig::default());
        assert_eq!(pool.check_config(&fit), Ok(()));
        // FASA-C serves everything.
        let shape = CacheShape { n_layers: 2, n_kv_heads: 2, head_dim: 8 };
        let c_pool = CachePool::new(shape, 1, 64, pool.profile().as_ref().clone(), KvVariant::FasaC);
        assert_eq!(c_pool.check_config(&AttnConfig::baseline(Mode::Oracle, 32, 4)), Ok(()));
    }

    #[test]
    fn fasa_m_fast_tier_is_at_most_a_sixth_of_dense_kv() {
        // SmolLM2-135M: 30 layers, 3 KV heads, d = 64; 8 of 32 FCs resident, B = 256 rows.
        let shape = CacheShape { n_layers: 30, n_kv_heads: 3, head_dim: 64 };
        let prof = Profile::heuristic(&model_cfg(30, 9, 3, 64), "");
        let m = CachePool::new(shape, 1, 8192, prof.clone(), KvVariant::FasaM { resident_fcs: 8, row_cache_rows: 256 });
        let c = CachePool::new(shape, 1, 8192, prof, KvVariant::FasaC);
        let dense = 30 * 3 * 2 * 64 * 4; // K and V once, f32
        let (fast, slow) = m.bytes_per_token_by_tier();
        assert_eq!((fast, slow), (30 * 3 * 8 * 2 * 4, dense));
        assert!(6 * fast <= dense, "{fast} vs {dense}");
        assert_eq!(c.bytes_per_token_by_tier(), (shape.bytes_per_token(), 0));
        assert_eq!(m.row_cache_bytes_per_slot(), 30 * 3 * 256 * 2 * 64 * 4);
        eprintln!("bytes/token: dense KV {dense}, FASA-C {:?}, FASA-M {:?} + row caches {} B/slot", c.bytes_per_token_by_tier(), (fast, slow), m.row_cache_bytes_per_slot());
    }
}
