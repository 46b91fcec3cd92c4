//! One decode step of FASA attention on the GPU, chaining the ops:
//! TIP(+histogram; its last block per selection finds the select threshold) → select (filter;
//! its last block per selection refines) [→ re-rank: exact scores; mass + refine] → FAC
//! (split-K partials; by default launched as the refine begins, `FasaDecoder::early_fac`, or
//! at batch 1 as the filter begins, `FasaDecoder::fac_cands`) →
//! combine: 4 launches (by default the filter's blocks start on a selection as soon as TIP has
//! found its threshold, `FasaDecoder::early_select`) (6 with a re-rank), one more with the group-mass
//! stage 1 (TIP per-head scores, then mass + histogram); or dense flash-decode over the
//! same cache. Every grid depends on the shapes only
//! (not on the lengths), so a step can be captured once in a CUDA graph and replayed.
use cudarc::driver::{CudaGraph, CudaSlice};

use super::launch::pdl_scope;
use super::{fac, rerank, select, tip, Dims, FacKernel, Gpu, GpuError, GpuKvCache, Q8Planes, NBIN};

/// The operator's mode, as `AttnConfig` on the CPU (engine): every knob of the default `fasa`
/// mode and of the paper's recipe.
#[derive(Debug, Clone)]
pub struct DecodeConfig {
    /// Query heads (a multiple of the cache's KV heads, at most 8 per KV head).
    pub n_q: usize,
    /// One token set per KV group (q heads summed) rather than per q head.
    pub per_group: bool,
    /// Rows kept B.
    pub budget: usize,
    /// FCs scored per step k.
    pub chunks: usize,
    /// Calibrated pool per selection (n_kv lists when per_group, else n_q), FC ids, best first;
    /// the first `P` are the pool. `P == k` is the paper's fixed set.
    pub pools: Vec<Vec<usize>>,
    /// Pool size P (≥ k).
    pub pool: usize,
    pub sinks: usize,
    pub recent: usize,
    /// Candidates C picked by FC score before exact scores pick B; 0 (or ≤ B) = no re-rank.
    pub rerank: usize,
    /// Choose the k FCs of the pool by the logit variance they cause over the cached tokens,
    /// from the cache's K moments (`cpu::choose_fcs_var`), instead of by Σ_h ‖q_{h,f}‖
    /// (`cpu::choose_fcs`). Only matters when P > k.
    pub fc_by_variance: bool,
    /// Score a token by Σ_h softmax_t(ŝ_h/√d) over the selection's q heads
    /// (`cpu::tip_group_mass`) instead of Σ_h ŝ_h. Selections of one head keep ŝ: a softmax
    /// keeps one head's order, and ŝ costs one launch and no per-head scores.
    pub group_mass: bool,
    /// TIP reads the cache's int8 scoring planes for whole blocks of 32 tokens
    /// (`cpu::fc_scores_q8`); the cache needs them (`GpuKvCache::enable_q8`).
    pub q8_tip: bool,
}

impl DecodeConfig {
    /// The CPU's default `fasa` stage 1 (FC choice by variance, group score by per-head mass)
    /// when `on`, else the earlier default (by query norm, scores summed).
    pub fn with_var_mass(self, on: bool) -> Self {
        Self { fc_by_variance: on, group_mass: on, ..self }
    }

    /// Whether TIP chooses its k FCs per step from a larger pool: then int8 scoring planes pay
    /// stored per FC (`GpuKvCache::enable_scoring_planes_as`), as TIP reads only those k.
    pub fn chooses_fcs(&self) -> bool {
        self.pool > self.chunks
    }

    /// Whether scoring planes of `bits` bits are stored per FC for this mode: int8 ones where TIP
    /// chooses its FCs ([`DecodeConfig::chooses_fcs`]); int4 ones are grouped only.
    pub fn planes_per_fc(&self, bits: u32) -> bool {
        bits == 8 && self.chooses_fcs()
    }
}

