"""Tiny models for tests: a byte-level tokenizer with a chat template, and a random network.

Built in memory in well under a second, so most tests never touch the real model.
"""

from __future__ import annotations

import numpy as np
import torch

from pocketlm.api import Model
from pocketlm.engine.fastlinear import speed_up
from pocketlm.model.card import Card
from pocketlm.model.config import ModelConfig
from pocketlm.model.tokenizer import Tokenizer
from pocketlm.model.transformer import Transformer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer() -> Tokenizer:
    """Byte-level BPE: 3 specials, the 256 bytes, and a few merges (vocab 3 + 256 + merges)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return Tokenizer(backend, bos_token=None, eos_token="<|im_end|>", chat_template=CHATML)


def tiny_config(**overrides) -> ModelConfig:
    cfg = {"vocab_size": 3 + 256 + 5, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
           "hidden_dim": 128, "max_seq_len": 256, "rope_theta": 10000.0,
           "tie_embeddings": True, "eos_token_id": 2}
    cfg.update(overrides)
    return ModelConfig(**cfg)


def make_tiny_model(seed: int = 0, **overrides) -> Model:
    """A random tiny LLaMA (2 layers, dim 64, GQA 4/2) with the byte tokenizer."""
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    net = Transformer(config)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    # the layout pocketlm.load gives, so save -> load round trips are bit-identical
    return Model(speed_up(net), make_tokenizer(), Card(name="tiny", source="tests"))


# -- one tiny model of each architecture, built with transformers' own classes -------------------
# The reference side of tests/test_architectures.py: the same weights saved as a Hugging Face
# folder (save_pretrained) and written as a GGUF file in llama.cpp's layout.
_COMMON = {"vocab_size": 3 + 256 + 5, "hidden_size": 64, "intermediate_size": 96,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
           "rms_norm_eps": 1e-6, "eos_token_id": 2, "bos_token_id": None}
HF_ARCHS = {
    # Llama 3.2's rope_scaling: with theta 5e5 and head 16 its frequencies fall in all three
    # bands (kept, blended, divided by the factor)
    "llama": ("LlamaForCausalLM", "LlamaConfig", {
        "num_hidden_layers": 2, "head_dim": 16, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {
        "num_hidden_layers": 2, "rope_theta": 1000000.0, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {  # head_dim 24 != 64 / 4: explicit
        "num_hidden_layers": 2, "head_dim": 24, "rope_theta": 1000000.0,
        "tie_word_embeddings": True}),
    # five local layers (window 5, shorter than the tests' sequences) and one global one
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", {
        "num_hidden_layers": 6, "head_dim": 16, "sliding_window": 5, "query_pre_attn_scalar": 16,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "tie_word_embeddings": True,
        "final_logit_softcapping": None, "bos_token_id": 1}),
    # the Gemma fields GGUF files do not carry: another attention scale, a logit cap, and
    # linear RoPE scaling on the global layers (Gemma 3 4B's)
    "gemma3-capped": ("Gemma3ForCausalLM", "Gemma3TextConfig", {
        "num_hidden_layers": 6, "head_dim": 16, "sliding_window": 5, "query_pre_attn_scalar": 24,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "tie_word_embeddings": True,
        "final_logit_softcapping": 5.0, "bos_token_id": 1,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
}


def make_hf_model(arch: str, seed: int = 0):
    """A random tiny transformers model of this architecture (fp32, eager attention)."""
    import transformers

    cls, cfg_cls, extra = HF_ARCHS[arch]
    config = getattr(transformers, cfg_cls)(**{**_COMMON, **extra}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config).eval()
    gemma = arch.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.1)  # well away from the near-uniform logits of the default init
            if name.endswith("norm.weight") and not gemma:
                p.add_(1.0)  # Gemma's norms are 1 + w; the others multiply by w itself
    return model


def save_hf_folder(hf_model, folder):
    """save_pretrained (safetensors) plus the byte-level tokenizer: a folder pocketlm loads."""
    hf_model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer().save(folder)
    return folder


_GGUF_LAYER = {  # Hugging Face -> llama.cpp, as convert_hf_to_gguf names them
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}


def llama_cpp_permute(w, n_heads: int):
    """What convert_hf_to_gguf does to LLaMA's Q and K rows (interleave the two halves)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_hf_as_gguf(hf_model, path, qtype=None):
    """The transformers model as llama.cpp's converter would write it (F32 unless ``qtype``):
    LLaMA's Q/K rows permuted, Gemma's norms stored as 1 + w, Llama 3's scaling as rope_freqs."""
    import json

    import gguf

    from pocketlm.model.config import rope_inv_freq

    c = hf_model.config
    arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}[c.model_type]
    gemma = arch == "gemma3"
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if gemma:
        w.add_sliding_window(c.sliding_window)
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
    tok = make_tokenizer()
    spec = json.loads(tok.backend.to_str())
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in spec["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_eos_token_id(tok.eos_id)
    w.add_chat_template(tok.chat_template)
    qtype = qtype if qtype is not None else gguf.GGMLQuantizationType.F32

    def add(name, a):
        kind = qtype if a.ndim == 2 else gguf.GGMLQuantizationType.F32  # norms, biases stay F32
        w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)

    if rope.get("rope_type") == "llama3":  # llama.cpp divides each frequency by its factor
        base = np.asarray(rope_inv_freq(head_dim, rope["rope_theta"]))
        scaled = np.asarray(rope_inv_freq(head_dim, rope["rope_theta"], rope))
        add("rope_freqs.weight", (base / scaled).astype(np.float32))
    for name, t in hf_model.state_dict().items():
        a = t.detach().float().numpy().copy()
        if name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            gname = "output.weight"
        elif name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            kind = _GGUF_LAYER.get(module)
            if module == "post_attention_layernorm":  # LLaMA's pre-MLP norm, Gemma's post-attn
                kind = "post_attention_norm" if gemma else "ffn_norm"
            gname = f"blk.{i}.{kind}.{suffix}"
        if gemma and name.endswith("norm.weight"):
            a = a + 1.0
        if arch == "llama" and gname.endswith("attn_q.weight"):
            a = llama_cpp_permute(a, c.num_attention_heads)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            a = llama_cpp_permute(a, c.num_key_value_heads)
        add(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
