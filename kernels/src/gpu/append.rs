//! The GPU KV cache and its append op.
//!
//! Layout, per (sequence, KV head), `l_max` tokens (a multiple of `KT` = 64):
//! - K `(l_max/KT, n_grp/r, KT, r, FCG, 2)`, r = min(`KR`, n_grp) (by default 8: a token's K is
//!   one row of `2d` bytes): tiles of 64 tokens; FC group `g` (FCs `8g..8g+8` in slot order) is 32
//!   bytes of a token, and groups `r·i .. r·i + r` of a token one run; inside a tile, run `i` of
//!   all its tokens is contiguous. Slot `s` holds FC `fc_of_slot[kv][s]`: put the calibrated pool
//!   first, so a 16-bit TIP reads only the runs holding it (with r = 2, the first `ceil(P/16)`
//!   runs of each tile, 4 KiB each: `FASA_GPU_KRUN=2`), FAC reads a token's full K as `d/(16r)`
//!   runs (HBM reads 64-byte units: with 32-byte pieces FAC moved twice K's bytes, GPU run 12; whole
//!   rows read fastest, run 22), and dense attention reads whole tiles. [`GpuKvCache::k_index`]
//!   gives the offset.
//! - V `(l_max, d)` in the model's dim order.
//! - K moments `(n_fc, 5)` f64 per FC id, `[Σx, Σy, Σxx, Σxy, Σyy]` of its rotated pair over the
//!   stored tokens `0..mom_len` (`cpu::FcMoments`): the variance-based FC choice reads them
//!   instead of the K planes. f64 because the variance is a difference of large sums.
//!
//! - Optionally ([`GpuKvCache::enable_q8`]) the int8 scoring planes TIP reads instead of K for
//!   whole blocks of `QB` = 32 tokens ([`Q8Planes`]; the format of `cpu::quant`), one 16-byte
//!   piece per group (K's layout with r = 1), so TIP reads only the chosen groups; or
//!   ([`GpuKvCache::enable_scoring_planes`] with 4 bits) int4 ones, an 8-byte piece per group
//!   (two values a byte), read by the pipelined TIP kernels only (`tip4p`, `tip4ph_h*`); or
//!   ([`GpuKvCache::enable_scoring_planes_as`], `by_fc`) int8 ones stored per FC, a run of 64
//!   pairs per slot and tile, read by `tipfc_h*` only: a TIP that chooses k FCs per step from a
//!   larger pool reads those k, not every group holding one.
//!
//! (The CPU cache keeps K twice, as FC planes and as rows; the GPU keeps it once: the 32-byte
//! groups give TIP FC granularity of 8, the runs of groups FAC whole DRAM units.)
use cudarc::driver::{CudaSlice, CudaView, PushKernelArg};

use super::{cfg, k_run, Dims, Dtype, Gpu, GpuError, TypedOp, FCG, GE, KT, QB};

/// Int8 (or int4) copy of K for TIP, quantised as `cpu::quantize_block_bits` from the stored
/// 16-bit K: per (sequence, KV head), FC slot and block of `QB` tokens one f32 scale (absmax/L
/// over the pair, L = 127 or 7), values `round(v · L/absmax)`. Only whole blocks, and only a prefix of them: the
/// append op quantises a block when its last token is written and drops the blocks from a
/// rewritten position on; TIP reads tokens from `min(blocks, len/QB)·QB` on from K.
pub struct Q8Planes {
    /// `(batch, n_kv, l_max/KT, n_grp, KT, GE)` i8: tiles of `KT` tokens, group `g` of all of
    /// them contiguous, one byte per element; with int4 `(…, KT, GE/2)`: byte `i` of a piece is
    /// slot `8g + i`'s pair, x in the low nibble and y in the high one (two's complement); per FC
    /// (`by_fc`, int8) `(batch, n_kv, l_max/KT, n_fc, KT, 2)`: slot `j` of all of a tile's tokens
    /// contiguous.
    pub q: CudaSlice<i8>,
    /// `(batch, n_kv, l_max/QB, n_fc)` f32, slots in order: the dequantisation factors.
    pub scales: CudaSlice<f32>,
    /// `(batch, n_kv)` whole blocks quantised.
    pub blocks: CudaSlice<i32>,
    /// `(batch, n_kv)` the first block [`append_rows`] left to quantise (the blocks below it hold
    /// none of the rows it wrote); the quantiser reads it where it writes `blocks`.
    pub from: CudaSlice<i32>,
    /// Bits per value: 8, or 4.
    pub bits: u32,
    /// Int8 values stored per FC (the `tipfc_h*` TIP reads them): a TIP that chooses its k FCs
    /// per step from a larger pool then reads k of them a token, not every group of 8 FCs that
    /// holds one. Grouped planes (false) serve the other TIP kernels.
    pub by_fc: bool,
}

