"""The fp16 cast check of ``export-onnx --dtype fp16`` (reliability test 17, practice 6).

Conversion copies the original tensors byte-identical; the only narrowing cast in fwconvert is the
fp16 export (``graph._to_fp16``). Before anything is traced or written, every floating-point
parameter and buffer that the cast will narrow is scanned, tensor by tensor and in fixed-size
blocks (no copy of the model, at most one block of scratch memory):

* **overflow** (an error): finite values whose magnitude rounds to ±inf in fp16. With
  round-to-nearest-even that is ``|x| >= 65520`` (the midpoint between fp16's largest finite value
  65504 and 2**16); values in (65504, 65520) round to 65504 like any other rounding, so they are not
  counted. Any overflow raises ``NumericError`` (exit 6) naming the first few tensors, their counts
  and max ``|x|``.
* **underflow** (reported, not an error): finite non-zero values that become 0 in fp16
  (``|x| <= 2**-25``, half the smallest subnormal). Tiny weights flushing to zero is the normal,
  harmless precision loss of fp16, so it is only counted in the returned report.

Values that are already ±inf or NaN are not counted here (the non-finite check of the loader
reports them, reliability test 16).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Tuple

import torch

from fwconvert.errors import NumericError

FP16_MAX = 65504.0  # largest finite float16
FP16_OVERFLOW = 65520.0  # |x| >= this rounds to ±inf (round-to-nearest-even)
FP16_UNDERFLOW = 2.0 ** -25  # 0 < |x| <= this rounds to ±0
BLOCK = 1 << 22  # elements scanned at once (16 MiB of fp32 scratch)
NAMED = 3  # tensors named in the error message


@dataclass
class TensorStats:
    name: str
    numel: int
    overflow: int = 0  # finite values that become ±inf
    underflow: int = 0  # finite non-zero values that become 0
    max_abs: float = 0.0  # largest finite |x|


@dataclass
class CastReport:
    """What casting to fp16 would do, per tensor (only tensors with an overflow or underflow listed)."""

    checked: int = 0  # tensors scanned
    elements: int = 0  # elements scanned
    tensors: List[TensorStats] = field(default_factory=list)

    @property
    def overflow(self) -> List[TensorStats]:
        return [t for t in self.tensors if t.overflow]

    @property
    def underflow(self) -> int:
        return sum(t.underflow for t in self.tensors)


def fp16_cast_targets(model: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every floating-point parameter and buffer that ``model.half()`` narrows
    (float32, bfloat16, float64; float16 tensors need no cast). Shared (tied) tensors come once."""
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point() or t.dtype == torch.float16 or id(t) in seen:
            continue
        seen.add(id(t))
        yield name, t


def tensor_fp16_stats(name: str, t: torch.Tensor, block: int = BLOCK) -> TensorStats:
    """Overflow/underflow counts of casting ``t`` to fp16, scanned ``block`` elements at a time."""
    stats = TensorStats(name=name, numel=t.numel())
    if t.numel() == 0 or t.device.type == "meta":
        return stats
    flat = t.detach().reshape(-1)  # a view for contiguous tensors (parameters are)
    with torch.no_grad():
        for start in range(0, flat.numel(), block):
            a = flat[start:start + block].abs()
            big = a >= FP16_OVERFLOW
            n_big = int(big.sum())
            if n_big:
                n_inf = int(torch.isinf(a).sum())
                stats.overflow += n_big - n_inf
                if n_big > n_inf:
                    finite_big = a[big & torch.isfinite(a)]
                    stats.max_abs = max(stats.max_abs, float(finite_big.max()))
            tiny = (a <= FP16_UNDERFLOW) & (a > 0)
            stats.underflow += int(tiny.sum())
            del a, big, tiny
    if not stats.overflow:
        stats.max_abs = 0.0  # only reported for overflowing tensors
    return stats


def scan_fp16_cast(named: Iterable[Tuple[str, torch.Tensor]], block: int = BLOCK) -> CastReport:
    report = CastReport()
    for name, t in named:
        s = tensor_fp16_stats(name, t, block)
        report.checked += 1
        report.elements += s.numel
        if s.overflow or s.underflow:
            report.tensors.append(s)
    return report


def overflow_message(report: CastReport) -> str:
    bad = report.overflow
    parts = [f"{s.name} has {s.overflow} value{'s' if s.overflow != 1 else ''} beyond ±{FP16_MAX:g} "
             f"(max |x| {s.max_abs:.1e})" for s in bad[:NAMED]]
    more = f"; and {len(bad) - NAMED} more tensor{'s' if len(bad) - NAMED != 1 else ''}" if len(bad) > NAMED else ""
    total = sum(s.overflow for s in bad)
    return (f"cannot cast to fp16: {total} value{'s' if total != 1 else ''} would overflow to ±inf: "
            + "; ".join(parts) + more + "; export with --dtype fp32")


def check_fp16_cast(model: torch.nn.Module, block: int = BLOCK) -> CastReport:
    """Raise NumericError (exit 6) if casting ``model`` to fp16 would overflow any value; else the report."""
    report = scan_fp16_cast(fp16_cast_targets(model), block)
    if report.overflow:
        raise NumericError(overflow_message(report))
    return report


def check_cast(model: torch.nn.Module, dtype: str) -> CastReport:
    """The export's cast check: a no-op for fp32 (no narrowing), ``check_fp16_cast`` for fp16."""
    if dtype == "fp16":
        return check_fp16_cast(model)
    return CastReport()


__all__ = ["FP16_MAX", "FP16_OVERFLOW", "FP16_UNDERFLOW", "CastReport", "TensorStats", "check_cast",
           "check_fp16_cast", "fp16_cast_targets", "scan_fp16_cast", "tensor_fp16_stats"]
