"""Perplexity by position over long documents, streamed chunk by chunk with the state carried (as
deployment runs), the dynamic-evaluation baseline (a gradient step after each chunk), and the plot.

Position t is the index of the token a prediction is made FROM (it predicts token t+1); a document
truncated to the context L yields predictions at t = 0 .. L-2. Buckets are [a, b) over t.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError, UsageError

DYNAMIC_EVAL_LR = {"all": 1e-4, "down_proj": 3e-4}  # anchors.md: the reference setup


def bucket_edges(context: int) -> List[int]:
    """[0, 512, 1024, 2048, ...] doubling up to ``context`` (which closes the last bucket); contexts
    under 2048 start at the largest power of two <= context/4 instead of 512."""
    if context < 2:
        raise UsageError(f"--context must be at least 2, got {context}")
    first = 512 if context >= 2048 else max(1, 2 ** int(math.floor(math.log2(context / 4))) if context >= 4 else 1)
    edges, e = [0], first
    while e < context:
        edges.append(e)
        e *= 2
    return edges + [context]


def _short(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def bucket_labels(edges: Sequence[int]) -> List[str]:
    return [f"{_short(a)}-{_short(b)}" for a, b in zip(edges[:-1], edges[1:])]


@dataclass
class PositionStats:
    """Summed NLL and counts per position t (0 .. context-2), plus the time spent."""

    context: int
    nll: np.ndarray = None  # [context-1] float64
    count: np.ndarray = None  # [context-1] int64
    tokens: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.nll is None:
            self.nll = np.zeros(self.context - 1)
            self.count = np.zeros(self.context - 1, dtype=np.int64)

    def add(self, nll: torch.Tensor) -> None:
        """nll [B, n] for positions 0 .. n-1."""
        v = nll.detach().double().cpu().numpy()
        self.nll[: v.shape[1]] += v.sum(0)
        self.count[: v.shape[1]] += v.shape[0]

    def summary(self) -> dict:
        edges = bucket_edges(self.context)
        total = float(self.nll.sum() / max(1, self.count.sum()))
        by_pos = {}
        for label, a, b in zip(bucket_labels(edges), edges[:-1], edges[1:]):
            n = int(self.count[a:b].sum())
            if n:
                by_pos[label] = math.exp(float(self.nll[a:b].sum()) / n)
        out = {"perplexity": math.exp(total), "loss": total, "by_position": by_pos,
               "mean_of_buckets": float(np.mean(list(by_pos.values()))) if by_pos else float("nan"),
               "tokens_per_second": self.tokens / self.seconds if self.seconds > 0 else float("nan"),
               "tokens": self.tokens, "predictions": int(self.count.sum())}
        out.update(self.extra)
        return out

    def curve(self) -> np.ndarray:
        """Mean NLL at each position (NaN where no document reached it)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.nll / self.count


