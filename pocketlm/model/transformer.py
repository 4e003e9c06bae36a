"""A LLaMA-family decoder in plain PyTorch, readable top to bottom.

RMSNorm -> grouped-query attention with RoPE -> RMSNorm -> SwiGLU MLP, repeated, then a final
RMSNorm and the output projection (tied to the embedding or not).

Module names follow Hugging Face's ``LlamaForCausalLM`` (minus its ``model.`` prefix), so a
state dict moves between the two with a prefix change and nothing else. Q/K rows are in
Hugging Face's "rotate half" order; the GGUF reader undoes llama.cpp's interleaving.

Shapes: B batch, T new tokens, S cache length, D model width, H query heads, K kv heads,
E head width, V vocabulary.

The KV cache is preallocated once (``KVCache``) and every forward pass takes explicit
per-sequence positions, so the same call does a one-pass prefill, a batched decode step with
each sequence at its own position, and the verification of several draft tokens at once.
Rolling the cache back is just feeding earlier positions again: a position's entry is
rewritten before it is read, and later entries are masked out.

Without gradients (inference), RMSNorm, SwiGLU's product, RoPE and causal prefill attention
use our compiled kernels (``pocketlm/kernels``, ``fast()``) where they exist: the same maths
in one pass each. Training, and machines without the kernels, take the PyTorch lines beside
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import kernels
from pocketlm.model.config import ModelConfig


def fast():
    """Our compiled CPU kernels, for inference only (they have no backward); else None."""
    return None if torch.is_grad_enabled() else kernels.get()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if self.weight.dtype == torch.float32 and x.is_contiguous() and (kx := fast()) is not None:
                return kx.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()  # lower precision: normalise in fp32, as the reference does
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, each (max_seq_len, head_dim), in "rotate half" layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (S, E/2)
    angles = torch.cat([angles, angles], dim=-1)  # (S, E)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, E); cos/sin (B, 1, T, E) -> x rotated, (B, T, heads, E)."""
    if x.dtype == cos.dtype == torch.float32 and x.shape[-1] % 16 == 0 and (kx := fast()) is not None:
        B, T, _, E = x.shape  # cos/sin may be one table broadcast over the batch: copy it out
        return kx.rope(x, cos.expand(B, 1, T, E).reshape(B, T, E).contiguous(),
                       sin.expand(B, 1, T, E).reshape(B, T, E).contiguous())
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.transpose(1, 2) + rotated * sin.transpose(1, 2)


