// FASA decode-attention kernels: append, TIP (+ score histogram), top-B select (filter + refine),
// re-rank by exact scores, FAC / dense flash-decode (split + combine), and a random fill for
// benchmarks. Launchers: kernels/src/gpu/*.rs. CPU twins: kernels/src/cpu/*.rs.
//
// Buffers (element counts; T = 16-bit storage, f16 or bf16; accumulation in f32):
//   k      (batch, n_kv, l_max/KT, n_grp/r, KT, r·GE)  rotated K in tiles of KT tokens; in a tile,
//          the r = min(KR, n_grp) groups g = r·i .. r·i+r−1 of a token are one run of r·32 bytes,
//          and run i of all its tokens is contiguous (KT·r·32 bytes); FCs in slot order (fc_of_slot)
//   v      (batch, n_kv, l_max, d)          V rows, model dim order
//   q      (batch, n_q, d) f32              rotated queries, FC-pair order (2f, 2f+1 = FC f)
//   fc_of_slot (n_kv, n_fc) i32             FC stored in slot s of a KV head (slot_of_fc: inverse)
//   pool   (2, n_sel, P) i32                calibrated FC pool of each selection, as slots, then the
//                                           FC ids in those slots (fc_of_slot of them, which TIP's
//                                           prologue reads, pool_ent)
//   lens   (batch,) i32                     tokens cached per sequence
//   scores (batch·n_sel, l_max) f32         TIP scores; hist (batch·n_sel, NBIN) u32
//   thr    (batch·n_sel, THR_W) i32         threshold bin and rows above it (TIP's last block), select early's
//                                           flag, FAC over candidates' count and cut
//   sel    (batch·n_sel, budget) u32        selected token rows (unordered)
//   cand   (batch·n_sel, l_max) u64         candidates of the threshold bin (selection keys)
//   mom    (batch, n_kv, n_fc, 5) f64       K moments per FC id [Σx, Σy, Σxx, Σxy, Σyy] over tokens
//          0..mom_len (batch, n_kv) i32      (the variance-based FC choice)
//   kq     (batch, n_kv, l_max/KT, n_grp, KT, GE) i8   int8 scoring planes: tiles of KT tokens,
//          group g of all its tokens contiguous, one byte per element (16 B per token and group;
//          k's layout with r = 1, kq_off); only whole blocks of QB tokens
//   ks     (batch, n_kv, l_max/QB, n_grp, FCG) f32    per block and slot: absmax/127 over the pair
//   q8n    (batch, n_kv) i32                whole blocks quantised (a prefix; tokens from q8n·QB on
//          are scored from k). Arithmetic as cpu::quantize_block, so both hold the same int8 values.
//   xh     (batch·n_sel, hps, l_max) f32    group-mass TIP: scaled per-head FC scores, and
//   xml    (batch·n_sel, tip blocks, hps, 2) their per-block (max, Σexp)
// A "selection" is the set of q heads that share one token set: a KV group (hps = n_q/n_kv) or
// one q head (hps = 1). Workspace invariant: hist, sel_cnt and cand_cnt are zero between steps
// (select_refine zeroes what it used).
#ifndef FASA_NVRTC
#include "common.cuh"
#endif

struct Dims {
    int batch, n_q, n_kv, d, n_fc, n_grp, l_max;
    int hps;     // q heads per selection
    int n_sel;   // selections per sequence (n_q / hps)
    int budget;  // rows kept per selection (B, or C in a re-rank's first stage)
    int pool, k; // FC pool size P and FCs chosen per step k
    int sinks, recent;
    float scale; // softmax scale of FAC (1/sqrt(d))
    int flags;   // EARLY_SELECT | Q4_PLANES | FC_PLANES | MASS_BINS | cap << CANDS_SHIFT
};
// Select early: the TIP launch before the select filter lets it launch at once, its last block per
// selection sets thr's flag word once thr and the scores are written, and the filter's blocks wait
// for their selection's flag instead of the whole TIP launch (its last block clears the flag).
#define EARLY_SELECT 1
// The kernel that builds a selection's histogram and threshold (TIP, or the group-mass stage's
// tip_mass) lets the select filter launch from its start under select early.
__device__ __forceinline__ void select_early_trigger(const Dims& D) {
    if (D.flags & EARLY_SELECT) pdl_trigger();
}
// The scoring planes hold int4 values, two per byte (GpuKvCache::enable_scoring_planes(4)): the
// quantiser writes them (quant_block) and the pipelined TIP kernels read them (tip4p, tip4ph_h*);
// a (sequence, KV head) region is half an int8 one's (kq_region).
#define Q4_PLANES 2
// The int8 scoring planes are stored per FC (GpuKvCache::enable_scoring_planes_as, by_fc): in a
// tile of KT tokens, slot j's pairs of all KT tokens are one run of 2·KT bytes (kqf_off), so a
// TIP that scores k FCs chosen per step from a larger pool reads k runs a tile instead of every
// group of 8 FCs holding one of them. The quantiser writes them (quant_block) and tipfc reads them;
// a region is as large as a grouped int8 one (kq_region).
#define FC_PLANES 4
// FAC over candidates (flags bits 8..15: the most candidates per FAC block, cap ≤ CAND_MAX; 0 =
// off; with FAC early, for fac_impl's register-q kernels only: in facl_h4 its registers spilled):
// the select filter lets FAC launch from its start, so FAC's prologue runs during the filter; FAC
// takes the threshold bin's candidates with the rows above it at flag 1, loads and scores them
// while the refine finds the cut, and masks those below the cut, which the refine publishes
// before writing its rows (thr's cut word). A selection with more than n_split · cap candidates
// takes the refine's rows at flag 2 instead.
#define CANDS_SHIFT 8
#define CAND_MAX 64
__device__ __forceinline__ int cands_cap(const Dims& D) { return min((D.flags >> CANDS_SHIFT) & 0xff, CAND_MAX); }
// thr per selection (i32 words): threshold bin, rows above it, select early's flag, candidates
// (FAC over candidates: the filter blocks' atomicMax of their end positions), the cut (u64,
// words 4–5: bit 63 set once published, bits 0..51 the cut key's, whose top 12 bits are the bin),
// unused.
#define THR_W 8
__device__ __forceinline__ u32* thr_flag(int* thr, int seg) { return (u32*)&thr[THR_W * seg + 2]; }
__device__ __forceinline__ int* thr_cands(int* thr, int seg) { return &thr[THR_W * seg + 3]; }
__device__ __forceinline__ const int* thr_cands(const int* thr, int seg) { return &thr[THR_W * seg + 3]; }
__device__ __forceinline__ u64* thr_cut(int* thr, int seg) { return (u64*)&thr[THR_W * seg + 4]; }
__device__ __forceinline__ const u64* thr_cut(const int* thr, int seg) { return (const u64*)&thr[THR_W * seg + 4]; }
#define CUT_BITS 52 // a selection key's bits below the threshold bin's 12
#define CUT_SET (1ull << 63)
#define CUT_LOW ((1ull << CUT_BITS) - 1)
// Mass bins: the scores are the group-mass stage's, Σ_h softmax ∈ [0, hps ≤ 8] or +∞ (forced rows),
// so the histogram spends its bins on that range: 64 bins an octave over [2^-60, 2^4) (the key's
// bits 17..31 less those of 2^-60), every score below in bin 0 and above in bin NBIN − 1, where
// the default bins (the key's top 12 bits) are 8 an octave over every float. The bin holding the
// B-th mass, and so the refine's candidates, is 8 times narrower (GPU run 37, Llama-3-8B 1 × 32k,
// B = 1024, random K/V: a median of 131 candidates a selection against 988, one radix pass
// against two). Not with FAC over candidates (whose cut takes the bin as the key's top 12 bits):
// that runs with the one-launch stage 1 only.
#define MASS_BINS 8
#define MASS_SHIFT 17
#define MASS_OFF ((0x80000000u | (67u << 23)) >> MASS_SHIFT) // okey(2^-60) >> MASS_SHIFT
__device__ __forceinline__ int score_bin(u32 key, int flags) {
    if (!(flags & MASS_BINS)) return (int)(key >> BIN_SHIFT);
    return min(max((int)(key >> MASS_SHIFT) - (int)MASS_OFF, 0), NBIN - 1);
}
// The selection-key bits (score key << 32 | index) that every key of bin tb shares, as a mask and
// value, and the top bit of the refine's first digit below them: the key's top 12 bits, or with
// mass bins 15 (bits 17..31 of the score's key) unless tb is a clamped end bin, which fixes none.
__device__ __forceinline__ void bin_prefix(int tb, int flags, u64* mask, u64* val, int* top) {
    if (!(flags & MASS_BINS)) {
        *mask = (u64)0xfff << 52; *val = (u64)tb << 52; *top = 51;
    } else if (tb > 0 && tb < NBIN - 1) {
        *mask = (u64)0x7fff << 49; *val = (u64)(tb + MASS_OFF) << 49; *top = 48;
    } else {
        *mask = 0; *val = 0; *top = 63;
    }
}

__device__ __forceinline__ int kv_of_sel(const Dims& D, int s) { return (s * D.hps) / (D.n_q / D.n_kv); }

// Element offsets inside one (sequence, KV head) K region, in two parts that add up: token t's
// (tile t/KT, token t%KT of it), and its 16-byte piece p's (group p/2: run g/r, group g%r of the
// run, half p%2), r = min(KR, n_grp) groups per run. Row readers (FAC, dense) add a lane's fixed
// piece part to each row's token part.
__device__ __forceinline__ size_t k_tok(int t, int n_grp) {
    int r = min(KR, n_grp);
    return (size_t)(t / KT) * n_grp * KT * GE + (size_t)(t % KT) * r * GE;
}
__device__ __forceinline__ int k_piece(int p, int n_grp) {
    int r = min(KR, n_grp), g = p >> 1;
    return (g / r) * KT * r * GE + (g % r) * GE + (p & 1) * 8;
}
// Element offset of (token t ≥ 0, FC group g): k_tok(t) + k_piece(2g), in the grouping the TIP
// kernels were measured with (written through the two parts, ptxas allocates their registers
// differently).
__device__ __forceinline__ size_t k_off(int t, int g, int n_grp) {
    int r = min(KR, n_grp);
    return (size_t)(t / KT) * n_grp * KT * GE + ((size_t)(g / r) * KT + (t % KT)) * r * GE + (g % r) * GE;
}

// Element (byte) offset of (token t, FC group g) in one (sequence, KV head) region of the int8
// planes: one group per run, so TIP reads 16-byte pieces of only the chosen groups.
__device__ __forceinline__ size_t kq_off(int t, int g, int n_grp) {
    return (((size_t)(t / KT) * n_grp + g) * KT + (t % KT)) * GE;
}

// Byte offset of (token t, slot j)'s pair in one (sequence, KV head) region of per-FC int8 planes
// (FC_PLANES): tile t/KT, slot j's run of KT pairs, token t%KT of it.
__device__ __forceinline__ size_t kqf_off(int t, int j, int n_fc) {
    return (((size_t)(t / KT) * n_fc + j) * KT + (t % KT)) * 2;
}

// Byte offset of one (sequence, KV head) region bk of the scoring planes: l_max·d bytes of int8
// values, half that of int4. An int4 (token, group) piece is 8 bytes at kq_off / 2: byte i holds
// slot 8g + i's pair, x in the low nibble and y in the high one (two's complement).
__device__ __forceinline__ size_t kq_region(const Dims& D, size_t bk) {
    return (bk * D.l_max * D.d) >> ((D.flags & Q4_PLANES) ? 1 : 0);
}

