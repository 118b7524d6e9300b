"""Static steps: one batch size, full chunks, every buffer allocated once, and on CUDA two captured CUDA graphs.

A window-attention export (``--attention window``) carries only fixed-shape state. Pinning its two free axes
(``batch``, ``chunk``) when the session is created lets onnxruntime fold away all shape arithmetic, so no node
needs the host and the step can be captured as a CUDA graph (ORT refuses capture while a Memcpy node remains).
A captured graph replays fixed device addresses, so the buffers never move:

    side 0:  input_ids, state A  --graph 0-->  logits, state B
    side 1:  input_ids, state B  --graph 1-->  logits, state A      (gpu_graph_id 0 / 1, one capture each)

Each step copies the chunk into the one ``input_ids`` buffer (``OrtValue.update_inplace``), runs the side whose
inputs hold the current state, and swaps. The logits buffer is reused: a step's logits are valid until the next
step. One set of state buffers per session: ``reset`` writes the initial values into them in place, on the device,
with a small graph of Identity copies from device-resident initial values (made once; one shared zero buffer per
shape), instead of uploading every document's initial state from the host (tens of MB for SmolLM2's window caches).
numpy + onnxruntime (+ onnx's helper to build that copy graph).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from fwconvert.errors import InputError

from .state import StateBuffers, initial_arrays

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class StaticSteps:
    """The fixed buffers and the two IO bindings of a session created with ``static_batch``."""

    def __init__(self, session, batch: int, cuda_graph: bool):
        import onnxruntime as ort

        self.session, self.batch, self.cuda_graph = session, batch, cuda_graph
        m = session.manifest
        self.state = StateBuffers(m, batch, session.folder, session.device)
        self.side0 = next(iter(self.state.cur.values()))  # a buffer graph 0 reads (and graph 1 writes)
        self.ids = self.state._put(np.zeros((batch, session.chunk_size), dtype=np.int64))
        out = next(o for o in session.sess.get_outputs() if o.name == "logits")
        dtype = _NP.get(out.type)
        if dtype is None:
            raise InputError(f"{session.path}: logits of type {out.type} are not supported by a static session")
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([batch, session.chunk_size, m.vocab_size], dtype,
                                                                session.device, 0)
        self.initial = None  # the device-side reset, made at the first reset
        self.bindings, self.options = [], []
        for side in (0, 1):
            b = session.sess.io_binding()
            b.bind_ortvalue_input("input_ids", self.ids)
            src, dst = (self.state.cur, self.state.spare) if side == 0 else (self.state.spare, self.state.cur)
            for s in m.state:
                b.bind_ortvalue_input(s.input, src[s.input])
                b.bind_ortvalue_output(s.output, dst[s.input])
            b.bind_ortvalue_output("logits", self.logits)
            self.bindings.append(b)
            opt = ort.RunOptions()
            if cuda_graph:
                opt.add_run_config_entry("gpu_graph_id", str(side))
            self.options.append(opt)

    def reset(self, batch: int) -> StateBuffers:
        """The session's state, set back to the initial values (in place: the captured addresses stay)."""
        if batch != self.batch:
            raise InputError(f"this session is static for batch {self.batch}; asked for a state of batch {batch}")
        if self.initial is None:
            self.initial = InitialCopy(self.session, self.state)
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
        self.ids.update_inplace(ids)
        side = 0 if next(iter(state.cur.values())) is self.side0 else 1
        self.session.sess.run_with_iobinding(self.bindings[side], self.options[side])
        state.advance({})
        if not fetch:
            return self.logits
        host = self.logits.numpy()  # on the CPU provider a view of the reused buffer: copy it
        return host.copy() if self.session.device == "cpu" else host


class InitialCopy:
    """The initial state on the device, and an onnxruntime session of Identity nodes that copies it into a set of
    state buffers (``write_into``): a document's reset without a host upload. States whose initial value is zeros
    share one device buffer per shape and dtype."""

    def __init__(self, session, state: StateBuffers):
        import onnxruntime as ort
        from onnx import helper

        arrays = initial_arrays(state.specs, state.batch, session.folder)
        sources, self.feeds, self.names = {}, {}, []
        nodes, inputs, outputs = [], [], []
        for spec in state.specs:
            arr = arrays[spec.input]
            info = (helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
            key = ("zeros", arr.shape, arr.dtype.str) if spec.init.get("kind") == "zeros" else ("value", spec.input)
            if key not in sources:
                sources[key] = f"init_{len(sources)}"
                self.feeds[sources[key]] = state._put(arr)
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

    def write_into(self, buffers) -> None:
        """Copy the initial values into ``buffers`` (input name -> OrtValue of the state's shape), on their device."""
        b = self.sess.io_binding()
        for name, value in self.feeds.items():
            b.bind_ortvalue_input(name, value)
        for i, name in enumerate(self.names):
            b.bind_ortvalue_output(f"state_{i}", buffers[name])
        self.sess.run_with_iobinding(b)


def check_static(manifest, batch: Optional[int]) -> None:
    """InputError unless a static session can be made for this export and batch."""
    if batch is None or isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"static_batch must be a positive integer, got {batch!r}")
    moving = [s.input for s in manifest.state if "past" in s.shape]
    if manifest.attention != "window" or moving:
        raise InputError("a static session (CUDA graphs) needs fixed-shape state: export with --attention window "
                         f"(this export has attention {manifest.attention!r}"
                         + (f", growing state {moving[:2]}" if moving else "") + ")")


__all__ = ["InitialCopy", "StaticSteps", "check_static"]
