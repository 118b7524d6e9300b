import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny import FAMILIES, make_hf_model, save_checkpoint  # noqa: E402

SMOLLM_GGUF_CANDIDATES = (
    os.environ.get("FWCONVERT_SMOLLM_GGUF", ""),
    "/tmp/fw-assets/SmolLM2-135M-Instruct.Q4_1.gguf",
    "/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf",
)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_ckpt(tmp_path):
    """Factory: tiny_ckpt(family) -> (folder, transformers model)."""

    def make(family="llama", **kw):
        model = make_hf_model(family, **kw)
        folder = save_checkpoint(model, str(tmp_path / f"{family}-src"))
        return folder, model

    return make


@pytest.fixture(scope="session")
def smollm_gguf():
    for p in SMOLLM_GGUF_CANDIDATES:
        if p and os.path.isfile(p):
            return p
    pytest.skip("SmolLM2-135M GGUF not present (see README: getting the model offline)")
