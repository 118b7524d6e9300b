"""Reliability test 40: hypothesis property tests. Random bytes as a .safetensors or .gguf file,
structurally mutated safetensors headers, random config.json dicts (parse_config, ``fwconvert inspect``,
``fwconvert add-fwl``), random index JSON with hostile shard/tensor names, random export manifests.
Property: only FwconvertError subclasses escape (never another exception type), no hang (per-example
deadline plus a per-test timeout), nothing written outside the fuzzed folder, peak RSS bounded.
"""
import copy
import datetime
import json
import os
import resource
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from badinputs import (raw_st, sharded_model, single_file_model, st_bytes, tiny_config, tiny_tensors, tree_snapshot,
                       write)
from fwconvert.errors import FwconvertError

FUZZ = settings(max_examples=60, deadline=datetime.timedelta(seconds=10), derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
PWN = "/tmp/fwconvert-fuzz-pwn"
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False),
                      st.text(max_size=12))
JSON = st.recursive(JSON_LEAF, lambda c: st.one_of(st.lists(c, max_size=4),
                                                   st.dictionaries(st.text(max_size=8), c, max_size=4)), max_leaves=12)
HOSTILE = st.one_of(st.text(max_size=30), st.sampled_from([
    "../x.safetensors", "/abs/x.safetensors", "sub/../../x", "..\\x", "C:\\x", "\\\\srv\\share\\x", "", ".", "..",
    "x\x00.safetensors", "line\nbreak", "../../pwn", PWN, "x" * 5000, "model.safetensors"]))


def documented_only(fn, *args, **kw):
    """Call fn; a FwconvertError is a fine outcome, any other exception fails the property."""
    try:
        return fn(*args, **kw)
    except FwconvertError:
        return None


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.fixture(autouse=True)
def bounded_and_contained(tmp_path):
    """Every test: no file at the PWN canary, nothing created beside tmp_path's own folders, RSS bounded."""
    before, parent = peak_rss(), set(tree_snapshot(tmp_path.parent))
    yield
    assert not os.path.lexists(PWN)
    new = set(tree_snapshot(tmp_path.parent)) - parent
    assert all(p.split(os.sep)[0] == tmp_path.name for p in new), sorted(new)[:5]
    assert peak_rss() - before < 512 * 2 ** 20, "fuzzing raised the peak RSS by more than 512 MiB"


def _open_and_read(folder):
    from fwconvert.checkpoint import open_checkpoint

    ck = open_checkpoint(str(folder))
    for _ in ck.iter_tensors():  # headers passed: reading the data must fail cleanly too
        pass
    return ck


def _unchanged_but(folder, before, *names):
    after = tree_snapshot(folder)
    assert {k for k in set(before) | set(after) if before.get(k) != after.get(k)} <= set(names)


# -- safetensors bytes ----------------------------------------------------------------------------------------
# a correct length prefix before random JSON (or text) and random data: reaches the header validation
PLAUSIBLE = st.builds(lambda h, b: struct.pack("<Q", len(h)) + h + b,
                      st.one_of(JSON.map(lambda x: json.dumps(x).encode()), st.text(max_size=60).map(str.encode)),
                      st.binary(max_size=64))


@pytest.mark.timeout(120)
def test_random_bytes_as_safetensors(tmp_path):
    d = single_file_model(tmp_path / "m")
    before = tree_snapshot(d)

    @FUZZ
    @given(st.one_of(st.binary(max_size=300),
                     st.builds(lambda n, b: struct.pack("<Q", n) + b, st.integers(0, 2 ** 64 - 1),
                               st.binary(max_size=200)),
                     PLAUSIBLE, PLAUSIBLE))
    def check(data):
        write(os.path.join(d, "model.safetensors"), data)
        documented_only(_open_and_read, d)

    check()
    _unchanged_but(d, before, "model.safetensors")


@pytest.mark.timeout(120)
def test_random_bytes_as_gguf(tmp_path):
    """Random bytes, and a GGUF magic + version + huge tensor/metadata counts before random bytes."""
    from fwconvert.checkpoint import open_checkpoint

    p = tmp_path / "m.gguf"

    @FUZZ
    @given(st.one_of(st.binary(max_size=200),
                     st.builds(lambda v, n, m, b: b"GGUF" + struct.pack("<IQQ", v, n, m) + b, st.integers(0, 5),
                               st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1), st.binary(max_size=100))))
    def check(data):
        write(p, data)
        documented_only(open_checkpoint, str(p))

    check()
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


