//! CUDA path of the FASA ops (feature `cuda`): the device context, the run-time compiled module
//! and one launcher per op (`append`, `tip`, `select`, `rerank`, `fac`), plus `decode`, which
//! chains them into one decode step. The CPU twins are in `crate::cpu`.
//!
//! Nothing here needs nvcc: `src/cuda/*.cu` is compiled by NVRTC at first use for the device's
//! own architecture (sm_90 on the H200, sm_87 on Orin) and the PTX is cached on disk, keyed by
//! source hash, architecture and NVRTC version. Without a driver, NVRTC or a GPU, [`Gpu::new`]
//! returns [`GpuError`] before cudarc is touched (cudarc panics when its libraries are absent);
//! [`Gpu::try_default`] logs that once and callers take the CPU path.
pub mod append;
pub mod decode;
pub mod fac;
pub mod io;
mod launch;
pub mod rerank;
pub mod select;
pub mod tip;
pub mod trace;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, DriverError, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileOptions, Ptx};

pub use append::{GpuKvCache, Q8Planes};
/// Device buffers, as the launchers take them (so callers need no cudarc of their own).
pub use cudarc::driver::{CudaGraph, CudaSlice};
pub use decode::{DecodeConfig, FasaDecoder};

/// FCs per K group: a token's FCs `8g..8g+8` are one 32-byte sector (`FCG` in common.cuh).
pub const FCG: usize = 8;
/// K groups per contiguous run of a token (`KR` in common.cuh): 8, a token's whole K one row, as
/// FAC reads it (GPU run 22: the paper int8 step 4 % faster at batch 16 than with runs of 2; the
/// int8 TIP reads its own planes). The 16-bit TIP reads only the pool's groups, and with runs of 8
/// at half its speed: `FASA_GPU_KRUN=2` for those modes ([`k_run`]).
pub const KR: usize = 8;
/// Elements per (token, group).
pub const GE: usize = 2 * FCG;
/// Tokens per K tile (`KT` in common.cuh); cache capacities are multiples of it.
pub const KT: usize = 64;
/// Histogram bins of the TIP scores (`NBIN` in common.cuh).
pub const NBIN: usize = 4096;
/// Most q heads sharing one selection, most rows of one FAC block.
pub const MAX_HPS: usize = 8;
/// Most selected rows one FAC block handles (`FAC_MAX_ROWS`; dense blocks take any number).
pub const FAC_MAX_ROWS: usize = 1024;
pub(crate) const TIP_TOK: usize = 1024; // TIP_THREADS · TIP_TPT
/// The pipelined int8 TIP kernels compiled (`TIP8P_ENTRY` in fasa.cu), as `100·mode + 10·NS + JU`
/// (mode 0: unfolded, the same bits as `tip8`; 1: scales folded into q; 2: folded q as three int8
/// terms, integer dot products). GPU run 15 also timed 3 stages of 2 tokens (32, 132) and 4 of 2
/// (42, 142), slower at batch 16; no longer compiled.
pub const TIP8_PIPES: [usize; 3] = [24, 124, 224];
/// Default int8 TIP kernel ([`tip8_pipe`]): 2 stages of 4 tokens per thread, the folded q as
/// int8 terms (GPU run 19, paper int8 step, Llama shapes, same call: 1 × 32k 28.2 → 28.0 µs,
/// 1 × 128k 39.7 → 38.7, 16 × 128k 240.7 → 239.6 with the tensor-core FAC, TIP alone 16 × 128k
/// 192 → 172 µs; 16 × 32k 101.2 vs 101.8, a tie). Before: 124, scales folded into q (GPU run
/// 15: 16 × 128k 310.0 → 277.9 µs, 16 × 32k 134.9 → 120.7, 1 × 128k 57.5 → 43.8 against
/// the unfolded 24: 295.4 / 122.0 / 45.9; 3 stages of 2 tokens at 3 blocks/SM (32, 132) and 4
/// stages of 2 (42, 142) were slower at batch 16).
pub const TIP8_PIPE: usize = 224;
/// The pipelined int4 TIP kernels compiled (`TIP4P_ENTRY`), as `4000 + 100·mode + 10·NS + JU`
/// (mode 2, the integer terms, only): NS = 2 stages of half an int8 stage each, or 4 (as many bytes
/// in flight as int8's 2).
pub const TIP4_PIPES: [usize; 2] = [4224, 4244];
/// Default int4 TIP kernel (a decoder whose pipe names no int4 kernel runs it): 2 stages. GPU run
/// 28, paper int4 step, Llama-3-8B shapes, same call, 4224 / 4244: 1 × 128k 33.5 / 34.7 µs, 1 × 32k
/// 26.8 / 26.7, 16 × 32k 87.7 / 87.9, 16 × 128k 216.4 / 210.1: more bytes in flight did not
/// shorten batch 1, whose TIP is bound by each chunk's instruction latency, not by its loads.
pub const TIP4_PIPE: usize = 4224;
/// Tokens a thread of the group-mass stage's second launch (`tip_mass_t<TPT>`, blocks of 256
/// threads) whose grid at 8 tokens a thread would have `blocks8` blocks on `sm_count`
/// multiprocessors: 4 where those blocks are fewer than the multiprocessors, else 8;
/// `FASA_GPU_MASS_TPT` (2, 4 or 8) forces one (benchmarks). Each block's chain of dependent
/// instructions bounds it at batch 1, so twice the blocks of half the tokens finish sooner while
/// they fit one wave, and cost more (prologues, histogram flushes) once they do not. GPU run 36
/// (default int8 step, same call, two rounds, 8 / 4 / 2 tokens a thread, µs): Llama-3-8B 1 × 8k
/// 37.6 / 36.8 / 37.5, 1 × 32k 42.2 / 41.1 / 42.3, 1 × 128k 57.4 / 59.2 / 67.0, 16 × 32k
/// 151.5 / 156.9 / 188.6; SmolLM2 1 × 8k 33.5 / 32.6 / 32.7.
pub fn mass_tpt(blocks8: usize, sm_count: usize) -> usize {
    static FORCED: OnceLock<Option<usize>> = OnceLock::new();
    let forced = *FORCED.get_or_init(|| match std::env::var("FASA_GPU_MASS_TPT").ok().and_then(|v| v.trim().parse().ok()) {
        Some(t @ (2 | 4 | 8)) => Some(t),
        _ => None,
    });
    forced.unwrap_or(if blocks8 < sm_count { 4 } else { 8 })
}
pub(crate) const RR_ROWS: usize = 256;
/// Tokens per int8 quantisation block (`QB` in common.cuh, `cpu::QB`).
pub const QB: usize = crate::cpu::QB;

/// The CUDA sources, concatenated for NVRTC (which has no include path here).
const SOURCE: &str = concat!("#define FASA_NVRTC\n", include_str!("../cuda/common.cuh"), "\n", include_str!("../cuda/fasa.cu"));

/// Groups per K run in this process: [`KR`], or `FASA_GPU_KRUN` (1, 2, 4 or 8: 2 for the 16-bit
/// TIP modes, the default until GPU run 22; 1 is the layout of GPU run 12). Read once: the
/// compiled kernels and [`GpuKvCache`] must agree.
pub fn k_run() -> usize {
    static R: OnceLock<usize> = OnceLock::new();
    *R.get_or_init(|| match std::env::var("FASA_GPU_KRUN").ok().and_then(|v| v.parse().ok()) {
        Some(r @ (1 | 2 | 4 | 8)) => r,
        _ => KR,
    })
}

