"""fwconvert eval: bucket logic against hand computations, streaming NLL, dynamic evaluation, the CLI JSON."""
import json
import math
import os

import numpy as np
import pytest
import torch

from fwconvert import evaluate as ev
from fwconvert.calibrate.data import Document
from fwconvert.config import FWLConfig
from fwconvert.errors import InputError
from test_calibrate_support import phrase_doc, save_tiny, tiny_model, write_token_docs


def test_bucket_edges_and_labels():
    assert ev.bucket_edges(8192) == [0, 512, 1024, 2048, 4096, 8192]
    assert ev.bucket_labels(ev.bucket_edges(8192)) == ["0-512", "512-1k", "1k-2k", "2k-4k", "4k-8k"]
    assert ev.bucket_edges(20000) == [0, 512, 1024, 2048, 4096, 8192, 16384, 20000]
    assert ev.bucket_edges(2048) == [0, 512, 1024, 2048]
    assert ev.bucket_edges(1500) == [0, 256, 512, 1024, 1500]
    assert ev.bucket_edges(64) == [0, 16, 32, 64] and ev.bucket_edges(8) == [0, 2, 4, 8]
    assert ev.bucket_edges(3) == [0, 1, 2, 3]
    with pytest.raises(InputError):
        ev.bucket_edges(1)


def test_summary_matches_a_hand_computation():
    st = ev.PositionStats(8)  # predictions at t = 0..6; buckets [0,2) [2,4) [4,8)
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    b = torch.tensor([[3.0, 2.0, 1.0]])  # a shorter document: only t = 0..2
    st.add(a)
    st.add(b)
    st.tokens, st.seconds = 11, 2.0
    s = st.summary()
    assert s["perplexity"] == pytest.approx(math.exp(34.0 / 10))
    assert s["by_position"] == pytest.approx({"0-2": math.exp(8.0 / 4), "2-4": math.exp(8.0 / 3),
                                              "4-8": math.exp(18.0 / 3)})
    assert s["tokens_per_second"] == 5.5 and s["predictions"] == 10
    assert s["mean_of_buckets"] == pytest.approx(np.mean(list(s["by_position"].values())))
    curve = st.curve()
    assert curve[0] == 2.0 and curve[6] == 7.0


