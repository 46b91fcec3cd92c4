"""PyTorch SDPA dense decode on the shapes of kernels/examples/gpu_bench.rs, same run, same way of
timing: one step over several layers' caches (together >= 4x the L2) captured in a CUDA graph,
median of 7 groups of 20 replays, time per layer. GQA without copies, two ways, the faster one
reported: `enable_gqa=True` with q (b, n_q, 1, d), and q (b, n_kv, group, d) as a query length of
`group` against K/V (b, n_kv, L, d); either reads each KV head's K/V once.
Usage: python3 bench/gpu/sdpa.py [--quick | --targets] [out.csv]"""
import sys

import torch
import torch.nn.functional as F


def time_graph(fn, reps=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / reps)
    ts.sort()
    return ts[len(ts) // 2]


def copy_bw():
    """Eager tensor copy (as KINDS.md measured it), bytes read + written per second."""
    n = 1 << 32
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(5):
        b.copy_(a)
    ts = []
    for _ in range(7):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(10):
            b.copy_(a)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 10)
    ts.sort()
    return 2 * n / (ts[3] * 1e-3)


def main():
    quick = "--quick" in sys.argv
    targets = "--targets" in sys.argv
    out = [a for a in sys.argv[1:] if not a.startswith("--")]
    torch.manual_seed(0)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    bw = copy_bw()
    lines = [f"# torch {torch.__version__} {torch.cuda.get_device_name(0)}; copy bandwidth (read+write) {bw / 1e12:.3f} TB/s",
             "model,batch,L,mode,layers,us_per_layer,kv_bytes,TBps,frac_copy,variant,other_us"]
    print("\n".join(lines), flush=True)
    shapes = []
    lens = [32768] if quick else [32768, 131072] if targets else [8192, 32768, 131072]
    for L in lens:
        for b in (1, 16):
            shapes.append(("llama3-8b", 32, 8, 128, b, L))
    for b in () if targets else (1, 16):
        shapes.append(("smollm2-135m", 9, 3, 64, b, 8192))
    for model, n_q, n_kv, d, b, L in shapes:
        layer_bytes = 2 * b * n_kv * L * d * 2
        layers = max(1, min(32, -(-4 * l2 // layer_bytes)))
        kv = [(torch.empty(b, n_kv, L, d, dtype=torch.float16, device="cuda").uniform_(-1, 1),
               torch.empty(b, n_kv, L, d, dtype=torch.float16, device="cuda").uniform_(-1, 1)) for _ in range(layers)]
        qg = torch.empty(b, n_kv, n_q // n_kv, d, dtype=torch.float16, device="cuda").uniform_(-2, 2)
        q1 = qg.reshape(b, n_q, 1, d).contiguous()
        outs = [None] * layers

        def step_qlen():
            for i, (k, v) in enumerate(kv):
                outs[i] = F.scaled_dot_product_attention(qg, k, v)

        def step_gqa():
            for i, (k, v) in enumerate(kv):
                outs[i] = F.scaled_dot_product_attention(q1, k, v, enable_gqa=True)

        res = {}
        for name, fn in (("qlen_group", step_qlen), ("enable_gqa", step_gqa)):
            try:
                res[name] = time_graph(fn) / layers
            except Exception as e:  # a backend may refuse a shape
                print(f"# {model} b{b} L{L} {name}: {e}", flush=True)
        best = min(res, key=res.get)
        ms = res[best]
        other = [f"{n}:{v * 1e3:.1f}" for n, v in res.items() if n != best]
        tb = layer_bytes / (ms * 1e-3) / 1e12
        line = f"{model},{b},{L},sdpa,{layers},{ms * 1e3:.2f},{layer_bytes},{tb:.3f},{tb * 1e12 / bw:.2f},{best},{' '.join(other)}"
        print(line, flush=True)
        lines.append(line)
        del kv, outs
        torch.cuda.empty_cache()
    if out:
        open(out[0], "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
