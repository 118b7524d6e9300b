"""Export one chunk-step graph (KV and fast-weight state as explicit inputs/outputs) plus its manifest.

    past state + input_ids [B, C] --(model.onnx)--> logits [B, C, V] + present state

torch.onnx.export(dynamo=True) with dynamic batch/chunk/past; IR version and opset pinned for
onnxruntime 1.31; written into a fresh staging folder beside OUT, checked (onnx checker, no control
flow, ORT load and a one-step parity check) and renamed into place at the end.
"""
from __future__ import annotations

import copy
import errno
import json
import logging
import math
import os
import shutil
import tempfile
from typing import Callable, Optional, Union

import torch

from fwconvert.config import TOLERANCES, fast_weights_to_dict
from fwconvert.errors import InputError, ResourceError, UsageError
from fwconvert.modeling.decoder import DecoderLM

from .graph import build_manifest, check_graph, export_program, smoke_check
from .io_spec import GRAPH_NAME, INITIAL_STATE_NAME, MANIFEST_FORMAT, MANIFEST_NAME, Manifest
from .precision import check_cast

OPSET = 18
IR_VERSION = 10  # onnx 1.23 writes 14 by default; onnxruntime 1.31 accepts <= 13
# Weights above this go to one external file, model.onnx.data. Below protobuf's 2 GiB limit with headroom for
# the graph, and below torch's own switch (ONNXProgram.save writes external data anyway above 1.5 GiB of
# initializers, torch 2.13), so that the choice is ours; the manifest records what was written.
EXTERNAL_DATA_BYTES = 1_500_000_000
# attention sinks of a window export that the model does not have of its own (session 8, H200: the calibrated
# in-place model's perplexity on an 8k document, window 2048, 14.73 without sinks, 7.06 with 4, 6.75 with full
# attention; 4 sinks cost 0.4-0.5 ms per 512-token chunk at batch 1; docs/benchmarks.md)
DEFAULT_SINKS = 4
STAGING_TAG, OLD_TAG = ".staging-", ".old-"  # .<name>.staging-XXXX / .<name>.old-XXXX beside the output

logger = logging.getLogger("fwconvert")


def _prepare_out(out: str, force: bool, source=None) -> str:
    """The one output preflight of fwconvert (exists/--force, symlink, overlap with the input, writable, disk);
    --force replaces only an empty folder or an earlier export (``_not_replaceable``)."""
    from fwconvert.checkpoint.writer import preflight

    return preflight(out, inputs=[source] if source is not None else (), force=force, replaceable=_not_replaceable)


def _not_replaceable(out: str) -> Optional[str]:
    """Why --force must not replace the existing folder ``out`` (preflight's message), or None: an empty folder, or
    one with a regular ``manifest.json`` that is this exporter's (its format, or only a manifest's keys) may go."""
    from fwconvert.checkpoint.writer import not_an_earlier_output

    keys = set(Manifest.__dataclass_fields__) | {"feeds"}
    return not_an_earlier_output(out, MANIFEST_NAME, lambda m: m.get("format") == MANIFEST_FORMAT or set(m) <= keys,
                                 kind="fwconvert export")


def _estimate_bytes(model_or_path, ck, dtype: str) -> int:
    """Disk the export needs, from the checkpoint's headers (nothing loaded) or the model's parameters: every
    weight in the graph's dtype (a tied unembedding twice: the graph stores its transpose too, weight_layout.py),
    the tokenizer files and 1 MiB for the graph and manifest (as conversion)."""
    item = 2 if dtype == "fp16" else 4
    if isinstance(model_or_path, DecoderLM):
        cfg = model_or_path.config
        numel, extra = sum(p.numel() for p in model_or_path.parameters()), 0
    else:
        cfg = ck.config
        numel = sum(math.prod(shape) for shape, _ in ck.specs.values())
        extra = sum(os.path.getsize(p) for p in ck.tokenizer_files)
    if cfg.tie_word_embeddings:
        numel += cfg.vocab_size * cfg.hidden_size
    return numel * item + extra + (1 << 20)


def _no_space(e: BaseException, writing: str, staging: str, estimate: int):
    """ENOSPC/EDQUOT while writing into ``staging`` as a ResourceError naming the file (onnx.save and
    json.dump give no file name), the bytes still needed and the bytes free; None for anything else."""
    if not isinstance(e, OSError) or e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    written = 0
    for root, _, names in os.walk(staging):
        written += sum(os.lstat(os.path.join(root, n)).st_size for n in names)
    free = shutil.disk_usage(os.path.dirname(staging)).free
    path = e.filename2 or e.filename or writing  # copyfile: filename2 is the destination
    return ResourceError(f"{path}: no space left on device ({max(estimate - written, 0)} more bytes needed, "
                         f"{free} bytes free)")


