"""Reliability test 17: lossy dtype casts.

* bf16 -> fp32 -> bf16 is bit-identical (fwconvert loads bf16 checkpoints as fp32 for calibration and
  export; nothing may be lost on the way back);
* fp32 -> bf16 rounds with relative error <= 2**-8 (round to nearest, 8 significant bits);
* the fp16 cast check of ``export-onnx --dtype fp16`` (exporters/onnx/precision.py): values that would
  overflow to ±inf give exit 6 naming the tensor, the count and max |x| before anything is traced or
  written; values that merely round (65504 < |x| < 65520) or underflow to zero are not errors.
"""
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from badinputs import tiny_config, tiny_tensors, tree_snapshot, write_config
from exporters.onnx.precision import (FP16_MAX, FP16_OVERFLOW, FP16_UNDERFLOW, check_cast, check_fp16_cast,
                                      fp16_cast_targets, tensor_fp16_stats)
from fwconvert.errors import EXIT_NUMERIC, NumericError

BF16_EPS_REL = 2.0 ** -8  # bf16 keeps 8 significant bits: round-to-nearest error <= 2**-9 of |x|, checked at 2**-8


# -- bf16 <-> fp32 -------------------------------------------------------------------------------------------
def _random_bf16(n, seed):
    """Every kind of bf16 value: random bit patterns (normals, subnormals, ±0, ±inf), NaNs removed."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(1 << 15), 1 << 15, (n,), dtype=torch.int16, generator=g)
    x = bits.view(torch.bfloat16)
    return x[~torch.isnan(x)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_fp32_bf16_round_trip_is_bit_identical(seed):
    x = _random_bf16(1 << 18, seed)
    assert x.numel() > 250_000
    assert bool((x == 0).any()) and bool(torch.isinf(x).any()) and bool(((x.abs() < 1e-38) & (x != 0)).any())
    back = x.to(torch.float32).to(torch.bfloat16)
    assert torch.equal(back.view(torch.int16), x.view(torch.int16))
    # also through a module (the path of fwconvert.load(dtype=float32) and a later .to(bfloat16))
    lin = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(x[:64 * 64].view(64, 64))
    orig = lin.weight.detach().clone()
    lin.float()
    lin.to(torch.bfloat16)
    assert torch.equal(lin.weight.detach().view(torch.int16), orig.view(torch.int16))
    nan = torch.tensor([float("nan")], dtype=torch.bfloat16)
    assert torch.isnan(nan.float().to(torch.bfloat16)).all()


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 1e3, 1e30])
def test_fp32_to_bf16_relative_error_within_2_pow_minus_8(scale):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1 << 18, generator=g, dtype=torch.float32) * scale
    x = x[x != 0]
    rel = ((x.to(torch.bfloat16).to(torch.float32) - x).abs() / x.abs()).max().item()
    assert rel <= BF16_EPS_REL, rel
    assert rel > 2.0 ** -12  # it is lossy: the bound is meaningful, not vacuous


# -- the fp16 cast check -------------------------------------------------------------------------------------
def _model(**weights):
    """A small module whose parameters are given (name -> tensor)."""
    m = torch.nn.Module()
    for name, t in weights.items():
        m.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    return m


def test_overflow_names_tensor_count_and_max():
    torch.manual_seed(0)
    w = torch.randn(64, 64) * 0.1
    w[3, :3] = torch.tensor([1e5, -1e5, 7e4])
    m = _model(ok=torch.randn(8, 8), down_proj=w)
    with pytest.raises(NumericError) as e:
        check_fp16_cast(m)
    msg = str(e.value)
    assert e.value.exit_code == EXIT_NUMERIC == 6
    assert "down_proj has 3 values beyond ±65504 (max |x| 1.0e+05)" in msg, msg
    assert "overflow" in msg and "--dtype fp32" in msg and "ok " not in msg, msg
    assert len(msg.splitlines()) == 1


def test_bf16_tensor_with_1e5_overflows():
    """The spec's case: a bf16 tensor with values ±1e5."""
    torch.manual_seed(0)
    w = (torch.randn(32, 32) * 0.02).to(torch.bfloat16)
    w[0, 0], w[5, 7] = 1e5, -1e5
    with pytest.raises(NumericError, match=r"w has 2 values beyond ±65504 \(max \|x\| 1\.0e\+05\)"):
        check_fp16_cast(_model(w=w))


def test_in_range_model_passes_and_underflow_is_only_counted():
    torch.manual_seed(0)
    w = torch.randn(128, 128) * 0.05
    w[0, :6] = torch.tensor([FP16_MAX, -FP16_MAX, 65519.0, -65519.0, 1e-30, -2.0 ** -26])  # round / underflow
    m = _model(w=w, b=torch.full((4,), 1e-9), h=torch.ones(4, dtype=torch.float16) * 65504)
    report = check_fp16_cast(m)
    assert report.overflow == [] and report.checked == 2  # the fp16 tensor needs no cast
    assert report.underflow == int(((w.half() == 0) & (w != 0)).sum()) + 4 == 2 + 4
    assert not torch.isinf(w.half()).any()  # the check agrees with the cast itself
    assert check_cast(m, "fp32").checked == 0  # fp32 export: no narrowing, nothing scanned