/// Row tiles of 16 per warp iteration of the tensor-core FAC (`FACM_TU` in fasa.cu): 2, or
/// `FASA_GPU_FACM_TU` (1 to 3; benchmarks). Two tiles' loads in flight per warp at 2 blocks per
/// SM beat one tile's at 3 (GPU run 19, two alternations in one call, µs: dense 16 × 32k 549 →
/// 515, 16 × 128k 2077 → 1968, 1 × 128k 137.8 → 133.2, 1 × 32k 43.8 → 42.7; paper int8 step
/// 16 × 32k 101.1 → 99.6, 16 × 128k 239.1 → 237.6). Read once.
pub fn facm_tiles() -> usize {
    static R: OnceLock<usize> = OnceLock::new();
    *R.get_or_init(|| std::env::var("FASA_GPU_FACM_TU").ok().and_then(|v| v.parse().ok()).filter(|t| (1..=3).contains(t)).unwrap_or(2))
}

/// Whether the kernels record their stage timeline (`FASA_GPU_TRACE=1`; benchmarks,
/// [`Gpu::trace_take`]). Read once.
pub fn tracing() -> bool {
    static R: OnceLock<bool> = OnceLock::new();
    *R.get_or_init(|| std::env::var("FASA_GPU_TRACE").is_ok_and(|v| v == "1"))
}

/// Slots per unit and stages of the TIP over per-FC planes (`TIPFC_U`, `TIPFC_NS` in fasa.cu):
/// 4 and 3, or `FASA_GPU_TIPFC=U,NS` (U 1..=8, NS 2..=6; benchmarks). Read once: the kernels and
/// their shared memory ([`tipfc_smem`]) follow it.
pub fn tipfc_cfg() -> (usize, usize) {
    static R: OnceLock<(usize, usize)> = OnceLock::new();
    *R.get_or_init(|| {
        let v: Vec<usize> = std::env::var("FASA_GPU_TIPFC").unwrap_or_default().split(',').filter_map(|x| x.trim().parse().ok()).collect();
        match v[..] {
            [u, ns] if (1..=8).contains(&u) && (2..=6).contains(&ns) => (u, ns),
            _ => (4, 3),
        }
    })
}

/// Tokens per thread of the TIP over per-FC planes for `hps` heads: 8 (`narrow` or 8 heads,
/// whose accumulators leave fewer registers: 4). The kernels are `tipfc_h<H>x<TPT>_*`, so a TPT
/// that differs from the source's finds no kernel rather than too little shared memory.
fn tipfc_tpt(hps: usize, narrow: bool) -> usize {
    if hps > 4 || narrow { 4 } else { 8 }
}

/// Whether a TIP over per-FC planes whose blocks score `nchunk` chunks of 1024 tokens runs its
/// narrow kernel (4 tokens a thread, steps of 1024): for an odd count, where the last step of
/// 2048 tokens would keep half the block's threads idle (every step at batch 1 of a 32k context:
/// one chunk a block). `FASA_GPU_TIPFC_TPT=4` or `8` forces one (benchmarks). Read once.
/// GPU run 31 (default int8 step, Llama-3-8B shapes, B = 1024, same call, two rounds, 8 / this
/// rule): 1 × 32k 47.9 → 46.4 µs; the other target shapes have even counts (4 forced everywhere:
/// 16 × 32k 194.1 → 235.5, 1 × 128k 68.4 → 78.8, 16 × 128k 611.4 → 767.5).
pub fn tipfc_narrow(nchunk: usize) -> bool {
    static R: OnceLock<Option<bool>> = OnceLock::new();
    let forced = *R.get_or_init(|| match std::env::var("FASA_GPU_TIPFC_TPT").as_deref() {
        Ok("4") => Some(true),
        Ok("8") => Some(false),
        _ => None,
    });
    forced.unwrap_or(nchunk % 2 == 1)
}

/// Name of the TIP over per-FC planes the module loader takes for head bound `h` (1, 2, 4, 8),
/// `narrow` ([`tipfc_narrow`]) and `dt` (the GPU tests check that the compiled module has it).
pub fn tipfc_name(h: usize, narrow: bool, dt: Dtype) -> String {
    format!("tipfc_h{h}x{}_{}", tipfc_tpt(h, narrow), dt.suffix())
}

/// Dynamic shared memory of the TIP over per-FC planes for `hps` heads: NS stages of U pieces of
/// 2·TPT bytes and U f32 scales per thread (`TIPFC_STAGE`).
pub(crate) fn tipfc_smem(hps: usize, narrow: bool) -> usize {
    let (u, ns) = tipfc_cfg();
    ns * u * 256 * (2 * tipfc_tpt(hps, narrow) + 4)
}

/// Whether decoders start with the group-mass stage 1 over per-FC int8 planes on tensor cores
/// (`tipm_h*`, integer mma; `FasaDecoder::tipm`): yes, or `FASA_GPU_TIPM=0` for the CUDA-core
/// `tipfc_h*`. Read once.
pub fn tipm_on() -> bool {
    static R: OnceLock<bool> = OnceLock::new();
    *R.get_or_init(|| std::env::var("FASA_GPU_TIPM").map_or(true, |v| v != "0"))
}

/// Name of the tensor-core group-mass stage 1 the module loader takes for head bound `h` (2, 4,
/// 8), `ks` k-steps of 16 FCs (1, 2) and `dt`.
pub fn tipm_name(h: usize, ks: usize, dt: Dtype) -> String {
    format!("tipm_h{h}k{ks}_{}", dt.suffix())
}

/// k-steps of 16 FCs of `tipm_h*` for selections summing up to `k_slots` FCs (1 or 2; more
/// FCs run `tipfc_h*`).
fn tipm_steps(k_slots: usize) -> usize {
    k_slots.div_ceil(16).clamp(1, 2)
}

/// The FCs a group-mass stage 1 over per-FC planes sums on tensor cores, where it runs there
/// (`tensor_cores`: `FasaDecoder::tipm`, and a `tipm_h*` kernel for them: k = min(k, P) ≤ 32);
/// None: `tipfc_h*` runs. The one rule for the launcher and the chunk count.
pub fn tipm_slots(tensor_cores: bool, k: usize, pool: usize) -> Option<usize> {
    let s = k.min(pool);
    (tensor_cores && s <= 32).then_some(s)
}

/// Stages a warp of `tipm_h*` (`TIPM_WS` in fasa.cu): 2, or `FASA_GPU_TIPM_WS` (2..=4;
/// benchmarks). Read once: the kernels and their shared memory ([`tipm_smem`]) follow it. GPU
/// run 32 (default int8 step, Llama-3-8B shapes, B = 1024, same call, two rounds, 2 / 3 / 4):
/// 16 × 32k 151.5 / 153.1 / 154.6 µs, 1 × 128k 57.2 / 58.0 / 60.1, 16 × 128k 443.9 / 448.8 /
/// 449.2, 1 × 32k 42.1 / 42.2 / 42.4.
pub fn tipm_stages() -> usize {
    static R: OnceLock<usize> = OnceLock::new();
    *R.get_or_init(|| std::env::var("FASA_GPU_TIPM_WS").ok().and_then(|v| v.parse().ok()).filter(|n| (2..=4).contains(n)).unwrap_or(2))
}

