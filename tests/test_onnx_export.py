"""Base-model fp32 export (tiny llama from a checkpoint through the CLI, tiny qwen3 from a DecoderLM) ->
onnxruntime CPU -> verify over 16 chained chunks; C = 1 and P = 0; batch > 1; the graph's form; --force."""
import json
import os

import numpy as np
import onnx
import pytest
import torch

from exporters.onnx.export import export_onnx
from exporters.runtime.session import ChunkSession
from exporters.verify import verify
from fwconvert.config import TOLERANCES
from test_onnx_common import cli as _cli, step_in_pieces, tiny_model
from tiny import make_hf_model, rel_err, save_checkpoint

TOL = TOLERANCES["ort_fp32_vs_torch_fp32"].rel


def _write_char_tokenizer(path):
    """A 256-entry word-level tokenizer over single characters (a-z, space, ...) for --text tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(i): i for i in range(256)}
    vocab["[UNK]"] = vocab.pop(chr(0))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.save(path)


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    """llama exported from a saved checkpoint through the CLI (external data forced, to exercise it)."""
    root = tmp_path_factory.mktemp("llama")
    src = save_checkpoint(make_hf_model("llama"), str(root / "src"))
    _write_char_tokenizer(os.path.join(src, "tokenizer.json"))
    out = str(root / "onnx")
    export_onnx(src, out, chunk_size=4, external_data=True)
    return src, out


@pytest.fixture(scope="module")
def qwen3_export(tmp_path_factory):
    model = tiny_model("qwen3")
    out = export_onnx(model, str(tmp_path_factory.mktemp("qwen3") / "onnx"), chunk_size=5)
    return model, out


def test_verify_llama_16_chunks_cli(llama_export, capsys):
    src, out = llama_export
    code, stdout, err = _cli(["verify", out, "--chunks", "16", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["passed"] and rep["chunks"] == 16 and rep["worst"]["rel"] <= TOL
    names = {r["name"] for r in rep["rows"]}
    assert {"logits", "position", "past_key_values.1.value"} <= names
    assert os.path.isfile(os.path.join(out, "model.onnx.data"))


def test_verify_qwen3_16_chunks_batch2(qwen3_export):
    model, out = qwen3_export
    rep = verify(out, against=model, chunks=16, batch=2)
    assert rep.passed and rep.chunks == 16
    last = [r for r in rep.rows if r.chunk == 15]
    assert all(r.rel <= TOL for r in last) and last[0].greedy == 1.0


@torch.no_grad()
def test_chunk_one_and_empty_past_any_chunking(qwen3_export):
    model, out = qwen3_export
    s = ChunkSession(out, provider="cpu")
    ids = torch.randint(0, 256, (3, 23), generator=torch.Generator().manual_seed(5))
    ref = model(ids).numpy()
    for pieces in ([1] * 23, [2, 1, 7, 1, 12], [23]):
        got, st = step_in_pieces(s, ids, pieces)
        assert rel_err(torch.from_numpy(got), torch.from_numpy(ref)) <= TOL
        assert st.position().tolist() == [23, 23, 23]
        assert st.to_numpy()["past_key_values.0.key"].shape == (3, 2, 23, 24)


def test_graph_form_and_manifest(llama_export):
    _, out = llama_export
    m = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    assert m.ir_version <= 13
    assert {(o.domain or "ai.onnx"): o.version for o in m.opset_import}["ai.onnx"] in range(18, 24)
    assert not {n.op_type for n in m.graph.node} & {"Loop", "Scan", "If"}
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                assert e.value == "model.onnx.data"
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert dims["input_ids"] == ["batch", "chunk"]
    assert dims["past_key_values.0.key"] == ["batch", 2, "past", 16]
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert man["feeds"]["present.1.key"] == "past_key_values.1.key"
    assert man["feeds"]["next_position"] == "position"
    assert man["versions"]["ir_version"] == m.ir_version and man["attention"] == "full"
    assert man["source"].endswith("src") and man["source_fingerprint"]
    assert man["tokenizer_files"] == ["tokenizer.json"]
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_graph_uses_fused_ort_attention_and_norms(llama_export, qwen3_export, tmp_path):
    """Full-attention exports attend with ONNX's own Attention (one per layer; tests/test_causal_attention.py checks
    its form), window exports with com.microsoft.MultiHeadAttention (fp32 softmax in fp16 graphs, fewer kernels);
    residual+RMSNorm becomes SkipSimplifiedLayerNormalization; no ONNX-domain contrib op is left (the onnx checker
    would reject it). qwen3's per-head q/k norms stay standard ops."""
    windowed = {f: export_onnx(tiny_model(f, window=6), str(tmp_path / f), chunk_size=4, attention="window", window=6)
                for f in ("llama", "qwen3")}
    for out, attention, layers in ((llama_export[1], "Attention", 2), (qwen3_export[1], "Attention", 2),
                                   (windowed["llama"], "MultiHeadAttention", 2),
                                   (windowed["qwen3"], "MultiHeadAttention", 2)):
        m = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
        ops = [(n.domain or "ai.onnx", n.op_type) for n in m.graph.node]
        assert [op for _, op in ops if op in ("Attention", "MultiHeadAttention")] == [attention] * layers
        assert ops.count(("com.microsoft", "SkipSimplifiedLayerNormalization")) == 2 * layers
        assert not {"Softmax", "SimplifiedLayerNormalization"} & {op for _, op in ops}
        onnx.checker.check_model(os.path.join(out, "model.onnx"), full_check=True)
        if attention != "MultiHeadAttention":
            continue
        # key and value reach the attention as the cache concatenation itself, [B, H_kv, W + C, hd]: no transpose
        # to [B, L, N*hd] and no repeat-KV copy to H heads in between (the query heads of a group are stacked instead)
        made = {o: n for n in m.graph.node for o in n.output}
        heads = [(n.input[1], n.input[2], onnx.helper.get_attribute_value(n.attribute[0]))
                 for n in m.graph.node if n.op_type == "MultiHeadAttention"]
        assert {h for _, _, h in heads} == {2}  # the tiny models' key/value heads (4 query heads)
        for i, (k, v, _) in enumerate(heads):
            assert [(made[x].op_type, made[x].input[0]) for x in (k, v)] == \
                [("Concat", f"past_key_values.{i}.key"), ("Concat", f"past_key_values.{i}.value")]
            readers = {n.op_type for n in m.graph.node if {k, v} & set(n.input)}
            assert readers == {"MultiHeadAttention", "Slice"}, readers  # Slice: the window kept as the next state


