"""Reliability test 39: every bad-input fixture through the real CLI (in-process with click's CliRunner
and, for a few cases, as a ``python -m fwconvert`` subprocess) for inspect, add-fwl, mark-fast,
export-onnx and verify. Checks: the exit code of the table in ``fwconvert.errors``, one short
``Error:`` message on stderr, no traceback (unless --debug), nothing on stdout but results, and
nothing written in the test folder outside the output path.
"""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from badinputs import (raw_st, sharded_model, single_file_model, small_tensors, st_bytes, tiny_config,
                       tiny_tensors, tree_snapshot, write, write_config)
from fwconvert.cli.main import cli, main
from fwconvert.errors import EXIT_INPUT, EXIT_NUMERIC, EXIT_OK, EXIT_OUTPUT, EXIT_USAGE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CMDS = {  # command -> extra arguments (an output path is added for writers)
    "inspect": [], "add-fwl": [], "mark-fast": ["--layers", "0", "--chunk-size", "8"], "export-onnx": [],
}
WRITERS = ("add-fwl", "mark-fast", "export-onnx")


# -- fixtures: each builds the bad input under tmp/"in" and returns the model path -------------------------
def _config_missing(tmp):
    d = single_file_model(tmp / "in")
    os.remove(os.path.join(d, "config.json"))
    return d


def _config_text(text):
    def build(tmp):
        d = single_file_model(tmp / "in")
        write(os.path.join(d, "config.json"), text.encode())
        return d
    return build


def _config_values(**kw):
    def build(tmp):
        d = single_file_model(tmp / "in")
        write_config(d, tiny_config(**kw))
        return d
    return build


def _shard_bytes(data):
    def build(tmp):
        d = tmp / "in"
        write_config(d, tiny_config())
        write(d / "model.safetensors", data)
        return str(d)
    return build


def _with_tensors(edit):
    def build(tmp):
        t = tiny_tensors(tiny_config())
        edit(t)
        return single_file_model(tmp / "in", tensors=t)
    return build


def _index_traversal(tmp):
    os.mkfifo(tmp / "x.safetensors")  # opening it would hang (the test has a timeout)
    def edit(index):
        index["weight_map"]["model.norm.weight"] = "../x.safetensors"
    return sharded_model(tmp / "in", index_edit=edit)


def _pickle_only(tmp):
    d = tmp / "in"
    write_config(d, tiny_config())
    write(d / "pytorch_model.bin", b"\x80\x04K\x01.")
    return str(d)


def _fifo_shard(tmp):
    d = sharded_model(tmp / "in")
    shard = os.path.join(d, "model-00002-of-00002.safetensors")
    os.remove(shard)
    os.mkfifo(shard)
    return d


def _nan(t):
    t["model.norm.weight"][3] = np.nan


def _bad_dtype_file(tmp):
    """model.norm.weight declared I32 (same byte size as F32): outside the dtype allowlist."""
    t = tiny_tensors(tiny_config())
    d = single_file_model(tmp / "in", tensors=t)
    data = st_bytes(t)
    n = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8:8 + n])
    head["model.norm.weight"]["dtype"] = "I32"
    write(os.path.join(d, "model.safetensors"), raw_st(head, data[8 + n:]))
    return d


