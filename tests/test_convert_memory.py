"""Reliability test 18 (memory-lean streaming): converting a ~290 MiB, 6-shard checkpoint raises the
process's peak RSS by far less than the model (one tensor at a time), measured in a fresh subprocess."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, F, LAYERS, VOCAB = 256, 16384, 6, 256  # gate/up/down: 16 MiB each in fp32; 6 layers ~ 288 MiB

PROBE = """
import json, resource, sys
import fwconvert.convert as C, fwconvert.fastweights.inplace_ttt, fwconvert.checkpoint, safetensors.torch
import torch
torch.zeros(1) + 1
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = peak()
C.mark_fast(sys.argv[1], sys.argv[2], layers="all", chunk_size=8)
print(json.dumps({"base": base, "peak": peak()}))
"""


def _big_checkpoint(folder):
    os.makedirs(folder)
    cfg = dict(model_type="llama", vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True)
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    wm, k = {}, LAYERS
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t = {p + n: torch.full(s, 0.01 * (i + 1)) for n, s in (
            ("input_layernorm.weight", (D,)), ("post_attention_layernorm.weight", (D,)),
            ("self_attn.q_proj.weight", (D, D)), ("self_attn.k_proj.weight", (D, D)), ("self_attn.v_proj.weight", (D, D)),
            ("self_attn.o_proj.weight", (D, D)), ("mlp.gate_proj.weight", (F, D)), ("mlp.up_proj.weight", (F, D)),
            ("mlp.down_proj.weight", (D, F)))}
        if i == 0:
            t.update({"model.embed_tokens.weight": torch.ones(VOCAB, D), "model.norm.weight": torch.ones(D)})
        name = f"model-{i + 1:05d}-of-{k:05d}.safetensors"
        save_file(t, os.path.join(folder, name), metadata={"format": "pt"})
        wm.update({n: name for n in t})
        del t
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(folder, "model.safetensors.index.json"), "w"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_peak_memory_stays_near_one_tensor(tmp_path):
    src = str(tmp_path / "src")
    _big_checkpoint(src)
    total = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", PROBE, src, str(tmp_path / "out")], capture_output=True, text=True,
                       env=env, timeout=280)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["base"]
    largest = F * D * 4
    # Holding the model (or one output shard) would add >= total (~288 MiB); streaming needs a tensor or two.
    assert grew < total / 2, f"peak RSS grew by {grew / 2**20:.0f} MiB for a {total / 2**20:.0f} MiB model"
    assert grew < 6 * largest
    assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")]) == 1
