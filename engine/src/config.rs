//! Model hyper-parameters read from GGUF metadata (`<arch>.*` keys).
use crate::gguf::{GgufError, GgufFile};

/// Which dims of a head RoPE rotates together. FC `i` (frequency `theta^(-2i/d)`) is always
/// the pair at that frequency, whatever the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RopeLayout {
    /// Pair `i` is dims `(2i, 2i+1)`: GGUF `llama` (its Q/K rows are permuted at conversion).
    Adjacent,
    /// Pair `i` is dims `(i, i + d/2)`: NEOX style, GGUF `qwen2`, `gemma3`.
    HalfSplit,
}

impl RopeLayout {
    /// The two dims of FC `fc` in a head of `head_dim` dims.
    pub fn pair(self, fc: usize, head_dim: usize) -> (usize, usize) {
        match self {
            RopeLayout::Adjacent => (2 * fc, 2 * fc + 1),
            RopeLayout::HalfSplit => (fc, fc + head_dim / 2),
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// `general.architecture`, e.g. `llama`.
    pub architecture: String,
    /// `general.name` (or the file stem when absent).
    pub name: String,
    pub n_layers: usize,
    /// Embedding width D.
    pub hidden: usize,
    /// Query heads H.
    pub n_heads: usize,
    /// KV heads (H / n_kv_heads query heads share one: GQA).
    pub n_kv_heads: usize,
    /// d = hidden / n_heads unless the file says otherwise.
    pub head_dim: usize,
    /// SwiGLU inner width.
    pub ffn_hidden: usize,
    pub vocab_size: usize,
    /// Trained context length (tokens).
    pub context_length: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub rope_layout: RopeLayout,
    /// No `output.weight`: the LM head is the token embedding.
    pub tied_embeddings: bool,
    /// Q/K/V projections carry biases (qwen2).
    pub qkv_bias: bool,
}

impl ModelConfig {
    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
    /// Frequency chunks (rotation pairs) per head: d/2.
    pub fn n_fcs(&self) -> usize {
        self.head_dim / 2
    }
}

impl ModelConfig {
    /// Reads the shapes from the `<arch>.*` keys of a `llama` or `qwen2` file. The vocabulary
    /// size is the length of `tokenizer.ggml.tokens` (else the rows of `token_embd.weight`);
    /// the embeddings are tied when there is no `output.weight`; Q/K/V carry biases when
    /// `blk.0.attn_q.bias` exists.
    pub fn from_gguf(f: &GgufFile) -> Result<ModelConfig, GgufError> {
        let architecture = f.get_str("general.architecture")?.to_string();
        let rope_layout = match architecture.as_str() {
            "llama" => RopeLayout::Adjacent,
            "qwen2" => RopeLayout::HalfSplit,
            _ => return Err(GgufError::UnsupportedArchitecture { path: f.path.clone(), arch: architecture }),
        };
        let key = |suffix: &str| format!("{architecture}.{suffix}");
        let usize_of = |k: &str| f.get_u32(k).map(|v| v as usize);
        let bad = |reason: String| GgufError::Malformed { path: f.path.clone(), reason };

        let name = match f.get("general.name").and_then(|v| v.as_str()) {
            Some(n) => n.to_string(),
            None => f.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        let n_layers = usize_of(&key("block_count"))?;
        let hidden = usize_of(&key("embedding_length"))?;
        let n_heads = usize_of(&key("attention.head_count"))?;
        // Absent means no GQA (llama.cpp's default).
        let n_kv_heads = match f.get(&key("attention.head_count_kv")) {
            Some(_) => usize_of(&key("attention.head_count_kv"))?,
            None => n_heads,
        };
        let ffn_hidden = usize_of(&key("feed_forward_length"))?;
        let context_length = usize_of(&key("context_length"))?;
        let rope_theta = match f.get(&key("rope.freq_base")) {
            Some(_) => f.get_f32(&key("rope.freq_base"))?,
            None => 10000.0,
        };
        let rms_eps = f.get_f32(&key("attention.layer_norm_rms_epsilon"))?;

        if n_layers == 0 || hidden == 0 || n_heads == 0 || n_kv_heads == 0 || ffn_hidden == 0 {
            return Err(bad(format!(
                "zero in the shapes: {n_layers} layers, width {hidden}, {n_heads} heads, {n_kv_heads} KV heads, FFN {ffn_hidden}"
            )));
        }
        if n_heads % n_kv_heads != 0 {
            return Err(bad(format!("{n_heads} query heads do not split evenly over {n_kv_heads} KV heads")));
        }
        let head_dim = match f.get(&key("attention.key_length")) {
            Some(_) => usize_of(&key("attention.key_length"))?,
            None if hidden % n_heads == 0 => hidden / n_heads,
            None => return Err(bad(format!("width {hidden} does not split evenly over {n_heads} heads"))),
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad(format!("head dim {head_dim} is not a positive even number (RoPE rotates pairs)")));
        }
        if f.get(&key("attention.value_length")).is_some() {
            let v = usize_of(&key("attention.value_length"))?;
            if v != head_dim {
                return Err(bad(format!(
                    "value head dim {v} differs from key head dim {head_dim}, which fasa does not support"
                )));
            }
        }
        if f.get(&key("rope.dimension_count")).is_some() {
            let r = usize_of(&key("rope.dimension_count"))?;
            if r != head_dim {
                return Err(bad(format!(
                    "RoPE rotates {r} of {head_dim} head dims; fasa supports only full-head RoPE"
                )));
            }
        }

        let vocab_size = match f.get("tokenizer.ggml.tokens") {
            Some(_) => f.get_str_array("tokenizer.ggml.tokens")?.len(),
            None => match f.tensor("token_embd.weight") {
                Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
                _ => {
                    return Err(GgufError::MissingKey {
                        path: f.path.clone(),
                        key: "tokenizer.ggml.tokens".to_string(),
                    })
                }
            },
        };

        Ok(ModelConfig {
            architecture,
            name,
            n_layers,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_hidden,
            vocab_size,
            context_length,
            rope_theta,
            rms_eps,
            rope_layout,
            tied_embeddings: f.tensor("output.weight").is_none(),
            qkv_bias: f.tensor("blk.0.attn_q.bias").is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{test_support::open_default_model, GgufWriter, MetaValue};

    #[test]
    fn default_model_config() {
        let f = open_default_model();
        let c = ModelConfig::from_gguf(&f).expect("config of the default model");
        assert_eq!(c.architecture, "llama");
        assert_eq!(
            (c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_hidden),
            (30, 576, 9, 3, 64, 1536)
        );
        assert_eq!((c.vocab_size, c.context_length), (49152, 8192));
        assert_eq!(c.rope_theta, 100000.0);
        assert!((c.rms_eps - 1e-5).abs() < 1e-9, "rms eps {}", c.rms_eps);
        assert_eq!(c.rope_layout, RopeLayout::Adjacent);
        assert!(c.tied_embeddings);
        assert!(!c.qkv_bias);
        assert_eq!((c.group_size(), c.n_fcs()), (3, 32));
    }

    fn from_metadata(entries: &[(&str, MetaValue)]) -> Result<ModelConfig, GgufError> {
        let mut w = GgufWriter::new();
        for (k, v) in entries {
            w.add_metadata(*k, v.clone());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        w.write(&path).unwrap();
        ModelConfig::from_gguf(&GgufFile::open(&path).unwrap())
    }

    #[test]
    fn qwen2_is_half_split_and_others_are_refused() {
        let qwen = [
            ("general.architecture", MetaValue::Str("qwen2".into())),
            ("qwen2.block_count", MetaValue::U32(2)),
            ("qwen2.embedding_length", MetaValue::U32(64)),
            ("qwen2.attention.head_count", MetaValue::U32(4)),
            ("qwen2.attention.head_count_kv", MetaValue::U32(2)),
            ("qwen2.feed_forward_length", MetaValue::U64(128)),
            ("qwen2.context_length", MetaValue::U32(256)),
            ("qwen2.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-6)),
            ("tokenizer.ggml.tokens", MetaValue::Array(vec![MetaValue::Str("a".into()); 10])),
        ];
        let c = from_metadata(&qwen).unwrap();
        assert_eq!(c.rope_layout, RopeLayout::HalfSplit);
        assert_eq!((c.head_dim, c.vocab_size, c.rope_theta, c.ffn_hidden), (16, 10, 10000.0, 128));

        let err = from_metadata(&[("general.architecture", MetaValue::Str("gpt2".into()))]).unwrap_err();
        assert!(matches!(err, GgufError::UnsupportedArchitecture { ref arch, .. } if arch == "gpt2"));
        assert!(err.to_string().contains("unsupported architecture 'gpt2' (supported: llama, qwen2)"), "{err}");

        let err = from_metadata(&qwen[..3]).unwrap_err();
        assert!(err.to_string().contains("'qwen2.attention.head_count'"), "{err}");
    }
}
