"""Conversion refusals and faults through the real CLI: existing/overlapping/symlinked/read-only outputs,
--force over a larger output, bad options, non-finite tensors, SIGINT/SIGTERM mid-run (subprocess)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_convert import run_cli, tensors_of
from test_writer import _make_readonly, staging_left, tree
from tiny import make_hf_model, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def src(tmp_path):
    return save_checkpoint(make_hf_model("llama"), str(tmp_path / "src"))

PREVIOUS_MANIFEST = '{"format": "fwconvert-manifest/1"}'  # what marks an earlier output (--force replaces it)


def no_traceback(err):
    return "Traceback" not in err and err.strip().startswith("Error:")


def test_existing_output_refused_without_force(tmp_path, capsys, src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    before = tree(out)
    code, _, err = run_cli(capsys, "add-fwl", src, "-o", out)
    assert code == 4 and str(out) in err and "--force" in err and no_traceback(err)
    assert tree(out) == before and staging_left(tmp_path) == []


def test_force_over_larger_previous_output_leaves_no_stale_file(tmp_path, capsys, src):
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    assert run_cli(capsys, "mark-fast", src, "-o", fresh, "--layers", "0", "--chunk-size", "8")[0] == 0
    out.mkdir()
    for i in range(7):
        (out / f"model-0000{i + 1}-of-00007.safetensors").write_bytes(b"stale")
    (out / "model.safetensors.index.json").write_text("{}")
    (out / "model.onnx.data").write_bytes(b"stale")
    code, _, err = run_cli(capsys, "mark-fast", src, "-o", out, "--layers", "0", "--chunk-size", "8", "--force")
    assert code == 4 and "not an fwconvert output" in err and no_traceback(err)  # maybe the user's own folder
    assert len(os.listdir(out)) == 9  # untouched
    (out / "MANIFEST.json").write_text(PREVIOUS_MANIFEST)  # an earlier output of ours: replaced
    code, _, err = run_cli(capsys, "mark-fast", src, "-o", out, "--layers", "0", "--chunk-size", "8", "--force")
    assert code == 0, err
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh))
    assert tree(out) == tree(fresh) and staging_left(tmp_path) == []


@pytest.mark.parametrize("where", ["same", "inside", "shard"])
def test_output_overlapping_input_refused(tmp_path, capsys, src, where):
    out = {"same": src, "inside": os.path.join(src, "sub"), "shard": os.path.join(src, "model.safetensors.index.json")}[where]
    before = tree(src)
    code, _, err = run_cli(capsys, "add-fwl", src, "-o", out, "--force")
    assert code == 4 and "overlaps input" in err and no_traceback(err)
    assert tree(src) == before and staging_left(src) == [] and staging_left(tmp_path) == []


def test_symlinked_output_refused(tmp_path, capsys, src):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "model.safetensors").write_bytes(b"victim")
    (tmp_path / "out").symlink_to(victim)
    for extra in ([], ["--force"]):
        code, _, err = run_cli(capsys, "add-fwl", src, "-o", tmp_path / "out", *extra)
        assert code == 4 and "symbolic link" in err
    assert tree(victim) == {"model.safetensors": tree(victim)["model.safetensors"]}
    assert (victim / "model.safetensors").read_bytes() == b"victim"


def test_readonly_parent_exit_5_before_work(tmp_path, capsys, src):
    parent = tmp_path / "ro"
    parent.mkdir()
    undo = _make_readonly(parent)
    if undo is None:
        pytest.skip("running as root without chattr: cannot make a folder read-only here")
    try:
        code, _, err = run_cli(capsys, "add-fwl", src, "-o", parent / "out")
    finally:
        undo()
    assert code == 5 and "not writable" in err and no_traceback(err)
    assert os.listdir(parent) == []


@pytest.mark.parametrize("args, needle", [
    (["add-fwl", "--size", "0"], "--size must be a positive integer"),
    (["add-fwl", "--size", "32"], "must equal the model's hidden_size 64"),
    (["add-fwl", "--chunk-size", "0"], "--chunk-size must be an integer >= 1"),
    (["mark-fast", "--layers", "0,7"], "layer 7 is out of range"),
    (["mark-fast", "--layers", "0,0"], "listed twice"),
    (["mark-fast", "--layers", ""], "layer spec is empty"),
    (["mark-fast", "--chunk-size", "4"], "must be an integer in [5, 512]"),
    (["mark-fast", "--chunk-size", "513"], "must be an integer in [5, 512]"),
    (["mark-fast", "--lr", "nan"], "--lr must be a finite number"),
])
def test_bad_options_clear_error_nothing_written(tmp_path, capsys, src, args, needle):
    code, _, err = run_cli(capsys, args[0], src, "-o", tmp_path / "out", *args[1:])
    assert code == 2 and needle in err and no_traceback(err), err  # bad option values: usage errors
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_non_gated_mlp_refused(tmp_path, capsys):
    folder = tmp_path / "src"
    save_checkpoint(make_hf_model("llama"), str(folder), shard_kb=10**6)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    del sd["model.layers.1.mlp.gate_proj.weight"]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli(capsys, "mark-fast", folder, "-o", tmp_path / "out", "--layers", "1", "--chunk-size", "8")
    assert code == 3 and "gate_proj" in err and no_traceback(err)
    assert not (tmp_path / "out").exists()


def test_nonfinite_tensor_refused_unless_allowed(tmp_path, capsys):
    hf = make_hf_model("llama")
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight[0, :3] = float("nan")
    src = save_checkpoint(hf, str(tmp_path / "src"))
    code, _, err = run_cli(capsys, "add-fwl", src, "-o", tmp_path / "out")
    assert code == 6 and "model.layers.1.mlp.up_proj.weight" in err and no_traceback(err)
    assert sorted(os.listdir(tmp_path)) == ["src"]
    code, _, err = run_cli(capsys, "add-fwl", src, "-o", tmp_path / "out", "--allow-nonfinite")
    assert code == 0 and "Warning:" in err and "model.layers.1.mlp.up_proj.weight" in err
    name = "model.layers.1.mlp.up_proj.weight"
    assert tensors_of(tmp_path / "out")[name] == tensors_of(src)[name]  # NaNs copied bit for bit


def _spawn(args, env_extra):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", FWCONVERT_TESTING="1", **env_extra)
    return subprocess.Popen([sys.executable, "-m", "fwconvert", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_staging(folder, alive, seconds=120):
    deadline = time.time() + seconds
    while not staging_left(folder) and time.time() < deadline and alive():
        time.sleep(0.05)
    return bool(staging_left(folder))


@pytest.mark.timeout(180)
def test_sigint_mid_run_subprocess(tmp_path, src):
    """A real ``python -m fwconvert`` process: SIGINT mid-run -> exit 130, nothing written, no staging left."""
    proc = _spawn(["add-fwl", src, "-o", tmp_path / "out"], {"FWCONVERT_FAULT": "sleep_after_tensor:3,sleep_s:60"})
    assert _wait_for_staging(tmp_path, lambda: proc.poll() is None), "the conversion never started staging"
    time.sleep(0.5)  # let it reach the sleep after tensor 3
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; nothing written" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["src"]


def _fork_cli(args, fault, monkeypatch):
    """Run the CLI in a forked child (torch already imported: no slow start); returns its pid."""
    monkeypatch.setenv("FWCONVERT_TESTING", "1")
    monkeypatch.setenv("FWCONVERT_FAULT", fault)
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            from fwconvert.cli.main import main

            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            os._exit(code)
    return pid


def _child_alive(pid):
    return os.waitpid(pid, os.WNOHANG) == (0, 0)


@pytest.mark.timeout(120)
def test_sigterm_mid_run_exits_143_and_cleans_up(tmp_path, src, monkeypatch):
    pid = _fork_cli(["add-fwl", src, "-o", tmp_path / "out"], "sleep_after_tensor:3,sleep_s:60", monkeypatch)
    assert _wait_for_staging(tmp_path, lambda: True, 60)
    time.sleep(0.5)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 143
    assert sorted(os.listdir(tmp_path)) == ["src"]


@pytest.mark.timeout(120)
def test_sigkill_after_shard_leaves_only_staging_and_next_run_reports_it(tmp_path, src, monkeypatch, capsys):
    pid = _fork_cli(["add-fwl", src, "-o", tmp_path / "out"], "after_shard:1", monkeypatch)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    left = staging_left(tmp_path)
    assert len(left) == 1 and sorted(os.listdir(tmp_path)) == sorted(["src"] + left)
    assert "MANIFEST.json" not in os.listdir(tmp_path / left[0])
    monkeypatch.delenv("FWCONVERT_FAULT")
    code, _, err = run_cli(capsys, "add-fwl", src, "-o", tmp_path / "out")
    assert code == 0 and "Warning:" in err and left[0] in err


def test_enospc_at_shard_exit_5_old_output_kept(tmp_path, capsys, src, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous version")
    (out / "MANIFEST.json").write_text(PREVIOUS_MANIFEST)  # an earlier output of ours: --force may replace it
    before = tree(out)
    monkeypatch.setenv("FWCONVERT_TESTING", "1")
    monkeypatch.setenv("FWCONVERT_FAULT", "enospc_at:model.safetensors")
    code, _, err = run_cli(capsys, "add-fwl", src, "-o", out, "--force")
    assert code == 5 and "model.safetensors: no space left" in err and "bytes free" in err and no_traceback(err)
    assert tree(out) == before and staging_left(tmp_path) == []


def test_planted_symlink_in_old_output_is_never_followed(tmp_path, capsys, src):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"victim")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").symlink_to(victim)
    (out / "MANIFEST.json").write_text(PREVIOUS_MANIFEST)
    code, _, err = run_cli(capsys, "add-fwl", src, "-o", out, "--force")
    assert code == 0, err
    assert victim.read_bytes() == b"victim"
    assert not (out / "model.safetensors").is_symlink() and (out / "model.safetensors").stat().st_size > 1000
