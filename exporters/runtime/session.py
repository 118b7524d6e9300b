"""``ChunkSession``: run an exported chunk-step folder with onnxruntime, needing nothing but the folder.

    folder/manifest.json + model.onnx --precheck--> InferenceSession (CUDA if available, else CPU)
    step(ids [B, C], state): bind ids + past (device OrtValues) -> run -> logits, state.advance(presents)

numpy + onnxruntime only (no torch).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from fwconvert.config import load_json_strict
from fwconvert.errors import InputError, ResourceError

from ..onnx.io_spec import BATCH, CHUNK, MANIFEST_FORMAT, MANIFEST_NAME, PAST, Manifest
from .feeds import ORT_TYPES, check_feeds, check_manifest_against_graph, is_int
from .precheck import check_graph_file
from .state import StateBuffers
from .static import StaticSteps, check_static


def load_manifest(folder: str) -> Manifest:
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: not a folder (expected an exported folder with {MANIFEST_NAME})")
    if not os.path.lexists(path):
        raise InputError(f"{folder}: no {MANIFEST_NAME} (not an fwconvert export, or an interrupted one)")
    if os.path.islink(path):
        raise InputError(f"{path}: is a symbolic link; refusing to follow it")
    raw = load_json_strict(path)
    try:
        m = Manifest.from_dict(raw)
        problem = _manifest_problem(m)
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise InputError(f"{path}: not a valid manifest ({type(e).__name__}: {e})") from None
    if problem:
        raise InputError(f"{path}: not a valid manifest ({problem})")
    return m


def _manifest_problem(m: Manifest) -> Optional[str]:
    """What is wrong with a parsed manifest, or None."""
    if m.format != MANIFEST_FORMAT:
        return f"format {m.format!r} is not {MANIFEST_FORMAT!r}"
    if not isinstance(m.graph, str) or os.path.basename(m.graph) != m.graph or m.graph in ("", ".", ".."):
        return f"graph {m.graph!r} must be a plain file name inside the folder"
    if not is_int(m.vocab_size, 1) or not is_int(m.chunking.get("chunk_size"), 1):
        return "vocab_size and chunking.chunk_size must be positive integers"
    if m.attention not in ("full", "window") or m.dtype not in ("fp32", "fp16"):
        return f"attention {m.attention!r} / dtype {m.dtype!r} not understood"
    for s in m.state:
        if not all(isinstance(n, str) for n in (s.key, s.input, s.output)) or not isinstance(s.shape, list):
            return f"state entry {s.key!r} is malformed"
        if BATCH not in s.shape or not all(is_int(d) or d in (BATCH, PAST) for d in s.shape):
            return f"state {s.input!r}: shape {s.shape} needs a 'batch' axis and integer or 'past' dims"
        if s.dtype not in ("float32", "float16", "float64", "int64", "int32") or not isinstance(s.init, dict):
            return f"state {s.input!r}: dtype {s.dtype!r} or init {s.init!r} not understood"
    if not any(s.key == "position" for s in m.state):
        return "no 'position' state"
    return None


# onnxruntime's attention backends (sdpa_kernel bit mask): flash 1, memory-efficient 2, unfused 16. fp32 graphs use
# flash + unfused only: the fp32 memory-efficient (cutlass) kernel rejected a window export whose attention spanned
# W - 1 + C = 2,559 positions ("check_supported(p) was false", H200, ORT 1.31): with an attention bias it needs the
# bias row stride (the span) aligned, which a user's W and C need not give. Windows now keep W slots (span W + C),
# but fp32 graphs exist to verify numerics, where the unfused kernel is the safe choice for any span.
FP32_SDPA_KERNELS = "17"
# Static sessions' CUDA arenas extend by the size requested, not to the next power of two: their shapes are fixed,
# so there is no growth to pay for and no slack to keep. H100, session 17 (benchmarks/static_memory.py, which sets
# this name to compare): FWL's static full session 7.87 -> 7.17 GB of device memory, base 3.84 -> 3.81, in-place
# 4.34 -> 4.34; the replays allocate nothing, so speed is unchanged (tokens/s moved -3% to +8%, one pass each).
STATIC_ARENA = "kSameAsRequested"


def tf32_policy(dtype: str) -> bool:
    """Whether a CUDA session of a graph of this dtype lets fp32 matmuls use TF32 (``use_tf32=None``).

    fp32 graphs: no. They exist to check numerics against PyTorch fp32 (1e-4), and TF32 alone costs ~1e-3 per
    layer. fp16 graphs: yes. Their fp32 parts (the FWL head, the in-place TTT delta and its update, kept in fp32
    for range and for the state sums) multiply tensors that mostly come from fp16 values, which TF32's 10-bit
    mantissa holds exactly; without TF32 those products run on the CUDA cores at a fraction of the tensor-core
    rate. Measured on the H200 at batch 8 (docs/benchmarks.md): FWL window step 19.0 -> 16.6 ms, in-place
    15.2 -> 13.4 ms, fp16 verify still within 1e-2 (FWL 8.6e-3)."""
    return dtype != "fp32"


def _providers(provider: str, use_tf32: bool, cuda_graph: bool = False, fp32: bool = False,
               attention_kernels: Optional[int] = None, fixed_shapes: bool = False):
    import onnxruntime as ort

    # With "auto", onnxruntime's own error log about CUDA libraries it cannot load (onnxruntime-gpu on a machine
    # without CUDA) is noise: the session falls back to the CPU and provider_note says so. With "cuda" it is the
    # reason the session refuses to start, so it stays.
    ort.set_default_logger_severity(4 if provider == "auto" else 3)
    have_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if provider == "cuda" and not have_cuda:
        raise InputError("--provider cuda: this onnxruntime has no CUDA execution provider")
    if provider in ("cuda", "auto") and have_cuda:
        opts = {"use_tf32": "1" if use_tf32 else "0"}
        if attention_kernels is not None:
            opts["sdpa_kernel"] = str(int(attention_kernels))
        elif fp32:
            opts["sdpa_kernel"] = FP32_SDPA_KERNELS
        if cuda_graph:
            opts["enable_cuda_graph"] = "1"
        if fixed_shapes:
            opts["arena_extend_strategy"] = STATIC_ARENA
        return [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
    if provider not in ("cpu", "auto", "cuda"):
        raise InputError(f"provider must be cpu, cuda or auto, got {provider!r}")
    return ["CPUExecutionProvider"]


class ChunkSession:
    """An exported graph plus its manifest; allocates state, runs chunks, streams documents.

    ``static_batch=B`` pins the batch and chunk axes (and, for a full-attention export, the past axis: one pinned
    session per past length, up to ``static_context`` tokens, default 8192, sharing one copy of the weights),
    allocates every buffer once and runs each step through fixed IO bindings; on the CUDA provider the steps are
    then captured as CUDA graphs
    (``cuda_graph=None``: whenever the session runs on CUDA). Such a session takes only full [B, C] chunks and
    has one state (see ``exporters/runtime/static.py``). ``attention_kernels`` (CUDA only): onnxruntime's
    ``sdpa_kernel`` bit mask of the fused attention kernels it may pick (flash 1, memory-efficient 2, cuDNN flash 8,
    unfused 16; default: onnxruntime's choice for fp16 graphs, flash + unfused for fp32 graphs)."""

    def __init__(self, folder: str, provider: str = "auto", use_tf32: Optional[bool] = None,
                 manifest: Optional[Manifest] = None, precheck: bool = True, threads: Optional[int] = None,
                 static_batch: Optional[int] = None, cuda_graph: Optional[bool] = None,
                 attention_kernels: Optional[int] = None, static_context: Optional[int] = None):
        import onnxruntime as ort

        self.folder = os.path.abspath(folder)
        self.manifest = manifest if manifest is not None else load_manifest(self.folder)
        self.path = os.path.join(self.folder, self.manifest.graph)
        if precheck:
            check_graph_file(self.path)
        if static_batch is not None:
            check_static(static_batch, static_context, self.chunk_size)
        elif cuda_graph:
            raise InputError("cuda_graph needs a static session (static_batch=B)")
        if cuda_graph and provider == "cpu":
            raise InputError("CUDA graphs need the CUDA provider (got provider 'cpu')")
        graphs = static_batch is not None and cuda_graph is not False and provider != "cpu" \
            and "CUDAExecutionProvider" in ort.get_available_providers()
        if cuda_graph and not graphs:
            raise InputError("CUDA graphs need the CUDA provider, which this onnxruntime does not have")
        if use_tf32 is None:
            use_tf32 = tf32_policy(self.manifest.dtype)
        self._threads, self._static_batch = threads, static_batch
        self._providers = _providers(provider, use_tf32, graphs, self.manifest.dtype == "fp32", attention_kernels,
                                     fixed_shapes=static_batch is not None)
        pinned_full = self._pinned_full = static_batch is not None and any(s.grows for s in self.manifest.state)
        # A static full session's first session is opened by StaticSteps, pinned at past 0 and reading the shared
        # weights: opening the graph here too would load a second copy of the weights (twice the weights' memory
        # at start). Its device comes from a one-node probe session with the same providers instead.
        self.sess = None if pinned_full else self.open_pinned()
        self.device = _session_device(self.sess or _probe_session(self._providers))
        if provider == "cuda" and self.device != "cuda":
            raise ResourceError("--provider cuda: onnxruntime could not start its CUDA execution provider (missing "
                                "CUDA or cuDNN libraries, or no GPU; its log above says which); use --provider cpu")
        self.provider_note = ("CUDA execution provider" + (" (TF32 on)" if use_tf32 else " (TF32 off)")) if self.device == "cuda" \
            else "CPU execution provider" + (" (no CUDA provider available)" if provider == "auto" else "")
        self.cuda_graph = graphs and self.device == "cuda"
        if self.cuda_graph:
            self.provider_note += ", CUDA graphs"
        if self.sess is not None:
            self.check_graph()
        self.static = StaticSteps(self, static_batch, self.cuda_graph, static_context) \
            if static_batch is not None else None  # a static full session's StaticSteps opens self.sess

    def check_graph(self) -> None:
        """InputError unless the opened session's graph has the manifest's inputs and outputs (their names and
        types); records them. ResourceError if it runs on another device than the one this session was set up
        for (a static full session's device comes from a probe session)."""
        if _session_device(self.sess) != self.device:
            raise ResourceError(f"{self.path}: onnxruntime runs the graph on {_session_device(self.sess)}, not on "
                                f"{self.device} like a one-node session with the same providers")
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        outputs = {o.name: o for o in self.sess.get_outputs()}
        self.output_names = list(outputs)
        # a static full session checks its first pinned session, opened at past 0 (StaticSteps._open_first)
        try:
            check_manifest_against_graph(self.manifest, self.inputs, outputs, 0 if self._pinned_full else None)
        except InputError as e:
            raise InputError(f"{os.path.join(self.folder, MANIFEST_NAME)}: the manifest disagrees with the graph "
                             f"{self.path}: {e}") from None

    def open_pinned(self, past: Optional[int] = None, initializers=None):
        """An onnxruntime session of this graph with this session's options; with ``static_batch``, the batch and
        chunk axes pinned, and with ``past`` the past axis too (a static session of a full-attention export opens one
        per past length). ``initializers``: name -> OrtValue on the session's device, used instead of the graph's
        own copies (the pinned sessions of one static session share one set of weights)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self._threads:
            opts.intra_op_num_threads = self._threads
        opts.log_severity_level = 3
        if self._static_batch is not None:
            opts.add_free_dimension_override_by_name(BATCH, self._static_batch)
            opts.add_free_dimension_override_by_name(CHUNK, self.chunk_size)
            if self._providers == ["CPUExecutionProvider"]:
                # The CPU provider prepacks every MatMul weight into a copy of its own per session, so the pinned
                # sessions would not share the weights (SmolLM2 fp32, 7 pinned sessions: peak 5.11 GiB, against 2.96
                # without; the first document 15.7 s against 9.3, later ones 3.4 against 3.6 s on 2 cores;
                # benchmarks/static_cpu_memory.py, session 17).
                opts.add_session_config_entry("session.disable_prepacking", "1")
        if past is not None:
            opts.add_free_dimension_override_by_name(PAST, past)
        try:
            for name, value in (initializers or {}).items():
                opts.add_initializer(name, value)
            return ort.InferenceSession(self.path, opts, providers=self._providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{self.path}: onnxruntime cannot load it: {first}") from None

    @property
    def chunk_size(self) -> int:
        return int(self.manifest.chunking["chunk_size"])

    @property
    def fixed_chunks(self) -> bool:
        return bool(self.manifest.chunking.get("fixed"))

    def new_state(self, batch: int) -> StateBuffers:
        if batch < 1:
            raise InputError(f"batch size must be >= 1, got {batch}")
        if self.static is not None:
            return self.static.reset(batch)
        return StateBuffers(self.manifest, batch, self.folder, self.device)

    def _check_chunk(self, ids: np.ndarray, state: StateBuffers) -> None:
        if ids.ndim != 2 or ids.shape[0] != state.batch or ids.shape[1] < 1:
            raise InputError(f"input 'input_ids': expected int64[{state.batch},chunk>=1], got "
                             f"{ids.dtype}[{','.join(map(str, ids.shape))}]")
        if ids.size and (ids.min() < 0 or ids.max() >= self.manifest.vocab_size):
            raise InputError(f"input 'input_ids': token ids must lie in [0, {self.manifest.vocab_size}), "
                             f"got {int(ids.min())}..{int(ids.max())}")
        if self.fixed_chunks and ids.shape[1] > self.chunk_size:
            raise InputError(f"chunk of {ids.shape[1]} tokens: this graph takes at most {self.chunk_size} per step")

    def step(self, ids: np.ndarray, state: StateBuffers, fetch: bool = True):
        """Run one chunk ``ids [B, C]`` (int64) after ``state``; advances ``state`` and returns the logits
        ``[B, C, V]`` (numpy when ``fetch``, else the device OrtValue)."""
        ids = np.ascontiguousarray(ids)
        self._check_chunk(ids, state)
        if self.static is not None:
            return self.static.step(ids, state, fetch)
        feeds = {"input_ids": (str(ids.dtype), list(ids.shape))}
        feeds.update({n: (_ort_dtype(v), list(v.shape())) for n, v in state.cur.items()})
        check_feeds(self.inputs, feeds)
        b, order = self.bind(ids, state)
        self.sess.run_with_iobinding(b)
        outs = dict(zip(order, b.get_outputs()))
        state.advance(outs)
        return outs["logits"].numpy() if fetch else outs["logits"]

    def bind(self, ids: np.ndarray, state: StateBuffers):
        """The IO binding of one step of a session without ``static_batch``: the chunk copied to the state's
        device, the state's buffers as inputs, the fixed-shape presents into its spare buffers, the logits and the
        growing presents into buffers onnxruntime allocates there. Returns (binding, output names in its order)."""
        b = self.sess.io_binding()
        b.bind_ortvalue_input("input_ids", state.put(ids))
        for name, value in state.cur.items():
            b.bind_ortvalue_input(name, value)
        b.bind_output("logits", state.device, state.device_id)
        order = ["logits"]
        for s in state.specs:
            if state.fixed[s.input]:
                b.bind_ortvalue_output(s.output, state.spare[s.input])
            else:
                b.bind_output(s.output, state.device, state.device_id)
            order.append(s.output)
        return b, order


def _session_device(sess) -> str:
    used = sess.get_providers()
    return "cuda" if used and used[0] == "CUDAExecutionProvider" else "cpu"


def _probe_session(providers):
    """A session of one Identity node with ``providers``: which execution provider this onnxruntime starts with
    them, without loading a graph."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", io[:1], io[1:]),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)


def _ort_dtype(value) -> str:
    t = value.data_type()
    return ORT_TYPES.get(t, t)


__all__ = ["ChunkSession", "load_manifest", "BATCH"]
