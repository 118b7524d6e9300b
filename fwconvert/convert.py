"""Conversion: ``add_fwl`` (FWL head), ``mark_fast`` (in-place TTT on W_down), ``save_model`` (any DecoderLM).

Conversions validate every option and the output path before writing, then STREAM: each original tensor's
bytes are copied unchanged (one input shard at a time, original dtype), the new tensors come from the
mechanism's own module + ``init_conversion_`` (so the converted model equals the base model), then
config.json, tokenizer files and MANIFEST.json, all through ``checkpoint.writer.AtomicOutput``
(``checkpoint.resume.ResumableOutput`` for add-fwl / mark-fast: a staging journal, and ``resume=True`` continues
an interrupted run, keeping its complete shards; the result is bit-identical to an uninterrupted run).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections import Counter
from typing import Callable, Optional

import torch

from .config import FWLConfig, InPlaceTTTConfig, ModelConfig, fast_weights_to_dict
from .errors import InputError, NumericError, UsageError
from .families import FWCONVERT_MODEL_TYPE, FAMILIES, IGNORED_TENSOR_SUFFIXES, expected_tensors
from .checkpoint import shards
from .checkpoint.resume import ResumableOutput, run_identity
from .checkpoint.shards import ST_DTYPES, ShardedSafetensorsWriter
from .checkpoint.writer import AtomicOutput, faults, not_an_earlier_output, preflight

log = logging.getLogger("fwconvert")

ARCHITECTURE = "FwconvertForCausalLM"
TTT_FIELDS = ("ttt_mode", "ttt_layers", "ttt_proj", "ttt_lr", "ttt_chunk", "ttt_target")
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _NoProgress:
    def update(self, n=1):
        pass

    def close(self):
        pass


# -- the converted config.json ------------------------------------------------------------------
def raw_config_from_model_config(cfg: ModelConfig) -> dict:
    """An HF-style config dict that parses back to ``cfg`` (used when no source config is at hand)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("family", "qkv_bias", "o_bias", "qk_norm", "torch_dtype")}
    d.update(model_type=cfg.family, architectures=list(FAMILIES[cfg.family].architectures), hidden_act="silu")
    if cfg.family in ("llama", "qwen3"):
        d["attention_bias"] = cfg.o_bias
    if cfg.torch_dtype:
        d["torch_dtype"] = cfg.torch_dtype
    return {k: v for k, v in d.items() if v is not None}


def converted_config(raw: dict, family: str, fw) -> dict:
    """The base HF config marked as ours: model_type fwconvert, base_model_type, fast_weights (+ ttt_* fields)."""
    out = {k: v for k, v in raw.items() if k not in TTT_FIELDS and k not in ("fast_weights", "auto_map")}
    out["model_type"] = FWCONVERT_MODEL_TYPE
    out["base_model_type"] = family
    out["architectures"] = [ARCHITECTURE]
    out["fast_weights"] = fast_weights_to_dict(fw)
    if isinstance(fw, InPlaceTTTConfig):  # the official In-Place TTT fields, so its loader can read ours
        out.update(ttt_mode=True, ttt_layers=list(fw.layers), ttt_proj=True, ttt_lr=float(fw.lr),
                   ttt_chunk=int(fw.chunk_size), ttt_target=fw.target)
    return out


# -- new tensors ----------------------------------------------------------------------------------
def new_tensors(cfg: ModelConfig, fw, seed: int) -> dict:
    """{checkpoint key: fp32 tensor} of the tensors ``fw`` adds, at their conversion values.

    Modules are built on meta; ``init_conversion_`` materialises only the new parameters on cpu."""
    gen = torch.Generator().manual_seed(int(seed))
    base = expected_tensors(cfg)
    if isinstance(fw, FWLConfig):
        from .fastweights.fwl import FWLHead, init_conversion_

        with torch.device("meta"):
            mods = {"fwl_head.": FWLHead(cfg, fw)}
    elif isinstance(fw, InPlaceTTTConfig):
        from .fastweights.inplace_ttt import InPlaceTTTMLP, init_conversion_

        with torch.device("meta"):
            mods = {f"model.layers.{i}.mlp.": InPlaceTTTMLP(cfg, fw) for i in fw.layers}
    else:
        raise TypeError(f"unknown fast-weight config {fw!r}")
    out = {}
    for prefix, mod in mods.items():
        init_conversion_(mod, gen)
        for k, v in mod.state_dict().items():
            if prefix + k in base:
                continue
            if v.is_meta:
                raise RuntimeError(f"internal: init_conversion_ left {prefix + k} uninitialised")
            out[prefix + k] = v.detach().to(torch.float32)  # the module is dropped on return: no copy needed
    return out


