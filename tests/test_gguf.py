"""GGUF import: name map and q/k un-permutation on a small synthetic GGUF, and SmolLM2 vs transformers.

The reference is transformers' own GGUF loading (``from_pretrained(dir, gguf_file=...)`` when
accelerate is installed, else the same ``load_gguf_checkpoint`` function it calls).
"""
import os

import numpy as np
import pytest
import torch

import fwconvert
from fwconvert.checkpoint import open_checkpoint
from fwconvert.checkpoint.gguf_source import hf_name, unpermute_rows
from fwconvert.config import TOLERANCES
from fwconvert.errors import InputError
from tiny import make_hf_model, rel_err

gguf = pytest.importorskip("gguf")

TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning the Universe was created. "
        "This has made a lot of people very angry and been widely regarded as a bad move. Far out in "
        "the uncharted backwaters of the unfashionable end of the western spiral arm of the Galaxy lies a "
        "small unregarded yellow sun. Orbiting this at a distance of roughly ninety-two million miles is an "
        "utterly insignificant little blue green planet.")


def permute_rows(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (forward direction), written independently."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def to_gguf_name(name):
    stem, suffix = name.rsplit(".", 1)
    if stem in GGUF_NAMES:
        return f"{GGUF_NAMES[stem]}.{suffix}"
    _, _, i, rest = stem.split(".", 3)
    return f"blk.{i}.{BLOCK[rest]}.{suffix}"


def write_gguf(hf, path, tied=False, arch="llama"):
    """A GGUF (F32 tensors) from a transformers model; for llama, q/k rows permuted the way llama.cpp does."""
    c = hf.config
    w = gguf.GGUFWriter(path, arch)
    if arch == "qwen3":
        w.add_key_length(c.head_dim)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    for name, t in hf.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        a = t.detach().numpy().astype(np.float32)
        if arch != "llama":
            pass
        elif ".q_proj." in name:
            a = permute_rows(a, c.num_attention_heads)
        elif ".k_proj." in name:
            a = permute_rows(a, c.num_key_value_heads)
        w.add_tensor(to_gguf_name(name), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        assert np.array_equal(unpermute_rows(permute_rows(w, heads), heads), w)
    assert not np.array_equal(permute_rows(w, 8), w)


def test_name_map():
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("blk.3.attn_k_norm.weight") == "model.layers.3.self_attn.k_norm.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("blk.0.weird.weight") == "blk.0.weird.weight"


@torch.no_grad()
@pytest.mark.parametrize("tied", [False, True])
def test_synthetic_gguf_matches_source_model(tmp_path, tied):
    hf = make_hf_model("llama", rope_scaling=None, tie_word_embeddings=tied, num_attention_heads=4,
                       num_key_value_heads=2)
    path = write_gguf(hf, str(tmp_path / "m.gguf"), tied=tied)
    ck = open_checkpoint(path)
    assert ck.kind == "gguf" and ck.config.tie_word_embeddings == tied
    assert (ck.config.num_attention_heads, ck.config.num_key_value_heads, ck.config.vocab_size) == (4, 2, 256)
    assert ck.specs["model.layers.0.self_attn.k_proj.weight"] == ((32, 64), "F32")
    got = dict(ck.iter_tensors())
    for name, t in hf.state_dict().items():
        if not (tied and name == "lm_head.weight"):
            assert torch.equal(got[name], t), name
    m = fwconvert.load(str(tmp_path))  # a folder holding exactly one .gguf
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    assert rel_err(m(ids), hf(ids).logits) <= TOLERANCES["torch_fp32_vs_transformers"].rel


@torch.no_grad()
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_synthetic_qwen_gguf(tmp_path, arch):
    """qwen2 (q/k/v biases) and qwen3 (q/k norms, head_dim from attention.key_length): no row permutation."""
    hf = make_hf_model(arch, max_position_embeddings=512)
    path = write_gguf(hf, str(tmp_path / "m.gguf"), arch=arch)
    ck = open_checkpoint(path)
    assert ck.config.family == arch and ck.config.head_dim == (24 if arch == "qwen3" else 16)
    m = fwconvert.load(path)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    assert rel_err(m(ids), hf(ids).logits) <= TOLERANCES["torch_fp32_vs_transformers"].rel


@pytest.mark.parametrize("key,value,needle", [
    ("llama.block_count", [1, 2], "'llama.block_count' must hold a single value"),
    ("llama.embedding_length", 2 ** 40, "'hidden_size' = 1099511627776 is outside the supported range"),
    ("llama.attention.head_count", "four", "'num_attention_heads' must be an integer"),
])
def test_bad_gguf_metadata(tmp_path, key, value, needle):
    w = gguf.GGUFWriter(str(tmp_path / "b.gguf"), "llama")
    good = {"llama.block_count": 2, "llama.embedding_length": 8, "llama.attention.head_count": 2,
            "llama.feed_forward_length": 8, key: value}
    for k, v in good.items():
        vtype = gguf.GGUFValueType.UINT64 if isinstance(v, int) else gguf.GGUFValueType.get_type(v)
        w.add_key_value(k, v, vtype, sub_type=gguf.GGUFValueType.UINT32)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match="b.gguf") as e:
        open_checkpoint(str(tmp_path / "b.gguf"))
    assert needle in str(e.value)


def test_unsupported_gguf_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "b.gguf"), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match=r"architecture 'bert' is not supported \(supported: llama, qwen2, qwen3\)"):
        open_checkpoint(str(tmp_path / "b.gguf"))


