"""--fast-lr (a separate peak lr for the new fast-weight parameters) and throughput records across --resume."""
import os

import torch

from fwconvert.calibrate.data import WindowSampler
from fwconvert.calibrate.loop import CalibrationSettings, Calibrator, lr_factor
from fwconvert.calibrate.params import base_parameter_names, baseline_layers, count_new_parameters, select_trainable
from fwconvert.config import InPlaceTTTConfig
from test_calibrate_support import phrase_docs, run_cli, save_tiny, tiny_model, write_token_docs

TTT = InPlaceTTTConfig(layers=(0, 1), chunk_size=16)


def _ttt_calibrator(tmp_path, steps=6, **kw):
    model, cfg = tiny_model(TTT)
    base = base_parameter_names(cfg)
    layers = baseline_layers(cfg, TTT, count_new_parameters(cfg, TTT))
    tr = select_trainable(model, "fast+baseline", base, layers)
    fast = {n for n in tr if n not in base}
    kw.setdefault("save_every", 100)
    s = CalibrationSettings(steps=steps, seq_len=64, batch_size=2, train="fast+baseline", **kw)
    c = Calibrator(model, tr, WindowSampler(phrase_docs(4, 300), 64, 0), s, str(tmp_path / "w"), "r",
                   torch.device("cpu"), fast_names=fast)
    return c, tr, fast


def test_fast_lr_applies_to_the_new_parameters_only(tmp_path):
    c, tr, fast = _ttt_calibrator(tmp_path, lr=3e-2, fast_lr=1e-9)
    assert fast and set(tr) - fast  # both kinds are trained
    slow_group, fast_group = c.opt.param_groups
    assert {id(p) for p in fast_group["params"]} == {id(tr[n]) for n in fast}
    before = {n: p.detach().clone() for n, p in tr.items()}
    c.run(progress=False)
    factor = lr_factor(c.s.steps, c.s)
    assert abs(slow_group["lr"] - 3e-2 * factor) < 1e-12 and abs(fast_group["lr"] - 1e-9 * factor) < 1e-18
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in tr.items()}
    assert all(moved[n] > 1e-3 for n in set(tr) - fast), moved  # W_down at 3e-2
    assert all(moved[n] < 1e-6 for n in fast), moved  # the fast-weight parameters at 1e-9


def test_without_fast_lr_one_lr_for_all(tmp_path):
    c, _, _ = _ttt_calibrator(tmp_path, steps=1, lr=3e-2)
    assert [g["initial_lr"] for g in c.opt.param_groups] == [3e-2, 3e-2]


def test_throughput_counts_every_resumed_run(tmp_path):
    c, _, _ = _ttt_calibrator(tmp_path, steps=2, lr=1e-3, save_every=2)
    first = c.run(progress=False)
    c2, _, _ = _ttt_calibrator(tmp_path, steps=4, lr=1e-3, save_every=2)
    c2.run_id = c.run_id
    assert c2.resume() and c2.step == 2 and c2.seconds == first["seconds"]
    rec = c2.run(progress=False)
    assert rec["tokens"] == 4 * 2 * 64 and rec["seconds"] > first["seconds"]
    assert abs(rec["tokens_per_second"] * rec["seconds"] - rec["tokens"]) < 1e-6 * rec["tokens"]


def test_cli_refuses_a_bad_fast_lr(tmp_path):
    model = save_tiny(tmp_path / "m", TTT)
    data = write_token_docs(tmp_path / "d")
    r = run_cli(["calibrate", model, "--data", data, "--steps", "1", "--seq-len", "32", "--fast-lr", "0",
                 "-o", str(tmp_path / "o"), "--no-progress"])
    assert r.returncode == 2 and "--fast-lr" in r.stderr, r.stderr


def test_in_place_ttt_defaults_to_a_stable_fast_lr(tmp_path):
    """Without --fast-lr, in-place TTT's own parameters train at min(--lr, 1e-4) (1e-3 diverged on SmolLM2);
    FWL's at --lr; an explicit --fast-lr wins; the record says which."""
    import json

    from fwconvert.config import FWLConfig

    data = write_token_docs(tmp_path / "d")
    for name, fw, extra, want in (("ttt", TTT, [], 1e-4), ("ttt-low", TTT, ["--lr", "5e-5"], None),
                                  ("ttt-set", TTT, ["--fast-lr", "3e-4"], 3e-4),
                                  ("fwl", FWLConfig(size=64, chunk_size=16), [], None)):
        model = save_tiny(tmp_path / f"m-{name}", fw)
        out = tmp_path / f"o-{name}"
        r = run_cli(["calibrate", model, "--data", data, "--steps", "1", "--seq-len", "32", "-o", str(out),
                     "--no-progress", *extra])
        assert r.returncode == 0, r.stderr
        settings = json.load(open(out / "MANIFEST.json"))["calibration"]["settings"]
        assert settings["fast_lr"] == want, (name, settings)


def test_cli_refuses_a_window_without_a_ttt_update(tmp_path):
    """A training window whose predictions (positions 0 .. L - 2) all lie in the first in-place TTT chunk gives the
    TTT parameters no gradient (a chunk's update serves the chunks after it): refused up front with the way out,
    instead of a run that trains nothing (L = C + 1 did, silently) or an internal error in the backward pass
    (--train fast). L = C + 2, the shortest useful window, trains them. A --baseline run has no fast weights and is
    not refused."""
    from safetensors.torch import load_file

    model = save_tiny(tmp_path / "m", TTT)  # chunk 16
    data = write_token_docs(tmp_path / "d")
    for seq_len in ("16", "17"):
        r = run_cli(["calibrate", model, "--data", data, "--steps", "1", "--seq-len", seq_len, "--train", "fast",
                     "-o", str(tmp_path / f"o{seq_len}"), "--no-progress"])
        assert r.returncode == 2 and "--seq-len of at least 18" in r.stderr and "internal error" not in r.stderr, \
            r.stderr
    r = run_cli(["calibrate", model, "--data", data, "--steps", "1", "--seq-len", "18", "--train", "fast",
                 "-o", str(tmp_path / "o18"), "--no-progress"])
    assert r.returncode == 0, r.stderr
    before, after = load_file(os.path.join(model, "model.safetensors")), load_file(str(tmp_path / "o18" / "model.safetensors"))
    moved = [k for k in after if "ttt_" in k and not torch.equal(after[k], before[k])]
    assert moved, "the TTT parameters did not train"
    r = run_cli(["calibrate", model, "--data", data, "--steps", "1", "--seq-len", "16", "--baseline",
                 "-o", str(tmp_path / "b"), "--no-progress"])
    assert r.returncode == 0, r.stderr
