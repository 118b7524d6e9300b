"""fp16 export (weights and activations fp16, fast-weight state kept fp32) of a tiny llama FWL model on the
CPU provider: logits and state within the fp16 tolerance, perplexity within 1% of torch fp32."""
import math

import numpy as np
import torch

from exporters.onnx.export import export_onnx
from exporters.runtime.session import ChunkSession
from exporters.runtime.stream import perplexity, token_losses
from exporters.verify import verify
from fwconvert.config import TOLERANCES
from test_onnx_common import tiny_model


@torch.no_grad()
def test_fp16_fwl_export(tmp_path):
    model = tiny_model("llama", "fwl", seed=5)
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=8, dtype="fp16")
    s = ChunkSession(out, provider="cpu")
    dtypes = {sp.key: sp.dtype for sp in s.manifest.state}
    assert dtypes["past_key_values.0.key"] == "float16" and dtypes["fast_weights.fwl.sum_w1"] == "float32"
    assert s.manifest.dtype == "fp16"
    rep = verify(out, against=model, chunks=16)
    assert rep.passed and rep.tolerance == TOLERANCES["ort_fp16_vs_torch_fp32"].rel
    assert max(r.rel for r in rep.rows if r.name == "logits") > 1e-6  # really ran in fp16
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(3))
    lp = torch.log_softmax(model(ids)[0, :-1].double(), -1)
    ref_ppl = math.exp(float(-lp.gather(-1, ids[0, 1:, None]).mean()))
    ppl = perplexity(token_losses(s, ids.numpy()))
    assert abs(ppl - ref_ppl) <= TOLERANCES["ppl_fp16_vs_fp32"].rel * ref_ppl
    assert np.isfinite(ppl)
    # export's smoke check (one token, looser fp16 tolerance) still catches a graph that computes something else
    import copy

    import pytest

    from exporters.onnx.graph import smoke_check
    from fwconvert.errors import NumericError

    tol = TOLERANCES["export_smoke_fp16"]
    assert TOLERANCES["ort_fp16_vs_torch_fp32"].rel < tol.rel <= 5e-2
    smoke_check(model, s.path, s.manifest, out, tol)
    other = copy.deepcopy(model)
    other.model.layers[0].mlp.down_proj.weight.mul_(-1.0)
    with pytest.raises(NumericError, match="disagrees with torch"):
        smoke_check(other, s.path, s.manifest, out, tol)
