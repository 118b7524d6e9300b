"""SIGTERM during calibration: the update in flight finishes, its checkpoint is written, exit 143, and
``--resume`` carries on from that step."""
import os
import signal
import subprocess
import sys
import time

from fwconvert.calibrate import checkpoint as ckpt
from fwconvert.config import FWLConfig
from test_calibrate_support import REPO, save_tiny, write_token_docs


def test_sigterm_checkpoints_the_current_step_and_exits_143(tmp_path):
    model = save_tiny(tmp_path / "fwl", FWLConfig(size=64, chunk_size=16))
    data = write_token_docs(tmp_path / "data", n=4, length=300)
    out = str(tmp_path / "out")
    work = ckpt.work_dir_for(out)
    args = [sys.executable, "-m", "fwconvert", "calibrate", model, "--data", data, "-o", out, "--seq-len", "64",
            "--steps", "100000", "--save-every", "3", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 150
        while not ckpt.list_checkpoints(work) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert ckpt.list_checkpoints(work), "no checkpoint appeared"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err[-2000:]
    assert "terminated: checkpoint of step" in err and "Traceback" not in err
    assert "Error: terminated; the checkpoint of step" in err and "nothing written" not in err  # the last line agrees
    last = ckpt.list_checkpoints(work)[-1]
    state = ckpt.load_latest(work, _run_id_of(work, last), lambda m: None)
    assert state["step"] == int(last[5:]) and len(state["losses"]) == state["step"]
    assert not os.path.exists(out)


def _run_id_of(work, name):
    import json

    with open(os.path.join(work, name, "COMPLETE")) as f:
        return json.load(f)["run_id"]
