//! GPU mirror of the FASA-C cache slots: decode attention (modes `dense`, `fasa`, `fasa-paper`)
//! from fp16 copies of K and V on the GPU, through `fasa_kernels::gpu`.
//!
//! The CPU cache stays authoritative and is written exactly as without a GPU: prefill,
//! calibration, recall/mass measurement, K/V capture, the baselines (oracle, streaming, quest,
//! random-fc), FASA-M and rewinds all use it, and it needs no second implementation of them. The
//! mirror follows it per (slot, layer): a prefill's rows go up as the prefill writes them (the
//! host gathers rows from the CPU cache, a kernel converts them to fp16 and lays them out:
//! `append_rows`), at a decode step that runs here only the new token's rotated K and V row goes
//! in (the append kernel also keeps the K moments that `fasa` picks FCs by), and when the mirror
//! is behind (a rewind, a new sequence in the slot, `CachePool::copy_slot`, a prefill that ran
//! with measurement or calibration on) the rows it lacks go up at the next decode step, once.
//! Cost: the cache is held twice, f32 on the host and fp16 on the device (the device copy is
//! allocated at the full context when a slot first prefills or decodes here); on a
//! unified-memory board (Jetson) both come out of the same DRAM, about ×2 the KV memory. A GPU
//! with memory of its own mirrors only the slots that fit the part of it the mirror may take
//! (`slot_bytes`, `FASA_GPU_MEM_MB`); the other slots decode on the CPU.
//! Mode `fasa` scores with TIP from int8 scoring planes, as the CPU's `fasa` does (whole blocks of
//! 32 tokens, quantised on the GPU from its fp16 K: `GpuKvCache::enable_scoring_planes_as`, half
//! K's bytes again, stored per FC as `fasa` chooses its FCs per step; int4 under
//! `FASA_EXPERIMENT_TIP=int4`, a quarter); `fasa-paper` reads the fp16
//! planes, or the quantised ones under `FASA_EXPERIMENT_PAPER_PLANES=1`, as the CPU does.
//!
//! A step moves q, the new row, its position and the length up and the output down through
//! page-locked staging (`fasa_kernels::gpu::io`), one copy each way. From the second step of a
//! decoder on, the step (those copies, the append and the decode launches) is replayed as a CUDA
//! graph captured on the stream it runs on: launching a step's kernels one by one took 20–45 µs
//! of host time, the replay 10–15 µs (GPU run 33; the GPU runs meanwhile, so a step ends 2–6 µs
//! sooner). `FASA_GPU_GRAPH=0` launches them one by one; so does a mirror whose capture failed.
//!
//! Detection: `FASA_GPU=0` or the load option turns the mirror off before cudarc is touched;
//! otherwise `Gpu::try_default` checks for the driver, NVRTC and a device without calling into
//! cudarc (which panics when its libraries are absent). Which path is used is logged once.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};

use fasa_kernels::gpu::append::{append, append_rows};
use fasa_kernels::gpu::decode::{capture, q_finite};
use fasa_kernels::gpu::io::{poison, Pinned, StepIo};
use fasa_kernels::gpu::{CudaGraph, CudaSlice, DecodeConfig, Dtype, FasaDecoder, Gpu, GpuError, GpuKvCache, MAX_HPS, QB};

use super::cache::{CacheShape, SeqCache};
use super::config::{AttnConfig, Mode};
use super::profile::Profile;
use super::sparse::{experiment, q8_tip, tip_bytes};
use super::stats::AttnStats;

/// Bytes per cached element on the GPU (fp16); the counters of GPU steps use it.
pub const GPU_ELEM: u64 = 2;

/// What one GPU decode step needs from the operator.
pub struct DecodeStep<'a> {
    pub slot: usize,
    pub layer: usize,
    /// `(n_q, d)` rotated queries, FC-pair order (the operator's `q_fc` of one token).
    pub q_fc: &'a [f32],
    pub n_q: usize,
    pub cfg: &'a AttnConfig,
    pub profile: &'a Arc<Profile>,
    /// Stage 1 + focused attention (else dense over every row).
    pub sparse: bool,
}

/// Where a GPU step's attention output `(n_q, d)` goes.
pub enum Out<'a> {
    /// Host memory (ONNX Runtime's CPU execution provider): copied down, the stream synchronized.
    Host(&'a mut [f32]),
    /// ONNX Runtime's CUDA execution provider: its output buffer on this device and its compute
    /// stream (`cudaStream_t`). The step is launched on that stream and not waited for.
    Device { ptr: u64, stream: *mut std::ffi::c_void },
}

