"""The Python API: ``load`` a model, then generate, chat, score and save with it.

    >>> import pocketlm
    >>> m = pocketlm.load("smollm2-135m-instruct")
    >>> m.chat([{"role": "user", "content": "Name a prime number."}], temperature=0)
    >>> for piece in m.generate("Once upon a time", stream=True, max_tokens=20): print(piece, end="")

The CLI and the server are thin layers over this module.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import torch

from pocketlm.engine.fastlinear import speed_up
from pocketlm.engine.generate import Token
from pocketlm.engine.generate import generate as _generate
from pocketlm.engine.sampling import SamplingParams
from pocketlm.errors import (
    ContextOverflow,
    FormatError,
    InvalidArgument,
    ModelNotFound,
    PocketError,
)
from pocketlm.formats import gguf as gguf_format
from pocketlm.formats import huggingface as hf_format
from pocketlm.formats import registry
from pocketlm.model.card import Card
from pocketlm.model.config import ModelConfig
from pocketlm.model.tokenizer import Tokenizer
from pocketlm.model.transformer import Transformer

_SAMPLING_KEYS = {f.name for f in fields(SamplingParams)}


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` CPU threads (default: $POCKETLM_THREADS, else all cores); returns it."""
    n = threads or int(os.environ.get("POCKETLM_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


class Model:
    """A network, its tokenizer and its card, with the verbs a user needs."""

    def __init__(self, network: Transformer, tokenizer: Tokenizer, card: Card | None = None):
        self.network = network.eval()
        self.tokenizer = tokenizer
        self.card = card or Card()

    @property
    def config(self) -> ModelConfig:
        return self.network.config

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Model({self.card.name or self.card.source!r}, {c.n_params / 1e6:.0f}M params, "
            f"{c.n_layers} layers, dim {c.dim}, context {c.max_seq_len})"
        )

    # -- text in, text out --------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def generate(
        self,
        prompt: str | list[str],
        stream: bool = False,
        truncate: str | None = None,
        **sampling,
    ) -> str | list[str] | Iterator[str]:
        """Continue ``prompt`` (plain completion, no chat template).

        A list of prompts is generated as one batch and returns a list of strings. With
        ``stream=True`` (one prompt) returns an iterator of text pieces. ``sampling`` takes
        the fields of ``SamplingParams`` (max_tokens, temperature, top_k, top_p, min_p,
        repetition_penalty, seed, stop). Raises InvalidArgument for bad values and
        ContextOverflow for a prompt longer than the context (unless ``truncate="left"``).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [self._fit(self.encode(p), truncate, sampling) for p in prompts]
        return self._run(ids, stream, single=isinstance(prompt, str), **sampling)

    def chat(
        self, messages: list[dict], stream: bool = False, truncate: str | None = None, **sampling
    ) -> str | Iterator[str]:
        """The assistant's reply to a conversation, rendered with the model's chat template."""
        if not isinstance(messages, list) or not messages:
            raise InvalidArgument("messages must be a non-empty list of {'role', 'content'} dicts")
        ids = self._fit(self.chat_prompt(messages), truncate, sampling)
        return self._run([ids], stream, single=True, **sampling)

    def stream_tokens(self, prompts: list[list[int]], **sampling) -> Iterator[list[Token]]:
        """The engine's token stream for token-id prompts (ids, log-probs, text pieces)."""
        return _generate(self.network, self.tokenizer, prompts, self._params(sampling))

    def _params(self, sampling: dict) -> SamplingParams:
        unknown = set(sampling) - _SAMPLING_KEYS
        if unknown:
            raise InvalidArgument(
                f"unknown generation option(s) {sorted(unknown)}; valid: {sorted(_SAMPLING_KEYS)}"
            )
        return SamplingParams(**sampling)

    def _fit(self, ids: list[int], truncate: str | None, sampling: dict) -> list[int]:
        limit = self.config.max_seq_len
        if len(ids) < limit:
            return ids
        if truncate == "left":
            keep = max(1, limit - max(1, sampling.get("max_tokens", SamplingParams.max_tokens)))
            return ids[-keep:]
        if truncate not in (None, "none"):
            raise InvalidArgument(f"truncate must be 'left' or None, got {truncate!r}")
        raise ContextOverflow(
            f"the prompt is {len(ids)} tokens but the context window is {limit}; shorten it or "
            "pass truncate='left' (CLI: --truncate left) to drop the oldest tokens"
        )

    def _run(self, ids: list[list[int]], stream: bool, single: bool, **sampling):
        params = self._params(sampling)
        events = _generate(self.network, self.tokenizer, ids, params)
        if stream:
            if not single:
                raise InvalidArgument("stream=True takes one prompt; batch without streaming")
            return (t.text for step in events for t in step if t.text)
        texts = [""] * len(ids)
        for step in events:
            for t in step:
                texts[t.index] += t.text
        return texts[0] if single else texts

    # -- scoring ------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Logits (T, V) for a sequence of token ids, in one causal pass."""
        t = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        return self.network(t)[0]

    # -- saving -------------------------------------------------------------------------
    def dense(self) -> Model:
        """This model, or (when it holds packed GGUF blocks or 16-bit Hugging Face matrices) a
        copy with fp32 weights in their place: what the weight-rewriting steps (quantize,
        prune, finetune, distill) work on."""
        from pocketlm.model.ggml import dense_copy, packed_modules

        if not packed_modules(self.network):
            return self
        return Model(dense_copy(self.network), self.tokenizer, self.card)

    def save(self, folder: str | Path) -> Path:
        """Write a Hugging Face-compatible folder plus card.json; returns its path.

        Files are written under a temporary name and renamed, so a crash never leaves a
        half-written model that looks complete.
        """
        from pocketlm.lock import output_lock  # one writer per folder: OutputLocked otherwise

        folder = Path(folder)
        with output_lock(folder):
            folder.mkdir(parents=True, exist_ok=True)
            # GGUF blocks are saved as fp32, F16/BF16 weights (GGUF or HF) as they are
            from pocketlm.model.ggml import stored_state_dict

            dtype = hf_format.save_state_dict(stored_state_dict(self.network), folder,
                                              self.config.tie_embeddings)
            cfg = self.config.to_hf(dtype)  # the dtype the weights were written in
            if getattr(self.network, "quantization_config", None):  # packed weights: see compress/
                cfg["quantization_config"] = self.network.quantization_config
            self.tokenizer.save(folder)
            self.card.save(folder, self.config)  # card.json and the README.md model card
            tmp = folder / "config.json.tmp"
            tmp.write_text(json.dumps(cfg, indent=2))
            os.replace(tmp, folder / "config.json")  # written last: its presence marks a whole folder
        return folder


# -- loading --------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(name_or_path: str | Path) -> Path:
    """A model name, path or hub id -> a local .gguf file or model folder.

    Raises ModelNotFound with the known names, or the path that was tried.
    """
    s = str(name_or_path)
    path = Path(s).expanduser()
    if path.exists():
        return path
    if s in registry.KNOWN:
        return registry.stored_path(s) or registry.pull(s)
    if s.endswith(".gguf") or "/" in s and not _HUB_ID.match(s) or s.startswith((".", "~")):
        raise ModelNotFound(f"no model file or folder at {path.resolve()}")
    if _HUB_ID.match(s):
        return _from_hub(s)
    raise registry.unknown_name_error(s)


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFound(
            f"{repo_id!r} looks like a Hugging Face hub id, but huggingface_hub is not installed "
            "(pip install huggingface_hub), and no local path of that name exists"
        ) from None
    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
            )
        )
    except Exception as e:  # noqa: BLE001 - any hub or network failure means: not fetched
        raise ModelNotFound(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}). "
            "If this machine is offline, download the folder elsewhere and pass its path."
        ) from None


