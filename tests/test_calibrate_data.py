"""Calibration data: reading, validation (refused with exit 3 before any training), split, windows."""
import os

import numpy as np
import pytest

from fwconvert.calibrate.data import Document, WindowSampler, load_documents, split_documents
from fwconvert.cli.main import main
from fwconvert.errors import InputError
from test_calibrate_support import save_tiny, write_token_docs


class _Tok:
    def encode(self, text):
        return [ord(c) % 256 for c in text]


def test_reads_folders_recursively_by_extension_and_token_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.py").write_text("hello world")
    (tmp_path / "a" / "b" / "y.rst").write_text("abc")
    (tmp_path / "a" / "skip.bin").write_bytes(b"\0" * 8)  # wrong extension: not taken
    np.save(tmp_path / "a" / "b" / "t.tokens.npy", np.arange(5, dtype=np.int32))
    np.arange(7, dtype="<i4").tofile(tmp_path / "a" / "u.tokens.bin")
    docs = load_documents([str(tmp_path / "a")], 256, _Tok, exts=(".py", ".rst"))
    by_name = {d.name: d.ids.tolist() for d in docs}
    assert by_name == {os.path.join("a", "b", "t.tokens.npy"): list(range(5)),
                       os.path.join("a", "b", "y.rst"): [97, 98, 99],
                       os.path.join("a", "u.tokens.bin"): list(range(7)),
                       os.path.join("a", "x.py"): [ord(c) for c in "hello world"]}
    assert [d.name for d in docs] == sorted(by_name)  # deterministic order


def test_token_files_need_no_tokenizer(tmp_path):
    write_token_docs(tmp_path, n=2)
    assert len(load_documents([str(tmp_path)], 256, None)) == 2
    (tmp_path / "t.txt").write_text("text")
    with pytest.raises(InputError, match="tokenizer"):
        load_documents([str(tmp_path)], 256, None)


@pytest.mark.parametrize("case", ["empty", "too_short", "id_too_big", "negative", "missing", "fifo", "float_npy", "odd_bin"])
def test_bad_data_refused(tmp_path, case):
    p = tmp_path / "d"
    p.mkdir()
    path = str(p)
    if case == "too_short":
        np.save(p / "a.tokens.npy", np.array([3], dtype=np.int32))
    elif case == "id_too_big":
        np.save(p / "a.tokens.npy", np.array([1, 2, 256, 7], dtype=np.int32))
    elif case == "negative":
        np.save(p / "a.tokens.npy", np.array([1, -1, 2], dtype=np.int64))
    elif case == "missing":
        path = str(p / "nope.tokens.npy")
    elif case == "fifo":
        path = str(p / "f.tokens.npy")
        os.mkfifo(path)
    elif case == "float_npy":
        np.save(p / "a.tokens.npy", np.array([1.0, 2.0]))
    elif case == "odd_bin":
        (p / "a.tokens.bin").write_bytes(b"\1\0\0\0\2")
    with pytest.raises(InputError) as e:
        load_documents([path], 256, None)
    msg = str(e.value)
    expected = {"empty": "no data files", "too_short": "empty dataset", "id_too_big": "outside [0, 256)",
                "negative": "outside [0, 256)", "missing": "not found", "fifo": "not a regular file",
                "float_npy": "integer array", "odd_bin": "int32"}[case]
    assert expected in msg


def test_split_is_by_document_deterministic_and_seeded():
    docs = [Document(f"d{i}", np.arange(i, i + 10)) for i in range(20)]
    tr1, he1 = split_documents(docs, 0.2, seed=1)
    tr2, he2 = split_documents(docs, 0.2, seed=1)
    _, he3 = split_documents(docs, 0.2, seed=2)
    assert [d.name for d in he1] == [d.name for d in he2] and len(he1) == 4
    assert {d.name for d in he1} != {d.name for d in he3}
    assert not {d.name for d in tr1} & {d.name for d in he1} and len(tr1) + len(he1) == 20
    assert len(split_documents(docs[:2], 0.01, 0)[1]) == 1  # at least one held out
    assert split_documents(docs, 0.0, 0)[1] == []


def test_windows_come_from_one_document_and_depend_only_on_index():
    docs = [Document("a", np.arange(0, 100)), Document("b", np.arange(1000, 1035)), Document("c", np.arange(5000, 5010))]
    s = WindowSampler(docs, 16, seed=3)
    assert s.total == 6 + 2  # c is shorter than a window: skipped
    seen = set()
    for i in range(3 * s.total):
        w = s.window(i)
        assert len(w) == 16 and np.all(np.diff(w) == 1)  # contiguous: one document, never packed
        if i < s.total:
            seen.add(int(w[0]))
    assert len(seen) == s.total  # an epoch visits every window once
    again = WindowSampler(docs, 16, seed=3)
    assert np.array_equal(again.batch(5, 4), s.batch(5, 4))
    assert not np.array_equal(WindowSampler(docs, 16, seed=4).batch(0, 8), s.batch(0, 8))
    with pytest.raises(InputError, match="seq-len 200"):
        WindowSampler(docs, 200, 0)


@pytest.fixture(scope="module")
def fwl_model(tmp_path_factory):
    from fwconvert.config import FWLConfig

    return save_tiny(tmp_path_factory.mktemp("model") / "fwl", FWLConfig(size=64, chunk_size=16))


@pytest.mark.parametrize("case", ["empty", "id_too_big", "missing", "seq_len"])
def test_cli_refuses_bad_data_before_training(tmp_path, monkeypatch, capsys, fwl_model, case):
    from fwconvert.calibrate import run

    monkeypatch.setattr(run, "load_for_calibration", lambda *a, **k: pytest.fail("model loaded before data checked"))
    data = tmp_path / "data"
    data.mkdir()
    seq = "32"
    if case == "id_too_big":
        np.save(data / "a.tokens.npy", np.array([1, 2, 999] * 50, dtype=np.int32))
    elif case == "missing":
        data = data / "missing.tokens.npy"
    elif case == "seq_len":
        write_token_docs(data, n=2)
        seq = "100000"
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["calibrate", fwl_model, "--data", str(data), "-o", str(out), "--seq-len", seq, "--steps", "2"])
    assert e.value.code == (2 if case == "seq_len" else 3)  # a bad option value is a usage error
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "Traceback" not in err and len(err.splitlines()) <= 5
    assert not out.exists() and not os.path.exists(str(tmp_path / ".out.fwconvert-calibration"))
