//! `GgufFile`: parses the header, metadata and tensor infos of a memory-mapped GGUF file and
//! hands out tensor bytes. Every length read from the file is checked against the bytes that
//! remain, so a malformed file gives a `GgufError`, never a panic or a huge allocation.
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dequant::dequantize_named;
use super::{GgmlType, GgufError, MetaValue, TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC};

/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Nested arrays deeper than this are refused (real files nest at most once).
const MAX_ARRAY_DEPTH: u32 = 8;

/// An open GGUF file. The tensor data stays in the memory map; `tensor_bytes` borrows it.
pub struct GgufFile {
    pub path: PathBuf,
    /// 2 or 3.
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    /// `general.alignment` or 32.
    alignment: u64,
    /// Absolute file offset of the data section.
    data_offset: u64,
    /// Name → index into `tensors`.
    by_name: HashMap<String, usize>,
    mmap: Mmap,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Maps the file and parses everything but the tensor data. Checks that every tensor of a
    /// known type lies inside the data section, is aligned and is made of whole blocks per row.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io_err = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io_err)?;
        // SAFETY: the map is read-only and private to this struct. Model files are not
        // modified while loaded; if one were truncated underneath us, reads could fault
        // (SIGBUS), which is the accepted risk of every mmap-based model loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;

        let mut cur = Cursor { buf: &mmap, pos: 0, path };
        let magic = cur.take(4, "the magic bytes")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { path: path.to_path_buf(), found: magic.to_vec() });
        }
        let version = cur.u32("the version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion { path: path.to_path_buf(), version });
        }
        let n_tensors = cur.u64("the tensor count")?;
        let n_kv = cur.u64("the metadata count")?;
        // Each key/value takes ≥ 13 bytes (key length 8, type 4, value ≥ 1); each tensor
        // info ≥ 24 (name length 8, n_dims 4, type 4, offset 8).
        cur.check_count(n_kv, 13, "the metadata key/values")?;
        cur.check_count(n_tensors, 24, "the tensor infos")?;

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = cur.string("a metadata key")?;
            let ty = cur.u32(&format!("the value type of metadata key '{key}'"))?;
            let value = cur.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(cur.malformed(format!("metadata key '{key}' appears twice")));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v {
                MetaValue::U32(a) if a.is_power_of_two() => u64::from(*a),
                other => {
                    return Err(cur.malformed(format!("general.alignment must be a u32 power of two, found {other:?}")))
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut by_name = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = cur.string(&format!("the name of tensor #{i}"))?;
            let n_dims = cur.u32(&format!("the dim count of tensor '{name}'"))?;
            if n_dims > MAX_DIMS {
                return Err(
                    cur.malformed(format!("tensor '{name}' has {n_dims} dims (ggml allows at most {MAX_DIMS})"))
                );
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(cur.u64(&format!("the dims of tensor '{name}'"))?);
            }
            let ggml_type = GgmlType::from_id(cur.u32(&format!("the type of tensor '{name}'"))?);
            let offset = cur.u64(&format!("the data offset of tensor '{name}'"))?;
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(cur.malformed(format!("tensor '{name}' appears twice")));
            }
            tensors.push(TensorInfo { name, dims, ggml_type, offset });
        }

        // The data section starts at the next multiple of the alignment.
        let header_end = cur.pos as u64;
        let file_len = mmap.len() as u64;
        let data_offset = header_end
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| cur.malformed("the header size overflows".to_string()))?;
        let data_len = if data_offset <= file_len {
            file_len - data_offset
        } else if tensors.is_empty() {
            0
        } else {
            return Err(GgufError::Truncated {
                path: path.to_path_buf(),
                what: "the padding before the data section".to_string(),
                offset: header_end,
                expected: data_offset - header_end,
                present: file_len - header_end,
            });
        };

        for t in &tensors {
            check_tensor(path, t, alignment, data_len)?;
        }

        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            data_offset: data_offset.min(file_len),
            by_name,
            mmap,
        })
    }

    /// Absolute file offset of the data section (tensor offsets are relative to it).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// `general.alignment`, or 32 when absent.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw block bytes of `t`. Empty for a tensor whose type layout is unknown
    /// (`GgmlType::Other`) or a `TensorInfo` that does not lie inside this file's data.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let data = &self.mmap[self.data_offset as usize..];
        let Some(len) = t.n_bytes() else { return &[] };
        let range = usize::try_from(t.offset)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(start, len)| Some(start..start.checked_add(len)?));
        range.and_then(|r| data.get(r)).unwrap_or(&[])
    }

    /// The tensor `name` as f32, row-major with `dims[0]` innermost.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self
            .tensor(name)
            .ok_or_else(|| GgufError::MissingTensor { path: self.path.clone(), name: name.to_string() })?;
        let n = usize::try_from(t.n_elements()).map_err(|_| GgufError::BadTensor {
            tensor: t.name.clone(),
            reason: "too many elements for this machine's address space".to_string(),
        })?;
        dequantize_named(t.ggml_type, self.tensor_bytes(t), n, &t.name)
    }

    // ----- metadata getters: each error names the key -----

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey { path: self.path.clone(), key: key.to_string() })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
        GgufError::WrongKeyType { path: self.path.clone(), key: key.to_string(), expected, found: found.type_name() }
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    /// Any integer type (u8…u64, i8…i64) whose value fits a u32.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| self.wrong_type(key, "an integer in 0..=u32::MAX", v))
    }

    /// Any integer type whose value is ≥ 0.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// An f32 or f64 value.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.require(key)?;
        v.as_f32().ok_or_else(|| self.wrong_type(key, "a float", v))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            MetaValue::Bool(b) => Ok(*b),
            v => Err(self.wrong_type(key, "a bool", v)),
        }
    }

    /// An array of strings, borrowed (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let v = self.require(key)?;
        let items = v.as_array().ok_or_else(|| self.wrong_type(key, "an array of strings", v))?;
        items.iter().map(|x| x.as_str().ok_or_else(|| self.wrong_type(key, "an array of strings", v))).collect()
    }

    /// An array of integers that all fit an i32 (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        let v = self.require(key)?;
        let items = v.as_array().ok_or_else(|| self.wrong_type(key, "an array of i32", v))?;
        items
            .iter()
            .map(|x| {
                x.as_i64().and_then(|i| i32::try_from(i).ok()).ok_or_else(|| self.wrong_type(key, "an array of i32", v))
            })
            .collect()
    }

    /// An array of f32/f64 (e.g. `tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        let v = self.require(key)?;
        let items = v.as_array().ok_or_else(|| self.wrong_type(key, "an array of floats", v))?;
        items.iter().map(|x| x.as_f32().ok_or_else(|| self.wrong_type(key, "an array of floats", v))).collect()
    }
}

