"""The pieces of an export: trace to ONNX, describe the state (manifest), check the graph, smoke-test it.

    DecoderLM --ChunkStep--> torch.export (dynamic batch/chunk/past) --> ONNX (opset, IR pinned)
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Dict, List

import numpy as np
import torch

import fwconvert
from fwconvert.errors import InputError, NumericError
from fwconvert.modeling.decoder import DecoderLM
from fwconvert.modeling.rope import interleaved_order

from .attention_forms import attention_without_transposes, grouped_queries
from . import causal_attention as onnx_attention
from .ir_nodes import Nodes, replace_value
from .query_order import query_heads_in_group_order
from .rotary_form import rotary_embedding
from .weight_layout import folded_weights
from .io_spec import BATCH, CHUNK, GRAPH_NAME, INITIAL_STATE_NAME, PAST, Manifest, StateSpec, chunk_rule, input_name, output_name
from .wrapper import ChunkStep, initial_state, state_layout

CONTROL_FLOW = {"Loop", "Scan", "If", "SequenceMap"}
EXAMPLE_B, EXAMPLE_C, EXAMPLE_P = 2, 3, 5  # distinct and >= 2: torch.export specialises 0/1 sizes


def _np_dtype(t: torch.dtype) -> str:
    return str(torch.empty(0, dtype=t).numpy().dtype)


def _example_state(model: DecoderLM, keys, fixed_window: bool) -> Dict[str, torch.Tensor]:
    st = initial_state(model, EXAMPLE_B, fixed_window, aligned=True)
    if not fixed_window:  # a non-empty past so that the past axis is traced as dynamic
        ids = torch.randint(0, model.config.vocab_size, (EXAMPLE_B, EXAMPLE_P), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            _, new = model.step(ids, model.init_state(EXAMPLE_B, device=ids.device), aligned=False)
        st = {k: new[k] for k in keys}
    return st


def _dynamic_shapes(keys, shapes, chunk_dynamic: bool):
    batch = torch.export.Dim(BATCH, min=1, max=4096)
    past = torch.export.Dim(PAST, min=0, max=1 << 20)
    ids = {0: batch, 1: torch.export.Dim(CHUNK, min=1, max=1 << 16)} if chunk_dynamic else {0: batch}
    rest = []
    for k in keys:
        rest.append({i: (batch if s == BATCH else past) for i, s in enumerate(shapes[k]) if s in (BATCH, PAST)})
    return (ids, tuple(rest))


def export_program(model: DecoderLM, fixed_window: bool, dtype: str, *, opset: int, ir_version: int):
    """(ONNXProgram, (keys, shapes)) for ``model`` (fp32 on entry; cast to fp16 here if asked)."""
    keys, shapes = state_layout(model, fixed_window, aligned=True)
    state = _example_state(model, keys, fixed_window)
    ids = torch.randint(0, model.config.vocab_size, (EXAMPLE_B, EXAMPLE_C), generator=torch.Generator().manual_seed(1))
    if dtype == "fp16":
        model = _to_fp16(model)
        state = {k: (v.half() if k.startswith("past_key_values.") else v) for k, v in state.items()}
    wrapper = ChunkStep(model, keys, aligned=True).eval()
    with export_form(model):
        prog = _trace(wrapper, ids, state, keys, shapes, opset)
    prog.key_dim_order = interleaved_order(model.config.head_dim).tolist()
    prog.model.ir_version = ir_version
    prog.fusions = fuse_for_ort(prog.model, full_attention=not fixed_window)
    folded_weights(prog.model.graph)  # Uᵀ, fp32 head weights: one copy shared by a static session's pinned sessions
    return prog, (keys, shapes)


@contextlib.contextmanager
def export_form(model: DecoderLM):
    """While tracing, every attention takes its export form (fewer kernels, the same values); restored afterwards:
    - the query and key weights (biases, q/k norm weights) hold each head's dims in the order
      ``rope.interleaved_order`` (the pair that RoPE rotates together side by side), RoPE rotates in that order,
      and so the keys of the KV state are in it too (the manifest's ``key_dim_order``). Every q·k dot product is
      the same sum in another order. This lets ``rotary_form`` hand several heads to onnxruntime's kernel as one;
    - the pairs rotate with one matmul by a ±1 matrix (exactly the slice-negate-concatenate it replaces).
    q, k and v keep their own projections and q and k their own RoPE: a joint q/k/v projection (one MatMul, one
    RoPE over q·k) needs two Splits per layer, copies that cost more at batch 8 than the extra launches cost at
    batch 1 (session 18, H100, docs/benchmarks.md: SmolLM2 base step 5.91 -> 5.63 ms at B = 8, 2.21 -> 2.21 at
    B = 1; benchmarks/qkv_probe.py times the forms alone)."""
    from fwconvert.modeling.decoder import Attention
    from fwconvert.modeling.rope import interleaved_rotation_matrix

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    swapped = []  # (module, attribute, original Parameter) of the reordered weights

    def reorder(t, heads, hd, order):  # rows (or entries) h·hd + j <- h·hd + order[j]
        return t.reshape(heads, hd, *t.shape[1:])[:, order].reshape(t.shape)

    for m in layers:
        w, hd = m.q_proj.weight, m.head_dim
        order = interleaved_order(hd, w.device)
        m.rope_rotation = interleaved_rotation_matrix(hd, w.dtype, w.device)
        m.rope_order = order
        # new Parameter objects: the traced program keeps references to what it read
        for p, n in [(m.q_proj, m.n_heads), (m.k_proj, m.n_kv)]:
            for name in ("weight", "bias"):
                if getattr(p, name) is not None:
                    swapped.append((p, name, getattr(p, name)))
                    setattr(p, name, torch.nn.Parameter(reorder(getattr(p, name).detach(), n, hd, order), False))
        for norm in (m.q_norm, m.k_norm) if m.q_norm is not None else ():
            swapped.append((norm, "weight", norm.weight))
            norm.weight = torch.nn.Parameter(norm.weight.detach()[order], False)
    try:
        yield
    finally:
        for module, name, param in swapped:
            setattr(module, name, param)
        for m in layers:
            m.rope_rotation = m.rope_order = None


def _trace(wrapper, ids, state, keys, shapes, opset):
    names_in = ["input_ids"] + [input_name(k) for k in keys]
    names_out = ["logits"] + [output_name(k) for k in keys]
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision notes
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(wrapper, (ids, *[state[k] for k in keys]), dynamo=True, opset_version=opset,
                                     dynamic_shapes=_dynamic_shapes(keys, shapes, True), input_names=names_in,
                                     output_names=names_out, optimize=True, verbose=False)
        except Exception as e:  # noqa: BLE001 - reported with the exporter's own first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"torch.onnx.export (dynamo) failed: {first}") from e
    return prog


def fuse_for_ort(model, full_attention: bool) -> Dict[str, int]:
    """Rewrite ``model`` (onnx_ir, in place) with onnxruntime's fused contrib ops: RMSNorm and residual+RMSNorm
    to (Skip)SimplifiedLayerNormalization, QK^T-mask-softmax-V to MultiHeadAttention with its grouped query heads
    stacked by a head order in the weights (query_order.py), RoPE to RotaryEmbedding. A ``full_attention`` graph (no
    window) then attends with ONNX's own ``Attention`` instead (causal_attention.py; opset 23: grouped heads, the KV
    cache append and the causal mask in one op); window graphs keep MultiHeadAttention.
    Besides fewer kernels, this fixes fp16 accuracy: the decomposed attention rounds its scores to fp16 before the
    softmax (logits off by 5e-2 on the GPU), the fused kernel keeps them in fp32 as torch's SDPA does. Returns the
    count of each fused op in the result, e.g. ``{"com.microsoft.MultiHeadAttention": 30, ...}``."""
    import onnx_ir.passes.common as ir_passes
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused, counts = optimize_for_ort(model)
    if fused is not model:  # the API returns the model it rewrote; keep the caller's object current
        raise AssertionError("optimize_for_ort returned a new model object")
    _decompose_plain_rms(model.graph)
    if full_attention:
        onnx_attention.causal_attention(model)
    attention_without_transposes(model.graph)  # the MultiHeadAttention left: those of window graphs
    grouped_queries(model.graph)
    rotary_embedding(model.graph)
    ir_passes.RemoveUnusedNodesPass()(model)  # the shape arithmetic of the removed broadcasts, the RoPE tables
    query_heads_in_group_order(model.graph)  # after that pass: it reorders heads only where nothing else reads them
    ir_passes.RemoveUnusedNodesPass()(model)  # the transposed stacking's constants and shape arithmetic
    fused_ops: Dict[str, int] = {}
    for n in model.graph:
        if n.domain not in ("", "ai.onnx") or n.op_type == "Attention":
            key = f"{n.domain or 'ai.onnx'}.{n.op_type}"
            fused_ops[key] = fused_ops.get(key, 0) + 1
    return dict(sorted(fused_ops.items()))


def _decompose_plain_rms(graph) -> int:
    """Write each remaining ``SimplifiedLayerNormalization`` (an onnxruntime op in the ONNX domain, which the
    onnx checker rejects) back as standard ops, computed in fp32 like ``RMSNorm``. The residual-fused
    ``com.microsoft.SkipSimplifiedLayerNormalization`` nodes stay. Returns how many were rewritten."""
    import onnx_ir as ir

    todo = [n for n in graph if n.op_type == "SimplifiedLayerNormalization" and n.domain in ("", "ai.onnx")]
    for n in todo:
        attrs = {a.name: a.value for a in n.attributes.values()}
        if attrs.get("axis", -1) != -1 or any(o.uses() for o in n.outputs[1:]):
            raise AssertionError(f"unexpected SimplifiedLayerNormalization form: {attrs}")
        x, scale = n.inputs[0], n.inputs[1]
        dtype = x.dtype
        new = Nodes()
        x32 = new.op("Cast", x, to=ir.DataType.FLOAT) if dtype != ir.DataType.FLOAT else x
        axes = new.const(np.array([-1], dtype=np.int64))
        eps = new.const(np.array(attrs.get("epsilon", 1e-5), dtype=np.float32))
        var = new.op("ReduceMean", new.op("Mul", x32, x32), axes, keepdims=1)
        y = new.op("Mul", x32, new.op("Reciprocal", new.op("Sqrt", new.op("Add", var, eps))))
        if dtype != ir.DataType.FLOAT:
            y = new.op("Cast", y, to=dtype)
        y = new.op("Mul", y, scale)
        graph.insert_before(n, new.nodes)
        replace_value(graph, n.outputs[0], y)
        graph.remove(n, safe=True)
    return len(todo)


def _to_fp16(model: DecoderLM) -> DecoderLM:
    """A copy with fp16 weights; fast-weight mechanisms keep their state dtype (fp32) as they define it."""
    import copy

    # All fp16 (fp32 rotary angles and RMSNorm statistics, as in torch); the fused MultiHeadAttention keeps the
    # softmax in fp32. Measured on the H200 (docs/results.md): fp32 attention or an fp32 residual stream in the
    # graph were slower and no closer to fp32 on random tokens, where PyTorch's own fp16 drifts as far.
    return copy.deepcopy(model).half()


def _init_entry(model: DecoderLM, key: str, value: torch.Tensor, arrays: dict) -> dict:
    if not bool(value.any()):
        return {"kind": "zeros"}
    arrays[key] = value[:1].detach().cpu().numpy()
    entry = {"kind": "array", "file": INITIAL_STATE_NAME, "array": key}
    for name, p in model.named_parameters():
        if tuple(p.shape) == tuple(value.shape[1:]) and torch.equal(p.detach().to(value.dtype), value[0]):
            entry.update(kind="copy", weight=name)
            break
    return entry


def build_manifest(model: DecoderLM, layout, staging: str, *, dtype: str, attention: str, window, chunk: int,
                   fixed: bool, opset: int, ir_version: int) -> Manifest:
    """The manifest (and ``initial_state.npz`` when some state does not start at zero)."""
    import onnx
    import onnxscript

    keys, shapes = layout
    init = initial_state(model, 1, attention == "window", aligned=True)
    arrays: dict = {}
    specs: List[StateSpec] = []
    for k in keys:
        dt = init[k].dtype
        if dtype == "fp16" and k.startswith("past_key_values."):
            dt = torch.float16
        specs.append(StateSpec(key=k, input=input_name(k), output=output_name(k), shape=shapes[k],
                               dtype=_np_dtype(dt), init=_init_entry(model, k, init[k], arrays)))
    if arrays:
        np.savez(os.path.join(staging, INITIAL_STATE_NAME), **arrays)
    from exporters.runtime.precheck import ort_version

    versions = {"fwconvert": fwconvert.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                "onnxruntime": ort_version(),
                "onnxscript": onnxscript.__version__, "opset": opset, "ir_version": ir_version, "exporter": "dynamo"}
    return Manifest(graph=GRAPH_NAME, vocab_size=model.config.vocab_size, dtype=dtype, attention=attention,
                    window=window, sink_tokens=int(model.sinks), chunking=chunk_rule(chunk, fixed), state=specs,
                    max_position_embeddings=getattr(model.config, "max_position_embeddings", None),
                    inputs=["input_ids"] + [s.input for s in specs], outputs=["logits"] + [s.output for s in specs],
                    versions=versions)


def _walk_ops(graph, out: set) -> None:
    for node in graph.node:
        out.add(node.op_type)
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _walk_ops(g, out)


def check_graph(path: str, manifest: Manifest) -> None:
    """onnx checker (full), pinned versions, no control flow, IO names as the manifest says."""
    import onnx

    onnx.checker.check_model(path, full_check=True)
    m = onnx.load(path, load_external_data=False)
    ops: set = set()
    _walk_ops(m.graph, ops)
    for f in m.functions:
        for n in f.node:
            ops.add(n.op_type)
    bad = sorted(ops & CONTROL_FLOW)
    assert not bad, f"exported graph contains control flow {bad}"
    assert m.ir_version <= 13, f"IR version {m.ir_version} > 13"
    assert [i.name for i in m.graph.input] == manifest.inputs, [i.name for i in m.graph.input]
    assert [o.name for o in m.graph.output] == manifest.outputs, [o.name for o in m.graph.output]


def smoke_check(model: DecoderLM, path: str, manifest: Manifest, folder: str, tol) -> None:
    """Load in onnxruntime (CPU) and compare one step from the fresh state (C = 1, P = 0) with torch."""
    from exporters.runtime.session import ChunkSession

    sess = ChunkSession(folder, provider="cpu", manifest=manifest, precheck=False)
    ids = np.array([[1 % manifest.vocab_size]], dtype=np.int64)
    state = sess.new_state(1)
    logits = sess.step(ids, state)
    with torch.no_grad():
        ref, _ = model.step(torch.from_numpy(ids), model.init_state(1, fixed_window=manifest.attention == "window"), aligned=True)
    ref = ref.float().numpy()
    rel = float(np.linalg.norm(logits.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))
    if not rel <= tol.rel:
        raise NumericError(f"exported graph disagrees with torch on its first step: logits rel {rel:.3g} > {tol.rel:g}")
