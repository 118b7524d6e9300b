"""Verify an exported folder against PyTorch, chunk by chunk with the state carried on both sides.

    tokens --chunk k--> torch DecoderLM.step (fp32) ----> logits, state  \
                    --> ChunkSession.step (onnxruntime) -> logits, state  -> max-abs, rel, greedy, per name

Every output (logits and every state tensor) is compared after every chunk, and the perplexity of the whole token
sequence at the end; anything beyond its tolerance in ``fwconvert.config.TOLERANCES`` is a NumericError (exit 6).
fp16 graphs judge the states a mechanism declares as cancelling sums (``cancelling_sums``) with their own tolerance.
The artifact is never touched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from fwconvert.config import TOLERANCES
from fwconvert.errors import InputError, NumericError, UsageError
from fwconvert.modeling.decoder import DecoderLM

from .runtime.session import ChunkSession, load_manifest
from .runtime.stream import token_nll


@dataclass
class Row:
    chunk: int
    name: str
    max_abs: float
    rel: float
    greedy: Optional[float] = None  # fraction of positions where argmax agrees (logits only)
    tolerance: Optional[float] = None  # this row's own tolerance (None: the report's)


@dataclass
class Report:
    folder: str
    provider: str
    tolerance: float
    chunk_size: int
    chunks: int
    rows: List[Row] = field(default_factory=list)
    # {"onnx": ..., "torch": ..., "rel": ..., "tolerance": ...} over the compared tokens (None before any chunk)
    perplexity: Optional[dict] = None
    note: Optional[str] = None  # why fewer tokens were compared than asked (a short document, --static's full chunks)

    def tolerance_of(self, r: Row) -> float:
        return self.tolerance if r.tolerance is None else r.tolerance

    def worst(self, rows: Optional[List[Row]] = None) -> Row:
        """The row (of ``rows``, default all) nearest to (or furthest beyond) its tolerance."""
        return max(self.rows if rows is None else rows,
                   key=lambda r: (r.rel / self.tolerance_of(r) if math.isfinite(r.rel) else math.inf))

    @property
    def perplexity_passed(self) -> bool:
        p = self.perplexity
        return p is None or (math.isfinite(p["rel"]) and p["rel"] <= p["tolerance"])

    @property
    def passed(self) -> bool:
        return self.perplexity_passed and all(math.isfinite(r.rel) and r.rel <= self.tolerance_of(r) for r in self.rows)

    def to_dict(self) -> dict:
        w = self.worst()
        return {"folder": self.folder, "provider": self.provider, "tolerance": self.tolerance, "passed": self.passed,
                "chunk_size": self.chunk_size, "chunks": self.chunks,
                "worst": {"chunk": w.chunk, "name": w.name, "max_abs": w.max_abs, "rel": w.rel,
                          "tolerance": self.tolerance_of(w)},
                "perplexity": self.perplexity, "note": self.note, "rows": [vars(r) for r in self.rows]}


def compare(a: np.ndarray, b: np.ndarray) -> tuple:
    """(max |a-b|, ||a-b|| / ||b||) in float64; the norm floor 1e-6*sqrt(n) keeps all-zero references sane."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf, math.inf
    d = a - b
    if not np.isfinite(a).all():
        return math.inf, math.inf
    floor = 1e-6 * math.sqrt(max(b.size, 1))
    return float(np.abs(d).max(initial=0.0)), float(np.linalg.norm(d) / max(np.linalg.norm(b), floor))


def _align(ort: np.ndarray, ref: np.ndarray, key: str) -> np.ndarray:
    """A fixed-size window KV state (zero padding in front) against torch's growing one: its last P slots."""
    if key.startswith("past_key_values.") and ort.ndim == 4 and ort.shape[2] > ref.shape[2]:
        return ort[:, :, ort.shape[2] - ref.shape[2]:]
    return ort


