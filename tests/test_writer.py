"""The atomic folder writer: preflight refusals, staging cleanup, --force swaps, manifest, streamed shards
(reliability tests 19-22, 25, 26 at the writer level; the CLI-level variants are in test_convert_cli.py)."""
import errno
import hashlib
import json
import os
import random
import subprocess

import pytest
import torch
from safetensors import safe_open

from fwconvert.checkpoint import writer as W
from fwconvert.errors import OutputError, ResourceError


def tree(path):
    """{relative path: sha256} of every file under path (symlinks recorded as their target)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for n in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, path)
            out[rel] = ("link:" + os.readlink(p)) if os.path.islink(p) else hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def staging_left(parent):
    return [n for n in os.listdir(parent) if W.PARTIAL_TAG in n or W.OLD_TAG in n]


def test_publish_writes_manifest_last_with_hashes(tmp_path):
    out = tmp_path / "out"
    with W.AtomicOutput(out, inputs=[]) as ao:
        ao.write_bytes("a.bin", b"hello")
        ao.write_json("config.json", {"x": 1})
        ao.manifest.update(flags={"k": 1}, input_fingerprint="abc")
        assert not out.exists() and os.path.isdir(ao.staging)
        assert os.path.dirname(ao.staging) == str(tmp_path) and W.PARTIAL_TAG in ao.staging
    man = json.loads((out / "MANIFEST.json").read_text())
    assert man["files"]["a.bin"] == {"sha256": hashlib.sha256(b"hello").hexdigest(), "size": 5}
    assert set(man["files"]) == {"a.bin", "config.json"}
    assert man["input_fingerprint"] == "abc" and man["flags_sha256"] and "fwconvert" in man["versions"]
    assert staging_left(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_any_exception_removes_staging_and_writes_nothing(tmp_path, exc):
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        with W.AtomicOutput(out) as ao:
            ao.write_bytes("a.bin", b"x" * 100)
            raise exc
    assert not out.exists() and staging_left(tmp_path) == []


def test_existing_output_refused_without_force_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    before = tree(out)
    with pytest.raises(OutputError, match="already exists.*--force"):
        W.preflight(out)
    with pytest.raises(OutputError):
        with W.AtomicOutput(out) as ao:
            ao.write_bytes("a", b"1")
    assert tree(out) == before and staging_left(tmp_path) == []


def test_force_replaces_larger_old_output_and_old_survives_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for i in range(5):
        (out / f"model-0000{i + 1}-of-00005.safetensors").write_bytes(b"old" * 10)
    (out / "model.onnx.data").write_bytes(b"stale")
    before = tree(out)
    with pytest.raises(RuntimeError):  # a crash mid-write: the old output is untouched
        with W.AtomicOutput(out, force=True) as ao:
            ao.write_bytes("model.safetensors", b"new")
            raise RuntimeError("crash")
    assert tree(out) == before
    with W.AtomicOutput(out, force=True) as ao:
        ao.write_bytes("model.safetensors", b"new")
    assert sorted(os.listdir(out)) == ["MANIFEST.json", "model.safetensors"]
    assert staging_left(tmp_path) == []


def test_force_fallback_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "_renameat2", lambda src, dst, flags: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"s")
    with W.AtomicOutput(out, force=True) as ao:
        ao.write_bytes("new.bin", b"n")
    assert sorted(os.listdir(out)) == ["MANIFEST.json", "new.bin"] and staging_left(tmp_path) == []


def test_output_overlapping_input_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    f = src / "model.safetensors"
    f.write_bytes(b"x")
    for out, inputs in [(src, [src]), (src / "sub", [src]), (tmp_path, [src]), (f, [f]), (tmp_path, [f])]:
        with pytest.raises(OutputError, match="overlaps input"):
            W.preflight(out, inputs, force=True)
    assert W.preflight(tmp_path / "model-fwl", [f]) == str(tmp_path / "model-fwl")  # a sibling of a file input is fine


def test_symlinked_output_refused_and_victim_untouched(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep")
    link = tmp_path / "out"
    link.symlink_to(victim)
    for force in (False, True):
        with pytest.raises(OutputError, match="symbolic link"):
            with W.AtomicOutput(link, force=force) as ao:
                ao.write_bytes("precious", b"overwritten")
    assert (victim / "precious").read_text() == "keep" and os.listdir(victim) == ["precious"]


def test_files_are_created_exclusively_without_following_links(tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        with W.AtomicOutput(tmp_path / "out") as ao:
            os.symlink(victim, os.path.join(ao.staging, "model.safetensors"))  # planted link
            ao.write_bytes("model.safetensors", b"evil")
    assert victim.read_bytes() == b"keep" and not (tmp_path / "out").exists()
    with pytest.raises(OutputError, match="plain file names"):
        with W.AtomicOutput(tmp_path / "out2") as ao:
            ao.write_bytes("../escape", b"x")
    assert not (tmp_path / "escape").exists()


def _make_readonly(path):
    """Make a folder unwritable even for root (chattr +i); returns an undo function or None."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        return lambda: os.chmod(path, 0o755)
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    return (lambda: subprocess.run(["chattr", "-i", str(path)])) if r.returncode == 0 else None


