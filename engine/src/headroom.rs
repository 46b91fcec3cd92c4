//! Memory headroom readings for the planner (`crate::plan`): how many bytes the KV cache may
//! still take in each tier, and how hard the kernel is fighting for memory (PSI).
//!
//! Every source sits behind [`HeadroomSource`]; every file format has a pure parser taking
//! `&str`, so the tests feed recorded files and only the `read` methods touch the system:
//! - [`MemInfo`]: `/proc/meminfo` `MemAvailable` (unified memory: Jetson).
//! - [`Cgroup`]: the process's cgroup v2 `memory.max − memory.current` (+ reclaimable
//!   `inactive_file`), the tightest over its ancestors (systemd `MemoryMax=` on the unit or slice).
//! - [`GpuMemInfo`]: `cuMemGetInfo` free bytes on a discrete GPU, handed in by the GPU code as a
//!   closure so this crate does not link CUDA.
//! - [`Fixed`]: a given size (`--headroom SIZE`, tests, simulations); [`parse_size`] reads SIZE.
//! - [`MinOf`]: the minimum of several sources less a safety margin.
//! - [`PsiMonitor`] (periodic, non-blocking reads of `/proc/pressure/memory`) and [`PsiTrigger`]
//!   (a blocking `poll(2)` on a PSI trigger fd, for a watcher thread) give a [`PressureLevel`].
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How hard the kernel is reclaiming memory, from PSI. Ordered: `None < Moderate < Critical`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PressureLevel {
    /// Tasks rarely stall on memory.
    #[default]
    None,
    /// Some tasks stall on reclaim a noticeable share of the time: stop growing.
    Moderate,
    /// All non-idle tasks stall together (thrashing) or stalls dominate: shrink new work hard.
    Critical,
}

impl PressureLevel {
    /// Thresholds on the share of time stalled (percent, as PSI's `avg10`): `some ≥ 10` or
    /// `full ≥ 2` is moderate, `some ≥ 40` or `full ≥ 10` critical. systemd-oomd's default kill
    /// threshold is 60% `full` over 20 s, so critical fires well before anything is killed.
    pub fn from_stall_percent(some: f64, full: f64) -> Self {
        if some >= 40.0 || full >= 10.0 {
            PressureLevel::Critical
        } else if some >= 10.0 || full >= 2.0 {
            PressureLevel::Moderate
        } else {
            PressureLevel::None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PressureLevel::None => "none",
            PressureLevel::Moderate => "moderate",
            PressureLevel::Critical => "critical",
        }
    }
}

/// One reading of the bytes the KV cache may use, per tier. The planner subtracts weights,
/// workspace and its safety margin itself when told the model is not loaded yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Headroom {
    /// Bytes free in the fast tier: GPU memory on a discrete GPU, RAM on unified memory.
    pub fast_bytes: u64,
    /// Bytes the slow tier may take: host RAM behind a discrete GPU, or the file-backed mapping
    /// budget on unified memory; 0 when there is no slow tier (FASA-M is then not offered).
    pub slow_bytes: u64,
    pub pressure: PressureLevel,
}

#[derive(Debug, thiserror::Error)]
pub enum HeadroomError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{what}: {reason} (pass --headroom SIZE to plan without reading the system)")]
    Parse { what: String, reason: String },
    #[error("no GPU memory reading: the GPU is not initialised or not present (plan with --headroom SIZE, or use the unified-memory sources)")]
    NoGpu,
    #[error("invalid size {0:?}: expected bytes or a number with a unit such as 512M, 8G, 1.5GiB")]
    BadSize(String),
}

type HResult<T> = std::result::Result<T, HeadroomError>;

fn read_text(path: &Path) -> HResult<String> {
    std::fs::read_to_string(path).map_err(|source| HeadroomError::Io { path: path.into(), source })
}

fn parse_err(what: impl Into<String>, reason: impl Into<String>) -> HeadroomError {
    HeadroomError::Parse { what: what.into(), reason: reason.into() }
}

/// Something that says how many bytes are free. `Ok(None)` means "no limit from this source"
/// (e.g. a cgroup whose `memory.max` is `max`).
pub trait HeadroomSource: Send + Sync {
    /// Short name for logs and plan reasons, e.g. `meminfo` or `cgroup:/system.slice/fasad.service`.
    fn name(&self) -> String;
    fn available(&self) -> HResult<Option<u64>>;
}

// ---------------------------------------------------------------------------------------------
// /proc/meminfo