def load(name_or_path: str | Path = registry.DEFAULT_MODEL, dtype: torch.dtype | None = None,
         threads: int | None = None) -> Model:
    """Load a model by name (see ``pocketlm list``), GGUF file, or Hugging Face/pocketlm folder.

    With ``dtype=None`` (the default) a GGUF file's quantized and 16-bit tensors stay in their
    packed form in memory and the kernels compute from them (``model/ggml.py``), and so do a
    Hugging Face folder's bf16/fp16 matrices (as F16/BF16 rows over the memory-mapped
    safetensors); other weights (norms, biases, fp32 folders) load as fp32.
    ``dtype=torch.float32`` or ``torch.bfloat16`` dequantizes every weight to that
    dtype. Raises ModelNotFound, FormatError (truncated or corrupted files) or UnsupportedModel
    (architectures or tensor types we do not run), each with a message that says what to do.
    """
    set_threads(threads)
    path = resolve(name_or_path)
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        from pocketlm.train.lora import load_adapter  # a LoRA adapter folder: base + merged update

        return load_adapter(path, dtype=dtype, threads=threads)
    halves = None  # (packed, small) of a Hugging Face folder's 16-bit weights
    if path.is_file() and path.suffix == ".gguf" or path.is_file() and _is_gguf(path):
        f = gguf_format.GGUFFile(path)
        config = gguf_format.read_config(f)
        state = None if dtype is None else gguf_format.read_state_dict(f, config)
        tokenizer = Tokenizer.from_gguf_metadata(f.metadata, source=path.name)
        known = next((k for k in registry.KNOWN.values() if path.name == Path(k.member).name), None)
        card = Card(
            name=known.name if known else path.stem,
            source=str(name_or_path),
            source_sha256=known.sha256 if known else None,
            license=known.license if known else f.get("general.license"),
        )
    elif hf_format.is_hf_folder(path):
        config = hf_format.read_config(path)
        # default dtype: bf16/fp16 matrices stay 16-bit (views of the memory-mapped file)
        halves = None if dtype is not None or _quantization_config(path) else (
            hf_format.read_16bit(path, config))
        state = hf_format.read_state_dict(path, config) if halves is None else None
        tokenizer = Tokenizer.from_folder(path)
        card = Card.load(path)
        card.name = card.name or path.name
        card.source = card.source or str(path)
    elif path.is_dir():
        raise FormatError(
            f"{path} is a folder without config.json; a model folder needs config.json, "
            "model.safetensors and tokenizer.json"
        )
    else:
        raise FormatError(f"{path} is neither a .gguf file nor a model folder")
    qconfig = _quantization_config(path)
    if halves is not None:
        network = build_packed_network(config, *halves, source=str(path))
    elif state is None:  # a GGUF file, kept packed
        network = build_gguf_network(f, config, source=str(path))
    elif qconfig:  # a quantized folder: swap in the modules that compute from packed weights
        from pocketlm.compress.qlinear import build_quantized_network

        network = build_quantized_network(config, state, qconfig, dtype or torch.float32)
    else:
        network = build_network(config, state, dtype or torch.float32, source=str(path))
    return Model(network, tokenizer, card)