impl Q8Planes {
    /// Whether `planes` are int4 ones (only the pipelined TIP kernels read them).
    pub fn int4(planes: Option<&Q8Planes>) -> bool {
        planes.is_some_and(|p| p.bits == 4)
    }

    /// `Dims::flags` with the planes' width bit ([`super::Q4_PLANES`]) set from `bits` and their
    /// layout bit ([`super::FC_PLANES`]) from `by_fc`: the kernels address and quantise the planes
    /// by them.
    pub fn flags(planes: Option<&Q8Planes>, flags: i32) -> i32 {
        let fc = if Self::per_fc(planes) { super::FC_PLANES } else { 0 };
        (flags & !(super::Q4_PLANES | super::FC_PLANES)) | if Self::int4(planes) { super::Q4_PLANES } else { 0 } | fc
    }

    /// Whether `planes` are stored per FC (read by `tipfc_h*` only).
    pub fn per_fc(planes: Option<&Q8Planes>) -> bool {
        planes.is_some_and(|p| p.by_fc)
    }
}

pub struct GpuKvCache {
    pub dtype: Dtype,
    pub batch: usize,
    pub n_kv: usize,
    pub d: usize,
    pub l_max: usize,
    /// `(batch, n_kv, l_max/KT, n_grp/r, KT, r·GE)` storage bits ([`GpuKvCache::k_index`]).
    pub k: CudaSlice<u16>,
    /// `(batch, n_kv, l_max, d)` storage bits.
    pub v: CudaSlice<u16>,
    /// `(n_kv, n_fc)`: FC stored in each slot, and its inverse.
    pub fc_of_slot: CudaSlice<i32>,
    pub slot_of_fc: CudaSlice<i32>,
    /// Host copy of `fc_of_slot`.
    pub order: Vec<Vec<usize>>,
    /// `(batch, n_kv, n_fc, 5)` K moments per FC id over tokens `0..mom_len` (module docs).
    pub mom: CudaSlice<f64>,
    /// `(batch, n_kv)` tokens the moments cover: [`append`] keeps it at the highest position
    /// written + 1, [`GpuKvCache::write_host`] and [`append_rows`] set it to the end of the rows
    /// written. TIP takes the moments as covering the sequence's `lens[b]` tokens, so the two
    /// must agree (as they do when tokens are only appended; after a rewind, write the kept rows
    /// again).
    pub mom_len: CudaSlice<i32>,
    /// Int8 scoring planes (None until [`GpuKvCache::enable_q8`]).
    pub q8: Option<Q8Planes>,
}

