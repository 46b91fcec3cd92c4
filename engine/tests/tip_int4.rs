//! The experiment switch `FASA_EXPERIMENT_TIP=int4` on the real default model: unset, the
//! FASA-C cache's scoring planes are the int8 quantisation of its f32 planes; set, they are the
//! 4-bit one (values in [-7, 7], scale absmax/7 per FC and block of 32 tokens).
//!
//! Its own test binary: the switch is a process-wide variable, read when a pool is built.
use fasa_engine::attention::CachePool;
use fasa_engine::{paths, Activations, AttnConfig, LoadOptions, Model, Prompt};
use fasa_kernels::cpu::{quantize_page_block_bits, QB};

/// Tokens prefilled: three whole quantisation blocks and part of a fourth.
const TOKENS: usize = 3 * QB + 5;

fn load() -> Model {
    let (m, o) = (paths::default_model(), paths::default_ort_library());
    assert!(m.is_file(), "model missing at {}: run scripts/setup", m.display());
    let opts = LoadOptions { max_sequences: 1, max_context: 256, gpu: false, activations: Activations::F32, ..LoadOptions::new(&m, &o) };
    Model::load(&opts).expect("load")
}

/// Prefills `TOKENS` tokens of prose into a slot and checks every (layer, KV head)'s scoring
/// planes against `quantize_page_block_bits(.., bits)` of its f32 planes; returns the largest
/// |value| held.
fn planes_after_prefill(bits: u32) -> i8 {
    let mut model = load();
    let text = "The heron crossed the river at dawn, counting bridges and boats. ".repeat(20);
    let mut tokens = model.encode_prompt(&Prompt::Raw(text)).unwrap();
    assert!(tokens.len() >= TOKENS, "prompt too short: {} tokens", tokens.len());
    tokens.truncate(TOKENS);
    let lease = model.pool().acquire().unwrap();
    model.configure_slot(lease.slot(), &AttnConfig::dense(), false);
    model.forward(&tokens, 0, lease.slot()).unwrap();
    check(model.pool(), lease.slot(), bits)
}

fn check(pool: &CachePool, slot: usize, bits: u32) -> i8 {
    let shape = pool.shape();
    let (n_fc, page) = (shape.head_dim / 2, fasa_engine::attention::PAGE);
    let levels = ((1 << (bits - 1)) - 1) as f32;
    let cache = pool.lock(slot).unwrap();
    let mut largest = 0i8;
    for layer in 0..shape.n_layers {
        for kh in 0..shape.n_kv_heads {
            let pages = cache.pages(layer, kh);
            assert_eq!(pages.q8_bits(), bits);
            let (view, q8) = (pages.view(), pages.q8_view().expect("FASA-C keeps scoring planes"));
            assert_eq!(q8.blocks, TOKENS / QB, "whole blocks quantised");
            for b in 0..q8.blocks {
                let (p, bi) = (b * QB / page, b * QB % page / QB);
                let (mut want, mut want_sc) = (vec![0i8; n_fc * 2 * page], vec![0f32; n_fc * page / QB]);
                quantize_page_block_bits(view.k_pages[p], page, n_fc, bi, &mut want, &mut want_sc, bits);
                for f in 0..n_fc {
                    let sc = q8.scales[p][f * page / QB + bi];
                    assert_eq!(sc, want_sc[f * page / QB + bi], "layer {layer} head {kh} block {b} FC {f}: scale");
                    // absmax/L of the f32 pairs, up to the fp16 rounding they are quantised from.
                    let amax = (0..QB).flat_map(|j| {
                        let o = (f * page + bi * QB + j) * 2;
                        [view.k_pages[p][o].abs(), view.k_pages[p][o + 1].abs()]
                    });
                    let amax = amax.fold(0f32, f32::max);
                    assert!((sc - amax / levels).abs() <= 1e-3 * amax / levels, "layer {layer} head {kh} block {b} FC {f}: scale {sc} vs absmax/{levels} = {}", amax / levels);
                    for plane in [2 * f, 2 * f + 1] {
                        let r = plane * page + bi * QB..plane * page + (bi + 1) * QB;
                        assert_eq!(q8.pages[p][r.clone()], want[r.clone()], "layer {layer} head {kh} block {b} FC {f}: values");
                        largest = q8.pages[p][r].iter().fold(largest, |m, q| m.max(q.saturating_abs()));
                    }
                }
            }
        }
    }
    largest
}

#[test]
fn int4_switch_quantises_the_scoring_planes_on_a_4_bit_grid() {
    assert!(std::env::var("FASA_EXPERIMENT_TIP").is_err(), "run without FASA_EXPERIMENT_TIP set");
    // Unset: the int8 planes (values reach past the int4 grid).
    assert_eq!(planes_after_prefill(8), 127);
    std::env::set_var("FASA_EXPERIMENT_TIP", "int4");
    assert_eq!(planes_after_prefill(4), 7);
}