/// Workspace and plan of one decoder (one layer's shape; reusable across layers of that shape).
pub struct FasaDecoder {
    pub cfg: DecodeConfig,
    /// TIP's last block per selection finds the select threshold once (else every filter block
    /// scans the histogram). Both are exact; which is faster depends on the shape.
    pub thr_in_tip: bool,
    /// FAC's last block per selection merges the partials (else, the default, a separate
    /// combine launch).
    pub fused_combine: bool,
    /// Chunks of 1024 tokens per TIP block (`tip::chunks` by default, `tip::chunks_wave` for the
    /// pipelined int8 TIP).
    pub tip_chunks: usize,
    /// The pipelined int8 TIP kernel (a `gpu::TIP8_PIPES` code), or 0 for the unpipelined `tip8`
    /// kernel (`gpu::tip8_pipe()` by default). Used by the summed-score int8 TIP only (the
    /// paper's mode, selections of one head); set it with [`FasaDecoder::set_tip8_pipe`]. Planes
    /// stored per FC (`Q8Planes::by_fc`) are read by `tipfc_h*` whatever this and
    /// `tip8_heads_pipe` say.
    pub tip8_pipe: usize,
    /// The group-mass stage 1 over int8 planes runs the pipelined per-head kernel (`tip8ph_h*`)
    /// rather than `tip8_heads_h*`: on by default (GPU run 20, default int8 step, Llama-3-8B
    /// shapes, B = 1024, fastest variant of each, same call: 16 × 32k 371.4 → 347.5 µs, 1 × 128k
    /// 131.2 → 111.7, 16 × 128k 1225.2 → 1176.7; 1 × 32k 56.0 vs 56.8, a tie). Set it with
    /// [`FasaDecoder::set_tip8_heads_pipe`] (the chunk count follows).
    pub tip8_heads_pipe: bool,
    /// The group-mass stage 1 over per-FC int8 planes runs on tensor cores (`tipm_h*`, integer
    /// mma) rather than `tipfc_h*`, where it has a kernel for k (`gpu::tipm_slots`: at most 32
    /// FCs summed): on unless `FASA_GPU_TIPM=0` ([`super::tipm_on`]). GPU run 32 (default int8
    /// step, Llama-3-8B shapes, B = 1024, same call, two rounds, off / on): 1 × 32k 46.5 → 42.3
    /// µs, 16 × 32k 194.5 → 153.2, 1 × 128k 68.4 → 58.0, 16 × 128k 611.4 → 448.4. Set it with
    /// [`FasaDecoder::set_tipm`] (the chunk count follows).
    pub tipm: bool,
    /// Scores per select-filter block, 8192, 2048 or 1024; 0 (default): chosen by `select::filter`.
    pub filter_tok: usize,
    /// FAC early: the FAC launch starts while the select filter's last blocks refine, scores the
    /// rows above the threshold bin and then the refine's (`fac::partials`' `early`); with the
    /// threshold found by TIP (`thr_in_tip`) and no re-rank, else the chain as before. On by
    /// default: GPU run 22 (paper int8 step, Llama-3-8B shapes, B = 1024, same call, with / without)
    /// 1 × 32k 28.1 / 29.0 µs, 1 × 128k 37.2 / 38.6, 16 × 128k 238.9 / 242.2, 16 × 32k 98.9 / 99.0
    /// (call 3, with select early: 28.6 / 29.4, 38.0 / 39.2, 228.5 / 229.1, 95.6 / 95.6).
    pub early_fac: bool,
    /// Select early: the select filter's blocks start on a selection once TIP's last block of it
    /// has found its threshold, not after the whole TIP launch (`gpu::EARLY_SELECT`), so the
    /// filter runs while TIP's slower blocks finish; with the threshold found by TIP
    /// (`thr_in_tip`). On by default: GPU run 22 (paper int8 step, Llama-3-8B shapes, B = 1024,
    /// FAC early on, same call, with / without) 16 × 32k 95.6 / 99.3 µs, 16 × 128k 228.5 / 238.7,
    /// 1 × 32k 28.6 / 28.5, 1 × 128k 38.0 / 38.1; default int8 16 × 32k 341.3 / 343.3.
    pub early_select: bool,
    /// Mass bins: the group-mass stage 1's histogram, filter and refine bin its scores over
    /// their own range (`gpu::MASS_BINS`), so the refine sorts fewer candidates. On unless
    /// `FASA_GPU_MASS_BINS=0` ([`super::mass_bins_on`]); the summed score keeps the key's top
    /// bits. GPU run 37 (default int8 step, B = 1024, same calls, two or three rounds, off → on,
    /// µs): Llama-3-8B 1 × 8k 36.9 → 35.8, 1 × 32k 41.2 → 39.5, 1 × 128k 57.5 → 56.3, 16 × 8k
    /// 79.3 → 77.6; SmolLM2 16 × 8k 53.6 → 52.3; B = 256 and SmolLM2 1 × 8k 0.1–0.6 faster. Slower
    /// at 8 × 32k (93.6 → 94.3), 16 × 32k (152.5 → 154.0) and 16 × 128k (443.2 → 445.1): there
    /// stage 1 and the select are still faster (16 × 32k: 125.9 → 124.7 µs) and FAC's overlap
    /// with the refine is what changes, untraced. One binning for every shape.
    pub mass_bins: bool,
    /// FAC over candidates: with FAC early, the `FacKernel::Reg` FAC kernel (below 32 selections
    /// per step by default) and a one-launch stage 1 (not the group-mass one), FAC launches with
    /// the select filter and takes the threshold bin's candidates with the rows above it, at most
    /// this many per FAC block (≤ `gpu::CAND_MAX`; 0: off), scoring them while the refine finds the
    /// cut and masking those below it (`gpu::cands_flag`), in the wide kernel (`facw_h*`, 8 rows
    /// per lane group, so a block's ~40–64 rows are one iteration). A selection with more
    /// candidates than its FAC blocks take waits for the refine's rows as FAC early does. GPU run
    /// 23 (Llama-3-8B shapes, B = 1024, same call, with / without): paper int8 1 × 32k 27.3 / 28.5
    /// µs, 1 × 128k 35.8 / 37.5; paper fp16 1 × 32k 33.5 / 34.6; the group-mass default int8
    /// 1 × 32k 55.7 / 55.5, 1 × 128k 108.0 / 107.5, so not there.
    pub fac_cands: usize,
    /// The combine kernel whose walkers load 8 splits at once (`fac::combine`'s `c8`); `None`
    /// (default): by the splits per walker.
    pub combine8: Option<bool>,
    /// Launch this decoder's kernels with programmatic dependent launch (unless `FASA_GPU_PDL` /
    /// `Gpu::set_pdl` force it): on by default. GPU run 16 had it off below 32 selections per
    /// step, when each kernel let the next one launch from its start (batch 1: PDL cost 1.7–3.2 µs
    /// on the paper steps at 32k). Since run 18 the next kernel launches once this one's blocks
    /// have exited (`pdl_begin` in common.cuh), and PDL gained in every mode at batch 1 (Llama-3-8B
    /// shapes, on and off in turn, same call: paper int8 28.8 → 28.2 µs at 32k and 41.6 → 40.9 at
    /// 128k, dense 58.9 → 58.4 and 198.3 → 198.0, default int8 56.7 → 56.1 and 132.1 → 131.6), and
    /// was as fast or faster at batch 16.
    pub pdl: bool,
    /// The FAC kernel over the selected rows. Default: the tensor-core kernels (`facm_d*`, d = 64
    /// or 128) from 32 selections per step; GPU run 19, same calls: paper int8 step at Llama-3-8B
    /// shapes, B = 1024, 16 × 32k 104.2 → 101.2 µs and 16 × 128k 242.2 → 239.6 against the lean
    /// kernels (each at its own one-wave split), SmolLM2 16 × 8k (48 selections) 36.5 → 34.7
    /// against `fac_h*`. Other d: the lean kernels from 64 selections (`facl_h*`, GPU run 6: −3.5
    /// to −12 µs at batch 16). Below 32, `fac_h*` (Llama 1 × 32k: 27.9 µs against 28.5 on tensor
    /// cores; 1 × 8k 26.1 against 26.8). Setting it keeps the split, which is sized for the
    /// default kernel's blocks per SM ([`FasaDecoder::set_fac_rows`] sets another); `Mma` with d
    /// other than 64 or 128 fails at the step with `GpuError::Shape`.
    pub fac_kernel: FacKernel,
    /// The dense attention kernel. Default: the tensor-core kernels for d = 64 or 128 (GPU run
    /// 19, same call and split, fastest other kernel → tensor cores, Llama-3-8B shapes: 16 × 32k
    /// 743.6 → 514.1 µs, 106 % of the copy bandwidth; 16 × 128k 2872.7 → 1955.0; 1 × 128k 239.7 →
    /// 134.7; 1 × 32k 69.4 → 43.1; 1 × 8k 23.6 → 18.8; SmolLM2 1 × 8k 12.8 → 11.0, 16 × 8k 51.4 →
    /// 41.2); other d the lean kernels from 2^18 cached rows (batch · KV heads · l_max) per step
    /// (run 6: 82.8 → 76.7 µs at 32k batch 1; slower at 8k batch 1), else `fac_h*`. Setting it
    /// keeps the split, as for `fac_kernel`.
    pub dense_kernel: FacKernel,
    dims: Dims,
    dense_dims: Dims,
    pool: CudaSlice<i32>,
    /// `(batch·n_sel, l_max)` TIP scores.
    pub scores: CudaSlice<f32>,
    hist: CudaSlice<u32>,
    /// Threshold bin and rows above it per selection (TIP's last block → select), its counter.
    thr: CudaSlice<i32>,
    done_tip: CudaSlice<u32>,
    /// `(batch·n_sel, B)` rows kept by the last step.
    pub sel: CudaSlice<u32>,
    selc: CudaSlice<u32>,
    sel_cnt: CudaSlice<u32>,
    cand: CudaSlice<u64>,
    cand_cnt: CudaSlice<u32>,
    /// Per-selection block counters of the fused filter→refine and FAC→combine.
    done_sel: CudaSlice<u32>,
    /// Per-selection FAC early flags (select filter → FAC; cleared by the combine).
    ready: CudaSlice<u32>,
    done_fac: CudaSlice<u32>,
    rr: CudaSlice<f32>,
    mass: CudaSlice<f32>,
    /// Group-mass stage 1 (else empty): `(batch·n_sel, hps, l_max)` scaled per-head FC scores
    /// and `(batch·n_sel, l_max/TIP_TOK, hps, 2)` per-block (max, Σexp) partials.
    xh: CudaSlice<f32>,
    xml: CudaSlice<f32>,
    po: CudaSlice<f32>,
    pml: CudaSlice<f32>,
    /// FAC (rows per block, blocks per selection) of the steps, and the decoder's own choice
    /// ([`FasaDecoder::set_fac_rows`] with 0 returns to it).
    fac_split: (usize, usize),
    fac_split_auto: (usize, usize),
    dense_split: (usize, usize),
    dense_split_auto: (usize, usize),
}

