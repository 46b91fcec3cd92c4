//! fasa-bench: `fidelity` (teacher-forced KL/top-1/ppl/recall/mass/bytes and passkey, each
//! attention setting against dense), `calibrate` (write a dominant-FC profile) and `capture`
//! (real K/V and queries of one decode step, for the GPU kernel tests).
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fasa_bench::capture::{self, CaptureOptions, Elem};
use fasa_bench::fidelity::{self, FidelityOptions, Setting};
use fasa_bench::report::{self, RunInfo};
use fasa_engine::calibrate::{self, CalibrateOptions};

#[derive(Parser)]
#[command(name = "fasa-bench", about = "FASA benchmark harnesses")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fidelity of attention settings vs dense: KL, top-1, ppl, recall, mass, bytes, passkey.
    Fidelity {
        /// Context lengths (tokens).
        #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
        context: Vec<usize>,
        /// Token budgets B.
        #[arg(long, value_delimiter = ',', default_value = "256,1024")]
        budget: Vec<usize>,
        /// Settings `MODE[:k=8,pool=16,sinks=4,recent=32,rerank=4x,group=1,dense=1]`, `;`-separated.
        #[arg(long, value_delimiter = ';', default_value = "fasa;fasa-paper;oracle;streaming;quest;random-fc")]
        modes: Vec<String>,
        /// Teacher-forced decode steps per context.
        #[arg(long, default_value_t = 256)]
        eval_tokens: usize,
        /// Evaluation text files (default: licence texts disjoint from the calibration ones).
        #[arg(long)]
        text: Vec<PathBuf>,
        /// Calibration profile (made and saved there when missing).
        #[arg(long, default_value = "bench/fidelity/profile.json")]
        profile: PathBuf,
        /// Passkey prompt lengths; empty to skip.
        #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8192")]
        passkey: Vec<usize>,
        /// Passkey prompts per depth (depths 10/50/90%).
        #[arg(long, default_value_t = 2)]
        keys: usize,
        /// Output folder for the JSON and plots.
        #[arg(long, default_value = "bench/fidelity")]
        out: PathBuf,
        /// JSON file name inside --out.
        #[arg(long, default_value = "results.json")]
        json: String,
        /// Markdown file and the section of it to (re)write.
        #[arg(long, default_value = "bench/FIDELITY.md")]
        md: PathBuf,
        #[arg(long, default_value = "results")]
        section: String,
        #[arg(long)]
        no_plots: bool,
        /// Skip the passkey runs.
        #[arg(long)]
        no_passkey: bool,
        /// CI-sized run: 1k context, T = 32, fasa/oracle/streaming at B = 256 and 1024.
        #[arg(long)]
        quick: bool,
        /// Activations of the weight matmuls (dense and every mode alike): int8 or f32.
        #[arg(long, default_value = "int8")]
        activations: fasa_engine::Activations,
    },
    /// Calibrate the dominant FCs and write the profile.
    Calibrate {
        /// Calibration text files (default: /usr/share/common-licenses Apache-2.0, MPL-2.0).
        #[arg(long)]
        text: Vec<PathBuf>,
        #[arg(long, default_value = "bench/fidelity/profile.json")]
        output: PathBuf,
        /// Tokens used per text.
        #[arg(long, default_value_t = 896)]
        tokens: usize,
        /// Record every n-th decode step.
        #[arg(long, default_value_t = 8)]
        stride: usize,
    },
    /// Write the rotated K, V and queries of one decode step of the real model (format in
    /// bench/src/capture.rs), for kernels/tests/gpu.rs (`FASA_CAPTURED_KV`).
    Capture {
        /// Tokens cached at the captured step.
        #[arg(long, default_value_t = 4096)]
        context: usize,
        #[arg(long, value_delimiter = ',', default_value = "0,10,20,29")]
        layers: Vec<usize>,
        /// Prose to prefill (default: GPL-3 from /usr/share/common-licenses).
        #[arg(long)]
        text: Option<PathBuf>,
        #[arg(long, default_value = "bench/fidelity/profile.json")]
        profile: PathBuf,
        #[arg(long, value_enum, default_value_t = Elem::F16)]
        dtype: Elem,
        #[arg(long, default_value = ".dev/gpu/captured.bin")]
        out: PathBuf,
    },
}

