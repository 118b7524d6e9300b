"""``fwconvert calibrate`` and ``fwconvert eval``: option parsing and printing only; the work lives in
``fwconvert.calibrate`` and ``fwconvert.evaluate``. ``--runtime ort`` is wired here, since
``fwconvert`` itself never imports ``exporters``.
"""
from __future__ import annotations

import math
import os

import click

from ..errors import InputError, UsageError
from .json_out import strict_json

DATA_HELP = ("Text files, folders (recursive, filtered by --ext) or pre-tokenized documents (*.tokens.npy: a 1-D "
             "integer array; *.tokens.bin: raw int32). Repeat for several.")


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _doc_bar(name: str, total: int):
    """A progress bar over documents on stderr (off when stderr is not a terminal)."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="doc", file=sys.stderr, leave=False, disable=None)


def _exts(ext: str):
    return tuple(e if e.startswith(".") else "." + e for e in ext.split(",") if e)


@click.command("calibrate")
@click.argument("model", type=click.Path())
@click.option("--data", "data", multiple=True, required=True, type=click.Path(), help=DATA_HELP)
@click.option("--ext", default=".py,.rst,.txt,.md", show_default=True, help="Extensions of text files taken from folders.")
@click.option("-o", "--out", "out", type=click.Path(), default=None, help="Output folder (default: MODEL-calibrated).")
@click.option("--steps", default=200, show_default=True, type=int, help="Optimizer updates.")
@click.option("--seq-len", default=2048, show_default=True, type=int, help="Training window (tokens of one document).")
@click.option("--batch-size", default=1, show_default=True, type=int, help="Windows per update per process.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Peak AdamW learning rate.")
@click.option("--fast-lr", default=None, type=float,
              help="Peak learning rate of the new fast-weight parameters (default: --lr; for in-place TTT "
                   "min(--lr, 1e-4), since its parameters diverged at 1e-3). With --train fast+baseline the plain "
                   "W_down matrices then use --lr, the rate their --baseline run is tuned for.")
@click.option("--warmup", default=None, type=int, help="Warmup updates (default: 5% of --steps).")
@click.option("--train", "train", default="fast", show_default=True, type=click.Choice(["fast", "fast+norms", "fast+baseline", "all"]),
              help="fast: the new fast-weight parameters; fast+norms: plus RMSNorm weights; fast+baseline: plus the "
                   "W_down matrices --baseline trains (the fast model and its baseline then train the same slow "
                   "parameters); all: everything.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (cuda:N).")
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint of this run.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of data order, split and initialisation.")
@click.option("--save-every", default=50, show_default=True, type=int, help="Checkpoint every N updates.")
@click.option("--heldout", default=0.1, show_default=True, type=float, help="Fraction of documents held out for eval.")
@click.option("--baseline", is_flag=True,
              help="Calibrate the base model without fast weights (W_down of TTT/last layers, >= the fast-weight "
                   "parameter count) with the same recipe: the fair comparison.")
@click.option("--skip-nonfinite", default=0, show_default=True, type=int,
              help="Skip up to N updates with a non-finite loss or gradient before stopping (exit 6).")
@click.option("--force", is_flag=True, help="Replace an existing output folder: an empty one or an earlier fwconvert "
                                           "output (other folders are refused).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--tf32/--no-tf32", default=True, show_default=True,
              help="On CUDA, let fp32 matmuls use TF32: the fp32 fast-weight products (in-place TTT's updates, FWL's "
                   "head) run on tensor cores, on 10-bit mantissa inputs as in fp16 exports (in-place calibration "
                   "of a 1B model: 1.43x faster). --no-tf32 keeps them full fp32. Recorded in the manifest; on CUDA, --resume continues only "
                   "a run with the same setting (elsewhere it changes nothing).")
def calibrate_cmd(model, data, ext, out, steps, seq_len, batch_size, lr, fast_lr, warmup, train, device, resume, seed,
                  save_every, heldout, baseline, skip_nonfinite, force, no_progress, tf32):
    """Train MODEL's fast-weight parameters on local documents (through the fast-weight updates)."""
    from ..calibrate.loop import CalibrationSettings
    from ..calibrate.run import calibrate

    out = out or model.rstrip("/\\") + ("-baseline" if baseline else "-calibrated")
    settings = CalibrationSettings(steps=steps, seq_len=seq_len, batch_size=batch_size, lr=lr, fast_lr=fast_lr,
                                   train=train, seed=seed, save_every=save_every, skip_nonfinite=skip_nonfinite,
                                   warmup=warmup, tf32=tf32)
    rec = calibrate(model, list(data), out, settings, device=device, resume=resume, baseline=baseline, force=force,
                    heldout=heldout, exts=_exts(ext), log=_log, progress=not no_progress)
    if os.environ.get("RANK", "0") == "0":
        losses = [x for x in rec["losses"] if math.isfinite(x)]
        first, last = (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))
        click.echo(f"calibrated {rec['steps']} steps ({rec['trainable_count']:,} parameters): loss {first:.4f} -> "
                   f"{last:.4f}, {rec['tokens_per_second']:,.0f} tokens/s; held out {len(rec['data']['heldout'])} "
                   f"documents; wrote {out}")