def test_export_form_rotates_with_one_matmul_and_the_model_is_left_as_it_was(llama_export, qwen3_export):
    """Exports trace RoPE's rotation as one ±1 matmul (no Neg/Slice/Concat chain), which the graph rewrite then
    fuses with its multiplies and add into one RotaryEmbedding per RoPE (exporters/onnx/rotary_form.py): per layer
    7 MatMuls (q, k, v, o, gate, up, down) where the trace had 9, 2 RotaryEmbeddings (q and k apart) and no Split
    at all (a joint q/k/v projection would need two: graph.py::export_form says why it is not the form). The
    traced model itself is restored afterwards."""
    from fwconvert.modeling.rope import _rotate_half, interleaved_order, interleaved_rotation_matrix

    for out, head in ((llama_export[1], 0), (qwen3_export[1], 1)):  # qwen3's untied output head is a MatMul too
        ops = [n.op_type for n in onnx.load(os.path.join(out, "model.onnx"), load_external_data=False).graph.node]
        assert "Neg" not in ops and "Split" not in ops
        assert ops.count("RotaryEmbedding") == 2 * 2 and ops.count("MatMul") == 7 * 2 + head
    model = qwen3_export[0]
    assert all(m.rope_rotation is None and m.rope_order is None for m in model.modules() if hasattr(m, "rope_order"))
    x, o = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0)), interleaved_order(16)
    assert torch.equal(x[..., o] @ interleaved_rotation_matrix(16), _rotate_half(x)[..., o])


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_export_form_computes_what_the_model_computes(family):
    """The export form (matmul rotation, interleaved head dims) against the module form, float64: the same logits
    and state over two chained chunks (qwen2 has q/k/v biases; qwen3 q/k norms). The keys come out in
    rope.interleaved_order (tests/test_wide_rope.py), and the reordered query/key weights (and qwen3's norm weights)
    are swapped in for the trace and put back (the same Parameter objects and values afterwards)."""
    from exporters.onnx.graph import export_form
    from fwconvert.modeling.rope import interleaved_order

    model = tiny_model(family, "base", seed=3).double()
    before = dict(model.named_parameters())
    values = {n: p.detach().clone() for n, p in before.items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))

    def run():
        st = model.init_state(2)
        outs = []
        for a in (0, 4):
            logits, st = model.step(ids[:, a:a + 4], st)
            outs.append(logits)
        return torch.cat(outs, 1), st

    with torch.no_grad():
        ref, ref_st = run()
        with export_form(model):
            got, got_st = run()
    # RMSNorm takes its statistics in fp32 (as transformers does): qwen3's reordered q/k norms sum in another order
    tol = 1e-6 if family == "qwen3" else 1e-12
    assert rel_err(got, ref) < tol
    order = interleaved_order(model.config.head_dim)
    for k in ref_st:
        want = ref_st[k].double()
        if k.endswith(".key"):
            assert rel_err(got_st[k].double(), want) > 1e-3, k  # the order is really another one
            want = want[..., order]
        assert rel_err(got_st[k].double(), want) < tol, k
    after = dict(model.named_parameters())
    assert all(after[n] is p and torch.equal(p, values[n]) for n, p in before.items())


