"""`fwconvert run` and `verify` as a user meets them: non-finite losses exit 6, strict JSON (non-finite -> null),
a one-token document, the source fingerprint, the worst tensor judged by its own tolerance, a reference model of
another kind, a short document, --batch 0, and the failure message."""
import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporters.onnx.export import export_onnx
from exporters.verify import Report, Row, _check_state_names, format_table
from fwconvert.checkpoint import open_checkpoint
from fwconvert.errors import InputError
from test_onnx_common import cli as _cli, tiny_model
from tiny import make_hf_model, save_checkpoint

C = 8


def _strict_json(text):
    """json.loads that refuses NaN/Infinity (Python's json accepts them; other parsers do not)."""
    def refuse(c):
        raise ValueError(f"not JSON: {c}")

    return json.loads(text, parse_constant=refuse)


def _tokens_file(tmp_path, n, name="ids.txt"):
    f = tmp_path / name
    f.write_text(" ".join(str(7 * i % 256) for i in range(n)))
    return str(f)


@pytest.fixture(scope="module")
def base_export(tmp_path_factory):
    """A tiny llama exported from a checkpoint folder (the manifest records its source and fingerprint)."""
    root = tmp_path_factory.mktemp("base")
    src = save_checkpoint(make_hf_model("llama"), str(root / "src"))
    return src, export_onnx(src, str(root / "onnx"), chunk_size=C)


@pytest.fixture(scope="module")
def nan_export(base_export, tmp_path_factory):
    """A copy of the base export with one weight (the final norm's) set to NaN: every logit is NaN."""
    dest = str(tmp_path_factory.mktemp("nan") / "onnx")
    shutil.copytree(base_export[1], dest)
    m = onnx.load(os.path.join(dest, "model.onnx"))
    t = next(t for t in m.graph.initializer if "norm" in t.name and t.data_type == onnx.TensorProto.FLOAT)
    t.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(t), np.nan), t.name))
    onnx.save_model(m, os.path.join(dest, "model.onnx"))
    return dest


@pytest.fixture(scope="module")
def fwl_export(tmp_path_factory):
    model = tiny_model("llama", "fwl")
    return model, export_onnx(model, str(tmp_path_factory.mktemp("fwl") / "onnx"), chunk_size=C)


@pytest.fixture(scope="module")
def inplace_export(tmp_path_factory):
    return export_onnx(tiny_model("llama", "inplace"), str(tmp_path_factory.mktemp("inplace") / "onnx"), chunk_size=C)


@pytest.mark.parametrize("which", ["base", "fwl", "inplace"])
def test_run_static_gives_the_ordinary_sessions_losses(which, base_export, fwl_export, inplace_export, tmp_path,
                                                       capsys):
    """`run --static` (one pinned session per past length for full attention, the last chunk padded: 21 tokens in
    chunks of 8) gives every token's loss as the ordinary session does: the padded positions change none of the
    real ones (base, FWL, and in-place with its fixed chunks)."""
    folder = {"base": base_export[1], "fwl": fwl_export[1], "inplace": inplace_export}[which]
    doc = _tokens_file(tmp_path, 21)
    runs = {}
    for flag in ([], ["--static"]):
        code, out, err = _cli(["run", folder, "--tokens", doc, "--provider", "cpu", "--json"] + flag, capsys)
        assert code == 0, err
        runs[bool(flag)] = _strict_json(out)
        assert ("gains nothing on the CPU provider" in err) == bool(flag), err
    assert runs[True]["session"] == "static" and runs[False]["session"] == "ordinary"
    assert len(runs[True]["losses"]) == 20
    np.testing.assert_allclose(runs[True]["losses"], runs[False]["losses"], rtol=1e-5, atol=1e-5)


def test_run_static_refuses_generation(base_export, tmp_path, capsys):
    code, out, err = _cli(["run", base_export[1], "--tokens", _tokens_file(tmp_path, 5), "--provider", "cpu",
                           "--static", "--generate", "2"], capsys)
    assert code == 2 and "--generate" in err and "omit --static" in err and "Traceback" not in err, (code, err)


def test_run_nan_losses_exit_6_after_the_report(nan_export, tmp_path, capsys):
    doc = _tokens_file(tmp_path, 12)
    code, out, err = _cli(["run", nan_export, "--tokens", doc, "--provider", "cpu"], capsys)
    assert code == 6 and "perplexity: nan" in out, (code, out, err)
    assert err.startswith("Error:") and "11 of 11 token losses are not finite" in err and "Traceback" not in err
    code, out, err = _cli(["run", nan_export, "--tokens", doc, "--provider", "cpu", "--json", "--generate", "2"],
                          capsys)
    assert code == 6 and "not finite" in err
    res = _strict_json(out)  # printed first, valid JSON: the non-finite values are null
    assert res["mean_loss"] is None and res["perplexity"] is None and res["losses"] == [None] * 11
    assert res["generated_ids"] == []  # nothing generated from NaN logits