/// The fields of `/proc/meminfo` the planner uses, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfoReading {
    pub total: u64,
    /// The kernel's estimate of memory available without swapping: free + reclaimable page
    /// cache and slab. This, not `MemFree` (nor `cudaMemGetInfo` on Jetson, which ignores
    /// reclaimable cache), is what a unified-memory device can still hand out.
    pub available: u64,
    pub swap_free: u64,
}

/// Parses `/proc/meminfo` text (`Key:   123 kB` lines).
pub fn parse_meminfo(text: &str) -> HResult<MemInfoReading> {
    let field = |key: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            let mut it = rest.split_whitespace();
            let n: u64 = it.next()?.parse().ok()?;
            Some(match it.next() {
                Some("kB") => n * 1024,
                None => n,
                Some(_) => return None,
            })
        })
    };
    let need = |key: &str| field(key).ok_or_else(|| parse_err("/proc/meminfo", format!("no {key} line (kernel older than 3.14?)")));
    Ok(MemInfoReading { total: need("MemTotal")?, available: need("MemAvailable")?, swap_free: field("SwapFree").unwrap_or(0) })
}

/// `MemAvailable` of `/proc/meminfo` (or a recorded copy at `path`).
pub struct MemInfo {
    pub path: PathBuf,
}

impl Default for MemInfo {
    fn default() -> Self {
        Self { path: "/proc/meminfo".into() }
    }
}

impl HeadroomSource for MemInfo {
    fn name(&self) -> String {
        "meminfo".into()
    }
    fn available(&self) -> HResult<Option<u64>> {
        Ok(Some(parse_meminfo(&read_text(&self.path)?)?.available))
    }
}

// ---------------------------------------------------------------------------------------------
// cgroup v2

/// The cgroup v2 path of a process from `/proc/<pid>/cgroup` (the `0::/path` line); `None` on a
/// v1-only system.
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(|p| p.trim().to_string())
}

/// `memory.max`: `None` for `max` (no limit).
pub fn parse_memory_max(text: &str) -> HResult<Option<u64>> {
    match text.trim() {
        "max" => Ok(None),
        t => t.parse().map(Some).map_err(|_| parse_err("memory.max", format!("{t:?} is neither a number nor max"))),
    }
}

/// `memory.current` (bytes).
pub fn parse_memory_current(text: &str) -> HResult<u64> {
    text.trim().parse().map_err(|_| parse_err("memory.current", format!("{:?} is not a number", text.trim())))
}