def chunk_nll(logits: torch.Tensor, ids: torch.Tensor, a: int) -> torch.Tensor:
    """NLL [B, n] of the chunk starting at ``a`` whose logits are [B, c, V]; targets ids[:, a+1 : a+c+1]."""
    tgt = ids[:, a + 1: a + 1 + logits.shape[1]]
    lp = F.log_softmax(logits[:, : tgt.shape[1]].float(), dim=-1)
    return -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def stream_nll(step: Callable, init_state: Callable, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """NLL [B, L-1] of ``ids [B, L]`` streamed through ``step(chunk_ids, state)`` in chunks of ``chunk``."""
    state, parts = init_state(ids.shape[0]), []
    for a in range(0, ids.shape[1], chunk):
        logits, state = step(ids[:, a:a + chunk], state)
        parts.append(chunk_nll(logits, ids, a))
    return torch.cat(parts, 1)


def evaluate_stream(step, init_state, docs: Sequence[np.ndarray], context: int, chunk: int, device,
                    batch_size: int = 1, done: Callable[[int], None] = lambda n: None) -> PositionStats:
    """Stream every document (each exactly ``context`` tokens or shorter) and collect NLL by position; ``done(n)``
    after each batch of n documents, outside the timed part (a progress bar).

    Before the timed pass, one untimed chunk per batch shape warms the runner up (CUDA context, library handles,
    kernel selection, allocator, CUDA-graph capture): otherwise whichever model is evaluated first pays for it
    in its tokens/s, which the comparison of tokens/s between models must not see."""
    stats = PositionStats(context)
    by_len: Dict[int, list] = {}
    for d in docs:
        by_len.setdefault(len(d), []).append(d)
    warm = set()
    for length, group in sorted(by_len.items()):
        for i in range(0, len(group), batch_size):
            rows = len(group[i:i + batch_size])
            if rows not in warm:
                warm.add(rows)
                ids = torch.as_tensor(np.stack(group[i:i + batch_size]), dtype=torch.long, device=device)
                stream_nll(step, init_state, ids[:, :chunk], chunk)
    _sync(device)
    for length, group in sorted(by_len.items()):
        for i in range(0, len(group), batch_size):
            ids = torch.as_tensor(np.stack(group[i:i + batch_size]), dtype=torch.long, device=device)
            _sync(device)
            t0 = time.perf_counter()
            nll = stream_nll(step, init_state, ids, chunk)
            _sync(device)
            stats.seconds += time.perf_counter() - t0
            stats.tokens += ids.numel()
            stats.add(nll)
            done(ids.shape[0])
    return stats


def torch_runner(model):
    """(step, init_state) of a DecoderLM."""
    dev = next(model.parameters()).device

    def init_state(b):
        return model.init_state(b, device=dev)

    return model.step, init_state


def dynamic_eval_params(model, which: str) -> list:
    if which == "all":
        return [p for p in model.parameters()]
    if which == "down_proj":
        return [layer.mlp.down_proj.weight for layer in model.model.layers]
    raise UsageError(f"--dynamic-eval-params {which!r} is not one of all, down_proj")


def dynamic_eval(model, docs: Sequence[np.ndarray], context: int, chunk: int, lr: Optional[float] = None,
                 which: str = "all", done: Callable[[int], None] = lambda n: None) -> PositionStats:
    """Dynamic evaluation (Krause et al.): score each chunk, then one Adam step on that chunk's loss.

    Each document starts from the original weights and a fresh optimizer; the KV state is carried
    (detached: no gradient through earlier chunks). ``model`` is left unchanged."""
    lr = DYNAMIC_EVAL_LR[which] if lr is None else lr
    work = copy.deepcopy(model)
    original = {k: v.clone() for k, v in work.state_dict().items()}
    dev = next(work.parameters()).device
    stats = PositionStats(context, extra={"dynamic_eval": {"lr": lr, "params": which, "optimizer": "adam"}})
    if len(docs):  # untimed warm-up on one chunk (see evaluate_stream); each document starts from ``original``
        _dynamic_doc(work, original, which, lr, torch.as_tensor(docs[0][None, :chunk], dtype=torch.long, device=dev), chunk)
    for doc in docs:
        ids = torch.as_tensor(doc[None], dtype=torch.long, device=dev)
        _sync(dev)
        t0 = time.perf_counter()
        nll = _dynamic_doc(work, original, which, lr, ids, chunk)
        _sync(dev)
        stats.seconds += time.perf_counter() - t0
        stats.tokens += ids.numel()
        stats.add(nll)
        done(1)
    return stats


def _dynamic_doc(work, original: dict, which: str, lr: float, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """One document of dynamic evaluation from the original weights and a fresh Adam: NLL [1, L-1]."""
    work.load_state_dict(original)
    params = dynamic_eval_params(work, which)
    for p in work.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    state, parts = work.init_state(1, device=ids.device), []
    for a in range(0, ids.shape[1], chunk):
        logits, state = work.step(ids[:, a:a + chunk], state)
        state = {k: v.detach() for k, v in state.items()}
        nll = chunk_nll(logits, ids, a)
        parts.append(nll.detach())
        if nll.numel():
            opt.zero_grad(set_to_none=True)
            nll.mean().backward()
            opt.step()
    return torch.cat(parts, 1)


PLOT_FORMATS = (".png", ".pdf", ".svg")


def check_plot_path(path: str, force: bool) -> str:
    """``path`` as the plot file ``plot_curves`` may write, checked before any work: a file name ending in one of
    PLOT_FORMATS, in an existing folder, not a folder itself, and not an existing file unless ``force``."""
    import os

    from .errors import OutputError

    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        raise UsageError(f"--plot {path}: is a folder; give a file name ending in {', '.join(PLOT_FORMATS)}")
    if ext not in PLOT_FORMATS:
        raise UsageError(f"--plot {path}: the file name must end in {', '.join(PLOT_FORMATS)} (the plot's format)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f"--plot {path}: the folder {parent} does not exist")
    if os.path.lexists(path) and not force:
        raise OutputError(f"--plot {path}: exists; pass --force to replace it")
    return path


def plot_curves(curves: Dict[str, np.ndarray], context: int, path: str, smooth: int = 0) -> str:
    """Loss against position for every evaluated model (moving average over ``smooth`` positions), written to
    ``path`` atomically (a temporary file beside it, then renamed); its format is the file name's extension."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smooth = smooth or max(1, context // 64)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, c in curves.items():
        pos = np.arange(len(c))
        ok = np.isfinite(c)
        kernel = np.ones(smooth) / smooth
        y = np.convolve(np.where(ok, c, 0.0), kernel, mode="same") / np.maximum(
            np.convolve(ok.astype(float), kernel, mode="same"), 1e-9)
        ax.plot(pos[ok], y[ok], label=name, lw=1.2)
    for e in bucket_edges(context)[1:-1]:
        ax.axvline(e, color="0.85", lw=0.8, zorder=0)
    ax.set_xscale("symlog", linthresh=max(1, context // 16))
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel(f"loss (nats, moving average over {smooth})")
    ax.legend()
    fig.tight_layout()
    ext = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=ext, dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, dpi=120, format=ext.lstrip(".").lower())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path


# -- documents and models -----------------------------------------------------------------------------
def heldout_keys(model_path: str) -> Optional[set]:
    """Content keys of the held-out documents recorded by ``calibrate`` in MODEL/MANIFEST.json, or None."""
    import os

    from .config import load_json_strict

    path = os.path.join(model_path, "MANIFEST.json")
    if not os.path.isfile(path):
        return None
    manifest = load_json_strict(path, cap=64 << 20)
    record = manifest.get("calibration") if isinstance(manifest, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("data"), dict):
        return None
    return {d["key"] for d in record["data"].get("heldout", []) if isinstance(d, dict) and "key" in d}


def select_documents(docs, context: int, split: str, keys: Optional[set], min_tokens: Optional[int] = None,
                     max_docs: Optional[int] = None) -> List[np.ndarray]:
    """Documents to evaluate, truncated to ``context``: the held-out split when asked (``auto``: when the
    model records one), those with at least ``min_tokens`` (default: ``context``) tokens, at most ``max_docs``."""
    if split not in ("auto", "heldout", "all"):
        raise UsageError(f"--split {split!r} is not one of auto, heldout, all")
    if max_docs is not None and max_docs < 1:
        raise UsageError(f"--max-docs must be at least 1, got {max_docs}")
    if split == "heldout" and keys is None:
        raise InputError("--split heldout: the model's MANIFEST.json records no calibration held-out split")
    if split == "heldout" and not keys:
        raise InputError("--split heldout: the model's calibration held out no documents (use --split all)")
    if split == "auto" and not keys:  # no split recorded, or one that held out nothing: every document
        keys = None
    if split != "all" and keys is not None:
        picked = [d for d in docs if d.key in keys]
        if not picked:
            raise InputError(f"none of the {len(keys)} held-out documents recorded in the model's manifest is in "
                             "--data (use --split all to evaluate everything)")
        docs = picked
    need = context if min_tokens is None else min_tokens
    long_docs = [d.ids[:context] for d in docs if len(d.ids) >= max(2, need)]
    if not long_docs:
        longest = max((len(d.ids) for d in docs), default=0)
        raise InputError(f"no document has {need} tokens (longest: {longest}); lower --context or --min-tokens")
    return long_docs[:max_docs] if max_docs is not None else long_docs


def _tokenizer_json(path: str) -> Optional[str]:
    """The tokenizer.json beside a model (None for a GGUF file, whose vocabulary is embedded and slow to read)."""
    import os

    path = str(path)
    if path.endswith(".gguf"):
        return None
    tj = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "tokenizer.json")
    return tj if os.path.isfile(tj) else None


def _token_ids(path: str) -> Optional[dict]:
    """{id: token} of a tokenizer.json (its model's vocabulary and its added tokens), or None when unreadable."""
    from .config import load_json_strict
    from .tokenizer import TOKENIZER_JSON_CAP

    try:
        doc = load_json_strict(path, cap=TOKENIZER_JSON_CAP)
    except InputError:
        return None
    model = doc.get("model") if isinstance(doc, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):  # BPE / WordPiece: token -> id
        ids = {i: t for t, i in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], ids are positions
        ids = {i: e[0] if isinstance(e, list) and e else e for i, e in enumerate(vocab)}
    else:
        return None
    for t in doc.get("added_tokens") or []:
        if isinstance(t, dict):
            ids[t.get("id")] = t.get("content")
    return ids


def check_same_vocabulary(model: str, vocab_size: int, other: str, option: str):
    """Refuse (InputError) evaluating ``other`` beside ``model`` on ``model``'s token ids when its vocabulary differs:
    another vocab_size, or, when both have a tokenizer.json, one that maps ids to other tokens (a GGUF's embedded
    vocabulary is not read: slow, and its vocab_size is checked). Returns ``other``'s opened checkpoint."""
    import filecmp

    from .checkpoint import open_checkpoint

    ck = open_checkpoint(str(other))
    if ck.config.vocab_size != vocab_size:
        raise InputError(f"{option} {other}: vocab_size {ck.config.vocab_size} differs from {model}'s {vocab_size}; "
                         "the documents are token ids of MODEL's tokenizer, so the models must share it")
    a, b = _tokenizer_json(model), _tokenizer_json(other)
    if a and b and not filecmp.cmp(a, b, shallow=False):
        ia, ib = _token_ids(a), _token_ids(b)
        if ia is not None and ib is not None and ia != ib:
            diff = sorted((i for i in set(ia) | set(ib) if ia.get(i) != ib.get(i)),
                          key=lambda i: (0, i, "") if isinstance(i, int) else (1, 0, str(i)))
            raise InputError(f"{option} {other}: its tokenizer ({b}) differs from {model}'s ({a}): {len(diff)} ids "
                             f"stand for other tokens (e.g. id {diff[0]}: {ia.get(diff[0])!r} vs {ib.get(diff[0])!r}); "
                             "the models must share a tokenizer")
    return ck


def load_eval_model(path: str, device, dtype=None, drop_fast_weights: bool = False):
    """A DecoderLM for evaluation (``drop_fast_weights``: the checkpoint's base weights only)."""
    from .checkpoint import open_checkpoint
    from .modeling import build_model, expected_shapes, load_tensors

    ck = open_checkpoint(str(path))
    ck.check_tensors(expected_shapes(build_model(ck.config, ck.fast_weights)))
    model = build_model(ck.config, None if drop_fast_weights else ck.fast_weights)
    return load_tensors(model, ck.iter_tensors(), device=device, dtype=dtype).eval()


def model_name(model) -> str:
    fw = getattr(model, "fast_weights", None)
    return getattr(fw, "kind", "model") if fw is not None else "model"


def compare(runners: Dict[str, tuple], docs, context: int, chunk: int, device, batch_size: int = 1,
            dynamic: Optional[dict] = None, log: Callable[[str], None] = lambda m: None,
            bar: Optional[Callable[[str, int], object]] = None) -> Dict[str, PositionStats]:
    """Evaluate every (step, init_state) runner on the same documents; with ``dynamic`` =
    {"model": base DecoderLM, "lr": .., "params": ..}, dynamic evaluation of that model too. ``bar(name, total)``:
    a progress bar (``update(n)``, ``close()``) per model, over documents."""
    out = {}
    jobs = [(name, lambda done, r=r: evaluate_stream(r[0], r[1], docs, context, chunk, device, batch_size, done))
            for name, r in runners.items()]
    if dynamic is not None:
        jobs.append(("dynamic_eval", lambda done: dynamic_eval(dynamic["model"], docs, context, chunk, dynamic.get("lr"),
                                                               dynamic.get("params", "all"), done)))
    for name, job in jobs:
        log(f"evaluating {name} on {len(docs)} documents")
        b = bar(name, len(docs)) if bar is not None else None
        try:
            out[name] = job(b.update if b is not None else (lambda n: None))
        finally:
            if b is not None:
                b.close()
    return out


def report(stats: Dict[str, PositionStats], context: int, chunk: int, n_docs: int) -> dict:
    """The --json object: one model's summary (and its name under "model"), or {"models": {name: summary}} when
    several."""
    summaries = {k: v.summary() for k, v in stats.items()}
    meta = {"context": context, "chunk_size": chunk, "documents": n_docs,
            "buckets": bucket_labels(bucket_edges(context))}
    if len(summaries) == 1:
        (name, summary), = summaries.items()
        return {**summary, **meta, "model": name}
    ref = summaries.get("baseline") or summaries.get("base")
    if ref is not None:
        for s in summaries.values():
            s["relative_to_" + ("baseline" if "baseline" in summaries else "base")] = {
                "perplexity": s["perplexity"] / ref["perplexity"] - 1,
                "by_position": {k: v / ref["by_position"][k] - 1 for k, v in s["by_position"].items()
                                if k in ref["by_position"]},
                "tokens_per_second": s["tokens_per_second"] / ref["tokens_per_second"]}
    return {"models": summaries, **meta}
