//! The `FasaAttention` custom operator (domain `dev.fasa`), one node per decoder layer.
//!
//! Inputs: `qkv` f32 `(S, (H + 2·Hkv)·d)` — the fused, un-rotated projections of S new tokens of
//! one sequence; `position` i64 `(1,)` — position of the first of them; `slot` i64 `(1,)` — the
//! sequence's cache slot. Output: f32 `(S, H·d)` attention output in the model's dim order.
//! The kernel rotates q and k with the model's true pairs, appends k (as FC planes) and v to the
//! slot's pages, and attends causally. Kernels keep no per-run state: the cache pool is shared.
//! Where the pool has a GPU mirror (`super::gpu`), decode steps of the modes it serves attend on
//! the GPU instead; the pages above are written all the same. Under ONNX Runtime's CUDA execution
//! provider a second registration (`on_cuda`) takes the inputs in host memory, writes the output
//! into ORT's device buffer and launches GPU steps on ORT's stream without waiting for them.
use std::sync::Arc;

use fasa_kernels::cpu::{attend_causal_group, attend_dense_group, attend_rows, attend_rows_group, HeadView, Rope};
use ort::memory::MemoryType;
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::{DynTensorValueType, TensorElementType};

use super::cache::{CachePool, Pages, SeqCache, TierBytes};
use super::config::Mode;
use super::fasa_c::{select_group, sparse_step, wants_moments, SharedOut, Step};
use super::sparse::{GroupCtx, ELEM};
use super::stats::AttnStats;
use crate::RopeLayout;

pub const OP_DOMAIN: &str = "dev.fasa";
pub const OP_NAME: &str = "FasaAttention";

/// New tokens per prefill attention task: bounds the score tile to `64·group × context` floats.
const PREFILL_TILE: usize = 64;

/// The operator as registered with a session; every kernel shares its pool.
pub struct FasaAttentionOp {
    pub pool: Arc<CachePool>,
    /// The session's intra-op threads (what `par_for` spreads tasks over).
    pub threads: usize,
    /// Registered for ONNX Runtime's CUDA execution provider (needs the pool's GPU mirror): the
    /// inputs stay in host memory, the output is on the device, decode steps run on ORT's stream.
    pub on_cuda: bool,
}

/// ONNX Runtime's name of its CUDA execution provider.
pub const CUDA_EP: &str = "CUDAExecutionProvider";

impl Operator for FasaAttentionOp {
    type Kernel<'attr> = FasaKernel;

    fn name(&self) -> &str {
        OP_NAME
    }

