//! Byte accounting of the KV cache, in one place, mirroring the cache layout of
//! `attention::cache` (pages of `PAGE` = 64 tokens per (layer, KV head)).
//!
//! Per (layer, KV head) and page, with `n_fc = d/2` FCs and `e` bytes per element:
//! - whole cache (dense and FASA-C; what `CachePool` allocates today, whatever the mode):
//!   K planes `(n_fc, PAGE, 2)` + K rows `(PAGE, d)` + V rows `(PAGE, d)` + Quest bounds
//!   `(PAGE/16, 2, d)` = `3.125·d` elements per token, plus the int8 scoring planes
//!   `(n_fc, 2, PAGE)` and their f32 scales `(n_fc, PAGE/32)`: `d + d/16` bytes per token
//!   whatever `e`. Everything is in the fast tier.
//! - FASA-M, sparse layers: fast tier = the pool's K planes `(P, PAGE, 2)` only (what TIP
//!   streams); slow tier = one row per token `[K pairs of the other n_fc−P FCs | V]`, i.e.
//!   `(PAGE, d − 2P + d)`, so fetching one selected token is one contiguous read. No K-row copy
//!   (focused attention joins the pool pairs from the fast tier with the fetched pairs) and no
//!   Quest bounds (the `quest` baseline is not offered on FASA-M).
//! - FASA-M, the first `dense_layers` layers attend densely and keep the whole-cache layout in
//!   the fast tier (streaming their V from the slow tier every step would be the slowest path).
//! - FASA-M row cache, per session, fast tier: `ROW_CACHE_FACTOR · B` fetched rows of
//!   `(d − 2P + d)` elements per sparse (layer, KV head): consecutive steps select mostly the
//!   same tokens, so rows fetched earlier are kept.
use serde::{Deserialize, Serialize};

use crate::attention::config::QUEST_PAGE;
use crate::attention::PAGE;
use crate::ModelConfig;
use fasa_kernels::cpu::QB;

/// Layers that attend densely under the sparse variants (`AttnConfig::fasa().dense_layers`).
pub const DEFAULT_DENSE_LAYERS: usize = 1;
/// FASA-M's row cache holds this many times B rows per sparse (layer, KV head).
pub const ROW_CACHE_FACTOR: usize = 2;