/// A field (bytes) of `memory.stat`, e.g. `inactive_file`.
pub fn parse_memory_stat(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        if k == key {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// Bytes one cgroup level still allows: `max − current + inactive_file`, capped at `max`.
/// `inactive_file` is page cache the kernel reclaims before it OOM-kills the group, so counting
/// it avoids the "estimate too low" failure; active file pages are not counted (conservative).
pub fn cgroup_available(max: Option<u64>, current: u64, inactive_file: u64) -> Option<u64> {
    max.map(|m| m.saturating_sub(current).saturating_add(inactive_file).min(m))
}

/// The tightest cgroup v2 memory limit over the process's cgroup and its ancestors.
pub struct Cgroup {
    /// Mount point of the v2 hierarchy, normally `/sys/fs/cgroup`.
    pub root: PathBuf,
    /// `/proc/self/cgroup` (or a recorded copy).
    pub proc_cgroup: PathBuf,
}

impl Default for Cgroup {
    fn default() -> Self {
        Self { root: "/sys/fs/cgroup".into(), proc_cgroup: "/proc/self/cgroup".into() }
    }
}

impl Cgroup {
    /// The process's cgroup path relative to the root, e.g. `/system.slice/fasad.service`.
    pub fn path(&self) -> HResult<String> {
        parse_proc_cgroup(&read_text(&self.proc_cgroup)?)
            .ok_or_else(|| parse_err(self.proc_cgroup.display().to_string(), "no cgroup v2 (0::) line: the memory controller is v1 only"))
    }
}

impl HeadroomSource for Cgroup {
    fn name(&self) -> String {
        format!("cgroup:{}", self.path().unwrap_or_else(|_| "?".into()))
    }
    fn available(&self) -> HResult<Option<u64>> {
        let rel = self.path()?;
        let mut dir = self.root.join(rel.trim_start_matches('/'));
        let mut best: Option<u64> = None;
        // Walk up to the root: a limit on the slice binds the service too. The root itself has
        // no memory.max.
        loop {
            let max_path = dir.join("memory.max");
            if max_path.exists() {
                let max = parse_memory_max(&read_text(&max_path)?)?;
                if max.is_some() {
                    let current = parse_memory_current(&read_text(&dir.join("memory.current"))?)?;
                    let inactive = std::fs::read_to_string(dir.join("memory.stat")).ok().and_then(|s| parse_memory_stat(&s, "inactive_file")).unwrap_or(0);
                    let a = cgroup_available(max, current, inactive);
                    best = match (best, a) {
                        (Some(b), Some(a)) => Some(b.min(a)),
                        (b, a) => b.or(a),
                    };
                }
            }
            if dir == self.root || !dir.pop() {
                break;
            }
        }
        Ok(best)
    }
}

// ---------------------------------------------------------------------------------------------
// Discrete GPU, fixed, minimum

/// Free GPU memory from `cuMemGetInfo`, supplied by the GPU code: `Some((free, total))`, or
/// `None` when no context is up.
pub struct GpuMemInfo<F: Fn() -> Option<(u64, u64)> + Send + Sync> {
    pub mem_get_info: F,
}

impl<F: Fn() -> Option<(u64, u64)> + Send + Sync> HeadroomSource for GpuMemInfo<F> {
    fn name(&self) -> String {
        "cuMemGetInfo".into()
    }
    fn available(&self) -> HResult<Option<u64>> {
        (self.mem_get_info)().map(|(free, _total)| Some(free)).ok_or(HeadroomError::NoGpu)
    }
}

/// A fixed number of bytes: `--headroom SIZE`, tests and simulated devices.
#[derive(Debug, Clone, Copy)]
pub struct Fixed(pub u64);

impl HeadroomSource for Fixed {
    fn name(&self) -> String {
        format!("fixed {}", format_size(self.0))
    }
    fn available(&self) -> HResult<Option<u64>> {
        Ok(Some(self.0))
    }
}

/// The minimum of several sources, less `margin` bytes (kept for everything else on the device:
/// other processes' growth, the kernel, allocator slack). Sources without a limit are skipped;
/// `None` if none has one.
pub struct MinOf {
    pub sources: Vec<Box<dyn HeadroomSource>>,
    pub margin: u64,
}

impl HeadroomSource for MinOf {
    fn name(&self) -> String {
        let names: Vec<String> = self.sources.iter().map(|s| s.name()).collect();
        format!("min({}) - {}", names.join(", "), format_size(self.margin))
    }
    fn available(&self) -> HResult<Option<u64>> {
        let mut best: Option<u64> = None;
        for s in &self.sources {
            if let Some(a) = s.available()? {
                best = Some(best.map_or(a, |b| b.min(a)));
            }
        }
        Ok(best.map(|b| b.saturating_sub(self.margin)))
    }
}

/// Reads one [`Headroom`]: the fast tier from `fast`, the slow tier from `slow` (absent: no slow
/// tier), pressure from `psi` (absent: `None`). A source without a limit reads as `u64::MAX`.
pub fn read_headroom(fast: &dyn HeadroomSource, slow: Option<&dyn HeadroomSource>, psi: Option<&mut PsiMonitor>) -> HResult<Headroom> {
    let fast_bytes = fast.available()?.unwrap_or(u64::MAX);
    let slow_bytes = match slow {
        Some(s) => s.available()?.unwrap_or(u64::MAX),
        None => 0,
    };
    let pressure = match psi {
        Some(p) => p.poll()?,
        None => PressureLevel::None,
    };
    Ok(Headroom { fast_bytes, slow_bytes, pressure })
}

/// Parses a size: plain bytes, or a number with `K`/`M`/`G`/`T` (powers of 1024, also written
/// `KiB`, `MB`, … — all binary, as `free -h` and systemd's `MemoryMax=` read them).
pub fn parse_size(s: &str) -> HResult<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| HeadroomError::BadSize(s.into()))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(HeadroomError::BadSize(s.into())),
    };
    let bytes = n * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(HeadroomError::BadSize(s.into()));
    }
    Ok(bytes as u64)
}

/// `1536 MiB`-style rendering (binary units, one decimal above MiB).
pub fn format_size(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if b == u64::MAX {
        "unlimited".into()
    } else if b as f64 >= GIB {
        format!("{:.1} GiB", b as f64 / GIB)
    } else if b as f64 >= MIB {
        format!("{:.1} MiB", b as f64 / MIB)
    } else {
        format!("{b} B")
    }
}

// ---------------------------------------------------------------------------------------------
// PSI

