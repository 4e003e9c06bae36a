"""Reading GGUF files: a tiny model written the way llama.cpp's converter writes it, read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pocketlm
from pocketlm.errors import UnsupportedModel

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

_NAMES = {
    "embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to Q and K rows (interleave the two halves)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path, qtype, arch="llama", pre="gpt-2"):
    cfg, tok = model.config, model.tokenizer
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    spec = json.loads(tok.backend.to_str())
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in spec["added_tokens"] if t["special"]}
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_eos_token_id(tok.eos_id)
    w.add_chat_template(tok.chat_template)
    for name, t in model.network.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            module, suffix = rest.rsplit(".", 1)
            gname = f"blk.{i}.{_NAMES[module]}.{suffix}"
        else:
            gname = _NAMES[name]
        a = t.detach().float().contiguous().numpy()
        if gname.endswith("attn_q.weight"):
            a = _llama_cpp_permute(a, cfg.n_heads)
        elif gname.endswith("attn_k.weight"):
            a = _llama_cpp_permute(a, cfg.n_kv_heads)
        kind = qtype if a.ndim == 2 else Q.F32  # norms stay F32, as llama.cpp keeps them
        w.add_tensor(gname, gguf.quants.quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_f32_gguf_reads_back_exactly(tmp_path, tiny_model):
    path = write_gguf(tiny_model, tmp_path / "tiny-f32.gguf", Q.F32)
    m = pocketlm.load(path)
    ids = tiny_model.encode("the cat sat in the hat")
    assert ids == m.encode("the cat sat in the hat")
    torch.testing.assert_close(m.logits(ids), tiny_model.logits(ids), atol=1e-5, rtol=1e-5)
    assert m.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == \
        tiny_model.tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_quantized_gguf_tensors_are_dequantized_in_the_right_order(tmp_path, tiny_model, qtype):
    path = write_gguf(tiny_model, tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    m = pocketlm.load(path, dtype=torch.float32)  # the dequantized path (load keeps GGUF packed)
    for name, ours in m.network.state_dict().items():
        original = tiny_model.network.state_dict()[name].numpy()
        kind = qtype if original.ndim == 2 else Q.F32
        expected = gguf.quants.dequantize(gguf.quants.quantize(original, kind), kind)
        # the Q/K rows were interleaved on the way in and must come back un-interleaved:
        # exact equality with quantize->dequantize of the original proves the order
        np.testing.assert_array_equal(ours.numpy(), expected.reshape(original.shape), err_msg=name)


def test_other_architecture_is_refused_by_name(tmp_path, tiny_model):
    path = write_gguf(tiny_model, tmp_path / "gpt2.gguf", Q.F32, arch="gpt2")
    with pytest.raises(UnsupportedModel, match="'gpt2' is not supported"):
        pocketlm.load(path)


def test_unknown_pre_tokenizer_in_a_gguf_is_refused(tmp_path, tiny_model):
    path = write_gguf(tiny_model, tmp_path / "odd.gguf", Q.F32, pre="some-new-pre")
    with pytest.raises(UnsupportedModel, match="some-new-pre"):
        pocketlm.load(path)


def test_tensor_type_the_reader_cannot_dequantize_is_named(tmp_path, tiny_model, monkeypatch):
    path = write_gguf(tiny_model, tmp_path / "tiny.gguf", Q.Q8_0)

    def refuse(data, qtype):
        raise NotImplementedError(qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(UnsupportedModel, match="stored as Q8_0"):
        pocketlm.load(path, dtype=torch.float32)


def _write_mixed(path):
    """A small file with metadata of many value types and tensors of several storage types."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -3)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -12345)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -7)
    w.add_float32("t.f32", 0.25)
    w.add_bool("t.bool", True)
    w.add_uint64("t.u64", 2**40 + 3)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 1.0 / 3.0)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.ints", [1, -2, 300000])
    w.add_array("t.floats", [0.5, -1.5])
    w.add_token_list(["a", "é", "<|end|>", ""])
    w.add_token_merges(["a b", "é x"])
    rng = np.random.default_rng(0)
    for name, kind, shape in [("f32", Q.F32, (3, 5)), ("norm", Q.F32, (64,)), ("f16", Q.F16, (4, 64)),
                              ("bf16", Q.BF16, (2, 32)), ("q8", Q.Q8_0, (3, 64)), ("q4", Q.Q4_0, (2, 32)),
                              ("q5", Q.Q5_1, (2, 64))]:
        a = rng.standard_normal(shape).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_own_parser_reads_what_the_gguf_package_reads(tmp_path):
    from pocketlm.formats.gguf import GGUFFile

    path = _write_mixed(tmp_path / "mixed.gguf")
    ours, ref = GGUFFile(path), gguf.GGUFReader(str(path))
    want = {k: f.contents() for k, f in ref.fields.items()}
    assert ours.metadata == want
    assert ours.get("t.str") == "héllo ✓" and ours.get("tokenizer.ggml.tokens")[1] == "é"
    assert ours.get("t.u64") == 2**40 + 3 and ours.get("t.bool") is True
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.tensor_type == t.tensor_type
        assert mine.shape.tolist() == t.shape.tolist()
        assert (mine.n_elements, mine.n_bytes, mine.data_offset) == (t.n_elements, t.n_bytes, t.data_offset)
        assert mine.data.dtype == t.data.dtype and mine.data.shape == t.data.shape
        assert np.array_equal(mine.data, t.data)
        assert isinstance(mine.data.base, np.memmap) or isinstance(mine.data, np.memmap)  # no copy
    assert ours.quant_summary() in {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_1"}


@pytest.mark.parametrize("keep", [3, 20, 100, "tensors", -1])
def test_truncated_gguf_is_a_format_error_naming_the_file(tmp_path, keep):
    from pocketlm.errors import FormatError
    from pocketlm.formats.gguf import GGUFFile

    full = _write_mixed(tmp_path / "full.gguf").read_bytes()
    if keep == "tensors":  # cut inside the tensor infos, after all the metadata
        keep = full.index(b"q5") + 1
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[:keep])
    with pytest.raises(FormatError, match=r"cut\.gguf.*(truncated|not a GGUF|ends early|past the end)"):
        GGUFFile(cut)
