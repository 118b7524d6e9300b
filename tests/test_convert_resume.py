"""Reliability test 27: ``--resume`` of an interrupted ``add-fwl`` / ``mark-fast`` (checkpoint/resume.py).

A run is SIGKILLed after output shard k (``FWCONVERT_FAULT=after_shard:k`` in a forked CLI child, as in
test 23); ``--resume`` then keeps the journaled shards untouched (same inode, mtime and ctime; never opened for
writing), writes the rest, and the published folder is bit-identical to an uninterrupted run's. It refuses
(exit 4, leftover kept) when the input, the flags or the fwconvert version changed, or when the journal cannot
be trusted; a journaled shard that does not verify is written again. The output is cut into ~6 shards by
lowering ``shards.DEFAULT_SHARD_BYTES`` (inherited by the forked child).
"""
import fcntl
import json
import os
import shutil
import signal

import pytest
from safetensors.torch import load_file, save_file

import fwconvert
from fwconvert.checkpoint import resume as R
from fwconvert.checkpoint import shards as S
from fwconvert.checkpoint import writer as W
from test_convert import run_cli
from test_convert_cli import _fork_cli, no_traceback
from test_writer import staging_left, tree
from tiny import make_hf_model, save_checkpoint

SHARD_BYTES = 100_000  # the tiny llama (~0.4 MB) gives 5-6 output shards
CMDS = {"add-fwl": ["add-fwl"], "mark-fast": ["mark-fast", "--layers", "all", "--chunk-size", "8"]}


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    monkeypatch.setattr(S, "DEFAULT_SHARD_BYTES", SHARD_BYTES)


@pytest.fixture(scope="module")
def base_src(tmp_path_factory):
    return save_checkpoint(make_hf_model("llama"), str(tmp_path_factory.mktemp("resume") / "src"))


@pytest.fixture
def src(tmp_path, base_src):
    """A private copy (some tests edit the input); the same path for the fresh and the resumed run."""
    return shutil.copytree(base_src, str(tmp_path / "src"))


def shard_names(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))


def fresh_run(capsys, tmp_path, args, src):
    fresh = tmp_path / "fresh"
    code, _, err = run_cli(capsys, *args, src, "-o", fresh)
    assert code == 0, err
    assert len(shard_names(fresh)) >= 4, "the fixture must give several output shards"
    return fresh


def kill_after(args, k, monkeypatch):
    """Run the CLI in a forked child SIGKILLed after its k-th complete shard; returns the staging folder."""
    parent = os.path.dirname(str(args[args.index("-o") + 1]))
    pid = _fork_cli(args, f"after_shard:{k}", monkeypatch)
    _, status = os.waitpid(pid, 0)
    monkeypatch.delenv("FWCONVERT_FAULT")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    left = [n for n in staging_left(parent) if W.PARTIAL_TAG in n]
    assert len(left) == 1
    return os.path.join(parent, left[0])


def journal(staging):
    with open(os.path.join(staging, R.JOURNAL_NAME)) as f:
        return json.load(f)


def ident(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns


@pytest.fixture
def opened(monkeypatch):
    """Names of the files the writer creates (every output file goes through HashingFile)."""
    names = []
    orig = W.HashingFile.__init__

    def spy(self, path, owner):
        names.append(os.path.basename(path))
        orig(self, path, owner)

    monkeypatch.setattr(W.HashingFile, "__init__", spy)
    return names


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cmd, k", [("add-fwl", 1), ("mark-fast", 3), ("add-fwl", "all")])
def test_resume_after_sigkill_is_bit_identical_and_keeps_done_shards(tmp_path, capsys, monkeypatch, src, opened,
                                                                     cmd, k):
    args = CMDS[cmd]
    fresh = fresh_run(capsys, tmp_path, args, src)
    all_shards = shard_names(fresh)
    k = len(all_shards) if k == "all" else k
    out = tmp_path / "out"
    staging = kill_after([*args, src, "-o", out], k, monkeypatch)
    done = sorted(journal(staging)["shards"])
    assert len(done) == k and not out.exists() and "MANIFEST.json" not in os.listdir(staging)
    before = {n: ident(os.path.join(staging, n)) for n in done}
    # what a kill in the middle of a shard or of a journal update leaves behind: deleted and written again
    partial = all_shards[k] if k < len(all_shards) else "config.json"
    for name in (partial, R.JOURNAL_NAME + ".tmp"):
        with open(os.path.join(staging, name), "wb") as f:
            f.write(b"partial")
    opened.clear()
    code, stdout, err = run_cli(capsys, *args, src, "-o", out, "--resume")
    assert code == 0, err
    assert stdout.strip() == str(out) and f"Resuming {staging}: {k} complete shard(s) kept" in err
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh)) and tree(out) == tree(fresh)  # bit-identical
    assert R.JOURNAL_NAME not in os.listdir(out) and staging_left(tmp_path) == []
    assert {n: ident(out / n) for n in done} == before  # the same files, untouched
    assert not set(done) & set(opened) and sorted(set(opened) & set(all_shards)) == sorted(set(all_shards) - set(done))