/// Checks one tensor's geometry against the data section of `data_len` bytes.
fn check_tensor(path: &Path, t: &TensorInfo, alignment: u64, data_len: u64) -> Result<(), GgufError> {
    let malformed = |reason: String| GgufError::Malformed { path: path.to_path_buf(), reason };
    if t.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).is_none() {
        return Err(malformed(format!("tensor '{}' has dims {:?} whose product overflows", t.name, t.dims)));
    }
    if t.offset % alignment != 0 {
        return Err(malformed(format!(
            "tensor '{}' starts at data offset {}, not a multiple of the alignment {alignment}",
            t.name, t.offset
        )));
    }
    // Unknown types: their size is unknown, so only `dequantize` can refuse them later.
    let Some(block) = t.ggml_type.block_size() else { return Ok(()) };
    let row = t.dims.first().copied().unwrap_or(1);
    if row % block != 0 {
        return Err(malformed(format!(
            "tensor '{}' has rows of {row} elements, not a whole number of {} blocks of {block}",
            t.name, t.ggml_type
        )));
    }
    let end = t.n_bytes().and_then(|n| t.offset.checked_add(n));
    match end {
        Some(end) if end <= data_len => Ok(()),
        _ => Err(GgufError::TensorOutOfBounds {
            path: path.to_path_buf(),
            tensor: t.name.clone(),
            start: t.offset,
            end: end.unwrap_or(u64::MAX),
            data_len,
        }),
    }
}

