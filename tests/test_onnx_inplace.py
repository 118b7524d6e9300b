"""In-place TTT models (tiny llama and qwen3, TTT on layers 0 and 1, chunk 8, non-trivial conv/proj):
fp32 export on the aligned path -> onnxruntime CPU -> verify over 16 chained chunks against the general
torch path; the fixed chunk rule (a shorter chunk only at the end) is recorded and enforced."""
import numpy as np
import pytest
import torch

from exporters.onnx.export import export_onnx
from exporters.runtime.session import ChunkSession
from exporters.runtime.stream import greedy_generate, token_losses
from exporters.verify import verify
from fwconvert.config import TOLERANCES
from fwconvert.errors import InputError
from test_onnx_common import tiny_model

TOL = TOLERANCES["ort_fp32_vs_torch_fp32"].rel


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def ttt_export(request, tmp_path_factory):
    model = tiny_model(request.param, "inplace", seed=2)
    out = export_onnx(model, str(tmp_path_factory.mktemp(f"ttt-{request.param}") / "onnx"))
    return model, out


def test_inplace_verify_16_chunks(ttt_export):
    model, out = ttt_export
    rep = verify(out, against=model, chunks=16, batch=2)
    assert rep.passed and rep.chunks == 16 and rep.chunk_size == 8
    deltas = [r for r in rep.rows if r.name == "fast_weights.layers.1.mlp.delta"]
    assert len(deltas) == 16


@torch.no_grad()
def test_inplace_chunk_rule_and_short_last_chunk(ttt_export):
    model, out = ttt_export
    s = ChunkSession(out, provider="cpu")
    assert s.fixed_chunks and s.chunk_size == 8 and "last chunk" in s.manifest.chunking["rule"]
    assert [sp.key for sp in s.manifest.state if "fast" in sp.key] == [
        "fast_weights.layers.0.mlp.delta", "fast_weights.layers.1.mlp.delta"]
    ids = torch.randint(0, 256, (1, 27), generator=torch.Generator().manual_seed(6))
    ref = model(ids)
    losses = token_losses(s, ids.numpy())  # chunks 8, 8, 8, 3
    lp = torch.log_softmax(ref[0, :-1].double(), -1)
    want = -lp.gather(-1, ids[0, 1:, None])[:, 0]
    assert np.allclose(losses[0], want.numpy(), rtol=1e-4, atol=1e-4)
    st = s.new_state(1)
    with pytest.raises(InputError, match="at most 8"):
        s.step(ids[:, :9].numpy(), st)
    s.step(ids[:, :8].numpy(), st)
    assert np.abs(st.to_numpy()["fast_weights.layers.0.mlp.delta"]).max() > 1e-4  # updated after a full chunk


@torch.no_grad()
def test_inplace_greedy_generation_matches_torch(ttt_export):
    model, out = ttt_export
    s = ChunkSession(out, provider="cpu")
    ids = torch.randint(0, 256, (1, 13), generator=torch.Generator().manual_seed(8))
    got = greedy_generate(s, ids.numpy(), 6)[0].tolist()
    seq = ids
    for _ in range(6):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat((seq, nxt), 1)
    assert got == seq[0, 13:].tolist()
