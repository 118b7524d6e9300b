"""In-place test-time training (Feng et al., "In-Place Test-Time Training", ICLR 2026): W_down as fast weights.

``InPlaceTTTMLP`` replaces a layer's SwiGLU MLP. Chunk i is computed with W(i) = W0 + eta * sum_{j<i}
V_hat_j^T Z_j, then chunk i updates it; V_hat = chunk-local depthwise Conv1D(T) @ ttt_proj.weight.
It owns the parallel training form, the streaming state, the aligned (export) step and layer specs.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import InPlaceTTTConfig, ModelConfig
from ..errors import InputError, UsageError
from .base import FastWeightModule, State, StepContext

TARGETS = ("hidden_states", "input_embed")
_UINT = re.compile(r"[0-9]+")


# -- configuration helpers ---------------------------------------------------------------------
def _spec_int(text: str, spec: str) -> int:
    text = text.strip()
    if not _UINT.fullmatch(text):
        raise UsageError(f"layer spec {spec!r}: {text!r} is not a non-negative integer")
    return int(text)


def parse_layer_spec(spec: str, num_layers: int) -> Tuple[int, ...]:
    """Layer indices from ``every:K`` (0, K, 2K, ...), ``last:K``, ``all`` or a list like ``0,6,12``."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("layer spec is empty (use e.g. every:6, 0,6,12, all or last:4)")
    s = spec.strip().lower()
    if s == "all":
        return tuple(range(num_layers))
    for prefix in ("every:", "last:"):
        if s.startswith(prefix):
            k = _spec_int(s[len(prefix):], spec)
            if k < 1:
                what = "the step K of every:K" if prefix == "every:" else "the count K of last:K"
                raise UsageError(f"layer spec {spec!r}: {what} must be at least 1")
            if prefix == "last:" and k > num_layers:
                raise UsageError(f"layer spec {spec!r}: {k} is out of range for a model with {num_layers} layers")
            return tuple(range(0, num_layers, k)) if prefix == "every:" else tuple(range(num_layers - k, num_layers))
    layers = []
    for part in s.split(","):
        if not part.strip():
            raise UsageError(f"layer spec {spec!r}: empty entry (use e.g. 0,6,12)")
        i = _spec_int(part, spec)
        if i >= num_layers:
            raise UsageError(f"layer spec {spec!r}: layer {i} is out of range (the model has layers 0..{num_layers - 1})")
        if i in layers:
            raise UsageError(f"layer spec {spec!r}: layer {i} is listed twice")
        layers.append(i)
    return tuple(sorted(layers))


def check_ttt_config(cfg: ModelConfig, fw: InPlaceTTTConfig) -> None:
    """Raise InputError unless ``fw`` is usable on a model ``cfg`` (before anything is built or written)."""
    layers = list(fw.layers)
    if not layers:
        raise InputError("in-place TTT: no layers chosen")
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.num_hidden_layers]
    if bad:
        raise InputError(f"in-place TTT: layers {bad} are out of range (the model has layers 0..{cfg.num_hidden_layers - 1})")
    if len(set(layers)) != len(layers):
        raise InputError(f"in-place TTT: layers {layers} contain duplicates")
    k = fw.conv_kernel
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise InputError(f"in-place TTT: conv_kernel must be a positive odd integer, got {k!r}")
    c = fw.chunk_size
    if isinstance(c, bool) or not isinstance(c, int) or not k <= c <= cfg.max_position_embeddings:
        raise InputError(f"in-place TTT: chunk size {c!r} must be an integer in [{k}, {cfg.max_position_embeddings}] "
                         f"(at least the conv kernel, at most the context length)")
    if isinstance(fw.lr, bool) or not isinstance(fw.lr, (int, float)) or not math.isfinite(fw.lr):
        raise InputError(f"in-place TTT: lr must be a finite number, got {fw.lr!r}")
    if fw.target not in TARGETS:
        raise InputError(f"in-place TTT: target {fw.target!r} is not one of {', '.join(TARGETS)}")


def state_floats_per_sequence(cfg: ModelConfig, fw: InPlaceTTTConfig, include_pending: bool = False) -> int:
    """fp32 floats of state per sequence: the delta (D x d_ff per TTT layer), optionally plus the most
    pending tokens an incomplete chunk can hold (C - 1 MLP inputs, and as many targets for input_embed)."""
    per_layer = cfg.hidden_size * cfg.intermediate_size
    if include_pending:
        per_layer += (fw.chunk_size - 1) * cfg.hidden_size * (2 if fw.target == "input_embed" else 1)
    return len(fw.layers) * per_layer