/// One PSI line: stall percentages over 10/60/300 s and the total stall time (µs).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PsiLine {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    pub total_us: u64,
}

/// `/proc/pressure/memory` (or a cgroup's `memory.pressure`): `some` = at least one task
/// stalled on memory, `full` = all non-idle tasks stalled at once.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Psi {
    pub some: PsiLine,
    pub full: PsiLine,
}

/// Parses PSI text: `some avg10=0.00 avg60=0.00 avg300=0.00 total=0` then the `full` line.
pub fn parse_psi(text: &str) -> HResult<Psi> {
    let mut psi = Psi::default();
    let mut seen_some = false;
    for l in text.lines() {
        let mut it = l.split_whitespace();
        let kind = it.next();
        let mut line = PsiLine::default();
        for kv in it {
            let (k, v) = kv.split_once('=').ok_or_else(|| parse_err("PSI", format!("{kv:?} is not key=value")))?;
            let f = || v.parse::<f64>().map_err(|_| parse_err("PSI", format!("{kv:?}: bad number")));
            match k {
                "avg10" => line.avg10 = f()?,
                "avg60" => line.avg60 = f()?,
                "avg300" => line.avg300 = f()?,
                "total" => line.total_us = v.parse().map_err(|_| parse_err("PSI", format!("{kv:?}: bad number")))?,
                _ => {}
            }
        }
        match kind {
            Some("some") => {
                psi.some = line;
                seen_some = true;
            }
            Some("full") => psi.full = line,
            _ => {}
        }
    }
    if !seen_some {
        return Err(parse_err("PSI", "no `some` line"));
    }
    Ok(psi)
}

impl Psi {
    /// The level from the 10-second averages.
    pub fn level(&self) -> PressureLevel {
        PressureLevel::from_stall_percent(self.some.avg10, self.full.avg10)
    }
}

/// Periodic PSI reads: call [`PsiMonitor::poll`] from a timer (e.g. a tokio interval of 1 s);
/// each call is one small non-blocking read of a procfs file. Besides the 10 s averages it uses
/// the growth of `total` since the previous poll, so a burst is seen within one period instead
/// of after the average catches up.
pub struct PsiMonitor {
    pub path: PathBuf,
    last: Option<(Instant, Psi)>,
}

impl PsiMonitor {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), last: None }
    }

    /// System-wide memory pressure.
    pub fn system() -> Self {
        Self::new("/proc/pressure/memory")
    }

    /// Reads the file and returns the level; see [`PsiMonitor::observe`].
    pub fn poll(&mut self) -> HResult<PressureLevel> {
        let psi = parse_psi(&read_text(&self.path)?)?;
        Ok(self.observe(Instant::now(), psi))
    }

    /// Pure core of `poll`: the worse of the 10 s averages and the stall share since the last
    /// observation.
    pub fn observe(&mut self, now: Instant, psi: Psi) -> PressureLevel {
        let mut level = psi.level();
        if let Some((t, prev)) = self.last {
            let dt = now.duration_since(t).as_micros() as f64;
            if dt > 0.0 {
                let some = psi.some.total_us.saturating_sub(prev.some.total_us) as f64 / dt * 100.0;
                let full = psi.full.total_us.saturating_sub(prev.full.total_us) as f64 / dt * 100.0;
                level = level.max(PressureLevel::from_stall_percent(some, full));
            }
        }
        self.last = Some((now, psi));
        level
    }
}

#[repr(C)]
struct PollFd {
    fd: std::ffi::c_int,
    events: std::ffi::c_short,
    revents: std::ffi::c_short,
}

const POLLPRI: std::ffi::c_short = 0x002;
const POLLERR: std::ffi::c_short = 0x008;

extern "C" {
    // poll(2) from the C library std already links; declared here to avoid a `libc` dependency.
    fn poll(fds: *mut PollFd, nfds: std::ffi::c_ulong, timeout: std::ffi::c_int) -> std::ffi::c_int;
}

/// A PSI trigger (kernel docs: accounting/psi.rst): the kernel wakes the fd when tasks stall
/// more than `stall` within any `window`. For a watcher thread: `loop { if t.wait(..)? { .. } }`.
/// Unprivileged processes may only use windows that are multiples of 2 s; creation fails with
/// `EPERM`/`EINVAL` otherwise or where PSI is off: fall back to [`PsiMonitor`].
pub struct PsiTrigger {
    file: File,
}

