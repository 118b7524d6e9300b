"""Calibration and evaluation on a CUDA GPU (bf16 autocast over fp32 master weights); skipped without one."""
import json
import os

import pytest
import torch

from fwconvert.calibrate import checkpoint as ckpt
from fwconvert.calibrate.loop import CalibrationSettings
from fwconvert.calibrate.run import calibrate
from fwconvert.config import FWLConfig, InPlaceTTTConfig
from test_calibrate_support import run_cli, save_tiny, write_token_docs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("fw", [FWLConfig(size=64, chunk_size=16), InPlaceTTTConfig(layers=(0, 1), chunk_size=16)],
                         ids=["fwl", "inplace_ttt"])
def test_cuda_calibration_learns_is_reproducible_and_resumes(tmp_path, fw):
    model = save_tiny(tmp_path / "m", fw)
    data = write_token_docs(tmp_path / "data", n=8, length=600)
    s = CalibrationSettings(steps=30, seq_len=256, batch_size=4, lr=3e-2, save_every=10)
    a = calibrate(model, [data], str(tmp_path / "a"), s, device="cuda", progress=False)
    b = calibrate(model, [data], str(tmp_path / "b"), s, device="cuda", progress=False)
    assert sum(a["losses"][-5:]) < sum(a["losses"][:5]) - 0.5
    assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) < 1e-3  # deterministic flags
    out = str(tmp_path / "k")
    flags = [model, "--data", data, "-o", out, "--seq-len", "256", "--batch-size", "4", "--lr", "3e-2", "--steps", "30",
             "--save-every", "10", "--device", "cuda", "--no-progress"]
    r = run_cli(["calibrate", *flags], {"FWCONVERT_TESTING": "1", "FWCONVERT_FAULT": "kill_at_step:20"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert ckpt.list_checkpoints(ckpt.work_dir_for(out))[-1] == "step-00000020"
    r = run_cli(["calibrate", *flags, "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.load(open(os.path.join(out, "MANIFEST.json")))["calibration"]
    assert max(abs(x - y) for x, y in zip(rec["losses"], a["losses"])) < 1e-3


def test_cuda_eval_with_dynamic_eval(tmp_path):
    model = save_tiny(tmp_path / "m", FWLConfig(size=64, chunk_size=16))
    base = save_tiny(tmp_path / "b", None)
    data = write_token_docs(tmp_path / "data", n=4, length=600)
    r = run_cli(["eval", model, "--data", data, "--context", "512", "--chunk-size", "128", "--base", base,
                 "--dynamic-eval", "--device", "cuda", "--dtype", "bf16", "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert set(out["models"]) == {"fwl", "base", "dynamic_eval"}
    # converted == base at conversion values (bf16 rounding aside)
    assert abs(out["models"]["fwl"]["perplexity"] / out["models"]["base"]["perplexity"] - 1) < 2e-2


def test_cuda_tf32_setting_reaches_the_matmul_flag(tmp_path):
    model = save_tiny(tmp_path / "m", InPlaceTTTConfig(layers=(0, 1), chunk_size=16))
    data = write_token_docs(tmp_path / "data", n=4, length=600)
    for tf32 in (True, False):
        s = CalibrationSettings(steps=3, seq_len=256, batch_size=2, lr=3e-2, save_every=3, tf32=tf32)
        rec = calibrate(model, [data], str(tmp_path / f"o{tf32}"), s, device="cuda", progress=False)
        assert rec["flags"]["cuda_matmul_allow_tf32"] is tf32 and rec["settings"]["tf32"] is tf32
        assert torch.backends.cuda.matmul.allow_tf32 is tf32
