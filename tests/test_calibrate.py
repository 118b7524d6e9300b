"""The calibration loop: loss falls, determinism, exact kill-and-resume, NaN guard, torn checkpoints."""
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fwconvert.calibrate import checkpoint as ckpt
from fwconvert.calibrate.data import WindowSampler
from fwconvert.calibrate.loop import CalibrationSettings, Calibrator, lr_factor, sequence_loss
from fwconvert.calibrate.params import base_parameter_names, baseline_layers, count_new_parameters, select_trainable
from fwconvert.config import FWLConfig, InPlaceTTTConfig
from fwconvert.errors import NumericError
from test_calibrate_support import phrase_docs, run_cli, save_tiny, tiny_model, write_token_docs

FWL = FWLConfig(size=64, chunk_size=16)
TTT = InPlaceTTTConfig(layers=(0, 1), chunk_size=16)


def _calibrator(tmp_path, fw=FWL, seed=0, steps=4, save_every=2, lr=3e-2, log=None, **kw):
    model, cfg = tiny_model(fw)
    tr = select_trainable(model, "fast", base_parameter_names(cfg))
    s = CalibrationSettings(steps=steps, seq_len=64, batch_size=2, lr=lr, seed=seed, save_every=save_every, **kw)
    torch.manual_seed(seed)
    sampler = WindowSampler(phrase_docs(4, 300), 64, seed)
    return Calibrator(model, tr, sampler, s, str(tmp_path / "work"), "run", torch.device("cpu"),
                      log=log or (lambda m: None)), tr


def _weights(tr):
    return {n: p.detach().clone() for n, p in tr.items()}


@pytest.mark.parametrize("fw", [FWL, TTT], ids=["fwl", "inplace_ttt"])
def test_loss_falls_training_only_the_new_parameters(tmp_path, fw):
    model, cfg = tiny_model(fw)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = select_trainable(model, "fast", base_parameter_names(cfg))
    assert tr and all(n not in base_parameter_names(cfg) for n in tr)
    sampler = WindowSampler(phrase_docs(6, 400), 128, 0)
    ids = torch.from_numpy(sampler.batch(10_000, 8))  # fixed probe batch
    with torch.no_grad():
        before = float(sequence_loss(model, ids))
    s = CalibrationSettings(steps=25, seq_len=128, batch_size=2, lr=3e-2, save_every=100)
    rec = Calibrator(model, tr, sampler, s, str(tmp_path / "w"), "r", torch.device("cpu")).run(progress=False)
    with torch.no_grad():
        after = float(sequence_loss(model, ids))
    assert after < before - 0.2, (before, after)
    assert np.mean(rec["losses"][-5:]) < np.mean(rec["losses"][:5])
    for n, p in model.named_parameters():  # base weights untouched
        if n not in tr:
            assert torch.equal(p, frozen[n]), n


def test_sequence_loss_blocks_equal_plain_cross_entropy():
    model, _ = tiny_model(FWL)
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    for block in (7, 49, 1000):
        assert abs(float(sequence_loss(model, ids, block).detach()) - float(ref.detach())) < 1e-5


def test_schedule_warms_up_then_decays_to_the_floor():
    s = CalibrationSettings(steps=100, warmup=10, min_lr_ratio=0.1)
    f = [lr_factor(i, s) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:])) and f[-1] == pytest.approx(0.1, abs=1e-3)


def test_trainable_sets_and_the_baseline_recipe():
    model, cfg = tiny_model(TTT)
    names = set(select_trainable(model, "fast", base_parameter_names(cfg)))
    assert names == {f"model.layers.{i}.mlp.{m}.weight" for i in (0, 1) for m in ("ttt_conv", "ttt_proj")}
    plus = set(select_trainable(model, "fast+norms", base_parameter_names(cfg)))
    assert plus - names == {n for n, _ in model.named_parameters() if n.endswith("norm.weight")}
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in plus)
    # baseline: W_down of the TTT layers first, then from the last layer back, until >= the new parameter count
    assert baseline_layers(cfg, InPlaceTTTConfig(layers=(0,)), 1) == [0]
    assert baseline_layers(cfg, FWL, 1) == [1]
    assert baseline_layers(cfg, FWL, count_new_parameters(cfg, FWL)) == [0, 1]
    plain, _ = tiny_model(None)
    with pytest.raises(Exception, match="no fast-weight parameters"):
        select_trainable(plain, "fast", base_parameter_names(cfg))
    assert set(select_trainable(plain, "fast", base_parameter_names(cfg), [1])) == {"model.layers.1.mlp.down_proj.weight"}
    # fast+baseline: the fast parameters plus exactly the W_down set the baseline trains; the baseline's own set
    # is the same with either mode, so the two runs share every trained slow parameter
    layers = baseline_layers(cfg, TTT, count_new_parameters(cfg, TTT))
    both = set(select_trainable(model, "fast+baseline", base_parameter_names(cfg), layers))
    wdown = {f"model.layers.{i}.mlp.down_proj.weight" for i in layers}
    assert both == names | wdown and wdown <= set(dict(model.named_parameters()))
    assert set(select_trainable(plain, "fast+baseline", base_parameter_names(cfg), layers)) == wdown


