//! CPU kernels: the reference implementation of every FASA op and the fallback when no GPU is present.
//!
//! Layout shared with the engine's cache (pitfall 4 of FASA.md): per (layer, KV head) the cache is
//! a list of pages of `page` tokens. A K page is `(n_fc, page, 2)`: FC plane `f` holds the rotated
//! pair of FC `f` for every token of the page, so scoring with a subset of FCs streams only those
//! planes. A V page is `(page, d)` in the model's dim order. TIP may read int8 copies of the planes
//! instead (`quant`).
/// Defines `fn $name(args)` (with the given visibility) that runs `$body(args)` compiled with AVX2 and FMA (as the
/// `unsafe fn $fast`) where the CPU has both, checked at run time (x86-64's baseline is SSE2),
/// else the portable `$body`. `$body` must be `#[inline(always)]` so each copy is compiled for
/// its own target features.
macro_rules! avx2_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident / $fast:ident => $body:ident ($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)?) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { $fast($($a),*) };
            }
            $body($($a),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $fast($($a: $t),*) $(-> $r)? {
            $body($($a),*)
        }
    };
}

/// Asks the CPU to start loading the cache line holding `p` (no effect where the architecture
/// has no hint). The row gathers of stage 2 and the re-rank, and TIP's walk over scattered
/// pages, jump in ways the hardware prefetchers do not follow: without hints every new line
/// waits the whole memory latency (measured with `examples/cpu_decode`).
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above; `prfm` only hints.
    unsafe {
        std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}

/// Prefetches every cache line of `s`.
#[inline(always)]
pub fn prefetch_slice<T>(s: &[T]) {
    let bytes = std::mem::size_of_val(s);
    let p = s.as_ptr() as *const u8;
    for o in (0..bytes).step_by(64) {
        // SAFETY: `o < bytes`: inside `s`.
        prefetch(unsafe { p.add(o) });
    }
}

pub mod attention;
pub mod blockcorr;
pub mod prefill;
pub mod quant;
pub mod rope;
pub mod select;

pub use attention::{attend_dense, attend_dense_group, attend_rows, attend_rows_group, attend_scored_rows_group, exp_neg, fc_scores, row_logits, softmax_in_place, tip_group_mass, tip_mass_merge, tip_mass_part, HeadView, MassPart};
pub use blockcorr::add_block_correction;
pub use prefill::attend_causal_group;
pub use quant::{fc_scores_q8, fc_scores_q8_heads, q8_plane_bytes, q_levels, quantize_block_bits, quantize_page_block, quantize_page_block_bits, Q8View, QB};
pub use rope::Rope;
pub use select::{add_moments, choose_fcs, choose_fcs_var, force_rows, quest_score, top_b, FcMoments};