impl FasaDecoder {
    /// A decoder for `cache`'s shape; with `cfg.q8_tip` the cache must have int8 planes
    /// (`GpuKvCache::enable_q8`), else its steps return an error.
    pub fn new(gpu: &Gpu, cache: &GpuKvCache, cfg: DecodeConfig) -> Result<Self, GpuError> {
        let group = cfg.n_q / cache.n_kv.max(1);
        if cfg.n_q == 0 || cfg.n_q % cache.n_kv != 0 || group > super::MAX_HPS {
            return Err(GpuError::Shape(format!("{} q heads over {} KV heads: need a group of 1..=8", cfg.n_q, cache.n_kv)));
        }
        let hps = if cfg.per_group { group } else { 1 };
        let n_sel = cfg.n_q / hps;
        let p = cfg.pool.max(cfg.chunks).min(cache.n_fc());
        if cfg.pools.len() != n_sel || cfg.pools.iter().any(|l| l.len() < p) || p > 64 || cfg.budget == 0 {
            return Err(GpuError::Shape(format!("need {n_sel} FC pools of ≥ {p} FCs and a budget ≥ 1")));
        }
        // Pool FC ids → slots of the selection's KV head; then the FC ids themselves (`pool`'s
        // second half, fasa.cu's buffer list).
        let mut pool = Vec::with_capacity(2 * n_sel * p);
        for (s, l) in cfg.pools.iter().enumerate() {
            let kv = s * hps / group;
            for &f in &l[..p] {
                let slot = cache.order[kv].iter().position(|&x| x == f).ok_or_else(|| GpuError::Shape(format!("FC {f} out of range")))?;
                pool.push(slot as i32);
            }
        }
        pool.extend(cfg.pools.iter().flat_map(|l| l[..p].iter().map(|&f| f as i32)));
        let rerank = if cfg.rerank > cfg.budget { cfg.rerank.min(cache.l_max) } else { 0 };
        let mut dims = cache.dims(cfg.n_q);
        dims.hps = hps as i32;
        dims.n_sel = n_sel as i32;
        dims.budget = cfg.budget as i32;
        dims.pool = p as i32;
        dims.k = cfg.chunks.min(p) as i32;
        dims.sinks = cfg.sinks as i32;
        dims.recent = cfg.recent as i32;
        let mut dense_dims = cache.dims(cfg.n_q);
        dense_dims.hps = group as i32;
        dense_dims.n_sel = cache.n_kv as i32;
        dense_dims.budget = cache.l_max as i32;
        let segs = cache.batch * n_sel;
        // FAC kernel (measurements at `fac_kernel`) and split: one wave of resident blocks from 64
        // selections per step (fac::split_wave), else about 8 blocks per SM (fac::split).
        let mma = FacKernel::Mma.supports(cache.d);
        let fac_kernel = match (segs, mma) {
            (32.., true) => FacKernel::Mma,
            (64.., false) => FacKernel::Lean,
            _ => FacKernel::Reg,
        };
        let fac_split = if segs >= 64 {
            let per_sm = gpu.fac_blocks_per_sm(cache.dtype, hps, fac_kernel, cache.d)? as usize;
            fac::split_wave(cfg.budget.min(cache.l_max), segs, gpu.sm_count, per_sm)
        } else {
            fac::split(cfg.budget.min(cache.l_max), segs, gpu.sm_count)
        };
        let dense_kernel = match (mma, cache.batch * cache.n_kv * cache.l_max) {
            (true, _) => FacKernel::Mma,
            (false, 262144..) => FacKernel::Lean,
            _ => FacKernel::Reg,
        };
        let dense_per_sm = gpu.fac_blocks_per_sm(cache.dtype, group, dense_kernel, cache.d)? as usize;
        let dense_split = fac::split_dense(cache.l_max, cache.batch * cache.n_kv, gpu.sm_count, dense_per_sm);
        let part = (segs * fac_split.1 * hps).max(cache.batch * cache.n_kv * dense_split.1 * group);
        let st = &gpu.stream;
        let c = rerank.max(1);
        let heads_mass = Self::heads_mass(&cfg, hps);
        let (tip8_pipe, tip8_heads_pipe) = (super::tip8_pipe(), true);
        let tipm = super::tipm_on();
        let tip_chunks = Self::auto_chunks(gpu, cache, &cfg, tip8_pipe, tip8_heads_pipe, tipm)?;
        Ok(Self {
            pool: st.clone_htod(&pool)?,
            scores: st.alloc_zeros(segs * cache.l_max)?,
            hist: st.alloc_zeros(segs * NBIN)?,
            thr: st.alloc_zeros(segs * super::THR_W)?,
            done_tip: st.alloc_zeros(segs)?,
            sel: st.alloc_zeros(segs * cfg.budget)?,
            selc: st.alloc_zeros(segs * c)?,
            sel_cnt: st.alloc_zeros(segs)?,
            cand: st.alloc_zeros(segs * cache.l_max)?,
            cand_cnt: st.alloc_zeros(segs)?,
            done_sel: st.alloc_zeros(segs)?,
            ready: st.alloc_zeros(segs)?,
            done_fac: st.alloc_zeros(segs.max(cache.batch * cache.n_kv))?,
            rr: st.alloc_zeros(segs * hps * c)?,
            mass: st.alloc_zeros(segs * c)?,
            xh: st.alloc_zeros(if heads_mass { segs * hps * cache.l_max } else { 1 })?,
            xml: st.alloc_zeros(if heads_mass { segs * cache.l_max.div_ceil(super::TIP_TOK) * hps * 2 } else { 1 })?,
            po: st.alloc_zeros(part * cache.d)?,
            pml: st.alloc_zeros(part * 2)?,
            fac_split,
            fac_split_auto: fac_split,
            dense_split,
            dense_split_auto: dense_split,
            thr_in_tip: true,
            // Measured (bench/RESULTS.md, GPU run 5): the separate combine launch beats the fused
            // last-block merge at every shape (77 → 34 µs at 8k, batch 1, B = 1024).
            fused_combine: false,
            tip_chunks,
            tip8_pipe,
            tip8_heads_pipe,
            tipm,
            filter_tok: 0,
            early_fac: true,
            early_select: true,
            mass_bins: super::mass_bins_on(),
            fac_cands: super::CAND_MAX,
            combine8: None,
            pdl: true,
            fac_kernel,
            dense_kernel,
            cfg: DecodeConfig { rerank, ..cfg },
            dims,
            dense_dims,
        })
    }