@pytest.mark.timeout(120)
def test_resume_twice_interrupted(tmp_path, capsys, monkeypatch, src, opened):
    args = CMDS["mark-fast"]
    fresh = fresh_run(capsys, tmp_path, args, src)
    out = tmp_path / "out"
    staging = kill_after([*args, src, "-o", out], 1, monkeypatch)
    first = sorted(journal(staging)["shards"])
    again = kill_after([*args, src, "-o", out, "--resume"], 3, monkeypatch)  # k counts kept shards too
    assert again == staging and len(journal(staging)["shards"]) == 3 and set(first) < set(journal(staging)["shards"])
    kept = {n: ident(os.path.join(staging, n)) for n in journal(staging)["shards"]}
    opened.clear()
    code, _, err = run_cli(capsys, *args, src, "-o", out, "--resume")
    assert code == 0, err
    assert tree(out) == tree(fresh) and {n: ident(out / n) for n in kept} == kept and not set(kept) & set(opened)


def _change_config(src):
    p = os.path.join(src, "config.json")
    cfg = json.load(open(p))
    cfg["rms_norm_eps"] = cfg["rms_norm_eps"] * 10
    with open(p, "w") as f:
        json.dump(cfg, f)


def _change_header(src):
    p = os.path.join(src, sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))[0])
    save_file(load_file(p), p, metadata={"format": "pt", "edited": "yes"})