impl GpuKvCache {
    /// A zeroed cache of at least `l_max` tokens (rounded up to a multiple of 64). `order[kv]` lists the FCs of KV head `kv` in slot order (a permutation of
    /// `0..d/2`, pool first); None keeps the natural order.
    pub fn new(
        gpu: &Gpu,
        dtype: Dtype,
        batch: usize,
        n_kv: usize,
        d: usize,
        l_max: usize,
        order: Option<Vec<Vec<usize>>>,
    ) -> Result<Self, GpuError> {
        if d != 64 && d != 128 {
            return Err(GpuError::Shape(format!("head dim {d}: the kernels take 64 or 128")));
        }
        let n_fc = d / 2;
        let l_max = l_max.next_multiple_of(KT);
        let order = order.unwrap_or_else(|| vec![(0..n_fc).collect(); n_kv]);
        let mut fos = Vec::with_capacity(n_kv * n_fc);
        let mut sof = vec![0i32; n_kv * n_fc];
        for (kv, o) in order.iter().enumerate() {
            let mut seen = vec![false; n_fc];
            if o.len() != n_fc || o.iter().any(|&f| f >= n_fc || std::mem::replace(&mut seen[f], true)) {
                return Err(GpuError::Shape(format!("FC order of KV head {kv} is not a permutation of 0..{n_fc}")));
            }
            for (s, &f) in o.iter().enumerate() {
                fos.push(f as i32);
                sof[kv * n_fc + f] = s as i32;
            }
        }
        let st = &gpu.stream;
        let elems = batch * n_kv * l_max * d;
        Ok(Self {
            dtype,
            batch,
            n_kv,
            d,
            l_max,
            k: st.alloc_zeros(elems)?,
            v: st.alloc_zeros(elems)?,
            fc_of_slot: st.clone_htod(&fos)?,
            slot_of_fc: st.clone_htod(&sof)?,
            order,
            mom: st.alloc_zeros(batch * n_kv * n_fc * 5)?,
            mom_len: st.alloc_zeros(batch * n_kv)?,
            q8: None,
        })
    }

    /// Adds the int8 scoring planes (half K's bytes again) and quantises the whole blocks of the
    /// tokens stored so far (`mom_len` of each sequence and KV head); from then on
    /// [`write_host`](Self::write_host) and [`append`] keep them.
    pub fn enable_q8(&mut self, gpu: &Gpu) -> Result<(), GpuError> {
        self.enable_scoring_planes(gpu, 8)
    }

    /// [`enable_q8`](Self::enable_q8) with values of `bits` bits: 8, or 4 (a quarter of K's
    /// bytes; `cpu::quantize_block_bits`), grouped. Planes of another width or layout are replaced.
    pub fn enable_scoring_planes(&mut self, gpu: &Gpu, bits: u32) -> Result<(), GpuError> {
        self.enable_scoring_planes_as(gpu, bits, false)
    }

    /// [`enable_scoring_planes`](Self::enable_scoring_planes), the int8 values stored per FC when
    /// `by_fc` ([`Q8Planes::by_fc`]; for a TIP that chooses its FCs per step from a larger pool).
    pub fn enable_scoring_planes_as(&mut self, gpu: &Gpu, bits: u32, by_fc: bool) -> Result<(), GpuError> {
        if bits != 8 && bits != 4 {
            return Err(GpuError::Shape(format!("scoring planes of {bits} bits: 8 or 4")));
        }
        if by_fc && bits != 8 {
            return Err(GpuError::Shape("scoring planes per FC hold int8 values only".into()));
        }
        if self.q8.as_ref().is_none_or(|p| p.bits != bits || p.by_fc != by_fc) {
            self.q8 = None; // (freed before the new planes are allocated)
            let st = &gpu.stream;
            let (bk, l) = (self.batch * self.n_kv, self.l_max);
            let q = st.alloc_zeros(bk * l * self.d * bits as usize / 8)?;
            let (blocks, from) = (st.alloc_zeros(bk)?, st.alloc_zeros(bk)?);
            self.q8 = Some(Q8Planes { q, scales: st.alloc_zeros(bk * (l / QB) * self.n_fc())?, blocks, from, bits, by_fc });
        }
        self.quantize(gpu, Quantize::All)
    }

