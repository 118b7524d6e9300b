"""Static steps: one batch size, full chunks, every buffer allocated once, and on CUDA captured CUDA graphs.

Pinning the free axes (``batch``, ``chunk``, and ``past`` where the state grows) when a session is created lets
onnxruntime fold away all shape arithmetic, so no node needs the host and the step can be captured as a CUDA graph
(ORT refuses capture while a Memcpy node remains). A captured graph replays fixed device addresses, so no buffer
ever moves.

A window-attention export (``--attention window``) carries only fixed-shape state: one session, two sides.

    side 0:  input_ids, state A  --graph 0-->  logits, state B
    side 1:  input_ids, state B  --graph 1-->  logits, state A      (gpu_graph_id 0 / 1, one capture each)

A full-attention export's KV cache grows by C per step, so its step k has its own shapes: one session per past
length k·C, opened at the first document that gets that far, and a chain of KV buffers, one per past length, that
step k reads (past k·C) and writes (past (k+1)·C) in place of a Concat's fresh allocation. The fixed-shape state
(position, fast weights) ping-pongs as above; step k is always on side k mod 2, because a reset puts the state back
on side 0. ``static_context`` bounds the chain (default 8192 tokens). Memory, for n = static_context / C steps: the
KV buffers of every past length, ≈ (n + 1) / 2 times one full cache; one copy of the weights, which the pinned
sessions share, the past-0 one included (``shared_weights``; should onnxruntime refuse them, each loads its own
copy, and ``sharing`` says so); and each captured graph keeps its own activation memory.

Each step copies the chunk into the one ``input_ids`` buffer (``OrtValue.update_inplace``), runs the binding of
(step, side), and advances. The logits buffer is reused: a step's logits are valid until the next step. One set of
state buffers per session: ``reset`` writes the initial values into side 0 in place, on the device, with a small
graph of Identity copies from device-resident initial values (made once; one shared zero buffer per shape),
instead of uploading every document's initial state from the host (tens of MB for SmolLM2's window caches).
numpy + onnxruntime (+ onnx to build that copy graph and to read the weights that the pinned sessions share).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

from fwconvert.errors import InputError

from ..onnx.io_spec import BATCH, PAST
from .state import StateBuffers, initial_arrays

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
DEFAULT_STATIC_CONTEXT = 8192  # tokens a static session of a full-attention export holds unless told otherwise
SHARE_BYTES = 1 << 16  # weights at least this large are shared between the pinned sessions (not shape constants)


class StaticSteps:
    """The fixed buffers, pinned sessions and IO bindings of a session created with ``static_batch``."""

    def __init__(self, session, batch: int, cuda_graph: bool, context: Optional[int] = None):
        import onnxruntime as ort

        self._ort = ort
        self.session, self.batch, self.cuda_graph = session, batch, cuda_graph
        m = session.manifest
        self.state = StateBuffers(m, batch, session.folder, session.device)
        fixed = [s for s in m.state if self.state.fixed[s.input]]
        self.growing = [s for s in m.state if not self.state.fixed[s.input]]
        self.sides = ({s.input: self.state.cur[s.input] for s in fixed},
                      {s.input: self.state.spare[s.input] for s in fixed})
        self.chain = {s.input: [self.state.cur[s.input]] for s in self.growing}  # [k]: the state at past k·C
        c = session.chunk_size
        self.max_steps = (context or DEFAULT_STATIC_CONTEXT) // c if self.growing else None
        self.steps_done = 0
        self.weights, self._weight_refs, self.sharing = {}, None, "off (a window export has one session)"
        if self.growing:  # the ChunkSession left its session to be opened here (pinned, on the shared weights)
            session.sess = self._open_first()
            session.check_graph()
        self.sessions = {0: session.sess}  # step k's session (full attention); 0 serves every step of a window
        self.ids = self.state.put(np.zeros((batch, c), dtype=np.int64))
        out = next(o for o in session.sess.get_outputs() if o.name == "logits")
        dtype = _NP.get(out.type)
        if dtype is None:
            raise InputError(f"{session.path}: logits of type {out.type} are not supported by a static session")
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([batch, c, m.vocab_size], dtype, session.device, 0)
        self.initial = None  # the device-side reset, made at the first reset
        self.bindings: Dict = {}

    def _open_first(self):
        """The past-0 session, after one copy of the weights is put on the device for it and every later pinned
        session, so a static full session holds the weights once (nothing else loaded them). Sharing saves memory
        only: where it fails, each session loads its own copy and ``sharing`` says why."""
        try:
            owners, weights = shared_weights(self.session.path, self.state)
            # kept for the sessions' lifetime (onnxruntime holds pointers to them, not references)
            self._weight_refs = (owners, dict(weights))
            first = self.session.open_pinned(0, weights)
        except Exception as e:  # noqa: BLE001 - see above
            self.weights, self._weight_refs, self.sharing = {}, None, f"off ({type(e).__name__}: {e})"
            return self.session.open_pinned(0)
        self.weights, self.sharing = weights, "on"
        return first

    def _session(self, k: int):
        if k not in self.sessions:
            try:
                self.sessions[k] = self.session.open_pinned(k * self.session.chunk_size, self.weights)
            except (InputError, RuntimeError):
                if not self.weights:
                    raise
                # an onnxruntime that refuses the shared weights: each pinned session loads its own copy
                self.weights, self.sharing = {}, "off (onnxruntime refused the shared weights)"
                self.sessions[k] = self.session.open_pinned(k * self.session.chunk_size)
        return self.sessions[k]

    def _binding(self, k: int, side: int):
        """(session, IO binding, run options) of step ``k`` (0 for every step of a window export) on ``side``."""
        if (k, side) in self.bindings:
            return self.bindings[k, side]
        sess = self._session(k)
        b = sess.io_binding()
        b.bind_ortvalue_input("input_ids", self.ids)
        src, dst = self.sides[side], self.sides[1 - side]
        for s in self.session.manifest.state:
            if s.input in src:
                b.bind_ortvalue_input(s.input, src[s.input])
                b.bind_ortvalue_output(s.output, dst[s.input])
            else:
                chain = self.chain[s.input]
                if len(chain) == k + 1:
                    shape = [self.batch if d == BATCH else (k + 1) * self.session.chunk_size if d == PAST else int(d)
                             for d in s.shape]
                    chain.append(self._ort.OrtValue.ortvalue_from_shape_and_type(
                        shape, np.dtype(s.dtype), self.session.device, self.state.device_id))
                b.bind_ortvalue_input(s.input, chain[k])
                b.bind_ortvalue_output(s.output, chain[k + 1])
        b.bind_ortvalue_output("logits", self.logits)
        opt = self._ort.RunOptions()
        if self.cuda_graph:
            opt.add_run_config_entry("gpu_graph_id", str(side))
        self.bindings[k, side] = (sess, b, opt)
        return self.bindings[k, side]

    def reset(self, batch: int) -> StateBuffers:
        """The session's state, set back to the initial values (in place: the captured addresses stay), on side 0."""
        if batch != self.batch:
            raise InputError(f"this session is static for batch {self.batch}; asked for a state of batch {batch}")
        for name in self.sides[0]:
            self.state.cur[name], self.state.spare[name] = self.sides[0][name], self.sides[1][name]
        for name, chain in self.chain.items():
            self.state.cur[name] = chain[0]
        self.steps_done = 0
        if self.initial is None:
            self.initial = InitialCopy(self.session, self.state, list(self.sides[0]))
        self.initial.write_into(self.state.cur)
        return self.state

    def step(self, ids: np.ndarray, state: StateBuffers, fetch: bool):
        if state is not self.state:
            raise InputError("a static session runs only on its own state (from session.new_state)")
        c = self.session.chunk_size
        if ids.dtype != np.int64:
            raise InputError(f"input 'input_ids': expected int64 token ids, got {ids.dtype}")
        if ids.shape != (self.batch, c):
            raise InputError(f"input 'input_ids': this session is static for chunks of exactly [{self.batch}, {c}] "
                             f"tokens, got {list(ids.shape)} (pad the last chunk, or use a session without static_batch)")
        k = 0
        if self.growing:
            k = self.steps_done
            if k >= self.max_steps:
                raise InputError(f"this static session holds {self.max_steps * c} tokens of context (static_context) "
                                 f"and the document is past them: open it with a larger static_context, or export "
                                 f"with --attention window for documents of any length")
        side = 0 if state.cur["position"] is self.sides[0]["position"] else 1
        self.ids.update_inplace(ids)
        sess, b, opt = self._binding(k, side)
        sess.run_with_iobinding(b, opt)
        self.steps_done += 1
        state.advance({s.output: self.chain[s.input][k + 1] for s in self.growing})
        if not fetch:
            return self.logits
        host = self.logits.numpy()  # on the CPU provider a view of the reused buffer: copy it
        return host.copy() if self.session.device == "cpu" else host