    /// FAC over the selected rows in blocks of `rows` (rounded up to 32, at most FAC_MAX_ROWS;
    /// 0: the decoder's own choice), within the partial buffers' room.
    pub fn set_fac_rows(&mut self, rows: usize) -> Result<(), GpuError> {
        let n_rows = (self.dims.budget as usize).min(self.dims.l_max as usize);
        let segs = (self.dims.batch * self.dims.n_sel) as usize;
        let sp = if rows == 0 {
            self.fac_split_auto
        } else {
            let r = rows.next_multiple_of(32).clamp(32, super::FAC_MAX_ROWS);
            (r, n_rows.div_ceil(r).max(1))
        };
        self.check_partials("fac", segs * self.dims.hps as usize, sp.1)?;
        self.fac_split = sp;
        Ok(())
    }

    /// Dense attention in blocks of `rows` cached rows (rounded up to 64; 0: the decoder's own
    /// choice, `fac::split_dense`), within the partial buffers' room (benchmarks).
    pub fn set_dense_rows(&mut self, rows: usize) -> Result<(), GpuError> {
        let l_max = self.dims.l_max as usize;
        let sp = match rows {
            0 => self.dense_split_auto,
            r => {
                let r = r.next_multiple_of(64);
                (r, l_max.div_ceil(r).max(1))
            }
        };
        let d = &self.dense_dims;
        self.check_partials("dense", (d.batch * d.n_sel * d.hps) as usize, sp.1)?;
        self.dense_split = sp;
        Ok(())
    }

