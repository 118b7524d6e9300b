"""Guards of calibrate, eval and mark-fast found by a user walkthrough: a bad --device, a --base of another
vocabulary or with fast weights, --resume after a change that cannot change the result, a calibration that held out
nothing, a warmup as long as the run, and every:0."""
import dataclasses
import json
import os
import shutil

import pytest
import torch

from fwconvert.calibrate import checkpoint as ckpt
from fwconvert.calibrate.loop import CalibrationSettings
from fwconvert.config import FWLConfig
from fwconvert.errors import InputError, NumericError, OutputError, UsageError
from test_calibrate_support import TINY_CONFIG, save_tiny, write_token_docs

FWL = FWLConfig(size=64, chunk_size=16)


def _cli(capsys, *args):
    from fwconvert.cli.main import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny FWL model, its base, a model with another vocab_size, and token documents (4, and a single one)."""
    from fwconvert.convert import save_model
    from fwconvert.families import parse_config
    from fwconvert.modeling import build_model

    root = tmp_path_factory.mktemp("guards")
    big = build_model(parse_config(dict(TINY_CONFIG, vocab_size=320), "config"), None, device="cpu")
    with torch.no_grad():
        for p in big.parameters():
            p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(0))
    return {"fwl": save_tiny(root / "fwl", FWL), "base": save_tiny(root / "base", None),
            "big": save_model(big, str(root / "big")), "data": write_token_docs(root / "data", n=4, length=200),
            "one": write_token_docs(root / "one", n=1, length=200), "root": root}


# 1. --device -------------------------------------------------------------------------------------------------------
def test_a_bad_device_string_is_a_usage_error(models, tmp_path, capsys):
    from fwconvert.calibrate.run import check_device

    for cmd in (["calibrate", models["fwl"], "--data", models["data"], "-o", tmp_path / "o"],
                ["eval", models["fwl"], "--data", models["data"], "--context", "128"]):
        code, _, err = _cli(capsys, *cmd, "--device", "foo")
        assert code == 2 and err.startswith("Error: --device foo:") and "cpu, cuda or cuda:N" in err, err
        assert "internal error" not in err
    assert not os.path.exists(tmp_path / "o")
    for bad in ("meta", "", "cuda:x"):
        with pytest.raises(UsageError):
            check_device(bad)
    assert check_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():  # unchanged: a CUDA device that is not there is exit 3
        code, _, err = _cli(capsys, "eval", models["fwl"], "--data", models["data"], "--device", "cuda")
        assert code == 3 and "no CUDA device" in err


# 2. eval --base / --baseline ---------------------------------------------------------------------------------------
def test_eval_refuses_a_base_of_another_vocabulary_or_with_fast_weights(models, capsys):
    fwl, data = models["fwl"], models["data"]
    for opt in ("--base", "--baseline"):
        code, _, err = _cli(capsys, "eval", fwl, "--data", data, "--context", "128", opt, models["big"])
        assert code == 3 and f"{opt} {models['big']}: vocab_size 320 differs" in err and "256" in err, err
    code, _, err = _cli(capsys, "eval", fwl, "--data", data, "--context", "128", "--base", fwl)
    assert code == 3 and "has fast weights (fwl)" in err, err


def test_eval_refuses_a_base_whose_tokenizer_maps_ids_to_other_tokens(models, tmp_path, capsys):
    from fwconvert import evaluate as ev
    from fwconvert.demo import byte_tokenizer_json

    model, same, other = (shutil.copytree(models[k], tmp_path / n) for k, n in
                          (("fwl", "m"), ("base", "same"), ("base", "other")))
    tj = byte_tokenizer_json()
    (model / "tokenizer.json").write_text(tj)
    doc = json.loads(tj)
    (same / "tokenizer.json").write_text(json.dumps(doc, indent=1))  # other bytes, same ids: accepted
    vocab = doc["model"]["vocab"]
    a, b = list(vocab)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(doc))
    assert ev.check_same_vocabulary(str(model), 256, str(same), "--base").config.vocab_size == 256
    with pytest.raises(InputError, match="differs from"):
        ev.check_same_vocabulary(str(model), 256, str(other), "--base")
    code, _, err = _cli(capsys, "eval", model, "--data", models["data"], "--context", "128", "--base", other)
    assert code == 3 and "tokenizer" in err and "2 ids stand for other tokens" in err, err


# 3. calibrate --resume ---------------------------------------------------------------------------------------------
def test_run_id_ignores_what_cannot_change_the_result_and_keeps_tf32_on_cuda():
    from fwconvert.calibrate.run import run_id

    s = CalibrationSettings(seq_len=64, steps=4, save_every=2)
    for dev in ("cpu", "cuda"):
        assert run_id("m", s, ["d"], {"device_type": dev}) == run_id("m", dataclasses.replace(s, save_every=5), ["d"],
                                                                        {"device_type": dev})
    no_tf32 = dataclasses.replace(s, tf32=False)
    assert run_id("m", s, ["d"], {"device_type": "cpu"}) == run_id("m", no_tf32, ["d"], {"device_type": "cpu"})
    assert run_id("m", s, ["d"], {"device_type": "cuda"}) != run_id("m", no_tf32, ["d"], {"device_type": "cuda"})


def test_a_refused_resume_names_the_setting_with_both_values(tmp_path):
    from fwconvert.calibrate.run import run_id, run_identity

    s = CalibrationSettings(seq_len=64, steps=4, save_every=2)
    args = ("m", ["d"], {"device_type": "cuda"})
    work = str(tmp_path / "work")
    ckpt.save_checkpoint(work, 2, {"x": 1}, run_id("m", s, *args[1:]), run_identity("m", s, *args[1:]))
    off = dataclasses.replace(s, tf32=False)
    with pytest.raises(OutputError, match=r"does not match this run: flags changed \(tf32: checkpoint True, "
                                          r"this run False\)") as e:
        ckpt.load_latest(work, run_id("m", off, *args[1:]), lambda m: None, identity=run_identity("m", off, *args[1:]))
    assert e.value.exit_code == 4


def test_resume_after_an_interrupt_with_another_save_every_and_tf32_on_cpu(models, tmp_path, monkeypatch):
    from fwconvert.calibrate.run import calibrate

    model, data = models["fwl"], models["data"]
    s = CalibrationSettings(seq_len=64, batch_size=2, lr=3e-2, steps=4, save_every=2)
    full = calibrate(model, [data], str(tmp_path / "full"), s, progress=False)
    out = str(tmp_path / "o")
    monkeypatch.setenv("FWCONVERT_TESTING", "1")
    monkeypatch.setenv("FWCONVERT_FAULT", "nan_at_step:3")  # stops after the checkpoint of step 2
    with pytest.raises(NumericError):
        calibrate(model, [data], out, s, progress=False)
    monkeypatch.delenv("FWCONVERT_FAULT")
    assert ckpt.list_checkpoints(ckpt.work_dir_for(out)) == ["step-00000002"]
    with pytest.raises(OutputError, match=r"flags changed \(seed: checkpoint 0, this run 1\)"):
        calibrate(model, [data], out, dataclasses.replace(s, seed=1), resume=True, progress=False)
    logs = []
    resumed = calibrate(model, [data], out, dataclasses.replace(s, save_every=5, tf32=False), resume=True,
                        progress=False, log=logs.append)
    assert any("resumed from step 2" in m for m in logs), logs
    assert resumed["losses"] == full["losses"]


# 4. a calibration that held out nothing ----------------------------------------------------------------------------
def test_calibrate_warns_when_nothing_is_held_out_and_eval_auto_then_uses_all(models, tmp_path, capsys):
    out = tmp_path / "cal"
    code, stdout, err = _cli(capsys, "calibrate", models["fwl"], "--data", models["one"], "-o", out, "--steps", "2",
                             "--seq-len", "64", "--no-progress")
    assert code == 0 and "held out 0 documents" in stdout
    assert "warning: held out 0 documents" in err and "all of --data" in err, err
    code, stdout, err = _cli(capsys, "eval", out, "--data", models["one"], "--context", "128", "--chunk-size", "32",
                             "--json")
    assert code == 0, err
    assert "held out no documents; evaluating all of --data" in err and json.loads(stdout)["documents"] == 1
    code, _, err = _cli(capsys, "eval", out, "--data", models["one"], "--context", "128", "--split", "heldout")
    assert code == 3 and "held out no documents" in err, err


def test_eval_auto_still_refuses_a_recorded_split_missing_from_data(models, tmp_path, capsys):
    from fwconvert import evaluate as ev
    from fwconvert.calibrate.data import load_documents

    docs = load_documents([models["data"]], 256, None)
    with pytest.raises(InputError, match="none of the 1 held-out documents"):
        ev.select_documents(docs, 128, "auto", {"not-there"})
    assert len(ev.select_documents(docs, 128, "auto", set())) == 4


# 5. --warmup -------------------------------------------------------------------------------------------------------
def test_calibrate_warns_when_warmup_is_not_below_steps(models, tmp_path, capsys):
    code, _, err = _cli(capsys, "calibrate", models["fwl"], "--data", models["data"], "-o", tmp_path / "o",
                        "--steps", "2", "--warmup", "100", "--seq-len", "64", "--no-progress")
    assert code == 0 and "warning: --warmup 100 is not below --steps 2" in err and "2% of its peak" in err, err
    code, _, err = _cli(capsys, "calibrate", models["fwl"], "--data", models["data"], "-o", tmp_path / "o2",
                        "--steps", "2", "--warmup", "1", "--seq-len", "64", "--no-progress")
    assert code == 0 and "--warmup" not in err
    code, _, err = _cli(capsys, "calibrate", models["fwl"], "--data", models["data"], "-o", tmp_path / "o3",
                        "--warmup", "-1")
    assert code == 2 and "--warmup must be >= 0" in err


# 6. mark-fast --layers every:0 -------------------------------------------------------------------------------------
def test_mark_fast_every_zero_says_the_step_must_be_positive(models, tmp_path, capsys):
    for spec, what in (("every:0", "the step K of every:K"), ("last:0", "the count K of last:K")):
        code, _, err = _cli(capsys, "mark-fast", models["base"], "-o", tmp_path / "t", "--layers", spec)
        assert code == 2 and f"layer spec '{spec}': {what} must be at least 1" in err and "out of range" not in err, err
    assert not os.path.exists(tmp_path / "t")


# 7. --force over a folder that is not an earlier output (a mistyped -o must not delete the user's data) -------------
def test_force_replaces_only_an_earlier_output(models, tmp_path, capsys):
    mine = tmp_path / "thesis"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "chapter1.txt").write_text("years of work")
    args = ["--data", models["data"], "--seq-len", "64", "--batch-size", "2", "--steps", "1", "--no-progress", "--force"]
    code, _, err = _cli(capsys, "calibrate", models["fwl"], "-o", mine, *args)
    assert code == 4 and "not an fwconvert output" in err, err
    assert (mine / "sub" / "chapter1.txt").read_text() == "years of work"
    code, _, err = _cli(capsys, "mark-fast", models["base"], "-o", mine, "--layers", "0", "--chunk-size", "16", "--force")
    assert code == 4 and "not an fwconvert output" in err, err
    assert (mine / "sub" / "chapter1.txt").read_text() == "years of work"
    out = tmp_path / "cal"  # an earlier calibration output is replaced
    assert _cli(capsys, "calibrate", models["fwl"], "-o", out, *args[:-1])[0] == 0
    code, _, err = _cli(capsys, "calibrate", models["fwl"], "-o", out, *args)
    assert code == 0, err