def _load(model_or_path, ck, window: Optional[int], attention: Optional[str]):
    """(fp32 DecoderLM, opened checkpoint or None, source string or None). A given DecoderLM is copied
    when it must change (dtype or window), so the caller's model is never modified."""
    if isinstance(model_or_path, DecoderLM):
        model = model_or_path
        if {p.dtype for p in model.parameters()} != {torch.float32}:
            model = copy.deepcopy(model).float()
        return model, None, None
    import fwconvert

    model = fwconvert.load_checkpoint(ck, dtype=torch.float32, window=window if attention == "window" else None)
    return model, ck, os.path.abspath(str(model_or_path))


def _resolve_attention(model: DecoderLM, attention: Optional[str], window: Optional[int]):
    native = model.window if model.window is not None else model.config.sliding_window
    attention = attention or ("window" if (window is not None or native is not None) else "full")
    if attention not in ("full", "window"):
        raise UsageError(f"--attention must be 'full' or 'window', got {attention!r}")
    if attention == "full":
        if window is not None:
            raise UsageError(f"--window {window} needs --attention window")
        if native is not None:
            raise InputError(f"the model attends within a sliding window of {native}; export it with --attention window")
        return "full", None
    window = window if window is not None else native
    if window is None or window < 2:
        raise UsageError(f"--attention window needs --window W >= 2 (got {window})")
    return "window", int(window)


def _resolve_sinks(model: DecoderLM, source_path: Optional[str], attention: str, sinks: Optional[int]) -> int:
    """The attention sinks of the export (``export_onnx``'s doc)."""
    if sinks is not None:
        return sinks
    if source_path is None or model.sinks:  # a given model as it is
        return model.sinks
    return DEFAULT_SINKS if attention == "window" and model.config.sliding_window is None else 0


def _chunk_size(model: DecoderLM, chunk_size: Optional[int]) -> tuple:
    from .wrapper import aligned_chunk_size

    fixed = aligned_chunk_size(model)
    longest = getattr(model.config, "max_position_embeddings", None)
    if chunk_size is not None and longest is not None and chunk_size > longest:
        raise UsageError(f"--chunk-size {chunk_size} is longer than the model's max_position_embeddings {longest}")
    if fixed is not None:
        if chunk_size is not None and chunk_size != fixed:
            raise UsageError(f"--chunk-size {chunk_size}: this model's in-place TTT chunk size is {fixed}; "
                             f"chunks must hold exactly {fixed} tokens")
        return fixed, True
    chunk_size = (512 if longest is None else min(512, longest)) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise UsageError(f"--chunk-size must be >= 1, got {chunk_size}")
    return chunk_size, False


def _copy_tokenizer(ck, staging: str) -> tuple:
    """(copied tokenizer file names, eos id): the files beside the checkpoint, or for a GGUF source its
    embedded vocabulary written out as tokenizer.json (so the export needs nothing else)."""
    names = []
    for f in (getattr(ck, "tokenizer_files", None) or []):
        name = os.path.basename(f)
        shutil.copyfile(f, os.path.join(staging, name))
        names.append(name)
    if names or ck is None or getattr(ck, "kind", None) != "gguf":
        return names, None
    from fwconvert.tokenizer import load_tokenizer

    tok = load_tokenizer(ck.path)
    backend = getattr(tok, "_tok", None)  # transformers tokenizer built from the GGUF vocabulary
    if backend is None or not hasattr(backend, "save_pretrained"):
        return names, tok.eos_token_id
    before = set(os.listdir(staging))
    backend.save_pretrained(staging)
    return sorted(set(os.listdir(staging)) - before), tok.eos_token_id