// A generic pointer into shared memory as a shared-window address (cp.async, ldmatrix).
__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 a;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// 16-byte asynchronous global → shared copy (sm_80+), completion by group.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    u32 a = smem_u32(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(a), "l"(gmem) : "memory");
}
// 8-byte asynchronous copy (through L1: .cg takes 16 bytes only), in the same groups.
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
    u32 a = smem_u32(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(a), "l"(gmem) : "memory");
}
// 4-byte asynchronous copy (through L1), in the same groups.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
    u32 a = smem_u32(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(a), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Quantises block blk (tokens blk·QB ..) of slot j of one (sequence, KV head): kb its K region,
// qb its scoring-plane region (kq_region), sb its scales (l_max/QB, n_grp, FCG). As
// cpu::quantize_block_bits: scale = absmax/L over both elements of the pair, q = round(v ·
// (L/absmax)), an all-zero block 0; L = 127 (int8), or 7 with Q4_PLANES (int4 nibbles); int8
// pairs at kqf_off with FC_PLANES, else in their group's 16-byte piece.
template <class T>
__device__ void quant_block(const Dims& D, const u16* kb, i8* qb, float* sb, int blk, int j) {
    int g = j / FCG, e = (j % FCG) * 2;
    float amax = 0.f;
    for (int i = 0; i < QB; ++i) {
        const u16* p = kb + k_off(blk * QB + i, g, D.n_grp) + e;
        amax = fmaxf(amax, fmaxf(fabsf(T::load(p[0])), fabsf(T::load(p[1]))));
    }
    bool ok = amax != 0.f && isfinite(amax);
    bool q4 = D.flags & Q4_PLANES;
    float lv = q4 ? 7.f : 127.f;
    float inv = ok ? __fdiv_rn(lv, amax) : 0.f;
    for (int i = 0; i < QB; ++i) {
        size_t o = k_off(blk * QB + i, g, D.n_grp) + e;
        int x = ok ? (int)roundf(__fmul_rn(T::load(kb[o]), inv)) : 0;
        int y = ok ? (int)roundf(__fmul_rn(T::load(kb[o + 1]), inv)) : 0;
        u16 pair = (u16)((x & 0xff) | ((y & 0xff) << 8));
        if (q4) qb[(kq_off(blk * QB + i, g, D.n_grp) >> 1) + (e >> 1)] = (i8)((x & 0xf) | ((y & 0xf) << 4));
        else if (D.flags & FC_PLANES) *(u16*)(qb + kqf_off(blk * QB + i, j, D.n_fc)) = pair;
        else *(u16*)(qb + kq_off(blk * QB + i, g, D.n_grp) + e) = pair;
    }
    sb[(size_t)blk * D.n_fc + j] = amax == 0.f ? 0.f : ok ? __fdiv_rn(amax, lv) : __int_as_float(0x7fc00000);
}

// One K pair's terms added to (or, SUB, taken from) moments m [Σx, Σy, Σxx, Σxy, Σyy], each
// rounded as cpu::add_moments rounds it (no fused multiply-add), so the GPU's sums have its bits.
// m: a mom entry in global memory (append) or a thread's registers (append_rows).
template <bool SUB>
__device__ __forceinline__ void mom_pair(double* m, double x, double y) {
    double t[5] = {x, y, __dmul_rn(x, x), __dmul_rn(x, y), __dmul_rn(y, y)};
#pragma unroll
    for (int i = 0; i < 5; ++i) m[i] = SUB ? __dsub_rn(m[i], t[i]) : __dadd_rn(m[i], t[i]);
}

// ---------------------------------------------------------------------------------------------
// 1. Append: the new token's rotated K (FC order) into its FC-group slots, V into its row, and
// its K pairs into the moments of its (sequence, KV head): mom (batch, n_kv, n_fc, 5) f64
// [Σx, Σy, Σxx, Σxy, Σyy] per FC id over tokens 0..mom_len (batch, n_kv). Appending at
// pos ≥ mom_len adds (a gap is zero K, adding nothing); at pos < mom_len the old pair is
// subtracted first, so the moments always describe the stored tokens 0..mom_len. Terms are
// rounded as cpu::add_moments rounds them (no fused multiply-add) so both sum the same bits.
// With int8 planes (kq != null): a write at p invalidates p's block and every later one, and the
// token that completes a block (p % QB == QB − 1, earlier blocks quantised) quantises it.
// grid (n_kv, batch), block d: thread j < d writes V[j], thread j < n_fc owns FC j's pair (and
// quantises slot j).
template <class T>
__device__ void append_impl(Dims D, u16* k, u16* v, const float* k_new, const float* v_new, const int* pos,
                            const int* slot_of_fc, double* mom, int* mom_len, i8* kq, float* ks, int* q8n) {
    int kvh = blockIdx.x, b = blockIdx.y, j = threadIdx.x;
    int p = pos[b];
    if (p < 0 || p >= D.l_max) return; // uniform over the block
    size_t bk = (size_t)b * D.n_kv + kvh;
    int covered = mom_len[bk];
    int nb = kq ? min(q8n[bk], p / QB) : 0;
    if (j < D.d) v[(bk * D.l_max + p) * D.d + j] = T::store(v_new[bk * D.d + j]);
    if (j < D.n_fc) {
        int f = j;
        int slot = slot_of_fc[kvh * D.n_fc + f];
        u16* kp = k + bk * D.l_max * D.d + k_off(p, slot / FCG, D.n_grp) + (slot % FCG) * 2;
        double* m = mom + (bk * D.n_fc + f) * 5;
        if (p < covered) mom_pair<true>(m, T::load(kp[0]), T::load(kp[1]));
        u16 nx = T::store(k_new[bk * D.d + 2 * f]), ny = T::store(k_new[bk * D.d + 2 * f + 1]);
        kp[0] = nx;
        kp[1] = ny;
        mom_pair<false>(m, T::load(nx), T::load(ny));
    }
    __syncthreads(); // every thread has read mom_len and q8n; the new K pairs are written
    if (j == 0 && p >= covered) mom_len[bk] = p + 1;
    if (kq) {
        if (p % QB == QB - 1 && nb == p / QB) {
            if (j < D.n_fc) quant_block<T>(D, k + bk * D.l_max * D.d, kq + kq_region(D, bk), ks + bk * (D.l_max / QB) * D.n_fc, nb, j);
            ++nb;
        }
        if (j == 0) q8n[bk] = nb;
    }
}

// 1b. Append rows: tokens t0..t0+len of sequence b, every KV head, from (n_kv, len, d) f32 rows
// (K rotated, FC-pair order; V in the model's order) in one launch: what GpuKvCache::write_host
// stores, with the conversion and the tile layout done here instead of on the host (the engine
// mirrors each prefill chunk this way). The moments become the sums over tokens 0..t0+len in
// token order, rounded as cpu::add_moments (so the bits write_host's host sums give): continued
// from the stored ones when they cover exactly 0..t0, else counted again from the stored K below
// t0 first (as the CPU cache recounts after a rollback); mom_len = t0 + len. The int8 planes are
// the caller's to quantise again (quant_blocks with `from`): with planes (q8n set) the blocks
// from t0's on are dropped, and q8from gets the first block to quantise, min(q8n, t0/QB) (the
// blocks below it hold no rewritten row). grid (n_kv, 1 + row blocks), block ≥ n_fc: the
// blocks of y = 0 count the moments (thread j < n_fc: FC j, sequential over tokens), the others
// store the rows' elements (rows ≥ t0, which the count below t0 does not read).
template <class T>
__device__ void append_rows_impl(Dims D, u16* __restrict__ k, u16* __restrict__ v, const float* __restrict__ k_new,
                                 const float* __restrict__ v_new, int b, int t0, int len, const int* slot_of_fc,
                                 double* mom, int* mom_len, int* q8n, int* q8from) {
    int kvh = blockIdx.x;
    size_t bk = (size_t)b * D.n_kv + kvh;
    u16* kb = k + bk * D.l_max * D.d;
    const float* kn = k_new + (size_t)kvh * len * D.d;
    if (blockIdx.y == 0) {
        int f = threadIdx.x;
        int covered = mom_len[bk];
        if (f < D.n_fc) {
            int slot = slot_of_fc[kvh * D.n_fc + f];
            const u16* kp = kb + (slot % FCG) * 2;
            int g = slot / FCG;
            double* mp = mom + (bk * D.n_fc + f) * 5;
            double m[5] = {0., 0., 0., 0., 0.};
            if (covered == t0) {
                for (int i = 0; i < 5; ++i) m[i] = mp[i];
            }
            auto add = [&](double x, double y) { mom_pair<false>(m, x, y); };
            if (covered != t0) {
                for (int t = 0; t < t0; ++t) {
                    const u16* p = kp + k_off(t, g, D.n_grp);
                    add(T::load(p[0]), T::load(p[1]));
                }
            }
            // (loads of 8 tokens issued before their adds: the adds are the only chain)
            int t = 0;
            for (; t + 8 <= len; t += 8) {
                float2 r[8];
#pragma unroll
                for (int u = 0; u < 8; ++u) r[u] = *(const float2*)(kn + (size_t)(t + u) * D.d + 2 * f);
#pragma unroll
                for (int u = 0; u < 8; ++u) add(T::load(T::store(r[u].x)), T::load(T::store(r[u].y)));
            }
            for (; t < len; ++t) {
                float2 r = *(const float2*)(kn + (size_t)t * D.d + 2 * f);
                add(T::load(T::store(r.x)), T::load(T::store(r.y)));
            }
            for (int i = 0; i < 5; ++i) mp[i] = m[i];
        }
        __syncthreads(); // every thread has read mom_len
        if (threadIdx.x == 0) {
            mom_len[bk] = t0 + len;
            if (q8n) {
                int f = min(q8n[bk], t0 / QB);
                q8n[bk] = f;
                q8from[bk] = f;
            }
        }
        return;
    }
    const float* vn = v_new + (size_t)kvh * len * D.d;
    u16* vb = v + (bk * D.l_max + t0) * D.d;
    int nb = gridDim.y - 1;
    for (int i = (blockIdx.y - 1) * blockDim.x + threadIdx.x; i < len * D.d; i += nb * blockDim.x) {
        int t = i / D.d, j = i % D.d;
        vb[i] = T::store(vn[i]);
        int slot = slot_of_fc[kvh * D.n_fc + (j >> 1)];
        kb[k_off(t0 + t, slot / FCG, D.n_grp) + (slot % FCG) * 2 + (j & 1)] = T::store(kn[i]);
    }
}

// Quantises every whole block below the length of (sequence b0 + blockIdx.z, KV head kv0 +
// blockIdx.y): lens (batch, n_kv) (the cache's mom_len), or len where lens is null; one block of
// QB tokens per thread block; sets q8n to their count. With `from` (batch, n_kv) (append_rows's
// q8from; not q8n, which block 0 writes while others would read it) the blocks below from[bk]
// are kept as they are. grid (≥ blocks, KV heads, sequences), block n_fc (thread j: slot j).
template <class T>
__device__ void quant_blocks_impl(Dims D, const u16* k, i8* kq, float* ks, int* q8n, int b0, int kv0, const int* lens, int len,
                                  const int* from) {
    int blk = blockIdx.x, kvh = kv0 + blockIdx.y, b = b0 + blockIdx.z, j = threadIdx.x;
    size_t bk = (size_t)b * D.n_kv + kvh;
    int n = min(lens ? lens[bk] : len, D.l_max) / QB;
    if (blk == 0 && j == 0) q8n[bk] = n;
    if (blk >= n || j >= D.n_fc || (from && blk < from[bk])) return;
    quant_block<T>(D, k + bk * D.l_max * D.d, kq + kq_region(D, bk), ks + bk * (D.l_max / QB) * D.n_fc, blk, j);
}

// ---------------------------------------------------------------------------------------------
// 2. TIP: s_t = Σ_{f chosen} (Σ_h q_{h,f}) · k_{t,f} over the chosen FCs only, forced rows +∞,
// plus a histogram of the scores' top key bits for the selection. The k FCs are chosen per block
// from the pool (ties → earlier in the pool): by Σ_h ‖q_{h,f}‖ exactly as cpu::choose_fcs, or,
// with moments (mom != null), by w_f = Σ_h q_{h,f}ᵀ Cov_f q_{h,f} exactly as cpu::choose_fcs_var
// (the same f64 operations in the same order, so the same FCs).
// grid (ceil(l_max/(TIP_TOK·nchunk)), n_sel, batch), block TIP_THREADS.
//
// Group-mass variant (tip_heads + tip_mass, for selections of several q heads): the score is
// Σ_h softmax_t(scale·ŝ_h(t)) over the sequence's tokens (cpu::tip_group_mass), which needs each
// head's max and Σexp over all tokens before any token's score is known. tip_heads streams the
// chosen FC groups once (as TIP) and writes the scaled per-head scores x_h(t) = scale·ŝ_h(t)
// (hps·4 bytes a token against ≥ 32 bytes of K read; L2-resident at moderate sizes) and per
// block, per head an online-softmax partial (max, Σexp); tip_mass merges the partials, turns the
// x_h into Σ_h exp(x_h − M_h)/Z_h, forces rows, and builds the histogram (and threshold).
#define TIP_THREADS 256
#define TIP_TPT 4 // tokens per thread, loads in flight together
#define TIP_TOK (TIP_THREADS * TIP_TPT)
__device__ void find_threshold(const u32* hg, int B, int* tb_out, int* above_out);
__device__ bool last_block(u32* done, int seg, int n);

// Pool entry tid of selection s (tid < P): its slot and the FC id in it, both from pool (the
// decoder writes the FC ids as its second half), so a TIP kernel loads them with lens at its start
// and its FC choice waits for one round trip less than through fc_of_slot[slot] (so the TIP
// kernels no longer take fc_of_slot). GPU run 31 (same call, two rounds,
// a2733ec's kernels / these, per-FC TIP at 8 tokens a thread in both): default int8 step 1 × 32k
// 48.6 → 47.9 µs, 1 × 128k 68.9 → 68.4, 16 × 32k 194.9 → 194.1, 16 × 128k 614.6 → 611.4.
struct PoolEnt {
    int slot, fc; // (−1, −1) for threads past the pool
};
__device__ __forceinline__ PoolEnt pool_ent(const Dims& D, const int* pool, int s) {
    int tid = threadIdx.x;
    if (tid >= D.pool) return PoolEnt{-1, -1};
    return PoolEnt{pool[s * D.pool + tid], pool[(D.n_sel + s) * D.pool + tid]};
}

// Block-wide: marks the k FCs chosen from selection s's pool (chosen_s[i] for pool entry i, pe the
// thread's) and returns the mask of the FC groups (slot / FCG) holding them. qb: the selection's
// q heads.
__device__ u32 choose_pool(const Dims& D, const float* qb, PoolEnt pe, const double* mom_bk, int len, bool* chosen_s) {
    __shared__ double w[64];
    __shared__ u32 gmask_s;
    int tid = threadIdx.x;
    if (tid == 0) gmask_s = 0;
    if (tid < D.pool) {
        int f = pe.fc;
        double wi = 0.0;
        if (mom_bk) {
            // cpu::choose_fcs_var, operation for operation.
            const double* m = mom_bk + (size_t)f * 5;
            double nf = (double)max(len, 1);
            double mx = __ddiv_rn(m[0], nf), my = __ddiv_rn(m[1], nf);
            double cxx = __dsub_rn(__ddiv_rn(m[2], nf), __dmul_rn(mx, mx));
            double cxy = __dsub_rn(__ddiv_rn(m[3], nf), __dmul_rn(mx, my));
            double cyy = __dsub_rn(__ddiv_rn(m[4], nf), __dmul_rn(my, my));
            for (int h = 0; h < D.hps; ++h) {
                double a = qb[h * D.d + 2 * f], c = qb[h * D.d + 2 * f + 1];
                double t = __dadd_rn(__dadd_rn(__dmul_rn(__dmul_rn(a, a), cxx), __dmul_rn(__dmul_rn(__dmul_rn(2.0, a), c), cxy)),
                                     __dmul_rn(__dmul_rn(c, c), cyy));
                wi = __dadd_rn(wi, t);
            }
        } else {
            float wf = 0.f;
            for (int h = 0; h < D.hps; ++h) {
                float a = qb[h * D.d + 2 * f], c = qb[h * D.d + 2 * f + 1];
                wf = __fadd_rn(wf, __fsqrt_rn(__fadd_rn(__fmul_rn(a, a), __fmul_rn(c, c))));
            }
            wi = wf; // exact: the order of f32 values is kept
        }
        w[tid] = wi;
    }
    __syncthreads();
    if (tid < D.pool) {
        bool chosen = true;
        if (D.pool > D.k) {
            int rank = 0;
            for (int j = 0; j < D.pool; ++j) rank += (w[j] > w[tid] || (w[j] == w[tid] && j < tid));
            chosen = rank < D.k;
        }
        chosen_s[tid] = chosen;
        if (chosen) atomicOr(&gmask_s, 1u << (pe.slot / FCG));
    }
    __syncthreads();
    return gmask_s;
}

// Adds the block's histogram into the selection's, and in the selection's last block (of
// nblk, counter done) finds the threshold bin for D.budget into thr (when len > budget) and,
// select early, sets thr's flag word (the selection's scores and thr are written).
__device__ void flush_hist(const Dims& D, const u32* sh_hist, u32* hist, int seg, int len, u32* done, int* thr, int nblk) {
    __syncthreads();
    u32* hg = hist + (size_t)seg * NBIN;
    for (int i = threadIdx.x; i < NBIN; i += blockDim.x)
        if (sh_hist[i]) atomicAdd(&hg[i], sh_hist[i]);
    trace_mark(M_TIP_FLUSH);
    // The selection's last block finds the threshold bin once (thr[seg] = (tb, above)), so the
    // filter blocks and the refine step need not scan the histogram each.
    bool last = done && last_block(done, seg, nblk);
    if (last && len > D.budget) {
        __shared__ int tb, above;
        find_threshold(hg, D.budget, &tb, &above);
        // (word 3: FAC over candidates' count, raised by the filter blocks from 0)
        if (threadIdx.x == 0) { thr[THR_W * seg] = tb; thr[THR_W * seg + 1] = above; *thr_cands(thr, seg) = 0; }
        trace_mark(M_TIP_THR);
    }
    if (last && (D.flags & EARLY_SELECT)) ready_publish(thr_flag(thr, seg), 1);
}

// Where TIP reads one (sequence, KV head)'s K: the 16-bit groups, and with int8 planes (kq set)
// their int8 copy and scales for tokens below qlen (whole quantised blocks), k after them.
struct TipSrc {
    const u16* k;
    const i8* kq;
    const float* ks;
    int qlen;
};

__device__ __forceinline__ TipSrc tip_src(const Dims& D, const u16* k, const i8* kq, const float* ks, const int* q8n, int b, int kvh, int len) {
    size_t bk = (size_t)b * D.n_kv + kvh;
    TipSrc S;
    S.k = k + bk * D.l_max * D.d;
    S.kq = kq ? kq + kq_region(D, bk) : nullptr;
    S.ks = kq ? ks + bk * (D.l_max / QB) * D.n_fc : nullptr;
    S.qlen = kq ? min(q8n[bk], len / QB) * QB : 0;
    return S;
}

// TIP's chunk loop, shared by tip (NQ = 1: the heads' summed q) and tip_heads (NQ = H heads, nq
// of them used): acc[j][h] += Σ_{chosen groups g} qv[h][g]·k_{t,g} for the thread's tokens
// t = tc + j·TIP_THREADS + tid. qv: (NQ, MAXG·GE) in shared memory, slot order, zero outside the
// chosen FCs. Half a group (8 elements) of every token at a time: each q element is read from
// shared memory once for TIP_TPT tokens. (Unpacking per head instead, to hold fewer registers, and
// a variant squeezed to 3 blocks/SM were both slower: GPU run of the group-mass stage 1, 345 → 371
// µs TIP at 32k, batch 16, Llama shapes.)
// N tokens' half-groups f into acc[j0 .. j0 + N) (the pipelined TIP passes a unit of JU tokens).
// cm (block-uniform; bit p: FC pair p of the half) leaves out pairs whose q is 0 in every head:
// their products add exactly nothing (an accumulator that starts at +0 is never −0), so the sums
// are the same bit for bit in fewer instructions (tip8p_impl's MODE 0, q_slots_mask).
template <int NQ, int N = TIP_TPT>
__device__ __forceinline__ void tip_fma(const float (*qv)[MAXG * GE], int nq, int g, int half, const float (&f)[N][8],
                                        float (&acc)[TIP_TPT][NQ], int j0 = 0, u32 cm = 0xfu) {
#pragma unroll
    for (int h = 0; h < NQ; ++h) {
        if (h < nq) {
            const float4* q4 = (const float4*)&qv[h][g * GE + half * 8];
            float4 a = q4[0], c = q4[1];
            float qe[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
#pragma unroll
            for (int e = 0; e < 8; ++e)
                if (cm & (1u << (e >> 1)))
#pragma unroll
                    for (int j = 0; j < N; ++j) acc[j0 + j][h] += qe[e] * f[j][e];
        }
    }
}

#ifndef TIP_PAIRS
#define TIP_PAIRS 1
#endif
// Block-wide, after qv is complete (a barrier after its writes): bit s of the result set when
// slot s has a nonzero q element in some head (the FC pairs tip_fma must add).
template <int NQ>
__device__ u64 q_slots_mask(const float (*qv)[MAXG * GE], int nq, int n_fc) {
    __shared__ u32 words[2];
    int tid = threadIdx.x;
    if (tid < 64) {
        bool nz = false;
        if (tid < n_fc)
#pragma unroll
            for (int h = 0; h < NQ; ++h)
                if (h < nq) nz |= qv[h][2 * tid] != 0.f || qv[h][2 * tid + 1] != 0.f;
        u32 b = __ballot_sync(0xffffffffu, nz);
        if ((tid & 31) == 0) words[tid >> 5] = b;
    }
    __syncthreads();
    return ((u64)words[1] << 32) | words[0];
}

// Block-wide, after qv is complete: the slots with a nonzero q element in some head
// (q_slots_mask), ascending, into sl (visible after its barrier); returns their count.
template <int NQ>
__device__ int slots_list(const float (*qv)[MAXG * GE], int nq, int n_fc, int* sl) {
    u64 qmask = q_slots_mask<NQ>(qv, nq, n_fc); // (its barrier orders qv's writes)
    int tid = threadIdx.x;
    if (tid < 64 && ((qmask >> tid) & 1)) sl[__popcll(qmask & ((1ull << tid) - 1))] = tid;
    __syncthreads();
    return __popcll(qmask);
}
// Its 4 bits for half `half` of FC group g (tip_fma's cm).
__device__ __forceinline__ u32 half_pairs(u64 qmask, int g, int half) { return (u32)(qmask >> (g * FCG + half * 4)) & 0xfu; }

// From the 16-bit groups, tokens lo ≤ t < hi.
template <class T, int NQ>
__device__ __forceinline__ void tip_pass16(const Dims& D, const u16* kb, u32 gmask, const float (*qv)[MAXG * GE], int nq, int tc, int lo,
                                           int hi, float (&acc)[TIP_TPT][NQ]) {
    int tid = threadIdx.x;
    for (u32 gm = gmask; gm; gm &= gm - 1) {
        int g = __ffs(gm) - 1;
        uint4 raw[TIP_TPT][2];
#pragma unroll
        for (int j = 0; j < TIP_TPT; ++j) {
            int t = tc + j * TIP_THREADS + tid;
            raw[j][0] = raw[j][1] = make_uint4(0, 0, 0, 0);
            if (t >= lo && t < hi) {
                const uint4* p = (const uint4*)(kb + k_off(t, g, D.n_grp));
                raw[j][0] = p[0];
                raw[j][1] = p[1];
            }
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float f[TIP_TPT][8];
#pragma unroll
            for (int j = 0; j < TIP_TPT; ++j) unpack8<T>(raw[j][half], f[j]);
            tip_fma<NQ>(qv, nq, g, half, f, acc);
        }
    }
}

// From the int8 planes, tokens t < hi (a multiple of QB: a warp's 32 tokens are one block). GP
// chosen groups per iteration, loaded together: 16 B per token and group is half of K's 32, and
// one group's loads alone left too few bytes in flight (GPU run 10: int8 group-mass TIP no faster
// than fp16 at 2 blocks/SM); GP = 2 costs registers (8 heads: 1, or it spills). Lane l loads the scale of FC l % 8 of the group (4 B, not 32) and
// the warp passes it round by shuffle; each element is dequantised once (q · scale) for all
// heads. cpu::fc_scores_q8 folds the scale into q instead: the same value up to rounding.
template <int NQ, int GP>
__device__ __forceinline__ void tip_pass8(const Dims& D, const TipSrc& S, u32 gmask, const float (*qv)[MAXG * GE], int nq, int tc, int hi,
                                          float (&acc)[TIP_TPT][NQ], u64 qmask) {
    int tid = threadIdx.x;
    for (u32 gm = gmask; gm;) {
        int gs[GP];
#pragma unroll
        for (int u = 0; u < GP; ++u) {
            gs[u] = gm ? __ffs(gm) - 1 : -1;
            gm &= gm - 1; // (no-op when empty)
        }
        uint4 raw[GP][TIP_TPT];
        float sl[GP][TIP_TPT];
#pragma unroll
        for (int u = 0; u < GP; ++u)
#pragma unroll
            for (int j = 0; j < TIP_TPT; ++j) {
                int t = tc + j * TIP_THREADS + tid;
                raw[u][j] = make_uint4(0, 0, 0, 0);
                sl[u][j] = 0.f;
                if (t < hi && gs[u] >= 0) {
                    raw[u][j] = *(const uint4*)(S.kq + kq_off(t, gs[u], D.n_grp));
                    sl[u][j] = S.ks[(size_t)(t / QB) * D.n_fc + gs[u] * FCG + (tid & 7)];
                }
            }
#pragma unroll
        for (int u = 0; u < GP; ++u) {
            if (gs[u] < 0) break; // uniform over the block
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                u32 cm = half_pairs(qmask, gs[u], half); // (block-uniform: tip_fma)
                if (cm == 0) continue;
                float f[TIP_TPT][8];
#pragma unroll
                for (int j = 0; j < TIP_TPT; ++j) {
                    unpack8_i8(half ? raw[u][j].z : raw[u][j].x, half ? raw[u][j].w : raw[u][j].y, f[j]);
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (cm & (1u << e)) {
                            float sc = __shfl_sync(0xffffffffu, sl[u][j], half * 4 + e);
                            f[j][2 * e] = __fmul_rn(f[j][2 * e], sc);
                            f[j][2 * e + 1] = __fmul_rn(f[j][2 * e + 1], sc);
                        }
                }
                tip_fma<NQ>(qv, nq, gs[u], half, f, acc, 0, cm);
            }
        }
    }
}

// A thread's per-token, per-head TIP accumulators zeroed (TIP kernels start each chunk or step
// from +0, which tip_fma's left-out pairs rely on), and an empty per-head online-softmax state
// (−∞, 0) for the group-mass TIP kernels.
template <int N, int H>
__device__ __forceinline__ void zero_acc(float (&acc)[N][H]) {
#pragma unroll
    for (int j = 0; j < N; ++j)
#pragma unroll
        for (int h = 0; h < H; ++h) acc[j][h] = 0.f;
}
template <int H>
__device__ __forceinline__ void ml_init(float (&m)[H], float (&s)[H]) {
#pragma unroll
    for (int h = 0; h < H; ++h) { m[h] = NEG_INF; s[h] = 0.f; }
}

// One chunk of TIP_TOK tokens from tc (< len): int8 planes for whole quantised blocks, the
// 16-bit groups after them (only the chunk holding the tail pays that pass), or 16-bit only.
template <class T, int NQ, bool Q8>
// qmask: the slots whose FC pairs the int8 pass sums (q_slots_mask; ~0: all).
__device__ __forceinline__ void tip_chunk(const Dims& D, const TipSrc& S, u32 gmask, const float (*qv)[MAXG * GE], int nq, int tc, int len,
                                          float (&acc)[TIP_TPT][NQ], u64 qmask = ~0ull) {
    zero_acc(acc);
    if (Q8) {
        int qlen = min(S.qlen, len);
        if (tc < qlen) tip_pass8<NQ, NQ == 8 ? 1 : 2>(D, S, gmask, qv, nq, tc, qlen, acc, qmask);
        if (tc + TIP_TOK > qlen) tip_pass16<T, NQ>(D, S.k, gmask, qv, nq, tc, qlen, len, acc);
    } else {
        tip_pass16<T, NQ>(D, S.k, gmask, qv, nq, tc, 0, len, acc);
    }
}

// q of one chosen FC into qv (NQ × MAXG·GE, slot order) at its pool slot, from qh(h), the FC's
// pair of head h: the heads' sum in head order (NQ = 1, as the CPU) or each head's.
template <int NQ, class Q>
__device__ __forceinline__ void put_slot_q(const Dims& D, float (*qv)[MAXG * GE], int slot, Q qh) {
    if constexpr (NQ == 1) {
        float a = 0.f, c = 0.f;
#pragma unroll
        for (int h = 0; h < MAXH; ++h)
            if (h < D.hps) {
                float2 x = qh(h);
                a += x.x;
                c += x.y;
            }
        qv[0][2 * slot] = a;
        qv[0][2 * slot + 1] = c;
    } else {
#pragma unroll
        for (int h = 0; h < NQ; ++h)
            if (h < D.hps) {
                float2 x = qh(h);
                qv[h][2 * slot] = x.x;
                qv[h][2 * slot + 1] = x.y;
            }
    }
}

// Prologue of the TIP kernels, block-wide: chooses the k FCs of selection s's pool and writes the
// q of the chosen FCs into qv (NQ × MAXG·GE floats, slot order, zero elsewhere; visible after the
// caller's next barrier): with NQ = 1 the heads' sum (tip_impl, tip8p_impl), else each head's
// (tip_heads_impl, tip8p_impl with NQ > 1). Returns the mask of the FC groups holding them.
// pe: the thread's pool entry (pool_ent).
template <int NQ>
__device__ u32 tip_setup(const Dims& D, const float* q, PoolEnt pe, const double* mom, int b, int s, int len, float (*qv)[MAXG * GE]) {
    __shared__ bool chosen[64];
    int tid = threadIdx.x, h0 = s * D.hps, kvh = kv_of_sel(D, s);
    for (int i = tid; i < NQ * MAXG * GE; i += blockDim.x) (&qv[0][0])[i] = 0.f;
    const float* qb = q + ((size_t)b * D.n_q + h0) * D.d;
    const double* mom_bk = mom ? mom + ((size_t)b * D.n_kv + kvh) * D.n_fc * 5 : nullptr;
    u32 gmask = choose_pool(D, qb, pe, mom_bk, len, chosen); // (its barriers order the zeroing)
    if (tid < D.pool && chosen[tid]) {
        int f = pe.fc;
        put_slot_q<NQ>(D, qv, pe.slot, [&](int h) { return make_float2(qb[h * D.d + 2 * f], qb[h * D.d + 2 * f + 1]); });
    }
    return gmask;
}

// The FC groups holding a selection's whole pool (block-wide; slot: the thread's pool slot, or
// −1): tip_setup's mask when every pool FC is chosen (P ≤ k).
__device__ u32 pool_groups(int slot) {
    __shared__ u32 gm;
    if (threadIdx.x == 0) gm = 0;
    __syncthreads();
    if (slot >= 0) atomicOr(&gm, 1u << (slot / FCG));
    __syncthreads();
    return gm;
}

// The summed-score TIP kernels' output for the thread's tokens tc + j·TIP_THREADS + tid of one
// chunk: sink and recent rows forced to +∞, the score into sc, its bin into the block histogram.
__device__ __forceinline__ void tip_store(const Dims& D, const float (&acc)[TIP_TPT][1], int tc, int len, float* sc, u32* sh_hist) {
#pragma unroll
    for (int j = 0; j < TIP_TPT; ++j) {
        int t = tc + j * TIP_THREADS + threadIdx.x;
        if (t < len) {
            float a = acc[j][0];
            if (t < D.sinks || t >= len - D.recent) a = POS_INF;
            sc[t] = a;
            atomicAdd(&sh_hist[okey(a) >> BIN_SHIFT], 1u);
        }
    }
}

template <class T, bool Q8>
__device__ void tip_impl(Dims D, const u16* k, const i8* kq, const float* ks, const int* q8n, const float* q,
                         const int* pool, const double* mom, const int* lens, float* scores, u32* hist, u32* done, int* thr, int nchunk) {
    PDL_BEGIN(TR_TIP);
    select_early_trigger(D);
    __shared__ u32 sh_hist[NBIN];
    __shared__ __align__(16) float qeff[1][MAXG * GE];
    int s = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    PoolEnt pe = pool_ent(D, pool, s);
    int len = lens[b];
    int t0 = blockIdx.x * TIP_TOK * nchunk;
    if (t0 >= len) return;
    int kvh = kv_of_sel(D, s);
    for (int i = tid; i < NBIN; i += blockDim.x) sh_hist[i] = 0;
    u32 gmask = tip_setup<1>(D, q, pe, mom, b, s, len, qeff);
    __syncthreads();
    TipSrc S = tip_src(D, k, kq, ks, q8n, b, kvh, len);
    int seg = b * D.n_sel + s;
    float* sc = scores + (size_t)seg * D.l_max;
    // nchunk chunks of TIP_TOK tokens per block: the prologue above (pool, q, FC choice) and the
    // histogram flush below are paid once per nchunk·TIP_TOK tokens.
    for (int ch = 0; ch < nchunk; ++ch) {
        int tc = t0 + ch * TIP_TOK;
        if (tc >= len) break;
        float acc[TIP_TPT][1];
        tip_chunk<T, 1, Q8>(D, S, gmask, qeff, 1, tc, len, acc);
        tip_store(D, acc, tc, len, sc, sh_hist);
    }
    flush_hist(D, sh_hist, hist, seg, len, done, thr, (len + TIP_TOK * nchunk - 1) / (TIP_TOK * nchunk));
}

// Online-softmax state (max m, Σexp(x − m) s) merge; an empty side is (−∞, 0).
__device__ __forceinline__ void ml_merge(float& m, float& s, float m2, float s2) {
    float mn = fmaxf(m, m2);
    if (mn == NEG_INF) return;
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}

// One token t's output of head h: x = scale·ŝ (as the CPU: ŝ, then · scale) into xs (hps, l_max)
// and into the online-softmax state (m, s) of the thread and head.
__device__ __forceinline__ void head_put(const Dims& D, float acc, float* xs, int h, int t, float& m, float& s) {
    float x = __fmul_rn(D.scale, acc);
    xs[(size_t)h * D.l_max + t] = x;
    if (x > m) { s = s * expf(m - x) + 1.f; m = x; }
    else s += expf(x - m);
}

// The per-head TIP kernels' output for the thread's tokens tc + j·TIP_THREADS + tid of one chunk
// (head_put per head).
template <int H>
__device__ __forceinline__ void heads_store(const Dims& D, const float (&acc)[TIP_TPT][H], int tc, int len, float* xs, float (&ml_m)[H],
                                            float (&ml_s)[H]) {
#pragma unroll
    for (int j = 0; j < TIP_TPT; ++j) {
        int t = tc + j * TIP_THREADS + threadIdx.x;
        if (t < len) {
#pragma unroll
            for (int h = 0; h < H; ++h) {
                if (h < D.hps) head_put(D, acc[j][h], xs, h, t, ml_m[h], ml_s[h]);
            }
        }
    }
}

// Block-wide: the threads' per-head (max, Σexp) merged into out (hps, 2): warps merge their
// lanes, then thread h merges the warps.
template <int H>
__device__ void heads_flush(const Dims& D, const float (&ml_m)[H], const float (&ml_s)[H], float* out) {
    __shared__ float red[H][TIP_THREADS / 32][2];
    int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
#pragma unroll
    for (int h = 0; h < H; ++h) {
        if (h < D.hps) {
            float m = ml_m[h], sm = ml_s[h];
            for (int o = 16; o > 0; o >>= 1) {
                float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, sm, o);
                ml_merge(m, sm, m2, s2);
            }
            if (lane == 0) { red[h][w][0] = m; red[h][w][1] = sm; }
        }
    }
    __syncthreads();
    if (tid < D.hps) {
        float m = NEG_INF, sm = 0.f;
        for (int i = 0; i < TIP_THREADS / 32; ++i) ml_merge(m, sm, red[tid][i][0], red[tid][i][1]);
        out[tid * 2] = m;
        out[tid * 2 + 1] = sm;
    }
}

