"""Streaming safetensors output: ``ShardedSafetensorsWriter`` (shards + index, tensors in any arrival order).

Moved out of ``writer.py`` (which re-exports every name here, so ``from fwconvert.checkpoint.writer import
ShardedSafetensorsWriter`` keeps working). With ``resume=`` (``resume.ResumableOutput``) shards already
complete in a resumed staging folder are not written again, and each newly completed shard is journaled.
"""
from __future__ import annotations

import json
import os

from ..errors import OutputError
from .writer import AtomicOutput, faults

ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
DEFAULT_SHARD_BYTES = 2 * 10**9  # read at call time: tests lower it to get several shards from a tiny model


def st_dtype(t) -> str:
    """The safetensors dtype string of a torch tensor."""
    import torch

    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    if t.dtype not in names:
        raise OutputError(f"cannot write dtype {t.dtype} to safetensors")
    return names[t.dtype]


def tensor_bytes(t) -> memoryview:
    """The raw little-endian bytes of a tensor (bit patterns kept: NaN payloads, -0.0, bf16)."""
    import torch

    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def write_safetensors(ao: AtomicOutput, name: str, tensors: dict, metadata=None) -> None:
    """Write a small dict of tensors as one safetensors file (via safetensors' own serialiser)."""
    from safetensors.torch import save

    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata or {"format": "pt"})
    ao.write_bytes(name, data)


def _header_json(entries: dict) -> bytes:
    meta = {"__metadata__": {"format": "pt"}}
    meta.update(entries)
    return json.dumps(meta, separators=(",", ":")).encode("utf-8")


class _Shard:
    def __init__(self, fname: str, names: list, plan: dict):
        self.fname, self.names, self.pending, self.entries = fname, list(names), set(names), {}
        bound = {n: {"dtype": "BF16", "shape": list(plan[n][0]), "data_offsets": [10**19, 10**19]} for n in names}
        self.reserved = -(-len(_header_json(bound)) // 8) * 8
        self.offset, self.file = 0, None


class ShardedSafetensorsWriter:
    """Write planned tensors into ``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` + index.

    ``plan``: {name: (shape, nbytes)} in the order tensors are packed into shards. Tensors may ``add`` in any
    order (one input shard at a time): each goes to its planned shard at that shard's running offset, into a
    header space reserved up front; a shard's header is filled in as soon as its last tensor arrived.

    ``max_shard_bytes``: None reads ``DEFAULT_SHARD_BYTES`` now. ``resume``: an object with ``done``
    ({shard file name: {"data_bytes": n, ...}} of shards already complete and verified in the staging
    folder: skipped, their tensors must not be added; see ``wanted``) and ``shard_finished(fname,
    data_bytes)``, called once each new shard is complete and fsynced (``resume.ResumableOutput``)."""

    def __init__(self, ao: AtomicOutput, plan: dict, max_shard_bytes=None, prefix: str = "model", resume=None):
        self.ao, self.plan, self.done, self.prefix, self.resume = ao, plan, 0, prefix, resume
        max_shard_bytes = DEFAULT_SHARD_BYTES if max_shard_bytes is None else int(max_shard_bytes)
        groups, cur, size = [], [], 0
        for n, (_, nbytes) in plan.items():
            if cur and size + nbytes > max_shard_bytes:
                groups.append(cur)
                cur, size = [], 0
            cur.append(n)
            size += nbytes
        groups.append(cur)
        k = len(groups)
        fnames = [f"{prefix}.safetensors"] if k == 1 else [f"{prefix}-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        self.shards = [_Shard(f, g, plan) for f, g in zip(fnames, groups)]
        self.where = {n: s for s in self.shards for n in s.pending}
        self.total = 0
        done = getattr(resume, "done", None) or {}
        unknown = sorted(set(done) - {s.fname for s in self.shards})
        if unknown:
            raise OutputError(f"the resume journal lists shard(s) this run does not plan: {', '.join(unknown[:5])}")
        for s in self.shards:
            if s.fname in done and s.names:  # complete from an earlier run: nothing of it is written again
                s.pending.clear()
                self.total += int(done[s.fname]["data_bytes"])
                self.done += 1

    def wanted(self, name: str) -> bool:
        """Whether ``name`` still has to be added (False for tensors of shards kept by a resume)."""
        shard = self.where.get(name)
        return shard is not None and name in shard.pending

    def add(self, name: str, t) -> None:
        shard = self.where.get(name)
        if shard is None or name not in shard.pending:
            raise OutputError(f"tensor {name!r} was not planned for the output or arrived twice")
        if tuple(t.shape) != tuple(self.plan[name][0]):
            raise OutputError(f"tensor {name!r}: shape {list(t.shape)} differs from the planned {list(self.plan[name][0])}")
        if shard.file is None:
            shard.file = self.ao.open(shard.fname)
        data = tensor_bytes(t)
        shard.file.pwrite_unhashed(data, 8 + shard.reserved + shard.offset)
        shard.entries[name] = {"dtype": st_dtype(t), "shape": list(t.shape),
                               "data_offsets": [shard.offset, shard.offset + len(data)]}
        shard.offset += len(data)
        self.total += len(data)
        shard.pending.discard(name)
        if not shard.pending:
            self._finish(shard)

    def _finish(self, shard: _Shard) -> None:
        if shard.file is None:  # an empty shard (only possible for an empty plan)
            shard.file = self.ao.open(shard.fname)
        ordered = dict(sorted(shard.entries.items(), key=lambda kv: kv[1]["data_offsets"][0]))
        header = _header_json(ordered)
        header += b" " * (shard.reserved - len(header))
        shard.file.pwrite_unhashed(len(header).to_bytes(8, "little") + header, 0)
        shard.file.size = 8 + shard.reserved + shard.offset
        shard.file.close(rehash=True)
        self.done += 1
        if self.resume is not None:
            self.resume.shard_finished(shard.fname, shard.offset)
        if faults().get("after_shard") == str(self.done):  # the k-th complete shard, kept ones included
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> list:
        """Check every planned tensor arrived, write the index when sharded; returns the shard file names."""
        missing = [n for s in self.shards for n in sorted(s.pending)]
        if missing:
            raise OutputError(f"internal: {len(missing)} planned tensors never arrived: {', '.join(missing[:10])}")
        if not self.plan:
            self._finish(self.shards[0])
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {n: s.fname for s in self.shards for n in sorted(s.names)}}
            self.ao.write_json(f"{self.prefix}.safetensors.index.json", index)
        return [s.fname for s in self.shards]