# -- the parallel form: exclusive prefix sum over chunk updates ----------------------------------
class _ChunkPrefix(torch.autograd.Function):
    """o_i = z_i s_i^T with s_0 given and s_{i+1} = s_i + eta v_i^T z_i (i over chunks).

    Only one d x d_ff running matrix is alive at a time; backward recomputes the s_i (forward pass)
    and accumulates their gradient in reverse, so no per-chunk weight is ever stored."""

    @staticmethod
    def forward(ctx, z, v, s0, eta: float):  # z [B,N,C,F], v [B,N,C,D], s0 [B,D,F]
        outs, s = [], s0
        for i in range(z.shape[1]):
            outs.append(z[:, i] @ s.transpose(1, 2))  # [B, C, D]
            s = s + eta * (v[:, i].transpose(1, 2) @ z[:, i])
        ctx.save_for_backward(z, v, s0)
        ctx.eta = eta
        return torch.stack(outs, 1), s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_s):
        z, v, s0 = ctx.saved_tensors
        eta, n = ctx.eta, z.shape[1]
        g_z, s = torch.empty_like(z), s0
        for i in range(n):  # direct term: d o_i / d z_i = s_i
            g_z[:, i] = g_out[:, i] @ s
            s = s + eta * (v[:, i].transpose(1, 2) @ z[:, i])
        g_v, acc = torch.empty_like(v), g_s.clone()  # acc = dL/ds_{i+1} (total)
        for i in reversed(range(n)):
            g_v[:, i] = eta * (z[:, i] @ acc.transpose(1, 2))
            g_z[:, i] += eta * (v[:, i] @ acc)
            acc = acc + g_out[:, i].transpose(1, 2) @ z[:, i]
        return g_z, g_v, acc, None


def chunk_prefix_apply(z: torch.Tensor, v: torch.Tensor, s0: torch.Tensor, eta: float):
    """(o [B,N,C,D], s_N [B,D,F]) for chunked z [B,N,C,F], v [B,N,C,D] and a starting delta s0 [B,D,F]."""
    return _ChunkPrefix.apply(z, v, s0, float(eta))