def test_run_generation_from_nan_logits_exit_6(nan_export, tmp_path, capsys):
    """A one-token document has no loss: the NaN shows in the logits generation picks from (numpy's argmax would
    silently pick token 0)."""
    code, out, err = _cli(["run", nan_export, "--tokens", _tokens_file(tmp_path, 1), "--provider", "cpu",
                           "--generate", "2"], capsys)
    assert code == 6 and "--generate" in err and "not finite" in err, (code, out, err)


def test_run_one_token_document(base_export, tmp_path, capsys):
    doc = _tokens_file(tmp_path, 1)
    code, out, err = _cli(["run", base_export[1], "--tokens", doc, "--provider", "cpu", "--json"], capsys)
    assert code == 0, err
    res = _strict_json(out)
    assert res["mean_loss"] is None and res["perplexity"] is None and res["losses"] == []
    code, out, err = _cli(["run", base_export[1], "--tokens", doc, "--provider", "cpu"], capsys)
    assert code == 0 and "no predicted tokens" in out and "perplexity" not in out, (out, err)


def test_run_warns_past_the_trained_positions(base_export, tmp_path, capsys):
    """The manifest records the model's max_position_embeddings (512 for the tiny llama); `run` warns on stderr when
    the document (with what it generates) goes past it, and only then."""
    from exporters.runtime.session import load_manifest

    assert load_manifest(base_export[1]).max_position_embeddings == 512
    code, out, err = _cli(["run", base_export[1], "--tokens", _tokens_file(tmp_path, 510), "--generate", "2",
                           "--provider", "cpu", "--json"], capsys)
    assert code == 0 and "warning" not in err, err
    code, out, err = _cli(["run", base_export[1], "--tokens", _tokens_file(tmp_path, 510), "--generate", "3",
                           "--provider", "cpu", "--json"], capsys)
    assert code == 0 and "510 tokens + 3 generated run past the 512 positions" in err, err
    assert _strict_json(out)["tokens"] == 510


def test_verify_notes_an_fp16_export_on_the_cpu(base_export, tmp_path, capsys):
    """verify of an fp16 export on the CPU provider says on stderr that CPU kernels round fp16 differently from the
    CUDA ones it is made for; an fp32 export gets no such note."""
    code, out, err = _cli(["verify", base_export[1], "--chunks", "2"], capsys)
    assert code == 0 and "note: an fp16 export" not in err, err
    fp16 = export_onnx(base_export[0], str(tmp_path / "fp16"), chunk_size=C, dtype="fp16")
    code, out, err = _cli(["verify", fp16, "--chunks", "2", "--tokens", _tokens_file(tmp_path, 20, "doc.txt")],
                          capsys)
    assert code == 0, err
    assert "note: an fp16 export on the CPU provider runs onnxruntime's CPU kernels" in err and "--provider cuda" in err


def test_verify_nan_export_strict_json_and_message(nan_export, capsys):
    code, out, err = _cli(["verify", nan_export, "--chunks", "2", "--json"], capsys)
    assert code == 6
    rep = _strict_json(out)
    assert not rep["passed"] and rep["worst"]["rel"] is None and rep["perplexity"]["onnx"] is None
    assert f"the export at {nan_export} does not match PyTorch" in err and "kept" not in err


@pytest.mark.parametrize("change", ["config", "values"])
def test_verify_refuses_a_source_changed_since_the_export(tmp_path, capsys, change):
    src = save_checkpoint(make_hf_model("llama"), str(tmp_path / "src"))
    out = export_onnx(src, str(tmp_path / "onnx"), chunk_size=C)
    if change == "config":
        cfg = json.load(open(os.path.join(src, "config.json")))
        cfg["rms_norm_eps"] = 0.5  # another model now (verify used to blame the export: exit 6)
        json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    else:  # the same shapes and headers, other weights (a fine-tune saved over the source)
        before = open_checkpoint(src).header_fingerprint()
        save_checkpoint(make_hf_model("llama", seed=1), src)
        assert open_checkpoint(src).header_fingerprint() == before
    code, stdout, err = _cli(["verify", out, "--chunks", "1"], capsys)
    assert code == 3 and "the source model changed since the export" in err and src in err and "--against" in err, err
    assert stdout == ""