// Pipelined int8 TIP (`tip8p_<NS>x<JU><mode>_*`, the summed score of tip_impl<T, true>). tip8
// loads a chunk's int8 pieces into registers and computes only once they arrive, so each warp
// alternates one memory wait and one compute phase: 46–63 % of DRAM bandwidth at batch 16 of
// Llama shapes (ncu, GPU run 12). Here each thread copies its own tokens' 16-byte pieces into
// shared memory with cp.async, NS − 1 units ahead of the one it computes (a unit: JU of the
// thread's TIP_TPT tokens of one chunk × up to two chosen groups), so loads stay in flight
// through the compute. A thread reads back only the pieces it copied itself, and a warp only the
// scales its own lanes copied (its 32 tokens are one QB block), so the loop needs no block
// barrier: cp.async.wait_group, then __syncwarp for the scales. The launcher sizes nchunk so that
// the grid is about one wave of resident blocks (tip::chunks_wave): fewer, longer blocks pay the
// prologue and the histogram flush once and leave no tail wave.
// MODE 0 (`false`): each element is dequantised (x · scale) as tip8 does, the same arithmetic in
// the same order, so the same bits. MODE 1 (`true`): the warp folds the block's scales into q
// once (q_e · scale_e in shared memory, as cpu::fc_scores_q8), one multiply fewer per element.
// MODE 2 (`int`): the folded q of the block and group pair, y = q_e·scale_e·127/max|·|, is
// written as three int8 terms y ≈ Q1 + Q2/254 + Q3/254² (|y − Σ| ≤ 0.5/254², 6e-8 of max|y|;
// ~2e-7 with the f32 scalings), and each term's dot product with the int8 pieces is exact in
// int32 (dp4a, 4 elements an instruction): per element 3/4 instruction instead of 3 (byte
// permute, subtract, FMA), which bounded MODE 1 (ncu, GPU run 18: 0.66 issued per scheduler at
// 56 % of DRAM).
// NQ > 1 (`tip8ph_h*x*`, MODE 0 only): the group-mass stage 1 of tip_heads_impl<T, H, true> with
// this pipeline: per-head q (tip_setup<NQ>), NQ accumulators per token, and tip_heads' outputs
// (xh, per-block (max, Σexp)) in place of scores and histogram; the same arithmetic in the same
// order as tip8_heads (per token). GPU run 20 (default int8 step, Llama shapes, same call):
// 16 × 32k 371.4 → 347.5 µs, 1 × 128k 131.2 → 111.7, 16 × 128k 1225.2 → 1176.7; 1 × 32k a tie.
// Dynamic shared memory: NS stages of tip8p_stage(JU) bytes.
#define TIP8P_SC(JU) ((TIP_THREADS / 32) * (JU) * 2 * FCG) // floats per stage: (warp, j, group, FC)
#define TIP8P_DATA(JU) (2 * TIP_THREADS * (JU) * 16)       // 2 groups × JU·TIP_THREADS tokens × 16 B
#define TIP8P_STAGE(JU) (TIP8P_DATA(JU) + TIP8P_SC(JU) * 4)
#define TIP4P_DATA(JU) (2 * TIP_THREADS * (JU) * 8)        // int4: 8 B a piece
#define TIP4P_STAGE(JU) (TIP4P_DATA(JU) + TIP8P_SC(JU) * 4)
__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ float warp_max_abs(float x) { // (sm_80+: one redux over the bits)
    u32 r;
    asm volatile("redux.sync.max.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(__float_as_uint(fabsf(x))));
    return __uint_as_float(r);
}
// Four int4 values (the low nibbles of v's bytes, v & 0x0f0f0f0f) as int8 bytes: bit 3 set adds
// 0xf0 to its byte (8 · 0x1e), which sign-extends it; no byte carries into the next.
__device__ __forceinline__ int sx4(u32 v) { return (int)(v + (v & 0x08080808u) * 0x1eu); }
// One word of an int4 piece (4 slots: x in the low nibble of each byte, y in the high one) as
// two words of int8 values: lo the x of its 4 slots, hi their y.
__device__ __forceinline__ void i4_split(u32 w, int& lo, int& hi) {
    lo = sx4(w & 0x0f0f0f0fu);
    hi = sx4((w >> 4) & 0x0f0f0f0fu);
}
// Position of element e (0..15) of a (token, group) piece in the int4 order of q's int8 terms: the
// nibbles of the piece's two words unpack as (x of slots 0..3), (y of 0..3), (x of 4..7), (y of
// 4..7), i.e. elements 0 2 4 6, 1 3 5 7, 8 10 12 14, 9 11 13 15.
__device__ __forceinline__ int q4_pos(int e) { return (e >> 3) * 8 + (e & 1) * 4 + ((e & 7) >> 1); }
// Q4 (tip4p: MODE 2, NQ = 1; tip4ph: MODE 0): the planes hold int4 (Q4_PLANES); each (token,
// group) piece is 8 bytes, copied into an 8-byte stage slot (TIP4P_STAGE: half an int8 stage, so
// twice the stages hold as many bytes in flight), unpacked by sx4 and dotted with q's int8 terms
// stored in q4_pos order (MODE 2: the same integer dot products as int8's), or unpacked to f32 in
// element order (MODE 0: the same float operations as int8's on the int4 values).
template <class T, int NS, int JU, int MODE, int NQ, bool Q4 = false>
__device__ void tip8p_impl(Dims D, const u16* k, const i8* kq, const float* ks, const int* q8n, const float* q,
                           const int* pool, const double* mom, const int* lens, float* scores, u32* hist, u32* done, int* thr, int nchunk,
                           float* pml) {
    static_assert(NQ == 1 || MODE == 0, "per-head scores: MODE 0 only");
    static_assert(!Q4 || (MODE == 2 && NQ == 1) || MODE == 0, "int4 planes: the integer summed-score TIP or MODE 0");
    PDL_BEGIN(TR_TIP);
    if (NQ == 1) select_early_trigger(D); // (NQ > 1: the group-mass stage, whose tip_mass triggers)
    constexpr int NJ = TIP_TPT / JU; // units per chunk and group pair
    constexpr int NW = TIP_THREADS / 32;
    constexpr int DATA = Q4 ? TIP4P_DATA(JU) : TIP8P_DATA(JU), STAGE = Q4 ? TIP4P_STAGE(JU) : TIP8P_STAGE(JU);
    extern __shared__ __align__(16) unsigned char tip8p_dyn[];
    __shared__ u32 sh_hist[NQ == 1 ? NBIN : 1];
    __shared__ __align__(16) float qeff[NQ][MAXG * GE];                  // summed q (NQ = 1) or per head
    __shared__ __align__(16) float qf[MODE == 1 ? NW : 1][JU][2][GE];    // per warp: q · scale
    __shared__ __align__(16) i8 qq[MODE == 2 ? NW : 1][JU][3][2][GE];   // per warp: its int8 terms
    __shared__ float sq[MODE == 2 ? NW : 1][JU];                          // and their scale
    __shared__ int gl_s[MAXG];
    int s = blockIdx.y, b = blockIdx.z, tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    auto& qf_w = qf[MODE == 1 ? w : 0]; // this warp's (the modes without them keep one unused copy)
    auto& qq_w = qq[MODE == 2 ? w : 0];
    auto& sq_w = sq[MODE == 2 ? w : 0];
    int len = lens[b];
    int t0 = blockIdx.x * TIP_TOK * nchunk;
    // With every pool FC chosen (P ≤ k, the paper's fixed set) the groups to read are the pool's
    // and q needs no FC choice: the pool thread's slot and FC id (pool's second half) go out with
    // lens, its q values right after, and all before the K copies, which would otherwise queue
    // them behind every block's (GPU run 21's timeline, 1 × 32k: a 4 µs prologue of a 10 µs TIP,
    // the loads of tip_setup's chain pool → fc_of_slot → q issued after the copies).
    bool fixed = D.pool <= D.k;
    PoolEnt pe = pool_ent(D, pool, s);
    int qslot = -1;
    float2 qr[MAXH];
    if (fixed && tid < D.pool) {
        qslot = pe.slot;
        int f = pe.fc;
        const float* qb = q + ((size_t)b * D.n_q + s * D.hps) * D.d + 2 * f;
#pragma unroll
        for (int h = 0; h < MAXH; ++h)
            if (h < D.hps) qr[h] = *(const float2*)(qb + h * D.d);
    }
    if (t0 >= len) return;
    int kvh = kv_of_sel(D, s);
    if constexpr (NQ == 1)
        for (int i = tid; i < NBIN; i += blockDim.x) sh_hist[i] = 0;
    TipSrc S = tip_src(D, k, kq, ks, q8n, b, kvh, len);
    u32 gmask = fixed ? pool_groups(qslot) : tip_setup<NQ>(D, q, pe, mom, b, s, len, qeff);
    if (tid == 0) {
        int n = 0;
        for (u32 m = gmask; m; m &= m - 1) gl_s[n++] = __ffs(m) - 1;
    }
    __syncthreads();
    int G = __popc(gmask), npairs = (G + 1) >> 1;
    int qlen = min(S.qlen, len);
    int seg = b * D.n_sel + s;
    const int nq = NQ == 1 ? 1 : D.hps;
    float* xs = scores + (size_t)seg * nq * D.l_max; // (NQ > 1: xh (hps, l_max) per selection)
    int nch = min(nchunk, (len - t0 + TIP_TOK - 1) / TIP_TOK);           // chunks holding tokens
    int n8 = qlen > t0 ? min(nch, (qlen - t0 + TIP_TOK - 1) / TIP_TOK) : 0; // of them, with int8 tokens
    int nunit = n8 * NJ * npairs;
    // Units go in loop order: chunk ich, the thread's tokens j = ijh·JU .. +JU, group pair ip
    // (groups gl_s[2ip], gl_s[2ip + 1]), so each token sees its groups in tip8's order. The
    // thread's tokens j and j + 1 are TIP_THREADS apart: TIP_THREADS / KT tiles of the planes.
    int ich = 0, ijh = 0, ip = 0, issued = 0;
    const size_t jstep = (size_t)(TIP_THREADS / KT) * D.n_grp * KT * GE;
    auto issue = [&]() {
        if (issued < nunit) {
            int tc = t0 + ich * TIP_TOK, jb = ijh * JU;
            unsigned char* st = tip8p_dyn + (size_t)(issued % NS) * STAGE;
            uint4* sd = (uint4*)st;
            float* ssc = (float*)(st + DATA);
            int t = tc + jb * TIP_THREADS + tid;
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                if (2 * ip + u < G) {
                    const i8* src = S.kq + (kq_off(t, gl_s[2 * ip + u], D.n_grp) >> (Q4 ? 1 : 0));
#pragma unroll
                    for (int j = 0; j < JU; ++j)
                        if (t + j * TIP_THREADS < qlen) {
                            if (Q4) cp_async8(&((uint2*)st)[(u * JU + j) * TIP_THREADS + tid], src + j * (jstep >> 1));
                            else cp_async16(&sd[(u * JU + j) * TIP_THREADS + tid], src + j * jstep);
                        }
                }
            }
            // Lanes 0 .. 4·JU − 1: the warp's (j, group, half) scale pieces of 4 floats.
            int j = lane >> 2, u = (lane >> 1) & 1, piece = lane & 1;
            int tw = tc + (jb + j) * TIP_THREADS + w * 32;
            if (lane < 4 * JU && 2 * ip + u < G && tw < qlen)
                cp_async16(&ssc[((w * JU + j) * 2 + u) * FCG + piece * 4], S.ks + (size_t)(tw / QB) * D.n_fc + gl_s[2 * ip + u] * FCG + piece * 4);
            if (++ip == npairs) {
                ip = 0;
                if (++ijh == NJ) { ijh = 0; ++ich; }
            }
        }
        ++issued;
        cp_async_commit(); // (an empty group past the last unit keeps the wait count uniform)
    };
#pragma unroll
    for (int i = 0; i < NS - 1; ++i) issue();
    if (fixed) {
        // tip_setup's q for the fixed set (every pool FC chosen), operation for operation.
        for (int i = tid; i < NQ * MAXG * GE; i += blockDim.x) (&qeff[0][0])[i] = 0.f;
        __syncthreads();
        if (qslot >= 0) put_slot_q<NQ>(D, qeff, qslot, [&](int h) { return qr[h]; });
        __syncthreads();
    }
    // MODE 0: the FC pairs with a nonzero q (the chosen FCs: about a quarter of every group read
    // in the default mode, k = 16 of a pool of 64) are the only ones scaled and summed; a half
    // group without one is skipped (tip_heads_impl's int8 pass likewise). GPU run 29 (default
    // mode, Llama-3-8B shapes, B = 1024, same call, every pair / these only): int8 16 × 32k
    // 356.3 → 325.6 µs, 1 × 128k 115.0 → 102.1, 16 × 128k 1184.2 → 1112.8, int4 16 × 128k
    // 1435.5 → 1209.8 (call 4, this kernel); with tip8_heads too, int8 1 × 32k 57.4 → 53.5
    // (call 8). The same sums bit for bit (tip_fma). TIP_PAIRS=0 (FASA_GPU_DEFINES) sums every
    // pair, as before.
    u64 qmask = MODE == 0 ? (TIP_PAIRS ? q_slots_mask<NQ>(qeff, nq, D.n_fc) : ~0ull) : 0;
    trace_mark(M_TIP_SETUP);
    float ml_m[NQ], ml_s[NQ];                        // (NQ > 1: online softmax per head)
    ml_init(ml_m, ml_s);
    int unit = 0;
    for (int ch = 0; ch < nch; ++ch) {
        int tc = t0 + ch * TIP_TOK;
        float acc[TIP_TPT][NQ];
        zero_acc(acc);
        if (ch < n8) {
#pragma unroll
            for (int jh = 0; jh < NJ; ++jh) {
                for (int p = 0; p < npairs; ++p, ++unit) {
                    __syncwarp(); // the warp's reads of the stage about to be refilled are done
                    issue();
                    cp_async_wait<NS - 1>();
                    __syncwarp(); // the scales copied by other lanes of the warp are visible
                    const unsigned char* st = tip8p_dyn + (size_t)(unit % NS) * STAGE;
                    const uint4* sd = (const uint4*)st;
                    const float* ssc = (const float*)(st + DATA);
                    if (MODE >= 1) {
                        // Lane: group u = lane / 16, element e = lane % 16, for each j.
                        int u = lane >> 4, e = lane & 15;
                        bool on = 2 * p + u < G;
                        float qe = on ? qeff[0][gl_s[2 * p + u] * GE + e] : 0.f;
#pragma unroll
                        for (int j = 0; j < JU; ++j) {
                            int t = tc + (jh * JU + j) * TIP_THREADS + w * 32;
                            float sv = on && t < qlen ? ssc[((w * JU + j) * 2 + u) * FCG + (e >> 1)] : 0.f;
                            float x = __fmul_rn(qe, sv);
                            if (MODE == 1) {
                                if (on) qf_w[j][u][e] = x;
                            } else {
                                float mx = warp_max_abs(x); // over the pair's 32 elements
                                float inv = mx > 1e-30f ? 127.f / mx : 0.f; // (no ∞ from a denormal max)
                                float y = x * inv, r = rintf(y);
                                i8* qt = &qq_w[j][0][u][Q4 ? q4_pos(e) : e];
                                qt[0] = (i8)(int)r;
                                y = (y - r) * 254.f;
                                r = rintf(y);
                                qt[2 * GE] = (i8)(int)r;
                                qt[4 * GE] = (i8)(int)rintf((y - r) * 254.f);
                                if (lane == 0) sq_w[j] = mx * (1.f / 127.f);
                            }
                        }
                        __syncwarp();
                    }
                    int di[JU][3]; // MODE 2: the three terms' exact dot products
#pragma unroll
                    for (int j = 0; j < JU; ++j) di[j][0] = di[j][1] = di[j][2] = 0;
#pragma unroll
                    for (int u = 0; u < 2; ++u) {
                        if (2 * p + u >= G) break; // uniform over the block
                        int g = gl_s[2 * p + u];
                        uint4 raw[JU];
#pragma unroll
                        for (int j = 0; j < JU; ++j) {
                            int t = tc + (jh * JU + j) * TIP_THREADS + tid;
                            if (Q4) {
                                uint2 h = t < qlen ? ((const uint2*)st)[(u * JU + j) * TIP_THREADS + tid] : make_uint2(0, 0);
                                raw[j] = make_uint4(h.x, h.y, 0, 0);
                            } else {
                                raw[j] = t < qlen ? sd[(u * JU + j) * TIP_THREADS + tid] : make_uint4(0, 0, 0, 0);
                            }
                        }
                        if (MODE == 2) {
#pragma unroll
                            for (int j = 0; j < JU; ++j) {
                                // Four words of int8 values (int4: the piece's two words split).
                                int w4[4] = {(int)raw[j].x, (int)raw[j].y, (int)raw[j].z, (int)raw[j].w};
                                if (Q4) {
                                    i4_split(raw[j].x, w4[0], w4[1]);
                                    i4_split(raw[j].y, w4[2], w4[3]);
                                }
#pragma unroll
                                for (int x = 0; x < 3; ++x) {
                                    int4 qw = *(const int4*)&qq_w[j][x][u][0];
                                    int d = dp4a(w4[0], qw.x, di[j][x]);
                                    d = dp4a(w4[1], qw.y, d);
                                    d = dp4a(w4[2], qw.z, d);
                                    di[j][x] = dp4a(w4[3], qw.w, d);
                                }
                            }
                            continue;
                        }
#pragma unroll
                        for (int half = 0; half < 2; ++half) {
                            u32 cm = MODE == 0 ? half_pairs(qmask, g, half) : 0xfu; // (block-uniform)
                            if (cm == 0) continue;
                            float f[JU][8];
#pragma unroll
                            for (int j = 0; j < JU; ++j) {
                                if (Q4) {
                                    // Half h is word h: slots 4h..4h+3, x low and y high; the signed
                                    // nibbles interleaved back into element order.
                                    int lo, hi;
                                    i4_split(half ? raw[j].y : raw[j].x, lo, hi);
                                    unpack8_i8(__byte_perm(lo, hi, 0x5140), __byte_perm(lo, hi, 0x7362), f[j]);
                                } else {
                                    unpack8_i8(half ? raw[j].z : raw[j].x, half ? raw[j].w : raw[j].y, f[j]);
                                }
                                if (MODE == 0) {
                                    int t = tc + (jh * JU + j) * TIP_THREADS + tid;
                                    float4 s4 = t < qlen ? *(const float4*)&ssc[((w * JU + j) * 2 + u) * FCG + half * 4]
                                                         : make_float4(0.f, 0.f, 0.f, 0.f);
                                    float sv[4] = {s4.x, s4.y, s4.z, s4.w};
#pragma unroll
                                    for (int e = 0; e < 4; ++e)
                                        if (cm & (1u << e)) {
                                            f[j][2 * e] = __fmul_rn(f[j][2 * e], sv[e]);
                                            f[j][2 * e + 1] = __fmul_rn(f[j][2 * e + 1], sv[e]);
                                        }
                                }
                            }
                            if (MODE == 1) {
#pragma unroll
                                for (int j = 0; j < JU; ++j) {
                                    const float4* q4 = (const float4*)&qf_w[j][u][half * 8];
                                    float4 a = q4[0], c = q4[1];
                                    float qe[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
#pragma unroll
                                    for (int e = 0; e < 8; ++e) acc[jh * JU + j][0] += qe[e] * f[j][e];
                                }
                            } else {
                                // (as tip8's, this unit's tokens; only the pairs with a nonzero q)
                                tip_fma<NQ, JU>(qeff, nq, g, half, f, acc, jh * JU, cm);
                            }
                        }
                    }
                    if (MODE == 2)
#pragma unroll
                        for (int j = 0; j < JU; ++j) {
                            float y = fmaf((float)di[j][2], 1.f / 64516.f, fmaf((float)di[j][1], 1.f / 254.f, (float)di[j][0]));
                            acc[jh * JU + j][0] += sq_w[j] * y;
                        }
                }
            }
        }
        if (tc + TIP_TOK > qlen) tip_pass16<T, NQ>(D, S.k, gmask, qeff, nq, tc, qlen, len, acc);
        if constexpr (NQ == 1) tip_store(D, acc, tc, len, xs, sh_hist);
        else heads_store<NQ>(D, acc, tc, len, xs, ml_m, ml_s);
    }
    cp_async_wait<0>();
    trace_mark(M_TIP_LOOP);
    if constexpr (NQ == 1) flush_hist(D, sh_hist, hist, seg, len, done, thr, (len + TIP_TOK * nchunk - 1) / (TIP_TOK * nchunk));
    else heads_flush<NQ>(D, ml_m, ml_s, pml + ((size_t)seg * gridDim.x + blockIdx.x) * nq * 2);
}

// tip_heads: xh (batch·n_sel, hps, l_max) f32 scaled per-head FC scores; pml (batch·n_sel,
// gridDim.x, hps, 2) per-block (max, Σexp) of each head over the block's tokens.
// grid (ceil(l_max/(TIP_TOK·nchunk)), n_sel, batch), block TIP_THREADS. H = compile-time bound
// on the heads (2, 4, 8): the per-head accumulators live in registers, and fewer registers let
// more blocks stay resident (the loads in flight are what keeps TIP at the memory limit).
template <class T, int H, bool Q8>
__device__ void tip_heads_impl(Dims D, const u16* k, const i8* kq, const float* ks, const int* q8n, const float* q,
                               const int* pool, const double* mom, const int* lens, float* xh, float* pml, int nchunk) {
    PDL_BEGIN(TR_TIP);
    __shared__ __align__(16) float qh[H][MAXG * GE]; // chosen FCs' q per head, slot order, zero elsewhere
    int s = blockIdx.y, b = blockIdx.z;
    PoolEnt pe = pool_ent(D, pool, s);
    int len = lens[b];
    int t0 = blockIdx.x * TIP_TOK * nchunk;
    if (t0 >= len) return;
    int kvh = kv_of_sel(D, s), hps = D.hps;
    u32 gmask = tip_setup<H>(D, q, pe, mom, b, s, len, qh);
    __syncthreads();
    // (the int8 pass sums only the chosen FCs' pairs, as tip8p_impl's MODE 0)
    u64 qmask = Q8 && TIP_PAIRS ? q_slots_mask<H>(qh, hps, D.n_fc) : ~0ull;
    TipSrc S = tip_src(D, k, kq, ks, q8n, b, kvh, len);
    int seg = b * D.n_sel + s;
    float* xs = xh + (size_t)seg * hps * D.l_max;
    float ml_m[H], ml_s[H];
    ml_init(ml_m, ml_s);
    for (int ch = 0; ch < nchunk; ++ch) {
        int tc = t0 + ch * TIP_TOK;
        if (tc >= len) break;
        float acc[TIP_TPT][H];
        tip_chunk<T, H, Q8>(D, S, gmask, qh, hps, tc, len, acc, qmask);
        heads_store<H>(D, acc, tc, len, xs, ml_m, ml_s);
    }
    heads_flush<H>(D, ml_m, ml_s, pml + ((size_t)seg * gridDim.x + blockIdx.x) * hps * 2);
}

// tip_mass: scores(t) = Σ_h exp(x_h(t) − M_h) / Z_h (heads in order, as cpu::tip_group_mass
// adds them), forced rows +∞, histogram and (with done) the threshold, as TIP.
// grid (ceil(l_max/(256·TPT)), n_sel, batch), block 256, TPT tokens a thread (`tip_mass_t<TPT>`:
// 2, 4 or 8; gpu::mass_tpt). nchunk: tip_heads' chunks per block.
#ifndef MASS_PIPE
#define MASS_PIPE 1
#endif
// exp of the mass terms: __expf (ex2.approx of x·log2 e, relative error ~2e-7 plus the rounding of
// the product: ≤ ~3e-6 where x − M_h ≥ −50, far below the tests' near-tie bound of 1e-4), or
// MASS_EXP=expf, the accurate sequence the kernel used up to GPU run 31. GPU run 32 (default int8
// step with tipm, same call, two rounds, expf / __expf): 16 × 32k 152.4 → 151.4 µs, 1 × 128k
// 57.9 → 57.2, 16 × 128k 448.1 → 444.7, 1 × 32k 42.3 → 42.1.
#ifndef MASS_EXP
#define MASS_EXP __expf
#endif
template <int TPT>
__device__ void tip_mass_impl(Dims D, const float* xh, const float* pml, const int* lens, int nchunk, float* scores, u32* hist,
                              u32* done, int* thr) {
    constexpr int NTOK = 256 * TPT;
    PDL_BEGIN(TR_MASS);
    select_early_trigger(D);
    __shared__ u32 sh_hist[NBIN];
    __shared__ float mh[MAXH], izh[MAXH];
    int s = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    int len = lens[b];
    int t0 = blockIdx.x * NTOK;
    if (t0 >= len) return;
    int seg = b * D.n_sel + s, hps = D.hps;
    const float* xs = xh + (size_t)seg * hps * D.l_max;
    // Head h's scores of the thread's tokens into x. With MASS_PIPE (default) head 0's go out
    // before the partials' merge and head h + 1's before head h's exps, so one L2 round trip is
    // exposed instead of 1 + hps (the same operations in the same order either way). GPU run 29
    // (default int8, Llama-3-8B shapes, same call, MASS_PIPE 0 / 1): 1 × 32k 55.3 → 54.5 µs,
    // 1 × 128k 103.3 → 102.3, 16 × 32k 327.2 → 326.8.
    float x[TPT];
    auto load = [&](int h) {
#pragma unroll
        for (int j = 0; j < TPT; ++j) {
            int t = t0 + j * 256 + tid;
            x[j] = t < len ? __ldcg(&xs[(size_t)h * D.l_max + t]) : 0.f;
        }
    };
    if (MASS_PIPE) load(0);
    for (int i = tid; i < NBIN; i += blockDim.x) sh_hist[i] = 0;
    // Warp h merges head h's partials over tip_heads' blocks that held tokens.
    int per = TIP_TOK * nchunk, nb = (len + per - 1) / per, stride = (D.l_max + per - 1) / per;
    int lane = tid & 31, w = tid >> 5;
    if (w < hps) {
        float m = NEG_INF, sm = 0.f;
        for (int i = lane; i < nb; i += 32) {
            const float* p = pml + (((size_t)seg * stride + i) * hps + w) * 2;
            ml_merge(m, sm, __ldcg(p), __ldcg(p + 1));
        }
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, sm, o);
            ml_merge(m, sm, m2, s2);
        }
        if (lane == 0) { mh[w] = m; izh[w] = 1.f / sm; }
    }
    __syncthreads();
    float a[TPT];
