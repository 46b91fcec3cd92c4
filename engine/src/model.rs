//! The immutable `Model` (ONNX Runtime session, tokenizer, shapes, cache pool) and the
//! per-request `Sequence` (tokens, position, cache slot, sampler), stepped one token at a time
//! so a scheduler can interleave and cancel requests between steps.
use std::path::PathBuf;
use std::sync::Arc;

use ort::session::Session;
use ort::value::Tensor;

use crate::attention::{AttnConfig, AttnStats, CachePool, CacheShape, FasaAttentionOp, KvVariant, SlotLease, OP_DOMAIN};
use crate::detok::TextStream;
use crate::gguf::GgufFile;
use crate::graph::{build_decoder, Activations};
use crate::runtime::ExecutionProvider;
use crate::sampler::{self, Sampler};
use crate::tokenizer::Tokenizer;
use crate::{catalog, chat, runtime, EngineError, FinishReason, GenerateRequest, ModelConfig, Prompt, Result, Step};

/// Prompt tokens fed per graph run: bounds activation memory and lets a scheduler interleave
/// other sequences between chunks of a long prefill.
pub const PREFILL_CHUNK: usize = 512;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub model_path: PathBuf,
    /// Path of `libonnxruntime.so.*`.
    pub ort_library: PathBuf,
    /// Sequences that can be live at once (cache slots).
    pub max_sequences: usize,
    /// Tokens per sequence; 0 = the model's trained context length.
    pub max_context: usize,
    /// ONNX Runtime intra-op threads; 0 = all cores.
    pub threads: usize,
    /// KV cache layout: FASA-C (all in memory, the default) or FASA-M (two tiers).
    pub kv_variant: KvVariant,
    /// Decode attention on the GPU when one is usable (FASA-C only; `FASA_GPU=0` also turns it
    /// off). See `attention::gpu`.
    pub gpu: bool,
    /// Activations of the weight matmuls: int8 (the default, as llama.cpp) or exact f32.
    pub activations: Activations,
    /// ONNX Runtime's execution provider for the graph (`runtime::ExecutionProvider`).
    pub execution_provider: ExecutionProvider,
}

impl LoadOptions {
    pub fn new(model_path: impl Into<PathBuf>, ort_library: impl Into<PathBuf>) -> Self {
        Self { model_path: model_path.into(), ort_library: ort_library.into(), max_sequences: 4, max_context: 0, threads: 0, kv_variant: KvVariant::FasaC, gpu: true, activations: Activations::default(), execution_provider: ExecutionProvider::Auto }
    }
}

/// What a client may want to know about the loaded model.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub config: ModelConfig,
    /// Context per sequence actually allocated (≤ the trained context).
    pub max_context: usize,
    pub max_sequences: usize,
    /// Bytes of weights held by the graph.
    pub weight_bytes: u64,
    /// sha256 of the GGUF file (checked against the catalog when the file is one of ours).
    pub sha256: String,
    /// Activations of the weight matmuls.
    #[serde(default)]
    pub activations: Activations,
    /// The execution provider the graph runs on (`cpu` or `cuda`, never `auto`).
    #[serde(default = "cpu_provider")]
    pub execution_provider: ExecutionProvider,
}

fn cpu_provider() -> ExecutionProvider {
    ExecutionProvider::Cpu
}

pub struct Model {
    info: ModelInfo,
    /// Attention settings of requests that name none.
    default_attention: AttnConfig,
    tokenizer: Tokenizer,
    session: Session,
    pool: Arc<CachePool>,
}

/// One request's state; dropping it frees its cache slot.
pub struct Sequence {
    lease: SlotLease,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    n_prompt: usize,
    /// Tokens whose K/V are in the cache (the next run starts at this position).
    cached: usize,
    max_tokens: usize,
    attention: AttnConfig,
    sampler: Sampler,
    text: TextStream,
    finished: Option<FinishReason>,
}

/// Full f32 matmuls under the CUDA provider, not TF32 (10-bit mantissas): decode is bound by
/// bytes, not FLOPs, so TF32 buys nothing there, and it moves logits by ~3e-3 against the CPU's,
/// enough to flip a sparse selection. `FASA_ORT_TF32=1` allows it (prefill speed).
fn exact_f32() -> bool {
    !std::env::var("FASA_ORT_TF32").is_ok_and(|v| v == "1")
}