def _export_source(folder: str):
    """The model folder an ONNX export was made from (its manifest's ``source``) when it is still there, else None."""
    try:
        from exporters.runtime.session import load_manifest
    except ImportError:
        return None
    try:
        src = load_manifest(folder).source
    except InputError:
        return None
    return src if src and os.path.isdir(src) else None


def _ort_runner(folder: str, device: str, chunk: int, static: bool = False, context: int = 8192):
    """(step, init_state) over an exported ONNX folder via ``exporters.runtime`` (imported lazily: the
    ``fwconvert`` package itself never imports ``exporters``). The state lives in ORT buffers.

    ``static``: one static session per batch size, holding ``context`` tokens (CUDA graphs on the CUDA provider; a
    full-attention export gets one pinned session per past length). A document's
    short last chunk is padded to the full chunk (its padded positions' logits are dropped; the state after it,
    which nothing reads, is not that of the real tokens)."""
    import numpy as np
    import torch

    try:
        from exporters.runtime.session import ChunkSession, load_manifest
        from exporters.runtime.static import check_static
        from exporters.runtime.stream import chunk_logits
    except ImportError:
        raise InputError("--runtime ort: exporters.runtime is not available in this installation") from None
    provider = "cuda" if device.startswith("cuda") else "cpu"
    manifest = load_manifest(folder)
    rule = manifest.chunking
    if (rule.get("fixed") or static) and chunk != int(rule["chunk_size"]):
        raise UsageError(f"--chunk-size {chunk}: {folder} takes chunks of exactly {rule['chunk_size']} tokens "
                         f"(use --chunk-size {rule['chunk_size']})")
    sessions = {}

    def session_for(batch: int):  # static: one session per batch size; else one session for all
        key = batch if static else None
        if key not in sessions:
            sessions[key] = ChunkSession(folder, provider=provider, manifest=manifest, static_batch=key,
                                         static_context=-(-context // chunk) * chunk if static else None)
        return sessions[key]

    if static:  # refuse a bad setting before any document is read
        check_static(1, context, chunk)
    else:
        session_for(1)  # the one session, loaded (and checked) now

    def step(ids, state):
        ids = np.ascontiguousarray(ids.cpu().numpy(), dtype=np.int64)
        logits = chunk_logits(session_for(ids.shape[0]), ids, state)  # static: the last chunk padded
        return torch.from_numpy(np.ascontiguousarray(logits)), state

    def init_state(batch: int):
        return session_for(batch).new_state(batch)

    return step, init_state


def _ort_vocab(folder: str) -> int:
    try:
        from exporters.runtime.session import load_manifest
    except ImportError:
        raise InputError("--runtime ort: exporters.runtime is not available in this installation") from None
    return int(load_manifest(folder).vocab_size)


@click.command("eval")
@click.argument("model", type=click.Path())
@click.option("--data", "data", multiple=True, required=True, type=click.Path(), help=DATA_HELP)
@click.option("--ext", default=".py,.rst,.txt,.md", show_default=True, help="Extensions of text files taken from folders.")
@click.option("--context", default=8192, show_default=True, type=int, help="Tokens per document (longer ones are cut).")
@click.option("--min-tokens", default=None, type=int, help="Skip documents shorter than this (default: --context).")
@click.option("--chunk-size", default=512, show_default=True, type=int, help="Tokens per streaming step.")
@click.option("--runtime", default="torch", show_default=True, type=click.Choice(["torch", "ort"]),
              help="ort: MODEL is an exported ONNX folder (export-onnx) run by onnxruntime.")
@click.option("--static", is_flag=True,
              help="With --runtime ort: run static sessions (batch and chunk pinned, and the past length for a "
                   "full-attention export; buffers bound once, CUDA graphs on the CUDA provider); short last chunks "
                   "are padded.")
@click.option("--base", "base", default=None, type=click.Path(),
              help="Also evaluate this base model (the one the fast weights were added to: same vocabulary and "
                   "tokenizer, no fast weights).")
@click.option("--baseline", "baseline", default=None, type=click.Path(),
              help="Also evaluate this calibrated baseline (same vocabulary and tokenizer).")
@click.option("--dynamic-eval", is_flag=True, help="Also run dynamic evaluation of the base model (--base, else "
              "MODEL's base weights).")
@click.option("--dynamic-eval-params", default="all", show_default=True, type=click.Choice(["all", "down_proj"]))
@click.option("--dynamic-eval-lr", default=None, type=float, help="Adam lr (default: 1e-4 all, 3e-4 down_proj).")
@click.option("--split", default="auto", show_default=True, type=click.Choice(["auto", "heldout", "all"]),
              help="auto: the held-out documents when MODEL's manifest records a calibration split that held out any "
                   "(else every document).")
@click.option("--split-from", default=None, type=click.Path(),
              help="Read the calibration split from this model folder instead of MODEL (e.g. for an ONNX export).")
@click.option("--max-docs", default=None, type=int, help="Evaluate at most N documents.")
@click.option("--batch-size", default=1, show_default=True, type=int, help="Documents streamed together.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--plot", default=None, type=click.Path(),
              help="Write a plot of loss against position to this file (.png, .pdf or .svg).")
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(model, data, ext, context, min_tokens, chunk_size, runtime, static, base, baseline, dynamic_eval,
             dynamic_eval_params, dynamic_eval_lr, split, split_from, max_docs, batch_size, device, dtype, plot, force,
             as_json):
    """Perplexity by position over long documents, streamed in chunks with the state carried.

    The held-out documents of the model's calibration are evaluated when its MANIFEST.json records a split (an
    ONNX export: its source model's, when that folder is still there); --split all evaluates every document."""
    from .. import evaluate as ev
    from ..calibrate.data import load_documents
    from ..calibrate.run import check_device
    from ..modeling.build import DTYPES

    for name, value in (("--chunk-size", chunk_size), ("--batch-size", batch_size), ("--max-docs", max_docs)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    if static and runtime != "ort":
        raise UsageError("--static applies to --runtime ort (an exported graph)")
    if plot:
        ev.check_plot_path(plot, force)
    check_device(device)
    ev.bucket_edges(context)
    vocab, tok_src = _vocab_and_tokenizer_source(model, runtime, context)
    if base:
        base_ck = ev.check_same_vocabulary(model, vocab, base, "--base")
        if base_ck.fast_weights is not None:
            kind = getattr(base_ck.fast_weights, "kind", "fast weights")
            raise InputError(f"--base {base}: has fast weights ({kind}); --base is the original model they were added "
                             "to (a calibrated baseline goes to --baseline)")
    if baseline:
        ev.check_same_vocabulary(model, vocab, baseline, "--baseline")
    docs = load_documents(list(data), vocab, lambda: _tokenizer(tok_src), exts=_exts(ext))
    split_src = split_from or (_export_source(model) if runtime == "ort" else None) or model
    keys = ev.heldout_keys(split_src)
    if split == "auto" and keys is not None and not keys:
        _log(f"note: the calibration recorded in {split_src} held out no documents; evaluating all of --data "
             "(its training documents included)")
    docs = ev.select_documents(docs, context, split, keys, min_tokens, max_docs)
    used = (f"the held-out split recorded in {split_src}" if split != "all" and keys else "all of --data")
    _log(f"documents: {len(docs)} from {used}")
    dt = DTYPES[dtype]
    runners = {}
    if runtime == "ort":
        runners["onnx"] = _ort_runner(model, device, chunk_size, static, context)
    else:
        primary = ev.load_eval_model(model, device, dt)
        runners[ev.model_name(primary)] = ev.torch_runner(primary)
    base_model = ev.load_eval_model(base, device, dt) if base else None
    if base_model is not None:
        runners["base"] = ev.torch_runner(base_model)
    if baseline:
        runners["baseline"] = ev.torch_runner(ev.load_eval_model(baseline, device, dt))
    dyn = None
    if dynamic_eval:
        src = base_model if base_model is not None else (ev.load_eval_model(model, device, dt, drop_fast_weights=True)
                                                         if runtime == "torch" else None)
        if src is None:
            raise UsageError("--dynamic-eval with --runtime ort needs --base")
        dyn = {"model": src, "lr": dynamic_eval_lr, "params": dynamic_eval_params}
    stats = ev.compare(runners, docs, context, chunk_size, device, batch_size, dyn, log=_log, bar=_doc_bar)
    result = ev.report(stats, context, chunk_size, len(docs))
    result["documents_from"] = used
    if plot:
        result["plot"] = ev.plot_curves({k: v.curve() for k, v in stats.items()}, context, plot)
    _print_eval(result, as_json)


def _vocab_and_tokenizer_source(model, runtime, context):
    """(vocab size, folder whose tokenizer reads text data); refuses a context beyond the model's."""
    from ..checkpoint import open_checkpoint

    if runtime == "ort":
        return _ort_vocab(model), model
    cfg = open_checkpoint(model).config
    if context > cfg.max_position_embeddings:
        raise UsageError(f"--context {context} is longer than {model}'s max_position_embeddings {cfg.max_position_embeddings}")
    return cfg.vocab_size, model


def _tokenizer(path):
    from ..tokenizer import load_tokenizer

    return load_tokenizer(path)


def _print_eval(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(strict_json(result, sort_keys=True))
        return
    models = result.get("models") or {result.get("model", "model"): result}
    labels = result["buckets"]
    click.echo(f"{result['documents']} documents x {result['context']} tokens, chunk {result['chunk_size']}")
    click.echo(f"{'':14s}" + "".join(f"{b:>10s}" for b in labels) + f"{'overall':>10s}{'tokens/s':>12s}")
    for name, s in models.items():
        row = "".join(f"{s['by_position'].get(b, float('nan')):10.3f}" for b in labels)
        click.echo(f"{name:14s}{row}{s['perplexity']:10.3f}{s['tokens_per_second']:12,.0f}")
    if result.get("plot"):
        click.echo(f"plot: {result['plot']}")


COMMANDS = [calibrate_cmd, eval_cmd]
