//! Values carried in properties and signals, with their spelling on the bus.
use std::fmt;
use std::str::FromStr;

/// `Job.State`: `queued` → `running` → one of `finished`, `cancelled`, `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Waiting for a free cache slot.
    Queued,
    /// Holding a slot: prefill or decoding.
    Running,
    /// Ended normally; `FinishReason` says why.
    Finished,
    Cancelled,
    /// Ended with an error; `Error` says what.
    Failed,
}

impl JobState {
    pub const ALL: [JobState; 5] =
        [JobState::Queued, JobState::Running, JobState::Finished, JobState::Cancelled, JobState::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Finished => "finished",
            JobState::Cancelled => "cancelled",
            JobState::Failed => "failed",
        }
    }

    /// No more output will come.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Finished | JobState::Cancelled | JobState::Failed)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| format!("unknown job state '{s}'"))
    }
}

/// The `reason` of the `Finished` signal and `Job.FinishReason` (empty while the job runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// The model ended its turn.
    Eos,
    /// One of the caller's stop strings was reached.
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The context window is full.
    ContextFull,
    /// `Cancel()`, the caller leaving the bus, or the service stopping.
    Cancelled,
    /// An error ended the job; the signal's `error` argument says what.
    Failed,
}

impl FinishReason {
    pub const ALL: [FinishReason; 6] = [
        FinishReason::Eos,
        FinishReason::Stop,
        FinishReason::Length,
        FinishReason::ContextFull,
        FinishReason::Cancelled,
        FinishReason::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context-full",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Failed => "failed",
        }
    }

    /// The job state this reason leaves the job in.
    pub fn state(self) -> JobState {
        match self {
            FinishReason::Cancelled => JobState::Cancelled,
            FinishReason::Failed => JobState::Failed,
            _ => JobState::Finished,
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FinishReason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| format!("unknown finish reason '{s}'"))
    }
}

/// Keys of `Manager.Shapes` (`a{st}`), in display order: layers, embedding width, query heads,
/// KV heads, head dim, SwiGLU width, vocabulary, trained context (tokens), allocated context per
/// sequence (tokens), sequences (cache slots).
pub const SHAPE_KEYS: [&str; 10] = [
    "layers",
    "hidden",
    "heads",
    "kv_heads",
    "head_dim",
    "ffn_hidden",
    "vocab",
    "context",
    "max_context",
    "max_sequences",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_reasons_round_trip() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
        }
        for r in FinishReason::ALL {
            assert_eq!(r.as_str().parse::<FinishReason>().unwrap(), r);
        }
        assert_eq!(FinishReason::Length.state(), JobState::Finished);
        assert!("bogus".parse::<JobState>().is_err());
    }
}