/// Which resident layout (and default attention) a plan uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// Whole cache in fast memory; requests attend densely by default.
    Dense,
    /// Whole cache in fast memory; requests use `fasa` (TIP over k FCs, top-B focused attention).
    FasaC,
    /// Pool K planes in fast memory, the rest in the slow tier with a row cache.
    FasaM,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Dense => "dense",
            Variant::FasaC => "fasa-c",
            Variant::FasaM => "fasa-m",
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Model shapes the planner needs (all from `ModelConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shapes {
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Embedding width D (workspace only).
    pub hidden: usize,
    /// SwiGLU inner width (workspace only).
    pub ffn_hidden: usize,
    pub vocab: usize,
    /// Trained context length: no plan offers more.
    pub context_length: usize,
}

impl Shapes {
    pub fn from_config(c: &ModelConfig) -> Self {
        Self {
            n_layers: c.n_layers,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            hidden: c.hidden,
            ffn_hidden: c.ffn_hidden,
            vocab: c.vocab_size,
            context_length: c.context_length,
        }
    }
    pub fn n_fc(&self) -> usize {
        self.head_dim / 2
    }
}

/// Bytes in the fast and the slow tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierBytes {
    pub fast: u64,
    pub slow: u64,
}

impl TierBytes {
    pub fn total(&self) -> u64 {
        self.fast.saturating_add(self.slow)
    }
    pub fn times(&self, n: u64) -> TierBytes {
        TierBytes { fast: self.fast.saturating_mul(n), slow: self.slow.saturating_mul(n) }
    }
    pub fn plus(&self, o: TierBytes) -> TierBytes {
        TierBytes { fast: self.fast.saturating_add(o.fast), slow: self.slow.saturating_add(o.slow) }
    }
    /// Both tiers within `avail`.
    pub fn fits(&self, avail: TierBytes) -> bool {
        self.fast <= avail.fast && self.slow <= avail.slow
    }
}

/// Everything that decides the resident bytes of one session's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub variant: Variant,
    /// Resident FC pool P (FASA-M fast tier); ignored by the whole-cache variants.
    pub pool: usize,
    /// Token budget B (sizes FASA-M's row cache).
    pub budget: usize,
    pub dense_layers: usize,
    /// Bytes per element: 4 for the f32 CPU cache, 2 for the fp16 GPU cache.
    pub element_bytes: usize,
    /// The GPU decode mirror of the whole-cache variants (`attention::gpu`: fp16 K and V, int8
    /// scoring planes, decoder workspaces, `fasa_kernels::gpu::append::mirror_bytes_per_token`
    /// per layer and token) comes out of the fast tier too: a GPU that shares the host's memory
    /// (Jetson). FASA-M keeps no mirror.
    pub gpu_mirror: bool,
}

/// Whole-cache elements of one page of one (layer, KV head): K planes, K rows, V, Quest bounds.
fn whole_page_elems(d: usize) -> usize {
    (d / 2) * PAGE * 2 + PAGE * d + PAGE * d + PAGE / QUEST_PAGE * 2 * d
}

/// Bytes of one whole-cache page of one (layer, KV head) with `e` bytes per element: the
/// elements, then the int8 scoring planes and their scales (`attention::cache`).
fn whole_page_bytes(d: usize, e: usize) -> usize {
    whole_page_elems(d) * e + PAGE * d + (d / 2) * (PAGE / QB) * 4
}

/// FASA-M elements of one page of one sparse (layer, KV head): (fast, slow).
fn tiered_page_elems(d: usize, pool: usize) -> (usize, usize) {
    let pool = pool.min(d / 2);
    (pool * PAGE * 2, PAGE * (fasa_m_row_elems(d, pool)))
}

/// One FASA-M slow-tier row: the K pairs outside the pool, then V.
fn fasa_m_row_elems(d: usize, pool: usize) -> usize {
    (d - 2 * pool.min(d / 2)) + d
}

/// Resident KV bytes one cached token costs over all layers and KV heads, per tier. Exact for
/// whole pages (`d` a multiple of 8 keeps the Quest share integral); see the module comment.
pub fn tier_bytes_per_token(l: &Layout, s: &Shapes) -> TierBytes {
    let d = s.head_dim;
    let e = l.element_bytes;
    let heads = s.n_kv_heads;
    let mirror = if l.gpu_mirror { gpu_mirror_bytes_per_token(s) * PAGE as u64 } else { 0 };
    let per_page = match l.variant {
        Variant::Dense | Variant::FasaC => TierBytes { fast: (s.n_layers * heads * whole_page_bytes(d, e)) as u64 + mirror, slow: 0 },
        Variant::FasaM => {
            let dense = l.dense_layers.min(s.n_layers);
            let (f, sl) = tiered_page_elems(d, l.pool);
            TierBytes {
                fast: ((dense * whole_page_elems(d) + (s.n_layers - dense) * f) * heads * e) as u64,
                slow: ((s.n_layers - dense) * sl * heads * e) as u64,
            }
        }
    };
    TierBytes { fast: per_page.fast / PAGE as u64, slow: per_page.slow / PAGE as u64 }
}

/// Bytes a GPU mirror holds per cached token over all layers (`Layout::gpu_mirror`).
pub fn gpu_mirror_bytes_per_token(s: &Shapes) -> u64 {
    let shape = crate::attention::cache::CacheShape { n_layers: s.n_layers, n_kv_heads: s.n_kv_heads, head_dim: s.head_dim };
    crate::attention::gpu::mirror_bytes_per_token(shape, s.n_heads)
}

/// `tier_bytes_per_token` with the default dense layers and no GPU mirror (the signature the
/// daemon and the tables use).
pub fn kv_bytes_per_token(variant: Variant, shapes: &Shapes, pool: usize, element_bytes: usize) -> TierBytes {
    tier_bytes_per_token(&Layout { variant, pool, budget: 0, dense_layers: DEFAULT_DENSE_LAYERS, element_bytes, gpu_mirror: false }, shapes)
}

/// K and V rows only (`2·d` elements per layer, head and token): what a plain dense engine such
/// as llama.cpp holds. A reference for the tables, not a layout of ours.
pub fn plain_kv_bytes_per_token(s: &Shapes, element_bytes: usize) -> u64 {
    (s.n_layers * s.n_kv_heads * 2 * s.head_dim * element_bytes) as u64
}

/// FASA-M row cache rows per sparse (layer, KV head) of a `context`-token session:
/// `ROW_CACHE_FACTOR · B`, never more than the tokens there are.
pub fn row_cache_rows(budget: usize, context: usize) -> usize {
    (ROW_CACHE_FACTOR * budget).min(context)
}

/// Bytes a session of up to `context` tokens holds beyond its pages: FASA-M's row cache (fast
/// tier); 0 otherwise.
pub fn per_session_bytes(l: &Layout, s: &Shapes, context: usize) -> TierBytes {
    match l.variant {
        Variant::Dense | Variant::FasaC => TierBytes::default(),
        Variant::FasaM => {
            let sparse = s.n_layers - l.dense_layers.min(s.n_layers);
            let rows = row_cache_rows(l.budget, context);
            TierBytes { fast: (sparse * s.n_kv_heads * rows * fasa_m_row_elems(s.head_dim, l.pool) * l.element_bytes) as u64, slow: 0 }
        }
    }
}

/// Resident bytes of one session of `context` tokens: whole pages plus the per-session part
/// (sized for the page-rounded length, as the cache allocates).
pub fn session_bytes(l: &Layout, s: &Shapes, context: usize) -> TierBytes {
    let tokens = context.div_ceil(PAGE) * PAGE;
    tier_bytes_per_token(l, s).times(tokens as u64).plus(per_session_bytes(l, s, tokens))
}

/// Activation workspace of the decoder graph (f32, as ONNX Runtime runs it on the CPU), peak
/// over one layer of a prefill run of `chunk` tokens (`model::PREFILL_CHUNK` = 512), in bytes:
/// `4 · [chunk · (6·D + (H + 2·Hkv)·d + 2·H·d + 3·F) + 2·V + H·context]`, where per token:
/// residual, norm output, o-proj output, skip-norm output and sum, down-proj output (6·D); the
/// fused QKV output; the operator's rotated Q and its output (2·H·d); gate, up and their product
/// (3·F); plus the last token's logits and the sampler's probabilities (2·V) and one score row
/// per query head over the context. ORT's arena rounds up and keeps peaks: treat it as a floor
/// and measure (`ModelInfo`) when the model is loaded.
pub fn workspace_bytes(s: &Shapes, chunk: usize, context: usize) -> u64 {
    let per_token = 6 * s.hidden + (s.n_heads + 2 * s.n_kv_heads) * s.head_dim + 2 * s.n_heads * s.head_dim + 3 * s.ffn_hidden;
    4 * (chunk * per_token + 2 * s.vocab + s.n_heads * context) as u64
}