def test_truncated_gguf_is_input_error(tmp_path):
    """A GGUF cut short in its tensor data names the first tensor past the end; one cut in its header says so."""
    hf = make_hf_model("llama", rope_scaling=None)
    data = open(write_gguf(hf, str(tmp_path / "m.gguf")), "rb").read()
    for cut, words in ((1000, r"truncated: the file ends at byte \d+, but tensor '[a-z_.0-9]+' needs bytes"),
                       (len(data) - 2000, r"its header \(metadata and tensor table\) is corrupt or cut short")):
        (tmp_path / "t.gguf").write_bytes(data[:-cut])
        with pytest.raises(InputError, match="t.gguf: not a valid GGUF file \\(" + words):
            open_checkpoint(str(tmp_path / "t.gguf"))


def test_nonfinite_gguf_tensor(tmp_path):
    from fwconvert.errors import NumericError

    hf = make_hf_model("llama", rope_scaling=None)
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    path = write_gguf(hf, str(tmp_path / "m.gguf"))
    with pytest.raises(NumericError, match=r"'model.layers.1.mlp.up_proj.weight' has 1 non-finite"):
        fwconvert.load(path)


@pytest.mark.parametrize("data", [b"", b"GGUF", b"GGUF\x03\x00\x00\x00" + b"\xff" * 64, b"not a gguf file at all"])
def test_corrupt_gguf_is_input_error(tmp_path, data):
    p = tmp_path / "x.gguf"
    p.write_bytes(data)
    with pytest.raises(InputError, match="x.gguf"):
        open_checkpoint(str(p))


def transformers_gguf_model(path):
    """transformers' own GGUF loading of ``path`` (fp32, eager attention)."""
    import transformers

    folder, name = os.path.split(path)
    try:
        import accelerate  # noqa: F401 - from_pretrained needs it for GGUF
    except ImportError:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = transformers.AutoConfig.for_model(**load_gguf_checkpoint(path)["config"])
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        sd = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
        res = model.load_state_dict(sd, strict=False)
        assert not res.unexpected_keys and set(res.missing_keys) <= {"lm_head.weight"}
        model.tie_weights()
        return model.float().eval()
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.mark.smollm
@pytest.mark.timeout(900)
@torch.no_grad()
def test_smollm_gguf_logits_match_transformers(smollm_gguf, tmp_path):
    from fwconvert.tokenizer import export_tokenizer, load_tokenizer

    tok = load_tokenizer(smollm_gguf)
    ids = torch.tensor([tok.encode(TEXT)[:64]])
    assert ids.shape[1] == 64 and tok.eos_token_id == 2
    files = export_tokenizer(smollm_gguf, str(tmp_path))
    assert str(tmp_path / "tokenizer.json") in files
    exported = load_tokenizer(str(tmp_path), vocab_size=49152)
    assert exported.encode(TEXT) == tok.encode(TEXT) and exported.decode(ids[0]) == tok.decode(ids[0])
    ours = fwconvert.load(smollm_gguf)(ids)
    ref = transformers_gguf_model(smollm_gguf)(ids).logits
    err = rel_err(ours, ref)
    print(f"SmolLM2 GGUF: {ids.shape[1]} tokens, rel err {err:.3e}, max abs {float((ours - ref).abs().max()):.3e}")
    assert err <= TOLERANCES["torch_fp32_vs_transformers"].rel
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
