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
