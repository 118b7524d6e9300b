"""Reliability test 25, second variant: ENOSPC from the kernel on a real, small tmpfs (Linux, root).

Each test mounts its own tmpfs (``mount -t tmpfs -o size=...``) inside ``tmp_path``, runs the real CLI
in-process (``fwconvert.cli.main.main``) on a tiny checkpoint written outside the tmpfs, and unmounts in the
fixture's teardown. Where mounting is not permitted (not root / no CAP_SYS_ADMIN, not Linux, no ``mount``)
the tests skip with the reason; the simulated variant (``FWCONVERT_FAULT=enospc_at:``) lives in
test_writer.py / test_convert_cli.py.

* preflight: a tmpfs smaller than the disk estimate refuses (exit 5) before any work, naming the output,
  the bytes needed and the bytes free; nothing is created in the tmpfs (not even a missing parent folder);
* the disk really fills while writing: the preflight passes on a roomy tmpfs, then a ballast file (another
  writer) takes the free space at a chosen moment, so that the kernel's own ENOSPC hits (a) shard 2 of 5
  of ``add-fwl``, (b) the staging folder's first write, (c) ``model.onnx`` of ``export-onnx``. Each gives
  exit 5 naming the file (or output) with the bytes needed and free; the staging folder is gone, no partial
  output, the previous output (``--force``) is byte-identical, and once the ballast is deleted the tmpfs
  holds exactly what it held before (no staging file kept alive by a leaked descriptor).
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

import fwconvert.checkpoint.shards as S
import fwconvert.checkpoint.writer as W
from test_convert import run_cli
from test_writer import staging_left, tree
from tiny import make_hf_model, save_checkpoint

PAGE = 4096
NO_SPACE = r": no space left on device \((\d+) more bytes needed, (\d+) bytes free\)"


def _run(*cmd):
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)


@pytest.fixture
def tmpfs(tmp_path):
    """Factory: tmpfs(size_bytes) -> the mount point of a fresh tmpfs of that size (unmounted at teardown)."""
    mounts = []

    def mount(size: int):
        if not sys.platform.startswith("linux"):
            pytest.skip("real-tmpfs ENOSPC variant: Linux only")
        if shutil.which("mount") is None or shutil.which("umount") is None:
            pytest.skip("real-tmpfs ENOSPC variant: no mount/umount command")
        point = tmp_path / f"tmpfs{len(mounts)}"
        point.mkdir()
        r = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point))
        if r.returncode != 0:
            pytest.skip(f"real-tmpfs ENOSPC variant: mounting a tmpfs is not permitted here (needs root or "
                        f"CAP_SYS_ADMIN): {(r.stderr or r.stdout).strip() or f'mount exited {r.returncode}'}")
        mounts.append(point)
        usage = shutil.disk_usage(point)
        assert os.path.ismount(point) and usage.total == size and usage.used == 0, usage
        return str(point)

    yield mount
    failed = []
    for point in reversed(mounts):
        if _run("umount", str(point)).returncode != 0 and _run("umount", "-l", str(point)).returncode != 0:
            failed.append(str(point))
    assert not failed, f"could not unmount {failed}"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny llama checkpoint (several shards) outside any tmpfs."""
    return save_checkpoint(make_hf_model("llama"), str(tmp_path_factory.mktemp("enospc") / "src"))


@pytest.fixture(scope="module")
def src1(tmp_path_factory):
    """The same with one layer: its ONNX export traces in ~10 s instead of ~15 s."""
    return save_checkpoint(make_hf_model("llama", num_hidden_layers=1), str(tmp_path_factory.mktemp("enospc") / "src1"))


@pytest.fixture(autouse=True)
def _real_faults_only(monkeypatch):
    monkeypatch.delenv("FWCONVERT_FAULT", raising=False)  # every ENOSPC here comes from the kernel
    monkeypatch.delenv("FWCONVERT_TESTING", raising=False)


def fill(mount: str, leave: int = 0) -> None:
    """Another writer: a ballast file takes the tmpfs's free space but ``leave`` bytes (whole pages)."""
    path = os.path.join(mount, "ballast")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        take = shutil.disk_usage(mount).free - leave
        if take > 0:
            os.posix_fallocate(fd, os.fstat(fd).st_size, take)
    finally:
        os.close(fd)
    assert shutil.disk_usage(mount).free == leave


def used(mount: str) -> int:
    return shutil.disk_usage(mount).used


def _no_work(monkeypatch, module, name):
    """Record calls of ``module.name`` (the first heavy step after the preflight)."""
    calls = []
    real = getattr(module, name)

    def spy(*a, **k):
        calls.append(name)
        return real(*a, **k)

    monkeypatch.setattr(module, name, spy)
    return calls


# -- preflight: the estimate is above the free space -------------------------------------------------------
@pytest.mark.parametrize("nested", [False, True], ids=["out", "missing-parent"])
def test_add_fwl_refused_at_preflight_on_small_tmpfs(tmpfs, src, capsys, monkeypatch, nested):
    import fwconvert.convert as C

    mount = tmpfs(1 << 20)  # the output (~0.45 MB) would fit; the estimate (+1 MiB headroom) does not
    out = os.path.join(mount, "sub", "out") if nested else os.path.join(mount, "out")
    work = _no_work(monkeypatch, C, "new_tensors")
    code, stdout, err = run_cli(capsys, "add-fwl", src, "-o", out)
    assert code == 5, err
    m = re.search(re.escape(out) + r": not enough disk space: (\d+) bytes needed, (\d+) bytes free", err)
    assert m and err.startswith("Error:") and "Traceback" not in err, err
    assert int(m.group(1)) > int(m.group(2)) == 1 << 20
    assert work == [] and stdout == ""
    assert os.listdir(mount) == [] and used(mount) == 0


