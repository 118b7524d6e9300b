"""The calibration loop: meta-learning the fast-weight parameters through the fast-weight updates.

The model's one-shot forward is the parallel form of its fast weights, and it is differentiable, so
the outer next-token loss sees the inner updates. AdamW on fp32 master weights (bf16 autocast on
CUDA), linear warmup then cosine decay, gradient clipping that refuses non-finite gradients, a
non-finite budget (``skip_nonfinite``), checkpoints every ``save_every`` steps, exact resume.
"""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import NumericError, ResourceError, UsageError
from . import checkpoint as ckpt
from . import ddp
from .data import WindowSampler


@dataclass(frozen=True)
class CalibrationSettings:
    steps: int = 200
    seq_len: int = 2048
    batch_size: int = 1  # per process
    lr: float = 1e-3
    fast_lr: Optional[float] = None  # peak lr of the new fast-weight parameters (default: lr)
    train: str = "fast"
    seed: int = 0
    save_every: int = 50
    skip_nonfinite: int = 0
    warmup: Optional[int] = None  # default: 5% of the steps (at least 1)
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    weight_decay: float = 0.0
    loss_block: int = 1024  # CE computed in blocks of this many positions (fp32, recomputed in backward)
    tf32: bool = True  # fp32 matmuls on CUDA may use TF32 (the fp32 fast-weight products, as the fp16 exports run them)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "save_every", "loss_block"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2 (a window of one token predicts nothing), got {self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be a positive number, got {self.lr}")
        if self.fast_lr is not None and not (self.fast_lr > 0 and math.isfinite(self.fast_lr)):
            raise UsageError(f"--fast-lr must be a positive number, got {self.fast_lr}")
        if self.skip_nonfinite < 0:
            raise UsageError("--skip-nonfinite must be >= 0")
        if self.warmup is not None and self.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {self.warmup}")

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 20)


def lr_factor(step: int, s: CalibrationSettings) -> float:
    """Multiplier of the base lr for update number ``step`` (0-based): linear warmup, cosine to min_lr_ratio."""
    w = s.warmup_steps
    if step < w:
        return (step + 1) / w
    progress = min(1.0, (step - w) / max(1, s.steps - w))
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _block_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")


