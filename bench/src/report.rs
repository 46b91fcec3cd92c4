//! Writes a harness run out: `<out>/<name>.json`, SVG plots of each metric vs budget and vs bytes
//! read (per mode), and a markdown section of bench/FIDELITY.md between
//! `<!-- <section>:begin -->` and `<!-- <section>:end -->` (the rest of the file is kept).
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::fidelity::{Results, Row};
use crate::plot::{Chart, Series};

/// Where and how a run was made: goes at the top of its section and into the JSON.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub command: String,
    pub machine: String,
    /// UTC, `YYYY-MM-DD HH:MM`.
    pub date: String,
    pub seconds: f64,
}

impl RunInfo {
    pub fn now(command: String, seconds: f64) -> Self {
        Self { command, machine: machine(), date: utc_now(), seconds }
    }
}

/// CPU model and core count, from /proc/cpuinfo.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string())).unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{cpu}, {cores} cores ({})", std::env::consts::ARCH)
}

/// The current UTC time as `YYYY-MM-DD HH:MM` (civil-from-days, no date crate).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

/// Knobs of a row in short form: `k/P, sinks+recent, C, group|head, dense layers`.
pub fn knobs(r: &Row) -> String {
    use fasa_engine::Mode;
    // C as it ran at this context (`AttnConfig::for_context`).
    let c = &r.config.clone().for_context(r.context);
    match c.mode {
        Mode::Dense => "—".into(),
        Mode::Oracle => (if c.per_group { "group" } else { "head" }).to_string(),
        Mode::Streaming => format!("{}+{}", c.sinks, c.recent),
        Mode::Quest => format!("pages 16, {}", if c.per_group { "group" } else { "head" }),
        _ => format!(
            "k={} P={} s={} r={}{} {} dl={}",
            c.chunks,
            c.pool,
            c.sinks,
            c.recent,
            if c.rerank > 0 { format!(" C={}", c.rerank) } else { String::new() },
            if c.per_group { "group" } else { "head" },
            c.dense_layers
        ),
    }
}

/// The markdown of one run.
pub fn markdown(res: &Results, info: &RunInfo) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Command: `{}`  ", info.command);
    let _ = writeln!(s, "Machine: {}; {}; {:.0} s  ", info.machine, info.date, info.seconds);
    let _ = writeln!(s, "Model: {} (sha256 {}…); profile: {} queries per head from {}  ", res.model, &res.model_sha256[..12.min(res.model_sha256.len())], res.profile_queries, res.profile_sources.join(", "));
    let _ = writeln!(s, "Eval text: {}; last {} tokens of each context teacher-forced; {} activations in the weight matmuls.\n", res.eval_sources.join(", "), res.eval_tokens, res.activations.as_str());
    let pk: BTreeMap<(usize, usize, String), (usize, usize, usize)> = res.passkey.iter().map(|p| ((p.length, p.budget, p.spec.clone()), (p.hits, p.total, p.dense_hits))).collect();
    let mut contexts: Vec<usize> = res.rows.iter().map(|r| r.context).collect();
    contexts.dedup();
    for ctx in contexts {
        let _ = writeln!(s, "#### context {ctx}\n");
        let _ = writeln!(s, "| B | mode | knobs | KL | top-1 | ppl | recall | mass | bytes | passkey @{ctx} |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
        for r in res.rows.iter().filter(|r| r.context == ctx) {
            let p = pk.get(&(ctx, r.budget, r.spec.clone())).map(|(h, t, _)| format!("{h}/{t}")).unwrap_or_else(|| "—".into());
            let b = if r.spec == "dense" { "—".to_string() } else { r.budget.to_string() };
            let _ = writeln!(
                s,
                "| {b} | {} | {} | {:.4} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {p} |",
                r.spec.split(':').next().unwrap_or(""),
                knobs(r),
                r.kl,
                r.top1,
                r.ppl,
                r.recall,
                r.mass,
                r.bytes_fraction
            );
        }
        s.push('\n');
    }
    if !res.passkey.is_empty() {
        let _ = writeln!(s, "#### passkey (exact match of the 5-digit key; depths 10/50/90%)\n");
        let _ = writeln!(s, "| length | B | setting | hits | dense |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        for p in res.passkey.iter().filter(|p| p.spec != "dense") {
            let _ = writeln!(s, "| {} | {} | `{}` | {}/{} | {}/{} |", p.length, p.budget, p.spec, p.hits, p.total, p.dense_hits, p.total);
        }
        s.push('\n');
    }
    s
}

