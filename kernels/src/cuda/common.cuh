// Shared helpers of the FASA kernels: storage types, 16-byte unpacking, order-preserving keys.
// Compiled by NVRTC at run time (no system headers), so everything here is self-contained.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char i8;

// ---- Layout constants (mirrored in kernels/src/gpu/mod.rs) ----
// K is stored as FC groups: a token's FCs `8g..8g+8` are one 32-byte sector, and KR consecutive
// groups of a token one run of KR·32 bytes (per tile of KT tokens `(n_grp/KR, KT, KR·GE)`; k_off
// in fasa.cu). TIP reads only the runs that hold the chosen FCs (the engine orders FCs so the
// calibrated pool comes first: P = 16 is run 0); FAC reads a token's whole K as n_grp/KR runs.
// HBM is read in 64-byte units: with 32-byte pieces (KR = 1) FAC moved twice K's bytes (GPU run
// 12; run 14: KR = 2, FAC 50 → 40 µs, 101 → 68 MB read at 16 × 128k; KR = 4 no faster then).
// KR = 8 (a token's K one 256-byte row; d = 64: 128 bytes) since GPU run 22: the int8 TIP of the
// default modes reads the int8 planes, not these runs, and FAC's gathered rows read faster whole
// (paper int8 step, same call, KR 2 / 8: 16 × 32k 96.5 / 92.6 µs, 16 × 128k 225.3 / 221.5, batch 1
// 0.1–0.2 µs faster; dense 16 × 128k 2253 / 2179). The 16-bit TIP (paper planes, no int8) reads
// 64 of every 256 bytes then and runs at about half its speed (16 × 32k step 133.6 → 202.2 µs):
// FASA_GPU_KRUN=2 for it. The int8 planes keep one 16-byte piece per group (kq_off).
#define FCG 8          // FCs per group
#define GE 16          // elements per (token, group) = 32 bytes
#define KT 64          // tokens per K tile, so dense reads are contiguous
#ifndef KR
#define KR 8           // groups per run (1, 2, 4 or 8; at most n_grp is used); the launcher may set it
#endif
#define MAXH 8         // most query heads sharing one selection (GQA group ≤ 8)
#define MAXG 8         // most FC groups per head (d ≤ 128)
#define NBIN 4096      // histogram bins of TIP scores: top 12 bits of the ordered key
#define BIN_SHIFT 20
#define QB 32          // tokens per int8 quantisation block (cpu::QB)
#define FAC_MAX_ROWS 1024 // most selected rows one FAC block handles (dense blocks: any number)
#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float h2f(u16 x) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 x; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x) : "f"(f)); return x; }
__device__ __forceinline__ float b2f(u16 x) { return __uint_as_float(((u32)x) << 16); }
__device__ __forceinline__ u16 f2b(float f) { u16 x; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(x) : "f"(f)); return x; }

// Storage types: 16-bit payloads converted to f32 on load (accumulation is always f32).
struct F16 {
    static __device__ __forceinline__ float load(u16 x) { return h2f(x); }
    static __device__ __forceinline__ u16 store(float f) { return f2h(f); }
};
struct BF16 {
    static __device__ __forceinline__ float load(u16 x) { return b2f(x); }
    static __device__ __forceinline__ u16 store(float f) { return f2b(f); }
};

// Eight 16-bit elements of one 16-byte load, in memory order.
template <class T> __device__ __forceinline__ void unpack8(uint4 u, float* f) {
    f[0] = T::load((u16)(u.x & 0xffff)); f[1] = T::load((u16)(u.x >> 16));
    f[2] = T::load((u16)(u.y & 0xffff)); f[3] = T::load((u16)(u.y >> 16));
    f[4] = T::load((u16)(u.z & 0xffff)); f[5] = T::load((u16)(u.z >> 16));
    f[6] = T::load((u16)(u.w & 0xffff)); f[7] = T::load((u16)(u.w >> 16));
}

// Eight int8 elements (two 32-bit words, memory order) to f32: byte b ^ 0x80 placed under the
// exponent of 2^23 gives 2^23 + 128 + b exactly; one byte permute and one subtraction each (an
// I2F conversion runs at a quarter of their rate, and TIP reads 16 int8 elements per 16 bytes).
__device__ __forceinline__ void unpack8_i8(u32 a, u32 b, float* f) {
    a ^= 0x80808080u;
    b ^= 0x80808080u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[i] = __fsub_rn(__uint_as_float(__byte_perm(a, 0x4B000000u, 0x7440 | i)), 8388736.f);
        f[4 + i] = __fsub_rn(__uint_as_float(__byte_perm(b, 0x4B000000u, 0x7440 | i)), 8388736.f);
    }
}