/// The pool's GPU side: per slot and layer, the mirror (allocated at first use).
pub struct GpuMirror {
    gpu: Arc<Gpu>,
    shape: CacheShape,
    l_max: usize,
    /// `[slot][layer]`.
    slots: Vec<Mutex<Vec<LayerMirror>>>,
    /// Outputs set to NaN before each step (`FASA_GPU_POISON=1`, tests): unwritten rows show.
    poison: bool,
    /// The last GPU step's error (that step ran on the CPU).
    last_error: Mutex<Option<String>>,
    /// The kernels launching on ONNX Runtime's stream, for the stream they were made for.
    ort_view: Mutex<Option<(usize, Arc<Gpu>)>>,
    /// Decode steps replayed as CUDA graphs (off with `FASA_GPU_GRAPH=0`, or once a capture
    /// failed: then launched one by one).
    graphs: AtomicBool,
    /// K and V rows on their way into a cache (`GpuMirror::extend`; allocated at first use).
    staging: Mutex<Option<Staging>>,
}

/// `(n_kv, ROWS_PIECE, d)` f32 K and V rows: gathered on the host, then copied to the device
/// buffers, which the next piece reuses in the order of our stream.
struct Staging {
    host: (Vec<f32>, Vec<f32>),
    dev: (CudaSlice<f32>, CudaSlice<f32>),
}

/// Rows a mirror takes in one piece through its staging (a prefill chunk is 512).
const ROWS_PIECE: usize = 1024;

#[derive(Default)]
struct LayerMirror {
    /// Tokens `0..valid` (and their K moments) equal the CPU cache's.
    valid: usize,
    /// Rows were written on our stream since the last step (a prefill): a step on another
    /// stream (ONNX Runtime's) waits for them.
    pending: bool,
    dev: Option<Device>,
}

/// Device buffers of one (slot, layer).
struct Device {
    /// `(1, n_kv, l_max, d)` fp16 K and V, K moments.
    cache: GpuKvCache,
    /// The decoder for the settings (and profile) it was built for.
    dec: Option<(DecKey, FasaDecoder)>,
    /// q, the new K and V row, position and length in; the output back (page-locked staging).
    io: StepIo,
    /// `(n_q, d)` attention out.
    out: CudaSlice<f32>,
    /// The step (copies, append, decode) as a CUDA graph, for the decoder in `dec`, captured on
    /// the stream it runs on and for where its output goes (`GraphKey`).
    graph: Option<(GraphKey, StepGraph)>,
    /// Per-q-head selections' rows, read back for the counters.
    sel: Option<Pinned<u32>>,
    /// The new token's K and V rows `(n_kv, d)`, gathered here before they are staged (kept, so
    /// a step allocates nothing for them).
    row: (Vec<f32>, Vec<f32>),
}

/// A captured step. The driver lets any thread use a graph as long as the calls on one are
/// serialized; this one is only reached under its slot's mutex (`GpuMirror::layers`).
struct StepGraph(CudaGraph);
// SAFETY: see above: one thread at a time, under the slot's lock.
unsafe impl Send for StepGraph {}

/// What a captured step depends on besides the decoder: the stream (ours or ONNX Runtime's)
/// and whether it copies its output to the host.
type GraphKey = (usize, bool);

/// Settings a decoder was built for; None = dense only.
type DecKey = (Option<AttnConfig>, Arc<Profile>);

/// Whether the GPU path may be used: the load option, and `FASA_GPU=0` not set.
fn gpu_allowed(enabled: bool) -> bool {
    enabled && !std::env::var("FASA_GPU").is_ok_and(|v| v == "0")
}

/// Whether the GPU kernels take these shapes: head dim 64 or 128, 1..=8 query heads per KV head.
fn serves_shape(head_dim: usize, group: usize) -> bool {
    matches!(head_dim, 64 | 128) && (1..=MAX_HPS).contains(&group)
}

/// Whether a model of these shapes gets a GPU mirror (as [`GpuMirror::detect`] decides, with
/// `FASA_GPU`) on a GPU that shares the host's memory (Jetson). Then the mirror's bytes come out
/// of the memory the planner fits the cache into (`plan::PlanInput::gpu_mirror`). Initialises
/// the GPU where there is one, as loading the model would.
pub fn mirror_in_host_memory(head_dim: usize, n_heads: usize, n_kv_heads: usize, enabled: bool) -> bool {
    gpu_allowed(enabled)
        && serves_shape(head_dim, n_heads / n_kv_heads.max(1))
        && Gpu::try_default().is_some_and(|g| g.integrated)
}

