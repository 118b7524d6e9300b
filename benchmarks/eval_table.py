"""One Markdown table from several ``fwconvert eval --json`` outputs (benchmarks/gpu_eval.sh writes one per model).

    python benchmarks/eval_table.py EVAL.json ...

Rows: each file's models (the evaluated model is named after its file, ``base``/``dynamic_eval`` once, a baseline
as ``baseline of <file>`` once per distinct baseline); perplexity per position bucket, overall, and, where the file
has a baseline, the change against it overall and in the last bucket, and the tokens/s ratio.
"""
from __future__ import annotations

import json
import os
import sys


def rows_of(path: str):
    rec = json.load(open(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    buckets = rec["buckets"]
    models = rec["models"] if "models" in rec else {stem: rec}  # one model evaluated: a flat object
    for name, m in models.items():
        label = stem if name not in ("base", "dynamic_eval", "baseline") else name
        rel = m.get("relative_to_baseline") if "baseline" in models else None
        yield label, stem, buckets, m, rel, rec.get("documents")


def main(paths):
    seen, lines, buckets = {}, [], None
    baselines = {}
    for p in paths:
        for label, stem, bks, m, rel, docs in rows_of(p):
            buckets = buckets or bks
            if label == "baseline":  # name a baseline by its folder when the eval recorded it, else by the file
                label = f"baseline of {stem}"
                key = round(m["perplexity"], 6)
                if key in baselines:
                    continue
                baselines[key] = label
            if label in seen:
                continue
            seen[label] = (m, rel, docs)
    cols = ["model"] + buckets + ["overall", "vs its baseline", f"{buckets[-1]} vs baseline", "tokens/s", "× baseline tokens/s"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for label, (m, rel, docs) in seen.items():
        pct = lambda x: f"{100 * x:+.1f}%"  # noqa: E731
        vals = [label] + [f"{m['by_position'].get(b, float('nan')):.2f}" for b in buckets] + [f"{m['perplexity']:.3f}"]
        if rel is not None and not label.startswith("baseline"):
            vals += [pct(rel["perplexity"]), pct(rel["by_position"][buckets[-1]]), f"{m['tokens_per_second']:,.0f}",
                     f"{rel['tokens_per_second']:.2f}"]
        else:
            vals += ["", "", f"{m['tokens_per_second']:,.0f}", ""]
        lines.append("| " + " | ".join(vals) + " |")
    docs = {d for _, _, d in seen.values()}
    lines.append("")
    lines.append(f"Documents: {', '.join(map(str, sorted(d for d in docs if d is not None)))}; perplexity = exp(mean loss).")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
