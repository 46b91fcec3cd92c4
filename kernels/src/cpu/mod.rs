//! CPU kernels: the reference implementation of every FASA op and the fallback when no GPU is present.
//!
//! Layout shared with the engine's cache (pitfall 4 of FASA.md): per (layer, KV head) the cache is
//! a list of pages of `page` tokens. A K page is `(n_fc, page, 2)`: FC plane `f` holds the rotated
//! pair of FC `f` for every token of the page, so scoring with a subset of FCs streams only those
//! planes. A V page is `(page, d)` in the model's dim order. TIP may read int8 copies of the planes
//! instead (`quant`).
/// Defines `pub fn $name(args)` that runs `$body(args)` compiled with AVX2 and FMA (as the
/// `unsafe fn $fast`) where the CPU has both, checked at run time (x86-64's baseline is SSE2),
/// else the portable `$body`. `$body` must be `#[inline(always)]` so each copy is compiled for
/// its own target features.
macro_rules! avx2_dispatch {
    ($(#[$m:meta])* pub fn $name:ident / $fast:ident => $body:ident ($($a:ident: $t:ty),* $(,)?)) => {
        $(#[$m])*
        pub fn $name($($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { $fast($($a),*) };
            }
            $body($($a),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $fast($($a: $t),*) {
            $body($($a),*)
        }
    };
}

pub mod attention;
pub mod prefill;
pub mod quant;
pub mod rope;
pub mod select;

pub use attention::{attend_dense, attend_dense_group, attend_rows, attend_rows_group, attend_scored_rows_group, exp_neg, fc_scores, row_logits, softmax_in_place, tip_group_mass, HeadView};
pub use prefill::attend_causal_group;
pub use quant::{fc_scores_q8, q8_plane_bytes, quantize_page_block, Q8View, QB};
pub use rope::Rope;
pub use select::{add_moments, choose_fcs, choose_fcs_var, force_rows, quest_score, top_b, FcMoments};
