"""Reading checkpoints: HF folders, (sharded) safetensors and GGUF, validated header-only.

``open_checkpoint(path)`` returns a ``Checkpoint`` (config, fast weights, tensor specs, file list);
tensors are then streamed with ``iter_tensors``. ``writer.py`` (atomic output folders) lives here too.
"""
from .reader import Checkpoint, open_checkpoint

__all__ = ["Checkpoint", "open_checkpoint"]
