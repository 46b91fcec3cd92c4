"""Merges gpu_bench.csv (in-house dense, FASA-C modes) and sdpa.csv into the markdown table of
bench/RESULTS.md. Usage: python3 bench/gpu/table.py bench.csv sdpa.csv"""
import csv
import sys


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(l for l in f if not l.startswith("#")))


def main():
    ours, sdpa = rows(sys.argv[1]), rows(sys.argv[2])
    sd = {(r["model"], r["batch"], r["L"]): r for r in sdpa}
    for p in sys.argv[1:3]:
        for l in open(p):
            if l.startswith("#"):
                print(l.strip("# \n") + "  ")
    print()
    print("| model | batch | L | B | k/P | mode | µs/layer | TIP µs | TIP+select µs | SDPA µs | × vs SDPA | byte limit × | TB/s | of copy bw | variant (all, µs) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in ours:
        s = sd.get((r["model"], r["batch"], r["L"]))
        s_us = float(s["us_per_layer"]) if s else float("nan")
        us = float(r["us_per_layer"])
        tip, selu = r.get("tip_us") or "", r.get("select_us") or ""
        print(f"| {r['model']} | {r['batch']} | {r['L']} | {r['B']} | {r['k']}/{r['P']} | {r['mode']} | {us:.1f} | {tip} | {selu} | {s_us:.1f} | "
              f"{s_us / us:.2f} | {float(r['byte_limit']):.2f} | {float(r['TBps']):.2f} | {float(r['frac_copy']):.0%} | {r.get('variant') or ''} {('(' + r['variants_us'] + ')') if r.get('variants_us') else ''} |")
    print()
    compare(ours, sd)
    print()
    print("| model | batch | L | SDPA µs/layer | SDPA TB/s | of copy bw | variant | other variant µs |")
    print("|---|---|---|---|---|---|---|---|")
    for s in sdpa:
        print(f"| {s['model']} | {s['batch']} | {s['L']} | {float(s['us_per_layer']):.1f} | {float(s['TBps']):.2f} | "
              f"{float(s['frac_copy']):.0%} | {s.get('variant', '')} | {s.get('other_us', '')} |")


def compare(ours, sd):
    """fp16 vs int8 vs int4 TIP, same run: per shape, the paper's and the default's step (µs/layer, TIP µs
    in brackets), × vs SDPA and the byte limit of each."""
    by = {(r["model"], r["batch"], r["L"], r["B"], r["mode"]): r for r in ours}
    modes = ["fasa_paper_group", "fasa_paper_group_int8", "fasa_paper_group_int4", "fasa_default", "fasa_default_int8_grp", "fasa_default_int8",
             "fasa_default_int4"]
    print("| shape (model batch×L, B) | SDPA µs | " + " | ".join(f"{m} µs [TIP] (× SDPA; limit ×)" for m in modes) + " |")
    print("|---|---|" + "---|" * len(modes))
    for key in dict.fromkeys((r["model"], r["batch"], r["L"], r["B"]) for r in ours):
        s = sd.get(key[:3])
        s_us = float(s["us_per_layer"]) if s else float("nan")
        cells = []
        for m in modes:
            r = by.get(key + (m,))
            if r is None:
                cells.append("")
                continue
            us = float(r["us_per_layer"])
            cells.append(f"{us:.1f} [{float(r['tip_us']):.1f}] ({s_us / us:.2f}×; {float(r['byte_limit']):.2f}×)")
        print(f"| {key[0]} {key[1]}×{key[2]}, B {key[3]} | {s_us:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
