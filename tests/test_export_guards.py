"""Guards of export-onnx and of opening an export: --force replaces only an empty folder or an earlier export;
--chunk-size above max_position_embeddings is refused; staging folders of killed exports are reported; a
hand-edited manifest (vocab_size, dtype, attention/window, sink_tokens, format) that the graph contradicts is
refused when a session opens it. Two tiny exports (module fixtures), the rest edits copies of them."""
import json
import os
import shutil
from types import SimpleNamespace

import pytest

from badinputs import single_file_model
from exporters.onnx.export import _chunk_size, _not_replaceable, export_onnx
from exporters.runtime.session import ChunkSession
from fwconvert.cli.main import main
from fwconvert.errors import InputError, OutputError
from test_onnx_common import tiny_model


def _cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _tree(folder):
    return sorted(os.path.relpath(os.path.join(r, n), folder) for r, ds, fs in os.walk(folder) for n in ds + fs)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny checkpoint folder (max_position_embeddings 64)."""
    return single_file_model(tmp_path_factory.mktemp("src") / "m")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A full-attention fp32 export and a window fp16 export with sinks of a tiny llama."""
    root = tmp_path_factory.mktemp("exports")
    model = tiny_model()
    full = export_onnx(model, str(root / "full"), chunk_size=8)
    win = export_onnx(model, str(root / "win"), chunk_size=8, attention="window", window=16, sinks=2, dtype="fp16")
    return {"full": full, "win": win}


def _edited(exports, tmp_path, which, **changes):
    d = str(tmp_path / f"{which}-edited")
    shutil.copytree(exports[which], d)
    path = os.path.join(d, "manifest.json")
    m = json.load(open(path))
    m.update(changes)
    with open(path, "w") as f:
        json.dump(m, f)
    return d


# -- 1. --force replaces only an empty folder or an fwconvert export -------------------------------------------
def test_force_refuses_a_folder_that_is_not_an_export(src, tmp_path, capsys):
    out = tmp_path / "userdata"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "thesis.txt").write_text("years of work")
    code, stdout, err = _cli(["export-onnx", src, "-o", out, "--force"], capsys)
    assert code == 4 and str(out) in err and "not an fwconvert export" in err and "Traceback" not in err, err
    assert stdout == "" and _tree(out) == ["sub", "sub/thesis.txt"]
    assert sorted(os.listdir(tmp_path)) == ["userdata"]  # no staging folder either
    (out / "manifest.json").write_text(json.dumps({"manifest_version": 3, "name": "a browser extension"}))
    with pytest.raises(OutputError, match="manifest.json that is not an fwconvert export's"):
        export_onnx(tiny_model(), str(out), chunk_size=8, force=True)
    assert (out / "sub" / "thesis.txt").read_text() == "years of work"


def test_force_still_replaces_an_empty_folder_or_an_export(exports, tmp_path):
    (tmp_path / "empty").mkdir()
    assert _not_replaceable(str(tmp_path / "empty")) is None
    assert _not_replaceable(exports["full"]) is None and _not_replaceable(exports["win"]) is None
    hand = _edited(exports, tmp_path, "full", vocab_size=1000, surprise=1)  # still this tool's format
    assert _not_replaceable(hand) is None