def test_same_seed_identical_different_seed_differs(tmp_path):
    runs = []
    for i, seed in enumerate((0, 0, 1)):
        c, tr = _calibrator(tmp_path / str(i), seed=seed, steps=3, save_every=3)
        rec = c.run(progress=False)
        runs.append((rec["losses"], _weights(tr)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])
    assert runs[0][0] != runs[2][0]


def test_nan_stops_with_step_named_and_last_good_checkpoint_intact(tmp_path, monkeypatch):
    monkeypatch.setenv("FWCONVERT_TESTING", "1")
    monkeypatch.setenv("FWCONVERT_FAULT", "nan_at_step:3")
    c, tr = _calibrator(tmp_path, steps=6, save_every=2)
    with pytest.raises(NumericError, match="at step 3") as e:
        c.run(progress=False)
    assert "step-00000002" in str(e.value)
    work = str(tmp_path / "work")
    assert ckpt.list_checkpoints(work) == ["step-00000002"]
    state = ckpt.load_latest(work, "run", lambda m: pytest.fail(m))
    assert state["step"] == 2 and all(bool(torch.isfinite(t).all()) for t in state["params"].values())


def test_skip_nonfinite_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("FWCONVERT_TESTING", "1")
    monkeypatch.setenv("FWCONVERT_FAULT", "nan_at_step:2")
    logs = []
    c, tr = _calibrator(tmp_path, steps=3, save_every=3, skip_nonfinite=1, log=logs.append)
    rec = c.run(progress=False)
    assert rec["skipped_steps"] == [2] and math.isnan(rec["losses"][1]) and any("step 2" in m for m in logs)
    assert all(bool(torch.isfinite(p).all()) for p in tr.values())


@pytest.mark.parametrize("damage", ["truncate", "no_marker"])
def test_torn_newest_checkpoint_falls_back_with_a_warning(tmp_path, damage):
    c, tr = _calibrator(tmp_path, steps=4, save_every=2)
    c.run(progress=False)
    work = str(tmp_path / "work")
    assert ckpt.list_checkpoints(work) == ["step-00000002", "step-00000004"]
    newest = os.path.join(work, "step-00000004")
    if damage == "truncate":
        with open(os.path.join(newest, "state.pt"), "r+b") as f:
            f.truncate(100)
    else:
        os.remove(os.path.join(newest, "COMPLETE"))
    logs = []
    c2, _ = _calibrator(tmp_path, steps=4, save_every=2, log=logs.append)
    assert c2.resume() and c2.step == 2
    assert any("torn" in m and "step-00000004" in m for m in logs)


def test_keeps_the_last_two_checkpoints(tmp_path):
    c, _ = _calibrator(tmp_path, steps=5, save_every=1)
    c.run(progress=False)
    assert ckpt.list_checkpoints(str(tmp_path / "work")) == ["step-00000004", "step-00000005"]


@pytest.fixture(scope="module")
def fwl_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    return save_tiny(root / "fwl", FWL), write_token_docs(root / "data", n=6, length=300)