    /// Whether `splits` partials of each of `heads` (selection, head) pairs fit the buffers.
    fn check_partials(&self, what: &str, heads: usize, splits: usize) -> Result<(), GpuError> {
        if heads * splits * 2 > self.pml.len() {
            return Err(GpuError::Shape(format!("{what}: {splits} splits do not fit the partials")));
        }
        Ok(())
    }

    pub fn dims(&self) -> &Dims {
        &self.dims
    }

    /// Whether stage 1 scores a selection by its heads' softmax mass (two launches, per-head
    /// scores) rather than by their summed score.
    fn heads_mass(cfg: &DecodeConfig, hps: usize) -> bool {
        cfg.group_mass && hps > 1
    }

    /// Whether the TIP stage runs the pipelined int8 kernel `pipe`.
    fn tip_pipelined(cfg: &DecodeConfig, hps: usize, pipe: usize) -> bool {
        cfg.q8_tip && !Self::heads_mass(cfg, hps) && pipe != 0
    }

    /// The automatic TIP chunk count for the TIP kernel these settings run (`pipe`,
    /// `heads_pipe`, `tipm`: the decoder's fields of those names).
    fn auto_chunks(gpu: &Gpu, cache: &GpuKvCache, cfg: &DecodeConfig, pipe: usize, heads_pipe: bool, tipm: bool) -> Result<usize, GpuError> {
        // (as `new` sizes them: heads per selection, selections per step)
        let hps = if cfg.per_group { cfg.n_q / cache.n_kv } else { 1 };
        let segs = cache.batch * (cfg.n_q / hps);
        let heads8 = cfg.q8_tip && Self::heads_mass(cfg, hps);
        let q4 = Q8Planes::int4(cache.q8.as_ref());
        let by_fc = cfg.q8_tip && Q8Planes::per_fc(cache.q8.as_ref());
        let fc_hps = if Self::heads_mass(cfg, hps) { hps } else { 1 };
        let tipm_k = if by_fc && fc_hps > 1 { super::tipm_slots(tipm, cfg.chunks, cfg.pool) } else { None };
        Ok(if let Some(k_slots) = tipm_k {
            tip::chunks_wave(cache.l_max, segs, gpu.sm_count, gpu.tipm_blocks_per_sm(cache.dtype, fc_hps, k_slots)? as usize)
        } else if by_fc {
            tip::chunks_wave(cache.l_max, segs, gpu.sm_count, gpu.tipfc_blocks_per_sm(cache.dtype, fc_hps)? as usize)
        } else if Self::tip_pipelined(cfg, hps, pipe) && q4 {
            tip::chunks_wave(cache.l_max, segs, gpu.sm_count, gpu.tip4p_blocks_per_sm(cache.dtype, pipe)? as usize)
        } else if Self::tip_pipelined(cfg, hps, pipe) {
            tip::chunks_wave(cache.l_max, segs, gpu.sm_count, gpu.tip8p_blocks_per_sm(cache.dtype, pipe)? as usize)
        } else if heads8 && q4 {
            tip::chunks_wave(cache.l_max, segs, gpu.sm_count, gpu.tip4ph_blocks_per_sm(cache.dtype, hps)? as usize)
        } else if heads8 && heads_pipe {
            tip::chunks_wave(cache.l_max, segs, gpu.sm_count, gpu.tip8ph_blocks_per_sm(cache.dtype, hps)? as usize)
        } else {
            tip::chunks(cache.l_max, segs, gpu.sm_count)
        })
    }