def sequence_loss(model: torch.nn.Module, ids: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Mean next-token cross-entropy over ``ids [B, T]`` (T-1 predictions per row).

    The CE runs in fp32 over blocks of ``block`` positions, each recomputed in the backward pass, so
    the fp32 copy of the logits never exists for the whole sequence at once."""
    logits = model(ids)  # [B, T, V]
    pred, tgt = logits[:, :-1], ids[:, 1:]
    total = logits.new_zeros((), dtype=torch.float32)
    for a in range(0, pred.shape[1], block):
        p, t = pred[:, a:a + block], tgt[:, a:a + block]
        total = total + (checkpoint(_block_ce, p, t, use_reentrant=False) if p.requires_grad else _block_ce(p, t))
    return total / tgt.numel()


def parse_fault() -> Dict[str, int]:
    """Fault hooks for tests, honoured only with FWCONVERT_TESTING=1: nan_at_step:K, kill_at_step:K,
    oom_at_step:K (comma-separated; K counts updates from 1)."""
    if os.environ.get("FWCONVERT_TESTING") != "1":
        return {}
    out = {}
    for item in filter(None, os.environ.get("FWCONVERT_FAULT", "").split(",")):
        kind, _, k = item.partition(":")
        if kind in ("nan_at_step", "kill_at_step", "oom_at_step") and k.isdigit():
            out[kind] = int(k)
    return out


def seed_everything(seed: int, device: torch.device, tf32: bool) -> dict:
    """Seed python/numpy/torch and set deterministic flags; returns the flags for the manifest. ``tf32``: let fp32
    matmuls on CUDA use TF32 (fp32 accumulation of products rounded to a 10-bit mantissa). The bf16 trunk does not
    change; the fp32 parts do: in-place TTT's fast-weight products and FWL's head. The fp16 exports multiply those
    parts on 10-bit mantissa inputs too (FWL's head in TF32, exporters/runtime/session.py::tf32_policy; in-place
    TTT's products in fp16, inplace_ttt._aligned_step), so ``CalibrationSettings.tf32`` is on by default;
    ``calibrate --no-tf32`` keeps them full fp32 (1.43x slower for in-place TTT at the 1B shape, docs/benchmarks.md,
    session 12). Either way a run is deterministic for its setting, which the manifest records (a run with the other
    one is another run)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    flags = {"cudnn_deterministic": True, "cudnn_benchmark": False}
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if device.type == "cuda":
        flags["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    return flags


class _DeferredSigterm:
    """Within the block, SIGTERM only sets ``received``; ``deliver()`` runs the previous handler."""

    def __init__(self):
        self.received, self._old = False, None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def _on_term(self, signum, frame):
        self.received = True

    def deliver(self):
        old, self._old = self._old, None
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)
        if callable(old):
            old(signal.SIGTERM, None)
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


class Calibrator:
    """One calibration run over a loaded model; see ``run``."""

    def __init__(self, model, trainable: Dict[str, torch.nn.Parameter], sampler: WindowSampler,
                 settings: CalibrationSettings, work_dir: str, run_id: str, device: torch.device,
                 dist: ddp.Dist = ddp.Dist(), log: Callable[[str], None] = lambda m: None,
                 fast_names: Optional[set] = None, identity: Optional[dict] = None):
        """``fast_names``: the trainable names that are new fast-weight parameters (``settings.fast_lr`` applies
        to them; every other trainable parameter gets ``settings.lr``). ``identity``: what ``run_id`` was made
        from (``run.run_identity``), recorded with each checkpoint so that a refused --resume can say what differs."""
        settings.validate()
        self.model, self.trainable, self.sampler, self.s = model, trainable, sampler, settings
        self.work_dir, self.run_id, self.device, self.dist, self.log = work_dir, run_id, device, dist, log
        self.identity = identity
        self.params = list(trainable.values())
        fast = set(fast_names or ())
        groups = [{"params": [p for n, p in trainable.items() if n not in fast], "lr": settings.lr},
                  {"params": [p for n, p in trainable.items() if n in fast],
                   "lr": settings.fast_lr if settings.fast_lr is not None else settings.lr}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95), eps=1e-8,
                                     weight_decay=settings.weight_decay, foreach=False)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: lr_factor(i, settings))
        self.step, self.skipped, self.losses, self.tokens, self.seconds = 0, [], [], 0, 0.0
        self.faults = parse_fault()
        self.wrapped = ddp.wrap(dist, model)

    def unwrap(self) -> None:
        """Drop the DDP wrapper (and with it the process group it holds) before ``ddp.teardown``."""
        self.wrapped = self.model

    # -- checkpoints ------------------------------------------------------------------------------
    def _payload(self) -> dict:
        return {"step": self.step, "cursor": self.step * self.s.batch_size * self.dist.world,
                "params": {n: p.detach().cpu().clone() for n, p in self.trainable.items()},
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "rng": ckpt.rng_state(), "losses": list(self.losses), "skipped": list(self.skipped),
                "tokens": self.tokens, "seconds": self.seconds, "settings": asdict(self.s)}

    def resume(self) -> bool:
        """Restore the newest complete checkpoint; False when there is none."""
        state = ckpt.load_latest(self.work_dir, self.run_id, self.log, identity=self.identity)
        if state is None:
            return False
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(state["params"][n].to(p.device, p.dtype))
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.step, self.losses, self.skipped = int(state["step"]), list(state["losses"]), list(state["skipped"])
        self.tokens, self.seconds = int(state["tokens"]), float(state.get("seconds", 0.0))
        self.log(f"resumed from step {self.step} ({self.work_dir})")
        return True

    def _save(self) -> None:
        bad = [n for n, p in self.trainable.items() if not bool(torch.isfinite(p).all())]
        if bad:
            raise NumericError(f"non-finite weights after step {self.step} in {', '.join(bad[:5])}; "
                               f"not checkpointed; last good checkpoint kept in {self.work_dir}")
        if self.dist.main:
            ckpt.save_checkpoint(self.work_dir, self.step, self._payload(), self.run_id, self.identity)
        ddp.barrier(self.dist)

    # -- one update -------------------------------------------------------------------------------
    def _batch(self) -> torch.Tensor:
        first = (self.step * self.dist.world + self.dist.rank) * self.s.batch_size
        return torch.from_numpy(self.sampler.batch(first, self.s.batch_size)).to(self.device)

    def _update(self) -> float:
        """Forward, backward, clip, step; returns the global mean loss (NaN when skipped)."""
        try:
            return self._update_inner()
        except torch.cuda.OutOfMemoryError:
            self.opt.zero_grad(set_to_none=True)
            where = str(self.device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                where += f", {torch.cuda.get_device_properties(self.device).total_memory / 2**30:.0f} GiB"
            b = self.s.batch_size
            hint = f"try --batch-size {b // 2}" if b > 1 else "try a shorter --seq-len"
            raise ResourceError(f"GPU out of memory at step {self.step + 1}, batch {b} x {self.s.seq_len} on {where}; "
                                f"{hint} (checkpoints kept in {self.work_dir})") from None

    def _update_inner(self) -> float:
        if self.faults.get("oom_at_step") == self.step + 1:
            raise torch.cuda.OutOfMemoryError("injected by FWCONVERT_FAULT")
        ids = self._batch()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = sequence_loss(self.wrapped, ids, self.s.loss_block)
        if self.faults.get("nan_at_step") == self.step + 1:
            loss = loss * float("nan")
        ok = ddp.all_true(self.dist, bool(torch.isfinite(loss)), self.device)
        if ok:
            loss.backward()
            try:
                torch.nn.utils.clip_grad_norm_(self.params, self.s.clip, error_if_nonfinite=True)
            except RuntimeError:
                ok = False
        self.tokens += ids.numel() * self.dist.world
        if not ok:
            self._nonfinite()
            return float("nan")
        self.opt.step()
        return float(ddp.all_mean(self.dist, loss.detach()))

    def _nonfinite(self) -> None:
        step = self.step + 1
        self.skipped.append(step)
        last = ckpt.list_checkpoints(self.work_dir)
        where = f"last good checkpoint: {os.path.join(self.work_dir, last[-1])}" if last else "no checkpoint written yet"
        if len(self.skipped) > self.s.skip_nonfinite:
            raise NumericError(f"non-finite loss or gradient at step {step} (skipped {len(self.skipped) - 1} of "
                               f"--skip-nonfinite {self.s.skip_nonfinite}); stopped; {where}")
        self.log(f"warning: non-finite loss or gradient at step {step}: update skipped "
                 f"({len(self.skipped)}/{self.s.skip_nonfinite})")
        self.opt.zero_grad(set_to_none=True)

    # -- the run ----------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> dict:
        """Train from the current step to ``settings.steps``; returns the calibration record.

        SIGTERM is deferred to the end of the update in flight: a checkpoint of that step is written,
        then the previous handler runs (the CLI's: exit 143)."""
        from tqdm import tqdm

        bar = tqdm(total=self.s.steps, initial=self.step, file=sys.stderr, disable=not (progress and self.dist.main),
                   desc="calibrate", dynamic_ncols=True, mininterval=1.0)
        start, start_tokens = time.perf_counter(), self.tokens
        last = start
        self.model.train()
        with _DeferredSigterm() as term:
            try:
                while self.step < self.s.steps:
                    loss = self._update()
                    with warnings.catch_warnings():  # a skipped update still uses up its schedule slot
                        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                        self.sched.step()
                    self.step += 1
                    now = time.perf_counter()
                    self.seconds, last = self.seconds + (now - last), now  # training time over every (resumed) run
                    self.losses.append(loss)
                    rate = (self.tokens - start_tokens) / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
                    bar.update(1)
                    stop = not ddp.all_true(self.dist, not term.received, self.device) if self.dist.active else term.received
                    if stop or self.step % self.s.save_every == 0 or self.step == self.s.steps:
                        self._save()
                    if stop:
                        self.log(f"terminated: checkpoint of step {self.step} written in {self.work_dir}; --resume continues")
                        term.deliver()
                    if self.faults.get("kill_at_step") == self.step:  # after that step's checkpoint, if any
                        sys.stdout.flush(), sys.stderr.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
            finally:
                bar.close()
                self.model.eval()
        return {"steps": self.step, "losses": self.losses, "skipped_steps": self.skipped,
                "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_second": self.tokens / self.seconds if self.seconds > 0 else float("nan"),
                "trainable": sorted(self.trainable), "trainable_count": sum(p.numel() for p in self.params),
                "settings": asdict(self.s), "world_size": self.dist.world}