fn read_texts(files: &[PathBuf]) -> Result<Vec<(String, String)>> {
    files.iter().map(|f| Ok((f.display().to_string(), std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?))).collect()
}

fn main() -> Result<()> {
    // As typed in a shell: the engine's experiment switches set (`FASA_EXPERIMENT_*`), then the
    // arguments, those with `;` or spaces quoted.
    let mut switches: Vec<String> = std::env::vars().filter(|(k, _)| k.starts_with("FASA_EXPERIMENT_")).map(|(k, v)| format!("{k}={v}")).collect();
    switches.sort();
    let command = switches.into_iter().chain(std::env::args().map(|a| if a.contains([';', ' ']) { format!("'{a}'") } else { a })).collect::<Vec<_>>().join(" ");
    let t0 = Instant::now();
    match Cli::parse().cmd {
        Cmd::Fidelity { context, budget, modes, eval_tokens, text, profile, passkey, keys, out, json, md, section, no_plots, no_passkey, quick, activations } => {
            let mut opts = if quick { FidelityOptions::quick() } else { FidelityOptions::full() };
            if !quick {
                opts.contexts = context;
                opts.budgets = budget;
                opts.settings = modes.iter().map(|m| Setting::new(m.trim())).collect();
                opts.eval_tokens = eval_tokens;
                opts.passkey.lengths = passkey;
                opts.passkey.keys_per_depth = keys;
            }
            if no_passkey {
                opts.passkey.lengths.clear();
            }
            opts.verbose = true;
            opts.texts = read_texts(&text)?;
            opts.profile = Some(profile);
            for s in &opts.settings {
                s.config(256).map_err(anyhow::Error::msg)?;
            }
            let max = opts.contexts.iter().chain(&opts.passkey.lengths).copied().max().unwrap_or(1024) + 32;
            let mut model = fidelity::load_model(max, activations).context("loading the model (run scripts/setup)")?;
            let res = fidelity::run(&mut model, &opts)?;
            let info = RunInfo::now(command, t0.elapsed().as_secs_f64());
            report::write_all(&res, &info, &out, &json, &md, &section, no_plots)?;
            eprintln!("wrote {} and section {section} of {}", out.join(&json).display(), md.display());
        }
        Cmd::Calibrate { text, output, tokens, stride } => {
            let mut model = fidelity::load_model(tokens + 8, Default::default())?;
            let texts = if text.is_empty() { calibrate::default_calibration_texts() } else { read_texts(&text)? };
            let opts = CalibrateOptions { max_tokens: tokens, stride, ..Default::default() };
            let mut last = -1.0;
            let p = calibrate::calibrate(&mut model, &texts, &opts, &mut |f| {
                if f - last >= 0.1 {
                    last = f;
                    eprintln!("calibrating: {:.0}%", f * 100.0);
                }
            })?;
            p.save(&output)?;
            eprintln!("{} queries per head, ranked at K = {}, in {:.1} s → {}", p.queries, p.ca_k, t0.elapsed().as_secs_f64(), output.display());
        }
        Cmd::Capture { context, layers, text, profile, dtype, out } => {
            let text = text.unwrap_or_else(|| std::path::Path::new(fasa_engine::calibrate::LICENSE_DIR).join("GPL-3"));
            let mut model = fidelity::load_model(context, Default::default())?;
            let opts = CaptureOptions { context, layers, text, profile, dtype };
            let bytes = capture::run(&mut model, &opts, &out)?;
            eprintln!("captured layers {:?} at {context} tokens: {} ({:.1} MiB) in {:.1} s", opts.layers, out.display(), bytes as f64 / (1 << 20) as f64, t0.elapsed().as_secs_f64());
        }
    }
    Ok(())
}
