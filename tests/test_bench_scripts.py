"""The benchmark helpers on the CPU: gpu_shapes.sh's random shape model, export cost and calibration MFU; the scripts parse; kernel_profile.py's table."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import calib_throughput  # noqa: E402
import export_cost  # noqa: E402
import make_shape_model  # noqa: E402

# The tiny shape by hand: hidden 64, MLP 128, 2 layers, 4 query / 2 KV heads of 16, vocab 49152, tied embeddings.
TINY_LAYER = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64  # q, o; k, v; gate, up, down; two norms
TINY_N = 2 * TINY_LAYER + 64 + 49152 * 64  # layers, final norm, the (tied) unembedding once


def _char_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(i): i for i in range(256)}
    vocab["[UNK]"] = vocab.pop(chr(0))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(base folder, FWL folder, docs folder): make_shape_model tiny, then `fwconvert add-fwl` through the CLI."""
    root = tmp_path_factory.mktemp("shape")
    tok = _char_tokenizer(str(root / "tok"))
    base = str(root / "base")
    assert make_shape_model.main([base, "--shape", "tiny", "--dtype", "bf16", "--tokenizer-from", tok]) == 0
    fwl = str(root / "fwl")
    subprocess.run([sys.executable, "-m", "fwconvert", "add-fwl", base, "-o", fwl, "--chunk-size", "32"], check=True)
    docs = root / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text(" ".join(f"word{j % (7 + i)} of doc {i}" for j in range(150)))
    return base, fwl, str(docs)


