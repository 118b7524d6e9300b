"""Window mode (fixed-size KV state) against the torch window model, and a perturbed graph failing verify
(exit 6, reliability 38). Exported once from a saved tiny llama checkpoint."""
import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import fwconvert
from exporters.onnx.export import export_onnx
from exporters.runtime.session import ChunkSession
from exporters.verify import verify
from fwconvert.cli.main import main
from fwconvert.config import TOLERANCES
from fwconvert.errors import InputError
from tiny import make_hf_model, rel_err, save_checkpoint

TOL = TOLERANCES["ort_fp32_vs_torch_fp32"].rel
W = 6


@pytest.fixture(scope="module")
def window_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("win")
    src = save_checkpoint(make_hf_model("llama", seed=3), str(root / "src"))
    out = export_onnx(src, str(root / "onnx"), chunk_size=4, attention="window", window=W, sinks=0)  # plain window
    return src, out


@torch.no_grad()
def test_window_matches_torch_window_model(window_export):
    src, out = window_export
    model = fwconvert.load(src, window=W)
    s = ChunkSession(out, provider="cpu")
    assert s.manifest.attention == "window" and s.manifest.window == W
    ids = torch.randint(0, 256, (2, 41), generator=torch.Generator().manual_seed(7))
    st, tst, a = s.new_state(2), model.init_state(2), 0
    for k, n in enumerate([1, 3, 4, 1, 2, 4, 4, 4, 1, 1, 4, 4, 4, 4]):
        chunk = ids[:, a:a + n]
        got = s.step(chunk.numpy(), st)
        ref, tst = model.step(chunk, tst)
        assert rel_err(torch.from_numpy(got), ref) <= TOL, k
        assert st.to_numpy()["past_key_values.1.value"].shape == (2, 2, W, 16)  # constant memory
        a += n
    assert a == 41
    # the window really drops old tokens: changing token 0 leaves the last logits unchanged
    ids2 = ids.clone()
    ids2[:, 0] = (ids2[:, 0] + 1) % 256
    st2 = s.new_state(2)
    for b in range(0, 41, 4):
        last2 = s.step(ids2[:, b:b + 4].numpy(), st2)
    assert np.allclose(last2[:, -1], got[:, -1], atol=1e-5)


def test_bad_attention_options_refused(window_export, tmp_path, capsys):
    src, _ = window_export
    with pytest.raises(SystemExit) as e:
        main(["export-onnx", src, "-o", str(tmp_path / "x"), "--attention", "window"])
    assert e.value.code == 2 and "--window" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export-onnx", src, "-o", str(tmp_path / "x"), "--attention", "full", "--window", "4"])
    assert e.value.code == 2 and "needs --attention window" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def _perturbed_copy(out: str, dest: str) -> str:
    shutil.copytree(out, dest)
    m = onnx.load(os.path.join(dest, "model.onnx"))
    t = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
    arr = numpy_helper.to_array(t) + np.float32(1e-2)
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    onnx.save_model(m, os.path.join(dest, "model.onnx"))
    return t.name


def test_perturbed_initializer_fails_verify(window_export, tmp_path, capsys):
    _, out = window_export
    dest = str(tmp_path / "bad")
    _perturbed_copy(out, dest)
    with pytest.raises(SystemExit) as e:
        main(["verify", dest, "--chunks", "16"])
    cap = capsys.readouterr()
    assert e.value.code == 6
    assert "FAIL" in cap.out and "Traceback" not in cap.err
    err = cap.err
    assert "verify failed: output" in err and "max abs" in err and "max rel" in err and "tolerance 0.0001" in err
    assert os.path.isfile(os.path.join(dest, "model.onnx"))  # the artifact is kept
    with pytest.raises(SystemExit) as e:  # the untouched export passes the same check
        main(["verify", out, "--chunks", "16", "--json"])
    assert e.value.code == 0
    assert json.loads(capsys.readouterr().out)["passed"]


def test_failed_export_keeps_previous_output(window_export, monkeypatch):
    src, out = window_export
    before = sorted(os.listdir(out))
    stamp = os.stat(os.path.join(out, "model.onnx")).st_mtime_ns

    def boom(*a, **k):
        from fwconvert.errors import NumericError
        raise NumericError("injected failure after the graph was written")

    monkeypatch.setattr("exporters.onnx.export.smoke_check", boom)
    with pytest.raises(Exception, match="injected failure"):
        export_onnx(src, out, chunk_size=4, attention="window", window=W, sinks=0, force=True)
    assert sorted(os.listdir(out)) == before
    assert os.stat(os.path.join(out, "model.onnx")).st_mtime_ns == stamp
    assert not [n for n in os.listdir(os.path.dirname(out)) if "staging" in n or ".old-" in n]


def test_window_span_alignment_note(window_export, capsys):
    """export-onnx notes a window graph whose span W + C is not a multiple of 8 (fused attention wants it), and
    stays silent when it is."""
    from fwconvert.cli.cmd_export import _window_notes

    _, out = window_export  # W + C = 6 + 4
    _window_notes(out, default_sinks=False)
    assert "W + C = 10" in capsys.readouterr().err
    m = json.load(open(os.path.join(out, "manifest.json")))
    tmp = os.path.join(os.path.dirname(out), "aligned")
    shutil.copytree(out, tmp)
    m["window"] = 4  # only the manifest is read
    json.dump(m, open(os.path.join(tmp, "manifest.json"), "w"))
    _window_notes(tmp, default_sinks=False)
    assert capsys.readouterr().err == ""


def test_verify_refuses_an_older_window_layout_with_the_reason(window_export, tmp_path):
    """Window exports made before 2026-12-02 keep W - 1 KV slots; verify says so instead of reporting a mismatch."""
    src, out = window_export
    old = str(tmp_path / "old")
    shutil.copytree(out, old)
    m = json.load(open(os.path.join(old, "manifest.json")))
    m["window"] = W + 1  # the state keeps W slots: what an export for window W + 1 kept before
    json.dump(m, open(os.path.join(old, "manifest.json"), "w"))
    with pytest.raises(InputError, match="older exports kept W - 1"):
        verify(old, against=fwconvert.load(src, window=W + 1), chunks=2)
