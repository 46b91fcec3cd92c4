//! `GgufWriter`: builds a GGUF v3 file from metadata and raw tensor bytes, for synthetic test
//! models; `quantize_q8_0`/`quantize_q4_1` make block bytes from f32 (ggml's reference
//! quantizers), `f16_bytes` half-float bytes.
use std::path::Path;

use super::{GgmlType, GgufError, MetaValue, DEFAULT_ALIGNMENT, GGUF_MAGIC};

/// A GGUF file under construction. Metadata keys keep their insertion order; adding a key
/// again replaces its value.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

#[derive(Debug, Clone)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty version-3 file with the default alignment (32).
    pub fn new() -> Self {
        GgufWriter { version: 3, alignment: DEFAULT_ALIGNMENT, metadata: Vec::new(), tensors: Vec::new() }
    }

    /// The version number written in the header (the layout of 2 and 3 is the same).
    pub fn set_version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Data alignment; also records it as `general.alignment`.
    pub fn set_alignment(&mut self, alignment: u32) -> Result<&mut Self, GgufError> {
        if !alignment.is_power_of_two() {
            return Err(GgufError::InvalidWrite(format!("alignment {alignment} is not a power of two")));
        }
        self.alignment = u64::from(alignment);
        Ok(self.add_metadata("general.alignment", MetaValue::U32(alignment)))
    }

    pub fn add_metadata(&mut self, key: impl Into<String>, value: MetaValue) -> &mut Self {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// Adds a tensor of raw block bytes. `dims` in ggml order (`dims[0]` innermost). For a
    /// known type the bytes must be exactly the tensor's size; an `Other` type takes any
    /// bytes (to make files with types the reader does not support).
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> Result<&mut Self, GgufError> {
        let name = name.into();
        let bad = |reason: String| GgufError::InvalidWrite(format!("tensor '{name}': {reason}"));
        if dims.len() > 4 {
            return Err(bad(format!("{} dims, at most 4 allowed", dims.len())));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(bad("added twice".to_string()));
        }
        if let Some(block) = ty.block_size() {
            let n = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let row = dims.first().copied().unwrap_or(1);
            let need = n.filter(|_| row % block == 0).and_then(|n| ty.bytes_for(n));
            if need != Some(data.len() as u64) {
                return Err(bad(format!(
                    "{} bytes given for dims {dims:?} of {ty}, which need {need:?} (rows must be whole blocks of {block})",
                    data.len()
                )));
            }
        }
        self.tensors.push(PendingTensor { name, dims: dims.to_vec(), ty, data });
        Ok(self)
    }

    /// Adds an F32 tensor.
    pub fn add_f32(&mut self, name: impl Into<String>, dims: &[u64], values: &[f32]) -> Result<&mut Self, GgufError> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor(name, dims, GgmlType::F32, data)
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            put_value(&mut out, key, value)?;
        }
        // Tensor data offsets: each one aligned, relative to the data section.
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).next_multiple_of(self.alignment);
        }
        for (t, offset) in self.tensors.iter().zip(&offsets) {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        let data_start = (out.len() as u64).next_multiple_of(self.alignment);
        for (t, offset) in self.tensors.iter().zip(&offsets) {
            out.resize((data_start + offset) as usize, 0);
            out.extend_from_slice(&t.data);
        }
        if !self.tensors.is_empty() {
            out.resize((data_start + offset) as usize, 0);
        }
        Ok(out)
    }

    /// Writes the file at `path` (replacing it).
    pub fn write(&self, path: &Path) -> Result<(), GgufError> {
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|source| GgufError::Io { path: path.to_path_buf(), source })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, key: &str, value: &MetaValue) -> Result<(), GgufError> {
    match value {
        MetaValue::U8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Bool(v) => out.push(u8::from(*v)),
        MetaValue::Str(s) => put_str(out, s),
        MetaValue::Array(items) => {
            // An empty array is written as an array of u8.
            let elem_ty = items.first().map_or(0, MetaValue::type_id);
            if let Some(odd) = items.iter().find(|v| v.type_id() != elem_ty) {
                return Err(GgufError::InvalidWrite(format!(
                    "metadata array '{key}' mixes {} and {}: GGUF arrays hold one type",
                    items[0].type_name(),
                    odd.type_name()
                )));
            }
            out.extend_from_slice(&elem_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, key, item)?;
            }
        }
    }
    Ok(())
}

fn check_blocks(values: &[f32], ty: GgmlType) -> Result<(), GgufError> {
    if values.len() % 32 != 0 {
        return Err(GgufError::InvalidWrite(format!(
            "cannot quantize {} values to {ty}: not a whole number of blocks of 32",
            values.len()
        )));
    }
    Ok(())
}

/// f32 → Q8_0 blocks (ggml's `quantize_row_q8_0_ref`): d = max|x|/127, q = round(x/d).
pub fn quantize_q8_0(values: &[f32]) -> Result<Vec<u8>, GgufError> {
    check_blocks(values, GgmlType::Q8_0)?;
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for x in values.chunks_exact(32) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
    }
    Ok(out)
}

/// f32 → Q4_1 blocks (ggml's `quantize_row_q4_1_ref`): d = (max-min)/15, m = min,
/// q = (x-min)/d rounded, clamped to 15; low nibbles hold x[0..16], high x[16..32].
pub fn quantize_q4_1(values: &[f32]) -> Result<Vec<u8>, GgufError> {
    check_blocks(values, GgmlType::Q4_1)?;
    let mut out = Vec::with_capacity(values.len() / 32 * 20);
    for x in values.chunks_exact(32) {
        let min = x.iter().copied().fold(f32::INFINITY, f32::min);
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&half::f16::from_f32(min).to_le_bytes());
        for j in 0..16 {
            let q0 = (((x[j] - min) * id + 0.5) as u8).min(15);
            let q1 = (((x[j + 16] - min) * id + 0.5) as u8).min(15);
            out.push(q0 | (q1 << 4));
        }
    }
    Ok(out)
}

/// f32 → little-endian IEEE half floats (F16 tensor bytes).
pub fn f16_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()
}