/// Dynamic shared memory of `tipm_h*` for a selection that sums up to `k_slots` FCs: for each of
/// a block's 8 warps, [`tipm_stages`] stages of [`tipm_steps`] k-steps, each 16 runs of
/// `TIPM_RS` = 144 bytes and two QB blocks' 16 scales (`TIPM_STAGE` in fasa.cu).
pub(crate) fn tipm_smem(k_slots: usize) -> usize {
    8 * tipm_stages() * tipm_steps(k_slots) * (16 * 144 + 2 * 16 * 4)
}

/// [`SOURCE`] with `KR` set to [`k_run`], `FACM_TU` to [`facm_tiles`], `TIPM_WS` to [`tipm_stages`], `FASA_TRACE` when
/// [`tracing`], and the macros of `FASA_GPU_DEFINES=NAME[=VALUE],…` (benchmarks: a kernel
/// change and the code before it timed in one run, on one GPU).
fn source() -> String {
    let trace = if tracing() { "#define FASA_TRACE\n" } else { "" };
    let defs: String = std::env::var("FASA_GPU_DEFINES")
        .unwrap_or_default()
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| format!("#define {}\n", d.replacen('=', " ", 1)))
        .collect();
    let (u, ns) = tipfc_cfg();
    format!("{trace}{defs}#define KR {}\n#define FACM_TU {}\n#define TIPFC_U {u}\n#define TIPFC_NS {ns}\n#define TIPM_WS {}\n{SOURCE}", k_run(), facm_tiles(), tipm_stages())
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA driver library (libcuda) found: install the NVIDIA driver or use the CPU path")]
    NoDriver,
    #[error("no NVRTC library (libnvrtc) found: install the CUDA runtime compiler (cuda-nvrtc) or add its folder to LD_LIBRARY_PATH")]
    NoNvrtc,
    #[error("no CUDA device found")]
    NoDevice,
    #[error("CUDA driver call failed: {0}")]
    Driver(#[from] DriverError),
    #[error("NVRTC could not compile the FASA kernels for {arch}: {log}")]
    Compile { arch: String, log: String },
    #[error("unsupported shape: {0}")]
    Shape(String),
    #[error("input out of the GPU kernels' range: {0}")]
    Range(String),
}

/// Storage type of the GPU cache (accumulation is always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F16,
    Bf16,
}

impl Dtype {
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// f32 → storage bits (round to nearest even), as the kernels store.
    pub fn encode(self, x: f32) -> u16 {
        match self {
            Dtype::F16 => half::f16::from_f32(x).to_bits(),
            Dtype::Bf16 => half::bf16::from_f32(x).to_bits(),
        }
    }

    pub fn decode(self, b: u16) -> f32 {
        match self {
            Dtype::F16 => half::f16::from_bits(b).to_f32(),
            Dtype::Bf16 => half::bf16::from_bits(b).to_f32(),
        }
    }

    /// [`Dtype::encode`] of each of `src` into `dst` (as long), the same bits; vectorised where
    /// the CPU converts to f16 in hardware (F16C).
    pub fn encode_slice(self, src: &[f32], dst: &mut [u16]) {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        match self {
            Dtype::F16 => dst.reinterpret_cast_mut::<half::f16>().convert_from_f32_slice(src),
            Dtype::Bf16 => dst.reinterpret_cast_mut::<half::bf16>().convert_from_f32_slice(src),
        }
    }

    /// [`Dtype::decode`] of each of `src` into `dst` (as long).
    pub fn decode_slice(self, src: &[u16], dst: &mut [f32]) {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        match self {
            Dtype::F16 => src.reinterpret_cast::<half::f16>().convert_to_f32_slice(dst),
            Dtype::Bf16 => src.reinterpret_cast::<half::bf16>().convert_to_f32_slice(dst),
        }
    }
}

/// Shapes passed by value to every kernel (`struct Dims` in fasa.cu; keep the two in step).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Dims {
    pub batch: i32,
    pub n_q: i32,
    pub n_kv: i32,
    pub d: i32,
    pub n_fc: i32,
    pub n_grp: i32,
    pub l_max: i32,
    /// q heads per selection (the GQA group, or 1 for per-q-head selection).
    pub hps: i32,
    /// selections per sequence (`n_q / hps`).
    pub n_sel: i32,
    /// rows kept per selection.
    pub budget: i32,
    /// FC pool size P and FCs chosen per step k.
    pub pool: i32,
    pub k: i32,
    pub sinks: i32,
    pub recent: i32,
    pub scale: f32,
    /// [`EARLY_SELECT`], [`Q4_PLANES`], [`FC_PLANES`], [`MASS_BINS`], and FAC over candidates' cap
    /// `<< CANDS_SHIFT` ([`cands_flag`]).
    pub flags: i32,
}

/// `Dims::flags`: select early (fasa.cu's `EARLY_SELECT`): the TIP launch before the select
/// filter lets it launch at once and its last block per selection sets a flag in `thr` once
/// that selection's scores and threshold are written; the filter's blocks wait for their
/// selection's flag, not for the whole TIP launch, and its last block clears it.
pub const EARLY_SELECT: i32 = 1;
/// `Dims::flags`: the cache's scoring planes hold int4 values (fasa.cu's `Q4_PLANES`;
/// [`GpuKvCache::enable_scoring_planes`]): set by [`GpuKvCache::dims`] and the TIP launcher.
pub const Q4_PLANES: i32 = 2;
/// `Dims::flags`: the cache's int8 scoring planes are stored per FC (fasa.cu's `FC_PLANES`;
/// [`GpuKvCache::enable_scoring_planes_as`]), read by the `tipfc_h*` kernels only.
pub const FC_PLANES: i32 = 4;
/// `Dims::flags`: the scores are the group-mass stage's (Σ_h softmax ∈ [0, hps] or +∞), and the
/// histogram, select filter and refine bin them 64 an octave over [2^-60, 2^4) (fasa.cu's
/// `MASS_BINS`) instead of by the key's top 12 bits, 8 an octave over every float: the threshold
/// bin, and so the refine's candidates, 8 times narrower. Set by the decoder for that stage
/// ([`mass_bins_on`]); never with FAC over candidates.
pub const MASS_BINS: i32 = 8;
/// Whether the decoder bins group-mass scores by [`MASS_BINS`]: yes, or `FASA_GPU_MASS_BINS=0`
/// (benchmarks). Read once.
pub fn mass_bins_on() -> bool {
    static R: OnceLock<bool> = OnceLock::new();
    *R.get_or_init(|| std::env::var("FASA_GPU_MASS_BINS").map_or(true, |v| v != "0"))
}
/// i32 words of `thr` per selection (fasa.cu's `THR_W`): threshold bin, rows above it, select
/// early's flag, FAC over candidates' count and cut (a u64 in words 4–5), unused.
pub const THR_W: usize = 8;
/// Most candidates per FAC block of FAC over candidates (fasa.cu's `CAND_MAX`).
pub const CAND_MAX: usize = 64;
/// `Dims::flags` of FAC over candidates with at most `cap` (≤ [`CAND_MAX`]) candidates per FAC
/// block (fasa.cu's `CANDS_SHIFT`; 0: off): with FAC early, the select filter lets FAC launch
/// from its start; FAC scores the threshold bin's candidates with the rows above it while the
/// refine finds the cut, then masks those below it. For `FacKernel::Reg` only.
pub fn cands_flag(cap: usize) -> i32 {
    (cap.min(CAND_MAX) as i32) << CANDS_SHIFT
}

