"""Names, axes and the state manifest of the chunk-step graph (the one place IO names are built).

    position ------------------+                      +--> next_position
    past_key_values.{i}.key ---+                      +--> present.{i}.key
    past_fast_weights.{X} -----+--> chunk step ------+--> present_fast_weights.{X}
    input_ids [B, C] ----------+                      +--> logits [B, C, V]

Each ``present``/``next`` output feeds the matching input of the next chunk. Torch-free: the runtime
imports this module too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fwconvert-onnx-chunk-step/1"
GRAPH_NAME = "model.onnx"
INITIAL_STATE_NAME = "initial_state.npz"
BATCH, CHUNK, PAST = "batch", "chunk", "past"
KV_PREFIX, FAST_PREFIX = "past_key_values.", "fast_weights."


def input_name(state_key: str) -> str:
    """Decoder state key -> graph input name."""
    if state_key.startswith(FAST_PREFIX):
        return "past_" + state_key
    return state_key


def output_name(state_key: str) -> str:
    """Decoder state key -> graph output name (fed back into ``input_name`` next chunk)."""
    if state_key == "position":
        return "next_position"
    if state_key.startswith(KV_PREFIX):
        return "present." + state_key[len(KV_PREFIX):]
    if state_key.startswith(FAST_PREFIX):
        return "present_" + state_key
    raise ValueError(f"unknown state key {state_key!r}")


@dataclass
class StateSpec:
    """One state tensor: its decoder key, graph names, shape (ints or axis names), dtype, initial value."""

    key: str
    input: str
    output: str
    shape: List  # e.g. ["batch", 2, "past", 16]
    dtype: str  # numpy dtype name: float32, float16, int64
    init: Dict  # {"kind": "zeros"} | {"kind": "copy", "weight": name, "file": ..., "array": ...}

    @property
    def grows(self) -> bool:
        """Whether the tensor grows by each chunk (a full-attention KV cache: a ``past`` axis), else fixed-shape."""
        return PAST in self.shape

    @classmethod
    def from_dict(cls, d: dict) -> "StateSpec":
        return cls(**d)


@dataclass
class Manifest:
    """Everything a runtime needs beside the graph."""

    graph: str
    vocab_size: int
    dtype: str  # fp32 | fp16 (weights and activations)
    attention: str  # full | window
    window: Optional[int]
    chunking: Dict  # {"chunk_size": C, "rule": "...", "fixed": bool}
    state: List[StateSpec]
    inputs: List[str]
    outputs: List[str]
    tokenizer_files: List[str] = field(default_factory=list)
    eos_token_id: Optional[int] = None
    source: Optional[str] = None
    source_fingerprint: Optional[str] = None
    fast_weights: Optional[Dict] = None
    versions: Dict = field(default_factory=dict)
    external_data: Optional[str] = None
    sink_tokens: int = 0  # window exports: the first tokens kept attendable beyond the window (0 before 2026-12-02)
    max_position_embeddings: Optional[int] = None  # the positions the model was trained for (None before session 14)
    # The order of each head's dims in the KV state's keys (and sink keys): graph dim j holds the model's dim
    # key_dim_order[j] (the interleaved RoPE layout, exporters/onnx/rotary_form.py; every export since session 17);
    # None: the model's own order (exports before session 17).
    key_dim_order: Optional[List[int]] = None
    format: str = MANIFEST_FORMAT

    def to_dict(self) -> dict:
        d = asdict(self)
        d["feeds"] = {s.output: s.input for s in self.state}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d.pop("feeds", None)
        d["state"] = [StateSpec.from_dict(s) for s in d["state"]]
        return cls(**d)


def chunk_rule(chunk_size: int, fixed: bool) -> dict:
    if fixed:
        rule = (f"every chunk holds exactly {chunk_size} tokens and starts at a multiple of {chunk_size}; "
                f"a shorter chunk is allowed only as the last chunk of a document")
    else:
        rule = f"any chunk length >= 1 (the export's default is {chunk_size})"
    return {"chunk_size": chunk_size, "fixed": fixed, "rule": rule}
