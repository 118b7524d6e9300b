"""Runtime on a hand-made chunk-step graph: ping-pong state, streaming, and hostile/broken folders
(reliability tests 35-37) refused with InputError before onnxruntime opens them. No export: fast."""
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.onnx.io_spec import Manifest, StateSpec, chunk_rule
from exporters.runtime.session import ChunkSession
from exporters.runtime.stream import greedy_generate, token_losses
from fwconvert.cli.main import main
from fwconvert.errors import InputError

V, S = 8, 4


def _graph(ir_version=10):
    """logits = onehot(ids) @ W + s, present s = s + 1, next_position = position + C."""
    w = numpy_helper.from_array(np.arange(V * V, dtype=np.float32).reshape(V, V) / 10, "W")
    nodes = [
        helper.make_node("Gather", ["W", "input_ids"], ["emb"]),  # [B, C, V]
        helper.make_node("Shape", ["input_ids"], ["shp"]),
        helper.make_node("Slice", ["shp", "one", "two"], ["clen"]),
        helper.make_node("Add", ["position", "clen"], ["next_position"]),
        helper.make_node("Add", ["past_fast_weights.m.s", "onef"], ["present_fast_weights.m.s"]),
        helper.make_node("ReduceSum", ["past_fast_weights.m.s", "one"], ["ssum"], keepdims=1),  # [B, 1]
        helper.make_node("Unsqueeze", ["ssum", "one"], ["ssum3"]),  # [B, 1, 1]
        helper.make_node("Add", ["emb", "ssum3"], ["logits"]),
    ]
    inits = [w, numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array(1.0, np.float32), "onef")]
    g = helper.make_graph(nodes, "step", [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "chunk"]),
        helper.make_tensor_value_info("position", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("past_fast_weights.m.s", TensorProto.FLOAT, ["batch", S]),
    ], [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "chunk", V]),
        helper.make_tensor_value_info("next_position", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("present_fast_weights.m.s", TensorProto.FLOAT, ["batch", S]),
    ], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = ir_version
    return m


def _manifest(dtype="float32", shape=("batch", S), extra_state=()):
    state = [StateSpec("position", "position", "next_position", ["batch"], "int64", {"kind": "zeros"}),
             StateSpec("fast_weights.m.s", "past_fast_weights.m.s", "present_fast_weights.m.s", list(shape), dtype,
                       {"kind": "zeros"})] + list(extra_state)
    return Manifest(graph="model.onnx", vocab_size=V, dtype="fp32", attention="full", window=None,
                    chunking=chunk_rule(3, False), state=state, inputs=["input_ids"] + [s.input for s in state],
                    outputs=["logits"] + [s.output for s in state])