impl PsiTrigger {
    /// `kind` is `some` or `full`.
    pub fn new(path: &Path, kind: &str, stall: Duration, window: Duration) -> std::io::Result<Self> {
        let mut file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        let spec = format!("{kind} {} {}\0", stall.as_micros(), window.as_micros());
        file.write_all(spec.as_bytes())?;
        Ok(Self { file })
    }

    /// Blocks until the trigger fires (`Ok(true)`) or `timeout` passes (`Ok(false)`).
    pub fn wait(&self, timeout: Duration) -> std::io::Result<bool> {
        let mut fds = PollFd { fd: self.file.as_raw_fd(), events: POLLPRI, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as std::ffi::c_int;
        // SAFETY: `fds` is one valid, initialised pollfd that outlives the call, and nfds = 1;
        // the fd stays open because `self.file` is borrowed for the duration.
        let r = unsafe { poll(&mut fds, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
        }
        if fds.revents & POLLERR != 0 {
            return Err(std::io::Error::other("PSI trigger fd reported POLLERR (the cgroup or PSI went away)"));
        }
        Ok(r > 0 && fds.revents & POLLPRI != 0)
    }

    /// The current PSI text of the same file (to turn a wake-up into a level).
    pub fn read_psi(&mut self) -> std::io::Result<String> {
        use std::io::Seek;
        let mut s = String::new();
        self.file.seek(std::io::SeekFrom::Start(0))?;
        self.file.read_to_string(&mut s)?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Jetson Orin Nano 8 GB (JetPack 6) with a model server idle: recorded layout.
    pub const MEMINFO_ORIN8: &str = "MemTotal:        7620352 kB\nMemFree:          512340 kB\nMemAvailable:    5123456 kB\nBuffers:           40212 kB\nCached:          4210300 kB\nSwapCached:            0 kB\nSwapTotal:       3810160 kB\nSwapFree:        3810160 kB\nHugePages_Total:       0\n";

    #[test]
    fn meminfo_parses_available_in_bytes() {
        let m = parse_meminfo(MEMINFO_ORIN8).unwrap();
        assert_eq!(m.total, 7620352 * 1024);
        assert_eq!(m.available, 5123456 * 1024);
        assert_eq!(m.swap_free, 3810160 * 1024);
        let old = "MemTotal: 100 kB\nMemFree: 50 kB\n";
        assert!(parse_meminfo(old).unwrap_err().to_string().contains("MemAvailable"));
    }

    #[test]
    fn cgroup_files_parse_and_combine() {
        let proc = "0::/system.slice/fasad.service\n";
        assert_eq!(parse_proc_cgroup(proc).as_deref(), Some("/system.slice/fasad.service"));
        // Hybrid v1 host (this CI machine): v2 line is `0::/`.
        let hybrid = "9:name=systemd:/\n4:memory:/process_api/3c8c\n0::/\n";
        assert_eq!(parse_proc_cgroup(hybrid).as_deref(), Some("/"));
        assert_eq!(parse_proc_cgroup("4:memory:/x\n"), None);
        assert_eq!(parse_memory_max("max\n").unwrap(), None);
        assert_eq!(parse_memory_max("4294967296\n").unwrap(), Some(4 << 30));
        assert!(parse_memory_max("lots").is_err());
        assert_eq!(parse_memory_current("1073741824\n").unwrap(), 1 << 30);
        let stat = "anon 734003200\nfile 268435456\nactive_file 67108864\ninactive_file 201326592\n";
        assert_eq!(parse_memory_stat(stat, "inactive_file"), Some(201326592));
        assert_eq!(parse_memory_stat(stat, "file"), Some(268435456));
        // MemoryMax=4G, 1 GiB charged of which 192 MiB inactive page cache.
        assert_eq!(cgroup_available(Some(4 << 30), 1 << 30, 192 << 20), Some((3 << 30) + (192 << 20)));
        assert_eq!(cgroup_available(Some(1 << 30), 1 << 30, 2 << 30), Some(1 << 30));
        assert_eq!(cgroup_available(None, 1 << 30, 0), None);
    }

    #[test]
    fn cgroup_walks_up_to_the_tightest_limit() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cg");
        let slice = root.join("system.slice");
        let svc = slice.join("fasad.service");
        std::fs::create_dir_all(&svc).unwrap();
        std::fs::write(slice.join("memory.max"), "3221225472\n").unwrap(); // 3 GiB slice
        std::fs::write(slice.join("memory.current"), "2147483648\n").unwrap(); // 2 GiB used
        std::fs::write(svc.join("memory.max"), "max\n").unwrap();
        std::fs::write(svc.join("memory.current"), "536870912\n").unwrap();
        let proc = dir.path().join("cgroup");
        std::fs::write(&proc, "0::/system.slice/fasad.service\n").unwrap();
        let cg = Cgroup { root, proc_cgroup: proc };
        assert_eq!(cg.available().unwrap(), Some(1 << 30));
        assert_eq!(cg.name(), "cgroup:/system.slice/fasad.service");
    }

    #[test]
    fn psi_parses_and_classifies() {
        let idle = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        let busy = "some avg10=14.52 avg60=6.10 avg300=1.31 total=9134534\nfull avg10=1.20 avg60=0.40 avg300=0.10 total=734211\n";
        let thrash = "some avg10=71.02 avg60=40.00 avg300=12.00 total=99134534\nfull avg10=38.11 avg60=20.00 avg300=5.00 total=60734211\n";
        assert_eq!(parse_psi(idle).unwrap().level(), PressureLevel::None);
        let b = parse_psi(busy).unwrap();
        assert_eq!(b.some.total_us, 9134534);
        assert!((b.full.avg10 - 1.20).abs() < 1e-9);
        assert_eq!(b.level(), PressureLevel::Moderate);
        assert_eq!(parse_psi(thrash).unwrap().level(), PressureLevel::Critical);
        // Older kernels print only the `some` line for memory of the root? (cpu does): accept.
        assert_eq!(parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=5\n").unwrap().some.total_us, 5);
        assert!(parse_psi("").is_err());
        assert!(parse_psi("some avg10=x\n").is_err());
    }

    #[test]
    fn psi_monitor_sees_a_burst_before_the_average() {
        let mut m = PsiMonitor::new("/nonexistent");
        let t0 = Instant::now();
        let a = parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=1000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n").unwrap();
        assert_eq!(m.observe(t0, a), PressureLevel::None);
        // 500 ms of `some` stall and 150 ms `full` within one second; avg10 still shows ~0.
        let b = parse_psi("some avg10=0.50 avg60=0.00 avg300=0.00 total=501000\nfull avg10=0.10 avg60=0.00 avg300=0.00 total=150000\n").unwrap();
        assert_eq!(m.observe(t0 + Duration::from_secs(1), b), PressureLevel::Critical);
        assert!(m.poll().is_err());
    }

    #[test]
    fn sources_and_minimum_with_margin() {
        let gpu = GpuMemInfo { mem_get_info: || Some((20u64 << 30, 24u64 << 30)) };
        assert_eq!(gpu.available().unwrap(), Some(20 << 30));
        let none = GpuMemInfo { mem_get_info: || None };
        assert!(matches!(none.available(), Err(HeadroomError::NoGpu)));
        let dir = tempfile::tempdir().unwrap();
        let mi = dir.path().join("meminfo");
        std::fs::write(&mi, MEMINFO_ORIN8).unwrap();
        let min = MinOf { sources: vec![Box::new(MemInfo { path: mi }), Box::new(Fixed(4 << 30))], margin: 512 << 20 };
        assert_eq!(min.available().unwrap(), Some((4 << 30) - (512 << 20)));
        assert!(min.name().starts_with("min(meminfo, fixed 4.0 GiB)"));
        let h = read_headroom(&min, Some(&Fixed(16 << 30)), None).unwrap();
        assert_eq!(h, Headroom { fast_bytes: (4 << 30) - (512 << 20), slow_bytes: 16 << 30, pressure: PressureLevel::None });
        let unl = MinOf { sources: vec![], margin: 1 };
        assert_eq!(unl.available().unwrap(), None);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size(" 2 gb ").unwrap(), 2 << 30);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("1X").is_err());
        assert_eq!(format_size(3 << 29), "1.5 GiB");
    }

    /// Creates a real PSI trigger where the kernel allows it (PSI on, permissions); skipped
    /// otherwise. It must not fire spuriously within 10 ms on an idle machine (or may: only
    /// the call's soundness is checked).
    #[test]
    fn psi_trigger_can_be_polled_where_available() {
        match PsiTrigger::new(Path::new("/proc/pressure/memory"), "some", Duration::from_millis(150), Duration::from_secs(2)) {
            Ok(mut t) => {
                let _fired = t.wait(Duration::from_millis(10)).unwrap();
                assert!(parse_psi(&t.read_psi().unwrap()).is_ok());
            }
            Err(e) => eprintln!("PSI trigger unavailable here ({e}); periodic PsiMonitor is the fallback"),
        }
    }
}
