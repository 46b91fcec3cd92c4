//! GGUF model files: the types (`GgmlType`, `MetaValue`, `TensorInfo`, `GgufError`), the
//! mmap-based reader (`GgufFile`), dequantization to f32 (`dequantize`) and a small writer
//! (`GgufWriter`) for synthetic test models.
//!
//! Layout of a GGUF v2/v3 file (all little-endian):
//! `"GGUF"`, version u32, tensor count u64, metadata count u64, the metadata key/values,
//! the tensor infos (name, n_dims u32, dims u64×n_dims, type u32, offset u64), padding to
//! `general.alignment` (default 32), then the data section; tensor offsets are relative to it.
//! In `dims`, `dims[0]` is the innermost (fastest-varying) dimension: a weight with dims
//! `[in, out]` is a row-major `out × in` matrix.
use std::fmt;
use std::path::PathBuf;

mod dequant;
mod reader;
mod writer;

pub use dequant::dequantize;
pub use reader::GgufFile;
pub use writer::{f16_bytes, quantize_q4_1, quantize_q8_0, GgufWriter};

/// `"GGUF"` as the first four bytes of the file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor's data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The storage type of a tensor: ggml's `enum ggml_type`, by its on-disk id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    /// Any other ggml type id (IQ*, TQ*, Q8_1, ...): its layout is not known here.
    Other(u32),
}

impl GgmlType {
    pub fn from_id(id: u32) -> GgmlType {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// Elements per block (1 for plain floats, 32 for the `Q*_0/1` types, 256 for k-quants);
    /// `None` for `Other` types, whose layout is unknown.
    pub fn block_size(self) -> Option<u64> {
        self.layout().map(|(elems, _)| elems)
    }

    /// Bytes per block; `None` for `Other` types.
    pub fn type_size(self) -> Option<u64> {
        self.layout().map(|(_, bytes)| bytes)
    }

    /// (elements, bytes) of one block, from ggml's `block_*` structs.
    fn layout(self) -> Option<(u64, u64)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 2 + 16),                // d f16, qs[16]
            GgmlType::Q4_1 => (32, 2 + 2 + 16),            // d, m f16, qs[16]
            GgmlType::Q5_0 => (32, 2 + 4 + 16),            // d, qh[4], qs[16]
            GgmlType::Q5_1 => (32, 2 + 2 + 4 + 16),        // d, m, qh[4], qs[16]
            GgmlType::Q8_0 => (32, 2 + 32),                // d, qs[32] i8
            GgmlType::Q2K => (256, 16 + 64 + 2 + 2),       // scales[16], qs[64], d, dmin
            GgmlType::Q3K => (256, 32 + 64 + 12 + 2),      // hmask[32], qs[64], scales[12], d
            GgmlType::Q4K => (256, 2 + 2 + 12 + 128),      // d, dmin, scales[12], qs[128]
            GgmlType::Q5K => (256, 2 + 2 + 12 + 32 + 128), // d, dmin, scales[12], qh[32], qs[128]
            GgmlType::Q6K => (256, 128 + 64 + 16 + 2),     // ql[128], qh[64], scales[16] i8, d
            GgmlType::Q8K => (256, 4 + 256 + 32),          // d f32, qs[256] i8, bsums[16] i16
            GgmlType::Other(_) => return None,
        })
    }

    /// Bytes of `n` elements, or `None` when the type is unknown, `n` is not a whole number
    /// of blocks, or the size overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let (block, size) = self.layout()?;
        if n % block != 0 {
            return None;
        }
        (n / block).checked_mul(size)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q8K => "Q8_K",
            GgmlType::Other(id) => {
                // Names of the ggml types this crate has no layout for, so errors can say
                // which one a file uses.
                let name = match id {
                    9 => "Q8_1",
                    16 => "IQ2_XXS",
                    17 => "IQ2_XS",
                    18 => "IQ3_XXS",
                    19 => "IQ1_S",
                    20 => "IQ4_NL",
                    21 => "IQ3_S",
                    22 => "IQ2_S",
                    23 => "IQ4_XS",
                    24 => "I8",
                    25 => "I16",
                    26 => "I32",
                    27 => "I64",
                    28 => "F64",
                    29 => "IQ1_M",
                    34 => "TQ1_0",
                    35 => "TQ2_0",
                    39 => "MXFP4",
                    _ => "unknown",
                };
                return write!(f, "{name} (ggml type id {id})");
            }
        };
        f.write_str(name)
    }
}