/// The candidate cap of `Dims::flags` (0: FAC over candidates off).
pub fn cands_cap(flags: i32) -> usize {
    (flags >> CANDS_SHIFT) as usize & 0xff
}
const CANDS_SHIFT: i32 = 8;

// SAFETY: `Dims` is `repr(C)` plain old data, laid out as the kernels' `struct Dims`.
unsafe impl DeviceRepr for Dims {}

/// Every kernel of the module, looked up once.
#[derive(Clone)]
pub(crate) struct Funcs {
    /// `tip_mass_t2`, `_t4`, `_t8` (tokens a thread: [`mass_tpt`]).
    pub tip_mass: [CudaFunction; 3],
    /// Filter blocks of 8192, 2048 and 1024 tokens (`select_filter_v8`, `_v2`, `_v1`; `select::FILTER_TOKS`).
    pub select_filter: [CudaFunction; 3],
    pub select_refine: CudaFunction,
    pub rerank_mass: CudaFunction,
    /// The split merge, walkers loading 1 or 8 splits at a time (`fac_combine`, `fac_combine8`).
    pub fac_combine: [CudaFunction; 2],
    pub fill_random_f32: CudaFunction,
    pub copy_u4: CudaFunction,
    /// Per dtype: append, tip, rerank_scores, fill_random, append_rows.
    pub typed: [[CudaFunction; 5]; 2],
    /// Per dtype, group-mass TIP (per-head scores) for at most 2, 4, 8 heads per selection.
    pub tip_heads: [[CudaFunction; 3]; 2],
    /// The same two TIP kernels reading the int8 scoring planes for whole blocks (`tip8_*`,
    /// `tip8_heads_*`), and the block quantiser (`quant_blocks_*`), per dtype.
    pub tip8: [CudaFunction; 2],
    /// The pipelined int8 TIP, per dtype and [`TIP8_PIPES`] entry.
    pub tip8p: [[CudaFunction; TIP8_PIPES.len()]; 2],
    /// Its twins over int4 planes (`tip4p_<NS>x4int_*`), per dtype and [`TIP4_PIPES`] entry.
    pub tip4p: [[CudaFunction; TIP4_PIPES.len()]; 2],
    pub tip8_heads: [[CudaFunction; 3]; 2],
    /// The group-mass int8 TIP pipelined as `tip8p` (`tip8ph_h*x*`), per dtype and head bound.
    pub tip8ph: [[CudaFunction; 3]; 2],
    /// Its twin over int4 planes (`tip4ph_h*x*`), per dtype and head bound.
    pub tip4ph: [[CudaFunction; 3]; 2],
    pub quant_blocks: [CudaFunction; 2],
    /// TIP over per-FC int8 planes (`tipfc_h*`), wide and narrow ([`tipfc_narrow`]), per dtype,
    /// for at most 1 (summed score), 2, 4, 8 heads per selection.
    pub tipfc: [[[CudaFunction; 4]; 2]; 2],
    /// The group-mass stage 1 over per-FC int8 planes on tensor cores (`tipm_h*k*`), per dtype,
    /// for 1 and 2 k-steps of 16 FCs, for at most 2, 4, 8 heads per selection.
    pub tipm: [[[CudaFunction; 3]; 2]; 2],
    /// Per dtype, FAC/dense kernels for at most 1, 2, 4, 8 heads per selection.
    pub fac: [[CudaFunction; 4]; 2],
    /// The same, lean variant (`facl_h*`: q re-read from shared memory, more blocks per SM).
    pub facl: [[CudaFunction; 4]; 2],
    /// The same, wide variant for at most 1, 2, 4 heads (`facw_h*`: 8 rows per lane group and
    /// iteration; FAC over candidates).
    pub facw: [[CudaFunction; 3]; 2],
    /// Per dtype, the tensor-core FAC/dense kernels for d = 64 and 128 (`facm_d*`).
    pub facm: [[CudaFunction; 2]; 2],
}

/// Which FAC/dense kernel family runs (same partials, same split; `fac::partials`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FacKernel {
    /// `fac_h*`: each lane holds its dims of q in registers (CUDA cores).
    Reg,
    /// `facl_h*`: q re-read from shared memory at each use, more blocks per SM.
    Lean,
    /// `facm_d*`: tensor cores (mma.sync m16n8k16, f32 accumulation; q and p as sums of 16-bit
    /// pairs, two for fp16 and three for bf16); head dim 64 or 128 only, any group of ≤ 8 heads.
    Mma,
}

impl FacKernel {
    pub const ALL: [FacKernel; 3] = [FacKernel::Reg, FacKernel::Lean, FacKernel::Mma];

    /// Whether the family has kernels for head dim `d` (`Mma`: 64 and 128 only).
    pub fn supports(self, d: usize) -> bool {
        self != FacKernel::Mma || matches!(d, 64 | 128)
    }

    /// The families with kernels for head dim `d`, in [`FacKernel::ALL`]'s order.
    pub fn for_dim(d: usize) -> impl Iterator<Item = FacKernel> {
        Self::ALL.into_iter().filter(move |k| k.supports(d))
    }

    /// One letter for benchmark labels: n, l, m.
    pub fn letter(self) -> char {
        match self {
            FacKernel::Reg => 'n',
            FacKernel::Lean => 'l',
            FacKernel::Mma => 'm',
        }
    }
}

impl Funcs {
    pub fn typed(&self, dt: Dtype, op: TypedOp) -> &CudaFunction {
        &self.typed[dt as usize][op as usize]
    }

    /// The summed-score TIP kernel, from the int8 planes (`q8`) or the 16-bit K only.
    pub fn tip(&self, dt: Dtype, q8: bool) -> &CudaFunction {
        if q8 { &self.tip8[dt as usize] } else { self.typed(dt, TypedOp::Tip) }
    }

    /// The group-mass TIP kernel compiled for the smallest head bound ≥ `hps` (2, 4, 8), from
    /// the int8 planes (`q8`; `pipelined`: `tip8ph_h*x*`) or the 16-bit K only.
    pub fn tip_heads(&self, dt: Dtype, hps: usize, q8: bool, pipelined: bool) -> &CudaFunction {
        let i = heads_bound(hps);
        match (q8, pipelined) {
            (true, true) => &self.tip8ph[dt as usize][i],
            (true, false) => &self.tip8_heads[dt as usize][i],
            (false, _) => &self.tip_heads[dt as usize][i],
        }
    }