#pragma unroll
    for (int j = 0; j < TPT; ++j) a[j] = 0.f;
    for (int h = 0; h < hps; ++h) {
        float m = mh[h], iz = izh[h];
        float xc[TPT];
        if (!MASS_PIPE) load(h);
#pragma unroll
        for (int j = 0; j < TPT; ++j) xc[j] = x[j];
        if (MASS_PIPE && h + 1 < hps) load(h + 1);
#pragma unroll
        for (int j = 0; j < TPT; ++j) {
            int t = t0 + j * 256 + tid;
            if (t < len) a[j] = __fadd_rn(a[j], __fmul_rn(MASS_EXP(xc[j] - m), iz));
        }
    }
    float* sc = scores + (size_t)seg * D.l_max;
#pragma unroll
    for (int j = 0; j < TPT; ++j) {
        int t = t0 + j * 256 + tid;
        if (t < len) {
            float v = (t < D.sinks || t >= len - D.recent) ? POS_INF : a[j];
            sc[t] = v;
            atomicAdd(&sh_hist[score_bin(okey(v), D.flags)], 1u);
        }
    }
    flush_hist(D, sh_hist, hist, seg, len, done, thr, (len + NTOK - 1) / NTOK);
}
#define TIP_MASS_ENTRY(TPT)                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) tip_mass_t##TPT(Dims D, const float* xh, const float* pml,         \
                                                                      const int* lens, int nchunk, float* scores,        \
                                                                      u32* hist, u32* done, int* thr) {                  \
        tip_mass_impl<TPT>(D, xh, pml, lens, nchunk, scores, hist, done, thr);                                           \
    }
TIP_MASS_ENTRY(2)
TIP_MASS_ENTRY(4)
TIP_MASS_ENTRY(8)

// TIP over per-FC int8 planes (FC_PLANES; `tipfc_h<H>x<TPT>_<dtype>`): NQ = 1 the summed score with
// tip_impl's outputs (scores, histogram, threshold), NQ > 1 the group-mass stage 1 with
// tip_heads' (xh, per-block (max, Σexp)). Every TIP over grouped planes reads the whole 16-byte
// piece of a group that holds a chosen FC: the default mode, k = 16 chosen per step from a pool
// of 64, read all 8 groups (136 B a token at Llama-3-8B shapes) for the 16 FCs it sums (GPU run
// 29). Here a thread holds TPT consecutive tokens of one tile, and for each chosen slot reads
// their 2·TPT bytes of the slot's run (16 B at TPT = 8) and the scale of their block (one QB
// block: TPT divides QB): k runs a tile, 34 B a token for k = 16.
// The block walks its tokens in steps of TIP_THREADS·TPT and each step's chosen slots in units of
// U. Each thread copies its own pieces and scales into shared memory with cp.async, NS − 1 units
// ahead of the one it computes (as tip8p), and reads back only its own copies, so the loop needs
// no barrier. (Loading the next unit into registers before this one's arithmetic, two register
// buffers, left one unit in flight: GPU run 30, 16 × 32k, ncu: IPC 1.2, 23 % of DRAM bandwidth,
// the stalls mostly on those loads; 16 × 128k step 1035 µs against 664 with the stages.)
// Arithmetic per accumulator: pairs in slot order, x then y, the pairs whose q is zero in every
// head left out (q_slots_mask: exactly nothing is added); with TIPFC_FOLD (default) the block's
// scale folded into q (q·scale, __fmul_rn, as cpu::fc_scores_q8 and tip8p's MODE 1) and an FMA
// with the int8 value, so summed scores equal tip8p 124's bit for bit; TIPFC_FOLD=0 multiplies
// each value by its scale first (tip8's and tip8ph's MODE 0, their bits). Tokens from qlen on:
// K's 16-bit pairs, as tip_pass16.
template <int TPT> struct FcPiece;
template <> struct FcPiece<8> {
    typedef uint4 type;
    static __device__ __forceinline__ u32 word(uint4 r, int i) { return i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w; }
};
template <> struct FcPiece<4> {
    typedef uint2 type;
    static __device__ __forceinline__ u32 word(uint2 r, int i) { return i == 0 ? r.x : r.y; }
};
// The four int8 values of one word (x, y of two tokens) as f32, as unpack8_i8 converts them.
__device__ __forceinline__ void unpack4_i8(u32 a, float (&f)[4]) {
    a ^= 0x80808080u;
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = __fsub_rn(__uint_as_float(__byte_perm(a, 0x4B000000u, 0x7440 | i)), 8388736.f);
}
// GPU run 30 (default int8 step, Llama-3-8B shapes, same call, two rounds, TIPFC_FOLD 0 / 1):
// 16 × 128k 658.3 → 643.1 µs, 16 × 32k 209.2 → 206.0, 1 × 128k 73.9 → 73.2, 1 × 32k 50.5 → 50.1.
#ifndef TIPFC_FOLD
#define TIPFC_FOLD 1
#endif
// Group mass: each head's (max, Σexp) over a thread's TPT tokens of a step with the step's max
// first and one rescale (TIPFC_ML, default), not per token with a branch that diverges (heads_store's
// update; TIPFC_ML=0). GPU run 30 call 7 (default int8 step, same call, two rounds, 0 / 1): 1 × 32k
// 50.1 → 48.6 µs, 16 × 32k 202.6 → 194.8, 1 × 128k 72.8 → 69.0, 16 × 128k 630.2 → 610.9.
#ifndef TIPFC_ML
#define TIPFC_ML 1
#endif
#define TIPFC_STAGE(TPT, U) ((U) * TIP_THREADS * ((TPT) * 2 + 4)) // bytes: U pieces and scales per thread
template <class T, int NQ, int TPT, int U, int NS>
__device__ void tipfc_impl(Dims D, const u16* k, const i8* kq, const float* ks, const int* q8n, const float* q,
                           const int* pool, const double* mom, const int* lens, float* out, u32* hist, u32* done, int* thr, int nchunk,
                           float* pml) {
    static_assert(QB % TPT == 0 && KT % TPT == 0, "a thread's tokens lie in one block and one tile");
    typedef typename FcPiece<TPT>::type Piece;
    PDL_BEGIN(TR_TIP);
    if (NQ == 1) select_early_trigger(D); // (NQ > 1: the group-mass stage, whose tip_mass triggers)
    __shared__ u32 sh_hist[NQ == 1 ? NBIN : 1];
    __shared__ __align__(16) float qeff[NQ][MAXG * GE]; // summed q (NQ = 1) or per head, slot order
    __shared__ int sl_s[64];                             // the slots summed, ascending
    int s = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    PoolEnt pe = pool_ent(D, pool, s);
    int len = lens[b];
    int t0 = blockIdx.x * TIP_TOK * nchunk;
    if (t0 >= len) return;
    int kvh = kv_of_sel(D, s);
    if constexpr (NQ == 1)
        for (int i = tid; i < NBIN; i += blockDim.x) sh_hist[i] = 0;
    TipSrc S = tip_src(D, k, kq, ks, q8n, b, kvh, len);
    tip_setup<NQ>(D, q, pe, mom, b, s, len, qeff);
    __syncthreads();
    const int nq = NQ == 1 ? 1 : D.hps;
    int ns = slots_list<NQ>(qeff, nq, D.n_fc, sl_s);
    trace_mark(M_TIP_SETUP);
    int t1 = min(len, t0 + TIP_TOK * nchunk);
    int qlen = min(S.qlen, len); // a multiple of QB: a thread's tokens are all below it or none
    constexpr int STEP = TIP_THREADS * TPT;
    int nsteps = (t1 - t0 + STEP - 1) / STEP;
    int nb = max((ns + U - 1) / U, 1); // units per step (one, storing zeros, when no q is nonzero)
    int nunit = nsteps * nb;
    int seg = b * D.n_sel + s;
    float* xs = out + (size_t)seg * nq * D.l_max; // (NQ > 1: xh (hps, l_max) per selection)
    float ml_m[NQ], ml_s[NQ];                     // (NQ > 1: online softmax per head)
    ml_init(ml_m, ml_s);
    float acc[TPT][NQ];
    // Stage st: U pieces of every thread ((i, tid) order), then their U scales.
    extern __shared__ __align__(16) unsigned char tipfc_dyn[];
    constexpr int STAGE = TIPFC_STAGE(TPT, U);
    // Units in order: step st, its slots c·U .. c·U + U − 1; issue and compute each walk them once,
    // (step, unit) counted as they go.
    struct Walk {
        int st = 0, c = 0;
        __device__ void next(int n) { if (++c == n) { c = 0; ++st; } }
    } wi, wc;
    auto issue = [&](int u) {
        if (u < nunit) {
            int st = wi.st, c = wi.c;
            wi.next(nb);
            int tt = t0 + st * STEP + tid * TPT;
            if (tt < qlen) {
                const i8* base = S.kq + kqf_off(tt, 0, D.n_fc);
                const float* sbase = S.ks + (size_t)(tt / QB) * D.n_fc;
                unsigned char* sd = tipfc_dyn + (size_t)(u % NS) * STAGE;
#pragma unroll
                for (int i = 0; i < U; ++i) {
                    int idx = c * U + i;
                    if (idx < ns) {
                        int j = sl_s[idx];
                        void* dp = sd + (size_t)(i * TIP_THREADS + tid) * sizeof(Piece);
                        if (TPT == 8) cp_async16(dp, base + (size_t)j * KT * 2);
                        else cp_async8(dp, base + (size_t)j * KT * 2);
                        cp_async4(sd + U * TIP_THREADS * sizeof(Piece) + (size_t)(i * TIP_THREADS + tid) * 4, sbase + j);
                    }
                }
            }
        }
        cp_async_commit(); // (an empty group past the last unit keeps the wait count uniform)
    };
    auto compute = [&](int u) {
        int st = wc.st, c = wc.c;
        wc.next(nb);
        const unsigned char* sd = tipfc_dyn + (size_t)(u % NS) * STAGE;
        int tt = t0 + st * STEP + tid * TPT;
        if (c == 0) zero_acc(acc);
        if (tt < t1) {
#pragma unroll
            for (int i = 0; i < U; ++i) {
                int idx = c * U + i;
                if (idx >= ns) break; // uniform over the block
                int j = sl_s[idx];
                float2 qv[NQ];
#pragma unroll
                for (int h = 0; h < NQ; ++h) qv[h] = h < nq ? *(const float2*)&qeff[h][2 * j] : make_float2(0.f, 0.f);
                // A word at a time: tokens 2w and 2w + 1; tokens from qlen on (after the whole
                // quantised blocks) from K's 16-bit pairs, as tip_pass16 sums them.
#pragma unroll
                for (int w = 0; w < TPT / 2; ++w) {
                    float f[4];
                    if (tt < qlen) {
                        // (this thread's own copies: its cp.async groups waited for)
                        Piece r = *(const Piece*)(sd + (size_t)(i * TIP_THREADS + tid) * sizeof(Piece));
                        float sc = *(const float*)(sd + U * TIP_THREADS * sizeof(Piece) + (size_t)(i * TIP_THREADS + tid) * 4);
                        unpack4_i8(FcPiece<TPT>::word(r, w), f);
                        if (TIPFC_FOLD) {
                            if (w == 0)
#pragma unroll
                                for (int h = 0; h < NQ; ++h) qv[h] = make_float2(__fmul_rn(qv[h].x, sc), __fmul_rn(qv[h].y, sc));
                        } else {
#pragma unroll
                            for (int e = 0; e < 4; ++e) f[e] = __fmul_rn(f[e], sc);
                        }
                    } else {
#pragma unroll
                        for (int m = 0; m < 2; ++m) {
                            int t = tt + 2 * w + m;
                            f[2 * m] = f[2 * m + 1] = 0.f; // (t ≥ t1: not stored)
                            if (t < t1) {
                                const u16* p = S.k + k_off(t, j / FCG, D.n_grp) + (j % FCG) * 2;
                                f[2 * m] = T::load(p[0]);
                                f[2 * m + 1] = T::load(p[1]);
                            }
                        }
                    }
#pragma unroll
                    for (int h = 0; h < NQ; ++h) {
                        if (h < nq) {
#pragma unroll
                            for (int m = 0; m < 2; ++m) {
                                acc[2 * w + m][h] += qv[h].x * f[2 * m];
                                acc[2 * w + m][h] += qv[h].y * f[2 * m + 1];
                            }
                        }
                    }
                }
            }
        }
        if (c != nb - 1) return;
        // The step's outputs for tokens tt .. tt + TPT − 1 below t1: whole 16-byte stores where
        // all TPT are (a thread's tokens are one 32-byte sector at TPT = 8; scalar stores wrote
        // 8 partial sectors, 16.8M L2 requests at 16 × 32k, GPU run 30).
        if (tt >= t1) return;
        bool whole = tt + TPT <= t1;
#pragma unroll
        for (int h = 0; h < NQ; ++h) {
            if (h >= nq) break;
            float x[TPT];
#pragma unroll
            for (int m = 0; m < TPT; ++m) {
                int t = tt + m;
                if constexpr (NQ == 1) {
                    x[m] = (t < D.sinks || t >= len - D.recent) ? POS_INF : acc[m][0];
                    if (t < t1) atomicAdd(&sh_hist[okey(x[m]) >> BIN_SHIFT], 1u);
                } else {
                    x[m] = __fmul_rn(D.scale, acc[m][h]); // as the CPU: ŝ, then · scale
                    if (!TIPFC_ML && t < t1) {
                        if (x[m] > ml_m[h]) { ml_s[h] = ml_s[h] * expf(ml_m[h] - x[m]) + 1.f; ml_m[h] = x[m]; }
                        else ml_s[h] += expf(x[m] - ml_m[h]);
                    }
                }
            }
            if constexpr (NQ > 1) {
                if (TIPFC_ML) {
                    // The step's max first, then one rescale: TPT + 1 exps, no divergent branch.
                    float mx = ml_m[h];
#pragma unroll
                    for (int m = 0; m < TPT; ++m)
                        if (tt + m < t1) mx = fmaxf(mx, x[m]);
                    float sm = ml_s[h] * expf(ml_m[h] - mx); // (ml_m = −∞ at first: 0 · 0)
#pragma unroll
                    for (int m = 0; m < TPT; ++m)
                        if (tt + m < t1) sm += expf(x[m] - mx);
                    ml_m[h] = mx;
                    ml_s[h] = sm;
                }
            }
            float* o = xs + (size_t)h * D.l_max + tt;
            if (whole) {
#pragma unroll
                for (int m = 0; m < TPT; m += 4) *(float4*)(o + m) = make_float4(x[m], x[m + 1], x[m + 2], x[m + 3]);
            } else {
#pragma unroll
                for (int m = 0; m < TPT; ++m)
                    if (tt + m < t1) o[m] = x[m];
            }
        }
    };
#pragma unroll
    for (int i = 0; i < NS - 1; ++i) issue(i);
    for (int u = 0; u < nunit; ++u) {
        issue(u + NS - 1); // (into the stage compute(u − 1) read: this thread's reads are done)
        cp_async_wait<NS - 1>();
        compute(u);
    }
    cp_async_wait<0>();
    trace_mark(M_TIP_LOOP);
    if constexpr (NQ == 1) flush_hist(D, sh_hist, hist, seg, len, done, thr, (len + TIP_TOK * nchunk - 1) / (TIP_TOK * nchunk));
    else heads_flush<NQ>(D, ml_m, ml_s, pml + ((size_t)seg * gridDim.x + blockIdx.x) * nq * 2);
}

// Group-mass stage 1 over per-FC int8 planes on tensor cores (`tipm_h<H>k<KS>_<dtype>`):
// tipfc_h<H>'s arguments and outputs (xh, per-block (max, Σexp)), the per-head scores from
// integer products (mma.sync m16n8k32, s8 planes × 8-bit limbs of q, int32 sums: exact), for
// selections summing at most 16·KS FCs (KS = 1, 2). Per warp, tiles of KT = 64 tokens (warp w
// takes tiles w, w + 8, … of the block's tokens below qlen), each staged by its own lanes with
// cp.async, TIPM_WS stages a warp: the chosen slots' runs of 128 bytes at a stride of TIPM_RS (so
// ldmatrix's 8 rows, 8 FCs, fall in 8 bank groups), then each QB block's 16·KS scales (zero past
// ns, so padding adds nothing). Operands, for k-step st (chosen FCs 16st .. 16st + 15, q zero
// past ns) and 16 tokens:
//   A (16 tokens × 32 bytes) = ldmatrix.x4.trans of the four 8 × 8 (FC, token) pair matrices:
//     lane (g = lane/4, c = lane%4) gets token g's (and g + 8's) pairs of FCs 2c, 2c + 1 (and
//     8 + 2c, 9 + 2c): the s8 A fragment's k = 4c .. 4c + 3 (and 16 + …), x then y.
//   B (32 × 8 heads) = q'·2^E of head g at the same FCs, q' = q·scale (__fmul_rn, the CPU's fold),
//     E per (head, QB block) so that max |q'|·2^E < 2^22, rounded to an integer Q and cut into
//     bytes: Q = s8(byte 2)·2^16 + byte 1·2^8 + byte 0, three mma (s8·s8, s8·u8, s8·u8).
//   ŝ·2^E = C2·2^16 + C1·2^8 + C0 (two f32 FMAs), x = ŝ·(scale·2^−E).
// So ŝ is the dot product of the planes with q' rounded to 22 bits of its block's largest element,
// exact until the FMAs round it, where cpu::tip_group_mass rounds an f32 FMA chain: the scores
// differ in the last bits (the tests' tolerances: normalized error, near-ties of the mass), not
// bit for bit as tipfc's; the per-block Σexp uses __expf. Tokens from qlen on are scored from K's
// 16-bit pairs per thread (tipfc's arithmetic). Why: tipfc executes ~15.6 warp instructions a
// token at 4 heads to unpack int8 to f32 and do 128 FMAs; here one ldmatrix and three mma cover
// 16 tokens × 16 FCs × 8 heads, and q's quantisation is paid once per QB block and lane (q, the
// copy offsets in registers: a first version that re-read them from shared memory per block ran
// 78.7M instructions and was slower than tipfc). GPU run 32 (ncu, default int8 step, 16 × 32k,
// Llama-3-8B shapes): tipfc_h4x8 120.1 µs, 65.4M instructions, IPC 2.28, DRAM 38 %; tipm_h4k1
// 76.5 µs, 44.2M, DRAM 61 %. Steps, same call, two rounds (tipfc → tipm): 1 × 32k 46.5 → 42.3 µs,
// 16 × 32k 194.5 → 153.2, 1 × 128k 68.4 → 58.0, 16 × 128k 611.4 → 448.4.
#define TIPM_RS 144 // staged run stride, bytes
#ifndef TIPM_WS
#define TIPM_WS 2 // stages a warp (the launcher sets it: gpu::tipm_stages)
#endif
#define TIPM_STAGE(KS) ((KS) * (16 * TIPM_RS + 2 * 16 * 4)) // runs, then 2 blocks × 16·KS scales

