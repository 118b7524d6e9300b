"""Static sessions (exporters/runtime/static.py): batch and chunk pinned (and the past length of a full-attention
export, one pinned session per step), buffers bound once, the ping-pong sides alternating; on CPU they must give
exactly what the ordinary session gives (the CUDA-graph capture itself needs a GPU: tests/test_runtime_cuda.py and
benchmarks/gpu_export.sh check it there). Also what they refuse."""
import os

import numpy as np
import pytest

from exporters.onnx.export import export_onnx
from exporters.runtime.session import ChunkSession
from exporters.runtime.stream import greedy_generate
from exporters.verify import verify
from fwconvert.errors import InputError
from test_onnx_common import tiny_model

C, W = 8, 24


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("static")
    out = {}
    for kind in ("base", "fwl", "inplace"):
        out[kind] = export_onnx(tiny_model(kind=kind, window=W), str(root / f"{kind}-win"), chunk_size=C,
                                attention="window", window=W)
    for kind in ("base", "fwl", "inplace"):
        out[f"{kind}-full"] = export_onnx(tiny_model(kind=kind), str(root / f"{kind}-full"), chunk_size=C)
    return out


@pytest.mark.parametrize("kind", ["base", "fwl", "inplace", "base-full", "fwl-full", "inplace-full"])
def test_static_equals_dynamic_across_resets(exports, kind):
    dyn = ChunkSession(exports[kind], provider="cpu")
    sta = ChunkSession(exports[kind], provider="cpu", static_batch=2, static_context=5 * C)
    assert sta.static is not None and not sta.cuda_graph
    ids = np.random.default_rng(1).integers(0, dyn.manifest.vocab_size, (2, 5 * C))
    for steps in (5, 3, 5):  # odd: the next pass starts after the other ping-pong side; 3: a reset mid-context
        sd, ss = dyn.new_state(2), sta.new_state(2)
        for a in range(0, steps * C, C):  # 40 tokens through a window of 24: the window slides
            ld, ls = dyn.step(ids[:, a:a + C], sd), sta.step(ids[:, a:a + C], ss)
            np.testing.assert_array_equal(ld, ls)
        for key, v in sd.to_numpy().items():
            np.testing.assert_array_equal(v, ss.to_numpy()[key])
    if kind.endswith("-full"):  # one pinned session per past length, the KV buffers of each kept
        assert sorted(sta.static.sessions) == [0, 1, 2, 3, 4]
        assert [v.shape()[2] for v in sta.static.chain["past_key_values.0.key"]] == [0, C, 2 * C, 3 * C, 4 * C, 5 * C]
        with pytest.raises(InputError, match=r"holds 40 tokens of context \(static_context\)"):
            sta.step(ids[:, :C], ss)


def test_full_static_sessions_share_the_weights(exports, monkeypatch):
    """The pinned sessions of a full-attention export read one copy of the weights: changing the shared embedding
    in place changes what a pinned session computes (onnxruntime uses the given buffer, not a copy). The weights are
    allocated by onnxruntime, as on CUDA, and handed over as DLPack views (it refuses buffers it owns)."""
    from exporters.runtime import static

    monkeypatch.setattr(static, "SHARE_BYTES", 1)
    s = ChunkSession(exports["base-full"], provider="cpu", static_batch=1)
    assert s.static.sharing == "on" and s.static.sessions[0] is s.sess  # the past-0 session reads them too
    st = s.new_state(1)
    ids = np.arange(2 * C).reshape(1, -1) % s.manifest.vocab_size
    before = [s.step(ids[:, :C], st), s.step(ids[:, C:], st)]
    emb = next(n for n in s.static.weights if "embed" in n)
    value = s.static.weights[emb]
    value.update_inplace(np.zeros(value.shape(), dtype=value.numpy().dtype))
    st = s.new_state(1)
    after = [s.step(ids[:, :C], st), s.step(ids[:, C:], st)]  # past 0 and past C: both read the shared weights
    assert not np.array_equal(before[0], after[0]) and not np.array_equal(before[1], after[1])
    assert s.static.sharing == "on"
    w = ChunkSession(exports["base"], provider="cpu", static_batch=1)  # a window export: one session, its own
    assert w.static.sharing.startswith("off") and not w.static.weights


