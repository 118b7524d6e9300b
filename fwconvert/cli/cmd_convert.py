"""The conversion commands ``add-fwl`` and ``mark-fast`` (logic in ``fwconvert.convert``).

Each prints the output folder on stdout at the end; a progress bar over tensors, warnings and the --resume
notes go to stderr.
"""
from __future__ import annotations

import logging
import sys

import click

_COMMON = [
    click.option("-o", "--out", "out", type=click.Path(), default=None,
                 help="Output folder (default: a sibling of SRC named <SRC>-fwl / <SRC>-ttt). Never inside SRC."),
    click.option("--config", "config", type=click.Path(), default=None,
                 help="config.json to use for a bare .safetensors SRC without a sibling config.json."),
    click.option("--seed", type=int, default=0, show_default=True,
                 help="Seed for the random initial values of the new (inactive at conversion) weights."),
    click.option("--force", is_flag=True, help="Replace an existing output folder, only after the new one is complete: an "
                                               "empty one or an earlier fwconvert output (other folders are refused)."),
    click.option("--resume", is_flag=True,
                 help="Continue a killed run of this command into the same output: reuse its leftover staging folder "
                      "(.<OUT>.fwconvert-partial-*), keep the shards whose sha256 matches its journal, write the rest; "
                      "the result is bit-identical to an uninterrupted run. Refuses (exit 4) if the input, the flags "
                      "or the fwconvert version changed; with no leftover, a normal run."),
    click.option("--allow-nonfinite", is_flag=True,
                 help="Copy tensors holding NaN/Inf with a warning instead of failing (exit 6)."),
]


def _common(f):
    for opt in reversed(_COMMON):
        f = opt(f)
    return f


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="tensors", unit="tensor", file=sys.stderr, leave=False, disable=None)


class _StderrLines(logging.Handler):
    """Warning and info lines of the library (info: only the --resume notes), written to sys.stderr as it is now."""

    def emit(self, record):
        click.echo(record.getMessage(), err=True)


def _warnings_to_stderr() -> None:
    logger = logging.getLogger("fwconvert")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines(logging.INFO))
        logger.setLevel(logging.INFO)
        logger.propagate = False


@click.command("add-fwl")
@click.argument("src", type=click.Path())
@click.option("--size", type=int, default=None,
              help="FWL block output size S; must equal the model's hidden_size (the default) in our residual design.")
@click.option("--chunk-size", type=int, default=256, show_default=True,
              help="Chunk of the parallel (training) form's mixed attention: a compute/memory trade only.")
@_common
def add_fwl(src, out, size, chunk_size, config, seed, force, resume, allow_nonfinite):
    """Add a Fast Weight Layer head (Clark et al. 2022) to the checkpoint SRC.

    SRC is an HF folder, a .safetensors file (config.json beside it or --config) or a .gguf file. Every
    original tensor is copied byte-identical (GGUF: dequantized to fp32); the converted model's logits equal
    the base model's until it is calibrated."""
    from ..convert import add_fwl as run

    _warnings_to_stderr()
    path = run(src, out, size=size, chunk_size=chunk_size, config=config, force=force, seed=seed,
               allow_nonfinite=allow_nonfinite, progress=_progress, resume=resume)
    click.echo(path)


@click.command("mark-fast")
@click.argument("src", type=click.Path())
@click.option("--layers", default="every:6", show_default=True,
              help="TTT layers: every:K (0, K, 2K, ...), last:K, all, or a list like 0,6,12.")
@click.option("--chunk-size", type=int, default=1024, show_default=True,
              help="TTT chunk size C: W_down is updated after every C tokens (5 <= C <= max_position_embeddings).")
@click.option("--lr", type=float, default=3.0, show_default=True, help="ttt_lr (eta): the fast-weight step size.")
@click.option("--target", type=click.Choice(["hidden_states", "input_embed"]), default="hidden_states", show_default=True,
              help="Input of the target's conv: the layer's MLP input (hidden_states) or the token embeddings.")
@_common
def mark_fast(src, out, layers, chunk_size, lr, target, config, seed, force, resume, allow_nonfinite):
    """Make W_down of chosen layers in-place test-time-training fast weights (Feng et al. 2026).

    Adds model.layers.{i}.mlp.ttt_conv.weight (zero) and ttt_proj.weight per TTT layer, so the marked
    model's logits equal the base model's; every original tensor is copied byte-identical."""
    from ..convert import mark_fast as run

    _warnings_to_stderr()
    path = run(src, out, layers=layers, chunk_size=chunk_size, lr=lr, target=target, config=config, force=force,
               seed=seed, allow_nonfinite=allow_nonfinite, progress=_progress, resume=resume)
    click.echo(path)


COMMANDS = [add_fwl, mark_fast]
