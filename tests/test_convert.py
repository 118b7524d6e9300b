"""add-fwl / mark-fast through the real CLI: originals byte-identical, converted == base, the config and
manifest, single-file sources, and save_model round trips."""
import json
import os

import pytest
import torch
from safetensors import safe_open

import fwconvert
from fwconvert.config import TOLERANCES, FWLConfig, InPlaceTTTConfig
from fwconvert.convert import converted_config, raw_config_from_model_config, save_model
from fwconvert.families import parse_config
from fwconvert.modeling import attach_fast_weights, build_model, load_tensors
from tiny import make_hf_model, rel_err, save_checkpoint

TOL = TOLERANCES["convert_vs_base_fp32"].rel


def run_cli(capsys, *args):
    from fwconvert.cli.main import main

    capsys.readouterr()  # drop what fixtures printed (transformers' progress bars)
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def tensors_of(folder):
    """{name: (dtype, raw bytes)} of every tensor in a folder's safetensors files."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as h:
                for n in h.keys():
                    t = h.get_tensor(n)
                    out[n] = (t.dtype, t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


CASES = {
    "add-fwl": (["add-fwl"], lambda cfg: {"fwl_head.fc1.weight", "fwl_head.fc1.bias", "fwl_head.fc2.weight",
                                           "fwl_head.fc2.bias", "fwl_head.norm.weight", "fwl_head.norm.bias",
                                           "fwl_head.step_sizes"}),
    "mark-fast": (["mark-fast", "--layers", "all", "--chunk-size", "8"],
                  lambda cfg: {f"model.layers.{i}.mlp.{n}.weight" for i in range(2) for n in ("ttt_conv", "ttt_proj")}),
}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("case", list(CASES))
def test_convert_keeps_originals_and_equals_base(tmp_path, capsys, family, case):
    hf = make_hf_model(family)
    src = save_checkpoint(hf, str(tmp_path / "src"))
    args, new_keys = CASES[case]
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, *args, src, "-o", out)
    assert code == 0, err
    assert stdout.strip() == str(out)
    before, after = tensors_of(src), tensors_of(out)
    assert set(after) - set(before) == new_keys(None)
    assert all(after[n] == before[n] for n in before)  # dtype and every byte
    base, conv = fwconvert.load(src), fwconvert.load(out)
    assert conv.fast_weights is not None
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(conv(ids), base(ids)) <= TOL
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "fwconvert" and cfg["base_model_type"] == family
    assert cfg["architectures"] == ["FwconvertForCausalLM"]
    man = json.loads((out / "MANIFEST.json").read_text())
    assert set(man["files"]) == set(os.listdir(out)) - {"MANIFEST.json"}
    assert man["input_fingerprint"] and man["flags"]["command"] == case


def test_mark_fast_config_has_official_ttt_fields(tmp_path, capsys):
    src = save_checkpoint(make_hf_model("llama", num_hidden_layers=4), str(tmp_path / "src"))
    code, _, err = run_cli(capsys, "mark-fast", src, "-o", tmp_path / "o", "--layers", "every:2", "--chunk-size", "16",
                           "--lr", "0.5", "--target", "input_embed")
    assert code == 0, err
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert (cfg["ttt_mode"], cfg["ttt_layers"], cfg["ttt_proj"], cfg["ttt_lr"], cfg["ttt_chunk"], cfg["ttt_target"]) == \
        (True, [0, 2], True, 0.5, 16, "input_embed")
    assert cfg["fast_weights"]["kind"] == "inplace_ttt" and cfg["fast_weights"]["layers"] == [0, 2]
    m = fwconvert.load(tmp_path / "o")
    assert m.fast_weights == InPlaceTTTConfig(layers=(0, 2), chunk_size=16, lr=0.5, target="input_embed")
    assert torch.count_nonzero(m.model.layers[0].mlp.ttt_conv.weight) == 0  # conv zero: marked == base
    p = m.model.layers[2].mlp.ttt_proj.weight
    assert torch.count_nonzero(p - torch.diag(torch.diagonal(p))) == 0 and torch.count_nonzero(torch.diagonal(p)) > 0


def test_bf16_source_keeps_dtype_and_new_tensors_follow_it(tmp_path, capsys):
    hf = make_hf_model("qwen3").to(torch.bfloat16)
    src = save_checkpoint(hf, str(tmp_path / "src"))
    code, _, err = run_cli(capsys, "add-fwl", src, "-o", tmp_path / "o")
    assert code == 0, err
    before, after = tensors_of(src), tensors_of(tmp_path / "o")
    assert all(after[n] == before[n] for n in before)
    assert {dt for dt, _ in after.values()} == {torch.bfloat16}


def test_single_file_source_writes_sibling_folder(tmp_path, capsys):
    hf = make_hf_model("llama")
    folder = tmp_path / "ckpt"
    hf.save_pretrained(str(folder))  # one model.safetensors + config.json
    assert (folder / "model.safetensors").exists()
    code, stdout, err = run_cli(capsys, "add-fwl", folder / "model.safetensors")
    assert code == 0, err
    out = folder / "model-fwl"
    assert stdout.strip() == str(out) and out.is_dir()
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(fwconvert.load(out)(ids), fwconvert.load(folder)(ids)) <= TOL
    code, stdout, err = run_cli(capsys, "mark-fast", folder, "--layers", "0", "--chunk-size", "8")
    assert code == 0, err
    assert stdout.strip() == str(tmp_path / "ckpt-ttt")


def test_tokenizer_files_are_copied(tmp_path, capsys):
    src = save_checkpoint(make_hf_model("llama"), str(tmp_path / "src"))
    tok = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "a"}}
    (tmp_path / "src" / "tokenizer.json").write_text(json.dumps(tok))
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    code, _, err = run_cli(capsys, "add-fwl", src, "-o", tmp_path / "o")
    assert code == 0, err
    assert (tmp_path / "o" / "tokenizer.json").read_text() == (tmp_path / "src" / "tokenizer.json").read_text()
    man = json.loads((tmp_path / "o" / "MANIFEST.json").read_text())
    assert "tokenizer.json" in man["files"]


def test_seed_changes_only_new_tensors(tmp_path, capsys):
    src = save_checkpoint(make_hf_model("llama"), str(tmp_path / "src"))
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert run_cli(capsys, "add-fwl", src, "-o", tmp_path / name, "--seed", seed)[0] == 0
    a, b, c = (tensors_of(tmp_path / n) for n in "abc")
    assert a == b and a["fwl_head.fc1.weight"] != c["fwl_head.fc1.weight"]
    assert (tmp_path / "a" / "MANIFEST.json").read_text() == (tmp_path / "b" / "MANIFEST.json").read_text()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_save_model_round_trip_with_nontrivial_fast_weights(tmp_path, family):
    hf = make_hf_model(family)
    cfg = parse_config(hf.config.to_dict(), "c")
    g = torch.Generator().manual_seed(5)
    for fw in (FWLConfig(size=64, chunk_size=4), InPlaceTTTConfig(layers=(1,), chunk_size=8, lr=0.7)):
        m = load_tensors(build_model(cfg), hf.state_dict().items())
        attach_fast_weights(m, fw)  # new modules on cpu with torch's default init
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "fwl_head" in n or "ttt_" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        out = save_model(m, tmp_path / fw.kind, extra_manifest={"calibration": {"steps": 3}})
        back = fwconvert.load(out)
        ids = torch.randint(0, 256, (2, 21), generator=g)
        with torch.no_grad():
            ref = m(ids)
            assert rel_err(back(ids), ref) <= TOL and rel_err(ref, hf(ids).logits) > 1e-3  # fast weights matter
        assert json.loads((tmp_path / fw.kind / "MANIFEST.json").read_text())["calibration"] == {"steps": 3}
        assert ("lm_head.weight" in tensors_of(out)) == (not cfg.tie_word_embeddings)


def test_save_model_refuses_nonfinite_weights(tmp_path):
    from fwconvert.errors import NumericError

    hf = make_hf_model("llama")
    m = load_tensors(build_model(parse_config(hf.config.to_dict(), "c")), hf.state_dict().items())
    with torch.no_grad():
        m.model.norm.weight[3] = float("nan")
    with pytest.raises(NumericError, match="model.norm.weight.*1 non-finite"):
        save_model(m, tmp_path / "o")
    assert os.listdir(tmp_path) == []


def test_raw_config_fallback_parses_back(family):
    hf = make_hf_model(family)
    cfg = parse_config(hf.config.to_dict(), "c")
    raw = raw_config_from_model_config(cfg)
    again = parse_config(converted_config(raw, cfg.family, None), "again")
    assert again.to_dict() == cfg.to_dict()
