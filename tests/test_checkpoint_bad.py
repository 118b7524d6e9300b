"""Hostile and broken inputs (reliability.md tests 1-16, reading side), through the real CLI entry point
(``fwconvert.cli.main.main``) and through ``open_checkpoint`` directly.

Each case checks the exit code, a single ``Error:`` message naming the file and the key, no
traceback, and that nothing was written in the test folder.
"""
import json
import os
import struct

import numpy as np
import pytest

from badinputs import (raw_st, sharded_model, single_file_model, small_tensors, st_bytes, tiny_config,
                       tiny_tensors, tree_snapshot, write, write_config)
from fwconvert.checkpoint import open_checkpoint
from fwconvert.cli.main import main
from fwconvert.errors import InputError, NumericError


def run_cli(capsys, *args):
    capsys.readouterr()  # drop what fixtures printed
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def assert_clean_error(capsys, tmp_path, args, *needles, code=3):
    """Run the CLI; exit ``code``, one Error: message (< 5 lines) containing every needle, no traceback,
    and nothing created or changed under tmp_path."""
    before = tree_snapshot(tmp_path)
    rc, out, err = run_cli(capsys, *args)
    assert rc == code, (rc, err)
    assert err.startswith("Error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) < 5, err
    for n in needles:
        assert n in err, (n, err)
    assert out == ""
    assert tree_snapshot(tmp_path) == before
    return err


def inspect_error(capsys, tmp_path, path, *needles, code=3, extra=()):
    return assert_clean_error(capsys, tmp_path, ["inspect", str(path), *extra], *needles, code=code)


# -- 1, 2: config.json -------------------------------------------------------------------------------
def test_config_missing_names_expected_path(tmp_path, capsys):
    d = single_file_model(tmp_path / "m")
    os.remove(os.path.join(d, "config.json"))
    inspect_error(capsys, tmp_path, d, os.path.join(d, "config.json"), "not found")


def test_config_not_regular(tmp_path, capsys):
    d = single_file_model(tmp_path / "m")
    os.remove(os.path.join(d, "config.json"))
    os.mkdir(os.path.join(d, "config.json"))
    inspect_error(capsys, tmp_path, d, "config.json", "not a regular file")


@pytest.mark.parametrize("text,needle", [
    ('{"model_type": "llama", "hidden_size": 1', "line 1, column"),
    ("[" * 100000 + "]" * 100000, "config.json"),
    ('{"model_type": "llama", "model_type": "llama"}', "duplicate key 'model_type'"),
    ('{"model_type": "llama", "rms_norm_eps": NaN}', "NaN"),
    ('{"model_type": "llama", "rope_theta": Infinity}', "Infinity"),
    ('{"pad": "' + "x" * (1 << 20) + '"}', "cap"),
])
def test_config_bad_json(tmp_path, capsys, text, needle):
    d = single_file_model(tmp_path / "m")
    write(os.path.join(d, "config.json"), text.encode())
    inspect_error(capsys, tmp_path, d, os.path.join(d, "config.json"), needle)


# -- 3, 4: absurd or unsupported config values ----------------------------------------------------------
@pytest.mark.parametrize("field,value,needle", [
    ("hidden_size", 0, "hidden_size"), ("hidden_size", -1, "hidden_size"), ("hidden_size", 2 ** 40, "hidden_size"),
    ("hidden_size", True, "hidden_size"), ("hidden_size", 4096.0, "hidden_size"),
    ("num_hidden_layers", 10 ** 6, "num_hidden_layers"), ("num_attention_heads", 5, "does not divide"),
    ("num_key_value_heads", 3, "does not divide"), ("model_type", "bert", "supported: llama, mistral, qwen2, qwen3"),
    ("rope_scaling", {"type": "yarn", "factor": 2.0}, "supported: default, linear, llama3"),
])
def test_absurd_config_values(tmp_path, capsys, field, value, needle):
    d = single_file_model(tmp_path / "m")
    write_config(d, tiny_config(**{field: value}))
    inspect_error(capsys, tmp_path, d, "config.json", needle)


def test_vocab_size_must_match_embedding_rows(tmp_path, capsys):
    d = single_file_model(tmp_path / "m", tensors=tiny_tensors(tiny_config()))
    write_config(d, tiny_config(vocab_size=40))
    inspect_error(capsys, tmp_path, d, "'model.embed_tokens.weight': got [32, 16], expected [40, 16]",
                  "'lm_head.weight': got [32, 16], expected [40, 16]")


@pytest.mark.parametrize("command", ["inspect", "add-fwl", "mark-fast", "export-onnx", "calibrate"])
def test_absurd_config_fails_before_heavy_imports(tmp_path, command):
    """Exit 3 with a low peak RSS and nothing written, for every command that opens a checkpoint. ``inspect``
    does not even import torch; the others import it (~220 MB) but allocate nothing for the absurd dims."""
    import subprocess
    import sys

    d = single_file_model(tmp_path / "m")
    write_config(d, tiny_config(hidden_size=2 ** 40, num_hidden_layers=10 ** 6))
    out = str(tmp_path / "out")
    args = {"inspect": [d], "calibrate": [d, "--data", d, "-o", out]}.get(command, [d, "-o", out])
    # VmHWM is this process's own peak (ru_maxrss can inherit the forking parent's peak across exec)
    code = ("import sys\nfrom fwconvert.cli.main import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as e:\n    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
            "    print(e.code, 'torch' in sys.modules, int(hwm[0].split()[1]) // 1024)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code, command, *args], capture_output=True, text=True, timeout=120, env=env)
    rc, torch_loaded, rss_mb = r.stdout.split()
    assert rc == "3" and "hidden_size" in r.stderr, r.stdout + r.stderr
    assert int(rss_mb) < (300 if command == "inspect" else 400), r.stdout
    assert (torch_loaded == "False") if command == "inspect" else not os.path.exists(out)


# -- 6, 7, 8: safetensors header and body ---------------------------------------------------------------
def _hdr(n_claimed, body=b"{}"):
    return struct.pack("<Q", n_claimed) + body


def _dup_key_file():
    body = ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            '"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}').encode()
    return struct.pack("<Q", len(body)) + body + bytes(4)


CORRUPT = {
    "empty": (b"", "header too small"),
    "len_beyond_file": (_hdr(1000), "invalid header length"),
    "header_over_cap": (_hdr(200_000_000), "header too large"),
    "non_utf8": (_hdr(4, b"\xff\xfe{}"), "not UTF-8"),
    "metadata_not_string": (st_bytes(small_tensors(), metadata={"format": 1}), "__metadata__"),
    "not_object": (_hdr(2, b"[]"), "not a JSON object"),
    "overlap": (raw_st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), "overlaps"),
    "trailing": (st_bytes(small_tensors(), trailing=b"PK\x03\x04polyglot"), "trailing bytes"),
    "truncated": (st_bytes(small_tensors())[:-5], "truncated"),
    "gap": (raw_st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)), "gap"),
    "shape_vs_bytes": (raw_st({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
                       "shape [3] x F32 is 12 bytes"),
    "numel_overflow": (raw_st({"a": {"dtype": "F32", "shape": [2 ** 62, 2 ** 62, 4], "data_offsets": [0, 0]}}, b""),
                       "overflow"),
    "bad_offsets": (raw_st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, bytes(8)), "data_offsets"),
    "dup_key_same_offsets": (_dup_key_file(), "duplicate key 'a'"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_safetensors(tmp_path, capsys, case):
    data, needle = CORRUPT[case]
    d = tmp_path / "m"
    write_config(d, tiny_config())
    p = write(d / "model.safetensors", data)
    err = inspect_error(capsys, tmp_path, d, p, needle)
    if case in ("overlap", "trailing", "truncated", "gap", "shape_vs_bytes", "numel_overflow"):
        assert "corrupt or truncated" in err
    with pytest.raises(InputError, match="model.safetensors"):
        open_checkpoint(str(d))


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F4", "I64", "BOOL", "Q9_X"])
def test_dtype_allowlist(tmp_path, capsys, dtype):
    d = tmp_path / "m"
    write_config(d, tiny_config())
    p = write(d / "model.safetensors", raw_st({"model.norm.weight": {"dtype": dtype, "shape": [8], "data_offsets": [0, 8]}}, bytes(8)))
    inspect_error(capsys, tmp_path, d, p, "'model.norm.weight'", dtype, "allowed for weights: BF16, F16, F32")


# -- 9, 10: shapes and key sets -----------------------------------------------------------------------------
def test_every_shape_mismatch_is_listed(tmp_path, capsys):
    d = sharded_model(tmp_path / "m", tensors=tiny_tensors(tiny_config()))
    write_config(d, tiny_config(num_key_value_heads=4))
    err = inspect_error(capsys, tmp_path, d, "shape mismatches (4)")
    for i in (0, 1):
        for p in ("k_proj", "v_proj"):
            assert f"'model.layers.{i}.self_attn.{p}.weight': got [8, 16], expected [16, 16]" in err


def test_missing_tensor_is_named(tmp_path, capsys):
    t = tiny_tensors(tiny_config())
    del t["model.layers.1.mlp.down_proj.weight"]
    d = sharded_model(tmp_path / "m", tensors=t)
    inspect_error(capsys, tmp_path, d, "missing tensors (1): model.layers.1.mlp.down_proj.weight")


def test_many_missing_tensors_first_20_and_count(tmp_path, capsys):
    cfg = tiny_config(num_hidden_layers=8)
    t = {k: v for k, v in tiny_tensors(cfg).items() if "layers" not in k}
    d = single_file_model(tmp_path / "m", cfg, t)
    err = inspect_error(capsys, tmp_path, d, "missing tensors (72)", "(+52 more)")
    assert err.count("model.layers.") == 20


def test_unexpected_tensor_and_allowlists(tmp_path, capsys):
    t = tiny_tensors(tiny_config())
    t["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    d = single_file_model(tmp_path / "m", tensors=t)
    inspect_error(capsys, tmp_path, d, "unexpected tensors (1): 'model.layers.0.extra.weight'", "--allow-unexpected")
    rc, out, _ = run_cli(capsys, "inspect", d, "--allow-unexpected", "--json")
    assert rc == 0 and json.loads(out)["family"] == "llama"
    del t["model.layers.0.extra.weight"]
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    d2 = single_file_model(tmp_path / "m2", tensors=t)
    rc, out, _ = run_cli(capsys, "inspect", d2, "--json")
    assert rc == 0


def test_tied_embeddings_without_lm_head_succeeds(tmp_path, capsys):
    cfg = tiny_config(tie_word_embeddings=True)
    d = single_file_model(tmp_path / "m", cfg)
    assert "lm_head.weight" not in open_checkpoint(d).specs
    rc, out, _ = run_cli(capsys, "inspect", d, "--json")
    assert rc == 0 and json.loads(out)["tie_word_embeddings"] is True


def test_same_tensor_in_two_shards(tmp_path, capsys):
    d = sharded_model(tmp_path / "m")
    t = tiny_tensors(tiny_config())
    shard2 = os.path.join(d, "model-00002-of-00002.safetensors")
    names = [n for i, n in enumerate(t) if i % 2 == 1] + ["model.embed_tokens.weight"]
    write(shard2, st_bytes({n: t[n] for n in names}))
    inspect_error(capsys, tmp_path, d, "'model.embed_tokens.weight' is in two shards")


# -- 11, 12: index traversal and format confusion --------------------------------------------------------
TRAVERSAL = ["../x.safetensors", "/abs/x.safetensors", "sub/../../x", "..\\x", "C:\\x", "\\\\srv\\share\\x", "",
             "sub/x.safetensors", "..", "x\x00.safetensors"]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("shard", TRAVERSAL)
def test_index_shard_names_cannot_leave_folder(tmp_path, capsys, shard):
    os.mkfifo(tmp_path / "x.safetensors")  # opening it would hang the test
    (tmp_path / "sub").mkdir()
    os.mkfifo(tmp_path / "sub" / "x.safetensors")
    target = "/abs/x.safetensors"

    def edit(index):
        index["weight_map"]["model.norm.weight"] = shard.replace(target, str(tmp_path / "x.safetensors"))

    d = sharded_model(tmp_path / "m", index_edit=edit)
    err = inspect_error(capsys, tmp_path, d, "model.safetensors.index.json", "weight_map['model.norm.weight']")
    assert "refused" in err or "outside the model folder" in err


@pytest.mark.parametrize("shard", ["pytorch_model-00001.bin", "model.pt"])
def test_index_pointing_at_pickle(tmp_path, capsys, shard):
    def edit(index):
        index["weight_map"]["model.norm.weight"] = shard

    d = sharded_model(tmp_path / "m", index_edit=edit)
    write(os.path.join(d, shard), b"\x80\x04not really")
    inspect_error(capsys, tmp_path, d, "pickle checkpoints are not loaded by default", shard)


def test_only_pickle_weights(tmp_path, capsys):
    d = tmp_path / "m"
    write_config(d, tiny_config())
    write(d / "pytorch_model.bin", b"\x80\x04junk")
    inspect_error(capsys, tmp_path, d, "pickle checkpoints are not loaded by default")
    inspect_error(capsys, tmp_path, d / "pytorch_model.bin", "pickle checkpoints are not loaded by default")


# -- 13: index vs shards ------------------------------------------------------------------------------------
def test_listed_shard_missing(tmp_path, capsys):
    d = sharded_model(tmp_path / "m")
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    inspect_error(capsys, tmp_path, d, "model-00002-of-00002.safetensors", "not found")


def test_shard_lacks_tensor_index_assigns(tmp_path, capsys):
    def edit(index):
        index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"

    d = sharded_model(tmp_path / "m", index_edit=edit)
    inspect_error(capsys, tmp_path, d, "model-00001-of-00002.safetensors lacks tensor 'model.layers.9.mlp.up_proj.weight'")


def test_shard_holds_unmentioned_tensor(tmp_path, capsys):
    def edit(index):
        del index["weight_map"]["model.norm.weight"]

    d = sharded_model(tmp_path / "m", index_edit=edit)
    inspect_error(capsys, tmp_path, d, "holds tensor 'model.norm.weight' that the index does not mention")


def test_wrong_total_size(tmp_path, capsys):
    def edit(index):
        index["metadata"]["total_size"] += 4

    d = sharded_model(tmp_path / "m", index_edit=edit)
    inspect_error(capsys, tmp_path, d, "metadata.total_size")


# -- 14: non-regular and linked files ---------------------------------------------------------------------
@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind", ["fifo", "dir", "devzero"])
def test_non_regular_shard(tmp_path, capsys, kind):
    d = sharded_model(tmp_path / "m")
    shard = os.path.join(d, "model-00002-of-00002.safetensors")
    os.remove(shard)
    if kind == "fifo":
        os.mkfifo(shard)
    elif kind == "dir":
        os.mkdir(shard)
    else:
        os.symlink("/dev/zero", shard)
    err = inspect_error(capsys, tmp_path, d, "model-00002-of-00002.safetensors")
    assert "not a regular file" in err or "outside the model folder" in err


@pytest.mark.timeout(10)
def test_fifo_single_file_and_fifo_model_path(tmp_path, capsys):
    d = tmp_path / "m"
    write_config(d, tiny_config())
    os.mkfifo(d / "model.safetensors")
    inspect_error(capsys, tmp_path, d, "not a regular file")
    os.mkfifo(tmp_path / "x.gguf")
    inspect_error(capsys, tmp_path, tmp_path / "x.gguf", "not a regular file")


def test_symlinked_shard_outside_folder(tmp_path, capsys):
    d = sharded_model(tmp_path / "m")
    shard = os.path.join(d, "model-00002-of-00002.safetensors")
    os.rename(shard, tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", shard)
    inspect_error(capsys, tmp_path, d, "outside the model folder")


# -- 15: hostile tensor names ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../pwn", "/tmp/pwn", "", "a\x00b", "line1\nline2", "x" * 10000])
def test_hostile_tensor_names(tmp_path, capsys, name):
    t = tiny_tensors(tiny_config())
    t[name] = np.zeros(2, np.float32)
    d = single_file_model(tmp_path / "m", tensors=t)
    err = inspect_error(capsys, tmp_path, d, "unexpected tensors (1): " + repr(name)[:40])
    assert len(err) < 2000


def test_staging_folder_is_refused(tmp_path, capsys):
    d = single_file_model(tmp_path / ".out.fwconvert-partial-123-abc")
    inspect_error(capsys, tmp_path, d, "unfinished fwconvert output")


# -- 16: non-finite weights -----------------------------------------------------------------------------
def test_nonfinite_weight_is_numeric_error(tmp_path):
    import fwconvert

    t = tiny_tensors(tiny_config())
    t["model.layers.1.mlp.up_proj.weight"][0, :3] = [np.nan, np.inf, -np.inf]
    d = sharded_model(tmp_path / "m", tensors=t)
    with pytest.raises(NumericError, match=r"'model.layers.1.mlp.up_proj.weight' has 3 non-finite") as e:
        fwconvert.load(d)
    assert e.value.exit_code == 6
    names = [n for n, _ in open_checkpoint(d).iter_tensors(check_finite=False)]
    assert "model.layers.1.mlp.up_proj.weight" in names


# -- real subprocess -------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_subprocess_clean_error(tmp_path):
    import subprocess
    import sys

    d = sharded_model(tmp_path / "m")
    os.remove(os.path.join(d, "model-00001-of-00002.safetensors"))
    os.mkfifo(os.path.join(d, "model-00001-of-00002.safetensors"))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "fwconvert", "inspect", d], capture_output=True, text=True,
                       timeout=50, env=env)
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr.startswith("Error: ") and "not a regular file" in r.stderr and "Traceback" not in r.stderr

