"""Does multiplying in fp16 cost the fp16 in-place graph precision? (CPU is enough; real model and text.)

Since session 19 an fp16 model's aligned in-place step (the fp16 export's form, ``inplace_ttt._aligned_step``)
makes all three products in fp16: the apply, the targets and the update (rounded to fp16 before it is added to the
fp32 delta). Sessions 10-18 kept the update an fp32 product; before session 10 every product was fp32, which
onnxruntime's CUDA provider runs as TF32 in fp16 graphs. This streams one document through

    reference   the fp32 model, general streaming path (exact fp32)
    tf32        the fp16 model, aligned steps, every product fp32 on inputs rounded to TF32 (before session 10)
    fp16-s10    the fp16 model, aligned steps, fp16 apply and targets, the update fp32 on TF32-rounded inputs
                (sessions 10-18, as on the GPU)
    fp16        the fp16 model's own aligned steps (exported now)

and prints per form the logits' relative error against the reference (first, last and worst chunk) and each TTT
layer's delta at the end. The TTT layers get a random conv (``--conv-std``) so the fast weights move.

    python benchmarks/ttt_product_precision.py MODEL.gguf [DOC] [--chunks 4] [--chunk 512] [--conv-std 0.05]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sysconfig

import torch
import torch.nn.functional as F

import fwconvert
from fwconvert.config import InPlaceTTTConfig
from fwconvert.fastweights.inplace_ttt import InPlaceTTTMLP
from fwconvert.tokenizer import load_tokenizer


def tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 rounded to TF32 (10 mantissa bits, to nearest), as a TF32 GEMM rounds its inputs."""
    i = t.float().contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def _finish(self, z, v, delta, ctx, chunk_len):
    full = ((ctx.position + chunk_len) % self.chunk_size == 0).to(delta.dtype)
    return delta + (self.lr * full)[:, None, None] * (tf32(v).transpose(1, 2) @ tf32(z))


def tf32_step(self, x, state, ctx):
    """The aligned step with every product fp32 on TF32-rounded inputs (the fp16 graphs' form before session 10)."""
    delta, z = state["delta"], self.hidden(x)
    out = self.down_proj(z) + (tf32(z) @ tf32(delta).transpose(1, 2)).to(z.dtype)
    t, w = self._target_input(x, ctx), self.ttt_conv.weight.float()
    v = F.conv1d(tf32(t).transpose(1, 2), tf32(w), padding=w.shape[-1] // 2, groups=w.shape[0]).transpose(1, 2)
    v = tf32(v) @ tf32(self.ttt_proj.weight.float())
    return out, {"delta": _finish(self, z, v, delta, ctx, x.shape[1])}


def fp16_s10_step(self, x, state, ctx):
    """The aligned step of sessions 10-18 (fp16 apply and targets), its update on TF32-rounded inputs as on the GPU."""
    delta, z = state["delta"], self.hidden(x)
    out = self.down_proj(z) + z @ delta.to(z.dtype).transpose(1, 2)
    v = self.targets(self._target_input(x, ctx), torch.float16).float()
    return out, {"delta": _finish(self, z, v, delta, ctx, x.shape[1])}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def stream(model, ids, chunk, step=None):
    """Logits [B, T, V] (fp32) and the final state: the model's general path, or with ``step`` its fp16 copy's
    aligned steps with ``step`` as the in-place layers' aligned step."""
    from exporters.onnx.wrapper import initial_state

    if step is None:
        m, state, aligned = model, model.init_state(ids.shape[0]), False
    else:
        m, aligned = copy.deepcopy(model).half(), True
        state = initial_state(m, ids.shape[0], fixed_window=False, aligned=True)
    keep = InPlaceTTTMLP._aligned_step
    InPlaceTTTMLP._aligned_step = step or keep
    try:
        out = []
        for a in range(0, ids.shape[1], chunk):
            logits, state = m.step(ids[:, a:a + chunk], state, aligned=aligned)
            out.append(logits.float())
    finally:
        InPlaceTTTMLP._aligned_step = keep
    return torch.cat(out, 1), state


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("doc", nargs="?", default=os.path.join(sysconfig.get_paths()["stdlib"], "typing.py"))
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--conv-std", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=3.0, help="the TTT step size eta (default: the config default)")
    a = ap.parse_args()
    model = fwconvert.load(a.model).float().eval()
    n = model.config.num_hidden_layers
    fw = InPlaceTTTConfig(layers=tuple(range(0, n, 6)), chunk_size=a.chunk, lr=a.lr)
    model.fast_weights = fw
    g = torch.Generator().manual_seed(0)
    for i in fw.layers:
        layer = model.model.layers[i]
        layer.mlp = InPlaceTTTMLP.from_mlp(layer.mlp, model.config, fw, g)
        with torch.no_grad():
            layer.mlp.ttt_conv.weight.copy_(a.conv_std * torch.randn(layer.mlp.ttt_conv.weight.shape, generator=g))
    tok = load_tokenizer(a.model)
    ids = torch.tensor([tok.encode(open(a.doc, encoding="utf-8").read())[:a.chunks * a.chunk]])
    if ids.shape[1] < a.chunks * a.chunk:
        raise SystemExit(f"{a.doc}: fewer than {a.chunks * a.chunk} tokens")
    ref, ref_state = stream(model, ids, a.chunk)
    for name, step in (("tf32", tf32_step), ("fp16-s10", fp16_s10_step), ("fp16", InPlaceTTTMLP._aligned_step)):
        logits, state = stream(model, ids, a.chunk, step)
        per = [rel(logits[:, s:s + a.chunk], ref[:, s:s + a.chunk]) for s in range(0, ids.shape[1], a.chunk)]
        deltas = {k: rel(v, ref_state[k]) for k, v in state.items() if k.endswith("delta")}
        print(json.dumps({"form": name, "logits_rel_first": per[0], "logits_rel_last": per[-1],
                          "logits_rel_max": max(per), "delta_rel": deltas, "chunks": a.chunks, "chunk": a.chunk,
                          "conv_std": a.conv_std, "lr": a.lr}), flush=True)


if __name__ == "__main__":
    main()