    /// Switches the int8 TIP kernel (`pipe`: a `gpu::TIP8_PIPES` code, or 0 for `tip8`) and
    /// resets `tip_chunks` to that kernel's automatic count.
    pub fn set_tip8_pipe(&mut self, gpu: &Gpu, cache: &GpuKvCache, pipe: usize) -> Result<(), GpuError> {
        self.tip8_pipe = pipe;
        self.reset_tip_chunks(gpu, cache)
    }

    /// Switches the group-mass int8 stage 1 between the pipelined kernel (`on`) and
    /// `tip8_heads_h*`, and resets `tip_chunks` to that kernel's automatic count.
    pub fn set_tip8_heads_pipe(&mut self, gpu: &Gpu, cache: &GpuKvCache, on: bool) -> Result<(), GpuError> {
        self.tip8_heads_pipe = on;
        self.reset_tip_chunks(gpu, cache)
    }

    /// Switches the group-mass stage 1 over per-FC planes between tensor cores (`on`: `tipm_h*`)
    /// and `tipfc_h*`, and resets `tip_chunks` to that kernel's automatic count.
    pub fn set_tipm(&mut self, gpu: &Gpu, cache: &GpuKvCache, on: bool) -> Result<(), GpuError> {
        self.tipm = on;
        self.reset_tip_chunks(gpu, cache)
    }

    /// `tip_chunks` back to the automatic count of the TIP kernel the decoder's settings run.
    fn reset_tip_chunks(&mut self, gpu: &Gpu, cache: &GpuKvCache) -> Result<(), GpuError> {
        self.tip_chunks = Self::auto_chunks(gpu, cache, &self.cfg, self.tip8_pipe, self.tip8_heads_pipe, self.tipm)?;
        Ok(())
    }

    /// Stage 1 only: scores and `sel` (the first `min(B, len)` rows of each selection).
    pub fn select(&mut self, gpu: &Gpu, cache: &GpuKvCache, q: &CudaSlice<f32>, lens: &CudaSlice<i32>) -> Result<(), GpuError> {
        let _pdl = pdl_scope(self.pdl);
        let r = self.stage1(gpu, cache, q, lens, false, 0);
        self.clear_after(gpu, r)
    }

