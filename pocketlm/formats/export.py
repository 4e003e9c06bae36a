"""Export a Model to where deployments run it: a GGUF file (llama.cpp, Ollama) or a Hugging
Face folder (transformers, vLLM).

GGUF is written with the ``gguf`` package in llama.cpp's own layout (what its
``convert_hf_to_gguf.py`` writes): architecture metadata under ``{arch}.*``, the byte-level BPE
vocabulary with merges, token types and pre-tokenizer name, the chat template, and tensors named
``blk.N.attn_q.weight`` ... with LLaMA's Q and K rows interleaved for llama.cpp's RoPE kernel
(Qwen and Gemma use NEOX RoPE: Hugging Face's order, no permutation).

``--type auto`` keeps a quantized model's integer codes: a GGUF block of 32 weights has one fp16
scale (and for Q4_1 one fp16 offset), so any of our grids whose groups are a multiple of 32 is a
run of blocks with the same scale. Symmetric int4 (w = s(q - 8)) is Q4_0 bit for bit,
symmetric int8 per row/group (w = s(q - 128)) is Q8_0 bit for bit, and asymmetric int4
(w = s(q - z)) is Q4_1 with d = s and m = -z s rounded to fp16: the codes and scales are kept,
the offset moves by at most half an fp16 ulp of z*s (under 0.4% of one quantization step for
z <= 15). Other grids (3 bits, asymmetric int8) have no GGUF block type and are refused for
``auto``; ``--type q4_0|q4_1|q8_0`` requantizes them from the dequantized weights, by request.

The HF export writes float weights (dequantized if the model is quantized, LoRA merged) in the
dtype asked, ``config.json`` from ``ModelConfig.to_hf``, the tokenizer files and a model card.
Both exports are written to a temporary name and renamed, refuse an existing output unless
``force``, and hold the output's lock while they write (``pocketlm.lock``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from pocketlm.errors import InvalidArgument, PocketError, UnsupportedModel
from pocketlm.formats import huggingface as hf_format

log = logging.getLogger(__name__)

GGUF_TYPES = ("auto", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
HF_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ExportError(PocketError):
    """A model or setting that the chosen export format cannot express."""


# -- our module names -> llama.cpp's ------------------------------------------------------------
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GEMMA_LAYER = {**_LAYER, "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
_TOP = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}


def gguf_name(ours: str, gemma: bool) -> str:
    """``layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``."""
    module, _, suffix = ours.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{suffix}"
    _, idx, rest = module.split(".", 2)
    table = _GEMMA_LAYER if gemma else _LAYER
    if rest not in table:
        raise ExportError(f"no GGUF name for tensor {ours!r}")
    return f"blk.{idx}.{table[rest]}.{suffix}"


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to LLaMA's Q/K rows: (h, 2, e/2) -> (h, e/2, 2)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


# -- what a network holds, tensor by tensor -----------------------------------------------------
def network_tensors(network) -> list[tuple[str, object]]:
    """(our state-dict name, float tensor, QuantizedTensor or GGMLTensor module) for every
    weight.

    LoRA layers come merged, a tied output projection is left out (GGUF and HF both tie by
    leaving it out), RoPE tables are not weights."""
    from pocketlm.compress.qlinear import QuantizedTensor, TiedQLinear

    out, seen, own_weight = [], set(), set()
    for name, m in network.named_modules():
        kind = type(m).__name__
        if isinstance(m, QuantizedTensor):
            out.append((f"{name}.weight", m))
            seen.add(name)
        elif kind == "LoRALinear":
            out.append((f"{name}.weight", m.merged_weight().detach()))
            seen.add(name)
        elif kind in ("GGMLLinear", "GGMLEmbedding"):  # GGUF blocks / 16-bit HF rows, packed
            out.append((f"{name}.weight", m))
            own_weight.add(f"{name}.weight")  # its bias (Qwen2) is a plain parameter
        elif isinstance(m, TiedQLinear) or kind == "TiedGGMLHead":
            seen.add(name)
    tied = network.config.tie_embeddings
    for name, p in network.named_parameters(remove_duplicate=True):
        module = name.rpartition(".")[0]
        if name in own_weight or any(module == s or module.startswith(s + ".") for s in seen):
            continue
        if tied and name == "lm_head.weight":
            continue
        out.append((name, p.detach()))
    return out


def float_weight(t) -> torch.Tensor:
    from pocketlm.compress.qlinear import QuantizedTensor
    from pocketlm.model.ggml import GGMLTensor

    return t.dequantize() if isinstance(t, (QuantizedTensor, GGMLTensor)) else t.float()


# -- GGUF ---------------------------------------------------------------------------------------
def _blocks_lossless(qt, name: str):
    """A QuantizedTensor as raw GGUF blocks, keeping its codes: (uint8 array, type)."""
    import gguf

    T = gguf.GGMLQuantizationType
    n, k = qt.out_features, qt.in_features
    if qt.kp != k:
        raise ExportError(
            f"{name}: {k} input columns is not a multiple of 32, GGUF's block width; "
            "export with --type f16 (dequantized) instead")
    kind = {(4, True): T.Q4_0, (4, False): T.Q4_1, (8, True): T.Q8_0}.get((qt.bits, qt.sym))
    if kind is None:
        raise ExportError(
            f"{name}: int{qt.bits} {'symmetric' if qt.sym else 'asymmetric'} weights have no "
            "GGUF block type that keeps their codes (GGUF has Q4_0 = symmetric int4, Q4_1 = "
            "asymmetric int4, Q8_0 = symmetric int8, each in blocks of 32 with an fp16 scale); "
            "pass --type q4_0, q4_1 or q8_0 to requantize from the dequantized weights")
    nb = k // 32
    block_group = (np.arange(nb) * 32) // qt.group_size  # the group each block of 32 is in
    scales = np.ascontiguousarray(qt.scales.numpy()[:, block_group])  # (N, nb) fp16
    d = scales.view(np.uint8).reshape(n, nb, 2)
    if kind == T.Q8_0:
        codes = qt.codes().numpy().reshape(n, nb, 32)
        q = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        return np.concatenate([d, q], axis=2).reshape(n, nb * 34), kind
    qs = qt.qweight.numpy().reshape(n, nb, 16)  # our nibble order is GGUF's (low: i, high: 16+i)
    if kind == T.Q4_0:
        return np.concatenate([d, qs], axis=2).reshape(n, nb * 18), kind
    zeros = qt.zeros.numpy()[:, block_group].astype(np.float32)
    m = np.ascontiguousarray((-zeros * scales.astype(np.float32)).astype(np.float16))
    m = m.view(np.uint8).reshape(n, nb, 2)
    return np.concatenate([d, m, qs], axis=2).reshape(n, nb * 20), kind


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizer.json pre-tokenizer, or refuse."""
    from pocketlm.model.tokenizer import _LLAMA3_REGEX

    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (parts[0].get("pattern") or {}).get("Regex", "")
        if regex == _LLAMA3_REGEX:
            return "llama-bpe"
        if "\\p{N}|" in regex and "{1,3}" not in regex:  # Qwen2: digits one by one
            return "qwen2"
    raise ExportError(
        f"the tokenizer's pre-tokenizer ({kinds}) is not one whose llama.cpp name we know "
        "(gpt-2, smollm, llama-bpe, qwen2); llama.cpp would split text differently, so it is "
        "not exported")


