"""The shape of a decoder, as one dataclass: LLaMA, Qwen2, Qwen3 and Gemma 3 are field values.

As in LitGPT, a family is a set of field values, not a new model class: ``attn_bias`` (Qwen2's
q/k/v biases), ``qk_norm`` (Qwen3 and Gemma 3 normalise each head's queries and keys),
``post_norms`` (Gemma's norms after attention and after the MLP as well as before), ``act``
(SwiGLU or GELU-tanh gating), ``scale_embeddings`` (Gemma multiplies embeddings by sqrt(dim)),
``sliding_window`` / ``sliding_window_pattern`` / ``rope_local_theta`` (Gemma's local layers),
``query_pre_attn_scalar`` (Gemma's attention scale), ``final_softcap`` and ``rope_scaling``
(Llama 3's long-context frequencies). ``model/transformer.py`` reads these fields.

It converts to and from the Hugging Face ``config.json`` keys so a saved pocketlm folder is a
folder transformers can read, and is filled from GGUF metadata by ``formats.gguf``.

Norm weights are held as the factor the norm multiplies by. Gemma's Hugging Face checkpoints
store ``w`` and multiply by ``1 + w`` (GGUF files already store ``1 + w``): ``norm_offset`` is
that 1, added when reading a Hugging Face folder and subtracted when writing one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from pocketlm.errors import UnsupportedModel

SUPPORTED = ("llama", "qwen2", "qwen3", "gemma3")
_HF_ARCH = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                "gemma3_text": "gemma3", "gemma3": "gemma3"}


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int  # residual width (hidden_size)
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention
    hidden_dim: int  # gated MLP inner width (intermediate_size)
    head_dim: int = 0  # 0 -> dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # -- what differs between families (defaults are LLaMA's) ------------------------------
    arch: str = "llama"  # one of SUPPORTED; names the family for export and for messages
    attn_bias: bool = False  # Qwen2: q/k/v projections have biases (o_proj has none)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's q and k before RoPE
    post_norms: bool = False  # Gemma 3: RMSNorm on attention and MLP outputs too
    act: str = "silu"  # gate activation: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(dim)
    norm_offset: float = 0.0  # Gemma: HF stores norm weights as w, the factor is w + 1
    query_pre_attn_scalar: float = 0.0  # attention scale is this ** -0.5; 0 -> head_dim
    final_softcap: float = 0.0  # logits -> cap * tanh(logits / cap); 0 -> none
    sliding_window: int = 0  # local layers attend to this many latest positions; 0 -> none
    sliding_window_pattern: int = 0  # every Nth layer (N-1, 2N-1, ...) is global, others local
    rope_local_theta: float = 0.0  # RoPE base of local layers; 0 -> rope_theta
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ...}

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.arch not in SUPPORTED:
            raise UnsupportedModel(
                f"architecture {self.arch!r} is not supported; pocketlm runs {', '.join(SUPPORTED)}"
            )
        if self.act not in ("silu", "gelu_tanh"):
            raise UnsupportedModel(f"activation {self.act!r} is not supported (silu, gelu_tanh)")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModel(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs whole groups"
            )
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ("default", "llama3", "linear"):
            raise UnsupportedModel(
                f"rope_scaling of type {kind!r} is not supported; pocketlm knows llama3 and linear"
            )

    # -- what the decoder asks ---------------------------------------------------------------
    def is_local(self, layer: int) -> bool:
        """Whether this layer attends through a sliding window (Gemma's 5 local : 1 global)."""
        if not self.sliding_window:
            return False
        return not self.sliding_window_pattern or (layer + 1) % self.sliding_window_pattern != 0

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def n_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, h, kv, hd = self.dim, self.n_heads, self.n_kv_heads, self.head_dim
        norms = d * (4 if self.post_norms else 2) + (2 * hd if self.qk_norm else 0)
        bias = (h + 2 * kv) * hd if self.attn_bias else 0
        per_layer = d * hd * (2 * h + 2 * kv) + 3 * d * self.hidden_dim + norms + bias
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + d

    # -- Hugging Face config.json -------------------------------------------------------
    def to_hf(self, dtype: str = "float32") -> dict:
        """config.json's keys; ``dtype`` is the weights' torch dtype name ("bfloat16"), written
        as ``torch_dtype`` (transformers 4) and ``dtype`` (transformers 5)."""
        cls, model_type = _HF_ARCH[self.arch]
        out = {
            "architectures": [cls],
            "model_type": model_type,
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
            "torch_dtype": dtype,
            "dtype": dtype,
        }
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling)
        if self.arch == "llama":
            out.update(hidden_act="silu", attention_bias=False, mlp_bias=False)
        elif self.arch in ("qwen2", "qwen3"):
            out.update(hidden_act="silu", attention_bias=self.attn_bias, use_sliding_window=False)
        else:  # gemma3_text
            out.update(
                hidden_activation="gelu_pytorch_tanh",
                query_pre_attn_scalar=int(self.query_pre_attn_scalar or self.head_dim),
                sliding_window=self.sliding_window or None,
                sliding_window_pattern=self.sliding_window_pattern or None,
                layer_types=[
                    "sliding_attention" if self.is_local(i) else "full_attention"
                    for i in range(self.n_layers)
                ],
                rope_local_base_freq=self.rope_local_theta or self.rope_theta,
                final_logit_softcapping=self.final_softcap or None,
                attn_logit_softcapping=None,
                attention_bias=False,
            )
        return out

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        """A transformers ``config.json`` dict -> ModelConfig.

        Raises UnsupportedModel for a family or a feature the decoder does not compute.
        """
        if cfg.get("model_type") == "gemma3" and isinstance(cfg.get("text_config"), dict):
            cfg = {"model_type": "gemma3_text", **cfg["text_config"]}  # a multimodal wrapper
        model_type = cfg.get("model_type") or "llama"
        archs = cfg.get("architectures") or [model_type]
        arch = _MODEL_TYPES.get(model_type)
        if arch is None:
            raise UnsupportedModel(
                f"architecture {archs} (model_type={model_type!r}) is not supported; pocketlm runs "
                "model_type llama, qwen2, qwen3 and gemma3_text"
            )
        if cfg.get("mlp_bias"):
            raise UnsupportedModel("config.json sets mlp_bias=true; biased MLPs are not supported")
        if cfg.get("attn_logit_softcapping"):
            raise UnsupportedModel("attention logit soft-capping (Gemma 2) is not supported")
        window = cfg.get("sliding_window") or 0
        if arch != "gemma3" and (cfg.get("use_sliding_window") or model_type == "mistral" and (
            0 < window < cfg.get("max_position_embeddings", 0))):
            raise UnsupportedModel(
                f"{model_type} with a sliding window is not supported (only Gemma 3's local layers)")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
        if act not in acts:
            raise UnsupportedModel(f"hidden_act={act!r}; pocketlm computes silu and gelu_pytorch_tanh")
        theta, scaling, local_theta = _hf_rope(cfg)
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        n_heads = cfg["num_attention_heads"]
        gemma = arch == "gemma3"
        window, pattern = 0, 0
        if gemma and cfg.get("sliding_window"):
            window = cfg["sliding_window"]
            types = cfg.get("layer_types")
            pattern = cfg.get("sliding_window_pattern") or 6
            if types:  # newer transformers lists each layer; we hold it as a period
                local = [t == "sliding_attention" for t in types]
                period = next((i + 1 for i, is_local in enumerate(local) if not is_local), 0)
                if not all(is_local == bool(period and (i + 1) % period) for i, is_local
                           in enumerate(local)) and any(local):
                    raise UnsupportedModel(f"layer_types {types} are not a regular pattern")
                pattern = period if any(local) else 1
                window = window if any(local) else 0
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            hidden_dim=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or 0,
            norm_eps=cfg.get("rms_norm_eps", 1e-6 if gemma else 1e-5),
            rope_theta=theta,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=cfg.get("tie_word_embeddings", gemma),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            arch=arch,
            attn_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            qk_norm=arch in ("qwen3", "gemma3"),
            post_norms=gemma,
            act=acts[act],
            scale_embeddings=gemma,
            norm_offset=1.0 if gemma else 0.0,
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or 0) if gemma else 0.0,
            final_softcap=float(cfg.get("final_logit_softcapping") or 0),
            sliding_window=window,
            sliding_window_pattern=pattern,
            rope_local_theta=local_theta if gemma else 0.0,
            rope_scaling=scaling,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _hf_rope(cfg: dict) -> tuple[float, dict | None, float]:
    """(rope_theta, rope_scaling or None, local layers' theta or 0) from a config.json.

    transformers >= 5 writes ``rope_parameters`` (per layer type for Gemma 3); older versions
    ``rope_theta``, ``rope_scaling`` and ``rope_local_base_freq``. Both are read.
    """
    params = cfg.get("rope_parameters")
    local = {}
    if params and "full_attention" in params:  # Gemma 3: one set per layer type
        params, local = params["full_attention"], params.get("sliding_attention") or {}
    if params:
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg.get("rope_scaling") or {})
    if scaling:
        scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type", "default")
    if not scaling or scaling["rope_type"] == "default":
        scaling = None
    if local.get("rope_type", "default") != "default":
        raise UnsupportedModel(f"scaled RoPE on local layers ({local}) is not supported")
    local_theta = float(local.get("rope_theta") or cfg.get("rope_local_base_freq") or 0.0)
    return theta, scaling, local_theta


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> list[float]:
    """RoPE's E/2 inverse frequencies, with Llama 3's or linear scaling applied.

    Llama 3 keeps high frequencies, divides low ones by ``factor`` and blends between
    (the rule transformers' ``_compute_llama3_parameters`` and llama.cpp's ``rope_freqs`` use).
    """
    inv = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return [f / scaling["factor"] for f in inv]
    if kind != "llama3":
        return inv
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:  # high frequency: unchanged
            out.append(f)
        elif wavelen > old / low:  # low frequency: slowed by factor
            out.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out