    /// Quantises whole blocks of the int8 planes (`Quantize`). No-op without them.
    fn quantize(&mut self, gpu: &Gpu, which: Quantize) -> Result<(), GpuError> {
        let (dims, n_fc) = (self.dims(self.n_kv), self.n_fc());
        let Some(q8) = &mut self.q8 else { return Ok(()) };
        // grid (blocks, KV heads, sequences) from (b0, kv0).
        let (grid, b0, kv0, len) = match which {
            Quantize::One { b, kv, len } => (((len / QB).max(1), 1, 1), b, kv, len),
            Quantize::Rows { b, len } => (((len / QB).max(1), self.n_kv, 1), b, 0, len),
            Quantize::All => ((self.l_max / QB, self.n_kv, self.batch), 0, 0, 0),
        };
        let (b0, kv0, len) = (b0 as i32, kv0 as i32, len as i32);
        let null = 0u64;
        let mut l = gpu.stream.launch_builder(&gpu.f.quant_blocks[self.dtype as usize]);
        l.arg(&dims).arg(&self.k).arg(&mut q8.q).arg(&mut q8.scales).arg(&mut q8.blocks).arg(&b0).arg(&kv0);
        match which {
            Quantize::All => l.arg(&self.mom_len),
            _ => l.arg(&null),
        };
        l.arg(&len);
        match which {
            Quantize::Rows { .. } => l.arg(&q8.from),
            _ => l.arg(&null),
        };
        // SAFETY: the grid covers (sequence, KV head) pairs inside (batch, n_kv) (b < batch, kv <
        // n_kv checked by the callers) and blocks < l_max/QB; each thread block reads and writes
        // one block of QB tokens of its own (sequence, KV head) region (threads j < n_fc, one
        // slot each); q8 holds (batch, n_kv, ...) as allocated in enable_q8.
        unsafe { l.launch(cfg(grid, n_fc)) }?;
        Ok(())
    }

    pub fn n_fc(&self) -> usize {
        self.d / 2
    }

    pub fn n_grp(&self) -> usize {
        self.d / 2 / FCG
    }

    /// Offset in one (sequence, KV head) region of `k` of token `t`'s FC slot `s` (its x; y
    /// follows): tile `t/KT`, run `g/r`, token `t%KT`, group `g%r` of the run, `g = s/FCG`, r =
    /// min(`KR`, n_grp) (`k_off` in fasa.cu).
    pub fn k_index(&self, t: usize, s: usize) -> usize {
        k_offset(self.d, t, s)
    }

    /// Dims with the cache's shape filled in.
    pub fn dims(&self, n_q: usize) -> Dims {
        Dims {
            batch: self.batch as i32,
            n_q: n_q as i32,
            n_kv: self.n_kv as i32,
            d: self.d as i32,
            n_fc: self.n_fc() as i32,
            n_grp: self.n_grp() as i32,
            l_max: self.l_max as i32,
            scale: 1.0 / (self.d as f32).sqrt(),
            flags: Q8Planes::flags(self.q8.as_ref(), 0),
            ..Default::default()
        }
    }

    /// Writes tokens `0..len` of (sequence `b`, KV head `kv`) from host rows: `k` `(len, d)` rotated,
    /// FC-pair order; `v` `(len, d)`; and their K moments (of the stored, rounded values, summed
    /// in token order by `cpu::add_moments`, as the CPU cache sums them). (Prefill and tests;
    /// decode uses [`append`].)
    pub fn write_host(&mut self, gpu: &Gpu, b: usize, kv: usize, k: &[f32], v: &[f32]) -> Result<(), GpuError> {
        let (d, l) = (self.d, self.l_max);
        let len = k.len() / d;
        if len > l || v.len() != k.len() || k.len() != len * d || b >= self.batch || kv >= self.n_kv {
            return Err(GpuError::Shape(format!("{len} tokens of (b < {}, kv < {}) do not fit l_max {l}", self.batch, self.n_kv)));
        }
        // K: the tiles that hold tokens 0..len (the rest of the region zeroed on the device).
        let (kr, m) = encode_k(self.dtype, d, &self.order[kv], k);
        let mut vr = vec![0u16; len * d];
        self.dtype.encode_slice(v, &mut vr);
        let base = (b * self.n_kv + kv) * l * d;
        gpu.stream.memcpy_htod(&kr, &mut self.k.slice_mut(base..base + kr.len()))?;
        if kr.len() < l * d {
            gpu.stream.memset_zeros(&mut self.k.slice_mut(base + kr.len()..base + l * d))?;
        }
        gpu.stream.memcpy_htod(&vr, &mut self.v.slice_mut(base..base + len * d))?;
        self.quantize(gpu, Quantize::One { b, kv, len })?;
        self.write_moments(gpu, b, kv, &m, len)
    }