# name -> (builder, expected exit code per command (a command missing from the dict is not applicable),
#          a text the one-line message must contain: the file, key or tensor at fault)
ALL3 = {c: EXIT_INPUT for c in MODEL_CMDS}
CASES = {
    "path_missing": (lambda tmp: str(tmp / "nope"), ALL3, 'nope'),
    "config_missing": (_config_missing, ALL3, 'config.json'),
    "config_truncated": (_config_text('{"model_type": "llama", "hidden_size": 1'), ALL3, 'config.json'),
    "config_dup_key": (_config_text('{"model_type": "llama", "model_type": "llama"}'), ALL3,
                       "duplicate key 'model_type'"),
    "config_nan": (_config_text('{"model_type": "llama", "rms_norm_eps": NaN}'), ALL3, 'NaN'),
    "config_deep": (_config_text("[" * 100000 + "]" * 100000), ALL3, 'config.json'),
    "hidden_huge": (_config_values(hidden_size=2 ** 40), ALL3, 'hidden_size'),
    "hidden_bool": (_config_values(hidden_size=True), ALL3, 'hidden_size'),
    "heads_not_dividing": (_config_values(num_attention_heads=5), ALL3, 'divide'),
    "model_type_bert": (_config_values(model_type="bert"), ALL3, 'bert'),
    "st_empty": (_shard_bytes(b""), ALL3, 'model.safetensors'),
    "st_header_too_long": (_shard_bytes(struct.pack("<Q", 1000) + b"{}"), ALL3, 'model.safetensors'),
    "st_trailing": (_shard_bytes(st_bytes(small_tensors(), trailing=b"PK\x03\x04")), ALL3, 'trailing bytes'),
    "st_overlap": (_shard_bytes(raw_st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))),
                   ALL3, 'overlaps'),
    "dtype_not_allowed": (_bad_dtype_file, ALL3, 'model.norm.weight'),
    "tensor_missing": (_with_tensors(lambda t: t.pop("model.layers.1.mlp.down_proj.weight")), ALL3,
                       "model.layers.1.mlp.down_proj.weight"),
    "tensor_unexpected": (_with_tensors(lambda t: t.update({"extra.weight": np.zeros(2, np.float32)})), ALL3,
                          "extra.weight"),
    "index_traversal": (_index_traversal, ALL3, "weight_map['model.norm.weight']"),
    "pickle_only": (_pickle_only, ALL3, 'pickle'),
    "fifo_shard": (_fifo_shard, ALL3, 'not a regular file'),
    "nonfinite_weight": (_with_tensors(_nan), {c: EXIT_NUMERIC for c in WRITERS},
                         "model.norm.weight"),
}


def run_inproc(args):
    """Run the console-script entry point (``main``, which drives ``cli``) under CliRunner's isolation."""
    runner = CliRunner()
    with runner.isolation() as (out, err, _):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return code, out.getvalue().decode(), err.getvalue().decode()