def test_static_sessions_load_the_graph_once_per_session(exports, monkeypatch):
    """A static full session opens its graph only pinned, once per past length, the first on the shared weights (no
    unpinned copy is opened first: that held a second copy of the weights at start). Where sharing fails, each
    pinned session loads its own, and the session still computes what an ordinary one does."""
    import onnxruntime as ort

    from exporters.runtime import static

    opened, real = [], ort.InferenceSession

    def counting(model, *args, **kwargs):
        if isinstance(model, str):  # a graph file (the probe and the reset graph are built in memory)
            opened.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    monkeypatch.setattr(static, "SHARE_BYTES", 1)
    sta = ChunkSession(exports["fwl-full"], provider="cpu", static_batch=1)
    assert len(opened) == 1 and sta.static.sharing == "on" and sta.static.sessions[0] is sta.sess
    dyn = ChunkSession(exports["fwl-full"], provider="cpu")
    assert len(opened) == 2
    opened.clear()

    def refuse(path, state):
        raise RuntimeError("no sharing here")

    monkeypatch.setattr(static, "shared_weights", refuse)
    own = ChunkSession(exports["fwl-full"], provider="cpu", static_batch=1)
    assert own.static.sharing == "off (RuntimeError: no sharing here)" and len(opened) == 1
    ids = np.random.default_rng(4).integers(0, dyn.manifest.vocab_size, (1, 3 * C))
    for s in (sta, own):
        sd, ss = dyn.new_state(1), s.new_state(1)
        for a in range(0, 3 * C, C):
            np.testing.assert_array_equal(dyn.step(ids[:, a:a + C], sd), s.step(ids[:, a:a + C], ss))
    assert len(opened) == 1 + 2 * 2  # then the pinned sessions at past C and 2C, of sta and of own


def test_static_full_session_checks_the_graph_against_its_manifest(exports, tmp_path):
    """The pinned past-0 session is the first this static session opens: a manifest that disagrees with the graph is
    refused there with the ordinary session's clear error."""
    import json
    import shutil

    d = tmp_path / "edited"
    shutil.copytree(exports["base-full"], d)
    man = json.loads((d / "manifest.json").read_text())
    extra = dict(man["state"][-1], key="fast_weights.x", input="past_fast_weights.x", output="present_fast_weights.x")
    man["state"].append(extra)
    man["inputs"].append(extra["input"])
    man["outputs"].append(extra["output"])
    (d / "manifest.json").write_text(json.dumps(man))
    for static in (None, 1):
        with pytest.raises(InputError, match="disagree on inputs"):
            ChunkSession(str(d), provider="cpu", static_batch=static)


def test_shared_weights_read_from_external_data(tmp_path, monkeypatch):
    """An export with its weights in model.onnx.data: the pinned sessions share them (read tensor by tensor from the
    data file) and compute exactly what an ordinary session computes."""
    from exporters.runtime import static

    out = export_onnx(tiny_model(kind="fwl"), str(tmp_path / "ext"), chunk_size=C, external_data=True)
    assert os.path.isfile(os.path.join(out, "model.onnx.data"))
    monkeypatch.setattr(static, "SHARE_BYTES", 1)
    owners, views = static.shared_weights(os.path.join(out, "model.onnx"), ChunkSession(out, provider="cpu").new_state(1))
    assert views and len(owners) == len(views)
    dyn = ChunkSession(out, provider="cpu")
    sta = ChunkSession(out, provider="cpu", static_batch=1)
    assert sta.static.sharing == "on" and set(sta.static.weights) == set(views)
    ids = np.random.default_rng(3).integers(0, dyn.manifest.vocab_size, (1, 3 * C))
    sd, ss = dyn.new_state(1), sta.new_state(1)
    for a in range(0, 3 * C, C):
        np.testing.assert_array_equal(dyn.step(ids[:, a:a + C], sd), sta.step(ids[:, a:a + C], ss))


def test_static_logits_buffer_is_reused_and_fetch_copies(exports):
    s = ChunkSession(exports["base"], provider="cpu", static_batch=1)
    st = s.new_state(1)
    ids = np.arange(2 * C).reshape(1, -1) % s.manifest.vocab_size
    first = s.step(ids[:, :C], st)  # a host copy: the next step must not change it
    keep = first.copy()
    dev = s.step(ids[:, C:], st, fetch=False)
    np.testing.assert_array_equal(first, keep)
    assert dev.shape() == [1, C, s.manifest.vocab_size]


