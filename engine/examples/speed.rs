//! Quick decode/prefill speed probe (dev aid): `cargo run --release --example speed -- [ctx]`.
use std::time::Instant;

use fasa_engine::{paths, LoadOptions, Model};

fn main() {
    let ctx: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(512);
    let mut opts = LoadOptions::new(paths::default_model(), paths::default_ort_library());
    opts.threads = std::env::var("FASA_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut model = Model::load(&opts).unwrap();
    let lease = model.pool().acquire().unwrap();
    let toks: Vec<u32> = (0..ctx as u32).map(|i| 100 + i % 1000).collect();
    let t = Instant::now();
    for (c, chunk) in toks.chunks(512).enumerate() {
        model.forward(chunk, c * 512, lease.slot()).unwrap();
    }
    let pre = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let n: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(64);
    for i in 0..n {
        model.forward(&[200], ctx + i, lease.slot()).unwrap();
    }
    let dec = t.elapsed().as_secs_f64();
    println!("ctx {ctx}: prefill {:.1} tok/s, decode {:.1} tok/s", ctx as f64 / pre, n as f64 / dec);
}