# -- 2. --chunk-size above max_position_embeddings ----------------------------------------------------------------
def test_chunk_size_above_max_position_embeddings_refused(src, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _cli(["export-onnx", src, "-o", out, "--chunk-size", "100000"], capsys)
    assert code == 2 and "--chunk-size 100000" in err and "max_position_embeddings 64" in err, err
    assert stdout == "" and os.listdir(tmp_path) == []
    model = SimpleNamespace(fast_weights=None, config=SimpleNamespace(max_position_embeddings=64))
    assert _chunk_size(model, None) == (64, False)  # the default 512 is capped too
    assert _chunk_size(model, 64) == (64, False)


# -- 3. and 4. a manifest the graph contradicts -------------------------------------------------------------------
def test_unedited_exports_open(exports):
    for d in exports.values():
        ChunkSession(d, provider="cpu")
    ChunkSession(exports["full"], provider="cpu", static_batch=1, cuda_graph=False, static_context=16)
    ChunkSession(exports["win"], provider="cpu", static_batch=1, cuda_graph=False)


def test_older_window_layout_still_opens(exports, tmp_path):
    """Window exports made before 2026-12-02 kept W - 1 KV slots: a 16-slot graph of window 17 still runs."""
    ChunkSession(_edited(exports, tmp_path, "win", window=17), provider="cpu")


def test_vocab_size_disagreeing_with_the_graph_refused(exports, tmp_path, capsys):
    d = _edited(exports, tmp_path, "full", vocab_size=1000)
    with pytest.raises(InputError, match=r"manifest disagrees with the graph .*vocab_size is 1000, but the graph's "
                                         r"logits have 256"):
        ChunkSession(d, provider="cpu")
    (tmp_path / "ids.txt").write_text("1 999 3")
    code, _, err = _cli(["run", d, "--tokens", tmp_path / "ids.txt", "--provider", "cpu"], capsys)
    assert code == 3 and "vocab_size is 1000" in err and "Traceback" not in err, err


@pytest.mark.parametrize("which,changes,match", [
    ("full", {"dtype": "fp16"}, r"dtype is 'fp16', but the graph's KV input 'past_key_values.0.key' is float32"),
    ("win", {"dtype": "fp32"}, r"dtype is 'fp32', but the graph's KV input 'past_key_values.0.key' is float16"),
    ("full", {"attention": "window", "window": 32}, r"attention is 'window' with window 32, but .* growing past axis"),
    ("win", {"window": 32}, r"window 32, but the graph's KV input 'past_key_values.0.key' has a past axis of 16"),
    ("win", {"attention": "full", "window": None}, r"attention is 'full', but .* fixed past axis of 16"),
    ("win", {"sink_tokens": 4}, r"sink_tokens is 4, but the graph's input 'past_key_values.0.sink_key' holds 2"),
    ("full", {"sink_tokens": 4}, r"sink_tokens is 4, but the graph has no sink inputs"),
    ("full", {"format": "fwconvert-onnx-chunk-step/99"}, r"not a valid manifest \(format 'fwconvert-onnx-chunk-st"),
])
def test_manifest_fields_disagreeing_with_the_graph_refused(exports, tmp_path, which, changes, match):
    d = _edited(exports, tmp_path, which, **changes)
    with pytest.raises(InputError, match=match):
        ChunkSession(d, provider="cpu")


def test_static_full_session_checks_a_window_claim(exports, tmp_path):
    """A static session pins the past axis; a window graph's fixed one still contradicts a full-attention claim."""
    d = _edited(exports, tmp_path, "full", attention="window", window=32)
    with pytest.raises(InputError, match="growing past axis"):
        ChunkSession(d, provider="cpu", static_batch=1, cuda_graph=False, static_context=16)


def test_verify_refuses_an_edited_dtype(exports, tmp_path, capsys):
    d = _edited(exports, tmp_path, "full", dtype="fp16")
    code, stdout, err = _cli(["verify", d, "--chunks", "1"], capsys)
    assert code == 3 and "dtype is 'fp16'" in err and "PASS" not in stdout, err


# -- 5. staging folders of killed exports are reported, not deleted ----------------------------------------------
def test_leftover_staging_folders_are_reported(src, tmp_path, capsys):
    out = tmp_path / "out"
    left = [tmp_path / ".out.staging-k1ll3d", tmp_path / ".out.old-k1ll3d"]
    for p in left:
        p.mkdir()
    (tmp_path / ".other.staging-x").mkdir()  # another output's: not named
    code, _, err = _cli(["export-onnx", src, "-o", out, "--chunk-size", "0"], capsys)  # refused after the warning
    assert code == 2 and all(f"Warning: leftover from an earlier export to {out}: {p} " in err for p in left), err
    assert ".other.staging" not in err
    assert all(p.is_dir() for p in left)
    lines = []
    with pytest.raises(InputError):
        export_onnx(tiny_model(), str(out), chunk_size=0, log=lines.append)
    assert len(lines) == 2 and str(left[0]) in lines[1]
