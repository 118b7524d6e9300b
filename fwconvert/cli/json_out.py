"""The commands' --json output: strict JSON that every parser reads (Python's json writes NaN/Infinity otherwise)."""
from __future__ import annotations

import json
import math


def strict_json(obj, **kw) -> str:
    """``obj`` as JSON with non-finite floats (NaN, ±Inf) written as null."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return None if isinstance(x, float) and not math.isfinite(x) else x

    return json.dumps(clean(obj), allow_nan=False, **kw)