def _nbytes(shape, dtype: str) -> int:
    return math.prod(shape) * ST_DTYPES.get(dtype, 4)


def _base_dtype(ck) -> torch.dtype:
    """The dtype new tensors are stored in: the source's most common float dtype (fp32 for GGUF)."""
    if ck.kind == "gguf":
        return torch.float32
    counts = Counter(dt for _, dt in ck.specs.values() if dt in _FLOAT_DTYPES)
    return _FLOAT_DTYPES[counts.most_common(1)[0][0]] if counts else torch.float32


def _check_nonfinite(name: str, t: torch.Tensor, allow: bool) -> None:
    if not t.is_floating_point():
        return
    flat = t.detach().reshape(-1)
    bad = sum(int((~torch.isfinite(part)).sum()) for part in flat.split(1 << 22))  # chunked: bounded extra memory
    if bad:
        if not allow:
            raise NumericError(f"tensor {name!r} has {bad} non-finite values (NaN/Inf); --allow-nonfinite writes it anyway")
        log.warning("Warning: tensor %r has %d non-finite values (written because --allow-nonfinite)", name, bad)


# -- the conversion pipeline ------------------------------------------------------------------------
def default_output(src_path: str, suffix: str) -> str:
    """``<folder>-<suffix>`` beside a source folder, ``<stem>-<suffix>`` beside a source file."""
    p = os.path.abspath(src_path).rstrip(os.sep)
    if os.path.isdir(p):
        return p + f"-{suffix}"
    stem = os.path.basename(p)
    for ext in (".safetensors", ".gguf"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return os.path.join(os.path.dirname(p), f"{stem}-{suffix}")


def _open_base(src, config):
    from .checkpoint import open_checkpoint

    ck = open_checkpoint(os.fspath(src), config_path=config)
    if ck.fast_weights is not None:
        raise InputError(f"{ck.path}: already has fast weights ({ck.fast_weights.kind}); convert the base model instead")
    ck.check_tensors(expected_tensors(ck.config))
    return ck


def _inputs(ck) -> list:
    return [ck.path, *ck.data_files, *ck.tokenizer_files]


def _plan(ck, fw, new_dtype: torch.dtype) -> tuple:
    """({name: (shape, nbytes)} of the whole output, {name: shape} of the new tensors), from headers and a
    meta-device model only: nothing is allocated. Refuses a layout the loader would not accept."""
    from .modeling import build_model, expected_shapes

    want = expected_shapes(build_model(ck.config, fw))
    plan = {}
    for name, (shape, dt) in ck.specs.items():
        if not name.endswith(IGNORED_TENSOR_SUFFIXES):
            plan[name] = (tuple(shape), _nbytes(shape, "F32" if ck.kind == "gguf" else dt))
    new_shapes = {k: v for k, v in want.items() if k not in plan}
    item = torch.empty((), dtype=new_dtype).element_size()
    plan.update({k: (v, math.prod(v) * item) for k, v in new_shapes.items()})
    if {k: v[0] for k, v in plan.items()} != want:
        diff = sorted(set(want) ^ set(plan)) or sorted(k for k in want if want[k] != plan[k][0])
        raise RuntimeError(f"internal: converted tensors do not match the model layout: {diff[:10]}")
    return plan, new_shapes


def _stream(ck, writer: ShardedSafetensorsWriter, names: list, allow_nonfinite: bool, bar) -> None:
    sleep_after = faults().get("sleep_after_tensor")
    for i, (name, t) in enumerate(ck.iter_tensors(names, check_finite=False), 1):
        _check_nonfinite(name, t, allow_nonfinite)  # our own, chunked check (the reader's whole-tensor one costs ~4x)
        writer.add(name, t)
        bar.update(1)
        if sleep_after is not None and str(i) == sleep_after:
            time.sleep(float(faults().get("sleep_s", "60")))


def _convert(ck, out: Optional[str], fw, suffix: str, *, seed: int, force: bool, allow_nonfinite: bool,
             progress: Optional[Callable], flags: dict, resume: bool = False) -> str:
    new_dtype = _base_dtype(ck)
    plan, new_shapes = _plan(ck, fw, new_dtype)
    out = os.path.abspath(os.fspath(out)) if out is not None else default_output(ck.path, suffix)
    estimate = sum(nb for _, nb in plan.values()) + sum(os.path.getsize(p) for p in ck.tokenizer_files) + (1 << 20)
    # before anything heavy is built or read; leftovers are reported (or resumed) by ResumableOutput
    out = preflight(out, _inputs(ck), force, estimate, report_leftovers=False, replaceable=not_an_earlier_output)
    new = new_tensors(ck.config, fw, seed)
    if {k: tuple(v.shape) for k, v in new.items()} != new_shapes:
        raise RuntimeError(f"internal: new tensors {sorted(new)} differ from the layout's {sorted(new_shapes)}")
    fingerprint, shard_bytes = ck.fingerprint(), shards.DEFAULT_SHARD_BYTES
    identity = run_identity(fingerprint, flags, plan, shard_bytes)
    bar = _NoProgress()
    try:
        with ResumableOutput(out, identity, resume=resume, force=force, inputs=_inputs(ck),
                             estimate_bytes=estimate) as ao:
            writer = ShardedSafetensorsWriter(ao, plan, max_shard_bytes=shard_bytes, resume=ao)
            todo = [n for n in plan if writer.wanted(n)]  # all, unless resumed shards are kept
            bar = progress(len(todo)) if progress is not None else bar
            _stream(ck, writer, [n for n in todo if n not in new], allow_nonfinite, bar)
            for name, t in new.items():
                if writer.wanted(name):
                    writer.add(name, t.to(new_dtype))
                    bar.update(1)
            writer.close()
            ao.write_json("config.json", converted_config(ck.raw_config, ck.config.family, fw))
            _copy_tokenizer(ao, ck)
            ao.manifest.update(
                source=ck.path, source_kind=ck.kind, input_fingerprint=fingerprint, flags=flags, seed=int(seed),
                fast_weights=fast_weights_to_dict(fw), new_tensors=sorted(new), new_tensor_dtype=str(new_dtype).split(".")[-1],
                original_tensors=("dequantized from GGUF and stored as F32 (no original safetensors bytes to copy)"
                                  if ck.kind == "gguf" else "copied byte-identical in their original dtype"))
    finally:
        bar.close()
    return out


def _copy_tokenizer(ao: AtomicOutput, ck) -> None:
    """Copy the source's tokenizer files; a GGUF source's embedded vocabulary is exported as HF files."""
    files = list(ck.tokenizer_files)
    with tempfile.TemporaryDirectory(prefix="fwconvert-tok-") as tmp:
        if not files and ck.kind == "gguf":
            try:
                from .tokenizer import export_tokenizer

                files = export_tokenizer(ck.path, tmp)
            except (InputError, ImportError) as e:
                log.warning("Warning: no tokenizer written: %s", e)
        names = set()
        for p in files:
            name = os.path.basename(p)
            if name not in names and name not in ("config.json", "MANIFEST.json") and not name.endswith(".safetensors"):
                ao.copy_file(name, p)
                names.add(name)


def add_fwl(src, out=None, *, size: Optional[int] = None, chunk_size: int = 256, config=None, force: bool = False,
            seed: int = 0, allow_nonfinite: bool = False, progress: Optional[Callable] = None,
            resume: bool = False) -> str:
    """Give the checkpoint at ``src`` an FWL head (residual on the final hidden state; converted == base).

    ``resume``: continue an interrupted run into the same output (see ``checkpoint.resume``); OutputError
    (exit 4) if the input, the flags or the version differ from that run's.

    ``size`` defaults to hidden_size and must equal it (the block's output is unembedded by the base LM
    head; no projection is implemented). Returns the output folder (default: ``<src>-fwl`` beside src)."""
    from .fastweights.fwl import validate_fwl_config

    ck = _open_base(src, config)
    size = ck.config.hidden_size if size is None else size
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise UsageError(f"--size must be a positive integer, got {size!r}")
    if size != ck.config.hidden_size:
        raise UsageError(f"--size {size} must equal the model's hidden_size {ck.config.hidden_size}: the FWL block is a "
                         "residual on the final hidden state, unembedded by the base LM head (no projection implemented)")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise UsageError(f"--chunk-size must be an integer >= 1, got {chunk_size!r}")
    fw = FWLConfig(size=size, chunk_size=chunk_size)
    validate_fwl_config(ck.config, fw)
    flags = {"command": "add-fwl", "size": size, "chunk_size": chunk_size, "seed": int(seed), "allow_nonfinite": allow_nonfinite}
    return _convert(ck, out, fw, "fwl", seed=seed, force=force, allow_nonfinite=allow_nonfinite, progress=progress,
                    flags=flags, resume=resume)


def _check_gated(ck, layers) -> None:
    missing = [i for i in layers if f"model.layers.{i}.mlp.gate_proj.weight" not in ck.specs]
    if missing:
        raise InputError(f"{ck.path}: layers {missing} have no gated MLP (no mlp.gate_proj.weight); "
                         "in-place TTT needs a SwiGLU MLP whose down_proj becomes the fast weight")


def mark_fast(src, out=None, *, layers: str = "every:6", chunk_size: int = 1024, lr: float = 3.0,
              target: str = "hidden_states", config=None, force: bool = False, seed: int = 0,
              allow_nonfinite: bool = False, progress: Optional[Callable] = None, resume: bool = False) -> str:
    """Make W_down of the chosen layers in-place TTT fast weights (conv zero, so marked == base).

    Returns the output folder (default: ``<src>-ttt`` beside src). ``resume``: as for ``add_fwl``."""
    from .fastweights.inplace_ttt import check_ttt_config, parse_layer_spec

    ck = _open_base(src, config)
    idx = parse_layer_spec(layers, ck.config.num_hidden_layers)
    _check_gated(ck, idx)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise UsageError(f"--lr must be a finite number >= 0, got {lr!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 5 <= chunk_size <= ck.config.max_position_embeddings:
        raise UsageError(f"--chunk-size {chunk_size!r} must be an integer in [5, {ck.config.max_position_embeddings}] "
                         "(at least the conv kernel 5, at most max_position_embeddings)")
    fw = InPlaceTTTConfig(layers=idx, chunk_size=chunk_size, lr=float(lr), target=target)
    check_ttt_config(ck.config, fw)
    flags = {"command": "mark-fast", "layers": list(idx), "chunk_size": chunk_size, "lr": float(lr), "target": target,
             "seed": int(seed), "allow_nonfinite": allow_nonfinite}
    return _convert(ck, out, fw, "ttt", seed=seed, force=force, allow_nonfinite=allow_nonfinite, progress=progress,
                    flags=flags, resume=resume)


def save_model(model, out, *, source=None, force: bool = False, extra_manifest: Optional[dict] = None) -> str:
    """Write a DecoderLM as a converted HF-style folder (config.json, safetensors, tokenizer, MANIFEST.json).

    ``source``: an opened checkpoint (its raw config and tokenizer files are used; it must not overlap
    ``out``). Non-persistent buffers are skipped, a tied lm_head is not duplicated, non-finite weights are
    refused (NumericError)."""
    cfg = model.config
    raw = source.raw_config if source is not None else (cfg.raw or raw_config_from_model_config(cfg))
    state = model.state_dict()
    for name, t in state.items():
        _check_nonfinite(name, t, False)
    plan = {k: (tuple(v.shape), v.numel() * v.element_size()) for k, v in state.items()}
    inputs = _inputs(source) if source is not None else []
    estimate = sum(nb for _, nb in plan.values()) + (1 << 20)
    out = preflight(out, inputs, force, estimate, replaceable=not_an_earlier_output)
    with AtomicOutput(out, force=force, inputs=inputs, estimate_bytes=estimate, preflighted=True) as ao:
        writer = ShardedSafetensorsWriter(ao, plan)
        for name, t in state.items():
            writer.add(name, t)
        writer.close()
        ao.write_json("config.json", converted_config(raw, cfg.family, model.fast_weights))
        if source is not None:
            _copy_tokenizer(ao, source)
            ao.manifest.update(source=source.path, input_fingerprint=source.fingerprint())
        ao.manifest.update(fast_weights=fast_weights_to_dict(model.fast_weights))
        ao.manifest.update({k: v for k, v in (extra_manifest or {}).items() if k != "files"})
    return out
