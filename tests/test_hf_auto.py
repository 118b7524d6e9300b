"""transformers' Auto classes load converted folders after ``import fwconvert`` (and only then)."""
import os
import subprocess
import sys

import pytest
import torch

import fwconvert
from fwconvert.config import TOLERANCES, FWLConfig, InPlaceTTTConfig
from fwconvert.convert import add_fwl, save_model
from fwconvert.families import parse_config
from fwconvert.modeling import attach_fast_weights, build_model, load_tensors
from test_convert import tensors_of
from tiny import make_hf_model, rel_err, save_checkpoint

TOL = TOLERANCES["convert_vs_base_fp32"].rel


def _nontrivial(family, fw, out):
    """Save a model whose fast weights are random and large (so a weight that fails to load shows)."""
    hf = make_hf_model(family)
    m = load_tensors(build_model(parse_config(hf.config.to_dict(), "c")), hf.state_dict().items())
    attach_fast_weights(m, fw)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "fwl_head" in n or "ttt_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return save_model(m, out)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("fw", [FWLConfig(size=64, chunk_size=8), InPlaceTTTConfig(layers=(0, 1), chunk_size=8, lr=0.5)],
                         ids=["fwl", "ttt"])
def test_auto_model_equals_fwconvert_load(tmp_path, family, fw):
    import transformers

    out = _nontrivial(family, fw, tmp_path / "out")
    auto = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(auto).__name__ == "FwconvertForCausalLM"
    assert transformers.AutoConfig.from_pretrained(out).model_type == "fwconvert"
    assert set(auto.state_dict()) == set(tensors_of(out))  # keys equal the checkpoint's
    ours = fwconvert.load(out)
    ids = torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        res = auto(input_ids=ids, labels=ids)
        ref = ours(ids)
    assert res.logits.shape == ref.shape and rel_err(res.logits, ref) <= TOL
    want = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), ids[:, 1:].reshape(-1))
    assert abs(float(res.loss) - float(want)) <= 1e-5 * float(want)


def test_auto_loads_add_fwl_output(tmp_path):
    import transformers

    hf = make_hf_model("llama")
    src = save_checkpoint(hf, str(tmp_path / "src"))
    out = add_fwl(src, tmp_path / "out")
    auto = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(auto(ids).logits, hf(ids).logits) <= TOLERANCES["torch_fp32_vs_transformers"].rel


@pytest.mark.timeout(180)
def test_stock_transformers_refuses_the_model_type(tmp_path):
    out = add_fwl(save_checkpoint(make_hf_model("llama"), str(tmp_path / "src")), tmp_path / "out")
    code = ("import sys, transformers\n"
            f"try:\n    transformers.AutoConfig.from_pretrained({str(out)!r})\n"
            "except (ValueError, KeyError) as e:\n    print('REFUSED', e)\n"
            "assert 'fwconvert' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS="1"),
                       cwd=str(tmp_path), timeout=170)
    assert r.returncode == 0, r.stderr
    assert "REFUSED" in r.stdout and "fwconvert" in r.stdout