    fn execution_provider_type(&self) -> Option<&str> {
        self.on_cuda.then_some(CUDA_EP)
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        // Under the CUDA EP, host memory: the CPU cache stays authoritative (it is written from
        // q/k/v on the host) and position/slot index it.
        let mem = if self.on_cuda { MemoryType::CPUInput } else { MemoryType::Default };
        [
            OperatorInput::required(TensorElementType::Float32).memory_type(mem),
            OperatorInput::required(TensorElementType::Int64).memory_type(mem),
            OperatorInput::required(TensorElementType::Int64).memory_type(mem),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, k: &KernelContext<'attr>) -> ort::Result<FasaKernel> {
        let int = |n: &str| -> ort::Result<usize> {
            let v: i64 = k.get(n).ok_or_else(|| ort::Error::new(format!("FasaAttention: missing attribute {n}")))?;
            usize::try_from(v).map_err(|_| ort::Error::new(format!("FasaAttention: attribute {n} = {v} is negative")))
        };
        let (layer, n_heads, n_kv_heads, head_dim) = (int("layer")?, int("n_heads")?, int("n_kv_heads")?, int("head_dim")?);
        let theta: f32 = k.get("rope_theta").ok_or_else(|| ort::Error::new("FasaAttention: missing rope_theta"))?;
        let layout = match int("rope_layout")? {
            0 => RopeLayout::Adjacent,
            1 => RopeLayout::HalfSplit,
            v => return Err(ort::Error::new(format!("FasaAttention: unknown rope_layout {v}"))),
        };
        let shape = self.pool.shape();
        if shape.head_dim != head_dim || shape.n_kv_heads != n_kv_heads || layer >= shape.n_layers || n_heads % n_kv_heads != 0 {
            return Err(ort::Error::new("FasaAttention: node attributes do not match the cache pool"));
        }
        Ok(FasaKernel { pool: Arc::clone(&self.pool), threads: self.threads.max(1), on_cuda: self.on_cuda, layer, n_heads, n_kv_heads, head_dim, layout, rope: Rope::new(theta, head_dim) })
    }
}

pub struct FasaKernel {
    pool: Arc<CachePool>,
    threads: usize,
    on_cuda: bool,
    layer: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    layout: RopeLayout,
    rope: Rope,
}

impl Kernel for FasaKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let width = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim;
        let qkv_in = ctx.input(0)?.ok_or_else(|| ort::Error::new("FasaAttention: missing qkv"))?;
        let (shape, qkv) = qkv_in.try_extract_tensor::<f32>()?;
        if shape.len() != 2 || shape[1] as usize != width {
            return Err(ort::Error::new(format!("FasaAttention: qkv shape {shape:?}, expected (S, {width})")));
        }
        let s = shape[0] as usize;
        let out_v = ctx.output(0, vec![s as i64, (self.n_heads * self.head_dim) as i64])?.ok_or_else(|| ort::Error::new("FasaAttention: no output"))?;
        if !self.on_cuda {
            let mut out_v = out_v;
            let (_, out) = out_v.try_extract_tensor_mut::<f32>()?;
            return self.attend(ctx, qkv, s, out, None).map(|_| ());
        }
        // CUDA execution provider: q/k/v and the scalars come in host memory (`CPUInput`), the
        // output is ONNX Runtime's device buffer, and the step goes on its compute stream.
        let ptr = out_v.downcast::<DynTensorValueType>()?.data_ptr() as u64;
        // None: ORT launches on the legacy default stream (null), and so does the step.
        let stream = ctx.stream()?.map_or(std::ptr::null_mut(), |p| p.as_ptr());
        let mut host = vec![0f32; s * self.n_heads * self.head_dim];
        if !self.attend(ctx, qkv, s, &mut host, Some((ptr, stream)))? {
            // (Model::load registers this kernel only with the pool's GPU mirror.)
            let mirror = self.pool.gpu().ok_or_else(|| ort::Error::new("FasaAttention: registered for the CUDA execution provider without a GPU mirror"))?;
            mirror.upload_out(&host, ptr, stream).map_err(|e| ort::Error::new(format!("FasaAttention: output to the GPU: {e}")))?;
        }
        Ok(())
    }
}

