"""``calibrate`` end to end: preflight (checkpoint headers, output path, all data) before any device
allocation, then load, train, and write a normal converted model folder whose manifest records the
calibration (seed, flags, losses, trained parameters, the held-out split).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from typing import Callable, Sequence

import torch

from .. import __version__
from ..errors import InputError, OutputError, UsageError
from . import checkpoint as ckpt
from . import ddp
from .data import DEFAULT_TEXT_EXTS, WindowSampler, load_documents, split_documents
from .loop import CalibrationSettings, Calibrator, seed_everything
from .params import base_parameter_names, baseline_layers, count_new_parameters, select_trainable

SOURCE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def check_output_path(out: str, model_path: str, force: bool) -> None:
    """Refuse an existing output without --force, or an output overlapping the input."""
    o, m = os.path.realpath(out), os.path.realpath(model_path)
    if o == m or o.startswith(m.rstrip(os.sep) + os.sep) or m.startswith(o.rstrip(os.sep) + os.sep):
        raise OutputError(f"{out}: output overlaps input {model_path}")
    if os.path.lexists(out) and not force:
        raise OutputError(f"{out}: already exists (use --force to replace it)")
    if force and os.path.isdir(out) and not os.path.islink(out):
        from ..checkpoint.writer import not_an_earlier_output

        why = not_an_earlier_output(out)
        if why:
            raise OutputError(f"{out}: {why}; choose another output folder or remove it yourself")


def check_device(device: str) -> torch.device:
    """``--device`` as a torch device: a usage error (exit 2) unless it is cpu, cuda or cuda:N; an input error
    (exit 3) when it names a CUDA device this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: not a device this command runs on; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: no such CUDA device (this machine has {torch.cuda.device_count()})")
    return dev


def run_identity(fingerprint: str, settings: CalibrationSettings, doc_keys: Sequence[str], extra: dict) -> dict:
    """What a resumed run must share with the interrupted one: the input, the training documents, the version, and
    the settings that can change the result. ``save_every`` changes no number, nor does ``tf32`` off CUDA (when
    ``extra["device_type"]`` says the run is not on CUDA; an unknown device type keeps it)."""
    s = dataclasses.asdict(settings)
    s.pop("save_every")
    if extra.get("device_type", "cuda") != "cuda":
        s.pop("tf32")
    docs = {"documents": len(doc_keys), "keys_sha256": hashlib.sha256("\n".join(doc_keys).encode()).hexdigest()}
    ident = {"input": fingerprint, "settings": s, "docs": docs, "extra": extra, "version": __version__}
    return json.loads(json.dumps(ident, sort_keys=True))  # JSON-normal, as read back from a checkpoint marker


