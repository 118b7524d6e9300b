"""Shared builders for the ONNX/runtime/verify tests (no tests here): tiny base, FWL and in-place models."""
from __future__ import annotations

import numpy as np
import torch

from fwconvert.config import FWLConfig, InPlaceTTTConfig
from fwconvert.families import parse_config
from fwconvert.modeling import attach_fast_weights, build_model, load_tensors
from tiny import make_hf_model


def tiny_model(family="llama", kind="base", window=None, seed=0):
    """Our DecoderLM from a random transformers model; ``kind`` base | fwl | inplace with non-trivial new params."""
    hf = make_hf_model(family, seed=seed)
    cfg = parse_config(hf.config.to_dict(), "config")
    model = load_tensors(build_model(cfg, window=window), hf.state_dict().items())
    g = torch.Generator().manual_seed(seed + 100)
    if kind == "fwl":
        from fwconvert.fastweights.fwl import init_conversion_

        attach_fast_weights(model, FWLConfig(size=cfg.hidden_size, chunk_size=8))
        init_conversion_(model.fwl_head, g)
        with torch.no_grad():
            for p in model.fwl_head.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            model.fwl_head.step_sizes.copy_(0.5 + torch.rand(6, generator=g))
    elif kind == "inplace":
        from fwconvert.fastweights.inplace_ttt import InPlaceTTTMLP

        fw = InPlaceTTTConfig(layers=(0, 1), chunk_size=8, lr=0.5)
        model.fast_weights = fw
        for i in fw.layers:
            layer = model.model.layers[i]
            layer.mlp = InPlaceTTTMLP.from_mlp(layer.mlp, cfg, fw, g)
            with torch.no_grad():
                layer.mlp.ttt_conv.weight.copy_(0.3 * torch.randn(layer.mlp.ttt_conv.weight.shape, generator=g))
                layer.mlp.ttt_proj.weight.copy_(0.2 * torch.randn(layer.mlp.ttt_proj.weight.shape, generator=g))
    return model.eval()


def step_in_pieces(session, ids, pieces):
    """Logits of ``ids`` [B, L] (torch) streamed through ``session`` in chunks of the given lengths from a fresh
    state, concatenated; returns (logits [B, L, V] numpy, the final state)."""
    st = session.new_state(ids.shape[0])
    outs, a = [], 0
    for n in pieces:
        outs.append(session.step(ids[:, a:a + n].numpy(), st))
        a += n
    return np.concatenate(outs, 1), st


def cli(args, capsys):
    """``fwconvert ARGS`` in-process: (exit code, stdout, stderr)."""
    import pytest

    from fwconvert.cli.main import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err