def _add_tokenizer(w, tokenizer, vocab_size: int) -> None:
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _add_sentencepiece(w, tokenizer, spec, vocab_size)
    if model.get("type") != "BPE":
        raise ExportError(
            f"the tokenizer is a {model.get('type')} model; GGUF export writes byte-level BPE "
            "(LLaMA 3, SmolLM, Qwen) and SentencePiece-style (Gemma) vocabularies: export it "
            "with --format hf")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = {t["content"]: t["special"] for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may have padding rows past the vocabulary
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(4)
        else:
            tokens.append(tok)
            types.append(3 if added.get(tok) else 4 if tok in added else 1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(spec))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    _add_special(w, tokenizer, vocab.get(model.get("unk_token")))


def _add_special(w, tokenizer, unk_id: int | None) -> None:
    """The fields both vocabulary kinds share: special ids, BOS rule, chat template."""
    if tokenizer.bos_id is not None:
        w.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id is not None:
        w.add_eos_token_id(tokenizer.eos_id)
    if unk_id is not None:
        w.add_unk_token_id(unk_id)
    w.add_add_bos_token(bool(tokenizer.add_bos))
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


# llama.cpp's token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _add_sentencepiece(w, tokenizer, spec: dict, vocab_size: int) -> None:
    """A SentencePiece-style vocabulary (Gemma's) as llama.cpp's "llama" tokenizer: pieces,
    scores and token types, the mirror of ``Tokenizer.from_gguf_metadata``.

    ``tokenizers`` keeps merges, not SentencePiece's scores. llama.cpp merges the adjacent pair
    whose union scores highest, so only the order of the scores of pieces that merges make
    matters: walking the merges from the first, each new piece they make scores one less than
    the one before (0, -1, -2, ...), pieces no merge makes come after, added pieces (control,
    user-defined) score -1000 and byte pieces 0, as llama.cpp's converter writes them. Reading
    the file back ranks every merge as before (checked here; ExportError otherwise).
    """
    from pocketlm.model.tokenizer import _sentencepiece_backend

    _check_spm_text_rules(spec)
    model = spec["model"]
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = {t["content"]: t["special"] for t in spec.get("added_tokens", [])}
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may have padding rows past the vocabulary
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(_CONTROL if added[tok] else _USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(_BYTE if _BYTE_PIECE.fullmatch(tok) else
                         _UNKNOWN if tok == model.get("unk_token") else _NORMAL)
    scores = [0.0 if t == _BYTE else -1000.0 for t in types]
    ranked, next_score = set(), 0.0
    for a, b in merges:
        i = vocab.get(a + b)
        if i is not None and i < vocab_size and types[i] == _NORMAL and i not in ranked:
            scores[i], next_score = next_score, next_score - 1.0
            ranked.add(i)
    for i, t in enumerate(types):
        if t == _NORMAL and i not in ranked:
            scores[i], next_score = next_score, next_score - 1.0
    meta = {"tokenizer.ggml.scores": scores, "tokenizer.ggml.add_space_prefix": False,
            "tokenizer.ggml.unknown_token_id": vocab.get(model.get("unk_token"))}
    rebuilt = _sentencepiece_backend(meta, tokens, types, {t: i for i, t in enumerate(tokens)},
                                     "the export")
    rebuilt_merges = json.loads(rebuilt.to_str())["model"].get("merges", [])
    if _normal_merges(rebuilt_merges, types, vocab) != _normal_merges(merges, types, vocab):
        raise ExportError(
            "the tokenizer's merges are not ranked the way a SentencePiece vocabulary ranks them "
            "(by the score of the piece they make), so no scores would make llama.cpp split text "
            "as it does; export it with --format hf")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    _add_special(w, tokenizer, meta["tokenizer.ggml.unknown_token_id"])
    if "<pad>" in vocab:
        w.add_pad_token_id(vocab["<pad>"])
    w.add_add_sep_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)


def _normal_merges(merges: list, types: list[int], vocab: dict) -> list[tuple[str, str]]:
    """The merges, in rank order, that make the pieces llama.cpp merges by score (normal ones:
    added pieces are matched whole before any merge, here and in llama.cpp)."""
    out = []
    for m in merges:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is not None and i < len(types) and types[i] == _NORMAL:
            out.append((a, b))
    return out


def _check_spm_text_rules(spec: dict) -> None:
    """Refuse a SentencePiece-style tokenizer whose text handling llama.cpp's "llama" tokenizer
    (as Gemma 3 sets it: spaces as "▁", no space prefix) would not reproduce."""
    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    parts = (norm or {}).get("normalizers") if (norm or {}).get("type") == "Sequence" else [norm]
    ok = parts == [None] or all(
        p.get("type") == "Replace" and p.get("pattern") == {"String": " "} and p.get("content") == "▁"
        for p in parts)
    if not ok or pre is not None:
        what = "adds a space prefix" if "Prepend" in json.dumps(norm) else (
            f"normalizes text with {norm} and pre-tokenizes with {pre}")
        raise ExportError(
            f"this SentencePiece-style tokenizer {what}; GGUF export writes Gemma 3's kind "
            "(spaces as '▁', no prefix, no pre-tokenizer), so llama.cpp would split this one's "
            "text differently: export it with --format hf")


def _check_expressible(c) -> None:
    if c.arch == "gemma3":
        if c.query_pre_attn_scalar and c.query_pre_attn_scalar != c.head_dim:
            raise ExportError(
                f"Gemma 3 with query_pre_attn_scalar={c.query_pre_attn_scalar} (not head_dim "
                f"{c.head_dim}): llama.cpp's GGUF has no key for it; use --format hf")
        if c.rope_local_theta not in (0.0, 10000.0):
            raise ExportError(f"Gemma 3 local RoPE base {c.rope_local_theta}: llama.cpp fixes it "
                              "at 10000; use --format hf")


def write_gguf(model, path: str | Path, qtype: str = "auto", force: bool = False) -> Path:
    """Write ``model`` as a GGUF file llama.cpp loads; returns the path.

    ``qtype``: auto (quantized: keep the codes, see the module docstring; float: F16), f32,
    f16, bf16, q8_0, q4_0, q4_1 (the block weights in that type, the embedding and output
    projection in Q8_0, norms and biases in F32). Raises ExportError for what GGUF cannot
    express (naming it), InvalidArgument for an unknown type or an existing path without
    ``force``, OutputLocked while another process writes the same path.
    """
    import gguf

    from pocketlm.compress.qlinear import QuantizedTensor
    from pocketlm.lock import output_lock
    from pocketlm.model.config import rope_inv_freq
    from pocketlm.model.ggml import GGMLTensor

    if qtype not in GGUF_TYPES:
        raise InvalidArgument(f"--type {qtype!r}: choose one of {', '.join(GGUF_TYPES)}")
    path = Path(path)
    T = gguf.GGMLQuantizationType
    c = model.config
    _check_expressible(c)
    quantized = bool(getattr(model.network, "quantization_config", None))
    with output_lock(path):
        _refuse_existing(path, force)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        w = gguf.GGUFWriter(str(tmp), c.arch)
        try:
            w.add_name(model.card.name or "pocketlm model")
            if model.card.license:
                w.add_license(model.card.license)
            w.add_block_count(c.n_layers)
            w.add_context_length(c.max_seq_len)
            w.add_embedding_length(c.dim)
            w.add_feed_forward_length(c.hidden_dim)
            w.add_head_count(c.n_heads)
            w.add_head_count_kv(c.n_kv_heads)
            w.add_key_length(c.head_dim)
            w.add_value_length(c.head_dim)
            w.add_rope_dimension_count(c.head_dim)
            w.add_rope_freq_base(c.rope_theta)
            w.add_layer_norm_rms_eps(c.norm_eps)
            w.add_vocab_size(c.vocab_size)
            w.add_file_type(_file_type(qtype, quantized, model))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            scaling = c.rope_scaling or {}
            if scaling.get("rope_type") == "linear":
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(scaling["factor"])
            if c.arch == "gemma3":
                w.add_sliding_window(c.sliding_window)
                w.add_uint32(f"{c.arch}.attention.sliding_window_pattern", c.sliding_window_pattern)
                if c.final_softcap:
                    w.add_final_logit_softcapping(c.final_softcap)
            _add_tokenizer(w, model.tokenizer, c.vocab_size)
            if scaling.get("rope_type") == "llama3":  # llama.cpp divides each frequency by its factor
                base = np.asarray(rope_inv_freq(c.head_dim, c.rope_theta))
                scaled = np.asarray(rope_inv_freq(c.head_dim, c.rope_theta, scaling))
                w.add_tensor("rope_freqs.weight", (base / scaled).astype(np.float32))
            gemma = c.arch == "gemma3"
            for ours, t in network_tensors(model.network):
                name = gguf_name(ours, gemma)
                heads = None
                if c.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                    heads = c.n_heads if "attn_q" in name else c.n_kv_heads
                if isinstance(t, GGMLTensor) and qtype == "auto":  # the very blocks: exact
                    raw, kind = t.blocks.numpy(), T(t.qtype)
                    if heads:
                        raw = permute_qk(raw, heads)
                    w.add_tensor(name, np.ascontiguousarray(raw), raw_dtype=kind)
                    continue
                if isinstance(t, QuantizedTensor) and qtype == "auto":
                    raw, kind = _blocks_lossless(t, ours)
                    if heads:  # a permutation of rows: each row's blocks move whole
                        raw = permute_qk(raw, heads)
                    w.add_tensor(name, np.ascontiguousarray(raw), raw_dtype=kind)
                    continue
                a = float_weight(t).contiguous().numpy().astype(np.float32)
                if heads:
                    a = permute_qk(a, heads)
                kind = _float_type(qtype, quantized, a, ours, model.network)
                if kind == T.F32:
                    w.add_tensor(name, np.ascontiguousarray(a))
                else:
                    w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(a), kind),
                                 raw_dtype=kind)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    log.info("wrote %s", path)
    return path