def run_id(fingerprint: str, settings: CalibrationSettings, doc_keys: Sequence[str], extra: dict) -> str:
    blob = json.dumps(run_identity(fingerprint, settings, doc_keys, extra), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_for_calibration(ck, baseline: bool, device: torch.device):
    """fp32 master-weight model from an opened checkpoint (fast weights dropped for the baseline)."""
    from ..modeling import build_model, expected_shapes, load_tensors

    ck.check_tensors(expected_shapes(build_model(ck.config, ck.fast_weights)))
    model = build_model(ck.config, None if baseline else ck.fast_weights)
    return load_tensors(model, ck.iter_tensors(), device=device, dtype=torch.float32)


def cast_to_source_dtypes(model, specs: dict) -> None:
    """Give each parameter the dtype its checkpoint tensor had (base tensors round-trip bit-exactly)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            dt = SOURCE_DTYPES.get(specs.get(name, (None, "F32"))[1])
            if dt is not None and p.dtype != dt:
                p.data = p.data.to(dt)


def _doc_list(docs):
    return [{"name": d.name, "key": d.key, "tokens": int(len(d.ids))} for d in docs]


def _doc_summary(docs) -> dict:
    """The training documents in a few bytes (the manifest stays small for thousands of files)."""
    keys = hashlib.sha256("\n".join(d.key for d in docs).encode()).hexdigest()
    return {"documents": len(docs), "tokens": int(sum(len(d.ids) for d in docs)), "keys_sha256": keys}


def _prepare_data(model_path, ck, data, exts, settings, heldout):
    def tokenizer():
        from ..tokenizer import load_tokenizer

        return load_tokenizer(model_path)

    if settings.seq_len > ck.config.max_position_embeddings:
        raise UsageError(f"--seq-len {settings.seq_len} is longer than the model's max_position_embeddings "
                         f"{ck.config.max_position_embeddings}")
    docs = load_documents(data, ck.config.vocab_size, tokenizer, exts=exts)
    train, held = split_documents(docs, heldout, settings.seed)
    return train, held, WindowSampler(train, settings.seq_len, settings.seed)


TTT_FAST_LR = 1e-4  # in-place TTT's own parameters: 1e-3 diverged on SmolLM2 (docs/results.md, session 1)


def default_fast_lr(settings: CalibrationSettings, fast_weights, log: Callable[[str], None]) -> CalibrationSettings:
    """Settings with the fast-weight parameters' lr resolved: --fast-lr when given, else for in-place TTT
    min(--lr, 1e-4), else --lr."""
    if settings.fast_lr is not None or getattr(fast_weights, "kind", None) != "inplace_ttt" or settings.lr <= TTT_FAST_LR:
        return settings
    rest = "" if settings.train == "fast" else f", the rest at {settings.lr:g}"  # --train fast trains nothing else
    log(f"in-place TTT: its own parameters train at lr {TTT_FAST_LR:g} (--fast-lr to change){rest}")
    return dataclasses.replace(settings, fast_lr=TTT_FAST_LR)


def _warn_warmup(settings: CalibrationSettings, log: Callable[[str], None]) -> None:
    """A --warmup of at least --steps: the learning rate rises for the whole run and never decays."""
    w, n = settings.warmup, settings.steps
    if w is not None and w >= n:
        log(f"warning: --warmup {w} is not below --steps {n}: the learning rate warms up for the whole run (reaching "
            f"{100 * min(1.0, n / w):.0f}% of its peak at the last update) and never decays; use a --warmup below "
            "--steps")


def _check_ttt_window(fast_weights, seq_len: int) -> None:
    """In-place TTT updates its fast weights once per chunk, and a chunk's update serves the chunks after it. A window
    of L tokens is trained on the predictions made at positions 0 .. L - 2, so unless L >= C + 2 they all lie in the
    first chunk and the TTT parameters get no gradient (the run would train nothing, or with ``--train fast`` find
    nothing to differentiate)."""
    c = int(getattr(fast_weights, "chunk_size", 0) or 0)
    if getattr(fast_weights, "kind", None) == "inplace_ttt" and seq_len < c + 2:
        raise UsageError(f"--seq-len {seq_len}: in-place TTT updates its fast weights once per chunk of {c} tokens, "
                         f"for the chunks after it, and a window of {seq_len} tokens makes its predictions at "
                         f"positions 0..{seq_len - 2}, all in the first chunk, so they give the fast weights nothing "
                         f"to learn from; use --seq-len of at least {c + 2} (e.g. {max(8192, 4 * c)})")


def calibrate(model_path: str, data: Sequence[str], out: str, settings: CalibrationSettings, *,
              device: str = "cpu", resume: bool = False, baseline: bool = False, force: bool = False,
              heldout: float = 0.1, exts: Sequence[str] = DEFAULT_TEXT_EXTS,
              log: Callable[[str], None] = lambda m: None, progress: bool = True) -> dict:
    """Calibrate ``model_path`` on ``data`` and write the result to ``out``; returns the record."""
    from ..checkpoint import open_checkpoint

    settings.validate()
    check_device(device)
    check_output_path(out, model_path, force)
    ck = open_checkpoint(model_path)
    if not baseline:
        settings = default_fast_lr(settings, ck.fast_weights, log)
        _check_ttt_window(ck.fast_weights, settings.seq_len)
    _warn_warmup(settings, log)
    train, held, sampler = _prepare_data(model_path, ck, data, exts, settings, heldout)
    if not held:
        why = f"--heldout {heldout:g}" if heldout <= 0 else f"only {len(train)} document"
        log(f"warning: held out 0 documents ({why}): `fwconvert eval` of the result will evaluate all of --data, "
            "the training documents included; give two or more documents and --heldout > 0 for a held-out split")
    dist = ddp.setup(device)
    calib = None
    try:
        dev = ddp.device_for(dist, device)
        flags = seed_everything(settings.seed, dev, settings.tf32)
        model = load_for_calibration(ck, baseline, dev)
        layers = None
        if baseline or settings.train == "fast+baseline":
            layers = baseline_layers(ck.config, ck.fast_weights, count_new_parameters(ck.config, ck.fast_weights))
        base_names = base_parameter_names(ck.config)
        trainable = select_trainable(model, settings.train, base_names, layers)
        extra = {"baseline": baseline, "world_size": dist.world, "device_type": dev.type}
        identity = run_identity(ck.fingerprint(), settings, [d.key for d in train], extra)
        rid = run_id(ck.fingerprint(), settings, [d.key for d in train], extra)
        work = ckpt.work_dir_for(out)
        calib = Calibrator(model, trainable, sampler, settings, work, rid, dev, dist, log,
                           fast_names={n for n in trainable if n not in base_names}, identity=identity)
        if dist.main:
            ckpt.clean_partials(work)
        if not (resume and calib.resume()):
            if resume:
                log(f"no checkpoint to resume in {work}; starting from step 0")
            elif dist.main and ckpt.list_checkpoints(work):
                shutil.rmtree(work)
        try:
            record = calib.run(progress=progress)
        except BaseException as e:  # Ctrl-C or SIGTERM (the CLI's Terminated): say what is kept and how to go on
            kept = ckpt.list_checkpoints(work) if not isinstance(e, Exception) and dist.main else []
            if kept:
                e.interrupt_note = (f"the checkpoint of step {int(kept[-1][5:])} is kept in {work}; run the same "
                                    f"command with --resume to continue from it")
            raise
        record.update(seed=settings.seed, flags=flags, baseline=baseline, baseline_layers=layers,
                      source=os.path.abspath(model_path), source_fingerprint=ck.fingerprint(),
                      data={"train": _doc_summary(train), "heldout": _doc_list(held)}, run_id=rid,
                      losses=[round(x, 6) if math.isfinite(x) else None for x in record["losses"]])
        if dist.main:
            model = model.cpu()
            cast_to_source_dtypes(model, ck.specs)
            _save(model, out, ck, force, record)
            shutil.rmtree(work, ignore_errors=True)
        ddp.barrier(dist)
        return record
    finally:
        if calib is not None:
            calib.unwrap()
        ddp.teardown(dist)


def _save(model, out, ck, force, record):
    from ..convert import save_model

    save_model(model, out, source=ck, force=force, extra_manifest={"calibration": record})