/// Reads little-endian values from the start of the file, checking every length.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn truncated(&self, what: &str, expected: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            offset: self.pos as u64,
            expected,
            present: self.remaining(),
        }
    }

    fn malformed(&self, reason: String) -> GgufError {
        GgufError::Malformed { path: self.path.to_path_buf(), reason: format!("{reason} (at byte {})", self.pos) }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(what, n));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.buf[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Refuses a count of items of at least `min_size` bytes each that cannot fit in the rest
    /// of the file, before anything is allocated for them.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<(), GgufError> {
        let need = count.saturating_mul(min_size);
        if need > self.remaining() {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{what} ({count} of them, at least {min_size} bytes each)"),
                offset: self.pos as u64,
                expected: need,
                present: self.remaining(),
            });
        }
        Ok(())
    }

    /// A GGUF string: u64 length, then UTF-8 bytes.
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| self.malformed(format!("{what} is not valid UTF-8: {e}")))
    }

    /// One value of GGUF type `ty`; `key` names it in errors.
    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetaValue, GgufError> {
        let what = format!("the value of metadata key '{key}'");
        Ok(match ty {
            0 => MetaValue::U8(u8::from_le_bytes(self.array(&what)?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(&what)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.malformed(format!("metadata key '{key}' has bool byte {b}, not 0 or 1"))),
            },
            8 => MetaValue::Str(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(
                        self.malformed(format!("metadata key '{key}' nests arrays deeper than {MAX_ARRAY_DEPTH}"))
                    );
                }
                let elem_ty = self.u32(&what)?;
                let count = self.u64(&what)?;
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(
                            self.malformed(format!("metadata key '{key}' is an array of unknown value type {other}"))
                        )
                    }
                };
                self.check_count(count, min_size, &format!("the elements of metadata array '{key}'"))?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(&what)?)),
            other => return Err(self.malformed(format!("metadata key '{key}' has unknown value type {other}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::open_default_model;
    use super::super::{f16_bytes, quantize_q4_1, quantize_q8_0, GgufWriter};
    use super::*;

    /// Writes `bytes` to a fresh file and opens it.
    fn open_bytes(bytes: &[u8]) -> Result<GgufFile, GgufError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, bytes).unwrap();
        GgufFile::open(&path)
    }

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 16.0).collect()
    }

    /// Metadata of every value type and four tensors (F32, F16, Q8_0, Q4_1).
    fn sample_writer() -> GgufWriter {
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", MetaValue::Str("llama".into()))
            .add_metadata("u8", MetaValue::U8(200))
            .add_metadata("i8", MetaValue::I8(-5))
            .add_metadata("u16", MetaValue::U16(60000))
            .add_metadata("i16", MetaValue::I16(-300))
            .add_metadata("u32", MetaValue::U32(4_000_000_000))
            .add_metadata("i32", MetaValue::I32(-7))
            .add_metadata("u64", MetaValue::U64(1 << 40))
            .add_metadata("u64.small", MetaValue::U64(8192))
            .add_metadata("i64", MetaValue::I64(-1))
            .add_metadata("f32", MetaValue::F32(1e-5))
            .add_metadata("f64", MetaValue::F64(0.125))
            .add_metadata("bool", MetaValue::Bool(true))
            .add_metadata("strs", MetaValue::Array(vec![MetaValue::Str("a".into()), MetaValue::Str("Ġb".into())]))
            .add_metadata("ints", MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(-2), MetaValue::I32(3)]))
            .add_metadata("empty", MetaValue::Array(vec![]))
            .add_metadata(
                "nested",
                MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::U8(1)]), MetaValue::Array(vec![])]),
            );
        w.add_f32("f32.weight", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, -6.5]).unwrap();
        w.add_tensor("f16.weight", &[4], GgmlType::F16, f16_bytes(&[0.5, -1.0, 2.0, 1024.0])).unwrap();
        w.add_tensor("q8.weight", &[32, 2], GgmlType::Q8_0, quantize_q8_0(&ramp(64)).unwrap()).unwrap();
        w.add_tensor("q41.weight", &[64], GgmlType::Q4_1, quantize_q4_1(&ramp(64)).unwrap()).unwrap();
        w
    }

    #[test]
    fn round_trip() {
        for (version, alignment) in [(3, None), (2, Some(64)), (3, Some(1))] {
            let mut w = sample_writer();
            w.set_version(version);
            if let Some(a) = alignment {
                w.set_alignment(a).unwrap();
            }
            let f = open_bytes(&w.to_bytes().unwrap()).unwrap();
            assert_eq!(f.version, version);
            let align = u64::from(alignment.unwrap_or(32));
            assert_eq!(f.alignment(), align);
            assert_eq!(f.data_offset() % align, 0);

            assert_eq!(f.get("i16"), Some(&MetaValue::I16(-300)));
            assert_eq!(
                f.get("nested"),
                Some(&MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::U8(1)]), MetaValue::Array(vec![])]))
            );
            assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
            assert_eq!(f.get_u32("u8").unwrap(), 200);
            assert_eq!(f.get_u32("u32").unwrap(), 4_000_000_000);
            assert_eq!(f.get_u32("u64.small").unwrap(), 8192);
            assert_eq!(f.get_u64("u64").unwrap(), 1 << 40);
            assert_eq!(f.get_f32("f32").unwrap(), 1e-5);
            assert_eq!(f.get_f32("f64").unwrap(), 0.125);
            assert!(f.get_bool("bool").unwrap());
            assert_eq!(f.get_str_array("strs").unwrap(), ["a", "Ġb"]);
            assert_eq!(f.get_i32_array("ints").unwrap(), [1, -2, 3]);
            assert_eq!(f.get_i32_array("empty").unwrap(), Vec::<i32>::new());

            let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, ["f32.weight", "f16.weight", "q8.weight", "q41.weight"]);
            for t in &f.tensors {
                assert_eq!(t.offset % align, 0, "{}", t.name);
                assert_eq!(f.tensor_bytes(t).len() as u64, t.n_bytes().unwrap());
            }
            let q8 = f.tensor("q8.weight").unwrap();
            assert_eq!(
                (q8.dims.clone(), q8.ggml_type, q8.n_elements(), q8.n_bytes()),
                (vec![32, 2], GgmlType::Q8_0, 64, Some(68))
            );

            assert_eq!(f.dequantize("f32.weight").unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0, -6.5]);
            assert_eq!(f.dequantize("f16.weight").unwrap(), [0.5, -1.0, 2.0, 1024.0]);
            // Quantization error is at most half a step: max|x|/127/2 for Q8_0, (max-min)/15/2 for Q4_1.
            let x = ramp(64);
            for (name, tol) in [("q8.weight", 3.2 / 127.0 / 2.0 + 1e-3), ("q41.weight", 6.3 / 15.0 / 2.0 + 1e-2)] {
                let y = f.dequantize(name).unwrap();
                let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err <= tol, "{name}: max error {err} > {tol}");
            }
        }
    }

    #[test]
    fn getter_errors_name_the_key() {
        let f = open_bytes(&sample_writer().to_bytes().unwrap()).unwrap();
        let err = f.get_u32("llama.block_count").unwrap_err();
        assert!(matches!(err, GgufError::MissingKey { ref key, .. } if key == "llama.block_count"), "{err}");
        assert!(err.to_string().contains("'llama.block_count' is missing"), "{err}");
        for (key, get) in [
            ("i8", f.get_u32("i8").err()),
            ("u64", f.get_u32("u64").err()),
            ("u32", f.get_str("u32").err()),
            ("general.architecture", f.get_f32("general.architecture").err()),
            ("ints", f.get_str_array("ints").err()),
            ("strs", f.get_i32_array("strs").err()),
        ] {
            let err = get.unwrap_or_else(|| panic!("{key}: expected an error"));
            assert!(matches!(err, GgufError::WrongKeyType { key: ref k, .. } if k == key), "{err}");
        }
        let err = f.dequantize("nope").unwrap_err();
        assert!(matches!(err, GgufError::MissingTensor { .. }), "{err}");
    }

    #[test]
    fn bad_magic_and_version() {
        let mut bytes = sample_writer().to_bytes().unwrap();
        bytes[..4].copy_from_slice(b"GGML");
        let err = open_bytes(&bytes).unwrap_err();
        assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");
        assert!(err.to_string().contains("not \"GGUF\""), "{err}");
        for version in [1u32, 4, 0x0300_0000] {
            let mut w = sample_writer();
            w.set_version(version);
            let err = open_bytes(&w.to_bytes().unwrap()).unwrap_err();
            assert!(matches!(err, GgufError::UnsupportedVersion { version: v, .. } if v == version), "{err}");
        }
        let err = GgufFile::open(Path::new("/nonexistent/fasa/model.gguf")).unwrap_err();
        assert!(
            matches!(err, GgufError::Io { .. }) && err.to_string().contains("/nonexistent/fasa/model.gguf"),
            "{err}"
        );
    }

    #[test]
    fn truncated_files_give_typed_errors() {
        let bytes = sample_writer().to_bytes().unwrap();
        let f = open_bytes(&bytes).unwrap();
        let data_start = f.data_offset() as usize;
        let data_end = data_start + f.tensors.iter().map(|t| (t.offset + t.n_bytes().unwrap()) as usize).max().unwrap();
        assert!(open_bytes(&bytes[..data_end]).is_ok(), "the padding after the last tensor is optional");
        // Every shorter prefix fails cleanly: Truncated in the header, TensorOutOfBounds in the data.
        for len in 0..data_end {
            match open_bytes(&bytes[..len]) {
                Err(GgufError::Truncated { expected, present, .. }) => {
                    assert!(len < data_start, "prefix {len}: header error in the data");
                    assert!(expected > present, "prefix {len}: {expected} ≤ {present}");
                }
                Err(GgufError::TensorOutOfBounds { end, data_len, .. }) => {
                    assert!(len >= data_start && end > data_len, "prefix {len}");
                }
                other => panic!("prefix of {len} bytes: {other:?}"),
            }
        }
        let err = open_bytes(&bytes[..30]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("truncated") && msg.contains("needs") && msg.contains("only"), "{msg}");
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let bytes = sample_writer().to_bytes().unwrap();
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                let _ = open_bytes(&b).map(|f| {
                    for t in &f.tensors {
                        let _ = f.dequantize(&t.name);
                    }
                });
            }
        }
    }

    /// Header with one metadata key `k` of type `ty` followed by `rest`.
    fn one_kv(ty: u32, rest: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes()); // tensors
        b.extend(1u64.to_le_bytes()); // key/values
        b.extend(1u64.to_le_bytes());
        b.push(b'k');
        b.extend(ty.to_le_bytes());
        b.extend(rest);
        b
    }

    #[test]
    fn huge_lengths_are_refused_before_allocating() {
        // Array of u32 claiming 2^62 elements.
        let mut rest = 4u32.to_le_bytes().to_vec();
        rest.extend((1u64 << 62).to_le_bytes());
        rest.extend([0u8; 16]);
        let err = open_bytes(&one_kv(9, &rest)).unwrap_err();
        assert!(matches!(err, GgufError::Truncated { expected, present: 16, .. } if expected == u64::MAX), "{err}");
        assert!(err.to_string().contains("metadata array 'k'"), "{err}");
        // A string of u64::MAX bytes.
        let err = open_bytes(&one_kv(8, &u64::MAX.to_le_bytes())).unwrap_err();
        assert!(matches!(err, GgufError::Truncated { expected: u64::MAX, .. }), "{err}");
        // 2^40 tensors in a tiny file.
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((1u64 << 40).to_le_bytes());
        b.extend(0u64.to_le_bytes());
        let err = open_bytes(&b).unwrap_err();
        assert!(matches!(err, GgufError::Truncated { .. }) && err.to_string().contains("tensor infos"), "{err}");
        // Arrays nested beyond the limit.
        let mut rest = Vec::new();
        for _ in 0..20 {
            rest.extend(9u32.to_le_bytes());
            rest.extend(1u64.to_le_bytes());
        }
        rest.extend([0u8; 64]);
        let err = open_bytes(&one_kv(9, &rest)).unwrap_err();
        assert!(matches!(err, GgufError::Malformed { .. }) && err.to_string().contains("nests arrays"), "{err}");
        // Unknown value type.
        let err = open_bytes(&one_kv(13, &[0; 8])).unwrap_err();
        assert!(err.to_string().contains("unknown value type 13"), "{err}");
    }

    #[test]
    fn tensor_geometry_is_checked() {
        // A Q8_0 row of 16 elements is half a block.
        let mut w = GgufWriter::new();
        w.add_tensor("odd", &[32], GgmlType::Q8_0, vec![0; 34]).unwrap();
        let mut bytes = w.to_bytes().unwrap();
        // Patch dims[0] 32 → 16 (the u64 after the name and n_dims).
        let at = bytes.windows(3).position(|x| x == b"odd").unwrap() + 3 + 4;
        bytes[at..at + 8].copy_from_slice(&16u64.to_le_bytes());
        let err = open_bytes(&bytes).unwrap_err();
        assert!(err.to_string().contains("not a whole number of Q8_0 blocks of 32"), "{err}");
        // Offset moved past the end of the data.
        let mut bytes = w.to_bytes().unwrap();
        let at = bytes.windows(3).position(|x| x == b"odd").unwrap() + 3 + 4 + 8 + 4;
        bytes[at..at + 8].copy_from_slice(&64u64.to_le_bytes());
        let err = open_bytes(&bytes).unwrap_err();
        assert!(matches!(err, GgufError::TensorOutOfBounds { start: 64, end: 98, .. }), "{err}");
        // Misaligned offset.
        bytes[at..at + 8].copy_from_slice(&1u64.to_le_bytes());
        let err = open_bytes(&bytes).unwrap_err();
        assert!(err.to_string().contains("not a multiple of the alignment 32"), "{err}");
    }

    #[test]
    fn unsupported_types_open_but_do_not_dequantize() {
        let mut w = GgufWriter::new();
        w.add_tensor("iq", &[256], GgmlType::Other(16), vec![0; 66]).unwrap();
        w.add_tensor("q2k", &[256], GgmlType::Q2K, vec![0; 84]).unwrap();
        let f = open_bytes(&w.to_bytes().unwrap()).unwrap();
        let iq = f.tensor("iq").unwrap();
        assert_eq!((iq.ggml_type, iq.n_bytes(), f.tensor_bytes(iq).len()), (GgmlType::Other(16), None, 0));
        let err = f.dequantize("iq").unwrap_err();
        assert!(
            matches!(err, GgufError::UnsupportedType { ref tensor, found: GgmlType::Other(16) } if tensor == "iq"),
            "{err}"
        );
        assert!(err.to_string().contains("'iq' is stored as IQ2_XXS (ggml type id 16)"), "{err}");
        let err = f.dequantize("q2k").unwrap_err();
        assert!(err.to_string().contains("'q2k' is stored as Q2_K"), "{err}");
    }

    #[test]
    fn default_model() {
        let f = open_default_model();
        assert_eq!(f.version, 3);
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
        // 30 layers × 9 tensors + token_embd + output_norm (the LM head is tied).
        assert_eq!(f.tensors.len(), 30 * 9 + 2);
        let types: Vec<(&str, GgmlType, Vec<u64>)> = [
            "token_embd.weight",
            "blk.0.attn_q.weight",
            "blk.0.attn_k.weight",
            "blk.0.attn_norm.weight",
            "blk.29.ffn_down.weight",
        ]
        .iter()
        .map(|n| {
            let t = f.tensor(n).unwrap_or_else(|| panic!("no tensor {n}"));
            (*n, t.ggml_type, t.dims.clone())
        })
        .collect();
        assert_eq!(
            types,
            [
                ("token_embd.weight", GgmlType::Q8_0, vec![576, 49152]),
                ("blk.0.attn_q.weight", GgmlType::Q4_1, vec![576, 576]),
                ("blk.0.attn_k.weight", GgmlType::Q4_1, vec![576, 192]),
                ("blk.0.attn_norm.weight", GgmlType::F32, vec![576]),
                ("blk.29.ffn_down.weight", GgmlType::Q4_1, vec![1536, 576]),
            ]
        );
        assert!(f.tensor("output.weight").is_none());
        assert_eq!(f.get_str_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
        // The last tensor ends inside the file.
        let end = f.tensors.iter().map(|t| t.offset + t.n_bytes().unwrap()).max().unwrap();
        assert!(f.data_offset() + end <= std::fs::metadata(&f.path).unwrap().len());
        let norm = f.dequantize("blk.0.attn_norm.weight").unwrap();
        assert_eq!(norm.len(), 576);
        assert!(norm.iter().all(|v| v.is_finite()));
        let q = f.dequantize("blk.0.attn_q.weight").unwrap();
        assert_eq!(q.len(), 576 * 576);
        let mean_abs = q.iter().map(|v| v.abs()).sum::<f32>() / q.len() as f32;
        assert!(mean_abs > 1e-3 && mean_abs < 1.0, "mean |w| of attn_q {mean_abs}");
    }
}
