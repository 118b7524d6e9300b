"""FWL-head models (tiny llama and qwen3, non-trivial fast-weight parameters): fp32 export -> onnxruntime CPU
-> verify over 16 chained chunks (logits and every fast-weight sum); any chunk length, C = 1, P = 0."""
import numpy as np
import pytest
import torch

from exporters.onnx.export import export_onnx
from exporters.runtime.session import ChunkSession
from exporters.verify import verify
from fwconvert.config import TOLERANCES
from test_onnx_common import tiny_model
from tiny import rel_err

TOL = TOLERANCES["ort_fp32_vs_torch_fp32"].rel


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def fwl_export(request, tmp_path_factory):
    model = tiny_model(request.param, "fwl", seed=1)
    out = export_onnx(model, str(tmp_path_factory.mktemp(f"fwl-{request.param}") / "onnx"), chunk_size=6)
    return model, out


def test_fwl_verify_16_chunks(fwl_export):
    model, out = fwl_export
    rep = verify(out, against=model, chunks=16, batch=2)
    assert rep.passed and rep.chunks == 16
    names = {r.name for r in rep.rows}
    assert {"fast_weights.fwl.sum_fc1", "fast_weights.fwl.sum_gamma", "fast_weights.fwl.pending_x"} <= names
    s = ChunkSession(out, provider="cpu")
    assert not s.fixed_chunks and all(sp.init == {"kind": "zeros"} for sp in s.manifest.state)


@torch.no_grad()
def test_fwl_state_is_live_and_any_chunking_works(fwl_export):
    model, out = fwl_export
    s = ChunkSession(out, provider="cpu")
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(4))
    ref = model(ids)
    st, outs, a = s.new_state(2), [], 0
    for n in (1, 1, 5, 2, 10):
        outs.append(s.step(ids[:, a:a + n].numpy(), st))
        a += n
    assert rel_err(torch.from_numpy(np.concatenate(outs, 1)), ref) <= TOL
    assert np.abs(st.to_numpy()["fast_weights.fwl.sum_fc1"]).max() > 1e-3  # the fast weights did learn
    base = model.fwl_head
    model.fwl_head = None
    try:
        assert rel_err(model(ids), ref) > 10 * TOL  # and they change the logits
    finally:
        model.fwl_head = base


def test_verify_names_a_state_layout_of_another_version(fwl_export):
    """An export whose state tensors this fwconvert does not have (FWL's separate bias sums before 2026-12-05) is
    refused by verify with the reason and the fix, before any chunk runs."""
    import dataclasses

    from exporters.runtime.session import load_manifest
    from exporters.verify import _check_state_names
    from fwconvert.errors import InputError

    model, out = fwl_export
    m = load_manifest(out)
    _check_state_names(m, model)  # this version's own export passes
    m.state = [dataclasses.replace(s, key="fast_weights.fwl.sum_w1") if s.key.endswith("sum_fc1") else s
               for s in m.state]
    with pytest.raises(InputError, match=r"sum_w1 exist only in the export.*export it again with this version"):
        _check_state_names(m, model)