    /// The TIP over per-FC int8 planes for `hps` heads: the summed score at 1, else the
    /// group-mass stage 1 for the smallest head bound ≥ `hps` (2, 4, 8); `narrow`: 4 tokens a
    /// thread ([`tipfc_narrow`]).
    pub fn tipfc(&self, dt: Dtype, hps: usize, narrow: bool) -> &CudaFunction {
        &self.tipfc[narrow as usize][dt as usize][if hps <= 1 { 0 } else { 1 + heads_bound(hps) }]
    }

    /// The tensor-core group-mass stage 1 over per-FC planes for the smallest head bound ≥ `hps`
    /// and selections summing up to `k_slots` FCs.
    pub fn tipm(&self, dt: Dtype, hps: usize, k_slots: usize) -> &CudaFunction {
        &self.tipm[dt as usize][tipm_steps(k_slots) - 1][heads_bound(hps)]
    }

    /// The pipelined group-mass TIP over int4 planes for the smallest head bound ≥ `hps`.
    pub fn tip4ph(&self, dt: Dtype, hps: usize) -> &CudaFunction {
        &self.tip4ph[dt as usize][heads_bound(hps)]
    }

    /// The pipelined int8 TIP kernel of `pipe` (a [`TIP8_PIPES`] code), if compiled.
    pub fn tip8p(&self, dt: Dtype, pipe: usize) -> Option<&CudaFunction> {
        TIP8_PIPES.iter().position(|&p| p == pipe).map(|i| &self.tip8p[dt as usize][i])
    }

    /// The pipelined int4 TIP kernel of `pipe` where it is a [`TIP4_PIPES`] code, else
    /// [`TIP4_PIPE`]'s, with the code it ran.
    pub fn tip4p(&self, dt: Dtype, pipe: usize) -> (&CudaFunction, usize) {
        let code = if TIP4_PIPES.contains(&pipe) { pipe } else { TIP4_PIPE };
        let i = TIP4_PIPES.iter().position(|&p| p == code).unwrap_or_else(|| unreachable!("TIP4_PIPE is compiled"));
        (&self.tip4p[dt as usize][i], code)
    }

    /// The FAC kernel of family `kind` for `hps` heads of dim `d`: of `Reg` and `Lean` the one
    /// compiled for the smallest head bound ≥ `hps` (1, 2, 4, 8); `Mma` needs d = 64 or 128.
    /// `cands`: FAC over candidates (`Reg` with at most 4 heads runs the wide `facw_h*`).
    pub fn fac(&self, dt: Dtype, hps: usize, kind: FacKernel, d: usize, cands: bool) -> Result<&CudaFunction, GpuError> {
        let i = match hps {
            0 | 1 => 0,
            2 => 1,
            3 | 4 => 2,
            _ => 3,
        };
        match kind {
            FacKernel::Reg if cands && i < 3 => Ok(&self.facw[dt as usize][i]),
            FacKernel::Reg => Ok(&self.fac[dt as usize][i]),
            FacKernel::Lean => Ok(&self.facl[dt as usize][i]),
            FacKernel::Mma if kind.supports(d) => Ok(&self.facm[dt as usize][usize::from(d == 128)]),
            FacKernel::Mma => Err(GpuError::Shape(format!("fac: the tensor-core kernels need d = 64 or 128, not {d}"))),
        }
    }
}

/// The int8 TIP kernel of new decoders: `FASA_GPU_TIP8` (0 = the unpipelined `tip8` kernel of
/// GPU run 14, or a [`TIP8_PIPES`] code), else [`TIP8_PIPE`]. Read once.
pub fn tip8_pipe() -> usize {
    static R: OnceLock<usize> = OnceLock::new();
    *R.get_or_init(|| match std::env::var("FASA_GPU_TIP8").ok().and_then(|v| v.parse().ok()) {
        Some(r) if r == 0 || TIP8_PIPES.contains(&r) => r,
        _ => TIP8_PIPE,
    })
}

/// Stages NS, tokens per thread and unit JU, and the mode's name (`false` unfolded, `true` scales
/// folded into q, `int` int8 terms) of a pipelined int8 TIP code `100·mode + 10·NS + JU` (kernel
/// `tip8p_<NS>x<JU><mode>_<dtype>`); only [`TIP8_PIPES`] codes are compiled.
pub(crate) fn tip8_pipe_parts(pipe: usize) -> (usize, usize, &'static str) {
    ((pipe % 100) / 10, pipe % 10, ["false", "true", "int"][(pipe / 100).min(2)])
}

/// Index of the smallest compiled head bound (2, 4, 8) ≥ `hps`.
fn heads_bound(hps: usize) -> usize {
    match hps {
        0..=2 => 0,
        3 | 4 => 1,
        _ => 2,
    }
}

/// Tokens per thread and unit JU of the pipelined group-mass int8 TIP for 2, 4 and 8 heads (2
/// stages each; 8 heads' accumulators leave registers for 2): the kernels are `tip8ph_h<H>x<JU>_*`,
/// so a JU that differs from the source's finds no kernel rather than too little shared memory.
const TIP8PH_JU: [usize; 3] = [4, 4, 2];

/// Dynamic shared memory of the pipelined group-mass int8 TIP for `hps` heads, as [`tip8p_smem`].
pub(crate) fn tip8ph_smem(hps: usize) -> usize {
    tip8p_smem(20 + TIP8PH_JU[heads_bound(hps)])
}

/// Dynamic shared memory of its int4 twin (`tip4ph_h*`), as [`tip4p_smem`].
pub(crate) fn tip4ph_smem(hps: usize) -> usize {
    tip4p_smem(20 + TIP8PH_JU[heads_bound(hps)])
}

/// Dynamic shared memory of the pipelined int4 TIP `pipe` ([`TIP4_PIPES`]): as
/// [`tip8p_smem`] with 8-byte pieces (`TIP4P_STAGE`).
pub(crate) fn tip4p_smem(pipe: usize) -> usize {
    stage_smem(pipe, 8)
}

/// Dynamic shared memory of the pipelined int8 TIP `pipe`: NS stages of two groups' 16-byte
/// pieces of JU·256 tokens and their scales ((8 warps, JU, 2 groups, 8 FCs) f32) (`TIP8P_STAGE`).
pub(crate) fn tip8p_smem(pipe: usize) -> usize {
    stage_smem(pipe, 16)
}

/// NS stages of two groups' `piece`-byte pieces of JU·256 tokens and their scales.
fn stage_smem(pipe: usize, piece: usize) -> usize {
    let (ns, ju, _) = tip8_pipe_parts(pipe);
    ns * (2 * 256 * ju * piece + 8 * ju * 2 * 8 * 4)
}

#[derive(Clone, Copy)]
pub(crate) enum TypedOp {
    Append = 0,
    Tip = 1,
    RerankScores = 2,
    Fill = 3,
    AppendRows = 4,
}

/// One device: context, stream, the compiled module.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// Compute capability (major, minor).
    pub arch: (i32, i32),
    pub sm_count: usize,
    /// The GPU shares the host's memory (Jetson): what it allocates comes out of the RAM the
    /// host's memory readings show.
    pub integrated: bool,
    module: Arc<CudaModule>,
    pub(crate) f: Funcs,
    /// Programmatic dependent launch forced on or off, or left to each decoder (`launch::PDL_*`).
    pdl: AtomicU8,
}