    /// Sets the K moments of (sequence `b`, KV head `kv`) to `m` (`(n_fc,)`, per FC id), taken to
    /// cover tokens `0..len` (a prefill that summed them itself; benchmarks' stand-ins).
    pub fn write_moments(&mut self, gpu: &Gpu, b: usize, kv: usize, m: &[crate::cpu::FcMoments], len: usize) -> Result<(), GpuError> {
        let n_fc = self.n_fc();
        if m.len() != n_fc || b >= self.batch || kv >= self.n_kv || len > self.l_max {
            return Err(GpuError::Shape(format!("moments: need {n_fc} FCs of (b < {}, kv < {}), len ≤ {}", self.batch, self.n_kv, self.l_max)));
        }
        let flat: Vec<f64> = m.iter().flatten().copied().collect();
        let o = (b * self.n_kv + kv) * n_fc * 5;
        gpu.stream.memcpy_htod(&flat, &mut self.mom.slice_mut(o..o + n_fc * 5))?;
        let i = b * self.n_kv + kv;
        gpu.stream.memcpy_htod(&[len as i32], &mut self.mom_len.slice_mut(i..i + 1))?;
        Ok(())
    }
}

/// Device bytes a layer's GPU mirror holds per token of its `l_max`, for `n_kv` KV heads, `n_q`
/// query heads and head dim `d`: K and V in fp16 ([`GpuKvCache::new`]), the int8 scoring planes
/// and their scales ([`GpuKvCache::enable_scoring_planes_as`]), and at most 32 bytes a query
/// head of the decoder's workspaces sized by the context (`FasaDecoder::new`, per selection and
/// token: f32 scores, u64 candidate keys; per query head: f32 per-head scores; the re-rank's C ≤
/// l_max candidates: f32 per-head scores, mass and u32 rows). The memory planner counts them
/// where the GPU shares the host's memory.
pub fn mirror_bytes_per_token(n_kv: usize, n_q: usize, d: usize) -> u64 {
    let kv = n_kv * 2 * d * 2;
    let planes = n_kv * (d + (d / 2) * 4 / QB);
    (kv + planes + 32 * n_q) as u64
}

/// Offset in one (sequence, KV head) region of `k` of token `t`'s FC slot `s` (its x; y
/// follows), head dim `d`: [`GpuKvCache::k_index`].
fn k_offset(d: usize, t: usize, s: usize) -> usize {
    let (n_grp, g) = (d / 2 / FCG, s / FCG);
    let r = k_run().min(n_grp);
    t / KT * n_grp * KT * GE + (g / r * KT + t % KT) * r * GE + (g % r) * GE + (s % FCG) * 2
}

/// Host rows `k (len, d)` (rotated, FC-pair order) of one KV head as its region of
/// [`GpuKvCache::k`] stores them: the `ceil(len / KT)` tiles holding them, FC `order[s]` in slot
/// `s`, tokens past len zero; and the K moments of the stored (rounded) values per FC id, summed
/// in token order as the CPU cache sums them. Each row is converted once, in FC-pair order, then
/// its pairs go to their slots: a slot's offset from its token's first is the same for every
/// token. ([`GpuKvCache::write_host`] is the host-side twin of [`append_rows`], which the engine
/// uses: tests and benchmarks fill caches with it, and the GPU tests check one against the other.)
fn encode_k(dtype: Dtype, d: usize, order: &[usize], k: &[f32]) -> (Vec<u16>, Vec<crate::cpu::FcMoments>) {
    let len = k.len() / d;
    let slots: Vec<(usize, usize)> = order.iter().enumerate().map(|(s, &f)| (k_offset(d, 0, s), f)).collect();
    let mut kr = vec![0u16; len.div_ceil(KT) * KT * d];
    let (mut bits, mut rounded) = (vec![0u16; d], vec![0f32; d]);
    let mut m = vec![[0f64; 5]; d / 2];
    for (t, row) in k.chunks_exact(d).enumerate() {
        dtype.encode_slice(row, &mut bits);
        let at = k_offset(d, t, 0);
        for &(o, f) in &slots {
            kr[at + o] = bits[2 * f];
            kr[at + o + 1] = bits[2 * f + 1];
        }
        dtype.decode_slice(&bits, &mut rounded);
        for (f, mf) in m.iter_mut().enumerate() {
            crate::cpu::add_moments(mf, rounded[2 * f], rounded[2 * f + 1]);
        }
    }
    (kr, m)
}