/// Device bytes a slot's mirror holds per token of its context, over every layer: fp16 K and
/// V, scoring planes and context-sized workspaces (`fasa_kernels::gpu::append::mirror_bytes_per_token`
/// a layer). The memory plan (`plan::gpu_mirror_bytes_per_token`) and [`slot_bytes`] count it.
pub fn mirror_bytes_per_token(shape: CacheShape, n_heads: usize) -> u64 {
    shape.n_layers as u64 * fasa_kernels::gpu::append::mirror_bytes_per_token(shape.n_kv_heads, n_heads, shape.head_dim)
}

/// Device bytes one slot's mirror takes at `l_max` tokens: [`mirror_bytes_per_token`] each, and
/// 1 MiB a layer for the fixed buffers (the decoder's partials and histogram, the step's staging
/// and graph).
pub fn slot_bytes(shape: CacheShape, n_heads: usize, l_max: usize) -> u64 {
    l_max as u64 * mirror_bytes_per_token(shape, n_heads) + shape.n_layers as u64 * (1 << 20)
}

/// The slots whose mirrors fit `budget` bytes at `per_slot` each, at most `n_slots`.
fn slots_that_fit(budget: u64, per_slot: u64, n_slots: usize) -> usize {
    (budget / per_slot.max(1)).min(n_slots as u64) as usize
}

/// Device bytes the mirrors may take: `FASA_GPU_MEM_MB` (MiB) where set; else none of the GPU's
/// own (None: a GPU that shares the host's memory, where the memory plan fits them); else three
/// quarters of its free memory less 1 GiB, the rest left to the process's other GPU work (ONNX
/// Runtime's CUDA provider, whose session is made after the mirror, and the kernels' own).
fn mirror_budget(gpu: &Gpu) -> Result<Option<u64>, String> {
    if let Ok(v) = std::env::var("FASA_GPU_MEM_MB") {
        return v.trim().parse::<u64>().map(|mb| Some(mb << 20)).map_err(|_| format!("FASA_GPU_MEM_MB={v:?} is not a number of MiB"));
    }
    if gpu.integrated {
        return Ok(None);
    }
    let free = gpu.free_memory().map_err(|e| format!("the GPU's free memory is unknown ({e})"))?;
    Ok(Some((free / 4 * 3).saturating_sub(1 << 30)))
}

/// Whether the GPU runs this mode (the rest stay on the CPU).
pub fn serves(mode: Mode) -> bool {
    matches!(mode, Mode::Dense | Mode::Fasa | Mode::FasaPaper)
}

fn log_once(once: &Once, msg: impl FnOnce() -> String) {
    once.call_once(|| log::info!("{}", msg()));
}

impl GpuMirror {
    /// The mirror for a FASA-C pool, or None (logged once) when off, unusable, the shapes are
    /// not ones the kernels take or an experiment switch asks for planes it does not build; then
    /// the operator's CPU path is unchanged.
    pub fn detect(shape: CacheShape, n_heads: usize, n_slots: usize, max_context: usize, enabled: bool) -> Option<Self> {
        static OFF: Once = Once::new();
        static NONE: Once = Once::new();
        static SHAPE: Once = Once::new();
        static ON: Once = Once::new();
        static MEM: Once = Once::new();
        if !gpu_allowed(enabled) {
            log_once(&OFF, || "FasaAttention: CPU path (GPU off: FASA_GPU=0 or the load options)".into());
            return None;
        }
        let group = n_heads / shape.n_kv_heads.max(1);
        if !serves_shape(shape.head_dim, group) {
            log_once(&SHAPE, || format!("FasaAttention: CPU path (the GPU kernels take head dim 64 or 128 and 1..=8 query heads per KV head, not {} and {group})", shape.head_dim));
            return None;
        }
        let Some(base) = Gpu::try_default() else {
            log_once(&NONE, || "FasaAttention: CPU path (no usable CUDA driver, NVRTC or GPU)".into());
            return None;
        };
        // A stream of the mirror's own: a graph capture records whatever is queued on its stream,
        // from any thread, and two models may decode at once (fasad's worker and a calibration's
        // second instance of the model, which writes its own text on the GPU when it has no
        // licence texts), so they must not share the process's stream.
        let gpu = match base.ctx.new_stream() {
            Ok(st) => Arc::new(base.on_stream(st)),
            Err(e) => {
                log_once(&NONE, || format!("FasaAttention: CPU path (no CUDA stream for the GPU mirror: {e})"));
                return None;
            }
        };
        // A GPU with memory of its own holds the mirrors of as many slots as fit it (each at the
        // full context, allocated at its first use); the others decode on the CPU.
        let l_max = max_context.max(1);
        let mirrored = match mirror_budget(&gpu) {
            Ok(None) => n_slots,
            Ok(Some(budget)) => {
                let per_slot = slot_bytes(shape, n_heads, l_max);
                let fit = slots_that_fit(budget, per_slot, n_slots);
                let (mib, slot_mib) = (budget >> 20, per_slot.div_ceil(1 << 20));
                if fit == 0 {
                    log_once(&MEM, || format!("FasaAttention: CPU path (a slot's GPU mirror takes {slot_mib} MiB at {l_max} tokens, over the {mib} MiB it may have of the GPU's memory; FASA_GPU_MEM_MB sets that)"));
                    return None;
                }
                if fit < n_slots {
                    log_once(&MEM, || format!("FasaAttention: the GPU's memory holds the mirrors of {fit} of {n_slots} slots ({slot_mib} MiB each at {l_max} tokens, {mib} MiB for them; FASA_GPU_MEM_MB sets that); the others decode on the CPU"));
                }
                fit
            }
            Err(e) => {
                log_once(&MEM, || format!("FasaAttention: CPU path ({e})"));
                return None;
            }
        };
        log_once(&ON, || format!("FasaAttention: decode on the GPU (sm_{}{}), fp16 mirror of the FASA-C cache; prefill and other modes on the CPU", gpu.arch.0, gpu.arch.1));
        let slots = (0..mirrored).map(|_| Mutex::new((0..shape.n_layers).map(|_| LayerMirror::default()).collect())).collect();
        Some(Self { gpu, shape, l_max, slots, poison: std::env::var("FASA_GPU_POISON").is_ok_and(|v| v == "1"), last_error: Mutex::new(None), ort_view: Mutex::new(None), graphs: AtomicBool::new(!std::env::var("FASA_GPU_GRAPH").is_ok_and(|v| v == "0")), staging: Mutex::new(None) })
    }