/// Whether the driver and NVRTC libraries can be loaded (checked before any cudarc call).
pub fn libraries_present() -> Result<(), GpuError> {
    // SAFETY: these only try to dlopen the libraries; no CUDA call is made.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(GpuError::NoDriver);
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(GpuError::NoNvrtc);
    }
    Ok(())
}

/// NVRTC's version (major, minor); needs [`libraries_present`].
pub fn nvrtc_version() -> (i32, i32) {
    let (mut a, mut b) = (0, 0);
    // SAFETY: writes two ints; the library is loaded (checked by the caller).
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
    (a, b)
}

/// Compiles the FASA kernels to PTX for `compute_<arch>` (cached on disk; see module docs).
pub fn compile_ptx(arch: (i32, i32)) -> Result<String, GpuError> {
    let arch_s = format!("compute_{}{}", arch.0, arch.1);
    let ver = nvrtc_version();
    let src = source();
    let mut h = DefaultHasher::new();
    src.hash(&mut h);
    let key = format!("fasa-{:016x}-{}-nvrtc{}.{}.ptx", h.finish(), arch_s, ver.0, ver.1);
    let dir = ptx_cache_dir();
    if let Some(d) = &dir {
        if let Ok(s) = std::fs::read_to_string(d.join(&key)) {
            return Ok(s);
        }
    }
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch_s}"), "-std=c++17".into(), "-lineinfo".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| GpuError::Compile {
        arch: arch_s.clone(),
        log: match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        },
    })?;
    let src = ptx.to_src();
    if let Some(d) = &dir {
        // A cache that cannot be written costs a recompile next time, nothing else.
        let _ = std::fs::create_dir_all(d).and_then(|_| {
            let tmp = d.join(format!("{key}.{}", std::process::id()));
            std::fs::write(&tmp, &src)?;
            std::fs::rename(&tmp, d.join(&key))
        });
    }
    Ok(src)
}

/// `$FASA_PTX_CACHE`, else `$XDG_CACHE_HOME/fasa/ptx`, else `~/.cache/fasa/ptx`.
fn ptx_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FASA_PTX_CACHE") {
        return Some(p.into());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("fasa").join("ptx"))
}

