"""CLI commands for exported artifacts: ``export-onnx``, ``run`` and ``verify``.

Heavy modules (torch, onnx, onnxruntime, exporters) are imported inside the commands so that
``fwconvert --help`` stays fast. Results go to stdout (JSON with ``--json``); errors are raised as
FwconvertError and printed by the top-level handler.
"""
from __future__ import annotations

import os

import click

from ..errors import InputError, NumericError
from .json_out import strict_json


@click.command("export-onnx")
@click.argument("model", type=click.Path())
@click.option("-o", "--out", type=click.Path(), default=None, help="Output folder (default: MODEL-onnx beside MODEL).")
@click.option("--chunk-size", type=int, default=None,
              help="Default chunk length (in-place TTT models: must equal their TTT chunk size).")
@click.option("--attention", type=click.Choice(["full", "window"]), default=None,
              help="full: growing KV cache; window: fixed-size sliding-window KV state (constant memory). A "
                   "pretrained model degrades sharply once a document's first tokens leave the window (SmolLM2: "
                   "1.6-2x perplexity per chunk past W) unless they stay attendable as attention sinks "
                   "(--sink-tokens, 4 by default).")
@click.option("--window", type=int, default=None,
              help="Attention window W for --attention window. Each chunk then attends over W + C positions; keep "
                   "W + C a multiple of 8 (e.g. W = 2048, C = 512) for onnxruntime's fused attention kernels.")
@click.option("--sink-tokens", type=click.IntRange(min=0), default=None,
              help="With --attention window: keep the document's first N tokens attendable beyond the window "
                   "(attention sinks, a fixed-size state of N keys per layer). Default: 4 when the window is not "
                   "the model's own sliding window, 0 for a model with one (e.g. Mistral); 0 gives the plain window "
                   "model. On SmolLM2, 4 sinks bring a window of 2048 from 12.2 to 7.9 perplexity on an 8k document "
                   "(full attention: 7.7; measure yours with benchmarks/window_perplexity.py --sinks 4); they cost "
                   "about 10% of a chunk step.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Weight/activation dtype of the graph (fast-weight state stays fp32).")
@click.option("--force", is_flag=True, help="Replace an existing output folder: an empty one or an earlier export "
                                           "(a folder without an export's manifest.json is refused).")
def export_onnx_cmd(model, out, chunk_size, attention, window, sink_tokens, dtype, force):
    """Export MODEL as one stateful chunk-step ONNX graph plus manifest.json."""
    from exporters.onnx.export import export_onnx

    out = out or os.path.abspath(str(model)).rstrip(os.sep) + "-onnx"
    path = export_onnx(model, out, chunk_size=chunk_size, attention=attention, window=window, dtype=dtype, force=force,
                       sinks=sink_tokens, log=_progress_line)
    _window_notes(path, default_sinks=sink_tokens is None)
    click.echo(path)


def _progress_line(msg: str) -> None:
    """A stage or progress line of a long command, on stderr (stdout keeps the result)."""
    click.echo(msg, err=True)


def _window_notes(folder: str, default_sinks: bool) -> None:
    """Notes on stderr about a window export: attention sinks kept by default (not asked for), and an attention
    span W + C that is not a multiple of 8."""
    from exporters.runtime.session import load_manifest

    m = load_manifest(folder)
    if m.attention != "window":
        return
    if default_sinks and m.sink_tokens:
        click.echo(f"note: the document's first {m.sink_tokens} tokens stay attendable beyond the window (attention "
                   "sinks, the default for a window the model was not trained with); --sink-tokens 0 exports the "
                   "plain window model", err=True)
    span = int(m.window) + int(m.chunking["chunk_size"])
    if span % 8:
        click.echo(f"note: each chunk attends over W + C = {span} positions, not a multiple of 8; onnxruntime's "
                   "fused attention wants the mask rows aligned (on the H200 the fp32 memory-efficient kernel refused "
                   "such a span), so prefer W and C that are multiples of 8", err=True)


def _read_tokens(path: str) -> list:
    from ..config import JSON_SIZE_CAP

    text = _read_text(path, cap=64 * JSON_SIZE_CAP)
    try:
        ids = [int(t) for t in text.split()]
    except ValueError:
        raise InputError(f"{path}: --tokens expects whitespace-separated integer token ids") from None
    return ids


