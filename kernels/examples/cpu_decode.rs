//! Time of the CPU decode-attention stages of the default `fasa` mode, one thread, on random K/V
//! as large as a real cache (so every stage reads from memory, not from the caches):
//! `cargo run --release -p fasa-kernels --example cpu_decode -- [n] [layers] [groups] [heads]`
//! (defaults: SmolLM2 at 8000 tokens: 30 layers, 3 KV groups of 3 query heads, d = 64).
//! Prints µs per step (all layers and groups) for TIP's group mass, the candidate select, the
//! re-rank logits, the final select and focused attention (V only), B = 256, k = 12 of 32 FCs.
use std::time::Instant;

use fasa_kernels::cpu::{attend_scored_rows_group, fc_scores_q8_heads, force_rows, quantize_page_block, row_logits, tip_group_mass, top_b, HeadView, Q8View, QB};

const PAGE: usize = 64;

struct Group {
    k: Vec<Vec<f32>>,
    kr: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    q8: Vec<Vec<i8>>,
    sc: Vec<Vec<f32>>,
}

fn lcg(s: &mut u64) -> f32 {
    *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn group(n: usize, d: usize, seed: u64) -> Group {
    let mut s = seed;
    let pages = n.div_ceil(PAGE);
    let mut rnd = |len: usize| -> Vec<Vec<f32>> { (0..pages).map(|_| (0..len).map(|_| lcg(&mut s)).collect()).collect() };
    let (k, kr, v) = (rnd(d * PAGE), rnd(d * PAGE), rnd(d * PAGE));
    let mut q8 = vec![vec![0i8; d * PAGE]; pages];
    let mut sc = vec![vec![0f32; d / 2 * PAGE / QB]; pages];
    for b in 0..n / QB {
        let (p, i) = (b * QB / PAGE, b * QB % PAGE / QB);
        quantize_page_block(&k[p], PAGE, d / 2, i, &mut q8[p], &mut sc[p]);
    }
    Group { k, kr, v, q8, sc }
}

fn refs(p: &[Vec<f32>]) -> Vec<&[f32]> {
    p.iter().map(|x| &x[..]).collect()
}

fn main() {
    let a: Vec<usize> = std::env::args().skip(1).map(|x| x.parse().expect("a number")).collect();
    let at = |i: usize, def: usize| a.get(i).copied().unwrap_or(def);
    let (n, layers, groups, heads, d) = (at(0, 8000), at(1, 30), at(2, 3), at(3, 3), 64);
    let (b, k) = (256, 12);
    let c = (3 * b / 2).max(n / 16).max(b * n / 8192);
    let gs: Vec<Group> = (0..layers * groups).map(|i| group(n, d, i as u64 + 1)).collect();
    let mut s = 99u64;
    let qs: Vec<Vec<f32>> = (0..heads).map(|_| (0..d).map(|_| lcg(&mut s)).collect()).collect();
    let qr: Vec<&[f32]> = qs.iter().map(|q| &q[..]).collect();
    let fcs: Vec<usize> = (0..k).map(|i| (i * 5) % (d / 2)).collect();
    let scale = 1.0 / (d as f32).sqrt();
    let mut t = [0f64; 6];
    let steps = 8;
    for step in 0..steps + 1 {
        for g in &gs {
            let (kp, krp, vp, sp) = (refs(&g.k), refs(&g.kr), refs(&g.v), refs(&g.sc));
            let qp: Vec<&[i8]> = g.q8.iter().map(|x| &x[..]).collect();
            let view = HeadView { k_pages: &kp, kr_pages: &krp, v_pages: &vp, page: PAGE, n_fc: d / 2, len: n };
            let q8 = Q8View { pages: &qp, scales: &sp, blocks: n / QB, bits: 8 };
            let mut lap = Instant::now();
            let mut tick = |i: usize| {
                if step > 0 {
                    t[i] += lap.elapsed().as_secs_f64();
                }
                lap = Instant::now();
            };
            let mut sc = vec![0f32; n];
            tip_group_mass(&view, Some(&q8), &qr, &fcs, n, scale, &mut sc);
            force_rows(&mut sc, 4, 32);
            tick(0);
            let mut hs = vec![0f32; heads * n];
            fc_scores_q8_heads(&view, &q8, &qr, &fcs, 0..n, &mut hs);
            std::hint::black_box(&hs);
            tick(5);
            let mut cand = Vec::new();
            top_b(&sc, c, &mut cand);
            tick(1);
            let logits = row_logits(&view, &qr, &cand, scale);
            tick(2);
            let mass: Vec<f32> = (0..cand.len()).map(|i| (0..heads).map(|h| logits[h * cand.len() + i]).sum()).collect();
            let mut pick = Vec::new();
            top_b(&mass, b, &mut pick);
            let rows: Vec<u32> = pick.iter().map(|&i| cand[i as usize]).collect();
            let mut kept: Vec<f32> = (0..heads).flat_map(|h| pick.iter().map(move |&i| (h, i))).map(|(h, i)| logits[h * cand.len() + i as usize]).collect();
            tick(3);
            let mut o = vec![0f32; heads * d];
            attend_scored_rows_group(&view, &mut kept, &rows, &mut o);
            tick(4);
            std::hint::black_box(&o);
        }
    }
    let us = |x: f64| x / steps as f64 * 1e6;
    println!("n {n}, {layers} layers × {groups} groups × {heads} heads, C {c}: µs per step, one thread");
    for (name, x) in ["tip_group_mass", "top_b C", "rerank logits", "top_b B", "focused attention", "(TIP again, warm)"].iter().zip(t) {
        println!("{name:>18} {:>9.0}", us(x));
    }
    println!("{:>18} {:>9.0}", "total", us(t[..5].iter().sum()));
}
