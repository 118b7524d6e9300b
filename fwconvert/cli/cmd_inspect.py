"""``fwconvert inspect PATH [--config FILE] [--json]``: describe a checkpoint without loading its tensors."""
from __future__ import annotations

import json

import click

from .json_out import strict_json


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_description(info: dict) -> str:
    """The human table of ``describe``'s dict."""
    rows = [("path", info["path"]), ("family", info["family"]), ("layers", info["num_hidden_layers"]),
            ("hidden size", info["hidden_size"]), ("MLP size", info["intermediate_size"]),
            ("heads / KV heads", f"{info['num_attention_heads']} / {info['num_key_value_heads']}"),
            ("head dim", info["head_dim"]), ("vocab", info["vocab_size"]),
            ("context", info["max_position_embeddings"])]
    if info["sliding_window"]:
        rows.append(("sliding window", info["sliding_window"]))
    if info["rope_scaling"]:
        rows.append(("rope scaling", json.dumps(info["rope_scaling"])))
    rows += [("tied embeddings", info["tie_word_embeddings"]),
             ("parameters", f"{info['num_parameters']:,} ({info['num_parameters'] / 1e6:.1f}M)"),
             ("dtypes", ", ".join(f"{d} x{n}" for d, n in info["dtypes"].items())),
             ("config", info["config_source"])]
    lay = info["layout"]
    rows.append(("files", f"{lay['kind']}, {len(lay['files'])} file(s), {_human_bytes(lay['total_bytes'])}, "
                          f"{lay['num_tensors']} tensors"))
    rows += [("", f"{f['path']} ({_human_bytes(f['bytes'])})") for f in lay["files"][:8]]
    if len(lay["files"]) > 8:
        rows.append(("", f"... {len(lay['files']) - 8} more"))
    tok = ", ".join(lay["tokenizer_files"]) or ("embedded in the GGUF file" if lay["tokenizer_embedded"] else "(none beside it)")
    rows.append(("tokenizer", tok))
    fw = info["fast_weights"]
    if fw is None:
        rows.append(("fast weights", "none (plain model)"))
    else:
        st = fw["state_per_sequence"]
        what = (f"in-place TTT on layers {fw['ttt_layers']}, chunk {fw['chunk_size']}, lr {fw['lr']}"
                if fw["kind"] == "inplace_ttt" else f"FWL head, size {fw['head_size']} (hidden {fw['head_hidden']})")
        rows += [("fast weights", what),
                 ("fast-weight state", f"{st['floats']:,} floats = {_human_bytes(st['bytes'])} per sequence")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@click.command("inspect")
@click.argument("path", type=str)
@click.option("--config", "config_path", type=str, default=None,
              help="config.json to use (for a bare .safetensors file without one beside it).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--allow-unexpected", is_flag=True, help="Ignore tensors the model does not use.")
def inspect_cmd(path, config_path, as_json, allow_unexpected):
    """Describe the checkpoint at PATH (HF folder, .safetensors or .gguf) from its headers only."""
    from ..describe import describe

    info = describe(path, config_path=config_path, allow_unexpected=allow_unexpected)
    click.echo(strict_json(info, indent=2) if as_json else format_description(info))


COMMANDS = [inspect_cmd]