def test_shape_model_loads_and_tokenizes(tiny):
    import fwconvert
    from fwconvert.tokenizer import load_tokenizer

    base, fwl, _ = tiny
    with open(os.path.join(base, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (64, 2, 49152)
    m = fwconvert.load(base)
    assert next(m.parameters()).dtype == torch.bfloat16
    w = m.state_dict()["model.layers.0.mlp.down_proj.weight"].float()
    assert 0.015 < float(w.std()) < 0.025
    ids = torch.tensor([load_tokenizer(base).encode("def f(x): return x")])
    with torch.no_grad():
        a, b = m(ids), fwconvert.load(fwl)(ids)
    assert torch.isfinite(a).all() and torch.equal(a, b)  # a fresh FWL conversion is the base model


def test_export_cost_peak_rss_and_timeout(tmp_path):
    r = export_cost.measure([sys.executable, "-c", "x = bytearray(200_000_000)"])
    assert r["rc"] == 0 and r["peak_rss_mb"] >= 190 and r["seconds"] > 0
    out = tmp_path / "costs.jsonl"
    p = subprocess.run([sys.executable, os.path.join(BENCH, "export_cost.py"), "--label", "x", "--json-out", str(out),
                        "--", sys.executable, "-c", "pass"], capture_output=True, text=True, check=True)
    line = json.loads(p.stdout)
    assert line["label"] == "x" and line["rc"] == 0 and json.loads(out.read_text()) == line
    assert export_cost.measure(["sleep", "30"], timeout=0.5)["rc"] == 124


def test_flops_formula_by_hand(tiny):
    f = calib_throughput.flops_per_token(1000, n_layers=2, n_heads=4, head_dim=16, seq_len=64)
    assert f == 6 * 1000 + 6 * 2 * 4 * 16 * 64
    shape = calib_throughput.count_params(tiny[0])
    assert shape == {"n_params": TINY_N, "n_layers": 2, "n_heads": 4, "head_dim": 16} and TINY_N == 3_219_776
    assert calib_throughput.flops_per_token(seq_len=64, **shape) == 19_318_656 + 49_152


def test_calib_throughput_cpu(tiny):
    _, fwl, docs = tiny
    r = calib_throughput.run(fwl, docs, steps=2, seq_len=64, device="cpu", ext=".txt", peak_flops=1e12)
    assert r["tokens_per_second"] > 0 and r["tokens_per_second_manifest"] > 0 and len(r["step_seconds"]) == 4
    assert r["n_params"] > TINY_N  # the FWL head's parameters count too
    expected = calib_throughput.flops_per_token(r["n_params"], 2, 4, 16, 64) * r["tokens_per_second"] / 1e12
    assert 0 < r["mfu"] == pytest.approx(expected, rel=1e-2)  # tokens/s is rounded


def test_gpu_shapes_script_parses():
    subprocess.run(["bash", "-n", os.path.join(BENCH, "gpu_shapes.sh")], check=True)


@pytest.mark.parametrize("script", ["gpu_pipeline.sh", "gpu_quick_form.sh"])
def test_gpu_session_scripts_parse_and_refuse_unknown_commands(script):
    path = os.path.join(BENCH, script)
    subprocess.run(["bash", "-n", path], check=True)
    r = subprocess.run(["bash", path, "nonsense"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_kernel_profile_classes_and_table():
    """kernel_profile.py's kernel classes (real kernel names from an H200 profile) and its Markdown table."""
    sys.path.insert(0, BENCH)
    import kernel_profile as kp

    assert kp.classify("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert kp.classify("nvjet_sm90_hsh_64x48_64x15_2x4_h_bz_NNT") == "gemm"
    assert kp.classify("void onnxruntime::cuda::ExpandKernel<unsigned short, 256, 4>(int)") == "transpose/copy"
    assert kp.classify("void onnxruntime::contrib::cuda::SkipLayerNormKernelSmall<__half, 80u>") == "norm"
    assert kp.classify("void onnxruntime::cuda::softmax_block_forward<4, float>") == "softmax/reduce"
    assert kp.classify("void onnxruntime::cuda::_BinaryElementWise<__half, __half, __half>") == "elementwise"
    r = {"batch": 1, "provider": "CUDA execution provider (TF32 on), CUDA graphs", "wall_ms": 4.05,
         "kernels_per_step": 750, "busy_ms": 3.5, "span_ms": 4.25, "by_class_ms": {"attention": 1.38, "gemm": 0.79},
         "top_kernels": [{"name": "k", "class": "gemm", "per_step": 60, "us_each": 4.75, "ms_per_step": 0.285}],
         "copies": [{"name": "Memcpy DtoD (Device -> Device)", "per_step": 60, "ms_per_step": 0.12}]}
    md = kp.markdown([("base-w", r), ("bad", {"batch": 8, "cuda_graph": None, "wall_ms": float("nan"),
                                              "note": "failed: x"})])
    assert "| base-w | 1 | 0 | CUDA execution provider (TF32 on), CUDA graphs | 4.05 | 750 | 3.50 | 4.25 |" in md
    assert "attention 1.38, gemm 0.79" in md and "failed: x" in md and "| `k` | gemm | 60 | 4.75 | 0.285 |" in md
    assert "Copies per step (with each step's fresh state, made between the profiled steps: a static session's reset " \
           "on the device, an ordinary session's upload): `Memcpy DtoD (Device -> Device)` 60 × (0.120 ms)" in md
    md = kp.markdown([("base", {**r, "past": 512})])  # after a past the state is made outside the profile
    assert "Copies per step: `Memcpy DtoD (Device -> Device)` 60 × (0.120 ms)" in md


def test_fwl_step_sweep_at_zero_is_the_base_model(tiny):
    """benchmarks/fwl_step_sweep.py: η = 0 on a converted FWL model gives the base model's perplexities exactly
    (the head is inactive at conversion); a non-zero β step size changes them."""
    import fwconvert
    import fwl_step_sweep
    from fwconvert.evaluate import evaluate_stream, torch_runner
    from fwconvert.tokenizer import load_tokenizer

    base, fwl, docs = tiny
    files = sorted(os.path.join(docs, f) for f in os.listdir(docs))
    res = fwl_step_sweep.sweep(fwl, files, "beta", [0.0, 0.5], context=256, chunk=32)
    assert res["documents"] == 4
    tok = load_tokenizer(base)
    ids = [np.asarray(tok.encode(open(f).read())[:256], dtype=np.int64) for f in files]
    step, init = torch_runner(fwconvert.load(base).eval())
    with torch.no_grad():
        ref = evaluate_stream(step, init, ids, 256, 32, "cpu", batch_size=4).summary()
    assert res["runs"]["0.0"]["perplexity"] == ref["perplexity"]
    assert res["runs"]["0.5"]["perplexity"] != ref["perplexity"]
    assert "| 0.5 |" in fwl_step_sweep.markdown(res)


def test_window_perplexity_equals_full_until_the_window_slides(tiny, tmp_path):
    """benchmarks/window_perplexity.py: while every earlier position fits the window (chunks 0 and 1 of 32 tokens,
    window 64), the window model's chunk perplexities are the full model's; once positions leave it they differ."""
    import window_perplexity

    base, _, docs = tiny
    text = os.path.join(docs, sorted(os.listdir(docs))[0])
    out = window_perplexity.main([base, "--text", text, "--window", "64", "--sinks", "2", "--context", "192",
                                  "--chunk", "32", "--out-json", str(tmp_path / "w.json")])
    full, win, sink = (out[k]["chunk_perplexity"] for k in ("full", "window", "window+sinks"))
    assert out["tokens"] == 192 and len(full) == len(win) == len(sink) == 6
    assert full[:2] == win[:2] == sink[:2]
    assert any(abs(f - w) > 1e-3 * f for f, w in zip(full[3:], win[3:]))
    assert any(abs(s - w) > 1e-3 * w for s, w in zip(sink[3:], win[3:]))  # the sinks change what the window sees
    with open(tmp_path / "w.json") as f:
        assert json.load(f)["window"]["chunk_perplexity"] == win


def test_compare_losses_blocks_gap_and_verdict(tmp_path, capsys):
    """benchmarks/compare_losses.py: block means of two calibrations' losses, the largest gap, tokens/s; exit 0
    within the tolerance, 1 beyond it."""
    import compare_losses

    def run(name, losses, tps, world):
        d = tmp_path / name
        d.mkdir()
        (d / "MANIFEST.json").write_text(json.dumps({"calibration": {
            "losses": losses, "tokens_per_second": tps, "world_size": world}}))
        return str(d)

    a = run("one", [2.0, 1.0, 1.5, 0.5], 100.0, 1)
    b = run("two", [2.0, 1.0, 1.4, 0.5], 190.0, 2)
    res = compare_losses.compare(compare_losses.record(a), compare_losses.record(b), 2)
    assert [(r["a"], r["b"]) for r in res["blocks"]] == [(1.5, 1.5), (1.0, 0.95)]
    assert abs(res["max_gap"] - 0.05) < 1e-12 and res["world_size"] == (1, 2)
    assert compare_losses.main([a, b, "--every", "2", "--tolerance", "0.1"]) == 0
    assert compare_losses.main([a, b, "--every", "2", "--tolerance", "0.01"]) == 1
    assert "(1.90×)" in capsys.readouterr().out


@pytest.mark.parametrize("static", [True, None])
def test_kernel_profile_measures_the_step_after_the_past_it_is_given(tmp_path, monkeypatch, static):
    """kernel_profile.profile_graph's protocol, on the CPU provider (no kernels to record here): every measured
    step, profiled or timed, runs on a fresh state at past 0, or after exactly --past tokens with --past; a static
    full session's states share its buffers, so a state made ahead of its step would be at a later past."""
    import kernel_profile as kp
    import torch.profiler as tp

    import exporters.runtime.session as S
    from exporters.onnx.export import export_onnx
    from test_onnx_common import tiny_model

    out = export_onnx(tiny_model(kind="inplace"), str(tmp_path / "onnx"), chunk_size=8)
    init, step = S.ChunkSession.__init__, S.ChunkSession.step
    seen = []

    def on_cpu(self, folder, provider="cpu", cuda_graph=None, use_tf32=None, attention_kernels=None, **kw):
        init(self, folder, provider="cpu", cuda_graph=False if cuda_graph else cuda_graph, **kw)

    def record(self, ids, state, fetch=True):
        seen.append(int(np.asarray(state.position()).reshape(-1)[0]))
        return step(self, ids, state, fetch=fetch)

    monkeypatch.setattr(S.ChunkSession, "__init__", on_cpu)
    monkeypatch.setattr(S.ChunkSession, "step", record)
    monkeypatch.setattr(tp.ProfilerActivity, "CUDA", tp.ProfilerActivity.CPU)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    for past in (0, 24):
        seen.clear()
        r = kp.profile_graph(out, 2, 3, torch, static, past=past)
        assert r["wall_ms"] > 0
        per = past // 8 + 1  # prefix steps, then the measured one; 5 warm-up + 3 timed + 3 profiled
        assert seen == [0, 8, 16, 24][:per] * 11
    with pytest.raises(ValueError, match="multiple of the chunk"):
        kp.profile_graph(out, 1, 2, torch, static, past=5)


def test_linear_attention_check_forms_agree_on_cpu(tmp_path):
    """linear_attention_check.py's three graphs (the FWL export's masked form, LinearAttention whole and split into
    128-wide key heads) compute the FWL update (inclusive of t, carried prefix) on the CPU provider."""
    import linear_attention_check as lac

    out = tmp_path / "la.jsonl"
    assert lac.main(["--provider", "cpu", "--hidden", "40", "--chunk", "24", "--batch", "1", "2", "--iters", "1",
                     "--json", str(out), "--md", str(tmp_path / "la.md")]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["shape"], r["form"], r["batch"]) for r in rows} == {
        (s, f, b) for s in ("layer 1", "layer 2") for f in ("masked", "la", "la128") for b in (1, 2)}
    assert {r["d_k"] for r in rows if r["form"] == "la128"} == {41, 161}  # 1 and 2 heads of 128 after padding
    for r in rows:
        assert r["ok"], r
        assert r["rel_out"] < 1e-5 and r["rel_state"] < 1e-5, r
    # the reference is the inclusive form: an exclusive one (j < t) is far from it
    rng = np.random.default_rng(0)
    q, k, v, p = (rng.standard_normal(s).astype(np.float32) for s in ((1, 6, 3), (1, 6, 3), (1, 6, 2), (1, 3, 2)))
    out_incl, _ = lac.reference(q, k, v, p)
    excl = q.astype(np.float64) @ p + ((q @ k.transpose(0, 2, 1)) * np.tril(np.ones((6, 6)), -1)) @ v
    assert lac.rel(excl, out_incl) > 1e-2


def test_stream_by_chunk_times_every_chunk_of_every_pass(tmp_path, capsys):
    """stream_by_chunk.py on the CPU provider: one rate per pass and one time per chunk of each pass, for the
    ordinary and the static session of each graph; a length that is not whole chunks is refused."""
    import stream_by_chunk

    from exporters.onnx.export import export_onnx
    from test_onnx_common import tiny_model

    out = export_onnx(tiny_model(kind="fwl"), str(tmp_path / "onnx"), chunk_size=8)
    md, js = tmp_path / "s.md", tmp_path / "s.json"
    assert stream_by_chunk.main(["--graph", f"a={out}", "--graph", f"b={out}", "--tokens", "32", "--chunk", "8",
                                 "--passes", "2", "--provider", "cpu", "--static", "--out-md", str(md),
                                 "--out-json", str(js)]) == 0
    r = json.loads(js.read_text())
    labels = {f"{g} ({m})" for g in "ab" for m in ("ordinary", "static")}
    assert set(r["tokens_per_s"]) == set(r["ms_per_chunk"]) == labels and r["starts"] == [0, 8, 16, 24]
    for k in labels:
        assert len(r["tokens_per_s"][k]) == 2 and min(r["tokens_per_s"][k]) > 0
        assert [len(p) for p in r["ms_per_chunk"][k]] == [4, 4] and min(map(min, r["ms_per_chunk"][k])) > 0
    assert "| a (static) |" in md.read_text() and "past 24" in md.read_text()
    with pytest.raises(SystemExit):
        stream_by_chunk.main(["--graph", f"a={out}", "--tokens", "30", "--chunk", "8", "--out-md", str(md)])
    assert "multiple of --chunk" in capsys.readouterr().err


def test_gqa_probe_reference_and_batch_one(capsys):
    """gqa_probe.py's float64 reference equals our own model's attention math (fwconvert's RoPE and torch's SDPA with
    a bottom-right causal mask over past + chunk), and onnxruntime's GroupQueryAttention matches it at batch 1."""
    import gqa_probe

    from fwconvert.modeling.rope import _rotate_half

    rng = np.random.default_rng(3)
    b, c, p, heads, kv, hd = 2, 4, 3, 6, 2, 8
    qkv, pk, pv = rng.standard_normal((b, c, (heads + 2 * kv) * hd)), rng.standard_normal((b, kv, p, hd)), \
        rng.standard_normal((b, kv, p, hd))
    want, f = gqa_probe.reference(qkv, pk, pv, heads, kv, hd)
    t = torch.from_numpy(qkv)
    cos, sin = (torch.from_numpy(np.concatenate([fn(f), fn(f)], -1))[:, None] for fn in (np.cos, np.sin))
    q = t[..., :heads * hd].reshape(b, c, heads, hd).transpose(1, 2)
    k = t[..., heads * hd:(heads + kv) * hd].reshape(b, c, kv, hd).transpose(1, 2)
    v = t[..., (heads + kv) * hd:].reshape(b, c, kv, hd).transpose(1, 2)
    q, k = (x * cos + _rotate_half(x) * sin for x in (q, k))
    keys = torch.cat([torch.from_numpy(pk), k], 2).repeat_interleave(heads // kv, 1)
    vals = torch.cat([torch.from_numpy(pv), v], 2).repeat_interleave(heads // kv, 1)
    allowed = torch.arange(p + c)[None, :] <= (p + torch.arange(c))[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, vals, attn_mask=allowed)
    assert np.abs(out.transpose(1, 2).reshape(b, c, -1).numpy() - want).max() < 1e-12
    assert gqa_probe.main(["--batch", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("max abs error" in x and float(x.split()[-1]) < 1e-5 for x in lines), lines


def test_chunk_step_keeps_going_when_a_graph_fails():
    """chunk_step.py measures each graph through ``attempt``: a graph that raises is NaN with its error kept, the
    others' numbers stand (one failing experimental graph must not lose a GPU run's whole table)."""
    import chunk_step

    errors = {}

    def refuse(folder, batch):
        raise RuntimeError(f"provider refused {folder}\nsecond line")

    assert chunk_step.attempt(errors, "ours: base-w, batch 1", lambda folder, batch: 2.5, "x", 1) == 2.5
    got = chunk_step.attempt(errors, "ours: fwl-w, batch 8", refuse, "fwl-w", 8)
    assert got != got  # NaN
    assert errors == {"ours: fwl-w, batch 8": "RuntimeError: provider refused fwl-w"}


def test_chunk_step_ratio_divides_by_the_base_graph_in_the_same_mode():
    """The "× our base graph" column: a window graph against the window base, an experiment's graph without a base
    twin (``ttt-u``) against the plain base graph in the same session mode (session 19 divided it by the ordinary
    session's time), the torch rows against the ordinary base graph."""
    import chunk_step

    t = {"ours: base graph (ORT CUDA fp16)": 3.5, "ours: base graph (ORT CUDA fp16, CUDA graphs)": 2.0,
         "ours: base-w graph (ORT CUDA fp16, CUDA graphs)": 4.0}
    assert chunk_step.base_of("ours: fwl-w graph (ORT CUDA fp16, CUDA graphs)", t) == 4.0
    assert chunk_step.base_of("ours: ttt-u graph (ORT CUDA fp16, CUDA graphs)", t) == 2.0
    assert chunk_step.base_of("ours: ttt-u graph (ORT CUDA fp16)", t) == 3.5
    assert chunk_step.base_of("torch.compile (bf16)", t) == 3.5


def test_rope_probe_wide_heads_equal_narrow_ones_on_cpu(capsys):
    """rope_probe.py: an interleaved RotaryEmbedding over G heads as one op head (angle rows tiled G times) equals the
    half-split one head by head, reordered (onnxruntime's CPU kernel; both shapes it probes)."""
    import rope_probe

    assert rope_probe.main(["--batch", "1", "2", "--chunk", "16"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 4 and all(float(r[5]) == 0.0 for r in rows), rows
    assert rope_probe.group_size(40, 64) == 10


def test_qkv_probe_forms_compute_the_same_q_k_v_on_cpu(capsys):
    """qkv_probe.py: the three forms of a layer's q/k/v projection give the same outputs as the fused one, and the
    fused one's q is RoPE (interleaved pairs, per-token angles) of x @ Wq, checked against numpy in float32."""
    import numpy as np
    import onnxruntime as ort

    import qkv_probe

    assert qkv_probe.main(["--batch", "1", "2", "--chunk", "8", "--layers", "2"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 4 and all(float(e) < 1e-2 for r in rows for e in r[4].split(",")), rows
    rng = np.random.default_rng(1)
    d, h, kv, hd, c = 576, 9, 3, 64, 8
    w = (rng.standard_normal((d, (h + 2 * kv) * hd)) / np.sqrt(d)).astype(np.float16)
    fd = qkv_probe.feeds(1, c, d, h, kv, hd, rng)
    blob = qkv_probe.layer_graph("fused", [w], h, kv, hd)
    q, k, v = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, qkv_probe.used_feeds(blob, fd))
    raw = fd["x"].astype(np.float32) @ w.astype(np.float32)
    x = raw[..., :h * hd].reshape(1, c, h, hd)
    f = (np.arange(c)[:, None] + 100.0) * (1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd))[None, :]
    cos, sin = np.cos(f)[None, :, None, :], np.sin(f)[None, :, None, :]
    want = np.empty_like(x)
    want[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    want[..., 1::2] = x[..., 1::2] * cos + x[..., 0::2] * sin
    assert np.abs(q.reshape(x.shape) - want).max() < 1e-2
    assert np.abs(v - raw[..., (h + kv) * hd:]).max() < 1e-2 and k.shape == (1, c, kv * hd)


def test_mlp_probe_one_expert_moe_is_the_mlp_on_cpu(capsys):
    """mlp_probe.py: a one-expert MoE with interleaved SwiGLU computes the graphs' SwiGLU MLP (fp16 on the CPU
    provider, which refuses the concatenated form: reported, not raised)."""
    import mlp_probe

    assert mlp_probe.main(["--batch", "1", "--chunk", "4", "--layers", "1"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 2, rows
    for r in rows:
        parts = dict(p.strip().rsplit(" ", 1) for p in r[4].split(";") if "failed" not in p)
        assert float(parts["moe-interleaved"]) < 1e-2, r
        assert "moe-concat: failed" in r[4]


def test_token_nll_time_compares_the_two_forms(capsys):
    """token_nll_time.py: the float32-exponential token_nll against the all-float64 form, both dtypes."""
    import token_nll_time

    assert token_nll_time.main(["--rows", "4", "--vocab", "1000", "--repeats", "1"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[1].strip() for r in rows] == ["float16", "float32"] and all(float(r[4]) < 1e-6 for r in rows), rows


def test_static_cpu_memory_runs_both_ways(tmp_path):
    """static_cpu_memory.py streams three passes through a static CPU session, prepacking off (as the sessions open
    it) and forced back on, and with one shared arena (each in its own process: it replaces onnxruntime's
    SessionOptions there)."""
    from exporters.onnx.export import export_onnx
    from test_onnx_common import tiny_model

    out = export_onnx(tiny_model(), str(tmp_path / "onnx"), chunk_size=8)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(BENCH), os.environ.get("PYTHONPATH", "")]))
    for flag, head in (([], "prepacking off, an arena per session"), (["--prepack"], "prepacking on, an arena per session"),
                       (["--shared-arena"], "prepacking off, one shared arena")):
        r = subprocess.run([sys.executable, os.path.join(BENCH, "static_cpu_memory.py"), out, "--tokens", "24"] + flag,
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"{head}: peak RSS ") and r.stdout.count(",") == 4, r.stdout


def test_ort_run_us_times_a_bound_model_on_cpu():
    """common.ort_run_us (the probes' CUDA-graph timer) on the CPU provider: binds the inputs and the declared
    outputs, runs, and returns a time per ``per``."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto as TP, helper as oh

    from common import ort_run_us

    g = oh.make_graph([oh.make_node("Add", ["a", "b"], ["y"])], "add",
                      [oh.make_tensor_value_info(n, TP.FLOAT, [2, 3]) for n in "ab"],
                      [oh.make_tensor_value_info("y", TP.FLOAT, [2, 3])])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 10
    t = ort_run_us(ort, m.SerializeToString(), {"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32)},
                   {"y": ((2, 3), np.float32)}, per=2, replays=3, device="cpu")
    assert 0 < t < 1e6


def test_static_memory_reports_a_failing_child(tmp_path):
    """static_memory.py runs each (graph, arena strategy) in its own process and writes a row even when the child
    fails (here: no CUDA device / no graph)."""
    import static_memory

    md = tmp_path / "m.md"
    assert static_memory.main(["--graph", f"x={tmp_path}", "--tokens", "8", "--out-md", str(md)]) == 0
    text = md.read_text()
    assert text.count("| x |") == 2 and "kSameAsRequested" in text and "kNextPowerOfTwo" in text


def test_ddp_exit_probe_runs_and_counts():
    """benchmarks/ddp_exit_probe.py: two real gloo workers per run; the summary counts the runs (aborts, if any,
    are what it measures, so the count itself is not asserted)."""
    p = subprocess.run([sys.executable, os.path.join(BENCH, "ddp_exit_probe.py"), "--runs", "1", "--mode", "collect"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1].endswith("of 1 runs aborted at exit"), p.stdout
    bad = subprocess.run([sys.executable, os.path.join(BENCH, "ddp_exit_probe.py"), "--runs", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--runs must be at least 1" in bad.stderr