    /// `r` unchanged; on an error, first zeroes the counters, flags and histogram that a step
    /// leaves zero (fasa.cu's workspace invariant) and that a launch sequence broken off midway
    /// leaves set: a filter that never ran leaves TIP's histogram and select early's flag, a
    /// combine that never ran FAC early's flags, and the next step would read them as its own
    /// (FAC taking another step's rows). Every kernel already launched can finish (each waits
    /// only on kernels launched before it), and the zeroing is ordered after them on the stream.
    fn clear_after(&mut self, gpu: &Gpu, r: Result<(), GpuError>) -> Result<(), GpuError> {
        if r.is_err() {
            let st = &gpu.stream;
            // (best effort: the error returned is the first one)
            let _ = st.memset_zeros(&mut self.hist);
            let _ = st.memset_zeros(&mut self.thr);
            for c in [&mut self.done_tip, &mut self.sel_cnt, &mut self.cand_cnt, &mut self.done_sel, &mut self.ready, &mut self.done_fac] {
                let _ = st.memset_zeros(c);
            }
        }
        r
    }

    /// Whether a step runs FAC early (`early_fac` where the chain allows it).
    fn early(&self) -> bool {
        self.early_fac && self.thr_in_tip && self.cfg.rerank == 0
    }

    /// `Dims::flags` of FAC over candidates for a step (0 where it does not run).
    fn cands_flags(&self) -> i32 {
        let flags = super::cands_flag(self.fac_cands);
        let fits = self.fac_split.0 + super::cands_cap(flags) <= super::FAC_MAX_ROWS + 1;
        let one_launch = !Self::heads_mass(&self.cfg, self.dims.hps as usize);
        if self.early() && self.fac_kernel == FacKernel::Reg && one_launch && fits { flags } else { 0 }
    }

    /// Stage 1; `early`: the filter sets the FAC early flags, which the step's FAC launch then
    /// reads and its combine clears (so only a step passes it), with `flags` (FAC over
    /// candidates, the same as the FAC launch's).
    fn stage1(&mut self, gpu: &Gpu, cache: &GpuKvCache, q: &CudaSlice<f32>, lens: &CudaSlice<i32>, early: bool, flags: i32) -> Result<(), GpuError> {
        let dt = cache.dtype;
        let c = self.cfg.rerank;
        let mut d1 = self.dims;
        d1.flags |= flags;
        if c > 0 {
            d1.budget = c as i32;
        }
        if self.early_select && self.thr_in_tip {
            d1.flags |= super::EARLY_SELECT;
        }
        if self.mass_bins && Self::heads_mass(&self.cfg, d1.hps as usize) {
            d1.flags |= super::MASS_BINS; // (cands_flags is 0 there: FAC takes no cut)
        }
        self.tip(gpu, cache, &d1, q, lens)?;
        let thr = if self.thr_in_tip { Some(&self.thr) } else { None };
        let first = if c > 0 { &mut self.selc } else { &mut self.sel };
        let ready = early.then_some(&mut self.ready);
        select::filter(gpu, &d1, &self.scores, &mut self.hist, thr, lens, first, &mut self.sel_cnt, &mut self.cand, &mut self.cand_cnt, &mut self.done_sel, ready, self.filter_tok)?;
        if c > 0 {
            rerank::scores(gpu, dt, &self.dims, &cache.k, q, &cache.fc_of_slot, lens, &self.selc, c, &mut self.rr)?;
            rerank::mass(
                gpu, &self.dims, lens, &self.selc, c, &self.rr, &self.scores, &mut self.mass, &mut self.cand, &mut self.cand_cnt, &mut self.sel,
                &mut self.sel_cnt,
            )?;
        }
        Ok(())
    }

    /// The TIP stage with `dims` (its `budget` is the one the threshold is found for): scores and
    /// histogram (and threshold with `thr_in_tip`), by the configured stage 1.
    fn tip(&mut self, gpu: &Gpu, cache: &GpuKvCache, dims: &Dims, q: &CudaSlice<f32>, lens: &CudaSlice<i32>) -> Result<(), GpuError> {
        let dt = cache.dtype;
        let mom = if self.cfg.fc_by_variance { Some(&cache.mom) } else { None };
        let q8 = match (self.cfg.q8_tip, &cache.q8) {
            (false, _) => None,
            (true, Some(p)) => Some(p),
            (true, None) => return Err(GpuError::Shape("int8 TIP asked for, but the cache has no int8 planes: call GpuKvCache::enable_q8".into())),
        };
        let thr = if self.thr_in_tip { Some((&mut self.done_tip, &mut self.thr)) } else { None };
        if Self::heads_mass(&self.cfg, dims.hps as usize) {
            // (int4 planes: the pipelined kernel only)
            let pipe = self.tip8_heads_pipe || Q8Planes::int4(q8);
            tip::launch_heads(gpu, dt, dims, &cache.k, q8, q, &self.pool, mom, lens, &mut self.xh, &mut self.xml, self.tip_chunks, pipe, self.tipm)?;
            tip::mass(gpu, dims, &self.xh, &self.xml, lens, self.tip_chunks, &mut self.scores, &mut self.hist, thr)
        } else {
            tip::launch(gpu, dt, dims, &cache.k, q8, q, &self.pool, mom, lens, &mut self.scores, &mut self.hist, thr, self.tip_chunks, self.tip8_pipe)
        }
    }

