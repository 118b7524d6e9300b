"""Reading valid checkpoints: sharded folders per family, single files (sibling config, --config, config
inferred from shapes), the HF cache layout, streaming, fingerprints; and the tokenizer loader."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file

import fwconvert
from badinputs import single_file_model, st_bytes, tiny_config, tiny_tensors, write, write_config
from fwconvert.checkpoint import open_checkpoint
from fwconvert.config import TOLERANCES
from fwconvert.errors import InputError
from tiny import make_hf_model, rel_err, save_checkpoint

TOL = TOLERANCES["torch_fp32_vs_transformers"].rel


def ids(n=40, seed=0):
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_parity(model, hf):
    x = ids()
    assert rel_err(model(x), hf(x).logits) <= TOL


@torch.no_grad()
def test_sharded_folder_loads_and_matches_transformers(tiny_ckpt, family):
    folder, hf = tiny_ckpt(family)
    ck = open_checkpoint(folder)
    assert ck.kind == "hf-folder" and len(ck.data_files) > 2 and ck.config.family == family
    assert_parity(fwconvert.load(folder), hf)


def _single_file(tmp_path, hf, name="weights.safetensors"):
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}
    path = str(tmp_path / name)
    save_file(sd, path)
    return path


@torch.no_grad()
def test_single_file_with_sibling_config(tmp_path):
    hf = make_hf_model("qwen2")
    path = _single_file(tmp_path, hf)
    hf.config.to_json_file(str(tmp_path / "config.json"))
    ck = open_checkpoint(path)
    assert ck.kind == "safetensors" and ck.config.family == "qwen2" and ck.config_source.endswith("config.json")
    assert_parity(fwconvert.load(path), hf)


@torch.no_grad()
def test_single_file_with_explicit_config(tmp_path):
    hf = make_hf_model("mistral")
    (tmp_path / "w").mkdir()
    path = _single_file(tmp_path / "w", hf)
    hf.config.to_json_file(str(tmp_path / "cfg.json"))
    with pytest.raises(InputError, match=r"num_attention_heads, num_key_value_heads and model_type cannot be read.*--config"):
        open_checkpoint(path)
    assert_parity(fwconvert.load(path, config=str(tmp_path / "cfg.json")), hf)


def test_inferred_config_error_names_what_is_known(tmp_path):
    hf = make_hf_model("llama", tie_word_embeddings=False, rope_scaling=None)
    path = _single_file(tmp_path, hf)
    with pytest.raises(InputError) as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert "vocab_size=256" in msg and "hidden_size=64" in msg and "num_hidden_layers=2" in msg
    assert "intermediate_size=96" in msg and "q_proj has 64 rows, k_proj 32" in msg


@torch.no_grad()
def test_inferred_config_for_qwen3_shapes(tmp_path):
    """Per-head q/k norms make head counts unambiguous: the config is inferred and the logits match."""
    hf = make_hf_model("qwen3", max_position_embeddings=2048)
    path = _single_file(tmp_path, hf)
    ck = open_checkpoint(path)
    c = ck.config
    assert (c.family, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == ("qwen3", 4, 2, 24)
    assert "inferred from tensor shapes" in ck.config_source
    assert_parity(fwconvert.load(path), hf)


@torch.no_grad()
def test_hf_cache_snapshot_layout(tmp_path):
    """snapshots/<rev>/<file> -> ../../blobs/<hash> must load (reliability test 14)."""
    folder, hf = str(tmp_path / "src"), make_hf_model("llama")
    save_checkpoint(hf, folder)
    repo = tmp_path / "models--x--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, name in enumerate(sorted(os.listdir(folder))):
        shutil.copy(os.path.join(folder, name), blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snap / name)
    assert_parity(fwconvert.load(str(snap)), hf)


def test_iter_tensors_streams_exact_bytes(tmp_path):
    hf = make_hf_model("qwen3")
    folder = save_checkpoint(hf, str(tmp_path / "m"))
    ck = open_checkpoint(folder)
    it = ck.iter_tensors()
    assert iter(it) is it  # a generator, not a materialised dict
    ref = {}
    for f in ck.data_files:
        ref.update(load_file(f))
    got = dict(it)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    some = ["model.norm.weight", "model.layers.1.mlp.down_proj.weight"]
    assert sorted(n for n, _ in ck.iter_tensors(names=some)) == sorted(some)
    with pytest.raises(InputError, match="no tensor"):
        list(ck.iter_tensors(names=["nope"]))


@pytest.mark.timeout(120)
def test_streaming_memory_is_one_tensor(tmp_path):
    """16 shards x 16 MiB: iterating (with the finiteness check) raises peak RSS by a few tensors (the loop
    variable keeps the previous one alive while the next is read; allocator slack), never by all 256 MiB, nor by
    half of it. (With 8 shards and a bound of 64 MiB the slack alone measured 67 MiB in one CI run on the 2-core
    host, 2026-12-02: four tensors; so more shards, and a bound with room for that slack.)"""
    import subprocess
    import sys

    from badinputs import st_bytes

    names = {}
    for k in range(16):
        shard = f"s{k}.safetensors"
        write(tmp_path / shard, st_bytes({f"t{k}": np.full((4 << 20,), k, np.float32)}))
        names[f"t{k}"] = shard
    write(tmp_path / "model.safetensors.index.json", json.dumps({"weight_map": names}).encode())
    write_config(tmp_path, tiny_config())  # open_checkpoint reads it; the tensors are not checked against it
    code = ("import sys, torch\n"
            "from fwconvert.checkpoint import open_checkpoint\n"
            "def hwm():  # this process's own peak RSS in KiB (ru_maxrss may inherit the parent's)\n"
            "    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
            "torch.isfinite(torch.ones(8)).all()\n"
            "ck = open_checkpoint(sys.argv[1])\n"
            "r0 = hwm()\n"
            "for n, t in ck.iter_tensors():\n    assert float(t[0]) == int(n[1:])\n"
            "print((hwm() - r0) // 1024)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=100, env=env)
    assert r.returncode == 0, r.stderr
    assert 16 <= int(r.stdout) < 112, f"peak RSS grew by {r.stdout.strip()} MiB for 256 MiB of 16 MiB tensors"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_dtypes_kept(tmp_path, dtype):
    cfg = tiny_config()
    t = {k: torch.from_numpy(v).to(dtype) for k, v in tiny_tensors(cfg).items()}
    write_config(tmp_path, cfg)
    save_file(t, str(tmp_path / "model.safetensors"))
    ck = open_checkpoint(str(tmp_path))
    assert {d for _, d in ck.specs.values()} == {"F16" if dtype == torch.float16 else "BF16"}
    got = dict(ck.iter_tensors())
    assert all(got[k].dtype == dtype and torch.equal(got[k], t[k]) for k in t)


def test_check_tensors_collects_everything(tmp_path):
    d = single_file_model(tmp_path / "m")
    ck = open_checkpoint(d)
    exp = {n: s for n, (s, _) in ck.specs.items()}
    exp["model.layers.0.mlp.down_proj.weight"] = (24, 16)
    exp["new.weight"] = (3,)
    del exp["model.norm.weight"]
    with pytest.raises(InputError) as e:
        ck.check_tensors(exp)
    msg = str(e.value)
    assert "missing tensors (1): new.weight" in msg
    assert "unexpected tensors (1): 'model.norm.weight'" in msg
    assert "'model.layers.0.mlp.down_proj.weight': got [16, 24], expected [24, 16]" in msg
    open_checkpoint(d, allow_unexpected=True).check_tensors({k: v for k, v in exp.items() if k not in
                                                             ("new.weight", "model.layers.0.mlp.down_proj.weight")})


def test_fingerprint_tracks_headers_and_config(tmp_path):
    d = single_file_model(tmp_path / "m")
    fp = open_checkpoint(d).fingerprint()
    assert fp == open_checkpoint(d).fingerprint() and len(fp) == 64
    os.utime(os.path.join(d, "model.safetensors"), (1, 1))
    assert open_checkpoint(d).fingerprint() == fp
    write_config(d, tiny_config(rope_theta=5e5))
    fp2 = open_checkpoint(d).fingerprint()
    assert fp2 != fp
    t = tiny_tensors(tiny_config(), seed=0)
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.float16)
    save_np(t, os.path.join(d, "model.safetensors"))
    assert open_checkpoint(d).fingerprint() not in (fp, fp2)


def test_fingerprint_tracks_sampled_values(tmp_path):
    """Same headers, other values: another fingerprint (the first, middle and last 4 KiB of every tensor are hashed);
    the header-only fingerprint of older manifests stays as it was; a change between the samples goes unseen."""
    from fwconvert.checkpoint.paths import SAMPLE_BLOCK

    cfg = tiny_config(vocab_size=1024)  # embed_tokens: 1024 x 16 fp32 = 64 KiB, more than three sample blocks
    t = tiny_tensors(cfg, seed=0)
    d = single_file_model(tmp_path / "m", cfg, t)
    ck = open_checkpoint(d)
    fp, head = ck.fingerprint(), ck.header_fingerprint()
    assert len(fp) == 64 and fp != head and ck.fingerprint() == fp

    def with_value(name, flat_index, value):
        u = {k: v.copy() for k, v in t.items()}
        u[name].reshape(-1)[flat_index] = value
        write(os.path.join(d, "model.safetensors"), st_bytes(u))  # the same writer as single_file_model's
        c = open_checkpoint(d)
        assert c.header_fingerprint() == head  # same config and headers
        return c.fingerprint()

    emb, n = "model.embed_tokens.weight", t["model.embed_tokens.weight"].size
    assert with_value("model.norm.weight", 3, 7.0) != fp  # a small tensor: all of it is sampled
    assert with_value(emb, n // 2, 7.0) != fp  # middle block
    assert with_value(emb, n - 1, 7.0) != fp  # last block
    assert with_value(emb, SAMPLE_BLOCK // 4 + 10, 7.0) == fp  # between the samples: the documented limit
    assert with_value(emb, 0, t[emb].reshape(-1)[0]) == fp  # the same values again


def test_gguf_fingerprint_tracks_sampled_values(tmp_path):
    pytest.importorskip("gguf")
    from test_gguf import write_gguf

    hf = make_hf_model()
    a = write_gguf(hf, str(tmp_path / "a.gguf"))
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight.mul_(1.5)  # a "fine-tune" of one tensor
    b = write_gguf(hf, str(tmp_path / "b.gguf"))
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    assert ca.header_fingerprint() == cb.header_fingerprint()  # the same metadata and tensor table
    assert ca.fingerprint() != cb.fingerprint()
    assert open_checkpoint(a).fingerprint() == ca.fingerprint()


def test_tokenizer_files_listed(tmp_path):
    d = single_file_model(tmp_path / "m")
    for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "notes.txt"):
        write(os.path.join(d, n), b"{}")
    names = sorted(os.path.basename(p) for p in open_checkpoint(d).tokenizer_files)
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


# -- tokenizer -----------------------------------------------------------------------------------------
def word_tokenizer_json(vocab: dict, added=()) -> str:
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for c, i in added],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}})


def _tok_folder(tmp_path, vocab_size=8, vocab=None, added=(("</s>", 1),)):
    vocab = vocab or {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3, "!": 4}
    d = tmp_path / "tok"
    write_config(d, tiny_config(vocab_size=vocab_size))
    write(d / "tokenizer.json", word_tokenizer_json(vocab, added).encode())
    write(d / "tokenizer_config.json", json.dumps({"eos_token": "</s>"}).encode())
    return d


def test_tokenizer_json_roundtrip(tmp_path):
    from fwconvert.tokenizer import load_tokenizer

    tok = load_tokenizer(str(_tok_folder(tmp_path)))
    assert tok.encode("hello world !") == [2, 3, 4]
    assert tok.decode([2, 3]) == "hello world"
    assert tok.eos_token_id == 1


@pytest.mark.parametrize("vocab,added,vocab_size,needle", [
    ({"<unk>": 0, "a": 2 ** 31 - 1}, (), 8, "id 2147483647 outside the range [0, 8)"),
    ({"<unk>": 0, "a": 1, "b": 1}, (), 8, "id 1 is used by two tokens"),
    ({f"w{i}": i for i in range(9)}, (), 8, "9 tokens but the model's vocab_size is 8"),
    ({"<unk>": 0}, (("</s>", -1),), 8, "id -1 outside the range"),
])
def test_tokenizer_bad_ids(tmp_path, vocab, added, vocab_size, needle):
    from fwconvert.tokenizer import load_tokenizer

    d = _tok_folder(tmp_path, vocab_size, vocab, added)
    with pytest.raises(InputError, match="tokenizer.json") as e:
        load_tokenizer(str(d))
    assert needle in str(e.value)


def test_tokenizer_size_cap_before_parsing(tmp_path):
    from fwconvert.tokenizer import load_tokenizer

    d = _tok_folder(tmp_path)
    with open(d / "tokenizer.json", "wb") as f:  # 2 GiB sparse file: parsing it would exhaust memory
        f.truncate(2 << 30)
    with pytest.raises(InputError, match="larger than the 67108864-byte cap"):
        load_tokenizer(str(d))


def test_tokenizer_over_the_cap_costs_no_memory(tmp_path):
    """The 2 GiB tokenizer.json is refused from its size alone: the refusing process's peak RSS (VmHWM, its own)
    stays below the 64 MiB cap, interpreter included."""
    import subprocess
    import sys

    d = _tok_folder(tmp_path)
    with open(d / "tokenizer.json", "wb") as f:
        f.truncate(2 << 30)
    code = ("import sys\nfrom fwconvert.tokenizer import TOKENIZER_JSON_CAP, load_tokenizer\n"
            "from fwconvert.errors import InputError\ntry:\n    load_tokenizer(sys.argv[1])\n"
            "except InputError:\n    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
            "    print(int(hwm[0].split()[1]) * 1024, TOKENIZER_JSON_CAP)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=60, env=env)
    peak, cap = map(int, r.stdout.split())
    assert peak < cap, (peak, cap, r.stderr)


def test_no_tokenizer(tmp_path):
    from fwconvert.tokenizer import load_tokenizer

    d = single_file_model(tmp_path / "m")
    with pytest.raises(InputError, match="no tokenizer found"):
        load_tokenizer(d)