def test_readonly_parent_refused_at_preflight(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    undo = _make_readonly(parent)
    if undo is None:
        pytest.skip("running as root without chattr: cannot make a folder read-only here")
    try:
        with pytest.raises(ResourceError, match="not writable"):
            W.preflight(parent / "out")
    finally:
        undo()
    assert os.listdir(parent) == []


def test_disk_estimate_above_free_space_refused(tmp_path):
    free = __import__("shutil").disk_usage(tmp_path).free
    with pytest.raises(ResourceError, match=r"bytes needed, \d+ bytes free"):
        W.preflight(tmp_path / "out", estimate_bytes=free * 10 + 1)
    assert os.listdir(tmp_path) == []


def test_enospc_while_writing_names_file_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setenv("FWCONVERT_TESTING", "1")
    monkeypatch.setenv("FWCONVERT_FAULT", "enospc_at:model.safetensors")
    with pytest.raises(ResourceError, match=r"model.safetensors: no space left.*bytes needed, \d+ bytes free"):
        with W.AtomicOutput(tmp_path / "out", estimate_bytes=1000) as ao:
            ao.write_bytes("config.json", b"{}")
            ao.write_bytes("model.safetensors", b"x" * 10)
    assert os.listdir(tmp_path) == []


def test_fault_hooks_need_the_testing_flag(monkeypatch):
    monkeypatch.setenv("FWCONVERT_FAULT", "after_shard:1")
    monkeypatch.delenv("FWCONVERT_TESTING", raising=False)
    assert W.faults() == {}
    monkeypatch.setenv("FWCONVERT_TESTING", "1")
    assert W.faults() == {"after_shard": "1"}


def test_leftover_staging_is_reported_not_reused(tmp_path, caplog, monkeypatch):
    import logging

    # the CLI turns propagation off once a command has run in this process; caplog listens at the root
    monkeypatch.setattr(logging.getLogger("fwconvert"), "propagate", True)
    old = tmp_path / ".out.fwconvert-partial-1-dead"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"partial")
    with caplog.at_level("WARNING", logger="fwconvert"):
        with W.AtomicOutput(tmp_path / "out") as ao:
            ao.write_bytes("a", b"1")
    assert any(str(old) in r.getMessage() and r.getMessage().startswith("Warning:") for r in caplog.records)
    assert sorted(os.listdir(tmp_path / "out")) == ["MANIFEST.json", "a"]
    assert (old / "model.safetensors").read_bytes() == b"partial"


@pytest.mark.parametrize("max_shard", [10**9, 700])
def test_sharded_writer_any_arrival_order_is_valid_safetensors(tmp_path, max_shard):
    g = torch.Generator().manual_seed(0)
    dts = [torch.float32, torch.bfloat16, torch.float16]
    ts = {f"layer.{i}.w": torch.randn(3 + i, 5, generator=g).to(dts[i % 3]) for i in range(9)}
    ts["nan"] = torch.tensor([float("nan"), -0.0, float("inf")])
    ts["empty"] = torch.zeros(0, 4)
    plan = {k: (tuple(v.shape), v.numel() * v.element_size()) for k, v in ts.items()}
    with W.AtomicOutput(tmp_path / "out") as ao:
        w = W.ShardedSafetensorsWriter(ao, plan, max_shard_bytes=max_shard)
        names = list(ts)
        random.Random(1).shuffle(names)
        for n in names:
            w.add(n, ts[n])
        shards = w.close()
    out = tmp_path / "out"
    if max_shard < 10**9:
        assert len(shards) > 1
        wm = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    else:
        assert shards == ["model.safetensors"]
        wm = {n: "model.safetensors" for n in ts}
    assert set(wm) == set(ts)
    man = json.loads((out / "MANIFEST.json").read_text())["files"]
    for n, f in wm.items():
        with safe_open(str(out / f), "pt") as h:
            got = h.get_tensor(n)
        assert got.dtype == ts[n].dtype and torch.equal(got.view(torch.uint8), ts[n].view(torch.uint8)), n
    for f in set(wm.values()):
        assert man[f]["sha256"] == hashlib.sha256((out / f).read_bytes()).hexdigest()


def test_sharded_writer_refuses_unplanned_or_missing(tmp_path):
    with pytest.raises(OutputError, match="never arrived"):
        with W.AtomicOutput(tmp_path / "out") as ao:
            w = W.ShardedSafetensorsWriter(ao, {"a": ((2,), 8), "b": ((2,), 8)})
            w.add("a", torch.zeros(2))
            with pytest.raises(OutputError, match="not planned"):
                w.add("c", torch.zeros(2))
            w.close()
    assert os.listdir(tmp_path) == []


def test_files_written_by_other_tools_into_staging_are_hashed(tmp_path):
    """An exporter may save straight into ``ao.staging`` (e.g. onnx.save with external data)."""
    with W.AtomicOutput(tmp_path / "out") as ao:
        with open(os.path.join(ao.staging, "model.onnx"), "wb") as f:
            f.write(b"graph")
        os.mkdir(os.path.join(ao.staging, "sub"))
        with open(os.path.join(ao.staging, "sub", "data.bin"), "wb") as f:
            f.write(b"data")
        W.write_safetensors(ao, "small.safetensors", {"a": torch.arange(4.0)})
    man = json.loads((tmp_path / "out" / "MANIFEST.json").read_text())["files"]
    assert man["model.onnx"]["sha256"] == hashlib.sha256(b"graph").hexdigest()
    assert man["sub/data.bin"] == {"sha256": hashlib.sha256(b"data").hexdigest(), "size": 4}
    with safe_open(str(tmp_path / "out" / "small.safetensors"), "pt") as h:
        assert torch.equal(h.get_tensor("a"), torch.arange(4.0))