def test_export_onnx_refused_at_preflight_on_small_tmpfs(tmpfs, src1, capsys, monkeypatch):
    import exporters.onnx.export as E

    mount = tmpfs(1 << 20)
    out = os.path.join(mount, "onnx")
    work = _no_work(monkeypatch, E, "_load")
    code, _, err = run_cli(capsys, "export-onnx", src1, "-o", out)
    assert code == 5, err
    m = re.search(re.escape(out) + r": not enough disk space: (\d+) bytes needed, (\d+) bytes free", err)
    assert m and "Traceback" not in err, err
    assert int(m.group(1)) > int(m.group(2)) == 1 << 20
    assert work == [] and os.listdir(mount) == [] and used(mount) == 0


# -- the preflight passes, then the disk really fills -------------------------------------------------------
def _fill_when_opened(monkeypatch, mount, fname, leave):
    """Fill the tmpfs (``leave`` bytes free) just before the output file ``fname`` is created."""
    real, filled = W.HashingFile.__init__, []

    def init(self, path, owner):
        if os.path.basename(path) == fname and not filled:
            fill(mount, leave)
            filled.append(path)
        real(self, path, owner)

    monkeypatch.setattr(W.HashingFile, "__init__", init)
    return filled


def test_add_fwl_disk_fills_at_shard_2_exit_5_old_output_kept(tmpfs, src, capsys, monkeypatch):
    mount = tmpfs(4 << 20)
    out = os.path.join(mount, "out")
    monkeypatch.setattr(S, "DEFAULT_SHARD_BYTES", 100_000)  # 5 output shards of ~0.1 MB
    code, _, err = run_cli(capsys, "add-fwl", src, "-o", out)  # the previous output, on the tmpfs too
    assert code == 0, err
    shard2 = "model-00002-of-00005.safetensors"
    assert shard2 in os.listdir(out)
    before, before_used = tree(out), used(mount)

    # shard 1 fits; shard 2 gets two pages, then the kernel says ENOSPC part-way through its tensors
    filled = _fill_when_opened(monkeypatch, mount, shard2, leave=2 * PAGE)
    code, stdout, err = run_cli(capsys, "add-fwl", src, "-o", out, "--force", "--seed", "1")
    assert code == 5, err
    assert filled, "the ballast was never placed"
    staging = os.path.dirname(filled[0])
    assert os.path.basename(staging).startswith(".out" + W.PARTIAL_TAG)
    m = re.search(re.escape(os.path.join(staging, shard2)) + NO_SPACE, err)
    assert m and err.startswith("Error:") and "Traceback" not in err, err
    assert int(m.group(1)) > 0 and int(m.group(2)) < 2 * PAGE  # the two pages were taken by shard 2
    assert stdout == ""
    assert not os.path.exists(staging) and staging_left(mount) == []
    assert sorted(os.listdir(mount)) == ["ballast", "out"]
    assert tree(out) == before
    os.unlink(os.path.join(mount, "ballast"))
    assert used(mount) == before_used  # nothing of the failed run is left, not even an open, deleted file


def test_add_fwl_disk_fills_before_staging_exit_5_names_output(tmpfs, src, capsys, monkeypatch):
    """The disk fills between the preflight and the staging folder's first write (resume journal)."""
    mount = tmpfs(4 << 20)
    out = os.path.join(mount, "out")
    real, filled = W.AtomicOutput._new_staging, []

    def new_staging(self):
        fill(mount, 0)
        filled.append(True)
        return real(self)

    monkeypatch.setattr(W.AtomicOutput, "_new_staging", new_staging)
    code, _, err = run_cli(capsys, "add-fwl", src, "-o", out)
    assert code == 5, err
    assert filled
    m = re.search(re.escape(out) + NO_SPACE, err)
    assert m and "Traceback" not in err, err
    assert int(m.group(1)) > 0 and int(m.group(2)) == 0
    assert os.listdir(mount) == ["ballast"]
    os.unlink(os.path.join(mount, "ballast"))
    assert used(mount) == 0


def test_export_onnx_disk_fills_at_model_onnx_exit_5_old_output_kept(tmpfs, src1, capsys, monkeypatch):
    import exporters.onnx.export as E

    mount = tmpfs(4 << 20)  # the preflight's estimate (~1.2 MB) passes
    out = os.path.join(mount, "onnx")
    os.mkdir(out)
    for name, data in (("model.onnx", b"previous graph"), ("manifest.json", b"{}")):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    before, before_used = tree(out), used(mount)
    real, filled = E.export_program, []

    def export_program(*a, **k):  # traced; the disk fills before model.onnx (~0.3 MB) is written
        result = real(*a, **k)
        fill(mount, 2 * PAGE)
        filled.append(True)
        return result

    monkeypatch.setattr(E, "export_program", export_program)
    code, stdout, err = run_cli(capsys, "export-onnx", src1, "-o", out, "--force", "--chunk-size", "4")
    assert code == 5, err
    assert filled
    m = re.search(re.escape(mount) + r"/\.onnx\.staging-[^/ ]+/model\.onnx" + NO_SPACE, err)
    assert m and err.splitlines()[-1].startswith("Error:") and err.count("Error:") == 1 and "Traceback" not in err, err
    assert int(m.group(1)) > 0 and int(m.group(2)) < 2 * PAGE
    assert stdout == ""
    assert sorted(os.listdir(mount)) == ["ballast", "onnx"]  # the staging folder is gone
    assert tree(out) == before
    os.unlink(os.path.join(mount, "ballast"))
    assert used(mount) == before_used