def test_existing_output_refused_then_force_leaves_no_stale_data(llama_export, capsys):
    src, out = llama_export
    code, _, err = _cli(["export-onnx", src, "-o", out, "--chunk-size", "4"], capsys)
    assert code == 4 and "already exists" in err
    assert os.path.isfile(os.path.join(out, "model.onnx.data"))  # untouched
    code, stdout, err = _cli(["export-onnx", src, "-o", out, "--chunk-size", "3", "--force"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == sorted(["manifest.json", "model.onnx"] + json.load(open(os.path.join(out, "manifest.json")))["tokenizer_files"])
    assert not [n for n in os.listdir(os.path.dirname(out)) if "staging" in n or ".old-" in n]
    code, stdout, err = _cli(["verify", out, "--chunks", "3"], capsys)
    assert code == 0 and "PASS" in stdout, err


@torch.no_grad()
def test_run_cli_losses_perplexity_and_generation(qwen3_export, tmp_path, capsys):
    model, out = qwen3_export
    ids = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(9))
    f = tmp_path / "doc.txt"
    f.write_text(" ".join(map(str, ids[0].tolist())) + "\n")
    code, stdout, err = _cli(["run", out, "--tokens", str(f), "--generate", "4", "--provider", "cpu", "--json"], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    lp = torch.log_softmax(model(ids)[0, :-1].double(), -1)
    want = -lp.gather(-1, ids[0, 1:, None])[:, 0]
    assert np.allclose(res["losses"], want.numpy(), atol=1e-4)
    assert abs(res["perplexity"] - float(want.mean().exp())) <= 1e-4 * res["perplexity"]
    seq = ids
    for _ in range(4):
        seq = torch.cat((seq, model(seq)[:, -1:].argmax(-1)), 1)
    assert res["generated_ids"] == seq[0, 17:].tolist()
    assert "CPU" in res["provider"]
    f.write_text("1 2 x")
    code, _, err = _cli(["run", out, "--tokens", str(f)], capsys)
    assert code == 3 and "whitespace-separated integer" in err


def test_run_cli_text_with_copied_tokenizer(llama_export, tmp_path, capsys):
    _, out = llama_export
    f = tmp_path / "doc.txt"
    f.write_text("hello fast weights")
    code, stdout, err = _cli(["run", out, "--text", str(f), "--generate", "3", "--provider", "cpu", "--json"], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    assert res["tokens"] == len("hello fast weights") and len(res["losses"]) == res["tokens"] - 1
    assert len(res["generated_text"]) >= 1 and res["perplexity"] > 1


def test_verify_cli_on_a_real_document(llama_export, tmp_path, capsys):
    """verify --text compares on the document's tokens (its first CHUNKS chunks of the export's chunk size)."""
    _, out = llama_export  # character tokenizer copied beside the graph (an earlier test may re-export it)
    c = json.load(open(os.path.join(out, "manifest.json")))["chunking"]["chunk_size"]
    doc = tmp_path / "doc.txt"
    doc.write_text("fast weights keep learning from the document being read")
    code, stdout, err = _cli(["verify", out, "--text", str(doc), "--chunks", "2", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["passed"] and rep["chunks"] == 2
    code, stdout, err = _cli(["verify", out, "--text", str(doc), "--chunks", "100", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["chunks"] == -(-len(doc.read_text()) // c)  # the whole document
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3 4 5 6")
    code, stdout, err = _cli(["verify", out, "--tokens", str(ids), "--json"], capsys)
    assert code == 0 and json.loads(stdout)["chunks"] == -(-6 // c)
    code, _, err = _cli(["verify", out, "--text", str(doc), "--batch", "2"], capsys)
    assert code == 2 and "--batch" in err
    code, _, err = _cli(["verify", out, "--text", str(doc), "--tokens", str(ids)], capsys)
    assert code == 2 and "exactly one" in err


@pytest.mark.parametrize("heads,kv", [(6, 2), (4, 4)])
def test_grouped_queries_attend_the_cached_heads_exactly(tmp_path, heads, kv):
    """Window exports (MultiHeadAttention; full exports: tests/test_causal_attention.py): 3 query heads per
    key/value head (SmolLM2's 9/3 grouping) and plain multi-head attention (nothing to group): the exported attention
    reads the H_kv cached heads (num_heads H_kv) and the graph still equals the model over chained chunks."""
    from fwconvert.families import parse_config
    from fwconvert.modeling import build_model, load_tensors

    hf = make_hf_model("llama", hidden_size=48, num_attention_heads=heads, num_key_value_heads=kv)
    model = load_tensors(build_model(parse_config(hf.config.to_dict(), "config"), window=12),
                         hf.state_dict().items()).eval()
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=5, attention="window", window=12)
    m = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    mha = [n for n in m.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == 2
    assert {onnx.helper.get_attribute_value(a) for n in mha for a in n.attribute if a.name == "num_heads"} == {kv}
    rep = verify(out, against=model, chunks=6, batch=2)
    assert rep.passed and rep.worst().rel <= TOL, rep.worst()
    # the grouped query heads stack as a view (exporters/onnx/query_order.py): no 5-D transposes around the attention
    assert _stacking_transposes(m) == 0


def _stacking_transposes(m) -> int:
    """The 5-D Transposes that stack grouped query heads around the attention (attention_forms.grouped_queries)."""
    return sum(1 for n in m.graph.node if n.op_type == "Transpose" for a in n.attribute
               if a.name == "perm" and len(a.ints) == 5)


@pytest.mark.parametrize("family,kind,dtype,stacked_by_view", [
    ("qwen2", "base", "fp32", True),  # a q bias: its entries move with the heads
    ("mistral", "fwl", "fp32", True),
    ("llama", "inplace", "fp16", True),
    ("qwen3", "base", "fp32", True),  # per-head q norms (an RMS norm over hd in standard ops) treat heads alike
    ("qwen3", "fwl", "fp16", True),  # the same with fp16 <-> fp32 casts around the norm
])
def test_query_heads_reordered_in_the_weights_exactly(tmp_path, family, kind, dtype, stacked_by_view):
    """With the query projection's heads reordered (slot r·H_kv + g holds head g·rep + r) and the output
    projection's rows to match, the stacked query is a view of the projection and the graph still equals the
    model: every family's attention path, base / FWL / in-place, fp32 and fp16 (window exports: the full ones
    attend with ONNX's Attention, which groups the heads itself)."""
    from exporters.onnx.query_order import _slot_order

    assert _slot_order(6, 3).tolist() == [0, 3, 1, 4, 2, 5]  # H = 6, H_kv = 2: slots (r, g) hold heads g·3 + r
    model = tiny_model(family, kind, seed=7, window=16)  # window exports attend with MultiHeadAttention
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    out = export_onnx(model, str(tmp_path / "onnx"), chunk_size=8, dtype=dtype, attention="window", window=16)
    m = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "MultiHeadAttention" for n in m.graph.node) == model.config.num_hidden_layers
    assert _stacking_transposes(m) == (0 if stacked_by_view else 2 * model.config.num_hidden_layers)
    rep = verify(out, against=model, chunks=4, batch=2)
    assert rep.passed, rep.worst()
    if dtype == "fp32":
        assert rep.worst().rel <= TOL, rep.worst()


def test_query_reorder_refuses_paths_that_do_not_treat_heads_alike():
    """The walk from the attention's query back to its projection (query_order._trace_back) stops, and the layer
    keeps its transposes, when a value on the way has another reader or an op mixes heads (a Softmax over the
    channels); a plain projection -> Reshape path is accepted with the weight to reorder."""
    import onnx_ir as ir
    from exporters.onnx.ir_nodes import Nodes
    from exporters.onnx.query_order import _trace_back

    def path(mix=None, extra_reader=False):
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["b", "t", 16]))
        new = Nodes()
        w = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([16, 24]),
                     const_value=ir.tensor(np.ones((16, 24), np.float32), name="w"))
        y = new.op("MatMul", x, w)
        y.shape, y.type = ir.Shape(["b", "t", 24]), ir.TensorType(ir.DataType.FLOAT)
        if mix:
            y = new.op(mix, y, axis=-1)
            y.shape, y.type = ir.Shape(["b", "t", 24]), ir.TensorType(ir.DataType.FLOAT)
        q = new.op("Reshape", y, new.const(np.array([0, 0, 3, 8], np.int64)))
        q.shape = ir.Shape(["b", "t", 3, 8])
        q3 = new.op("Reshape", q, new.const(np.array([0, 0, 24], np.int64)))
        q3.shape = ir.Shape(["b", "t", 24])
        outs = [q3] + ([new.op("Relu", y)] if extra_reader else [])
        ir.Graph([x], outs, nodes=new.nodes, initializers=[w], opset_imports={"": 18})
        return q3, w

    q, w = path()
    edits, ok = _trace_back(q, 8)
    assert ok and [(e[0] is w, e[1:]) for e in edits] == [(True, (1, 0, 8))]
    assert _trace_back(*path(extra_reader=True)[:1], 8)[1] is False
    assert _trace_back(*path(mix="Softmax")[:1], 8)[1] is False


def test_rotary_embedding_takes_any_position(qwen3_export):
    """The fused RoPE reads each token's own cos/sin row (no table indexed by position): a chunk at position
    200,000 (far past max_position_embeddings), two documents at different positions, matches PyTorch's step."""
    from exporters.runtime.session import ChunkSession

    model, out = qwen3_export
    s = ChunkSession(out, provider="cpu")
    state = s.new_state(2)
    starts = np.array([200_000, 1_234], dtype=np.int64)
    state.cur["position"].update_inplace(starts)
    tstate = model.init_state(2)
    tstate["position"] = torch.from_numpy(starts)
    ids = np.random.default_rng(3).integers(0, s.manifest.vocab_size, (2, 5))
    got = s.step(ids, state)
    with torch.no_grad():
        want, _ = model.step(torch.from_numpy(ids), tstate)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    at_zero = s.step(ids, s.new_state(2))  # the positions reach the rotation: other positions, other logits
    assert not np.allclose(got, at_zero, atol=1e-3)
