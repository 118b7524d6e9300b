"""Two processes through torchrun (gloo on CPU): each rank its own slice of the global batch, the same
loss curve as one process with the whole batch, and only rank 0 writes."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from fwconvert.calibrate.loop import CalibrationSettings
from fwconvert.calibrate.run import calibrate
from fwconvert.config import FWLConfig
from test_calibrate_support import REPO, save_tiny, write_token_docs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path):
    model = save_tiny(tmp_path / "fwl", FWLConfig(size=64, chunk_size=16))
    data = write_token_docs(tmp_path / "data", n=6, length=300)
    one = calibrate(model, [data], str(tmp_path / "one"),
                    CalibrationSettings(steps=4, seq_len=64, batch_size=2, lr=3e-2, save_every=2), progress=False)
    out = str(tmp_path / "two")
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "fwconvert", "calibrate", model, "--data", data, "-o", out, "--seq-len", "64", "--batch-size", "1",
           "--lr", "3e-2", "--steps", "4", "--save-every", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        proc.communicate()
        pytest.fail("torchrun timed out")
    # the workers' own messages come first, torchrun's traceback last: show both ends
    assert proc.returncode == 0, stderr if len(stderr) < 4000 else stderr[:2000] + "\n...\n" + stderr[-2000:]
    assert stdout.count("calibrated 4 steps") == 1  # only rank 0 reports (and writes)
    rec = json.load(open(os.path.join(out, "MANIFEST.json")))["calibration"]
    assert rec["world_size"] == 2 and rec["data"] == one["data"]
    assert torch.allclose(torch.tensor(rec["losses"]), torch.tensor(one["losses"]), atol=1e-4, rtol=0)


def test_unwrap_frees_the_ddp_wrapper_before_teardown(tmp_path):
    """The DDP wrapper holds the process group; left alive in its reference cycles past destroy_process_group,
    gloo's threads met interpreter finalisation and a finished worker died with SIGABRT."""
    import gc
    import weakref

    import torch.distributed as dist

    from fwconvert.calibrate import ddp
    from fwconvert.calibrate.data import WindowSampler
    from fwconvert.calibrate.loop import Calibrator
    from fwconvert.calibrate.params import base_parameter_names, select_trainable
    from test_calibrate_support import phrase_docs, tiny_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, cfg = tiny_model(FWLConfig(size=64, chunk_size=16))
        tr = select_trainable(model, "fast", base_parameter_names(cfg))
        s = CalibrationSettings(steps=1, seq_len=64, batch_size=1, lr=3e-2, save_every=1)
        d = ddp.Dist(rank=0, world=2)  # "several processes": wrap() wraps (the group itself has one rank here)
        calib = Calibrator(model, tr, WindowSampler(phrase_docs(2, 200), 64, 0), s, str(tmp_path / "w"), "r",
                           torch.device("cpu"), dist=d)
        calib.run(progress=False)
        ref = weakref.ref(calib.wrapped)
        assert isinstance(ref(), torch.nn.parallel.DistributedDataParallel)
        calib.unwrap()
        gc.collect()
        assert ref() is None and calib.wrapped is model
    finally:
        dist.destroy_process_group()
