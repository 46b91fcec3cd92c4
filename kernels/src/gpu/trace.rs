//! The kernels' stage timeline (benchmarks): with `FASA_GPU_TRACE=1` the module is compiled with
//! `FASA_TRACE`, and thread 0 of every block of the decode chain records when it was launched,
//! when its `griddepcontrol.wait` returned and when it exited (`TraceScope` in common.cuh). This
//! shows where a step's time goes between and inside the kernels of a captured graph, which the
//! graph's total and per-stage graphs cannot.
use super::{tracing, Gpu, GpuError};

/// `TraceTag` in common.cuh.
const TAGS: [&str; 8] = ["?", "tip", "mass", "filter", "refine", "rerank", "fac", "combine"];
const TR_TIP: u64 = 1;
const TR_MASS: u64 = 2;
const TR_FILTER: u64 = 3;
const TR_REFINE: u64 = 4;
const TR_RERANK: u64 = 5;
const TR_FAC: u64 = 6;
/// Marks from `TR_MARK` (16) on, in `TraceTag`'s order.
const MARKS: [&str; 12] = ["setup", "loop", "flush", "thr", "scan", "write", "r.load", "r.pass", "r.write", "f.begin", "f.loop", "f.tail"];
const TR_MARK: u64 = 16;
/// The refine's marks come from a filter block that refines, a refine launch or a re-rank.
const REFINERS: &[u64] = &[TR_FILTER, TR_REFINE, TR_RERANK];
/// Per mark (`MARKS`' order), the kernels whose blocks record it: a mark is filed under the
/// latest launch of one of them. (With select early and FAC early the filter's and FAC's blocks
/// begin before TIP's threshold and the filter's own marks, so the latest launch of any kernel
/// would be the wrong one.)
const MARK_OWNERS: [&[u64]; 12] = [
    &[TR_TIP],
    &[TR_TIP],
    &[TR_TIP, TR_MASS],
    &[TR_TIP, TR_MASS],
    &[TR_FILTER],
    &[TR_FILTER],
    REFINERS,
    REFINERS,
    REFINERS,
    &[TR_FAC],
    &[TR_FAC],
    &[TR_FAC],
];

impl Gpu {
    /// The stage timeline recorded since the last call (`FASA_GPU_TRACE=1` builds; else an
    /// error), cleared: one `[tag, launch, past the wait, exit]` per block of each decode-chain
    /// kernel (`TraceTag` in common.cuh; %globaltimer ns), in completion order.
    pub fn trace_take(&self) -> Result<Vec<[u64; 4]>, GpuError> {
        if !tracing() {
            return Err(GpuError::Shape("no trace: compiled without FASA_GPU_TRACE=1".into()));
        }
        let bad = || GpuError::Shape("trace symbol size".into());
        let mut n = [0u32];
        let mut nv = self.module.get_global("fasa_trace_n", &self.stream)?;
        // SAFETY: the symbol is one u32.
        self.stream.memcpy_dtoh(&unsafe { nv.transmute::<u32>(1) }.ok_or_else(bad)?, &mut n)?;
        let buf = self.module.get_global("fasa_trace", &self.stream)?;
        let n = (n[0] as usize).min(buf.len() / 32);
        let mut raw = vec![0u64; 4 * n];
        if n > 0 {
            // SAFETY: the symbol holds FASA_TRACE_N·4 u64; n ≤ that many entries are read.
            let all = unsafe { buf.transmute::<u64>(buf.len() / 8) }.ok_or_else(bad)?;
            self.stream.memcpy_dtoh(&all.slice(..4 * n), &mut raw)?;
        }
        self.stream.memcpy_htod(&[0u8; 4], &mut nv)?;
        self.stream.synchronize()?;
        Ok(raw.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect())
    }
}

/// One launch seen in a trace: its blocks' earliest launch, earliest and latest wait return,
/// latest exit, and (filter) the window of its selections' refine steps.
#[derive(Clone, Debug)]
struct Launch {
    tag: u64,
    blocks: usize,
    pre: u64,
    post0: u64,
    post1: u64,
    end: u64,
    refine: Option<(u64, u64)>,
    /// Per mark: the blocks' times and values.
    marks: std::collections::BTreeMap<u64, (Vec<u64>, Vec<u64>)>,
}