def shared_weights(path: str, state: StateBuffers):
    """The graph's float initializers of at least SHARE_BYTES, once on the state's device, for every pinned session
    (``SessionOptions.add_initializer``), which onnxruntime then uses in place instead of loading its own copy (where
    its plan puts the weight on that device; elsewhere it keeps its own).

    onnxruntime takes only a buffer its caller owns: an OrtValue it allocated itself is refused ("Buffer containing
    the initializer must be owned by the user", ORT 1.31, on CUDA and CPU alike), and its Python API allocates every
    device OrtValue itself. So each weight is allocated by onnxruntime (the owner, kept alive here) and handed over
    as a DLPack view of the same memory, which does not own its buffer. Returns (owners, name -> view).

    Weights in an external data file are read one at a time (the host holds one weight, not a second copy of the
    model); small and non-float initializers are not read at all."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(path, load_external_data=False)
    base = os.path.dirname(os.path.abspath(path))
    owners, views = [], {}
    for t in model.graph.initializer:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        if dtype.kind != "f" or int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize < SHARE_BYTES:
            continue
        arr = numpy_helper.to_array(t, base)  # reads this tensor's bytes from the external file, if it has one
        owner = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), arr.dtype, state.device, state.device_id)
        owner.update_inplace(np.ascontiguousarray(arr))
        owners.append(owner)
        views[t.name] = ort.OrtValue.from_dlpack(owner)
        t.ClearField("raw_data")  # an inline weight's bytes go once uploaded
    return owners, views


class InitialCopy:
    """The initial state on the device, and an onnxruntime session of Identity nodes that copies it into a set of
    state buffers (``write_into``): a document's reset without a host upload. States whose initial value is zeros
    share one device buffer per shape and dtype. ``names``: only these states (input names; default all)."""

    def __init__(self, session, state: StateBuffers, names=None):
        import onnxruntime as ort
        from onnx import helper

        specs = [s for s in state.specs if names is None or s.input in names]
        arrays = initial_arrays(specs, state.batch, session.folder)
        sources, self.feeds, self.names = {}, {}, []
        nodes, inputs, outputs = [], [], []
        for spec in specs:
            arr = arrays[spec.input]
            info = (helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
            key = ("zeros", arr.shape, arr.dtype.str) if spec.init.get("kind") == "zeros" else ("value", spec.input)
            if key not in sources:
                sources[key] = f"init_{len(sources)}"
                self.feeds[sources[key]] = state.put(arr)
                inputs.append(helper.make_tensor_value_info(sources[key], *info))
            out = f"state_{len(self.names)}"
            nodes.append(helper.make_node("Identity", [sources[key]], [out]))
            outputs.append(helper.make_tensor_value_info(out, *info))
            self.names.append(spec.input)
        graph = helper.make_graph(nodes, "initial_state_copy", inputs, outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.sess = ort.InferenceSession(model.SerializeToString(), opts, providers=session.sess.get_providers())
        self._bound = (None, None, None)  # (the output buffers' ids, their binding, the buffers)

    def write_into(self, buffers) -> None:
        """Copy the initial values into ``buffers`` (input name -> OrtValue of the state's shape), on their device.
        The binding is kept while the same buffers come back (a static session resets into side 0 every time)."""
        key = tuple(id(buffers[name]) for name in self.names)
        if self._bound[0] != key:
            b = self.sess.io_binding()
            for name, value in self.feeds.items():
                b.bind_ortvalue_input(name, value)
            for i, name in enumerate(self.names):
                b.bind_ortvalue_output(f"state_{i}", buffers[name])
            self._bound = (key, b, [buffers[name] for name in self.names])  # the buffers, kept alive with their ids
        self.sess.run_with_iobinding(self._bound[1])


def check_static(batch: Optional[int], context: Optional[int] = None, chunk: int = 1) -> None:
    """InputError unless a static session can be made for this batch and context (tokens); any export can."""
    if batch is None or isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"static_batch must be a positive integer, got {batch!r}")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < chunk):
        raise InputError(f"static_context must be an integer of at least one chunk ({chunk} tokens), got {context!r}")


__all__ = ["DEFAULT_STATIC_CONTEXT", "InitialCopy", "StaticSteps", "check_static", "shared_weights"]
