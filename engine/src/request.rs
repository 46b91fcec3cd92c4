//! What a caller asks of the engine: the prompt, sampling, limits, and what comes back.
use serde::{Deserialize, Serialize};

use crate::attention::{AttnConfig, Mode};

/// One chat message; `role` is `system`, `user` or `assistant`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prompt {
    /// Text fed to the model as is (no chat template, no BOS added beyond the tokenizer's own).
    Raw(String),
    /// Messages rendered with the model's chat template, ending with the assistant's turn opened.
    Chat(Vec<Message>),
}

/// Sampling: `temperature == 0` is greedy; `top_k == 0` and `top_p >= 1` disable those filters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    /// Most tokens to generate (the prompt not counted).
    pub max_tokens: usize,
    /// Generation ends before any of these strings would be emitted.
    pub stop: Vec<String>,
    /// Attention mode and knobs; unset fields take the model's defaults.
    #[serde(default)]
    pub attention: AttnOverrides,
}

/// Per-request overrides of the attention settings (see `AttnConfig` for each knob).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttnOverrides {
    pub mode: Option<Mode>,
    pub budget: Option<usize>,
    pub chunks: Option<usize>,
    pub pool: Option<usize>,
    pub sinks: Option<usize>,
    pub recent: Option<usize>,
    pub rerank: Option<usize>,
    pub per_group: Option<bool>,
    pub dense_layers: Option<usize>,
}

impl AttnOverrides {
    /// The settings for a request: `default` when no mode is named or it is `default`'s mode,
    /// else that mode's recipe at the default budget and chunk count; then each set knob.
    pub fn resolve(&self, default: &AttnConfig) -> AttnConfig {
        let budget = self.budget.unwrap_or(default.budget);
        let chunks = self.chunks.unwrap_or(default.chunks);
        let mut c = match self.mode {
            None => default.clone(),
            Some(m) if m == default.mode => default.clone(),
            Some(m) => AttnConfig::baseline(m, budget, chunks),
        };
        c.budget = budget;
        // A re-rank sized for the default budget follows an overridden one (2B stays 2B).
        if self.budget.is_some() && self.rerank.is_none() && c.rerank > 0 && default.budget > 0 {
            c.rerank = (c.rerank * budget).div_ceil(default.budget).max(budget);
        }
        if c.mode == Mode::Streaming && self.recent.is_none() {
            c.recent = budget.saturating_sub(c.sinks);
        }
        if let Some(k) = self.chunks {
            c.chunks = k;
            if self.pool.is_none() {
                // Keep the recipe's pool-to-chunks ratio.
                c.pool = (default.pool * k).div_ceil(default.chunks.max(1)).max(k);
            }
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(pool, sinks, recent, rerank, per_group, dense_layers);
        if self.rerank.is_some() {
            // C as asked, not raised with the context.
            c.rerank_grows = false;
        }
        c
    }
}

impl GenerateRequest {
    pub fn chat(user: &str) -> Self {
        Self {
            prompt: Prompt::Chat(vec![Message { role: "user".into(), content: user.into() }]),
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop: Vec::new(),
            attention: AttnOverrides::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// The model ended its turn (EOS or `<|im_end|>`).
    Eos,
    /// A caller's stop string was reached.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The context window is full.
    ContextFull,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context-full",
        }
    }
}

/// What one `Sequence::step` produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Text that is final (valid UTF-8, not part of a possible stop string); may be empty.
    Text(String),
    /// Generation ended; `text` is what remained to flush before the end.
    Finished { text: String, reason: FinishReason },
}