__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], u32 saddr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(saddr) : "memory");
}
// c += a · b, m16n8k32, s8 A, s8 (BU = false) or u8 B, s32 sums.
template <bool BU> __device__ __forceinline__ void mma_i8(int (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (BU)
        asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Bytes L = 0, 1, 2 of four integers (k order) as one operand word each.
__device__ __forceinline__ void limbs4(int a, int b, int c, int d, u32 (&l)[3]) {
    u32 x = __byte_perm(a, b, 0x5140), y = __byte_perm(c, d, 0x5140); // [a0 b0 a1 b1], [c0 d0 c1 d1]
    l[0] = __byte_perm(x, y, 0x5410);
    l[1] = __byte_perm(x, y, 0x7632);
    l[2] = __byte_perm(__byte_perm(a, b, 0x0062), __byte_perm(c, d, 0x0062), 0x5410);
}
__device__ __forceinline__ float pow2f(int e) { return __uint_as_float((u32)(e + 127) << 23); } // e in [−126, 127]

template <class T, int H, int KS>
__device__ void tipm_impl(Dims D, const u16* k, const i8* kq, const float* ks, const int* q8n, const float* q, const int* pool,
                          const double* mom, const int* lens, float* xh, int nchunk, float* pml) {
    PDL_BEGIN(TR_TIP);
    __shared__ __align__(16) float qeff[H][MAXG * GE];
    __shared__ int sl_s[64];
    int s = blockIdx.y, b = blockIdx.z, tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    PoolEnt pe = pool_ent(D, pool, s);
    int len = lens[b];
    int t0 = blockIdx.x * TIP_TOK * nchunk;
    if (t0 >= len) return;
    int kvh = kv_of_sel(D, s);
    TipSrc S = tip_src(D, k, kq, ks, q8n, b, kvh, len);
    extern __shared__ __align__(16) unsigned char tipm_dyn[];
    constexpr int STAGE = TIPM_STAGE(KS), RUNS = KS * 16 * TIPM_RS;
    unsigned char* wst = tipm_dyn + (size_t)w * TIPM_WS * STAGE;
    // Scales zero where no copy lands (past ns), so padded FCs add 0 · 0.
    for (int i = lane; i < TIPM_WS * 32 * KS; i += 32) ((float*)(wst + (i / (32 * KS)) * STAGE + RUNS))[i % (32 * KS)] = 0.f;
    tip_setup<H>(D, q, pe, mom, b, s, len, qeff);
    __syncthreads();
    const int nq = D.hps;
    int ns = slots_list<H>(qeff, nq, D.n_fc, sl_s);
    int g = lane >> 2, c = lane & 3;
    // Fixed for the step, per lane: q of head g at its FCs (k-step st: 16st + 2c, +1, then
    // 16st + 8 + 2c, +1; zero past ns), the byte offsets of the pieces it copies in a tile (run
    // lane/8 + 4m, piece lane%8; −1 past ns) and of the scales (entry lane + 32m of the stage's
    // 2 × 16·KS: block, slot).
    float qr[KS][8];
    int src[4 * KS], ssrc[KS];
#pragma unroll
    for (int st = 0; st < KS; ++st)
#pragma unroll
        for (int v = 0; v < 4; ++v) {
            int i = 16 * st + (v >> 1) * 8 + 2 * c + (v & 1);
            float2 qq = i < ns && g < nq ? *(const float2*)&qeff[g < H ? g : 0][2 * sl_s[i]] : make_float2(0.f, 0.f);
            qr[st][2 * v] = qq.x;
            qr[st][2 * v + 1] = qq.y;
        }
#pragma unroll
    for (int m = 0; m < 4 * KS; ++m) {
        int r = (lane >> 3) + 4 * m;
        src[m] = r < ns ? sl_s[r] * KT * 2 + (lane & 7) * 16 : -1;
    }
#pragma unroll
    for (int m = 0; m < KS; ++m) {
        int i = lane + 32 * m, bb = i / (16 * KS), r = i % (16 * KS);
        ssrc[m] = r < ns ? bb * D.n_fc + sl_s[r] : -1;
    }
    // ldmatrix rows: lane l gives row l%8 of matrix l/8, (tokens +0 | +8) × (FCs +0 .. 7 | 8 .. 15).
    u32 lrow = ((lane >> 4) * 8 + (lane & 7)) * TIPM_RS + ((lane >> 3) & 1) * 16;
    trace_mark(M_TIP_SETUP);
    int t1 = min(len, t0 + TIP_TOK * nchunk);
    int mend = max(t0, min(S.qlen, t1)); // tokens t0 .. mend on tensor cores (a multiple of QB)
    int seg = b * D.n_sel + s;
    float* xs = xh + (size_t)seg * nq * D.l_max;
    float mm[2] = {NEG_INF, NEG_INF}, ms[2] = {0.f, 0.f}; // heads 2c, 2c + 1: online softmax
    int ntile = (mend - t0 + KT - 1) / KT;
    int nit = ntile > w ? (ntile - w + 7) >> 3 : 0; // this warp's tiles
    auto issue = [&](int it) {
        if (it < nit) {
            int tt = t0 + (w + 8 * it) * KT;
            unsigned char* sd = wst + (it % TIPM_WS) * STAGE;
            const i8* base = S.kq + kqf_off(tt, 0, D.n_fc);
#pragma unroll
            for (int m = 0; m < 4 * KS; ++m)
                if (src[m] >= 0) cp_async16(sd + (lane >> 3) * TIPM_RS + 4 * m * TIPM_RS + (lane & 7) * 16, base + src[m]);
            const float* sb = S.ks + (size_t)(tt / QB) * D.n_fc;
#pragma unroll
            for (int m = 0; m < KS; ++m)
                if (ssrc[m] >= 0 && tt + (lane + 32 * m) / (16 * KS) * QB < mend) cp_async4(sd + RUNS + (lane + 32 * m) * 4, sb + ssrc[m]);
        }
        cp_async_commit();
    };
    auto compute = [&](int it) {
        int tt = t0 + (w + 8 * it) * KT;
        const unsigned char* sd = wst + (it % TIPM_WS) * STAGE;
        u32 sa = smem_u32(sd) + lrow;
        int nbk = min(2, (mend - tt) / QB);
        float xv[2][2][4]; // [QB block][16-token row tile][(token g | g + 8) × (head 2c | 2c + 1)]
#pragma unroll
        for (int bk = 0; bk < 2; ++bk) {
            if (bk >= nbk) break;
            const float* scs = (const float*)(sd + RUNS) + bk * 16 * KS;
            float qp[KS][8];
            float mx = 0.f;
#pragma unroll
            for (int st = 0; st < KS; ++st) {
                float2 s0 = *(const float2*)&scs[16 * st + 2 * c], s1 = *(const float2*)&scs[16 * st + 8 + 2 * c];
                float sv[4] = {s0.x, s0.y, s1.x, s1.y};
#pragma unroll
                for (int v = 0; v < 8; ++v) {
                    qp[st][v] = __fmul_rn(qr[st][v], sv[v >> 1]);
                    mx = fmaxf(mx, fabsf(qp[st][v]));
                }
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            int e = mx > 0.f ? min(max(21 - (int)((__float_as_uint(mx) >> 23) & 0xff) + 127, -126), 126) : 0;
            float up = pow2f(e);
            // Heads 2c, 2c + 1: scale·2^−E (exact, so x = scale·ŝ rounded once as the CPU's).
            float f0 = D.scale * pow2f(-__shfl_sync(0xffffffffu, e, 8 * c)), f1 = D.scale * pow2f(-__shfl_sync(0xffffffffu, e, 8 * c + 4));
            u32 bq[KS][3][2];
#pragma unroll
            for (int st = 0; st < KS; ++st) {
                int qi[8];
#pragma unroll
                for (int v = 0; v < 8; ++v) qi[v] = __float2int_rn(qp[st][v] * up);
                u32 l0[3], l1[3];
                limbs4(qi[0], qi[1], qi[2], qi[3], l0);
                limbs4(qi[4], qi[5], qi[6], qi[7], l1);
#pragma unroll
                for (int L = 0; L < 3; ++L) { bq[st][L][0] = l0[L]; bq[st][L][1] = l1[L]; }
            }
#pragma unroll
            for (int rt = 0; rt < 2; ++rt) {
                int cc[3][4] = {};
#pragma unroll
                for (int st = 0; st < KS; ++st) {
                    u32 a[4];
                    ldsm_x4_trans(a, sa + st * 16 * TIPM_RS + (bk * 2 + rt) * 32);
                    mma_i8<false>(cc[2], a, bq[st][2][0], bq[st][2][1]);
                    mma_i8<true>(cc[1], a, bq[st][1][0], bq[st][1][1]);
                    mma_i8<true>(cc[0], a, bq[st][0][0], bq[st][0][1]);
                }
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    float v = fmaf((float)cc[2][i], 65536.f, fmaf((float)cc[1][i], 256.f, (float)cc[0][i]));
                    xv[bk][rt][i] = __fmul_rn(v, (i & 1) ? f1 : f0);
                }
            }
        }
        // The tile's outputs of heads 2c, 2c + 1: each head's max over them first, one rescale.
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            int h = 2 * c + e;
            if (h >= nq) break;
            float mx = mm[e];
#pragma unroll
            for (int bk = 0; bk < 2; ++bk)
                if (bk < nbk)
#pragma unroll
                    for (int i = 0; i < 4; i += 2) mx = fmaxf(mx, fmaxf(xv[bk][0][i + e], xv[bk][1][i + e]));
            float sm = ms[e] * __expf(mm[e] - mx); // (mm = −∞ at first: 0 · 0)
            float* o = xs + (size_t)h * D.l_max + tt + g;
#pragma unroll
            for (int bk = 0; bk < 2; ++bk)
                if (bk < nbk)
#pragma unroll
                    for (int rt = 0; rt < 2; ++rt)
#pragma unroll
                        for (int hf = 0; hf < 2; ++hf) {
                            float x = xv[bk][rt][2 * hf + e];
                            sm += __expf(x - mx);
                            o[(bk * 2 + rt) * 16 + hf * 8] = x;
                        }
            mm[e] = mx;
            ms[e] = sm;
        }
    };
#pragma unroll
    for (int i = 0; i < TIPM_WS - 1; ++i) issue(i);
    for (int it = 0; it < nit; ++it) {
        __syncwarp(); // (every lane is done reading the stage issue(it + WS − 1) overwrites)
        issue(it + TIPM_WS - 1);
        cp_async_wait<TIPM_WS - 1>();
        __syncwarp(); // (the stage's copies by every lane are visible)
        compute(it);
    }
    cp_async_wait<0>();
    // Tokens mend .. t1 (not quantised): every head per thread, from K's 16-bit pairs in slot
    // order, x then y, as tipfc's tail.
    float tm[H], ts[H];
    ml_init(tm, ts);
    for (int t = mend + tid; t < t1; t += TIP_THREADS) {
        float acc[H];
#pragma unroll
        for (int h = 0; h < H; ++h) acc[h] = 0.f;
        for (int i = 0; i < ns; ++i) {
            int j = sl_s[i];
            const u16* p = S.k + k_off(t, j / FCG, D.n_grp) + (j % FCG) * 2;
            float fx = T::load(p[0]), fy = T::load(p[1]);
#pragma unroll
            for (int h = 0; h < H; ++h) {
                if (h < nq) {
                    acc[h] += qeff[h][2 * j] * fx;
                    acc[h] += qeff[h][2 * j + 1] * fy;
                }
            }
        }
#pragma unroll
        for (int h = 0; h < H; ++h) {
            if (h < nq) head_put(D, acc[h], xs, h, t, tm[h], ts[h]);
        }
    }
    trace_mark(M_TIP_LOOP);
#pragma unroll
    for (int h = 0; h < H; ++h) { // (selects, not a branch per head: ptxas put tm in local memory)
        bool e0 = h == 2 * c, e1 = h == 2 * c + 1;
        ml_merge(tm[h], ts[h], e0 ? mm[0] : e1 ? mm[1] : NEG_INF, e0 ? ms[0] : e1 ? ms[1] : 0.f);
    }
    heads_flush<H>(D, tm, ts, pml + ((size_t)seg * gridDim.x + blockIdx.x) * nq * 2);
}

// ---------------------------------------------------------------------------------------------
// 3. Top-B selection: the histogram gives the bin tb holding the B-th largest score; every
// score above tb is kept (filter), the scores inside tb are candidates, and a radix select over
// their unique 64-bit keys (score, then lower index) keeps exactly the missing ones (refine).

// Exclusive prefix sum of x over the block (any multiple of 32 threads); *total gets the sum.
__device__ u32 block_excl_scan(u32 x, u32* total) {
    __shared__ u32 ws[32];
    __shared__ u32 tot;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    u32 incl = x;
    for (int o = 1; o < 32; o <<= 1) {
        u32 y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == 31) ws[w] = incl;
    __syncthreads();
    if (w == 0) {
        u32 v = lane < nw ? ws[lane] : 0, vi = v;
        for (int o = 1; o < 32; o <<= 1) {
            u32 y = __shfl_up_sync(0xffffffffu, vi, o);
            if (lane >= o) vi += y;
        }
        if (lane < nw) ws[lane] = vi - v;
        if (lane == 31) tot = vi;
    }
    __syncthreads();
    u32 r = ws[w] + incl - x;
    *total = tot;
    __syncthreads();
    return r;
}

// Block-wide (256 threads): bin tb with count(bins > tb) < B ≤ count(bins ≥ tb), and that count.
__device__ void find_threshold(const u32* hg, int B, int* tb_out, int* above_out) {
    __shared__ u32 wsum[8];
    int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
    int hi = NBIN - 16 * tid; // this thread owns bins [hi-16, hi), walked from the top
    u32 hv[16];               // loaded as 4 coalesced 16-byte pieces (L2: written by atomics)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        uint4 x = __ldcg((const uint4*)(hg + hi - 16) + i);
        hv[4 * i] = x.x; hv[4 * i + 1] = x.y; hv[4 * i + 2] = x.z; hv[4 * i + 3] = x.w;
    }
    u32 sum = 0;
#pragma unroll
    for (int i = 0; i < 16; ++i) sum += hv[i];
    u32 incl = sum;
    for (int o = 1; o < 32; o <<= 1) {
        u32 x = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += x;
    }
    if (lane == 31) wsum[wid] = incl;
    __syncthreads();
    u32 before = 0;
    for (int i = 0; i < wid; ++i) before += wsum[i];
    incl += before;
    u32 excl = incl - sum;
    if (excl < (u32)B && (u32)B <= incl) {
        u32 cum = excl;
        bool found = false;
#pragma unroll
        for (int i = 1; i <= 16; ++i) {
            u32 h = hv[16 - i];
            if (!found && cum + h >= (u32)B) { *tb_out = hi - i; *above_out = (int)cum; found = true; }
            cum += h;
        }
    }
    __syncthreads();
}

// Warp 0: digit dg (descending) where count(digits > dg) < need ≤ count(digits ≥ dg), the count
// above it, and the count in it.
__device__ void find_digit(const u32* h256, int need, int* dg_out, int* gt_out, int* in_out) {
    int lane = threadIdx.x & 31;
    int hi = 256 - 8 * lane; // digits [hi-8, hi)
    u32 sum = 0;
    for (int i = 1; i <= 8; ++i) sum += h256[hi - i];
    u32 incl = sum;
    for (int o = 1; o < 32; o <<= 1) {
        u32 x = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += x;
    }
    u32 excl = incl - sum;
    if (excl < (u32)need && (u32)need <= incl) {
        u32 cum = excl;
        for (int i = 1; i <= 8; ++i) {
            u32 h = h256[hi - i];
            if (cum + h >= (u32)need) { *dg_out = hi - i; *gt_out = (int)cum; *in_out = (int)h; break; }
            cum += h;
        }
    }
}

#define CAND_SMEM 4096
// Block-wide (256 threads) completion of one selection's rows. rerank = 0: after the filter has
// kept every row above the threshold bin (sel_cnt of them), keep the B − sel_cnt best candidates
// of that bin; rerank = 1: keep the top min(B, m) of the m candidate keys. Radix select over the
// candidates' unique 64-bit keys, 8 bits a pass, stopping once the prefix holds exactly the rows
// still needed. Then zeroes hist (rerank = 0 without thr), sel_cnt and cand_cnt for the next step.
// cut (FAC over candidates): published as soon as the cut is known, before the rows are written.
__device__ void refine_seg(const Dims& D, int seg, int len, u32* hist, const int* thr, u32* sel, u32* sel_cnt, const u64* cand,
                           u32* cand_cnt, int rerank, u64* cut) {
    __shared__ int tb, above, dg, gt, in_dg;
    __shared__ u32 h256[256];
    __shared__ __align__(16) u64 cs_s[CAND_SMEM];
    int tid = threadIdx.x;
    int m = (int)__ldcg(&cand_cnt[seg]);
    int need = 0;
    u64 mask = 0, val = 0;
    int start = 56;
    bool active;
    if (!rerank) {
        active = len > D.budget;
        if (active) {
            if (thr) {
                tb = __ldcg(&thr[THR_W * seg]);
                above = __ldcg(&thr[THR_W * seg + 1]);
            } else {
                find_threshold(hist + (size_t)seg * NBIN, D.budget, &tb, &above);
            }
            need = D.budget - above;
            int top;
            bin_prefix(tb, D.flags, &mask, &val, &top);
            start = top - 7;
        }
    } else {
        active = true;
        need = min(D.budget, m);
    }
    const u64* cg = cand + (size_t)seg * D.l_max;
    bool in_smem = m <= CAND_SMEM;
    if (in_smem) {
        // All copies in flight at once (one memory latency, not m/256 of them).
        for (int i = 2 * tid; i + 1 < m; i += 2 * blockDim.x) cp_async16(&cs_s[i], &cg[i]);
        cp_async_commit();
        if ((m & 1) && tid == 0) cs_s[m - 1] = __ldcg(&cg[m - 1]);
        cp_async_wait<0>();
    }
    __syncthreads();
    trace_mark(M_REF_LOAD, m);
    int passes = 0;
    u32* out = sel + (size_t)seg * D.budget;
    if (active && need > 0) {
        if (need < m) {
            for (int shift = start; shift > -8; shift -= 8) {
                int sh = shift < 0 ? 0 : shift;
                for (int i = tid; i < 256; i += blockDim.x) h256[i] = 0;
                __syncthreads();
                for (int i = tid; i < m; i += blockDim.x) {
                    u64 key = in_smem ? cs_s[i] : __ldcg(&cg[i]);
                    if ((key & mask) == val) atomicAdd(&h256[(key >> sh) & 255], 1u);
                }
                __syncthreads();
                if (tid < 32) find_digit(h256, need, &dg, &gt, &in_dg);
                __syncthreads();
                need -= gt;
                val = (val & ~((u64)255 << sh)) | ((u64)dg << sh);
                mask |= (u64)255 << sh;
                bool done = in_dg == need; // every key with this prefix is kept
                ++passes;
                __syncthreads();
                if (done) break;
            }
            // Kept: keys above the prefix and those with it, i.e. ≥ val with its unknown bits zero.
        } else {
            val = 0; // need == m: every candidate is kept
        }
        trace_mark(M_REF_PASS, passes);
        // (need == m: val 0 is published as the bin's own prefix, below every candidate)
        if (cut && tid == 0) asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(cut), "l"(CUT_SET | (val & CUT_LOW)) : "memory");
        // Each thread keeps from its own run of candidates; one scan gives the write positions
        // after the rows the filter already wrote (none in re-rank mode).
        int per = (m + blockDim.x - 1) / blockDim.x;
        int i0 = min(m, tid * per), i1 = min(m, i0 + per);
        u32 nk = 0;
        for (int i = i0; i < i1; ++i) nk += (in_smem ? cs_s[i] : __ldcg(&cg[i])) >= val;
        u32 total;
        u32 pos = (rerank ? 0u : (u32)above) + block_excl_scan(nk, &total);
        for (int i = i0; i < i1; ++i) {
            u64 key = in_smem ? cs_s[i] : __ldcg(&cg[i]);
            if (key >= val) out[pos++] = skey_token(key);
        }
    }
    __syncthreads();
    trace_mark(M_REF_WRITE);
    if (!rerank && !thr) { // (with thr the filter's blocks zero it)
        u32* hg = hist + (size_t)seg * NBIN;
        for (int i = tid; i < NBIN; i += blockDim.x) hg[i] = 0;
    }
    if (tid == 0) { cand_cnt[seg] = 0; sel_cnt[seg] = 0; }
}

// True in the block that finishes last among `n` blocks of one selection (counter `done[seg]`,
// reset by it); the other blocks' global writes are visible to it.
__device__ bool last_block(u32* done, int seg, int n) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        u32 prev = atomicAdd(&done[seg], 1u);
        last = prev == (u32)(n - 1);
        if (last) done[seg] = 0;
    }
    __syncthreads();
    if (last) __threadfence();
    return last;
}

// Filter: rows above the threshold bin into sel, the bin's rows into cand; the last block of a
// selection then completes it (refine_seg). Each thread loads its 4·V scores with V 16-byte loads
// at once and counts both kinds in one packed word (above << 16 | in the bin; a block holds
// < 2^16 tokens), so one block scan and one atomic per kind give the write positions; it
// remembers which of its tokens to write in a bit mask and re-reads only those scores (L1), as
// ~3 % of the rows are written. (Run 11's kernel, 16 scores per thread by 4-byte loads, two scans
// and a write test per token: 81 µs for 64 MiB of scores at 16 × 128k, 23 cycles per instruction
// and ~3× the instructions; ncu, GPU run 12.)
// grid (ceil(l_max / (1024·V)), n_sel, batch), block 256; V = 8, or 2 when that leaves too few
// blocks to fill the GPU (batch 1), or 1 on the smallest grids (select::filter_tok).
// With `ready` (FAC early; needs thr): the last block sets ready[seg] = 1 (every row above the
// bin written) and lets FAC launch before it refines, then 2 once the refine's rows are written.
// FAC over candidates (cands_cap(D) > 0) also: every block lets FAC launch from its start, raises
// thr's candidate count to its end position, and the refine publishes its cut in thr.
template <int V>
__device__ void filter_impl(Dims D, const float* scores, u32* hist, int* thr, const int* lens, u32* sel, u32* sel_cnt, u64* cand,
                            u32* cand_cnt, u32* done, u32* ready) {
    constexpr int TOK = 256 * 4 * V;
    static_assert(V * 4 <= 32, "one mask bit per token of a thread");
    __shared__ u32 base_a, base_c;
    int s = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    int seg = b * D.n_sel + s;
    // FAC over candidates: FAC launches now, its prologue overlapping this launch.
    bool cands = ready && cands_cap(D) > 0;
    if (cands) pdl_trigger();
    int len = lens[b];
    int t0 = blockIdx.x * TOK;
    if (t0 >= len) return;
    if (D.flags & EARLY_SELECT) ready_wait(thr_flag(thr, seg), 1, true);
    if (thr) {
        // Nothing reads the histogram after TIP's last block found thr: the selection's blocks
        // zero it for the next step, a slice each, off the refine's critical path.
        int nblk = (len + TOK - 1) / TOK, x = blockIdx.x;
        u32* hg = hist + (size_t)seg * NBIN;
        for (int i = x * NBIN / nblk + tid; i < (x + 1) * NBIN / nblk; i += blockDim.x) hg[i] = 0;
    }
    u32* out = sel + (size_t)seg * D.budget;
    int t1 = min(t0 + TOK, len);
    if (len <= D.budget) {
        for (int t = t0 + tid; t < t1; t += blockDim.x) out[t] = (u32)t;
    } else {
        // The threshold bin: found once by TIP's last block (thr), else by each block here.
        __shared__ int tb_s, above_s;
        int tb;
        if (thr) {
            tb = __ldcg(&thr[THR_W * seg]);
        } else {
            find_threshold(hist + (size_t)seg * NBIN, D.budget, &tb_s, &above_s);
            tb = tb_s;
        }
        const float* sc = scores + (size_t)seg * D.l_max;
        // Token of (load j, element e): t0 + (j·256 + tid)·4 + e; l_max is a multiple of 64, so
        // every 4 tokens from a multiple of 4 are one aligned float4 of the row.
        float4 x[V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
            int t = t0 + (j * 256 + tid) * 4;
            x[j] = t < t1 ? *(const float4*)(sc + t) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        u32 cnt = 0, mask = 0;
#pragma unroll
        for (int j = 0; j < V; ++j) {
            float xe[4] = {x[j].x, x[j].y, x[j].z, x[j].w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int t = t0 + (j * 256 + tid) * 4 + e;
                int bin = t < t1 ? score_bin(okey(xe[e]), D.flags) : -1;
                cnt += bin > tb ? 0x10000u : bin == tb ? 1u : 0u;
                mask |= (bin >= tb ? 1u : 0u) << (j * 4 + e);
            }
        }
        u32 tot;
        u32 pos = block_excl_scan(cnt, &tot);
        trace_mark(M_FLT_SCAN);
        if (tid == 0) {
            base_a = tot >> 16 ? atomicAdd(&sel_cnt[seg], tot >> 16) : 0u;
            base_c = tot & 0xffffu ? atomicAdd(&cand_cnt[seg], tot & 0xffffu) : 0u;
            // (FAC over candidates reads the count at flag 1: the refine zeroes cand_cnt)
            if (cands && (tot & 0xffffu)) atomicMax(thr_cands(thr, seg), (int)(base_c + (tot & 0xffffu)));
        }
        __syncthreads();
        u32 pa = base_a + (pos >> 16), pc = base_c + (pos & 0xffffu);
        u64* cs = cand + (size_t)seg * D.l_max;
        while (mask) {
            int i = __ffs(mask) - 1;
            mask &= mask - 1;
            int t = t0 + ((i >> 2) * 256 + tid) * 4 + (i & 3);
            u32 key = okey(sc[t]);
            if (score_bin(key, D.flags) > tb) out[pa++] = (u32)t;
            else cs[pc++] = ((u64)key << 32) | (u64)(0xffffffffu - (u32)t);
        }
    }
    trace_mark(M_FLT_WRITE);
    if (last_block(done, seg, (len + TOK - 1) / TOK)) {
        TraceScope tr(TR_REFINE);
        if ((D.flags & EARLY_SELECT) && tid == 0) *thr_flag(thr, seg) = 0; // (all read it)
        u64* cut = cands ? thr_cut(thr, seg) : nullptr;
        if (ready) {
            if (cut && tid == 0) *(volatile u64*)cut = 0; // (ordered before flag 1 by its release)
            ready_publish(&ready[seg], 1);
            pdl_trigger();
        }
        refine_seg(D, seg, len, hist, thr, sel, sel_cnt, cand, cand_cnt, 0, cut);
        if (ready) ready_publish(&ready[seg], 2);
    }
}

#define FILTER_ENTRY(V)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256, 4) select_filter_v##V(Dims D, const float* scores, u32* hist,      \
                                                                             int* thr, const int* lens, u32* sel,       \
                                                                             u32* sel_cnt, u64* cand, u32* cand_cnt,    \
                                                                             u32* done, u32* ready) {                   \
        PDL_BEGIN_IF(TR_FILTER, !(D.flags & EARLY_SELECT));                                                             \
        filter_impl<V>(D, scores, hist, thr, lens, sel, sel_cnt, cand, cand_cnt, done, ready);                          \
    }