// Programmatic dependent launch (sm_90; launchers: kernels/src/gpu/launch.rs). First statement
// of every kernel of the decode chain: waits until the kernel before this one has finished and
// its writes are visible. The next kernel may launch once every block of this one has exited
// (the implicit trigger), so its launch overlaps this one's tail and completion. An explicit
// trigger at the start (griddepcontrol.launch_dependents: the next kernel's blocks placed early,
// waiting here) was GPU runs 12–17's choice; with it PDL cost 1.2–3.0 µs at batch 1 (paper int8
// step: 31.6 vs 28.6 µs without PDL at 1 × 32k, 42.6 vs 41.4 at 1 × 128k; with the implicit
// trigger 27.8 and 40.9), and the implicit one is as fast or faster at batch 16 (16 × 128k 261.3
// vs 264.2 µs; GPU run 18, same call). Without the launch attribute it is a no-op.
__device__ __forceinline__ void pdl_begin() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// The exceptions wait per selection on a flag instead (ready_publish / ready_wait), so a stage
// starts on a selection as soon as the stage before has finished it: FAC early (the select
// filter's last block per selection lets FAC launch as it begins the refine; FAC reads the rows
// above the threshold bin at flag 1, the refine's at 2) and select early (TIP lets the filter
// launch from its start; the filter reads a selection's scores and threshold once TIP's last
// block of it has set thr's flag word; fasa.cu, EARLY_SELECT) and FAC over candidates (FAC
// launches with the filter, and its warps wait for the refine's cut word; fasa.cu,
// CANDS_SHIFT). The kernel that waits on a flag skips pdl_begin. Spinning cannot deadlock: the
// waiting launch starts only once every block of the one before has triggered or exited, so
// the block that sets the flag is already resident.
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Block-wide: after every thread's writes (the barrier orders them before thread 0's release,
// which is cumulative), thread 0 sets *flag = v for other grids.
__device__ __forceinline__ void ready_publish(u32* flag, u32 v) {
    __syncthreads();
    if (threadIdx.x == 0) asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(flag), "r"(v) : "memory");
}
// Block-wide: thread 0 waits until *flag ≥ v (acquire), if `set` (the flag will be set); after
// the barrier the block's reads see the writes made before the publish.
__device__ __forceinline__ void ready_wait(const u32* flag, u32 v, bool set) {
    if (threadIdx.x == 0) {
        for (;;) {
            u32 x;
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(x) : "l"(flag) : "memory");
            if (x >= v || !set) break;
            __nanosleep(32);
        }
    }
    __syncthreads();
}

// Stage timeline (benchmarks; `FASA_GPU_TRACE=1` compiles it in, gpu::Gpu::trace_take reads it):
// thread 0 of each block of the decode chain appends (tag, launch time, time past
// griddepcontrol.wait, exit time) in %globaltimer ns. Without FASA_TRACE the scope is empty.
enum TraceTag { TR_TIP = 1, TR_MASS, TR_FILTER, TR_REFINE, TR_RERANK, TR_FAC, TR_COMBINE,
                // marks (trace_mark): TIP's setup done, its loop done, its histogram added, its
                // threshold found; filter's scores classified, its rows written; refine's
                // candidates loaded (value: their count), its radix passes done (value: passes),
                // its rows written; FAC's rows and q loaded, its loop done, (FAC early) the refine's rows in
                // or (FAC over candidates) the cut seen by warp 0
                TR_MARK = 16, M_TIP_SETUP = TR_MARK, M_TIP_LOOP, M_TIP_FLUSH, M_TIP_THR, M_FLT_SCAN, M_FLT_WRITE,
                M_REF_LOAD, M_REF_PASS, M_REF_WRITE, M_FAC_BEGIN, M_FAC_LOOP, M_FAC_TAIL };
#ifdef FASA_TRACE
#define FASA_TRACE_N (1 << 18)
__device__ u64 fasa_trace[FASA_TRACE_N * 4];
__device__ u32 fasa_trace_n;
__device__ __forceinline__ u64 gtimer() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// One entry, by thread 0 of the block (entries past FASA_TRACE_N are dropped).
__device__ __forceinline__ void trace_put(u64 tag, u64 a, u64 b, u64 c) {
    if (threadIdx.x != 0) return;
    u32 i = atomicAdd(&fasa_trace_n, 1u);
    if (i < FASA_TRACE_N) {
        u64* e = fasa_trace + 4 * (size_t)i;
        e[0] = tag; e[1] = a; e[2] = b; e[3] = c;
    }
}
struct TraceScope {
    int tag;
    u64 pre, post;
    __device__ explicit TraceScope(int t) : tag(t), pre(gtimer()), post(pre) {}
    __device__ void waited() { post = gtimer(); }
    __device__ ~TraceScope() { trace_put(tag, pre, post, gtimer()); }
};
// A point inside a kernel (tag ≥ TR_MARK): when thread 0 of the block passed it, and a value.
__device__ __forceinline__ void trace_mark(int tag, u64 val = 0) {
    u64 t = gtimer();
    trace_put(tag, t, t, val);
}
#else
struct TraceScope {
    __device__ explicit TraceScope(int) {}
    __device__ void waited() {}
};
__device__ __forceinline__ void trace_mark(int, u64 = 0) {}
#endif
// pdl_begin() if C (a kernel that waits on a flag instead skips it) inside a trace scope of this
// tag, which closes when the enclosing function returns.
#define PDL_BEGIN_IF(TAG, C) TraceScope trace_scope_(TAG); if (C) pdl_begin(); trace_scope_.waited()
#define PDL_BEGIN(TAG) PDL_BEGIN_IF(TAG, true)

// Order-preserving u32 key of a float (larger float → larger key); -0 is folded into +0 so
// equal scores tie, as on the CPU.
__device__ __forceinline__ u32 okey(float f) {
    f = f + 0.0f;
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Unique 64-bit selection key: score first, then the lower token index wins ties (CPU `top_b`).
__device__ __forceinline__ u64 skey(float f, u32 t) { return ((u64)okey(f) << 32) | (u64)(0xffffffffu - t); }
__device__ __forceinline__ u32 skey_token(u64 k) { return 0xffffffffu - (u32)(k & 0xffffffffu); }

// Warp-aggregated append: lanes with `pred` get consecutive slots from `*cnt`.
__device__ __forceinline__ int warp_append(u32* cnt, bool pred) {
    u32 m = __ballot_sync(0xffffffffu, pred);
    if (m == 0) return -1;
    int lane = threadIdx.x & 31;
    int leader = __ffs(m) - 1;
    u32 base = 0;
    if (lane == leader) base = atomicAdd(cnt, (u32)__popc(m));
    base = __shfl_sync(0xffffffffu, base, leader);
    return pred ? (int)(base + __popc(m & ((1u << lane) - 1))) : -1;
}
