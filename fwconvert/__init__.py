"""fwconvert: give pretrained LLaMA-family models fast weights that learn from the document at inference.

Public API (imports nothing heavy at package import):
    fwconvert.load(path, device="cpu", dtype=None) -> DecoderLM with m(ids), m.init_state(B), m.step(ids, state)
"""
from __future__ import annotations

import sys

__version__ = "0.1.0"


def load(path, device="cpu", dtype=None, window=None, config=None, sinks=0):
    """Load a checkpoint (HF folder, sharded or single safetensors, GGUF, or a converted fwconvert folder).

    ``dtype``: None keeps the checkpoint's float dtype (fp32 for quantized/other), or a torch dtype /
    "fp32" | "fp16" | "bf16". ``window``: attend only to the last ``window`` positions (sliding-window
    KV state); default is the model's own (mistral) or a growing cache. ``sinks`` (with a window): the document's
    first ``sinks`` tokens stay attendable beyond the window (attention sinks). ``config``: a config.json for a
    bare .safetensors file.
    """
    from .checkpoint import open_checkpoint

    return load_checkpoint(open_checkpoint(str(path), config_path=config), device=device, dtype=dtype, window=window,
                           sinks=sinks)


def load_checkpoint(ck, device="cpu", dtype=None, window=None, sinks=0):
    """``load`` for an already opened checkpoint (``fwconvert.checkpoint.open_checkpoint``)."""
    from .modeling import build_model, expected_shapes, load_tensors
    from .modeling.build import DTYPES

    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    model = build_model(ck.config, ck.fast_weights, window=window, sinks=sinks)
    ck.check_tensors(expected_shapes(model))
    load_tensors(model, ck.iter_tensors(), device=device, dtype=dtype)
    return model.eval()


def _register_with_transformers() -> None:
    try:
        from . import hf
    except ImportError:  # transformers not installed
        return
    hf.register()


class _TransformersHook:
    """Registers our model type with transformers' Auto classes when (and only when) transformers is imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        orig_exec = loader.exec_module

        def exec_module(module):
            orig_exec(module)
            _register_with_transformers()

        loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _TransformersHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _TransformersHook())