impl Gpu {
    /// Opens device `ordinal` and compiles (or loads cached) kernels for its architecture.
    pub fn new(ordinal: usize) -> Result<Arc<Gpu>, GpuError> {
        libraries_present()?;
        match CudaContext::device_count() {
            Ok(n) if n as usize > ordinal => {}
            _ => return Err(GpuError::NoDevice),
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream, ordered launches: the per-buffer event tracking is not needed and would
        // get in the way of graph capture.
        // SAFETY: called before any allocation or launch on this context.
        unsafe { ctx.disable_event_tracking() };
        let arch = ctx.compute_capability()?;
        let sm_count = ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let integrated = ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_INTEGRATED)? != 0;
        let ptx = compile_ptx(arch)?;
        let module = ctx.load_module(Ptx::from_src(ptx))?;
        let get = |n: &str| module.load_function(n);
        let typed = |dt: Dtype| -> Result<[CudaFunction; 5], DriverError> {
            let s = dt.suffix();
            Ok([
                get(&format!("append_{s}"))?,
                get(&format!("tip_{s}"))?,
                get(&format!("rerank_scores_{s}"))?,
                get(&format!("fill_random_{s}"))?,
                get(&format!("append_rows_{s}"))?,
            ])
        };
        let tip_heads = |dt: Dtype| -> Result<[CudaFunction; 3], DriverError> {
            let s = dt.suffix();
            Ok([get(&format!("tip_heads_h2_{s}"))?, get(&format!("tip_heads_h4_{s}"))?, get(&format!("tip_heads_h8_{s}"))?])
        };
        let tip8_heads = |dt: Dtype| -> Result<[CudaFunction; 3], DriverError> {
            let s = dt.suffix();
            Ok([get(&format!("tip8_heads_h2_{s}"))?, get(&format!("tip8_heads_h4_{s}"))?, get(&format!("tip8_heads_h8_{s}"))?])
        };
        let fac = |dt: Dtype| -> Result<[CudaFunction; 4], DriverError> {
            let s = dt.suffix();
            Ok([get(&format!("fac_h1_{s}"))?, get(&format!("fac_h2_{s}"))?, get(&format!("fac_h4_{s}"))?, get(&format!("fac_h8_{s}"))?])
        };
        let facl = |dt: Dtype| -> Result<[CudaFunction; 4], DriverError> {
            let s = dt.suffix();
            Ok([get(&format!("facl_h1_{s}"))?, get(&format!("facl_h2_{s}"))?, get(&format!("facl_h4_{s}"))?, get(&format!("facl_h8_{s}"))?])
        };
        let facw = |dt: Dtype| -> Result<[CudaFunction; 3], DriverError> {
            let s = dt.suffix();
            Ok([get(&format!("facw_h1_{s}"))?, get(&format!("facw_h2_{s}"))?, get(&format!("facw_h4_{s}"))?])
        };
        let facm = |dt: Dtype| -> Result<[CudaFunction; 2], DriverError> {
            let s = dt.suffix();
            Ok([get(&format!("facm_d64_{s}"))?, get(&format!("facm_d128_{s}"))?])
        };
        // The pipelined TIP kernels' stages are dynamic shared memory beyond the default 48 KB.
        let get_dyn = |name: &str, smem: usize| -> Result<CudaFunction, DriverError> {
            let f = get(name)?;
            f.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)?;
            Ok(f)
        };
        let tip8p = |dt: Dtype| -> Result<[CudaFunction; TIP8_PIPES.len()], DriverError> {
            let s = dt.suffix();
            let mut v = Vec::new();
            for p in TIP8_PIPES {
                let (ns, ju, mode) = tip8_pipe_parts(p);
                v.push(get_dyn(&format!("tip8p_{ns}x{ju}{mode}_{s}"), tip8p_smem(p))?);
            }
            Ok(v.try_into().unwrap_or_else(|_| unreachable!("one kernel per TIP8_PIPES entry")))
        };
        let tip4p = |dt: Dtype| -> Result<[CudaFunction; TIP4_PIPES.len()], DriverError> {
            let s = dt.suffix();
            let [a, b] = TIP4_PIPES.map(|p| {
                let (ns, ju, _) = tip8_pipe_parts(p);
                get_dyn(&format!("tip4p_{ns}x{ju}int_{s}"), tip4p_smem(p))
            });
            Ok([a?, b?])
        };
        let tip4ph = |dt: Dtype| -> Result<[CudaFunction; 3], DriverError> {
            let s = dt.suffix();
            let [a, b, c] = [2, 4, 8].map(|h| get_dyn(&format!("tip4ph_h{h}x{}_{s}", TIP8PH_JU[heads_bound(h)]), tip4ph_smem(h)));
            Ok([a?, b?, c?])
        };
        let tip8ph = |dt: Dtype| -> Result<[CudaFunction; 3], DriverError> {
            let s = dt.suffix();
            let [a, b, c] = [2, 4, 8].map(|h| get_dyn(&format!("tip8ph_h{h}x{}_{s}", TIP8PH_JU[heads_bound(h)]), tip8ph_smem(h)));
            Ok([a?, b?, c?])
        };
        let tipfc = |dt: Dtype, narrow: bool| -> Result<[CudaFunction; 4], DriverError> {
            let [a, b, c, d] = [1, 2, 4, 8].map(|h| get_dyn(&tipfc_name(h, narrow, dt), tipfc_smem(h, narrow)));
            Ok([a?, b?, c?, d?])
        };
        let tipm = |dt: Dtype| -> Result<[[CudaFunction; 3]; 2], DriverError> {
            let f = |ks: usize| -> Result<[CudaFunction; 3], DriverError> {
                let [a, b, c] = [2, 4, 8].map(|h| get_dyn(&tipm_name(h, ks, dt), tipm_smem(16 * ks)));
                Ok([a?, b?, c?])
            };
            Ok([f(1)?, f(2)?])
        };
        let f = Funcs {
            tip_mass: [get("tip_mass_t2")?, get("tip_mass_t4")?, get("tip_mass_t8")?],
            select_filter: [get("select_filter_v8")?, get("select_filter_v2")?, get("select_filter_v1")?],
            select_refine: get("select_refine")?,
            rerank_mass: get("rerank_mass")?,
            fac_combine: [get("fac_combine")?, get("fac_combine8")?],
            fill_random_f32: get("fill_random_f32")?,
            copy_u4: get("copy_u4")?,
            typed: [typed(Dtype::F16)?, typed(Dtype::Bf16)?],
            tip_heads: [tip_heads(Dtype::F16)?, tip_heads(Dtype::Bf16)?],
            tip8: [get("tip8_f16")?, get("tip8_bf16")?],
            tip8_heads: [tip8_heads(Dtype::F16)?, tip8_heads(Dtype::Bf16)?],
            tip8ph: [tip8ph(Dtype::F16)?, tip8ph(Dtype::Bf16)?],
            tip4ph: [tip4ph(Dtype::F16)?, tip4ph(Dtype::Bf16)?],
            quant_blocks: [get("quant_blocks_f16")?, get("quant_blocks_bf16")?],
            tipfc: [[tipfc(Dtype::F16, false)?, tipfc(Dtype::Bf16, false)?], [tipfc(Dtype::F16, true)?, tipfc(Dtype::Bf16, true)?]],
            tipm: [tipm(Dtype::F16)?, tipm(Dtype::Bf16)?],
            fac: [fac(Dtype::F16)?, fac(Dtype::Bf16)?],
            facl: [facl(Dtype::F16)?, facl(Dtype::Bf16)?],
            facw: [facw(Dtype::F16)?, facw(Dtype::Bf16)?],
            facm: [facm(Dtype::F16)?, facm(Dtype::Bf16)?],
            tip8p: [tip8p(Dtype::F16)?, tip8p(Dtype::Bf16)?],
            tip4p: [tip4p(Dtype::F16)?, tip4p(Dtype::Bf16)?],
        };
        let stream = ctx.new_stream()?; // not the legacy NULL stream: graphs cannot capture that
        // PDL per decoder (launch.rs), unless FASA_GPU_PDL=1 / 0 forces it.
        let pdl = match std::env::var("FASA_GPU_PDL").as_deref() {
            Ok("1") if arch.0 >= 9 => launch::PDL_ON,
            Ok("1" | "0") => launch::PDL_OFF,
            _ => launch::PDL_AUTO,
        };
        Ok(Arc::new(Gpu { ctx, stream, arch, sm_count, integrated, module, f, pdl: AtomicU8::new(pdl) }))
    }

    /// Free device memory, bytes (all of the host's on a GPU that shares it).
    pub fn free_memory(&self) -> Result<u64, GpuError> {
        Ok(self.ctx.mem_get_info()?.0 as u64)
    }

    /// Device 0, or None (logged once) when there is no usable GPU: callers run the CPU path.
    pub fn try_default() -> Option<Arc<Gpu>> {
        static GPU: OnceLock<Option<Arc<Gpu>>> = OnceLock::new();
        GPU.get_or_init(|| match Gpu::new(0) {
            Ok(g) => {
                log::info!("fasa-kernels: CUDA device 0, sm_{}{}, {} SMs", g.arch.0, g.arch.1, g.sm_count);
                Some(g)
            }
            Err(e) => {
                log::warn!("fasa-kernels: no GPU path ({e}); using the CPU kernels");
                None
            }
        })
        .clone()
    }

    /// This device's kernels launching on `stream` instead of [`Gpu::stream`]: work given to the
    /// view is ordered on that stream. Buffers allocated through either are usable by both (one
    /// context); ordering work across the two streams is the caller's (events, or a sync).
    pub fn on_stream(&self, stream: Arc<CudaStream>) -> Gpu {
        let pdl = AtomicU8::new(self.pdl.load(Ordering::Relaxed));
        Gpu { ctx: Arc::clone(&self.ctx), stream, arch: self.arch, sm_count: self.sm_count, integrated: self.integrated, module: Arc::clone(&self.module), f: self.f.clone(), pdl }
    }

    /// Wraps a CUDA stream that another library owns and destroys (ONNX Runtime's compute stream,
    /// `cudaStream_t`), for [`Gpu::on_stream`].
    ///
    /// # Safety
    /// `raw` is a live stream of this device's primary context (the one the CUDA runtime uses),
    /// and it outlives the wrapper and every launch made through it.
    pub unsafe fn borrow_stream(&self, raw: *mut std::ffi::c_void) -> Arc<CudaStream> {
        // SAFETY: the caller's contract above.
        unsafe { self.ctx.wrap_borrowed_stream(raw as cudarc::driver::sys::CUstream) }
    }

    /// Copies `src` from this host into device memory at `dst` (another library's buffer of at
    /// least `src.len()` floats), ordered on [`Gpu::stream`]. The copy is staged from pageable
    /// memory, so `src` may be dropped when this returns.
    ///
    /// # Safety
    /// `dst` is device memory of this context, `src.len()` floats long, not used concurrently.
    pub unsafe fn copy_to_raw(&self, src: &[f32], dst: u64) -> Result<(), GpuError> {
        self.ctx.bind_to_thread()?;
        // SAFETY: the caller's contract above.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }?;
        Ok(())
    }

    /// Copies `src` into device memory at `dst` (another library's buffer of at least
    /// `src.len()` floats), ordered on [`Gpu::stream`].
    ///
    /// # Safety
    /// As [`Gpu::copy_to_raw`]; `src` is not written before the copy has run.
    pub unsafe fn copy_dtod_raw(&self, src: &CudaSlice<f32>, dst: u64) -> Result<(), GpuError> {
        use cudarc::driver::DevicePtr;
        let (p, _sync) = src.device_ptr(&self.stream);
        // SAFETY: the caller's contract above; both buffers are this context's.
        unsafe { cudarc::driver::result::memcpy_dtod_async(dst, p, src.len() * 4, self.stream.cu_stream()) }?;
        Ok(())
    }

    /// Fills `x` with uniform values in (-amp, amp) from a hash of (seed, index) (benchmarks).
    pub fn fill_random(&self, x: &mut cudarc::driver::CudaSlice<u16>, dt: Dtype, seed: u32, amp: f32) -> Result<(), GpuError> {
        let n = x.len() as u64;
        let f = self.f.typed(dt, TypedOp::Fill);
        let mut b = self.stream.launch_builder(f);
        b.arg(x).arg(&n).arg(&seed).arg(&amp);
        // SAFETY: the kernel writes x[0..n) only, n = x.len().
        unsafe { b.launch(LaunchConfig { grid_dim: (1024, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }?;
        Ok(())
    }

    pub fn fill_random_f32(&self, x: &mut cudarc::driver::CudaSlice<f32>, seed: u32, amp: f32) -> Result<(), GpuError> {
        let n = x.len() as u64;
        let mut b = self.stream.launch_builder(&self.f.fill_random_f32);
        b.arg(x).arg(&n).arg(&seed).arg(&amp);
        // SAFETY: the kernel writes x[0..n) only, n = x.len().
        unsafe { b.launch(LaunchConfig { grid_dim: (1024, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }?;
        Ok(())
    }
}

impl Gpu {
    /// Resident blocks per multiprocessor of the main kernels for `dt`, each with its label.
    pub fn occupancy(&self, dt: Dtype) -> Result<Vec<(&'static str, u32)>, GpuError> {
        let occ = |f: &CudaFunction, threads: u32| f.occupancy_max_active_blocks_per_multiprocessor(threads, 0, None);
        Ok(vec![
            ("tip", occ(self.f.tip(dt, false), 256)?),
            ("filter", occ(&self.f.select_filter[0], 256)?),
            ("fac(H=4)", occ(self.f.fac(dt, 4, FacKernel::Reg, 128, false)?, 128)?),
            ("facl(H=4)", occ(self.f.fac(dt, 4, FacKernel::Lean, 128, false)?, 128)?),
            ("facw(H=4)", occ(self.f.fac(dt, 4, FacKernel::Reg, 128, true)?, 128)?),
            ("tip_heads(H=4)", occ(self.f.tip_heads(dt, 4, false, false), 256)?),
            ("tip_heads(H=8)", occ(self.f.tip_heads(dt, 8, false, false), 256)?),
            ("tip8", occ(self.f.tip(dt, true), 256)?),
            ("tip8_heads(H=4)", occ(self.f.tip_heads(dt, 4, true, false), 256)?),
            ("tip8_heads(H=8)", occ(self.f.tip_heads(dt, 8, true, false), 256)?),
            ("tip8p 24", self.tip8p_blocks_per_sm(dt, 24)?),
            ("tip8p 124", self.tip8p_blocks_per_sm(dt, 124)?),
            ("tip8p 224", self.tip8p_blocks_per_sm(dt, 224)?),
            ("tip4p 4224", self.tip4p_blocks_per_sm(dt, 4224)?),
            ("tip4p 4244", self.tip4p_blocks_per_sm(dt, 4244)?),
            ("facm(d=128)", self.fac_blocks_per_sm(dt, 4, FacKernel::Mma, 128)?),
            ("tipfc(H=1)", self.tipfc_blocks_per_sm(dt, 1)?),
            ("tipfc(H=4)", self.tipfc_blocks_per_sm(dt, 4)?),
            ("tipfc(H=8)", self.tipfc_blocks_per_sm(dt, 8)?),
        ])
    }

    /// Resident blocks per multiprocessor of the FAC kernel `kind` for `hps` heads of dim `d`.
    pub fn fac_blocks_per_sm(&self, dt: Dtype, hps: usize, kind: FacKernel, d: usize) -> Result<u32, GpuError> {
        Ok(self.f.fac(dt, hps, kind, d, false)?.occupancy_max_active_blocks_per_multiprocessor(128, 0, None)?)
    }

    /// Resident blocks per multiprocessor of the pipelined group-mass int8 TIP for `hps` heads.
    pub fn tip8ph_blocks_per_sm(&self, dt: Dtype, hps: usize) -> Result<u32, GpuError> {
        Ok(self.f.tip_heads(dt, hps, true, true).occupancy_max_active_blocks_per_multiprocessor(256, tip8ph_smem(hps), None)?)
    }

    /// Resident blocks per multiprocessor of the TIP over per-FC int8 planes for `hps` heads, its
    /// wide kernel (which sizes the chunks; the narrow one holds less shared memory).
    pub fn tipfc_blocks_per_sm(&self, dt: Dtype, hps: usize) -> Result<u32, GpuError> {
        Ok(self.f.tipfc(dt, hps, false).occupancy_max_active_blocks_per_multiprocessor(256, tipfc_smem(hps, false), None)?)
    }

    /// Resident blocks per multiprocessor of `tipm_h*` for `hps` heads summing `k_slots` FCs.
    pub fn tipm_blocks_per_sm(&self, dt: Dtype, hps: usize, k_slots: usize) -> Result<u32, GpuError> {
        Ok(self.f.tipm(dt, hps, k_slots).occupancy_max_active_blocks_per_multiprocessor(256, tipm_smem(k_slots), None)?)
    }

    /// The same for its int4 twin.
    pub fn tip4ph_blocks_per_sm(&self, dt: Dtype, hps: usize) -> Result<u32, GpuError> {
        Ok(self.f.tip4ph(dt, hps).occupancy_max_active_blocks_per_multiprocessor(256, tip4ph_smem(hps), None)?)
    }

    /// Resident blocks per multiprocessor of the pipelined int8 TIP `pipe` ([`TIP8_PIPES`]).
    pub fn tip8p_blocks_per_sm(&self, dt: Dtype, pipe: usize) -> Result<u32, GpuError> {
        let f = self.f.tip8p(dt, pipe).ok_or_else(|| GpuError::Shape(format!("no int8 TIP kernel {pipe}")))?;
        Ok(f.occupancy_max_active_blocks_per_multiprocessor(256, tip8p_smem(pipe), None)?)
    }

    /// Resident blocks per multiprocessor of the pipelined int4 TIP `pipe` (as [`Funcs::tip4p`]
    /// picks it).
    pub fn tip4p_blocks_per_sm(&self, dt: Dtype, pipe: usize) -> Result<u32, GpuError> {
        let (f, code) = self.f.tip4p(dt, pipe);
        Ok(f.occupancy_max_active_blocks_per_multiprocessor(256, tip4p_smem(code), None)?)
    }

    /// Copies `src` to `dst` with a plain 16-byte-per-thread kernel (the SM path, as attention
    /// kernels read memory; a memcpy node in a graph goes through the copy engines instead).
    pub fn copy_kernel(&self, src: &cudarc::driver::CudaSlice<u8>, dst: &mut cudarc::driver::CudaSlice<u8>) -> Result<(), GpuError> {
        let n = (src.len().min(dst.len()) / 16) as u64;
        let mut b = self.stream.launch_builder(&self.f.copy_u4);
        b.arg(src).arg(dst).arg(&n);
        // SAFETY: n 16-byte words fit both buffers (cudaMalloc'd, 256-byte aligned).
        unsafe { b.launch(LaunchConfig { grid_dim: (self.sm_count as u32 * 8, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 }) }?;
        Ok(())
    }
}

pub(crate) fn cfg(grid: (usize, usize, usize), block: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32), block_dim: (block as u32, 1, 1), shared_mem_bytes: 0 }
}