def test_static_refusals(exports):
    s = ChunkSession(exports["fwl"], provider="cpu", static_batch=2)
    st = s.new_state(2)
    ids = np.zeros((2, C), dtype=np.int64)
    with pytest.raises(InputError, match=r"exactly \[2, 8\]"):
        s.step(ids[:, : C - 1], st)  # a short last chunk
    with pytest.raises(InputError, match="int64"):
        s.step(ids.astype(np.int32), st)
    with pytest.raises(InputError, match="static for batch 2"):
        s.new_state(3)
    other = ChunkSession(exports["fwl"], provider="cpu").new_state(2)
    with pytest.raises(InputError, match="its own state"):
        s.step(ids, other)
    with pytest.raises(InputError, match="static_batch"):
        greedy_generate(s, ids[:, :3], 2)
    with pytest.raises(InputError, match="static_context must be an integer of at least one chunk"):
        ChunkSession(exports["base-full"], provider="cpu", static_batch=1, static_context=C - 1)
    with pytest.raises(InputError, match="static session"):
        ChunkSession(exports["base"], provider="cpu", cuda_graph=True)
    with pytest.raises(InputError, match="CUDA provider"):
        ChunkSession(exports["base"], provider="cpu", static_batch=1, cuda_graph=True)
    with pytest.raises(InputError, match="positive integer"):
        ChunkSession(exports["base"], provider="cpu", static_batch=0)


def test_verify_static_passes(exports):
    report = verify(exports["inplace"], against=tiny_model(kind="inplace", window=W), chunks=5, batch=2,
                    provider="cpu", static=True)
    assert report.passed and report.chunks == 5
    report = verify(exports["fwl-full"], against=tiny_model(kind="fwl"), chunks=4, provider="cpu", static=True)
    assert report.passed and report.chunks == 4