def _float_type(qtype: str, quantized: bool, a: np.ndarray, name: str, network):
    import gguf

    T = gguf.GGMLQuantizationType
    if a.ndim < 2 or qtype == "f32":
        return T.F32
    if qtype == "auto":
        if quantized:
            return T.F32  # a weight kept in float: exact
        return T.BF16 if network.lm_head.weight.dtype == torch.bfloat16 else T.F16
    kind = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}[qtype]
    if kind in (T.Q4_0, T.Q4_1) and name.split(".")[0] in ("embed_tokens", "lm_head"):
        kind = T.Q8_0  # as `pocketlm quantize` keeps them at int8
    if kind in (T.Q8_0, T.Q4_0, T.Q4_1) and a.shape[1] % 32:
        raise ExportError(f"{name}: {a.shape[1]} columns is not a multiple of 32, which "
                          f"{qtype} blocks need; use --type f16")
    return kind


def _file_type(qtype: str, quantized: bool, model) -> int:
    from collections import Counter

    import gguf

    from pocketlm.model.ggml import packed_modules

    F = gguf.LlamaFileType
    packed = Counter(m.type_name for m in packed_modules(model.network))
    if qtype == "auto" and packed:  # blocks copied as they are: name the commonest type
        name = packed.most_common(1)[0][0]
        return getattr(F, f"MOSTLY_{name}", None) or getattr(F, f"MOSTLY_{name}_M", F.MOSTLY_F16)
    if qtype == "auto" and quantized:
        q = model.network.quantization_config
        return {(4, True): F.MOSTLY_Q4_0, (4, False): F.MOSTLY_Q4_1}.get(
            (q.get("bits"), q.get("sym")), F.MOSTLY_Q8_0)
    return {"auto": F.MOSTLY_F16, "f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16,
            "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1}[qtype]


# -- Hugging Face -------------------------------------------------------------------------------
def write_hf(model, folder: str | Path, dtype: str = "bf16", force: bool = False) -> Path:
    """Write ``model`` as a folder transformers' AutoModelForCausalLM/AutoTokenizer load.

    Float weights in ``dtype`` (bf16, fp16, fp32): a quantized model is dequantized, LoRA
    layers merged. Raises InvalidArgument (dtype, existing folder without ``force``),
    OutputLocked while another process writes the same folder.
    """
    import copy

    from safetensors.torch import save_file

    from pocketlm.lock import output_lock

    if dtype not in HF_DTYPES:
        raise InvalidArgument(f"--dtype {dtype!r}: choose one of {', '.join(HF_DTYPES)}")
    folder = Path(folder)
    c = model.config
    offset = getattr(c, "norm_offset", 0.0)
    with output_lock(folder):
        _refuse_existing(folder, force)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            tensors = {}
            for ours, t in network_tensors(model.network):
                x = float_weight(t)
                if offset and ours.endswith("norm.weight"):  # Gemma's checkpoints hold w - 1
                    x = x - offset
                key = ours if ours.startswith("lm_head") else f"model.{ours}"
                tensors[key] = x.to(HF_DTYPES[dtype]).contiguous()
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            cfg = c.to_hf(hf_format.torch_dtype(tensors))  # the written weights' dtype
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            gen = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
            model.tokenizer.save(tmp)
            card = copy.deepcopy(model.card)
            q = getattr(model.network, "quantization_config", None)
            card.steps.append({"step": "export", "settings": {
                "format": "hf", "dtype": dtype, **({"dequantized_from": {
                    k: q.get(k) for k in ("method", "bits", "group_size", "sym")}} if q else {})}})
            card.save(tmp, c)
            _replace_dir(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise InvalidArgument(f"{path} exists; pass --force to replace it, or choose another path")


def _replace_dir(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` onto ``folder`` (an old folder there is removed after the swap)."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def export(model, out: str | Path, format: str = "gguf", type: str = "auto",
           dtype: str = "bf16", force: bool = False) -> Path:
    """``format`` gguf (``type``) or hf (``dtype``); see ``write_gguf`` and ``write_hf``."""
    if format == "gguf":
        return write_gguf(model, out, type, force)
    if format == "hf":
        return write_hf(model, out, dtype, force)
    raise InvalidArgument(f"--format {format!r}: choose gguf or hf")


__all__ = ["ExportError", "UnsupportedModel", "export", "write_gguf", "write_hf"]
