"""Converted == base at init on the real SmolLM2-135M (GGUF; skipped when the file is absent, ~2-4 min on CPU)."""
import json

import pytest
import torch

import fwconvert
from fwconvert.config import TOLERANCES
from fwconvert.convert import add_fwl, mark_fast
from tiny import rel_err

TEXT_IDS = [1, 504, 3458, 282, 253, 1345, 28, 216, 9744, 30, 4144, 1009, 314, 690, 17, 1247, 30]


@pytest.mark.smollm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm_converted_equals_base(tmp_path, smollm_gguf):
    ids = torch.tensor([TEXT_IDS * 4])  # 68 tokens
    base = fwconvert.load(smollm_gguf)
    with torch.no_grad():
        ref = base(ids)
    del base
    for name, fn, kw in (("fwl", add_fwl, {}), ("ttt", mark_fast, {"chunk_size": 16})):
        out = fn(smollm_gguf, tmp_path / name, **kw)
        conv = fwconvert.load(out)
        with torch.no_grad():
            err = rel_err(conv(ids), ref)
        print(f"SmolLM2-135M {name}: rel err converted vs base = {err:.3e}")
        assert err <= TOLERANCES["convert_vs_base_fp32"].rel
        man = json.loads((tmp_path / name / "MANIFEST.json").read_text())
        assert man["source_kind"] == "gguf" and "tokenizer.json" in man["files"]
        del conv
