"""``fwconvert eval --runtime ort`` streams an exported graph through onnxruntime and gets the same
perplexity by position as the torch model it came from."""
import json

import pytest

from fwconvert.config import FWLConfig
from test_calibrate_support import save_tiny, write_token_docs


@pytest.mark.slow
def test_ort_eval_matches_torch_eval(tmp_path, capsys):
    from exporters.onnx.export import export_onnx
    from fwconvert.cli.main import main

    model = save_tiny(tmp_path / "fwl", FWLConfig(size=64, chunk_size=16))
    onnx_dir = export_onnx(model, str(tmp_path / "onnx"))
    data = write_token_docs(tmp_path / "data", n=2, length=200)
    results = {}
    for runtime, path in (("torch", model), ("ort", onnx_dir)):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["eval", path, "--data", data, "--context", "128", "--chunk-size", "32", "--runtime", runtime, "--json"])
        assert e.value.code == 0
        results[runtime] = json.loads(capsys.readouterr().out)
    t, o = results["torch"], results["ort"]
    assert o["documents"] == t["documents"] == 2
    assert o["perplexity"] == pytest.approx(t["perplexity"], rel=1e-4)
    assert o["by_position"] == pytest.approx(t["by_position"], rel=1e-4)


@pytest.mark.parametrize("attention", ["window", "full"])
def test_ort_eval_static_equals_dynamic_with_padded_last_chunk(tmp_path, capsys, attention):
    """--static (one static session per batch size; the short last chunk padded; a full-attention export pinned per
    past length) gives the ordinary session's numbers: 3 documents at --batch-size 2 (batches of 2 and 1), context
    120 = 3 chunks of 32 and one of 24."""
    from exporters.onnx.export import export_onnx
    from fwconvert.cli.main import main

    model = save_tiny(tmp_path / "fwl", FWLConfig(size=64, chunk_size=16))
    kw = {"attention": "window", "window": 64} if attention == "window" else {}
    onnx_dir = export_onnx(model, str(tmp_path / "onnx"), chunk_size=32, **kw)
    data = write_token_docs(tmp_path / "data", n=3, length=200)
    results = {}
    for extra in ([], ["--static"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["eval", onnx_dir, "--data", data, "--context", "120", "--chunk-size", "32", "--runtime", "ort",
                  "--batch-size", "2", "--json", *extra])
        assert e.value.code == 0
        results[bool(extra)] = json.loads(capsys.readouterr().out)
    assert results[True]["documents"] == 3
    assert results[True]["perplexity"] == pytest.approx(results[False]["perplexity"], rel=1e-6)
    assert results[True]["by_position"] == pytest.approx(results[False]["by_position"], rel=1e-6)
    with pytest.raises(SystemExit) as e:
        main(["eval", model, "--data", data, "--context", "120", "--static"])
    assert e.value.code == 2


def test_ort_eval_takes_the_split_of_the_export_source(tmp_path, capsys):
    """An ONNX export of a calibrated model is evaluated on that model's held-out documents (its manifest's source),
    as the torch model is, and says so; with the source gone, on all of --data, and says that."""
    import shutil

    from exporters.onnx.export import export_onnx
    from fwconvert.calibrate.loop import CalibrationSettings
    from fwconvert.calibrate.run import calibrate
    from fwconvert.cli.main import main

    model = save_tiny(tmp_path / "fwl", FWLConfig(size=64, chunk_size=16))
    data = write_token_docs(tmp_path / "data", n=6, length=200)
    cal = str(tmp_path / "cal")
    rec = calibrate(model, [data], cal, CalibrationSettings(steps=1, seq_len=64, save_every=1), heldout=0.4,
                    progress=False)
    onnx_dir = export_onnx(cal, str(tmp_path / "onnx"))
    args = ["eval", onnx_dir, "--data", data, "--context", "128", "--chunk-size", "32", "--runtime", "ort", "--json"]
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    assert e.value.code == 0
    res = json.loads(out)
    assert res["documents"] == len(rec["data"]["heldout"]) < 6 and cal in res["documents_from"] and cal in err
    shutil.rmtree(cal)
    with pytest.raises(SystemExit) as e:
        main(args)
    res = json.loads(capsys.readouterr().out)
    assert e.value.code == 0 and res["documents"] == 6 and res["documents_from"] == "all of --data"