@pytest.mark.parametrize("change, needle", [
    ("config", "input changed"),
    ("header", "input changed"),
    ("flags", "flags changed (seed: partial 0, this run 1)"),
    ("mark-fast-flags", "flags changed (lr: partial 3.0, this run 2.0)"),
    ("version", "fwconvert version changed (partial: 0.1.0, this run: 9.9.9)"),
    ("layout", "tensor layout changed (planned tensors or maximum shard size)"),
])
def test_resume_refuses_a_different_run(tmp_path, capsys, monkeypatch, src, change, needle):
    cmd = "mark-fast" if change.startswith("mark-fast") else "add-fwl"
    args, out = CMDS[cmd], tmp_path / "out"
    staging = kill_after([*args, src, "-o", out], 2, monkeypatch)
    assert fwconvert.__version__ == "0.1.0"
    extra = []
    if change == "config":
        _change_config(src)
    elif change == "header":
        _change_header(src)
    elif change == "flags":
        extra = ["--seed", "1"]
    elif change == "mark-fast-flags":
        extra = ["--lr", "2.0"]
    elif change == "layout":
        monkeypatch.setattr(S, "DEFAULT_SHARD_BYTES", SHARD_BYTES * 2)
    else:
        monkeypatch.setattr(fwconvert, "__version__", "9.9.9")
    before = tree(staging)
    code, _, err = run_cli(capsys, *args, src, "-o", out, "--resume", *extra)
    assert code == 4 and no_traceback(err) and len(err.strip().splitlines()) == 1, err
    assert f"{staging}: partial output does not match this run: " in err and needle in err, err
    assert tree(staging) == before and not out.exists()  # the leftover is kept for the user to decide


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "symlink", "hardlink"])
def test_done_shard_that_does_not_verify_is_rewritten(tmp_path, capsys, monkeypatch, src, opened, damage):
    args = CMDS["add-fwl"]
    fresh = fresh_run(capsys, tmp_path, args, src)
    out = tmp_path / "out"
    staging = kill_after([*args, src, "-o", out], 2, monkeypatch)
    bad, good = sorted(journal(staging)["shards"])
    p = os.path.join(staging, bad)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(open(p, "rb").read())
    if damage == "flip":
        with open(p, "r+b") as f:
            f.seek(os.path.getsize(p) - 3)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 1]))
    elif damage == "truncate":
        os.truncate(p, os.path.getsize(p) // 2)
    elif damage == "missing":
        os.unlink(p)
    elif damage == "symlink":  # the right bytes, but behind a link: not trusted, never followed
        os.unlink(p)
        os.symlink(victim, p)
    else:  # the right bytes, but the file is shared with another path
        os.link(p, victim.with_suffix(".hard"))
    kept = ident(os.path.join(staging, good))
    victim_bytes = victim.read_bytes()
    opened.clear()
    code, _, err = run_cli(capsys, *args, src, "-o", out, "--resume")
    assert code == 0, err
    assert f"{p}: " in err and "not trusted, written again" in err and "1 written again" in err
    assert tree(out) == tree(fresh)
    assert bad in opened and good not in opened and ident(out / good) == kept
    assert victim.read_bytes() == victim_bytes


@pytest.mark.parametrize("damage", ["torn", "edited", "symlink"])
def test_untrusted_journal_is_refused_naming_it(tmp_path, capsys, monkeypatch, src, damage):
    args, out = CMDS["add-fwl"], tmp_path / "out"
    staging = kill_after([*args, src, "-o", out], 2, monkeypatch)
    jp = os.path.join(staging, R.JOURNAL_NAME)
    if damage == "torn":
        os.truncate(jp, os.path.getsize(jp) // 2)
    elif damage == "edited":  # a different sha256 for a shard, checksum not updated
        body = journal(staging)
        name = sorted(body["shards"])[0]
        body["shards"][name]["sha256"] = "0" * 64
        with open(jp, "w") as f:
            json.dump(body, f)
    else:
        real = tmp_path / "journal.json"
        os.rename(jp, real)
        os.symlink(real, jp)
    before = tree(staging)
    code, _, err = run_cli(capsys, *args, src, "-o", out, "--resume")
    assert code == 4 and no_traceback(err) and len(err.strip().splitlines()) == 1, err
    assert f"{jp}: resume journal is unreadable" in err
    assert tree(staging) == before and not out.exists()


def test_resume_without_leftover_is_a_normal_run(tmp_path, capsys, src):
    args = CMDS["add-fwl"]
    fresh = fresh_run(capsys, tmp_path, args, src)
    code, _, err = run_cli(capsys, *args, src, "-o", tmp_path / "out", "--resume")
    assert code == 0 and "--resume: no interrupted conversion of" in err and "starting a fresh run" in err, err
    assert tree(tmp_path / "out") == tree(fresh) and staging_left(tmp_path) == []


def test_leftovers_not_resumable_are_reported_and_left_alone(tmp_path, capsys, monkeypatch, src):
    """Without --resume a journaled leftover is reported with the hint; with it, a folder locked by a running
    conversion and one without a journal are never taken over."""
    args, out = CMDS["add-fwl"], tmp_path / "out"
    fresh = fresh_run(capsys, tmp_path, args, src)
    staging = kill_after([*args, src, "-o", out], 2, monkeypatch)
    bare = tmp_path / ".out.fwconvert-partial-1-bare"
    bare.mkdir()
    (bare / "model-00001-of-00006.safetensors").write_bytes(b"partial")
    before = tree(tmp_path)
    fd = os.open(staging, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running conversion holds it
        code, _, err = run_cli(capsys, *args, src, "-o", out, "--resume")
    finally:
        os.close(fd)
    assert code == 0, err
    assert f"{staging} is in use by a running conversion; not reused" in err
    assert f"{bare} (not reused" in err and "no interrupted conversion" in err
    assert tree(out) == tree(fresh)
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("out" + os.sep)} == before
    shutil.rmtree(out)
    code, _, err = run_cli(capsys, *args, src, "-o", out)
    assert code == 0 and f"{staging} (not reused; rerun with --resume to continue it" in err, err


def test_resume_keeps_force_semantics(tmp_path, capsys, monkeypatch, src):
    """An existing output is refused without --force before the leftover is touched; with it, the resumed
    output replaces the old one (no stale file left)."""
    args, out = CMDS["add-fwl"], tmp_path / "out"
    fresh = fresh_run(capsys, tmp_path, args, src)
    out.mkdir()
    (out / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    (out / "MANIFEST.json").write_text('{"format": "fwconvert-manifest/1"}')  # an earlier output: replaceable
    old = tree(out)
    staging = kill_after([*args, src, "-o", out, "--force"], 2, monkeypatch)
    before = tree(staging)
    code, _, err = run_cli(capsys, *args, src, "-o", out, "--resume")
    assert code == 4 and "already exists; use --force" in err and no_traceback(err)
    assert tree(staging) == before and tree(out) == old
    code, _, err = run_cli(capsys, *args, src, "-o", out, "--resume", "--force")
    assert code == 0 and "Resuming" in err, err
    assert tree(out) == tree(fresh) and staging_left(tmp_path) == []