/// Whether to register the CUDA execution provider: `Auto` takes it when the ORT library has
/// it and the GPU path is on; `Cuda` fails the load, saying why, when either is missing.
fn use_cuda(opts: &LoadOptions, mirror: bool) -> Result<bool> {
    let lib = runtime::has_cuda_provider();
    match opts.execution_provider {
        ExecutionProvider::Cpu => Ok(false),
        ExecutionProvider::Auto => Ok(lib && mirror),
        ExecutionProvider::Cuda if !lib => Err(EngineError::Runtime(format!("the ONNX Runtime library at {} has no CUDA execution provider (the onnxruntime-gpu build has it; point FASA_ORT_LIB at its libonnxruntime.so)", opts.ort_library.display()))),
        ExecutionProvider::Cuda if !mirror => Err(EngineError::Runtime("the CUDA execution provider needs the GPU path: an NVIDIA GPU with its driver and NVRTC, the FASA-C cache, and FASA_GPU not 0".into())),
        ExecutionProvider::Cuda => Ok(true),
    }
}

impl Model {
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let env = runtime::environment(&opts.ort_library)?;
        let sha256 = catalog::verify(&opts.model_path)?;
        let file = GgufFile::open(&opts.model_path).map_err(|e| EngineError::BadModel { path: opts.model_path.clone(), reason: e.to_string() })?;
        let config = ModelConfig::from_gguf(&file).map_err(|e| EngineError::BadModel { path: opts.model_path.clone(), reason: e.to_string() })?;
        if config.head_dim % 2 != 0 || config.n_heads % config.n_kv_heads != 0 {
            return Err(EngineError::Unsupported(format!("head_dim {} / heads {}:{} have no RoPE pairs or GQA groups", config.head_dim, config.n_heads, config.n_kv_heads)));
        }
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let max_context = match opts.max_context {
            0 => config.context_length,
            n => n.min(config.context_length),
        };
        let shape = CacheShape { n_layers: config.n_layers, n_kv_heads: config.n_kv_heads, head_dim: config.head_dim };
        let pool = CachePool::new(shape, opts.max_sequences.max(1), max_context, crate::attention::Profile::heuristic(&config, &sha256), opts.kv_variant);
        if opts.kv_variant == KvVariant::FasaC {
            if let Some(m) = crate::attention::gpu::GpuMirror::detect(shape, config.n_heads, pool.n_slots(), max_context, opts.gpu) {
                pool.set_gpu(m);
            }
        }
        // ORT registers custom-op domains in a process-wide table: two sessions created at once
        // can collide ("domain is already exist"), so sessions are built one at a time.
        static SESSION_BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = SESSION_BUILD.lock().unwrap_or_else(|e| e.into_inner());
        let threads = match opts.threads {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        };
        let cuda = use_cuda(opts, pool.gpu().is_some())?;
        let mut domain = ort::operator::OperatorDomain::new(OP_DOMAIN)?.add(FasaAttentionOp { pool: Arc::clone(&pool), threads, on_cuda: false })?.add(crate::graph::BlockCorrectionOp)?;
        let mut builder = Session::builder(env)?.with_intra_threads(threads).map_err(ort::Error::from)?;
        let cuda = cuda && match ort::ep::ExecutionProvider::register(&ort::ep::CUDA::default().with_device_id(0).with_tf32(!exact_f32()), &mut builder) {
            Ok(()) => true,
            Err(e) if opts.execution_provider == ExecutionProvider::Cuda => return Err(EngineError::Runtime(format!("the CUDA execution provider did not start: {e}"))),
            Err(e) => {
                log::warn!("ONNX Runtime's CUDA execution provider did not start ({e}); the graph runs on the CPU");
                false
            }
        };
        if cuda {
            // Same name and domain, a kernel for the CUDA EP: ORT places the nodes there.
            domain = domain.add(FasaAttentionOp { pool: Arc::clone(&pool), threads, on_cuda: true })?;
        }
        log::info!("ONNX Runtime execution provider: {}", if cuda { "CUDA (FasaAttention on its stream)" } else { "CPU" });
        // Built once the provider is known: the CUDA one gets standard nodes for the 4-bit
        // weights' correction term where the CPU gets its custom op.
        let graph = build_decoder(&file, &config, opts.activations, cuda)?;
        drop(file);
        // Per-node timings for performance work: ORT writes `<prefix>_<date>.json`.
        if let Some(prefix) = std::env::var_os("FASA_ORT_PROFILE") {
            builder = builder.with_profiling(prefix).map_err(ort::Error::from)?;
        }
        let session = builder
            .with_operators(domain)
            .map_err(ort::Error::from)?
            .commit_from_memory(&graph.onnx)?;
        let info = ModelInfo { path: opts.model_path.clone(), config, max_context, max_sequences: pool.n_slots(), weight_bytes: graph.weight_bytes, sha256, activations: opts.activations, execution_provider: if cuda { ExecutionProvider::Cuda } else { ExecutionProvider::Cpu } };
        let default_attention = pool.fit_config(AttnConfig::default().fit_pool(info.config.n_fcs()));
        Ok(Self { info, default_attention, tokenizer, session, pool })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn pool(&self) -> &Arc<CachePool> {
        &self.pool
    }

