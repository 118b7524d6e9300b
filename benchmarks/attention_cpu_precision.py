"""fp16 precision of onnxruntime's CPU attention kernels on one grouped-query case against a float64 reference:
ONNX's ``Attention`` (opset 23, causal over a past, what exporters/onnx/causal_attention.py emits) and
``com.microsoft.MultiHeadAttention`` (the repeat-KV keys and a causal bias). Prints each one's relative error and
that of rounding the exact output to fp16 alone (docs/results.md, session 13).

    python benchmarks/attention_cpu_precision.py [--seed 0]
"""
from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

B, T, P, HQ, HKV, HD, SCALE = 1, 16, 24, 4, 2, 16, 0.25


def _run(model, feeds) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0].astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    rng = np.random.default_rng(ap.parse_args().seed)
    q = (3 * rng.standard_normal((B, T, HQ * HD))).astype(np.float16)
    k = (3 * rng.standard_normal((B, T, HKV * HD))).astype(np.float16)
    v = rng.standard_normal((B, T, HKV * HD)).astype(np.float16)
    pk = (3 * rng.standard_normal((B, HKV, P, HD))).astype(np.float16)
    pv = rng.standard_normal((B, HKV, P, HD)).astype(np.float16)
    kk = np.concatenate([pk, k.reshape(B, T, HKV, HD).transpose(0, 2, 1, 3)], 2)  # [B, H_kv, P + T, hd]
    vv = np.concatenate([pv, v.reshape(B, T, HKV, HD).transpose(0, 2, 1, 3)], 2)
    kr, vr = np.repeat(kk, HQ // HKV, 1), np.repeat(vv, HQ // HKV, 1)  # query head h reads key head h // rep
    allowed = np.arange(P + T)[None] <= np.arange(T)[:, None] + P  # query i sees key j <= i + P
    s = q.reshape(B, T, HQ, HD).transpose(0, 2, 1, 3).astype(np.float64) @ kr.transpose(0, 1, 3, 2) * SCALE
    s = np.exp(np.where(allowed, s, -np.inf) - np.where(allowed, s, -np.inf).max(-1, keepdims=True))
    ref = ((s / s.sum(-1, keepdims=True)) @ vr.astype(np.float64)).transpose(0, 2, 1, 3).reshape(B, T, HQ * HD)

    f16 = TensorProto.FLOAT16
    att = helper.make_node("Attention", ["Q", "K", "V", "", "pk", "pv"], ["Y", "k_out", "v_out"], is_causal=1,
                           q_num_heads=HQ, kv_num_heads=HKV, scale=SCALE, softmax_precision=TensorProto.FLOAT)
    g = helper.make_graph([att], "g", [helper.make_tensor_value_info(n, f16, None) for n in ("Q", "K", "V", "pk", "pv")],
                          [helper.make_tensor_value_info(n, f16, None) for n in ("Y", "k_out", "v_out")])
    y_att = _run(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)], ir_version=10),
                 {"Q": q, "K": k, "V": v, "pk": pk, "pv": pv})
    bias = np.where(allowed, 0, -65504).astype(np.float16)[None, None]
    mha = helper.make_node("MultiHeadAttention", ["Q", "K", "V", "", "", "bias"], ["Y"], domain="com.microsoft",
                           num_heads=HQ, scale=SCALE)
    g = helper.make_graph([mha], "g", [helper.make_tensor_value_info(n, f16, None) for n in ("Q", "K", "V", "bias")],
                          [helper.make_tensor_value_info("Y", f16, None)])
    y_mha = _run(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                                   ir_version=10),
                 {"Q": q, "K": np.ascontiguousarray(kr.transpose(0, 2, 1, 3).reshape(B, P + T, HQ * HD)),
                  "V": np.ascontiguousarray(vr.transpose(0, 2, 1, 3).reshape(B, P + T, HQ * HD)), "bias": bias})

    def rel(y):
        return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))

    print(f"onnxruntime {ort.__version__}, CPU, fp16, B={B} T={T} P={P} heads {HQ}/{HKV} hd={HD}: relative error")
    print(f"  Attention (opset 23)       {rel(y_att):.2e}")
    print(f"  MultiHeadAttention         {rel(y_mha):.2e}")
    print(f"  fp16 rounding of the exact {rel(ref.astype(np.float16).astype(np.float64)):.2e}")


if __name__ == "__main__":
    main()