@dataclass
class KVCache:
    """Keys and values for every layer, preallocated: k[i], v[i] are (B, K, S, E)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(
        cls, config: ModelConfig, batch_size: int, max_seq_len: int, dtype=torch.float32
    ) -> KVCache:
        shape = (batch_size, config.n_kv_heads, max_seq_len, config.head_dim)
        return cls(
            k=[torch.zeros(shape, dtype=dtype) for _ in range(config.n_layers)],
            v=[torch.zeros(shape, dtype=dtype) for _ in range(config.n_layers)],
        )

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


SMALL_QUERY = 16  # up to this many new tokens per pass, attention is written out by hand


def grouped_attention(q, k, v, mask):
    """Attention for a few query tokens: q (B, H, T, E), k/v (B, K, L, E), mask (B, 1, T, L).

    At decode time the scores are tiny, and PyTorch's CPU flash-attention kernel spends ~5 ms
    a call on set-up (half of a decode step for this model); plain matmuls take ~0.1 ms.
    The G = H/K query heads that share a kv head are stacked so k and v are never copied.
    """
    B, H, T, E = q.shape
    K = k.shape[1]
    G = H // K
    q = q.reshape(B, K, G * T, E)  # head h = (group h // G, member h % G), as repeat_kv does
    scores = (q @ k.transpose(-1, -2)) * E**-0.5  # (B, K, G*T, L)
    mask = mask.expand(B, G, T, mask.shape[-1]).reshape(B, 1, G * T, -1)
    scores = scores.masked_fill(~mask, float("-inf"))
    y = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v  # (B, K, G*T, E)
    return y.view(B, H, T, E)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        D, E = config.dim, config.head_dim
        self.q_proj = nn.Linear(D, config.n_heads * E, bias=False)
        self.k_proj = nn.Linear(D, config.n_kv_heads * E, bias=False)
        self.v_proj = nn.Linear(D, config.n_kv_heads * E, bias=False)
        self.o_proj = nn.Linear(config.n_heads * E, D, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        cos: torch.Tensor,  # (B, 1, T, E)
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # (B, 1, T, L) bool, True = may attend; None = plain causal
        cache: tuple[torch.Tensor, torch.Tensor] | None,  # each (B, K, S, E)
        write_index: torch.Tensor | slice | None,  # (B, K, T, E) positions, or one slice for all
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or K, T, E)
        if cache is not None:
            k_cache, v_cache = cache
            if isinstance(write_index, slice):  # the same run of positions in every row
                k_cache[:, :, write_index] = k.to(k_cache.dtype)
                v_cache[:, :, write_index] = v.to(v_cache.dtype)
                L = write_index.stop
            else:
                k_cache.scatter_(2, write_index, k.to(k_cache.dtype))
                v_cache.scatter_(2, write_index, v.to(v_cache.dtype))
                L = mask.shape[-1]
            k, v = k_cache[:, :, :L].to(q.dtype), v_cache[:, :, :L].to(q.dtype)  # (B, K, L, E)
        if T <= SMALL_QUERY:
            if mask is None:
                mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
            y = grouped_attention(q, k, v, mask)
        elif (
            (mask is None or isinstance(write_index, slice))  # causal, same positions every row
            and q.dtype == torch.float32
            and self.head_dim % 16 == 0
            and self.head_dim <= 256
            and (kx := fast()) is not None
        ):  # prefill: our kernel, which skips the scores above the diagonal (2x SDPA here)
            y = kx.causal_attention(q, k, v, k.shape[2] - T)  # (B, T, H, E)
            return self.o_proj(y.view(B, T, -1))
        else:  # long queries: the fused kernel, which never builds (T, L) per head
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, H, T, E) -> (B, T, H*E)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        if g.dtype == u.dtype == torch.float32 and (kx := fast()) is not None:
            return self.down_proj(kx.silu_mul(g.contiguous(), u.contiguous()))
        return self.down_proj(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache, write_index):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, write_index)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for every input token. See ``hidden`` for the arguments."""
        return self.lm_head(self.hidden(tokens, positions, cache, rows))

    def hidden(
        self,
        tokens: torch.Tensor,  # (B, T) token ids
        positions: torch.Tensor | None = None,  # (B, T) absolute positions; default 0..T-1
        cache: KVCache | None = None,
        rows: slice | None = None,  # which cache rows these B sequences use; default 0..B-1
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, D), before the output projection.

        With a cache, each token's key/value is written at its position and it attends to
        every cached position up to its own; without one, attention is plain causal over
        ``tokens``. Positions must be increasing along T within a sequence.
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T).expand(B, T)
        cos = self.rope_cos[positions].unsqueeze(1)  # (B, 1, T, E)
        sin = self.rope_sin[positions].unsqueeze(1)
        x = self.embed_tokens(tokens)  # (B, T, D)
        if cache is None:  # attend within this call only, causally
            layer_caches = [None] * len(self.layers)
            write_index, mask = None, None
        else:
            L = int(positions.max()) + 1
            rows = rows if rows is not None else slice(0, B)
            layer_caches = [(k[rows], v[rows]) for k, v in zip(cache.k, cache.v)]
            first = positions[:, 0]
            if bool((first == first[0]).all()) and L - int(first[0]) == T:
                # every row writes the same run of positions (a prompt, a verified draft)
                write_index = slice(L - T, L)
            else:
                E = self.config.head_dim
                write_index = positions[:, None, :, None].expand(B, self.config.n_kv_heads, T, E)
            # a prompt from position 0 attends plainly causally: SDPA's is_causal fast path
            mask = None if L == T else (torch.arange(L)[None, None, :] <= positions[:, :, None]).unsqueeze(1)
        for layer, layer_cache in zip(self.layers, layer_caches):
            x = layer(x, cos, sin, mask, layer_cache, write_index)
        return self.norm(x)


def to_column_major(network: nn.Module) -> nn.Module:
    """Store every Linear weight column-major: ``weight`` stays (out, in) but is a transposed
    view of a contiguous (in, out) tensor, so ``F.linear`` becomes ``x @ W_t`` on contiguous
    memory. On a 2-core AVX2 machine this made batch-1 decode 28% faster and prefill 10%
    faster than PyTorch's default row-major layout (A/B in one process; BENCHMARKS.md).
    State dicts are unchanged (same names and shapes); tied weights stay tied.
    """
    converted: dict[int, nn.Parameter] = {}
    for module in network.modules():
        if isinstance(module, nn.Linear) and module.weight.is_contiguous():
            w = module.weight
            if id(w) not in converted:
                converted[id(w)] = nn.Parameter(w.detach().t().contiguous().t(), w.requires_grad)
            module.weight = converted[id(w)]
    for module in network.modules():  # an embedding tied to a converted output layer
        if isinstance(module, nn.Embedding) and id(module.weight) in converted:
            module.weight = converted[id(module.weight)]
    return network
