//! Attention: the sequence-slot KV cache pool (FC-plane pages) and the `FasaAttention` ONNX
//! Runtime operator that owns RoPE, the cache appends and the attention itself.
pub mod cache;
pub mod calib;
pub mod capture;
pub mod config;
pub mod fasa_c;
pub mod gpu;
pub mod op;
pub mod pagebuf;
pub mod profile;
pub mod sparse;
pub mod stats;
pub mod tier;

pub use cache::{CachePool, CacheShape, SlotLease, SlotState, TierBytes, PAGE};
pub use tier::KvVariant;
pub use calib::CaRecorder;
pub use capture::{KvCapture, LayerCapture};
pub use config::{AttnConfig, Mode};
pub use profile::Profile;
pub use stats::AttnStats;
pub use op::{FasaAttentionOp, OP_DOMAIN, OP_NAME};