def _folder(tmp_path, model=None, manifest=None, external=False, name="exp"):
    d = tmp_path / name
    d.mkdir()
    model = model if model is not None else _graph()
    if external:
        onnx.save_model(model, str(d / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=64)
    else:
        onnx.save_model(model, str(d / "model.onnx"))
    (d / "manifest.json").write_text(json.dumps((manifest or _manifest()).to_dict()))
    return d


def _set_external(d, **changes):
    """Rewrite W's external_data entries (key -> value; value None removes the key)."""
    m = onnx.load(str(d / "model.onnx"), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == "W")
    entries = {e.key: e.value for e in t.external_data}
    for k, v in changes.items():
        if v is None:
            entries.pop(k, None)
        else:
            entries[k] = v
    del t.external_data[:]
    for k, v in entries.items():
        t.external_data.add(key=k, value=v)
    with open(d / "model.onnx", "wb") as f:
        f.write(m.SerializeToString())


def test_ping_pong_state_and_streaming(tmp_path):
    s = ChunkSession(str(_folder(tmp_path, external=True)), provider="cpu")
    st = s.new_state(2)
    ids = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    for k in range(5):
        logits = s.step(ids[:, : 1 + k % 3], st)
        assert np.allclose(logits[0, 0], np.arange(V * V).reshape(V, V)[1] / 10 + S * k)
    assert st.to_numpy()["fast_weights.m.s"].tolist() == [[5.0] * S] * 2
    assert st.position().tolist() == [1 + 2 + 3 + 1 + 2] * 2
    losses = token_losses(s, np.arange(7, dtype=np.int64)[None] % V)
    assert losses.shape == (1, 6) and np.isfinite(losses).all()
    assert greedy_generate(s, np.array([[1, 2]]), 3).shape == (1, 3)



def test_provider_auto_falls_back_quietly_and_cuda_refuses_to(tmp_path, capfd):
    """Where onnxruntime cannot start CUDA (onnxruntime-gpu without CUDA libraries or a GPU), ``auto`` runs on the
    CPU without onnxruntime's error log on stderr (provider_note says so), and ``cuda`` refuses to start (exit 5)
    instead of running on the CPU."""
    from fwconvert.errors import ResourceError

    d = str(_folder(tmp_path))
    capfd.readouterr()
    s = ChunkSession(d, provider="auto")
    if s.device == "cuda":
        pytest.skip("CUDA works here")
    assert s.provider_note.startswith("CPU execution provider") and capfd.readouterr().err == ""
    with pytest.raises((ResourceError, InputError), match="--provider cuda: "):  # InputError: no CUDA provider at all
        ChunkSession(d, provider="cuda")


def test_reset_per_document(tmp_path):
    s = ChunkSession(str(_folder(tmp_path)), provider="cpu")
    a = token_losses(s, np.array([[1, 2, 3, 4, 5]]))
    b = token_losses(s, np.array([[1, 2, 3, 4, 5]]))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("location", ["../x", "/etc/passwd", "sub/../../x", "sub/x"])
def test_external_location_outside_refused(tmp_path, location):
    d = _folder(tmp_path, external=True)
    _set_external(d, location=location)
    with pytest.raises(InputError, match="not a plain file name"):
        ChunkSession(str(d), provider="cpu")


def test_symlink_and_hardlink_refused(tmp_path):
    d = _folder(tmp_path, external=True)
    outside = tmp_path / "outside.data"
    os.rename(d / "model.onnx.data", outside)
    os.symlink(outside, d / "model.onnx.data")
    with pytest.raises(InputError, match="symbolic link"):
        ChunkSession(str(d), provider="cpu")
    os.remove(d / "model.onnx.data")
    os.link(outside, d / "model.onnx.data")
    with pytest.raises(InputError, match="hard-linked"):
        ChunkSession(str(d), provider="cpu")


@pytest.mark.parametrize("changes,match", [
    ({"offset": "1000000"}, "past the end"),
    ({"length": "999999999"}, "past the end"),
    ({"length": "12"}, "does not match its shape"),
    ({"offset": "-4"}, "past the end"),
    ({"basepath": "/tmp"}, "unknown external_data keys"),
    ({"location": None}, "without a location"),
])
def test_external_entries_refused(tmp_path, changes, match):
    d = _folder(tmp_path, external=True)
    _set_external(d, **changes)
    with pytest.raises(InputError, match=match):
        ChunkSession(str(d), provider="cpu")


@pytest.mark.parametrize("content,match", [(b"", "empty file"), (b"\xff\xfe\x07garbage\x00" * 10, "not a valid ONNX")])
def test_garbage_graph_refused(tmp_path, content, match):
    d = _folder(tmp_path)
    (d / "model.onnx").write_bytes(content)
    with pytest.raises(InputError, match=match):
        ChunkSession(str(d), provider="cpu")


def test_fifo_graph_never_opened(tmp_path):
    d = _folder(tmp_path)
    os.remove(d / "model.onnx")
    os.mkfifo(d / "model.onnx")  # opening it would block: the test would time out
    with pytest.raises(InputError, match="not a regular file"):
        ChunkSession(str(d), provider="cpu")


def test_missing_manifest_and_new_ir_refused(tmp_path):
    d = _folder(tmp_path)
    os.remove(d / "manifest.json")
    with pytest.raises(InputError, match="no manifest.json"):
        ChunkSession(str(d), provider="cpu")
    d2 = _folder(tmp_path, model=_graph(ir_version=14), name="ir14")
    with pytest.raises(InputError, match=r"IR version 14 is newer than onnxruntime .* <= 13"):
        ChunkSession(str(d2), provider="cpu")


@pytest.mark.parametrize("manifest,match", [
    (_manifest(dtype="float64"), r"input 'past_fast_weights.m.s': expected float32\[batch,4\], the manifest declares float64"),
    (_manifest(shape=("batch", S, 1)), r"expected float32\[batch,4\]"),
    (_manifest(shape=("batch", S + 1)), r"expected float32\[batch,4\], the manifest declares float32\[batch,5\]"),
    (_manifest(extra_state=[StateSpec("fast_weights.x", "past_fast_weights.x", "present_fast_weights.x", ["batch"],
                                      "float32", {"kind": "zeros"})]), "disagree on inputs"),
])
def test_manifest_graph_mismatch_refused(tmp_path, manifest, match):
    d = _folder(tmp_path, manifest=manifest)
    with pytest.raises(InputError, match=match):
        ChunkSession(str(d), provider="cpu")


def test_missing_state_input_refused(tmp_path):
    m = _manifest()
    m.state = m.state[:1]
    d = _folder(tmp_path, manifest=m)
    with pytest.raises(InputError, match="disagree on inputs"):
        ChunkSession(str(d), provider="cpu")


def test_bad_chunk_refused(tmp_path):
    s = ChunkSession(str(_folder(tmp_path)), provider="cpu")
    st = s.new_state(1)
    with pytest.raises(InputError, match=r"input 'input_ids': expected int64\[1,chunk>=1\], got int64\[2,3\]"):
        s.step(np.zeros((2, 3), np.int64), st)
    with pytest.raises(InputError, match=r"token ids must lie in \[0, 8\)"):
        s.step(np.full((1, 2), V, np.int64), st)
    with pytest.raises(InputError, match=r"input 'input_ids': expected int64\[batch,chunk\], got float64\[1,2\]"):
        s.step(np.zeros((1, 2), np.float64), st)


def test_cli_verify_hostile_exit_3(tmp_path, capsys):
    d = _folder(tmp_path, external=True)
    _set_external(d, location="../x")
    with pytest.raises(SystemExit) as e:
        main(["verify", str(d)])
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert err.startswith("Error:") and "not a plain file name" in err and "Traceback" not in err


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(chunking={}), "chunk_size must be positive"),
    (lambda d: d.update(graph="../model.onnx"), "plain file name"),
    (lambda d: d.update(surprise=1), "not a valid manifest"),
    (lambda d: d["state"][1].update(shape=[4, 4]), "needs a 'batch' axis"),
    (lambda d: d.update(state=[d["state"][1]]), "no 'position' state"),
])
def test_malformed_manifest_refused(tmp_path, edit, match):
    d = _folder(tmp_path)
    man = json.loads((d / "manifest.json").read_text())
    edit(man)
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(InputError, match=match):
        ChunkSession(str(d), provider="cpu")


