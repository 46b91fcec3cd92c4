//! Attention modes and their knobs, chosen per request (defaults from configuration).
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Full attention over every cached token: the accuracy reference.
    Dense,
    /// Our default: the best FASA variant the fidelity harness found (see `AttnConfig::fasa`).
    Fasa,
    /// The paper's recipe exactly: k calibrated FCs per query head, top-B, no sinks/recent.
    FasaPaper,
    /// Exact scores, top-B: the ceiling of any top-B method.
    Oracle,
    /// StreamingLLM: `sinks` first tokens + the most recent `B − sinks`.
    Streaming,
    /// Quest: pages of 16 tokens scored by their K min/max bounds, top pages up to B tokens.
    Quest,
    /// k random FCs per head (seeded by layer and head), top-B: shows calibration matters.
    RandomFc,
}

impl Mode {
    pub const ALL: [Mode; 7] = [Mode::Dense, Mode::Fasa, Mode::FasaPaper, Mode::Oracle, Mode::Streaming, Mode::Quest, Mode::RandomFc];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Dense => "dense",
            Mode::Fasa => "fasa",
            Mode::FasaPaper => "fasa-paper",
            Mode::Oracle => "oracle",
            Mode::Streaming => "streaming",
            Mode::Quest => "quest",
            Mode::RandomFc => "random-fc",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tokens per Quest page.
pub const QUEST_PAGE: usize = 16;

/// One request's attention settings. Budgets count tokens per KV group (or per query head when
/// `per_group` is off); sinks and recent tokens are kept inside the budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttnConfig {
    pub mode: Mode,
    /// Token budget B.
    pub budget: usize,
    /// FCs scored per step, k.
    pub chunks: usize,
    /// Calibrated pool of resident FCs P (≥ k); the k used per step are chosen in it by ‖q_f‖.
    /// `pool == chunks` is the paper's fixed set; `pool == d/2` is fully dynamic.
    pub pool: usize,
    /// First tokens always kept.
    pub sinks: usize,
    /// Most recent tokens always kept.
    pub recent: usize,
    /// Candidates C picked by FC score before exact scores pick B; 0 = no re-rank.
    pub rerank: usize,
    /// With a re-rank, C grows with the request's context n (`for_context`): at least n/16 and
    /// B per 8k tokens. The default recipe's; a request that names `rerank` gets exactly that C.
    #[serde(default)]
    pub rerank_grows: bool,
    /// One token set per KV group (query heads summed) rather than per query head.
    pub per_group: bool,
    /// The first `dense_layers` layers attend densely.
    pub dense_layers: usize,
}

impl Default for AttnConfig {
    fn default() -> Self {
        Self::fasa(256, 12)
    }
}

impl AttnConfig {
    pub fn dense() -> Self {
        Self { mode: Mode::Dense, ..Self::fasa(256, 12) }
    }

    /// The default `fasa` variant at budget `b` with `k` FCs per step, chosen by the fidelity
    /// harness (bench/FIDELITY.md, SmolLM2, B = 256): the k FCs are picked per step among a pool
    /// of 4k (all 32 FCs at k = 8) by the variance of the logits they cause over the cached
    /// tokens (from K moments the cache keeps; picking by ‖q_f‖ alone lost 2.4× in KL at 8k),
    /// the group's query heads are combined by their FC-score softmax masses (not raw sums) of
    /// int8 scoring planes, 4 sinks and 32 recent tokens kept, max(1.5·B, n/16, B·n/8192)
    /// candidates at context n re-ranked by exact scores whose logits focused attention reuses
    /// (`for_context`), one token set per KV group, and no dense layer. Pools are capped at d/2
    /// by `fit_pool`.
    pub fn fasa(budget: usize, chunks: usize) -> Self {
        Self { mode: Mode::Fasa, budget, chunks, pool: 4 * chunks, sinks: 4, recent: 32, rerank: 3 * budget / 2, rerank_grows: true, per_group: true, dense_layers: 0 }
    }