/// Replaces the text between the `section` markers of `path` (appends it when absent).
pub fn write_section(path: &Path, section: &str, body: &str) -> std::io::Result<()> {
    let (begin, end) = (format!("<!-- {section}:begin -->"), format!("<!-- {section}:end -->"));
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Fidelity of the attention modes\n\n".into());
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(a), Some(b)) if b > a => format!("{}{begin}\n{body}{end}{}", &old[..a], &old[b + end.len()..]),
        _ => format!("{}\n{begin}\n{body}{end}\n", old.trim_end()),
    };
    std::fs::write(path, new)
}

/// One chart per metric against budget and against bytes read; series = setting @ context.
pub fn plots(res: &Results, dir: &Path, prefix: &str) -> std::io::Result<Vec<String>> {
    type Get = fn(&Row) -> f64;
    let metrics: [(&str, &str, Get); 5] = [
        ("kl", "KL(dense‖mode), nats", |r| r.kl),
        ("top1", "top-1 agreement with dense", |r| r.top1),
        ("ppl", "perplexity", |r| r.ppl),
        ("recall", "recall of oracle top-B", |r| r.recall),
        ("mass", "attention mass kept", |r| r.mass),
    ];
    let mut keys: Vec<(String, usize)> = res.rows.iter().filter(|r| r.spec != "dense").map(|r| (r.spec.clone(), r.context)).collect();
    keys.sort();
    keys.dedup();
    let mut files = Vec::new();
    std::fs::create_dir_all(dir)?;
    for (name, label, get) in metrics {
        for (vs, x_label, log_x) in [("budget", "token budget B", true), ("bytes", "K/V bytes read / dense", false)] {
            let series = keys
                .iter()
                .map(|(spec, ctx)| Series {
                    name: format!("{spec} @{ctx}"),
                    points: res.rows.iter().filter(|r| &r.spec == spec && r.context == *ctx).map(|r| (if vs == "budget" { r.budget as f64 } else { r.bytes_fraction }, get(r))).collect(),
                })
                .collect();
            let title = format!("{label} vs {}", if vs == "budget" { "budget" } else { "bytes read" });
            let chart = Chart { title: &title, x_label, y_label: label, log_x, series };
            let file = format!("{prefix}{name}_vs_{vs}.svg");
            std::fs::write(dir.join(&file), chart.to_svg())?;
            files.push(file);
        }
    }
    Ok(files)
}

/// Writes the JSON, the plots (unless `no_plots`) and the markdown section.
pub fn write_all(res: &Results, info: &RunInfo, out: &Path, json_name: &str, md: &Path, section: &str, no_plots: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    #[derive(Serialize)]
    struct Doc<'a> {
        run: &'a RunInfo,
        #[serde(flatten)]
        results: &'a Results,
    }
    let json = serde_json::to_string_pretty(&Doc { run: info, results: res }).map_err(std::io::Error::other)?;
    std::fs::write(out.join(json_name), json)?;
    let mut body = markdown(res, info);
    if !no_plots {
        let files = plots(res, out, "")?;
        let rel = out.strip_prefix(md.parent().unwrap_or(Path::new(""))).unwrap_or(out);
        let _ = writeln!(body, "Plots: {}\n", files.iter().map(|f| format!("[{f}]({}/{f})", rel.display())).collect::<Vec<_>>().join(", "));
    }
    write_section(md, section, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_in_place() {
        let dir = std::env::temp_dir().join(format!("fasa-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("F.md");
        std::fs::write(&p, "# T\n\nkeep me\n").unwrap();
        write_section(&p, "a", "one\n").unwrap();
        write_section(&p, "b", "two\n").unwrap();
        write_section(&p, "a", "three\n").unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains("keep me") && s.contains("three") && s.contains("two") && !s.contains("one"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(utc_now().len(), "2026-01-01 00:00 UTC".len());
    }
}
