//! Byte-level BPE tokenizer (GGUF `tokenizer.ggml.model = gpt2`) built with the `tokenizers`
//! crate from the vocabulary, merges and token types stored in the GGUF metadata.
//!
//! The pre-tokenizer follows `tokenizer.ggml.pre` (llama.cpp's name for the HF regex set):
//! `smollm` (and its twins `starcoder`, `refact`) and `gpt2`, plus `qwen2`.
use std::sync::LazyLock;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::gguf::GgufFile;
use crate::{EngineError, Result};

/// GGUF token types (llama.cpp `llama_token_type`).
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// HF Qwen2 / Qwen2.5 pre-tokenizer split regex (`tokenizer.ggml.pre = qwen2`).
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Control tokens that end a turn in the chat formats we know, besides `eos`.
const END_OF_TURN: [&str; 3] = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"];

fn err(msg: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(msg.to_string())
}

/// The tokenizer as stored in a GGUF file, independent of the file (so tests can build one).
pub(crate) struct TokenizerSpec<'a> {
    /// `tokenizer.ggml.tokens`: index = id, byte-level encoded (`Ġ` = space).
    pub tokens: Vec<&'a str>,
    /// `tokenizer.ggml.merges`: `"left right"`, highest priority first.
    pub merges: Vec<&'a str>,
    /// `tokenizer.ggml.token_type`, same length as `tokens` (absent = all normal).
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.pre`.
    pub pre: &'a str,
    pub bos: Option<u32>,
    pub eos: u32,
    /// `tokenizer.ggml.eot_token_id` / `eom_token_id`, when present.
    pub extra_eog: Vec<u32>,
    pub chat_template: Option<String>,
}

pub struct Tokenizer {
    /// Splits special tokens out of the text (`parse_special = true`).
    with_special: tokenizers::Tokenizer,
    /// Same, but control tokens are encoded as plain text (`parse_special = false`). A clone:
    /// the flag lives in the tokenizer, and `encode` must stay `&self` for concurrent requests.
    plain: tokenizers::Tokenizer,
    /// Control and user-defined tokens (their text is literal, not byte-level encoded); by id.
    literal: Vec<bool>,
    bos: Option<u32>,
    eos: u32,
    /// Ids that end generation: eos, eot/eom, and the END_OF_TURN control tokens present.
    eog: Vec<u32>,
    bos_text: String,
    eos_text: String,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Reads `tokenizer.*` metadata. Errors name the key or value that is not supported.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let model = f.get_str("tokenizer.ggml.model").map_err(err)?;
        if model != "gpt2" {
            return Err(err(format!("tokenizer.ggml.model is '{model}'; only 'gpt2' (byte-level BPE) is supported")));
        }
        let opt_u32 = |key: &str| f.get(key).map(|_| f.get_u32(key).map_err(err)).transpose();
        let mut extra_eog = Vec::new();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            extra_eog.extend(opt_u32(key)?);
        }
        let token_types = match f.get("tokenizer.ggml.token_type") {
            Some(_) => Some(f.get_i32_array("tokenizer.ggml.token_type").map_err(err)?),
            None => None,
        };
        let spec = TokenizerSpec {
            tokens: f.get_str_array("tokenizer.ggml.tokens").map_err(err)?,
            merges: f.get_str_array("tokenizer.ggml.merges").map_err(err)?,
            token_types,
            pre: f.get_str("tokenizer.ggml.pre").map_err(err)?,
            bos: opt_u32("tokenizer.ggml.bos_token_id")?,
            eos: f.get_u32("tokenizer.ggml.eos_token_id").map_err(err)?,
            extra_eog,
            chat_template: f.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_owned),
        };
        Self::from_spec(spec)
    }

    pub(crate) fn from_spec(s: TokenizerSpec<'_>) -> Result<Self> {
        let n = s.tokens.len();
        let types = s.token_types.unwrap_or_else(|| vec![1; n]);
        if types.len() != n {
            return Err(err(format!("{} token types for {n} tokens", types.len())));
        }
        for (what, id) in [("bos", s.bos), ("eos", Some(s.eos))] {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                return Err(err(format!("{what} id {id} is outside the {n}-token vocabulary")));
            }
        }
        let pre = pre_tokenizer(s.pre)?;

        let mut vocab = Vocab::with_capacity(n);
        for (id, tok) in s.tokens.iter().enumerate() {
            // Keep the first id of a duplicated token, as llama.cpp does.
            vocab.entry(tok.to_string()).or_insert(id as u32);
        }
        let merges = s
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("merge {m:?} is not two tokens separated by a space")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(format!("cannot build the BPE model: {e}")))?;

        let mut tk = tokenizers::Tokenizer::new(bpe);
        tk.with_pre_tokenizer(Some(pre));
        tk.with_decoder(Some(ByteLevelDecoder::default()));
        // Control tokens are special (parsed only when asked); user-defined ones are always
        // parsed, like HF's non-special added tokens and llama.cpp.
        let added = |ty| {
            s.tokens
                .iter()
                .zip(&types)
                .filter(move |&(_, &t)| t == ty)
                .map(move |(tok, _)| AddedToken::from(tok.to_string(), ty == TYPE_CONTROL).normalized(false))
        };
        tk.add_special_tokens(added(TYPE_CONTROL)).map_err(err)?;
        tk.add_tokens(added(TYPE_USER_DEFINED)).map_err(err)?;
        let mut plain = tk.clone();
        plain.set_encode_special_tokens(true);

        let literal: Vec<bool> = types.iter().map(|&t| t == TYPE_CONTROL || t == TYPE_USER_DEFINED).collect();
        let mut eog = vec![s.eos];
        eog.extend(s.extra_eog.iter().copied().filter(|&id| (id as usize) < n));
        eog.extend(
            END_OF_TURN.iter().filter_map(|t| tk.token_to_id(t)).filter(|&id| types[id as usize] == TYPE_CONTROL),
        );
        eog.sort_unstable();
        eog.dedup();
        let text = |id: Option<u32>| id.map(|id| s.tokens[id as usize].to_string()).unwrap_or_default();
        Ok(Self {
            bos_text: text(s.bos),
            eos_text: text(Some(s.eos)),
            with_special: tk,
            plain,
            literal,
            bos: s.bos,
            eos: s.eos,
            eog,
            chat_template: s.chat_template,
        })
    }

    /// Token ids of `text`; no BOS is added. With `parse_special`, control-token text such as
    /// `<|im_start|>` becomes that token; without, it is tokenized as plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tk = if parse_special { &self.with_special } else { &self.plain };
        let enc = tk.encode(text, false).map_err(|e| err(format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens included as their text; invalid UTF-8 becomes U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size()) {
            return Err(err(format!("token id {bad} is outside the {}-token vocabulary", self.vocab_size())));
        }
        self.with_special.decode(ids, false).map_err(|e| err(format!("cannot decode tokens: {e}")))
    }

    /// The raw bytes token `id` stands for (the byte-level mapping reversed), for streaming:
    /// a token may hold part of a UTF-8 character. Control tokens give their text; an unknown id
    /// gives nothing.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(tok) = self.with_special.id_to_token(id) else { return Vec::new() };
        if self.literal[id as usize] {
            return tok.into_bytes();
        }
        // Same rule as the ByteLevel decoder: a token with a char outside the map is literal.
        tok.chars()
            .map(|c| BYTE_OF_CHAR.get(c as usize).copied().flatten())
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_else(|| tok.into_bytes())
    }

    /// True for eos and the other tokens that end a turn (`<|im_end|>`, `<|endoftext|>`, eot).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Text of the bos token (`""` when the model has none), for chat templates.
    pub fn bos_token(&self) -> &str {
        &self.bos_text
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_text
    }

    /// Number of token ids (the logits width).
    pub fn vocab_size(&self) -> usize {
        self.literal.len()
    }

    /// The model's Jinja chat template (`tokenizer.chat_template`), if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Id of a token given in its stored form (`"Ġthe"`, `"<|im_end|>"`).
    pub fn id_of(&self, token: &str) -> Option<u32> {
        self.with_special.token_to_id(token)
    }
}

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`, as HF's tokenizer.json has it.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    // ByteLevel(add_prefix_space, trim_offsets, use_regex): the GPT-2 regex split + byte mapping.
    Ok(match pre {
        "gpt2" => ByteLevel::new(false, true, true).into(),
        "smollm" | "starcoder" | "refact" => {
            Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into()
        }
        "qwen2" => {
            let split = Split::new(SplitPattern::Regex(QWEN2_REGEX.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| err(format!("qwen2 pre-tokenizer regex: {e}")))?;
            Sequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()]).into()
        }
        other => {
            return Err(err(format!(
                "pre-tokenizer '{other}' (tokenizer.ggml.pre) is not supported; supported: smollm, starcoder, refact, gpt2, qwen2"
            )))
        }
    })
}