MUTATIONS = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(["F64", "I32", "U8", "BOOL", "F8_E4M3", "BF16", "F16", "", "X"])),
    st.tuples(st.just("shape"), st.one_of(JSON, st.lists(st.integers(-5, 2 ** 64), max_size=4))),
    st.tuples(st.just("data_offsets"), st.one_of(JSON, st.lists(st.integers(-5, 2 ** 64), min_size=2, max_size=3))),
    st.tuples(st.just("name"), HOSTILE),
    st.tuples(st.just("delete"), st.none()),
    st.tuples(st.just("entry"), JSON),
    st.tuples(st.just("metadata"), JSON),
)


def _mutated_file(tensors, edits, len_delta, cut, extra) -> bytes:
    data = st_bytes(tensors)
    n = struct.unpack("<Q", data[:8])[0]
    head, body = json.loads(data[8:8 + n]), data[8 + n:]
    names = list(head)
    for (op, value), k in edits:
        name = names[k % len(names)]
        if name not in head:
            continue
        if op in ("dtype", "shape", "data_offsets"):
            if isinstance(head[name], dict):  # an earlier "entry" edit may have replaced the whole entry
                head[name][op] = value
        elif op == "name":
            head[value] = head.pop(name)
        elif op == "delete":
            del head[name]
        elif op == "entry":
            head[name] = value
        else:
            head["__metadata__"] = value
    out = raw_st(head, body[:len(body) - cut] + extra)
    return struct.pack("<Q", max(0, len(out) - 8 + len_delta)) + out[8:] if len_delta else out


@pytest.mark.timeout(180)
def test_mutated_safetensors_headers(tmp_path):
    cfg = tiny_config(num_hidden_layers=1)
    tensors = tiny_tensors(cfg)
    d = single_file_model(tmp_path / "m", cfg=cfg, tensors=tensors)
    before = tree_snapshot(d)

    @FUZZ
    @given(st.lists(st.tuples(MUTATIONS, st.integers(0, 100)), min_size=1, max_size=3),
           st.one_of(st.just(0), st.integers(-20, 20)), st.one_of(st.just(0), st.integers(1, 64)),
           st.binary(max_size=8))
    def check(edits, len_delta, cut, extra):
        write(os.path.join(d, "model.safetensors"), _mutated_file(tensors, edits, len_delta, cut, extra))
        documented_only(_open_and_read, d)

    check()
    _unchanged_but(d, before, "model.safetensors")


# -- config.json ---------------------------------------------------------------------------------------------
CONFIG_KEYS = sorted(tiny_config()) + ["head_dim", "rope_scaling", "rope_theta", "sliding_window", "base_model_type",
                                       "fast_weights", "torch_dtype", "attention_bias", "mlp_bias"]
PLAIN_KEYS = [k for k in CONFIG_KEYS if not k.endswith("model_type")]
FAMILY = st.sampled_from(["llama", "mistral", "qwen2", "qwen3"])
HASHABLE = st.one_of(FAMILY, FAMILY, FAMILY, st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                     st.floats(allow_nan=False), st.text(max_size=8),
                     st.sampled_from(["llama", "mistral", "qwen2", "qwen3", "fwconvert", "bert"]))


def _configs(model_type_values):
    """Mutations of a valid config, random dicts of config keys and any JSON; model_type /
    base_model_type values come from ``model_type_values`` (unhashable ones: test_unhashable_model_type_is_input_error)."""
    keys = st.sampled_from(PLAIN_KEYS)
    edits = st.dictionaries(keys, JSON, max_size=4)
    mutated = st.builds(lambda e, mt, b: {**tiny_config(), **e, "model_type": mt, "base_model_type": b},
                        edits, model_type_values, model_type_values)
    rand = st.builds(lambda e, mt: {**e, "model_type": mt}, st.dictionaries(keys, JSON, max_size=6), model_type_values)
    return st.one_of(mutated, rand, JSON.filter(lambda x: not isinstance(x, dict)))


@pytest.mark.timeout(120)
def test_random_config_dicts_parse_config():
    from fwconvert.families import parse_config

    @FUZZ
    @given(_configs(HASHABLE))
    def check(raw):
        documented_only(parse_config, raw, "config.json")

    check()


def test_unhashable_model_type_is_input_error():
    from fwconvert.families import parse_config

    documented_only(parse_config, {**tiny_config(), "model_type": ["llama"]}, "config.json")


@pytest.mark.timeout(180)
def test_random_config_via_inspect(tmp_path):
    from test_cli_sweep import run_inproc

    d = single_file_model(tmp_path / "m")
    before = tree_snapshot(d)

    @settings(FUZZ, max_examples=40)
    @given(_configs(HASHABLE))
    def check(raw):
        write(os.path.join(d, "config.json"), json.dumps(raw).encode())
        code, out, err = run_inproc(["inspect", "--json", d])
        assert code in (0, 3) and "Traceback" not in err, (code, err)
        assert (code == 0) == bool(out) and (code != 0) == err.startswith("Error:"), (out, err)

    check()
    _unchanged_but(d, before, "config.json")


