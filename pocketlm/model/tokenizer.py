"""Text <-> token ids, and the chat template, built on the ``tokenizers`` library.

From a GGUF file the byte-level BPE ("gpt2") is rebuilt from its metadata (tokens, merges, token
types) and the pre-tokenizer is chosen from ``tokenizer.ggml.pre`` with llama.cpp's exact meaning
for each type we know; unknown types are refused rather than guessed. A SentencePiece-style
vocabulary ("llama": Gemma's, with scores and no merges) becomes a BPE whose merges are ranked by
the score of the piece they make, which is llama.cpp's rule (merge the adjacent pair whose union
scores highest, leftmost first); characters outside the vocabulary fall back to <0xNN> bytes.
From a Hugging Face folder ``tokenizer.json`` is used as it is.

The chat template is rendered with jinja2 the way transformers' ``apply_chat_template`` does
(sandboxed, ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception``, ``tojson``).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

from pocketlm.errors import FormatError, InvalidArgument, UnsupportedModel

# llama.cpp pre-tokenizer types -> how to split text before BPE.
# "digits": each digit alone, then GPT-2's regex (llama.cpp's SMOLLM/STARCODER/REFACT group).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's: Llama 3's with single digits (llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = {
    "gpt-2": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "codeshell": "digits",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "qwen2": "qwen2",
}

# Tokens that end an assistant turn in common chat formats (besides the EOS token itself).
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _pre_tokenizer(kind: str):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    if kind == "gpt2":
        return pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if kind == "digits":
        return pt.Sequence(
            [
                pt.Digits(individual_digits=True),
                pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    if kind in ("llama3", "qwen2"):
        regex = _LLAMA3_REGEX if kind == "llama3" else _QWEN2_REGEX
        return pt.Sequence(
            [
                pt.Split(Regex(regex), behavior="isolated", invert=False),
                pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
    raise AssertionError(kind)


def _sentencepiece_backend(meta: dict, tokens: list[str], types: list[int], vocab: dict, source: str):
    """A SentencePiece-style vocabulary (GGUF "llama": pieces with scores, spaces as "▁") as a
    ``tokenizers`` BPE that merges exactly as llama.cpp's SPM tokenizer does.

    llama.cpp starts from single characters and repeatedly merges the adjacent pair whose union
    is the highest-scoring piece (leftmost on ties); BPE merges the pair of lowest rank. So every
    way of cutting a piece into two pieces is a merge, ranked by the score of the whole piece.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise FormatError(f"{source}: a SentencePiece vocabulary needs tokenizer.ggml.scores")
    if meta.get("tokenizer.ggml.add_space_prefix", True):  # Gemma 3 sets it False
        raise UnsupportedModel(
            f"{source}: SentencePiece tokenizers that add a space prefix (add_space_prefix) are "
            "not supported yet; Gemma 3's, which adds none, is"
        )
    ranked = []  # llama.cpp merges into any piece of the vocabulary, whatever its type
    for i, piece in enumerate(tokens):
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            ia, ib = vocab.get(a), vocab.get(b)
            if ia is not None and ib is not None:
                ranked.append((-scores[i], ia, ib, a, b))
    ranked.sort()
    merges = [(a, b) for _, _, _, a, b in ranked]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    backend = HFTokenizer(models.BPE(
        vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=False,
        unk_token=tokens[unk] if isinstance(unk, int) else None))
    backend.normalizer = normalizers.Replace(" ", "▁")  # llama.cpp: spaces -> "▁"
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend


class Tokenizer:
    def __init__(
        self,
        backend,  # tokenizers.Tokenizer
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
    ):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.chat_template = chat_template
        self.add_bos = add_bos

    # -- building -----------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str = "GGUF file") -> Tokenizer:
        from tokenizers import AddedToken, decoders, models
        from tokenizers import Tokenizer as HFTokenizer

        model = meta.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise UnsupportedModel(
                f"{source}: tokenizer type {model!r} is not supported; pocketlm reads byte-level "
                "BPE ('gpt2') and SentencePiece-style ('llama') tokenizers from GGUF"
            )
        tokens = meta["tokenizer.ggml.tokens"]
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        if model == "llama":
            backend = _sentencepiece_backend(meta, tokens, types, vocab, source)
        else:
            pre = meta.get("tokenizer.ggml.pre", "default")
            if pre not in PRE_TOKENIZERS:
                raise UnsupportedModel(
                    f"{source}: pre-tokenizer {pre!r} is not supported (known: "
                    f"{', '.join(sorted(PRE_TOKENIZERS))}); guessing would silently change token ids"
                )
            merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
            backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
            backend.pre_tokenizer = _pre_tokenizer(PRE_TOKENIZERS[pre])
            backend.decoder = decoders.ByteLevel()
        # CONTROL (3) tokens are special; USER_DEFINED (4) are matched verbatim but not special.
        added = [
            AddedToken(tok, special=(typ == 3), normalized=False)
            for tok, typ in zip(tokens, types)
            if typ in (3, 4)
        ]
        backend.add_tokens(added)

        def tok(key):
            i = meta.get(key)
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        return cls(
            backend,
            bos_token=tok("tokenizer.ggml.bos_token_id"),
            eos_token=tok("tokenizer.ggml.eos_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """A Hugging Face / pocketlm folder: tokenizer.json (+ tokenizer_config.json)."""
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FormatError(f"{folder} has no tokenizer.json; save the model's tokenizer there")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own types
            raise FormatError(f"{path} could not be read: {e}") from None
        cfg = {}
        if (folder / "tokenizer_config.json").is_file():
            cfg = json.loads((folder / "tokenizer_config.json").read_text())

        def name(v):
            return v.get("content") if isinstance(v, dict) else v

        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        return cls(
            backend,
            bos_token=name(cfg.get("bos_token")),
            eos_token=name(cfg.get("eos_token")),
            chat_template=template,
            add_bos=bool(cfg.get("add_bos_token", False)),
        )

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))

    # -- using --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])

    @cached_property
    def stop_ids(self) -> set[int]:
        """Ids that end generation: EOS and the chat format's end-of-turn token."""
        ids = {self.eos_id} if self.eos_id is not None else set()
        for tok in _END_OF_TURN:
            i = self.backend.token_to_id(tok)
            if i is not None and (self.chat_template is None or tok in self.chat_template):
                ids.add(i)
        return ids

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """Render a conversation to the prompt text the model was trained on.

        Raises InvalidArgument for malformed messages, UnsupportedModel without a template.
        """
        if not self.chat_template:
            raise UnsupportedModel(
                "this model has no chat template; use plain completion (--raw) instead"
            )
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InvalidArgument(
                    f"message {i} must be a dict with 'role' and 'content', got {m!r}"
                )
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except _TemplateError as e:
            raise InvalidArgument(f"the chat template refused these messages: {e}") from None

    @cached_property
    def _template(self):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise _TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(
                x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
            )

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)


class _TemplateError(Exception):
    pass
