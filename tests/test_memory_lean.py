"""Reliability test 18 through the real CLI: ``python -m fwconvert add-fwl`` / ``mark-fast`` on an 8-shard
~250 MiB checkpoint, run as a subprocess whose peak RSS is measured (getrusage(RUSAGE_CHILDREN) in a
small launcher process), stays within a baseline process (the same imports) + the largest shard + a
fixed margin, and clearly below baseline + the whole model (the bound a merge-everything loader breaks:
shown by measuring one in the same way).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, F, LAYERS, VOCAB = 256, 10240, 8, 256  # per layer: 3 x 10 MiB MLP + 1 MiB attention (fp32) ~ 31 MiB
MARGIN = 160 * 2 ** 20  # interpreter growth, one tensor in flight, writer buffers, the new fast weights

# Runs argv as a child and prints that child's peak RSS in bytes (ru_maxrss is in KiB on Linux). The
# launcher itself is small and spawns (no fork of a big process), so the peak is the child's own.
LAUNCHER = """
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
sys.stderr.write(r.stderr)
print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""
BASELINE = "import fwconvert.cli.main, fwconvert.convert, torch, safetensors.torch; torch.zeros(1) + 1"
MERGE_ALL = ("import sys, os, torch, safetensors.torch as S; d = sys.argv[1]; "
             "files = [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith('.safetensors')]; "
             "sd = {k: v for f in files for k, v in S.load_file(f).items()}; "
             "sd = {k: v.clone() for k, v in sd.items()}; "
             "torch.zeros(1) + 1")


def peak_rss_of(*argv, timeout=400):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", LAUNCHER, *map(str, argv)], capture_output=True, text=True, env=env,
                       timeout=timeout)
    code, peak = r.stdout.split()[-2:]
    return int(code), int(peak), r.stderr


def _layer(i):
    p = f"model.layers.{i}."
    t = {p + n: torch.full(s, 0.01 * (i + 1)) for n, s in (
        ("input_layernorm.weight", (D,)), ("post_attention_layernorm.weight", (D,)),
        ("self_attn.q_proj.weight", (D, D)), ("self_attn.k_proj.weight", (D, D)),
        ("self_attn.v_proj.weight", (D, D)), ("self_attn.o_proj.weight", (D, D)),
        ("mlp.gate_proj.weight", (F, D)), ("mlp.up_proj.weight", (F, D)), ("mlp.down_proj.weight", (D, F)))}
    if i == 0:
        t.update({"model.embed_tokens.weight": torch.ones(VOCAB, D), "model.norm.weight": torch.ones(D)})
    return t


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    """8 shards (one layer each, ~31 MiB) + index + config; returns (folder, total bytes, largest shard)."""
    folder = tmp_path_factory.mktemp("lean") / "src"
    folder.mkdir()
    cfg = dict(model_type="llama", vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    wm = {}
    for i in range(LAYERS):
        name = f"model-{i + 1:05d}-of-{LAYERS:05d}.safetensors"
        t = _layer(i)
        save_file(t, str(folder / name), metadata={"format": "pt"})
        wm.update({n: name for n in t})
        del t
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    sizes = [os.path.getsize(folder / f) for f in os.listdir(folder) if f.endswith(".safetensors")]
    return str(folder), sum(sizes), max(sizes)


@pytest.fixture(scope="module")
def baseline():
    code, peak, err = peak_rss_of(sys.executable, "-c", BASELINE)
    assert code == 0, err
    return peak


def _mib(n):
    return f"{n / 2 ** 20:.0f} MiB"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("cmd", [["add-fwl"], ["mark-fast", "--layers", "all", "--chunk-size", "8"]],
                         ids=["add-fwl", "mark-fast"])
def test_cli_conversion_peak_rss_near_one_shard(tmp_path, big_ckpt, baseline, cmd):
    src, total, largest = big_ckpt
    out = tmp_path / "out"
    code, peak, err = peak_rss_of(sys.executable, "-m", "fwconvert", cmd[0], src, "-o", out, *cmd[1:])
    assert code == 0, err
    assert os.path.isfile(out / "config.json")
    print(f"{cmd[0]}: peak {_mib(peak)}, baseline {_mib(baseline)}, largest {_mib(largest)}, total {_mib(total)}")
    assert total > largest + MARGIN, "the fixture must be large enough for the bounds to differ"
    assert peak <= baseline + largest + MARGIN, (
        f"peak {_mib(peak)} > baseline {_mib(baseline)} + largest shard {_mib(largest)} + margin {_mib(MARGIN)}")
    assert peak < baseline + total, f"peak {_mib(peak)} is as large as holding the whole {_mib(total)} model"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_bound_catches_a_merge_everything_loader(big_ckpt, baseline):
    """Measured the same way, a loader that builds the whole state dict (the gpt-fast way) breaks the bound."""
    src, total, largest = big_ckpt
    code, peak, err = peak_rss_of(sys.executable, "-c", MERGE_ALL, src)
    assert code == 0, err
    assert peak > baseline + largest + MARGIN, (_mib(peak), _mib(baseline))