/// Op 1: writes one new token per sequence at `pos[b]`: `k_new`, `v_new` `(batch, n_kv, d)` f32
/// (K rotated, FC-pair order), and updates the K moments and the int8 planes (module docs).
/// Sequences with `pos` outside `0..l_max` are skipped.
pub fn append(gpu: &Gpu, cache: &mut GpuKvCache, k_new: &CudaSlice<f32>, v_new: &CudaSlice<f32>, pos: &CudaSlice<i32>) -> Result<(), GpuError> {
    let n = cache.batch * cache.n_kv * cache.d;
    if k_new.len() < n || v_new.len() < n || pos.len() < cache.batch {
        return Err(GpuError::Shape("append: k_new/v_new need (batch, n_kv, d), pos (batch,)".into()));
    }
    let dims = cache.dims(cache.n_kv);
    let f = gpu.f.typed(cache.dtype, TypedOp::Append);
    let mut l = gpu.stream.launch_builder(f);
    l.arg(&dims).arg(&mut cache.k).arg(&mut cache.v).arg(k_new).arg(v_new).arg(pos).arg(&cache.slot_of_fc);
    l.arg(&mut cache.mom).arg(&mut cache.mom_len);
    let null = 0u64;
    match &mut cache.q8 {
        Some(q8) => l.arg(&mut q8.q).arg(&mut q8.scales).arg(&mut q8.blocks),
        None => l.arg(&null).arg(&null).arg(&null),
    };
    // SAFETY: grid (n_kv, batch) × d threads; each writes one element of token pos[b] < l_max of
    // its (b, kv) region (thread j < n_fc also FC j's K pair and moments, and with int8 planes
    // slot j of the block pos[b] completes), bounds checked in the kernel; inputs hold (batch,
    // n_kv, d) (checked above), mom (batch, n_kv, n_fc, 5), q8 as allocated by enable_q8.
    unsafe { l.launch(cfg((cache.n_kv, cache.batch, 1), cache.d)) }?;
    Ok(())
}

