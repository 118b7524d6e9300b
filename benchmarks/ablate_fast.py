"""Copy a calibrated fast-weight model with its fast-weight updates switched off (every step size 0), so that
evaluating the copy shows what the calibrated slow parameters alone give, and the difference what the fast
weights themselves buy.

    python benchmarks/ablate_fast.py MODEL OUT

FWL: ``fwl_head.step_sizes`` := 0 (the head then applies its slow block only). In-place TTT: config
``fast_weights.lr`` (η) := 0 (W_down stays at its slow value in every chunk). Everything else is copied unchanged,
including MANIFEST.json, so ``fwconvert eval`` finds the same held-out split.
"""
from __future__ import annotations

import json
import os
import shutil
import sys


def ablate(src: str, dst: str) -> str:
    if os.path.exists(dst):
        raise SystemExit(f"{dst} exists")
    cfg_path = os.path.join(src, "config.json")
    cfg = json.load(open(cfg_path))
    fw = cfg.get("fast_weights") or {}
    tmp = dst + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if fw.get("kind") == "inplace_ttt":
        cfg["fast_weights"]["lr"] = 0.0
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    elif fw.get("kind") == "fwl":
        from safetensors.torch import load_file, save_file
        from safetensors import safe_open

        done = False
        for name in sorted(os.listdir(tmp)):
            if not name.endswith(".safetensors"):
                continue
            path = os.path.join(tmp, name)
            with safe_open(path, "pt") as f:
                meta = f.metadata()
                if "fwl_head.step_sizes" not in f.keys():
                    continue
            tensors = load_file(path)
            tensors["fwl_head.step_sizes"].zero_()
            save_file(tensors, path, metadata=meta)
            done = True
        if not done:
            raise SystemExit(f"{src}: no fwl_head.step_sizes tensor")
    else:
        raise SystemExit(f"{src}: not a fast-weight model (fast_weights.kind {fw.get('kind')!r})")
    os.rename(tmp, dst)
    return dst


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(ablate(sys.argv[1], sys.argv[2]))