@pytest.mark.timeout(240)
def test_random_config_via_add_fwl(tmp_path):
    """Configs that may pass parsing go on to conversion: exit 0, 3 or 6 only, and nothing beside out/."""
    import shutil

    from test_cli_sweep import run_inproc

    d = single_file_model(tmp_path / "m")
    out = tmp_path / "out"

    @settings(FUZZ, max_examples=30)
    @given(st.builds(lambda e, mt: {**tiny_config(), **e, "model_type": mt},
                     st.dictionaries(st.sampled_from(PLAIN_KEYS), JSON, max_size=2),
                     FAMILY))
    def check(raw):
        write(os.path.join(d, "config.json"), json.dumps(raw).encode())
        before = tree_snapshot(tmp_path)
        code, _, err = run_inproc(["add-fwl", d, "-o", out, "--chunk-size", "8"])
        assert code in (0, 3, 6) and "Traceback" not in err, (code, err)
        after = tree_snapshot(tmp_path)
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        assert all(k.split(os.sep)[0] == "out" for k in changed), sorted(changed)[:5]
        shutil.rmtree(out, ignore_errors=True)

    check()


# -- index JSON ------------------------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_random_index_json(tmp_path):
    os.mkfifo(tmp_path / "x.safetensors")  # a shard name escaping the folder and opened would hang here
    d = sharded_model(tmp_path / "m")
    index_path = os.path.join(d, "model.safetensors.index.json")
    good = json.load(open(index_path))
    before = tree_snapshot(d)
    names = st.sampled_from(sorted(good["weight_map"]))
    weight_map = st.one_of(
        st.builds(lambda e: {**good["weight_map"], **e}, st.dictionaries(names, HOSTILE, max_size=3)),
        st.builds(lambda e: {**good["weight_map"], **e}, st.dictionaries(HOSTILE, HOSTILE, max_size=3)),
        st.builds(lambda e: {k: v for k, v in good["weight_map"].items() if k not in e}, st.sets(names)))
    with_md = st.builds(lambda wm, md: {"metadata": md, "weight_map": wm}, weight_map, JSON)
    doc = st.one_of(with_md, with_md, with_md, st.builds(lambda wm: {"weight_map": wm}, weight_map),
                    st.builds(lambda wm: {"weight_map": wm}, JSON), JSON)

    @FUZZ
    @given(doc)
    def check(index):
        write(index_path, json.dumps(index).encode())
        documented_only(_open_and_read, d)

    check()
    _unchanged_but(d, before, "model.safetensors.index.json")


# -- exported-folder manifests -------------------------------------------------------------------------------
MANIFEST_KEYS = ["graph", "vocab_size", "dtype", "attention", "window", "chunking", "state", "inputs", "outputs",
                 "tokenizer_files", "eos_token_id", "source", "external_data", "format", "feeds", "versions"]


@pytest.mark.timeout(120)
def test_random_manifests(tmp_path):
    from exporters.runtime.session import load_manifest
    from test_cli_sweep import _manifest

    d = tmp_path / "exp"
    d.mkdir()
    good = _manifest()
    fields = st.sampled_from(["key", "input", "output", "shape", "dtype", "init"])
    state_entry = st.dictionaries(fields, JSON, max_size=6)
    mutated = st.builds(lambda e, s: {**copy.deepcopy(good), **e, **({"state": s} if s is not None else {})},
                        st.dictionaries(st.sampled_from(MANIFEST_KEYS), st.one_of(JSON, HOSTILE), max_size=3),
                        st.one_of(st.none(), st.lists(state_entry, max_size=3)))

    @FUZZ
    @given(st.one_of(mutated, JSON))
    def check(doc):
        write(d / "manifest.json", json.dumps(doc).encode())
        documented_only(load_manifest, str(d))

    check()
    assert sorted(os.listdir(d)) == ["manifest.json"]


# -- the properties can fail ----------------------------------------------------------------------------------
def test_documented_only_rejects_other_exceptions(monkeypatch):
    """A reader that leaked a KeyError would fail the property (checked by breaking parse_config)."""
    import fwconvert.families as F

    def broken(raw, source):
        return raw["hidden_size"]  # KeyError on a config without it

    monkeypatch.setattr(F, "parse_config", broken)
    with pytest.raises(KeyError):
        documented_only(F.parse_config, {}, "config.json")
    assert documented_only(lambda: (_ for _ in ()).throw(F.InputError("x"))) is None
