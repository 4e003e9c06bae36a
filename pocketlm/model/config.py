"""The shape of a LLaMA-family decoder, as one dataclass.

It converts to and from the Hugging Face ``config.json`` keys so a saved pocketlm folder is a
folder transformers can read, and is filled from GGUF metadata by ``formats.gguf``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from pocketlm.errors import UnsupportedModel


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int  # residual width (hidden_size)
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention
    hidden_dim: int  # SwiGLU inner width (intermediate_size)
    head_dim: int = 0  # 0 -> dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModel(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs whole groups"
            )

    @property
    def n_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, h, kv, hd = self.dim, self.n_heads, self.n_kv_heads, self.head_dim
        per_layer = d * hd * (2 * h + 2 * kv) + 3 * d * self.hidden_dim + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + d

    # -- Hugging Face config.json -------------------------------------------------------
    def to_hf(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.hidden_dim,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        if cfg.get("model_type") not in ("llama", "mistral", "qwen2", None) or not any(
            a in ("LlamaForCausalLM", "MistralForCausalLM") for a in archs
        ):
            raise UnsupportedModel(
                f"architecture {archs} (model_type={cfg.get('model_type')!r}) is not supported; "
                "pocketlm runs LLaMA-family decoders (LlamaForCausalLM) for now"
            )
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise UnsupportedModel(f"config.json sets {key}=true; biased projections are not supported")
        if cfg.get("rope_scaling"):
            raise UnsupportedModel(
                f"rope_scaling={cfg['rope_scaling']} is not supported yet; only plain RoPE"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"hidden_act={cfg['hidden_act']!r}; only SwiGLU (silu) is supported")
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        n_heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            hidden_dim=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or 0,
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