# -- the module ---------------------------------------------------------------------------------
class InPlaceTTTMLP(FastWeightModule):
    """SwiGLU MLP whose down-projection is a fast weight (state: ``delta`` = W - W0, fp32, and the
    tokens of the incomplete chunk: ``pending_x`` MLP inputs, ``pending_t`` targets for input_embed)."""

    def __init__(self, cfg: ModelConfig, fw: InPlaceTTTConfig):
        super().__init__()
        check_ttt_config(cfg, fw)
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.hidden_size, self.intermediate_size = d, f
        self.chunk_size, self.lr, self.target = fw.chunk_size, float(fw.lr), fw.target
        self.gate_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.mlp_bias)  # weight = W0, the reset state
        self.ttt_conv = nn.Conv1d(d, d, kernel_size=fw.conv_kernel, padding=fw.conv_kernel // 2, groups=d, bias=False)
        self.ttt_proj = nn.Linear(d, d, bias=False)  # used as T_conv @ weight (no transpose), as the official code

    @classmethod
    def from_mlp(cls, mlp: nn.Module, cfg: ModelConfig, fw: InPlaceTTTConfig, generator=None) -> "InPlaceTTTMLP":
        """Wrap an existing GatedMLP (sharing its gate/up/down modules), new tensors at their conversion values."""
        with torch.device("meta"):
            new = cls(cfg, fw)
        new.gate_proj, new.up_proj, new.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        init_conversion_(new, generator)
        return new

    # -- state ----------------------------------------------------------------------------------
    def state_shapes(self, batch_size: int, aligned: bool = False) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        """``aligned=True``: the export path's state (``delta`` only)."""
        d, dt = self.hidden_size, self.state_dtype
        out = {"delta": ((batch_size, d, self.intermediate_size), dt)}
        if not aligned:
            out["pending_x"] = ((batch_size, 0, d), dt)
            if self.target == "input_embed":
                out["pending_t"] = ((batch_size, 0, d), dt)
        return out

    def init_state(self, batch_size: int, device=None, aligned: bool = False) -> State:
        return {k: torch.zeros(s, dtype=dt, device=device) for k, (s, dt) in self.state_shapes(batch_size, aligned).items()}

    @property
    def state_dtype(self) -> torch.dtype:
        """fp32 (fp64 for a float64 model): bf16/fp16 accumulation would swamp small updates."""
        return torch.promote_types(self.down_proj.weight.dtype, torch.float32)

    # -- pieces of the math ---------------------------------------------------------------------
    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.gate_proj(x)) * self.up_proj(x)  # Z [B, T, F]

    def targets(self, t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """V_hat [M, L, D] for M independent chunks t [M, L, D] (each zero-padded at both ends), computed in the
        accumulation dtype (fp32), or in ``dtype`` where given (the fp16 export, ``_aligned_step``)."""
        if dtype is None:
            w, t, p = _acc(self.ttt_conv.weight), _acc(t), _acc(self.ttt_proj.weight)
        else:
            w, t, p = self.ttt_conv.weight.to(dtype), t.to(dtype), self.ttt_proj.weight.to(dtype)
        v = F.conv1d(t.transpose(1, 2), w, padding=w.shape[-1] // 2, groups=w.shape[0]).transpose(1, 2)
        return v @ p

    def _target_input(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.target == "hidden_states":
            return x
        if ctx.embeddings is None or ctx.embeddings.shape[:2] != x.shape[:2]:
            raise InputError("in-place TTT with target input_embed needs ctx.embeddings [B, T, D] for this step")
        return ctx.embeddings

    def _down(self, z: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Z (W0 + delta)^T (+ bias), the fast part in fp32."""
        return self.down_proj(z) + (_acc(z) @ delta.transpose(1, 2)).to(z.dtype)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: State, ctx: StepContext):
        if ctx.aligned:
            return self._aligned_step(x, state, ctx)
        return self._general_step(x, state, ctx)

    def _aligned_step(self, x: torch.Tensor, state: State, ctx: StepContext):
        """One step starting at a chunk boundary with T <= C tokens: apply W0 + delta, update iff T == C.

        Shape-static and branch-free (torch.export); reads and returns only ``delta``.

        In an fp16 model (the fp16 export) all three products are fp16 (with fp32 accumulation in the runtimes'
        GEMMs): the apply Z delta^T, the targets, and the update V^T Z, whose result is rounded to fp16 before it
        is added to the fp32 delta. This loses next to nothing against fp32 products as onnxruntime's CUDA provider
        runs them: those use TF32, which rounds every GEMM input to the same 10-bit mantissa as fp16; the apply's
        product was cast to fp16 anyway, and the update's extra rounding is one fp16 rounding of each chunk's
        update (SmolLM2, 4 chunks: logits' worst relative error 2.75e-3 against 2.33e-3; a calibrated graph on
        CUDA verifies with its delta within 3.08e-3 against 3.06e-3: docs/results.md, session 19). What fp16
        changes is the range: entries below 6e-5 become subnormal (their part of the output, under 1e-6 absolute,
        is far below the fp16 rounding of the output itself) and entries past 65504 would overflow, which no
        working model reaches (the step size scales the targets before the update's product). The fp32 products
        ran as TF32 kernels several times slower than fp16 ones (docs/results.md, sessions 10 and 19)."""
        delta = state["delta"]
        z = self.hidden(x)  # [B, T, F]
        tgt = self._target_input(x, ctx)
        if z.dtype == torch.float16:
            out = self.down_proj(z) + z @ delta.to(z.dtype).transpose(1, 2)
            v, prod = self.targets(tgt, torch.float16), z.dtype
        else:
            out = self._down(z, delta)
            v, prod = self.targets(tgt), delta.dtype  # [B, T, D]: the step is one chunk
        full = ((ctx.position + x.shape[1]) % self.chunk_size == 0).to(prod)  # [B]
        # the step size (0 for a short chunk) scales the targets v [B, T, D] before the product, not the product
        # [B, D, F] after it: F / T times fewer multiplies and bytes (SmolLM2 at T = 512: a third)
        scaled = (self.lr * full)[:, None, None] * v.to(prod)
        update = (scaled.transpose(1, 2) @ z.to(prod)).to(delta.dtype)  # [B, D, F]
        return out, {"delta": delta + update}

    def _general_step(self, x: torch.Tensor, state: State, ctx: StepContext):
        """Any step size: finish the pending chunk, then the parallel form over the rest.

        The slow part down_proj(Z) is computed once over the whole step (so a zero delta gives
        exactly the base model's numbers); only the fast part, in fp32 with autocast off, is split."""
        c, (b, t, d) = self.chunk_size, x.shape
        n = _common_position(ctx.position) % c
        delta = state["delta"]
        empty = x.new_zeros((b, 0, d), dtype=delta.dtype)
        px = state.get("pending_x", empty)
        pt = state.get("pending_t", empty) if self.target == "input_embed" else px
        if px.shape[1] != n or pt.shape[1] != n:
            raise InputError(f"in-place TTT state holds {px.shape[1]} pending tokens but the position says {n} "
                             f"(chunk size {c}); start the document from a fresh state")
        tgt = self._target_input(x, ctx)
        z = self.hidden(x)  # [B, T, F]
        k = min(t, c - n) if n else 0  # tokens that go into the pending chunk
        zp = self.hidden(px.to(x.dtype)) if n and n + k == c else None  # its first n tokens' Z, once per chunk
        with torch.autocast(device_type=x.device.type, enabled=False):
            fast, delta = self._fast_part(_acc(z), tgt, delta, pt, zp, k)
        keep = (n + t) % c  # the tokens of the chunk still incomplete after this step
        new = {"delta": delta, "pending_x": torch.cat((px, x.to(px.dtype)), 1)[:, n + t - keep:]}
        if self.target == "input_embed":
            new["pending_t"] = torch.cat((pt, tgt.to(pt.dtype)), 1)[:, n + t - keep:]
        return self.down_proj(z) + fast.to(z.dtype), new

    def _fast_part(self, za, tgt, delta, pending_t, zp, k: int):
        """Fast output [B, T, D] and the new delta: k tokens finishing a pending chunk (completed iff
        ``zp``, the pending tokens' Z, is given), then the parallel form from a chunk boundary."""
        head = za[:, :k] @ delta.transpose(1, 2)  # the W from before the (pending) chunk
        if k and zp is None:
            return head, delta
        if k:
            zc = torch.cat((_acc(zp), za[:, :k]), 1)  # [B, C, F] the completed chunk
            vc = self.targets(torch.cat((pending_t, tgt[:, :k].to(pending_t.dtype)), 1))
            delta = delta + self.lr * (vc.transpose(1, 2) @ zc)
        o, delta = self._parallel(za[:, k:], tgt[:, k:], delta)
        return torch.cat((head, o), 1), delta

    def _parallel(self, za: torch.Tensor, tgt: torch.Tensor, delta: torch.Tensor):
        """Fast part Z (sum of earlier deltas)^T for za [B, L, F] (accumulation dtype) starting at a chunk
        boundary, and the delta after its complete chunks; the ragged tail gives no update."""
        c, (b, length, _), d = self.chunk_size, za.shape, tgt.shape[-1]
        nfull = length // c
        full = nfull * c
        fast = []
        if nfull:
            zc = za[:, :full].reshape(b, nfull, c, -1)  # [B, N, C, F]
            vc = self.targets(tgt[:, :full].reshape(b * nfull, c, d)).reshape(b, nfull, c, d)
            o, delta = chunk_prefix_apply(zc, vc, delta, self.lr)
            fast.append(o.reshape(b, full, d))
        fast.append(za[:, full:] @ delta.transpose(1, 2))
        return torch.cat(fast, 1), delta


def _acc(t: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype of the fast-weight math: fp32, or fp64 for float64 tensors."""
    return t if t.dtype == torch.float64 else t.float()


def _common_position(position: torch.Tensor) -> int:
    if position.numel() == 0:
        return 0
    p0 = int(position[0])
    if not bool((position == p0).all()):
        raise InputError("in-place TTT: the sequences of a batch must be at the same position "
                         f"(got {position.tolist()}); use aligned steps or separate batches")
    return p0


@torch.no_grad()
def init_conversion_(mlp: InPlaceTTTMLP, generator: Optional[torch.Generator] = None) -> InPlaceTTTMLP:
    """Set ONLY the new tensors to their conversion values: conv weight zero (so the model equals the
    base model exactly), ttt_proj zero off-diagonal with its diagonal ~ N(0, 0.02^2)."""
    device = mlp.down_proj.weight.device
    device = torch.device("cpu") if device.type == "meta" else device
    for mod in (mlp.ttt_conv, mlp.ttt_proj):
        if mod.weight.is_meta:
            mod.to_empty(device=device)
    mlp.ttt_conv.weight.zero_()
    gdev = generator.device if generator is not None else "cpu"
    diag = torch.randn(mlp.hidden_size, generator=generator, device=gdev, dtype=torch.float32) * 0.02
    mlp.ttt_proj.weight.copy_(torch.diag(diag))
    return mlp
