"""Two processes through torchrun (gloo on CPU): each rank its own slice of the global batch, the same
loss curve as one process with the whole batch, and only rank 0 writes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fwconvert.calibrate.loop import CalibrationSettings
from fwconvert.calibrate.run import calibrate
from fwconvert.config import FWLConfig
from test_calibrate_support import REPO, save_tiny, write_token_docs


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path):
    model = save_tiny(tmp_path / "fwl", FWLConfig(size=64, chunk_size=16))
    data = write_token_docs(tmp_path / "data", n=6, length=300)
    one = calibrate(model, [data], str(tmp_path / "one"),
                    CalibrationSettings(steps=4, seq_len=64, batch_size=2, lr=3e-2, save_every=2), progress=False)
    out = str(tmp_path / "two")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "-m", "fwconvert", "calibrate", model, "--data", data, "-o", out, "--seq-len", "64", "--batch-size", "1",
           "--lr", "3e-2", "--steps", "4", "--save-every", "2", "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("calibrated 4 steps") == 1  # only rank 0 reports (and writes)
    rec = json.load(open(os.path.join(out, "MANIFEST.json")))["calibration"]
    assert rec["world_size"] == 2 and rec["data"] == one["data"]
    assert torch.allclose(torch.tensor(rec["losses"]), torch.tensor(one["losses"]), atol=1e-4, rtol=0)