def _load_reference(session: ChunkSession, against) -> DecoderLM:
    m = session.manifest
    window = m.window if m.attention == "window" else None
    if isinstance(against, DecoderLM):
        model = against
    else:
        path = against or m.source
        if not path:
            raise InputError(f"{session.folder}: the manifest records no source model; pass --against MODEL")
        import fwconvert
        from fwconvert.checkpoint import open_checkpoint

        ck = open_checkpoint(path)
        if against is None and m.source_fingerprint and m.source_fingerprint not in (ck.fingerprint(),
                                                                                      ck.header_fingerprint()):
            raise InputError(f"{path}: the source model changed since the export (its config, tensor headers or sampled "
                             f"tensor values are not those recorded in {session.folder}'s manifest); pass the model "
                             "that was exported as --against MODEL, or export it again")
        model = fwconvert.load_checkpoint(ck, dtype=torch.float32, window=window, sinks=m.sink_tokens)
    if m.attention == "window" and model.window != window:
        raise InputError(f"the export attends within a window of {window} but the reference model uses {model.window}")
    if model.sinks != m.sink_tokens:
        raise InputError(f"the export keeps {m.sink_tokens} attention sinks but the reference model {model.sinks}")
    if model.config.vocab_size != m.vocab_size:
        raise InputError(f"vocab size differs: export {m.vocab_size}, reference model {model.config.vocab_size}")
    return model.float().eval()


def _tokens(session: ChunkSession, chunks: int, batch: int, seed: int, tokens) -> np.ndarray:
    if tokens is not None:
        ids = np.asarray(tokens, dtype=np.int64).reshape(batch, -1)[:, : chunks * session.chunk_size]
    else:
        n = chunks * session.chunk_size
        ids = np.random.default_rng(seed).integers(0, session.manifest.vocab_size, size=(batch, n), dtype=np.int64)
    return ids


def _graph_layout(r: np.ndarray, key: str, key_dim_order) -> np.ndarray:
    """torch's state tensor ``r`` in the graph's layout: keys (and sink keys) with each head's dims in the
    manifest's ``key_dim_order`` (None: the model's own order)."""
    if key_dim_order is not None and key.startswith("past_key_values.") and key.endswith((".key", ".sink_key")):
        return r[..., list(key_dim_order)]
    return r


def _chunk_rows(k: int, lo: np.ndarray, ref: np.ndarray, ort_state: Dict, ref_state: Dict, own: Dict,
                key_dim_order=None) -> List[Row]:
    mx, rel = compare(lo, ref)
    rows = [Row(k, "logits", mx, rel, float((lo.argmax(-1) == ref.argmax(-1)).mean()))]
    for key, val in ort_state.items():
        r = ref_state[key].float().numpy() if ref_state[key].is_floating_point() else ref_state[key].numpy()
        r = _graph_layout(r, key, key_dim_order)
        mx, rel = compare(_align(val, r, key), r)
        rows.append(Row(k, key, mx, rel, tolerance=own.get(key)))
    return rows