/// One metadata value. GGUF value type ids: U8 0, I8 1, U16 2, I16 3, U32 4, I32 5, F32 6,
/// Bool 7, Str 8, Array 9, U64 10, I64 11, F64 12.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    /// Elements all share one type in a file (the array's element type).
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The GGUF value type id (for arrays: 9).
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// Short description for error messages, e.g. `u32`, `array of 3 str`.
    pub fn type_name(&self) -> String {
        let simple = match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F32(_) => "f32",
            MetaValue::F64(_) => "f64",
            MetaValue::Bool(_) => "bool",
            MetaValue::Str(_) => "string",
            MetaValue::Array(items) => {
                return match items.first() {
                    Some(first) => format!("array of {} {}", items.len(), first.type_name()),
                    None => "empty array".to_string(),
                }
            }
        };
        simple.to_string()
    }

    /// The value as an unsigned integer when it is an integer of any width that is ≥ 0.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer when it is an integer that fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as f32 when it is an f32 or f64.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// Where one tensor lives and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (fastest-varying) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset of the first block, relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Product of the dims (1 for a scalar); saturates at `u64::MAX` (files whose products
    /// overflow are rejected by `GgufFile::open`).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).unwrap_or(u64::MAX)
    }

    /// Bytes of the tensor's data; `None` for a type whose layout is unknown (`Other`).
    pub fn n_bytes(&self) -> Option<u64> {
        self.ggml_type.bytes_for(self.n_elements())
    }
}

/// Everything that can go wrong reading, dequantizing or writing a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read model file {path}: {source} (check that the path is right and readable)")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a GGUF file: it starts with bytes {found:02x?}, not \"GGUF\" (point fasa at a .gguf model file)"
    )]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{path}: GGUF version {version} is not supported (supported: 2 and 3, little-endian; convert the model again with a current llama.cpp)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path} is truncated: reading {what} at byte {offset} needs {expected} bytes but only {present} are present (the file is incomplete: download or copy it again)")]
    Truncated { path: PathBuf, what: String, offset: u64, expected: u64, present: u64 },
    #[error("{path}: the data of tensor '{tensor}' (bytes {start}..{end} of the data section) lies outside the {data_len}-byte data section (the file is truncated or corrupt: download it again)")]
    TensorOutOfBounds { path: PathBuf, tensor: String, start: u64, end: u64, data_len: u64 },
    #[error("tensor '{tensor}' is stored as {found}, which fasa cannot dequantize (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; use a model file quantized to one of these)")]
    UnsupportedType { tensor: String, found: GgmlType },
    #[error("{path}: metadata key '{key}' is missing (the model file is incomplete or of an unexpected kind; convert it again with a current llama.cpp)")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key '{key}' holds {found}, expected {expected} (the file does not follow the GGUF conventions fasa expects)")]
    WrongKeyType { path: PathBuf, key: String, expected: &'static str, found: String },
    #[error("{path}: no tensor named '{name}' (the file lacks a weight the model needs; check that it is a complete model of a supported architecture)")]
    MissingTensor { path: PathBuf, name: String },
    #[error("tensor '{tensor}': {reason}")]
    BadTensor { tensor: String, reason: String },
    #[error("{path}: unsupported architecture '{arch}' (supported: llama, qwen2)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("cannot write GGUF: {0}")]
    InvalidWrite(String),
    #[error("{path} is malformed: {reason} (the file is corrupt or not a model file: download or convert it again)")]
    Malformed { path: PathBuf, reason: String },
}

#[cfg(test)]
pub(crate) mod test_support {
    //! The default model for tests that need a real file: they fail, never skip, when absent.
    use super::GgufFile;

    /// Opens `paths::default_model()`, panicking with a message that says how to provide it.
    pub(crate) fn open_default_model() -> GgufFile {
        let path = crate::paths::default_model();
        if !path.is_file() {
            panic!(
                "the default model is not at {}: put {} there (set FASA_CACHE_DIR to the cache folder holding models/, or FASA_MODEL to the file)",
                path.display(),
                crate::paths::DEFAULT_MODEL_FILE
            );
        }
        match GgufFile::open(&path) {
            Ok(f) => f,
            Err(e) => panic!("cannot open the default model: {e}"),
        }
    }
}
