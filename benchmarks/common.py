"""Shared helpers for the GPU benchmarks: CUDA timing, the compute/memory floor, model shapes, table output."""
from __future__ import annotations

import statistics
import time

LLAMA_1B_SHAPE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                      rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, model_type="llama",
                      architectures=["LlamaForCausalLM"], hidden_act="silu")


def time_fn(fn, warmup: int = 5, iters: int = 30, sync=None) -> float:
    """Median wall time of ``fn()`` in ms over ``iters`` runs after ``warmup``; ``sync`` waits for the device."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def probe_args(doc: str, argv, layers_default=None, layers_help="layers per graph (default: the shape's own)"):
    """(arguments, onnxruntime providers) of the onnxruntime probes (qkv_probe, mlp_probe, rope_probe): --provider
    cpu|cuda, --batch (default 1 8), --chunk (default 512), --layers."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--layers", type=int, default=layers_default, help=layers_help)
    a = ap.parse_args(argv)
    return a, ["CUDAExecutionProvider"] if a.provider == "cuda" else ["CPUExecutionProvider"]


def ort_run_us(ort, blob: bytes, feeds: dict, outputs: dict, per: int = 1, replays: int = 50,
               device: str = "cuda") -> float:
    """µs per ``per`` (e.g. per layer) of one run of the ONNX model ``blob`` on onnxruntime's CUDA provider with CUDA
    graphs (``device="cpu"``: the CPU provider, for tests of the scripts): inputs ``feeds`` (name: numpy array) and
    outputs ``outputs`` (name: (shape, numpy dtype)) bound on the device once, median of ``replays`` runs after 5
    warm-up runs (the first captures the graph)."""
    import numpy as np

    prov = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"})] if device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(blob, ort.SessionOptions(), providers=prov)
    bind = sess.io_binding()
    keep = []  # the bound buffers must outlive the runs
    for k, v in feeds.items():
        keep.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), device, 0))
        bind.bind_ortvalue_input(k, keep[-1])
    for k, (shape, dtype) in outputs.items():
        keep.append(ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, 0))
        bind.bind_ortvalue_output(k, keep[-1])
    ro = ort.RunOptions()
    for _ in range(5):
        sess.run_with_iobinding(bind, ro)
    bind.synchronize_outputs()
    ts = []
    for _ in range(replays):
        t = time.perf_counter()
        sess.run_with_iobinding(bind, ro)
        bind.synchronize_outputs()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6 / per


def measured_rates(torch) -> dict:
    """bf16 matmul rate (FLOP/s) and device copy bandwidth (bytes/s, read+write) on this GPU."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_fn(lambda: a @ b, 3, 10, torch.cuda.synchronize)
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms_copy = time_fn(lambda: y.copy_(x), 3, 10, torch.cuda.synchronize)
    return {"matmul_flops": 2 * 8192 ** 3 / (ms / 1e3), "copy_bytes_per_s": 2 * x.numel() / (ms_copy / 1e3)}


def chunk_floor_ms(cfg: dict, batch: int, chunk: int, past: int, rates: dict, bytes_per_param: int = 2) -> dict:
    """Lower bounds for one chunk step: FLOPs / matmul rate and weight+KV bytes / copy bandwidth."""
    d, f, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kvd = cfg["num_key_value_heads"] * hd
    per_layer = d * d * 2 + d * kvd * 2 + 3 * d * f  # q, o, k, v, gate, up, down
    tokens = batch * chunk
    flops = 2 * tokens * (n * per_layer + d * v)
    flops += 4 * batch * n * cfg["num_attention_heads"] * hd * chunk * (past + chunk / 2)  # QK^T and PV, causal
    weight_bytes = (n * per_layer + d * v) * bytes_per_param
    kv_bytes = 2 * n * batch * kvd * (past + chunk) * bytes_per_param
    compute = flops / rates["matmul_flops"] * 1e3
    memory = (weight_bytes + kv_bytes) / (rates["copy_bytes_per_s"] / 2) * 1e3  # read once
    return {"flops": flops, "compute_ms": compute, "memory_ms": memory, "floor_ms": max(compute, memory)}


def markdown_table(rows: list, cols: list) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)
