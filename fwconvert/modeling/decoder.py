"""A compact LLaMA-family decoder with an explicit, immutable streaming state.

Parameter names equal the HF checkpoint keys, so a checkpoint loads with ``load_state_dict``.
The state is a flat ``dict`` of tensors::

    position                      [B]                 int64, tokens seen so far
    past_key_values.{i}.key|value [B, H_kv, P, hd]    growing, or the last W keys with a window
                                                      (``init_state(fixed_window=True)``: always W slots,
                                                      zero padding at negative positions, never attended)
    past_key_values.{i}.sink_key|sink_value [B, H_kv, S, hd]   with a window and S attention sinks only: the
                                                      keys/values of the document's first S tokens (zeros until seen)
    fast_weights.{owner}.{name}   (mechanism-defined)  see fastweights/base.py

    past state --> step(input_ids [B, C]) --> logits [B, C, V], present state

``forward(ids)`` is ``step(ids, init_state(B))`` and equals streaming the same ids in any pieces. Without a window
it attends with SDPA's ``is_causal`` instead of an explicit mask (calibration's path: on CUDA that lets PyTorch pick
its flash kernel, which skips the masked half of the score matrix; a mask forces a kernel that computes all of it).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..fastweights.base import State, StepContext
from .rope import apply_rope, inverse_frequencies, rope_cos_sin

FAST_PREFIX = "fast_weights."


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=cfg.o_bias)
        # Set only while exporting (exporters/onnx/graph.py::export_form), never saved: apply_rope's matmul form;
        # rope_order: the head dims of q and k are in this order (rope.interleaved_order; the weights were reordered
        # to match), so cos and sin are read in it too.
        self.rope_rotation = None
        self.rope_order = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        rep = self.n_heads // self.n_kv
        if rep == 1:
            return x
        return x[:, :, None].expand(b, h, rep, n, d).reshape(b, h * rep, n, d)

    def _qkv(self, x, cos, sin):
        """q [B, T, H, hd], k and v [B, T, H_kv, hd], RoPE applied to q and k."""
        b, t, _ = x.shape
        h, kv, hd = self.n_heads, self.n_kv, self.head_dim
        if self.rope_order is not None:
            cos, sin = cos.index_select(-1, self.rope_order), sin.index_select(-1, self.rope_order)
        q = self.q_proj(x).view(b, t, h, hd)
        k = self.k_proj(x).view(b, t, kv, hd)
        v = self.v_proj(x).view(b, t, kv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin, self.rope_rotation), apply_rope(k, cos, sin, self.rope_rotation), v

    def forward(self, x, cos, sin, past_k, past_v, mask, sink_k=None, sink_v=None):
        """Attention of the chunk over cat(past, new) ([sinks first when given: ``mask`` then covers S + P + T keys]);
        returns (output, cat(past, new) keys, values). ``mask=None``: plain causal attention of a chunk with no past
        and no sinks (DecoderLM.forward's path)."""
        b, t, _ = x.shape
        if mask is None and (past_k.shape[2] or sink_k is not None):
            raise ValueError("attention without a mask is for a chunk with no past and no sinks")
        q, k, v = self._qkv(x, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, hd]
        k_all = torch.cat((past_k.to(k.dtype), k), dim=2)  # [B, H_kv, P+T, hd]
        v_all = torch.cat((past_v.to(v.dtype), v), dim=2)
        k_att, v_att = k_all, v_all
        if sink_k is not None:
            k_att, v_att = torch.cat((sink_k.to(k.dtype), k_all), dim=2), torch.cat((sink_v.to(v.dtype), v_all), dim=2)
        out = F.scaled_dot_product_attention(
            q, self._repeat_kv(k_att), self._repeat_kv(v_att), attn_mask=mask, is_causal=mask is None,
            scale=self.head_dim ** -0.5,
        )  # [B, H, T, hd]
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out), k_all, v_all


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    stateful = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = GatedMLP(cfg)


