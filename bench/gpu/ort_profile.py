#!/usr/bin/env python3
"""Sums an ONNX Runtime profile (FASA_ORT_PROFILE=<prefix> writes <prefix>_<date>.json) per op type
and execution provider, for decode runs (one new token: the first input's first dim is 1) and
prefill runs apart, and prints what each takes per run, in µs.

    python3 bench/gpu/ort_profile.py <profile.json>
"""
import collections
import json
import sys

events = json.load(open(sys.argv[1]))
runs = [e["dur"] for e in events if e.get("name") == "model_run"]
per = collections.defaultdict(lambda: [0, 0])  # (phase, provider, op) -> [µs, count]
for e in events:
    if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
        continue
    a = e.get("args", {})
    shapes = a.get("input_type_shape") or [{}]
    first = next(iter(shapes[0].values()), [0]) if shapes and shapes[0] else [0]
    phase = "decode" if first[:1] == [1] else "prefill"
    k = (phase, a.get("provider", "?"), a.get("op_name", "?"))
    per[k][0] += e["dur"]
    per[k][1] += 1
decode_runs = max((c for (ph, _, op), (_, c) in per.items() if ph == "decode" and op == "FasaAttention"), default=0)
print(f"model runs: {len(runs)}, total {sum(runs) / 1e3:.1f} ms; decode FasaAttention node runs: {decode_runs}")
for phase in ("decode", "prefill"):
    rows = sorted(((v[0], k, v[1]) for k, v in per.items() if k[0] == phase), reverse=True)
    tot = sum(r[0] for r in rows)
    print(f"== {phase}: node time {tot / 1e3:.1f} ms")
    for us, (_, prov, op), n in rows[:12]:
        print(f"  {op:<36} {prov:<24} {us / 1e3:9.2f} ms  {n:6d} calls  {us / max(n, 1):8.1f} µs/call")