    /// Whether `slot` has a mirror (a GPU with memory of its own holds only as many as fit it).
    pub fn holds(&self, slot: usize) -> bool {
        slot < self.slots.len()
    }

    /// `slot`'s layers, locked; None for a slot without a mirror (`holds`).
    fn layers(&self, slot: usize) -> Option<std::sync::MutexGuard<'_, Vec<LayerMirror>>> {
        self.slots.get(slot).map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Every row of `slot` is stale (new contents copied in, or the slot was freed).
    pub fn invalidate(&self, slot: usize) {
        if let Some(mut layers) = self.layers(slot) {
            layers.iter_mut().for_each(|l| l.valid = 0);
        }
    }

    /// The CPU cache rewrote `layer`'s rows from `pos` on without the GPU.
    pub fn rewind(&self, slot: usize, layer: usize, pos: usize) {
        if let Some(l) = self.layers(slot).as_mut().and_then(|ls| ls.get_mut(layer)) {
            l.valid = l.valid.min(pos);
        }
    }

    /// A prefill wrote tokens `pos..n` of `layer` to the CPU cache (`n = c.len(layer)`): the mirror
    /// takes them now (the host gathers the rows; their conversion runs on our stream while the
    /// CPU goes on with the next layers), so the first decode step after a prompt has only its own
    /// row to add (it uploaded every row of the slot until GPU run 34). Rows the mirror lacks
    /// below `pos` come along. On an error the rows stay unmirrored (logged once) and the next
    /// decode step writes them.
    pub fn prefill(&self, c: &SeqCache, slot: usize, layer: usize, pos: usize, n_q: usize, profile: &Arc<Profile>) {
        let Some(mut layers) = self.layers(slot) else { return };
        let lm = &mut layers[layer];
        lm.valid = lm.valid.min(pos);
        let n = c.len(layer);
        if n > self.l_max || lm.valid >= n {
            return;
        }
        let t0 = lm.valid;
        // A decode step queued on ONNX Runtime's stream may still read these rows.
        let ort = self.ort_view.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(_, g)| Arc::clone(g));
        let r = match ort {
            Some(o) => self.gpu.stream.join(&o.stream).map_err(GpuError::from),
            None => Ok(()),
        };
        let r = r.and_then(|()| self.device(lm, n_q, profile, layer)).and_then(|dev| self.extend(dev, c, layer, t0, n));
        match r {
            Ok(()) => {
                lm.valid = n;
                lm.pending = true;
            }
            Err(e) => {
                static WARN: Once = Once::new();
                WARN.call_once(|| log::warn!("FasaAttention: the GPU mirror could not take a prefill's rows ({e}); the next decode step uploads them"));
            }
        }
    }

    /// The device buffers of `lm`, allocated at the full context on first use.
    fn device<'a>(&self, lm: &'a mut LayerMirror, n_q: usize, profile: &Profile, layer: usize) -> Result<&'a mut Device, GpuError> {
        let (g, s) = (&*self.gpu, &self.gpu.stream);
        let (hkv, d) = (self.shape.n_kv_heads, self.shape.head_dim);
        Ok(match &mut lm.dev {
            Some(dev) => dev,
            none => none.insert(Device {
                // Slots in the KV ranking's order: the pool's FCs lead each tile (speed only).
                cache: GpuKvCache::new(g, Dtype::F16, 1, hkv, d, self.l_max, Some(profile.layers[layer].kv_heads.iter().map(|h| h.ranked_fcs.clone()).collect()))?,
                dec: None,
                io: StepIo::new(g, n_q, hkv, d)?,
                out: s.alloc_zeros(n_q * d)?,
                graph: None,
                sel: None,
                row: (vec![0f32; hkv * d], vec![0f32; hkv * d]),
            }),
        })
    }

    /// Rows `t0..n` of `layer` from the CPU cache into `dev`'s cache on our stream, in pieces of
    /// `ROWS_PIECE` through the staging: the host gathers rows, the device converts them to fp16
    /// and lays them out (`append_rows`).
    fn extend(&self, dev: &mut Device, c: &SeqCache, layer: usize, t0: usize, n: usize) -> Result<(), GpuError> {
        let (g, s) = (&*self.gpu, &self.gpu.stream);
        let (hkv, d) = (self.shape.n_kv_heads, self.shape.head_dim);
        let mut staging = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        let size = hkv * ROWS_PIECE * d;
        let Staging { host: (k, v), dev: (ks, vs) } = match &mut *staging {
            Some(st) => st,
            none => none.insert(Staging { host: (vec![0f32; size], vec![0f32; size]), dev: (s.alloc_zeros(size)?, s.alloc_zeros(size)?) }),
        };
        for a in (t0..n).step_by(ROWS_PIECE) {
            // (n_kv, len, d): one KV head's rows after the other.
            let len = ROWS_PIECE.min(n - a);
            let m = hkv * len * d;
            for (i, (kr, vr)) in k[..m].chunks_exact_mut(d).zip(v[..m].chunks_exact_mut(d)).enumerate() {
                c.load_row(layer, i / len, (a + i % len) as u32, kr, vr);
            }
            // (pageable memory: the copy has taken k and v when it returns, so they are reused)
            s.memcpy_htod(&k[..m], &mut ks.slice_mut(..m))?;
            s.memcpy_htod(&v[..m], &mut vs.slice_mut(..m))?;
            append_rows(g, &mut dev.cache, 0, a, len, &ks.slice(..m), &vs.slice(..m))?;
        }
        Ok(())
    }

    /// One decode step of `c` (the token at `n - 1` already written to the CPU cache) on the GPU:
    /// `out` `(n_q, d)` in the model's dim order, and the step's counters. On an error the
    /// mirror of (slot, layer) is marked stale and the caller runs the CPU path.
    pub fn decode(&self, c: &SeqCache, st: &DecodeStep, out: Out) -> Result<AttnStats, GpuError> {
        // Refused before the mirror is touched: it keeps its rows and catches up at the slot's
        // next GPU step.
        q_finite(st.q_fc)?;
        let Some(mut layers) = self.layers(st.slot) else {
            return Err(GpuError::Shape(format!("slot {} has no GPU mirror (the GPU's memory holds {})", st.slot, self.slots.len())));
        };
        let run = match &out {
            Out::Host(_) => Arc::clone(&self.gpu),
            Out::Device { stream, .. } => self.ort_view(*stream),
        };
        let lm = &mut layers[st.layer];
        let r = self.decode_in(lm, c, st, &run, out);
        lm.valid = if r.is_ok() { c.len(st.layer) } else { 0 };
        if let Err(e) = &r {
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
        }
        r
    }

    /// The kernels launching on ONNX Runtime's compute stream `raw` (made once per stream).
    fn ort_view(&self, raw: *mut std::ffi::c_void) -> Arc<Gpu> {
        let mut v = self.ort_view.lock().unwrap_or_else(|e| e.into_inner());
        match &*v {
            Some((k, g)) if *k == raw as usize => Arc::clone(g),
            _ => {
                // SAFETY: ONNX Runtime's CUDA execution provider hands its kernels the compute
                // stream of device 0's primary context (the one cudarc's context retains), and
                // keeps it for the session's life, which the pool (and so this mirror) outlives
                // only after the session, with no more steps, is gone.
                let g = Arc::new(self.gpu.on_stream(unsafe { self.gpu.borrow_stream(raw) }));
                *v = Some((raw as usize, Arc::clone(&g)));
                g
            }
        }
    }

    /// Copies a step's output computed on the host (the CPU path under the CUDA execution
    /// provider) into ONNX Runtime's device buffer `ptr`, ordered on its stream.
    pub fn upload_out(&self, host: &[f32], ptr: u64, stream: *mut std::ffi::c_void) -> Result<(), GpuError> {
        let run = self.ort_view(stream);
        // SAFETY: `ptr` is the operator's output tensor, `host.len()` floats on this device.
        unsafe { run.copy_to_raw(host, ptr) }
    }

    /// Whether decode steps are replayed as CUDA graphs from now on (the default unless
    /// `FASA_GPU_GRAPH=0`); off, each step's launches are made one by one.
    pub fn set_graphs(&self, on: bool) {
        self.graphs.store(on, Ordering::Relaxed);
    }

    /// The last GPU step's error, if any step failed (it ran on the CPU instead).
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `run` launches the step (its stream: ours, or ONNX Runtime's for `Out::Device`); buffers
    /// are allocated and missing rows uploaded on ours.
    fn decode_in(&self, lm: &mut LayerMirror, c: &SeqCache, st: &DecodeStep, run: &Gpu, out: Out) -> Result<AttnStats, GpuError> {
        let (g, s) = (&*self.gpu, &self.gpu.stream);
        let (hkv, d, n) = (self.shape.n_kv_heads, self.shape.head_dim, c.len(st.layer));
        // The kernels take len ≤ l_max as given (their grids and flag waits are sized by l_max).
        if n > self.l_max {
            return Err(GpuError::Shape(format!("context of {n} tokens exceeds the GPU cache's {}", self.l_max)));
        }
        // Bring the mirror to the CPU cache's n rows: the step appends the new row, or set-up
        // writes every row the mirror lacks, the new one included (the mirror behind: a prefill
        // it could not take, a rewind, a copied slot; or a new decoder, whose scoring planes are
        // quantised from the rows mirrored then).
        let t0 = lm.valid.min(n - 1);
        let pending = std::mem::take(&mut lm.pending);
        let key: DecKey = (st.sparse.then(|| st.cfg.clone()), Arc::clone(st.profile));
        let rebuild = !lm.dev.as_ref().and_then(|dev| dev.dec.as_ref()).is_some_and(|(k, _)| k.0 == key.0 && Arc::ptr_eq(&k.1, &key.1));
        // Set-up (allocation, rows caught up, a new decoder) runs on our stream; on another
        // stream it waits for that stream's earlier steps first and is finished before the step,
        // as are a prefill's rows.
        let other = !std::ptr::eq(&*run.stream, &**s);
        let setup = t0 + 1 < n || rebuild;
        if setup && other {
            s.join(&run.stream)?;
        }
        let dev = self.device(lm, st.n_q, st.profile, st.layer)?;
        if setup {
            self.extend(dev, c, st.layer, t0, n)?;
        }
        // The new row `(n_kv, d)`, for the step to append.
        let (k, v) = &mut dev.row;
        if !setup {
            for (kh, (kr, vr)) in k.chunks_exact_mut(d).zip(v.chunks_exact_mut(d)).enumerate() {
                c.load_row(st.layer, kh, (n - 1) as u32, kr, vr);
            }
        }
        let row = (!setup).then(|| (&k[..], &v[..], (n - 1) as i32));
        dev.io.stage(st.q_fc, row, n as i32)?;
        if rebuild {
            let dc = decode_config(st, d / 2);
            if dc.q8_tip {
                // Quantises the rows mirrored so far; append and append_rows keep the planes after.
                // Int8 planes stored per FC where TIP chooses its k FCs per step from a larger pool
                // (`fasa`: it then reads only those k, not every group of 8 holding one).
                let bits = c.tip_bits();
                dev.cache.enable_scoring_planes_as(g, bits, dc.planes_per_fc(bits))?;
            }
            dev.graph = None;
            dev.dec = None;
            let dec = FasaDecoder::new(g, &dev.cache, dc)?;
            // The rows each group read, for the counters: with one selection per KV group they
            // are its first min(B, n) rows, known without reading the selection back.
            dev.sel = if st.sparse && !st.cfg.per_group { Some(Pinned::new(g, dec.sel.len())?) } else { None };
            dev.dec = Some((key, dec));
        }
        if (setup || pending) && other {
            s.synchronize()?;
        }
        // The step on `run`'s stream: the inputs up, (the new row appended,) the decode, the
        // output (and per-head selections) down, through the page-locked staging. Steps after the
        // first of a decoder replay it as a CUDA graph (module docs), unless graphs are off; a
        // set-up step runs its launches directly.
        let append_row = row.is_some();
        let host_out = matches!(out, Out::Host(_));
        let gkey: GraphKey = (Arc::as_ptr(&run.stream) as usize, host_out);
        let Device { cache, dec: dec_slot, io, out: dout, graph, sel, .. } = dev;
        let dec = &mut dec_slot.as_mut().expect("decoder built above").1;
        let poisoned = self.poison;
        let mut launches = || -> Result<(), GpuError> {
            io.upload(run)?;
            if append_row {
                append(run, cache, &io.k_new, &io.v_new, &io.pos)?;
            }
            if poisoned {
                poison(run, dout)?;
            }
            if st.sparse {
                dec.step(run, cache, &io.q, &io.lens, dout)?;
            } else {
                dec.dense(run, cache, &io.q, &io.lens, dout)?;
            }
            if host_out {
                io.download(run, dout)?;
            }
            if let Some(h) = sel.as_mut() {
                h.download(run, &dec.sel)?;
            }
            Ok(())
        };
        let mut replayed = false;
        let r = if setup || !self.graphs.load(Ordering::Relaxed) {
            launches()
        } else {
            // (A capture records whatever is queued on its stream, from any thread. Our stream is
            // this mirror's own (`detect`), and one thread at a time decodes on a model: the
            // daemon's worker owns it, and a `Model` is not `Sync`. ONNX Runtime's stream under
            // the CUDA provider is its session's, which runs one `Run` at a time here.)
            if graph.as_ref().is_none_or(|(k, _)| *k != gkey) {
                *graph = None;
                match capture(run, &mut launches) {
                    Ok(gr) => *graph = Some((gkey, StepGraph(gr))),
                    Err(e) => {
                        // (nothing of a failed capture ran: the step is launched directly below)
                        static WARN: Once = Once::new();
                        WARN.call_once(|| log::warn!("FasaAttention: a GPU decode step could not be captured as a CUDA graph ({e}); steps are launched one by one"));
                        self.graphs.store(false, Ordering::Relaxed);
                    }
                }
            }
            match graph {
                Some((_, gr)) => {
                    replayed = true;
                    gr.0.launch().map_err(GpuError::from)
                }
                None => launches(),
            }
        };
        if let Err(e) = r {
            // Rebuilt, and captured again, at the next step (nothing of this one may have run).
            *graph = None;
            *dec_slot = None;
            return Err(e);
        }
        if let Out::Device { ptr, .. } = out {
            // SAFETY: `ptr` is the operator's output tensor of (n_q, d) floats on this device;
            // dout is next written by this (slot, layer)'s next step, on the same stream.
            unsafe { run.copy_dtod_raw(dout, ptr)? };
        }
        io.finish(run)?;
        if let Out::Host(out) = out {
            out.copy_from_slice(io.output()?);
            if out.iter().any(|x| !x.is_finite()) {
                return Err(GpuError::Shape("the GPU step left non-finite outputs".into()));
            }
        }
        if sel.is_some() {
            io.wait()?; // (the selections' copy)
        }
        let mut stats = step_stats(st, hkv, d, n, sel.as_ref().map(|h| h.as_slice()), c.tip_bits());
        stats.ort_stream_steps = u64::from(!host_out);
        stats.graph_steps = u64::from(replayed);
        Ok(stats)
    }
}