def _nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Σ -log softmax(logits)[target] over logits [B, n, V] and targets [B, n] (float64, one row at a time)."""
    return float(sum(token_nll(logits[b], targets[b]).sum() for b in range(logits.shape[0])))


def _own_tolerances(model: DecoderLM, dtype: str) -> Dict[str, float]:
    """State key -> its own tolerance: in fp16 graphs, the cancelling sums each mechanism declares."""
    if dtype != "fp16":
        return {}
    tol = TOLERANCES["ort_fp16_cancelling_sums"].rel
    return {f"fast_weights.{owner}.{name}": tol for owner, mod in model.stateful_modules().items()
            for name in mod.cancelling_sums}


def verify(folder: str, against=None, chunks: int = 16, provider: str = "cpu", batch: int = 1, seed: int = 0,
           tokens=None, threads: Optional[int] = None, static: bool = False,
           log: Optional[Callable[[str], None]] = None) -> Report:
    """Run ``chunks`` chained chunks through both and return the Report (raises NumericError on failure).
    ``static``: through a static session (``ChunkSession(static_batch=batch)``; CUDA graphs on CUDA).
    ``log``: called with a line per compared chunk (the CLI prints them on stderr as progress)."""
    log = log or (lambda m: None)
    if chunks < 1:
        raise UsageError(f"--chunks must be >= 1, got {chunks}")
    if batch < 1:
        raise UsageError(f"--batch must be >= 1, got {batch}")
    manifest = load_manifest(folder)
    session = ChunkSession(folder, provider=provider, threads=threads, manifest=manifest,  # TF32 as deployed
                           static_batch=batch if static else None,  # enough pinned past lengths for every chunk:
                           static_context=chunks * int(manifest.chunking["chunk_size"]) if static else None)
    model = _load_reference(session, against)
    fp32 = session.manifest.dtype == "fp32"
    key = "ort_fp32_vs_torch_fp32" if fp32 else "ort_fp16_vs_torch_fp32"
    report = Report(session.folder, session.provider_note, TOLERANCES[key].rel, session.chunk_size, 0)
    own = _own_tolerances(model, session.manifest.dtype)
    ppl_tol = TOLERANCES["ort_fp32_vs_torch_fp32" if fp32 else "ppl_fp16_vs_fp32"].rel
    ids = _tokens(session, chunks, batch, seed, tokens)
    report.note = _short_document_note(ids.shape[1], chunks, session.chunk_size, static)
    if static:  # a static session takes full chunks only: a document's ragged tail is not compared
        full = ids.shape[1] // session.chunk_size * session.chunk_size
        if full == 0:
            raise InputError(f"--static compares full chunks of {session.chunk_size} tokens; the document has only "
                             f"{ids.shape[1]}")
        ids = ids[:, :full]
    _check_window_layout(session.manifest, model)
    _check_state_names(session.manifest, model)
    state = session.new_state(batch)
    tstate = model.init_state(batch)
    c = session.chunk_size
    nll = {"onnx": 0.0, "torch": 0.0, "n": 0}
    with torch.no_grad():
        for k, a in enumerate(range(0, ids.shape[1], c)):
            chunk = ids[:, a:a + c]
            lo = session.step(chunk, state)
            lt, tstate = model.step(torch.from_numpy(chunk), tstate)
            ref = lt.float().numpy()
            rows = _chunk_rows(k, lo, ref, state.to_numpy(), tstate, own, session.manifest.key_dim_order)
            report.rows.extend(rows)
            worst = report.worst(rows)
            log(f"chunk {k + 1}/{-(-ids.shape[1] // c)}: worst {worst.name} rel {worst.rel:.2e}")
            n = min(chunk.shape[1], ids.shape[1] - 1 - a)  # positions a..a+n-1 predict tokens a+1..a+n
            if n > 0:
                tgt = ids[:, a + 1:a + 1 + n]
                nll["onnx"] += _nll_sum(lo[:, :n], tgt)
                nll["torch"] += _nll_sum(ref[:, :n], tgt)
                nll["n"] += tgt.size
            report.chunks = k + 1
    if nll["n"]:
        po, pt = (math.exp(nll[s] / nll["n"]) for s in ("onnx", "torch"))
        report.perplexity = {"onnx": po, "torch": pt, "rel": abs(po - pt) / pt, "tolerance": ppl_tol, "tokens": nll["n"]}
    if not report.passed:
        w = report.worst()
        if math.isfinite(w.rel) and w.rel <= report.tolerance_of(w):
            p = report.perplexity
            what = (f"perplexity {p['onnx']:.6g} against torch's {p['torch']:.6g}: rel {p['rel']:.3g} > tolerance "
                    f"{p['tolerance']:g}")
        else:
            what = (f"output {w.name!r} at chunk {w.chunk}: max abs {w.max_abs:.3g}, max rel {w.rel:.3g} > tolerance "
                    f"{report.tolerance_of(w):g}" + (f" ({key})" if w.tolerance is None else " (ort_fp16_cancelling_sums)"))
        err = NumericError(f"verify failed: {what}; the export at {session.folder} does not match PyTorch")
        err.report = report
        raise err
    return report


def _short_document_note(tokens: int, chunks: int, c: int, static: bool) -> Optional[str]:
    """A line saying that fewer chunks (or tokens) are compared than asked, or None."""
    if tokens >= chunks * c:
        return None
    full, rest = divmod(tokens, c)
    if static:
        return (f"the document gives {_n(full, 'full chunk')} of the {chunks} asked"
                + (f"; --static compares full chunks only, so its last {rest} tokens are not compared" if rest else ""))
    return (f"the document gives {_n(full + bool(rest), 'chunk')} of the {chunks} asked"
            + (f" (the last {rest} tokens)" if rest else ""))


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _owners(keys) -> set:
    """The fast-weight owners (``fwl``, ``layers.0.mlp``, ...) of state keys ``fast_weights.<owner>.<name>``."""
    return {k[len("fast_weights."):].rsplit(".", 1)[0] for k in keys if k.startswith("fast_weights.")}


def _check_state_names(manifest, model) -> None:
    """Every state tensor of the export must be one of the reference model's (which may hold more: in-place TTT's
    pending tokens live only in its general step). A reference model with other fast weights than the export's is
    not the exported model; an export of an older fwconvert may lay a mechanism's state out differently, e.g. FWL's
    bias sums were tensors of their own before 2026-12-05."""
    import fwconvert

    exported, ref = {s.key for s in manifest.state}, set(model.init_state(1))
    mine, theirs = _owners(exported), _owners(ref)
    if mine != theirs:
        def has(owners):
            return ", ".join(f"fast_weights.{o}.*" for o in sorted(owners)) if owners else "no fast-weight state"

        raise InputError(f"the reference model has {has(theirs)} but the export has {has(mine)}: the reference must "
                         "be the model that was exported (--against MODEL)")
    extra = sorted(exported - ref)
    if extra:
        written = manifest.versions.get("fwconvert", "?")
        why = (f"written by fwconvert {written}, this is {fwconvert.__version__}" if written != fwconvert.__version__
               else f"written by fwconvert {written} with another state layout than this build's")
        raise InputError(f"the export's state does not match the reference model's ({', '.join(extra[:4])}"
                         f"{', ...' if len(extra) > 4 else ''} exist only in the export; {why}). The graph still runs, "
                         "but verify cannot compare its state: export it again with this version to verify it")


def _check_window_layout(manifest, model) -> None:
    """A window export's KV slots must be the reference model's: W (W - 1 before 2026-12-02, when the span W + C was
    aligned). An older export still runs; only its state cannot be compared slot by slot."""
    if manifest.attention != "window":
        return
    kv = next((s for s in manifest.state if s.key.startswith("past_key_values.")), None)
    slots = kv.shape[2] if kv is not None else None
    if isinstance(slots, int) and slots != model.window:
        raise InputError(f"this window export keeps {slots} KV slots for W = {manifest.window}; this fwconvert keeps "
                         f"{model.window} (older exports kept W - 1). The graph still runs, but verify cannot compare "
                         "its state: export it again with this version to verify it")


def format_table(report: Report) -> str:
    """One line per chunk (first and last always; at most 12 lines): logits and the worst state tensor."""
    by_chunk: Dict[int, List[Row]] = {}
    for r in report.rows:
        by_chunk.setdefault(r.chunk, []).append(r)
    ks = sorted(by_chunk)
    show = ks if len(ks) <= 12 else ks[:6] + ks[-6:]
    lines = [f"{'chunk':>5}  {'logits max-abs':>14}  {'logits rel':>10}  {'greedy':>6}  "
             f"{'worst state (rel / its tolerance)':<40}"]
    for k in show:
        rows = by_chunk[k]
        lg = rows[0]
        st = report.worst(rows[1:]) if rows[1:] else None  # rel / tolerance, as the verdict and progress judge
        worst = f"{st.name} {st.rel:.2e} / {report.tolerance_of(st):g}" if st else "-"
        lines.append(f"{k:>5}  {lg.max_abs:>14.3e}  {lg.rel:>10.3e}  {lg.greedy:>6.1%}  {worst:<40}")
    w = report.worst()
    p = report.perplexity
    if p is not None:
        lines.append(f"perplexity over {p['tokens']} tokens: {p['onnx']:.6g} (onnxruntime) vs {p['torch']:.6g} (torch), "
                     f"rel {p['rel']:.2e} (tolerance {p['tolerance']:g})")
    if report.note:
        lines.append(report.note)
    verdict = "PASS" if report.passed else "FAIL"
    lines.append(f"{verdict}: {_n(report.chunks, 'chunk')} of {report.chunk_size} on {report.provider}; worst "
                 f"{w.name!r} rel {w.rel:.3e} (tolerance {report.tolerance_of(w):g})")
    return "\n".join(lines)