FILTER_ENTRY(8)
FILTER_ENTRY(2)
FILTER_ENTRY(1)

// refine_seg alone, one block per selection (grid (n_sel, batch), block 256).
extern "C" __global__ void __launch_bounds__(256) select_refine(Dims D, u32* hist, const int* thr, const int* lens, u32* sel,
                                                                u32* sel_cnt, const u64* cand, u32* cand_cnt, int rerank) {
    PDL_BEGIN(TR_REFINE);
    int s = blockIdx.x, b = blockIdx.y;
    refine_seg(D, b * D.n_sel + s, lens[b], hist, thr, sel, sel_cnt, cand, cand_cnt, rerank, nullptr);
}

// ---------------------------------------------------------------------------------------------
// Exact scores of `nr` rows for the q heads of one selection: out[h·stride + i] = q_s[h]·k_{rows[i]}.
// A row's K is d/8 16-byte chunks (chunk c = FC group c/2, half c%2); d/8 lanes take one row,
// a warp takes 32/(d/8) rows at once, four such steps in flight.
template <class T>
__device__ __forceinline__ void row_scores(const u16* kb, int l_max, int d, int hps, float (*q_s)[128], const u32* rows, int nr,
                                           float* out, int stride) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int lpr = d >> 3, rpw = 32 / lpr;
    int c = lane % lpr, rsub = lane / lpr, g = c >> 1, half = c & 1;
    float qr[MAXH][8];
#pragma unroll
    for (int h = 0; h < MAXH; ++h)
#pragma unroll
        for (int e = 0; e < 8; ++e) qr[h][e] = h < hps ? q_s[h][c * 8 + e] : 0.f;
    int step = nw * rpw;
    for (int base = w * rpw; base < nr; base += 4 * step) {
        uint4 u[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int i = base + j * step + rsub;
            u[j] = make_uint4(0, 0, 0, 0);
            if (i < nr) u[j] = *(const uint4*)(kb + k_off(rows[i], g, d >> 4) + half * 8);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int i = base + j * step + rsub;
            float f[8];
            unpack8<T>(u[j], f);
#pragma unroll
            for (int h = 0; h < MAXH; ++h) {
                if (h < hps) {
                    float acc = 0.f;
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc += qr[h][e] * f[e];
#pragma unroll
                    for (int o = 8; o > 0; o >>= 1) { // unrolled; d = 64 drops the xor-8 step
                        float y = __shfl_xor_sync(0xffffffffu, acc, o);
                        acc += o < lpr ? y : 0.f;
                    }
                    if (c == 0 && i < nr) out[h * stride + i] = acc;
                }
            }
        }
    }
}

// q of one selection's heads into shared memory, slot order, times `mul`.
__device__ __forceinline__ void load_q_slots(const Dims& D, const float* q, const int* fos, int b, int h0, float mul,
                                             float (*q_s)[128]) {
    for (int i = threadIdx.x; i < D.hps * D.d; i += blockDim.x) {
        int h = i / D.d, j = i % D.d;
        int slot = j >> 1, c = j & 1;
        q_s[h][j] = mul * q[((size_t)b * D.n_q + h0 + h) * D.d + 2 * fos[slot] + c];
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Re-rank: raw exact scores q·k of the C candidates per head (rerank_mass applies the scale).
// grid (ceil(C/RR_ROWS), n_sel, batch), block 128. rr (batch·n_sel, hps, C).
#define RR_ROWS 256
template <class T>
__device__ void rerank_scores_impl(Dims D, const u16* k, const float* q, const int* fc_of_slot, const int* lens, const u32* selc,
                                   int C, float* rr) {
    PDL_BEGIN(TR_RERANK);
    __shared__ float q_s[MAXH][128];
    __shared__ u32 rows[RR_ROWS];
    int s = blockIdx.y, b = blockIdx.z;
    int seg = b * D.n_sel + s;
    int n_c = min(C, lens[b]);
    int r0 = blockIdx.x * RR_ROWS;
    int nr = min(RR_ROWS, n_c - r0);
    if (nr <= 0) return;
    int h0 = s * D.hps, kvh = kv_of_sel(D, s);
    load_q_slots(D, q, fc_of_slot + kvh * D.n_fc, b, h0, 1.f, q_s);
    for (int i = threadIdx.x; i < nr; i += blockDim.x) rows[i] = selc[(size_t)seg * C + r0 + i];
    __syncthreads();
    const u16* kb = k + ((size_t)b * D.n_kv + kvh) * D.l_max * D.d;
    row_scores<T>(kb, D.l_max, D.d, D.hps, q_s, rows, nr, rr + (size_t)seg * D.hps * C + r0, C);
}

__device__ float block_reduce(float x, bool is_max) {
    __shared__ float red[32];
    __shared__ float res;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        float y = __shfl_xor_sync(0xffffffffu, x, o);
        x = is_max ? fmaxf(x, y) : x + y;
    }
    if (lane == 0) red[w] = x;
    __syncthreads();
    if (threadIdx.x == 0) {
        float r = red[0];
        for (int i = 1; i < nw; ++i) r = is_max ? fmaxf(r, red[i]) : r + red[i];
        res = r;
    }
    __syncthreads();
    float r = res;
    __syncthreads();
    return r;
}

// Group mass Σ_h softmax_h(scale·q·k) over the candidates (the engine's re-rank key: its logits
// are scaled, as the model's attention), forced rows +∞, as selection keys;
// then keeps the best B of them into sel (refine_seg, re-rank mode).
// With len ≤ C every row is a candidate (the engine's rule): exact scores choose among all.
// grid (n_sel, batch), block 256.
extern "C" __global__ void __launch_bounds__(256) rerank_mass(Dims D, const int* lens, const u32* selc, int C, const float* rr,
                                                              const float* scores, float* mass, u64* cand, u32* cand_cnt,
                                                              u32* sel, u32* sel_cnt) {
    PDL_BEGIN(TR_RERANK);
    int s = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
    int seg = b * D.n_sel + s;
    int len = lens[b];
    int n_c = min(C, len);
    const u32* sc_rows = selc + (size_t)seg * C;
    u64* cs = cand + (size_t)seg * D.l_max;
    float* ms = mass + (size_t)seg * C;
    (void)scores;
    {
        for (int i = tid; i < n_c; i += blockDim.x) ms[i] = 0.f;
        __syncthreads();
        for (int h = 0; h < D.hps; ++h) {
            const float* r = rr + ((size_t)seg * D.hps + h) * C;
            float mx = NEG_INF;
            for (int i = tid; i < n_c; i += blockDim.x) mx = fmaxf(mx, r[i]);
            // Rounding is monotone and scale > 0: the max of the scaled logits is the scaled max.
            mx = __fmul_rn(D.scale, block_reduce(mx, true));
            float sum = 0.f;
            for (int i = tid; i < n_c; i += blockDim.x) sum += expf(__fmul_rn(D.scale, r[i]) - mx);
            sum = block_reduce(sum, false);
            float inv = 1.f / sum;
            for (int i = tid; i < n_c; i += blockDim.x) ms[i] += expf(__fmul_rn(D.scale, r[i]) - mx) * inv;
        }
        int rec = min(D.recent, len);
        for (int i = tid; i < n_c; i += blockDim.x) {
            u32 t = sc_rows[i];
            float m = ((int)t < D.sinks || (int)t >= len - rec) ? POS_INF : ms[i];
            cs[i] = skey(m, t);
        }
    }
    if (tid == 0) cand_cnt[seg] = (u32)n_c;
    __syncthreads();
    refine_seg(D, seg, len, nullptr, nullptr, sel, sel_cnt, cand, cand_cnt, 1, nullptr);
}

// ---------------------------------------------------------------------------------------------
// 4/5. FAC and dense flash-decode: exact softmax attention of a selection's q heads over its
// rows (sel != null: the first min(B, len) selected rows; sel == null: rows 0..len), split over
// many blocks of rows_per_split rows (split-K); each block writes an unnormalized partial
// (o, m, l) per head. grid (n_split, n_sel, batch), block FAC_THREADS.
// po (seg, n_split, hps, d), pml (seg, n_split, hps, 2).
//
// No shared-memory staging and no barrier in the main loop: each warp streams its own rows
// straight into registers (16-byte loads, d/8 lanes per row, FAC_U rows per lane issued together
// before any is used) and keeps its own online softmax per head; the block merges its warps once
// at the end. H = compile-time bound on the heads per selection (1, 2, 4, 8): registers scale
// with it, so a GQA group of 4 does not pay for 8.
#define FAC_THREADS 128
#define FAC_NW (FAC_THREADS / 32)
#define FAC_U (H >= 8 ? 2 : 4)
#define FAC_MINB(H) ((H) >= 8 ? 2 : (H) >= 4 ? 3 : 4)
// Wide variant (`facw_h*`, H ≤ 4: FAC over candidates): 8 rows per lane group and iteration, so
// a batch-1 block's rows above the bin and candidates (~40–64) are one iteration, not two (GPU
// run 23: paper int8 1 × 32k 28.4 → 27.4 µs, 1 × 128k 37.2 → 35.8 with candidates; without them
// U = 8 was slower, 30.5 against 28.6 at 1 × 32k).
#define FACW_U 8
// Lean variant (`facl_h*`): q read from shared memory at each use instead of held in 8·H
// registers per lane, so more blocks fit per multiprocessor (run 6).
#define FACL_U(H) ((H) >= 8 ? 2 : 4)
#define FACL_MINB(H) ((H) >= 8 ? 3 : (H) >= 4 ? 4 : (H) >= 2 ? 5 : 6)
#ifndef FACM_TU  // (gpu::source() sets it from gpu::facm_tiles; this is for the source alone)
#define FACM_TU 2 // tensor-core FAC (facm_impl): tiles of 16 rows per warp iteration
#endif
#define FACM_MINB (FACM_TU > 1 ? 2 : 3) // and its resident blocks per SM

// Four floats from shared memory; volatile so the compiler does not hoist q out of the row loop
// back into registers (the point of the lean variant).
__device__ __forceinline__ float4 lds4(const float* p) {
    float4 r;
    u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ld.shared.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(r.x), "=f"(r.y), "=f"(r.z), "=f"(r.w) : "r"(a));
    return r;
}

__device__ __forceinline__ uint4 ld_stream(const u16* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

__device__ void combine_seg(const Dims& D, int seg, int b, int s, int n_split, const float* po, const float* pml, float* out);
__device__ bool last_block(u32* done, int seg, int n);

// One FAC block's place (fac_impl, facm_impl): selection seg = (b, s) of KV head kvh, and its nr
// rows, in one of three layouts:
//   - plain (and dense): rows r0 .. r0 + nr of the selection's (of the cache, dense);
//   - FAC early: positions [r0, r0 + na) and [t0, t0 + nr − na) of the selection's rows;
//   - FAC over candidates: positions j, j + S, … below A, then those of the candidates, kept if
//     their key (keys_s) is at least the cut, whose top 12 bits are tb; with too many candidates
//     (cand = 0), [t0, t0 + nr − na) as FAC early.
// Its partial's slots (part): pm (hps, 2) and o_out (hps, d), found when written (not held in
// registers through the loop: the tensor-core kernel spills at its 255).
struct FacBlk {
    int seg, b, s, kvh, r0, nr, na, t0, cand, tb;
    __device__ size_t part(int n_split) const { return (size_t)seg * n_split + blockIdx.x; }
    // Row i (< nr) of the block: the i-th selected (rows_s, loaded by fac_begin) or r0 + i (dense).
    __device__ u32 row(const u32* rows_s, const u32* sel, int i) const { return sel ? rows_s[i] : (u32)(r0 + i); }
};

// Shared memory of a FAC block for H heads: q, the selected rows, and each warp's partial.
template <int H> struct FacSmem {
    FacBlk blk; // (fac_begin's B, read from here after it: not held in registers)
    __align__(16) float q_s[H][128];
    u32 rows_s[FAC_MAX_ROWS + 1]; // (+ 1: FAC early rounds its two slices up apart)
    u64 keys_s[CAND_MAX];         // FAC over candidates: the block's candidates' keys
    float wm[FAC_NW][H], wl[FAC_NW][H];
    __align__(16) float wo[FAC_NW][H][128];
};

// Block-wide prologue of the FAC kernels: with no rows, writes the block's empty partial and
// returns false; else loads the heads' q, scaled, in slot order into q_s (with zero_pad, heads
// past hps and dims past d as zeros) and the block's selected rows into rows_s.
// Every load goes out at once, none waiting on another: the length, the block's slots of the
// selected rows (inside the selection's budget whatever the length), q in model order and the
// FC order; q is put in slot order in shared memory (the warps' partial outputs `wo`, written
// only at the loop's end, hold the first two). GPU run 21's timeline had 2 µs from the wait to
// the loop at batch 1 in the chains lens → rows and fc_of_slot → q.
// FAC early (`ready`, with thr and sel): the kernel runs while the select filter's last blocks
// refine. Of a selection's min(B, len) rows the first A are those above the threshold bin
// (A = thr's count, or len when len ≤ B: all), written before ready = 1; the rest are the
// refine's, written before ready = 2. Block j of S takes the j-th S-th of each part, so every
// block scores its share of the first part while the refine runs, then waits for its share of
// the second (fac_tail). rows_per_split only bounds the sum (≤ its ceiling + 1).
// FAC over candidates (cands: the kernel masks them, fac_impl; cands_cap(D) > 0): the launch
// starts as the filter does, so `thr` is read after flag 1; after it, one round trip loads the
// counts, the bin and every row slot and candidate key the block may own (stale past the counts,
// then unused). The candidate count decides for the whole selection whether they are taken.
template <int H>
__device__ bool fac_begin(const Dims& D, const float* q, const int* fc_of_slot, const int* lens, const u32* sel, int rows_per_split,
                          int n_split, float* po, float* pml, bool zero_pad, const int* thr, const u32* ready, const u64* cand,
                          bool cands, FacSmem<H>& sm, FacBlk& B) {
    static_assert(FAC_NW >= 2 && H * 128 >= 64, "q and the FC order fit in wo[0], wo[1]");
    float (*q_s)[128] = sm.q_s;
    u32* rows_s = sm.rows_s;
    float* qn = &sm.wo[0][0][0]; // (hps, d) model order
    int* fo = (int*)&sm.wo[1][0][0];
    int tid = threadIdx.x;
    B.s = blockIdx.y;
    B.b = blockIdx.z;
    B.seg = B.b * D.n_sel + B.s;
    B.kvh = kv_of_sel(D, B.s);
    B.r0 = blockIdx.x * rows_per_split;
    int len = lens[B.b];
    cands = cands && ready && cands_cap(D) > 0; // (the launch runs FAC over candidates)
    bool take = false;                          // (and this selection has candidates to take)
    B.cand = 0;
    // (FAC early: the count above the threshold bin, loaded whatever len, with it)
    int a = ready && !cands ? __ldcg(&thr[THR_W * B.seg + 1]) : 0;
    // Copies straight into shared memory: no registers held across the prologue.
    if (sel && !ready) {
        const u32* sg = sel + (size_t)B.seg * D.budget + B.r0;
        for (int i = tid; i < rows_per_split && B.r0 + i < D.budget; i += blockDim.x) cp_async4(&rows_s[i], &sg[i]);
    }
    const float* qg = q + ((size_t)B.b * D.n_q + B.s * D.hps) * D.d;
    int nqe = D.hps * D.d;
    for (int i = tid; i < nqe; i += blockDim.x) cp_async4(&qn[i], &qg[i]);
    if (tid < D.n_fc) cp_async4(&fo[tid], &fc_of_slot[B.kvh * D.n_fc + tid]);
    cp_async_commit();
    if (ready) {
        // The flag's first load goes out with the others (a selection of no rows has none).
        ready_wait(&ready[B.seg], 1, len > 0);
        int n_rows = min(D.budget, len), j = blockIdx.x;
        take = cands && len > D.budget;
        if (take) {
            __shared__ int am_s[3];
            int cap = cands_cap(D);
            const u32* sg = sel + (size_t)B.seg * D.budget;
            const u64* cg = cand + (size_t)B.seg * D.l_max;
            if (tid == 0) {
                am_s[0] = __ldcg(&thr[THR_W * B.seg + 1]);
                am_s[1] = __ldcg(thr_cands(thr, B.seg));
                am_s[2] = __ldcg(&thr[THR_W * B.seg]);
            }
            for (int r = tid; j + r * n_split < D.budget; r += blockDim.x) rows_s[r] = __ldcg(&sg[j + r * n_split]);
            for (int r = tid; r < cap && j + r * n_split < D.l_max; r += blockDim.x) sm.keys_s[r] = __ldcg(&cg[j + r * n_split]);
            __syncthreads();
            a = am_s[0];
            int m = am_s[1];
            B.tb = am_s[2];
            B.na = a > j ? (a - j + n_split - 1) / n_split : 0;
            B.cand = m <= n_split * cap && (D.budget + n_split - 1) / n_split + cap <= FAC_MAX_ROWS + 1;
            if (B.cand) {
                B.nr = B.na + (m > j ? (m - j + n_split - 1) / n_split : 0);
                for (int r = tid; r < B.nr - B.na; r += blockDim.x) rows_s[B.na + r] = skey_token(sm.keys_s[r]);
            } else {
                B.t0 = a + (int)((long long)j * (n_rows - a) / n_split);
                B.nr = B.na + a + (int)((long long)(j + 1) * (n_rows - a) / n_split) - B.t0;
            }
        } else {
            a = len <= D.budget ? len : a;
            B.r0 = (int)((long long)j * a / n_split);
            B.na = (int)((long long)(j + 1) * a / n_split) - B.r0;
            B.t0 = a + (int)((long long)j * (n_rows - a) / n_split);
            B.nr = B.na + a + (int)((long long)(j + 1) * (n_rows - a) / n_split) - B.t0;
        }
    } else {
        int n_rows = sel ? min(D.budget, len) : len;
        B.nr = B.na = min(rows_per_split, n_rows - B.r0);
    }
    if (B.nr <= 0) {
        cp_async_wait<0>(); // (before the block's shared memory is released)
        float* pm = pml + B.part(n_split) * D.hps * 2;
        float* o_out = po + B.part(n_split) * D.hps * D.d;
        for (int i = tid; i < D.hps * D.d; i += blockDim.x) o_out[i] = 0.f;
        for (int h = tid; h < D.hps; h += blockDim.x) { pm[2 * h] = NEG_INF; pm[2 * h + 1] = 0.f; }
        return false;
    }
    if (ready && !take) {
        const u32* sg = sel + (size_t)B.seg * D.budget + B.r0;
        for (int i = tid; i < B.na; i += blockDim.x) rows_s[i] = __ldcg(&sg[i]);
    }
    cp_async_wait<0>();
    __syncthreads();
    for (int i = tid; i < nqe; i += blockDim.x) {
        int h = i / D.d, j = i % D.d;
        q_s[h][j] = D.scale * qn[h * D.d + 2 * fo[j >> 1] + (j & 1)];
    }
    if (zero_pad)
        for (int i = tid; i < H * 128; i += blockDim.x)
            if (i / 128 >= D.hps || i % 128 >= D.d) q_s[i / 128][i % 128] = 0.f;
    if (tid == 0) sm.blk = B;
    __syncthreads();
    return true;
}

// FAC early: the block's rows of the refine, once written, into rows_s[na, nr) (none: at once).
__device__ void fac_tail(const Dims& D, const FacBlk& B, const u32* sel, const u32* ready, u32* rows_s) {
    if (B.nr == B.na) return;
    ready_wait(&ready[B.seg], 2, true);
    const u32* sg = sel + (size_t)B.seg * D.budget + B.t0;
    for (int i = threadIdx.x; i < B.nr - B.na; i += blockDim.x) rows_s[B.na + i] = __ldcg(&sg[i]);
    __syncthreads();
    trace_mark(M_FAC_TAIL);
}

// The rows a FAC block scores before its tail (FAC early; `it` rows per block iteration): all
// of the first part where the block has one iteration (batch 1: the tail's extra iteration runs
// while the refine would be waited for anyway), else its whole iterations, the rest joining the
// tail, so the block runs as many iterations as without FAC early (GPU run 22, 16 × 32k: a
// partial iteration on each side cost more than the overlap gained).
__device__ __forceinline__ int fac_head(const FacBlk& B, int it) {
    if (B.cand) return B.nr; // (FAC over candidates: no tail, every row at once)
    return B.nr > B.na && B.nr > it ? B.na - B.na % it : B.na;
}

// FAC over candidates, warp-wide: the selection's cut key, once the refine has published it.
__device__ __forceinline__ u64 cut_wait(const int* thr, int seg, int tb) {
    const u64* cw = thr_cut(thr, seg);
    u64 x = 0;
    if ((threadIdx.x & 31) == 0)
        for (;;) {
            asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(x) : "l"(cw) : "memory");
            if (x & CUT_SET) break;
            __nanosleep(32);
        }
    x = __shfl_sync(0xffffffffu, x, 0);
    trace_mark(M_FAC_TAIL);
    return ((u64)(u32)tb << CUT_BITS) | (x & CUT_LOW);
}

