"""The supported model families and the one entry point to parse a raw HF config into a ModelConfig."""
from __future__ import annotations

from ..config import ModelConfig
from ..errors import InputError
from . import llama, mistral, qwen2, qwen3
from .base import IGNORED_TENSOR_SUFFIXES, expected_tensors, num_parameters

FAMILIES = {f.name: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY)}
# Our own model type for converted checkpoints; the base family is in `base_model_type`.
FWCONVERT_MODEL_TYPE = "fwconvert"


def family_of(raw: dict, source: str):
    """The Family a raw config belongs to, by model_type (or base_model_type for converted models)."""
    if not isinstance(raw, dict):
        raise InputError(f"{source}: config must be a JSON object")
    mtype = raw.get("model_type")
    if mtype == FWCONVERT_MODEL_TYPE:
        mtype = raw.get("base_model_type")
    if mtype is None:
        archs = raw.get("architectures") or []
        for fam in FAMILIES.values():
            if isinstance(archs, list) and any(a in fam.architectures for a in archs):
                return fam
        raise InputError(f"{source}: field 'model_type' is missing (supported: {', '.join(FAMILIES)})")
    if not isinstance(mtype, str):
        raise InputError(f"{source}: model_type must be a string, got {mtype!r} (supported: {', '.join(FAMILIES)})")
    fam = FAMILIES.get(mtype)
    if fam is None:
        raise InputError(f"{source}: model_type {mtype!r} is not supported (supported: {', '.join(FAMILIES)})")
    return fam


def parse_config(raw: dict, source: str) -> ModelConfig:
    from .base import build_config

    return build_config(family_of(raw, source), raw, source)


__all__ = ["FAMILIES", "FWCONVERT_MODEL_TYPE", "parse_config", "family_of", "expected_tensors",
           "num_parameters", "IGNORED_TENSOR_SUFFIXES"]