@pytest.mark.parametrize("kind", ["base", "fwl", "inplace", "base-full", "fwl-full", "inplace-full"])
def test_pinned_graph_has_no_shape_arithmetic(exports, kind, tmp_path):
    """What CUDA-graph capture relies on: with batch and chunk (and a full-attention export's past) pinned,
    onnxruntime's optimizer folds every shape computation, so no node has to run on the host (a Memcpy node would
    make ORT refuse the capture)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # folding only, no CPU kernels
    opts.add_free_dimension_override_by_name("batch", 2)
    opts.add_free_dimension_override_by_name("chunk", C)
    if kind.endswith("-full"):
        opts.add_free_dimension_override_by_name("past", 3 * C)
    ort.InferenceSession(f"{exports[kind]}/model.onnx", opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert not {"Shape", "Size", "Range", "ConstantOfShape"} & set(ops), sorted(set(ops))
    # both attention forms (exporters/onnx/causal_attention.py): ONNX's Attention in full graphs, else MultiHeadAttention
    assert ops.count("Attention" if kind.endswith("-full") else "MultiHeadAttention") == 2


def test_cuda_provider_options():
    """fp32 graphs ask onnxruntime for the flash + unfused attention kernels only; static sessions for CUDA graphs
    and for arenas that grow by the size requested (their shapes are fixed)."""
    import onnxruntime as ort

    from exporters.runtime.session import FP32_SDPA_KERNELS, _providers

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider")
    (name, opts), _ = _providers("cuda", False, cuda_graph=True, fp32=True, fixed_shapes=True)
    assert name == "CUDAExecutionProvider" and opts == {"use_tf32": "0", "sdpa_kernel": FP32_SDPA_KERNELS,
                                                        "enable_cuda_graph": "1",
                                                        "arena_extend_strategy": "kSameAsRequested"}
    (_, opts), _ = _providers("cuda", True)
    assert opts == {"use_tf32": "1"}
    assert _providers("cpu", False, fp32=True) == ["CPUExecutionProvider"]


def test_static_cpu_sessions_do_not_prepack_weights(exports):
    """A static session on the CPU provider opens its pinned sessions without onnxruntime's weight prepacking (a
    copy of every MatMul weight per session otherwise: benchmarks/static_cpu_memory.py); an ordinary one keeps it."""
    def prepacking_off(sess):
        opts = sess.get_session_options()
        try:
            return opts.get_session_config_entry("session.disable_prepacking") == "1"
        except RuntimeError:  # onnxruntime raises for a key never set
            return False

    static = ChunkSession(exports["base-full"], provider="cpu", static_batch=1)
    state = static.new_state(1)
    static.step(np.zeros((1, C), dtype=np.int64), state)
    static.step(np.zeros((1, C), dtype=np.int64), state)
    assert len(static.static.sessions) == 2 and all(prepacking_off(s) for s in static.static.sessions.values())
    window = ChunkSession(exports["base"], provider="cpu", static_batch=1)
    assert prepacking_off(window.sess)
    assert not prepacking_off(ChunkSession(exports["base-full"], provider="cpu").sess)


def test_only_static_sessions_ask_for_exact_arenas(exports, monkeypatch):
    """ChunkSession passes fixed_shapes to _providers for static sessions only (ordinary sessions' shapes vary, so
    onnxruntime's power-of-two growth stays theirs)."""
    import exporters.runtime.session as session_module

    seen = []
    real = session_module._providers

    def spy(*a, **k):
        seen.append(k.get("fixed_shapes"))
        return real(*a, **k)

    monkeypatch.setattr(session_module, "_providers", spy)
    ChunkSession(exports["base-full"], provider="cpu")
    ChunkSession(exports["base-full"], provider="cpu", static_batch=1)
    assert seen == [False, True]


def test_verify_static_on_a_document_compares_its_full_chunks(exports):
    model = tiny_model(kind="base", window=W)
    report = verify(exports["base"], against=model, tokens=[list(range(2 * C + 3))], static=True, chunks=16)
    assert report.passed and report.chunks == 2  # the 3-token tail is not run through the static session
    with pytest.raises(InputError, match="full chunks"):
        verify(exports["base"], against=model, tokens=[list(range(C - 1))], static=True)


def test_tf32_policy_by_graph_dtype():
    """fp32 graphs verify against PyTorch fp32 with TF32 off; fp16 graphs let their fp32 parts use TF32."""
    from exporters.runtime.session import tf32_policy

    assert tf32_policy("fp32") is False
    assert tf32_policy("fp16") is True


def test_reset_writes_nonzero_initial_values_from_the_device(exports, tmp_path):
    """A state that starts from an array (not zeros) is reset to it after steps, on both ping-pong sides, and the
    static session keeps its initial values on the device: removing the array file after the first reset changes
    nothing (the ordinary session still reads it per state, and refuses without it)."""
    import json
    import shutil

    d = tmp_path / "fwl"
    shutil.copytree(exports["fwl"], d)
    man = json.loads((d / "manifest.json").read_text())
    spec = next(s for s in man["state"] if s["key"] == "fast_weights.fwl.pending_x")
    spec["init"] = {"kind": "array", "file": "initial_state.npz", "array": "x"}
    (d / "manifest.json").write_text(json.dumps(man))
    start = np.linspace(-1.0, 1.0, spec["shape"][1], dtype=np.float32)[None]
    np.savez(d / "initial_state.npz", x=start)
    s = ChunkSession(str(d), provider="cpu", static_batch=2)
    st = s.new_state(2)
    np.testing.assert_array_equal(st.to_numpy()["fast_weights.fwl.pending_x"], np.repeat(start, 2, 0))
    os.remove(d / "initial_state.npz")
    ids = np.random.default_rng(4).integers(0, s.manifest.vocab_size, (2, 3 * C))
    for _ in range(2):  # 3 steps (odd): the second reset writes into the other side's buffers
        for a in range(0, ids.shape[1], C):
            s.step(ids[:, a:a + C], st)
        assert not np.array_equal(st.to_numpy()["fast_weights.fwl.pending_x"], np.repeat(start, 2, 0))
        st = s.new_state(2)
        got = st.to_numpy()
        np.testing.assert_array_equal(got["fast_weights.fwl.pending_x"], np.repeat(start, 2, 0))
        assert not got["past_key_values.0.key"].any() and got["position"].tolist() == [0, 0]
    with pytest.raises(InputError, match="missing or not a regular file"):
        ChunkSession(str(d), provider="cpu").new_state(1)
