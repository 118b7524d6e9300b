"""``fwconvert demo``: the whole pipeline on a small LLaMA checkpoint built locally (no download).

It pretrains a tiny byte-level LLaMA for a few seconds on Python standard-library sources, saves it as
an HF folder, then runs the real CLI commands on it in order: inspect, add-fwl, mark-fast, calibrate,
export-onnx, verify, eval. Each stage prints what it did; the whole run stays well under 3 minutes.
"""
from __future__ import annotations

import json
import os
import shlex
import sysconfig
import tempfile
import time
from typing import Iterator, List

DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "vocab_size": 256, "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
}
STDLIB_FILES = ("argparse.py", "difflib.py", "textwrap.py", "dataclasses.py", "inspect.py", "typing.py",
                "enum.py", "functools.py", "pathlib.py", "tarfile.py", "zipfile/__init__.py", "shutil.py")


def stdlib_documents() -> List[str]:
    """Paths of a few long standard-library modules (present on every Python install)."""
    root = sysconfig.get_paths()["stdlib"]
    return [p for p in (os.path.join(root, f) for f in STDLIB_FILES) if os.path.isfile(p)]


def byte_tokenizer_json() -> str:
    """A byte-level tokenizer.json (256 ids, one per byte) built with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _byte_of(c))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def _byte_of(ch: str) -> int:
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + k in order.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if ord(ch) in printable:
        return ord(ch)
    others = [b for b in range(256) if b not in printable]
    return others[ord(ch) - 256]


def build_base_checkpoint(folder: str, docs: List[str], seconds: float = 25.0, seed: int = 0) -> dict:
    """Pretrain a tiny LLaMA on ``docs`` for about ``seconds`` and save it as an HF folder."""
    import torch
    from safetensors.torch import save_file

    from .families import parse_config
    from .modeling import build_model

    torch.manual_seed(seed)
    cfg = parse_config(DEMO_CONFIG, "demo config")
    model = build_model(cfg, device="cpu")
    model.reset_buffers()
    for name, p in model.named_parameters():
        with torch.no_grad():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
    data = torch.tensor(list(b"".join(open(p, "rb").read() for p in docs)), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    start, steps, loss = time.time(), 0, float("nan")
    g = torch.Generator().manual_seed(seed)
    while time.time() - start < seconds:
        idx = torch.randint(0, len(data) - 129, (8,), generator=g)
        batch = torch.stack([data[i:i + 129] for i in idx])
        logits = model(batch[:, :-1])
        loss_t = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss_t.backward()
        opt.step()
        steps, loss = steps + 1, float(loss_t.detach())
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(DEMO_CONFIG, f, indent=2)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write(byte_tokenizer_json())
    return {"steps": steps, "loss": loss, "seconds": time.time() - start}


def _run_cli(args: List[str]) -> str:
    """Run one fwconvert command in-process, as a user would; raise on a non-zero exit."""
    from click.testing import CliRunner

    from .cli.main import cli

    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    if res.exit_code != 0:
        from .errors import FwconvertError

        raise FwconvertError(f"demo stage `fwconvert {shlex.join(args)}` failed (exit {res.exit_code}): {res.output.strip()[-400:]}")
    return res.output


def demo_stages(base: str, out: str, data: str) -> List[List[str]]:
    fwl, ttt, cal = (os.path.join(out, n) for n in ("fwl", "ttt", "fwl-calibrated"))
    onnx_fwl, onnx_ttt = os.path.join(out, "fwl-onnx"), os.path.join(out, "ttt-onnx")
    return [
        ["inspect", base],
        ["add-fwl", base, "-o", fwl, "--chunk-size", "64"],
        ["mark-fast", base, "-o", ttt, "--layers", "every:2", "--chunk-size", "64"],
        ["inspect", ttt],
        ["calibrate", fwl, "--data", data, "-o", cal, "--steps", "30", "--seq-len", "512", "--batch-size", "2",
         "--device", "cpu", "--seed", "0", "--no-progress"],
        ["export-onnx", cal, "-o", onnx_fwl, "--chunk-size", "64"],
        ["verify", onnx_fwl, "--chunks", "8", "--provider", "cpu"],
        ["export-onnx", ttt, "-o", onnx_ttt, "--chunk-size", "64"],
        ["verify", onnx_ttt, "--chunks", "8", "--provider", "cpu"],
        ["eval", cal, "--data", data, "--context", "1024", "--chunk-size", "64", "--base", base, "--max-docs", "3",
         "--plot", os.path.join(out, "loss-by-position.png")],
    ]


def run_demo(out: str | None = None) -> Iterator[str]:
    t0 = time.time()
    out = out or tempfile.mkdtemp(prefix="fwconvert-demo-")
    if os.path.exists(out) and os.listdir(out):
        from .errors import OutputError

        raise OutputError(f"{out}: demo output folder exists and is not empty; choose another with -o")
    os.makedirs(out, exist_ok=True)
    docs = stdlib_documents()
    data = os.path.join(out, "docs")
    os.makedirs(data)
    for i, p in enumerate(docs):
        with open(p, "rb") as src, open(os.path.join(data, f"{i:02d}-{os.path.basename(p)}"), "wb") as dst:
            dst.write(src.read())
    base = os.path.join(out, "base")
    yield f"[demo] pretraining a tiny byte-level LLaMA (4 layers, hidden 96) on {len(docs)} stdlib files -> {base}"
    info = build_base_checkpoint(base, docs)
    yield f"[demo]   {info['steps']} steps in {info['seconds']:.0f}s, train loss {info['loss']:.2f} nats/byte"
    for args in demo_stages(base, out, data):
        yield f"[demo] $ fwconvert {shlex.join(args)}"
        for line in _run_cli(args).strip().splitlines()[-12:]:
            yield "         " + line
    yield f"[demo] done in {time.time() - t0:.0f}s; everything is under {out}"