impl FasaKernel {
    /// Rotates and appends the S tokens of `qkv` `(S, (H + 2·Hkv)·d)`, then attends. `out` is
    /// `(S, H·d)` on the host; with `dev` (ONNX Runtime's device output and stream) a GPU decode
    /// step writes there instead and this returns true, else the result is in `out`.
    fn attend(&mut self, ctx: &ComputeContext, qkv: &[f32], s: usize, out: &mut [f32], dev: Option<(u64, *mut std::ffi::c_void)>) -> ort::Result<bool> {
        let (h, hkv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let n_fc = d / 2;
        let width = (h + 2 * hkv) * d;
        let scalar = |i: usize, what: &str| -> ort::Result<usize> {
            let v = ctx.input(i)?.ok_or_else(|| ort::Error::new(format!("FasaAttention: missing {what}")))?;
            let (_, x) = v.try_extract_tensor::<i64>()?;
            x.first().and_then(|&x| usize::try_from(x).ok()).ok_or_else(|| ort::Error::new(format!("FasaAttention: bad {what}")))
        };
        let (pos, slot) = (scalar(1, "position")?, scalar(2, "slot")?);
        if pos + s > self.pool.max_context() {
            return Err(ort::Error::new(format!("FasaAttention: positions up to {} exceed the context of {}", pos + s, self.pool.max_context())));
        }
        let mut cache = self.pool.lock(slot).ok_or_else(|| ort::Error::new(format!("FasaAttention: no slot {slot}")))?;
        if cache.len(self.layer) < pos {
            return Err(ort::Error::new(format!("FasaAttention: slot {slot} layer {} holds {} tokens, asked to continue at {pos}", self.layer, cache.len(self.layer))));
        }
        let delta = cache.resize(self.layer, pos, s).map_err(|e| ort::Error::new(format!("FasaAttention: the FASA-M slow tier under {} could not grow ({e}); free disk space there or lower the context", crate::paths::cache_dir().join("kv").display())))?;
        self.pool.account(delta);

        // q of the S tokens as rotated FC pairs: (S, H, n_fc, 2).
        let mut q_fc = vec![0f32; s * h * d];
        let mut cs = vec![0f32; d];
        let mut head = vec![0f32; d];
        let mut pairs = vec![0f32; d];
        let pair = |f: usize| self.layout.pair(f, d);
        for i in 0..s {
            self.rope.cos_sin(pos + i, &mut cs);
            let row = &qkv[i * width..(i + 1) * width];
            for qh in 0..h {
                head.copy_from_slice(&row[qh * d..(qh + 1) * d]);
                self.rope.rotate(&mut head, &cs, pair);
                let dst = &mut q_fc[(i * h + qh) * d..(i * h + qh + 1) * d];
                for f in 0..n_fc {
                    let (a, b) = pair(f);
                    dst[2 * f] = head[a];
                    dst[2 * f + 1] = head[b];
                }
            }
            for kh in 0..hkv {
                head.copy_from_slice(&row[(h + kh) * d..(h + kh + 1) * d]);
                self.rope.rotate(&mut head, &cs, pair);
                for f in 0..n_fc {
                    let (a, b) = pair(f);
                    pairs[2 * f] = head[a];
                    pairs[2 * f + 1] = head[b];
                }
                let v = &row[(h + hkv + kh) * d..(h + hkv + kh + 1) * d];
                cache.write(self.layer, kh, pos + i, &pairs, v);
            }
        }

        let group = h / hkv;
        let scale = 1.0 / (d as f32).sqrt();
        let layer = self.layer;
        let n_all = pos + s;
        let cfg = cache.state.config.clone();
        let measure = cache.state.measure;
        let mut recorder = cache.state.recorder.take();
        let sparse = s == 1 && cfg.mode != Mode::Dense && layer >= cfg.dense_layers && n_all > cfg.budget;
        let tiered = cache.is_tiered();
        if tiered && s == 1 {
            // Refused before any work so the slot stays consistent (the tokens are written).
            let refuse = if recorder.is_some() || (sparse && measure) {
                Some("calibration and recall/mass measurement score every K plane, which the FASA-M cache keeps only in its slow tier; run them on a model loaded with the FASA-C cache".to_string())
            } else if sparse && layer == cfg.dense_layers {
                // Once per step (the first sparse layer runs first): the config is per slot.
                cache.check_config(&cfg).err()
            } else {
                None
            };
            if let Some(e) = refuse {
                cache.state.recorder = recorder;
                return Err(ort::Error::new(format!("FasaAttention: {e}")));
            }
        }
        // GPU decode (`super::gpu`): one token's q `(H, d)` goes up, its attention `(H, d)` comes
        // back; K/V come from the slot's fp16 mirror, which takes the row just written above. The
        // CPU cache stays authoritative; steps that need it (measurement, calibration, capture,
        // other modes, FASA-M) and any GPU error take the CPU path below.
        if let Some(m) = self.pool.gpu() {
            let mirrored = !tiered && !measure && recorder.is_none() && cache.state.capture.is_none() && super::gpu::serves(cfg.mode) && m.holds(slot);
            if s > 1 && mirrored {
                // (the prompt's rows go up now, beside the CPU's prefill attention below)
                m.prefill(&cache, slot, layer, pos, h, &self.pool.profile());
            } else if !(s == 1 && mirrored) {
                m.rewind(slot, layer, pos);
            } else {
                let step = super::gpu::DecodeStep { slot, layer, q_fc: &q_fc, n_q: h, cfg: &cfg, profile: &self.pool.profile(), sparse };
                let target = match dev {
                    Some((ptr, stream)) => super::gpu::Out::Device { ptr, stream },
                    None => super::gpu::Out::Host(&mut *out),
                };
                match m.decode(&cache, &step, target) {
                    Ok(st) => {
                        cache.state.stats.merge(&st);
                        return Ok(dev.is_some());
                    }
                    Err(e) => {
                        static WARN: std::sync::Once = std::sync::Once::new();
                        WARN.call_once(|| log::warn!("FasaAttention: a GPU decode step failed ({e}); this step and any other that fails run on the CPU"));
                    }
                }
            }
        }
        let out_ptr = SharedOut(out.as_mut_ptr());
        let mut stats = AttnStats::default();
        {
            let c = &*cache;
            let pages: Vec<Pages> = (0..hkv).map(|kh| c.pages(layer, kh)).collect();
            let bounds: Vec<Vec<&[f32]>> = if sparse { (0..hkv).map(|kh| c.bounds(layer, kh)).collect() } else { vec![] };
            if !sparse && s == 1 {
                // Decode: one task per KV group; its query heads share each K/V row read.
                ctx.par_for(hkv, 0, |g| {
                    let view = pages[g].view();
                    let qs: Vec<&[f32]> = (g * group..(g + 1) * group).map(|qh| &q_fc[qh * d..(qh + 1) * d]).collect();
                    let mut o = vec![0f32; group * d];
                    attend_dense_group(&view, &qs, pos + 1, scale, &mut o);
                    // V (and so the output) was never permuted: `o` is in the model's dim order.
                    // SAFETY: each task writes only its own group's heads.
                    unsafe { std::ptr::copy_nonoverlapping(o.as_ptr(), out_ptr.get().add(g * group * d), group * d) };
                })?;
            }
            if !sparse && s > 1 {
                // Prefill: tiles of PREFILL_TILE tokens per KV group, as matrix products.
                let tiles = s.div_ceil(PREFILL_TILE);
                ctx.par_for(hkv * tiles, 0, |task| {
                    let (g, tile) = (task % hkv, task / hkv);
                    let (i0, i1) = (tile * PREFILL_TILE, ((tile + 1) * PREFILL_TILE).min(s));
                    // (tokens, group heads, d) of this tile, contiguous.
                    let mut qs = Vec::with_capacity((i1 - i0) * group * d);
                    for i in i0..i1 {
                        qs.extend_from_slice(&q_fc[(i * h + g * group) * d..(i * h + (g + 1) * group) * d]);
                    }
                    let mut o = vec![0f32; qs.len()];
                    attend_causal_group(&pages[g].view(), &qs, group, i1 - i0, pos + i0, scale, &mut o);
                    for (j, i) in (i0..i1).enumerate() {
                        // SAFETY: each task writes only its tiles' tokens × its group's heads.
                        unsafe { std::ptr::copy_nonoverlapping(o.as_ptr().add(j * group * d), out_ptr.get().add((i * h + g * group) * d), group * d) };
                    }
                })?;
            }
            if !sparse {
                if s == 1 {
                    stats.dense_layer_steps = 1;
                    stats.bytes_dense = (hkv * n_all * 2 * d) as u64 * ELEM;
                    stats.bytes_read = stats.bytes_dense;
                    stats.rows = (hkv * n_all) as u64;
                }
            } else if tiered {
                let profile = c.compact_profile().ok_or_else(|| ort::Error::new("FasaAttention: FASA-M slot has no resident FCs (not acquired through the pool)"))?;
                let per_group: Vec<std::sync::Mutex<AttnStats>> = (0..hkv).map(|_| Default::default()).collect();
                let failed = std::sync::Mutex::new(None);
                let pool = &self.pool;
                ctx.par_for(hkv, 0, |g| {
                    let qs: Vec<&[f32]> = (g * group..(g + 1) * group).map(|qh| &q_fc[qh * d..(qh + 1) * d]).collect();
                    let mut o = vec![0f32; group * d];
                    match sparse_group_tiered(c, pool, &pages[g], &profile, &cfg, layer, g, group, n_all, &qs, scale, &mut o) {
                        Ok(st) => *per_group[g].lock().unwrap_or_else(|e| e.into_inner()) = st,
                        Err(e) => *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e),
                    }
                    // SAFETY: each group writes only the rows of its own query heads.
                    unsafe { std::ptr::copy_nonoverlapping(o.as_ptr(), out_ptr.get().add(g * group * d), group * d) };
                })?;
                if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
                    return Err(ort::Error::new(format!("FasaAttention: {e}")));
                }
                for st in per_group {
                    stats.merge(&st.into_inner().unwrap_or_else(|e| e.into_inner()));
                }
            } else {
                let profile = self.pool.profile();
                let step = Step { cache: c, pages: &pages, bounds: &bounds, cfg: &cfg, profile: &profile, layer, n: n_all, group, d, scale, q_fc: &q_fc, measure, threads: self.threads };
                stats.merge(&sparse_step(ctx, &step, &out_ptr)?);
            }
            if let (Some(rec), 1) = (recorder.as_mut(), s) {
                for (g, p) in pages.iter().enumerate() {
                    let heads: Vec<usize> = (g * group..(g + 1) * group).collect();
                    let qs: Vec<&[f32]> = heads.iter().map(|&qh| &q_fc[qh * d..(qh + 1) * d]).collect();
                    rec.observe(layer, g, &heads, &qs, &p.view(), n_all);
                }
            }
        }
        cache.state.recorder = recorder;
        if s == 1 {
            super::capture::observe(&mut cache, layer, hkv, &q_fc, n_all);
        }
        cache.state.stats.merge(&stats);
        Ok(false)
    }
}

