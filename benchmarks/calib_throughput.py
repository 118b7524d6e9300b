"""Calibration throughput (tokens/s) and model-FLOPs utilisation (MFU) of ``fwconvert calibrate``.

    python benchmarks/calib_throughput.py /tmp/w1b/fwl --data /tmp/w1b/docs --steps 8 --seq-len 8192 --device cuda

Runs ``fwconvert.calibrate.run.calibrate`` in this process with the settings of
``fwconvert calibrate MODEL --data DIR --ext .py --steps N+W --seq-len L --batch-size 1 --device D --train fast
--no-progress --force -o OUT`` (W = --warmup-steps, default 2, the output written to a temporary folder and
deleted) and prints one JSON line (also appended to --json-out):

* ``tokens_per_second_manifest``: what the run records in OUT/MANIFEST.json (calibration.tokens_per_second): all
  N+W updates, including the first ones (CUDA kernel selection, allocator growth) and the final checkpoint write.
* ``tokens_per_second``: steady state, the tokens of the last N updates over their time. Each update
  (``Calibrator._update``: forward, backward, clipping, optimizer step; it ends by reading the loss, a device
  sync) is timed by wrapping that method in this process; nothing in fwconvert is changed.

MFU = F × tokens_per_second / peak, with the model FLOPs per token (the PaLM convention)

    F = 6·N + 6·L·H·Q·T

N: parameters without the embedding lookup (tied embeddings count once, as the unembedding matmul; the
fast-weight modules' own parameters are included), L layers, H query heads, Q head dim, T = --seq-len. 6·N is
forward + backward of every matmul; 6·L·H·Q·T is half of the usual 12·L·H·Q·T for QKᵀ and PV forward + backward,
since causal attention needs only half of the score matrix. LLaMA-1B shape, T = 8192: N = 1,235,814,400, so
F = 7.415e9 + 1.611e9 = 9.03 GFLOP/token (its FWL head adds 33.6M parameters, +0.20 GFLOP).
Not counted: the fast-weight update arithmetic itself (FWL's causal linear attention over gradient sums, in-place
TTT's W_down deltas). Also, ``--train fast`` computes no weight gradients of frozen matrices (and for an FWL head,
no backward through the trunk at all), so F counts more than is executed: this MFU compares runs under one
convention, it is not the hardware's utilisation.
peak: the bf16 matmul rate measured here (``common.measured_rates``) on CUDA, or --peak-tflops; ``mfu_nominal``
uses 989 TFLOP/s, the dense bf16 rate of an H100/H200 SXM.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measured_rates  # noqa: E402

NOMINAL_BF16_FLOPS = 989e12  # H100 / H200 SXM, dense


def flops_per_token(n_params: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 6·L·H·Q·T (causal attention: half of 12·L·H·Q·T)."""
    return 6 * n_params + 6 * n_layers * n_heads * head_dim * seq_len


def count_params(model_dir: str) -> dict:
    """N (parameters without the embedding lookup) and the attention shape, from the checkpoint headers."""
    from fwconvert.checkpoint import open_checkpoint

    ck = open_checkpoint(model_dir)
    c = ck.config
    sizes = {n: math.prod(shape) for n, (shape, _) in ck.specs.items()}
    total = sum(sizes.values())
    if "lm_head.weight" in sizes:  # untied: drop the lookup table (a tied copy of it stored as lm_head counts once)
        total -= sizes.get("model.embed_tokens.weight", 0)
    return {"n_params": total, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
            "head_dim": c.head_dim}


def _time_updates(times: list):
    """Wrap Calibrator._update to append each update's seconds to ``times``; returns the undo function."""
    import torch
    from fwconvert.calibrate import loop

    orig = loop.Calibrator._update

    def timed(self):
        t = time.perf_counter()
        loss = orig(self)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        times.append(time.perf_counter() - t)
        return loss

    loop.Calibrator._update = timed
    return lambda: setattr(loop.Calibrator, "_update", orig)


def run(model_dir: str, data: str, steps: int, seq_len: int, device: str = "cpu", warmup_steps: int = 2,
        train: str = "fast", ext: str = ".py", batch_size: int = 1, peak_flops: float | None = None,
        tf32: bool = True) -> dict:
    import torch
    from fwconvert.calibrate.loop import CalibrationSettings
    from fwconvert.calibrate.run import calibrate

    rec = {"model": os.path.abspath(model_dir), "device": device, "seq_len": seq_len, "batch_size": batch_size,
           "steps": steps, "warmup_steps": warmup_steps, "train": train, "tf32": tf32}
    if device.startswith("cuda"):
        rec["gpu"] = torch.cuda.get_device_name(device)
        if peak_flops is None:
            peak_flops = measured_rates(torch)["matmul_flops"]
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    shape = count_params(model_dir)
    fpt = flops_per_token(seq_len=seq_len, **shape)
    settings = CalibrationSettings(steps=steps + warmup_steps, seq_len=seq_len, batch_size=batch_size, train=train,
                                   save_every=steps + warmup_steps, tf32=tf32)
    times, undo = [], None
    out = tempfile.mkdtemp(prefix="calib-throughput-")
    try:
        undo = _time_updates(times)
        calibrate(model_dir, [data], os.path.join(out, "cal"), settings, device=device, force=True,
                  exts=tuple(e if e.startswith(".") else "." + e for e in ext.split(",")), progress=False)
        with open(os.path.join(out, "cal", "MANIFEST.json")) as f:
            cal = json.load(f)["calibration"]
    finally:
        if undo:
            undo()
        shutil.rmtree(out, ignore_errors=True)
    steady = times[warmup_steps:]
    tps = batch_size * seq_len * len(steady) / sum(steady) if steady else float("nan")
    rec.update(shape, flops_per_token=fpt, tokens_per_second=round(tps, 1),
               tokens_per_second_manifest=round(cal["tokens_per_second"], 1),
               step_seconds=[round(t, 4) for t in times], trainable_count=cal.get("trainable_count"),
               loss_first=cal["losses"][0], loss_last=cal["losses"][-1])
    if device.startswith("cuda"):
        rec["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if peak_flops:
        rec.update(peak_tflops=round(peak_flops / 1e12, 1), mfu=float(f"{fpt * tps / peak_flops:.4g}"))
    rec["mfu_nominal"] = float(f"{fpt * tps / NOMINAL_BF16_FLOPS:.4g}")
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=8, help="timed updates (after --warmup-steps)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="extra first updates left out of tokens_per_second")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--train", default="fast")
    ap.add_argument("--ext", default=".py")
    ap.add_argument("--peak-tflops", type=float, help="peak for MFU (default on CUDA: the measured bf16 matmul rate)")
    ap.add_argument("--no-tf32", dest="tf32", action="store_false",
                    help="calibrate --no-tf32: fp32 matmuls on CUDA stay full fp32 (default: TF32, as calibrate)")
    ap.add_argument("--label", default="")
    ap.add_argument("--json-out", help="append the JSON line to this file")
    a = ap.parse_args(argv)
    peak = a.peak_tflops * 1e12 if a.peak_tflops else None
    rec = {"label": a.label, **run(a.model, a.data, a.steps, a.seq_len, a.device, a.warmup_steps, a.train, a.ext,
                                   a.batch_size, peak, a.tf32)}
    line = json.dumps(rec)
    print(line, flush=True)
    if a.json_out:
        with open(a.json_out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