def _quantization_config(path: Path) -> dict | None:
    """config.json's pocketlm ``quantization_config`` block, if the folder has one."""
    if not path.is_dir():
        return None
    cfg = json.loads((path / "config.json").read_text()).get("quantization_config")
    return cfg if cfg and cfg.get("quant_method") == "pocketlm" else None


def build_network(config: ModelConfig, state: dict, dtype=torch.float32, source: str = "") -> Transformer:
    with torch.device("meta"):
        network = Transformer(config)
    network = network.to_empty(device="cpu")
    missing = [k for k in network.state_dict() if k not in state or state[k] is None]
    if missing:
        raise FormatError(f"{source}: weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, t in state.items():
        if t is None:
            continue
        try:
            target = network.get_parameter(name)
        except AttributeError:
            raise FormatError(f"{source}: unexpected tensor {name!r}") from None
        if target.shape != t.shape:
            raise FormatError(
                f"{source}: {name} has shape {tuple(t.shape)}, the config implies {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(t)
    # Buffers (RoPE tables) are not in the state dict: recompute them on the real device,
    # all of them (Llama 3's scaling, Gemma's local tables)
    network.init_rope()
    if config.tie_embeddings:
        network.lm_head.weight = network.embed_tokens.weight
    return speed_up(network.to(dtype)).eval()


def build_gguf_network(f, config: ModelConfig, source: str = "") -> Transformer:
    """The network of a GGUF file with its quantized and 16-bit weights kept as the file's
    bytes (``model/ggml.py``: views of the memory-mapped file, no copy; LLaMA's Q/K rows are
    un-permuted as whole rows of blocks), F32 tensors (norms, biases) loaded as fp32.

    Raises UnsupportedModel naming a tensor type we cannot compute from.
    """
    from pocketlm.model import ggml

    packed, small = {}, {}
    for name, ours, heads in gguf_format.tensor_map(f, config):
        t = f.tensors[name]
        qtype = int(t.tensor_type)
        module, _, kind = ours.rpartition(".")
        if kind == "weight" and len(t.shape) == 2 and qtype != 0:  # 0: F32
            ggml.check_type(qtype, name)
            n, k = int(t.shape[1]), int(t.shape[0])  # GGUF lists columns first
            blocks = ggml.blocks_from_numpy(t.data, n)
            if heads is not None:  # whole rows of blocks move: the bytes can be permuted
                blocks = torch.from_numpy(gguf_format.unpermute(blocks.numpy(), heads).copy())
            packed[module] = (qtype, n, k, blocks)
        else:
            w = gguf_format.dequantize(t)
            small[ours] = torch.from_numpy(gguf_format.unpermute(w, heads) if heads else w)
    return build_packed_network(config, packed, small, source)


def build_packed_network(config: ModelConfig, packed: dict, small: dict, source: str = "") -> Transformer:
    """The network with ``packed`` modules (name -> (GGML type, N, K, (N, row bytes) uint8
    blocks)) as ``model/ggml.py`` modules over those bytes and ``small`` (name -> tensor: norms,
    biases, unpacked weights) loaded as fp32: a GGUF file's blocks, or a Hugging Face folder's
    bf16/fp16 matrices as F16/BF16 rows. Raises FormatError for missing or unexpected weights.
    """
    from pocketlm.model import ggml

    with torch.device("meta"):
        network = Transformer(config)
    network = network.to_empty(device="cpu")  # untouched memory: the packed modules replace most
    network.init_rope()
    for module, (qtype, n, k, blocks) in packed.items():
        try:
            want = tuple(network.get_submodule(module).weight.shape)
        except AttributeError:
            raise FormatError(f"{source}: unexpected tensor {module + '.weight'!r}") from None
        if want != (n, k):
            raise FormatError(f"{source}: {module}.weight has shape {(n, k)}, the config implies {want}")
        if module == "embed_tokens":
            new = ggml.GGMLEmbedding(qtype, n, k, blocks)
        else:
            new = ggml.GGMLLinear(qtype, n, k, blocks, bias=small.get(f"{module}.bias"))
        ggml.set_module(network, module, new)
    if config.tie_embeddings:
        if "embed_tokens" in packed:
            network.lm_head = ggml.TiedGGMLHead(network.embed_tokens)
        else:
            small["lm_head.weight"] = small["embed_tokens.weight"]
    expected = {k for k, _ in network.named_parameters()}
    missing = sorted(expected - set(small))
    if missing:
        raise FormatError(f"{source}: weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, t in small.items():
        if name not in expected and name != "lm_head.weight":
            raise FormatError(f"{source}: unexpected tensor {name!r}")
        target = network.get_parameter(name)
        if target.shape != t.shape:
            raise FormatError(
                f"{source}: {name} has shape {tuple(t.shape)}, the config implies {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(t)
    if config.tie_embeddings and "embed_tokens" not in packed:
        network.lm_head.weight = network.embed_tokens.weight
    return speed_up(network).eval()


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


__all__ = ["Model", "PocketError", "load", "resolve", "set_threads"]