/// FASA-M decode for KV group `g`: stage 1 over the resident planes (queries compacted to the
/// resident FCs, profile renumbered the same way, so the selection equals FASA-C's), then stage 2
/// over the selected rows in the row cache, moving only the misses from the slow tier. `o` is
/// `(group, d)`; returns the group's counters.
#[allow(clippy::too_many_arguments)]
fn sparse_group_tiered(c: &SeqCache, pool: &CachePool, pages: &Pages, profile: &super::profile::Profile, cfg: &super::config::AttnConfig, layer: usize, g: usize, group: usize, n_all: usize, qs: &[&[f32]], scale: f32, o: &mut [f32]) -> Result<AttnStats, String> {
    let d = qs[0].len();
    let resident = c.resident(layer, g);
    // (heads, R, 2): each query's pairs of the resident FCs, in resident (rank) order.
    let compact: Vec<Vec<f32>> = qs.iter().map(|q| resident.iter().flat_map(|&f| [q[2 * f], q[2 * f + 1]]).collect()).collect();
    let qc: Vec<&[f32]> = compact.iter().map(|q| q.as_slice()).collect();
    let moments = if wants_moments(cfg) { c.moments(layer, g) } else { vec![] };
    let gctx = GroupCtx { view: pages.plane_view(), q8: None, bounds: &[], layer, kv_head: g, n: n_all, cfg, profile, moments: &moments, scale, pre: None };
    let (sels, mut st) = select_group(&gctx, group, d, &qc);
    let mut rc = c.row_cache(layer, g).ok_or("FASA-M slot without row caches")?;
    let before = rc.bytes();
    for (i, sel) in sels.iter().enumerate() {
        let (slots, f) = rc.fetch(&sel.rows, |t, k, v| c.load_row(layer, g, t, k, v)).map_err(|cap| format!("{} selected rows exceed the FASA-M row cache of {cap} rows; lower the budget", sel.rows.len()))?;
        st.row_hits += f.hits as u64;
        st.rows_moved += f.moved as u64;
        st.bytes_moved += (f.moved * 2 * d) as u64 * ELEM;
        // The selected rows as a view of one-row pages pointing into the row cache: stage 2
        // reads the same K/V values in the same order as FASA-C's view of the whole cache.
        let kr: Vec<&[f32]> = slots.iter().map(|&s| rc.k(s)).collect();
        let vr: Vec<&[f32]> = slots.iter().map(|&s| rc.v(s)).collect();
        let view = HeadView { k_pages: &[], kr_pages: &kr, v_pages: &vr, page: 1, n_fc: d / 2, len: slots.len() };
        let local: Vec<u32> = (0..slots.len() as u32).collect();
        if cfg.per_group {
            attend_rows_group(&view, qs, &local, scale, o);
        } else {
            attend_rows(&view, qs[i], &local, scale, &mut o[i * d..(i + 1) * d]);
        }
    }
    pool.account(TierBytes { fast: rc.bytes() as isize - before as isize, slow: 0 });
    Ok(st)
}