/// Writes tokens `t0..t0 + len` of sequence `b`, every KV head, from device rows `k_rows`,
/// `v_rows` `(n_kv, len, d)` f32 (K rotated, FC-pair order; V in the model's order): the contents
/// [`GpuKvCache::write_host`] gives, converted and laid out on the device (fasa.cu's
/// `append_rows_impl`), so a host only gathers rows. The K moments become those of tokens
/// `0..t0 + len` in token order (counted again below `t0` unless they covered exactly `0..t0`),
/// `mom_len` `t0 + len`; the int8 planes' blocks are quantised again from the one holding `t0`
/// (or the first not quantised, if earlier) to the new length, so a prompt written in chunks
/// quantises each block once.
pub fn append_rows(gpu: &Gpu, cache: &mut GpuKvCache, b: usize, t0: usize, len: usize, k_rows: &CudaView<f32>, v_rows: &CudaView<f32>) -> Result<(), GpuError> {
    let n = cache.n_kv * len * cache.d;
    if b >= cache.batch || t0 + len > cache.l_max || k_rows.len() < n || v_rows.len() < n {
        return Err(GpuError::Shape(format!("append_rows: tokens {t0}..{} of sequence {b} from (n_kv, len, d) rows: batch {}, l_max {}", t0 + len, cache.batch, cache.l_max)));
    }
    if len == 0 {
        return Ok(());
    }
    let dims = cache.dims(cache.n_kv);
    let (b32, t0_32, len32) = (b as i32, t0 as i32, len as i32);
    // Row blocks: about 8 elements a thread, at most 32 blocks per KV head.
    let row_blocks = n.div_ceil(cache.n_kv * 256 * 8).clamp(1, 32);
    let mut l = gpu.stream.launch_builder(gpu.f.typed(cache.dtype, TypedOp::AppendRows));
    l.arg(&dims).arg(&mut cache.k).arg(&mut cache.v).arg(k_rows).arg(v_rows).arg(&b32).arg(&t0_32).arg(&len32);
    l.arg(&cache.slot_of_fc).arg(&mut cache.mom).arg(&mut cache.mom_len);
    let null = 0u64;
    match &mut cache.q8 {
        Some(q8) => l.arg(&mut q8.blocks).arg(&mut q8.from),
        None => l.arg(&null).arg(&null),
    };
    // SAFETY: grid (n_kv, 1 + row_blocks) × 256 threads (≥ n_fc); the row blocks write tokens
    // t0..t0+len < l_max of sequence b's regions, the moment block reads K below t0 and writes
    // mom/mom_len (and the planes' blocks/from) of (b, kv) only; the rows hold (n_kv, len, d)
    // (checked above).
    unsafe { l.launch(cfg((cache.n_kv, 1 + row_blocks, 1), 256)) }?;
    cache.quantize(gpu, Quantize::Rows { b, len: t0 + len })
}

/// Which blocks [`GpuKvCache::quantize`] quantises: those below `len` of (`b`, `kv`); those of
/// sequence `b` from each KV head's `from` (set by [`append_rows`]) below `len`; or those below
/// every (sequence, KV head)'s `mom_len`. Each sets `blocks` to the count below its length.
#[derive(Clone, Copy)]
enum Quantize {
    One { b: usize, kv: usize, len: usize },
    Rows { b: usize, len: usize },
    All,
}

#[cfg(test)]
mod tests {
    use super::{encode_k, k_offset, Dtype, KT};

    /// The tiles and moments of `encode_k` against a value-by-value reference: each element
    /// converted on its own at `k_offset`, moments of the rounded values in token order.
    #[test]
    fn encoded_rows_match_a_value_by_value_reference() {
        for (dt, d, len) in [(Dtype::F16, 64, 2049), (Dtype::Bf16, 128, 70), (Dtype::F16, 128, 64), (Dtype::F16, 64, 1)] {
            let n_fc = d / 2;
            let order: Vec<usize> = (0..n_fc).map(|s| (s * 7 + 3) % n_fc).collect();
            let k: Vec<f32> = (0..len * d).map(|i| ((i * 2654435761usize) % 20011) as f32 / 20011.0 * 8.0 - 4.0).collect();
            let (kr, m) = encode_k(dt, d, &order, &k);
            assert_eq!(kr.len(), len.div_ceil(KT) * KT * d);
            let mut want = vec![0u16; kr.len()];
            let mut wm = vec![[0f64; 5]; n_fc];
            for t in 0..len {
                for (s, &f) in order.iter().enumerate() {
                    let o = k_offset(d, t, s);
                    want[o] = dt.encode(k[t * d + 2 * f]);
                    want[o + 1] = dt.encode(k[t * d + 2 * f + 1]);
                }
                for (f, mf) in wm.iter_mut().enumerate() {
                    let r = |x: f32| dt.decode(dt.encode(x));
                    crate::cpu::add_moments(mf, r(k[t * d + 2 * f]), r(k[t * d + 2 * f + 1]));
                }
            }
            assert!(kr == want, "{dt:?} d {d} len {len}: tiles differ");
            assert!(m == wm, "{dt:?} d {d} len {len}: moments differ");
        }
    }
}