def _install(staging: str, out: str) -> None:
    old = None
    if os.path.lexists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}{OLD_TAG}", dir=os.path.dirname(out))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_onnx(model_or_path: Union[str, os.PathLike, DecoderLM], out: str, *, chunk_size: Optional[int] = None,
                attention: Optional[str] = None, window: Optional[int] = None, dtype: str = "fp32",
                force: bool = False, external_data: Optional[bool] = None, sinks: Optional[int] = None,
                log: Optional[Callable[[str], None]] = None) -> str:
    """Export ``model_or_path`` (a checkpoint path or a DecoderLM) to the folder ``out``; returns ``out``.
    ``log``: called with a line as each stage starts (the CLI prints them on stderr).
    ``sinks`` (window exports only): the document's first ``sinks`` tokens stay attendable beyond the window
    (attention sinks), in a fixed-size state of their own. Default: a given DecoderLM's own; for a checkpoint path,
    ``DEFAULT_SINKS`` when the window is not the model's own sliding window (a pretrained model breaks once a
    document's first tokens leave a window it was not trained with), else 0 (e.g. Mistral's own window)."""
    if dtype not in ("fp32", "fp16"):
        raise UsageError(f"--dtype must be fp32 or fp16, got {dtype!r}")
    if sinks is not None and (isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0):
        raise UsageError(f"--sink-tokens must be an integer >= 0, got {sinks!r}")
    source_path = None if isinstance(model_or_path, DecoderLM) else os.path.abspath(str(model_or_path))
    out = _prepare_out(out, force, source_path)
    from fwconvert.checkpoint.writer import leftovers

    for p in leftovers(out, tags=(STAGING_TAG, OLD_TAG)):  # not deleted: another export to this folder may be running
        (log or logger.warning)(f"Warning: leftover from an earlier export to {out}: {p} (not reused; delete it "
                                "when no other export to this folder is running)")
    ck = None
    if source_path is not None:  # opened once (a GGUF's vocabulary takes seconds to parse)
        from fwconvert.checkpoint import open_checkpoint

        ck = open_checkpoint(source_path)
    estimate = _estimate_bytes(model_or_path, ck, dtype)
    from fwconvert.checkpoint.writer import check_disk

    check_disk(os.path.dirname(out), estimate, out)  # before anything is loaded, traced or written
    model, ck, source = _load(model_or_path, ck, window, attention or ("window" if window is not None else None))
    attention, window = _resolve_attention(model, attention, window)
    sinks = _resolve_sinks(model, source_path, attention, sinks)
    if sinks and attention != "window":
        raise UsageError(f"--sink-tokens {sinks} needs --attention window (a full-attention export keeps every token)")
    if model.window != window or model.sinks != sinks:  # never modify the caller's model
        model = copy.deepcopy(model)
        model.window, model.sinks = window, sinks
    chunk, fixed = _chunk_size(model, chunk_size)
    model.eval()
    check_cast(model, dtype)  # an fp16 overflow is named here, before anything is traced or written
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}{STAGING_TAG}", dir=os.path.dirname(out))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    writing = staging  # the file being written, for a no-space error
    log = log or (lambda m: None)
    try:
        log(f"tracing the chunk step ({dtype}, {attention} attention, chunk {chunk}) and fusing it for onnxruntime")
        prog, layout = export_program(model, attention == "window", dtype, opset=OPSET, ir_version=IR_VERSION)
        log("saving the graph")
        n_bytes = sum(v.const_value.nbytes for v in prog.model.graph.initializers.values() if v.const_value is not None)
        use_ext = n_bytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
        graph_path = writing = os.path.join(staging, GRAPH_NAME)
        prog.save(graph_path, external_data=use_ext)
        writing = os.path.join(staging, INITIAL_STATE_NAME)  # when some state does not start at zero
        manifest = build_manifest(model, layout, staging, dtype=dtype, attention=attention, window=window,
                                  chunk=chunk, fixed=fixed, opset=prog.model.opset_imports[""], ir_version=IR_VERSION)
        manifest.external_data = GRAPH_NAME + ".data" if os.path.isfile(graph_path + ".data") else None
        writing = staging  # copyfile names its destination itself
        manifest.tokenizer_files, eos = _copy_tokenizer(ck, staging)
        manifest.eos_token_id = eos if eos is not None else getattr(model.config, "raw", {}).get("eos_token_id")
        manifest.source = source
        manifest.source_fingerprint = ck.fingerprint() if ck is not None else None
        manifest.fast_weights = fast_weights_to_dict(model.fast_weights)
        manifest.versions["ort_contrib_ops"] = getattr(prog, "fusions", {})
        manifest.key_dim_order = prog.key_dim_order
        check_graph(graph_path, manifest)
        log("checking the graph against torch on one chunk")
        tol = TOLERANCES["ort_fp32_vs_torch_fp32" if dtype == "fp32" else "export_smoke_fp16"]
        smoke_check(model, graph_path, manifest, staging, tol)
        writing = os.path.join(staging, MANIFEST_NAME)
        with open(writing, "w") as f:  # written last: a folder without it is partial
            json.dump(manifest.to_dict(), f, indent=1)
        _install(staging, out)
    except BaseException as e:
        err = _no_space(e, writing, staging, estimate)  # measured before the staging folder is removed
        shutil.rmtree(staging, ignore_errors=True)
        if err is not None:
            raise err from e
        raise
    return out


__all__ = ["export_onnx", "OPSET", "IR_VERSION"]