def test_verify_accepts_the_header_only_fingerprint_of_older_manifests(tmp_path, capsys):
    src = save_checkpoint(make_hf_model("llama"), str(tmp_path / "src"))
    out = export_onnx(src, str(tmp_path / "onnx"), chunk_size=C)
    path = os.path.join(out, "manifest.json")
    man = json.load(open(path))
    ck = open_checkpoint(src)
    assert man["source_fingerprint"] == ck.fingerprint() != ck.header_fingerprint()
    man["source_fingerprint"] = ck.header_fingerprint()  # what exports before the value samples recorded
    json.dump(man, open(path, "w"))
    code, stdout, err = _cli(["verify", out, "--chunks", "1"], capsys)
    assert code == 0 and "PASS" in stdout, err


def test_table_and_verdict_agree_on_the_worst_tensor():
    """The table's worst state is the one nearest its own tolerance, as in the verdict (not the largest raw rel)."""
    rep = Report("f", "cpu", 1e-2, 8, 1, [Row(0, "logits", 0.1, 1e-3, 1.0),
                                          Row(0, "fast_weights.fwl.sum_fc1", 1e-4, 3e-2, tolerance=5e-2),  # 0.6 of tol
                                          Row(0, "past_key_values.0.key", 1e-4, 8e-3)])  # 0.8 of tol: the worst
    table = format_table(rep)
    row = table.splitlines()[1]
    assert "past_key_values.0.key 8.00e-03 / 0.01" in row and "sum_fc1" not in row, table
    assert "PASS: 1 chunk of 8" in table and "worst 'past_key_values.0.key'" in table


def test_verify_against_a_model_of_another_kind(base_export, fwl_export, capsys):
    src, base_out = base_export
    model, fwl_out = fwl_export
    code, _, err = _cli(["verify", fwl_out, "--against", src, "--chunks", "1"], capsys)
    assert code == 3 and "the reference model has no fast-weight state but the export has fast_weights.fwl.*" in err
    assert "export it again" not in err and "--against" in err, err
    from exporters.runtime.session import load_manifest

    with pytest.raises(InputError, match=r"reference model has fast_weights\.fwl\.\* but the export has no fast-"):
        _check_state_names(load_manifest(base_out), model)  # the other way round


def test_state_layout_message_names_a_version_only_when_it_differs(fwl_export):
    import dataclasses

    from exporters.runtime.session import load_manifest

    model, out = fwl_export
    m = load_manifest(out)
    m.state = [dataclasses.replace(s, key="fast_weights.fwl.sum_w1") if s.key.endswith("sum_fc1") else s
               for s in m.state]
    with pytest.raises(InputError) as e:
        _check_state_names(m, model)
    assert "this is" not in str(e.value)
    m.versions["fwconvert"] = "0.0.9"
    with pytest.raises(InputError, match=r"written by fwconvert 0\.0\.9, this is 0\.1\.0"):
        _check_state_names(m, model)


def test_verify_short_document_says_how_many_chunks(base_export, tmp_path, capsys):
    out = base_export[1]
    doc = _tokens_file(tmp_path, 12)
    code, stdout, err = _cli(["verify", out, "--tokens", doc, "--chunks", "5"], capsys)
    assert code == 0, err
    assert "the document gives 2 chunks of the 5 asked (the last 4 tokens)" in stdout
    assert "PASS: 2 chunks of 8" in stdout, stdout
    code, stdout, err = _cli(["verify", out, "--tokens", doc, "--chunks", "5", "--static"], capsys)
    assert code == 0, err
    assert "1 full chunk of the 5 asked; --static compares full chunks only, so its last 4 tokens" in stdout
    assert "PASS: 1 chunk of 8" in stdout, stdout
    code, stdout, err = _cli(["verify", out, "--tokens", doc, "--chunks", "5", "--json"], capsys)
    assert code == 0 and "2 chunks of the 5 asked" in _strict_json(stdout)["note"]
    code, stdout, err = _cli(["verify", out, "--tokens", _tokens_file(tmp_path, 16, "full.txt"), "--chunks", "2"],
                             capsys)
    assert code == 0 and "asked" not in stdout and "PASS: 2 chunks of 8" in stdout


@pytest.mark.parametrize("opt", ["--batch", "--chunks"])
def test_verify_zero_batch_or_chunks_is_a_usage_error(base_export, opt, capsys):
    code, _, err = _cli(["verify", base_export[1], opt, "0"], capsys)
    assert code == 2 and opt in err and "Traceback" not in err, err


def test_strict_json_writes_non_finite_numbers_as_null():
    """Every command's --json (run, verify, eval, inspect) goes through one writer: NaN/Inf become null, and what it
    writes parses strictly (eval's by-position means hold NaN where no document reached a position)."""
    from fwconvert.cli.json_out import strict_json

    text = strict_json({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": {"d": (2, float("nan"))}})
    assert _strict_json(text) == {"a": None, "b": [None, None, 1.5], "c": {"d": [2, None]}}
