"""Property/fuzz tests (reliability.md test 40): random and mutated safetensors bytes and index JSON fed
to the reader give only InputError (exit 3), never another exception, a hang or an opened FIFO."""
import json
import os

import pytest

from badinputs import sharded_model, small_tensors, st_bytes, write
from fwconvert.checkpoint import open_checkpoint
from fwconvert.errors import InputError


def _only_input_errors(data: bytes):
    import tempfile

    from fwconvert.checkpoint.safetensors_header import read_header

    with tempfile.TemporaryDirectory() as d:
        p = write(os.path.join(d, "f.safetensors"), data)
        try:
            read_header(p)
        except InputError:
            pass


def test_fuzz_random_bytes():
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=200))
    def check(data):
        _only_input_errors(data)

    check()


def test_fuzz_mutated_valid_header():
    from hypothesis import given, settings, strategies as st

    valid = st_bytes(small_tensors(3))

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), min_size=1, max_size=4))
    def check(edits):
        b = bytearray(valid)
        for i, v in edits:
            b[i] = v
        _only_input_errors(bytes(b))

    check()


@pytest.mark.timeout(120)
def test_fuzz_index_json(tmp_path):
    """Random shard names and metadata in the index: only InputError, and the FIFO beside it is never opened."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    os.mkfifo(tmp_path / "x.safetensors")
    d = sharded_model(tmp_path / "m")
    index_path = os.path.join(d, "model.safetensors.index.json")
    good = json.load(open(index_path))
    names = sorted(good["weight_map"])
    value = st.one_of(st.text(max_size=20), st.sampled_from(["../x.safetensors", str(tmp_path / "x.safetensors"),
                                                             "model-00001-of-00002.safetensors"]),
                      st.integers(), st.none(), st.lists(st.integers(), max_size=2))

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.sampled_from(names), value, max_size=4), st.one_of(st.none(), st.integers(), st.text()))
    def check(edits, total):
        doc = {"metadata": {"total_size": total}, "weight_map": {**good["weight_map"], **edits}}
        write(index_path, json.dumps(doc).encode())
        try:
            open_checkpoint(d)
        except InputError:
            pass

    check()