/// The operator's settings as the decoder's (the CPU's stage 1 of the same mode; see
/// kernels/tests/gpu.rs for the correspondence). Dense builds a minimal decoder (one FC, B = 1):
/// only its dense kernels run.
fn decode_config(st: &DecodeStep, n_fc: usize) -> DecodeConfig {
    let (c, l) = (st.cfg, &st.profile.layers[st.layer]);
    let heads = if c.per_group || !st.sparse { &l.kv_heads } else { &l.q_heads };
    let pools = heads.iter().map(|h| h.ranked_fcs.clone()).collect();
    if !st.sparse {
        return DecodeConfig {
            n_q: st.n_q,
            per_group: true,
            budget: 1,
            chunks: 1,
            pools,
            pool: 1,
            sinks: 0,
            recent: 0,
            rerank: 0,
            fc_by_variance: false,
            group_mass: false,
            q8_tip: false,
        };
    }
    let fasa = c.mode == Mode::Fasa;
    DecodeConfig {
        n_q: st.n_q,
        per_group: c.per_group,
        budget: c.budget,
        chunks: c.chunks,
        pools,
        pool: c.pool.min(n_fc),
        sinks: c.sinks,
        recent: c.recent,
        rerank: c.rerank,
        // As `sparse::select`: `fasa` picks FCs by variance and scores a group by softmax mass
        // unless an experiment switch restores the old stage 1; the paper's recipe does neither.
        fc_by_variance: fasa && !experiment("FASA_EXPERIMENT_FC_CHOICE", "norm"),
        group_mass: fasa && !experiment("FASA_EXPERIMENT_GROUP_SCORE", "sum"),
        // As the CPU: TIP from the quantised scoring planes where `q8_tip` says (`fasa`; int8, or
        // int4 under FASA_EXPERIMENT_TIP=int4; FASA_EXPERIMENT_TIP=f32: fp16).
        q8_tip: q8_tip(c),
    }
}