def run_subprocess(args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fwconvert", *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def check_clean_error(code, out, err, expected):
    assert code == expected, (code, err)
    assert "Traceback" not in err, err
    assert err.startswith("Error:"), err
    assert len(err.strip().splitlines()) < 5, err
    assert out == "", f"stdout must hold only results, got {out!r}"


def only_under(before, after, prefix):
    """Entries created, changed or removed outside ``prefix`` (a top-level name in the snapshot)."""
    keys = set(before) | set(after)
    return sorted(k for k in keys if before.get(k) != after.get(k) and k.split(os.sep)[0] != prefix)


def _argv(cmd, src, out):
    return [cmd, src, *MODEL_CMDS[cmd]] + (["-o", out] if cmd in WRITERS else [])


SWEEP = [(name, cmd) for name, (_, codes, _) in CASES.items() for cmd in MODEL_CMDS if cmd in codes]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,cmd", SWEEP, ids=[f"{n}-{c}" for n, c in SWEEP])
def test_sweep_inprocess(tmp_path, name, cmd):
    build, codes, needle = CASES[name]
    src = build(tmp_path)
    before = tree_snapshot(tmp_path)
    code, out, err = run_inproc(_argv(cmd, src, tmp_path / "out"))
    check_clean_error(code, out, err, codes[cmd])
    assert needle in err, (needle, err)
    assert tree_snapshot(tmp_path) == before, "a failed command wrote or changed files"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cmd", ["add-fwl", "mark-fast"])
def test_hostile_tensor_names_never_escape_out(tmp_path, cmd):
    """Names like '../../pwn' either fail with exit 3 or convert; either way nothing appears outside out/."""
    t = tiny_tensors(tiny_config())
    for evil in ("../../pwn", "/tmp/fwconvert-sweep-pwn", "a\nb"):
        t[evil] = np.zeros(2, np.float32)
    src = single_file_model(tmp_path / "in", tensors=t)
    before = tree_snapshot(tmp_path)
    code, out, err = run_inproc(_argv(cmd, src, tmp_path / "out") + ["--force"])
    assert code in (EXIT_OK, EXIT_INPUT), (code, err)
    if code == EXIT_INPUT:
        check_clean_error(code, out, err, EXIT_INPUT)
    assert only_under(before, tree_snapshot(tmp_path), "out") == []
    assert not os.path.exists("/tmp/fwconvert-sweep-pwn")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cmd", ["add-fwl", "mark-fast"])
def test_success_writes_only_the_output(tmp_path, cmd):
    """The control case: a valid input converts (exit 0), stdout is exactly the output path, and the only
    new entries in the test folder are under the output path (no staging folder, no stray file)."""
    src = single_file_model(tmp_path / "in")
    before = tree_snapshot(tmp_path)
    code, out, err = run_inproc(_argv(cmd, src, tmp_path / "out"))
    assert code == EXIT_OK, err
    assert "Traceback" not in err
    assert out.strip() == str(tmp_path / "out")
    assert only_under(before, tree_snapshot(tmp_path), "out") == []
    assert os.path.isfile(tmp_path / "out" / "config.json")


CONFLICTS = [(cmd, where) for cmd in WRITERS for where in ("exists", "same", "inside")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cmd,where", CONFLICTS, ids=[f"{c}-{w}" for c, w in CONFLICTS])
def test_output_conflicts(tmp_path, monkeypatch, cmd, where):
    """An existing --out without --force, or --out equal to / inside the input: exit 4, nothing touched.
    The graph export itself is stubbed to fail loudly: the refusal must come from the preflight."""
    import exporters.onnx.export as E

    def heavy(*a, **k):
        raise RuntimeError("the ONNX export started before the output path was checked")

    monkeypatch.setattr(E, "export_program", heavy)
    src = single_file_model(tmp_path / "in")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    out_path = {"exists": tmp_path / "out", "same": src, "inside": os.path.join(src, "sub")}[where]
    before = tree_snapshot(tmp_path)
    code, out, err = run_inproc(_argv(cmd, src, out_path) + ([] if where == "exists" else ["--force"]))
    check_clean_error(code, out, err, EXIT_OUTPUT)
    assert tree_snapshot(tmp_path) == before


@pytest.mark.timeout(60)
def test_fp16_export_overflow_is_named(tmp_path, monkeypatch):
    """Reliability test 17: a weight of ±1e5 cannot be cast to fp16. The cast check (exporters/onnx/
    precision.py) names the tensor and the overflow count before anything is traced or written."""
    import exporters.onnx.export as E

    def traced(*a, **k):
        raise RuntimeError("the ONNX export started before the fp16 cast was checked")

    monkeypatch.setattr(E, "export_program", traced)
    t = tiny_tensors(tiny_config())
    t["model.layers.0.mlp.up_proj.weight"][0, :3] = [1e5, -1e5, 7e4]
    t["model.layers.0.mlp.up_proj.weight"][1, :2] = [65519.0, 1e-30]  # rounds to 65504 / underflows: no error
    src = single_file_model(tmp_path / "in", tensors=t)
    before = tree_snapshot(tmp_path)
    code, out, err = run_inproc(["export-onnx", src, "-o", tmp_path / "out", "--dtype", "fp16"])
    check_clean_error(code, out, err, EXIT_NUMERIC)
    assert tree_snapshot(tmp_path) == before
    assert "overflow" in err and "model.layers.0.mlp.up_proj.weight has 3 values beyond ±65504" in err, err
    assert "max |x| 1.0e+05" in err and "--dtype fp32" in err, err


def _manifest():
    return {"graph": "model.onnx", "vocab_size": 32, "dtype": "fp32", "attention": "full", "window": None,
            "chunking": {"chunk_size": 8, "fixed": False, "rule": "any"}, "inputs": ["input_ids", "position"],
            "outputs": ["logits", "next_position"],
            "state": [{"key": "position", "input": "position", "output": "next_position", "shape": ["batch"],
                       "dtype": "int64", "init": {"kind": "zeros"}}]}


def _export_folder(tmp, manifest_text, graph=None):
    d = tmp / "exp"
    d.mkdir()
    write(d / "manifest.json", manifest_text.encode())
    if graph is not None:
        write(d / "model.onnx", graph)
    return str(d)


VERIFY_CASES = {
    "missing": lambda tmp: str(tmp / "nope"),
    "empty_folder": lambda tmp: (tmp / "exp").mkdir() or str(tmp / "exp"),
    "manifest_garbage": lambda tmp: _export_folder(tmp, "{not json"),
    "manifest_wrong_types": lambda tmp: _export_folder(tmp, json.dumps({**_manifest(), "vocab_size": "32"})),
    "manifest_graph_traversal": lambda tmp: _export_folder(tmp, json.dumps({**_manifest(), "graph": "../x.onnx"})),
    "graph_missing": lambda tmp: _export_folder(tmp, json.dumps(_manifest())),
    "graph_empty": lambda tmp: _export_folder(tmp, json.dumps(_manifest()), b""),
    "graph_garbage": lambda tmp: _export_folder(tmp, json.dumps(_manifest()), b"\x08\x07garbage protobuf\xff" * 10),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(VERIFY_CASES))
def test_sweep_verify(tmp_path, name):
    folder = VERIFY_CASES[name](tmp_path)
    before = tree_snapshot(tmp_path)
    code, out, err = run_inproc(["verify", folder])
    check_clean_error(code, out, err, EXIT_INPUT)
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("argv", [["inspect"], ["add-fwl", "x", "--bogus"], ["mark-fast", "x", "--chunk-size", "abc"],
                                  ["export-onnx", "x", "--dtype", "fp8"], ["no-such-command"]])
def test_usage_errors_exit_2(tmp_path, argv):
    before = tree_snapshot(tmp_path)
    code, out, err = run_inproc(argv)
    assert code == EXIT_USAGE and "Traceback" not in err and "Error:" in err, (code, err)
    assert out == "" and tree_snapshot(tmp_path) == before


# -- a few cases as real subprocesses (python -m fwconvert) ---------------------------------------------
SUBPROCESS = [("config_missing", "inspect"), ("st_trailing", "inspect"), ("nonfinite_weight", "add-fwl")]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name,cmd", SUBPROCESS, ids=[f"{n}-{c}" for n, c in SUBPROCESS])
def test_sweep_subprocess(tmp_path, name, cmd):
    build, codes, needle = CASES[name]
    src = build(tmp_path)
    before = tree_snapshot(tmp_path)
    code, out, err = run_subprocess(_argv(cmd, src, tmp_path / "out"))
    check_clean_error(code, out, err, codes[cmd])
    assert needle in err, (needle, err)
    assert tree_snapshot(tmp_path) == before


@pytest.mark.timeout(180)
def test_subprocess_output_conflict_and_debug_traceback(tmp_path):
    src = single_file_model(tmp_path / "in")
    (tmp_path / "out").mkdir()
    before = tree_snapshot(tmp_path)
    code, out, err = run_subprocess(["add-fwl", src, "-o", tmp_path / "out"])
    check_clean_error(code, out, err, EXIT_OUTPUT)
    assert "--force" in err
    code, out, err = run_subprocess(["--debug", "inspect", tmp_path / "nope"])
    assert code != 0 and "Traceback" in err and "InputError" in err, (code, err)
    code, out, err = run_subprocess(["inspect", "--json", src])
    assert code == EXIT_OK and json.loads(out)["hidden_size"] == 16, err
    assert tree_snapshot(tmp_path) == before


# -- the sweep can fail: a broken handler is caught ---------------------------------------------------------
def test_sweep_catches_a_leaking_traceback(tmp_path, monkeypatch):
    """If the top-level handler let an exception escape as a traceback, check_clean_error would fail."""
    import fwconvert.cli.main as M

    src = _config_missing(tmp_path)
    monkeypatch.setattr(M, "FwconvertError", type("Never", (Exception,), {}))  # handler no longer matches
    code, out, err = run_inproc(["inspect", src])
    with pytest.raises(AssertionError):
        check_clean_error(code, out, err, EXIT_INPUT)


def test_click_group_alone_maps_exit_codes(tmp_path):
    """Practice 12: the click group itself (not only main()) maps FwconvertError to one Error: line and the
    table's exit code, so `cli` used on its own (CliRunner().invoke(cli), cli() from a wrapper) is clean."""
    src = _config_missing(tmp_path)
    for argv, code in ([["inspect", str(tmp_path / "nope")], EXIT_INPUT], [["inspect", src], EXIT_INPUT],
                       [["add-fwl", _with_tensors(_nan)(tmp_path / "nan"), "-o", str(tmp_path / "o")], EXIT_NUMERIC]):
        r = CliRunner().invoke(cli, argv)
        assert r.exit_code == code and r.stderr.startswith("Error:"), (r.exit_code, r.stderr, r.exception)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr and r.stdout == ""
        assert (code, r.stderr) == run_inproc(argv)[::2], "the group alone and main() must print the same"
    r = CliRunner().invoke(cli, ["--debug", "inspect", str(tmp_path / "nope")])
    assert type(r.exception).__name__ == "InputError" and r.stderr == ""  # --debug: the original exception


def test_click_group_class_maps_signals_and_os_errors():
    """The group class (fwconvert.cli.main.FwconvertGroup) on a stand-in command: every row of the table;
    an unknown exception is not swallowed (click's own handling, or main()'s exit 1 with a log)."""
    import errno

    import click

    from fwconvert.cli.main import FwconvertGroup, Terminated
    from fwconvert.errors import EXIT_RESOURCE, EXIT_SIGINT, EXIT_SIGTERM, InputError, NumericError

    raised = {"input": InputError("in.json: bad"), "numeric": NumericError("w: 3 values"),
              "sigint": KeyboardInterrupt(), "sigterm": Terminated(),
              "enospc": OSError(errno.ENOSPC, "No space left on device", "out/x"),
              "enoent": OSError(errno.ENOENT, "No such file or directory", "in/y"), "bug": RuntimeError("boom")}

    @click.group(cls=FwconvertGroup)
    @click.option("--debug", is_flag=True)
    def group(debug):
        pass

    @group.command()
    @click.argument("kind")
    def fail(kind):
        raise raised[kind]

    expect = {"input": (EXIT_INPUT, "Error: in.json: bad"), "numeric": (EXIT_NUMERIC, "Error: w: 3 values"),
              "sigint": (EXIT_SIGINT, "Error: interrupted; nothing written"),
              "sigterm": (EXIT_SIGTERM, "Error: terminated; nothing written"),
              "enospc": (EXIT_RESOURCE, "Error: out/x: No space left on device"),
              "enoent": (EXIT_INPUT, "Error: in/y: No such file or directory")}
    for kind, (code, line) in expect.items():
        r = CliRunner().invoke(group, ["fail", kind])
        assert (r.exit_code, r.stderr.strip()) == (code, line), (kind, r.exit_code, r.stderr)
        if kind == "sigterm":  # --debug: the original exception, not mapped (BaseException: leaves CliRunner)
            with pytest.raises(Terminated):
                CliRunner().invoke(group, ["--debug", "fail", kind])
            continue
        r = CliRunner().invoke(group, ["--debug", "fail", kind])
        if kind == "sigint":
            assert r.exit_code == 1 and "Aborted!" in r.stderr  # click's own handling of a raw Ctrl-C
        else:
            assert r.exception is raised[kind], (kind, r.exit_code, r.exception)
    r = CliRunner().invoke(group, ["fail", "bug"])
    assert isinstance(r.exception, RuntimeError) and "Error:" not in r.stderr
