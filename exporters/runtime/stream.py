"""Stream documents of any length through a ChunkSession: per-token losses, perplexity, greedy generation.

    doc [B, T] -> chunks of C (a shorter last one) -> logits per chunk -> log-softmax -> loss of token t+1

Each call starts from a fresh state (one document per row; ``reset`` is a new state). Graphs with
fixed chunks (in-place TTT) only ever see aligned chunks: generation re-runs the open partial chunk
from a snapshot of the state at the last chunk boundary. numpy + onnxruntime only.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Tuple

import numpy as np

from fwconvert.errors import InputError, NumericError

from .session import ChunkSession
from .state import StateBuffers


def chunk_logits(session: ChunkSession, ids: np.ndarray, state: StateBuffers) -> np.ndarray:
    """logits [B, n, V] of one chunk ``ids [B, n]``, n <= C, after ``state`` (advanced). A static session takes full
    chunks only: a shorter one is padded with its last token repeated and the padded positions' logits are dropped.
    The real positions' logits are exact (every graph is causal: nothing before a position reads what comes after
    it, and the fast weights a chunk reads are those of the chunks before it), but the state left behind is not the
    real tokens' state: only a document's last chunk may be short."""
    n = ids.shape[1]
    if session.static is not None and n < session.chunk_size:
        ids = np.concatenate((ids, np.repeat(ids[:, -1:], session.chunk_size - n, axis=1)), 1)
        return session.step(ids, state)[:, :n]
    return session.step(ids, state)


def iter_chunks(session: ChunkSession, ids: np.ndarray, state: StateBuffers = None) -> Iterator[Tuple[int, np.ndarray]]:
    """(start, logits [B, c, V]) for consecutive chunks of ``ids [B, T]`` from a fresh (or given) state (a static
    session's short last chunk padded: ``chunk_logits``)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise InputError(f"expected token ids of shape [batch, length >= 1], got {list(ids.shape)}")
    state = state if state is not None else session.new_state(ids.shape[0])
    c = session.chunk_size
    for a in range(0, ids.shape[1], c):
        yield a, chunk_logits(session, ids[:, a:a + c], state)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] as float64: logits [..., V], targets [...] (int) -> [...].

    max + log(sum(exp(x - max))) - x[target]: the logits taken to float32 once (exact for fp16), the exponentials in
    one float32 buffer written in place and summed in float64, the rest in float64. Each float32 exponential is
    within about 1e-7 of its float64 value, so the loss is too (3e-8 at most on a random 512 x 49,152 chunk);
    float64 exponentials (the form before session 17) took 211 ms per such fp16 chunk on one CPU core, this 94 ms
    (fp32 logits: 64 -> 43 ms; `python benchmarks/token_nll_time.py`), and `run` and verify's perplexity spend that
    per chunk on the host. numpy's own fp16 arithmetic is the slow part (its max over an fp16 chunk alone takes
    140 ms), hence the one conversion."""
    x = np.asarray(logits)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    m = x.max(-1, keepdims=True)
    z = np.subtract(x, m)
    np.exp(z, out=z)
    picked = np.take_along_axis(x, np.asarray(targets)[..., None], -1)[..., 0]
    return m[..., 0].astype(np.float64) + np.log(z.sum(-1, dtype=np.float64)) - picked.astype(np.float64)


def token_losses(session: ChunkSession, ids: np.ndarray) -> np.ndarray:
    """Cross-entropy (nats) of each token given the ones before it: [B, T-1]."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros((ids.shape[0], max(ids.shape[1] - 1, 0)), dtype=np.float64)
    for a, logits in iter_chunks(session, ids):
        n = min(logits.shape[1], ids.shape[1] - 1 - a)  # positions a..a+n-1 predict tokens a+1..a+n
        if n > 0:
            out[:, a:a + n] = token_nll(logits[:, :n], ids[:, a + 1:a + 1 + n])
    return out


def perplexity(losses: np.ndarray) -> float:
    return float(math.exp(losses.mean())) if losses.size else float("nan")


def _greedy(logits: np.ndarray) -> np.ndarray:
    """The argmax token [B, 1] of the last position of ``logits [B, c, V]``; NumericError when that row is not finite
    (numpy's argmax would silently pick the first NaN)."""
    last = logits[:, -1]
    if not np.isfinite(last).all():
        raise NumericError("the logits to pick the next greedy token from are not finite (NaN/Inf): the export "
                           "computes non-finite values")
    return last.argmax(-1).astype(np.int64)[:, None]


def _snapshot(session: ChunkSession, state: StateBuffers) -> StateBuffers:
    copy = session.new_state(state.batch)
    for name, value in state.cur.items():
        arr = value.numpy()
        copy.cur[name] = copy.put(arr)
        if name in copy.spare:
            copy.spare[name] = copy.put(np.zeros_like(arr))
    return copy


def greedy_generate(session: ChunkSession, ids: np.ndarray, n: int) -> np.ndarray:
    """Append ``n`` greedy tokens to each row of the prompt ``ids [B, T]``; returns [B, n]."""
    ids = np.asarray(ids, dtype=np.int64)
    if getattr(session, "static", None) is not None:
        raise InputError("generation runs chunks of any length: use a session without static_batch")
    if n <= 0:
        return np.zeros((ids.shape[0], 0), dtype=np.int64)
    if not session.fixed_chunks:
        state = session.new_state(ids.shape[0])
        logits = None
        for _, logits in iter_chunks(session, ids, state):
            pass
        out: List[np.ndarray] = []
        for _ in range(n):
            nxt = _greedy(logits)  # [B, 1]
            out.append(nxt)
            if len(out) < n:
                logits = session.step(nxt, state)
        return np.concatenate(out, 1)
    return _generate_aligned(session, ids, n)


def _generate_aligned(session: ChunkSession, ids: np.ndarray, n: int) -> np.ndarray:
    c = session.chunk_size
    boundary = session.new_state(ids.shape[0])
    seq = ids
    for _ in range(n):
        done = (seq.shape[1] // c) * c if seq.shape[1] % c else seq.shape[1] - c
        pos = int(boundary.position()[0])
        while pos < done:  # commit full chunks into the boundary state
            session.step(seq[:, pos:pos + c], boundary)
            pos += c
        logits = session.step(seq[:, pos:], _snapshot(session, boundary))  # the open chunk, re-run
        nxt = _greedy(logits)
        seq = np.concatenate((seq, nxt), 1)
    return seq[:, ids.shape[1]:]