class DecoderBody(nn.Module):
    """The ``model.*`` part of an HF checkpoint."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # an explicit (uninitialised) weight skips the random init: weights always come from a checkpoint
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def sub_state(state: State, prefix: str) -> State:
    n = len(prefix)
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix)}


def attention_mask(position: torch.Tensor, t: int, p: int, window: Optional[int]) -> torch.Tensor:
    """[B, 1, T, P+T] bool, True where query i may attend key j of ``cat(past, new)``.

    Query i sits at absolute position ``position + i``; key j at ``position - P + j``. Keys at a
    negative absolute position are the zero padding of a fixed-size window cache (never attended).
    Shape-only arithmetic (no Python branching on values), so it traces with dynamic B, T and P."""
    device = position.device
    q_abs = position[:, None] + torch.arange(t, device=device)[None, :]  # [B, T]
    k_abs = position[:, None] - p + torch.arange(p + t, device=device)[None, :]  # [B, P+T]
    diff = q_abs[:, :, None] - k_abs[:, None, :]  # [B, T, P+T]
    allowed = (diff >= 0) & (k_abs[:, None, :] >= 0)
    if window is not None:
        allowed = allowed & (diff < window)
    return allowed[:, None]


def sink_mask(position: torch.Tensor, t: int, sinks: int, window: int) -> torch.Tensor:
    """[B, 1, T, S] bool, True where query i attends sink slot s (the document's token s): once s is in the past
    (s < position) and has left query i's window (position + i - s >= window). Within the window the token is read
    from the window's own keys, so no key is attended twice."""
    s = torch.arange(sinks, device=position.device)[None, None, :]  # [1, 1, S]
    q_abs = position[:, None, None] + torch.arange(t, device=position.device)[None, :, None]  # [B, T, 1]
    return ((s < position[:, None, None]) & (q_abs - s >= window))[:, None]


def update_sinks(sink: torch.Tensor, new: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """``sink [B, H, S, hd]`` with slot s set to ``new [B, H, T, hd]``'s entry for the document's token s where this
    chunk (positions position .. position + T - 1) holds it."""
    b, h, slots, d = sink.shape
    t = new.shape[2]
    idx = torch.arange(slots, device=position.device)[None, :] - position[:, None]  # [B, S]: s's index in the chunk
    take = ((idx >= 0) & (idx < t))[:, None, :, None]
    got = torch.gather(new, 2, idx.clamp(0, t - 1)[:, None, :, None].expand(b, h, slots, d))
    return torch.where(take, got.to(sink.dtype), sink)


class DecoderLM(nn.Module):
    """Decoder + LM head (optionally an FWL head, optionally in-place TTT MLPs)."""

    def __init__(self, cfg: ModelConfig, fast_weights=None, window: Optional[int] = None, sinks: int = 0):
        super().__init__()
        self.config = cfg
        self.fast_weights = fast_weights
        self.window = window if window is not None else cfg.sliding_window
        # attention sinks: with a window, the document's first ``sinks`` tokens stay attendable beyond it
        self.sinks = int(sinks)
        self.model = DecoderBody(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.fwl_head: Optional[nn.Module] = None
        self.register_buffer("inv_freq", inverse_frequencies(cfg), persistent=False)

    # -- parameters ---------------------------------------------------------------------------
    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after building on the meta device)."""
        self.inv_freq = inverse_frequencies(self.config).to(self.model.norm.weight.device)

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) must not round the rotary frequencies: an fp16 inv_freq puts the angle at
        # position 8k off by radians (keys drifted 10% by position 8k in an fp16 export before this).
        out = super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = inverse_frequencies(self.config).to(self.inv_freq.device)
        return out

    @property
    def unembed_weight(self) -> torch.Tensor:  # [V, D]
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def stateful_modules(self) -> Dict[str, nn.Module]:
        """State owner name -> module, for every fast-weight mechanism in the model."""
        out = {f"layers.{i}.mlp": layer.mlp for i, layer in enumerate(self.model.layers) if getattr(layer.mlp, "stateful", False)}
        if self.fwl_head is not None:
            out["fwl"] = self.fwl_head
        return out

    # -- state --------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None, fixed_window: bool = False) -> State:
        """A fresh state. ``fixed_window=True`` (window models only) makes the KV state a constant
        ``W`` slots of zeros (padding at negative positions, masked out), the ONNX window layout."""
        cfg = self.config
        device = device if device is not None else self.model.norm.weight.device
        dtype = dtype if dtype is not None else self.model.norm.weight.dtype
        state = {"position": torch.zeros(batch_size, dtype=torch.int64, device=device)}
        if fixed_window and self.window is None:
            raise ValueError("fixed_window=True needs a model with an attention window")
        slots = self.window if fixed_window else 0
        kv_shape = (batch_size, cfg.num_key_value_heads, slots, cfg.head_dim)
        sinks = self._sinks()
        for i in range(cfg.num_hidden_layers):
            state[f"past_key_values.{i}.key"] = torch.zeros(kv_shape, dtype=dtype, device=device)
            state[f"past_key_values.{i}.value"] = torch.zeros(kv_shape, dtype=dtype, device=device)
            if sinks:
                sink_shape = (batch_size, cfg.num_key_value_heads, sinks, cfg.head_dim)
                state[f"past_key_values.{i}.sink_key"] = torch.zeros(sink_shape, dtype=dtype, device=device)
                state[f"past_key_values.{i}.sink_value"] = torch.zeros(sink_shape, dtype=dtype, device=device)
        for owner, mod in self.stateful_modules().items():
            for k, v in mod.init_state(batch_size, device=device).items():
                state[f"{FAST_PREFIX}{owner}.{k}"] = v
        return state

    def _sinks(self) -> int:
        if self.sinks < 0 or (self.sinks and self.window is None):
            raise ValueError(f"attention sinks ({self.sinks}) need a window and a count >= 0")
        return self.sinks

    # -- compute ------------------------------------------------------------------------------
    def _trim(self, kv: torch.Tensor) -> torch.Tensor:
        if self.window is None:
            return kv
        # W - 1 past keys are all a query can reach (it attends to itself and the W - 1 before it); one more slot
        # keeps the attention span W + C a multiple of 8 when W and C are, the alignment onnxruntime's fused
        # fp16/fp32 attention kernels want for the mask's row stride (W - 1 + C failed its fp32 kernel's check)
        keep = self.window
        return kv[:, :, kv.shape[2] - keep:] if kv.shape[2] > keep else kv

    def step(self, input_ids: torch.Tensor, state: State, aligned: bool = False):
        """Process one chunk ``input_ids [B, C]`` after ``state``; returns ``(logits [B, C, V], new_state)``.

        ``aligned=True`` (the export path) promises the chunk starts at a chunk boundary of every chunked
        fast-weight mechanism and holds at most one such chunk (see StepContext.aligned)."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be [batch, chunk] with at least one token, got shape "
                             f"{list(input_ids.shape)}")
        return self._step(input_ids, state, aligned, causal=False)

    def _step(self, input_ids: torch.Tensor, state: State, aligned: bool, causal: bool):
        """``step``; ``causal=True`` (forward's fresh state, no window) attends without building a mask."""
        b, t = input_ids.shape
        pos = state["position"]
        positions = pos[:, None] + torch.arange(t, device=input_ids.device)[None, :]  # [B, T]
        h = self.model.embed_tokens(input_ids)  # [B, T, D]
        ctx = StepContext(input_ids=input_ids, position=pos, embeddings=h, aligned=aligned)
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)
        p = state["past_key_values.0.key"].shape[2]
        mask = None if causal else attention_mask(pos, t, p, self.window)
        sinks = self._sinks()
        if sinks:
            mask = torch.cat((sink_mask(pos, t, sinks, self.window), mask), dim=-1)
        new: State = {"position": pos + t}
        for i, layer in enumerate(self.model.layers):
            kv = f"past_key_values.{i}."
            sk, sv = (state[kv + "sink_key"], state[kv + "sink_value"]) if sinks else (None, None)
            a, k_all, v_all = layer.self_attn(
                layer.input_layernorm(h), cos, sin, state[kv + "key"], state[kv + "value"], mask, sk, sv
            )
            h = h + a
            new[kv + "key"] = self._trim(k_all)
            new[kv + "value"] = self._trim(v_all)
            if sinks:
                new[kv + "sink_key"] = update_sinks(sk, k_all[:, :, p:], pos)
                new[kv + "sink_value"] = update_sinks(sv, v_all[:, :, p:], pos)
            x = layer.post_attention_layernorm(h)
            if getattr(layer.mlp, "stateful", False):
                prefix = f"{FAST_PREFIX}layers.{i}.mlp."
                m, fw = layer.mlp(x, sub_state(state, prefix), ctx)
                new.update({prefix + k: v for k, v in fw.items()})
            else:
                m = layer.mlp(x)
            h = h + m
        h = self.model.norm(h)
        if self.fwl_head is not None:
            prefix = f"{FAST_PREFIX}fwl."
            logits, fw = self.fwl_head(h, sub_state(state, prefix), ctx, self.unembed_weight)
            new.update({prefix + k: v for k, v in fw.items()})
        else:
            logits = F.linear(h, self.unembed_weight)
        return logits, new

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One-shot logits ``[B, T, V]`` from a fresh state (the calibration loss's path; module doc)."""
        state = self.init_state(input_ids.shape[0], device=input_ids.device)
        return self._step(input_ids, state, aligned=False, causal=self.window is None)[0]