def test_symlinked_manifest_refused(tmp_path):
    d = _folder(tmp_path)
    os.rename(d / "manifest.json", tmp_path / "elsewhere.json")
    os.symlink(tmp_path / "elsewhere.json", d / "manifest.json")
    with pytest.raises(InputError, match="symbolic link"):
        ChunkSession(str(d), provider="cpu")


def test_initial_value_from_array_file(tmp_path):
    init = {"kind": "array", "file": "initial_state.npz", "array": "fast_weights.m.s"}
    m = _manifest()
    m.state[1].init = init
    d = _folder(tmp_path, manifest=m)
    np.savez(d / "initial_state.npz", **{"fast_weights.m.s": np.full((1, S), 2.0, np.float32)})
    s = ChunkSession(str(d), provider="cpu")
    assert s.new_state(3).to_numpy()["fast_weights.m.s"].tolist() == [[2.0] * S] * 3
    os.remove(d / "initial_state.npz")
    with pytest.raises(InputError, match="missing or not a regular file"):
        s.new_state(1)


def test_token_nll_is_cross_entropy_in_float64():
    """The runtime's per-token loss (used by `run` and by verify's perplexity) equals torch's float64 cross-entropy,
    for fp16 and fp32 logits with a batch axis, including logits far from zero. Within 2e-7 nats: token_nll takes
    its exponentials in float32 (each within ~1e-7 relative of float64; summed in float64), which halves its host
    time on fp16 chunks (stream.py::token_nll); it was 1e-9 with float64 exponentials."""
    import torch

    from exporters.runtime.stream import token_nll

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float16):
        logits = (rng.standard_normal((2, 7, 301)) * 20 + 500).astype(dtype)
        targets = rng.integers(0, 301, (2, 7))
        want = torch.nn.functional.cross_entropy(torch.from_numpy(logits.astype(np.float64)).reshape(-1, 301),
                                                 torch.from_numpy(targets).reshape(-1), reduction="none")
        got = token_nll(logits, targets)
        assert got.dtype == np.float64 and got.shape == (2, 7)
        np.testing.assert_allclose(got.reshape(-1), want.numpy(), rtol=0, atol=2e-7)