/// The step's counters, computed as the CPU path computes them (`op::select_group`) but with
/// fp16 elements (`GPU_ELEM`): what the CPU kernels would read over the rows the GPU selected.
/// With int8 TIP (`fasa`) a scored FC costs 2 bytes a token and a 4-byte scale per whole block
/// of `QB` tokens, fp16 pairs after them; `bits`: the scoring planes' width (int4: 1 byte).
/// `sel` is the decoder's `(n_sel, B)` (the first `min(B, n)` of each selection valid); None
/// with one selection per KV group, whose rows are distinct.
fn step_stats(st: &DecodeStep, hkv: usize, d: usize, n: usize, sel: Option<&[u32]>, bits: u32) -> AttnStats {
    let e = GPU_ELEM;
    if !st.sparse {
        let bytes = (hkv * n * 2 * d) as u64 * e;
        return AttnStats { dense_layer_steps: 1, bytes_dense: bytes, bytes_read: bytes, rows: (hkv * n) as u64, gpu_layer_steps: 1, ..Default::default() };
    }
    let c = st.cfg;
    let (group, b) = (st.n_q / hkv, c.budget);
    let kept = b.min(n);
    let reranked = c.rerank > b && c.rerank < n;
    // After a re-rank the kept rows' K was read among the candidates: only their V is read again.
    let row_elems = if reranked { d } else { 2 * d };
    let k = c.chunks.min(c.pool);
    let mut total = AttnStats { gpu_layer_steps: 1, ..Default::default() };
    for g in 0..hkv {
        let sels: Vec<usize> = if c.per_group { vec![g] } else { (g * group..(g + 1) * group).collect() };
        let rows = match sel {
            Some(sel) => {
                let mut rows: Vec<u32> = sels.iter().flat_map(|&s| sel[s * b..s * b + kept].iter().copied()).collect();
                rows.sort_unstable();
                rows.dedup();
                rows.len()
            }
            None => sels.len() * kept,
        };
        // FC planes scored by the group: k per KV group; per query head the union of the heads'
        // fixed k (paper) or, when each head picks its k in a larger pool, at most the heads' pools.
        let fcs = if c.per_group {
            k
        } else {
            let l = &st.profile.layers[st.layer];
            let take = if c.pool <= c.chunks { k } else { c.pool };
            let mut f: Vec<usize> = sels.iter().flat_map(|&h| l.q_heads[h].ranked_fcs[..take.min(l.q_heads[h].ranked_fcs.len())].iter().copied()).collect();
            f.sort_unstable();
            f.dedup();
            f.len()
        };
        let extra = if reranked { (sels.len() * c.rerank * d) as u64 * e } else { 0 };
        // The GPU trusts the int8 blocks below len/QB (`Q8Planes`).
        let tip = tip_bytes(c, n, Some((n / QB, bits)), fcs, e);
        total.merge(&AttnStats {
            sparse_layer_steps: 1,
            bytes_dense: (n * 2 * d) as u64 * e,
            rows: rows as u64,
            bytes_read: tip + (rows * row_elems) as u64 * e + extra,
            ..Default::default()
        });
    }
    total
}

#[cfg(test)]
mod tests {
    use super::{slot_bytes, slots_that_fit, CacheShape};

    /// A slot's mirror at the full context: SmolLM2-135M (30 layers, 3 KV heads of 64, 9 query
    /// heads) at 8192 tokens holds 1260 bytes a layer and token (fp16 K and V 768, int8 planes and
    /// scales 204, workspaces 288) and 1 MiB a layer: ~341 MB. A budget holds its whole slots.
    #[test]
    fn a_gpu_budget_holds_whole_slots() {
        let smol = CacheShape { n_layers: 30, n_kv_heads: 3, head_dim: 64 };
        let per = slot_bytes(smol, 9, 8192);
        assert_eq!(per, 30 * (8192 * 1260 + (1 << 20)));
        assert_eq!(slots_that_fit(per * 5 / 2, per, 4), 2);
        assert_eq!(slots_that_fit(per * 10, per, 4), 4);
        assert_eq!(slots_that_fit(per - 1, per, 4), 0);
        // (a budget of 0: no slot, so no GPU path)
        assert_eq!(slots_that_fit(0, per, 4), 0);
    }
}
