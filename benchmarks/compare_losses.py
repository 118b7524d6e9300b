"""Two calibrations' loss curves and throughput side by side (e.g. the same recipe on one GPU and on two).

    python benchmarks/compare_losses.py RUN_A RUN_B [--every 50] [--tolerance 0.02]

RUN_A and RUN_B are calibrated model folders (their MANIFEST.json records every step's loss, the world size and
tokens/s). Prints a Markdown table of the mean loss per block of ``--every`` steps for both, the largest gap
between the two block means, and the tokens/s of each with B's over A's. Exit 0 when every block mean agrees within
``--tolerance`` (absolute, in nats; the spread between GPU runs of one recipe is about 0.01), 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List


def record(folder: str) -> dict:
    with open(os.path.join(folder, "MANIFEST.json")) as f:
        cal = json.load(f).get("calibration")
    if not cal or not cal.get("losses"):
        raise SystemExit(f"{folder}: no calibration losses in its MANIFEST.json")
    return cal


def block_means(losses: List[float], every: int) -> List[float]:
    out = []
    for a in range(0, len(losses), every):
        vals = [x for x in losses[a:a + every] if x is not None and math.isfinite(x)]
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return out


def compare(a: dict, b: dict, every: int) -> dict:
    ma, mb = block_means(a["losses"], every), block_means(b["losses"], every)
    n = min(len(ma), len(mb))
    gaps = [abs(x - y) for x, y in zip(ma[:n], mb[:n])]
    return {"blocks": [{"steps": f"{i * every + 1}-{min((i + 1) * every, len(a['losses']))}", "a": ma[i], "b": mb[i]}
                       for i in range(n)],
            "max_gap": max(gaps) if gaps else math.nan, "steps": (len(a["losses"]), len(b["losses"])),
            "world_size": (a.get("world_size", 1), b.get("world_size", 1)),
            "tokens_per_second": (a.get("tokens_per_second"), b.get("tokens_per_second"))}


def markdown(res: dict, names) -> str:
    lines = [f"| steps | {names[0]} | {names[1]} | gap |", "|---|---|---|---|"]
    lines += [f"| {r['steps']} | {r['a']:.4f} | {r['b']:.4f} | {abs(r['a'] - r['b']):.4f} |" for r in res["blocks"]]
    ta, tb = res["tokens_per_second"]
    ratio = f"{tb / ta:.2f}×" if ta and tb else "n/a"
    lines += ["", f"World sizes {res['world_size'][0]} / {res['world_size'][1]}; tokens/s {ta:,.0f} / {tb:,.0f} "
              f"({ratio}); largest gap between block means {res['max_gap']:.4f}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--tolerance", type=float, default=0.02)
    a = ap.parse_args(argv)
    res = compare(record(a.run_a), record(a.run_b), max(1, a.every))
    print(markdown(res, [os.path.basename(a.run_a.rstrip("/")), os.path.basename(a.run_b.rstrip("/"))]))
    return 0 if res["max_gap"] <= a.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