def test_kill_and_resume_is_bit_identical(tmp_path, fwl_folder):
    from fwconvert.calibrate.run import calibrate

    model, data = fwl_folder
    args = dict(seq_len=64, batch_size=2, lr=3e-2, steps=6, save_every=2)
    full = calibrate(model, [data], str(tmp_path / "full"), CalibrationSettings(**args), progress=False)
    out = str(tmp_path / "killed")
    flags = [model, "--data", data, "-o", out, "--seq-len", "64", "--batch-size", "2", "--lr", "3e-2", "--steps", "6",
             "--save-every", "2", "--no-progress"]
    r = run_cli(["calibrate", *flags], {"FWCONVERT_TESTING": "1", "FWCONVERT_FAULT": "kill_at_step:4"})
    assert r.returncode == -9, r.stderr
    assert not os.path.exists(out)
    assert ckpt.list_checkpoints(ckpt.work_dir_for(out)) == ["step-00000002", "step-00000004"]
    logs = []
    resumed = calibrate(model, [data], out, CalibrationSettings(**args), resume=True, progress=False, log=logs.append)
    assert any("resumed from step 4" in m for m in logs)
    assert resumed["losses"] == full["losses"]
    a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(tmp_path / "full", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.load(open(os.path.join(out, "MANIFEST.json")))
    assert manifest["calibration"]["seed"] == 0 and manifest["calibration"]["data"]["heldout"]
    assert not os.path.exists(ckpt.work_dir_for(out))  # cleaned after success


def test_out_of_memory_is_exit_5_with_a_hint_and_checkpoints_kept(tmp_path, monkeypatch):
    from fwconvert.errors import ResourceError

    monkeypatch.setenv("FWCONVERT_TESTING", "1")
    monkeypatch.setenv("FWCONVERT_FAULT", "oom_at_step:3")
    c, _ = _calibrator(tmp_path, steps=4, save_every=2)
    with pytest.raises(ResourceError, match="out of memory at step 3, batch 2 x 64.*--batch-size 1") as e:
        c.run(progress=False)
    assert e.value.exit_code == 5
    assert ckpt.list_checkpoints(str(tmp_path / "work")) == ["step-00000002"]


def test_fault_hooks_need_the_testing_flag(monkeypatch):
    from fwconvert.calibrate.loop import parse_fault

    monkeypatch.setenv("FWCONVERT_FAULT", "nan_at_step:3,kill_at_step:4")
    monkeypatch.delenv("FWCONVERT_TESTING", raising=False)
    assert parse_fault() == {}
    monkeypatch.setenv("FWCONVERT_TESTING", "1")
    assert parse_fault() == {"nan_at_step": 3, "kill_at_step": 4}


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    from fwconvert.errors import OutputError

    c, _ = _calibrator(tmp_path, steps=2, save_every=2)
    c.run(progress=False)
    with pytest.raises(OutputError, match="does not match this run") as e:
        ckpt.load_latest(str(tmp_path / "work"), "another-run", lambda m: None)
    assert e.value.exit_code == 4


def test_manifest_is_strict_json_even_with_a_skipped_step(tmp_path, fwl_folder, monkeypatch):
    from fwconvert.calibrate.run import calibrate
    from fwconvert.config import load_json_strict

    monkeypatch.setenv("FWCONVERT_TESTING", "1")
    monkeypatch.setenv("FWCONVERT_FAULT", "nan_at_step:1")
    model, data = fwl_folder
    s = CalibrationSettings(seq_len=64, batch_size=1, steps=2, save_every=2, skip_nonfinite=1)
    calibrate(model, [data], str(tmp_path / "o"), s, progress=False)
    rec = load_json_strict(str(tmp_path / "o" / "MANIFEST.json"))["calibration"]
    assert rec["losses"][0] is None and rec["skipped_steps"] == [1]
    assert rec["data"]["train"]["documents"] + len(rec["data"]["heldout"]) == 6


def test_tf32_is_recorded_and_keeps_runs_apart(tmp_path, fwl_folder):
    """TF32 is on by default and --no-tf32 turns it off; the setting reaches the settings the manifest records, and
    on CUDA a run with the other one is another run for --resume (run id: an unknown device counts as CUDA); on the
    CPU it changes no number, nor the run id."""
    import dataclasses

    from fwconvert.calibrate.run import calibrate, run_id

    model, data = fwl_folder
    s = CalibrationSettings(seq_len=64, batch_size=2, lr=3e-2, steps=2, save_every=2)
    assert s.tf32 is True
    assert run_id("m", s, ["d"], {}) != run_id("m", dataclasses.replace(s, tf32=False), ["d"], {})
    cpu = {"device_type": "cpu"}
    assert run_id("m", s, ["d"], cpu) == run_id("m", dataclasses.replace(s, tf32=False), ["d"], cpu)
    out = str(tmp_path / "fp32")
    r = run_cli(["calibrate", model, "--data", data, "-o", out, "--seq-len", "64", "--batch-size", "2", "--lr", "3e-2",
                 "--steps", "2", "--save-every", "2", "--no-progress", "--no-tf32"])
    assert r.returncode == 0, r.stderr
    rec = json.load(open(os.path.join(out, "MANIFEST.json")))["calibration"]
    assert rec["settings"]["tf32"] is False
    default = calibrate(model, [data], str(tmp_path / "default"), s, progress=False)
    assert default["settings"]["tf32"] is True and default["losses"] == rec["losses"]
