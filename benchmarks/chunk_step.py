"""Chunk-step time on the GPU, side by side in one run: transformers eager and torch.compile on the base
model vs our exported base / FWL / in-place graphs on onnxruntime CUDA (state on the device, IO binding).

    python benchmarks/chunk_step.py --gguf SmolLM2.gguf --graph base=DIR --graph fwl=DIR --graph ttt=DIR \
        --out-md results.md --out-json results.json          (--hf FOLDER instead of --gguf: a transformers folder)

Times one C-token chunk from an empty past (median of --iters after warm-up; the device is synchronised
around every call) and the streaming of one long document in C-token chunks (tokens/s). A window-attention
export (``--attention window``) is timed twice: through the ordinary session, and through a static session
(``ChunkSession(static_batch=B)``: buffers bound once, every step a replayed CUDA graph); its KV state always
holds W slots, so its chunk attends over W+C positions even "from an empty past". A full-attention export is timed
the same two ways; its static session pins one session per past length (the step from an empty past is timed after
an untimed reset; streaming a document captures one graph per chunk position on its first pass).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time

import numpy as np

from common import chunk_floor_ms, markdown_table, measured_rates, time_fn


def transformers_model(path: str, torch):
    """bf16 transformers model from a GGUF file or a model folder, on the GPU."""
    import transformers

    kw = {"gguf_file": os.path.basename(path)} if path.endswith(".gguf") else {}
    m = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path) if kw else path, dtype=torch.bfloat16, **kw)
    return m.to("cuda").eval()


def bench_torch(model, batch, chunk, vocab, torch, iters):
    ids = torch.randint(0, vocab, (batch, chunk), device="cuda")

    def run():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    return time_fn(run, 5, iters, torch.cuda.synchronize)


def stream_torch(model, ids, chunk, torch):
    """Eager transformers streaming with its KV cache; returns tokens/s."""
    def run():
        past = None
        with torch.no_grad():
            for a in range(0, ids.shape[1], chunk):
                out = model(input_ids=ids[:, a:a + chunk], past_key_values=past, use_cache=True)
                past = out.past_key_values
    run()
    torch.cuda.synchronize()
    t = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return ids.numel() / (time.perf_counter() - t)


def bench_graph(folder, batch, chunk, iters, device="cuda"):
    """One chunk from an empty past with the state bound on the device; the run alone is timed."""
    from exporters.runtime.session import ChunkSession

    sess = ChunkSession(folder, provider=device)
    assert sess.device == device, sess.provider_note
    state = sess.new_state(batch)
    ids = np.random.default_rng(0).integers(0, sess.manifest.vocab_size, (batch, chunk), dtype=np.int64)
    b, _ = sess.bind(ids, state)
    b.synchronize_inputs()
    return time_fn(lambda: sess.sess.run_with_iobinding(b), 5, iters, b.synchronize_outputs)


def bench_static(folder, batch, chunk, iters, device="cuda"):
    """One chunk through a static session (CUDA graphs on CUDA): the chunk's host-to-device copy and the replay.
    A window export steps on (its state keeps its shape); a full-attention export's step runs from an empty past,
    each after an untimed reset (the step of past 0 is its own pinned session and captured graph)."""
    from exporters.runtime.session import ChunkSession

    sess = ChunkSession(folder, provider=device, static_batch=batch)
    assert sess.cuda_graph, sess.provider_note
    state = sess.new_state(batch)
    ids = np.random.default_rng(0).integers(0, sess.manifest.vocab_size, (batch, chunk), dtype=np.int64)
    if not sess.static.growing:
        return time_fn(lambda: sess.step(ids, state, fetch=False), 5, iters)
    ts = []
    for i in range(5 + iters):
        state = sess.new_state(batch)
        state.position()  # waits for the reset's copies
        t = time.perf_counter()
        sess.step(ids, state, fetch=False)  # onnxruntime's run returns once its stream is done
        if i >= 5:
            ts.append((time.perf_counter() - t) * 1e3)
    return float(np.median(ts))


def reset_ms(folder, batch, device="cuda", iters=10):
    """A static session's reset (a fresh document's initial state) per call, ms, median of ``iters``: as the runtime
    does it (a device-side copy from initial values kept on the device) and as an upload of the host arrays into the
    same buffers (how sessions before session 5 reset)."""
    from exporters.runtime.session import ChunkSession
    from exporters.runtime.state import initial_arrays

    sess = ChunkSession(folder, provider=device, static_batch=batch)
    state = sess.new_state(batch)

    def upload():
        for name, arr in initial_arrays(state.specs, batch, sess.folder).items():
            state.cur[name].update_inplace(arr)

    out = {}
    for label, fn in (("device copy", lambda: sess.new_state(batch)), ("host upload", upload)):
        fn()
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            state.position()  # waits for the copies
            ts.append((time.perf_counter() - t) * 1e3)
        out[label] = float(np.median(ts))
    return out


def stream_graph(folder, ids, chunk, device="cuda", static=False, notes=None):
    """tokens/s of streaming ``ids`` (one warm-up pass first); ``notes``: gets a static full-attention session's
    pinned sessions, weight sharing and the device memory the session took (free memory before and after, GB)."""
    import torch

    from exporters.runtime.session import ChunkSession

    gc.collect()  # the sessions of the graph timed before (reference cycles) release their device memory first
    free_before = torch.cuda.mem_get_info()[0]
    sess = ChunkSession(folder, provider=device, static_batch=ids.shape[0] if static else None)

    def run():
        state = sess.new_state(ids.shape[0])
        for a in range(0, ids.shape[1], chunk):
            sess.step(ids[:, a:a + chunk], state, fetch=False)
        return state

    run()
    t = time.perf_counter()
    st = run()
    st.position()  # device -> host: waits for the last step
    rate = ids.size / (time.perf_counter() - t)
    if notes is not None and sess.static is not None and sess.static.growing:
        notes[folder] = {"pinned_sessions": len(sess.static.sessions), "weight_sharing": sess.static.sharing,
                         "device_gb": round((free_before - torch.cuda.mem_get_info()[0]) / 2 ** 30, 2)}
    return rate


def plot_results(results: dict, path: str) -> str:
    """A PNG of the step times (one bar group per batch size, log scale, the floor as a line) and, when measured,
    the streaming tokens/s: the plot that goes with the Markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = results["step_ms"]
    stream = results.get("stream_tokens_per_s") or {}
    fig, axes = plt.subplots(1, 2 if stream else 1, figsize=(15 if stream else 9, 6), squeeze=False)
    ax = axes[0][0]
    batches = sorted(step, key=int)
    paths = [k for k in step[batches[0]] if k != "floor_ms"]
    width = 0.8 / max(1, len(batches))
    for j, b in enumerate(batches):
        ys = [step[b].get(p, float("nan")) for p in paths]
        ax.barh([i + j * width for i in range(len(paths))], ys, height=width, label=f"batch {b}")
        ax.axvline(step[b]["floor_ms"], linestyle="--", linewidth=1, color=f"C{j}")
    ax.set_yticks([i + width * (len(batches) - 1) / 2 for i in range(len(paths))], [p.replace(" (ORT CUDA fp16", " (fp16") for p in paths], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ms per chunk (log); dashed: compute/memory floor")
    ax.invert_yaxis()
    ax.legend()
    ax.set_title(f"C = {results['chunk']} chunk step, {results['device']}")
    if stream:
        ax2 = axes[0][1]
        names = list(stream)
        ax2.barh(range(len(names)), [stream[n] for n in names])
        ax2.set_yticks(range(len(names)), [n.replace(" (ORT CUDA fp16", " (fp16") for n in names], fontsize=8)
        ax2.invert_yaxis()
        ax2.set_xlabel(f"tokens/s, streaming {results.get('stream_tokens', '')} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attempt(errors: dict, key: str, fn, *args, **kwargs) -> float:
    """``fn(*args, **kwargs)``, or NaN with the error kept under ``key``: a graph that fails (e.g. an experimental form
    the CUDA provider refuses) must not cost the other graphs' measurements of the same run."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- reported in the table and the JSON
        errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"FAILED {key}: {errors[key]}", flush=True)
        return float("nan")


def base_of(path: str, times) -> float:
    """The time of our base graph in the same mode: for 'ours: fwl-w graph (X)' the row 'ours: base-w graph (X)',
    else (no base graph of that suffix, e.g. an experiment's 'ttt-u') 'ours: base graph (X)'; for the torch rows
    the plain base graph's."""
    if not path.startswith("ours: "):
        return times.get("ours: base graph (ORT CUDA fp16)")
    name, rest = path[len("ours: "):].split(" ", 1)
    suffix = name.split("-", 1)[1] if "-" in name else ""
    return times.get(f"ours: base{'-' + suffix if suffix else ''} {rest}", times.get(f"ours: base {rest}"))


def main():
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="the base model as a GGUF file (tokenizer for --doc from it too)")
    src.add_argument("--hf", help="the base model as a transformers folder (random-weight shapes: no --doc needed)")
    ap.add_argument("--graph", action="append", default=[], help="NAME=EXPORTED_FOLDER (fp16 graphs)")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--doc", default=None, help="a long text file for the streaming measurement")
    ap.add_argument("--doc-tokens", type=int, default=8192)
    ap.add_argument("--out-md", required=True)
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--out-png", default=None, help="also plot the results (default: beside --out-md)")
    args = ap.parse_args()
    import torch

    rates = measured_rates(torch)
    hf = transformers_model(args.gguf or args.hf, torch)
    cfg = hf.config.to_dict()
    vocab = cfg["vocab_size"]
    compiled = torch.compile(hf)
    rows, results = [], {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                         "rates": rates, "chunk": args.chunk, "step_ms": {}, "stream_tokens_per_s": {}, "errors": {}}
    errors = results["errors"]
    import onnxruntime

    results["onnxruntime"] = onnxruntime.__version__
    graphs = dict(g.split("=", 1) for g in args.graph)
    for batch in args.batches:
        floor = chunk_floor_ms(cfg, batch, args.chunk, 0, rates)
        times = {"transformers eager (bf16)": bench_torch(hf, batch, args.chunk, vocab, torch, args.iters),
                 "torch.compile (bf16)": bench_torch(compiled, batch, args.chunk, vocab, torch, args.iters)}
        for name, folder in graphs.items():
            for path, fn in ((f"ours: {name} graph (ORT CUDA fp16)", bench_graph),
                             (f"ours: {name} graph (ORT CUDA fp16, CUDA graphs)", bench_static)):
                times[path] = attempt(errors, f"{path}, batch {batch}", fn, folder, batch, args.chunk, args.iters)
        for path, ms in times.items():
            base_ms = base_of(path, times)
            if ms != ms:  # NaN: failed, see results["errors"]
                rows.append({"path": path, "batch": batch, "ms/chunk": "failed"})
                continue
            rows.append({"path": path, "batch": batch, "ms/chunk": f"{ms:.2f}", "× floor": f"{ms / floor['floor_ms']:.1f}",
                         "× our base graph": f"{ms / base_ms:.2f}" if base_ms and base_ms == base_ms else ""})
        results["step_ms"][str(batch)] = {**times, "floor_ms": floor["floor_ms"]}
    if args.doc:
        from fwconvert.tokenizer import load_tokenizer

        tok = load_tokenizer(args.gguf or args.hf)
        ids_list = tok.encode(open(args.doc, encoding="utf-8").read())[: args.doc_tokens]
        ids_np = np.asarray([ids_list], dtype=np.int64)
        stream = {"transformers eager (bf16)": stream_torch(hf, torch.tensor(ids_np, device="cuda"), args.chunk, torch)}
        for name, folder in graphs.items():
            path = f"ours: {name} graph (ORT CUDA fp16)"
            stream[path] = attempt(errors, f"{path}, streaming", stream_graph, folder, ids_np, args.chunk)
            if ids_np.shape[1] % args.chunk == 0:  # a full export: one pinned session and graph per past length
                path = f"ours: {name} graph (ORT CUDA fp16, CUDA graphs)"
                stream[path] = attempt(errors, f"{path}, streaming", stream_graph, folder, ids_np, args.chunk,
                                       static=True, notes=results.setdefault("static_full_sessions", {}))
                reset = attempt(errors, f"{name} reset", reset_ms, folder, 1)
                if isinstance(reset, dict):
                    results.setdefault("reset_ms", {})[name] = reset
        results["stream_tokens_per_s"] = stream
        results["stream_tokens"] = int(ids_np.shape[1])
    md = [f"Device: {results['device']}; torch {torch.__version__}; onnxruntime {results['onnxruntime']}; "
          f"{platform.python_version()}; {results['date']}. Chunk C = {args.chunk}, empty past, median of {args.iters}.",
          f"Measured: bf16 matmul {rates['matmul_flops'] / 1e12:.0f} TFLOP/s, copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s.", "",
          markdown_table(rows, ["path", "batch", "ms/chunk", "× floor", "× our base graph"])]
    if results["stream_tokens_per_s"]:
        eager = results["stream_tokens_per_s"]["transformers eager (bf16)"]
        md += ["", f"Streaming one {results['stream_tokens']}-token document in {args.chunk}-token chunks (batch 1, KV cache growing):", "",
               markdown_table([{"path": k, "tokens/s": "failed" if v != v else f"{v:,.0f}",
                                "× eager": "" if v != v else f"{v / eager:.1f}"}
                               for k, v in results["stream_tokens_per_s"].items()], ["path", "tokens/s", "× eager"])]
    if results.get("static_full_sessions"):
        md += ["", "Static sessions of full-attention graphs (streaming): " + "; ".join(
            f"{os.path.basename(k)}: {v['pinned_sessions']} pinned sessions, weight sharing {v['weight_sharing']}, "
            f"{v['device_gb']} GB of device memory"
            for k, v in results["static_full_sessions"].items())]
    if results.get("reset_ms"):
        md += ["", "A static session's reset for the next document (batch 1), ms per reset, median of 10:", "",
               markdown_table([{"graph": k, **{m: f"{v:.2f}" for m, v in r.items()}} for k, r in results["reset_ms"].items()],
                              ["graph", "device copy", "host upload"])]
    if errors:
        md += ["", "Failed (not measured):", ""] + [f"- {k}: {v}" for k, v in errors.items()]
    with open(args.out_md, "w") as f:
        f.write("\n".join(md) + "\n")
    with open(args.out_json, "w") as f:
        json.dump(results, f, indent=2)
    plot_results(results, args.out_png or os.path.splitext(args.out_md)[0] + ".png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