    /// The token ids a prompt becomes (chat template applied for `Prompt::Chat`).
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Raw(text) => self.tokenizer.encode(text, false),
            Prompt::Chat(messages) => {
                let t = &self.tokenizer;
                let text = chat::render_chat(t.chat_template(), messages, t.bos_token(), t.eos_token())?;
                t.encode(&text, true)
            }
        }
    }

    /// Validates and tokenizes the request and reserves a cache slot. Errors: `InvalidRequest`,
    /// `ContextTooLong`, `NoFreeSlot`, `Tokenizer`.
    pub fn start(&self, req: GenerateRequest) -> Result<Sequence> {
        sampler::validate(&req.sampling).map_err(EngineError::InvalidRequest)?;
        if req.max_tokens == 0 {
            return Err(EngineError::InvalidRequest("max_tokens must be at least 1".into()));
        }
        if req.stop.iter().any(String::is_empty) {
            return Err(EngineError::InvalidRequest("stop strings must not be empty".into()));
        }
        let c = &self.info.config;
        let mut attention = req.attention.resolve(&self.default_attention);
        if req.attention.pool.is_none() {
            // A pool scaled with an overridden chunk count stops at the head's FCs.
            attention = attention.fit_pool(c.n_fcs());
        }
        attention.validate(c.n_fcs(), c.n_layers).map_err(EngineError::InvalidRequest)?;
        self.pool.check_config(&attention).map_err(EngineError::InvalidRequest)?;
        let tokens = self.encode_prompt(&req.prompt)?;
        if tokens.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        let limit = self.info.max_context;
        if tokens.len() >= limit {
            return Err(EngineError::ContextTooLong { prompt: tokens.len(), limit });
        }
        let attention = attention.for_context((tokens.len() + req.max_tokens).min(limit));
        let lease = self.pool.acquire().ok_or(EngineError::NoFreeSlot(self.pool.n_slots()))?;
        Ok(Sequence {
            lease,
            n_prompt: tokens.len(),
            tokens,
            cached: 0,
            max_tokens: req.max_tokens,
            attention,
            sampler: Sampler::new(&req.sampling),
            text: TextStream::new(req.stop),
            finished: None,
        })
    }

    /// Logits `(vocab,)` after feeding `tokens` at positions `position..` of `slot`.
    pub fn forward(&mut self, tokens: &[u32], position: usize, slot: usize) -> Result<Vec<f32>> {
        let ids = Tensor::from_array(([tokens.len()], tokens.iter().map(|&t| t as i64).collect::<Vec<i64>>()))?;
        let pos = Tensor::from_array(([1usize], vec![position as i64]))?;
        let slot = Tensor::from_array(([1usize], vec![slot as i64]))?;
        let out = self.session.run(ort::inputs!["input_ids" => ids, "position" => pos, "slot" => slot])?;
        let (_, logits) = out["logits"].try_extract_tensor::<f32>()?;
        Ok(logits.to_vec())
    }

    /// Runs prefill (one chunk per call) and then one decode step per call; returns the text made
    /// final. After `Step::Finished`, further calls are an `InvalidRequest`.
    pub fn step(&mut self, seq: &mut Sequence) -> Result<Step> {
        if seq.finished.is_some() {
            return Err(EngineError::InvalidRequest("the sequence has finished".into()));
        }
        self.configure_slot(seq.lease.slot(), &seq.attention, false);
        let end = seq.tokens.len().min(seq.cached + PREFILL_CHUNK);
        let feed = seq.tokens[seq.cached..end].to_vec();
        let logits = match self.forward(&feed, seq.cached, seq.lease.slot()) {
            Ok(l) => l,
            Err(e) => {
                seq.finished = Some(FinishReason::Length);
                return Err(e);
            }
        };
        seq.cached = end;
        if seq.cached < seq.tokens.len() {
            return Ok(Step::Text(String::new()));
        }
        let tok = seq.sampler.sample(&logits);
        let finish = |seq: &mut Sequence, mut text: String, reason| {
            text.push_str(&seq.text.finish());
            seq.finished = Some(reason);
            Ok(Step::Finished { text, reason })
        };
        if self.tokenizer.is_end_of_generation(tok) {
            return finish(seq, String::new(), FinishReason::Eos);
        }
        seq.tokens.push(tok);
        let push = seq.text.push(&self.tokenizer.token_bytes(tok));
        if push.stopped {
            seq.finished = Some(FinishReason::Stop);
            return Ok(Step::Finished { text: push.text, reason: FinishReason::Stop });
        }
        if seq.generated_tokens() >= seq.max_tokens {
            return finish(seq, push.text, FinishReason::Length);
        }
        // The next step feeds this token at position len-1: it must fit the context.
        if seq.tokens.len() >= self.info.max_context {
            return finish(seq, push.text, FinishReason::ContextFull);
        }
        Ok(Step::Text(push.text))
    }

    /// Default attention settings for requests that name none.
    pub fn default_attention(&self) -> &AttnConfig {
        &self.default_attention
    }

    pub fn set_default_attention(&mut self, c: AttnConfig) -> Result<()> {
        let m = &self.info.config;
        c.validate(m.n_fcs(), m.n_layers).map_err(EngineError::InvalidRequest)?;
        self.pool.check_config(&c).map_err(EngineError::InvalidRequest)?;
        self.default_attention = c;
        Ok(())
    }

    /// Sets the attention settings the next runs on `slot` use; `measure` also records recall
    /// against the oracle and attention mass kept (a dense pass per step: harness only).
    pub fn configure_slot(&self, slot: usize, c: &AttnConfig, measure: bool) {
        if let Some(mut s) = self.pool.lock(slot) {
            s.state.config = c.clone();
            s.state.measure = measure;
        }
    }

    /// Installs (or removes) a contextual-agreement recorder on `slot`; returns the previous one.
    pub fn set_recorder(&self, slot: usize, r: Option<crate::attention::CaRecorder>) -> Option<crate::attention::CaRecorder> {
        self.pool.lock(slot).and_then(|mut s| std::mem::replace(&mut s.state.recorder, r))
    }

    /// Resets the attention counters of `slot`.
    pub fn reset_stats(&self, slot: usize) {
        if let Some(mut s) = self.pool.lock(slot) {
            s.state.stats = AttnStats::default();
        }
    }

    /// Attention counters of `slot` since it was taken.
    pub fn slot_stats(&self, slot: usize) -> AttnStats {
        self.pool.lock(slot).map(|s| s.state.stats.clone()).unwrap_or_default()
    }

    /// Cache slots not held by a live `Sequence`.
    pub fn free_slots(&self) -> usize {
        self.pool.free_count()
    }
}

impl Sequence {
    pub fn prompt_tokens(&self) -> usize {
        self.n_prompt
    }
    pub fn generated_tokens(&self) -> usize {
        self.tokens.len() - self.n_prompt
    }
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }
    pub fn slot(&self) -> usize {
        self.lease.slot()
    }
    pub fn attention(&self) -> &AttnConfig {
        &self.attention
    }
}
