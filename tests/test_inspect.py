"""``fwconvert inspect`` / ``describe``: the reported facts, JSON output, converted models' fast weights,
GGUF files, and that no tensor data is ever read."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from badinputs import single_file_model, tiny_config
from fwconvert.cli.main import main
from fwconvert.config import FWLConfig, InPlaceTTTConfig, fast_weights_to_dict
from fwconvert.describe import describe
from fwconvert.families import parse_config

REQUIRED = ("family", "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size", "num_parameters",
            "fast_weights")


def run_cli(capsys, *args):
    capsys.readouterr()  # drop what fixtures printed
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture
def no_data_reads(monkeypatch):
    """Make any tensor-data read fail loudly."""
    from fwconvert.checkpoint import gguf_source, safetensors_source

    def boom(*a, **k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(safetensors_source, "_read_tensor", boom)
    monkeypatch.setattr(gguf_source.GGUFWeights, "iter_tensors", boom)
    monkeypatch.setattr(safetensors_source.SafetensorsWeights, "iter_tensors", boom)


def test_json_for_each_family(tiny_ckpt, family, capsys, no_data_reads):
    folder, hf = tiny_ckpt(family)
    rc, out, err = run_cli(capsys, "inspect", folder, "--json")
    assert rc == 0 and err == ""
    info = json.loads(out)
    assert all(k in info for k in REQUIRED)
    c = hf.config
    assert info["family"] == family and info["fast_weights"] is None
    assert (info["num_hidden_layers"], info["hidden_size"], info["intermediate_size"], info["vocab_size"]) == \
        (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size)
    assert (info["num_attention_heads"], info["num_key_value_heads"]) == (4, 2)
    assert info["head_dim"] == (24 if family == "qwen3" else 16)
    assert info["num_parameters"] == sum(p.numel() for p in hf.parameters())  # tied weights counted once
    assert info["dtypes"] == {"F32": len(hf.state_dict()) - (1 if c.tie_word_embeddings else 0)}
    assert info["layout"]["kind"] == "hf-folder" and len(info["layout"]["files"]) > 2
    assert info["layout"]["total_bytes"] == sum(os.path.getsize(f["path"]) for f in info["layout"]["files"])
    assert info["sliding_window"] == (24 if family == "mistral" else None)


def test_human_table(tmp_path, capsys, no_data_reads):
    d = single_file_model(tmp_path / "m")
    rc, out, _ = run_cli(capsys, "inspect", d)
    assert rc == 0
    assert "family            llama" in out and "heads / KV heads  4 / 2" in out
    assert "fast weights      none (plain model)" in out
    # 2 x (q 256 + k 128 + v 128 + o 256 + mlp 3*16*24 + norms 32) + embed 512 + lm_head 512 + norm 16
    assert "parameters        4,944 (0.0M)" in out


def _converted(tmp_path, fw):
    """A converted-model folder (config with fast_weights + the extra tensors) built from our own modules."""
    from fwconvert.modeling import build_model

    raw = tiny_config()
    cfg = parse_config(raw, "config")
    model = build_model(cfg, fw, device="cpu")
    sd = {k: torch.zeros_like(v).contiguous() for k, v in model.state_dict().items()}
    d = tmp_path / fw.kind
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    raw.update(model_type="fwconvert", base_model_type="llama", fast_weights=fast_weights_to_dict(fw))
    (d / "config.json").write_text(json.dumps(raw))
    return str(d), cfg


def test_inplace_ttt_model(tmp_path, no_data_reads):
    fw = InPlaceTTTConfig(layers=(0, 1), chunk_size=8)
    d, cfg = _converted(tmp_path, fw)
    info = describe(d)
    f = info["fast_weights"]
    assert f["kind"] == "inplace_ttt" and f["ttt_layers"] == [0, 1] and f["chunk_size"] == 8
    # W_down delta per TTT layer: d x d_ff fp32 (inplace-ttt.md "Inference state")
    assert f["state_per_sequence"]["floats"] >= 2 * cfg.hidden_size * cfg.intermediate_size
    assert f["state_per_sequence"]["bytes"] == 4 * f["state_per_sequence"]["floats"]
    assert info["num_parameters"] > describe_plain_params(tmp_path)


def describe_plain_params(tmp_path):
    return describe(single_file_model(tmp_path / "plain"))["num_parameters"]


def test_fwl_model(tmp_path, capsys, no_data_reads):
    fw = FWLConfig(size=16)
    d, cfg = _converted(tmp_path, fw)
    rc, out, _ = run_cli(capsys, "inspect", d, "--json")
    f = json.loads(out)["fast_weights"]
    assert rc == 0 and f["kind"] == "fwl" and f["head_size"] == 16 and f["head_hidden"] == 64
    assert f["state_per_sequence"]["floats"] >= 16 * 64 + 64 * 16  # D*H + H*S (fast-weight-layers.md)
    rc, out, _ = run_cli(capsys, "inspect", d)
    assert "FWL head, size 16 (hidden 64)" in out and "floats" in out


def test_gguf_inspect(tmp_path, capsys, no_data_reads):
    from test_gguf import write_gguf
    from tiny import make_hf_model

    hf = make_hf_model("llama", rope_scaling=None, tie_word_embeddings=True)
    path = write_gguf(hf, str(tmp_path / "m.gguf"), tied=True)
    rc, out, _ = run_cli(capsys, "inspect", path, "--json")
    info = json.loads(out)
    assert rc == 0 and info["layout"]["kind"] == "gguf" and info["tie_word_embeddings"] is True
    assert info["num_parameters"] == sum(p.numel() for p in hf.parameters())
    assert info["dtypes"] == {"F32": len(hf.state_dict()) - 1}
    assert info["layout"]["tokenizer_embedded"] is True  # write_gguf adds a token list


def test_config_option_for_bare_file(tmp_path, capsys):
    d = single_file_model(tmp_path / "m")
    os.rename(os.path.join(d, "config.json"), tmp_path / "c.json")
    rc, _, err = run_cli(capsys, "inspect", os.path.join(d, "model.safetensors"))
    assert rc == 3 and "--config" in err
    rc, out, _ = run_cli(capsys, "inspect", os.path.join(d, "model.safetensors"), "--config", str(tmp_path / "c.json"), "--json")
    assert rc == 0 and json.loads(out)["config_source"] == str(tmp_path / "c.json")


@pytest.mark.timeout(60)
def test_subprocess_json(tmp_path):
    d = single_file_model(tmp_path / "m")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "fwconvert", "inspect", d, "--json"], capture_output=True, text=True,
                       timeout=50, env=env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["family"] == "llama" and info["fast_weights"] is None


def test_inspect_names_an_onnx_export(tmp_path, capsys):
    """An export-onnx folder handed to a checkpoint command is named as such, not 'no model weights found'."""
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    (tmp_path / "manifest.json").write_text("{}")
    code, _, err = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 3 and "an ONNX export (export-onnx), not a checkpoint" in err