/// A report of `entries` (from [`Gpu::trace_take`] after replays of a graph of decode steps):
/// per kernel of the step, medians over the steps of its launch, first and last wait return and
/// last exit in µs from the step's first block past its wait, of its marks the blocks' first,
/// median and last time (and the values recorded), and the step's span and period.
/// Entries are split into launches where the kernel changes (in order of wait return: a kernel
/// waits for the one before it); a mark belongs to the latest launch of a kernel that records it
/// (`MARK_OWNERS`; with none yet, to the latest launch), refine entries to the latest filter
/// launch (with FAC early, FAC's blocks start while the refine runs).
pub fn report(entries: &[[u64; 4]]) -> String {
    let mut e = entries.to_vec();
    e.sort_by_key(|x| x[2]);
    let mut launches: Vec<Launch> = Vec::new();
    for x in &e {
        let [tag, pre, post, end] = *x;
        if tag >= TR_MARK {
            // (a mark of no known owner: the latest launch)
            let owners = MARK_OWNERS.get((tag - TR_MARK) as usize).copied().unwrap_or(&[]);
            let i = launches.iter().rposition(|l| owners.contains(&l.tag)).or(launches.len().checked_sub(1));
            if let Some(l) = i.map(|i| &mut launches[i]) {
                let m = l.marks.entry(tag).or_default();
                m.0.push(post);
                m.1.push(end);
            }
            continue;
        }
        if tag == TR_REFINE {
            if let Some(l) = launches.iter_mut().rev().find(|l| l.tag == TR_FILTER) {
                let r = l.refine.get_or_insert((post, end));
                *r = (r.0.min(post), r.1.max(end));
                continue;
            }
        }
        match launches.last_mut() {
            Some(l) if l.tag == tag => {
                l.blocks += 1;
                l.pre = l.pre.min(pre);
                l.post1 = l.post1.max(post);
                l.end = l.end.max(end);
            }
            _ => launches.push(Launch { tag, blocks: 1, pre, post0: post, post1: post, end, refine: None, marks: Default::default() }),
        }
    }
    // A step begins with each launch of the first launch's kernel (TIP, or dense's FAC).
    let first = launches.first().map_or(0, |l| l.tag);
    let mut steps: Vec<Vec<Launch>> = Vec::new();
    for l in launches {
        if l.tag == first || steps.is_empty() {
            steps.push(Vec::new());
        }
        steps.last_mut().unwrap().push(l);
    }
    // Complete steps of the most common kernel sequence, after the first (no step before it).
    let shape = |s: &Vec<Launch>| s.iter().map(|l| l.tag).collect::<Vec<_>>();
    let Some(common) = steps.iter().map(shape).max_by_key(|k| steps.iter().filter(|s| shape(s) == *k).count()) else {
        return "trace: empty".into();
    };
    let idx: Vec<usize> = (1..steps.len()).filter(|&i| shape(&steps[i]) == common).collect();
    if idx.is_empty() {
        return "trace: no complete step".into();
    }
    let med = |mut v: Vec<f64>| -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let rel = |t: u64, base: u64| (t as f64 - base as f64) * 1e-3;
    let mut out = format!("trace ({} steps, µs from the first kernel's first wait return):", idx.len());
    for (p, tag) in common.iter().enumerate() {
        let f = |g: &dyn Fn(&Launch, u64) -> f64| med(idx.iter().map(|&i| g(&steps[i][p], steps[i][0].post0)).collect());
        out += &format!(
            " {}[{}] launch {:.1} wait {:.1}..{:.1} exit {:.1}",
            TAGS.get(*tag as usize).unwrap_or(&"?"),
            steps[idx[0]][p].blocks,
            f(&|l, b| rel(l.pre, b)),
            f(&|l, b| rel(l.post0, b)),
            f(&|l, b| rel(l.post1, b)),
            f(&|l, b| rel(l.end, b)),
        );
        if steps[idx[0]][p].refine.is_some() {
            let g = |k: usize| med(idx.iter().filter_map(|&i| steps[i][p].refine.map(|r| rel([r.0, r.1][k], steps[i][0].post0))).collect());
            out += &format!(" (refine {:.1}..{:.1})", g(0), g(1));
        }
        for (mt, _) in steps[idx[0]][p].marks.iter() {
            let ok: Vec<usize> = idx.iter().copied().filter(|&i| steps[i][p].marks.contains_key(mt)).collect();
            // The blocks' first, median and last time (medians over the steps).
            let g = |k: usize| med(ok.iter().map(|&i| {
                let t = &steps[i][p].marks[mt].0; // sorted: entries were
                rel(t[[0, t.len() / 2, t.len() - 1][k]], steps[i][0].post0)
            }).collect());
            let vals: Vec<f64> = ok.iter().flat_map(|&i| steps[i][p].marks[mt].1.iter().map(|&v| v as f64)).collect();
            let name = MARKS.get((mt - TR_MARK) as usize).unwrap_or(&"?");
            out += &format!(" {name} {:.1}/{:.1}/{:.1}", g(0), g(1), g(2));
            if vals.iter().any(|&v| v != 0.0) {
                out += &format!(" (value median {:.0}, max {:.0})", med(vals.clone()), vals.iter().cloned().fold(0.0, f64::max));
            }
        }
        out += ";";
    }
    let last = common.len() - 1;
    let span = med(idx.iter().map(|&i| rel(steps[i][last].end, steps[i][0].post0)).collect());
    let period = med(idx.iter().map(|&i| rel(steps[i][0].post0, steps[i - 1][0].post0)).collect());
    // The timer's step: the smallest non-zero difference between recorded times.
    let mut t: Vec<u64> = e.iter().filter(|x| x[0] < TR_MARK).flat_map(|x| [x[1], x[2], x[3]]).collect();
    t.sort_unstable();
    let tick = t.windows(2).map(|w| w[1] - w[0]).filter(|&d| d > 0).min().unwrap_or(0);
    out + &format!(" span {span:.1}, period {period:.1} (timer step {tick} ns)")
}