def _read_text(path: str, cap: int) -> str:
    from ..config import stat_regular

    st = stat_regular(path, "input file")
    if st.st_size > cap:
        raise InputError(f"{path}: {st.st_size} bytes is larger than the {cap}-byte cap")
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _document_path(text, tokens) -> str:
    """The one document file given (--text or --tokens), checked to be a regular file before anything is loaded."""
    from ..config import stat_regular

    if (text is None) == (tokens is None):
        raise click.UsageError("give exactly one of --text FILE or --tokens FILE")
    path = text if text is not None else tokens
    stat_regular(path, "input file")
    return path


def _document(folder: str, text, tokens, vocab_size: int):
    """(token ids, tokenizer or None) of the document to run."""
    _document_path(text, tokens)
    if tokens is not None:
        ids, tok = _read_tokens(tokens), None
    else:
        from ..tokenizer import load_tokenizer

        tok = load_tokenizer(folder, vocab_size=vocab_size)
        ids = tok.encode(_read_text(text, cap=1 << 28))
    if not ids:
        raise InputError("the document is empty (no tokens)")
    return ids, tok


@click.command("run")
@click.argument("exported", type=click.Path())
@click.option("--text", type=click.Path(), default=None, help="A UTF-8 text document (tokenized with the copied tokenizer).")
@click.option("--tokens", type=click.Path(), default=None, help="A file of whitespace-separated token ids instead of --text.")
@click.option("--generate", type=int, default=0, show_default=True, help="Greedy-generate N tokens after the document.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="onnxruntime execution provider (auto: CUDA when available).")
@click.option("--static", is_flag=True,
              help="Run a static session: the chunk pinned, buffers bound once, CUDA graphs on the CUDA provider (its "
                   "chunk step streams about 1.5x as fast as the default session's on an H100, docs/benchmarks.md; "
                   "run also computes every token's loss on the host). The document's short last chunk is padded "
                   "(its padded positions dropped); a full-attention export keeps one pinned session and KV buffers "
                   "per chunk-long past, so memory grows with about the square of the document's length. For the "
                   "CUDA provider: on the CPU it is slower. Not with --generate.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (per-token losses included).")
def run_cmd(exported, text, tokens, generate, provider, static, as_json):
    """Stream a document through EXPORTED: per-token loss, perplexity, optional greedy continuation."""
    import numpy as np

    from exporters.runtime.session import ChunkSession, load_manifest
    from exporters.runtime.stream import greedy_generate, perplexity, token_losses

    if generate < 0:
        raise click.UsageError("--generate must be >= 0")
    if static and generate:
        raise click.UsageError("--generate runs chunks of any length, which a static session does not: omit --static")
    _document_path(text, tokens)  # a missing file is named before the graph is loaded
    manifest = load_manifest(exported)  # the document before the session: a static session's context is its length
    ids, tok = _document(exported, text, tokens, manifest.vocab_size)
    c = int(manifest.chunking["chunk_size"])
    session = ChunkSession(exported, provider=provider, manifest=manifest, static_batch=1 if static else None,
                           static_context=-(-len(ids) // c) * c if static else None)
    if static and session.device != "cuda":
        click.echo("note: --static gains nothing on the CPU provider (no CUDA graphs) and opens an onnxruntime "
                   "session per chunk-long past of a full-attention export: slower and larger than the default "
                   "session there", err=True)
    trained = session.manifest.max_position_embeddings
    if trained and len(ids) + generate > trained:
        click.echo(f"warning: {len(ids)} tokens{f' + {generate} generated' if generate else ''} run past the "
                   f"{trained} positions the model was trained for (max_position_embeddings); losses and text beyond "
                   f"position {trained} come from positions it never saw", err=True)
    arr = np.asarray([ids], dtype=np.int64)
    losses = token_losses(session, arr)[0]
    bad, err = np.flatnonzero(~np.isfinite(losses)), None
    if bad.size:  # reported (JSON first, as verify does) and then exit 6; no generation from non-finite logits
        err = NumericError(f"{bad.size} of {losses.size} token losses are not finite (NaN/Inf), the first predicting "
                           f"token {int(bad[0]) + 2} of {len(ids)}: the export at {session.folder} computes non-finite "
                           "logits (`fwconvert verify` compares it with PyTorch)")
    gen = []
    if generate and err is None:
        try:
            gen = greedy_generate(session, arr, generate)[0].tolist()
        except NumericError as e:
            err = NumericError(f"--generate: {e} (the export at {session.folder})")
    result = {"provider": session.provider_note, "session": "static" if static else "ordinary", "tokens": len(ids),
              "mean_loss": float(losses.mean()) if losses.size else None,
              "perplexity": perplexity(losses) if losses.size else None, "generated_ids": gen}
    if tok is not None and gen:
        result["generated_text"] = tok.decode(gen)
    if as_json:
        result["losses"] = [round(float(x), 6) for x in losses]
        click.echo(strict_json(result))
    else:
        click.echo(f"provider:   {result['provider']}{' (static session)' if static else ''}")
        click.echo(f"tokens:     {len(ids)}")
        if losses.size:
            click.echo(f"mean loss:  {result['mean_loss']:.4f} nats/token")
            click.echo(f"perplexity: {result['perplexity']:.4f}")
        else:
            click.echo("mean loss:  - (no predicted tokens: the document has one token)")
        if gen:
            click.echo(f"generated:  {result.get('generated_text', ' '.join(map(str, gen)))}")
    if err is not None:
        raise err


def _manifest_or_none(folder: str):
    """The export's manifest, or None when it cannot be read (verify itself then reports why, with its reason)."""
    from exporters.runtime.session import load_manifest

    try:
        return load_manifest(folder)
    except Exception:  # noqa: BLE001 - reported by verify
        return None


def _note_fp16_on_cpu(manifest, provider: str) -> None:
    """An fp16 export verified on the CPU provider runs onnxruntime's CPU kernels, not the CUDA ones it is made for:
    the CPU Attention kernel of full-attention graphs rounds inside the op in fp16 (docs/results.md, session 14)."""
    if provider == "cpu" and manifest is not None and manifest.dtype == "fp16":
        click.echo("note: an fp16 export on the CPU provider runs onnxruntime's CPU kernels, whose fp16 rounding "
                   "differs from the CUDA kernels it is made for; --provider cuda checks the deployment's numerics",
                   err=True)


@click.command("verify")
@click.argument("exported", type=click.Path())
@click.option("--against", type=click.Path(), default=None, help="Reference model (default: the source in the manifest).")
@click.option("--chunks", type=int, default=16, show_default=True, help="Number of chained chunks to compare.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime execution provider (CUDA: TF32 off for fp32 graphs, on for the fp32 parts "
                   "of fp16 graphs, as every session runs them). fp16 exports are made for CUDA: on the CPU their "
                   "fp16 rounds differently (a note says so).")
@click.option("--batch", type=int, default=1, show_default=True, help="Documents per chunk (random tokens only).")
@click.option("--text", type=click.Path(), default=None,
              help="Compare on this UTF-8 document (its first CHUNKS chunks, tokenized with the copied tokenizer) "
                   "instead of random tokens. Random tokens drive fp16 far outside the training distribution "
                   "(on SmolLM2 PyTorch's own fp16 misses the 1e-2 logits tolerance there): check fp16 exports on "
                   "real text.")
@click.option("--tokens", type=click.Path(), default=None, help="Like --text, from whitespace-separated token ids.")
@click.option("--static", is_flag=True,
              help="Run the export as a static session: batch and chunk pinned, buffers bound once, and on the CUDA "
                   "provider every step replayed as a captured CUDA graph (full chunks; a full-attention export "
                   "gets one pinned session per past length).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def verify_cmd(exported, against, chunks, provider, batch, text, tokens, static, as_json):
    """Compare EXPORTED with PyTorch chunk by chunk (logits and every state tensor) and the perplexity over all the
    tokens; exit 6 beyond tolerance (fp32 graphs 1e-4; fp16 graphs 1e-2 and perplexity within 1%, FWL's gradient
    sums 5e-2: they cancel, so their relative error is a multiple of the fp16 activations')."""
    from exporters.verify import format_table, verify

    manifest = _manifest_or_none(exported)
    _note_fp16_on_cpu(manifest, provider)
    ids = None
    if text is not None or tokens is not None:
        if batch != 1:
            raise click.UsageError("--batch applies to random tokens only; --text/--tokens verify one document")
        from exporters.runtime.session import load_manifest

        vocab = (manifest or load_manifest(exported)).vocab_size  # an unreadable manifest: its error, here
        ids = [_document(exported, text, tokens, vocab)[0]]
    try:
        report = verify(exported, against=against, chunks=chunks, provider=provider, batch=batch, tokens=ids,
                        static=static, log=_progress_line)
    except NumericError as e:
        report = getattr(e, "report", None)
        if report is not None:
            click.echo(strict_json(report.to_dict()) if as_json else format_table(report))
        raise
    click.echo(strict_json(report.to_dict()) if as_json else format_table(report))


COMMANDS = [export_onnx_cmd, run_cmd, verify_cmd]