/// GPT-2's byte-to-unicode table reversed: `BYTE_OF_CHAR[c]` is the byte that char `c` stands
/// for. Printable bytes map to themselves; the other 68 to U+0100..U+0143.
static BYTE_OF_CHAR: LazyLock<[Option<u8>; 324]> = LazyLock::new(|| {
    let mut table = [None; 324];
    let mut next = 256;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable { b as usize } else { next };
        if !printable {
            next += 1;
        }
        table[c] = Some(b);
    }
    table
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::render_chat;
    use crate::Message;

    /// The default model's tokenizer, loaded once for all tests. Fails (never skips) when the
    /// model is absent; `OnceLock` is not poisoned by that panic, so every test says why.
    fn smollm() -> &'static Tokenizer {
        static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
        TOK.get_or_init(|| {
            let f = crate::gguf::test_support::open_default_model();
            Tokenizer::from_gguf(&f).unwrap_or_else(|e| panic!("tokenizer of the default model: {e}"))
        })
    }

    #[test]
    fn round_trips() {
        let t = smollm();
        for text in [
            "Hello, world!",
            "  two leading spaces and trailing  ",
            "Café déjà vu — naïve façade",
            "emoji 🦀🎉 and 👩‍👩‍👧 family",
            "中文分词测试，日本語のテキスト",
            "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
            "line one\n\nline three\r\n\ttab",
            "numbers 12345 and 3.14159",
            "<|im_start|>user\nhi<|im_end|>",
            "",
        ] {
            for special in [false, true] {
                let ids = t.encode(text, special).unwrap();
                assert_eq!(t.decode(&ids).unwrap(), text, "ids {ids:?}");
                let bytes: Vec<u8> = ids.iter().flat_map(|&id| t.token_bytes(id)).collect();
                assert_eq!(bytes, text.as_bytes(), "token_bytes of {text:?}");
            }
        }
    }

    #[test]
    fn known_encoding_from_vocab() {
        let t = smollm();
        let want: Vec<u32> = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"].iter().map(|s| t.id_of(s).unwrap()).collect();
        assert_eq!(want, [504, 3575, 282, 4649, 314]);
        assert_eq!(t.encode("The capital of France is", false).unwrap(), want);
    }

    #[test]
    fn digits_are_split_individually() {
        let t = smollm();
        let ids = t.encode("12345", false).unwrap();
        let digits: Vec<u32> = ["1", "2", "3", "4", "5"].iter().map(|d| t.id_of(d).unwrap()).collect();
        assert_eq!(ids, digits);
        assert_eq!(
            t.encode(" 42", false).unwrap(),
            [t.id_of("Ġ").unwrap(), t.id_of("4").unwrap(), t.id_of("2").unwrap()]
        );
    }

    #[test]
    fn special_tokens_parsed_only_when_asked() {
        let t = smollm();
        let im_start = t.id_of("<|im_start|>").unwrap();
        assert_eq!(im_start, 1);
        let with = t.encode("<|im_start|>user", true).unwrap();
        assert_eq!(with[0], im_start);
        assert_eq!(with.len(), 2, "{with:?}");
        let without = t.encode("<|im_start|>user", false).unwrap();
        assert!(!without.contains(&im_start) && without.len() > 2, "{without:?}");
        assert_eq!(t.token_bytes(im_start), b"<|im_start|>");
        assert_eq!(t.token_bytes(t.id_of("Ġ").unwrap()), b" ");
        assert_eq!(t.token_bytes(t.id_of("Ċ").unwrap()), b"\n");
    }

    #[test]
    fn ids_and_end_of_generation() {
        let t = smollm();
        assert_eq!((t.bos_id(), t.eos_id(), t.vocab_size()), (Some(1), 2, 49152));
        assert_eq!((t.bos_token(), t.eos_token()), ("<|im_start|>", "<|im_end|>"));
        assert!(t.is_end_of_generation(2));
        assert!(t.is_end_of_generation(t.id_of("<|endoftext|>").unwrap()));
        assert!(!t.is_end_of_generation(1));
        assert!(!t.is_end_of_generation(504));
        assert!(t.decode(&[49152]).is_err());
        assert!(t.token_bytes(49152).is_empty());
    }

    #[test]
    fn model_chat_template_renders_chatml() {
        let t = smollm();
        let msgs = [Message { role: "user".into(), content: "Hi".into() }];
        let text = render_chat(t.chat_template(), &msgs, t.bos_token(), t.eos_token()).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = t.encode(&text, true).unwrap();
        assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 3);
        assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 2);
    }

    /// A synthetic vocabulary: the 256 byte tokens, then merges for "he", "ll", "hell", "hello".
    fn synthetic(pre: &str) -> Result<Tokenizer> {
        let bytes: Vec<String> = (0..=255u8)
            .map(|b| BYTE_OF_CHAR.iter().position(|&x| x == Some(b)).unwrap())
            .map(|c| char::from_u32(c as u32).unwrap().to_string())
            .collect();
        let mut tokens: Vec<&str> = bytes.iter().map(String::as_str).collect();
        tokens.extend(["he", "ll", "hell", "hello", "<|im_end|>"]);
        let mut types = vec![1; tokens.len()];
        *types.last_mut().unwrap() = TYPE_CONTROL;
        Tokenizer::from_spec(TokenizerSpec {
            tokens,
            merges: vec!["h e", "l l", "he ll", "hell o"],
            token_types: Some(types),
            pre,
            bos: None,
            eos: 260,
            extra_eog: vec![],
            chat_template: None,
        })
    }

    #[test]
    fn qwen2_pre_tokenizer() {
        let t = synthetic("qwen2").unwrap();
        let hello = t.id_of("hello").unwrap();
        // Digits one by one; letters merge; specials parsed; no prefix space added.
        let ids = t.encode("hello 123<|im_end|>", true).unwrap();
        let id = |s: &str| t.id_of(s).unwrap();
        assert_eq!(ids, [hello, id("Ġ"), id("1"), id("2"), id("3"), 260]);
        for text in ["hello, Wörld! 2024\n\n  x", "'s 'LL I'M", "🦀\r\n"] {
            assert_eq!(t.decode(&t.encode(text, false).unwrap()).unwrap(), text);
        }
        assert!(t.is_end_of_generation(260));
        assert_eq!(t.bos_token(), "");
    }

    #[test]
    fn unsupported_pre_tokenizer_is_named() {
        match synthetic("llama-bpe") {
            Err(EngineError::Tokenizer(m)) => assert!(m.contains("'llama-bpe'") && m.contains("qwen2"), "{m}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("llama-bpe should be refused"),
        }
        assert!(synthetic("smollm").is_ok() && synthetic("gpt2").is_ok());
    }
}
