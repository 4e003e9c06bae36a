"""Tiny models for tests: a byte-level tokenizer with a chat template, and a random network.

Built in memory in well under a second, so most tests never touch the real model.
"""

from __future__ import annotations

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
