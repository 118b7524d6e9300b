"""CUDA execution provider (skipped without a GPU): state stays on the device (IO binding, ping-pong),
fp32 with TF32 off within 1e-4 of torch fp32, fp16 within 1e-2; base, FWL and in-place tiny models."""
import pytest
import torch

from exporters.onnx.export import export_onnx
from exporters.runtime.session import ChunkSession
from exporters.verify import verify
from test_onnx_common import tiny_model


def _cuda_ep() -> bool:
    import onnxruntime as ort

    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


pytestmark = pytest.mark.skipif(not _cuda_ep(), reason="needs a CUDA GPU and onnxruntime-gpu's CUDA provider")


@pytest.mark.parametrize("kind", ["base", "fwl", "inplace"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cuda_verify(tmp_path, kind, dtype):
    model = tiny_model("qwen3", kind, seed=4)
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=8, dtype=dtype)
    s = ChunkSession(out, provider="cuda")
    assert s.device == "cuda" and ("TF32 off" if dtype == "fp32" else "TF32 on") in s.provider_note
    st = s.new_state(2)
    assert all(v.device_name().lower() == "cuda" for v in st.cur.values())
    rep = verify(out, against=model, chunks=16, provider="cuda", batch=2)
    assert rep.passed, rep.worst()
    print(kind, dtype, rep.worst())


@pytest.mark.parametrize("kind", ["base", "fwl", "inplace"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cuda_graph_static_sessions_verify(tmp_path, kind, dtype):
    """Window exports through static sessions with CUDA graphs; W + C = 31 is not a multiple of 4 (an fp32
    window export of SmolLM2 with a span of 2,559 failed in ORT's memory-efficient attention before fp32 sessions
    were limited to the flash + unfused kernels)."""
    model = tiny_model("qwen3", kind, seed=5, window=23)
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=8, dtype=dtype, attention="window", window=23)
    s = ChunkSession(out, provider="cuda", static_batch=2)
    assert s.cuda_graph and "CUDA graphs" in s.provider_note
    rep = verify(out, against=model, chunks=12, provider="cuda", batch=2, static=True)
    assert rep.passed, rep.worst()


@pytest.mark.parametrize("kind", ["base", "fwl", "inplace"])
def test_cuda_graph_full_attention_static_sessions(tmp_path, kind):
    """A full-attention export through a static session: one pinned session and one captured graph per past length;
    three documents (the first runs capture, the last replay) equal the ordinary session's steps, and verify passes."""
    import numpy as np

    model = tiny_model("qwen3", kind, seed=6)
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=8, dtype="fp32")
    dyn = ChunkSession(out, provider="cuda")
    s = ChunkSession(out, provider="cuda", static_batch=2, static_context=48)
    assert s.cuda_graph and "CUDA graphs" in s.provider_note
    ids = np.random.default_rng(2).integers(0, s.manifest.vocab_size, (2, 48))
    for _ in range(3):
        sd, ss = dyn.new_state(2), s.new_state(2)
        for a in range(0, 48, 8):
            np.testing.assert_allclose(s.step(ids[:, a:a + 8], ss), dyn.step(ids[:, a:a + 8], sd), rtol=1e-5, atol=1e-5)
    rep = verify(out, against=model, chunks=6, provider="cuda", batch=2, static=True)
    assert rep.passed, rep.worst()