def test_report_shapes():
    st = ev.PositionStats(8)
    st.add(torch.ones(1, 7))
    st.tokens, st.seconds = 8, 1.0
    one = ev.report({"fwl": st}, 8, 4, 1)
    assert {"perplexity", "by_position", "tokens_per_second", "buckets", "documents"} <= set(one)
    two = ev.report({"fwl": st, "baseline": st}, 8, 4, 1)
    assert set(two["models"]) == {"fwl", "baseline"}
    assert two["models"]["fwl"]["relative_to_baseline"]["perplexity"] == pytest.approx(0.0)
    assert set(two["models"]["fwl"]["by_position"]) == {"0-2", "2-4", "4-8"}


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_streamed_nll_equals_one_shot_cross_entropy(chunk):
    model, _ = tiny_model(FWLConfig(size=64, chunk_size=16))
    with torch.no_grad():  # give the fast weights something to do
        model.fwl_head.step_sizes.fill_(0.3)
        model.fwl_head.norm.weight.fill_(0.5)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    step, init = ev.torch_runner(model)
    nll = ev.stream_nll(step, init, ids, chunk)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(ids)[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    assert nll.shape == (2, 39)
    assert torch.allclose(nll, ref, atol=1e-4, rtol=1e-4)


def test_dynamic_eval_learns_a_repetitive_document_and_leaves_the_model_alone():
    model, _ = tiny_model(None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    doc = np.tile(np.random.default_rng(0).integers(0, 256, 24), 8)[:192]
    static = ev.evaluate_stream(*ev.torch_runner(model), [doc], 192, 32, "cpu")
    dyn = ev.dynamic_eval(model, [doc], 192, 32, lr=3e-3, which="all")
    s, d = static.curve(), dyn.curve()
    assert np.allclose(d[:32], s[:32], atol=1e-5)  # the first chunk is scored before any update
    assert d[96:].mean() < s[96:].mean() - 0.5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    down = ev.dynamic_eval(model, [doc], 192, 32, which="down_proj")
    assert down.extra["dynamic_eval"] == {"lr": 3e-4, "params": "down_proj", "optimizer": "adam"}


def test_select_documents_heldout_min_length_and_cap():
    rng = np.random.default_rng(0)
    docs = [Document(f"d{i}", rng.integers(0, 256, n)) for i, n in enumerate([50, 100, 120, 30])]
    keys = {docs[1].key, docs[3].key}
    picked = ev.select_documents(docs, 64, "auto", keys)
    assert [len(x) for x in picked] == [64]  # d1 cut to the context; d3 too short
    assert [len(x) for x in ev.select_documents(docs, 64, "all", keys, min_tokens=40)] == [50, 64, 64]
    assert len(ev.select_documents(docs, 64, "all", None, max_docs=1)) == 1
    with pytest.raises(InputError, match="held-out"):
        ev.select_documents(docs, 64, "heldout", None)
    with pytest.raises(InputError, match="no document has 64"):
        ev.select_documents(docs[3:], 64, "all", None)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from fwconvert.calibrate.loop import CalibrationSettings
    from fwconvert.calibrate.run import calibrate

    root = tmp_path_factory.mktemp("ev")
    fwl = save_tiny(root / "fwl", FWLConfig(size=64, chunk_size=16))
    base = save_tiny(root / "base", None)
    data = write_token_docs(root / "data", n=10, length=200)
    s = CalibrationSettings(steps=3, seq_len=64, batch_size=2, lr=3e-2, save_every=3)
    rec = calibrate(fwl, [data], str(root / "cal"), s, heldout=0.3, progress=False)
    return str(root / "cal"), base, data, rec


def test_cli_eval_json_compares_models_on_the_heldout_split(calibrated, tmp_path, capsys):
    from fwconvert.cli.main import main

    cal, base, data, rec = calibrated
    plot = str(tmp_path / "p.png")
    with pytest.raises(SystemExit) as e:
        main(["eval", cal, "--data", data, "--context", "128", "--chunk-size", "32", "--base", base,
              "--dynamic-eval", "--plot", plot, "--json"])
    assert e.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["models"]) == {"fwl", "base", "dynamic_eval"}
    assert out["documents"] == len(rec["data"]["heldout"]) == 3
    assert out["buckets"] == ["0-32", "32-64", "64-128"]
    for m in out["models"].values():
        assert set(m["by_position"]) == set(out["buckets"]) and m["tokens_per_second"] > 0 and m["perplexity"] > 1
    assert os.path.getsize(plot) > 1000


def test_cli_eval_single_model_and_all_split(calibrated, capsys):
    from fwconvert.cli.main import main

    cal, _, data, _ = calibrated
    with pytest.raises(SystemExit) as e:
        main(["eval", cal, "--data", data, "--context", "128", "--chunk-size", "50", "--split", "all", "--json",
              "--max-docs", "4"])
    assert e.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert {"perplexity", "by_position", "tokens_per_second"} <= set(out) and out["documents"] == 4
    assert out["model"] == "fwl"  # named as it would be beside --base (the table's row label too)


def test_cli_eval_ort_without_runtime_is_a_clean_error(calibrated, capsys):
    from fwconvert.cli.main import main

    cal, base, data, _ = calibrated
    with pytest.raises(SystemExit) as e:
        main(["eval", cal, "--data", data, "--context", "128", "--runtime", "ort"])
    assert e.value.code == 3 and capsys.readouterr().err.startswith("Error: ")


def test_phrase_docs_are_deterministic():
    a = phrase_doc(np.random.default_rng(1), 50)
    assert np.array_equal(a, phrase_doc(np.random.default_rng(1), 50)) and len(a) == 50


def test_cli_eval_refuses_a_context_beyond_the_model(calibrated, capsys):
    from fwconvert.cli.main import main

    cal, _, data, _ = calibrated
    with pytest.raises(SystemExit) as e:
        main(["eval", cal, "--data", data, "--context", "100000"])
    assert e.value.code == 2 and "max_position_embeddings" in capsys.readouterr().err


def test_cli_eval_split_from_another_folder(calibrated, capsys):
    from fwconvert.cli.main import main

    cal, base, data, rec = calibrated
    with pytest.raises(SystemExit) as e:  # base has no calibration record; the split comes from cal
        main(["eval", base, "--data", data, "--context", "128", "--split-from", cal, "--json"])
    assert e.value.code == 0
    assert json.loads(capsys.readouterr().out)["documents"] == len(rec["data"]["heldout"])



def test_cli_eval_checks_the_plot_path_before_evaluating_and_writes_it_atomically(calibrated, tmp_path, capsys):
    """--plot is checked first (a usage error for a folder or an unknown format; exit 4 for a missing folder or an
    existing file without --force), and the plot appears whole under its name, nothing else beside it."""
    from fwconvert.cli.main import main

    cal, _, data, _ = calibrated
    args = ["eval", cal, "--data", data, "--context", "128", "--chunk-size", "64", "--max-docs", "1", "--plot"]
    (tmp_path / "old.png").write_bytes(b"not a plot")
    for plot, code, words in ((str(tmp_path), 2, "is a folder"), (str(tmp_path / "p.txt"), 2, "must end in"),
                              (str(tmp_path / "p"), 2, "must end in"), (str(tmp_path / "no" / "p.png"), 4, "does not exist"),
                              (str(tmp_path / "old.png"), 4, "--force")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(args + [plot])
        err = capsys.readouterr().err
        assert e.value.code == code and words in err and "evaluating" not in err, (plot, err)
    assert (tmp_path / "old.png").read_bytes() == b"not a plot"
    for name, extra in (("old.png", ["--force"]), ("new.svg", [])):
        with pytest.raises(SystemExit) as e:
            main(args + [str(tmp_path / name)] + extra)
        assert e.value.code == 0
    assert (tmp_path / "old.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (tmp_path / "new.svg").read_bytes()[:400]
    assert sorted(os.listdir(tmp_path)) == ["new.svg", "old.png"]  # no temporary file left


def test_cli_eval_max_docs_must_be_positive(calibrated, capsys):
    from fwconvert.cli.main import main

    cal, _, data, _ = calibrated
    for n in ("0", "-1"):
        with pytest.raises(SystemExit) as e:
            main(["eval", cal, "--data", data, "--context", "128", "--max-docs", n])
        assert e.value.code == 2 and f"--max-docs must be at least 1, got {n}" in capsys.readouterr().err


def test_untimed_warm_up_changes_no_number():
    """evaluate_stream runs one untimed chunk per batch shape first (so the first model evaluated does not pay the
    device warm-up in its tokens/s); the statistics equal a plain stream of the documents. Dynamic evaluation's
    warm-up leaves its numbers equal to a second, identical run's."""
    model, _ = tiny_model(None)
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 256, 96) for _ in range(3)]
    step0, init = ev.torch_runner(model)
    calls = []

    def step(ids, st):
        calls.append(tuple(ids.shape))
        return step0(ids, st)

    stats = ev.evaluate_stream(step, init, docs, 96, 32, "cpu", batch_size=2)
    assert calls[:2] == [(2, 32), (1, 32)] and len(calls) == 2 + 3 + 3  # warm-ups, then batches of 2 and 1
    ref = torch.cat([ev.stream_nll(step0, init, torch.as_tensor(np.stack(docs[:2])), 32),
                     ev.stream_nll(step0, init, torch.as_tensor(np.stack(docs[2:])), 32)])
    assert stats.tokens == 3 * 96 and stats.summary()["loss"] == pytest.approx(float(ref.mean()), rel=1e-6)
    import copy

    work = copy.deepcopy(model)
    direct = ev._dynamic_doc(work, {k: v.clone() for k, v in work.state_dict().items()}, "down_proj", 3e-4,
                             torch.as_tensor(docs[0][None]), 32)  # no warm-up before it
    warmed = ev.dynamic_eval(model, docs[:1], 96, 32, which="down_proj").curve()
    np.testing.assert_allclose(warmed[:95], direct[0].numpy(), rtol=1e-6, atol=1e-6)