// The fused combine: FAC's last block of a selection merges its partials and clears FAC early's
// flag for the next step (every block of the selection has read it).
__device__ void fac_combine_fused(const Dims& D, u32* done, int n_split, const float* po, const float* pml, float* out, u32* ready) {
    int s = blockIdx.y, b = blockIdx.z, seg = b * D.n_sel + s;
    if (!last_block(done, seg, n_split)) return;
    combine_seg(D, seg, b, s, n_split, po, pml, out);
    if (ready && threadIdx.x == 0) ready[seg] = 0;
}

// Block-wide epilogue: merges the warps' unnormalized (wm max, wl Σexp, wo output) per head into
// the block's partial, relative to its own max.
template <int H>
__device__ void fac_end(const Dims& D, const FacBlk& B, const FacSmem<H>& sm, float* po, float* pml, int n_split) {
    float* pm = pml + B.part(n_split) * D.hps * 2;
    float* o_out = po + B.part(n_split) * D.hps * D.d;
    const float(*wm)[H] = sm.wm;
    const float(*wl)[H] = sm.wl;
    const float(*wo)[H][128] = sm.wo;
    __syncthreads();
    for (int i = threadIdx.x; i < D.hps * D.d; i += blockDim.x) {
        int h = i / D.d, j = i % D.d;
        float M = NEG_INF;
#pragma unroll
        for (int x = 0; x < FAC_NW; ++x) M = fmaxf(M, wm[x][h]);
        float L = 0.f, O = 0.f;
#pragma unroll
        for (int x = 0; x < FAC_NW; ++x) {
            float e = wm[x][h] == NEG_INF ? 0.f : __expf(wm[x][h] - M);
            L += e * wl[x][h];
            O += e * wo[x][h][j];
        }
        o_out[i] = O;
        if (j == 0) { pm[2 * h] = M; pm[2 * h + 1] = L; }
    }
}

template <class T, int H, int U = FAC_U, bool QS = false>
__device__ void fac_impl(Dims D, const u16* k, const u16* v, const float* q, const int* fc_of_slot, const int* lens, const u32* sel,
                         int rows_per_split, int n_split, float* po, float* pml, u32* done, float* out, const int* thr, u32* ready,
                         const u64* cand) {
    PDL_BEGIN_IF(TR_FAC, !ready);
    __shared__ FacSmem<H> sm;
    FacBlk B0;
    if (fac_begin(D, q, fc_of_slot, lens, sel, rows_per_split, n_split, po, pml, QS, thr, ready, cand, !QS, sm, B0)) {
        const FacBlk& B = sm.blk;
        trace_mark(M_FAC_BEGIN);
        int tid = threadIdx.x, hps = D.hps, d = D.d;
        size_t bk = (size_t)B.b * D.n_kv + B.kvh;
        const u16* kb = k + bk * D.l_max * d;
        const u16* vb = v + bk * D.l_max * d;
        int lane = tid & 31, w = tid >> 5;
        int lpr = d >> 3, rpw = 32 / lpr, n_grp = d >> 4;
        int c = lane % lpr, rsub = lane / lpr;
        // Lane c reads piece c (16 B) of a row's K: k_tok(t) + koff_c. The 4·r lanes of one run
        // read r·32 contiguous bytes (whole 64-byte DRAM units for r = min(KR, n_grp) ≥ 2).
        int koff_c = k_piece(c, n_grp);
        float qr[QS ? 1 : H][8];
        if (!QS)
#pragma unroll
            for (int h = 0; h < (QS ? 1 : H); ++h)
#pragma unroll
                for (int e = 0; e < 8; ++e) qr[h][e] = h < hps ? sm.q_s[h][c * 8 + e] : 0.f;
        float m[H], l[H], acc[H][8];
#pragma unroll
        for (int h = 0; h < H; ++h) {
            m[h] = NEG_INF;
            l[h] = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[h][e] = 0.f;
        }
        int wrows = rpw * U; // rows of one warp iteration
        u64 cut = 0;
        bool have_cut = false;
        // Rows [0, head), then (FAC early) the rest with the refine's once written.
        for (int i0 = 0, i1 = fac_head(B, FAC_NW * wrows);; i0 = i1, i1 = B.nr) {
            for (int base = i0 + w * wrows; base < i1; base += FAC_NW * wrows) {
                uint4 kr[U], vr[U];
#pragma unroll
                for (int j = 0; j < U; ++j) {
                    int i = base + j * rpw + rsub;
                    kr[j] = vr[j] = make_uint4(0, 0, 0, 0);
                    if (i < i1) {
                        u32 t = B.row(sm.rows_s, sel, i);
                        kr[j] = ld_stream(kb + k_tok(t, n_grp) + koff_c);
                        vr[j] = ld_stream(vb + (size_t)t * d + c * 8);
                    }
                }
                float sc[H][U];
#pragma unroll
                for (int j = 0; j < U; ++j) {
                    float f[8];
                    unpack8<T>(kr[j], f);
                    bool ok = base + j * rpw + rsub < i1;
#pragma unroll
                    for (int h = 0; h < H; ++h) {
                        float a = 0.f;
                        if (QS) {
                            float4 qa = lds4(&sm.q_s[h][c * 8]), qb = lds4(&sm.q_s[h][c * 8 + 4]);
                            a += qa.x * f[0]; a += qa.y * f[1]; a += qa.z * f[2]; a += qa.w * f[3];
                            a += qb.x * f[4]; a += qb.y * f[5]; a += qb.z * f[6]; a += qb.w * f[7];
                        } else {
#pragma unroll
                            for (int e = 0; e < 8; ++e) a += qr[QS ? 0 : h][e] * f[e];
                        }
                        // Fixed, unrolled butterfly (a run-time trip count made each dot's reduction a
                        // serial loop: 16 dependent shuffle chains per iteration); with d = 64 the
                        // xor-8 step would mix two rows, so its result is dropped.
#pragma unroll
                        for (int o = 8; o > 0; o >>= 1) {
                            float y = __shfl_xor_sync(0xffffffffu, a, o);
                            a += o < lpr ? y : 0.f;
                        }
                        sc[h][j] = ok ? a : NEG_INF;
                    }
                }
                // FAC over candidates: rows past na are candidates, loaded and scored before the
                // cut is known; those below it are masked (warp-uniform test).
                if (!QS && B.cand && base + wrows > B.na) {
                    if (!have_cut) cut = cut_wait(thr, B.seg, B.tb);
                    have_cut = true;
#pragma unroll
                    for (int j = 0; j < U; ++j) {
                        int i = base + j * rpw + rsub;
                        if (i >= B.na && i < i1 && sm.keys_s[i - B.na] < cut)
#pragma unroll
                            for (int h = 0; h < H; ++h) sc[h][j] = NEG_INF;
                    }
                }
#pragma unroll
                for (int h = 0; h < H; ++h) {
                    float mx = sc[h][0];
#pragma unroll
                    for (int j = 1; j < U; ++j) mx = fmaxf(mx, sc[h][j]);
                    float mn = fmaxf(m[h], mx);
                    float al = (m[h] == NEG_INF) ? 0.f : __expf(m[h] - mn);
                    l[h] *= al;
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[h][e] *= al;
                    m[h] = mn;
#pragma unroll
                    for (int j = 0; j < U; ++j) sc[h][j] = (sc[h][j] == NEG_INF) ? 0.f : __expf(sc[h][j] - mn);
                }
#pragma unroll
                for (int j = 0; j < U; ++j) {
                    float f[8];
                    unpack8<T>(vr[j], f);
#pragma unroll
                    for (int h = 0; h < H; ++h) {
                        float p = sc[h][j];
                        l[h] += p;
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[h][e] += p * f[e];
                    }
                }
            }
            if (i1 == B.nr) break;
            fac_tail(D, B, sel, ready, sm.rows_s);
        }
        // Merge the row groups of the warp (lanes c, c+lpr, ...: same dims, other rows).
        for (int o = lpr; o < 32; o <<= 1) {
#pragma unroll
            for (int h = 0; h < H; ++h) {
                float m2 = __shfl_xor_sync(0xffffffffu, m[h], o);
                float l2 = __shfl_xor_sync(0xffffffffu, l[h], o);
                float mn = fmaxf(m[h], m2);
                float a1 = m[h] == NEG_INF ? 0.f : __expf(m[h] - mn);
                float a2 = m2 == NEG_INF ? 0.f : __expf(m2 - mn);
                l[h] = l[h] * a1 + l2 * a2;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    float x2 = __shfl_xor_sync(0xffffffffu, acc[h][e], o);
                    acc[h][e] = acc[h][e] * a1 + x2 * a2;
                }
                m[h] = mn;
            }
        }
        if (rsub == 0) {
#pragma unroll
            for (int h = 0; h < H; ++h) {
                if (h < hps) {
                    *(float4*)&sm.wo[w][h][c * 8] = make_float4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]);
                    *(float4*)&sm.wo[w][h][c * 8 + 4] = make_float4(acc[h][4], acc[h][5], acc[h][6], acc[h][7]);
                    if (c == 0) { sm.wm[w][h] = m[h]; sm.wl[w][h] = l[h]; }
                }
            }
        }
        trace_mark(M_FAC_LOOP);
        fac_end<H>(D, B, sm, po, pml, n_split);
    }
    if (out) fac_combine_fused(D, done, n_split, po, pml, out, ready);
}

// The 16-bit tensor-core operations of one storage type (sm_80+): pairs packed as .f16x2 or
// .bf16x2 (element 0 in the low half), and mma.sync m16n8k16 with f32 accumulation.
template <class T> struct Mma;
template <> struct Mma<F16> {
    static constexpr int NS = 2; // split_pair terms
    static __device__ __forceinline__ u32 pack(float x0, float x1) { u32 r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(x1), "f"(x0)); return r; }
    static __device__ __forceinline__ float lo(u32 x) { return h2f((u16)(x & 0xffffu)); }
    static __device__ __forceinline__ float hi(u32 x) { return h2f((u16)(x >> 16)); }
    static __device__ __forceinline__ void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
};
template <> struct Mma<BF16> {
    static constexpr int NS = 3;
    static __device__ __forceinline__ u32 pack(float x0, float x1) { u32 r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(x1), "f"(x0)); return r; }
    static __device__ __forceinline__ float lo(u32 x) { return __uint_as_float(x << 16); }
    static __device__ __forceinline__ float hi(u32 x) { return __uint_as_float(x & 0xffff0000u); }
    static __device__ __forceinline__ void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
};

__device__ __forceinline__ float ex2(float x) { float r; asm("ex2.approx.f32 %0, %1;" : "=f"(r) : "f"(x)); return r; }

// (x0, x1) as a sum of Mma<T>::NS 16-bit pairs, each the rounding of what the ones before left:
// two f16 pairs hold an f32 pair to ~2^-22 relative (to ~3e-8 absolute below 6e-5, where the
// second term is subnormal), three bf16 pairs to ~2^-24, so NS mma with 16-bit operands give
// nearly the products of f32 operands.
template <class T> __device__ __forceinline__ void split_pair(float x0, float x1, u32 (&r)[Mma<T>::NS]) {
#pragma unroll
    for (int i = 0; i < Mma<T>::NS; ++i) {
        r[i] = Mma<T>::pack(x0, x1);
        x0 -= Mma<T>::lo(r[i]);
        x1 -= Mma<T>::hi(r[i]);
    }
}

// Half i of row x's V pieces (the lane's 16-bit elements i = 0 .. DD/8 − 1 as u32 pairs) paired
// with the same half of row y, x's in the low half: one column pair of a Vᵀ fragment.
template <int NW> __device__ __forceinline__ u32 pair_half(const u32 (&x)[NW], const u32 (&y)[NW], int i) {
    return __byte_perm(x[i >> 1], y[i >> 1], (i & 1) ? 0x7632 : 0x5410);
}

// 4/5 on tensor cores (`facm_d<DD>_*`, sm_80+): fac_impl's partials from mma.sync m16n8k16.
// Each warp takes tiles of 16 rows (two n-tiles of 8, rows T0 = base .. +7, T1 = base + 8 ..).
//   S (16 × 8 per n-tile) = Q (16 × DD: the ≤ 8 heads as rows 0..7, rows 8..15 zero) · Kᵀ;
//   Oᵀ (DD × 8) += Vᵀ (16 dims per m-tile × the 16 rows) · Pᵀ (16 rows × 8 heads).
// S's accumulator layout (lane = 4g + c: head g, rows 2c, 2c + 1 of each n-tile) is Pᵀ's operand
// layout, so P never leaves the lane. A dot product does not care in which order its dims are
// summed, so lanes load whole 16-byte pieces: K row T[g] piece p = c + 4i is slice 2i + hh's
// (b0, b1) = words (2hh, 2hh + 1), and Q's fragment takes the same dims; V row T0[2c + e] and
// T1[2c + e] dims 8g .. 8g + 7 (and 64 + 8g .., d = 128: 8 lanes read one row's 128 contiguous
// bytes per load) are Vᵀ's rows g and g + 8 of each m-tile. q and p go in as sums of 16-bit
// pairs (split_pair: NS mma each), so products are those of f32 q and p, as fac_impl's.
// The products are exact, the tensor cores' f32 sums are not rounded as IEEE adds are, and the
// second fp16 term of a pair below ~6e-5 is subnormal (absolute error ≤ 3e-8 per p element; q is
// first scaled by a power of two into [0.5, 1) per head).
// Tests: the dense output within 2.4–3.0e-7 of fac_impl's, FAC and dense within 1.2e-6 of the CPU
// on captured K/V (GPU run 19). Per lane: Q fragments NS·DD/8 registers, accumulators DD/4, and
// DD/2 for each of the TU tiles' K and V loads: with TU = 2 (FACM_TU), 255 registers at d = 128
// and 2 blocks per SM, which beat one tile at 3 blocks per SM at every target shape (run 19).
template <class T, int DD, int TU>
__device__ void facm_impl(Dims D, const u16* k, const u16* v, const float* q, const int* fc_of_slot, const int* lens, const u32* sel,
                          int rows_per_split, int n_split, float* po, float* pml, u32* done, float* out, const int* thr, u32* ready) {
    PDL_BEGIN_IF(TR_FAC, !ready);
    constexpr int NKS = DD / 16;  // k-slices of S, m-tiles of Oᵀ
    constexpr int NPT = DD / 32;  // K pieces per lane and row (4 lanes a row)
    constexpr int VP = DD / 64;   // V pieces per lane and row (8 lanes a row)
    constexpr int NGRP = DD / 16; // K groups per row
    __shared__ FacSmem<MAXH> sm;
    FacBlk B0;
    if (fac_begin(D, q, fc_of_slot, lens, sel, rows_per_split, n_split, po, pml, true, thr, ready, nullptr, false, sm, B0)) {
        const FacBlk& B = sm.blk;
        trace_mark(M_FAC_BEGIN);
        int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, c = lane & 3, hps = D.hps;
        size_t bk = (size_t)B.b * D.n_kv + B.kvh;
        const u16* kb = k + bk * D.l_max * DD;
        const u16* vb = v + bk * D.l_max * DD;
        constexpr int NS = Mma<T>::NS;
        // Head g's q goes in as q·2^-qe, max |q·2^-qe| in [0.5, 1) (its quad holds all its dims),
        // so its fp16 pairs neither overflow (|q·scale| ≥ 65504 gave ∞, GPU run 37) nor lose a
        // tiny q to subnormals. S is then s·2^-qe: the online softmax runs on it with the 2^qe
        // folded into the exp2's factor c2, and m goes back to score units at the end. Powers of
        // two, so exact. (GPU run 38: the loop's c2 register costs dense 1.5–2 % at batch 1.)
        float qmax = 0.f;
#pragma unroll
        for (int i = 0; i < NPT; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) qmax = fmaxf(qmax, fabsf(sm.q_s[g][8 * (c + 4 * i) + j]));
        qmax = fmaxf(qmax, __shfl_xor_sync(0xffffffffu, qmax, 1));
        qmax = fmaxf(qmax, __shfl_xor_sync(0xffffffffu, qmax, 2));
        int qe = qmax > 0.f ? min(max(((__float_as_int(qmax) >> 23) & 0xff) - 126, -125), 126) : 0; // qmax < 2^qe
        const float qdown = __int_as_float((127 - qe) << 23), qup = __int_as_float((127 + qe) << 23);
        const float c2 = qup * 1.44269504f; // exp(s − m) = 2^((s' − m')·c2)
        u32 qa[NKS][2][NS]; // Q's (a0, a2) of each k-slice, as NS split terms
        int koff[NPT];
#pragma unroll
        for (int i = 0; i < NPT; ++i) {
            int p = c + 4 * i;
            koff[i] = k_piece(p, NGRP);
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const float* qp = &sm.q_s[g][8 * p + 4 * hh];
                split_pair<T>(qp[0] * qdown, qp[1] * qdown, qa[2 * i + hh][0]);
                split_pair<T>(qp[2] * qdown, qp[3] * qdown, qa[2 * i + hh][1]);
            }
        }
        float m = NEG_INF, l = 0.f, acc[NKS][4];
#pragma unroll
        for (int mt = 0; mt < NKS; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][e] = 0.f;
        // TU tiles per iteration, all their loads issued before any is used. Rows [0, head), then
        // (FAC early) the rest with the refine's once written.
        for (int i0 = 0, i1 = fac_head(B, FAC_NW * 16 * TU);; i0 = i1, i1 = B.nr) {
            for (int base = i0 + w * 16 * TU; base < i1; base += FAC_NW * 16 * TU) {
                uint4 kr_t[TU][2][NPT], vr_t[TU][4][VP];
#pragma unroll
                for (int tt = 0; tt < TU; ++tt) {
                    int tb = base + 16 * tt;
#pragma unroll
                    for (int nt = 0; nt < 2; ++nt) {
                        int i = tb + 8 * nt + g;
                        const u16* kt = kb + k_tok(i < i1 ? B.row(sm.rows_s, sel, i) : 0u, NGRP);
#pragma unroll
                        for (int pi = 0; pi < NPT; ++pi) kr_t[tt][nt][pi] = i < i1 ? ld_stream(kt + koff[pi]) : make_uint4(0, 0, 0, 0);
                    }
#pragma unroll
                    for (int x = 0; x < 4; ++x) {
                        int i = tb + 8 * (x >> 1) + 2 * c + (x & 1);
                        u32 t = i < i1 ? B.row(sm.rows_s, sel, i) : 0u;
#pragma unroll
                        for (int vp = 0; vp < VP; ++vp) vr_t[tt][x][vp] = i < i1 ? ld_stream(vb + (size_t)t * DD + 64 * vp + 8 * g) : make_uint4(0, 0, 0, 0);
                    }
                }
#pragma unroll
                for (int tt = 0; tt < TU; ++tt) {
                    int tb = base + 16 * tt;
                    if (tb >= i1) break; // (warp-uniform)
                    const uint4(&kr)[2][NPT] = kr_t[tt];
                    const uint4(&vr)[4][VP] = vr_t[tt];
                    // S: sc[nt][e] = head g's score of row tb + 8nt + 2c + e.
                    float sc[2][2];
#pragma unroll
                    for (int nt = 0; nt < 2; ++nt) {
                        float s4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                        for (int ks = 0; ks < NKS; ++ks) {
                            const uint4& kp = kr[nt][ks >> 1];
                            u32 b0 = (ks & 1) ? kp.z : kp.x, b1 = (ks & 1) ? kp.w : kp.y;
#pragma unroll
                            for (int x = 0; x < NS; ++x) Mma<T>::mma(s4, qa[ks][0][x], 0u, qa[ks][1][x], 0u, b0, b1);
                        }
#pragma unroll
                        for (int e = 0; e < 2; ++e) sc[nt][e] = tb + 8 * nt + 2 * c + e < i1 ? s4[e] : NEG_INF;
                    }
                    // Online softmax of head g over the tile (its 16 rows are the lanes of one quad).
                    float mx = fmaxf(fmaxf(sc[0][0], sc[0][1]), fmaxf(sc[1][0], sc[1][1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    float mn = fmaxf(m, mx); // finite: row tb is in the tile
                    float al = m == NEG_INF ? 0.f : ex2((m - mn) * c2);
                    m = mn;
                    float p[2][2];
#pragma unroll
                    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) p[nt][e] = sc[nt][e] == NEG_INF ? 0.f : ex2((sc[nt][e] - mn) * c2);
                    l = l * al + (p[0][0] + p[0][1]) + (p[1][0] + p[1][1]);
                    // Oᵀ's columns are heads 2c, 2c + 1: their rescale factors from quads 2c, 2c + 1.
                    float al0 = __shfl_sync(0xffffffffu, al, 8 * c), al1 = __shfl_sync(0xffffffffu, al, 8 * c + 4);
                    u32 pb[2][NS]; // Pᵀ's (b0, b1) as split terms
                    split_pair<T>(p[0][0], p[0][1], pb[0]);
                    split_pair<T>(p[1][0], p[1][1], pb[1]);
                    u32 vw[4][4 * VP];
#pragma unroll
                    for (int x = 0; x < 4; ++x)
#pragma unroll
                        for (int vp = 0; vp < VP; ++vp) {
                            vw[x][4 * vp] = vr[x][vp].x; vw[x][4 * vp + 1] = vr[x][vp].y;
                            vw[x][4 * vp + 2] = vr[x][vp].z; vw[x][4 * vp + 3] = vr[x][vp].w;
                        }
#pragma unroll
                    for (int mt = 0; mt < NKS; ++mt) {
                        acc[mt][0] *= al0; acc[mt][1] *= al1; acc[mt][2] *= al0; acc[mt][3] *= al1;
                        u32 a0 = pair_half(vw[0], vw[1], mt), a1 = pair_half(vw[0], vw[1], NKS + mt);
                        u32 a2 = pair_half(vw[2], vw[3], mt), a3 = pair_half(vw[2], vw[3], NKS + mt);
#pragma unroll
                        for (int x = 0; x < NS; ++x) Mma<T>::mma(acc[mt], a0, a1, a2, a3, pb[0][x], pb[1][x]);
                    }
                }
            }
            if (i1 == B.nr) break;
            fac_tail(D, B, sel, ready, sm.rows_s);
        }
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        if (c == 0 && g < hps) { sm.wm[w][g] = m * qup; sm.wl[w][g] = l; } // (m back in score units)
        // Oᵀ rows g, g + 8 of m-tile mt are the lane's halves mt and NKS + mt: dims dim_of(·).
        auto dim_of = [&](int i) { return i < 8 ? 8 * g + i : 64 + 8 * g + (i - 8); };
#pragma unroll
        for (int mt = 0; mt < NKS; ++mt)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                if (2 * c + e < hps) {
                    sm.wo[w][2 * c + e][dim_of(mt)] = acc[mt][e];
                    sm.wo[w][2 * c + e][dim_of(NKS + mt)] = acc[mt][2 + e];
                }
        trace_mark(M_FAC_LOOP);
        fac_end<MAXH>(D, B, sm, po, pml, n_split);
    }
    if (out) fac_combine_fused(D, done, n_split, po, pml, out, ready);
}

// (max M, Σ e·l, Σ e·o) of head h, dim j over splits sp0, sp0 + step, … < n_split, e = exp(m − M):
// two passes, the max and then the rescaled sums, so the loads of each pass are independent (an
// online rescale made each split wait for the one before: fac_combine 8.6 µs at batch 1 over 32
// splits, ncu, GPU run 12).
__device__ __forceinline__ void combine_splits(const Dims& D, int seg, int h, int j, int sp0, int step, int n_split, const float* po,
                                               const float* pm, float* M_out, float* L_out, float* O_out) {
    float M = NEG_INF;
#pragma unroll 8
    for (int sp = sp0; sp < n_split; sp += step) M = fmaxf(M, __ldcg(&pm[(sp * D.hps + h) * 2]));
    float L = 0.f, O = 0.f;
#pragma unroll 8
    for (int sp = sp0; sp < n_split; sp += step) {
        float m = __ldcg(&pm[(sp * D.hps + h) * 2]);
        float l = __ldcg(&pm[(sp * D.hps + h) * 2 + 1]);
        float o = __ldcg(&po[(((size_t)seg * n_split + sp) * D.hps + h) * D.d + j]);
        float e = m == NEG_INF ? 0.f : __expf(m - M);
        L += e * l;
        O += e * o;
    }
    *M_out = M;
    *L_out = L;
    *O_out = O;
}

__device__ __forceinline__ void combine_splits8(const Dims& D, int seg, int h, int j, int sp0, int step, int n_split, const float* po,
                                                const float* pm, float* M_out, float* L_out, float* O_out) {
    // combine_splits with eight splits at a time, all their loads in flight at once (one memory
    // latency per 8 splits, not two: a max pass then a sum pass); the running sums are rescaled
    // once per 8. With ≤ 8 splits per walker (batch 1, Llama shapes: 32 splits over 4 groups) the
    // same operations in the same order. (FAC's fused merge keeps combine_splits: this one's
    // registers made facl_h4 spill more.)
    float M = NEG_INF, L = 0.f, O = 0.f;
    for (int c0 = sp0; c0 < n_split; c0 += 8 * step) {
        float m[8], l[8], o[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            int sp = c0 + u * step;
            bool ok = sp < n_split;
            m[u] = ok ? __ldcg(&pm[(sp * D.hps + h) * 2]) : NEG_INF;
            l[u] = ok ? __ldcg(&pm[(sp * D.hps + h) * 2 + 1]) : 0.f;
            o[u] = ok ? __ldcg(&po[(((size_t)seg * n_split + sp) * D.hps + h) * D.d + j]) : 0.f;
        }
        float Mc = M;
#pragma unroll
        for (int u = 0; u < 8; ++u) Mc = fmaxf(Mc, m[u]);
        float r = M == NEG_INF ? 0.f : __expf(M - Mc);
        L *= r;
        O *= r;
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            float e = m[u] == NEG_INF ? 0.f : __expf(m[u] - Mc);
            L += e * l[u];
            O += e * o[u];
        }
        M = Mc;
    }
    *M_out = M;
    *L_out = L;
    *O_out = O;
}