def test_counts_agree_with_the_cast_across_blocks():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10_000, generator=g) * 40_000  # ~10% beyond the limit
    x[:4] = torch.tensor([float("inf"), -float("inf"), 65519.99, FP16_OVERFLOW])
    x[4:8] = torch.tensor([FP16_UNDERFLOW, -FP16_UNDERFLOW * 1.01, 1e-40, 0.0])
    ref_over = int((torch.isinf(x.half()) & torch.isfinite(x)).sum())
    ref_under = int(((x.half() == 0) & (x != 0)).sum())
    for block in (7, 1000, 1 << 22):
        s = tensor_fp16_stats("x", x, block=block)
        assert (s.overflow, s.underflow) == (ref_over, ref_under), block
        assert s.max_abs == float(x[torch.isfinite(x)].abs().max())
    assert ref_over > 500 and ref_under == 2


def test_many_offending_tensors_first_three_named():
    ws = {f"t{i}": torch.full((2,), 1e6 * (i + 1)) for i in range(5)}
    with pytest.raises(NumericError) as e:
        check_fp16_cast(_model(**ws))
    msg = str(e.value)
    assert "10 values would overflow" in msg and "t0 has 2 values" in msg and "t2 has 2 values" in msg, msg
    assert "t3 " not in msg and "and 2 more tensors" in msg, msg


def test_tied_and_buffers_are_checked_once():
    m = _model(w=torch.zeros(3))
    m.register_buffer("big", torch.tensor([2e5]))
    m.alias = m.w  # the same parameter twice (tied embeddings)
    assert [n for n, _ in fp16_cast_targets(m)] == ["w", "big"]
    with pytest.raises(NumericError, match="big has 1 value beyond"):
        check_fp16_cast(m)


def test_check_does_not_copy_the_model(monkeypatch):
    """Tensor by tensor: no deepcopy / .half() / state_dict copy of the whole model."""
    import copy

    def refuse(*a, **k):
        raise AssertionError("the cast check copied the model")

    monkeypatch.setattr(copy, "deepcopy", refuse)
    monkeypatch.setattr(torch.nn.Module, "half", refuse)
    monkeypatch.setattr(torch.nn.Module, "state_dict", refuse)
    check_fp16_cast(_model(a=torch.randn(1000, 100), b=torch.randn(10)))


def _bf16_checkpoint(folder, edit):
    from safetensors.torch import save_file

    cfg = tiny_config()
    write_config(folder, {**cfg, "torch_dtype": "bfloat16"})
    t = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tiny_tensors(cfg).items()}
    edit(t)
    save_file(t, os.path.join(folder, "model.safetensors"))
    return str(folder)


def test_export_onnx_fp16_refuses_before_tracing(tmp_path, monkeypatch):
    """Through the CLI, from a bf16 checkpoint: exit 6 with the tensor and count, nothing written, no tracing."""
    import exporters.onnx.export as E
    from fwconvert.cli.main import main

    def traced(*a, **k):
        raise AssertionError("traced before the cast check")

    monkeypatch.setattr(E, "export_program", traced)

    def edit(t):
        t["model.layers.1.mlp.down_proj.weight"][2, :3] = torch.tensor([1e5, -1e5, 1e5])

    src = _bf16_checkpoint(tmp_path / "in", edit)
    before = tree_snapshot(tmp_path)
    runner = CliRunner()
    with runner.isolation() as (out, err, _):
        with pytest.raises(SystemExit) as e:
            main(["export-onnx", src, "-o", str(tmp_path / "out"), "--dtype", "fp16"])
        stderr = err.getvalue().decode()
    assert e.value.code == EXIT_NUMERIC, stderr
    assert stderr.startswith("Error: cannot cast to fp16") and "Traceback" not in stderr
    assert "model.layers.1.mlp.down_proj.weight has 3 values beyond ±65504 (max |x| 1.0e+05)" in stderr, stderr
    assert tree_snapshot(tmp_path) == before  # no --out, no staging folder


def test_export_onnx_from_a_model_object(tmp_path, monkeypatch):
    """export_onnx(DecoderLM, dtype='fp16') raises NumericError before tracing; the caller's model is untouched."""
    import exporters.onnx.export as E
    from test_onnx_common import tiny_model

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = -7e4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(E, "export_program", lambda *a, **k: (_ for _ in ()).throw(AssertionError("traced")))
    with pytest.raises(NumericError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight has 1 value beyond"):
        E.export_onnx(model, str(tmp_path / "out"), dtype="fp16", chunk_size=4)
    assert os.listdir(tmp_path) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert np.isclose(float(model.model.layers[0].self_attn.o_proj.weight.detach()[0, 0]), -7e4)
