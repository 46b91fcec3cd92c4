#!/usr/bin/env bash
# Decode speed of fasa against llama.cpp's llama-bench at one depth, as alternating pairs: each
# pair runs both engines back to back (llama.cpp first in odd pairs, fasa first in even ones) and
# the ratio is taken within the pair, so it holds when the shared machine's speed drifts between
# pairs; the table gives every pair and the median.
#   bench/speed_pairs.sh [--pairs 6] [--depth 8000] [--threads 2] [--modes dense,fasa]
# Raw output: bench/speed/pairs/ (llama-N.json, fasa-N.jsonl, and per run its wall/user/sys seconds
# and the machine's busy CPU seconds before and after, *.time). The table's "other processes' CPU"
# is the larger of the pair's two runs: what else ran on the machine, in cores, on average.
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=6 depth=8000 threads=2 modes=dense,fasa
while (($#)); do
  case "$1" in
    --pairs) pairs="$2"; shift 2 ;;
    --depth) depth="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --modes) modes="$2"; shift 2 ;;
    *) echo "speed_pairs.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
out=bench/speed/pairs
rm -rf "$out" && mkdir -p "$out"
cargo build --release -q -p fasa-bench --bin speed
command -v /usr/bin/time >/dev/null || { echo "speed_pairs.sh: needs /usr/bin/time (Debian package time)" >&2; exit 1; }
bash scripts/setup >&2
# CPU seconds the whole machine was busy (/proc/stat, all CPUs) while a run lasted, beside the run's
# own (/usr/bin/time): the difference is what other processes took, the noise a pair has to survive.
hz=$(getconf CLK_TCK)
busy() { awk -v hz="$hz" '/^cpu /{print ($2+$3+$4+$7+$8+$9)/hz}' /proc/stat; }
timed() { # name, command...
  local name=$1 b0 b1; shift
  b0=$(busy)
  /usr/bin/time -f "%e %U %S" -o "$out/$name.time" "$@"
  b1=$(busy)
  echo "$b0 $b1" >>"$out/$name.time"
}
llama() { FASA_BENCH_NO_SETUP=1 FASA_BENCH_THREADS="$threads" FASA_BENCH_DEPTHS="$depth" FASA_BENCH_PROMPT=0 FASA_BENCH_REPS=1 timed "llama-$1" bash bench/llama_cpp.sh "$out/llama-$1.json" 2>/dev/null; }
ours() { timed "fasa-$1" sh -c 'exec "$@" >"$0"' "$out/fasa-$1.jsonl" target/release/speed --threads "$threads" --depth "$depth" --modes "$modes"; }
for ((i = 1; i <= pairs; i++)); do
  if ((i % 2)); then llama "$i"; ours "$i"; else ours "$i"; llama "$i"; fi
  echo "pair $i of $pairs done" >&2
done
python3 - "$out" "$pairs" "$depth" "$threads" <<'PY'
import json, sys, statistics, platform, datetime
out, pairs, depth, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
print(f"machine: {platform.machine()} {open('/proc/cpuinfo').read().count('processor')} CPUs; date: {datetime.date.today()}; depth {depth}, {threads} threads, decode 128 tokens")
def other(name):
    # Busy CPU seconds of the machine minus the run's own user+sys, as a share of the run's wall time.
    t = open(f"{out}/{name}.time").read().split()
    wall, user, sys_, b0, b1 = map(float, t[-5:])
    return max(0.0, (b1 - b0) - user - sys_) / wall
rows, ratios = [], {}
for i in range(1, pairs + 1):
    ll = [r for r in json.load(open(f"{out}/llama-{i}.json")) if r["n_prompt"] == 0][0]["avg_ts"]
    ours = [json.loads(l) for l in open(f"{out}/fasa-{i}.jsonl") if l.strip()]
    rows.append((i, "llama.cpp first" if i % 2 else "fasa first", ll, ours, max(other(f"llama-{i}"), other(f"fasa-{i}"))))
    for r in ours:
        ratios.setdefault(r["mode"], []).append(r["decode_tok_s"] / ll)
modes = [r["mode"] for r in rows[0][3]]
print("| pair | order | other processes' CPU (cores) | llama.cpp tok/s | " + " | ".join(f"fasa {m} tok/s (× llama.cpp)" for m in modes) + " |")
print("|---|---|---|---|" + "---|" * len(modes))
for i, order, ll, ours, oth in rows:
    print(f"| {i} | {order} | {oth:.2f}{' (disturbed)' if oth > 0.10 else ''} | {ll:.1f} | " + " | ".join(f"{r['decode_tok_s']:.1f} ({r['decode_tok_s'] / ll:.2f}×)" for r in ours) + " |")
# A pair during which other processes took more than a tenth of a core is marked disturbed (on 2
# cores llama.cpp's spinning threads lose up to 80 % of their speed to one busy process); the
# median is given over all pairs and over the undisturbed ones.
calm = [i for i, *_, oth in rows if oth <= 0.10]
for m in modes:
    v = ratios[m]
    c = [v[i - 1] for i in calm]
    print(f"\nfasa {m} / llama.cpp over {len(v)} pairs: median {statistics.median(v):.2f}× (min {min(v):.2f}×, max {max(v):.2f}×)", end="")
    if c:
        print(f"; over the {len(c)} undisturbed: median {statistics.median(c):.2f}× (min {min(c):.2f}×, max {max(c):.2f}×)", end="")
print()
PY
