#!/usr/bin/env bash
# Decode/prefill speed of fasa (dense and FASA modes) beside llama.cpp's llama-bench on the same
# GGUF, same depths, same thread count, in one run; prints a markdown table for RESULTS.md.
#   bench/speed.sh [--threads N] [--depth 0,2048,8000] [--modes dense,fasa]
# Run it on an otherwise idle machine: both sides are timed as whole processes, back to back.
# For the decode ratio at one depth, quote bench/speed_pairs.sh: alternating pairs, the ratio per
# pair, and what other processes took during each run.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2 depth=0,2048,8000 modes=dense,fasa
while (($#)); do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --depth) depth="$2"; shift 2 ;;
    --modes) modes="$2"; shift 2 ;;
    *) echo "speed.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
out=bench/speed
mkdir -p "$out"
command -v /usr/bin/time >/dev/null || { echo "speed.sh: needs /usr/bin/time (Debian package time)" >&2; exit 1; }
cargo build --release -q -p fasa-bench --bin speed
# Each engine starts after the machine has settled for SETTLE seconds (default 60): measured on the
# 2-core VM, our decode at depth 8000 right after llama-bench exits ran 10–15 % slower than a
# minute later (bench/RESULTS.md, runs 5–9); the pause is the same before both engines.
settle=${FASA_BENCH_SETTLE:-60}
sleep "$settle"
FASA_BENCH_THREADS="$threads" FASA_BENCH_DEPTHS="$depth" bash bench/llama_cpp.sh "$out/llama.json"
sleep "$settle"
# Our speed binary prints one JSON object per (depth, mode); /usr/bin/time adds the peak RSS of
# the whole process (ORT arenas included).
/usr/bin/time -v -o "$out/fasa.time" target/release/speed --threads "$threads" --depth "$depth" --modes "$modes" >"$out/fasa.jsonl"
python3 - "$out" <<'PY'
import json, sys, re, platform, datetime
out = sys.argv[1]
ll = json.load(open(f"{out}/llama.json"))
rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{out}/fasa.time").read())
rows = [json.loads(l) for l in open(f"{out}/fasa.jsonl") if l.strip()]
def llama(depth, prompt):
    for r in ll:
        if r.get("n_depth", 0) == depth and (r["n_prompt"] > 0) == prompt:
            return r["avg_ts"]
print(f"machine: {platform.machine()} {open('/proc/cpuinfo').read().count('processor')} CPUs; date: {datetime.date.today()}")
print("| depth | engine | prefill tok/s (512) | decode tok/s (128) | KV bytes read vs dense | peak RSS MiB |")
print("|---|---|---|---|---|---|")
for d in sorted({r["depth"] for r in rows}):
    p, g = llama(d, True), llama(d, False)
    print(f"| {d} | llama.cpp | {p:.1f} | {g:.1f} | 1.00 | |" if p and g else f"| {d} | llama.cpp | n/a | n/a | | |")
    for r in rows:
        if r["depth"] == d:
            print(f"| {d} | fasa {r['mode']} (B={r['budget']}, k={r['chunks']}) | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['kv_read_fraction']:.2f} | {r['peak_rss_mib']:.0f} |")
if rss:
    print(f"\nfasa process peak RSS (all depths, /usr/bin/time): {int(rss.group(1))/1024:.0f} MiB")
PY
