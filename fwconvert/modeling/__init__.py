"""The compact decoder with explicit state, and building it from a checkpoint."""
from .build import attach_fast_weights, build_model, expected_shapes, load_tensors
from .decoder import DecoderLM

__all__ = ["DecoderLM", "build_model", "attach_fast_weights", "expected_shapes", "load_tensors"]