    /// The settings for a sequence of up to `n` tokens: with `rerank_grows`, C = max(C, n/16,
    /// B·n/8192). Each term is a measured need (bench/FIDELITY.md): 1.5·B beats 2B on bytes at 2k
    /// at equal KL; at 32k (B = 0.8 % of the context) Qwen's B = 256 needed C ≥ 2048 (C = 512:
    /// KL 2.2× the oracle's) and B = 1024 needed 4096 (2048: KL 2.2×); n/8 at 8k cost SmolLM2
    /// a little top-1. Fixed for the request, so a GPU decoder built for it stays valid.
    pub fn for_context(mut self, n: usize) -> Self {
        if self.rerank > 0 && self.rerank_grows {
            self.rerank = self.rerank.max(n / 16).max(self.budget * n / 8192);
        }
        self
    }

    /// Caps the pool at the head's `n_fc` FCs (chunks are left for `validate` to judge).
    pub fn fit_pool(mut self, n_fc: usize) -> Self {
        self.pool = self.pool.min(n_fc);
        self
    }

    /// The paper's recipe: fixed calibrated FCs per query head, no forced tokens, layer 0 dense.
    pub fn paper(budget: usize, chunks: usize) -> Self {
        Self { mode: Mode::FasaPaper, budget, chunks, pool: chunks, sinks: 0, recent: 0, rerank: 0, rerank_grows: false, per_group: false, dense_layers: 1 }
    }

    /// A baseline mode at the same budget.
    pub fn baseline(mode: Mode, budget: usize, chunks: usize) -> Self {
        match mode {
            Mode::Fasa => Self::fasa(budget, chunks),
            Mode::FasaPaper => Self::paper(budget, chunks),
            Mode::Streaming => Self { mode, sinks: 4, recent: budget.saturating_sub(4), ..Self::paper(budget, chunks) },
            _ => Self { mode, ..Self::paper(budget, chunks) },
        }
    }

    /// Checks the knobs against a head of `n_fc` FCs; the message says what to change.
    pub fn validate(&self, n_fc: usize, n_layers: usize) -> Result<(), String> {
        if self.mode == Mode::Dense {
            return Ok(());
        }
        if self.budget == 0 {
            return Err("budget must be at least 1 token".into());
        }
        if self.chunks == 0 || self.chunks > n_fc {
            return Err(format!("chunks must be in 1..={n_fc} (FCs per head)"));
        }
        if self.pool < self.chunks || self.pool > n_fc {
            return Err(format!("pool must be in {}..={n_fc} (at least chunks)", self.chunks));
        }
        if self.sinks + self.recent > self.budget {
            return Err(format!("sinks + recent ({}) exceed the budget {}", self.sinks + self.recent, self.budget));
        }
        if self.rerank != 0 && self.rerank < self.budget {
            return Err(format!("rerank candidates ({}) must be 0 or at least the budget {}", self.rerank, self.budget));
        }
        if self.dense_layers > n_layers {
            return Err(format!("dense_layers must be at most {n_layers}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AttnOverrides;

    #[test]
    fn candidates_grow_with_the_context_unless_named() {
        let c = AttnConfig::fasa(256, 12);
        assert_eq!(c.clone().for_context(2048).rerank, 384, "1.5·B while the context is short");
        assert_eq!(c.clone().for_context(8192).rerank, 512, "n/16");
        assert_eq!(c.clone().for_context(32768).rerank, 2048);
        assert_eq!(AttnConfig::paper(256, 8).for_context(32768).rerank, 0, "no re-rank stays none");
        // A request that names C gets that C at any context; one that only moves B scales both.
        let named = AttnOverrides { rerank: Some(600), ..Default::default() }.resolve(&c);
        assert_eq!(named.for_context(32768).rerank, 600);
        let b = AttnOverrides { budget: Some(1024), ..Default::default() }.resolve(&c);
        assert_eq!((b.clone().for_context(2048).rerank, b.for_context(32768).rerank), (1536, 4096), "B per 8k tokens");
    }
}