// Merges the partials of every split of one selection into out (batch, n_q, d) f32; a block's
// threads split the (head, dim) elements, each walks all splits twice (combine_splits).
__device__ void combine_seg(const Dims& D, int seg, int b, int s, int n_split, const float* po, const float* pml, float* out) {
    const float* pm = pml + (size_t)seg * n_split * D.hps * 2;
    for (int i = threadIdx.x; i < D.hps * D.d; i += blockDim.x) {
        int h = i / D.d, j = i % D.d;
        float M, L, O;
        combine_splits(D, seg, h, j, 0, 1, n_split, po, pm, &M, &L, &O);
        out[((size_t)b * D.n_q + s * D.hps + h) * D.d + j] = O / L;
    }
}

// Combine over many splits: grid (hps, n_sel, batch), block FAC_CMB (d·groups): each group of d
// threads takes every groups-th split, then the groups merge through shared memory.
// C8 (`fac_combine8`): the walkers load 8 splits at once (combine_splits8): one memory latency
// instead of two where a walker has ≤ 8 splits, but 40 registers instead of 32, so 3 blocks per SM
// instead of 4 (a second wave at 16 × Llama-3-8B's 32 q heads = 512 blocks); the launcher takes
// it where walkers have more than 4 splits (GPU run 16: batch 1, 32 splits: 32.1 → 29.7 µs paper
// int8 at 32k, dense 75.7 → 65.2; batch 16, 8 splits: 120.0 → 121.9 with it, so not there).
#define FAC_CMB 512
// With `ready` (FAC early), head 0's block clears the selection's flag for the next step (FAC,
// which this launch waited for, has read it).
template <bool C8>
__device__ void fac_combine_impl(Dims D, int n_split, const float* po, const float* pml, float* out, u32* ready) {
    __shared__ float sm[FAC_CMB], sl[FAC_CMB], so[FAC_CMB];
    int h = blockIdx.x, s = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    int seg = b * D.n_sel + s, d = D.d;
    if (ready && h == 0 && tid == 0) ready[seg] = 0;
    int ng = blockDim.x / d, g = tid / d, j = tid % d;
    const float* pm = pml + (size_t)seg * n_split * D.hps * 2;
    float M = NEG_INF, L = 0.f, O = 0.f;
    if (g < ng) {
        if (C8) combine_splits8(D, seg, h, j, g, ng, n_split, po, pm, &M, &L, &O);
        else combine_splits(D, seg, h, j, g, ng, n_split, po, pm, &M, &L, &O);
    }
    sm[tid] = M; sl[tid] = L; so[tid] = O;
    __syncthreads();
    if (tid < d) {
        float MM = NEG_INF;
        for (int x = 0; x < ng; ++x) MM = fmaxf(MM, sm[x * d + tid]);
        float LL = 0.f, OO = 0.f;
        for (int x = 0; x < ng; ++x) {
            float mx = sm[x * d + tid];
            if (mx == NEG_INF) continue;
            float e = __expf(mx - MM);
            LL += e * sl[x * d + tid];
            OO += e * so[x * d + tid];
        }
        out[((size_t)b * D.n_q + s * D.hps + h) * d + tid] = OO / LL;
    }
}
extern "C" __global__ void __launch_bounds__(FAC_CMB) fac_combine(Dims D, int n_split, const float* po, const float* pml, float* out, u32* ready) {
    PDL_BEGIN(TR_COMBINE);
    fac_combine_impl<false>(D, n_split, po, pml, out, ready);
}
extern "C" __global__ void __launch_bounds__(FAC_CMB) fac_combine8(Dims D, int n_split, const float* po, const float* pml, float* out, u32* ready) {
    PDL_BEGIN(TR_COMBINE);
    fac_combine_impl<true>(D, n_split, po, pml, out, ready);
}

// ---------------------------------------------------------------------------------------------
// Benchmark helper: uniform values in (-amp, amp) from a hash of (seed, index).
__device__ __forceinline__ float hash_unit(u64 i, u32 seed) {
    u64 x = i * 0x9E3779B97F4A7C15ull + (u64)seed * 0xD1B54A32D192ED03ull;
    x ^= x >> 31; x *= 0x7fb5d329728ea185ull; x ^= x >> 27; x *= 0x81dadef4bc2dd44dull; x ^= x >> 33;
    return (float)(x >> 40) * (1.0f / 16777216.0f) * 2.f - 1.f;
}

// ---------------------------------------------------------------------------------------------
// extern "C" entry points, `<op>_<dtype>`.
#define FAC_ENTRY(NAME, TY, HH)                                                                                          \
    extern "C" __global__ void __launch_bounds__(FAC_THREADS, FAC_MINB(HH)) fac_h##HH##_##NAME(                                        \
        Dims D, const u16* k, const u16* v, const float* q, const int* fc_of_slot, const int* lens, const u32* sel,       \
        int rows_per_split, int n_split, float* po, float* pml, u32* done, float* out, const int* thr, u32* ready,        \
        const u64* cand) {                                                                                               \
        fac_impl<TY, HH>(D, k, v, q, fc_of_slot, lens, sel, rows_per_split, n_split, po, pml, done, out, thr, ready, cand); \
    }                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(FAC_THREADS, FACL_MINB(HH)) facl_h##HH##_##NAME(                         \
        Dims D, const u16* k, const u16* v, const float* q, const int* fc_of_slot, const int* lens, const u32* sel,       \
        int rows_per_split, int n_split, float* po, float* pml, u32* done, float* out, const int* thr, u32* ready,        \
        const u64* cand) {                                                                                               \
        fac_impl<TY, HH, FACL_U(HH), true>(D, k, v, q, fc_of_slot, lens, sel, rows_per_split, n_split, po, pml, done, out, thr, ready, \
                                           cand);                                                                        \
    }
#define FACW_ENTRY(NAME, TY, HH)                                                                                         \
    extern "C" __global__ void __launch_bounds__(FAC_THREADS, 2) facw_h##HH##_##NAME(                                     \
        Dims D, const u16* k, const u16* v, const float* q, const int* fc_of_slot, const int* lens, const u32* sel,       \
        int rows_per_split, int n_split, float* po, float* pml, u32* done, float* out, const int* thr, u32* ready,        \
        const u64* cand) {                                                                                               \
        fac_impl<TY, HH, FACW_U>(D, k, v, q, fc_of_slot, lens, sel, rows_per_split, n_split, po, pml, done, out, thr, ready, cand); \
    }
// Tensor-core FAC for head dim DD, every group size (≤ MAXH heads).
#define FACM_ENTRY(NAME, TY, DD)                                                                                         \
    extern "C" __global__ void __launch_bounds__(FAC_THREADS, FACM_MINB) facm_d##DD##_##NAME(                           \
        Dims D, const u16* k, const u16* v, const float* q, const int* fc_of_slot, const int* lens, const u32* sel,       \
        int rows_per_split, int n_split, float* po, float* pml, u32* done, float* out, const int* thr, u32* ready,        \
        const u64* cand) {                                                                                               \
        facm_impl<TY, DD, FACM_TU>(D, k, v, q, fc_of_slot, lens, sel, rows_per_split, n_split, po, pml, done, out, thr, ready); \
    }
#define TIP_HEADS_ENTRY(NAME, TY, HH)                                                                                    \
    extern "C" __global__ void __launch_bounds__(TIP_THREADS) tip_heads_h##HH##_##NAME(                                  \
        Dims D, const u16* k, const float* q, const int* pool, const double* mom, const int* lens,                         \
        float* xh, float* pml, int nchunk) {                                                                             \
        tip_heads_impl<TY, HH, false>(D, k, nullptr, nullptr, nullptr, q, pool, mom, lens, xh, pml, nchunk);             \
    }                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(TIP_THREADS, 2) tip8_heads_h##HH##_##NAME(                              \
        Dims D, const u16* k, const i8* kq, const float* ks, const int* q8n, const float* q,                             \
        const int* pool, const double* mom, const int* lens, float* xh, float* pml, int nchunk) {                        \
        tip_heads_impl<TY, HH, true>(D, k, kq, ks, q8n, q, pool, mom, lens, xh, pml, nchunk);                           \
    }
// Pipelined int8 TIP `tip8p_<NS>x<JU><MN>_<dtype>` (MN: false, true, int for MODE 0, 1, 2),
// MINB resident blocks per SM.
#define TIP8P_ENTRY(NAME, TY, NS, JU, MINB, MODE, MN)                                                                    \
    extern "C" __global__ void __launch_bounds__(TIP_THREADS, MINB) tip8p_##NS##x##JU##MN##_##NAME(                     \
        Dims D, const u16* k, const i8* kq, const float* ks, const int* q8n, const float* q,                             \
        const int* pool, const double* mom, const int* lens, float* scores, u32* hist, u32* done, int* thr, int nchunk) { \
        tip8p_impl<TY, NS, JU, MODE, 1>(D, k, kq, ks, q8n, q, pool, mom, lens, scores, hist, done, thr, nchunk,             \
                                        nullptr);                                                                        \
    }
// Pipelined int4 TIP `tip4p_<NS>x4int_<dtype>`: tip8p_<NS>x4int over int4 planes (Q4_PLANES),
// TIP4_MINB resident blocks per SM (GPU run 28, paper int4 step, same call, 2 / 3: 1 × 128k 33.6 /
// 34.6 µs at the automatic chunks, 4 / 3 a block (33.4 with 4), 16 × 128k 208.9 / 198.7; 2 kept
// for batch 1, whose targets are the ones missed).
#ifndef TIP4_MINB
#define TIP4_MINB 2
#endif
#define TIP4P_ENTRY(NAME, TY, NS)                                                                                        \
    extern "C" __global__ void __launch_bounds__(TIP_THREADS, TIP4_MINB) tip4p_##NS##x4int_##NAME(                      \
        Dims D, const u16* k, const i8* kq, const float* ks, const int* q8n, const float* q,                             \
        const int* pool, const double* mom, const int* lens, float* scores, u32* hist, u32* done, int* thr, int nchunk) { \
        tip8p_impl<TY, NS, 4, 2, 1, true>(D, k, kq, ks, q8n, q, pool, mom, lens, scores, hist, done, thr,                \
                                          nchunk, nullptr);                                                              \
    }
// Pipelined per-head int8 TIP `tip8ph_h<H>x<JU>_<dtype>` (group-mass stage 1, tip8_heads' outputs
// and arithmetic): 2 stages of JU tokens per thread, MODE 0. JU is in the name because the launcher
// sizes the stages' shared memory from it (gpu::TIP8PH_JU).
#define TIP8PH_ENTRY(NAME, TY, HH, JU)                                                                                   \
    extern "C" __global__ void __launch_bounds__(TIP_THREADS, 2) tip8ph_h##HH##x##JU##_##NAME(                          \
        Dims D, const u16* k, const i8* kq, const float* ks, const int* q8n, const float* q,                             \
        const int* pool, const double* mom, const int* lens, float* xh, float* pml, int nchunk) {                        \
        tip8p_impl<TY, 2, JU, 0, HH>(D, k, kq, ks, q8n, q, pool, mom, lens, xh, nullptr, nullptr, nullptr,               \
                                     nchunk, pml);                                                                       \
    }
// Its twin over int4 planes, `tip4ph_h<H>x<JU>_<dtype>` (Q4_PLANES).
#define TIP4PH_ENTRY(NAME, TY, HH, JU)                                                                                   \
    extern "C" __global__ void __launch_bounds__(TIP_THREADS, 2) tip4ph_h##HH##x##JU##_##NAME(                          \
        Dims D, const u16* k, const i8* kq, const float* ks, const int* q8n, const float* q,                             \
        const int* pool, const double* mom, const int* lens, float* xh, float* pml, int nchunk) {                        \
        tip8p_impl<TY, 2, JU, 0, HH, true>(D, k, kq, ks, q8n, q, pool, mom, lens, xh, nullptr, nullptr,                  \
                                           nullptr, nchunk, pml);                                                        \
    }
// TIP over per-FC int8 planes `tipfc_h<H>x<TPT>_<dtype>` (tipfc_impl): H = 1 the summed score
// (tip8's arguments and outputs), else the group-mass stage 1 (tip8_heads'); TPT tokens a thread
// (8, or 4 for 8 heads' accumulators, and 4 for a block of an odd number of 1024-token chunks,
// whose last step of 2048 would leave half the threads idle: gpu::tipfc_narrow; in the name
// because the launcher sizes the stages' shared memory from it, gpu::tipfc_tpt), units of TIPFC_U
// slots in TIPFC_NS stages (dynamic shared memory: the launcher sets both, gpu::tipfc_cfg), 2
// resident blocks per SM.
#ifndef TIPFC_U
#define TIPFC_U 4
#endif
#ifndef TIPFC_NS
#define TIPFC_NS 3
#endif
#define TIPFC_ENTRY(NAME, TY, HH, TPT)                                                                                   \
    extern "C" __global__ void __launch_bounds__(TIP_THREADS, 2) tipfc_h##HH##x##TPT##_##NAME(                                  \
        Dims D, const u16* k, const i8* kq, const float* ks, const int* q8n, const float* q,                             \
        const int* pool, const double* mom, const int* lens, float* out, u32* hist, u32* done, int* thr, int nchunk,     \
        float* pml) {                                                                                                    \
        tipfc_impl<TY, HH, TPT, TIPFC_U, TIPFC_NS>(D, k, kq, ks, q8n, q, pool, mom, lens, out, hist, done, thr, nchunk,             \
                                         pml);                                                                           \
    }
// Group-mass stage 1 over per-FC int8 planes on tensor cores `tipm_h<H>k<KS>_<dtype>` (tipm_impl):
// KS k-steps of 16 FCs, TIPM_MINB resident blocks per SM at least; dynamic shared memory
// gpu::tipm_smem. GPU run 32 (default int8 step, same call, TIPM_MINB 2 / 3: 80 registers, no
// spills): 16 × 32k 153.2 / 158.7 µs, 1 × 128k 58.0 / 61.3, 16 × 128k 448.4 / 459.6.
#ifndef TIPM_MINB
#define TIPM_MINB 2
#endif
#define TIPM_ENTRY(NAME, TY, HH, KS)                                                                                     \
    extern "C" __global__ void __launch_bounds__(TIP_THREADS, TIPM_MINB) tipm_h##HH##k##KS##_##NAME(                     \
        Dims D, const u16* k, const i8* kq, const float* ks, const int* q8n, const float* q, const int* pool,            \
        const double* mom, const int* lens, float* xh, float* pml, int nchunk) {                                         \
        tipm_impl<TY, HH, KS>(D, k, kq, ks, q8n, q, pool, mom, lens, xh, nchunk, pml);                                   \
    }
#define DEFINE_TYPED(NAME, TY)                                                                                           \
    extern "C" __global__ void append_##NAME(Dims D, u16* k, u16* v, const float* k_new, const float* v_new, const int* pos, \
                                             const int* slot_of_fc, double* mom, int* mom_len, i8* kq, float* ks,        \
                                             int* q8n) {                                                                 \
        append_impl<TY>(D, k, v, k_new, v_new, pos, slot_of_fc, mom, mom_len, kq, ks, q8n);                              \
    }                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256) append_rows_##NAME(Dims D, u16* k, u16* v, const float* k_new,   \
                                                    const float* v_new, int b, int t0, int len,          \
                                                    const int* slot_of_fc, double* mom, int* mom_len,    \
                                                    int* q8n, int* q8from) {                              \
        append_rows_impl<TY>(D, k, v, k_new, v_new, b, t0, len, slot_of_fc, mom, mom_len, q8n, q8from);    \
    }                                                                                                                    \
    extern "C" __global__ void quant_blocks_##NAME(Dims D, const u16* k, i8* kq, float* ks, int* q8n, int b0, int kv0,    \
                                                   const int* lens, int len, const int* from) {                          \
        quant_blocks_impl<TY>(D, k, kq, ks, q8n, b0, kv0, lens, len, from);                                              \
    }                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(TIP_THREADS) tip_##NAME(Dims D, const u16* k, const float* q,             \
                                                                         const int* pool,                                 \
                                                                         const double* mom, const int* lens,              \
                                                                         float* scores, u32* hist, u32* done, int* thr,   \
                                                                         int nchunk) {                                    \
        tip_impl<TY, false>(D, k, nullptr, nullptr, nullptr, q, pool, mom, lens, scores, hist, done, thr,                \
                            nchunk);                                                                                     \
    }                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(TIP_THREADS, 3) tip8_##NAME(Dims D, const u16* k, const i8* kq,          \
                                                                          const float* ks, const int* q8n,               \
                                                                          const float* q,                                 \
                                                                          const int* pool, const double* mom,             \
                                                                          const int* lens, float* scores, u32* hist,      \
                                                                          u32* done, int* thr, int nchunk) {              \
        tip_impl<TY, true>(D, k, kq, ks, q8n, q, pool, mom, lens, scores, hist, done, thr, nchunk);                     \
    }                                                                                                                    \
    TIP8P_ENTRY(NAME, TY, 2, 4, 2, 0, false)                                                                            \
    TIP8P_ENTRY(NAME, TY, 2, 4, 2, 1, true)                                                                             \
    TIP8P_ENTRY(NAME, TY, 2, 4, 2, 2, int)                                                                              \
    TIP4P_ENTRY(NAME, TY, 2)                                                                                            \
    TIP4P_ENTRY(NAME, TY, 4)                                                                                            \
    TIP8PH_ENTRY(NAME, TY, 2, 4)                                                                                        \
    TIP8PH_ENTRY(NAME, TY, 4, 4)                                                                                        \
    TIP8PH_ENTRY(NAME, TY, 8, 2)                                                                                        \
    TIP4PH_ENTRY(NAME, TY, 2, 4)                                                                                        \
    TIP4PH_ENTRY(NAME, TY, 4, 4)                                                                                        \
    TIP4PH_ENTRY(NAME, TY, 8, 2)                                                                                        \
    TIPFC_ENTRY(NAME, TY, 1, 8)                                                                                         \
    TIPFC_ENTRY(NAME, TY, 2, 8)                                                                                         \
    TIPFC_ENTRY(NAME, TY, 4, 8)                                                                                         \
    TIPFC_ENTRY(NAME, TY, 1, 4)                                                                                         \
    TIPFC_ENTRY(NAME, TY, 2, 4)                                                                                         \
    TIPFC_ENTRY(NAME, TY, 4, 4)                                                                                         \
    TIPFC_ENTRY(NAME, TY, 8, 4)                                                                                         \
    TIPM_ENTRY(NAME, TY, 2, 1)                                                                                          \
    TIPM_ENTRY(NAME, TY, 4, 1)                                                                                          \
    TIPM_ENTRY(NAME, TY, 8, 1)                                                                                          \
    TIPM_ENTRY(NAME, TY, 2, 2)                                                                                          \
    TIPM_ENTRY(NAME, TY, 4, 2)                                                                                          \
    TIPM_ENTRY(NAME, TY, 8, 2)                                                                                          \
    TIP_HEADS_ENTRY(NAME, TY, 2)                                                                                        \
    TIP_HEADS_ENTRY(NAME, TY, 4)                                                                                        \
    TIP_HEADS_ENTRY(NAME, TY, 8)                                                                                        \
    extern "C" __global__ void __launch_bounds__(128) rerank_scores_##NAME(Dims D, const u16* k, const float* q,           \
                                                                           const int* fc_of_slot, const int* lens,        \
                                                                           const u32* selc, int C, float* rr) {           \
        rerank_scores_impl<TY>(D, k, q, fc_of_slot, lens, selc, C, rr);                                                  \
    }                                                                                                                    \
    FAC_ENTRY(NAME, TY, 1)                                                                                              \
    FAC_ENTRY(NAME, TY, 2)                                                                                              \
    FAC_ENTRY(NAME, TY, 4)                                                                                              \
    FAC_ENTRY(NAME, TY, 8)                                                                                              \
    FACW_ENTRY(NAME, TY, 1)                                                                                             \
    FACW_ENTRY(NAME, TY, 2)                                                                                             \
    FACW_ENTRY(NAME, TY, 4)                                                                                             \
    FACM_ENTRY(NAME, TY, 64)                                                                                            \
    FACM_ENTRY(NAME, TY, 128)                                                                                           \
    extern "C" __global__ void fill_random_##NAME(u16* x, u64 n, u32 seed, float amp) {                                  \
        for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)                \
            x[i] = TY::store(amp * hash_unit(i, seed));                                                                  \
    }

DEFINE_TYPED(f16, F16)
DEFINE_TYPED(bf16, BF16)

extern "C" __global__ void fill_random_f32(float* x, u64 n, u32 seed, float amp) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) x[i] = amp * hash_unit(i, seed);
}

// Benchmark helper: the device copy bandwidth through the SMs (4 independent 16-byte loads a thread).
extern "C" __global__ void copy_u4(const uint4* a, uint4* b, u64 n) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 x0 = a[i], x1 = a[i + stride], x2 = a[i + 2 * stride], x3 = a[i + 3 * stride];
        b[i] = x0; b[i + stride] = x1; b[i + 2 * stride] = x2; b[i + 3 * stride] = x3;
    }
    for (; i < n; i += stride) b[i] = a[i];
}