    /// TIP alone (both launches of the group-mass stage 1), then the histogram zeroed again
    /// (stage timing in benchmarks).
    pub fn tip_only(&mut self, gpu: &Gpu, cache: &GpuKvCache, q: &CudaSlice<f32>, lens: &CudaSlice<i32>) -> Result<(), GpuError> {
        let _pdl = pdl_scope(self.pdl);
        let dims = self.dims;
        self.tip(gpu, cache, &dims, q, lens)?;
        gpu.stream.memset_zeros(&mut self.hist)?;
        Ok(())
    }

    /// One FASA step: `q (batch, n_q, d)` f32 rotated, FC-pair order → `out (batch, n_q, d)` f32.
    pub fn step(&mut self, gpu: &Gpu, cache: &GpuKvCache, q: &CudaSlice<f32>, lens: &CudaSlice<i32>, out: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        let _pdl = pdl_scope(self.pdl);
        let r = self.step_launches(gpu, cache, q, lens, out);
        self.clear_after(gpu, r)
    }

    fn step_launches(&mut self, gpu: &Gpu, cache: &GpuKvCache, q: &CudaSlice<f32>, lens: &CudaSlice<i32>, out: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        let early = self.early();
        let flags = self.cands_flags();
        self.stage1(gpu, cache, q, lens, early, flags)?;
        let (rps, ns) = self.fac_split;
        let (k, v, sel) = (&cache.k, &cache.v, Some(&self.sel));
        let e = early.then_some((&self.thr, &mut self.ready, &self.cand));
        let mut dims = self.dims;
        dims.flags |= flags;
        if self.fused_combine {
            let fused = Some((&mut self.done_fac, &mut *out));
            fac::partials(gpu, cache.dtype, &dims, k, v, q, &cache.fc_of_slot, lens, sel, rps, ns, &mut self.po, &mut self.pml, fused, e, self.fac_kernel)
        } else {
            fac::partials(gpu, cache.dtype, &dims, k, v, q, &cache.fc_of_slot, lens, sel, rps, ns, &mut self.po, &mut self.pml, None, e, self.fac_kernel)?;
            fac::combine(gpu, &self.dims, ns, &self.po, &self.pml, out, self.combine8, early.then_some(&mut self.ready))
        }
    }

    /// Dense attention over the same cache (every row, every q head of a KV group together).
    pub fn dense(&mut self, gpu: &Gpu, cache: &GpuKvCache, q: &CudaSlice<f32>, lens: &CudaSlice<i32>, out: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        let _pdl = pdl_scope(self.pdl);
        let (rps, ns) = self.dense_split;
        // Many splits: a separate combine launch merges them in parallel.
        fac::partials(gpu, cache.dtype, &self.dense_dims, &cache.k, &cache.v, q, &cache.fc_of_slot, lens, None, rps, ns, &mut self.po, &mut self.pml, None, None, self.dense_kernel)?;
        fac::combine(gpu, &self.dense_dims, ns, &self.po, &self.pml, out, self.combine8, None)
    }
}

/// Captures the launches `f` makes on `gpu.stream` into a graph (replay with `.launch()`).
pub fn capture(gpu: &Gpu, f: impl FnOnce() -> Result<(), GpuError>) -> Result<CudaGraph, GpuError> {
    gpu.stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let r = f();
    let g = gpu.stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))?;
    r?;
    g.ok_or_else(|| GpuError::Shape("graph capture recorded nothing".into()))
}

/// Whether a step's rotated q `(heads, d)` is one the GPU kernels take: finite. A q with ∞ or
/// NaN has no finite output on either path; refusing it keeps the kernels' inputs finite, and a
/// caller with a CPU path (the engine's operator) runs such a step there. Magnitude is no limit:
/// the tensor-core kernels (`facm_*`) prescale q by a power of two before its fp16 pairs (GPU
/// run 37 found q × 10^12 giving ∞ before they did; `extreme_queries_match_cpu`).
pub fn q_finite(q: &[f32]) -> Result<(), GpuError> {
    match q.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(GpuError::Range(format!("q[{i}] = {} is not finite", q[i]))),
    }
}

#[cfg(test)]
mod tests {
    use super::q_finite;

    /// Any finite q goes to the GPU (the kernels prescale it); NaN and ±∞ are refused, typed.
    #[test]
    fn non_finite_queries_take_the_cpu_path() {
        assert!(q_finite(&[1.0, -300.0, 1e12, -3e38, 1e-30]).is_ok());
        let e = q_finite(&[1.0, f32::NAN, 2.0]).unwrap_err().to_string();
        assert!(e.contains("q[1]") && e.contains("not finite"), "{e}");
        assert!(q_finite(&[f32::INFINITY]).is_err());
        assert!(q_finite(&[0.0, f32::NEG_INFINITY]).is_err());
    }
}