#[cfg(test)]
mod tests {
    use super::report;

    #[test]
    fn report_splits_steps_and_takes_medians() {
        // Two steps of tip (2 blocks) → filter (1 block, refine inside) → fac → combine, 100 µs
        // apart; times in ns. The first step only sets the period's start.
        let mut e = Vec::new();
        for s in 0..3u64 {
            let b = 1_000_000 + s * 100_000;
            e.push([1, b - 2000, b, b + 10_000]);
            e.push([1, b - 2000, b + 500, b + 11_000]);
            e.push([19, b + 12_500, b + 12_500, 0]); // TIP's threshold, after the filter's blocks began
            e.push([20, b + 17_500, b + 17_500, 0]); // the filter's scan, after FAC's blocks began
            e.push([3, b + 11_000, b + 12_000, b + 16_000]);
            e.push([4, b + 14_000, b + 14_000, b + 15_500]);
            e.push([22, b + 14_500, b + 14_500, 600]); // refine's candidates loaded: 600
            e.push([24, b + 17_500, b + 17_500, 0]); // its rows written, after FAC began (FAC early)
            e.push([6, b + 16_000, b + 17_000, b + 25_000]);
            e.push([7, b + 25_000, b + 26_000, b + 28_000]);
        }
        e.reverse(); // entries arrive in exit order; the report sorts them
        let r = report(&e);
        assert!(r.starts_with("trace (2 steps"), "{r}");
        assert!(r.contains("tip[2] launch -2.0 wait 0.0..0.5 exit 11.0 thr 12.5/12.5/12.5;"), "{r}");
        assert!(r.contains("filter[1] launch 11.0 wait 12.0..12.0 exit 16.0 (refine 14.0..15.5) scan 17.5/17.5/17.5 r.load 14.5/14.5/14.5 (value median 600, max 600) r.write 17.5/17.5/17.5;"), "{r}");
        assert!(r.contains("fac[1] launch 16.0 wait 17.0..17.0 exit 25.0;"), "{r}");
        assert!(r.contains("combine[1] launch 25.0 wait 26.0..26.0 exit 28.0;"), "{r}");
        assert!(r.contains("span 28.0, period 100.0 (timer step 500 ns)"), "{r}");
    }
}
